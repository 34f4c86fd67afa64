"""The run_*.sh scripts: valid bash, every method offered, and one complete train-then-evaluate run."""

import json
import os
import subprocess
import sys

import pytest

from util.toy_models import build_toy_t5, train_toy_tokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPTS = {
    "run_qa_squad.sh": "src/run_question_answering.py",
    "run_sum_samsum.sh": "src/run_summarization.py",
    "run_sum_cnndm.sh": "src/run_summarization.py",
    "run_sum_xsum.sh": "src/run_summarization.py",
    "run_sum_multinews.sh": "src/run_summarization.py",
    "run_sum_bigpatent.sh": "src/run_summarization.py",
    "run_tr_iwslt.sh": "src/run_translation.py",
}
FLAGS = ("--count_flops True", "--deploy_scenario True", "--intermediate_loss_fn shallowdeep_kd_dyna",
         "src/util/methods.py")


@pytest.mark.parametrize("name", sorted(SCRIPTS))
def test_script_is_valid_bash_and_runs_its_entry_point_through_the_shared_sections(name):
    path = os.path.join(ROOT, "scripts", name)
    subprocess.run(["bash", "-n", path], check=True)
    text = open(path).read()
    assert f"ENTRY={SCRIPTS[name]}\n" in text
    assert 'source "$(dirname "$0")/common.sh"' in text


def test_shared_sections_read_the_method_table_and_offer_every_flag():
    path = os.path.join(ROOT, "scripts", "common.sh")
    subprocess.run(["bash", "-n", path], check=True)
    text = open(path).read()
    for flag in FLAGS:
        assert flag in text, flag
    assert "--exit_conf_type" not in text  # no second list of methods in the shell


@pytest.mark.parametrize("method, expected", [
    ("full", []),
    ("static", ["--static_exit_layer", "5"]),
    ("vocab_decaying_rerank", ["--use_early_exit", "True", "--exit_conf_type", "softmax", "--exit_conf_threshold",
                               "0.7", "--exit_min_layer", "3", "--type_vocab_reduct", "decaying",
                               "--vocab_rerank", "True"]),
    ("shallow_deep_adaptive", ["--use_shallow_deep", "True", "--shallow_exit_layer", "2", "--shallow2deep_conf_type",
                               "softmax", "--shallow2deep_conf_threshold", "0.7", "--use_adapt_threshold", "True"]),
])
def test_a_script_passes_the_tables_arguments_of_its_method(tmp_path, method, expected):
    """PYTHON is a stub that runs the table for real and records what the entry point would get."""
    stub = tmp_path / "python"
    recorded = tmp_path / "args.txt"
    stub.write_text(f'#!/bin/bash\nif [ "$1" = src/util/methods.py ]; then exec {sys.executable} "$@"; fi\n'
                    f'printf "%s\\n" "$@" > {recorded}\n')
    stub.chmod(0o755)
    env = dict(os.environ, PYTHON=str(stub), DO_TRAIN="false", MODEL="m", METHOD=method, THRESHOLD="0.7",
               MIN_LAYER="3", STATIC_LAYER="5", SHALLOW_LAYER="2", VALIDATION_FILE="dev.jsonl")
    done = subprocess.run(["bash", os.path.join(ROOT, "scripts", "run_sum_samsum.sh")], env=env,
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    argv = recorded.read_text().splitlines()
    start = argv.index("True", argv.index("--deploy_scenario")) + 1
    assert argv[start:] == expected


def test_every_method_of_the_table_is_valid_and_the_demo_and_sweep_read_it():
    import demo
    import run_sweep
    from transformers import T5Config
    from util import methods
    from util.additional_args import AdditionalArguments, update_autoconfig

    for name in methods.METHODS:
        flags = methods.method_flags(name, min_layer=3, static_layer=6, shallow_layer=4)
        update_autoconfig(T5Config(num_layers=2, num_decoder_layers=24), AdditionalArguments(**flags))
    rows = dict(demo.method_rows(6))
    assert rows["JSD contrastive 0.9"] == {"use_early_exit": True, "exit_conf_type": "JSD_contrastive_confidence",
                                           "exit_conf_threshold": 0.9, "exit_min_layer": 3}
    assert rows["FREE shallow-deep, layer 2, softmax 0.9"] == methods.method_flags("shallow_deep", shallow_layer=2)
    assert run_sweep.REDUCTIONS == tuple(methods.REDUCTIONS)
    with pytest.raises(ValueError, match="unknown METHOD=fastest"):
        methods.method_flags("fastest")


def test_unknown_method_is_refused():
    env = dict(os.environ, DO_TRAIN="false", METHOD="fastest")
    done = subprocess.run(["bash", os.path.join(ROOT, "scripts", "run_tr_iwslt.sh")], env=env,
                          capture_output=True, text=True)
    assert done.returncode == 2
    assert "unknown METHOD=fastest" in done.stderr


def test_samsum_script_trains_then_evaluates_offline(tmp_path):
    rows = [{"dialogue": f"Ann: do you like cake {i}? Bob: yes cake {i}.", "summary": f"Bob likes cake {i}."}
            for i in range(6)]
    data = tmp_path / "samsum.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    model = str(tmp_path / "model")
    build_toy_t5(train_toy_tokenizer([r["dialogue"] + " " + r["summary"] + " summarize:" for r in rows], 150),
                 save_dir=model)
    out = tmp_path / "run"
    env = dict(os.environ, PYTHON=sys.executable, MODEL=model, OUTPUT_DIR=str(out), TRAIN_FILE=str(data),
               VALIDATION_FILE=str(data), METHOD="static", STATIC_LAYER="1", OMP_NUM_THREADS="1")
    extra = ["--max_steps", "2", "--warmup_steps", "0", "--save_strategy", "no", "--max_eval_samples", "2",
             "--max_source_length", "32", "--max_target_length", "8", "--disable_tqdm", "True"]
    done = subprocess.run(["bash", os.path.join(ROOT, "scripts", "run_sum_samsum.sh"), *extra], env=env,
                          cwd=str(tmp_path), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    trained = json.loads((out / "all_results.json").read_text())
    assert trained["train_samples"] == 6 and trained["eval_samples"] == 2 and "eval_rougeLsum" in trained
    assert (out / "model.safetensors").is_file()
    evaluated = json.loads((out / "eval" / "static" / "eval_results.json").read_text())
    assert evaluated["eval_block_avg"] == 1.0
    assert evaluated["eval_block_op"] == [evaluated["eval_tokens"], 0]
    config = json.loads((out / "eval" / "static" / "run_config.json").read_text())
    assert config["model_args"]["model_name_or_path"] == str(out)
    assert config["data_args"]["text_column"] == "dialogue"
