"""Plots are valid PNGs with titled, labelled axes; the Pareto front on a planted set."""

import csv
import warnings

import numpy as np
import pytest

from util.diagnostics import JsdStep, JsdTrace, LayerTrace
from util.pareto import (markdown_table, pareto_figure, pareto_front, pareto_mask,
                         write_pareto_report)
from util.plots import (PLOT_FILES, calibration_figure, exit_histogram_figure, jsd_heatmap_figure,
                        plot_all, rank_figure, static_exit_figure, tick_step)

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def synthetic_trace(num_layers=5, num_tokens=12, tokens=False, seed=0):
    """Ranks fall and agreement rises with depth; the last layer is the reference."""
    rng = np.random.default_rng(seed)
    ranks, confs, maxps, agrees, exits = [], [], [], [], []
    for _ in range(num_tokens):
        r = [0 if (l == num_layers or rng.uniform() < l / num_layers) else int(rng.integers(1, 500))
             for l in range(1, num_layers + 1)]
        c = [float(np.clip(l / num_layers + rng.normal(0, 0.1), 0, 1)) for l in range(1, num_layers + 1)]
        c[-1] = float("nan")  # undefined at the last layer
        ranks.append(r)
        confs.append(c)
        maxps.append([min(1.0, x + 0.05) if x == x else 0.9 for x in c])
        agrees.append([x == 0 for x in r])
        exits.append(int(rng.integers(1, num_layers + 1)))
    toks = [f"tok{i}" for i in range(num_tokens)] if tokens else None
    return LayerTrace(ranks, confs, maxps, agrees, exits, num_layers, tokens=toks)


def synthetic_jsd(num_layers=5, num_tokens=12):
    rng = np.random.default_rng(1)
    steps = []
    for _ in range(num_tokens):
        d = {l: float(rng.uniform(0, 0.5)) for l in range(1, num_layers - 1)}
        steps.append(JsdStep(d, chosen=max(d, key=d.get), expert_layer=num_layers))
    return JsdTrace(steps)


def assert_png(path):
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE, f"{path} is not a PNG"
    assert len(data) > 5_000, f"{path} is suspiciously small ({len(data)} bytes)"


def assert_labelled(fig):
    for ax in fig.axes:
        if ax.get_label() == "<colorbar>":
            continue
        assert ax.get_title(), "axes without a title"
        assert ax.get_xlabel() and ax.get_ylabel(), "axes without axis labels"


# --- Figures --------------------------------------------------------------------------------


def test_figures_are_titled_and_labelled():
    t = synthetic_trace()
    for fig in (rank_figure(t, "run"), calibration_figure(t, run_name="run"),
                static_exit_figure({1: 0.2, 2: 0.5, 3: 0.6}, "F1"), exit_histogram_figure(t),
                jsd_heatmap_figure(synthetic_jsd())):
        assert_labelled(fig)
    assert "run" in rank_figure(t, "run").axes[0].get_title()
    assert rank_figure(t).axes[0].get_yscale() == "log"
    assert "ECE" in calibration_figure(t).axes[1].get_title()


def test_plot_all_writes_pngs(tmp_path):
    t = synthetic_trace(tokens=True)
    paths = plot_all(t, tmp_path / "plots" / "run", static_metric={"1": 0.3, "2": 0.4, "5": 0.7},
                     jsd_trace=synthetic_jsd(), run_name="run", metric_name="F1")
    assert [p.name for p in paths] == list(PLOT_FILES.values())
    for p in paths:
        assert_png(p)


def test_plot_all_partial_inputs(tmp_path):
    paths = plot_all(None, tmp_path, static_metric={1: 0.1, 2: 0.2})
    assert [p.name for p in paths] == [PLOT_FILES["static_exit"]]
    with pytest.raises(ValueError, match="nothing to plot"):
        plot_all(None, tmp_path)


@pytest.mark.parametrize("num_layers", [1, 3, 48])
def test_any_number_of_layers(num_layers):
    t = synthetic_trace(num_layers=num_layers, num_tokens=6)
    fig = rank_figure(t)
    ticks = [int(x) for x in fig.axes[0].get_xticks()]
    labels = [lab.get_text() for lab in fig.axes[0].get_xticklabels()]
    assert ticks[0] == 1 and ticks[-1] == num_layers and len(ticks) <= 26
    assert labels == [str(x) for x in ticks]  # labels follow thinned ticks
    calibration_figure(t)
    exit_histogram_figure(t)


