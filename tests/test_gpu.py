"""pipeline.decode.gpu: routing, orientation and batch sizing on any machine; nvJPEG decoding under ``gpu``."""

from __future__ import annotations

import io
import threading
import time

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline.decode.cpu import _TRANSPOSE, _orientation, decode_image, decode_with_size
from pipeline.errors import ItemError
from pipeline.decode.gpu import (GpuBatch, GpuBatchDecoder, cpu_decode_uint8, decode_ahead, orient,
                                 parse_jpeg_header, pil_crop_uint8, route)
from pipeline.model.batch_size import _activation_peak_elems, _param_count, auto_batch_size
from pipeline.model.vgg import ARCHS, build_vgg
from pipeline.decode.preprocess import normalize_batch, preprocess_pil
from tests.corpus import (BAD_ERROR_TYPES, encode, exif_jpeg, photo_jpegs, sample_photos, small_photo,
                          write_bad_corpus, write_good_corpus)
from tests.helpers import cpu_reference, row_cosines

LIMITS = dict(max_pixels=100_000_000, max_bytes=100_000_000)
GOOD_GPU_IDS = {"jpeg/baseline.jpg", "jpeg/grey.jpg", "jpeg/exif_orientation_3.jpg",
                "jpeg/exif_orientation_6.jpg", "jpeg/exif_orientation_8.jpg", "jpeg/multi_picture.jpg",
                "upper/PHOTO.JPG", "café photo.jpg"}


def _xmp_jpeg(img: Image.Image, orientation: int) -> bytes:
    xmp = (b'<x:xmpmeta xmlns:x="adobe:ns:meta/"><rdf:RDF><rdf:Description tiff:Orientation="'
           + str(orientation).encode() + b'"/></rdf:RDF></x:xmpmeta>')
    return encode(img, "JPEG", quality=90, xmp=xmp)


def _adobe_rgb_jpeg(img: Image.Image) -> bytes:
    """A JPEG carrying an Adobe APP14 segment whose transform flag says "RGB components"."""
    data = encode(img, "JPEG", quality=90)
    app14 = b"\xff\xee\x00\x0eAdobe\x00\x64\x00\x00\x00\x00\x00"
    return data[:2] + app14 + data[2:]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> dict[str, bytes]:
    root = tmp_path_factory.mktemp("gpu-corpus")
    write_good_corpus(root)
    write_bad_corpus(root)
    files = {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}
    photo = small_photo(1)
    files["extra/xmp_orientation_6.jpg"] = _xmp_jpeg(photo, 6)
    files["extra/adobe_rgb.jpg"] = _adobe_rgb_jpeg(photo)
    files["extra/trailing_zeros.jpg"] = encode(photo, "JPEG", quality=80) + b"\x00" * 10
    for o in (2, 4, 5, 7):
        files[f"extra/exif_orientation_{o}.jpg"] = exif_jpeg(photo, o)
    return files


# -- routing ------------------------------------------------------------------------------------


def test_header_scan_agrees_with_pil(corpus, monkeypatch):
    """Whenever the fast scan claims a header, PIL reads the same size, mode and orientation."""
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", None)  # bomb headers too: route() refuses those
    claimed = 0
    for rel, data in corpus.items():
        header = parse_jpeg_header(data)
        if header is None:
            continue
        claimed += 1
        with Image.open(io.BytesIO(data)) as img:
            assert img.format in ("JPEG", "MPO"), rel
            assert img.mode in ("RGB", "L"), rel
            assert (header.width, header.height) == img.size, rel
            assert header.orientation == _orientation(img, header_only=True), rel
            assert header.progressive == bool(img.info.get("progressive")), rel
    assert claimed >= len(GOOD_GPU_IDS)


