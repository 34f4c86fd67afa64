"""PNG plots of decoding traces (see util.diagnostics for the data).

Every ``*_figure`` function builds and returns a matplotlib Figure (so tests can inspect titles
and labels); ``save_figure`` writes it as PNG with the Agg canvas, without touching pyplot's
global state. ``plot_all`` writes every plot the given data allows and returns the paths.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import List, Mapping, Optional, Sequence, Union

import numpy as np
from matplotlib import colormaps
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from util.diagnostics import (JsdTrace, LayerTrace, exit_histogram, layer_summary,
                              ece_of_bins, normalise_static_metric, reliability_bins)

PathLike = Union[str, Path]

MAX_TICK_LABELS = 40  # beyond this, labels overlap at the default font size
DPI = 120


# ---------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------


def new_figure(width: float = 8.0, height: float = 5.0, ncols: int = 1):
    """A Figure with an Agg canvas and ``ncols`` axes side by side."""
    fig = Figure(figsize=(width, height), dpi=DPI)
    FigureCanvasAgg(fig)
    axes = [fig.add_subplot(1, ncols, i + 1) for i in range(ncols)]
    return fig, axes


def save_figure(fig: Figure, path: PathLike) -> Path:
    """Write ``fig`` as PNG, creating parent folders."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png", dpi=DPI, bbox_inches="tight")
    return path


def tick_step(n: int, max_labels: int = MAX_TICK_LABELS) -> int:
    """Stride so that at most ``max_labels`` of ``n`` positions get a label."""
    return max(1, math.ceil(n / max_labels))


def _layer_ticks(ax, layers: Sequence[int]) -> None:
    """Integer layer ticks, thinned for deep models (always keeping the last layer)."""
    layers = list(layers)
    if not layers:
        return
    step = tick_step(len(layers), 25)
    shown = layers[::step]
    if shown[-1] != layers[-1]:
        if step > 1 and len(shown) > 1 and layers[-1] - shown[-1] < step:
            shown.pop()  # the last layer's label would collide with its neighbour's
        shown.append(layers[-1])
    # Labels are set explicitly: boxplot installs its own 1..n labels that would not follow.
    ax.set_xticks(shown, labels=[str(v) for v in shown])


def _token_labels(tokens: Optional[Sequence[str]], n: int) -> List[str]:
    """Token strings shortened for labels, or indices when no tokens are given."""
    if tokens is None:
        return [str(i) for i in range(n)]
    if len(tokens) != n:
        raise ValueError(f"tokens has {len(tokens)} entries, expected {n}")
    out = []
    for i, s in enumerate(tokens):
        s = repr(s)[1:-1]  # makes whitespace and control characters visible
        s = s if len(s) <= 12 else s[:11] + "…"
        out.append(f"{i}:{s}")
    return out


def _require_tokens(trace: LayerTrace, what: str) -> None:
    if trace.num_tokens == 0:
        raise ValueError(f"trace has no tokens; cannot plot {what}")


# ---------------------------------------------------------------------------
# Figures
# ---------------------------------------------------------------------------


def rank_figure(trace: LayerTrace, run_name: str = "") -> Figure:
    """Box plot per layer of rank+1 of the final prediction, on a log y axis."""
    _require_tokens(trace, "ranks")
    ranks = np.asarray(trace.ranks, dtype=float) + 1.0
    layers = list(range(1, trace.num_layers + 1))
    fig, (ax,) = new_figure(max(6.0, 0.3 * trace.num_layers + 2), 5.0)
    ax.boxplot([ranks[:, j] for j in range(trace.num_layers)], positions=layers, widths=0.6,
               whis=(5, 95), showfliers=True,
               flierprops={"marker": ".", "markersize": 3, "alpha": 0.4},
               medianprops={"color": "tab:red"})
    ax.set_yscale("log")
    ax.set_ylim(bottom=0.8)
    _layer_ticks(ax, layers)
    ax.set_xlabel("decoder layer")
    ax.set_ylabel("rank of final prediction + 1 (log; 1 = top)")
    ax.set_title(_title("Rank of the final prediction per layer", run_name)
                 + f"\n{trace.num_tokens} tokens; boxes: quartiles, whiskers: 5th-95th percentile")
    ax.grid(axis="y", which="major", alpha=0.3)
    return fig


