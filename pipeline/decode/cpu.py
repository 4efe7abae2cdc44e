"""Bytes -> one RGB ``PIL.Image``, or an ``ItemError(stage="decode")`` saying why not.

Bad input is data, not a crash: every failure (empty file, HTML saved as ``.jpg``, a truncated
upload, a decompression bomb, a mode PIL cannot convert) becomes one ``ItemError`` with a short
``error_type`` and a one-line ``message``; nothing else escapes ``decode_image``.

What a caller gets back:

* mode ``"RGB"``, pixels loaded, no file handle attached;
* EXIF orientation applied (``image.size`` is the upright size a caller records);
* alpha composited on white; 16-bit data scaled to 8 bits (``v / 257``), never clipped;
* the first frame of an animation;
* with ``min_side``, large JPEGs decoded at a reduced DCT scale (JPEG "draft" mode) whose shorter
  side stays >= ``2 * min_side``, so a later antialiased resize to ``min_side`` hardly changes.

Colour profiles (ICC) are ignored on purpose, as torchvision's ImageNet recipe (``Image.open``
then ``convert("RGB")``) ignores them: the weights were trained on pixels decoded that way.

Decompression bombs are refused from the header, before any pixel is allocated: ``Image.open``
is lazy for every accepted format except WebP, whose canvas size is therefore read from the RIFF
header first.  PIL's own process-wide guard (``Image.MAX_IMAGE_PIXELS``) is only ever *raised*
to the largest ``max_pixels`` asked for, never lowered or disabled, so threads decoding with
different limits cannot race each other into a weaker check.  (PIL may still emit its
``DecompressionBombWarning`` while opening an image that ``max_pixels`` then refuses.)
"""

from __future__ import annotations

import io
import logging
import re
import threading

import numpy as np
from PIL import Image, ImageFile, UnidentifiedImageError

from ..errors import ItemError

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS: tuple[str, ...] = ("jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff")

# PIL formats we let Image.open try, whatever the file is called.  Everything else is refused
# as unidentified: a file with an image extension must not reach e.g. the EPS plugin, which
# runs Ghostscript.  ("JPEG" also covers the multi-picture JPEGs many phones write, which PIL
# then reports as format "MPO".)
DECODE_FORMATS: tuple[str, ...] = ("JPEG", "PNG", "WEBP", "BMP", "GIF", "TIFF")

_JPEG_FORMATS = ("JPEG", "MPO")
_ORIENTATION_TAG = 0x0112
# EXIF orientation -> the transpose that makes the image upright (as PIL.ImageOps.exif_transpose).
_TRANSPOSE = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}
_SWAPS_SIDES = (5, 6, 7, 8)
_ALPHA_MODES = ("RGBA", "LA", "PA", "RGBa", "La")
_WHITE = (255, 255, 255)
_MAX_MESSAGE = 200

_pil_limit_lock = threading.Lock()


def decode_image(
    data: bytes,
    *,
    max_pixels: int = 100_000_000,
    max_bytes: int = 100_000_000,
    min_side: int | None = None,
) -> Image.Image:
    """Decode one encoded image into a loaded RGB image (see :func:`decode_with_size`)."""
    return decode_with_size(data, max_pixels=max_pixels, max_bytes=max_bytes, min_side=min_side)[0]


def decode_with_size(
    data: bytes,
    *,
    max_pixels: int = 100_000_000,
    max_bytes: int = 100_000_000,
    min_side: int | None = None,
) -> tuple[Image.Image, tuple[int, int]]:
    """Decode one encoded image into a loaded RGB image and its full upright ``(width, height)``.

    The size is the image's own (after EXIF rotation), even when draft mode decoded it smaller.

    ``max_bytes`` bounds ``len(data)`` (checked before parsing); ``max_pixels`` bounds
    width x height as stored in the header (checked before decoding).  ``min_side`` is the
    shorter side the caller will resize to; it only enables cheaper JPEG draft decoding.

    Raises ``ItemError(stage="decode", error_type, message)`` for every problem with the data;
    ``error_type`` is one of ``EmptyFile``, ``TooLarge``, ``DecompressionBomb``, ``InvalidSize``,
    ``UnidentifiedImageError`` (not one of ``DECODE_FORMATS``, whatever the file is called),
    ``TruncatedImage``, or else the decoder exception's class name (``OSError``, ``ValueError``
    ...).  The message is one line of at most 200 characters.
    """
    _check_bytes(data, max_bytes)
    try:
        img = _open(data, max_pixels)
        try:
            width, height = img.size
            if min_side and img.format in _JPEG_FORMATS:
                _apply_draft(img, min_side)
            img.load()  # frame 0 of an animation; raises on truncated data
            orientation = _orientation(img)
            out = _to_rgb(img)
            if orientation in _TRANSPOSE:
                out = out.transpose(_TRANSPOSE[orientation])
            if out is img:
                out = img.copy()  # detach from the file object (and the bytes it holds)
            return out, ((height, width) if orientation in _SWAPS_SIDES else (width, height))
        finally:
            img.close()
    except ItemError:
        raise
    except Exception as exc:  # noqa: BLE001 - any decoder failure is this image's error row
        raise _item_error(exc, data, max_pixels) from exc