def test_route_sends_plain_jpegs_to_the_gpu_and_the_rest_to_the_cpu(corpus):
    to_gpu = {rel for rel, data in corpus.items() if route(data, **LIMITS) is not None}
    expected = GOOD_GPU_IDS | {"extra/xmp_orientation_6.jpg", "extra/trailing_zeros.jpg"} | {
        f"extra/exif_orientation_{o}.jpg" for o in (2, 4, 5, 7)}
    assert to_gpu == expected
    # CMYK, Adobe-RGB, progressive, truncated, bomb headers, other formats: all CPU.
    for rel in ("jpeg/cmyk.jpg", "extra/adobe_rgb.jpg", "jpeg/progressive.jpeg", "bad/truncated.jpg",
                "bad/bomb_header.jpg", "png/rgb.png", "misnamed/png_named.jpg"):
        assert route(corpus[rel], **LIMITS) is None, rel
    assert route(corpus["jpeg/progressive.jpeg"], progressive_on_gpu=True, **LIMITS) is not None


def test_route_limits():
    data = encode(small_photo(0), "JPEG", quality=90)
    w, h = small_photo(0).size
    assert route(data, **LIMITS) is not None
    assert route(data, max_pixels=w * h - 1, max_bytes=10**8) is None       # PIL refuses it: CPU path
    assert route(data, max_pixels=10**8, max_bytes=len(data) - 1) is None
    assert route(data, gpu_max_pixels=w * h - 1, **LIMITS) is None         # big: CPU with DCT scaling
    assert route(b"", **LIMITS) is None


def test_xmp_orientation_is_applied_like_pil(corpus):
    data = corpus["extra/xmp_orientation_6.jpg"]
    header = route(data, **LIMITS)
    assert header is not None and header.orientation == 6
    _, size = decode_with_size(data, **LIMITS)
    assert header.upright_size == size


@pytest.mark.parametrize("orientation", range(1, 9))
def test_orient_matches_pil_exif_transpose(orientation):
    rng = np.random.default_rng(orientation)
    stored = Image.fromarray(rng.integers(0, 256, (5, 7, 3), dtype=np.uint8))
    upright = stored.transpose(_TRANSPOSE[orientation]) if orientation in _TRANSPOSE else stored
    expected = torch.from_numpy(np.array(upright)).permute(2, 0, 1)
    got = orient(torch.from_numpy(np.array(stored)).permute(2, 0, 1), orientation)
    assert torch.equal(got, expected)


# -- the CPU side of a GPU batch -----------------------------------------------------------------


def test_cpu_crops_normalise_to_exactly_the_cpu_reader_input():
    for _, img in sample_photos()[:4]:
        x = normalize_batch(pil_crop_uint8(img)[None])[0]
        assert torch.allclose(x, preprocess_pil(img), atol=1e-6)


def test_cpu_fallback_errors_are_the_decoders(corpus):
    for rel, kind in BAD_ERROR_TYPES.items():
        with pytest.raises(ItemError) as err:
            cpu_decode_uint8(corpus[rel], **LIMITS)
        assert (err.value.stage, err.value.error_type) == ("decode", kind), rel
    crop, size = cpu_decode_uint8(corpus["jpeg/exif_orientation_6.jpg"], **LIMITS)
    assert crop.dtype == torch.uint8 and tuple(crop.shape) == (3, 224, 224)
    assert size == decode_image(corpus["jpeg/exif_orientation_6.jpg"], **LIMITS).size


def test_decoder_needs_cuda():
    with pytest.raises(ValueError, match="CUDA"):
        GpuBatchDecoder("cpu")


# -- batch size ----------------------------------------------------------------------------------


def test_model_arithmetic_matches_the_real_model():
    assert _activation_peak_elems("vgg16") == 2 * 64 * 224 * 224  # conv1_2: 64 channels in and out
    for arch in ("vgg11", "vgg16", "vgg19"):
        with torch.device("meta"):  # shapes only: no 500 MB of random init
            model = build_vgg(arch)
        assert _param_count(arch) == sum(p.numel() for p in model.parameters()), arch


