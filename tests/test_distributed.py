"""Evaluation and sweeps over 2 CPU processes (torchrun, gloo) against one process, the oracle.

Every task's deploy-scenario evaluation (and a batched one) is run once in this process and once
split over two processes; results other than timings, and the predictions files, must be equal.
The sweep likewise, and again after one finished cell is removed (only that cell runs again).
"""

import csv
import json
import os
import shutil
import subprocess
import sys

import pytest

import run_sweep
from tasks import distributed, runner
from tasks.adapters import QuestionAnswering, Summarization, Translation
from tasks.data import flatten_squad
from test_tasks_summarization import dialogue_rows
from util.additional_args import AdditionalArguments
from util.demo_data import generate_squad, write_squad
from util.toy_models import build_toy_t5, train_toy_tokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TORCHRUN = os.path.join(os.path.dirname(sys.executable), "torchrun")
TASKS = {"qa": QuestionAnswering, "summarization": Summarization, "translation": Translation}
SAMPLES = 5  # odd: the two shards differ in size
PAIRS = [("Der Hund schläft im Garten.", "The dog sleeps in the garden."),
         ("Die Katze trinkt Milch.", "The cat drinks milk."),
         ("Ich lese ein Buch.", "I read a book."),
         ("Wir gehen heute ins Kino.", "We go to the cinema today."),
         ("Das Wetter ist schön.", "The weather is nice."),
         ("Er kauft ein neues Auto.", "He buys a new car.")]
# every task: (data arguments, text for the tokenizer, training rows written to a file)
TASK_ARGS = {
    "qa": ["--max_seq_length", "96", "--max_answer_length", "6"],
    "summarization": ["--text_column", "dialogue", "--summary_column", "summary", "--max_source_length", "64",
                      "--max_target_length", "16"],
    "translation": ["--source_lang", "de", "--target_lang", "en", "--max_source_length", "32",
                    "--max_target_length", "16"],
}
EARLY_EXIT = ["--deploy_scenario", "True", "--use_early_exit", "True", "--exit_conf_type", "softmax",
              "--exit_conf_threshold", "0.3", "--count_flops", "True"]


def _write_jsonl(path, rows):
    with open(path, "w", encoding="utf-8") as handle:
        for row in rows:
            handle.write(json.dumps(row, ensure_ascii=False) + "\n")
    return str(path)


def _task_data(task, folder):
    """(data file, tokenizer texts) of a few rows the toy model learns in seconds."""
    if task == "qa":
        data = generate_squad(3, seed=0)  # 6 questions
        path = str(folder / "qa.json")
        write_squad(data, path)
        rows = flatten_squad(data["data"])
        return path, [f"question: {r['question']} context: {r['context']}" for r in rows]
    if task == "summarization":
        rows = dialogue_rows()[:6]
        return _write_jsonl(folder / "dialogues.jsonl", rows), [f"summarize: {r['dialogue']} {r['summary']}" for r in rows]
    rows = [{"translation": {"de": de, "en": en}} for de, en in PAIRS]
    return _write_jsonl(folder / "pairs.jsonl", rows), [f"translate German to English: {de} {en}" for de, en in PAIRS]


@pytest.fixture(scope="module")
def toys(tmp_path_factory):
    """Per task: a data file and a toy T5 (3 blocks each side: HF generate needs equal depths) trained briefly on it with weighted_ce,
    so that predictions differ between samples and tokens exit at different layers."""
    toys = {}
    for task in TASKS:
        folder = tmp_path_factory.mktemp(f"dist_{task}")
        data, texts = _task_data(task, folder)
        build_toy_t5(train_toy_tokenizer(texts, vocab_size=300), num_layers=3, num_decoder_layers=3,
                     save_dir=str(folder / "init"))
        runner.run(TASKS[task](), [
            "--model_name_or_path", str(folder / "init"), "--train_file", data, "--do_train",
            "--output_dir", str(folder / "model"), *TASK_ARGS[task], "--output_hidden_states_decoder", "True",
            "--intermediate_loss_fn", "weighted_ce", "--max_steps", "30", "--learning_rate", "1e-2",
            "--per_device_train_batch_size", "6", "--save_strategy", "no", "--report_to", "none",
            "--disable_tqdm", "True"])
        toys[task] = {"data": data, "model": str(folder / "model")}
    return toys


def torchrun(script, *args, timeout=300):
    """Run `script` under torchrun as 2 CPU processes; skip where torchrun cannot run here."""
    if not os.path.isfile(TORCHRUN):
        pytest.skip(f"torchrun not found next to {sys.executable}")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.path.join(ROOT, "src")}
    done = subprocess.run([TORCHRUN, "--standalone", "--nproc_per_node", "2", script, *args], env=env,
                          capture_output=True, text=True, timeout=timeout, cwd=ROOT)
    if done.returncode != 0 and "errno" in done.stderr.lower() and "socket" in done.stderr.lower():
        pytest.skip(f"torchrun could not open its rendezvous socket here: {done.stderr[-300:]}")
    return done


