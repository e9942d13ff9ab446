"""Predictor: loaded-model cache, device choice, predict() -> Prediction with a Grad-CAM map."""

from __future__ import annotations

import os
import threading
import time
import warnings
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from .card import Card
from .checkpoints import (
    LEGACY_SUFFIX,
    SUFFIX,
    CheckpointError,
    load_checkpoint,
    model_from_checkpoint,
    ranked_checkpoints,
)
from .data import eval_batch, to_square_u8
from .errors import (
    ConfigError,
    ImageError,
    NoCheckpointError,  # noqa: F401 - re-exported
)
from .explain import CamExplainer, overlay, resize_cam
from .imaging import load_image_bounded
from .models import check_level, get_spec
from .ood import assess, layout_features
from .report import DISCLAIMER, UNCERTAIN  # noqa: F401 - re-exported (covid_cls.DISCLAIMER)
from .runtime import Runtime


@dataclass
class Prediction:
    """One answer. ``label`` is the headline: the class, or ``UNCERTAIN`` when the model abstains;
    ``decision`` is always the class at the card's operating point; ``reasons`` say why it abstained."""

    label: str
    probs: dict[str, float]
    cam: np.ndarray                 # float32, H x W of the input image, in [0, 1]; explains ``explained``
    overlay: Image.Image            # RGB heatmap over the image (longest side <= 1024)
    device: str
    latency_ms: float
    checkpoint: str
    card: Card
    image: Image.Image | None = None    # the decoded grayscale input
    ood: dict[str, Any] = field(default_factory=dict)   # {"flagged", "reasons", "scores"} (see ood.py)
    disclaimer: str = DISCLAIMER
    decision: str = ""
    abstain: bool = False
    reasons: list[str] = field(default_factory=list)
    explained: str = ""             # the class the Grad-CAM map explains (the most probable one unless asked)


@dataclass
class _Loaded:
    model: torch.nn.Module
    card: Card
    explainer: CamExplainer
    ood_stats: dict[str, Any] | None = None

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.model.state_dict().values())


