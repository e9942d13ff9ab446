"""Batch prediction vs one image at a time, side by side in one run (same model, same images).

    python bench/batch_predict.py --checkpoint checkpoints/X.safetensors --images ../shared/data/cxr-real/test \
        --n 50 --batch-sizes 1 8 16 --repeats 3

Prints images/s (median of the repeats) for `Predictor.predict` in a loop and `Predictor.predict_batch` at each
batch size, the ratio to the loop, and the process's peak RSS (ru_maxrss) after each variant. Decoding,
Grad-CAM, the OOD check and the overlays are included in both: this is what a user of "predict a folder" waits for.
"""

from __future__ import annotations

import argparse
import resource
import statistics
import time
from pathlib import Path


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", type=Path, required=True)
    p.add_argument("--images", type=Path, required=True, help="a folder (searched recursively)")
    p.add_argument("--n", type=int, default=50)
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8, 16])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--device", default="auto")
    a = p.parse_args()

    from covid_cls import Predictor

    files = sorted(f for f in a.images.rglob("*") if f.suffix.lower() in (".png", ".jpg", ".jpeg"))[: a.n]
    data = [f.read_bytes() for f in files]
    pred = Predictor(a.checkpoint.parent, device=a.device)
    pred.predict(data[0], checkpoint=a.checkpoint)                 # load + warm up outside the timings
    variants = {"loop of predict()": lambda: [pred.predict(d, checkpoint=a.checkpoint) for d in data]}
    for bs in a.batch_sizes:
        variants[f"predict_batch(batch_size={bs})"] = (
            lambda bs=bs: pred.predict_batch(data, checkpoint=a.checkpoint, batch_size=bs))
    times: dict[str, list[float]] = {k: [] for k in variants}
    peak: dict[str, float] = {}
    for _ in range(a.repeats):                                    # interleaved, so drift hits every variant
        for name, fn in variants.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
            peak[name] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    base = len(data) / statistics.median(times["loop of predict()"])
    print(f"{len(data)} images from {a.images}, {pred.device}, {a.repeats} repeats (median)\n")
    print("| variant | images/s | × loop | peak RSS so far (MB) |\n|---|---|---|---|")
    for name, ts in times.items():
        rate = len(data) / statistics.median(ts)
        print(f"| {name} | {rate:.1f} | {rate / base:.2f} | {peak[name]:.0f} |")


if __name__ == "__main__":
    main()
