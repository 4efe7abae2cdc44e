"""GPU decoding for CUDA workers: JPEGs shared among the node's decode engines, everything else on the CPU.

:class:`GpuBatchDecoder` turns a batch of ``(pos, encoded bytes)`` into a uint8
``(N, 3, 224, 224)`` tensor on the device, the upright ``(width, height)`` of every image, and an
``ItemError`` for every image that cannot be decoded — the same outcome as the CPU reader
(:mod:`pipeline.input.reader`), within the docs/design.md §2 tolerance (fc7 cosine >= 0.999).

Routing is decided from the header alone (:func:`pipeline.decode.jpeg.route`: a marker scan, no
pixels decoded, no CUDA needed, a few microseconds where PIL's ``Image.open`` costs ~100):

* to a GPU engine: 8-bit Huffman-coded baseline JPEGs (and the first frame of a multi-picture
  JPEG) in YCbCr or greyscale, ending with an end-of-image marker, within ``max_pixels`` and
  ``gpu_max_pixels``;
* to the CPU (``decode_with_size`` + the PIL resize of the recipe, per image, on a thread pool):
  everything else, so every error row is exactly the CPU reader's — other formats; CMYK/YCCK and
  Adobe "RGB" JPEGs (nvJPEG would get the colours wrong); progressive JPEGs (nvJPEG decodes them
  one by one with host-side Huffman decoding behind a process-wide lock, where a thread pool with
  libjpeg's DCT scaling runs in parallel); files without an EOI marker (truncated: PIL makes them
  the usual ``TruncatedImage`` error row where nvJPEG would fill grey); images over
  ``max_pixels`` (refused by PIL from the header) or ``gpu_max_pixels`` (decoded at a reduced
  DCT scale); anything whose header or EXIF orientation the scan is not sure about.

The GPU-able JPEGs of a batch are shared among the engines of the node
(:mod:`pipeline.decode.engines`): ``hw`` (the card's hardware JPEG decoder through nvImageCodec,
the optional ``[gpu]`` extra, where the card has one), ``cuda`` (nvJPEG's CUDA backend) and
``cpu`` (the decode processes of :class:`pipeline.decode.pool.DecodePool`).  They run the batch
concurrently, each its share, set by :class:`pipeline.decode.balance.Balancer` from the rates
measured on the previous batches so they finish together (never predicted slower than the fastest
engine alone).  The CPU engine is processes, not threads of this process: sending a share of plain
JPEGs to 16 PIL *threads* made an H200 job slower (1,183 against 2,056 img/s end to end) because
they competed with the reader threads for the GIL (reading took 107 thread-seconds instead of 39,
docs/benchmarks.md).  ``runtime.decode_engines`` picks engines one by one for benchmarks.

A JPEG an engine rejects is retried on the ``cuda`` engine (a chunk nvJPEG refuses is retried
image by image), then on the CPU, so one bad file never costs its batch; an engine that fails
outright is dropped and the others take its images.  EXIF orientation is read from the header and
applied to the decoded tensor (:func:`pipeline.decode.jpeg.orient`) by every GPU engine.  Resize
and crop run on the device (:func:`pipeline.decode.preprocess.resize_crop_uint8`); CPU-decoded
crops travel through pinned memory.  Each GPU engine runs on a CUDA stream of its own and the batch
is assembled on the decoder's, so a batch can be decoded (:func:`decode_ahead`, one background
thread) while the model runs the previous one on the default stream.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
import warnings
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Iterable, Iterator, Optional, Sequence, Union

import torch
import torchvision.transforms.v2.functional as F
from PIL import Image

from .balance import Balancer
from .cpu import decode_with_size
from .engines import (CHUNK_PIXELS, CudaEngine, Engine, EngineOutput, PoolEngine, Routed, hw_engine,
                      on_stream, pinned_batch, probe_item, resolve)
from ..errors import ItemError
from .jpeg import GPU_MAX_PIXELS, JpegHeader, orient, parse_jpeg_header, route
from .pool import DECODE_TIMEOUT_S, DecodePool
from .preprocess import CROP, RESIZE, Decoded, normalize_batch

log = logging.getLogger(__name__)

# torchvision 0.29 deprecates its image codecs in favour of torchcodec; decode_jpeg still works and
# is what docs/design.md §4 names.  Silence that one warning, not the category.
warnings.filterwarnings("ignore", message=r".*image decoding and encoding capabilities of TorchVision.*")

# Re-exported: the routing rules are part of this module's contract (docs/design.md §4).
__all__ = ["CHUNK_PIXELS", "GPU_MAX_PIXELS", "GpuBatch", "GpuBatchDecoder", "JpegHeader", "cpu_decode_uint8",
           "decode_ahead", "orient", "parse_jpeg_header", "pil_crop_uint8", "route"]


# -- the CPU path of a GPU batch ------------------------------------------------------------------


def pil_crop_uint8(img: Image.Image) -> torch.Tensor:
    """RGB PIL image -> uint8 ``(3, 224, 224)``: the geometry of ``preprocess_pil``, before scaling.

    ``normalize_batch`` of the result equals ``preprocess_pil(img)`` (tested), so CPU-decoded
    images in a GPU batch are bit-for-bit what the CPU reader would feed the model.
    """
    img = F.resize(img, [RESIZE], interpolation=F.InterpolationMode.BILINEAR, antialias=True)
    return F.pil_to_tensor(F.center_crop(img, [CROP, CROP]))


def cpu_decode_uint8(data: bytes, *, max_pixels: int, max_bytes: int) -> tuple[torch.Tensor, tuple[int, int]]:
    """The CPU path for one image: uint8 crop and upright size; raises ``ItemError(stage="decode")``."""
    try:
        img, size = decode_with_size(data, max_pixels=max_pixels, max_bytes=max_bytes, min_side=RESIZE)
        return pil_crop_uint8(img), size
    except ItemError:
        raise
    except Exception as exc:  # noqa: BLE001 - a decoder bug must not kill the batch
        raise ItemError("decode", type(exc).__name__, str(exc)[:200]) from exc


# -- the decoder ------------------------------------------------------------------------------------


@dataclass
class GpuBatch:
    """A decoded batch: ``pixels[j]`` is the image at plan position ``positions[j]``."""

    positions: list[int]
    pixels: torch.Tensor                         # uint8 (N, 3, 224, 224) on the device
    sizes: list[tuple[int, int]]                 # upright (width, height), full resolution
    failures: list[tuple[int, ItemError]] = field(default_factory=list)
    ready: Optional[torch.cuda.Event] = None     # recorded on the decoder's stream
    decode_s: float = 0.0                        # wall time spent making this batch
    gpu_decoded: int = 0                         # how many a GPU engine decoded (hw, cuda)
    engines: dict[str, tuple[int, float]] = field(default_factory=dict)  # engine -> (decoded, busy s) of its share

    def normalized(self) -> torch.Tensor:
        """float32 normalised batch for the model, usable on the caller's current stream."""
        if self.ready is not None:
            stream = torch.cuda.current_stream(self.pixels.device)
            stream.wait_event(self.ready)
            self.pixels.record_stream(stream)  # the allocator must not recycle it under the model
        return normalize_batch(self.pixels)

    def to_decoded(self) -> list[Decoded]:
        """The batch as the reader's ``Decoded`` items (pixels are views into one device batch)."""
        if not self.positions:
            return []
        x = self.normalized()
        return [Decoded(pos, x[j], w, h) for j, (pos, (w, h)) in enumerate(zip(self.positions, self.sizes))]


