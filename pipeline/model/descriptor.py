"""The paper's dense multi-scale descriptor (Simonyan & Zisserman 2015, section 3.2; docs/design.md §1).

At test time the paper turns the fully connected layers into convolutions -- fc6 a 7x7 conv,
fc7 and fc8 1x1 convs, with the *same* weights -- so the network runs on the whole, uncropped
image at any size >= 224 and yields a spatial map of fc7 activations and class scores.  Here:

* per scale Q in ``model.scales``: resize the whole image so its shorter side is Q (bilinear,
  antialiased, as the standard preprocessing), keep at most the central :data:`MAX_SIDE` px of
  each side, normalise with the ImageNet mean/std, run the dense network on the image and on its
  horizontal flip, average each fc7 map spatially and take the mean of the two vectors;
* ``mean`` aggregation: average the per-scale vectors, L2-normalise (4096-d);
  ``stack``: L2-normalise each scale, concatenate, L2-normalise again (4096 x |Q|).

:class:`DenseExtractor` is the pipeline's mapper for ``model.descriptor: dense-multiscale``.  It
*is* an :class:`~pipeline.model.extractor.Extractor` (same model loading, device and precision) and
still writes the standard center-crop ``fc7``/``logits``, adding ``descriptor`` and
``dense_probs`` (the paper's dense class posteriors: softmax at every position, averaged over
positions, the flip and the scales).

Images of a batch are resized per scale, then grouped by resized shape (a bucket runs as one
forward pass, image and flip together) and cut so one pass holds at most ``max_batch_pixels``
input pixels; an image too large for that runs alone, its flip in a second pass.

Example::

    >>> from pipeline.model.descriptor import DenseExtractor
    >>> ex = DenseExtractor("vgg11", "random:0", scales=[224, 256])   # doctest: +SKIP
    >>> out = ex.embed(items)        # items: reader.Decoded with .image kept   # doctest: +SKIP
    >>> out["descriptor"].shape                                             # doctest: +SKIP
    (8, 4096)
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Optional, Union

import numpy as np
import torch
import torch.nn.functional as TF
import torchvision.transforms.v2.functional as F
from PIL import Image
from torch import nn

from ..errors import UsageError
from ..decode.preprocess import Batch, Decoded, as_batch, normalize_batch
from .archs import NUM_CLASSES, dense_descriptor_dim
from .extractor import Extractor
from .mapper import OutputColumn
from .vgg import FC7_DIM, VGG

log = logging.getLogger(__name__)

MIN_SCALE = 224     # the dense network needs a 7x7 pool5 map: one fc6 position
MAX_SIDE = 2048     # longer side cap after resizing (central region kept)
FC6_KERNEL = 7      # pool5 of a 224 input is 7x7: fc6 sees a 7x7 window
AGGREGATIONS = ("mean", "stack")
# The dense path's own preprocessing beyond the scales (recorded in the resume fingerprint).
DESCRIPTION = {"resize": "shorter side to each scale", "interpolation": "bilinear", "antialias": True,
               "max_side": MAX_SIDE, "flip": "mean of image and horizontal flip",
               "pooling": "spatial mean of fc7 and of per-position softmax"}
# Input pixels (images + flips) of one forward pass on the CPU: 4 pairs at 512x512 (~1 GiB of
# VGG16 fp32 activations: two 64-channel maps at full resolution).
CPU_MAX_BATCH_PIXELS = 4 * 2 * 512 * 512
# On CUDA: about one input pixel per KiB of 30% of the card (VGG16's first block keeps two
# 64-channel maps per pixel, 512 B in fp32, plus cuDNN workspace).
CUDA_MEMORY_FRACTION = 0.3


class DenseVGG(nn.Module):
    """A :class:`~pipeline.model.vgg.VGG` run fully convolutionally (the paper's dense evaluation).

    Holds ``vgg`` itself: fc6/fc7/fc8 become 7x7/1x1/1x1 convolutions through *views* of the
    Linear weights (``(4096, 25088) -> (4096, 512, 7, 7)``, matching torch.flatten's C, H, W
    order), so nothing is copied and the dense net always uses the classifier's current weights.
    ``forward(x)`` with ``x`` of (N, 3, H, W), H, W >= 224, returns ``(fc7_map, scores_map)`` of
    (N, 4096, h, w) (after relu7) and (N, 1000, h, w), one position per 7x7 pool5 window.
    """

    def __init__(self, vgg: VGG) -> None:
        super().__init__()
        self.vgg = vgg

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        fc6, fc7, fc8 = self.vgg.classifier[0], self.vgg.classifier[3], self.vgg.classifier[6]
        pool5 = self.vgg.features(x)
        h = TF.relu(TF.conv2d(pool5, fc6.weight.view(fc6.out_features, -1, FC6_KERNEL, FC6_KERNEL),
                              fc6.bias))
        h = TF.relu(TF.conv2d(h, fc7.weight.view(*fc7.weight.shape, 1, 1), fc7.bias))
        return h, TF.conv2d(h, fc8.weight.view(*fc8.weight.shape, 1, 1), fc8.bias)


def scale_image(img: Image.Image, q: int, max_side: int = MAX_SIDE) -> torch.Tensor:
    """RGB PIL image -> uint8 (3, H, W): shorter side resized to ``q``, sides capped at ``max_side``.

    Same resize as the standard recipe (PIL bilinear, which always antialiases); the cap keeps
    the central region, as the standard recipe's center crop does.
    """
    img = F.resize(img, [q], interpolation=F.InterpolationMode.BILINEAR, antialias=True)
    if max(img.size) > max_side:
        img = F.center_crop(img, [min(img.height, max_side), min(img.width, max_side)])
    return F.pil_to_tensor(img)


def plan_batches(shapes: Sequence[tuple[int, int]], max_pixels: int) -> list[list[int]]:
    """Bucket job indices by (H, W) and cut buckets so a pass (images + flips) <= ``max_pixels``.

    Buckets keep first-seen order and jobs keep their order inside a bucket.  A job whose own
    image and flip exceed ``max_pixels`` still gets a batch of its own (run in two passes).
    """
    buckets: dict[tuple[int, int], list[int]] = {}
    for i, shape in enumerate(shapes):
        buckets.setdefault((int(shape[0]), int(shape[1])), []).append(i)
    batches = []
    for (h, w), jobs in buckets.items():
        per = max(1, max_pixels // (2 * h * w))
        batches += [jobs[k:k + per] for k in range(0, len(jobs), per)]
    return batches


def aggregate(per_scale: torch.Tensor, how: str) -> torch.Tensor:
    """(N, S, D) per-scale vectors -> (N, D) for ``mean`` or (N, S*D) for ``stack``, unit L2 norm."""
    if how == "mean":
        return TF.normalize(per_scale.mean(1), dim=1)
    if how == "stack":
        return TF.normalize(TF.normalize(per_scale, dim=2).flatten(1), dim=1)
    raise ValueError(f"unknown scale aggregation {how!r}; choose one of {', '.join(AGGREGATIONS)}")


def default_max_batch_pixels(device: torch.device) -> int:
    if device.type == "cuda":
        total = torch.cuda.get_device_properties(device).total_memory
        return max(2 * 512 * 512, int(total * CUDA_MEMORY_FRACTION) // 1024)
    return CPU_MAX_BATCH_PIXELS


class DenseExtractor(Extractor):
    """Mapper for ``model.descriptor: dense-multiscale``: standard fc7/logits plus the descriptor.

    ``embed(items)`` returns ``fc7`` (n, 4096) and ``logits`` (n, 1000) of the standard 224
    center crop, ``descriptor`` (n, :attr:`descriptor_dim`) float32 with unit L2 norm, and
    ``dense_probs`` (n, 1000): the softmax class posteriors averaged over positions, flip and
    scales.  ``min_side`` is the shorter side the reader should keep when it decodes (the
    largest scale), so a draft JPEG decode never has to be upsampled.
    """

    needs_image = True  # the reader keeps the RGB image: the descriptor uses it uncropped
    compiled_images = 0  # whole images of every shape: always eager (runtime.compile does not apply)

    def __init__(self, arch: str, weights: str, *, scales: Sequence[int] = (256, 384, 512),
                 aggregation: str = "mean", max_batch_pixels: Optional[int] = None,
                 **kwargs) -> None:
        self.scales = [int(q) for q in scales]
        if not self.scales or min(self.scales) < MIN_SCALE:
            raise UsageError(f"model.scales must be a non-empty list of sizes >= {MIN_SCALE}, "
                             f"got {list(scales)}")
        if aggregation not in AGGREGATIONS:
            raise UsageError(f"model.scale_aggregation must be one of {', '.join(AGGREGATIONS)}, "
                             f"got {aggregation!r}")
        self.aggregation = aggregation
        super().__init__(arch, weights, **kwargs)
        if self.device.type == "cuda":
            # Whole images come in many shapes; cuDNN autotuning would re-run for every new one.
            torch.backends.cudnn.benchmark = False
        self.dense = DenseVGG(self.model)
        self.max_batch_pixels = max_batch_pixels or default_max_batch_pixels(self.device)
        log.info("dense multi-scale descriptor: scales %s, aggregation %s, <= %d px per pass",
                 self.scales, self.aggregation, self.max_batch_pixels)

    @property
    def descriptor_dim(self) -> int:
        return dense_descriptor_dim(len(self.scales), self.aggregation)

    @property
    def min_side(self) -> int:
        return max(self.scales)

    @property
    def columns(self) -> Sequence[OutputColumn]:
        return (*Extractor.columns, OutputColumn.vector("descriptor", self.descriptor_dim),
                # the dense network's class scores: softmax averaged over positions, flips and scales
                OutputColumn.vector("dense_probs", NUM_CLASSES))

    @torch.inference_mode()
    def embed(self, batch: Union[Batch, Sequence[Decoded]]) -> dict[str, np.ndarray]:
        """A batch with its whole images -> ``fc7``, ``logits``, ``descriptor``, ``dense_probs``."""
        batch = as_batch(batch)
        if batch.images is None:
            raise RuntimeError("the dense descriptor needs the decoded image: read with keep_image=True")
        images = batch.images
        fc7, logits = self(batch.pixels)
        jobs = [(i, s) for i in range(len(images)) for s in range(len(self.scales))]
        # PIL resizes release the GIL: one thread per core the actor has.
        with ThreadPoolExecutor(max_workers=max(1, min(len(jobs), torch.get_num_threads()))) as pool:
            inputs = list(pool.map(lambda j: scale_image(images[j[0]], self.scales[j[1]]), jobs))
        pooled = torch.empty(len(images), len(self.scales), FC7_DIM)
        probs = torch.empty(len(images), len(self.scales), self.model.classifier[6].out_features)
        for batch in plan_batches([t.shape[1:] for t in inputs], self.max_batch_pixels):
            x = normalize_batch(torch.stack([inputs[k] for k in batch]).to(self.device))
            f, p = self._pair_batch(x)
            for row, k in enumerate(batch):
                pooled[jobs[k]], probs[jobs[k]] = f[row], p[row]
        return {"fc7": fc7, "logits": logits,
                "descriptor": aggregate(pooled, self.aggregation).numpy(),
                "dense_probs": probs.mean(1).numpy()}

    def _pair_batch(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Normalised same-shape batch -> per image the mean over (image, flip) of pooled fc7/probs.

        Image and flip share a pass when it fits ``max_batch_pixels``; otherwise (or when the GPU
        runs out of memory) images go one at a time, and a single image too large for the budget
        runs its flip in a second pass.
        """
        n, _, h, w = x.shape
        if 2 * n * h * w <= self.max_batch_pixels:
            try:
                f, p = self._pooled(torch.cat([x, x.flip(-1)]))
                return ((f[:n] + f[n:]) / 2).cpu(), ((p[:n] + p[n:]) / 2).cpu()
            except torch.cuda.OutOfMemoryError:
                torch.cuda.empty_cache()
                log.warning("out of GPU memory on %d images of %dx%d (and flips); splitting", n, w, h)
        if n > 1:
            parts = [self._pair_batch(x[i:i + 1]) for i in range(n)]
            return torch.cat([a for a, _ in parts]), torch.cat([b for _, b in parts])
        (f0, p0), (f1, p1) = self._pooled(x), self._pooled(x.flip(-1))
        return ((f0 + f1) / 2).cpu(), ((p0 + p1) / 2).cpu()

    def _pooled(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Normalised batch -> spatial means of the fc7 map and of the per-position softmax."""
        fc7_map, scores = self.dense(self.prepare(x))
        return fc7_map.float().mean((2, 3)), scores.float().softmax(1).mean((2, 3))
