"""Decoder-only LMs for training early exits: the losses, LayerSkip's recipe, the meta head and
LoRA of models.exit_training over HF's Llama, Mistral, Qwen2, Qwen3, Gemma 3 (text) and GPT-2.

    model = TrainLlamaForCausalLM.from_pretrained(path, config=config)  # flags in config
    model = prepare_for_training(model)        # LoRA on q_proj, v_proj (GPT-2: c_attn) by default
    ... HF Trainer: model(input_ids=..., attention_mask=..., labels=...).loss ...
    save_checkpoint(model, tokenizer, out)

Intermediate logits are z_l = lm_head(norm(h_l)) with the model's own final norm (`output_logits`),
h_l the raw output of block l. HF's hidden_states (transformers 5.x) are (embeddings, blocks
1..L-1 raw, block L after the final norm): the hooks that record them see each block's raw
output, and the last entry is replaced by the model's last_hidden_state. So layer L's logits
are the model's own, as for T5.

Labels follow HF's causal-LM convention: aligned with input_ids, -100 ignored, shifted inside:
the logits at position t are scored against labels[t + 1] (the last position against nothing).
Every intermediate loss uses that same shift, so CE_L equals HF's own loss. The token-mean losses
read only the positions some row of the batch has a label at (a masked prompt's are skipped: the
heads over them would cost as much as the heads over the target); FREE's hidden-state
distillation reads every position, as FREE defines it.
"""

from types import SimpleNamespace

import torch
from transformers import (Gemma3ForCausalLM, GPT2LMHeadModel, LlamaForCausalLM, MistralForCausalLM,
                          Qwen2ForCausalLM, Qwen3ForCausalLM)

from models.architectures import CAUSAL_BLOCKS, attribute
from models.exit_training import IGNORE, EarlyExitTrainingMixin


def final_norm(model) -> torch.nn.Module:
    """The final norm the LM head reads after (GPT-2's ln_f, the others' model.norm), where the
    decode loop's architecture table (models.architectures.CAUSAL_BLOCKS) says it is."""
    return attribute(model, CAUSAL_BLOCKS[model.config.model_type].final_norm)


def output_logits(model, hidden: torch.Tensor) -> torch.Tensor:
    """z = lm_head(norm(h)) for a raw block output h, with Gemma's final logit soft-capping where
    the config sets one (as the model's own forward applies it)."""
    logits = model.lm_head(final_norm(model)(hidden))
    cap = getattr(model.config, "final_logit_softcapping", None)
    if cap is not None:
        logits = torch.tanh(logits / cap) * cap
    return logits


def shift_labels(labels: torch.Tensor) -> torch.Tensor:
    """HF's causal shift: position t is scored against labels[t + 1]; the last against nothing."""
    return torch.cat([labels[:, 1:], labels.new_full((labels.shape[0], 1), IGNORE)], dim=1)


class CausalExitTrainingMixin(EarlyExitTrainingMixin):
    """The shared training mixin over a decoder-only HF causal LM. Put it before the HF class."""

    lora_task_type = "CAUSAL_LM"
    default_lora_targets = ("q_proj", "v_proj")

    def _exit_num_layers(self) -> int:
        return self.config.num_hidden_layers

    def _exit_hidden_states(self, out):
        return out.hidden_states

    def _exit_logits(self, hidden):
        return output_logits(self, hidden)

    def _exit_norm(self, hidden):
        return final_norm(self)(hidden)

    def _exit_blocks(self):
        return attribute(self, CAUSAL_BLOCKS[self.config.model_type].layers)

    def _exit_targets(self, labels):
        return shift_labels(labels)

    def _exit_outputs(self, out, targets):
        """Only the positions some row has a label at: every loss is a mean over labelled tokens,
        and a prompt's positions (-100) would otherwise put every layer's head over them too."""
        keep = (targets != IGNORE).any(0).nonzero()[:, 0]
        if len(keep) == targets.shape[1]:
            return out, targets
        view = SimpleNamespace(hidden_states=[h.index_select(1, keep) for h in out.hidden_states],
                               logits=out.logits.index_select(1, keep))
        return view, targets.index_select(1, keep)


class TrainLlamaForCausalLM(CausalExitTrainingMixin, LlamaForCausalLM):
    """HF's Llama whose `loss` includes the intermediate layers chosen by the config's flags."""


class TrainMistralForCausalLM(CausalExitTrainingMixin, MistralForCausalLM):
    """HF's Mistral whose `loss` includes the intermediate layers chosen by the config's flags."""


class TrainQwen2ForCausalLM(CausalExitTrainingMixin, Qwen2ForCausalLM):
    """HF's Qwen2 whose `loss` includes the intermediate layers chosen by the config's flags."""


class TrainQwen3ForCausalLM(CausalExitTrainingMixin, Qwen3ForCausalLM):
    """HF's Qwen3 whose `loss` includes the intermediate layers chosen by the config's flags."""


class TrainGemma3ForCausalLM(CausalExitTrainingMixin, Gemma3ForCausalLM):
    """HF's Gemma 3 (text only) whose `loss` includes the intermediate layers chosen by the config's flags."""


class TrainGPT2LMHeadModel(CausalExitTrainingMixin, GPT2LMHeadModel):
    """HF's GPT-2 whose `loss` includes the intermediate layers chosen by the config's flags."""

    default_lora_targets = ("c_attn",)


# checkpoint config's model_type -> training class (the runner's MODEL_CLASSES takes these with
# the deploy classes)
TRAIN_CLASSES = {
    "llama": TrainLlamaForCausalLM,
    "mistral": TrainMistralForCausalLM,
    "qwen2": TrainQwen2ForCausalLM,
    "qwen3": TrainQwen3ForCausalLM,
    "gemma3_text": TrainGemma3ForCausalLM,
    "gpt2": TrainGPT2LMHeadModel,
}
