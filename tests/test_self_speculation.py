"""Self-speculative shallow-deep decoding: the output is the full model's greedy output.

Oracles: HF's own `generate` where it can run the shape (encoder and decoder of equal depth),
and HF's full forward over the whole prefix at every step (`hf_greedy_without_cache`) for the
trained copy models, whose encoder is shallower than the decoder.
"""

import random

import pytest
import torch

from engine_helpers import (
    EOS,
    copy_inputs,
    deploy_model,
    hf_greedy_without_cache,
    hf_twin,
    set_flags,
    tiny_config,
    trained_copy_model,
)
from models.confidence import build_meta_head
from models.decode_loop import output_logits
from models.self_speculation import accepted_lengths, expected_blocks_per_token, iid_blocks_per_token


def accepted_length(drafted, full):
    return int(accepted_lengths(drafted, full))

L = 4
MAX_NEW = 12


@pytest.fixture(scope="module", params=[torch.float32, torch.float64], ids=["float32", "float64"])
def copy_case(request):
    """The trained copy model in one dtype, with the full model's outputs on the test inputs."""
    model = trained_copy_model(L, request.param)
    reference = hf_twin(model)
    inputs = copy_inputs(11, count=6)
    expected = [hf_greedy_without_cache(reference, ids, MAX_NEW)[0].tolist() for ids in inputs]
    return model, inputs, expected


def speculation_flags(shallow, threshold, max_draft, conf_type="softmax", **extra):
    return dict(use_shallow_deep=True, shallow_exit_layer=shallow, shallow2deep_conf_type=conf_type,
                shallow2deep_conf_threshold=threshold, use_self_speculation=True, max_draft_tokens=max_draft, **extra)


def check_against_full(model, inputs, expected, **flags):
    """Decode every input with `flags`, assert the full model's tokens, return the summed counts."""
    set_flags(model, **flags)
    totals = {"drafted_tokens": 0, "accepted_tokens": 0, "verify_passes": 0, "final_verifications": 0}
    for input_ids, tokens in zip(inputs, expected):
        out = model.generate(input_ids=input_ids, max_new_tokens=MAX_NEW)
        assert out[0].tolist() == tokens, flags
        stats = model.exit_stats()
        assert stats["tokens"] == len(tokens) - 1
        for key in totals:
            totals[key] += stats[key]
    return totals


# ----- the pure pieces ------------------------------------------------------------------------------


def test_accepted_length_stops_at_the_first_disagreement():
    full = torch.tensor([5, 6, 7, 8])
    assert accepted_length(torch.tensor([5, 6, 7]), full) == 3
    assert accepted_length(torch.tensor([5, 9, 7]), full) == 1  # a later agreement does not count
    assert accepted_length(torch.tensor([4, 6, 7]), full) == 0
    assert accepted_length(torch.tensor([], dtype=torch.long), full) == 0


def test_accepted_lengths_work_per_row_with_padded_drafts():
    drafted = torch.tensor([[5, 6, 7], [5, 9, -1], [5, -1, -1]])  # -1: a row with fewer drafts
    full = torch.tensor([[5, 6, 7, 8], [5, 6, 3, 3], [5, 5, 5, 5]])
    assert accepted_lengths(drafted, full).tolist() == [3, 1, 1]


def test_iid_cost_model_matches_a_simulation_of_the_accept_rule():
    rng = random.Random(0)
    for p, n in ((0.5, 3), (0.8, 4), (0.95, 8)):
        blocks = tokens = 0
        for _ in range(4000):
            drafted = torch.tensor([1 if rng.random() < p else 0 for _ in range(n)])
            accepted = accepted_length(drafted, torch.ones(n + 1, dtype=torch.long))
            blocks += L * (n + 1)
            tokens += accepted + 1
        assert blocks / tokens == pytest.approx(iid_blocks_per_token(L, p, n), rel=0.03)
    assert iid_blocks_per_token(L, 0.0, 3) == L * 4 and iid_blocks_per_token(L, 1.0, 3) == L


# ----- identical to the full model ---------------------------------------------------------------


