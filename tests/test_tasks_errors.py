"""Bad input to the task scripts: each a clear error, raised before any model is loaded."""

import json
import os

import pytest

from tasks import runner
from tasks.adapters import QuestionAnswering, Summarization, Translation
from util.additional_args import AdditionalArguments
from util.toy_models import build_toy_t5, train_toy_tokenizer

ROWS = [{"id": f"r{i}", "text": f"document number {i} about cats and dogs.", "summary": f"cats {i}."} for i in range(4)]


@pytest.fixture(scope="module")
def toy_model(tmp_path_factory):
    folder = str(tmp_path_factory.mktemp("err_model"))
    build_toy_t5(train_toy_tokenizer([r["text"] + " " + r["summary"] for r in ROWS], vocab_size=120), save_dir=folder)
    return folder


@pytest.fixture
def good_file(tmp_path):
    path = tmp_path / "good.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    return str(path)


@pytest.fixture
def no_model_load(monkeypatch):
    """Fail the test if the pipeline gets as far as loading a model."""
    def refuse(**_):
        raise AssertionError("the model was loaded before the bad input was reported")
    monkeypatch.setattr(runner, "model_class", refuse)


def summarize(model, data_file, out, *extra):
    return runner.run(Summarization(), ["--model_name_or_path", model, "--validation_file", data_file,
                                        "--do_eval", "--output_dir", str(out), *extra])


pytestmark = pytest.mark.usefixtures("no_model_load")


# ----- files -------------------------------------------------------------------------------------
def test_missing_file(toy_model, tmp_path):
    with pytest.raises(FileNotFoundError, match=r"--validation_file .*nowhere\.jsonl does not exist"):
        summarize(toy_model, str(tmp_path / "nowhere.jsonl"), tmp_path / "out")


