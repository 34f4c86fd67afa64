"""Question answering end to end on a slice of the real SQuAD v1.1 dev set, with a tiny T5."""

import json
import os
import zipfile

import pytest

from tasks import runner
from tasks.adapters import QuestionAnswering
from tasks.data import RawSplit, read_rows
from util.metrics import squad_metrics
from util.toy_models import build_toy_t5, train_toy_tokenizer

SQUAD_ZIP = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "squad_v1.1", "dev-v1.1.json.zip")
SLICE = 8


@pytest.fixture(scope="module")
def squad_file(tmp_path_factory):
    if not os.path.isfile(SQUAD_ZIP):
        pytest.skip(f"shared SQuAD dev set not found at {SQUAD_ZIP}")
    folder = tmp_path_factory.mktemp("squad")
    with zipfile.ZipFile(SQUAD_ZIP) as archive:
        archive.extract("dev-v1.1.json", folder)
    return str(folder / "dev-v1.1.json")


@pytest.fixture(scope="module")
def toy_model(tmp_path_factory, squad_file):
    rows = read_rows(squad_file)[:SLICE]
    texts = [f"question: {r['question']} context: {r['context']}" for r in rows]
    folder = str(tmp_path_factory.mktemp("qa_model"))
    build_toy_t5(train_toy_tokenizer(texts, vocab_size=400), save_dir=folder)
    return folder


@pytest.fixture(scope="module")
def trained(tmp_path_factory, toy_model, squad_file):
    """Fine-tune on the first 8 questions, then evaluate them with batched generate."""
    out = str(tmp_path_factory.mktemp("qa_train") / "run")
    results = runner.run(QuestionAnswering(), [
        "--model_name_or_path", toy_model, "--train_file", squad_file, "--validation_file", squad_file,
        "--do_train", "--do_eval", "--output_dir", out,
        "--max_train_samples", str(SLICE), "--max_eval_samples", str(SLICE), "--max_answer_length", "8",
        "--per_device_train_batch_size", "8", "--per_device_eval_batch_size", "3",
        "--learning_rate", "1e-2", "--max_steps", "60", "--save_strategy", "no", "--disable_tqdm", "True",
    ])
    return out, results


def _predictions(folder, prefix="eval"):
    with open(os.path.join(folder, f"{prefix}_predictions.jsonl")) as handle:
        return [json.loads(line) for line in handle]


def _results(folder, name="eval_results.json"):
    with open(os.path.join(folder, name)) as handle:
        return json.load(handle)


def test_train_and_batched_eval_on_squad_slice(trained, squad_file):
    out, results = trained
    saved = _results(out)
    assert saved == {k: v for k, v in results.items() if k.startswith("eval_")}
    assert saved["eval_samples"] == SLICE
    # 60 steps on 8 questions memorise them: the model answers what it was trained on
    assert saved["eval_exact_match"] >= 75.0
    assert saved["eval_f1"] >= saved["eval_exact_match"]
    assert "eval_block_avg" not in saved  # batched evaluation reports quality only

    records = _predictions(out)
    expected = read_rows(squad_file)[:SLICE]
    assert [r["id"] for r in records] == [row["id"] for row in expected]
    assert [r["references"] for r in records] == [row["answers"]["text"] for row in expected]
    rescored = squad_metrics([r["prediction"] for r in records], [r["references"] for r in records])
    assert rescored["exact_match"] == pytest.approx(saved["eval_exact_match"])
    assert rescored["f1"] == pytest.approx(saved["eval_f1"])

    everything = _results(out, "all_results.json")
    assert everything["train_samples"] == SLICE and "train_loss" in everything
    assert everything["eval_exact_match"] == saved["eval_exact_match"]
    config = _results(out, "run_config.json")
    assert config["task"] == "question answering"
    assert config["data_args"]["max_answer_length"] == 8 and config["data_args"]["max_seq_length"] == 384
    assert config["additional_args"]["deploy_scenario"] is False
    assert os.path.isfile(os.path.join(out, "model.safetensors"))
    assert os.path.isfile(os.path.join(out, "tokenizer.json"))


def test_deploy_without_exit_matches_batched_generate(trained, squad_file, tmp_path):
    model_dir, _ = trained
    out = str(tmp_path / "deploy")
    results = runner.run(QuestionAnswering(), [
        "--model_name_or_path", model_dir, "--validation_file", squad_file, "--do_eval", "--output_dir", out,
        "--max_eval_samples", str(SLICE), "--max_answer_length", "8", "--deploy_scenario", "True",
    ])
    deployed, batched = _predictions(out), _predictions(model_dir)
    assert [r["prediction"] for r in deployed] == [r["prediction"] for r in batched]
    assert results["eval_exact_match"] == _results(model_dir)["eval_exact_match"]

    tokens = sum(len(r["exit_layers"]) for r in deployed)
    assert all(set(r["exit_layers"]) == {2} for r in deployed)  # full model: every token runs both blocks
    assert results["eval_tokens"] == tokens
    assert results["eval_block_avg"] == 2.0
    assert results["eval_block_op"] == [tokens, tokens]
    assert results["eval_exit_layer_counts"] == [0, tokens]
    for key in ("eval_time_total", "eval_time_encoder", "eval_time_blocks", "eval_samples_per_second",
                "eval_tokens_per_second", "eval_runtime"):
        assert results[key] > 0, key
    assert results["eval_time_total"] >= results["eval_time_blocks"]


