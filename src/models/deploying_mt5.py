"""mT5 for deployment: HF's MT5ForConditionalGeneration with the early-exit greedy `generate`.

mT5 is T5 v1.1 (gated feed-forward, untied head) with a larger vocabulary: the same modules the
decode loop reads. One difference: `MT5Config` has no `scale_decoder_outputs` (the loop and the
training losses read it), because MT5's forward never scales the decoder output before its LM
head. `use_mt5_output_scaling` states that on the config, so z_L equals MT5's own logits.
"""

from transformers import MT5ForConditionalGeneration

from models.deploying_t5 import EarlyExitGenerationMixin


def use_mt5_output_scaling(config) -> None:
    """MT5's forward applies no output scaling: say so where the loop looks for it."""
    config.scale_decoder_outputs = False


class DeployMT5ForConditionalGeneration(EarlyExitGenerationMixin, MT5ForConditionalGeneration):
    def __init__(self, config):
        use_mt5_output_scaling(config)
        super().__init__(config)
        self._init_early_exit(config)
