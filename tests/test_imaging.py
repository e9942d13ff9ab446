"""Tests for covid_cls.imaging: a generated corpus of good, odd and hostile files.

Everything is generated in memory or under tmp_path; the real full-resolution X-rays in
shared/data/cxr-fullres are only read (never copied) and skipped when absent.
"""

from __future__ import annotations

import io
import os
import struct
import time
import tracemalloc
import warnings
import zipfile
import zlib
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
from PIL import Image, ImageOps

from covid_cls.imaging import (
    MAX_BYTES,
    MAX_PIXELS,
    ImageError,
    describe_limits,
    load_image,
)

SECRET = "SECRET^NAME"
SECRET_ID = "SECRET-ID-4711"
REAL_DIR = Path(__file__).resolve().parents[2] / "shared" / "data" / "cxr-fullres"


# ---------------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------------


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


@pytest.fixture(params=["bytes", "path"])
def feed(request, tmp_path) -> Callable[..., object]:
    """feed(data, name) -> the same file as bytes, or as a path to a file under tmp_path."""

    def _feed(data: bytes, name: str = "upload.png"):
        if request.param == "bytes":
            return data
        p = tmp_path / name
        p.write_bytes(data)
        return p

    _feed.via = request.param  # type: ignore[attr-defined]
    return _feed


def arr_of(im: Image.Image) -> np.ndarray:
    assert im.mode == "L"
    return np.asarray(im)


def rejection(source) -> ImageError:
    with pytest.raises(ImageError) as info:
        load_image(source)
    err = info.value
    assert type(err) is ImageError  # not some other ValueError
    assert isinstance(err, ValueError)
    assert str(err).strip(), "error message must not be empty"
    return err


# ---------------------------------------------------------------------------------------------
# Accepted images
# ---------------------------------------------------------------------------------------------


def test_error_type_is_value_error():
    assert issubclass(ImageError, ValueError)


def test_png8_round_trip_is_exact(feed):
    pixels = noise(40, 32)
    out = load_image(feed(encode(Image.fromarray(pixels), "PNG")))
    assert out.mode == "L" and out.size == (32, 40)
    np.testing.assert_array_equal(arr_of(out), pixels)


def test_png16_is_min_max_scaled_and_monotonic(feed):
    data = ramp(16, 64, 1000, 3000, np.uint16)
    im16 = Image.fromarray(data)
    assert im16.mode.startswith("I")
    src = encode(im16, "PNG")
    assert Image.open(io.BytesIO(src)).mode.startswith("I")  # really stored as 16-bit
    out = arr_of(load_image(feed(src)))
    assert out.min() == 0 and out.max() == 255
    row = out[0].astype(int)
    assert np.all(np.diff(row) >= 0) and row[0] == 0 and row[-1] == 255
    # The middle of the 1000..3000 ramp lands mid-grey, i.e. it was scaled, not clipped or shifted.
    assert abs(int(row[32]) - 129) <= 2


def test_png16_constant_maps_to_zero(feed):
    src = encode(Image.fromarray(np.full((16, 16), 2000, np.uint16)), "PNG")
    out = arr_of(load_image(feed(src)))
    assert out.shape == (16, 16) and not out.any()


def test_all_one_value_8bit_is_accepted(feed):
    out = arr_of(load_image(feed(encode(Image.new("L", (20, 12), 77), "PNG"))))
    assert out.shape == (12, 20) and np.all(out == 77)


def test_rgba_transparent_area_is_black(feed):
    rgba = np.zeros((16, 16, 4), np.uint8)
    rgba[..., :3] = 200
    rgba[:, :8, 3] = 0  # left half fully transparent (colour underneath is bright!)
    rgba[:, 8:, 3] = 255
    out = arr_of(load_image(feed(encode(Image.fromarray(rgba), "PNG"))))
    assert np.all(out[:, :8] == 0)
    assert np.all(out[:, 8:] == 200)


