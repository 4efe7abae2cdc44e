"""``torch.compile`` off the critical path (``runtime.compile``, docs/design.md §1).

The eager model serves every batch from the start.  Once compilation is wanted (:func:`wanted`), a
background thread runs ``torch.compile(model, mode=COMPILE_MODE, dynamic=False)`` and warms it up
on a dummy batch of the compiled batch size -- that first call is where Dynamo traces and Inductor
generates and builds its kernels.  When it is done, the compiled module is used from the next
batch on (swapped between batches, never inside one).  A compile that fails logs one warning and
the eager model stays.

Shapes: the compiled module only ever sees its one batch size (``dynamic=False``, no recompiles).
A smaller batch (a shard's last one) is padded with zeros up to it when it is at least
:data:`PAD_MIN_SHARE` of it; smaller ones (and the one-image retries of a failed batch) run eager.

Compiled kernels are cached on disk (Inductor's FX-graph, autotuning and Triton caches) in
:func:`cache_dir`, a stable per-user directory outside OUTPUT, so later actors and jobs on the node
load them instead of compiling again.

The compiled model computes the same function within the precision's tolerance (fc7 cosine >= 0.999
in bf16, allclose in fp32; tests/test_compile.py), so it does not enter the model fingerprint; the
part files record how many of their rows it computed (``compile.rows``).
"""

from __future__ import annotations

import logging
import os
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Optional

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

SETTINGS = ("auto", "on", "off")
# auto compiles only once the actor has embedded this many images: about a compile's duration at
# the eager rate (VGG16 bf16 on an H200: 8,400 img/s x ~60 s of Inductor).  An actor that has run
# as long as a compile takes is likely to run that long again, so the compile -- on a CPU thread,
# with a few GPU batches of warm-up -- pays back; a short job never pays for it.
AUTO_AFTER_IMAGES = 500_000
# Inductor's default mode: its kernels and cuDNN's convolutions, no CUDA graphs (a graph captured by
# the compile thread would be captured again by the model thread) and no autotuning (timings taken
# while the eager model runs on the same GPU would be noise).  benchmarks/model_only.py
# --compile-mode measures the others.
COMPILE_MODE = "default"
# A batch at least this share of the compiled size is padded up to it (at most twice the work of
# its images, on a faster model); a smaller one runs eager rather than pay up to batch-size times.
PAD_MIN_SHARE = 0.5
CACHE_ENV = "TORCHINDUCTOR_CACHE_DIR"
# pipeline.config imports this module for the setting's parser: torch is imported lazily, so the
# CLI parses its config without paying torch's import time.


def parse_setting(value: Any) -> str:
    """``runtime.compile`` -> ``auto``, ``on`` or ``off`` (YAML reads bare on/off as booleans)."""
    if isinstance(value, bool):
        return "on" if value else "off"
    s = str(value).strip().lower()
    if s not in SETTINGS:
        raise ValueError(f"expected one of {', '.join(SETTINGS)}")
    return s


def wanted(setting: str, device: torch.device, images_seen: int) -> bool:
    """Whether to start compiling now: ``on`` always, ``off`` never, ``auto`` on CUDA only and
    only once :data:`AUTO_AFTER_IMAGES` images went through the eager model."""
    if setting == "auto":
        return device.type == "cuda" and images_seen >= AUTO_AFTER_IMAGES
    return setting == "on"


def cache_dir() -> str:
    """Where compiled kernels are cached: ``$TORCHINDUCTOR_CACHE_DIR`` if set, else
    ``$XDG_CACHE_HOME/vgg-pipeline/torchinductor`` (``~/.cache/...``): per user, kept across
    jobs and reboots, unlike Inductor's own default under ``/tmp``."""
    if os.environ.get(CACHE_ENV):
        return os.environ[CACHE_ENV]
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return str(Path(base) / "vgg-pipeline" / "torchinductor")


class BackgroundCompiler:
    """Compiles ``model`` in a thread once :func:`wanted`; :meth:`select` picks the module per batch.

    Called from one thread (the model's); the compile thread only publishes its result.
    ``compile_fn`` is ``torch.compile`` (a stand-in in tests).
    """

    def __init__(self, model: torch.nn.Module, setting: str, device: torch.device,
                 memory_format: Optional[torch.memory_format] = None,
                 mode: str = COMPILE_MODE, compile_fn: Optional[Callable[..., Any]] = None) -> None:
        import torch
        self.model, self.setting, self.device = model, parse_setting(setting), device
        self.memory_format = memory_format if memory_format is not None else torch.contiguous_format
        self.mode = mode
        self.compile_fn = compile_fn or torch.compile
        self.state = "off" if self.setting == "off" else "waiting"  # -> compiling -> ready | failed
        self.batch_size = 0          # the compiled batch size: the largest batch seen before it started
        self.images_seen = 0
        self._example: Optional[torch.Tensor] = None   # one image of the batches served: the dummy's shape
        self.compile_s: Optional[float] = None
        self._compiled: Optional[Any] = None
        self._done = threading.Event()
        self._thread: Optional[threading.Thread] = None

    def select(self, x: torch.Tensor) -> tuple[Any, torch.Tensor, bool]:
        """The module for batch ``x`` and its input (padded for the compiled one), and whether it
        is the compiled one.  Counts ``x`` and starts compiling when it is time."""
        n = x.shape[0]
        self.images_seen += n
        if self.state == "waiting":
            self.batch_size = max(self.batch_size, n)
            if wanted(self.setting, self.device, self.images_seen):
                self._example = x[:1]
                self._start()
        compiled = self._compiled
        if compiled is None or n > self.batch_size or n < PAD_MIN_SHARE * self.batch_size:
            return self.model, x, False
        if n < self.batch_size:
            import torch
            pad = x.new_zeros((self.batch_size - n, *x.shape[1:]))
            x = torch.cat([x, pad]).contiguous(memory_format=self.memory_format)
        return compiled, x, True

    def wait(self, timeout: Optional[float] = None) -> bool:
        """Block until a started compile has finished (ready or failed); False on timeout."""
        return self._done.wait(timeout)

    def _start(self) -> None:
        self.state = "compiling"
        os.environ.setdefault(CACHE_ENV, cache_dir())  # read by Inductor when it compiles
        self._thread = threading.Thread(target=self._compile, name="compile", daemon=True)
        self._thread.start()

    def _compile(self) -> None:
        import torch
        t0 = time.perf_counter()
        try:
            compiled = self.compile_fn(self.model, mode=self.mode, dynamic=False)
            dummy = self._example.new_zeros((self.batch_size, *self._example.shape[1:]))
            with torch.inference_mode():
                compiled(dummy.contiguous(memory_format=self.memory_format))
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
        except Exception as exc:  # noqa: BLE001 - any compile failure leaves the eager model serving
            self.state = "failed"
            log.warning("torch.compile failed, the eager model stays: %s: %s", type(exc).__name__,
                        (str(exc).splitlines() or [""])[0][:300])
        else:
            self.compile_s = time.perf_counter() - t0
            self._compiled = compiled
            self.state = "ready"
            log.info("compiled model (%s, batch %d) in %.1f s; in use from the next batch; cache %s",
                     self.mode, self.batch_size, self.compile_s, os.environ.get(CACHE_ENV))
        finally:
            self._done.set()
