"""Training runs for the UI: one worker PROCESS per run, an event stream, cancel, persistent history.

Why a process and not a thread: a crash, an out-of-memory kill or a stuck CUDA kernel in training must
never take the web server down, and a stop must be able to end the run for sure. The worker calls the
same ``fit`` / ``run_study`` as the CLI and sends their events through a pipe; a
thread in the server drains it into the run's state, which is saved (atomically) to ``runs/<id>.json``
so history survives a restart. One run at a time: a second start is refused with a clear message.

Nothing the worker does — or how it dies — may wedge the server:

* events travel through a one-way pipe as length-prefixed pickles that the server reads with ``select``
  and non-blocking reads, so a worker killed half-way through writing an event (SIGKILL, OOM) leaves a
  partial frame that is simply discarded. (A ``multiprocessing.Queue`` reader would block forever in
  ``recv`` on such a frame, because the server holds a write end of the queue's pipe itself.)
* the stop request is one byte of shared memory without a lock: ``multiprocessing.Event`` guards its
  flag with a lock shared by both processes, and a worker killed while inside ``is_set()`` would leave
  it held, so the next Stop would block the server forever.
* when a worker ends without reporting a result, its temporary files (``.<name>.<pid>.*.tmp``, see
  ``checkpoints.atomic_write``) and a checkpoint whose card was never written are removed: a killed run
  leaves either a complete, listed checkpoint or nothing.
"""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import pickle
import select
import signal
import struct
import threading
import time
import traceback
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .checkpoints import atomic_write

TERMINAL = ("done", "failed", "stopped", "interrupted")


class JobBusy(RuntimeError):
    """A run is already in progress."""


_FRAME = struct.Struct("!I")   # length prefix of one pickled event


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
    """Worker end of the event stream: ``put(event)`` writes one length-prefixed pickle to the pipe."""

    def __init__(self, conn):
        self._conn = conn            # keeps the descriptor open
        self._fd = conn.fileno()
        self._lock = threading.Lock()   # decode progress may be reported from several threads

    def put(self, event: dict) -> None:
        data = pickle.dumps(event, protocol=pickle.HIGHEST_PROTOCOL)
        buf = memoryview(_FRAME.pack(len(data)) + data)
        with self._lock:
            while buf:
                buf = buf[os.write(self._fd, buf):]


class _EventReader:
    """Server end of the event stream. ``read(timeout)`` never blocks longer than ``timeout``, whatever the
    worker left in the pipe; a partial frame at the end of the stream is discarded."""

    def __init__(self, conn):
        self._conn = conn
        self._fd = conn.fileno()
        os.set_blocking(self._fd, False)
        self._buf = bytearray()
        self.eof = False

    @property
    def partial(self) -> bool:
        return bool(self._buf)

    def read(self, timeout: float) -> list[dict]:
        if not self.eof:
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
        events = []
        while len(self._buf) >= _FRAME.size:
            (n,) = _FRAME.unpack_from(self._buf)
            if len(self._buf) < _FRAME.size + n:
                break
            payload = bytes(self._buf[_FRAME.size:_FRAME.size + n])
            del self._buf[:_FRAME.size + n]
            try:
                event = pickle.loads(payload)   # our own worker's bytes
            except Exception:  # noqa: BLE001 - a garbled frame is skipped, never fatal
                continue
            if isinstance(event, dict):
                events.append(event)
        return events

    def close(self) -> None:
        try:
            self._conn.close()
        except OSError:
            pass


