"""GPU decoding for CUDA workers: JPEGs decoded in batches with nvJPEG, everything else on the CPU.

:class:`GpuBatchDecoder` turns a batch of ``(pos, encoded bytes)`` into a uint8
``(N, 3, 224, 224)`` tensor on the device, the upright ``(width, height)`` of every image, and an
``ItemError`` for every image that cannot be decoded — the same outcome as the CPU reader
(:mod:`pipeline.input.reader`), within the docs/design.md §2 tolerance (fc7 cosine >= 0.999).

Routing is decided from the header alone (:func:`route`: a marker scan, no pixels decoded, no
CUDA needed, a few microseconds where PIL's ``Image.open`` costs ~100):

* to the GPU: 8-bit Huffman-coded baseline JPEGs (and the first frame of a multi-picture JPEG)
  in YCbCr or greyscale, ending with an end-of-image marker, within ``max_pixels`` and
  ``gpu_max_pixels``;
* to the CPU (``decode_with_size`` + the PIL resize of the recipe, per image, on a thread pool):
  everything else, so every error row is exactly the CPU reader's — other formats; CMYK/YCCK and
  Adobe "RGB" JPEGs (nvJPEG would get the colours wrong); progressive JPEGs (nvJPEG decodes them
  one by one with host-side Huffman decoding behind a process-wide lock, where a thread pool with
  libjpeg's DCT scaling runs in parallel); files without an EOI marker (truncated: PIL makes them
  the usual ``TruncatedImage`` error row where nvJPEG would fill grey); images over
  ``max_pixels`` (refused by PIL from the header) or ``gpu_max_pixels`` (decoded at a reduced
  DCT scale); anything whose header or EXIF orientation the scan is not sure about.

Plain JPEGs are not shared out to the CPU pool to add its rate to nvJPEG's: tried on an H200
(16 cores), it made the job slower (1,183 against 2,056 img/s end to end), probably because the
PIL threads compete with the reader threads for the GIL: reading took 107 thread-seconds instead
of 39 (docs/benchmarks.md).

A JPEG that nvJPEG rejects after all is retried alone on the GPU, then on the CPU, so one bad file
never costs its batch.  EXIF orientation is read from the header and applied to the decoded
tensor (:func:`orient`).  Resize and crop run on the device (:func:`pipeline.decode.preprocess.resize_crop_uint8`);
CPU-decoded crops travel through pinned memory.  All device work runs on the decoder's own CUDA
stream, so a batch can be decoded (:func:`decode_ahead`, one background thread) while the model
runs the previous one on the default stream.
"""

from __future__ import annotations

import logging
import queue
import re
import struct
import threading
import time
import warnings
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Iterable, Iterator, Optional, Union

import numpy as np
import torch
import torchvision.transforms.v2.functional as F
from PIL import Image

from .cpu import decode_with_size
from ..errors import ItemError
from .preprocess import CROP, RESIZE, Decoded, normalize_batch, resize_crop_uint8

log = logging.getLogger(__name__)

# torchvision 0.29 deprecates its image codecs in favour of torchcodec; decode_jpeg still works and
# is what docs/design.md §4 names.  Silence that one warning, not the category.
warnings.filterwarnings("ignore", message=r".*image decoding and encoding capabilities of TorchVision.*")

