"""Which number format the model runs in on *this* worker (``runtime.precision``).

``auto`` picks the fastest format that stays within the parity tolerance (fc7 cosine >= 0.999
to torchvision fp32, same top-1): bf16 on CUDA and on CPUs that execute bf16 natively (AVX512-BF16
on Zen 4/5 and Cooper Lake+ Xeons, AMX on Sapphire Rapids+), fp32 elsewhere -- emulated bf16 is
slower than fp32.  The choice is made where the model runs (the actor), since workers of one job
may sit on different CPUs than the driver; the resolved name is what part files record.

Layouts: the reduced formats run with ``channels_last`` (oneDNN's and cuDNN's fast path for
VGG's 3x3 convolutions).  fp32 on the CPU keeps torchvision's own contiguous layout so its
outputs are bit-identical to ``torchvision.models.vgg*`` in eager fp32: that is what a user who
asks for fp32 wants (channels_last fp32 differs in the last bits).

Example::

    >>> import torch
    >>> from pipeline.model.precision import resolve_precision
    >>> resolve_precision("fp32", torch.device("cpu"))
    'fp32'
"""

from __future__ import annotations

import functools
import logging
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

# This module is imported by pipeline.config (for the names), so torch is imported lazily: the CLI
# parses its arguments and config without paying torch's import time.
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
# /proc/cpuinfo flags of x86 CPUs that execute bf16 dot products in hardware.
NATIVE_BF16_FLAGS = frozenset({"avx512_bf16", "amx_bf16"})


def _cpuinfo_flags(path: str = "/proc/cpuinfo") -> frozenset[str]:
    try:
        with open(path, encoding="utf-8") as f:
            for line in f:
                if line.startswith("flags"):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def dtype(precision: str) -> "torch.dtype":
    """The torch dtype of a resolved precision (``fp32``, ``bf16``, ``fp16``)."""
    import torch
    return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]


@functools.lru_cache(maxsize=1)
def cpu_has_native_bf16() -> bool:
    """True when this CPU runs bf16 matrix products in hardware (AVX512-BF16 or AMX-BF16).

    Asks torch's own cpuinfo probe first (what oneDNN will dispatch on; ``get_cpu_capability()``
    only says "AVX512" and cannot tell), then the kernel's CPU flags.  Arm CPUs with the BF16
    extension are not counted: not measured here, so ``auto`` stays on fp32 there.
    """
    import torch
    probes = [getattr(torch.cpu, name, None)
              for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")]
    for probe in probes:
        try:
            if probe is not None and probe():
                return True
        except (RuntimeError, AttributeError):  # a torch built without cpuinfo: use the flags
            pass
    return bool(_cpuinfo_flags() & NATIVE_BF16_FLAGS)


def resolve_precision(precision: str, device: torch.device) -> str:
    """``runtime.precision`` -> the format that runs on ``device``: ``fp32``, ``bf16`` or ``fp16``.

    fp16 is a CUDA format (CPUs have no fast fp16 convolutions and fp16's range buys nothing
    over bf16): asked for on a worker that ends up on the CPU (``runtime.device: auto`` without
    a GPU) it falls back to what ``auto`` picks there, with a warning.  ``runtime.device: cpu``
    with fp16 is refused up front by the config (:func:`pipeline.config.load_config`).
    """
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; choose one of {', '.join(PRECISIONS)}")
    if device.type == "cuda":
        return "bf16" if precision == "auto" else precision
    native = "bf16" if cpu_has_native_bf16() else "fp32"
    if precision == "fp16":
        log.warning("runtime.precision=fp16 needs CUDA; this CPU worker runs %s instead", native)
        return native
    return native if precision == "auto" else precision


def uses_channels_last(precision: str, device: torch.device) -> bool:
    """channels_last everywhere except CPU fp32, which keeps torchvision's layout (bit-identical)."""
    return device.type == "cuda" or precision != "fp32"


def prepare_model(model: torch.nn.Module, precision: str, device: torch.device) -> torch.nn.Module:
    """Move ``model`` to ``device`` with weights in ``precision`` (cast once, not per batch)."""
    import torch
    model = model.to(device=device, dtype=dtype(precision)).eval()
    if uses_channels_last(precision, device):
        model = model.to(memory_format=torch.channels_last)
    return model


def prepare_input(x: torch.Tensor, precision: str, device: torch.device) -> torch.Tensor:
    """A float32 batch on any device -> the model's device, dtype and memory layout."""
    import torch
    x = x.to(device=device, dtype=dtype(precision), non_blocking=True)
    if uses_channels_last(precision, device):
        x = x.contiguous(memory_format=torch.channels_last)
    return x
