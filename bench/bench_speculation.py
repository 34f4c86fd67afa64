"""Self-speculative shallow-deep decoding against the full model (batch 1; CUDA when available).

    .venv/bin/python bench/bench_speculation.py [--rounds 3] [--samples 6] [--new_tokens 32]
                                                [--targets 0.5 0.8 0.95] [--draft_lengths 1 2 3 4 6 8]

A T5-large-shaped model (24 decoder blocks, d_model 1024, vocabulary 32128) with random weights,
shallow layer 6 (L/4). Its deep blocks are made to agree with the shallow exit at a controlled
rate: the output projections of blocks 7..24 (self-attention `o`, cross-attention `o`,
feed-forward `wo`) are multiplied by a factor s, so that their residual updates shrink with s and
the full model's argmax moves away from layer 6's on fewer tokens (s = 0: always the same). For
each target agreement s is found by bisection on log s, measuring how often layer 6's argmax
equals the full model's along the full model's own greedy path (self-speculation with one draft
per pass drafts every token on a verified prefix); the table reports the acceptance each run
measured (accepted / drafted, discarded drafts included, so below the per-token agreement).
The LM head is given its own random matrix (T5 ties it to the embeddings, which makes a random
model repeat its input token forever, so every draft would trivially agree).

Every setting runs with threshold 0 (draft whenever allowed, `max_draft_tokens` in a row), side
by side with the full model in interleaved rounds; tokens/s is the median over rounds; every
output is asserted identical to the full model's.

The demo model (cache/demo_bio, written by `make demo`; skipped when absent) runs the same
comparison on its first --demo_samples evaluation sources, at threshold 0 and at the demo's
softmax 0.9, with its own shallow layer 2 of 8: acceptance there is whatever the trained model
gives.

`--do_sample`: self-speculative sampling against the full model's sampling at each of
--temperatures (top_k 0, top_p 1: the whole distribution), on the random model at the first
--targets agreement (its deep scale calibrated as above) and on the demo model at threshold 0.
Each round draws with the same seeds per variant (a generator seeded by the source's index);
outputs are not compared (self-speculative sampling keeps the full model's distribution, not
its draws: tests/test_sampling.py checks the distribution), so tokens/s counts each variant's
own tokens; acceptance is accepted / drafted drafts.
"""

import argparse
import math

import torch

from common import (  # common puts src/ on the path
    ROOT,
    build_model,
    configure,
    median,
    print_table,
    run_side_by_side,
    sample_inputs,
    save_results,
)
from models.self_speculation import expected_blocks_per_token

DEMO_CACHE = ROOT / "cache" / "demo_bio"
DEMO_SHALLOW, DEMO_THRESHOLDS = 2, (0.0, 0.9)


def deep_projections(model, shallow: int):
    """The weights whose scale sets how much the deep blocks change the prediction."""
    for block in model.decoder.block[shallow:]:
        yield block.layer[0].SelfAttention.o.weight
        yield block.layer[1].EncDecAttention.o.weight
        yield block.layer[2].DenseReluDense.wo.weight


class DeepScale:
    """Sets the deep output projections to original * s (from kept originals: no drift)."""

    def __init__(self, model, shallow: int):
        self.weights = list(deep_projections(model, shallow))
        self.originals = [w.detach().clone() for w in self.weights]

    @torch.no_grad()
    def set(self, s: float) -> None:
        for weight, original in zip(self.weights, self.originals):
            weight.copy_(original * s)


def greedy_path_agreement(model, shallow: int, inputs, new_tokens) -> float:
    """Share of tokens where the shallow layer's argmax equals the full model's, along the full
    model's greedy path: self-speculation with one draft per pass drafts every token on a verified
    prefix."""
    configure(model, **speculation_flags(1, shallow))
    drafted = accepted = 0
    for input_ids in inputs:
        model.generate(input_ids=input_ids, max_new_tokens=new_tokens)
        drafted += model.exit_stats()["drafted_tokens"]
        accepted += model.exit_stats()["accepted_tokens"]
    return accepted / drafted


