"""Typed events: what a training run (or a Study of runs) tells whoever listens.

``fit(cfg, on_event=...)`` calls ``on_event`` with one of the dataclasses below. The CLI, the job manager
and the tests subscribe; ``describe(event)`` is the ONE place that turns an event into a log line.
Events cross the worker -> server pipe as JSON (``to_dict`` / ``from_dict``): no pickle.

Inside a Study every event carries ``run`` (1-based), ``runs`` and ``name`` ("resnet18-fc"); a single
run leaves them 0 / 0 / "".
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any, ClassVar


@dataclass(kw_only=True)
class Event:
    type: ClassVar[str] = "event"
    run: int = 0
    runs: int = 0
    name: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {"type": self.type, **asdict(self)}

    def tagged(self, run: int, runs: int, name: str) -> Event:
        return replace(self, run=run, runs=runs, name=name)

    @property
    def prefix(self) -> str:
        return f"[{self.run}/{self.runs} {self.name}] " if self.runs else ""


@dataclass(kw_only=True)
class Log(Event):
    type: ClassVar[str] = "log"
    message: str


@dataclass(kw_only=True)
class Decode(Event):
    type: ClassVar[str] = "decode"
    split: str
    done: int
    total: int


@dataclass(kw_only=True)
class Step(Event):
    type: ClassVar[str] = "step"
    epoch: int
    epochs: int
    step: int
    steps: int
    loss: float
    lr: float
    images_per_s: float

    @property
    def progress(self) -> float:
        """Fraction of the run done, in epochs (0..epochs)."""
        return self.epoch - 1 + self.step / max(self.steps, 1)


@dataclass(kw_only=True)
class Epoch(Event):
    type: ClassVar[str] = "epoch"
    epoch: int
    epochs: int
    train: dict[str, Any]
    val: dict[str, Any]
    seconds: float

    def record(self) -> dict[str, Any]:
        """The history entry a checkpoint card and the live curves keep."""
        return {"epoch": self.epoch, "train": self.train, "val": self.val, "seconds": self.seconds}


@dataclass(kw_only=True)
class Done(Event):
    type: ClassVar[str] = "done"
    checkpoint: str
    metrics: dict[str, Any]
    best_epoch: int = 0
    temperature: float = 1.0
    seconds: float = 0.0


@dataclass(kw_only=True)
class Error(Event):
    type: ClassVar[str] = "error"
    message: str


@dataclass(kw_only=True)
class Stopped(Event):
    type: ClassVar[str] = "stopped"
    message: str = "stopped on request; nothing was saved"


@dataclass(kw_only=True)
class RunStart(Event):
    """A Study starts its next run (``run``/``runs``/``name`` say which)."""

    type: ClassVar[str] = "run"


@dataclass(kw_only=True)
class StudyDone(Event):
    type: ClassVar[str] = "study_done"
    rows: list[dict[str, Any]] = field(default_factory=list)
    histories: dict[str, Any] = field(default_factory=dict)
    files: dict[str, str] = field(default_factory=dict)


EVENT_TYPES: dict[str, type[Event]] = {c.type: c for c in (Log, Decode, Step, Epoch, Done, Error, Stopped,
                                                            RunStart, StudyDone)}


def from_dict(d: Any) -> Event:
    """Rebuild an event from ``to_dict`` output; raises ValueError for anything else."""
    if not isinstance(d, dict) or d.get("type") not in EVENT_TYPES:
        raise ValueError(f"not an event: {str(d)[:80]!r}")
    cls = EVENT_TYPES[d["type"]]
    names = {f.name for f in fields(cls)}
    try:
        return cls(**{k: v for k, v in d.items() if k in names})
    except TypeError as exc:
        raise ValueError(f"malformed {d['type']} event: {exc}") from None


def _num(v: Any, fmt: str = ".3f") -> str:
    return format(v, fmt) if isinstance(v, (int, float)) and math.isfinite(v) else "–"


def describe(e: Event) -> str | None:
    """The log line for an event, or None for events shown as progress only (step, decode)."""
    p = e.prefix
    if isinstance(e, Epoch):
        v, t = e.val, e.train
        return (f"{p}epoch {e.epoch}/{e.epochs}: train loss {_num(t.get('loss'), '.4f')} "
                f"acc {_num(t.get('accuracy'))} | val loss {_num(v.get('loss'), '.4f')} "
                f"acc {_num(v.get('accuracy'))} AUC {_num(v.get('auc'))} sens {_num(v.get('sensitivity'))} "
                f"spec {_num(v.get('specificity'))} ({e.seconds:.1f}s)")
    if isinstance(e, (Log, Stopped)):
        return f"{p}{e.message}"
    if isinstance(e, Error):
        return f"{p}ERROR: {e.message}"
    if isinstance(e, RunStart):
        return f"=== run {e.run}/{e.runs}: {e.name} ==="
    if isinstance(e, Done):
        from pathlib import Path

        return f"{p}saved {Path(e.checkpoint).name} (best epoch {e.best_epoch}, {e.seconds:.0f}s)"
    if isinstance(e, StudyDone):
        return f"study finished: {len(e.rows)} runs"
    return None


__all__ = ["Event", "Log", "Decode", "Step", "Epoch", "Done", "Error", "Stopped", "RunStart", "StudyDone",
           "EVENT_TYPES", "from_dict", "describe"]
