"""What more than one test module needs: data paths, a small training config, byte-level image builders and
the launched web app. Test modules import from here (``from helpers import ...``), never from each other;
tests/ is on ``sys.path`` under pytest's default import mode (rootdir-relative, no ``__init__.py``).

Fixtures built on these live in conftest.py. Nothing here imports torch or gradio at import time.
"""

from __future__ import annotations

import contextlib
import io
import os
import shutil
import socket
import struct
import time
import zipfile
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

# ---------------------------------------------------------------------------------------------
# data beside the repository (read only; tests skip what is absent)
# ---------------------------------------------------------------------------------------------

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
CXR_REAL = SHARED_DATA / "cxr-real"
CXR_FULLRES = SHARED_DATA / "cxr-fullres"


# ---------------------------------------------------------------------------------------------
# training and checkpoints
# ---------------------------------------------------------------------------------------------


def small_config(data: Path, out: Path, **over):
    """A TrainConfig that trains in seconds on the CPU: ResNet18 · fc, 64 px, 3 epochs, no pretrained weights."""
    from covid_cls import TrainConfig

    kw = dict(data_dir=str(data), arch="resnet18", level="fc", epochs=3, image_size=64, cache_size=96,
              weights="none", optimizer="adam", lr=1e-3, batch_size=16, out_dir=str(out), num_workers=2)
    kw.update(over)
    return TrainConfig(**kw)


HEAVY_ARCHS = {"vgg16"}   # ~140 M parameters: building, training or converting one takes seconds on a CPU


def arch_params(archs) -> list:
    """Architecture names for ``@pytest.mark.parametrize``, the heavy ones marked ``slow`` (so the fast tier
    checks every per-architecture path on ResNet18 and the full run on all of them)."""
    return [pytest.param(a, marks=pytest.mark.slow) if a in HEAVY_ARCHS else a for a in archs]


def flat_labelled_folder(dataset: Path, out: Path, split: str = "test",
                         sources: tuple[str, ...] = ("Hospital A", "Hospital B")) -> Path:
    """A flat labelled folder (``infected/ normal/``, no splits, like ../shared/data/cxr-shift) made of one split
    of ``dataset``, with a MANIFEST.csv that gives the images to ``sources`` in turn (each gets both classes)."""
    rows = ["file,split,label,source_dataset"]
    for i, src in enumerate(sorted(Path(dataset, split).rglob("*.png"))):
        cls = src.parent.name
        (out / cls).mkdir(parents=True, exist_ok=True)
        shutil.copy(src, out / cls / src.name)
        rows.append(f"{cls}/{src.name},shift,{cls},{sources[i % len(sources)]}")
    (out / "MANIFEST.csv").write_text("\n".join(rows) + "\n")
    return out


def copy_checkpoint(checkpoint: Path, folder: Path, name: str | None = None) -> Path:
    """Copy a trained checkpoint and its card (the ``.json`` beside it) into ``folder``, optionally under a new
    ``name`` (the card, which names its weights file, is rewritten to match); returns the copy."""
    import json

    checkpoint, folder = Path(checkpoint), Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    dst = folder / (f"{name}{checkpoint.suffix}" if name else checkpoint.name)
    shutil.copy(checkpoint, dst)
    card = json.loads(checkpoint.with_suffix(".json").read_text())
    dst.with_suffix(".json").write_text(json.dumps({**card, "file": dst.name}))
    return dst


# ---------------------------------------------------------------------------------------------
# Grad-CAM checks against the synthetic set's lesion masks
# ---------------------------------------------------------------------------------------------


def cam_peak(cam: np.ndarray) -> tuple[int, int]:
    """(row, col) of the map's maximum."""
    return tuple(int(v) for v in np.unravel_index(int(np.argmax(cam)), cam.shape))


def lesion_mask(dataset_dir: str | os.PathLike, image_path: str | os.PathLike) -> np.ndarray | None:
    """The saved mask of a synthetic image (``make_demo_dataset`` writes ``masks/<split>/<class>/<name>``) as a
    bool array, or None when it has none."""
    root, p = Path(dataset_dir), Path(image_path)
    rel = p.relative_to(root) if p.is_absolute() else p
    m = root / "masks" / rel
    if not m.is_file():
        return None
    return np.asarray(Image.open(m)) > 127


# ---------------------------------------------------------------------------------------------
# the web app, served in this process on a free local port
# ---------------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class LaunchedApp:
    demo: Any                # the gradio Blocks
    settings: Any            # covid_cls.ui.Settings it was built with
    port: int
    launch_seconds: float    # demo.launch() until the server listens

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def client(self):
        """A new gradio_client session on the app (one per thread when calling concurrently)."""
        from gradio_client import Client

        return Client(self.url, verbose=False)


