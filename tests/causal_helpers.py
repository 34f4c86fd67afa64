"""Tiny decoder-only models of every supported family, and slow oracles for the decode loop.

The cache-free reference recomputes every layer over the whole sequence at every step with HF's
own decoder layers (their norms, attention, rotary positions and masks as HF builds them from the
config), feeding each earlier generated position the state it left with (state propagation): it
shares nothing with the loop under test but the weights.
"""

import copy

import torch
from transformers import (Gemma3TextConfig, GPT2Config, LlamaConfig, MistralConfig, Qwen2Config, Qwen3Config)

from models.deploying_causal import CAUSAL_DEPLOY_CLASSES
from util.additional_args import AdditionalArguments, update_autoconfig

VOCAB = 48
PAD = 0
COMMON = dict(vocab_size=VOCAB, initializer_range=0.3, pad_token_id=PAD, bos_token_id=1, eos_token_id=None)
LLAMA_SHAPE = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4,
                   num_key_value_heads=2)
WINDOW = 6  # shorter than prompt + output in the tests: sliding layers must drop early positions


def tiny_config(family: str, **overrides):
    """A 4-layer model of `family` with spread confidences (large initializer range)."""
    if family == "llama":
        config = LlamaConfig(**LLAMA_SHAPE, **COMMON)
    elif family == "llama-tied":
        config = LlamaConfig(**LLAMA_SHAPE, **COMMON, tie_word_embeddings=True)
    elif family == "mistral":
        config = MistralConfig(**LLAMA_SHAPE, **COMMON, sliding_window=WINDOW)
    elif family == "qwen2":
        config = Qwen2Config(**LLAMA_SHAPE, **COMMON)  # q/k/v biases
    elif family == "qwen3":
        config = Qwen3Config(**LLAMA_SHAPE, **COMMON, head_dim=8)  # q/k norms
    elif family == "gemma3":
        # Gemma scales its embedding by sqrt(d): a smaller range keeps its first layer from
        # deciding every token
        config = Gemma3TextConfig(**LLAMA_SHAPE, **dict(COMMON, initializer_range=0.15), head_dim=8, query_pre_attn_scalar=8, sliding_window=WINDOW,
                                  layer_types=["sliding_attention", "full_attention", "sliding_attention",
                                               "full_attention"])
    elif family == "gpt2":
        config = GPT2Config(n_embd=32, n_layer=4, n_head=4, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                            **COMMON)
    else:
        raise KeyError(family)
    for key, value in overrides.items():
        setattr(config, key, value)
    return config


FAMILIES = ("llama", "llama-tied", "mistral", "qwen2", "qwen3", "gemma3", "gpt2")


def deploy_model(config, dtype=torch.float64, seed: int = 0, **flags):
    torch.manual_seed(seed)
    update_autoconfig(config, AdditionalArguments(**flags))
    deploy_class, _ = CAUSAL_DEPLOY_CLASSES[config.model_type]
    model = deploy_class(config).eval().to(dtype)
    if getattr(model, "cm_head", None) is not None:
        with torch.no_grad():  # a meta head whose P(exit) varies strongly with the state
            model.cm_head[2].weight.mul_(20.0)
    return model


def hf_twin(model, num_layers=None):
    """HF's plain class with the same weights, optionally cut to its first `num_layers` blocks."""
    config = copy.deepcopy(model.config)
    if num_layers is not None:
        config.num_hidden_layers = num_layers
        if getattr(config, "layer_types", None):
            config.layer_types = config.layer_types[:num_layers]
    _, plain = CAUSAL_DEPLOY_CLASSES[config.model_type]
    twin = plain(config).eval().to(model.dtype)
    state = {k: v for k, v in model.state_dict().items() if not k.startswith("cm_head")}
    twin.load_state_dict(state, strict=False)  # a cut model ignores the later blocks
    return twin


def hf_generate(model, ids, mask=None, max_new_tokens=10):
    return model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=False,
                          num_beams=1, pad_token_id=PAD)


def prompts(lengths, seed=1):
    generator = torch.Generator().manual_seed(seed)
    return [torch.randint(2, VOCAB, (1, n), generator=generator) for n in lengths]