def test_deploy_static_exit_counts_one_block_per_token(trained, squad_file, tmp_path):
    model_dir, _ = trained
    out = str(tmp_path / "static")
    results = runner.run(QuestionAnswering(), [
        "--model_name_or_path", model_dir, "--validation_file", squad_file, "--do_eval", "--output_dir", out,
        "--max_eval_samples", "3", "--max_answer_length", "8", "--deploy_scenario", "True", "--static_exit_layer", "1",
    ])
    tokens = results["eval_tokens"]
    assert tokens >= 3
    assert results["eval_block_avg"] == 1.0
    assert results["eval_block_op"] == [tokens, 0]
    assert results["eval_exit_layer_counts"] == [tokens, 0]


def test_whole_real_dev_set_passes_the_answer_checks(squad_file):
    import datasets
    rows = read_rows(squad_file)
    assert len(rows) == 10570
    assert set(rows[0]) == {"id", "title", "context", "question", "answers"}
    args = type("Args", (), {"question_column": "question", "context_column": "context", "answer_column": "answers"})
    split = RawSplit("validation", datasets.Dataset.from_list(rows), "dev")
    assert QuestionAnswering().check_columns(split, args) is True
    QuestionAnswering().check_rows(split, args, with_references=True)  # raises on any bad answer_start


# ----- bad input ---------------------------------------------------------------------------------
@pytest.fixture
def no_model_load(monkeypatch):
    """Fail the test if the pipeline gets as far as loading a model."""
    def refuse(**_):
        raise AssertionError("the model was loaded before the bad input was reported")
    monkeypatch.setattr(runner, "model_class", refuse)


def _write_squad(path, answer_start, answers=True):
    context = "Super Bowl 50 was played in Santa Clara, California."
    qa = {"id": "q1", "question": "Where was Super Bowl 50 played?",
          "answers": [{"text": "Santa Clara", "answer_start": answer_start}] if answers else []}
    with open(path, "w") as handle:
        json.dump({"version": "1.1", "data": [{"title": "SB", "paragraphs": [{"context": context, "qas": [qa]}]}]}, handle)
    return str(path)


def _eval_args(model, data_file, out):
    return ["--model_name_or_path", model, "--validation_file", data_file, "--do_eval", "--output_dir", out]


def test_nested_squad_file_is_read_directly(tmp_path):
    rows = read_rows(_write_squad(tmp_path / "tiny.json", 28))
    assert rows == [{"id": "q1", "title": "SB", "context": "Super Bowl 50 was played in Santa Clara, California.",
                     "question": "Where was Super Bowl 50 played?",
                     "answers": {"text": ["Santa Clara"], "answer_start": [28]}}]


def test_answer_start_off_its_context_is_refused(tmp_path, toy_model, no_model_load):
    data = _write_squad(tmp_path / "bad.json", 27)
    with pytest.raises(ValueError, match=r"row 0 \(id q1\): answer 'Santa Clara' is not at answer_start 27"):
        runner.run(QuestionAnswering(), _eval_args(toy_model, data, str(tmp_path / "out")))


def test_question_without_answer_is_refused(tmp_path, toy_model, no_model_load):
    data = _write_squad(tmp_path / "bad.json", 28, answers=False)
    with pytest.raises(ValueError, match="the question has no answer"):
        runner.run(QuestionAnswering(), _eval_args(toy_model, data, str(tmp_path / "out")))


def test_missing_question_column_is_named(tmp_path, toy_model, no_model_load):
    data = tmp_path / "flat.jsonl"
    data.write_text(json.dumps({"query": "q?", "context": "c", "answers": {"text": ["c"], "answer_start": [0]}}) + "\n")
    with pytest.raises(ValueError, match=r"lacks column\(s\) question \(it has: answers, context, query\)"):
        runner.run(QuestionAnswering(), _eval_args(toy_model, str(data), str(tmp_path / "out")))


def test_summarization_arguments_are_rejected_by_qa(tmp_path, toy_model, squad_file, no_model_load):
    with pytest.raises(ValueError, match="--max_source_length is not used by question answering"):
        runner.run(QuestionAnswering(), _eval_args(toy_model, squad_file, str(tmp_path / "out")) + ["--max_source_length", "9"])


def test_deploy_sampling_is_recorded_and_reproducible_from_its_seed(trained, squad_file, tmp_path):
    model_dir, _ = trained

    def run(name, seed):
        return runner.run(QuestionAnswering(), [
            "--model_name_or_path", model_dir, "--validation_file", squad_file, "--do_eval",
            "--output_dir", str(tmp_path / name), "--max_eval_samples", "3", "--max_answer_length", "8",
            "--deploy_scenario", "True", "--do_sample", "True", "--temperature", "2.0", "--top_k", "0",
            "--seed", str(seed)])

    first, again = run("a", 7), run("b", 7)
    assert [r["prediction"] for r in _predictions(str(tmp_path / "a"))] == \
        [r["prediction"] for r in _predictions(str(tmp_path / "b"))]
    assert first["eval_do_sample"] is True and first["eval_temperature"] == 2.0 and first["eval_top_k"] == 0
    assert first["eval_top_p"] == 1.0 and first["eval_seed"] == 7
    assert again["eval_exact_match"] == first["eval_exact_match"]
