"""Turn whatever a user uploads into one 8-bit grayscale ``PIL.Image`` — or a clear error.

Everything that reaches the classifier goes through :func:`load_image`. Uploads are untrusted,
so this module is deliberately defensive:

* size limits (bytes, then pixels) are checked *before* any pixel data is decoded, so a
  "decompression bomb" (a tiny file that declares a huge image) is rejected cheaply;
* cheap structural pre-checks run on the raw bytes before any decoder does (JPEG scan and
  metadata-marker counts, PNG chunk counts, DICOM transfer syntax, element count and declared
  vs. actual frame size), and the memory a decode will take is estimated from the header
  (pixels × the peak bytes per pixel of this module's pipeline for that mode) and refused above
  :data:`DECODE_MEMORY_BUDGET`, so no upload within the 50 MB limit costs more than it is worth;
* :func:`load_image_bounded` runs the same decoding in a worker process with a memory limit, a
  CPU-time limit and a wall-clock timeout (see ``sandbox.py``) — the place for untrusted uploads;
* only a fixed list of image formats is handed to Pillow (a smaller attack surface, and random
  bytes cannot be mis-identified as some obscure format that happens to "decode");
* every failure leaves as :class:`ImageError` (a ``ValueError``) whose message tells a person
  what to do next; no other exception type escapes, and no DICOM tag value (patient name, ...)
  is ever put into a message.

The grayscale conversion follows the dataset processing: alpha is composited over *black*,
colour is reduced to luma, high-bit-depth data (16-bit PNG/TIFF, float TIFF, DICOM) is min–max
scaled to 0..255, and a constant image maps to all zeros rather than dividing by zero.
"""

from __future__ import annotations

import io
import os
import re
import struct
import warnings
import zlib
from pathlib import Path
from typing import Any, Union

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from .errors import ImageError

__all__ = [
    "ImageError",
    "MAX_BYTES",
    "MAX_PIXELS",
    "MIN_SIDE",
    "DECODE_MEMORY_BUDGET",
    "ImageSource",
    "load_image",
    "load_image_bounded",
    "describe_limits",
]

#: Largest upload accepted, checked before the file is read or decoded.
MAX_BYTES: int = 50 * 1024 * 1024
#: Largest image accepted (width × height of one frame), checked before decoding pixels.
MAX_PIXELS: int = 60_000_000
#: Smallest accepted side in pixels: anything smaller cannot be a chest X-ray, and the
#: model's resize would just smear a handful of pixels over the whole input.
MIN_SIDE: int = 8

#: Estimated peak memory one decode may take (input bytes + pixels × the peak bytes per pixel of
#: the pipeline for the image's mode, see ``_PEAK_BYTES_PER_PIXEL``), checked from the header
#: before any pixel is decoded. The decoding worker's hard limit is 512 MB above its idle size
#: (``sandbox.DEFAULT_MEMORY_MB``); the 64 MB between the two absorb interpreter and allocator
#: overhead and the per-mode factors' measurement noise, so a file that passes this estimate
#: never meets the hard limit, and one that would is told why instead of being killed.
DECODE_MEMORY_BUDGET: int = 448 * 1024 * 1024

# Structural caps (each far above what real files have, each far below where the cost shows).
#: Scans in one JPEG: libjpeg's progressive scripts write 6 (gray) or 10 (colour), optimising
#: encoders (mozjpeg) a few more. Each scan is one more pass over every coefficient block, about
#: 4.5 ms at 60 MP here: 100 scans stay under 0.5 s, 3,000 scans took 32 s.
JPEG_MAX_SCANS: int = 100
#: APPn/COM metadata segments in one JPEG (EXIF, XMP, ICC split into ≤ 255 parts, ...): Pillow
#: parses each one in Python (~1.3 µs and ~140 bytes each), 11.7 M empty ones took 15 s and 1.7 GB.
JPEG_MAX_METADATA_SEGMENTS: int = 10_000
#: All marker segments (tables, metadata, scans) in one JPEG.
JPEG_MAX_SEGMENTS: int = 20_000
#: Total bytes of APPn/COM payloads in one JPEG.
JPEG_MAX_METADATA_BYTES: int = 16 * 1024 * 1024
#: PNG chunks other than pixel data (IDAT/fdAT): text, ICC, EXIF, ... — a normal PNG has a handful;
#: Pillow handles each in Python (1 M of them took 2–3 s).
PNG_MAX_OTHER_CHUNKS: int = 10_000
#: Pixel-data chunks: encoders write 8–64 KB each (one per row at worst), so 100,000 is a 50 MB
#: file in 500-byte pieces.
PNG_MAX_DATA_CHUNKS: int = 100_000
#: Total bytes of ancillary PNG chunks.
PNG_MAX_ANCILLARY_BYTES: int = 16 * 1024 * 1024
#: Data elements and items in one DICOM file, nested ones included: a chest X-ray has a few
#: hundred, enhanced multi-frame files tens of thousands. pydicom needs ~4 µs and ~300 bytes per
#: element (600 k took 2.4 s and 190 MB).
DICOM_MAX_ELEMENTS: int = 50_000
#: A Deflated Explicit VR Little Endian DICOM is inflated under this cap (the largest upload an
#: uncompressed DICOM may be): pydicom itself would inflate everything first (2 MB -> 2 GB).
DICOM_MAX_INFLATED: int = MAX_BYTES

ImageSource = Union[str, "os.PathLike[str]", bytes, bytearray, Image.Image, np.ndarray]

# Pillow formats we hand files to. MPO is how Pillow labels JPEGs from some cameras that carry
# extra embedded pictures; it decodes like JPEG.
_PIL_FORMATS: tuple[str, ...] = ("PNG", "JPEG", "MPO", "TIFF", "BMP", "WEBP", "GIF")

_ACCEPTED = "PNG, JPEG, TIFF, BMP, WebP or DICOM"
_UPLOAD_HINT = f"Upload a {_ACCEPTED} file."

# Signatures of the image formats above, only used to word errors ("looks like a PNG but ...").
_IMAGE_SIGNATURES: tuple[tuple[bytes, str], ...] = (
    (b"\x89PNG\r\n\x1a\n", "PNG"),
    (b"\xff\xd8\xff", "JPEG"),
    (b"II*\x00", "TIFF"),
    (b"MM\x00*", "TIFF"),
    (b"BM", "BMP"),
    (b"GIF87a", "GIF"),
    (b"GIF89a", "GIF"),
)


def describe_limits() -> str:
    """One line for UI help text: which files are accepted and the size limits."""
    return (
        "Accepted: PNG, JPEG, TIFF, BMP, WebP, GIF and DICOM (.dcm; first frame of multi-frame "
        f"files) — up to {MAX_BYTES // (1024 * 1024)} MB and {MAX_PIXELS // 1_000_000} "
        f"megapixels, at least {MIN_SIDE}×{MIN_SIDE} px; colour images are converted to grayscale."
    )


def load_image(source: ImageSource) -> Image.Image:
    """Load ``source`` as an 8-bit grayscale (mode ``"L"``) image.

    ``source`` may be a path, the raw bytes of a file, a ``PIL.Image.Image`` or a numpy array
    (H×W, H×W×1, H×W×3 or H×W×4). The returned image is a fresh object, fully loaded and not
    tied to any open file. Raises :class:`ImageError` — and only that — when the input is
    unusable.
    """
    return _guarded(_load, source)