class GpuBatchDecoder:
    """Decodes batches of encoded images into device tensors; see the module docstring.

    ``engines``: engine names (``hw``, ``cuda``, ``cpu``; ``None`` = every engine this node has),
    or engine objects (tests run the assembly with CPU tensors that way, on any ``device``).  The
    default, ``cuda`` alone, is the nvJPEG path.  ``cpu_processes``: decode processes of the
    ``cpu`` engine (0: no ``cpu`` engine).
    Thread-safe for one caller at a time (``decode_ahead`` runs it in one background thread).
    """

    def __init__(self, device: Union[str, torch.device] = "cuda", *, max_pixels: int = 100_000_000,
                 max_bytes: int = 100_000_000, cpu_threads: int = 4, gpu_max_pixels: int = GPU_MAX_PIXELS,
                 chunk_pixels: int = CHUNK_PIXELS, progressive_on_gpu: bool = False,
                 engines: Optional[Sequence[Union[str, Engine]]] = ("cuda",), cpu_processes: int = 0,
                 cpu_slots: int = 256, decode_timeout_s: float = DECODE_TIMEOUT_S,
                 balancer: Optional[Balancer] = None) -> None:
        self.device = torch.device(device)
        built = engines is None or all(isinstance(e, str) for e in engines)
        if not built and any(isinstance(e, str) for e in engines):
            raise TypeError("engines: names or engine objects, not both")
        if built and self.device.type != "cuda":
            raise ValueError(f"GpuBatchDecoder needs a CUDA device, got {self.device}")
        if self.device.type == "cuda" and self.device.index is None:
            self.device = torch.device("cuda", torch.cuda.current_device())
        self.max_pixels, self.max_bytes = max_pixels, max_bytes
        self.gpu_max_pixels, self.progressive_on_gpu = gpu_max_pixels, progressive_on_gpu
        self.stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None
        self.pool = ThreadPoolExecutor(max_workers=max(1, cpu_threads), thread_name_prefix="cpu-decode")
        if built:
            self.engines = self._build(engines, chunk_pixels, cpu_processes, cpu_slots, decode_timeout_s)
        else:
            self.engines = list(engines)
        # Rejections are retried on nvJPEG: the cuda engine if balanced, else one of its own.
        cuda = [e for e in self.engines if e.name == "cuda"]
        self._own_fallback = not cuda and self.device.type == "cuda"
        self.fallback: Optional[Engine] = cuda[0] if cuda else (
            CudaEngine(self.device, chunk_pixels) if self._own_fallback else None)
        self.balancer = balancer or Balancer([e.name for e in self.engines])
        self._runner = ThreadPoolExecutor(max_workers=len(self.engines), thread_name_prefix="decode-engine")
        log.info("decode engines on %s: %s", self.device, ", ".join(e.name for e in self.engines))

    def _build(self, names: Optional[Sequence[str]], chunk_pixels: int, cpu_processes: int, cpu_slots: int,
               decode_timeout_s: float) -> list[Engine]:
        hw = hw_engine(self.device, chunk_pixels) if names is None or "hw" in names else None
        out: list[Engine] = []
        for name in resolve(names, hw_usable=hw is not None, cpu_processes=cpu_processes):
            if name == "hw":
                out.append(hw)
            elif name == "cuda":
                cuda = CudaEngine(self.device, chunk_pixels)
                cuda.decode([probe_item()])  # nvJPEG's handles and kernels: not in the first measured rate
                out.append(cuda)
            else:
                # min_side RESIZE: the draft scale of cpu_decode_uint8, so its crops are the CPU path's.
                pool = DecodePool(cpu_processes, cpu_slots, max_pixels=self.max_pixels, max_bytes=self.max_bytes,
                                  resize=RESIZE, crop=CROP, min_side=RESIZE, timeout_s=decode_timeout_s)
                out.append(PoolEngine(self.device, pool))
        return out

    @property
    def engine_names(self) -> list[str]:
        return [e.name for e in self.engines]

    def engine_stats(self) -> dict[str, dict]:
        """Per engine: images decoded, busy seconds, and the rate the balancer now uses (img/s)."""
        return {e: {"images": st.images, "busy_s": round(st.busy_s, 3),
                    "img_per_s": round(st.rate, 1) if st.rate else None}
                for e, st in self.balancer.state.items()}

    def close(self) -> None:
        self._runner.shutdown(wait=True)
        self.pool.shutdown(wait=True)
        for engine in self.engines + ([self.fallback] if self._own_fallback else []):
            engine.close()

    def decode(self, items: list[tuple[int, bytes]]) -> GpuBatch:
        """Decode ``items`` (``(pos, bytes)``); results keep the input order, failures aside."""
        t0 = time.perf_counter()
        gpu: list[Routed] = []
        cpu: list[tuple[int, bytes]] = []
        for pos, data in items:
            header = route(data, max_pixels=self.max_pixels, max_bytes=self.max_bytes,
                           gpu_max_pixels=self.gpu_max_pixels, progressive_on_gpu=self.progressive_on_gpu)
            if header is None:
                cpu.append((pos, data))
            else:
                gpu.append((pos, data, header))

        # CPU images decode on the pool while the engines work through the JPEGs.
        futures = {pos: self._submit_cpu(data) for pos, data in cpu}
        crops: dict[int, torch.Tensor] = {}
        sizes: dict[int, tuple[int, int]] = {}
        failures: dict[int, ItemError] = {}
        retry: list[Routed] = []     # rejected by an engine other than the fallback: nvJPEG next
        to_cpu: list[Routed] = []    # rejected by nvJPEG: PIL decides
        stats: dict[str, tuple[int, float]] = {}
        gpu_decoded = 0
        for engine, out in self._run_engines(gpu, stats):
            gpu_decoded += len(out.crops) if engine.name != "cpu" else 0
            crops.update(out.crops)
            sizes.update(out.sizes)
            failures.update(out.failures)
            (to_cpu if engine is self.fallback else retry).extend(out.rejected)
        if retry and self.fallback is not None:
            try:
                out = self.fallback.decode(retry)
            except Exception as exc:  # noqa: BLE001 - PIL still decides every image
                log.error("nvJPEG retry failed (%s); CPU fallback for %d images", exc, len(retry))
                out = EngineOutput(rejected=retry)
            gpu_decoded += len(out.crops)
            crops.update(out.crops)
            sizes.update(out.sizes)
            failures.update(out.failures)
            to_cpu.extend(out.rejected)
        else:
            to_cpu.extend(retry)
        for pos, data, _ in to_cpu:
            futures[pos] = self._submit_cpu(data)  # no GPU engine could: PIL decides (image or error row)

        with on_stream(self.device, self.stream):
            host: dict[int, torch.Tensor] = {}
            for pos, fut in futures.items():
                try:
                    host[pos], sizes[pos] = fut.result()
                except ItemError as exc:
                    failures[pos] = exc
            if host:  # CPU crops: one pinned staging batch, copied asynchronously on this stream
                on_device = pinned_batch(list(host.values()), self.device)
                crops.update((pos, on_device[j]) for j, pos in enumerate(host))
            order = [pos for pos, _ in items if pos in sizes]
            if order:
                out_pixels = torch.stack([crops[pos] for pos in order])
            else:
                out_pixels = torch.empty((0, 3, CROP, CROP), dtype=torch.uint8, device=self.device)
            ready = None
            if self.stream is not None:
                ready = torch.cuda.Event()
                ready.record(self.stream)
        if ready is not None:
            ready.synchronize()  # only this (background) thread waits, and decode_s is the real cost
        return GpuBatch(order, out_pixels, [sizes[p] for p in order],
                        [(p, failures[p]) for p, _ in items if p in failures], ready,
                        time.perf_counter() - t0, gpu_decoded, stats)

    def _run_engines(self, gpu: list[Routed], stats: dict[str, tuple[int, float]]
                     ) -> list[tuple[Engine, EngineOutput]]:
        """Each engine its share of ``gpu``, all at once; rates go to the balancer, and an engine
        that fails outright is dropped (its share is rejected, for the fallback path)."""
        counts = self.balancer.split(len(gpu))
        running: list[tuple[Engine, list[Routed], Future]] = []
        start = 0
        for engine in list(self.engines):
            part = gpu[start:start + counts.get(engine.name, 0)]
            start += len(part)
            if part:
                running.append((engine, part, self._runner.submit(_timed, engine, part)))
        done = []
        for engine, part, fut in running:
            try:
                out, busy_s = fut.result()
            except Exception as exc:  # noqa: BLE001 - the other engines (and PIL) take its images
                if len(self.engines) == 1:
                    raise
                log.error("decode engine %s failed (%s); dropping it, the other engines take its images",
                          engine.name, exc)
                self._drop(engine)
                done.append((engine, EngineOutput(rejected=list(part))))
                continue
            # What it decoded (images or PIL's error rows), not what it handed back to the fallback.
            decoded = len(out.crops) + len(out.failures)
            self.balancer.record(engine.name, decoded, busy_s)
            stats[engine.name] = (decoded, busy_s)
            done.append((engine, out))
        return done

    def _drop(self, engine: Engine) -> None:
        self.engines.remove(engine)
        self.balancer.remove(engine.name)
        if engine is not self.fallback:
            try:
                engine.close()
            except Exception as exc:  # noqa: BLE001 - it already failed; closing is best effort
                log.warning("closing decode engine %s: %s", engine.name, exc)

    def _submit_cpu(self, data: bytes) -> Future:
        return self.pool.submit(cpu_decode_uint8, data, max_pixels=self.max_pixels, max_bytes=self.max_bytes)


