"""A grid of decoding settings on one task, resumable, summarised as a table and Pareto plots.

    python src/run_sweep.py --task qa --output_dir sweeps/squad \\
        --thresholds 0.5,0.7,0.9 --conf_types softmax,JSD_contrastive_confidence \\
        --reductions none,fixed,decaying --min_layers 2,3 -- \\
        --model_name_or_path save/squad --validation_file dev.json --max_eval_samples 200

Arguments after `--` go to the task script of every cell (model, data, lengths). Each cell runs
in the deploy scenario with FLOP counting into `<output_dir>/cells/<cell>/`; a cell whose
`eval_results.json` exists is skipped, so an interrupted sweep resumes where it stopped and
nothing finished is lost. Cells whose flags are invalid for the model (for example a contrastive
measure below its smallest layer) are reported and skipped. The full model and a static exit at
each of `--static_layers` are added as reference cells. The table (`sweep.csv`, `sweep.md`) and
the Pareto plots of quality against block_avg, FLOPs and wall time go to `<output_dir>/`.
Launched as N processes (`torchrun --nproc_per_node N src/run_sweep.py ...`, or `accelerate
launch --num_processes N`), each process runs whole cells and process 0 writes the report.
"""

import argparse
import itertools
import json
import os
import sys
from typing import Dict, List, Optional

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from tasks import distributed, runner  # noqa: E402
from tasks.adapters import QuestionAnswering, Summarization, Translation  # noqa: E402
from util import methods  # noqa: E402
from util.pareto import write_pareto_report  # noqa: E402
from util.cli import run_entry_point  # noqa: E402

TASKS = {"qa": QuestionAnswering, "summarization": Summarization, "translation": Translation}
COSTS = ("block_avg", "flops", "wall_time")
REDUCTIONS = tuple(methods.REDUCTIONS)  # the table's: "+rerank" is progressive pruning


def _floats(text: str) -> List[float]:
    return [float(v) for v in text.split(",") if v]


def _ints(text: str) -> List[int]:
    return [int(v) for v in text.split(",") if v]


def parse(argv: Optional[List[str]] = None):
    argv = list(sys.argv[1:] if argv is None else argv)
    task_argv = argv[argv.index("--") + 1:] if "--" in argv else []
    own = argv[: argv.index("--")] if "--" in argv else argv
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--task", choices=sorted(TASKS), required=True)
    parser.add_argument("--output_dir", required=True)
    parser.add_argument("--thresholds", type=_floats, default=[0.5, 0.7, 0.9])
    parser.add_argument("--conf_types", default="softmax")
    parser.add_argument("--reductions", default="none", help=f"comma-separated, of: {', '.join(REDUCTIONS)}")
    parser.add_argument("--min_layers", type=_ints, default=[1])
    parser.add_argument("--static_layers", type=_ints, default=[], help="static-exit reference cells")
    parser.add_argument("--batch_size", type=int, default=1,
                        help="rows decoded at once per cell (the same tokens and exit layers at any size up to summation order; timings change)")
    args = parser.parse_args(own)
    for reduction in args.reductions.split(","):
        if reduction not in REDUCTIONS:
            raise ValueError(f"--reductions: {reduction!r} is not one of {', '.join(REDUCTIONS)}.")
    if args.batch_size < 1:
        raise ValueError(f"--batch_size={args.batch_size} must be a positive integer.")
    if "--per_device_eval_batch_size" in task_argv:
        raise ValueError("--per_device_eval_batch_size: give the sweep's --batch_size (before `--`) instead.")
    if not task_argv:
        raise ValueError("give the task script's arguments (model and data) after `--`.")
    if "--output_dir" in task_argv:
        raise ValueError("--output_dir belongs to the sweep (before `--`): each cell gets its own folder.")
    return args, task_argv


def grid(args) -> Dict[str, List[str]]:
    """Cell name -> the method flags of that cell, reference cells first."""
    cells = {"full": methods.to_argv(methods.method_flags("full"))}
    for layer in args.static_layers:
        cells[f"static-{layer}"] = methods.to_argv(methods.method_flags("static", static_layer=layer))
    for conf, threshold, reduction, layer in itertools.product(
            args.conf_types.split(","), args.thresholds, args.reductions.split(","), args.min_layers):
        flags = methods.early_exit(conf, threshold, layer, reduction)
        cells[f"{conf}-t{threshold}-{reduction}-m{layer}"] = methods.to_argv(flags)
    return cells


def cell_row(name: str, flags: List[str], results: dict) -> dict:
    settings = dict(zip(flags[::2], flags[1::2]))
    row = {"cell": name, "conf_type": settings.get("--exit_conf_type", "-"),
           "threshold": settings.get("--exit_conf_threshold", "-"),
           "reduction": settings.get("--type_vocab_reduct", "none") + ("+rerank" if "--vocab_rerank" in settings else ""),
           "min_layer": settings.get("--exit_min_layer", "-"),
           "static_layer": settings.get("--static_exit_layer", "-")}
    row.update({k[len("eval_"):]: v for k, v in results.items() if k.startswith("eval_") and not isinstance(v, list)})
    row["flops"] = results.get("eval_flops_total_per_sample")
    row["wall_time"] = results.get("eval_time_total")
    return row


def run_cell(task, task_argv, cell_dir, flags, batch_size: int = 1, alone: bool = False) -> Optional[dict]:
    """Run one cell unless it finished before; returns its results (None when invalid). `alone`:
    this process runs the cell by itself, whatever the launcher started (tasks.distributed)."""
    done = os.path.join(cell_dir, "eval_results.json")
    if os.path.isfile(done):
        with open(done) as handle:
            return json.load(handle)
    argv = task_argv + ["--do_eval", "--output_dir", cell_dir, "--overwrite_output_dir", "True",
                        "--deploy_scenario", "True", "--count_flops", "True",
                        "--per_device_eval_batch_size", str(batch_size)] + flags
    return runner.run(task, argv, alone=alone)


def main(argv: Optional[List[str]] = None) -> List[dict]:
    args, task_argv = parse(argv)
    task_class = TASKS[args.task]
    cells = grid(args)

    def cell_dir(name):
        return os.path.join(args.output_dir, "cells", name)

    def outcome(name, alone):
        flags = cells[name]
        try:
            results = run_cell(task_class(), task_argv, cell_dir(name), flags, args.batch_size, alone)
            return "row", cell_row(name, flags, results)
        except ValueError as error:
            if not flags:  # the full model has no method flags: its error is about the model or data
                raise
            return "skipped", str(error)  # flags invalid for this model: report, keep sweeping

    # under torchrun / accelerate launch each process runs whole cells; process 0 gets every outcome
    def finished(name):
        return os.path.isfile(os.path.join(cell_dir(name), "eval_results.json"))  # as run_cell decides

    outcomes = distributed.run_cells(list(cells), outcome, finished)
    if outcomes is None:
        return []  # not process 0: the report is process 0's
    rows = [value for kind, value in outcomes.values() if kind == "row"]
    skipped = {name: value for name, (kind, value) in outcomes.items() if kind == "skipped"}
    if skipped:
        print("skipped cells:\n" + "\n".join(f"  {name}: {why}" for name, why in skipped.items()))
    write_pareto_report(rows, args.output_dir, quality_key=task_class.main_metric, cost_keys=COSTS,
                        label_keys=("cell",))
    print(f"{len(rows)} cells in {os.path.join(args.output_dir, 'sweep.md')}")
    return rows


if __name__ == "__main__":
    run_entry_point(main)
