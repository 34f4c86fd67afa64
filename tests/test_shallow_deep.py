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
from models.adaptive_threshold import BetaMixtureThreshold
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


def frees_threshold(confidences, agreements, level, initial=None):
    """FREE's BetaMixture1D.fit(x, y) then predict_proba(0.3, 0.9), re-derived from its definition
    with numpy and scipy's Beta density; `initial` where a component's variance is 0 (FREE's
    NaN case, where the estimator keeps its previous value)."""
    import numpy as np
    from scipy.stats import beta

    x = np.clip(np.array(confidences, dtype=np.float64), 1e-4, 1 - 1e-4)
    y = np.array(agreements, dtype=int)
    r = np.eye(2)[y].T  # (2, n): row 1 = "agrees"
    r[r <= 1e-4] = 1e-4
    r = r / r.sum(axis=0)
    params, means = [], []
    for w in r:
        m = np.sum(w * x) / np.sum(w)
        s2 = np.sum(w * (x - m) ** 2) / np.sum(w)
        if s2 == 0:
            return initial
        a = m * (m * (1 - m) / s2 - 1)
        params.append((a, a * (1 - m) / m))
        means.append(m)
    grid = np.linspace(0.3, 0.9, 10)
    i = int(np.argmax([a / (a + b) for a, b in params]))
    mine, other = beta.pdf(grid, *params[i]), beta.pdf(grid, *params[1 - i])
    passing = int(np.sum(mine / (mine + other) > level))
    return float(grid[min(max(0, 10 - passing), 9)])


def beta_observations(agree, disagree, n_agree, n_disagree, seed=0):
    draw = lambda a, b, n: torch.distributions.Beta(torch.tensor(a), torch.tensor(b)).sample((n,)).tolist()
    torch.manual_seed(seed)
    return draw(*agree, n_agree) + draw(*disagree, n_disagree), [True] * n_agree + [False] * n_disagree


def fitted(confidences, agreements, level, initial=0.77):
    estimator = BetaMixtureThreshold(initial=initial, level=level, refit_samples=10)
    for c, a in zip(confidences, agreements):
        estimator.observe(c, a)
    estimator.end_sample()
    return estimator.threshold


GRID_POINTS = [0.3 + i * 0.6 / 9 for i in range(10)]

ESTIMATOR_CASES = {
    # agrees U-shaped: the old rule over (0, 1) gave 1e-4 here at zeta = 0.4
    "u-shaped": ((0.5, 0.5), (2.0, 5.0), 300, 300),
    # light-tailed agrees, heavy disagrees: the old rule jumped to 1.0 at zeta = 0.9
    "light-tailed": ((20.0, 4.0), (0.5, 3.0), 300, 300),
    "balanced": ((5.0, 2.0), (2.0, 5.0), 300, 300),
    "small": ((5.0, 2.0), (2.0, 5.0), 3, 2),
    "agrees has the lower mean": ((2.0, 5.0), (5.0, 2.0), 50, 50),
}


@pytest.mark.parametrize("case", ESTIMATOR_CASES)
@pytest.mark.parametrize("level", [0.4, 0.9])
def test_estimator_is_frees_beta_mixture(case, level):
    agree, disagree, n_agree, n_disagree = ESTIMATOR_CASES[case]
    confidences, agreements = beta_observations(agree, disagree, n_agree, n_disagree)
    expected = frees_threshold(confidences, agreements, level)
    assert fitted(confidences, agreements, level) == pytest.approx(expected, abs=1e-12)
    assert any(expected == pytest.approx(g) for g in GRID_POINTS)


def test_estimator_fixes_the_old_rules_failures():
    u_shaped = beta_observations((0.5, 0.5), (2.0, 5.0), 300, 300)
    assert fitted(*u_shaped, 0.4) >= 0.3  # not ~1e-4: every token would exit
    light = beta_observations((20.0, 4.0), (0.5, 3.0), 300, 300)
    assert fitted(*light, 0.9) <= 0.9  # not 1.0: no token would ever exit
    balanced = beta_observations((5.0, 2.0), (2.0, 5.0), 300, 300)
    assert fitted(*balanced, 0.4) == pytest.approx(0.5)  # symmetric components cross at 0.5


def test_estimator_keeps_its_threshold_while_the_observations_do_not_determine_a_beta():
    estimator = BetaMixtureThreshold(initial=0.7, level=0.4, refit_samples=2)
    estimator.observe(0.8, True)
    estimator.end_sample()
    assert estimator.threshold == 0.7  # one observation: variance 0
    for value in (0.2, 0.9, 0.95):
        estimator.observe(value, True)
    estimator.end_sample()  # one class only: FREE still fits, both components alike, ratio ~0.5 > 0.4
    assert estimator.threshold == pytest.approx(frees_threshold(estimator.confidences, estimator.agreements, 0.4))
    assert estimator.threshold == pytest.approx(0.3)
    before = estimator.threshold
    for value in (0.1, 0.3, 0.2):
        estimator.observe(value, False)
    estimator.end_sample()  # past refit_samples: no refit
    assert estimator.threshold == before


def test_adaptive_threshold_is_estimated_while_decoding(copy_model):
    copy_model.threshold_estimator = None
    thresholds, seen = [], []
    for input_ids in copy_inputs(9, count=6):
        _, stats = decode(copy_model, input_ids, **free_flags(0.5, use_adapt_threshold=True, adapt_threshold_samples=50))
        thresholds.append(stats["adaptive_threshold"])
        seen.append(len(copy_model.threshold_estimator.confidences))
    estimator = copy_model.threshold_estimator
    assert estimator.samples_seen == 6 and len(estimator.confidences) > 0 and estimator.level == 0.4
    # each sample's threshold is FREE's refit on the observations up to it, recomputed independently
    expected = 0.5
    for n, threshold in zip(seen, thresholds):
        if n:
            expected = frees_threshold(estimator.confidences[:n], estimator.agreements[:n], 0.4, initial=expected)
        assert threshold == pytest.approx(expected, abs=1e-12)
    assert len(set(thresholds)) > 1 or thresholds[-1] != 0.5, "the estimate never moved: the check would be weak"
    copy_model.threshold_estimator = None


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


@pytest.mark.parametrize("change", [dict(adapt_threshold_level=0.7), dict(adapt_threshold_samples=7),
                                    dict(shallow2deep_conf_threshold=0.6), dict(shallow_exit_layer=2),
                                    dict(shallow2deep_conf_type="state")])
def test_a_call_with_other_adaptive_settings_starts_a_fresh_estimator(copy_model, change):
    copy_model.threshold_estimator = None
    flags = free_flags(0.5, use_adapt_threshold=True)
    inputs = copy_inputs(9, count=3)
    for input_ids in inputs[:2]:
        decode(copy_model, input_ids, **flags)
    first = copy_model.threshold_estimator
    assert first.samples_seen == 2
    decode(copy_model, inputs[2], **flags)  # the same settings: the same estimator goes on
    assert copy_model.threshold_estimator is first and first.samples_seen == 3
    decode(copy_model, inputs[2], **dict(flags, **change))
    fresh = copy_model.threshold_estimator
    assert fresh is not first and fresh.samples_seen == 1
    assert fresh.level == change.get("adapt_threshold_level", 0.4)
    assert fresh.refit_samples == change.get("adapt_threshold_samples", 300)
    copy_model.threshold_estimator = None
