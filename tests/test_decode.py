"""pipeline.decode.cpu: every accepted format and mode becomes the right RGB image; every bad file
becomes one ``ItemError(stage="decode")``; bombs are refused before any pixel is decoded."""

from __future__ import annotations

import io
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path, PurePosixPath

import numpy as np
import pytest
from PIL import Image, ImageFile

from pipeline.decode.cpu import IMAGE_EXTENSIONS, decode_image, image_size
from pipeline.errors import ItemError
from tests import corpus

WHITE = (255, 255, 255)


def _png(img: Image.Image, **params: object) -> bytes:
    return corpus.encode(img, "PNG", **params)


def _grey_thumb(img: Image.Image) -> np.ndarray:
    return np.asarray(img.convert("L").resize((32, 32), Image.Resampling.BOX), dtype=np.float64)


def _mean_abs(a: Image.Image, b: Image.Image) -> float:
    return float(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64)).mean())


@pytest.fixture(scope="module")
def good(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, tuple[int, int]]]:
    root = tmp_path_factory.mktemp("good")
    return root, corpus.write_good_corpus(root)


@pytest.fixture(scope="module")
def bad(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, str]]:
    root = tmp_path_factory.mktemp("bad")
    return root, corpus.write_bad_corpus(root)


@pytest.fixture
def no_pixel_decoding(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make any attempt to decode pixels fail the test: proves a check is header-only."""

    def refuse(self: ImageFile.ImageFile) -> None:
        raise AssertionError(f"pixels decoded for a {self.size} image")

    monkeypatch.setattr(ImageFile.ImageFile, "load", refuse)


# -- the good corpus ---------------------------------------------------------------------------


def _expected_rendering(rel: str, photo: Image.Image) -> Image.Image:
    """What the decoded file should look like: the photo, with alpha regions over white."""
    if rel in ("png/rgba.png", "png/la.png", "webp/lossless.webp"):
        out = Image.new("RGB", photo.size, WHITE)
        out.paste(photo, (0, 0), corpus.alpha_mask(photo.size))
        return out
    if rel in ("png/palette_transparency.png", "gif/transparent.gif"):
        out = photo.copy()
        out.paste(WHITE, (0, 0, photo.width // 2, photo.height // 2))
        return out
    return photo


def test_every_good_file_decodes_to_rgb_at_its_upright_size(good: tuple[Path, dict]) -> None:
    root, expected = good
    assert len(expected) == 37
    for rel, size in expected.items():
        data = (root / rel).read_bytes()
        img = decode_image(data)
        assert img.mode == "RGB", rel
        assert img.size == size, rel
        assert image_size(data) == size, rel
        assert not isinstance(img, ImageFile.ImageFile), f"{rel}: still attached to its file"
        img.getpixel((0, 0))  # loaded: no file access needed any more


def test_good_files_show_their_source_photo(good: tuple[Path, dict]) -> None:
    """Pixel content, not just size: rotation, alpha-on-white, colour conversions, 16-bit."""
    root, expected = good
    for i, rel in enumerate(expected):
        want = _expected_rendering(rel, corpus.small_photo(i))
        got = decode_image((root / rel).read_bytes())
        # 1-bit files are dithered: only the coarse picture survives.
        tolerance = 30.0 if rel == "png/bilevel.png" else 6.0
        diff = float(np.abs(_grey_thumb(got) - _grey_thumb(want)).mean())
        assert diff < tolerance, f"{rel}: mean grey difference {diff:.1f}"


def test_exif_files_are_stored_sideways(good: tuple[Path, dict]) -> None:
    root, expected = good
    for rel in ("jpeg/exif_orientation_6.jpg", "jpeg/exif_orientation_8.jpg"):
        with Image.open(root / rel) as raw:
            assert raw.size == expected[rel][::-1]


def test_corpus_ids_use_image_extensions_and_sidecars_do_not(tmp_path: Path, good: tuple) -> None:
    _, expected = good
    assert all(PurePosixPath(rel).suffix[1:].lower() in IMAGE_EXTENSIONS for rel in expected)
    odd_names = {"upper/PHOTO.JPG", "upper/Picture.PnG", "café photo.jpg", "日本/写真 1.png"}
    assert odd_names <= set(expected)
    side = corpus.write_sidecars(tmp_path)
    assert side and all((tmp_path / rel).is_file() for rel in side)
    for rel in side:
        parts = PurePosixPath(rel).parts
        hidden = any(part.startswith(".") for part in parts)
        assert hidden or PurePosixPath(rel).suffix[1:].lower() not in IMAGE_EXTENSIONS, rel


def test_corpus_is_quick_and_sized_by_n(tmp_path: Path) -> None:
    start = time.process_time()  # CPU time: other jobs on a shared machine do not count
    corpus.write_good_corpus(tmp_path / "all")
    corpus.write_bad_corpus(tmp_path / "all")
    corpus.write_sidecars(tmp_path / "all")
    assert time.process_time() - start < 3.0
    assert len(corpus.write_good_corpus(tmp_path / "few", n=5)) == 5
    many = corpus.write_good_corpus(tmp_path / "many", n=40)
    extras = [rel for rel in many if rel.startswith("more/")]
    assert len(many) == 40 and len(extras) == 3
    blobs = {(tmp_path / "many" / rel).read_bytes() for rel in extras}
    assert len(blobs) == 3
    for rel in extras:
        assert decode_image((tmp_path / "many" / rel).read_bytes()).size == many[rel]


def test_sample_photos_are_varied_real_rgb_and_copied() -> None:
    photos = corpus.sample_photos()
    assert len(photos) >= 8 and len({name for name, _ in photos}) == len(photos)
    assert all(img.mode == "RGB" for _, img in photos)
    aspects = [img.width / img.height for _, img in photos]
    assert min(aspects) < 0.8 and max(aspects) > 1.4 and any(a == 1 for a in aspects)
    assert all(np.asarray(img).std() > 20 for _, img in photos)  # photos, not flat fills
    first = photos[0][1]
    first.paste((0, 0, 0), (0, 0, first.width, first.height))
    assert corpus.sample_photos()[0][1].getpixel((0, 0)) != (0, 0, 0)


# -- orientation -------------------------------------------------------------------------------


@pytest.mark.parametrize("orientation", range(1, 9))
def test_every_exif_orientation_gives_the_upright_photo(orientation: int) -> None:
    photo = corpus.small_photo(1)  # 400x266: landscape, so a missed rotation changes the size
    data = corpus.exif_jpeg(photo, orientation)
    img = decode_image(data)
    assert img.size == photo.size == image_size(data)
    assert _mean_abs(img, photo) < 4.0


def test_orientation_in_png_exif_is_applied() -> None:
    photo = corpus.small_photo(1)
    exif = Image.Exif()
    exif[corpus.ORIENTATION_TAG] = 6
    data = _png(photo.transpose(corpus.STORE_FOR_ORIENTATION[6]), exif=exif)
    img = decode_image(data)
    assert img.size == photo.size == image_size(data)
    assert _mean_abs(img, photo) < 0.5


@pytest.mark.filterwarnings("ignore:Corrupt EXIF data")
def test_unreadable_exif_keeps_the_stored_orientation() -> None:
    photo = corpus.small_photo(1)
    data = corpus.encode(photo, "JPEG", quality=92, exif=b"Exif\x00\x00II*\x00\xff\xff\xff\x7fjunk")
    assert decode_image(data).size == photo.size


def test_image_size_reads_only_the_header(no_pixel_decoding: None) -> None:
    photo = corpus.small_photo(1)
    assert image_size(corpus.exif_jpeg(photo, 6)) == photo.size
    assert image_size(_png(photo)) == photo.size
    assert image_size(corpus.encode(photo, "WEBP")) == photo.size
    with pytest.raises(ItemError) as err:
        image_size(b"<html>")
    assert err.value.stage == "decode" and err.value.error_type == "UnidentifiedImageError"


# -- modes -------------------------------------------------------------------------------------


def _rgba_probe() -> Image.Image:
    """4x1 RGBA: transparent green, half-transparent black, opaque red, opaque blue."""
    img = Image.new("RGBA", (4, 1))
    img.putdata([(10, 200, 30, 0), (0, 0, 0, 128), (255, 0, 0, 255), (0, 0, 255, 255)])
    return img


@pytest.mark.parametrize("fmt", ["PNG", "WEBP", "TIFF"])
def test_alpha_is_composited_on_white(fmt: str) -> None:
    params = {"lossless": True} if fmt == "WEBP" else {}
    img = decode_image(corpus.encode(_rgba_probe(), fmt, **params))
    assert img.getpixel((0, 0)) == WHITE
    assert all(abs(c - 127) <= 1 for c in img.getpixel((1, 0)))
    assert img.getpixel((2, 0)) == (255, 0, 0)
    assert img.getpixel((3, 0)) == (0, 0, 255)


def test_la_alpha_is_composited_on_white() -> None:
    la = Image.new("LA", (2, 1))
    la.putdata([(0, 0), (40, 255)])
    assert _pixels(decode_image(_png(la))) == [WHITE, (40, 40, 40)]


@pytest.mark.parametrize("fmt", ["PNG", "GIF"])
def test_palette_transparency_is_composited_on_white(fmt: str) -> None:
    pal = Image.new("P", (2, 1))
    pal.putpalette([255, 0, 0, 0, 0, 255] + [0] * 762)
    pal.putdata([0, 1])
    img = decode_image(corpus.encode(pal, fmt, transparency=0))
    assert _pixels(img) == [WHITE, (0, 0, 255)]


@pytest.mark.parametrize("mode", ["RGB", "L"])
def test_trns_colour_key_is_composited_on_white(mode: str) -> None:
    img = Image.new(mode, (2, 1))
    img.putdata([(7, 7, 7), (9, 9, 9)] if mode == "RGB" else [7, 9])
    key = (7, 7, 7) if mode == "RGB" else 7
    out = decode_image(_png(img, transparency=key))
    assert _pixels(out) == [WHITE, (9, 9, 9)]


def _pixels(img: Image.Image) -> list[tuple[int, ...]]:
    return [tuple(int(c) for c in px) for px in np.asarray(img).reshape(-1, len(img.getbands()))]


def _grey_row(mode: str, values: list[float]) -> Image.Image:
    dtype = {"I;16": np.uint16, "I": np.int32, "F": np.float32}[mode]
    return Image.fromarray(np.array([values], dtype=dtype))


SIXTEEN = [0, 257, 32896, 65535]
SIXTEEN_AS_8 = [0, 1, 128, 255]


@pytest.mark.parametrize(
    ("fmt", "mode", "values", "expected"),
    [
        ("PNG", "I;16", SIXTEEN, SIXTEEN_AS_8),
        ("TIFF", "I;16", SIXTEEN, SIXTEEN_AS_8),
        ("TIFF", "I", SIXTEEN, SIXTEEN_AS_8),  # 32-bit holding 16-bit data: scaled
        ("TIFF", "I", [0, 1, 128, 255], [0, 1, 128, 255]),  # 32-bit holding 8-bit data: kept
        ("TIFF", "I", [-1000, 0, 1000], [0, 128, 255]),  # anything else: stretched
        ("TIFF", "F", [0.0, 0.5, 1.0], [0, 128, 255]),  # 0..1 floats
        ("TIFF", "F", [0.0, 100.4, 255.0, 300.0, -5.0, float("nan")], [0, 100, 255, 255, 0, 0]),
    ],
)
def test_high_bit_depths_are_scaled_not_clipped(
    fmt: str, mode: str, values: list[float], expected: list[int]
) -> None:
    src = _grey_row(mode, values)
    data = corpus.encode(src, fmt)
    with Image.open(io.BytesIO(data)) as raw:
        assert raw.mode == mode  # the file really holds that mode
    img = decode_image(data)
    assert [px[0] for px in _pixels(img)] == expected
    assert all(px[0] == px[1] == px[2] for px in _pixels(img))


def test_big_endian_16_bit_tiff_is_scaled() -> None:
    raw = np.array([SIXTEEN], dtype=">u2").tobytes()
    src = Image.frombytes("I;16B", (4, 1), raw)
    data = corpus.encode(src, "TIFF")
    with Image.open(io.BytesIO(data)) as check:
        assert check.mode == "I;16B"
    assert [px[0] for px in _pixels(decode_image(data))] == SIXTEEN_AS_8


@pytest.mark.parametrize("rel", ["png/grey16.png", "tiff/grey16.tiff"])
def test_16_bit_photo_comes_back_exactly(good: tuple[Path, dict], rel: str) -> None:
    root, expected = good
    source = np.asarray(corpus.small_photo(list(expected).index(rel)).convert("L"))
    arr = np.asarray(decode_image((root / rel).read_bytes()))
    assert (arr[..., 0] == source).all()  # stored as v * 257: clipping would give all 255


RED = (200, 30, 40)


@pytest.mark.parametrize(
    ("fmt", "mode"),
    [
        ("JPEG", "CMYK"),
        ("TIFF", "CMYK"),
        ("TIFF", "LAB"),
        ("TIFF", "YCbCr"),
        ("JPEG", "L"),
        ("BMP", "P"),
    ],
)
def test_colour_modes_convert_to_rgb(fmt: str, mode: str) -> None:
    src = Image.new("RGB", (16, 16), RED)
    converted = src.quantize(8) if mode == "P" else src.convert(mode)
    img = decode_image(corpus.encode(converted, fmt))
    want = src.convert("L").convert("RGB") if mode == "L" else src
    assert max(abs(a - b) for a, b in zip(img.getpixel((8, 8)), want.getpixel((8, 8)))) <= 6


def test_bilevel_becomes_black_and_white() -> None:
    src = Image.new("1", (2, 1))
    src.putdata([0, 1])
    assert _pixels(decode_image(_png(src))) == [(0, 0, 0), WHITE]


def _solid_frames(mode: str = "RGB") -> list[Image.Image]:
    return [Image.new(mode, (24, 16), c) for c in ((255, 0, 0), (0, 255, 0), (0, 0, 255))]


@pytest.mark.parametrize(
    ("fmt", "params"), [("GIF", {}), ("WEBP", {"lossless": True}), ("PNG", {})]
)
def test_animations_give_their_first_frame(fmt: str, params: dict) -> None:
    first, *rest = _solid_frames()
    data = corpus.encode(
        first, fmt, save_all=True, append_images=rest, duration=50, loop=0, **params
    )
    with Image.open(io.BytesIO(data)) as raw:
        assert getattr(raw, "n_frames", 1) == 3
    img = decode_image(data)
    assert img.size == (24, 16)
    assert img.getpixel((5, 5)) == (255, 0, 0)


# -- bad input ---------------------------------------------------------------------------------


def test_every_bad_file_is_one_decode_error(bad: tuple[Path, dict]) -> None:
    root, stages = bad
    assert set(stages) == set(corpus.BAD_ERROR_TYPES)
    for rel, stage in stages.items():
        data = (root / rel).read_bytes()
        with pytest.raises(ItemError) as err:
            decode_image(data)
        e = err.value
        assert (e.stage, e.error_type) == (stage, corpus.BAD_ERROR_TYPES[rel]), (rel, e)
        assert e.message and "\n" not in e.message and len(e.message) <= 200, rel
        assert "object at 0x" not in e.message, f"{rel}: message names an address: {e.message}"
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False


def test_bad_files_are_small_on_disk(bad: tuple[Path, dict]) -> None:
    root, stages = bad
    assert all((root / rel).stat().st_size < 1_000_000 for rel in stages)


def test_truncated_file_is_refused_not_padded() -> None:
    data = corpus.encode(corpus.small_photo(2), "JPEG", quality=90)
    with pytest.raises(ItemError) as err:
        decode_image(data[: len(data) // 2])
    assert err.value.error_type == "TruncatedImage"
    assert decode_image(data).size == corpus.small_photo(2).size


def test_empty_and_too_many_bytes() -> None:
    with pytest.raises(ItemError) as err:
        decode_image(b"")
    assert err.value.error_type == "EmptyFile"
    data = corpus.encode(corpus.small_photo(3), "JPEG")
    with pytest.raises(ItemError) as err:
        decode_image(data, max_bytes=len(data) - 1)
    assert (err.value.stage, err.value.error_type) == ("decode", "TooLarge")
    assert decode_image(data, max_bytes=len(data)).mode == "RGB"


def test_max_pixels_is_checked_from_the_header(no_pixel_decoding: None) -> None:
    data = corpus.bomb_png(5000, 5000)
    assert len(data) < 100_000
    start = time.process_time()
    with pytest.raises(ItemError) as err:
        decode_image(data, max_pixels=10_000_000)
    assert time.process_time() - start < 1.0
    assert err.value.error_type == "DecompressionBomb"
    assert "max_pixels=10000000" in err.value.message


def test_max_pixels_boundary_is_inclusive() -> None:
    data = corpus.bomb_png(4000, 3000)
    with pytest.raises(ItemError):
        decode_image(data, max_pixels=11_999_999)
    assert decode_image(data, max_pixels=12_000_000).size == (4000, 3000)


@pytest.mark.parametrize(
    "data",
    [
        corpus.bomb_png(14_000, 14_000),  # 196M px: under PIL's own error limit, over ours
        corpus.jpeg_with_header_size(14_000, 14_000),
        corpus.webp_with_header_size(14_000, 14_000),  # PIL's WebP open would allocate the canvas
    ],
    ids=["png", "jpeg", "webp"],
)
@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")  # PIL's own, then ours
def test_bombs_are_refused_before_decoding(data: bytes, no_pixel_decoding: None) -> None:
    start = time.process_time()
    with pytest.raises(ItemError) as err:
        decode_image(data)
    assert time.process_time() - start < 1.0
    assert err.value.error_type == "DecompressionBomb"


def test_pil_global_limit_is_only_ever_raised(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    data = _png(Image.new("RGB", (40, 40), RED))  # 1600 px: PIL alone would warn
    assert decode_image(data, max_pixels=2000).size == (40, 40)
    assert Image.MAX_IMAGE_PIXELS == 2000
    with pytest.raises(ItemError) as err:
        decode_image(data, max_pixels=500)
    assert err.value.error_type == "DecompressionBomb"
    assert Image.MAX_IMAGE_PIXELS == 2000  # a lower per-call limit never lowers PIL's guard


def test_threads_with_different_limits_agree_with_serial(good: tuple[Path, dict]) -> None:
    root, expected = good
    blobs = [(root / rel).read_bytes() for rel in expected]
    serial = [decode_image(b).tobytes() for b in blobs]

    def run(i: int) -> bytes | str:
        limit = 10_000 if i % 2 else 100_000_000  # odd tasks must be refused, even ones decoded
        try:
            return decode_image(blobs[i % len(blobs)], max_pixels=limit).tobytes()
        except ItemError as exc:
            return exc.error_type

    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(run, range(2 * len(blobs))))
    for i, got in enumerate(results):
        assert got == ("DecompressionBomb" if i % 2 else serial[i % len(blobs)]), i


# -- JPEG draft mode ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def big_jpeg() -> tuple[bytes, Image.Image]:
    photo = dict(corpus.sample_photos())["hubble"].resize((3000, 2000), Image.Resampling.BICUBIC)
    return corpus.encode(photo, "JPEG", quality=90), photo


def _imagenet_array(img: Image.Image) -> np.ndarray:
    """torchvision's Resize(256) + CenterCrop(224) + ToTensor on a PIL image, as [0, 1] floats.

    For PIL input torchvision calls ``Image.resize(..., BILINEAR)`` (antialiased) with these
    sizes and crop offsets; done here directly to keep this test free of the torch import.
    """
    w, h = img.size
    short, long = (w, h) if w <= h else (h, w)
    long = int(256 * long / short)
    img = img.resize((256, long) if w <= h else (long, 256), Image.Resampling.BILINEAR)
    left, top = int(round((img.width - 224) / 2.0)), int(round((img.height - 224) / 2.0))
    return np.asarray(img.crop((left, top, left + 224, top + 224)), np.float64) / 255.0


def test_draft_decodes_large_jpegs_smaller_but_close(big_jpeg: tuple[bytes, Image.Image]) -> None:
    data, _ = big_jpeg
    full = decode_image(data)
    drafted = decode_image(data, min_side=200)
    assert full.size == (3000, 2000)
    assert drafted.size == (1500, 1000)  # 2000 // 800 = 2 -> libjpeg scale 1/2
    assert decode_image(data, min_side=256).size == (3000, 2000)  # 2000 // 1024 = 1: no draft
    assert min(decode_image(data, min_side=100).size) >= 400
    diff = float(np.abs(_imagenet_array(drafted) - _imagenet_array(full)).mean())
    assert diff < 0.005  # measured ~0.0006; the lead's end-to-end test checks fc7 cosine


def test_draft_on_a_photo_with_native_detail() -> None:
    """Not an upscaled photo: the 1411 px retina image keeps its own high frequencies."""
    data = corpus.encode(dict(corpus.sample_photos())["retina"], "JPEG", quality=90)
    full, drafted = decode_image(data), decode_image(data, min_side=128)
    assert (full.size, drafted.size) == ((1411, 1411), (706, 706))
    assert float(np.abs(_imagenet_array(drafted) - _imagenet_array(full)).mean()) < 0.005


def test_draft_keeps_four_times_min_side_on_every_scale(big_jpeg: tuple[bytes, Image.Image]) -> None:
    data, _ = big_jpeg
    # scale = largest of 8/4/2/1 not above 2000 // (4 * min_side)
    cases = [(50, (375, 250)), (100, (750, 500)), (200, (1500, 1000)), (256, (3000, 2000))]
    for min_side, size in cases:
        img = decode_image(data, min_side=min_side)
        assert img.size == size, min_side
        assert min(img.size) >= 4 * min_side


def test_draft_with_exif_rotation(big_jpeg: tuple[bytes, Image.Image]) -> None:
    _, photo = big_jpeg
    data = corpus.exif_jpeg(photo, 6)
    assert decode_image(data, min_side=200).size == (1500, 1000)
    assert image_size(data) == (3000, 2000)


def test_draft_leaves_small_and_non_jpeg_images_alone() -> None:
    photo = corpus.small_photo(0)  # 400x400
    assert decode_image(corpus.encode(photo, "JPEG"), min_side=256).size == photo.size
    big = photo.resize((1000, 1000))
    assert decode_image(_png(big), min_side=100).size == (1000, 1000)
