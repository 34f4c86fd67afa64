"""How much of block_avg's allowance a batch of rows with per-row exits could reach, by schedule,
from measured block costs alone (no decoding: a cost model).

    .venv/bin/python bench/simulate_schedules.py [--samples 50] [--mean-exit 14.5] [--spread 6]

Rows of a batch of 8 exit at random layers of 24 (Gaussian around --mean-exit, clipped to 1..24,
16 tokens each). A block call for R rows costs what bench/bench_batch.py's `gather_or_mask`
measured for T5-large on this CPU (--costs). Schedules:
  lockstep  every row decodes the same token; block j runs for the rows that have not exited
            (what models.decode_loop does);
  async     each row runs ahead on its own tokens; each call runs the layer that the most rows
            wait at (ties: the lowest), for those rows.
Reported: the full model's cost over the schedule's, as a fraction of L / block_avg (the
allowance of bench_batch's per-row target), median over --samples batches.
"""

import argparse
import random
import statistics

LAYERS, BATCH, TOKENS = 24, 8, 16
# ms for one T5-large block over R gathered rows, R = 0..8 (bench_batch gather_or_mask, 3 and 5-7
# interpolated)
MEASURED = "0,2.11,2.23,2.55,2.87,3.6,4.3,5.0,5.77"


def lockstep(exits, cost):
    return sum(cost[sum(1 for row in exits if row[t] > j)] for t in range(TOKENS) for j in range(LAYERS))


def asynchronous(exits, cost):
    token, layer, total = [0] * BATCH, [0] * BATCH, 0.0
    while min(token) < TOKENS:
        waiting = {}
        for b in range(BATCH):
            if token[b] < TOKENS:
                waiting.setdefault(layer[b], []).append(b)
        j = max(waiting, key=lambda at: (len(waiting[at]), -at))
        total += cost[len(waiting[j])]
        for b in waiting[j]:
            layer[b] += 1
            if layer[b] >= exits[b][token[b]]:
                token[b], layer[b] = token[b] + 1, 0
    return total


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=50)
    parser.add_argument("--mean-exit", type=float, default=14.5)
    parser.add_argument("--spread", type=float, default=6.0)
    parser.add_argument("--costs", default=MEASURED, help="ms of a block call for 0..8 rows")
    args = parser.parse_args()
    cost = [float(c) for c in args.costs.split(",")]
    rng = random.Random(0)
    fractions = {"lockstep": [], "async": []}
    for _ in range(args.samples):
        exits = [[min(LAYERS, max(1, round(rng.gauss(args.mean_exit, args.spread)))) for _ in range(TOKENS)]
                 for _ in range(BATCH)]
        allowed = LAYERS / (sum(map(sum, exits)) / (BATCH * TOKENS))
        full = TOKENS * LAYERS * cost[BATCH]
        fractions["lockstep"].append(full / lockstep(exits, cost) / allowed)
        fractions["async"].append(full / asynchronous(exits, cost) / allowed)
    for name, values in fractions.items():
        print(f"{name:9s} {statistics.median(values):.2f} of the allowance (median of {args.samples} batches)")


if __name__ == "__main__":
    main()
