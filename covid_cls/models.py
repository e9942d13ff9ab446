"""The architecture registry: the ONLY place that knows per-architecture facts.

Everything else (training, Grad-CAM, the UI) asks ``ARCHS[name]`` for the head slot, the modules a
fine-tuning level trains, the feature extractor and the Grad-CAM target layer.

The new head is ``in_features -> hidden (4300) -> num_classes`` with ReLU + dropout in between. The 2020
notebook defined a second Linear layer but never called it in ``forward`` and had no non-linearity, so
its "two-layer head" was really a single Linear; here both layers are in the forward path and the
non-linearity makes the hidden layer worth its 2.2 M (ResNet18) / 17.6 M (VGG16) parameters.
"""

from __future__ import annotations

import logging
import os
import socket
import types
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from torch import nn

log = logging.getLogger(__name__)

LEVELS: tuple[str, ...] = ("fc", "partial", "full")
HIDDEN = 4300


@dataclass(frozen=True)
class ArchSpec:
    """Facts about one backbone. Module paths are dotted names for ``model.get_submodule``."""

    name: str
    title: str
    builder: str                 # torchvision.models function name
    weights_enum: str            # torchvision Weights enum name (its DEFAULT is used for "imagenet")
    head_path: str               # where torchvision's last Linear sits; our head replaces it
    in_features: int             # what that Linear received
    # Dotted module names trained at each level besides the head (``full`` trains everything).
    level_modules: dict[str, tuple[str, ...]] = field(default_factory=dict)
    cam_target: str = ""         # Grad-CAM target layer
    cam_grad_from: str = ""      # lowest module that must keep requires_grad for a fast Grad-CAM
    features: Callable[[nn.Module, torch.Tensor], torch.Tensor] | None = None