def calibration_figure(trace: LayerTrace, n_bins: int = 10, run_name: str = "") -> Figure:
    """Left: mean confidence, accuracy (agreement) and ECE per layer.
    Right: reliability diagram of all layers' (confidence, agreement) pairs."""
    _require_tokens(trace, "calibration")
    rows = layer_summary(trace, n_bins)
    layers = [r["layer"] for r in rows]
    fig, (ax, rel) = new_figure(min(16.0, max(12.0, 0.2 * trace.num_layers + 7)), 5.0, ncols=2)

    ax.plot(layers, [r["mean_confidence"] for r in rows], "o-", label="mean exit confidence")
    ax.plot(layers, [r["accuracy"] for r in rows], "s-", label="accuracy (agrees with final)")
    ax.plot(layers, [r["mean_max_prob"] for r in rows], ":", color="grey", label="mean max prob")
    ax.bar(layers, [0 if math.isnan(r["ece"]) else r["ece"] for r in rows], width=0.6,
           color="tab:red", alpha=0.3, label=f"ECE ({n_bins} bins)")
    ax.set_ylim(0, 1.05)
    _layer_ticks(ax, layers)
    ax.set_xlabel("decoder layer")
    ax.set_ylabel("confidence / accuracy / ECE")
    ax.set_title(_title("Confidence and accuracy per layer", run_name))
    ax.legend(loc="best", fontsize="small")
    ax.grid(alpha=0.3)

    bins = reliability_bins(trace.confidences, trace.agrees, n_bins)
    centres = [(b["lower"] + b["upper"]) / 2 for b in bins]
    acc = [0 if b["count"] == 0 else b["accuracy"] for b in bins]
    rel.bar(centres, acc, width=1.0 / n_bins, edgecolor="black", alpha=0.7, label="accuracy in bin")
    rel.plot([0, 1], [0, 1], "--", color="black", label="perfect calibration")
    rel.plot([b["confidence"] for b in bins if b["count"]],
             [b["accuracy"] for b in bins if b["count"]], "o", color="tab:red",
             label="(mean confidence, accuracy)")
    # Pair counts in a row just above the axes, where they cannot hide bars or points.
    top = rel.get_xaxis_transform()
    for c, b in zip(centres, bins):
        rel.text(c, 1.01, str(b["count"]), transform=top, ha="center", va="bottom",
                 fontsize="x-small", color="dimgrey")
    rel.set_xlim(0, 1)
    rel.set_ylim(0, 1.05)
    rel.set_xlabel("exit confidence (bins of width %g; numbers on top: pairs per bin)" % (1.0 / n_bins))
    rel.set_ylabel("accuracy (agrees with final)")
    ece = ece_of_bins(bins)  # the pooled ECE, from the bins drawn above
    ece_s = "n/a" if math.isnan(ece) else f"{ece:.3f}"
    rel.set_title(f"Reliability, all layers pooled (ECE = {ece_s})", pad=16)
    rel.legend(loc="upper left", fontsize="small")
    fig.tight_layout()
    return fig


def static_exit_figure(static_metric: Mapping, metric_name: str = "metric",
                       num_layers: Optional[int] = None, run_name: str = "") -> Figure:
    """Task metric of a static exit at each layer, best layer marked."""
    m = normalise_static_metric(static_metric)
    layers, vals = list(m), list(m.values())
    fig, (ax,) = new_figure(max(6.0, 0.25 * len(layers) + 3), 4.5)
    ax.plot(layers, vals, "o-")
    finite = [(v, layer) for layer, v in m.items() if not math.isnan(v)]
    if finite:
        best_v, best_l = max(finite)
        ax.plot([best_l], [best_v], "*", color="tab:red", markersize=14,
                label=f"best: layer {best_l} ({best_v:.4g})")
        ax.legend(loc="lower right")
    if num_layers is not None:
        ax.set_xlim(0.5, num_layers + 0.5)
    _layer_ticks(ax, layers)
    ax.set_xlabel("static exit layer")
    ax.set_ylabel(metric_name)
    ax.set_title(_title(f"{metric_name} of a static exit at each layer", run_name))
    ax.grid(alpha=0.3)
    return fig


def exit_histogram_figure(trace: LayerTrace, run_name: str = "") -> Figure:
    """Number of tokens exiting at each layer, with the mean exit layer."""
    _require_tokens(trace, "exit layers")
    counts = exit_histogram(trace)
    layers = list(range(1, trace.num_layers + 1))
    fig, (ax,) = new_figure(max(6.0, 0.25 * trace.num_layers + 3), 4.5)
    ax.bar(layers, counts, width=0.8, edgecolor="black", linewidth=0.6)
    mean = float(np.mean(trace.exit_layers))
    ax.axvline(mean, color="tab:red", linestyle="--", label=f"mean exit layer {mean:.2f}")
    ax.set_xlim(0.4, trace.num_layers + 0.6)
    _layer_ticks(ax, layers)
    ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("exit layer")
    ax.set_ylabel("tokens")
    ax.set_title(_title("Exit layers", run_name) + f" ({trace.num_tokens} tokens)")
    ax.legend(loc="upper left")
    return fig


