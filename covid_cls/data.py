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
from collections import OrderedDict, deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from .card import MAX_CLASSES, class_name_ok
from .errors import DatasetError, UnsafePath
from .imaging import MAX_BYTES, ImageError, load_image

# The 2020 task's classes (ImageFolder order: alphabetical). A dataset may bring its own: 2 to MAX_CLASSES
# folders, the same in every split (``scan_dataset``); the card stores them and everything downstream reads them
# from there.
CLASSES: tuple[str, ...] = ("infected", "normal")
POSITIVE = "infected"


def positive_class(classes: Sequence[str]) -> str:
    """The class whose probability the binary operating point (threshold, ROC, sensitivity) is about:
    ``infected`` when present, else the one that is not ``normal`` of two, else the first."""
    if POSITIVE in classes:
        return POSITIVE
    others = [c for c in classes if c.lower() != "normal"]
    return others[0] if len(classes) == 2 and len(others) == 1 else classes[0]


def positive_index(classes: Sequence[str]) -> int:
    return list(classes).index(positive_class(classes))
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
    classes: tuple[str, ...] = CLASSES   # label i is classes[i]

    def counts(self) -> dict[str, int]:
        return {c: self.labels.count(i) for i, c in enumerate(self.classes)}


@dataclass
class DatasetInfo:
    root: Path
    splits: dict[str, Split]
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (relative path, reason)
    classes: tuple[str, ...] = CLASSES
    notes: list[str] = field(default_factory=list)   # what the user should know (classes absent from a split)

    @property
    def positive(self) -> str:
        return positive_class(self.classes)

    def counts(self) -> dict[str, dict[str, int]]:
        return {name: s.counts() for name, s in self.splits.items()}

    def summary(self) -> str:
        rows = [f"{name}: " + ", ".join(f"{c} {n}" for c, n in s.counts().items())
                for name, s in self.splits.items()]
        if self.skipped:
            rows.append(f"skipped {len(self.skipped)} file(s) that are not readable images")
        return "; ".join(rows)


def _find_split(root: Path, name: str, flat_ok: bool = False, classes: Sequence[str] | None = None) -> Path | None:
    """The folder of split ``name``; with ``flat_ok`` a flat labelled folder (class folders directly under
    ``root``, e.g. an external test set) stands for the one split asked for: when every one of ``classes`` (a
    model's) is a folder in ``root`` (also when a class is called like a split), or when there is no split folder."""
    if flat_ok and classes and all((root / c).is_dir() for c in classes):
        return root
    for candidate in SPLITS[name]:
        if (root / candidate).is_dir():
            return root / candidate
    if flat_ok and not any((root / c).is_dir() for names in SPLITS.values() for c in names):
        return root   # no split folder at all: the class folders sit directly in root
    return None


def _class_folders(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.is_dir() and not p.name.startswith((".", "__")))


def check_classes(classes: Sequence[str], where: str) -> tuple[str, ...]:
    """Class names found in ``where`` (folder names): 2 to MAX_CLASSES, each a usable label."""
    if not 2 <= len(classes) <= MAX_CLASSES:
        raise DatasetError(f"{where} has {len(classes)} class folder(s) ({', '.join(classes) or 'none'}); a "
                           f"dataset needs 2 to {MAX_CLASSES}, one folder per class, the same in every split")
    bad = [c for c in classes if not class_name_ok(c)]
    if bad:
        raise DatasetError(f"{where}: class name(s) {', '.join(map(repr, bad))} cannot be used as labels (a plain "
                           "folder name of at most 64 printable characters)")
    if len(set(classes)) != len(classes):
        raise DatasetError(f"{where}: the class names {', '.join(classes)} repeat")
    return tuple(classes)


