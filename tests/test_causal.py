"""Decoder-only models (Llama, Mistral, Qwen2, Qwen3, Gemma 3, GPT-2) in the early-exit decode loop.

Oracles: HF's own `generate` (the full model, alone and in left-padded batches), HF `generate` of
the model cut to its first e blocks (a static exit at e), a cache-free recomputation of every
layer with HF's own decoder layers (CALM early exit with state propagation), the full model
(self-speculation), and the same row decoded alone (every method in a batch). Sliding windows
are shorter than prompt plus output.
"""

import pytest
import torch

from causal_helpers import (FAMILIES, PAD, WINDOW, cache_free_early_exit, deploy_model, hf_generate, hf_twin,
                            left_padded, prompts, tiny_config)
from models.flops import Shape, decoder_block_flops, head_flops, output_head_flops, prefill_flops
from test_batch import METHODS
from util.additional_args import AdditionalArguments

NEW = 10
LENGTHS = (7, 3, 5)  # with NEW, longer than the sliding window


@pytest.fixture(scope="module")
def models():
    cache = {}

    def get(family, dtype=torch.float64, **flags):
        key = (family, dtype, tuple(sorted(flags.items())))
        if key not in cache:
            cache[key] = deploy_model(tiny_config(family), dtype, **flags)
        return cache[key]

    return get


def new_tokens(out, prompt_width):
    return out[:, prompt_width:]


@pytest.mark.parametrize("family", FAMILIES)
def test_full_model_equals_hf_generate_alone_and_in_a_left_padded_batch(models, family):
    model = models(family)
    reference = hf_twin(model)
    rows = prompts(LENGTHS)
    for row in rows:
        expected = hf_generate(reference, row, max_new_tokens=NEW)
        assert torch.equal(model.generate(input_ids=row, max_new_tokens=NEW), expected)
    ids, mask = left_padded(rows)
    expected = hf_generate(reference, ids, mask, max_new_tokens=NEW)
    got = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=NEW)
    assert torch.equal(got, expected)
    assert len(set(map(tuple, new_tokens(got, ids.shape[1]).tolist()))) == len(rows), "rows should differ"
    stats = model.exit_stats()
    assert stats["block_avg"] == 4.0 and stats["exit_layers"] == [[4] * NEW] * len(rows)
    assert stats["time_prefill"] > 0 and "time_encoder" not in stats


@pytest.mark.parametrize("family", ["llama", "gemma3", "gpt2"])
def test_full_model_equals_hf_generate_in_float32(models, family):
    model = models(family, torch.float32)
    ids, mask = left_padded(prompts(LENGTHS, seed=4))
    expected = hf_generate(hf_twin(model), ids, mask, max_new_tokens=NEW)
    assert torch.equal(model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=NEW), expected)


@pytest.mark.parametrize("family", ["llama", "mistral", "gemma3", "gpt2"])
@pytest.mark.parametrize("layer", [1, 2, 3])
def test_static_exit_equals_the_model_cut_to_its_first_layers(models, family, layer):
    model = models(family)
    rows = prompts(LENGTHS, seed=2)
    ids, mask = left_padded(rows)
    expected = hf_generate(hf_twin(model, num_layers=layer), ids, mask, max_new_tokens=NEW)
    got = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=NEW,
                         exit_args=AdditionalArguments(static_exit_layer=layer))
    assert torch.equal(got, expected)
    stats = model.exit_stats()
    assert stats["block_avg"] == layer and stats["exit_layers"] == [[layer] * NEW] * len(rows)


@pytest.mark.parametrize("family", ["llama", "mistral", "qwen3", "gemma3", "gpt2"])
def test_early_exit_equals_the_cache_free_reference(models, family):
    model = models(family)
    exits_seen = set()
    for threshold, min_layer in [(0.2, 1), (0.4, 2), (0.8, 1)]:
        args = AdditionalArguments(use_early_exit=True, exit_conf_type="softmax", exit_conf_threshold=threshold,
                                   exit_min_layer=min_layer)
        for row in prompts((7, 4), seed=3):
            tokens, exits = cache_free_early_exit(model, row, NEW, threshold, min_layer)
            out = model.generate(input_ids=row, max_new_tokens=NEW, exit_args=args)
            assert new_tokens(out, row.shape[1])[0].tolist() == tokens
            assert model.exit_stats()["exit_layers"][0] == exits
            exits_seen.update(exits)
    assert len(exits_seen) >= 3, "exits do not vary: the comparison would be weak"