def test_la_png_transparent_area_is_black(feed):
    lum = Image.new("L", (16, 16), 180)  # grey everywhere, also under the transparent part
    alpha = Image.new("L", (16, 16), 255)
    alpha.paste(0, (0, 0, 16, 4))  # top rows fully transparent
    src = encode(Image.merge("LA", [lum, alpha]), "PNG")
    assert Image.open(io.BytesIO(src)).mode == "LA"
    out = arr_of(load_image(feed(src)))
    assert np.all(out[:4] == 0)
    assert np.all(out[4:] == 180)


def test_palette_png_matches_pillow_luma(feed):
    rgb = np.zeros((16, 24, 3), np.uint8)
    rgb[:, :8] = (255, 0, 0)
    rgb[:, 8:16] = (0, 255, 0)
    rgb[:, 16:] = (0, 0, 255)
    pal = Image.fromarray(rgb).convert("P", palette=Image.Palette.ADAPTIVE, colors=4)
    src = encode(pal, "PNG")
    assert Image.open(io.BytesIO(src)).mode == "P"
    out = arr_of(load_image(feed(src)))
    np.testing.assert_array_equal(out, np.asarray(pal.convert("L")))
    assert len(np.unique(out)) == 3  # three distinct greys, not a blank image


def test_palette_png_with_transparency_is_black_there(feed):
    pal = Image.new("P", (16, 16), 1)
    pal.putpalette([0, 0, 0, 255, 255, 255] + [0] * 762)
    pal.paste(0, (0, 0, 16, 8))
    src = encode(pal, "PNG", transparency=1)  # index 1 (white) is transparent
    out = arr_of(load_image(feed(src)))
    assert not out.any()


def test_cmyk_jpeg(feed):
    cmyk = Image.new("CMYK", (32, 16), (0, 0, 0, 0))  # white
    cmyk.paste((0, 0, 0, 255), (16, 0, 32, 16))  # right half black
    src = encode(cmyk, "JPEG", quality=95)
    assert Image.open(io.BytesIO(src)).mode == "CMYK"
    out = arr_of(load_image(feed(src, "cmyk.jpg")))
    assert out[:, :12].mean() > 230
    assert out[:, 20:].mean() < 25


def test_progressive_jpeg(feed):
    src_arr = ramp(48, 64, 0, 255, np.uint8)
    src = encode(Image.fromarray(src_arr), "JPEG", quality=95, progressive=True)
    assert Image.open(io.BytesIO(src)).info.get("progressive")
    out = arr_of(load_image(feed(src, "prog.jpg")))
    assert out.shape == (48, 64)
    assert np.abs(out.astype(int) - src_arr.astype(int)).mean() < 3


def test_rgb_bmp_matches_pillow_luma(feed):
    rgb = Image.fromarray(noise(16, 20, 3, seed=1))
    out = arr_of(load_image(feed(encode(rgb, "BMP"), "x.bmp")))
    np.testing.assert_array_equal(out, np.asarray(rgb.convert("L")))


def test_lossless_webp(feed):
    gray = noise(24, 24, seed=2)
    rgb = Image.fromarray(np.stack([gray] * 3, axis=-1))
    out = arr_of(load_image(feed(encode(rgb, "WEBP", lossless=True), "x.webp")))
    np.testing.assert_array_equal(out, gray)


def test_animated_gif_uses_first_frame(feed):
    first = Image.new("L", (32, 32), 0)
    first.paste(255, (0, 0, 16, 16))  # white top-left square on black
    second = Image.new("L", (32, 32), 255)  # all white
    src = encode(first, "GIF", save_all=True, append_images=[second], duration=100, loop=0)
    assert getattr(Image.open(io.BytesIO(src)), "n_frames", 1) == 2
    out = arr_of(load_image(feed(src, "anim.gif")))
    assert np.all(out[:16, :16] == 255)
    assert np.all(out[16:, :] == 0) and np.all(out[:, 16:] == 0)


