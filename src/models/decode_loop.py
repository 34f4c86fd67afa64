"""The greedy early-exit decode loop over a HuggingFace T5 model's own modules.

We own the loop instead of patching `generate`: each token runs decoder blocks one at a time, so
it can stop after any of them. Attention is computed here over preallocated key/value buffers
with the same kernel (SDPA, scale 1, relative position bias as additive mask) that T5 uses in
transformers 5.x; layer norms and feed-forward layers are the model's own modules. With no exit
the loop therefore reproduces HF's greedy `generate` token for token.

Skipped blocks (state propagation): when a token exits at layer e, every block j > e still needs
its key/value for that position. They are projected from the copied state h_e, lazily: only
when a later token first reaches block j, in one batched projection for all pending positions.
A block no token reaches again (static exit) is never projected at all.

A block can also run several consecutive positions at once (causal among themselves, with their
own relative position bias): FREE's synchronized parallel pass (models.shallow_deep) uses that.
"""

import math
import time
from collections import defaultdict
from dataclasses import dataclass
from typing import List, Optional

import torch
import torch.nn.functional as F

from models.flops import (
    FlopCounter,
    cross_kv_flops,
    decoder_block_flops,
    encoder_flops,
    output_head_flops,
    skipped_block_flops,
)


@dataclass(frozen=True)
class ExitPolicy:
    """When a token leaves the decoder: resolved once per generate call from the flags."""

    num_layers: int
    last_layer: int  # static exit layer, or L
    conf_type: Optional[str] = None  # None: no confidence is computed
    threshold: float = 1.0
    min_layer: int = 1
    position_temp: Optional[float] = None
    max_checked_layer: Optional[int] = None  # shallow-deep: the shallow layer only


    @classmethod
    def from_args(cls, args, num_layers: int) -> "ExitPolicy":
        if args.use_shallow_deep:
            return cls(num_layers=num_layers, last_layer=num_layers, conf_type=args.shallow2deep_conf_type,
                       threshold=args.shallow2deep_conf_threshold, min_layer=args.shallow_exit_layer,
                       max_checked_layer=args.shallow_exit_layer)
        if args.static_exit_layer is not None:
            return cls(num_layers=num_layers, last_layer=args.static_exit_layer)
        if not args.use_early_exit:
            return cls(num_layers=num_layers, last_layer=num_layers)
        return cls(
            num_layers=num_layers,
            last_layer=num_layers,
            conf_type=args.exit_conf_type,
            threshold=args.exit_conf_threshold,
            min_layer=args.exit_min_layer or 1,
            position_temp=args.exit_position_temp,
        )

    def checks(self, layer: int) -> bool:
        """Whether confidence is computed after `layer` (1-based); never at the last layer."""
        highest = self.last_layer - 1 if self.max_checked_layer is None else self.max_checked_layer
        return self.conf_type is not None and self.min_layer <= layer <= highest

    def threshold_at(self, step: int, max_steps: int) -> float:
        """lambda_t = 0.9 lambda + 0.1 lambda exp(-tau t / N) (CALM's position decay)."""
        if self.position_temp is None:
            return self.threshold
        decay = math.exp(-self.position_temp * step / max(max_steps, 1))
        return 0.9 * self.threshold + 0.1 * self.threshold * decay


class ComponentTimer:
    """Wall time per component. Synchronises only on devices whose kernels run asynchronously."""

    def __init__(self, device: torch.device, synchronize: bool):
        self.seconds = defaultdict(float)
        self._sync = None
        if synchronize and device.type == "cuda":
            self._sync = torch.cuda.synchronize
        elif synchronize and device.type == "mps":
            self._sync = torch.mps.synchronize

    def now(self) -> float:
        if self._sync is not None:
            self._sync()
        return time.perf_counter()

    def add(self, name: str, start: float) -> float:
        end = self.now()
        self.seconds[name] += end - start
        return end