@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_block_avg_counts_each_new_token_up_to_its_exit(models, family):
    model = models(family)
    row = prompts((6,), seed=3)[0]
    model.generate(input_ids=row, max_new_tokens=NEW,
                   exit_args=AdditionalArguments(use_early_exit=True, exit_conf_type="softmax", exit_conf_threshold=0.5))
    stats = model.exit_stats()
    exits = stats["exit_layers"][0]
    assert len(exits) == NEW  # the first token's exit layer included
    assert stats["block_avg"] == pytest.approx(sum(exits) / NEW)  # no propagation counted as blocks


@pytest.mark.parametrize("family", ["llama", "qwen2", "gemma3", "gpt2"])
@pytest.mark.parametrize("threshold, draft, vocab", [(0.0, 1, None), (0.0, 3, None), (0.4, 2, None), (0.8, 4, None),
                                                     (0.0, 3, 4), (0.3, 2, 16)])
def test_self_speculation_equals_the_full_model(models, family, threshold, draft, vocab):
    model = models(family)
    ids, mask = left_padded(prompts(LENGTHS, seed=5))
    full = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=NEW)
    args = AdditionalArguments(use_shallow_deep=True, shallow_exit_layer=2, shallow2deep_conf_type="softmax",
                               shallow2deep_conf_threshold=threshold, use_self_speculation=True,
                               max_draft_tokens=draft, draft_vocab_size=vocab)
    got = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=NEW, exit_args=args)
    assert torch.equal(got, full)
    stats = model.exit_stats()
    if threshold == 0.0:
        assert 0 < stats["accepted_tokens"] < stats["drafted_tokens"], "drafts should be accepted and rejected"


# every method of the T5 batch tests, on decoder-only models: each row of a left-padded batch
# decodes as it would alone (tokens, exit layers, block counts, FLOPs, traces)
# (thresholds lowered where these random models are less confident than the trained T5 copy model)
LOWER = {"free": dict(shallow2deep_conf_threshold=0.3), "jsd": dict(exit_conf_threshold=0.2)}
CAUSAL_METHODS = {name: dict(flags, **LOWER.get(name.split("-")[0], {})) for name, flags in METHODS.items()}


def decode(model, args, ids, mask=None, fresh=True):
    if fresh:  # the adaptive threshold's estimator starts anew (else: as the calls before left it)
        model.threshold_estimator = None
    out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=NEW, exit_args=args)
    return out, model.exit_stats()


@pytest.mark.parametrize("family", ["llama", "gemma3"])
@pytest.mark.parametrize("method", CAUSAL_METHODS)
def test_every_row_of_a_left_padded_batch_decodes_as_it_would_alone(models, family, method):
    flags = CAUSAL_METHODS[method]
    model = models(family, **({"use_early_exit": True, "exit_conf_type": "meta"} if "meta" in method else {}))
    args = AdditionalArguments(**flags)
    rows = prompts(LENGTHS, seed=6)
    ids, mask = left_padded(rows)
    out, stats = decode(model, args, ids, mask)
    exits_seen = set()
    model.threshold_estimator = None
    for b, row in enumerate(rows):
        # with the adaptive threshold a batch's rows decode one after another, each at the estimate
        # the rows before it left: so do the rows alone
        expected, alone = decode(model, args, row, fresh=not flags.get("use_adapt_threshold"))
        assert out[b, ids.shape[1]:].tolist() == expected[0, row.shape[1]:].tolist(), f"row {b} tokens"
        assert stats["exit_layers"][b] == alone["exit_layers"][0], f"row {b} exit layers"
        assert stats["rows"][b] == alone["rows"][0], f"row {b} block counts and FLOPs"
        exits_seen.update(alone["exit_layers"][0])
        if "layer_traces" in alone:
            for key in ("ranks", "agrees", "exit_layers"):
                assert stats["layer_traces"][b][key] == alone["layer_traces"][0][key], key
    if method not in ("full", "static", "traces", "self-speculation"):
        assert len(exits_seen) >= 2, "exits do not vary: the comparison would be weak"


