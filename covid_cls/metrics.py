"""Classification metrics for a binary task, positive class = ``infected``.

Accuracy alone hides what matters clinically: sensitivity (infected cases found) and specificity
(normal cases left alone) are always reported, with ROC AUC and calibration (ECE).
"""

from __future__ import annotations

import math

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
    sens, spec, prec = _safe_div(tp, tp + fn), _safe_div(tn, tn + fp), _safe_div(tp, tp + fp)
    f1 = _safe_div(2 * prec * sens, prec + sens) if not (math.isnan(prec) or math.isnan(sens)) else float("nan")
    n = len(labels)
    return {
        "n": n,
        "accuracy": _safe_div(tp + tn, n),
        "sensitivity": sens,
        "specificity": spec,
        "precision": prec,
        "f1": f1,
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


def clean(d):
    """Replace NaN/inf by None recursively so that metrics serialise as JSON."""
    if isinstance(d, dict):
        return {k: clean(v) for k, v in d.items()}
    if isinstance(d, (list, tuple)):
        return [clean(v) for v in d]
    if isinstance(d, float) and not math.isfinite(d):
        return None
    return d
