"""The early-exit decode loop against HF's T5 and against slow cache-free oracles."""

import pytest
import torch

from engine_helpers import (
    EOS,
    copy_inputs,
    deploy_model,
    hf_greedy_without_cache,
    hf_twin,
    output_logits,
    planted_meta_head,
    reference_decode,
    set_flags,
    threshold_rule,
    tiny_config,
    trained_copy_model,
)

ARCHITECTURES = {
    "v1.0-relu-tied": dict(feed_forward_proj="relu"),
    "v1.1-gated-untied": dict(feed_forward_proj="gated-gelu", tie_word_embeddings=False),
}


def random_inputs(seed, count=4, length=7, vocab=64):
    generator = torch.Generator().manual_seed(seed)
    return [torch.randint(2, vocab, (1, length), generator=generator) for _ in range(count)]


@pytest.fixture(scope="module")
def copy_model():
    """Trained for a few seconds: decoder of 4 blocks over an encoder of 2."""
    return trained_copy_model(4)




# ----- full model ------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_full_model_equals_hf_generate(arch):
    model = deploy_model(tiny_config(**ARCHITECTURES[arch]))
    reference = hf_twin(model)
    for input_ids in random_inputs(1):
        expected = reference.generate(input_ids=input_ids, max_new_tokens=12, do_sample=False, num_beams=1)
        assert torch.equal(model.generate(input_ids=input_ids, max_new_tokens=12), expected)
    stats = model.exit_stats()
    assert stats["block_avg"] == 3.0 and stats["block_op"] == [12, 12, 12]


def test_full_model_stops_at_eos_like_hf(copy_model):
    reference = hf_twin(copy_model)
    for input_ids in copy_inputs(2):
        ours = copy_model.generate(input_ids=input_ids, max_new_tokens=20)
        assert ours[0, -1].item() == EOS  # the copy model learnt to stop
        assert torch.equal(ours, hf_greedy_without_cache(reference, input_ids, 20))


def test_encoder_and_decoder_of_different_depths_equal_hf_forward():
    # HF's generate cannot run this shape (its cache is sized by the encoder depth).
    model = deploy_model(tiny_config(num_layers=2, num_decoder_layers=5))
    reference = hf_twin(model)
    for input_ids in random_inputs(3):
        assert torch.equal(model.generate(input_ids=input_ids, max_new_tokens=10),
                           hf_greedy_without_cache(reference, input_ids, 10))


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_full_model_equals_hf_generate_in_other_dtypes(dtype):
    model = deploy_model(tiny_config()).to(dtype)
    reference = hf_twin(model)
    for input_ids in random_inputs(4):
        expected = reference.generate(input_ids=input_ids, max_new_tokens=10, do_sample=False, num_beams=1)
        assert torch.equal(model.generate(input_ids=input_ids, max_new_tokens=10), expected)


def test_max_length_counts_the_start_token_like_hf():
    model = deploy_model(tiny_config())
    input_ids = random_inputs(5, count=1)[0]
    assert model.generate(input_ids=input_ids, max_length=6).shape == (1, 6)
    assert model.generate(input_ids=input_ids).shape == (1, 20)  # HF's default max_length


def test_threshold_one_never_exits(copy_model):
    set_flags(copy_model, use_early_exit=True, exit_conf_type="softmax", exit_conf_threshold=1.0)
    reference = hf_twin(copy_model)
    for input_ids in copy_inputs(6, count=3):
        assert torch.equal(copy_model.generate(input_ids=input_ids, max_new_tokens=20),
                           hf_greedy_without_cache(reference, input_ids, 20))
        assert copy_model.exit_stats()["block_avg"] == 4.0


# ----- batches -----------------------------------------------------------------------------


