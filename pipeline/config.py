"""Configuration: defaults, YAML files, ``--set key=value`` overrides, validation, redaction.

Keys are dotted (``runtime.batch_size``).  :data:`KEYS` is the single table of keys, defaults and
parsers; an unknown key or a value that does not parse is a :class:`~pipeline.errors.UsageError`
(exit 2).  Values are parsed, never evaluated.  Code reads a :class:`Config`: frozen, typed
sections (:class:`ModelConfig`, :class:`InputConfig`, :class:`RuntimeConfig`,
:class:`OutputConfig`) whose fields are exactly the table's keys and carry no defaults of their
own (checked at import by :func:`check_sections`).  Lists are tuples, so a Config is immutable;
derive a changed one with :meth:`Config.with_values`, which goes through the same parsers.

Adding a key: one ``KEYS`` entry (default + parser), one field of that name in its section's
dataclass, and a line in ``conf/default.yaml``; a key without a field, or a field without a key,
fails at import.

Example::

    >>> from pipeline.config import load_config
    >>> cfg = load_config(overrides=["model.arch=vgg11", "model.scales=256,384"])
    >>> cfg.model.arch, cfg.model.scales
    ('vgg11', (256, 384))
    >>> cfg.with_values({"runtime.batch_size": "4"}).runtime.batch_size
    4
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import typing
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Mapping, Optional

import fsspec
import yaml

from .errors import UsageError
from .input.storage import DEFAULT_READ_CONCURRENCY
from .model.archs import ARCHS, dense_descriptor_dim
from .model.compiled import parse_setting as _compile_setting
from .model.precision import PRECISIONS

IMAGE_EXTENSIONS = ["jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff"]
# The one model.descriptor value that adds the dense multi-scale pass (ModelConfig.dense).
DENSE = "dense-multiscale"


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


def _list(item: Callable[[Any], Any]) -> Callable[[Any], tuple]:
    def parse(v: Any) -> tuple:
        items = v if isinstance(v, (list, tuple)) else [s for s in str(v).split(",") if s.strip()]
        if not items:
            raise ValueError("expected a non-empty comma-separated list")
        return tuple(item(x) for x in items)  # a tuple: a Config is immutable
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


# dotted key -> (default, parser).  The docs/design.md §7 keys plus a few runtime knobs.  Every key
# is also a field of its section's dataclass below (checked at import).
KEYS: dict[str, tuple[Any, Callable[[Any], Any]]] = {
    "model.arch": ("vgg16", _choice(*ARCHS)),
    "model.descriptor": ("fc7", _choice("fc7", DENSE)),
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
    # GPU decode engines to balance (pipeline/decode/engines.py): auto (None) = every engine the
    # node has, or a list of hw, cuda, cpu, to benchmark them one by one.
    "runtime.decode_engines": (None, _optional(_list(_choice("hw", "cuda", "cpu")))),
    "runtime.max_retries": (3, _int(0)),
    "runtime.shard_timeout_s": (3600.0, _number),
    "runtime.max_shards_in_flight": (None, _optional(_int(1))),
    "output.fc7_dtype": ("float32", _choice("float32", "float16")),  # float32: Spark refuses FLOAT16
    "output.top_k": (0, _int(0)),
}

# "connection_str": an Azure connection string (adlfs connection_string) carries the AccountKey
SECRET_WORDS = ("secret", "token", "password", "passwd", "key", "credential", "auth", "session", "connection_str")


@dataclass(frozen=True)
class ModelConfig:
    """``model.*``: what computes the numbers."""

    arch: str
    descriptor: str
    scales: tuple[int, ...]
    scale_aggregation: str
    weights: str

    @property
    def dense(self) -> bool:
        """The dense multi-scale descriptor runs (and with it ``scales`` and ``scale_aggregation``)."""
        return self.descriptor == DENSE

    @property
    def descriptor_dim(self) -> Optional[int]:
        """Width of the ``descriptor`` column; None when there is none (fc7 only)."""
        return dense_descriptor_dim(len(self.scales), self.scale_aggregation) if self.dense else None

    def identity(self) -> dict[str, Any]:
        """The fields that define the model's numbers, JSON-ready: arch and descriptor, plus scales
        and aggregation only when they apply.  The fingerprint hashes it and every part file
        records it (``metadata["model"]``); weights are identified by name and hash instead."""
        ident: dict[str, Any] = {"arch": self.arch, "descriptor": self.descriptor}
        if self.dense:
            ident.update(scales=list(self.scales), scale_aggregation=self.scale_aggregation)
        return ident


@dataclass(frozen=True)
class InputConfig:
    """``input.*``: what is listed and read, in shards of what size."""

    shard_size: int
    extensions: tuple[str, ...]
    max_pixels: int
    max_bytes: int
    read_concurrency: int


@dataclass(frozen=True)
class RuntimeConfig:
    """``runtime.*``: how the job runs (None: chosen for the hardware)."""

    num_actors: Optional[int]
    batch_size: Optional[int]
    device: str
    precision: str
    compile: str
    cpus_per_actor: Optional[float]
    decode_threads: Optional[int]
    decode: str
    decode_engines: Optional[tuple[str, ...]]
    max_retries: int
    shard_timeout_s: float
    max_shards_in_flight: Optional[int]


@dataclass(frozen=True)
class OutputConfig:
    """``output.*``: what is stored."""

    fc7_dtype: str
    top_k: int


@dataclass(frozen=True)
class Config:
    """A parsed, validated config; compares by value and pickles (it travels to the Ray actors)."""

    model: ModelConfig
    input: InputConfig
    runtime: RuntimeConfig
    output: OutputConfig

    def values(self) -> dict[str, Any]:
        """Dotted key -> value, in :data:`KEYS` order."""
        out: dict[str, Any] = {}
        for dotted in KEYS:
            section, _, name = dotted.partition(".")
            out[dotted] = getattr(getattr(self, section), name)
        return out

    def to_dict(self) -> dict[str, dict[str, Any]]:
        """The nested plain dict (lists, not tuples): what ``_SUCCESS.json`` stores, redacted."""
        tree: dict[str, dict[str, Any]] = {}
        for dotted, value in self.values().items():
            section, _, name = dotted.partition(".")
            tree.setdefault(section, {})[name] = list(value) if isinstance(value, tuple) else value
        return tree

    def with_values(self, values: Mapping[str, Any]) -> Config:
        """A copy with ``values`` (dotted -> value) parsed and checked exactly as :func:`load_config` does."""
        flat = self.values()
        for dotted, value in values.items():
            flat[dotted] = _parse(dotted, value)
        return _build(flat)


_HINTS = typing.get_type_hints(Config)
# section name -> its dataclass, as Config declares them
SECTIONS: dict[str, type] = {f.name: _HINTS[f.name] for f in dataclasses.fields(Config)}


def check_sections(keys: Mapping[str, Any] = KEYS) -> None:
    """Raise TypeError unless each :class:`Config` section has exactly one field per key of ``keys``
    in that section (no key without a field, no field without a key, no section without a class)."""
    wanted: dict[str, set[str]] = {}
    for dotted in keys:
        section, _, name = dotted.partition(".")
        wanted.setdefault(section, set()).add(name)
    problems = []
    for section in sorted(set(SECTIONS) | set(wanted)):
        cls = SECTIONS.get(section)
        have = {f.name for f in dataclasses.fields(cls)} if cls else set()
        want = wanted.get(section, set())
        where = cls.__name__ if cls else f"Config (no section {section!r})"
        problems += [f"{section}.{n} is in KEYS but not a field of {where}" for n in sorted(want - have)]
        problems += [f"{where}.{n} has no KEYS entry {section}.{n}" for n in sorted(have - want)]
    if problems:
        raise TypeError("config sections and KEYS disagree: " + "; ".join(problems))


check_sections()  # at import: a key added on one side only fails every entry point at once


def _parse(dotted: str, value: Any) -> Any:
    """``value`` through the key's parser; unknown keys and bad values are usage errors."""
    if dotted not in KEYS:
        raise UsageError(f"unknown config key {dotted!r} (known: {', '.join(sorted(KEYS))})")
    try:
        return KEYS[dotted][1](value)
    except (TypeError, ValueError) as exc:
        raise UsageError(f"bad value for {dotted}: {value!r} ({exc})") from None


