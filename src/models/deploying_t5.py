"""T5 for deployment: HF's T5ForConditionalGeneration with an early-exit greedy `generate`.

    from models.deploying_t5 import DeployT5ForConditionalGeneration
    from util.additional_args import AdditionalArguments, update_autoconfig

    config = update_autoconfig(AutoConfig.from_pretrained(path), AdditionalArguments(...))
    model = DeployT5ForConditionalGeneration.from_pretrained(path, config=config)
    ids = model.generate(input_ids=..., attention_mask=..., max_new_tokens=64)
    model.exit_stats()  # block_avg, block_op, tokens, exit layers, wall time per component

The flags are read from `model.config` at every call, so changing them (through
`update_autoconfig`) takes effect on the next `generate`.
"""

import time
from typing import Optional

import torch
from transformers import T5ForConditionalGeneration

from models.confidence import build_meta_head
from models.decode_loop import ComponentTimer, ExitPolicy, SequenceDecoder, summarise_exits
from models.flops import FlopCounter, Shape
from models.adaptive_threshold import BetaMixtureThreshold
from models.layer_scorer import LayerScorer
from models.self_speculation import SelfSpeculativeDecoder, speculation_rates
from models.shallow_deep import ShallowDeepDecoder
from util.additional_args import AdditionalArguments, uses_parallel_decoding, validate_additional_args

TIMED_COMPONENTS = ("encoder", "blocks", "confidence", "head", "propagation")


def _uses_meta_head(config) -> bool:
    return (
        getattr(config, "exit_conf_type", None) == "meta"
        or getattr(config, "shallow2deep_conf_type", None) == "meta"
        or bool(getattr(config, "train_meta_cm_head", False))
    )


