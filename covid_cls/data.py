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
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from .errors import DatasetError, UnsafePath
from .imaging import MAX_BYTES, ImageError, load_image

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


def _find_split(root: Path, name: str, flat_ok: bool = False) -> Path | None:
    """The folder of split ``name``; with ``flat_ok`` a flat labelled folder (class folders directly under
    ``root``, e.g. an external test set) stands for the one split asked for."""
    for candidate in SPLITS[name]:
        if (root / candidate).is_dir():
            return root / candidate
    if flat_ok and any((root / c).is_dir() for c in CLASSES):
        return root
    return None


def scan_dataset(root: str | os.PathLike, *,
                 splits: Iterable[str] = ("train", "validation", "test"),
                 roots: Sequence[Path] | None = None) -> DatasetInfo:
    """Check the ImageFolder layout before any work and list the files.

    Raises DatasetError naming every problem at once (missing split, missing/extra class folders,
    empty classes). Files with non-image extensions are skipped and counted; decoding errors surface when
    the cache is built, where they are also skipped and counted (never a crash mid-epoch).

    ``roots``: the folders that may be read (the app passes ``COVID_CLS_DATA_ROOTS``; None = no restriction,
    the CLI). ``root`` must resolve inside one of them (UnsafePath otherwise), and every file is resolved
    (symlinks included): one that leads outside is skipped and reported, never listed. ``DatasetInfo.root``
    is the resolved folder.
    """
    if roots is not None:
        from .safety import check_allowed

        roots = [Path(r).resolve() for r in roots]
        root = check_allowed(root, roots)
    else:
        root = Path(root).expanduser()
        if root.is_dir():
            root = root.resolve()
    if not root.is_dir():
        raise DatasetError(f"dataset folder {root} does not exist or is not a folder")
    problems: list[str] = []
    result: dict[str, Split] = {}
    skipped: list[tuple[str, str]] = []
    splits = tuple(splits)
    for name in splits:
        folder = _find_split(root, name, flat_ok=len(splits) == 1)
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
            n_before, n_outside = len(split.files), 0
            for p in sorted(cdir.rglob("*")):
                if not p.is_file() or p.name.startswith("."):
                    continue
                rel = str(p.relative_to(root))
                if p.suffix.lower() not in IMAGE_EXTS:
                    skipped.append((rel, f"not an image extension ({p.suffix or 'none'})"))
                    continue
                if roots is not None:
                    from .safety import outside_reason

                    why = outside_reason(p, roots)
                    if why:
                        skipped.append((rel, why))
                        n_outside += 1
                        continue
                split.files.append(p)
                split.labels.append(label)
            if len(split.files) == n_before:
                problems.append(f"{folder.name}/{cls}/ contains no images" + (
                    f" inside the folders this server may read ({n_outside} lead outside)" if n_outside else ""))
        result[name] = split
    if problems:
        raise DatasetError(f"dataset {root} cannot be used:\n  - " + "\n  - ".join(problems))
    return DatasetInfo(root, result, skipped)


def check_layout_names(names: Iterable[str]) -> None:
    """The layout check of ``scan_dataset`` on an archive's member names, before anything is extracted.

    Raises DatasetError naming every missing split, missing class folder and class without an image file
    (a single top-level folder wrapping the splits is looked through, as extraction unwraps it).
    """
    parts = [PurePosixPath(n).parts for n in names]
    parts = [p for p in parts if p and not p[0].startswith((".", "__MACOSX"))]
    tops = {p[0] for p in parts}
    if len(tops) == 1 and not any(p[0] in sum(SPLITS.values(), ()) for p in parts if len(p) > 1):
        parts = [p[1:] for p in parts if len(p) > 1]
    images: dict[tuple[str, str], int] = {}
    folders: set[tuple[str, ...]] = set()
    for p in parts:
        folders.update(p[:i] for i in range(1, len(p)))
        if len(p) >= 3 and PurePosixPath(p[-1]).suffix.lower() in IMAGE_EXTS and not p[-1].startswith("."):
            images[p[0], p[1]] = images.get((p[0], p[1]), 0) + 1
    problems = []
    for name, accepted in SPLITS.items():
        folder = next((c for c in accepted if (c,) in folders), None)
        if folder is None:
            problems.append(f"missing split folder '{name}/' (accepted names: {', '.join(accepted)})")
            continue
        for cls in CLASSES:
            if (folder, cls) not in folders:
                problems.append(f"{folder}/ lacks class folder {cls}")
            elif not images.get((folder, cls)):
                problems.append(f"{folder}/{cls}/ contains no images")
    if problems:
        raise DatasetError("the zip is not an ImageFolder dataset (nothing was extracted):\n  - "
                           + "\n  - ".join(problems))


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


