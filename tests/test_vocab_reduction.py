"""Vocabulary reduction of the LM head and FLOP accounting."""

import pytest
import torch

from engine_helpers import (
    copy_inputs,
    set_flags,
    trained_copy_model,
)
from models import flops as F
from models.layer_scorer import LayerScorer
from models.vocab_reduction import RetainedSets, adaptive_size, schedule
from reduction_helpers import RetainedSetCheck

MODES = ("fixed", "decaying", "adaptive")


@pytest.fixture(scope="module")
def copy_model():
    return trained_copy_model(4, torch.float64)  # no near-ties between permuted sums




def decode_all(model, inputs, **flags):
    set_flags(model, **flags)
    outputs = []
    for input_ids in inputs:
        out = model.generate(input_ids=input_ids, max_new_tokens=12)
        outputs.append((out[0].tolist(), model.exit_stats()["exit_layers"][0]))
    return outputs


# ----- the schedule ----------------------------------------------------------------------------


def test_schedule_matches_the_published_t5_large_values():
    assert schedule(7, 24, 35000, 250, 32128) == 842
    assert schedule(2, 24, 35000, 250, 32128) == 2781
    assert schedule(24, 24, 35000, 250, 32128) == 250 + 0 * 1  # floor(35000 / 140) = 250 = k_min


def test_schedule_is_exact_where_floating_point_floors_one_too_low():
    # each quotient is an exact integer: k_max k_min L / (k_min L + (k_max - k_min) i)
    assert 5000 * 1000 * 12 == 1875 * (1000 * 12 + 4000 * 5)
    assert schedule(5, 12, 5000, 1000, 32128) == 1875  # the float formula gives 1874
    assert 8000 * 300 * 7 == 960 * (300 * 7 + 7700 * 2)
    assert schedule(2, 7, 8000, 300, 32128) == 960  # the float formula gives 959
    assert schedule(1, 24, 1000, 500, 32128) == 960


def test_schedule_is_clipped_to_the_vocabulary_and_floored_at_k_min():
    assert schedule(0, 24, 35000, 250, 32128) == 32128
    assert schedule(1, 4, 35000, 250, 100) == 100
    assert schedule(24, 24, 1000, 900, 32128) == 900


def test_adaptive_keeps_fewer_tokens_as_confidence_rises():
    sizes = [adaptive_size(1000, 250, 0.9, c) for c in (0.0, 0.25, 0.5, 0.75, 1.0)]
    assert sizes == [1000, 775, 550, 325, 250]


# ----- the retained set -------------------------------------------------------------------------


def test_retained_tokens_are_the_best_scores_in_score_order_not_the_lowest_ids():
    weight = torch.randn(10, 4)
    logits = torch.tensor([[0.0, 1.0, 0.5, 0.2, 0.1, 0.3, 9.0, 7.0, 8.0, 6.0]])
    sets = RetainedSets("fixed", num_layers=4, k_max=4, k_min=4, scale=0.9)
    sets.start(1, logits, weight)
    sets.retain()
    assert sets.token_ids.tolist() == [[6, 8, 7, 9]]
    assert torch.equal(sets.rows[0], weight[[6, 8, 7, 9]])
    normed = torch.randn(1, 1, 4)
    assert torch.allclose(sets.logits(normed, [2]), normed[0] @ weight[[6, 8]].T)


def test_each_row_keeps_its_own_set_and_scores_only_its_own_prefix():
    weight = torch.randn(6, 3)
    logits = torch.tensor([[6.0, 5.0, 4.0, 3.0, 2.0, 1.0], [1.0, 2.0, 3.0, 4.0, 5.0, 6.0]])
    sets = RetainedSets("adaptive", num_layers=4, k_max=4, k_min=4, scale=0.9)
    sets.start(1, logits, weight)
    normed = torch.randn(2, 1, 3)
    scores = sets.logits(normed, [3, 1])
    assert sets.token_ids.tolist() == [[0, 1, 2, 3], [5, 4, 3, 2]]
    assert torch.allclose(scores[0], normed[0, 0] @ weight[[0, 1, 2]].T)
    assert torch.allclose(scores[1, :1], normed[1, 0] @ weight[[5]].T)
    assert scores[1, 1:].tolist() == [float("-inf")] * 2  # past its own size a row scores nothing
    sets.keep(torch.tensor([1]))  # the first row exited
    assert sets.token_ids.tolist() == [[5, 4, 3, 2]] and torch.equal(sets.rows[0], weight[[5, 4, 3, 2]])


