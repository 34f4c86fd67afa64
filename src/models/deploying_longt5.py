"""LongT5 for deployment: HF's LongT5ForConditionalGeneration with the early-exit greedy `generate`.

    config = update_autoconfig(AutoConfig.from_pretrained(path), AdditionalArguments(...))
    model = DeployLongT5ForConditionalGeneration.from_pretrained(path, config=config)
    ids = model.generate(input_ids=..., attention_mask=..., max_new_tokens=512)

LongT5 changes only the encoder's self-attention (local, or transient-global); its decoder is
T5's: the same blocks (layer[0].SelfAttention with its relative position bias, layer[1]
.EncDecAttention, layer[2] feed-forward), final norm, output scaling (`scale_decoder_outputs`,
`model_dim`) and LM head. So the decode loop of `EarlyExitGenerationMixin` runs unchanged; the
encoder is called as `model.encoder(input_ids=..., attention_mask=...)` on the padded batch.

One figure differs: T5's encoder FLOPs assume full self-attention over all S positions, while
LongT5's attends only within `local_radius` (plus S / `global_block_size` global tokens for
transient-global): `encoder_flops` here gives LongT5's own count.
"""

import math

from transformers import LongT5ForConditionalGeneration

from models.deploying_t5 import EarlyExitGenerationMixin
from models.flops import Shape


def local_window_keys(positions: int, radius: int) -> int:
    """Keys all `positions` queries attend to when each sees the tokens within `radius` of itself
    (clipped at both ends of the sequence)."""
    total = 0
    for i in range(positions):
        total += min(i, radius) + min(positions - 1 - i, radius) + 1
    return total


def longt5_encoder_flops(config, positions: int) -> int:
    """LongT5's encoder over `positions` tokens, counted as flops.encoder_flops counts T5's
    (projections, attention, feed-forward; one multiply-add is 2 FLOPs), with local attention:
    each query attends to its window, plus, for transient-global, to every global token, whose
    keys and values are projected from the block sums (one global token per global block)."""
    shape = Shape.of(config)
    d, inner, S = shape.d_model, shape.inner, positions
    keys = local_window_keys(S, config.local_radius)
    projections = 2 * d * inner * 4 * S
    if config.encoder_attention_type == "transient-global":
        globals_ = math.ceil(S / config.global_block_size)
        keys += S * globals_
        projections += 2 * 2 * d * inner * globals_
    attention = 4 * inner * keys
    feed_forward = 2 * d * shape.d_ff * shape.ff_matrices * S
    return (projections + attention + feed_forward) * shape.encoder_layers


class DeployLongT5ForConditionalGeneration(EarlyExitGenerationMixin, LongT5ForConditionalGeneration):
    def __init__(self, config):
        super().__init__(config)
        self._init_early_exit(config)

    def encoder_flops(self, positions: int) -> int:
        """The loop counts each row's encoder on its unpadded length with this."""
        return longt5_encoder_flops(self.config, positions)
