"""Turn whatever a user uploads into one 8-bit grayscale ``PIL.Image`` — or a clear error.

Everything that reaches the classifier goes through :func:`load_image`. Uploads are untrusted,
so this module is deliberately defensive:

* size limits (bytes, then pixels) are checked *before* any pixel data is decoded, so a
  "decompression bomb" (a tiny file that declares a huge image) is rejected cheaply;
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
import warnings
from pathlib import Path
from typing import Any, Union

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

__all__ = [
    "ImageError",
    "MAX_BYTES",
    "MAX_PIXELS",
    "MIN_SIDE",
    "ImageSource",
    "load_image",
    "describe_limits",
]

#: Largest upload accepted, checked before the file is read or decoded.
MAX_BYTES: int = 50 * 1024 * 1024
#: Largest image accepted (width × height of one frame), checked before decoding pixels.
MAX_PIXELS: int = 60_000_000
#: Smallest accepted side in pixels: anything smaller cannot be a chest X-ray, and the
#: model's resize would just smear a handful of pixels over the whole input.
MIN_SIDE: int = 8

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


class ImageError(ValueError):
    """The input cannot be used as an X-ray image; ``str(err)`` is a message for a person."""


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
    try:
        # Decoders emit warnings for odd files; for untrusted uploads they are noise and can echo
        # file contents into logs, so they are silenced here. Pillow's DecompressionBombWarning is
        # turned into an exception instead, so it is caught below and can never escape.
        # (catch_warnings is process-global; a race between threads can at worst leave that
        # "error"/"ignore" filter installed, which is harmless.)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            return _load(source)
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
    return _from_bytes(data, suffix=path.suffix.lower())


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
        return _decode_pil(im)
    finally:
        im.close()


def _pil_formats() -> tuple[str, ...]:
    # Image.open(formats=...) only looks at plugins that are already registered, and Pillow
    # registers some (TIFF, WebP, MPO) lazily; init() registers all of them (once, then a no-op).
    # Formats this Pillow build lacks (e.g. WebP without libwebp) are left out.
    Image.init()
    return tuple(f for f in _PIL_FORMATS if f in Image.OPEN)


def _decode_pil(im: Image.Image) -> Image.Image:
    """Check a lazily opened image's size, then decode it and convert to "L"."""
    fmt = im.format or "image"
    # Image.open only parsed the header: this is the last moment before pixels are allocated.
    _check_dimensions(*im.size)
    try:
        im.seek(0)  # animated GIF/WebP, multi-page TIFF: use the first frame
        im.load()
    except (Image.DecompressionBombError, Image.DecompressionBombWarning, MemoryError):
        raise
    except Exception:  # noqa: BLE001 — OSError "image file is truncated", SyntaxError, zlib ...
        raise _corrupt_error(fmt) from None
    return _to_gray8(_apply_exif_orientation(im))


def _corrupt_error(fmt: str | None) -> ImageError:
    # Pillow's format ids are upper case; say them the way people write them.
    fmt = {"WEBP": "WebP", "MPO": "JPEG"}.get(fmt or "", fmt)
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


# --------------------------------------------------------------------------------------------
# Conversion to 8-bit grayscale
# --------------------------------------------------------------------------------------------


def _apply_exif_orientation(im: Image.Image) -> Image.Image:
    try:
        out = ImageOps.exif_transpose(im)
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
    thumb = im.convert("RGB")
    thumb.thumbnail((128, 128))
    a = np.asarray(thumb, dtype=np.float32)
    rg = a[..., 0] - a[..., 1]
    yb = 0.5 * (a[..., 0] + a[..., 1]) - a[..., 2]
    return float(np.hypot(rg.std(), yb.std()) + 0.3 * np.hypot(rg.mean(), yb.mean()))


