"""Pareto front of sweep results: maximise quality, minimise a cost.

A row is a plain dict: a quality column (e.g. ``f1``), cost columns (``block_avg``, ``flops``,
``wall_time``) and the setting columns (threshold, confidence measure, ...). Pure: no model,
no sweep; the sweep runner hands its rows to ``write_pareto_report``.
"""

from __future__ import annotations

import math
import warnings
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Union

from matplotlib.figure import Figure

from util.diagnostics import write_csv
from util.plots import new_figure, save_figure

PathLike = Union[str, Path]

DEFAULT_COSTS = ("block_avg", "flops", "wall_time")
COST_LABELS = {"block_avg": "average blocks per token", "flops": "FLOPs", "wall_time": "wall time (s)"}


def _number(row: dict, key: str) -> Optional[float]:
    """row[key] as a finite float, or None when missing, empty or NaN (the row is skipped)."""
    v = row.get(key)
    if v is None or v == "":
        return None
    try:
        v = float(v)
    except (TypeError, ValueError):
        raise ValueError(f"column {key!r} holds {row.get(key)!r}, which is not a number") from None
    return v if math.isfinite(v) else None


def pareto_mask(rows: Sequence[dict], quality_key: str, cost_key: str) -> List[bool]:
    """True for rows no other row dominates (quality >= and cost <=, one strictly).

    Rows missing either value are never on the front. Identical points are all kept.
    """
    pts = [(_number(r, quality_key), _number(r, cost_key)) for r in rows]
    mask = []
    for i, (q, c) in enumerate(pts):
        if q is None or c is None:
            mask.append(False)
            continue
        dominated = any(
            j != i and q2 is not None and c2 is not None
            and q2 >= q and c2 <= c and (q2 > q or c2 < c)
            for j, (q2, c2) in enumerate(pts))
        mask.append(not dominated)
    return mask


def pareto_front(rows: Sequence[dict], quality_key: str, cost_key: str) -> List[dict]:
    """The non-dominated rows, sorted by increasing cost."""
    front = [r for r, on in zip(rows, pareto_mask(rows, quality_key, cost_key)) if on]
    return sorted(front, key=lambda r: (_number(r, cost_key), -_number(r, quality_key)))


def _label(row: dict, label_keys: Sequence[str]) -> str:
    return ", ".join(f"{k}={_short(row[k])}" for k in label_keys if k in row)


def _short(v) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def pareto_figure(rows: Sequence[dict], quality_key: str, cost_key: str,
                  label_keys: Sequence[str] = (), title: str = "") -> Figure:
    """Scatter of all rows, front drawn as a step line; front points labelled by label_keys."""
    pts = [(_number(r, cost_key), _number(r, quality_key)) for r in rows]
    usable = [(c, q) for c, q in pts if c is not None and q is not None]
    if not usable:
        raise ValueError(f"no row has both {quality_key!r} and {cost_key!r}; nothing to plot")
    fig, (ax,) = new_figure(8.0, 5.5)
    ax.scatter([c for c, _ in usable], [q for _, q in usable], s=18, color="grey", alpha=0.6,
               label=f"all settings ({len(usable)})")
    front = pareto_front(rows, quality_key, cost_key)
    fc = [_number(r, cost_key) for r in front]
    fq = [_number(r, quality_key) for r in front]
    ax.step(fc, fq, where="post", color="tab:red", linewidth=1.5)
    ax.scatter(fc, fq, s=40, color="tab:red", zorder=3, label=f"Pareto front ({len(front)})")
    if label_keys and len(front) <= 15:  # more labels than this overlap into a blur
        # Tied points share one label, else their texts print on top of each other.
        labels: Dict[tuple, List[str]] = {}
        for r, c, q in zip(front, fc, fq):
            labels.setdefault((c, q), []).append(_label(r, label_keys))
        for (c, q), texts in labels.items():
            ax.annotate(" / ".join(texts), (c, q), textcoords="offset points", xytext=(4, -10),
                        fontsize="x-small")
    ax.set_xlabel(COST_LABELS.get(cost_key, cost_key) + " (lower is better)")
    ax.set_ylabel(f"{quality_key} (higher is better)")
    ax.set_title(title or f"{quality_key} against {COST_LABELS.get(cost_key, cost_key)}")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize="small")
    return fig


def _columns(rows: Sequence[dict], columns: Optional[Sequence[str]]) -> List[str]:
    """Given columns, or every key in first-seen order."""
    if columns is not None:
        return list(columns)
    seen: Dict[str, None] = {}
    for r in rows:
        for k in r:
            seen.setdefault(k, None)
    return list(seen)


def write_table_csv(rows: Sequence[dict], path: PathLike,
                    columns: Optional[Sequence[str]] = None) -> Path:
    """All rows as CSV; missing cells are empty."""
    cols = _columns(rows, columns)
    return write_csv(path, cols, ([r.get(k, "") for k in cols] for r in rows))


def _md_cell(v) -> str:
    if v is None:
        return ""
    if isinstance(v, float):
        return "" if math.isnan(v) else f"{v:.4g}"
    return str(v).replace("|", "\\|")


def markdown_table(rows: Sequence[dict], columns: Optional[Sequence[str]] = None) -> str:
    """GitHub Markdown table; floats to 4 significant digits."""
    cols = _columns(rows, columns)
    lines = ["| " + " | ".join(cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    lines += ["| " + " | ".join(_md_cell(r.get(k)) for k in cols) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def write_table_markdown(rows: Sequence[dict], path: PathLike,
                         columns: Optional[Sequence[str]] = None) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(markdown_table(rows, columns))
    return path


def write_pareto_report(rows: Sequence[dict], out_dir: PathLike, quality_key: str,
                        cost_keys: Sequence[str] = DEFAULT_COSTS,
                        label_keys: Sequence[str] = (), name: str = "sweep") -> List[Path]:
    """Write ``<name>.csv`` and ``<name>.md`` (all rows, plus one ``pareto_<cost>`` column per
    cost saying whether the row is on that front) and ``pareto_<quality>_vs_<cost>.png``.

    A cost column that no row has (e.g. flops when they were not counted) is skipped with a
    warning. Returns the paths written.
    """
    if not rows:
        raise ValueError("rows is empty; nothing to report")
    if not any(_number(r, quality_key) is not None for r in rows):
        raise ValueError(f"no row has a numeric quality column {quality_key!r}")
    out = Path(out_dir)
    table = [dict(r) for r in rows]
    figures = []
    for cost in cost_keys:
        if not any(_number(r, cost) is not None for r in rows):
            warnings.warn(f"no row has cost column {cost!r}; its Pareto plot is skipped")
            continue
        for r, on in zip(table, pareto_mask(rows, quality_key, cost)):
            r[f"pareto_{cost}"] = on
        figures.append((cost, pareto_figure(rows, quality_key, cost, label_keys)))
    paths = [write_table_csv(table, out / f"{name}.csv"),
             write_table_markdown(table, out / f"{name}.md")]
    for cost, fig in figures:
        paths.append(save_figure(fig, out / f"pareto_{quality_key}_vs_{cost}.png"))
    return paths
