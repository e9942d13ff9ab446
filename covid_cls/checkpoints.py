"""Checkpoints: ``NAME.safetensors`` (the tensors) with ``NAME.json`` (its ``Card``) beside it.

- No pickle anywhere: safetensors holds only tensors and a string-to-string header, so loading a file can
  never run code. Format-1 ``NAME.pt`` files (torch zip, read with ``weights_only=True``) still load,
  read-only, with a notice; ``migrate_checkpoint`` rewrites one as safetensors.
- Nothing half-written: weights first, card last, each atomically (``fsio.atomic_write``); listing shows
  only weights that a card vouches for (name, size), loading checks the card's SHA-256 first.
- Nothing sized from a lie: the card is validated (``Card.from_dict``) and compared with the tensors'
  header (architecture, level, classes, head shapes) before a model is allocated.
- Small where it can be: a run that started from public ImageNet weights stores only what its level trained
  plus the base weights' name and SHA-256; the frozen rest is rebuilt from those weights on load (a
  VGG16 · fc checkpoint: ~70 MB of head instead of ~620 MB). A run from scratch stores everything.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import pickle
import platform
import struct
import time
import warnings
import zipfile
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from .card import FORMAT_VERSION, Card
from .errors import CheckpointError
from .fsio import atomic_write, disk_full_message

log = logging.getLogger(__name__)
SUFFIX = ".safetensors"
LEGACY_SUFFIX = ".pt"
_MAX_HEADER = 100 * 1024 * 1024   # safetensors' own limit on the JSON header


@dataclass
class Checkpoint:
    """A loaded checkpoint: its card, the model's tensors (``FineTuneNet`` keys) and the extra tensors
    (OOD statistics) stored beside them."""

    path: Path
    card: Card
    state: dict[str, torch.Tensor]
    extras: dict[str, torch.Tensor] = field(default_factory=dict)
    legacy: bool = False

    @property
    def ood_stats(self) -> dict[str, dict[str, Any]] | None:
        """{detector: {tensors..., threshold, quantile, val_median}} as ``ood.assess`` takes it."""
        stats: dict[str, dict[str, Any]] = {}
        for key, t in self.extras.items():
            _, det, name = key.split(".", 2)
            stats.setdefault(det, {})[name] = t
        for det, scalars in self.card.ood.items():
            if det in stats and isinstance(scalars, dict):
                stats[det].update({k: v for k, v in scalars.items() if isinstance(v, (int, float))})
        return stats or None


def library_versions() -> dict[str, str]:
    import numpy
    import safetensors
    import torchvision

    return {"python": platform.python_version(), "torch": str(torch.__version__),
            "torchvision": str(torchvision.__version__), "numpy": str(numpy.__version__),
            "safetensors": str(safetensors.__version__)}


def card_path(weights: str | os.PathLike) -> Path:
    return Path(weights).with_suffix(".json")


def file_sha256(path: str | os.PathLike) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _essentials(card: Card) -> dict[str, Any]:
    """What the safetensors header repeats from the card, so that neither can be swapped alone."""
    return {"arch": card.arch, "level": card.level, "classes": card.classes, "hidden": card.hidden,
            "stored": card.stored, "base_weights": card.base_weights.get("sha256", "")}


def _flatten_ood(ood_stats: dict[str, dict[str, Any]] | None) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    tensors, scalars = {}, {}
    for det, stats in (ood_stats or {}).items():
        for k, v in stats.items():
            if isinstance(v, torch.Tensor):
                tensors[f"ood.{det}.{k}"] = v.detach().cpu().contiguous()
            else:
                scalars.setdefault(det, {})[k] = v
    return tensors, scalars


# ---------------------------------------------------------------------------------------------------
# Saving
# ---------------------------------------------------------------------------------------------------

def _free_name(out_dir: Path, name: str) -> Path:
    path, n = out_dir / f"{name}{SUFFIX}", 1
    while any(p.exists() for p in (path, card_path(path), path.with_suffix(LEGACY_SUFFIX))):
        path, n = out_dir / f"{name}-{n}{SUFFIX}", n + 1
    return path


def save_checkpoint(out_dir: str | os.PathLike, model: torch.nn.Module, card: Card | dict[str, Any],
                    name: str | None = None, ood_stats: dict[str, dict[str, Any]] | None = None) -> Path:
    """Save ``model`` with its ``card``; returns the ``.safetensors`` path (the card is ``.json`` beside it).

    What is stored: everything, unless the model started from public ImageNet weights and its level froze
    part of it — then only the trained modules (``FineTuneNet.trained_state_dict``).
    """
    from safetensors.torch import save as st_save

    out_dir = Path(out_dir)
    card = Card.from_dict(card) if isinstance(card, dict) else replace(card)
    base = getattr(model, "base_weights", {}) or {}
    partial = bool(base) and getattr(model, "weights_origin", "") == "imagenet" and card.level != "full"
    state = model.trained_state_dict() if partial else model.state_dict()
    card.stored, card.base_weights = ("trained", dict(base)) if partial else ("all", {})
    path = _free_name(out_dir, name or f"{card.arch}-{card.level}-{time.strftime('%Y%m%d-%H%M%S')}")
    ood_tensors, ood_scalars = _flatten_ood(ood_stats)
    card.ood = {**card.ood, **{d: {**card.ood.get(d, {}), **s} for d, s in ood_scalars.items()}}
    card.format, card.file, card.versions = FORMAT_VERSION, path.name, library_versions()
    card.created = card.created or time.strftime("%Y-%m-%dT%H:%M:%S%z")
    tensors = {k: v.detach().cpu().contiguous() for k, v in state.items()} | ood_tensors
    # A JSON round trip keeps only plain values (no numpy scalars, no str subclasses such as TorchVersion).
    card_dict = json.loads(json.dumps(card.to_dict(), default=str))
    blob = st_save(tensors, metadata={"format": str(FORMAT_VERSION),
                                      "covid_cls": json.dumps(_essentials(card), sort_keys=True)})
    try:
        atomic_write(path, lambda f: f.write(blob))
        blob = b""   # free the serialised copy before hashing
        # The card also vouches for the weights file: its size (checked by listing) and digest (by loading).
        card_dict.update(bytes=path.stat().st_size, sha256=file_sha256(path))
        atomic_write(card_path(path), lambda f: f.write(json.dumps(card_dict, indent=2).encode()))
    except BaseException as exc:
        path.unlink(missing_ok=True)   # weights without a card are of no use to anyone: leave nothing
        if isinstance(exc, OSError):
            raise OSError(exc.errno, disk_full_message(exc, "the checkpoint", out_dir)
                          + "; nothing was saved") from exc
        raise
    return path


# ---------------------------------------------------------------------------------------------------
# Reading
# ---------------------------------------------------------------------------------------------------

def read_card(weights: str | os.PathLike) -> Card | None:
    """The valid card beside ``weights``, or None (missing, unreadable or invalid)."""
    try:
        return _read_card(Path(weights))
    except CheckpointError:
        return None


def _read_card(weights: Path) -> Card:
    try:
        raw = json.loads(card_path(weights).read_text())
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{weights.name} has no readable card ({card_path(weights).name})") from exc
    card = Card.from_dict(raw, source=card_path(weights).name)
    card.path = str(weights)
    return card


def _mismatch(path: Path, card: Card, digest: bool) -> str | None:
    """Why ``path`` is not the file its card describes, or None. Cheap checks only unless ``digest``."""
    size = path.stat().st_size
    if size == 0:
        return "the file is empty"
    if card.file and card.file != path.name:
        return f"its card describes {card.file}"
    if isinstance(card.bytes, int) and card.bytes != size:
        return f"{size:,} bytes instead of {card.bytes:,}"
    if path.suffix == LEGACY_SUFFIX:
        if not zipfile.is_zipfile(path):   # torch.save writes a zip; a cut-off one has no central directory
            return "not a complete checkpoint archive"
    else:
        with open(path, "rb") as f:
            head = f.read(8)
        n = struct.unpack("<Q", head)[0] if len(head) == 8 else -1
        if not 0 < n <= min(_MAX_HEADER, size - 8):
            return "not a safetensors file"
    if digest and isinstance(card.sha256, str) and card.sha256 != file_sha256(path):
        return "its contents changed since it was saved"
    return None


def _corrupt(path: Path, problem: str) -> CheckpointError:
    return CheckpointError(f"cannot read checkpoint {path.name}: it is corrupt or truncated ({problem}); "
                           "delete it and train again")


def load_checkpoint(path: str | os.PathLike) -> Checkpoint:
    """Read and verify a checkpoint (card, digest, header vs card) without building a model."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path.name} does not exist")
    if path.suffix == LEGACY_SUFFIX:
        return _load_legacy(path)
    if path.suffix != SUFFIX:
        raise CheckpointError(f"{path.name} is not a checkpoint (expected {SUFFIX} or {LEGACY_SUFFIX})")
    card = _read_card(path)
    problem = _mismatch(path, card, digest=True)
    if problem:
        raise _corrupt(path, problem)
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            _check_header(path, card, f.metadata() or {}, {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()})
        tensors = _read_tensors(path)
    except SafetensorError as exc:
        raise _corrupt(path, str(exc)) from exc
    state = {k: v for k, v in tensors.items() if not k.startswith("ood.")}
    extras = {k: v for k, v in tensors.items() if k.startswith("ood.")}
    return Checkpoint(path, card, state, extras)