def calibrate(model, shallow: int, scale: DeepScale, target: float, inputs, new_tokens, steps: int = 6) -> float:
    """s with agreement(s) close to target, by bisection on log s in [1e-3, 1]."""
    low, high = math.log(1e-3), 0.0  # agreement falls as s grows
    for _ in range(steps):
        middle = (low + high) / 2
        scale.set(math.exp(middle))
        if greedy_path_agreement(model, shallow, inputs, new_tokens) > target:
            low = middle
        else:
            high = middle
    return math.exp((low + high) / 2)


def decode_all(model, inputs, new_tokens, temperature=None, **flags):
    """A variant: every input decoded with `flags`, greedily, or sampling at `temperature`."""
    def run():
        configure(model, **flags)
        outputs, stats = [], []
        for i, input_ids in enumerate(inputs):
            sampling = {} if temperature is None else dict(
                do_sample=True, temperature=temperature, top_k=0, top_p=1.0,
                generator=torch.Generator(input_ids.device).manual_seed(i))
            outputs.append(model.generate(input_ids=input_ids, max_new_tokens=new_tokens, **sampling))
            stats.append(model.exit_stats())
        return {"outputs": outputs, "stats": stats}
    return run


def speculation_flags(max_draft, shallow, threshold=0.0):
    return dict(use_shallow_deep=True, shallow_exit_layer=shallow, shallow2deep_conf_type="softmax",
                shallow2deep_conf_threshold=threshold, use_self_speculation=True, max_draft_tokens=max_draft)


def summed(stats, key):
    return sum(s[key] for s in stats)


def measure(variants, rounds, device, num_layers, labels):
    """Runs the variants side by side (the first is the full model); one summary row each, every
    output asserted identical to the full model's."""
    results = run_side_by_side(variants, rounds, device)
    full = results["full model"]
    expected = full["outputs"][0]
    tokens = sum(out.shape[1] - 1 for out in expected)
    full_speed = tokens / median(full["seconds"])
    summary = []
    for name, result in results.items():
        for outputs in result["outputs"]:  # the guarantee, checked on every run
            assert all(torch.equal(a, b) for a, b in zip(outputs, expected)), f"{name} differs from the full model"
        stats = result["stats"][0]
        speed = tokens / median(result["seconds"])
        row = dict(labels, setting=name, tokens_per_s=speed, speedup=speed / full_speed,
                   block_avg=summed(stats, "block_avg") / len(stats))
        if name != "full model":
            drafted, accepted = summed(stats, "drafted_tokens"), summed(stats, "accepted_tokens")
            passes = summed(stats, "verify_passes")
            row.update(acceptance_rate=accepted / drafted, drafted_per_pass=drafted / passes,
                       accepted_per_pass=accepted / passes,
                       predicted_blocks=expected_blocks_per_token(num_layers, accepted / drafted, drafted / passes))
        summary.append(row)
    return summary


def table_row(first, second, row):
    return [first, second, row["setting"],
            f"{row['acceptance_rate']:.2f}" if "acceptance_rate" in row else "-",
            f"{row['accepted_per_pass']:.2f}" if "accepted_per_pass" in row else "-",
            f"{row['block_avg']:.1f}",
            f"{row['predicted_blocks']:.1f}" if "predicted_blocks" in row else "-",
            f"{row['tokens_per_s']:.2f}", f"{row['speedup']:.2f}x"]


def measure_sampling(variants, rounds, device, labels):
    """Sampling variants side by side: tokens/s of each over its own outputs (median of rounds)."""
    results = run_side_by_side(variants, rounds, device)
    summary = []
    for name, result in results.items():
        speeds = [sum(out.shape[1] - 1 for out in outputs) / seconds
                  for outputs, seconds in zip(result["outputs"], result["seconds"])]
        stats = [s for round_stats in result["stats"] for s in round_stats]
        drafted, accepted = summed(stats, "drafted_tokens") if "drafted_tokens" in stats[0] else 0, \
            summed(stats, "accepted_tokens") if "accepted_tokens" in stats[0] else 0
        summary.append(dict(labels(name), setting=name, tokens_per_s=median(speeds),
                            acceptance_rate=accepted / drafted if drafted else None,
                            block_avg=summed(stats, "block_avg") / len(stats)))
    for row in summary:  # against the full model's sampling at the same temperature
        full = next(r for r in summary if r["temperature"] == row["temperature"] and r["setting"].startswith("full"))
        row["speedup"] = row["tokens_per_s"] / full["tokens_per_s"]
    return summary


