"""FREE: shallow-deep module, synchronized parallel decoding, rollback and adaptive threshold."""

import pytest
import torch
import torch.nn.functional as F

from engine_helpers import (
    EOS,
    copy_inputs,
    reference_decode,
    set_flags,
    threshold_rule,
    trained_copy_model,
)
from models.adaptive_threshold import BetaMixtureThreshold, posterior_threshold
from models.confidence import softmax_confidence
from models.decode_loop import output_logits

SHALLOW = 3
L = 4


@pytest.fixture(scope="module")
def copy_model():
    return trained_copy_model(4, torch.float64)




def free_flags(threshold, **extra):
    return dict(use_shallow_deep=True, shallow_exit_layer=SHALLOW, shallow2deep_conf_type="softmax",
                shallow2deep_conf_threshold=threshold, **extra)


def decode(model, input_ids, **flags):
    set_flags(model, **flags)
    out = model.generate(input_ids=input_ids, max_new_tokens=12)
    return out[0].tolist(), model.exit_stats()


@torch.no_grad()
def reference_free(model, input_ids, max_new_tokens, threshold, rollback=None):
    """FREE without any cache: every step runs HF's own forward over the whole prefix, so the
    stacked shallow tokens always have their true deep states."""
    tokens, exits, pending = [model.config.decoder_start_token_id], [], []
    while len(tokens) <= max_new_tokens:
        out = model(input_ids=input_ids, decoder_input_ids=torch.tensor([tokens]), output_hidden_states=True,
                    use_cache=False)
        t = len(tokens) - 1
        shallow = out.decoder_hidden_states[SHALLOW][:, t : t + 1]
        if softmax_confidence(output_logits(model, shallow)).item() > threshold:
            tokens.append(int(output_logits(model, shallow).argmax()))
            exits.append(SHALLOW)
            pending.append(t)
        else:
            deep = out.logits[0]
            rejected = [p for p in pending if rollback is not None
                        and F.cross_entropy(deep[p : p + 1].float(), torch.tensor([tokens[p + 1]])).item() > rollback]
            pending = []
            if rejected:
                p = rejected[0]
                tokens, exits = tokens[: p + 1] + [int(deep[p].argmax())], exits[:p] + [L]
            else:
                tokens.append(int(deep[t].argmax()))
                exits.append(L)
        if tokens[-1] == EOS:
            break
    return tokens, exits


def test_a_threshold_nothing_passes_equals_the_full_model(copy_model):
    for input_ids in copy_inputs(1, count=3):
        full, _ = decode(copy_model, input_ids)
        tokens, stats = decode(copy_model, input_ids, **free_flags(1.0))
        assert tokens == full
        assert stats["block_avg"] == L and stats["deep_tokens"] == stats["tokens"] and stats["shallow_tokens"] == 0


def test_threshold_zero_equals_a_static_exit_at_the_shallow_layer(copy_model):
    for input_ids in copy_inputs(2, count=3):
        static, _ = decode(copy_model, input_ids, static_exit_layer=SHALLOW)
        tokens, stats = decode(copy_model, input_ids, **free_flags(0.0))
        assert tokens == static
        assert stats["block_avg"] == SHALLOW and stats["deep_tokens"] == 0


@pytest.mark.parametrize("threshold", [0.5, 0.8])
def test_mixed_exits_equal_the_cache_free_reference(copy_model, threshold):
    parallel = 0
    for input_ids in copy_inputs(3):
        tokens, stats = decode(copy_model, input_ids, **free_flags(threshold))
        expected_tokens, expected_exits = reference_free(copy_model, input_ids, 12, threshold)
        assert tokens == expected_tokens
        assert stats["exit_layers"][0] == expected_exits
        parallel += stats["parallel_tokens"]
    assert parallel > 0, "no parallel pass happened: the test would prove nothing"


