"""Training throughput, side by side in one run, on the same images:

  (a) the 2020 loop, replicated: torchvision ImageFolder (PIL, grayscale loaded as RGB) + RandomRotation(30),
      RandomResizedCrop(224), RandomHorizontalFlip, ToTensor, Normalize; DataLoader batch 8, num_workers 0,
      shuffle; fp32; SGD lr 1e-3 momentum 0.9; torchvision backbone with the head
      in_features (512 | 4096) -> 4300 -> ReLU -> Dropout -> 2, both Linear layers in the forward path;
      loss.item() and the running accuracy every step, as the notebook did.
  (b) compute only: covid_cls's model, random tensors already on the device, covid_cls's batch size and
      precision and memory format (`engine.Runtime`: bf16 autocast on CUDA and on CPUs with native bf16,
      channels_last where cuDNN/oneDNN runs convolutions): the limit for (c).
  (c) covid_cls's own training path, the code `fit` runs for image batches: DecodedCache (uint8 256 px) on
      the device -> `engine._image_forward` (`data.train_batch`: the same augmentation as one affine warp per
      sample on the device) -> model, driven by `engine.train_one_epoch` over `engine._Batches`, at
      `config.default_batch_size(device)` (16 CPU / 64 CUDA). Timed per call of train_one_epoch after warm-up.
      For level fc, `fit` by default trains the head on cached backbone features; row "fc+feat" gives that path
      with the feature pass amortised over 10 epochs (see also bench/fc_level.py).

Plus the one-off cost of the decoded cache: cold (1 thread and all cores), memory hit, disk hit.

Each phase runs in its own Python process (clean peak-RSS / CUDA-peak numbers per phase via
resource.getrusage / torch.cuda.max_memory_allocated), for --seconds after warm-up.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import _common as C

RESULT = "@@RESULT "
IMAGENET_MEAN = [0.485, 0.456, 0.406]
IMAGENET_STD = [0.229, 0.224, 0.225]


# ---------------------------------------------------------------------------------------------------
# child-process protocol
#
# Every phase runs in its own process (clean peak-RSS / CUDA-peak per phase). The children are started
# one after another (set-up + warm-up, then "READY"), then the parent gives them the device in turns,
# `--rounds` slices of seconds/rounds each, so that (a), (b) and (c) see the same background load on a
# shared machine. A "run S" command makes the child call its step function until S seconds have passed
# (at least once); each call is synchronised with the device and timed on its own.
# ---------------------------------------------------------------------------------------------------

def _send(obj: dict) -> None:
    print(RESULT + json.dumps(obj, default=str), flush=True)


def serve(step, info: dict, device: str) -> None:
    """Child side: answer "run S" / "end" commands read from stdin."""
    _send({"ready": True, **info})
    for line in sys.stdin:
        cmd = line.split()
        if not cmd:
            continue
        if cmd[0] == "end":
            break
        budget = float(cmd[1])
        times, imgs = [], []
        t_start = time.perf_counter()
        while True:
            C.sync(device)
            t0 = time.perf_counter()
            r = step()
            C.sync(device)
            dt = time.perf_counter() - t0
            if isinstance(r, tuple):        # (images, own busy time): the step timed itself
                r, dt = r
            times.append(dt)
            imgs.append(r)
            if time.perf_counter() - t_start >= budget:
                break
        _send({"times": times, "imgs": imgs})
    _send({"final": True, **info, "peak_rss_mb": C.peak_rss_mb(), "cuda_peak_mb": C.cuda_peak_mb(device)})


def _finish(res: dict, device: str) -> None:
    res["peak_rss_mb"] = C.peak_rss_mb()
    res["cuda_peak_mb"] = C.cuda_peak_mb(device)
    _send(res)


# ---------------------------------------------------------------------------------------------------
# (a) the 2020 loop
# ---------------------------------------------------------------------------------------------------

def model_2020(arch: str, level: str):
    """The notebook's model, rebuilt with plain torchvision (independent of covid_cls.models).

    Random init instead of ImageNet weights: the speed is the same and the benchmark stays offline.
    """
    import torchvision.models as tvm
    from torch import nn

    m = getattr(tvm, arch)(weights=None)
    if level != "full":
        for p in m.parameters():
            p.requires_grad = False
    in_f = 512 if arch == "resnet18" else 4096
    head = nn.Sequential(nn.Linear(in_f, 4300), nn.ReLU(inplace=True), nn.Dropout(0.5), nn.Linear(4300, 2))
    if arch == "resnet18":
        m.fc = head
        if level == "partial":
            m.layer4.requires_grad_(True)
    else:
        m.classifier[6] = head
        if level == "partial":
            m.features[24:].requires_grad_(True)
            m.classifier.requires_grad_(True)
    return m


def transforms_2020():
    import torchvision.transforms as T

    return T.Compose([T.RandomRotation(30), T.RandomResizedCrop(224), T.RandomHorizontalFlip(), T.ToTensor(),
                      T.Normalize(IMAGENET_MEAN, IMAGENET_STD)])


def phase_2020(a) -> None:
    import torch
    from torch import nn
    from torch.utils.data import DataLoader
    from torchvision.datasets import ImageFolder

    torch.manual_seed(0)
    dev = a.device
    ds = ImageFolder(str(Path(a.root) / "train"), transform=transforms_2020())  # loader: PIL .convert("RGB")
    loader = DataLoader(ds, batch_size=8, shuffle=True, num_workers=0)
    model = model_2020(a.arch, a.level).to(dev)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-3, momentum=0.9)
    crit = nn.CrossEntropyLoss()
    model.train()
    state = {"it": iter(loader), "loss": 0.0, "correct": 0}

    def step():
        try:
            inputs, labels = next(state["it"])
        except StopIteration:                      # next epoch
            state["it"] = iter(loader)
            inputs, labels = next(state["it"])
        inputs, labels = inputs.to(dev), labels.to(dev)
        opt.zero_grad()
        outputs = model(inputs)
        _, preds = torch.max(outputs, 1)
        loss = crit(outputs, labels)
        loss.backward()
        opt.step()
        state["loss"] += loss.item() * inputs.size(0)
        state["correct"] += torch.sum(preds == labels.data).item()
        return inputs.size(0)

    for _ in range(a.warmup):
        step()
    serve(step, {"phase": "a", "batch_size": 8, "images_in_set": len(ds)}, dev)


def phase_2020_data(a) -> None:
    """The 2020 loop's input pipeline alone (decode + PIL transforms + collate), no model: its data cost."""
    import torch
    from torch.utils.data import DataLoader
    from torchvision.datasets import ImageFolder

    torch.manual_seed(0)
    loader = DataLoader(ImageFolder(str(Path(a.root) / "train"), transform=transforms_2020()), batch_size=8,
                        shuffle=True, num_workers=0)
    state = {"it": iter(loader)}

    def step():
        try:
            inputs, _ = next(state["it"])
        except StopIteration:
            state["it"] = iter(loader)
            inputs, _ = next(state["it"])
        return inputs.size(0)

    step()
    serve(step, {"phase": "a_data", "batch_size": 8}, "cpu")


