"""``Card``: the typed description of one trained model, saved as JSON beside its weights.

Every module that hands a model's facts to another (engine -> checkpoints -> predictor, the CLI, the app)
passes a ``Card``, so each default lives here once ("image_size" 224, "temperature" 1.0, ...).
``Card.from_dict`` reads every card ever written (format 1 ``.pt`` cards included) and validates what it
reads before anything is sized from it: a card claiming 100,000 classes or a 10^9-unit head is refused
here, not after allocating a model for it.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields
from typing import Any

import numpy as np

from .errors import CheckpointError

FORMAT_VERSION = 2          # 1: torch .pt (pickle-free zip); 2: safetensors + JSON card
MAX_CLASSES = 20


def class_name_ok(name: object) -> bool:
    """A class name is a dataset's folder name and a label: 1-64 printable characters, a plain name (no path
    separator, not "." or "..", no leading "." or "__", which scans skip). A card from elsewhere (the Hub) is
    checked with this before any name is joined to a path."""
    return (isinstance(name, str) and 0 < len(name) <= 64 and name.isprintable() and "/" not in name
            and "\\" not in name and name not in (".", "..") and not name.startswith((".", "__")))
MAX_HIDDEN = 16384
DISCLAIMER_NOTE = "research demo - not a diagnosis"


@dataclass
class Card:
    """What a checkpoint says about itself. Unknown keys from newer writers are kept in ``extra``."""

    arch: str
    level: str
    classes: list[str] = field(default_factory=lambda: ["infected", "normal"])
    positive: str = "infected"
    hidden: int = 4300
    dropout: float = 0.5
    image_size: int = 224
    cache_size: int = 256
    weights_origin: str = "unknown"     # imagenet | scratch | file | unknown
    weights_note: str = ""
    # When a run started from public weights, only what the level trained is stored; the rest is rebuilt
    # from these (name = torchvision weights enum member, sha256 = of the state_dict file).
    base_weights: dict[str, str] = field(default_factory=dict)
    stored: str = "all"                 # all | trained
    config: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)
    temperature: float = 1.0
    threshold: float | None = None      # decision threshold on P(positive); None = argmax
    calibration_note: str = ""          # why the temperature was left at 1 or hit a bound ("" = fine)
    selective: dict[str, Any] = field(default_factory=dict)   # {"conformal_qhat", "conformal_alpha"}
    best_epoch: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)
    params: dict[str, int] = field(default_factory=dict)
    device: str = ""
    precision: str = "fp32"
    # how many processes trained it: {world_size, backend, nodes, batch_per_process, global_batch}; {} = older
    distributed: dict[str, Any] = field(default_factory=dict)
    data: dict[str, Any] = field(default_factory=dict)
    train_seconds: float = 0.0
    ood: dict[str, Any] = field(default_factory=dict)
    note: str = DISCLAIMER_NOTE
    format: int = FORMAT_VERSION
    created: str = ""
    versions: dict[str, str] = field(default_factory=dict)
    file: str = ""                      # the weights file this card vouches for
    bytes: int | None = None            # its size ...
    sha256: str | None = None           # ... and digest, checked before the weights are read
    path: str = ""                      # where it was found (set when listing; not saved)
    extra: dict[str, Any] = field(default_factory=dict)

    # ------------------------------------------------------------------ reading and writing
    @classmethod
    def from_dict(cls, d: Any, source: str = "card") -> Card:
        """Validate and convert; raises CheckpointError naming the field that is wrong."""
        if not isinstance(d, dict):
            raise CheckpointError(f"{source}: not a JSON object")
        known = {f.name for f in fields(cls)} - {"extra"}
        kw = {k: v for k, v in d.items() if k in known}
        extra = {k: v for k, v in d.items() if k not in known and k not in ("num_classes", "state_dict", "extra")}
        if isinstance(d.get("extra"), dict):
            extra.update(d["extra"])
        for name in ("arch", "level"):
            if not isinstance(kw.get(name), str):
                raise CheckpointError(f"{source}: '{name}' is missing or not text")
        card = cls(**kw, extra=extra)
        card._validate(source)
        return card

    def _validate(self, source: str) -> None:
        from .models import ARCHS, LEVELS

        def bad(what: str) -> CheckpointError:
            return CheckpointError(f"{source}: {what}")

        if self.arch not in ARCHS:
            raise bad(f"unknown architecture {self.arch!r}")
        if self.level not in LEVELS:
            raise bad(f"unknown level {self.level!r}")
        if (not isinstance(self.classes, list) or not 2 <= len(self.classes) <= MAX_CLASSES
                or not all(class_name_ok(c) for c in self.classes)
                or len(set(self.classes)) != len(self.classes)):
            raise bad(f"'classes' must be 2 to {MAX_CLASSES} distinct plain names (no path separators)")
        if self.positive not in self.classes:
            self.positive = self.classes[0]
        for name, lo, hi in (("hidden", 1, MAX_HIDDEN), ("image_size", 32, 2048), ("cache_size", 16, 4096)):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or not lo <= v <= hi:
                raise bad(f"'{name}' must be an integer in [{lo}, {hi}], not {v!r}")
        t = self.temperature
        if not isinstance(t, (int, float)) or not math.isfinite(t) or t <= 0:
            raise bad(f"'temperature' must be a positive number, not {t!r}")
        self.temperature = float(t)
        if self.threshold is not None and (not isinstance(self.threshold, (int, float))
                                           or not 0.0 <= self.threshold <= 1.0):
            raise bad(f"'threshold' must be a probability, not {self.threshold!r}")
        if self.stored not in ("all", "trained"):
            raise bad(f"'stored' must be 'all' or 'trained', not {self.stored!r}")
        for name in ("config", "metrics", "data", "ood", "params", "versions", "base_weights", "selective",
                     "distributed"):
            if not isinstance(getattr(self, name), dict):
                setattr(self, name, {})
        if not isinstance(self.history, list):
            self.history = []

    def to_dict(self, with_path: bool = False) -> dict[str, Any]:
        d = asdict(self)
        extra = d.pop("extra")
        if not with_path:
            d.pop("path")
        d["num_classes"] = self.num_classes   # read by format-1 readers
        return {**extra, **d}

    # ------------------------------------------------------------------ derived facts
    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def positive_index(self) -> int:
        return self.classes.index(self.positive)

    @property
    def name(self) -> str:
        """The checkpoint's name as users see it (its weights file without the suffix)."""
        from pathlib import Path

        return Path(self.path or self.file).stem

    @property
    def title(self) -> str:
        from .models import ARCHS

        return f"{ARCHS[self.arch].title} · {self.level}"

    @property
    def from_scratch(self) -> bool:
        return self.weights_origin == "scratch"

    def split_metrics(self, split: str) -> dict[str, Any]:
        m = self.metrics.get(split)
        return m if isinstance(m, dict) else {}

    @property
    def val_auc(self) -> float:
        auc = self.split_metrics("validation").get("auc")
        return float(auc) if isinstance(auc, (int, float)) and math.isfinite(auc) else -1.0

    def decide(self, probs) -> np.ndarray:
        """Class index per row of ``probs`` (N, C) at the operating point: the stored threshold on
        P(positive) when there is one (binary models), else the most probable class."""
        probs = np.asarray(probs, dtype=np.float64).reshape(-1, self.num_classes)
        if self.threshold is not None and self.num_classes == 2:
            pos = self.positive_index
            return np.where(probs[:, pos] >= self.threshold, pos, 1 - pos)
        return probs.argmax(1)

    def label_for(self, probs: list[float]) -> str:
        """The class shown for one image's probabilities (see ``decide``)."""
        return self.classes[int(self.decide(probs)[0])]

    def conformal_sets(self, probs) -> np.ndarray | None:
        """(N, C) bool prediction sets at the stored conformal quantile, or None when the card has none."""
        from .selective import prediction_sets

        qhat = self.selective.get("conformal_qhat")
        if not isinstance(qhat, (int, float)):
            return None
        return prediction_sets(np.asarray(probs, dtype=np.float64).reshape(-1, self.num_classes), qhat)

__all__ = ["Card", "FORMAT_VERSION", "MAX_CLASSES", "MAX_HIDDEN", "class_name_ok"]
