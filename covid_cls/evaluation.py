"""Evaluating a saved model on any labelled folder, and comparing two models on the same images.

Trust is measured here (issue 10): every metric comes with a 95 % bootstrap interval, each source of a
``MANIFEST.csv`` is reported separately (the NIH-only subset of cxr-real, the hospitals of cxr-shift), the
abstention rule the Predictor applies (OOD check + conformal set) is applied to every image so that "how many
wrong answers would have said 'uncertain'" is a number, and images that nearly duplicate the model's training
images are listed (a test image seen in training proves nothing).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from .card import Card
from .checkpoints import load_checkpoint, model_from_checkpoint
from .config import TrainConfig
from .data import DecodedCache, DecodedSplit, read_manifest, scan_dataset
from .metrics import (
    auc_verdict,
    bootstrap_ci,
    clean,
    paired_auc_test,
    paired_macro_auc_test,
    roc_per_class,
    roc_points,
    split_report,
)
from .ood import layout_features, score
from .runtime import Runtime
from .selective import set_abstains


@dataclass
class Scored:
    """One model's outputs on one decoded split."""

    card: Card
    split: DecodedSplit
    probs: np.ndarray          # (N, C) calibrated
    notes: list[str]           # what the scan said (classes absent from the images)
    flags: dict[str, np.ndarray]   # reason -> (N,) bool: why the Predictor would answer "uncertain"


def score_checkpoint(path: str | os.PathLike, data_dir: str | os.PathLike, split: str = "test",
                     device: str = "auto", batch_size: int = 64, precision: str = "fp32", roots=None) -> Scored:
    """Run a checkpoint over a split (or a flat labelled folder) exactly as the Predictor would (fp32 by
    default, same preprocessing), keeping what every later report needs. ``roots``: the folders the images may
    come from, checked for every file when it is opened (the app passes its data roots; None: no restriction)."""
    from .engine import backbone_features

    rt = Runtime.create(device, precision)
    ckpt = load_checkpoint(path)
    card = ckpt.card
    model = model_from_checkpoint(ckpt, rt.device).requires_grad_(False)
    rt.model(model)
    # the model's classes, in its order; a set with only some of them (normal X-rays only, say) is measured too
    info = scan_dataset(data_dir, splits=(split,), classes=card.classes, roots=roots, partial_ok=True)
    d = DecodedCache(card.cache_size, roots=roots).get(info.splits[split], info.root)
    cfg = TrainConfig.from_dict({**card.config, "augment": False, "image_size": card.image_size})
    logits, pooled = backbone_features(model, d.images, cfg, rt, batch_size, head_input=False)
    probs = torch.softmax(logits.float().cpu() / card.temperature, 1).numpy()
    return Scored(card, d, probs, info.notes, _flags(card, ckpt.ood_stats, probs, pooled.cpu(), d.images))


def _flags(card: Card, stats: dict | None, probs: np.ndarray, pooled: torch.Tensor, u8: torch.Tensor):
    """The Predictor's abstention rule per image (its cheap colour/aspect checks need the original file and
    are left out here): features or layout far from training (ood.py), or a conformal set of size != 1."""
    flags: dict[str, np.ndarray] = {}
    for name, feat in (("features unlike the training X-rays", pooled),
                       ("layout unlike the training X-rays", layout_features(u8))):
        st = (stats or {}).get("features" if name.startswith("features") else "layout")
        if st:
            flags[name] = (score(feat, st) > float(st["threshold"])).numpy()
    sets = card.conformal_sets(probs)
    if sets is not None:
        several = "both classes" if card.num_classes == 2 else "several classes"
        flags[f"conformal set holds {several} (or none)"] = set_abstains(sets)
    return flags


