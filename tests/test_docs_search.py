"""Every Python snippet in docs/search.md runs against a real output and its assertions hold."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from tests.helpers import extract_thumbnails

DOC = Path(__file__).resolve().parent.parent / "docs" / "search.md"
SNIPPETS = re.findall(r"```python\n(.*?)```", DOC.read_text(), flags=re.S)


@pytest.fixture(scope="module")
def doc_output(ray_local, vgg11_weights, tmp_path_factory):
    root = tmp_path_factory.mktemp("docs")
    extract_thumbnails(root, 5, vgg11_weights, side=256, input={"shard_size": 2})
    return root


def test_the_doc_has_snippets_for_every_tool():
    text = "\n".join(SNIPPETS)
    for tool in ("duckdb", "pandas", "pyarrow.dataset", "faiss", "pipeline.load_embeddings", "pyspark"):
        assert tool in text


@pytest.mark.parametrize("snippet", SNIPPETS, ids=[f"snippet{i}" for i in range(len(SNIPPETS))])
def test_snippet_runs(snippet, doc_output, monkeypatch, request):
    if "pyspark" in snippet:  # its getOrCreate() then finds the session's small shared Spark
        request.getfixturevalue("spark")
    monkeypatch.chdir(doc_output)
    exec(compile(snippet, str(DOC), "exec"), {})
