"""Memory of serving all six (arch, level) pairs (issue 12 #6): peak and settled RSS, default byte budget vs the
old count-only LRU of 3, side by side in one run.

    python bench/serve_memory.py                  # Predictor only (each variant in a fresh process)
    python bench/serve_memory.py --http           # also the app over HTTP: /compare once, then /predict per pair
    python bench/serve_memory.py --variants budget count3 budget+arena2

Checkpoints of all six pairs are built (``weights="none"``, nothing trained: the tensors are what costs memory)
and saved into a temporary folder: ResNet18 51 MB and VGG16 579 MB each. Each variant then serves them in a
fresh process:

- Predictor: what ``/compare`` does (the best model of every pair on one image, in the app's order), then one
  prediction per pair again (what six ``/predict`` calls do);
- HTTP (``--http``): the app (``covid_cls.ui.launch``) in its own process, driven by gradio_client from this
  one: ``/compare`` once, then ``/predict`` for every pair.

Reported: peak RSS (VmHWM of the serving process: its ``ru_maxrss``, which Linux would carry over from this
process through the exec), RSS when done and 3 s later (after
the app's ``malloc_trim``), the models left in the cache and their bytes, and the wall time. Variants:

- ``budget``: the default, an LRU bounded by ``COVID_CLS_MODEL_MEMORY_MB`` (2048) and by count (3);
- ``count3``: the old LRU of 3 models by count only (the byte budget set to 1 TB);
- ``+arena2``: the same with ``MALLOC_ARENA_MAX=2`` (glibc keeps fewer per-thread heaps);
- ``budget1024``: a budget of 1024 MB.

The image is a generated 1024² synthetic X-ray PNG unless ``--image`` names one.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import _common as C

os.environ.setdefault("COVID_CLS_OFFLINE", "1")   # no weight downloads: nothing here needs ImageNet weights

VARIANTS = {
    "budget": {},                                                          # COVID_CLS_MODEL_MEMORY_MB default
    "count3": {"COVID_CLS_MODEL_MEMORY_MB": str(2**20)},                   # 1 TB: the count of 3 decides
    "budget+arena2": {"MALLOC_ARENA_MAX": "2"},
    "count3+arena2": {"COVID_CLS_MODEL_MEMORY_MB": str(2**20), "MALLOC_ARENA_MAX": "2"},
    "budget1024": {"COVID_CLS_MODEL_MEMORY_MB": "1024"},
}


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rss_mb(pid: int | str = "self", field: str = "VmRSS") -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


def pairs() -> list[tuple[str, str]]:
    from covid_cls.models import ARCHS, LEVELS

    return [(a, lv) for a in ARCHS for lv in LEVELS]


def build_checkpoints(folder: Path) -> None:
    from covid_cls.checkpoints import save_checkpoint
    from covid_cls.models import build_model

    for arch, level in pairs():
        model = build_model(arch, level, weights="none")
        save_checkpoint(folder, model, {"arch": arch, "level": level}, name=f"{arch}-{level}")
        del model


def make_image(path: Path) -> Path:
    from PIL import Image

    from covid_cls.synthetic import synthetic_xray

    Image.fromarray(synthetic_xray(1024, infected=True, seed=3)[0]).save(path)
    return path


# ---------------------------------------------------------------------------------------------------
# the serving process
# ---------------------------------------------------------------------------------------------------


def child_predictor(checkpoints: str, image: str) -> None:
    """What /compare then six /predict calls do, through one Predictor (as the app's Services holds one)."""
    from covid_cls import Predictor

    data = Path(image).read_bytes()
    t0 = time.perf_counter()
    base = rss_mb()
    pred = Predictor(checkpoints)
    steps = []
    for round_ in ("compare", "predict"):
        for arch, level in pairs():
            p = pred.predict(data, arch=arch, level=level)
            steps.append({"step": f"{round_} {arch}·{level}", "rss_mb": round(rss_mb()),
                          "peak_mb": round(rss_mb("self", "VmHWM")),
                          "label": p.label})
            del p
    done = rss_mb()
    time.sleep(3)
    peak = rss_mb("self", "VmHWM")   # ru_maxrss would carry the parent's peak over the exec (Linux keeps it)
    print(json.dumps({"base_mb": round(base), "peak_mb": round(peak),
                      "after_mb": round(done), "after_3s_mb": round(rss_mb()),
                      "loaded": [Path(k).name for k in pred.loaded()], "loaded_mb": round(pred.loaded_bytes() / 2**20),
                      "max_bytes_mb": round(pred.max_bytes / 2**20), "seconds": round(time.perf_counter() - t0, 1),
                      "steps": steps}))


def run_predictor(variant: str, checkpoints: Path, image: Path) -> dict:
    env = {**os.environ, "COVID_CLS_OFFLINE": "1", **VARIANTS[variant]}
    out = subprocess.run([sys.executable, __file__, "--child", "predictor", "--checkpoints", str(checkpoints),
                          "--image", str(image)], env=env, capture_output=True, text=True, timeout=1800)
    if out.returncode:
        raise SystemExit(f"{variant}: child failed\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def run_http(variant: str, checkpoints: Path, image: Path, runs: Path) -> dict:
    """The app in its own process; this one is the client. Peak = the server's VmHWM."""
    from gradio_client import Client, handle_file

    port = free_port()
    env = {**os.environ, "COVID_CLS_OFFLINE": "1", "COVID_CLS_CHECKPOINTS": str(checkpoints),
           "COVID_CLS_RUNS": str(runs), "COVID_CLS_TRAINING": "0", "GRADIO_SERVER_PORT": str(port),
           "GRADIO_ANALYTICS_ENABLED": "False", **VARIANTS[variant]}
    server = subprocess.Popen([sys.executable, "-c", "from covid_cls.ui import launch; launch(quiet=True)"],
                              env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    samples: list[float] = []
    try:
        client = None
        for _ in range(240):
            try:
                client = Client(f"http://127.0.0.1:{port}", verbose=False)
                break
            except Exception:  # noqa: BLE001 - not listening yet
                if server.poll() is not None:
                    raise SystemExit(f"{variant}: the app did not start\n{server.stderr.read()[-3000:]}") from None
                time.sleep(0.5)
        idle = rss_mb(server.pid)
        stop = threading.Event()

        def sample() -> None:
            while not stop.is_set():
                try:
                    samples.append(rss_mb(server.pid))
                except OSError:
                    return
                time.sleep(0.05)

        threading.Thread(target=sample, daemon=True).start()
        t0 = time.perf_counter()
        client.predict(handle_file(str(image)), api_name="/compare")
        after_compare = rss_mb(server.pid)
        for arch, level in pairs():
            client.predict(handle_file(str(image)), arch, level, "", api_name="/predict")
        seconds = time.perf_counter() - t0
        done = rss_mb(server.pid)
        time.sleep(3)   # the app trims freed memory 2 s after a request
        stop.set()
        return {"idle_mb": round(idle), "after_compare_mb": round(after_compare),
                "peak_mb": round(rss_mb(server.pid, "VmHWM")), "after_mb": round(done),
                "after_3s_mb": round(rss_mb(server.pid)), "sampled_peak_mb": round(max(samples, default=0)),
                "seconds": round(seconds, 1)}
    finally:
        C.stop_process(server, 30)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--variants", nargs="+", default=["budget", "count3"], choices=list(VARIANTS))
    p.add_argument("--http", action="store_true", help="also serve the app and drive it over HTTP")
    p.add_argument("--image", type=Path, help="the image to predict (default: a generated 1024² PNG)")
    p.add_argument("--keep", type=Path, help="build the checkpoints here and keep them (default: a temp folder)")
    p.add_argument("--child", choices=["predictor"], help=argparse.SUPPRESS)
    p.add_argument("--checkpoints", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.child:
        child_predictor(a.checkpoints, str(a.image))
        return

    import datetime

    tmp = Path(tempfile.mkdtemp(prefix="covid_cls-serve-memory-"))
    try:
        ck = a.keep or tmp / "checkpoints"
        if not list(Path(ck).glob("*.safetensors")):
            t = time.perf_counter()
            build_checkpoints(Path(ck))
            print(f"built 6 checkpoints in {time.perf_counter() - t:.0f} s", file=sys.stderr)
        sizes = {f.name: f.stat().st_size / 2**20 for f in sorted(Path(ck).glob("*.safetensors"))}
        image = a.image or make_image(tmp / "xray-1024.png")
        now = datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")
        print(f"## Serving all six (arch, level) pairs — {now}, load average {os.getloadavg()[0]:.1f} "
              f"on {os.cpu_count()} cores\ncommand: python {' '.join(sys.argv)}\ncheckpoints: "
              + ", ".join(f"{n} {s:.0f} MB" for n, s in sizes.items()) + f"\nimage: {image.name}\n")
        print("Predictor (/compare's six predictions, then one per pair again), each variant in a fresh process:\n")
        print("| variant | byte budget | peak RSS | RSS when done | 3 s later | models kept (MB) | s |")
        print("|---|---|---|---|---|---|---|")
        details = {}
        for v in a.variants:
            r = run_predictor(v, Path(ck), image)
            details[v] = r
            print(f"| {v} | {r['max_bytes_mb']:,} MB | **{r['peak_mb']:,} MB** | {r['after_mb']:,} MB | "
                  f"{r['after_3s_mb']:,} MB | {len(r['loaded'])} ({r['loaded_mb']:,}) | {r['seconds']} |", flush=True)
        if a.http:
            print("\nThe app over HTTP (server in its own process; /compare once, then /predict per pair):\n")
            print("| variant | idle | after /compare | peak RSS (VmHWM) | when done | 3 s later | s |")
            print("|---|---|---|---|---|---|---|")
            for v in a.variants:
                r = run_http(v, Path(ck), image, tmp / f"runs-{v}")
                print(f"| {v} | {r['idle_mb']:,} MB | {r['after_compare_mb']:,} MB | **{r['peak_mb']:,} MB** | "
                      f"{r['after_mb']:,} MB | {r['after_3s_mb']:,} MB | {r['seconds']} |", flush=True)
        print("\nper step (RSS / peak so far, MB):", file=sys.stderr)
        for v, r in details.items():
            print(f"{v}: " + "; ".join(f"{s['step']} {s['rss_mb']}/{s['peak_mb']}" for s in r["steps"]),
                  file=sys.stderr)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
