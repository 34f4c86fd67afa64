"""Task metrics computed locally (nothing is fetched at run time), on a 0-100 scale.

- SQuAD exact match and F1 with the official v1.1 answer normalisation, the max over references.
- ROUGE-1/2/L/Lsum with `rouge_score` and Porter stemming; rougeLsum needs one sentence per line,
  which a regex splitter provides (nltk's punkt model would need a download).
- corpus BLEU with sacreBLEU's default settings (13a tokenisation).
"""

import re
import string
from collections import Counter
from typing import Dict, List, Sequence

import sacrebleu
from rouge_score import rouge_scorer

ROUGE_TYPES = ("rouge1", "rouge2", "rougeL", "rougeLsum")

_ARTICLES = re.compile(r"\b(a|an|the)\b", re.UNICODE)
_PUNCTUATION = set(string.punctuation)
# a sentence ends at . ! or ? (optionally followed by closing quotes/brackets) before whitespace
_SENTENCE_END = re.compile(r"(?:(?<=[.!?])|(?<=[.!?][\"')\]]))\s+")


# ----- SQuAD ----------------------------------------------------------------------------------
def normalize_answer(text: str) -> str:
    """Official SQuAD v1.1 normalisation: lower case, no punctuation, no articles, single spaces."""
    text = text.lower()
    text = "".join(ch for ch in text if ch not in _PUNCTUATION)
    text = _ARTICLES.sub(" ", text)
    return " ".join(text.split())


def exact_match_score(prediction: str, reference: str) -> float:
    return float(normalize_answer(prediction) == normalize_answer(reference))


def f1_score(prediction: str, reference: str) -> float:
    """Token-level F1 between normalised answers (0..1)."""
    pred_tokens = normalize_answer(prediction).split()
    ref_tokens = normalize_answer(reference).split()
    common = Counter(pred_tokens) & Counter(ref_tokens)
    overlap = sum(common.values())
    if overlap == 0:
        return 0.0
    precision = overlap / len(pred_tokens)
    recall = overlap / len(ref_tokens)
    return 2 * precision * recall / (precision + recall)


def squad_metrics(predictions: Sequence[str], references: Sequence[Sequence[str]]) -> Dict[str, float]:
    """{"exact_match", "f1"} in 0..100, each the mean over questions of the max over references."""
    _check_pairs(predictions, references)
    exact = f1 = 0.0
    for prediction, answers in zip(predictions, references):
        if not answers:
            raise ValueError("every question needs at least one reference answer to be scored.")
        exact += max(exact_match_score(prediction, a) for a in answers)
        f1 += max(f1_score(prediction, a) for a in answers)
    n = len(predictions)
    return {"exact_match": 100.0 * exact / n, "f1": 100.0 * f1 / n}


# ----- ROUGE ----------------------------------------------------------------------------------
def split_sentences(text: str) -> List[str]:
    """Sentences of `text` by punctuation and line breaks, no model needed."""
    sentences = []
    for line in text.strip().splitlines():
        sentences.extend(s.strip() for s in _SENTENCE_END.split(line.strip()) if s.strip())
    return sentences


def rouge_metrics(predictions: Sequence[str], references: Sequence[str]) -> Dict[str, float]:
    """Mean ROUGE F-measures in 0..100 (single reference per prediction)."""
    _check_pairs(predictions, references)
    scorer = rouge_scorer.RougeScorer(list(ROUGE_TYPES), use_stemmer=True)
    totals = dict.fromkeys(ROUGE_TYPES, 0.0)
    for prediction, reference in zip(predictions, references):
        # rougeLsum reads sentences from newlines; the other types ignore them.
        scores = scorer.score("\n".join(split_sentences(reference)), "\n".join(split_sentences(prediction)))
        for name in ROUGE_TYPES:
            totals[name] += scores[name].fmeasure
    n = len(predictions)
    return {name: 100.0 * total / n for name, total in totals.items()}


# ----- BLEU -----------------------------------------------------------------------------------
def bleu_metrics(predictions: Sequence[str], references: Sequence[Sequence[str]]) -> Dict[str, float]:
    """sacreBLEU corpus score (0..100); `references[i]` lists the references of prediction i."""
    _check_pairs(predictions, references)
    counts = {len(r) for r in references}
    if len(counts) != 1 or 0 in counts:
        raise ValueError("BLEU needs the same, non-zero number of references for every prediction.")
    streams = [list(stream) for stream in zip(*references)]  # sacreBLEU wants one list per reference
    return {"bleu": sacrebleu.corpus_bleu(list(predictions), streams).score}


def _check_pairs(predictions, references) -> None:
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions but {len(references)} references.")
    if not predictions:
        raise ValueError("no predictions to score.")
