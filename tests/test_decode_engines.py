"""pipeline.decode.engines and the multi-engine GpuBatchDecoder: assembly, fallbacks and the cpu engine
on any machine (CPU tensors, engines whose decode is a plain function); each real engine under ``gpu``.

(tests/test_engines.py is about the query engines that read our Parquet output, not these.)
"""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from pipeline.decode.engines import EngineOutput, PoolEngine, hw_engine, resolve
from pipeline.decode.gpu import GpuBatchDecoder, cpu_decode_uint8, decode_ahead, route
from pipeline.decode.pool import DecodePool
from pipeline.decode.preprocess import RESIZE
from pipeline.errors import ItemError
from tests.corpus import BAD_ERROR_TYPES, photo_jpegs, write_bad_corpus, write_good_corpus
from tests.helpers import ROOT, cpu_reference, row_cosines

LIMITS = dict(max_pixels=100_000_000, max_bytes=100_000_000)
CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> list[tuple[str, bytes]]:
    """Every good and bad corpus file, sorted by id: JPEGs a GPU may decode, and everything else."""
    root = tmp_path_factory.mktemp("engines-corpus")
    write_good_corpus(root)
    write_bad_corpus(root)
    return [(p.relative_to(root).as_posix(), p.read_bytes()) for p in sorted(root.rglob("*")) if p.is_file()]


def _cpu_outcome(data: bytes):
    """What the CPU path makes of one file: (crop, size) or the ItemError's error_type."""
    try:
        return cpu_decode_uint8(data, **LIMITS)
    except ItemError as exc:
        return exc.error_type


class _PlainEngine:
    """An engine whose decode is a plain function (the CPU path's crops), rejecting ``reject``."""

    def __init__(self, name: str, reject: frozenset[int] = frozenset(), fail: bool = False) -> None:
        self.name, self.reject, self.fail = name, reject, fail
        self.calls: list[list[int]] = []
        self.closed = False

    def decode(self, items):
        self.calls.append([pos for pos, _, _ in items])
        if self.fail:
            raise RuntimeError("engine broke")
        out = EngineOutput()
        for item in items:
            pos, data, _ = item
            if pos in self.reject:
                out.rejected.append(item)
                continue
            out.crops[pos], out.sizes[pos] = cpu_decode_uint8(data, **LIMITS)
        return out

    def close(self) -> None:
        self.closed = True


def _routed(items: list[tuple[int, bytes]]) -> list[int]:
    return [pos for pos, data in items if route(data, **LIMITS) is not None]


def _assert_cpu_outcome(batch, items: list[tuple[int, bytes]]) -> None:
    """The batch is what the CPU path gives: crops bit for bit, sizes, error rows, input order."""
    expected = {pos: _cpu_outcome(data) for pos, data in items}
    assert batch.positions == [p for p, _ in items if not isinstance(expected[p], str)]
    assert {p: e.error_type for p, e in batch.failures} == {p: o for p, o in expected.items() if isinstance(o, str)}
    assert batch.pixels.shape == (len(batch.positions), 3, 224, 224) and batch.pixels.dtype == torch.uint8
    for j, pos in enumerate(batch.positions):
        crop, size = expected[pos]
        assert torch.equal(batch.pixels[j].cpu(), crop), pos
        assert batch.sizes[j] == size, pos


# -- the cpu engine: the decode processes -------------------------------------------------------


def test_cpu_engine_crops_are_the_cpu_paths_bit_for_bit():
    datas = photo_jpegs()
    items = [(pos, data, route(data, **LIMITS)) for pos, data in enumerate(datas)]
    assert all(h is not None for _, _, h in items)
    # 3 slots for 6 images: the engine works in waves of the ring's size instead of blocking.
    engine = PoolEngine(CPU, DecodePool(2, 3, resize=RESIZE, crop=224, min_side=RESIZE, **LIMITS))
    try:
        out = engine.decode(items)
    finally:
        engine.close()
    assert not out.rejected and not out.failures
    for pos, data in enumerate(datas):
        crop, size = cpu_decode_uint8(data, **LIMITS)
        assert torch.equal(out.crops[pos], crop), pos
        assert out.sizes[pos] == size, pos