class Predictor:
    """Predict with the best (or a given) checkpoint for an (arch, level) pair.

    Models are loaded lazily on first use and kept in an LRU bounded by count (``max_models``) AND by the
    bytes of their tensors (``max_bytes``, default ``COVID_CLS_MODEL_MEMORY_MB`` or 2048 MB): a VGG16 with our
    head is ~0.6 GB in fp32 and a ResNet18 ~50 MB, so a count alone says little about memory. The model just
    loaded always stays, even when it alone exceeds the budget. Safe to call from many threads:
    one lock per model around Grad-CAM, one lock around the cache. When the best checkpoint for a pair
    turns out to be damaged at load time, the next valid one is used (and the damaged one remembered).
    """

    def __init__(self, checkpoints_dir: str | os.PathLike = "checkpoints", device: str = "auto",
                 max_models: int = 3, max_bytes: int | None = None):
        self.checkpoints_dir = Path(checkpoints_dir)
        # fp32 for batch-1 Grad-CAM (bf16 was slower at batch 1 on CUDA, and the map keeps full precision);
        # channels_last where oneDNN/cuDNN run convolutions: ResNet18 CAM 20.6 -> 16.3 ms on the CPU
        self.runtime = Runtime.create(device, "fp32")
        self.device = self.runtime.device
        self.max_models = max(1, max_models)
        self.max_bytes = max_bytes if max_bytes is not None else int(
            float(os.environ.get("COVID_CLS_MODEL_MEMORY_MB", "2048")) * 2**20)
        self._cache: OrderedDict[tuple[str, int], _Loaded] = OrderedDict()
        self._broken: dict[tuple[str, int], str] = {}    # (path, mtime) -> why it failed to load
        self._lock = threading.Lock()

    def _named(self, checkpoint: str | os.PathLike) -> Path:
        """A checkpoint name in the checkpoints folder (with or without suffix) first, else the path as given
        (the CLI and Python pass paths; the app passes only names and checks them against its folder)."""
        p = Path(checkpoint)
        if not p.is_absolute():
            for cand in (self.checkpoints_dir / p, self.checkpoints_dir / f"{p}{SUFFIX}",
                         self.checkpoints_dir / f"{p}{LEGACY_SUFFIX}"):
                if cand.is_file():
                    return cand
        return p

    def candidates(self, arch: str = "resnet18", level: str = "fc",
                   checkpoint: str | os.PathLike | None = None) -> list[Path]:
        """The checkpoint to use, or for (arch, level) all of them, best first."""
        get_spec(arch), check_level(level)
        if checkpoint:
            return [self._named(checkpoint)]
        ranked = ranked_checkpoints(self.checkpoints_dir, arch, level)
        if not ranked:
            raise NoCheckpointError(
                f"No trained model for {get_spec(arch).title} · {level} in {self.checkpoints_dir}/. Train one "
                f"first, e.g. `python -m covid_cls train --data DIR --arch {arch} --level {level}`, or use the "
                "quick demo model in the app.")
        return ranked

    def resolve(self, arch: str = "resnet18", level: str = "fc", checkpoint: str | os.PathLike | None = None) -> Path:
        return self.candidates(arch, level, checkpoint)[0]

    @staticmethod
    def _key(path: Path) -> tuple[str, int]:
        return str(path.resolve()), path.stat().st_mtime_ns if path.exists() else 0

    def _get(self, path: Path) -> _Loaded:
        key = self._key(path)
        with self._lock:
            if key in self._cache:
                self._cache.move_to_end(key)
                return self._cache[key]
            # room first (issue 12 #6): evicting only after loading held one model too many at the peak
            evicted = self._evict(incoming=_expected_bytes(path))
            ckpt = load_checkpoint(path)
            model = model_from_checkpoint(ckpt, self.device).requires_grad_(False)   # inference only
            card, ood_stats = ckpt.card, ckpt.ood_stats
            del ckpt   # its state dict: the model's own tensors on the CPU, a second copy on CUDA
            self.runtime.model(model)
            loaded = _Loaded(model, card, CamExplainer(model), ood_stats)
            self._warm_up(loaded)
            self._cache[key] = loaded
            evicted += self._evict()   # in case the estimate was short
            if evicted:
                _release_memory(self.device)
            return loaded

    def _evict(self, incoming: int = 0) -> int:
        """Drop least recently used models until ``incoming`` more bytes (one more model when > 0) fit in the
        count and byte budgets; the newest model always stays. Returns how many were dropped. Lock held."""
        dropped, coming = 0, 1 if incoming else 0
        while len(self._cache) > 1 - coming and (
                len(self._cache) + coming > self.max_models
                or sum(v.nbytes for v in self._cache.values()) + incoming > self.max_bytes):
            self._cache.popitem(last=False)   # dropped; only a request still running may hold it
            dropped += 1
        return dropped

    def _load_first_valid(self, paths: list[Path], explicit: bool) -> tuple[Path, _Loaded]:
        errors = []
        for path in paths:
            if not explicit and self._broken.get(self._key(path)):
                continue
            try:
                return path, self._get(path)
            except CheckpointError as exc:
                if explicit:
                    raise
                self._broken[self._key(path)] = str(exc)
                warnings.warn(f"skipping {path.name}: {exc}", RuntimeWarning)
                errors.append(str(exc))
        raise CheckpointError("no loadable checkpoint for this model: " + "; ".join(errors[:3] or
                              [why for why in self._broken.values()][:3]))

    def _warm_up(self, loaded: _Loaded) -> None:
        s = loaded.card.image_size
        loaded.explainer(self.runtime.input(torch.zeros(1, 3, s, s, device=self.device)))

    def loaded(self) -> list[str]:
        with self._lock:
            return [k[0] for k in self._cache]

    def loaded_bytes(self) -> int:
        with self._lock:
            return sum(v.nbytes for v in self._cache.values())

    def evict(self, path: str | os.PathLike | None = None) -> None:
        with self._lock:
            for key in [k for k in self._cache if path is None or k[0] == str(Path(path).resolve())]:
                del self._cache[key]

    def predict(self, image, arch: str = "resnet18", level: str = "fc",
                checkpoint: str | os.PathLike | None = None, alpha: float = 0.45,
                explain_class: str | None = None) -> Prediction:
        """``image``: a path, bytes, PIL image or array (anything ``load_image`` takes). The Grad-CAM map
        explains ``explain_class`` (one of the model's classes) or, by default, the most probable class;
        ``Prediction.explained`` names it.

        Raises ImageError for a bad file, NoCheckpointError when no model exists and ConfigError (listing the
        model's classes) for a class the model does not know.
        """
        paths = self.candidates(arch, level, checkpoint)
        img = load_image_bounded(image)   # in a worker with CPU/memory/time limits
        path, loaded = self._load_first_valid(paths, explicit=bool(checkpoint))
        return self._run(loaded, path, [img], alpha, class_index(loaded.card, explain_class))[0]

    def predict_batch(self, images: Sequence, arch: str = "resnet18", level: str = "fc",
                      checkpoint: str | os.PathLike | None = None, alpha: float = 0.45, batch_size: int = 16,
                      on_progress: Callable[[int, int], None] | None = None,
                      explain_class: str | None = None) -> list[Prediction | ImageError]:
        """Many images with one model: one forward + Grad-CAM backward per ``batch_size`` images.

        A file that cannot be decoded gives its ``ImageError`` in its place in the result, never failing the
        batch. ``on_progress(done, total)`` is called after each batch. ``explain_class`` as for ``predict``
        (checked before any file is decoded).
        """
        paths = self.candidates(arch, level, checkpoint)
        path, loaded = self._load_first_valid(paths, explicit=bool(checkpoint))
        target = class_index(loaded.card, explain_class)
        out: list[Prediction | ImageError | None] = [None] * len(images)
        for start in range(0, len(images), batch_size):
            decoded = []
            for i in range(start, min(start + batch_size, len(images))):
                try:
                    decoded.append((i, load_image_bounded(images[i])))
                except ImageError as exc:
                    out[i] = exc
            if decoded:
                for (i, _), pred in zip(decoded, self._run(loaded, path, [im for _, im in decoded], alpha, target)):
                    out[i] = pred
            if on_progress is not None:
                on_progress(min(start + batch_size, len(images)), len(images))
        return out

    def _run(self, loaded: _Loaded, path: Path, imgs: list[Image.Image], alpha: float,
             target: int | None = None) -> list[Prediction]:
        """The model part for decoded images: one batched forward + backward, then per-image results. The maps
        explain class ``target`` (an index), or each image's most probable class when None."""
        card = loaded.card
        t0 = time.perf_counter()
        u8 = torch.stack([torch.from_numpy(to_square_u8(img, card.cache_size))[None] for img in imgs])
        x = self.runtime.input(eval_batch(u8.to(self.device), card.image_size))
        logits, cams, pooled = loaded.explainer(x, target_class=target, return_pooled=True)
        cams = cams[None] if cams.ndim == 2 else cams
        layout = layout_features(u8)
        per_image_ms = (time.perf_counter() - t0) * 1000 / len(imgs)
        results = []
        for k, img in enumerate(imgs):
            t1 = time.perf_counter()
            p = torch.softmax(logits[k] / card.temperature, dim=0).tolist()
            cam_full = resize_cam(cams[k], img.size)
            ood = assess(img, pooled[k:k + 1], layout[k:k + 1], loaded.ood_stats)
            reasons = list(ood["reasons"]) + _set_reasons(card, p)
            decision = card.label_for(p)
            # the explainer's own default is the arg-max of the logits (not the thresholded decision)
            explained = card.classes[int(logits[k].argmax()) if target is None else target]
            results.append(Prediction(
                label=UNCERTAIN if reasons else decision, decision=decision, abstain=bool(reasons), reasons=reasons,
                probs=dict(zip(card.classes, p)), cam=cam_full,
                # overlay() would resize the map to the image again; reuse cam_full where it keeps the image
                # size (up to its max_side of 1024 px; larger images are shown downscaled, from the small map)
                overlay=overlay(img, cam_full if max(img.size) <= 1024 else cams[k], alpha),
                device=_device_name(self.device), latency_ms=per_image_ms + (time.perf_counter() - t1) * 1000,
                checkpoint=str(path), card=card, image=img, ood=ood, explained=explained))
        return results


