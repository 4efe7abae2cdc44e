"""The output layout (docs/design.md §5): every name inside ``OUTPUT/``, spelled once.

::

    OUTPUT/_plan/part-NNNNN.parquet           the plan, in parts (input.plan)
    OUTPUT/_plan/gen-NNNN/part-NNNNN.parquet  the shards each ``extract --update`` added
    OUTPUT/_plan/_meta.json                   written last: the plan is complete
    OUTPUT/embeddings/part-NNNNN.parquet      one per shard, written last: the shard's commit marker
    OUTPUT/errors/part-NNNNN.parquet          at most one per shard (output.writer)
    OUTPUT/index/<column>-<kind>.faiss|.ids.parquet|.json    FAISS indexes (retrieval.index)
    OUTPUT/_SUCCESS.json                      the job's summary, written last of all (run.driver)
    .<name>.tmp-<8 hex>                       a file being written, beside its target (input.storage)

Why here, in ``input/``: the plan (``input.plan``) and atomic writes (``input.storage``) need these
names as much as the writer, the verifier, the driver and the index do, and the wings import in
layers (input < output < run, retrieval).  The lowest layer every user can import is ``input``, so
the layout lives there; it imports nothing of the package, so it can never be part of a loop.

Names and paths are relative to ``OUTPUT`` and use ``/``; callers put them under their root with
:func:`pipeline.input.storage.join`, which works for local paths and URLs alike.
"""

from __future__ import annotations

import re
import secrets
from typing import Optional

PLAN_DIR = "_plan"
EMBEDDINGS_DIR = "embeddings"
ERRORS_DIR = "errors"
INDEX_DIR = "index"
SUCCESS = "_SUCCESS.json"
PLAN_META_NAME = "_meta.json"
PLAN_META = f"{PLAN_DIR}/{PLAN_META_NAME}"
# Everything a job may have made in OUTPUT: what ``--overwrite`` removes.
ENTRIES = (PLAN_DIR, EMBEDDINGS_DIR, ERRORS_DIR, INDEX_DIR, SUCCESS)
# Directories whose part files are numbered by shard.
SHARD_DIRS = (EMBEDDINGS_DIR, ERRORS_DIR)

PART_PREFIX = "part-"
GENERATION_PREFIX = "gen-"
PART_SUFFIX = ".parquet"
PART_GLOB = f"{PART_PREFIX}*{PART_SUFFIX}"
_PART_RE = re.compile(rf"^{PART_PREFIX}(\d{{5,}}){re.escape(PART_SUFFIX)}$")
_TEMP_RE = re.compile(r"^\..+\.tmp-[0-9a-f]+$")
INDEX_SUFFIXES = {"faiss": ".faiss", "ids": ".ids.parquet", "json": ".json"}


def part_name(number: int) -> str:
    """``part-NNNNN.parquet``: shard ``number``'s embeddings/errors file, or plan part ``number``."""
    return f"{PART_PREFIX}{number:05d}{PART_SUFFIX}"


def plan_generation(gen: int) -> str:
    """``gen-NNNN``: the folder under ``_plan/`` of generation ``gen`` (1, 2, ...; 0 is ``_plan/``)."""
    return f"{GENERATION_PREFIX}{gen:04d}"


def is_plan_generation(name: str) -> bool:
    return name.startswith(GENERATION_PREFIX)


def part_number(name: str) -> Optional[int]:
    """The number of a part file (a base name or a path ending in one); None for any other name,
    temporary files included."""
    match = _PART_RE.match(name.rstrip("/").rsplit("/", 1)[-1])
    return int(match[1]) if match else None


def embeddings_part(shard: int) -> str:
    """``embeddings/part-NNNNN.parquet``: shard ``shard``'s commit marker."""
    return f"{EMBEDDINGS_DIR}/{part_name(shard)}"


def errors_part(shard: int) -> str:
    """``errors/part-NNNNN.parquet``: shard ``shard``'s error rows, if it has any."""
    return f"{ERRORS_DIR}/{part_name(shard)}"


def embeddings_glob() -> str:
    """``embeddings/part-*.parquet``: every shard's embeddings file (never a temporary file)."""
    return f"{EMBEDDINGS_DIR}/{PART_GLOB}"


def index_paths(column: str, kind: str) -> dict[str, str]:
    """The three files of one index: ``faiss`` (the index), ``ids`` (id and uri of each row) and
    ``json`` (its parameters, written last: the index's commit marker)."""
    stem = f"{INDEX_DIR}/{column}-{kind}"
    return {what: stem + suffix for what, suffix in INDEX_SUFFIXES.items()}


def temp_name(name: str, token: Optional[str] = None) -> str:
    """``.NAME.tmp-TOKEN``: where ``NAME`` is written before it is renamed into place.  Hidden and
    never matching :data:`PART_GLOB`, so no reader takes it for a finished file."""
    return f".{name}.tmp-{token or secrets.token_hex(4)}"


def is_temp_name(name: str) -> bool:
    """Whether ``name`` (a base name) is a :func:`temp_name`: left behind only by a killed writer."""
    return bool(_TEMP_RE.match(name))
