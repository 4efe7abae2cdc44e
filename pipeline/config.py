"""Configuration: defaults, YAML files, ``--set key=value`` overrides, validation, redaction.

The config is a nested dict addressed by dotted keys (``runtime.batch_size``).  Every key has a
default and a parser in :data:`KEYS`; an unknown key or a value that does not parse is a
:class:`~pipeline.errors.UsageError` (exit 2).  Values are parsed, never evaluated.

Example::

    >>> from pipeline.config import load_config
    >>> cfg = load_config(overrides=["model.arch=vgg11", "model.scales=256,384"])
    >>> cfg["model"]["arch"], cfg["model"]["scales"]
    ('vgg11', [256, 384])
"""

from __future__ import annotations

import copy
import hashlib
import json
from typing import Any, Callable, Iterable, Optional

import fsspec
import yaml

from .errors import UsageError
from .input.storage import DEFAULT_READ_CONCURRENCY
from .model.archs import ARCHS
from .model.compiled import parse_setting as _compile_setting
from .model.precision import PRECISIONS

IMAGE_EXTENSIONS = ["jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff"]


def _choice(*options: str) -> Callable[[Any], str]:
    def parse(v: Any) -> str:
        s = str(v).strip()
        if s not in options:
            raise ValueError(f"expected one of {', '.join(options)}")
        return s
    return parse


def _int(minimum: int) -> Callable[[Any], int]:
    def parse(v: Any) -> int:
        if isinstance(v, bool):
            raise ValueError("expected an integer")
        i = int(str(v).strip().replace("_", ""))
        if i < minimum:
            raise ValueError(f"must be >= {minimum}")
        return i
    return parse


def _optional(parse: Callable[[Any], Any]) -> Callable[[Any], Any]:
    def parse_opt(v: Any) -> Any:
        if v is None or str(v).strip().lower() in ("", "none", "null", "auto"):
            return None
        return parse(v)
    return parse_opt


def _list(item: Callable[[Any], Any]) -> Callable[[Any], list]:
    def parse(v: Any) -> list:
        items = v if isinstance(v, (list, tuple)) else [s for s in str(v).split(",") if s.strip()]
        if not items:
            raise ValueError("expected a non-empty comma-separated list")
        return [item(x) for x in items]
    return parse


def _scale(v: Any) -> int:
    q = _int(224)(v)
    return q


def _extension(v: Any) -> str:
    return str(v).strip().lower().lstrip(".")


def _string(v: Any) -> str:
    return str(v).strip()


def _number(v: Any) -> float:
    f = float(v)
    if f <= 0:
        raise ValueError("must be > 0")
    return f


# dotted key -> (default, parser).  The docs/design.md §7 keys plus a few runtime knobs.
KEYS: dict[str, tuple[Any, Callable[[Any], Any]]] = {
    "model.arch": ("vgg16", _choice(*ARCHS)),
    "model.descriptor": ("fc7", _choice("fc7", "dense-multiscale")),
    "model.scales": ([256, 384, 512], _list(_scale)),
    "model.scale_aggregation": ("mean", _choice("mean", "stack")),
    "model.weights": ("imagenet", _string),
    "input.shard_size": (1000, _int(1)),
    "input.extensions": (list(IMAGE_EXTENSIONS), _list(_extension)),
    "input.max_pixels": (100_000_000, _int(1)),
    "input.max_bytes": (100_000_000, _int(1)),
    "input.read_concurrency": (DEFAULT_READ_CONCURRENCY, _int(1)),
    "runtime.num_actors": (None, _optional(_int(1))),
    "runtime.batch_size": (None, _optional(_int(1))),
    "runtime.device": ("auto", _choice("auto", "cuda", "cpu")),
    # auto: bf16 on CUDA and on CPUs with native bf16, else fp32 (pipeline/model/precision.py).
    "runtime.precision": ("auto", _choice(*PRECISIONS)),
    # torch.compile, built in the background and swapped in (pipeline/model/compiled.py): auto = on
    # CUDA once an actor has embedded enough images to pay it back; on = always (CPU too); off.
    "runtime.compile": ("auto", _compile_setting),
    "runtime.cpus_per_actor": (None, _optional(_number)),
    "runtime.decode_threads": (None, _optional(_int(1))),
    "runtime.decode": ("auto", _choice("auto", "cpu", "gpu")),
    "runtime.max_retries": (3, _int(0)),
    "runtime.shard_timeout_s": (3600.0, _number),
    "runtime.max_shards_in_flight": (None, _optional(_int(1))),
    "output.fc7_dtype": ("float32", _choice("float32", "float16")),  # float32: Spark refuses FLOAT16
    "output.top_k": (0, _int(0)),
}

# "connection_str": an Azure connection string (adlfs connection_string) carries the AccountKey
SECRET_WORDS = ("secret", "token", "password", "passwd", "key", "credential", "auth", "session", "connection_str")


def defaults() -> dict:
    cfg: dict = {}
    for dotted, (default, _) in KEYS.items():
        _assign(cfg, dotted, copy.deepcopy(default))
    return cfg