# ---------------------------------------------------------------------------------------------------
# (b) compute only
# ---------------------------------------------------------------------------------------------------

def phase_compute(a) -> None:
    import torch

    from covid_cls.config import TrainConfig
    from covid_cls.engine import Runtime, make_optimizer, seed_everything
    from covid_cls.models import build_model

    seed_everything(0)
    rt = Runtime.create(a.device, a.precision)
    dev = rt.device
    bs = a.batch_size
    model = rt.model(build_model(a.arch, a.level, weights="none"))
    x = rt.input(torch.randn(bs, 3, 224, 224, device=dev))
    y = torch.randint(0, 2, (bs,), device=dev)
    cfg = TrainConfig(arch=a.arch, level=a.level, weights="none", batch_size=bs)
    opt = make_optimizer(cfg, model.parameters())
    loss_fn = torch.nn.CrossEntropyLoss()
    model.train()

    def one():
        with rt.autocast():
            loss = loss_fn(model(x).float(), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    for _ in range(a.warmup):
        one()
    C.sync(a.device)
    # calls of k steps (synchronised once per call, so the GPU queue is never drained mid-call)
    t0 = time.perf_counter()
    one()
    C.sync(a.device)
    k = max(1, int(0.25 / max(time.perf_counter() - t0, 1e-4)))

    def step():
        for _ in range(k):
            one()
        return k * bs

    serve(step, {"phase": "b", "batch_size": bs, "steps_per_call": k, "runtime": rt.describe()}, a.device)


# ---------------------------------------------------------------------------------------------------
# (c) covid_cls
# ---------------------------------------------------------------------------------------------------

def _covid_setup(a, feature_cache: bool):
    import torch

    from covid_cls.config import TrainConfig
    from covid_cls.data import DecodedCache, scan_dataset
    from covid_cls.engine import Runtime, _image_forward, make_loss, make_optimizer, seed_everything
    from covid_cls.models import build_model

    seed_everything(0)
    cfg = TrainConfig(data_dir=a.root, arch=a.arch, level=a.level, weights="none", batch_size=a.batch_size,
                      feature_cache=feature_cache, device=a.device, precision=a.precision)
    rt = Runtime.create(cfg.device, cfg.precision)
    dev = rt.device
    info = scan_dataset(a.root, splits=("train",))
    decoded = DecodedCache(cfg.cache_size, workers=cfg.num_workers).get(info.splits["train"], info.root)
    model = rt.model(build_model(a.arch, a.level, weights="none"))
    x_all, y_all = decoded.images.to(dev), decoded.labels.to(dev)
    gen = torch.Generator().manual_seed(0)
    opt = make_optimizer(cfg, model.parameters())
    loss_fn = make_loss(cfg, decoded.labels, dev)
    return cfg, rt, model, x_all, y_all, gen, opt, loss_fn, _image_forward


def phase_covid(a) -> None:
    import torch

    from covid_cls.engine import _Batches, train_one_epoch

    cfg, rt, model, x_all, y_all, gen, opt, loss_fn, image_forward = _covid_setup(a, feature_cache=False)
    dev = rt.device
    forward = image_forward(model, cfg, rt, gen)
    bs, n = a.batch_size, len(y_all)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(1)).to(dev)
    pos = {"i": 0}

    def batches_of(steps: int):
        # the next steps*bs images of a fixed permutation (cycled); gathered outside the timed call
        idx = torch.arange(pos["i"], pos["i"] + steps * bs, device=dev) % n
        pos["i"] = (pos["i"] + steps * bs) % n
        sel = perm[idx]
        return _Batches(x_all[sel], y_all[sel], bs)

    def call(b):
        train_one_epoch(model, forward, b, opt, loss_fn, rt=rt, generator=gen)
        return len(b.y)

    for _ in range(a.warmup):
        call(batches_of(1))
    C.sync(a.device)
    t0 = time.perf_counter()
    call(batches_of(1))
    C.sync(a.device)
    t_step = time.perf_counter() - t0
    steps = max(1, min(math.ceil(n / bs), int(max(a.seconds / a.rounds / 3, 0.25) / max(t_step, 1e-4))))

    def step():
        b = batches_of(steps)          # the gather of the next images is not timed
        C.sync(a.device)
        t0 = time.perf_counter()
        r = call(b)
        C.sync(a.device)
        return r, time.perf_counter() - t0

    serve(step, {"phase": "c", "batch_size": bs, "steps_per_call": steps, "images_in_set": n,
                 "runtime": rt.describe(),
                 "path": "engine.train_one_epoch(model, engine._image_forward(model, cfg, ...), "
                         "engine._Batches(DecodedCache uint8 on the device))"}, a.device)