def scan_dataset(root: str | os.PathLike, *,
                 splits: Iterable[str] = ("train", "validation", "test"),
                 roots: Sequence[Path] | None = None, classes: Sequence[str] | None = None,
                 partial_ok: bool = False) -> DatasetInfo:
    """Check the ImageFolder layout before any work and list the files.

    The classes are the folders of the first split (alphabetical, as torchvision's ImageFolder orders them),
    unless ``classes`` (a model's, when evaluating it) says which must be there; every split must have
    exactly those - or, with ``partial_ok`` (evaluating a model on a set that lacks some of its classes, e.g.
    normal X-rays only from another hospital), some of them, said in ``notes``. Raises DatasetError naming every
    problem at once (missing split, missing/extra class
    folders, empty classes). Files with non-image extensions are skipped and counted; decoding errors surface when
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
    notes: list[str] = []
    result: dict[str, Split] = {}
    skipped: list[tuple[str, str]] = []
    splits = tuple(splits)
    if classes is not None:   # a model's classes (its card is checked too): never joined to a path unchecked
        classes = check_classes(list(classes), "the model")
    found = {name: _find_split(root, name, flat_ok=len(splits) == 1, classes=classes) for name in splits}
    for name, folder in found.items():
        if folder is None:
            problems.append(f"missing split folder '{name}/' (accepted names: {', '.join(SPLITS[name])})")
    if classes is None:   # the union over splits, so that a class missing from one split is named there
        present = [f for f in found.values() if f is not None]
        if not present:
            raise DatasetError(f"dataset {root} cannot be used:\n  - " + "\n  - ".join(problems))
        try:
            classes = check_classes(sorted({c for f in present for c in _class_folders(f)}), f"{root.name}/")
        except DatasetError as exc:   # named together with the missing splits
            raise DatasetError(f"dataset {root} cannot be used:\n  - " + "\n  - ".join([*problems, str(exc)])) from None
    classes = tuple(classes)
    for name, folder in found.items():
        if folder is None:
            continue
        subdirs = _class_folders(folder)
        missing = [c for c in classes if c not in subdirs]
        extra = [d for d in subdirs if d not in classes]
        missing_note = [f"{folder.name}/ lacks class folder(s) {', '.join(missing)}"] if missing else []
        problems += missing_note
        if extra:
            problems.append(f"{folder.name}/ has unexpected folder(s) {', '.join(extra)} "
                            f"(expected exactly {', '.join(classes)}, as in the other splits)")
        split = Split(name, folder, classes=classes)
        empty = []
        for label, cls in enumerate(classes):
            files, n_outside = _class_files(folder / cls, root, roots, skipped) if cls in subdirs else ([], 0)
            split.files += files
            split.labels += [label] * len(files)
            if not files and cls in subdirs:
                empty.append(f"{folder.name}/{cls}/ contains no images" + (
                    f" inside the folders this server may read ({n_outside} lead outside)" if n_outside else ""))
        if partial_ok and split.files:   # some of the model's classes: said, not refused
            notes += [f"{name}: no images of class {c}; its sensitivity and AUC cannot be measured here"
                      for label, c in enumerate(classes) if label not in split.labels]
            problems = [p for p in problems if p not in missing_note]
        else:
            problems += empty
        result[name] = split
    if problems:
        raise DatasetError(f"dataset {root} cannot be used:\n  - " + "\n  - ".join(problems))
    return DatasetInfo(root, result, skipped, classes, notes)


def _class_files(cdir: Path, root: Path, roots: Sequence[Path] | None,
                 skipped: list[tuple[str, str]]) -> tuple[list[Path], int]:
    """The image files below one class folder, sorted; other files and (with ``roots``) files that lead outside
    the roots are added to ``skipped``. Also returns how many led outside."""
    files, n_outside = [], 0
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
        files.append(p)
    return files, n_outside


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
    split_folders = {name: next((c for c in accepted if (c,) in folders), None) for name, accepted in SPLITS.items()}
    present = {f for f in split_folders.values() if f is not None}
    classes = sorted({f[1] for f in folders if len(f) == 2 and f[0] in present and not f[1].startswith((".", "__"))})
    if present:
        try:
            check_classes(classes, "the zip")
        except DatasetError as exc:
            problems.append(str(exc))
    for name, folder in split_folders.items():
        if folder is None:
            problems.append(f"missing split folder '{name}/' (accepted names: {', '.join(SPLITS[name])})")
            continue
        for cls in classes:
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
    """A split decoded once: images (N,1,S,S) uint8, labels (N,), and the files they came from.

    ``mapped``: the images are a view of the cache file on disk (a memory map), not a copy in RAM. Reading them
    goes through the page cache, which the kernel fills on demand and can drop again (see ``DecodedCache``).
    """

    images: torch.Tensor
    labels: torch.Tensor
    files: list[str]
    skipped: list[tuple[str, str]]
    mapped: bool = False

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


def _bounded_map(pool: ThreadPoolExecutor, fn: Callable, items: Iterable, window: int) -> Iterator:
    """``pool.map(fn, items)``, in order, with at most ``window`` items submitted and not yet consumed.

    ``Executor.map`` submits every item at once and keeps each result until it is consumed: with 200,000 images
    and a consumer slower than the decoders (a disk), that is every decoded image in memory at once.
    """
    pending: deque = deque()
    try:
        for item in items:
            if len(pending) >= window:
                yield pending.popleft().result()
            pending.append(pool.submit(fn, item))
        while pending:
            yield pending.popleft().result()
    finally:
        for f in pending:   # the consumer stopped early (an error): what has not started never will
            f.cancel()


# The decoded caches' policy (issue 11 #2): on disk, entries not used for COVID_CLS_CACHE_MAX_AGE_DAYS are
# deleted, then the least recently used until the rest fits in COVID_CLS_CACHE_MAX_MB; in a process's memory,
# the least recently used splits go beyond COVID_CLS_CACHE_MEMORY_MB. 0 = no limit. A split that is larger than
# COVID_CLS_CACHE_MEMORY_MB by itself is not read into memory: it is memory-mapped (issue 13 #3).
CACHE_MAX_MB, CACHE_MAX_AGE_DAYS, CACHE_MEMORY_MB = 4096, 14, 2048
DECODE_WINDOW = 4   # decoded images in flight per worker: enough to keep every core busy, bounded memory
MAPPED_KEPT = 6     # memory-mapped splits kept open per process (their pages are page cache, not counted)
STALE_TMP_S = 300   # a dead writer's temporary file untouched this long is removed by ``prune``


def _memory_cap() -> float:
    from .safety import env_limit

    return env_limit("COVID_CLS_CACHE_MEMORY_MB", CACHE_MEMORY_MB, 2**20)


def _size(nbytes: float) -> str:
    return f"{nbytes / 1e9:.1f} GB" if nbytes >= 1e9 else f"{nbytes / 1e6:.1f} MB"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:   # another user's process
        pass
    return True


def _unlink_quietly(*paths: Path | None) -> None:
    for p in paths:
        try:
            if p is not None:
                p.unlink(missing_ok=True)
        except OSError:
            pass


def _index(split: Split, root: Path, kept: list[int], skipped: list[tuple[str, str]]) -> dict:
    """What the cache records beside the images: the files kept (in row order), their labels, the skipped."""
    return {"files": [str(split.files[i].relative_to(root)) for i in kept],
            "labels": [split.labels[i] for i in kept], "skipped": skipped}


def _split(images: torch.Tensor, index: dict, mapped: bool = False) -> DecodedSplit:
    return DecodedSplit(images, torch.tensor(index["labels"], dtype=torch.long), index["files"],
                        [tuple(s) for s in index["skipped"]], mapped)


class DecodedCache:
    """Decode every image once, in parallel, and keep it for reuse.

    Kept in memory (per process) and on disk under ``cache_dir`` keyed by the file list fingerprint and
    the square size, so a second run over the same data (another level, another arch, the study) costs
    a memory lookup, and a new process a single .npy read.

    On disk an entry is ``decoded-<key>.npy`` (N x 1 x S x S uint8, written row by row as the images decode, so
    building it takes memory for a few images, not N) and ``decoded-<key>.json``, its index (files, labels, rows
    used, key and shape), written last. A split up to COVID_CLS_CACHE_MEMORY_MB is read into RAM; a larger one
    is memory-mapped: training copies only each batch out of it, and its pages are page cache that the kernel
    drops under memory pressure, so a dataset larger than RAM trains (bench/disk_cache.py). Without the disk
    (``use_disk=False``, or a read-only or full one) splits are decoded into RAM.
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
        self.notes: list[str] = []   # what the caller should warn the user about (a full disk, ...)
        self.info: list[str] = []    # what the caller should tell the user (a split read through a memory map)

    def get(self, split: Split, root: Path,
            progress: Callable[[int, int], None] | None = None) -> DecodedSplit:
        # Entries made under a roots check are kept apart from unchecked ones (the CLI's): what the app
        # trains on was read through the check.
        # The classes too: the index stores labels, which are positions in them.
        key = fingerprint(split.files, extra=f"{self.size}|{','.join(split.classes)}"
                          + ("|roots-checked" if self.roots is not None else ""))
        with self._lock:
            decoded = self._memory.get(key)
            if decoded is not None:
                self._memory.move_to_end(key)
        if decoded is None:
            decoded = self._load_disk(key) if self.use_disk else None
            if decoded is None and self.use_disk:   # decoded straight into the cache file, then opened as a hit
                decoded = self._build_disk(key, split, root, progress)
            if decoded is None:   # no disk cache (not wanted, or the disk refused): decoded into RAM
                decoded = self._decode(split, root, progress)
            with self._lock:
                self._memory[key] = decoded
                self._trim_memory()
        if decoded.mapped:
            self.info.append(self._mapped_note(key, decoded))
        return decoded

    def _mapped_note(self, key: str, d: DecodedSplit) -> str:
        from .safety import env_limit

        nbytes = d.images.numel()
        note = (f"decoded cache: {len(d):,} images, {_size(nbytes)} on disk at {self._paths(key)[0]}, read through "
                f"a memory map (larger than COVID_CLS_CACHE_MEMORY_MB = {_memory_cap() / 2**20:g}); each batch is "
                "copied from it")
        if nbytes > env_limit("COVID_CLS_CACHE_MAX_MB", CACHE_MAX_MB, 2**20):
            note += ("; it is larger than COVID_CLS_CACHE_MAX_MB, so the next other entry written will delete it "
                     "(raise that limit to keep it)")
        return note

    @classmethod
    def _trim_memory(cls) -> None:
        # Memory-mapped splits are not counted: their pages are page cache, not this process's memory.
        cap, entries = _memory_cap(), list(cls._memory.items())
        total = sum(d.images.numel() for _, d in entries if not d.mapped)
        mapped = sum(d.mapped for _, d in entries)
        for key, d in entries[:-1]:   # least recently used first; the newest always stays
            if not d.mapped and total > cap:
                total -= d.images.numel()
                del cls._memory[key]
            elif d.mapped and mapped > MAPPED_KEPT:   # an open map keeps its file (see prune): not too many
                mapped -= 1
                del cls._memory[key]

    @classmethod
    def clear_memory(cls) -> None:
        with cls._lock:
            cls._memory.clear()

    def _squares(self, split: Split, root: Path, progress,
                 skipped: list[tuple[str, str]]) -> Iterator[tuple[int, np.ndarray]]:
        """(index, S x S uint8) of each file that decodes, in file order; the others are added to ``skipped``.

        Files are decoded in worker processes under the same memory/CPU/time limits as uploads (a hostile
        file in a training zip cannot take the trainer down), on every core by default; the threads feed them
        and resize, which PIL does without the GIL. At most DECODE_WINDOW x workers images are in flight.
        """
        from .sandbox import shared_pool

        decoder = shared_pool("dataset", self.workers, idle_ttl_s=30.0)
        n = len(split.files)
        with ThreadPoolExecutor(max_workers=self.workers) as pool:
            results = _bounded_map(pool, lambda p: _decode_one(p, self.size, decoder, self.roots), split.files,
                                   DECODE_WINDOW * self.workers)
            for i, res in enumerate(results):
                if isinstance(res, str):
                    skipped.append((str(split.files[i].relative_to(root)), res))
                else:
                    yield i, res
                if progress and ((i + 1) % 32 == 0 or i + 1 == n):
                    progress(i + 1, n)

    def _decode(self, split: Split, root: Path, progress) -> DecodedSplit:
        """Decode into RAM (no disk cache). Rows are filled in order: an unreadable file costs no copy."""
        out = np.empty((len(split.files), 1, self.size, self.size), dtype=np.uint8)
        kept: list[int] = []
        skipped: list[tuple[str, str]] = []
        for i, square in self._squares(split, root, progress, skipped):
            out[len(kept), 0] = square
            kept.append(i)
        return _split(torch.from_numpy(out[:len(kept)]), _index(split, root, kept, skipped))

    def _build_disk(self, key: str, split: Split, root: Path, progress) -> DecodedSplit | None:
        """Decode straight into entry ``key`` on disk, then open it as a hit would; None if the disk refused."""
        kept: list[int] = []
        skipped: list[tuple[str, str]] = []

        def fill(write) -> dict:
            for i, square in self._squares(split, root, progress, skipped):
                write(square)
                kept.append(i)
            return _index(split, root, kept, skipped)

        # A disk that fills up half-way costs a second decode, into RAM (get); a disk too small from the start
        # is seen before anything is decoded (_write_entry).
        return self._load_disk(key) if self._write_entry(key, len(split.files), fill) else None

    def _paths(self, key: str) -> tuple[Path, Path]:
        return self.cache_dir / f"decoded-{key}.npy", self.cache_dir / f"decoded-{key}.json"

    def _load_disk(self, key: str) -> DecodedSplit | None:
        """Entry ``key`` when complete and consistent with its index, else None (it is then rebuilt). Read into RAM
        up to COVID_CLS_CACHE_MEMORY_MB, memory-mapped above."""
        npy, meta = self._paths(key)
        try:
            info = json.loads(meta.read_text())
            # The index must describe this very file: two processes building the same entry at once could
            # otherwise leave one's index beside the other's images (same shape, other rows). Checked before
            # and after the file is opened, so a replacement in between is seen too.
            before = os.stat(npy)
            # A copy-on-write map: torch gets a writable array, and a stray in-place write would change this
            # process's copy of a page, never the file. np.load refuses a file shorter than its header says.
            arr = np.load(npy, mmap_mode="c", allow_pickle=False)
            after, rows = os.stat(npy), info["rows"]
            same_file = info["file"] == [before.st_dev, before.st_ino] == [after.st_dev, after.st_ino]
            if (info["key"] != key or not same_file
                    or list(arr.shape) != info["shape"] or arr.shape[1:] != (1, self.size, self.size)
                    or arr.dtype != np.uint8 or not 0 <= rows <= len(arr)
                    or not len(info["files"]) == len(info["labels"]) == rows):
                return None
            mapped = rows * self.size * self.size > _memory_cap()
            split = _split(torch.from_numpy(arr[:rows] if mapped else np.array(arr[:rows])), info, mapped)
        except (OSError, ValueError, KeyError, TypeError):
            return None
        now = time.time()
        for p in (npy, meta):   # last use, for the age and size policy
            try:
                os.utime(p, (now, now))
            except OSError:
                pass
        return split

    def _save_disk(self, key: str, d: DecodedSplit) -> bool:
        """Write an already decoded split as entry ``key``; False if the disk refused (said in ``notes``)."""
        def fill(write) -> dict:
            for square in d.images.numpy():
                write(square)
            return {"files": d.files, "labels": d.labels.tolist(), "skipped": d.skipped}

        return self._write_entry(key, len(d), fill)

    def _write_entry(self, key: str, n: int, fill: Callable[[Callable[[np.ndarray], object]], dict]) -> bool:
        """Write entry ``key`` of up to ``n`` images: ``fill(write)`` calls ``write(square)`` for each image kept,
        in order, and returns the index (files, labels, skipped). False if the disk refused (said in ``notes``).

        Nothing half-written is ever read as valid: the rows go to a temporary file (named like fsio.atomic_write's,
        with the writer's pid), renamed into place when complete and synced; the index, which ``_load_disk``
        requires and checks against the file (key, shape, rows), is written after it. Rows are appended with
        plain writes, not through a writable memory map: a full disk is then an OSError here, not a SIGBUS.
        """
        import errno
        import shutil

        from . import fsio

        npy, meta = self._paths(key)
        shape, nbytes, tmp = (n, 1, self.size, self.size), n * self.size * self.size, None
        try:
            meta.unlink(missing_ok=True)   # an index must never describe another file than the one it was made for
            self.cache_dir.mkdir(parents=True, exist_ok=True)
            self.prune(keep=key, incoming=nbytes)
            if shutil.disk_usage(self.cache_dir).free < nbytes + (64 << 20):   # said before anything is decoded
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            tmp = npy.with_name(f".{npy.name}.{os.getpid()}.{os.urandom(4).hex()}.tmp")
            with open(tmp, "xb") as f:
                np.lib.format.write_array_header_1_0(f, {"descr": "|u1", "fortran_order": False, "shape": shape})
                start = f.tell()
                index = fill(lambda square: f.write(np.ascontiguousarray(square, dtype=np.uint8).data))
                f.truncate(start + nbytes)   # rows of unreadable files: a hole at the end, never read
                f.flush()
                os.fsync(f.fileno())
            ident = os.stat(tmp)   # which file this index describes: a rename keeps the inode
            os.replace(tmp, npy)
            tmp = None
            record = {"key": key, "shape": list(shape), "rows": len(index["files"]),
                      "file": [ident.st_dev, ident.st_ino], **index}
            fsio.atomic_write(meta, lambda f: f.write(json.dumps(record).encode()))
            return True
        except OSError as exc:
            # The cache is an optimisation: a read-only or full disk must not fail the run, but is said.
            _unlink_quietly(npy, meta)
            self.notes.append(fsio.disk_full_message(exc, f"the decoded image cache ({_size(nbytes)})",
                                                     self.cache_dir) + "; training goes on without it")
            return False
        finally:
            _unlink_quietly(tmp)   # whatever stopped the writing (an error, Ctrl-C) leaves no temporary file

    def prune(self, keep: str | None = None, incoming: int = 0) -> list[Path]:
        """Apply the cache policy to ``cache_dir`` (see CACHE_MAX_MB); ``incoming`` bytes are about to be
        written. Entry ``keep`` and the entries this process reads through a memory map are not removed; a
        temporary file is, once its writer is gone (killed mid-write). Returns the files removed."""
        from .safety import env_limit, prune

        with self._lock:
            in_use = {k for k, d in self._memory.items() if d.mapped} | {keep}
        entries: dict[str, list] = {}
        stale: list[Path] = []
        try:
            for p in self.cache_dir.glob(".decoded-*.tmp"):   # .decoded-<key>.<ext>.<pid>.<random>.tmp
                pid = p.name.split(".")[3]
                if pid.isdigit() and not _pid_alive(int(pid)) and time.time() - p.stat().st_mtime > STALE_TMP_S:
                    p.unlink(missing_ok=True)
                    stale.append(p)
            for p in self.cache_dir.glob("decoded-*"):
                k = p.name.split(".", 1)[0][len("decoded-"):]
                st = p.stat()
                e = entries.setdefault(k, [[], 0.0, 0])
                e[0].append(p)
                e[1], e[2] = max(e[1], st.st_mtime), e[2] + st.st_size
        except OSError:
            return stale
        max_bytes = env_limit("COVID_CLS_CACHE_MAX_MB", CACHE_MAX_MB, 2**20)
        return stale + prune([tuple(e) for k, e in entries.items()], max_bytes=max_bytes - incoming,
                             max_age_s=env_limit("COVID_CLS_CACHE_MAX_AGE_DAYS", CACHE_MAX_AGE_DAYS, 86400),
                             keep=lambda paths: paths[0].name.split(".", 1)[0][len("decoded-"):] in in_use)


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
