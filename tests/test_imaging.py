"""Tests for covid_cls.imaging: a generated corpus of good, odd and hostile files.

Everything is generated in memory or under tmp_path; the real full-resolution X-rays in
shared/data/cxr-fullres are only read (never copied) and skipped when absent.
"""

from __future__ import annotations

import io
import os
import time
import tracemalloc
import warnings
from collections.abc import Callable

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

from helpers import (
    CXR_FULLRES,
    REJECTS,
    SECRET,
    SECRET_ID,
    dicom_rejections,
    encode,
    make_dicom,
    noise,
    png_declaring,
    ramp,
)

REAL_DIR = CXR_FULLRES

# ---------------------------------------------------------------------------------------------
# Helpers (the byte-level builders live in tests/helpers.py, shared with test_bad_inputs / test_unsafe)
# ---------------------------------------------------------------------------------------------


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


@pytest.mark.parametrize(
    "case",
    ["no-pixel-data", "jpeg2000-garbage", "truncated-pixel-data", "huge-declared-size",
     "garbage-after-dicm"],
)
def test_dicom_rejections_are_clear_and_private(feed, case):
    data, expected = dicom_rejections()[case]
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


# REJECTS (helpers.py): name -> (data, file name when fed as a path, substring expected in the message)


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


# ---------------------------------------------------------------------------------------------
# Structural pre-checks and the lean conversions (issue 11): what real files have still passes,
# and the table-based 16-bit/DICOM scaling is bit-identical to the float arithmetic it replaces
# ---------------------------------------------------------------------------------------------

import struct  # noqa: E402
import zlib  # noqa: E402

from covid_cls import imaging  # noqa: E402

from helpers import png_chunk  # noqa: E402


def _float_reference(values: np.ndarray) -> np.ndarray:
    """The min–max scaling exactly as before the look-up table: float32 over the whole array."""
    a = np.array(values, dtype=np.float32, copy=True)
    finite = np.isfinite(a)
    if not finite.any():
        return np.zeros(a.shape, np.uint8)
    lo, hi = float(a[finite].min()), float(a[finite].max())
    a = np.where(np.isposinf(a), hi, np.where(finite, a, lo)).astype(np.float32)
    if hi <= lo:
        return np.zeros(a.shape, np.uint8)
    a -= lo
    a *= 255.0 / (hi - lo)
    np.clip(a, 0, 255, out=a)
    return np.rint(a).astype(np.uint8)


@pytest.mark.parametrize("dtype,lo,hi", [(np.uint8, 3, 250), (np.uint16, 0, 65535), (np.uint16, 1000, 1300),
                                         (np.int16, -32768, 32767), (np.int16, -1024, 3071), (np.int8, -100, 90)])
