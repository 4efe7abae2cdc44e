"""The dense multi-scale descriptor (issue 7, docs/design.md §1): FC layers as convolutions, scales, flips.

Everything runs vgg11 on small photos at scales 224 and 256; the reference implementation below
slides the *Linear* classifier over every 7x7 pool5 window, so it shares no code with the
convolutional head it checks.
"""

from __future__ import annotations

import json

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from pipeline.model.descriptor import (MAX_SIDE, DenseExtractor, DenseVGG, aggregate, plan_batches,
                                 scale_image)
from pipeline.errors import UsageError
from pipeline.decode.preprocess import MEAN, STD, preprocess_pil
from pipeline.decode.preprocess import Decoded
from tests.corpus import small_photo

SCALES = [224, 256]


@pytest.fixture(scope="module")
def ex(vgg11_weights) -> DenseExtractor:
    return DenseExtractor("vgg11", str(vgg11_weights), scales=SCALES, aggregation="mean",
                          device="cpu", precision="fp32")  # the fp32-exact reference tests below


def photo(index: int, size: tuple[int, int] = (300, 240), shift: int = 0) -> Image.Image:
    """A real photo cropped to ``size`` (w, h): small, so a dense pass has only a few positions."""
    img = small_photo(index)
    w, h = size
    x, y = min(shift, img.width - w), min(shift, img.height - h)
    return img.crop((x, y, x + w, y + h))


def item(pos: int, img: Image.Image) -> Decoded:
    return Decoded(pos, preprocess_pil(img), img.width, img.height, img)


def normalized(img: Image.Image) -> torch.Tensor:
    x = torch.from_numpy(np.asarray(img, dtype=np.float32) / 255.0).permute(2, 0, 1)
    return (x - torch.tensor(MEAN).view(3, 1, 1)) / torch.tensor(STD).view(3, 1, 1)


@torch.inference_mode()
def reference_per_scale(model, img: Image.Image, scales: list[int]) -> tuple[list, torch.Tensor]:
    """The paper's recipe written out slowly: per-scale fc7 vectors, dense class posteriors."""
    per_scale, probs = [], []
    for q in scales:
        w, h = img.size
        size = (q, int(q * h / w)) if w <= h else (int(q * w / h), q)
        resized = img.resize(size, Image.Resampling.BILINEAR)
        views = []
        for view in (resized, resized.transpose(Image.Transpose.FLIP_LEFT_RIGHT)):
            pool5 = model.features(normalized(view)[None])[0]
            windows = [pool5[:, i:i + 7, j:j + 7].reshape(-1)
                       for i in range(pool5.shape[1] - 6) for j in range(pool5.shape[2] - 6)]
            fc7 = model.classifier[:6](torch.stack(windows))  # Linear fc6, fc7 per window
            views.append((fc7.mean(0), model.classifier[6](fc7).softmax(1).mean(0)))
        per_scale.append((views[0][0] + views[1][0]) / 2)
        probs.append((views[0][1] + views[1][1]) / 2)
    return per_scale, torch.stack(probs).mean(0)


def reference_descriptor(per_scale: list[torch.Tensor], how: str) -> np.ndarray:
    if how == "mean":
        d = torch.stack(per_scale).mean(0)
    else:
        d = torch.cat([v / v.norm() for v in per_scale])
    return (d / d.norm()).numpy()


REF_IMAGE = (2, (260, 224))  # photo 2 cropped: 1x2 fc positions at Q=224, 2x3 at Q=256


@pytest.fixture(scope="module")
def ref(ex):
    return reference_per_scale(ex.model, photo(*REF_IMAGE), SCALES)


def test_dense_head_at_224_is_the_standard_network(ex):
    x = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        fc7_map, scores = DenseVGG(ex.model)(x)
        fc7, logits = ex.model(x)
    assert fc7_map.shape == (2, 4096, 1, 1) and scores.shape == (2, 1000, 1, 1)
    torch.testing.assert_close(fc7_map[:, :, 0, 0], fc7)
    torch.testing.assert_close(scores[:, :, 0, 0], logits)
    # The conv kernels are views of the Linear weights: no second copy of fc6 exists.
    assert sum(p.numel() for p in DenseVGG(ex.model).parameters()) == sum(
        p.numel() for p in ex.model.parameters())


