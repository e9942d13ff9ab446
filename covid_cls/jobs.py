"""Training runs for the UI: one worker PROCESS per run, an event stream, cancel, persistent history.

Why a process and not a thread: a crash, an out-of-memory kill or a stuck CUDA kernel in training must
never take the web server down, and a stop must be able to end the run for sure. The worker
(``jobs_worker._worker``) calls the same ``fit`` / ``run_study`` as the CLI and sends their typed events
(``events.py``) through a pipe; a thread in the server drains it into the run's state, which is saved
(atomically) to ``runs/<id>.json`` so history survives a restart. One run at a time: a second start is
refused with a clear message.

How the pipe and the stop flag stay safe against a worker killed at any point is explained in
``jobs_worker``. When a worker ends without reporting a result, its temporary files
(``.<name>.<pid>.*.tmp``, see ``fsio.atomic_write``) and a checkpoint whose card was never written are
removed: a killed run leaves either a complete, listed checkpoint or nothing.
"""

from __future__ import annotations

import copy
import errno
import json
import math
import multiprocessing as mp
import os
import re
import signal
import threading
import time
import uuid
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import events as ev
from .errors import JobBusy
from .fsio import atomic_write, disk_full_message

# The process/IPC half lives in jobs_worker; ``_worker`` is looked up here at each start (tests replace it).
from .jobs_worker import _EventReader, _EventSender, _StopFlag, _worker  # noqa: F401 - _EventSender re-exported

TERMINAL = ("done", "failed", "stopped", "interrupted")
WEIGHT_SUFFIXES = (".safetensors", ".pt")   # a checkpoint's weights; its card is NAME.json beside them


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
    # Held by the watcher thread while it folds an event in, and by ``snapshot``: a reader (the live curves)
    # never sees a list half-way through an update, nor history and steps of different moments.
    _lock: threading.RLock = field(default_factory=threading.RLock, repr=False, compare=False)

    def to_dict(self) -> dict[str, Any]:
        with self._lock:
            return {k: v for k, v in self.__dict__.items() if not k.startswith("_")}

    def snapshot(self) -> Run:
        """A copy of this run at one moment (lists and dicts copied), safe to read while the watcher appends."""
        with self._lock:
            d = copy.deepcopy(self.to_dict())
        return Run(**d)

    @classmethod
    def from_saved(cls, d: Any, file_id: str) -> Run:
        """A run from its history file; ValueError naming the first field that is missing or of a wrong type."""
        if not isinstance(d, dict):
            raise ValueError(f"not a JSON object ({type(d).__name__})")
        kw = {k: v for k, v in d.items() if k in _SAVED_FIELDS}
        for name, (types, required) in _SAVED_FIELDS.items():
            if name not in kw:
                if required:
                    raise ValueError(f"'{name}' is missing")
                continue
            v = kw[name]
            if not isinstance(v, types) or isinstance(v, bool) and bool not in types:
                raise ValueError(f"'{name}' has the wrong type ({type(v).__name__})")
            if isinstance(v, float) and not math.isfinite(v):
                raise ValueError(f"'{name}' is not a finite number")
        if kw["id"] != file_id or not _RUN_ID.fullmatch(kw["id"]):
            raise ValueError("its 'id' does not match the file name")
        if kw["kind"] not in ("train", "study") or kw["status"] not in (*TERMINAL, "starting", "running"):
            raise ValueError("unknown 'kind' or 'status'")
        if not all(isinstance(h, dict) for h in kw.get("history", [])):
            raise ValueError("'history' holds something other than epoch records")
        steps = kw.get("steps", [])
        if not all(isinstance(st, (list, tuple)) and len(st) == 2 and all(
                isinstance(x, (int, float)) and not isinstance(x, bool) for x in st) for st in steps):
            raise ValueError("'steps' holds something other than (epoch, loss) pairs")
        kw["steps"] = [(float(a), float(b)) for a, b in steps]
        kw["log"] = [line for line in kw.get("log", []) if isinstance(line, str)]
        if kw.get("metrics") is not None:   # per split: a dict of numbers, or left out
            kw["metrics"] = {k: v for k, v in kw["metrics"].items() if isinstance(v, dict)}
        study = kw.get("study", {})
        for name, types in (("runs", list), ("rows", list), ("histories", dict), ("files", dict), ("current", str),
                            ("live", dict), ("done_fraction", dict)):
            if name in study and not isinstance(study[name], types):
                raise ValueError(f"'study.{name}' has the wrong type ({type(study[name]).__name__})")
        return cls(**kw)


