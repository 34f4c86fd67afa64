"""Speed of the decode loop against HF's generate on a LongT5-base-shaped model (batch 1).

    .venv/bin/python bench/bench_longt5.py [--source-length 4096] [--new-tokens 32] [--rounds 3]

A random-weight model of google/long-t5-tglobal-base's shape (transient-global encoder, 12+12
blocks, d_model 768, gated-gelu), long random sources. Variants, timed side by side in
interleaved rounds:
  hf          HF LongT5ForConditionalGeneration.generate (greedy, its own cache)
  hf_decoder  the same, given the encoder's output (computed beforehand): HF's decoding alone
  full        our loop, all L blocks
  static      our loop, static exit at L/2

With 4,096 source tokens the encoder takes much of each call, so the table gives the whole call
and the decoder alone (ours: the call minus the encoder time the loop measures within it).
"""

import argparse

import torch
from transformers import LongT5Config
from transformers.modeling_outputs import BaseModelOutput

from common import configure, hf_generate, hf_variant, median, print_table, run_side_by_side, sample_inputs, save_results

from models.deploying_longt5 import DeployLongT5ForConditionalGeneration  # noqa: E402

# google/long-t5-tglobal-base's shape
LONGT5_BASE = dict(d_model=768, d_kv=64, d_ff=2048, num_heads=12, num_layers=12, vocab_size=32128,
                   feed_forward_proj="gated-gelu", tie_word_embeddings=False,
                   encoder_attention_type="transient-global", local_radius=127, global_block_size=16)


def build_model(seed=0):
    """Random weights that never emit EOS, so every run has equal length."""
    config = LongT5Config(**LONGT5_BASE, dropout_rate=0.0, decoder_start_token_id=0, eos_token_id=None)
    torch.manual_seed(seed)
    model = DeployLongT5ForConditionalGeneration(config).eval()
    model.generation_config.eos_token_id = None
    return model


def our_variant(model, inputs, steps, **flags):
    def run():
        configure(model, **flags)
        totals = {"tokens": 0, "time_encoder": 0.0}
        for input_ids in inputs:
            model.generate(input_ids=input_ids, max_new_tokens=steps)
            stats = model.exit_stats()
            totals["tokens"] += stats["tokens"]
            totals["time_encoder"] += stats["time_encoder"]
        return totals

    return run


def hf_decoder_variant(model, inputs, steps):
    with torch.inference_mode():
        encoded = [BaseModelOutput(last_hidden_state=model.encoder(input_ids=ids).last_hidden_state) for ids in inputs]

    def run():
        configure(model)
        for input_ids, encoder_outputs in zip(inputs, encoded):
            hf_generate(model, input_ids=input_ids, encoder_outputs=encoder_outputs, max_new_tokens=steps)
        return {"tokens": steps * len(inputs)}

    return run


def check_identical(model, input_ids, steps):
    configure(model)
    ours = model.generate(input_ids=input_ids, max_new_tokens=steps)
    theirs = hf_generate(model, input_ids=input_ids, max_new_tokens=steps)
    if not torch.equal(ours, theirs):
        raise RuntimeError("our full-model loop and HF generate disagree: the benchmark would compare unequal work")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=1)
    parser.add_argument("--source-length", type=int, default=4096)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()

    model = build_model()
    L = model.config.num_decoder_layers
    k = L // 2
    inputs = sample_inputs(model, args.samples, args.source_length)
    check_identical(model, inputs[0], 4)  # also the warm-up
    variants = {
        "hf": hf_variant(model, inputs, args.new_tokens),
        "hf_decoder": hf_decoder_variant(model, inputs, args.new_tokens),
        "full": our_variant(model, inputs, args.new_tokens),
        "static": our_variant(model, inputs, args.new_tokens, static_exit_layer=k),
    }
    raw = run_side_by_side(variants, args.rounds, model.device)
    m = {name: {key: median(values) for key, values in r.items()} for name, r in raw.items()}
    encoder = median(raw["full"]["time_encoder"] + raw["static"]["time_encoder"])  # per call, all samples

    def per_sample(name):
        return m[name]["seconds"] / args.samples

    def decoder_per_token(name):
        if name == "hf_decoder":
            return m[name]["seconds"] / m[name]["tokens"]
        # each round's call minus the encoder time measured within that call
        times = [s - e for s, e in zip(raw[name]["seconds"], raw[name]["time_encoder"])]
        return median(times) / m[name]["tokens"]

    summary = {
        "rounds": args.rounds,
        "shape": "long-t5-tglobal-base",
        "source_length": args.source_length,
        "decoder_layers": L,
        "static_layer": k,
        "s_per_sample": {name: per_sample(name) for name in ("hf", "full", "static")},
        "encoder_s_per_sample": encoder / args.samples,
        "decoder_ms_per_token": {name: 1000 * decoder_per_token(name) for name in ("hf_decoder", "full", "static")},
        "full_over_hf": per_sample("full") / per_sample("hf"),
        "static_over_hf": per_sample("static") / per_sample("hf"),
        "decoder_full_over_hf": decoder_per_token("full") / decoder_per_token("hf_decoder"),
        "decoder_static_over_hf": decoder_per_token("static") / decoder_per_token("hf_decoder"),
        "decoder_static_speedup": decoder_per_token("full") / decoder_per_token("static"),
        "ideal_speedup": L / k,
    }
    s, d = summary["s_per_sample"], summary["decoder_ms_per_token"]
    print_table(["variant", "s/sample", "over hf", "decoder ms/tok", "decoder over hf"], [
        ["hf", f"{s['hf']:.2f}", "1.000", f"{d['hf_decoder']:.1f}", "1.000"],
        ["full", f"{s['full']:.2f}", f"{summary['full_over_hf']:.3f}", f"{d['full']:.1f}",
         f"{summary['decoder_full_over_hf']:.3f}"],
        [f"static {k}/{L}", f"{s['static']:.2f}", f"{summary['static_over_hf']:.3f}", f"{d['static']:.1f}",
         f"{summary['decoder_static_over_hf']:.3f}"],
    ])
    print(f"\nencoder {summary['encoder_s_per_sample']:.2f} s/sample of {args.source_length} tokens; "
          f"static decoder speed-up {summary['decoder_static_speedup']:.2f} (ideal {summary['ideal_speedup']:.0f})")
    path = save_results("bench_longt5", {"args": vars(args), "results": summary})
    print(f"saved {path}")


if __name__ == "__main__":
    main()
