"""Gathering the running rows against running every row, at long sources.

    .venv/bin/python bench/bench_gather.py [--shapes t5-large,t5-small] [--sources 32,512,4096] [--batch 8]

Once a row exits, each later block runs only the rows still running: their cached self- and
cross-attention keys/values are copied out (gathered). The cross-attention part grows with the
source length, so at long sources the copy could cost more than running every row (masking).
For one middle block at batch `--batch`, the time of R gathered rows against all rows, per
source length (bench_batch.gather_or_mask; medians of interleaved calls).
"""

import argparse

import torch

from bench_batch import gather_or_mask
from common import SHAPES, build_model, cpu_name, print_table, save_results


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", default="t5-large,t5-small")
    parser.add_argument("--sources", default="32,512,4096")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--position", type=int, default=16, help="decoder positions already cached")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    device = torch.device("cpu")
    table, payload = [], []
    with torch.no_grad():
        for shape in args.shapes.split(","):
            # one encoder block: only the encoder's output shape matters here, and 8 x 4,096 source
            # tokens through T5-large's 24 encoder blocks would take minutes
            model = build_model(shape, num_layers=1, num_decoder_layers=SHAPES[shape]["num_layers"])
            for source in (int(s) for s in args.sources.split(",")):
                costs = gather_or_mask(model, args.batch, args.position, args.rounds, device, source_length=source)
                every = costs[args.batch]
                table.append([shape, source] + [f"{costs[r]:.2f} ({costs[r] / every:.2f})" for r in sorted(costs)])
                payload.append({"shape": shape, "source_length": source, "ms_per_block": costs})
            del model
    runs = sorted(payload[0]["ms_per_block"])
    print_table(["shape", "source tokens"] + [f"R={r} ms (/ all {args.batch})" for r in runs], table)
    print(f"batch {args.batch}, one middle block; CPU: {cpu_name()}, {torch.get_num_threads()} threads")
    print("results:", save_results("bench_gather", {"args": vars(args), "rows": payload}))


if __name__ == "__main__":
    main()
