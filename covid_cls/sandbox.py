"""Decode untrusted images in worker processes that a hostile file cannot hurt the server from.

The way image proxies (imgproxy, thumbor) do it: a small pool of worker processes, each decoding
one image at a time under

* an address-space limit (``RLIMIT_AS``, set in the worker around every task: its size before the
  task plus ``memory_mb``), so an allocation beyond it fails inside the worker;
* a CPU-time limit, enforced by the parent, which reads the worker's CPU time from ``/proc`` while
  it waits (``RLIMIT_CPU`` in the worker is the backstop where ``/proc`` is missing);
* a wall-clock timeout enforced by the parent (a decoder stuck in a sleep or a lock).

A worker that overruns is killed (SIGKILL) and replaced by a fresh one on the next request; the
caller gets :class:`ImageError` saying which limit was hit. Every other outcome is the worker's own
``load_image`` result: the decoded 8-bit image comes back as a fixed little header plus the raw
pixel buffer, an :class:`ImageError` as its message text — nothing from the worker is unpickled.

Workers are plain ``python -c`` subprocesses that import only ``covid_cls.imaging`` and its
decoders (numpy, Pillow, pydicom) — not through ``multiprocessing``, whose "spawn" start method
re-imports the parent's ``__main__`` (the Gradio app) in every child. They talk over their stdin and
stdout pipes (their own fds 0/1 are moved aside and pointed at /dev/null, so a decoder printing
to stdout cannot corrupt the stream), run in their own session (a Ctrl-C at the terminal is for
the server), exit when the pipe closes (the server died), and a worker whose resident size grew
by more than 64 MB, that served 500 images, or that sat idle for 5 minutes is retired.

The pool is lazy (no process before the first image), bounded (``COVID_CLS_DECODE_WORKERS``,
default 2: a third concurrent caller waits for a free worker), thread-safe and closed at exit.
Where subprocesses and ``select`` on pipes are not available (or ``COVID_CLS_DECODE_IN_PROCESS=1``)
images are decoded in-process with a logged warning.
"""

from __future__ import annotations

import atexit
import logging
import math
import os
import signal
import struct
import subprocess
import sys
import threading
import time
import weakref
from dataclasses import dataclass
from typing import Any

from .errors import ImageError

__all__ = [
    "DEFAULT_CPU_S",
    "DEFAULT_MEMORY_MB",
    "DEFAULT_TIMEOUT_S",
    "DecodePool",
    "TaskStats",
    "default_pool",
    "shared_pool",
]

log = logging.getLogger(__name__)

#: Wall-clock seconds one image may take in the worker (a loaded server is slower than the CPU
#: budget suggests; this is for decoders that block or sleep).
DEFAULT_TIMEOUT_S: float = 10.0
#: CPU seconds one image may take in the worker (the largest legitimate images take < 1 s here).
DEFAULT_CPU_S: float = 2.0
#: Memory one image may take in the worker above its size before the task, input included.
DEFAULT_MEMORY_MB: int = 512
DEFAULT_WORKERS: int = 2
#: Seconds a worker may sit idle before it is stopped (the next image starts a fresh one, ~0.5 s).
IDLE_TTL_S: float = 300.0
#: A worker is replaced after this many images ...
MAX_TASKS_PER_WORKER: int = 500
#: ... or once its resident size grew this much (heap fragmentation after big images).
RETIRE_GROWTH_MB: int = 64
_START_TIMEOUT_S = 60.0

# ---- wire format (little endian, fixed size headers; payloads follow) -------------------------
_HELLO = struct.Struct("<4sIqq")              # magic, pid, idle rss KiB, idle vsz KiB
_REQUEST = struct.Struct("<4sBxxxdqII")       # magic, kind, cpu_s, memory bytes, suffix len, payload len
_RESPONSE = struct.Struct("<4sBxxxIIdddqqqI")  # magic, status, w, h, colourfulness, cpu_s, wall_s,
#                                               idle rss KiB, peak rss KiB, rss after KiB, payload len
_HELLO_MAGIC, _REQUEST_MAGIC, _RESPONSE_MAGIC = b"CCw1", b"CCq1", b"CCr1"