def test_dense_head_on_larger_input_is_a_map(ex):
    with torch.inference_mode():
        fc7_map, scores = DenseVGG(ex.model)(torch.zeros(1, 3, 256, 320))
    assert fc7_map.shape == (1, 4096, 2, 4) and scores.shape == (1, 1000, 2, 4)


def test_q224_on_224_image_is_standard_fc7_of_image_and_flip(ex, monkeypatch):
    monkeypatch.setattr(ex, "scales", [224])
    img = photo(0, (224, 224), shift=60)
    out = ex.embed([item(0, img)])
    x = normalized(img)
    with torch.inference_mode():
        fc7, _ = ex.model(torch.stack([x, x.flip(-1)]))
    want = fc7.mean(0) / fc7.mean(0).norm()
    torch.testing.assert_close(torch.from_numpy(out["descriptor"][0]), want, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("how", ["mean", "stack"])
def test_matches_slow_reference(ex, ref, monkeypatch, how):
    monkeypatch.setattr(ex, "aggregation", how)
    img = photo(*REF_IMAGE)
    out = ex.embed([item(0, img)])
    want, want_probs = reference_descriptor(ref[0], how), ref[1].numpy()
    desc = out["descriptor"][0]
    assert out["descriptor"].dtype == np.float32 and desc.shape == (ex.descriptor_dim,)
    assert ex.descriptor_dim == (4096 if how == "mean" else 4096 * len(SCALES))
    np.testing.assert_allclose(desc, want, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(out["dense_probs"][0], want_probs, rtol=1e-4, atol=1e-7)
    assert np.linalg.norm(desc) == pytest.approx(1.0, abs=1e-5)
    if how == "stack":  # each scale was unit-norm before the concatenation
        blocks = np.linalg.norm(desc.reshape(len(SCALES), 4096), axis=1)
        np.testing.assert_allclose(blocks, 1 / np.sqrt(len(SCALES)), rtol=1e-5)
    # The standard columns keep their meaning: center-crop fc7 and logits.
    with torch.inference_mode():
        fc7, logits = ex.model(preprocess_pil(img)[None])
    np.testing.assert_allclose(out["fc7"][0], fc7[0].numpy(), rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(out["logits"][0], logits[0].numpy(), rtol=1e-5, atol=1e-7)


def test_mixed_sizes_are_bucketed_and_equal_per_image(ex, monkeypatch):
    monkeypatch.setattr(ex, "scales", [224])  # one scale is enough for the batching logic
    imgs = [photo(0), photo(2).transpose(Image.Transpose.TRANSPOSE), photo(3, shift=20)]
    passes: list[tuple[int, ...]] = []
    pooled = ex._pooled
    monkeypatch.setattr(ex, "_pooled", lambda x: (passes.append(tuple(x.shape)), pooled(x))[1])
    batch = ex.embed([item(i, im) for i, im in enumerate(imgs)])
    # Two shapes, two passes: photos 0 and 3 share theirs, with their flips.
    assert sorted(passes) == [(2, 3, 280, 224), (4, 3, 224, 280)]
    singles = [ex.embed([item(0, im)]) for im in imgs]
    for key in ("descriptor", "dense_probs", "fc7", "logits"):
        np.testing.assert_allclose(batch[key], np.concatenate([s[key] for s in singles]),
                                   rtol=1e-4, atol=1e-6)
    # Memory cap below one image: each image and each flip in a pass of its own, same result.
    monkeypatch.setattr(ex, "max_batch_pixels", 1)
    passes.clear()
    capped = ex.embed([item(0, imgs[0])])
    assert passes == [(1, 3, 224, 280)] * 2
    np.testing.assert_allclose(capped["descriptor"], batch["descriptor"][:1], rtol=1e-4, atol=1e-6)


def test_plan_batches_groups_by_shape_and_caps_pixels():
    shapes = [(224, 300), (300, 224), (224, 300), (224, 300)]
    assert plan_batches(shapes, 10**9) == [[0, 2, 3], [1]]
    assert plan_batches(shapes, 2 * 2 * 224 * 300) == [[0, 2], [3], [1]]
    assert plan_batches(shapes, 1) == [[0], [2], [3], [1]]


def test_aggregate():
    per_scale = torch.tensor([[[3.0, 4.0], [0.0, 2.0]]])  # one image, two scales, D = 2
    torch.testing.assert_close(aggregate(per_scale, "mean"), torch.tensor([[1.5, 3.0]]) / 11.25 ** 0.5)
    s = 2 ** -0.5
    torch.testing.assert_close(aggregate(per_scale, "stack"), torch.tensor([[0.6 * s, 0.8 * s, 0, s]]))
    with pytest.raises(ValueError):
        aggregate(per_scale, "max")


def test_scale_image_resizes_shorter_side_and_caps_long_side():
    img = small_photo(2).resize((300, 200))
    assert tuple(scale_image(img, 256).shape) == (3, 256, 384)
    wide = img.resize((3000, 300))
    out = scale_image(wide, 224)  # 2240 x 224 -> central 2048 columns
    assert tuple(out.shape) == (3, 224, MAX_SIDE) and out.dtype == torch.uint8
    full = np.asarray(wide.resize((2240, 224), Image.Resampling.BILINEAR))
    np.testing.assert_array_equal(out.permute(1, 2, 0).numpy(), full[:, 96:96 + MAX_SIDE])


def test_bad_settings_and_missing_image(ex):
    with pytest.raises(UsageError, match="224"):
        DenseExtractor("vgg11", "random:0", scales=[200])
    with pytest.raises(UsageError, match="mean, stack"):
        DenseExtractor("vgg11", "random:0", aggregation="max")
    it = item(0, photo(0))
    it.image = None
    with pytest.raises(RuntimeError, match="keep_image"):
        ex.embed([it])
    assert DenseExtractor.needs_image and ex.min_side == 256


@pytest.mark.gpu
def test_cuda_matches_cpu(ex, vgg11_weights):
    gpu = DenseExtractor("vgg11", str(vgg11_weights), scales=SCALES, device="cuda")
    items = [item(0, photo(0)), item(1, photo(2).transpose(Image.Transpose.TRANSPOSE))]
    a, b = ex.embed(items)["descriptor"], gpu.embed(items)["descriptor"]
    assert gpu.precision == "bf16" and b.shape == a.shape
    assert (np.sum(a * b, axis=1) >= 0.999).all()  # both unit-norm: the cosine


@pytest.mark.parametrize("how,dim", [("mean", 4096), ("stack", 8192)])
def test_extract_end_to_end(ray_local, vgg11_weights, tmp_path, how, dim):
    import pipeline
    from pipeline.output.embeddings import load_embeddings
    from pipeline.output.verify import verify

    src = tmp_path / "in"
    src.mkdir()
    for i in range(2):
        small_photo(i).save(src / f"{i}.jpg", quality=90)
    out = tmp_path / "out"
    summary = pipeline.extract(str(src), str(out), weights=str(vgg11_weights),
                               model={"arch": "vgg11", "descriptor": "dense-multiscale",
                                      "scales": [224, 256], "scale_aggregation": how},
                               input__shard_size=1)
    assert summary["counts"]["embedded"] == 2 and summary["counts"]["errors"] == 0
    report = verify(str(out))
    assert report.ok, report.problems
    assert report.embedded == 2 and report.shards == 2 and report.errors == 0
    emb = load_embeddings(str(out), "descriptor")
    assert emb.vectors.shape == (2, dim)
    np.testing.assert_allclose(np.linalg.norm(emb.vectors, axis=1), 1.0, rtol=1e-5)
    assert load_embeddings(str(out), "fc7").vectors.shape == (2, 4096)
    probs = load_embeddings(str(out), "dense_probs").vectors  # the dense class scores, own column
    assert probs.shape == (2, 1000)
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, rtol=1e-4)
    part = sorted((out / "embeddings").glob("part-*.parquet"))[0]
    meta = json.loads(pq.read_schema(part).metadata[b"vgg_pipeline"])
    assert meta["model"]["descriptor"] == "dense-multiscale"
    assert meta["model"]["scales"] == [224, 256] and meta["model"]["scale_aggregation"] == how
