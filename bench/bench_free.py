"""FREE against CALM-style early exit and the full model, on the demo's QA model (CPU, batch 1).

    make demo                      # once: trains and caches the model
    .venv/bin/python bench/bench_free.py [--max_eval_samples 100] [--rounds 2]

Every setting is evaluated with the task pipeline in the deploy scenario on the demo's
evaluation set, in interleaved rounds; quality is deterministic, tokens per second is the median
over rounds. FREE's block_avg counts the parallel recomputation of skipped tokens.
"""

import argparse
import os
import tempfile
from pathlib import Path

from common import ROOT, median, print_table, save_results  # common puts src/ on the path
from tasks import runner
from tasks.adapters import QuestionAnswering

MODEL = ROOT / "cache" / "demo_model" / "model"
DATA = ROOT / "cache" / "demo_model" / "data" / "eval.json"


def settings(shallow: int):
    free = ["--use_shallow_deep", "True", "--shallow_exit_layer", str(shallow), "--shallow2deep_conf_type", "softmax"]
    calm = ["--use_early_exit", "True", "--exit_conf_type", "softmax"]
    rows = {"full model": []}
    for threshold in ("0.8", "0.9", "0.95"):
        rows[f"CALM softmax {threshold}"] = calm + ["--exit_conf_threshold", threshold]
        rows[f"FREE softmax {threshold}"] = free + ["--shallow2deep_conf_threshold", threshold]
    rows["FREE softmax 0.9 + rollback 2.0"] = free + ["--shallow2deep_conf_threshold", "0.9",
                                                      "--rollback_conf_threshold", "2.0"]
    rows["FREE adaptive threshold"] = free + ["--shallow2deep_conf_threshold", "0.9", "--use_adapt_threshold", "True",
                                              "--adapt_threshold_samples", "20"]
    rows["FREE softmax 0.9, copied states"] = free + ["--shallow2deep_conf_threshold", "0.9",
                                                      "--copy_skipped_hidden_states", "True"]
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--max_eval_samples", type=int, default=100)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--shallow_exit_layer", type=int, default=2)
    parser.add_argument("--model_dir", type=Path, default=MODEL)
    parser.add_argument("--eval_file", type=Path, default=DATA)
    args = parser.parse_args()
    if not (args.model_dir.is_dir() and args.eval_file.is_file()):
        raise SystemExit(f"no model in {args.model_dir} or no data at {args.eval_file}: run `make demo` first.")

    results = {}
    with tempfile.TemporaryDirectory() as scratch:
        for round_index in range(args.rounds):
            for name, flags in settings(args.shallow_exit_layer).items():
                out = os.path.join(scratch, f"{round_index}-{len(results.get(name, []))}-{abs(hash(name))}")
                metrics = runner.run(QuestionAnswering(), [
                    "--model_name_or_path", str(args.model_dir), "--validation_file", str(args.eval_file), "--do_eval",
                    "--output_dir", out, "--max_eval_samples", str(args.max_eval_samples),
                    "--deploy_scenario", "True", "--disable_tqdm", "True", *flags])
                results.setdefault(name, []).append(metrics)

    rows, summary = [], []
    full_speed = median([m["eval_tokens_per_second"] for m in results["full model"]])
    for name, runs in results.items():
        speed = median([m["eval_tokens_per_second"] for m in runs])
        first = runs[0]
        row = {"setting": name, "f1": first["eval_f1"], "exact_match": first["eval_exact_match"],
               "block_avg": first["eval_block_avg"], "tokens_per_s": speed, "speedup": speed / full_speed,
               "parallel_tokens": first.get("eval_parallel_tokens"), "rollbacks": first.get("eval_rollbacks")}
        summary.append(row)
        rows.append([name, f"{row['f1']:.1f}", f"{row['exact_match']:.1f}", f"{row['block_avg']:.2f}",
                     f"{speed:.0f}", f"{row['speedup']:.2f}x",
                     "-" if row["rollbacks"] is None else int(row["rollbacks"])])
    print(f"demo QA model, {args.max_eval_samples} questions, median of {args.rounds} rounds")
    print_table(["setting", "F1", "EM", "block_avg", "tokens/s", "vs full", "rollbacks"], rows)
    saved = save_results("bench_free", {"args": {k: str(v) for k, v in vars(args).items()}, "results": summary})
    print(f"\nsaved {saved}")


if __name__ == "__main__":
    main()
