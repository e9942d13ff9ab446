"""Guards for what the web app reads from disk: allowed dataset roots and safe zip extraction."""

from __future__ import annotations

import os
import stat
import zipfile
from pathlib import Path, PurePosixPath

MAX_ZIP_BYTES = 2 * 1024**3       # uncompressed total
MAX_ZIP_FILES = 50_000
MAX_ZIP_RATIO = 200               # uncompressed / compressed, per member (zip bombs reach 1000s)


class UnsafePath(ValueError):
    """A path or archive that the server refuses to use; the message says why."""


def allowed_roots(env: str | None = None, default: Path | None = None) -> list[Path]:
    raw = os.environ.get("COVID_CLS_DATA_ROOTS", "") if env is None else env
    roots = [Path(p).expanduser() for p in raw.split(os.pathsep) if p.strip()]
    if not roots and default is not None:
        roots = [default]
    return [r.resolve() for r in roots]


def check_allowed(path: str | os.PathLike, roots: list[Path]) -> Path:
    """Resolve ``path`` (symlinks and ``..`` included) and require it to lie inside one of ``roots``."""
    if not str(path).strip():
        raise UnsafePath("no folder given")
    try:
        real = Path(path).expanduser().resolve(strict=True)
    except (OSError, RuntimeError):
        raise UnsafePath(f"folder {path} does not exist") from None
    for root in roots:
        if real == root or real.is_relative_to(root):
            return real
    shown = ", ".join(str(r) for r in roots) or "(none)"
    raise UnsafePath(f"folder {path} is outside the folders this server may read ({shown}); "
                     "set COVID_CLS_DATA_ROOTS to allow more")


def safe_extract_zip(zip_path: str | os.PathLike, dest: str | os.PathLike) -> Path:
    """Extract an ImageFolder zip after checking every entry first (nothing is written if any check fails).

    Refused: absolute paths, ``..`` components, symlinks and other special files, more than
    MAX_ZIP_FILES entries, more than MAX_ZIP_BYTES uncompressed, members compressed over MAX_ZIP_RATIO:1.
    A single top-level folder wrapping train/validation/test is unwrapped.
    """
    dest = Path(dest)
    try:
        zf = zipfile.ZipFile(zip_path)
    except (zipfile.BadZipFile, OSError) as exc:
        raise UnsafePath(f"not a readable zip file ({exc.__class__.__name__})") from None
    with zf:
        infos = zf.infolist()
        if len(infos) > MAX_ZIP_FILES:
            raise UnsafePath(f"zip has {len(infos):,} entries; the limit is {MAX_ZIP_FILES:,}")
        total = 0
        for info in infos:
            name = info.filename
            parts = PurePosixPath(name.replace("\\", "/")).parts
            if name.startswith(("/", "\\")) or (parts and (":" in parts[0])) or ".." in parts:
                raise UnsafePath(f"zip entry {name!r} points outside the archive; refused")
            mode = info.external_attr >> 16
            if mode and (stat.S_ISLNK(mode) or not (stat.S_ISREG(mode) or stat.S_ISDIR(mode))):
                raise UnsafePath(f"zip entry {name!r} is a link or special file; refused")
            total += info.file_size
            if info.compress_size and info.file_size / info.compress_size > MAX_ZIP_RATIO and info.file_size > 1 << 20:
                raise UnsafePath(f"zip entry {name!r} expands {info.file_size / info.compress_size:.0f}x "
                                 "(a zip bomb?); refused")
        if total > MAX_ZIP_BYTES:
            raise UnsafePath(f"zip expands to {total / 1024**3:.1f} GB; the limit is {MAX_ZIP_BYTES / 1024**3:.0f} GB")
        dest.mkdir(parents=True, exist_ok=True)
        for info in infos:
            target = dest.joinpath(*PurePosixPath(info.filename.replace("\\", "/")).parts)
            if info.is_dir():
                target.mkdir(parents=True, exist_ok=True)
                continue
            target.parent.mkdir(parents=True, exist_ok=True)
            with zf.open(info) as src, open(target, "wb") as out:
                written = 0
                while chunk := src.read(1 << 20):
                    written += len(chunk)
                    if written > info.file_size:   # the header lied about the size
                        raise UnsafePath(f"zip entry {info.filename!r} is larger than declared; refused")
                    out.write(chunk)
    entries = [p for p in dest.iterdir() if not p.name.startswith((".", "__MACOSX"))]
    if len(entries) == 1 and entries[0].is_dir() and not (dest / "train").exists():
        return entries[0]
    return dest
