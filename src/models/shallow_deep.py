"""FREE's shallow-deep module with synchronized parallel decoding and rollback, per row of a batch.

Every token runs the shallow decoder (blocks 1..k) and is scored at layer k. A confident token
exits there and its layer-k state is stacked. The next token of that row that needs the deep
decoder runs blocks k+1..L once over the row's stacked positions plus itself (one causal pass
with the right relative positions), which gives the deep caches the skipped tokens' real states.
Rows needing the deep pass in the same step share it: each over its own positions, padded to
the longest and masked. With a rollback threshold, the deep predictions of the stacked
positions are checked against the tokens the shallow path emitted: at the first whose
cross-entropy passes the threshold, the token is replaced by the deep prediction and everything
after it is discarded (returned as a `Replace`, applied by the loop).

Under sampling the same schedule holds with every argmax replaced by a draw: a shallow token is
drawn from layer k's processed distribution, a deep token (and a rollback's replacement) from
layer L's at its position; the exit and rollback tests read the unprocessed distributions as in
greedy mode (rollback when -log p_L(x) of an emitted shallow token passes the threshold), and
the adaptive threshold's labels stay argmax agreement. The output is then not the full model's
distribution: a token emitted at layer k and not rolled back comes from layer k's.

With `copy_skipped_hidden_states` (or without `parallel_gen_token`) the skipped tokens' deep
keys/values come from their copied layer-k state instead: that is the loop's `exit_step` with
the policy checking layer k only.
"""

from typing import List, Optional

import torch
import torch.nn.functional as F

from models.decode_loop import BatchDecoder, Emit, Replace, output_logits
from models.flops import output_head_flops
from models.results import METHOD_COUNTS


class ShallowDeepStep:
    """One token for every live row under FREE's shallow-deep policy."""

    counted = METHOD_COUNTS["shallow_deep"]  # summed into exit_stats

    def __init__(self, threshold: float, rollback_threshold: Optional[float] = None, observing: bool = False,
                 causal: bool = True):
        self.threshold = threshold  # the adaptive estimator's value when the call began, or the flag
        self.rollback_threshold = rollback_threshold
        self.observing = observing  # label shallow confidences for the adaptive threshold's refits
        self.causal = causal

    def __call__(self, decoder: BatchDecoder) -> list:
        scorer, timer = decoder.scorer, decoder.timer
        k, L = decoder.policy.max_checked_layer, decoder.policy.num_layers
        live = decoder.live
        positions, hidden, previous = shallow_pass(decoder)
        mark = timer.now()
        confidences = scorer.confidence(k, hidden, previous)
        jsd = scorer.jsd_step or [None] * len(live)
        leaving = [i for i, c in enumerate(confidences) if c > self.threshold]
        deep = [i for i, c in enumerate(confidences) if not c > self.threshold]
        outcomes = [None] * len(live)
        if leaving:
            if decoder.sampler is None:
                tokens = scorer.predict(k, hidden, leaving).tolist()
            else:  # drawn from layer k's full head (a reduced head only decided the exit)
                exiting = hidden.index_select(0, torch.tensor(leaving, device=decoder.device))[:, 0]
                tokens = decoder.sample(output_logits(decoder.model, exiting), leaving)
            for i, token in zip(leaving, tokens):
                outcomes[i] = Emit(token, k, jsd[i])
                live[i].shallow_confidence[positions[i]] = confidences[i]
        shallow = scorer.predict(k, hidden, deep).tolist() if self.observing and deep else None
        mark = timer.add("confidence", mark)
        if not deep:
            return outcomes

        checks_skipped = self.observing or self.rollback_threshold is not None
        starts, lengths, logits = deep_pass(decoder, deep, positions, all_positions=checks_skipped,
                                            causal=self.causal)
        last = logits[torch.arange(len(deep)), torch.tensor(lengths) - 1] if checks_skipped else logits
        predictions = last.argmax(-1).tolist()  # the adaptive threshold's labels: argmax agreement
        emitted = predictions if decoder.sampler is None else decoder.sampler.sample(last, [live[i].row for i in deep])
        mark = timer.add("blocks", mark)
        for d, (i, start, n) in enumerate(zip(deep, starts, lengths)):
            state = live[i]
            state.result.counts["parallel_tokens"] += n - 1
            outcomes[i] = Emit(emitted[d], L, jsd[i])
            if self.observing:
                state.result.observations.append((confidences[i], shallow[d] == predictions[d]))
            if checks_skipped and n > 1:
                rollback = self._check_skipped(state, logits[d, : n - 1], start, L, decoder.sampler)
                if rollback is not None:
                    outcomes[i] = rollback
                    state.result.counts["rollbacks"] += 1
        timer.add("head", mark)
        return outcomes

    def _check_skipped(self, state, deep_logits: torch.Tensor, start: int, L: int, sampler=None) -> Optional[Replace]:
        """Label the skipped tokens for the estimator; roll back at the first rejected one (the
        rejection is on the unprocessed deep distribution; under sampling the replacement is
        drawn from the processed one)."""
        emitted = torch.tensor(state.result.tokens[start + 1 : start + 1 + deep_logits.shape[0]], device=deep_logits.device)
        if self.observing:
            agrees = (deep_logits.argmax(-1) == emitted).tolist()
            for offset, agree in enumerate(agrees):
                state.result.observations.append((state.shallow_confidence[start + offset], agree))
        if self.rollback_threshold is None:
            return None
        losses = F.cross_entropy(deep_logits.float(), emitted, reduction="none")
        rejected = (losses > self.rollback_threshold).nonzero()
        if rejected.numel() == 0:
            return None
        offset = int(rejected[0, 0])
        # keep tokens up to the rejected one's input position, then the deep prediction
        if sampler is None:
            token = int(deep_logits[offset].argmax())
        else:
            token = sampler.sample(deep_logits[offset : offset + 1], [state.row])[0]
        return Replace(start + offset + 1, [token], [L])


