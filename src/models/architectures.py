"""What the decode loop needs to know of a model's decoder: a small description of its block.

The loop (models.decode_loop) is the same for every model kind; it asks an architecture for the
pieces of one block (its norms, its attention's queries, keys and values, the attention output,
the feed-forward sublayer), for the embedding, the final norm and the head, and for how positions
enter attention. Two kinds exist:

- `T5Decoder` (T5, Flan-T5, mT5, LongT5): relative position bias added to the attention scores
  (computed in block 0, shared), cross-attention to the encoder, T5's RMS norms, scale 1,
  the output scaling before the head.
- `CausalDecoder` (Llama, Mistral, Qwen2, Qwen3, Gemma 3, GPT-2): rotary (or absolute) positions,
  grouped-query heads, optional q/k norms (Qwen3, Gemma 3), optional norms after attention and
  feed-forward (Gemma 3's four norms), sliding-window layers (Gemma 3, Mistral, Qwen2 when
  configured), the prompt prefilled in the decoder itself. Which module is which is one entry of
  `CAUSAL_BLOCKS`.

Every norm, projection and activation is the model's own module or weight, applied as the
model's forward applies it, so that a token that runs every block gets the model's own logits.
"""

from dataclasses import dataclass
from typing import Dict, List, Optional

import torch
import torch.nn.functional as F

from models.flops import Shape
from models.projection import feed_forward, layer_norm, project

FULL = "full_attention"
SLIDING = "sliding_attention"


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """The rotary embedding's pairing of dimensions (the same op as transformers' Llama)."""
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rotary(x: torch.Tensor, rope) -> torch.Tensor:
    """x (R, heads, n, head_dim) rotated by (cos, sin) (R, 1, n, head_dim); None: no rotation."""
    if rope is None:
        return x
    cos, sin = rope
    return x * cos + rotate_half(x) * sin


