"""Experiment tracking people already use: TensorBoard or Trackio, fed from the training event stream.

One small adapter: ``make_tracker(kind, run_name, config)`` returns a callable that takes the typed events of
``fit`` / ``run_study`` (``covid_cls.events``) and writes

- every ``Step``: ``train/step_loss``, ``train/lr``, ``train/images_per_s`` at the global step;
- every ``Epoch``: ``epoch/train_<metric>`` and ``epoch/val_<metric>`` (loss, accuracy, AUC, sensitivity,
  specificity, ...) at the global step where the epoch ended, with ``epoch`` itself;
- ``Done``: the final metrics per split (``final/<split>/<metric>``, 95 % CI bounds as ``..._ci_low`` /
  ``..._ci_high``) and the checkpoint path;
- a Study's runs (``RunStart``) each as their own tracker run, ``<run_name>/<arch>-<level>``.

The run history the app and the checkpoint cards keep is untouched: this only listens. The backends are
optional dependencies, imported only when chosen; a missing one is a clear ``TrackingUnavailable`` that says
what to install (``pip install tensorboard`` — ``torch.utils.tensorboard`` needs it — or ``pip install
trackio``). ``MemoryWriter`` is a SummaryWriter stand-in that keeps what it was given (tests, notebooks).

CLI: ``--track tensorboard|trackio`` on ``train`` and ``study`` (``--track-dir``: TensorBoard's log folder,
default ``runs/tensorboard``; Trackio's project is ``covid_cls``). Python::

    with make_tracker("tensorboard", "my-run", cfg.to_dict()) as track:
        fit(cfg, on_event=track)
"""

from __future__ import annotations

import importlib.util
import json
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from . import events as ev
from .errors import CovidClsError

KINDS = ("tensorboard", "trackio")
DEFAULT_LOGDIR = "runs/tensorboard"
DEFAULT_PROJECT = "covid_cls"
_INSTALL = {"tensorboard": "pip install tensorboard", "trackio": "pip install trackio"}


class TrackingUnavailable(CovidClsError, RuntimeError):
    """The chosen tracker's package is not installed (the message says what to install)."""


def _scalars(prefix: str, d: dict[str, Any]) -> dict[str, float]:
    """The finite numbers of ``d`` (bools and nested values left out) under ``prefix``."""
    return {f"{prefix}{k}": float(v) for k, v in d.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)}


# ---------------------------------------------------------------------------------------------------
# backends: start(name, config) / log(metrics, step) / text(tag, text) / finish()
# ---------------------------------------------------------------------------------------------------

class MemoryWriter:
    """A ``SummaryWriter`` stand-in that keeps everything: ``scalars[tag] = [(step, value), ...]``."""

    def __init__(self, log_dir: str | None = None):
        self.log_dir = log_dir
        self.scalars: dict[str, list[tuple[int, float]]] = {}
        self.texts: dict[str, list[str]] = {}
        self.closed = False

    def add_scalar(self, tag: str, value: float, global_step: int | None = None) -> None:
        self.scalars.setdefault(tag, []).append((int(global_step or 0), float(value)))

    def add_text(self, tag: str, text: str, global_step: int | None = None) -> None:
        self.texts.setdefault(tag, []).append(text)

    def flush(self) -> None:
        pass

    def close(self) -> None:
        self.closed = True


class _TensorBoard:
    def __init__(self, logdir: str | Path, writer_factory: Callable[[str], Any] | None = None):
        if writer_factory is None:
            if importlib.util.find_spec("tensorboard") is None:
                raise TrackingUnavailable("--track tensorboard needs the tensorboard package (torch.utils.tensorboard "
                                          f"writes through it): {_INSTALL['tensorboard']}")
            from torch.utils.tensorboard import SummaryWriter

            writer_factory = SummaryWriter
        self.logdir, self.factory, self.writer, self.writers = Path(logdir), writer_factory, None, []

    def start(self, name: str, config: dict[str, Any]) -> None:
        self.writer = self.factory(str(self.logdir / name))
        self.writers.append(self.writer)
        self.writer.add_text("config", "```json\n" + json.dumps(config, indent=2, default=str) + "\n```", 0)

    def log(self, metrics: dict[str, float], step: int) -> None:
        for tag, value in metrics.items():
            self.writer.add_scalar(tag, value, step)

    def text(self, tag: str, text: str, step: int) -> None:
        self.writer.add_text(tag, text, step)

    def finish(self) -> None:
        if self.writer is not None:
            self.writer.flush()
            self.writer.close()
            self.writer = None


class _Trackio:
    def __init__(self, project: str):
        if importlib.util.find_spec("trackio") is None:
            raise TrackingUnavailable(f"--track trackio needs the trackio package: {_INSTALL['trackio']}")
        import trackio

        self.trackio, self.project, self.run = trackio, project, None

    def start(self, name: str, config: dict[str, Any]) -> None:
        self.run = self.trackio.init(project=self.project, name=name, config=config)

    def log(self, metrics: dict[str, float], step: int) -> None:
        self.trackio.log(metrics, step=step)

    def text(self, tag: str, text: str, step: int) -> None:
        pass   # the dashboard plots numbers; the checkpoint path is in the config's out_dir and the CLI output

    def finish(self) -> None:
        if self.run is not None:
            self.trackio.finish()
            self.run = None


# ---------------------------------------------------------------------------------------------------
# the adapter
# ---------------------------------------------------------------------------------------------------

