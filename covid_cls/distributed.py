"""More than one process: ONE model trained by several ranks (torchrun + DistributedDataParallel), and
independent runs spread one process per device (the Study).

One model, several ranks (``torchrun --nproc_per_node=N -m covid_cls train ...``; ``covid-cls train --gpus N``
execs that). ``engine.fit`` calls ``setup`` first: outside torchrun (``WORLD_SIZE`` unset or 1) it returns a
``Dist`` of world size 1 and nothing below runs. Under torchrun it starts the process group (NCCL with one GPU
per local rank, gloo on CPUs) plus a small gloo group for control flags, and ``fit`` then:

- decodes once per node: local rank 0 decodes (every core, the bounded decoder pool) while the others wait on a
  barrier, then they read the decoded arrays from the disk cache that rank 0 just wrote. Every rank decoding at
  once would run N decoder pools on the same cores and decode everything N times; with a shared home folder the
  ranks would also race for the same cache file. A disk cache that cannot be written only costs time: the other
  ranks then decode for themselves.
- levels ``partial`` / ``full`` (and ``fc`` without the feature cache): DDP. One global permutation per epoch
  (the same generator on every rank), cut into global batches of ``batch_size x world`` images; rank r takes the
  r-th contiguous part of each. Every rank takes the same number of steps: a last global batch smaller than the
  world size is dropped. The loss of a rank is scaled by ``n_r x world / m`` (m = images in the global batch),
  so DDP's gradient average is exactly the gradient of the mean loss over the global batch even when the last
  batch does not split evenly. Trainable BatchNorm layers become synchronised (torch's ``SyncBatchNorm`` on
  CUDA; ``GlobalBatchNorm2d`` below on CPUs, where torch's does not run): batch statistics over the global
  batch, as one process with the whole batch would compute them. Augmentation and dropout draw from per-rank
  seeds.
- level ``fc`` (feature cache): the frozen backbone's pass over every split is sharded (each rank its
  contiguous rows, then all_gather); the small head is trained on all features identically on every rank
  (same seed, same data: no communication per step), and rank 0's head is broadcast at the end.
- validation/test logits (and the OOD features) are computed on shards and gathered, so AUC, the temperature
  and the threshold come from the whole split, and every rank takes the same best-epoch decision.
- rank 0 alone emits events, computes the confidence intervals and writes the checkpoint and its card (which
  records ``distributed``: world size, backend, batches); the others wait for it and return the same path.
- Stop: SIGINT/SIGTERM (Ctrl-C, torchrun forwarding it) set a flag that all ranks check together at every
  step (an all-reduce on the gloo control group, ~0.5 ms), so they stop at the same step and save nothing.
  A rank that crashes or is killed: torchrun sends SIGTERM to the others; a rank waiting on a collective with
  it gets "connection closed" (gloo) or is aborted by NCCL's watchdog (``TORCH_NCCL_ASYNC_ERROR_HANDLING=1``)
  or times out (``COVID_CLS_DIST_TIMEOUT_S``, default 1800 s), and ``fit`` raises ``DistributedError`` naming
  the rank. Only rank 0 writes, after the last collective, with ``save_checkpoint``'s atomic writes.

Independent runs (``run_on_devices``): a spawned worker process per device ("0,1" = GPUs, "cpu,cpu" = two CPU
processes), each pulling (arch, level) runs from one queue; the parent decodes every split first so that the
workers read the decoded cache from disk. A run's result depends only on its config and seed, so the rows are
those of the sequential Study (bit for bit on CPUs with the same thread count; on GPUs up to cuDNN's
non-deterministic kernels, as two sequential runs are).
"""

from __future__ import annotations

import contextlib
import datetime
import os
import queue
import re
import signal
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from .errors import ConfigError, TrainingError, TrainingStopped

TIMEOUT_ENV, WAIT_ENV = "COVID_CLS_DIST_TIMEOUT_S", "COVID_CLS_DIST_WAIT_S"
TIMEOUT_S = 1800      # a collective that waits longer than this for a rank ends the run
WAIT_S = 4 * 3600     # the waits where one rank works alone (decoding a big dataset, rank 0's final metrics)
SEED_STRIDE = 1_000_003   # per-rank seeds: seed + SEED_STRIDE * (rank + 1)