@pytest.mark.parametrize("shallow", [1, 2, 3])
def test_every_threshold_and_draft_length_gives_the_full_models_tokens(copy_case, shallow):
    model, inputs, expected = copy_case
    drafted = accepted = 0
    for threshold in (0.0, 0.2, 0.5, 0.8, 0.95, 1.0):
        for max_draft in (1, 2, 3, 8):
            totals = check_against_full(model, inputs, expected, **speculation_flags(shallow, threshold, max_draft))
            drafted += totals["drafted_tokens"]
            accepted += totals["accepted_tokens"]
            if threshold == 1.0:
                assert totals["drafted_tokens"] == 0
    assert 0 < accepted < drafted, "no draft was rejected: the test would prove nothing"


@pytest.mark.parametrize("conf_type, shallow, thresholds", [
    ("meta", 2, (0.3, 0.6, 0.9)),
    ("state", 2, (0.5, 0.8, 0.95)),
    ("contrastive_decoding", 2, (0.2, 0.6)),
    ("reweight_contrastive_decoding", 2, (0.2, 0.6)),
    ("JSD_contrastive_confidence", 3, (0.0, 0.2, 0.6)),
])
def test_every_confidence_measure_gives_the_full_models_tokens(copy_case, conf_type, shallow, thresholds):
    model, inputs, expected = copy_case
    if conf_type == "meta":
        torch.manual_seed(3)
        model.cm_head = build_meta_head(model.config.d_model).to(model.dtype)
        with torch.no_grad():
            model.cm_head[2].weight.mul_(20.0)  # confidences spread over (0, 1)
    try:
        drafted = accepted = 0
        for threshold in thresholds:
            for max_draft in (2, 8):
                totals = check_against_full(model, inputs, expected,
                                            **speculation_flags(shallow, threshold, max_draft, conf_type))
                drafted += totals["drafted_tokens"]
                accepted += totals["accepted_tokens"]
        assert 0 < accepted < drafted, "no draft was rejected: the test would prove nothing"
    finally:
        if hasattr(model, "cm_head"):
            del model.cm_head


@pytest.mark.parametrize("shallow", [1, 2])
def test_a_draft_vocabulary_gives_the_full_models_tokens_and_changes_the_drafts(copy_case, shallow):
    model, inputs, expected = copy_case
    vocab = model.config.vocab_size
    counts = {}
    for size in (None, 2, 3, vocab):
        drafted = accepted = 0
        for threshold in (0.0, 0.3, 0.8):
            for max_draft in (2, 8):
                totals = check_against_full(model, inputs, expected, draft_vocab_size=size,
                                            **speculation_flags(shallow, threshold, max_draft))
                drafted += totals["drafted_tokens"]
                accepted += totals["accepted_tokens"]
        counts[size] = (drafted, accepted)
        if size == 2:
            assert 0 < accepted < drafted, "no draft was rejected: the test would prove nothing"
    assert counts[vocab] == counts[None]  # the whole vocabulary retained: the full head's drafts
    assert counts[2] != counts[None]  # two retained rows draft differently (the sets are in use)


def test_a_draft_vocabulary_counts_its_rows_as_confidence_flops(copy_case):
    model, inputs, _ = copy_case
    flops = {}
    for size in (None, 3):
        set_flags(model, draft_vocab_size=size, count_flops=True, **speculation_flags(2, 1.0, 4))
        model.generate(input_ids=inputs[0], max_new_tokens=MAX_NEW)
        flops[size] = model.exit_stats()["flops_confidence"]
    d, V, checks = model.config.d_model, model.config.vocab_size, MAX_NEW - 1
    # threshold 1: nothing drafts, every check is at layer 2; the first one reads the full head
    assert flops[None] == checks * (2 * d * V + 5 * V)
    assert flops[3] == (2 * d * V + 5 * V) + (checks - 1) * (2 * d * 3 + 5 * 3)


def test_a_draft_vocabulary_under_sampling_is_refused(copy_case):
    model, inputs, _ = copy_case
    set_flags(model, draft_vocab_size=3, **speculation_flags(2, 0.5, 2))
    with pytest.raises(ValueError, match="draft_vocab_size"):
        model.generate(input_ids=inputs[0], max_new_tokens=MAX_NEW, do_sample=True)


