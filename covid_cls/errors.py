"""Every error covid_cls raises on purpose, under one root.

Front-ends catch ``CovidClsError`` once (the CLI prints its message, the app shows it as a toast) instead
of listing a dozen types that drift apart. Each class also derives from the builtin a caller would have
caught before (``ValueError`` for bad input, ``RuntimeError`` for a run that cannot go on), so
``except ValueError`` code keeps working.
"""

from __future__ import annotations


class CovidClsError(Exception):
    """Root of every covid_cls error; its message is written for the person who triggered it."""


class ConfigError(CovidClsError, ValueError):
    """A setting is unknown or out of range (unknown arch, level, optimizer, ...)."""


class ImageError(CovidClsError, ValueError):
    """An upload cannot be decoded or is refused (too big, a bomb, not an image)."""


class DatasetError(CovidClsError, ValueError):
    """A dataset folder is missing splits or classes, or holds no usable images."""


class UnsafePath(CovidClsError, ValueError):
    """A path leaves its allowed root, or an archive entry would."""


class UploadTooLarge(CovidClsError, ValueError):
    """An upload is over the size limit."""


class CheckpointError(CovidClsError, ValueError):
    """A checkpoint file is unsafe, corrupt, inconsistent or not one of ours."""


class NoCheckpointError(CovidClsError, LookupError):
    """No trained model exists for the requested (arch, level)."""


class WeightsUnavailable(CovidClsError, RuntimeError):
    """Pretrained weights were asked for explicitly and cannot be had."""


class TrainingError(CovidClsError, RuntimeError):
    """Training cannot go on (NaN loss, degenerate data, ...); the message says why and what to try."""


class TrainingStopped(CovidClsError):
    """The run was stopped on request; nothing was saved."""


class JobBusy(CovidClsError, RuntimeError):
    """A training run is already in progress (one at a time)."""


__all__ = ["CovidClsError", "ConfigError", "ImageError", "DatasetError", "UnsafePath", "UploadTooLarge",
           "CheckpointError", "NoCheckpointError", "WeightsUnavailable", "TrainingError", "TrainingStopped",
           "JobBusy"]
