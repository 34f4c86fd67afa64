"""Summarization end to end on small local data with a tiny T5: jsonl, csv, a JSON argument file."""

import csv
import json
import os

import pytest

from tasks import runner
from tasks.adapters import Summarization
from util.metrics import rouge_metrics
from util.toy_models import build_toy_t5, train_toy_tokenizer

NAMES = ["Amanda", "Jerry", "Hannah", "Larry", "Olivia", "Tom", "Eric", "Rob", "Sam", "Kate", "Lena", "Paul"]
TOPICS = ["cookies", "football", "the exam", "a concert", "the weather", "a new car", "holidays", "the dog",
          "a movie", "dinner", "the party", "books"]


def dialogue_rows():
    rows = []
    for i, (name, topic) in enumerate(zip(NAMES, TOPICS)):
        other = NAMES[(i + 3) % len(NAMES)]
        rows.append({
            "id": f"d{i}",
            "dialogue": f"{name}: Hi {other}! Shall we talk about {topic}? {other}: Sure, {topic} is great. {name}: See you.",
            "summary": f"{name} and {other} talk about {topic}.",
        })
    return rows


def write_jsonl(path, rows):
    with open(path, "w") as handle:
        for row in rows:
            handle.write(json.dumps(row) + "\n")
    return str(path)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    folder = tmp_path_factory.mktemp("sum_data")
    rows = dialogue_rows()
    with open(folder / "valid.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=["id", "dialogue", "summary"])
        writer.writeheader()
        writer.writerows(rows[:4])
    return {
        "train": write_jsonl(folder / "train.jsonl", rows),
        "valid_csv": str(folder / "valid.csv"),
        "test": write_jsonl(folder / "test.jsonl", [{"id": r["id"], "dialogue": r["dialogue"]} for r in rows[:3]]),
    }


@pytest.fixture(scope="module")
def toy_model(tmp_path_factory):
    texts = [f"summarize: {r['dialogue']} {r['summary']}" for r in dialogue_rows()]
    folder = str(tmp_path_factory.mktemp("sum_model"))
    build_toy_t5(train_toy_tokenizer(texts, vocab_size=300), save_dir=folder)
    return folder


COLUMNS = ["--text_column", "dialogue", "--summary_column", "summary", "--max_source_length", "96",
           "--max_target_length", "20"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory, toy_model, data):
    """Train on 12 dialogues, evaluate 4 of them (csv), predict 3 without references."""
    out = str(tmp_path_factory.mktemp("sum_train") / "run")
    results = runner.run(Summarization(), [
        "--model_name_or_path", toy_model, "--train_file", data["train"], "--validation_file", data["valid_csv"],
        "--test_file", data["test"], "--do_train", "--do_eval", "--do_predict", "--output_dir", out, *COLUMNS,
        "--per_device_train_batch_size", "12", "--learning_rate", "1e-2", "--max_steps", "60",
        "--save_strategy", "no", "--disable_tqdm", "True",
    ])
    return out, results


def _load(folder, name):
    with open(os.path.join(folder, name)) as handle:
        if name.endswith(".jsonl"):
            return [json.loads(line) for line in handle]
        return json.load(handle)


def test_train_eval_predict_writes_every_result(trained):
    out, results = trained
    evaluation = _load(out, "eval_results.json")
    for key in ("eval_rouge1", "eval_rouge2", "eval_rougeL", "eval_rougeLsum", "eval_gen_len", "eval_samples",
                "eval_runtime", "eval_samples_per_second"):
        assert key in evaluation, key
    assert evaluation["eval_samples"] == 4
    assert evaluation["eval_rouge1"] >= 90.0  # memorised summaries of the training dialogues

    records = _load(out, "eval_predictions.jsonl")
    assert [r["id"] for r in records] == ["d0", "d1", "d2", "d3"]
    assert records[0]["references"] == ["Amanda and Larry talk about cookies."]
    rescored = rouge_metrics([r["prediction"] for r in records], [r["references"][0] for r in records])
    assert rescored["rougeLsum"] == pytest.approx(evaluation["eval_rougeLsum"])

    # the test split has no summaries: predicted, not scored
    predicted = _load(out, "predict_results.json")
    assert predicted["predict_samples"] == 3 and predicted["predict_gen_len"] > 0
    assert not any(k.startswith("predict_rouge") for k in predicted)
    assert all("references" not in r and r["prediction"] for r in _load(out, "predict_predictions.jsonl"))

    everything = _load(out, "all_results.json")
    assert {"train_loss", "eval_rouge1", "predict_gen_len"} <= set(everything)
    assert everything == results
    assert _load(out, "run_config.json")["data_args"]["source_prefix"] == "summarize: "


def test_gen_len_counts_generated_tokens(trained, toy_model):
    out, _ = trained
    from transformers import AutoTokenizer
    tokenizer = AutoTokenizer.from_pretrained(toy_model)
    records = _load(out, "eval_predictions.jsonl")
    # each prediction re-encodes to its tokens plus </s> (generation stopped at eos, not at the length cap)
    lengths = [len(tokenizer(r["prediction"]).input_ids) for r in records]
    assert _load(out, "eval_results.json")["eval_gen_len"] == pytest.approx(sum(lengths) / len(lengths))


def test_json_argument_file_and_deploy_early_exit(trained, data, tmp_path):
    model_dir, _ = trained
    out = str(tmp_path / "deploy")
    arguments = {"model_name_or_path": model_dir, "validation_file": data["valid_csv"], "do_eval": True,
                 "output_dir": out, "text_column": "dialogue", "summary_column": "summary",
                 "max_source_length": 96, "val_max_target_length": 20,
                 "deploy_scenario": True, "use_early_exit": True, "exit_conf_type": "softmax",
                 "exit_conf_threshold": 0.0}
    argument_file = tmp_path / "args.json"
    argument_file.write_text(json.dumps(arguments))
    results = runner.run(Summarization(), [str(argument_file)])
    # threshold 0: any non-tied confidence exits at the first block
    assert results["eval_block_avg"] == 1.0
    assert results["eval_block_op"] == [results["eval_tokens"], 0]
    config = _load(out, "run_config.json")
    assert config["additional_args"]["exit_conf_threshold"] == 0.0
    assert config["data_args"]["val_max_target_length"] == 20


def test_deploy_without_exit_matches_batched(trained, data, tmp_path):
    model_dir, _ = trained
    common = ["--model_name_or_path", model_dir, "--validation_file", data["valid_csv"], "--do_eval",
              "--text_column", "dialogue", "--max_source_length", "96"]
    runner.run(Summarization(), common + ["--output_dir", str(tmp_path / "a"), "--per_device_eval_batch_size", "4"])
    runner.run(Summarization(), common + ["--output_dir", str(tmp_path / "b"), "--deploy_scenario", "True"])
    batched = [r["prediction"] for r in _load(str(tmp_path / "a"), "eval_predictions.jsonl")]
    deployed = [r["prediction"] for r in _load(str(tmp_path / "b"), "eval_predictions.jsonl")]
    assert deployed == batched


def test_overwrite_output_dir_replaces_the_old_results(trained, data, tmp_path):
    model_dir, _ = trained
    out = tmp_path / "out"
    out.mkdir()
    (out / "predict_results.json").write_text("{\"predict_old\": 1}")
    (out / "notes.txt").write_text("kept")
    args = ["--model_name_or_path", model_dir, "--validation_file", data["valid_csv"], "--do_eval",
            "--output_dir", str(out), "--text_column", "dialogue", "--max_eval_samples", "1"]
    with pytest.raises(ValueError, match="is not empty"):
        runner.run(Summarization(), args)
    results = runner.run(Summarization(), args + ["--overwrite_output_dir", "True"])
    assert not (out / "predict_results.json").exists()  # stale results of the old run are gone
    assert (out / "notes.txt").read_text() == "kept"  # other files are left alone
    assert _load(str(out), "all_results.json") == results


def test_deploy_results_are_identical_at_any_batch_size_except_timings(trained, data, tmp_path):
    model_dir, _ = trained
    common = ["--model_name_or_path", model_dir, "--validation_file", data["valid_csv"], "--do_eval",
              "--text_column", "dialogue", "--max_source_length", "96", "--deploy_scenario", "True",
              "--use_early_exit", "True", "--exit_conf_type", "softmax", "--exit_conf_threshold", "0.3",
              "--count_flops", "True"]
    results, predictions = {}, {}
    for size in (None, 3):
        out = str(tmp_path / f"batch{size}")
        extra = [] if size is None else ["--per_device_eval_batch_size", str(size)]
        results[size] = runner.run(Summarization(), common + ["--output_dir", out] + extra)
        predictions[size] = _load(out, "eval_predictions.jsonl")
        config = _load(out, "run_config.json")
        assert config["training_args"]["per_device_eval_batch_size"] == (size or 1)  # deploy default: 1
    timing = ("runtime", "samples_per_second", "tokens_per_second")
    same = {k: v for k, v in results[None].items() if not any(t in k for t in timing) and "time_" not in k}
    assert same == {k: results[3][k] for k in same}
    # FREE's accounting beside ours; without shallow-deep it is the mean exit layer, here below 2
    assert results[None]["eval_block_avg_free"] == results[None]["eval_block_avg"] <= 2.0
    assert predictions[None] == predictions[3]
