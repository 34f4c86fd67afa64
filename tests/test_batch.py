"""Batched decoding: every row of a batch decodes exactly as it would alone, under every method.

The oracle is the same row decoded alone (batch 1, no padding); those single-row paths are in
turn checked against HF and the cache-free references in test_engine, test_shallow_deep and
test_contrastive. Rows have different source lengths, padding on either side, and the trained
copy model stops them at different steps, so rows leave the batch at different times.
"""

import copy

import pytest
import torch

from engine_helpers import EOS, PAD, deploy_model, hf_twin, planted_meta_head, tiny_config, trained_copy_model
from util.additional_args import AdditionalArguments

SOURCE_LENGTHS = (3, 6, 5, 4)
MAX_NEW_TOKENS = 14

SOFTMAX = dict(use_early_exit=True, exit_conf_type="softmax", exit_conf_threshold=0.6)
FREE = dict(use_shallow_deep=True, shallow_exit_layer=2, shallow2deep_conf_type="softmax",
            shallow2deep_conf_threshold=0.8)
METHODS = {
    "full": {},
    "static": dict(static_exit_layer=2),
    "softmax": SOFTMAX,
    "softmax-position-decay": dict(SOFTMAX, exit_min_layer=2, exit_position_temp=4.0),
    "state": dict(use_early_exit=True, exit_conf_type="state", exit_conf_threshold=0.92),
    "meta": dict(use_early_exit=True, exit_conf_type="meta", exit_conf_threshold=0.5),
    "contrastive": dict(use_early_exit=True, exit_conf_type="contrastive_decoding", exit_conf_threshold=0.5,
                        exit_min_layer=2),
    "reweighted": dict(use_early_exit=True, exit_conf_type="reweight_contrastive_decoding",
                       exit_conf_threshold=0.5, exit_min_layer=2, emit_contrastive_token=True),
    "jsd": dict(use_early_exit=True, exit_conf_type="JSD_contrastive_confidence", exit_conf_threshold=0.5,
                exit_min_layer=3, render_jsds=True),
    "fixed": dict(SOFTMAX, type_vocab_reduct="fixed", vocab_k_max=16, vocab_k_min=4),
    "decaying-rerank": dict(SOFTMAX, type_vocab_reduct="decaying", vocab_k_max=16, vocab_k_min=4, vocab_rerank=True),
    "adaptive-rerank": dict(SOFTMAX, type_vocab_reduct="adaptive", vocab_k_max=16, vocab_k_min=4, vocab_rerank=True),
    "meta-adaptive": dict(use_early_exit=True, exit_conf_type="meta", exit_conf_threshold=0.5,
                          type_vocab_reduct="adaptive", vocab_k_max=16, vocab_k_min=4),
    "state-decaying": dict(use_early_exit=True, exit_conf_type="state", exit_conf_threshold=0.92,
                           type_vocab_reduct="decaying", vocab_k_max=16, vocab_k_min=4),
    "jsd-fixed": dict(use_early_exit=True, exit_conf_type="JSD_contrastive_confidence", exit_conf_threshold=0.5,
                      exit_min_layer=3, type_vocab_reduct="fixed", vocab_k_max=16, vocab_k_min=4),
    "traces": dict(SOFTMAX, plotting_logits=True),
    "flops": dict(SOFTMAX, exit_min_layer=2, type_vocab_reduct="decaying", vocab_k_max=16, vocab_k_min=4,
                  count_flops=True),
    "free": dict(FREE, count_flops=True),
    "free-rollback": dict(FREE, rollback_conf_threshold=0.5),
    # rolls back often; a cross-entropy this close to 0 is within float32 rounding of the threshold
    # (batch and alone round differently), so it is compared in float64 only
    "free-rollback-often": dict(FREE, shallow2deep_conf_threshold=0.3, rollback_conf_threshold=0.01),
    "free-non-causal": dict(FREE, parallel_causal_mask=False),
    "free-copied-states": dict(FREE, copy_skipped_hidden_states=True),
    "free-adaptive-threshold": dict(FREE, use_adapt_threshold=True, adapt_threshold_level=0.7),  # moves on these rows
    "free-meta": dict(FREE, shallow2deep_conf_type="meta", shallow2deep_conf_threshold=0.5),
    "self-speculation": dict(FREE, shallow2deep_conf_threshold=0.0, use_self_speculation=True, max_draft_tokens=3,
                             count_flops=True),
}
SUMMED = ("shallow_tokens", "deep_tokens", "parallel_tokens", "rollbacks")
SPECULATION = ("drafted_tokens", "accepted_tokens", "verify_passes", "final_verifications")


