"""The decode engines of a GPU node, each turning routed JPEGs into uint8 224x224 crops on the device.

An engine takes a list of routed items ``(pos, bytes, header)`` (:func:`pipeline.decode.jpeg.route`
said a GPU may decode them) and returns an :class:`EngineOutput`: a crop and the upright size of
every image it decoded, the items it *rejected* (they fall back: a GPU retry on ``cuda``, then the
CPU path decides the image or its error row) and, for the CPU engine only, final error rows.

* ``hw`` (:class:`HwEngine`): the dedicated JPEG decode engines of A100/H100/H200-class cards,
  through NVIDIA's nvImageCodec (the optional ``[gpu]`` extra, ``nvidia.nvimgcodec``) with only
  its hardware backend allowed.  Present only when the module imports *and* decodes a probe JPEG on
  this device: elsewhere (no extra, a card without the engine, CPU-only machines) it is absent and
  nothing here needs the module.
* ``cuda`` (:class:`CudaEngine`): nvJPEG's CUDA backend through ``torchvision.io.decode_jpeg``
  on a list, in pixel-bounded chunks; a chunk nvJPEG refuses is retried image by image.
* ``cpu`` (:class:`PoolEngine`): the decode processes of :class:`pipeline.decode.pool.DecodePool`
  (PIL, outside this process' GIL, crash/timeout containment); crops come back through its
  shared-memory ring and reach the device through pinned memory.  Its error rows are PIL's, the
  CPU reader's.

GPU engines run on CUDA streams of their own and synchronise them before returning, so the time an
engine's ``decode`` takes is its real busy time (what :class:`pipeline.decode.balance.Balancer`
measures) and its crops are ready on any stream.  Orientation and resize/crop are shared by the GPU
engines (:func:`pipeline.decode.jpeg.orient`, :func:`pipeline.decode.preprocess.resize_crop_uint8`).
"""

from __future__ import annotations

import contextlib
import io
import logging
from dataclasses import dataclass, field
from typing import Iterator, Optional, Protocol, Sequence, Union

import numpy as np
import torch

from ..errors import ItemError
from .jpeg import JpegHeader, orient, parse_jpeg_header
from .pool import DecodePool
from .preprocess import RESIZE, resize_crop_uint8

log = logging.getLogger(__name__)

CHUNK_PIXELS = 64_000_000       # decoded pixels per GPU decode call: bounds the uint8 output buffers
ENGINES = ("hw", "cuda", "cpu")  # every engine name, in the order a batch is handed out
Routed = tuple[int, bytes, JpegHeader]


@dataclass
class EngineOutput:
    """One engine's part of a batch."""

    crops: dict[int, torch.Tensor] = field(default_factory=dict)      # pos -> uint8 (3, 224, 224)
    sizes: dict[int, tuple[int, int]] = field(default_factory=dict)   # pos -> upright (width, height)
    rejected: list[Routed] = field(default_factory=list)              # for the fallback path
    failures: dict[int, ItemError] = field(default_factory=dict)      # final error rows (cpu engine)


class Engine(Protocol):
    """A decode engine; ``decode`` must account for every item (crop, rejection or failure)."""

    name: str

    def decode(self, items: list[Routed]) -> EngineOutput: ...

    def close(self) -> None: ...


def chunks(items: Sequence[Routed], chunk_pixels: int) -> Iterator[list[Routed]]:
    """``items`` in order, in runs of at most ``chunk_pixels`` decoded pixels (at least one item each)."""
    chunk: list[Routed] = []
    pixels = 0
    for item in items:
        n = item[2].width * item[2].height
        if chunk and pixels + n > chunk_pixels:
            yield chunk
            chunk, pixels = [], 0
        chunk.append(item)
        pixels += n
    if chunk:
        yield chunk


def finish_decoded(decoded: Sequence[tuple[Routed, Optional[torch.Tensor]]], out: EngineOutput) -> None:
    """Stored-orientation ``(3, H, W)`` uint8 images -> upright crops in ``out``; an image missing
    or not of the header's shape is rejected (the fallback decides)."""
    groups: dict[tuple[int, int], list[tuple[int, torch.Tensor, JpegHeader]]] = {}
    for item, img in decoded:
        pos, _, header = item
        if img is None or tuple(img.shape) != (3, header.height, header.width):
            out.rejected.append(item)
            continue
        upright = orient(img, header.orientation)
        groups.setdefault(tuple(upright.shape[-2:]), []).append((pos, upright, header))
    # One resize per distinct size: photo collections repeat a handful of sizes, and each call
    # costs ~100 us of Python and kernel launches whatever its batch.
    for members in groups.values():
        batch = torch.stack([img for _, img, _ in members]) if len(members) > 1 else members[0][1][None]
        crops = resize_crop_uint8(batch)
        for j, (pos, _, header) in enumerate(members):
            out.crops[pos] = crops[j]
            out.sizes[pos] = header.upright_size