def selective_report(card: Card, s: Scored) -> dict[str, Any]:
    """How the abstention rule behaves: share flagged, share of WRONG answers flagged (the point of it),
    accuracy of what is still answered, and the risk-coverage curve of the softmax confidence."""
    from .selective import risk_coverage

    labels = s.split.labels.numpy()
    correct = card.decide(s.probs) == labels
    flagged = np.zeros(len(labels), bool)
    for f in s.flags.values():
        flagged |= f
    wrong = ~correct
    rc = risk_coverage(correct, s.probs.max(1))
    step = max(1, len(rc["coverage"]) // 50)
    return {
        "flagged": float(flagged.mean()) if len(labels) else 0.0,
        "wrong": int(wrong.sum()), "wrong_flagged": int((wrong & flagged).sum()),
        "wrong_flagged_share": float((wrong & flagged).sum() / wrong.sum()) if wrong.any() else None,
        "answered_accuracy": float(correct[~flagged].mean()) if (~flagged).any() else None,
        "by_reason": {k: float(v.mean()) for k, v in s.flags.items()},
        "aurc": rc["aurc"], "e_aurc": rc["e_aurc"],
        "risk_coverage": {"coverage": rc["coverage"][::step].tolist(), "risk": rc["risk"][::step].tolist()},
    }


def _short(source: str) -> str:
    return source.split(" (")[0].split(" - ")[0].strip()


def duplicates_of_training(card: Card, s: Scored, limit: int = 50) -> dict[str, Any]:
    """Evaluated images that nearly duplicate one of the model's training images (perceptual hash)."""
    from .leakage import hash_from_hex, near_duplicates, phash

    hexes = card.data.get("train_hashes")
    if not hexes:
        return {"checked": False, "note": "this checkpoint stores no training-image hashes"}
    pairs = near_duplicates(phash(s.split.images), hash_from_hex(hexes))
    return {"checked": True, "count": len({i for i, _, _ in pairs}),
            "pairs": [{"file": s.split.files[i], "train_index": j, "distance": dist} for i, j, dist in pairs[:limit]]}


def evaluate_checkpoint(path: str | os.PathLike, data_dir: str | os.PathLike, split: str = "test",
                        device: str = "auto", batch_size: int = 64, precision: str = "fp32",
                        n_boot: int = 2000, roots=None) -> dict[str, Any]:
    """Metrics of a saved model on one split of a dataset, or on a flat labelled folder (one folder per class
    of the model, e.g. ``infected/`` ``normal/``), at the model's operating point, with 95 % bootstrap
    intervals, per source (MANIFEST.csv), the abstention rule's behaviour and near-duplicates of training images.

    Also returns per-image ``files``, ``labels``, ``probs`` (classes order) and ``flagged``.
    """
    s = score_checkpoint(path, data_dir, split, device, batch_size, precision, roots)
    card, labels = s.card, s.split.labels.numpy()
    pos = card.positive_index
    report = split_report(s.probs, labels, pos, card.threshold, n_boot=n_boot, classes=card.classes)
    report["roc"] = roc_points(labels == pos, s.probs[:, pos])
    if card.num_classes > 2:
        report["roc_per_class"] = roc_per_class(s.probs, labels, card.classes)
    subsets = {}
    source = read_manifest(data_dir)
    for name in sorted({source.get(f, "") for f in s.split.files} - {""}):
        idx = [i for i, f in enumerate(s.split.files) if source.get(f) == name]
        sub = split_report(s.probs[idx], labels[idx], pos, card.threshold, n_boot=n_boot, classes=card.classes)
        subsets[_short(name)] = clean(sub)
    flagged = np.zeros(len(labels), bool)
    for f in s.flags.values():
        flagged |= f
    return {**clean(report), "split": split, "classes": card.classes, "positive": card.positive, "subsets": subsets,
            "threshold": card.threshold, "temperature": card.temperature,
            "selective": clean(selective_report(card, s)), "duplicates": duplicates_of_training(card, s),
            "weights_origin": card.weights_origin, "checkpoint": str(path), "files": s.split.files,
            "labels": labels.tolist(), "probs": s.probs.tolist(), "flagged": flagged.tolist(),
            "skipped": s.split.skipped, "notes": s.notes}


def compare_checkpoints(path_a: str | os.PathLike, path_b: str | os.PathLike, data_dir: str | os.PathLike,
                        split: str = "test", device: str = "auto", n_boot: int = 2000, roots=None) -> dict[str, Any]:
    """Two models on the SAME images: each one's AUC, the paired difference with DeLong's test and a paired
    bootstrap interval, and a plain verdict (does B really beat A, or is the difference noise?). With more than
    two classes the macro one-vs-rest AUC is compared (``about`` = "macro"; ``metrics.paired_macro_auc_test``)."""
    a = score_checkpoint(path_a, data_dir, split, device, roots=roots)
    b = score_checkpoint(path_b, data_dir, split, device, roots=roots)
    if a.split.files != b.split.files:
        raise ValueError("the two checkpoints decoded different images; compare them on the same folder")
    if a.card.classes != b.card.classes:
        raise ValueError(f"the two models have different classes: {a.card.classes} vs {b.card.classes}")
    labels, names = a.split.labels.numpy(), (a.card.name or "A", b.card.name or "B")
    if a.card.num_classes > 2:   # the macro one-vs-rest AUC, paired bootstrap
        res = paired_macro_auc_test(labels, a.probs, b.probs, n_boot=n_boot)
        about, rest = "macro", "other"
    else:
        pos = a.card.positive_index
        res = paired_auc_test(labels == pos, a.probs[:, pos], b.probs[:, pos], n_boot=n_boot)
        about, rest = a.card.positive, next(c for c in a.card.classes if c != a.card.positive)
    cis = {key: _auc_ci(s, labels, n_boot) for key, s in (("auc_a_ci", a), ("auc_b_ci", b))}
    return {**clean(res), **clean(cis), "a": str(path_a), "b": str(path_b), "names": list(names),
            "n": int(len(labels)), "split": split, "verdict": auc_verdict(res, names), "about": about,
            "rest": rest, "classes": a.card.classes}


def _auc_ci(s: Scored, labels: np.ndarray, n_boot: int) -> list[float] | None:
    """A model's own AUC interval, from the same seeded resamples as its ``evaluate_checkpoint`` (the macro AUC's
    for more than two classes); None when it cannot be had."""
    if s.card.num_classes > 2:
        return (split_report(s.probs, labels, n_boot=n_boot, classes=s.card.classes).get("ci") or {}).get("auc")
    y = labels == s.card.positive_index
    if not (n_boot and y.any() and (~y).any()):
        return None
    iv = bootstrap_ci(y, s.probs[:, s.card.positive_index], ("auc",), n_boot=n_boot)["auc"]
    return [iv.low, iv.high]

__all__ = ["Scored", "score_checkpoint", "evaluate_checkpoint", "compare_checkpoints", "selective_report",
           "duplicates_of_training"]
