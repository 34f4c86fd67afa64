"""mT5 for training early exits: the losses, meta head and LoRA of models.modeling_t5 over
HF's MT5ForConditionalGeneration (see models.deploying_mt5 for its output scaling)."""

from transformers import MT5ForConditionalGeneration

from models.deploying_mt5 import use_mt5_output_scaling
from models.modeling_t5 import EarlyExitTrainingMixin


class TrainMT5ForConditionalGeneration(EarlyExitTrainingMixin, MT5ForConditionalGeneration):
    """HF's mT5 whose `loss` includes the intermediate layers chosen by the config's flags."""

    def __init__(self, config):
        use_mt5_output_scaling(config)
        super().__init__(config)
