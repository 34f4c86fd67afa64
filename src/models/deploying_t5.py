"""T5 for deployment: HF's T5ForConditionalGeneration with an early-exit `generate` (greedy or sampling).

    from models.deploying_t5 import DeployT5ForConditionalGeneration
    from util.additional_args import AdditionalArguments, update_autoconfig

    config = update_autoconfig(AutoConfig.from_pretrained(path), AdditionalArguments(...))
    model = DeployT5ForConditionalGeneration.from_pretrained(path, config=config)
    ids = model.generate(input_ids=..., attention_mask=..., max_new_tokens=64)
    model.exit_stats()  # block_avg, block_op, tokens, exit layers, wall time per component

The flags are read from `model.config` at every call, so changing them (through
`update_autoconfig`) takes effect on the next `generate`; `generate(..., exit_args=args)` decodes
one call with other flags and leaves the config as it is.
"""

import dataclasses
import logging
from typing import Optional

import torch
from transformers import T5ForConditionalGeneration

from models.architectures import describe
from models.confidence import META_HEAD_BIASES, build_meta_head
from models.adaptive_threshold import BetaMixtureThreshold
from models.decode_loop import BatchDecoder, ComponentTimer, ExitPolicy
from models.exit_step import exit_step, first_token
from models.flops import Shape, encoder_flops
from models.layer_scorer import LayerScorer
from models.results import TIMED_COMPONENTS, merge_rows
from models.sampling import Sampler, SamplingConfig
from models.self_speculation import SelfSpeculativeStep, speculation_rates
from models.shallow_deep import ShallowDeepStep
from util.additional_args import (AdditionalArguments, normalise_saved_flags, uses_parallel_decoding,
                                  validate_additional_args)
from util.additional_args import uses_meta_head as _uses_meta_head


logger = logging.getLogger(__name__)


