"""vgg-pipeline: VGG16 fc7 embeddings and ImageNet logits for very large image collections, on Ray.

Example::

    >>> import pipeline
    >>> summary = pipeline.extract("photos/", "out/", weights="random:0")   # doctest: +SKIP
    >>> emb = pipeline.load_embeddings("out/")                              # doctest: +SKIP
"""

__version__ = "0.1.0"

from .api import extract, load_embeddings  # noqa: E402

__all__ = ["extract", "load_embeddings", "__version__"]