_DECODE, _SLEEP, _BURN, _ALLOCATE, _CRASH = 1, 2, 3, 4, 5          # request kinds (2-5: tests only)
_OK, _REFUSED, _NO_MEMORY, _INTERNAL = 0, 1, 2, 3                  # response status


@dataclass(frozen=True)
class TaskStats:
    """What one image cost in its worker."""

    outcome: str       # "decoded", "refused", "timeout", "cpu", "memory", "crashed"
    cpu_s: float       # user + system CPU seconds of the worker for this image
    wall_s: float      # seconds from sending the request to the answer (or the kill)
    peak_mb: float     # peak resident size above the worker's size before the task (input included)
    idle_mb: float     # the worker's resident size before the task


class _Overrun(Exception):
    def __init__(self, outcome: str):
        super().__init__(outcome)
        self.outcome = outcome


class _Died(Exception):
    pass


# ---------------------------------------------------------------------------------------------
# /proc helpers (Linux); every caller copes with None
# ---------------------------------------------------------------------------------------------

_CLOCK_TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def _proc_cpu_s(pid: int) -> float | None:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
        fields = stat[stat.rindex(b")") + 2:].split()
        return (int(fields[11]) + int(fields[12])) / _CLOCK_TICKS
    except (OSError, ValueError, IndexError):
        return None


def _proc_status_kib(pid: int | str = "self") -> dict[str, int]:
    out: dict[str, int] = {}
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(("VmRSS:", "VmHWM:", "VmSize:")):
                    key, value = line.split(":", 1)
                    out[key] = int(value.split()[0])
    except (OSError, ValueError):
        pass
    return out


# ---------------------------------------------------------------------------------------------
# The worker process
# ---------------------------------------------------------------------------------------------


def _read_exact_fd(fd: int, n: int) -> bytearray | None:
    buf = bytearray(n)
    view = memoryview(buf)
    got = 0
    while got < n:
        k = os.readv(fd, [view[got:]])
        if k == 0:
            return None
        got += k
    return buf


def _write_all(fd: int, *parts: Any) -> None:
    for part in parts:
        view = memoryview(part).cast("B")
        while view:
            k = os.write(fd, view)
            view = view[k:]