def test_table_scaling_is_identical_to_the_float_path(dtype, lo, hi):
    rng = np.random.default_rng(int(hi - lo))
    arr = rng.integers(lo, hi + 1, (300, 301), endpoint=False).astype(dtype)
    arr[0, 0], arr[-1, -1] = lo, hi
    np.testing.assert_array_equal(imaging._minmax_to_uint8(arr), _float_reference(arr))
    # An element-wise transform (here a non-monotonic one) through the table, and inverted.
    def wave(x):
        return np.sin(x.astype(np.float64) / 97.0) * 1000.0

    np.testing.assert_array_equal(imaging._through_table(arr, wave), _float_reference(wave(arr)))
    np.testing.assert_array_equal(imaging._through_table(arr, wave, invert=True), 255 - _float_reference(wave(arr)))
    # A gap in the values the image uses (the range comes from used values only).
    sparse = np.where(arr > (int(lo) + int(hi)) // 2, arr, dtype(lo)).astype(dtype)
    np.testing.assert_array_equal(imaging._through_table(sparse, wave), _float_reference(wave(sparse)))


@pytest.mark.parametrize("signed", [False, True])
def test_dicom_windowing_through_the_table_matches_pydicom_on_the_full_array(signed):
    import pydicom
    from pydicom.pixels import apply_modality_lut, apply_voi_lut

    rng = np.random.default_rng(5)
    arr = rng.integers(-2000 if signed else 0, 3000, (64, 80)).astype(np.int16 if signed else np.uint16)
    for photometric in ("MONOCHROME2", "MONOCHROME1"):
        data = make_dicom(arr, photometric=photometric, RescaleSlope=1.5, RescaleIntercept=-1024,
                          WindowCenter=300, WindowWidth=1500, PixelRepresentation=int(signed))
        ds = pydicom.dcmread(io.BytesIO(data))
        ref = _float_reference(apply_voi_lut(apply_modality_lut(ds.pixel_array, ds), ds, index=0))
        if photometric == "MONOCHROME1":
            ref = 255 - ref
        np.testing.assert_array_equal(arr_of(load_image(data)), ref)


def test_jpeg_walk_accepts_restart_markers_fill_bytes_and_metadata():
    im = Image.fromarray(noise(64, 64, 3, seed=8))
    with_rst = encode(im, "JPEG", restart_marker_blocks=2, quality=90)
    assert with_rst.count(b"\xff\xdd") == 1
    sos = with_rst.index(b"\xff\xda")
    padded = with_rst[:sos] + b"\xff" * 7 + with_rst[sos:]      # fill bytes before a marker are legal
    exif = Image.Exif()
    exif[0x010E] = "x" * 60_000                                  # a big but normal APP1
    for data in (with_rst, padded, encode(im, "JPEG", exif=exif.tobytes(), icc_profile=b"\0" * 200_000)):
        imaging._check_jpeg_structure(data)
        assert load_image(data).size == (64, 64)


def test_png_walk_accepts_many_idat_chunks():
    # Row-per-IDAT encoders exist: 3000 pixel-data chunks are fine.
    rows = noise(3000, 40, seed=4)
    raw = b"".join(b"\x00" + row.tobytes() for row in rows)
    comp = zlib.compress(raw)
    step = -(-len(comp) // 3000)
    idats = b"".join(png_chunk(b"IDAT", comp[i:i + step]) for i in range(0, len(comp), step))
    data = (b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", struct.pack(">IIBBBBB", 40, 3000, 8, 0, 0, 0, 0))
            + idats + png_chunk(b"IEND", b""))
    assert data.count(b"IDAT") >= 2000
    np.testing.assert_array_equal(arr_of(load_image(data)), rows)


def test_a_huge_rgba_png_is_refused_for_its_memory_before_decoding():
    # 7000×7000 RGBA is under the 60-megapixel limit but would need ~470 MB to decode and convert.
    ihdr = struct.pack(">IIBBBBB", 7000, 7000, 8, 6, 0, 0, 0)
    data = (b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr) + png_chunk(b"IDAT", zlib.compress(b"\0" * 64))
            + png_chunk(b"IEND", b""))
    tracemalloc.start()
    try:
        msg = str(rejection(data))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert "7000×7000" in msg and "memory" in msg and "448 MB" in msg, msg
    assert peak < 5 * 2**20


def test_implicit_vr_dicom_is_walked_and_decoded():
    from pydicom.uid import ImplicitVRLittleEndian

    pixels = ramp(16, 24, 0, 255, np.uint8)
    data = make_dicom(pixels, transfer_syntax=ImplicitVRLittleEndian)
    np.testing.assert_array_equal(arr_of(load_image(data)), pixels)
    start = imaging._read_file_meta(data)[0]
    flood = b"".join(struct.pack("<HHI", 0x0009, e, 0) for e in range(1, 60_001))
    msg = str(rejection(data[:start] + flood + data[start:]))
    assert "data elements" in msg


def test_deflated_dicom_is_inflated_under_the_cap_and_damage_is_named():
    from pydicom.uid import DeflatedExplicitVRLittleEndian

    pixels = ramp(16, 16, 0, 255, np.uint8)
    data = make_dicom(pixels, transfer_syntax=DeflatedExplicitVRLittleEndian)   # pydicom deflates it
    np.testing.assert_array_equal(arr_of(load_image(data)), pixels)
    start = imaging._read_file_meta(data)[0]
    msg = str(rejection(data[:start] + b"\xff" * 64))
    assert "deflated" in msg and "damaged" in msg, msg


@pytest.mark.parametrize("mode,channels", [("RGBA", 4), ("LA", 2)])
def test_band_wise_compositing_is_identical(mode, channels):
    im = Image.fromarray(noise(800, 3000, channels, seed=11), mode)   # 3 bands of ~1 MP
    full = Image.alpha_composite(Image.new("RGBA", im.size, (0, 0, 0, 255)), im.convert("RGBA")).convert("L")
    np.testing.assert_array_equal(np.asarray(imaging._composite_over_black_to_l(im)), np.asarray(full))
