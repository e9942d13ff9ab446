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
import weakref
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


# --- ZeroGPU (issue 12 #2) ------------------------------------------------------------------------------
# How long one prediction may hold the GPU. Measured (README "Performance", 2-core CPU): Predictor.predict
# 32 ms (ResNet18) / 130 ms (VGG16) warm; the first call of a process, which loads the model, 3.4-4.3 s
# (ResNet18, torch import included). A fresh ZeroGPU worker also initialises CUDA and may load VGG16
# (~0.5 GB), so 15 s is ~3.5x the measured cold call and ~100x a warm VGG16 call: enough headroom without
# asking for the default 60 s (a shorter request gets a better queue place and passes the visitor's quota
# check sooner). COVID_CLS_GPU_SECONDS overrides it.
PREDICT_GPU_SECONDS = int(os.environ.get("COVID_CLS_GPU_SECONDS", "15"))
# ZeroGPU runs the decorated function in a forked worker and pickles its arguments and result: the Predictor
# (locks, loaded models) must not travel. Calls pass the Services' key and checkpoint folder; the worker finds
# the predictor registered under the key (inherited through the fork) or keeps its own for that folder.
_PREDICTORS: weakref.WeakValueDictionary[str, Predictor] = weakref.WeakValueDictionary()
_OWN_PREDICTORS: dict[str, Predictor] = {}


def _device_predictor(key: str, folder: str) -> Predictor:
    found = _PREDICTORS.get(key) or _OWN_PREDICTORS.get(folder)
    if found is None:
        from ..predictor import Predictor

        found = _OWN_PREDICTORS.setdefault(folder, Predictor(folder))
    return found


def _predict_call(key: str, folder: str, image: Any, arch: str, level: str, checkpoint: str | None,
                  explain_class: str | None = None) -> Prediction:
    return _device_predictor(key, folder).predict(image, arch=arch, level=level, checkpoint=checkpoint,
                                                  explain_class=explain_class)


_predict_on_device = gpu(duration=PREDICT_GPU_SECONDS)(_predict_call)


def _predict_batch_call(key: str, folder: str, images: list, arch: str, level: str,
                        checkpoint: str | None) -> list:
    """One chunk of a batch (issue 12 #3): one forward + Grad-CAM backward for all of ``images``."""
    return _device_predictor(key, folder).predict_batch(images, arch=arch, level=level, checkpoint=checkpoint,
                                                        batch_size=max(1, len(images)))


# a chunk of 16 images: ~16 x 130 ms (VGG16, CPU) + decoding, well inside the same GPU request as one image
_predict_batch_on_device = gpu(duration=PREDICT_GPU_SECONDS)(_predict_batch_call)


