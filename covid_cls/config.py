"""TrainConfig: one typed record of a training run, saved inside every checkpoint."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any

OPTIMIZERS = ("sgd", "adam", "adamw")
SCHEDULES = ("none", "cosine", "onecycle")
LOSSES = ("ce", "weighted_ce", "focal")
DEVICES = ("auto", "cpu", "cuda")
PRECISIONS = ("auto", "fp32", "bf16")


@dataclass
class TrainConfig:
    """Defaults follow the 2020 recipe (SGD, lr 1e-3, momentum 0.9, 10 epochs).

    ``batch_size=0`` means "suit the device": 64 on CUDA, 16 on the CPU.
    """

    data_dir: str = ""
    arch: str = "resnet18"
    level: str = "fc"
    epochs: int = 10
    lr: float = 1e-3
    momentum: float = 0.9
    weight_decay: float = 0.0
    batch_size: int = 0
    optimizer: str = "sgd"
    schedule: str = "none"
    loss: str = "ce"
    focal_gamma: float = 2.0
    focal_alpha: float = 0.25
    weights: str = "auto"
    image_size: int = 224
    cache_size: int = 256            # decoded images are kept as uint8 squares of this side
    augment: bool = True
    crop_scale: tuple[float, float] = (0.5, 1.0)
    rotation: float = 30.0
    feature_cache: bool = True       # level fc: train the head on cached backbone features
    seed: int = 0
    device: str = "auto"
    precision: str = "auto"          # auto = bf16 autocast on CUDA and on CPUs with native bf16, else fp32
    out_dir: str = "checkpoints"
    num_workers: int = 0             # decode threads; 0 = all cores
    hidden: int = 4300
    dropout: float = 0.5
    log_every: int = 10              # emit a "step" event every N steps

    def __post_init__(self) -> None:
        from .models import check_level, get_spec

        get_spec(self.arch)
        check_level(self.level)
        for name, allowed in (("optimizer", OPTIMIZERS), ("schedule", SCHEDULES), ("loss", LOSSES),
                              ("device", DEVICES), ("precision", PRECISIONS)):
            if getattr(self, name) not in allowed:
                raise ValueError(f"unknown {name} {getattr(self, name)!r}; choose one of: {', '.join(allowed)}")
        if self.epochs < 1:
            raise ValueError("epochs must be at least 1")
        if not (0 < self.lr < 10):
            raise ValueError(f"lr must be in (0, 10), got {self.lr}")
        if self.image_size < 32 or self.cache_size < self.image_size // 2:
            raise ValueError("image_size must be >= 32 and cache_size >= image_size / 2")
        self.crop_scale = tuple(float(v) for v in self.crop_scale)  # JSON gives lists back

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["crop_scale"] = list(self.crop_scale)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "TrainConfig":
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})


def default_batch_size(device: str) -> int:
    return 64 if device.startswith("cuda") else 16


__all__ = ["TrainConfig", "OPTIMIZERS", "SCHEDULES", "LOSSES", "DEVICES", "PRECISIONS", "default_batch_size"]