def phase_covid_features(a) -> None:
    """Level fc as `fit` runs it by default: backbone features once, then epochs of the head on them."""
    from covid_cls.engine import _Batches, backbone_features, train_one_epoch

    cfg, rt, model, x_all, y_all, gen, opt, loss_fn, _ = _covid_setup(a, feature_cache=True)
    bs, n = a.batch_size, len(y_all)
    head = model.head
    last = {}

    def features(x):
        out = backbone_features(model, x, cfg, rt, max(bs, 64))
        return out[0] if isinstance(out, tuple) else out   # newer engine: (head input, pooled)

    def run(images, epochs):
        C.sync(a.device)
        t0 = time.perf_counter()
        feats = features(images)
        C.sync(a.device)
        t1 = time.perf_counter()
        batches = _Batches(feats, y_all[: len(images)], bs)
        for _ in range(epochs):
            train_one_epoch(model, lambda f, train: head(f), batches, opt, loss_fn, rt=rt.for_head_only(),
                            generator=gen)
        C.sync(a.device)
        t2 = time.perf_counter()
        last.update(feature_pass_s=t1 - t0, head_epochs_s=t2 - t1)
        return epochs * len(images)

    run(x_all[: min(n, 2 * bs)], 1)    # warm-up

    def step():
        return run(x_all, a.epochs)

    serve(step, {"phase": "c_feat", "epochs": a.epochs, "images_in_set": n, "batch_size": bs, "last": last,
                 "path": f"backbone_features once + {a.epochs} x engine.train_one_epoch(head on cached features)"},
          a.device)


