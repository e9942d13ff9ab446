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

import math
import random
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from . import events as ev
from .card import Card
from .checkpoints import save_checkpoint
from .config import TrainConfig, default_batch_size
from .data import (
    DecodedCache,
    DecodedSplit,
    Photometric,
    eval_batch,
    fingerprint,
    identical_images,
    positive_index,
    scan_dataset,
    train_batch,
)
from .distributed import Dist
from .distributed import setup as distributed_setup
from .errors import TrainingError, TrainingStopped
from .metrics import (
    choose_threshold,
    clean,
    fit_temperature_bounded,
    metrics_for,
    roc_per_class,
    roc_points,
    split_report,
)
from .models import ARCHS, build_model, count_params
from .ood import fit_all, layout_features
from .runtime import Runtime, cpu_has_native_bf16, resolve_device  # noqa: F401 - re-exported

EventFn = Callable[[ev.Event], None]


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


# ---------------------------------------------------------------------------------------------------
# Losses, optimisers, schedules
# ---------------------------------------------------------------------------------------------------

def make_loss(cfg: TrainConfig, train_labels: torch.Tensor, device: torch.device, num_classes: int = 2,
              positive: int = 0) -> Callable:
    """``positive``: the class index focal loss's alpha weighs (the others get 1 - alpha)."""
    if cfg.loss == "ce":
        return nn.CrossEntropyLoss()
    counts = torch.bincount(train_labels, minlength=num_classes).float().clamp(min=1)
    if cfg.loss == "weighted_ce":
        # inverse class frequency, normalised so the weights average to 1
        w = counts.sum() / (len(counts) * counts)
        return nn.CrossEntropyLoss(weight=w.to(device))
    gamma, alpha, pos = cfg.focal_gamma, cfg.focal_alpha, positive

    def focal(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        # Lin et al. 2017: FL = -alpha_t (1 - p_t)^gamma log p_t; alpha weighs the positive class. With more than
        # two classes there is no one positive class to weigh: alpha_t = 1 (the focusing term alone).
        logp = F.log_softmax(logits.float(), dim=1).gather(1, target[:, None]).squeeze(1)
        a = torch.where(target == pos, alpha, 1 - alpha) if num_classes == 2 else torch.ones_like(logp)
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
    """Per-step schedule: an optional linear warm-up (``warmup_epochs``) then constant or cosine to 0.

    Warm-up matters for AdamW from scratch: its first steps use noisy second-moment estimates, and a full
    learning rate there can push BatchNorm'd networks into a bad region (Goyal et al. 2017; Liu et al. 2020).
    """
    total = max(1, cfg.epochs * steps_per_epoch)
    if cfg.schedule == "onecycle":
        return torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg.lr, total_steps=total)
    warm = min(int(round(cfg.warmup_epochs * steps_per_epoch)), total - 1)
    if cfg.schedule == "none" and warm == 0:
        return None

    def factor(step: int) -> float:
        if step < warm:
            return (step + 1) / (warm + 1)
        if cfg.schedule == "cosine":
            return 0.5 * (1 + math.cos(math.pi * (step - warm) / max(1, total - warm)))
        return 1.0

    return torch.optim.lr_scheduler.LambdaLR(opt, factor)


# ---------------------------------------------------------------------------------------------------
# One epoch / evaluation
# ---------------------------------------------------------------------------------------------------

