"""How a run computes: the device, bf16 autocast or fp32, and the conv memory format.

Kept apart from the training engine so that inference (the Predictor, the benchmarks) can import it
without pulling in training code.
"""

from __future__ import annotations

import functools
from contextlib import nullcontext
from dataclasses import dataclass, replace

import torch
from torch import nn

from .errors import ConfigError


def resolve_device(device: str = "auto") -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device 'cuda' was asked for but no CUDA GPU is available; use 'auto' or 'cpu'")
    return torch.device(device)


@functools.lru_cache(maxsize=1)
def cpu_has_native_bf16() -> bool:
    """True when the CPU executes bf16 dot products in hardware (AVX512-BF16 or AMX-BF16).

    Only then does oneDNN run bf16 convolutions fast: on a 2-core AMD EPYC with avx512_bf16, bf16 autocast +
    channels_last trains ResNet18 2.5x and VGG16 2.4x faster than fp32 (`bench/precision.py`). Without
    these instructions bf16 is emulated and much slower than fp32 (DESIGN.md saw 20-50x), so it stays off.
    """
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    return bool(flags & {"avx512_bf16", "amx_bf16"})
    except OSError:
        pass
    return False


@dataclass(frozen=True)
class Runtime:
    """How a run computes: the device, bf16 autocast or fp32, and the conv memory format.

    Decided once per run (``Runtime.create``) and used by every function that runs the model, so the
    training loop, evaluation, the feature pass and the benchmarks cannot disagree.
    """

    device: torch.device
    bf16: bool = False
    channels_last: bool = False

    @classmethod
    def create(cls, device: str | torch.device = "auto", precision: str = "auto") -> Runtime:
        dev = device if isinstance(device, torch.device) else resolve_device(device)
        if precision == "auto":
            bf16 = dev.type == "cuda" or (dev.type == "cpu" and cpu_has_native_bf16())
        elif precision in ("bf16", "fp32"):
            bf16 = precision == "bf16"
        else:
            raise ConfigError(f"unknown precision {precision!r}; choose one of: auto, fp32, bf16")
        # NHWC is oneDNN's and cuDNN's native conv layout (ResNet18 fp32 training on the CPU: 1.25x)
        nhwc = dev.type == "cuda" or (dev.type == "cpu" and torch.backends.mkldnn.is_available())
        if dev.type == "cuda":
            torch.backends.cudnn.benchmark = True    # fixed 224 px inputs: pick the fastest kernels once
        return cls(dev, bf16, nhwc)

    def autocast(self):
        return torch.autocast(self.device.type, dtype=torch.bfloat16) if self.bf16 else nullcontext()

    def model(self, model: nn.Module) -> nn.Module:
        model.to(self.device)
        return model.to(memory_format=torch.channels_last) if self.channels_last else model

    def input(self, x: torch.Tensor) -> torch.Tensor:
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last and x.dim() == 4 else x

    def for_head_only(self) -> Runtime:
        """The runtime for epochs that train only the head on cached features (level fc): fp32.

        The head alone is two matmuls on big weights, where bf16 autocast mostly adds a cast of the weights
        per step. Measured in fit on cxr-real (CPU, bench/fc_level.py): VGG16 10 head epochs 31 s in fp32
        vs 43 s in bf16; ResNet18 2.9 vs 1.9 s went the other way, but VGG16's head is the one that costs.
        """
        return replace(self, bf16=False)

    def describe(self) -> str:
        return f"{self.device} · {'bf16 autocast' if self.bf16 else 'fp32'}" + (
            " · channels_last" if self.channels_last else "")


__all__ = ["Runtime", "resolve_device", "cpu_has_native_bf16"]
