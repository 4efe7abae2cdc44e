"""Batch sizes: 8 on CPU; on CUDA the largest power of two that fits free device memory.

:func:`auto_batch_size` is a pure function of the architecture (Table 1) and the free bytes, so it
is tested without a GPU; :func:`cuda_batch_size` feeds it ``torch.cuda.mem_get_info``.
"""

from __future__ import annotations

from typing import Union

import torch

from ..decode.preprocess import CROP
from .archs import ARCH_TO_CONFIG, CONFIGS
from .mapper import Mapper

MAX_BATCH = 256                 # bigger batches add latency and memory for little VGG throughput




def _activation_peak_elems(arch: str, size: int = CROP) -> int:
    """Largest (input + output) element count of one layer of ``arch`` for one image."""
    base = arch.partition("_")[0]
    cfg = CONFIGS[ARCH_TO_CONFIG[base]]
    channels, side, peak = 3, size, 0
    for v in cfg:
        if v == "M":
            out_side = side // 2
            peak = max(peak, channels * side * side + channels * out_side * out_side)
            side = out_side
        else:
            peak = max(peak, channels * side * side + int(v) * side * side)
            channels = int(v)
    return peak


def _param_count(arch: str) -> int:
    base = arch.partition("_")[0]
    cfg = CONFIGS[ARCH_TO_CONFIG[base]]
    params, channels = 0, 3
    for v in cfg:
        if v != "M":
            params += channels * int(v) * 9 + int(v)
            channels = int(v)
    return params + (512 * 7 * 7 + 1) * 4096 + (4096 + 1) * 4096 + (4096 + 1) * 1000


def auto_batch_size(model_arch: str, free_bytes: int, *, precision: str = "bf16",
                    weights_resident: bool = False, max_batch: int = MAX_BATCH,
                    reserve_bytes: int = 1 << 30) -> int:
    """Largest power-of-two batch (1..``max_batch``) that fits ``free_bytes`` of device memory.

    Per image: the biggest layer's input + output activations in the compute dtype, with 50 %
    headroom for cuDNN workspaces and allocator slack, plus two batches of input (float32 and
    uint8: one in the model, one being decoded).  ``weights_resident`` says the model is already
    in ``free_bytes``' complement; otherwise its fp32 parameters (and their autocast copies) are
    taken off first.  ``reserve_bytes`` (default 1 GiB) is left for the CUDA context and nvJPEG.
    """
    if model_arch.partition("_")[0] not in ARCH_TO_CONFIG:
        raise ValueError(f"unknown model.arch {model_arch!r}")
    elem = 4 if precision == "fp32" else 2
    per_image = int(_activation_peak_elems(model_arch) * elem * 1.5) + 2 * 3 * CROP * CROP * (4 + 1)
    budget = free_bytes - reserve_bytes
    if not weights_resident:
        budget -= _param_count(model_arch) * (4 + (0 if precision == "fp32" else 2))
    fits = max(1, int(budget // per_image)) if budget > 0 else 1
    batch = 1
    while batch * 2 <= min(fits, max_batch):
        batch *= 2
    return batch


def cuda_batch_size(model_arch: str, device: Union[str, torch.device], precision: str = "bf16",
                    max_batch: int = MAX_BATCH) -> int:
    """:func:`auto_batch_size` from ``torch.cuda.mem_get_info`` (call once the model is loaded)."""
    free, _ = torch.cuda.mem_get_info(torch.device(device))
    return auto_batch_size(model_arch, free, precision=precision, weights_resident=True, max_batch=max_batch)


def default_batch_size(mapper: Mapper, arch: str) -> int:
    """CPU: 8.  CUDA: the largest power of two up to 256 that fits the free device memory (model
    loaded), so a 16 GB card and an 80 GB card each get what they can hold."""
    if mapper.device.type != "cuda":
        return 8
    if mapper.needs_image:  # dense descriptors size their own batches
        return 64
    return cuda_batch_size(arch, mapper.device, mapper.precision)