def pinned_batch(arrays: Union[np.ndarray, Sequence[torch.Tensor]], device: torch.device) -> torch.Tensor:
    """Host uint8 crops -> one device tensor, staged through pinned memory (an asynchronous copy on
    the current stream); on a CPU device, the stacked crops themselves."""
    host = torch.from_numpy(arrays) if isinstance(arrays, np.ndarray) else torch.stack(list(arrays))
    if device.type != "cuda":
        return host
    pinned = torch.empty(host.shape, dtype=torch.uint8, pin_memory=True)
    pinned.copy_(host)
    return pinned.to(device, non_blocking=True)


def on_stream(device: torch.device, stream: Optional[torch.cuda.Stream]) -> contextlib.AbstractContextManager:
    """Make ``stream`` on ``device`` current (nothing to do without a stream: a CPU device)."""
    if stream is None:
        return contextlib.nullcontext()
    stack = contextlib.ExitStack()
    stack.enter_context(torch.cuda.device(device))
    stack.enter_context(torch.cuda.stream(stream))
    return stack


class _Streamed:
    """A GPU engine's device and stream (none on a CPU device, where tests run the same code)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.stream = torch.cuda.Stream(device) if device.type == "cuda" else None

    def on_stream(self) -> contextlib.AbstractContextManager:
        return on_stream(self.device, self.stream)

    def sync(self) -> None:
        if self.stream is not None:
            self.stream.synchronize()


class CudaEngine(_Streamed):
    """nvJPEG's CUDA backend (``torchvision.io.decode_jpeg`` on lists), in pixel-bounded chunks."""

    name = "cuda"

    def __init__(self, device: torch.device, chunk_pixels: int = CHUNK_PIXELS) -> None:
        from torchvision.io import ImageReadMode, decode_jpeg

        super().__init__(device)
        self._decode_jpeg, self._rgb = decode_jpeg, ImageReadMode.RGB
        self.chunk_pixels = chunk_pixels

    def decode(self, items: list[Routed]) -> EngineOutput:
        out = EngineOutput()
        with self.on_stream():
            for chunk in chunks(items, self.chunk_pixels):
                self._decode_chunk(chunk, out)
        self.sync()
        return out

    def close(self) -> None:
        pass

    def _decode_chunk(self, chunk: list[Routed], out: EngineOutput) -> None:
        # The bitstreams reach nvJPEG from one pinned buffer (DMA rather than staged pageable
        # copies).  decode_jpeg synchronises nvJPEG's stream before returning: the buffer is free after.
        staging = torch.empty(sum(len(d) for _, d, _ in chunk), dtype=torch.uint8,
                              pin_memory=self.device.type == "cuda")
        view, inputs, offset = staging.numpy(), [], 0
        for _, data, _ in chunk:
            view[offset:offset + len(data)] = np.frombuffer(data, dtype=np.uint8)
            inputs.append(staging[offset:offset + len(data)])
            offset += len(data)
        try:
            decoded = self._decode_jpeg(inputs, mode=self._rgb, device=self.device)
        except RuntimeError as exc:
            if len(chunk) == 1:
                log.debug("nvJPEG could not decode position %d (%s); CPU fallback", chunk[0][0], exc)
                out.rejected.append(chunk[0])
                return
            # All or nothing: find the culprit(s) one by one, keep the rest on the GPU.
            for item in chunk:
                self._decode_chunk([item], out)
            return
        finish_decoded(list(zip(chunk, decoded)), out)


class HwEngine(_Streamed):
    """The card's hardware JPEG decoder through nvImageCodec (``BackendKind.HW_GPU_ONLY``).

    Raises ``ImportError`` without the ``[gpu]`` extra and ``RuntimeError`` when the backend does
    not decode the probe image on this device (no hardware engine); see :func:`hw_engine`.
    EXIF orientation is not left to nvImageCodec: it is applied from the header exactly as on the
    ``cuda`` engine, so every engine gives the same upright image.
    """

    name = "hw"

    def __init__(self, device: torch.device, chunk_pixels: int = CHUNK_PIXELS) -> None:
        from nvidia import nvimgcodec  # the optional [gpu] extra

        super().__init__(device)
        if self.stream is None:
            raise RuntimeError("the hardware JPEG decoder needs a CUDA device")
        self._nv, self.chunk_pixels = nvimgcodec, chunk_pixels
        self._decoder = nvimgcodec.Decoder(device_id=self.device.index,
                                           backends=[nvimgcodec.Backend(nvimgcodec.BackendKind.HW_GPU_ONLY)])
        # Planar RGB is the (3, H, W) layout of the other engines; greyscale comes out as three planes.
        self._params = nvimgcodec.DecodeParams(apply_exif_orientation=False, color_spec=nvimgcodec.ColorSpec.SRGB,
                                               sample_format=nvimgcodec.SampleFormat.P_RGB)
        if self.decode([probe_item()]).rejected:
            raise RuntimeError("nvImageCodec's hardware backend did not decode a baseline JPEG on "
                               f"{self.device} (no hardware JPEG engine on this card?)")

    def decode(self, items: list[Routed]) -> EngineOutput:
        out = EngineOutput()
        with self.on_stream():
            for chunk in chunks(items, self.chunk_pixels):
                try:
                    images = self._decoder.decode([self._nv.CodeStream(data) for _, data, _ in chunk],
                                                  params=self._params, cuda_stream=self.stream.cuda_stream)
                except Exception as exc:  # noqa: BLE001 - the whole chunk goes to the fallback path
                    log.debug("nvImageCodec refused a chunk of %d (%s); GPU retry", len(chunk), exc)
                    out.rejected.extend(chunk)
                    continue
                # None where the hardware could not decode an image (e.g. a subsampling it lacks).
                finish_decoded([(item, None if img is None else torch.from_dlpack(img))
                                for item, img in zip(chunk, images)], out)
        self.sync()
        return out

    def close(self) -> None:
        self._decoder = None