def test_malformed_json_file(toy_model, tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text("[{\"text\": \"a\", \"summary\": ")
    with pytest.raises(ValueError, match=r"--validation_file .*bad\.json cannot be read"):
        summarize(toy_model, str(bad), tmp_path / "out")


def test_file_that_is_a_directory(toy_model, tmp_path):
    (tmp_path / "folder.json").mkdir()
    with pytest.raises(ValueError, match="is not a file"):
        summarize(toy_model, str(tmp_path / "folder.json"), tmp_path / "out")


def test_unknown_file_format(toy_model, tmp_path):
    path = tmp_path / "data.txt"
    path.write_text("hello")
    with pytest.raises(ValueError, match=r"unknown format; use one of \.json, \.jsonl, \.csv"):
        summarize(toy_model, str(path), tmp_path / "out")


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads files whatever their permissions")
def test_unreadable_file(toy_model, tmp_path, good_file):
    os.chmod(good_file, 0)
    with pytest.raises(ValueError, match="cannot be read"):
        summarize(toy_model, good_file, tmp_path / "out")


def test_undecodable_file(toy_model, tmp_path):
    path = tmp_path / "latin1.jsonl"
    path.write_bytes(b"{\"text\": \"caf\xe9\", \"summary\": \"x\"}\n")
    with pytest.raises(ValueError, match="cannot be read.*codec"):
        summarize(toy_model, str(path), tmp_path / "out")


@pytest.mark.parametrize("name, content", [("empty.jsonl", ""), ("header.csv", "text,summary\n"), ("list.json", "[]")])
def test_empty_split(toy_model, tmp_path, name, content):
    path = tmp_path / name
    path.write_text(content)
    with pytest.raises(ValueError, match="holds no rows: the split is empty"):
        summarize(toy_model, str(path), tmp_path / "out")


def test_empty_hub_split_and_missing_hub_split(monkeypatch, toy_model, tmp_path):
    import datasets
    fake = datasets.DatasetDict({"train": datasets.Dataset.from_list(ROWS),
                                 "validation": datasets.Dataset.from_list(ROWS).select([])})
    monkeypatch.setattr(datasets, "load_dataset", lambda *a, **k: fake)
    args = ["--model_name_or_path", toy_model, "--dataset_name", "mine", "--output_dir", str(tmp_path / "out")]
    with pytest.raises(ValueError, match="split 'validation' of mine is empty"):
        runner.run(Summarization(), args + ["--do_eval"])
    with pytest.raises(ValueError, match=r"mine has no 'test' split \(it has: train, validation\); pass --test_file"):
        runner.run(Summarization(), args + ["--do_predict"])


# ----- columns and rows --------------------------------------------------------------------------
def test_missing_column_names_what_there_is(toy_model, tmp_path, good_file):
    with pytest.raises(ValueError, match=r"lacks column\(s\) dialogue \(it has: id, summary, text\)"):
        summarize(toy_model, good_file, tmp_path / "out", "--text_column", "dialogue")
    assert not (tmp_path / "out").exists()  # bad input writes nothing


def test_missing_reference_column(toy_model, tmp_path):
    path = tmp_path / "no_summary.jsonl"
    path.write_text(json.dumps({"text": "a document"}) + "\n")
    with pytest.raises(ValueError, match=r"lacks column\(s\) summary"):
        summarize(toy_model, str(path), tmp_path / "out")


def test_row_without_text(toy_model, tmp_path):
    path = tmp_path / "gap.jsonl"
    path.write_text(json.dumps(ROWS[0]) + "\n" + json.dumps({"id": "r9", "text": None, "summary": "s"}) + "\n")
    with pytest.raises(ValueError, match=r"row 1 \(id r9\): column 'text' holds NoneType None, not text"):
        summarize(toy_model, str(path), tmp_path / "out")


# ----- model and tokenizer -----------------------------------------------------------------------
def test_model_path_without_tokenizer(toy_model, tmp_path, good_file):
    bare = tmp_path / "bare"
    bare.mkdir()
    for name in ("config.json", "model.safetensors"):
        os.symlink(os.path.join(toy_model, name), bare / name)
    with pytest.raises(ValueError, match=r"--model_name_or_path .*bare holds no tokenizer .*--tokenizer_name"):
        summarize(str(bare), good_file, tmp_path / "out")


def model_args(path):
    from tasks.arguments import ModelArguments
    return ModelArguments(model_name_or_path=path)


def test_byte_level_model_folder_is_accepted(tmp_path):
    """ByT5's save_pretrained writes tokenizer_config.json and added_tokens.json, no vocabulary file."""
    from transformers import ByT5Tokenizer

    folder = str(tmp_path / "byt5")
    build_toy_t5(ByT5Tokenizer(), save_dir=folder)
    assert "tokenizer.json" not in os.listdir(folder) and "spiece.model" not in os.listdir(folder)
    tokenizer = runner.load_tokenizer(model_args(folder))
    assert type(tokenizer).__name__ == "ByT5Tokenizer"
    assert tokenizer("cats", add_special_tokens=False)["input_ids"] == [b + 3 for b in b"cats"]
    config = runner.load_config(model_args(folder), tokenizer, AdditionalArguments())
    assert config.vocab_size == len(tokenizer)


def test_a_broken_tokenizer_reports_its_own_error(toy_model, tmp_path):
    broken = tmp_path / "broken"
    broken.mkdir()
    for name in os.listdir(toy_model):
        os.symlink(os.path.join(toy_model, name), broken / name)
    os.remove(broken / "tokenizer.json")
    (broken / "tokenizer.json").write_text("{not json")
    with pytest.raises(ValueError, match=r"broken.*tokenizer could not be loaded \(.*Error"):
        runner.load_tokenizer(model_args(str(broken)))


def test_model_path_without_weights(toy_model, tmp_path, good_file):
    with pytest.raises(ValueError, match="holds no model weights"):
        summarize(str(tmp_path), good_file, tmp_path / "out", "--tokenizer_name", toy_model)


def test_tokenizer_that_does_not_fit_the_model(tmp_path, good_file):
    big = train_toy_tokenizer([f"word{i} other{i}" for i in range(200)], vocab_size=400)
    small = build_toy_t5(train_toy_tokenizer(["a b c"], vocab_size=40), save_dir=str(tmp_path / "small"))
    assert len(big) > small.config.vocab_size
    big.save_pretrained(str(tmp_path / "big_tok"))
    with pytest.raises(ValueError, match="tokenizer has .* tokens but the model only"):
        summarize(str(tmp_path / "small"), good_file, tmp_path / "out", "--tokenizer_name", str(tmp_path / "big_tok"))


def test_unreachable_hub_suggests_local_files(monkeypatch, toy_model, tmp_path, good_file):
    import datasets
    import huggingface_hub.constants
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(ValueError, match=r"(?s)could not load --dataset_name samsum from the HuggingFace Hub.*--train_file"):
        runner.run(Summarization(), ["--model_name_or_path", toy_model, "--dataset_name", "samsum", "--do_eval",
                                     "--output_dir", str(tmp_path / "out")])
    with pytest.raises(ValueError, match=r"(?s)--model_name_or_path no-such-org/t5-nothing: not a local directory.*pass a local directory"):
        summarize("no-such-org/t5-nothing", good_file, tmp_path / "out2")


# ----- arguments ---------------------------------------------------------------------------------
def test_output_dir_with_another_run_is_refused(toy_model, tmp_path, good_file):
    out = tmp_path / "out"
    out.mkdir()
    (out / "eval_results.json").write_text("{\"eval_rouge1\": 12.5}")
    with pytest.raises(ValueError, match="is not empty: it may hold another run's results.*--overwrite_output_dir"):
        summarize(toy_model, good_file, out)
    assert (out / "eval_results.json").read_text() == "{\"eval_rouge1\": 12.5}"
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match="is a file, not a directory"):
        summarize(toy_model, good_file, tmp_path / "file")


