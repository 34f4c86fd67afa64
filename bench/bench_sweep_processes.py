"""A sweep in one process against the same sweep split over N processes (torchrun), on CPU.

    .venv/bin/python bench/bench_sweep_processes.py [--processes 2] [--rounds 2] [--max_eval_samples 40]

The model is the demo's (`make demo` caches it in cache/demo_model/); without that cache, a
model of the demo's shape trained for only --train_steps steps on --train_contexts contexts is
built and cached in cache/bench_sweep_model/ (training the demo model takes 10 minutes or more
on 2 cores). Its answers are poorer, but what is measured is how the same work splits. Each
variant runs the whole sweep command from scratch (fresh output folder, start-up included), in
interleaved rounds; the table gives the median wall time and the speed-up over one process.
The variants' tables must agree (quality, block_avg, FLOPs): the bench checks it.
"""

import argparse
import csv
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import ROOT, median, print_table, save_results  # common puts src/ on the path

DEMO_MODEL = ROOT / "cache" / "demo_model" / "model"
DEMO_DATA = ROOT / "cache" / "demo_model" / "data" / "eval.json"
TIMING_COLUMNS = ("runtime", "samples_per_second", "tokens_per_second", "wall_time", "pareto_wall_time")


def model_and_data(train_steps: int, train_contexts: int):
    """The cached demo model, else a demo-shaped model trained briefly (cached too)."""
    if (DEMO_MODEL / "model.safetensors").is_file() and DEMO_DATA.is_file():
        return DEMO_MODEL, DEMO_DATA, "the demo model (make demo)"
    from demo import DemoSettings, cached_model
    settings = DemoSettings(train_contexts=train_contexts, train_steps=train_steps, warmup_steps=min(100, train_steps // 4))
    cached = cached_model(settings, ROOT / "cache" / "bench_sweep_model", retrain=False)
    return (cached["model_dir"], cached["files"]["eval"],
            f"the demo's shape trained {train_steps} steps on {settings.train_contexts} contexts")


def sweep_arguments(out: str, model: Path, data: Path, samples: int, thresholds: str, reductions: str):
    return ["--task", "qa", "--output_dir", out, "--thresholds", thresholds, "--conf_types", "softmax",
            "--reductions", reductions, "--min_layers", "1", "--static_layers", "3", "--",
            "--model_name_or_path", str(model), "--validation_file", str(data), "--max_eval_samples", str(samples),
            "--max_seq_length", "128", "--max_answer_length", "16", "--use_cpu", "True", "--disable_tqdm", "True"]


def variants(processes: int, with_threads: bool):
    """name -> (command prefix, OMP_NUM_THREADS)."""
    script = str(ROOT / "src" / "run_sweep.py")
    torchrun = os.path.join(os.path.dirname(sys.executable), "torchrun")
    chosen = {"1 process, 1 thread": ([sys.executable, script], 1)}
    if with_threads:
        chosen[f"1 process, {processes} threads"] = ([sys.executable, script], processes)
    chosen[f"{processes} processes, 1 thread each"] = (
        [torchrun, "--standalone", "--nproc_per_node", str(processes), script], 1)
    return chosen


def table(folder: str):
    with open(os.path.join(folder, "sweep.csv"), newline="") as handle:
        rows = list(csv.DictReader(handle))
    return [{k: v for k, v in row.items() if k not in TIMING_COLUMNS and not k.startswith("time_")} for row in rows]


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--max_eval_samples", type=int, default=150)
    parser.add_argument("--thresholds", default="0.3,0.5,0.7,0.9", help="the sweep's (with full and static-3)")
    parser.add_argument("--reductions", default="none,fixed,decaying", help="the sweep's")
    parser.add_argument("--skip_threads", action="store_true", help="leave out 1 process with N threads")
    parser.add_argument("--train_steps", type=int, default=60, help="without the demo's cache: training steps")
    parser.add_argument("--train_contexts", type=int, default=500, help="without the demo's cache: training contexts")
    args = parser.parse_args()
    model, data, described = model_and_data(args.train_steps, args.train_contexts)

    seconds, tables = {}, {}
    with tempfile.TemporaryDirectory() as scratch:
        for round_index in range(args.rounds):
            for name, (command, threads) in variants(args.processes, not args.skip_threads).items():
                out = os.path.join(scratch, f"{round_index}-{len(seconds.get(name, []))}-{abs(hash(name))}")
                env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONPATH": str(ROOT / "src")}
                began = time.perf_counter()
                done = subprocess.run(command + sweep_arguments(out, model, data, args.max_eval_samples, args.thresholds,
                                                                 args.reductions),
                                      env=env, capture_output=True, text=True)
                elapsed = time.perf_counter() - began
                if done.returncode != 0:
                    raise SystemExit(f"{name} failed:\n{done.stderr[-3000:]}")
                seconds.setdefault(name, []).append(elapsed)
                tables[name] = table(out)
                print(f"round {round_index + 1}, {name}: {elapsed:.1f} s", flush=True)

    reference = next(iter(tables.values()))
    for name, rows in tables.items():
        if rows != reference:
            raise SystemExit(f"{name}: the sweep's table differs from the first variant's")
    base = median(next(iter(seconds.values())))
    rows, summary = [], []
    for name, values in seconds.items():
        rows.append([name, f"{median(values):.1f}", " ".join(f"{v:.1f}" for v in values), f"{base / median(values):.2f}x"])
        summary.append({"variant": name, "median_seconds": median(values), "seconds": values,
                        "speedup": base / median(values)})
    print(f"\n{described}; {len(reference)} cells x {args.max_eval_samples} questions; "
          f"median of {args.rounds} rounds; load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")
    print_table(["variant", "median s", "rounds s", "speed-up vs 1 process, 1 thread"], rows)
    saved = save_results("bench_sweep_processes", {"args": vars(args), "model": described, "cells": len(reference),
                                                   "results": summary})
    print(f"\nsaved {saved}")


if __name__ == "__main__":
    main()
