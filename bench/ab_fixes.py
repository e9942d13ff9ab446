"""A/B of the speed edits made for issue 4, side by side in one run (call by call, interleaved).

  explain.CamExplainer   before: prepare_for_cam only (the whole target block trainable: ResNet18's backward
                         ran layer4.1's convolutions); after: + _narrow_cam_grads (one bias keeps the target
                         output in the graph). Same map (max |diff| printed).
  explain.overlay        before: three float passes over the image (copy of the old code below); after: one
                         lookup in a (gray, heat) table. Same bytes (checked).
  Predictor.predict      before: the old flow (map resized for Prediction.cam, then again inside overlay, old
                         overlay, whole block trainable); after: the current Predictor.predict.

The "before" code is a copy of the library as it was before the edits; it exists only here, for this check.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402


def overlay_before(image, cam, alpha=0.45, max_side=1024):
    import numpy as np
    from PIL import Image

    from covid_cls.explain import _jet_lut, resize_cam

    img = image.convert("L")
    if max_side and max(img.size) > max_side:
        scale = max_side / max(img.size)
        img = img.resize((max(1, round(img.width * scale)), max(1, round(img.height * scale))), Image.BILINEAR)
    cam = resize_cam(cam, img.size)
    gray = np.asarray(img, dtype=np.float32)[..., None]
    heat = _jet_lut()[(np.clip(cam, 0, 1) * 255).astype(np.uint8)].astype(np.float32)
    out = (1 - alpha) * gray + alpha * heat
    return Image.fromarray(np.clip(out, 0, 255).astype(np.uint8))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--archs", nargs="+", default=["resnet18", "vgg16"])
    ap.add_argument("--calls", type=int, default=50)
    ap.add_argument("--warmup", type=int, default=5)
    args = ap.parse_args(argv)
    device = C.resolve_device(args.device)

    import numpy as np
    import torch
    from covid_cls import explain
    from covid_cls.checkpoints import load_model
    from covid_cls.data import eval_batch, to_square_u8
    from covid_cls.explain import CamExplainer, overlay, resize_cam
    from covid_cls.imaging import load_image
    from covid_cls.predictor import Predictor

    import infer_latency as IL

    tmp = Path(tempfile.mkdtemp(prefix="cc-bench-ab-"))
    import os

    os.environ["COVID_CLS_CACHE"] = str(tmp / "decoded")
    try:
        image = C.make_png(tmp / "xray-1024.png", 1024, infected=True)
        ckpts = IL.train_tiny(args.archs, tmp / "checkpoints", tmp, device)
        print(C.header("ab_fixes", device))
        rows = []
        for arch in args.archs:
            dev = torch.device(device)
            plain, card = load_model(ckpts[arch], dev)
            plain.eval()
            m_before, _ = load_model(ckpts[arch], dev)
            m_after, _ = load_model(ckpts[arch], dev)
            narrow = explain._narrow_cam_grads
            explain._narrow_cam_grads = lambda *a, **k: None
            try:
                ex_before = CamExplainer(m_before, arch)
            finally:
                explain._narrow_cam_grads = narrow
            ex_after = CamExplainer(m_after, arch)
            pred = Predictor(ckpts[arch].parent, device=device)
            pred.predict(image, arch=arch, level="fc", checkpoint=ckpts[arch])
            img = load_image(image)
            x = eval_batch(torch.from_numpy(to_square_u8(img, card.get("cache_size", 256)))[None, None].to(dev),
                           card.get("image_size", 224))
            _, cam = ex_after(x)
            cam_full = resize_cam(cam, img.size)
            trainable = {"before": [n for n, p in m_before.named_parameters() if p.requires_grad],
                         "after": [n for n, p in m_after.named_parameters() if p.requires_grad]}
            diff = float(np.abs(ex_before(x)[1] - ex_after(x)[1]).max())
            same_overlay = np.array_equal(np.asarray(overlay_before(img, cam)), np.asarray(overlay(img, cam_full)))

            def predict_before():
                # the pre-edit Predictor.predict flow, on the pre-edit explainer
                from covid_cls.ood import assess, layout_features

                im = load_image(image)
                u8 = torch.from_numpy(to_square_u8(im, card.get("cache_size", 256)))[None, None]
                xx = eval_batch(u8.to(dev), card.get("image_size", 224))
                logits, c, pooled = ex_before(xx, return_pooled=True)
                torch.softmax(logits[0] / float(card.get("temperature", 1.0)), dim=0).tolist()
                resize_cam(c, im.size)
                assess(im, pooled, layout_features(u8), pred._get(ckpts[arch]).ood_stats)
                overlay_before(im, c, 0.45)

            def fwd():
                with torch.inference_mode():
                    plain(x)

            variants = {
                "forward (floor)": fwd,
                "CamExplainer before": lambda: ex_before(x),
                "CamExplainer after": lambda: ex_after(x),
                "overlay before": lambda: overlay_before(img, cam),
                "overlay after (224 map)": lambda: overlay(img, cam),
                "overlay after (full map, as predict)": lambda: overlay(img, cam_full),
                "predict before": predict_before,
                "predict after": lambda: pred.predict(image, arch=arch, level="fc", checkpoint=ckpts[arch]),
            }
            times = {k: [] for k in variants}
            for i in range(args.warmup + args.calls):
                for k, fn in variants.items():
                    C.sync(device)
                    t0 = time.perf_counter()
                    fn()
                    C.sync(device)
                    if i >= args.warmup:
                        times[k].append((time.perf_counter() - t0) * 1000)
            fwd_ms = C.median(times["forward (floor)"])
            for k, v in times.items():
                rows.append([arch, k, C.median(v), C.pct(v, 95), f"{C.median(v) / fwd_ms:.2f}"])
            print(f"{arch}: trainable for Grad-CAM before {trainable['before']}, after {trainable['after']}; "
                  f"map max |diff| {diff:.1e}; overlay bytes identical: {same_overlay}")
        print()
        print(C.table(["arch", "variant", "median ms", "p95 ms", "x forward"], rows))
        print(f"\n{args.calls} calls per variant after {args.warmup} warm-up, interleaved call by call; "
              "image a synthetic 1024x1024 PNG; tiny checkpoints (weights='none').")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
