"""The mapper a config asks for: the fc7 extractor or the dense multi-scale descriptor."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Optional

from .mapper import Mapper

if TYPE_CHECKING:  # annotation only: the model wing does not load the config module
    from ..config import Config

log = logging.getLogger(__name__)


def make_mapper(cfg: Config, storage_options: Optional[dict], num_threads: Optional[int]) -> Mapper:
    """The mapper of ``cfg.model`` on ``cfg.runtime``'s device and precision."""
    m, rt = cfg.model, cfg.runtime
    kwargs = dict(device=rt.device, precision=rt.precision, num_threads=num_threads,
                  storage_options=storage_options)
    if m.dense:
        from .descriptor import DenseExtractor
        if rt.compile == "on":  # whole images of every shape: one compiled shape would not serve them
            log.warning("runtime.compile=on applies to descriptor fc7; the dense descriptor runs eager")
        return DenseExtractor(m.arch, m.weights, scales=m.scales,
                              aggregation=m.scale_aggregation, **kwargs)
    from .extractor import Extractor
    return Extractor(m.arch, m.weights, compile=rt.compile, **kwargs)