class Tracker:
    """Callable on events; one backend run per training run (a Study's runs each get their own)."""

    def __init__(self, backend: Any, run_name: str, config: dict[str, Any]):
        self.backend, self.run_name, self.config = backend, run_name, dict(config)
        self.current: str | None = None     # the backend run now open
        self.steps_per_epoch = 0
        self.last_step = 0

    # -- runs
    def _open(self, sub: str = "") -> None:
        name = f"{self.run_name}/{sub}" if sub else self.run_name
        if self.current == name:
            return
        self._close()
        config = dict(self.config)
        if sub:
            arch, _, level = sub.partition("-")
            config.update({k: v for k, v in (("arch", arch), ("level", level)) if v})
        self.backend.start(name, config)
        self.current, self.steps_per_epoch, self.last_step = name, 0, 0

    def _close(self) -> None:
        if self.current is not None:
            self.backend.finish()
            self.current = None

    def close(self) -> None:
        self._close()

    def __enter__(self) -> Tracker:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- events
    def __call__(self, e: ev.Event) -> None:
        if isinstance(e, (ev.Log, ev.Decode)):
            return
        if isinstance(e, ev.StudyDone):
            self._close()
            return
        if isinstance(e, ev.RunStart):
            self._open(e.name)
            return
        self._open(e.name if e.runs else "")
        if isinstance(e, ev.Step):
            self.steps_per_epoch = max(self.steps_per_epoch, e.steps)
            self.last_step = (e.epoch - 1) * e.steps + e.step
            self.backend.log({"train/step_loss": float(e.loss), "train/lr": float(e.lr),
                              "train/images_per_s": float(e.images_per_s)}, self.last_step)
        elif isinstance(e, ev.Epoch):
            step = e.epoch * self.steps_per_epoch if self.steps_per_epoch else e.epoch
            self.last_step = max(self.last_step, step)
            self.backend.log({"epoch": float(e.epoch), "epoch/seconds": float(e.seconds),
                              **_scalars("epoch/train_", e.train), **_scalars("epoch/val_", e.val)}, step)
        elif isinstance(e, ev.Done):
            final: dict[str, float] = {}
            for split, m in (e.metrics or {}).items():
                if isinstance(m, dict):
                    final.update(_scalars(f"final/{split}/", m))
                    for k, ci in (m.get("ci") or {}).items():
                        if isinstance(ci, (list, tuple)) and len(ci) == 2:
                            final.update(_scalars(f"final/{split}/{k}_", {"ci_low": ci[0], "ci_high": ci[1]}))
            final.update({"final/best_epoch": float(e.best_epoch), "final/temperature": float(e.temperature),
                          "final/seconds": float(e.seconds)})
            self.backend.log(final, self.last_step)
            self.backend.text("checkpoint", e.checkpoint, self.last_step)
            if not e.runs:
                self._close()
        elif isinstance(e, (ev.Error, ev.Stopped)):
            self.backend.text("status", f"{e.type}: {e.message}", self.last_step)
            self._close()


def make_tracker(kind: str, run_name: str, config: dict[str, Any], *, logdir: str | Path = DEFAULT_LOGDIR,
                 project: str = DEFAULT_PROJECT, writer_factory: Callable[[str], Any] | None = None) -> Tracker:
    """A callable(event) writing curves and final metrics to TensorBoard (``logdir/run_name``) or Trackio
    (``project``, run ``run_name``). ``writer_factory``: a SummaryWriter-like class (e.g. ``MemoryWriter``)
    instead of torch's. Raises TrackingUnavailable when the package is missing, ValueError for other kinds."""
    if kind == "tensorboard":
        backend: Any = _TensorBoard(logdir, writer_factory)
    elif kind == "trackio":
        backend = _Trackio(project)
    else:
        raise ValueError(f"unknown tracker {kind!r}; choose from {', '.join(KINDS)}")
    return Tracker(backend, run_name, config)


def tee(*listeners: Callable[[ev.Event], Any] | None) -> Callable[[ev.Event], None]:
    """One ``on_event`` that calls each listener given (None ones skipped) in order."""
    active = [f for f in listeners if f is not None]

    def call(e: ev.Event) -> None:
        for f in active:
            f(e)

    return call


# ---------------------------------------------------------------------------------------------------
# command line: --track on train and study (registered by __main__.build_parser)
# ---------------------------------------------------------------------------------------------------

def add_cli_options(p) -> None:
    p.add_argument("--track", choices=KINDS, help="also write curves and final metrics to TensorBoard "
                                                  "(pip install tensorboard) or Trackio (pip install trackio)")
    p.add_argument("--track-dir", default=DEFAULT_LOGDIR, help="TensorBoard log folder (default: %(default)s)")


def from_args(a, config: dict[str, Any], kind: str = "train") -> Tracker | None:
    """The tracker the command line asked for (None without --track); its run is named after the run."""
    if not getattr(a, "track", None):
        return None
    stamp = time.strftime("%Y%m%d-%H%M%S")
    name = f"{config.get('arch')}-{config.get('level')}-{stamp}" if kind == "train" else f"{kind}-{stamp}"
    return make_tracker(a.track, name, config, logdir=a.track_dir)


__all__ = ["make_tracker", "Tracker", "MemoryWriter", "TrackingUnavailable", "tee", "KINDS", "add_cli_options",
           "from_args"]
