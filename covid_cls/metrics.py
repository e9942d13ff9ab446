"""Classification metrics: a binary task (positive class = ``infected``) or any number of classes.

Accuracy alone hides what matters clinically: sensitivity (infected cases found) and specificity
(normal cases left alone) are always reported, with ROC AUC and calibration (ECE). With more than two classes
(issue 13) each class is scored one-vs-rest and the headline numbers are their macro (unweighted) averages, so
a rare class counts as much as a common one; :func:`metrics_for` and :func:`split_report` pick the right kind.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from statistics import NormalDist
from typing import NamedTuple

import numpy as np
import torch


def roc_auc(y_true: np.ndarray, score: np.ndarray) -> float:
    """Area under the ROC curve by the Mann-Whitney rank statistic (ties count one half)."""
    y_true = np.asarray(y_true).astype(bool)
    score = np.asarray(score, dtype=np.float64)
    n_pos, n_neg = int(y_true.sum()), int((~y_true).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    order = np.argsort(score, kind="mergesort")
    ranks = np.empty(len(score), dtype=np.float64)
    sorted_scores = score[order]
    # average ranks over ties
    i = 0
    while i < len(score):
        j = i
        while j + 1 < len(score) and sorted_scores[j + 1] == sorted_scores[i]:
            j += 1
        ranks[order[i:j + 1]] = (i + j) / 2.0 + 1.0
        i = j + 1
    return float((ranks[y_true].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def roc_curve(y_true: np.ndarray, score: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(false positive rate, true positive rate, thresholds), thresholds descending."""
    y_true = np.asarray(y_true).astype(bool)
    score = np.asarray(score, dtype=np.float64)
    thr = np.unique(score)[::-1]
    P, N = max(int(y_true.sum()), 1), max(int((~y_true).sum()), 1)
    tpr = np.array([0.0] + [float((score[y_true] >= t).sum()) / P for t in thr])
    fpr = np.array([0.0] + [float((score[~y_true] >= t).sum()) / N for t in thr])
    return fpr, tpr, np.concatenate([[np.inf], thr])


def roc_points(y_true: np.ndarray, score: np.ndarray, max_points: int = 101) -> dict[str, list[float]]:
    """A small ROC curve (at most ``max_points`` points) to keep in checkpoint cards for plotting."""
    fpr, tpr, _ = roc_curve(y_true, score)
    if len(fpr) > max_points:
        idx = np.unique(np.linspace(0, len(fpr) - 1, max_points).round().astype(int))
        fpr, tpr = fpr[idx], tpr[idx]
    return {"fpr": [round(float(v), 4) for v in fpr], "tpr": [round(float(v), 4) for v in tpr]}


def expected_calibration_error(probs: np.ndarray, labels: np.ndarray, bins: int = 15) -> float:
    """ECE of the predicted class's confidence (Guo et al. 2017), equal-width bins."""
    probs = np.asarray(probs, dtype=np.float64)
    conf = probs.max(axis=1)
    correct = probs.argmax(axis=1) == np.asarray(labels)
    edges = np.linspace(0.0, 1.0, bins + 1)
    ece = 0.0
    for lo, hi in zip(edges[:-1], edges[1:]):
        m = (conf > lo) & (conf <= hi)
        if m.any():
            ece += m.mean() * abs(correct[m].mean() - conf[m].mean())
    return float(ece)


def _safe_div(a: float, b: float) -> float:
    return float(a / b) if b else float("nan")


def binary_metrics(probs: np.ndarray, labels: np.ndarray, positive: int = 0) -> dict:
    """All the numbers we report, from class probabilities (N, C) and integer labels (N,)."""
    probs = np.asarray(probs, dtype=np.float64)
    labels = np.asarray(labels)
    pred = probs.argmax(axis=1)
    is_pos, pred_pos = labels == positive, pred == positive
    tp = int((is_pos & pred_pos).sum())
    fn = int((is_pos & ~pred_pos).sum())
    fp = int((~is_pos & pred_pos).sum())
    tn = int((~is_pos & ~pred_pos).sum())
    n = len(labels)
    return {
        "n": n,
        **_rates(tp, fn, fp, tn),  # accuracy, sensitivity, specificity, precision, f1
        "auc": roc_auc(is_pos, probs[:, positive]) if n else float("nan"),
        "ece": expected_calibration_error(probs, labels) if n else float("nan"),
        # rows = true class (positive first), columns = predicted
        "confusion": [[tp, fn], [fp, tn]],
    }


