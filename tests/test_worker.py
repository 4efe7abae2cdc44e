"""The streaming worker (pipeline/run/worker.py) and its decode processes (pipeline/decode/pool.py),
without Ray: ``ShardWorker.process`` called from threads, as Ray's threaded actor calls it.

* two shards in flight give exactly the rows of one after the other, and the model sees each
  shard's batches in one run (no interleaving);
* a shard's files are committed before ``process`` returns;
* the decode processes give the thread reader's rows and error rows, bit for bit, on the hostile
  corpus;
* a decode process killed mid-shard loses nothing; one that an image keeps killing makes that
  image one ``stage=decode`` error row; one that hangs is bounded;
* a decode process keeps ordinary buffers and hands back a huge image's, whatever the actor's
  malloc settings;
* no more than two shards are materialised, however many calls Ray runs at once.
"""

from __future__ import annotations

import hashlib
import os
import signal
import threading
import time
from pathlib import Path

import numpy as np
import psutil
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from pipeline.config import load_config
from pipeline.decode import pool as decode_pool
from pipeline.decode.cpu import decode_with_size
from pipeline.decode.gpu import pil_crop_uint8
from pipeline.decode.pool import Crop, DecodePool, resize_crop
from pipeline.errors import ItemError
from pipeline.input.plan import Shard
from pipeline.input.layout import EMBEDDINGS_DIR, ERRORS_DIR, part_name
from pipeline.run.ray_pool import CPU_ACTOR_ENV
from pipeline.run.worker import MATERIALISED, ShardWorker
from tests.corpus import encode, small_photo, write_bad_corpus, write_good_corpus

LIMITS = dict(max_pixels=10**8, max_bytes=10**8)
DEADLINE_S = 120.0  # only ever reached if the code under test is broken


def _until(cond, what: str) -> None:
    """Wait for a state the test itself brought about (a stopped process, a gated model)."""
    end = time.monotonic() + DEADLINE_S
    while not cond():
        if time.monotonic() > end:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.01)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> tuple[Path, list[str], list[str]]:
    root = tmp_path_factory.mktemp("worker-corpus")
    good = sorted(write_good_corpus(root))
    bad = sorted(write_bad_corpus(root))
    return root, good, bad


def _shard(root: Path, index: int, ids: list[str], duplicate_at: int | None = None) -> Shard:
    return Shard(index, ids, [str(root / i) for i in ids],
                 duplicate=[i == duplicate_at for i in range(len(ids))])


@pytest.fixture(scope="module")
def worker(tmp_path_factory):
    cfg = load_config(overrides=["model.arch=vgg11", "model.weights=random:0", "runtime.device=cpu",
                                 "runtime.batch_size=3", "runtime.decode_threads=2"])
    w = ShardWorker(cfg, str(tmp_path_factory.mktemp("worker-out")))
    yield w
    w.close()


class _Recording:
    """The worker's mapper, recording for each batch which ticket had the model (which shard) and
    on which thread; ``gate`` holds the first batch until the test opens it."""

    def __init__(self, worker, gate: threading.Event | None = None) -> None:
        self.worker, self.mapper, self.gate = worker, worker.mapper, gate
        self.calls: list[tuple[int, list[int]]] = []
        self.threads: set[str] = set()
        self.entered = threading.Event()

    def __getattr__(self, name):
        return getattr(self.mapper, name)

    def embed(self, batch):
        self.entered.set()
        if self.gate is not None:
            self.gate.wait()
        self.calls.append((self.worker.sequencer._served, list(batch.positions)))
        self.threads.add(threading.current_thread().name)
        return self.mapper.embed(batch)


@pytest.fixture
def recording(worker):
    real = worker.mapper
    yield lambda gate=None: setattr(worker, "mapper", _Recording(worker, gate)) or worker.mapper
    worker.mapper = real


