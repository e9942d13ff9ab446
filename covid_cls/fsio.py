"""Writing files so that nothing is ever half-written.

``atomic_write`` writes to a temporary name in the same folder, fsyncs, then renames over the target: a
reader sees the old file or the new one, never a torn one, and a process killed mid-write leaves only a
temporary file whose name carries the writer's pid (``jobs`` removes those of a dead worker). A full disk
becomes an ``OSError`` that says so.
"""

from __future__ import annotations

import errno
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

_UMASK = os.umask(0o022)  # read once at import (os.umask can only be read by setting it)
os.umask(_UMASK)


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


def disk_full_message(exc: OSError, what: str, where: str | os.PathLike) -> str:
    """The one sentence every disk-full path says (ENOSPC/EDQUOT), else the OS's own words."""
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return (f"could not save {what} in {where}: the disk is full ({os.strerror(exc.errno)}). Free some disk "
                "space (or choose another folder)")
    return f"could not save {what} in {where}: {exc.strerror or exc}"


# --- Hugging Face Spaces: persistent storage (issue 12 #2) -----------------------------------------------
# A Space's own disk is wiped on every restart; attached persistent storage (or a storage bucket mounted as a
# volume) appears at /data and survives. When that folder exists and is writable, the app keeps its
# checkpoints, run history and decoded-image cache there; COVID_CLS_CHECKPOINTS / COVID_CLS_RUNS /
# COVID_CLS_CACHE still win. COVID_CLS_PERSISTENT_DIR names another mount point ("" = never use one).

def persistent_dir() -> Path | None:
    """The persistent-storage folder (``/data`` on Spaces) when it exists and is writable, else None."""
    root = os.environ.get("COVID_CLS_PERSISTENT_DIR", "/data")
    if not root:
        return None
    path = Path(root)
    return path if path.is_dir() and os.access(path, os.W_OK | os.X_OK) else None


def default_cache_dir() -> Path:
    """The decoded-image cache: COVID_CLS_CACHE, else <persistent dir>/cache, else ~/.cache/covid_cls."""
    env = os.environ.get("COVID_CLS_CACHE")
    if env:
        return Path(env)
    base = persistent_dir()
    return base / "cache" if base else Path.home() / ".cache" / "covid_cls"


__all__ = ["atomic_write", "disk_full_message", "persistent_dir", "default_cache_dir"]
