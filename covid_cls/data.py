"""Datasets: scanning an ImageFolder tree, decoding it once, and the preprocessing presets.

Preprocessing is defined ONCE here and used by training, evaluation and the Predictor:

    load_image (grayscale PIL) -> to_square_u8 (cache_size x cache_size uint8) -> eval_batch / train_batch

``eval_batch`` resizes the whole square to ``image_size`` (no centre crop: lesions near the edge of the
lung fields matter, and a crop would also make the Grad-CAM map cover only part of the upload).
``train_batch`` does the augmentation of the 2020 recipe (rotation +-30 deg, random resized crop,
horizontal flip) as ONE affine warp per sample on the device, instead of three PIL passes on the CPU.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from .imaging import ImageError, load_image

CLASSES: tuple[str, ...] = ("infected", "normal")   # ImageFolder order (alphabetical)
POSITIVE = "infected"
SPLITS: dict[str, tuple[str, ...]] = {              # canonical name -> accepted folder names
    "train": ("train",),
    "validation": ("validation", "val", "valid"),
    "test": ("test",),
}
IMAGE_EXTS = {".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".webp", ".gif", ".dcm", ".dicom"}
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class DatasetError(ValueError):
    """The dataset folder cannot be used; the message says what to fix."""


# ---------------------------------------------------------------------------------------------------
# Scanning
# ---------------------------------------------------------------------------------------------------

@dataclass
class Split:
    name: str
    folder: Path
    files: list[Path] = field(default_factory=list)
    labels: list[int] = field(default_factory=list)

    def counts(self) -> dict[str, int]:
        return {c: self.labels.count(i) for i, c in enumerate(CLASSES)}


@dataclass
class DatasetInfo:
    root: Path
    splits: dict[str, Split]
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (relative path, reason)

    def counts(self) -> dict[str, dict[str, int]]:
        return {name: s.counts() for name, s in self.splits.items()}

    def summary(self) -> str:
        rows = [f"{name}: " + ", ".join(f"{c} {n}" for c, n in s.counts().items())
                for name, s in self.splits.items()]
        if self.skipped:
            rows.append(f"skipped {len(self.skipped)} file(s) that are not readable images")
        return "; ".join(rows)


def _find_split(root: Path, name: str) -> Path | None:
    for candidate in SPLITS[name]:
        if (root / candidate).is_dir():
            return root / candidate
    return None


def scan_dataset(root: str | os.PathLike, *, check_images: bool = False,
                 splits: Iterable[str] = ("train", "validation", "test")) -> DatasetInfo:
    """Check the ImageFolder layout before any work and list the files.

    Raises DatasetError naming every problem at once (missing split, missing/extra class folders,
    empty classes). Files with non-image extensions are skipped and counted; with ``check_images``
    each image header is opened too (decoding errors otherwise surface when the cache is built, where
    they are also skipped and counted, never a crash mid-epoch).
    """
    root = Path(root).expanduser()
    if not root.is_dir():
        raise DatasetError(f"dataset folder {root} does not exist or is not a folder")
    problems: list[str] = []
    result: dict[str, Split] = {}
    skipped: list[tuple[str, str]] = []
    for name in splits:
        folder = _find_split(root, name)
        if folder is None:
            problems.append(f"missing split folder '{name}/' (accepted names: {', '.join(SPLITS[name])})")
            continue
        subdirs = sorted(p.name for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))
        missing = [c for c in CLASSES if c not in subdirs]
        extra = [d for d in subdirs if d not in CLASSES]
        if missing:
            problems.append(f"{folder.name}/ lacks class folder(s) {', '.join(missing)}")
        if extra:
            problems.append(f"{folder.name}/ has unexpected folder(s) {', '.join(extra)} "
                            f"(expected exactly {', '.join(CLASSES)})")
        split = Split(name, folder)
        for label, cls in enumerate(CLASSES):
            cdir = folder / cls
            if not cdir.is_dir():
                continue
            n_before = len(split.files)
            for p in sorted(cdir.rglob("*")):
                if not p.is_file() or p.name.startswith("."):
                    continue
                rel = str(p.relative_to(root))
                if p.suffix.lower() not in IMAGE_EXTS:
                    skipped.append((rel, f"not an image extension ({p.suffix or 'none'})"))
                    continue
                if check_images:
                    try:
                        with Image.open(p) as im:
                            im.size  # noqa: B018 - header parse only
                    except Exception as exc:  # noqa: BLE001
                        if p.suffix.lower() not in (".dcm", ".dicom"):
                            skipped.append((rel, f"unreadable: {exc.__class__.__name__}"))
                            continue
                split.files.append(p)
                split.labels.append(label)
            if len(split.files) == n_before:
                problems.append(f"{folder.name}/{cls}/ contains no images")
        result[name] = split
    if problems:
        raise DatasetError(f"dataset {root} cannot be used:\n  - " + "\n  - ".join(problems))
    return DatasetInfo(root, result, skipped)


def fingerprint(files: Iterable[Path], extra: str = "") -> str:
    """Cheap identity of a file list: paths, sizes and modification times (not contents)."""
    h = hashlib.sha1(extra.encode())
    for p in files:
        st = p.stat()
        h.update(f"{p}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:16]


# ---------------------------------------------------------------------------------------------------
# Preprocessing (defined once)
# ---------------------------------------------------------------------------------------------------

def to_square_u8(img: Image.Image, size: int) -> np.ndarray:
    """Grayscale PIL image -> (size, size) uint8, whole image resized (aspect not kept).

    PIL's ``reducing_gap`` first shrinks by an integer factor with a box filter, which keeps this fast
    for 1024 px originals while staying antialiased.
    """
    if img.mode != "L":
        img = img.convert("L")
    return np.array(img.resize((size, size), Image.BILINEAR, reducing_gap=2.0), dtype=np.uint8)


def _normalize(x: torch.Tensor) -> torch.Tensor:
    """(N,1,H,W) float in [0,1] -> (N,3,H,W) ImageNet-normalised (grayscale replicated)."""
    mean = torch.tensor(IMAGENET_MEAN, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
    return (x.expand(-1, 3, -1, -1) - mean) / std


def eval_batch(u8: torch.Tensor, image_size: int) -> torch.Tensor:
    """Eval preset: (N,1,S,S) uint8 -> (N,3,image_size,image_size) float, normalised."""
    x = u8.float().div_(255.0)
    if x.shape[-1] != image_size:
        x = F.interpolate(x, size=(image_size, image_size), mode="bilinear", align_corners=False,
                          antialias=True)
    return _normalize(x)


def train_batch(u8: torch.Tensor, image_size: int, generator: torch.Generator, *,
                rotation: float = 30.0, scale: tuple[float, float] = (0.5, 1.0),
                ratio: tuple[float, float] = (3 / 4, 4 / 3)) -> torch.Tensor:
    """Train preset: rotation, random resized crop and h-flip as one affine warp per sample.

    ``affine_grid`` maps output coordinates in [-1, 1] to input coordinates: input = R @ C @ F @ out,
    with F the flip, C the crop (half-sizes w, h and centre t) and R the rotation. Outside the image
    is black, as torchvision's RandomRotation fills. The default crop scale is (0.5, 1) rather than
    torchvision's (0.08, 1): an 8 % crop of a chest X-ray can cut the finding away and leave a wrong label.
    Random numbers come from ``generator`` (on the CPU) so runs are reproducible.
    """
    n, dev = u8.shape[0], u8.device

    def rand(*shape: int) -> torch.Tensor:
        return torch.rand(*shape, generator=generator)

    angle = (rand(n) * 2 - 1) * math.radians(rotation)
    area = scale[0] + rand(n) * (scale[1] - scale[0])
    log_r = math.log(ratio[0]) + rand(n) * (math.log(ratio[1]) - math.log(ratio[0]))
    r = torch.exp(log_r)
    w = torch.sqrt(area * r).clamp(max=1.0)
    h = torch.sqrt(area / r).clamp(max=1.0)
    tx = (rand(n) * 2 - 1) * (1 - w)
    ty = (rand(n) * 2 - 1) * (1 - h)
    flip = torch.where(rand(n) < 0.5, -1.0, 1.0)
    cos, sin = torch.cos(angle), torch.sin(angle)
    # R @ [C | t] @ F, written out (2x3 per sample).
    theta = torch.stack([
        torch.stack([cos * w * flip, -sin * h, cos * tx - sin * ty], dim=1),
        torch.stack([sin * w * flip, cos * h, sin * tx + cos * ty], dim=1),
    ], dim=1).to(dev)
    x = u8.float().div_(255.0)
    grid = F.affine_grid(theta, [n, 1, image_size, image_size], align_corners=False)
    x = F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    return _normalize(x)


# ---------------------------------------------------------------------------------------------------
# Decoded cache
# ---------------------------------------------------------------------------------------------------

def default_cache_dir() -> Path:
    return Path(os.environ.get("COVID_CLS_CACHE", Path.home() / ".cache" / "covid_cls"))


@dataclass
class DecodedSplit:
    """A split decoded once: images (N,1,S,S) uint8, labels (N,), and the files they came from."""

    images: torch.Tensor
    labels: torch.Tensor
    files: list[str]
    skipped: list[tuple[str, str]]

    def __len__(self) -> int:
        return len(self.files)


def _decode_one(path: Path, size: int) -> np.ndarray | str:
    try:
        return to_square_u8(load_image(path), size)
    except ImageError as exc:
        return str(exc)


class DecodedCache:
    """Decode every image once, in parallel, and keep it for reuse.

    Kept in memory (per process) and on disk under ``cache_dir`` keyed by the file list fingerprint and
    the square size, so a second run over the same data (another level, another arch, the study) costs
    a memory lookup, and a new process a single .npy read.
    """

    _memory: dict[str, DecodedSplit] = {}
    _lock = threading.Lock()

    def __init__(self, size: int = 256, cache_dir: str | os.PathLike | None = None, workers: int = 0,
                 use_disk: bool = True):
        self.size = size
        self.cache_dir = Path(cache_dir) if cache_dir else default_cache_dir()
        self.workers = workers or (os.cpu_count() or 1)
        self.use_disk = use_disk

    def get(self, split: Split, root: Path,
            progress: Callable[[int, int], None] | None = None) -> DecodedSplit:
        key = fingerprint(split.files, extra=f"{self.size}")
        with self._lock:
            if key in self._memory:
                return self._memory[key]
        decoded = self._load_disk(key) if self.use_disk else None
        if decoded is None:
            decoded = self._decode(split, root, progress)
            if self.use_disk:
                self._save_disk(key, decoded)
        with self._lock:
            self._memory[key] = decoded
        return decoded

    @classmethod
    def clear_memory(cls) -> None:
        with cls._lock:
            cls._memory.clear()

    def _decode(self, split: Split, root: Path, progress) -> DecodedSplit:
        n = len(split.files)
        out = np.zeros((n, 1, self.size, self.size), dtype=np.uint8)
        keep = np.zeros(n, dtype=bool)
        skipped: list[tuple[str, str]] = []
        done = 0
        # PIL releases the GIL while decoding and resizing, so threads scale across cores.
        with ThreadPoolExecutor(max_workers=self.workers) as pool:
            for i, res in enumerate(pool.map(lambda p: _decode_one(p, self.size), split.files)):
                if isinstance(res, str):
                    skipped.append((str(split.files[i].relative_to(root)), res))
                else:
                    out[i, 0] = res
                    keep[i] = True
                done += 1
                if progress and (done % 32 == 0 or done == n):
                    progress(done, n)
        idx = np.flatnonzero(keep)
        return DecodedSplit(
            images=torch.from_numpy(out[idx]),
            labels=torch.tensor([split.labels[i] for i in idx], dtype=torch.long),
            files=[str(split.files[i].relative_to(root)) for i in idx],
            skipped=skipped,
        )

    def _paths(self, key: str) -> tuple[Path, Path]:
        return self.cache_dir / f"decoded-{key}.npy", self.cache_dir / f"decoded-{key}.json"

    def _load_disk(self, key: str) -> DecodedSplit | None:
        npy, meta = self._paths(key)
        try:
            info = json.loads(meta.read_text())
            arr = np.load(npy, allow_pickle=False)
            if arr.shape != (len(info["files"]), 1, self.size, self.size):
                return None
            return DecodedSplit(torch.from_numpy(arr), torch.tensor(info["labels"], dtype=torch.long),
                                info["files"], [tuple(s) for s in info["skipped"]])
        except (OSError, ValueError, KeyError):
            return None

    def _save_disk(self, key: str, d: DecodedSplit) -> None:
        from .checkpoints import atomic_write

        npy, meta = self._paths(key)
        try:
            self.cache_dir.mkdir(parents=True, exist_ok=True)
            atomic_write(npy, lambda f: np.save(f, d.images.numpy(), allow_pickle=False))
            atomic_write(meta, lambda f: f.write(json.dumps(
                {"files": d.files, "labels": d.labels.tolist(), "skipped": d.skipped}).encode()))
        except OSError:
            pass  # the cache is an optimisation; a read-only or full disk must not fail the run


def read_manifest(root: str | os.PathLike, column: str = "source_dataset") -> dict[str, str]:
    """``MANIFEST.csv`` of a dataset (if any): relative file path -> value of ``column``.

    Used to report metrics per source (e.g. the NIH-only subset of cxr-real, where both classes come
    from one hospital, beside the overall figure that a source confound can inflate).
    """
    import csv

    path = Path(root) / "MANIFEST.csv"
    if not path.is_file():
        return {}
    with open(path, newline="") as f:
        return {row["file"]: row[column] for row in csv.DictReader(f) if row.get("file") and row.get(column)}