@pytest.fixture(scope="module")
def models():
    out = {}
    for dtype in (torch.float64, torch.float32):
        model = trained_copy_model(4, dtype, lengths=(3, 4, 5, 6))
        model.cm_head = planted_meta_head(model)
        out[dtype] = model
    return out


def sources(seed=11):
    generator = torch.Generator().manual_seed(seed)
    return [torch.randint(2, 31, (1, n), generator=generator) for n in SOURCE_LENGTHS]


def padded(rows, side):
    width = max(r.shape[1] for r in rows)
    ids = torch.full((len(rows), width), PAD, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for b, r in enumerate(rows):
        n = r.shape[1]
        span = slice(0, n) if side == "right" else slice(width - n, width)
        ids[b, span], mask[b, span] = r[0], 1
    return ids, mask


def tolerance(model):
    """Float figures (trace confidences, JSDs) agree up to the rounding of a different matmul shape."""
    return dict(rel=1e-9, abs=1e-12) if model.dtype == torch.float64 else dict(rel=1e-4, abs=1e-6)


def assert_close_lists(a, b, tol):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x == pytest.approx(y, nan_ok=True, **tol)


def decode(model, args, input_ids, attention_mask=None, estimator=None):
    model.threshold_estimator = copy.deepcopy(estimator)
    out = model.generate(input_ids=input_ids, attention_mask=attention_mask, max_new_tokens=MAX_NEW_TOKENS,
                         exit_args=args)
    return out, model.exit_stats(), model.threshold_estimator


def check_rows_equal_alone(model, flags, side, estimator=None):
    args = AdditionalArguments(**flags)
    rows = sources()
    ids, mask = padded(rows, side)
    out, stats, batch_estimator = decode(model, args, ids, mask, estimator)
    exits_seen = set()
    previous = estimator  # the adaptive threshold: the rows alone one after another, as a batch-1 run
    for b, row in enumerate(rows):
        expected, alone, alone_estimator = decode(model, args, row, estimator=previous)
        if args.use_adapt_threshold:
            previous = alone_estimator
        width = expected.shape[1]
        assert out[b, :width].tolist() == expected[0].tolist(), f"row {b} tokens"
        assert (out[b, width:] == PAD).all()
        assert stats["exit_layers"][b] == alone["exit_layers"][0], f"row {b} exit layers"
        assert stats["rows"][b] == alone["rows"][0], f"row {b} block counts and FLOPs"
        exits_seen.update(alone["exit_layers"][0])
        if "layer_traces" in alone:
            mine, theirs = stats["layer_traces"][b], alone["layer_traces"][0]
            for key in ("ranks", "agrees", "exit_layers"):
                assert mine[key] == theirs[key], key
            for key in ("confidences", "max_probs"):
                assert_close_lists(mine[key], theirs[key], tolerance(model))
        if "jsd_steps" in alone:
            assert len(stats["jsd_steps"][b]) == len(alone["exit_layers"][0])
            for mine, theirs in zip(stats["jsd_steps"][b], alone["jsd_steps"][0]):
                assert mine["chosen"] == theirs["chosen"] and mine["expert_layer"] == theirs["expert_layer"]
                assert mine["jsd"] == pytest.approx(theirs["jsd"], **tolerance(model))
    if batch_estimator is not None:  # the rows refit the estimator as decoded one by one
        assert batch_estimator.confidences == pytest.approx(previous.confidences, **tolerance(model))
        assert batch_estimator.agreements == previous.agreements
        assert batch_estimator.samples_seen == previous.samples_seen and batch_estimator.threshold == previous.threshold
    return stats, exits_seen


@pytest.mark.parametrize("side", ["right", "left"])
@pytest.mark.parametrize("method", METHODS)
def test_every_row_of_a_batch_decodes_as_it_would_alone_float64(models, method, side):
    stats, exits_seen = check_rows_equal_alone(models[torch.float64], METHODS[method], side)
    if method not in ("full", "static", "traces"):
        assert len(exits_seen) >= 2, "exits do not vary: the comparison would be weak"
    assert len({len(layers) for layers in stats["exit_layers"]}) >= 2, "rows should end at different steps"


@pytest.mark.parametrize("method", ["softmax", "meta-adaptive", "jsd", "free-rollback", "flops"])
def test_every_row_of_a_batch_decodes_as_it_would_alone_float32(models, method):
    check_rows_equal_alone(models[torch.float32], METHODS[method], "right")


@pytest.mark.parametrize("method, counts", [("free-rollback-often", SUMMED), ("self-speculation", SPECULATION)])
def test_method_counts_of_a_batch_are_the_sums_of_its_rows(models, method, counts):
    model = models[torch.float64]
    args = AdditionalArguments(**METHODS[method])
    rows = sources()
    _, stats, _ = decode(model, args, *padded(rows, "left"))
    totals = dict.fromkeys(counts, 0)
    for row in rows:
        _, alone, _ = decode(model, args, row)
        for key in counts:
            totals[key] += alone[key]
    assert {key: stats[key] for key in counts} == totals
    if method == "free-rollback-often":
        assert stats["rollbacks"] > 0 and stats["shallow_tokens"] + stats["deep_tokens"] == stats["tokens"]
    else:
        assert 0 < stats["accepted_tokens"] < stats["drafted_tokens"]  # drafts were accepted and rejected


def test_adaptive_threshold_rows_decode_one_after_another_as_at_batch_one(models):
    model = models[torch.float64]
    args = AdditionalArguments(**METHODS["free-adaptive-threshold"])
    estimator = None
    for row in sources(5):  # an estimator that has seen a few samples
        _, _, estimator = decode(model, args, row, estimator=estimator)
    assert estimator.confidences, "the estimator saw nothing"
    thresholds, chained = [estimator.threshold], estimator
    for row in sources():
        _, _, chained = decode(model, args, row, estimator=chained)
        thresholds.append(chained.threshold)
    assert len(set(thresholds[:-1])) > 1, "the estimate did not move between rows: the check would be weak"
    for side in ("right", "left"):
        check_rows_equal_alone(model, METHODS["free-adaptive-threshold"], side, estimator=estimator)


def test_exit_args_decode_one_call_and_leave_the_config_as_it_was(models):
    model = models[torch.float64]
    rows = sources()
    full, _, _ = decode(model, AdditionalArguments(), rows[0])
    exiting, stats, _ = decode(model, AdditionalArguments(**SOFTMAX), rows[0])
    assert stats["block_avg"] < 4.0  # the call's flags were used
    assert model.config.use_early_exit is False or model.config.use_early_exit is None
    again = model.generate(input_ids=rows[0], max_new_tokens=MAX_NEW_TOKENS)
    assert torch.equal(again, full) and model.exit_stats()["block_avg"] == 4.0


@pytest.mark.parametrize("side", ["right", "left"])
def test_full_model_batch_equals_hf_generate_with_the_same_padding(side):
    model = deploy_model(tiny_config(feed_forward_proj="gated-gelu", tie_word_embeddings=False))
    reference = hf_twin(model)
    generator = torch.Generator().manual_seed(2)
    rows = [torch.randint(2, 64, (1, n), generator=generator) for n in (7, 3, 5)]
    ids, mask = padded(rows, side)
    expected = reference.generate(input_ids=ids, attention_mask=mask, max_new_tokens=10, do_sample=False, num_beams=1)
    assert torch.equal(model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=10), expected)