class T5Decoder:
    """T5's decoder blocks: layer[0] self-attention, layer[1] cross-attention, layer[2] feed-forward."""

    encoder_decoder = True
    front = "encoder"  # the work done once per sample before the first token, reported apart

    def __init__(self, model):
        self.model = model
        config = model.config
        self.blocks = model.decoder.block
        self.num_layers = len(self.blocks)
        self.num_heads = self.num_kv_heads = config.num_heads
        self.head_dim = config.d_kv
        self.d_model = config.d_model
        self.scale = 1.0
        self.head = model.lm_head
        self.layer_kinds = [FULL] * self.num_layers

    @property
    def dtype(self) -> torch.dtype:
        return self.blocks[0].layer[0].SelfAttention.q.weight.dtype

    def shape(self) -> Shape:
        return Shape.of(self.model.config)

    def embed(self, ids: torch.Tensor, positions: Optional[torch.Tensor]) -> torch.Tensor:
        return self.model.decoder.embed_tokens(ids)

    def attention_input(self, j: int, hidden: torch.Tensor) -> torch.Tensor:
        return layer_norm(self.blocks[j].layer[0].layer_norm, hidden)

    def _split(self, x: torch.Tensor) -> torch.Tensor:
        return x.view(x.shape[0], -1, self.num_heads, self.head_dim).transpose(1, 2)

    def queries(self, j: int, normed: torch.Tensor, rope) -> torch.Tensor:
        return self._split(project(self.blocks[j].layer[0].SelfAttention.q, normed))

    def keys_values(self, j: int, normed: torch.Tensor, rope):
        attention = self.blocks[j].layer[0].SelfAttention
        return self._split(project(attention.k, normed)), self._split(project(attention.v, normed))

    def queries_keys_values(self, j: int, normed: torch.Tensor, rope):
        keys, values = self.keys_values(j, normed, rope)
        return self.queries(j, normed, rope), keys, values

    def attention_output(self, j: int, out: torch.Tensor) -> torch.Tensor:
        return project(self.blocks[j].layer[0].SelfAttention.o, out)

    def cross_attention(self, j: int, hidden: torch.Tensor, keys, values, mask, runs=None) -> torch.Tensor:
        """Cross-attention of hidden's rows over keys/values/mask rows. With `runs`, a list of
        (first query row, first key row, count), keys/values/mask hold every live row and each
        run of consecutive rows attends to its own slice of them (views: nothing copied)."""
        layer = self.blocks[j].layer[1]
        normed = layer_norm(layer.layer_norm, hidden)
        query = self._split(project(layer.EncDecAttention.q, normed))
        if runs is None:
            out = F.scaled_dot_product_attention(query, keys, values, attn_mask=mask, scale=1.0)
        else:
            out = torch.cat([F.scaled_dot_product_attention(query[q : q + n], keys[k : k + n], values[k : k + n],
                                                            attn_mask=mask[k : k + n], scale=1.0)
                             for q, k, n in runs])
        out = out.transpose(1, 2).reshape(out.shape[0], -1, self.num_heads * self.head_dim)
        return project(layer.EncDecAttention.o, out)

    def rope_at(self, decoder, kind: str, positions: torch.Tensor):
        return None

    def cross_keys_values(self, j: int, encoder_states: torch.Tensor):
        attention = self.blocks[j].layer[1].EncDecAttention
        return self._split(project(attention.k, encoder_states)), self._split(project(attention.v, encoder_states))

    def feed_forward(self, j: int, hidden: torch.Tensor) -> torch.Tensor:
        return feed_forward(self.blocks[j].layer[2], hidden)

    @staticmethod
    def clamp(hidden: torch.Tensor) -> torch.Tensor:
        """T5's guard against inf in float16 activations, as HF's T5Block applies it."""
        if hidden.dtype != torch.float16:
            return hidden
        limit = torch.finfo(hidden.dtype).max
        limit = torch.where(torch.isinf(hidden).any(), limit - 1000, limit)
        return torch.clamp(hidden, min=-limit, max=limit)

    def final_norm(self, hidden: torch.Tensor) -> torch.Tensor:
        """norm(h): what the meta classifier reads."""
        return layer_norm(self.model.decoder.final_layer_norm, hidden)

    def head_input(self, hidden: torch.Tensor) -> torch.Tensor:
        """s(norm(h)): the decoder's final norm and T5's output scaling, what the LM head reads."""
        normed = self.final_norm(hidden)
        if self.model.config.scale_decoder_outputs:
            normed = normed * self.model.model_dim ** -0.5
        return normed

    def check_input(self):
        """s(norm(h)) for confidence checks, as one rms_norm with the scaling folded into the norm's
        weight (equal to head_input up to rounding: the scorer's figures were always computed so)."""
        norm = self.model.decoder.final_layer_norm
        scale = self.model.model_dim ** -0.5 if self.model.config.scale_decoder_outputs else 1.0
        weight, eps = (norm.weight * scale).detach(), norm.variance_epsilon
        return lambda hidden: F.rms_norm(hidden, weight.shape, weight, eps)

    def position_bias(self, length: int, device) -> torch.Tensor:
        """Relative position bias (heads, length, length), block 0's, shared by every block."""
        return self.blocks[0].layer[0].SelfAttention.compute_bias(length, length, device=device)[0].to(self.dtype)

    def attention_inputs(self, decoder, index, queries, last, last_list, causal: bool):
        """Per attention kind, the additive mask (R, heads, n, keys) over positions 0..keys-1: the
        relative position bias of queries (R, n) against every key, the future masked (for a single
        query per row, only where a row stands behind another). No rotary positions."""
        width, keys = queries.shape[1], max(last_list) + 1
        mask = decoder.position_bias[:, queries, :keys].transpose(0, 1)  # (R, heads, n, keys)
        if width > 1 or min(last_list) != keys - 1:
            limit = queries if causal else last.expand(-1, width)
            hidden = torch.arange(keys, device=queries.device) > limit[..., None]  # (R, n, keys)
            mask = mask.masked_fill(hidden[:, None], decoder.min_value)
        return {FULL: mask}, {}, keys


