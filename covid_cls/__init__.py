"""covid_cls — a chest X-ray fine-tuning lab (research demo, not a diagnostic tool).

The public API is re-exported here lazily (PEP 562), so ``import covid_cls`` is cheap and heavy
libraries (torch, torchvision) load only when a name that needs them is first used.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

_EXPORTS = {
    # errors: one root, every library error derives from it
    "CovidClsError": "errors", "ConfigError": "errors", "ImageError": "errors", "DatasetError": "errors",
    "CheckpointError": "errors", "NoCheckpointError": "errors", "WeightsUnavailable": "errors",
    "TrainingError": "errors", "TrainingStopped": "errors",
    # models and their records
    "ARCHS": "models", "LEVELS": "models", "build_model": "models", "apply_level": "models",
    "FineTuneNet": "models", "Card": "card", "TrainConfig": "config",
    # images and data
    "load_image": "imaging", "scan_dataset": "data", "DecodedCache": "data", "CLASSES": "data",
    "make_demo_dataset": "synthetic",
    # training and evaluation
    "fit": "engine", "evaluate_checkpoint": "engine", "Runtime": "runtime",
    # checkpoints
    "save_checkpoint": "checkpoints", "load_checkpoint": "checkpoints", "list_checkpoints": "checkpoints",
    "best_checkpoint": "checkpoints", "delete_checkpoint": "checkpoints", "load_model": "checkpoints",
    "Checkpoint": "checkpoints", "migrate_checkpoint": "checkpoints",
    # prediction
    "Predictor": "predictor", "Prediction": "predictor", "DISCLAIMER": "predictor", "UNCERTAIN": "predictor",
    "CamExplainer": "explain",
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
