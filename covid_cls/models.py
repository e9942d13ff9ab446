"""The architecture registry: the ONLY place that knows per-architecture facts.

Everything else (training, Grad-CAM, the UI) asks ``ARCHS[name]`` for the head slot, the modules a
fine-tuning level trains, the feature extractor and the Grad-CAM target layer.

The new head is ``in_features -> hidden (4300) -> num_classes`` with ReLU + dropout in between. The 2020
notebook defined a second Linear layer but never called it in ``forward`` and had no non-linearity, so
its "two-layer head" was really a single Linear; here both layers are in the forward path and the
non-linearity makes the hidden layer worth its 2.2 M (ResNet18) / 17.6 M (VGG16) parameters.
"""

from __future__ import annotations

import functools
import logging
import os
import socket
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from .errors import ConfigError, WeightsUnavailable

log = logging.getLogger(__name__)

LEVELS: tuple[str, ...] = ("fc", "partial", "full")
HIDDEN = 4300


@dataclass(frozen=True)
class ArchSpec:
    """Facts about one backbone. Module paths are dotted names inside the torchvision model."""

    name: str
    title: str
    builder: str                 # torchvision.models function name
    weights_enum: str            # torchvision Weights enum name (its DEFAULT is used for "imagenet")
    head_path: str               # where torchvision's last Linear sits; it becomes Identity, our head follows
    in_features: int             # what that Linear received (= what our head receives)
    # Dotted module names trained at each level besides the head (``full`` trains everything).
    level_modules: dict[str, tuple[str, ...]] = field(default_factory=dict)
    cam_target: str = ""         # Grad-CAM target layer (its output is explained)


ARCHS: dict[str, ArchSpec] = {
    "resnet18": ArchSpec(
        name="resnet18", title="ResNet18", builder="resnet18", weights_enum="ResNet18_Weights",
        head_path="fc", in_features=512,
        level_modules={"fc": (), "partial": ("layer4",)},
        cam_target="layer4.1",
    ),
    "vgg16": ArchSpec(
        name="vgg16", title="VGG16", builder="vgg16", weights_enum="VGG16_Weights",
        head_path="classifier.6", in_features=4096,
        # features[24:] is the last conv block (conv-relu x3 + maxpool); partial also trains the
        # pretrained classifier layers, fc freezes them (only our head learns).
        level_modules={"fc": (), "partial": tuple(f"features.{i}" for i in range(24, 31)) + ("classifier",)},
        # The last conv block's output before pooling (ReLU, 14x14 at 224 px).
        cam_target="features.29",
    ),
}


def get_spec(arch: str) -> ArchSpec:
    if arch not in ARCHS:
        raise ConfigError(f"unknown architecture {arch!r}; choose one of: {', '.join(ARCHS)}")
    return ARCHS[arch]


def check_level(level: str) -> str:
    if level not in LEVELS:
        raise ConfigError(f"unknown fine-tuning level {level!r}; choose one of: {', '.join(LEVELS)}")
    return level


def make_head(in_features: int, hidden: int = HIDDEN, num_classes: int = 2, dropout: float = 0.5) -> nn.Sequential:
    return nn.Sequential(
        nn.Linear(in_features, hidden),
        nn.ReLU(inplace=True),
        nn.Dropout(dropout),
        nn.Linear(hidden, num_classes),
    )


def _set_submodule(model: nn.Module, path: str, module: nn.Module) -> None:
    parent, _, name = path.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, name, module)


