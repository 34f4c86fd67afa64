"""Pure diagnostics: ECE, per-layer summaries, trace validation, JSON/CSV round-trips."""

import csv
import json
import math

import pytest

from util.diagnostics import (JsdStep, JsdTrace, LayerTrace, expected_calibration_error,
                              exit_histogram, layer_summary, load_json, load_jsd_csv,
                              load_layer_csv, overall_ece, reliability_bins, save_json,
                              save_jsd_csv, save_layer_csv, save_summary_csv,
                              write_trace_files)

NAN = float("nan")


def planted_trace(tokens=None):
    """3 tokens x 3 layers. The final layer is the reference: rank 0 and agreement there."""
    return LayerTrace(
        ranks=[[5, 1, 0], [0, 0, 0], [100, 2, 0]],
        confidences=[[0.1, 0.6, NAN], [0.9, 0.95, NAN], [0.2, 0.4, NAN]],
        max_probs=[[0.1, 0.5, 0.9], [0.8, 0.9, 0.95], [0.05, 0.3, 0.7]],
        agrees=[[False, False, True], [True, True, True], [False, False, True]],
        exit_layers=[3, 1, 3],
        num_layers=3,
        tokens=tokens,
    )


def same(a, b):
    """Equality that treats NaN == NaN."""
    if isinstance(a, float) and isinstance(b, float):
        return (math.isnan(a) and math.isnan(b)) or a == b
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    return a == b


def same_trace(a: LayerTrace, b: LayerTrace):
    return all(same(getattr(a, k), getattr(b, k)) for k in
               ("ranks", "confidences", "max_probs", "agrees", "exit_layers", "num_layers", "tokens"))


# --- ECE -----------------------------------------------------------------------------------


def test_ece_hand_computation():
    # 10 bins of width 0.1. Pairs (confidence, correct):
    #   bin [0.2,0.3): (0.25, 1), (0.25, 0)      -> conf 0.25, acc 0.5, |gap| 0.25, weight 2/5
    #   bin [0.8,0.9): (0.85, 1), (0.85, 1)      -> conf 0.85, acc 1.0, |gap| 0.15, weight 2/5
    #   bin [0.9,1.0]: (1.0, 0)                  -> conf 1.00, acc 0.0, |gap| 1.00, weight 1/5
    # ECE = 0.4 * 0.25 + 0.4 * 0.15 + 0.2 * 1.0 = 0.1 + 0.06 + 0.2 = 0.36
    conf = [0.25, 0.25, 0.85, 0.85, 1.0]
    correct = [1, 0, 1, 1, 0]
    assert expected_calibration_error(conf, correct) == pytest.approx(0.36)


def test_ece_hand_computation_two_bins():
    # n_bins=2: [0,0.5) holds 0.1, 0.3 (acc 0, conf 0.2); [0.5,1] holds 0.6, 0.8 (acc 1, conf 0.7).
    # ECE = 0.5 * |0 - 0.2| + 0.5 * |1 - 0.7| = 0.1 + 0.15 = 0.25
    assert expected_calibration_error([0.1, 0.3, 0.6, 0.8], [0, 0, 1, 1], n_bins=2) == pytest.approx(0.25)


def test_ece_zero_for_perfectly_calibrated_bins():
    # Bin at 0.25: 4 pairs, 1 correct (acc 0.25). Bin at 0.75: 4 pairs, 3 correct (acc 0.75).
    conf = [0.25] * 4 + [0.75] * 4
    correct = [1, 0, 0, 0] + [1, 1, 1, 0]
    assert expected_calibration_error(conf, correct) == pytest.approx(0.0, abs=1e-12)
    assert expected_calibration_error([1.0, 1.0], [True, True]) == pytest.approx(0.0)


