"""covid_cls — a chest X-ray fine-tuning lab (research demo, not a diagnostic tool).

The public API is re-exported here lazily (PEP 562), so ``import covid_cls`` is cheap and heavy
libraries (torch, torchvision) load only when a name that needs them is first used.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

_EXPORTS = {
    "ARCHS": "models", "LEVELS": "models", "build_model": "models", "apply_level": "models",
    "WeightsUnavailable": "models",
    "load_image": "imaging", "ImageError": "imaging",
    "TrainConfig": "config",
    "fit": "engine", "evaluate_checkpoint": "engine", "TrainingError": "engine", "TrainingStopped": "engine",
    "save_checkpoint": "checkpoints", "load_checkpoint": "checkpoints", "list_checkpoints": "checkpoints",
    "best_checkpoint": "checkpoints", "delete_checkpoint": "checkpoints", "CheckpointError": "checkpoints",
    "load_model": "checkpoints",
    "scan_dataset": "data", "DatasetError": "data", "DecodedCache": "data", "CLASSES": "data",
    "Predictor": "predictor", "Prediction": "predictor", "NoCheckpointError": "predictor",
    "DISCLAIMER": "predictor",
    "make_demo_dataset": "synthetic",
}

__all__ = sorted(_EXPORTS) + ["__version__"]


def __getattr__(name: str):
    if name in _EXPORTS:
        value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'covid_cls' has no attribute {name!r}")


def __dir__():
    return __all__