def _worker(kind: str, cfg: dict, extra: dict, conn, stop) -> None:
    """Entry point of the worker process (spawned: nothing inherited from the server but arguments)."""
    import warnings

    warnings.simplefilter("ignore")  # warnings reach the UI as log events instead
    events = _EventSender(conn)
    try:
        from .config import TrainConfig

        config = TrainConfig.from_dict(cfg)
        if extra.get("make_demo"):
            from .synthetic import make_demo_dataset

            if not (Path(config.data_dir) / "train").is_dir():
                events.put({"type": "log", "message": "making the synthetic demo dataset (first use)"})
                make_demo_dataset(config.data_dir, **extra["make_demo"])
        if kind == "study":
            from .study import run_study, write_outputs

            rows = run_study(config, archs=extra.get("archs", ("resnet18", "vgg16")),
                             levels=extra.get("levels", ("fc", "partial", "full")), on_event=events.put, stop=stop)
            paths = write_outputs(rows, extra["report_dir"])
            events.put({"type": "study_done", "rows": [{k: v for k, v in r.items() if k != "history"} for r in rows],
                        "histories": {f"{r['arch']}·{r['level']}": r["history"] for r in rows},
                        "files": {k: str(v) for k, v in paths.items()}})
        else:
            from .engine import fit

            fit(config, on_event=events.put, stop=stop)
    except BaseException as exc:  # noqa: BLE001 - everything must reach the UI, nothing may hang
        from .engine import TrainingStopped

        if isinstance(exc, TrainingStopped):
            return  # fit already sent a "stopped" event
        events.put({"type": "error", "message": f"{exc.__class__.__name__}: {exc}",
                    "traceback": traceback.format_exc(limit=8)})


@dataclass
class Run:
    id: str
    kind: str
    config: dict[str, Any]
    status: str = "starting"
    message: str = ""
    created: float = field(default_factory=time.time)
    finished: float | None = None
    history: list[dict[str, Any]] = field(default_factory=list)   # epoch events (for a study: of the current run)
    steps: list[tuple[float, float]] = field(default_factory=list)  # (fractional epoch, loss)
    log: list[str] = field(default_factory=list)
    progress: float = 0.0
    eta_s: float | None = None
    checkpoint: str | None = None
    metrics: dict[str, Any] | None = None
    study: dict[str, Any] = field(default_factory=dict)
    version: int = 0   # bumped on every change, so pollers know when to redraw

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items()}


