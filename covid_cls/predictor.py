"""Predictor: loaded-model cache, device choice, predict() -> Prediction with a Grad-CAM map."""

from __future__ import annotations

import os
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from .checkpoints import best_checkpoint, load_model
from .data import eval_batch, to_square_u8
from .engine import Runtime
from .explain import CamExplainer, overlay, resize_cam
from .imaging import load_image
from .models import check_level, get_spec
from .ood import assess, layout_features

DISCLAIMER = "Research demo — not a diagnosis. Do not use for clinical decisions."


class NoCheckpointError(LookupError):
    """No trained model exists for the requested (arch, level)."""


@dataclass
class Prediction:
    label: str
    probs: dict[str, float]
    cam: np.ndarray                 # float32, H x W of the input image, in [0, 1]
    overlay: Image.Image            # RGB heatmap over the image (longest side <= 1024)
    device: str
    latency_ms: float
    checkpoint: str
    card: dict[str, Any] = field(default_factory=dict)
    image: Image.Image | None = None    # the decoded grayscale input
    ood: dict[str, Any] = field(default_factory=dict)   # {"flagged", "reasons", "scores"} (see ood.py)
    disclaimer: str = DISCLAIMER


@dataclass
class _Loaded:
    model: torch.nn.Module
    card: dict[str, Any]
    explainer: CamExplainer
    ood_stats: dict[str, Any] | None = None


class Predictor:
    """Predict with the best (or a given) checkpoint for an (arch, level) pair.

    Models are loaded lazily on first use and kept in an LRU of ``max_models`` (VGG16 with our head is
    ~0.6 GB in fp32, so a Space with 16 GB must bound what stays loaded). Safe to call from many threads:
    one lock per model around Grad-CAM, one lock around the cache.
    """

    def __init__(self, checkpoints_dir: str | os.PathLike = "checkpoints", device: str = "auto",
                 max_models: int = 3):
        self.checkpoints_dir = Path(checkpoints_dir)
        # fp32 for batch-1 Grad-CAM (bf16 was slower at batch 1 on CUDA, and the map keeps full precision);
        # channels_last where oneDNN/cuDNN run convolutions: ResNet18 CAM 20.6 -> 16.3 ms on the CPU
        self.runtime = Runtime.create(device, "fp32")
        self.device = self.runtime.device
        self.max_models = max(1, max_models)
        self._cache: OrderedDict[tuple[str, int], _Loaded] = OrderedDict()
        self._lock = threading.Lock()

    def resolve(self, arch: str = "resnet18", level: str = "fc", checkpoint: str | os.PathLike | None = None) -> Path:
        get_spec(arch), check_level(level)
        if checkpoint:
            p = Path(checkpoint)
            if not p.is_absolute() and not p.exists():
                p = self.checkpoints_dir / p
            return p
        best = best_checkpoint(self.checkpoints_dir, arch, level)
        if best is None:
            raise NoCheckpointError(
                f"No trained model for {get_spec(arch).title} · {level} in {self.checkpoints_dir}/. Train one "
                f"first, e.g. `python -m covid_cls train --data DIR --arch {arch} --level {level}`, or use the "
                "quick demo model in the app.")
        return best

    def _get(self, path: Path) -> _Loaded:
        key = (str(path.resolve()), path.stat().st_mtime_ns if path.exists() else 0)
        with self._lock:
            if key in self._cache:
                self._cache.move_to_end(key)
                return self._cache[key]
            model, card = load_model(path, self.device)
            self.runtime.model(model)
            loaded = _Loaded(model, card, CamExplainer(model, card["arch"]), card.pop("ood_stats", None))
            self._warm_up(loaded)
            self._cache[key] = loaded
            while len(self._cache) > self.max_models:
                self._cache.popitem(last=False)   # dropped; hooks go with the object
                if self.device.type == "cuda":
                    torch.cuda.empty_cache()
            return loaded

    def _warm_up(self, loaded: _Loaded) -> None:
        s = loaded.card.get("image_size", 224)
        loaded.explainer(self.runtime.input(torch.zeros(1, 3, s, s, device=self.device)))

    def loaded(self) -> list[str]:
        with self._lock:
            return [k[0] for k in self._cache]

    def evict(self, path: str | os.PathLike | None = None) -> None:
        with self._lock:
            for key in [k for k in self._cache if path is None or k[0] == str(Path(path).resolve())]:
                del self._cache[key]

    def card(self, arch: str = "resnet18", level: str = "fc", checkpoint=None) -> dict[str, Any]:
        from .checkpoints import read_card

        return read_card(self.resolve(arch, level, checkpoint)) or {}

    def predict(self, image, arch: str = "resnet18", level: str = "fc",
                checkpoint: str | os.PathLike | None = None, alpha: float = 0.45) -> Prediction:
        """``image``: a path, bytes, PIL image or array (anything ``load_image`` takes).

        Raises ImageError for a bad file and NoCheckpointError when no model exists.
        """
        path = self.resolve(arch, level, checkpoint)
        img = load_image(image)
        loaded = self._get(path)
        card = loaded.card
        t0 = time.perf_counter()
        u8 = torch.from_numpy(to_square_u8(img, card.get("cache_size", 256)))[None, None]
        x = self.runtime.input(eval_batch(u8.to(self.device), card.get("image_size", 224)))
        logits, cam, pooled = loaded.explainer(x, return_pooled=True)
        temperature = float(card.get("temperature", 1.0))
        p = torch.softmax(logits[0] / temperature, dim=0).tolist()
        classes = card["classes"]
        cam_full = resize_cam(cam, img.size)
        ood = assess(img, pooled, layout_features(u8), loaded.ood_stats)
        latency = (time.perf_counter() - t0) * 1000
        return Prediction(
            label=classes[int(np.argmax(p))], probs=dict(zip(classes, p)), cam=cam_full,
            # overlay() would resize the map to the image again; reuse cam_full where it keeps the image
            # size (up to its max_side of 1024 px; larger images are shown downscaled, from the small map)
            overlay=overlay(img, cam_full if max(img.size) <= 1024 else cam, alpha),
            device=_device_name(self.device), latency_ms=latency,
            checkpoint=str(path), card={k: v for k, v in card.items() if k not in ("state_dict", "history")},
            image=img, ood=ood)


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return f"cuda ({torch.cuda.get_device_name(device)})"
    return "cpu"
