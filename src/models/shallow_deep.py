"""FREE's shallow-deep module with synchronized parallel decoding and rollback.

Every token runs the shallow decoder (blocks 1..k) and is scored at layer k. A confident token
exits there and its layer-k state is stacked. The next token that needs the deep decoder runs
blocks k+1..L once over all stacked positions plus itself (one causal pass with the right
relative positions), which gives the deep caches the skipped tokens' real states. With a
rollback threshold, the deep predictions of the stacked positions are checked against the tokens
the shallow path emitted: at the first whose cross-entropy passes the threshold, the token is
replaced by the deep prediction and everything after it is discarded.

With `copy_skipped_hidden_states` (or without `parallel_gen_token`) the skipped tokens' deep
keys/values come from their copied layer-k state instead, as in CALM's decode loop.
"""

import torch
import torch.nn.functional as F

from models.decode_loop import SequenceDecoder, counted_output_logits


class ShallowDeepDecoder(SequenceDecoder):
    """Greedy decoding of one sequence with synchronized parallel deep passes."""

    def __init__(self, *args, rollback_threshold=None, estimator=None, causal=True, **kwargs):
        super().__init__(*args, **kwargs)
        self.shallow = self.policy.max_checked_layer
        self.rollback_threshold = rollback_threshold
        self.estimator = estimator
        # labelled observations feed the estimator's refits only while it still refits
        self.observing = estimator is not None and estimator.collecting
        self.causal = causal
        self.shallow_confidence = {}  # position -> confidence of its shallow exit
        self.counts = {"shallow_tokens": 0, "deep_tokens": 0, "parallel_tokens": 0, "rollbacks": 0}

    def threshold(self) -> float:
        return self.estimator.threshold if self.estimator is not None else self.policy.threshold

    def _decode_token(self, token: torch.Tensor, t: int):
        timer, scorer, k = self.timer, self.scorer, self.shallow
        scorer.start_token()
        hidden = self.embed(token)
        mark = timer.now()
        for j in range(k):
            previous, hidden = hidden, self._block(j, hidden, t)
            scorer.remember(j + 1, hidden)
        mark = timer.add("blocks", mark)
        confidence = scorer.confidence(k, hidden, previous)
        if confidence > self.threshold():
            prediction = scorer.predict(k, hidden)
            timer.add("confidence", mark)
            self.exit_states[:, t] = hidden[:, 0]
            self.shallow_confidence[t] = confidence
            self.counts["shallow_tokens"] += 1
            return prediction, k
        shallow_prediction = scorer.predict(k, hidden) if self.observing else None
        mark = timer.add("confidence", mark)

        start = self.filled[k]  # first position the deep blocks have not seen
        chunk = torch.cat([self.exit_states[:, start:t], hidden], dim=1)
        for j in range(k, self.policy.num_layers):
            chunk = self._block(j, chunk, start)
        # the skipped positions' deep predictions only serve the estimator's labels and rollback
        checks_skipped = self.observing or self.rollback_threshold is not None
        predicted = chunk if checks_skipped else chunk[:, -1:]
        deep_logits = counted_output_logits(self.model, predicted, self.flops)[0]  # (positions, V)
        mark = timer.add("blocks", mark)
        self.counts["deep_tokens"] += 1
        self.counts["parallel_tokens"] += t - start
        prediction = deep_logits[-1].argmax().view(1, 1)
        if self.observing:
            self.estimator.observe(confidence, bool(shallow_prediction.item() == prediction.item()))
        rolled_back = self._check_skipped(deep_logits[:-1], start)
        timer.add("head", mark)
        if rolled_back:
            return None, None
        return prediction, self.policy.num_layers

    def _check_skipped(self, deep_logits: torch.Tensor, start: int) -> bool:
        """Label the skipped tokens for the estimator; roll back at the first rejected one."""
        if deep_logits.shape[0] == 0:
            return False
        emitted = torch.tensor(self.tokens[start + 1 : start + 1 + deep_logits.shape[0]], device=self.device)
        if self.observing:
            agrees = (deep_logits.argmax(-1) == emitted).tolist()
            for offset, agree in enumerate(agrees):
                self.estimator.observe(self.shallow_confidence[start + offset], agree)
        if self.rollback_threshold is None:
            return False
        losses = F.cross_entropy(deep_logits.float(), emitted, reduction="none")
        rejected = (losses > self.rollback_threshold).nonzero()
        if rejected.numel() == 0:
            return False
        position = start + int(rejected[0, 0])
        corrected = int(deep_logits[position - start].argmax())
        # keep tokens up to the rejected one's input position, then the deep prediction
        self.tokens = self.tokens[: position + 1] + [corrected]
        self.exit_layers = self.exit_layers[:position] + [self.policy.num_layers]
        self.filled = [min(filled, position + 1) for filled in self.filled]
        self.counts["rollbacks"] += 1
        return True
