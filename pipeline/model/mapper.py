"""The mapper: the model side of reader -> mapper -> writer, built from the config."""

from __future__ import annotations

from typing import Optional

from .extractor import Extractor


def make_mapper(cfg: dict, storage_options: Optional[dict], num_threads: Optional[int]):
    m, rt = cfg["model"], cfg["runtime"]
    kwargs = dict(device=rt["device"], precision=rt["precision"], num_threads=num_threads,
                  storage_options=storage_options)
    if m["descriptor"] == "dense-multiscale":
        from .descriptor import DenseExtractor
        return DenseExtractor(m["arch"], m["weights"], scales=m["scales"],
                              aggregation=m["scale_aggregation"], **kwargs)
    return Extractor(m["arch"], m["weights"], **kwargs)
