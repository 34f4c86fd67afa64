"""Sampling: HF's draws with no exit, the exit layer's full distribution otherwise, and
self-speculative sampling that keeps the full model's distribution.

Oracles: HF's own `generate(do_sample=True)` under the same seed; the full model's distribution
of the first two tokens enumerated exactly with HF's forward (a chi-square test over many rows
of one batch, whose rows draw independently); greedy self-speculation (temperature -> 0).
"""

import pytest
import torch
from scipy.stats import chisquare

import causal_helpers as ch
from engine_helpers import EOS, PAD, deploy_model, hf_twin, set_flags, tiny_config
from models.sampling import SamplingConfig, Sampler, speculative_accept

SOURCES = torch.tensor([[5, 6, 7, 8, 1], [9, 10, 11, 1, 0], [12, 13, 1, 0, 0]])


def spec_flags(shallow=1, threshold=0.0, max_draft=2):
    return dict(use_shallow_deep=True, shallow_exit_layer=shallow, shallow2deep_conf_type="softmax",
                shallow2deep_conf_threshold=threshold, use_self_speculation=True, max_draft_tokens=max_draft)


@pytest.fixture(scope="module")
def t5():
    model = deploy_model(tiny_config())
    return model, hf_twin(model)


@pytest.mark.parametrize("settings", [{}, dict(temperature=0.7, top_k=10), dict(top_p=0.8, top_k=0)])
def test_full_model_draws_hf_tokens_t5(t5, settings):
    model, twin = t5
    mask = (SOURCES != PAD).long()
    early_end = False
    for seed in range(4):
        for ids, am in ((SOURCES[:1], mask[:1]), (SOURCES, mask)):
            torch.manual_seed(seed)
            ours = model.generate(input_ids=ids, attention_mask=am, max_new_tokens=12, do_sample=True, **settings)
            torch.manual_seed(seed)
            theirs = twin.generate(input_ids=ids, attention_mask=am, max_new_tokens=12, do_sample=True, **settings)
            assert ours.tolist() == theirs.tolist(), (seed, settings)
            early_end |= bool((ours[:, 1:] == EOS).any())
    assert early_end  # a row finishing while others go on must not shift the others' draws


@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_full_model_draws_hf_tokens_causal(family):
    model = ch.deploy_model(ch.tiny_config(family, eos_token_id=3))
    twin = ch.hf_twin(model)
    ids, mask = ch.left_padded(ch.prompts([3, 5, 4]))
    for seed in range(3):
        for batch in ((ids[:1, -3:], mask[:1, -3:]), (ids, mask)):
            torch.manual_seed(seed)
            ours = model.generate(input_ids=batch[0], attention_mask=batch[1], max_new_tokens=8, do_sample=True,
                                  temperature=1.5)
            torch.manual_seed(seed)
            theirs = twin.generate(input_ids=batch[0], attention_mask=batch[1], max_new_tokens=8, do_sample=True,
                                   temperature=1.5, pad_token_id=ch.PAD)
            assert ours.tolist() == theirs.tolist(), (family, seed)


def test_generator_reproduces_and_global_seed_untouched(t5):
    model, _ = t5
    draws = [model.generate(input_ids=SOURCES, max_new_tokens=8, do_sample=True,
                            generator=torch.Generator().manual_seed(s)).tolist() for s in (1, 1, 2)]
    assert draws[0] == draws[1] != draws[2]


def test_errors(t5):
    model, _ = t5
    with pytest.raises(ValueError, match="beam search is not supported"):
        model.generate(input_ids=SOURCES, num_beams=2)
    with pytest.raises(ValueError, match="temperature only apply with do_sample=True"):
        model.generate(input_ids=SOURCES, temperature=0.5)
    for bad in (dict(temperature=0.0), dict(top_k=-1), dict(top_p=0.0), dict(top_p=1.5)):
        with pytest.raises(ValueError, match=next(iter(bad))):
            model.generate(input_ids=SOURCES, do_sample=True, **bad)


def test_hf_defaults_and_order():
    config = SamplingConfig.resolve(None)
    assert config == SamplingConfig(1.0, 50, 1.0)
    names = [type(w).__name__ for w in SamplingConfig(0.5, 3, 0.9).processors()]
    assert names == ["TemperatureLogitsWarper", "TopKLogitsWarper", "TopPLogitsWarper"]


def test_reduced_head_never_restricts_draws():
    """A 2-token retained set decides the exit at layer 2; the drawn tokens are not limited to it."""
    # this source's first token: confidence 0.27 at layer 1 (full head), 0.76 at layer 2 (its top 2)
    model = deploy_model(tiny_config(), use_early_exit=True, exit_conf_type="softmax", exit_conf_threshold=0.5,
                         exit_min_layer=1, type_vocab_reduct="fixed", vocab_k_max=2, vocab_k_min=2)
    rows = torch.tensor([[46, 53, 54, 31, 17]]).repeat(300, 1)
    out = model.generate(input_ids=rows, max_new_tokens=1, do_sample=True, generator=torch.Generator().manual_seed(0))
    exits = [e[0] for e in model.exit_stats()["exit_layers"]]
    at_reduced = [int(out[b, 1]) for b, e in enumerate(exits) if e == 2]
    assert len(at_reduced) > 50
    assert len(set(at_reduced)) > 2


# ----- self-speculative sampling -------------------------------------------------------------------
V = 8