def shallow_pass(decoder: BatchDecoder):
    """Blocks 1..k for the current token of every live row, its layer-k state stacked (the deep
    pass reads the current position from there too). Returns (positions, h_k, h_(k-1))."""
    k, scorer, timer = decoder.policy.max_checked_layer, decoder.scorer, decoder.timer
    positions = [state.position for state in decoder.live]
    rows = decoder.select(list(range(len(positions))), positions, [1] * len(positions))
    scorer.start_step(decoder.counters(rows.local))
    hidden = decoder.embed_inputs(rows)
    mark = timer.now()
    for j in range(k):
        previous, hidden = hidden, decoder.block(j, hidden, rows)
        scorer.remember(j + 1, hidden)
    decoder.stack_states(rows, hidden)
    timer.add("blocks", mark)
    return positions, hidden, previous


def deep_pass(decoder: BatchDecoder, rows: List[int], positions: List[int], all_positions: bool, causal: bool = True):
    """Blocks k+1..L (k = the policy's checked layer) once over each row's stacked layer-k states,
    from the first position its deep blocks lack up to its current one (positions[r]): FREE's
    synchronized parallel pass, rows padded to the longest and masked. Returns (starts, lengths,
    logits): the full head at every position (R, n, V) with `all_positions`, else at each row's
    last position (R, V); its FLOPs are counted with the blocks."""
    k, L = decoder.policy.max_checked_layer, decoder.policy.num_layers
    starts = [decoder.cache.filled[k][r] for r in rows]
    lengths = [positions[r] - s + 1 for r, s in zip(rows, starts)]
    selection = decoder.select(rows, starts, lengths, causal=causal)
    chunk = decoder.exit_states[selection.index[:, None], selection.queries]  # (R, n, d)
    for j in range(k, L):
        chunk = decoder.block(j, chunk, selection)
    if not all_positions:
        chunk = chunk[torch.arange(len(rows)), torch.tensor(lengths) - 1]
    logits = output_logits(decoder.model, chunk)
    if decoder.count_flops:
        for r, n in zip(rows, lengths):
            decoder.live[r].result.flops.blocks += output_head_flops(decoder.shape) * (n if all_positions else 1)
    return starts, lengths, logits
