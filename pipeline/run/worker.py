"""A stream of shards, end to end: reader -> decoder -> mapper -> writer.  Ray wraps :class:`ShardWorker`.

The worker holds the model for its whole life (loaded once) and works through a continuous stream
of shards: Ray runs up to :attr:`ShardWorker.MAX_CONCURRENCY` ``process`` calls at once (threads),
and the driver keeps that many shards in flight per actor.  Per shard:

1. *admission*: at most :data:`MATERIALISED` shards are read, decoded or embedded at a time, in
   arrival order (:class:`ShardSequencer`); a further call waits before it reads anything;
2. *read and decode*, ahead of the model: encoded bytes from :func:`pipeline.input.reader.fetch_shard`
   (threads), decoded into uint8 crops by a pool of decode processes
   (:class:`pipeline.decode.pool.DecodePool`, shared by the shards), or on a GPU node by its
   decode engines (hardware JPEG decoder, nvJPEG, decode processes) balanced by measured rate
   (:mod:`pipeline.decode.gpu`), or, for mappers that need the whole image (the dense descriptor),
   by the reader's threads (:func:`pipeline.input.reader.read_shard`);
3. *model*, in order: a shard's batches go to the model only once every earlier shard's are done,
   so the next shard is decoded while this one is in the model and the model sees one unbroken
   stream of batches across shard boundaries;
4. *write*, off the model's path: the shard's tables go to a background writer (bounded queue);
   ``process`` returns its summary once the files are committed (errors file first, the
   embeddings file, the commit marker, last).

Rows are kept as per-batch arrays (:class:`pipeline.output.writer.ShardRows`), so a shard costs no
Python work per image beyond its bookkeeping lists.
"""

from __future__ import annotations

import datetime as dt
import logging
import os
import platform
import socket
import threading
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Optional

import pyarrow as pa
import torch

from .. import __version__
from ..config import Config
from ..decode.pool import DecodePool
from ..decode.preprocess import CROP, DESCRIPTION as PREPROCESSING, RESIZE, Batch, Decoded, normalize_batch
from ..errors import ItemError
from ..input.plan import Shard
from ..input.reader import Failed, StageTimes, fetch_shard, read_shard
from ..input.storage import FileSystems
from ..model.batch_size import default_batch_size
from ..model.build import make_mapper
from ..model.mapper import Mapper
from ..output.writer import BackgroundWriter, ShardRows, embeddings_schema, embeddings_table, errors_table

log = logging.getLogger(__name__)

# Test-only fault injection (tests/test_faults.py), read from the actor's environment: a worker
# whose model reaches the CRASH id exits abruptly, like a model or driver that faults on an image (a
# crashing decoder is contained by the decode processes); one that reads the HANG id blocks
# forever, like a wedged read, until the driver's shard timeout kills it.  The crash fires on the
# model's turn, so with two shards in flight it is the shard in the model (the oldest) that dies.
CRASH_ENV = "VGG_PIPELINE_FAULT_CRASH_ID"
HANG_ENV = "VGG_PIPELINE_FAULT_HANG_ID"

MATERIALISED = 2      # shards read, decoded or embedded at once per actor: the one in the model + the next
WRITE_QUEUE = 2       # finished shards waiting for the writer, beyond which a finished shard waits
MAX_DECODE_PROCESSES = 32


def assigned_cpus() -> Optional[float]:
    """The CPUs Ray reserved for this process (an actor's ``num_cpus``), or None outside a Ray
    worker (the driver, a test): on a multi-GPU node ``os.cpu_count()`` is every actor's node, not
    its share."""
    try:
        import ray
    except ImportError:
        return None
    if not ray.is_initialized():
        return None
    try:
        cpus = ray.get_runtime_context().get_assigned_resources().get("CPU")
    except AssertionError:  # Ray asserts the calling process is a worker, not the driver
        return None
    return float(cpus) if cpus else None


