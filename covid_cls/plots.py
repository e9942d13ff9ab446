"""Matplotlib figures (Agg backend, no display needed): curves, confusion matrix, ROC."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from .data import CLASSES, POSITIVE  # noqa: E402


def curves(history: Sequence[dict[str, Any]], steps: Sequence[tuple[float, float]] = (),
           title: str = "") -> plt.Figure:
    """Loss and accuracy per epoch (train and validation); ``steps`` = (fractional epoch, loss) points."""
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(9, 3.4), constrained_layout=True)
    ep = [h["epoch"] for h in history]
    if steps:
        xs, ys = zip(*steps)
        ax_loss.plot(xs, ys, color="0.75", lw=1, label="train (steps)")
    if history:
        ax_loss.plot(ep, [h["train"]["loss"] for h in history], "o-", label="train")
        ax_loss.plot(ep, [h["val"].get("loss") for h in history], "s-", label="validation")
        ax_acc.plot(ep, [h["train"]["accuracy"] for h in history], "o-", label="train acc")
        ax_acc.plot(ep, [h["val"].get("accuracy") for h in history], "s-", label="val acc")
        ax_acc.plot(ep, [h["val"].get("auc") for h in history], "^--", label="val AUC")
    ax_loss.set(xlabel="epoch", ylabel="loss", title="loss")
    ax_acc.set(xlabel="epoch", ylim=(0, 1.02), title="accuracy / AUC")
    for ax in (ax_loss, ax_acc):
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    if title:
        fig.suptitle(title, fontsize=10)
    return fig


def confusion_names(classes: Sequence[str], positive: str) -> list[str]:
    """The row/column names of a model's confusion matrix: its classes in order (N x N), or for two classes the
    positive one first, as ``metrics.binary_metrics`` counts it."""
    return list(classes) if len(classes) != 2 else [positive] + [c for c in classes if c != positive]


def confusion(cm: Sequence[Sequence[int]], title: str = "confusion matrix",
              classes: Sequence[str] | None = None) -> plt.Figure:
    """``cm`` rows = true class, columns = predicted, as ``metrics.binary_metrics`` / ``multiclass_metrics`` give
    it; ``classes`` names them in that order. Without names a 2 x 2 matrix is the binary one (infected, normal)
    and a larger one is numbered. Figure, font and labels scale so that 20 classes stay readable."""
    cm = np.asarray(cm)
    c = cm.shape[0]
    if classes is None:
        classes = [POSITIVE] + [k for k in CLASSES if k != POSITIVE] if c == 2 else [str(i) for i in range(c)]
    if len(classes) != c or cm.shape != (c, c):
        raise ValueError(f"confusion matrix {cm.shape} needs {c} x {c} cells and {c} class names, got {len(classes)}")
    side = max(3.6, 0.42 * c + 1.6)  # ~0.4 inch per cell: room for a 3-4 digit count at the font below
    fig, ax = plt.subplots(figsize=(side, 3.2 if c <= 3 else side * 0.9), constrained_layout=True)
    ax.imshow(cm, cmap="Blues")
    font = 12 if c <= 3 else max(6.0, 13.0 - 0.4 * c)
    for i in range(c):
        for j in range(c):
            ax.text(j, i, str(cm[i, j]), ha="center", va="center",
                    color="white" if cm[i, j] > cm.max() / 2 else "black", fontsize=font)
    ax.set_xticks(range(c), classes, fontsize=min(10, font))
    ax.set_yticks(range(c), classes, fontsize=min(10, font))
    if c > 2:  # more names than fit side by side under the columns
        plt.setp(ax.get_xticklabels(), rotation=45, ha="right", rotation_mode="anchor")
    ax.set(xlabel="predicted", ylabel="true", title=title)
    return fig


def roc(curves_by_name: dict[str, tuple[Sequence[float], Sequence[float], float | None]],
        title: str = "ROC (positive: infected)") -> plt.Figure:
    """``curves_by_name``: name -> (false positive rates, true positive rates, AUC); pass ``title`` for anything
    but the binary task's curves (:func:`roc_one_vs_rest` does)."""
    many = len(curves_by_name) > 6  # per-class curves: a wider figure, the legend beside the axes
    fig, ax = plt.subplots(figsize=(6.4, 3.8) if many else (3.8, 3.4), constrained_layout=True)
    for i, (name, (fpr, tpr, auc)) in enumerate(curves_by_name.items()):
        # the colour cycle has 10 colours: curves 11-20 (up to 20 classes) repeat them, dashed
        ax.plot(fpr, tpr, "-" if i < 10 else "--", label=f"{name} (AUC {auc:.3f})" if auc is not None else name)
    ax.plot([0, 1], [0, 1], ":", color="0.6")
    ax.set(xlabel="1 - specificity", ylabel="sensitivity", title=title, xlim=(0, 1), ylim=(0, 1.01))
    if many:
        ax.legend(fontsize=6, loc="upper left", bbox_to_anchor=(1.02, 1.0), ncol=1 + len(curves_by_name) // 14)
    else:
        ax.legend(fontsize=8, loc="lower right")
    ax.grid(alpha=0.3)
    return fig


def roc_one_vs_rest(roc_per_class: dict[str, dict[str, Sequence[float]]], per_class: dict[str, dict] | None = None,
                    title: str = "ROC, each class vs the rest") -> plt.Figure:
    """One curve per class from ``metrics.roc_per_class`` ({name: {"fpr", "tpr"}}), each labelled with its AUC
    from ``per_class`` (a metrics dict's ``per_class``) when given."""
    per_class = per_class or {}
    return roc({name: (pts["fpr"], pts["tpr"], (per_class.get(name) or {}).get("auc"))
                for name, pts in roc_per_class.items()}, title=title)


def risk_coverage(curve: dict[str, Sequence[float]], aurc: float | None = None,
                  rule: tuple[float, float] | None = None, title: str = "risk–coverage") -> plt.Figure:
    """Error rate of the answered images vs the fraction answered (most confident first), as
    ``evaluation.selective_report`` gives it (``{"coverage": [...], "risk": [...]}``); ``rule`` = (coverage,
    risk) of the abstention rule the Predictor applies, marked as a point."""
    fig, ax = plt.subplots(figsize=(3.8, 3.4), constrained_layout=True)
    label = f"softmax confidence (AURC {aurc:.3f})" if aurc is not None else "softmax confidence"
    ax.plot(curve.get("coverage", []), curve.get("risk", []), label=label)
    if rule is not None and None not in rule:
        ax.plot([rule[0]], [rule[1]], "o", color="C3", label="with the abstention rule")
    ax.set(xlabel="coverage (fraction answered)", ylabel="risk (error rate of the answered)", title=title,
           xlim=(0, 1.01), ylim=(0, None))
    ax.legend(fontsize=8, loc="upper left")
    ax.grid(alpha=0.3)
    return fig


def overlaid_validation(runs: dict[str, Sequence[dict[str, Any]]], metric: str = "auc") -> plt.Figure:
    """Validation ``metric`` per epoch of several runs on one axis (the study view)."""
    fig, ax = plt.subplots(figsize=(6, 3.4), constrained_layout=True)
    for name, hist in runs.items():
        ax.plot([h["epoch"] for h in hist], [h["val"].get(metric) for h in hist], "o-", label=name)
    ax.set(xlabel="epoch", ylabel=f"validation {metric}", title=f"validation {metric} per run")
    ax.grid(alpha=0.3)
    if runs:
        ax.legend(fontsize=8)
    return fig


def save(fig: plt.Figure, path) -> None:
    fig.savefig(path, dpi=110)
    plt.close(fig)
