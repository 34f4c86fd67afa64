"""LongT5 for training early exits: the losses, meta head and LoRA of models.modeling_t5.

    model = TrainLongT5ForConditionalGeneration.from_pretrained(path, config=config)
    model = prepare_for_training(model)        # from models.modeling_t5, as for T5
    save_checkpoint(model, tokenizer, out)     # reloads into DeployLongT5ForConditionalGeneration

LongT5's decoder is T5's and its forward returns the same decoder hidden states (embeddings,
blocks 1..L-1 raw, block L after the final norm), so `EarlyExitTrainingMixin` applies as is.
"""

from transformers import LongT5ForConditionalGeneration

from models.modeling_t5 import EarlyExitTrainingMixin


class TrainLongT5ForConditionalGeneration(EarlyExitTrainingMixin, LongT5ForConditionalGeneration):
    """HF's LongT5 whose `loss` includes the intermediate layers chosen by the config's flags."""