def load_image_bounded(
    source: ImageSource,
    *,
    timeout_s: float | None = None,
    cpu_s: float | None = None,
    memory_mb: int | None = None,
) -> Image.Image:
    """:func:`load_image` for untrusted uploads: the same result and the same messages, but the
    file is decoded in a worker process that cannot take more than ``memory_mb`` MB above its idle
    size, ``cpu_s`` seconds of CPU or ``timeout_s`` seconds of wall time (defaults in ``sandbox``:
    512 MB, 2 s, 10 s). An overrun kills that worker (a fresh one replaces it) and raises
    :class:`ImageError` saying which limit was hit. Paths are read here (with the usual checks),
    bytes are sent as they are; a PIL image or an array is already decoded and is converted
    in-process. Uses the shared pool of ``COVID_CLS_DECODE_WORKERS`` (default 2) workers.
    """
    from .sandbox import default_pool

    return default_pool().load(source, timeout_s=timeout_s, cpu_s=cpu_s, memory_mb=memory_mb)


def _decode_untrusted(data: bytes | bytearray, suffix: str = "") -> Image.Image:
    """What the decoding worker runs: ``load_image`` on a file's bytes (``suffix``: its extension)."""
    return _guarded(_from_bytes, data, suffix)


def _guarded(fn: Any, *args: Any) -> Image.Image:
    try:
        # Decoders emit warnings for odd files; for untrusted uploads they are noise and can echo
        # file contents into logs, so they are silenced here. Pillow's DecompressionBombWarning is
        # turned into an exception instead, so it is caught below and can never escape.
        # (catch_warnings is process-global; a race between threads can at worst leave that
        # "error"/"ignore" filter installed, which is harmless.)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            return fn(*args)
    except ImageError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise ImageError(
            f"The image is far too large to process safely (over {MAX_PIXELS // 1_000_000} "
            "megapixels). Downscale it and upload it again."
        ) from None
    except MemoryError:
        raise ImageError(
            "The server ran out of memory while decoding this image. Upload a smaller image "
            "(for example a PNG or JPEG export of about 2000×2000 px)."
        ) from None
    except Exception as exc:  # noqa: BLE001 — the contract is "only ImageError escapes"
        # Only the exception *type* is reported: its text might quote file contents (DICOM tags).
        raise ImageError(
            "This file could not be read as an image (unexpected "
            f"{type(exc).__name__}). It may be damaged; try exporting it again as PNG or JPEG."
        ) from None


# --------------------------------------------------------------------------------------------
# Dispatch on the kind of input
# --------------------------------------------------------------------------------------------


def _load(source: Any) -> Image.Image:
    if isinstance(source, Image.Image):
        return _from_pil_image(source)
    if isinstance(source, np.ndarray):
        return _from_array(source)
    if isinstance(source, (bytes, bytearray, memoryview)):
        return _from_bytes(bytes(source), suffix="")
    if isinstance(source, (str, os.PathLike)):
        return _from_path(source)
    raise ImageError(
        f"Cannot load an image from a {type(source).__name__}; pass a file path, the file's "
        "bytes, a PIL image or a numpy array."
    )


def _from_path(source: str | os.PathLike[str]) -> Image.Image:
    data, suffix = _read_path(source)
    return _from_bytes(data, suffix=suffix)


def _read_path(source: str | os.PathLike[str]) -> tuple[bytes, str]:
    """The bytes of the regular file at ``source`` and its lower-cased extension (checked first)."""
    raw = os.fspath(source)
    if isinstance(raw, bytes):  # os.PathLike[bytes]
        raw = os.fsdecode(raw)
    if not raw.strip():
        raise ImageError("No file was given (the path is empty).")
    path = Path(raw)
    name = path.name or raw
    try:
        if not path.exists():
            raise ImageError(f"The file '{name}' does not exist (or cannot be accessed).")
        if path.is_dir():
            raise ImageError(f"'{name}' is a folder, not an image file. {_UPLOAD_HINT}")
        if not path.is_file():
            # A pipe or device could block forever or never end; only regular files are read.
            raise ImageError(f"'{name}' is not a regular file. {_UPLOAD_HINT}")
        size = path.stat().st_size
        # Check the size before reading so a huge file never enters memory.
        _check_byte_count(size)
        with path.open("rb") as fh:
            # read(n) preallocates n bytes, so ask only for what stat() reported (plus one byte,
            # so a file that grew meanwhile still trips the byte limit when it was already at it).
            data = fh.read(min(size, MAX_BYTES) + 1)
    except ImageError:
        raise
    except PermissionError:
        raise ImageError(f"The file '{name}' cannot be read (permission denied).") from None
    except ValueError:  # e.g. an embedded NUL character in the path
        raise ImageError("The file path is not valid.") from None
    except OSError as exc:
        raise ImageError(
            f"The file '{name}' cannot be read ({exc.strerror or type(exc).__name__})."
        ) from None
    return data, path.suffix.lower()


# --------------------------------------------------------------------------------------------
# Bytes: sniff, then hand to pydicom or Pillow
# --------------------------------------------------------------------------------------------


def _check_byte_count(n: int) -> None:
    if n == 0:
        raise ImageError(f"The file is empty (0 bytes). {_UPLOAD_HINT}")
    if n > MAX_BYTES:
        raise ImageError(
            f"The file is {n / (1024 * 1024):.1f} MB; the limit is "
            f"{MAX_BYTES // (1024 * 1024)} MB. Export a smaller PNG or JPEG and upload it again."
        )


def _from_bytes(data: bytes, suffix: str) -> Image.Image:
    _check_byte_count(len(data))
    # DICOM Part 10 files carry "DICM" after a 128-byte preamble; that wins over everything.
    if data[128:132] == b"DICM":
        return _from_dicom(data, has_preamble=True)

    # Say specifically what the file is when it is clearly not an image (PDF, ZIP, HTML, ...).
    # (Skipped for files that start with an image signature, so no image is ever called "text".)
    what = _sniff_non_image(data) if _guess_image_format(data) is None else None
    if what is not None:
        raise ImageError(f"This file is not an image we can read (it looks like {what}). {_UPLOAD_HINT}")

    # Structure checks on the raw bytes, before any decoder (Pillow parses markers/chunks in Python).
    if data[:3] == b"\xff\xd8\xff":
        _check_jpeg_structure(data)
    elif data[:8] == b"\x89PNG\r\n\x1a\n":
        _check_png_structure(data)
    elif data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        # libwebp allocates its canvases when the file is opened, so check the size before that.
        size = _webp_canvas_size(data)
        if size is not None:
            _check_dimensions(*size)
            _check_decode_memory("WebP", *size, _WEBP_PEAK_BYTES_PER_PIXEL, len(data))

    try:
        im = Image.open(io.BytesIO(data), formats=_pil_formats())
    except UnidentifiedImageError:
        # A DICOM without the preamble can only be recognised by its name.
        if suffix in (".dcm", ".dicom"):
            return _from_dicom(data, has_preamble=False)
        fmt = _guess_image_format(data)
        if fmt is not None:
            raise ImageError(
                f"This file starts like a {fmt} image but its header is damaged or cut off "
                "(truncated or corrupt file). Try saving or downloading it again."
            ) from None
        raise ImageError(
            f"This file is not an image we can read (format not recognised). {_UPLOAD_HINT}"
        ) from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning, MemoryError):
        raise  # worded by load_image
    except Exception:  # noqa: BLE001 — header parsing errors of a recognised format
        raise _corrupt_error(_guess_image_format(data)) from None
    try:
        return _decode_pil(im, input_bytes=len(data))
    finally:
        im.close()


