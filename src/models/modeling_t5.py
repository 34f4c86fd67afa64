"""T5 for training early exits: the losses, LayerSkip's recipe, the meta head and LoRA of
models.exit_training over HF's T5.

    model = TrainT5ForConditionalGeneration.from_pretrained(path, config=config)  # flags in config
    model = prepare_for_training(model)        # LoRA adapters / freezing for the meta head
    ... HF Trainer (or any loop): model(**batch).loss ...
    save_checkpoint(model, tokenizer, out)     # merges LoRA; reloads into DeployT5ForConditionalGeneration

Every intermediate prediction goes through `output_logits` of the decode loop, z_l = W s(norm(h_l))
(T5's final layer norm and output scaling, then the LM head), so that training optimises exactly
the head decoding uses. HF's decoder_hidden_states are (embeddings, blocks 1..L-1 raw, block L
after the final norm and its dropout); FREE's n_l is dropout(norm(h_l)). The losses and their
formulas are in models.exit_training, whose names this module keeps importable.
"""

from transformers import T5ForConditionalGeneration

from models.decode_loop import output_logits
from models.exit_training import *  # noqa: F401,F403  (the names T5's users and tests import from here)
from models.exit_training import EarlyExitTrainingMixin as _SharedMixin


class EarlyExitTrainingMixin(_SharedMixin):
    """The shared training mixin over any T5-family class whose decoder is T5's (its hidden
    states, final norm, LM head). Put it before the HF class."""

    def _exit_num_layers(self) -> int:
        return self.config.num_decoder_layers

    def _exit_hidden_states(self, out):
        return out.decoder_hidden_states

    def _exit_logits(self, hidden):
        return output_logits(self, hidden)

    def _exit_norm(self, hidden):
        return self.decoder.final_layer_norm(hidden)

    def _exit_state_dropout(self, normed):
        return self.decoder.dropout(normed)

    def _exit_blocks(self):
        return self.decoder.block

    def _layer_logits(self, out, layer: int) -> torch.Tensor:
        """z_l = W s(dropout(norm(h_l))): as FREE, the dropout HF applies after the final norm
        before the last head is applied before every intermediate head too (train mode only)."""
        if layer == self._exit_num_layers():
            return out.logits  # the model's own head on dropout(norm(h_L))
        normed = self._normed_state(out, layer)
        if self.config.scale_decoder_outputs:
            normed = normed * self.model_dim ** -0.5
        return self.lm_head(normed)


class TrainT5ForConditionalGeneration(EarlyExitTrainingMixin, T5ForConditionalGeneration):
    """HF's T5 whose `loss` includes the intermediate layers chosen by the config's flags."""