def test_auto_batch_size():
    gib = 1 << 30
    sizes = [auto_batch_size("vgg16", f * gib) for f in (2, 4, 8, 16, 80)]
    assert sizes == sorted(sizes) and sizes[0] < sizes[-1] == 256
    assert all(s & (s - 1) == 0 for s in sizes)  # powers of two: few cuDNN plans
    assert auto_batch_size("vgg16", 8 * gib, precision="fp32") < auto_batch_size("vgg16", 8 * gib)
    assert auto_batch_size("vgg16", 4 * gib, weights_resident=True) > auto_batch_size("vgg16", 4 * gib)
    assert auto_batch_size("vgg19", 4 * gib) <= auto_batch_size("vgg11", 4 * gib)
    assert auto_batch_size("vgg16", 0) == 1 and auto_batch_size("vgg16", 80 * gib, max_batch=64) == 64
    assert all(auto_batch_size(a, 16 * gib) >= 1 for a in ARCHS)
    with pytest.raises(ValueError):
        auto_batch_size("resnet50", gib)


# -- decode_ahead ---------------------------------------------------------------------------------


class _StubDecoder:
    def __init__(self, fail_at: int | None = None) -> None:
        self.fail_at, self.calls = fail_at, []

    def decode(self, items):
        self.calls.append(threading.current_thread().name)
        if self.fail_at is not None and items[0][0] == self.fail_at:
            raise RuntimeError("boom")
        return GpuBatch([p for p, _ in items], torch.zeros(len(items), 3, 1, 1, dtype=torch.uint8),
                        [(1, 1)] * len(items))


def test_decode_ahead_keeps_order_and_runs_in_the_background():
    batches = [[(i * 2, b""), (i * 2 + 1, b"")] for i in range(5)]
    stub = _StubDecoder()
    got = [b.positions for b in decode_ahead(iter(batches), stub, depth=2)]
    assert got == [[0, 1], [2, 3], [4, 5], [6, 7], [8, 9]]
    assert set(stub.calls) == {"gpu-decode"}


def test_decode_ahead_raises_in_order_and_stops_early():
    batches = [[(i, b"")] for i in range(5)]
    out = []
    with pytest.raises(RuntimeError, match="boom"):
        for b in decode_ahead(iter(batches), _StubDecoder(fail_at=3)):
            out.append(b.positions[0])
    assert out == [0, 1, 2]

    produced = []

    def endless():
        i = 0
        while True:
            produced.append(i)
            yield [(i, b"")]
            i += 1

    gen = decode_ahead(endless(), _StubDecoder(), depth=1)
    assert next(gen).positions == [0]
    gen.close()  # the consumer stops: the background thread must stop too (close joins it)
    assert not [t for t in threading.enumerate() if t.name == "gpu-decode"]
    assert len(produced) <= 4  # it ran at most a few batches ahead


# -- on a GPU ---------------------------------------------------------------------------------------


def _cpu_error(data: bytes):
    try:
        decode_with_size(data, min_side=256, **LIMITS)
    except ItemError as exc:
        return exc.error_type
    return None


@pytest.mark.gpu
def test_gpu_decode_agrees_with_the_cpu_path_on_fc7():
    from pipeline.model.extractor import Extractor
    datas = photo_jpegs()
    dec = GpuBatchDecoder("cuda", cpu_threads=2, **LIMITS)
    try:
        batch = dec.decode(list(enumerate(datas)))
    finally:
        dec.close()
    assert batch.positions == list(range(len(datas))) and not batch.failures
    assert batch.gpu_decoded == len(datas)  # every one of them went through nvJPEG
    ref = [cpu_reference(d, **LIMITS) for d in datas]
    assert batch.sizes == [size for _, size in ref]
    ex = Extractor("vgg11", "random:0", device="cuda", precision="fp32")
    gpu_fc7, _ = ex(batch.normalized())
    cpu_fc7, _ = ex(torch.stack([x for x, _ in ref]))
    cos = row_cosines(gpu_fc7, cpu_fc7)
    assert cos.min() >= 0.999, cos
    # bf16 on the GPU path against the fp32 CPU reference: still within the docs/design.md §2 tolerance.
    ex16 = Extractor("vgg11", "random:0", device="cuda", precision="bf16")
    bf_fc7, _ = ex16(batch.normalized())
    cos16 = row_cosines(bf_fc7, cpu_fc7)
    assert cos16.min() >= 0.999, cos16