def _assign(cfg: dict, dotted: str, value: Any) -> None:
    section, _, name = dotted.partition(".")
    cfg.setdefault(section, {})[name] = value


def set_key(cfg: dict, dotted: str, value: Any) -> None:
    """Parse ``value`` with the key's parser and store it; unknown keys are usage errors."""
    if dotted not in KEYS:
        raise UsageError(f"unknown config key {dotted!r} (known: {', '.join(sorted(KEYS))})")
    try:
        parsed = KEYS[dotted][1](value)
    except (TypeError, ValueError) as exc:
        raise UsageError(f"bad value for {dotted}: {value!r} ({exc})") from None
    _assign(cfg, dotted, parsed)


def _flatten(tree: dict, prefix: str = "") -> Iterable[tuple[str, Any]]:
    for k, v in tree.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            yield from _flatten(v, key + ".")
        else:
            yield key, v


def load_config(conf: Optional[str] = None, overrides: Iterable[str] = (),
                values: Optional[dict] = None) -> dict:
    """Defaults, then the YAML file ``conf``, then ``values`` (dotted -> value), then ``key=value`` strings."""
    cfg = defaults()
    if conf:
        try:
            with fsspec.open(conf, "r") as f:
                tree = yaml.safe_load(f) or {}
        except FileNotFoundError:
            raise UsageError(f"config file not found: {conf}") from None
        except yaml.YAMLError as exc:
            raise UsageError(f"config file {conf} is not valid YAML: {str(exc).splitlines()[0]}") from None
        if not isinstance(tree, dict):
            raise UsageError(f"config file {conf} must hold a mapping of sections")
        for dotted, value in _flatten(tree):
            set_key(cfg, dotted, value)
    for dotted, value in (values or {}).items():
        set_key(cfg, dotted, value)
    for item in overrides:
        dotted, sep, value = item.partition("=")
        if not sep:
            raise UsageError(f"--set expects key=value, got {item!r}")
        set_key(cfg, dotted.strip(), value)
    _check_combinations(cfg)
    return cfg


def _check_combinations(cfg: dict) -> None:
    """Settings that parse one by one but cannot work together."""
    rt = cfg["runtime"]
    if rt["device"] == "cpu" and rt["precision"] == "fp16":
        raise UsageError("runtime.precision=fp16 needs CUDA; on runtime.device=cpu use bf16 "
                         "(fast where the CPU has native bf16), fp32 or auto")


def parse_storage_options(items: Iterable[str]) -> dict[str, Any]:
    """``key=value`` strings to fsspec storage_options; ``client_kwargs.region_name=x`` nests."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise UsageError(f"--storage-option expects key=value, got {redact_text(item)!r}")
        parsed: Any = value
        if value.lower() in ("true", "false"):
            parsed = value.lower() == "true"
        node = out
        *parents, leaf = key.strip().split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = parsed
    return out


def is_secret_key(name: str) -> bool:
    n = name.lower()
    return any(w in n for w in SECRET_WORDS)


def redact(obj: Any) -> Any:
    """Copy of ``obj`` with every value under a secret-looking key replaced by ``"***"``."""
    if isinstance(obj, dict):
        return {k: ("***" if is_secret_key(str(k)) and v not in (None, "") else redact(v))
                for k, v in obj.items()}
    if isinstance(obj, list):
        return [redact(v) for v in obj]
    return obj


def redact_text(item: str) -> str:
    key, sep, _ = item.partition("=")
    return f"{key}=***" if sep and is_secret_key(key) else item


def model_fingerprint(cfg: dict, weights_name: str, weights_sha: Optional[str]) -> str:
    """Hash of everything that changes the numbers in the output (model, weights, preprocessing,
    precision); a resume with a different fingerprint is refused."""
    # Imported here: the recipes live with the code that applies them (and pull in torch).
    from .decode import preprocess
    from .model import descriptor

    m = cfg["model"]
    relevant = {
        "arch": m["arch"], "descriptor": m["descriptor"], "weights": weights_name,
        "weights_sha256": weights_sha, "fc7_dtype": cfg["output"]["fc7_dtype"],
        "top_k": cfg["output"]["top_k"], "preprocessing": preprocess.DESCRIPTION,
        # The *configured* precision, not what the workers resolved it to: the driver cannot know
        # the latter (each actor detects its own CPU), and ``auto`` is a contract that holds on any
        # worker -- the fastest format within the parity tolerance of fp32 (fc7 cosine >= 0.999,
        # same top-1).  So a resume with ``auto`` on other hardware continues, each part file
        # recording the format it ran in (``dtypes.compute``); switching to an explicit format
        # (say fp32, for bit-identical outputs) is a different model and needs --overwrite.
        "precision": cfg["runtime"]["precision"],
    }
    if m["descriptor"] == "dense-multiscale":
        relevant.update(scales=m["scales"], scale_aggregation=m["scale_aggregation"],
                        dense_preprocessing=descriptor.DESCRIPTION)
    return hashlib.sha256(json.dumps(relevant, sort_keys=True).encode()).hexdigest()[:16]
