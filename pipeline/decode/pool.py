"""CPU decoding in worker processes: encoded bytes in, uint8 224x224 crops out, through shared memory.

PIL releases the GIL while it decodes, but everything around it (opening, EXIF, mode conversion,
the crop) does not, so decoding on threads of the model's process takes the GIL away from the
model's own Python.  :class:`DecodePool` runs the decode in processes of its own instead:

* each process decodes one image at a time (:func:`pipeline.decode.cpu.decode_with_size`, with
  JPEG draft decoding down to 4x ``min_side``), resizes and center-crops it, and writes the uint8
  ``(3, crop, crop)`` crop into a slot of a ring of preallocated shared memory; only the slot
  number, the image size and the time come back through the pipe, never the pixels;
* the caller reads a batch of slots with :meth:`DecodePool.take` (one gather copy out of the
  ring, which frees the slots) and normalises it in one tensor operation;
* bad input is a result, not a crash: an image PIL refuses comes back as an ``ItemError``
  (``stage=decode``), the same rows the thread reader gives;
* a decode process that dies (a segfaulting codec, the OOM killer, a signal) costs no image: the
  image it held is decoded again on a fresh process, and if it kills that one too it becomes an
  error row (``DecoderCrashed``); one that takes longer than ``timeout_s`` is killed and its
  image becomes an error row (``DecodeTimeout``);
* the processes exit by themselves when the process that started them dies.

The processes import only PIL and numpy (``spawn``: no torch, no copy of the model's memory), so
they start in a fraction of a second.  ``concurrent.futures.ProcessPoolExecutor`` does not fit:
one dead process breaks every pending future of the pool, and a hung task cannot be killed.

Example::

    >>> pool = DecodePool(2, 64, max_pixels=10**8, max_bytes=10**8)   # doctest: +SKIP
    >>> crop = pool.submit(jpeg_bytes).result()                        # doctest: +SKIP
    >>> pixels = pool.take([crop.slot])                                # (1, 3, 224, 224) uint8
"""

from __future__ import annotations

import atexit
import hashlib
import json
import logging
import mmap
import os
import queue
import socket
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import Optional, Sequence, Union

import numpy as np
from PIL import Image

from ..errors import ItemError
from .cpu import decode_with_size

log = logging.getLogger(__name__)

# glibc serves a decoded photo (a few MB) from mmap and trims the heap after it by default, so
# every image faults its buffers in again: ~25 % of a decode process' time (docs/benchmarks.md).
# Allocations up to 32 MB (glibc's maximum threshold; Pillow's blocks are 16 MB) stay on the heap,
# larger ones and a free heap top past 64 MB go back to the kernel.  These override what the actor
# inherits (a CPU actor keeps everything, for the model's activations: a decode process would then
# keep its largest image for good).
MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": str(32 << 20), "MALLOC_TRIM_THRESHOLD_": str(64 << 20),
              "MALLOC_MMAP_MAX_": "65536"}  # glibc's default: large buffers may be mmapped
START_TIMEOUT_S = 60.0    # a decode process imports PIL and numpy only: well under a second unloaded
DECODE_TIMEOUT_S = 120.0  # a 100 Mpixel PNG decodes in a few seconds; far beyond that it is stuck
# Test-only fault injection (tests/test_worker.py): a decode process given an image whose sha256
# is listed (comma-separated hex) exits abruptly, like a segfaulting codec, or hangs forever.
CRASH_ENV = "VGG_PIPELINE_FAULT_DECODE_CRASH_SHA256"
HANG_ENV = "VGG_PIPELINE_FAULT_DECODE_HANG_SHA256"


@dataclass
class Crop:
    """A decoded image: its crop is ``ring[slot]`` until :meth:`DecodePool.take` frees it."""

    slot: int
    width: int           # full upright size (before draft decoding and resizing)
    height: int
    decode_s: float


DecodeResult = Union[Crop, ItemError]


def resize_crop(img: Image.Image, resize: int, crop: int) -> Image.Image:
    """Shorter side to ``resize`` (PIL bilinear, which antialiases), then the central ``crop`` square.

    The geometry of torchvision's ``resize(img, [resize])`` + ``center_crop(img, [crop, crop])`` on
    a PIL image, written out so the decode processes need not import torch; the two agree bit for
    bit (tests/test_worker.py).
    """
    w, h = img.size
    short, long = (w, h) if w <= h else (h, w)
    new_long = int(resize * long / short)
    size = (resize, new_long) if w <= h else (new_long, resize)
    if size != (w, h):
        img = img.resize(size, Image.BILINEAR)
    top, left = int(round((size[1] - crop) / 2.0)), int(round((size[0] - crop) / 2.0))
    return img.crop((left, top, left + crop, top + crop))


# -- the decode process -------------------------------------------------------------------------


def _fault_set(name: str) -> frozenset[str]:
    return frozenset(v.strip().lower() for v in os.environ.get(name, "").split(",") if v.strip())