@pytest.mark.gpu
def test_gpu_batch_mixes_fallbacks_and_errors_like_the_cpu_reader(corpus):
    rels = sorted(corpus)
    dec = GpuBatchDecoder("cuda", cpu_threads=2, **LIMITS)
    try:
        batch = dec.decode(list(enumerate(corpus[r] for r in rels)))
    finally:
        dec.close()
    failed = {rels[p]: e.error_type for p, e in batch.failures}
    # Exactly the CPU reader's error rows.  Not BAD_ERROR_TYPES itself: what PIL can open depends
    # on how it was built (the GPU machine's Pillow refuses the YCbCr TIFF, for one).
    assert failed == {r: e for r in rels if (e := _cpu_error(corpus[r])) is not None}
    assert set(BAD_ERROR_TYPES.items()) <= set(failed.items())
    assert batch.positions == [i for i, r in enumerate(rels) if r not in failed]
    assert batch.pixels.shape == (len(batch.positions), 3, 224, 224) and batch.pixels.is_cuda
    for pos, size in zip(batch.positions, batch.sizes):
        assert size == decode_image(corpus[rels[pos]], **LIMITS).size, rels[pos]
    assert batch.gpu_decoded >= len(GOOD_GPU_IDS)
    # Every image, whichever decoder made it, is close to the CPU reader's pixels.
    x = batch.normalized().cpu()
    for j, pos in enumerate(batch.positions):
        ref, _ = cpu_reference(corpus[rels[pos]], **LIMITS)
        assert (x[j] - ref).abs().mean() < 0.05, rels[pos]


@pytest.mark.gpu
def test_decode_ahead_feeds_the_extractor_through_decoded_items():
    from pipeline.model.extractor import Extractor
    datas = photo_jpegs()
    dec = GpuBatchDecoder("cuda", cpu_threads=2, **LIMITS)
    ex = Extractor("vgg11", "random:0", device="cuda")
    batches = [list(enumerate(datas))[i:i + 4] for i in range(0, len(datas), 4)]
    rows = 0
    try:
        for gb in decode_ahead(iter(batches), dec):
            out = ex.embed(gb.to_decoded())
            assert out["fc7"].shape == (len(gb.positions), 4096) and np.isfinite(out["fc7"]).all()
            rows += len(gb.positions)
    finally:
        dec.close()
    assert rows == len(datas)


@pytest.mark.gpu
def test_cuda_batch_size_from_free_memory():
    from pipeline.model.batch_size import cuda_batch_size
    n = cuda_batch_size("vgg16", "cuda")
    assert 1 <= n <= 256 and n & (n - 1) == 0


# -- the worker's GPU-decode path, on any machine -------------------------------------------------


class _CpuStandInDecoder:
    """``GpuBatchDecoder``'s contract (``decode`` -> ``GpuBatch``) kept on the CPU, every image
    through :func:`cpu_decode_uint8`: exercises the worker's wiring without CUDA."""

    def __init__(self) -> None:
        self.batch_sizes: list[int] = []

    def decode(self, items):
        self.batch_sizes.append(len(items))
        t0 = time.perf_counter()
        positions, crops, sizes, failures = [], [], [], []
        for pos, data in items:
            try:
                crop, size = cpu_decode_uint8(data, **LIMITS)
            except ItemError as exc:
                failures.append((pos, exc))
                continue
            positions.append(pos)
            crops.append(crop)
            sizes.append(size)
        pixels = torch.stack(crops) if crops else torch.empty((0, 3, 224, 224), dtype=torch.uint8)
        return GpuBatch(positions, pixels, sizes, failures, decode_s=time.perf_counter() - t0)


