"""Speed of the decode loop against HF's generate, on T5-large and T5-small shapes (batch 1).

    .venv/bin/python bench/bench_engine.py [--shapes t5-large,t5-small] [--new-tokens 32]

Variants, timed side by side in interleaved rounds:
  hf       HF T5ForConditionalGeneration.generate (greedy, its own cache)
  full     our loop, all L blocks
  static   our loop, static exit at L/2
  checked  our loop, early exit with softmax at threshold 1 (every layer checked, no token exits)
  full-wxt our loop, all L blocks, every large CPU projection as W x^T (the fixed rule before
           kernels were chosen by measurement)
  full-lin our loop, all L blocks, every projection F.linear

Targets: full within 1.05x of hf; static reaching 0.9 of the ideal decoder speedup L/k.
"""

import argparse

import torch

from common import (
    build_model,
    configure,
    cpu_name,
    fixed_transposed,
    projection_rule,
    hf_generate,
    hf_variant,
    median,
    print_table,
    run_side_by_side,
    sample_inputs,
    save_results,
)

STAT_KEYS = ("tokens", "time_encoder", "time_blocks", "time_propagation", "time_confidence", "time_total")


def our_variant(model, inputs, steps, **flags):
    def run():
        configure(model, **flags)
        totals = dict.fromkeys(STAT_KEYS, 0.0)
        totals["block_runs"] = 0.0
        for input_ids in inputs:
            model.generate(input_ids=input_ids, max_new_tokens=steps)
            stats = model.exit_stats()
            for key in STAT_KEYS:
                totals[key] += stats[key]
            totals["block_runs"] += sum(stats["block_op"])
        return totals

    return run


def check_identical(model, inputs, steps):
    configure(model)
    for input_ids in inputs:
        ours = model.generate(input_ids=input_ids, max_new_tokens=steps)
        theirs = hf_generate(model, input_ids=input_ids, max_new_tokens=steps)
        if not torch.equal(ours, theirs):
            raise RuntimeError("our full-model loop and HF generate disagree: the benchmark would compare unequal work")


def bench_shape(shape, args):
    model = build_model(shape)
    L = model.config.num_decoder_layers
    k = L // 2
    inputs = sample_inputs(model, args.samples, args.source_length)
    check_identical(model, inputs[:1], 4)
    model.generate(input_ids=inputs[0], max_new_tokens=2)  # warm-up
    variants = {
        "hf": hf_variant(model, inputs, args.new_tokens),
        "full": our_variant(model, inputs, args.new_tokens),
        "static": our_variant(model, inputs, args.new_tokens, static_exit_layer=k),
        "checked": our_variant(model, inputs, args.new_tokens, use_early_exit=True, exit_conf_type="softmax",
                               exit_conf_threshold=1.0),
        "full-wxt": projection_rule(fixed_transposed)(our_variant(model, inputs, args.new_tokens)),
        "full-lin": projection_rule(lambda weight, rows: False)(our_variant(model, inputs, args.new_tokens)),
    }
    raw = run_side_by_side(variants, args.rounds, model.device)
    m = {name: {key: median(values) for key, values in r.items()} for name, r in raw.items()}

    def per_token(name, key="seconds"):
        return m[name][key] / m[name]["tokens"]

    def decoder_per_token(name):
        return (m[name]["seconds"] - m[name]["time_encoder"]) / m[name]["tokens"]

    def blocks_per_token(name):
        return (m[name]["time_blocks"] + m[name]["time_propagation"]) / m[name]["tokens"]

    block_cost = m["checked"]["time_blocks"] / m["checked"]["block_runs"]
    check_cost = m["checked"]["time_confidence"] / (m["checked"]["tokens"] * (L - 1))
    summary = {
        "shape": shape,
        "decoder_layers": L,
        "static_layer": k,
        "ms_per_token": {name: 1000 * per_token(name) for name in variants},
        "full_over_hf": per_token("full") / per_token("hf"),
        "full_wxt_over_hf": per_token("full-wxt") / per_token("hf"),
        "full_lin_over_hf": per_token("full-lin") / per_token("hf"),
        "static_decoder_speedup": decoder_per_token("full") / decoder_per_token("static"),
        "static_block_speedup": blocks_per_token("full") / blocks_per_token("static"),
        "ideal_speedup": L / k,
        "confidence_check_over_block": check_cost / block_cost,
        "checked_over_full": per_token("checked") / per_token("full"),
    }
    summary["static_fraction_of_ideal"] = summary["static_decoder_speedup"] / summary["ideal_speedup"]
    summary["static_block_fraction_of_ideal"] = summary["static_block_speedup"] / summary["ideal_speedup"]
    del model
    return summary


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", default="t5-large,t5-small")
    parser.add_argument("--samples", type=int, default=2)
    parser.add_argument("--source-length", type=int, default=64)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()

    summaries = [bench_shape(shape, args) for shape in args.shapes.split(",")]
    rows = []
    for s in summaries:
        ms = s["ms_per_token"]
        rows.append([
            s["shape"], f"{ms['hf']:.1f}", f"{ms['full']:.1f}", f"{s['full_over_hf']:.3f}",
            f"{s['full_wxt_over_hf']:.3f}", f"{s['full_lin_over_hf']:.3f}",
            f"{ms['static']:.1f}", f"{s['static_decoder_speedup']:.2f}/{s['ideal_speedup']:.0f} = {s['static_fraction_of_ideal']:.2f}",
            f"{s['static_block_speedup']:.2f}/{s['ideal_speedup']:.0f} = {s['static_block_fraction_of_ideal']:.2f}",
            f"{ms['checked']:.1f}", f"{s['confidence_check_over_block']:.2f}",
        ])
    print_table(["shape", "hf ms/tok", "full ms/tok", "full/hf", "full W x^T/hf", "full F.linear/hf", "static L/2 ms/tok",
                 "static decoder speedup (of ideal)", "static block speedup (of ideal)",
                 "all-checked ms/tok", "1 check / 1 block"], rows)
    print(f"CPU: {cpu_name()}, {torch.get_num_threads()} threads")
    path = save_results("bench_engine", {"args": vars(args), "results": summaries})
    print(f"\nsaved {path}")


if __name__ == "__main__":
    main()