def test_tiff_16bit(feed):
    data = ramp(8, 40, 100, 60000, np.uint16)
    src = encode(Image.fromarray(data), "TIFF")
    assert Image.open(io.BytesIO(src)).mode.startswith("I;16")
    out = arr_of(load_image(feed(src, "x.tif")))
    assert out.min() == 0 and out.max() == 255 and np.all(np.diff(out[0].astype(int)) >= 0)


def test_tiff_float32_with_nan_and_inf(feed):
    data = ramp(8, 40, -1.5, 2.5, np.float32)
    data[0, 0] = np.nan
    data[0, 1] = np.inf
    data[0, 2] = -np.inf
    src = encode(Image.fromarray(data), "TIFF")
    assert Image.open(io.BytesIO(src)).mode == "F"
    out = arr_of(load_image(feed(src, "x.tif")))
    assert out[1, 0] == 0 and out[1, -1] == 255  # finite range stretched to 0..255
    assert np.all(np.diff(out[1].astype(int)) >= 0)
    assert out[0, 0] == 0  # NaN → lowest
    assert out[0, 1] == 255  # +inf → highest
    assert out[0, 2] == 0  # -inf → lowest


def test_tiff_float32_all_finite(feed):
    # The common case (no NaN/inf) takes a different path through the scaling code.
    data = ramp(8, 40, 0.25, 0.75, np.float32)
    out = arr_of(load_image(feed(encode(Image.fromarray(data), "TIFF"), "x.tif")))
    assert out[0, 0] == 0 and out[0, -1] == 255 and np.all(np.diff(out[0].astype(int)) >= 0)


def test_exif_orientation_is_applied(feed):
    stored = np.zeros((24, 40), np.uint8)  # 40 wide, 24 tall as stored
    stored[:8, :8] = 255  # bright marker in the stored top-left corner
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90° clockwise to display"
    src = encode(Image.fromarray(stored), "JPEG", quality=95, exif=exif.tobytes())
    out = load_image(feed(src, "rotated.jpg"))
    assert out.size == (24, 40)  # transposed
    a = arr_of(out)
    # After a clockwise quarter turn the stored top-left corner is at the top-right.
    assert a[:8, -8:].mean() > 200 and a[:8, :8].mean() < 50


# ---------------------------------------------------------------------------------------------
# DICOM
# ---------------------------------------------------------------------------------------------


def test_dicom_monochrome2_8bit(feed):
    pixels = ramp(16, 32, 0, 255, np.uint8)
    out = load_image(feed(make_dicom(pixels), "x.dcm"))
    assert out.size == (32, 16)
    np.testing.assert_array_equal(arr_of(out), pixels)


def test_dicom_monochrome1_is_inverted(feed):
    pixels = ramp(16, 32, 0, 255, np.uint8)  # low on the left
    a = arr_of(load_image(feed(make_dicom(pixels, photometric="MONOCHROME1"), "x.dcm")))
    assert a[0, 0] == 255 and a[0, -1] == 0  # low raw value → bright output
    assert np.all(np.diff(a[0].astype(int)) <= 0)


def test_dicom_16bit_rescale_and_window(feed):
    stored = ramp(8, 4096, 0, 4095, np.uint16)  # stored value == column index
    src = make_dicom(
        stored,
        RescaleSlope=1,
        RescaleIntercept=-1024,  # HU = stored - 1024
        WindowCenter=40,
        WindowWidth=400,  # shows -160 .. 240 HU, i.e. stored 864 .. 1264
    )
    a = arr_of(load_image(feed(src, "ct.dcm")))[0].astype(int)
    assert np.all(a[:850] == 0), "below the window must be black"
    assert np.all(a[1280:] == 255), "above the window must be white"
    assert np.all(np.diff(a) >= 0)
    # Without windowing stored 1064 would be ~66; inside the window it is mid-grey.
    assert 110 <= a[1064] <= 145


