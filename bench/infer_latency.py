"""Prediction + Grad-CAM latency for one 1024x1024 image, and (with --app) the web app end to end.

Library part (per architecture, interleaved call by call so background load hits every variant alike):
  forward          the floor: the model alone on the preprocessed (1,3,224,224) tensor, inference_mode,
                   a separate copy without Grad-CAM hooks
  default cam      `covid_cls.explain.reference_cam`: pytorch-grad-cam used the default way (a GradCAM
                   object per call, every parameter trainable, so the backward runs into every weight)
  model part       what Predictor runs on the tensor: its cached `CamExplainer` (forward + the backward from the
                   score to the target layer's output only + the map)
  predict e2e      `Predictor.predict(path)`: decode of the PNG, preprocessing, model part, softmax,
                   CAM resized to the image, overlay (and whatever else predict does, e.g. an OOD check)
  decode           `imaging.load_image(path)` alone        (part of predict e2e)
  preprocess       to_square_u8 + eval_batch alone          (part of predict e2e)
  overlay          `explain.overlay(image, cam)` alone      (part of predict e2e)
Checkpoints: tiny models trained with `fit` (weights="none", synthetic 256 px images) in a temp dir: the
weights do not change the speed.

--app: `python app.py` in a subprocess (checkpoints/runs in temp dirs, GRADIO_SERVER_PORT set): cold start
(process start -> port accepting connections -> first HTTP 200 on /), then `/predict` through gradio_client
with a 1024x1024 PNG: first call (model load), 1 client sequentially, then 8 concurrent clients.
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

import _common as C


def train_tiny(archs, out: Path, work: Path, device: str) -> dict[str, Path]:
    from covid_cls import TrainConfig, fit, make_demo_dataset

    data = make_demo_dataset(work / "tiny", n_per_class=8, size=256, seed=3)
    paths = {}
    for arch in archs:
        cfg = TrainConfig(data_dir=str(data), arch=arch, level="fc", epochs=1, weights="none", device=device,
                          batch_size=16, out_dir=str(out))
        paths[arch] = fit(cfg)
    return paths


def library_bench(arch: str, ckpt: Path, image: Path, device: str, calls: int, warmup: int) -> dict:
    import numpy as np
    import torch

    from covid_cls.checkpoints import load_model
    from covid_cls.data import eval_batch, to_square_u8
    from covid_cls.explain import overlay, reference_cam
    from covid_cls.imaging import load_image
    from covid_cls.predictor import Predictor

    dev = torch.device(device)
    pred = Predictor(ckpt.parent, device=device)
    pred.predict(image, arch=arch, level="fc", checkpoint=ckpt)         # loads, caches and warms the model
    loaded = pred._get(pred.resolve(arch, "fc", ckpt))
    card = loaded.card
    # every variant runs in the Predictor's runtime (fp32; channels_last where oneDNN/cuDNN run convs)
    plain = pred.runtime.model(load_model(ckpt, dev)[0])                 # no hooks: the forward-only floor
    plain.eval()
    default_model = pred.runtime.model(load_model(ckpt, dev)[0])         # for pytorch-grad-cam's default way
    img = load_image(image)
    x = pred.runtime.input(eval_batch(
        torch.from_numpy(to_square_u8(img, card.cache_size))[None, None].to(dev),
        card.image_size))
    cam = loaded.explainer(x)[1]

    def forward():
        with torch.inference_mode():
            plain(x)

    def default_cam():
        reference_cam(default_model, x)

    def model_part():
        loaded.explainer(x)

    def predict():
        pred.predict(image, arch=arch, level="fc", checkpoint=ckpt)

    def decode():
        load_image(image)

    def preprocess():
        eval_batch(torch.from_numpy(to_square_u8(img, card.cache_size))[None, None].to(dev),
                   card.image_size)

    def make_overlay():
        overlay(img, cam, 0.45)

    variants = {"forward": forward, "default cam": default_cam, "model part": model_part,
                "predict e2e": predict, "decode": decode, "preprocess": preprocess, "overlay": make_overlay}
    times = {k: [] for k in variants}
    for i in range(warmup + calls):
        for name, fn in variants.items():
            C.sync(device)
            t0 = time.perf_counter()
            fn()
            C.sync(device)
            if i >= warmup:
                times[name].append((time.perf_counter() - t0) * 1000)
    out = {k: {"median": C.median(v), "p95": C.pct(v, 95), "n": len(v)} for k, v in times.items()}
    # the fast map equals the default one (sanity check of what is being timed)
    diff = float(np.abs(loaded.explainer(x)[1] - reference_cam(default_model, x)).max())
    return {"times": out, "cam_max_abs_diff": diff, "image_size": list(img.size)}


# ---------------------------------------------------------------------------------------------------
# the app
# ---------------------------------------------------------------------------------------------------

class RawClient:
    """The /predict round trip without gradio_client: one persistent httpx client, Gradio's REST API
    (upload -> POST /gradio_api/call/predict -> SSE result -> download of the overlay). A diagnostic: it
    shows what the server costs when the client does not build a new HTTP client per request."""

    def __init__(self, url: str, image: Path):
        import httpx

        self.h = httpx.Client(base_url=url, timeout=120)
        self.data, self.name = image.read_bytes(), image.name

    def call(self) -> float:
        import json

        t = time.perf_counter()
        r = self.h.post("gradio_api/upload", files={"files": (self.name, self.data, "image/png")})
        r.raise_for_status()
        payload = {"data": [{"path": r.json()[0], "meta": {"_type": "gradio.FileData"}}, "resnet18", "fc", ""]}
        r = self.h.post("gradio_api/call/predict", json=payload)
        r.raise_for_status()
        out, event = None, None
        with self.h.stream("GET", f"gradio_api/call/predict/{r.json()['event_id']}") as s:
            for line in s.iter_lines():
                if line.startswith("event:"):
                    event = line[6:].strip()
                elif line.startswith("data:") and event in ("complete", "error"):
                    out = (event, json.loads(line[5:]))
                    break
        if not out or out[0] != "complete":
            raise RuntimeError(f"/predict failed: {out}")
        self.h.get(out[1][1]["url"]).raise_for_status()       # the overlay image, as a browser would
        return (time.perf_counter() - t) * 1000

    def close(self) -> None:
        self.h.close()


def distinct_copies(image: Path, n: int, folder: Path) -> list[Path]:
    """n PNGs with the same pixels and different bytes (a text chunk with the copy number)."""
    from PIL import Image
    from PIL.PngImagePlugin import PngInfo

    folder.mkdir(parents=True, exist_ok=True)
    out = []
    with Image.open(image) as im:
        im.load()
        for i in range(n):
            info = PngInfo()
            info.add_text("copy", str(i))
            p = folder / f"client{i}-{image.name}"
            im.save(p, pnginfo=info)
            out.append(p)
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def app_bench(ckpt_dir: Path, work: Path, image: Path, calls: int, clients: int, per_client: int,
              device: str) -> dict:
    from gradio_client import Client, handle_file

    port = free_port()
    env = {**os.environ, "COVID_CLS_CHECKPOINTS": str(ckpt_dir), "COVID_CLS_RUNS": str(work / "runs"),
           "GRADIO_SERVER_PORT": str(port), "GRADIO_SERVER_NAME": "127.0.0.1", "GRADIO_ANALYTICS_ENABLED": "False",
           "COVID_CLS_OFFLINE": "1"}
    if device == "cpu":
        env["CUDA_VISIBLE_DEVICES"] = ""
    log = open(work / "app.log", "w")
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "app.py"], cwd=C.REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
    res: dict = {"port": port}
    try:
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"the app exited with {proc.returncode}; see {work / 'app.log'}:\n"
                                   + (work / "app.log").read_text()[-2000:])
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=0.05):
                    break
            except OSError:
                time.sleep(0.01)
            if time.perf_counter() - t0 > 120:
                raise RuntimeError("the app did not listen within 120 s")
        res["listen_s"] = time.perf_counter() - t0
        url = f"http://127.0.0.1:{port}/"
        while True:
            try:
                with urllib.request.urlopen(url, timeout=5) as r:
                    if r.status == 200:
                        break
            except OSError:
                time.sleep(0.01)
        res["http200_s"] = time.perf_counter() - t0

        dl = work / "downloads"

        def client(**kw) -> Client:
            return Client(url, verbose=False, download_files=str(dl), **kw)

        def call(c, img=image) -> float:
            t = time.perf_counter()
            c.predict(handle_file(str(img)), "resnet18", "fc", "", api_name="/predict")
            return (time.perf_counter() - t) * 1000

        raw = RawClient(url, image)
        c = client()
        res["first_call_ms"] = call(c)             # includes loading the model
        diag = client(ssl_verify=False)
        variants = {"gradio_client": lambda: call(c), "gradio_client ssl_verify=False": lambda: call(diag),
                    "raw HTTP, persistent httpx": raw.call}
        for fn in variants.values():
            for _ in range(3):
                fn()
        lat1 = {k: [] for k in variants}
        cpu1 = {k: 0.0 for k in variants}
        for _ in range(calls):                     # interleaved call by call
            for k, fn in variants.items():
                c0 = time.process_time()
                lat1[k].append(fn())
                cpu1[k] += time.process_time() - c0
        res["one"] = {k: {"p50": C.median(v), "p95": C.pct(v, 95), "rps": len(v) / (sum(v) / 1000), "n": len(v),
                          "errors": 0, "client_cpu_ms": cpu1[k] / len(v) * 1000} for k, v in lat1.items()}
        raw.close()

        def concurrent(images: list[Path]) -> dict:
            clients_ = [client() for _ in range(clients)]
            lat: list[float] = []
            errors: list[str] = []
            lock = threading.Lock()
            barrier = threading.Barrier(clients + 1)

            def worker(cl, img):
                barrier.wait()
                for _ in range(per_client):
                    try:
                        ms = call(cl, img)
                        with lock:
                            lat.append(ms)
                    except Exception as exc:  # noqa: BLE001 - counted and reported
                        with lock:
                            errors.append(f"{exc.__class__.__name__}: {exc}")

            threads = [threading.Thread(target=worker, args=(cl, images[i % len(images)]))
                       for i, cl in enumerate(clients_)]
            for t in threads:
                t.start()
            barrier.wait()
            t_start = time.perf_counter()
            for t in threads:
                t.join()
            wall = time.perf_counter() - t_start
            return {"clients": clients, "p50": C.median(lat), "p95": C.pct(lat, 95), "rps": len(lat) / wall,
                    "n": len(lat) + len(errors), "errors": len(errors), "error_examples": sorted(set(errors))[:2]}

        # every client uploads the same PNG (same bytes), then a distinct copy per client (same pixels,
        # a different PNG text chunk): Gradio stores uploads under the sha256 of their content
        res["many_same"] = concurrent([image])
        res["many_distinct"] = concurrent(distinct_copies(image, clients, work / "distinct"))
    finally:
        C.stop_process(proc, 10)
        log.close()
    return res


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--archs", nargs="+", default=["resnet18", "vgg16"])
    ap.add_argument("--calls", type=int, default=50, help="timed calls per variant (after warm-up)")
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--image", help="a 1024x1024 image to use (default: a synthetic 1024x1024 8-bit PNG)")
    ap.add_argument("--app", action="store_true", help="also launch app.py and measure it end to end")
    ap.add_argument("--app-calls", type=int, default=50, help="sequential /predict calls of the single client")
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--per-client", type=int, default=12, help="/predict calls per concurrent client")
    ap.add_argument("--json")
    args = ap.parse_args(argv)
    device = C.resolve_device(args.device)
    tmp = Path(tempfile.mkdtemp(prefix="cc-bench-infer-"))
    os.environ["COVID_CLS_CACHE"] = str(tmp / "decoded")
    try:
        image = Path(args.image) if args.image else C.make_png(tmp / "xray-1024.png", 1024, infected=True)
        print("training tiny checkpoints ...", file=sys.stderr, flush=True)
        archs = list(dict.fromkeys(args.archs + (["resnet18"] if args.app else [])))
        ckpts = train_tiny(archs, tmp / "checkpoints", tmp, device)
        results = {"device": C.device_name(device), "image": str(image), "lib": {}, "app": None}
        for arch in args.archs:
            print(f"{arch}: {args.warmup} + {args.calls} calls per variant ...", file=sys.stderr, flush=True)
            results["lib"][arch] = library_bench(arch, ckpts[arch], image, device, args.calls, args.warmup)
        if args.app:
            print("app: cold start and /predict ...", file=sys.stderr, flush=True)
            results["app"] = app_bench(tmp / "checkpoints", tmp, image, args.app_calls, args.clients,
                                       args.per_client, device)
        print(report(args, device, results, image))
        C.dump_json(args.json, results)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


def report(args, device: str, res: dict, image: Path) -> str:
    from PIL import Image

    with Image.open(image) as im:
        desc = f"{image.name} ({im.width}x{im.height} {im.mode}, {image.stat().st_size / 1024:.0f} KB)"
    out = [C.header("infer_latency", device), f"image: {desc}; {args.calls} timed calls per variant after "
           f"{args.warmup} warm-up, interleaved", ""]
    rows = []
    for arch, r in res["lib"].items():
        t = r["times"]
        fwd = t["forward"]["median"]
        for name in ("forward", "default cam", "model part", "predict e2e", "decode", "preprocess", "overlay"):
            rows.append([arch, name, t[name]["median"], t[name]["p95"], f"{t[name]['median'] / fwd:.2f}"])
    out.append(C.table(["arch", "variant", "median ms", "p95 ms", "x forward (medians)"], rows))
    out.append("\nmodel part = Predictor's CamExplainer on the preprocessed tensor (forward + short backward + map); "
               "predict e2e = Predictor.predict(path), decode and overlay included; decode / preprocess / overlay are "
               "the pieces of predict e2e timed alone. Fast-vs-default CAM max |diff|: "
               + ", ".join(f"{a} {r['cam_max_abs_diff']:.1e}" for a, r in res["lib"].items()))
    app = res.get("app")
    if app:
        out += ["", f"app (python app.py, port {app['port']}): cold start to listening {app['listen_s']:.2f} s, "
                f"to first HTTP 200 on / {app['http200_s']:.2f} s; first /predict (loads the model) "
                f"{app['first_call_ms']:.0f} ms", ""]
        one = app["one"]
        rows = [[f"1 client: {k}", o["n"], o["p50"], o["p95"], o["rps"], o["errors"], o["client_cpu_ms"]]
                for k, o in one.items()]
        for key, label in (("many_same", "same PNG"), ("many_distinct", "a distinct PNG each")):
            m = app[key]
            rows.append([f"{m['clients']} concurrent gradio_clients, {label}", m["n"], m["p50"], m["p95"], m["rps"],
                         m["errors"], None])
        out.append(C.table(["/predict ResNet18 fc, 1024^2 PNG", "calls", "p50 ms", "p95 ms", "requests/s", "errors",
                            "client CPU ms/call"], rows))
        base = one["gradio_client"]["rps"]
        for key in ("many_same", "many_distinct"):
            m = app[key]
            out.append(f"{key}: throughput vs 1 gradio_client {m['rps'] / base:.2f}x"
                       + (f"; errors e.g. {' | '.join(m['error_examples'])}" if m["error_examples"] else ""))
        out.append("(round trip = upload of the PNG + queue + predict + overlay JPEG + download of the result; the "
                   "1-client variants run interleaved call by call; 'ssl_verify=False' and 'raw HTTP' are "
                   "diagnostics of the client's own cost, not how users should call the app)")
    return "\n".join(out)


if __name__ == "__main__":
    sys.exit(main())
