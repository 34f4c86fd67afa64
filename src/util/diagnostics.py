"""Pure analysis of per-layer decoding traces (``plotting_logits``, ``render_jsds``).

Nothing here touches the model: the decode loop records plain lists, this module checks
them, summarises them per layer and saves/loads them as JSON and CSV.

Conventions
-----------
* Layers are 1-based: layer ``l`` is the output of decoder block ``l``; index ``l - 1`` in
  the per-token lists.
* A token's reference is the real final prediction (after block L), so at layer L the rank
  is 0 and ``agrees`` is True.
* Confidence may be NaN where the exit measure is not defined; NaNs are ignored by every
  summary (and written as an empty cell in CSV, ``null`` in JSON).
"""

from __future__ import annotations

import csv
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, Iterable, List, Mapping, Optional, Sequence, Union

import numpy as np

PathLike = Union[str, Path]

# Quantiles reported for the rank of the final prediction at each layer.
RANK_QUANTILES = (0.25, 0.5, 0.75, 0.9)


# ---------------------------------------------------------------------------
# Trace data
# ---------------------------------------------------------------------------


def _check_matrix(name: str, rows, n_tokens: int, n_layers: int) -> None:
    """Raise ValueError unless ``rows`` is n_tokens lists of n_layers items each."""
    if len(rows) != n_tokens:
        raise ValueError(f"{name} has {len(rows)} tokens, expected {n_tokens} (as in ranks)")
    for t, row in enumerate(rows):
        if len(row) != n_layers:
            raise ValueError(
                f"{name}[{t}] has {len(row)} layers, expected num_layers={n_layers}")


@dataclass
class LayerTrace:
    """Per-token, per-layer record of one run (``plotting_logits``).

    ranks[t][l-1]       rank of the final prediction of token t in the logits z_l (0 = top).
    confidences[t][l-1] exit confidence at layer l (float, NaN where not defined).
    max_probs[t][l-1]   max probability of p_l = softmax(z_l).
    agrees[t][l-1]      argmax z_l == final prediction.
    exit_layers[t]      1-based layer at which token t exited.
    num_layers          L, the number of decoder layers.
    tokens              optional token strings, only used for labels.
    """

    ranks: List[List[int]]
    confidences: List[List[float]]
    max_probs: List[List[float]]
    agrees: List[List[bool]]
    exit_layers: List[int]
    num_layers: int
    tokens: Optional[List[str]] = None

    def __post_init__(self) -> None:
        if not isinstance(self.num_layers, (int, np.integer)) or self.num_layers < 1:
            raise ValueError(f"num_layers must be a positive int, got {self.num_layers!r}")
        self.num_layers = int(self.num_layers)
        n = len(self.ranks)
        for name in ("ranks", "confidences", "max_probs", "agrees"):
            _check_matrix(name, getattr(self, name), n, self.num_layers)
        if len(self.exit_layers) != n:
            raise ValueError(f"exit_layers has {len(self.exit_layers)} entries, expected {n} (one per token)")
        for t, e in enumerate(self.exit_layers):
            if not 1 <= int(e) <= self.num_layers:
                raise ValueError(f"exit_layers[{t}]={e} is outside 1..num_layers={self.num_layers}")
        if self.tokens is not None and len(self.tokens) != n:
            raise ValueError(f"tokens has {len(self.tokens)} entries, expected {n} (one per token)")
        # Normalise types so that JSON and CSV round-trips compare equal.
        self.ranks = [[int(r) for r in row] for row in self.ranks]
        self.confidences = [[_to_float(c) for c in row] for row in self.confidences]
        self.max_probs = [[_to_float(p) for p in row] for row in self.max_probs]
        self.agrees = [[bool(a) for a in row] for row in self.agrees]
        self.exit_layers = [int(e) for e in self.exit_layers]
        if self.tokens is not None:
            self.tokens = [str(s) for s in self.tokens]
        for t, row in enumerate(self.ranks):
            if any(r < 0 for r in row):
                raise ValueError(f"ranks[{t}] has a negative rank")

    @property
    def num_tokens(self) -> int:
        return len(self.ranks)

    def to_dict(self) -> dict:
        """JSON-safe dict (NaN -> None)."""
        return {
            "kind": "layer_trace",
            "num_layers": self.num_layers,
            "ranks": self.ranks,
            "confidences": [[_nan_to_none(c) for c in row] for row in self.confidences],
            "max_probs": [[_nan_to_none(p) for p in row] for row in self.max_probs],
            "agrees": self.agrees,
            "exit_layers": self.exit_layers,
            "tokens": self.tokens,
        }

    @classmethod
    def from_dict(cls, d: Mapping) -> "LayerTrace":
        missing = [k for k in ("ranks", "confidences", "max_probs", "agrees", "exit_layers", "num_layers")
                   if k not in d]
        if missing:
            raise ValueError(f"layer trace dict lacks keys: {', '.join(missing)}")
        return cls(ranks=d["ranks"], confidences=d["confidences"], max_probs=d["max_probs"],
                   agrees=d["agrees"], exit_layers=d["exit_layers"], num_layers=d["num_layers"],
                   tokens=d.get("tokens"))