@dataclass(frozen=True)
class CausalBlock:
    """Where a decoder-only family keeps each piece of its block (attribute names)."""

    layers: str  # the block list, from the model
    final_norm: str
    attention_norm: str
    feed_forward_norm: str
    attention_out_norm: Optional[str] = None  # Gemma 3: a norm on the attention output
    feed_forward_out_norm: Optional[str] = None  # Gemma 3: a norm on the feed-forward output
    attention: str = "self_attn"
    fused_qkv: Optional[str] = None  # GPT-2's c_attn (Conv1D): q, k, v in one weight
    out: str = "o_proj"
    qk_norm: bool = False  # Qwen3, Gemma 3: RMS norm of each head's queries and keys
    absolute_positions: Optional[str] = None  # GPT-2's learnt position embedding
    embed: str = "model.embed_tokens"


_LLAMA = CausalBlock("model.layers", "model.norm", "input_layernorm", "post_attention_layernorm")
CAUSAL_BLOCKS: Dict[str, CausalBlock] = {
    "llama": _LLAMA,
    "mistral": _LLAMA,
    "qwen2": _LLAMA,
    "qwen3": CausalBlock("model.layers", "model.norm", "input_layernorm", "post_attention_layernorm", qk_norm=True),
    "gemma3_text": CausalBlock("model.layers", "model.norm", "input_layernorm", "pre_feedforward_layernorm",
                               attention_out_norm="post_attention_layernorm",
                               feed_forward_out_norm="post_feedforward_layernorm", qk_norm=True),
    "gpt2": CausalBlock("transformer.h", "transformer.ln_f", "ln_1", "ln_2", attention="attn", fused_qkv="c_attn",
                        out="c_proj", absolute_positions="transformer.wpe", embed="transformer.wte"),
}


def attribute(obj, path: str):
    """obj.a.b.c for path 'a.b.c'."""
    for name in path.split("."):
        obj = getattr(obj, name)
    return obj