def _timing(key: str) -> bool:
    """Keys that measure time or describe the processes: the only ones allowed to differ."""
    for prefix in ("eval_", "predict_"):
        key = key[len(prefix):] if key.startswith(prefix) else key
    return (key.startswith("time_") or key in ("runtime", "processes", "wall_time", "pareto_wall_time")
            or key.endswith(("_per_second", "_per_process")))


def _results(folder, name):
    with open(os.path.join(folder, name), encoding="utf-8") as handle:
        return json.load(handle)


def _without_timings(results: dict) -> dict:
    return {k: v for k, v in results.items() if not _timing(k)}


# ----- evaluation -----------------------------------------------------------------------------------
def eval_jobs(toys, root):
    """(task, argv) of each evaluation compared, the output folder name last in argv."""
    jobs = []
    for task, toy in toys.items():
        common = ["--model_name_or_path", toy["model"], "--validation_file", toy["data"], "--do_eval",
                  *TASK_ARGS[task], "--max_eval_samples", str(SAMPLES), "--use_cpu", "True", "--disable_tqdm", "True"]
        if task == "summarization":
            common += ["--test_file", toy["data"], "--do_predict", "--max_predict_samples", str(SAMPLES)]
        if task == "translation":  # the deploy decoder, 2 rows at once: shards of whole batches
            common += ["--per_device_eval_batch_size", "2"]
        jobs.append((task, common + EARLY_EXIT + ["--output_dir", str(root / f"{task}_deploy")]))
    qa = toys["qa"]
    jobs.append(("qa", ["--model_name_or_path", qa["model"], "--validation_file", qa["data"], "--do_eval",
                        *TASK_ARGS["qa"], "--max_eval_samples", str(SAMPLES), "--per_device_eval_batch_size", "2",
                        "--use_cpu", "True", "--disable_tqdm", "True", "--output_dir", str(root / "qa_batched")]))
    return jobs


def test_evaluation_over_two_processes_equals_one(toys, tmp_path, monkeypatch):
    single, double = tmp_path / "one", tmp_path / "two"
    for task, argv in eval_jobs(toys, single):
        runner.run(TASKS[task](), argv)
    jobs = tmp_path / "jobs.json"
    jobs.write_text(json.dumps(eval_jobs(toys, double)))
    scored = tmp_path / "scored"
    monkeypatch.setenv("METRICS_LOG", str(scored))
    done = torchrun(os.path.join(ROOT, "tests", "distributed_job.py"), str(jobs))
    assert done.returncode == 0, done.stderr[-3000:]
    # the task metrics are computed once per evaluated split, by process 0
    splits = sum(2 if "--do_predict" in argv else 1 for _, argv in eval_jobs(toys, double))
    assert scored.read_text().split() == ["0"] * splits

    for task, argv in eval_jobs(toys, single):
        name = os.path.basename(argv[-1])
        prefixes = ["eval", "predict"] if "--do_predict" in argv else ["eval"]
        for prefix in prefixes:
            one = _results(single / name, f"{prefix}_results.json")
            two = _results(double / name, f"{prefix}_results.json")
            assert _without_timings(two) == _without_timings(one), (name, prefix)
            lines = (single / name / f"{prefix}_predictions.jsonl").read_text(encoding="utf-8")
            assert (double / name / f"{prefix}_predictions.jsonl").read_text(encoding="utf-8") == lines, (name, prefix)
            # the comparison means something: the samples' predictions differ, and (deploy) so do exits
            records = [json.loads(line) for line in lines.splitlines()]
            assert len(records) == SAMPLES and len({r["prediction"] for r in records}) > 1, (name, records)
            assert two[f"{prefix}_processes"] == 2
            assert two[f"{prefix}_samples_per_process"] == [3, 2]  # samples split evenly, batched inside
            assert len(two[f"{prefix}_runtime_per_process"]) == 2
            if "--deploy_scenario" in argv:
                layers = {layer for r in records for layer in r["exit_layers"]}
                assert len(layers) > 1 and one[f"{prefix}_flops_total"] > 0, (name, layers)
                # the summed decoding time is the sum of the processes' own
                assert sum(two[f"{prefix}_time_total_per_process"]) == pytest.approx(two[f"{prefix}_time_total"])
            else:
                assert "eval_block_avg" not in two
            assert not any(k.endswith("_per_process") for k in one)  # one process: no per-process keys
        assert _without_timings(_results(double / name, "all_results.json")) == \
            _without_timings(_results(single / name, "all_results.json"))


