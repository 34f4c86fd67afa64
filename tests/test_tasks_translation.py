"""Translation end to end on a slice of the real WMT22 German-English test set, with a tiny T5."""

import json
import os

import pytest
import sacrebleu

from tasks import runner
from tasks.adapters import Translation

WMT22 = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "wmt22", "test.de-en.jsonl")
SLICE = 8


@pytest.fixture(scope="module")
def wmt_slice(tmp_path_factory):
    """The first German->English rows of WMT22, as HF's {"translation": {"de", "en"}} jsonl."""
    if not os.path.isfile(WMT22):
        pytest.skip(f"shared WMT22 test set not found at {WMT22}")
    pairs = []
    with open(WMT22, encoding="utf-8") as handle:
        for line in handle:
            row = json.loads(line)
            if row["direction"] == "de2en":
                pairs.append({"de": row["src"], "en": row["tgt"]})
            if len(pairs) == SLICE:
                break
    path = tmp_path_factory.mktemp("wmt") / "de-en.jsonl"
    with open(path, "w", encoding="utf-8") as handle:
        for pair in pairs:
            handle.write(json.dumps({"translation": pair}, ensure_ascii=False) + "\n")
    return str(path), pairs


@pytest.fixture(scope="module")
def toy_model(tmp_path_factory, wmt_slice):
    from util.toy_models import build_toy_t5, train_toy_tokenizer
    _, pairs = wmt_slice
    texts = [f"translate German to English: {p['de']} {p['en']}" for p in pairs]
    folder = str(tmp_path_factory.mktemp("tr_model"))
    build_toy_t5(train_toy_tokenizer(texts, vocab_size=500), save_dir=folder)
    return folder


LANGUAGES = ["--source_lang", "de", "--target_lang", "en", "--max_source_length", "96", "--max_target_length", "48"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory, toy_model, wmt_slice):
    data, _ = wmt_slice
    out = str(tmp_path_factory.mktemp("tr_train") / "run")
    results = runner.run(Translation(), [
        "--model_name_or_path", toy_model, "--train_file", data, "--validation_file", data,
        "--do_train", "--do_eval", "--output_dir", out, *LANGUAGES,
        "--per_device_train_batch_size", "8", "--per_device_eval_batch_size", "4", "--learning_rate", "1e-2",
        "--max_steps", "80", "--save_strategy", "no", "--disable_tqdm", "True",
    ])
    return out, results


def _load(folder, name):
    with open(os.path.join(folder, name), encoding="utf-8") as handle:
        if name.endswith(".jsonl"):
            return [json.loads(line) for line in handle]
        return json.load(handle)


def test_train_and_eval_on_wmt22_slice(trained, wmt_slice):
    out, results = trained
    _, pairs = wmt_slice
    evaluation = _load(out, "eval_results.json")
    assert evaluation["eval_samples"] == SLICE
    records = _load(out, "eval_predictions.jsonl")
    assert [r["references"] for r in records] == [[p["en"]] for p in pairs]
    expected = sacrebleu.corpus_bleu([r["prediction"] for r in records], [[p["en"] for p in pairs]]).score
    assert evaluation["eval_bleu"] == pytest.approx(expected)
    assert evaluation["eval_bleu"] > 30.0  # the 8 training sentences are largely memorised
    assert _load(out, "run_config.json")["data_args"]["source_prefix"] == "translate German to English: "
    assert results["train_samples"] == SLICE


def test_deploy_without_exit_matches_batched_and_reports_exits(trained, wmt_slice, tmp_path):
    model_dir, _ = trained
    data, _ = wmt_slice
    out = str(tmp_path / "deploy")
    results = runner.run(Translation(), [
        "--model_name_or_path", model_dir, "--validation_file", data, "--do_eval", "--output_dir", out,
        *LANGUAGES, "--deploy_scenario", "True",
    ])
    deployed = _load(out, "eval_predictions.jsonl")
    batched = _load(model_dir, "eval_predictions.jsonl")
    assert [r["prediction"] for r in deployed] == [r["prediction"] for r in batched]
    assert results["eval_bleu"] == pytest.approx(_load(model_dir, "eval_results.json")["eval_bleu"])
    tokens = sum(len(r["exit_layers"]) for r in deployed)
    assert results["eval_tokens"] == tokens and results["eval_block_op"] == [tokens, tokens]


def test_early_exit_state_confidence_lowers_the_blocks_used(trained, wmt_slice, tmp_path):
    model_dir, _ = trained
    data, _ = wmt_slice
    results = runner.run(Translation(), [
        "--model_name_or_path", model_dir, "--validation_file", data, "--do_eval",
        "--output_dir", str(tmp_path / "state"), *LANGUAGES, "--max_eval_samples", "2",
        "--deploy_scenario", "True", "--use_early_exit", "True", "--exit_conf_type", "state",
        "--exit_conf_threshold", "0.0",
    ])
    records = _load(str(tmp_path / "state"), "eval_predictions.jsonl")
    layers = [layer for r in records for layer in r["exit_layers"]]
    # mean over tokens of the exit layers, and the per-block counts, from the per-sample records
    assert results["eval_block_avg"] == pytest.approx(sum(layers) / len(layers))
    assert results["eval_block_op"] == [len(layers), sum(1 for layer in layers if layer == 2)]
    assert results["eval_block_avg"] < 2.0


def test_missing_language_in_a_row_is_refused(tmp_path, toy_model, monkeypatch):
    monkeypatch.setattr(runner, "model_class", lambda **_: pytest.fail("model loaded before the error"))
    data = tmp_path / "bad.jsonl"
    data.write_text(json.dumps({"translation": {"de": "Hallo", "en": "Hello"}}) + "\n"
                    + json.dumps({"translation": {"de": "Welt", "fr": "monde"}}) + "\n")
    with pytest.raises(ValueError, match=r"row 1: column 'translation' has no 'en' text"):
        runner.run(Translation(), ["--model_name_or_path", toy_model, "--validation_file", str(data), "--do_eval",
                                   "--output_dir", str(tmp_path / "out"), "--source_lang", "de", "--target_lang", "en"])


def test_languages_are_required(tmp_path, toy_model):
    with pytest.raises(ValueError, match="needs --source_lang and --target_lang"):
        runner.run(Translation(), ["--model_name_or_path", toy_model, "--validation_file", "x.jsonl", "--do_eval",
                                   "--output_dir", str(tmp_path / "out")])
