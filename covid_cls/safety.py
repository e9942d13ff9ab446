"""Guards for what the web app reads from disk: allowed dataset roots, safe zip extraction, uploads."""

from __future__ import annotations

import os
import shutil
import stat
import tempfile
import threading
import time
import zipfile
from collections import OrderedDict
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path, PurePosixPath

from .errors import UnsafePath
from .errors import UploadTooLarge as _UploadTooLarge

MAX_ZIP_BYTES = 2 * 1024**3       # uncompressed total
MAX_ZIP_FILES = 50_000
MAX_ZIP_RATIO = 200               # uncompressed / compressed, per member (zip bombs reach 1000s)


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
    except (OSError, RuntimeError, ValueError):   # missing, a symlink loop, a NUL byte in the name ...
        raise UnsafePath(f"folder {path!s:.200} does not exist") from None
    for root in roots:
        if real == root or real.is_relative_to(root):
            return real
    shown = ", ".join(str(r) for r in roots) or "(none)"
    raise UnsafePath(f"folder {path} is outside the folders this server may read ({shown}); "
                     "set COVID_CLS_DATA_ROOTS to allow more")


def is_inside(real: Path, roots: Iterable[Path]) -> bool:
    """Whether the already resolved ``real`` is one of ``roots`` or lies below one."""
    return any(real == root or real.is_relative_to(root) for root in roots)


def outside_reason(path: str | os.PathLike, roots: Sequence[Path]) -> str | None:
    """Why ``path`` may not be read under ``roots`` (resolved now, symlinks included), or None when it may."""
    try:
        real = Path(path).resolve(strict=True)
    except (OSError, RuntimeError, ValueError):
        return "cannot be resolved (missing, or a symlink loop)"
    if not is_inside(real, roots):
        return "leads outside the folders this server may read (a symlink?); not read"
    return None


def _fd_path(fd: int, fallback: str | os.PathLike) -> Path:
    """The path of the file actually open on ``fd`` (Linux: /proc/self/fd), else ``fallback`` resolved."""
    try:
        return Path(os.readlink(f"/proc/self/fd/{fd}"))
    except OSError:
        return Path(fallback).resolve()


def read_inside(path: str | os.PathLike, roots: Sequence[Path], limit: int) -> tuple[bytes, tuple[int, int]]:
    """Open ``path`` and read it only if the file actually opened lies inside ``roots``.

    The check is made on the open descriptor (what ``/proc/self/fd`` says it is), so a symlink inside a root
    that leads out, or a folder swapped for such a symlink after a scan, is refused however late the swap
    happens (issue 11 #4). Only regular files are read (a FIFO could block forever), at most ``limit`` + 1
    bytes. Returns the bytes and the file's (st_dev, st_ino). Raises UnsafePath.
    """
    name = Path(path).name
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0))
    except (OSError, ValueError) as exc:
        raise UnsafePath(f"{name} cannot be opened ({getattr(exc, 'strerror', None) or exc.__class__.__name__})"
                         ) from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise UnsafePath(f"{name} is not a regular file; not read")
        if not is_inside(_fd_path(fd, path), roots):
            raise UnsafePath(f"{name} leads outside the folders this server may read (a symlink?); not read")
        chunks, left = [], min(st.st_size, limit) + 1
        while left > 0:
            chunk = os.read(fd, min(left, 1 << 20))
            if not chunk:
                break
            chunks.append(chunk)
            left -= len(chunk)
        return b"".join(chunks), (st.st_dev, st.st_ino)
    except OSError as exc:
        raise UnsafePath(f"{name} cannot be read ({exc.strerror or exc.__class__.__name__})") from None
    finally:
        os.close(fd)


# ---------------------------------------------------------------------------------------------------
# cleanup policy: extracted uploads and decoded caches are bounded in size and age
# ---------------------------------------------------------------------------------------------------


def env_limit(name: str, default: float, unit: float = 1.0) -> float:
    """``float(os.environ[name]) * unit`` (``default`` when unset or not a number); 0 or less = no limit."""
    try:
        value = float(os.environ.get(name, default))
    except ValueError:
        value = float(default)
    return value * unit if value > 0 else float("inf")


