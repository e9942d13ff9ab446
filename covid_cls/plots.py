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


def confusion(cm: Sequence[Sequence[int]], title: str = "confusion matrix") -> plt.Figure:
    """``cm`` rows = true (infected, normal), columns = predicted, as metrics.binary_metrics gives it."""
    cm = np.asarray(cm)
    names = [POSITIVE] + [c for c in CLASSES if c != POSITIVE]
    fig, ax = plt.subplots(figsize=(3.6, 3.2), constrained_layout=True)
    ax.imshow(cm, cmap="Blues")
    for i in range(2):
        for j in range(2):
            ax.text(j, i, str(cm[i, j]), ha="center", va="center",
                    color="white" if cm[i, j] > cm.max() / 2 else "black", fontsize=12)
    ax.set_xticks([0, 1], names)
    ax.set_yticks([0, 1], names)
    ax.set(xlabel="predicted", ylabel="true", title=title)
    return fig


def roc(curves_by_name: dict[str, tuple[Sequence[float], Sequence[float], float | None]],
        title: str = "ROC (positive: infected)") -> plt.Figure:
    """``curves_by_name``: name -> (false positive rates, true positive rates, AUC)."""
    fig, ax = plt.subplots(figsize=(3.8, 3.4), constrained_layout=True)
    for name, (fpr, tpr, auc) in curves_by_name.items():
        ax.plot(fpr, tpr, label=f"{name} (AUC {auc:.3f})" if auc is not None else name)
    ax.plot([0, 1], [0, 1], ":", color="0.6")
    ax.set(xlabel="1 - specificity", ylabel="sensitivity", title=title, xlim=(0, 1), ylim=(0, 1.01))
    ax.legend(fontsize=8, loc="lower right")
    ax.grid(alpha=0.3)
    return fig


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