def _timed(engine: Engine, part: list[Routed]) -> tuple[EngineOutput, float]:
    t0 = time.perf_counter()
    out = engine.decode(part)
    return out, time.perf_counter() - t0


def decode_ahead(batches: Iterable[list[tuple[int, bytes]]], decoder: GpuBatchDecoder,
                 depth: int = 1) -> Iterator[GpuBatch]:
    """``decoder.decode`` of each batch, computed ``depth`` batches ahead on a background thread.

    The model can then run batch k on the default stream while batch k+1 is fetched and decoded;
    an exception in the background thread is raised here, in order.
    """
    q: queue.Queue = queue.Queue(maxsize=max(1, depth))
    stop = threading.Event()
    done = object()

    def work() -> None:
        try:
            for batch in batches:
                if stop.is_set():
                    return
                _put(q, decoder.decode(batch), stop)
        except BaseException as exc:  # noqa: BLE001 - handed to the consumer
            _put(q, exc, stop)
            return
        _put(q, done, stop)

    thread = threading.Thread(target=work, name="gpu-decode", daemon=True)
    thread.start()
    try:
        while True:
            item = q.get()
            if item is done:
                return
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
        thread.join(timeout=60)


def _put(q: queue.Queue, item: object, stop: threading.Event) -> None:
    while not stop.is_set():
        try:
            q.put(item, timeout=0.1)
            return
        except queue.Full:
            continue
