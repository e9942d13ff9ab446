"""Memory of the decoded cache on disk (issue 13 #3): build it, train from its memory map, train from RAM.

    python bench/disk_cache.py                        # 20,000 synthetic 256 px PNGs, cache 224 px
    python bench/disk_cache.py --n 2000 20000         # two sizes: the growth per image, extrapolated to 200,000
    python bench/disk_cache.py --n 2000 --phases build mapped

An ImageFolder set of N grayscale PNGs (80 % train, 10 % validation, 10 % test; ``covid_cls.synthetic``, made in
parallel on every core) is written into a temp dir, then each phase runs in a fresh process, so that its peak
RSS (``ru_maxrss``) is its own:

  build    ``DecodedCache.get`` of every split into an empty cache folder: decode on every core, written to disk
  mapped   ``fit``: one epoch (default ResNet18 · partial, 32 px, batch 64, fp32, no pretrained weights: the
           memory is the point, not the speed) from that cache read through a memory map
           (COVID_CLS_CACHE_MEMORY_MB=1, below every split: what a split larger than the default 2048 MB gets),
           with all that fit does besides (leakage hashes, evaluation of every split, OOD statistics).
           ``--steps N`` stops the fit after N training steps (the work after the epoch is then not measured)
  ram      the same ``fit`` with the cache read into RAM (COVID_CLS_CACHE_MEMORY_MB=0: no limit), for comparison

Besides ru_maxrss, /proc/self/status is sampled every 0.1 s: RssAnon is the process's own memory (what has to fit
in RAM), RssFile the pages of mapped files it has touched (page cache: the kernel drops them under memory pressure
and reads them again from disk). The decoder worker processes (each bounded by the sandbox's memory limit, not
by N) are not counted.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import _common as C

PHASES = ("build", "mapped", "ram")
ENV = {"build": {"COVID_CLS_CACHE_MEMORY_MB": "1"}, "mapped": {"COVID_CLS_CACHE_MEMORY_MB": "1"},
       "ram": {"COVID_CLS_CACHE_MEMORY_MB": "0"}}


class Sampler(threading.Thread):
    """Peak RssAnon and RssFile of this process (MB), read from /proc/self/status every ``every`` seconds."""

    def __init__(self, every: float = 0.1):
        super().__init__(daemon=True)
        self.every, self.peak, self.done = every, {"RssAnon": 0.0, "RssFile": 0.0}, threading.Event()

    @staticmethod
    def read() -> dict[str, float]:
        out = {}
        for line in Path("/proc/self/status").read_text().splitlines():
            key, _, value = line.partition(":")
            if key in ("RssAnon", "RssFile"):
                out[key] = int(value.split()[0]) / 1024
        return out

    def run(self) -> None:
        while not self.done.wait(self.every):
            for k, v in self.read().items():
                self.peak[k] = max(self.peak[k], v)

    def stop(self) -> dict[str, float]:
        self.done.set()
        self.join()
        for k, v in self.read().items():
            self.peak[k] = max(self.peak[k], v)
        return self.peak


def run_phase(a) -> dict:
    """One phase, in this (fresh) process; returns what the table needs."""
    import torch  # noqa: F401 - loaded before the baseline: its libraries are file pages too

    from covid_cls import TrainConfig, fit
    from covid_cls.data import DecodedCache, scan_dataset
    from covid_cls.errors import TrainingStopped

    base = Sampler.read()   # after the imports: torch's shared libraries alone are ~230 MB of RssFile
    sampler = Sampler()
    sampler.start()
    t0 = time.perf_counter()
    logs: list[str] = []
    if a.phase == "build":
        info = scan_dataset(a.data)
        cache = DecodedCache(a.cache_size, cache_dir=a.cache)   # workers: every core
        images = sum(len(cache.get(s, info.root)) for s in info.splits.values())
        rate = images / (time.perf_counter() - t0)
        logs = cache.info + cache.notes
    else:
        os.environ["COVID_CLS_CACHE"] = a.cache
        epochs: list[dict] = []
        steps: list[float] = []

        def on_event(e) -> None:
            if e.type == "log":
                logs.append(e.message)
            elif e.type == "epoch":
                epochs.append(e.record())
            elif e.type == "step":
                steps.append(e.images_per_s)
                if a.steps and e.step >= a.steps:
                    stop.set()

        stop = threading.Event()
        cfg = TrainConfig(data_dir=a.data, arch="resnet18", level=a.level, epochs=1, image_size=a.image_size,
                          cache_size=a.cache_size, weights="none", batch_size=a.batch_size, out_dir=a.out,
                          device="cpu", precision=a.precision, log_every=1 if a.steps else 10)
        try:
            fit(cfg, on_event=on_event, stop=stop)
        except TrainingStopped:
            pass
        images = sum(len(s.files) for s in scan_dataset(a.data).splits.values())
        rate = epochs[0]["train"]["images_per_s"] if epochs else steps[-1]   # the training epoch itself
    wall = time.perf_counter() - t0
    peak = sampler.stop()
    return {"phase": a.phase, "images": images, "wall_s": wall, "images_per_s": rate,
            "ru_maxrss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "rss_anon_mb": peak["RssAnon"], "rss_file_mb": peak["RssFile"], "rss_file_base_mb": base["RssFile"],
            "mapped": sum("read through a memory map" in m for m in logs), "logs": logs}


def disk_bytes(folder: Path) -> int:
    """Blocks actually used by the cache files (a hole left by unreadable files takes none)."""
    return sum(p.stat().st_blocks * 512 for p in folder.glob("decoded-*"))


def dataset(root: Path, n: int, size: int) -> tuple[Path, float]:
    t0 = time.perf_counter()
    counts = {"train": n - 2 * (n // 10), "validation": n // 10, "test": n // 10}
    C.make_png_dataset(root, counts, size=size)
    return root, time.perf_counter() - t0


def bench_size(a, n: int, work: Path) -> list[dict]:
    data, gen_s = dataset(work / f"data-{n}", n, a.size)
    png = sum(p.stat().st_size for p in data.rglob("*.png"))
    print(f"N={n:,}: {n:,} PNGs of {a.size} px ({png / 1e9:.2f} GB) written in {gen_s:.0f} s "
          f"on {os.cpu_count()} processes", flush=True)
    cache = work / f"cache-{n}"
    rows = []
    for phase in a.phases:
        out = work / f"ckpt-{n}-{phase}"
        cmd = [sys.executable, __file__, "--phase", phase, "--data", str(data), "--cache", str(cache), "--out",
               str(out), "--cache-size", str(a.cache_size), "--image-size", str(a.image_size),
               "--batch-size", str(a.batch_size), "--level", a.level, "--precision", a.precision,
               "--steps", str(a.steps)]
        env = {**os.environ, **ENV[phase]}
        done = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if done.returncode:
            raise SystemExit(f"phase {phase} failed:\n{done.stderr[-4000:]}")
        row = json.loads(done.stdout.strip().splitlines()[-1])
        row.update(n=n, disk_gb=disk_bytes(cache) / 1e9)
        print(f"  {phase}: {row['wall_s']:.0f} s, peak RSS {row['ru_maxrss_mb']:.0f} MB "
              f"(anon {row['rss_anon_mb']:.0f}, file {row['rss_file_mb']:.0f}); {row['logs'][:1]}", flush=True)
        rows.append(row)
        shutil.rmtree(out, ignore_errors=True)
    if not a.keep:
        shutil.rmtree(data, ignore_errors=True)
        shutil.rmtree(cache, ignore_errors=True)
    return rows


def extrapolate(rows: list[dict], cache_size: int, target: int = 200_000) -> str:
    """The mapped phase's anonymous memory at ``target`` images, linear in N from the two largest sizes run."""
    mapped = sorted((r for r in rows if r["phase"] == "mapped"), key=lambda r: r["n"])
    cache_gb = target * cache_size**2 / 1e9
    head = f"{target:,} images at {cache_size} px: a {cache_gb:.1f} GB cache on disk, read through a memory map. "
    if len(mapped) < 2:
        return head + "(run two sizes, e.g. --n 2000 20000, for the growth of the anonymous memory per image)"
    lo, hi = mapped[-2], mapped[-1]
    per_image = (hi["rss_anon_mb"] - lo["rss_anon_mb"]) / (hi["n"] - lo["n"])
    at = hi["rss_anon_mb"] + per_image * (target - hi["n"])
    return (head + f"Anonymous memory (peak RssAnon) grew {per_image * 1024:.1f} KB per image from {lo['n']:,} to "
            f"{hi['n']:,} images (what fit keeps per image: labels, logits, OOD features, hashes, file names), "
            f"so about {at / 1024:.1f} GB at {target:,}; the images themselves are file pages (RssFile), which the "
            "kernel drops and re-reads under memory pressure, not anonymous memory.")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--n", type=int, nargs="+", default=[20_000], help="images in the synthetic set (one or more)")
    p.add_argument("--size", type=int, default=256, help="side of the PNGs")
    p.add_argument("--cache-size", type=int, default=224, help="side of the decoded squares")
    p.add_argument("--image-size", type=int, default=32, help="training input size")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--level", default="partial", choices=("fc", "partial", "full"))
    p.add_argument("--precision", default="fp32", choices=("auto", "fp32", "bf16"))
    p.add_argument("--steps", type=int, default=0, help="stop each fit after this many training steps (0: whole fit)")
    p.add_argument("--phases", nargs="+", choices=PHASES, default=list(PHASES))
    p.add_argument("--dir", help="work folder (default: a temp dir, deleted at the end)")
    p.add_argument("--keep", action="store_true", help="keep the PNGs and the cache")
    p.add_argument("--json")
    # one phase in a fresh process (internal)
    p.add_argument("--phase", choices=PHASES, help=argparse.SUPPRESS)
    p.add_argument("--data", help=argparse.SUPPRESS)
    p.add_argument("--cache", help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.phase:
        print(json.dumps(run_phase(a)))
        return
    work = Path(a.dir) if a.dir else Path(tempfile.mkdtemp(prefix="covid-cls-disk-cache-"))
    work.mkdir(parents=True, exist_ok=True)
    print(C.header("disk_cache", "cpu"))
    try:
        rows = [r for n in a.n for r in bench_size(a, n, work)]
    finally:
        if not a.dir and not a.keep:
            shutil.rmtree(work, ignore_errors=True)
    print(C.table(["phase", "images", "cache on disk GB", "wall s", "images/s", "peak RSS MB (ru_maxrss)",
                   "peak RssAnon MB", "peak RssFile MB (at start)"],
                  [[r["phase"], r["images"], f"{r['disk_gb']:.2f}", r["wall_s"], r["images_per_s"],
                    r["ru_maxrss_mb"], r["rss_anon_mb"], f"{r['rss_file_mb']:,.0f} ({r['rss_file_base_mb']:.0f})"]
                   for r in rows]))
    print("images/s: decoded (build), trained in the epoch (mapped, ram); wall s of a fit phase is the whole fit.")
    print(extrapolate(rows, a.cache_size))
    C.dump_json(a.json, rows)


if __name__ == "__main__":
    main()
