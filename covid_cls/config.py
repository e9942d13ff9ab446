"""TrainConfig: one typed record of a training run, saved inside every checkpoint."""

from __future__ import annotations

from dataclasses import Field, asdict, dataclass, field, fields
from typing import Any

from .errors import ConfigError

OPTIMIZERS = ("sgd", "adam", "adamw")
SCHEDULES = ("none", "cosine", "onecycle")
LOSSES = ("ce", "weighted_ce", "focal")
DEVICES = ("auto", "cpu", "cuda")
PRECISIONS = ("auto", "fp32", "bf16")
WEIGHTS = ("auto", "imagenet", "none")   # or a path to a torchvision state_dict
THRESHOLD_RULES = ("youden", "sensitivity", "argmax")
RECIPE_NAMES = ("custom", "seed", "robust")


def _registry(name: str):
    """Choices that live in the model registry, read when first asked for (``models`` imports torch)."""

    def choices() -> tuple[str, ...]:
        from . import models

        return tuple(getattr(models, name))

    return choices


def _opt(default: Any, help: str, **meta: Any) -> Any:
    """A TrainConfig field with its help text; the CLI flags and the app's options are generated from these.

    ``label``: short name in the app; ``choices``: a tuple (or a callable returning one); ``suggest``:
    values offered in the app where the CLI also takes others; ``flag``: CLI flag when it is not
    ``--field-name``; ``required``: the CLI needs it.
    """
    return field(default=default, metadata={"help": help, **meta})


def choices_of(f: Field) -> tuple[str, ...] | None:
    """The allowed values of an option (``metadata["choices"]``), or None when any value goes."""
    c = f.metadata.get("choices")
    return tuple(c()) if callable(c) else c


