"""Training through the task scripts (issue 6): losses, LoRA, bad input, and DDP with torchrun."""

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors import safe_open
from transformers import AutoConfig

from models.deploying_t5 import DeployT5ForConditionalGeneration
from tasks import runner
from tasks.adapters import QuestionAnswering
from tasks.data import flatten_squad
from util.demo_data import generate_squad, write_squad
from util.toy_models import build_toy_t5, train_toy_tokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    """A tiny QA set (40 questions) and a random toy T5 with its tokenizer."""
    folder = tmp_path_factory.mktemp("toy_qa")
    data = generate_squad(20, seed=0)
    train_file = str(folder / "train.json")
    write_squad(data, train_file)
    texts = [f"question: {r['question']} context: {r['context']}" for r in flatten_squad(data["data"])]
    model_dir = str(folder / "model")
    build_toy_t5(train_toy_tokenizer(texts, vocab_size=300), num_layers=1, num_decoder_layers=3, save_dir=model_dir)
    return {"train_file": train_file, "model_dir": model_dir}


def train_argv(toy, out, *extra):
    return ["--model_name_or_path", toy["model_dir"], "--train_file", toy["train_file"], "--do_train",
            "--output_dir", str(out), "--max_steps", "2", "--per_device_train_batch_size", "4",
            "--max_seq_length", "96", "--save_strategy", "no", "--report_to", "none", "--disable_tqdm", "True",
            *extra]


def assert_use_cache_is_on(folder):
    """The saved config and generation config ask for the KV cache (issue 18): training turns it
    off, and a checkpoint that keeps it off silently slows HF generate and FREE's code."""
    for name in ("config.json", "generation_config.json"):
        with open(os.path.join(folder, name)) as handle:
            assert json.load(handle).get("use_cache") is True, name


def weight_names(folder):
    with safe_open(os.path.join(folder, "model.safetensors"), "pt") as handle:
        return list(handle.keys())


def test_weighted_ce_training_through_the_script_saves_a_complete_checkpoint(toy, tmp_path):
    out = tmp_path / "run"
    results = runner.run(QuestionAnswering(), train_argv(
        toy, out, "--output_hidden_states_decoder", "True", "--intermediate_loss_fn", "weighted_ce"))
    assert results["train_samples"] == 40 and results["train_loss"] > 0
    config = AutoConfig.from_pretrained(str(out))
    assert config.intermediate_loss_fn == "weighted_ce"  # the exit configuration travels with the weights
    assert os.path.isfile(out / "tokenizer.json")
    DeployT5ForConditionalGeneration.from_pretrained(str(out), config=config)
    assert_use_cache_is_on(out)


def test_lora_training_saves_merged_weights(toy, tmp_path):
    out = tmp_path / "lora"
    runner.run(QuestionAnswering(), train_argv(toy, out, "--use_lora", "True", "--lora_rank", "2",
                                                "--learning_rate", "1e-2"))
    assert_use_cache_is_on(out)
    names = weight_names(out)
    assert not any("lora" in n for n in names) and "decoder.block.0.layer.0.SelfAttention.q.weight" in names
    trained = DeployT5ForConditionalGeneration.from_pretrained(str(out)).state_dict()
    initial = DeployT5ForConditionalGeneration.from_pretrained(toy["model_dir"]).state_dict()
    changed = {n for n in initial if not torch.equal(initial[n], trained[n])}
    assert changed and all(n.endswith((".q.weight", ".v.weight")) for n in changed)  # only the adapted layers


def test_unmerged_lora_and_meta_head_checkpoints_also_ask_for_the_cache(toy, tmp_path):
    from models.modeling_t5 import TrainT5ForConditionalGeneration, prepare_for_training, save_checkpoint

    model = TrainT5ForConditionalGeneration.from_pretrained(toy["model_dir"], use_cache=False)
    model.generation_config.use_cache = False
    save_checkpoint(prepare_for_training(model), None, str(tmp_path / "plain"))
    assert_use_cache_is_on(tmp_path / "plain")
    out = tmp_path / "meta"
    runner.run(QuestionAnswering(), train_argv(toy, out, "--output_hidden_states_decoder", "True",
                                                "--train_meta_cm_head", "True"))
    assert_use_cache_is_on(out)


def test_unknown_lora_target_fails_before_training(toy, tmp_path):
    out = tmp_path / "bad_lora"
    with pytest.raises(ValueError, match="lora_target_modules: qkv not found"):
        runner.run(QuestionAnswering(), train_argv(toy, out, "--use_lora", "True", "--lora_target_modules", "qkv"))
    assert not os.path.isfile(out / "model.safetensors")


def test_kd_loss_without_alpha_fails_before_loading(toy, tmp_path):
    with pytest.raises(ValueError, match="distill_layer_alpha"):
        runner.run(QuestionAnswering(), train_argv(
            toy, tmp_path / "bad_kd", "--output_hidden_states_decoder", "True",
            "--intermediate_loss_fn", "shallowdeep_kd_unif", "--shallow_exit_layer", "1"))
    assert not (tmp_path / "bad_kd").exists()


def test_several_processes_without_ddp_are_refused(toy, tmp_path, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")  # as torchrun sets it; this process has no process group
    with pytest.raises(ValueError, match="--use_cpu True"):
        runner.run(QuestionAnswering(), train_argv(toy, tmp_path / "no_ddp"))


def test_torchrun_trains_two_cpu_processes_with_ddp_then_both_evaluate(toy, tmp_path):
    torchrun = os.path.join(os.path.dirname(sys.executable), "torchrun")
    if not os.path.isfile(torchrun):
        pytest.skip(f"torchrun not found next to {sys.executable}")
    out = tmp_path / "ddp"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [torchrun, "--standalone", "--nproc_per_node", "2", os.path.join(ROOT, "src", "run_question_answering.py"),
               *train_argv(toy, out, "--use_cpu", "True", "--output_hidden_states_decoder", "True",
                           "--intermediate_loss_fn", "weighted_ce", "--validation_file", toy["train_file"],
                           "--do_eval", "--max_eval_samples", "5", "--max_answer_length", "4",
                           "--deploy_scenario", "True")]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=240)
    if done.returncode != 0 and "errno" in done.stderr.lower() and "socket" in done.stderr.lower():
        pytest.skip(f"torchrun could not open its rendezvous socket here: {done.stderr[-300:]}")
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads((out / "train_results.json").read_text())
    # 2 steps x 4 rows x 2 processes = 16 of the 40 rows: the processes shared the epoch (DDP)
    assert results["train_epoch"] == pytest.approx(0.4)
    assert os.path.isfile(out / "model.safetensors")
    # then each process evaluated its shard of the trained model (saved by process 0 before either loaded it)
    evaluation = json.loads((out / "eval_results.json").read_text())
    assert evaluation["eval_samples"] == 5 and evaluation["eval_samples_per_process"] == [3, 2]
    assert len((out / "eval_predictions.jsonl").read_text().splitlines()) == 5
    shutil.rmtree(out)
