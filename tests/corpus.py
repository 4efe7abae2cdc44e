"""Test images made on the spot: real photos re-encoded in every format and mode we accept,
broken files that must become decode errors, and sidecar files a folder walk must skip.

No network: the photos are the ones shipped inside scikit-image (``skimage.data``).  Writing
a whole corpus takes well under a second (photos are downscaled to <= 400 px first).

Conventions the rest of the test suite relies on:

* ids are posix paths relative to ``root`` (exactly what the lister yields for a folder);
* ``write_good_corpus`` returns the *upright* ``(width, height)``: for files with an EXIF
  orientation the stored pixels are rotated so that decoding with the orientation applied gives
  back the upright photo;
* ``write_bad_corpus`` ids all live under ``bad/`` and fail at stage ``decode``;
  ``BAD_ERROR_TYPES`` says which ``error_type`` each one gets;
* ``write_sidecars`` files must be skipped by a folder walk: files with a non-image
  extension, and *hidden* entries -- any path component starting with ``.`` (``.DS_Store``,
  macOS ``._name.jpg`` resource forks, ``.cache/thumb.jpg``), even with an image extension.
"""

from __future__ import annotations

import functools
import io
import random
import struct
import tarfile
import zlib
from collections.abc import Callable
from importlib import resources
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

MAX_SIDE = 400  # corpus photos are downscaled so their longer side is at most this
ORIENTATION_TAG = 0x0112

# Transpose that *stores* an upright image so that EXIF orientation ``o`` turns it upright
# again (the inverse of what a viewer applies; 2, 3, 4, 5, 7 are their own inverse).
STORE_FOR_ORIENTATION: dict[int, Image.Transpose] = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_90,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_270,
}


# -- photos -----------------------------------------------------------------------------------


# (name, file shipped in skimage's data folder, crop box or None): all real RGB photos.
_PHOTO_FILES: tuple[tuple[str, str, tuple[int, int, int, int] | None], ...] = (
    ("astronaut", "astronaut.png", None),  # 512x512
    ("chelsea", "chelsea.png", None),  # 451x300
    ("coffee", "coffee.png", None),  # 600x400
    ("rocket", "rocket.jpg", None),  # 640x427
    ("motorcycle", "motorcycle_left.png", None),  # 741x500
    ("hubble", "hubble_deep_field.jpg", None),  # 1000x872
    ("retina", "retina.jpg", None),  # 1411x1411
    ("ihc", "ihc.png", None),  # 512x512, immunohistochemistry
    ("motorcycle_portrait", "motorcycle_right.png", (210, 0, 530, 500)),  # 320x500, other view
)


@functools.lru_cache(maxsize=1)
def _photos() -> tuple[tuple[str, Image.Image], ...]:
    # The files behind skimage.data.astronaut() etc., read with PIL directly: same pixels,
    # without importing imageio (a third of a second) or ever reaching for the network.
    folder = resources.files("skimage.data")
    out = []
    for name, filename, box in _PHOTO_FILES:
        with (folder / filename).open("rb") as fh, Image.open(fh) as img:
            img = img.convert("RGB")
        out.append((name, img.crop(box) if box else img))
    return tuple(out)


def sample_photos() -> list[tuple[str, Image.Image]]:
    """Real RGB photos at their shipped size, as ``(name, image)``; fresh copies every call."""
    return [(name, img.copy()) for name, img in _photos()]


@functools.lru_cache(maxsize=1)
def _small_photos() -> tuple[tuple[str, Image.Image], ...]:
    out = []
    for name, img in _photos():
        scale = MAX_SIDE / max(img.size)
        if scale < 1:
            size = (max(1, round(img.width * scale)), max(1, round(img.height * scale)))
            img = img.resize(size, Image.Resampling.LANCZOS, reducing_gap=2.0)
        out.append((name, img))
    return tuple(out)


def small_photo(index: int) -> Image.Image:
    """Photo ``index`` (cycled) downscaled to at most ``MAX_SIDE`` px: the corpus' source."""
    photos = _small_photos()
    return photos[index % len(photos)][1].copy()


