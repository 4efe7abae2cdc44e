"""pipeline.model.weights: imagenet download + cache, files (local, http, memory://), safetensors,
random seeds, and the one-line errors for everything a user can get wrong.  All offline: weight
files are made here and "the internet" is an http.server on 127.0.0.1.

Two kinds of files keep this fast: one real seeded vgg11 (531 MB fp32, written once per module)
where values matter, and a "tiny" full-shape vgg11 whose tensors are stride-0 expansions of one
number (7 kB on disk) where only the mechanics matter.
"""

from __future__ import annotations

import hashlib
import logging
import os
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import fsspec
import pytest
import torch
import torchvision
from safetensors.torch import save_file

from pipeline.model import weights
from pipeline.errors import UsageError, WeightsError
from pipeline.model.vgg import build_vgg
from pipeline.model.weights import (IMAGENET_URLS, TIMEOUT_ENV, URL_BASE_ENV, WeightsInfo, load_model,
                              load_state_dict, weights_identity)


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _one_line_error(excinfo: pytest.ExceptionInfo) -> str:
    msg = str(excinfo.value)
    assert "\n" not in msg and msg
    return msg


# --- fixtures ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tv_vgg11() -> torch.nn.Module:
    """A seeded torchvision vgg11: its state dict is the real weights file of these tests."""
    with torch.random.fork_rng():
        torch.manual_seed(1234)
        return torchvision.models.vgg11().eval()


@pytest.fixture(scope="module")
def real_file(tmp_path_factory, tv_vgg11) -> tuple[Path, str]:
    path = tmp_path_factory.mktemp("real") / "vgg11-seeded.pth"
    torch.save(tv_vgg11.state_dict(), path)
    return path, _sha256(path)


def _tiny_state_dict(arch: str = "vgg11") -> dict[str, torch.Tensor]:
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in build_vgg(arch).state_dict().items()}
    return {k: torch.full((1,), float(i)).expand(s) if len(s) else torch.tensor(float(i))
            for i, (k, s) in enumerate(shapes.items())}


@pytest.fixture(scope="module")
def tiny_file(tmp_path_factory) -> tuple[Path, str]:
    path = tmp_path_factory.mktemp("tiny") / "tiny-vgg11.pth"
    torch.save(_tiny_state_dict(), path)
    return path, _sha256(path)


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    routes: dict[str, tuple[Path, bool]]  # url path -> (file, send only half of it)
    hits: list[str]
    delay_s: float  # before each body: lets concurrent clients overlap


class _Handler(BaseHTTPRequestHandler):
    server: _Server

    def do_HEAD(self) -> None:
        self._serve(body=False)

    def do_GET(self) -> None:
        self._serve(body=True)

    def _serve(self, body: bool) -> None:
        path = self.path.split("?")[0]
        self.server.hits.append(path)
        if path not in self.server.routes:
            self.send_error(404)
            return
        file, truncate = self.server.routes[path]
        size = file.stat().st_size
        self.send_response(200)
        self.send_header("Content-Length", str(size))
        self.end_headers()
        if not body:
            return
        time.sleep(self.server.delay_s)
        left = size // 2 if truncate else size  # HTTP/1.0: the connection closes afterwards
        with open(file, "rb") as f:
            while left > 0:
                chunk = f.read(min(left, 1 << 20))
                self.wfile.write(chunk)
                left -= len(chunk)

    def log_message(self, *args) -> None:
        pass


@pytest.fixture(scope="module")
def server() -> Iterator[_Server]:
    srv = _Server(("127.0.0.1", 0), _Handler)
    srv.routes, srv.hits, srv.delay_s = {}, [], 0.0
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    yield srv
    srv.shutdown()
    srv.server_close()


