"""Self-speculative shallow-deep decoding: FREE's parallel deep pass used as a verifier, so that
the output is exactly the full model's greedy output.

The shallow decoder (blocks 1..k, k = shallow_exit_layer) drafts tokens while its confidence
passes the threshold, at most `max_draft_tokens` in a row. The next position (the first
unconfident one, or the one after the last allowed draft) runs blocks 1..k and then blocks
k+1..L once over every drafted position plus itself (FREE's synchronized causal pass, which also
gives the deep caches the drafted positions' real states); the full head predicts at each. The
drafts are kept up to the first one the full model disagrees with, which is replaced by the full
model's token; everything after it is discarded (tokens, exit layers and cache lengths
truncated). When every draft is accepted, the current position's full prediction is one more
token. Each emitted token is thus the full model's argmax given the tokens before it.

A drafted end-of-sequence token, or a draft that reaches the length limit, triggers a final
verification of the pending drafts: decoding never ends on an unverified token.

The draft/verify/accept pieces are small functions that do not assume batch 1
(`accepted_lengths`, `next_token_after`, `truncated_lengths`); `SelfSpeculativeDecoder` strings
them together for one sequence.
"""

from typing import List, Optional

import torch

from models.decode_loop import counted_output_logits
from models.shallow_deep import ShallowDeepDecoder

COUNTS = ("drafted_tokens", "accepted_tokens", "verify_passes", "final_verifications")


# ----- draft / verify / accept, independent of the batch size --------------------------------------
def accepted_lengths(drafted: torch.Tensor, full_predictions: torch.Tensor) -> torch.Tensor:
    """Per row, how many leading drafted tokens the full model predicts too.

    drafted (..., n): the drafted tokens; full_predictions (..., m), m >= n: the full model's
    argmax at the positions that drafted them (column i predicts drafted[..., i]). A row with
    fewer drafts can pad its unused slots with -1 (never a token id): the count stops there.
    """
    n = drafted.shape[-1]
    agrees = drafted == full_predictions[..., :n]
    return agrees.long().cumprod(-1).sum(-1)


def accepted_length(drafted: torch.Tensor, full_predictions: torch.Tensor) -> int:
    """accepted_lengths of one sequence, as an int."""
    return int(accepted_lengths(drafted, full_predictions))


def next_token_after(accepted: int, full_predictions: torch.Tensor) -> Optional[int]:
    """The full model's token after the accepted drafts: the correction of the first rejected
    draft, or, when all were accepted and the pass covered one more position, its prediction.
    None when the pass covered the drafted positions only and accepted them all."""
    return int(full_predictions[accepted]) if accepted < full_predictions.shape[-1] else None


def truncated_lengths(filled: List[int], valid: int) -> List[int]:
    """Cache lengths after a rejection: positions from `valid` on were computed from a discarded
    token, so no block keeps them (later writes overwrite the stale entries)."""
    return [min(length, valid) for length in filled]


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


class SelfSpeculativeDecoder(ShallowDeepDecoder):
    """Greedy decoding of one sequence: shallow drafts, verified by one deep pass each."""

    def __init__(self, *args, max_draft_tokens: int, **kwargs):
        super().__init__(*args, **kwargs)
        self.max_draft_tokens = max_draft_tokens
        self.counts = {name: 0 for name in COUNTS}

    def run(self, input_ids, start_token, eos_ids):
        self.eos_ids = eos_ids  # a drafted end-of-sequence token must be verified before it ends
        return super().run(input_ids, start_token, eos_ids)

    def _decode_token(self, token: torch.Tensor, t: int):
        """Position t: a draft, or a verification pass. Edits self.tokens / self.exit_layers in
        place and returns (None, None), so that the loop resumes after the last kept token."""
        timer, scorer, k = self.timer, self.scorer, self.shallow
        scorer.start_token()
        hidden = self.embed(token)
        mark = timer.now()
        for j in range(k):
            previous, hidden = hidden, self._block(j, hidden, t)
            scorer.remember(j + 1, hidden)
        mark = timer.add("blocks", mark)
        pending = t - self.filled[k]  # drafted positions the deep blocks have not verified
        # at the draft limit the confidence is not needed: this position verifies anyway
        if pending < self.max_draft_tokens and scorer.confidence(k, hidden, previous) > self.threshold():
            drafted = int(scorer.predict(k, hidden))
            timer.add("confidence", mark)
            self.exit_states[:, t] = hidden[:, 0]
            self.tokens.append(drafted)
            self.exit_layers.append(k)
            self.counts["drafted_tokens"] += 1
            if drafted in self.eos_ids or len(self.tokens) > self.max_new_tokens:
                self._verify(None)
            return None, None
        timer.add("confidence", mark)
        self._verify(hidden)
        return None, None

    def _verify(self, current: Optional[torch.Tensor]) -> None:
        """One deep pass over the pending drafted positions, plus the current position's
        layer-k state `current` (None for a final verification); keep what the full model agrees
        with and append its next token."""
        timer, k, L = self.timer, self.shallow, self.policy.num_layers
        mark = timer.now()
        start, drafted_end = self.filled[k], len(self.tokens) - 1  # drafted positions: start..drafted_end-1
        states = self.exit_states[:, start:drafted_end]
        if current is not None:
            states = torch.cat([states, current], dim=1)
        for j in range(k, L):
            states = self._block(j, states, start)
        full_predictions = counted_output_logits(self.model, states, self.flops)[0].argmax(-1)
        mark = timer.add("blocks", mark)

        drafted = torch.tensor(self.tokens[start + 1 :], device=self.device)
        accepted = accepted_length(drafted, full_predictions)
        kept = start + 1 + accepted  # the start token and every token up to the last accepted draft
        self.tokens, self.exit_layers = self.tokens[:kept], self.exit_layers[: kept - 1]
        self.filled = truncated_lengths(self.filled, kept)
        following = next_token_after(accepted, full_predictions)
        if following is not None:
            self.tokens.append(following)
            self.exit_layers.append(L)
        self.counts["accepted_tokens"] += accepted
        self.counts["verify_passes"] += 1
        self.counts["final_verifications"] += int(current is None)
        timer.add("head", mark)
