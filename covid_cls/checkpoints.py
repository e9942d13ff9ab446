"""Checkpoints: one ``.pt`` per run plus a small JSON card beside it.

The ``.pt`` holds only tensors and plain Python values, so it loads with ``torch.load(weights_only=True)``;
anything needing pickle is refused. Writes are atomic (temporary name, fsync, ``os.replace``) and the
card is written last: a run killed at any point leaves either a complete, listed checkpoint or none.
The card records the size and SHA-256 of its ``.pt``: listing skips a file whose size or zip structure
does not match (truncated), and loading refuses one whose bytes changed (torch itself does not check the
stored tensors, so a damaged file would otherwise load with silently wrong weights).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import pickle
import platform
import tempfile
import time
import warnings
import zipfile
from pathlib import Path
from typing import Any, Callable, IO

import torch

FORMAT_VERSION = 1
_UMASK = os.umask(0o022)  # read once at import (os.umask can only be read by setting it)
os.umask(_UMASK)
log = logging.getLogger(__name__)


class CheckpointError(ValueError):
    """A checkpoint file is unsafe, corrupt or not one of ours."""


def atomic_write(path: str | os.PathLike, write: Callable[[IO[bytes]], Any]) -> None:
    """Write via a temporary file in the same folder, fsync, then rename over ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # The writer's pid is part of the name: a process killed mid-write (SIGKILL skips the cleanup below)
    # leaves ".<name>.<pid>.<random>.tmp", which whoever watched that process can remove (see jobs.py).
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.{os.getpid()}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, 0o666 & ~_UMASK)  # mkstemp creates 0600; give the file normal permissions
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    try:  # make the rename itself durable
        dfd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
    except OSError:
        pass


def library_versions() -> dict[str, str]:
    import numpy
    import torchvision

    return {"python": platform.python_version(), "torch": str(torch.__version__),
            "torchvision": str(torchvision.__version__), "numpy": str(numpy.__version__)}


def card_path(pt: str | os.PathLike) -> Path:
    return Path(pt).with_suffix(".json")


def save_checkpoint(out_dir: str | os.PathLike, model: torch.nn.Module, meta: dict[str, Any],
                    name: str | None = None, tensors: dict[str, Any] | None = None) -> Path:
    """Save ``model``'s state_dict with ``meta`` (arch, level, classes, config, metrics, ...).

    Returns the ``.pt`` path. The card (``.json``) repeats the metadata without the weights so that
    listing checkpoints never loads tensors. ``tensors``: extra entries (tensors and plain values, e.g.
    the OOD statistics) stored in the ``.pt`` only.
    """
    out_dir = Path(out_dir)
    arch, level = meta["arch"], meta["level"]
    stamp = time.strftime("%Y%m%d-%H%M%S")
    name = name or f"{arch}-{level}-{stamp}"
    path = out_dir / f"{name}.pt"
    n = 1
    while path.exists() or card_path(path).exists():
        path = out_dir / f"{name}-{n}.pt"
        n += 1
    card = {"format": FORMAT_VERSION, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "versions": library_versions(), **meta, "file": path.name}
    # A JSON round trip keeps only plain values (no numpy scalars, no str subclasses such as
    # torch's TorchVersion), which is what lets the file load with weights_only=True.
    card = json.loads(json.dumps(card, default=str))
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    payload = {**card, **(tensors or {}), "state_dict": state}
    try:
        atomic_write(path, lambda f: torch.save(payload, f))
        # The card also vouches for the weights file: its size (checked by listing) and digest (by loading).
        card_on_disk = {**card, "bytes": path.stat().st_size, "sha256": file_sha256(path)}
        atomic_write(card_path(path),
                     lambda f: f.write(json.dumps(card_on_disk, indent=2, default=str).encode()))
    except BaseException as exc:
        path.unlink(missing_ok=True)   # weights without a card are of no use to anyone: leave nothing
        if isinstance(exc, OSError):
            raise OSError(exc.errno, f"could not save the checkpoint in {out_dir}: "
                          f"{exc.strerror or exc}; nothing was saved. Free some disk space (or choose "
                          "another output folder) and train again") from exc
        raise
    return path


