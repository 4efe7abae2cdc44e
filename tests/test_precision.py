"""runtime.precision: what ``auto`` picks where, parity with torchvision fp32 on real photos for
every format ``auto`` can pick, what the outputs record, and that a change is a different model."""

from __future__ import annotations

import json
import logging
import platform

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
import torchvision

from pipeline.config import load_config, model_fingerprint
from pipeline.decode import preprocess
from pipeline.decode.preprocess import preprocess_pil
from pipeline.errors import UsageError
from pipeline.model import descriptor, precision
from pipeline.model.descriptor import DenseExtractor
from pipeline.model.extractor import Extractor
from pipeline.model.precision import NATIVE_BF16_FLAGS, _cpuinfo_flags, resolve_precision
from pipeline.model.weights import load_model
from tests.helpers import extract_thumbnails
from tests.corpus import sample_photos

CPU, CUDA = torch.device("cpu"), torch.device("cuda")
# Random heads leave some photos' two best classes within 1e-4 logits of each other, below
# bf16's rounding (~2e-3 here), where top-1 "agreement" would be a coin toss.  With random:1 every
# one of the 9 photos has a fp32 top-2 margin >= 0.02 (measured), so agreement is a real test.
PARITY_WEIGHTS = "random:1"


@pytest.fixture(scope="module")
def photos() -> torch.Tensor:
    return torch.stack([preprocess_pil(img) for _, img in sample_photos()])


@pytest.fixture(scope="module")
def torchvision_vgg16():
    """torchvision's own VGG16 in eager fp32, holding the parity weights."""
    model = torchvision.models.vgg16(weights=None).eval()
    model.load_state_dict(load_model("vgg16", PARITY_WEIGHTS)[0].state_dict())
    return model


def reference(model, x: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """torchvision fp32: fc7 (classifier up to relu7) and logits."""
    with torch.inference_mode():
        fc7 = model.classifier[:5](torch.flatten(model.avgpool(model.features(x)), 1))
        return fc7.numpy(), model(x).numpy()


def cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


# -- what auto picks --------------------------------------------------------------------------


@pytest.mark.parametrize("native, want", [(True, "bf16"), (False, "fp32")])
def test_auto_is_bf16_only_on_cpus_with_native_bf16(monkeypatch, native, want):
    monkeypatch.setattr(precision, "cpu_has_native_bf16", lambda: native)
    assert resolve_precision("auto", CPU) == want
    assert resolve_precision("fp32", CPU) == "fp32"
    assert resolve_precision("bf16", CPU) == "bf16"  # asked for explicitly: honoured, even emulated
    assert resolve_precision("auto", CUDA) == "bf16"
    assert resolve_precision("fp16", CUDA) == "fp16"


def test_fp16_on_a_cpu_worker_falls_back_to_what_auto_picks(monkeypatch, caplog):
    monkeypatch.setattr(precision, "cpu_has_native_bf16", lambda: False)
    with caplog.at_level(logging.WARNING, logger="pipeline.model.precision"):
        assert resolve_precision("fp16", CPU) == "fp32"
    assert "fp16 needs CUDA" in caplog.text


def test_config_refuses_fp16_on_the_cpu_device():
    with pytest.raises(UsageError, match="fp16 needs CUDA"):
        load_config(overrides=["runtime.device=cpu", "runtime.precision=fp16"])
    with pytest.raises(UsageError, match="bad value for runtime.precision"):
        load_config(overrides=["runtime.precision=int8"])
    assert load_config(overrides=["runtime.precision=fp16"]).runtime.precision == "fp16"


def test_native_bf16_is_read_from_the_cpu_flags(tmp_path):
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nflags\t\t: fpu sse2 avx512f avx512_bf16 avx_vnni\n\n"
                    "processor\t: 1\nflags\t\t: fpu sse2 avx512f avx512_bf16 avx_vnni\n")
    assert _cpuinfo_flags(str(info)) & NATIVE_BF16_FLAGS == {"avx512_bf16"}
    assert _cpuinfo_flags(str(tmp_path / "absent")) == frozenset()
    if platform.machine() in ("x86_64", "AMD64") and _cpuinfo_flags():
        # torch's own probe and the kernel's flags agree about this machine.
        assert precision.cpu_has_native_bf16() == bool(_cpuinfo_flags() & NATIVE_BF16_FLAGS)


# -- parity with torchvision fp32 -------------------------------------------------------------


def test_fp32_on_cpu_is_bit_identical_to_torchvision(photos, torchvision_vgg16):
    ex = Extractor("vgg16", PARITY_WEIGHTS, device="cpu", precision="fp32")
    assert ex.precision == "fp32" and next(ex.model.parameters()).dtype == torch.float32
    fc7, logits = ex(photos)
    want_fc7, want_logits = reference(torchvision_vgg16, photos)
    assert np.array_equal(logits, want_logits) and np.array_equal(fc7, want_fc7)


