"""Training throughput with 1 vs N processes (torchrun + DDP, issue 13), side by side in one run.

Every configuration is a real `python -m torch.distributed.run --standalone --nproc-per-node=N -m covid_cls train`
on the same generated synthetic images (NOT medical data), the decoded cache warmed first so that no run decodes.
Throughput is what `fit` itself records per epoch (card history `train.images_per_s`: images of the global batch
trained per second of the training pass, validation excluded), epoch 1 dropped as warm-up, median over the
remaining epochs of every round. Rounds alternate the order of the configurations (noise on a shared machine hits
all alike).

  CPU (default): N processes share the same cores, each with cores / N threads (OMP_NUM_THREADS), gloo.
      The ideal speed-up is 1.0: more processes only help if one process cannot use all cores itself.
  CUDA (--device cuda --procs 1,2,4,8): one GPU per process, NCCL; the ideal speed-up is N.

Scaling efficiency = speed-up / ideal. The batch per process is fixed (weak scaling: the global batch grows with
N), as DDP users run it; --strong keeps the global batch at --batch-size x the smallest N instead.

    python bench/scale.py                                   # CPU: 1 vs 2 processes, ResNet18 partial, 128 px
    python bench/scale.py --device cuda --procs 1,2,4,8 --image-size 224 --n 2048 --batch-size 64
    python bench/scale.py --level full --json scale.json
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import _common as C


def run_one(a, root: Path, nproc: int, out: Path, env: dict) -> dict:
    bs = a.batch_size if not a.strong else max(1, a.batch_size * min(a.procs) // nproc)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}", "-m",
           "covid_cls", "train", "--data", str(root), "--arch", a.arch, "--level", a.level, "--epochs",
           str(a.epochs), "--batch-size", str(bs), "--image-size", str(a.image_size), "--cache-size",
           str(a.cache_size), "--weights", "none", "--device", a.device, "--out", str(out), "--log-every", "1000"]
    t0 = C.now()
    r = subprocess.run(cmd, capture_output=True, text=True, env=env)
    wall = C.now() - t0
    if r.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{r.stdout[-2000:]}\n{r.stderr[-4000:]}")
    card = json.loads(next(out.glob("*.json")).read_text())
    shutil.rmtree(out)
    eps = [h["train"]["images_per_s"] for h in card["history"]]
    return {"procs": nproc, "batch_per_process": bs, "global_batch": card["distributed"]["global_batch"],
            "backend": card["distributed"]["backend"], "images_per_s": eps[1:] or eps,
            "epoch_s": [h["seconds"] for h in card["history"]][1:], "train_s": card["train_seconds"],
            "wall_s": wall, "precision": card["precision"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--procs", default=None, help="process counts, e.g. 1,2 (CPU default) or 1,2,4,8 (CUDA: the "
                                                  "ones that fit the GPUs present)")
    ap.add_argument("--arch", default="resnet18")
    ap.add_argument("--level", default="partial", choices=["partial", "full"])
    ap.add_argument("--n", type=int, default=0, help="training images (default 192 CPU, 2048 CUDA)")
    ap.add_argument("--image-size", type=int, default=0, help="default 128 CPU, 224 CUDA")
    ap.add_argument("--cache-size", type=int, default=0, help="default image size + 32")
    ap.add_argument("--batch-size", type=int, default=0, help="per process (default 16 CPU, 64 CUDA)")
    ap.add_argument("--strong", action="store_true", help="keep the global batch fixed instead")
    ap.add_argument("--epochs", type=int, default=3, help="epoch 1 is warm-up (default %(default)s)")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--json")
    a = ap.parse_args()
    cuda = a.device == "cuda"
    C.resolve_device(a.device)
    import torch

    gpus = torch.cuda.device_count() if cuda else 0
    a.procs = [int(p) for p in (a.procs or ("1,2,4,8" if cuda else "1,2")).split(",")]
    a.procs = [p for p in a.procs if not cuda or p <= gpus] or [1]
    a.n = a.n or (2048 if cuda else 192)
    a.image_size = a.image_size or (224 if cuda else 128)
    a.cache_size = a.cache_size or a.image_size + 32
    a.batch_size = a.batch_size or (64 if cuda else 16)
    cores = os.cpu_count() or 1

    tmp = Path(tempfile.mkdtemp(prefix="covid-scale-"))
    try:
        from covid_cls.synthetic import make_demo_dataset

        root = make_demo_dataset(tmp / "data", n_per_class=a.n // 2, size=a.cache_size, seed=0)
        env = {**os.environ, "COVID_CLS_CACHE": str(tmp / "cache"), "COVID_CLS_OFFLINE": "1"}
        os.environ["COVID_CLS_CACHE"] = env["COVID_CLS_CACHE"]
        from covid_cls.data import DecodedCache, scan_dataset

        info = scan_dataset(root)
        for split in info.splits.values():   # warm the disk cache: no run decodes
            DecodedCache(a.cache_size).get(split, info.root)
        results: dict[int, list[dict]] = {p: [] for p in a.procs}
        for rnd in range(a.rounds):
            for p in (a.procs if rnd % 2 == 0 else a.procs[::-1]):
                threads = max(1, cores // p)
                r = run_one(a, root, p, tmp / f"out-{p}-{rnd}", {**env, "OMP_NUM_THREADS": str(threads)})
                r["threads"] = threads
                results[p].append(r)
                print(f"round {rnd + 1}, {p} process(es): {C.median(r['images_per_s']):.1f} img/s", flush=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    print()
    print(C.header(f"Scaling: {a.arch} · {a.level}, 1 vs N processes (torchrun + DDP)", a.device))
    base = C.median(x for r in results[a.procs[0]] for x in r["images_per_s"])
    rows, out = [], []
    for p in a.procs:
        rs = results[p]
        ips = C.median(x for r in rs for x in r["images_per_s"])
        ideal = p / a.procs[0] if cuda else 1.0
        speed = ips / base
        rows.append([p, rs[0]["backend"], rs[0]["threads"], rs[0]["batch_per_process"], rs[0]["global_batch"],
                     ips, f"{min(x for r in rs for x in r['images_per_s']):.1f}–"
                          f"{max(x for r in rs for x in r['images_per_s']):.1f}",
                     f"{speed:.2f}×", f"{speed / ideal:.2f}", C.median(x for r in rs for x in r["epoch_s"]),
                     C.median(r["wall_s"] for r in rs)])
        out.append({**rs[0], "images_per_s_median": ips, "speedup": speed, "efficiency": speed / ideal,
                    "rounds": rs})
    print(C.table(["processes", "backend", "threads/proc", "batch/proc", "global batch", "img/s (median)",
                   "img/s range", "speed-up", "efficiency", "epoch s", "run s (incl. start)"], rows))
    print(f"\n{a.n} generated {a.cache_size}² images (training split), {a.image_size} px, {a.epochs} epochs "
          f"(epoch 1 dropped), {a.rounds} rounds alternating; precision {out[0]['precision']}. "
          + ("Efficiency = speed-up / N (one GPU per process)." if cuda else
             f"The processes share the {cores} cores (threads split): the ideal speed-up is 1.0, "
             "efficiency = speed-up."))
    C.dump_json(a.json, {"args": vars(a), "results": out})


if __name__ == "__main__":
    main()
