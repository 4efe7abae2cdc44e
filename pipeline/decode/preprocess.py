"""Preprocessing: torchvision's IMAGENET1K_V1 recipe (docs/design.md §2), on the CPU and on the GPU.

CPU: resize the shorter side to 256 with PIL bilinear (PIL always antialiases), center crop 224,
scale to [0, 1], normalise — the exact operations of ``VGG16_Weights.IMAGENET1K_V1.transforms()``
applied to a PIL image, so the CPU path is bit-identical to torchvision.

GPU: the same steps on uint8 CHW tensors already on the device (``decode_jpeg(device="cuda")``
output), with torchvision's antialiased bilinear tensor resize; agrees with the CPU path to
fc7 cosine >= 0.999 (tested under the ``gpu`` marker).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence, Union

import torch
import torchvision.transforms.v2.functional as F
from PIL import Image

RESIZE = 256
CROP = 224
MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)
DESCRIPTION = {"recipe": "torchvision IMAGENET1K_V1", "resize": RESIZE, "crop": CROP,
               "interpolation": "bilinear", "antialias": True, "mean": MEAN, "std": STD}


def preprocess_pil(img: Image.Image) -> torch.Tensor:
    """RGB PIL image -> normalised float32 tensor (3, 224, 224)."""
    img = F.resize(img, [RESIZE], interpolation=F.InterpolationMode.BILINEAR, antialias=True)
    img = F.center_crop(img, [CROP, CROP])
    x = F.to_dtype(F.pil_to_tensor(img), torch.float32, scale=True)
    return F.normalize(x, MEAN, STD)


def resize_crop_uint8(img: torch.Tensor) -> torch.Tensor:
    """uint8 (3, H, W) tensor on any device -> uint8 (3, 224, 224), the recipe's geometry."""
    img = F.resize(img, [RESIZE], interpolation=F.InterpolationMode.BILINEAR, antialias=True)
    return F.center_crop(img, [CROP, CROP])


def normalize_batch(batch_uint8: torch.Tensor) -> torch.Tensor:
    """uint8 (N, 3, 224, 224) -> normalised float32, on the batch's device.

    The arithmetic of :func:`preprocess_pil` (torchvision's ``to_dtype(scale=True)`` multiplies by
    1/255, ``normalize`` subtracts the mean and divides by the std), batched and in place: a CPU crop
    normalised here is bit for bit the reader's tensor.
    """
    x = batch_uint8.to(torch.float32).mul_(1.0 / 255)
    mean = torch.tensor(MEAN, device=x.device).view(-1, 1, 1)
    std = torch.tensor(STD, device=x.device).view(-1, 1, 1)
    return x.sub_(mean).div_(std)


@dataclass
class Decoded:
    """One image ready for the mapper (from the CPU reader or the GPU decoder)."""

    pos: int
    pixels: torch.Tensor  # preprocessed (3, 224, 224) float32
    width: int
    height: int
    image: object = None  # the RGB PIL image, kept only when the mapper needs the whole image


@dataclass
class Batch:
    """What the mapper embeds: ``pixels[j]`` is the image at plan position ``positions[j]``.

    Built once per batch from whichever decoder made the images (the decode processes' uint8
    crops, the GPU decoder's device batch, or :class:`Decoded` items), so nothing downstream
    handles images one by one.
    """

    positions: list[int]
    pixels: torch.Tensor                  # normalised float32 (N, 3, 224, 224), on any device
    widths: list[int]                     # full upright size of each image
    heights: list[int]
    images: Optional[list] = None         # the RGB PIL images, for mappers that need whole images

    def __len__(self) -> int:
        return len(self.positions)

    @classmethod
    def of(cls, items: Sequence[Decoded]) -> "Batch":
        """Stack :class:`Decoded` items (their ``image`` kept when every item has one)."""
        images = [it.image for it in items]
        return cls([it.pos for it in items], torch.stack([it.pixels for it in items]),
                   [it.width for it in items], [it.height for it in items],
                   images if all(im is not None for im in images) else None)

    def select(self, index: Sequence[int]) -> "Batch":
        """The images at ``index`` (batch offsets) as a batch of their own."""
        return Batch([self.positions[j] for j in index], self.pixels[list(index)],
                     [self.widths[j] for j in index], [self.heights[j] for j in index],
                     None if self.images is None else [self.images[j] for j in index])


def as_batch(batch: Union[Batch, Sequence[Decoded]]) -> Batch:
    """A :class:`Batch` as it is, or a list of :class:`Decoded` items stacked into one."""
    return batch if isinstance(batch, Batch) else Batch.of(batch)