def test_decaying_uses_a_prefix_and_rerank_reorders_by_the_layers_own_scores():
    weight = torch.eye(6)
    sets = RetainedSets("decaying", num_layers=6, k_max=6, k_min=2, scale=0.9, rerank=True)
    sets.start(1, torch.tensor([[5.0, 4.0, 3.0, 2.0, 1.0, 0.0]]), weight)
    sets.retain()
    assert sets.token_ids.tolist() == [[0, 1, 2, 3, 4, 5][: sets.k_start]]
    assert sets.sizes_at(3, [0.0]) == [schedule(3, 6, 6, 2, sets.k_start)] and sets.sizes_at(3, [0.0])[0] < sets.k_start
    sets.reorder(torch.tensor([[0.0, 3.0, 1.0, 2.0]]))  # the layer scored 4 rows
    assert sets.token_ids.tolist() == [[1, 3, 2, 0]]
    assert torch.equal(sets.rows[0], weight[[1, 3, 2, 0]])


def test_adaptive_rerank_can_grow_back_after_a_confident_layer():
    weight = torch.eye(6)
    sets = RetainedSets("adaptive", num_layers=6, k_max=6, k_min=2, scale=1.0, rerank=True)
    sets.start(1, torch.tensor([[5.0, 4.0, 3.0, 2.0, 1.0, 0.0]]), weight)
    assert sets.sizes_at(2, [1.0]) == [2]  # a confident layer keeps k_min rows
    sets.retain()
    sets.reorder(torch.tensor([[1.0, 2.0]]))
    assert sets.k_start == 4 and sets.sizes_at(3, [0.0]) == [4]  # an unsure one scores the whole set again
    assert sets.token_ids.tolist() == [[1, 0, 2, 3]]  # the unscored rest kept, in the start order


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("conf_type", ["softmax", "state"])
def test_reduction_to_the_whole_vocabulary_changes_nothing(copy_model, mode, conf_type):
    inputs = copy_inputs(1)
    exits = dict(use_early_exit=True, exit_conf_type=conf_type, exit_conf_threshold=0.9 if conf_type == "state" else 0.8)
    plain = decode_all(copy_model, inputs, **exits)
    reduced = decode_all(copy_model, inputs, **exits, type_vocab_reduct=mode, vocab_k_max=32, vocab_k_min=32)
    assert reduced == plain
    assert len({layer for _, layers in plain for layer in layers}) >= 2  # exits vary: a real comparison


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("rerank", [False, True])
def test_every_reduced_prediction_equals_an_independent_recomputation(copy_model, monkeypatch, mode, rerank):
    """Each token exiting after its start layer is the argmax, over the prefix its mode keeps of the
    start layer's top-k(r) (recomputed from the hidden states), of its exit layer's logits."""
    check = RetainedSetCheck(monkeypatch, copy_model, mode, rerank, k_max=8, k_min=3)
    decode_all(copy_model, copy_inputs(2), use_early_exit=True, exit_conf_type="softmax", exit_conf_threshold=0.5,
               type_vocab_reduct=mode, vocab_k_max=8, vocab_k_min=3, vocab_rerank=rerank)
    assert check.checked > 0  # some tokens did exit after the start layer


@pytest.mark.parametrize("threshold, retained_per_token", [(0.0, 0), (1.0, 1)])
def test_the_retained_set_is_taken_once_per_token_and_only_when_a_later_layer_needs_it(
        copy_model, monkeypatch, threshold, retained_per_token):
    taken = []
    original = RetainedSets.retain

    def counted_retain(self):
        if self.token_ids is None:
            taken.append(self.k_start)
        original(self)

    monkeypatch.setattr(RetainedSets, "retain", counted_retain)
    # threshold 0: every token exits at its start layer (min layer 2), which needs no retained set;
    # threshold 1: none exits, and layers 3..L-1 share one retained set per token
    outputs = decode_all(copy_model, copy_inputs(4, count=2), use_early_exit=True, exit_conf_type="softmax",
                         exit_conf_threshold=threshold, exit_min_layer=2, type_vocab_reduct="fixed",
                         vocab_k_max=8, vocab_k_min=3)
    tokens = sum(len(layers) for _, layers in outputs)
    if threshold == 0.0:
        assert all(layer == 2 for _, layers in outputs for layer in layers)
    assert len(taken) == retained_per_token * tokens