def _pil_formats() -> tuple[str, ...]:
    # Image.open(formats=...) only looks at plugins that are already registered, and Pillow
    # registers some (TIFF, WebP, MPO) lazily; init() registers all of them (once, then a no-op).
    # Formats this Pillow build lacks (e.g. WebP without libwebp) are left out.
    Image.init()
    return tuple(f for f in _PIL_FORMATS if f in Image.OPEN)


def _decode_pil(im: Image.Image, input_bytes: int = 0) -> Image.Image:
    """Check a lazily opened image's size, then decode it and convert to "L"."""
    fmt = im.format or "image"
    # Image.open only parsed the header: this is the last moment before pixels are allocated.
    _check_dimensions(*im.size)
    _check_decode_memory(_format_name(fmt), *im.size, _pil_peak_bytes_per_pixel(im), input_bytes)
    try:
        im.seek(0)  # animated GIF/WebP, multi-page TIFF: use the first frame
        im.load()
    except (Image.DecompressionBombError, Image.DecompressionBombWarning, MemoryError):
        raise
    except Exception:  # noqa: BLE001 — OSError "image file is truncated", SyntaxError, zlib ...
        raise _corrupt_error(fmt) from None
    return _to_gray8(_apply_exif_orientation(im, in_place=True))


def _format_name(fmt: str | None) -> str | None:
    # Pillow's format ids are upper case; say them the way people write them.
    return {"WEBP": "WebP", "MPO": "JPEG"}.get(fmt or "", fmt)


def _corrupt_error(fmt: str | None) -> ImageError:
    fmt = _format_name(fmt)
    what = f"{fmt} image" if fmt else "image"
    return ImageError(
        f"This {what} is truncated or corrupt, so its pixels cannot be decoded (the upload or "
        "download may not have finished). Try saving or downloading it again."
    )


def _guess_image_format(data: bytes) -> str | None:
    for sig, name in _IMAGE_SIGNATURES:
        if data.startswith(sig):
            return name
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "WebP"
    return None


def _sniff_non_image(data: bytes) -> str | None:
    """Describe well-known non-image files ("a PDF document"), or None if nothing matches."""
    head = data[:4096]
    if head.startswith(b"%PDF"):
        return "a PDF document"
    if head.startswith((b"PK\x03\x04", b"PK\x05\x06", b"PK\x07\x08")):
        return "a ZIP archive, e.g. a .zip, .docx or .pptx file"
    if head.startswith(b"\x1f\x8b"):
        return "a gzip-compressed file"
    if head.startswith((b"Rar!", b"7z\xbc\xaf\x27\x1c")):
        return "a compressed archive"
    if head.startswith(b"\xd0\xcf\x11\xe0\xa1\xb1\x1a\xe1"):
        return "an old Microsoft Office document"
    if head[4:8] == b"ftyp":
        brand = head[8:12]
        if brand in (b"heic", b"heix", b"hevc", b"heim", b"heis", b"mif1", b"msf1"):
            return "a HEIC/HEIF photo (as saved by iPhones); export it as JPEG or PNG"
        if brand in (b"avif", b"avis"):
            return "an AVIF image; export it as JPEG or PNG"
        return "a video or MP4-family file"
    if head.startswith(b"\x00\x00\x00\x0cjP  ") or head.startswith(b"\xff\x4f\xff\x51"):
        return "a JPEG 2000 image; export it as PNG or JPEG"

    # Text-based formats: look past a byte-order mark and leading whitespace.
    text = head.lstrip(b"\xef\xbb\xbf").lstrip().lower()
    if text.startswith(b"<svg") or (text.startswith(b"<?xml") and b"<svg" in text):
        return "an SVG drawing; export it as PNG"
    if text.startswith((b"<!doctype html", b"<html")) or b"<html" in text[:1024]:
        return "a web page (HTML), perhaps saved instead of the image itself"
    if text.startswith(b"<?xml"):
        return "an XML document"
    if _looks_like_text(head):
        return "a text file"
    return None


def _looks_like_text(head: bytes) -> bool:
    if not head or b"\x00" in head:
        return False
    # Printable ASCII, common whitespace and any byte >= 0x80 (UTF-8 / Latin-1 text) count.
    # Binary image headers are full of control bytes, so 95 % is a safe margin.
    texty = sum(1 for b in head if b >= 0x20 and b != 0x7F or b in (9, 10, 12, 13))
    return texty / len(head) >= 0.95


# --------------------------------------------------------------------------------------------
# Size checks shared by every path
# --------------------------------------------------------------------------------------------


def _check_dimensions(width: int, height: int, frames: int = 1) -> None:
    if width < MIN_SIDE or height < MIN_SIDE:
        raise ImageError(
            f"The image is only {width}×{height} px; at least {MIN_SIDE}×{MIN_SIDE} px is "
            "needed (a chest X-ray is normally over 1000 px on each side). Upload the "
            "full-size image."
        )
    pixels = width * height * max(1, frames)
    if pixels > MAX_PIXELS:
        frame_note = f" × {frames} frames" if frames > 1 else ""
        raise ImageError(
            f"The image is {width}×{height} px{frame_note} ({pixels / 1e6:,.0f} megapixels); the "
            f"limit is {MAX_PIXELS // 1_000_000} megapixels. Downscale it and upload it again."
        )


# Peak bytes per pixel of decoding + converting to "L" (this module's pipeline), by Pillow mode:
# the peak RSS growth measured at 16–60 MP (tests/test_bad_inputs.py prints it), rounded up by
# 10–20 %. Pillow keeps RGB/RGBA/CMYK/LA in 4 bytes per pixel, I;16 in 2, I/F in 4.
_PEAK_BYTES_PER_PIXEL: dict[str, float] = {
    "1": 3, "L": 3, "P": 6, "I;16": 8, "I;16L": 8, "I;16N": 8, "I;16B": 10,
    "LA": 8, "La": 8, "PA": 8, "RGB": 6, "RGBX": 11, "RGBA": 10, "RGBa": 10,
    "CMYK": 11, "YCbCr": 11, "LAB": 11, "HSV": 11, "I": 21, "F": 21,
}
_PEAK_BYTES_DEFAULT = 21.0
# libwebp's animation decoder (which Pillow uses for every WebP) keeps RGBA canvases and a copy
# of the frame besides the image (measured 16 bytes per pixel, RGB or RGBA).
_WEBP_PEAK_BYTES_PER_PIXEL = 18.0


