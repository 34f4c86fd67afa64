"""FREE's adaptive threshold estimator: a two-component Beta mixture over shallow confidences.

Each observation is a shallow-layer confidence labelled by whether the shallow prediction agreed
with the deep one (seen in the parallel deep passes). The labels are known, so each component is
fitted to its own observations (Beta by the method of moments) and the mixing weight is the
agreement rate. The threshold is the lowest confidence above which the posterior of the "agrees"
component stays at or above the level zeta. The estimate is refitted after each of the first samples and
then kept.
"""

import math
from typing import List, Optional, Tuple

import torch

EPSILON = 1e-4  # keeps confidences of exactly 0 or 1 inside the Beta's support
GRID = torch.linspace(EPSILON, 1 - EPSILON, 2001, dtype=torch.float64)


def fit_beta(values: torch.Tensor) -> Optional[Tuple[float, float]]:
    """Method-of-moments Beta parameters, or None when the values do not determine them."""
    if values.numel() < 2:
        return None
    mean, var = values.mean().item(), values.var().item()
    if var <= 0 or var >= mean * (1 - mean):
        return None
    common = mean * (1 - mean) / var - 1
    return mean * common, (1 - mean) * common


def beta_log_pdf(x: torch.Tensor, a: float, b: float) -> torch.Tensor:
    log_norm = math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b)
    return log_norm + (a - 1) * torch.log(x) + (b - 1) * torch.log1p(-x)


def posterior_threshold(agree: Tuple[float, float], disagree: Tuple[float, float], prior: float,
                        level: float) -> float:
    """Lowest confidence c such that the posterior P(agree | c') >= `level` for every c' >= c
    (on the grid); 1.0 if the posterior at the top of the grid is below `level`.

    Read from the top, as FREE's estimator counts passing points: when the "agrees" Beta has
    a < 1 its density, and so the posterior, is high near confidence 0 too, and the lowest
    passing confidence would be ~0, letting every token exit shallow."""
    log_agree = math.log(prior) + beta_log_pdf(GRID, *agree)
    log_disagree = math.log(1 - prior) + beta_log_pdf(GRID, *disagree)
    posterior = torch.sigmoid(log_agree - log_disagree)
    failing = (posterior < level).nonzero()
    if failing.numel() == 0:
        return float(GRID[0])
    last_failing = int(failing[-1, 0])
    return float(GRID[last_failing + 1]) if last_failing + 1 < GRID.numel() else 1.0


class BetaMixtureThreshold:
    def __init__(self, initial: float, level: float, refit_samples: int):
        self.threshold = initial
        self.level = level
        self.refit_samples = refit_samples
        self.samples_seen = 0
        self.confidences: List[float] = []
        self.agreements: List[bool] = []

    @property
    def collecting(self) -> bool:
        """Whether observations of the coming sample will still be used by a refit."""
        return self.samples_seen < self.refit_samples

    def observe(self, confidence: float, agrees: bool) -> None:
        self.confidences.append(min(max(confidence, EPSILON), 1 - EPSILON))
        self.agreements.append(bool(agrees))

    def end_sample(self) -> None:
        """Refit after each sample while fewer than `refit_samples` have been seen."""
        self.samples_seen += 1
        if self.samples_seen <= self.refit_samples:
            self.refit()

    def refit(self) -> None:
        values = torch.tensor(self.confidences, dtype=torch.float64)
        labels = torch.tensor(self.agreements, dtype=torch.bool)
        if labels.all() or not labels.any():
            return  # one class only: the mixture is not identifiable yet
        agree, disagree = fit_beta(values[labels]), fit_beta(values[~labels])
        if agree is None or disagree is None:
            return
        prior = labels.double().mean().item()
        self.threshold = posterior_threshold(agree, disagree, prior, self.level)
