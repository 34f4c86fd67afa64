"""Self-speculative shallow-deep decoding: FREE's parallel deep pass used as a verifier, so that
the output is exactly the full model's greedy output.

The shallow decoder (blocks 1..k, k = shallow_exit_layer) drafts tokens while its confidence
passes the threshold, at most `max_draft_tokens` in a row. The next position of that row (the
first unconfident one, or the one after the last allowed draft) runs blocks 1..k and then blocks
k+1..L once over every drafted position plus itself (FREE's synchronized causal pass, which also
gives the deep caches the drafted positions' real states); the full head predicts at each. The
drafts are kept up to the first one the full model disagrees with, which is replaced by the full
model's token; everything after it is discarded (a `Replace`: tokens, exit layers and cache
lengths truncated). When every draft is accepted, the current position's full prediction is one
more token. Each emitted token is thus the full model's argmax given the tokens before it.

A drafted end-of-sequence token, or a draft that reaches the length limit, is verified in the
same step (a final verification): decoding never ends on an unverified token.

Rows of a batch draft and verify on their own schedules; the rows verifying in a step share one
deep pass (models.shallow_deep.deep_pass), each over its own positions.

A draft vocabulary (`draft_vocab`, K rows; greedy): a draft is only a guess, so it need not read
the whole head, which on a large vocabulary costs as much as many blocks (Gemma 3 270M: its
262,144-row head takes the time of about 21 blocks on a quiet CPU). Each row keeps K token ids,
the top of the latest full-head scores computed for it (its first check at layer k, then the
verification pass's at the position of the last token it emitted), with their head rows; its
checks at layer k score only those (the softmax confidence over the K scores, the draft their
argmax). The output is the full model's whatever the set: every token is still verified.

Self-speculative sampling (`sampling`): the confident shallow position drafts x ~ q, layer k's
full head after the sampler's processing (its q kept until verified); the deep pass gives the
full model's processed p at every drafted position; drafts are accepted in order with
probability min(1, p(x) / q(x)), the first rejected one replaced by a draw from
norm(max(0, p - q)), and after all accepted one more token is drawn from p (Leviathan et al.
2023, models.sampling.speculative_accept). Each token is thus distributed as the full model's.
"""

from typing import List, Optional

import torch
import torch.nn.functional as F

from models.confidence import softmax_confidence_values
from models.decode_loop import BatchDecoder, Emit, Replace, output_logits
from models.flops import head_flops, output_head_flops
from models.projection import project
from models.results import METHOD_COUNTS
from models.sampling import speculative_accept
from models.shallow_deep import deep_pass, shallow_pass
from models.vocab_reduction import top_rows

COUNTS = METHOD_COUNTS["self_speculation"]


# ----- draft / verify / accept --------------------------------------------------------------------
def accepted_lengths(drafted: torch.Tensor, full_predictions: torch.Tensor) -> torch.Tensor:
    """Per row, how many leading drafted tokens the full model predicts too.

    drafted (..., n): the drafted tokens; full_predictions (..., m), m >= n: the full model's
    argmax at the positions that drafted them (column i predicts drafted[..., i]).
    """
    n = drafted.shape[-1]
    agrees = drafted == full_predictions[..., :n]
    return agrees.long().cumprod(-1).sum(-1)


def speculation_rates(counts: dict) -> dict:
    """The ratios of exit_stats(), from the summed counts."""
    drafted, accepted, passes = (counts.get(name, 0) for name in ("drafted_tokens", "accepted_tokens", "verify_passes"))
    return {"acceptance_rate": accepted / drafted if drafted else 0.0,
            "mean_accepted_per_pass": accepted / passes if passes else 0.0,
            "mean_drafted_per_pass": drafted / passes if passes else 0.0}


def expected_blocks_per_token(num_layers: int, acceptance_rate: float, drafted_per_pass: float) -> float:
    """Cost model: a pass runs its n drafted positions and the current one through all L blocks
    (discarded drafts included) and yields the a*n accepted drafts plus one full-model token,
    so blocks per token = L (n + 1) / (a n + 1). Exact when no pass is a final verification."""
    return num_layers * (drafted_per_pass + 1) / (acceptance_rate * drafted_per_pass + 1)


