"""Batch prediction (issue 12 #3): several files, a folder or a zip -> one row per image, and a CSV.

Shared by the app's Predict tab (``/predict_batch``) and ``python -m covid_cls predict DIR_OR_ZIP --csv``.

Bounded before any model work: at most ``max_files`` images (app: ``COVID_CLS_BATCH_MAX_FILES``, 200), each at
most ``max_file_bytes`` (the upload limit; a larger file gets an error in its row and is not read) and all
together at most ``max_total_bytes`` (``COVID_CLS_BATCH_MAX_MB``, 512). A zip goes through
``safety.safe_extract_zip`` (no path escapes, links, bombs) into a private temporary folder, after its declared
sizes were checked against the total cap. Images are handed to the model as paths, ``chunk`` at a time, and
every ``Prediction`` is reduced to its row (and a small overlay) before the next chunk: memory stays that of
one chunk however many images there are. A file that cannot be read or decoded is reported in its row and never
fails the batch.
"""

from __future__ import annotations

import csv
import io
import os
import tempfile
import zipfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import ConfigError, CovidClsError, ImageError

if TYPE_CHECKING:
    from PIL import Image

    from .predictor import Prediction

#: names a folder or a zip is searched for (case-insensitive); other files are skipped and counted
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".webp", ".gif", ".dcm", ".dicom")
MAX_FILES = 200
MAX_TOTAL_MB = 512
CHUNK = 16
UNCERTAIN_SHORT = "uncertain"
ERROR_LABEL = "error"


class BatchTooLarge(ConfigError):
    """A batch over the count or byte cap; refused before anything is read."""


def env_int(name: str, default: int) -> int:
    try:
        value = int(float(os.environ.get(name, default)))
    except ValueError:
        return default
    return value if value > 0 else default


def app_limits(max_upload: int) -> dict[str, int]:
    """The app's caps: COVID_CLS_BATCH_MAX_FILES (200), the upload limit per file, COVID_CLS_BATCH_MAX_MB (512)."""
    return {"max_files": env_int("COVID_CLS_BATCH_MAX_FILES", MAX_FILES), "max_file_bytes": max_upload,
            "max_total_bytes": env_int("COVID_CLS_BATCH_MAX_MB", MAX_TOTAL_MB) * 2**20}


@dataclass
class Item:
    """One image of a batch: the name shown in its row, and its file (None when refused before reading)."""

    name: str
    path: Path | None
    error: str | None = None


@dataclass
class Row:
    file: str
    label: str                               # the class, "uncertain" or "error"
    decision: str = ""                       # the class at the model's operating point
    probs: dict[str, float] = field(default_factory=dict)
    reasons: list[str] = field(default_factory=list)
    error: str = ""


@dataclass
class Collected:
    items: list[Item]
    skipped: list[str]                       # files that are not images by their name (not predicted)


def is_image_name(name: str) -> bool:
    return name.lower().endswith(IMAGE_SUFFIXES)


def _hidden(rel: Path) -> bool:
    return any(part.startswith(".") or part == "__MACOSX" for part in rel.parts)


def _is_zip(path: Path) -> bool:
    if path.suffix.lower() == ".zip":
        return True
    try:
        return not is_image_name(path.name) and zipfile.is_zipfile(path)
    except OSError:
        return False


