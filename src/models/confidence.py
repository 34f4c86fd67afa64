"""Confidence measures of an intermediate decoder layer (METHODS.md, "Confidence measures").

Each function takes the tensors of one or more tokens (leading dimensions are kept) and returns
one confidence per token, in float32 or wider so that half-precision models compare thresholds
without rounding surprises.
"""

import torch
import torch.nn.functional as F


def _wide(x: torch.Tensor) -> torch.Tensor:
    """x in at least float32 (float64 stays float64)."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def top2_gap(probs: torch.Tensor) -> torch.Tensor:
    """p(1) - p(2): gap between the two largest entries of each distribution on the last axis."""
    if probs.shape[-1] < 2:  # a one-token distribution is certain
        return probs[..., 0]
    top = probs.topk(2, dim=-1).values
    return top[..., 0] - top[..., 1]


def softmax_confidence(logits: torch.Tensor) -> torch.Tensor:
    """CALM's softmax measure: gap between the two most probable tokens."""
    return top2_gap(F.softmax(_wide(logits), dim=-1))


def state_confidence(hidden: torch.Tensor, previous_hidden: torch.Tensor) -> torch.Tensor:
    """CALM's hidden-state saturation: cosine similarity of h_l and h_(l-1)."""
    return F.cosine_similarity(_wide(hidden), _wide(previous_hidden), dim=-1)


def meta_confidence(meta_head: torch.nn.Module, normed_hidden: torch.Tensor) -> torch.Tensor:
    """P(exit) from the trained meta classifier applied to norm(h_l)."""
    return F.softmax(_wide(meta_head(normed_hidden)), dim=-1)[..., 1]


def build_meta_head(d_model: int) -> torch.nn.Module:
    """The meta classifier: a small MLP on the normalised hidden state giving [stay, exit] logits."""
    return torch.nn.Sequential(
        torch.nn.Linear(d_model, d_model),
        torch.nn.ReLU(),
        torch.nn.Linear(d_model, 2),
    )