def test_worker_gpu_decode_path_gives_the_cpu_readers_rows(tmp_path):
    """Same shard through the CPU reader and through the decoder-batch path: same rows, same
    error rows (read, decode, duplicate), fc7 equal; batches never exceed runtime.batch_size."""
    from pipeline.config import load_config
    from pipeline.input.plan import Shard
    from pipeline.run.worker import ShardWorker

    root = tmp_path / "in"
    good = sorted(write_good_corpus(root, n=7))
    bad = sorted(write_bad_corpus(root))[:3]
    ids = good[:4] + bad + ["missing.jpg", good[1]] + good[4:]
    shard = Shard(0, ids, [str(root / i) for i in ids], duplicate=[i == 8 for i in range(len(ids))])
    cfg = load_config(overrides=["model.arch=vgg11", "model.weights=random:0", "runtime.device=cpu",
                                 "runtime.batch_size=3", "runtime.decode_threads=2"])
    worker = ShardWorker(cfg, str(tmp_path / "out"))
    assert worker.gpu_decoder is None and worker.ready()["decode"] == "cpu"
    cpu_emb, cpu_err, _ = worker.process(shard, write=False)
    worker.gpu_decoder = stand_in = _CpuStandInDecoder()
    emb, err, summary = worker.process(shard, write=False)

    for col in ("id", "uri", "width", "height"):
        assert emb.column(col).to_pylist() == cpu_emb.column(col).to_pylist(), col
    assert emb.num_rows == len(good)
    assert err.select(["id", "stage", "error_type"]).to_pylist() == \
        cpu_err.select(["id", "stage", "error_type"]).to_pylist()
    assert {r["stage"] for r in err.to_pylist()} == {"decode", "read", "list"}
    a = np.asarray(emb.column("fc7").to_pylist(), dtype=np.float32)
    b = np.asarray(cpu_emb.column("fc7").to_pylist(), dtype=np.float32)
    np.testing.assert_allclose(a, b, rtol=1e-2, atol=1e-3)
    assert max(stand_in.batch_sizes) == 3 and sum(stand_in.batch_sizes) == len(good) + len(bad)
    # The model waited for input for the rest of the loop: between nothing and the shard's wall
    # time less its model time (each figure rounded to 1 ms).
    assert 0 <= summary["wait_s"] <= summary["wall_s"] - summary["model_s"] + 0.002, summary
    assert summary["decode_s"] > 0


def test_runtime_decode_cpu_or_a_cpu_device_keeps_the_cpu_reader():
    from types import SimpleNamespace

    from pipeline.run.worker import uses_gpu_decode
    cuda = SimpleNamespace(device=torch.device("cuda"), needs_image=False)
    cpu = SimpleNamespace(device=torch.device("cpu"), needs_image=False)
    dense = SimpleNamespace(device=torch.device("cuda"), needs_image=True)
    assert uses_gpu_decode("auto", cuda) and uses_gpu_decode("gpu", cuda)
    assert not uses_gpu_decode("cpu", cuda)
    assert not any(uses_gpu_decode(d, m) for d in ("auto", "gpu") for m in (cpu, dense))


@pytest.mark.gpu
def test_extract_on_cuda_decodes_on_the_gpu_and_matches_the_cpu_run(tmp_path, photo_dir, vgg11_weights, ray_local):
    """The real job on CUDA (nvJPEG for the JPEGs, CPU for the PNGs, bf16) against the same job on
    the CPU: same ids in the same order, fc7 cosine >= 0.999 for every image."""
    import json

    import pipeline
    runs = {}
    for device in ("cuda", "cpu"):
        out = tmp_path / device
        pipeline.extract(str(photo_dir), str(out), weights=str(vgg11_weights), model={"arch": "vgg11"},
                         runtime={"device": device}, input={"shard_size": 4})
        summary = json.loads((out / "_SUCCESS.json").read_text())
        runs[device] = (pipeline.load_embeddings(str(out)), summary)
    (gpu, gpu_run), (cpu, cpu_run) = runs["cuda"], runs["cpu"]
    assert {a["decode"] for a in gpu_run["run"]["actors"]} == {"gpu"}
    assert {a["decode"] for a in cpu_run["run"]["actors"]} == {"cpu"}
    assert list(gpu.ids) == list(cpu.ids) and len(gpu.ids) == 10
    a, b = gpu.vectors, cpu.vectors
    cos = row_cosines(a, b)
    assert cos.min() >= 0.999, cos
