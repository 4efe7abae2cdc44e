"""The mapper contract: the model side of reader -> mapper -> writer.

:class:`Mapper` is everything the worker and the writer know about a model: whether it needs the
whole decoded image (or only the 224x224 crop), the smallest shorter side a decoder must keep,
the columns it adds to the embeddings table (name and Arrow type), and ``embed``.  The writer
builds the Parquet schema and table from :attr:`Mapper.columns`, so a new output column is
declared once, next to the code that computes it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol, Sequence, runtime_checkable

import numpy as np
import pyarrow as pa

if TYPE_CHECKING:  # the contract itself stays light: the writer (and the CLI) import it without torch
    import torch

    from ..decode.preprocess import Batch
    from .weights import WeightsInfo


@dataclass(frozen=True)
class OutputColumn:
    """One embeddings column a mapper fills: ``embed`` returns it as an (N, width) array."""

    name: str
    type: pa.DataType   # the Arrow type of one row, e.g. ``pa.list_(pa.float32(), 4096)``

    @staticmethod
    def vector(name: str, width: int) -> "OutputColumn":
        """A float32 vector of ``width`` per image (fixed-size list)."""
        return OutputColumn(name, pa.list_(pa.float32(), width))


@runtime_checkable
class Mapper(Protocol):
    """What the worker needs of a model (implemented by ``Extractor`` and ``DenseExtractor``)."""

    device: torch.device
    precision: str
    weights: WeightsInfo
    compiled_images: int   # images the torch.compile'd model embedded so far (0: it never compiles)

    @property
    def needs_image(self) -> bool:
        """True: ``embed`` reads ``batch.images`` (whole RGB PIL images), not only the crops."""

    @property
    def min_side(self) -> int:
        """The smallest shorter side a decoder may reduce an image to (JPEG draft decoding)."""

    @property
    def columns(self) -> Sequence[OutputColumn]:
        """The columns ``embed`` returns, in table order (``fc7`` and ``logits`` first)."""

    def embed(self, batch: Batch) -> dict[str, np.ndarray]:
        """One (N, width) array per declared column, row j for ``batch.positions[j]``."""
