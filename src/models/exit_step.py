"""The token steps of the decode loop that exit by a policy, and the per-layer tracer.

`exit_step` gives every live row one token: each row leaves after the first checked layer whose
confidence passes its threshold, or at the policy's last layer (full model, static exit, CALM
early exit, FREE without parallel decoding). `first_token` is the same rule over the states a
decoder-only model's prefill computed. `LayerTracer` records, with `plotting_logits`, each
layer's view of the final prediction. FREE's and self-speculation's steps are
models.shallow_deep and models.self_speculation.
"""

from typing import List, Optional

import torch

from models.decode_loop import BatchDecoder, Emit, ExitPolicy, Rows, output_logits
from models.flops import head_flops, output_head_flops


def first_token(decoder: BatchDecoder) -> list:
    """Decoder-only: the first new token of every row, at the prompt's last position, by the exit
    rule of `decoder.first_policy` over the states the prefill computed (every block ran there for
    the prompt; the token is charged the blocks up to its exit layer, as any token)."""
    prefilled = decoder.prefill_states
    live = decoder.live

    def layer(j: int, hidden: torch.Tensor, rows: Rows) -> torch.Tensor:
        for r in rows.local:
            live[r].result.block_runs[j] += 1
        return prefilled[j + 1].index_select(0, rows.index)[:, None]

    return exit_step(decoder, layer=layer, policy=decoder.first_policy)


def exit_step(decoder: BatchDecoder, layer=None, policy: Optional[ExitPolicy] = None) -> list:
    """One token for every live row under the exit policy: each row leaves after the first
    checked layer whose confidence passes its threshold, or at the policy's last layer. With
    traces every row runs all L layers and the trace records where it would have left.
    `layer(j, hidden, rows)` gives the state after block j (default: run the block; the first
    token of a decoder-only model reads the prefill's); `policy` defaults to the decoder's."""
    policy = policy or decoder.policy
    scorer, timer = decoder.scorer, decoder.timer
    layer = layer or decoder.block
    live = decoder.live
    positions = [state.position for state in live]
    thresholds = [policy.threshold_at(t, decoder.max_new_tokens) for t in positions]
    rows = decoder.select(list(range(len(live))), positions, [1] * len(live))
    tracer = LayerTracer(decoder, rows.local) if decoder.tracing else None
    if scorer is not None:
        scorer.start_step(decoder.counters(rows.local))
    hidden = decoder.embed_inputs(rows)
    outcomes = [None] * len(live)
    would_exit = [None] * len(live)
    # rows whose token is the output head's: (local rows, states (E, d), exit layer, JSD records),
    # predicted together at the end of the step (a head per exit layer would read W each time)
    for_head = []
    last = policy.num_layers if tracer is not None else policy.last_layer
    for j in range(last):
        if decoder.lazy:
            decoder.propagate(j, rows.local, rows.starts)
        mark = timer.now()
        previous, hidden = hidden, layer(j, hidden, rows)
        mark = timer.add("blocks", mark)
        leaving, confidences = [], None
        if scorer is not None:
            scorer.remember(j + 1, hidden)
            if policy.checks(j + 1):
                confidences = scorer.confidence(j + 1, hidden, previous)
                leaving = [i for i, c in enumerate(confidences) if c > thresholds[rows.local[i]]]
        if tracer is not None:
            tracer.layer(j + 1, hidden, confidences)
            for i in leaving:
                if would_exit[rows.local[i]] is None:
                    would_exit[rows.local[i]] = j + 1
            timer.add("confidence", mark)
            continue
        if leaving:
            leaving_index = torch.tensor(leaving, dtype=torch.long, device=decoder.device)
            exiting = hidden.index_select(0, leaving_index)
            if scorer.exits_read_output_head or decoder.sampler is not None:  # sampling: the full head
                for_head.append(([rows.local[i] for i in leaving], exiting[:, 0], j + 1, None))
            else:
                tokens, jsd = scorer.predict(j + 1, hidden, leaving).tolist(), scorer.jsd_step
                for i, token in zip(leaving, tokens):
                    outcomes[rows.local[i]] = Emit(token, j + 1, jsd[i] if jsd is not None else None)
            decoder.stack_states(rows.take(leaving), exiting)
            gone = set(leaving)
            staying = [i for i in range(len(rows.local)) if i not in gone]
            if staying:
                scorer.keep(staying)
                index = torch.tensor(staying, dtype=torch.long, device=decoder.device)
                hidden, previous = hidden.index_select(0, index), previous.index_select(0, index)
            rows = rows.take(staying)
        timer.add("confidence", mark)
        if not rows.local:
            break
    mark = timer.now()
    if rows.local:
        jsd = scorer.jsd_step if scorer is not None else None
        if tracer is not None:
            tokens = tracer.finish(would_exit, policy.last_layer)
            if decoder.sampler is not None:  # drawn from the last layer's distribution
                tokens = decoder.sampler.sample(tracer.logits[-1], [live[r].row for r in rows.local])
            for i, (r, token) in enumerate(zip(rows.local, tokens)):
                outcomes[r] = Emit(token, policy.num_layers, jsd[i] if jsd is not None else None)
        else:
            for_head.append((rows.local, hidden[:, 0], policy.last_layer, jsd))
            if policy.last_layer < policy.num_layers:  # static exit: later blocks need this state
                decoder.stack_states(rows, hidden)
    if for_head:
        local = [r for group in for_head for r in group[0]]
        tokens = iter(decoder.output_head(torch.cat([group[1] for group in for_head]), local).tolist())
        for group_rows, _, exit_layer, jsd in for_head:
            for i, r in enumerate(group_rows):
                outcomes[r] = Emit(next(tokens), exit_layer, jsd[i] if jsd is not None else None)
    timer.add("head", mark)
    if not decoder.lazy:
        for j in range(decoder.num_layers):
            decoder.propagate(j, list(range(len(live))), [t + 1 for t in positions])
    return outcomes


