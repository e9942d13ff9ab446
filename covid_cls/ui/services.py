"""What every tab shares: the server's ``Settings`` and the ``Services`` over them (the predictor, the job
manager, the checkpoint folder, uploaded datasets). Handlers receive a ``Services`` explicitly.

Nothing heavy happens when these are created: the predictor and the job manager are made on first use.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import ConfigError, DatasetError
from ..imaging import MAX_BYTES

if TYPE_CHECKING:
    from ..card import Card
    from ..config import TrainConfig
    from ..jobs import JobManager, Run
    from ..predictor import Prediction, Predictor

try:  # Hugging Face ZeroGPU: request a GPU for the duration of a call; a no-op everywhere else
    import spaces  # type: ignore

    gpu = spaces.GPU
except Exception:  # noqa: BLE001
    def gpu(fn=None, **_kw):
        return fn if fn is not None else (lambda f: f)


@gpu
def _predict_on_device(predictor: Predictor, image: Any, arch: str, level: str,
                       checkpoint: str | None) -> Prediction:
    return predictor.predict(image, arch=arch, level=level, checkpoint=checkpoint)


@dataclass
class Settings:
    checkpoints: Path
    runs: Path
    training: bool
    max_upload: int
    roots_env: str

    @classmethod
    def from_env(cls) -> Settings:
        return cls(checkpoints=Path(os.environ.get("COVID_CLS_CHECKPOINTS", "checkpoints")),
                   runs=Path(os.environ.get("COVID_CLS_RUNS", "runs")),
                   training=os.environ.get("COVID_CLS_TRAINING", "1") != "0",
                   max_upload=int(float(os.environ.get("COVID_CLS_MAX_UPLOAD_MB", MAX_BYTES / 2**20)) * 2**20),
                   roots_env=os.environ.get("COVID_CLS_DATA_ROOTS", ""))

    @property
    def demo_data(self) -> Path:
        return self.runs / "demo_data"

    @property
    def uploads(self) -> Path:
        return self.runs / "datasets"

    def roots(self) -> list[Path]:
        from ..safety import allowed_roots

        self.demo_data.mkdir(parents=True, exist_ok=True)
        self.uploads.mkdir(parents=True, exist_ok=True)
        return allowed_roots(self.roots_env, default=self.demo_data) + [self.demo_data.resolve(),
                                                                         self.uploads.resolve()]


@dataclass
class Services:
    """Lazily created heavy objects shared by all sessions, behind the operations the tabs need."""

    settings: Settings
    _predictor: Predictor | None = None
    _jobs: JobManager | None = None
    # uploaded zip path -> where it was extracted (the last MAX_UNPACKED; the folders follow the upload policy)
    _unpacked: OrderedDict[str, Path] = field(default_factory=OrderedDict)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def predictor(self) -> Predictor:
        with self._lock:
            if self._predictor is None:
                from ..predictor import Predictor

                self._predictor = Predictor(self.settings.checkpoints)
            return self._predictor

    @property
    def jobs(self) -> JobManager:
        with self._lock:
            if self._jobs is None:
                from ..jobs import JobManager

                self._jobs = JobManager(self.settings.runs)
            return self._jobs

    # ------------------------------------------------------------------ checkpoints
    def checkpoint_path(self, name: str) -> Path:
        """The checkpoint called ``name`` in the checkpoint folder: "../x" or "/abs/x" never leave it."""
        return self.settings.checkpoints / Path(name).name

    def cards(self, arch: str | None = None, level: str | None = None) -> list[Card]:
        """Cards of the listed checkpoints (newest first), optionally of one (arch, level) only."""
        from ..checkpoints import list_checkpoints

        return [c for c in list_checkpoints(self.settings.checkpoints)
                if arch in (None, c.arch) and level in (None, c.level)]

    def card(self, name: str) -> Card | None:
        from ..checkpoints import read_card

        return read_card(self.checkpoint_path(name))

    def predict(self, image: Any, arch: str, level: str, checkpoint: str | None = None) -> Prediction:
        """Predict with the named checkpoint (a name in the checkpoint folder) or the best for the pair."""
        path = str(self.checkpoint_path(checkpoint)) if checkpoint else None
        return _predict_on_device(self.predictor, image, arch, level, path)

    def delete_checkpoint(self, name: str) -> None:
        from ..checkpoints import delete_checkpoint

        path = self.checkpoint_path(name)
        delete_checkpoint(path)
        if self._predictor is not None:   # a model that was never loaded has nothing to evict
            self._predictor.evict(path)

    # ------------------------------------------------------------------ training runs
    def start_run(self, cfg: TrainConfig, kind: str = "train", extra: dict | None = None) -> Run:
        """Start a run in a worker process. Every file it opens is checked against the server's data roots
        (issue 11 #4); a study's pairs are checked first (``check_study``: #8)."""
        extra = dict(extra or {})
        if kind == "study":
            check_study(extra.get("archs"), extra.get("levels"))
        extra["roots"] = [str(r) for r in self.settings.roots()]
        return self.jobs.start(cfg.to_dict(), kind=kind, extra=extra)

    def stop_run(self) -> bool:
        """Ask the active run to stop; False when there is none (no job manager made for asking)."""
        return self._jobs.stop() if self._jobs is not None else False

    def history(self, limit: int = 50) -> list[Run]:
        return self.jobs.history()[:limit]

    # ------------------------------------------------------------------ datasets
    def demo_data(self) -> Path:
        """The synthetic demo set, made on first use."""
        from ..synthetic import make_demo_dataset

        root = self.settings.demo_data
        if not (root / "train").is_dir():
            make_demo_dataset(root, n_per_class=40, size=256)
        return root

    MAX_UNPACKED = 256

    def unpack_zip(self, zip_path: str) -> Path:
        """Extract an uploaded ImageFolder zip (checked entry by entry) once per content; returns its root.

        The dataset layout is checked on the member names before anything is extracted, and a folder that the
        scan then refuses is deleted: a refused zip leaves nothing behind (issue 11 #6). Extracted uploads
        follow the policy of ``safety.prune_uploads`` (COVID_CLS_UPLOADS_MAX_MB, COVID_CLS_UPLOADS_MAX_AGE_HOURS).
        """
        from ..data import check_layout_names, scan_dataset
        from ..safety import prune_uploads, safe_extract_zip

        known = self._unpacked.get(zip_path)
        if known is not None and not Path(zip_path).exists() and known.is_dir():
            _touch(known)
            return known   # Scan, then Start: the browser sends the (deleted) upload again
        try:
            digest = hashlib.sha1(Path(zip_path).read_bytes()).hexdigest()[:16]
        except (FileNotFoundError, IsADirectoryError):
            raise DatasetError("The uploaded .zip is no longer on the server; upload it again.") from None
        dest = self.settings.uploads / digest
        if (dest / "train").is_dir():
            root = dest
        else:
            prune_uploads(self.settings.uploads, keep=self._in_use())
            root = safe_extract_zip(zip_path, dest, check_names=check_layout_names)
            try:
                scan_dataset(root)
            except DatasetError:
                shutil.rmtree(dest, ignore_errors=True)
                raise
        _touch(dest)
        self._unpacked[zip_path] = root
        self._unpacked.move_to_end(zip_path)
        while len(self._unpacked) > self.MAX_UNPACKED:
            self._unpacked.popitem(last=False)
        return root

    def _in_use(self) -> list[str]:
        """Dataset folders a run in progress reads (never pruned)."""
        run = self._jobs.active() if self._jobs is not None else None
        return [run.config["data_dir"]] if run is not None and run.config.get("data_dir") else []


def _touch(path: Path) -> None:
    """Mark an extracted upload as used now (the age policy counts from its last use)."""
    try:
        now = time.time()
        os.utime(path, (now, now))
    except OSError:
        pass


def check_study(archs: Any, levels: Any) -> None:
    """A study's pairs: known names, each at most once, so at most every (arch, level) once (issue 11 #8)."""
    from ..models import ARCHS, LEVELS

    for what, names, known in (("architecture", archs, ARCHS), ("level", levels, LEVELS)):
        if not isinstance(names, (list, tuple)) or not names:
            raise ConfigError(f"pick at least one {what}")
        for n in names:
            if not isinstance(n, str) or n not in known:
                raise ConfigError(f"unknown {what} {str(n)[:40]!r}; choose from {', '.join(known)}")
        dups = sorted({n for n in names if list(names).count(n) > 1})
        if dups:
            raise ConfigError(f"the study lists {what} {', '.join(dups)} more than once; pick each once")
    cap = len(ARCHS) * len(LEVELS)   # every (arch, level) of the registry once
    if len(archs) * len(levels) > cap:
        raise ConfigError(f"a study runs at most {cap} models, not {len(archs) * len(levels)}")