def _pil_peak_bytes_per_pixel(im: Image.Image) -> float:
    per_px = _PEAK_BYTES_PER_PIXEL.get(im.mode, _PEAK_BYTES_DEFAULT)
    if im.mode == "P" and "transparency" in im.info:
        per_px = _PEAK_BYTES_PER_PIXEL["RGBA"]
    if im.format == "WEBP":
        per_px = max(per_px, _WEBP_PEAK_BYTES_PER_PIXEL)
    elif im.format in ("JPEG", "MPO") and im.info.get("progressive"):
        # libjpeg keeps every DCT coefficient of a progressive JPEG (2 bytes each, per component
        # at its sampling) until the last scan, next to the decoded image.
        layers = getattr(im, "layer", None) or []
        try:
            h_max = max(h for _, h, _, _ in layers)
            v_max = max(v for _, _, v, _ in layers)
            coefficients = sum(2.0 * h * v / (h_max * v_max) for _, h, v, _ in layers)
        except (TypeError, ValueError):
            coefficients = 2.0 * len(im.getbands())
        per_px = max(per_px, (1 if im.mode == "L" else 4) + coefficients)
    return per_px


def _check_decode_memory(what: str | None, width: int, height: int, bytes_per_pixel: float,
                         input_bytes: int = 0) -> None:
    """Refuse an image whose decode would need more than DECODE_MEMORY_BUDGET (estimated)."""
    need = input_bytes + width * height * bytes_per_pixel
    if need > DECODE_MEMORY_BUDGET:
        mb = 1024 * 1024
        # Largest area of this kind that fits, as a hint (same aspect ratio).
        fit = max(0.0, (DECODE_MEMORY_BUDGET - input_bytes) / bytes_per_pixel) / (width * height)
        w_fit, h_fit = int(width * fit**0.5), int(height * fit**0.5)
        raise ImageError(
            f"This {what or 'image'} is {width}×{height} px and decoding it would need about "
            f"{need / mb:,.0f} MB of memory; the limit per upload is {DECODE_MEMORY_BUDGET // mb} MB. "
            f"Downscale it (to about {w_fit}×{h_fit} px or less) or save it as an 8-bit grayscale "
            "PNG or JPEG, and upload it again."
        )


# --------------------------------------------------------------------------------------------
# Structural pre-checks on the raw bytes (cheap; they run before any decoder)
# --------------------------------------------------------------------------------------------

# The next marker after entropy-coded data: 0xFF followed by anything but a stuffed 0x00, a
# restart marker (0xD0–0xD7) or a fill byte (0xFF; the match then starts at the last fill byte).
_JPEG_NEXT_MARKER = re.compile(rb"\xff[^\x00\xd0-\xd7\xff]")
# Markers without a length field: TEM, RST0–7, SOI, EOI.
_JPEG_STANDALONE = frozenset([0x01, *range(0xD0, 0xD9)])


def _check_jpeg_structure(data: bytes | bytearray) -> None:
    """Walk the JPEG marker segments; refuse scan floods and metadata floods before Pillow/libjpeg.

    Stops at the first EOI or at the first cap exceeded, so the walk itself is bounded by the caps
    (plus one regular-expression pass over entropy-coded data). Damaged structure is left for the
    decoder to report as it always has.
    """
    n = len(data)
    pos = 2
    scans = metadata = segments = metadata_bytes = 0
    while pos + 4 <= n:
        m = _JPEG_NEXT_MARKER.search(data, pos)
        if m is None:
            return
        pos = m.start()
        marker = data[pos + 1]
        if marker == 0xD9:  # EOI: the rest (MPO's extra pictures) is not decoded
            return
        if marker in _JPEG_STANDALONE:
            pos += 2
            continue
        if pos + 4 > n:
            return
        length = (data[pos + 2] << 8) | data[pos + 3]
        segments += 1
        if marker == 0xDA:
            scans += 1
            if scans > JPEG_MAX_SCANS:
                raise ImageError(
                    f"This JPEG is split into more than {JPEG_MAX_SCANS} progressive scans (a normal "
                    "JPEG has at most about a dozen), which would take far too long to decode. "
                    "Re-save it as a baseline (non-progressive) JPEG or as PNG and upload it again."
                )
        elif 0xE0 <= marker <= 0xEF or marker == 0xFE:
            metadata += 1
            metadata_bytes += length
            _check_metadata("JPEG", "metadata segments (APPn/COM markers)", metadata, JPEG_MAX_METADATA_SEGMENTS,
                            metadata_bytes, JPEG_MAX_METADATA_BYTES,
                            "a camera or X-ray exporter writes a handful. Re-save it without metadata (or as PNG)")
        if segments > JPEG_MAX_SEGMENTS:
            raise ImageError(
                f"This JPEG has more than {JPEG_MAX_SEGMENTS:,} marker segments, far more than any real "
                "photo or X-ray export. Re-save it as a baseline JPEG or as PNG and upload it again."
            )
        pos += 2 + length


def _check_metadata(fmt: str, what: str, count: int, max_count: int, nbytes: int, max_bytes: int,
                    advice: str) -> None:
    """Refuse a metadata flood (too many segments/chunks, or too many bytes of them) with one clear message."""
    if count > max_count or nbytes > max_bytes:
        amount = (f"more than {max_count:,} {what}" if count > max_count
                  else f"more than {max_bytes // (1024 * 1024)} MB of metadata")
        raise ImageError(f"This {fmt} carries {amount}; {advice} and upload it again.")


def _webp_canvas_size(data: bytes | bytearray) -> tuple[int, int] | None:
    """(width, height) from a WebP's first chunk (VP8X canvas, VP8L or VP8 key frame header)."""
    chunk = bytes(data[12:16])
    if chunk == b"VP8X" and len(data) >= 30:
        return 1 + int.from_bytes(data[24:27], "little"), 1 + int.from_bytes(data[27:30], "little")
    if chunk == b"VP8L" and len(data) >= 25 and data[20] == 0x2F:
        bits = int.from_bytes(data[21:25], "little")
        return (bits & 0x3FFF) + 1, ((bits >> 14) & 0x3FFF) + 1
    if chunk == b"VP8 " and len(data) >= 30 and data[23:26] == b"\x9d\x01\x2a":
        return int.from_bytes(data[26:28], "little") & 0x3FFF, int.from_bytes(data[28:30], "little") & 0x3FFF
    return None


_PNG_CRITICAL = frozenset([b"IHDR", b"PLTE", b"IEND"])
_PNG_PIXEL_DATA = frozenset([b"IDAT", b"fdAT"])


def _check_png_structure(data: bytes | bytearray) -> None:
    """Walk the PNG chunk headers; refuse chunk floods before Pillow parses them in Python."""
    n = len(data)
    pos = 8
    pixel_chunks = other = ancillary_bytes = 0
    while pos + 8 <= n:
        length, kind = struct.unpack_from(">I4s", data, pos)
        if kind in _PNG_PIXEL_DATA:
            pixel_chunks += 1
            if pixel_chunks > PNG_MAX_DATA_CHUNKS:
                raise ImageError(
                    f"This PNG splits its pixel data into more than {PNG_MAX_DATA_CHUNKS:,} chunks, far "
                    "more than any encoder writes. Re-save it as PNG and upload it again."
                )
        else:
            other += 1
            if kind not in _PNG_CRITICAL:
                ancillary_bytes += length
            _check_metadata("PNG", "metadata chunks (text, ICC, EXIF, ...)", other, PNG_MAX_OTHER_CHUNKS,
                            ancillary_bytes, PNG_MAX_ANCILLARY_BYTES,
                            "a normal PNG has a handful. Re-save it without metadata")
        if kind == b"IEND":
            return
        pos += 12 + length


