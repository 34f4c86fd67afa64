"""Confidence measures against values computed by hand."""

import math

import pytest
import torch

from engine_helpers import deploy_model, tiny_config
from models.confidence import (
    build_meta_head,
    meta_confidence,
    softmax_confidence,
    softmax_confidence_values,
    state_confidence,
    top2_gap,
)
from models.decode_loop import scaled_norm
from models.layer_scorer import LayerScorer
from util.additional_args import AdditionalArguments


def test_softmax_confidence_is_the_top2_probability_gap():
    logits = torch.tensor([[math.log(6.0), math.log(3.0), 0.0]])  # probabilities 0.6, 0.3, 0.1
    assert softmax_confidence(logits).item() == pytest.approx(0.3)


def test_softmax_confidence_of_a_tie_is_zero_and_of_a_certain_token_is_one():
    assert softmax_confidence(torch.tensor([2.0, 2.0, -1.0])).item() == 0.0
    assert softmax_confidence(torch.tensor([0.0, -1e4, -1e4])).item() == pytest.approx(1.0)


def test_softmax_confidence_is_computed_in_float32_for_half_models():
    logits = torch.tensor([[math.log(6.0), math.log(3.0), 0.0]], dtype=torch.bfloat16)
    confidence = softmax_confidence(logits)
    assert confidence.dtype == torch.float32
    assert confidence.item() == pytest.approx(0.3, abs=1e-2)


def test_top2_gap_of_a_single_entry_is_that_entry():
    assert top2_gap(torch.tensor([1.0])).item() == 1.0


def test_the_decode_loops_float_softmax_confidences_equal_the_tensor_measure():
    # the hand-computed cases first: a gap of 0.3, a tie, a certain token, a one-token distribution,
    # and -inf scores (a row's positions past its own retained size) that take no mass
    assert softmax_confidence_values(torch.tensor([[math.log(6.0), math.log(3.0), 0.0]])) == pytest.approx([0.3])
    assert softmax_confidence_values(torch.tensor([[2.0, 2.0, -1.0], [0.0, -1e4, -1e4]])) == pytest.approx([0.0, 1.0])
    assert softmax_confidence_values(torch.tensor([[3.0]])) == [1.0]
    assert softmax_confidence_values(torch.tensor([[math.log(6.0), math.log(3.0), 0.0, float("-inf")]])) \
        == pytest.approx([0.3])
    generator = torch.Generator().manual_seed(0)
    for dtype in (torch.float32, torch.float64, torch.bfloat16):
        for _ in range(10):
            logits = (torch.randn(4, 50, generator=generator) * 3).to(dtype)
            values = softmax_confidence_values(logits)
            assert all(isinstance(v, float) for v in values)
            assert values == pytest.approx(softmax_confidence(logits).tolist(), abs=1e-7)


@pytest.mark.parametrize("version", [dict(), dict(feed_forward_proj="gated-gelu", tie_word_embeddings=False)],
                         ids=["v1.0-scaled", "v1.1-unscaled"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_scorers_fused_norm_equals_the_models_final_norm_and_output_scaling(version, dtype):
    model = deploy_model(tiny_config(**version)).to(dtype)
    with torch.no_grad():
        model.decoder.final_layer_norm.weight.uniform_(0.5, 2.0)  # not the all-ones initial weight
    scorer = LayerScorer(model, AdditionalArguments(use_early_exit=True), "softmax")
    hidden = (torch.randn(1, 3, model.config.d_model, generator=torch.Generator().manual_seed(1)) * 4).to(dtype)
    reference = scaled_norm(model, hidden)
    tolerance = 1e-6 if dtype == torch.float32 else 2e-2  # one rounding step of the dtype
    torch.testing.assert_close(scorer.normed(hidden), reference, rtol=tolerance, atol=tolerance)
    assert scorer.normed(hidden).requires_grad is False


def test_state_confidence_is_the_cosine_of_consecutive_states():
    current = torch.tensor([[1.0, 0.0]])
    assert state_confidence(current, torch.tensor([[1.0, 1.0]])).item() == pytest.approx(1 / math.sqrt(2))
    assert state_confidence(current, torch.tensor([[-2.0, 0.0]])).item() == pytest.approx(-1.0)


def test_meta_confidence_is_the_exit_probability_of_the_head():
    head = build_meta_head(2)
    with torch.no_grad():
        head[0].weight.copy_(torch.eye(2))
        head[0].bias.zero_()
        head[2].weight.copy_(torch.tensor([[0.0, 0.0], [1.0, 0.0]]))
        head[2].bias.zero_()
    # stay logit 0, exit logit relu(x0) = 2: P(exit) = e^2 / (1 + e^2)
    assert meta_confidence(head, torch.tensor([[2.0, -5.0]])).item() == pytest.approx(math.exp(2) / (1 + math.exp(2)))