@pytest.fixture
def hub(tmp_path, monkeypatch, server) -> Path:
    """A fresh TORCH_HOME whose ImageNet downloads come from the local server."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setenv(URL_BASE_ENV, f"http://127.0.0.1:{server.server_port}/models/")
    server.routes.clear()
    server.hits.clear()
    server.delay_s = 0.0
    return tmp_path / "torch" / "hub" / "checkpoints"


def _publish(monkeypatch, server: _Server, file: Path, name: str, truncate: bool = False) -> str:
    """Serve ``file`` as the vgg11 ImageNet file called ``name``; return its url path."""
    monkeypatch.setitem(IMAGENET_URLS, "vgg11", f"https://download.pytorch.org/models/{name}")
    server.routes[f"/models/{name}"] = (file, truncate)
    return f"/models/{name}"


def _assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


# --- imagenet ------------------------------------------------------------------------------


def test_imagenet_urls_cover_every_arch():
    assert set(IMAGENET_URLS) == set(weights.ARCHS)
    assert IMAGENET_URLS["vgg16"] == "https://download.pytorch.org/models/vgg16-397923af.pth"


def test_imagenet_download_is_cached_and_reused(hub, monkeypatch, server, real_file, tv_vgg11):
    file, sha = real_file
    name = f"vgg11-{sha[:8]}.pth"
    route = _publish(monkeypatch, server, file, name)

    state, info = load_state_dict("imagenet", "vgg11")
    assert info == WeightsInfo(spec="imagenet", name=f"imagenet:{name}", sha256=sha,
                               is_random=False)
    assert sorted(os.listdir(hub)) == [name] and _sha256(hub / name) == sha
    _assert_same(state, tv_vgg11.state_dict())
    assert server.hits.count(route) == 1

    model, info2 = load_model("vgg11", "imagenet")
    assert info2 == info and not model.training
    assert server.hits.count(route) == 1  # served from the cache
    ident = weights_identity("imagenet", "vgg11")
    assert (ident.name, ident.sha256) == (info.name, None)


def test_imagenet_identity_needs_no_network(hub, monkeypatch):
    monkeypatch.setenv(URL_BASE_ENV, f"http://127.0.0.1:{_closed_port()}/models")
    info = weights_identity("imagenet", "vgg16")
    assert info == WeightsInfo("imagenet", "imagenet:vgg16-397923af.pth", None, False)
    assert not hub.exists()


def test_imagenet_hash_mismatch_caches_nothing(hub, monkeypatch, server, tiny_file):
    file, sha = tiny_file
    assert not sha.startswith("deadbeef")
    _publish(monkeypatch, server, file, "vgg11-deadbeef.pth")
    with pytest.raises(WeightsError) as e:
        load_state_dict("imagenet", "vgg11")
    msg = _one_line_error(e)
    assert "corrupt or truncated" in msg and "deadbeef" in msg and "--weights PATH" in msg
    assert os.listdir(hub) == []


def test_imagenet_truncated_download_caches_nothing(hub, monkeypatch, server, tiny_file):
    file, sha = tiny_file
    route = _publish(monkeypatch, server, file, f"vgg11-{sha[:8]}.pth", truncate=True)
    with pytest.raises(WeightsError) as e:
        load_model("vgg11", "imagenet")
    assert "corrupt or truncated" in _one_line_error(e)
    assert server.hits.count(route) == 1
    assert os.listdir(hub) == []


def test_imagenet_network_failure_suggests_a_path(hub, monkeypatch, server, tiny_file):
    file, sha = tiny_file
    _publish(monkeypatch, server, file, f"vgg11-{sha[:8]}.pth")
    monkeypatch.setenv(URL_BASE_ENV, f"http://127.0.0.1:{_closed_port()}")
    with pytest.raises(WeightsError) as e:
        load_state_dict("imagenet", "vgg11")
    msg = _one_line_error(e)
    assert msg.startswith("could not download") and "--weights PATH" in msg
    assert os.listdir(hub) == []

    monkeypatch.setitem(IMAGENET_URLS, "vgg11", "https://download.pytorch.org/models/x-0a.pth")
    monkeypatch.setenv(URL_BASE_ENV, f"http://127.0.0.1:{server.server_port}/models")
    with pytest.raises(WeightsError, match=r"could not download .*404"):
        load_state_dict("imagenet", "vgg11")


def test_stalled_download_times_out_and_caches_nothing(hub, monkeypatch, server, tiny_file):
    file, sha = tiny_file
    _publish(monkeypatch, server, file, f"vgg11-{sha[:8]}.pth")
    # Headers, then silence for far longer than the timeout: without the timeout the body would
    # arrive and the load succeed, so only a working timeout raises here.
    monkeypatch.setattr(server, "delay_s", 120.0)
    monkeypatch.setenv(TIMEOUT_ENV, "0.5")
    with pytest.raises(WeightsError) as e:
        load_state_dict("imagenet", "vgg11")
    msg = _one_line_error(e)
    assert msg.startswith("could not download") and f"no data for 0.5 s ({TIMEOUT_ENV})" in msg
    assert os.listdir(hub) == [] and socket.getdefaulttimeout() is None


def test_concurrent_loads_download_once(hub, monkeypatch, server, tiny_file):
    file, sha = tiny_file
    route = _publish(monkeypatch, server, file, f"vgg11-{sha[:8]}.pth")
    server.delay_s = 0.3
    with ThreadPoolExecutor(3) as pool:
        infos = list(pool.map(lambda _: load_state_dict("imagenet", "vgg11")[1], range(3)))
    assert server.hits.count(route) == 1
    assert {i.sha256 for i in infos} == {sha} and len(os.listdir(hub)) == 1


def test_corrupt_cached_file_is_downloaded_again(hub, monkeypatch, server, tiny_file, caplog):
    file, sha = tiny_file
    name = f"vgg11-{sha[:8]}.pth"
    route = _publish(monkeypatch, server, file, name)
    hub.mkdir(parents=True)
    (hub / name).write_bytes(b"not the weights")
    with caplog.at_level(logging.WARNING, logger="pipeline.model.weights"):
        state, info = load_state_dict("imagenet", "vgg11")
    assert "corrupt" in caplog.text
    assert server.hits.count(route) == 1 and info.sha256 == sha == _sha256(hub / name)
    _assert_same(state, torch.load(file, weights_only=True))


# --- files ---------------------------------------------------------------------------------


def test_local_pth_loads_exactly(real_file, tv_vgg11):
    file, sha = real_file
    model, info = load_model("vgg11", str(file))
    assert info == WeightsInfo(spec=str(file), name="vgg11-seeded.pth", sha256=sha,
                               is_random=False)
    assert not model.training
    _assert_same(model.state_dict(), tv_vgg11.state_dict())
    assert all(p.is_contiguous() and p.dtype == torch.float32 for p in model.parameters())
    assert weights_identity(str(file), "vgg11") == info


def test_torchvision_weights_give_identical_outputs(real_file, tv_vgg11):
    model, _ = load_model("vgg11", str(real_file[0]))
    x = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        fc7, logits = model(x)
        ref_logits = tv_vgg11(x)
        ref_fc7 = tv_vgg11.classifier[:5](torch.flatten(tv_vgg11.avgpool(tv_vgg11.features(x)), 1))
    torch.testing.assert_close(logits, ref_logits, rtol=0, atol=0)
    torch.testing.assert_close(fc7, ref_fc7, rtol=0, atol=0)
    assert fc7.shape == (2, 4096) and (fc7 >= 0).all()


def test_safetensors_file(tmp_path, tv_vgg11):
    path = tmp_path / "vgg11.safetensors"
    save_file(tv_vgg11.state_dict(), str(path))
    model, info = load_model("vgg11", str(path))
    assert info.name == "vgg11.safetensors" and info.sha256 == _sha256(path)
    _assert_same(model.state_dict(), tv_vgg11.state_dict())

    # Recognised by its header, whatever the file is called: read, then found not to fit.
    save_file({"features.0.weight": torch.zeros(2)}, str(tmp_path / "small.bin"))
    with pytest.raises(WeightsError, match=r"small.bin do not fit .* features.0.weight file \[2\]"):
        load_state_dict(str(tmp_path / "small.bin"), "vgg11")


def test_http_url_through_fsspec_redacts_credentials(server, tiny_file):
    file, sha = tiny_file
    server.routes["/files/tiny.pth"] = (file, False)
    port = server.server_port
    model, info = load_model("vgg11", f"http://u:pw@127.0.0.1:{port}/files/tiny.pth?token=s3cr3t")
    assert info.sha256 == sha and info.name == "tiny.pth"
    assert info.spec == f"http://***@127.0.0.1:{port}/files/tiny.pth?***"
    assert model.classifier[6].bias.unique().tolist() == [
        float(list(model.state_dict()).index("classifier.6.bias"))]
    ident = weights_identity(f"http://127.0.0.1:{port}/files/tiny.pth", "vgg11")
    assert (ident.name, ident.sha256) == ("tiny.pth", sha)

    with pytest.raises(WeightsError) as e:
        load_state_dict(f"http://127.0.0.1:{port}/files/nope.pth?sig=s3cr3t", "vgg11")
    assert _one_line_error(e).startswith("weights file not found:")
    assert "s3cr3t" not in str(e.value)


def test_memory_url_and_checkpoint_wrapper(tiny_file):
    tiny = torch.load(tiny_file[0], weights_only=True)
    with fsspec.open("memory://weights/ckpt.pt", "wb") as f:
        torch.save({"state_dict": tiny, "epoch": 3}, f)
    try:
        state, info = load_state_dict("memory://weights/ckpt.pt", "vgg11")
    finally:
        fsspec.filesystem("memory").rm("/weights", recursive=True)
    _assert_same(state, tiny)
    assert info.name == "ckpt.pt" and info.sha256 is not None


def test_missing_file(tmp_path):
    for spec in (str(tmp_path / "nope.pth"), "memory://nowhere/nope.pth"):
        with pytest.raises(WeightsError) as e:
            load_model("vgg11", spec)
        assert _one_line_error(e) == f"weights file not found: {spec}"
        with pytest.raises(WeightsError, match="not found"):
            weights_identity(spec, "vgg11")


class _Evil:
    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.mkdir, (self.marker,))  # would run while unpickling


def test_pickle_that_runs_code_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    torch.save({"features.0.weight": torch.zeros(1), "x": _Evil(str(marker))}, tmp_path / "e.pth")
    with pytest.raises(WeightsError) as e:
        load_model("vgg11", str(tmp_path / "e.pth"))
    msg = _one_line_error(e)
    assert msg.startswith("refused to load weights") and "weights_only" in msg
    assert "mkdir" in msg and not marker.exists()

    torch.save(torch.nn.Linear(2, 2), tmp_path / "module.pth")  # a whole module, not its weights
    with pytest.raises(WeightsError, match="refused.*state_dict"):
        load_state_dict(str(tmp_path / "module.pth"), "vgg11")


def test_files_that_are_not_state_dicts(tmp_path):
    (tmp_path / "junk.pth").write_bytes(b"hello, not a checkpoint")
    torch.save([torch.zeros(1)], tmp_path / "list.pth")
    torch.save({"features.0.weight": torch.zeros(1), "lr": 0.1}, tmp_path / "mixed.pth")
    (tmp_path / "bad.safetensors").write_bytes(b"\x05" + b"\x00" * 7 + b"{junk")
    cases = {"junk.pth": "cannot read weights", "list.pth": "hold a list, not a state dict",
             "mixed.pth": "entry 'lr' is a float", "bad.safetensors": "not a valid safetensors"}
    for name, expected in cases.items():
        with pytest.raises(WeightsError) as e:
            load_state_dict(str(tmp_path / name), "vgg11")
        assert expected in _one_line_error(e), name


def test_wrong_architecture_names_keys(real_file):
    with pytest.raises(WeightsError) as e:
        load_model("vgg16", str(real_file[0]))
    msg = _one_line_error(e)
    assert "do not fit model.arch vgg16" in msg
    assert "missing keys (24): features.2.weight, features.2.bias, features.5.weight, ..." in msg
    assert "unexpected keys (14): features.3.weight" in msg
    assert "look like vgg11 weights" in msg


def test_shape_mismatch_is_reported(tmp_path):
    state = _tiny_state_dict()
    state["classifier.6.weight"] = torch.zeros(10, 4096)
    state["classifier.6.bias"] = torch.zeros(10)
    torch.save(state, tmp_path / "ten-classes.pth")
    with pytest.raises(WeightsError) as e:
        load_state_dict(str(tmp_path / "ten-classes.pth"), "vgg11")
    msg = _one_line_error(e)
    assert ("shape mismatches (2): classifier.6.weight file [10, 4096] vs model [1000, 4096], "
            "classifier.6.bias file [10] vs model [1000]") in msg
    assert "missing" not in msg and "look like" not in msg


def test_fp16_file_loads_as_fp32(tmp_path):
    state = {k: v.half() for k, v in _tiny_state_dict().items()}
    torch.save(state, tmp_path / "half.pth")
    model, _ = load_model("vgg11", str(tmp_path / "half.pth"))
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    assert model.features[0].weight.unique().tolist() == [0.0]


# --- random --------------------------------------------------------------------------------


def test_random_seed_is_deterministic_and_loud(caplog):
    with caplog.at_level(logging.WARNING, logger="pipeline.model.weights"):
        a, info = load_state_dict("random:7", "vgg11_bn")
    assert info == WeightsInfo("random:7", "random:7", None, True)
    assert "RANDOM weights" in caplog.text and "meaningless" in caplog.text
    b, _ = load_state_dict("random:7", "vgg11_bn")
    _assert_same(a, b)
    model, _ = load_model("vgg11_bn", "random:8")
    assert not model.training
    c = model.state_dict()
    assert not torch.equal(a["classifier.0.weight"], c["classifier.0.weight"])
    assert not torch.equal(a["features.0.weight"], c["features.0.weight"])
    # torchvision's init: zero biases, BatchNorm at identity with fresh running statistics.
    assert a["features.0.bias"].abs().sum() == 0 and (a["features.1.running_var"] == 1).all()
    assert a["features.1.num_batches_tracked"] == 0
    assert 0.005 < a["classifier.0.weight"].std() < 0.015


def test_random_default_seed_and_bad_seeds():
    assert weights_identity("random", "vgg16") == WeightsInfo("random", "random:0", None, True)
    for spec in ("random:x", "random:-1", "random:"):
        with pytest.raises(WeightsError, match="random:SEED"):
            weights_identity(spec, "vgg16")


def test_unknown_arch_is_a_usage_error():
    with pytest.raises(UsageError, match="unknown model.arch 'vgg17'"):
        weights_identity("random", "vgg17")


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