def test_many_tokens_thin_labels_and_cap():
    n = 500
    steps = [JsdStep({1: 0.1, 2: 0.2}, 2, 3) for _ in range(n)]
    fig = jsd_heatmap_figure(JsdTrace(steps, tokens=[f"w{i}" for i in range(n)]), max_tokens=200)
    ax = fig.axes[0]
    assert len(ax.get_xticklabels()) <= 40
    assert "first 200 of 500" in ax.get_title()
    assert tick_step(10) == 1 and tick_step(400) == 10


def test_bad_inputs():
    empty = LayerTrace([], [], [], [], [], num_layers=3)
    with pytest.raises(ValueError, match="no tokens"):
        rank_figure(empty)
    with pytest.raises(ValueError, match="static_metric"):
        static_exit_figure({})
    with pytest.raises(ValueError, match="no steps"):
        jsd_heatmap_figure(JsdTrace([]))
    with pytest.raises(ValueError, match="tokens has 1"):
        jsd_heatmap_figure(synthetic_jsd(num_tokens=2), tokens=["a"])


# --- Pareto ---------------------------------------------------------------------------------


def planted_rows():
    # (f1, block_avg): A(0.5, 2) B(0.7, 4) C(0.6, 5: dominated by B) D(0.9, 8) E(0.9, 9: dominated
    # by D) F(0.4, 3: dominated by A); G lacks f1 and is never on the front.
    pts = {"A": (0.5, 2), "B": (0.7, 4), "C": (0.6, 5), "D": (0.9, 8), "E": (0.9, 9), "F": (0.4, 3)}
    rows = [{"name": k, "f1": q, "block_avg": c, "flops": c * 10.0, "wall_time": 1.0}
            for k, (q, c) in pts.items()]
    rows.append({"name": "G", "f1": float("nan"), "block_avg": 1, "flops": 10.0, "wall_time": 1.0})
    return rows


def test_pareto_front_planted():
    rows = planted_rows()
    assert [r["name"] for r in pareto_front(rows, "f1", "block_avg")] == ["A", "B", "D"]
    assert pareto_mask(rows, "f1", "block_avg") == [True, True, False, True, False, False, False]
    # Equal wall time: only the best quality survives; D and E tie exactly, so both stay.
    assert [r["name"] for r in pareto_front(rows, "f1", "wall_time")] == ["D", "E"]
    # Identical points do not dominate each other.
    twins = [{"q": 1, "c": 1}, {"q": 1, "c": 1}]
    assert pareto_mask(twins, "q", "c") == [True, True]
    with pytest.raises(ValueError, match="not a number"):
        pareto_mask([{"q": "high", "c": 1}], "q", "c")


def test_pareto_report(tmp_path):
    rows = planted_rows()
    paths = write_pareto_report(rows, tmp_path, "f1", label_keys=("name",))
    names = [p.name for p in paths]
    assert names == ["sweep.csv", "sweep.md", "pareto_f1_vs_block_avg.png",
                     "pareto_f1_vs_flops.png", "pareto_f1_vs_wall_time.png"]
    for p in paths[2:]:
        assert_png(p)
    with (tmp_path / "sweep.csv").open(newline="") as f:
        table = list(csv.DictReader(f))
    assert [r["pareto_block_avg"] for r in table] == ["True", "True", "False", "True", "False",
                                                       "False", "False"]
    md = (tmp_path / "sweep.md").read_text().splitlines()
    assert md[0].startswith("| name | f1 | block_avg") and len(md) == 2 + len(rows)


def test_pareto_report_skips_missing_cost(tmp_path):
    rows = [{k: v for k, v in r.items() if k != "flops"} for r in planted_rows()]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        paths = write_pareto_report(rows, tmp_path, "f1")
    assert any("flops" in str(w.message) for w in caught)
    assert not any("flops" in p.name for p in paths)
    with pytest.raises(ValueError, match="quality column"):
        write_pareto_report(rows, tmp_path, "bleu")


def test_pareto_figure_labelled():
    fig = pareto_figure(planted_rows(), "f1", "flops", label_keys=("name",))
    assert_labelled(fig)
    assert "FLOPs" in fig.axes[0].get_xlabel()
    assert markdown_table([{"a": 1.234567, "b": "x|y"}]).splitlines()[2] == "| 1.235 | x\\|y |"