def fit_temperature(logits: torch.Tensor, labels: torch.Tensor, iters: int = 100) -> float:
    """Temperature scaling (Guo et al. 2017): one scalar T minimising validation NLL of logits / T."""
    logits = logits.detach().float().cpu()
    labels = labels.detach().long().cpu()
    if len(labels) < 2 or labels.unique().numel() < 2:
        return 1.0
    log_t = torch.zeros(1, requires_grad=True)
    opt = torch.optim.LBFGS([log_t], lr=0.1, max_iter=iters, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(logits / log_t.exp(), labels)
        loss.backward()
        return loss

    opt.step(closure)
    t = float(log_t.detach().exp().clamp(0.05, 20.0))
    return t if math.isfinite(t) else 1.0


# ---------------------------------------------------------------------------------------------------
# Operating point: metrics at a decision threshold, and choosing that threshold on validation.
#
# Convention for everything below: ``y_true`` is truthy for the POSITIVE class (infected) — pass
# ``labels == positive`` when you hold class indices — and ``score`` is P(positive). An image is called
# positive when ``score >= threshold`` (so threshold 0.5 reproduces ``binary_metrics``' argmax, whose
# ties go to class index 0 = infected).
# ---------------------------------------------------------------------------------------------------


def _rates(tp: float, fn: float, fp: float, tn: float) -> dict:
    """Accuracy, sensitivity, specificity, precision, F1 from confusion counts (NaN where undefined)."""
    sens, spec, prec = _safe_div(tp, tp + fn), _safe_div(tn, tn + fp), _safe_div(tp, tp + fp)
    f1 = _safe_div(2 * prec * sens, prec + sens) if not (math.isnan(prec) or math.isnan(sens)) else float("nan")
    return {"accuracy": _safe_div(tp + tn, tp + fn + fp + tn), "sensitivity": sens, "specificity": spec,
            "precision": prec, "f1": f1}


def binary_metrics_at(y_true: np.ndarray, score: np.ndarray, threshold: float = 0.5) -> dict:
    """Metrics when an image is called positive iff ``score >= threshold`` (``binary_metrics`` fixes 0.5).

    Why: a model can rank well (high AUC) and still call every image positive at 0.5 (issue 10, VGG16 · fc);
    the threshold chosen on validation (:func:`choose_threshold`) is what the product applies, so the
    reported numbers must be at that threshold. Keys as ``binary_metrics`` minus ECE, plus ``threshold``.
    """
    y = np.asarray(y_true).astype(bool)
    s = np.asarray(score, dtype=np.float64)
    pred = s >= threshold
    tp, fn = int((y & pred).sum()), int((y & ~pred).sum())
    fp, tn = int((~y & pred).sum()), int((~y & ~pred).sum())
    out = {"n": int(len(y)), "threshold": float(threshold), **_rates(tp, fn, fp, tn)}
    out["auc"] = roc_auc(y, s) if len(y) else float("nan")
    out["confusion"] = [[tp, fn], [fp, tn]]  # rows = true (positive first), columns = predicted
    return out


def choose_threshold(y_true: np.ndarray, score: np.ndarray, method: str = "youden", target: float = 0.9) -> float:
    """A decision threshold on P(positive), chosen on validation data; a probability in [0, 1].

    ``method="youden"``: maximise Youden's J = sensitivity + specificity - 1 (Youden 1950), the point of the
    ROC curve farthest above the diagonal; it weighs both error kinds equally whatever the class balance.
    ``method="sensitivity"``: the highest threshold whose sensitivity reaches ``target`` (a screening
    operating point: "find 90 % of infected cases, then be as specific as possible").

    Every threshold in the open-closed interval between two consecutive distinct validation scores gives the
    same validation result; we return that interval's midpoint, so the operating point does not sit exactly
    on one validation image. For Youden ties we take the optimal interval nearest 0.5 and return 0.5 itself
    when it lies inside (no needless move away from the usual default). A single-class or empty validation
    set cannot tell anything: 0.5.
    """
    if method not in ("youden", "sensitivity"):
        raise ValueError(f"method must be 'youden' or 'sensitivity', not {method!r}")
    if not 0.0 <= target <= 1.0:
        raise ValueError(f"target sensitivity must be in [0, 1], not {target}")
    y = np.asarray(y_true).astype(bool)
    s = np.asarray(score, dtype=np.float64)
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    if n_pos == 0 or n_neg == 0:
        return 0.5
    u = np.unique(s)  # ascending; cut k (0..len(u)) calls positive every score >= u[k] (k = len(u): none)
    pos_at = np.bincount(np.searchsorted(u, s[y]), minlength=len(u))
    neg_at = np.bincount(np.searchsorted(u, s[~y]), minlength=len(u))
    tp = np.concatenate([np.cumsum(pos_at[::-1])[::-1], [0]])
    fp = np.concatenate([np.cumsum(neg_at[::-1])[::-1], [0]])
    sens, spec = tp / n_pos, 1.0 - fp / n_neg
    lo = np.clip(np.concatenate([[0.0], u]), 0.0, 1.0)  # cut k <=> lo[k] < threshold <= hi[k]
    hi = np.clip(np.concatenate([u, [1.0]]), 0.0, 1.0)
    mid = (lo + hi) / 2.0
    if method == "sensitivity":
        k = int(np.flatnonzero(sens >= target - 1e-12).max())  # cut 0 (everything positive) always qualifies
        return float(mid[k])
    j = sens + spec - 1.0
    best = np.flatnonzero(j >= j.max() - 1e-12)
    dist = np.where((lo[best] < 0.5) & (0.5 <= hi[best]), 0.0,
                    np.minimum(np.abs(lo[best] - 0.5), np.abs(hi[best] - 0.5)))
    k = int(best[np.argmin(dist)])
    return 0.5 if dist.min() == 0.0 else float(mid[k])


# ---------------------------------------------------------------------------------------------------
# Confidence intervals: stratified percentile bootstrap (Efron & Tibshirani 1993, ch. 13).
# ---------------------------------------------------------------------------------------------------

METRIC_NAMES = ("auc", "sensitivity", "specificity", "f1", "accuracy", "precision", "ece")


class Interval(NamedTuple):
    """A point estimate on the original data and its (low, high) confidence interval."""

    point: float
    low: float
    high: float


def bootstrap_indices(y_true: np.ndarray, n_boot: int = 2000, seed: int = 0, stratified: bool = True,
                      by_class: bool = False) -> np.ndarray:
    """Index matrix (n_boot, n) of bootstrap resamples, drawn once and shared by every metric.

    Stratified (the default): positives and negatives are resampled separately, keeping their counts, so every
    resample has both classes (AUC, sensitivity and specificity are always defined) and the class balance of
    the evaluated set is not part of the noise. Sharing the matrix between two models gives a PAIRED bootstrap.
    ``by_class=True``: ``y_true`` holds class indices (any number of classes) and each class is resampled
    separately, in ascending class order; the default keeps the (positive, negative) order, hence the exact
    resamples, of the binary reports.
    """
    rng = np.random.default_rng(seed)
    if by_class:
        y = np.asarray(y_true).reshape(-1)
        pools = [np.flatnonzero(y == c) for c in np.unique(y)]
    else:
        y = np.asarray(y_true).astype(bool)
        pools = [np.flatnonzero(y), np.flatnonzero(~y)]
    if not stratified:
        return rng.integers(0, len(y), size=(n_boot, len(y)))
    parts = [pool[rng.integers(0, len(pool), size=(n_boot, len(pool)))] for pool in pools if len(pool)]
    return np.concatenate(parts, axis=1) if parts else np.zeros((n_boot, 0), dtype=np.int64)


def _auc_resampled(y: np.ndarray, s: np.ndarray, idx: np.ndarray, max_cells: int = 4_000_000) -> np.ndarray:
    """Mann-Whitney AUC (ties count one half) of every row of ``idx`` at once, without a per-resample sort.

    The scores are ranked ONCE (``np.unique``); a resample is then just counts of positives and negatives per
    distinct score, and AUC = sum over distinct scores of #pos x (#neg strictly below + #neg equal / 2),
    divided by #pos x #neg — exactly the average-rank statistic of ``roc_auc``. Rows are processed in chunks
    of at most ``max_cells`` counters to bound memory.
    """
    u_inv = np.unique(s, return_inverse=True)[1].reshape(-1)
    n_u = int(u_inv.max()) + 1 if len(u_inv) else 1
    out = np.empty(len(idx), dtype=np.float64)
    step = max(1, max_cells // n_u)
    for a in range(0, len(idx), step):
        ii = idx[a:a + step]
        b = len(ii)
        keys = u_inv[ii] + (np.arange(b) * n_u)[:, None]
        p = y[ii]
        pos = np.bincount(keys[p], minlength=b * n_u).reshape(b, n_u)
        neg = np.bincount(keys[~p], minlength=b * n_u).reshape(b, n_u)
        below = np.cumsum(neg, axis=1) - neg
        num = (pos * (below + 0.5 * neg)).sum(axis=1)
        den = pos.sum(axis=1) * neg.sum(axis=1)
        with np.errstate(invalid="ignore", divide="ignore"):
            out[a:a + b] = np.where(den > 0, num / np.maximum(den, 1), np.nan)
    return out


def _resampled_metrics(y: np.ndarray, s: np.ndarray, idx: np.ndarray, names: list, threshold: float,
                       bins: int = 15) -> dict[str, np.ndarray]:
    """Each requested metric for every row of ``idx`` (vectorised; custom callables loop over rows)."""
    out: dict[str, np.ndarray] = {}
    yy = y[idx]
    pred = (s >= threshold)[idx]
    tp, fn = (yy & pred).sum(1).astype(float), (yy & ~pred).sum(1).astype(float)
    fp, tn = (~yy & pred).sum(1).astype(float), (~yy & ~pred).sum(1).astype(float)
    with np.errstate(invalid="ignore", divide="ignore"):
        nan = np.nan
        sens = np.where(tp + fn > 0, tp / (tp + fn), nan)
        spec = np.where(tn + fp > 0, tn / (tn + fp), nan)
        prec = np.where(tp + fp > 0, tp / (tp + fp), nan)
        f1 = np.where(prec + sens > 0, 2 * prec * sens / (prec + sens), nan)  # NaN as binary_metrics when 0/0
        acc = np.where(idx.shape[1] > 0, (tp + tn) / max(idx.shape[1], 1), nan)
    simple = {"sensitivity": sens, "specificity": spec, "precision": prec, "f1": f1, "accuracy": acc}
    for name, fn_ in names:
        if fn_ is not None:
            out[name] = np.array([fn_(y[r], s[r]) for r in idx], dtype=np.float64)
        elif name == "auc":
            out[name] = _auc_resampled(y, s, idx)
        elif name == "ece":
            # ECE of the predicted class, as expected_calibration_error on [p, 1-p]
            out[name] = _ece_resampled(np.maximum(s, 1.0 - s), ((s >= 0.5) == y).astype(np.float64), idx, bins)
        else:
            out[name] = simple[name]
    return out


def _ece_resampled(conf: np.ndarray, correct: np.ndarray, idx: np.ndarray, bins: int = 15) -> np.ndarray:
    """``expected_calibration_error`` of every row of ``idx`` from each image's confidence and correctness.

    With fixed equal-width bins ECE is sum_k |#correct_k - sum conf_k| / n, i.e. two bincounts per resample,
    which is what makes 2,000 resamples cheap.
    """
    edges = np.linspace(0.0, 1.0, bins + 1)
    b = np.clip(np.searchsorted(edges, conf, side="left") - 1, 0, bins - 1)
    keys = b[idx] + (np.arange(len(idx)) * bins)[:, None]
    gap = (np.bincount(keys.ravel(), weights=correct[idx].ravel(), minlength=len(idx) * bins)
           - np.bincount(keys.ravel(), weights=conf[idx].ravel(), minlength=len(idx) * bins))
    return np.abs(gap.reshape(len(idx), bins)).sum(1) / max(idx.shape[1], 1)


def _metric_list(metrics) -> list[tuple[str, Callable | None]]:
    items = [metrics] if isinstance(metrics, str) or callable(metrics) else list(metrics)
    out = []
    for m in items:
        if isinstance(m, str):
            if m not in METRIC_NAMES:
                raise ValueError(f"unknown metric {m!r}; known: {', '.join(METRIC_NAMES)} or a callable")
            out.append((m, None))
        elif isinstance(m, tuple):
            out.append((str(m[0]), m[1]))
        else:
            out.append((getattr(m, "__name__", "metric"), m))
    return out


def bootstrap_ci(y_true: np.ndarray, score: np.ndarray,
                 metrics=("auc", "sensitivity", "specificity", "f1"), threshold: float = 0.5,
                 n_boot: int = 2000, alpha: float = 0.05, seed: int = 0,
                 stratified: bool = True) -> dict[str, Interval]:
    """Percentile bootstrap confidence intervals: {name: Interval(point, low, high)}.

    ``metrics``: names from ``METRIC_NAMES`` (threshold metrics use ``score >= threshold``; ECE is that of the
    predicted class as in ``expected_calibration_error``), callables ``fn(y_true_bool, score) -> float``, or
    ``(name, callable)`` pairs. Point = metric on the original data; interval = the alpha/2 and 1 - alpha/2
    percentiles of the resampled values (percentile method — simple, and adequate for these bounded metrics;
    it is not the bias-corrected BCa interval). Resamples where a metric is undefined (e.g. no predicted
    positive for precision) are left out of its percentiles. Seeded, so the same call gives the same interval.
    Why: on a few hundred test images an AUC of 0.90 is roughly +-0.03, and comparisons of fine-tuning levels
    are meaningless without that (issue 10).
    """
    y = np.asarray(y_true).astype(bool)
    s = np.asarray(score, dtype=np.float64)
    if y.shape != s.shape or y.ndim != 1:
        raise ValueError(f"y_true and score must be 1-D of the same length, got {y.shape} and {s.shape}")
    if n_boot < 1:
        raise ValueError("n_boot must be >= 1")
    names = _metric_list(metrics)
    point = _resampled_metrics(y, s, np.arange(len(y))[None, :], names, threshold)
    boot = _resampled_metrics(y, s, bootstrap_indices(y, n_boot, seed, stratified), names, threshold)
    out = {}
    for name, _ in names:
        lo, hi = _nan_percentiles(boot[name], alpha)
        out[name] = Interval(float(point[name][0]), lo, hi)
    return out


def _nan_percentiles(values: np.ndarray, alpha: float) -> tuple[float, float]:
    v = values[np.isfinite(values)]
    if not len(v):
        return float("nan"), float("nan")
    lo, hi = np.percentile(v, [100 * alpha / 2, 100 * (1 - alpha / 2)])
    return float(lo), float(hi)


# ---------------------------------------------------------------------------------------------------
# Paired comparison of two models on the same images: DeLong's test (DeLong, DeLong & Clarke-Pearson,
# Biometrics 1988) with the fast O(n log n) algorithm of Sun & Xu (IEEE Signal Process. Lett. 2014).
# ---------------------------------------------------------------------------------------------------


def _midranks(x: np.ndarray) -> np.ndarray:
    """1-based ranks, ties sharing the average of their positions (Sun & Xu's 'midrank')."""
    _, inv, counts = np.unique(x, return_inverse=True, return_counts=True)
    ends = np.cumsum(counts)
    return (ends - (counts - 1) / 2.0)[inv.reshape(-1)]


def delong_auc_cov(y_true: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """AUCs (K,) and their DeLong covariance matrix (K, K) for K score vectors (K, n) on the same images.

    DeLong's estimator splits each AUC into structural components — for every positive, the fraction of
    negatives it outranks (V10), for every negative the fraction of positives above it (V01) — and estimates
    Var/Cov(AUC) = S10 / m + S01 / n from their sample covariances (m positives, n negatives). It accounts
    for the correlation between two models scored on the same images, which is what makes the paired test
    far more sensitive than comparing two separate intervals. NaN when a class has fewer than 2 images.
    """
    y = np.asarray(y_true).astype(bool)
    sc = np.atleast_2d(np.asarray(scores, dtype=np.float64))
    k, m, n = sc.shape[0], int(y.sum()), int((~y).sum())
    if m < 2 or n < 2:
        return np.full(k, np.nan), np.full((k, k), np.nan)
    pos, neg = sc[:, y], sc[:, ~y]
    v10, v01, aucs = np.empty((k, m)), np.empty((k, n)), np.empty(k)
    for r in range(k):
        tx, ty = _midranks(pos[r]), _midranks(neg[r])
        tz = _midranks(np.concatenate([pos[r], neg[r]]))
        aucs[r] = tz[:m].sum() / (m * n) - (m + 1.0) / (2.0 * n)
        v10[r] = (tz[:m] - tx) / n
        v01[r] = 1.0 - (tz[m:] - ty) / m
    cov = np.atleast_2d(np.cov(v10)) / m + np.atleast_2d(np.cov(v01)) / n
    return aucs, cov


def auc_delong(y_true: np.ndarray, score: np.ndarray) -> tuple[float, float]:
    """(AUC, its DeLong variance) for one model."""
    aucs, cov = delong_auc_cov(y_true, np.asarray(score)[None, :])
    return float(aucs[0]), float(cov[0, 0])


def paired_auc_test(y_true: np.ndarray, scores_a: np.ndarray, scores_b: np.ndarray, n_boot: int = 2000,
                    alpha: float = 0.05, seed: int = 0) -> dict:
    """Is model A's AUC different from model B's on the same images? Two-sided DeLong test.

    Returns auc_a, auc_b, diff = auc_a - auc_b, se, z, p_value and the (1 - alpha) CI of the difference
    (ci_low, ci_high) from DeLong's normal approximation, plus a paired stratified percentile bootstrap CI
    (boot_ci_low, boot_ci_high: both models scored on the same resamples) as an assumption-light cross-check,
    n_pos, n_neg, alpha, n_boot and ``method``. Values are NaN when a class has fewer than 2 images.
    """
    y = np.asarray(y_true).astype(bool)
    a, b = np.asarray(scores_a, dtype=np.float64), np.asarray(scores_b, dtype=np.float64)
    if not (y.shape == a.shape == b.shape) or y.ndim != 1:
        raise ValueError(f"y_true, scores_a, scores_b must be 1-D of one length: {y.shape}, {a.shape}, {b.shape}")
    aucs, cov = delong_auc_cov(y, np.stack([a, b]))
    diff = float(aucs[0] - aucs[1])
    var = float(cov[0, 0] + cov[1, 1] - 2 * cov[0, 1])
    zq = NormalDist().inv_cdf(1 - alpha / 2)
    if not math.isfinite(var):
        se = z = p = lo = hi = float("nan")
    elif var <= 1e-15:  # identical rankings (or both perfect): no evidence of a difference at all
        se, z = 0.0, 0.0 if abs(diff) < 1e-12 else math.copysign(math.inf, diff)
        p, lo, hi = (1.0 if z == 0.0 else 0.0), diff, diff
    else:
        se = math.sqrt(var)
        z = diff / se
        p = math.erfc(abs(z) / math.sqrt(2.0))  # two-sided normal tail
        lo, hi = diff - zq * se, diff + zq * se
    boot_lo = boot_hi = float("nan")
    if y.sum() and (~y).sum() and n_boot > 0:
        idx = bootstrap_indices(y, n_boot, seed, stratified=True)
        boot_lo, boot_hi = _nan_percentiles(_auc_resampled(y, a, idx) - _auc_resampled(y, b, idx), alpha)
    return {"auc_a": float(aucs[0]), "auc_b": float(aucs[1]), "diff": diff, "se": se, "z": z,
            "ci_low": lo, "ci_high": hi, "p_value": p, "boot_ci_low": boot_lo, "boot_ci_high": boot_hi,
            "n_pos": int(y.sum()), "n_neg": int((~y).sum()), "alpha": alpha, "n_boot": n_boot,
            "method": "DeLong test for correlated ROC curves (Sun & Xu 2014 algorithm); paired stratified "
                      "percentile bootstrap CI as cross-check"}


def paired_macro_auc_test(labels: np.ndarray, probs_a: np.ndarray, probs_b: np.ndarray, n_boot: int = 2000,
                          alpha: float = 0.05, seed: int = 0) -> dict:
    """:func:`paired_auc_test` for more than two classes: is A's macro one-vs-rest AUC different from B's on the
    same images? Both models are scored on the same class-stratified resamples; the difference's percentile
    interval is the CI, and its bootstrap standard error gives z and a two-sided normal p-value (DeLong's test is
    for one ROC curve per model; the macro AUC averages C correlated ones). Same keys as paired_auc_test."""
    labels = np.asarray(labels).astype(np.int64)
    a, b = np.asarray(probs_a, dtype=np.float64), np.asarray(probs_b, dtype=np.float64)
    if a.shape != b.shape or a.ndim != 2 or len(labels) != len(a):
        raise ValueError(f"probs_a, probs_b must be (N, C) of one shape and labels (N,): {a.shape}, {b.shape}")
    auc_a, auc_b = multiclass_metrics(a, labels)["auc"], multiclass_metrics(b, labels)["auc"]
    diff, nan = float(auc_a - auc_b), float("nan")
    se = z = p = lo = hi = nan
    if n_boot > 0 and len(labels) and math.isfinite(diff):
        idx = bootstrap_indices(labels, n_boot, seed, by_class=True)
        d = _multiclass_resampled(a, labels, idx)["auc"] - _multiclass_resampled(b, labels, idx)["auc"]
        lo, hi = _nan_percentiles(d, alpha)
        se = float(np.nanstd(d, ddof=1))
        if se <= 1e-15:   # identical rankings on every resample: no evidence of a difference
            z, p = 0.0 if abs(diff) < 1e-12 else math.copysign(math.inf, diff), 1.0 if abs(diff) < 1e-12 else 0.0
        else:
            z = diff / se
            p = math.erfc(abs(z) / math.sqrt(2.0))
    counts = np.bincount(labels, minlength=a.shape[1])
    return {"auc_a": float(auc_a), "auc_b": float(auc_b), "diff": diff, "se": se, "z": z, "ci_low": lo, "ci_high": hi,
            "p_value": p, "boot_ci_low": lo, "boot_ci_high": hi, "n_pos": int(len(labels)), "n_neg": 0,
            "class_counts": counts.tolist(), "alpha": alpha, "n_boot": n_boot,
            "method": "paired class-stratified bootstrap of the macro one-vs-rest AUC; p from its standard error"}


def auc_verdict(result: dict, names: tuple[str, str] = ("A", "B")) -> str:
    """One plain-language line for a :func:`paired_auc_test` result, e.g.
    ``"A is better (p=0.01; AUC 0.912 vs 0.874, difference +0.038, 95% CI +0.012 to +0.064)"``."""
    p, diff = result.get("p_value", float("nan")), result.get("diff", float("nan"))
    alpha = result.get("alpha", 0.05)
    if p is None or not math.isfinite(p):
        return "cannot compare: each class needs at least 2 images"
    p_txt = "p<0.001" if p < 0.001 else f"p={p:.2g}"
    detail = (f"AUC {result['auc_a']:.3f} vs {result['auc_b']:.3f}, difference {diff:+.3f}, "
              f"{100 * (1 - alpha):.0f}% CI {result['ci_low']:+.3f} to {result['ci_high']:+.3f}")
    if p < alpha:
        return f"{names[0] if diff > 0 else names[1]} is better ({p_txt}; {detail})"
    return f"no significant difference ({p_txt}; {detail})"


# ---------------------------------------------------------------------------------------------------
# Calibration that cannot run away (issue 10 §6): temperature bounded, and refused when the data cannot
# support it.
# ---------------------------------------------------------------------------------------------------


def _np(x) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().numpy()
    return np.asarray(x)


def calibration_check(logits, labels, min_per_class: int = 30) -> tuple[bool, str]:
    """(ok, note): can a temperature be fitted on this validation set? ``note`` says why not ("" when ok).

    Two cases where the NLL-optimal temperature is meaningless: (1) too few images per class — the fit follows
    a handful of examples; (2) no validation errors — the NLL keeps decreasing as T -> 0, so an unbounded fit
    runs to its clamp and shows "100 %" for everything (issue 10: T = 0.05 on the quick demo model).
    """
    z, y = _np(logits).astype(np.float64), _np(labels).astype(np.int64).reshape(-1)
    n_cls = z.shape[1] if z.ndim == 2 else int(y.max(initial=0)) + 1
    counts = np.bincount(y, minlength=max(n_cls, 1))
    if counts.min() < min_per_class:
        return False, (f"validation set too small to calibrate (images per class: {counts.tolist()}, "
                       f"need >= {min_per_class} each); temperature left at 1")
    if z.ndim == 2 and len(y) and int((z.argmax(axis=1) != y).sum()) == 0:
        return False, ("validation set perfectly separated (no errors), so its likelihood cannot estimate a "
                       "temperature; left at 1")
    return True, ""


def _nll(z: np.ndarray, y: np.ndarray, beta: float) -> float:
    s = beta * z
    mx = s.max(axis=1, keepdims=True)
    lse = mx[:, 0] + np.log(np.exp(s - mx).sum(axis=1))
    return float(np.mean(lse - s[np.arange(len(y)), y]))


def fit_temperature_bounded(logits, labels, t_min: float = 0.5, t_max: float = 10.0,
                            min_per_class: int = 30) -> tuple[float, str]:
    """Temperature scaling (Guo et al. 2017) with T restricted to [t_min, t_max]: returns (T, note).

    ``note`` is "" when the fit is unremarkable; otherwise it says why T = 1 was kept
    (:func:`calibration_check`) or that T stopped at a bound. The NLL of logits * beta is convex in
    beta = 1/T, so a golden-section search on [1/t_max, 1/t_min] finds the constrained optimum exactly.
    Why these bounds: T < 0.5 would more than double every logit (turning 73 % into 88 %, 88 % into 98 %) —
    far beyond what a validation set of a few hundred images can justify; T > 10 flattens everything to ~50 %.
    Accepts torch tensors or numpy arrays.
    """
    if not 0 < t_min <= 1.0 <= t_max:
        raise ValueError(f"need 0 < t_min <= 1 <= t_max, got {t_min}, {t_max}")
    ok, note = calibration_check(logits, labels, min_per_class)
    if not ok:
        return 1.0, note
    z, y = _np(logits).astype(np.float64), _np(labels).astype(np.int64).reshape(-1)
    lo, hi = 1.0 / t_max, 1.0 / t_min
    g = (math.sqrt(5.0) - 1.0) / 2.0
    c, d = hi - g * (hi - lo), lo + g * (hi - lo)
    fc, fd = _nll(z, y, c), _nll(z, y, d)
    for _ in range(80):  # interval shrinks by 0.618 per step: ~1e-17 of the start
        if fc < fd:
            hi, d, fd = d, c, fc
            c = hi - g * (hi - lo)
            fc = _nll(z, y, c)
        else:
            lo, c, fc = c, d, fd
            d = lo + g * (hi - lo)
            fd = _nll(z, y, d)
    beta = (lo + hi) / 2.0
    t = float(min(max(1.0 / beta, t_min), t_max))
    if not math.isfinite(t):
        return 1.0, "temperature fit failed (non-finite); left at 1"
    if t <= t_min * (1 + 1e-3) or t >= t_max * (1 - 1e-3):
        t = t_min if t <= t_min * (1 + 1e-3) else t_max  # the search converges to the bound, not onto it
        return t, f"temperature stopped at its bound ({t:.3g}, allowed {t_min:g}-{t_max:g}); the model's " \
                  "confidence on validation is far from its accuracy"
    return t, ""


# ---------------------------------------------------------------------------------------------------
# Any number of classes (issue 13): each class one-vs-rest, headline numbers = macro (unweighted) averages.
# ---------------------------------------------------------------------------------------------------

PER_CLASS_METRICS = ("auc", "sensitivity", "specificity", "precision", "f1")
CI_KEYS = ("auc", "sensitivity", "specificity", "f1", "ece")  # the metrics split_report gives intervals for


def _checked(probs, labels, classes) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """(probs (N, C) float, labels (N,) int, C class names); names default to "0", "1", ... ."""
    probs = np.asarray(probs, dtype=np.float64)
    labels = np.asarray(labels).reshape(-1)
    if probs.ndim != 2 or probs.shape[0] != len(labels) or probs.shape[1] < 2:
        raise ValueError(f"probs must be (N, C >= 2) with one row per label, got {probs.shape} for {len(labels)}")
    c = probs.shape[1]
    if len(labels) and (not np.issubdtype(labels.dtype, np.integer) or labels.min() < 0 or labels.max() >= c):
        raise ValueError(f"labels must be integer classes in [0, {c}), got {labels.dtype} {np.unique(labels)[:5]}")
    names = [str(i) for i in range(c)] if classes is None else [str(n) for n in classes]
    if len(names) != c or len(set(names)) != c:
        raise ValueError(f"need {c} distinct class names for {c} probability columns, got {list(names)}")
    return probs, labels.astype(np.int64), names


def _per_class_rates(cm: np.ndarray) -> dict[str, np.ndarray]:
    """One-vs-rest sensitivity, specificity, precision and F1 of each class from confusion matrices (..., C, C)
    (rows = true, columns = predicted); arrays (..., C), NaN where a rate is 0/0.

    F1 is 2TP / (2TP + FP + FN): the same as 2PR / (P + R) where both are defined, but also defined (0) for a
    class that occurs and is never predicted — exactly the failure a macro F1 must not leave out.
    Works on one matrix (the point estimate) and on a stack of bootstrap matrices alike, so the two agree.
    """
    cm = cm.astype(np.float64)
    tp = np.diagonal(cm, axis1=-2, axis2=-1)
    support, predicted = cm.sum(-1), cm.sum(-2)
    fn, fp = support - tp, predicted - tp
    tn = cm.sum((-2, -1))[..., None] - tp - fn - fp
    with np.errstate(invalid="ignore", divide="ignore"):
        return {"sensitivity": np.where(support > 0, tp / support, np.nan),
                "specificity": np.where(tn + fp > 0, tn / (tn + fp), np.nan),
                "precision": np.where(predicted > 0, tp / predicted, np.nan),
                "f1": np.where(2 * tp + fp + fn > 0, 2 * tp / (2 * tp + fp + fn), np.nan)}


def _macro(per: dict[str, np.ndarray], present: np.ndarray) -> dict[str, np.ndarray]:
    """Unweighted mean over the classes that occur in the labels (last axis), of the finite values.

    A class absent from the split has no sensitivity or AUC and is left out (not counted as 0 or 1). A class that
    occurs but is never predicted has precision 0/0; it counts as 0 in the macro precision (as scikit-learn's
    ``zero_division=0``) so that never predicting a class lowers the average instead of vanishing from it.
    """
    out = {}
    for k, v in per.items():
        v = v[..., present]
        if k == "precision":
            v = np.nan_to_num(v, nan=0.0)
        ok = np.isfinite(v)
        count = ok.sum(-1)
        with np.errstate(invalid="ignore", divide="ignore"):
            out[k] = np.where(count > 0, np.where(ok, v, 0.0).sum(-1) / np.maximum(count, 1), np.nan)
    return out


def multiclass_metrics(probs: np.ndarray, labels: np.ndarray, classes=None) -> dict:
    """Metrics for C >= 2 classes from probabilities (N, C) and integer labels (N,); the prediction is the argmax.

    Keys: ``n``, ``accuracy``; macro averages ``auc`` (one-vs-rest, over the classes with both positives and
    negatives), ``sensitivity`` (macro recall), ``specificity``, ``precision``, ``f1`` (see ``_macro``); ``ece``
    (of the predicted class); ``confusion`` (C x C, rows = true class, columns = predicted, in class order) and
    ``per_class`` = {name: {auc, sensitivity, specificity, precision, f1, n}} with ``classes`` as names ("0",
    "1", ... when None). NaN where undefined (``clean`` makes it None for JSON).
    """
    probs, labels, names = _checked(probs, labels, classes)
    c, n = probs.shape[1], len(labels)
    pred = probs.argmax(axis=1)
    cm = np.bincount(labels * c + pred, minlength=c * c).reshape(c, c)
    per = _per_class_rates(cm)
    per["auc"] = np.array([roc_auc(labels == k, probs[:, k]) for k in range(c)])
    support = cm.sum(axis=1)
    macro = _macro(per, support > 0)
    return {
        "n": n,
        "accuracy": _safe_div(float(np.trace(cm)), n),
        **{k: float(macro[k]) for k in PER_CLASS_METRICS},
        "ece": expected_calibration_error(probs, labels) if n else float("nan"),
        "confusion": cm.tolist(),
        "per_class": {name: {**{k: float(per[k][i]) for k in PER_CLASS_METRICS}, "n": int(support[i])}
                      for i, name in enumerate(names)},
    }


def metrics_for(probs: np.ndarray, labels: np.ndarray, positive: int = 0, classes=None) -> dict:
    """``binary_metrics`` (today's numbers, positive class ``positive``) for two classes, otherwise
    ``multiclass_metrics``: the one call for per-epoch validation whatever the number of classes."""
    probs = np.asarray(probs, dtype=np.float64)
    if probs.ndim == 2 and probs.shape[1] == 2:
        return binary_metrics(probs, labels, positive)
    return multiclass_metrics(probs, labels, classes)


def roc_per_class(probs: np.ndarray, labels: np.ndarray, classes=None, max_points: int = 101) -> dict:
    """{class name: ``roc_points`` of that class against the rest}. A class without both positive and negative
    images has no ROC curve and is left out (``roc_curve`` would draw a meaningless flat line for it)."""
    probs, labels, names = _checked(probs, labels, classes)
    out = {}
    for k, name in enumerate(names):
        y = labels == k
        if y.any() and (~y).any():
            out[name] = roc_points(y, probs[:, k], max_points)
    return out


def _multiclass_resampled(probs: np.ndarray, labels: np.ndarray, idx: np.ndarray, bins: int = 15) -> dict:
    """Macro metrics (and ``class_auc`` (B, C)) of every row of ``idx`` at once: one bincount gives all the
    confusion matrices, ``_auc_resampled`` each class's one-vs-rest AUC."""
    c, b = probs.shape[1], len(idx)
    pred = probs.argmax(axis=1)
    keys = (labels * c + pred)[idx] + (np.arange(b) * c * c)[:, None]
    per = _per_class_rates(np.bincount(keys.ravel(), minlength=b * c * c).reshape(b, c, c))
    present = np.bincount(labels, minlength=c) > 0  # class-stratified resamples keep every class's count
    per["auc"] = np.stack([_auc_resampled(labels == k, probs[:, k], idx) if present[k] else np.full(b, np.nan)
                           for k in range(c)], axis=1)
    out = _macro(per, present)
    out["ece"] = _ece_resampled(probs.max(axis=1), (pred == labels).astype(np.float64), idx, bins)
    out["class_auc"] = per["auc"]
    return out


def _multiclass_split_report(probs, labels, n_boot: int, seed: int, classes, alpha: float = 0.05) -> dict:
    """``split_report`` for C > 2: ``multiclass_metrics`` + ``threshold`` None (the decision is the argmax) +
    ``ci`` for the macro metrics and ``per_class[name]["ci"]["auc"]``, from one class-stratified bootstrap."""
    probs, labels, names = _checked(probs, labels, classes)
    out = {**multiclass_metrics(probs, labels, names), "threshold": None}
    if n_boot and len(labels):
        boot = _multiclass_resampled(probs, labels, bootstrap_indices(labels, n_boot, seed, by_class=True))
        out["ci"] = {k: list(_nan_percentiles(boot[k], alpha)) for k in CI_KEYS}
        for k, name in enumerate(names):
            out["per_class"][name]["ci"] = {"auc": list(_nan_percentiles(boot["class_auc"][:, k], alpha))}
    return out


def split_report(probs: np.ndarray, labels: np.ndarray, positive: int = 0, threshold: float | None = None,
                 n_boot: int = 2000, seed: int = 0, classes=None) -> dict:
    """Everything we report for one split, at the model's operating point, with 95 % bootstrap intervals.

    ``probs``: (N, C) calibrated class probabilities; ``labels``: integer classes; ``threshold``: the
    decision threshold on P(positive) (None = the most probable class, i.e. 0.5 for two classes).
    Keys as ``binary_metrics`` plus ``threshold`` and ``ci`` = {metric: [low, high]} for AUC, sensitivity,
    specificity, F1 and ECE (stratified percentile bootstrap, ``n_boot`` resamples, seeded).
    More than two classes: keys as ``multiclass_metrics`` (named by ``classes``) plus ``threshold`` None — a
    threshold on one class's probability has no meaning there, so ``positive`` and ``threshold`` are ignored —
    and ``ci`` for the macro AUC, sensitivity, specificity, F1 and ECE, and ``per_class[name]["ci"]["auc"]``
    (bootstrap stratified by class).
    """
    probs, labels = np.asarray(probs, dtype=np.float64), np.asarray(labels)
    if probs.ndim == 2 and probs.shape[1] > 2:
        return _multiclass_split_report(probs, labels, n_boot, seed, classes)
    if threshold is None or probs.shape[1] != 2:
        out = {**binary_metrics(probs, labels, positive), "threshold": 0.5}
    else:
        out = {**binary_metrics_at(labels == positive, probs[:, positive], threshold),
               "ece": expected_calibration_error(probs, labels) if len(labels) else float("nan")}
    is_pos = labels == positive
    if n_boot and is_pos.any() and (~is_pos).any():
        ci = bootstrap_ci(is_pos, probs[:, positive], ("auc", "sensitivity", "specificity", "f1", "ece"),
                          threshold=out["threshold"], n_boot=n_boot, seed=seed)
        out["ci"] = {k: [v.low, v.high] for k, v in ci.items()}
    elif n_boot and len(labels):
        # One class only (normal X-rays from another hospital, say): AUC and the other rate are undefined, and a
        # percentile bootstrap of a rate at 0 or 1 collapses to a point ([1, 1] for 8 of 8). The Wilson score
        # interval is the standard one for a single proportion and stays honest at the boundary.
        key = "sensitivity" if is_pos.all() else "specificity"
        out["ci"] = {key: list(wilson_interval(round(out[key] * len(labels)), len(labels)))}
        out["ci_note"] = f"{key}: Wilson score interval (one class only)"
    return out


def wilson_interval(k: int, n: int, z: float = 1.959964) -> tuple[float, float]:
    """95 % Wilson score interval of a proportion k / n (Wilson 1927; Brown, Cai & DasGupta 2001)."""
    if n <= 0:
        return float("nan"), float("nan")
    p, z2 = k / n, z * z
    centre = (p + z2 / (2 * n)) / (1 + z2 / n)
    half = z * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n)) / (1 + z2 / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def clean(d):
    """Replace NaN/inf by None recursively so that metrics serialise as JSON."""
    if isinstance(d, dict):
        return {k: clean(v) for k, v in d.items()}
    if isinstance(d, (list, tuple)):
        return [clean(v) for v in d]
    if isinstance(d, float) and not math.isfinite(d):
        return None
    return d