@dataclass
class Settings:
    checkpoints: Path
    runs: Path
    training: bool = True
    max_upload: int = MAX_BYTES   # COVID_CLS_MAX_UPLOAD_MB
    roots_env: str = ""           # COVID_CLS_DATA_ROOTS
    hub_models: str = ""     # COVID_CLS_HUB_MODELS: Hub repos / snapshot folders pulled at start-up (issue 12)
    mcp: bool = False        # COVID_CLS_MCP=1: launch with Gradio's MCP server (issue 12)
    # COVID_CLS_MAX_SESSIONS: sessions whose state Gradio keeps (~0.15 MB of component config each, plus their
    # gr.State values); API sessions never close, so the oldest go beyond this (Gradio's default: 10,000)
    max_sessions: int = 1000
    # COVID_CLS_STUDY_DEVICES: where a Study's runs go ("0,1,2,3": one process per GPU, in parallel; "cpu,cpu";
    # "none": one after another). Empty: every GPU when the server sees more than one (issue 13 #2)
    study_devices_env: str = ""

    def study_devices(self) -> list[str]:
        """The devices a Study spreads its runs over; [] = one run after another in the training worker."""
        from ..distributed import parse_devices

        spec = self.study_devices_env.strip()
        if spec.lower() == "none":
            return []
        if not spec:
            import torch

            n = torch.cuda.device_count()   # 0 without CUDA; no CUDA context is made for asking
            return [f"cuda:{i}" for i in range(n)] if n > 1 else []
        return parse_devices(spec)

    @classmethod
    def from_env(cls) -> Settings:
        # Spaces' persistent storage (/data) when attached; the variables still win (issue 12 #2)
        from ..fsio import persistent_dir

        base = persistent_dir()
        return cls(checkpoints=Path(os.environ.get("COVID_CLS_CHECKPOINTS") or (base or Path()) / "checkpoints"),
                   runs=Path(os.environ.get("COVID_CLS_RUNS") or (base or Path()) / "runs"),
                   training=os.environ.get("COVID_CLS_TRAINING", "1") != "0",
                   max_upload=int(float(os.environ.get("COVID_CLS_MAX_UPLOAD_MB", MAX_BYTES / 2**20)) * 2**20),
                   roots_env=os.environ.get("COVID_CLS_DATA_ROOTS", ""),
                   hub_models=os.environ.get("COVID_CLS_HUB_MODELS", ""),
                   mcp=os.environ.get("COVID_CLS_MCP", "0") not in ("", "0"),
                   max_sessions=int(os.environ.get("COVID_CLS_MAX_SESSIONS", "1000")),
                   study_devices_env=os.environ.get("COVID_CLS_STUDY_DEVICES", ""))

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

    def model_card(self, arch: str, level: str, checkpoint: str | None = None) -> Card | None:
        """The card of the model Predict would use: the named checkpoint, else the best for (arch, level);
        None when there is none (or the names are not known)."""
        from ..checkpoints import ranked_checkpoints, read_card
        from ..models import ARCHS, LEVELS

        if checkpoint:
            return self.card(checkpoint)
        if arch not in ARCHS or level not in LEVELS:
            return None
        # the Predictor's choice (``Predictor.candidates``) without making a Predictor: a page load stays light
        ranked = ranked_checkpoints(self.settings.checkpoints, arch, level)
        return read_card(ranked[0]) if ranked else None

    def predict(self, image: Any, arch: str, level: str, checkpoint: str | None = None,
                explain_class: str | None = None) -> Prediction:
        """Predict with the named checkpoint (a name in the checkpoint folder) or the best for the pair; the
        Grad-CAM map explains ``explain_class`` (default: the predicted class)."""
        path = str(self.checkpoint_path(checkpoint)) if checkpoint else None
        key = f"services-{id(self)}"
        _PREDICTORS[key] = self.predictor   # what a ZeroGPU worker forked from here finds (see _predict_call)
        try:
            return _predict_on_device(key, str(self.settings.checkpoints), image, arch, level, path, explain_class)
        finally:
            trim_memory_soon()   # large transient buffers back to the OS once this request is over (#2)

    def predict_batch(self, images: list, arch: str, level: str, checkpoint: str | None = None) -> list:
        """``Predictor.predict_batch`` for one chunk of a batch (paths), on the device like ``predict``."""
        path = str(self.checkpoint_path(checkpoint)) if checkpoint else None
        key = f"services-{id(self)}"
        _PREDICTORS[key] = self.predictor
        try:
            return _predict_batch_on_device(key, str(self.settings.checkpoints), images, arch, level, path)
        finally:
            trim_memory_soon()

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


_trim = {"timer": None, "lock": threading.Lock()}


def trim_memory_soon(delay_s: float = 2.0) -> None:
    """Give the memory of the requests of the last ``delay_s`` seconds back to the OS (glibc ``malloc_trim``).

    A prediction on a 58-megapixel upload allocates a few hundred MB for a moment (the decoded image, a map
    at its size) in one of Gradio's worker threads; glibc keeps such freed memory in that thread's arena, and
    the server's RSS crept up by ~14 MB per call (issue 11 #2: +712 MB over 50 calls). One trim, shortly after
    the request has ended and its buffers are free, returns it. At most one pending; a no-op without glibc."""
    with _trim["lock"]:
        if _trim["timer"] is not None:
            return
        timer = threading.Timer(delay_s, _malloc_trim)
        timer.daemon = True
        _trim["timer"] = timer
    timer.start()


def _malloc_trim() -> None:
    with _trim["lock"]:
        _trim["timer"] = None
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


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
