"""The early-exit decode loop over a HuggingFace model's own modules, for a batch.

We own the loop instead of patching `generate`: each token runs decoder blocks one at a time, so
it can stop after any of them. One loop serves the T5 family (encoder-decoder) and decoder-only
LLMs (Llama, Mistral, Qwen2, Qwen3, Gemma 3, GPT-2): what differs (norms, how positions enter
attention, grouped-query heads, q/k norms, sliding windows, cross-attention or none, the
feed-forward) is read from a small description of the block, models.architectures. Attention is
computed here over preallocated key/value buffers (models.kv_cache) with SDPA, as the models do
in transformers 5.x; norms, projections and feed-forward sublayers use the model's own weights
through models.projection (the same products, computed in the way measured fastest for the rows
at hand). With no exit the loop therefore reproduces HF's greedy `generate` token for token.

A decoder-only model's prompt is prefilled at full depth, all positions at once, into the first
cache slots (left padding masked); the first new token is decided by the exit rule over the
prefill's states at the prompt's last position (models.exit_step.first_token), every later token
by the step.

A batch decodes together, each row as if alone: its own position (FREE's rollback moves one row
back while the others go on), its own relative position bias slice and key/value fill state per
block, its own encoder length (padded sources, cross-attention masked per row). Rows that exit
at a layer leave the running set: the later blocks run only the rows still there, as a smaller
batch rather than computed for every row and masked. Their self-attention keys/values are
gathered (copied out; a view when every live row runs). Their cross-attention keys/values grow
with the source: from CROSS_VIEWS_FROM (512) source tokens on, each run of adjacent running rows
attends to its slice of every row's (views, one attention call per run, nothing copied); below
it they are gathered. Measured (bench/bench_gather.py, one middle block at batch 8, R running
rows spread over the batch so that no two are adjacent, two runs on a quiet 2-core AMD EPYC),
ms for all 8 rows, and views / gathered for R = 4:
T5-large, 32 source tokens: 5.2-6.0, views 0.99x gathered (R = 1, 2, 4: 0.97-0.99x);
512: 8.8-9.4, 0.84-0.90x (0.88-1.00x); 4,096: 20.8-27.9, gathered 46.6-62.1 (more than all
rows: the copy costs more than the attention), views 12.1-18.4 (0.26-0.34x for every R).
T5-small at 4,096: 11.5-14.5, gathered 30.2-34.6, views 7.0-8.4; at 32 the two ways are within
0.96-1.03x of each other. Masking would run every block for every row. Finished rows leave the
batch for good: every buffer is compacted once when a row ends.

Skipped blocks (state propagation): when a token exits at layer e, every block j > e still needs
its key/value for that position. They are projected from the copied state h_e, lazily: only
when a later token of that row first reaches block j, in one projection for all pending
positions of all rows. A block no token reaches again (static exit) is never projected at all.

A block can also run several consecutive positions per row at once (causal among themselves,
with their own relative position bias): FREE's synchronized parallel pass (models.shallow_deep).

Decoding is greedy, or samples with a models.sampling.Sampler: each token is then drawn from its
exit layer's full head (a reduced head only decides confidence), once per step for the batch.
"""

import math
import time
from collections import defaultdict
from dataclasses import dataclass
from typing import List, Optional, Tuple

import torch
import torch.nn.functional as F

from models.architectures import describe, layer_windows
from models.flops import (
    FlopCounter,
    cross_kv_flops,
    decoder_block_flops,
    output_head_flops,
    prefill_flops,
    skipped_block_flops,
)
from models.kv_cache import KVCache
from models.projection import project
from models.results import RowResult


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
    """s(norm(h)): the decoder's final norm (and T5's output scaling), what the LM head reads."""
    return describe(model).head_input(hidden)


def output_logits(model, hidden: torch.Tensor) -> torch.Tensor:
    """z = W s(norm(h)): the model's own output head."""
    return project(model.lm_head, scaled_norm(model, hidden))


