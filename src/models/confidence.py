"""Confidence measures of an intermediate decoder layer (METHODS.md, "Confidence measures").

Each function takes the tensors of one or more tokens (leading dimensions are kept) and returns
one confidence per token, in float32 or wider so that half-precision models compare thresholds
without rounding surprises.
"""

from typing import List

import torch
import torch.nn.functional as F

from models.projection import project


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


def softmax_confidence_values(logits: torch.Tensor) -> List[float]:
    """softmax_confidence of each row of logits (R, n), as Python floats: the batched hot path
    (softmax in at least float32, top-2, one host read; -inf scores take no mass)."""
    probs = F.softmax(logits, dim=-1, dtype=torch.promote_types(logits.dtype, torch.float32))
    if probs.shape[-1] < 2:  # a one-token distribution is certain
        return probs[:, 0].tolist()
    return [first - second for first, second in probs.topk(2, dim=-1).values.tolist()]


def state_confidence(hidden: torch.Tensor, previous_hidden: torch.Tensor) -> torch.Tensor:
    """CALM's hidden-state saturation: cosine similarity of h_l and h_(l-1)."""
    return F.cosine_similarity(_wide(hidden), _wide(previous_hidden), dim=-1)


def meta_confidence(meta_head: torch.nn.Sequential, normed_hidden: torch.Tensor) -> torch.Tensor:
    """P(exit) from the trained meta classifier applied to norm(h_l); its linear layers go through
    models.projection, as the decode loop's own."""
    scores = normed_hidden
    for layer in meta_head:
        scores = project(layer, scores)
    return F.softmax(_wide(scores), dim=-1)[..., 1]


def build_meta_head(d_model: int, bias: bool = True) -> torch.nn.Module:
    """The meta classifier: a small MLP on the normalised hidden state giving [stay, exit] logits
    (FREE's has no biases; ours are trained with them)."""
    return torch.nn.Sequential(
        torch.nn.Linear(d_model, d_model, bias=bias),
        torch.nn.ReLU(),
        torch.nn.Linear(d_model, 2, bias=bias),
    )


META_HEAD_BIASES = ("cm_head.0.bias", "cm_head.2.bias")


# ----- contrastive measures (the fork's additions) -------------------------------------------
#
# Every contrastive quantity lives on the plausibility head V_head = {x : p_l(x) >= alpha max p_l}
# and only needs *logits* there: softmax over V_head of (log p_l - log p_a) equals softmax of
# (z_l - z_a) on V_head, because each distribution's normaliser is a constant that cancels; the
# JSD of the two distributions restricted to V_head and renormalised is likewise a function of
# the head logits alone. So an amateur layer is scored on the head's rows of W only.

LN2 = 0.6931471805599453


def plausibility_head(probs: torch.Tensor, alpha: float) -> torch.Tensor:
    """Positions (1-D, ascending) of {x : p(x) >= alpha max p} in a 1-D distribution."""
    return (probs >= alpha * probs.max()).nonzero().flatten()


def contrastive_head_scores(expert_head_logits: torch.Tensor, amateur_head_logits: torch.Tensor,
                            expert_head_mass: torch.Tensor = None) -> torch.Tensor:
    """s on V_head: softmax(log p_l - log p_a), times sum_{V_head} p_l when reweighting."""
    contrast = _wide(expert_head_logits) - _wide(amateur_head_logits)
    # an amateur probability of exactly zero makes the contrast +inf: that token takes all the mass
    contrast = torch.nan_to_num(contrast, posinf=torch.finfo(contrast.dtype).max)
    scores = F.softmax(contrast, dim=-1)
    return scores if expert_head_mass is None else scores * expert_head_mass


def contrastive_confidence(expert_probs: torch.Tensor, head: torch.Tensor, head_scores: torch.Tensor):
    """s(1) - s(2) of s = head scores on V_head and p_l elsewhere; also returns the argmax of s."""
    scores = expert_probs.clone()
    scores[head] = head_scores
    return top2_gap(scores), scores.argmax()


def restricted_jsd(expert_head_logits: torch.Tensor, amateur_head_logits: torch.Tensor) -> torch.Tensor:
    """JSD between the expert and each amateur (rows), both restricted to the head and renormalised.

    Works in log space (log m = logaddexp(log p, log q) - ln 2) with 0 log 0 = 0, so zero
    probabilities give finite values, never NaN; clamped to [0, ln 2] against rounding.
    """
    log_p = F.log_softmax(_wide(expert_head_logits), dim=-1)
    log_q = F.log_softmax(_wide(amateur_head_logits), dim=-1)
    log_m = torch.logaddexp(log_p, log_q) - LN2
    divergence = 0.5 * _kl_terms(log_p, log_m).sum(-1) + 0.5 * _kl_terms(log_q, log_m).sum(-1)
    return divergence.clamp(0.0, LN2)


def _kl_terms(log_p: torch.Tensor, log_m: torch.Tensor) -> torch.Tensor:
    """p (log p - log m), with 0 log 0 = 0 (a zero probability contributes nothing)."""
    p = log_p.exp()
    return torch.where(p > 0, p * (log_p - log_m), torch.zeros_like(p))


def discounted_jsd(jsd: torch.Tensor, amateur_layers: torch.Tensor, expert_layer: int) -> torch.Tensor:
    """JSD(p_l || p_j) / (l - j): divergence discounted by layer distance."""
    return jsd / (expert_layer - amateur_layers).to(jsd.dtype)