@dataclass
class JsdStep:
    """JSD record of one generated token (``render_jsds``).

    jsd          candidate layer (1-based) -> discounted JSD against the expert layer.
                 A list is accepted too: index i is layer i+1, NaN marks a non-candidate.
    chosen       the amateur layer picked for this token.
    expert_layer the expert (current) layer.
    """

    jsd: Dict[int, float]
    chosen: int
    expert_layer: int

    def __post_init__(self) -> None:
        self.jsd = _jsd_to_dict(self.jsd)
        self.chosen = int(self.chosen)
        self.expert_layer = int(self.expert_layer)
        if self.chosen < 1 or self.expert_layer < 1:
            raise ValueError(f"chosen={self.chosen} and expert_layer={self.expert_layer} must be >= 1")


@dataclass
class JsdTrace:
    """Per-token JSD records of one run, with optional token strings for labels."""

    steps: List[JsdStep] = field(default_factory=list)
    tokens: Optional[List[str]] = None

    def __post_init__(self) -> None:
        self.steps = [s if isinstance(s, JsdStep) else JsdStep(**s) for s in self.steps]
        if self.tokens is not None:
            if len(self.tokens) != len(self.steps):
                raise ValueError(f"tokens has {len(self.tokens)} entries, expected {len(self.steps)} (one per step)")
            self.tokens = [str(s) for s in self.tokens]

    def candidate_layers(self) -> List[int]:
        """Sorted union of the candidate layers over all tokens."""
        return sorted({layer for s in self.steps for layer in s.jsd})

    def matrix(self):
        """(layers, M, chosen): M[t, j] is the JSD of token t at layers[j], NaN if not a candidate."""
        layers = self.candidate_layers()
        col = {layer: j for j, layer in enumerate(layers)}
        m = np.full((len(self.steps), len(layers)), np.nan)
        for t, s in enumerate(self.steps):
            for layer, v in s.jsd.items():
                m[t, col[layer]] = v
        return layers, m, [s.chosen for s in self.steps]

    def to_dict(self) -> dict:
        return {
            "kind": "jsd_trace",
            "steps": [{"jsd": {str(k): _nan_to_none(v) for k, v in s.jsd.items()},
                       "chosen": s.chosen, "expert_layer": s.expert_layer} for s in self.steps],
            "tokens": self.tokens,
        }

    @classmethod
    def from_dict(cls, d: Mapping) -> "JsdTrace":
        if "steps" not in d:
            raise ValueError("jsd trace dict lacks key: steps")
        return cls(steps=list(d["steps"]), tokens=d.get("tokens"))


def _to_float(x) -> float:
    return float("nan") if x is None else float(x)


def _nan_to_none(x: float):
    return None if x is None or math.isnan(x) else float(x)


def _jsd_to_dict(jsd) -> Dict[int, float]:
    """Normalise a JSD record (dict with int/str keys, or list with NaN gaps) to {layer: float}."""
    if isinstance(jsd, Mapping):
        out = {int(k): _to_float(v) for k, v in jsd.items()}
    elif isinstance(jsd, (list, tuple, np.ndarray)):
        out = {i + 1: _to_float(v) for i, v in enumerate(jsd)}
    else:
        raise ValueError(f"jsd must be a dict layer->float or a list, got {type(jsd).__name__}")
    # NaN marks a non-candidate, so it is dropped rather than stored.
    return {k: v for k, v in sorted(out.items()) if not math.isnan(v)}