@pytest.fixture(scope="module")
def small_vocab():
    model = deploy_model(tiny_config(vocab_size=V), seed=3)
    twin = hf_twin(model)
    source = torch.tensor([[4, 5, 6, 7, 1]])
    with torch.no_grad():  # exact joint distribution of the first two tokens
        first = twin(input_ids=source, decoder_input_ids=torch.tensor([[PAD]])).logits[0, -1].double().softmax(-1)
        prefixes = torch.tensor([[PAD, t] for t in range(V)])
        second = twin(input_ids=source.repeat(V, 1), decoder_input_ids=prefixes).logits[:, -1].double().softmax(-1)
    expected = {(EOS,): float(first[EOS])}
    for a in range(V):
        if a != EOS:
            for b in range(V):
                expected[(a, b)] = float(first[a] * second[a, b])
    return model, source, expected


def chi_square_pvalue(out, expected):
    counts = dict.fromkeys(expected, 0)
    for row in out.tolist():
        counts[(EOS,) if row[1] == EOS else (row[1], row[2])] += 1
    n = out.shape[0]
    cells = sorted(expected, key=expected.get)
    observed, wanted, rest_o, rest_e = [], [], 0, 0.0
    for cell in cells:  # pool the rare cells so every expected count is at least 5
        if expected[cell] * n < 5 or rest_e * n < 5 and rest_e > 0:
            rest_o, rest_e = rest_o + counts[cell], rest_e + expected[cell]
        else:
            observed.append(counts[cell])
            wanted.append(expected[cell] * n)
    observed.append(rest_o)
    wanted.append(rest_e * n)
    total = sum(wanted)
    return chisquare(observed, [w * n / total for w in wanted]).pvalue


N = 3000


@pytest.mark.parametrize("max_draft", [1, 2])
def test_self_speculative_sampling_keeps_full_distribution(small_vocab, max_draft):
    """max_draft 2: both tokens drafted, one final verification; 1: one draft, then a token from p."""
    model, source, expected = small_vocab
    set_flags(model, **spec_flags(max_draft=max_draft))
    out = model.generate(input_ids=source.repeat(N, 1), max_new_tokens=2, do_sample=True,
                         generator=torch.Generator().manual_seed(0))
    stats = model.exit_stats()
    assert 0.1 < stats["acceptance_rate"] < 0.99  # both acceptance and rejection are exercised
    assert chi_square_pvalue(out, expected) > 1e-3


def test_chi_square_rejects_the_draft_distribution(small_vocab):
    """The same test fails for sampling from the shallow layer alone: it can tell."""
    model, source, expected = small_vocab
    set_flags(model, static_exit_layer=1)
    out = model.generate(input_ids=source.repeat(N, 1), max_new_tokens=2, do_sample=True,
                         generator=torch.Generator().manual_seed(0))
    assert chi_square_pvalue(out, expected) < 1e-6


def test_speculative_accept_rules():
    p = torch.tensor([[0.5, 0.5, 0.0], [0.2, 0.3, 0.5]])
    q = torch.tensor([[0.0, 0.5, 0.5], [1.0, 0.0, 0.0]])
    assert speculative_accept(p, q, [1, 0], torch.tensor([0.99, 0.1])) == (2, None)  # p/q = 1, then 0.2
    accepted, residual = speculative_accept(p, q, [2, 0], torch.tensor([0.0, 0.0]))  # p(2) = 0: rejected
    assert accepted == 0 and residual.tolist() == [1.0, 0.0, 0.0]
    accepted, residual = speculative_accept(p, q, [1, 0], torch.tensor([0.5, 0.5]))
    assert accepted == 1 and torch.allclose(residual, torch.tensor([0.0, 0.3, 0.5]) / 0.8)


def test_near_zero_temperature_is_greedy_self_speculation(t5):
    model, _ = t5
    mask = (SOURCES != PAD).long()
    for flags in (spec_flags(1, 0.0, 3), spec_flags(2, 0.02, 2)):
        set_flags(model, **flags)
        greedy = model.generate(input_ids=SOURCES, attention_mask=mask, max_new_tokens=12)
        drafted = model.exit_stats()["drafted_tokens"]
        sampled = model.generate(input_ids=SOURCES, attention_mask=mask, max_new_tokens=12, do_sample=True,
                                 temperature=1e-6, generator=torch.Generator().manual_seed(0))
        assert drafted > 0 and sampled.tolist() == greedy.tolist()
    set_flags(model)


def test_near_zero_temperature_is_greedy_causal():
    model = ch.deploy_model(ch.tiny_config("llama"), **spec_flags(2, 0.1, 3))
    ids, mask = ch.left_padded(ch.prompts([3, 5]))
    greedy = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=10)
    sampled = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=10, do_sample=True,
                             temperature=1e-6, generator=torch.Generator().manual_seed(0))
    assert sampled.tolist() == greedy.tolist()


# ----- FREE's shallow-deep under sampling -------------------------------------------------------------
def free_flags(threshold, **extra):
    return dict(use_shallow_deep=True, shallow_exit_layer=1, shallow2deep_conf_type="softmax",
                shallow2deep_conf_threshold=threshold, parallel_gen_token=True, **extra)


def test_free_sampling_extremes(t5):
    """Every token confident: draws from layer k, as static exit at k under the same seed; no
    token confident: the full model's draws (HF's)."""
    model, twin = t5
    mask = (SOURCES != PAD).long()

    def draw(**flags):
        set_flags(model, **flags)
        return model.generate(input_ids=SOURCES, attention_mask=mask, max_new_tokens=10, do_sample=True,
                              generator=torch.Generator().manual_seed(5)).tolist()

    assert draw(**free_flags(0.0)) == draw(static_exit_layer=1)
    assert draw(**free_flags(1.0)) == draw()
    set_flags(model, **free_flags(0.3, rollback_conf_threshold=1.0))
    model.generate(input_ids=SOURCES, attention_mask=mask, max_new_tokens=10, do_sample=True)
    set_flags(model)