@dataclass(frozen=True)
class Photometric:
    """Augmentations aimed at shortcuts rather than geometry (all 0 = the 2020 recipe's train preset).

    A classifier trained on one set of hospitals learns their exposure, contrast, sharpness and the text
    markers burnt into corners as much as the lungs (DeGrave et al. 2021). Randomising what differs between
    hospitals and never between diseases removes those cues from the training signal:
    ``intensity``  strength of random gamma (x^exp(±0.5 s)), contrast (1 ± 0.35 s) and brightness (± 0.1 s);
    ``blur_noise`` probability of a Gaussian blur (sigma 0.5-1.5 px) or additive noise (std up to 0.04);
    ``erase``      probability of blanking a random corner patch (10-25 % of the side) where laterality and
                   hospital markers sit, at a random gray level.
    """

    intensity: float = 0.0
    blur_noise: float = 0.0
    erase: float = 0.0

    @property
    def active(self) -> bool:
        return bool(self.intensity or self.blur_noise or self.erase)


def _photometric(x: torch.Tensor, aug: Photometric, generator: torch.Generator) -> torch.Tensor:
    """x: (N,1,S,S) in [0,1] on any device; random numbers come from the run's CPU generator."""
    n, dev, size = x.shape[0], x.device, x.shape[-1]

    def rand(*shape: int) -> torch.Tensor:
        return torch.rand(*shape, generator=generator)

    def per_sample(v: torch.Tensor) -> torch.Tensor:
        return v.to(dev).view(n, 1, 1, 1)

    if aug.intensity:
        s = aug.intensity
        gamma = per_sample(torch.exp((rand(n) * 2 - 1) * 0.5 * s))
        contrast = per_sample(1 + (rand(n) * 2 - 1) * 0.35 * s)
        bright = per_sample((rand(n) * 2 - 1) * 0.1 * s)
        x = ((x.clamp_min(1e-6) ** gamma - 0.5) * contrast + 0.5 + bright).clamp(0, 1)
    if aug.blur_noise:
        which, sigma, amount = rand(n), 0.5 + rand(n), rand(n) * 0.04
        blur = per_sample((which < aug.blur_noise / 2).float())
        noisy = per_sample(((which >= aug.blur_noise / 2) & (which < aug.blur_noise)).float())
        k = torch.arange(-2, 3, dtype=torch.float32)
        kern = torch.exp(-k[None] ** 2 / (2 * sigma[:, None] ** 2))
        kern = (kern / kern.sum(1, keepdim=True)).to(dev)                    # (N, 5) separable Gaussian
        xb = F.conv2d(F.pad(x.transpose(0, 1), (2, 2, 0, 0), mode="replicate"), kern[:, None, None, :], groups=n)
        xb = F.conv2d(F.pad(xb, (0, 0, 2, 2), mode="replicate"), kern[:, None, :, None], groups=n).transpose(0, 1)
        noise = torch.randn(x.shape, generator=generator).to(dev) * per_sample(amount)
        x = (x * (1 - blur) + xb * blur + noise * noisy).clamp(0, 1)
    if aug.erase:
        on = rand(n) < aug.erase
        side = (0.10 + rand(n) * 0.15) * size
        corner, gray = (rand(n) * 4).long(), rand(n)
        yy = torch.arange(size, dtype=torch.float32)[None, :, None]
        xx = torch.arange(size, dtype=torch.float32)[None, None, :]
        top, left = (corner < 2)[:, None, None], (corner % 2 == 0)[:, None, None]
        rows = torch.where(top, yy < side[:, None, None], yy >= size - side[:, None, None])
        cols = torch.where(left, xx < side[:, None, None], xx >= size - side[:, None, None])
        mask = (rows & cols & on[:, None, None]).to(dev)[:, None]
        x = torch.where(mask, gray.to(dev).view(n, 1, 1, 1), x)
    return x


