"""Precision and memory format on this device, side by side in one run: what `engine.Runtime` chooses.

For each arch x level: one training step (forward + backward + SGD step, batch --batch-size, 224 px random
tensors already in memory) and one no-grad eval batch (batch 64), in four variants:

  fp32            contiguous NCHW, fp32 (the 2020 notebook's way)
  channels_last   NHWC, fp32
  bf16            bf16 autocast, NCHW
  bf16+cl         bf16 autocast + NHWC (what Runtime.create picks on a CPU with native bf16, and on CUDA)

The variants run interleaved, call by call, so they see the same background load; medians and ratios to
fp32 are printed, with the process's peak RSS at the end. Also: the head alone (level fc on cached
features), where bf16 only adds weight casts.

    python bench/precision.py [--device cpu|cuda] [--archs resnet18 vgg16] [--levels full partial]
"""

from __future__ import annotations

import argparse
import sys
import time

import _common as C

VARIANTS = {"fp32": (False, False), "channels_last": (False, True), "bf16": (True, False), "bf16+cl": (True, True)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--archs", nargs="+", default=["resnet18", "vgg16"])
    ap.add_argument("--levels", nargs="*", default=["full", "partial"], help="none: only the head rows")
    ap.add_argument("--batch-size", type=int, default=0, help="training batch (0: config.default_batch_size)")
    ap.add_argument("--calls", type=int, default=5, help="timed calls per variant (after 1 warm-up)")
    ap.add_argument("--json")
    args = ap.parse_args(argv)

    import torch

    from covid_cls.config import default_batch_size
    from covid_cls.engine import Runtime, cpu_has_native_bf16
    from covid_cls.models import build_model

    device = C.resolve_device(args.device)
    dev = torch.device(device)
    bs = args.batch_size or default_batch_size(device)
    chosen = Runtime.create(dev, "auto")
    rows, results = [], []

    def timed(fns: dict, calls: int) -> dict:
        times = {k: [] for k in fns}
        for i in range(calls + 1):
            for k, fn in fns.items():
                C.sync(device)
                t0 = time.perf_counter()
                fn()
                C.sync(device)
                if i:
                    times[k].append(time.perf_counter() - t0)
        return {k: C.median(v) for k, v in times.items()}

    for arch in args.archs:
        for level in args.levels:
            torch.manual_seed(0)
            # one model (and optimiser) per memory format, so no call pays for a layout conversion
            models = {nhwc: Runtime(dev, False, nhwc).model(build_model(arch, level, weights="none"))
                      for nhwc in (False, True)}
            opts = {k: torch.optim.SGD([p for p in m.parameters() if p.requires_grad], lr=1e-3, momentum=0.9)
                    for k, m in models.items()}
            x, y = torch.randn(bs, 3, 224, 224, device=dev), torch.randint(0, 2, (bs,), device=dev)
            xe = torch.randn(64, 3, 224, 224, device=dev)

            def make(bf16: bool, nhwc: bool, train: bool):
                rt, model, opt = Runtime(dev, bf16, nhwc), models[nhwc], opts[nhwc]

                def fn():
                    if train:
                        model.train()
                        with rt.autocast():
                            loss = torch.nn.functional.cross_entropy(model(rt.input(x)).float(), y)
                        opt.zero_grad(set_to_none=True)
                        loss.backward()
                        opt.step()
                    else:
                        model.eval()
                        with torch.no_grad(), rt.autocast():
                            model(rt.input(xe))
                return fn

            for mode, n in (("train step", bs), ("eval batch", 64)):
                fns = {name: make(*VARIANTS[name], train=mode == "train step") for name in VARIANTS}
                med = timed(fns, args.calls)
                base = med["fp32"]
                row = [arch, level if mode == "train step" else "(eval)", mode]
                for name in VARIANTS:
                    row += [n / med[name], base / med[name]]
                rows.append(row)
                results.append({"arch": arch, "level": level, "mode": mode, "batch": n,
                                **{f"{k}_img_s": n / v for k, v in med.items()}})

    # the head alone, the way fit trains it at level fc: inside the whole model, on shuffled mini-batches of a
    # cached-feature matrix (an epoch over 1,200 images per call), fp32 vs bf16 autocast
    head_rows = []
    for arch in args.archs:
        model = build_model(arch, "fc", weights="none").to(dev)
        head = model.head.train()
        opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-3, momentum=0.9)
        feats = torch.randn(1200, head[0].in_features, device=dev)
        labels = torch.randint(0, 2, (1200,), device=dev)
        steps = len(feats) // bs

        def head_epoch(bf16: bool):
            rt = Runtime(dev, bf16, False)

            def fn():
                order = torch.randperm(len(feats), device=dev)
                for i in range(steps):
                    idx = order[i * bs:(i + 1) * bs]
                    with rt.autocast():
                        loss = torch.nn.functional.cross_entropy(head(feats[idx]).float(), labels[idx])
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()
            return fn

        med = timed({"fp32": head_epoch(False), "bf16": head_epoch(True)}, max(args.calls, 3))
        head_rows.append([arch, med["fp32"] / steps * 1000, med["bf16"] / steps * 1000, med["fp32"] / med["bf16"]])
        results.append({"arch": arch, "mode": "head step", "fp32_ms": med["fp32"] / steps * 1000,
                        "bf16_ms": med["bf16"] / steps * 1000})

    out = [C.header("precision", device),
           f"native bf16 (AVX512-BF16/AMX) on this CPU: {cpu_has_native_bf16()}; Runtime.create(auto) -> "
           f"{chosen.describe()}; {args.calls} timed calls per variant after 1 warm-up, interleaved", ""]
    heads = ["arch", "level", "what"]
    for name in VARIANTS:
        heads += [f"{name} img/s", f"{name} x fp32"]
    out.append(C.table(heads, rows))
    out += ["", f"head alone (level fc on cached features), batch {bs}, median ms per SGD step:", ""]
    out.append(C.table(["arch", "fp32 ms", "bf16 autocast ms", "fp32 / bf16"], head_rows))
    out.append(f"\npeak RSS {C.peak_rss_mb():.0f} MB" + (
        f", CUDA peak {C.cuda_peak_mb(device):.0f} MB" if device.startswith("cuda") else ""))
    print("\n".join(out))
    C.dump_json(args.json, results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