def _in_threads(fn, args_list) -> list:
    out: list = [None] * len(args_list)
    errors: list = []

    def run(i, args):
        try:
            out[i] = fn(*args)
        except BaseException as exc:  # noqa: BLE001 - re-raised in the test
            errors.append(exc)
    threads = [threading.Thread(target=run, args=(i, a), name=f"call-{i}") for i, a in enumerate(args_list)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(DEADLINE_S)
    assert not errors, errors
    return out


# -- the decode processes' crop is torchvision's ------------------------------------------------

@pytest.mark.parametrize("size", [(500, 375), (375, 500), (256, 256), (256, 300), (301, 256), (640, 481),
                                  (999, 1000), (224, 240), (3000, 257)])
def test_resize_crop_is_torchvision_bit_for_bit(size):
    img = small_photo(1).resize(size)
    ours = torch.from_numpy(np.asarray(resize_crop(img, 256, 224)).transpose(2, 0, 1).copy())
    assert torch.equal(ours, pil_crop_uint8(img))


def test_pool_gives_crops_and_error_rows_through_shared_memory():
    datas = [encode(small_photo(i), "JPEG") for i in range(5)] + [b"<html>not an image</html>", b""]
    pool = DecodePool(2, 4, **LIMITS)
    try:
        results = [f.result() for f in [pool.submit(d) for d in datas[:4]]]
        assert all(isinstance(r, Crop) for r in results)
        assert pool.free_slots == 0  # the ring bounds what is decoded and not yet taken
        crops = pool.take([r.slot for r in results])
        assert pool.free_slots == 4
        for r, crop, data in zip(results, crops, datas):
            img, size = decode_with_size(data, min_side=256, **LIMITS)
            assert (r.width, r.height) == size
            assert torch.equal(torch.from_numpy(crop), pil_crop_uint8(img))
        bad = [pool.submit(d).result() for d in datas[5:]]
        assert [(e.stage, e.error_type) for e in bad] == [("decode", "UnidentifiedImageError"),
                                                          ("decode", "EmptyFile")]
        assert pool.free_slots == 4 and pool.restarts == 0
    finally:
        pool.close()


def test_pool_decode_process_that_hangs_is_bounded(monkeypatch):
    good, stuck = encode(small_photo(0), "JPEG"), encode(small_photo(1), "JPEG")
    monkeypatch.setenv(decode_pool.HANG_ENV, hashlib.sha256(stuck).hexdigest())
    pool = DecodePool(1, 2, timeout_s=1.0, **LIMITS)
    try:
        err = pool.submit(stuck).result()
        assert isinstance(err, ItemError) and (err.stage, err.error_type) == ("decode", "DecodeTimeout")
        assert isinstance(pool.submit(good).result(), Crop)  # on the replacement process
        assert pool.restarts == 1
    finally:
        pool.close()


def test_decode_processes_use_their_own_malloc_settings_whatever_the_actor_has(monkeypatch):
    # The CPU actor's environment keeps every buffer for good (the model's activations): a decode
    # process must still hand back what a huge image took, and keep ordinary buffers on the heap.
    for key, value in CPU_ACTOR_ENV.items():
        monkeypatch.setenv(key, value)
    small = encode(small_photo(0), "JPEG")
    huge = encode(Image.new("RGBA", (6000, 6000), (10, 200, 30, 128)), "PNG", compress_level=6)  # 36 Mpixel
    others = set(psutil.Process().children())  # other tests' pools may still be running
    pool = DecodePool(1, 1, **LIMITS)

    def decode(data: bytes) -> None:
        crop = pool.submit(data).result()
        assert isinstance(crop, Crop)
        pool.take([crop.slot])

    try:
        [child] = set(psutil.Process().children()) - others
        env = child.environ()
        assert {k: env.get(k) for k in decode_pool.MALLOC_ENV} == decode_pool.MALLOC_ENV
        decode(small)
        before = child.memory_info().rss
        decode(huge)   # ~250 MB while it decodes
        decode(small)  # one image at a time: the huge one is done with by now
        assert child.memory_info().rss - before < 64 << 20
    finally:
        pool.close()


# -- the worker ---------------------------------------------------------------------------------

def test_two_concurrent_shards_give_the_sequential_rows(worker, corpus, recording):
    root, good, bad = corpus
    a = _shard(root, 0, good[:7] + bad[:2] + ["missing.jpg"], duplicate_at=3)
    b = _shard(root, 1, good[7:16] + bad[2:4])
    sequential = [worker.process(s, write=False) for s in (a, b)]
    rec = recording()
    concurrent = _in_threads(worker.process, [(a, False), (b, False)])
    for seq, con in zip(sequential, concurrent):
        assert seq[0].to_pylist() == con[0].to_pylist()   # ids, uris, fc7, logits, sizes: identical
        assert seq[1].to_pylist() == con[1].to_pylist()
    assert sequential[0][1].num_rows == 4  # two bad, one missing, one duplicate
    # The model (one thread) saw each shard's batches in one run, in plan order.
    tickets = [t for t, _ in rec.calls]
    assert tickets == sorted(tickets) and len(set(tickets)) == 2, tickets
    assert len(rec.threads) == 1, rec.threads
    for ticket in set(tickets):
        pos = [p for t, ps in rec.calls if t == ticket for p in ps]
        assert pos == sorted(pos) and len(pos) in (a.duplicate.count(False) - 3, len(b) - 2)


def test_files_are_committed_before_process_returns(worker, corpus):
    root, good, bad = corpus
    shard = _shard(root, 7, good[:4] + bad[:1])
    out = Path(worker.output)
    emb_path, err_path = out / EMBEDDINGS_DIR / part_name(7), out / ERRORS_DIR / part_name(7)
    hold = threading.Event()
    blocker = worker.writer._pool.submit(hold.wait)  # the writer thread is busy until we say so
    result: list = []
    t = threading.Thread(target=lambda: result.append(worker.process(shard)))
    t.start()
    _until(lambda: worker.sequencer.active == 0 and worker.sequencer._next > 0 and not result,
           "the shard to leave the model")
    _until(lambda: worker.writer._pool._work_queue.qsize() == 1, "the shard to be queued for writing")
    assert t.is_alive() and not emb_path.exists()  # finished, not committed: not returned
    hold.set()
    t.join(DEADLINE_S)
    blocker.result()
    summary = result[0]
    assert (summary["rows"], summary["errors"]) == (4, 1)
    assert pq.read_table(emb_path).num_rows == 4 and pq.read_table(err_path).num_rows == 1
    assert err_path.stat().st_mtime_ns <= emb_path.stat().st_mtime_ns  # errors first, marker last


def test_pool_rows_are_the_thread_readers_rows_on_the_hostile_corpus(worker, corpus):
    root, good, bad = corpus
    shard = _shard(root, 2, good + bad + ["missing.jpg"], duplicate_at=5)
    emb, err, summary = worker.process(shard, write=False)
    pool, worker.pool = worker.pool, None  # today's path: decode on the reader's threads
    try:
        ref_emb, ref_err, _ = worker.process(shard, write=False)
    finally:
        worker.pool = pool
    assert emb.to_pylist() == ref_emb.to_pylist()   # fc7 bit for bit: the crops are identical
    assert err.to_pylist() == ref_err.to_pylist()   # same stage, error_type and message per image
    assert err.num_rows == len(bad) + 2 and summary["decode_s"] > 0


def test_decode_process_killed_mid_shard_loses_nothing(worker, corpus):
    root, good, _ = corpus
    shard = _shard(root, 3, good[:12])
    ref = worker.process(shard, write=False)
    restarts = worker.pool.restarts
    children = _decode_pids(worker.pool)
    for pid in children:
        os.kill(pid, signal.SIGSTOP)  # images sent to them stay held
    result: list = []
    t = threading.Thread(target=lambda: result.append(worker.process(shard, write=False)))
    t.start()
    try:
        _until(lambda: worker.pool.holding, "a decode process to hold an image")
        victim = next(iter(worker.pool.holding.values()))[0]
        os.kill(victim, signal.SIGKILL)
    finally:
        for pid in children:
            try:
                os.kill(pid, signal.SIGCONT)
            except ProcessLookupError:
                pass
    t.join(DEADLINE_S)
    emb, err, _ = result[0]
    assert emb.to_pylist() == ref[0].to_pylist() and err.num_rows == 0
    after = set(_decode_pids(worker.pool))  # (other pools' processes may be there too: compare sets)
    assert worker.pool.restarts == restarts + 1 and victim not in after and len(after - set(children)) == 1


def _decode_pids(pool: DecodePool) -> list[int]:
    import psutil
    return [p.pid for p in psutil.Process().children() if "pipeline.decode.pool" in " ".join(p.cmdline())
            and p.status() != psutil.STATUS_ZOMBIE]


def test_image_that_kills_its_decode_process_is_one_decode_error_row(worker, corpus, monkeypatch):
    root, good, _ = corpus
    poison = good[2]
    monkeypatch.setenv(decode_pool.CRASH_ENV, hashlib.sha256((root / poison).read_bytes()).hexdigest())
    shard = _shard(root, 4, good[:8])
    ref_emb, _, _ = worker.process(_shard(root, 4, [i for i in good[:8] if i != poison]), write=False)
    pool = worker.pool
    worker.pool = DecodePool(2, pool.shape[0], **LIMITS)  # started with the fault in its environment
    try:
        emb, err, _ = worker.process(shard, write=False)
        restarts = worker.pool.restarts
    finally:
        worker.pool.close()
        worker.pool = pool
    assert err.select(["id", "stage", "error_type"]).to_pylist() == \
        [{"id": poison, "stage": "decode", "error_type": "DecoderCrashed"}]
    assert emb.to_pylist() == ref_emb.to_pylist()  # the same batches as without the poison image
    assert restarts == 2  # tried on a fresh process once, then given up


def test_no_more_than_two_shards_are_materialised(worker, corpus, recording):
    root, good, _ = corpus
    shards = [_shard(root, 10 + i, good[4 * i:4 * i + 4]) for i in range(4)]
    gate = threading.Event()
    rec = recording(gate)
    seq = worker.sequencer
    peak_before = seq.peak_active
    assert peak_before <= MATERIALISED
    out: list = []
    t = threading.Thread(target=lambda: out.extend(_in_threads(worker.process, [(s, False) for s in shards])))
    base = seq._next
    t.start()
    _until(lambda: rec.entered.is_set() and seq._next == base + 4, "every call to take its ticket")
    assert seq.active == MATERIALISED  # the first in the model, the second decoding, two waiting
    assert worker.pool.free_slots > 0  # the ring was sized for both: neither can starve the other
    gate.set()
    t.join(DEADLINE_S)
    assert seq.peak_active == MATERIALISED and seq.active == 0
    assert [e.column("id").to_pylist() for e, _, _ in out] == [s.ids for s in shards]


def test_driver_sequence_numbers_order_the_model_whatever_the_arrival(worker, corpus, recording):
    """Ray's threads may start two calls in either order; with the driver's ``seq`` the model still
    serves them in submission order (so the shard in the model is the oldest in flight)."""
    from pipeline.run.worker import ShardSequencer
    root, good, _ = corpus
    a, b = _shard(root, 20, good[:5]), _shard(root, 21, good[5:10])
    rec = recording()
    seq, worker.sequencer = worker.sequencer, ShardSequencer()
    try:
        out: dict = {}
        tb = threading.Thread(target=lambda: out.update(b=worker.process(b, False, 1)), name="second")
        tb.start()
        _until(lambda: worker.sequencer.active == 1, "the second call to be admitted")
        assert not rec.calls  # decoding ahead, but not in the model before the first
        ta = threading.Thread(target=lambda: out.update(a=worker.process(a, False, 0)), name="first")
        ta.start()
        ta.join(DEADLINE_S)
        tb.join(DEADLINE_S)
    finally:
        worker.sequencer = seq
    tickets = [t for t, _ in rec.calls]
    assert tickets == [0, 0, 1, 1]  # a's two batches (seq 0), then b's, though b arrived first
    assert out["a"][0].column("id").to_pylist() == a.ids and out["b"][0].column("id").to_pylist() == b.ids
