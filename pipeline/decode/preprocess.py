"""Preprocessing: torchvision's IMAGENET1K_V1 recipe (DESIGN §2), on the CPU and on the GPU.

CPU: resize the shorter side to 256 with PIL bilinear (PIL always antialiases), center crop 224,
scale to [0, 1], normalise — the exact operations of ``VGG16_Weights.IMAGENET1K_V1.transforms()``
applied to a PIL image, so the CPU path is bit-identical to torchvision.

GPU: the same steps on uint8 CHW tensors already on the device (``decode_jpeg(device="cuda")``
output), with torchvision's antialiased bilinear tensor resize; agrees with the CPU path to
fc7 cosine >= 0.999 (tested under the ``gpu`` marker).
"""

from __future__ import annotations

from dataclasses import dataclass

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
    """uint8 (N, 3, 224, 224) -> normalised float32, on the batch's device."""
    x = batch_uint8.to(torch.float32).div_(255.0)
    mean = torch.tensor(MEAN, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(STD, device=x.device).view(1, 3, 1, 1)
    return x.sub_(mean).div_(std)


@dataclass
class Decoded:
    """One image ready for the mapper (from the CPU reader or the GPU decoder)."""

    pos: int
    pixels: torch.Tensor  # preprocessed (3, 224, 224) float32
    width: int
    height: int
    image: object = None  # the RGB PIL image, kept only when the mapper needs the whole image