def test_vocabulary_reduction_is_refused_as_it_would_change_nothing(copy_case):
    # the draft check is at the shallow layer only, the start layer, where the head is the full one
    model = copy_case[0]
    with pytest.raises(ValueError, match="type_vocab_reduct has no effect with use_shallow_deep"):
        set_flags(model, type_vocab_reduct="fixed", **speculation_flags(3, 0.3, 4))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_random_model_equals_hf_generate(dtype):
    # an untrained model: its shallow layer is often wrong, so most passes reject something
    model = deploy_model(tiny_config(num_layers=4, vocab_size=48)).to(dtype)
    reference = hf_twin(model)
    generator = torch.Generator().manual_seed(5)
    inputs = [torch.randint(2, 48, (1, 6), generator=generator) for _ in range(4)]
    expected = [reference.generate(input_ids=ids, max_new_tokens=MAX_NEW, do_sample=False, num_beams=1)[0].tolist()
                for ids in inputs]
    rejected = 0
    for shallow in (1, 2, 3):
        for threshold in (0.0, 0.05, 0.3):
            for max_draft in (1, 3, 8):
                totals = check_against_full(model, inputs, expected, **speculation_flags(shallow, threshold, max_draft))
                rejected += totals["drafted_tokens"] - totals["accepted_tokens"]
    assert rejected > 0


def test_a_draft_that_reaches_the_length_limit_is_verified(copy_case):
    model, inputs, _ = copy_case
    reference = hf_twin(model)
    set_flags(model, **speculation_flags(2, 0.0, 8))  # drafts up to the limit, never verifies before it
    for max_new in (1, 3, 5):
        for input_ids in inputs:
            out = model.generate(input_ids=input_ids, max_new_tokens=max_new)
            assert torch.equal(out, hf_greedy_without_cache(reference, input_ids, max_new))
            assert out.shape[1] == max_new + 1
            assert model.exit_stats()["final_verifications"] >= 1


def test_a_drafted_end_of_sequence_is_verified_before_decoding_ends(copy_case):
    model, inputs, expected = copy_case
    set_flags(model, **speculation_flags(3, 0.0, 8))
    drafted_eos = 0
    for input_ids, tokens in zip(inputs, expected):
        assert model.generate(input_ids=input_ids, max_new_tokens=MAX_NEW)[0].tolist() == tokens
        stats = model.exit_stats()
        # an accepted drafted EOS keeps the shallow exit layer and came out of a final verification
        if tokens[-1] == EOS and stats["exit_layers"][0][-1] == 3:
            assert stats["final_verifications"] >= 1
            drafted_eos += 1
    assert drafted_eos > 0


def test_rows_of_a_batch_equal_the_full_model(copy_case):
    model, inputs, expected = copy_case
    set_flags(model, **speculation_flags(2, 0.5, 3))
    out = model.generate(input_ids=torch.cat(inputs), max_new_tokens=MAX_NEW)
    for row, tokens in zip(out.tolist(), expected):
        assert row[: len(tokens)] == tokens and set(row[len(tokens):]) <= {model.config.pad_token_id}


# ----- statistics -------------------------------------------------------------------------------------


