"""``runtime.compile``: torch.compile built in a background thread and swapped in between batches
(pipeline/model/compiled.py).  The policy and the swap are tested with a stand-in compile function
(no Inductor, fast); one slow test compiles vgg11 for real on the CPU and compares it with eager."""

from __future__ import annotations

import json
import logging

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from pipeline.config import load_config, model_fingerprint
from pipeline.errors import UsageError
from pipeline.input.layout import EMBEDDINGS_DIR, part_name
from pipeline.input.plan import Shard
from pipeline.model import compiled as compiled_mod
from pipeline.model.compiled import AUTO_AFTER_IMAGES, BackgroundCompiler, cache_dir, parse_setting, wanted
from pipeline.model.extractor import Extractor
from pipeline.model.precision import cpu_has_native_bf16
from pipeline.output.writer import METADATA_KEY
from pipeline.run.worker import ShardWorker
from tests.corpus import write_good_corpus

CPU, CUDA = torch.device("cpu"), torch.device("cuda")


def _cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


def test_setting_parses_yaml_booleans_and_refuses_others(tmp_path):
    assert load_config().runtime.compile == "auto"
    conf = tmp_path / "c.yaml"
    conf.write_text("runtime:\n  compile: off\n")   # YAML reads a bare off as False
    assert load_config(str(conf)).runtime.compile == "off"
    assert load_config(overrides=["runtime.compile=on"]).runtime.compile == "on"
    assert parse_setting(True) == "on"
    with pytest.raises(UsageError, match="runtime.compile"):
        load_config(overrides=["runtime.compile=always"])


def test_auto_compiles_only_on_cuda_and_only_past_enough_images():
    assert not wanted("auto", CUDA, AUTO_AFTER_IMAGES - 1)
    assert wanted("auto", CUDA, AUTO_AFTER_IMAGES)
    assert not wanted("auto", CPU, 10 * AUTO_AFTER_IMAGES)
    assert wanted("on", CPU, 0) and not wanted("off", CUDA, 10 * AUTO_AFTER_IMAGES)


def test_compiling_is_not_a_different_model():
    # Compiled and eager agree within the precision's tolerance: a resume may switch runtime.compile.
    prints = {model_fingerprint(load_config(overrides=[f"runtime.compile={c}"]), "w", "0" * 64)
              for c in ("auto", "on", "off")}
    assert len(prints) == 1


def test_cache_is_a_stable_per_user_directory(monkeypatch, tmp_path):
    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert cache_dir() == str(tmp_path / "vgg-pipeline" / "torchinductor")
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", "/elsewhere")   # the user's choice wins
    assert cache_dir() == "/elsewhere"


def _serve_while_building(ex: Extractor, x: torch.Tensor, eager_fc7: np.ndarray) -> None:
    """Call ``ex`` until its background build is done: the eager model keeps serving meanwhile
    (the build may finish between the check and a call: such a call is not checked here)."""
    while not ex.compiler.wait(0):
        before = ex.compiled_images
        fc7, _ = ex(x)
        if ex.compiled_images == before:
            assert _cosine(fc7, eager_fc7).min() >= 0.99999
    assert ex.compiler.state == "ready", ex.compiler.state


class StandIn:
    """A 'compiled' module: the eager one, recording the batch shapes it is called with."""

    def __init__(self, model, **kwargs) -> None:
        self.model, self.kwargs, self.shapes = model, kwargs, []

    def __call__(self, x):
        self.shapes.append(tuple(x.shape))
        return self.model(x)


@pytest.fixture(scope="module")
def vgg11():
    return Extractor("vgg11", "random:0", device="cpu", precision="fp32", num_threads=1)


def _with_compiler(ex: Extractor, compile_fn) -> Extractor:
    ex.compiler = BackgroundCompiler(ex.model, "on", ex.device, compile_fn=compile_fn)
    ex.compiled_images = 0
    return ex


def test_compiled_module_swapped_in_between_batches_tail_padded_tiny_batches_eager(vgg11):
    made = []

    def compile_fn(model, **kwargs):
        made.append(StandIn(model, **kwargs))
        return made[-1]

    ex = _with_compiler(vgg11, compile_fn)
    x = torch.randn(4, 3, 224, 224, generator=torch.Generator().manual_seed(1))
    eager_fc7, eager_logits = ex(x)             # starts the compile; this batch runs eager
    assert ex.compiler.wait(60) and ex.compiler.state == "ready"
    standin = made[0]
    assert standin.kwargs == {"mode": compiled_mod.COMPILE_MODE, "dynamic": False}
    assert standin.shapes == [(4, 3, 224, 224)]  # the warm-up, at the batch size served
    assert ex.compiled_images == 0

    fc7, logits = ex(x)                          # the next batch: compiled
    assert ex.compiled_images == 4 and standin.shapes[-1] == (4, 3, 224, 224)
    np.testing.assert_allclose(fc7, eager_fc7, rtol=1e-5, atol=1e-6)
    fc7, _ = ex(x[:3])                           # a shard's short tail: padded to the compiled size
    assert fc7.shape == (3, 4096) and standin.shapes[-1] == (4, 3, 224, 224)
    np.testing.assert_allclose(fc7, eager_fc7[:3], rtol=1e-4, atol=1e-5)
    assert ex.compiled_images == 7
    calls = len(standin.shapes)
    fc7, _ = ex(x[:1])                           # a one-image retry: eager, no 4x padding
    assert len(standin.shapes) == calls and ex.compiled_images == 7
    np.testing.assert_allclose(fc7, eager_fc7[:1], rtol=1e-4, atol=1e-5)
    assert len(made) == 1                        # compiled once, never again per shape