def test_dicom_multiframe_uses_first_frame(feed):
    frames = np.stack([np.zeros((16, 16), np.uint8), np.full((16, 16), 200, np.uint8)])
    frames[0, :8] = 255
    a = arr_of(load_image(feed(make_dicom(frames, frames=2), "mf.dcm")))
    assert np.all(a[:8] == 255) and np.all(a[8:] == 0)


def test_dicom_without_preamble_is_read_by_extension(tmp_path):
    pixels = ramp(16, 16, 0, 255, np.uint8)
    bare = make_dicom(pixels)[132:]  # drop preamble + "DICM"; only the .dcm name tells
    p = tmp_path / "bare.dcm"
    p.write_bytes(bare)
    np.testing.assert_array_equal(arr_of(load_image(p)), pixels)
    # Without the name there is nothing to recognise it by.
    rejection(bare)


def _dicom_rejections() -> dict[str, tuple[bytes, str]]:
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


@pytest.mark.parametrize(
    "case",
    ["no-pixel-data", "jpeg2000-garbage", "truncated-pixel-data", "huge-declared-size",
     "garbage-after-dicm"],
)
def test_dicom_rejections_are_clear_and_private(feed, case):
    data, expected = _dicom_rejections()[case]
    t0 = time.perf_counter()
    err = rejection(feed(data, "study.dcm"))
    assert time.perf_counter() - t0 < 1.0
    msg = str(err)
    assert expected in msg.lower(), msg
    for secret in (SECRET, "SECRET", SECRET_ID):
        assert secret not in msg


def test_jpeg2000_message_says_compressed():
    from pydicom.encaps import encapsulate
    from pydicom.uid import JPEG2000Lossless

    data = make_dicom(
        None, rows_cols=(16, 16), transfer_syntax=JPEG2000Lossless,
        pixel_data=encapsulate([b"\x00garbage" * 8]),
    )
    msg = str(rejection(data))
    assert "compressed" in msg and "uncompressed" in msg


# ---------------------------------------------------------------------------------------------
# Rejected inputs
# ---------------------------------------------------------------------------------------------


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


@pytest.mark.parametrize("case", list(REJECTS))
def test_rejections(feed, case):
    make, name, expected = REJECTS[case]
    data = make()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        t0 = time.perf_counter()
        err = rejection(feed(data, name))
        elapsed = time.perf_counter() - t0
    assert expected in str(err).lower(), str(err)
    assert elapsed < 1.0
    # In particular Pillow's DecompressionBombWarning must not leak out.
    assert not [w for w in caught if issubclass(w.category, Image.DecompressionBombWarning)]


def test_truncated_png_header_case_is_really_a_header():
    # Guard for the parametrised case above: it must start like a PNG yet be cut inside IHDR.
    data = REJECTS["truncated-png-header"][0]()
    assert data.startswith(b"\x89PNG") and len(data) < 33


@pytest.mark.parametrize("width,height", [(100_000, 100_000), (8000, 8000)])
def test_bomb_is_rejected_without_large_allocation(feed, width, height):
    data = png_declaring(width, height)
    source = feed(data, "bomb.png")
    tracemalloc.start()
    try:
        rejection(source)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 50 * 1024 * 1024, f"peak {peak / 1e6:.1f} MB"


def test_over_byte_limit_bytes():
    data = bytes(MAX_BYTES + 1)
    msg = str(rejection(data))
    assert "50 MB" in msg and "limit" in msg


def test_over_byte_limit_path_is_not_read(tmp_path):
    p = tmp_path / "huge.png"
    with p.open("wb") as fh:
        fh.truncate(int(66.3 * 1024 * 1024))  # sparse: no real disk use
    tracemalloc.start()
    try:
        msg = str(rejection(p))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert "66.3 MB" in msg and "50 MB" in msg
    assert peak < 5 * 1024 * 1024


def test_nonexistent_path(tmp_path):
    msg = str(rejection(tmp_path / "missing.png"))
    assert "missing.png" in msg and "not exist" in msg
    rejection(str(tmp_path / "missing.png"))