def test_batch_rows_decode_as_they_would_alone(copy_model):
    set_flags(copy_model, use_early_exit=True, exit_conf_type="softmax", exit_conf_threshold=0.5)
    short, long = copy_inputs(7, count=2)
    short = short[:, :3]
    batch = torch.zeros((2, 5), dtype=torch.long)
    mask = torch.zeros((2, 5), dtype=torch.long)
    batch[0, :3], mask[0, :3] = short[0], 1
    batch[1], mask[1] = long[0], 1
    out = copy_model.generate(input_ids=batch, attention_mask=mask, max_new_tokens=20)
    batch_exits = copy_model.exit_stats()["exit_layers"]
    for row, alone in enumerate([short, long]):
        expected = copy_model.generate(input_ids=alone, max_new_tokens=20)
        width = expected.shape[1]
        assert torch.equal(out[row : row + 1, :width], expected)
        assert (out[row, width:] == 0).all()  # padded after EOS, as HF pads finished rows
        assert batch_exits[row] == copy_model.exit_stats()["exit_layers"][0]


# ----- static exit -------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ARCHITECTURES)
@pytest.mark.parametrize("layer", [1, 2])
def test_static_exit_equals_cache_free_reference(arch, layer):
    model = deploy_model(tiny_config(**ARCHITECTURES[arch]), static_exit_layer=layer)
    never = lambda *_: False  # noqa: E731
    for input_ids in random_inputs(8, count=3):
        out = model.generate(input_ids=input_ids, max_new_tokens=10)
        shallow = _truncated(model, layer)
        tokens, _ = reference_decode(shallow, input_ids, 10, never)
        assert out[0].tolist() == tokens
        assert model.exit_stats()["block_avg"] == layer
        assert model.exit_stats()["block_op"] == [10] * layer + [0] * (3 - layer)


def _truncated(model, layers):
    """A copy of the model whose decoder has only its first `layers` blocks."""
    twin = hf_twin(model)
    twin.decoder.block = twin.decoder.block[:layers]
    return twin


# ----- early exit: mixed exits against the slow oracle --------------------------------------


@pytest.mark.parametrize(
    "conf_type, threshold, min_layer",
    [("softmax", 0.9, 1), ("softmax", 0.6, 2), ("state", 0.92, 1), ("meta", 0.5, 1)],
)
def test_mixed_exits_equal_slow_reference(copy_model, conf_type, threshold, min_layer):
    model = copy_model.to(torch.float64)  # far from threshold ties: shapes differ from the oracle's
    try:
        if conf_type == "meta":
            model.cm_head = planted_meta_head(model)
        set_flags(model, use_early_exit=True, exit_conf_type=conf_type, exit_conf_threshold=threshold,
                  exit_min_layer=min_layer)
        reference = hf_twin(model)
        reference.cm_head = getattr(model, "cm_head", None)
        rule = threshold_rule(reference, conf_type, threshold, min_layer)
        seen_layers = set()
        for input_ids in copy_inputs(9):
            out = model.generate(input_ids=input_ids, max_new_tokens=12)
            exits = model.exit_stats()["exit_layers"][0]
            tokens, expected_exits = reference_decode(reference, input_ids, 12, rule)
            assert out[0].tolist() == tokens
            assert exits == expected_exits
            assert model.exit_stats()["block_avg"] == pytest.approx(sum(exits) / len(exits))
            seen_layers.update(exits)
        assert len(seen_layers) >= 2, f"exits never varied ({seen_layers}): the test would prove nothing"
        assert min(seen_layers) >= min_layer
    finally:
        copy_model.to(torch.float32)
        if hasattr(copy_model, "cm_head"):
            del copy_model.cm_head


def test_lazy_and_eager_state_propagation_agree(copy_model):
    set_flags(copy_model, use_early_exit=True, exit_conf_type="softmax", exit_conf_threshold=0.8)
    for input_ids in copy_inputs(10, count=3):
        lazy = copy_model.generate(input_ids=input_ids, max_new_tokens=12)
        lazy_exits = copy_model.exit_stats()["exit_layers"]
        eager = copy_model.generate(input_ids=input_ids, max_new_tokens=12, lazy_propagation=False)
        assert torch.equal(lazy, eager)
        assert lazy_exits == copy_model.exit_stats()["exit_layers"]