GPU_MAX_PIXELS = 40_000_000     # larger JPEGs decode on the CPU, at a reduced DCT scale
CHUNK_PIXELS = 64_000_000       # decoded pixels per nvJPEG call: bounds the uint8 output buffers
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
    """A :class:`JpegHeader` if nvJPEG should decode ``data``, ``None`` for the CPU path.

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
    gpu_decoded: int = 0                         # how many went through nvJPEG

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

    Thread-safe for one caller at a time (``decode_ahead`` runs it in one background thread).
    """

    def __init__(self, device: Union[str, torch.device] = "cuda", *, max_pixels: int = 100_000_000,
                 max_bytes: int = 100_000_000, cpu_threads: int = 4, gpu_max_pixels: int = GPU_MAX_PIXELS,
                 chunk_pixels: int = CHUNK_PIXELS, progressive_on_gpu: bool = False) -> None:
        from torchvision.io import ImageReadMode, decode_jpeg

        self.device = torch.device(device)
        if self.device.type != "cuda":
            raise ValueError(f"GpuBatchDecoder needs a CUDA device, got {self.device}")
        if self.device.index is None:
            self.device = torch.device("cuda", torch.cuda.current_device())
        self._decode_jpeg, self._rgb = decode_jpeg, ImageReadMode.RGB
        self.max_pixels, self.max_bytes = max_pixels, max_bytes
        self.gpu_max_pixels, self.chunk_pixels = gpu_max_pixels, chunk_pixels
        self.progressive_on_gpu = progressive_on_gpu
        self.stream = torch.cuda.Stream(self.device)
        self.pool = ThreadPoolExecutor(max_workers=max(1, cpu_threads), thread_name_prefix="cpu-decode")

    def close(self) -> None:
        self.pool.shutdown(wait=True)

    def decode(self, items: list[tuple[int, bytes]]) -> GpuBatch:
        """Decode ``items`` (``(pos, bytes)``); results keep the input order, failures aside."""
        t0 = time.perf_counter()
        gpu: list[tuple[int, bytes, JpegHeader]] = []
        cpu: list[tuple[int, bytes]] = []
        for pos, data in items:
            header = route(data, max_pixels=self.max_pixels, max_bytes=self.max_bytes,
                           gpu_max_pixels=self.gpu_max_pixels, progressive_on_gpu=self.progressive_on_gpu)
            if header is None:
                cpu.append((pos, data))
            else:
                gpu.append((pos, data, header))

        # CPU images decode on the pool while the GPU works through the JPEGs.
        futures = {pos: self._submit_cpu(data) for pos, data in cpu}
        crops: dict[int, torch.Tensor] = {}
        sizes: dict[int, tuple[int, int]] = {}
        failures: dict[int, ItemError] = {}
        with torch.cuda.device(self.device), torch.cuda.stream(self.stream):
            for pos, data in self._decode_on_gpu(gpu, crops, sizes):
                futures[pos] = self._submit_cpu(data)  # nvJPEG said no: PIL decides (image or error row)
            host: dict[int, torch.Tensor] = {}
            for pos, fut in futures.items():
                try:
                    host[pos], sizes[pos] = fut.result()
                except ItemError as exc:
                    failures[pos] = exc
            if host:  # CPU crops: one pinned staging batch, copied asynchronously on this stream
                pinned = torch.empty((len(host), 3, CROP, CROP), dtype=torch.uint8, pin_memory=True)
                torch.stack(list(host.values()), out=pinned)
                on_device = pinned.to(self.device, non_blocking=True)
                crops.update((pos, on_device[j]) for j, pos in enumerate(host))
            order = [pos for pos, _ in items if pos in sizes]
            if order:
                out = torch.stack([crops[pos] for pos in order])
            else:
                out = torch.empty((0, 3, CROP, CROP), dtype=torch.uint8, device=self.device)
            ready = torch.cuda.Event()
            ready.record(self.stream)
        ready.synchronize()  # only this (background) thread waits, and decode_s is the real cost
        return GpuBatch(order, out, [sizes[p] for p in order],
                        [(p, failures[p]) for p, _ in items if p in failures], ready,
                        time.perf_counter() - t0, len(order) - len(host))

    def _submit_cpu(self, data: bytes) -> Future:
        return self.pool.submit(cpu_decode_uint8, data, max_pixels=self.max_pixels, max_bytes=self.max_bytes)

    def _decode_on_gpu(self, gpu: list[tuple[int, bytes, JpegHeader]], crops: dict[int, torch.Tensor],
                       sizes: dict[int, tuple[int, int]]) -> list[tuple[int, bytes]]:
        """nvJPEG in chunks of at most ``chunk_pixels``; returns the items it could not decode."""
        rejected: list[tuple[int, bytes]] = []
        chunk: list[tuple[int, bytes, JpegHeader]] = []
        pixels = 0
        for item in gpu:
            n = item[2].width * item[2].height
            if chunk and pixels + n > self.chunk_pixels:
                rejected += self._decode_chunk(chunk, crops, sizes)
                chunk, pixels = [], 0
            chunk.append(item)
            pixels += n
        if chunk:
            rejected += self._decode_chunk(chunk, crops, sizes)
        return rejected

    def _decode_chunk(self, chunk: list[tuple[int, bytes, JpegHeader]], crops: dict[int, torch.Tensor],
                      sizes: dict[int, tuple[int, int]]) -> list[tuple[int, bytes]]:
        # The bitstreams reach nvJPEG from one pinned buffer (DMA rather than staged pageable
        # copies).  decode_jpeg synchronises nvJPEG's stream before returning: the buffer is free after.
        staging = torch.empty(sum(len(d) for _, d, _ in chunk), dtype=torch.uint8, pin_memory=True)
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
                return [(chunk[0][0], chunk[0][1])]
            # All or nothing: find the culprit(s) one by one, keep the rest on the GPU.
            return [r for item in chunk for r in self._decode_chunk([item], crops, sizes)]
        rejected: list[tuple[int, bytes]] = []
        groups: dict[tuple[int, int], list[tuple[int, torch.Tensor, JpegHeader]]] = {}
        for (pos, data, header), img in zip(chunk, decoded):
            if tuple(img.shape) != (3, header.height, header.width):
                rejected.append((pos, data))  # not what the header promised: let PIL decide
                continue
            upright = orient(img, header.orientation)
            groups.setdefault(tuple(upright.shape[-2:]), []).append((pos, upright, header))
        # One resize per distinct size: photo collections repeat a handful of sizes, and each
        # call costs ~100 us of Python and kernel launches whatever its batch.
        for members in groups.values():
            batch = torch.stack([img for _, img, _ in members]) if len(members) > 1 else members[0][1][None]
            out = resize_crop_uint8(batch)
            for j, (pos, _, header) in enumerate(members):
                crops[pos] = out[j]
                sizes[pos] = header.upright_size
        return rejected


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