_ST_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
              "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
              "BOOL": torch.bool}


def _read_tensors(path: Path) -> dict[str, torch.Tensor]:
    """The tensors of a safetensors file (already validated by ``safe_open``), each read straight into its own
    memory with ``readinto``. ``safe_open(...).get_tensor`` returns views of a private mmap of the whole file:
    all of its pages count in the process's RSS while any tensor lives, and a model adopting them would read
    from the file for as long as it is loaded (a file truncated in place would crash the server: SIGBUS). Here
    the file goes through the page cache only; the process holds each tensor once (issue 12 #6)."""
    import sys

    if sys.byteorder != "little":   # safetensors is little-endian; let the library convert
        from safetensors.torch import load_file

        return load_file(str(path))
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
        start = 8 + n
        out = {}
        for key, info in header.items():
            if key == "__metadata__":
                continue
            t = torch.empty(info["shape"], dtype=_ST_DTYPES[info["dtype"]])
            lo, hi = info["data_offsets"]
            if hi - lo != t.numel() * t.element_size():
                raise CheckpointError(f"{path.name}: tensor {key} has {hi - lo} bytes for shape {info['shape']}")
            if hi > lo:
                f.seek(start + lo)
                if f.readinto(memoryview(t.view(-1).view(torch.uint8).numpy())) != hi - lo:
                    raise CheckpointError(f"{path.name}: tensor {key} is cut short")
            out[key] = t
    return out