def _exit_with_parent(parent: int) -> None:
    while os.getppid() == parent:  # reparented once the process that started us died
        time.sleep(1.0)
    os._exit(0)


def _decode_main(conn: Connection, ring_fd: int, shape: tuple[int, ...], max_pixels: int, max_bytes: int,
                 resize: int, crop: int, min_side: int) -> None:
    """A decode process: slot + bytes in, the crop into ``ring[slot]``, a small tuple back."""
    threading.Thread(target=_exit_with_parent, args=(os.getppid(),), daemon=True).start()
    shm = mmap.mmap(ring_fd, int(np.prod(shape)))
    ring = np.ndarray(shape, np.uint8, buffer=shm)
    crash, hang = _fault_set(CRASH_ENV), _fault_set(HANG_ENV)
    conn.send("ready")
    try:
        while True:
            try:
                slot = conn.recv()
                if slot is None:
                    return
                data = conn.recv_bytes()
            except EOFError:
                return
            if crash or hang:
                digest = hashlib.sha256(data).hexdigest()
                if digest in crash:
                    os._exit(17)
                while digest in hang:
                    time.sleep(3600)
            t0 = time.perf_counter()
            try:
                img, (width, height) = decode_with_size(data, max_pixels=max_pixels, max_bytes=max_bytes,
                                                        min_side=min_side)
                ring[slot] = np.asarray(resize_crop(img, resize, crop)).transpose(2, 0, 1)
                del img  # not held while waiting for the next image
                reply: tuple = ("ok", width, height, time.perf_counter() - t0)
            except ItemError as exc:
                reply = ("error", exc.stage, exc.error_type, exc.message)
            except Exception as exc:  # noqa: BLE001 - a decoder bug is this image's error row
                reply = ("error", "decode", type(exc).__name__, str(exc)[:200] or type(exc).__name__)
            conn.send(reply)
    finally:
        del ring
        shm.close()


# -- the pool -----------------------------------------------------------------------------------


