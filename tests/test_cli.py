"""Entry points end a user error with one line `error: ...` and status 2 (issue 13, item 17)."""

import os
import subprocess
import sys

import pytest

from util.cli import run_entry_point

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_script(script, *args, debug=False):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    env.pop("EARLY_EXIT_DEBUG", None)
    if debug:
        env["EARLY_EXIT_DEBUG"] = "1"
    return subprocess.run([sys.executable, os.path.join(ROOT, "src", script), *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)


def test_a_missing_file_is_one_error_line_and_status_2(tmp_path):
    missing = str(tmp_path / "nowhere.jsonl")
    done = run_script("run_summarization.py", "--model_name_or_path", "unused", "--validation_file", missing,
                      "--do_eval", "--output_dir", str(tmp_path / "out"))
    assert done.returncode == 2
    assert "Traceback" not in done.stderr
    assert done.stderr.strip().splitlines()[-1] == f"error: --validation_file {missing} does not exist."


def test_the_debug_variable_keeps_the_traceback(tmp_path):
    done = run_script("run_summarization.py", "--model_name_or_path", "unused", "--validation_file",
                      str(tmp_path / "nowhere.jsonl"), "--do_eval", "--output_dir", str(tmp_path / "out"), debug=True)
    assert done.returncode == 1 and "Traceback" in done.stderr and "FileNotFoundError" in done.stderr


def test_the_sweep_reports_a_bad_flag_the_same_way(tmp_path):
    done = run_script("run_sweep.py", "--task", "qa", "--output_dir", str(tmp_path), "--reductions", "halving",
                      "--", "--model_name_or_path", "unused")
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert done.stderr.strip().splitlines()[-1].startswith("error: --reductions: 'halving' is not one of")


def test_user_errors_exit_2_and_internal_errors_keep_their_traceback(capsys, monkeypatch):
    monkeypatch.delenv("EARLY_EXIT_DEBUG", raising=False)

    def bad_flag():
        raise ValueError("--flag=3 must lie in [0, 1].")
    with pytest.raises(SystemExit) as exit_info:
        run_entry_point(bad_flag)
    assert exit_info.value.code == 2 and capsys.readouterr().err == "error: --flag=3 must lie in [0, 1].\n"

    def bug():
        raise RuntimeError("shape mismatch")
    with pytest.raises(RuntimeError, match="shape mismatch"):
        run_entry_point(bug)
    assert run_entry_point(lambda x: x + 1, 1) == 2