def normalise_static_metric(static_metric: Mapping) -> Dict[int, float]:
    """{layer: value} with int keys (JSON turns them into strings), sorted by layer."""
    if not isinstance(static_metric, Mapping) or not static_metric:
        raise ValueError("static_metric must be a non-empty dict {layer: metric value}")
    out = {int(k): _to_float(v) for k, v in static_metric.items()}
    if min(out) < 1:
        raise ValueError(f"static_metric has layer {min(out)}; layers are 1-based")
    return dict(sorted(out.items()))


# ---------------------------------------------------------------------------
# Calibration
# ---------------------------------------------------------------------------


def _clean_pairs(confidences, correct):
    """Float confidences and bool correctness with NaN confidences dropped."""
    conf = np.asarray(confidences, dtype=float).ravel()
    corr = np.asarray(correct, dtype=float).ravel()
    if conf.shape != corr.shape:
        raise ValueError(f"confidences ({conf.size}) and correct ({corr.size}) differ in length")
    keep = ~np.isnan(conf) & ~np.isnan(corr)
    conf, corr = conf[keep], corr[keep]
    if conf.size and (conf.min() < 0 or conf.max() > 1):
        raise ValueError("confidences must lie in [0, 1] (NaN allowed)")
    return conf, corr


def bin_index(conf: np.ndarray, n_bins: int) -> np.ndarray:
    """Equal-width bins on [0, 1]: bin b holds [b/n, (b+1)/n); 1.0 goes to the last bin."""
    return np.minimum((conf * n_bins).astype(int), n_bins - 1)


def reliability_bins(confidences, correct, n_bins: int = 10) -> List[dict]:
    """Per bin: lower/upper edge, count, mean confidence and accuracy (NaN when empty)."""
    if not isinstance(n_bins, (int, np.integer)) or n_bins < 1:
        raise ValueError(f"n_bins must be a positive int, got {n_bins!r}")
    conf, corr = _clean_pairs(confidences, correct)
    idx = bin_index(conf, n_bins)
    out = []
    for b in range(n_bins):
        sel = idx == b
        n = int(sel.sum())
        out.append({
            "lower": b / n_bins, "upper": (b + 1) / n_bins, "count": n,
            "confidence": float(conf[sel].mean()) if n else float("nan"),
            "accuracy": float(corr[sel].mean()) if n else float("nan"),
        })
    return out


def expected_calibration_error(confidences, correct, n_bins: int = 10) -> float:
    """ECE = sum_b |B_b|/n * |acc(B_b) - conf(B_b)| over equal-width bins on [0, 1].

    Pairs with a NaN confidence are ignored; returns NaN when no pair is left.
    """
    return ece_of_bins(reliability_bins(confidences, correct, n_bins))


def ece_of_bins(bins: Sequence[dict]) -> float:
    """ECE of reliability_bins() already computed; NaN when the bins hold no pair."""
    total = sum(b["count"] for b in bins)
    if total == 0:
        return float("nan")
    return float(sum(b["count"] / total * abs(b["accuracy"] - b["confidence"])
                     for b in bins if b["count"]))


# ---------------------------------------------------------------------------
# Per-layer summaries
# ---------------------------------------------------------------------------


def _nanmean(x: np.ndarray) -> float:
    x = x[~np.isnan(x)]
    return float(x.mean()) if x.size else float("nan")