# ---------------------------------------------------------------------------------------------------
# decoded cache: one-off costs
# ---------------------------------------------------------------------------------------------------

def phase_cache(a) -> None:
    from covid_cls.data import DecodedCache, scan_dataset

    info = scan_dataset(a.root, splits=("train",))
    split = info.splits["train"]
    n = len(split.files)
    for p in split.files:          # same OS page-cache state for every variant: files read once first
        p.read_bytes()
    ncpu = os.cpu_count() or 1
    out = {"phase": "cache", "images": n, "cpu_count": ncpu}
    work = Path(tempfile.mkdtemp(prefix="cc-bench-cache-"))
    cold = {w: [] for w in sorted({1, ncpu})}
    try:
        for rep in range(a.cache_repeats):     # 1 thread and all cores alternately: same background load
            for w in cold:
                DecodedCache.clear_memory()
                d = work / f"r{rep}-w{w}"
                t0 = time.perf_counter()
                DecodedCache(256, cache_dir=d, workers=w).get(split, info.root)
                cold[w].append(time.perf_counter() - t0)
        cache = DecodedCache(256, cache_dir=work / f"r0-w{ncpu}", workers=ncpu)
        hits, disk = [], []
        for _ in range(a.cache_repeats):
            t0 = time.perf_counter()
            cache.get(split, info.root)
            hits.append(time.perf_counter() - t0)
            DecodedCache.clear_memory()
            t0 = time.perf_counter()
            d = DecodedCache(256, cache_dir=work / f"r0-w{ncpu}", workers=ncpu).get(split, info.root)
            disk.append(time.perf_counter() - t0)
        out["memory_hit_s"], out["disk_hit_s"], out["bytes"] = C.median(hits), C.median(disk), d.images.numel()
    finally:
        shutil.rmtree(work, ignore_errors=True)
        DecodedCache.clear_memory()
    for w, ts in cold.items():
        out[f"cold_w{w}_s"] = C.median(ts)
        out[f"cold_w{w}_runs"] = ts
    serial = out["cold_w1_s"] / n
    eff = (out["cold_w1_s"] / out[f"cold_w{ncpu}_s"]) / ncpu if ncpu > 1 else 1.0
    out["parallel_efficiency"] = eff
    # 12,000 images on 16 cores, assuming the per-image cost and the parallel efficiency measured here
    out["est_12000_16cores_s"] = 12000 * serial / (16 * min(1.0, eff))
    out["est_12000_disk_hit_s"] = out["disk_hit_s"] * 12000 / n
    _finish(out, "cpu")


# ---------------------------------------------------------------------------------------------------
# driver
# ---------------------------------------------------------------------------------------------------

PHASES = {"a": phase_2020, "a_data": phase_2020_data, "b": phase_compute, "c": phase_covid,
          "c_feat": phase_covid_features, "cache": phase_cache}


