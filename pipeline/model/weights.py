"""Where the VGG weights come from, and proof of which ones were used (docs/design.md §1 "Weights").

A weights *spec* is one of:

``imagenet``
    torchvision's IMAGENET1K_V1 file for the arch (:data:`IMAGENET_URLS`), downloaded once into
    the torch hub cache (``torch.hub.get_dir()/checkpoints``, i.e. ``$TORCH_HOME/hub/checkpoints``)
    and checked against the sha256 prefix in its file name, exactly as torchvision does.  Set
    ``VGG_PIPELINE_WEIGHTS_URL_BASE`` (e.g. ``http://mirror.internal/models``) to fetch the same
    file names from a mirror instead of ``https://download.pytorch.org/models``.
a local path or any fsspec URL (``s3://``, ``gs://``, ``http(s)://``, ``memory://`` ...)
    a ``.pth``/``.pt`` state dict, read with ``torch.load(..., weights_only=True)`` (a pickle that
    would run code is refused), or a ``.safetensors`` file.  A checkpoint dict that keeps the
    state dict under ``"state_dict"`` is unwrapped.
``random[:SEED]``
    seeded torchvision-style initialisation (seed 0 by default), identical in every process.
    Only for tests and demos: the features are meaningless, and a WARNING says so.

Every failure the user can fix is a one-line :class:`~pipeline.errors.WeightsError`.

Example::

    >>> from pipeline.model.weights import load_model
    >>> model, info = load_model("vgg11", "random:0")
    >>> info.name, info.is_random, model.training
    ('random:0', True, False)
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import http.client
import logging
import os
import pickle
import re
import socket
import tempfile
import urllib.error
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import torch
import torch.hub
from torch import nn

from pipeline.errors import UsageError, WeightsError
from pipeline.input.storage import safe_uri
from pipeline.model.vgg import ARCHS, VGG, build_vgg, init_weights

log = logging.getLogger(__name__)

URL_BASE_ENV = "VGG_PIPELINE_WEIGHTS_URL_BASE"
TIMEOUT_ENV = "VGG_PIPELINE_DOWNLOAD_TIMEOUT_S"  # seconds without data before a download gives up
DEFAULT_TIMEOUT_S = 60.0
DEFAULT_URL_BASE = "https://download.pytorch.org/models"

# torchvision's IMAGENET1K_V1 weights (torchvision/models/vgg.py).
IMAGENET_URLS: dict[str, str] = {
    "vgg11": "https://download.pytorch.org/models/vgg11-8a719046.pth",
    "vgg11_bn": "https://download.pytorch.org/models/vgg11_bn-6002323d.pth",
    "vgg13": "https://download.pytorch.org/models/vgg13-19584684.pth",
    "vgg13_bn": "https://download.pytorch.org/models/vgg13_bn-abd245e5.pth",
    "vgg16": "https://download.pytorch.org/models/vgg16-397923af.pth",
    "vgg16_bn": "https://download.pytorch.org/models/vgg16_bn-6c64b313.pth",
    "vgg19": "https://download.pytorch.org/models/vgg19-dcbb9e9d.pth",
    "vgg19_bn": "https://download.pytorch.org/models/vgg19_bn-c79401a0.pth",
}

_RANDOM_RE = re.compile(r"random(?::(\d+))?")
_CHUNK = 1 << 20
_SHOW = 3  # how many offending keys a fit error names


@dataclass(frozen=True)
class WeightsInfo:
    """Which weights a model holds, as recorded in the output metadata.

    ``spec`` is what the user passed, with URL credentials (user:password@, query string)
    redacted; ``name`` is ``imagenet:<file>``, ``random:<seed>`` or the file's basename;
    ``sha256`` is the full digest of the file loaded (``None`` for random weights, and for
    ``imagenet`` in :func:`weights_identity`, whose name already carries the hash prefix).
    """

    spec: str
    name: str
    sha256: str | None
    is_random: bool


def weights_identity(spec: str, arch: str, storage_options: dict | None = None) -> WeightsInfo:
    """Identify ``spec`` for fingerprints without building the model or downloading ImageNet.

    A file (local or remote) is streamed and hashed, so two different files with the same name
    never share an identity; a remote file is fetched once into a temporary file for that.
    """
    _check_arch(arch)
    seed = _random_seed(spec)
    if seed is not None:
        return _random_info(spec, seed)
    if _is_imagenet(spec):
        return WeightsInfo(spec=spec, name=_imagenet_name(arch), sha256=None, is_random=False)
    with _local_file(spec, storage_options) as path:
        return _file_info(spec, _sha256_file(path))


def load_state_dict(spec: str, arch: str, storage_options: dict | None = None, *,
                    progress: bool = False) -> tuple[dict[str, torch.Tensor], WeightsInfo]:
    """Load the CPU state dict named by ``spec`` and check that it fits ``arch``.

    Tensors keep the dtype they were stored with.  ``progress`` shows a download bar (stderr)
    for ``imagenet``.  Raises :class:`WeightsError` for anything the user can fix.
    """
    _check_arch(arch)
    seed = _random_seed(spec)
    if seed is not None:
        return _random_model(arch, seed).state_dict(), _random_info(spec, seed)
    if _is_imagenet(spec):
        path, sha = _imagenet_file(arch, progress)
        info = WeightsInfo(spec=spec, name=_imagenet_name(arch), sha256=sha, is_random=False)
        shown = f"{info.name} ({path})"
        state = _read_state_dict(path, shown)
    else:
        shown = safe_uri(spec)
        with _local_file(spec, storage_options) as path:
            info = _file_info(spec, _sha256_file(path))
            state = _read_state_dict(path, shown)
    _check_fits(state, arch, shown)
    return state, info


def load_model(arch: str, spec: str, storage_options: dict | None = None, *,
               progress: bool = False) -> tuple[VGG, WeightsInfo]:
    """Build ``arch`` with the weights named by ``spec`` (loaded strictly), in eval mode, on CPU."""
    _check_arch(arch)
    seed = _random_seed(spec)
    if seed is not None:
        return _random_model(arch, seed).eval(), _random_info(spec, seed)
    state, info = load_state_dict(spec, arch, storage_options, progress=progress)
    # Built on the meta device and filled by assignment: no second 500 MB copy, no wasted init.
    with torch.device("meta"):
        model = build_vgg(arch)
    expected = model.state_dict()
    state = {k: v.to(dtype=expected[k].dtype).contiguous() for k, v in state.items()}
    model.load_state_dict(state, strict=True, assign=True)
    left = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if left:  # a tensor outside the state dict (e.g. a non-persistent buffer) was never filled
        raise RuntimeError(f"tensors not loaded from the state dict: {', '.join(left)}")
    return model.eval(), info


# --- spec kinds ----------------------------------------------------------------------------


def _check_arch(arch: str) -> None:
    if arch not in ARCHS:
        raise UsageError(f"unknown model.arch {arch!r}; choose one of {', '.join(ARCHS)}")


def _is_imagenet(spec: str) -> bool:
    return spec.strip().lower() == "imagenet"


def _random_seed(spec: str) -> int | None:
    """The seed of a ``random[:SEED]`` spec, or ``None`` when ``spec`` is not one."""
    s = spec.strip()
    if s.lower() != "random" and not s.lower().startswith("random:"):
        return None
    m = _RANDOM_RE.fullmatch(s.lower())
    if m is None:
        raise WeightsError(f"bad weights spec {spec!r}: use random or random:SEED with SEED >= 0")
    return int(m.group(1) or 0)


def _random_info(spec: str, seed: int) -> WeightsInfo:
    log.warning("weights random:%d: the model has RANDOM weights, so fc7 features and logits are "
                "meaningless (use only for tests and demos; pass --weights imagenet for real "
                "features)", seed)
    return WeightsInfo(spec=spec, name=f"random:{seed}", sha256=None, is_random=True)


def _random_model(arch: str, seed: int) -> VGG:
    # Allocated empty rather than built normally: build_vgg's own (unseeded) init would be
    # thrown away and costs more than twice the seeded one.
    with torch.device("meta"):
        model = build_vgg(arch)
    model.to_empty(device="cpu")
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.reset_running_stats()
        elif not isinstance(m, (nn.Conv2d, nn.Linear)) and any(
                True for _ in [*m.parameters(recurse=False), *m.buffers(recurse=False)]):
            raise RuntimeError(f"init_weights does not cover {type(m).__name__}")
    init_weights(model, seed)  # own torch.Generator: same weights in every process
    return model


def _file_info(spec: str, sha: str) -> WeightsInfo:
    name = os.path.basename(urlsplit(spec).path if "://" in spec else spec.rstrip("/\\"))
    return WeightsInfo(spec=safe_uri(spec), name=name, sha256=sha, is_random=False)


# --- imagenet download ---------------------------------------------------------------------


def _imagenet_filename(arch: str) -> str:
    return os.path.basename(urlsplit(IMAGENET_URLS[arch]).path)


def _imagenet_name(arch: str) -> str:
    return f"imagenet:{_imagenet_filename(arch)}"


def _imagenet_file(arch: str, progress: bool) -> tuple[str, str]:
    """Path and sha256 of the hash-checked ImageNet file in the hub cache, downloading it once."""
    filename = _imagenet_filename(arch)
    base = os.environ.get(URL_BASE_ENV) or DEFAULT_URL_BASE
    url = f"{base.rstrip('/')}/{filename}"
    # torchvision's rule (load_state_dict_from_url(check_hash=True)): the hex digits after '-'.
    m = torch.hub.HASH_REGEX.search(filename)
    prefix = m.group(1) if m and m.group(1) else None
    cache_dir = os.path.join(torch.hub.get_dir(), "checkpoints")
    try:
        os.makedirs(cache_dir, exist_ok=True)
    except OSError as e:
        raise WeightsError(f"cannot create the weights cache {cache_dir} ({e.strerror}); set "
                           "TORCH_HOME to a writable folder or pass --weights PATH") from None
    cached = os.path.join(cache_dir, filename)
    with _dir_lock(cache_dir):  # actors sharing a node download once, the rest wait and reuse
        if os.path.exists(cached):
            sha = _sha256_file(cached)
            if prefix is None or sha.startswith(prefix):
                log.info("ImageNet weights %s from cache %s", filename, cached)
                return cached, sha
            log.warning("cached %s is corrupt (sha256 %s does not start with %s); downloading "
                        "it again", cached, sha[:16], prefix)
            os.remove(cached)
        _download(url, cached, prefix, progress)
        return cached, _sha256_file(cached)


def _download(url: str, dst: str, prefix: str | None, progress: bool) -> None:
    shown = safe_uri(url)
    log.info("downloading ImageNet weights %s -> %s", shown, dst)
    hint = f"or pass --weights PATH to a local copy of {os.path.basename(dst)}"
    timeout = float(os.environ.get(TIMEOUT_ENV) or DEFAULT_TIMEOUT_S)
    try:
        # Writes a uuid-named .partial file and renames it only after the hash check passed,
        # and removes the .partial on any error: a failed download leaves nothing in the cache.
        # A connection closed early is not an error to urllib: the hash check catches it.
        with _socket_timeout(timeout):
            torch.hub.download_url_to_file(url, dst, hash_prefix=prefix, progress=progress)
    except RuntimeError as e:
        if "invalid hash value" not in str(e):
            raise
        raise WeightsError(f"downloaded {shown} is corrupt or truncated (its sha256 does not "
                           f"start with {prefix}); nothing was cached: try again {hint}") from None
    except (urllib.error.URLError, http.client.HTTPException, OSError) as e:
        reason = e if isinstance(e, urllib.error.HTTPError) else getattr(e, "reason", None) or e
        if isinstance(reason, TimeoutError):
            reason = f"no data for {timeout:g} s ({TIMEOUT_ENV})"
        raise WeightsError(f"could not download ImageNet weights from {shown}: {reason}; "
                           f"check the network (or {URL_BASE_ENV}) {hint}") from None


@contextlib.contextmanager
def _socket_timeout(seconds: float) -> Iterator[None]:
    """A default timeout for new sockets: torch.hub's ``urlopen`` takes none, and a server that
    stops sending would otherwise hang the driver or every actor of a node for ever."""
    old = socket.getdefaulttimeout()
    socket.setdefaulttimeout(seconds)
    try:
        yield
    finally:
        socket.setdefaulttimeout(old)


@contextlib.contextmanager
def _dir_lock(path: str) -> Iterator[None]:
    """Exclusive flock on a directory (no lock file left behind); a no-op where unsupported."""
    try:
        import fcntl
        fd = os.open(path, os.O_RDONLY)
    except (ImportError, OSError):
        yield
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing releases the lock


# --- files ---------------------------------------------------------------------------------


@contextlib.contextmanager
def _local_file(spec: str, storage_options: dict | None) -> Iterator[str]:
    """A local path holding the file named by ``spec``; remote files go to a temporary copy."""
    shown = safe_uri(spec)
    if "://" not in spec or spec.startswith("file://"):
        path = os.path.expanduser(spec[len("file://"):] if spec.startswith("file://") else spec)
        if not os.path.exists(path):
            raise WeightsError(f"weights file not found: {shown}")
        if not os.path.isfile(path):
            raise WeightsError(f"weights path is not a file: {shown}")
        yield path
        return
    # The one storage layer below the model: its retry policy (transient faults retried, one that
    # outlasts the budget is StorageUnavailable: exit 1, not a "bad weights" usage error).
    from pipeline.input.storage import StorageUnavailable, redact_message, url_to_fs, with_retries

    fd, tmp = tempfile.mkstemp(prefix="vgg-weights-", suffix=os.path.splitext(
        urlsplit(spec).path)[1])
    os.close(fd)
    try:
        try:
            fs, rpath = url_to_fs(spec, storage_options)
            with_retries(lambda: fs.get_file(rpath, tmp), spec)
        except FileNotFoundError:
            raise WeightsError(f"weights file not found: {shown}") from None
        except StorageUnavailable:
            raise
        except Exception as e:  # fsspec backends raise many types; all mean "cannot fetch"
            msg = redact_message(" ".join(str(e).split()))[:300]
            raise WeightsError(f"could not read weights {shown}: {type(e).__name__}: {msg}"
                               ) from None
        yield tmp
    finally:
        os.remove(tmp)


def _sha256_file(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def _is_safetensors(path: str) -> bool:
    """safetensors layout: little-endian u64 header length, then a JSON header starting with '{'."""
    if path.endswith(".safetensors"):
        return True
    with open(path, "rb") as f:
        head = f.read(9)
    return (len(head) == 9 and head[8:9] == b"{"
            and int.from_bytes(head[:8], "little") < os.path.getsize(path))


def _read_state_dict(path: str, shown: str) -> dict[str, torch.Tensor]:
    if _is_safetensors(path):
        try:
            import safetensors.torch
            try:  # pread: plain memory, not a mapping of a file that may change or vanish
                obj: Any = safetensors.torch.load_file(path, backend="pread")
            except TypeError:  # safetensors < 0.8 has no backend argument
                obj = safetensors.torch.load_file(path)
        except Exception as e:
            raise WeightsError(f"cannot read weights {shown}: not a valid safetensors file "
                               f"({type(e).__name__}: {_first_line(e)})") from None
    else:
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as e:
            if "Weights only load failed" not in str(e):
                raise WeightsError(f"cannot read weights {shown}: not a PyTorch state dict "
                                   f"({_first_line(e)})") from None
            blocked = re.search(r"GLOBAL ([\w.]+)", str(e))
            what = f" (it needs {blocked.group(1)})" if blocked else ""
            raise WeightsError(
                f"refused to load weights {shown}: not a plain state dict{what}, and unpickling "
                "it could run code (torch.load weights_only=True); save model.state_dict() or "
                "a .safetensors file instead") from None
        except Exception as e:
            raise WeightsError(f"cannot read weights {shown}: not a PyTorch or safetensors state "
                               f"dict ({type(e).__name__}: {_first_line(e)})") from None
    return _as_state_dict(obj, shown)


def _as_state_dict(obj: Any, shown: str) -> dict[str, torch.Tensor]:
    if isinstance(obj, Mapping) and isinstance(obj.get("state_dict"), Mapping) and not all(
            isinstance(v, torch.Tensor) for v in obj.values()):
        obj = obj["state_dict"]  # a training checkpoint: {"state_dict": ..., "epoch": ...}
    if not isinstance(obj, Mapping):
        raise WeightsError(f"weights {shown} hold a {type(obj).__name__}, not a state dict")
    for k, v in obj.items():
        if not isinstance(k, str) or not isinstance(v, torch.Tensor):
            raise WeightsError(f"weights {shown} are not a state dict: entry {k!r} is a "
                               f"{type(v).__name__}, not a tensor")
    return dict(obj)


def _first_line(e: BaseException) -> str:
    return " ".join(str(e).split())[:200]


# --- fit check -----------------------------------------------------------------------------


@functools.lru_cache(maxsize=None)
def _expected_shapes(arch: str) -> dict[str, tuple[int, ...]]:
    with torch.device("meta"):  # shapes only: nothing allocated
        model = build_vgg(arch)
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def _check_fits(state: Mapping[str, torch.Tensor], arch: str, shown: str) -> None:
    """One-line WeightsError naming missing/unexpected keys and shape mismatches, if any."""
    expected = _expected_shapes(arch)
    got = {k: tuple(v.shape) for k, v in state.items()}
    if got == expected:
        return
    missing = [k for k in expected if k not in got]
    unexpected = [k for k in got if k not in expected]
    shapes = [f"{k} file {list(got[k])} vs model {list(expected[k])}"
              for k in expected if k in got and got[k] != expected[k]]
    parts = [f"{what} ({len(items)}): {', '.join(items[:_SHOW])}{', ...' * (len(items) > _SHOW)}"
             for what, items in (("missing keys", missing), ("unexpected keys", unexpected),
                                 ("shape mismatches", shapes)) if items]
    match = next((a for a in ARCHS if a != arch and _expected_shapes(a) == got), None)
    hint = f"; they look like {match} weights: set model.arch={match}" if match else ""
    raise WeightsError(f"weights {shown} do not fit model.arch {arch}: {'; '.join(parts)}{hint}")