def _check_header(path: Path, card: Card, meta: dict[str, str], shapes: dict[str, tuple[int, ...]]) -> None:
    """The tensors must be the model the card describes, checked before anything is allocated for it."""
    from .models import get_spec

    try:
        essentials = json.loads(meta.get("covid_cls", ""))
    except ValueError:
        essentials = None
    if essentials != json.loads(json.dumps(_essentials(card))):
        raise CheckpointError(f"{path.name}: its card does not match the tensors (the header says "
                              f"{str(essentials)[:200]}); refusing to load it")
    spec = get_spec(card.arch)
    want = {"head.0.weight": (card.hidden, spec.in_features), "head.3.weight": (card.num_classes, card.hidden)}
    for key, shape in want.items():
        if shapes.get(key) != shape:
            raise CheckpointError(f"{path.name}: tensor {key} has shape {shapes.get(key)}, the card says {shape}")


def _load_legacy(path: Path) -> Checkpoint:
    """A format-1 ``.pt`` (torch zip of tensors and plain values): loaded with ``weights_only=True``."""
    from .models import legacy_state_key

    card = read_card(path)
    if card is not None and card.file == path.name:
        problem = _mismatch(path, card, digest=True)
        if problem:
            raise _corrupt(path, problem)
    try:
        raw = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:  # what weights_only=True raises
        if "GLOBAL" not in str(exc):  # not a refused class/function: the bytes are just not a checkpoint
            raise _corrupt(path, "not a checkpoint archive") from exc
        raise CheckpointError(
            f"refusing to load {path.name}: it contains pickled Python objects beyond tensors and plain "
            "values, which could run code when loaded. Only checkpoints saved by covid_cls are accepted."
        ) from exc
    except Exception as exc:  # noqa: BLE001 - truncated zip, wrong format, ...
        raise _corrupt(path, str(exc)) from exc
    if not isinstance(raw, dict) or not isinstance(raw.get("state_dict"), dict) or "arch" not in raw:
        raise CheckpointError(f"{path.name} is not a covid_cls checkpoint (no arch/state_dict)")
    if isinstance(raw.get("format"), int) and raw["format"] > 1:
        raise CheckpointError(f"{path.name} claims format {raw['format']}, but .pt files are format 1")
    ood_stats = raw.pop("ood_stats", None)
    state = raw.pop("state_dict")
    card = Card.from_dict({**raw, "stored": "all", "file": path.name}, source=path.name)
    card.path = str(path)
    extras, _ = _flatten_ood(ood_stats if isinstance(ood_stats, dict) else None)
    state = {legacy_state_key(card.arch, k): v for k, v in state.items() if isinstance(v, torch.Tensor)}
    warnings.warn(f"{path.name} is a format-1 .pt checkpoint: it loads read-only; `python -m covid_cls "
                  "migrate` rewrites it as safetensors", RuntimeWarning, stacklevel=3)
    return Checkpoint(path, card, state, extras, legacy=True)


