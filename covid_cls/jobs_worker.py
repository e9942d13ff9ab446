"""The training worker process and its two channels to the server: the event pipe and the stop flag.

Nothing the worker does — or how it dies — may wedge the server:

* events travel through a one-way pipe as length-prefixed JSON (``Event.to_dict``) that the server reads
  with ``select`` and non-blocking reads, so a worker killed half-way through writing an event (SIGKILL,
  OOM) leaves a partial frame that is simply discarded. (A ``multiprocessing.Queue`` reader would block
  forever in ``recv`` on such a frame, because the server holds a write end of the queue's pipe itself.)
  JSON, not pickle: the server never unpickles bytes from another process.
* the stop request is one byte of shared memory without a lock: ``multiprocessing.Event`` guards its
  flag with a lock shared by both processes, and a worker killed while inside ``is_set()`` would leave
  it held, so the next Stop would block the server forever.
"""

from __future__ import annotations

import json
import os
import select
import struct
import threading
import traceback
from typing import Any

from . import events as ev

_FRAME = struct.Struct("!I")   # length prefix of one JSON-encoded event


class _StopFlag:
    """Stop request shared with the worker: one byte of shared memory, set by the server, read by the worker.

    No lock is involved (see the module docstring), so ``set()`` can never block on a dead worker.
    Offers the ``is_set()`` / ``set()`` interface of ``threading.Event`` that ``fit`` expects.
    """

    def __init__(self, ctx):
        self._flag = ctx.RawValue("b", 0)

    def set(self) -> None:
        self._flag.value = 1

    def is_set(self) -> bool:
        return bool(self._flag.value)


class _EventSender:
    """Worker end of the event stream: ``put(event)`` writes one length-prefixed JSON frame to the pipe.

    Takes an ``Event`` (or its ``to_dict()`` form)."""

    def __init__(self, conn):
        self._conn = conn            # keeps the descriptor open
        self._fd = conn.fileno()
        self._lock = threading.Lock()   # decode progress may be reported from several threads

    def put(self, event: ev.Event | dict[str, Any]) -> None:
        d = event.to_dict() if isinstance(event, ev.Event) else event
        data = json.dumps(d, default=str).encode()
        buf = memoryview(_FRAME.pack(len(data)) + data)
        with self._lock:
            while buf:
                buf = buf[os.write(self._fd, buf):]


class _EventReader:
    """Server end of the event stream. ``read(timeout)`` never blocks longer than ``timeout``, whatever the
    worker left in the pipe; a partial frame at the end of the stream is discarded, a frame that is not an
    event is skipped."""

    def __init__(self, conn):
        self._conn = conn
        self._fd = conn.fileno()
        os.set_blocking(self._fd, False)
        self._buf = bytearray()
        self.eof = False

    @property
    def partial(self) -> bool:
        return bool(self._buf)

    def read(self, timeout: float) -> list[ev.Event]:
        if not self.eof:
            self._fill(timeout)
        events = []
        while len(self._buf) >= _FRAME.size:
            (n,) = _FRAME.unpack_from(self._buf)
            if len(self._buf) < _FRAME.size + n:
                break
            payload = bytes(self._buf[_FRAME.size:_FRAME.size + n])
            del self._buf[:_FRAME.size + n]
            try:
                events.append(ev.from_dict(json.loads(payload)))
            except (ValueError, RecursionError):   # garbled JSON or not an event: skipped, never fatal
                continue
        return events

    def _fill(self, timeout: float) -> None:
        try:
            ready, _, _ = select.select([self._fd], [], [], timeout)
            chunk = os.read(self._fd, 1 << 16) if ready else None
        except BlockingIOError:
            chunk = None
        except (OSError, ValueError):   # closed or broken: the stream is over
            chunk = b""
        if chunk == b"":
            self.eof = True
        elif chunk:
            self._buf += chunk

    def close(self) -> None:
        try:
            self._conn.close()
        except OSError:
            pass


def _worker(kind: str, cfg: dict, extra: dict, conn, stop) -> None:
    """Entry point of the worker process (spawned: nothing inherited from the server but arguments).

    ``extra["roots"]``: the folders the data may be read from (the app's ``COVID_CLS_DATA_ROOTS``), checked
    for every file when it is opened; absent = no restriction."""
    import warnings

    warnings.simplefilter("ignore")  # warnings reach the UI as log events instead
    events = _EventSender(conn)
    try:
        from .config import TrainConfig

        config = TrainConfig.from_dict(cfg)
        if kind == "study":
            _study(config, extra, events, stop)
        else:
            from .engine import fit

            fit(config, on_event=events.put, stop=stop, roots=extra.get("roots"))
    except BaseException as exc:  # noqa: BLE001 - everything must reach the UI, nothing may hang
        from .errors import CovidClsError, TrainingStopped

        if isinstance(exc, TrainingStopped):
            return  # fit already sent a "stopped" event
        events.put(ev.Error(message=f"{exc.__class__.__name__}: {exc}"))
        if not isinstance(exc, CovidClsError):   # a bug, not a message for the user: keep the traceback
            traceback.print_exc(limit=8)         # on the worker's stderr, for whoever runs the server


def _study(config, extra: dict, events: _EventSender, stop) -> None:
    from .study import run_study, write_outputs

    # "devices": one process per GPU when the server sees several (issue 13 #2; Settings.study_devices)
    kw = {k: extra[k] for k in ("archs", "levels", "devices") if extra.get(k)}
    if kw.get("devices"):
        import multiprocessing as mp

        # This worker is daemonic (the server never waits for it at exit), and a daemonic process may not
        # start children. The device workers it starts are daemonic themselves, so they end with it when it
        # exits, and stop at their next step when it is killed (distributed._HaltOrOrphaned).
        mp.current_process().daemon = False
    rows = run_study(config, **kw, on_event=events.put, stop=stop, roots=extra.get("roots"))
    paths = write_outputs(rows, extra["report_dir"])
    events.put(ev.StudyDone(rows=[{k: v for k, v in r.items() if k != "history"} for r in rows],
                            histories={f"{r['arch']}·{r['level']}": r["history"] for r in rows},
                            files={k: str(v) for k, v in paths.items()}))