@dataclass
class TrainConfig:
    """Defaults follow the 2020 recipe (SGD, lr 1e-3, momentum 0.9, 10 epochs).

    ``batch_size=0`` means "suit the device": 64 on CUDA, 16 on the CPU.
    """

    data_dir: str = _opt("", "dataset folder: train/ validation/ test/ x infected/ normal/", flag="--data",
                         required=True)
    arch: str = _opt("resnet18", "architecture", label="Architecture", choices=_registry("ARCHS"))
    level: str = _opt("fc", "fine-tuning level: how much of the backbone is trained (see README)", label="Level",
                      choices=_registry("LEVELS"))
    epochs: int = _opt(10, "training epochs", label="Epochs")
    lr: float = _opt(1e-3, "learning rate", label="Learning rate")
    momentum: float = _opt(0.9, "SGD momentum", label="Momentum")
    weight_decay: float = _opt(0.0, "weight decay", label="Weight decay")
    batch_size: int = _opt(0, "0 = suit the device (64 CUDA, 16 CPU)", label="Batch size (0 = auto)")
    optimizer: str = _opt("sgd", "optimizer", label="Optimizer", choices=OPTIMIZERS)
    schedule: str = _opt("none", "learning-rate schedule", label="Schedule", choices=SCHEDULES)
    loss: str = _opt("ce", "loss: cross-entropy, class-weighted cross-entropy or focal", label="Loss",
                     choices=LOSSES)
    focal_gamma: float = _opt(2.0, "focal loss gamma", label="Focal gamma")
    focal_alpha: float = _opt(0.25, "focal loss alpha", label="Focal alpha")
    weights: str = _opt("auto", "auto | imagenet | none | path to a torchvision state_dict", label="Weights",
                        suggest=WEIGHTS)
    image_size: int = _opt(224, "input side in pixels", label="Image size")
    cache_size: int = _opt(256, "decoded images are kept as uint8 squares of this side", label="Cache size")
    augment: bool = _opt(True, "augmentation: rotation, random resized crop, horizontal flip",
                         label="Augmentation (rotation ±30°, random resized crop, flip)")
    crop_scale: tuple[float, float] = _opt((0.5, 1.0), "random resized crop: area range (min max)",
                                           label="Crop scale")
    rotation: float = _opt(30.0, "augmentation: largest rotation in degrees", label="Rotation")
    feature_cache: bool = _opt(True, "level fc: train the head on cached backbone features",
                               label="Feature cache")
    seed: int = _opt(0, "random seed", label="Seed")
    device: str = _opt("auto", "where to train", label="Device", choices=DEVICES)
    precision: str = _opt("auto", "auto = bf16 autocast on CUDA and on CPUs with native bf16 (AVX512-BF16/AMX), "
                                  "else fp32", label="Precision", choices=PRECISIONS)
    out_dir: str = _opt("checkpoints", "where checkpoints are written", flag="--out")
    num_workers: int = _opt(0, "decode threads (0 = all cores)", flag="--workers")
    hidden: int = _opt(4300, "units of the new head's hidden layer", label="Head width")
    dropout: float = _opt(0.5, "dropout in the new head", label="Dropout")
    log_every: int = _opt(10, "emit a step event every N steps")
    # --- what the 2020 recipe lacked (see RECIPES and README "Does it generalise?") ---
    intensity_aug: float = _opt(0.0, "augmentation: strength of random gamma/contrast/brightness (0 = off, 1 = "
                                     "strong)", label="Intensity augmentation")
    blur_noise: float = _opt(0.0, "augmentation: probability of a random blur or noise", label="Blur/noise")
    erase_corners: float = _opt(0.0, "augmentation: probability of blanking a corner patch (where text markers "
                                     "sit)", label="Erase corners")
    warmup_epochs: float = _opt(0.0, "linear learning-rate warm-up before the schedule, in epochs",
                                label="Warm-up epochs")
    patience: int = _opt(0, "early stopping: stop after this many epochs without a better validation AUC "
                            "(0 = off)", label="Early-stop patience")
    threshold_rule: str = _opt("youden", "decision threshold on P(infected), chosen on validation: youden "
                                         "(max sensitivity + specificity), sensitivity (reach "
                                         "--target-sensitivity) or argmax (0.5)", label="Threshold",
                               choices=THRESHOLD_RULES)
    target_sensitivity: float = _opt(0.9, "the sensitivity the 'sensitivity' threshold rule aims for",
                                     label="Target sensitivity")
    recipe: str = _opt("custom", "where the settings came from: a name in RECIPES (set by "
                                 "TrainConfig.from_recipe / --recipe) or custom", choices=RECIPE_NAMES)

    def __post_init__(self) -> None:
        from .models import check_level, get_spec

        get_spec(self.arch)
        check_level(self.level)
        for name, allowed in (("optimizer", OPTIMIZERS), ("schedule", SCHEDULES), ("loss", LOSSES),
                              ("device", DEVICES), ("precision", PRECISIONS),
                              ("threshold_rule", THRESHOLD_RULES), ("recipe", RECIPE_NAMES)):
            if getattr(self, name) not in allowed:
                raise ConfigError(f"unknown {name} {getattr(self, name)!r}; choose one of: {', '.join(allowed)}")
        if self.epochs < 1:
            raise ConfigError("epochs must be at least 1")
        if not (0 < self.lr < 10):
            raise ConfigError(f"lr must be in (0, 10), got {self.lr}")
        if self.image_size < 32 or self.cache_size < self.image_size // 2:
            raise ConfigError("image_size must be >= 32 and cache_size >= image_size / 2")
        for name in ("intensity_aug", "blur_noise", "erase_corners", "target_sensitivity"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ConfigError(f"{name} must be between 0 and 1, got {getattr(self, name)}")
        if self.patience < 0 or self.warmup_epochs < 0:
            raise ConfigError("patience and warmup_epochs must not be negative")
        self.crop_scale = tuple(float(v) for v in self.crop_scale)  # JSON gives lists back

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["crop_scale"] = list(self.crop_scale)
        return d

    @classmethod
    def from_recipe(cls, recipe: str, **overrides: Any) -> TrainConfig:
        """A named recipe's settings, then ``overrides`` (what the user set explicitly) on top."""
        if recipe not in RECIPES:
            raise ConfigError(f"unknown recipe {recipe!r}; choose one of: {', '.join(RECIPES)}")
        return cls(**{**RECIPES[recipe], **overrides, "recipe": recipe})

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainConfig:
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})


# Named recipes: only what differs from TrainConfig's field defaults.
RECIPES: dict[str, dict[str, Any]] = {
    # The 2020 course notebook: SGD lr 1e-3 momentum 0.9, 10 epochs, no schedule, plain cross-entropy,
    # rotation + random resized crop + flip, the label of the larger probability.
    "seed": {"optimizer": "sgd", "lr": 1e-3, "momentum": 0.9, "weight_decay": 0.0, "epochs": 10,
             "schedule": "none", "loss": "ce", "intensity_aug": 0.0, "blur_noise": 0.0, "erase_corners": 0.0,
             "warmup_epochs": 0.0, "patience": 0, "threshold_rule": "argmax"},
    # Aimed at generalisation to other hospitals (measured in README "Does it generalise?").
    "robust": {"optimizer": "adamw", "lr": 1e-3, "weight_decay": 0.05, "epochs": 30, "schedule": "cosine",
               "warmup_epochs": 1.0, "patience": 8, "loss": "weighted_ce", "intensity_aug": 0.8,
               "blur_noise": 0.5, "erase_corners": 0.5, "threshold_rule": "youden"},
}
RECIPES["custom"] = {}


def default_batch_size(device: str) -> int:
    return 64 if device.startswith("cuda") else 16


__all__ = ["TrainConfig", "RECIPES", "THRESHOLD_RULES", "OPTIMIZERS", "SCHEDULES", "LOSSES", "DEVICES",
           "PRECISIONS", "WEIGHTS", "choices_of", "default_batch_size"]
