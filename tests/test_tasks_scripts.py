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
METHODS = ("full", "static", "softmax", "meta", "state", "decay", "vocab_fixed", "vocab_decaying", "vocab_adaptive",
           "contrastive", "reweight", "jsd", "shallow_deep", "shallow_deep_adaptive")
FLAGS = ("--static_exit_layer", "--exit_conf_type softmax", "--exit_conf_type meta", "--exit_conf_type state",
         "--type_vocab_reduct fixed", "--type_vocab_reduct decaying", "--type_vocab_reduct adaptive",
         "contrastive_decoding", "reweight_contrastive_decoding", "JSD_contrastive_confidence",
         "--use_shallow_deep True", "--use_adapt_threshold True", "--count_flops True", "--deploy_scenario True",
         "--intermediate_loss_fn shallowdeep_kd_dyna")


@pytest.mark.parametrize("name", sorted(SCRIPTS))
def test_script_is_valid_bash_and_runs_its_entry_point_through_the_shared_sections(name):
    path = os.path.join(ROOT, "scripts", name)
    subprocess.run(["bash", "-n", path], check=True)
    text = open(path).read()
    assert f"ENTRY={SCRIPTS[name]}\n" in text
    assert 'source "$(dirname "$0")/common.sh"' in text


def test_shared_sections_offer_every_method_and_flag():
    path = os.path.join(ROOT, "scripts", "common.sh")
    subprocess.run(["bash", "-n", path], check=True)
    text = open(path).read()
    for method in METHODS:
        assert f"\n  {method})" in text, method
    for flag in FLAGS:
        assert flag in text, flag


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