def test_ece_ignores_nan_and_empty_is_nan():
    assert expected_calibration_error([0.25, NAN, 0.85], [1, 0, 1]) == \
        pytest.approx(expected_calibration_error([0.25, 0.85], [1, 1]))
    assert math.isnan(expected_calibration_error([NAN, NAN], [1, 0]))
    assert math.isnan(expected_calibration_error([], []))


def test_ece_bad_input():
    with pytest.raises(ValueError, match="differ in length"):
        expected_calibration_error([0.1, 0.2], [1])
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        expected_calibration_error([1.5], [1])
    with pytest.raises(ValueError, match="n_bins"):
        expected_calibration_error([0.5], [1], n_bins=0)


def test_reliability_bins_edges_and_counts():
    bins = reliability_bins([0.0, 0.1, 0.5, 1.0], [1, 0, 1, 1], n_bins=2)
    assert [b["count"] for b in bins] == [2, 2]  # 0.5 opens the upper bin, 1.0 closes it
    assert bins[0]["accuracy"] == pytest.approx(0.5)
    assert bins[1]["confidence"] == pytest.approx(0.75)
    assert math.isnan(reliability_bins([0.9], [1], n_bins=2)[0]["accuracy"])  # empty bin


# --- Summaries ------------------------------------------------------------------------------


def test_layer_summary_planted():
    rows = layer_summary(planted_trace())
    assert [r["layer"] for r in rows] == [1, 2, 3]
    assert rows[0]["accuracy"] == pytest.approx(1 / 3)
    assert rows[1]["accuracy"] == pytest.approx(1 / 3)
    assert rows[2]["accuracy"] == pytest.approx(1.0)
    assert rows[0]["top1_rate"] == pytest.approx(1 / 3)
    assert rows[0]["mean_confidence"] == pytest.approx((0.1 + 0.9 + 0.2) / 3)
    assert rows[2]["n_confidence"] == 0 and math.isnan(rows[2]["mean_confidence"])
    assert math.isnan(rows[2]["ece"])  # no defined confidence at the last layer
    # Layer 1 pairs (10 bins): (0.1, 0) (0.9, 1) (0.2, 0) -> each its own bin:
    # ECE = (0.1 + 0.1 + 0.2) / 3
    assert rows[0]["ece"] == pytest.approx(0.4 / 3)
    assert rows[0]["rank_q50"] == pytest.approx(5.0)
    assert rows[1]["rank_q50"] == pytest.approx(1.0)
    assert rows[2]["rank_q90"] == pytest.approx(0.0)
    assert rows[0]["mean_max_prob"] == pytest.approx((0.1 + 0.8 + 0.05) / 3)
    assert [r["n_exits"] for r in rows] == [1, 0, 2]
    assert exit_histogram(planted_trace()) == [1, 0, 2]


def test_overall_ece_pools_layers():
    t = planted_trace()
    flat_c = [c for row in t.confidences for c in row]
    flat_a = [a for row in t.agrees for a in row]
    assert overall_ece(t) == pytest.approx(expected_calibration_error(flat_c, flat_a))


def test_summary_any_number_of_layers():
    L = 7
    t = LayerTrace(ranks=[[0] * L], confidences=[[0.5] * L], max_probs=[[0.5] * L],
                   agrees=[[True] * L], exit_layers=[L], num_layers=L)
    assert len(layer_summary(t)) == L


def test_empty_trace_summary_is_nan():
    t = LayerTrace([], [], [], [], [], num_layers=2)
    rows = layer_summary(t)
    assert len(rows) == 2 and math.isnan(rows[0]["accuracy"]) and math.isnan(rows[0]["rank_q50"])


# --- Validation -----------------------------------------------------------------------------


