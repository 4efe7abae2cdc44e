"""The VGG family of Simonyan & Zisserman (ICLR 2015), Table 1, as data plus one builder.

State-dict keys match ``torchvision.models.vgg*`` exactly (``features.N.*``,
``classifier.0/3/6.*``), so torchvision's ImageNet weights load unchanged.  One forward
pass returns both the fc7 embedding (second FC layer after its ReLU, Caffe's ``relu7``)
and the 1000 class logits.

Example::

    >>> import torch
    >>> from pipeline.model.vgg import build_vgg
    >>> net = build_vgg("vgg11").eval()
    >>> fc7, logits = net(torch.zeros(1, 3, 224, 224))
    >>> tuple(fc7.shape), tuple(logits.shape)
    ((1, 4096), (1, 1000))
"""

from __future__ import annotations

from typing import Union

import torch
from torch import nn

from .archs import ARCH_TO_CONFIG, ARCHS, CONFIGS, FC7_DIM, NUM_CLASSES  # noqa: F401 - re-exported



class VGG(nn.Module):
    """VGG with torchvision's module layout; ``forward`` returns ``(fc7, logits)``."""

    def __init__(self, cfg: list[Union[int, str]], batch_norm: bool = False,
                 num_classes: int = NUM_CLASSES) -> None:
        super().__init__()
        self.features = make_features(cfg, batch_norm)
        # torchvision keeps a 7x7 adaptive pool so inputs other than 224 still reach the classifier.
        self.avgpool = nn.AdaptiveAvgPool2d((7, 7))
        self.classifier = nn.Sequential(
            nn.Linear(512 * 7 * 7, FC7_DIM), nn.ReLU(True), nn.Dropout(),
            nn.Linear(FC7_DIM, FC7_DIM), nn.ReLU(True), nn.Dropout(),
            nn.Linear(FC7_DIM, num_classes),
        )

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = torch.flatten(self.avgpool(self.features(x)), 1)
        fc7 = self.classifier[:6](x)  # up to and including relu7 (+ dropout, identity in eval)
        return fc7, self.classifier[6](fc7)


def make_features(cfg: list[Union[int, str]], batch_norm: bool) -> nn.Sequential:
    layers: list[nn.Module] = []
    in_channels = 3
    for v in cfg:
        if v == "M":
            layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
            continue
        layers.append(nn.Conv2d(in_channels, int(v), kernel_size=3, padding=1))
        if batch_norm:
            layers.append(nn.BatchNorm2d(int(v)))
        layers.append(nn.ReLU(inplace=True))
        in_channels = int(v)
    return nn.Sequential(*layers)


def build_vgg(arch: str = "vgg16") -> VGG:
    """Build an uninitialised-weights VGG for ``arch`` in :data:`ARCHS` (e.g. ``vgg16_bn``)."""
    if arch not in ARCHS:
        raise ValueError(f"unknown model.arch {arch!r}; choose one of {', '.join(ARCHS)}")
    base, _, bn = arch.partition("_")
    model = VGG(CONFIGS[ARCH_TO_CONFIG[base]], batch_norm=bool(bn))
    init_weights(model)
    return model


def init_weights(model: nn.Module, seed: int | None = None) -> None:
    """torchvision's initialisation (Kaiming convs, N(0, 0.01) linears), optionally seeded."""
    gen = torch.Generator().manual_seed(seed) if seed is not None else None
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.Conv2d):
                fan_out = m.out_channels * m.kernel_size[0] * m.kernel_size[1]
                m.weight.normal_(0.0, (2.0 / fan_out) ** 0.5, generator=gen)
                m.bias.zero_()
            elif isinstance(m, nn.BatchNorm2d):
                m.weight.fill_(1.0)
                m.bias.zero_()
            elif isinstance(m, nn.Linear):
                m.weight.normal_(0.0, 0.01, generator=gen)
                m.bias.zero_()
