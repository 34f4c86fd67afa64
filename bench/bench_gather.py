"""Running rows' cross-attention at long sources: gathered copies against slices, and all rows.

    .venv/bin/python bench/bench_gather.py [--shapes t5-large,t5-small] [--sources 32,512,4096] [--batch 8]

Once a row exits, each later block runs only the rows still running. Their cross-attention keys
and values, which grow with the source, can be copied out (gathered: one attention call) or read
as slices of every row's (views: one attention call per run of adjacent rows, nothing copied).
For one middle block at batch `--batch`, the time of R running rows (spread over the batch, none
adjacent: the views' worst case) each way, against all rows, per source length; the ways take
turns call by call (bench_batch.gather_or_mask; medians).
"""

import argparse

import torch

from bench_batch import gather_or_mask
from common import SHAPES, build_model, cpu_name, print_table, save_results

WAYS = {"gather": 10 ** 9, "views": 0}  # the source length from which slices are read


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
                costs = gather_or_mask(model, args.batch, args.position, args.rounds, device, source_length=source,
                                       variants=WAYS)
                every = costs["gather"][args.batch]  # all rows run: no gathering, the same either way
                runs = sorted(r for r in costs["gather"] if r < args.batch)
                table.append([shape, source, f"{every:.2f}"] + [
                    f"{costs['gather'][r]:.2f} / {costs['views'][r]:.2f} ({costs['views'][r] / costs['gather'][r]:.2f})"
                    for r in runs])
                payload.append({"shape": shape, "source_length": source, "ms_per_block": costs})
            del model
    print_table(["shape", "source tokens", f"all {args.batch} ms"] + [f"R={r}: gather / views ms (views/gather)"
                                                                      for r in runs], table)
    print(f"batch {args.batch}, one middle block; CPU: {cpu_name()}, {torch.get_num_threads()} threads")
    print("results:", save_results("bench_gather", {"args": vars(args), "rows": payload}))


if __name__ == "__main__":
    main()
