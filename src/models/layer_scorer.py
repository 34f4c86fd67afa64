"""Scores an intermediate decoder layer of one token: its confidence and, on exit, its prediction.

Combines the confidence measures (models.confidence) with vocabulary reduction
(models.vocab_reduction) and counts their FLOPs. One scorer serves a whole sequence; the decode
loop calls `start_token` before each token, `confidence` at each checked layer and `predict` at
the exit layer.
"""

from typing import Optional

import torch
import torch.nn.functional as F

from models import confidence as measures
from models.decode_loop import counted_output_logits
from models.flops import FlopCounter, head_flops
from models.vocab_reduction import ReducedHead

CONTRASTIVE = ("contrastive_decoding", "reweight_contrastive_decoding", "JSD_contrastive_confidence")
FIRST_AMATEUR_LAYER = 2  # JSD candidates are layers 2..l-1


class LayerScorer:
    def __init__(self, model, args, conf_type: str, flops: Optional[FlopCounter] = None,
                 record_jsd: bool = False):
        self.model = model
        self.kind = conf_type
        self.weight = model.lm_head.weight
        norm = model.decoder.final_layer_norm
        scale = model.model_dim ** -0.5 if model.config.scale_decoder_outputs else 1.0
        # T5's output scaling folded into the final norm's weight once, so that a check
        # normalises in one rms_norm call instead of T5LayerNorm's six ops plus a multiplication
        self.norm_weight = (norm.weight * scale).detach()
        self.norm_eps = norm.variance_epsilon
        self.num_layers = model.config.num_decoder_layers
        self.reduction = args.type_vocab_reduct
        self.reduction_settings = (args.vocab_k_max, args.vocab_k_min, args.vocab_adaptive_scale, args.vocab_rerank)
        self.alpha = args.cd_alpha
        self.emit_contrastive = args.emit_contrastive_token
        self.flops = flops
        self.record_jsd = record_jsd
        self.start_token()

    # ----- per token ------------------------------------------------------------------------
    def start_token(self) -> None:
        self.states = {}  # layer -> raw hidden state, for the contrastive amateur layers
        self.reduced = ReducedHead(self.reduction, self.num_layers, *self.reduction_settings) if self.reduction else None
        self.previous_confidence = 0.0
        self.logits = None  # scores of the last scored layer
        self.token_ids = None  # their position -> token id map, None for the full vocabulary
        self.contrastive_choice = None  # argmax of s at the last contrastive check
        self.jsd_step = None  # render_jsds record of the last JSD check

    def remember(self, layer: int, hidden: torch.Tensor) -> None:
        if self.kind in CONTRASTIVE:
            self.states[layer] = hidden

    def normed(self, hidden: torch.Tensor) -> torch.Tensor:
        """s(norm(h)), what the LM head reads (equal to decode_loop.scaled_norm up to rounding)."""
        return F.rms_norm(hidden, self.norm_weight.shape, self.norm_weight, self.norm_eps)

    def _count(self, flops: int) -> None:
        if self.flops is not None:
            self.flops.confidence += flops

    # ----- scoring ------------------------------------------------------------------------------
    def _score(self, layer: int, hidden: torch.Tensor) -> None:
        """Logits of this layer over the full vocabulary, or over the retained set once reduction started."""
        normed = self.normed(hidden)
        reduced = self.reduced
        if reduced is None or not reduced.started:
            self.logits, self.token_ids = F.linear(normed, self.weight), None
            self._count(head_flops(self.flops.shape, self.weight.shape[0]) if self.flops else 0)
            if reduced is not None:
                reduced.start(layer, self.logits, self.weight)
            return
        if reduced.rerank and self.token_ids is not None:
            reduced.reorder(self.logits)  # order the retained set by the previous layer's scores
        size = reduced.size_at(layer, self.previous_confidence)
        # positions of the scores index the retained set's prefix, so its map needs no slicing
        self.logits, self.token_ids = reduced.logits(normed, size), reduced.token_ids
        self._count(head_flops(self.flops.shape, size) if self.flops else 0)

    def _rows(self, positions: torch.Tensor) -> torch.Tensor:
        """Rows of W for positions of the current scores."""
        if self.token_ids is None:
            return self.weight.index_select(0, positions)
        return self.reduced.rows.index_select(0, positions)

    def confidence(self, layer: int, hidden: torch.Tensor, previous: torch.Tensor) -> float:
        kind = self.kind
        if kind in ("softmax",) + CONTRASTIVE or self.reduced is not None:
            self._score(layer, hidden)
        if kind == "softmax":
            value = measures.softmax_confidence_value(self.logits)  # a float: the hot path
        elif kind == "state":
            value = measures.state_confidence(hidden, previous)
            self._count(6 * hidden.shape[-1])
        elif kind == "meta":
            value = measures.meta_confidence(self.model.cm_head, self.model.decoder.final_layer_norm(hidden))
            d = hidden.shape[-1]
            self._count(2 * d * d + 2 * d * 2)
        else:
            value = self._contrastive(layer)
        self.previous_confidence = float(value)
        return self.previous_confidence

    def _contrastive(self, layer: int) -> torch.Tensor:
        logits = self.logits[0, 0]
        probs = F.softmax(measures._wide(logits), dim=-1)
        head = measures.plausibility_head(probs, self.alpha)
        rows = self._rows(head)
        expert = logits.index_select(0, head)
        if self.kind == "JSD_contrastive_confidence":
            amateur_layers = list(range(FIRST_AMATEUR_LAYER, layer))
        else:
            amateur_layers = [layer // 2]
        amateur_states = torch.cat([self.states[j] for j in amateur_layers], dim=1)  # (1, C, d)
        amateur = F.linear(self.normed(amateur_states), rows)[0]  # (C, |head|), one matmul for all
        n, d = head.shape[0], rows.shape[1]
        self._count(amateur.shape[0] * (2 * d * n + 5 * n) + 5 * logits.shape[0])
        if self.kind == "JSD_contrastive_confidence":
            candidates = torch.tensor(amateur_layers, device=amateur.device)
            discounted = measures.discounted_jsd(measures.restricted_jsd(expert, amateur), candidates, layer)
            choice = int(discounted.argmax())
            self._count(10 * n * amateur.shape[0])
            if self.record_jsd:
                self.jsd_step = {"jsd": dict(zip(amateur_layers, discounted.tolist())),
                                 "chosen": amateur_layers[choice], "expert_layer": layer}
            amateur = amateur[choice : choice + 1]
        mass = None if self.kind == "contrastive_decoding" else probs.index_select(0, head).sum()
        head_scores = measures.contrastive_head_scores(expert, amateur[0], mass)
        value, self.contrastive_choice = measures.contrastive_confidence(probs, head, head_scores)
        return value

    def predict(self, layer: int, hidden: torch.Tensor) -> torch.Tensor:
        """Token id (1, 1) emitted by a token exiting at `layer`."""
        if self.logits is None:  # meta/state without reduction: the output head, counted with the blocks
            self.logits = counted_output_logits(self.model, hidden, self.flops)
        if self.emit_contrastive and self.contrastive_choice is not None:
            position = self.contrastive_choice.view(1, 1)
        else:
            position = self.logits[:, -1].argmax(-1, keepdim=True)
        return position if self.token_ids is None else self.token_ids[position]