def _build(flat: Mapping[str, Any]) -> Config:
    """The Config of parsed values (dotted -> value, every key), checked as a whole."""
    parts: dict[str, dict[str, Any]] = {}
    for dotted, value in flat.items():
        section, _, name = dotted.partition(".")
        parts.setdefault(section, {})[name] = value
    cfg = Config(**{section: cls(**parts[section]) for section, cls in SECTIONS.items()})
    _check_combinations(cfg)
    return cfg


def _default_values() -> dict[str, Any]:
    # The defaults go through their parsers too: typed like any configured value (tuples, floats).
    return {dotted: parse(default) for dotted, (default, parse) in KEYS.items()}


def defaults() -> Config:
    """The config with every key at its default."""
    return _build(_default_values())


def _flatten(tree: dict, prefix: str = "") -> Iterable[tuple[str, Any]]:
    for k, v in tree.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            yield from _flatten(v, key + ".")
        else:
            yield key, v


def load_config(conf: Optional[str] = None, overrides: Iterable[str] = (),
                values: Optional[Mapping[str, Any]] = None) -> Config:
    """Defaults, then the YAML file ``conf``, then ``values`` (dotted -> value), then ``key=value`` strings."""
    flat = _default_values()
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
            flat[dotted] = _parse(dotted, value)
    for dotted, value in (values or {}).items():
        flat[dotted] = _parse(dotted, value)
    for item in overrides:
        dotted, sep, value = item.partition("=")
        if not sep:
            raise UsageError(f"--set expects key=value, got {item!r}")
        flat[dotted.strip()] = _parse(dotted.strip(), value)
    return _build(flat)