def left_padded(rows):
    width = max(r.shape[1] for r in rows)
    ids = torch.full((len(rows), width), PAD, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for b, r in enumerate(rows):
        ids[b, width - r.shape[1]:], mask[b, width - r.shape[1]:] = r[0], 1
    return ids, mask


# ----- the cache-free reference ---------------------------------------------------------------------
def _parts(model):
    if model.config.model_type == "gpt2":
        return model.transformer.h, model.transformer.ln_f
    return model.model.layers, model.model.norm


def _layer_inputs(model, length):
    """HF's masks and rotary positions for a sequence of `length` (no padding), per layer."""
    from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask

    config = model.config
    dummy = torch.zeros(1, length, config.hidden_size, dtype=model.dtype)
    positions = torch.arange(length)[None]
    kwargs = dict(config=config, inputs_embeds=dummy, attention_mask=torch.ones(1, length, dtype=torch.long),
                  past_key_values=None, position_ids=positions)
    masks = {"full_attention": create_causal_mask(**kwargs)}
    if getattr(config, "sliding_window", None) is not None:
        masks["sliding_attention"] = create_sliding_window_causal_mask(**kwargs)
    layers, _ = _parts(model)
    types = getattr(config, "layer_types", None)
    if config.model_type == "mistral":
        types = ["sliding_attention"] * len(layers)
    types = types or ["full_attention"] * len(layers)
    rope = {}
    if config.model_type != "gpt2":
        for kind in set(types):
            args = (kind,) if config.model_type == "gemma3_text" else ()
            rope[kind] = model.model.rotary_emb(dummy, positions, *args)
    return types, masks, rope


def _run_layer(model, j, hidden, kinds, masks, rope):
    layers, _ = _parts(model)
    kind = kinds[j]
    if model.config.model_type == "gpt2":
        return layers[j](hidden, attention_mask=masks[kind])
    return layers[j](hidden, attention_mask=masks[kind], position_embeddings=rope[kind],
                     position_ids=torch.arange(hidden.shape[1])[None])


def _embed(model, ids):
    if model.config.model_type == "gpt2":
        return model.transformer.wte(ids) + model.transformer.wpe(torch.arange(ids.shape[1])[None])
    return model.model.embed_tokens(ids)


def layer_logits(model, hidden):
    _, norm = _parts(model)
    return model.lm_head(norm(hidden))


@torch.no_grad()
def cache_free_early_exit(model, prompt, max_new_tokens, threshold, min_layer=1, static_layer=None):
    """Greedy decoding of one row (no padding) with CALM's softmax exit (or a static exit), every
    step recomputing every layer over the whole sequence from scratch. Position p of a generated
    token that left at layer e_p enters every block above e_p with its state h_(e_p) (its keys and
    values there come from that copied state); prompt positions run every block. The first new
    token is decided at the prompt's last position by the same rule."""
    L = model.config.num_hidden_layers
    tokens = prompt[0].tolist()
    exits = {}  # sequence position -> exit layer (generated inputs only)
    decided = []
    for _ in range(max_new_tokens):
        ids = torch.tensor([tokens])
        T = len(tokens)
        kinds, masks, rope = _layer_inputs(model, T)
        hidden = _embed(model, ids)
        states = [hidden]  # states[l]: (1, T, d) after l blocks; exited positions keep their state
        for j in range(L):
            out = _run_layer(model, j, hidden, kinds, masks, rope)
            keep = torch.tensor([exits.get(p, L) <= j for p in range(T)])[None, :, None]
            hidden = torch.where(keep, hidden, out)
            states.append(hidden)
        exit_layer = static_layer or L
        if static_layer is None:
            for layer in range(min_layer, L):
                probs = layer_logits(model, states[layer][:, -1]).softmax(-1)
                top = probs.topk(2, dim=-1).values[0]
                if float(top[0] - top[1]) > threshold:
                    exit_layer = layer
                    break
        token = int(layer_logits(model, states[exit_layer][:, -1]).argmax(-1))
        exits[T - 1] = exit_layer if T - 1 >= prompt.shape[1] else L  # the prompt's states are real
        decided.append(exit_layer)
        tokens.append(token)
    return tokens[prompt.shape[1]:], decided