class JobManager:
    """Starts, watches, stops and remembers training runs."""

    #: How long the watcher waits for the end of the event stream once the worker is dead (normally the
    #: stream ends at once; only a descriptor leaked into some other process could keep it open).
    dead_grace_s = 2.0

    def __init__(self, runs_dir: str | os.PathLike = "runs"):
        self.runs_dir = Path(runs_dir)
        self.runs_dir.mkdir(parents=True, exist_ok=True)
        self._ctx = mp.get_context("spawn")
        self._lock = threading.Lock()
        self._active: tuple[Run, Any, Any, _StopFlag] | None = None   # run, process, event reader, stop flag
        self._stop_requested: set[str] = set()
        self._watched: dict[str, threading.Event] = {}   # set when a run's watcher has finished everything
        self._runs: dict[str, Run] = {}
        self._load_history()

    # ---------------------------------------------------------------------------------------------
    def _load_history(self) -> None:
        for p in sorted(self.runs_dir.glob("run-*.json")):
            try:
                d = json.loads(p.read_text())
                run = Run(**{k: v for k, v in d.items() if k in Run.__dataclass_fields__})
            except (OSError, ValueError, TypeError):
                continue
            if run.status not in TERMINAL:   # the server stopped while it ran
                run.status, run.message = "interrupted", "the server stopped while this run was in progress"
                self._save(run)
            self._runs[run.id] = run

    def _save(self, run: Run) -> None:
        data = json.dumps(run.to_dict(), default=str).encode()
        try:
            atomic_write(self.runs_dir / f"run-{run.id}.json", lambda f: f.write(data))
        except OSError:
            pass  # history is a convenience; a full disk must not break the run itself

    # ---------------------------------------------------------------------------------------------
    def active(self) -> Run | None:
        with self._lock:
            return self._active[0] if self._active else None

    @property
    def pid(self) -> int | None:
        """Process id of the active run's worker, or None when no run is in progress (read-only)."""
        with self._lock:
            return self._active[1].pid if self._active else None

    def get(self, run_id: str) -> Run | None:
        return self._runs.get(run_id)

    def history(self) -> list[Run]:
        return sorted(self._runs.values(), key=lambda r: r.created, reverse=True)

    def start(self, config: dict[str, Any], kind: str = "train", extra: dict | None = None) -> Run:
        with self._lock:
            ending = self._watched.get(self._active[0].id) if self._active else None
            if ending is not None and self._active[0].status not in TERMINAL:
                ending = None
        if ending is not None:
            # The previous run has reported its end and its process is exiting: a Start pressed right
            # after "done" waits for that instead of being refused.
            ending.wait(15)
        with self._lock:
            if self._active is not None:
                run = self._active[0]
                raise JobBusy(f"A training run is already in progress ({run.kind} {run.id}, {run.status}). "
                              "One run at a time per device: wait for it to finish or press Stop.")
            run = Run(id=time.strftime("%Y%m%d-%H%M%S-") + uuid.uuid4().hex[:4], kind=kind, config=config)
            reader, writer = self._ctx.Pipe(duplex=False)
            stop = _StopFlag(self._ctx)
            proc = self._ctx.Process(target=_worker, args=(kind, config, extra or {}, writer, stop),
                                     name=f"covid_cls-{kind}-{run.id}", daemon=True)
            try:
                proc.start()
            finally:
                # The worker has its own copy now. Closing ours means the stream ends (EOF) exactly when
                # the worker is gone, however it ends.
                writer.close()
            events = _EventReader(reader)
            run.status = "running"
            self._active = (run, proc, events, stop)
            self._watched[run.id] = threading.Event()
            self._runs[run.id] = run
            self._save(run)
        threading.Thread(target=self._watch, args=(run, proc, events), daemon=True,
                         name=f"watch-{run.id}").start()
        return run

    def stop(self, run_id: str | None = None, grace_s: float = 10.0) -> bool:
        """Ask the active run to stop (it ends within one step); kill it if it does not within ``grace_s``."""
        with self._lock:
            if self._active is None or (run_id and self._active[0].id != run_id):
                return False
            run, proc, _, stop = self._active
            self._stop_requested.add(run.id)
        stop.set()   # never blocks (no lock shared with the worker)
        run.message = "stopping…"
        run.version += 1

        def reaper():
            proc.join(grace_s)
            if proc.is_alive():
                proc.kill()

        threading.Thread(target=reaper, daemon=True).start()
        return True

    def wait(self, run_id: str, timeout: float | None = None) -> Run:
        """Wait until the run has ended and the manager has finished with it (or ``timeout`` passed)."""
        t0 = time.time()
        run = self._runs[run_id]
        watched = self._watched.get(run_id)
        while run.status not in TERMINAL or (watched is not None and not watched.is_set()):
            if timeout is not None and time.time() - t0 > timeout:
                break
            time.sleep(0.05)
        return run

    # ---------------------------------------------------------------------------------------------
    def _watch(self, run: Run, proc, events: _EventReader) -> None:
        try:
            self._follow(run, proc, events)
        finally:
            events.close()
            with self._lock:
                if self._active and self._active[0] is run:
                    self._active = None
                self._stop_requested.discard(run.id)
                done = self._watched.pop(run.id, None)
            if done is not None:
                done.set()

    def _follow(self, run: Run, proc, events: _EventReader) -> None:
        t_start, epochs_total = time.time(), max(1, int(run.config.get("epochs", 1) or 1))
        dead_since = None
        while not events.eof:
            for e in events.read(0.25):
                self._apply_safely(run, e, t_start, epochs_total)
            if proc.is_alive():
                continue
            dead_since = dead_since or time.monotonic()
            if time.monotonic() - dead_since > self.dead_grace_s:
                break
        proc.join(5)
        if proc.is_alive():   # the stream broke but the process lives on: never leave a second run behind
            proc.kill()
            proc.join(5)
        if run.status not in TERMINAL:
            if run.id in self._stop_requested:
                run.status, run.message = "stopped", "stopped on request (the process was ended); nothing was saved"
            else:
                run.status = "failed"
                run.message = (f"the training process ended unexpectedly: {_exit_reason(proc.exitcode)}; "
                               "nothing was saved")
            run.log.append(("" if run.status == "stopped" else "ERROR: ") + run.message)
        if run.status != "done":
            self._remove_partial_files(run, proc.pid)
        run.finished = time.time()
        run.version += 1
        self._save(run)

    def _remove_partial_files(self, run: Run, pid: int | None) -> None:
        """After a run that saved nothing: delete the temporary files its worker left (a SIGKILL skips every
        ``finally``) and any checkpoint written during the run whose card never followed."""
        from .checkpoints import card_path

        out = Path(run.config.get("out_dir") or "checkpoints")
        cache = Path(os.environ.get("COVID_CLS_CACHE", Path.home() / ".cache" / "covid_cls"))
        if pid is not None:
            for folder, pattern in ((out, f".*.{pid}.*.tmp"), (cache, f"**/.*.{pid}.*.tmp")):
                try:
                    for tmp in list(folder.glob(pattern)):
                        tmp.unlink(missing_ok=True)
                except OSError:
                    pass
        try:
            for pt in out.glob("*.pt"):
                if not card_path(pt).exists() and pt.stat().st_mtime >= run.created - 1.0:
                    pt.unlink(missing_ok=True)
        except OSError:
            pass

    def _apply_safely(self, run: Run, e: dict, t_start: float, epochs_total: int) -> None:
        try:
            self._apply(run, e, t_start, epochs_total)
        except Exception as exc:  # noqa: BLE001 - a malformed event must not end the watcher
            run.log.append(f"(ignored a malformed {e.get('type', '?')!s} event: {exc.__class__.__name__})")
            run.version += 1
            return
        if e.get("type") in ("epoch", "done", "error", "stopped", "study_done"):
            self._save(run)

    def _apply(self, run: Run, e: dict, t_start: float, epochs_total: int) -> None:
        t = e.get("type")
        runs = e.get("runs", 1)
        offset = (e.get("run", 1) - 1) / runs if "run" in e else 0.0
        if t == "step":
            frac = (e["epoch"] - 1 + e["step"] / e["steps"]) / e["epochs"]
            run.steps.append((e["epoch"] - 1 + e["step"] / e["steps"], float(e["loss"])))
            run.progress = offset + frac / runs
        elif t == "epoch":
            run.history.append({k: e[k] for k in ("epoch", "train", "val", "seconds")})
            run.progress = offset + (e["epoch"] / e["epochs"]) / runs
            v = e["val"]
            run.log.append(f"{e.get('name', '') + ' ' if 'name' in e else ''}epoch {e['epoch']}/{e['epochs']}: "
                           f"train loss {e['train']['loss']:.4f}, val loss {v.get('loss') or float('nan'):.4f}, "
                           f"val acc {v.get('accuracy') or 0:.3f}, val AUC {v.get('auc') or 0:.3f} "
                           f"({e['seconds']:.1f}s)")
        elif t == "run":
            run.history, run.steps = [], []
            run.study.setdefault("runs", []).append(e["name"])
            run.study["current"] = f"{e['run']}/{e['runs']}: {e['name']}"
            run.log.append(f"=== run {e['run']}/{e['runs']}: {e['name']} ===")
        elif t == "decode":
            run.message = f"decoding {e['split']}: {e['done']}/{e['total']}"
        elif t == "log":
            run.log.append(e["message"])
        elif t == "done":
            run.checkpoint, run.metrics = e["checkpoint"], e["metrics"]
            run.study.setdefault("histories", {})[e.get("name", "run")] = list(run.history)
            run.log.append(f"saved {Path(e['checkpoint']).name}")
            if run.kind == "train":
                run.status, run.progress, run.message = "done", 1.0, "finished"
        elif t == "study_done":
            run.study.update(rows=e["rows"], histories=e["histories"], files=e["files"])
            run.status, run.progress, run.message = "done", 1.0, "study finished"
        elif t == "stopped":
            run.status, run.message = "stopped", "stopped on request; nothing was saved"
        elif t == "error":
            run.status, run.message = "failed", e["message"]
            run.log.append("ERROR: " + e["message"])
        if 0 < run.progress < 1:
            elapsed = time.time() - t_start
            run.eta_s = elapsed * (1 - run.progress) / run.progress
        elif run.progress >= 1:
            run.eta_s = 0.0
        run.log = run.log[-200:]
        run.steps = run.steps[-2000:]
        run.version += 1


def _exit_reason(code: int | None) -> str:
    if code is None:
        return "it did not exit"
    if code < 0:
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = f"signal {-code}"
        if -code == signal.SIGKILL:
            return f"killed by {name} (out of memory, or killed from outside)"
        return f"killed by {name}"
    if code == 0:
        return "it exited without reporting a result"
    return f"exit code {code}"