def _to_gray8(im: Image.Image) -> Image.Image:
    mode = im.mode
    colour = colourfulness(im) if mode in ("P", "PA", "RGBA", "RGBa", "RGB", "RGBX", "CMYK", "YCbCr") else 0.0
    if mode == "L":
        out = im.copy()
    elif mode == "1":
        out = im.convert("L")
    elif mode in ("P", "PA"):
        # Palette images may carry transparency; expand so alpha is composited like RGBA.
        has_alpha = mode == "PA" or "transparency" in im.info
        out = _to_gray8(im.convert("RGBA" if has_alpha else "RGB"))
    elif mode in ("LA", "La", "RGBA", "RGBa"):
        # Composite over black, as in the dataset processing (transparent → 0).
        rgba = im.convert("RGBA")
        black = Image.new("RGBA", rgba.size, (0, 0, 0, 255))
        out = Image.alpha_composite(black, rgba).convert("L")
    elif mode.startswith("I") or mode == "F":
        # 16/32-bit integer and float data: stretch the used range to 0..255.
        out = Image.fromarray(_minmax_to_uint8(np.asarray(im)))
    elif mode in ("RGB", "RGBX", "CMYK", "YCbCr", "LAB", "HSV"):
        out = im.convert("RGB").convert("L")
    else:
        out = im.convert("L")
    out.info = {"colourfulness": colour}  # the upload's metadata (EXIF, ICC, text) is not needed downstream
    return out


def _minmax_to_uint8(arr: np.ndarray) -> np.ndarray:
    """Scale finite values linearly to 0..255; NaN → 0, ±inf → 255/0, constant → all 0."""
    # Always a private copy: the arithmetic below is in place, and the input may be a read-only
    # view of a PIL image or the caller's own array.
    a = np.array(arr, dtype=np.float32, copy=True)
    finite = np.isfinite(a)
    if not finite.any():
        return np.zeros(a.shape, dtype=np.uint8)
    all_finite = bool(finite.all())
    lo = float(a.min()) if all_finite else float(a[finite].min())
    hi = float(a.max()) if all_finite else float(a[finite].max())
    if not all_finite:
        a = np.where(np.isposinf(a), hi, np.where(finite, a, lo)).astype(np.float32)
    if hi <= lo:
        # One value everywhere: there is no range to stretch; map to 0 (callers may warn).
        return np.zeros(a.shape, dtype=np.uint8)
    a -= lo
    a *= 255.0 / (hi - lo)
    np.clip(a, 0, 255, out=a)
    return np.rint(a).astype(np.uint8)


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

_NATIVE_TRANSFER_SYNTAXES = {
    "1.2.840.10008.1.2",  # Implicit VR Little Endian
    "1.2.840.10008.1.2.1",  # Explicit VR Little Endian
    "1.2.840.10008.1.2.1.99",  # Deflated Explicit VR Little Endian (zlib, always decodable)
    "1.2.840.10008.1.2.2",  # Explicit VR Big Endian
}


def _from_dicom(data: bytes, has_preamble: bool) -> Image.Image:
    try:
        import pydicom  # lazy: DICOM uploads are rare and pydicom is slow to import
    except ImportError:
        raise ImageError(
            "This looks like a DICOM file, but DICOM support is not installed on this server. "
            "Export the image as PNG and upload that."
        ) from None

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

    values = arr
    if apply_modality_lut is not None:
        # Rescale slope/intercept (or a Modality LUT) → physical units such as HU.
        try:
            values = apply_modality_lut(values, ds)
        except Exception:  # noqa: BLE001 — malformed LUT: carry on with stored values
            values = arr
    if apply_voi_lut is not None:
        # Window centre/width or VOI LUT: the display range the modality chose.
        try:
            values = apply_voi_lut(values, ds, index=0)
        except Exception:  # noqa: BLE001 — malformed window: keep the full range
            pass
    gray = _minmax_to_uint8(values)
    if photometric == "MONOCHROME1":
        # MONOCHROME1 means "low values are white": invert so bone is bright, like MONOCHROME2.
        gray = 255 - gray
    return Image.fromarray(np.ascontiguousarray(gray))
