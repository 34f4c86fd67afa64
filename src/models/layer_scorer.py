"""Scores an intermediate decoder layer for the rows of a batch: confidences and exit predictions.

Combines the confidence measures (models.confidence) with vocabulary reduction
(models.vocab_reduction) and counts their FLOPs per row. One scorer serves a generate call; for
each token step the decode loop calls `start_step`, then per block `remember`, `confidence` at
each checked layer, `predict` for the rows that exit and `keep` with the rows that go on. All
per-token state is aligned with the rows still running, so a row's figures never depend on the
other rows. Softmax, state and meta measures run batched; the contrastive measures loop over
rows, because each row's plausibility head has its own size.
"""

from typing import List, Optional

import torch
import torch.nn.functional as F

from models import confidence as measures
from models.decode_loop import output_tokens
from models.flops import head_flops
from models.architectures import describe
from models.projection import project
from models.vocab_reduction import RetainedSets

CONTRASTIVE = ("contrastive_decoding", "reweight_contrastive_decoding", "JSD_contrastive_confidence")
FIRST_AMATEUR_LAYER = 2  # JSD candidates are layers 2..l-1


class LayerScorer:
    def __init__(self, model, args, conf_type: str, record_jsd: bool = False):
        self.model = model
        self.kind = conf_type
        self.head = model.lm_head
        self.arch = describe(model)
        # s(norm(h)) as the architecture computes it for checks (T5: its output scaling folded into
        # the final norm's weight, one rms_norm call instead of T5LayerNorm's six ops and a product)
        self.normed = self.arch.check_input()
        self.num_layers = self.arch.num_layers
        self.reduction = args.type_vocab_reduct
        self.reduction_settings = (args.vocab_k_max, args.vocab_k_min, args.vocab_adaptive_scale, args.vocab_rerank)
        self.alpha = args.cd_alpha
        self.emit_contrastive = args.emit_contrastive_token
        self.record_jsd = record_jsd
        # meta/state measures need no vocabulary scores to decide: heads only at the exit layer
        self.scores_to_decide = conf_type == "softmax" or conf_type in CONTRASTIVE
        # meta/state without reduction: an exiting row's token is the output head's argmax, which
        # the decode loop computes once per step for every row that left (one pass over W)
        self.exits_read_output_head = not self.scores_to_decide and not self.reduction

    @property
    def weight(self) -> torch.Tensor:
        """W, the output head's weight: reduced checks score its retained rows."""
        return self.head.weight

    # ----- per token step ---------------------------------------------------------------------
    def start_step(self, counters: Optional[list]) -> None:
        """A new token for every running row; `counters` are their FlopCounters (or None)."""
        self.counters = counters
        self.states = {}  # layer -> raw hidden states (R, 1, d), for the contrastive amateurs
        self.reduced = RetainedSets(self.reduction, self.num_layers, *self.reduction_settings) if self.reduction else None
        self.start_normed = None  # meta/state with reduction: s(norm(h_r)) of the start layer
        self.previous_confidence: Optional[List[float]] = None
        self.previous_before_exit: Optional[List[float]] = None  # c_(l-1) of each row, for `predict`
        self.start_layer = None  # meta/state with reduction: the first checked layer
        self.logits = None  # (R, n) scores of the last scored layer
        self.reduced_scores = False  # whether they index the retained sets (else the vocabulary)
        self.contrastive_choice: Optional[List[int]] = None  # argmax of s per row, last check
        self.jsd_step: Optional[List[Optional[dict]]] = None  # render_jsds record per row, last check

    def keep(self, which: List[int]) -> None:
        """Only the rows at these positions (among the running ones) go on."""
        index = torch.tensor(which, dtype=torch.long, device=self.weight.device)
        self.states = {layer: h.index_select(0, index) for layer, h in self.states.items()}
        if self.reduced is not None and self.reduced.started:
            self.reduced.keep(index)
        if self.start_normed is not None:
            self.start_normed = self.start_normed.index_select(0, index)
        if self.logits is not None:
            self.logits = self.logits.index_select(0, index)
        for name in ("previous_confidence", "previous_before_exit", "contrastive_choice", "jsd_step", "counters"):
            values = getattr(self, name)
            if values is not None:
                setattr(self, name, [values[i] for i in which])

    def remember(self, layer: int, hidden: torch.Tensor) -> None:
        if self.kind in CONTRASTIVE:
            self.states[layer] = hidden

    def _count(self, value_of) -> None:
        """Add value_of(shape, i) confidence FLOPs to running row i's counter (when counting)."""
        if self.counters is not None:
            for i, counter in enumerate(self.counters):
                counter.confidence += value_of(counter.shape, i)

    # ----- scoring ----------------------------------------------------------------------------
    def _score(self, layer: int, hidden: torch.Tensor) -> None:
        """Scores of this layer over the vocabulary, or over the retained sets once reduction started."""
        normed = self.normed(hidden)
        reduced = self.reduced
        if reduced is None or not reduced.started:
            self.logits, self.reduced_scores = project(self.head, normed[:, 0]), False
            self._count(lambda shape, i: head_flops(shape, self.weight.shape[0]))
            if reduced is not None:
                reduced.start(layer, self.logits, self.weight)
            return
        if reduced.rerank and self.reduced_scores:
            reduced.reorder(self.logits)  # order each retained set by the previous layer's scores
        sizes = reduced.sizes_at(layer, self.previous_confidence)
        self.logits, self.reduced_scores = reduced.logits(normed, sizes), True
        self._count(lambda shape, i: head_flops(shape, sizes[i]))

    def confidence(self, layer: int, hidden: torch.Tensor, previous: torch.Tensor) -> List[float]:
        """The confidence of every running row after `layer` (hidden (R, 1, d))."""
        kind = self.kind
        if self.scores_to_decide:
            self._score(layer, hidden)
        if kind == "softmax":
            values = measures.softmax_confidence_values(self.logits)  # floats: the hot path
        elif kind == "state":
            values = measures.state_confidence(hidden, previous)[:, 0].tolist()
            self._count(lambda shape, i: 6 * shape.d_model)
        elif kind == "meta":
            normed = self.arch.final_norm(hidden)
            values = measures.meta_confidence(self.model.cm_head, normed)[:, 0].tolist()
            self._count(lambda shape, i: 2 * shape.d_model * shape.d_model + 2 * shape.d_model * 2)
        else:
            values = self._contrastive_rows(layer)
        if not self.scores_to_decide and self.reduced is not None and self.start_normed is None:
            self.start_normed = self.normed(hidden)  # the start layer: its head only if a row exits
            self.start_layer = layer
        self.previous_before_exit = self.previous_confidence or [0.0] * len(values)
        self.previous_confidence = values
        return values

    def _contrastive_rows(self, layer: int) -> List[float]:
        values, choices, steps = [], [], []
        for b in range(self.logits.shape[0]):
            value, choice, step = self._contrastive(layer, b)
            values.append(value)
            choices.append(choice)
            steps.append(step)
        self.contrastive_choice, self.jsd_step = choices, steps
        return values

    def _contrastive(self, layer: int, b: int):
        """Contrastive confidence of row b at `layer`: (value, argmax of s, JSD record or None)."""
        logits = self.logits[b]
        if self.reduced_scores:  # only this row's own prefix (adaptive sizes differ by row)
            logits = logits[: int(torch.isfinite(logits).sum())]
            weight = self.reduced.rows[b]
        else:
            weight = self.weight
        probs = F.softmax(measures._wide(logits), dim=-1)
        head = measures.plausibility_head(probs, self.alpha)
        rows = weight.index_select(0, head)
        expert = logits.index_select(0, head)
        if self.kind == "JSD_contrastive_confidence":
            amateur_layers = list(range(FIRST_AMATEUR_LAYER, layer))
        else:
            amateur_layers = [layer // 2]
        amateur_states = torch.cat([self.states[j][b] for j in amateur_layers], dim=0)  # (C, d)
        amateur = F.linear(self.normed(amateur_states), rows)  # (C, |head|), one matmul for all
        n, d = head.shape[0], rows.shape[1]
        flops = amateur.shape[0] * (2 * d * n + 5 * n) + 5 * logits.shape[0]
        step = None
        if self.kind == "JSD_contrastive_confidence":
            candidates = torch.tensor(amateur_layers, dtype=torch.long, device=amateur.device)
            discounted = measures.discounted_jsd(measures.restricted_jsd(expert, amateur), candidates, layer)
            choice = int(discounted.argmax())
            flops += 10 * n * amateur.shape[0]
            if self.record_jsd:
                step = {"jsd": dict(zip(amateur_layers, discounted.tolist())),
                        "chosen": amateur_layers[choice], "expert_layer": layer}
            amateur = amateur[choice : choice + 1]
        if self.counters is not None:
            self.counters[b].confidence += flops
        mass = None if self.kind == "contrastive_decoding" else probs.index_select(0, head).sum()
        head_scores = measures.contrastive_head_scores(expert, amateur[0], mass)
        value, choice = measures.contrastive_confidence(probs, head, head_scores)
        return float(value), int(choice), step

    # ----- prediction --------------------------------------------------------------------------
    def predict(self, layer: int, hidden: torch.Tensor, which: List[int]) -> torch.Tensor:
        """Token ids (len(which),) emitted by the rows at positions `which` exiting at `layer`
        (hidden holds every running row)."""
        if not self.scores_to_decide:
            return self._predict_unscored(layer, hidden, which)
        index = torch.tensor(which, dtype=torch.long, device=self.weight.device)
        if self.emit_contrastive and self.contrastive_choice is not None:
            positions = torch.tensor([self.contrastive_choice[i] for i in which], device=self.weight.device)
        else:
            positions = self.logits.index_select(0, index).argmax(-1)
        if not self.reduced_scores:
            return positions
        return self.reduced.token_ids.index_select(0, index).gather(1, positions[:, None])[:, 0]

    def _predict_unscored(self, layer: int, hidden: torch.Tensor, which: List[int]) -> torch.Tensor:
        """meta/state: the exit layer's head, computed for the exiting rows only. Without
        reduction it is the model's output head (counted with the blocks); with reduction the
        start layer's full head picks the retained set and the exit layer scores its prefix."""
        index = torch.tensor(which, dtype=torch.long, device=self.weight.device)
        exiting = hidden.index_select(0, index)
        counters = [self.counters[i] for i in which] if self.counters is not None else None
        if self.reduced is None:
            return output_tokens(self.model, exiting[:, 0], counters)
        start = self.start_layer
        full = project(self.head, self.start_normed.index_select(0, index)[:, 0])  # (E, V)
        if counters is not None:
            for counter in counters:
                counter.confidence += head_flops(counter.shape, self.weight.shape[0])
        if layer == start:
            return full.argmax(-1)
        retained = RetainedSets(self.reduction, self.num_layers, *self.reduction_settings)
        retained.start(start, full, self.weight)
        previous = [self.previous_before_exit[i] for i in which]
        sizes = retained.sizes_at(layer, previous)
        scores = retained.logits(self.normed(exiting), sizes)
        if counters is not None:
            for counter, size in zip(counters, sizes):
                counter.confidence += head_flops(counter.shape, size)
        return retained.token_ids.gather(1, scores.argmax(-1)[:, None])[:, 0]