def sampling_variants(model, inputs, new_tokens, shallow, args):
    variants = {}
    for t in args.temperatures:
        variants[f"full model, T={t}"] = decode_all(model, inputs, new_tokens, temperature=t)
        for n in args.draft_lengths:
            variants[f"self-spec n={n}, T={t}"] = decode_all(model, inputs, new_tokens, temperature=t,
                                                             **speculation_flags(n, shallow))
    return variants


def print_sampling(title, summary):
    print(title)
    print_table(["setting", "acceptance", "block_avg", "tokens/s", "vs full (same T)"],
                [[r["setting"], "-" if r["acceptance_rate"] is None else f"{r['acceptance_rate']:.2f}",
                  f"{r['block_avg']:.1f}", f"{r['tokens_per_s']:.2f}", f"{r['speedup']:.2f}x"] for r in summary])


def sampling_part(args):
    """--do_sample: the random model at the first target agreement, then the demo model."""
    device = torch.device(args.device)
    temperature_of = lambda name: float(name.rsplit("T=", 1)[1])  # noqa: E731
    out = {}
    if args.targets:
        model = build_model(args.shape, device=device)
        num_layers = model.config.num_decoder_layers
        shallow = num_layers // 4
        torch.manual_seed(1)
        with torch.no_grad():  # an untied head: see the module docstring
            model.lm_head.weight = torch.nn.Parameter(torch.randn_like(model.lm_head.weight))
        scale = DeepScale(model, shallow)
        inputs = sample_inputs(model, args.samples, args.source_length)
        target = args.targets[0]
        s = calibrate(model, shallow, scale, target, inputs, args.new_tokens)
        scale.set(s)
        print(f"sampling, agreement {target} (greedy): deep scale {s:.4f}, running {args.rounds} rounds", flush=True)
        summary = measure_sampling(sampling_variants(model, inputs, args.new_tokens, shallow, args), args.rounds,
                                   device, lambda name: dict(temperature=temperature_of(name), target_agreement=target,
                                                             deep_scale=s))
        print_sampling(f"{args.shape} shape, random weights, greedy agreement {target}, shallow layer {shallow}, "
                       f"{args.samples} samples x {args.new_tokens} tokens, median of {args.rounds} rounds, "
                       f"{torch.get_num_threads()} threads", summary)
        out["random"] = summary
    if (DEMO_CACHE / "model").is_dir():
        model, inputs, new_tokens = load_demo(args)
        summary = measure_sampling(sampling_variants(model, inputs, new_tokens, DEMO_SHALLOW, args), args.rounds,
                                   device, lambda name: dict(temperature=temperature_of(name)))
        print_sampling(f"demo model (cache/demo_bio, shallow layer {DEMO_SHALLOW}, threshold 0), {len(inputs)} "
                       f"evaluation sources, median of {args.rounds} rounds", summary)
        out["demo"] = summary
    else:
        print(f"\n(no demo model in {DEMO_CACHE}: its part is skipped; run `make demo` first)")
    return out


def load_demo(args):
    """The demo model on the device, its first --demo_samples evaluation sources, its length."""
    from transformers import AutoConfig, AutoTokenizer

    from demo import TASKS, eval_sources
    from models.deploying_t5 import DeployT5ForConditionalGeneration

    model_dir = DEMO_CACHE / "model"
    task = TASKS["bio"]
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = DeployT5ForConditionalGeneration.from_pretrained(model_dir, config=AutoConfig.from_pretrained(model_dir))
    device = torch.device(args.device)
    model = model.eval().to(device)
    sources = eval_sources(task, DEMO_CACHE / "data" / "eval.jsonl", args.demo_samples)
    inputs = [tokenizer(text, max_length=task.length("max_source_length"), truncation=True,
                        return_tensors="pt").input_ids.to(device) for text in sources]
    return model, inputs, task.length("max_target_length")