@pytest.mark.parametrize("fmt", ["fp32", "bf16"])  # what auto picks on a CPU without / with native bf16
def test_cpu_precision_matches_torchvision_fp32_on_real_photos(photos, torchvision_vgg16, fmt):
    ex = Extractor("vgg16", PARITY_WEIGHTS, device="cpu", precision=fmt)
    conv = ex.model.features[0].weight
    assert conv.dtype == ex.dtype == precision.dtype(fmt)  # weights cast once, not per batch
    assert conv.is_contiguous(memory_format=torch.channels_last) == (fmt != "fp32")
    fc7, logits = ex(photos)
    want_fc7, want_logits = reference(torchvision_vgg16, photos)
    assert fc7.dtype == logits.dtype == np.float32
    assert cosine(fc7, want_fc7).min() >= 0.999
    assert (logits.argmax(1) == want_logits.argmax(1)).all()


@pytest.mark.gpu
@pytest.mark.parametrize("fmt", ["bf16", "fp16"])
def test_cuda_precision_matches_torchvision_fp32_on_real_photos(photos, torchvision_vgg16, fmt):
    ex = Extractor("vgg16", PARITY_WEIGHTS, device="cuda", precision=fmt)
    assert next(ex.model.parameters()).dtype == precision.dtype(fmt)
    assert torch.backends.cudnn.benchmark
    fc7, logits = ex(photos)
    want_fc7, want_logits = reference(torchvision_vgg16, photos)
    assert cosine(fc7, want_fc7).min() >= 0.999
    assert (logits.argmax(1) == want_logits.argmax(1)).all()


def test_dense_descriptor_in_bf16_matches_fp32(vgg11_weights):
    items = []
    for pos, (_, img) in enumerate(sample_photos()[:3]):
        items.append(preprocess.Decoded(pos, preprocess_pil(img), img.width, img.height, img))
    outs = {fmt: DenseExtractor("vgg11", str(vgg11_weights), scales=[224, 288], device="cpu",
                                precision=fmt).embed(items) for fmt in ("fp32", "bf16")}
    assert outs["bf16"]["descriptor"].dtype == np.float32
    assert cosine(outs["bf16"]["descriptor"], outs["fp32"]["descriptor"]).min() >= 0.999
    assert cosine(outs["bf16"]["fc7"], outs["fp32"]["fc7"]).min() >= 0.999
    np.testing.assert_allclose(outs["bf16"]["dense_probs"].sum(1), 1.0, rtol=1e-4)


# -- the resume fingerprint -------------------------------------------------------------------


def _fingerprint(*overrides: str) -> str:
    return model_fingerprint(load_config(overrides=list(overrides)), "w.pth", "ab" * 32)


def test_a_change_of_precision_is_a_different_model():
    prints = {p: _fingerprint(f"runtime.precision={p}") for p in ("auto", "fp32", "bf16", "fp16")}
    assert len(set(prints.values())) == 4
    assert _fingerprint("runtime.precision=bf16") == prints["bf16"]  # and it is stable


def test_fingerprint_follows_the_preprocessing_actually_applied(monkeypatch):
    before = _fingerprint()
    dense_before = _fingerprint("model.descriptor=dense-multiscale")
    monkeypatch.setattr(preprocess, "DESCRIPTION", {**preprocess.DESCRIPTION, "resize": 288})
    assert _fingerprint() != before
    monkeypatch.undo()
    assert _fingerprint() == before
    monkeypatch.setattr(descriptor, "DESCRIPTION", {**descriptor.DESCRIPTION, "max_side": 1024})
    assert _fingerprint("model.descriptor=dense-multiscale") != dense_before
    assert _fingerprint() == before  # the dense recipe does not touch fc7-only jobs


# -- what the outputs record ------------------------------------------------------------------


def test_outputs_record_what_ran_and_refuse_a_resume_in_another_precision(ray_local, vgg11_weights, tmp_path):
    _, out = extract_thumbnails(tmp_path, 3, vgg11_weights, input={"shard_size": 2},
                                runtime={"device": "cpu"})
    ran = resolve_precision("auto", CPU)  # what this machine's CPU runs under auto
    for part in sorted((out / "embeddings").glob("part-*.parquet")):
        meta = json.loads(pq.read_schema(part).metadata[b"vgg_pipeline"])
        assert meta["dtypes"]["compute"] == ran and meta["dtypes"]["device"] == "cpu"
        assert meta["compile"] == {"setting": "auto", "rows": 0}   # auto never compiles on a CPU
    success = json.loads((out / "_SUCCESS.json").read_text())
    assert {a["precision"] for a in success["run"]["actors"]} == {ran}
    assert success["run"]["images_compiled"] == 0
    assert success["config"]["runtime"]["precision"] == "auto"
    import pipeline
    with pytest.raises(UsageError, match="--overwrite"):
        pipeline.extract(str(tmp_path / "photos"), str(out), weights=str(vgg11_weights),
                         model={"arch": "vgg11"}, input={"shard_size": 2},
                         runtime={"device": "cpu", "precision": "fp32"})