def collect(sources: Sequence[tuple[str, str | os.PathLike]], workdir: str | os.PathLike, *,
            max_files: int = MAX_FILES, max_file_bytes: int, max_total_bytes: int,
            folders: bool = True) -> Collected:
    """The images of ``sources`` — (name, path) pairs: an image file (taken whatever its name), a folder
    (searched recursively for image names) or a zip (extracted safely under ``workdir``) — in order.

    Raises BatchTooLarge when there are more than ``max_files`` images or their sizes (a zip's: as declared
    by all its members) add up to more than ``max_total_bytes``: a clear message and nothing predicted. A file
    over ``max_file_bytes`` or one that cannot be read gets an error in its row. ``folders=False`` (the app,
    whose sources are uploads): a folder is an error row, never searched."""
    items: list[Item] = []
    skipped: list[str] = []
    total = 0

    def add(name: str, path: Path) -> None:
        nonlocal total
        try:
            size = path.stat().st_size
        except OSError:
            items.append(Item(name, None, "the file is no longer there (upload it again)"))
            return
        if size > max_file_bytes:
            items.append(Item(name, None, f"the file is {size / 2**20:.1f} MB; the limit is "
                                          f"{max_file_bytes / 2**20:.0f} MB per file (not read)"))
            return
        total += size
        items.append(Item(name, path))

    def check_count(n: int) -> None:
        if n > max_files:
            raise BatchTooLarge(f"the batch holds {n:,} images; at most {max_files:,} are predicted at once. "
                                "Split it into smaller batches.")

    def check_bytes(n: int) -> None:
        if n > max_total_bytes:
            raise BatchTooLarge(f"the batch holds {n / 2**20:,.0f} MB of files; the limit is "
                                f"{max_total_bytes / 2**20:,.0f} MB per batch. Split it into smaller batches.")

    for k, (name, src) in enumerate(sources):
        path = Path(src)
        if path.is_dir() and not folders:
            check_count(len(items) + 1)
            items.append(Item(name, None, "a folder, not a file (not read)"))
        elif path.is_dir():
            found = sorted(p for p in path.rglob("*") if p.is_file() and not _hidden(p.relative_to(path)))
            images = [p for p in found if is_image_name(p.name)]
            skipped += [f"{name}/{p.relative_to(path)}" for p in found if not is_image_name(p.name)]
            check_count(len(items) + len(images))
            for p in images:
                rel = p.relative_to(path).as_posix()
                add(f"{name}/{rel}" if len(sources) > 1 else rel, p)
        elif path.is_file() and _is_zip(path):
            inner = _zip_members(path, name, max_total_bytes - total)
            check_count(len(items) + len(inner))
            from .safety import safe_extract_zip

            dest = Path(workdir) / f"zip-{k}"
            safe_extract_zip(path, dest)      # every entry checked first: escapes, links, bombs, sizes
            for member in inner:
                member_path = dest.joinpath(*Path(member).parts)
                shown = f"{name}/{member}" if len(sources) > 1 else member
                if member_path.is_file():
                    add(shown, member_path)
                else:
                    items.append(Item(shown, None, "could not be extracted from the zip"))
            skipped += [f"{name}/{m}" for m in _zip_skipped(path)]
        else:
            check_count(len(items) + 1)
            add(name, path)
        check_bytes(total)
    if not items:
        raise ConfigError("no images found: give image files (PNG, JPEG, TIFF, BMP, WebP, GIF, DICOM), a folder "
                          "of them or a .zip" + (f" ({len(skipped)} other file(s) skipped)" if skipped else ""))
    return Collected(items, skipped)


def _zip_infos(path: Path) -> list[zipfile.ZipInfo]:
    from .errors import UnsafePath

    try:
        with zipfile.ZipFile(path) as zf:
            return zf.infolist()
    except (zipfile.BadZipFile, OSError, ValueError, EOFError) as exc:
        raise UnsafePath(f"{path.name}: not a readable zip file ({exc.__class__.__name__})") from None


def _zip_members(path: Path, name: str, budget: int) -> list[str]:
    """The image members of a zip (in its order), after checking what all members declare against ``budget``."""
    infos = _zip_infos(path)
    declared = sum(i.file_size for i in infos)
    if declared > budget:
        raise BatchTooLarge(f"{name} expands to {declared / 2**20:,.0f} MB; the batch may hold "
                            f"{max(budget, 0) / 2**20:,.0f} MB more. Split it into smaller zips.")
    return [i.filename.replace("\\", "/") for i in infos if not i.is_dir()
            and is_image_name(i.filename) and not _hidden(Path(i.filename.replace("\\", "/")))]


def _zip_skipped(path: Path) -> list[str]:
    return [i.filename for i in _zip_infos(path) if not i.is_dir() and not is_image_name(i.filename)
            and not _hidden(Path(i.filename.replace("\\", "/")))]


PredictChunk = Callable[[list[Path]], "list[Prediction | ImageError]"]


def run(items: Sequence[Item], predict_chunk: PredictChunk, *, chunk: int = CHUNK,
        on_progress: Callable[[int, int], None] | None = None,
        on_prediction: Callable[[Item, Prediction], None] | None = None) -> list[Row]:
    """Predict ``items`` ``chunk`` at a time; one Row per item, in order. ``predict_chunk`` gets the paths of a
    chunk and answers a Prediction or an ImageError per path (``Predictor.predict_batch``).
    ``on_prediction(item, prediction)`` sees each Prediction before it is dropped (overlays, thumbnails)."""
    rows: list[Row | None] = [Row(it.name, ERROR_LABEL, error=it.error) if it.error else None for it in items]
    todo = [i for i, it in enumerate(items) if it.path is not None]
    done = len(items) - len(todo)
    if on_progress is not None:
        on_progress(done, len(items))
    for start in range(0, len(todo), chunk):
        idx = todo[start:start + chunk]
        results = predict_chunk([items[i].path for i in idx])
        for i, res in zip(idx, results, strict=True):
            if isinstance(res, CovidClsError):
                rows[i] = Row(items[i].name, ERROR_LABEL, error=str(res))
                continue
            rows[i] = Row(items[i].name, UNCERTAIN_SHORT if res.abstain else res.label, decision=res.decision,
                          probs=dict(res.probs), reasons=list(res.reasons))
            if on_prediction is not None:
                on_prediction(items[i], res)
        del results
        done += len(idx)
        if on_progress is not None:
            on_progress(done, len(items))
    return [r for r in rows if r is not None]