class DistributedError(TrainingError):
    """A rank lost contact with another (it crashed, was killed, or stopped answering)."""


def _env_int(name: str, default: int) -> int:
    try:
        return int(os.environ.get(name, default))
    except ValueError:
        return default


def launched_world_size() -> int:
    """The world size torchrun started this process with (1 outside torchrun)."""
    return max(1, _env_int("WORLD_SIZE", 1))


def is_main_process() -> bool:
    """Rank 0, or not started by torchrun: the process that prints and writes."""
    return _env_int("RANK", 0) == 0


class _AnyStop:
    """``is_set`` when the caller's stop event or the signal flag is set."""

    def __init__(self, *events):
        self.events = [e for e in events if e is not None]

    def is_set(self) -> bool:
        return any(e.is_set() for e in self.events)


@dataclass
class Dist:
    """This process's place among the ranks; world size 1 = a single process (every method is then local)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    local_world: int = 1
    backend: str = "none"
    device: torch.device | None = None     # where this rank computes (cuda:<local rank> under NCCL)
    control: Any = None                    # gloo group: stop flags, barriers, small sums
    owned: bool = False                    # this process started the process group (and ends it)
    signalled: threading.Event = field(default_factory=threading.Event)
    _old_handlers: dict = field(default_factory=dict)

    @property
    def active(self) -> bool:
        return self.world > 1

    @property
    def main(self) -> bool:
        return self.rank == 0

    # ------------------------------------------------------------------ description
    def describe(self, batch_size: int, replicated: bool = False) -> dict[str, Any]:
        """What the card records. ``replicated``: level fc, where every rank trains the head on all features
        (so the batch the head saw is ``batch_size``) after a sharded feature pass."""
        mode = "single process" if not self.active else (
            "sharded feature pass, head trained alike on every rank" if replicated else "DDP")
        return {"world_size": self.world, "backend": self.backend,
                "nodes": max(1, self.world // max(1, self.local_world)), "mode": mode,
                "batch_per_process": batch_size, "global_batch": batch_size * (1 if replicated else self.world)}

    def where(self) -> str:
        return f"rank {self.rank} of {self.world}"

    # ------------------------------------------------------------------ stop and errors
    def stop_event(self, stop):
        """The stop the run checks: the caller's, or a SIGINT/SIGTERM received by this rank."""
        return _AnyStop(stop, self.signalled) if self.active else stop

    def _on_signal(self, signum, frame) -> None:
        if self.signalled.is_set():        # the second one: do not wait for the next step
            raise KeyboardInterrupt
        self.signalled.set()

    def _install_signals(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return
        for sig in (signal.SIGINT, signal.SIGTERM):
            self._old_handlers[sig] = signal.signal(sig, self._on_signal)

    def explain(self, exc: BaseException) -> BaseException:
        """A communication failure as a DistributedError that says what happened; other errors unchanged."""
        if not self.active or isinstance(exc, (TrainingError, TrainingStopped)):
            return exc
        text = str(exc)
        dist_error = getattr(torch.distributed, "DistError", ())
        if not (isinstance(exc, dist_error) or any(w in text for w in ("gloo", "NCCL", "Connection closed",
                                                                         "Timed out", "timed out", "ProcessGroup"))):
            return exc
        first = text.strip().splitlines()[0] if text.strip() else exc.__class__.__name__
        first = re.sub(r"^\[[^\]]*\]\s*", "", first).split(". This is typically")[0][:200]   # gloo's source prefix
        err = DistributedError(
            f"{self.where()}: lost contact with another rank ({first}). A rank crashed, was killed or did not "
            f"answer within {_env_int(TIMEOUT_ENV, TIMEOUT_S)} s ({TIMEOUT_ENV}); torchrun ends the others. "
            "Nothing was saved.")
        err.__cause__ = exc
        return err

    # ------------------------------------------------------------------ collectives (local when world is 1)
    def any(self, flag: bool) -> bool:
        """True on every rank when ``flag`` is true on any rank (the gloo control group: no GPU sync)."""
        if not self.active:
            return bool(flag)
        t = torch.tensor([1 if flag else 0], dtype=torch.int32)
        torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX, group=self.control)
        return bool(t.item())

    def sum(self, values: Sequence[float]) -> list[float]:
        """Element-wise sum over the ranks (float64, control group)."""
        if not self.active:
            return [float(v) for v in values]
        t = torch.tensor([float(v) for v in values], dtype=torch.float64)
        torch.distributed.all_reduce(t, group=self.control)
        return t.tolist()

    def shard(self, n: int) -> slice:
        """This rank's contiguous rows of ``n`` (sizes differ by at most one)."""
        return slice(self.rank * n // self.world, (self.rank + 1) * n // self.world)

    def gather_rows(self, t: torch.Tensor, n: int) -> torch.Tensor:
        """All ranks' ``shard(n)`` rows of a tensor, concatenated in row order, on every rank."""
        if not self.active:
            return t
        home = t.device
        dev = self.device if self.backend == "nccl" else torch.device("cpu")
        sizes = [(r + 1) * n // self.world - r * n // self.world for r in range(self.world)]
        part = t.to(dev).contiguous()
        padded = part.new_zeros((max(sizes), *part.shape[1:]))
        padded[:len(part)] = part
        parts = [torch.empty_like(padded) for _ in range(self.world)]
        torch.distributed.all_gather(parts, padded)
        return torch.cat([p[:s] for p, s in zip(parts, sizes, strict=True)]).to(home)

    def split_map(self, n: int, fn: Callable[[slice], tuple[torch.Tensor, ...]]) -> tuple[torch.Tensor, ...]:
        """``fn`` over this rank's rows of ``n``, the results gathered in row order on every rank. A stop seen
        by any rank stops them all (after the shard, so every rank reaches the same collectives)."""
        if not self.active or n < self.world:
            return fn(slice(0, n))
        out, stopped = None, False
        try:
            out = fn(self.shard(n))
        except TrainingStopped:
            stopped = True
        if self.any(stopped):
            raise TrainingStopped("stopped on request")
        return tuple(self.gather_rows(t, n) for t in out)

    def wait(self) -> None:
        """A barrier for the waits where one rank works alone (decoding, rank 0's final work): timeout WAIT_S."""
        if self.active:
            torch.distributed.monitored_barrier(
                group=self.control, timeout=datetime.timedelta(seconds=_env_int(WAIT_ENV, WAIT_S)),
                wait_all_ranks=True)

    @contextlib.contextmanager
    def local_first(self):
        """Local rank 0 runs the block first; the other ranks of the node run it after (then reading what it
        left on disk: the decoded cache, downloaded weights)."""
        if self.active and self.local_rank == 0:
            yield
            self.wait()
        else:
            self.wait()
            yield

    def broadcast_object(self, obj: Any) -> Any:
        """Rank 0's ``obj`` on every rank (after ``wait``: rank 0 may have worked alone for long)."""
        if not self.active:
            return obj
        box = [obj]
        torch.distributed.broadcast_object_list(box, src=0, group=self.control)
        return box[0]

    def broadcast_trainable(self, model: nn.Module) -> None:
        """Rank 0's trainable parameters on every rank (level fc: the head every rank trained alike)."""
        if not self.active:
            return
        for p in model.parameters():
            if p.requires_grad:
                torch.distributed.broadcast(p.data, src=0)

    # ------------------------------------------------------------------ the model
    def generator(self, seed: int) -> torch.Generator:
        """This rank's generator for augmentation (differs per rank; not the shuffling order's)."""
        return torch.Generator().manual_seed(seed + SEED_STRIDE * (self.rank + 1))

    def reseed(self, seed: int) -> None:
        """Per-rank global RNG (dropout masks), after the model was built alike on every rank."""
        if self.active:
            torch.manual_seed(seed + SEED_STRIDE * (self.rank + 1))

    def wrap(self, model: nn.Module) -> tuple[nn.Module, int]:
        """(the DDP module that trains, the number of BatchNorm layers made synchronous)."""
        if not self.active:
            return model, 0
        from torch.nn.parallel import DistributedDataParallel

        synced = sync_batchnorm(model, cuda=self.backend == "nccl")
        ids = [self.device.index] if self.backend == "nccl" else None
        # no buffer broadcast at every forward: synchronised BatchNorm keeps the running statistics equal on every
        # rank and frozen ones never change (they are still made equal once, when DDP starts)
        net = DistributedDataParallel(model, device_ids=ids, forward_sync_buffers=False,
                                      gradient_as_bucket_view=True)
        return net, synced

    def close(self, clean: bool = True) -> None:
        for sig, old in self._old_handlers.items():
            signal.signal(sig, old)
        self._old_handlers.clear()
        if self.owned and clean and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
            self.owned = False


def setup(device: str = "auto") -> Dist:
    """The process group of this rank when started by torchrun (WORLD_SIZE > 1), else a world of one.

    ``device``: TrainConfig.device. auto/cuda with GPUs -> NCCL, one GPU per local rank; cpu -> gloo.
    """
    world = launched_world_size()
    if world <= 1:
        return Dist()
    import torch.distributed as dist

    rank, local_rank = _env_int("RANK", 0), _env_int("LOCAL_RANK", 0)
    local_world = _env_int("LOCAL_WORLD_SIZE", world)
    cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    if cuda:
        if not torch.cuda.is_available():
            raise ConfigError("device 'cuda' was asked for but no CUDA GPU is available; use --device cpu (gloo)")
        if local_rank >= torch.cuda.device_count():
            raise ConfigError(f"local rank {local_rank} has no GPU: this node has {torch.cuda.device_count()}; "
                              "start at most that many processes per node (--nproc_per_node / --gpus)")
        torch.cuda.set_device(local_rank)
        dev = torch.device("cuda", local_rank)
        # a failed or timed-out NCCL collective aborts the communicator and ends the process instead of hanging
        os.environ.setdefault("TORCH_NCCL_ASYNC_ERROR_HANDLING", "1")
    else:
        dev = torch.device("cpu")
    timeout = datetime.timedelta(seconds=_env_int(TIMEOUT_ENV, TIMEOUT_S))
    owned = not dist.is_initialized()
    if owned:
        kw = {"device_id": dev} if cuda else {}
        dist.init_process_group("nccl" if cuda else "gloo", timeout=timeout, **kw)
    d = Dist(rank=dist.get_rank(), world=dist.get_world_size(), local_rank=local_rank, local_world=local_world,
             backend=str(dist.get_backend()), device=dev, owned=owned)
    if rank != d.rank:
        raise ConfigError(f"RANK={rank} but the process group says {d.rank}")
    d.control = dist.new_group(backend="gloo", timeout=timeout)
    d._install_signals()
    return d


# ---------------------------------------------------------------------------------------------------
# BatchNorm over the global batch
# ---------------------------------------------------------------------------------------------------

class _AllReduceSum(torch.autograd.Function):
    """Sum over the ranks, differentiable: the gradient of each rank's input is the sum of every rank's
    gradient of the output (each rank's loss depends on the global sum)."""

    @staticmethod
    def forward(ctx, t: torch.Tensor) -> torch.Tensor:
        out = t.clone()
        torch.distributed.all_reduce(out)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.clone()
        torch.distributed.all_reduce(grad)
        return grad


class GlobalBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm2d whose training statistics are those of the global batch (every rank's images), for CPUs
    and gloo, where ``torch.nn.SyncBatchNorm`` refuses to run. Two differentiable all-reduces (sums and count,
    then squared deviations) per layer and step; their backward all-reduces the gradients, so each rank's gradient is
    what one process holding the whole batch would compute for its images. Eval mode: plain BatchNorm."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and torch.distributed.is_available() and torch.distributed.is_initialized()):
            return super().forward(x)
        c = x.shape[1]
        xf = x.float()
        count = torch.full((1,), float(x.numel() // c), dtype=torch.float32, device=x.device)
        # two passes (mean, then squared deviations), as BatchNorm computes them: E[x^2] - mean^2 loses
        # digits where a channel's mean is large against its spread
        total = _AllReduceSum.apply(torch.cat([xf.sum((0, 2, 3)), count]))
        n = total[-1]
        mean = total[:c] / n
        centred = xf - mean[None, :, None, None]
        var = _AllReduceSum.apply((centred * centred).sum((0, 2, 3))) / n
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                m = (1.0 / float(self.num_batches_tracked)) if self.momentum is None else self.momentum
                self.running_mean.mul_(1 - m).add_(mean.detach(), alpha=m)
                self.running_var.mul_(1 - m).add_(var.detach() * n / (n - 1).clamp(min=1), alpha=m)
        y = centred * torch.rsqrt(var + self.eps)[None, :, None, None]
        if self.affine:
            y = y * self.weight[None, :, None, None] + self.bias[None, :, None, None]
        return y.to(x.dtype)


def sync_batchnorm(model: nn.Module, cuda: bool) -> int:
    """Replace the trainable BatchNorm2d layers of ``model`` (those in training mode with trainable
    parameters) by synchronised ones, sharing their parameters and buffers; returns how many."""
    cls = nn.SyncBatchNorm if cuda else GlobalBatchNorm2d
    swapped = 0
    for name, m in list(model.named_modules()):
        if type(m) is not nn.BatchNorm2d or not any(p.requires_grad for p in m.parameters(recurse=False)):
            continue
        new = cls(m.num_features, m.eps, m.momentum, m.affine, m.track_running_stats)
        if m.affine:
            new.weight, new.bias = m.weight, m.bias
        new.running_mean, new.running_var, new.num_batches_tracked = m.running_mean, m.running_var, \
            m.num_batches_tracked
        new.train(m.training)
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, new)
        swapped += 1
    return swapped


# ---------------------------------------------------------------------------------------------------
# torchrun from the CLI (covid-cls train --gpus N)
# ---------------------------------------------------------------------------------------------------

# torchrun options that `covid-cls train` passes through (with a value), and its flags without one
TORCHRUN_OPTIONS = ("--nnodes", "--node-rank", "--rdzv-backend", "--rdzv-endpoint", "--rdzv-id", "--rdzv-conf",
                    "--master-addr", "--master-port", "--max-restarts", "--monitor-interval", "--log-dir")
TORCHRUN_FLAGS = ("--standalone",)


def _spellings(flag: str) -> tuple[str, ...]:
    return (flag, flag.replace("-", "_").replace("__", "--", 1))


def torchrun_command(argv: Sequence[str], nproc: int) -> list[str]:
    """The torchrun command line that runs ``covid_cls <argv>`` in ``nproc`` processes per node: ``--gpus`` is
    removed from ``argv`` and torchrun's own options are moved in front of ``-m covid_cls``. Without
    ``--nnodes``/rendezvous options the run is single-node (``--standalone``: a free local port)."""
    options = {s: flag for flag in TORCHRUN_OPTIONS for s in _spellings(flag)}
    flags = {s: flag for flag in TORCHRUN_FLAGS for s in _spellings(flag)}
    ours, run = [], []
    it = iter(argv)
    for arg in it:
        name, eq, value = arg.partition("=")
        if name == "--gpus":
            if not eq:
                next(it, None)
        elif name in options:
            run += [options[name], value if eq else next(it, "")]
        elif name in flags:
            run.append(flags[name])
        else:
            ours.append(arg)
    multi = any(a in run for a in ("--nnodes", "--rdzv-endpoint", "--master-addr"))
    if not multi and "--standalone" not in run:
        run.insert(0, "--standalone")
    return [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}", *run, "-m", "covid_cls",
            *ours]


def exec_torchrun(argv: Sequence[str], nproc: int, device: str = "auto") -> None:
    """Replace this process by torchrun running ``covid_cls <argv>`` on ``nproc`` GPUs (or CPU processes with
    ``--device cpu``). Checks the GPU count on this node first."""
    if nproc < 1:
        raise ConfigError("--gpus must be at least 1")
    if device != "cpu":
        have = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if have == 0:
            raise ConfigError(f"--gpus {nproc}: no CUDA GPU on this machine. For N processes on the CPU (gloo) "
                              "add --device cpu")
        if nproc > have:
            raise ConfigError(f"--gpus {nproc}: this node has {have} GPU(s)")
    cmd = torchrun_command(argv, nproc)
    sys.stdout.flush()
    sys.stderr.flush()
    os.execv(cmd[0], cmd)


# ---------------------------------------------------------------------------------------------------
# Independent runs, one process per device (the Study across devices)
# ---------------------------------------------------------------------------------------------------

def parse_devices(spec: str | Sequence[str] | None) -> list[str]:
    """"0,1,2,3" -> cuda:0..3; "cpu,cpu" -> two CPU processes; "cuda:1" as such. Each GPU at most once."""
    if spec is None:
        return []
    items = [s.strip() for s in (spec.split(",") if isinstance(spec, str) else spec) if str(s).strip()]
    out = []
    for s in items:
        s = str(s).lower()
        if s == "cpu":
            out.append("cpu")
            continue
        idx = s.split(":", 1)[1] if s.startswith("cuda:") else s
        if not idx.isdigit():
            raise ConfigError(f"unknown device {s!r}: use GPU numbers (0,1,...), cuda:N or cpu")
        out.append(f"cuda:{int(idx)}")
    gpus = [d for d in out if d != "cpu"]
    if len(set(gpus)) != len(gpus):
        raise ConfigError("each GPU may be listed once (one process per GPU)")
    if gpus:
        have = torch.cuda.device_count() if torch.cuda.is_available() else 0
        bad = [d for d in gpus if int(d.split(":")[1]) >= have]
        if bad:
            raise ConfigError(f"{', '.join(bad)}: this machine has {have} CUDA GPU(s)")
    return out


def _visible_gpu(index: int) -> str:
    """The CUDA_VISIBLE_DEVICES value for GPU ``index`` as this process numbers them."""
    parent = [v.strip() for v in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if v.strip()]
    return parent[index] if parent and index < len(parent) else str(index)


class _HaltOrOrphaned:
    """The device workers' stop flag: the parent's ``halt``, or the parent is gone (killed: the Stop button's
    last resort kills the app's training worker, which runs a parallel Study) - an orphan stops at its next step
    and saves nothing instead of training on for nobody."""

    def __init__(self, halt):
        self.halt, self.parent = halt, os.getppid()

    @property
    def orphaned(self) -> bool:
        return os.getppid() != self.parent

    def is_set(self) -> bool:
        return self.halt.is_set() or self.orphaned


def _device_worker(device: str, visible: str, threads: int, tasks, results, stop) -> None:
    """One process per device: takes runs from ``tasks`` until None; reports events and results."""
    stop = _HaltOrOrphaned(stop)
    if device != "cpu":
        os.environ["CUDA_VISIBLE_DEVICES"] = visible   # before anything touches CUDA: this GPU is cuda:0 here
    else:
        torch.set_num_threads(threads)
    from . import events as ev
    from .config import TrainConfig
    from .engine import fit

    while True:
        task = tasks.get()
        if task is None or stop.is_set():
            break
        i, runs, name, cfg, roots = task
        cfg = TrainConfig.from_dict({**cfg, "device": "cpu" if device == "cpu" else "cuda"})
        results.put(("event", ev.RunStart(run=i, runs=runs, name=name).to_dict()))
        t0 = time.perf_counter()
        try:
            path = fit(cfg, on_event=lambda e, i=i, name=name: results.put(
                ("event", e.tagged(i, runs, name).to_dict())), stop=stop, roots=roots)
        except TrainingStopped:
            results.put(("stopped", i, "", 0.0))
            break
        except BaseException as exc:  # noqa: BLE001 - reported to the parent, which ends the others
            results.put(("error", i, f"{exc.__class__.__name__}: {exc}", 0.0))
            break
        results.put(("done", i, str(path), round(time.perf_counter() - t0, 1)))
    if stop.orphaned:
        # Nobody reads the queue any more: exiting would wait for its buffered messages to be flushed forever.
        results.cancel_join_thread()


def _drain_and_join(procs, results, timeout: float) -> None:
    """Wait for the workers; keep emptying the results queue meanwhile (a process that still has queued
    messages cannot exit), and terminate what is still alive after ``timeout``."""
    end = time.monotonic() + timeout
    while any(p.is_alive() for _, p in procs) and time.monotonic() < end:
        try:
            results.get(timeout=0.2)
        except queue.Empty:
            pass
    for _, p in procs:
        if p.is_alive():
            p.terminate()
        p.join(timeout=5)


def run_on_devices(runs: Sequence[tuple[int, int, str, Any]], devices: Sequence[str], emit, stop=None,
                   roots=None) -> dict[int, tuple[str, float]]:
    """Run ``runs`` ((run, runs, name, TrainConfig)) on ``devices``, one spawned process per device; returns
    {run: (checkpoint path, seconds)}. Events arrive tagged with their run. The first failure stops the other
    workers (at their next step) and is raised; ``stop`` (any object with ``is_set``) stops all."""
    import multiprocessing as mp

    from . import events as ev

    ctx = mp.get_context("spawn")
    tasks, results, halt = ctx.Queue(), ctx.Queue(), ctx.Event()
    # longest first (full, then partial, then fc; VGG before ResNet): the last run to finish starts early
    cost = {"full": 3, "partial": 2, "fc": 1}
    for i, n, name, cfg in sorted(runs, key=lambda r: (-cost.get(r[3].level, 0), r[3].arch != "vgg16", r[0])):
        tasks.put((i, n, name, cfg.to_dict(), None if roots is None else [str(r) for r in roots]))
    cpus = sum(d == "cpu" for d in devices)
    threads = max(1, (os.cpu_count() or 1) // max(1, cpus))
    procs = []
    for d in devices:
        tasks.put(None)
        visible = _visible_gpu(int(d.split(":")[1])) if d != "cpu" else ""
        p = ctx.Process(target=_device_worker, args=(d, visible, threads, tasks, results, halt), daemon=True,
                        name=f"covid-cls-study-{d}")
        p.start()
        procs.append((d, p))
    done: dict[int, tuple[str, float]] = {}
    failure: BaseException | None = None
    try:
        while len(done) < len(runs) and failure is None:
            if stop is not None and stop.is_set():
                failure = TrainingStopped("stopped on request")
                break
            try:
                kind, *rest = results.get(timeout=0.2)
            except queue.Empty:
                dead = [(d, p.exitcode) for d, p in procs if not p.is_alive() and p.exitcode not in (0, None)]
                if dead:
                    failure = TrainingError(f"the study worker on {dead[0][0]} died (exit code {dead[0][1]}); "
                                            "its run was lost")
                elif not any(p.is_alive() for _, p in procs) and results.empty():
                    failure = TrainingError("the study workers ended before every run was done")
                continue
            if kind == "event":
                emit(ev.from_dict(rest[0]))
            elif kind == "done":
                done[rest[0]] = (rest[1], rest[2])
            elif kind == "stopped":
                failure = TrainingStopped("stopped on request")
            else:
                failure = TrainingError(f"run {rest[0]} failed: {rest[1]}")
    finally:
        if failure is not None:
            halt.set()   # the other workers stop at their next step and save nothing
        _drain_and_join(procs, results, 60 if failure is None else 20)
    if failure is not None:
        raise failure
    return done


__all__ = ["Dist", "DistributedError", "GlobalBatchNorm2d", "setup", "sync_batchnorm", "torchrun_command",
           "exec_torchrun", "parse_devices", "run_on_devices", "launched_world_size", "is_main_process"]
