"""FREE's adaptive threshold estimator: a two-component Beta mixture over shallow confidences.

Each observation is a shallow-layer confidence labelled by whether the shallow prediction agreed
with the deep one (seen in the parallel deep passes). As FREE's `BetaMixture1D.fit(x, y)` then
`predict_proba(0.3, 0.9)` compute it:

- confidences are clipped to [1e-4, 1 - 1e-4];
- responsibilities are the one-hot labels with entries at or below 1e-4 raised to 1e-4 and each
  observation's pair renormalised (so each component gives every observation of the other class a
  weight of about 5e-4);
- each component is a Beta fitted by weighted moments with the population variance:
  alpha = m (m (1 - m) / s2 - 1), beta = alpha (1 - m) / m;
- on FREE's grid of 10 points evenly over [0.3, 0.9], a point passes when
  pdf_i / (pdf_i + pdf_other) > zeta, i the component with the higher mean (no mixing weights);
  with P passing points the threshold is grid[N - P], the index clipped to [0, N - 1].

Component i is the "agrees" one whenever its mean is the higher, as on any useful shallow layer.
Where "disagrees" has the higher mean we do as FREE does and use that component's ratio: the
threshold then counts the points where disagreeing is the likelier, an unusual fit reported as
it is rather than patched.

One difference, where FREE's arithmetic breaks: when a component's weighted variance is 0 (all
observations equal, e.g. a single one) FREE divides by zero and its NaN densities give 0.9; we
keep the previous threshold until the observations determine both Betas.

The estimate is refitted after each of the first `refit_samples` samples and then kept.
"""

import math
from typing import List, Optional, Tuple

import torch

EPSILON = 1e-4  # keeps confidences of exactly 0 or 1 inside the Beta's support; FREE's floor of responsibilities
GRID = torch.linspace(0.3, 0.9, 10, dtype=torch.float64)  # FREE's predict_proba(0.3, 0.9), lookup_resolution 10


def responsibilities(labels: torch.Tensor) -> torch.Tensor:
    """(2, n) weights: row 1 the "agrees" component. One-hot labels, floored at EPSILON, each
    column renormalised (FREE's smoothed supervised responsibilities)."""
    onehot = torch.stack([~labels, labels]).double()
    weights = onehot.clamp(min=EPSILON)
    return weights / weights.sum(0)


def fit_beta_weighted(values: torch.Tensor, weights: torch.Tensor) -> Optional[Tuple[float, float]]:
    """Beta parameters by weighted moments (population variance), or None when the variance is 0."""
    mean = float((weights * values).sum() / weights.sum())
    var = float((weights * (values - mean) ** 2).sum() / weights.sum())
    if not var > 0:
        return None
    alpha = mean * (mean * (1 - mean) / var - 1)
    return alpha, alpha * (1 - mean) / mean


def beta_log_pdf(x: torch.Tensor, a: float, b: float) -> torch.Tensor:
    log_norm = math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b)
    return log_norm + (a - 1) * torch.log(x) + (b - 1) * torch.log1p(-x)


def grid_threshold(disagree: Tuple[float, float], agree: Tuple[float, float], level: float) -> float:
    """FREE's lookup: count the grid points where the higher-mean component's likelihood ratio
    exceeds `level`; the threshold is grid[N - count], clipped to the grid."""
    components = [disagree, agree]
    i = 1 if agree[0] / sum(agree) > disagree[0] / sum(disagree) else 0  # argmax of the means; a tie takes 0, as numpy's
    mine, other = beta_log_pdf(GRID, *components[i]), beta_log_pdf(GRID, *components[1 - i])
    passing = int((torch.sigmoid(mine - other) > level).sum())  # pdf_i / (pdf_i + pdf_o), computed in logs
    n = GRID.numel()
    return float(GRID[min(max(0, n - passing), n - 1)])


class BetaMixtureThreshold:
    def __init__(self, initial: float, level: float, refit_samples: int):
        self.threshold = initial
        self.level = level
        self.refit_samples = refit_samples
        self.samples_seen = 0
        self.confidences: List[float] = []
        self.agreements: List[bool] = []
        self.settings: Optional[tuple] = None  # the decoding settings it is fitted under (set by its user)

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
        if not self.confidences:
            return
        values = torch.tensor(self.confidences, dtype=torch.float64)
        weights = responsibilities(torch.tensor(self.agreements, dtype=torch.bool))
        disagree, agree = fit_beta_weighted(values, weights[0]), fit_beta_weighted(values, weights[1])
        if agree is None or disagree is None:
            return  # the observations do not determine both Betas yet
        self.threshold = grid_threshold(disagree, agree, self.level)
