"""Training throughput with 1 vs N processes (torchrun + DDP, issue 13), side by side in one run.

Every configuration is a real `python -m torch.distributed.run --standalone --nproc-per-node=N -m covid_cls train`
on the same generated synthetic images (NOT medical data), the decoded cache warmed first so that no run decodes.
Throughput is what `fit` itself records per epoch (card history `train.images_per_s`: images of the global batch
trained per second of the training pass, validation excluded), epoch 1 dropped as warm-up, median over the
remaining epochs of every round. Rounds alternate the order of the configurations (noise on a shared machine hits
all alike).

  CPU (default): configurations "PxT" = P processes with T threads each (OMP_NUM_THREADS), gloo, on the same
      cores: 1x<cores> (one process, every core), 1x1 and <cores>x1 by default. On the same cores the ideal
      speed-up of P processes over one process with every core is 1.0; over 1x1 it is P (when P cores are free).
  CUDA (--device cuda --procs 1,2,4,8): one GPU per process, NCCL; the ideal speed-up is N.

Scaling efficiency = speed-up / ideal. The batch per process is fixed (weak scaling: the global batch grows with
N), as DDP users run it; --strong keeps the global batch at --batch-size x the smallest N instead.

    python bench/scale.py                                   # CPU: 1x2, 1x1, 2x1; ResNet18 partial, 128 px
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
    bs = a.batch_size if not a.strong else max(1, a.batch_size * min(p for p, _ in a.configs) // nproc)
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
    ap.add_argument("--procs", default=None, help="CUDA: process counts (one GPU each), default 1,2,4,8 (those "
                                                  "that fit the GPUs present); CPU: PxT configurations, default "
                                                  "1x<cores>,1x1,<cores>x1")
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
    ap.add_argument("--render", metavar="JSON", help="print the table of a saved --json run and exit")
    a = ap.parse_args()
    if a.render:
        return render(a.render)
    cuda = a.device == "cuda"
    C.resolve_device(a.device)
    import torch

    gpus = torch.cuda.device_count() if cuda else 0
    cores = os.cpu_count() or 1
    if cuda:
        procs = [int(p) for p in (a.procs or "1,2,4,8").split(",")]
        a.configs = [(p, max(1, cores // p)) for p in procs if p <= gpus] or [(1, cores)]
    else:
        spec = a.procs or f"1x{cores},1x1,{cores}x1"
        a.configs = [tuple(int(v) for v in c.lower().split("x")) if "x" in c else (int(c), max(1, cores // int(c)))
                     for c in spec.split(",")]
    a.n = a.n or (2048 if cuda else 192)
    a.image_size = a.image_size or (224 if cuda else 128)
    a.cache_size = a.cache_size or a.image_size + 32
    a.batch_size = a.batch_size or (64 if cuda else 16)

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
        results: dict[tuple[int, int], list[dict]] = {c: [] for c in a.configs}
        for rnd in range(a.rounds):
            for p, t in (a.configs if rnd % 2 == 0 else a.configs[::-1]):
                r = run_one(a, root, p, tmp / f"out-{p}x{t}-{rnd}", {**env, "OMP_NUM_THREADS": str(t)})
                r["threads"] = t
                results[(p, t)].append(r)
                print(f"round {rnd + 1}, {p} process(es) x {t} thread(s): {C.median(r['images_per_s']):.1f} img/s",
                      flush=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    report(a, results, cuda, cores)


def report(a, results: dict, cuda: bool, cores: int, header: str | None = None) -> None:
    """The table. Speed-up of P processes: against one process with the same threads (ideal P: P times the
    devices or cores); on the CPU also against one process using every core (ideal 1: the same cores)."""
    print()
    print(header or C.header(f"Scaling: {a.arch} · {a.level}, 1 vs N processes (torchrun + DDP)", a.device))

    def ips(cfg):
        return C.median(x for r in results[cfg] for x in r["images_per_s"])

    all_cores = (1, cores) if (1, cores) in results else None
    rows, out = [], []
    for p, t in a.configs:
        rs = results[(p, t)]
        one = (1, t) if (1, t) in results else a.configs[0]
        speed = ips((p, t)) / ips(one)
        eff = speed / (p / one[0])
        spread = [x for r in rs for x in r["images_per_s"]]
        row = [p, t, rs[0]["backend"], rs[0]["batch_per_process"], rs[0]["global_batch"], ips((p, t)),
               f"{min(spread):.1f}–{max(spread):.1f}", f"{speed:.2f}×", f"{eff:.2f}"]
        if not cuda:
            row.append(f"{ips((p, t)) / ips(all_cores):.2f}×" if all_cores else "–")
        rows.append(row + [C.median(x for r in rs for x in r["epoch_s"]), C.median(r["wall_s"] for r in rs)])
        out.append({**rs[0], "images_per_s_median": ips((p, t)), "speedup": speed, "efficiency": eff, "rounds": rs})
    heads = ["processes", "threads/proc", "backend", "batch/proc", "global batch", "img/s (median)", "img/s range",
             "speed-up vs 1 process", "efficiency"] + ([] if cuda else [f"vs 1 process × {cores} threads"])
    print(C.table(heads + ["epoch s", "run s (incl. start)"], rows))
    print(f"\n{a.n} generated {a.cache_size}² images (training split), {a.image_size} px, {a.epochs} epochs "
          f"(epoch 1 dropped), {a.rounds} rounds alternating; precision {out[0]['precision']}. Speed-up: against "
          "one process with the same threads per process; efficiency = speed-up / processes"
          + ("." if cuda else f"; last ratio: against one process using all {cores} cores (the same hardware)."))
    if a.json:
        C.dump_json(a.json, {"args": {k: v for k, v in vars(a).items() if k != "render"}, "results": out})


def render(path: str) -> None:
    """Print the table of a saved --json run again."""
    d = json.loads(Path(path).read_text())
    a = argparse.Namespace(**{**d["args"], "json": None})
    a.configs = [tuple(c) for c in a.configs]
    results = {(r["procs"], r["threads"]): r["rounds"] for r in d["results"]}
    cuda = a.device == "cuda"
    cores = max(p * t for p, t in a.configs) if not cuda else os.cpu_count() or 1
    report(a, results, cuda, cores, header=f"## Scaling: {a.arch} · {a.level} (from {path})")


if __name__ == "__main__":
    main()