class FineTuneNet(nn.Module):
    """A torchvision backbone whose last Linear is ``Identity``, followed by our head.

    The backbone is torchvision's own module and runs torchvision's own ``forward`` (nothing re-implemented):
    with its classifier slot emptied it returns exactly what the old Linear received (ResNet18: the pooled
    512-vector; VGG16: the 4096-vector after ``classifier[:6]``). ``forward_features`` / ``forward_head``
    split the two halves the way timm's models do; level ``fc`` caches the first and trains the second.

    ``train()`` keeps the frozen part in eval mode: frozen BatchNorm must not update its running statistics
    and frozen dropout must not fire, so the frozen part is a fixed function (what "frozen" promises, and
    what makes the level-fc feature cache exact).
    """

    def __init__(self, spec: ArchSpec, level: str, backbone: nn.Module, head: nn.Module,
                 weights_origin: str = "scratch", weights_note: str = "",
                 base_weights: dict[str, str] | None = None):
        super().__init__()
        self.spec = spec
        self.backbone = backbone
        self.head = head
        self.weights_origin = weights_origin
        self.weights_note = weights_note
        self.base_weights = dict(base_weights or {})   # {name, file, sha256} of the public weights, or {}
        self.level = ""
        self.set_level(level)

    @property
    def arch(self) -> str:
        return self.spec.name

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.backbone(x)

    def forward_head(self, features: torch.Tensor) -> torch.Tensor:
        return self.head(features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x))

    @property
    def cam_layer(self) -> nn.Module:
        return self.backbone.get_submodule(self.spec.cam_target)

    @property
    def trainable_roots(self) -> tuple[str, ...]:
        """Dotted names (in this model) of the modules trained at this level ("" = the whole model)."""
        return trainable_roots(self.arch, self.level)

    def set_level(self, level: str) -> FineTuneNet:
        """Freeze everything ``level`` does not train, for real (requires_grad False + eval mode)."""
        self.level = check_level(level)
        self.requires_grad_(False)
        for name in self.trainable_roots:
            self.get_submodule(name).requires_grad_(True)
        return self.train(self.training)

    def train(self, mode: bool = True) -> FineTuneNet:
        super().train(False)
        if mode:
            for name in self.trainable_roots:
                nn.Module.train(self.get_submodule(name), True)
        self.training = mode
        return self

    def trained_state_dict(self) -> dict[str, torch.Tensor]:
        """The entries this level changes: parameters and buffers of the trainable modules (the rest of the
        state equals the base weights it was built from)."""
        roots = self.trainable_roots
        return {k: v for k, v in self.state_dict().items()
                if any(r == "" or k == r or k.startswith(r + ".") for r in roots)}


# ---------------------------------------------------------------------------------------------------
# Pretrained weights
# ---------------------------------------------------------------------------------------------------

def _weights(spec: ArchSpec):
    import torchvision.models as tvm

    return getattr(tvm, spec.weights_enum).DEFAULT


def _cached_weights_file(spec: ArchSpec) -> Path:
    url = _weights(spec).url
    return Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(url)


def _can_download(host: str = "download.pytorch.org", timeout: float = 3.0) -> bool:
    """A quick reachability probe so that ``weights='auto'`` never hangs on an offline machine."""
    if os.environ.get("COVID_CLS_OFFLINE", "") not in ("", "0"):
        return False
    try:
        with socket.create_connection((host, 443), timeout=timeout):
            return True
    except OSError:
        return False


@functools.lru_cache(maxsize=8)
def _file_sha256(path: str, size: int, mtime_ns: int) -> str:   # size/mtime: a changed file is re-hashed
    import hashlib

    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def file_sha256(path: str | os.PathLike) -> str:
    st = os.stat(path)
    return _file_sha256(os.fspath(path), st.st_size, st.st_mtime_ns)


def _imagenet_state_dict(spec: ArchSpec, download: bool) -> tuple[dict, Path]:
    cached = _cached_weights_file(spec)
    if not cached.is_file():
        if not download:
            raise WeightsUnavailable(f"{cached.name} is not cached")
        _weights(spec).get_state_dict(progress=False)   # torchvision downloads into the hub cache
    return torch.load(cached, map_location="cpu", weights_only=True), cached


