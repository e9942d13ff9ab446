"""Shared helpers for the benchmarks in bench/ (not part of the library).

Everything here is measurement plumbing: data generation, timing, memory, tables.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import resource
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]   # covid_cls itself is imported as installed (pip install -e .)

# Benchmarks never touch the network (ImageNet weights are not needed to measure speed).
os.environ.setdefault("COVID_CLS_OFFLINE", "1")


# ---------------------------------------------------------------------------------------------------
# environment
# ---------------------------------------------------------------------------------------------------

def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def device_name(device: str) -> str:
    import torch

    if device.startswith("cuda"):
        return f"{torch.cuda.get_device_name(0)} (CUDA {torch.version.cuda})"
    return f"CPU: {cpu_model()}, {os.cpu_count()} logical cores, torch threads {torch.get_num_threads()}"


def header(title: str, device: str) -> str:
    import torch

    now = datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")
    return (f"## {title}\n{now} · device {device_name(device)} · torch {torch.__version__} · "
            f"python {platform.python_version()}\ncommand: {' '.join([Path(sys.executable).name] + sys.argv)}\n")


def resolve_device(device: str) -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("--device cuda asked for but no CUDA GPU is available")
    return device


def sync(device: str) -> None:
    if device.startswith("cuda"):
        import torch

        torch.cuda.synchronize()


def peak_rss_mb() -> float:
    """Peak resident set size of this process (ru_maxrss is KiB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def cuda_peak_mb(device: str) -> float | None:
    if not device.startswith("cuda"):
        return None
    import torch

    return torch.cuda.max_memory_allocated() / 2**20


# ---------------------------------------------------------------------------------------------------
# statistics and tables
# ---------------------------------------------------------------------------------------------------

def median(xs) -> float:
    xs = list(xs)
    return statistics.median(xs) if xs else float("nan")


def pct(xs, q: float) -> float:
    """q-th percentile (0-100) by linear interpolation."""
    xs = sorted(xs)
    if not xs:
        return float("nan")
    k = (len(xs) - 1) * q / 100
    lo, hi = int(k), min(int(k) + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


def fmt(v, digits: int = 1) -> str:
    if v is None:
        return "–"
    if isinstance(v, str):
        return v
    if isinstance(v, int):
        return f"{v:,}"
    if v != v:  # nan
        return "nan"
    if abs(v) >= 1000:
        return f"{v:,.0f}"
    return f"{v:.{digits}f}"


def table(headers: list[str], rows: list[list]) -> str:
    """A GitHub-markdown table (readable as plain text too)."""
    cells = [[str(h) for h in headers]] + [[c if isinstance(c, str) else fmt(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    line = lambda r: "| " + " | ".join(c.rjust(w) for c, w in zip(r, widths)) + " |"  # noqa: E731
    return "\n".join([line(cells[0]), "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
                     + [line(r) for r in cells[1:]])


def dump_json(path: str | None, obj) -> None:
    if path:
        Path(path).write_text(json.dumps(obj, indent=1, default=str))


# ---------------------------------------------------------------------------------------------------
# data: 1024 x 1024 8-bit PNGs, synthetic and X-ray-like (NOT medical data)
# ---------------------------------------------------------------------------------------------------

def _write_png(args) -> None:
    path, size, infected, seed = args
    from PIL import Image

    from covid_cls.synthetic import synthetic_xray

    img, _ = synthetic_xray(size, infected=infected, seed=seed)
    Image.fromarray(img).save(path)


def make_png_dataset(root: str | os.PathLike, counts: dict[str, int], size: int = 1024, seed: int = 0,
                     workers: int | None = None) -> Path:
    """ImageFolder tree ``root/<split>/{infected,normal}/*.png`` with ``counts[split]`` images per split
    (half per class), 8-bit grayscale ``size`` x ``size`` PNGs from ``covid_cls.synthetic.synthetic_xray``.

    Reused when ``root`` already holds a complete tree made with the same arguments (a stamp file).
    """
    root = Path(root)
    stamp = root / ".bench-stamp.json"
    want = {"counts": counts, "size": size, "seed": seed}
    if stamp.is_file() and json.loads(stamp.read_text()) == want:
        return root
    jobs = []
    k = 0
    for split, n in counts.items():
        for ci, cls in enumerate(("infected", "normal")):
            d = root / split / cls
            d.mkdir(parents=True, exist_ok=True)
            for i in range(n // 2 + (n % 2 if ci == 0 else 0)):
                k += 1
                jobs.append((d / f"{split}-{cls}-{i:05d}.png", size, cls == "infected", seed * 1_000_003 + k))
    with ProcessPoolExecutor(max_workers=workers or os.cpu_count()) as pool:
        list(pool.map(_write_png, jobs, chunksize=4))
    stamp.write_text(json.dumps(want))
    return root


def make_png(path: str | os.PathLike, size: int = 1024, infected: bool = True, seed: int = 123) -> Path:
    _write_png((Path(path), size, infected, seed))
    return Path(path)


def now() -> float:
    return time.perf_counter()


def stop_process(proc, timeout: float = 10.0) -> None:
    """Terminate a server subprocess and wait for it; kill it if it has not ended after ``timeout`` seconds."""
    import subprocess

    proc.terminate()
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
