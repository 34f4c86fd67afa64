"""Contrastive-decoding confidence against slow, explicit float64 re-computations."""

import math

import pytest
import torch

from engine_helpers import (
    causal_bias,
    copy_inputs,
    output_logits,
    reference_decode,
    set_flags,
    trained_copy_model,
)
from models import confidence as C

MEASURES = ("contrastive_decoding", "reweight_contrastive_decoding", "JSD_contrastive_confidence")


# ----- slow references: full-vocabulary distributions, loops, float64 ------------------------------


def slow_scores(expert_logits, amateur_logits, alpha, reweight):
    """s over the whole vocabulary from the definitions, one token at a time."""
    p = torch.softmax(expert_logits.double(), -1)
    q = torch.softmax(amateur_logits.double(), -1)
    head = [x for x in range(len(p)) if p[x] >= alpha * p.max()]
    contrast = torch.tensor([math.log(p[x]) - (math.log(q[x]) if q[x] > 0 else -math.inf) for x in head],
                            dtype=torch.float64)
    if torch.isinf(contrast).any():  # zero amateur probability: those tokens share all the mass
        head_scores = torch.isinf(contrast).double() / torch.isinf(contrast).sum()
    else:
        head_scores = torch.softmax(contrast, -1)
    if reweight:
        head_scores = head_scores * sum(p[x] for x in head)
    s = p.clone()
    for i, x in enumerate(head):
        s[x] = head_scores[i]
    return s


def slow_confidence(s):
    top = sorted(s.tolist(), reverse=True)
    return top[0] - top[1]


def slow_jsd(expert_logits, amateur_logits, head):
    """JSD of the two distributions restricted to `head` and renormalised, with 0 log 0 = 0."""
    p = torch.softmax(expert_logits.double(), -1)[head]
    q = torch.softmax(amateur_logits.double(), -1)[head]
    p, q = p / p.sum(), q / q.sum()
    m = (p + q) / 2

    def kl(a, b):
        return sum(float(a[i] * math.log(a[i] / b[i])) for i in range(len(a)) if a[i] > 0)

    return 0.5 * kl(p, m) + 0.5 * kl(q, m)


def fast_confidence(expert_logits, amateur_logits, alpha, reweight):
    """The module's pipeline, given full logits (as the decode loop has them without reduction)."""
    probs = torch.softmax(expert_logits.double(), -1)
    head = C.plausibility_head(probs, alpha)
    mass = probs[head].sum() if reweight else None
    head_scores = C.contrastive_head_scores(expert_logits[head], amateur_logits[head], mass)
    return C.contrastive_confidence(probs, head, head_scores)


PLANTED = {
    "random": lambda g: (torch.randn(50, generator=g, dtype=torch.float64) * 3,
                         torch.randn(50, generator=g, dtype=torch.float64) * 3),
    "ties": lambda g: (torch.tensor([2.0, 2.0, 2.0, -1.0, -5.0], dtype=torch.float64),
                       torch.tensor([1.0, 1.0, 0.0, 3.0, 0.0], dtype=torch.float64)),
    "one-token head": lambda g: (torch.tensor([20.0, 0.0, -1.0, 0.5], dtype=torch.float64),
                                 torch.tensor([0.0, 3.0, 1.0, 2.0], dtype=torch.float64)),
    "amateur zeros": lambda g: (torch.tensor([1.0, 0.9, 0.8, -3.0], dtype=torch.float64),
                                torch.tensor([-math.inf, 2.0, -math.inf, 0.0], dtype=torch.float64)),
    "expert underflow": lambda g: (torch.tensor([800.0, 799.5, 0.0, -800.0], dtype=torch.float64),
                                   torch.tensor([0.0, 1.0, 2.0, 3.0], dtype=torch.float64)),
}


@pytest.mark.parametrize("case", PLANTED)
@pytest.mark.parametrize("reweight", [False, True])
def test_contrastive_confidence_matches_the_definition(case, reweight):
    expert, amateur = PLANTED[case](torch.Generator().manual_seed(0))
    value, choice = fast_confidence(expert, amateur, 0.1, reweight)
    s = slow_scores(expert, amateur, 0.1, reweight)
    assert torch.isfinite(value)
    assert value.item() == pytest.approx(slow_confidence(s), abs=1e-12)
    assert s[choice].item() == pytest.approx(s.max().item(), abs=1e-12)


def test_reweighted_scores_are_a_proper_distribution():
    expert, amateur = PLANTED["random"](torch.Generator().manual_seed(1))
    assert slow_scores(expert, amateur, 0.1, True).sum().item() == pytest.approx(1.0)
    probs = torch.softmax(expert, -1)
    head = C.plausibility_head(probs, 0.1)
    scores = probs.clone()
    scores[head] = C.contrastive_head_scores(expert[head], amateur[head], probs[head].sum())
    assert scores.sum().item() == pytest.approx(1.0, abs=1e-12)