def demo_part(args):
    """The trained demo model: full model against self-speculation, its own data."""
    model, inputs, new_tokens = load_demo(args)
    device = model.device
    variants = {"full model": decode_all(model, inputs, new_tokens)}
    for threshold in DEMO_THRESHOLDS:
        for n in args.draft_lengths:
            variants[f"softmax {threshold}, n={n}"] = decode_all(
                model, inputs, new_tokens, **speculation_flags(n, DEMO_SHALLOW, threshold))
    print(f"demo model: {len(inputs)} sources, running {args.rounds} rounds", flush=True)
    summary = measure(variants, args.rounds, device, model.config.num_decoder_layers, {})
    print(f"\ndemo model (cache/demo_bio, {model.config.num_decoder_layers} decoder layers, shallow layer "
          f"{DEMO_SHALLOW}), {len(inputs)} evaluation sources, median of {args.rounds} rounds")
    print_table(["setting", "acceptance", "accepted/pass", "block_avg", "predicted blocks", "tokens/s", "vs full"],
                [table_row("", "", row)[2:] for row in summary])
    return summary


def random_model_part(args):
    """The T5-shaped random model at each target agreement: full model against every draft length."""
    device = torch.device(args.device)
    model = build_model(args.shape, device=device)
    num_layers = model.config.num_decoder_layers
    shallow = num_layers // 4  # 6 of T5-large's 24 decoder blocks
    torch.manual_seed(1)
    with torch.no_grad():  # an untied head: see the module docstring
        model.lm_head.weight = torch.nn.Parameter(torch.randn_like(model.lm_head.weight))
    scale = DeepScale(model, shallow)
    inputs = sample_inputs(model, args.samples, args.source_length)

    summary, rows = [], []
    for target in args.targets:
        s = calibrate(model, shallow, scale, target, inputs, args.new_tokens)
        scale.set(s)
        print(f"agreement {target}: deep scale {s:.4f}, running {args.rounds} rounds", flush=True)
        variants = {"full model": decode_all(model, inputs, args.new_tokens)}
        for n in args.draft_lengths:
            variants[f"n={n}"] = decode_all(model, inputs, args.new_tokens, **speculation_flags(n, shallow))
        for row in measure(variants, args.rounds, device, num_layers, dict(target_agreement=target, deep_scale=s)):
            summary.append(row)
            rows.append(table_row(f"{target:.2f}", f"{s:.4f}", row))
    print(f"{args.shape} shape, random weights, shallow layer {shallow}, {args.samples} samples x "
          f"{args.new_tokens} tokens, median of {args.rounds} rounds, {torch.get_num_threads()} threads")
    print_table(["target", "deep scale", "setting", "acceptance", "accepted/pass", "block_avg",
                 "predicted blocks", "tokens/s", "vs full"], rows)
    return summary


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default="t5-large", help="t5-small: a quick check of the script itself")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--samples", type=int, default=6)
    parser.add_argument("--new_tokens", type=int, default=32)
    parser.add_argument("--source_length", type=int, default=16)
    parser.add_argument("--targets", type=float, nargs="*", default=[0.5, 0.8, 0.95],
                        help="per-token agreement levels of the random model; none: only the demo model")
    parser.add_argument("--draft_lengths", type=int, nargs="+", default=[1, 2, 3, 4, 6, 8])
    parser.add_argument("--demo_samples", type=int, default=50)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--do_sample", action="store_true", help="self-speculative sampling against the full "
                        "model's sampling (module docstring)")
    parser.add_argument("--temperatures", type=float, nargs="+", default=[0.7, 1.0])
    args = parser.parse_args()
    if args.do_sample:
        saved = save_results("bench_speculation_sampling", {"args": vars(args), **sampling_part(args)})
        print(f"\nsaved {saved}")
        return

    results = random_model_part(args) if args.targets else []
    demo = demo_part(args) if (DEMO_CACHE / "model").is_dir() else []
    if not demo:
        print(f"\n(no demo model in {DEMO_CACHE}: its part is skipped; run `make demo` first)")
    saved = save_results("bench_speculation", {"args": vars(args), "results": results, "demo": demo})
    print(f"\nsaved {saved}")


if __name__ == "__main__":
    main()