# --------------------------------------------------------------------------------------------
# Conversion to 8-bit grayscale
# --------------------------------------------------------------------------------------------


def _apply_exif_orientation(im: Image.Image, in_place: bool = False) -> Image.Image:
    """Apply the EXIF orientation; ``in_place`` for images this module decoded itself (without it
    Pillow returns a full copy even when there is nothing to rotate)."""
    try:
        out = ImageOps.exif_transpose(im, in_place=in_place)
    except (MemoryError, Image.DecompressionBombError):
        raise
    except Exception:  # noqa: BLE001
        # Unparseable EXIF tells us nothing about orientation; use the pixels as stored.
        return im
    return im if out is None else out


def colourfulness(im: Image.Image) -> float:
    """Hasler & Suesstrunk (2003) colourfulness of an RGB-like image (0 = gray; > ~15 clearly coloured).

    Computed on a 128 px thumbnail; kept with the grayscale result (``info["colourfulness"]``) because
    a strongly coloured upload is a cheap sign that it is not a radiograph (see ood.py).
    """
    # Same result as im.convert("RGB").thumbnail((128, 128)), without the full-size copy for RGB.
    thumb = im if im.mode == "RGB" else im.convert("RGB")
    size = _thumbnail_size(thumb.size, (128, 128))
    if size is not None and size != thumb.size:
        thumb = thumb.resize(size, Image.Resampling.BICUBIC, reducing_gap=2.0)
    a = np.asarray(thumb, dtype=np.float32)
    rg = a[..., 0] - a[..., 1]
    yb = 0.5 * (a[..., 0] + a[..., 1]) - a[..., 2]
    return float(np.hypot(rg.std(), yb.std()) + 0.3 * np.hypot(rg.mean(), yb.mean()))


def _thumbnail_size(size: tuple[int, int], box: tuple[int, int]) -> tuple[int, int] | None:
    """The size ``Image.thumbnail(box)`` would give (None: already inside the box)."""
    import math

    width, height = size
    x, y = box
    if x >= width and y >= height:
        return None

    def round_aspect(number: float, key: Any) -> int:
        return max(min(math.floor(number), math.ceil(number), key=key), 1)

    aspect = width / height
    if x / y >= aspect:
        x = round_aspect(y * aspect, key=lambda n: abs(aspect - n / y))
    else:
        y = round_aspect(x / aspect, key=lambda n: 0 if n == 0 else abs(aspect - x / n))
    return x, y