def _worker_main() -> None:  # pragma: no cover - runs in the worker process (tested through the pool)
    """Entry point of a worker: serve requests from fd 0 until it closes.

    Longer than our ~80-line guide on purpose: it is one request loop (read header, set limits, decode, reply,
    report usage) whose steps share the file descriptors and the limit bookkeeping; split up, each piece would
    need them all passed in, and the protocol would be harder to read in one place.
    """
    rfd, wfd = os.dup(0), os.dup(1)
    devnull = os.open(os.devnull, os.O_RDWR)
    os.dup2(devnull, 0)
    os.dup2(devnull, 1)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        import resource
    except ImportError:
        resource = None  # type: ignore[assignment]

    import warnings

    warnings.simplefilter("ignore")
    from PIL import Image

    from covid_cls import imaging

    Image.init()
    try:  # DICOM support is optional; import it now rather than inside the first DICOM's budget
        import pydicom  # noqa: F401
        import pydicom.encaps  # noqa: F401
        import pydicom.pixels  # noqa: F401
    except ImportError:
        pass
    _warm_up(imaging)

    def memory() -> dict[str, int]:
        status = _proc_status_kib()
        if "VmRSS" not in status and resource is not None:
            scale = 1 if sys.platform.startswith("linux") else 1024
            rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // scale
            status = {"VmRSS": rss, "VmHWM": rss, "VmSize": 0}
        return status

    def cpu_now() -> float:
        if resource is None:
            return time.process_time()
        ru = resource.getrusage(resource.RUSAGE_SELF)
        return ru.ru_utime + ru.ru_stime

    idle = memory()
    _write_all(wfd, _HELLO.pack(_HELLO_MAGIC, os.getpid(), idle.get("VmRSS", 0), idle.get("VmSize", 0)))
    while True:
        header = _read_exact_fd(rfd, _REQUEST.size)
        if header is None:
            os._exit(0)
        magic, kind, cpu_s, memory_bytes, suffix_len, payload_len = _REQUEST.unpack(header)
        if magic != _REQUEST_MAGIC:
            os._exit(2)
        try:  # reset the peak (VmHWM) to the current size, so the task's own peak can be read
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
        except OSError:
            pass
        before = memory()
        cpu0, t0 = cpu_now(), time.perf_counter()
        suffix = bytes(_read_exact_fd(rfd, suffix_len) or b"").decode("utf-8", "replace")
        payload = _read_exact_fd(rfd, payload_len) if payload_len else bytearray()
        if payload is None:
            os._exit(0)
        limits = _set_limits(resource, before.get("VmSize", 0) * 1024, memory_bytes, cpu0, cpu_s)
        status, width, height, colour, out = _OK, 0, 0, 0.0, b""
        try:
            if kind == _DECODE:
                im = imaging._decode_untrusted(payload, suffix)
                del payload
                width, height = im.size
                colour = float(im.info.get("colourfulness", math.nan))  # NaN: not set (DICOM)
                out = im.tobytes()
                del im
            else:
                _test_task(kind, bytes(payload))
        except imaging.ImageError as exc:
            status = _NO_MEMORY if isinstance(exc.__context__, MemoryError) else _REFUSED
            out = str(exc).encode("utf-8", "replace")
        except MemoryError:
            status, out = _NO_MEMORY, b""
        except BaseException as exc:  # noqa: BLE001 — reported by type only
            status, out = _INTERNAL, type(exc).__name__.encode()
        finally:
            payload = None
            _restore_limits(resource, limits)
        after = memory()
        response = _RESPONSE.pack(
            _RESPONSE_MAGIC, status, width, height, colour, cpu_now() - cpu0, time.perf_counter() - t0,
            before.get("VmRSS", 0), after.get("VmHWM", 0), after.get("VmRSS", 0), len(out))
        _write_all(wfd, response, out)
        out = b""


def _warm_up(imaging: Any) -> None:  # pragma: no cover - runs in the worker
    """Decode one tiny PNG so lazy initialisation is not charged to the first upload."""
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (16, 16), (1, 2, 3)).save(buf, "PNG")
    try:
        imaging._decode_untrusted(buf.getvalue(), ".png")
    except Exception:  # noqa: BLE001
        pass


def _set_limits(resource: Any, vsz_bytes: int, memory_bytes: int, cpu0: float, cpu_s: float) -> Any:
    if resource is None:
        return None
    saved: list = []

    def lower(which: int, want: int) -> None:   # the soft limit, never above the hard one; saved for restoring
        soft, hard = resource.getrlimit(which)
        try:
            resource.setrlimit(which, (want if hard == resource.RLIM_INFINITY else min(want, hard), hard))
            saved.append((which, soft, hard))
        except (ValueError, OSError):
            pass

    if memory_bytes > 0 and vsz_bytes > 0 and hasattr(resource, "RLIMIT_AS"):
        lower(resource.RLIMIT_AS, vsz_bytes + memory_bytes)
    if cpu_s > 0 and hasattr(resource, "RLIMIT_CPU"):
        # Whole seconds, counted over the process's life: a backstop for the parent's own check.
        lower(resource.RLIMIT_CPU, int(math.ceil(cpu0 + cpu_s)) + 1)
    return saved


def _restore_limits(resource: Any, saved: Any) -> None:
    for which, soft, hard in saved or ():
        try:
            resource.setrlimit(which, (soft, hard))
        except (ValueError, OSError):
            pass