def _tree_size(path: Path) -> int:
    if not path.is_dir() or path.is_symlink():
        return path.lstat().st_size
    total = 0
    for folder, _, files in os.walk(path):
        for f in files:
            try:
                total += os.lstat(os.path.join(folder, f)).st_size
            except OSError:
                pass
    return total


def prune(entries: Iterable[tuple[Sequence[Path], float, int]], *, max_bytes: float, max_age_s: float,
          keep: Callable[[Sequence[Path]], bool] = lambda paths: False, now: float | None = None) -> list[Path]:
    """Delete whole entries — (its paths, last use time, bytes) — unused for more than ``max_age_s``, then the
    least recently used until the rest fits in ``max_bytes``. Entries for which ``keep`` is true stay (and
    count). Returns the paths removed."""
    now = time.time() if now is None else now
    items = sorted(entries, key=lambda e: e[1])   # least recently used first
    total = sum(e[2] for e in items)
    removed: list[Path] = []
    for paths, used, size in items:
        if keep(paths) or (now - used <= max_age_s and total <= max_bytes):
            continue
        for p in paths:
            try:
                if p.is_dir() and not p.is_symlink():
                    shutil.rmtree(p)
                else:
                    p.unlink(missing_ok=True)
                removed.append(p)
            except OSError:
                pass
        total -= size
    return removed


#: Extracted dataset uploads (``runs/datasets/<digest>``): total size and age after which they are deleted.
UPLOADS_MAX_MB_ENV, UPLOADS_MAX_AGE_ENV = "COVID_CLS_UPLOADS_MAX_MB", "COVID_CLS_UPLOADS_MAX_AGE_HOURS"
UPLOADS_MAX_MB, UPLOADS_MAX_AGE_HOURS = 2048, 24


def prune_uploads(folder: str | os.PathLike, keep: Iterable[str | os.PathLike] = ()) -> list[Path]:
    """Apply the upload policy to ``folder``: extracted uploads unused for ``COVID_CLS_UPLOADS_MAX_AGE_HOURS``
    (default 24) are deleted, then the least recently used until all fit in ``COVID_CLS_UPLOADS_MAX_MB``
    (default 2048); staging folders of an extraction that never finished go after an hour. ``keep``: folders
    in use (the one just extracted, the active run's data), never deleted."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    kept = [Path(k).resolve() for k in keep]
    max_bytes = env_limit(UPLOADS_MAX_MB_ENV, UPLOADS_MAX_MB, 2**20)
    max_age = env_limit(UPLOADS_MAX_AGE_ENV, UPLOADS_MAX_AGE_HOURS, 3600)
    entries, stale = [], []
    for p in folder.iterdir():
        try:
            used = p.lstat().st_mtime
            if p.name.startswith(".") and p.name.endswith(".partial"):
                stale.append(([p], used, 0))
            else:
                entries.append(([p], used, _tree_size(p)))
        except OSError:
            continue

    def in_use(paths: Sequence[Path]) -> bool:
        real = paths[0].resolve()
        return any(k == real or k.is_relative_to(real) for k in kept)

    removed = prune(stale, max_bytes=float("inf"), max_age_s=3600, keep=in_use)
    return removed + prune(entries, max_bytes=max_bytes, max_age_s=max_age, keep=in_use)


_ZIP_METHODS = {zipfile.ZIP_STORED: "stored", zipfile.ZIP_DEFLATED: "deflate", zipfile.ZIP_BZIP2: "bzip2",
                zipfile.ZIP_LZMA: "lzma"}


def _check_entries(infos: list[zipfile.ZipInfo]) -> None:
    """Every check that can be made from the archive's directory, before a single byte is extracted."""
    if len(infos) > MAX_ZIP_FILES:
        raise UnsafePath(f"zip has {len(infos):,} entries; the limit is {MAX_ZIP_FILES:,}")
    total = packed = 0
    for info in infos:
        name = info.filename
        parts = PurePosixPath(name.replace("\\", "/")).parts
        if not parts or "\x00" in name:
            raise UnsafePath(f"zip entry {name!r} has no usable name; refused")
        if name.startswith(("/", "\\")) or ":" in parts[0] or ".." in parts:
            raise UnsafePath(f"zip entry {name!r} points outside the archive; refused")
        # Unix file type in the high bits of external_attr; 0 (no type recorded: Windows tools, Python's
        # writestr) means a plain file or folder.
        ftype = stat.S_IFMT(info.external_attr >> 16)
        if ftype and ftype not in (stat.S_IFREG, stat.S_IFDIR):
            raise UnsafePath(f"zip entry {name!r} is a link or special file; refused")
        if info.flag_bits & 0x1:
            raise UnsafePath(f"zip entry {name!r} is password-protected; upload an unencrypted zip")
        if info.compress_type not in _ZIP_METHODS:
            raise UnsafePath(f"zip entry {name!r} uses an unsupported compression method "
                             f"({info.compress_type}); use ordinary deflate compression")
        total += info.file_size
        packed += info.compress_size
        if info.compress_size and info.file_size / info.compress_size > MAX_ZIP_RATIO and info.file_size > 1 << 20:
            raise UnsafePath(f"zip entry {name!r} expands {info.file_size / info.compress_size:.0f}x "
                             "(a zip bomb?); refused")
    if total > MAX_ZIP_BYTES:
        raise UnsafePath(f"zip expands to {total / 1024**3:.1f} GB; the limit is {MAX_ZIP_BYTES / 1024**3:.0f} GB")
    # Many small members can add up to a bomb that no single member reveals.
    if packed and total / packed > MAX_ZIP_RATIO and total > 16 << 20:
        raise UnsafePath(f"zip expands {total / packed:.0f}x overall (a zip bomb?); refused")


