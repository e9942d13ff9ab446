"""The training engine: ONE loop for every architecture x level.

``fit`` = scan -> decode once -> build model -> epochs of ``train_one_epoch`` + ``evaluate`` ->
best epoch by validation AUC -> temperature -> test metrics -> atomic checkpoint. Functions return dicts
and emit events; they never print (the CLI and the UI subscribe to events).

Events (dicts with a ``type``):
  log    {message}
  decode {split, done, total}
  step   {epoch, epochs, step, steps, loss, lr, images_per_s}
  epoch  {epoch, epochs, train: {loss, accuracy}, val: {loss, accuracy, auc, sensitivity, specificity, ...}, seconds}
  done   {checkpoint, metrics, seconds}
  error  {message}
"""

from __future__ import annotations

import functools
import math
import os
import random
import time
import warnings
from contextlib import nullcontext
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .checkpoints import save_checkpoint
from .config import TrainConfig, default_batch_size
from .data import (CLASSES, POSITIVE, DecodedCache, DecodedSplit, eval_batch, fingerprint, read_manifest,
                   scan_dataset, train_batch)
from .metrics import binary_metrics, clean, fit_temperature, roc_points
from .models import ARCHS, build_model, count_params, get_head
from .ood import fit_all, layout_features

EventFn = Callable[[dict[str, Any]], None]


class TrainingError(RuntimeError):
    """Training cannot go on (NaN loss, ...); the message says why and what to try."""


class TrainingStopped(Exception):
    """The run was stopped on request; nothing was saved."""


def resolve_device(device: str = "auto") -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("device 'cuda' was asked for but no CUDA GPU is available; use 'auto' or 'cpu'")
    return torch.device(device)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


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
    def create(cls, device: str | torch.device = "auto", precision: str = "auto") -> "Runtime":
        dev = device if isinstance(device, torch.device) else resolve_device(device)
        if precision == "auto":
            bf16 = dev.type == "cuda" or (dev.type == "cpu" and cpu_has_native_bf16())
        elif precision in ("bf16", "fp32"):
            bf16 = precision == "bf16"
        else:
            raise ValueError(f"unknown precision {precision!r}; choose one of: auto, fp32, bf16")
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

    def for_head_only(self) -> "Runtime":
        """The runtime for epochs that train only the head on cached features (level fc): fp32.

        The head alone is two matmuls on big weights, where bf16 autocast mostly adds a cast of the weights
        per step. Measured in fit on cxr-real (CPU, bench/fc_level.py): VGG16 10 head epochs 31 s in fp32
        vs 43 s in bf16; ResNet18 2.9 vs 1.9 s went the other way, but VGG16's head is the one that costs.
        """
        return replace(self, bf16=False)

    def describe(self) -> str:
        return f"{self.device} · {'bf16 autocast' if self.bf16 else 'fp32'}" + (
            " · channels_last" if self.channels_last else "")


# ---------------------------------------------------------------------------------------------------
# Losses, optimisers, schedules
# ---------------------------------------------------------------------------------------------------

def make_loss(cfg: TrainConfig, train_labels: torch.Tensor, device: torch.device) -> Callable:
    if cfg.loss == "ce":
        return nn.CrossEntropyLoss()
    counts = torch.bincount(train_labels, minlength=len(CLASSES)).float().clamp(min=1)
    if cfg.loss == "weighted_ce":
        # inverse class frequency, normalised so the weights average to 1
        w = counts.sum() / (len(counts) * counts)
        return nn.CrossEntropyLoss(weight=w.to(device))
    gamma, alpha = cfg.focal_gamma, cfg.focal_alpha
    pos = CLASSES.index(POSITIVE)

    def focal(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        # Lin et al. 2017: FL = -alpha_t (1 - p_t)^gamma log p_t; alpha weighs the positive class.
        logp = F.log_softmax(logits.float(), dim=1).gather(1, target[:, None]).squeeze(1)
        a = torch.where(target == pos, alpha, 1 - alpha)
        return (-a * (1 - logp.exp()).pow(gamma) * logp).mean()

    return focal


def make_optimizer(cfg: TrainConfig, params) -> torch.optim.Optimizer:
    params = [p for p in params if p.requires_grad]
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    if cfg.optimizer == "adam":
        return torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay or 1e-2)


