"""Typed results of one generate call: one RowResult per row, merged into `exit_stats()`."""

from collections import Counter
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

from models.flops import FlopCounter

# per generate call; besides these, the front: "encoder" (encoder-decoder) or "prefill" (decoder-only)
TIMED_COMPONENTS = ("blocks", "confidence", "head", "propagation")
# The one list of the methods' work counters: a step declares its own by name from here
# (`counted`), merge_rows sums them per call and tasks.runner.ExitStatsTotals over calls.
METHOD_COUNTS = {
    "shallow_deep": ("parallel_tokens", "rollbacks"),
    "self_speculation": ("drafted_tokens", "accepted_tokens", "verify_passes", "final_verifications"),
}
# exit_stats() figures summed over calls: FREE's token split (from the exit layers) and every counter
SUMMED_COUNTS = ("shallow_tokens", "deep_tokens") + tuple(name for names in METHOD_COUNTS.values() for name in names)


@dataclass
class RowResult:
    """Everything one row's decoding produced: what that row decoded alone would produce."""

    tokens: List[int]  # with the decoder start token
    exit_layers: List[int]  # one per generated token
    block_runs: List[int]  # positions each block ran for this row, parallel recomputation included
    flops: Optional[FlopCounter] = None
    trace: Optional[Dict[str, list]] = None  # plotting_logits: util.diagnostics.LayerTrace fields
    jsd_steps: List[dict] = field(default_factory=list)  # render_jsds: one per generated token
    # counts of the method: FREE's parallel_tokens (skipped positions recomputed) and rollbacks,
    # self-speculation's drafted_tokens, accepted_tokens, verify_passes, final_verifications
    counts: Counter = field(default_factory=Counter)
    observations: List[Tuple[float, bool]] = field(default_factory=list)  # adaptive threshold labels

    @property
    def block_avg(self) -> float:
        return sum(self.block_runs) / len(self.exit_layers) if self.exit_layers else 0.0

    @property
    def block_avg_free(self) -> float:
        """FREE's accounting: a token costs the blocks up to its exit layer; state propagation and
        parallel recomputation are not counted."""
        return sum(self.exit_layers) / len(self.exit_layers) if self.exit_layers else 0.0


def merge_rows(rows: List[RowResult], num_layers: int, shallow_layer: Optional[int] = None,
               counted: Tuple[str, ...] = ()) -> dict:
    """exit_stats() of a call: totals over rows (README's keys) plus a `rows` list per row."""
    exits = [e for row in rows for e in row.exit_layers]
    count = len(exits)
    block_op = [sum(row.block_runs[j] for row in rows) for j in range(num_layers)]
    stats = {
        "tokens": count,
        "block_avg": sum(block_op) / count if count else 0.0,
        "block_avg_free": sum(exits) / count if count else 0.0,
        "block_op": block_op,
        "exit_layer_counts": [exits.count(layer) for layer in range(1, num_layers + 1)],
        "exit_layers": [row.exit_layers for row in rows],
    }
    if shallow_layer is not None:  # FREE's counts, of the tokens kept (rolled-back ones are gone)
        stats["shallow_tokens"] = exits.count(shallow_layer)
        stats["deep_tokens"] = exits.count(num_layers)
    undeclared = {name for row in rows for name in row.counts} - set(counted)
    if undeclared:  # a counter outside the step's declared list would be dropped silently
        raise ValueError(f"counters {sorted(undeclared)} are not declared in the step's `counted` (models.results.METHOD_COUNTS).")
    for name in counted:  # the method's work counts, summed over rows
        stats[name] = sum(row.counts[name] for row in rows)
    per_row = []
    for row in rows:
        figures = {"tokens": len(row.exit_layers), "block_avg": row.block_avg,
                   "block_avg_free": row.block_avg_free, "block_op": list(row.block_runs)}
        if row.flops is not None:
            figures.update(row.flops.as_stats())
        per_row.append(figures)
    stats["rows"] = per_row
    if rows and rows[0].flops is not None:
        for key in rows[0].flops.as_stats():
            stats[key] = sum(row.flops.as_stats()[key] for row in rows)
    return stats