def test_cpu_engine_in_a_batch_gives_the_cpu_readers_rows(corpus):
    items = list(enumerate(data for _, data in corpus))
    pool = DecodePool(2, 4, resize=RESIZE, crop=224, min_side=RESIZE, **LIMITS)
    dec = GpuBatchDecoder("cpu", engines=[PoolEngine(CPU, pool)], cpu_threads=2, **LIMITS)
    try:
        batch = dec.decode(items)
    finally:
        dec.close()
    _assert_cpu_outcome(batch, items)
    assert set(BAD_ERROR_TYPES.values()) <= {e.error_type for _, e in batch.failures}
    assert batch.engines["cpu"][0] == len(_routed(items)) and batch.gpu_decoded == 0
    assert pool._closed  # the engine's pool is the decoder's to close


# -- assembly, balancing and fallbacks with plain engines ---------------------------------------


def test_engines_share_a_batch_and_rejections_fall_back_in_order(corpus):
    items = list(enumerate(data for _, data in corpus))
    routed = _routed(items)
    assert len(routed) >= 6
    hw = _PlainEngine("hw", reject=frozenset(routed[:2]))
    # hw's first share (an even split) is routed[:n]: cuda rejects one of hw's rejections on the
    # retry (so PIL decodes it) and one of its own share.
    cuda = _PlainEngine("cuda", reject=frozenset({routed[0], routed[-1]}))
    dec = GpuBatchDecoder("cpu", engines=[hw, cuda], cpu_threads=2, **LIMITS)
    try:
        batch = dec.decode(items)
    finally:
        dec.close()
    _assert_cpu_outcome(batch, items)
    half = (len(routed) + 1) // 2
    assert hw.calls == [routed[:half]]
    assert cuda.calls == [routed[half:], routed[:2]]  # its share, then hw's rejections retried alone
    assert batch.engines.keys() == {"hw", "cuda"}
    # what each decoded of its share: hw handed 2 back, cuda 1 of its own
    assert batch.engines["hw"][0] == half - 2 and batch.engines["cuda"][0] == len(routed) - half - 1
    assert batch.gpu_decoded == len(routed) - 2        # routed[0] and routed[-1] went to PIL
    assert set(dec.balancer.rates()) == {"hw", "cuda"} and all(dec.balancer.rates().values())
    assert hw.closed and cuda.closed


def test_a_failing_engine_is_dropped_and_its_images_still_decode(corpus):
    items = list(enumerate(data for _, data in corpus))
    hw, cuda = _PlainEngine("hw", fail=True), _PlainEngine("cuda")
    dec = GpuBatchDecoder("cpu", engines=[hw, cuda], cpu_threads=2, **LIMITS)
    try:
        first = dec.decode(items)
        assert dec.engine_names == ["cuda"] and dec.balancer.engines == ["cuda"] and hw.closed
        second = dec.decode(items)
    finally:
        dec.close()
    for batch in (first, second):
        _assert_cpu_outcome(batch, items)
    assert len(hw.calls) == 1 and second.engines.keys() == {"cuda"}


def test_a_sole_engine_that_fails_raises(corpus):
    dec = GpuBatchDecoder("cpu", engines=[_PlainEngine("cuda", fail=True)], cpu_threads=1, **LIMITS)
    try:
        with pytest.raises(RuntimeError, match="engine broke"):
            dec.decode(list(enumerate(data for _, data in corpus)))
    finally:
        dec.close()


def test_decode_ahead_with_several_engines_keeps_order(corpus):
    items = list(enumerate(data for _, data in corpus))
    batches = [items[i:i + 5] for i in range(0, len(items), 5)]
    dec = GpuBatchDecoder("cpu", engines=[_PlainEngine("hw"), _PlainEngine("cuda")], cpu_threads=2, **LIMITS)
    try:
        got = list(decode_ahead(iter(batches), dec, depth=2))
    finally:
        dec.close()
    assert len(got) == len(batches)
    for batch, part in zip(got, batches):
        _assert_cpu_outcome(batch, part)
    stats = dec.engine_stats()
    assert sum(s["images"] for s in stats.values()) == len(_routed(items))