def test_statistics_of_a_small_case_counted_by_hand():
    model = trained_copy_model(L, torch.float64)
    input_ids = copy_inputs(21, count=1)[0]
    full = hf_greedy_without_cache(hf_twin(model), input_ids, MAX_NEW)
    with torch.no_grad():
        out = model(input_ids=input_ids, decoder_input_ids=full, output_hidden_states=True)
        shallow = output_logits(model, out.decoder_hidden_states[3]).argmax(-1)[0, :-1].tolist()
    # the case: layer 3 agrees with the full model everywhere but at the 7th token (17 for 12)
    assert full[0, 1:].tolist() == [23, 24, 19, 20, 23, 24, 12, 13, EOS]
    assert shallow == [23, 24, 19, 20, 23, 24, 17, 13, EOS]
    set_flags(model, **speculation_flags(3, 0.0, 4))  # threshold 0: always drafts, 4 at most
    assert torch.equal(model.generate(input_ids=input_ids, max_new_tokens=MAX_NEW), full)
    stats = model.exit_stats()
    # pass 1: positions 0-3 draft tokens 1-4 (right), position 4 verifies them and gives token 5.
    # pass 2: positions 5-8 draft tokens 6-9 (7 wrong, 8-9 drafted after it), position 9 verifies:
    #         token 6 accepted, token 7 replaced by the full model's 12, 8-9 discarded.
    # pass 3: positions 7-8 draft 13 and EOS; the drafted EOS forces a final verification of both.
    assert (stats["drafted_tokens"], stats["accepted_tokens"], stats["verify_passes"]) == (10, 7, 3)
    assert stats["final_verifications"] == 1
    assert stats["acceptance_rate"] == pytest.approx(0.7)
    assert stats["mean_accepted_per_pass"] == pytest.approx(7 / 3)
    assert stats["exit_layers"] == [[3, 3, 3, 3, L, 3, L, 3, 3]]
    # positions through every block: 5 + 5 + 2, discarded drafts included
    assert stats["block_op"] == [12] * L
    assert stats["block_avg"] == pytest.approx(L * 12 / 9)


def test_cost_model_predicts_block_avg(copy_case):
    """blocks/token = L (n + 1) / (a n + 1) from the measured acceptance a and drafts per pass n,
    exact when no pass was a final verification (which runs no extra position)."""
    model, inputs, _ = copy_case
    exact_cases = 0
    for shallow, threshold, max_draft in ((2, 0.0, 2), (2, 0.5, 4), (3, 0.0, 8), (1, 0.3, 3)):
        set_flags(model, **speculation_flags(shallow, threshold, max_draft))
        for input_ids in inputs:
            model.generate(input_ids=input_ids, max_new_tokens=MAX_NEW)
            stats = model.exit_stats()
            positions = stats["drafted_tokens"] + stats["verify_passes"] - stats["final_verifications"]
            assert stats["block_op"] == [positions] * L
            if stats["final_verifications"] == 0 and stats["verify_passes"] > 0:
                predicted = expected_blocks_per_token(L, stats["acceptance_rate"], stats["mean_drafted_per_pass"])
                assert stats["block_avg"] == pytest.approx(predicted)
                exact_cases += 1
    assert exact_cases > 0


def test_task_runs_sum_the_counts_and_take_the_rates_over_all_samples(copy_case):
    from tasks.runner import ExitStatsTotals

    model, inputs, _ = copy_case
    set_flags(model, **speculation_flags(2, 0.0, 3))
    totals, calls = ExitStatsTotals(), []
    for input_ids in inputs[:3]:
        model.generate(input_ids=input_ids, max_new_tokens=MAX_NEW)
        calls.append(model.exit_stats())
        totals.add(calls[-1])
    metrics = totals.metrics()
    drafted, accepted = (sum(c[key] for c in calls) for key in ("drafted_tokens", "accepted_tokens"))
    assert (metrics["drafted_tokens"], metrics["accepted_tokens"]) == (drafted, accepted)
    assert metrics["verify_passes"] == sum(c["verify_passes"] for c in calls)
    assert metrics["acceptance_rate"] == pytest.approx(accepted / drafted)


# ----- flags ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("flags, names", [
    (dict(use_self_speculation=True), ["use_shallow_deep"]),
    (speculation_flags(2, 0.5, 4, copy_skipped_hidden_states=True), ["copy_skipped_hidden_states"]),
    (speculation_flags(2, 0.5, 4, parallel_gen_token=False), ["parallel_gen_token"]),
    (speculation_flags(2, 0.5, 4, rollback_conf_threshold=1.0), ["rollback_conf_threshold"]),
    (speculation_flags(2, 0.5, 4, use_adapt_threshold=True), ["use_adapt_threshold"]),
    (speculation_flags(2, 0.5, 4, parallel_causal_mask=False), ["parallel_causal_mask"]),
    (speculation_flags(2, 0.5, 0), ["max_draft_tokens"]),
    (speculation_flags(2, 0.5, 2.0), ["max_draft_tokens"]),
    (speculation_flags(2, 0.5, True), ["max_draft_tokens"]),
    (speculation_flags(2, 0.5, 2, draft_vocab_size=1), ["draft_vocab_size"]),
    (speculation_flags(2, 0.5, 2, draft_vocab_size=8, conf_type="state"), ["draft_vocab_size"]),
    (dict(draft_vocab_size=8), ["draft_vocab_size"]),
])
def test_bad_flags_raise_errors_naming_them(flags, names):
    model = deploy_model(tiny_config(num_layers=4))
    for name in names:
        with pytest.raises(ValueError, match=name):
            set_flags(model, **flags)


