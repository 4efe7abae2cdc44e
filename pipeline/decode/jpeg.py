"""JPEG headers for the GPU decode engines: which files a GPU engine may decode, and EXIF orientation.

:func:`route` decides from the header alone (a marker scan, no pixels decoded, no CUDA needed, a
few microseconds where PIL's ``Image.open`` costs ~100) whether a file may go to a GPU engine
(:mod:`pipeline.decode.engines`) or must go to the CPU path; :func:`orient` makes a decoded
tensor upright the way ``ImageOps.exif_transpose`` does.  The rules are in the
:mod:`pipeline.decode.gpu` docstring (docs/design.md §4).
"""

from __future__ import annotations

import re
import struct
from dataclasses import dataclass
from typing import Optional

import torch

GPU_MAX_PIXELS = 40_000_000     # larger JPEGs decode on the CPU, at a reduced DCT scale
_EOI = b"\xff\xd9"
_ORIENTATION_TAG = 0x0112


# -- routing (header only; no CUDA needed) ----------------------------------------------------------

_SOS, _APP1, _APP14 = 0xDA, 0xE1, 0xEE
_SOF_SEQUENTIAL = (0xC0, 0xC1)  # baseline and extended sequential, Huffman-coded
_SOF_PROGRESSIVE = 0xC2
_NOT_SOF = (0xC4, 0xC8, 0xCC)    # DHT, JPG, DAC share the 0xC0..0xCF range
_WANTED = frozenset(m for m in range(0xC0, 0xD0) if m not in _NOT_SOF) | {_APP1, _APP14}
_EXIF, _XMP = b"Exif\x00\x00", b"http://ns.adobe.com/xap/1.0/\x00"
_XMP_ORIENTATION = re.compile(rb'tiff:Orientation(="|>)([0-9])')  # what PIL's getexif falls back to


@dataclass(frozen=True)
class JpegHeader:
    """What the GPU path needs from a JPEG header: stored size and EXIF orientation."""

    width: int        # as stored, before orientation
    height: int
    orientation: int  # EXIF 1..8, as PIL reads it (EXIF IFD0, else XMP tiff:Orientation)
    progressive: bool = False

    @property
    def upright_size(self) -> tuple[int, int]:
        return (self.height, self.width) if self.orientation in (5, 6, 7, 8) else (self.width, self.height)


def parse_jpeg_header(data: bytes) -> Optional[JpegHeader]:
    """Scan the JPEG markers up to the first scan; ``None`` unless it is a plain 8-bit Huffman
    JPEG in YCbCr or greyscale whose orientation is unambiguous.

    A ``None`` is never an error: it sends the file to PIL, which decodes it or says why not.  A
    few microseconds per file (PIL's ``Image.open`` plus ``getexif`` costs ~100 us), which matters
    at GPU rates of thousands of images per second.
    """
    n = len(data)
    if n < 4 or data[0] != 0xFF or data[1] != 0xD8:
        return None
    i, sof, exif, exif_segments, xmp, adobe_transform = 2, None, None, 0, None, None
    while True:
        if i >= n or data[i] != 0xFF:
            return None
        while i < n and data[i] == 0xFF:  # fill bytes
            i += 1
        if i + 3 > n:
            return None
        marker = data[i]
        if marker == _SOS:
            break
        if marker in (0x00, 0x01, 0xD8, 0xD9) or 0xD0 <= marker <= 0xD7:
            return None  # no standalone markers belong before the first scan
        length = (data[i + 1] << 8) | data[i + 2]
        if length < 2 or i + 1 + length > n:
            return None
        start, i = i + 3, i + 1 + length
        if marker not in _WANTED:
            continue  # skip without copying (ICC profiles, thumbnails... can be 64 KB)
        seg = data[start:i]
        if 0xC0 <= marker <= 0xCF and marker not in _NOT_SOF:
            if sof is not None or len(seg) < 6:
                return None
            sof = (marker, seg[0], (seg[1] << 8) | seg[2], (seg[3] << 8) | seg[4], seg[5])
        elif marker == _APP1 and seg.startswith(_EXIF):
            exif, exif_segments = seg, exif_segments + 1
        elif marker == _APP1 and seg.startswith(_XMP):
            xmp = seg[len(_XMP):]  # PIL keeps the last one
        elif marker == _APP14 and seg.startswith(b"Adobe") and len(seg) >= 12:
            adobe_transform = seg[11]
    if sof is None:
        return None
    kind, precision, height, width, layers = sof
    if kind not in _SOF_SEQUENTIAL and kind != _SOF_PROGRESSIVE:
        return None  # lossless, hierarchical or arithmetic-coded
    if precision != 8 or width == 0 or height == 0 or layers not in (1, 3):
        return None
    if layers == 3 and adobe_transform == 0:
        return None  # Adobe APP14 says the components are RGB, not YCbCr
    if exif_segments > 1:
        return None  # PIL concatenates them; leave that to PIL
    orientation = _exif_orientation(exif) if exif is not None else 0
    if orientation is None:
        return None
    if orientation == 0:  # no EXIF orientation: PIL then looks in the XMP packet
        found = _XMP_ORIENTATION.search(xmp) if xmp else None
        orientation = int(found[2]) if found else 1
    return JpegHeader(width, height, orientation if 1 <= orientation <= 8 else 1, kind == _SOF_PROGRESSIVE)