class _Process:
    """One decode process (``python -m pipeline.decode.pool``) and the parent's end of its socket.

    A fresh interpreter rather than ``multiprocessing``'s spawn: spawn re-imports the parent's
    ``__main__`` (a Ray worker's, a test runner's) in every child.
    """

    def __init__(self, ring_fd: int, args: tuple, start_timeout_s: float = START_TIMEOUT_S) -> None:
        ours, theirs = socket.socketpair()
        self.conn = Connection(ours.detach())
        try:
            argv = [sys.executable, "-m", __name__, str(theirs.fileno()), str(ring_fd), json.dumps(args)]
            # stderr is the actor's: a decode process' warnings and tracebacks land in the worker log
            # and it imports this package from wherever the parent did (Ray may add paths at run time)
            env = {**os.environ, **MALLOC_ENV, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
            self.proc = subprocess.Popen(argv, pass_fds=(theirs.fileno(), ring_fd), stdin=subprocess.DEVNULL,
                                         env=env)
        finally:
            theirs.close()  # only the child holds its end: its death is EOF here
        try:
            ready = self.conn.poll(start_timeout_s) and self.conn.recv() == "ready"
        except (EOFError, OSError):
            ready = False
        if not ready:
            self.proc.kill()
            self.proc.wait()
            self.conn.close()
            raise RuntimeError(f"a decode process failed to start (exit code {self.proc.returncode}; "
                               "its traceback is in the worker's log)")

    @property
    def pid(self) -> int:
        return self.proc.pid

    def exitcode(self) -> Optional[int]:
        return self.proc.poll()

    def stop(self, kill: bool = False) -> None:
        if not kill:
            try:
                self.conn.send(None)
                self.proc.wait(5.0)
            except (OSError, subprocess.TimeoutExpired):
                pass
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self.conn.close()


class DecodePool:
    """``processes`` decode processes writing crops into a ring of ``slots`` shared buffers.

    :meth:`submit` blocks while every slot holds a crop nobody has taken yet: the ring bounds the
    decoded images in memory, so callers size it to what they keep in flight (plus one batch).
    Thread-safe: several shards may submit at once.
    """

    def __init__(self, processes: int, slots: int, *, max_pixels: int, max_bytes: int, resize: int = 256,
                 crop: int = 224, min_side: int = 256, timeout_s: float = DECODE_TIMEOUT_S) -> None:
        if processes < 1 or slots < 1:
            raise ValueError("a decode pool needs at least one process and one slot")
        self.processes, self.timeout_s = processes, timeout_s
        self.shape = (slots, 3, crop, crop)
        # An anonymous shared file (memfd on Linux): no name to leak if this process is killed, the
        # memory goes away with the last process that maps it.
        if hasattr(os, "memfd_create"):
            self._ring_file = None
            self._ring_fd = os.memfd_create("vgg-decode-ring")
        else:
            self._ring_file = tempfile.TemporaryFile()
            self._ring_fd = self._ring_file.fileno()
        os.ftruncate(self._ring_fd, int(np.prod(self.shape)))
        self._shm = mmap.mmap(self._ring_fd, int(np.prod(self.shape)))
        self.ring = np.ndarray(self.shape, np.uint8, buffer=self._shm)
        self._free: queue.Queue[int] = queue.Queue()
        for s in range(slots):
            self._free.put(s)
        self._jobs: queue.SimpleQueue = queue.SimpleQueue()
        self._args = (self.shape, max_pixels, max_bytes, resize, crop, min_side)
        self._lock = threading.Lock()
        self.restarts = 0                                # decode processes replaced (died or killed)
        self.holding: dict[int, tuple[int, int]] = {}    # runner -> (pid, slot) of the image it holds
        self._closed = False
        self.broken: Optional[str] = None               # why a process could not be replaced
        procs = [_Process(self._ring_fd, self._args) for _ in range(processes)]
        self._runners = [threading.Thread(target=self._serve, args=(i, p), daemon=True, name=f"decode-{i}")
                         for i, p in enumerate(procs)]
        for t in self._runners:
            t.start()
        atexit.register(self.close)

    @property
    def free_slots(self) -> int:
        return self._free.qsize()

    def submit(self, data: bytes) -> "Future[DecodeResult]":
        """Decode ``data`` on a free process; the future's result is a :class:`Crop` or an ``ItemError``."""
        if self._closed or self.broken:
            raise RuntimeError(self.broken or "decode pool is closed")
        slot = self._free.get()
        fut: Future = Future()
        self._jobs.put((slot, data, fut, 0))
        return fut

    def take(self, slots: Sequence[int]) -> np.ndarray:
        """The crops in ``slots`` as one new (N, 3, crop, crop) uint8 array; the slots are free again."""
        out = self.ring[list(slots)]
        for s in slots:
            self._free.put(s)
        return out

    def release(self, slots: Sequence[int]) -> None:
        """Free ``slots`` without reading them (a shard that gave up)."""
        for s in slots:
            self._free.put(s)

    def close(self) -> None:
        """Stop the processes and free the shared memory (idempotent)."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
        for _ in self._runners:
            self._jobs.put(None)
        for t in self._runners:
            t.join(30.0)
        del self.ring
        self._shm.close()
        if self._ring_file is not None:
            self._ring_file.close()
        else:
            os.close(self._ring_fd)
        atexit.unregister(self.close)

    # -- the runner threads: one per process, so a death or hang is charged to the image it held
    def _serve(self, index: int, proc: _Process) -> None:
        try:
            while True:
                job = self._jobs.get()
                if job is None:
                    return
                try:
                    proc = self._run(index, proc, *job)
                except RuntimeError as exc:  # a dead process could not be replaced: fail loudly
                    log.error("decode pool broken: %s", exc)
                    for pending in [job] + self._drain():
                        if not pending[2].done():
                            pending[2].set_exception(exc)
                    return
        finally:
            proc.stop()

    def _run(self, index: int, proc: _Process, slot: int, data: bytes, fut: Future, attempt: int) -> _Process:
        self.holding[index] = (proc.pid, slot)
        try:
            proc.conn.send(slot)
            proc.conn.send_bytes(data)
            if not proc.conn.poll(self.timeout_s):
                proc = self._replace(proc, kill=True)
                self._fail(slot, fut, ItemError("decode", "DecodeTimeout",
                                                f"no result after {self.timeout_s:g}s; the decode process "
                                                "was killed"))
                return proc
            reply = proc.conn.recv()
        except (EOFError, OSError):
            code = proc.exitcode()
            proc = self._replace(proc, kill=True)
            if attempt == 0:
                log.warning("a decode process died (exit code %s); decoding its image again", code)
                self._jobs.put((slot, data, fut, 1))
            else:
                self._fail(slot, fut, ItemError("decode", "DecoderCrashed",
                                                f"the decode process died on this image twice (exit code {code})"))
            return proc
        finally:
            self.holding.pop(index, None)
        if reply[0] == "ok":
            fut.set_result(Crop(slot, reply[1], reply[2], reply[3]))
        else:
            self._fail(slot, fut, ItemError(reply[1], reply[2], reply[3]))
        return proc

    def _drain(self) -> list:
        jobs = []
        while True:
            try:
                job = self._jobs.get_nowait()
            except queue.Empty:
                return jobs
            if job is not None:
                jobs.append(job)

    def _fail(self, slot: int, fut: Future, error: ItemError) -> None:
        self._free.put(slot)
        fut.set_result(error)

    def _replace(self, proc: _Process, kill: bool) -> _Process:
        proc.stop(kill=kill)
        with self._lock:
            self.restarts += 1
        try:
            return _Process(self._ring_fd, self._args)
        except RuntimeError as exc:
            self.broken = str(exc)
            raise


def _child_entry(argv: list[str]) -> None:
    conn_fd, ring_fd, args = int(argv[0]), int(argv[1]), json.loads(argv[2])
    args[0] = tuple(args[0])  # the ring's shape
    _decode_main(Connection(conn_fd), ring_fd, *args)


if __name__ == "__main__":
    _child_entry(sys.argv[1:])