def iid_blocks_per_token(num_layers: int, token_acceptance: float, draft_length: int) -> float:
    """The same cost when every pass drafts n tokens and each is right with probability p on
    its own: a pass yields (1 - p^(n+1)) / (1 - p) tokens on average (Leviathan et al. 2023)."""
    p, n = token_acceptance, draft_length
    tokens = n + 1 if p == 1 else (1 - p ** (n + 1)) / (1 - p)
    return num_layers * (n + 1) / tokens


class SelfSpeculativeStep:
    """One step for every live row: a draft at layer k, or a verification pass."""

    counted = COUNTS

    def __init__(self, threshold: float, max_draft_tokens: int, eos_ids: set, sampling: bool = False,
                 draft_vocab: Optional[int] = None):
        if draft_vocab is not None and sampling:
            raise ValueError("draft_vocab_size is for greedy self-speculation: not supported with do_sample=True.")
        self.threshold = threshold
        self.max_draft_tokens = max_draft_tokens
        self.eos_ids = eos_ids  # a drafted end-of-sequence token must be verified before it ends
        self.sampling = sampling
        self.drafts_q = {}  # sampling: caller's row -> {position: q (V,) its draft was drawn from}
        self.draft_vocab = draft_vocab
        self.draft_sets = {}  # draft_vocab: caller's row -> (token ids (K,), their head rows (K, d))

    def __call__(self, decoder: BatchDecoder) -> list:
        scorer, timer = decoder.scorer, decoder.timer
        k, L = decoder.policy.max_checked_layer, decoder.policy.num_layers
        live = decoder.live
        positions, hidden, previous = shallow_pass(decoder)
        mark = timer.now()
        # at the draft limit the confidence is not needed: that position verifies anyway
        checking = [i for i, t in enumerate(positions) if t - decoder.cache.filled[k][i] < self.max_draft_tokens]
        drafting = []
        if checking:
            if len(checking) < len(live):
                scorer.keep(checking)
            index = torch.tensor(checking, device=decoder.device)
            checked, before = hidden.index_select(0, index), previous.index_select(0, index)
            if self.draft_vocab:
                values, tokens = self._retained_check(decoder, checked, checking)
            else:
                values, tokens = scorer.confidence(k, checked, before), None
            which = [n for n, value in enumerate(values) if value > self.threshold]
            if which and tokens is not None:
                drafting = [(checking[n], tokens[n]) for n in which]
            elif which and not self.sampling:
                drafts = scorer.predict(k, checked, which).tolist()
                drafting = [(checking[n], token) for n, token in zip(which, drafts)]
            elif which:
                drafting = self._draft(decoder, checked, [checking[n] for n in which], which, positions)
        mark = timer.add("confidence", mark)

        outcomes = [None] * len(live)
        verifying = {i: None for i in range(len(live))}  # row -> its final draft, if any
        for i, token in drafting:
            live[i].result.counts["drafted_tokens"] += 1
            if token in self.eos_ids or positions[i] + 1 >= decoder.max_new_tokens:
                verifying[i] = token  # the sequence would end here: verify first
            else:
                outcomes[i] = Emit(token, k)
                del verifying[i]
        if verifying:
            mark = timer.add("head", mark)
            self._verify(decoder, list(verifying), verifying, positions, outcomes, k, L)
            # the deep pass and its acceptance are charged to the blocks, as FREE's step charges its pass
            timer.add("blocks", mark)
        else:
            timer.add("head", mark)
        return outcomes

    def _retained_check(self, decoder, checked: torch.Tensor, rows: List[int]):
        """draft_vocab: (confidence, drafted token) of live rows `rows` (states `checked`) from
        their retained head rows; a row without a set yet is scored by the full head, whose top
        scores become its set."""
        head = decoder.scorer.head
        normed = decoder.scorer.normed(checked)[:, 0]
        keys = [decoder.live[i].row for i in rows]
        values, tokens = [0.0] * len(rows), [0] * len(rows)
        for n, key in enumerate(keys):
            if key in self.draft_sets:
                ids, weight = self.draft_sets[key]
                logits = F.linear(normed[n], weight)[None]
            else:
                logits = project(head, normed[n : n + 1])
                ids = None
                self._retain(key, logits[0], head.weight)
            values[n] = softmax_confidence_values(logits)[0]
            best = int(logits[0].argmax())
            tokens[n] = best if ids is None else int(ids[best])
            if decoder.count_flops:
                decoder.live[rows[n]].result.flops.confidence += head_flops(decoder.shape, logits.shape[1])
        return values, tokens

    def _retain(self, key: int, logits: torch.Tensor, weight: torch.Tensor) -> None:
        """The draft set of caller's row `key`: the top draft_vocab of these full-head scores."""
        self.draft_sets[key] = top_rows(logits, weight, min(self.draft_vocab, logits.shape[-1]))

    def _draft(self, decoder, checked: torch.Tensor, rows: List[int], which: List[int], positions: List[int]):
        """Sampling: draw the drafts of live rows `rows` (their states at positions `which` of
        checked) from layer k's processed full head, keeping each q for the verification."""
        states = checked.index_select(0, torch.tensor(which, device=decoder.device))[:, 0]
        logits = output_logits(decoder.model, states)
        if decoder.count_flops:
            for i in rows:
                decoder.live[i].result.flops.blocks += output_head_flops(decoder.shape)
        q = decoder.sampler.probs(logits)
        tokens = decoder.sampler.draw(q, [decoder.live[i].row for i in rows])
        for n, i in enumerate(rows):
            self.drafts_q.setdefault(decoder.live[i].row, {})[positions[i]] = q[n]
        return list(zip(rows, tokens))

    def _verify(self, decoder, rows: List[int], final: dict, positions: List[int], outcomes: list, k: int, L: int):
        """One deep pass over each row's pending drafts plus its current position; keep what the
        full model agrees with, put its token after."""
        starts, lengths, logits = deep_pass(decoder, rows, positions, all_positions=True)
        if self.sampling:
            return self._verify_sampled(decoder, rows, final, starts, lengths, logits, outcomes, k, L)
        predictions = logits.argmax(-1).tolist()  # (R, n): the full model's token after each position
        for d, (i, start, n) in enumerate(zip(rows, starts, lengths)):
            state, draft = decoder.live[i], final[i]
            drafted = state.result.tokens[start + 1 :] + ([draft] if draft is not None else [])
            full = predictions[d][:n]
            accepted = int(accepted_lengths(torch.tensor(drafted), torch.tensor(full))) if drafted else 0
            counts = state.result.counts
            counts["accepted_tokens"] += accepted
            counts["verify_passes"] += 1
            counts["final_verifications"] += int(draft is not None)
            if accepted == len(drafted) and draft is not None:
                outcomes[i] = Emit(draft, k)  # the final draft is the full model's token too
            else:  # the first rejected draft (or the current position) gets the full model's token
                outcomes[i] = Replace(start + 1 + accepted, [full[accepted]], [L])
                if self.draft_vocab:  # the next drafts guess from the scores that gave it
                    self._retain(state.row, logits[d, accepted], decoder.scorer.head.weight)

    def _verify_sampled(self, decoder, rows, final, starts, lengths, logits, outcomes, k: int, L: int):
        """Speculative sampling's verification: accept drafts by min(1, p/q), then one token from
        the residual (at a rejection) or from p (after the drafts); one draw for all rows."""
        sampler = decoder.sampler
        pending = []  # (live row, kept, distribution of the token after the kept ones)
        for d, (i, start, n) in enumerate(zip(rows, starts, lengths)):
            state, draft = decoder.live[i], final[i]
            drafted = state.result.tokens[start + 1 :] + ([draft] if draft is not None else [])
            p = sampler.probs(logits[d, :n])
            q_of = self.drafts_q.pop(state.row, {})
            q = torch.stack([q_of[start + j] for j in range(len(drafted))]) if drafted else None
            accepted, residual = speculative_accept(p, q, drafted, sampler.uniform(len(drafted), p.device))
            counts = state.result.counts
            counts["accepted_tokens"] += accepted
            counts["verify_passes"] += 1
            counts["final_verifications"] += int(draft is not None)
            if accepted == len(drafted) and draft is not None:
                outcomes[i] = Emit(draft, k)  # the final draft stands: the sequence ends on it
            else:  # a rejection's residual, or the full model's p after the accepted drafts
                pending.append((i, start + 1 + accepted, residual if residual is not None else p[accepted]))
        if pending:
            tokens = sampler.draw(torch.stack([dist for _, _, dist in pending]),
                                  [decoder.live[i].row for i, _, _ in pending])
            for (i, kept, _), token in zip(pending, tokens):
                outcomes[i] = Replace(kept, [token], [L])