def test_failed_compile_warns_once_and_the_eager_model_stays(vgg11, caplog):
    def broken(model, **kwargs):
        raise RuntimeError("inductor: no C compiler\nsecond line")

    ex = _with_compiler(vgg11, broken)
    x = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(2))
    with caplog.at_level(logging.WARNING, logger="pipeline.model.compiled"):
        first, _ = ex(x)
        assert ex.compiler.wait(60) and ex.compiler.state == "failed"
        again, _ = ex(x)
        ex(x)
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "eager model stays" in warnings[0].getMessage()
    assert "second line" not in warnings[0].getMessage()
    np.testing.assert_array_equal(again, first)   # the very same eager model
    assert ex.compiled_images == 0


def test_off_never_compiles(vgg11):
    ex = vgg11
    ex.compiler = BackgroundCompiler(ex.model, "off", ex.device, compile_fn=lambda m, **k: pytest.fail("compiled"))
    ex(torch.zeros(2, 3, 224, 224))
    assert ex.compiler.state == "off" and not ex.compiler.wait(0)


def _compiled_and_eager(ex: Extractor, x: torch.Tensor) -> tuple[tuple, tuple]:
    """``x`` through the eager model, then (the build done while eager keeps serving) through the
    compiled one: ``((fc7, logits) compiled, (fc7, logits) eager)``."""
    eager = ex(x)
    _serve_while_building(ex, x, eager[0])
    served = ex.compiled_images
    compiled = ex(x)
    assert ex.compiled_images == served + len(x)
    return compiled, eager


@pytest.mark.slow
@pytest.mark.parametrize("precision", ["bf16", "fp32"])
def test_torch_compile_matches_eager_and_caches_its_kernels(precision, tmp_path, monkeypatch):
    """Real Inductor on the CPU (gcc), built while the eager model serves: compiled fc7 within the
    precision's tolerance, same top-1, kernels in the cache directory."""
    if precision == "bf16" and not cpu_has_native_bf16():
        pytest.skip("this CPU has no native bf16")
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "cache"))
    ex = Extractor("vgg11", "random:0", device="cpu", precision=precision, num_threads=2, compile="on")
    x = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(3))
    (fc7, logits), (eager_fc7, eager_logits) = _compiled_and_eager(ex, x)
    if precision == "bf16":
        assert _cosine(fc7, eager_fc7).min() >= 0.999
    else:
        np.testing.assert_allclose(fc7, eager_fc7, rtol=1e-3, atol=1e-4)
    assert (logits.argmax(1) == eager_logits.argmax(1)).all()
    assert any((tmp_path / "cache").rglob("*")), "nothing cached"


def test_worker_records_the_rows_the_compiled_model_embedded(tmp_path, monkeypatch):
    monkeypatch.setattr(torch, "compile", StandIn)   # in this process only: no Inductor here
    ids = sorted(write_good_corpus(tmp_path / "in", 6))
    cfg = load_config(overrides=["model.arch=vgg11", "model.weights=random:0", "runtime.device=cpu",
                                 "runtime.precision=fp32", "runtime.batch_size=3",
                                 "runtime.decode_threads=1", "runtime.compile=on"])
    out = tmp_path / "out"
    w = ShardWorker(cfg, str(out))
    try:
        assert w.ready()["compile"] == "on"
        shards = [Shard(i, ids, [str(tmp_path / "in" / x) for x in ids], duplicate=[False] * 6)
                  for i in range(2)]
        first = w.process(shards[0])            # starts the compile on its first batch
        assert w.mapper.compiler.wait(60) and w.mapper.compiler.state == "ready"
        second = w.process(shards[1])           # compiled from its first batch on
    finally:
        w.close()
    assert 0 <= first["compiled"] <= 3 and second["compiled"] == 6
    for summary in (first, second):
        meta = json.loads(pq.read_schema(out / EMBEDDINGS_DIR / part_name(summary["shard"])).metadata[METADATA_KEY])
        assert meta["compile"] == {"setting": "on", "rows": summary["compiled"]}
    a, b = (pq.read_table(out / EMBEDDINGS_DIR / part_name(i)) for i in range(2))
    np.testing.assert_allclose(np.stack(b["fc7"].to_numpy(zero_copy_only=False)),
                               np.stack(a["fc7"].to_numpy(zero_copy_only=False)), rtol=1e-4, atol=1e-5)


@pytest.mark.gpu
def test_background_compile_on_cuda_matches_eager_bf16():
    """On the GPU: built in its thread while the eager model keeps serving, swapped in, within bf16's
    tolerance of eager, same top-1."""
    ex = Extractor("vgg11", "random:0", device="cuda", precision="bf16", compile="on")
    x = torch.randn(16, 3, 224, 224, generator=torch.Generator().manual_seed(4))
    (fc7, logits), (eager_fc7, eager_logits) = _compiled_and_eager(ex, x)
    assert _cosine(fc7, eager_fc7).min() >= 0.999
    assert (logits.argmax(1) == eager_logits.argmax(1)).all()
    tail, _ = ex(x[:12])               # padded to 16, no recompile
    assert _cosine(tail, eager_fc7[:12]).min() >= 0.999
