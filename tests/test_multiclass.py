"""Metrics, intervals, plots and tables for more than two classes (issue 13: "your own classes").

Reference values come from hand-counted confusion matrices, a brute-force pairwise AUC, or scikit-learn — never
from the code under test. Everything is seeded.
"""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest

from covid_cls import plots
from covid_cls.metrics import (
    _multiclass_resampled,
    binary_metrics,
    bootstrap_indices,
    clean,
    metrics_for,
    multiclass_metrics,
    roc_per_class,
    split_report,
)
from covid_cls.report import metrics_line, metrics_rows, per_class_lines, threshold_text

NAMES = ["covid", "normal", "pneumonia"]


def brute_auc(y: np.ndarray, s: np.ndarray) -> float:
    """P(score of a positive > score of a negative), ties one half, over every pair."""
    pairs = [1.0 if p > n else 0.5 if p == n else 0.0 for p, n in itertools.product(s[y], s[~y])]
    return float(np.mean(pairs))


def noisy_probs(n: int, c: int, seed: int, signal: float = 1.5) -> tuple[np.ndarray, np.ndarray]:
    """Softmax of Gaussian logits with ``signal`` added to the true class: an imperfect classifier."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, c, n)
    z = rng.normal(size=(n, c))
    z[np.arange(n), y] += signal
    p = np.exp(z)
    return p / p.sum(axis=1, keepdims=True), y


def from_predictions(pred: list[int], c: int) -> np.ndarray:
    """0.6 on the predicted class, the rest shared equally: argmax = ``pred``."""
    p = np.full((len(pred), c), 0.4 / (c - 1))
    p[np.arange(len(pred)), pred] = 0.6
    return p


def test_perfectly_separable_three_classes_score_one_with_a_diagonal_confusion():
    y = np.repeat([0, 1, 2], [4, 5, 6])
    probs = np.eye(3)[y] * 0.8 + 0.2 / 3
    m = multiclass_metrics(probs, y, NAMES)
    assert m["auc"] == 1.0 and m["accuracy"] == 1.0
    assert m["sensitivity"] == m["specificity"] == m["precision"] == m["f1"] == 1.0
    assert m["confusion"] == [[4, 0, 0], [0, 5, 0], [0, 0, 6]]
    assert list(m["per_class"]) == NAMES and [pc["n"] for pc in m["per_class"].values()] == [4, 5, 6]
    assert all(pc["auc"] == 1.0 for pc in m["per_class"].values())


def test_hand_counted_example():
    labels = np.array([0, 0, 0, 1, 1, 2, 2, 2])
    pred = [0, 0, 1, 1, 2, 2, 2, 0]
    probs = from_predictions(pred, 3)
    m = multiclass_metrics(probs, labels, NAMES)
    # counted by hand: rows = true class, columns = predicted
    assert m["confusion"] == [[2, 1, 0], [0, 1, 1], [1, 0, 2]]
    # one-vs-rest, 8 images: covid tp 2 fn 1 fp 1 tn 4; normal tp 1 fn 1 fp 1 tn 5; pneumonia tp 2 fn 1 fp 1 tn 4
    expected = {"covid": (2 / 3, 4 / 5, 2 / 3, 4 / 6, 3),
                "normal": (1 / 2, 5 / 6, 1 / 2, 2 / 4, 2),
                "pneumonia": (2 / 3, 4 / 5, 2 / 3, 4 / 6, 3)}
    for name, (sens, spec, prec, f1, n) in expected.items():
        pc = m["per_class"][name]
        assert pc["sensitivity"] == pytest.approx(sens) and pc["specificity"] == pytest.approx(spec), name
        assert pc["precision"] == pytest.approx(prec) and pc["f1"] == pytest.approx(f1) and pc["n"] == n, name
    assert m["accuracy"] == pytest.approx(5 / 8)
    assert m["sensitivity"] == pytest.approx((2 / 3 + 1 / 2 + 2 / 3) / 3)
    assert m["specificity"] == pytest.approx((4 / 5 + 5 / 6 + 4 / 5) / 3)
    # covid one-vs-rest scores: positives 0.6 0.6 0.2, negatives 0.2 0.2 0.2 0.2 0.6 -> (8 + 1 + 2) / 15
    assert m["per_class"]["covid"]["auc"] == pytest.approx(11 / 15)
    for k, name in enumerate(NAMES):
        assert m["per_class"][name]["auc"] == pytest.approx(brute_auc(labels == k, probs[:, k]))
    assert m["auc"] == pytest.approx(np.mean([brute_auc(labels == k, probs[:, k]) for k in range(3)]))


def test_two_classes_keep_the_binary_numbers_and_more_get_per_class():
    probs, y = noisy_probs(200, 2, seed=1)
    for positive in (0, 1):
        assert metrics_for(probs, y, positive) == binary_metrics(probs, y, positive)
    probs3, y3 = noisy_probs(200, 3, seed=1)
    m = metrics_for(probs3, y3, classes=NAMES)
    assert list(m["per_class"]) == NAMES and np.asarray(m["confusion"]).shape == (3, 3)
    assert list(multiclass_metrics(probs3, y3)["per_class"]) == ["0", "1", "2"]  # no names: indices


def test_binary_split_report_ignores_class_names():
    probs, y = noisy_probs(120, 2, seed=2)
    a = split_report(probs, y, 0, 0.4, n_boot=200, seed=3)
    b = split_report(probs, y, 0, 0.4, n_boot=200, seed=3, classes=["infected", "normal"])
    assert a == b and "per_class" not in a


def test_macro_metrics_match_scikit_learn():
    skm = pytest.importorskip("sklearn.metrics")
    for c, seed in ((3, 0), (5, 1), (12, 2)):
        probs, y = noisy_probs(400, c, seed)
        pred = probs.argmax(axis=1)
        m = multiclass_metrics(probs, y)
        assert m["auc"] == pytest.approx(skm.roc_auc_score(y, probs, multi_class="ovr", average="macro"))
        for k in range(c):
            assert m["per_class"][str(k)]["auc"] == pytest.approx(skm.roc_auc_score(y == k, probs[:, k]))
        assert m["confusion"] == skm.confusion_matrix(y, pred, labels=range(c)).tolist()
        assert m["sensitivity"] == pytest.approx(skm.recall_score(y, pred, average="macro"))
        assert m["f1"] == pytest.approx(skm.f1_score(y, pred, average="macro"))
        assert m["accuracy"] == pytest.approx(skm.accuracy_score(y, pred))


def test_a_class_that_is_never_predicted_lowers_macro_precision_and_f1():
    skm = pytest.importorskip("sklearn.metrics")
    labels = np.array([0, 0, 1, 1, 2, 2])
    pred = [0, 0, 1, 1, 1, 0]  # pneumonia occurs twice and is never predicted
    m = multiclass_metrics(from_predictions(pred, 3), labels, NAMES)
    assert math.isnan(m["per_class"]["pneumonia"]["precision"]) and m["per_class"]["pneumonia"]["f1"] == 0.0
    assert m["precision"] == pytest.approx(skm.precision_score(labels, pred, average="macro", zero_division=0))
    assert m["f1"] == pytest.approx(skm.f1_score(labels, pred, average="macro", zero_division=0))


def test_a_class_absent_from_the_labels_has_nan_auc_and_is_left_out_of_the_macro_mean():
    probs, y = noisy_probs(300, 3, seed=4)
    keep = y != 1
    probs, y = probs[keep], y[keep]
    m = multiclass_metrics(probs, y, NAMES)
    assert math.isnan(m["per_class"]["normal"]["auc"]) and m["per_class"]["normal"]["n"] == 0
    assert math.isnan(m["per_class"]["normal"]["sensitivity"])
    aucs = [brute_auc(y == k, probs[:, k]) for k in (0, 2)]
    assert m["auc"] == pytest.approx(np.mean(aucs))
    pred = probs.argmax(axis=1)
    assert m["sensitivity"] == pytest.approx(np.mean([(pred[y == k] == k).mean() for k in (0, 2)]))
    assert clean(m)["per_class"]["normal"]["auc"] is None
    assert set(roc_per_class(probs, y, NAMES)) == {"covid", "pneumonia"}
    r = split_report(probs, y, n_boot=200, classes=NAMES)
    assert r["ci"]["auc"][0] <= m["auc"] <= r["ci"]["auc"][1]
    assert all(math.isnan(v) for v in r["per_class"]["normal"]["ci"]["auc"])


def test_vectorised_resampled_metrics_equal_the_plain_ones():
    probs, y = noisy_probs(150, 4, seed=5)
    m = multiclass_metrics(probs, y)
    whole = _multiclass_resampled(probs, y, np.arange(len(y))[None, :])
    for k in ("auc", "sensitivity", "specificity", "precision", "f1", "ece"):
        assert whole[k][0] == pytest.approx(m[k], abs=1e-12), k
    idx = bootstrap_indices(y, 30, seed=1, by_class=True)
    boot = _multiclass_resampled(probs, y, idx)
    for r in (0, 17):
        again = multiclass_metrics(probs[idx[r]], y[idx[r]])
        assert boot["auc"][r] == pytest.approx(again["auc"], abs=1e-12)
        assert boot["f1"][r] == pytest.approx(again["f1"], abs=1e-12)
        assert boot["ece"][r] == pytest.approx(again["ece"], abs=1e-12)


def test_class_stratified_resamples_keep_every_class_count_and_are_seeded():
    y = np.repeat([0, 1, 2, 3], [5, 20, 40, 35])
    idx = bootstrap_indices(y, 50, seed=7, by_class=True)
    counts = np.stack([np.bincount(y[r], minlength=4) for r in idx])
    assert (counts == [5, 20, 40, 35]).all()
    assert (bootstrap_indices(y, 50, seed=7, by_class=True) == idx).all()


def test_split_report_intervals_contain_the_estimates_and_narrow_with_more_images():
    def report(n, seed):
        probs, y = noisy_probs(n, 3, seed, signal=1.0)
        return split_report(probs, y, positive=0, threshold=0.3, n_boot=1000, seed=seed, classes=NAMES)

    r = report(150, 0)
    assert r["threshold"] is None and set(r["ci"]) == {"auc", "sensitivity", "specificity", "f1", "ece"}
    for key, (lo, hi) in r["ci"].items():
        assert lo <= r[key] <= hi, key
    for name, pc in r["per_class"].items():
        assert pc["ci"]["auc"][0] <= pc["auc"] <= pc["ci"]["auc"][1], name
    assert report(150, 0) == r  # seeded

    def mean_width(n):
        return np.mean([np.diff(report(n, s)["ci"]["auc"])[0] for s in range(3)])
    assert mean_width(1200) < 0.7 * mean_width(150)  # expected ratio ~ sqrt(150 / 1200) = 0.35


def test_roc_per_class_curves_run_from_origin_to_corner():
    probs, y = noisy_probs(200, 3, seed=6)
    curves = roc_per_class(probs, y, NAMES, max_points=21)
    assert list(curves) == NAMES
    for pts in curves.values():
        assert len(pts["fpr"]) <= 21 and pts["fpr"][0] == pts["tpr"][0] == 0.0
        assert pts["fpr"][-1] == pts["tpr"][-1] == 1.0


def test_bad_inputs_are_refused():
    probs, y = noisy_probs(20, 3, seed=7)
    with pytest.raises(ValueError, match="class names"):
        multiclass_metrics(probs, y, ["a", "b"])
    with pytest.raises(ValueError, match="class names"):
        multiclass_metrics(probs, y, ["a", "a", "b"])
    with pytest.raises(ValueError, match="labels"):
        multiclass_metrics(probs, np.where(y == 0, 3, y))
    with pytest.raises(ValueError, match="one row per label"):
        multiclass_metrics(probs[:5], y)


def test_confusion_plot_draws_any_number_of_named_classes():
    cm = [[5, 1, 0], [2, 7, 1], [0, 3, 9]]
    fig = plots.confusion(cm, "test", classes=NAMES)
    ax = fig.axes[0]
    assert len(ax.texts) == 9 and sorted(int(t.get_text()) for t in ax.texts) == sorted(sum(cm, []))
    assert [t.get_text() for t in ax.get_xticklabels()] == NAMES
    assert [t.get_text() for t in ax.get_yticklabels()] == NAMES
    binary = plots.confusion([[3, 1], [2, 4]]).axes[0]  # old callers: no names, the binary classes
    assert [t.get_text() for t in binary.get_yticklabels()] == ["infected", "normal"]
    big = plots.confusion(np.arange(400).reshape(20, 20), classes=[f"class {i}" for i in range(20)]).axes[0]
    assert len(big.texts) == 400 and len(big.get_xticklabels()) == 20
    for f in (fig, binary.figure, big.figure):
        plots.plt.close(f)


def test_one_vs_rest_roc_plot_has_one_curve_per_class_and_its_title():
    probs, y = noisy_probs(200, 3, seed=8)
    m = multiclass_metrics(probs, y, NAMES)
    fig = plots.roc_one_vs_rest(roc_per_class(probs, y, NAMES), m["per_class"])
    ax = fig.axes[0]
    assert "infected" not in ax.get_title() and len(ax.lines) == 3 + 1  # + the chance diagonal
    assert [t.get_text() for t in ax.get_legend().get_texts()] == [
        f"{n} (AUC {m['per_class'][n]['auc']:.3f})" for n in NAMES]
    plots.plt.close(fig)


def test_tables_and_lines_label_macro_numbers_and_list_each_class():
    probs, y = noisy_probs(150, 3, seed=9)
    r = clean(split_report(probs, y, n_boot=200, classes=NAMES))
    rows = metrics_rows({"test": r}, ("test",))
    assert [row[0] for row in rows] == ["test (macro)", "test · covid", "test · normal", "test · pneumonia"]
    assert len({len(row) for row in rows}) == 1
    covid = r["per_class"]["covid"]
    assert rows[1][1] == f"{covid['auc']:.3f} [{covid['ci']['auc'][0]:.3f}, {covid['ci']['auc'][1]:.3f}]"
    assert rows[1][2:5] == [f"{covid[k]:.3f}" for k in ("sensitivity", "specificity", "f1")]
    assert rows[1][-1] == covid["n"]
    line = metrics_line(r)
    assert "macro AUC" in line and "macro sens" in line and "macro ECE" not in line
    assert [ln.split(":")[0] for ln in per_class_lines(r)] == NAMES
    assert threshold_text(None, n_classes=3) == "most probable of 3 classes (argmax)"


def test_binary_tables_are_unchanged():
    probs, y = noisy_probs(120, 2, seed=10)
    r = clean(split_report(probs, y, n_boot=200))
    [row] = metrics_rows({"test": r}, ("test",))
    assert row[0] == "test" and row[-1] == 120
    assert "macro" not in metrics_line(r) and per_class_lines(r) == []
    assert threshold_text(None) == "most probable class (argmax, P = 0.5)"


def test_a_split_of_one_class_gets_a_wilson_interval_for_the_rate_it_can_measure():
    """Normal X-rays only: specificity is measured, with an interval that does not collapse at 1.0 (a percentile
    bootstrap of 8 of 8 would say [1, 1]); AUC and sensitivity stay undefined."""
    from covid_cls.metrics import split_report, wilson_interval

    probs = np.array([[0.2, 0.8]] * 8)
    r = split_report(probs, np.ones(8, int), positive=0, threshold=0.5, n_boot=200)
    assert r["specificity"] == 1.0 and np.isnan(r["auc"]) and np.isnan(r["sensitivity"])
    lo, hi = r["ci"]["specificity"]
    assert hi == 1.0 and 0.6 < lo < 0.7 and "Wilson" in r["ci_note"]   # 8/8: [0.676, 1]
    # by its definition: the p whose score test just rejects, |k/n - p| = z sqrt(p (1 - p) / n), found numerically
    from scipy.optimize import brentq

    k, n, z = 81, 263, 1.959964
    f = lambda q: abs(k / n - q) - z * np.sqrt(q * (1 - q) / n)   # noqa: E731
    assert np.allclose(wilson_interval(k, n), (brentq(f, 1e-9, k / n), brentq(f, k / n, 1 - 1e-9)), atol=1e-9)


def test_the_paired_macro_auc_test_finds_a_planted_difference_and_not_a_null_one():
    """Compare for more than two classes: macro one-vs-rest AUC of A against B on the same images."""
    from covid_cls.metrics import multiclass_metrics, paired_macro_auc_test

    rng = np.random.default_rng(5)
    labels = np.repeat(np.arange(3), 60)
    onehot = np.eye(3)[labels]

    def model(signal):   # probabilities that lean towards the true class by ``signal``
        logits = signal * onehot + rng.normal(0, 1, onehot.shape)
        return np.exp(logits) / np.exp(logits).sum(1, keepdims=True)

    good, poor = model(2.5), model(0.6)
    r = paired_macro_auc_test(labels, good, poor, n_boot=500)
    assert r["auc_a"] == pytest.approx(multiclass_metrics(good, labels)["auc"]) and r["diff"] > 0
    assert r["p_value"] < 0.001 and 0 < r["ci_low"] < r["diff"] < r["ci_high"]
    same = paired_macro_auc_test(labels, good, good, n_boot=200)
    assert same["diff"] == 0 and same["p_value"] == 1.0
    # nulls: two equally good models from the same generator are rarely called different
    calls = [paired_macro_auc_test(labels, model(1.0), model(1.0), n_boot=200, seed=k)["p_value"] < 0.05
             for k in range(20)]
    assert sum(calls) <= 4