def safe_extract_zip(zip_path: str | os.PathLike, dest: str | os.PathLike,
                     check_names: Callable[[list[str]], None] | None = None) -> Path:
    """Extract an ImageFolder zip after checking every entry first (nothing is written if any check fails).

    Refused: absolute paths, ``..`` components, symlinks and other special files, encrypted members,
    more than MAX_ZIP_FILES entries, more than MAX_ZIP_BYTES uncompressed, members (or the whole archive)
    compressed over MAX_ZIP_RATIO:1. Members are extracted into a hidden staging folder beside ``dest`` and
    moved into ``dest`` only when all of them were read completely and intact (a header that lies about
    a size, a CRC error or a full disk found half-way leaves ``dest`` as it was). A single top-level
    folder wrapping train/validation/test is unwrapped. ``check_names`` (e.g. the dataset layout check) sees
    the member names before anything is written; whatever it raises leaves nothing behind either.
    """
    dest = Path(dest)
    try:
        zf = zipfile.ZipFile(zip_path)
    except (zipfile.BadZipFile, OSError, ValueError, EOFError) as exc:
        raise UnsafePath(f"not a readable zip file ({exc.__class__.__name__})") from None
    with zf:
        infos = zf.infolist()
        _check_entries(infos)
        if check_names is not None:
            check_names([i.filename.replace("\\", "/") for i in infos])
        try:
            dest.parent.mkdir(parents=True, exist_ok=True)
            staging = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", suffix=".partial", dir=dest.parent))
        except OSError as exc:
            raise UnsafePath(_extract_failed(exc)) from None
        try:
            for info in infos:
                _extract_member(zf, info, staging)
            _move_into(staging, dest)
        except UnsafePath:
            raise
        except OSError as exc:
            raise UnsafePath(_extract_failed(exc)) from None
        except Exception as exc:  # noqa: BLE001 - BadZipFile (CRC), zlib/lzma errors, ...
            raise UnsafePath(f"the zip is damaged and cannot be extracted ({exc.__class__.__name__}); "
                             "create it again") from None
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    entries = [p for p in dest.iterdir() if not p.name.startswith((".", "__MACOSX"))]
    if len(entries) == 1 and entries[0].is_dir() and not (dest / "train").exists():
        return entries[0]
    return dest


def _extract_failed(exc: OSError) -> str:
    from .fsio import disk_full_message

    # no server path in the message: it goes to whoever uploaded the zip
    return disk_full_message(exc, "the extracted zip", "the server's upload folder")