def make_schedule(cfg: TrainConfig, opt: torch.optim.Optimizer, steps_per_epoch: int):
    total = max(1, cfg.epochs * steps_per_epoch)
    if cfg.schedule == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=total)
    if cfg.schedule == "onecycle":
        return torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg.lr, total_steps=total)
    return None


# ---------------------------------------------------------------------------------------------------
# One epoch / evaluation
# ---------------------------------------------------------------------------------------------------

class _Batches:
    """Mini-batches of a decoded split (or of cached features), already on the device."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor, batch_size: int):
        self.x, self.y, self.bs = x, y, batch_size

    def __len__(self) -> int:
        return math.ceil(len(self.y) / self.bs)

    def iterate(self, order: torch.Tensor | None = None):
        n = len(self.y)
        for i in range(0, n, self.bs):
            idx = order[i:i + self.bs] if order is not None else slice(i, i + self.bs)
            yield self.x[idx], self.y[idx]


def train_one_epoch(model: nn.Module, forward: Callable[[torch.Tensor, bool], torch.Tensor],
                    batches: _Batches, opt: torch.optim.Optimizer, loss_fn: Callable, *,
                    rt: Runtime, generator: torch.Generator, scheduler=None,
                    epoch: int = 1, epochs: int = 1, emit: EventFn = lambda e: None,
                    stop=None, log_every: int = 10) -> dict[str, float]:
    """Train for one pass over ``batches``; ``forward(x, train=True)`` maps a raw batch to logits.

    Loss and accuracy are summed on the device and read back only every ``log_every`` steps (and at the
    end): each read is a host-device synchronisation that would stall the GPU queue. The first non-finite
    loss (step and value) is also recorded on the device, so the error names the exact step even though it
    is raised at the next read, at most ``log_every`` steps later.
    """
    model.train()
    order = torch.randperm(len(batches.y), generator=generator).to(batches.y.device)
    total_loss = torch.zeros((), device=batches.y.device)
    correct = torch.zeros((), dtype=torch.long, device=batches.y.device)
    bad_step = torch.zeros((), dtype=torch.long, device=batches.y.device)   # 0 = every loss finite so far
    bad_loss = torch.zeros((), device=batches.y.device)
    seen, t0 = 0, time.perf_counter()
    steps = len(batches)
    for step, (x, y) in enumerate(batches.iterate(order), start=1):
        if stop is not None and stop.is_set():
            raise TrainingStopped("stopped on request")
        with rt.autocast():
            logits = forward(x, True)
            loss = loss_fn(logits.float(), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if scheduler is not None:
            scheduler.step()
        n = len(y)
        value = loss.detach()
        total_loss += value * n
        correct += (logits.detach().argmax(1) == y).sum()
        first = (bad_step == 0) & ~torch.isfinite(value)
        bad_step = torch.where(first, step, bad_step)
        bad_loss = torch.where(first, value, bad_loss)
        seen += n
        if step % log_every == 0 or step == steps:
            if int(bad_step):
                raise TrainingError(
                    f"the loss became {float(bad_loss)} at epoch {epoch}, step {int(bad_step)}: training "
                    f"diverged. Lower the learning rate (now {opt.param_groups[0]['lr']:.3g}) or use "
                    "optimizer 'adam'.")
            value = float(value)
            emit({"type": "step", "epoch": epoch, "epochs": epochs, "step": step, "steps": steps,
                  "loss": value, "lr": opt.param_groups[0]["lr"],
                  "images_per_s": seen / max(time.perf_counter() - t0, 1e-9)})
    return {"loss": float(total_loss) / max(seen, 1), "accuracy": int(correct) / max(seen, 1),
            "images_per_s": seen / max(time.perf_counter() - t0, 1e-9)}


@torch.no_grad()
def predict_logits(forward: Callable[[torch.Tensor, bool], torch.Tensor], batches: _Batches,
                   rt: Runtime, stop=None) -> torch.Tensor:
    out = []
    for x, _ in batches.iterate():
        if stop is not None and stop.is_set():
            raise TrainingStopped("stopped on request")
        with rt.autocast():
            out.append(forward(x, False).float().cpu())
    return torch.cat(out) if out else torch.zeros(0, len(CLASSES))


def evaluate(model: nn.Module, forward, batches: _Batches, rt: Runtime, *,
             temperature: float = 1.0, stop=None) -> tuple[dict[str, Any], torch.Tensor]:
    """Metrics of one split (positive class = infected) and the raw logits."""
    model.eval()
    logits = predict_logits(forward, batches, rt, stop)
    labels = batches.y.cpu()
    probs = torch.softmax(logits / temperature, dim=1).numpy()
    m = binary_metrics(probs, labels.numpy(), positive=CLASSES.index(POSITIVE))
    m["loss"] = float(F.cross_entropy(logits / temperature, labels)) if len(labels) else float("nan")
    return m, logits


# ---------------------------------------------------------------------------------------------------
# fit
# ---------------------------------------------------------------------------------------------------

def _image_forward(model: nn.Module, cfg: TrainConfig, rt: Runtime, generator: torch.Generator):
    """Raw uint8 batch -> logits, with the train or eval preset."""

    def forward(u8: torch.Tensor, train: bool) -> torch.Tensor:
        if train and cfg.augment:
            x = train_batch(u8, cfg.image_size, generator, rotation=cfg.rotation, scale=cfg.crop_scale)
        else:
            x = eval_batch(u8, cfg.image_size)
        return model(rt.input(x))

    return forward


@torch.no_grad()
def backbone_features(model: nn.Module, arch: str, images: torch.Tensor, cfg: TrainConfig,
                      rt: Runtime, batch_size: int, stop=None, head_input: bool = True
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """One eval-preset pass over a decoded split: (head-input features, pooled target-layer features).

    The first feeds the level-fc feature cache, the second the OOD statistics (ood.py); both come from
    the same forward pass. With ``head_input=False`` the whole model runs and the first is the logits.
    """
    from .ood import pooled_features

    model.eval()
    spec = ARCHS[arch]
    feats, pooled = [], []
    for i in range(0, len(images), batch_size):
        if stop is not None and stop.is_set():
            raise TrainingStopped("stopped on request")
        x = rt.input(eval_batch(images[i:i + batch_size].to(rt.device, non_blocking=True), cfg.image_size))
        with rt.autocast():
            if head_input:
                f, p = pooled_features(model, arch, x, forward=lambda m, x: spec.features(m, x))
            else:
                f, p = pooled_features(model, arch, x)
        feats.append(f.float())
        pooled.append(p.float())
    return torch.cat(feats), torch.cat(pooled)


def fit(config: TrainConfig, on_event: EventFn | None = None, stop=None) -> Path:
    """Train one model and save its checkpoint; returns the checkpoint path.

    ``stop`` (threading/multiprocessing Event): checked every step; a stopped run raises
    TrainingStopped and saves nothing. Any error is emitted as an ``error`` event and re-raised.
    """
    emit = on_event or (lambda e: None)
    t_start = time.perf_counter()
    try:
        return _fit(config, emit, stop, t_start)
    except TrainingStopped:
        emit({"type": "stopped", "message": "stopped on request; nothing was saved"})
        raise
    except Exception as exc:
        emit({"type": "error", "message": f"{exc.__class__.__name__}: {exc}"})
        raise


def _fit(cfg: TrainConfig, emit: EventFn, stop, t_start: float) -> Path:
    rt = Runtime.create(cfg.device, cfg.precision)
    device = rt.device
    seed_everything(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    bs = cfg.batch_size or default_batch_size(device.type)

    # 1. scan: fail fast, before any decoding or model building
    info = scan_dataset(cfg.data_dir)
    emit({"type": "log", "message": f"dataset {info.root}: {info.summary()}"})

    # 2. decode each image once (parallel; memory + disk cache shared by later runs)
    cache = DecodedCache(cfg.cache_size, workers=cfg.num_workers)
    decoded: dict[str, DecodedSplit] = {}
    for name, split in info.splits.items():
        decoded[name] = cache.get(split, info.root, progress=lambda d, t, name=name: emit(
            {"type": "decode", "split": name, "done": d, "total": t}))
        if decoded[name].skipped:
            emit({"type": "log", "message": f"{name}: skipped {len(decoded[name].skipped)} unreadable file(s), "
                  f"e.g. {decoded[name].skipped[0][0]}: {decoded[name].skipped[0][1]}"})
        if len(decoded[name]) == 0 or decoded[name].labels.unique().numel() < len(CLASSES):
            raise TrainingError(f"split {name} has no readable images of some class after decoding")

    # 3. model
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = build_model(cfg.arch, cfg.level, weights=cfg.weights, hidden=cfg.hidden, dropout=cfg.dropout)
    for w in caught:
        emit({"type": "log", "message": str(w.message)})
    meta = model.covid_meta
    rt.model(model)
    params = count_params(model)
    emit({"type": "log", "message": f"{ARCHS[cfg.arch].title} · {cfg.level}: {params['trainable']:,} of "
          f"{params['total']:,} parameters trained; weights: {meta['weights_origin']}; {rt.describe()}"})

    # 4. data on the device (uint8: 65 KB per 256 px image), forward function per level
    on_dev = {k: (v.images.to(device), v.labels.to(device)) for k, v in decoded.items()}
    use_features = cfg.level == "fc" and cfg.feature_cache
    if use_features:
        # Level fc: the backbone is frozen, so its output never changes: compute it once and train the
        # head on it (10 epochs then cost about one frozen forward pass). Augmentation is not applied
        # to cached features; set feature_cache=False to train the head on augmented images.
        both = {k: backbone_features(model, cfg.arch, x, cfg, rt, max(bs, 64), stop)
                for k, (x, _) in on_dev.items()}
        feats = {k: v[0] for k, v in both.items()}
        pooled = {k: v[1] for k, v in both.items()}   # frozen backbone: valid after training too
        head = get_head(model, cfg.arch)

        def forward(f: torch.Tensor, train: bool) -> torch.Tensor:
            return head(f)

        batches = {k: _Batches(feats[k], on_dev[k][1], bs) for k in on_dev}
        rt_epochs = rt.for_head_only()   # the feature pass above ran as rt (bf16 where native)
    else:
        rt_epochs = rt
        forward = _image_forward(model, cfg, rt, gen)
        batches = {k: _Batches(x, y, bs) for k, (x, y) in on_dev.items()}
    eval_batches = {k: _Batches(b.x, b.y, max(bs, 64)) for k, b in batches.items()}

    loss_fn = make_loss(cfg, decoded["train"].labels, device)
    opt = make_optimizer(cfg, model.parameters())
    sched = make_schedule(cfg, opt, len(batches["train"]))

    # 5. epochs; keep the best by validation AUC (lower validation loss breaks ties)
    history: list[dict[str, Any]] = []
    best_key, best_state, best_epoch = None, None, 0
    # Only trainable parameters and buffers change during training: the best-epoch snapshot copies those
    # (VGG16 at level fc: 70 MB of head instead of the whole 550 MB state_dict per improving epoch).
    changing = [k for k, p in model.named_parameters() if p.requires_grad] + [k for k, _ in model.named_buffers()]
    for epoch in range(1, cfg.epochs + 1):
        t0 = time.perf_counter()
        tr = train_one_epoch(model, forward, batches["train"], opt, loss_fn, rt=rt_epochs, generator=gen,
                             scheduler=sched, epoch=epoch, epochs=cfg.epochs, emit=emit, stop=stop,
                             log_every=cfg.log_every)
        val, _ = evaluate(model, forward, eval_batches["validation"], rt_epochs, stop=stop)
        rec = {"epoch": epoch, "train": clean(tr), "val": clean({k: v for k, v in val.items() if k != "confusion"}),
               "seconds": time.perf_counter() - t0}
        history.append(rec)
        emit({"type": "epoch", "epochs": cfg.epochs, **rec})
        auc = val["auc"] if math.isfinite(val["auc"]) else -1.0
        key = (auc, -val["loss"])
        if best_key is None or key > best_key:
            best_key, best_epoch = key, epoch
            state = model.state_dict()
            best_state = {k: state[k].detach().to("cpu", copy=True) for k in changing}

    model.load_state_dict(best_state, strict=False)   # the frozen rest never changed

    # 6. temperature on validation, then final metrics per split (with the temperature applied)
    _, val_logits = evaluate(model, forward, eval_batches["validation"], rt_epochs, stop=stop)
    temperature = fit_temperature(val_logits, batches["validation"].y)
    metrics = {}
    for name in ("train", "validation", "test"):
        m, logits = evaluate(model, forward, eval_batches[name], rt_epochs, temperature=temperature, stop=stop)
        m["roc"] = roc_points(batches[name].y.cpu().numpy() == CLASSES.index(POSITIVE),
                              torch.softmax(logits, 1)[:, CLASSES.index(POSITIVE)].numpy())
        metrics[name] = clean(m)
    # 6b. OOD statistics of the final model's pooled features (Lee et al. 2018; see ood.py)
    if not use_features:
        pooled = {k: backbone_features(model, cfg.arch, on_dev[k][0], cfg, rt, max(bs, 64), stop,
                                       head_input=False)[1] for k in ("train", "validation")}
    ood_stats = fit_all(pooled, {k: layout_features(on_dev[k][0]) for k in ("train", "validation")},
                        on_dev["train"][1])
    if stop is not None and stop.is_set():
        raise TrainingStopped("stopped on request")

    # 7. save (atomic; the card is written last)
    model.to("cpu")
    meta_out = {
        "arch": cfg.arch, "level": cfg.level, "classes": list(CLASSES), "positive": POSITIVE,
        "hidden": cfg.hidden, "num_classes": len(CLASSES), "image_size": cfg.image_size,
        "cache_size": cfg.cache_size,
        "weights_origin": meta["weights_origin"], "weights_note": meta["weights_note"],
        "config": cfg.to_dict(), "metrics": metrics, "temperature": temperature, "best_epoch": best_epoch,
        "history": history, "params": params, "device": str(device),
        "precision": "bf16" if rt.bf16 else "fp32",
        "data": {"root": str(info.root), "fingerprint": fingerprint(
            [p for s in info.splits.values() for p in s.files]),
            "counts": info.counts(), "skipped": len(info.skipped) + sum(len(d.skipped) for d in decoded.values())},
        "train_seconds": time.perf_counter() - t_start,
        "ood": {k: {"threshold": v["threshold"], "quantile": v["quantile"], "val_median": v["val_median"]}
                for k, v in ood_stats.items()},
        "note": "research demo - not a diagnosis",
    }
    path = save_checkpoint(cfg.out_dir, model, meta_out, tensors={"ood_stats": ood_stats})
    del on_dev, batches, eval_batches, model
    if device.type == "cuda":
        torch.cuda.empty_cache()
    emit({"type": "done", "checkpoint": str(path), "metrics": metrics, "best_epoch": best_epoch,
          "temperature": temperature, "seconds": time.perf_counter() - t_start})
    return path


def evaluate_checkpoint(path: str | os.PathLike, data_dir: str | os.PathLike, split: str = "test",
                        device: str = "auto", batch_size: int = 64, precision: str = "fp32") -> dict[str, Any]:
    """Metrics of a saved model on one split of an ImageFolder dataset (temperature applied).

    Also returns per-image ``files`` and ``probs`` (class probabilities, in ``classes`` order). fp32 by
    default, like the Predictor, so that both give the same probability for the same image.
    """
    from .checkpoints import load_model

    rt = Runtime.create(device, precision)
    dev = rt.device
    model, ckpt = load_model(path, dev)
    info = scan_dataset(data_dir, splits=(split,))
    d = DecodedCache(ckpt.get("cache_size", 256)).get(info.splits[split], info.root)
    cfg = TrainConfig.from_dict({**ckpt["config"], "augment": False})
    forward = _image_forward(model, cfg, rt, torch.Generator())
    rt.model(model)
    batches = _Batches(d.images.to(dev), d.labels.to(dev), batch_size)
    m, logits = evaluate(model, forward, batches, rt, temperature=ckpt.get("temperature", 1.0))
    probs = torch.softmax(logits / ckpt.get("temperature", 1.0), dim=1)
    pos = ckpt["classes"].index(POSITIVE)
    subsets = {}
    source = read_manifest(data_dir)
    for name in sorted(set(source.get(f, "") for f in d.files) - {""}):
        idx = [i for i, f in enumerate(d.files) if source.get(f) == name]
        subsets[name] = clean(binary_metrics(probs[idx].numpy(), d.labels[idx].numpy(), positive=pos))
    return {**clean(m), "split": split, "classes": ckpt["classes"], "subsets": subsets,
            "weights_origin": ckpt.get("weights_origin"), "checkpoint": str(path), "files": d.files,
            "labels": d.labels.tolist(), "probs": probs.tolist(), "skipped": d.skipped}
