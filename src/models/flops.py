"""FLOP accounting (METHODS.md, "FLOP accounting"). One multiply-add is 2 FLOPs.

Formulas are pure functions of the model's shape so they can be checked by hand; `FlopCounter`
sums them per generate call into confidence, block and encoder FLOPs.
"""

from dataclasses import dataclass


@dataclass(frozen=True)
class Shape:
    d_model: int
    inner: int  # heads x d_kv
    d_ff: int
    ff_matrices: int  # 2, or 3 in gated (T5 v1.1) blocks
    vocab_size: int
    encoder_layers: int

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
    """One decoder block for one token attending to `self_positions` cached positions."""
    d, inner = shape.d_model, shape.inner
    projections = 2 * d * inner * 6  # q, k, v, o of self-attention; q, o of cross-attention
    attention = 4 * inner * self_positions + 4 * inner * encoder_positions
    feed_forward = 2 * d * shape.d_ff * shape.ff_matrices
    return projections + attention + feed_forward


def skipped_block_flops(shape: Shape, positions: int = 1) -> int:
    """State propagation: only the key and value projections of the copied states."""
    return 2 * 2 * shape.d_model * shape.inner * positions


def cross_kv_flops(shape: Shape, encoder_positions: int) -> int:
    """Keys and values of one decoder block over the encoder output, once per sample."""
    return 2 * 2 * shape.d_model * shape.inner * encoder_positions


def encoder_flops(shape: Shape, positions: int) -> int:
    """The whole encoder over `positions` tokens, once per sample."""
    d, inner = shape.d_model, shape.inner
    per_layer = positions * (2 * d * inner * 4 + 4 * inner * positions + 2 * d * shape.d_ff * shape.ff_matrices)
    return per_layer * shape.encoder_layers


class FlopCounter:
    """Sums FLOPs of one generate call by component."""

    def __init__(self, shape: Shape):
        self.shape = shape
        self.confidence = 0
        self.blocks = 0
        self.encoder = 0

    def as_stats(self) -> dict:
        return {
            "flops_confidence": self.confidence,
            "flops_blocks": self.blocks,
            "flops_encoder": self.encoder,
            "flops_total": self.confidence + self.blocks + self.encoder,
        }
