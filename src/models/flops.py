"""FLOP accounting (METHODS.md, "FLOP accounting"). One multiply-add is 2 FLOPs.

Formulas are pure functions of the model's shape so they can be checked by hand; `FlopCounter`
sums them per generate call into confidence, block and encoder FLOPs.
"""

from dataclasses import dataclass
from typing import Optional


@dataclass(frozen=True)
class Shape:
    d_model: int
    inner: int  # heads x d_kv
    d_ff: int
    ff_matrices: int  # 2, or 3 in gated (T5 v1.1) blocks
    vocab_size: int
    encoder_layers: int
    kv_inner: Optional[int] = None  # key/value heads x head size (grouped-query attention); None: inner
    cross_attention: bool = True  # encoder-decoder blocks attend to the encoder

    @property
    def kv(self) -> int:
        return self.inner if self.kv_inner is None else self.kv_inner

    @classmethod
    def of(cls, config) -> "Shape":
        return cls(config.d_model, config.num_heads * config.d_kv, config.d_ff,
                   3 if config.is_gated_act else 2, config.vocab_size, config.num_layers)


def head_flops(shape: Shape, rows: int) -> int:
    """A confidence head over `rows` rows: the matmul plus softmax and top-k over the scores."""
    return 2 * shape.d_model * rows + 5 * rows


def output_head_flops(shape: Shape) -> int:
    """The full output head that predicts a token (no softmax needed for an argmax)."""
    return 2 * shape.d_model * shape.vocab_size


def decoder_block_flops(shape: Shape, self_positions: int, encoder_positions: int) -> int:
    """One decoder block for one token attending to `self_positions` cached positions (and, in an
    encoder-decoder, to `encoder_positions`)."""
    d, inner = shape.d_model, shape.inner
    projections = 2 * d * inner * 2 + 2 * d * shape.kv * 2  # q, o and k, v of self-attention
    attention = 4 * inner * self_positions
    if shape.cross_attention:
        projections += 2 * d * inner * 2  # q, o of cross-attention
        attention += 4 * inner * encoder_positions
    feed_forward = 2 * d * shape.d_ff * shape.ff_matrices
    return projections + attention + feed_forward


def skipped_block_flops(shape: Shape, positions: int = 1) -> int:
    """State propagation: only the key and value projections of the copied states."""
    return 2 * 2 * shape.d_model * shape.kv * positions


def cross_kv_flops(shape: Shape, encoder_positions: int) -> int:
    """Keys and values of one decoder block over the encoder output, once per sample."""
    return 2 * 2 * shape.d_model * shape.inner * encoder_positions


def encoder_flops(shape: Shape, positions: int) -> int:
    """The whole encoder over `positions` tokens, once per sample."""
    d, inner = shape.d_model, shape.inner
    per_layer = positions * (2 * d * inner * 4 + 4 * inner * positions + 2 * d * shape.d_ff * shape.ff_matrices)
    return per_layer * shape.encoder_layers


def prefill_flops(shape: Shape, positions: int, windows) -> int:
    """A decoder-only model's prompt of `positions` tokens through every block (`windows`: per
    block its sliding window or None), each position attending to the positions up to itself."""
    total = 0
    for window in windows:
        total += sum(decoder_block_flops(shape, p if window is None else min(p, window), 0)
                     for p in range(1, positions + 1))
    return total


class FlopCounter:
    """Sums FLOPs of one generate call by component; `front` names the work done once per sample
    before the first token (T5's encoder, a decoder-only model's prefill)."""

    def __init__(self, shape: Shape, front: str = "encoder"):
        self.shape = shape
        self.front = front
        self.confidence = 0
        self.blocks = 0
        self.encoder = 0  # the front's FLOPs

    def as_stats(self) -> dict:
        return {
            "flops_confidence": self.confidence,
            "flops_blocks": self.blocks,
            f"flops_{self.front}": self.encoder,
            "flops_total": self.confidence + self.blocks + self.encoder,
        }