@pytest.mark.parametrize("case", PLANTED)
def test_restricted_jsd_matches_the_definition_and_is_bounded(case):
    expert, amateur = PLANTED[case](torch.Generator().manual_seed(2))
    head = C.plausibility_head(torch.softmax(expert, -1), 0.1)
    value = C.restricted_jsd(expert[head], amateur[head].unsqueeze(0))[0]
    assert torch.isfinite(value)
    assert 0.0 <= value.item() <= math.log(2) + 1e-15
    assert value.item() == pytest.approx(slow_jsd(expert, amateur, head), abs=1e-12)


def test_jsd_is_symmetric_zero_on_equal_inputs_and_ln2_on_disjoint_ones():
    g = torch.Generator().manual_seed(3)
    a, b = torch.randn(7, generator=g, dtype=torch.float64), torch.randn(7, generator=g, dtype=torch.float64)
    assert C.restricted_jsd(a, b.unsqueeze(0)).item() == pytest.approx(C.restricted_jsd(b, a.unsqueeze(0)).item())
    assert C.restricted_jsd(a, a.unsqueeze(0)).item() == pytest.approx(0.0, abs=1e-15)
    disjoint = C.restricted_jsd(torch.tensor([0.0, -math.inf]), torch.tensor([[-math.inf, 0.0]]))
    assert disjoint.item() == pytest.approx(math.log(2))


def test_jsd_of_many_amateurs_in_one_call_equals_one_at_a_time_and_discount_divides_by_distance():
    g = torch.Generator().manual_seed(4)
    expert, amateurs = torch.randn(9, generator=g), torch.randn(4, 9, generator=g)
    batched = C.restricted_jsd(expert, amateurs)
    for row in range(4):
        assert batched[row].item() == pytest.approx(C.restricted_jsd(expert, amateurs[row : row + 1]).item())
    layers = torch.tensor([2, 3, 4, 5])
    assert torch.allclose(C.discounted_jsd(batched, layers, 6), batched / torch.tensor([4.0, 3.0, 2.0, 1.0]))


# ----- in the decode loop ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def copy_model():
    """Six decoder blocks so that JSD has several candidate amateur layers."""
    return trained_copy_model(6, torch.float64)




def contrastive_rule(model, kind, threshold, min_layer, alpha=0.1):
    """Exit rule from the slow definitions, remembering the token's per-layer states itself."""
    states = {}

    def rule(layer, hidden, previous, step):
        states[layer] = hidden
        if layer < min_layer:
            return False
        expert = output_logits(model, hidden)[0, 0]
        if kind == "JSD_contrastive_confidence":
            head = C.plausibility_head(torch.softmax(expert, -1), alpha)
            scores = {j: slow_jsd(expert, output_logits(model, states[j])[0, 0], head) / (layer - j)
                      for j in range(2, layer)}
            amateur_layer = max(scores, key=scores.get)
        else:
            amateur_layer = layer // 2
        amateur = output_logits(model, states[amateur_layer])[0, 0]
        s = slow_scores(expert, amateur, alpha, kind != "contrastive_decoding")
        return slow_confidence(s) > threshold

    return rule


@pytest.mark.parametrize("kind, threshold", [("contrastive_decoding", 0.5), ("reweight_contrastive_decoding", 0.5),
                                             ("JSD_contrastive_confidence", 0.5)])
def test_mixed_exits_equal_the_slow_reference(copy_model, kind, threshold):
    min_layer = 3
    set_flags(copy_model, use_early_exit=True, exit_conf_type=kind, exit_conf_threshold=threshold,
              exit_min_layer=min_layer)
    seen = set()
    for input_ids in copy_inputs(5):
        out = copy_model.generate(input_ids=input_ids, max_new_tokens=10)
        exits = copy_model.exit_stats()["exit_layers"][0]
        tokens, expected_exits = reference_decode(copy_model, input_ids, 10,
                                                  contrastive_rule(copy_model, kind, threshold, min_layer))
        assert (out[0].tolist(), exits) == (tokens, expected_exits)
        seen.update(exits)
    assert len(seen) >= 2, f"exits never varied ({seen})"


@pytest.mark.parametrize("kind", MEASURES)
def test_no_possible_exit_equals_the_full_model(copy_model, kind):
    inputs = copy_inputs(6, count=2)
    set_flags(copy_model)
    full = [copy_model.generate(input_ids=x, max_new_tokens=10) for x in inputs]
    set_flags(copy_model, use_early_exit=True, exit_conf_type=kind, exit_conf_threshold=1.0, exit_min_layer=3)
    for x, expected in zip(inputs, full):
        assert torch.equal(copy_model.generate(input_ids=x, max_new_tokens=10), expected)
        assert copy_model.exit_stats()["block_avg"] == 6