@contextlib.contextmanager
def launched_app(settings, *, app_launch: bool = False, **launch_kw) -> Iterator[LaunchedApp]:
    """Build the app for ``settings``, serve it on 127.0.0.1:<free port> in a thread of this process, and
    close it on exit.

    By default ``demo.launch(css=CSS, **launch_kw)``; ``app_launch=True`` goes through the app's own
    ``covid_cls.ui.launch`` instead (what ``app.py`` runs: max upload size from the environment, theme).
    """
    from covid_cls.ui import CSS, build_app, launch

    demo = build_app(settings)
    port = free_port()
    t0 = time.perf_counter()
    if app_launch:
        launch(demo, server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True, **launch_kw)
    else:
        demo.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, css=CSS, quiet=True,
                    **launch_kw)
    try:
        yield LaunchedApp(demo, settings, port, time.perf_counter() - t0)
    finally:
        demo.close()


# ---------------------------------------------------------------------------------------------
# image files built byte by byte (good, odd and hostile uploads)
# ---------------------------------------------------------------------------------------------

SECRET = "SECRET^NAME"          # the PatientName of every generated DICOM: must never be echoed
SECRET_ID = "SECRET-ID-4711"    # its PatientID


def encode(im: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format=fmt, **kw)
    return buf.getvalue()


def ramp(h: int, w: int, lo: float, hi: float, dtype=np.float32) -> np.ndarray:
    """Horizontal ramp from lo to hi (every row identical)."""
    row = np.linspace(lo, hi, w)
    return np.tile(row, (h, 1)).astype(dtype)


def noise(h: int, w: int, channels: int | None = None, seed: int = 0) -> np.ndarray:
    shape = (h, w) if channels is None else (h, w, channels)
    return np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)


def png_chunk(kind: bytes, payload: bytes) -> bytes:
    return (
        struct.pack(">I", len(payload))
        + kind
        + payload
        + struct.pack(">I", zlib.crc32(kind + payload) & 0xFFFFFFFF)
    )


def png_declaring(width: int, height: int) -> bytes:
    """A syntactically valid PNG whose IHDR claims width×height 8-bit gray, with a tiny IDAT.

    Decoding it for real would allocate width*height bytes: a decompression bomb."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    idat = zlib.compress(b"\x00" * 1024)
    return (
        b"\x89PNG\r\n\x1a\n"
        + png_chunk(b"IHDR", ihdr)
        + png_chunk(b"IDAT", idat)
        + png_chunk(b"IEND", b"")
    )


def make_dicom(
    arr: np.ndarray | None,
    *,
    photometric: str = "MONOCHROME2",
    transfer_syntax: str | None = None,
    pixel_data: bytes | None = None,
    frames: int | None = None,
    rows_cols: tuple[int, int] | None = None,
    **tags,
) -> bytes:
    """Build a DICOM Part 10 file (with preamble) in memory. arr: (rows, cols) or (f, rows, cols)."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.1.1"  # Digital X-Ray, for presentation
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = transfer_syntax or ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.PatientName = SECRET
    ds.PatientID = SECRET_ID
    ds.Modality = "DX"
    if arr is not None or rows_cols is not None:
        bits = 8 if arr is None or arr.dtype == np.uint8 else 16
        rows, cols = rows_cols if rows_cols is not None else arr.shape[-2:]
        ds.Rows, ds.Columns = int(rows), int(cols)
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = photometric
        ds.BitsAllocated = bits
        ds.BitsStored = bits
        ds.HighBit = bits - 1
        ds.PixelRepresentation = 0
        if frames is not None:
            ds.NumberOfFrames = frames
        ds.PixelData = pixel_data if pixel_data is not None else arr.tobytes()
        ds["PixelData"].VR = "OB" if bits == 8 else "OW"
    for key, value in tags.items():
        setattr(ds, key, value)
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def dicom_rejections() -> dict[str, tuple[bytes, str]]:
    """name -> (a broken DICOM file, substring expected in the lower-cased rejection message)."""
    from pydicom.encaps import encapsulate
    from pydicom.uid import JPEG2000Lossless

    good = make_dicom(ramp(16, 16, 0, 255, np.uint8))
    return {
        "no-pixel-data": (make_dicom(None), "no pixel data"),
        "jpeg2000-garbage": (
            make_dicom(
                None,
                rows_cols=(16, 16),
                transfer_syntax=JPEG2000Lossless,
                pixel_data=encapsulate([b"not a codestream " * 4]),
            ),
            "jpeg 2000",
        ),
        "truncated-pixel-data": (
            make_dicom(None, rows_cols=(64, 64), pixel_data=b"\x01\x02" * 100),
            "corrupt",
        ),
        "huge-declared-size": (
            make_dicom(None, rows_cols=(20000, 20000), pixel_data=b"\x00" * 64),
            "60 megapixels",
        ),
        "garbage-after-dicm": (good[:132] + b"\xff\x13" * 40, "dicom"),
    }


def _truncated(fmt: str, keep: float) -> bytes:
    full = encode(Image.fromarray(noise(64, 64, 3, seed=3)), fmt, **({"quality": 95} if fmt == "JPEG" else {}))
    return full[: int(len(full) * keep)]


def _zip_bytes() -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr("scan.png", b"not really")
    return buf.getvalue()