class EarlyExitGenerationMixin:
    """The early-exit `generate` and `exit_stats` over any T5-family model whose decoder is T5's
    (its blocks, final norm, LM head and relative position bias). Put it before the HF class."""

    def _init_early_exit(self, config) -> None:
        if _uses_meta_head(config):
            self.cm_head = build_meta_head(config.hidden_size)
        ignored = normalise_saved_flags(config)  # after the head: a meta-head checkpoint keeps its head
        if ignored:
            logger.warning("the model's config carries training-time flags that do not act in decoding: ignored %s",
                           ", ".join(ignored))
        self._exit_stats = {}
        self.threshold_estimator = None  # FREE's adaptive threshold, kept across generate calls

    @classmethod
    def from_pretrained(cls, *args, **kwargs):
        """HF's from_pretrained; a meta head saved without biases (FREE trains it with
        bias=False) is built bias-free, so that it computes what was trained."""
        wants_info = kwargs.pop("output_loading_info", False)
        model, info = super().from_pretrained(*args, output_loading_info=True, **kwargs)
        missing = [key for key in info["missing_keys"] if key in META_HEAD_BIASES]
        if missing and getattr(model, "cm_head", None) is not None:
            if len(missing) != len(META_HEAD_BIASES):
                raise ValueError(f"the checkpoint's meta head lacks {missing} but has the other bias: not a head "
                                 "this model can build.")
            head = build_meta_head(model.config.hidden_size, bias=False).to(model.cm_head[0].weight)
            with torch.no_grad():
                for j in (0, 2):
                    head[j].weight.copy_(model.cm_head[j].weight)
            model.cm_head = head
            info["missing_keys"] = [key for key in info["missing_keys"] if key not in META_HEAD_BIASES]
            logger.info("the checkpoint's meta head has no biases (as FREE trains it): built without them.")
        return (model, info) if wants_info else model

    def exit_args(self, overrides: Optional[AdditionalArguments] = None) -> AdditionalArguments:
        """The validated flags a generate call decodes with: `overrides`, else the config's."""
        args = overrides if overrides is not None else AdditionalArguments.from_config(self.config)
        validate_additional_args(args, describe(self).num_layers)
        if _uses_meta_head(args) and getattr(self, "cm_head", None) is None:
            raise ValueError("exit_conf_type='meta' needs the meta head: build the model with that flag in its config.")
        return args

    def _max_new_tokens(self, max_new_tokens: Optional[int], max_length: Optional[int], prompt_length: int) -> int:
        if max_new_tokens is None:
            # like HF: max_length counts the decoder start token, or a decoder-only model's prompt
            max_length = max_length if max_length is not None else self.generation_config.max_length or 20
            max_new_tokens = max_length - (1 if describe(self).encoder_decoder else prompt_length)
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
            raise ValueError(f"max_new_tokens={max_new_tokens!r} must be a positive integer.")
        return max_new_tokens

    def _special_tokens(self):
        """(decoder start token or None for a decoder-only model, padding token, end tokens)."""
        gen, cfg = self.generation_config, self.config

        def token(name):  # an older config may lack the attribute altogether
            value = getattr(gen, name, None)
            return value if value is not None else getattr(cfg, name, None)

        pad, eos = token("pad_token_id"), token("eos_token_id")
        eos_ids = set(eos) if isinstance(eos, (list, tuple)) else ({eos} if eos is not None else set())
        if not describe(self).encoder_decoder:  # HF pads finished rows with the first end token
            first_eos = eos[0] if isinstance(eos, (list, tuple)) else eos
            pad = pad if pad is not None else first_eos
            return None, int(pad if pad is not None else 0), eos_ids
        pad = pad if pad is not None else 0
        start = token("decoder_start_token_id")
        start = start if start is not None else pad  # T5 starts from its pad token
        return int(start), int(pad), eos_ids

    @torch.inference_mode()
    def generate(self, input_ids=None, attention_mask=None, max_new_tokens=None, max_length=None,
                 do_sample=False, num_beams=1, temperature=None, top_k=None, top_p=None,
                 generator: Optional[torch.Generator] = None, lazy_propagation=True,
                 exit_args: Optional[AdditionalArguments] = None, **unsupported):
        """Greedy decoding with the exit policy, or with `do_sample` sampling (HF's temperature,
        top_k, top_p: the call's, else the generation_config's, else HF's defaults 1.0, 50, 1.0;
        draws from `generator`, or torch's global one as HF does); returns ids (B, longest + 1)
        as HF's generate does, shorter rows padded after their end.

        The rows of a batch decode together, each exactly as it would alone (its tokens, exit
        layers, block counts, FLOPs and traces). `exit_args` decodes this call with those flags
        instead of the ones in `model.config` (which stay the default). `lazy_propagation=False`
        fills skipped blocks' caches at once instead of on first use (same result; kept to test
        that claim).
        """
        if unsupported:
            raise ValueError(f"generate() does greedy decoding or sampling; unsupported arguments: {sorted(unsupported)}.")
        if num_beams != 1:
            raise ValueError(f"num_beams={num_beams!r}: beam search is not supported (early exit decides per token, "
                             "a beam search per hypothesis); num_beams must be 1.")
        if not isinstance(do_sample, bool):
            raise ValueError(f"do_sample={do_sample!r} must be True or False.")
        given = [name for name, value in (("temperature", temperature), ("top_k", top_k), ("top_p", top_p),
                                          ("generator", generator)) if value is not None]
        if given and not do_sample:
            raise ValueError(f"{', '.join(given)} only apply with do_sample=True (greedy decoding would ignore them).")
        sampling = SamplingConfig.resolve(self.generation_config, temperature, top_k, top_p) if do_sample else None
        if input_ids is None or input_ids.dim() != 2 or input_ids.shape[1] == 0:
            raise ValueError("input_ids must be a non-empty (batch, length) tensor.")
        if attention_mask is not None and attention_mask.shape != input_ids.shape:
            raise ValueError(f"attention_mask shape {tuple(attention_mask.shape)} differs from input_ids {tuple(input_ids.shape)}.")
        if attention_mask is not None and not attention_mask.bool().any(-1).all():
            row = int((~attention_mask.bool().any(-1)).nonzero()[0, 0])
            raise ValueError(f"row {row} of attention_mask masks every input token.")
        arch = describe(self)
        if not arch.encoder_decoder and attention_mask is not None:
            check_left_padded(attention_mask)
        args = self.exit_args(exit_args)
        if do_sample and args.emit_contrastive_token:
            raise ValueError("emit_contrastive_token emits the contrastive argmax, which has no distribution to sample "
                             "from: not supported with do_sample=True.")
        steps = self._max_new_tokens(max_new_tokens, max_length, input_ids.shape[1])
        start, pad, eos_ids = self._special_tokens()
        if self.training:
            raise ValueError("generate() needs the model in eval mode (call model.eval()): dropout would change outputs.")
        num_layers = arch.num_layers
        policy = ExitPolicy.from_args(args, num_layers)
        trace = bool(args.plotting_logits)
        if trace and policy.conf_type is None and args.static_exit_layer is None:
            # diagnostics of a run without exits still report the softmax confidence per layer
            policy = ExitPolicy(num_layers, num_layers, "softmax", 1.0)
        timer = ComponentTimer(self.device, args.use_synchronize)
        began = timer.now()
        input_ids = input_ids.to(self.device)
        attention_mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask.to(self.device)
        free = args.use_shallow_deep and uses_parallel_decoding(args) and not trace

        def decode(ids, mask):
            scorer = LayerScorer(self, args, policy.conf_type, args.render_jsds) if policy.conf_type else None
            if free and args.use_self_speculation:
                step = SelfSpeculativeStep(args.shallow2deep_conf_threshold, args.max_draft_tokens, eos_ids,
                                           sampling=do_sample, draft_vocab=args.draft_vocab_size)
            elif free:
                step = self._shallow_deep_step(args)
            else:
                step = exit_step
            if free and args.use_self_speculation:  # decoder-only: the prefill gives the full model's first token
                first_policy = ExitPolicy(num_layers, num_layers)
            elif free:  # FREE's rule at the shallow layer, with the step's (adaptive) threshold
                first_policy = dataclasses.replace(policy, threshold=step.threshold)
            else:
                first_policy = policy
            sampler = Sampler(sampling, ids.shape[0], generator) if do_sample else None
            decoder = BatchDecoder(self, policy, timer, steps, scorer=scorer, count_flops=args.count_flops, trace=trace,
                                   lazy_propagation=lazy_propagation, step=step, first_policy=first_policy,
                                   sampler=sampler, first_step=first_token)
            return decoder.run(ids, mask, start, eos_ids), step

        if free and args.use_adapt_threshold:
            # the estimate moves after every sample: rows decode one after another, each unpadded
            # at the estimate the rows before it left, exactly as at batch size 1
            rows = []
            for ids, mask in zip(input_ids, attention_mask):
                (row,), step = decode(ids[mask.bool()][None], mask[mask.bool()][None])
                for confidence, agrees in row.observations:
                    self.threshold_estimator.observe(confidence, agrees)
                self.threshold_estimator.end_sample()
                rows.append(row)
        else:
            rows, step = decode(input_ids, attention_mask)
        total = timer.now() - began

        width = max(len(row.tokens) for row in rows)
        out = torch.full((len(rows), width), pad, dtype=torch.long, device=self.device)
        for b, row in enumerate(rows):
            out[b, : len(row.tokens)] = torch.tensor(row.tokens, device=self.device)
        if not arch.encoder_decoder:  # the prompt, then the new tokens (tokens[0] is the prompt's last)
            out = torch.cat([input_ids, out[:, 1:]], dim=1)

        stats = merge_rows(rows, num_layers, policy.max_checked_layer if free else None,
                           counted=step.counted if free else ())
        if free and args.use_adapt_threshold:
            stats["adaptive_threshold"] = self.threshold_estimator.threshold
        if free and args.use_self_speculation:
            stats.update(speculation_rates(stats))
        stats["time_total"] = total
        for name in (arch.front,) + TIMED_COMPONENTS:
            stats[f"time_{name}"] = timer.seconds.get(name, 0.0)
        if trace:
            stats["layer_traces"] = [row.trace for row in rows]  # per row: util.diagnostics.LayerTrace fields
        if args.render_jsds:
            stats["jsd_steps"] = [row.jsd_steps for row in rows]  # per row, per token: {"jsd", "chosen", "expert_layer"}
        self._exit_stats = stats
        return out

    def _shallow_deep_step(self, args) -> ShallowDeepStep:
        """FREE's step; the adaptive threshold's estimator lives on the model across calls."""
        threshold, observing = args.shallow2deep_conf_threshold, False
        if args.use_adapt_threshold:
            # an estimate belongs to the settings it was fitted under: other ones start afresh
            settings = (args.shallow2deep_conf_threshold, args.adapt_threshold_level, args.adapt_threshold_samples,
                        args.shallow_exit_layer, args.shallow2deep_conf_type)
            if self.threshold_estimator is None or self.threshold_estimator.settings not in (None, settings):
                self.threshold_estimator = BetaMixtureThreshold(args.shallow2deep_conf_threshold,
                                                                args.adapt_threshold_level, args.adapt_threshold_samples)
            self.threshold_estimator.settings = settings
            threshold, observing = self.threshold_estimator.threshold, self.threshold_estimator.collecting
        return ShallowDeepStep(threshold, rollback_threshold=args.rollback_conf_threshold, observing=observing,
                               causal=args.parallel_causal_mask)

    def encoder_flops(self, positions: int) -> int:
        """FLOPs of the encoder over one row of `positions` tokens (LongT5 counts its own)."""
        return encoder_flops(Shape.of(self.config), positions)

    def exit_stats(self) -> dict:
        """Statistics of the last generate call."""
        return dict(self._exit_stats)


def check_left_padded(attention_mask: torch.Tensor) -> None:
    """Decoder-only batches are left-padded (HF's convention): each row's zeros come first."""
    mask = attention_mask.bool()
    later = mask.long().cummax(-1).values.bool()  # True from each row's first real token on
    if (later & ~mask).any():
        row = int((later & ~mask).any(-1).nonzero()[0, 0])
        raise ValueError(f"row {row} of attention_mask has padding after its first token: decoder-only models "
                         "decode left-padded batches (tokenizer.padding_side = 'left'), as HF's generate does.")


class DeployT5ForConditionalGeneration(EarlyExitGenerationMixin, T5ForConditionalGeneration):
    def __init__(self, config):
        super().__init__(config)
        self._init_early_exit(config)
