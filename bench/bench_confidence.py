"""Cost of confidence checks: vocabulary reduction and contrastive measures (T5-large shape, batch 1).

    .venv/bin/python bench/bench_confidence.py [--new-tokens 12] [--rounds 2] [--min-layer 7]

Every variant is early exit at threshold 1 (no token exits, so all do the same block work) with
confidence checked at every layer from --min-layer (7: the published k(7) = 842 retained rows)
to L-1. Variants run side by side in interleaved rounds. Reported per variant, relative to one
decoder block: the median reduced check (after the start layer), the median full-head check (the
start layer's, or every check without reduction) and the average of all checks of a token; then
tokens per second, and confidence FLOPs per token with the reduction factor against the same
measure without reduction (start layer's full head included). Target: fixed reduction at
k = 842 makes a (reduced) check cost at most 10% of a block.

--threshold 0 makes every token exit at --min-layer instead, its start layer: the full-head
check column then shows what such a token pays (no retained set is taken for it).
"""

import argparse
import math
import time
from contextlib import contextmanager

from common import build_model, configure, median, print_table, run_side_by_side, sample_inputs, save_results, synchronize
from models.layer_scorer import LayerScorer

MEASURES = ("softmax", "contrastive_decoding", "reweight_contrastive_decoding", "JSD_contrastive_confidence")
REDUCTIONS = (None, "fixed", "decaying", "adaptive", "decaying+rerank")


def variant_flags(measure, reduction, min_layer, threshold=1.0):
    flags = dict(use_early_exit=True, exit_conf_type=measure, exit_conf_threshold=threshold, exit_min_layer=min_layer,
                 count_flops=True)
    if reduction is not None:
        mode, _, rerank = reduction.partition("+")
        flags.update(type_vocab_reduct=mode, vocab_rerank=bool(rerank))
    return flags


@contextmanager
def timed_checks(device, times: dict):
    """Time every LayerScorer.confidence call, filed under "full" when it computed the full head
    (no reduction, or the start layer of one) and under "reduced" otherwise."""
    original = LayerScorer.confidence

    def confidence(scorer, *args):
        kind = "reduced" if scorer.reduced is not None and scorer.reduced.started else "full"
        synchronize(device)
        start = time.perf_counter()
        value = original(scorer, *args)
        synchronize(device)
        times[kind].append(time.perf_counter() - start)
        return value

    LayerScorer.confidence = confidence
    try:
        yield
    finally:
        LayerScorer.confidence = original


def runner(model, inputs, steps, flags):
    def run():
        configure(model, **flags)
        totals = dict(tokens=0, time_blocks=0.0, time_confidence=0.0, blocks=0, flops_confidence=0)
        checks = {"full": [], "reduced": []}
        with timed_checks(model.device, checks):
            for input_ids in inputs:
                model.generate(input_ids=input_ids, max_new_tokens=steps)
                stats = model.exit_stats()
                for key in ("tokens", "time_blocks", "time_confidence", "flops_confidence"):
                    totals[key] += stats[key]
                totals["blocks"] += sum(stats["block_op"])
        totals["checks"] = len(checks["full"]) + len(checks["reduced"])
        totals["full_check"] = median(checks["full"])
        totals["reduced_check"] = median(checks["reduced"]) if checks["reduced"] else float("nan")
        return totals

    return run


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default="t5-large")
    parser.add_argument("--samples", type=int, default=1)
    parser.add_argument("--source-length", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=12)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--min-layer", type=int, default=7)
    parser.add_argument("--threshold", type=float, default=1.0, help="1: no token exits; 0: all exit at --min-layer")
    parser.add_argument("--measures", default=",".join(MEASURES))
    parser.add_argument("--reductions", default=",".join(r or "none" for r in REDUCTIONS))
    args = parser.parse_args()

    model = build_model(args.shape)
    L = model.config.num_decoder_layers
    inputs = sample_inputs(model, args.samples, args.source_length)
    reductions = [None if r == "none" else r for r in args.reductions.split(",")]
    variants = {}
    for measure in args.measures.split(","):
        for reduction in reductions:
            flags = variant_flags(measure, reduction, args.min_layer, args.threshold)
            variants[(measure, reduction or "none")] = runner(model, inputs, args.new_tokens, flags)
    raw = run_side_by_side(variants, args.rounds, model.device)

    rows, results = [], []
    for (measure, reduction), r in raw.items():
        m = {key: median(values) for key, values in r.items()}
        block_seconds = m["time_blocks"] / m["blocks"]
        check_seconds = m["time_confidence"] / m["checks"]
        flops_per_token = m["flops_confidence"] / m["tokens"]
        unreduced = median(raw[(measure, "none")]["flops_confidence"]) / median(raw[(measure, "none")]["tokens"]) \
            if (measure, "none") in raw else float("nan")
        softmax_check = None
        if ("softmax", reduction) in raw:
            s = raw[("softmax", reduction)]
            softmax_check = median(s["time_confidence"]) / median(s["checks"])
        result = {
            "measure": measure, "reduction": reduction,
            "reduced_check_over_block": None if math.isnan(m["reduced_check"]) else m["reduced_check"] / block_seconds,
            "full_check_over_block": m["full_check"] / block_seconds,
            "check_over_block": check_seconds / block_seconds,
            "check_over_softmax_check": check_seconds / softmax_check if softmax_check else None,
            "tokens_per_s": m["tokens"] / m["seconds"],
            "confidence_gflops_per_token": flops_per_token / 1e9,
            "confidence_flop_reduction": unreduced / flops_per_token,
        }
        results.append(result)
        reduced_check = result["reduced_check_over_block"]
        rows.append([measure, reduction, "-" if reduced_check is None else f"{reduced_check:.3f}",
                     f"{result['full_check_over_block']:.2f}", f"{result['check_over_block']:.3f}",
                     f"{result['check_over_softmax_check']:.2f}" if softmax_check else "-",
                     f"{result['tokens_per_s']:.2f}", f"{result['confidence_gflops_per_token']:.3f}",
                     f"{result['confidence_flop_reduction']:.1f}x"])
    print(f"{args.shape}: L = {L}, confidence checked at layers {args.min_layer}..{L - 1}, "
          f"{args.new_tokens} tokens x {args.samples} samples, median of {args.rounds} rounds")
    print_table(["measure", "reduction", "reduced check / block", "full-head check / block",
                 "average check / block", "check / softmax check", "tokens/s",
                 "conf GFLOPs/token", "conf FLOP reduction"], rows)
    path = save_results("bench_confidence", {"args": vars(args), "results": results})
    print(f"\nsaved {path}")


if __name__ == "__main__":
    main()