def model_from_checkpoint(ckpt: Checkpoint, device: str | torch.device = "cpu") -> torch.nn.Module:
    """Rebuild the ``FineTuneNet`` of a loaded checkpoint (frozen part from its base weights if needed)."""
    from .models import build_model, load_base_weights

    c = ckpt.card
    base = load_base_weights(c.arch, c.base_weights) if c.stored == "trained" else None   # WeightsUnavailable
    # Everything stored: build the structure on the meta device (no memory, no random init) and adopt the
    # loaded tensors as the parameters (assign=True). Building it for real and copying into it held the model
    # twice while loading: +579 MB at the peak for a VGG16, and seconds of random initialisation (issue 12 #6).
    on_meta = base is None
    with torch.device("meta") if on_meta else contextlib.nullcontext():
        model = build_model(c.arch, c.level, weights="none", num_classes=c.num_classes, hidden=c.hidden,
                            dropout=c.dropout)
    try:
        if on_meta:
            model.load_state_dict(ckpt.state, assign=True)
            if any(t.is_meta for t in (*model.parameters(), *model.buffers())):
                raise RuntimeError("tensors missing from the checkpoint")
            model.set_level(c.level)   # which parameters train, as build_model left them (assign replaced them)
        elif base is not None:
            head_prefix = model.spec.head_path + "."
            model.backbone.load_state_dict({k: v for k, v in base.items() if not k.startswith(head_prefix)})
            trained = set(model.trained_state_dict())
            if set(ckpt.state) != trained:
                raise CheckpointError(f"{ckpt.path.name}: it should hold exactly the tensors level "
                                      f"{c.level} trains; {len(set(ckpt.state) ^ trained)} differ")
            model.load_state_dict(ckpt.state, strict=False)
        else:
            model.load_state_dict(ckpt.state)
    except RuntimeError as exc:
        raise CheckpointError(f"{ckpt.path.name}: weights do not fit {c.arch} ({exc})") from exc
    model.weights_origin, model.weights_note = c.weights_origin, c.weights_note
    model.base_weights = dict(c.base_weights)
    return model.to(device).eval()