def layer_summary(trace: LayerTrace, n_bins: int = 10) -> List[dict]:
    """One dict per layer 1..L: mean confidence, accuracy (agreement rate), ECE,
    mean max probability, top-1 rate, rank quantiles and the number of tokens exiting there."""
    ranks = np.asarray(trace.ranks, dtype=float).reshape(trace.num_tokens, trace.num_layers)
    conf = np.asarray(trace.confidences, dtype=float).reshape(ranks.shape)
    maxp = np.asarray(trace.max_probs, dtype=float).reshape(ranks.shape)
    agree = np.asarray(trace.agrees, dtype=float).reshape(ranks.shape)
    exits = np.asarray(trace.exit_layers, dtype=int)
    rows = []
    for j in range(trace.num_layers):
        row = {
            "layer": j + 1,
            "n_tokens": trace.num_tokens,
            "n_confidence": int((~np.isnan(conf[:, j])).sum()),
            "mean_confidence": _nanmean(conf[:, j]),
            "accuracy": _nanmean(agree[:, j]),
            "ece": expected_calibration_error(conf[:, j], agree[:, j], n_bins),
            "mean_max_prob": _nanmean(maxp[:, j]),
            "top1_rate": _nanmean((ranks[:, j] == 0).astype(float)) if trace.num_tokens else float("nan"),
            "n_exits": int((exits == j + 1).sum()),
        }
        for q in RANK_QUANTILES:
            row[f"rank_q{int(q * 100)}"] = (float(np.quantile(ranks[:, j], q))
                                          if trace.num_tokens else float("nan"))
        rows.append(row)
    return rows


def overall_ece(trace: LayerTrace, n_bins: int = 10) -> float:
    """ECE of all layers' (confidence, agreement) pairs pooled."""
    return expected_calibration_error(trace.confidences, trace.agrees, n_bins)


def exit_histogram(trace: LayerTrace) -> List[int]:
    """counts[l-1] = number of tokens that exited at layer l."""
    counts = [0] * trace.num_layers
    for e in trace.exit_layers:
        counts[e - 1] += 1
    return counts


# ---------------------------------------------------------------------------
# Save / load
# ---------------------------------------------------------------------------

LAYER_CSV_COLUMNS = ["token_index", "token", "layer", "rank", "confidence", "max_prob", "agrees",
                     "exit_layer", "num_layers"]
JSD_CSV_COLUMNS = ["token_index", "token", "layer", "jsd", "chosen", "expert_layer"]


def save_json(trace: Union[LayerTrace, JsdTrace], path: PathLike) -> Path:
    """Write a trace as strict JSON (NaN as null); creates parent folders."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(trace.to_dict(), allow_nan=False))
    return path


def load_json(path: PathLike) -> Union[LayerTrace, JsdTrace]:
    """Read a trace written by save_json; the "kind" key says which class."""
    d = json.loads(Path(path).read_text())
    kind = d.get("kind")
    if kind == "layer_trace":
        return LayerTrace.from_dict(d)
    if kind == "jsd_trace":
        return JsdTrace.from_dict(d)
    raise ValueError(f"{path}: unknown trace kind {kind!r} (expected layer_trace or jsd_trace)")


def _fmt(x: float) -> str:
    return "" if math.isnan(x) else repr(float(x))


def _parse_float(s: str) -> float:
    return float("nan") if s == "" else float(s)


def write_csv(path: PathLike, header: Sequence[str], rows: Iterable[Sequence]) -> Path:
    """A CSV file of a header and rows, its folder made if needed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)
    return path


def save_layer_csv(trace: LayerTrace, path: PathLike) -> Path:
    """One row per token per layer (see LAYER_CSV_COLUMNS); NaN confidence is an empty cell."""
    def rows():
        for t in range(trace.num_tokens):
            tok = trace.tokens[t] if trace.tokens is not None else ""
            for j in range(trace.num_layers):
                yield [t, tok, j + 1, trace.ranks[t][j], _fmt(trace.confidences[t][j]),
                       _fmt(trace.max_probs[t][j]), int(trace.agrees[t][j]),
                       trace.exit_layers[t], trace.num_layers]

    return write_csv(path, LAYER_CSV_COLUMNS, rows())


