"""The Python API, mirroring the CLI: :func:`extract` and :func:`load_embeddings`.

Example::

    >>> import pipeline
    >>> summary = pipeline.extract("photos/", "out/", weights="random:0",
    ...                            model={"arch": "vgg11"}, input={"shard_size": 100})  # doctest: +SKIP
    >>> emb = pipeline.load_embeddings("out/")                                     # doctest: +SKIP
    >>> emb.vectors.shape                                                          # doctest: +SKIP
    (12, 4096)
"""

from __future__ import annotations

from typing import Any, Optional

from .config import load_config


def _dotted(overrides: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in overrides.items():
        if isinstance(value, dict):
            out.update({f"{key}.{k}": v for k, v in value.items()})
        else:
            out[key.replace("__", ".")] = value
    return out


def extract(input: str, output: str, /, *, weights: Optional[str] = None, conf: Optional[str] = None,
            storage_options: Optional[dict] = None, address: Optional[str] = None,
            overwrite: bool = False, dry_run: bool = False, progress: bool = False,
            update: bool = False, **overrides: Any) -> dict:
    """Extract fc7 + logits for every image of ``input`` into ``output``; returns the run summary.

    ``overrides`` are config keys, either as sections (``model={"arch": "vgg11"}``,
    ``input={"shard_size": 100}``) or with ``__`` for the dot (``runtime__batch_size=16``).  Raises :class:`pipeline.errors.UsageError`
    for bad arguments and :class:`pipeline.errors.JobFailed` if the job cannot finish.

    ``update=True`` is ``extract --update``: the images of ``input`` that ``output`` does not hold
    yet are added as new shards; the summary's ``runs[-1]["new_images"]`` says how many.
    """
    from .run.driver import run_extract
    values = _dotted(overrides)
    if weights is not None:
        values["model.weights"] = weights
    cfg = load_config(conf, values=values)
    return run_extract(input, output, cfg, storage_options=storage_options, address=address,
                       overwrite=overwrite, dry_run=dry_run, progress=progress, update=update)


def load_embeddings(output: str, column: str = "fc7", *, normalize: bool = False,
                    storage_options: Optional[dict] = None):
    """Ids, uris and a float32 matrix of ``column`` from an output (see :mod:`pipeline.output.embeddings`)."""
    from .output.embeddings import load_embeddings as _load
    return _load(output, column, normalize=normalize, storage_options=storage_options)