def decode_processes(decode_threads: Optional[int], cpus: Optional[float]) -> int:
    """CPU decode processes of one actor: ``runtime.decode_threads`` if set, else one per CPU it
    was given (``cpus``; the machine's count when unknown), at most :data:`MAX_DECODE_PROCESSES`."""
    if decode_threads:
        return decode_threads
    return max(1, min(MAX_DECODE_PROCESSES, int(cpus or os.cpu_count() or 2)))


def uses_gpu_decode(decode: str, mapper: Mapper) -> bool:
    """JPEGs decoded with nvJPEG: ``runtime.decode`` auto or gpu, a CUDA mapper that takes 224x224
    crops (the dense descriptor needs whole images, decoded on the CPU)."""
    if decode == "cpu" or mapper.device.type != "cuda" or mapper.needs_image:
        if decode == "gpu":
            log.warning("runtime.decode=gpu needs runtime.device=cuda and descriptor fc7; decoding on the CPU")
        return False
    return True


class ShardSequencer:
    """Orders the shards of one actor: admission (at most ``depth`` at once) and model turns.

    Each ``process`` call takes a ticket on entry: the ``seq`` the driver numbered its calls to this
    actor with (0, 1, 2, ... in submission order), or else the order of arrival, which Ray's
    threads may swap for calls submitted together.  ``admit`` blocks while ``depth`` earlier
    tickets are unfinished; ``wait_turn`` blocks until every earlier ticket is finished, so batches
    reach the model shard after shard; ``finish`` (always called, also on errors) passes the turn on.
    With submission order kept, the shard in the model is the oldest one the driver has in flight:
    the one to blame if the actor dies.
    """

    def __init__(self, depth: int = MATERIALISED) -> None:
        self.depth = depth
        self._cond = threading.Condition()
        self._next = 0                 # the next ticket to hand out
        self._served = 0               # the oldest unfinished ticket: it has the model
        self._finished: set[int] = set()
        self.turn_started = time.perf_counter()   # when the current ticket got the model
        self.active = 0                # admitted, unfinished
        self.peak_active = 0

    def admit(self, seq: Optional[int] = None) -> int:
        with self._cond:
            ticket = self._next if seq is None else seq
            self._next = max(self._next, ticket) + 1
            self._cond.wait_for(lambda: ticket < self._served + self.depth)
            self.active += 1
            self.peak_active = max(self.peak_active, self.active)
            return ticket

    def wait_turn(self, ticket: int) -> float:
        """Block until ``ticket`` has the model; returns when its turn started (perf_counter)."""
        with self._cond:
            self._cond.wait_for(lambda: self._served == ticket)
            return self.turn_started

    def finish(self, ticket: int) -> None:
        with self._cond:
            self.active -= 1
            self._finished.add(ticket)
            while self._served in self._finished:
                self._finished.discard(self._served)
                self._served += 1
                self.turn_started = time.perf_counter()
            self._cond.notify_all()


@dataclass
class _ShardState:
    """What one ``process`` call collects while its shard streams through."""

    shard: Shard
    arrived: float = field(default_factory=time.perf_counter)   # when process() took it
    times: StageTimes = field(default_factory=StageTimes)
    rows: ShardRows = field(default_factory=ShardRows)
    errors: list[tuple[int, ItemError]] = field(default_factory=list)   # (plan position, why)
    model_s: float = 0.0
    wait_s: float = 0.0
    engines: dict[str, list[float]] = field(default_factory=dict)      # GPU decode engine -> [images, busy s]
    compiled: int = 0       # images the torch.compile'd model embedded (the rest ran eager)


class _Serialized:
    """A GPU decoder shared by the in-flight shards: one ``decode`` call at a time."""

    def __init__(self, decoder: Any, lock: threading.Lock) -> None:
        self.decoder, self.lock = decoder, lock

    def decode(self, items: list[tuple[int, bytes]]) -> Any:
        with self.lock:
            return self.decoder.decode(items)


