"""A generated corpus of good, odd and hostile uploads, each sent three ways: ``load_image`` (as bytes and as
a path), ``Predictor.predict`` and the HTTP ``/predict`` endpoint of a launched app.

Every case is either decoded (and predicted) or rejected with the same clear ``ImageError`` message on all
three routes. Zero server errors: the app answers every bad file with the library's own message, never
with Gradio's generic "the upstream app has raised an exception". Bombs are refused from their headers:
tracemalloc around ``load_image`` and the server process's peak RSS during the HTTP sweep stay small.

The byte-level builders come from tests/helpers.py (shared with test_imaging.py); run with ``-s`` to print the
outcome table.
"""

from __future__ import annotations

import io
import struct
import time
import tracemalloc
import zlib
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from covid_cls.imaging import MAX_BYTES, ImageError, load_image
from covid_cls.predictor import UNCERTAIN

from helpers import (
    REJECTS,
    SECRET,
    SECRET_ID,
    copy_checkpoint,
    dicom_rejections,
    encode,
    launched_app,
    make_dicom,
    noise,
    png_chunk,
    ramp,
)

gradio_client = pytest.importorskip("gradio_client")
from gradio_client import handle_file  # noqa: E402

OK = "decoded"
GENERIC_SERVER_ERROR = "upstream Gradio app has raised an exception"


@dataclass(frozen=True)
class Case:
    name: str
    make: Callable[[], bytes]
    filename: str
    expect: str | tuple[str, ...]          # OK, or substring(s) of the lower-cased message (any of them)
    size: tuple[int, int] | None = None    # expected decoded (width, height)
    bomb: bool = False                     # declares a huge image: must be refused without decoding
    via_bytes: str | None = None           # a different expectation when the name is not known (bytes, HTTP)


# ---------------------------------------------------------------------------------------------
# builders
# ---------------------------------------------------------------------------------------------