def test_rows_that_end_early_leave_the_batch(models):
    """A finished row costs nothing: block counts of the batch are the sums over its rows."""
    model = models[torch.float32]
    rows = sources()
    _, stats, _ = decode(model, AdditionalArguments(), *padded(rows, "right"))
    lengths = [len(layers) for layers in stats["exit_layers"]]
    assert min(lengths) < max(lengths)
    assert stats["block_op"] == [sum(lengths)] * 4  # each row ran every block once per own token
    out = model.generate(input_ids=padded(rows, "right")[0], attention_mask=padded(rows, "right")[1],
                         max_new_tokens=MAX_NEW_TOKENS)
    ended = [b for b, n in enumerate(lengths) if n < MAX_NEW_TOKENS]
    assert ended and all(out[b, lengths[b]].item() == EOS for b in ended)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("method", ["softmax", "fixed", "jsd", "free-rollback", "self-speculation", "traces"])
def test_every_row_of_a_batch_decodes_as_it_would_alone_on_cuda(models, method):
    model = copy.deepcopy(models[torch.float32]).to("cuda")
    check_rows_equal_alone(model, METHODS[method], "right")


# The test models are far below models.projection.SMALL_WEIGHTS, so the loop would call F.linear;
# these run the W x^T path (every projection, one row as a 2-row product).
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("method", ["softmax", "jsd", "free-rollback", "self-speculation", "flops"])
def test_rows_decode_as_alone_with_cross_attention_read_as_slices(models, method, dtype, monkeypatch):
    import models.decode_loop as loop

    runs_seen, original = [], loop.consecutive_runs
    monkeypatch.setattr(loop, "CROSS_VIEWS_FROM", 0)  # every source counts as long: slices, no gathered copy
    monkeypatch.setattr(loop, "consecutive_runs", lambda local: runs_seen.append(original(local)) or runs_seen[-1])
    check_rows_equal_alone(models[dtype], METHODS[method], "right")
    assert runs_seen, "no block ran a proper subset of the rows"
    if method != "self-speculation":  # its verifying rows happen to be adjacent or alone here
        assert any(len(runs) > 1 for runs in runs_seen), "no block ran scattered rows"