_NUM = (int, float)
# field -> (accepted types, required) of a saved run; anything else in the file is ignored
_SAVED_FIELDS: dict[str, tuple[tuple[type, ...], bool]] = {
    "id": ((str,), True), "kind": ((str,), True), "config": ((dict,), True), "status": ((str,), True),
    "message": ((str,), False), "created": (_NUM, False), "finished": ((*_NUM, type(None)), False),
    "history": ((list,), False), "steps": ((list,), False), "log": ((list,), False), "progress": (_NUM, False),
    "eta_s": ((*_NUM, type(None)), False), "checkpoint": ((str, type(None)), False),
    "metrics": ((dict, type(None)), False), "study": ((dict,), False), "version": ((int,), False),
}
_RUN_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")


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
    #: History files larger than this are not read (a run's file is a few hundred KB at most).
    max_history_file = 16 * 2**20

    def _load_history(self) -> None:
        """Every readable ``run-*.json``; a damaged one (torn, ``null``, wrong types, too big) is skipped with a
        warning and never stops the manager from starting (issue 11 #5)."""
        self.skipped_history: list[tuple[str, str]] = []
        for p in sorted(self.runs_dir.glob("run-*.json")):
            try:
                if p.stat().st_size > self.max_history_file:
                    raise ValueError(f"larger than {self.max_history_file // 2**20} MB")
                run = Run.from_saved(json.loads(p.read_text()), p.name[len("run-"):-len(".json")])
            except (OSError, ValueError, TypeError, RecursionError) as exc:
                why = f"{exc.__class__.__name__}: {str(exc)[:200]}" if isinstance(exc, OSError) else str(exc)[:200]
                self.skipped_history.append((p.name, why))
                warnings.warn(f"skipping the damaged run history file {p.name}: {why}", RuntimeWarning, stacklevel=2)
                continue
            if run.status not in TERMINAL:   # the server stopped while it ran
                run.status, run.message = "interrupted", "the server stopped while this run was in progress"
                self._save(run)
            self._runs[run.id] = run

    def _save(self, run: Run) -> None:
        try:
            with run._lock:   # the watcher may be folding an event in: serialise one consistent state
                data = json.dumps(run.to_dict(), default=str).encode()
            atomic_write(self.runs_dir / f"run-{run.id}.json", lambda f: f.write(data))
        except OSError as exc:
            # History is a convenience; a full disk must not break the run itself, but the run's log says so.
            msg = "WARNING: " + disk_full_message(exc, "the run history", self.runs_dir)
            with run._lock:
                new = msg not in run.log[-3:]
                if new:
                    run.log.append(msg)
                    run.version += 1
            if new and exc.errno in (errno.ENOSPC, errno.EDQUOT):
                warnings.warn(msg, RuntimeWarning, stacklevel=2)

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
        return sorted(list(self._runs.values()), key=lambda r: r.created, reverse=True)

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
        with run._lock:
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
        t_start = time.time()
        dead_since = None
        while not events.eof:
            for e in events.read(0.25):
                self._apply_safely(run, e, t_start)
            if proc.is_alive():
                continue
            dead_since = dead_since or time.monotonic()
            if time.monotonic() - dead_since > self.dead_grace_s:
                break
        proc.join(5)
        if proc.is_alive():   # the stream broke but the process lives on: never leave a second run behind
            proc.kill()
            proc.join(5)
        with run._lock:
            if run.status not in TERMINAL:
                if run.id in self._stop_requested:
                    run.status = "stopped"
                    run.message = "stopped on request (the process was ended); nothing was saved"
                else:
                    run.status = "failed"
                    run.message = (f"the training process ended unexpectedly: {_exit_reason(proc.exitcode)}; "
                                   "nothing was saved")
                run.log.append(("" if run.status == "stopped" else "ERROR: ") + run.message)
        if run.status != "done":
            self._remove_partial_files(run, proc.pid)
        with run._lock:
            run.finished = time.time()
            run.version += 1
        self._save(run)

    def _remove_partial_files(self, run: Run, pid: int | None) -> None:
        """After a run that saved nothing: delete the temporary files its worker left (a SIGKILL skips every
        ``finally``) and any checkpoint written during the run whose card never followed."""
        out = Path(run.config.get("out_dir") or "checkpoints")
        # the worker's cache (COVID_CLS_CACHE, /data on Spaces, ~/.cache)
        from .fsio import default_cache_dir

        cache = default_cache_dir()
        if pid is not None:
            for folder, pattern in ((out, f".*.{pid}.*.tmp"), (cache, f"**/.*.{pid}.*.tmp")):
                try:
                    for tmp in list(folder.glob(pattern)):
                        tmp.unlink(missing_ok=True)
                except OSError:
                    pass
        try:
            for weights in [p for suffix in WEIGHT_SUFFIXES for p in out.glob(f"*{suffix}")]:
                if not weights.with_suffix(".json").exists() and weights.stat().st_mtime >= run.created - 1.0:
                    weights.unlink(missing_ok=True)
        except OSError:
            pass

    def _apply_safely(self, run: Run, e: ev.Event, t_start: float) -> None:
        with run._lock:   # readers take a snapshot under the same lock (Run.snapshot)
            try:
                self._apply(run, e)
            except Exception as exc:  # noqa: BLE001 - a malformed event must not end the watcher
                run.log.append(f"(ignored a malformed {e.type} event: {exc.__class__.__name__})")
                run.version += 1
                return
            if 0 < run.progress < 1:
                elapsed = time.time() - t_start
                run.eta_s = elapsed * (1 - run.progress) / run.progress
            elif run.progress >= 1:
                run.eta_s = 0.0
            del run.log[:-200]
            del run.steps[:-2000]
            run.version += 1
        if isinstance(e, (ev.Epoch, ev.Done, ev.Error, ev.Stopped, ev.StudyDone)):
            self._save(run)

    @staticmethod
    def _apply(run: Run, e: ev.Event) -> None:
        """Fold one event into the run's state; the log line is ``events.describe``'s."""
        line = ev.describe(e)
        if isinstance(e, ev.Step):
            run.steps.append((e.progress, float(e.loss)))
            run.progress = _progress(run, e, e.progress / e.epochs)
        elif isinstance(e, ev.Epoch):
            run.history.append(e.record())
            if e.runs:   # a Study's runs may go in parallel (issue 13 #2): each keeps its own curve
                run.study.setdefault("live", {}).setdefault(e.name or "run", []).append(e.record())
            run.progress = _progress(run, e, e.epoch / e.epochs)
        elif isinstance(e, ev.RunStart):
            run.history, run.steps = [], []
            run.study.setdefault("runs", []).append(e.name)
            run.study["current"] = f"{e.run}/{e.runs}: {e.name}"
        elif isinstance(e, ev.Decode):
            run.message = f"decoding {e.split}: {e.done}/{e.total}"
        elif isinstance(e, ev.Done):
            run.checkpoint, run.metrics = e.checkpoint, e.metrics
            if e.runs:   # a run that stopped early (patience) is done all the same
                run.progress = _progress(run, e, 1.0)
            live = run.study.get("live", {}).get(e.name or "run")
            run.study.setdefault("histories", {})[e.name or "run"] = list(live if live is not None else run.history)
            if run.kind == "train":
                run.status, run.progress, run.message = "done", 1.0, "finished"
        elif isinstance(e, ev.StudyDone):
            run.study.update(rows=e.rows, histories=e.histories, files=e.files)
            run.status, run.progress, run.message = "done", 1.0, "study finished"
        elif isinstance(e, ev.Stopped):
            run.status, run.message = "stopped", e.message
        elif isinstance(e, ev.Error):
            if run.status == "failed" and run.message == e.message:
                line = None   # fit reported it, then the worker again on the way out
            run.status, run.message = "failed", e.message
        if line:
            run.log.append(line)


def _progress(run: Run, e: ev.Event, fraction: float) -> float:
    """The whole job's progress: one run's ``fraction``, or inside a Study the mean over its runs of each one's
    fraction done (runs may go one after another or in parallel, one per device)."""
    if not e.runs:
        return fraction
    parts = run.study.setdefault("done_fraction", {})
    parts[str(e.run)] = fraction   # str: the run is saved as JSON
    return sum(parts.values()) / e.runs


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