class CausalDecoder:
    """A decoder-only model's blocks, described by its `CausalBlock` entry."""

    encoder_decoder = False
    front = "prefill"

    def __init__(self, model):
        self.model = model
        config = model.config
        spec = CAUSAL_BLOCKS[config.model_type]
        self.spec = spec
        for name in ("final_logit_softcapping", "attn_logit_softcapping", "scale_attn_by_inverse_layer_idx"):
            if getattr(config, name, None):
                raise ValueError(f"config.{name}={getattr(config, name)!r} is not supported by the early-exit decoder.")
        self.blocks = attribute(model, spec.layers)
        self.num_layers = len(self.blocks)
        self.d_model = config.hidden_size
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = getattr(config, "num_key_value_heads", None) or self.num_heads
        self.head_dim = getattr(config, "head_dim", None) or self.d_model // self.num_heads
        self.head = model.lm_head
        self.norm = attribute(model, spec.final_norm)
        self.embedding = attribute(model, spec.embed)
        self.position_embedding = attribute(model, spec.absolute_positions) if spec.absolute_positions else None
        if config.model_type == "gpt2":
            self.scale = self.head_dim ** -0.5 if config.scale_attn_weights else 1.0
        elif config.model_type == "gemma3_text":
            self.scale = config.query_pre_attn_scalar ** -0.5
        else:
            self.scale = self.head_dim ** -0.5
        # per block: attention kind (full or sliding window) and its window
        types = getattr(config, "layer_types", None)
        window = getattr(config, "sliding_window", None)
        if config.model_type == "mistral":
            types = [SLIDING if window is not None else FULL] * self.num_layers
        self.layer_kinds = list(types) if types else [FULL] * self.num_layers
        self.window = window
        self.rotary = getattr(attribute(model, spec.layers.rsplit(".", 1)[0]), "rotary_emb", None)
        self.rope_per_kind = config.model_type == "gemma3_text"  # local and global rotary bases
        self.modules = [self._resolve(block) for block in self.blocks]

    @property
    def dtype(self) -> torch.dtype:
        return self.head.weight.dtype

    def _resolve(self, block):
        spec = self.spec
        attention = getattr(block, spec.attention)
        get = lambda name: getattr(block, name) if name else None  # noqa: E731
        return dict(
            attention_norm=get(spec.attention_norm), feed_forward_norm=get(spec.feed_forward_norm),
            attention_out_norm=get(spec.attention_out_norm), feed_forward_out_norm=get(spec.feed_forward_out_norm),
            qkv=getattr(attention, spec.fused_qkv) if spec.fused_qkv else None,
            q=getattr(attention, "q_proj", None), k=getattr(attention, "k_proj", None),
            v=getattr(attention, "v_proj", None), o=getattr(attention, spec.out),
            q_norm=getattr(attention, "q_norm", None) if spec.qk_norm else None,
            k_norm=getattr(attention, "k_norm", None) if spec.qk_norm else None,
            mlp=block.mlp,
        )

    def shape(self) -> Shape:
        config = self.model.config
        gated = hasattr(self.blocks[0].mlp, "gate_proj")
        d_ff = getattr(config, "intermediate_size", None) or getattr(config, "n_inner", None) or 4 * self.d_model
        return Shape(self.d_model, self.num_heads * self.head_dim, d_ff, 3 if gated else 2, config.vocab_size,
                     0, kv_inner=self.num_kv_heads * self.head_dim, cross_attention=False)

    # ----- positions ------------------------------------------------------------------------------
    def rope_tables(self, length: int, device) -> Dict[str, tuple]:
        """cos, sin (length, head_dim) of every position 0..length-1, per attention kind (each
        position's values do not depend on the others, so a table gives the model's own)."""
        if self.rotary is None:
            return {}
        dummy = torch.zeros(1, device=device, dtype=self.dtype)
        positions = torch.arange(length, device=device)[None]
        tables = {}
        for kind in sorted(set(self.layer_kinds)):
            args = (kind,) if self.rope_per_kind else ()
            cos, sin = self.rotary(dummy, positions, *args)
            tables[kind] = (cos[0], sin[0])
        return tables

    def attention_inputs(self, decoder, index, queries, last, last_list, causal: bool):
        """Per attention kind, the additive mask (R, 1, n, keys) over cache slots 0..keys-1 (the
        prompt's slots, then one per loop position: slot = decoder.prefix + position) and the
        rotary cos/sin (R, 1, n, head_dim) of each query's own position (slot minus the row's left
        padding, as HF numbers a left-padded row). A query sees its row's real slots up to itself
        (or, not causal, up to the row's last query), within the window on sliding layers."""
        prefix, device = decoder.prefix, queries.device
        slots, keys = prefix + queries, prefix + max(last_list) + 1
        pads = decoder.pads.index_select(0, index)[:, None, None]  # (R, 1, 1)
        key_slots = torch.arange(keys, device=device)
        limit = slots if causal else (prefix + last).expand(-1, queries.shape[1])
        allowed = (key_slots <= limit[..., None]) & (key_slots >= pads)  # (R, n, keys)
        masks = {}
        for kind in set(self.layer_kinds):
            seen = allowed if kind == FULL else allowed & (key_slots > slots[..., None] - self.window)
            zero = torch.zeros((), device=device, dtype=decoder.dtype)
            masks[kind] = torch.where(seen, zero, decoder.min_value)[:, None]
        positions = (slots - pads[:, 0]).clamp(min=0)  # (R, n)
        rope = {kind: (cos[positions][:, None], sin[positions][:, None])
                for kind, (cos, sin) in decoder.rope_tables.items()}
        return masks, rope, keys

    def rope_at(self, decoder, kind: str, positions: torch.Tensor):
        """cos/sin (1, 1, P, head_dim) of real positions (P,), for keys projected outside a step."""
        table = decoder.rope_tables.get(kind)
        if table is None:
            return None
        return table[0][positions][None, None], table[1][positions][None, None]

    # ----- one block ------------------------------------------------------------------------------
    def embed(self, ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        hidden = self.embedding(ids)
        if self.position_embedding is not None:
            hidden = hidden + self.position_embedding(positions)
        return hidden

    def attention_input(self, j: int, hidden: torch.Tensor) -> torch.Tensor:
        return self.modules[j]["attention_norm"](hidden)

    def _split(self, x: torch.Tensor, heads: int) -> torch.Tensor:
        return x.view(x.shape[0], -1, heads, self.head_dim).transpose(1, 2)

    def queries_keys_values(self, j: int, normed: torch.Tensor, rope):
        """Queries (R, heads, n, head_dim), keys and values (R, kv_heads, n, head_dim) of block j,
        q/k-normed and rotated as the model does; GPT-2's fused c_attn in one product."""
        parts = self.modules[j]
        if parts["qkv"] is not None:  # GPT-2
            query, key, value = project(parts["qkv"], normed).split(self.d_model, dim=-1)
        else:
            query, key, value = (project(parts[name], normed) for name in ("q", "k", "v"))
        query = self._split(query, self.num_heads)
        if parts["q_norm"] is not None:
            query = parts["q_norm"](query)
        keys, values = self._keys_values(parts, key, value, rope)
        return apply_rotary(query, rope), keys, values

    def keys_values(self, j: int, normed: torch.Tensor, rope):
        """Keys and values alone (state propagation)."""
        parts = self.modules[j]
        if parts["qkv"] is not None:  # GPT-2: the key and value columns of c_attn
            _, key, value = project(parts["qkv"], normed).split(self.d_model, dim=-1)
        else:
            key, value = project(parts["k"], normed), project(parts["v"], normed)
        return self._keys_values(parts, key, value, rope)

    def _keys_values(self, parts, key: torch.Tensor, value: torch.Tensor, rope):
        keys, values = self._split(key, self.num_kv_heads), self._split(value, self.num_kv_heads)
        if parts["k_norm"] is not None:
            keys = parts["k_norm"](keys)
        return apply_rotary(keys, rope), values

    def attention_output(self, j: int, out: torch.Tensor) -> torch.Tensor:
        parts = self.modules[j]
        out = project(parts["o"], out)
        if parts["attention_out_norm"] is not None:
            out = parts["attention_out_norm"](out)
        return out

    def feed_forward(self, j: int, hidden: torch.Tensor) -> torch.Tensor:
        parts = self.modules[j]
        mlp = parts["mlp"]
        normed = parts["feed_forward_norm"](hidden)
        if hasattr(mlp, "gate_proj"):  # gated: down(act(gate x) * up x)
            inner = mlp.act_fn(project(mlp.gate_proj, normed)) * project(mlp.up_proj, normed)
            out = project(mlp.down_proj, inner)
        else:  # GPT-2: its own module (Conv1D layers, gelu, dropout)
            out = mlp(normed)
        if parts["feed_forward_out_norm"] is not None:
            out = parts["feed_forward_out_norm"](out)
        return hidden + out

    @staticmethod
    def clamp(hidden: torch.Tensor) -> torch.Tensor:
        return hidden

    def final_norm(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.norm(hidden)

    head_input = final_norm

    def check_input(self):
        return self.norm


SUPPORTED_CAUSAL = tuple(CAUSAL_BLOCKS)


def describe(model):
    """The architecture of `model`'s decoder, made once per model instance."""
    arch = model.__dict__.get("_early_exit_arch")
    if arch is None or arch.model is not model:
        model_type = model.config.model_type
        if model_type in CAUSAL_BLOCKS:
            arch = CausalDecoder(model)
        elif hasattr(model, "decoder") and hasattr(model.decoder, "block"):
            arch = T5Decoder(model)
        else:
            raise ValueError(f"model type {model_type!r} is not supported by the early-exit decoder; supported: "
                             f"T5-family encoder-decoders and {', '.join(SUPPORTED_CAUSAL)}.")
        model.__dict__["_early_exit_arch"] = arch
    return arch


def layer_windows(arch) -> List[Optional[int]]:
    """Per block: the sliding window it attends within, or None."""
    return [arch.window if kind == SLIDING else None for kind in arch.layer_kinds]