def _extract_member(zf: zipfile.ZipFile, info: zipfile.ZipInfo, root: Path) -> None:
    target = root.joinpath(*PurePosixPath(info.filename.replace("\\", "/")).parts)
    if info.is_dir():
        target.mkdir(parents=True, exist_ok=True)
        return
    target.parent.mkdir(parents=True, exist_ok=True)
    with zf.open(info) as src, open(target, "wb") as out:
        written = 0
        while chunk := src.read(1 << 20):
            written += len(chunk)
            if written > info.file_size:   # the header lied about the size
                raise UnsafePath(f"zip entry {info.filename!r} is larger than declared; refused")
            out.write(chunk)


def _move_into(staging: Path, dest: Path) -> None:
    """Move every top-level entry of ``staging`` into ``dest`` (replacing what has the same name)."""
    dest.mkdir(parents=True, exist_ok=True)
    for entry in staging.iterdir():
        target = dest / entry.name
        if target.is_dir() and not target.is_symlink():
            shutil.rmtree(target)
        elif target.exists() or target.is_symlink():
            target.unlink()
        os.replace(entry, target)


# ---------------------------------------------------------------------------------------------------
# uploads: read once, then deleted
# ---------------------------------------------------------------------------------------------------


class UploadTooLarge(_UploadTooLarge):
    """An upload over the size limit; keeps the numbers for the message."""

    def __init__(self, size: int, limit: int):
        super().__init__(f"the upload is {size} bytes; the limit is {limit}")
        self.size, self.limit = size, limit


class _RecentUploads:
    """Bytes of uploads read in the last ``ttl_s`` seconds, by path (bounded in total size).

    Uploads are deleted from disk as soon as they are read. Gradio names an upload after the hash of its
    content, so two people sending the same file at the same moment (a sample image from the README, say)
    get the same path, and whoever reads second would find it already deleted. They get the bytes from
    here instead — the same content, by construction of the name.
    """

    def __init__(self, ttl_s: float = 120.0, max_bytes: int = 256 * 2**20):
        self.ttl_s, self.max_bytes = ttl_s, max_bytes
        self._items: OrderedDict[str, tuple[float, bytes]] = OrderedDict()
        self._lock = threading.Lock()

    def put(self, key: str, data: bytes) -> None:
        with self._lock:
            self._items.pop(key, None)
            self._items[key] = (time.monotonic(), data)
            self._trim()

    def __contains__(self, key: str) -> bool:
        return self.get(key) is not None

    def get(self, key: str) -> bytes | None:
        with self._lock:
            self._trim()
            item = self._items.get(key)
            return None if item is None else item[1]

    def _trim(self) -> None:
        now, total = time.monotonic(), sum(len(d) for _, d in self._items.values())
        while self._items:
            stamp, data = next(iter(self._items.values()))
            if now - stamp <= self.ttl_s and total <= self.max_bytes:
                break
            self._items.popitem(last=False)
            total -= len(data)


_recent_uploads = _RecentUploads()


def recently_taken(path: str | os.PathLike) -> bool:
    """Whether ``path`` was read (and deleted) as an upload in the last minutes (see _RecentUploads)."""
    return str(Path(path)) in _recent_uploads


def take_upload(path: str | os.PathLike, limit: int, delete: bool = True) -> bytes:
    """Read an uploaded file into memory and delete it (whatever happens) when ``delete``; the caller says
    whether the file is an upload of this request (never delete a file someone else's session owns). Raises
    UploadTooLarge (not read) or FileNotFoundError (gone, and not read by anyone in the last minutes)."""
    p = Path(path)
    key = str(p)
    try:
        size = p.stat().st_size
        if size > limit:
            raise UploadTooLarge(size, limit)
        data = p.read_bytes()
        if delete:
            _recent_uploads.put(key, data)
        return data
    except FileNotFoundError:
        data = _recent_uploads.get(key)   # only uploads are ever put there
        if data is None:
            raise
        return data
    except UploadTooLarge:
        raise
    except (OSError, ValueError):   # a NUL byte, a name too long, a folder, no permission ...
        raise FileNotFoundError(key[:200]) from None
    finally:
        if delete:
            try:
                p.unlink()
            except (OSError, ValueError):
                pass
