"""Server memory and disk over many API sessions (issue 11 #2 / #17).

Serves the app in a subprocess, then sends ``--calls`` /predict calls, each from a new gradio_client session
(which never closes), with one large generated TIFF, and prints the server's RSS (idle, after two warm-up calls,
after the calls, and 5 s later, when the freed buffers have been trimmed) and what Gradio's cache folder holds.

``--mode before`` serves the handlers as they were before issue 11 #2/#17 (the full-size image and float32
Grad-CAM map kept in each session's state, no memory trim, no purge of Gradio's empty temp files, Gradio's
10,000-session capacity), for comparison; ``after`` is the code as it is; ``both`` runs one after the other.

    python bench/session_memory.py                           # both, 50 calls, a 7600 x 7600 (57.8 MP) TIFF
    python bench/session_memory.py --mode after --calls 20 --side 4000
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def serve(port: int, mode: str, checkpoints: str, runs: str) -> None:   # in the server subprocess
    import covid_cls.ui.common as common

    if mode == "before":
        import covid_cls.ui.predict as predict
        import covid_cls.ui.services as services

        common.slider_state = predict.slider_state = lambda p, name: {"image": p.image, "cam": p.cam, "name": name}
        common.session_copy = predict.session_copy = lambda img: img
        common.purge_gradio_temp = lambda *a, **k: 0
        services.trim_memory_soon = lambda *a, **k: None
    from covid_cls.ui import Settings, build_app, launch

    settings = Settings(checkpoints=Path(checkpoints), runs=Path(runs), training=False, max_upload=50 * 2**20,
                        roots_env="")
    launch(build_app(settings), server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True,
           **({"state_session_capacity": 10000} if mode == "before" else {}))
    print("READY", flush=True)
    while True:
        time.sleep(3600)


def _rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def measure(mode: str, calls: int, side: int, work: Path, checkpoints: Path) -> str:
    import numpy as np
    from gradio_client import Client, handle_file
    from PIL import Image

    root = work / mode
    root.mkdir()
    gtmp, big = root / "gradio_tmp", root / "big.tif"
    row = np.random.default_rng(1).integers(0, 256, (1, side), dtype=np.uint8)
    arr = np.tile(row, (side, 1))
    arr[::97] = 255
    Image.fromarray(arr).save(big, compression="tiff_deflate")
    port = _free_port()
    env = dict(os.environ, GRADIO_TEMP_DIR=str(gtmp), COVID_CLS_OFFLINE="1", COVID_CLS_CACHE=str(root / "cache"))
    srv = subprocess.Popen([sys.executable, __file__, "--serve", str(port), mode, str(checkpoints), str(root / "runs")],
                           env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        assert srv.stdout.readline().strip() == "READY", "the server did not start"

        def disk():
            files = [p for p in gtmp.rglob("*") if p.is_file()]
            empty = sum(1 for p in gtmp.glob("tmp*") if p.is_file() and not p.stat().st_size)
            return len(files), sum(p.stat().st_size for p in files) / 2**20, empty

        def call():
            Client(f"http://127.0.0.1:{port}", verbose=False, download_files=str(root / "downloads")).predict(
                handle_file(str(big)), "resnet18", "fc", "", api_name="/predict")

        idle = _rss_mb(srv.pid)
        for _ in range(2):
            call()
        r0, d0, t0 = _rss_mb(srv.pid), disk(), time.perf_counter()
        for i in range(calls):
            call()
            if (i + 1) % 10 == 0:
                print(f"  {mode}: {i + 1}/{calls} calls, server RSS {_rss_mb(srv.pid):.0f} MB", flush=True)
        r1, d1, seconds = _rss_mb(srv.pid), disk(), time.perf_counter() - t0
        time.sleep(5)
        r2 = _rss_mb(srv.pid)
    finally:
        srv.kill()
        srv.wait()
    return (f"| {mode} | {idle:.0f} | {r0:.0f} | {r1:.0f} ({r1 - r0:+.0f}, {(r1 - r0) / calls:+.1f}/call) | "
            f"{r2:.0f} ({r2 - idle:+.0f} vs idle) | {d0[0]} → {d1[0]} ({d1[1] - d0[1]:+.1f} MB) | {d0[2]} → {d1[2]} | "
            f"{seconds:.0f} |")


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--serve":
        serve(int(sys.argv[2]), *sys.argv[3:6])
        return
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--mode", choices=("before", "after", "both"), default="both")
    ap.add_argument("--calls", type=int, default=50)
    ap.add_argument("--side", type=int, default=7600, help="side of the square TIFF (7600: 57.8 megapixels)")
    ap.add_argument("--checkpoints", help="a folder with a ResNet18 · fc checkpoint (default: train a tiny one)")
    a = ap.parse_args()
    os.environ.setdefault("COVID_CLS_OFFLINE", "1")
    work = Path(tempfile.mkdtemp(prefix="covid_cls-session-memory-"))
    try:
        checkpoints = Path(a.checkpoints) if a.checkpoints else work / "checkpoints"
        if not a.checkpoints:
            from covid_cls import TrainConfig, fit, make_demo_dataset

            data = make_demo_dataset(work / "data", n_per_class=24, size=96, seed=1)
            fit(TrainConfig(data_dir=str(data), out_dir=str(checkpoints), epochs=2, image_size=64, cache_size=96,
                            weights="none", optimizer="adam", batch_size=16))
        rows = [measure(m, a.calls, a.side, work, checkpoints)
                for m in (("before", "after") if a.mode == "both" else (a.mode,))]
        print(f"\n{a.calls} /predict calls, each from a new gradio_client session, with a {a.side}×{a.side} TIFF "
              f"({a.side * a.side / 1e6:.1f} MP); server RSS in MB\n")
        print("| handlers | idle | after 2 warm-up calls | after the calls | 5 s later | Gradio cache files | "
              "empty tmp files | seconds |")
        print("|---|---|---|---|---|---|---|---|")
        print("\n".join(rows))
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