def test_worker_reports_what_each_engine_decoded(tmp_path):
    """A shard through the multi-engine decoder: the CPU reader's rows, and per-engine figures in
    the shard summary (what the scheduler sums into _SUCCESS.json run.decode_engines)."""
    from pipeline.config import load_config
    from pipeline.input.plan import Shard
    from pipeline.run.worker import ShardWorker

    root = tmp_path / "in"
    ids = sorted(write_good_corpus(root, n=6)) + sorted(write_bad_corpus(root))[:2]
    shard = Shard(0, ids, [str(root / i) for i in ids], duplicate=[False] * len(ids))
    cfg = load_config(overrides=["model.arch=vgg11", "model.weights=random:0", "runtime.device=cpu",
                                 "runtime.batch_size=4", "runtime.decode_threads=2"])
    worker = ShardWorker(cfg, str(tmp_path / "out"))
    try:
        assert worker.ready()["decode_engines"] == ["cpu"]   # a CPU worker: the decode processes only
        cpu_emb, cpu_err, _ = worker.process(shard, write=False)
        pool = DecodePool(1, 4, resize=RESIZE, crop=224, min_side=RESIZE, **LIMITS)
        worker.gpu_decoder = GpuBatchDecoder("cpu", engines=[_PlainEngine("cuda"), PoolEngine(CPU, pool)],
                                             cpu_threads=2, **LIMITS)
        assert worker.ready()["decode_engines"] == ["cuda", "cpu"]
        emb, err, summary = worker.process(shard, write=False)
    finally:
        worker.close()
    assert pool._closed
    assert emb.column("id").to_pylist() == cpu_emb.column("id").to_pylist()
    assert err.select(["id", "error_type"]).to_pylist() == cpu_err.select(["id", "error_type"]).to_pylist()
    np.testing.assert_allclose(np.asarray(emb.column("fc7").to_pylist(), dtype=np.float32),
                               np.asarray(cpu_emb.column("fc7").to_pylist(), dtype=np.float32), rtol=1e-2, atol=1e-3)
    routed = sum(route((root / i).read_bytes(), **LIMITS) is not None for i in ids)
    assert set(summary["engines"]) == {"cuda", "cpu"}
    assert sum(e["images"] for e in summary["engines"].values()) == routed
    assert all(e["busy_s"] >= 0 for e in summary["engines"].values())


# -- which engines a node has -------------------------------------------------------------------


def test_engine_choice():
    assert resolve(None, hw_usable=True, cpu_processes=4) == ["hw", "cuda", "cpu"]
    assert resolve(None, hw_usable=False, cpu_processes=4) == ["cuda", "cpu"]
    assert resolve(None, hw_usable=False, cpu_processes=0) == ["cuda"]          # today's GPU path
    assert resolve(["cpu", "cuda"], hw_usable=True, cpu_processes=2) == ["cuda", "cpu"]
    assert resolve(["hw"], hw_usable=False, cpu_processes=2) == ["cuda"]       # asked for, absent: warned
    with pytest.raises(ValueError, match="unknown decode engine"):
        resolve(["nvdec"], hw_usable=True, cpu_processes=2)


def test_this_box_has_no_hw_engine_and_never_needs_nvimgcodec():
    """CPU-only (this machine, CI): without the [gpu] extra, importing and building the decoders
    works, there is no hw engine, and a worker decodes with the decode processes as before."""
    assert hw_engine("cpu") is None
    with pytest.raises(ValueError, match="CUDA"):
        GpuBatchDecoder("cpu", engines=None)  # the node's own engines need a CUDA device
    code = """if True:
        import json, sys
        sys.modules["nvidia"] = None           # as if the [gpu] extra were not installed
        import pipeline.decode.engines, pipeline.decode.gpu, pipeline.run.worker
        from pipeline.decode.engines import hw_engine, resolve
        from pipeline.config import KEYS
        default, parse = KEYS["runtime.decode_engines"]
        print(json.dumps({"hw": hw_engine("cuda:0") is not None,
                          "engines": resolve(default, hw_usable=False, cpu_processes=2),
                          "setting": default, "auto": parse("auto"), "listed": parse("cpu, hw")}))
    """
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-2000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    assert got == {"hw": False, "engines": ["cuda", "cpu"], "setting": None, "auto": None, "listed": ["cpu", "hw"]}