def _resolve_weights(spec: ArchSpec, weights: str | os.PathLike) -> tuple[dict | None, str, str, dict[str, str]]:
    """Return (backbone state_dict or None, origin, note, base). origin: imagenet | scratch | file.

    ``base`` names the public weights a model started from and their file's SHA-256 ({} when there are
    none): a checkpoint of such a model may store only what its level trained and rebuild the rest.
    """
    w = os.fspath(weights)
    if w == "none":
        return None, "scratch", "trained from scratch (weights='none')", {}
    if w in ("imagenet", "auto"):
        try:
            sd, file = _imagenet_state_dict(spec, download=(w == "imagenet") or _can_download())
            base = {"name": f"{spec.weights_enum}.{_weights(spec).name}", "file": file.name,
                    "sha256": file_sha256(file)}
            return sd, "imagenet", f"ImageNet ({_weights(spec)})", base
        except Exception as exc:  # noqa: BLE001 - any failure to fetch means "not available"
            hint = (f"put {_cached_weights_file(spec).name} into {_cached_weights_file(spec).parent} "
                    "(TORCH_HOME) or use weights='none'")
            if w == "imagenet":
                raise WeightsUnavailable(
                    f"ImageNet weights for {spec.title} could not be loaded ({exc}); {hint}") from exc
            note = (f"ImageNet weights for {spec.title} are not available here (offline?); "
                    f"TRAINED FROM SCRATCH. To fine-tune from ImageNet, {hint}.")
            warnings.warn(note, RuntimeWarning, stacklevel=3)
            return None, "scratch", note, {}
    path = Path(w)
    if not path.is_file():
        raise ConfigError(f"weights must be 'auto', 'imagenet', 'none' or a state_dict file; {w!r} is none of these")
    sd = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(sd, dict) and "state_dict" in sd:
        sd = sd["state_dict"]
    return sd, "file", f"weights from {path.name}", {}


def load_base_weights(arch: str, base: dict[str, str]) -> dict:
    """The public weights a checkpoint's frozen part comes from, verified against the SHA-256 its card
    recorded. Raises WeightsUnavailable (with where to put the file) when they cannot be had."""
    spec = get_spec(arch)
    expected = f"{spec.weights_enum}.{_weights(spec).name}"
    if base.get("name") != expected:
        raise WeightsUnavailable(f"this checkpoint was built on {base.get('name')!r}; this torchvision "
                                 f"provides {expected!r}")
    file = _cached_weights_file(spec)
    if not file.is_file():
        _imagenet_state_dict(spec, download=_can_download())   # raises with where to put the file
    if file_sha256(file) != base.get("sha256"):
        raise WeightsUnavailable(f"{file} is not the file this checkpoint was trained from (SHA-256 differs)")
    return torch.load(file, map_location="cpu", weights_only=True)


# ---------------------------------------------------------------------------------------------------
# Building and freezing
# ---------------------------------------------------------------------------------------------------

def trainable_roots(arch: str, level: str) -> tuple[str, ...]:
    """Dotted names of the modules trained at ``level`` in a ``FineTuneNet`` ("" = the whole model)."""
    spec, level = get_spec(arch), check_level(level)
    if level == "full":
        return ("",)
    return tuple(f"backbone.{m}" for m in spec.level_modules[level]) + ("head",)


def apply_level(model: FineTuneNet, arch: str, level: str) -> FineTuneNet:
    """Freeze everything the level does not train (kept for callers of the first API; see ``set_level``)."""
    if model.arch != arch:
        raise ConfigError(f"this model is a {model.arch}, not a {arch}")
    return model.set_level(level)


def build_model(arch: str, level: str, *, weights: str | os.PathLike = "auto", num_classes: int = 2,
                hidden: int = HIDDEN, dropout: float = 0.5) -> FineTuneNet:
    """A torchvision backbone (pretrained weights loaded first) with its last Linear replaced by our head.

    ``model.weights_origin`` is "imagenet", "scratch" or "file", ``model.weights_note`` a human note and
    ``model.base_weights`` the name and SHA-256 of the public weights file it started from (if any);
    checkpoints carry them into their card.
    """
    import torchvision.models as tvm

    spec, level = get_spec(arch), check_level(level)
    state, origin, note, base = _resolve_weights(spec, weights)
    backbone = getattr(tvm, spec.builder)(weights=None)
    if state is not None:
        backbone.load_state_dict(state)  # the original 1000-class head first, then we remove it
    _set_submodule(backbone, spec.head_path, nn.Identity())
    model = FineTuneNet(spec, level, backbone, make_head(spec.in_features, hidden, num_classes, dropout),
                        weights_origin=origin, weights_note=note, base_weights=base)
    return model


def count_params(model: nn.Module) -> dict[str, int]:
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return {"total": total, "trainable": trainable}


def legacy_state_key(arch: str, key: str) -> str:
    """Map a format-1 state_dict key (the whole torchvision model with our head in its Linear slot) to the
    ``FineTuneNet`` key: ``fc.0.weight`` -> ``head.0.weight``, ``layer1...`` -> ``backbone.layer1...``."""
    head = get_spec(arch).head_path + "."
    return "head." + key[len(head):] if key.startswith(head) else "backbone." + key
