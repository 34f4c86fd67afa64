"""Confidence measures against values computed by hand."""

import math

import pytest
import torch

from models.confidence import build_meta_head, meta_confidence, softmax_confidence, state_confidence, top2_gap


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