def test_consecutive_runs_by_hand():
    from models.decode_loop import consecutive_runs

    assert consecutive_runs([0, 1, 2]) == [(0, 0, 3)]
    assert consecutive_runs([0, 2, 3, 5]) == [(0, 0, 1), (1, 2, 2), (3, 5, 1)]
    assert consecutive_runs([3, 1, 2]) == [(0, 3, 1), (1, 1, 2)]


@pytest.fixture
def transposed_projections(monkeypatch):
    import models.projection

    monkeypatch.setattr(models.projection, "uses_transposed", lambda weight, rows: weight.device.type == "cpu")


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("method", ["softmax", "flops", "meta-adaptive", "jsd", "free-rollback", "self-speculation"])
def test_rows_decode_as_alone_with_transposed_projections(models, method, dtype, transposed_projections):
    check_rows_equal_alone(models[dtype], METHODS[method], "right")


def test_full_model_equals_hf_generate_with_transposed_projections(transposed_projections):
    test_full_model_batch_equals_hf_generate_with_the_same_padding("left")
    model = deploy_model(tiny_config(feed_forward_proj="gated-gelu", tie_word_embeddings=False))
    row = torch.randint(2, 64, (1, 6), generator=torch.Generator().manual_seed(4))
    expected = hf_twin(model).generate(input_ids=row, max_new_tokens=10, do_sample=False, num_beams=1)
    assert torch.equal(model.generate(input_ids=row, max_new_tokens=10), expected)  # one row: 2-row products


@pytest.mark.parametrize("method", ["full", "free-rollback", "self-speculation"])
def test_memory_no_row_wrote_cannot_reach_a_row(models, method):
    """Rows read the cache positions that other rows filled, masked (weight exactly 0). In
    deterministic mode torch fills uninitialised memory with NaN, and 0 x NaN would turn a row's
    attention into NaN: buffers must start as numbers (they once started as torch.empty)."""
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        check_rows_equal_alone(models[torch.float32], METHODS[method], "right")
    finally:
        torch.use_deterministic_algorithms(previous)