def image_size(data: bytes, *, max_pixels: int = 100_000_000) -> tuple[int, int]:
    """Upright ``(width, height)`` from the header alone (EXIF orientation applied).

    No pixels are decoded (for a PNG whose EXIF chunk follows the pixel data the orientation
    is taken as upright rather than decoding the image to find it).  Raises ``ItemError``
    (stage ``decode``) for data ``decode_image`` would refuse at open time.
    """
    _check_bytes(data, max_bytes=None)
    try:
        with _open(data, max_pixels) as img:
            width, height = img.size
            if _orientation(img, header_only=True) in _SWAPS_SIDES:
                return height, width
            return width, height
    except ItemError:
        raise
    except Exception as exc:  # noqa: BLE001
        raise _item_error(exc, data, max_pixels) from exc


# -- opening and limits ---------------------------------------------------------------------


def _check_bytes(data: bytes, max_bytes: int | None) -> None:
    if len(data) == 0:
        raise ItemError("decode", "EmptyFile", "file is empty (0 bytes)")
    if max_bytes is not None and len(data) > max_bytes:
        raise ItemError("decode", "TooLarge", f"{len(data)} bytes exceeds max_bytes={max_bytes}")


def _open(data: bytes, max_pixels: int) -> ImageFile.ImageFile:
    """Lazily open ``data`` (header parsed, no pixels decoded) and enforce ``max_pixels``."""
    _raise_pil_limit(max_pixels)
    webp_size = _webp_canvas_size(data)
    if webp_size is not None:
        # PIL's WebP plugin allocates the canvas inside Image.open: check before it.
        _check_pixels(webp_size, max_pixels)
    img = Image.open(io.BytesIO(data), formats=DECODE_FORMATS)
    try:
        _check_pixels(img.size, max_pixels)
    except ItemError:
        img.close()
        raise
    return img


def _check_pixels(size: tuple[int, int], max_pixels: int) -> None:
    width, height = size
    if width <= 0 or height <= 0:
        raise ItemError("decode", "InvalidSize", f"image header says {width}x{height}")
    if width * height > max_pixels:
        raise ItemError(
            "decode",
            "DecompressionBomb",
            f"{width}x{height} = {width * height} pixels exceeds max_pixels={max_pixels}",
        )


def _raise_pil_limit(max_pixels: int) -> None:
    """Make sure PIL's own guard never refuses (or warns about) what ``max_pixels`` allows.

    Only ever raises the process-wide value, under a lock: a concurrent decode with a lower
    ``max_pixels`` still enforces its own limit in ``_check_pixels``.
    """
    limit = Image.MAX_IMAGE_PIXELS
    if limit is None or limit >= max_pixels:
        return
    with _pil_limit_lock:
        if Image.MAX_IMAGE_PIXELS is not None and Image.MAX_IMAGE_PIXELS < max_pixels:
            Image.MAX_IMAGE_PIXELS = max_pixels


def _webp_canvas_size(data: bytes) -> tuple[int, int] | None:
    """``(width, height)`` of a WebP file from its first chunk, or None if not a WebP."""
    if len(data) < 30 or data[:4] != b"RIFF" or data[8:12] != b"WEBP":
        return None
    chunk = data[12:16]
    if chunk == b"VP8X":  # extended format: 24-bit canvas width-1 and height-1
        return int.from_bytes(data[24:27], "little") + 1, int.from_bytes(data[27:30], "little") + 1
    if chunk == b"VP8 ":  # lossy: 14-bit sizes after the key-frame start code
        return (
            int.from_bytes(data[26:28], "little") & 0x3FFF,
            int.from_bytes(data[28:30], "little") & 0x3FFF,
        )
    if chunk == b"VP8L" and data[20] == 0x2F:  # lossless: two 14-bit fields, minus one
        bits = int.from_bytes(data[21:25], "little")
        return (bits & 0x3FFF) + 1, ((bits >> 14) & 0x3FFF) + 1
    return None


# -- pixels -----------------------------------------------------------------------------------