def test_block_avg_counts_the_parallel_recomputation(copy_model):
    _, stats = decode(copy_model, copy_inputs(4, count=1)[0], **free_flags(0.5))
    assert stats["parallel_tokens"] > 0
    assert stats["block_op"][:SHALLOW] == [stats["tokens"]] * SHALLOW
    assert stats["block_op"][SHALLOW:] == [stats["deep_tokens"] + stats["parallel_tokens"]] * (L - SHALLOW)
    assert stats["block_avg"] == pytest.approx(sum(stats["block_op"]) / stats["tokens"])
    assert stats["shallow_tokens"] + stats["deep_tokens"] == stats["tokens"]


def test_rollback_at_threshold_zero_recovers_the_full_model(copy_model):
    rollbacks = 0
    for input_ids in copy_inputs(5, count=3):
        full, _ = decode(copy_model, input_ids)
        tokens, stats = decode(copy_model, input_ids, **free_flags(0.5, rollback_conf_threshold=0.0))
        # every stacked token is re-checked by the deep pass, so wrong shallow tokens are replaced
        assert tokens[: len(full)] == full[: len(tokens)]
        rollbacks += stats["rollbacks"]
    assert rollbacks > 0


@pytest.mark.parametrize("rollback", [0.05, 0.5])
def test_rollback_equals_the_cache_free_reference(copy_model, rollback):
    for input_ids in copy_inputs(6):
        tokens, stats = decode(copy_model, input_ids, **free_flags(0.5, rollback_conf_threshold=rollback))
        expected_tokens, expected_exits = reference_free(copy_model, input_ids, 12, 0.5, rollback)
        assert tokens == expected_tokens
        assert stats["exit_layers"][0] == expected_exits


def test_copied_skipped_states_equal_calm_early_exit_at_the_shallow_layer_only(copy_model):
    for input_ids in copy_inputs(7, count=3):
        tokens, stats = decode(copy_model, input_ids, **free_flags(0.5, copy_skipped_hidden_states=True))
        rule = threshold_rule(copy_model, "softmax", 0.5, SHALLOW)
        only_shallow = lambda layer, *rest: layer == SHALLOW and rule(layer, *rest)  # noqa: E731
        expected_tokens, expected_exits = reference_decode(copy_model, input_ids, 12, only_shallow)
        assert (tokens, stats["exit_layers"][0]) == (expected_tokens, expected_exits)


def test_non_causal_parallel_mask_runs_and_all_deep_still_equals_the_full_model(copy_model):
    input_ids = copy_inputs(8, count=1)[0]
    full, _ = decode(copy_model, input_ids)
    assert decode(copy_model, input_ids, **free_flags(1.0, parallel_causal_mask=False))[0] == full
    tokens, stats = decode(copy_model, input_ids, **free_flags(0.5, parallel_causal_mask=False))
    causal_tokens, causal_stats = decode(copy_model, input_ids, **free_flags(0.5))
    exits, causal_exits = stats["exit_layers"][0], causal_stats["exit_layers"][0]
    assert stats["tokens"] == len(tokens) - 1 == len(exits)
    # the mask only acts inside a parallel pass: up to the first one, both runs are the same
    first = next(t for t in range(1, len(causal_exits)) if causal_exits[t] == L and causal_exits[t - 1] == SHALLOW)
    assert stats["parallel_tokens"] > 0 and causal_stats["parallel_tokens"] > 0
    assert tokens[: first + 1] == causal_tokens[: first + 1] and exits[:first] == causal_exits[:first]


# ----- the adaptive threshold ----------------------------------------------------------------------


def posterior_root(agree, disagree, prior, level, low, high):
    """The confidence in (low, high) where P(agree | c) crosses `level`, by scipy's root finder
    on scipy's Beta densities (independent of the estimator's grid and log-densities)."""
    from scipy.optimize import brentq
    from scipy.stats import beta

    def excess(c):
        a, d = prior * beta.pdf(c, *agree), (1 - prior) * beta.pdf(c, *disagree)
        return a / (a + d) - level
    return brentq(excess, low, high, xtol=1e-12)


