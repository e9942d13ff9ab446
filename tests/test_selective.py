"""Selective prediction pieces (covid_cls.selective): risk-coverage, conformal sets, disagreement, flags."""

from __future__ import annotations

import math

import numpy as np
import pytest

from covid_cls.selective import (
    combine_flags,
    conformal_threshold,
    mutual_information,
    positive_std,
    prediction_sets,
    predictive_entropy,
    risk_coverage,
    set_abstains,
)

# ---------------------------------------------------------------------------------------------------
# risk-coverage
# ---------------------------------------------------------------------------------------------------


def test_perfect_ranking_reaches_the_minimum_aurc():
    rng = np.random.default_rng(0)
    correct = rng.random(500) < 0.8
    conf = correct + rng.random(500) * 0.5  # every correct answer more confident than every wrong one
    rc = risk_coverage(correct, conf)
    assert rc["aurc"] == pytest.approx(rc["aurc_optimal"]) and rc["e_aurc"] == pytest.approx(0.0, abs=1e-12)
    assert rc["aurc"] < 0.5 * rc["error_rate"]
    assert (rc["risk"][: int(correct.sum())] == 0).all()  # answering only the sure ones makes no error


def test_random_ranking_gives_about_the_error_rate_and_reversed_is_worse():
    aurcs, errs = [], []
    for seed in range(20):
        rng = np.random.default_rng(seed)
        correct = rng.random(400) < 0.75
        rc = risk_coverage(correct, rng.random(400))
        aurcs.append(rc["aurc"])
        errs.append(rc["error_rate"])
        worst = risk_coverage(correct, -(correct + rng.random(400) * 0.5))
        assert worst["aurc"] > rc["error_rate"]
    assert abs(np.mean(aurcs) - np.mean(errs)) < 0.02


def test_risk_coverage_shape_ties_and_uncertainty_direction():
    rng = np.random.default_rng(1)
    correct = rng.random(50) < 0.7
    conf = rng.random(50)
    rc = risk_coverage(correct, conf)
    assert len(rc["coverage"]) == 50 and rc["coverage"][-1] == 1.0
    assert rc["risk"][-1] == pytest.approx(1 - correct.mean()) and np.allclose(rc["accuracy"], 1 - rc["risk"])
    unc = risk_coverage(correct, -conf, uncertainty=True)
    assert np.allclose(unc["risk"], rc["risk"])
    tied = risk_coverage(correct, np.ones(50))  # no ranking at all: every coverage has the overall error rate
    assert np.allclose(tied["risk"], 1 - correct.mean()) and tied["aurc"] == pytest.approx(1 - correct.mean())
    assert math.isnan(risk_coverage([], [])["aurc"])


# ---------------------------------------------------------------------------------------------------
# conformal prediction sets
# ---------------------------------------------------------------------------------------------------


def softmax_data(n: int, rng: np.random.Generator, sep: float = 2.0, noise: float = 1.0):
    """A 2-class 'model': logit difference = sep * (+-1) + noise; labels drawn from the true posterior."""
    y = rng.integers(0, 2, n)
    z = np.where(y == 0, sep, -sep) + rng.normal(0, noise, n)
    p0 = 1 / (1 + np.exp(-z))
    return np.stack([p0, 1 - p0], axis=1), y


def test_conformal_sets_reach_the_promised_coverage_on_exchangeable_data():
    alpha, covs = 0.1, []
    for seed in range(50):
        rng = np.random.default_rng(seed)
        p_cal, y_cal = softmax_data(1000, rng, noise=2.0)
        p_test, y_test = softmax_data(2000, rng, noise=2.0)
        sets = prediction_sets(p_test, conformal_threshold(p_cal, y_cal, alpha))
        covs.append(sets[np.arange(len(y_test)), y_test].mean())
    # The guarantee is on the expectation over calibration sets (here k/(n+1) = 0.9001); the mean of 50 runs has a
    # standard error of ~0.0017 (600 runs gave 0.9001 +- 0.0004), so 0.01 below is ~6 standard errors.
    assert np.mean(covs) >= 1 - alpha - 0.01
    assert np.mean(covs) < 1 - alpha + 0.05  # and not trivially by including everything