def png_1bit(width: int, height: int) -> bytes:
    """A real, valid 1-bit PNG (horizontal stripes) of any size, built row by row: 20k x 20k is ~60 KB."""
    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    dark = b"\x00" + b"\x00" * ((width + 7) // 8)
    light = b"\x00" + b"\xff" * ((width + 7) // 8)
    co = zlib.compressobj(9)
    idat = b"".join(co.compress(light if (y // 500) % 2 else dark) for y in range(height)) + co.flush()
    return b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr) + png_chunk(b"IDAT", idat) + png_chunk(b"IEND", b"")


def jpeg_declaring(width: int, height: int) -> bytes:
    data = bytearray(encode(Image.new("L", (16, 16), 128), "JPEG"))
    sof = data.index(b"\xff\xc0")
    struct.pack_into(">HH", data, sof + 5, height, width)
    return bytes(data)


def gif_declaring(width: int, height: int) -> bytes:
    data = bytearray(encode(Image.new("P", (16, 16), 3), "GIF"))
    struct.pack_into("<HH", data, 6, width, height)   # logical screen descriptor
    return bytes(data)


def tiff_declaring(width: int, height: int) -> bytes:
    data = bytearray(encode(Image.new("L", (16, 16), 9), "TIFF"))
    assert data[:4] == b"II*\x00"
    (ifd,) = struct.unpack_from("<I", data, 4)
    (count,) = struct.unpack_from("<H", data, ifd)
    for i in range(count):
        entry = ifd + 2 + 12 * i
        tag, _ = struct.unpack_from("<HH", data, entry)
        if tag in (256, 257):   # ImageWidth, ImageLength -> LONG
            struct.pack_into("<HHII", data, entry, tag, 4, 1, width if tag == 256 else height)
    return bytes(data)


def truncated(fmt: str, keep: float, **kw) -> bytes:
    full = encode(Image.fromarray(noise(64, 64, 3, seed=3)), fmt, **kw)
    return full[: int(len(full) * keep)]


def png_bad_crc() -> bytes:
    data = bytearray(encode(Image.fromarray(noise(32, 32, seed=5)), "PNG"))
    i = data.index(b"IDAT") + 20
    data[i] ^= 0xFF
    return bytes(data)


def exif_rotated_jpeg() -> bytes:
    im = Image.fromarray(ramp(40, 64, 0, 255, np.uint8))   # 64 wide, 40 high
    exif = Image.Exif()
    exif[0x0112] = 6   # rotate 90° clockwise on display
    return encode(im, "JPEG", exif=exif.tobytes(), quality=95)


def palette_png(transparency: bool) -> bytes:
    im = Image.fromarray(noise(48, 48, 3, seed=7)).quantize(16)
    return encode(im, "PNG", **({"transparency": 0} if transparency else {}))


def la_png() -> bytes:
    gray = ramp(48, 48, 0, 255, np.uint8)
    alpha = np.zeros_like(gray)
    alpha[:, 24:] = 255
    return encode(Image.fromarray(np.dstack([gray, alpha]), "LA"), "PNG")


def animated_gif() -> bytes:
    frames = [Image.new("L", (32, 32), v).convert("P") for v in (20, 200, 90)]
    buf = io.BytesIO()
    frames[0].save(buf, "GIF", save_all=True, append_images=frames[1:], duration=100, loop=0)
    return buf.getvalue()


def tiff(arr: np.ndarray) -> bytes:
    return encode(Image.fromarray(arr), "TIFF")


def float_tiff() -> bytes:
    arr = ramp(32, 32, -1.5, 3.0)
    arr[0, 0], arr[1, 1], arr[2, 2] = np.nan, np.inf, -np.inf
    return tiff(arr)


def dicom_bare_of(data: bytes) -> bytes:
    return data[132:]   # no preamble, no "DICM"


def dicom_jpeg_ls() -> bytes:
    from pydicom.encaps import encapsulate
    from pydicom.uid import JPEGLSLossless

    return make_dicom(None, rows_cols=(16, 16), transfer_syntax=JPEGLSLossless,
                      pixel_data=encapsulate([b"\xff\xd8\xff\xf7" + bytes(range(60))]))


def dicom_jpeg_baseline() -> bytes:
    from pydicom.encaps import encapsulate
    from pydicom.uid import JPEGBaseline8Bit

    jpeg = encode(Image.fromarray(ramp(16, 16, 0, 255, np.uint8)), "JPEG", quality=95)
    return make_dicom(None, rows_cols=(16, 16), transfer_syntax=JPEGBaseline8Bit, pixel_data=encapsulate([jpeg]))


def _from_rejects(name: str) -> Case:
    make, filename, expected = REJECTS[name]
    return Case(f"{name}", make, filename, expected, bomb=name.startswith(("bomb", "over-pixel", "pil-warning")))


def _from_dicom_rejections(name: str) -> Case:
    return Case(f"dicom-{name}", lambda: dicom_rejections()[name][0], "study.dcm", dicom_rejections()[name][1],
                bomb=name == "huge-declared-size")


_DICOM16 = ramp(24, 20, 100, 4000, np.uint16)

CORPUS: list[Case] = [
    # ---- decoded
    Case("png-8bit", lambda: encode(Image.fromarray(ramp(40, 64, 0, 255, np.uint8)), "PNG"), "x.png", OK, (64, 40)),
    Case("png-16bit", lambda: encode(Image.fromarray(ramp(32, 32, 0, 65535, np.uint16)), "PNG"), "x.png", OK),
    Case("png-rgba", lambda: encode(Image.fromarray(noise(32, 32, 4, seed=2)), "PNG"), "x.png", OK),
    Case("png-la", la_png, "x.png", OK),
    Case("png-palette", lambda: palette_png(False), "x.png", OK),
    Case("png-palette-transparency", lambda: palette_png(True), "x.png", OK),
    Case("png-all-one-value", lambda: encode(Image.new("L", (64, 64), 77), "PNG"), "flat.png", OK),
    Case("png-16bit-all-one-value", lambda: encode(Image.fromarray(np.full((32, 32), 999, np.uint16)), "PNG"),
         "flat.png", OK),
    Case("png-smallest-8x8", lambda: encode(Image.new("L", (8, 8), 5), "PNG"), "x.png", OK, (8, 8)),
    Case("png-extreme-aspect-2000x8", lambda: encode(Image.new("L", (2000, 8), 50), "PNG"), "x.png", OK, (2000, 8)),
    Case("jpeg-gray", lambda: encode(Image.fromarray(ramp(48, 48, 0, 255, np.uint8)), "JPEG"), "x.jpg", OK),
    Case("jpeg-cmyk", lambda: encode(Image.fromarray(noise(32, 32, 3)).convert("CMYK"), "JPEG"), "x.jpg", OK),
    Case("jpeg-progressive", lambda: encode(Image.fromarray(noise(64, 64, 3)), "JPEG", progressive=True),
         "x.jpg", OK),
    Case("jpeg-exif-rotated", exif_rotated_jpeg, "x.jpg", OK, (40, 64)),
    Case("tiff-16bit", lambda: tiff(ramp(32, 32, 0, 65535, np.uint16)), "x.tif", OK),
    Case("tiff-float32-nan-inf", float_tiff, "x.tif", OK),
    Case("bmp-rgb", lambda: encode(Image.fromarray(noise(24, 24, 3)), "BMP"), "x.bmp", OK),
    Case("webp-lossless", lambda: encode(Image.fromarray(noise(24, 24, 3)), "WEBP", lossless=True), "x.webp", OK),
    Case("gif-animated", animated_gif, "x.gif", OK, (32, 32)),
    Case("dicom-monochrome2-8bit", lambda: make_dicom(ramp(20, 24, 0, 255, np.uint8)), "x.dcm", OK, (24, 20)),
    Case("dicom-monochrome1", lambda: make_dicom(ramp(20, 24, 0, 255, np.uint8), photometric="MONOCHROME1"),
         "x.dcm", OK),
    Case("dicom-16bit-rescale-window", lambda: make_dicom(_DICOM16, RescaleSlope=2, RescaleIntercept=-1024,
                                                          WindowCenter=1500, WindowWidth=3000), "x.dcm", OK,
         (20, 24)),
    Case("dicom-multiframe", lambda: make_dicom(np.stack([ramp(16, 16, 0, 255, np.uint8)] * 3), frames=3),
         "x.dcm", OK),
    Case("dicom-all-one-value", lambda: make_dicom(np.full((16, 16), 300, np.uint16)), "x.dcm", OK),
    Case("dicom-without-preamble", lambda: dicom_bare_of(make_dicom(ramp(16, 16, 0, 255, np.uint8))), "bare.dcm",
         OK, via_bytes="not recognised"),
    Case("dicom-jpeg-baseline", dicom_jpeg_baseline, "x.dcm", (OK, "compressed")),
    # ---- rejected
    *[_from_rejects(n) for n in REJECTS],
    *[_from_dicom_rejections(n) for n in ("no-pixel-data", "jpeg2000-garbage", "truncated-pixel-data",
                                          "huge-declared-size", "garbage-after-dicm")],
    Case("dicom-jpeg-ls-needs-codec", dicom_jpeg_ls, "x.dcm", ("compressed",)),
    Case("random-bytes-named-dcm", lambda: noise(1, 3000, seed=9).tobytes(), "x.dcm", "dicom",
         via_bytes="not an image"),
    Case("real-png-20000x20000-1bit", lambda: png_1bit(20_000, 20_000), "huge.png", "60 megapixels", bomb=True),
    Case("jpeg-declaring-65000x65000", lambda: jpeg_declaring(65_000, 65_000), "huge.jpg", "megapixels", bomb=True),
    Case("gif-declaring-65535x65535", lambda: gif_declaring(65_535, 65_535), "huge.gif", "megapixels", bomb=True),
    Case("tiff-declaring-100000x100000", lambda: tiff_declaring(100_000, 100_000), "huge.tif", "too large",
         bomb=True),
    Case("truncated-webp", lambda: truncated("WEBP", 0.5, lossless=True), "cut.webp", "truncated"),
    Case("truncated-tiff", lambda: truncated("TIFF", 0.5), "cut.tif", "truncated"),
    Case("truncated-gif", lambda: truncated("GIF", 0.5), "cut.gif", "truncated"),
    Case("truncated-bmp", lambda: truncated("BMP", 0.5), "cut.bmp", "truncated"),
    Case("png-bad-crc", png_bad_crc, "crc.png", "corrupt"),
    Case("gzip-renamed", lambda: b"\x1f\x8b\x08\x00" + bytes(100), "x.png", "gzip"),
    Case("heic-renamed", lambda: b"\x00\x00\x00\x18ftypheic" + bytes(100), "x.png", "heic"),
    Case("mp4-renamed", lambda: b"\x00\x00\x00\x18ftypisom" + bytes(100), "x.png", "video"),
    Case("jpeg2000-codestream", lambda: b"\xff\x4f\xff\x51" + bytes(100), "x.png", "jpeg 2000"),
    Case("json-renamed", lambda: b'{"image": "x-ray", "findings": []}\n', "x.png", "text"),
]
CASES = {c.name: c for c in CORPUS}
assert len(CASES) == len(CORPUS) >= 40


def _expected(case: Case, route: str) -> tuple[str, ...]:
    exp = case.via_bytes if route in ("bytes", "http") and case.via_bytes else case.expect
    return exp if isinstance(exp, tuple) else (exp,)


def _check_decoded(case: Case, img: Image.Image) -> None:
    assert img.mode == "L", case.name
    if case.size:
        assert img.size == case.size, (case.name, img.size)


def _check_message(case: Case, route: str, msg: str) -> None:
    assert msg.strip(), f"{case.name}: empty message"
    accepted = [e for e in _expected(case, route) if e != OK]
    assert accepted, f"{case.name} via {route} was rejected: {msg}"
    assert any(e in msg.lower() for e in accepted), f"{case.name} via {route}: {msg}"
    for secret in (SECRET, "SECRET", SECRET_ID):
        assert secret not in msg, f"{case.name}: DICOM tag value echoed: {msg}"
    assert "Traceback" not in msg and "File \"" not in msg


@pytest.fixture(scope="module")
def corpus_dir(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("corpus")
    for case in CORPUS:
        (d / case.name).mkdir()
        (d / case.name / case.filename).write_bytes(case.make())
    return d


def _path(corpus_dir: Path, case: Case) -> Path:
    return corpus_dir / case.name / case.filename


# ---------------------------------------------------------------------------------------------
# 1. load_image
# ---------------------------------------------------------------------------------------------


def _load_outcome(source) -> tuple[str, Image.Image | str]:
    try:
        return OK, load_image(source)
    except ImageError as exc:
        assert type(exc) is ImageError
        return "rejected", str(exc)


@pytest.mark.parametrize("name", list(CASES))
def test_load_image(corpus_dir, name):
    case = CASES[name]
    path = _path(corpus_dir, case)
    for route, source in (("bytes", path.read_bytes()), ("path", path)):
        t0 = time.perf_counter()
        kind, result = _load_outcome(source)
        assert time.perf_counter() - t0 < 2.0, f"{name} via {route} took too long"
        if kind == OK:
            assert OK in _expected(case, route), f"{name} via {route} was decoded but should be rejected"
            _check_decoded(case, result)
        else:
            _check_message(case, route, result)


def _traced_outcome(source):
    """_load_outcome plus the peak of Python-tracked memory while it ran."""
    tracemalloc.start()
    try:
        kind, msg = _load_outcome(source)
        return kind, msg, tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


@pytest.mark.parametrize("name", [c.name for c in CORPUS if c.bomb])
def test_bombs_are_refused_without_allocating_their_pixels(corpus_dir, name):
    kind, msg, peak = _traced_outcome(_path(corpus_dir, CASES[name]).read_bytes())
    assert kind == "rejected", name
    assert peak < 20 * 2**20, f"{name}: peak {peak / 2**20:.1f} MiB while refusing"


def test_the_20k_png_is_real_and_would_be_huge(corpus_dir):
    """Guard for the 20k x 20k case: a valid PNG whose pixels (400 MB as 8-bit) are never decoded."""
    data = _path(corpus_dir, CASES["real-png-20000x20000-1bit"]).read_bytes()
    assert len(data) < 2 * 2**20
    Image.MAX_IMAGE_PIXELS, saved = None, Image.MAX_IMAGE_PIXELS
    try:
        with Image.open(io.BytesIO(data)) as im:
            assert im.size == (20_000, 20_000) and im.mode == "1"
            im.crop((0, 0, 64, 1000)).load()   # a corner decodes fine: the file is not broken
    finally:
        Image.MAX_IMAGE_PIXELS = saved


def test_over_the_upload_limit_is_refused_unread(tmp_path):
    big = tmp_path / "huge.png"
    with big.open("wb") as f:
        f.write(b"\x89PNG\r\n\x1a\n")
        f.truncate(MAX_BYTES + 1)   # sparse
    kind, msg, peak = _traced_outcome(big)
    assert kind == "rejected" and "50 mb" in msg.lower() and "limit" in msg, msg
    assert peak < 5 * 2**20
    kind, msg = _load_outcome(b"\x89PNG\r\n\x1a\n" + bytes(MAX_BYTES))
    assert kind == "rejected" and "limit" in msg


# ---------------------------------------------------------------------------------------------
# 2. Predictor
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def predictor(fc_checkpoint):
    from covid_cls import Predictor

    return Predictor(Path(fc_checkpoint).parent)


@pytest.mark.slow
def test_predictor(corpus_dir, predictor):
    outcomes: Counter[str] = Counter()
    for case in CORPUS:
        path = _path(corpus_dir, case)
        try:
            p = predictor.predict(path)
        except ImageError as exc:
            msg = str(exc)
            _check_message(case, "path", msg)
            assert msg == _load_outcome(path)[1], case.name   # the very message load_image gives
            outcomes["rejected"] += 1
            continue
        assert OK in _expected(case, "path"), f"{case.name} was predicted but should be rejected"
        assert set(p.probs) == {"infected", "normal"} and abs(sum(p.probs.values()) - 1) < 1e-5, case.name
        assert np.isfinite(p.cam).all() and p.cam.shape == p.image.size[::-1], case.name
        assert 0.0 <= p.cam.min() and p.cam.max() <= 1.0
        outcomes["decoded"] += 1
    print(f"\nPredictor: {dict(outcomes)} of {len(CORPUS)}")
    assert outcomes["decoded"] >= 20 and outcomes["rejected"] >= 20


# ---------------------------------------------------------------------------------------------
# 3. HTTP /predict
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def app(fc_checkpoint, tmp_path_factory):
    from covid_cls.ui import Settings

    root = tmp_path_factory.mktemp("bad_inputs_app")
    ckpts = root / "checkpoints"
    copy_checkpoint(fc_checkpoint, ckpts)
    settings = Settings(checkpoints=ckpts, runs=root / "runs", training=False, max_upload=MAX_BYTES, roots_env="")
    # the app's own launch(): it sets Gradio's max_file_size from COVID_CLS_MAX_UPLOAD_MB (default 50 MB)
    with launched_app(settings, app_launch=True) as served:
        yield served.client(), served.port


def _rss_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise LookupError(field)


def _reset_peak_rss() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")   # resets VmHWM (Linux >= 4.0)
        return True
    except OSError:
        return False


@pytest.mark.http
def test_http_predict(corpus_dir, app):
    """The server is this process (launched in-thread), so its memory is ours to watch."""
    from gradio_client.exceptions import AppError

    client, _ = app
    warm = _path(corpus_dir, CASES["png-8bit"])
    client.predict(handle_file(str(warm)), "resnet18", "fc", "", api_name="/predict")   # model loaded
    can_reset = _reset_peak_rss()
    rss0 = _rss_kib("VmRSS")
    outcomes: Counter[str] = Counter()
    for case in CORPUS:
        path = _path(corpus_dir, case)
        try:
            probs, overlay, info = client.predict(handle_file(str(path)), "resnet18", "fc", "",
                                                  api_name="/predict")
        except AppError as exc:
            msg = str(exc)
            assert GENERIC_SERVER_ERROR not in msg, f"{case.name}: server error instead of a message"
            _check_message(case, "http", msg)
            assert msg == _load_outcome(path.read_bytes())[1], case.name
            outcomes["rejected with our message"] += 1
            continue
        assert OK in _expected(case, "http"), f"{case.name} was predicted over HTTP but should be rejected"
        assert probs["label"] in ("infected", "normal", UNCERTAIN), case.name   # odd inputs may abstain
        assert abs(sum(c["confidence"] for c in probs["confidences"]) - 1) < 1e-4
        assert "not a diagnosis" in info
        for secret in (SECRET, SECRET_ID):
            assert secret not in info
        with Image.open(overlay) as im:
            assert im.mode == "RGB"
        outcomes["decoded and predicted"] += 1
    peak = _rss_kib("VmHWM") if can_reset else _rss_kib("VmRSS")
    growth_mib = (peak - rss0) / 1024
    print(f"\nHTTP /predict: {dict(outcomes)} of {len(CORPUS)}; server peak RSS growth {growth_mib:.0f} MiB")
    # Decoding the 20k x 20k PNG alone would take 400 MB, the declared 100k x 100k ones 10 GB.
    assert growth_mib < 300, f"server memory grew by {growth_mib:.0f} MiB"
    assert outcomes["decoded and predicted"] >= 20 and outcomes["rejected with our message"] >= 20


@pytest.mark.http
def test_http_upload_over_the_limit_is_refused(app, tmp_path):
    """Both the client (from the app's config) and the server (HTTP 413) refuse a file over the limit."""
    import httpx

    client, port = app
    big = tmp_path / "huge.png"
    with big.open("wb") as f:
        f.write(b"\x89PNG\r\n\x1a\n")
        f.truncate(MAX_BYTES + 1)
    with pytest.raises(ValueError, match="maximum file size"):
        client.predict(handle_file(str(big)), "resnet18", "fc", "", api_name="/predict")
    with big.open("rb") as f:
        r = httpx.post(client.upload_url, files={"files": ("huge.png", f, "image/png")}, timeout=60)
    assert r.status_code == 413, (r.status_code, r.text[:200])
    assert "maximum allowed size" in r.text


# ---------------------------------------------------------------------------------------------
# 4. Hostile uploads that cost far more than their size (issue 11: rows 1, 3, 10, 11), and the
#    bounded decoding worker: every upload within 2 s of CPU and 512 MB above the worker's idle size
# ---------------------------------------------------------------------------------------------

from covid_cls.imaging import load_image_bounded  # noqa: E402
from covid_cls.sandbox import DecodePool  # noqa: E402

CPU_BOUND_S = 2.0
PEAK_BOUND_MB = 512.0


def _dicom_meta_end(data: bytes) -> int:
    """Offset of the data set in a Part 10 file written by make_dicom (after the group-0002 meta)."""
    tag, vr, _, group_length = struct.unpack_from("<I2sHI", data, 132)
    assert tag == 0x00000002 and vr == b"UL"
    return 132 + 12 + group_length


def _part10(body: bytes, transfer_syntax: str) -> bytes:
    """Preamble + file meta (for ``transfer_syntax``) + ``body`` as given (already encoded)."""
    from pydicom.dataset import FileMetaDataset
    from pydicom.filebase import DicomBytesIO
    from pydicom.filewriter import write_file_meta_info
    from pydicom.uid import generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.1.1"
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = transfer_syntax
    fp = DicomBytesIO()
    fp.is_little_endian, fp.is_implicit_VR = True, False
    write_file_meta_info(fp, meta, enforce_standard=True)
    return b"\x00" * 128 + b"DICM" + fp.getvalue() + body


DEFLATED = "1.2.840.10008.1.2.1.99"


def dicom_deflated(arr: np.ndarray) -> bytes:
    """A real Deflated Explicit VR Little Endian DICOM of ``arr``."""
    plain = make_dicom(arr)
    co = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    return _part10(co.compress(plain[_dicom_meta_end(plain):]) + co.flush(), DEFLATED)


def dicom_deflate_bomb(inflated_mb: int) -> bytes:
    """~1 KB per inflated MB: a 16×16 image whose Pixel Data inflates to ``inflated_mb`` MB of zeros.

    Built from one full-flushed 1 MB block repeated (after a full flush deflate restarts from
    scratch, so the block's bytes are the same every time): no need to compress gigabytes here.
    """
    plain = make_dicom(None, rows_cols=(16, 16), pixel_data=bytes(256))
    body = plain[_dicom_meta_end(plain):]
    head = body[: body.index(b"\xe0\x7f\x10\x00")] + struct.pack("<HH2sHI", 0x7FE0, 0x0010, b"OB", 0,
                                                                   inflated_mb << 20)
    co = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    first = co.compress(head) + co.flush(zlib.Z_FULL_FLUSH)
    block = co.compress(bytes(1 << 20)) + co.flush(zlib.Z_FULL_FLUSH)
    return _part10(first + block * inflated_mb + co.flush(), DEFLATED)


def jpeg_with_scans(extra_scans: int, size: int = 1024) -> bytes:
    """A progressive JPEG whose smallest scan is repeated: libjpeg makes one pass per scan."""
    data = encode(Image.fromarray(ramp(size, size, 0, 255, np.uint8)), "JPEG", progressive=True, quality=90)
    eoi = data.rindex(b"\xff\xd9")
    starts = [i for i in range(len(data) - 1) if data[i] == 0xFF and data[i + 1] == 0xDA]
    scans = [data[a:b] for a, b in zip(starts, starts[1:] + [eoi])]
    return data[:eoi] + min(scans, key=len) * extra_scans + data[eoi:]


def jpeg_app_flood(megabytes: float) -> bytes:
    """A small JPEG preceded by ``megabytes`` of empty APP1 segments (4 bytes each)."""
    base = encode(Image.fromarray(ramp(64, 64, 0, 255, np.uint8)), "JPEG")
    return base[:2] + b"\xff\xe1\x00\x02" * int(megabytes * 2**20 / 4) + base[2:]


def png_chunk_flood(n: int, kind: bytes = b"tEXt") -> bytes:
    base = encode(Image.fromarray(ramp(64, 64, 0, 255, np.uint8)), "PNG")
    chunk = png_chunk(kind, b"k\x00v" if kind == b"tEXt" else b"")
    return base[:33] + chunk * n + base[33:]   # right after IHDR


def webp_declaring(width: int, height: int) -> bytes:
    """A 16×16 lossless WebP whose VP8L header is patched to declare width × height."""
    data = bytearray(encode(Image.fromarray(noise(16, 16, 4)), "WEBP", lossless=True))
    assert data[12:16] == b"VP8L" and data[20] == 0x2F
    bits = int.from_bytes(data[21:25], "little")
    bits = (bits & ~0x0FFFFFFF) | (width - 1) | ((height - 1) << 14)
    data[21:25] = bits.to_bytes(4, "little")
    return bytes(data)


def webp_real(width: int, height: int) -> bytes:
    """A real, valid lossless RGBA WebP of one colour (2.3 KB at 16383×3600)."""
    return encode(Image.new("RGBA", (width, height), (10, 20, 30, 128)), "WEBP", lossless=True)


def j2k_header(width: int, height: int) -> bytes:
    """A JPEG 2000 codestream start (SOC + SIZ for one 8-bit component) declaring width × height."""
    siz = struct.pack(">HHIIIIIIIIH", 41, 0, width, height, 0, 0, width, height, 0, 0, 1) + b"\x07\x01\x01"
    return b"\xff\x4f\xff\x51" + siz + b"\xff\x52" + bytes(64)


def dicom_compressed_frame(frame: bytes, syntax: str, rows_cols=(16, 16)) -> bytes:
    from pydicom.encaps import encapsulate

    return make_dicom(None, rows_cols=rows_cols, transfer_syntax=syntax, pixel_data=encapsulate([frame]))


def _j2k(size: int) -> bytes:
    return encode(Image.new("L", (size, size), 7), "JPEG2000", irreversible=False, no_jp2=True)


def dicom_many_elements(n: int) -> bytes:
    """An Explicit VR LE DICOM image with ``n`` extra empty private elements before its data set."""
    plain = make_dicom(ramp(20, 24, 0, 255, np.uint8))
    end = _dicom_meta_end(plain)
    parts, group = [], 0x0009
    while n > 0:
        k = min(n, 0xFFFF)
        parts.append(b"".join(struct.pack("<HH2sH", group, e, b"LO", 0) for e in range(1, k + 1)))
        n, group = n - k, group + 2
    return plain[:end] + b"".join(parts) + plain[end:]


def dicom_with_sequence(items: int, per_item: int = 6) -> bytes:
    """A DICOM image with a private undefined-length sequence of ``items`` items (nested elements)."""
    plain = make_dicom(ramp(20, 24, 0, 255, np.uint8))
    end = _dicom_meta_end(plain)
    item = (struct.pack("<HHI", 0xFFFE, 0xE000, 0xFFFFFFFF)
            + b"".join(struct.pack("<HH2sH", 0x0009, 0x1000 + e, b"LO", 0) for e in range(per_item))
            + struct.pack("<HHI", 0xFFFE, 0xE00D, 0))
    sq = (struct.pack("<HH2sHI", 0x0009, 0x0010, b"LO", 0, 0)[:8]   # private creator (empty)
          + struct.pack("<HH2sHI", 0x0009, 0x1010, b"SQ", 0, 0xFFFFFFFF) + item * items
          + struct.pack("<HHI", 0xFFFE, 0xE0DD, 0))
    return plain[:end] + sq + plain[end:]


def _rgb_progressive_60mp() -> bytes:
    s = 7745
    g = (ramp(s, s, 0, 255, np.uint8) ^ (noise(s, s, seed=2) & 15)).astype(np.uint8)
    return encode(Image.fromarray(np.dstack([g, g[::-1], g.T])), "JPEG", quality=90, progressive=True)


@dataclass(frozen=True)
class Hostile:
    name: str
    make: Callable[[], bytes]
    expect: str                     # OK, or a substring of the lower-cased message
    slow: bool = False


HOSTILE: list[Hostile] = [
    # row 1: inflated before any size check (1 MB -> +2 GB before)
    Hostile("dicom-deflated-to-2gb", lambda: dicom_deflate_bomb(2048), "unpacks to more than 50 mb"),
    Hostile("dicom-deflated-normal", lambda: dicom_deflated(ramp(20, 24, 0, 255, np.uint8)), OK),
    # row 3: thousands of progressive scans (~32 s of CPU before)
    Hostile("jpeg-3000-progressive-scans", lambda: jpeg_with_scans(3000), "progressive scans"),
    Hostile("jpeg-3000-scans-4096px", lambda: jpeg_with_scans(3000, 4096), "progressive scans", slow=True),
    Hostile("jpeg-progressive-normal", lambda: encode(Image.fromarray(noise(256, 256, 3)), "JPEG",
                                                      progressive=True), OK),
    # row 10: metadata floods
    Hostile("jpeg-2mb-of-empty-app-markers", lambda: jpeg_app_flood(2), "metadata segments"),
    Hostile("jpeg-47mb-of-empty-app-markers", lambda: jpeg_app_flood(47), "metadata segments", slow=True),
    Hostile("png-1m-text-chunks", lambda: png_chunk_flood(1_000_000), "metadata chunks"),
    Hostile("png-200k-empty-idat-chunks", lambda: png_chunk_flood(200_000, b"IDAT"), "chunks"),
    Hostile("png-200-text-chunks", lambda: png_chunk_flood(200), OK),
    Hostile("dicom-600k-elements", lambda: dicom_many_elements(600_000), "data elements"),
    Hostile("dicom-60k-elements-in-a-sequence", lambda: dicom_with_sequence(10_000), "data elements"),
    Hostile("dicom-300-elements-in-a-sequence", lambda: dicom_with_sequence(50), OK),
    # row 11: cost above pixel count
    Hostile("webp-declaring-16383x3600", lambda: webp_declaring(16383, 3600), "memory"),
    Hostile("webp-16383x3600-real", lambda: webp_real(16383, 3600), "memory", slow=True),
    Hostile("dicom-16x16-holding-9400px-j2k-header",
            lambda: dicom_compressed_frame(j2k_header(9400, 9400), "1.2.840.10008.1.2.4.90"), "9400×9400"),
    Hostile("dicom-16x16-holding-64px-j2k", lambda: dicom_compressed_frame(_j2k(64), "1.2.840.10008.1.2.4.90"),
            "64×64"),
    Hostile("dicom-16x16-holding-9400px-j2k-real",
            lambda: dicom_compressed_frame(_j2k(9400), "1.2.840.10008.1.2.4.90"), "9400×9400", slow=True),
    Hostile("dicom-16x16-holding-64px-jpeg",
            lambda: dicom_compressed_frame(encode(Image.new("L", (64, 64), 9), "JPEG"), "1.2.840.10008.1.2.4.50"),
            "64×64"),
    # the largest legitimate uploads still fit the bounds
    Hostile("jpeg-60mp-progressive-rgb", _rgb_progressive_60mp, OK, slow=True),
    Hostile("png-16bit-25mp", lambda: encode(Image.fromarray(
        (ramp(5000, 5000, 0, 4095, np.uint16) + (noise(5000, 5000, seed=3) & 63)).astype(np.uint16)), "PNG"),
        OK, slow=True),
]
HOSTILE_CASES = {h.name: h for h in HOSTILE}
_HOSTILE_PARAMS = [pytest.param(h.name, marks=[pytest.mark.slow] if h.slow else []) for h in HOSTILE]


@pytest.fixture(scope="module")
def decode_pool():
    # Generous wall-clock timeout: this machine may be shared; the bound under test is CPU time.
    with DecodePool(1, timeout_s=60.0, cpu_s=CPU_BOUND_S, memory_mb=int(PEAK_BOUND_MB)) as pool:
        yield pool


def _check_hostile_outcome(case: Hostile, img, err) -> str:
    if case.expect == OK:
        assert err is None, f"{case.name}: refused: {err}"
        assert img.mode == "L"
        return "decoded"
    assert err is not None, f"{case.name} was decoded but should be refused"
    msg = str(err)
    assert case.expect in msg.lower(), f"{case.name}: {msg}"
    assert "Traceback" not in msg and SECRET not in msg and SECRET_ID not in msg
    return "refused"


@pytest.mark.parametrize("name", _HOSTILE_PARAMS)
def test_hostile_upload_costs_stay_bounded_in_the_worker(decode_pool, name):
    """CPU time and peak memory of each hostile upload, as the decoding worker measures them for itself
    (getrusage user+system; VmHWM reset per task, minus the size before the task; the input included)."""
    case = HOSTILE_CASES[name]
    data = case.make()
    img, err, stats = decode_pool.decode(data)
    outcome = _check_hostile_outcome(case, img, err)
    print(f"\n{name}: {len(data) / 2**20:.2f} MB -> {outcome}; worker CPU {stats.cpu_s:.2f} s, "
          f"peak +{stats.peak_mb:.0f} MB; {str(err)[:90] if err else ''}")
    assert stats.outcome == outcome, stats
    assert stats.cpu_s <= CPU_BOUND_S, f"{name}: {stats.cpu_s:.2f} s of CPU"
    assert stats.peak_mb <= PEAK_BOUND_MB, f"{name}: peak +{stats.peak_mb:.0f} MB"


@pytest.mark.parametrize("name", [h.name for h in HOSTILE if not h.slow and h.expect != OK])
def test_hostile_upload_is_refused_from_its_structure(name):
    """In-process too, the refusal comes from the cheap pre-checks: fast and without allocating pixels."""
    case = HOSTILE_CASES[name]
    data = case.make()
    t0 = time.process_time()
    with pytest.raises(ImageError) as info:
        load_image(data)
    cpu = time.process_time() - t0
    _check_hostile_outcome(case, None, info.value)
    assert cpu < 0.5, f"{name}: {cpu:.2f} s"
    tracemalloc.start()   # (separately: tracing makes Python code several times slower)
    try:
        with pytest.raises(ImageError):
            load_image(data)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    # the inflated DICOM is refused once 50 MB came out (the cap), everything else right away
    assert peak < (80 if "deflated" in name else 20) * 2**20, f"{name}: {peak / 2**20:.0f} MiB"


def test_a_normal_deflated_dicom_decodes_like_the_plain_one():
    arr = ramp(20, 24, 0, 4000, np.uint16)
    plain, deflated = make_dicom(arr), dicom_deflated(arr)
    assert deflated[128:132] == b"DICM" and DEFLATED.encode() in deflated[:400]
    assert load_image(deflated).tobytes() == load_image(plain).tobytes()


@pytest.mark.parametrize("name", list(CASES))
def test_load_image_bounded_answers_like_load_image(corpus_dir, name):
    """The corpus through the bounded worker pool: the same images and the same messages."""
    path = _path(corpus_dir, CASES[name])
    ref_kind, ref = _load_outcome(path)
    kind, got = _load_outcome_bounded(path)
    assert kind == ref_kind, (name, got)
    if kind == OK:
        assert got.tobytes() == ref.tobytes() and got.size == ref.size and got.info == ref.info
    else:
        assert got == ref


def _load_outcome_bounded(source):
    try:
        return OK, load_image_bounded(source)
    except ImageError as exc:
        assert type(exc) is ImageError
        return "rejected", str(exc)
