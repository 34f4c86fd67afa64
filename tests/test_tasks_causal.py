"""The task scripts with a decoder-only model (a tiny random Llama): the prompt masked out of the
training loss, a round trip per task (train, evaluate with HF generate and with the early-exit
decoder), sources cut from the left to the context, and the prompt's bad input."""

import json
import os
import subprocess
import sys

import pytest
import torch
from transformers import AutoTokenizer, DataCollatorForSeq2Seq

from models.modeling_causal import TrainLlamaForCausalLM
from tasks import runner
from tasks.adapters import QuestionAnswering, Summarization, Translation
from tasks.prompts import causal_features, default_template, prompt_format
from util.toy_models import build_toy_llama, train_toy_tokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NAMES = ["Anna", "Boris", "Clara", "David", "Eva", "Felix"]
SUM_ROWS = [{"id": f"s{i}", "text": f"{n} lives by the river and bakes bread for the mill number {i}.",
             "summary": f"{n} bakes bread."} for i, n in enumerate(NAMES)]
QA_ROWS = [{"id": f"q{i}", "question": f"Who bakes bread number {i}?",
            "context": f"{n} bakes bread number {i} by the river.",
            "answers": {"text": [n], "answer_start": [0]}} for i, n in enumerate(NAMES)]
TR_ROWS = [{"translation": {"de": f"{n} backt Brot am Fluss.", "en": f"{n} bakes bread by the river."}}
           for n in NAMES]
TEXTS = ([r["text"] + " " + r["summary"] for r in SUM_ROWS]
         + [f"question: {r['question']} context: {r['context']}" for r in QA_ROWS]
         + [r["translation"]["de"] + " " + r["translation"]["en"] for r in TR_ROWS]
         + [default_template("question answering"), default_template("summarization"),
            default_template("translation", "German", "English")])


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    """A tiny random Llama (3 blocks, context 64) with a BPE tokenizer, saved to a folder."""
    folder = str(tmp_path_factory.mktemp("llama"))
    build_toy_llama(train_toy_tokenizer(TEXTS, vocab_size=200), num_layers=3, max_positions=64, save_dir=folder)
    return folder


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    folder = tmp_path_factory.mktemp("causal_data")
    return {"sum": write_jsonl(folder / "sum.jsonl", SUM_ROWS), "qa": write_jsonl(folder / "qa.jsonl", QA_ROWS),
            "tr": write_jsonl(folder / "tr.jsonl", TR_ROWS)}