# -- on a GPU -------------------------------------------------------------------------------------

_SPECS = {"cuda": ["cuda"], "hw": ["hw"], "cpu": ["cpu"], "all": None}


def _gpu_decoder(spec: str) -> GpuBatchDecoder:
    dec = GpuBatchDecoder("cuda", engines=_SPECS[spec], cpu_processes=2, cpu_slots=64, cpu_threads=2, **LIMITS)
    if spec == "hw" and dec.engine_names != ["hw"]:
        dec.close()
        pytest.skip("no hardware JPEG decoder here (pip install vgg-pipeline[gpu], A100/H100/H200)")
    if spec == "cpu":  # the cpu engine alone: nothing but the decode processes decodes plain JPEGs
        assert dec.engine_names == ["cpu"]
    return dec


@pytest.mark.gpu
@pytest.mark.parametrize("spec", list(_SPECS))
def test_every_engine_agrees_with_the_cpu_path_on_fc7(spec):
    from pipeline.model.extractor import Extractor
    datas = photo_jpegs()
    dec = _gpu_decoder(spec)
    try:
        batches = [dec.decode(list(enumerate(datas))) for _ in range(3)]  # "all": balanced after the first
    finally:
        dec.close()
    ref = [cpu_reference(d, **LIMITS) for d in datas]
    ex = Extractor("vgg11", "random:0", device="cuda", precision="fp32")
    cpu_fc7, _ = ex(torch.stack([x for x, _ in ref]))
    for batch in batches:
        assert batch.positions == list(range(len(datas))) and not batch.failures
        assert batch.sizes == [size for _, size in ref]
        # what the engines decoded of their shares (an image hw hands back is decoded by nvJPEG's retry)
        assert 0 < sum(n for n, _ in batch.engines.values()) <= len(datas)
        cos = row_cosines(ex(batch.normalized())[0], cpu_fc7)
        assert cos.min() >= 0.999, (spec, batch.engines, cos)
    if spec == "all":
        assert len(batches[0].engines) == len(dec.engine_names) >= 2  # the first batch measures every engine


@pytest.mark.gpu
@pytest.mark.parametrize("spec", list(_SPECS))
def test_every_engine_gives_the_cpu_readers_error_rows_and_orientation(spec, corpus):
    items = list(enumerate(data for _, data in corpus))
    dec = _gpu_decoder(spec)
    try:
        batch = dec.decode(items)
    finally:
        dec.close()
    expected = {pos: _cpu_outcome(data) for pos, data in items}
    assert {p: e.error_type for p, e in batch.failures} == {p: o for p, o in expected.items() if isinstance(o, str)}
    assert batch.positions == [p for p, _ in items if not isinstance(expected[p], str)]
    x = batch.normalized().cpu()
    for j, pos in enumerate(batch.positions):
        assert batch.sizes[j] == expected[pos][1], corpus[pos][0]   # upright size: EXIF applied
        ref, _ = cpu_reference(items[pos][1], **LIMITS)
        assert (x[j] - ref).abs().mean() < 0.05, (spec, corpus[pos][0])


@pytest.mark.gpu
def test_the_hw_engine_is_found_on_cards_that_have_it():
    import importlib.util
    name = torch.cuda.get_device_name()
    if importlib.util.find_spec("nvidia.nvimgcodec") is None:
        pytest.skip("the [gpu] extra (nvidia-nvimgcodec-cu13) is not installed")
    if not any(card in name for card in ("A100", "A30", "H100", "H200", "H800", "GH200", "B200")):
        pytest.skip(f"{name}: no hardware JPEG decoder expected")
    engine = hw_engine("cuda")
    assert engine is not None, name
    engine.close()
