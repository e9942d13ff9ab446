"""Confidence intervals, the paired AUC test, operating points and bounded calibration (covid_cls.metrics).

Synthetic scores with a known truth: positives ~ N(d, 1), negatives ~ N(0, 1), so the true AUC is
Phi(d / sqrt 2). Everything is seeded.
"""

from __future__ import annotations

import math
from statistics import NormalDist

import numpy as np
import pytest
import torch

from covid_cls.metrics import (
    _auc_resampled,
    auc_delong,
    auc_verdict,
    binary_metrics,
    binary_metrics_at,
    bootstrap_ci,
    bootstrap_indices,
    calibration_check,
    choose_threshold,
    delong_auc_cov,
    expected_calibration_error,
    fit_temperature,
    fit_temperature_bounded,
    paired_auc_test,
    roc_auc,
)


def binormal(n_pos: int, n_neg: int, d: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    y = np.r_[np.ones(n_pos, bool), np.zeros(n_neg, bool)]
    return y, rng.normal(0, 1, len(y)) + d * y


def true_auc(d: float) -> float:
    return NormalDist().cdf(d / math.sqrt(2))


def as_probs(y: np.ndarray, p: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The project's convention: columns (infected, normal), label 0 = infected."""
    return np.stack([p, 1 - p], axis=1), np.where(y, 0, 1)


# ---------------------------------------------------------------------------------------------------
# bootstrap
# ---------------------------------------------------------------------------------------------------


def test_bootstrap_ci_covers_the_true_auc_in_at_least_90_percent_of_repeats():
    d, hits = 1.2, 0
    for rep in range(100):
        y, s = binormal(75, 75, d, seed=rep)
        ci = bootstrap_ci(y, s, ["auc"], n_boot=1000, seed=rep)["auc"]
        hits += ci.low <= true_auc(d) <= ci.high
    assert hits / 100 >= 0.90


def test_bootstrap_intervals_shrink_with_more_images():
    def mean_widths(n):
        cis = [bootstrap_ci(*binormal(n, n, 1.0, seed=r), ["auc", "sensitivity"], n_boot=1000, seed=r)
               for r in range(10)]
        return {k: np.mean([c[k].high - c[k].low for c in cis]) for k in ("auc", "sensitivity")}
    small, big = mean_widths(75), mean_widths(600)
    for k in small:
        assert big[k] < 0.6 * small[k], k  # expected ratio ~ sqrt(75/600) = 0.35


def test_bootstrap_point_estimates_equal_the_plain_metrics():
    rng = np.random.default_rng(3)
    y = rng.random(300) < 0.6
    p = np.round(1 / (1 + np.exp(-(rng.normal(size=300) + 1.3 * y))), 2)  # rounded: many ties
    ci = bootstrap_ci(y, p, ["auc", "sensitivity", "specificity", "f1", "accuracy", "precision", "ece"],
                      threshold=0.5, n_boot=200)
    ref = binary_metrics(*as_probs(y, p))
    for name in ("auc", "sensitivity", "specificity", "f1", "accuracy", "precision"):
        assert ci[name].point == pytest.approx(ref[name], abs=1e-12), name
        assert ci[name].low <= ci[name].point <= ci[name].high, name
    assert ci["ece"].point == pytest.approx(expected_calibration_error(*as_probs(y, p)), abs=1e-12)


def test_vectorised_resampled_auc_equals_auc_of_each_resample():
    rng = np.random.default_rng(4)
    y = rng.random(120) < 0.4
    s = np.round(rng.random(120) + 0.3 * y, 1)
    for stratified in (True, False):
        idx = bootstrap_indices(y, 40, seed=1, stratified=stratified)
        fast = _auc_resampled(y, s, idx)
        slow = np.array([roc_auc(y[r], s[r]) for r in idx])
        assert np.allclose(fast, slow, equal_nan=True)


def test_stratified_resamples_keep_class_counts_and_are_seeded():
    y = np.r_[np.ones(30, bool), np.zeros(70, bool)]
    idx = bootstrap_indices(y, 50, seed=7)
    assert (y[idx].sum(axis=1) == 30).all()
    assert (bootstrap_indices(y, 50, seed=7) == idx).all() and not (bootstrap_indices(y, 50, seed=8) == idx).all()
    s = np.random.default_rng(0).random(100) + y
    assert bootstrap_ci(y, s, n_boot=300, seed=5) == bootstrap_ci(y, s, n_boot=300, seed=5)


def test_bootstrap_takes_custom_metrics_and_rejects_unknown_names():
    y, s = binormal(40, 40, 1.0, seed=0)
    ci = bootstrap_ci(y, s, [("mean_score", lambda yy, ss: float(ss.mean()))], n_boot=100)
    assert ci["mean_score"].point == pytest.approx(float(s.mean()))
    with pytest.raises(ValueError):
        bootstrap_ci(y, s, ["auroc"])


def test_bootstrap_of_2000_resamples_of_400_images_is_fast():
    import time

    y, s = binormal(200, 200, 1.0, seed=0)
    t = time.perf_counter()
    bootstrap_ci(y, s, ["auc", "sensitivity", "specificity", "f1", "accuracy", "ece"], n_boot=2000)
    assert time.perf_counter() - t < 2.0  # ~0.03 s measured; generous for a shared CPU


# ---------------------------------------------------------------------------------------------------
# DeLong and the paired comparison
# ---------------------------------------------------------------------------------------------------


def brute_delong(y, scores):
    """DeLong et al. 1988 written from the definition, O(m n) per model."""
    pos, neg = scores[:, y], scores[:, ~y]
    psi = lambda a, b: (a > b) + 0.5 * (a == b)  # noqa: E731
    v10 = np.array([[psi(p, neg[k]).mean() for p in pos[k]] for k in range(len(scores))])
    v01 = np.array([[psi(pos[k], q).mean() for q in neg[k]] for k in range(len(scores))])
    return v10.mean(1), np.cov(v10) / pos.shape[1] + np.cov(v01) / neg.shape[1]


def test_delong_fast_algorithm_matches_the_definition_with_ties():
    rng = np.random.default_rng(5)
    y = rng.random(60) < 0.45
    scores = np.round(np.stack([rng.random(60) + 0.4 * y, rng.random(60) + 0.2 * y]), 1)
    aucs, cov = delong_auc_cov(y, scores)
    ref_aucs, ref_cov = brute_delong(y, scores)
    assert np.allclose(aucs, ref_aucs) and np.allclose(cov, ref_cov)
    assert aucs[0] == pytest.approx(roc_auc(y, scores[0]))


def test_delong_variance_agrees_with_the_bootstrap():
    for seed in range(3):
        y, s = binormal(150, 150, 1.0, seed=seed)
        _, var = auc_delong(y, s)
        boot = _auc_resampled(y, s, bootstrap_indices(y, 2000, seed=seed))
        assert 0.7 < boot.var() / var < 1.4


def test_paired_test_detects_a_planted_difference():
    rng = np.random.default_rng(11)
    y = np.r_[np.ones(100, bool), np.zeros(100, bool)]
    a = 0.6 * y + rng.normal(size=200)
    b = a + 1.5 * y + rng.normal(scale=0.5, size=200)  # A's signal plus a strong extra one
    r = paired_auc_test(y, a, b)
    assert r["auc_b"] > r["auc_a"] and r["diff"] == pytest.approx(r["auc_a"] - r["auc_b"])
    assert r["p_value"] < 0.05
    assert r["ci_high"] < 0 and r["boot_ci_high"] < 0  # both intervals exclude 0
    assert auc_verdict(r, names=("fc", "partial")).startswith("partial is better")


def test_paired_test_rarely_flags_two_equally_good_models():
    false_pos = 0
    for seed in range(50):
        rng = np.random.default_rng(100 + seed)
        y = np.r_[np.ones(80, bool), np.zeros(80, bool)]
        shared = rng.normal(size=160)  # correlated errors, as two fine-tunings of one backbone
        a = 1.0 * y + 0.7 * shared + 0.7 * rng.normal(size=160)
        b = 1.0 * y + 0.7 * shared + 0.7 * rng.normal(size=160)
        r = paired_auc_test(y, a, b, n_boot=200, seed=seed)
        false_pos += r["p_value"] < 0.05
        assert min(r["ci_low"], r["boot_ci_low"]) < max(r["ci_high"], r["boot_ci_high"])
    assert false_pos / 50 <= 0.15


def test_paired_test_degenerate_inputs():
    y = np.array([1, 1, 0, 0], bool)
    same = np.array([0.9, 0.8, 0.2, 0.1])
    r = paired_auc_test(y, same, same)
    assert r["diff"] == 0 and r["p_value"] == 1.0
    assert auc_verdict(r).startswith("no significant difference")
    r = paired_auc_test(np.ones(4, bool), same, same[::-1])
    assert math.isnan(r["p_value"]) and auc_verdict(r).startswith("cannot compare")


# ---------------------------------------------------------------------------------------------------
# operating point
# ---------------------------------------------------------------------------------------------------


def test_threshold_recovers_a_model_that_calls_everything_positive():
    # the VGG16 · fc case of issue 10: good ranking, every P(positive) above 0.5
    y, z = binormal(200, 120, 2.0, seed=1)
    p = 0.55 + 0.4 / (1 + np.exp(-z))
    at_half = binary_metrics_at(y, p, 0.5)
    assert at_half["specificity"] == 0.0 and at_half["auc"] > 0.85
    t = choose_threshold(y, p)
    assert 0.0 <= t <= 1.0
    m = binary_metrics_at(y, p, t)
    assert m["sensitivity"] > 0.7 and m["specificity"] > 0.7
    y2, z2 = binormal(200, 120, 2.0, seed=2)  # and it carries over to fresh images of the same kind
    m2 = binary_metrics_at(y2, 0.55 + 0.4 / (1 + np.exp(-z2)), t)
    assert m2["sensitivity"] > 0.7 and m2["specificity"] > 0.7


def test_sensitivity_target_gives_the_highest_threshold_reaching_it():
    y, s = binormal(150, 150, 1.5, seed=3)
    p = 1 / (1 + np.exp(-s))
    for target in (0.8, 0.9, 0.95):
        t = choose_threshold(y, p, method="sensitivity", target=target)
        assert binary_metrics_at(y, p, t)["sensitivity"] >= target
        # t sits between two validation scores; the next threshold that changes anything is the second above it
        higher = np.unique(p[p > t])[1]
        assert binary_metrics_at(y, p, higher)["sensitivity"] < target


def test_youden_is_the_best_cut_and_prefers_half_when_it_is_optimal():
    y, s = binormal(100, 100, 1.0, seed=4)
    p = 1 / (1 + np.exp(-s))
    t = choose_threshold(y, p)
    j = lambda th: (lambda m: m["sensitivity"] + m["specificity"] - 1)(binary_metrics_at(y, p, th))  # noqa: E731
    assert j(t) >= max(j(th) for th in np.unique(p)) - 1e-12
    separated = np.array([0.1, 0.2, 0.3, 0.7, 0.8, 0.9])
    assert choose_threshold(np.array([0, 0, 0, 1, 1, 1], bool), separated) == 0.5


def test_threshold_degenerate_inputs():
    assert choose_threshold(np.ones(5, bool), np.linspace(0, 1, 5)) == 0.5
    assert choose_threshold(np.zeros(0, bool), np.zeros(0)) == 0.5
    with pytest.raises(ValueError):
        choose_threshold(np.array([0, 1], bool), np.array([0.2, 0.8]), method="f1")


def test_metrics_at_half_equal_binary_metrics():
    rng = np.random.default_rng(6)
    y = rng.random(100) < 0.5
    p = np.round(rng.random(100), 1)  # includes exact 0.5: ties go to positive in both
    a, b = binary_metrics_at(y, p, 0.5), binary_metrics(*as_probs(y, p))
    for k in ("accuracy", "sensitivity", "specificity", "precision", "f1", "auc", "confusion", "n"):
        assert a[k] == b[k], k


# ---------------------------------------------------------------------------------------------------
# bounded calibration
# ---------------------------------------------------------------------------------------------------


def test_bounded_temperature_refuses_a_perfectly_separated_validation_set():
    labels = torch.tensor([0] * 40 + [1] * 40)
    logits = torch.nn.functional.one_hot(labels, 2).float() * 3.0  # right every time
    nll = [torch.nn.functional.cross_entropy(logits / t, labels).item() for t in (1.0, 0.5, 0.1, 0.05)]
    assert nll == sorted(nll, reverse=True)  # smaller T always "fits better": an unbounded fit runs away
    t, note = fit_temperature_bounded(logits, labels)
    assert t == 1.0 and "separated" in note


def test_bounded_temperature_refuses_a_tiny_validation_set():
    labels = torch.tensor([0, 1] * 5)
    logits = torch.randn(10, 2)
    ok, why = calibration_check(logits, labels)
    assert not ok and "too small" in why
    assert fit_temperature_bounded(logits, labels) == (1.0, why)


def test_bounded_temperature_matches_the_free_fit_inside_its_bounds_and_stops_at_them():
    torch.manual_seed(0)
    labels = torch.randint(0, 2, (400,))
    clean = torch.randn(400, 2) + torch.nn.functional.one_hot(labels, 2) * 1.0
    t_free = fit_temperature(clean * 4, labels)
    t, note = fit_temperature_bounded(clean * 4, labels)
    assert 0.5 < t < 10 and note == "" and t == pytest.approx(t_free, rel=0.02)
    t, note = fit_temperature_bounded((clean * 40).numpy(), labels.numpy())  # numpy works too
    assert t == 10.0 and "bound" in note
