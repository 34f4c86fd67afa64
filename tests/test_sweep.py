"""The sweep: grid, resume after an interruption, skipped invalid cells, table and plots."""

import json
import os

import pytest

import run_sweep
from tasks import runner

TASK_ARGS = ["--", "--model_name_or_path", "unused", "--validation_file", "unused.json"]


def fake_run(calls, fail_on=None):
    """Stands in for the task pipeline: records the call and writes results like it does."""

    def run(task, argv, alone):
        assert alone is False  # one process: the cell's pipeline is not told to ignore other processes
        out = argv[argv.index("--output_dir") + 1]
        calls.append(out)
        if fail_on and fail_on in argv:
            raise ValueError(f"{fail_on} is invalid for this model")
        if "interrupt" in out:
            raise KeyboardInterrupt
        threshold = float(argv[argv.index("--exit_conf_threshold") + 1]) if "--exit_conf_threshold" in argv else 1.0
        results = {"eval_f1": 50 + 40 * threshold, "eval_block_avg": 1 + 5 * threshold, "eval_block_op": [1, 2],
                   "eval_flops_total_per_sample": 1e6 * (1 + threshold), "eval_time_total": 2.0 * threshold}
        os.makedirs(out, exist_ok=True)
        with open(os.path.join(out, "eval_results.json"), "w") as handle:
            json.dump(results, handle)
        return results

    return run


def sweep_args(out, *extra):
    return ["--task", "qa", "--output_dir", str(out), "--thresholds", "0.5,0.9", "--conf_types", "softmax",
            "--reductions", "none,fixed", "--min_layers", "2", "--static_layers", "1", *extra, *TASK_ARGS]


def test_grid_has_reference_cells_and_every_combination():
    args, task_argv = run_sweep.parse(sweep_args("out"))
    cells = run_sweep.grid(args)
    assert list(cells)[:2] == ["full", "static-1"]
    assert len(cells) == 2 + 2 * 2
    assert cells["softmax-t0.9-fixed-m2"] == ["--use_early_exit", "True", "--exit_conf_type", "softmax",
                                              "--exit_conf_threshold", "0.9", "--exit_min_layer", "2",
                                              "--type_vocab_reduct", "fixed"]
    assert task_argv == ["--model_name_or_path", "unused", "--validation_file", "unused.json"]


def test_sweep_resumes_without_redoing_finished_cells(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(runner, "run", fake_run(calls))
    # an interruption half-way: the cells before it are finished and kept
    interrupted = run_sweep.grid(run_sweep.parse(sweep_args(tmp_path))[0])
    names = list(interrupted)
    monkeypatch.setattr(run_sweep, "grid", lambda args: {**{n: interrupted[n] for n in names[:3]},
                                                         "interrupt": [], **{n: interrupted[n] for n in names[3:]}})
    with pytest.raises(KeyboardInterrupt):
        run_sweep.main(sweep_args(tmp_path))
    assert len(calls) == 4
    calls.clear()
    monkeypatch.setattr(run_sweep, "grid", lambda args: interrupted)
    rows = run_sweep.main(sweep_args(tmp_path))
    assert [os.path.basename(c) for c in calls] == names[3:]  # only the unfinished cells ran
    assert len(rows) == len(names)
    calls.clear()
    run_sweep.main(sweep_args(tmp_path))
    assert calls == []  # everything finished: nothing runs again
    for name in ("sweep.csv", "sweep.md", "pareto_f1_vs_block_avg.png", "pareto_f1_vs_flops.png",
                 "pareto_f1_vs_wall_time.png"):
        assert os.path.getsize(tmp_path / name) > 0
    table = (tmp_path / "sweep.md").read_text()
    assert "softmax-t0.9-fixed-m2" in table


def test_invalid_cells_are_skipped_and_named(tmp_path, monkeypatch, capsys):
    calls = []
    monkeypatch.setattr(runner, "run", fake_run(calls, fail_on="fixed"))
    rows = run_sweep.main(sweep_args(tmp_path))
    assert {row["cell"] for row in rows} == {"full", "static-1", "softmax-t0.5-none-m2", "softmax-t0.9-none-m2"}
    assert "softmax-t0.5-fixed-m2: fixed is invalid" in capsys.readouterr().out


def test_a_failing_full_model_cell_stops_the_sweep(tmp_path, monkeypatch):
    monkeypatch.setattr(runner, "run", fake_run([], fail_on="unused"))
    with pytest.raises(ValueError, match="invalid"):
        run_sweep.main(sweep_args(tmp_path))


@pytest.mark.parametrize("argv, message", [
    (["--task", "qa", "--output_dir", "x"], "after `--`"),
    (["--task", "qa", "--output_dir", "x", "--reductions", "tiny", *TASK_ARGS], "--reductions"),
    (["--task", "qa", "--output_dir", "x", "--", "--output_dir", "y"], "--output_dir"),
])
def test_bad_sweep_arguments(argv, message):
    with pytest.raises(ValueError, match=message):
        run_sweep.parse(argv)