def output_tokens(model, hidden: torch.Tensor, counters) -> torch.Tensor:
    """The output head's argmax for each row of hidden (R, d); each row's FlopCounter in
    `counters` (or None) counts the head with the blocks: it is the full model's own last step."""
    if counters is not None:
        for counter in counters:
            counter.blocks += output_head_flops(counter.shape)
    return output_logits(model, hidden).argmax(-1)


# Source length from which the running rows' cross-attention reads slices of every row's keys
# and values instead of a gathered copy (see the module docstring: measured by bench/bench_gather.py).
CROSS_VIEWS_FROM = 512


def consecutive_runs(local: List[int]) -> List[Tuple[int, int, int]]:
    """(first position in `local`, first live row, count) of each run of consecutive live rows."""
    runs = []
    for position, row in enumerate(local):
        if runs and row == runs[-1][1] + runs[-1][2] and position == runs[-1][0] + runs[-1][2]:
            runs[-1] = (runs[-1][0], runs[-1][1], runs[-1][2] + 1)
        else:
            runs.append((position, row, 1))
    return runs


@dataclass
class Rows:
    """The rows a block runs now: local indices into the live batch, and per row the query
    positions start..start+length-1 (one position per token step; several in FREE's deep pass,
    the whole prompt in a decoder-only model's prefill)."""

    index: torch.Tensor  # (R,) on the device
    local: List[int]  # the same, as Python ints
    starts: List[int]
    lengths: List[int]
    queries: torch.Tensor  # (R, n) query positions on the device; a shorter row's padding repeats its last
    masks: dict  # attention kind -> additive mask (R, heads or 1, n, keys): positions, causality, padding
    rope: dict  # attention kind -> rotary (cos, sin) of each query (R, 1, n, head_dim); empty without rotary
    keys: int  # cache slots the queries read
    all_live: bool  # every live row, in order: caches are read as views

    @property
    def width(self) -> int:
        return self.queries.shape[1]

    def take(self, which: List[int]) -> "Rows":
        """The rows at positions `which` of this selection."""
        index = torch.tensor(which, dtype=torch.long, device=self.index.device)
        pick = lambda t: t.index_select(0, index)  # noqa: E731
        return Rows(pick(self.index), [self.local[i] for i in which], [self.starts[i] for i in which],
                    [self.lengths[i] for i in which], pick(self.queries),
                    {kind: pick(mask) for kind, mask in self.masks.items()},
                    {kind: (pick(cos), pick(sin)) for kind, (cos, sin) in self.rope.items()}, self.keys, False)


@dataclass
class Emit:
    """A row's step produced `token`, which left the decoder after `exit_layer`."""

    token: int
    exit_layer: int
    jsd_step: Optional[dict] = None


@dataclass
class Replace:
    """A deep pass re-decided a row's tail (FREE's rollback, self-speculation's verification):
    keep its first `kept` tokens (the start token included), append `tokens` with their exit
    layers; everything after is discarded and the caches forget positions >= kept."""

    kept: int
    tokens: List[int]
    exit_layers: List[int]


class RowState:
    """One row of the batch while it decodes: its result so far and its per-row inputs."""

    def __init__(self, row: int, start_token: int, num_layers: int, encoder_length: int, flops, trace: bool,
                 prompt_length: int = 0):
        self.row = row  # position in the caller's batch
        self.encoder_length = encoder_length
        self.earlier = max(prompt_length - 1, 0)  # real positions before loop position 0 (the prompt's)
        self.result = RowResult(tokens=[start_token], exit_layers=[], block_runs=[0] * num_layers, flops=flops,
                                trace={name: [] for name in TRACE_FIELDS} if trace else None)
        self.shallow_confidence = {}  # FREE: input position -> confidence of its shallow exit
        self.cross_counted = [False] * num_layers  # cross-attention keys/values counted for this row

    @property
    def position(self) -> int:
        """Input position of the next token."""
        return len(self.result.tokens) - 1

    def apply(self, outcome) -> None:
        result = self.result
        if isinstance(outcome, Emit):
            result.tokens.append(outcome.token)
            result.exit_layers.append(outcome.exit_layer)
            if outcome.jsd_step is not None:
                result.jsd_steps.append(outcome.jsd_step)
            return
        kept = outcome.kept
        result.tokens = result.tokens[:kept] + outcome.tokens
        result.exit_layers = result.exit_layers[: kept - 1] + outcome.exit_layers
        # one record per token: a replaced token keeps the record of the check at its position
        result.jsd_steps = result.jsd_steps[: len(result.exit_layers)]