def train_batch(u8: torch.Tensor, image_size: int, generator: torch.Generator, *,
                rotation: float = 30.0, scale: tuple[float, float] = (0.5, 1.0),
                ratio: tuple[float, float] = (3 / 4, 4 / 3), photometric: Photometric | None = None) -> torch.Tensor:
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
    if photometric is not None and photometric.active:
        x = _photometric(x, photometric, generator)
    return _normalize(x)


# ---------------------------------------------------------------------------------------------------
# Decoded cache
# ---------------------------------------------------------------------------------------------------

def default_cache_dir() -> Path:
    """COVID_CLS_CACHE, else Spaces' persistent /data (``fsio.persistent_dir``), else ~/.cache/covid_cls."""
    from .fsio import default_cache_dir as cache_dir

    return cache_dir()


@dataclass
class DecodedSplit:
    """A split decoded once: images (N,1,S,S) uint8, labels (N,), and the files they came from."""

    images: torch.Tensor
    labels: torch.Tensor
    files: list[str]
    skipped: list[tuple[str, str]]

    def __len__(self) -> int:
        return len(self.files)


def _decode_one(path: Path, size: int, decoder=None, roots: Sequence[Path] | None = None) -> np.ndarray | str:
    """Decode one dataset file (in a bounded worker process when ``decoder``, a DecodePool, is given).

    With ``roots`` the file is checked against them when it is opened (``safety.read_inside``: the open
    descriptor's real path), so nothing swapped for a symlink after the scan is read (issue 11 #4).
    """
    load = decoder.load if decoder is not None else load_image
    try:
        if roots is None:
            return to_square_u8(load(path), size)
        from .safety import read_inside

        data, ident = read_inside(path, roots, MAX_BYTES)
        if data[128:132] != b"DICM" and path.suffix.lower() in (".dcm", ".dicom"):
            # A DICOM without its preamble is recognised by its name only, so the decoder must be given the
            # path: accepted only if the path still names the very file checked above, before and after.
            img = load(path)
            st = path.stat()
            if (st.st_dev, st.st_ino) != ident:
                raise UnsafePath(f"{path.name} changed while it was read; not used")
            return to_square_u8(img, size)
        return to_square_u8(load(data), size)
    except (ImageError, UnsafePath) as exc:
        return str(exc)
    except OSError as exc:
        return f"cannot be read ({exc.strerror or exc.__class__.__name__})"


def identical_images(images: torch.Tensor, chunk: int = 256) -> bool:
    """Whether every image of an (N, 1, S, S) uint8 stack equals the first (N >= 2), in bounded memory."""
    n = len(images)
    if n < 2:
        return False
    first = images[:1].reshape(1, -1)
    return all(bool((images[i:i + chunk].reshape(-1, first.shape[1]) == first).all()) for i in range(0, n, chunk))


# The decoded caches' policy (issue 11 #2): on disk, entries not used for COVID_CLS_CACHE_MAX_AGE_DAYS are
# deleted, then the least recently used until the rest fits in COVID_CLS_CACHE_MAX_MB; in a process's memory,
# the least recently used splits go beyond COVID_CLS_CACHE_MEMORY_MB. 0 = no limit.
CACHE_MAX_MB, CACHE_MAX_AGE_DAYS, CACHE_MEMORY_MB = 4096, 14, 2048