def scaled_norm(model, hidden: torch.Tensor) -> torch.Tensor:
    """s(norm(h)): the decoder's final norm and T5's output scaling, what the LM head reads."""
    normed = model.decoder.final_layer_norm(hidden)
    if model.config.scale_decoder_outputs:
        normed = normed * model.model_dim ** -0.5
    return normed


def output_logits(model, hidden: torch.Tensor) -> torch.Tensor:
    """z = W s(norm(h)): the model's own output head."""
    return model.lm_head(scaled_norm(model, hidden))


def counted_output_logits(model, hidden: torch.Tensor, flops: Optional[FlopCounter]) -> torch.Tensor:
    """output_logits of every position of `hidden` (1, n, d) for a prediction, its FLOPs counted
    with the blocks (an exit's output head is not a confidence computation)."""
    if flops is not None:
        flops.blocks += output_head_flops(flops.shape) * hidden.shape[1]
    return output_logits(model, hidden)


def _clamp_fp16(hidden: torch.Tensor) -> torch.Tensor:
    """T5's guard against inf in float16 activations, as HF's T5Block applies it."""
    if hidden.dtype != torch.float16:
        return hidden
    limit = torch.finfo(hidden.dtype).max
    limit = torch.where(torch.isinf(hidden).any(), limit - 1000, limit)
    return torch.clamp(hidden, min=-limit, max=limit)