@pytest.mark.parametrize("kind", MEASURES)
def test_every_token_exiting_at_the_minimum_layer_equals_a_static_exit_there(copy_model, kind):
    inputs = copy_inputs(7, count=2)
    set_flags(copy_model, static_exit_layer=3)
    static = [copy_model.generate(input_ids=x, max_new_tokens=10) for x in inputs]
    set_flags(copy_model, use_early_exit=True, exit_conf_type=kind, exit_conf_threshold=0.0, exit_min_layer=3)
    for x, expected in zip(inputs, static):
        out = copy_model.generate(input_ids=x, max_new_tokens=10)
        assert set(copy_model.exit_stats()["exit_layers"][0]) == {3}
        assert torch.equal(out, expected)


@pytest.mark.parametrize("mode", ["fixed", "decaying", "adaptive"])
@pytest.mark.parametrize("kind", MEASURES)
def test_contrastive_measures_under_whole_vocabulary_reduction_change_nothing(copy_model, kind, mode):
    inputs = copy_inputs(8, count=2)
    flags = dict(use_early_exit=True, exit_conf_type=kind, exit_conf_threshold=0.5, exit_min_layer=3)
    set_flags(copy_model, **flags)
    plain = [(copy_model.generate(input_ids=x, max_new_tokens=10).tolist(), copy_model.exit_stats()["exit_layers"])
             for x in inputs]
    set_flags(copy_model, **flags, type_vocab_reduct=mode, vocab_k_max=32, vocab_k_min=32)
    reduced = [(copy_model.generate(input_ids=x, max_new_tokens=10).tolist(), copy_model.exit_stats()["exit_layers"])
               for x in inputs]
    assert reduced == plain


@pytest.mark.parametrize("kind, min_layer", [("contrastive_decoding", 2), ("reweight_contrastive_decoding", 2),
                                             ("JSD_contrastive_confidence", 3)])
@pytest.mark.parametrize("mode", ["fixed", "decaying", "adaptive"])
def test_contrastive_predictions_from_a_small_retained_set_equal_an_independent_recomputation(
        copy_model, monkeypatch, kind, min_layer, mode):
    """The start layer (min_layer) scores the full head; a token exiting at a later layer is the
    argmax of that layer's logits over the prefix its mode keeps of the start layer's top-k,
    recomputed by hand from the hidden states."""
    from reduction_helpers import RetainedSetCheck

    check = RetainedSetCheck(monkeypatch, copy_model, mode, False, k_max=12, k_min=4)
    set_flags(copy_model, use_early_exit=True, exit_conf_type=kind, exit_conf_threshold=0.3, exit_min_layer=min_layer,
              type_vocab_reduct=mode, vocab_k_max=12, vocab_k_min=4)
    for input_ids in copy_inputs(9, count=3):
        copy_model.generate(input_ids=input_ids, max_new_tokens=10)
    assert check.checked > 0  # tokens did exit at a reduced layer


def test_render_jsds_records_every_candidate_and_the_chosen_amateur(copy_model):
    set_flags(copy_model, use_early_exit=True, exit_conf_type="JSD_contrastive_confidence", exit_conf_threshold=0.5,
              exit_min_layer=3, render_jsds=True)
    copy_model.generate(input_ids=copy_inputs(10, count=1)[0], max_new_tokens=10)
    stats = copy_model.exit_stats()
    steps, exits = stats["jsd_steps"][0], stats["exit_layers"][0]
    assert len(steps) == len(exits)
    for step, exit_layer in zip(steps, exits):
        expert = step["expert_layer"]
        assert expert == min(exit_layer, 5)  # the last checked layer of the token
        assert sorted(step["jsd"]) == list(range(2, expert))
        assert step["chosen"] == max(step["jsd"], key=step["jsd"].get)
        assert all(0.0 <= v <= math.log(2) for v in step["jsd"].values())


@torch.no_grad()
def test_emit_contrastive_token_changes_only_what_is_emitted(copy_model):
    flags = dict(use_early_exit=True, exit_conf_type="contrastive_decoding", exit_conf_threshold=0.0, exit_min_layer=3)
    x = copy_inputs(11, count=1)[0]
    set_flags(copy_model, **flags)
    expert = copy_model.generate(input_ids=x, max_new_tokens=1)
    set_flags(copy_model, **flags, emit_contrastive_token=True)
    contrastive = copy_model.generate(input_ids=x, max_new_tokens=1)
    # the first token's contrastive choice from the slow definition
    states = {}
    encoder = copy_model.encoder(input_ids=x).last_hidden_state
    hidden = copy_model.decoder.embed_tokens(torch.tensor([[0]]))
    for j in range(3):
        hidden = copy_model.decoder.block[j](hidden, position_bias=causal_bias(copy_model, 1),
                                             encoder_hidden_states=encoder)[0]
        states[j + 1] = hidden
    s = slow_scores(output_logits(copy_model, states[3])[0, 0], output_logits(copy_model, states[1])[0, 0], 0.1, False)
    assert contrastive[0, 1].item() == int(s.argmax())
    assert expert[0, 1].item() == int(output_logits(copy_model, states[3])[0, 0].argmax())