def _resnet_features(m: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Everything in torchvision's ResNet.forward except the last Linear: (N,3,H,W) -> (N,512)."""
    x = m.maxpool(m.relu(m.bn1(m.conv1(x))))
    x = m.layer4(m.layer3(m.layer2(m.layer1(x))))
    return torch.flatten(m.avgpool(x), 1)


def _vgg_features(m: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """VGG up to the input of classifier[6] (our head): (N,3,H,W) -> (N,4096)."""
    x = torch.flatten(m.avgpool(m.features(x)), 1)
    return m.classifier[:6](x)


ARCHS: dict[str, ArchSpec] = {
    "resnet18": ArchSpec(
        name="resnet18", title="ResNet18", builder="resnet18", weights_enum="ResNet18_Weights",
        head_path="fc", in_features=512,
        level_modules={"fc": (), "partial": ("layer4",)},
        cam_target="layer4.1", cam_grad_from="layer4.1",
        features=_resnet_features,
    ),
    "vgg16": ArchSpec(
        name="vgg16", title="VGG16", builder="vgg16", weights_enum="VGG16_Weights",
        head_path="classifier.6", in_features=4096,
        # features[24:] is the last conv block (conv-relu x3 + maxpool); partial also trains the
        # pretrained classifier layers, fc freezes them (only our head learns).
        level_modules={"fc": (), "partial": tuple(f"features.{i}" for i in range(24, 31)) + ("classifier",)},
        # The last conv block's output before pooling (ReLU, 14x14 at 224 px). The ReLU has no
        # parameters, so for the fast Grad-CAM the conv feeding it must keep requires_grad.
        cam_target="features.29", cam_grad_from="features.28",
        features=_vgg_features,
    ),
}


def get_spec(arch: str) -> ArchSpec:
    if arch not in ARCHS:
        raise ValueError(f"unknown architecture {arch!r}; choose one of: {', '.join(ARCHS)}")
    return ARCHS[arch]


def check_level(level: str) -> str:
    if level not in LEVELS:
        raise ValueError(f"unknown fine-tuning level {level!r}; choose one of: {', '.join(LEVELS)}")
    return level


def make_head(in_features: int, hidden: int = HIDDEN, num_classes: int = 2, dropout: float = 0.5) -> nn.Sequential:
    return nn.Sequential(
        nn.Linear(in_features, hidden),
        nn.ReLU(inplace=True),
        nn.Dropout(dropout),
        nn.Linear(hidden, num_classes),
    )


def get_head(model: nn.Module, arch: str) -> nn.Module:
    return model.get_submodule(get_spec(arch).head_path)


def _set_submodule(model: nn.Module, path: str, module: nn.Module) -> None:
    parent, _, name = path.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, name, module)


# ---------------------------------------------------------------------------------------------------
# Pretrained weights
# ---------------------------------------------------------------------------------------------------

class WeightsUnavailable(RuntimeError):
    """ImageNet weights were asked for explicitly and cannot be had."""


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


def _imagenet_state_dict(spec: ArchSpec, download: bool) -> dict:
    cached = _cached_weights_file(spec)
    if cached.is_file():
        return torch.load(cached, map_location="cpu", weights_only=True)
    if not download:
        raise WeightsUnavailable(f"{cached.name} is not cached")
    return _weights(spec).get_state_dict(progress=False)


def _resolve_weights(spec: ArchSpec, weights: str | os.PathLike) -> tuple[dict | None, str, str]:
    """Return (backbone state_dict or None, origin, note). origin: imagenet | scratch | file."""
    w = os.fspath(weights)
    if w == "none":
        return None, "scratch", "trained from scratch (weights='none')"
    if w in ("imagenet", "auto"):
        try:
            sd = _imagenet_state_dict(spec, download=(w == "imagenet") or _can_download())
            return sd, "imagenet", f"ImageNet ({_weights(spec)})"
        except Exception as exc:  # noqa: BLE001 - any failure to fetch means "not available"
            hint = (f"put {_cached_weights_file(spec).name} into {_cached_weights_file(spec).parent} "
                    "(TORCH_HOME) or use weights='none'")
            if w == "imagenet":
                raise WeightsUnavailable(
                    f"ImageNet weights for {spec.title} could not be loaded ({exc}); {hint}") from exc
            note = (f"ImageNet weights for {spec.title} are not available here (offline?); "
                    f"TRAINED FROM SCRATCH. To fine-tune from ImageNet, {hint}.")
            warnings.warn(note, RuntimeWarning, stacklevel=3)
            return None, "scratch", note
    path = Path(w)
    if not path.is_file():
        raise ValueError(f"weights must be 'auto', 'imagenet', 'none' or a state_dict file; {w!r} is none of these")
    sd = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(sd, dict) and "state_dict" in sd:
        sd = sd["state_dict"]
    return sd, "file", f"weights from {path.name}"


# ---------------------------------------------------------------------------------------------------
# Building and freezing
# ---------------------------------------------------------------------------------------------------

def _train_keeping_frozen(self: nn.Module, mode: bool = True) -> nn.Module:
    """``model.train()`` that leaves the frozen part in eval mode.

    Frozen BatchNorm layers must not update their running statistics and frozen dropout must not
    fire: the frozen part is then a fixed function, which is what "frozen" promises (and what makes
    the level-fc feature cache exact).
    """
    nn.Module.train(self, False)
    if mode:
        for name in self._trainable_roots:
            nn.Module.train(self.get_submodule(name) if name else self, True)
    return self


def trainable_roots(arch: str, level: str) -> tuple[str, ...]:
    """Dotted names of the modules trained at ``level`` ("" = the whole model)."""
    spec, level = get_spec(arch), check_level(level)
    if level == "full":
        return ("",)
    return spec.level_modules[level] + (spec.head_path,)


def apply_level(model: nn.Module, arch: str, level: str) -> nn.Module:
    """Freeze everything the level does not train, for real (requires_grad False + eval mode)."""
    roots = trainable_roots(arch, level)
    model.requires_grad_(False)
    for name in roots:
        (model.get_submodule(name) if name else model).requires_grad_(True)
    model._trainable_roots = roots
    model.train = types.MethodType(_train_keeping_frozen, model)
    model.train(model.training)
    return model


def build_model(arch: str, level: str, *, weights: str | os.PathLike = "auto", num_classes: int = 2,
                hidden: int = HIDDEN, dropout: float = 0.5) -> nn.Module:
    """A torchvision backbone (pretrained weights loaded first) with its last Linear replaced by our head.

    ``model.covid_meta`` records arch, level and where the weights came from ("imagenet",
    "scratch" or "file") with a human note; checkpoints carry it into their card.
    """
    import torchvision.models as tvm

    spec, level = get_spec(arch), check_level(level)
    state, origin, note = _resolve_weights(spec, weights)
    model = getattr(tvm, spec.builder)(weights=None)
    if state is not None:
        model.load_state_dict(state)  # the original 1000-class head first, then we swap it
    _set_submodule(model, spec.head_path, make_head(spec.in_features, hidden, num_classes, dropout))
    model.covid_meta = {"arch": arch, "level": level, "weights_origin": origin, "weights_note": note,
                        "hidden": hidden, "num_classes": num_classes}
    return apply_level(model, arch, level)


def count_params(model: nn.Module) -> dict[str, int]:
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return {"total": total, "trainable": trainable}


def prepare_for_cam(model: nn.Module, arch: str) -> nn.Module:
    """Make an inference model cheap for Grad-CAM: only the target layer keeps requires_grad.

    pytorch-grad-cam by default back-propagates into every parameter. The map needs only the gradient
    of the class score w.r.t. the target layer's output; that gradient still flows through the frozen
    layers above the target (they are in the graph because their input requires grad), and nothing
    below the target is traced at all. The target layer (or, for VGG16's parameter-free ReLU, the conv
    feeding it) keeps requires_grad so its output is part of the graph.
    """
    spec = get_spec(arch)
    model.requires_grad_(False)
    model.get_submodule(spec.cam_grad_from).requires_grad_(True)
    nn.Module.train(model, False)
    return model
