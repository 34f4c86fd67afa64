"""Batched decoding: our loop against HF generate per batch size, and what per-row exits buy.

    .venv/bin/python bench/bench_batch.py [--shapes t5-small,t5-large] [--batches 1,8,32]
                                          [--new-tokens 16] [--rounds 3] [--source-length 32]

Random-weight models of T5 shapes (bench/common.py), timed side by side in interleaved rounds,
medians reported. Per shape and batch size, with equal source lengths and with a padded mix
(lengths spread over [length/2, length]):
  hf / full    HF generate and our loop, full model (identical outputs asserted)
  static       static exit at L/2: decoder speedup against full, as a fraction of the ideal 2
  meta         a random meta head at a threshold that skips about half the blocks, rows exiting
               at different layers: wall-clock decoder speedup against full, as a fraction of
               what block_avg allows (L / block_avg)
  softmax      softmax early exit with decaying vocabulary reduction
Below each row, the profile of the meta figure: full and meta decoder time split into blocks,
confidence checks, output heads and propagation (the loop's own timer); and, with the throughput
figures, the encoder's share of each (batch and rows alone).
Throughput is tokens/s of a batch against the same rows decoded one at a time (batch 1), for
batches up to --alone-max. Memory: the decode state the loop allocates
(key/value cache and stacked exit states, from the shapes) and, on CUDA, the peak allocated.
"""

import argparse
import time
from typing import Dict, Optional

import torch

from common import build_model, hf_generate, median, print_table, run_side_by_side, save_results, synchronize
from models.decode_loop import BatchDecoder, ComponentTimer, ExitPolicy
from util.additional_args import AdditionalArguments


COMPONENTS = ("blocks", "confidence", "head", "propagation")  # the decoder's time, as the loop's timer splits it


def batch_inputs(model, batch: int, length: int, padded: bool, seed: int = 1):
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(2, model.config.vocab_size, (batch, length), generator=generator)
    mask = torch.ones_like(ids)
    if padded:  # right padding, as a tokenizer pads a batch
        for b in range(batch):
            n = length - (b * (length // 2)) // max(batch - 1, 1)
            ids[b, n:], mask[b, n:] = 0, 0
    return ids.to(model.device), mask.to(model.device)


def ours(model, ids, mask, steps, args):
    def run():
        model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=steps, exit_args=args)
        stats = model.exit_stats()
        out = {"decoder": stats["time_total"] - stats["time_encoder"], "encoder": stats["time_encoder"],
               "block_avg": stats["block_avg"], "tokens": stats["tokens"]}
        out.update({name: stats[f"time_{name}"] for name in COMPONENTS})
        return out

    return run


def hf(model, ids, mask, steps):
    def run():
        hf_generate(model, input_ids=ids, attention_mask=mask, max_new_tokens=steps)
        return {"tokens": steps * ids.shape[0]}

    return run


def meta_threshold(model, ids, mask, steps, L, iterations: int = 7):
    """The meta threshold whose block_avg is closest to L/2, by bisection (a lower threshold lets
    more tokens exit; the random head gives rows varied exits)."""
    low, high, best = 0.0, 1.0, None
    for _ in range(iterations):
        threshold = (low + high) / 2
        model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=steps, exit_args=AdditionalArguments(
            use_early_exit=True, exit_conf_type="meta", exit_conf_threshold=threshold))
        block_avg = model.exit_stats()["block_avg"]
        if best is None or abs(block_avg - L / 2) < best[0]:
            best = (abs(block_avg - L / 2), threshold)
        low, high = (threshold, high) if block_avg < L / 2 else (low, threshold)
    return best[1]


def one_at_a_time(model, ids, mask, steps, args):
    """The same rows decoded at batch 1, one after another (each without its padding)."""
    rows = [ids[b : b + 1, mask[b].bool()] for b in range(ids.shape[0])]

    def run():
        tokens, encoder = 0, 0.0
        for row in rows:
            model.generate(input_ids=row, max_new_tokens=steps, exit_args=args)
            stats = model.exit_stats()
            tokens, encoder = tokens + stats["tokens"], encoder + stats["time_encoder"]
        return {"tokens": tokens, "encoder": encoder}

    return run