# ----- the prompt masked out of the loss -----------------------------------------------------------
def test_loss_is_the_targets_alone_given_their_prompts(llama):
    """The collated batch's loss (prompt labels masked, rows right-padded) equals the mean negative
    log-likelihood of the target tokens, each row scored alone from its own logits."""
    tokenizer = AutoTokenizer.from_pretrained(llama)
    model = TrainLlamaForCausalLM.from_pretrained(llama).eval()
    prompt = prompt_format(tokenizer, default_template("summarization"), budget=40, why="test")
    sources, targets = [r["text"] for r in SUM_ROWS[:3]], ["Anna bakes bread.", "Boris bakes.", "Clara"]
    features, cut = causal_features(prompt, tokenizer, sources, targets, target_length=8)
    assert not any(cut)
    rows = [dict(zip(features, values)) for values in zip(*features.values())]
    tokenizer.padding_side = "right"
    batch = DataCollatorForSeq2Seq(tokenizer, label_pad_token_id=-100)(rows)
    assert len({len(r["input_ids"]) for r in rows}) > 1  # padding is exercised
    with torch.no_grad():
        loss = model(**batch).loss
    prompts, _ = prompt.encode(tokenizer, sources)
    nll, count = 0.0, 0
    for ids, target in zip(prompts, targets):
        answer = tokenizer(target, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        full = torch.tensor([ids + answer])
        with torch.no_grad():
            logits = model(input_ids=full).logits[0].double()
        logp = torch.log_softmax(logits, dim=-1)
        for j, token in enumerate(answer):
            nll -= logp[len(ids) + j - 1, token].item()  # the token after position len(ids)+j-1
            count += 1
    torch.testing.assert_close(loss.double(), torch.tensor(nll / count, dtype=torch.float64), rtol=1e-5, atol=1e-6)
    for row, ids in zip(rows, prompts):  # the prompt's labels are masked, the target's are its ids
        assert row["labels"][: len(ids)] == [-100] * len(ids)
        assert row["labels"][len(ids):] == row["input_ids"][len(ids):]


def test_long_sources_lose_their_start_never_the_template(llama):
    tokenizer = AutoTokenizer.from_pretrained(llama)
    prompt = prompt_format(tokenizer, "{source}\nsummary:", budget=10, why="test")
    source = " ".join(r["text"] for r in SUM_ROWS[:2])
    (ids,), (cut,) = prompt.encode(tokenizer, [source])
    source_ids = tokenizer(source, add_special_tokens=False)["input_ids"]
    assert cut and len(ids) == 10
    assert ids == source_ids[-prompt.source_room:] + prompt.tail  # the end of the source, then the template
    (short,), (short_cut,) = prompt.encode(tokenizer, ["Anna"])
    assert not short_cut and short == tokenizer("Anna", add_special_tokens=False)["input_ids"] + prompt.tail


# ----- a round trip per task ---------------------------------------------------------------------------
TASKS = {
    "sum": (Summarization, ["--max_source_length", "24", "--max_target_length", "8"]),
    "qa": (QuestionAnswering, ["--max_seq_length", "24", "--max_answer_length", "6"]),
    "tr": (Translation, ["--source_lang", "de", "--target_lang", "en", "--max_source_length", "24",
                         "--max_target_length", "8"]),
}


@pytest.mark.parametrize("name", sorted(TASKS))
def test_round_trip_trains_then_decodes_the_new_tokens(name, llama, data, tmp_path):
    adapter, lengths = TASKS[name]
    common = ["--validation_file", data[name], "--per_device_eval_batch_size", "4", "--disable_tqdm", "True",
              "--report_to", "none", *lengths]
    trained = runner.run(adapter(), ["--model_name_or_path", llama, "--train_file", data[name], "--do_train",
                                     "--output_dir", str(tmp_path / "train"), "--max_steps", "2",
                                     "--learning_rate", "1e-2", "--output_hidden_states_decoder", "True",
                                     "--intermediate_loss_fn", "weighted_ce", *common[2:]])
    assert trained["train_samples"] == len(NAMES) and "train_truncated_sources" in trained
    model = str(tmp_path / "train")
    plain = runner.run(adapter(), ["--model_name_or_path", model, "--do_eval", "--output_dir", str(tmp_path / "hf"),
                                   *common])
    deploy = runner.run(adapter(), ["--model_name_or_path", model, "--do_eval", "--output_dir",
                                    str(tmp_path / "deploy"), "--deploy_scenario", "True", *common])
    read = lambda folder: [json.loads(l) for l in open(tmp_path / folder / "eval_predictions.jsonl")]  # noqa: E731
    # the early-exit decoder's full model decodes HF generate's tokens (left-padded batches of 4)
    assert [r["prediction"] for r in read("deploy")] == [r["prediction"] for r in read("hf")]
    assert deploy["eval_gen_len"] == plain["eval_gen_len"]
    assert deploy["eval_block_avg"] == 3.0 and deploy["eval_samples"] == len(NAMES)
    assert all(len(r["exit_layers"]) >= 1 for r in read("deploy"))
    for key in (f"eval_{adapter.main_metric}", "eval_truncated_sources"):
        assert key in plain and key in deploy
    # the prediction is the decoded new tokens alone, as a row decodes by itself
    tokenizer = AutoTokenizer.from_pretrained(model)
    hf = runner.load_eval_model(model, runner.AutoConfig.from_pretrained(model), False, _Args(), "cpu")
    config = json.load(open(tmp_path / "hf" / "run_config.json"))
    template = config["data_args"]["prompt_template"]
    prompt = prompt_format(tokenizer, template, budget=24, why="test")
    first = read("hf")[0]
    source = adapter().source_text(_first_row(name), _DataArgs(config["data_args"]))
    ids = torch.tensor(prompt.encode(tokenizer, [source])[0])
    out = hf.generate(input_ids=ids, max_new_tokens=int(lengths[-1]), do_sample=False,
                      pad_token_id=tokenizer.pad_token_id)
    assert tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True).strip() == first["prediction"]


class _Args:
    cache_dir, model_revision = None, "main"


class _DataArgs:
    def __init__(self, values):
        self.__dict__.update(values)


def _first_row(name):
    return {"sum": SUM_ROWS, "qa": QA_ROWS, "tr": TR_ROWS}[name][0]


def test_sources_beyond_the_context_are_cut_and_counted(llama, data, tmp_path):
    """Context 64 less 54 generated tokens leaves 10 prompt tokens: every source is cut from its left."""
    results = runner.run(Summarization(), ["--model_name_or_path", llama, "--validation_file", data["sum"],
                                           "--do_eval", "--output_dir", str(tmp_path / "out"),
                                           "--val_max_target_length", "54", "--max_source_length", "1024",
                                           "--disable_tqdm", "True", "--per_device_eval_batch_size", "2"])
    tokenizer = AutoTokenizer.from_pretrained(llama)
    prompt = prompt_format(tokenizer, default_template("summarization"), budget=10, why="test")
    expected = sum(len(tokenizer(r["text"], add_special_tokens=False)["input_ids"]) > prompt.source_room
                   for r in SUM_ROWS)
    assert expected > 0 and results["eval_truncated_sources"] == expected


