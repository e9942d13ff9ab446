"""How often the out-of-distribution warning fires on X-rays vs generated non-X-ray images.

    python bench/ood_rates.py [--real ../shared/data/cxr-real] [--epochs 10]

Trains (or reuses with --checkpoint) a ResNet18 · fc model, then runs Predictor.predict on
  * synthetic X-rays (a held-out synthetic test split) and, when present, the real cxr-real test split,
  * generated non-X-ray images: colour scenes, the same scenes in gray, text pages, noise, shapes,
and prints the flagged rate per set (targets: X-rays <= 5 % flagged, non-X-rays >= 95 % flagged).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from covid_cls import Predictor, TrainConfig, fit, make_demo_dataset
from covid_cls.synthetic import non_xray_images


def rates(pred: Predictor, ck: Path, images) -> tuple[int, int, dict[str, int]]:
    flagged, reasons = 0, {}
    for im in images:
        p = pred.predict(im, checkpoint=ck)
        if p.ood["flagged"]:
            flagged += 1
            for r in p.ood["reasons"]:
                key = r.split(" (")[0].split(";")[0][:40]
                reasons[key] = reasons.get(key, 0) + 1
    return flagged, len(images), reasons


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--real", default=str(Path(__file__).resolve().parents[2] / "shared" / "data" / "cxr-real"))
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--n", type=int, default=40, help="non-X-ray images per kind")
    ap.add_argument("--image-size", type=int, default=224)
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="ood_"))
    sets = {}
    synth = make_demo_dataset(tmp / "synth", n_per_class=60, size=256, seed=11)
    real = Path(args.real)
    models = {"synthetic": synth}
    if (real / "train").is_dir():
        models["cxr-real"] = real
    non_x = non_xray_images(args.n, 320, seed=5)
    print(f"{'model trained on':<18} {'images':<26} {'flagged':>9} {'rate':>7}  top reasons")
    for name, data in models.items():
        t0 = time.time()
        ck = fit(TrainConfig(data_dir=str(data), arch="resnet18", level="fc", epochs=args.epochs, weights="auto",
                             image_size=args.image_size, out_dir=str(tmp / f"ck-{name}"), optimizer="adam"))
        pred = Predictor(ck.parent)
        sets = {"synthetic X-rays (test)": sorted((synth / "test").rglob("*.png"))}
        if (real / "test").is_dir():
            sets["cxr-real X-rays (test)"] = sorted((real / "test").rglob("*.jpg"))
        sets.update({f"non-X-ray: {k}": v for k, v in non_x.items()})
        for set_name, images in sets.items():
            f, n, reasons = rates(pred, ck, images)
            top = ", ".join(f"{k} {v}" for k, v in sorted(reasons.items(), key=lambda kv: -kv[1])[:2])
            print(f"{name:<18} {set_name:<26} {f:>4}/{n:<4} {f / n:>6.1%}  {top}")
        print(f"  (train + measure {time.time() - t0:.0f}s)")


if __name__ == "__main__":
    main()