@pytest.mark.parametrize("module, flags", [
    ("models.self_speculation", speculation_flags(2, 0.0, 3)),
    ("models.shallow_deep", dict(use_shallow_deep=True, shallow_exit_layer=2, shallow2deep_conf_type="softmax",
                                 shallow2deep_conf_threshold=1.0)),
])
def test_the_deep_pass_is_charged_to_the_blocks_by_both_steps(copy_case, monkeypatch, module, flags):
    """Self-speculation's verification pass and FREE's parallel pass are the same blocks: a
    deep pass slowed down by 0.2 s shows up in time_blocks, not in time_head."""
    import importlib
    import time

    target = importlib.import_module(module)
    original, delay, calls = target.deep_pass, 0.2, []

    def slow_deep_pass(*args, **kwargs):
        calls.append(1)
        time.sleep(delay)
        return original(*args, **kwargs)

    monkeypatch.setattr(target, "deep_pass", slow_deep_pass)
    model, inputs, _ = copy_case
    set_flags(model, **flags)
    model.generate(input_ids=inputs[0], max_new_tokens=MAX_NEW)
    stats = model.exit_stats()
    assert calls, "no deep pass ran: the check would be weak"
    assert stats["time_blocks"] >= delay * len(calls)
    assert stats["time_head"] < delay


def test_self_speculation_equals_the_full_model_on_the_transposed_path_float32(monkeypatch):
    """With every projection as W x^T (a verification pass's product then has several rows,
    the full model's step one: the last bits may differ), float32: the tokens are still the full
    model's (HF generate, F.linear), and the exit layers those of the F.linear path."""
    import models.projection

    model = deploy_model(tiny_config(num_layers=4, vocab_size=48))
    reference = hf_twin(model)
    generator = torch.Generator().manual_seed(7)
    inputs = [torch.randint(2, 48, (1, 6), generator=generator) for _ in range(4)]
    expected = [reference.generate(input_ids=ids, max_new_tokens=MAX_NEW, do_sample=False, num_beams=1)[0].tolist()
                for ids in inputs]
    runs = {}
    for transposed in (False, True):
        monkeypatch.setattr(models.projection, "uses_transposed", lambda weight, rows: transposed)
        layers, rejected = [], 0
        for shallow, threshold, max_draft in ((1, 0.0, 3), (2, 0.05, 8), (3, 0.3, 1), (2, 0.0, 2)):
            totals = check_against_full(model, inputs, expected, **speculation_flags(shallow, threshold, max_draft))
            rejected += totals["drafted_tokens"] - totals["accepted_tokens"]
            for ids in inputs:
                model.generate(input_ids=ids, max_new_tokens=MAX_NEW)
                layers.append(model.exit_stats()["exit_layers"])
        assert rejected > 0
        runs[transposed] = layers
    assert runs[True] == runs[False]


def test_trained_copy_model_on_the_transposed_path_gives_the_full_models_tokens(copy_case, monkeypatch):
    import models.projection

    model, inputs, expected = copy_case
    monkeypatch.setattr(models.projection, "uses_transposed", lambda weight, rows: True)
    drafted = accepted = 0
    for shallow, threshold, max_draft in ((1, 0.2, 3), (2, 0.5, 8), (3, 0.0, 2)):
        totals = check_against_full(model, inputs, expected, **speculation_flags(shallow, threshold, max_draft))
        drafted, accepted = drafted + totals["drafted_tokens"], accepted + totals["accepted_tokens"]
    assert 0 < accepted < drafted, "no draft was rejected: the test would prove nothing"
