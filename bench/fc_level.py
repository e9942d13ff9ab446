"""Level fc, 10 epochs: the 2020 way vs covid_cls, with one frozen forward pass as the yardstick.

  yardstick  one frozen forward pass over every image of the dataset (train + validation + test):
             `engine.backbone_features` over the decoded uint8 images on the device, eval preset, batch 64
             (fit's own feature pass; measured before and after fit, the mean is the yardstick).
  covid_cls  `fit(TrainConfig(level="fc", epochs=10, ...))` end to end, decoded cache warm (memory hit: the
             cold decode is reported on its own): scan, model, feature pass, 10 head epochs + validation,
             temperature, test metrics, OOD statistics where the engine has them, atomic checkpoint save.
  2020 way   torchvision ImageFolder + PIL transforms (RandomRotation(30), RandomResizedCrop(224),
             RandomHorizontalFlip, ToTensor, Normalize), batch 8, num_workers 0, fp32, SGD 1e-3/0.9 on the
             head, a full forward pass through the frozen backbone every step; a validation pass per epoch
             (Resize(256), CenterCrop(224)) and a test pass at the end. On the CPU it is timed for
             --epochs-2020 epoch(s) and extrapolated to 10 (the output says so).
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import _common as C


def run_2020(arch: str, root: Path, device: str, epochs: int) -> dict:
    import torch
    import torchvision.transforms as T
    from torch import nn
    from torch.utils.data import DataLoader
    from torchvision.datasets import ImageFolder

    from train_throughput import IMAGENET_MEAN, IMAGENET_STD, model_2020, transforms_2020

    torch.manual_seed(0)
    eval_tf = T.Compose([T.Resize(256), T.CenterCrop(224), T.ToTensor(), T.Normalize(IMAGENET_MEAN, IMAGENET_STD)])
    train = DataLoader(ImageFolder(str(root / "train"), transforms_2020()), batch_size=8, shuffle=True)
    val_dir = next(root / n for n in ("validation", "val", "valid") if (root / n).is_dir())
    val = DataLoader(ImageFolder(str(val_dir), eval_tf), batch_size=8)
    test = DataLoader(ImageFolder(str(root / "test"), eval_tf), batch_size=8)
    model = model_2020(arch, "fc").to(device)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-3, momentum=0.9)
    crit = nn.CrossEntropyLoss()

    def evaluate(loader):
        model.eval()
        correct = 0
        with torch.no_grad():
            for x, y in loader:
                x, y = x.to(device), y.to(device)
                correct += (model(x).argmax(1) == y).sum().item()
        return correct

    # warm-up: one step (allocator, kernels), not counted
    x, y = next(iter(train))
    model.train()
    opt.zero_grad()
    crit(model(x.to(device)), y.to(device)).backward()
    opt.step()
    C.sync(device)

    t_train = t_val = 0.0
    for _ in range(epochs):
        model.train()
        t0 = time.perf_counter()
        running = 0.0
        for x, y in train:
            x, y = x.to(device), y.to(device)
            opt.zero_grad()
            loss = crit(model(x), y)
            loss.backward()
            opt.step()
            running += loss.item() * x.size(0)
        C.sync(device)
        t1 = time.perf_counter()
        evaluate(val)
        C.sync(device)
        t_train += t1 - t0
        t_val += time.perf_counter() - t1
    t0 = time.perf_counter()
    evaluate(test)
    C.sync(device)
    t_test = time.perf_counter() - t0
    per_epoch = (t_train + t_val) / epochs
    return {"epochs_timed": epochs, "train_epoch_s": t_train / epochs, "val_pass_s": t_val / epochs,
            "test_pass_s": t_test, "ten_epochs_s": 10 * per_epoch + t_test, "extrapolated": epochs < 10,
            "peak_rss_mb": C.peak_rss_mb()}


def run_covid(arch: str, root: Path, device: str, out_dir: Path, batch_size: int, repeats: int,
              precision: str = "auto") -> dict:
    import torch

    from covid_cls import engine
    from covid_cls.config import TrainConfig, default_batch_size
    from covid_cls.data import DecodedCache, scan_dataset

    bs = batch_size or default_batch_size(device)
    cfg = TrainConfig(data_dir=str(root), arch=arch, level="fc", epochs=10, weights="none", device=device,
                      batch_size=bs, out_dir=str(out_dir), precision=precision)
    rt = engine.Runtime.create(device, precision)
    dev = rt.device
    info = scan_dataset(root)

    # cold decode of every split (memory cache cleared, a fresh cache folder), then kept in memory for fit
    DecodedCache.clear_memory()
    cache_dir = Path(tempfile.mkdtemp(prefix=f"decoded-{arch}-", dir=os.environ["COVID_CLS_CACHE"]))
    t0 = time.perf_counter()
    decoded = {k: DecodedCache(cfg.cache_size, cache_dir=cache_dir).get(s, info.root) for k, s in info.splits.items()}
    t_decode = time.perf_counter() - t0
    images = torch.cat([d.images for d in decoded.values()]).to(dev)
    n = len(images)

    from covid_cls.models import build_model

    model = rt.model(build_model(arch, "fc", weights="none"))

    def yardstick() -> float:
        engine.backbone_features(model, images[: min(n, 8)], cfg, rt, max(bs, 64))   # warm-up
        C.sync(device)
        t = time.perf_counter()
        engine.backbone_features(model, images, cfg, rt, max(bs, 64))
        C.sync(device)
        return time.perf_counter() - t

    def one_fit() -> dict:
        # fit, with its feature pass and checkpoint save timed from outside (wrappers, no library change)
        spans: dict[str, float] = {"features": 0.0, "save": 0.0}
        orig_bf, orig_save = engine.backbone_features, engine.save_checkpoint

        def timed(name, fn):
            def wrapper(*a, **k):
                t = time.perf_counter()
                try:
                    return fn(*a, **k)
                finally:
                    C.sync(device)
                    spans[name] += time.perf_counter() - t
            return wrapper

        engine.backbone_features = timed("features", orig_bf)
        engine.save_checkpoint = timed("save", orig_save)
        epochs_s: list[float] = []
        try:
            t0 = time.perf_counter()
            engine.fit(cfg, on_event=lambda e: e.type == "epoch" and epochs_s.append(e.seconds))
            C.sync(device)
            t_fit = time.perf_counter() - t0
        finally:
            engine.backbone_features, engine.save_checkpoint = orig_bf, orig_save
        return {"fit_s": t_fit, "fit_features_s": spans["features"], "fit_save_s": spans["save"],
                "fit_epochs_s": sum(epochs_s), "epoch_s": epochs_s}

    # yardstick, fit, yardstick, fit, ..., yardstick: each fit is compared with the passes just before and after
    ys, fits = [yardstick()], []
    for _ in range(repeats):
        fits.append(one_fit())
        ys.append(yardstick())
    ratios = [f["fit_s"] / ((ys[i] + ys[i + 1]) / 2) for i, f in enumerate(fits)]
    best = sorted(range(len(fits)), key=lambda i: ratios[i])[len(fits) // 2]   # the median run (upper)
    return {"images": n, "decode_cold_s": t_decode, "yardstick_s": C.median(ys), "yardstick_runs": ys,
            **fits[best], "fit_runs_s": [f["fit_s"] for f in fits], "ratio_runs": ratios,
            "ratio_median": C.median(ratios), "batch_size": bs, "peak_rss_mb": C.peak_rss_mb(),
            "cuda_peak_mb": C.cuda_peak_mb(device)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", help="ImageFolder root with train/ validation/ test/ (default: generate 1024^2 PNGs)")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16"],
                    help="covid_cls's precision (the 2020 way is always fp32)")
    ap.add_argument("--archs", nargs="+", default=["resnet18", "vgg16"])
    ap.add_argument("--n-train", type=int, default=None,
                    help="generated train images (default 128 CPU / 1024 CUDA); validation and test get 1/4 each")
    ap.add_argument("--gen-dir", help="where to generate the PNGs (kept and reused); default a temp dir")
    ap.add_argument("--epochs-2020", type=int, default=None,
                    help="epochs of the 2020 way actually run (default 1 CPU / 2 CUDA), extrapolated to 10")
    ap.add_argument("--batch-size", type=int, default=0, help="covid_cls batch size (0: default_batch_size)")
    ap.add_argument("--repeats", type=int, default=2,
                    help="fits per arch, each between two yardstick passes (median reported)")
    ap.add_argument("--json")
    args = ap.parse_args(argv)
    device = C.resolve_device(args.device)
    cuda = device.startswith("cuda")
    epochs_2020 = args.epochs_2020 or (2 if cuda else 1)

    tmp = Path(tempfile.mkdtemp(prefix="cc-bench-fc-"))
    import os

    os.environ["COVID_CLS_CACHE"] = str(tmp / "decoded")     # cold decode, never a stale cache
    (tmp / "decoded").mkdir()
    try:
        if args.data:
            root = Path(args.data).expanduser().resolve()
            desc = str(root)
        else:
            n = args.n_train or (1024 if cuda else 128)
            root = Path(args.gen_dir) if args.gen_dir else tmp / "png1024"
            print(f"generating {n} + {n // 4} + {n // 4} synthetic 1024x1024 PNGs in {root} ...", file=sys.stderr)
            C.make_png_dataset(root, {"train": n, "validation": n // 4, "test": n // 4}, size=1024)
            desc = f"{n} train + {n // 4} validation + {n // 4} test synthetic 1024x1024 8-bit PNGs"
        rows, results = [], {"data": desc, "device": C.device_name(device), "archs": {}}
        for arch in args.archs:
            print(f"  {arch}: covid_cls fit + yardstick ...", file=sys.stderr, flush=True)
            cv = run_covid(arch, root, device, tmp / f"ckpt-{arch}", args.batch_size, args.repeats, args.precision)
            print(f"  {arch}: the 2020 way, {epochs_2020} epoch(s) ...", file=sys.stderr, flush=True)
            old = run_2020(arch, root, device, epochs_2020)
            results["archs"][arch] = {"covid": cv, "2020": old}
            y = cv["yardstick_s"]
            other = cv["fit_s"] - cv["fit_features_s"] - cv["fit_save_s"] - cv["fit_epochs_s"]
            rows.append([arch, cv["images"], f"{y:.2f}", f"{cv['fit_s']:.2f}", f"{cv['fit_features_s']:.2f}",
                         f"{cv['fit_epochs_s']:.2f}", f"{cv['fit_save_s']:.2f}", f"{other:.2f}",
                         f"{cv['ratio_median']:.2f}", f"{cv['decode_cold_s']:.2f}",
                         f"{(cv['fit_s'] + cv['decode_cold_s']) / y:.2f}",
                         f"{old['ten_epochs_s']:.1f}" + (" (extrap.)" if old["extrapolated"] else ""),
                         f"{old['ten_epochs_s'] / y:.1f}", f"{old['ten_epochs_s'] / cv['fit_s']:.1f}",
                         C.fmt(max(cv["peak_rss_mb"], old["peak_rss_mb"]), 0), C.fmt(cv["cuda_peak_mb"], 0)])
        print(C.header("fc_level", device))
        print(f"data: {desc}")
        print(f"covid_cls batch {rows and results['archs'][args.archs[0]]['covid']['batch_size']}; the 2020 way batch "
              f"8, timed for {epochs_2020} epoch(s) (train + validation pass) + the test pass"
              + (f", extrapolated x{10 / epochs_2020:g} to 10 epochs" if epochs_2020 < 10 else "") + "\n")
        print(C.table(["arch", "images", "yardstick: 1 frozen pass s", "fit 10 ep s", "of which feature pass s",
                       "10 epochs s", "save s", "other s", "fit / yardstick", "cold decode s",
                       "(fit + decode) / yardstick", "2020 way 10 ep s", "2020 / yardstick", "2020 / fit",
                       "peak RSS MB", "CUDA peak MB"], rows))
        print(f"\nyardstick = engine.backbone_features over all splits (median of {args.repeats + 1} passes, "
              f"one before and one after each of {args.repeats} fits); fit = engine.fit end to end with the decoded "
              "cache in memory (the median run shown); fit / yardstick = median over fits of fit time / mean of the "
              "passes just before and after it; 'other' = scan, model build, temperature, final metrics, OOD "
              "statistics, best-epoch state copies. Target: fit / yardstick <= 1.5.")
        for arch, r in results["archs"].items():
            o = r["2020"]
            print(f"{arch} 2020 way per epoch: train {o['train_epoch_s']:.2f} s + validation {o['val_pass_s']:.2f} s; "
                  f"test pass {o['test_pass_s']:.2f} s; yardstick runs "
                  + ", ".join(f"{v:.2f}" for v in r["covid"]["yardstick_runs"]) + " s; fit runs "
                  + ", ".join(f"{v:.2f}" for v in r["covid"]["fit_runs_s"]) + " s; covid_cls epoch seconds "
                  + ", ".join(f"{v:.2f}" for v in r["covid"]["epoch_s"]))
        C.dump_json(args.json, results)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