def file_sha256(path: str | os.PathLike) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load a checkpoint safely (``weights_only=True``); refuse pickled objects with a clear error."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path.name} does not exist")
    card = read_card(path)
    if card is not None and card.get("file") == path.name:
        problem = _mismatch(path, card, digest=True)
        if problem:
            raise CheckpointError(f"cannot read checkpoint {path.name}: it is corrupt or truncated ({problem}); "
                                  "delete it and train again")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:  # what weights_only=True raises
        if "GLOBAL" not in str(exc):  # not a refused class/function: the bytes are just not a checkpoint
            raise CheckpointError(f"cannot read checkpoint {path.name}: it is corrupt or truncated") from exc
        raise CheckpointError(
            f"refusing to load {path.name}: it contains pickled Python objects beyond tensors and plain "
            "values, which could run code when loaded. Only checkpoints saved by covid_cls are accepted."
        ) from exc
    except Exception as exc:  # noqa: BLE001 - truncated zip, wrong format, ...
        raise CheckpointError(f"cannot read checkpoint {path.name}: it is corrupt or truncated ({exc})") from exc
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt or "arch" not in ckpt:
        raise CheckpointError(f"{path.name} is not a covid_cls checkpoint (no arch/state_dict)")
    if ckpt.get("format", 0) > FORMAT_VERSION:
        raise CheckpointError(f"{path.name} was written by a newer covid_cls (format {ckpt['format']})")
    return ckpt


def load_model(path: str | os.PathLike, device: str | torch.device = "cpu") -> tuple[torch.nn.Module, dict]:
    """Rebuild the model of a checkpoint (no download: the weights are all in the file)."""
    from .models import build_model

    ckpt = load_checkpoint(path)
    model = build_model(ckpt["arch"], ckpt["level"], weights="none", num_classes=len(ckpt["classes"]),
                        hidden=ckpt.get("hidden", 4300))
    try:
        model.load_state_dict(ckpt.pop("state_dict"))
    except RuntimeError as exc:
        raise CheckpointError(f"{Path(path).name}: weights do not fit {ckpt['arch']} ({exc})") from exc
    model.covid_meta.update(weights_origin=ckpt.get("weights_origin", "unknown"))
    return model.to(device).eval(), ckpt


def read_card(pt: str | os.PathLike) -> dict | None:
    try:
        card = json.loads(card_path(pt).read_text())
    except (OSError, ValueError):
        return None
    return card if isinstance(card, dict) and "arch" in card and "level" in card else None


def list_checkpoints(directory: str | os.PathLike) -> list[dict[str, Any]]:
    """Cards of every complete checkpoint in ``directory``, newest first; each has ``path``.

    A ``.pt`` without a readable card (a run killed while saving, a corrupt file) is skipped with a warning.
    """
    directory = Path(directory)
    if not directory.is_dir():
        return []
    cards = []
    for pt in sorted(directory.glob("*.pt")):
        card = read_card(pt)
        try:
            problem = "no valid card beside it" if card is None else _mismatch(pt, card, digest=False)
        except OSError:
            continue   # deleted meanwhile
        if problem:
            warnings.warn(f"skipping {pt.name}: {problem} (incomplete or corrupt)", RuntimeWarning)
            continue
        card["path"] = str(pt)
        cards.append(card)
    cards.sort(key=lambda c: c.get("created", ""), reverse=True)
    return cards


def _mismatch(pt: Path, card: dict, digest: bool) -> str | None:
    """Why ``pt`` is not the file its card describes, or None. Cheap checks only unless ``digest``."""
    size = pt.stat().st_size
    if size == 0:
        return "the file is empty"
    if isinstance(card.get("bytes"), int) and card["bytes"] != size:
        return f"{size:,} bytes instead of {card['bytes']:,}"
    if not zipfile.is_zipfile(pt):   # torch.save writes a zip; a cut-off one has no central directory
        return "not a complete checkpoint archive"
    if digest and isinstance(card.get("sha256"), str) and card["sha256"] != file_sha256(pt):
        return "its contents changed since it was saved"
    return None


def _score(card: dict) -> tuple[float, str]:
    val = (card.get("metrics") or {}).get("validation") or {}
    auc = val.get("auc")
    return (auc if isinstance(auc, (int, float)) else -1.0, card.get("created", ""))


def best_checkpoint(directory: str | os.PathLike, arch: str, level: str) -> Path | None:
    """The checkpoint for (arch, level) with the best validation AUC (newest on ties), or None."""
    cands = [c for c in list_checkpoints(directory) if c["arch"] == arch and c["level"] == level]
    if not cands:
        return None
    return Path(max(cands, key=_score)["path"])


def delete_checkpoint(path: str | os.PathLike) -> None:
    """Remove the card first (so the checkpoint stops being listed), then the weights."""
    path = Path(path)
    for p in (card_path(path), path):
        try:
            p.unlink()
        except FileNotFoundError:
            pass
