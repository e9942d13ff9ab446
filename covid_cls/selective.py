"""Selective prediction: letting the classifier say "I don't know".

A model that must answer every image will answer the ones it has no business answering (X-rays from
another hospital, another disease) with the same confidence as the rest (issue 10). This module holds the
pure pieces, all on numpy arrays:

- :func:`risk_coverage` — how accurate the answers are when only the most confident fraction is answered
  (Geifman & El-Yaniv, "Selective classification for deep neural networks", NeurIPS 2017);
- split conformal prediction sets (Vovk et al. 2005; Angelopoulos & Bates, "A gentle introduction to
  conformal prediction", 2021): a set of classes that holds the true class with probability >= 1 - alpha;
  abstain when the set is not a single class;
- uncertainty from repeated stochastic predictions (MC dropout, Gal & Ghahramani 2016; test-time
  augmentation; ensembles): predictive entropy, mutual information (BALD), spread of P(positive);
- :func:`combine_flags` — OR of named signals, with the reasons kept for display.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np

# ---------------------------------------------------------------------------------------------------
# Risk-coverage curve
# ---------------------------------------------------------------------------------------------------


def risk_coverage(correct: np.ndarray, confidence: np.ndarray, uncertainty: bool = False) -> dict:
    """Risk (error rate) and accuracy of the answered images at every coverage, and the area under the curve.

    Images are answered in order of decreasing ``confidence`` (pass ``uncertainty=True`` when higher means
    LESS sure, e.g. entropy). At coverage k/n the k most confident are answered. Ties in confidence cannot be
    ordered, so within a tie group the cumulative error count is interpolated linearly — the expectation over
    every order of the tied images, making the result independent of the sort's tie order.

    Returns ``coverage`` (k/n, k = 1..n), ``risk`` and ``accuracy`` of the answered set at each, ``aurc`` (the
    mean risk over the n coverages; Geifman et al. 2019, "Bias-reduced uncertainty estimation"), ``aurc_optimal``
    (the AURC of a perfect ranking — all correct answers first — the minimum for this error rate),
    ``e_aurc`` = aurc - aurc_optimal (excess, comparable across models with different accuracy) and
    ``error_rate`` (risk at full coverage, also the expected AURC of a random ranking).
    """
    c = np.asarray(correct).astype(bool).reshape(-1)
    conf = np.asarray(confidence, dtype=np.float64).reshape(-1)
    if c.shape != conf.shape:
        raise ValueError(f"correct and confidence must have the same length: {c.shape} vs {conf.shape}")
    n = len(c)
    if n == 0:
        nan = float("nan")
        empty = np.zeros(0)
        return {"coverage": empty, "risk": empty, "accuracy": empty, "aurc": nan, "aurc_optimal": nan,
                "e_aurc": nan, "error_rate": nan}
    key = conf if uncertainty else -conf  # ascending key = answered first
    order = np.argsort(key, kind="mergesort")
    err = (~c[order]).astype(np.float64)
    k_sorted = key[order]
    # cumulative errors at the end of each tie group, interpolated linearly inside the group
    ends = np.flatnonzero(np.r_[k_sorted[1:] != k_sorted[:-1], True]) + 1  # 1-based positions of group ends
    cum_at_ends = np.cumsum(err)[ends - 1]
    cum = np.interp(np.arange(1, n + 1), np.r_[0, ends], np.r_[0.0, cum_at_ends])
    k = np.arange(1, n + 1)
    risk = cum / k
    n_err = float(err.sum())
    opt = np.maximum(0.0, k - (n - n_err)) / k
    aurc, aurc_opt = float(risk.mean()), float(opt.mean())
    return {"coverage": k / n, "risk": risk, "accuracy": 1.0 - risk, "aurc": aurc, "aurc_optimal": aurc_opt,
            "e_aurc": aurc - aurc_opt, "error_rate": n_err / n}


# ---------------------------------------------------------------------------------------------------
# Split conformal prediction sets, LAC score (Sadinle, Lei & Wasserman 2019; Angelopoulos & Bates 2021 §1)
# ---------------------------------------------------------------------------------------------------


def conformal_threshold(val_probs: np.ndarray, val_labels: np.ndarray, alpha: float = 0.1) -> float:
    """``qhat`` calibrated on held-out data: sets ``{c : 1 - p_c <= qhat}`` cover the true class w.p. >= 1 - alpha.

    Score of a calibration image = 1 - p(true class). ``qhat`` is the ceil((n+1)(1-alpha))/n empirical quantile
    of the n scores, i.e. exactly the k-th smallest score with k = ceil((n+1)(1-alpha)) (the "+1" is the
    finite-sample correction that makes the guarantee hold for exchangeable data, not only asymptotically;
    ``np.quantile(..., method="higher")`` as in the paper's code can land one order statistic higher, which is
    only more conservative). When k > n (n < 1/alpha - 1), no finite threshold is
    guaranteed and qhat = 1.0: every class is in every set, i.e. the model always abstains — honest for a tiny
    calibration set. The guarantee is marginal and holds only for images exchangeable with the calibration
    set; on shifted data coverage can drop, which is why it is combined with the OOD signals.
    """
    p = np.asarray(val_probs, dtype=np.float64)
    y = np.asarray(val_labels).astype(np.int64).reshape(-1)
    if p.ndim != 2 or len(p) != len(y):
        raise ValueError(f"val_probs must be (N, C) and val_labels (N,), got {p.shape} and {y.shape}")
    if not 0.0 < alpha < 1.0:
        raise ValueError(f"alpha must be in (0, 1), not {alpha}")
    n = len(y)
    if n == 0:
        return 1.0
    scores = np.sort(1.0 - p[np.arange(n), y])
    k = math.ceil((n + 1) * (1.0 - alpha) - 1e-9)  # the k-th smallest score; -1e-9 absorbs float error
    if k > n:
        return 1.0
    return float(scores[k - 1])


def prediction_sets(probs: np.ndarray, qhat: float) -> np.ndarray:
    """Boolean (N, C): class c is in image i's set when 1 - p_ic <= qhat (same score as the calibration)."""
    return (1.0 - np.asarray(probs, dtype=np.float64)) <= qhat