@torch.inference_mode()
def gather_or_mask(model, batch: int, position: int, rounds: int, device, source_length: int = 32,
                   variants: Optional[Dict[str, Optional[int]]] = None) -> dict:
    """What one middle block costs when only some rows of a batch still run it: computed for
    those rows alone (their cached keys/values gathered, or read as slices) against for every row
    (masking: the exited rows' results thrown away), over sources of `source_length` tokens. The
    running rows are spread over the batch (0, 2, 4, 6 of 8), the case with no two adjacent.

    Without `variants`: {R: ms per block call}, the decoder's own rule. With `variants` (name ->
    the source length from which the running rows' cross-attention reads slices of every row
    instead of a copy; None: the decoder's own): {name: {R: ms}}, the variants taking turns call
    by call. Medians."""
    L = model.config.num_decoder_layers
    decoder = BatchDecoder(model, ExitPolicy(L, L), ComponentTimer(device, False), position + 1)
    ids = torch.randint(2, model.config.vocab_size, (batch, source_length), generator=torch.Generator().manual_seed(3))
    decoder.start(ids.to(device), torch.ones_like(ids).to(device), 0)
    decoder.cache.keys.zero_()
    decoder.cache.values.zero_()
    hidden = torch.randn(batch, 1, model.config.d_model, generator=torch.Generator().manual_seed(4)).to(device)
    j = L // 2
    chosen = variants or {"": None}
    own = decoder.cross_views_from
    times = {name: {} for name in chosen}
    for running in sorted({batch, max(batch // 2, 1), max(batch // 4, 1), 1}, reverse=True):
        rows = decoder.select(list(range(batch)), [position] * batch, [1] * batch)
        if running < batch:
            rows = rows.take(list(range(0, batch, batch // running))[:running])
        index = rows.index
        for _ in range(rounds * 5):
            for name, views_from in chosen.items():
                decoder.cross_views_from = own if views_from is None else views_from
                synchronize(device)
                start = time.perf_counter()
                decoder.block(j, hidden.index_select(0, index), rows)
                synchronize(device)
                times[name].setdefault(running, []).append(time.perf_counter() - start)
    out = {name: {r: median(t) * 1e3 for r, t in per_r.items()} for name, per_r in times.items()}
    return out if variants else out[""]


def ratio(value) -> str:
    return "-" if value is None else f"{value:.1f}"


def state_bytes(model, batch, steps):
    c = model.config
    kv = 2 * c.num_decoder_layers * batch * c.num_heads * steps * c.d_kv
    return (kv + batch * steps * c.d_model) * model.dtype.itemsize


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", default="t5-small,t5-large")
    parser.add_argument("--batches", default="1,8,32")
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--source-length", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--alone-max", type=int, default=8,
                        help="throughput against the same rows one at a time up to this batch size (time grows with it)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    options = parser.parse_args()
    device = torch.device(options.device)
    steps, rows, payload = options.new_tokens, [], {"options": vars(options), "cells": []}
    for shape in options.shapes.split(","):
        model = build_model(shape, device=device)
        torch.manual_seed(5)
        from models.confidence import build_meta_head
        model.cm_head = build_meta_head(model.config.d_model).to(device)
        L = model.config.num_decoder_layers
        for batch in [int(b) for b in options.batches.split(",")]:
            for padded in (False, True):
                if padded and batch == 1:
                    continue
                ids, mask = batch_inputs(model, batch, options.source_length, padded)
                out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=steps)
                expected = hf_generate(model, input_ids=ids, attention_mask=mask, max_new_tokens=steps)
                assert torch.equal(out, expected), f"{shape} batch {batch}: full model differs from HF generate"
                threshold = meta_threshold(model, ids, mask, steps, L)
                softmax = AdditionalArguments(use_early_exit=True, exit_conf_type="softmax", exit_conf_threshold=0.9,
                                              type_vocab_reduct="decaying")
                variants = {
                    "hf": hf(model, ids, mask, steps),
                    "full": ours(model, ids, mask, steps, AdditionalArguments()),
                    "static": ours(model, ids, mask, steps, AdditionalArguments(static_exit_layer=L // 2)),
                    "meta": ours(model, ids, mask, steps, AdditionalArguments(
                        use_early_exit=True, exit_conf_type="meta", exit_conf_threshold=threshold)),
                    "softmax": ours(model, ids, mask, steps, softmax),
                }
                alone = 1 < batch <= options.alone_max
                if alone:
                    variants["full alone"] = one_at_a_time(model, ids, mask, steps, AdditionalArguments())
                    variants["softmax alone"] = one_at_a_time(model, ids, mask, steps, softmax)
                if device.type == "cuda":
                    torch.cuda.reset_peak_memory_stats(device)
                results = run_side_by_side(variants, options.rounds, device)
                synchronize(device)
                med = {name: median(r["seconds"]) for name, r in results.items()}
                dec = {name: median(r["decoder"]) for name, r in results.items() if "decoder" in r}
                block_avg = median(results["meta"]["block_avg"])
                tps = {name: median(r["tokens"]) / med[name] for name, r in results.items()}
                cell = {
                    "shape": shape, "batch": batch, "padded": padded,
                    "full_vs_hf_time": med["full"] / med["hf"],
                    "static_fraction_of_ideal": (dec["full"] / dec["static"]) / 2.0,
                    "meta_block_avg": block_avg, "meta_threshold": threshold,
                    "meta_fraction_of_block_avg": (dec["full"] / dec["meta"]) / (L / block_avg),
                    # tokens/s of the batch against the same rows decoded one at a time
                    "full_tps_vs_batch1": tps["full"] / tps["full alone"] if alone else None,
                    "softmax_tps_vs_batch1": tps["softmax"] / tps["softmax alone"] if alone else None,
                    "state_mib": state_bytes(model, batch, steps) / 2 ** 20,
                    "cuda_peak_mib": torch.cuda.max_memory_allocated(device) / 2 ** 20 if device.type == "cuda" else None,
                    "seconds": med,
                }
                # the profile behind the meta figure: where each variant's decoder time goes
                cell["decoder_ms"] = {name: {part: 1e3 * median(results[name][part]) for part in ("decoder",) + COMPONENTS}
                                      for name in ("full", "meta")}
                payload["cells"].append(cell)
                rows.append([shape, batch, "mix" if padded else "equal", f"{cell['full_vs_hf_time']:.2f}",
                             f"{cell['static_fraction_of_ideal']:.2f}",
                             f"{block_avg:.1f} -> {cell['meta_fraction_of_block_avg']:.2f}",
                             ratio(cell["full_tps_vs_batch1"]), ratio(cell["softmax_tps_vs_batch1"]),
                             f"{cell['state_mib']:.1f}"])
                print_table(["shape", "batch", "sources", "full/hf time", "static/ideal", "meta block_avg -> /allowed",
                             "full tok/s vs b1", "softmax tok/s vs b1", "state MiB"], rows[-1:])
                for name, parts in cell["decoder_ms"].items():
                    print(f"  {name} decoder {parts['decoder']:.0f} ms: "
                          + ", ".join(f"{part} {parts[part]:.0f}" for part in COMPONENTS))
                if alone:  # the throughput figures split: the encoder batches differently from the decoder
                    cell["encoder_ms"] = {name: 1e3 * median(results[name]["encoder"])
                                          for name in ("full", "full alone", "softmax", "softmax alone")}
                    print("  encoder ms: " + ", ".join(f"{name} {ms:.0f}" for name, ms in cell["encoder_ms"].items()))
        for batch in [int(b) for b in options.batches.split(",") if int(b) > 1]:
            costs = gather_or_mask(model, batch, steps, options.rounds, device)
            payload.setdefault("gather_or_mask", []).append({"shape": shape, "batch": batch, "ms_per_block": costs})
            print(f"{shape} batch {batch}: one block for R running rows, ms (gathered R vs masked {batch}): "
                  + ", ".join(f"R={r}: {ms:.2f}" for r, ms in costs.items()))
    print()
    print_table(["shape", "batch", "sources", "full/hf time", "static/ideal", "meta block_avg -> /allowed",
                 "full tok/s vs b1", "softmax tok/s vs b1", "state MiB"], rows)
    print("saved", save_results("bench_batch", payload))


if __name__ == "__main__":
    main()