# ----- sweep ----------------------------------------------------------------------------------------
def sweep_argv(toy, out):
    # 6 cells: full, static-1, softmax at two thresholds, and two JSD cells invalid below layer 3 (skipped)
    return ["--task", "qa", "--output_dir", str(out), "--thresholds", "0.3,0.6",
            "--conf_types", "softmax,JSD_contrastive_confidence", "--min_layers", "1", "--static_layers", "1", "--",
            "--model_name_or_path", toy["model"], "--validation_file", toy["data"], *TASK_ARGS["qa"],
            "--max_eval_samples", str(SAMPLES), "--use_cpu", "True", "--disable_tqdm", "True"]


def _table(folder):
    with open(os.path.join(folder, "sweep.csv"), newline="") as handle:
        return [{k: v for k, v in row.items() if not _timing(k)} for row in csv.DictReader(handle)]


def _assert_same_sweep(one, two, cells):
    assert _table(two) == _table(one)
    for cell in cells:
        assert _without_timings(_results(two / "cells" / cell, "eval_results.json")) == \
            _without_timings(_results(one / "cells" / cell, "eval_results.json")), cell
        assert (two / "cells" / cell / "eval_predictions.jsonl").read_bytes() == \
            (one / "cells" / cell / "eval_predictions.jsonl").read_bytes(), cell


def test_sweep_over_two_processes_equals_one_and_resumes(toys, tmp_path, capsys):
    single, double = tmp_path / "one", tmp_path / "two"
    rows = run_sweep.main(sweep_argv(toys["qa"], single))
    cells = [row["cell"] for row in rows]
    assert cells == ["full", "static-1", "softmax-t0.3-none-m1", "softmax-t0.6-none-m1"]
    assert len({row["block_avg"] for row in rows}) == 4  # the cells really differ
    assert "JSD_contrastive_confidence-t0.3-none-m1" in capsys.readouterr().out  # named as skipped

    script = os.path.join(ROOT, "src", "run_sweep.py")
    done = torchrun(script, *sweep_argv(toys["qa"], double))
    assert done.returncode == 0, done.stderr[-3000:]
    _assert_same_sweep(single, double, cells)
    assert "skipped cells" in done.stdout and "JSD_contrastive_confidence-t0.6-none-m1" in done.stdout
    assert done.stdout.count("4 cells in") == 1  # one report, by process 0

    # resumption: one cell removed, as if its process had been killed before it finished
    kept = {cell: os.path.getmtime(double / "cells" / cell / "eval_results.json") for cell in cells}
    shutil.rmtree(double / "cells" / "softmax-t0.3-none-m1")
    (double / "cells" / "static-1" / "eval_results.json").unlink()  # half done: results not yet written
    done = torchrun(script, *sweep_argv(toys["qa"], double))
    assert done.returncode == 0, done.stderr[-3000:]
    _assert_same_sweep(single, double, cells)
    for cell in ("full", "softmax-t0.6-none-m1"):  # finished before: not run again
        assert os.path.getmtime(double / "cells" / cell / "eval_results.json") == kept[cell], cell


# ----- errors, before any work ------------------------------------------------------------------------
def test_more_processes_than_samples_or_cells_is_refused(monkeypatch):
    with pytest.raises(ValueError, match=r"the validation split has only 3 sample\(s\): launch at most 3 process\(es\)"):
        distributed.check_split_sizes(4, {"validation": 3})
    distributed.check_split_sizes(3, {"validation": 3, "test": 5})
    monkeypatch.setenv("WORLD_SIZE", "7")
    with pytest.raises(ValueError, match="the sweep has only 6 cells: launch at most 6 processes"):
        distributed.sweep_world(6)


def test_adaptive_threshold_is_refused_over_several_processes():
    class Training:
        do_eval, do_predict = True, False

    adaptive = AdditionalArguments(deploy_scenario=True, use_shallow_deep=True, shallow_exit_layer=1,
                                   shallow2deep_conf_type="softmax", use_adapt_threshold=True)
    with pytest.raises(ValueError, match="--use_adapt_threshold .* cannot be split over 2 processes"):
        distributed.check_arguments(2, Training(), adaptive)
    distributed.check_arguments(1, Training(), adaptive)


@pytest.mark.parametrize("num_items, processes", [(5, 2), (4, 2), (7, 3), (10, 3), (3, 3), (2, 2), (9, 4), (18, 8)])
def test_shards_split_the_samples_evenly_in_order(num_items, processes):
    bounds = [distributed.shard_bounds(num_items, rank, processes) for rank in range(processes)]
    assert [i for start, stop in bounds for i in range(start, stop)] == list(range(num_items))
    sizes = [stop - start for start, stop in bounds]
    assert min(sizes) >= 1 and max(sizes) - min(sizes) <= 1
    if (num_items, processes) == (18, 8):  # whole batches of 9 gave 9, 9, 0, 0, 0, 0, 0, 0
        assert sizes == [3, 3, 2, 2, 2, 2, 2, 2]