# -- encoders: upright RGB photo -> file bytes -------------------------------------------------

Encoder = Callable[[Image.Image], bytes]


def tar_bytes(members: dict[str, bytes]) -> bytes:
    """A tar (webdataset layout) of ``members``: name -> bytes, in that order."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def encode(img: Image.Image, fmt: str, **params: object) -> bytes:
    """``img.save`` into bytes (PNG at zlib level 1 unless told: the corpus must be quick)."""
    if fmt == "PNG":
        params.setdefault("compress_level", 1)
    buf = io.BytesIO()
    img.save(buf, fmt, **params)
    return buf.getvalue()


def alpha_mask(size: tuple[int, int]) -> Image.Image:
    """An ``L`` mask: opaque centre ellipse, half-transparent ring, fully transparent corners."""
    mask = Image.new("L", size, 0)
    draw = ImageDraw.Draw(mask)
    w, h = size
    draw.ellipse((w * 0.05, h * 0.05, w * 0.95, h * 0.95), fill=128)
    draw.ellipse((w * 0.15, h * 0.15, w * 0.85, h * 0.85), fill=255)
    return mask


def with_alpha(img: Image.Image) -> Image.Image:
    """``img`` as RGBA with ``alpha_mask``: corner pixels must decode to white."""
    out = img.convert("RGBA")
    out.putalpha(alpha_mask(img.size))
    return out


def _palette(img: Image.Image, colors: int = 256) -> Image.Image:
    return img.quantize(colors, method=Image.Quantize.FASTOCTREE)


def palette_transparent(img: Image.Image) -> Image.Image:
    """Palette image whose index 255 (painted over the top-left quarter) is transparent.

    Index 255's colour is magenta, so a decoder that ignores the transparency is caught.
    """
    pal = _palette(img, 255)
    colours = pal.getpalette()[: 255 * 3]
    pal.putpalette(colours + [0, 0, 0] * (255 - len(colours) // 3) + [255, 0, 255])
    pal.paste(255, (0, 0, img.width // 2, img.height // 2))
    pal.info["transparency"] = 255
    return pal


def grey16(img: Image.Image) -> Image.Image:
    """16-bit greyscale (``I;16``) using the full range: ``v * 257``, so 255 -> 65535."""
    return Image.fromarray(np.asarray(img.convert("L"), dtype=np.uint16) * 257)


def _float01(img: Image.Image) -> Image.Image:
    return Image.fromarray(np.asarray(img.convert("L"), dtype=np.float32) / 255.0)  # mode F


def animation_frames(img: Image.Image) -> list[Image.Image]:
    """Frame 0 is the photo; later frames are tinted blue / mirrored, so frame 0 is recognisable."""
    tint = Image.new("RGB", img.size, (0, 0, 255))
    return [img, Image.blend(img, tint, 0.7), img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)]


def _animated(fmt: str, **params: object) -> Encoder:
    def enc(img: Image.Image) -> bytes:
        frames = animation_frames(img)
        if fmt == "GIF":  # quantize here, fast, instead of PIL's slow adaptive palette per frame
            frames = [_palette(f) for f in frames]
        first, *rest = frames
        return encode(first, fmt, save_all=True, append_images=rest, duration=100, loop=0, **params)

    return enc


def exif_jpeg(img: Image.Image, orientation: int, **params: object) -> bytes:
    """JPEG whose stored pixels need EXIF ``orientation`` to show ``img`` upright."""
    exif = Image.Exif()
    exif[ORIENTATION_TAG] = orientation
    stored = img.transpose(STORE_FOR_ORIENTATION[orientation]) if orientation != 1 else img
    return encode(stored, "JPEG", quality=92, exif=exif, **params)


def photo_jpegs() -> list[bytes]:
    """Real photos as JPEG at realistic sizes, some with EXIF orientation, one greyscale: what a
    GPU decode engine must agree with the CPU reader on."""
    out = []
    for i, (_, img) in enumerate(sample_photos()):
        big = img.resize((img.width * 2, img.height * 2), Image.Resampling.BICUBIC) if i % 3 == 0 else img
        out.append(exif_jpeg(big, (1, 6, 3, 8)[i % 4]) if i % 2 else encode(big, "JPEG", quality=90))
    out.append(encode(sample_photos()[0][1].convert("L"), "JPEG", quality=90))
    return out


def bomb_png(width: int, height: int) -> bytes:
    """A valid all-black 1-bit PNG of ``width`` x ``height``: tens of KB on disk."""
    row = b"\x00" * (1 + (width + 7) // 8)  # filter byte + packed bits
    rows_per_block = 1000
    block = row * min(height, rows_per_block)
    comp = zlib.compressobj(9)
    parts, left = [], height
    while left > 0:
        n = min(left, rows_per_block)
        parts.append(comp.compress(block[: n * len(row)]))
        left -= n
    parts.append(comp.flush())
    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + _png_chunk(b"IHDR", ihdr)
        + _png_chunk(b"IDAT", b"".join(parts))
        + _png_chunk(b"IEND", b"")
    )


def _png_chunk(kind: bytes, payload: bytes) -> bytes:
    crc = zlib.crc32(kind + payload)
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", crc)


def jpeg_with_header_size(width: int, height: int) -> bytes:
    """A tiny JPEG whose SOF header claims ``width`` x ``height`` (its data does not match)."""
    data = bytearray(encode(Image.new("RGB", (8, 8), (9, 9, 9)), "JPEG"))
    sof = data.index(b"\xff\xc0")  # SOF0: marker, length(2), precision(1), height(2), width(2)
    struct.pack_into(">HH", data, sof + 5, height, width)
    return bytes(data)


def webp_with_header_size(width: int, height: int) -> bytes:
    """A small extended (VP8X) WebP whose canvas header claims ``width`` x ``height``."""
    small = Image.new("RGBA", (8, 8), (9, 9, 9, 100))
    data = bytearray(encode(small, "WEBP", lossless=True, exif=Image.Exif()))  # EXIF forces VP8X
    if data[12:16] != b"VP8X":
        raise RuntimeError("PIL did not write an extended WebP")
    data[24:27] = (width - 1).to_bytes(3, "little")
    data[27:30] = (height - 1).to_bytes(3, "little")
    return bytes(data)


def _jpeg(**params: object) -> Encoder:
    return lambda im: encode(im, "JPEG", quality=90, **params)


# (relative id, encoder).  Photos are assigned round-robin, so formats see varied content.
_GOOD: list[tuple[str, Encoder]] = [
    ("jpeg/baseline.jpg", _jpeg()),
    ("jpeg/progressive.jpeg", _jpeg(progressive=True)),
    ("jpeg/cmyk.jpg", lambda im: encode(im.convert("CMYK"), "JPEG", quality=90)),
    ("jpeg/grey.jpg", lambda im: encode(im.convert("L"), "JPEG", quality=90)),
    ("jpeg/exif_orientation_3.jpg", lambda im: exif_jpeg(im, 3)),
    ("jpeg/exif_orientation_6.jpg", lambda im: exif_jpeg(im, 6)),
    ("jpeg/exif_orientation_8.jpg", lambda im: exif_jpeg(im, 8)),
    ("jpeg/multi_picture.jpg", lambda im: encode(im, "MPO", save_all=True, append_images=[im])),
    ("png/rgb.png", lambda im: encode(im, "PNG")),
    ("png/rgba.png", lambda im: encode(with_alpha(im), "PNG")),
    ("png/la.png", lambda im: encode(with_alpha(im).convert("LA"), "PNG")),
    ("png/l.png", lambda im: encode(im.convert("L"), "PNG")),
    ("png/palette.png", lambda im: encode(_palette(im), "PNG")),
    ("png/palette_transparency.png", lambda im: encode(palette_transparent(im), "PNG")),
    ("png/grey16.png", lambda im: encode(grey16(im), "PNG")),
    ("png/bilevel.png", lambda im: encode(im.convert("1"), "PNG")),
    ("png/animated.png", _animated("PNG")),
    ("webp/lossy.webp", lambda im: encode(im, "WEBP", quality=80)),
    # lossless WebP with an alpha channel
    ("webp/lossless.webp", lambda im: encode(with_alpha(im), "WEBP", lossless=True, method=0)),
    ("webp/animated.webp", _animated("WEBP", quality=80, method=0)),
    ("bmp/rgb.bmp", lambda im: encode(im, "BMP")),
    ("bmp/palette.bmp", lambda im: encode(_palette(im), "BMP")),
    ("gif/static.gif", lambda im: encode(_palette(im), "GIF")),
    ("gif/transparent.gif", lambda im: encode(palette_transparent(im), "GIF")),
    ("gif/animated.gif", _animated("GIF")),
    ("tiff/rgb.tif", lambda im: encode(im, "TIFF", compression="tiff_lzw")),
    ("tiff/grey16.tiff", lambda im: encode(grey16(im), "TIFF")),
    ("tiff/cmyk.tif", lambda im: encode(im.convert("CMYK"), "TIFF")),
    ("tiff/float.tif", lambda im: encode(_float01(im), "TIFF")),
    ("tiff/lab.tif", lambda im: encode(im.convert("LAB"), "TIFF")),
    ("tiff/ycbcr.tif", lambda im: encode(im.convert("YCbCr"), "TIFF")),
    ("upper/PHOTO.JPG", _jpeg()),
    ("upper/Picture.PnG", lambda im: encode(im, "PNG")),
    ("café photo.jpg", _jpeg()),
    ("日本/写真 1.png", lambda im: encode(im, "PNG")),
    ("a/b/c/deep nested.webp", lambda im: encode(im, "WEBP", quality=80)),
    ("misnamed/png_named.jpg", lambda im: encode(im, "PNG")),  # content decides, not the name
]


def write_good_corpus(root: Path, n: int | None = None) -> dict[str, tuple[int, int]]:
    """Write decodable images under ``root``; return id -> upright ``(width, height)``.

    ``n=None`` writes every format/mode variant once (37 files).  A smaller ``n`` writes the
    first ``n`` variants; a larger one adds ``n - 37`` plain JPEGs ``more/NNNNN.jpg`` (photos
    cycled, each cropped differently so no two files are identical).  The i-th id written is
    made from ``small_photo(i)`` (cropped for the extras).
    """
    root = Path(root)
    count = len(_GOOD) if n is None else n
    out: dict[str, tuple[int, int]] = {}
    for i in range(count):
        photo = small_photo(i)
        if i < len(_GOOD):
            rel, enc = _GOOD[i]
        else:
            k = i - len(_GOOD)
            shift = 1 + k // len(_PHOTO_FILES)
            photo = photo.crop((shift, 0, photo.width, photo.height - shift))
            rel, enc = f"more/{k:05d}.jpg", _jpeg()
        _write(root, rel, enc(photo))
        out[rel] = photo.size
    return out


def _write(root: Path, rel: str, data: bytes) -> None:
    path = root / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


# -- broken files ------------------------------------------------------------------------------

_EPS = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\n0 0 moveto 10 10 lineto stroke\n%%EOF\n"
_PDF = b"%PDF-1.4\n1 0 obj << /Type /Catalog >> endobj\ntrailer << /Root 1 0 R >>\n%%EOF\n"
_HTML = b"<!DOCTYPE html>\n<html><head><title>404 Not Found</title></head></html>\n"


def _photo_jpeg() -> bytes:
    return encode(small_photo(0), "JPEG", quality=90)


def _photo_png() -> bytes:
    return encode(small_photo(0), "PNG")


def _flip(data: bytes, start: int, stop: int) -> bytes:
    out = bytearray(data)
    out[start:stop] = bytes(b ^ 0xFF for b in out[start:stop])
    return bytes(out)


def _corrupt_idat(png: bytes) -> bytes:
    """Garbage inside the zlib stream of the first IDAT chunk (its CRC is not rechecked)."""
    at = png.index(b"IDAT") + 4 + 200
    return _flip(png, at, at + 32)


# (relative id, expected error_type under the default limits, bytes maker)
_BAD: list[tuple[str, str, Callable[[], bytes]]] = [
    ("bad/empty.jpg", "EmptyFile", lambda: b""),
    ("bad/truncated.jpg", "TruncatedImage", lambda: (d := _photo_jpeg())[: len(d) * 6 // 10]),
    ("bad/truncated.png", "TruncatedImage", lambda: (d := _photo_png())[: len(d) * 6 // 10]),
    ("bad/html_page.jpg", "UnidentifiedImageError", lambda: _HTML),
    ("bad/random_bytes.png", "UnidentifiedImageError", lambda: random.Random(0).randbytes(4096)),
    # IHDR is the first chunk; its CRC is bytes 29..32.
    ("bad/header_crc.png", "UnidentifiedImageError", lambda: _flip(_photo_png(), 29, 33)),
    ("bad/corrupt_idat.png", "OSError", lambda: _corrupt_idat(_photo_png())),
    ("bad/postscript.jpg", "UnidentifiedImageError", lambda: _EPS),
    ("bad/document.tif", "UnidentifiedImageError", lambda: _PDF),
    ("bad/portable_pixmap.tif", "UnidentifiedImageError", lambda: encode(small_photo(0), "PPM")),
    ("bad/bomb.png", "DecompressionBomb", lambda: bomb_png(20_000, 20_000)),
    ("bad/bomb_header.jpg", "DecompressionBomb", lambda: jpeg_with_header_size(60_000, 60_000)),
    ("bad/bomb_header.webp", "DecompressionBomb", lambda: webp_with_header_size(16_000, 16_000)),
]

BAD_ERROR_TYPES: dict[str, str] = {rel: kind for rel, kind, _ in _BAD}
"""Expected ``error_type`` of each ``write_bad_corpus`` id under the default decode limits."""


@functools.lru_cache(maxsize=1)
def _bad_bytes() -> tuple[tuple[str, bytes], ...]:
    return tuple((rel, make()) for rel, _, make in _BAD)


def write_bad_corpus(root: Path) -> dict[str, str]:
    """Write files that must fail to decode (default limits); return id -> stage ``"decode"``."""
    root = Path(root)
    for rel, data in _bad_bytes():
        _write(root, rel, data)
    return {rel: "decode" for rel, _ in _bad_bytes()}


# -- files a folder walk skips ----------------------------------------------------------------


def write_sidecars(root: Path) -> list[str]:
    """Write files a folder walk must skip (non-image extension or hidden); return their ids.

    Hidden means any path component starting with ``.``; hidden files with an image
    extension hold a valid JPEG, so a walk that wrongly includes them is caught by counts.
    """
    root = Path(root)
    jpeg = encode(small_photo(1), "JPEG", quality=80)
    files = {
        "meta.json": b'{"source": "test corpus"}\n',
        "notes.txt": b"not an image\n",
        "README": b"no extension\n",
        "Thumbs.db": b"\xd0\xcf\x11\xe0" + b"\x00" * 60,
        "jpeg/baseline.jpg.json": b'{"title": "takeout-style sidecar"}\n',
        "video/clip.mp4": b"\x00\x00\x00\x18ftypmp42",
        ".DS_Store": b"\x00\x00\x00\x01Bud1" + b"\x00" * 32,
        "._café photo.jpg": b"\x00\x05\x16\x07\x00\x02\x00\x00Mac OS X        ",
        "png/.hidden.jpg": jpeg,
        ".cache/thumb.jpg": jpeg,
    }
    for rel, data in files.items():
        _write(root, rel, data)
    return list(files)


# What a listing of write_sidecars' files counts as skipped, by reason.
SIDECAR_SKIPS = {
    "extension:.json": 2, "extension:.txt": 1, "extension:(none)": 1, "extension:.db": 1,
    "extension:.mp4": 1, "hidden": 3, "hidden-dir": 1,
}
