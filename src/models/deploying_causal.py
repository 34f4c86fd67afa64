"""Decoder-only LLMs for deployment: HF's causal-LM classes with the early-exit greedy `generate`.

    config = update_autoconfig(AutoConfig.from_pretrained(path), AdditionalArguments(...))
    model = DeployLlamaForCausalLM.from_pretrained(path, config=config)
    tokenizer.padding_side = "left"
    batch = tokenizer(prompts, return_tensors="pt", padding=True)
    ids = model.generate(**batch, max_new_tokens=64)   # the prompts, then the new tokens
    model.exit_stats()

The same mixin and decode loop as the T5 classes (models.deploying_t5.EarlyExitGenerationMixin,
models.decode_loop); what differs is the block, described in models.architectures. The prompt is
prefilled at full depth (reported as `time_prefill` / `flops_prefill`, not in `block_avg`); the
first new token follows the exit rule at the prompt's last position, reading the prefill's states;
every later token runs blocks 1..e and exits by the rule, its skipped blocks' keys and values
propagated from h_e.
"""

from transformers import (Gemma3ForCausalLM, GPT2LMHeadModel, LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM,
                          Qwen3ForCausalLM)

from models.deploying_t5 import EarlyExitGenerationMixin


class DeployLlamaForCausalLM(EarlyExitGenerationMixin, LlamaForCausalLM):
    def __init__(self, config):
        super().__init__(config)
        self._init_early_exit(config)


class DeployMistralForCausalLM(EarlyExitGenerationMixin, MistralForCausalLM):
    def __init__(self, config):
        super().__init__(config)
        self._init_early_exit(config)


class DeployQwen2ForCausalLM(EarlyExitGenerationMixin, Qwen2ForCausalLM):
    def __init__(self, config):
        super().__init__(config)
        self._init_early_exit(config)


class DeployQwen3ForCausalLM(EarlyExitGenerationMixin, Qwen3ForCausalLM):
    def __init__(self, config):
        super().__init__(config)
        self._init_early_exit(config)


class DeployGemma3ForCausalLM(EarlyExitGenerationMixin, Gemma3ForCausalLM):
    def __init__(self, config):
        super().__init__(config)
        self._init_early_exit(config)


class DeployGPT2LMHeadModel(EarlyExitGenerationMixin, GPT2LMHeadModel):
    def __init__(self, config):
        super().__init__(config)
        self._init_early_exit(config)


# config.model_type -> (deploy class, HF's plain class)
CAUSAL_DEPLOY_CLASSES = {
    "llama": (DeployLlamaForCausalLM, LlamaForCausalLM),
    "mistral": (DeployMistralForCausalLM, MistralForCausalLM),
    "qwen2": (DeployQwen2ForCausalLM, Qwen2ForCausalLM),
    "qwen3": (DeployQwen3ForCausalLM, Qwen3ForCausalLM),
    "gemma3_text": (DeployGemma3ForCausalLM, Gemma3ForCausalLM),
    "gpt2": (DeployGPT2LMHeadModel, GPT2LMHeadModel),
}