def class_index(card: Card, name: str | None) -> int | None:
    """The index of class ``name`` in the model's classes (None for None or "": the predicted class). A name the
    model does not know is a ConfigError that lists the classes it does."""
    if name is None or name == "":
        return None
    if not isinstance(name, str) or name not in card.classes:
        shown = repr(name)[:70]
        raise ConfigError(f"this model has no class {shown}; it knows: {', '.join(card.classes)} "
                          "(or leave the class empty to explain the predicted one)")
    return card.classes.index(name)


_SIZES: dict[tuple, int] = {}


def _expected_bytes(path: Path) -> int:
    """The bytes of the tensors the model in ``path`` will hold once loaded (from its card: the structure built
    on the meta device, which allocates nothing; cached per shape). 0 when the card cannot be read (the load
    will say why)."""
    from .checkpoints import read_card
    from .models import build_model

    card = read_card(path)
    if card is None:
        return 0
    key = (card.arch, card.level, card.num_classes, card.hidden)
    if key not in _SIZES:
        try:
            with torch.device("meta"):
                model = build_model(card.arch, card.level, weights="none", num_classes=card.num_classes,
                                    hidden=card.hidden)
        except Exception:  # noqa: BLE001 - an odd card: no estimate; loading it will report the problem
            return 0
        _SIZES[key] = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    return _SIZES[key]


def _release_memory(device: torch.device) -> None:
    """After evicting: collect the dropped models now (a Grad-CAM hook makes a reference cycle, which would wait
    for the next garbage collection) and hand the freed heap back to the OS (glibc ``malloc_trim``)."""
    import gc

    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _set_reasons(card: Card, probs: list[float]) -> list[str]:
    """Split-conformal prediction set (Angelopoulos & Bates 2021): every class whose probability is high
    enough for the validation-calibrated quantile. One class: an answer; two (or none): the model cannot
    tell at the stated coverage, so it abstains."""
    sets = card.conformal_sets(probs)
    if sets is None or sets.sum() == 1:
        return []
    kept = [c for c, inside in zip(card.classes, sets[0]) if inside]
    alpha = card.selective.get("conformal_alpha", 0.1)
    what = ("no class is plausible enough" if not kept else "both classes remain plausible" if card.num_classes == 2
            else f"{len(kept)} classes remain plausible")
    return [f"{what} at {100 * (1 - alpha):.0f} % coverage (conformal set: {', '.join(kept) or 'empty'})"]


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return f"cuda ({torch.cuda.get_device_name(device)})"
    return "cpu"
