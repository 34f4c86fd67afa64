"""src/real_llm.py's diagnostics on a tiny random Gemma 3 (in memory), against slow re-computations."""

import json
import math
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from transformers import Gemma3ForCausalLM, Gemma3TextConfig

import real_llm
from models.vocab_reduction import schedule
from util.toy_models import train_toy_tokenizer

ROOT = Path(__file__).resolve().parent.parent
WORDS = ("the river flows past the old mill and the miller counts his sacks of grain while "
         "der Fluss fliesst am alten Muehlrad vorbei und der Mueller zaehlt seine Saecke").split()


def tiny_gemma3(num_layers=5, vocab=120, softcap=None):
    config = Gemma3TextConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=num_layers,
                              num_attention_heads=2, num_key_value_heads=1, head_dim=16, sliding_window=4,
                              final_logit_softcapping=softcap)
    torch.manual_seed(0)
    model = Gemma3ForCausalLM(config).eval()
    with torch.no_grad():  # random norms at zero would make every layer's read-out alike
        for param in model.parameters():
            if param.dim() == 1:
                param.normal_(0, 0.5)
    return model


@pytest.mark.parametrize("softcap", [None, 5.0])
def test_read_out_of_the_last_layer_is_the_models_logits(softcap):
    """HF's last hidden state is normed already: norming it again would change z_L."""
    model = tiny_gemma3(softcap=softcap)
    ids = torch.tensor([[2, 5, 9, 14, 3, 7]])
    with torch.no_grad():
        out = model(ids, output_hidden_states=True)
        torch.testing.assert_close(real_llm.layer_logits(model, out.hidden_states, 5), out.logits, rtol=0, atol=0)
        # an earlier layer: the model cut to its first 2 layers gives these logits (static exit)
        cut = tiny_gemma3(softcap=softcap)
        cut.model.layers = cut.model.layers[:2]
        cut.config.num_hidden_layers = 2
        cut.config.layer_types = cut.config.layer_types[:2]
        torch.testing.assert_close(real_llm.layer_logits(model, out.hidden_states, 2), cut(ids).logits)


def slow_jsd(p_logits, q_logits):
    p, q = F.softmax(p_logits.double(), -1), F.softmax(q_logits.double(), -1)
    m = (p + q) / 2
    kl = lambda a, b: sum(float(x) * math.log(float(x) / float(y)) for x, y in zip(a, b) if x > 0)
    return 0.5 * kl(p, m) + 0.5 * kl(q, m)


def test_text_records_against_slow_recomputation():
    model = tiny_gemma3()
    ids = torch.tensor([[2, 5, 9, 14, 3, 7, 11]])
    rec = real_llm.text_records(model, ids, alpha=0.1)
    with torch.no_grad():
        states = model(ids, output_hidden_states=True).hidden_states
        logits = [None] + [real_llm.layer_logits(model, states, layer)[0] for layer in range(1, 6)]
    final = logits[5].argmax(-1)
    assert (rec["ranks"][:, 4] == 0).all() and rec["agrees"][:, 4].all()
    for t in range(7):
        for layer in (1, 3):
            order = logits[layer][t].argsort(descending=True).tolist()
            assert rec["ranks"][t, layer - 1] == order.index(int(final[t]))
            probs = sorted(F.softmax(logits[layer][t].double(), -1).tolist(), reverse=True)
            assert rec["confidences"][t, layer - 1] == pytest.approx(probs[0] - probs[1], abs=1e-6)
        probs = F.softmax(logits[5][t].double(), -1)
        head = (probs >= 0.1 * probs.max()).nonzero().flatten()
        for layer in (2, 3, 4):
            expected = slow_jsd(logits[5][t, head], logits[layer][t, head]) / (5 - layer)
            assert rec["jsd"][t, layer - 1] == pytest.approx(expected, abs=1e-6)
        assert math.isnan(rec["jsd"][t, 0]) and math.isnan(rec["jsd"][t, 4])  # not candidates
    for t in range(6):
        target = int(ids[0, t + 1])
        assert rec["next_correct"][t, 2] == (int(logits[3][t].argmax()) == target)
        assert rec["next_ce"][t, 2] == pytest.approx(-float(F.log_softmax(logits[3][t].double(), -1)[target]), abs=1e-5)


