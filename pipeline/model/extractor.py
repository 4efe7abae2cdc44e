"""The mapper: a VGG resident on one device turning preprocessed batches into fc7 + logits.

Precision (``runtime.precision``, resolved on this worker by :mod:`pipeline.model.precision`):
bf16 *weights* with ``channels_last`` on CUDA and on CPUs with native bf16, fp32 elsewhere; fp16 on
CUDA on request.  The model is cast once at load, so no per-batch autocast copies of the weights.
On CPU, torch uses exactly the cores the actor reserved (Ray sets ``OMP_NUM_THREADS=1`` otherwise).

Example::

    >>> import torch
    >>> from pipeline.model.extractor import Extractor
    >>> ex = Extractor("vgg11", "random:0", device="cpu")  # doctest: +SKIP
    >>> fc7, logits = ex(torch.zeros(2, 3, 224, 224))      # doctest: +SKIP
"""

from __future__ import annotations

import logging
from typing import Optional, Sequence, Union

import numpy as np
import torch

from ..decode.preprocess import RESIZE, Batch, Decoded, as_batch
from .archs import FC7_DIM, NUM_CLASSES
from .compiled import BackgroundCompiler
from .mapper import OutputColumn
from .precision import dtype, prepare_input, prepare_model, resolve_precision, uses_channels_last
from .weights import WeightsInfo, load_model

log = logging.getLogger(__name__)


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("runtime.device=cuda but this worker sees no CUDA device")
    return torch.device(device)


class Extractor:
    """VGG on one device; call it with a normalised (N, 3, H, W) batch."""

    def __init__(self, arch: str, weights: str, *, device: str = "auto", precision: str = "auto",
                 num_threads: Optional[int] = None, storage_options: Optional[dict] = None,
                 compile: str = "off") -> None:
        self.device = resolve_device(device)
        self.precision = resolve_precision(precision, self.device)
        if self.device.type == "cpu" and num_threads:
            torch.set_num_threads(num_threads)
        model, self.weights = load_model(arch, weights, storage_options)
        self.model = prepare_model(model, self.precision, self.device)
        if self.device.type == "cuda":
            torch.backends.cudnn.benchmark = True  # fixed 224x224 batches: autotune once
        fmt = torch.channels_last if uses_channels_last(self.precision, self.device) else torch.contiguous_format
        # runtime.compile: the compiled model replaces this one between batches once it is built.
        self.compiler = BackgroundCompiler(self.model, compile, self.device, memory_format=fmt)
        self.compiled_images = 0   # images the compiled model embedded (part files record it)
        log.info("model %s on %s (%s), weights %s", arch, self.device, self.precision, self.weights.name)

    @property
    def weights_info(self) -> WeightsInfo:
        return self.weights

    @property
    def dtype(self) -> torch.dtype:
        """The dtype of the weights and of the model's input."""
        return dtype(self.precision)

    def prepare(self, batch: torch.Tensor) -> torch.Tensor:
        """A normalised float32 batch -> this model's device, dtype and layout."""
        return prepare_input(batch, self.precision, self.device)

    @torch.inference_mode()
    def __call__(self, batch: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        n = batch.shape[0]
        model, x, compiled = self.compiler.select(self.prepare(batch))
        fc7, logits = model(x)
        fc7, logits = fc7[:n].float().cpu().numpy(), logits[:n].float().cpu().numpy()  # padding dropped
        self.compiled_images += n if compiled else 0
        return fc7, logits

    # The mapper contract (pipeline.model.mapper.Mapper).
    needs_image = False  # the decoders hand over 224x224 crops only
    min_side = RESIZE    # the recipe's resize: JPEG draft decoding may go down to 4x this
    columns: Sequence[OutputColumn] = (OutputColumn.vector("fc7", FC7_DIM),
                                       OutputColumn.vector("logits", NUM_CLASSES))

    def embed(self, batch: Union[Batch, Sequence[Decoded]]) -> dict[str, np.ndarray]:
        """A batch (or a list of decoded items) -> ``fc7`` and ``logits``, one row per image."""
        fc7, logits = self(as_batch(batch).pixels)
        return {"fc7": fc7, "logits": logits}
