"""Out-of-distribution warning: "this does not look like the chest X-rays this model was trained on".

Feature-space check (Lee et al. 2018, "A Simple Unified Framework for Detecting Out-of-Distribution
Samples and Adversarial Attacks"): class means and one shared covariance of the pooled backbone features
of the training set; the score of an image is its smallest Mahalanobis distance to a class mean. The
threshold is a high quantile of the validation scores, so about (1 - quantile) of in-distribution images
are flagged. The pooled feature is the global average of the Grad-CAM target layer's output (512-d for
both archs), which the Predictor already has from its Grad-CAM forward pass: the check costs nothing extra.

Cheap checks beside it: strong colour (radiographs are gray), extreme aspect ratio, a blank image.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import nn

QUANTILE = 0.99
MARGIN = 1.2             # threshold = MARGIN x the validation quantile: a 99 % quantile estimated from
                         # ~100 validation images is noisy, and a false alarm on a real X-ray costs trust
SHRINKAGE = 0.1          # covariance shrinkage towards a scaled identity: 512 dims from ~1000 images
RIDGE_FLOOR = 1e-6       # smallest identity scale, relative to the features' mean square (never singular)
LAYOUT_GRID = 8          # layout feature: 8x8 thumbnail + 16-bin histogram of the preprocessed square
MAX_COLOURFULNESS = 12.0  # Hasler-Suesstrunk; gray scans and JPEG noise stay well below
MAX_ASPECT = 2.0


def pooled_features(model: nn.Module, x: torch.Tensor, head_input: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits, or the head's input with ``head_input``; pooled Grad-CAM-layer features (N, C)) in one pass."""
    grabbed: list[torch.Tensor] = []
    handle = model.cam_layer.register_forward_hook(lambda m, i, o: grabbed.append(o.float().mean(dim=(2, 3))))
    try:
        out = model.forward_features(x) if head_input else model(x)
    finally:
        handle.remove()
    return out, grabbed[0]


def layout_features(u8: torch.Tensor, chunk: int = 256) -> torch.Tensor:
    """(N,1,S,S) uint8 squares -> (N, 80): an 8x8 thumbnail and a 16-bin intensity histogram.

    A second, model-independent view for the OOD check: chest X-rays share a layout (bright mediastinum
    and body, two darker lung fields, dark surroundings) and an intensity profile that photos, pages of
    text or noise do not. It matters most when the backbone was trained from scratch, whose features
    say little about "X-ray-ness".

    Computed ``chunk`` images at a time: a whole training split as float would be 4x its uint8 size (and the
    split may be a memory-mapped cache larger than RAM).
    """
    parts = []
    for i in range(0, len(u8), chunk):
        x = u8[i:i + chunk].float().div(255.0)
        thumb = torch.nn.functional.adaptive_avg_pool2d(x, LAYOUT_GRID).flatten(1)
        hist = torch.stack([torch.histc(row, bins=16, min=0.0, max=1.0) for row in x.flatten(1)]) / x[0].numel()
        parts.append(torch.cat([thumb, hist], dim=1).cpu())
    return torch.cat(parts) if parts else torch.zeros(0, LAYOUT_GRID**2 + 16)


def fit_stats(train: torch.Tensor, labels: torch.Tensor, val: torch.Tensor,
              quantile: float = QUANTILE, shrinkage: float = SHRINKAGE) -> dict[str, Any]:
    """Class means, shared shrunk precision matrix and the threshold (MARGIN x validation quantile)."""
    train, val = train.double().cpu(), val.double().cpu()
    labels = labels.cpu()
    classes = sorted(int(c) for c in labels.unique())
    means = torch.stack([train[labels == c].mean(0) for c in classes])
    centred = train - means[torch.searchsorted(torch.tensor(classes), labels)]
    cov = centred.T @ centred / max(len(train) - len(classes), 1)
    d = cov.shape[0]
    # Shrink towards a scaled identity, with a floor on the scale: identical training images (or features
    # that never vary) give a zero covariance, which must not make the matrix singular (issue 11 #7).
    scale = float(cov.trace()) / d
    floor = RIDGE_FLOOR * max(float(train.pow(2).mean()) if train.numel() else 0.0, 1.0)
    scale = scale if math.isfinite(scale) and scale > floor else floor
    shrinkage = min(max(float(shrinkage), 1e-3), 1.0)
    cov = (1 - shrinkage) * cov + shrinkage * scale * torch.eye(d, dtype=cov.dtype)
    precision = torch.linalg.inv(cov)
    stats = {"means": means.float(), "precision": precision.float(), "threshold": 0.0, "quantile": quantile}
    val_scores = score(val, stats)
    stats["threshold"] = MARGIN * float(torch.quantile(val_scores, quantile)) if len(val_scores) else float("inf")
    stats["val_median"] = float(val_scores.median()) if len(val_scores) else 0.0
    return stats


def score(feats: torch.Tensor, stats: dict[str, Any]) -> torch.Tensor:
    """Smallest Mahalanobis distance (squared) to a class mean, per row."""
    f = feats.float().cpu()
    diffs = f[:, None, :] - stats["means"][None]                        # N, C, D
    d2 = torch.einsum("ncd,de,nce->nc", diffs, stats["precision"], diffs)
    return d2.min(dim=1).values


def cheap_checks(image: Image.Image) -> list[str]:
    reasons = []
    colour = float(image.info.get("colourfulness", 0.0))
    if colour > MAX_COLOURFULNESS:
        reasons.append(f"it is strongly coloured (colourfulness {colour:.0f}); radiographs are gray")
    w, h = image.size
    if max(w, h) / max(min(w, h), 1) > MAX_ASPECT:
        reasons.append(f"its aspect ratio {max(w, h) / min(w, h):.1f}:1 is unusual for a chest X-ray")
    if np.asarray(image.resize((64, 64))).std() < 2.0:
        reasons.append("it is (almost) blank")
    return reasons


def fit_all(pooled: dict[str, torch.Tensor], layout: dict[str, torch.Tensor], labels: torch.Tensor) -> dict:
    """Both detectors from the train split, thresholds from the validation split."""
    return {"features": fit_stats(pooled["train"], labels, pooled["validation"]),
            "layout": fit_stats(layout["train"], torch.zeros(len(layout["train"]), dtype=torch.long),
                                layout["validation"])}


def assess(image: Image.Image, pooled: torch.Tensor | None, layout: torch.Tensor | None,
           stats: dict[str, Any] | None) -> dict[str, Any]:
    """The OOD verdict for one prediction: flagged, reasons, and each detector's score and threshold."""
    reasons = cheap_checks(image)
    scores = {}
    checks = (("features", pooled, "its image features are far from those of the training X-rays"),
              ("layout", layout, "its layout and brightness do not look like the training X-rays"))
    for name, feat, text in checks:
        st = (stats or {}).get(name)
        if feat is None or not st:
            continue
        s, thr = float(score(feat.reshape(1, -1), st)[0]), float(st["threshold"])
        scores[name] = {"score": s, "threshold": thr}
        if s > thr:
            reasons.append(f"{text} (Mahalanobis score {s:.0f} > threshold {thr:.0f})")
    return {"flagged": bool(reasons), "reasons": reasons, "scores": scores}