class LayerTracer:
    """plotting_logits: observes every layer of a token step and records, per row, each layer's
    view of the final prediction (rank, confidence, max probability, agreement)."""

    def __init__(self, decoder: BatchDecoder, local: List[int]):
        self.decoder, self.local = decoder, local
        self.logits, self.confidences = [], []

    def layer(self, layer: int, hidden: torch.Tensor, confidences: Optional[List[float]]) -> None:
        decoder = self.decoder
        self.logits.append(output_logits(decoder.model, hidden)[:, 0])  # (R, V)
        self.confidences.append(confidences if confidences is not None else [float("nan")] * len(self.local))
        if decoder.count_flops:  # diagnostic heads below the last layer are confidence work
            for r in self.local:
                flops = decoder.live[r].result.flops
                if layer < decoder.num_layers:
                    flops.confidence += head_flops(decoder.shape, decoder.shape.vocab_size)
                else:
                    flops.blocks += output_head_flops(decoder.shape)

    def finish(self, would_exit: List[Optional[int]], last_layer: int) -> List[int]:
        """Record the step per row; returns the final layer's predictions."""
        logits = torch.stack(self.logits, dim=1)  # (R, L, V)
        final = logits[:, -1].argmax(-1)  # (R,)
        ranks = (logits > logits.gather(2, final[:, None, None].expand(-1, logits.shape[1], 1))).sum(-1)
        max_probs = logits.float().softmax(-1).max(-1).values
        agrees = logits.argmax(-1) == final[:, None]
        for i, r in enumerate(self.local):
            trace = self.decoder.live[r].result.trace
            trace["ranks"].append(ranks[i].tolist())
            trace["confidences"].append([c[i] for c in self.confidences])
            trace["max_probs"].append(max_probs[i].tolist())
            trace["agrees"].append(agrees[i].tolist())
            trace["exit_layers"].append(would_exit[r] or last_layer)
        return final.tolist()
