"""Grad-CAM through pytorch-grad-cam, made cheap and thread-safe, plus the heatmap overlay.

pytorch-grad-cam registers forward hooks on the target layer and keeps the last activations and
gradients on the GradCAM object: that is shared mutable state, so each loaded model gets ONE GradCAM
object used under ONE lock (two concurrent requests on the same model would otherwise mix their maps).
"""

from __future__ import annotations

import threading

import numpy as np
import torch
from PIL import Image
from torch import nn

from .models import get_spec, prepare_for_cam


def _gradcam_cls():
    from pytorch_grad_cam import GradCAM
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    return GradCAM, ClassifierOutputTarget


class CamExplainer:
    """Prediction + Grad-CAM for one model in one forward and one short backward.

    ``fast=True`` (default) freezes every parameter except the target layer's own (see
    ``models.prepare_for_cam``): the backward then stops at the target layer instead of running into
    every weight of the network, and the map is the same.
    """

    def __init__(self, model: nn.Module, arch: str, fast: bool = True):
        GradCAM, self._Target = _gradcam_cls()
        if fast:
            prepare_for_cam(model, arch)
        self.model = model.eval()
        self.arch = arch
        self.target = model.get_submodule(get_spec(arch).cam_target)
        self.cam = GradCAM(model=model, target_layers=[self.target])
        self.lock = threading.Lock()

    def __call__(self, x: torch.Tensor, target_class: int | None = None, return_pooled: bool = False):
        """x: (1,3,S,S) on the model's device -> (logits (1,C) on CPU, cam (S,S) float32 in [0,1]).

        The map explains ``target_class``, by default the predicted class. With ``return_pooled`` also
        the target layer's output averaged over space (1, C) — the OOD check's feature, for free.
        """
        with self.lock, torch.enable_grad():
            targets = None if target_class is None else [self._Target(target_class)]
            cam = self.cam(input_tensor=x, targets=targets)
            logits = self.cam.outputs.detach().float().cpu()
            pooled = self.cam.activations_and_grads.activations[0].float().mean(dim=(2, 3)).cpu()
            # drop references to the graph (kept by retain_graph) and the stored tensors
            self.cam.outputs = None
            self.cam.activations_and_grads.activations.clear()
            self.cam.activations_and_grads.gradients.clear()
            self.model.zero_grad(set_to_none=True)
        if return_pooled:
            return logits, cam[0].astype(np.float32), pooled
        return logits, cam[0].astype(np.float32)

    def release(self) -> None:
        self.cam.activations_and_grads.release()


def default_gradcam(model: nn.Module, arch: str, x: torch.Tensor, target_class: int | None = None) -> np.ndarray:
    """pytorch-grad-cam used the default way (all parameters trainable); the reference for tests/bench."""
    GradCAM, Target = _gradcam_cls()
    model.requires_grad_(True)
    layer = model.get_submodule(get_spec(arch).cam_target)
    with GradCAM(model=model, target_layers=[layer]) as cam:
        targets = None if target_class is None else [Target(target_class)]
        return cam(input_tensor=x, targets=targets)[0].astype(np.float32)


def resize_cam(cam: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Bilinear resize of a [0,1] map to (width, height), kept in [0,1]."""
    if cam.shape[::-1] == tuple(size):
        return cam.astype(np.float32)
    out = np.asarray(Image.fromarray(cam.astype(np.float32)).resize(size, Image.BILINEAR))
    return np.clip(out, 0.0, 1.0).astype(np.float32)


_LUT: np.ndarray | None = None


def _jet_lut() -> np.ndarray:
    global _LUT
    if _LUT is None:
        from matplotlib import colormaps

        _LUT = (colormaps["jet"](np.linspace(0, 1, 256))[:, :3] * 255).astype(np.uint8)
    return _LUT


def overlay(image: Image.Image, cam: np.ndarray, alpha: float = 0.45, max_side: int | None = 1024) -> Image.Image:
    """Blend a jet-coloured map over the grayscale image; returns RGB.

    ``max_side`` bounds the output for display (a 20-megapixel upload does not need a 20-megapixel
    heatmap in a browser); the map is resized to the output size.
    """
    img = image.convert("L")
    if max_side and max(img.size) > max_side:
        scale = max_side / max(img.size)
        img = img.resize((max(1, round(img.width * scale)), max(1, round(img.height * scale))), Image.BILINEAR)
    cam = resize_cam(cam, img.size)
    gray = np.asarray(img, dtype=np.float32)[..., None]
    heat = _jet_lut()[(np.clip(cam, 0, 1) * 255).astype(np.uint8)].astype(np.float32)
    out = (1 - alpha) * gray + alpha * heat
    return Image.fromarray(np.clip(out, 0, 255).astype(np.uint8))


def cam_peak(cam: np.ndarray) -> tuple[int, int]:
    """(row, col) of the map's maximum."""
    return tuple(int(v) for v in np.unravel_index(int(np.argmax(cam)), cam.shape))