# name -> (data, file name when fed as a path, substring expected in the lower-cased message)
REJECTS: dict[str, tuple[Callable[[], bytes], str, str]] = {
    "zero-bytes": (lambda: b"", "empty.png", "empty"),
    "random-bytes": (lambda: bytes([7]) + noise(1, 4096, seed=4).tobytes(), "rand.png", "not an image"),
    "text": (lambda: b"patient x-ray report\nno findings\n" * 20, "notes.png", "text"),
    "html": (lambda: b"<!DOCTYPE html><html><body>Forbidden</body></html>", "x.png", "html"),
    "svg": (lambda: b'<?xml version="1.0"?>\n<svg xmlns="http://www.w3.org/2000/svg"/>', "x.png", "svg"),
    "pdf": (lambda: b"%PDF-1.7\n%\xe2\xe3\xcf\xd3\n1 0 obj\n" + bytes(200), "scan.png", "pdf"),
    "zip-renamed": (_zip_bytes, "scan.png", "zip"),
    "truncated-png": (lambda: _truncated("PNG", 0.5), "cut.png", "truncated"),
    "truncated-png-header": (lambda: encode(Image.new("L", (9, 9)), "PNG")[:20], "cut.png", "truncated"),
    "truncated-jpeg": (lambda: _truncated("JPEG", 0.6), "cut.jpg", "truncated"),
    "1x1": (lambda: encode(Image.new("L", (1, 1), 128), "PNG"), "tiny.png", "8×8"),
    "3x3000": (lambda: encode(Image.new("L", (3, 3000), 128), "PNG"), "thin.png", "3×3000"),
    "bomb-100000x100000": (lambda: png_declaring(100_000, 100_000), "bomb.png", "too large"),
    "over-pixel-limit-8000x8000": (lambda: png_declaring(8000, 8000), "big.png", "60 megapixels"),
    "pil-warning-range-10000x9000": (lambda: png_declaring(10_000, 9000), "big.png", "too large"),
}


# ---------------------------------------------------------------------------------------------
# small builders shared by the safety tests
# ---------------------------------------------------------------------------------------------

def synthetic_png(seed: int = 0, size: int = 96) -> bytes:
    """A synthetic X-ray-like PNG (infected for odd seeds)."""
    import io

    from PIL import Image

    from covid_cls.synthetic import synthetic_xray

    buf = io.BytesIO()
    Image.fromarray(synthetic_xray(size, infected=bool(seed % 2), seed=seed)[0]).save(buf, "PNG")
    return buf.getvalue()


def copy_dataset(src: Path, dst: Path, per_class: int = 3) -> Path:
    """The first ``per_class`` images of every split x class of ``src`` copied into ``dst``."""
    for split in ("train", "validation", "test"):
        for cls in ("infected", "normal"):
            (dst / split / cls).mkdir(parents=True)
            for f in sorted((src / split / cls).iterdir())[:per_class]:
                shutil.copy(f, dst / split / cls / f.name)
    return dst


def zip_bytes(entries, compression: int | None = None) -> bytes:
    """A zip (in memory) of (name, bytes) entries, deflated by default."""
    import io
    import zipfile

    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED if compression is None else compression) as zf:
        for name, data in entries:
            zf.writestr(name, data)
    return buf.getvalue()


def call_raw(api_base: str, api: str, data: list) -> tuple[str, object]:
    """Gradio's REST protocol by hand, as a browser or curl does it (a fresh session per call):
    ``api_base`` is ``http://host:port/gradio_api``; returns ("complete" | "error", payload)."""
    import json

    import httpx

    r = httpx.post(f"{api_base}/call/{api}", json={"data": data}, timeout=30)
    r.raise_for_status()
    kind, payload = None, None
    with httpx.stream("GET", f"{api_base}/call/{api}/{r.json()['event_id']}", timeout=120) as s:
        for line in s.iter_lines():
            if line.startswith("event:"):
                kind = line.split(":", 1)[1].strip()
            elif line.startswith("data:") and kind in ("complete", "error"):
                payload = json.loads(line.split(":", 1)[1].strip() or "null")
                break
    return kind, payload


def make_services(tmp_path: Path, **settings):
    """The app's Services over checkpoints/ and runs/ in ``tmp_path`` (no server), with other Settings fields."""
    from covid_cls.ui import Services, Settings

    return Services(Settings(checkpoints=tmp_path / "checkpoints", runs=tmp_path / "runs", **settings))


# What Gradio answers for an unhandled exception (an HTTP 500): a test that sees it found a crash, not a message.
GENERIC_SERVER_ERROR = "upstream Gradio app has raised an exception"


def app_error(call) -> str:
    """The message of the AppError that ``call`` (a gradio_client call) must raise; fails on a server crash."""
    import pytest
    from gradio_client.exceptions import AppError

    with pytest.raises(AppError) as info:
        call()
    msg = str(info.value)
    assert GENERIC_SERVER_ERROR not in msg, "a server error instead of a message"
    return msg
