"""plotting_logits and render_jsds through the task pipeline: trace files and plots are written."""

import json
import os

import pytest

from tasks import diagnostics, runner
from tasks.adapters import QuestionAnswering
from util.diagnostics import load_json
from util.toy_models import build_toy_t5, train_toy_tokenizer

CONTEXTS = ["The river Lune flows past the old mill in Halton.", "Mira keeps three blue boats near the harbour."]
QUESTIONS = [("Which river flows past the mill?", "Lune"), ("How many boats does Mira keep?", "three")]


@pytest.fixture(scope="module")
def qa_data(tmp_path_factory):
    folder = tmp_path_factory.mktemp("qa_diag")
    rows = []
    for i, (context, (question, answer)) in enumerate(zip(CONTEXTS, QUESTIONS)):
        rows.append({"id": str(i), "question": question, "context": context,
                     "answers": {"text": [answer], "answer_start": [context.index(answer)]}})
    path = folder / "dev.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows))
    model_dir = str(folder / "model")
    tokenizer = train_toy_tokenizer([f"question: {q} context: {c}" for c, (q, _) in zip(CONTEXTS, QUESTIONS)],
                                    vocab_size=120)
    build_toy_t5(tokenizer, num_layers=2, num_decoder_layers=4, save_dir=model_dir)
    return str(path), model_dir


def test_plots_and_traces_of_a_deploy_run(qa_data, tmp_path, monkeypatch):
    data, model_dir = qa_data
    monkeypatch.setattr(diagnostics, "PLOTS_ROOT", str(tmp_path / "plots"))
    out = str(tmp_path / "run")
    results = runner.run(QuestionAnswering(), [
        "--model_name_or_path", model_dir, "--validation_file", data, "--do_eval", "--output_dir", out,
        "--max_answer_length", "4", "--deploy_scenario", "True", "--use_early_exit", "True",
        "--exit_conf_type", "JSD_contrastive_confidence", "--exit_min_layer", "3", "--exit_conf_threshold", "0.5",
        "--plotting_logits", "True", "--render_jsds", "True", "--disable_tqdm", "True",
    ])
    # the static exit's F1 per layer is a result too; at the last layer it is the full model's, which
    # is what a plotting_logits run decodes
    static = results["eval_static_exit_f1"]
    assert len(static) == 4 and static[-1] == results["eval_f1"]
    with open(os.path.join(out, "eval_results.json")) as handle:
        assert json.load(handle)["eval_static_exit_f1"] == static
    trace = load_json(os.path.join(out, "eval_diagnostics", "layer_trace.json"))
    assert trace.num_layers == 4 and trace.num_tokens == results["eval_tokens"]
    jsd = load_json(os.path.join(out, "eval_diagnostics", "jsd_trace.json"))
    assert len(jsd.steps) == results["eval_tokens"]
    assert all(step.chosen in step.jsd for step in jsd.steps)
    plots = sorted(os.listdir(tmp_path / "plots" / "run"))
    assert plots == ["calibration.png", "exit_layer_histogram.png", "jsd_heatmap.png", "ranks_per_layer.png",
                     "static_exit_metric.png"]
    for name in plots:
        with open(tmp_path / "plots" / "run" / name, "rb") as handle:
            assert handle.read(8) == b"\x89PNG\r\n\x1a\n"


def test_plots_of_another_run_with_the_same_folder_name_are_never_overwritten(qa_data, tmp_path, monkeypatch):
    data, model_dir = qa_data
    monkeypatch.setattr(diagnostics, "PLOTS_ROOT", str(tmp_path / "plots"))
    argv = ["--model_name_or_path", model_dir, "--validation_file", data, "--do_eval", "--max_answer_length", "4",
            "--deploy_scenario", "True", "--plotting_logits", "True", "--disable_tqdm", "True"]
    runner.run(QuestionAnswering(), argv + ["--output_dir", str(tmp_path / "a" / "run")])
    figure = tmp_path / "plots" / "run" / "calibration.png"
    first = figure.read_bytes()
    # another run whose output folder has the same name is refused before anything is written
    with pytest.raises(ValueError, match=r"plots.*run.*holds another run's plots.*--overwrite_output_dir"):
        runner.run(QuestionAnswering(), argv + ["--output_dir", str(tmp_path / "b" / "run")])
    assert not (tmp_path / "b").exists() and figure.read_bytes() == first
    # a stray figure of the earlier run is removed when overwriting
    (tmp_path / "plots" / "run" / "jsd_heatmap.png").write_bytes(b"old")
    runner.run(QuestionAnswering(), argv + ["--output_dir", str(tmp_path / "b" / "run"), "--overwrite_output_dir", "True"])
    assert sorted(os.listdir(tmp_path / "plots" / "run")) == ["calibration.png", "exit_layer_histogram.png",
                                                               "ranks_per_layer.png", "static_exit_metric.png"]