def test_small_retained_sets_change_confidence_but_keep_decoding_sane(copy_model):
    inputs = copy_inputs(3)
    flags = dict(use_early_exit=True, exit_conf_type="softmax", exit_conf_threshold=0.8)
    plain = decode_all(copy_model, inputs, **flags)
    reduced = decode_all(copy_model, inputs, **flags, type_vocab_reduct="decaying", vocab_k_max=16, vocab_k_min=4)
    # renormalising over fewer tokens raises the softmax gap: tokens exit no later than before
    for (_, plain_exits), (_, reduced_exits) in zip(plain, reduced):
        assert sum(reduced_exits) <= sum(plain_exits)


# ----- FLOPs -------------------------------------------------------------------------------------

SMALL = F.Shape(d_model=4, inner=6, d_ff=8, ff_matrices=2, vocab_size=10, encoder_layers=2)


def test_flop_formulas_against_hand_computed_values():
    assert F.head_flops(SMALL, 5) == 2 * 4 * 5 + 5 * 5 == 65
    # projections 6 x 2*4*6 = 288; attention 4*6*3 + 4*6*7 = 240; feed-forward 2 x 2*4*8 = 128
    assert F.decoder_block_flops(SMALL, 3, 7) == 288 + 240 + 128
    gated = F.Shape(4, 6, 8, 3, 10, 2)
    assert F.decoder_block_flops(gated, 3, 7) == 288 + 240 + 192
    assert F.skipped_block_flops(SMALL, 2) == 2 * 2 * 2 * 4 * 6 == 192
    assert F.cross_kv_flops(SMALL, 7) == 2 * 2 * 4 * 6 * 7 == 672
    # per layer: 7 tokens x (4 x 2*4*6 + 4*6*7 + 2 x 2*4*8) = 7 x 488; two layers
    assert F.encoder_flops(SMALL, 7) == 2 * 7 * 488 == 6832
    assert F.output_head_flops(SMALL) == 2 * 4 * 10


def expected_flops(model, exits, source_length, min_layer, confidence_rows):
    """FLOPs of one sequence recomputed from its exit layers, lazy propagation included."""
    shape = F.Shape.of(model.config)
    L = model.config.num_decoder_layers
    blocks = sum(F.decoder_block_flops(shape, t + 1, source_length) for t, e in enumerate(exits) for _ in range(e))
    reached = [j for j in range(1, L + 1) if any(e >= j for e in exits)]
    blocks += sum(F.cross_kv_flops(shape, source_length) for _ in reached)
    for j in reached:  # positions before the last token reaching j that skipped j got its keys/values
        last = max(t for t, e in enumerate(exits) if e >= j)
        blocks += F.skipped_block_flops(shape, sum(1 for e in exits[:last] if e < j))
    blocks += sum(F.output_head_flops(shape) for e in exits if e == L)
    checks = sum(min(e, L - 1) - min_layer + 1 for e in exits)
    return {"flops_blocks": blocks, "flops_encoder": F.encoder_flops(shape, source_length),
            "flops_confidence": checks * F.head_flops(shape, confidence_rows)}


def test_counted_flops_equal_a_recount_from_the_exit_layers(copy_model):
    input_ids = copy_inputs(4, count=1)[0]
    set_flags(copy_model, use_early_exit=True, exit_conf_type="softmax", exit_conf_threshold=0.8, exit_min_layer=2,
              count_flops=True)
    copy_model.generate(input_ids=input_ids, max_new_tokens=12)
    stats = copy_model.exit_stats()
    exits = stats["exit_layers"][0]
    assert len(set(exits)) >= 2
    expected = expected_flops(copy_model, exits, input_ids.shape[1], 2, copy_model.config.vocab_size)
    for key, value in expected.items():
        assert stats[key] == value, key
    assert stats["flops_total"] == sum(expected.values())


def test_reduced_heads_are_counted_with_the_start_layers_full_head(copy_model):
    input_ids = copy_inputs(5, count=1)[0]
    set_flags(copy_model, use_early_exit=True, exit_conf_type="softmax", exit_conf_threshold=1.0, count_flops=True,
              type_vocab_reduct="fixed", vocab_k_max=8, vocab_k_min=8)
    copy_model.generate(input_ids=input_ids, max_new_tokens=5)
    stats = copy_model.exit_stats()
    shape = F.Shape.of(copy_model.config)
    # no token exits: layer 1 is the full head (start layer), layers 2 and 3 score 8 rows
    per_token = F.head_flops(shape, 32) + 2 * F.head_flops(shape, 8)
    assert stats["flops_confidence"] == stats["tokens"] * per_token


def test_no_flops_keys_unless_counting(copy_model):
    set_flags(copy_model)
    copy_model.generate(input_ids=copy_inputs(6, count=1)[0], max_new_tokens=3)
    assert not any(key.startswith("flops_") for key in copy_model.exit_stats())