def _test_task(kind: int, payload: bytes) -> None:  # pragma: no cover - runs in the worker
    """Hooks for the tests of the pool itself: a hang, a CPU burner, a memory hog, a crash."""
    amount = float(payload.decode() or 0)
    if kind == _SLEEP:
        time.sleep(amount)
    elif kind == _BURN:
        end = time.process_time() + amount
        x = 0
        while time.process_time() < end:
            x += 1
    elif kind == _ALLOCATE:
        block = bytearray(int(amount * 1024 * 1024))
        block[::4096] = b"\x01" * len(block[::4096])  # touch every page
    elif kind == _CRASH:
        os.kill(os.getpid(), signal.SIGSEGV)
    else:
        raise ValueError(kind)


# ---------------------------------------------------------------------------------------------
# The parent side
# ---------------------------------------------------------------------------------------------


def _processes_supported() -> bool:
    if os.environ.get("COVID_CLS_DECODE_IN_PROCESS", "").strip() not in ("", "0"):
        return False
    try:
        import select  # noqa: F401
    except ImportError:
        return False
    return os.name == "posix" and hasattr(os, "readv") and bool(sys.executable)


def _env_workers() -> int:
    raw = os.environ.get("COVID_CLS_DECODE_WORKERS", "").strip()
    if not raw:
        return DEFAULT_WORKERS
    try:
        value = int(raw)
        if value < 1:
            raise ValueError
        return value
    except ValueError:
        log.warning("COVID_CLS_DECODE_WORKERS=%r is not a positive integer; using %d", raw[:20], DEFAULT_WORKERS)
        return DEFAULT_WORKERS


class _Worker:
    def __init__(self, proc: subprocess.Popen, idle_rss_kib: int):
        self.proc = proc
        self.pid = proc.pid
        self.rfd = proc.stdout.fileno()  # type: ignore[union-attr]
        self.wfd = proc.stdin.fileno()  # type: ignore[union-attr]
        self.idle_rss_kib = idle_rss_kib
        self.tasks = 0
        self.last_used = time.monotonic()

    def kill(self) -> None:
        try:
            self.proc.kill()
        except OSError:
            pass
        self._reap()

    def stop(self) -> None:
        """Close its pipe (it exits on EOF); kill it if it does not go within a second."""
        try:
            self.proc.stdin.close()  # type: ignore[union-attr]
        except OSError:
            pass
        try:
            self.proc.wait(timeout=1.0)
        except subprocess.TimeoutExpired:
            self.kill()
        self._reap()

    def _reap(self) -> None:
        try:
            self.proc.wait(timeout=5.0)
        except subprocess.TimeoutExpired:
            pass
        for stream in (self.proc.stdin, self.proc.stdout):
            try:
                if stream is not None:
                    stream.close()
            except OSError:
                pass


