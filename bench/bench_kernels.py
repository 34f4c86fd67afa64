"""F.linear against (W x^T)^T and against models.projection.project (the measured choice of the two).

    .venv/bin/python bench/bench_kernels.py [--rows 1,2,3,4,5,8,16,32] [--rounds 5] [--cold-mib 256] [--device cpu]

For each weight of a T5-large decoder block (1024x1024 attention, 4096x1024 and 1024x4096
feed-forward) and of the LM head (32128x1024), the time of one projection of R rows each way,
side by side in interleaved rounds (medians), and F.linear's time over each. Each call goes to
the next of enough copies of the weight to exceed the CPU's caches (--cold-mib), as in decoding,
where no block's weights are still in cache when the next token reaches it; --cold-mib 0 times
one cache-hot weight instead.
"""

import argparse
import math
import time

import torch
import torch.nn.functional as F

from common import cpu_name, median, print_table, save_results, synchronize
from models.projection import _transposed, project

WEIGHTS = {"attention 1024x1024": (1024, 1024), "ff in 4096x1024": (4096, 1024),
           "ff out 1024x4096": (1024, 4096), "head 32128x1024": (32128, 1024)}


def time_calls(fn, layers, device) -> float:
    """Seconds per call of fn(layer), over every layer in turn."""
    synchronize(device)
    start = time.perf_counter()
    for layer in layers:
        fn(layer)
    synchronize(device)
    return (time.perf_counter() - start) / len(layers)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", default="1,2,3,4,5,8,16,32")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--cold-mib", type=int, default=256, help="weights cycled through per shape (0: one, cache-hot)")
    args = parser.parse_args()
    device = torch.device(args.device)
    rows = [int(r) for r in args.rows.split(",")]
    table, payload = [], []
    torch.manual_seed(0)
    with torch.no_grad():
        for name, (out_features, in_features) in WEIGHTS.items():
            size_mib = out_features * in_features * 4 / 2**20
            copies = max(2, math.ceil(args.cold_mib / size_mib)) if args.cold_mib else 1
            layers = [torch.nn.Linear(in_features, out_features, bias=False).to(device) for _ in range(copies)]
            layers = layers * max(1, 8 // copies)  # at least 8 calls per timing
            times = {}
            for r in rows:
                x = torch.randn(r, in_features, device=device)
                variants = {"F.linear": lambda layer: F.linear(x, layer.weight),
                            "W x^T": lambda layer: _transposed(layer.weight, x),
                            "project": lambda layer: project(layer, x)}
                for fn in variants.values():
                    time_calls(fn, layers, device)
                seconds = {v: [] for v in variants}
                for _ in range(args.rounds):
                    for v, fn in variants.items():
                        seconds[v].append(time_calls(fn, layers, device))
                times[r] = {v: median(s) * 1e3 for v, s in seconds.items()}
            for r in rows:
                linear, wxt, ours = times[r]["F.linear"], times[r]["W x^T"], times[r]["project"]
                table.append([name, r, f"{linear:.3f}", f"{wxt:.3f}", f"{ours:.3f}", f"{linear / wxt:.2f}",
                              f"{linear / ours:.2f}"])
                payload.append(dict(weight=name, rows=r, linear_ms=linear, transposed_ms=wxt, project_ms=ours))
    print_table(["weight", "rows", "F.linear ms", "W x^T ms", "project ms", "F.linear / W x^T",
                 "F.linear / project"], table)
    print(f"{'cold' if args.cold_mib else 'cache-hot'} weights, median of {args.rounds} rounds; "
          f"CPU: {cpu_name()}, {torch.get_num_threads()} threads")
    print("results:", save_results("bench_kernels", {"device": str(device), "cold_mib": args.cold_mib, "rows": payload}))


if __name__ == "__main__":
    main()