class SequenceDecoder:
    """Greedy decoding of one sequence (batch 1) under an exit policy.

    `scorer` (a LayerScorer) computes confidences and exit predictions; `flops` (a FlopCounter)
    sums FLOPs when counting is on; with `trace`, every token runs all L layers (outputs are the
    full model's) and per-layer diagnostics are recorded with the layer the policy would exit at.
    """

    def __init__(self, model, policy: ExitPolicy, timer: ComponentTimer, max_new_tokens: int,
                 scorer=None, flops: Optional[FlopCounter] = None, trace: bool = False,
                 lazy_propagation: bool = True):
        self.model = model
        self.policy = policy
        self.timer = timer
        self.max_new_tokens = max_new_tokens
        self.scorer = scorer
        self.flops = flops
        self.trace = {"ranks": [], "confidences": [], "max_probs": [], "agrees": [], "exit_layers": []} if trace else None
        self.jsd_steps = []
        self.lazy = lazy_propagation
        decoder = model.decoder
        self.blocks = decoder.block
        self.embed = decoder.embed_tokens
        config = model.config
        self.num_heads, self.head_dim = config.num_heads, config.d_kv
        self.device, self.dtype = model.lm_head.weight.device, self.blocks[0].layer[0].SelfAttention.q.weight.dtype

        L, n = len(self.blocks), max_new_tokens
        shape = (L, 1, self.num_heads, n, self.head_dim)
        self.keys = torch.empty(shape, device=self.device, dtype=self.dtype)
        self.values = torch.empty(shape, device=self.device, dtype=self.dtype)
        self.filled = [0] * L  # positions whose key/value are valid, per block
        self.exit_states = torch.empty((1, n, config.d_model), device=self.device, dtype=self.dtype)
        self.cross = [None] * L  # per block: (keys, values) over the encoder output, made on first use
        self.position_bias = (
            self.blocks[0].layer[0].SelfAttention.compute_bias(n, n, device=self.device).to(self.dtype)
        )
        # additive mask of later positions, for passes over several positions at once
        self.future = torch.full((n, n), torch.finfo(self.dtype).min, device=self.device, dtype=self.dtype).triu(1)
        self.causal = True
        self.block_runs = [0] * L  # positions each block ran, parallel recomputation included

    # ----- pieces of one block -----------------------------------------------------------
    def _split_heads(self, x: torch.Tensor) -> torch.Tensor:
        return x.view(1, -1, self.num_heads, self.head_dim).transpose(1, 2)

    def _store_self_kv(self, j: int, normed: torch.Tensor, start: int) -> None:
        attention = self.blocks[j].layer[0].SelfAttention
        end = start + normed.shape[1]
        self.keys[j, :, :, start:end] = self._split_heads(attention.k(normed))
        self.values[j, :, :, start:end] = self._split_heads(attention.v(normed))
        self.filled[j] = end

    def _attend(self, attention, query_input, keys, values, mask):
        query = self._split_heads(attention.q(query_input))
        out = F.scaled_dot_product_attention(query, keys, values, attn_mask=mask, scale=1.0)
        return attention.o(out.transpose(1, 2).reshape(1, -1, self.num_heads * self.head_dim))

    def _cross_kv(self, j: int):
        if self.cross[j] is None:
            attention = self.blocks[j].layer[1].EncDecAttention
            self.cross[j] = (self._split_heads(attention.k(self.encoder_states)),
                             self._split_heads(attention.v(self.encoder_states)))
            if self.flops is not None:
                self.flops.blocks += cross_kv_flops(self.flops.shape, self.encoder_states.shape[1])
        return self.cross[j]

    def _self_mask(self, start: int, end: int) -> torch.Tensor:
        """Relative position bias of query positions start..end-1 (causal among themselves)."""
        mask = self.position_bias[:, :, start:end, :end]
        if end - start > 1 and self.causal:
            mask = mask + self.future[start:end, :end]
        return mask

    def _block(self, j: int, hidden: torch.Tensor, t: int) -> torch.Tensor:
        """Block j (0-based) on the positions t.. of `hidden` (1, n, d), reading and extending the caches."""
        self_layer, cross_layer, ff_layer = self.blocks[j].layer
        end = t + hidden.shape[1]
        normed = self_layer.layer_norm(hidden)
        self._store_self_kv(j, normed, t)
        hidden = hidden + self._attend(self_layer.SelfAttention, normed, self.keys[j, :, :, :end],
                                       self.values[j, :, :, :end], self._self_mask(t, end))
        hidden = _clamp_fp16(hidden)
        keys, values = self._cross_kv(j)
        hidden = hidden + self._attend(cross_layer.EncDecAttention, cross_layer.layer_norm(hidden), keys, values,
                                       self.cross_mask)
        hidden = _clamp_fp16(hidden)
        self.block_runs[j] += end - t
        if self.flops is not None:
            self.flops.blocks += sum(decoder_block_flops(self.flops.shape, p + 1, self.encoder_states.shape[1])
                                     for p in range(t, end))
        return _clamp_fp16(ff_layer(hidden))

    def _propagate(self, j: int, upto: int) -> None:
        """Give block j keys/values for positions filled[j]..upto-1 from their copied exit states."""
        start = self.filled[j]
        if start < upto:
            normed = self.blocks[j].layer[0].layer_norm(self.exit_states[:, start:upto])
            self._store_self_kv(j, normed, start)
            if self.flops is not None:
                self.flops.blocks += skipped_block_flops(self.flops.shape, upto - start)

    def _output_head(self, hidden: torch.Tensor) -> torch.Tensor:
        """The full head that predicts a token at the last layer (counted with the blocks)."""
        return counted_output_logits(self.model, hidden, self.flops)[:, -1].argmax(-1, keepdim=True)

    # ----- the loop ------------------------------------------------------------------------
    def run(self, input_ids: torch.Tensor, start_token: int, eos_ids: set):
        """Decode input_ids (1, S). Returns (tokens with the start token, exit layer per token)."""
        timer = self.timer
        mark = timer.now()
        self.encoder_states = self.model.encoder(input_ids=input_ids).last_hidden_state
        self.cross_mask = torch.zeros((1, self.num_heads, 1, input_ids.shape[1]), device=self.device, dtype=self.dtype)
        if self.flops is not None:
            self.flops.encoder += encoder_flops(self.flops.shape, input_ids.shape[1])
        timer.add("encoder", mark)

        self.tokens, self.exit_layers = [start_token], []
        step = self._trace_token if self.trace is not None else self._decode_token
        token = torch.tensor([[start_token]], device=self.device)
        while len(self.tokens) <= self.max_new_tokens:
            t = len(self.tokens) - 1  # position of the input token
            prediction, exit_layer = step(token, t)
            if prediction is None:  # rolled back: resume after the corrected token
                token = torch.tensor([[self.tokens[-1]]], device=self.device)
            else:
                token = prediction
                self.tokens.append(int(prediction.item()))
                self.exit_layers.append(exit_layer)
                if self.scorer is not None and self.scorer.jsd_step is not None:
                    self.jsd_steps.append(self.scorer.jsd_step)
            if self.tokens[-1] in eos_ids:
                break
        return self.tokens, self.exit_layers

    def _decode_token(self, token: torch.Tensor, t: int):
        """One token under the exit policy: (predicted token (1, 1), exit layer)."""
        timer, policy, scorer = self.timer, self.policy, self.scorer
        threshold = policy.threshold_at(t, self.max_new_tokens)
        if scorer is not None:
            scorer.start_token()
        hidden = self.embed(token)
        previous, prediction, exit_layer = hidden, None, policy.last_layer
        for j in range(policy.last_layer):
            if self.filled[j] < t:
                mark = timer.now()
                self._propagate(j, t)
                timer.add("propagation", mark)
            mark = timer.now()
            previous, hidden = hidden, self._block(j, hidden, t)
            mark = timer.add("blocks", mark)
            if scorer is None:
                continue
            scorer.remember(j + 1, hidden)
            if policy.checks(j + 1) and scorer.confidence(j + 1, hidden, previous) > threshold:
                exit_layer = j + 1
                prediction = scorer.predict(exit_layer, hidden)
                timer.add("confidence", mark)
                break
            timer.add("confidence", mark)
        mark = timer.now()
        if exit_layer < policy.num_layers:
            self.exit_states[:, t] = hidden[:, 0]
            if not self.lazy:
                for j in range(exit_layer, policy.num_layers):
                    self._propagate(j, t + 1)
        if prediction is None:  # the last layer (or a static exit): the full output head
            prediction = self._output_head(hidden)
        timer.add("head", mark)
        return prediction, exit_layer

    def _trace_token(self, token: torch.Tensor, t: int):
        """plotting_logits: run all L layers, record each layer's view of the final prediction."""
        policy, scorer = self.policy, self.scorer
        threshold = policy.threshold_at(t, self.max_new_tokens)
        if scorer is not None:
            scorer.start_token()
        hidden = self.embed(token)
        layer_logits, confidences, would_exit = [], [], None
        for j in range(policy.num_layers):
            previous, hidden = hidden, self._block(j, hidden, t)
            confidence = float("nan")
            if scorer is not None:
                scorer.remember(j + 1, hidden)
                if policy.checks(j + 1):
                    confidence = scorer.confidence(j + 1, hidden, previous)
                    if confidence > threshold and would_exit is None:
                        would_exit = j + 1
            confidences.append(confidence)
            layer_logits.append(output_logits(self.model, hidden)[0, -1])
        logits = torch.stack(layer_logits)  # (L, V)
        final = logits[-1].argmax()
        self.trace["ranks"].append((logits > logits[:, final : final + 1]).sum(-1).tolist())
        self.trace["confidences"].append(confidences)
        self.trace["max_probs"].append(logits.float().softmax(-1).max(-1).values.tolist())
        self.trace["agrees"].append((logits.argmax(-1) == final).tolist())
        self.trace["exit_layers"].append(would_exit or policy.last_layer)
        return final.view(1, 1), policy.num_layers


def summarise_exits(exit_layers: List[int], block_runs: List[int]) -> dict:
    """block_avg (blocks run per generated token, parallel recomputation included), block_op
    (positions each block ran) and the histogram of exit layers."""
    count = len(exit_layers)
    histogram = [sum(1 for e in exit_layers if e == layer) for layer in range(1, len(block_runs) + 1)]
    return {
        "tokens": count,
        "block_avg": (sum(block_runs) / count) if count else 0.0,
        "block_op": list(block_runs),
        "exit_layer_counts": histogram,
    }