def _spawn_worker() -> _Worker:
    package_parent = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    code = (f"import sys; sys.path.insert(0, {package_parent!r}); "
            "from covid_cls.sandbox import _worker_main; _worker_main()")
    env = dict(os.environ)
    # One thread each (the pool is the parallelism), and no thread pools reserving address space.
    env.update(OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1", MKL_NUM_THREADS="1", MALLOC_ARENA_MAX="2",
               PYTHONWARNINGS="ignore")
    proc = subprocess.Popen(
        [sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL, bufsize=0, close_fds=True, start_new_session=True, env=env)
    worker = _Worker(proc, 0)
    _widen_pipes(worker)
    try:
        hello = _read_exact_timed(worker, _HELLO.size, time.monotonic() + _START_TIMEOUT_S)
        magic, pid, rss, _vsz = _HELLO.unpack(hello)
        if magic != _HELLO_MAGIC or pid != proc.pid:
            raise _Died("bad hello")
    except BaseException:
        worker.kill()
        raise
    worker.idle_rss_kib = rss
    return worker


def _widen_pipes(worker: _Worker) -> None:
    """1 MB pipe buffers (Linux; 64 KB default): a 1024² image crosses in one piece, not sixteen."""
    try:
        import fcntl

        setpipe = getattr(fcntl, "F_SETPIPE_SZ", 1031)
        for fd in (worker.rfd, worker.wfd):
            fcntl.fcntl(fd, setpipe, 1 << 20)
    except (ImportError, OSError):
        pass


def _read_exact_timed(worker: _Worker, n: int, deadline: float, cpu_limit: float | None = None,
                      cpu0: float = 0.0) -> bytearray:
    """Read n bytes from the worker; _Overrun past the deadline or CPU limit, _Died on EOF."""
    import select

    buf = bytearray(n)
    view = memoryview(buf)
    got = 0
    while got < n:
        now = time.monotonic()
        if now >= deadline:
            raise _Overrun("timeout")
        ready, _, _ = select.select([worker.rfd], [], [], min(0.05, deadline - now))
        if not ready:
            if cpu_limit is not None:
                used = _proc_cpu_s(worker.pid)
                if used is not None and used - cpu0 > cpu_limit:
                    raise _Overrun("cpu")
            continue
        k = os.readv(worker.rfd, [view[got:]])
        if k == 0:
            raise _Died("eof")
        got += k
    return buf


class _State:
    """Everything a pool owns, kept apart from the pool so a finalizer can close it."""

    def __init__(self) -> None:
        self.cv = threading.Condition()
        self.idle: list[_Worker] = []
        self.live = 0            # workers idle or checked out (or being started)
        self.closed = False
        self.stop_reaper = threading.Event()
        self.reaper: threading.Thread | None = None


def _close_state(state: _State) -> None:
    with state.cv:
        state.closed = True
        idle, state.idle = state.idle, []
        state.live -= len(idle)
        state.cv.notify_all()
    state.stop_reaper.set()
    for worker in idle:
        worker.stop()


_warned_in_process = False


def _warn_in_process(why: str) -> None:
    global _warned_in_process
    if not _warned_in_process:
        _warned_in_process = True
        log.warning("decoding images in-process, without the memory/CPU/time limits of worker processes: %s",
                    why)


class DecodePool:
    """A bounded pool of decoding worker processes (see the module docstring)."""

    def __init__(self, workers: int | None = None, *, timeout_s: float = DEFAULT_TIMEOUT_S,
                 cpu_s: float = DEFAULT_CPU_S, memory_mb: int = DEFAULT_MEMORY_MB,
                 idle_ttl_s: float = IDLE_TTL_S):
        self.workers = max(1, int(workers)) if workers else _env_workers()
        self.timeout_s, self.cpu_s, self.memory_mb = float(timeout_s), float(cpu_s), int(memory_mb)
        self.idle_ttl_s = float(idle_ttl_s)
        self._pid = os.getpid()
        self._state = _State()
        self._finalizer = weakref.finalize(self, _close_state, self._state)

    # -- public ---------------------------------------------------------------------------------

    def load(self, source: Any, *, timeout_s: float | None = None, cpu_s: float | None = None,
             memory_mb: int | None = None):
        """``imaging.load_image(source)`` decoded in a worker; ImageError on any refusal or overrun."""
        image, error, _ = self.decode(source, timeout_s=timeout_s, cpu_s=cpu_s, memory_mb=memory_mb)
        if error is not None:
            raise error
        return image

    def decode(self, source: Any, *, timeout_s: float | None = None, cpu_s: float | None = None,
               memory_mb: int | None = None):
        """(image or None, ImageError or None, TaskStats or None) — the cost of this one image too.

        Stats are None when no worker was involved (already-decoded inputs, path errors, the
        in-process fallback).
        """
        from . import imaging

        data, suffix = None, ""
        try:
            if isinstance(source, (bytes, bytearray, memoryview)):
                data = source if isinstance(source, (bytes, bytearray)) else bytes(source)
                imaging._check_byte_count(len(data))
            elif isinstance(source, (str, os.PathLike)):
                data, suffix = imaging._guarded(imaging._read_path, source)
        except ImageError as exc:
            return None, exc, None
        if data is None:  # a PIL image or an array is decoded already; anything else is refused
            try:
                return imaging.load_image(source), None, None
            except ImageError as exc:
                return None, exc, None
        if not _processes_supported():
            _warn_in_process("not supported on this platform (or COVID_CLS_DECODE_IN_PROCESS is set)")
            return self._in_process(data, suffix)
        limits = (self.timeout_s if timeout_s is None else float(timeout_s),
                  self.cpu_s if cpu_s is None else float(cpu_s),
                  self.memory_mb if memory_mb is None else int(memory_mb))
        try:
            return self._run(_DECODE, suffix.encode("utf-8", "replace"), data, *limits)
        except ImageError as exc:  # the pool is shutting down
            return None, exc, None
        except _SpawnFailed as exc:
            _warn_in_process(f"a worker process could not be started ({exc})")
            return self._in_process(data, suffix)

    def close(self) -> None:
        """Stop every idle worker now and any busy one when its image is done."""
        self._finalizer()

    def __enter__(self) -> DecodePool:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def worker_pids(self) -> list[int]:
        """The idle workers' process ids (for tests and diagnostics)."""
        with self._state.cv:
            return [w.pid for w in self._state.idle]

    # -- internals ------------------------------------------------------------------------------

    @staticmethod
    def _in_process(data: Any, suffix: str):
        from . import imaging

        try:
            return imaging._decode_untrusted(bytes(data), suffix), None, None
        except ImageError as exc:
            return None, exc, None

    def _run_test_task(self, kind: str, amount: float, *, timeout_s: float | None = None,
                       cpu_s: float | None = None, memory_mb: int | None = None) -> TaskStats:
        """Tests only: run a hang ("sleep"), a CPU burner ("burn"), a memory hog ("allocate", MB)
        or a crash ("crash") in a worker under the usual limits; ImageError on overrun."""
        code = {"sleep": _SLEEP, "burn": _BURN, "allocate": _ALLOCATE, "crash": _CRASH}[kind]
        _, error, stats = self._run(code, b"", repr(float(amount)).encode(),
                                    self.timeout_s if timeout_s is None else timeout_s,
                                    self.cpu_s if cpu_s is None else cpu_s,
                                    self.memory_mb if memory_mb is None else memory_mb)
        if error is not None:
            error.stats = stats  # type: ignore[attr-defined]
            raise error
        return stats

    def _check_fork(self) -> None:
        if os.getpid() != self._pid:  # a forked child: the workers belong to the parent
            self._pid = os.getpid()
            self._state = _State()
            self._finalizer = weakref.finalize(self, _close_state, self._state)

    def _acquire(self) -> _Worker:
        self._check_fork()
        state = self._state
        with state.cv:
            while True:
                if state.closed:
                    raise ImageError("The image decoder is shutting down; try again in a moment.")
                if state.idle:
                    return state.idle.pop()
                if state.live < self.workers:
                    state.live += 1
                    break
                state.cv.wait()
        try:
            worker = _spawn_worker()
        except BaseException as exc:
            with state.cv:
                state.live -= 1
                state.cv.notify()
            if isinstance(exc, Exception):
                raise _SpawnFailed(f"{type(exc).__name__}: {exc}") from None
            raise
        self._start_reaper()
        return worker

    def _release(self, worker: _Worker, keep: bool) -> None:
        state = self._state
        worker.last_used = time.monotonic()
        with state.cv:
            keep = keep and not state.closed
            if keep:
                state.idle.append(worker)
            else:
                state.live -= 1
            state.cv.notify()
        if not keep:
            worker.stop()

    def _start_reaper(self) -> None:
        state = self._state
        with state.cv:
            if state.reaper is not None or state.closed:
                return
            state.reaper = threading.Thread(target=_reap_idle, args=(state, self.idle_ttl_s),
                                            name="decode-pool-reaper", daemon=True)
        state.reaper.start()

    def _run(self, kind: int, suffix: bytes, payload: Any, timeout_s: float, cpu_s: float,
             memory_mb: int):
        for attempt in (1, 2):
            worker = self._acquire()
            try:
                result = self._exchange(worker, kind, suffix, payload, timeout_s, cpu_s, memory_mb)
            except BrokenPipeError:
                # It died while idle (killed from outside): the request never arrived; once more.
                worker.kill()
                self._release(worker, keep=False)
                if attempt == 2:
                    return None, _crash_error(), None
                continue
            except Exception:  # noqa: BLE001 — a broken pipe mid-answer & co: the worker is gone
                worker.kill()
                self._release(worker, keep=False)
                return None, _crash_error(), None
            except BaseException:
                worker.kill()
                self._release(worker, keep=False)
                raise
            image, error, stats, healthy = result
            if healthy:
                worker.tasks += 1
            self._release(worker, keep=healthy and self._still_fit(worker))
            return image, error, stats
        raise AssertionError("unreachable")

    def _still_fit(self, worker: _Worker) -> bool:
        if worker.tasks >= MAX_TASKS_PER_WORKER:
            return False
        rss = _proc_status_kib(worker.pid).get("VmRSS")
        return rss is None or rss - worker.idle_rss_kib <= RETIRE_GROWTH_MB * 1024

    def _exchange(self, worker: _Worker, kind: int, suffix: bytes, payload: Any, timeout_s: float,
                  cpu_s: float, memory_mb: int):
        """Send one request and read the answer: (image, error, stats, worker still usable)."""
        from PIL import Image

        t0 = time.monotonic()
        deadline = t0 + timeout_s
        cpu0 = _proc_cpu_s(worker.pid) or 0.0
        memory_bytes = int(memory_mb) * 1024 * 1024
        header = _REQUEST.pack(_REQUEST_MAGIC, kind, float(cpu_s), memory_bytes, len(suffix), len(payload))
        _write_all(worker.wfd, header, suffix, payload)
        try:
            raw = _read_exact_timed(worker, _RESPONSE.size, deadline, cpu_s if cpu_s > 0 else None, cpu0)
            (magic, status, width, height, colour, task_cpu, task_wall, idle_kib, peak_kib, _after_kib,
             out_len) = _RESPONSE.unpack(raw)
            if magic != _RESPONSE_MAGIC or (status == _OK and out_len != width * height):
                raise _Died("bad response")
            out = _read_exact_timed(worker, out_len, deadline + 5.0) if out_len else bytearray()
        except _Overrun as over:
            stats = self._killed_stats(worker, over.outcome, t0, cpu0)
            return None, _overrun_error(over.outcome, timeout_s, cpu_s, memory_mb), stats, False
        except _Died:
            outcome = self._death_outcome(worker)
            stats = self._killed_stats(worker, outcome, t0, cpu0)
            if outcome == "cpu":
                return None, _overrun_error("cpu", timeout_s, cpu_s, memory_mb), stats, False
            return None, _crash_error(), stats, False
        stats = TaskStats(
            outcome={_OK: "decoded", _REFUSED: "refused", _NO_MEMORY: "memory"}.get(status, "crashed"),
            cpu_s=task_cpu, wall_s=time.monotonic() - t0,
            peak_mb=max(0, peak_kib - idle_kib) / 1024, idle_mb=idle_kib / 1024)
        if status == _OK:
            if kind != _DECODE:
                return None, None, stats, True
            image = Image.frombytes("L", (width, height), bytes(out))
            image.info = {} if math.isnan(colour) else {"colourfulness": colour}
            return image, None, stats, True
        message = bytes(out).decode("utf-8", "replace")
        if status == _REFUSED:
            return None, ImageError(message), stats, True
        if status == _NO_MEMORY:
            # The worker's allocations failed at the limit: retire it (its heap may be a mess).
            return None, _overrun_error("memory", timeout_s, cpu_s, memory_mb), stats, False
        return None, ImageError(
            f"This file could not be read as an image (unexpected {message[:40]}). It may be damaged; "
            "try exporting it again as PNG or JPEG."), stats, False

    @staticmethod
    def _death_outcome(worker: _Worker) -> str:
        try:
            code = worker.proc.wait(timeout=2.0)
        except subprocess.TimeoutExpired:
            return "crashed"
        if hasattr(signal, "SIGXCPU") and code == -signal.SIGXCPU:
            return "cpu"
        return "crashed"

    @staticmethod
    def _killed_stats(worker: _Worker, outcome: str, t0: float, cpu0: float) -> TaskStats:
        status = _proc_status_kib(worker.pid)   # read before the kill: the task's peak
        cpu = _proc_cpu_s(worker.pid)
        worker.kill()
        hwm = status.get("VmHWM")
        return TaskStats(outcome=outcome, cpu_s=(cpu - cpu0) if cpu is not None else float("nan"),
                         wall_s=time.monotonic() - t0,
                         peak_mb=(hwm - worker.idle_rss_kib) / 1024 if hwm else float("nan"),
                         idle_mb=worker.idle_rss_kib / 1024)


class _SpawnFailed(Exception):
    pass


def _reap_idle(state: _State, ttl: float) -> None:
    period = max(0.5, min(30.0, ttl / 2))
    while not state.stop_reaper.wait(period):
        now = time.monotonic()
        with state.cv:
            stale = [w for w in state.idle if now - w.last_used > ttl]
            state.idle = [w for w in state.idle if w not in stale]
            state.live -= len(stale)
            if stale:
                state.cv.notify_all()
        for worker in stale:
            worker.stop()


def _overrun_error(outcome: str, timeout_s: float, cpu_s: float, memory_mb: int) -> ImageError:
    if outcome == "timeout":
        return ImageError(
            f"This image took longer than {timeout_s:g} s to decode, so decoding was stopped. The file may "
            "be damaged or built to be slow to decode; export it again as PNG or baseline JPEG and upload "
            "that.")
    if outcome == "cpu":
        return ImageError(
            f"Decoding this image needed more than {cpu_s:g} s of processor time, so it was stopped. The "
            "file may be damaged or built to be slow to decode; export it again as PNG or baseline JPEG "
            "and upload that.")
    return ImageError(
        f"Decoding this image needed more than {memory_mb} MB of memory, so it was stopped. Downscale it "
        "or save it as an 8-bit grayscale PNG or JPEG, and upload it again.")


def _crash_error() -> ImageError:
    return ImageError(
        "The image decoder stopped unexpectedly on this file (it is probably damaged or crafted). Export "
        "it again as PNG or JPEG and upload that.")


# ---------------------------------------------------------------------------------------------
# Shared pools
# ---------------------------------------------------------------------------------------------

_pools: dict[str, DecodePool] = {}
_pools_lock = threading.Lock()


def shared_pool(name: str = "uploads", workers: int | None = None, *,
                idle_ttl_s: float = IDLE_TTL_S) -> DecodePool:
    """The process-wide pool called ``name`` (created on first use, closed at exit).

    ``workers`` sets its size (the last caller's value wins; default ``COVID_CLS_DECODE_WORKERS``);
    ``idle_ttl_s`` applies when the pool is created.
    """
    with _pools_lock:
        pool = _pools.get(name)
        if pool is None or pool._state.closed:
            pool = _pools[name] = DecodePool(workers, idle_ttl_s=idle_ttl_s)
        elif workers:
            pool.workers = max(1, int(workers))
        return pool


def default_pool() -> DecodePool:
    """The pool for uploads: ``COVID_CLS_DECODE_WORKERS`` workers (default 2)."""
    return shared_pool("uploads")


@atexit.register
def _close_all() -> None:
    with _pools_lock:
        pools = list(_pools.values())
    for pool in pools:
        pool.close()