def set_abstains(sets: np.ndarray) -> np.ndarray:
    """(N,) bool: abstain when the set holds both classes (ambiguous) or none (unlike anything calibrated)."""
    return np.asarray(sets).sum(axis=1) != 1


# ---------------------------------------------------------------------------------------------------
# Uncertainty from S stochastic predictions per image: samples of shape (S, N, C), rows summing to 1.
# ---------------------------------------------------------------------------------------------------


def _check_samples(samples: np.ndarray) -> np.ndarray:
    p = np.asarray(samples, dtype=np.float64)
    if p.ndim != 3:
        raise ValueError(f"samples must be (S, N, C) probabilities, got shape {p.shape}")
    return p


def _entropy(p: np.ndarray) -> np.ndarray:
    return -(p * np.log(np.clip(p, 1e-12, 1.0))).sum(axis=-1)


def predictive_entropy(samples: np.ndarray) -> np.ndarray:
    """(N,) entropy (nats) of the mean prediction: total uncertainty, max log C.

    High when the averaged prediction is close to uniform — whether because each pass is unsure
    (aleatoric) or because the passes disagree (epistemic).
    """
    return _entropy(_check_samples(samples).mean(axis=0))


def mutual_information(samples: np.ndarray) -> np.ndarray:
    """(N,) mutual information between prediction and model parameters (nats): the BALD score.

    = entropy of the mean - mean entropy of each pass (Houlsby et al. 2011; Gal, Islam & Ghahramani 2017).
    It isolates the DISAGREEMENT between passes (epistemic uncertainty): zero when every pass says the same,
    even if that is 50/50. Images unlike the training data tend to make dropout masks / augmentations disagree.
    """
    p = _check_samples(samples)
    return np.maximum(_entropy(p.mean(axis=0)) - _entropy(p).mean(axis=0), 0.0)


def positive_std(samples: np.ndarray, positive: int = 0) -> np.ndarray:
    """(N,) standard deviation of P(positive) over the passes (positive = class index, infected = 0).

    The simplest disagreement signal, in probability units a user can read ("P(infected) varies by +-0.2").
    """
    return _check_samples(samples)[:, :, positive].std(axis=0)


# ---------------------------------------------------------------------------------------------------
# Combining signals
# ---------------------------------------------------------------------------------------------------


def combine_flags(signals: Mapping[str, object]) -> tuple[object, list]:
    """OR named boolean signals into (flagged, reasons).

    ``signals``: {reason: bool or (N,) bool array}, e.g. {"unlike the training X-rays": ood,
    "conformal set holds both classes": set_abstains(sets)}. With scalars only, returns (bool, [reasons that
    fired]); otherwise every signal is broadcast to (N,) and it returns ((N,) bool array, one list of reasons per
    image). Kept an OR on purpose: any single reason to doubt an answer is enough to withhold a confident label,
    and the reasons are listed so the user sees why.
    """
    names = list(signals)
    if all(np.ndim(signals[k]) == 0 for k in names):
        reasons = [k for k in names if bool(signals[k])]
        return bool(reasons), reasons
    arrays = np.broadcast_arrays(*[np.asarray(signals[k]).astype(bool) for k in names])
    stack = np.stack([a.reshape(-1) for a in arrays])  # (K, N)
    reasons_per = [[names[r] for r in np.flatnonzero(stack[:, i])] for i in range(stack.shape[1])]
    return stack.any(axis=0), reasons_per
