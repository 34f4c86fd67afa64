"""Defects of the single-row loop that the batched loop fixes (issue 13, items 4, 7, 9, 10)."""

import pytest
import torch

from engine_helpers import copy_inputs, trained_copy_model
from models import flops as F
from util.additional_args import AdditionalArguments

L = 4


@pytest.fixture(scope="module")
def copy_model():
    return trained_copy_model(L, torch.float64)


def run(model, input_ids, **flags):
    model.threshold_estimator = None
    model.generate(input_ids=input_ids, max_new_tokens=12, exit_args=AdditionalArguments(**flags))
    return model.exit_stats()


def test_rollback_truncates_every_per_token_statistic(copy_model):
    flags = dict(use_shallow_deep=True, shallow_exit_layer=3, shallow2deep_conf_type="JSD_contrastive_confidence",
                 shallow2deep_conf_threshold=0.05, rollback_conf_threshold=0.01, render_jsds=True)
    rolled = 0
    for input_ids in copy_inputs(3, count=4):
        stats = run(copy_model, input_ids, **flags)
        rolled += stats["rollbacks"]
        assert stats["shallow_tokens"] + stats["deep_tokens"] == stats["tokens"] == len(stats["exit_layers"][0])
        assert len(stats["jsd_steps"][0]) == stats["tokens"]
    assert rolled > 0, "no rollback happened: the test would prove nothing"


@pytest.mark.parametrize("conf_type, per_check", [("state", lambda s: 6 * s.d_model),
                                                  ("meta", lambda s: 2 * s.d_model ** 2 + 4 * s.d_model)])
def test_meta_and_state_under_reduction_compute_no_head_while_no_token_exits(copy_model, conf_type, per_check):
    if conf_type == "meta":
        from models.confidence import build_meta_head
        copy_model.cm_head = build_meta_head(copy_model.config.d_model).to(torch.float64)
    input_ids = copy_inputs(4, count=1)[0]
    stats = run(copy_model, input_ids, use_early_exit=True, exit_conf_type=conf_type, exit_conf_threshold=1.0,
                type_vocab_reduct="fixed", vocab_k_max=8, vocab_k_min=3, count_flops=True)
    shape = F.Shape.of(copy_model.config)
    assert set(stats["exit_layers"][0]) == {L}
    assert stats["flops_confidence"] == stats["tokens"] * (L - 1) * per_check(shape)


def test_meta_under_reduction_counts_the_start_head_and_the_exit_layers_reduced_head(copy_model):
    from models.confidence import build_meta_head
    torch.manual_seed(3)
    copy_model.cm_head = build_meta_head(copy_model.config.d_model).to(torch.float64)
    with torch.no_grad():
        copy_model.cm_head[2].weight.mul_(20.0)
    input_ids = copy_inputs(4, count=1)[0]
    stats = run(copy_model, input_ids, use_early_exit=True, exit_conf_type="meta", exit_conf_threshold=0.01,
                exit_min_layer=1, type_vocab_reduct="fixed", vocab_k_max=8, vocab_k_min=8, count_flops=True)
    shape = F.Shape.of(copy_model.config)
    exits = stats["exit_layers"][0]
    assert len(set(exits)) >= 2
    meta = 2 * shape.d_model ** 2 + 4 * shape.d_model
    checks = sum(min(e, L - 1) for e in exits) * meta
    heads = sum(F.head_flops(shape, shape.vocab_size) + (F.head_flops(shape, 8) if e > 1 else 0)
                for e in exits if e < L)
    assert stats["flops_confidence"] == checks + heads


def test_trace_mode_counts_every_layers_head(copy_model):
    input_ids = copy_inputs(4, count=1)[0]
    stats = run(copy_model, input_ids, plotting_logits=True, count_flops=True)
    shape = F.Shape.of(copy_model.config)
    tokens = stats["tokens"]
    # the softmax check at layers 1..L-1 (the diagnostics measure) and the traced head of each layer
    assert stats["flops_confidence"] == 2 * tokens * (L - 1) * F.head_flops(shape, shape.vocab_size)
    plain = run(copy_model, input_ids, count_flops=True)
    assert stats["flops_blocks"] == plain["flops_blocks"]  # the last layer's head counted as the output head