def _composite_over_black_to_l(im: Image.Image) -> Image.Image:
    """Alpha-composite over black and convert to "L", one band of rows at a time.

    Pixel for pixel the same as ``alpha_composite(black, im.convert("RGBA")).convert("L")``, but
    the three full-size RGBA temporaries (12 bytes per pixel) become ~4 MB bands.
    """
    width, height = im.size
    out = Image.new("L", im.size)
    rows = max(1, (1 << 20) // max(1, width))
    for top in range(0, height, rows):
        band = im.crop((0, top, width, min(height, top + rows))).convert("RGBA")
        black = Image.new("RGBA", band.size, (0, 0, 0, 255))
        out.paste(Image.alpha_composite(black, band).convert("L"), (0, top))
    return out


def _to_gray8(im: Image.Image) -> Image.Image:
    mode = im.mode
    colour = colourfulness(im) if mode in ("P", "PA", "RGBA", "RGBa", "RGB", "RGBX", "CMYK", "YCbCr") else 0.0
    if mode == "L":
        out = im.copy()
    elif mode in ("1", "P") and not (mode == "P" and "transparency" in im.info):
        # Pillow's P -> L applies the same luma to the palette entries as RGB -> L to pixels.
        out = im.convert("L")
    elif mode in ("P", "PA", "LA", "La", "RGBA", "RGBa"):
        # Composite over black, as in the dataset processing (transparent → 0); palette images
        # with transparency are expanded to RGBA (band by band) first.
        out = _composite_over_black_to_l(im)
    elif mode.startswith("I") or mode == "F":
        # 16/32-bit integer and float data: stretch the used range to 0..255.
        out = Image.fromarray(_minmax_to_uint8(np.asarray(im)))
    elif mode == "RGB":
        out = im.convert("L")
    elif mode in ("RGBX", "CMYK", "YCbCr", "LAB", "HSV"):
        out = im.convert("RGB").convert("L")
    else:
        out = im.convert("L")
    out.info = {"colourfulness": colour}  # the upload's metadata (EXIF, ICC, text) is not needed downstream
    return out


def _minmax_to_uint8(arr: np.ndarray, present: np.ndarray | None = None) -> np.ndarray:
    """Scale finite values linearly to 0..255; NaN → 0, ±inf → 255/0, constant → all 0.

    ``present`` (a boolean mask like ``arr``): take the range from those elements only — used
    when ``arr`` is a look-up table and ``present`` marks the entries the image uses.
    """
    arr = np.asarray(arr)
    if present is None and arr.dtype.kind in "iu" and arr.dtype.itemsize <= 2 and arr.size > 65536:
        # 8/16-bit integers: the same arithmetic on each possible value, then one table look-up
        # (3 bytes per pixel instead of ~13; identical output).
        return _through_table(arr, lambda domain: domain)
    # Always a private copy: the arithmetic below is in place, and the input may be a read-only
    # view of a PIL image or the caller's own array.
    a = np.array(arr, dtype=np.float32, copy=True)
    finite = np.isfinite(a)
    usable = finite if present is None else finite & present
    if not usable.any():
        return np.zeros(a.shape, dtype=np.uint8)
    all_finite = present is None and bool(finite.all())
    lo = float(a.min()) if all_finite else float(a[usable].min())
    hi = float(a.max()) if all_finite else float(a[usable].max())
    if not all_finite:
        a = np.where(np.isposinf(a), hi, np.where(finite, a, lo)).astype(np.float32)
    if hi <= lo:
        # One value everywhere: there is no range to stretch; map to 0 (callers may warn).
        return np.zeros(a.shape, dtype=np.uint8)
    a -= lo
    a *= 255.0 / (hi - lo)
    np.clip(a, 0, 255, out=a)
    return np.rint(a).astype(np.uint8)


def _through_table(arr: np.ndarray, transform: Any, invert: bool = False) -> np.ndarray:
    """``_minmax_to_uint8(transform(arr))`` (inverted if asked) for an 8/16-bit integer ``arr``.

    ``transform`` must work element by element (rescale slope/intercept, LUTs, windowing): it is
    applied to every value between the image's minimum and maximum once, the min–max scaling is
    taken over the values the image actually uses, and the pixels are mapped through the table.
    Element for element the same arithmetic as on the full array, so the output is identical; the
    memory is the index array (2 bytes per pixel) and the result (1 byte) instead of several
    float64/float32 copies.
    """
    if arr.dtype.byteorder not in ("=", "|"):
        arr = arr.astype(arr.dtype.newbyteorder("="))
    lo, hi = int(arr.min()), int(arr.max())
    domain = np.arange(lo, hi + 1, dtype=np.int64).astype(arr.dtype)
    if arr.dtype.kind == "u":
        index = arr - arr.dtype.type(lo)  # ≥ 0 and < 2**bits: no wrap-around
    else:
        # Signed: shift to the unsigned range by flipping the sign bit (order preserving), then
        # subtract — no wider temporary.
        unsigned = np.dtype(f"u{arr.dtype.itemsize}")
        sign = unsigned.type(1 << (8 * arr.dtype.itemsize - 1))
        index = arr.view(unsigned) ^ sign
        index -= unsigned.type((lo + int(sign)) & ((1 << (8 * arr.dtype.itemsize)) - 1))
    present = np.zeros(domain.size, dtype=bool)
    present[index] = True
    table = _minmax_to_uint8(np.asarray(transform(domain)), present=present)
    if invert:
        table = 255 - table
    return table[index]


def _luma(rgb: np.ndarray) -> np.ndarray:
    """ITU-R 601 luma (what Pillow's RGB → L uses) of an H×W×3 array, as float32."""
    rgb = rgb.astype(np.float32, copy=False)
    return rgb[..., 0] * 0.299 + rgb[..., 1] * 0.587 + rgb[..., 2] * 0.114


# --------------------------------------------------------------------------------------------
# In-memory inputs
# --------------------------------------------------------------------------------------------


def _from_pil_image(im: Image.Image) -> Image.Image:
    _check_dimensions(*im.size)
    try:
        im.load()  # may be lazily opened by the caller
    except (Image.DecompressionBombError, MemoryError):
        raise
    except Exception:  # noqa: BLE001
        raise _corrupt_error(im.format) from None
    # exif_transpose and the conversions return new images, so the caller's image is untouched.
    return _to_gray8(_apply_exif_orientation(im))


def _from_array(arr: np.ndarray) -> Image.Image:
    if arr.ndim == 3 and arr.shape[-1] == 1:
        arr = arr[..., 0]
    if arr.ndim not in (2, 3) or (arr.ndim == 3 and arr.shape[-1] not in (3, 4)):
        raise ImageError(
            f"An image array must be H×W, H×W×1, H×W×3 or H×W×4; got shape {tuple(arr.shape)}."
        )
    _check_dimensions(int(arr.shape[1]), int(arr.shape[0]))
    if arr.dtype.kind not in "biuf":
        raise ImageError(f"An image array must hold numbers; got dtype {arr.dtype}.")
    if arr.dtype == np.bool_:
        arr = arr.astype(np.uint8) * 255
    if arr.dtype != np.uint8:
        if arr.ndim == 2:
            # High-bit-depth or float data: stretch like a 16-bit/float file.
            return Image.fromarray(_minmax_to_uint8(arr))
        # Colour channels are stretched together (keeps their balance); alpha is read in the
        # dtype's own scale (0..max for integers, 0..1 for floats).
        colour = _minmax_to_uint8(arr[..., :3])
        if arr.shape[-1] == 4:
            alpha = arr[..., 3].astype(np.float32)
            if arr.dtype.kind in "iu":
                alpha /= float(np.iinfo(arr.dtype).max)
            alpha = np.nan_to_num(alpha, nan=0.0, posinf=1.0, neginf=0.0)
            alpha_u8 = np.rint(np.clip(alpha, 0.0, 1.0) * 255.0).astype(np.uint8)
            arr = np.concatenate([colour, alpha_u8[..., None]], axis=-1)
        else:
            arr = colour
    # 8-bit data is used as is (no stretching), exactly like an 8-bit file; Pillow infers
    # L / RGB / RGBA from the shape, and _to_gray8 composites alpha over black.
    return _to_gray8(Image.fromarray(np.ascontiguousarray(arr)))


# --------------------------------------------------------------------------------------------
# DICOM
# --------------------------------------------------------------------------------------------

_DEFLATED = "1.2.840.10008.1.2.1.99"
_EXPLICIT_LE = "1.2.840.10008.1.2.1"
_BIG_ENDIAN = "1.2.840.10008.1.2.2"
_NATIVE_TRANSFER_SYNTAXES = {
    "1.2.840.10008.1.2",  # Implicit VR Little Endian
    _EXPLICIT_LE,  # Explicit VR Little Endian
    _DEFLATED,  # Deflated Explicit VR Little Endian (inflated under a cap before reading)
    _BIG_ENDIAN,  # Explicit VR Big Endian
}
# Explicit-VR value representations with a 2-byte reserved field and a 4-byte length.
_LONG_VRS = frozenset([b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR",
                       b"UT", b"UV"])
_UNDEFINED = 0xFFFFFFFF
_PIXEL_DATA_TAG = (0x7FE0, 0x0010)

# Peak bytes per pixel of one DICOM frame through pydicom and _dicom_to_gray8 (measured like
# _PEAK_BYTES_PER_PIXEL): monochrome integer data goes through a look-up table; compressed frames
# add the codec's buffers; colour, palette and float data take the float path.
_DICOM_PEAK_MONO_NATIVE = 5.0    # + bytes per sample
_DICOM_PEAK_MONO_COMPRESSED = 9.0    # + 2 × bytes per sample
_DICOM_PEAK_OTHER = 30.0    # per sample


def _from_dicom(data: bytes, has_preamble: bool) -> Image.Image:
    try:
        import pydicom  # lazy: DICOM uploads are rare and pydicom is slow to import
    except ImportError:
        raise ImageError(
            "This looks like a DICOM file, but DICOM support is not installed on this server. "
            "Export the image as PNG and upload that."
        ) from None

    # Cheap checks on the raw bytes first: pydicom would inflate a deflated dataset completely and
    # parse every element before anything else could look at the file.
    start, explicit, little = 0, True, True
    if has_preamble:
        start, meta = _read_file_meta(data)
        syntax = meta.get(0x0010, b"").rstrip(b"\x00 ").decode("ascii", "replace")
        if syntax == _DEFLATED:
            data = _inflate_deflated_dicom(data, start, meta)  # a bytearray: pydicom reads it as is
            start, meta = _read_file_meta(data)
        explicit = syntax != "1.2.840.10008.1.2"
        little = syntax != _BIG_ENDIAN
    else:
        explicit = data[4:6].isalpha() and data[4:6].isupper()
    _check_dicom_element_count(data, start, explicit, little)

    try:
        # force=True only for preamble-less files named .dcm; the file is read fully into memory
        # already (≤ MAX_BYTES), pixel data is not decoded here.
        ds = pydicom.dcmread(io.BytesIO(data), force=not has_preamble)
    except Exception:  # noqa: BLE001 — InvalidDicomError & co; messages may quote tag values
        raise ImageError(
            "This file looks like DICOM but its header cannot be parsed (damaged or not a "
            "DICOM file). Export the image again, or upload it as PNG."
        ) from None

    if not any(k in ds for k in ("PixelData", "FloatPixelData", "DoubleFloatPixelData")):
        if has_preamble:
            raise ImageError(
                "This DICOM file contains no image (it has no Pixel Data; it may be a report "
                "or a structured document). Upload the DICOM image itself."
            )
        raise ImageError(
            f"This file has a DICOM name but is not a DICOM image we can read. {_UPLOAD_HINT}"
        )

    rows, cols, frames = _dicom_geometry(ds)
    # Pixel count check before touching pixel data; only the first frame is decoded when the
    # installed pydicom can decode single frames, so only that frame's size matters then.
    _check_dimensions(cols, rows)

    tsyntax = _transfer_syntax(ds)
    compressed = tsyntax is not None and str(tsyntax) not in _NATIVE_TRANSFER_SYNTAXES
    _check_dicom_memory(ds, rows, cols, compressed, len(data))
    if compressed:
        _check_compressed_frame_size(ds, rows, cols)
    try:
        arr = _first_frame(ds, frames)
    except (MemoryError, ImageError):
        raise
    except Exception:  # noqa: BLE001 — NotImplementedError/RuntimeError/ValueError from decoders
        if tsyntax is not None and str(tsyntax) not in _NATIVE_TRANSFER_SYNTAXES:
            raise ImageError(
                "This DICOM file uses a compressed transfer syntax "
                f"({_syntax_name(tsyntax)}) that this server cannot decode; export it "
                "uncompressed (e.g. Explicit VR Little Endian) or as PNG and upload it again."
            ) from None
        raise ImageError(
            "The pixel data of this DICOM file is damaged or incomplete (truncated or corrupt), "
            "so it cannot be decoded. Export the image again."
        ) from None

    return _dicom_to_gray8(arr, ds)


def _read_file_meta(data: bytes | bytearray) -> tuple[int, dict[int, bytes]]:
    """The group-0002 file meta elements after "DICM" (always Explicit VR Little Endian):
    (offset where the data set starts, {element number: value})."""
    pos, n, meta = 132, len(data), {}
    while pos + 8 <= n and len(meta) < 64:
        group, element = struct.unpack_from("<HH", data, pos)
        if group != 0x0002:
            break
        vr = bytes(data[pos + 4:pos + 6])
        if vr in _LONG_VRS:
            (length,), header = struct.unpack_from("<I", data, pos + 8), 12
        else:
            (length,), header = struct.unpack_from("<H", data, pos + 6), 8
        if length == _UNDEFINED or pos + header + length > n:
            break
        meta[element] = bytes(data[pos + header:pos + header + length])
        pos += header + length
    return pos, meta


_META_VRS = {0x0000: b"UL", 0x0001: b"OB", 0x0002: b"UI", 0x0003: b"UI", 0x0010: b"UI", 0x0012: b"UI",
             0x0013: b"SH", 0x0016: b"AE", 0x0017: b"AE", 0x0018: b"AE", 0x0026: b"UR", 0x0027: b"AE",
             0x0028: b"AE", 0x0100: b"UI", 0x0102: b"OB"}


def _inflate_deflated_dicom(data: bytes | bytearray, start: int, meta: dict[int, bytes]) -> bytearray:
    """Inflate a Deflated Explicit VR Little Endian data set under DICOM_MAX_INFLATED and return the
    same file as plain Explicit VR Little Endian (pydicom would inflate everything, unbounded)."""
    mb = 1024 * 1024
    parts = []
    for element, value in sorted(meta.items()):
        if element == 0x0000:
            continue  # group length: recomputed below
        if element == 0x0010:
            value = _EXPLICIT_LE.encode() + b"\x00"
        vr = _META_VRS.get(element, b"UN")
        if vr in _LONG_VRS:
            parts.append(struct.pack("<HH2sHI", 0x0002, element, vr, 0, len(value)) + value)
        else:
            parts.append(struct.pack("<HH2sH", 0x0002, element, vr, len(value)) + value)
    group = b"".join(parts)
    out = bytearray(data[:128])
    out += b"DICM" + struct.pack("<HH2sHI", 0x0002, 0x0000, b"UL", 4, len(group)) + group
    body_start = len(out)
    # Inflate in 4 MB steps into one growing buffer: the peak is the cap, not twice the output.
    inflater = zlib.decompressobj(-zlib.MAX_WBITS)
    pending: Any = memoryview(data)[start:]
    try:
        while not inflater.eof:
            chunk = inflater.decompress(pending, 4 * mb)
            pending = inflater.unconsumed_tail
            if not chunk and not pending:
                break  # the stream ends early: pydicom reports the truncated data set
            out += chunk
            if len(out) - body_start > DICOM_MAX_INFLATED:
                raise ImageError(
                    "This DICOM file is stored deflated (Deflated Explicit VR Little Endian) and unpacks "
                    f"to more than {DICOM_MAX_INFLATED // mb} MB, the most an uncompressed DICOM upload "
                    "may be. Export it uncompressed (Explicit VR Little Endian) or as PNG and upload it "
                    "again."
                )
    except zlib.error:
        raise ImageError(
            "This DICOM file is stored deflated (zlib-compressed) and its compressed data is damaged, "
            "so it cannot be read. Export the image again, uncompressed or as PNG."
        ) from None
    return out


def _check_dicom_element_count(data: bytes | bytearray, pos: int, explicit: bool, little: bool) -> None:
    """Count data elements and items (nested ones too) without parsing values; refuse a flood.

    Walks sequences and items of defined and undefined length; skips the fragments of
    encapsulated pixel data. Stops at the cap, or quietly at anything malformed (pydicom then
    reports the file as it always has): the cost is bounded by DICOM_MAX_ELEMENTS steps.
    """
    end, count = len(data), 0
    e = "<" if little else ">"
    tag_fmt, u16, u32 = f"{e}HH", f"{e}H", f"{e}I"
    # Open containers: (end offset or None for undefined length, parent's explicit, parent's encaps)
    stack: list[tuple[int | None, bool, bool]] = []
    encapsulated = False
    while pos + 8 <= end:
        while stack and stack[-1][0] is not None and pos >= stack[-1][0]:
            _, explicit, encapsulated = stack.pop()
        count += 1
        if count > DICOM_MAX_ELEMENTS:
            raise ImageError(
                f"This DICOM file has more than {DICOM_MAX_ELEMENTS:,} data elements (a chest X-ray has "
                "a few hundred), far too many to read safely. Export the image again, or as PNG, "
                "and upload it again."
            )
        group, element = struct.unpack_from(tag_fmt, data, pos)
        if group == 0xFFFE:  # item, item delimiter, sequence delimiter: 4-byte length, no VR
            (length,) = struct.unpack_from(u32, data, pos + 4)
            pos += 8
            if element == 0xE000:  # item
                if encapsulated:
                    if length == _UNDEFINED:
                        return
                    pos += length  # a fragment of compressed pixel data
                else:
                    stack.append((None if length == _UNDEFINED else pos + length, explicit, encapsulated))
            elif element in (0xE00D, 0xE0DD) and stack and stack[-1][0] is None:
                _, explicit, encapsulated = stack.pop()
            continue
        if explicit:
            vr = bytes(data[pos + 4:pos + 6])
            if vr in _LONG_VRS:
                (length,), header = struct.unpack_from(u32, data, pos + 8), 12
            else:
                (length,), header = struct.unpack_from(u16, data, pos + 6), 8
        else:
            vr = b""
            (length,), header = struct.unpack_from(u32, data, pos + 4), 8
        pos += header
        if length == _UNDEFINED:
            stack.append((None, explicit, encapsulated))
            if (group, element) == _PIXEL_DATA_TAG:
                encapsulated = True
            elif vr == b"UN":
                explicit = False  # an undefined-length UN is an implicit-VR sequence
            continue
        if vr == b"SQ" or (not explicit and pos + 4 <= end
                           and struct.unpack_from(tag_fmt, data, pos) == (0xFFFE, 0xE000)):
            stack.append((pos + length, explicit, encapsulated))  # walk into the sequence
            continue
        pos += length


def _check_dicom_memory(ds: Any, rows: int, cols: int, compressed: bool, input_bytes: int) -> None:
    try:
        samples = max(1, int(ds.get("SamplesPerPixel", 1) or 1))
        bits = int(ds.get("BitsAllocated", 16) or 16)
    except Exception:  # noqa: BLE001 — malformed: let the decoder complain
        return
    sample_bytes = max(1, (bits + 7) // 8)
    photometric = str(ds.get("PhotometricInterpretation", "") or "").strip().upper()
    if samples == 1 and bits <= 16 and photometric != "PALETTE COLOR":
        per_px = (_DICOM_PEAK_MONO_COMPRESSED + 2 * sample_bytes if compressed
                  else _DICOM_PEAK_MONO_NATIVE + sample_bytes)
    else:
        per_px = _DICOM_PEAK_OTHER * samples
    # The file's bytes are held twice while pydicom reads it (ours and its Pixel Data value).
    _check_decode_memory("DICOM image", cols, rows, per_px, 2 * input_bytes)


def _check_compressed_frame_size(ds: Any, rows: int, cols: int) -> None:
    """Compare the declared Rows × Columns with the size in the first compressed frame's header."""
    try:
        from pydicom.encaps import generate_fragments

        fragments = generate_fragments(ds.PixelData)
        next(fragments, None)  # the Basic Offset Table item (possibly empty)
        first = next(fragments, b"")
    except Exception:  # noqa: BLE001 — not encapsulated after all, or damaged: the decoder says so
        return
    size = _codestream_size(first)
    if size is None:
        return
    width, height = size
    if (width, height) != (cols, rows) and height != 0:  # height 0: JPEG with a DNL marker
        raise ImageError(
            f"This DICOM file declares a {cols}×{rows} px image, but its compressed pixel data holds "
            f"a {width}×{height} px image. The file is inconsistent (damaged or altered), so it was "
            "not decoded. Export the image again, or upload it as PNG."
        )


# JPEG start-of-frame markers (baseline, extended, progressive, lossless, arithmetic; JPEG-LS SOF55).
_JPEG_SOF = frozenset([0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF, 0xF7])


def _codestream_size(frame: bytes) -> tuple[int, int] | None:
    """(width, height) from a JPEG / JPEG-LS SOF or a JPEG 2000 SIZ header; None if not found."""
    head = frame[:65536]
    if head[:2] == b"\xff\xd8":
        pos = 2
        while pos + 9 <= len(head):
            if head[pos] != 0xFF:
                return None
            marker = head[pos + 1]
            if marker in _JPEG_SOF:
                height, width = struct.unpack_from(">HH", head, pos + 5)
                return width, height
            if marker in _JPEG_STANDALONE or marker == 0xFF:
                pos += 1 if marker == 0xFF else 2
                continue
            pos += 2 + ((head[pos + 2] << 8) | head[pos + 3])
        return None
    siz = head.find(b"\xff\x4f\xff\x51")  # SOC + SIZ (also inside a JP2 wrapper)
    if siz >= 0 and siz + 24 <= len(head):
        xsiz, ysiz, x0, y0 = struct.unpack_from(">IIII", head, siz + 8)
        return xsiz - x0, ysiz - y0
    return None


def _dicom_geometry(ds: Any) -> tuple[int, int, int]:
    try:
        rows, cols = int(ds.Rows), int(ds.Columns)
    except Exception:  # noqa: BLE001 — missing or malformed
        raise ImageError(
            "This DICOM file does not state its image size (Rows/Columns), so it cannot be "
            "decoded. Export the image again."
        ) from None
    try:
        frames = int(ds.get("NumberOfFrames", 1) or 1)
    except Exception:  # noqa: BLE001
        frames = 1
    return rows, cols, max(frames, 1)


def _transfer_syntax(ds: Any) -> Any:
    meta = getattr(ds, "file_meta", None)
    return getattr(meta, "TransferSyntaxUID", None) if meta is not None else None


def _syntax_name(uid: Any) -> str:
    # UID names come from pydicom's dictionary of standard UIDs, never from the file's content.
    name = getattr(uid, "name", "") or ""
    if not name or name == str(uid):
        return "an unrecognised compression"
    return name


def _first_frame(ds: Any, frames: int) -> np.ndarray:
    try:
        from pydicom.pixels import pixel_array  # pydicom >= 3: can decode a single frame
    except ImportError:
        pixel_array = None
    if pixel_array is not None:
        arr = pixel_array(ds, index=0)
    else:
        # Older pydicom decodes every frame at once, so the whole volume must fit the limit.
        rows, cols, _ = _dicom_geometry(ds)
        _check_dimensions(cols, rows, frames)
        arr = ds.pixel_array
        if frames > 1:
            arr = arr[0]
    return np.asarray(arr)


def _dicom_to_gray8(arr: np.ndarray, ds: Any) -> Image.Image:
    try:
        from pydicom.pixels import apply_modality_lut, apply_voi_lut
    except ImportError:  # pydicom 2.x location
        try:
            from pydicom.pixel_data_handlers.util import apply_modality_lut, apply_voi_lut
        except ImportError:
            apply_modality_lut = apply_voi_lut = None

    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2") or "").strip().upper()
    if photometric == "PALETTE COLOR" and arr.ndim == 2:
        # Stored values are indices into a colour table; look them up, then treat as colour.
        try:
            from pydicom.pixels import apply_color_lut
        except ImportError:
            from pydicom.pixel_data_handlers.util import apply_color_lut
        arr = np.asarray(apply_color_lut(arr, ds))
    if arr.ndim == 3:
        # Colour (RGB; pydicom already converted YBR to RGB when decoding): use luma. The
        # modality/VOI LUTs below are defined for monochrome data only.
        values = _luma(arr[..., :3])
        return Image.fromarray(_minmax_to_uint8(values))

    def to_display(stored: np.ndarray) -> np.ndarray:
        values = stored
        if apply_modality_lut is not None:
            # Rescale slope/intercept (or a Modality LUT) → physical units such as HU.
            try:
                values = apply_modality_lut(values, ds)
            except Exception:  # noqa: BLE001 — malformed LUT: carry on with stored values
                values = stored
        if apply_voi_lut is not None:
            # Window centre/width or VOI LUT: the display range the modality chose.
            try:
                values = apply_voi_lut(values, ds, index=0)
            except Exception:  # noqa: BLE001 — malformed window: keep the full range
                pass
        return values

    # MONOCHROME1 means "low values are white": invert so bone is bright, like MONOCHROME2.
    invert = photometric == "MONOCHROME1"
    if arr.dtype.kind in "iu" and arr.dtype.itemsize <= 2:
        # Every step above works value by value: apply it to each stored value once, then map
        # the pixels through the table (identical output, a fraction of the memory).
        gray = _through_table(arr, to_display, invert=invert)
    else:
        gray = _minmax_to_uint8(to_display(arr))
        if invert:
            gray = 255 - gray
    return Image.fromarray(np.ascontiguousarray(gray))