TRACE_FIELDS = ("ranks", "confidences", "max_probs", "agrees", "exit_layers")


class BatchDecoder:
    """Greedy decoding of a batch under an exit policy, each row exiting on its own.

    Every token step runs the live rows through the blocks; a row that exits leaves the running
    set at once, so the blocks after its exit layer run only the rows still there (gathered, not
    masked: see the module docstring), and a row that finished leaves the batch. `step` is the
    per-token strategy: models.exit_step.exit_step (full, static, CALM early exit, FREE without parallel
    decoding, traces), models.shallow_deep.ShallowDeepStep or
    models.self_speculation.SelfSpeculativeStep. The model's decoder is read through its
    architecture (models.architectures): the same loop serves encoder-decoder and decoder-only
    models.

    Positions: loop position t is the input position of a row's t-th token in `tokens` (T5: the
    decoder start token at 0; decoder-only: the prompt's last token at 0, prefilled, so the
    first token step feeds position 1). Cache slot = prefix + t; the prompt fills slots
    0..prefix (left-padded rows start later: `pads`).
    """

    def __init__(self, model, policy: ExitPolicy, timer: ComponentTimer, max_new_tokens: int, scorer=None,
                 count_flops: bool = False, trace: bool = False, lazy_propagation: bool = True, step=None,
                 first_policy: Optional[ExitPolicy] = None, sampler=None, first_step=None):
        self.model = model
        self.sampler = sampler  # models.sampling.Sampler, or None: greedy
        self.arch = arch = describe(model)
        self.policy = policy
        self.first_policy = first_policy or policy  # decoder-only: the token read from the prefill
        self.timer = timer
        self.max_new_tokens = max_new_tokens
        self.scorer = scorer
        self.count_flops = count_flops
        self.shape = arch.shape() if count_flops else None
        self.tracing = trace
        self.lazy = lazy_propagation
        self.step = step  # one token step for every live row (models.exit_step.exit_step and the others)
        self.first_step = first_step  # decoder-only: the step that reads the prefill (models.exit_step.first_token)
        self.num_layers = arch.num_layers
        self.windows = layer_windows(arch)
        self.device = model.lm_head.weight.device
        self.dtype = arch.dtype
        self.min_value = torch.finfo(self.dtype).min
        self.gqa = arch.num_kv_heads != arch.num_heads
        self.cross_views_from = CROSS_VIEWS_FROM  # source length from which exited rows' cross-attention is sliced
        if arch.encoder_decoder:
            n = max_new_tokens
            self.position_bias = arch.position_bias(n, self.device)

    # ----- selections ----------------------------------------------------------------------------
    def select(self, local: List[int], starts: List[int], lengths: List[int], causal: bool = True) -> Rows:
        """Rows `local` of the live batch querying positions starts[i]..starts[i]+lengths[i]-1."""
        device = self.device
        width = max(lengths)
        last = [s + n - 1 for s, n in zip(starts, lengths)]
        offsets = torch.arange(width, device=device)
        starts_t = torch.tensor(starts, dtype=torch.long, device=device)[:, None]
        last_t = torch.tensor(last, dtype=torch.long, device=device)[:, None]
        queries = torch.minimum(starts_t + offsets, last_t)  # (R, n): padded queries repeat the last
        index = torch.tensor(local, dtype=torch.long, device=device)
        masks, rope, keys = self.arch.attention_inputs(self, index, queries, last_t, last, causal)
        all_live = local == list(range(len(self.live)))
        return Rows(index, list(local), list(starts), list(lengths), queries, masks, rope, keys, all_live)

    def embed_inputs(self, rows: Rows) -> torch.Tensor:
        """The embedding (R, 1, d) of each selected row's last token, at its position."""
        tokens = torch.tensor([[self.live[r].result.tokens[-1]] for r in rows.local], device=self.device)
        if self.arch.encoder_decoder:  # T5's positions enter as attention bias only
            return self.arch.embed(tokens, None)
        return self.arch.embed(tokens, self._real_positions(rows.index, rows.queries))

    def _real_positions(self, index: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Loop positions (R, n) of rows `index` as the model numbers them (left padding not counted)."""
        return (self.prefix + positions - self.pads.index_select(0, index)[:, None]).clamp(min=0)

    # ----- pieces of one block -------------------------------------------------------------------
    def _store_self_kv(self, j: int, keys: torch.Tensor, values: torch.Tensor, rows: Rows) -> None:
        """Keys/values (R, kv_heads, n, head_dim) of block j for the valid query positions of `rows`."""
        if rows.width == 1:
            row_index, positions = rows.index, rows.queries[:, 0]
            keys, values = keys[:, :, 0], values[:, :, 0]
        else:  # only the real positions of each row, not the padding of the shorter ones
            pairs = [(i, r, s + q) for i, (r, s, n) in enumerate(zip(rows.local, rows.starts, rows.lengths))
                     for q in range(n)]
            flat = torch.tensor([i * rows.width + (p - rows.starts[i]) for i, _, p in pairs], device=self.device)
            row_index = torch.tensor([r for _, r, _ in pairs], dtype=torch.long, device=self.device)
            positions = torch.tensor([p for _, _, p in pairs], dtype=torch.long, device=self.device)
            split = (-1,) + keys.shape[1:2] + keys.shape[3:]
            keys = keys.transpose(1, 2).reshape(split).index_select(0, flat)
            values = values.transpose(1, 2).reshape(split).index_select(0, flat)
        ends = [s + n for s, n in zip(rows.starts, rows.lengths)]
        self.cache.write(j, row_index, self._slots(positions), keys, values, ends, rows.local)

    def _slots(self, positions: torch.Tensor) -> torch.Tensor:
        """Cache slots of loop positions (the prompt fills the first `prefix` slots)."""
        return positions + self.prefix if self.prefix else positions

    def _cross_kv(self, j: int, rows: Rows):
        """Keys/values of block j over the encoder output, made for the whole batch on first use;
        each row's FLOPs are counted when that row first reaches the block, as alone."""
        if self.cross[j] is None:
            self.cross[j] = self.arch.cross_keys_values(j, self.encoder_states)
        if self.count_flops:
            for r in rows.local:
                state = self.live[r]
                if not state.cross_counted[j]:
                    state.cross_counted[j] = True
                    state.result.flops.blocks += cross_kv_flops(self.shape, state.encoder_length)
        keys, values = self.cross[j]
        if rows.all_live:
            return keys, values, self.cross_mask, None
        if keys.shape[2] >= self.cross_views_from:  # long sources: slices of every row, no copy
            return keys, values, self.cross_mask, consecutive_runs(rows.local)
        return keys.index_select(0, rows.index), values.index_select(0, rows.index), \
            self.cross_mask.index_select(0, rows.index), None

    def block(self, j: int, hidden: torch.Tensor, rows: Rows, counted: bool = True) -> torch.Tensor:
        """Block j (0-based) on the query positions of `rows` (hidden (R, n, d)), reading and
        extending the caches; `counted`: each row's block runs and FLOPs (not the prefill's)."""
        arch = self.arch
        kind = arch.layer_kinds[j]
        rope = rows.rope.get(kind)
        normed = arch.attention_input(j, hidden)
        query, new_keys, new_values = arch.queries_keys_values(j, normed, rope)
        self._store_self_kv(j, new_keys, new_values, rows)
        keys, values = self.cache.read(j, rows.index, rows.keys, rows.all_live)
        extra = {"enable_gqa": True} if self.gqa else {}
        out = F.scaled_dot_product_attention(query, keys, values, attn_mask=rows.masks[kind], scale=arch.scale, **extra)
        out = out.transpose(1, 2).reshape(out.shape[0], -1, arch.num_heads * arch.head_dim)
        hidden = arch.clamp(hidden + arch.attention_output(j, out))
        if arch.encoder_decoder:
            keys, values, cross_mask, runs = self._cross_kv(j, rows)
            hidden = arch.clamp(hidden + arch.cross_attention(j, hidden, keys, values, cross_mask, runs))
        if counted:
            window = self.windows[j]
            for r, s, n in zip(rows.local, rows.starts, rows.lengths):
                state = self.live[r]
                state.result.block_runs[j] += n
                if self.count_flops:
                    attended = [state.earlier + p + 1 for p in range(s, s + n)]
                    if window is not None:
                        attended = [min(a, window) for a in attended]
                    state.result.flops.blocks += sum(decoder_block_flops(self.shape, a, state.encoder_length)
                                                     for a in attended)
        return arch.clamp(arch.feed_forward(j, hidden))

    def propagate(self, j: int, local: List[int], upto: List[int]) -> None:
        """Give block j keys/values for each row's positions filled..upto-1 from their copied
        exit states (state propagation, in one projection for all rows)."""
        filled = self.cache.filled[j]
        pending = [(r, filled[r], s) for r, s in zip(local, upto) if filled[r] < s]
        if not pending:
            return
        mark = self.timer.now()
        row_index = torch.tensor([r for r, a, b in pending for _ in range(a, b)], dtype=torch.long, device=self.device)
        positions = torch.tensor([p for r, a, b in pending for p in range(a, b)], dtype=torch.long, device=self.device)
        arch = self.arch
        normed = arch.attention_input(j, self.exit_states[row_index, positions])[None]  # (1, P, d)
        rope = arch.rope_at(self, arch.layer_kinds[j], self._real_positions(row_index, positions[:, None])[:, 0])
        keys, values = arch.keys_values(j, normed, rope)  # (1, kv_heads, P, head_dim)
        keys, values = keys[0].transpose(0, 1), values[0].transpose(0, 1)
        self.cache.write(j, row_index, self._slots(positions), keys, values, [b for _, _, b in pending],
                         [r for r, _, _ in pending])
        if self.count_flops:
            for r, a, b in pending:
                self.live[r].result.flops.blocks += skipped_block_flops(self.shape, b - a)
        self.timer.add("propagation", mark)

    def output_head(self, hidden: torch.Tensor, rows: List[int]) -> torch.Tensor:
        """The full head predicting tokens for live rows `rows` (one per row of hidden (R, d)):
        its argmax, or under sampling a draw from its processed distribution."""
        if self.sampler is None:
            return output_tokens(self.model, hidden, self.counters(rows))
        return torch.tensor(self.sample(output_logits(self.model, hidden), rows))

    def sample(self, logits: torch.Tensor, rows: List[int]) -> List[int]:
        """One token per row of logits (R, V) for live rows `rows`, the head counted with the
        blocks (the full model's own last step; at a shallow exit, the work sampling adds)."""
        if self.count_flops:
            for r in rows:
                self.live[r].result.flops.blocks += output_head_flops(self.shape)
        return self.sampler.sample(logits, [self.live[r].row for r in rows])

    # ----- the loop ------------------------------------------------------------------------------
    def run(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, start_token: Optional[int],
            eos_ids: set) -> List[RowResult]:
        """Decode input_ids (B, S) with its attention mask; one RowResult per row, in order.
        Encoder-decoder: the encoder reads input_ids and decoding begins at `start_token`.
        Decoder-only: input_ids is the left-padded prompt, prefilled; its last token is tokens[0]
        and the first new token is decided from the prefill's states (`first_token`)."""
        self.start(input_ids, attention_mask, start_token)
        done = []
        step = self.step if self.arch.encoder_decoder else self.first_step
        while self.live:
            outcomes = step(self)
            step = self.step
            finished = []
            for i, (state, outcome) in enumerate(zip(self.live, outcomes)):
                state.apply(outcome)
                if isinstance(outcome, Replace):  # resume after the last kept token
                    self.cache.truncate(i, outcome.kept)
                tokens = state.result.tokens
                if tokens[-1] in eos_ids or len(tokens) > self.max_new_tokens:
                    finished.append(i)
            if finished:
                done.extend(self.live[i] for i in finished)
                self._keep([i for i in range(len(self.live)) if i not in finished])
        done.sort(key=lambda state: state.row)
        return [state.result for state in done]

    def start(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, start_token: Optional[int]) -> None:
        """Encode (or prefill) the batch and make every row's decoding state (all rows live)."""
        timer, arch = self.timer, self.arch
        mark = timer.now()
        lengths = attention_mask.sum(-1).tolist()
        B, P, L = input_ids.shape[0], input_ids.shape[1], self.num_layers
        self.live: List[RowState] = []
        for b in range(B):
            flops = FlopCounter(self.shape, arch.front) if self.count_flops else None
            if arch.encoder_decoder:
                if flops is not None:
                    flops.encoder += self.model.encoder_flops(lengths[b])
                self.live.append(RowState(b, start_token, L, lengths[b], flops, self.tracing))
            else:
                if flops is not None:
                    flops.encoder += prefill_flops(self.shape, lengths[b], self.windows)
                self.live.append(RowState(b, int(input_ids[b, -1]), L, 0, flops, self.tracing, lengths[b]))
        self.prefix = 0 if arch.encoder_decoder else P - 1
        self.pads = torch.tensor([P - n for n in lengths], dtype=torch.long, device=self.device) \
            if not arch.encoder_decoder else torch.zeros(B, dtype=torch.long, device=self.device)
        self.cache = KVCache(L, B, arch.num_kv_heads, self.prefix + self.max_new_tokens, arch.head_dim, self.device,
                             self.dtype)
        self.exit_states = torch.zeros((B, self.max_new_tokens, arch.d_model), device=self.device,
                                       dtype=self.dtype)  # padded positions of FREE's deep pass read it
        if arch.encoder_decoder:
            self.encoder_states = self.model.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
            self.cross_mask = torch.zeros(attention_mask.shape, device=self.device, dtype=self.dtype)
            self.cross_mask = self.cross_mask.masked_fill(attention_mask == 0, self.min_value)[:, None, None, :]
            self.cross = [None] * L
        else:
            self.rope_tables = arch.rope_tables(P + self.max_new_tokens, self.device)
            self._prefill(input_ids)
        timer.add(arch.front, mark)

    def _prefill(self, input_ids: torch.Tensor) -> None:
        """Every block over the whole prompt at once (causal, padding masked), filling the caches;
        keeps the last position's state after each block for the first token's exit rule."""
        B, P = input_ids.shape
        rows = self.select(list(range(B)), [-self.prefix] * B, [P] * B)
        hidden = self.arch.embed(input_ids, self._real_positions(rows.index, rows.queries))
        self.prefill_states = [hidden[:, -1]]
        for j in range(self.num_layers):
            hidden = self.block(j, hidden, rows, counted=False)
            self.prefill_states.append(hidden[:, -1])

    def _keep(self, keep: List[int]) -> None:
        """Only these live rows go on: finished rows leave every buffer, and cost nothing after."""
        self.live = [self.live[i] for i in keep]
        if not keep:
            return
        index = torch.tensor(keep, dtype=torch.long, device=self.device)
        self.cache.keep(index, keep)
        self.exit_states = self.exit_states.index_select(0, index)
        self.pads = self.pads.index_select(0, index)
        if self.arch.encoder_decoder:
            self.encoder_states = self.encoder_states.index_select(0, index)
            self.cross_mask = self.cross_mask.index_select(0, index)
            self.cross = [None if kv is None else (kv[0].index_select(0, index), kv[1].index_select(0, index))
                          for kv in self.cross]

    def stack_states(self, rows: Rows, hidden: torch.Tensor) -> None:
        """Copy the states hidden (R, 1, d) of `rows` at their current position, for propagation
        to skipped blocks or FREE's deep pass."""
        self.exit_states[rows.index, rows.queries[:, 0]] = hidden[:, 0]

    def counters(self, local: List[int]):
        return [self.live[r].result.flops for r in local] if self.count_flops else None