def test_directory(tmp_path):
    assert "folder" in str(rejection(tmp_path))


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs os.mkfifo")
def test_named_pipe_is_not_opened(tmp_path):
    fifo = tmp_path / "pipe.png"
    os.mkfifo(fifo)  # opening it for reading would block forever without a writer
    assert "regular file" in str(rejection(fifo))


@pytest.mark.parametrize("bad", [None, 42, 3.5, ["a.png"], "", "  "])
def test_unsupported_inputs(bad):
    rejection(bad)


# ---------------------------------------------------------------------------------------------
# In-memory inputs
# ---------------------------------------------------------------------------------------------


def test_pil_image_input_rgba_and_is_not_mutated():
    rgba = Image.new("RGBA", (16, 16), (90, 90, 90, 255))
    rgba.paste((255, 255, 255, 0), (0, 0, 16, 8))
    out = arr_of(load_image(rgba))
    assert np.all(out[:8] == 0) and np.all(out[8:] == 90)
    assert rgba.mode == "RGBA" and rgba.getpixel((0, 0)) == (255, 255, 255, 0)


def test_numpy_inputs():
    u8 = noise(10, 12, seed=5)
    np.testing.assert_array_equal(arr_of(load_image(u8)), u8)
    u16 = ramp(10, 12, 1000, 3000, np.uint16)
    a = arr_of(load_image(u16))
    assert a.min() == 0 and a.max() == 255
    f = ramp(10, 12, 0.0, 1.0)
    f_before = f.copy()
    a = arr_of(load_image(f))
    assert a[0, 0] == 0 and a[0, -1] == 255
    np.testing.assert_array_equal(f, f_before)  # the caller's array is not modified
    f[0, 0] = np.nan
    a = arr_of(load_image(f))
    assert a[0, 0] == 0 and a[1, -1] == 255
    rgba = np.zeros((10, 12, 4), np.uint8)
    rgba[..., :3] = 150
    rgba[5:, :, 3] = 255
    a = arr_of(load_image(rgba))
    assert np.all(a[:5] == 0) and np.all(a[5:] == 150)
    assert "shape" in str(rejection(np.zeros((10, 12, 5), np.uint8)))
    rejection(np.zeros((3, 12), np.uint8))  # too small, like a file


def test_returned_image_is_detached_from_file(tmp_path):
    p = tmp_path / "x.png"
    p.write_bytes(encode(Image.new("L", (16, 16), 9), "PNG"))
    out = load_image(p)
    p.unlink()  # the file is gone; the image must still be usable
    assert out.getpixel((3, 3)) == 9 and out.tobytes() == bytes([9]) * 256


def test_describe_limits():
    text = describe_limits()
    assert "\n" not in text
    for needle in ("PNG", "JPEG", "DICOM", "50 MB", "60 megapixels", "8×8"):
        assert needle in text
    assert MAX_PIXELS == 60_000_000 and MAX_BYTES == 50 * 1024 * 1024


# ---------------------------------------------------------------------------------------------
# Real chest X-rays (read in place, never copied)
# ---------------------------------------------------------------------------------------------

_IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".webp", ".dcm"}
REAL_FILES = (
    sorted(p for p in REAL_DIR.iterdir() if p.suffix.lower() in _IMAGE_SUFFIXES)
    if REAL_DIR.is_dir()
    else []
)


@pytest.mark.parametrize(
    "path", REAL_FILES or [None], ids=[p.name for p in REAL_FILES] or ["no-real-files"]
)
def test_real_files(path):
    if path is None:
        pytest.skip(f"no real X-rays found in {REAL_DIR}")
    with Image.open(path) as raw:
        expected = ImageOps.exif_transpose(raw).size if raw.getexif().get(0x0112, 1) > 4 else raw.size
    out = load_image(path)
    assert out.mode == "L"
    assert out.size == expected
    assert np.asarray(out).std() > 5  # a real radiograph, not a blank