class _Batches:
    """Mini-batches of a decoded split (or of cached features), delivered on ``device`` (default: the labels').

    ``x`` is on the device already (no copy per step), or stays on the host - images too large for the GPU, or a
    memory-mapped cache (``_place``) - and each batch alone is gathered there and copied to the device.
    With ``dist`` (several ranks, distributed.py), ``batch_size`` is per rank: training steps go over global
    batches of ``batch_size x world`` images, of which each rank takes its contiguous part (``steps``), and
    evaluation runs on each rank's rows and gathers the results (``predict_logits``).
    """

    def __init__(self, x: torch.Tensor, y: torch.Tensor, batch_size: int, dist: Dist | None = None,
                 device: torch.device | None = None):
        self.x, self.y, self.bs = x, y, batch_size
        self.device = y.device if device is None else device
        self.dist = dist if dist is not None and dist.active else None

    @property
    def world(self) -> int:
        return self.dist.world if self.dist is not None else 1

    def __len__(self) -> int:
        """Training steps per epoch: the same on every rank (a last global batch smaller than the world size
        is dropped; with one process this is ceil(n / batch_size))."""
        n, w = len(self.y), self.world
        g = self.bs * w
        return n // g + (n % g >= w)

    def _take(self, idx: slice | torch.Tensor) -> torch.Tensor:
        """Rows ``idx`` of x (``idx`` on x's device) on the device: from the host, only this batch is copied,
        through pinned memory on CUDA so that the copy runs asynchronously; on the CPU nothing is copied."""
        rows = self.x[idx]
        if rows.device == self.device:
            return rows
        return (rows.pin_memory() if self.device.type == "cuda" else rows).to(self.device, non_blocking=True)

    def iterate(self, order: torch.Tensor | None = None):
        n = len(self.y)
        on_x = order.to(self.x.device) if order is not None else None   # one copy per pass, not per batch
        for i in range(0, n, self.bs):
            rows = slice(i, i + self.bs)
            if order is None:
                yield self._take(rows), self.y[rows]
            else:
                yield self._take(on_x[rows]), self.y[order[rows]]

    def steps(self, order: torch.Tensor):
        """(x, y, m) per training step: this rank's part of the next global batch of ``order``, and m, the
        images in the whole global batch (= len(y) with one process)."""
        n, w = len(self.y), self.world
        r, g = (self.dist.rank if self.dist is not None else 0), self.bs * w
        on_x = order.to(self.x.device)   # a no-op unless the images stay on the host: then one copy per epoch
        for i in range(len(self)):
            lo = i * g
            m = min(g, n - lo)
            rows = slice(lo + r * m // w, lo + (r + 1) * m // w)
            yield self._take(on_x[rows]), self.y[order[rows]], m

    def part(self, rows: slice) -> _Batches:
        """The same batch size over some rows (one rank's shard), for a single process."""
        return _Batches(self.x[rows], self.y[rows], self.bs, device=self.device)


# At most this share of the GPU's free memory holds decoded images (the rest is for the model, its activations
# and the optimiser); splits beyond it stay on the host and each batch is copied (_Batches).
GPU_IMAGES_SHARE = 0.5


def _place(decoded: dict[str, DecodedSplit], rt: Runtime) -> tuple[dict[str, tuple[torch.Tensor, torch.Tensor]], str]:
    """Each split's (images, labels) for the epochs, and what to tell the user. Labels go to the device; images
    too on CUDA while they fit in GPU_IMAGES_SHARE of its free memory (split by split, train first), else they
    stay where they are - RAM or the memory-mapped cache - and are read batch by batch. On the CPU nothing moves."""
    budget = torch.cuda.mem_get_info(rt.device)[0] * GPU_IMAGES_SHARE if rt.device.type == "cuda" else 0
    placed, host = {}, []
    for name, d in decoded.items():
        x = d.images
        if rt.device.type == "cuda" and x.numel() <= budget:
            budget -= x.numel()
            x = x.to(rt.device)
        elif rt.device.type == "cuda":
            host.append(f"{name} ({x.numel() / 1e9:.1f} GB)")
        placed[name] = (x, d.labels.to(rt.device))
    note = (f"images of {', '.join(host)} stay in host memory (more than {GPU_IMAGES_SHARE:.0%} of the GPU's free "
            f"memory): each batch is copied to {rt.device}") if host else ""
    return placed, note


def _on_any_rank(dist: Dist | None, flag: bool) -> bool:
    """``flag``; with several ranks, whether any rank raised it (all of them then act alike)."""
    return dist.any(flag) if dist is not None else bool(flag)


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
    dist = batches.dist   # None with one process
    order = torch.randperm(len(batches.y), generator=generator).to(batches.y.device)
    total_loss = torch.zeros((), device=batches.y.device)
    correct = torch.zeros((), dtype=torch.long, device=batches.y.device)
    bad_step = torch.zeros((), dtype=torch.long, device=batches.y.device)   # 0 = every loss finite so far
    bad_loss = torch.zeros((), device=batches.y.device)
    seen, t0 = 0, time.perf_counter()
    steps = len(batches)
    for step, (x, y, m) in enumerate(batches.steps(order), start=1):
        if _on_any_rank(dist, stop is not None and stop.is_set()):   # every rank stops at the same step
            raise TrainingStopped("stopped on request")
        with rt.autocast():
            logits = forward(x, True)
            loss = loss_fn(logits.float(), y)
        opt.zero_grad(set_to_none=True)
        # DDP averages the ranks' gradients; with this scale the average is the gradient of the mean loss over
        # the m images of the global batch, also when the ranks hold different numbers of them (1 with one process)
        scale = len(y) * batches.world / m
        (loss * scale if scale != 1 else loss).backward()
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
            bad = int(bad_step)
            if _on_any_rank(dist, bad != 0):
                where = f"at epoch {epoch}, step {bad}" if bad else f"on another rank, by epoch {epoch} step {step}"
                raise TrainingError(
                    f"the loss became {float(bad_loss) if bad else 'non-finite'} {where}: training "
                    f"diverged. Lower the learning rate (now {opt.param_groups[0]['lr']:.3g}) or use "
                    "optimizer 'adam'.")
            value = float(value)
            emit(ev.Step(epoch=epoch, epochs=epochs, step=step, steps=steps, loss=value, lr=opt.param_groups[0]["lr"],
                         images_per_s=seen * batches.world / max(time.perf_counter() - t0, 1e-9)))
    loss_sum, right, seen = float(total_loss), int(correct), seen
    if dist is not None:   # the whole global batch's numbers on every rank
        loss_sum, right, seen = dist.sum([loss_sum, right, seen])
    return {"loss": loss_sum / max(seen, 1), "accuracy": right / max(seen, 1),
            "images_per_s": seen / max(time.perf_counter() - t0, 1e-9)}


@torch.no_grad()
def predict_logits(forward: Callable[[torch.Tensor, bool], torch.Tensor], batches: _Batches,
                   rt: Runtime, stop=None, num_classes: int = 2) -> torch.Tensor:
    """Logits of every row (on the CPU); with several ranks each computes its rows and all get all."""

    def run(rows: slice) -> tuple[torch.Tensor]:
        out = []
        for x, _ in batches.part(rows).iterate():
            if stop is not None and stop.is_set():
                raise TrainingStopped("stopped on request")
            with rt.autocast():
                out.append(forward(x, False).float().cpu())
        return (torch.cat(out) if out else torch.zeros(0, num_classes),)

    if batches.dist is None:
        return run(slice(None))[0]
    return batches.dist.split_map(len(batches.y), run)[0]


def evaluate(model: nn.Module, forward, batches: _Batches, rt: Runtime, *, temperature: float = 1.0, stop=None,
             classes: Sequence[str] = ("infected", "normal")) -> tuple[dict[str, Any], torch.Tensor]:
    """Metrics of one split and the raw logits: binary (about ``positive_class(classes)``) for two classes,
    per class one-vs-rest and macro for more (``metrics.metrics_for``)."""
    model.eval()
    logits = predict_logits(forward, batches, rt, stop, num_classes=len(classes))
    labels = batches.y.cpu()
    probs = torch.softmax(logits / temperature, dim=1).numpy()
    m = metrics_for(probs, labels.numpy(), positive=positive_index(classes),
                    classes=list(classes))
    m["loss"] = float(F.cross_entropy(logits / temperature, labels)) if len(labels) else float("nan")
    return m, logits


# ---------------------------------------------------------------------------------------------------
# fit
# ---------------------------------------------------------------------------------------------------

def _image_forward(model: nn.Module, cfg: TrainConfig, rt: Runtime, generator: torch.Generator,
                   net: nn.Module | None = None):
    """Raw uint8 batch -> logits, with the train or eval preset. ``net``: what trains (the DDP wrapper of
    ``model`` with several ranks); evaluation always runs ``model`` itself, on each rank's own rows."""
    photometric = Photometric(cfg.intensity_aug, cfg.blur_noise, cfg.erase_corners)
    net = net if net is not None else model

    def forward(u8: torch.Tensor, train: bool) -> torch.Tensor:
        if train and cfg.augment:
            x = train_batch(u8, cfg.image_size, generator, rotation=cfg.rotation, scale=cfg.crop_scale,
                            photometric=photometric)
        else:
            x = eval_batch(u8, cfg.image_size)
        return (net if train else model)(rt.input(x))

    return forward


@torch.no_grad()
def backbone_features(model: nn.Module, images: torch.Tensor, cfg: TrainConfig,
                      rt: Runtime, batch_size: int, stop=None, head_input: bool = True
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """One eval-preset pass over a decoded split: (head-input features, pooled target-layer features).

    The first feeds the level-fc feature cache, the second the OOD statistics (ood.py); both come from
    the same forward pass. With ``head_input=False`` the whole model runs and the first is the logits.
    """
    from .ood import pooled_features

    model.eval()
    feats, pooled = [], []
    for i in range(0, len(images), batch_size):
        if stop is not None and stop.is_set():
            raise TrainingStopped("stopped on request")
        x = rt.input(eval_batch(images[i:i + batch_size].to(rt.device, non_blocking=True), cfg.image_size))
        with rt.autocast():
            f, p = pooled_features(model, x, head_input=head_input)
        feats.append(f.float())
        pooled.append(p.float())
    return torch.cat(feats), torch.cat(pooled)


def _features(model: nn.Module, images: torch.Tensor, cfg: TrainConfig, rt: Runtime, batch_size: int, stop,
              dist: Dist, head_input: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """``backbone_features`` of every image; with several ranks each computes its rows, all get all."""
    return dist.split_map(len(images), lambda rows: backbone_features(
        model, images[rows], cfg, rt, batch_size, stop, head_input=head_input))


def fit(config: TrainConfig, on_event: EventFn | None = None, stop=None, roots=None) -> Path:
    """Train one model and save its checkpoint; returns the checkpoint path.

    ``stop`` (threading/multiprocessing Event): checked every step; a stopped run raises
    TrainingStopped and saves nothing. Any error is emitted as an ``error`` event and re-raised.
    ``roots``: folders the data may come from, checked for every file when it is opened (the app passes
    ``COVID_CLS_DATA_ROOTS``); None = no restriction.

    Started by torchrun (``WORLD_SIZE`` > 1), every rank calls ``fit`` and they train one model together
    (distributed.py): only rank 0 emits events and writes; every rank returns the checkpoint path.
    """
    emit = on_event or (lambda e: None)
    t_start = time.perf_counter()
    dist, clean = Dist(), False
    try:
        dist = distributed_setup(config.device)
        if not dist.main:
            emit = lambda e: None   # noqa: E731 - rank 0 alone reports
        path = _fit(config, emit, dist.stop_event(stop), t_start, roots, dist)
        clean = True
        return path
    except TrainingStopped:
        clean = True
        emit(ev.Stopped())
        raise
    except Exception as exc:
        err = dist.explain(exc)
        emit(ev.Error(message=f"{err.__class__.__name__}: {err}"))
        if err is exc:
            raise
        raise err from exc
    finally:
        dist.close(clean)


def _decode(cfg: TrainConfig, emit: EventFn, roots=None):
    """Scan (fail fast, before any decoding or model building), then decode each image once."""
    info = scan_dataset(cfg.data_dir, roots=roots)
    emit(ev.Log(message=f"dataset {info.root}: {info.summary()}"))
    if info.skipped:
        emit(ev.Log(message=f"skipped {len(info.skipped)} file(s) at the scan, e.g. {info.skipped[0][0]}: "
                            f"{info.skipped[0][1]}"))
    # memory + disk, shared by later runs; with roots, every file is checked again when it is opened
    cache = DecodedCache(cfg.cache_size, workers=cfg.num_workers, roots=roots)
    decoded: dict[str, DecodedSplit] = {}
    for name, split in info.splits.items():
        decoded[name] = cache.get(split, info.root, progress=lambda d, t, name=name: emit(
            ev.Decode(split=name, done=d, total=t)))
        for line in cache.info + [f"WARNING: {note}" for note in cache.notes]:
            emit(ev.Log(message=line))
        cache.info.clear()
        cache.notes.clear()
        if decoded[name].skipped:
            emit(ev.Log(message=f"{name}: skipped {len(decoded[name].skipped)} unreadable file(s), "
                        f"e.g. {decoded[name].skipped[0][0]}: {decoded[name].skipped[0][1]}"))
        if len(decoded[name]) == 0 or decoded[name].labels.unique().numel() < len(info.classes):
            raise TrainingError(f"split {name} has no readable images of some class after decoding")
        if name == "train" and identical_images(decoded[name].images):
            # Nothing to learn, and a zero covariance for the OOD statistics: say so before any training.
            raise TrainingError(f"all images identical: the {len(decoded[name])} training images decode to the "
                                "same picture, so there is nothing to learn. Check the dataset.")
    return info, decoded


def _leakage(decoded: dict[str, DecodedSplit], emit: EventFn) -> dict[str, Any]:
    """Near-duplicate images across splits (a validation or test image seen in training inflates every
    metric), and the training images' hashes, which the card keeps so that ``evaluate`` can check any other
    folder against them. Perceptual hash on the decoded squares: ~1 ms per image."""
    from .leakage import dataset_leakage

    found = dataset_leakage(None, decoded=decoded)
    if found["count"]:
        shown = "; ".join(f"{p['a']} ~ {p['b']}" for p in found["pairs"][:5])
        emit(ev.Log(message=f"WARNING: {found['count']} near-duplicate image pair(s) across splits (leakage: "
                            f"metrics will look better than they are), e.g. {shown}"))
    return {"train_hashes": found["train_hashes"], "near_duplicates": found["pairs"]}


def _build(cfg: TrainConfig, rt: Runtime, emit: EventFn, num_classes: int = 2):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = build_model(cfg.arch, cfg.level, weights=cfg.weights, hidden=cfg.hidden, dropout=cfg.dropout,
                            num_classes=num_classes)
    for w in caught:
        emit(ev.Log(message=str(w.message)))
    rt.model(model)
    params = count_params(model)
    emit(ev.Log(message=f"{ARCHS[cfg.arch].title} · {cfg.level}: {params['trainable']:,} of "
                f"{params['total']:,} parameters trained; weights: {model.weights_origin}; {rt.describe()}"))
    return model, params


@dataclass
class _Plan:
    """How the epochs run: the forward function, the batches per split and the runtime of the epochs."""

    forward: Callable[[torch.Tensor, bool], torch.Tensor]
    batches: dict[str, _Batches]
    eval_batches: dict[str, _Batches]
    rt: Runtime
    pooled: dict[str, torch.Tensor] | None   # OOD features, when the frozen feature pass produced them
    replicated: bool = False   # several ranks, each training the same head on all features (level fc)
    note: str = ""             # how the ranks share the work (logged)


def _plan(model, cfg: TrainConfig, rt: Runtime, on_dev, bs: int, gen, stop, dist: Dist | None = None) -> _Plan:
    dist, note = dist or Dist(), ""
    if cfg.level == "fc" and cfg.feature_cache:
        # Level fc: the backbone is frozen, so its output never changes: compute it once and train the
        # head on it (10 epochs then cost about one frozen forward pass). Augmentation is not applied
        # to cached features; set feature_cache=False to train the head on augmented images.
        # Several ranks: each computes the features of its rows, all get all, and each trains the same head.
        both = {k: _features(model, x, cfg, rt, max(bs, 64), stop, dist) for k, (x, _) in on_dev.items()}
        batches = {k: _Batches(both[k][0], on_dev[k][1], bs) for k in on_dev}
        pooled = {k: v[1] for k, v in both.items()}   # frozen backbone: valid after training too

        def forward(f: torch.Tensor, train: bool) -> torch.Tensor:
            return model.forward_head(f)

        plan_rt, shard = rt.for_head_only(), None   # the feature pass above ran as rt (bf16 where native)
    else:
        # Several ranks: DDP, per-rank augmentation and dropout seeds, synchronised trainable BatchNorm.
        net, synced = dist.wrap(model)
        if dist.active:
            dist.reseed(cfg.seed)
            note = (f"DDP over {dist.world} ranks ({dist.backend}), batch {bs} per rank = {bs * dist.world} global"
                    + (f"; {synced} trainable BatchNorm layer(s) synchronised" if synced else ""))
        aug = dist.generator(cfg.seed) if dist.active else gen
        forward, pooled, plan_rt, shard = _image_forward(model, cfg, rt, aug, net), None, rt, dist
        batches = {k: _Batches(x, y, bs, shard) for k, (x, y) in on_dev.items()}
    eval_batches = {k: _Batches(b.x, b.y, max(bs, 64), shard) for k, b in batches.items()}
    if dist.active and shard is None:
        note = f"{dist.world} ranks ({dist.backend}): feature pass sharded, the head trained alike on every rank"
    return _Plan(forward, batches, eval_batches, plan_rt, pooled, replicated=dist.active and shard is None,
                 note=note)


def _train_epochs(model, cfg: TrainConfig, plan: _Plan, train_labels, gen, emit: EventFn, stop,
                  classes: Sequence[str] = ("infected", "normal")):
    """The epochs; keeps the best by validation AUC (macro one-vs-rest for more than two classes; lower
    validation loss breaks ties) and restores it."""
    loss_fn = make_loss(cfg, train_labels, plan.rt.device, len(classes), positive_index(classes))
    opt = make_optimizer(cfg, model.parameters())
    sched = make_schedule(cfg, opt, len(plan.batches["train"]))
    history: list[dict[str, Any]] = []
    best_key, best_state, best_epoch = None, None, 0
    # Only trainable parameters and buffers change during training: the best-epoch snapshot copies those
    # (VGG16 at level fc: 70 MB of head instead of the whole 550 MB state_dict per improving epoch).
    changing = [k for k, p in model.named_parameters() if p.requires_grad] + [k for k, _ in model.named_buffers()]
    for epoch in range(1, cfg.epochs + 1):
        t0 = time.perf_counter()
        tr = train_one_epoch(model, plan.forward, plan.batches["train"], opt, loss_fn, rt=plan.rt, generator=gen,
                             scheduler=sched, epoch=epoch, epochs=cfg.epochs, emit=emit, stop=stop,
                             log_every=cfg.log_every)
        val, _ = evaluate(model, plan.forward, plan.eval_batches["validation"], plan.rt, stop=stop, classes=classes)
        e = ev.Epoch(epoch=epoch, epochs=cfg.epochs, train=clean(tr), seconds=time.perf_counter() - t0,
                     val=clean({k: v for k, v in val.items() if k not in ("confusion", "per_class")}))
        history.append(e.record())
        emit(e)
        key = (val["auc"] if math.isfinite(val["auc"]) else -1.0, -val["loss"])
        if best_key is None or key > best_key:
            best_key, best_epoch = key, epoch
            state = model.state_dict()
            best_state = {k: state[k].detach().to("cpu", copy=True) for k in changing}
        if cfg.patience and epoch - best_epoch >= cfg.patience and epoch < cfg.epochs:
            emit(ev.Log(message=f"early stop after epoch {epoch}: validation AUC has not improved for "
                                f"{cfg.patience} epochs (best: epoch {best_epoch})"))
            break
    model.load_state_dict(best_state, strict=False)   # the frozen rest never changed
    return history, best_epoch


@dataclass
class _Calibration:
    """What validation decides after training: temperature, operating point, conformal quantile."""

    temperature: float
    note: str
    threshold: float | None
    conformal_qhat: float
    conformal_alpha: float


# Split-conformal sets (selective.py) make a model abstain when both classes are plausible. The strictest
# coverage is chosen whose abstention on validation stays within ABSTAIN_BUDGET: at alpha = 0.1 a from-scratch
# ResNet18 (test AUC 0.875) abstained on 45 % of cxr-real test images - "uncertain" on half of ordinary
# X-rays is no answer. The OOD check adds its ~1 % on top.
CONFORMAL_ALPHAS = (0.05, 0.1, 0.15, 0.2, 0.25, 0.3, 0.4, 0.5)
ABSTAIN_BUDGET = 0.05


def _calibrate(cfg: TrainConfig, val_logits: torch.Tensor, val_labels: torch.Tensor, pos: int = 0) -> _Calibration:
    """Bounded temperature (no "100 %" from a tiny or perfectly separated validation set), then the decision
    threshold on the calibrated P(positive) (two classes only: with more, the most probable class is the
    answer), then the conformal quantile (selective.py)."""
    from .selective import conformal_threshold, prediction_sets, set_abstains

    temperature, note = fit_temperature_bounded(val_logits, val_labels)
    probs = torch.softmax(val_logits / temperature, 1).numpy()
    labels = val_labels.cpu().numpy()
    threshold = None if cfg.threshold_rule == "argmax" or probs.shape[1] != 2 else choose_threshold(
        labels == pos, probs[:, pos], method=cfg.threshold_rule, target=cfg.target_sensitivity)
    for alpha in CONFORMAL_ALPHAS:
        qhat = conformal_threshold(probs, labels, alpha)
        if set_abstains(prediction_sets(probs, qhat)).mean() <= ABSTAIN_BUDGET:
            break
    return _Calibration(temperature, note, threshold, qhat, alpha)


def _final_logits(model, plan: _Plan, stop, num_classes: int = 2) -> dict[str, torch.Tensor]:
    """Every split's logits with the restored best model (with several ranks: computed on shards, gathered)."""
    model.eval()
    return {name: predict_logits(plan.forward, plan.eval_batches[name], plan.rt, stop, num_classes)
            for name in ("validation", "train", "test")}


def _final_metrics(cfg: TrainConfig, plan: _Plan, logits: dict[str, torch.Tensor],
                   classes: Sequence[str] = ("infected", "normal")) -> tuple[dict[str, Any], _Calibration]:
    """Calibrate on validation, then every split's metrics at the chosen operating point, with CIs."""
    classes = list(classes)
    pos = positive_index(classes)
    cal = _calibrate(cfg, logits["validation"], plan.batches["validation"].y.cpu(), pos)
    metrics = {}
    for name in ("train", "validation", "test"):
        labels = plan.batches[name].y.cpu().numpy()
        probs = torch.softmax(logits[name] / cal.temperature, 1).numpy()
        m = split_report(probs, labels, pos, cal.threshold, n_boot=0 if name == "train" else 2000, seed=cfg.seed,
                         classes=classes)
        m["loss"] = float(F.cross_entropy(logits[name] / cal.temperature, torch.from_numpy(labels)))
        m["roc"] = roc_points(labels == pos, probs[:, pos])
        if len(classes) > 2:   # one curve per class, one-vs-rest
            m["roc_per_class"] = roc_per_class(probs, labels, classes)
        metrics[name] = clean(m)
    return metrics, cal


def _fit(cfg: TrainConfig, emit: EventFn, stop, t_start: float, roots=None, dist: Dist | None = None) -> Path:
    dist = dist or Dist()
    rt = Runtime.create(dist.device if dist.active else cfg.device, cfg.precision)
    seed_everything(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)   # the shuffling order: the same on every rank
    bs = cfg.batch_size or default_batch_size(rt.device.type)
    with dist.local_first():   # one decode per node; the other ranks read the disk cache (distributed.py)
        info, decoded = _decode(cfg, emit, roots)
    leakage = _leakage(decoded, emit) if dist.main else {}
    with dist.local_first():   # one ImageNet download per node, should there be one
        model, params = _build(cfg, rt, emit, len(info.classes))
    # images on the GPU when they fit there (uint8: 65 KB per 256 px image), else on the host, read per batch
    on_dev, where = _place(decoded, rt)
    if where:
        emit(ev.Log(message=where))
    plan = _plan(model, cfg, rt, on_dev, bs, gen, stop, dist)
    if plan.note:
        emit(ev.Log(message=plan.note))
    history, best_epoch = _train_epochs(model, cfg, plan, decoded["train"].labels, gen, emit, stop, info.classes)
    if plan.replicated:
        dist.broadcast_trainable(model)   # fc: every rank trained the same head; rank 0's, bit for bit
    logits = _final_logits(model, plan, stop, len(info.classes))
    # OOD statistics of the final model's pooled features (Lee et al. 2018; see ood.py)
    pooled = plan.pooled or {k: _features(model, on_dev[k][0], cfg, rt, max(bs, 64), stop, dist,
                                          head_input=False)[1] for k in ("train", "validation")}
    if dist.any(stop is not None and stop.is_set()):
        raise TrainingStopped("stopped on request")
    path = metrics = cal = None
    if dist.main:   # the last collective is behind us: rank 0 computes the CIs and writes alone
        metrics, cal = _final_metrics(cfg, plan, logits, info.classes)
        ood_stats = fit_all(pooled, {k: layout_features(on_dev[k][0]) for k in ("train", "validation")},
                            on_dev["train"][1])
        model.to("cpu")
        card = _card(cfg, model, rt, dist.describe(bs, plan.replicated), info, decoded, leakage, metrics, cal,
                     history, best_epoch, params, t_start, roots)
        path = save_checkpoint(cfg.out_dir, model, card, ood_stats=ood_stats)
    dist.wait()
    path = Path(dist.broadcast_object(str(path) if path else None))
    del on_dev, plan, model
    if rt.device.type == "cuda":
        torch.cuda.empty_cache()
    if dist.main:
        emit(ev.Done(checkpoint=str(path), metrics=metrics, best_epoch=best_epoch, temperature=cal.temperature,
                     seconds=time.perf_counter() - t_start))
    return path


def _card(cfg: TrainConfig, model, rt: Runtime, distributed: dict, info, decoded, leakage, metrics,
          cal: _Calibration, history, best_epoch: int, params, t_start: float, roots) -> Card:
    return Card(
        arch=cfg.arch, level=cfg.level, classes=list(info.classes), positive=info.positive, hidden=cfg.hidden,
        dropout=cfg.dropout, image_size=cfg.image_size, cache_size=cfg.cache_size,
        weights_origin=model.weights_origin, weights_note=model.weights_note, config=cfg.to_dict(),
        metrics=metrics, temperature=cal.temperature, threshold=cal.threshold, calibration_note=cal.note,
        selective={"conformal_qhat": cal.conformal_qhat, "conformal_alpha": cal.conformal_alpha},
        best_epoch=best_epoch, history=history, params=params,
        device=str(rt.device), precision="bf16" if rt.bf16 else "fp32",
        distributed=distributed,   # world size, backend, batches (distributed.Dist.describe)
        # what was actually read: the resolved folder, and per split the images decoded and used
        data={"root": str(info.root), "fingerprint": fingerprint([p for s in info.splits.values() for p in s.files]),
              "counts": info.counts(), "read": {k: len(d) for k, d in decoded.items()},
              "roots_checked": roots is not None,
              "skipped": len(info.skipped) + sum(len(d.skipped) for d in decoded.values()), **leakage},
        train_seconds=time.perf_counter() - t_start)


def evaluate_checkpoint(*args, **kwargs):
    """See ``evaluation.evaluate_checkpoint`` (kept here: the first public API exported it from the engine)."""
    from .evaluation import evaluate_checkpoint as run

    return run(*args, **kwargs)