def test_ragged_and_wrong_lengths_rejected():
    good = planted_trace()
    with pytest.raises(ValueError, match=r"confidences\[1\]"):
        LayerTrace(good.ranks, [[0.1, 0.2, 0.3], [0.1], [0.1, 0.2, 0.3]], good.max_probs,
                   good.agrees, good.exit_layers, 3)
    with pytest.raises(ValueError, match="agrees has 2 tokens"):
        LayerTrace(good.ranks, good.confidences, good.max_probs, good.agrees[:2], good.exit_layers, 3)
    with pytest.raises(ValueError, match="exit_layers"):
        LayerTrace(good.ranks, good.confidences, good.max_probs, good.agrees, [1, 2], 3)
    with pytest.raises(ValueError, match=r"exit_layers\[0\]=4"):
        LayerTrace(good.ranks, good.confidences, good.max_probs, good.agrees, [4, 1, 1], 3)
    with pytest.raises(ValueError, match="num_layers"):
        LayerTrace([], [], [], [], [], num_layers=0)
    with pytest.raises(ValueError, match="tokens"):
        planted_trace(tokens=["a"])
    with pytest.raises(ValueError, match="negative"):
        LayerTrace([[-1]], [[0.5]], [[0.5]], [[True]], [1], 1)


def test_jsd_step_list_form_and_matrix():
    s = JsdStep(jsd=[NAN, 0.2, 0.1, NAN], chosen=2, expert_layer=5)  # index i is layer i+1
    assert s.jsd == {2: 0.2, 3: 0.1}
    tr = JsdTrace([s, JsdStep({"1": 0.3, "2": 0.05}, chosen=1, expert_layer=4)])
    layers, m, chosen = tr.matrix()
    assert layers == [1, 2, 3]
    assert chosen == [2, 1]
    assert math.isnan(m[0, 0]) and m[0, 1] == pytest.approx(0.2) and math.isnan(m[1, 2])
    with pytest.raises(ValueError, match="jsd must be"):
        JsdStep(jsd=0.3, chosen=1, expert_layer=2)


# --- Save / load ----------------------------------------------------------------------------


@pytest.mark.parametrize("tokens", [None, ["▁the", "a,b", 'q"\n']])
def test_layer_json_and_csv_round_trip(tmp_path, tokens):
    t = planted_trace(tokens)
    p = save_json(t, tmp_path / "sub" / "trace.json")
    json.loads(p.read_text())  # strict JSON: NaN was written as null
    assert "NaN" not in p.read_text()
    assert same_trace(load_json(p), t)
    c = save_layer_csv(t, tmp_path / "trace.csv")
    with c.open(newline="") as f:
        assert len(list(csv.reader(f))) == 1 + 3 * 3  # header + token x layer rows
    assert same_trace(load_layer_csv(c), t)


def test_jsd_json_and_csv_round_trip(tmp_path):
    tr = JsdTrace([JsdStep({1: 0.3, 2: 0.1}, 1, 4), JsdStep({2: 0.2}, 2, 3)], tokens=["x", "y"])
    back = load_json(save_json(tr, tmp_path / "jsd.json"))
    assert isinstance(back, JsdTrace) and back == tr
    assert load_jsd_csv(save_jsd_csv(tr, tmp_path / "jsd.csv")) == tr


def test_load_rejects_unknown_kind(tmp_path):
    p = tmp_path / "x.json"
    p.write_text(json.dumps({"kind": "other"}))
    with pytest.raises(ValueError, match="unknown trace kind"):
        load_json(p)


def test_summary_csv(tmp_path):
    p = save_summary_csv(layer_summary(planted_trace()), tmp_path / "summary.csv")
    lines = p.read_text().splitlines()
    assert lines[0].startswith("layer,") and len(lines) == 4


def test_write_trace_files(tmp_path):
    jsd = JsdTrace([JsdStep({1: 0.3}, 1, 2)])
    paths = write_trace_files(tmp_path / "run", planted_trace(), jsd)
    assert [p.name for p in paths] == ["layer_trace.json", "layer_trace.csv", "layer_summary.csv",
                                       "jsd_trace.json", "jsd_trace.csv"]
    assert same_trace(load_json(paths[0]), planted_trace())
