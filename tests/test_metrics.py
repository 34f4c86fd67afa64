"""Offline task metrics against hand-computed values."""

import math

import pytest

from util.metrics import (bleu_metrics, exact_match_score, f1_score, normalize_answer, rouge_metrics,
                          split_sentences, squad_metrics)


@pytest.mark.parametrize("raw, normalised", [
    ("The Denver Broncos", "denver broncos"),
    ("  an   Apple, a day!  ", "apple day"),
    ("Theatre of the Absurd", "theatre of absurd"),  # 'the' inside a word stays
    ("\"golden anniversary\"", "golden anniversary"),
    ("Levi's Stadium.", "levis stadium"),
    ("A", ""),
])
def test_squad_normalisation(raw, normalised):
    assert normalize_answer(raw) == normalised


def test_exact_match_ignores_case_articles_and_punctuation():
    assert exact_match_score("the Denver Broncos!", "Denver Broncos") == 1.0
    assert exact_match_score("Denver", "Denver Broncos") == 0.0


def test_f1_by_hand():
    # prediction tokens: santa clara california stadium; reference: levis stadium santa clara
    # overlap 3 (santa, clara, stadium): precision 3/4, recall 3/4 -> F1 0.75
    assert f1_score("Santa Clara, California stadium", "Levi's Stadium, Santa Clara") == pytest.approx(0.75)
    # a repeated token matches once: pred "y y", ref "y" -> precision 1/2, recall 1 -> 2/3
    assert f1_score("y y", "y") == pytest.approx(2 / 3)
    assert f1_score("nothing shared", "at all") == 0.0
    assert f1_score("", "something") == 0.0


def test_squad_metrics_take_the_best_reference_and_scale_to_100():
    predictions = ["Denver Broncos", "Santa Clara"]
    references = [["Carolina Panthers", "the Denver Broncos"], ["Levi's Stadium", "Santa Clara, California"]]
    scores = squad_metrics(predictions, references)
    # question 1: EM 1, F1 1; question 2: EM 0, F1 = 2*(1*2/3)/(1+2/3) = 0.8
    assert scores["exact_match"] == pytest.approx(50.0)
    assert scores["f1"] == pytest.approx(90.0)


def test_squad_metrics_refuse_mismatched_or_empty_input():
    with pytest.raises(ValueError, match="2 predictions but 1 references"):
        squad_metrics(["a", "b"], [["a"]])
    with pytest.raises(ValueError, match="at least one reference"):
        squad_metrics(["a"], [[]])
    with pytest.raises(ValueError, match="no predictions"):
        squad_metrics([], [])


def test_sentence_split_needs_no_model():
    text = "Amanda baked cookies. Will Jerry come?  \"Yes!\" He will bring milk\nNew line here"
    assert split_sentences(text) == ["Amanda baked cookies.", "Will Jerry come?", "\"Yes!\"", "He will bring milk",
                                     "New line here"]


def test_rouge_identical_disjoint_and_partial():
    same = rouge_metrics(["The cat sat on the mat. It slept."], ["The cat sat on the mat. It slept."])
    assert all(v == pytest.approx(100.0) for v in same.values())
    assert set(same) == {"rouge1", "rouge2", "rougeL", "rougeLsum"}
    apart = rouge_metrics(["alpha beta gamma"], ["delta epsilon zeta"])
    assert all(v == 0.0 for v in apart.values())
    # unigrams: pred {cat, sat}, ref {cat, ran}: P = R = 1/2 -> 50; no shared bigram
    partial = rouge_metrics(["cat sat"], ["cat ran"])
    assert partial["rouge1"] == pytest.approx(50.0)
    assert partial["rouge2"] == 0.0


def test_rouge_uses_stemming():
    assert rouge_metrics(["the cats were running"], ["the cat was run"])["rouge1"] == pytest.approx(75.0)


def test_rouge_lsum_reads_sentences():
    # two sentences in swapped order: rougeL (one sequence) < rougeLsum (per-sentence union LCS)
    scores = rouge_metrics(["the dog barked loudly. the cat sat down."], ["the cat sat down. the dog barked loudly."])
    assert scores["rougeLsum"] == pytest.approx(100.0)
    assert scores["rougeL"] < 100.0


def test_bleu_identical_is_100_and_disjoint_is_0():
    text = "The goods cost less than 20 euros ."
    assert bleu_metrics([text, "I am a serious customer ."], [[text], ["I am a serious customer ."]])["bleu"] == pytest.approx(100.0)
    assert bleu_metrics(["completely different words here"], [["the goods cost less than twenty"]])["bleu"] == 0.0


def test_bleu_by_hand_brevity_penalty():
    # all n-grams of the 4-word prediction match the 6-word reference: precisions 1, BP = exp(1 - 6/4)
    score = bleu_metrics(["a b c d"], [["a b c d e f"]])["bleu"]
    assert score == pytest.approx(100 * math.exp(1 - 6 / 4), rel=1e-6)


def test_bleu_with_two_references_per_prediction():
    score = bleu_metrics(["a b c d"], [["w x y z", "a b c d"]])["bleu"]
    assert score == pytest.approx(100.0)
    with pytest.raises(ValueError, match="same, non-zero number of references"):
        bleu_metrics(["a", "b"], [["a"], ["b", "c"]])