def test_threshold_of_known_components_is_where_the_posterior_crosses_the_level():
    expected = posterior_root((8.0, 2.0), (2.0, 6.0), 0.5, 0.9, 0.01, 0.99)
    # the grid's first point at or above the root: within one grid step (1/2000) above it
    assert expected <= posterior_threshold((8.0, 2.0), (2.0, 6.0), 0.5, 0.9) < expected + 6e-4


def test_threshold_with_a_u_shaped_agrees_component_does_not_collapse_to_zero():
    agree, disagree = (0.5, 0.5), (2.0, 5.0)  # "agrees" is U-shaped: its posterior is high near 0 too
    assert posterior_root(agree, disagree, 0.5, 0.9, 1e-9, 0.2) > 0  # a low region that passes ...
    expected = posterior_root(agree, disagree, 0.5, 0.9, 0.3, 1 - 1e-9)  # ... and the crossing from the top
    assert 0.5 < expected < 0.99
    threshold = posterior_threshold(agree, disagree, 0.5, 0.9)
    assert expected <= threshold < expected + 6e-4  # not ~1e-4, the lowest passing grid point


def test_threshold_is_one_when_the_top_does_not_pass():
    assert posterior_threshold((2.0, 5.0), (5.0, 2.0), 0.5, 0.9) == 1.0


def test_estimator_recovers_a_known_threshold_from_beta_samples():
    torch.manual_seed(0)
    agree = torch.distributions.Beta(8.0, 2.0).sample((4000,)).double()
    disagree = torch.distributions.Beta(2.0, 6.0).sample((4000,)).double()
    true_threshold = posterior_root((8.0, 2.0), (2.0, 6.0), 0.5, 0.9, 0.01, 0.99)
    assert 0.3 < true_threshold < 0.9
    estimator = BetaMixtureThreshold(initial=1.0, level=0.9, refit_samples=10)
    for value in agree.tolist():
        estimator.observe(value, True)
    for value in disagree.tolist():
        estimator.observe(value, False)
    estimator.end_sample()
    assert estimator.threshold == pytest.approx(true_threshold, abs=0.02)


def test_estimator_keeps_its_threshold_until_both_classes_are_seen_and_stops_refitting():
    estimator = BetaMixtureThreshold(initial=0.7, level=0.9, refit_samples=1)
    for value in (0.2, 0.9, 0.95):
        estimator.observe(value, True)
    estimator.end_sample()
    assert estimator.threshold == 0.7  # one class only
    for value in (0.1, 0.3, 0.2):
        estimator.observe(value, False)
    estimator.end_sample()  # past refit_samples: no refit
    assert estimator.threshold == 0.7


def test_adaptive_threshold_is_estimated_while_decoding(copy_model):
    copy_model.threshold_estimator = None
    thresholds, seen = [], []
    for input_ids in copy_inputs(9, count=6):
        _, stats = decode(copy_model, input_ids, **free_flags(0.5, use_adapt_threshold=True, adapt_threshold_samples=50))
        thresholds.append(stats["adaptive_threshold"])
        seen.append(len(copy_model.threshold_estimator.confidences))
    estimator = copy_model.threshold_estimator
    assert estimator.samples_seen == 6 and len(estimator.confidences) > 0
    # each sample's threshold is the refit on the observations up to it, recomputed independently
    expected, refits = 0.5, 0
    for n, threshold in zip(seen, thresholds):
        value = refit_by_hand(estimator.confidences[:n], estimator.agreements[:n], 0.9)
        if value is not None:
            expected, refits = value, refits + 1
        assert threshold == pytest.approx(expected, abs=1e-9)
    assert refits > 0
    copy_model.threshold_estimator = None


