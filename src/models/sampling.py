"""Sampling for the decode loop: HF's logits warpers in HF's order, HF's draw.

The distribution a token is drawn from is the exit layer's full-vocabulary logits (in float32,
as HF casts them) through HF's own TemperatureLogitsWarper, TopKLogitsWarper and
TopPLogitsWarper, in the order HF's `generate` applies them; confidences are computed on the
unprocessed logits, as in greedy decoding. A draw is one `torch.multinomial` over the caller's
whole batch, as HF draws every step for every row (finished ones too): rows that draw nothing
take a uniform row whose draw is thrown away. torch.multinomial draws each row from its own slice
of the random stream, so with no exit the loop takes HF's tokens under the same seed.

Speculative sampling (Leviathan et al. 2023; Chen et al. 2023) is `speculative_accept`.
"""

from dataclasses import dataclass
from typing import List, Optional

import torch
from transformers import LogitsProcessorList, TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

# HF's values when neither the call nor the model's generation_config sets them
HF_DEFAULTS = {"temperature": 1.0, "top_k": 50, "top_p": 1.0}


@dataclass(frozen=True)
class SamplingConfig:
    temperature: float = 1.0
    top_k: Optional[int] = 50
    top_p: float = 1.0

    @classmethod
    def resolve(cls, generation_config, temperature=None, top_k=None, top_p=None) -> "SamplingConfig":
        """The call's values, else the model's generation_config's, else HF's defaults; checked."""
        values = {}
        for name, given in (("temperature", temperature), ("top_k", top_k), ("top_p", top_p)):
            value = given if given is not None else getattr(generation_config, name, None)
            values[name] = value if value is not None else HF_DEFAULTS[name]
        t, k, p = values["temperature"], values["top_k"], values["top_p"]
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not t > 0:
            raise ValueError(f"temperature={t!r} must be a positive number.")
        if isinstance(k, bool) or not isinstance(k, int) or k < 0:
            raise ValueError(f"top_k={k!r} must be a non-negative integer (0: no top-k filtering).")
        if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0 < p <= 1:
            raise ValueError(f"top_p={p!r} must be in (0, 1].")
        return cls(float(t), k, float(p))

    def processors(self) -> LogitsProcessorList:
        """HF's warpers, each only where HF adds it (`_get_logits_processor`), in its order."""
        warpers = LogitsProcessorList()
        if self.temperature != 1.0:
            warpers.append(TemperatureLogitsWarper(self.temperature))
        if self.top_k:
            warpers.append(TopKLogitsWarper(top_k=self.top_k, min_tokens_to_keep=1))
        if self.top_p < 1.0:
            warpers.append(TopPLogitsWarper(top_p=self.top_p, min_tokens_to_keep=1))
        return warpers


class Sampler:
    """Draws tokens for the rows of one generate call (`batch_size` rows in the caller's order)."""

    def __init__(self, config: SamplingConfig, batch_size: int, generator: Optional[torch.Generator] = None):
        self.config = config
        self.warpers = config.processors()
        self.batch_size = batch_size
        self.generator = generator

    def probs(self, logits: torch.Tensor) -> torch.Tensor:
        """The processed distributions (R, V) in float32 of logits (R, V)."""
        scores = logits.to(dtype=torch.float32, copy=True)
        return self.warpers(None, scores).softmax(-1)

    def draw(self, probs: torch.Tensor, rows: List[int]) -> List[int]:
        """One token per distribution probs (R, V), for the caller's rows `rows` (one multinomial
        over the whole batch, as HF's generate draws)."""
        full = probs.new_full((self.batch_size, probs.shape[-1]), 1.0 / probs.shape[-1])
        index = torch.tensor(rows, dtype=torch.long, device=probs.device)
        full[index] = probs
        return torch.multinomial(full, 1, generator=self.generator)[index, 0].tolist()

    def sample(self, logits: torch.Tensor, rows: List[int]) -> List[int]:
        return self.draw(self.probs(logits), rows)

    def uniform(self, n: int, device) -> torch.Tensor:
        return torch.rand(n, generator=self.generator, device=device)


def speculative_accept(p: torch.Tensor, q: torch.Tensor, drafted: List[int], uniforms: torch.Tensor):
    """Speculative sampling's acceptance for one row.

    p (m, V): the target's processed distribution at each drafted position (and possibly after);
    q (n, V): the draft's, where drafted[i] ~ q[i]; uniforms (n,) ~ U[0, 1). Draft i is accepted
    with probability min(1, p[i, x] / q[i, x]), in order, up to the first rejection. Returns
    (accepted count a, the distribution of the token at position a: norm(max(0, p[a] - q[a])) on a
    rejection, else None: the caller draws from p at the position after the drafts)."""
    n = len(drafted)
    if n == 0:
        return 0, None
    x = torch.tensor(drafted, dtype=torch.long, device=p.device)[:, None]
    ratio = p[:n].gather(1, x)[:, 0] / q.gather(1, x)[:, 0]
    accepted = int((uniforms < ratio).long().cumprod(0).sum())
    if accepted == n:
        return n, None
    residual = (p[accepted] - q[accepted]).clamp(min=0)
    total = residual.sum()
    # p == q up to rounding: a rejection had probability ~0; p is then the right distribution
    return accepted, residual / total if total > 0 else p[accepted]