def test_conformal_abstains_more_on_shifted_data():
    rng = np.random.default_rng(3)
    p_cal, y_cal = softmax_data(500, rng, noise=1.0)
    qhat = conformal_threshold(p_cal, y_cal, 0.1)
    p_in, _ = softmax_data(1000, rng, noise=1.0)
    p_shift, _ = softmax_data(1000, rng, sep=0.5, noise=1.0)  # the signal the model relies on is weaker
    abstain = lambda p: set_abstains(prediction_sets(p, qhat)).mean()  # noqa: E731
    assert abstain(p_shift) > abstain(p_in) + 0.2


def test_conformal_threshold_is_the_corrected_quantile_and_tiny_sets_abstain():
    rng = np.random.default_rng(4)
    p, y = softmax_data(57, rng)
    alpha = 0.1
    scores = np.sort(1 - p[np.arange(57), y])
    k = math.ceil((57 + 1) * (1 - alpha))  # the k-th smallest score (1-based)
    assert conformal_threshold(p, y, alpha) == scores[k - 1]
    q = conformal_threshold(p[:5], y[:5], alpha)  # (5 + 1) * 0.9 > 5: no finite guarantee -> everything
    assert q == 1.0 and set_abstains(prediction_sets(p, q)).all()
    with pytest.raises(ValueError):
        conformal_threshold(p, y, alpha=1.5)


def test_abstain_when_the_set_is_not_a_single_class():
    sets = np.array([[True, False], [True, True], [False, False], [False, True]])
    assert set_abstains(sets).tolist() == [False, True, True, False]


# ---------------------------------------------------------------------------------------------------
# disagreement of repeated predictions (S, N, C)
# ---------------------------------------------------------------------------------------------------


def test_uncertainty_from_repeated_samples():
    agree_sure = np.tile([[0.9, 0.1]], (10, 1, 1))  # every pass says the same, confidently
    agree_unsure = np.tile([[0.5, 0.5]], (10, 1, 1))  # every pass says 50/50: aleatoric only
    disagree = np.array([[[1.0, 0.0]]] * 5 + [[[0.0, 1.0]]] * 5)  # passes contradict: epistemic
    s = np.concatenate([agree_sure, agree_unsure, disagree], axis=1)  # (10, 3, 2)
    h, mi, sd = predictive_entropy(s), mutual_information(s), positive_std(s)
    assert h[0] == pytest.approx(-(0.9 * np.log(0.9) + 0.1 * np.log(0.1)))
    assert h[1] == pytest.approx(np.log(2)) and h[2] == pytest.approx(np.log(2))
    assert mi[0] == pytest.approx(0, abs=1e-9) and mi[1] == pytest.approx(0, abs=1e-9)
    assert mi[2] == pytest.approx(np.log(2), rel=1e-6)
    assert sd.tolist() == pytest.approx([0.0, 0.0, 0.5])
    with pytest.raises(ValueError):
        predictive_entropy(np.ones((3, 2)))


# ---------------------------------------------------------------------------------------------------
# combining signals
# ---------------------------------------------------------------------------------------------------


def test_combine_flags_scalar_and_per_image():
    assert combine_flags({"ood": False, "conformal": True}) == (True, ["conformal"])
    assert combine_flags({"ood": False, "conformal": False}) == (False, [])
    flagged, reasons = combine_flags({"ood": np.array([True, False, False]),
                                      "conformal": np.array([True, False, True]), "disabled": False})
    assert flagged.tolist() == [True, False, True]
    assert reasons == [["ood", "conformal"], [], ["conformal"]]
