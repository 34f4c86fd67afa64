"""Vocabulary reduction of the LM head inside the decode loop (METHODS.md, "Vocabulary reduction").

At the start layer r (the first layer where confidence is computed) the full head is computed
once; its top-k(r) tokens, in score order, are retained together with their rows of W (taken
when a later layer first needs them, so a token exiting at r skips it). Later layers score only
a prefix of those rows:
  fixed     k(r) rows at every layer;
  decaying  the best k(i) rows at layer i;
  adaptive  max(k_min, ceil(k(r) (1 - beta c_(i-1)))) rows, c_(i-1) the previous layer's confidence.
An index map turns a position in the retained set back into a token id, so the full vocabulary
is never rebuilt. With `rerank`, each layer re-orders the retained set by its own scores before
the next layer keeps its prefix (progressive pruning) instead of using the start layer's order.
"""

import math
from typing import Optional

import torch


def schedule(layer: int, num_layers: int, k_max: int, k_min: int, vocab_size: int) -> int:
    """k(i) = max(k_min, floor(k_max / (1 + (k_max - k_min) / k_min * i / L))), clipped to V.

    Computed exactly, as k_max k_min L // (k_min L + (k_max - k_min) i): in floating point the
    quotient of an exact integer can land just below it and floor one too low (1875 -> 1874)."""
    k = (k_max * k_min * num_layers) // (k_min * num_layers + (k_max - k_min) * layer)
    return min(max(k_min, k), vocab_size)


def adaptive_size(k_start: int, k_min: int, scale: float, previous_confidence: float) -> int:
    """max(k_min, ceil(k(r) (1 - beta c))), never more than the retained set holds."""
    return min(k_start, max(k_min, math.ceil(k_start * (1.0 - scale * previous_confidence))))


class ReducedHead:
    """The retained rows of the LM head for one token, from its start layer on."""

    def __init__(self, mode: str, num_layers: int, k_max: int, k_min: int, scale: float, rerank: bool = False):
        self.mode, self.num_layers = mode, num_layers
        self.k_max, self.k_min, self.scale, self.rerank = k_max, k_min, scale, rerank
        self._source = None  # (start layer's full logits, W), until the retained set is taken
        self._token_ids: Optional[torch.Tensor] = None  # (k,) retained position -> token id
        self._rows: Optional[torch.Tensor] = None  # (k, d) the matching rows of W
        self.k_start = 0

    @property
    def started(self) -> bool:
        return self._source is not None

    def start(self, layer: int, full_logits: torch.Tensor, weight: torch.Tensor) -> None:
        """Start at `layer` with its full logits (1, 1, V). The top-k(layer) tokens and their rows
        are taken on first use: a token that exits at its start layer never pays for them."""
        self.k_start = schedule(layer, self.num_layers, self.k_max, self.k_min, full_logits.shape[-1])
        self._source = (full_logits, weight)
        self._token_ids = self._rows = None

    def _retain(self) -> None:
        full_logits, weight = self._source
        self._token_ids = full_logits[0, 0].topk(self.k_start).indices  # topk is sorted: score order
        self._rows = weight.index_select(0, self._token_ids)

    @property
    def token_ids(self) -> Optional[torch.Tensor]:
        if self._token_ids is None and self._source is not None:
            self._retain()
        return self._token_ids

    @property
    def rows(self) -> Optional[torch.Tensor]:
        if self._rows is None and self._source is not None:
            self._retain()
        return self._rows

    def size_at(self, layer: int, previous_confidence: float) -> int:
        """How many retained rows layer `layer` (> start layer) scores."""
        if self.mode == "fixed":
            size = self.k_start
        elif self.mode == "decaying":
            size = schedule(layer, self.num_layers, self.k_max, self.k_min, self.k_start)
        else:
            size = adaptive_size(self.k_start, self.k_min, self.scale, previous_confidence)
        return min(size, self.token_ids.shape[0])

    def logits(self, normed: torch.Tensor, size: int) -> torch.Tensor:
        """Scores (1, 1, size) of the best `size` retained tokens for an already scaled normed state."""
        rows = self.rows if size == self.rows.shape[0] else self.rows[:size]
        return torch.nn.functional.linear(normed, rows)

    def reorder(self, logits: torch.Tensor) -> None:
        """Progressive pruning: keep the scored rows, ordered by this layer's own scores."""
        order = logits[0, 0].argsort(descending=True)
        self._token_ids = self.token_ids[order]
        self._rows = self.rows.index_select(0, order)

    def token_id(self, position: torch.Tensor) -> torch.Tensor:
        """Token id of a position in the retained set."""
        return self.token_ids[position]