def _exif_orientation(seg: bytes) -> Optional[int]:
    """Orientation tag of IFD0 in an APP1 Exif segment: the value, 0 if absent, None if unsure."""
    tiff = seg[len(_EXIF):]
    if len(tiff) < 8 or tiff[:2] not in (b"II", b"MM"):
        return None
    end = "<" if tiff[:2] == b"II" else ">"
    magic, ifd = struct.unpack_from(end + "HI", tiff, 2)
    if magic != 42 or ifd + 2 > len(tiff):
        return None
    (count,) = struct.unpack_from(end + "H", tiff, ifd)
    if ifd + 2 + 12 * count > len(tiff):
        return None
    for k in range(count):
        tag, typ, num = struct.unpack_from(end + "HHI", tiff, ifd + 2 + 12 * k)
        if tag == _ORIENTATION_TAG:
            if typ != 3 or num != 1:
                return None
            return struct.unpack_from(end + "H", tiff, ifd + 2 + 12 * k + 8)[0]
    return 0


def route(data: bytes, *, max_pixels: int, max_bytes: int, gpu_max_pixels: int = GPU_MAX_PIXELS,
          progressive_on_gpu: bool = False) -> Optional[JpegHeader]:
    """A :class:`JpegHeader` if a GPU decode engine may decode ``data``, ``None`` for the CPU path.

    The CPU path also gets every file it must refuse (too many bytes or pixels, not an image,
    truncated), so error rows are exactly the CPU reader's.
    """
    if not data or len(data) > max_bytes:
        return None
    header = parse_jpeg_header(data)
    if header is None or (header.progressive and not progressive_on_gpu):
        return None
    if header.width * header.height > min(max_pixels, gpu_max_pixels) or not _has_eoi(data):
        return None
    return header


def _has_eoi(data: bytes) -> bool:
    """Ends with the JPEG end-of-image marker (trailing NULs or whitespace allowed)."""
    return data[-64:].rstrip(b"\x00\r\n\t ").endswith(_EOI)


def orient(img: torch.Tensor, orientation: int) -> torch.Tensor:
    """Make a ``(C, H, W)`` tensor upright for EXIF ``orientation``, as ``ImageOps.exif_transpose``."""
    if orientation == 2:
        return img.flip(-1)
    if orientation == 3:
        return img.flip(-2, -1)
    if orientation == 4:
        return img.flip(-2)
    if orientation == 5:
        return img.transpose(-2, -1)
    if orientation == 6:
        return torch.rot90(img, -1, dims=(-2, -1))
    if orientation == 7:
        return img.transpose(-2, -1).flip(-2, -1)
    if orientation == 8:
        return torch.rot90(img, 1, dims=(-2, -1))
    return img