def test_the_sweep_runs_on_a_decoder_only_model(llama, data, tmp_path):
    import run_sweep
    rows = run_sweep.main(["--task", "summarization", "--output_dir", str(tmp_path / "sweep"), "--thresholds", "0.5",
                           "--static_layers", "1", "--", "--model_name_or_path", llama, "--validation_file",
                           data["sum"], "--max_source_length", "24", "--max_target_length", "4",
                           "--disable_tqdm", "True"])
    assert [r["cell"] for r in rows] == ["full", "static-1", "softmax-t0.5-none-m1"]
    assert rows[1]["block_avg"] == 1.0 and rows[0]["block_avg"] == 3.0


# ----- bad input ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("extra, message", [
    (["--prompt_template", "summary:"], "must contain {source} exactly once"),
    (["--prompt_template", "{source} and {source}"], "must contain {source} exactly once"),
    (["--prompt_template", "Read this long instruction about bread and the river carefully. {source}",
      "--max_source_length", "8", "--max_target_length", "8"], "leaves nothing of the source in a prompt of at most 8 tokens"),
    (["--val_max_target_length", "64"], "leaves nothing of the source in a prompt of at most 0 tokens"),
    (["--source_prefix", "summarize: "], "--source_prefix is T5's task prefix"),
])
def test_bad_prompt_input_is_refused_before_any_work(extra, message, llama, data, tmp_path, monkeypatch):
    def refuse(**_):
        raise AssertionError("the model was loaded before the bad input was reported")
    monkeypatch.setattr(runner, "model_class", refuse)
    with pytest.raises(ValueError, match=message.replace("{", r"\{").replace("}", r"\}")):
        runner.run(Summarization(), ["--model_name_or_path", llama, "--validation_file", data["sum"], "--do_eval",
                                     "--output_dir", str(tmp_path / "out"), *extra])
    assert not (tmp_path / "out").exists()


def test_bad_template_at_the_command_line_is_one_error_line(llama, data, tmp_path):
    done = subprocess.run([sys.executable, os.path.join(ROOT, "src", "run_summarization.py"),
                           "--model_name_or_path", llama, "--validation_file", data["sum"], "--do_eval",
                           "--output_dir", str(tmp_path / "out"), "--prompt_template", "no field"],
                          capture_output=True, text=True)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines()[-1].startswith("error: --prompt_template 'no field' must contain")


def test_a_template_for_a_t5_model_is_refused(tmp_path, data):
    from util.toy_models import build_toy_t5
    folder = str(tmp_path / "t5")
    build_toy_t5(train_toy_tokenizer(TEXTS, vocab_size=200), save_dir=folder)
    with pytest.raises(ValueError, match="--prompt_template formats the prompts of decoder-only models"):
        runner.run(Summarization(), ["--model_name_or_path", folder, "--validation_file", data["sum"], "--do_eval",
                                     "--output_dir", str(tmp_path / "out"), "--prompt_template", "{source} summary:"])


def test_a_tokenizer_without_pad_token_pads_with_its_end_token(llama, data, tmp_path):
    """As Llama's and GPT-2's: the end token pads (left in prompts, after a finished row)."""
    import shutil
    folder = tmp_path / "nopad"
    shutil.copytree(llama, folder)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    tokenizer.pad_token = None
    tokenizer.save_pretrained(folder)
    assert AutoTokenizer.from_pretrained(folder).pad_token_id is None
    common = ["--model_name_or_path", str(folder), "--validation_file", data["sum"], "--do_eval",
              "--max_source_length", "24", "--max_target_length", "6", "--per_device_eval_batch_size", "3",
              "--disable_tqdm", "True"]
    plain = runner.run(Summarization(), common + ["--output_dir", str(tmp_path / "hf")])
    deploy = runner.run(Summarization(), common + ["--output_dir", str(tmp_path / "deploy"), "--deploy_scenario", "True"])
    read = lambda folder: [json.loads(l)["prediction"] for l in open(tmp_path / folder / "eval_predictions.jsonl")]  # noqa: E731
    assert read("hf") == read("deploy") and plain["eval_gen_len"] == deploy["eval_gen_len"]


def test_layerskip_with_a_curriculum_trains_through_the_task_script(llama, data, tmp_path):
    """The Trainer tells the model its step (a rotational curriculum needs it), layer dropout on."""
    results = runner.run(Summarization(), ["--model_name_or_path", llama, "--train_file", data["sum"], "--do_train",
                                           "--output_dir", str(tmp_path / "out"), "--max_steps", "3",
                                           "--max_source_length", "24", "--max_target_length", "6",
                                           "--report_to", "none", "--disable_tqdm", "True",
                                           "--output_hidden_states_decoder", "True",
                                           "--intermediate_loss_fn", "layerskip", "--early_exit_curriculum",
                                           "rotational", "--early_exit_rotation_interval", "2",
                                           "--layer_dropout_max", "0.2"])
    assert results["train_samples"] == len(NAMES) and results["train_loss"] > 0