def _check_combinations(cfg: Config) -> None:
    """Settings that parse one by one but cannot work together."""
    if cfg.runtime.device == "cpu" and cfg.runtime.precision == "fp16":
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


def model_fingerprint(cfg: Config, weights_name: str, weights_sha: Optional[str]) -> str:
    """Hash of everything that changes the numbers in the output (model, weights, preprocessing,
    precision); a resume with a different fingerprint is refused."""
    # Imported here: the recipes live with the code that applies them (and pull in torch).
    from .decode import preprocess
    from .model import descriptor

    relevant = {
        **cfg.model.identity(), "weights": weights_name,
        "weights_sha256": weights_sha, "fc7_dtype": cfg.output.fc7_dtype,
        "top_k": cfg.output.top_k, "preprocessing": preprocess.DESCRIPTION,
        # The *configured* precision, not what the workers resolved it to: the driver cannot know
        # the latter (each actor detects its own CPU), and ``auto`` is a contract that holds on any
        # worker -- the fastest format within the parity tolerance of fp32 (fc7 cosine >= 0.999,
        # same top-1).  So a resume with ``auto`` on other hardware continues, each part file
        # recording the format it ran in (``dtypes.compute``); switching to an explicit format
        # (say fp32, for bit-identical outputs) is a different model and needs --overwrite.
        "precision": cfg.runtime.precision,
    }
    if cfg.model.dense:
        relevant["dense_preprocessing"] = descriptor.DESCRIPTION
    return hashlib.sha256(json.dumps(relevant, sort_keys=True).encode()).hexdigest()[:16]