def test_position_decay_lowers_the_threshold_over_steps(copy_model):
    from models.decode_loop import ExitPolicy
    from util.additional_args import AdditionalArguments

    args = AdditionalArguments(use_early_exit=True, exit_conf_type="softmax", exit_conf_threshold=0.8,
                               exit_position_temp=2.0)
    policy = ExitPolicy.from_args(args, 4)
    assert policy.threshold_at(0, 10) == pytest.approx(0.8)
    assert policy.threshold_at(10, 10) == pytest.approx(0.72 + 0.08 * torch.exp(torch.tensor(-2.0)).item())
    assert policy.threshold_at(5, 10) < policy.threshold_at(4, 10)


def test_block_avg_and_stats_are_consistent(copy_model):
    set_flags(copy_model, use_early_exit=True, exit_conf_type="softmax", exit_conf_threshold=0.7)
    copy_model.generate(input_ids=copy_inputs(11, count=1)[0], max_new_tokens=12)
    stats = copy_model.exit_stats()
    exits = stats["exit_layers"][0]
    assert stats["tokens"] == len(exits)
    assert stats["block_avg"] == pytest.approx(sum(exits) / len(exits))
    assert stats["block_op"] == [sum(e >= layer for e in exits) for layer in range(1, 5)]
    assert sum(stats["exit_layer_counts"]) == len(exits)
    timed = sum(stats[f"time_{name}"] for name in ("encoder", "blocks", "confidence", "head", "propagation"))
    assert 0 < timed <= stats["time_total"]


def test_output_head_on_the_last_block_reproduces_the_models_logits():
    model = deploy_model(tiny_config(feed_forward_proj="gated-gelu", tie_word_embeddings=False))
    captured = []
    model.decoder.block[-1].register_forward_hook(lambda module, args, out: captured.append(out[0]))
    out = model(input_ids=random_inputs(12, count=1)[0], decoder_input_ids=torch.tensor([[0, 5, 9]]))
    # on CPU several positions go through models.projection's (W x^T)^T: equal up to summation order
    torch.testing.assert_close(output_logits(model, captured[0]), out.logits, rtol=1e-5, atol=1e-5)


# ----- plotting_logits: per-layer traces -------------------------------------------------------


@torch.no_grad()
def test_layer_traces_decode_the_full_model_and_match_hf_hidden_states(copy_model):
    input_ids = copy_inputs(12, count=1)[0]
    set_flags(copy_model)
    full = copy_model.generate(input_ids=input_ids, max_new_tokens=12)
    set_flags(copy_model, use_early_exit=True, exit_conf_type="softmax", exit_conf_threshold=0.8, plotting_logits=True)
    traced = copy_model.generate(input_ids=input_ids, max_new_tokens=12)
    assert torch.equal(traced, full)
    trace = copy_model.exit_stats()["layer_traces"][0]
    out = copy_model(input_ids=input_ids, decoder_input_ids=full[:, :-1], output_hidden_states=True)
    raw = list(out.decoder_hidden_states[1:-1])  # blocks 1..L-1; block L's own output gives out.logits
    for t, final in enumerate(full[0, 1:].tolist()):
        for layer in range(1, 5):
            logits = output_logits(copy_model, raw[layer - 1])[0, t] if layer < 4 else out.logits[0, t]
            assert trace["ranks"][t][layer - 1] == int((logits > logits[final]).sum())
            assert trace["agrees"][t][layer - 1] == (int(logits.argmax()) == final)
            assert trace["max_probs"][t][layer - 1] == pytest.approx(logits.softmax(-1).max().item(), rel=1e-5)
        assert trace["ranks"][t][-1] == 0 and trace["agrees"][t][-1]
        confidences = trace["confidences"][t]
        assert confidences[-1] != confidences[-1]  # NaN: no confidence at the last layer
        expected_exit = next((layer for layer in range(1, 4) if confidences[layer - 1] > 0.8), 4)
        assert trace["exit_layers"][t] == expected_exit
    assert copy_model.exit_stats()["block_avg"] == 4  # every layer really ran