class EarlyExitGenerationMixin:
    """The early-exit `generate` and `exit_stats` over any T5-family model whose decoder is T5's
    (its blocks, final norm, LM head and relative position bias). Put it before the HF class."""

    def _init_early_exit(self, config) -> None:
        if _uses_meta_head(config):
            self.cm_head = build_meta_head(config.d_model)
        self._exit_stats = {}
        self.threshold_estimator = None  # FREE's adaptive threshold, kept across generate calls

    def exit_args(self) -> AdditionalArguments:
        """The validated flags this model decodes with now."""
        args = AdditionalArguments.from_config(self.config)
        validate_additional_args(args, self.config.num_decoder_layers)
        if _uses_meta_head(args) and getattr(self, "cm_head", None) is None:
            raise ValueError("exit_conf_type='meta' needs the meta head: build the model with that flag in its config.")
        return args

    def _max_new_tokens(self, max_new_tokens: Optional[int], max_length: Optional[int]) -> int:
        if max_new_tokens is None:
            # like HF: max_length counts the decoder start token
            max_length = max_length if max_length is not None else self.generation_config.max_length or 20
            max_new_tokens = max_length - 1
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
            raise ValueError(f"max_new_tokens={max_new_tokens!r} must be a positive integer.")
        return max_new_tokens

    def _special_tokens(self):
        gen, cfg = self.generation_config, self.config
        start = gen.decoder_start_token_id if gen.decoder_start_token_id is not None else cfg.decoder_start_token_id
        if start is None:
            start = cfg.pad_token_id
        pad = gen.pad_token_id if gen.pad_token_id is not None else cfg.pad_token_id
        eos = gen.eos_token_id if gen.eos_token_id is not None else cfg.eos_token_id
        eos_ids = set(eos) if isinstance(eos, (list, tuple)) else ({eos} if eos is not None else set())
        return int(start), int(pad if pad is not None else 0), eos_ids

    @torch.inference_mode()
    def generate(self, input_ids=None, attention_mask=None, max_new_tokens=None, max_length=None,
                 do_sample=False, num_beams=1, lazy_propagation=True, **unsupported):
        """Greedy decoding with the configured exit policy; returns ids as HF's generate does.

        Each row of a batch is decoded on its own, without its padding, so that it is decoded
        exactly as it would be alone. `lazy_propagation=False` fills skipped blocks' caches at
        once instead of on first use (same result; kept to test that claim).
        """
        if unsupported:
            raise ValueError(f"generate() does greedy decoding only; unsupported arguments: {sorted(unsupported)}.")
        if do_sample or num_beams != 1:
            raise ValueError("generate() does greedy decoding only: do_sample must be False and num_beams 1.")
        if input_ids is None or input_ids.dim() != 2 or input_ids.shape[1] == 0:
            raise ValueError("input_ids must be a non-empty (batch, length) tensor.")
        if attention_mask is not None and attention_mask.shape != input_ids.shape:
            raise ValueError(f"attention_mask shape {tuple(attention_mask.shape)} differs from input_ids {tuple(input_ids.shape)}.")
        args = self.exit_args()
        steps = self._max_new_tokens(max_new_tokens, max_length)
        start, pad, eos_ids = self._special_tokens()
        num_layers = self.config.num_decoder_layers
        policy = ExitPolicy.from_args(args, num_layers)
        timer = ComponentTimer(self.device, args.use_synchronize)
        if self.training:
            raise ValueError("generate() needs the model in eval mode (call model.eval()): dropout would change outputs.")

        flops = FlopCounter(Shape.of(self.config)) if args.count_flops else None
        trace = bool(args.plotting_logits)
        if trace and policy.conf_type is None and args.static_exit_layer is None:
            # diagnostics of a run without exits still report the softmax confidence per layer
            policy = ExitPolicy(num_layers, num_layers, "softmax", 1.0)
        began = timer.now()
        input_ids = input_ids.to(self.device)
        rows, all_exits, traces, jsd_steps = [], [], [], []
        block_runs = [0] * num_layers
        free_counts = {}
        for b in range(input_ids.shape[0]):
            ids = input_ids[b : b + 1]
            if attention_mask is not None:
                ids = ids[:, attention_mask[b].to(self.device).bool()]
                if ids.shape[1] == 0:
                    raise ValueError(f"row {b} of attention_mask masks every input token.")
            scorer = LayerScorer(self, args, policy.conf_type, flops, args.render_jsds) if policy.conf_type else None
            decoder = self._sequence_decoder(args, policy, timer, steps, scorer, flops, trace, lazy_propagation)
            tokens, exits = decoder.run(ids, start, eos_ids)
            block_runs = [a + b for a, b in zip(block_runs, decoder.block_runs)]
            for key, value in getattr(decoder, "counts", {}).items():
                free_counts[key] = free_counts.get(key, 0) + value
            if self.threshold_estimator is not None and args.use_adapt_threshold:
                self.threshold_estimator.end_sample()
            rows.append(tokens)
            all_exits.append(exits)
            traces.append(decoder.trace)
            jsd_steps.append(decoder.jsd_steps)
        total = timer.now() - began

        width = max(len(r) for r in rows)
        out = torch.full((len(rows), width), pad, dtype=torch.long, device=self.device)
        for b, tokens in enumerate(rows):
            out[b, : len(tokens)] = torch.tensor(tokens, device=self.device)

        stats = summarise_exits([e for exits in all_exits for e in exits], block_runs)
        stats.update(free_counts)
        if args.use_self_speculation:
            stats.update(speculation_rates(free_counts))
        if args.use_adapt_threshold:
            stats["adaptive_threshold"] = self.threshold_estimator.threshold
        stats["exit_layers"] = all_exits
        stats["time_total"] = total
        for name in TIMED_COMPONENTS:
            stats[f"time_{name}"] = timer.seconds.get(name, 0.0)
        if flops is not None:
            stats.update(flops.as_stats())
        if trace:
            stats["layer_traces"] = traces  # per row: util.diagnostics.LayerTrace fields
        if args.render_jsds:
            stats["jsd_steps"] = jsd_steps  # per row, per token: {"jsd", "chosen", "expert_layer"}
        self._exit_stats = stats
        return out

    def _sequence_decoder(self, args, policy, timer, steps, scorer, flops, trace, lazy_propagation):
        """The decode loop for one row: FREE's synchronized parallel decoding, or the exit loop."""
        common = dict(scorer=scorer, flops=flops, trace=trace, lazy_propagation=lazy_propagation)
        if not (args.use_shallow_deep and uses_parallel_decoding(args)) or trace:
            return SequenceDecoder(self, policy, timer, steps, **common)
        if args.use_self_speculation:
            return SelfSpeculativeDecoder(self, policy, timer, steps, max_draft_tokens=args.max_draft_tokens, **common)
        estimator = None
        if args.use_adapt_threshold:
            if self.threshold_estimator is None:
                self.threshold_estimator = BetaMixtureThreshold(args.shallow2deep_conf_threshold,
                                                                args.adapt_threshold_level, args.adapt_threshold_samples)
            estimator = self.threshold_estimator
        return ShallowDeepDecoder(self, policy, timer, steps, rollback_threshold=args.rollback_conf_threshold,
                                  estimator=estimator, causal=args.parallel_causal_mask, **common)

    def exit_stats(self) -> dict:
        """Statistics of the last generate call."""
        return dict(self._exit_stats)


class DeployT5ForConditionalGeneration(EarlyExitGenerationMixin, T5ForConditionalGeneration):
    def __init__(self, config):
        super().__init__(config)
        self._init_early_exit(config)