def _apply_draft(img: ImageFile.ImageFile, min_side: int) -> None:
    """Ask libjpeg for a 1/2, 1/4 or 1/8 scale decode whose shorter side stays >= 4*min_side.

    PIL picks the largest scale s in {8,4,2,1} with s <= min(W // w, H // h); requesting a
    square of side 4*min_side makes that ``shorter // (4*min_side)``, so the shorter side after
    scaling is >= 4*min_side.  Keeping 4x oversampling before the antialiased resize keeps the
    result within the parity tolerance (fc7 cosine >= 0.999) while a 12 MP photo decodes ~3x
    faster.  The shorter side is the same before and after EXIF rotation.
    """
    target = 4 * min_side
    if min(img.size) // target >= 2:
        img.draft("RGB", (target, target))


def _orientation(img: Image.Image, *, header_only: bool = False) -> int:
    """The EXIF orientation (1..8); 1 when absent or unreadable (the pixels are still good)."""
    if header_only and img.format == "PNG" and "exif" not in img.info:
        return 1  # PNG.getexif() would decode the whole image to look after IDAT
    try:
        value = img.getexif().get(_ORIENTATION_TAG, 1)
    except Exception as exc:  # noqa: BLE001 - malformed EXIF must not cost a good image
        log.debug("unreadable EXIF ignored: %s", exc)
        return 1
    return value if isinstance(value, int) and 1 <= value <= 8 else 1


def _to_rgb(img: Image.Image) -> Image.Image:
    """Any PIL mode -> RGB: alpha over white, high bit depths scaled, the rest converted."""
    mode = img.mode
    if mode == "I" or mode == "F" or mode.startswith("I;"):
        return _high_depth_to_l(img).convert("RGB")
    if mode in _ALPHA_MODES or "transparency" in img.info:
        rgba = img if mode == "RGBA" else img.convert("RGBA")
        out = Image.new("RGB", img.size, _WHITE)
        out.paste(rgba, (0, 0), rgba)  # the alpha band is the mask: out = a*fg + (1-a)*white
        return out
    if mode == "RGB":
        return img
    return img.convert("RGB")


def _high_depth_to_l(img: Image.Image) -> Image.Image:
    """16/32-bit integer or float greyscale -> 8-bit ``L``, scaled rather than clipped.

    ``I;16*``: ``v / 257`` (65535 -> 255).  ``I`` (32-bit): values in 0..255 are kept, values in
    0..65535 are treated as 16-bit, anything else is stretched min..max to 0..255.  ``F``: NaN is
    0; data within 0..1 is scaled by 255, otherwise clipped to 0..255.
    """
    arr = np.asarray(img)
    if img.mode == "F":
        arr = np.nan_to_num(arr.astype(np.float64), nan=0.0, posinf=255.0, neginf=0.0)
        if arr.size and arr.max() <= 1.0:
            arr = arr * 255.0
    elif img.mode == "I":
        arr = arr.astype(np.float64)
        lo, hi = (arr.min(), arr.max()) if arr.size else (0.0, 0.0)
        if lo >= 0 and hi > 255 and hi <= 65535:
            arr = arr / 257.0
        elif lo < 0 or hi > 65535:
            arr = (arr - lo) * (255.0 / (hi - lo)) if hi > lo else np.zeros_like(arr)
    else:  # I;16, I;16B, I;16L, I;16N: numpy already knows the byte order
        arr = arr.astype(np.float64) / 257.0
    return Image.fromarray(np.clip(np.rint(arr), 0, 255).astype(np.uint8))


# -- errors -----------------------------------------------------------------------------------


def _item_error(exc: BaseException, data: bytes, max_pixels: int) -> ItemError:
    """Name and describe a decoder exception as a short, one-line, deterministic error row."""
    text = " ".join(str(exc).split())
    if isinstance(exc, Image.DecompressionBombError):
        # PIL's text quotes its own (doubled, process-wide) limit: state ours instead.
        found = re.search(r"\((\d+) pixels\)", text)
        pixels = found.group(1) if found else "too many"
        message = f"{pixels} pixels exceeds max_pixels={max_pixels}"
        return ItemError("decode", "DecompressionBomb", message)
    if isinstance(exc, UnidentifiedImageError):
        # PIL's text names a BytesIO object address: useless, and different on every run.
        return ItemError(
            "decode",
            "UnidentifiedImageError",
            f"not a readable {'/'.join(DECODE_FORMATS)} image; starts with {bytes(data[:12])!r}",
        )
    if isinstance(exc, (OSError, EOFError)) and "truncated" in text.lower():
        return ItemError("decode", "TruncatedImage", _clip(text))
    return ItemError("decode", type(exc).__name__, _clip(text or type(exc).__name__))


def _clip(text: str) -> str:
    return text if len(text) <= _MAX_MESSAGE else text[: _MAX_MESSAGE - 3] + "..."