def test_flag_invalid_for_the_model_depth(toy_model, tmp_path, good_file):
    with pytest.raises(ValueError, match=r"static_exit_layer=5 is outside the allowed layers 1\.\.2"):
        summarize(toy_model, good_file, tmp_path / "out", "--deploy_scenario", "True", "--static_exit_layer", "5")


def test_decoding_flag_needs_deploy_scenario(toy_model, tmp_path, good_file):
    with pytest.raises(ValueError, match="--use_early_exit changes decoding, which only --deploy_scenario True does"):
        summarize(toy_model, good_file, tmp_path / "out", "--use_early_exit", "True", "--exit_conf_type", "softmax")


@pytest.mark.parametrize("flags", [["--plotting_logits", "True"],
                                   ["--render_jsds", "True", "--exit_conf_type", "JSD_contrastive_confidence"]])
def test_trace_flag_needs_deploy_scenario_instead_of_being_ignored(toy_model, tmp_path, good_file, flags):
    with pytest.raises(ValueError, match=f"{flags[0]} records traces of the deploy decoder: set --deploy_scenario True"):
        summarize(toy_model, good_file, tmp_path / "out", *flags)
    assert not (tmp_path / "out").exists()  # refused before anything is written


def test_deploy_scenario_refuses_beam_search(toy_model, tmp_path, good_file):
    with pytest.raises(ValueError, match="--generation_num_beams=4: --deploy_scenario does not support beam search"):
        summarize(toy_model, good_file, tmp_path / "out", "--deploy_scenario", "True", "--generation_num_beams", "4")


@pytest.mark.parametrize("extra, message", [
    (["--max_eval_samples", "0"], "--max_eval_samples=0 must be a positive number of rows"),
    (["--max_source_length", "0"], "--max_source_length=0 must be a positive number of tokens"),
    (["--max_answer_length", "5"], "--max_answer_length is not used by summarization"),
    (["--source_lang", "de"], "--source_lang is not used by summarization"),
    (["--dataset_name", "samsum"], "pass either --dataset_name or local files"),
    (["--eval_strategy", "steps"], "--eval_strategy must stay 'no'"),
])
def test_bad_argument_values(toy_model, tmp_path, good_file, extra, message):
    with pytest.raises(ValueError, match=message):
        summarize(toy_model, good_file, tmp_path / "out", *extra)


def test_nothing_to_do_and_no_data(toy_model, tmp_path):
    with pytest.raises(ValueError, match="nothing to do"):
        runner.run(Summarization(), ["--model_name_or_path", toy_model, "--output_dir", str(tmp_path / "out")])
    with pytest.raises(ValueError, match="--do_train needs data: pass --train_file or --dataset_name"):
        runner.run(QuestionAnswering(), ["--model_name_or_path", toy_model, "--do_train",
                                         "--output_dir", str(tmp_path / "out")])


def test_missing_argument_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="argument file .*args.json does not exist"):
        runner.run(Translation(), [str(tmp_path / "args.json")])


# ----- a failing prediction is an error, never a made-up answer ------------------------------------
def test_failing_generation_stops_the_run(monkeypatch, toy_model, tmp_path, good_file):
    monkeypatch.undo()  # lift no_model_load: this test loads the model
    from transformers import T5ForConditionalGeneration

    def broken(self, **_):
        raise RuntimeError("out of memory in generate")
    monkeypatch.setattr(T5ForConditionalGeneration, "generate", broken)
    with pytest.raises(RuntimeError, match="out of memory in generate"):
        summarize(toy_model, good_file, tmp_path / "out")
    assert not os.path.exists(tmp_path / "out" / "eval_results.json")
    assert not os.path.exists(tmp_path / "out" / "eval_predictions.jsonl")


@pytest.mark.parametrize("extra, message", [
    (("--temperature", "0.5"), "--temperature only apply with --do_sample True"),
    (("--do_sample", "True", "--top_p", "1.5"), "top_p=1.5 must be in"),
    (("--deploy_scenario", "True", "--generation_num_beams", "2"), "does not support beam search"),
])
def test_sampling_arguments(toy_model, tmp_path, good_file, no_model_load, extra, message):
    with pytest.raises(ValueError, match=message):
        summarize(toy_model, good_file, str(tmp_path / "out"), *extra)