def classes_of(rows: Sequence[Row]) -> list[str]:
    """The probability columns: the classes of the answered rows, in the card's order."""
    seen: list[str] = []
    for r in rows:
        for c in r.probs:
            if c not in seen:
                seen.append(c)
    return seen or ["infected", "normal"]


def headers(classes: Sequence[str]) -> list[str]:
    return ["file", "label", "decision", *(f"p_{c}" for c in classes), "reasons", "error"]


def table(rows: Sequence[Row]) -> tuple[list[str], list[list[Any]]]:
    """(headers, rows) for a table or a CSV: probabilities rounded to 4 digits, reasons joined with "; "."""
    classes = classes_of(rows)
    out = []
    for r in rows:
        probs = [round(r.probs[c], 4) if c in r.probs else "" for c in classes]
        out.append([r.file, r.label, r.decision, *probs, "; ".join(r.reasons), r.error])
    return headers(classes), out


def _cell(v: Any) -> Any:
    """A text cell a spreadsheet would take for a formula (=, +, -, @ first) is prefixed with ' (OWASP)."""
    return f"'{v}" if isinstance(v, str) and v[:1] in ("=", "+", "-", "@", "\t", "\r") else v


def to_csv(rows: Sequence[Row]) -> str:
    head, body = table(rows)
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(head)
    w.writerows([[_cell(v) for v in row] for row in body])
    return buf.getvalue()


def summary(rows: Sequence[Row], skipped: Sequence[str] = ()) -> str:
    errors = sum(r.label == ERROR_LABEL for r in rows)
    flagged = sum(r.label == UNCERTAIN_SHORT for r in rows)
    text = f"{len(rows)} image(s): {len(rows) - errors - flagged} answered, {flagged} uncertain, {errors} error(s)"
    if skipped:
        text += f"; {len(skipped)} file(s) skipped (not images by their name)"
    return text


def thumbnail(img: Image.Image, max_side: int = 320) -> Image.Image:
    small = img.copy()
    small.thumbnail((max_side, max_side))
    return small


def workdir(prefix: str = "covid_cls-batch-") -> tempfile.TemporaryDirectory:
    return tempfile.TemporaryDirectory(prefix=prefix)


def cli_predict(a: Any, disclaimer: str) -> int:
    """``python -m covid_cls predict DIR_OR_ZIP... [--csv out.csv] [--overlay-dir D]``: one line per image as for
    single files (a bad file on stderr, exit status 1), then the CSV. Limits: ``--max-files``, 50 MB per file
    (``imaging.MAX_BYTES``), ``COVID_CLS_BATCH_MAX_MB`` (512) in all; zips are extracted safely into a temporary
    folder that is removed at the end."""
    import sys

    from .imaging import MAX_BYTES
    from .predictor import Predictor

    pred = Predictor(a.checkpoints, device=a.device)
    pred.candidates(a.arch, a.level, a.checkpoint)          # no model: said before any file is read
    out = Path(a.overlay_dir) if a.overlay_dir else None
    if out:
        out.mkdir(parents=True, exist_ok=True)
    state = {"first": None}

    def show(item: Item, p: Prediction) -> None:
        state["first"] = state["first"] or p
        probs = "  ".join(f"{k} {v:.3f}" for k, v in p.probs.items())
        if p.card.threshold is not None:
            probs += f"; {p.card.positive} when P >= {p.card.threshold:.3f}"
        print(f"{item.name}: {p.label}  ({probs})")
        for why in p.reasons if p.abstain else ():
            print(f"    - {why}")
        if out:
            p.overlay.save(out / f"{Path(item.name).with_suffix('').as_posix().replace('/', '__')}_gradcam.png")

    with workdir() as tmp:
        got = collect([(s, s) for s in a.images], tmp, max_files=a.max_files, max_file_bytes=MAX_BYTES,
                      max_total_bytes=env_int("COVID_CLS_BATCH_MAX_MB", MAX_TOTAL_MB) * 2**20)
        rows = run(got.items, lambda paths: pred.predict_batch(paths, arch=a.arch, level=a.level,
                                                               checkpoint=a.checkpoint,
                                                               batch_size=max(1, len(paths))),
                   chunk=max(1, a.batch_size), on_prediction=show)
    for r in rows:
        if r.label == ERROR_LABEL:
            print(f"{r.file}: {r.error}", file=sys.stderr)
    first = state["first"]
    if first is not None:
        origin = " (trained from scratch)" if first.card.from_scratch else ""
        print(f"model: {Path(first.checkpoint).name}{origin}, {first.device}")
    print(summary(rows, got.skipped))
    if a.csv:
        Path(a.csv).write_text(to_csv(rows), encoding="utf-8")
        print(f"wrote {a.csv}")
    print(disclaimer)
    return 1 if any(r.label == ERROR_LABEL for r in rows) else 0