def test_reduced_sizes_follow_the_schedule():
    args = real_llm.RealLLMArguments(vocab_k_max=500, vocab_k_min=20, exit_min_layer=1)
    confidences = np.array([[0.0, 1.0, 0.5, 0.2, 0.0, 0.0], [1.0, 0.0, 0.5, 0.2, 0.0, 0.0]])
    sizes = real_llm.reduced_sizes(args, 6, 1000, confidences)
    k_start = schedule(1, 6, 500, 20, 1000)
    assert sizes["full"] == [1000] * 5
    assert [s[0] for s in sizes.values()] == [1000] * 4  # the start layer scores the full head
    assert sizes["fixed"][1:] == [k_start] * 4
    assert sizes["decaying"][1:] == [schedule(layer, 6, 500, 20, k_start) for layer in range(2, 6)]
    # layer 2 adapts to layer 1's confidences 0 and 1: k_start and max(k_min, ceil(0.1 k_start))
    assert sizes["adaptive"][1] == (k_start + max(20, math.ceil(k_start * (1 - 0.9)))) / 2


def test_layer_flops_by_hand():
    config = tiny_gemma3(num_layers=6).config  # d 32, 2 query heads and 1 key-value head of 16, d_ff 64, window 4
    projections = 2 * 32 * 32 * 2 + 2 * 32 * 16 * 2
    feed_forward = 3 * 2 * 32 * 64
    assert config.layer_types[0] == "sliding_attention"
    assert real_llm.layer_flops(config, 1, 10) == projections + 4 * 32 * 4 + feed_forward  # window: 4 positions
    full = config.layer_types.index("full_attention") + 1
    assert real_llm.layer_flops(config, full, 10) == projections + 4 * 32 * 10 + feed_forward


def fake_data(folder: Path, texts: int) -> Path:
    squad = {"data": [{"paragraphs": [{"context": " ".join(WORDS[i:] + WORDS[:i]), "qas": []}]} for i in range(texts)]}
    (folder / "squad_v1.1").mkdir(parents=True)
    with zipfile.ZipFile(folder / "squad_v1.1" / "dev-v1.1.json.zip", "w") as archive:
        archive.writestr("dev-v1.1.json", json.dumps(squad))
    (folder / "wmt22").mkdir()
    rows = [{"src": " ".join(WORDS[i:i + 5]), "tgt": "x", "direction": "de2en"} for i in range(0, 25, 2)]
    (folder / "wmt22" / "test.de-en.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return folder


def test_diagnostics_end_to_end_on_a_tiny_model(tmp_path, monkeypatch):
    tokenizer = train_toy_tokenizer([" ".join(WORDS)] * 3, vocab_size=120)
    model = tiny_gemma3()
    data = fake_data(tmp_path / "data", texts=2)
    args = real_llm.RealLLMArguments(squad_texts=2, wmt_texts=2, text_tokens=8, timing_rounds=1, vocab_k_max=60,
                                     vocab_k_min=10, data_dir=str(data), plots_dir=str(tmp_path / "plots"))
    files = real_llm.check_arguments(args)
    result = real_llm.run_diagnostics(model, tokenizer, args, files)
    assert result["texts"] == {"squad": 2, "wmt22": 2}
    pooled = result["summary"]["pooled"]
    assert pooled["tokens"] == 32 and pooled["per_layer"][-1]["accuracy"] == 1.0
    assert len(result["cost"]["per_layer"]) == 4  # layers 1..L-1 are checked
    assert sorted(p.name for p in (tmp_path / "plots").iterdir()) == [
        "calibration.png", "confidence_cost.png", "jsd_heatmap_squad.png", "jsd_heatmap_wmt22.png",
        "ranks_per_layer.png", "static_exit_next_token.png"]
    assert "| 5 | 1.000 | 0 |" in real_llm.diagnostics_markdown(result)
    json.dumps(real_llm._json_safe(result), allow_nan=False)


def test_bad_flags_are_one_line_errors_before_the_model_loads(tmp_path):
    with pytest.raises(ValueError, match="--parts nope: unknown part"):
        real_llm.check_arguments(real_llm.RealLLMArguments(parts="nope"))
    with pytest.raises(ValueError, match=r"--data_dir .*squad_v1.1/dev-v1.1.json.zip does not exist"):
        real_llm.check_arguments(real_llm.RealLLMArguments(data_dir=str(tmp_path)))
    with pytest.raises(ValueError, match="--qa_draft_vocab must be 0"):
        real_llm.check_arguments(real_llm.RealLLMArguments(qa_draft_vocab=1))
    with pytest.raises(ValueError, match="--text_tokens must be at least 4"):
        real_llm.check_arguments(real_llm.RealLLMArguments(text_tokens=2))
    done = subprocess.run([sys.executable, str(ROOT / "src/real_llm.py"), "--squad_texts", "0"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines()[-1] == "error: --squad_texts must be at least 1, got 0."