class Child:
    """One phase in its own process, driven over stdin/stdout (see ``serve``)."""

    def __init__(self, args, phase: str, arch: str, level: str, env: dict):
        self.phase, self.arch, self.level = phase, arch, level
        cmd = [sys.executable, __file__, "--_phase", phase, "--_root", str(args.root), "--device", args.device,
               "--precision", args.precision,
               "--archs", arch, "--levels", level, "--seconds", str(args.seconds), "--warmup", str(args.warmup),
               "--batch-size", str(args.batch_size), "--epochs", str(args.epochs), "--rounds", str(args.rounds),
               "--cache-repeats", str(args.cache_repeats)]
        self.err = tempfile.TemporaryFile(mode="w+")
        print(f"  start {phase:6s} {arch} {level} ...", file=sys.stderr, flush=True)
        self.p = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.err, text=True,
                                  env={**os.environ, **env}, bufsize=1)
        self.times: list[float] = []
        self.imgs: list[int] = []
        self.rates: list[float] = []
        self.error: str | None = None
        self.info: dict = {}

    def wait_ready(self) -> Child:
        self.info = self._read()
        return self

    def _read(self) -> dict:
        for line in self.p.stdout:
            if line.startswith(RESULT):
                return json.loads(line[len(RESULT):])
        self.p.wait()
        self.err.seek(0)
        tail = self.err.read()
        sys.stderr.write(tail[-3000:])
        self.error = (tail.strip().splitlines() or ["exited without a result"])[-1]
        return {}

    def run(self, seconds: float) -> None:
        if self.error:
            return
        self.p.stdin.write(f"run {seconds}\n")
        self.p.stdin.flush()
        r = self._read()
        if r:
            self.times += r["times"]
            self.imgs += r["imgs"]
            self.rates.append(sum(r["imgs"]) / max(sum(r["times"]), 1e-9))

    def end(self) -> dict:
        if not self.error:
            self.p.stdin.write("end\n")
            self.p.stdin.flush()
            self.info = self._read() or self.info
            self.p.wait()
        if self.error:
            return {"phase": self.phase, "error": self.error}
        busy = sum(self.times)
        return {**self.info, "img_s": sum(self.imgs) / max(busy, 1e-9), "images": sum(self.imgs),
                "seconds": busy, "calls": len(self.times), "call_ms_median": C.median(self.times) * 1000,
                "slice_img_s": self.rates, "slice_img_s_median": C.median(self.rates)}


def run_once(args, phase: str, env: dict) -> dict:
    """A one-shot phase (the decoded-cache costs): the child prints one result and exits."""
    ch = Child(args, phase, "resnet18", "full", env).wait_ready()
    ch.p.wait()
    return ch.info if not ch.error else {"phase": phase, "error": ch.error}


def run_group(args, arch: str, level: str, env: dict) -> dict:
    phases = [ph for ph in ("a", "a_data", "b", "c") if ph in args.phases]
    if level == "fc" and "c_feat" in args.phases:
        phases.append("c_feat")
    # set-up + warm-up of all phases at once (not timed), then the timed slices one child at a time
    children = [Child(args, ph, arch, level, env) for ph in phases]
    for ch in children:
        ch.wait_ready()
    for r in range(args.rounds):
        for ch in (children if r % 2 == 0 else children[::-1]):       # alternate the order every round
            if ch.phase == "c_feat" and r not in (0, args.rounds - 1):
                continue   # one call is a whole feature pass + 10 epochs: the first and last rounds suffice
            print(f"  round {r + 1}/{args.rounds} {ch.phase:6s} {arch} {level}", file=sys.stderr, flush=True)
            ch.run(args.seconds / args.rounds)
    out = {"arch": arch, "level": level, **{ch.phase: ch.end() for ch in children}}
    # ratios within each round (adjacent slices, so the same background load), then their median
    rates = {ch.phase: ch.rates for ch in children if not ch.error}
    for num, den in (("c", "a"), ("c", "b"), ("b", "a")):
        pairs = list(zip(rates.get(num, []), rates.get(den, [])))
        out[f"{num}/{den}_round_median"] = C.median(x / y for x, y in pairs if y) if pairs else None
    return out