def jsd_heatmap_figure(jsd_trace: JsdTrace, tokens: Optional[Sequence[str]] = None,
                       run_name: str = "", max_tokens: int = 200) -> Figure:
    """Heat map of discounted JSD: tokens on x, candidate layers on y; chosen layer circled.

    Only the first ``max_tokens`` tokens are drawn: beyond that the cells are too thin to read.
    """
    if not jsd_trace.steps:
        raise ValueError("jsd_trace has no steps; cannot plot a heat map")
    if max_tokens < 1:
        raise ValueError(f"max_tokens must be >= 1, got {max_tokens}")
    layers, m, chosen = jsd_trace.matrix()
    if not layers:
        raise ValueError("jsd_trace has no candidate layers; cannot plot a heat map")
    n_all = len(jsd_trace.steps)
    tokens = tokens if tokens is not None else jsd_trace.tokens
    labels = _token_labels(tokens, n_all)
    n_tok = min(n_all, max_tokens)
    m, chosen, labels = m[:n_tok], chosen[:n_tok], labels[:n_tok]

    fig, (ax,) = new_figure(min(22.0, max(7.0, 0.1 * n_tok + 4)),
                            min(12.0, max(4.5, 0.3 * len(layers) + 3)))
    masked = np.ma.masked_invalid(m.T)  # rows: layers, columns: tokens
    cmap = colormaps["viridis"].with_extremes(bad="lightgrey")  # grey: not a candidate
    im = ax.imshow(masked, aspect="auto", origin="lower", cmap=cmap, interpolation="nearest")
    row = {layer: i for i, layer in enumerate(layers)}
    xs = [t for t, c in enumerate(chosen) if c in row]
    # Marker shrinks with the number of tokens so it stays inside its cell.
    size = float(np.clip(3000.0 / n_tok, 6, 40))
    ax.scatter(xs, [row[chosen[t]] for t in xs], marker="o", s=size, facecolors="none",
               edgecolors="red", linewidths=1.2)
    step = tick_step(n_tok)
    ax.set_xticks(range(0, n_tok, step))
    ax.set_xticklabels(labels[::step], rotation=90 if tokens is not None else 0, fontsize="small")
    lstep = tick_step(len(layers), 25)
    ax.set_yticks(range(0, len(layers), lstep))
    ax.set_yticklabels([str(layer) for layer in layers[::lstep]])
    ax.set_xlabel("generated token (index:text)" if tokens is not None else "generated token index")
    ax.set_ylabel("candidate amateur layer")
    experts = sorted({s.expert_layer for s in jsd_trace.steps[:n_tok]})
    expert_s = str(experts[0]) if len(experts) == 1 else f"{experts[0]}-{experts[-1]}"
    shown = f"first {n_tok} of {n_all} tokens" if n_tok < n_all else f"{n_all} tokens"
    ax.set_title(_title("Discounted JSD per token and candidate layer", run_name)
                 + f"\n{shown}; expert layer {expert_s}; red circle: chosen amateur layer;"
                 " grey: not a candidate")
    fig.colorbar(im, ax=ax, label="discounted JSD", fraction=0.04, pad=0.01)
    return fig


def _title(text: str, run_name: str) -> str:
    return f"{text} — {run_name}" if run_name else text


# ---------------------------------------------------------------------------
# All plots
# ---------------------------------------------------------------------------

PLOT_FILES = {
    "ranks": "ranks_per_layer.png",
    "calibration": "calibration.png",
    "static_exit": "static_exit_metric.png",
    "exit_layers": "exit_layer_histogram.png",
    "jsd": "jsd_heatmap.png",
}


def plot_all(trace: Optional[LayerTrace], out_dir: PathLike,
             static_metric: Optional[Mapping] = None, jsd_trace: Optional[JsdTrace] = None,
             run_name: str = "", metric_name: str = "metric", n_bins: int = 10) -> List[Path]:
    """Write every plot the given data allows under ``out_dir`` (e.g. ``plots/<run_name>/``).

    trace may be None when only a JSD trace or a static metric is plotted. Returns the paths
    written, in the order of PLOT_FILES.
    """
    out = Path(out_dir)
    jobs = []
    if trace is not None and trace.num_tokens:
        jobs += [("ranks", lambda: rank_figure(trace, run_name)),
                 ("calibration", lambda: calibration_figure(trace, n_bins, run_name))]
    if static_metric is not None:
        nl = trace.num_layers if trace is not None else None
        jobs.append(("static_exit", lambda: static_exit_figure(static_metric, metric_name, nl, run_name)))
    if trace is not None and trace.num_tokens:
        jobs.append(("exit_layers", lambda: exit_histogram_figure(trace, run_name)))
    if jsd_trace is not None and jsd_trace.steps:
        jobs.append(("jsd", lambda: jsd_heatmap_figure(jsd_trace, run_name=run_name)))
    if not jobs:
        raise ValueError("nothing to plot: give a trace with tokens, a static_metric or a jsd_trace")
    return [save_figure(build(), out / PLOT_FILES[key]) for key, build in jobs]