class DecodedCache:
    """Decode every image once, in parallel, and keep it for reuse.

    Kept in memory (per process) and on disk under ``cache_dir`` keyed by the file list fingerprint and
    the square size, so a second run over the same data (another level, another arch, the study) costs
    a memory lookup, and a new process a single .npy read.
    """

    _memory: OrderedDict[str, DecodedSplit] = OrderedDict()
    _lock = threading.Lock()

    def __init__(self, size: int = 256, cache_dir: str | os.PathLike | None = None, workers: int = 0,
                 use_disk: bool = True, roots: Sequence[Path] | None = None):
        self.size = size
        self.cache_dir = Path(cache_dir) if cache_dir else default_cache_dir()
        self.workers = workers or (os.cpu_count() or 1)
        self.use_disk = use_disk
        # ``roots``: every file is checked against them when opened (None: no restriction, the CLI).
        self.roots = None if roots is None else [Path(r).resolve() for r in roots]
        self.notes: list[str] = []   # what the caller should tell the user (a full disk, ...)

    def get(self, split: Split, root: Path,
            progress: Callable[[int, int], None] | None = None) -> DecodedSplit:
        # Entries made under a roots check are kept apart from unchecked ones (the CLI's): what the app
        # trains on was read through the check.
        key = fingerprint(split.files, extra=f"{self.size}" + ("|roots-checked" if self.roots is not None else ""))
        with self._lock:
            if key in self._memory:
                self._memory.move_to_end(key)
                return self._memory[key]
        decoded = self._load_disk(key) if self.use_disk else None
        if decoded is None:
            decoded = self._decode(split, root, progress)
            if self.use_disk:
                self._save_disk(key, decoded)
        with self._lock:
            self._memory[key] = decoded
            self._trim_memory()
        return decoded

    @classmethod
    def _trim_memory(cls) -> None:
        from .safety import env_limit

        cap = env_limit("COVID_CLS_CACHE_MEMORY_MB", CACHE_MEMORY_MB, 2**20)
        total = sum(d.images.numel() for d in cls._memory.values())
        while len(cls._memory) > 1 and total > cap:
            _, dropped = cls._memory.popitem(last=False)
            total -= dropped.images.numel()

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
        # Files are decoded in worker processes under the same memory/CPU/time limits as uploads
        # (a hostile file in a training zip cannot take the trainer down); the threads feed them and
        # resize, which PIL does without the GIL.
        from .sandbox import shared_pool

        decoder = shared_pool("dataset", self.workers, idle_ttl_s=30.0)
        with ThreadPoolExecutor(max_workers=self.workers) as pool:
            for i, res in enumerate(pool.map(lambda p: _decode_one(p, self.size, decoder, self.roots),
                                             split.files)):
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
            split = DecodedSplit(torch.from_numpy(arr), torch.tensor(info["labels"], dtype=torch.long),
                                 info["files"], [tuple(s) for s in info["skipped"]])
        except (OSError, ValueError, KeyError, TypeError):
            return None
        now = time.time()
        for p in (npy, meta):   # last use, for the age and size policy
            try:
                os.utime(p, (now, now))
            except OSError:
                pass
        return split

    def _save_disk(self, key: str, d: DecodedSplit) -> None:
        from .fsio import atomic_write, disk_full_message

        npy, meta = self._paths(key)
        try:
            self.cache_dir.mkdir(parents=True, exist_ok=True)
            self.prune(keep=key, incoming=d.images.numel())
            atomic_write(npy, lambda f: np.save(f, d.images.numpy(), allow_pickle=False))
            atomic_write(meta, lambda f: f.write(json.dumps(
                {"files": d.files, "labels": d.labels.tolist(), "skipped": d.skipped}).encode()))
        except OSError as exc:
            # The cache is an optimisation: a read-only or full disk must not fail the run, but is said.
            try:
                npy.unlink(missing_ok=True)
            except OSError:
                pass
            self.notes.append(disk_full_message(exc, "the decoded image cache", self.cache_dir)
                              + "; training goes on without it")

    def prune(self, keep: str | None = None, incoming: int = 0) -> list[Path]:
        """Apply the cache policy to ``cache_dir`` (see CACHE_MAX_MB); ``incoming`` bytes are about to be
        written, entry ``keep`` is not removed. Returns the files removed."""
        from .safety import env_limit, prune

        entries: dict[str, list] = {}
        try:
            for p in self.cache_dir.glob("decoded-*"):
                k = p.name.split(".", 1)[0][len("decoded-"):]
                st = p.stat()
                e = entries.setdefault(k, [[], 0.0, 0])
                e[0].append(p)
                e[1], e[2] = max(e[1], st.st_mtime), e[2] + st.st_size
        except OSError:
            return []
        max_bytes = env_limit("COVID_CLS_CACHE_MAX_MB", CACHE_MAX_MB, 2**20)
        return prune([tuple(e) for k, e in entries.items()], max_bytes=max_bytes - incoming,
                     max_age_s=env_limit("COVID_CLS_CACHE_MAX_AGE_DAYS", CACHE_MAX_AGE_DAYS, 86400),
                     keep=lambda paths: keep is not None and paths[0].name.startswith(f"decoded-{keep}."))


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