def subset_folder(src: Path, n: int, dst: Path) -> Path:
    """A train/ split of at most n images of ``src`` (balanced, first by name) as symlinks: no copying."""
    per = {}
    for cls in ("infected", "normal"):
        files = sorted(p for p in (src / "train" / cls).iterdir() if p.is_file())
        per[cls] = files
    k = {"infected": min(len(per["infected"]), n - min(len(per["normal"]), n // 2))}
    k["normal"] = min(len(per["normal"]), n - k["infected"])
    for cls, files in per.items():
        d = dst / "train" / cls
        d.mkdir(parents=True, exist_ok=True)
        for f in files[: k[cls]]:
            (d / f.name).symlink_to(f.resolve())
    return dst


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", help="ImageFolder root with train/ (default: generate 1024x1024 PNGs)")
    ap.add_argument("--device", default="auto", help="cpu | cuda | auto")
    ap.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16"],
                    help="covid_cls's (b) and (c); the 2020 loop is always fp32 (auto: engine.Runtime's choice)")
    ap.add_argument("--archs", nargs="+", default=["resnet18", "vgg16"])
    ap.add_argument("--levels", nargs="+", default=["fc", "partial", "full"])
    ap.add_argument("--seconds", type=float, default=None, help="timed seconds per phase (default 20 CPU, 8 CUDA)")
    ap.add_argument("--n-images", type=int, default=None,
                    help="generated images (default 96 CPU / 512 CUDA); with --data: at most this many (symlinks)")
    ap.add_argument("--gen-dir", help="where to generate the PNGs (kept and reused); default a temp dir")
    ap.add_argument("--warmup", type=int, default=None, help="warm-up steps/calls per phase (default 1 CPU, 3 CUDA)")
    ap.add_argument("--batch-size", type=int, default=0, help="covid_cls batch size (0: default_batch_size)")
    ap.add_argument("--epochs", type=int, default=10, help="epochs for the fc+feat row")
    ap.add_argument("--phases", nargs="+", default=["cache", "a", "a_data", "b", "c", "c_feat"])
    ap.add_argument("--cache-repeats", type=int, default=3, help="cold decodes per thread count (median)")
    ap.add_argument("--rounds", type=int, default=6, help="interleaved slices per phase (seconds/rounds each)")
    ap.add_argument("--json", help="also write all results to this JSON file")
    ap.add_argument("--_phase", help=argparse.SUPPRESS)
    ap.add_argument("--_root", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    args.device = C.resolve_device(args.device)
    cuda = args.device.startswith("cuda")
    args.seconds = args.seconds if args.seconds is not None else (8.0 if cuda else 20.0)
    args.warmup = args.warmup if args.warmup is not None else (3 if cuda else 1)
    if not args.batch_size:
        from covid_cls.config import default_batch_size

        args.batch_size = default_batch_size(args.device)

    if args._phase:   # child process
        args.root, args.arch, args.level = args._root, args.archs[0], args.levels[0]
        PHASES[args._phase](args)
        return 0

    tmp = Path(tempfile.mkdtemp(prefix="cc-bench-tp-"))
    try:
        if args.data:
            src = Path(args.data).expanduser().resolve()
            args.root = subset_folder(src, args.n_images, tmp / "subset") if args.n_images else src
            data_desc = f"{src}" + (f" (first {args.n_images} train images, symlinked)" if args.n_images else "")
        else:
            n = args.n_images or (512 if cuda else 96)
            root = Path(args.gen_dir) if args.gen_dir else tmp / "png1024"
            print(f"generating {n} synthetic 1024x1024 8-bit PNGs in {root} ...", file=sys.stderr, flush=True)
            args.root = C.make_png_dataset(root, {"train": n}, size=1024)
            data_desc = f"{n} synthetic 1024x1024 8-bit grayscale PNGs (covid_cls.synthetic.synthetic_xray)"
        # a private decoded-cache folder: phase c starts from a disk hit of its own decode, never a stale one
        env = {"COVID_CLS_CACHE": str(tmp / "decoded")}
        results = {"data": data_desc, "device": C.device_name(args.device), "rows": [], "cache": None}
        if "cache" in args.phases:
            results["cache"] = run_once(args, "cache", env)
        for arch in args.archs:
            for level in args.levels:
                results["rows"].append(run_group(args, arch, level, env))
        print(report(args, results, data_desc))
        C.dump_json(args.json, results)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


def report(args, res: dict, data_desc: str) -> str:
    out = [C.header("train_throughput", args.device), f"data: {data_desc}",
           f"{args.seconds:g} s timed per phase, in {args.rounds} interleaved slices, after {args.warmup} warm-up "
           f"step(s)/call(s); (a) batch 8; (b) and (c) batch {args.batch_size}"]
    g = lambda d, k: (d or {}).get(k)  # noqa: E731
    runtimes = sorted({g(r.get(p), "runtime") for r in res["rows"] for p in ("b", "c") if g(r.get(p), "runtime")})
    out += [f"(a) runs fp32, contiguous (the 2020 way); (b) and (c) run as engine.Runtime: {', '.join(runtimes)}", ""]

    def spread(d):
        r = g(d, "slice_img_s") or []
        return f"{min(r):.1f}-{max(r):.1f}" if r else "–"

    rows = []
    for r in res["rows"]:
        a, b, c = r.get("a"), r.get("b"), r.get("c")
        ia, ib, ic = g(a, "img_s"), g(b, "img_s"), g(c, "img_s")
        mem = "/".join(C.fmt(g(x, "peak_rss_mb"), 0) for x in (a, b, c))
        cmem = "/".join(C.fmt(g(x, "cuda_peak_mb"), 0) for x in (a, b, c))
        step_ms = g(c, "call_ms_median") / g(c, "steps_per_call") if g(c, "call_ms_median") else None
        errs = "; ".join(f"{k}: {v['error']}" for k, v in r.items() if isinstance(v, dict) and "error" in v)
        idata = g(r.get("a_data"), "img_s")
        rows.append([r["arch"], r["level"], ia, idata, ib, ic, (ic / ia) if ia and ic else None,
                     (ic / ib) if ib and ic else None, r.get("c/a_round_median"), r.get("c/b_round_median"),
                     r.get("b/a_round_median"), step_ms, f"{spread(a)} / {spread(b)} / {spread(c)}", mem,
                     cmem, errs])
        cf = r.get("c_feat")
        if cf and "img_s" in cf:
            last = cf.get("last") or {}
            rows.append([r["arch"], "fc+feat", ia, None, None, cf["img_s"], cf["img_s"] / ia if ia else None, None,
                         None, None, None, None, f"– / – / {spread(cf)}", f"– / – / {C.fmt(cf.get('peak_rss_mb'), 0)}",
                         f"– / – / {C.fmt(cf.get('cuda_peak_mb'), 0)}",
                         f"last call: feature pass {last.get('feature_pass_s', float('nan')):.2f} s + "
                         f"{cf['epochs']} head epochs {last.get('head_epochs_s', float('nan')):.2f} s, "
                         f"{cf['images_in_set']} images"])
        elif cf and "error" in cf:
            rows.append([r["arch"], "fc+feat"] + [None] * 13 + [cf["error"]])
    out.append(C.table(["arch", "level", "(a) 2020 img/s", "(a) data only img/s", "(b) compute img/s",
                        "(c) covid_cls img/s", "(c)/(a)", "(c)/(b)", "(c)/(a) round med", "(c)/(b) round med",
                        "(b)/(a) round med", "(c) ms/step", "per-slice img/s a / b / c", "peak RSS MB a/b/c",
                        "CUDA peak MB a/b/c", "note"], rows))
    out.append("\nimg/s = images / time spent in the phase's timed calls (sum over slices); 'round med' = median "
               "over rounds of the ratio of adjacent slices (robust to load that changes during the run); (b)/(a) "
               "is the ceiling of (c)/(a): a data path that cost nothing would reach (b). (a) data only = the "
               "2020 DataLoader alone (decode + PIL transforms, no model). "
               "(c) = engine.train_one_epoch over engine._Batches of the DecodedCache images on the device with "
               "engine._image_forward (data.train_batch augmentation): the image path of fit (levels partial, "
               "full; fc with feature_cache=False). fc+feat = fit's default at level fc: one backbone_features "
               f"pass + {args.epochs} epochs of the head on the cached features; img/s = {args.epochs} x images / "
               "total time, compared with (a) doing the same epochs by full forward passes.")
    cache = res.get("cache")
    if cache and "error" not in cache:
        ncpu = cache["cpu_count"]
        out += ["", f"decoded cache (256 px uint8), {cache['images']} images, {cache['bytes'] / 2**20:.1f} MB, "
                f"medians of {args.cache_repeats} runs each:", ""]
        out.append(C.table(
            ["cold, 1 thread s", f"cold, {ncpu} threads s", "ms/img (1 thread)", "parallel efficiency",
             "memory hit s", "disk hit s", "est. 12,000 imgs cold on 16 cores s", "est. 12,000 disk hit s"],
            [[f"{cache['cold_w1_s']:.2f}", f"{cache[f'cold_w{ncpu}_s']:.2f}",
              cache["cold_w1_s"] / cache["images"] * 1000, f"{cache['parallel_efficiency']:.2f}",
              f"{cache['memory_hit_s']:.4f}", f"{cache['disk_hit_s']:.3f}", cache["est_12000_16cores_s"],
              cache["est_12000_disk_hit_s"]]]))
        out.append("(estimates: measured 1-thread cost per image x 12,000 / (16 x measured parallel efficiency); "
                   "disk hit scaled by image count, files in the OS page cache)")
    elif cache:
        out.append(f"\ndecoded cache: error {cache['error']}")
    return "\n".join(out)


if __name__ == "__main__":
    sys.exit(main())