def load_layer_csv(path: PathLike, has_tokens: bool = True) -> LayerTrace:
    """Read a CSV written by save_layer_csv back into a LayerTrace.

    Token strings are restored when has_tokens is True and any token cell is non-empty.
    A trace with no tokens cannot record num_layers in CSV, so it needs at least one row.
    """
    with Path(path).open(newline="") as f:
        rows = list(csv.DictReader(f))
    if not rows:
        raise ValueError(f"{path}: no rows; an empty trace cannot be restored from CSV")
    num_layers = int(rows[0]["num_layers"])
    by_token: Dict[int, list] = {}
    for r in rows:
        by_token.setdefault(int(r["token_index"]), []).append(r)
    if sorted(by_token) != list(range(len(by_token))):
        raise ValueError(f"{path}: token_index values are not 0..n-1")
    ranks, confs, maxps, agrees, exits, tokens = [], [], [], [], [], []
    for t in range(len(by_token)):
        rs = sorted(by_token[t], key=lambda r: int(r["layer"]))
        if [int(r["layer"]) for r in rs] != list(range(1, num_layers + 1)):
            raise ValueError(f"{path}: token {t} does not have exactly layers 1..{num_layers}")
        ranks.append([int(r["rank"]) for r in rs])
        confs.append([_parse_float(r["confidence"]) for r in rs])
        maxps.append([_parse_float(r["max_prob"]) for r in rs])
        agrees.append([r["agrees"] == "1" for r in rs])
        exits.append(int(rs[0]["exit_layer"]))
        tokens.append(rs[0]["token"])
    keep_tokens = has_tokens and any(tokens)
    return LayerTrace(ranks, confs, maxps, agrees, exits, num_layers,
                      tokens=tokens if keep_tokens else None)


def save_jsd_csv(trace: JsdTrace, path: PathLike) -> Path:
    """One row per token per candidate layer (see JSD_CSV_COLUMNS)."""
    def rows():
        for t, s in enumerate(trace.steps):
            tok = trace.tokens[t] if trace.tokens is not None else ""
            for layer, v in s.jsd.items():
                yield [t, tok, layer, _fmt(v), s.chosen, s.expert_layer]

    return write_csv(path, JSD_CSV_COLUMNS, rows())


def load_jsd_csv(path: PathLike) -> JsdTrace:
    """Read a CSV written by save_jsd_csv (a token with no candidate layer has no row)."""
    with Path(path).open(newline="") as f:
        rows = list(csv.DictReader(f))
    steps: Dict[int, dict] = {}
    tokens: Dict[int, str] = {}
    for r in rows:
        t = int(r["token_index"])
        s = steps.setdefault(t, {"jsd": {}, "chosen": int(r["chosen"]),
                                 "expert_layer": int(r["expert_layer"])})
        s["jsd"][int(r["layer"])] = _parse_float(r["jsd"])
        tokens[t] = r["token"]
    order = sorted(steps)
    if order != list(range(len(order))):
        raise ValueError(f"{path}: token_index values are not 0..n-1")
    toks = [tokens[t] for t in order]
    return JsdTrace(steps=[steps[t] for t in order], tokens=toks if any(toks) else None)


def save_summary_csv(rows: Sequence[dict], path: PathLike) -> Path:
    """Write layer_summary() rows as CSV (NaN as an empty cell)."""
    if not rows:
        raise ValueError("rows is empty; nothing to write")
    columns = list(rows[0])
    cells = ([_fmt(r[k]) if isinstance(r[k], float) else r[k] for k in columns] for r in rows)
    return write_csv(path, columns, cells)


TRACE_FILES = {
    "layer_json": "layer_trace.json", "layer_csv": "layer_trace.csv",
    "summary_csv": "layer_summary.csv", "jsd_json": "jsd_trace.json", "jsd_csv": "jsd_trace.csv",
}


def write_trace_files(out_dir: PathLike, trace: Optional[LayerTrace] = None,
                      jsd_trace: Optional[JsdTrace] = None, n_bins: int = 10) -> List[Path]:
    """Write the standard trace files (names in TRACE_FILES) under out_dir; returns the paths."""
    out = Path(out_dir)
    paths = []
    if trace is not None:
        paths += [save_json(trace, out / TRACE_FILES["layer_json"]),
                  save_layer_csv(trace, out / TRACE_FILES["layer_csv"]),
                  save_summary_csv(layer_summary(trace, n_bins), out / TRACE_FILES["summary_csv"])]
    if jsd_trace is not None:
        paths += [save_json(jsd_trace, out / TRACE_FILES["jsd_json"]),
                  save_jsd_csv(jsd_trace, out / TRACE_FILES["jsd_csv"])]
    return paths
