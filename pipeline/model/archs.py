"""Table 1 of Simonyan & Zisserman (2015) as data: the VGG configurations, importable without torch.

Numbers are conv output channels (3x3, stride 1, pad 1), ``"M"`` a 2x2 max-pool.  Kept apart from
:mod:`pipeline.model.vgg` so the CLI can validate ``model.arch`` without importing torch.
"""

from __future__ import annotations

from typing import Union

CONFIGS: dict[str, list[Union[int, str]]] = {
    "A": [64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"],
    "B": [64, 64, "M", 128, 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"],
    "D": [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"],
    "E": [64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M", 512, 512, 512, 512, "M",
          512, 512, 512, 512, "M"],
}
ARCH_TO_CONFIG = {"vgg11": "A", "vgg13": "B", "vgg16": "D", "vgg19": "E"}
ARCHS = tuple(a + bn for a in ARCH_TO_CONFIG for bn in ("", "_bn"))
FC7_DIM = 4096
NUM_CLASSES = 1000


def dense_descriptor_dim(num_scales: int, aggregation: str) -> int:
    """Width of the dense multi-scale descriptor: one fc7 per scale when stacked, else one."""
    return FC7_DIM * (num_scales if aggregation == "stack" else 1)