class PoolEngine(_Streamed):
    """The CPU decode processes (:class:`DecodePool`), used as a GPU node's third engine.

    The pool is this engine's own: ``close`` stops its processes.  Images go out in waves of at
    most the ring's slot count, so a share larger than the ring never blocks on its own crops.
    """

    name = "cpu"

    def __init__(self, device: torch.device, pool: DecodePool) -> None:
        super().__init__(device)
        self.pool = pool

    def decode(self, items: list[Routed]) -> EngineOutput:
        out = EngineOutput()
        wave = self.pool.shape[0]
        with self.on_stream():
            for start in range(0, len(items), wave):
                part = items[start:start + wave]
                results = [self.pool.submit(data) for _, data, _ in part]
                got: list[int] = []
                slots: list[int] = []
                for (pos, _, _), fut in zip(part, results):
                    res = fut.result()
                    if isinstance(res, ItemError):
                        out.failures[pos] = res
                        continue
                    got.append(pos)
                    slots.append(res.slot)
                    out.sizes[pos] = (res.width, res.height)
                if slots:
                    pixels = pinned_batch(self.pool.take(slots), self.device)
                    out.crops.update((pos, pixels[j]) for j, pos in enumerate(got))
        self.sync()
        return out

    def close(self) -> None:
        self.pool.close()


def probe_item() -> Routed:
    """A small baseline 4:2:0 JPEG (the commonest kind of photo), routed: to test or warm up an engine."""
    from PIL import Image
    y, x = np.mgrid[0:RESIZE, 0:RESIZE]
    rgb = np.stack([x, y, (x + y) // 2], axis=-1).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, "JPEG", quality=90)
    data = buf.getvalue()
    header = parse_jpeg_header(data)
    assert header is not None  # PIL's own baseline JPEG
    return (0, data, header)


def hw_engine(device: Union[str, torch.device], chunk_pixels: int = CHUNK_PIXELS) -> Optional[HwEngine]:
    """The ``hw`` engine if nvImageCodec imports and its hardware backend works on ``device``, else None."""
    device = torch.device(device)
    if device.type != "cuda":
        return None
    try:
        return HwEngine(device, chunk_pixels)
    except ImportError:
        log.debug("nvImageCodec is not installed (pip install vgg-pipeline[gpu]): no hardware JPEG decoder")
    except Exception as exc:  # noqa: BLE001 - an unusable engine is not an error, but the extra is there
        log.warning("nvImageCodec is installed but its hardware JPEG decoder is unusable on %s: %s", device, exc)
    return None


def resolve(spec: Optional[Sequence[str]], *, hw_usable: bool, cpu_processes: int) -> list[str]:
    """The engines to build for ``runtime.decode_engines`` (None = auto: every engine this node has).

    ``cuda`` is always possible on a CUDA device, ``hw`` only where usable, ``cpu`` only with decode
    processes to spare; an engine asked for but absent is left out with a warning, and an empty
    result falls back to ``cuda`` (today's GPU path).
    """
    have = {"hw": hw_usable, "cuda": True, "cpu": cpu_processes > 0}
    wanted = list(ENGINES) if spec is None else list(dict.fromkeys(spec))
    unknown = [e for e in wanted if e not in have]
    if unknown:
        raise ValueError(f"unknown decode engine(s) {unknown}; expected some of {', '.join(ENGINES)}")
    missing = [e for e in wanted if not have[e]]
    if missing and spec is not None:
        log.warning("decode engine(s) %s not available on this node (hw needs pip install vgg-pipeline[gpu] "
                    "and a card with a JPEG engine); using the others", ", ".join(missing))
    return [e for e in ENGINES if e in wanted and have[e]] or ["cuda"]