def refit_by_hand(confidences, agreements, level):
    """The estimator's refit from its definition, with numpy moments and scipy's Beta density,
    scanning the same grid from the top; None where the mixture is not identifiable."""
    import numpy as np
    from scipy.stats import beta

    values, labels = np.array(confidences), np.array(agreements, dtype=bool)
    parameters = []
    for part in (values[labels], values[~labels]):
        if part.size < 2:
            return None
        mean, var = part.mean(), part.var(ddof=1)
        if not 0 < var < mean * (1 - mean):
            return None
        common = mean * (1 - mean) / var - 1
        parameters.append((mean * common, (1 - mean) * common))
    prior = labels.mean()
    grid = np.linspace(1e-4, 1 - 1e-4, 2001)
    agree = prior * beta.pdf(grid, *parameters[0])
    posterior = agree / (agree + (1 - prior) * beta.pdf(grid, *parameters[1]))
    threshold = 1.0
    for c, p in zip(grid[::-1], posterior[::-1]):
        if p < level:
            break
        threshold = c
    return threshold


def test_after_its_last_refit_the_estimator_is_not_fed_and_decoding_is_unchanged(copy_model):
    copy_model.threshold_estimator = None
    flags = free_flags(0.5, use_adapt_threshold=True, adapt_threshold_samples=2)
    inputs = copy_inputs(9, count=5)
    observed = []
    for input_ids in inputs[:2]:
        decode(copy_model, input_ids, **flags)
        observed.append(len(copy_model.threshold_estimator.confidences))
    assert 0 < observed[0] < observed[1]  # both refit samples were observed
    threshold = copy_model.threshold_estimator.threshold
    later = [decode(copy_model, input_ids, **flags) for input_ids in inputs[2:]]
    assert len(copy_model.threshold_estimator.confidences) == observed[1]  # nothing more collected
    # the same tokens as decoding at the final threshold without an estimator
    for input_ids, (tokens, stats) in zip(inputs[2:], later):
        assert stats["adaptive_threshold"] == threshold
        assert decode(copy_model, input_ids, **free_flags(threshold))[0] == tokens
    copy_model.threshold_estimator = None


@pytest.mark.parametrize("flags, message", [
    (free_flags(0.5, rollback_conf_threshold=1.0, parallel_gen_token=False), "parallel"),
    (free_flags(0.5, use_adapt_threshold=True, copy_skipped_hidden_states=True), "parallel"),
    (dict(use_early_exit=True, exit_conf_type="softmax", rollback_conf_threshold=1.0), "use_shallow_deep"),
    (free_flags(0.5, adapt_threshold_level=1.0, use_adapt_threshold=True), "adapt_threshold_level"),
])
def test_bad_free_flags_raise_clear_errors(copy_model, flags, message):
    with pytest.raises(ValueError, match=message):
        set_flags(copy_model, **flags)


def test_block_avg_free_is_frees_accounting_by_hand():
    from models.results import RowResult, merge_rows

    # k = 3, L = 4: two shallow tokens (3 blocks each), one deep token that recomputed both (3 + 2 x 1)
    row = RowResult(tokens=[0, 5, 6, 7], exit_layers=[3, 3, 4], block_runs=[3, 3, 3, 3],
                    counts={"parallel_tokens": 2, "rollbacks": 0})
    stats = merge_rows([row], 4, shallow_layer=3, counted=("parallel_tokens", "rollbacks"))
    assert stats["block_avg_free"] == (3 + 3 + 4) / 3
    assert stats["block_avg"] == 12 / 3  # ours: the parallel recomputation is counted
    assert (stats["shallow_tokens"], stats["deep_tokens"], stats["parallel_tokens"]) == (2, 1, 2)


def test_block_avg_free_counts_shallow_tokens_k_and_deep_tokens_l_while_decoding(copy_model):
    input_ids = copy_inputs(2, count=1)[0]
    _, stats = decode(copy_model, input_ids, **free_flags(0.6))
    assert stats["shallow_tokens"] > 0 and stats["parallel_tokens"] > 0
    free = (SHALLOW * stats["shallow_tokens"] + L * stats["deep_tokens"]) / stats["tokens"]
    assert stats["block_avg_free"] == pytest.approx(free)
    assert stats["block_avg"] > stats["block_avg_free"]  # FREE leaves the recomputed positions out
