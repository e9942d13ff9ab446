"""Metric definitions checked against brute force and hand-made cases."""

from __future__ import annotations

import itertools

import numpy as np
import torch

from covid_cls.metrics import binary_metrics, expected_calibration_error, fit_temperature, roc_auc, roc_curve


def brute_auc(y, s):
    pos, neg = s[y], s[~y]
    pairs = [(1.0 if p > n else 0.5 if p == n else 0.0) for p, n in itertools.product(pos, neg)]
    return float(np.mean(pairs))


def test_auc_equals_pairwise_definition_with_ties():
    rng = np.random.default_rng(0)
    for _ in range(20):
        y = rng.random(40) < 0.4
        s = np.round(rng.random(40), 1)  # many ties
        assert abs(roc_auc(y, s) - brute_auc(y, s)) < 1e-12


def test_roc_curve_area_matches_auc():
    rng = np.random.default_rng(1)
    y = rng.random(200) < 0.5
    s = rng.random(200) + y * 0.5
    fpr, tpr, _ = roc_curve(y, s)
    assert abs(np.trapezoid(tpr, fpr) - roc_auc(y, s)) < 1e-9


def test_binary_metrics_positive_is_infected_index_zero():
    # labels: 0 = infected (positive), 1 = normal
    labels = np.array([0, 0, 0, 1, 1])
    probs = np.array([[0.9, 0.1], [0.8, 0.2], [0.3, 0.7], [0.6, 0.4], [0.1, 0.9]])
    m = binary_metrics(probs, labels, positive=0)
    assert m["confusion"] == [[2, 1], [1, 1]]
    assert m["sensitivity"] == 2 / 3 and m["specificity"] == 1 / 2
    assert m["precision"] == 2 / 3 and abs(m["f1"] - 2 / 3) < 1e-12
    assert m["accuracy"] == 3 / 5
    assert m["auc"] == brute_auc(labels == 0, probs[:, 0])


def test_single_class_gives_nan_auc_not_a_crash():
    m = binary_metrics(np.array([[0.9, 0.1], [0.8, 0.2]]), np.array([0, 0]))
    assert np.isnan(m["auc"]) and np.isnan(m["specificity"]) and m["sensitivity"] == 1.0


def test_ece_zero_for_perfectly_calibrated_and_large_for_overconfident():
    probs = np.array([[1.0, 0.0]] * 10)
    assert expected_calibration_error(probs, np.zeros(10, int)) == 0.0
    assert expected_calibration_error(probs, np.array([0] * 5 + [1] * 5)) > 0.4


def test_temperature_fixes_overconfidence():
    torch.manual_seed(0)
    labels = torch.randint(0, 2, (400,))
    clean_logits = torch.randn(400, 2) + torch.nn.functional.one_hot(labels, 2) * 1.0
    over = clean_logits * 6  # same ranking, far too confident
    t = fit_temperature(over, labels)
    assert 3 < t < 12
    nll = lambda z: torch.nn.functional.cross_entropy(z, labels).item()  # noqa: E731
    assert nll(over / t) < nll(over)
