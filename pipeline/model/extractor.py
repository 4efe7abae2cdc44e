"""The mapper: a VGG resident on one device turning preprocessed batches into fc7 + logits.

On CUDA: bf16 autocast by default (fp16 or fp32 on request) and ``channels_last``.  On CPU: fp32,
with torch using exactly the cores the actor reserved (Ray sets ``OMP_NUM_THREADS=1`` otherwise).

Example::

    >>> import torch
    >>> from pipeline.model.extractor import Extractor
    >>> ex = Extractor("vgg11", "random:0", device="cpu")  # doctest: +SKIP
    >>> fc7, logits = ex(torch.zeros(2, 3, 224, 224))      # doctest: +SKIP
"""

from __future__ import annotations

import contextlib
import logging
from typing import Optional, Sequence, Union

import numpy as np
import torch

from ..decode.preprocess import RESIZE, Batch, Decoded, as_batch
from .archs import FC7_DIM, NUM_CLASSES
from .mapper import OutputColumn
from .weights import WeightsInfo, load_model

log = logging.getLogger(__name__)
AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("runtime.device=cuda but this worker sees no CUDA device")
    return torch.device(device)


def resolve_precision(precision: str, device: torch.device) -> str:
    if device.type != "cuda":
        return "fp32"  # bf16 on CPU is slower than fp32 on most CPUs and changes the numbers
    return "bf16" if precision == "auto" else precision


class Extractor:
    """VGG on one device; call it with a normalised (N, 3, H, W) batch."""

    def __init__(self, arch: str, weights: str, *, device: str = "auto", precision: str = "auto",
                 num_threads: Optional[int] = None, storage_options: Optional[dict] = None) -> None:
        self.device = resolve_device(device)
        self.precision = resolve_precision(precision, self.device)
        if self.device.type == "cpu" and num_threads:
            torch.set_num_threads(num_threads)
        model, self.weights = load_model(arch, weights, storage_options)
        self.model = model.to(self.device).eval()
        if self.device.type == "cuda":
            self.model = self.model.to(memory_format=torch.channels_last)
            torch.backends.cudnn.benchmark = True
        log.info("model %s on %s (%s), weights %s", arch, self.device, self.precision, self.weights.name)

    @property
    def weights_info(self) -> WeightsInfo:
        return self.weights

    def _autocast(self):
        if self.precision in AUTOCAST_DTYPES:
            return torch.autocast(self.device.type, dtype=AUTOCAST_DTYPES[self.precision])
        return contextlib.nullcontext()

    @torch.inference_mode()
    def __call__(self, batch: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        x = batch.to(self.device, non_blocking=True)
        if self.device.type == "cuda":
            x = x.contiguous(memory_format=torch.channels_last)
        with self._autocast():
            fc7, logits = self.model(x)
        return fc7.float().cpu().numpy(), logits.float().cpu().numpy()

    # The mapper contract (pipeline.model.mapper.Mapper).
    needs_image = False  # the decoders hand over 224x224 crops only
    min_side = RESIZE    # the recipe's resize: JPEG draft decoding may go down to 4x this
    columns: Sequence[OutputColumn] = (OutputColumn.vector("fc7", FC7_DIM),
                                       OutputColumn.vector("logits", NUM_CLASSES))

    def embed(self, batch: Union[Batch, Sequence[Decoded]]) -> dict[str, np.ndarray]:
        """A batch (or a list of decoded items) -> ``fc7`` and ``logits``, one row per image."""
        fc7, logits = self(as_batch(batch).pixels)
        return {"fc7": fc7, "logits": logits}
