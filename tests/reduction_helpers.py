"""An independent check of every prediction made from a reduced vocabulary (issue 13, item 14).

The decode loop is watched through LayerScorer; each prediction after the start layer is
recomputed from the hidden states alone: the start layer's full head through the model's own
output head (decode_loop.output_logits, not the scorer's fused norm), its top-k(r) in score order
by torch.topk with k from the published formula in exact fractions, the prefix the mode keeps,
and the argmax of the exit layer's logits over that prefix.
"""

import math
from fractions import Fraction

import torch

from models.decode_loop import output_logits
from models.layer_scorer import LayerScorer


def published_k(layer: int, num_layers: int, k_max: int, k_min: int, vocab_size: int) -> int:
    k = math.floor(Fraction(k_max) / (1 + Fraction(k_max - k_min, k_min) * Fraction(layer, num_layers)))
    return min(max(k_min, k), vocab_size)


class RetainedSetCheck:
    def __init__(self, monkeypatch, model, mode: str, rerank: bool, k_max: int, k_min: int, beta: float = 0.9):
        self.model, self.mode, self.rerank = model, mode, rerank
        self.k_max, self.k_min, self.beta = k_max, k_min, beta
        self.checked = 0
        start_step, confidence, predict = LayerScorer.start_step, LayerScorer.confidence, LayerScorer.predict
        check = self

        def watched_start(scorer, counters):
            start_step(scorer, counters)
            scorer.watched = {}  # layer -> (hidden state, confidence) of this token

        def watched_confidence(scorer, layer, hidden, previous):
            values = confidence(scorer, layer, hidden, previous)
            assert hidden.shape[0] == 1, "the check follows one row: decode at batch 1"
            scorer.watched[layer] = (hidden, values[0])
            return values

        def watched_predict(scorer, layer, hidden, which):
            tokens = predict(scorer, layer, hidden, which)
            check.verify(scorer.watched, layer, hidden, int(tokens[0]))
            return tokens

        monkeypatch.setattr(LayerScorer, "start_step", watched_start)
        monkeypatch.setattr(LayerScorer, "confidence", watched_confidence)
        monkeypatch.setattr(LayerScorer, "predict", watched_predict)

    def k(self, layer: int) -> int:
        config = self.model.config
        return published_k(layer, config.num_decoder_layers, self.k_max, self.k_min, config.vocab_size)

    def verify(self, watched, layer: int, hidden: torch.Tensor, token: int) -> None:
        start = min(watched)
        if layer == start or layer not in watched:
            return  # the start layer's full head, or layer L's: no reduction
        with torch.no_grad():
            ranking = torch.topk(output_logits(self.model, watched[start][0])[0, -1], self.k(start)).indices
            assert token in ranking.tolist(), (layer, token)
            if self.rerank:
                self.checked += 1
                return  # a re-ranked prefix depends on every layer's order: membership only
            if self.mode == "fixed":
                size = self.k(start)
            elif self.mode == "decaying":
                size = self.k(layer)
            else:  # adaptive: from the previous layer's confidence
                size = min(self.k(start), max(self.k_min, math.ceil(self.k(start) * (1 - self.beta * watched[layer - 1][1]))))
            prefix = ranking[:size]
            scores = output_logits(self.model, hidden)[0, -1]
            assert token == int(prefix[scores[prefix].argmax()]), (layer, size)
        self.checked += 1