def load_model(path: str | os.PathLike, device: str | torch.device = "cpu") -> tuple[torch.nn.Module, Card]:
    """Load and verify a checkpoint and rebuild its model; returns (model in eval mode, card)."""
    ckpt = load_checkpoint(path)
    return model_from_checkpoint(ckpt, device), ckpt.card


def migrate_checkpoint(path: str | os.PathLike) -> Path:
    """Rewrite a format-1 ``.pt`` as safetensors + card beside it; the ``.pt`` and its card are removed
    only after the new pair is complete. Returns the new path."""
    ckpt = load_checkpoint(path)
    if not ckpt.legacy:
        return ckpt.path
    model = model_from_checkpoint(ckpt)
    card = replace(ckpt.card, file="", bytes=None, sha256=None, path="")
    new = save_checkpoint(ckpt.path.parent, model, card, name=ckpt.path.stem + "-v2", ood_stats=ckpt.ood_stats)
    delete_checkpoint(ckpt.path)
    return new


# ---------------------------------------------------------------------------------------------------
# Listing
# ---------------------------------------------------------------------------------------------------

def list_checkpoints(directory: str | os.PathLike) -> list[Card]:
    """Cards of every complete checkpoint in ``directory``, newest first; each has ``path`` set.

    Weights without a valid card (a run killed while saving, a corrupt or altered file) are skipped with
    a warning.
    """
    directory = Path(directory)
    if not directory.is_dir():
        return []
    cards = []
    for weights in sorted([*directory.glob(f"*{SUFFIX}"), *directory.glob(f"*{LEGACY_SUFFIX}")]):
        try:
            card = _read_card(weights)
            problem = _mismatch(weights, card, digest=False)
        except CheckpointError as exc:
            problem = f"no valid card beside it: {exc}"
        except OSError:
            continue   # deleted meanwhile
        if problem:
            warnings.warn(f"skipping {weights.name}: {problem} (incomplete or corrupt)", RuntimeWarning)
            continue
        cards.append(card)
    cards.sort(key=lambda c: c.created, reverse=True)
    return cards


def ranked_checkpoints(directory: str | os.PathLike, arch: str, level: str) -> list[Path]:
    """Checkpoints for (arch, level), best validation AUC first (newest first on ties)."""
    cands = [c for c in list_checkpoints(directory) if c.arch == arch and c.level == level]
    cands.sort(key=lambda c: (c.val_auc, c.created), reverse=True)
    return [Path(c.path) for c in cands]


def best_checkpoint(directory: str | os.PathLike, arch: str, level: str) -> Path | None:
    """The checkpoint for (arch, level) with the best validation AUC (newest on ties), or None."""
    ranked = ranked_checkpoints(directory, arch, level)
    return ranked[0] if ranked else None


def delete_checkpoint(path: str | os.PathLike) -> None:
    """Remove the card first (so the checkpoint stops being listed), then the weights."""
    path = Path(path)
    for p in (card_path(path), path):
        try:
            p.unlink()
        except FileNotFoundError:
            pass


__all__ = ["Checkpoint", "CheckpointError", "save_checkpoint", "load_checkpoint", "load_model",
           "model_from_checkpoint", "migrate_checkpoint", "read_card", "list_checkpoints", "ranked_checkpoints",
           "best_checkpoint", "delete_checkpoint", "card_path", "file_sha256", "SUFFIX", "LEGACY_SUFFIX"]