@pytest.mark.parametrize("method", ["softmax", "decaying-rerank", "jsd", "free-rollback", "self-speculation", "flops"])
def test_every_row_of_a_left_padded_batch_decodes_as_it_would_alone_float32(models, method):
    model = models("qwen3", torch.float32)
    args = AdditionalArguments(**CAUSAL_METHODS[method])
    rows = prompts(LENGTHS, seed=9)
    ids, mask = left_padded(rows)
    out, stats = decode(model, args, ids, mask)
    for b, row in enumerate(rows):
        expected, alone = decode(model, args, row)
        assert out[b, ids.shape[1]:].tolist() == expected[0, row.shape[1]:].tolist(), f"row {b} tokens"
        assert stats["exit_layers"][b] == alone["exit_layers"][0], f"row {b} exit layers"


def test_flops_count_grouped_query_attention_gated_feed_forward_and_the_prefill(models):
    model = models("gemma3")
    row = prompts((7,), seed=7)[0]
    model.generate(input_ids=row, max_new_tokens=4, exit_args=AdditionalArguments(count_flops=True))
    stats = model.exit_stats()
    d, heads, kv_heads, head_dim, d_ff, V = 32, 4, 2, 8, 64, 48
    shape = Shape(d, heads * head_dim, d_ff, 3, V, 0, kv_inner=kv_heads * head_dim, cross_attention=False)
    windows = [WINDOW, None, WINDOW, None]

    def block(keys):  # q, o over 4 heads; k, v over 2; attention over the keys; a gated feed-forward
        return 2 * d * 32 * 2 + 2 * d * 16 * 2 + 4 * 32 * keys + 2 * d * d_ff * 3

    prefill = sum(block(p if w is None else min(p, w)) for w in windows for p in range(1, 8))
    assert stats["flops_prefill"] == prefill == prefill_flops(shape, 7, windows)
    # new tokens 2..4 feed positions 7, 8, 9 (0-based), attending to 8, 9, 10 keys; every token's head
    blocks = sum(block(k if w is None else min(k, w)) for w in windows for k in (8, 9, 10))
    assert stats["flops_blocks"] == blocks + 4 * output_head_flops(shape)
    assert decoder_block_flops(shape, 8, 0) == block(8)
    assert stats["flops_confidence"] == 0 and head_flops(shape, V) == 2 * d * V + 5 * V


def test_right_padding_is_refused_with_a_clear_error(models):
    model = models("llama")
    ids, mask = left_padded(prompts((5, 3)))
    right = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    with pytest.raises(ValueError, match="left-padded"):
        model.generate(input_ids=ids, attention_mask=right, max_new_tokens=3)


def test_end_tokens_stop_rows_and_pad_after_them(models):
    model = models("llama")
    ids, mask = left_padded(prompts(LENGTHS, seed=8))
    free = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=NEW)
    stop = int(free[0, ids.shape[1] + 2])  # the first row's third new token ends it
    for eos in (stop, [PAD + 1, stop]):
        model.generation_config.eos_token_id = eos
        try:
            out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=NEW)
            expected = hf_twin(model).generate(input_ids=ids, attention_mask=mask, max_new_tokens=NEW,
                                               do_sample=False, pad_token_id=PAD, eos_token_id=eos)
        finally:
            model.generation_config.eos_token_id = None
        assert torch.equal(out, expected)
        assert out.shape[1] <= ids.shape[1] + NEW


def test_model_class_returns_decoder_only_deploy_classes_and_refuses_others():
    from models.deploying_causal import CAUSAL_DEPLOY_CLASSES
    from tasks.runner import model_class

    from models.modeling_causal import TRAIN_CLASSES

    for model_type, (deploy, plain) in CAUSAL_DEPLOY_CLASSES.items():
        assert model_class(training=True, deploy=False, model_type=model_type) is TRAIN_CLASSES[model_type]
        assert model_class(training=False, deploy=True, model_type=model_type) is deploy
        assert model_class(training=False, deploy=False, model_type=model_type) is plain
    with pytest.raises(ValueError, match="llama"):
        model_class(training=False, deploy=True, model_type="falcon")
