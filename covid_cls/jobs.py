"""Training runs for the UI: one worker PROCESS per run, an event stream, cancel, persistent history.

Why a process and not a thread: a crash, an out-of-memory kill or a stuck CUDA kernel in training must
never take the web server down, and a stop must be able to end the run for sure. The worker calls the
same ``fit`` / ``run_study`` as the CLI and sends their events through a multiprocessing queue; a
thread in the server drains it into the run's state, which is saved (atomically) to ``runs/<id>.json``
so history survives a restart. One run at a time: a second start is refused with a clear message.
"""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import queue
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


def _worker(kind: str, cfg: dict, extra: dict, events, stop) -> None:
    """Entry point of the worker process (spawned: nothing inherited from the server but arguments)."""
    import warnings

    warnings.simplefilter("ignore")  # warnings reach the UI as log events instead
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

    def __init__(self, runs_dir: str | os.PathLike = "runs"):
        self.runs_dir = Path(runs_dir)
        self.runs_dir.mkdir(parents=True, exist_ok=True)
        self._ctx = mp.get_context("spawn")
        self._lock = threading.Lock()
        self._active: tuple[Run, Any, Any, Any] | None = None   # run, process, queue, stop event
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

    def get(self, run_id: str) -> Run | None:
        return self._runs.get(run_id)

    def history(self) -> list[Run]:
        return sorted(self._runs.values(), key=lambda r: r.created, reverse=True)

    def start(self, config: dict[str, Any], kind: str = "train", extra: dict | None = None) -> Run:
        with self._lock:
            if self._active is not None:
                run = self._active[0]
                raise JobBusy(f"A training run is already in progress ({run.kind} {run.id}, {run.status}). "
                              "One run at a time per device: wait for it to finish or press Stop.")
            run = Run(id=time.strftime("%Y%m%d-%H%M%S-") + uuid.uuid4().hex[:4], kind=kind, config=config)
            events, stop = self._ctx.Queue(), self._ctx.Event()
            proc = self._ctx.Process(target=_worker, args=(kind, config, extra or {}, events, stop),
                                     name=f"covid_cls-{kind}-{run.id}", daemon=True)
            proc.start()
            run.status = "running"
            self._active = (run, proc, events, stop)
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
        stop.set()
        run.message = "stopping…"
        run.version += 1

        def reaper():
            proc.join(grace_s)
            if proc.is_alive():
                proc.kill()

        threading.Thread(target=reaper, daemon=True).start()
        return True

    def wait(self, run_id: str, timeout: float | None = None) -> Run:
        t0 = time.time()
        run = self._runs[run_id]
        while run.status not in TERMINAL:
            if timeout is not None and time.time() - t0 > timeout:
                break
            time.sleep(0.1)
        return run

    # ---------------------------------------------------------------------------------------------
    def _watch(self, run: Run, proc, events) -> None:
        t_start, epochs_total = time.time(), max(1, int(run.config.get("epochs", 1)))
        while True:
            try:
                e = events.get(timeout=0.25)
            except queue.Empty:
                if not proc.is_alive():
                    # drain what is left, then decide how it ended
                    try:
                        while True:
                            self._apply(run, events.get_nowait(), t_start, epochs_total)
                    except (queue.Empty, OSError, EOFError, ValueError):
                        pass
                    break
                continue
            except (OSError, EOFError, ValueError):
                break
            self._apply(run, e, t_start, epochs_total)
            if e["type"] in ("epoch", "done", "error", "stopped", "study_done"):
                self._save(run)
        proc.join(5)
        if run.status not in TERMINAL:
            code = proc.exitcode
            run.status = "failed"
            reason = "killed (out of memory?)" if code in (-9, 137) else f"exit code {code}"
            run.message = f"the training process ended unexpectedly: {reason}; nothing was saved"
        run.finished = time.time()
        run.version += 1
        self._save(run)
        with self._lock:
            if self._active and self._active[0] is run:
                self._active = None

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