class ShardWorker:
    """Processes shards; ``process(shard)`` writes its files and returns a summary dict.

    Thread-safe: Ray calls ``process`` from up to :attr:`MAX_CONCURRENCY` threads.
    """

    # Ray runs this many ``process`` calls of one actor at once (threads): the driver keeps as
    # many shards in flight per actor.  Two: one in the model while the next is read and decoded
    # (a finished shard's write overlaps the next one's model, see docs/benchmarks.md).
    MAX_CONCURRENCY = 2

    def __init__(self, cfg: Config, output: str, storage_options: Optional[dict] = None,
                 num_threads: Optional[int] = None, job: Optional[dict] = None) -> None:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        self.cfg, self.output, self.storage_options = cfg, output, storage_options
        self.job = job  # the driver's job identity (input + model fingerprint), kept for resume checks
        self.mapper: Mapper = make_mapper(cfg, storage_options, num_threads)
        self.fsys = FileSystems(storage_options, read_concurrency=cfg.input.read_concurrency)
        rt, inp = cfg.runtime, cfg.input
        self.batch_size = rt.batch_size or default_batch_size(self.mapper, cfg.model.arch)
        cpus = num_threads or assigned_cpus()  # this actor's share of the node, not the node
        self.threads = rt.decode_threads or max(2, min(16, int(cpus or os.cpu_count() or 2)))
        # Decoded images in flight per shard: enough to keep every decode process busy.
        self.window = 2 * self.batch_size
        self.gpu_decoder = None
        self.pool: Optional[DecodePool] = None
        # The model's cores decode too: the decode processes sleep while the model is the
        # bottleneck (they only run a bounded window ahead of it), so no core is set aside.
        processes = decode_processes(rt.decode_threads, cpus)
        decode_timeout_s = min(rt.shard_timeout_s / 2, 120.0)
        if uses_gpu_decode(rt.decode, self.mapper):
            from ..decode.gpu import GpuBatchDecoder
            # Every engine of the node (runtime.decode_engines; None = auto), balanced by measured
            # rate; the cpu engine's ring holds one batch (one decode call at a time).
            self.gpu_decoder = GpuBatchDecoder(self.mapper.device, max_pixels=inp.max_pixels,
                                               max_bytes=inp.max_bytes, cpu_threads=self.threads,
                                               engines=rt.decode_engines, cpu_processes=processes,
                                               cpu_slots=self.batch_size, decode_timeout_s=decode_timeout_s)
        elif not self.mapper.needs_image:
            self.window = max(self.window, 2 * processes)
            self.pool = DecodePool(processes, MATERIALISED * (self.window + self.batch_size),
                                   max_pixels=inp.max_pixels, max_bytes=inp.max_bytes, resize=RESIZE,
                                   crop=CROP, min_side=max(RESIZE, self.mapper.min_side),
                                   timeout_s=decode_timeout_s)
        self._gpu_lock = threading.Lock()
        # One thread runs the model for every shard: OpenMP keeps a team of worker threads per
        # calling thread, so a model called from two threads in turn would keep two teams spinning
        # (measured: ~12 % more CPU per image on 2 cores).
        self._model = ThreadPoolExecutor(max_workers=1, thread_name_prefix="model")
        self.sequencer = ShardSequencer(MATERIALISED)
        self.writer = BackgroundWriter(WRITE_QUEUE)
        self.schema = embeddings_schema(cfg.output.fc7_dtype, cfg.output.top_k,
                                        columns=self.mapper.columns)
        # Outputs are kept in their stored dtype (fc7 float16 by default), batch by batch: half the
        # memory per shard, and the conversion runs on cache-sized arrays.
        self._stored = {f.name: f.type.value_type.to_pandas_dtype() for f in self.schema
                        if pa.types.is_fixed_size_list(f.type)}

    def ready(self) -> dict:
        w = self.mapper.weights
        return {"host": socket.gethostname(), "pid": os.getpid(), "device": str(self.mapper.device),
                "precision": self.mapper.precision, "weights": w.name, "weights_sha256": w.sha256,
                "batch_size": self.batch_size,
                "decode": "gpu" if self.gpu_decoder else "cpu",
                "decode_engines": self.decode_engines(),
                "decode_processes": self.pool.processes if self.pool else 0,
                "compile": self.cfg.runtime.compile}

    def decode_engines(self) -> list[str]:
        """What decodes this worker's images: the GPU decoder's engines, the decode processes
        (``cpu``), or none (the reader's threads, for mappers that need whole images)."""
        if self.gpu_decoder is not None:
            return list(self.gpu_decoder.engine_names)
        return ["cpu"] if self.pool is not None else []

    def close(self) -> None:
        """Stop the decode processes and the writer (an actor that dies takes them with it)."""
        if self.pool is not None:
            self.pool.close()
        if self.gpu_decoder is not None:
            self.gpu_decoder.close()
        self.writer.close()
        self._model.shutdown(wait=True)

    def metadata(self, shard: Shard, compiled_rows: int = 0) -> dict:
        import pyarrow
        import torchvision
        w = self.mapper.weights
        return {
            "model": {**self.cfg.model.identity(), "layer": "fc7 (after relu7)"},
            "weights": {"spec": w.spec,
                        "name": w.name, "sha256": w.sha256, "random": w.is_random},
            "preprocessing": PREPROCESSING,
            "dtypes": {"fc7": self.cfg.output.fc7_dtype, "logits": "float32",
                       "compute": self.mapper.precision, "device": self.mapper.device.type},
            # Compiled and eager agree within the precision's tolerance: not part of the fingerprint.
            "compile": {"setting": self.cfg.runtime.compile, "rows": compiled_rows},
            "versions": {"vgg_pipeline": __version__, "torch": torch.__version__,
                         "torchvision": torchvision.__version__, "pyarrow": pyarrow.__version__,
                         "python": platform.python_version()},
            "shard": shard.index,
            "shard_digest": shard.digest,
            "job": self.job,
            "created_at": dt.datetime.now(dt.timezone.utc).isoformat(),
        }

    # -- one shard
    def process(self, shard: Shard, write: bool = True, seq: Optional[int] = None) -> Any:
        """Turn ``shard`` into rows; write its files (``write=True``) or return the tables.

        ``seq``: this call's number among the driver's calls to this actor (0, 1, 2, ...), so the
        model serves shards in submission order (see :class:`ShardSequencer`).
        """
        ticket = self.sequencer.admit(seq)
        t_start = time.perf_counter()
        st = _ShardState(shard)
        try:
            st.errors = [(p, ItemError("list", "DuplicateId", "id already listed earlier in the input"))
                         for p, d in enumerate(shard.duplicate) if d]
            self._stream(st, ticket)
        finally:
            self.sequencer.finish(ticket)  # the next shard's batches may go to the model now

        meta = self.metadata(shard, st.compiled)
        st.errors.sort(key=lambda e: e[0])
        errors = [(shard.ids[p], shard.uris[p], e.stage, e.error_type, e.message) for p, e in st.errors]
        emb, err = embeddings_table(st.rows, self.schema, meta), errors_table(errors, meta)
        summary = {"shard": shard.index, "rows": emb.num_rows, "errors": err.num_rows,
                   "read_s": round(st.times.read_s, 3), "decode_s": round(st.times.decode_s, 3),
                   "model_s": round(st.model_s, 3), "wait_s": round(st.wait_s, 3), "compiled": st.compiled,
                   "host": socket.gethostname(), "pid": os.getpid()}
        if st.engines:
            summary["engines"] = {e: {"images": int(n), "busy_s": round(s, 3)} for e, (n, s) in st.engines.items()}
        if not write:
            summary["wall_s"] = round(time.perf_counter() - t_start, 3)
            return emb, err, summary
        summary["write_s"] = round(self.writer.submit(self.output, shard.index, emb, err,
                                                      self.storage_options).result(), 3)
        summary["wall_s"] = round(time.perf_counter() - t_start, 3)
        log.info("shard done %s", summary)
        return summary

    def _stream(self, st: _ShardState, ticket: int) -> None:
        """Read and decode ``st.shard`` ahead of the model; embed its batches on its model turn."""
        shard = st.shard
        skip = {p for p, _ in st.errors}
        before = self._hang_hook(shard)
        crash_id = os.environ.get(CRASH_ENV)
        if self.gpu_decoder is not None:
            batches = self._gpu_batches(st, skip, before)
        elif self.pool is not None:
            batches = self._pool_batches(st, skip, before)
        else:
            batches = self._reader_batches(st, skip, before)
        turn_started: Optional[float] = None
        try:
            for batch in batches:
                if turn_started is None:
                    # An idle model before this shard arrived waited for the driver, not for input.
                    turn_started = max(self.sequencer.wait_turn(ticket), st.arrived)
                if crash_id and any(shard.ids[p] == crash_id for p in batch.positions):
                    os._exit(17)
                t0 = time.perf_counter()
                # Only the model thread moves the counter, and only this shard has the model now.
                compiled0 = self.mapper.compiled_images
                for part, out in self._model.submit(self._embed, batch).result():
                    if isinstance(out, ItemError):
                        st.errors.extend((p, out) for p in part.positions)
                    else:
                        out = {k: v.astype(self._stored.get(k, v.dtype), copy=False) for k, v in out.items()}
                        st.rows.add([shard.ids[p] for p in part.positions],
                                    [shard.uris[p] for p in part.positions], part.widths, part.heights, out)
                st.model_s += time.perf_counter() - t0
                st.compiled += self.mapper.compiled_images - compiled0
        finally:
            batches.close()  # a failed shard stops its readers and frees its decode slots
        if turn_started is not None:
            # The model's idle time while this shard had it: waiting for input, not for compute.
            st.wait_s = max(0.0, time.perf_counter() - turn_started - st.model_s)

    def _hang_hook(self, shard: Shard) -> Optional[Callable[[int], None]]:
        hang_id = os.environ.get(HANG_ENV)
        if not hang_id:
            return None

        def before(pos: int) -> None:
            if shard.ids[pos] == hang_id:
                while True:
                    time.sleep(3600)
        return before

    # -- the three decode paths, each a generator of Batch; failures go to st.errors
    def _fetched(self, st: _ShardState, skip: set[int], before: Optional[Callable[[int], None]]
                 ) -> Iterator[tuple[int, bytes]]:
        """The shard's encoded images in plan order; read failures go to ``st.errors``."""
        for got in fetch_shard(st.shard.uris, skip, self.fsys, max_bytes=self.cfg.input.max_bytes,
                               threads=self.threads, prefetch=self.window, times=st.times,
                               before_item=before):
            if isinstance(got, Failed):
                st.errors.append((got.pos, got.error))
            else:
                yield got.pos, got.data

    def _pool_batches(self, st: _ShardState, skip: set[int], before: Optional[Callable[[int], None]]
                      ) -> Iterator[Batch]:
        """Decode processes: ``window`` images in flight, crops taken out of the ring per batch."""
        pool = self.pool
        pending: deque[tuple[int, Future]] = deque()
        positions: list[int] = []
        slots: list[int] = []
        widths: list[int] = []
        heights: list[int] = []

        def settle() -> Optional[Batch]:
            pos, fut = pending.popleft()
            res = fut.result()
            if isinstance(res, ItemError):
                st.errors.append((pos, res))
                return None
            st.times.add(0.0, res.decode_s)
            positions.append(pos)
            slots.append(res.slot)
            widths.append(res.width)
            heights.append(res.height)
            return cut() if len(positions) == self.batch_size else None

        def cut() -> Batch:
            pixels = normalize_batch(torch.from_numpy(pool.take(slots)))
            batch = Batch(positions.copy(), pixels, widths.copy(), heights.copy())
            for lst in (positions, slots, widths, heights):
                lst.clear()
            return batch

        try:
            for pos, data in self._fetched(st, skip, before):
                pending.append((pos, pool.submit(data)))
                while pending and (len(pending) > self.window or pending[0][1].done()):
                    batch = settle()
                    if batch is not None:
                        yield batch
            while pending:
                batch = settle()
                if batch is not None:
                    yield batch
            if positions:
                yield cut()
        finally:  # stopped early (an error, a closed generator): give the slots back
            pool.release(slots)
            for _, fut in pending:
                try:
                    res = fut.result()
                except Exception:  # noqa: BLE001 - a broken pool: the error that stopped us is raised
                    continue
                if not isinstance(res, ItemError):
                    pool.release([res.slot])

    def _gpu_batches(self, st: _ShardState, skip: set[int], before: Optional[Callable[[int], None]]
                     ) -> Iterator[Batch]:
        """The GPU decode engines one batch ahead of the model (:func:`pipeline.decode.gpu.decode_ahead`), the
        decoder shared by the in-flight shards one call at a time."""
        from ..decode.gpu import decode_ahead

        def encoded() -> Iterator[list[tuple[int, bytes]]]:
            batch: list[tuple[int, bytes]] = []
            for item in self._fetched(st, skip, before):
                batch.append(item)
                if len(batch) == self.batch_size:
                    yield batch
                    batch = []
            if batch:
                yield batch

        for gb in decode_ahead(encoded(), _Serialized(self.gpu_decoder, self._gpu_lock), depth=2):
            st.times.add(0.0, gb.decode_s)
            st.errors.extend(gb.failures)
            for name, (n, busy_s) in gb.engines.items():
                acc = st.engines.setdefault(name, [0, 0.0])
                acc[0] += n
                acc[1] += busy_s
            if gb.positions:
                yield Batch(list(gb.positions), gb.normalized(), [w for w, _ in gb.sizes],
                            [h for _, h in gb.sizes])

    def _reader_batches(self, st: _ShardState, skip: set[int], before: Optional[Callable[[int], None]]
                        ) -> Iterator[Batch]:
        """The reader's threads, keeping whole images for mappers that need them (PIL images do
        not cross processes cheaply)."""
        inp = self.cfg.input
        items: list[Decoded] = []
        for res in read_shard(st.shard.uris, skip, self.fsys, max_pixels=inp.max_pixels,
                              max_bytes=inp.max_bytes, threads=self.threads, prefetch=self.window,
                              keep_image=self.mapper.needs_image, min_side=max(RESIZE, self.mapper.min_side),
                              times=st.times, before_item=before):
            if isinstance(res, Failed):
                st.errors.append((res.pos, res.error))
                continue
            items.append(res)
            if len(items) == self.batch_size:
                yield Batch.of(items)
                items = []
        if items:
            yield Batch.of(items)

    def _embed(self, batch: Batch) -> list[tuple[Batch, Any]]:
        """Embed a batch; if it fails, retry image by image so only the culprit becomes an error row."""
        try:
            return [(batch, self.mapper.embed(batch))]
        except Exception as exc:  # noqa: BLE001 - one image must not sink its batch
            if len(batch) == 1:
                return [(batch, ItemError("model", type(exc).__name__,
                                          (str(exc).splitlines() or [type(exc).__name__])[0][:200]))]
            log.warning("batch failed (%s); retrying its %d images one by one", exc, len(batch))
            return [pair for j in range(len(batch)) for pair in self._embed(batch.select([j]))]
