"""A hostile folder, end to end (docs/design.md §3-§5): every format and mode we accept, broken files
and decompression bombs, sidecars and hidden entries, unicode and spaces in names, upper-case
extensions, a directory named like an image, a broken symlink, a symlink loop, and tar shards
(one truncated).  Every image must land in exactly one row, with the right stage for failures."""

from __future__ import annotations

import json
import os

import pandas as pd
import pytest

import pipeline
from pipeline.output.verify import verify
from tests.corpus import (BAD_ERROR_TYPES, encode, small_photo, tar_bytes, write_bad_corpus, write_good_corpus,
                          write_sidecars)

MAX_PIXELS = 4_000_000  # far above any corpus photo (<= 400 px a side), far below every bomb


@pytest.fixture(scope="module")
def hostile(tmp_path_factory):
    """The corpus folder plus expected outcomes: id -> (w, h) | ("error", stage, error_type)."""
    root = tmp_path_factory.mktemp("hostile")
    good = write_good_corpus(root)
    bad = write_bad_corpus(root)
    sidecars = write_sidecars(root)
    expected: dict[str, tuple] = dict(good)
    expected.update({i: ("error", stage, BAD_ERROR_TYPES[i]) for i, stage in bad.items()})

    (root / "folder.jpg").mkdir()  # a directory with an image name is walked, not read
    (root / "folder.jpg" / "inside.png").write_bytes(encode(small_photo(3), "PNG"))
    expected["folder.jpg/inside.png"] = small_photo(3).size
    os.symlink(root / "nowhere.jpg", root / "broken link.jpg")  # listed, then unreadable
    expected["broken link.jpg"] = ("error", "read", "FileNotFoundError")
    os.symlink(root / "a", root / "a" / "b" / "loop")  # a/b/loop -> a: must not recurse forever

    webdataset = {"s/0001.jpg": encode(small_photo(4), "JPEG"), "s/0001.json": b"{}",
                  "s/0002.png": encode(small_photo(5), "PNG")}
    (root / "shards").mkdir()
    (root / "shards" / "ok.tar").write_bytes(tar_bytes(webdataset))
    expected["shards/ok.tar#s/0001.jpg"] = small_photo(4).size
    expected["shards/ok.tar#s/0002.png"] = small_photo(5).size
    first = encode(small_photo(6), "JPEG")
    whole = tar_bytes({"t/first.jpg": first, "t/second.jpg": encode(small_photo(7), "JPEG")})
    cut = 512 + -(-len(first) // 512) * 512 + 512 + 100  # in the middle of the second member's data
    (root / "shards" / "truncated.tar").write_bytes(whole[:cut])
    expected["shards/truncated.tar#t/first.jpg"] = small_photo(6).size
    expected["shards/truncated.tar#t/second.jpg"] = ("error", "read", "ReadError")
    skipped = {"extension:.json": 2, "extension:.txt": 1, "extension:(none)": 1, "extension:.db": 1,
               "extension:.mp4": 1, "hidden": 3, "hidden-dir": 1, "symlink-loop": 1,
               "tar-sidecar": 1, "unreadable-tar": 1}
    assert len(sidecars) == 10
    return root, expected, skipped


def test_hostile_folder_every_image_exactly_once(hostile, tmp_path, vgg11_weights, ray_local):
    root, expected, skipped = hostile
    out = tmp_path / "out"
    summary = pipeline.extract(str(root), str(out), weights=str(vgg11_weights), model={"arch": "vgg11"},
                               input__shard_size=8, input__max_pixels=MAX_PIXELS)
    counts = summary["counts"]
    n_errors = sum(1 for v in expected.values() if v[0] == "error")
    assert (counts["images"], counts["errors"]) == (len(expected), n_errors)
    assert counts["embedded"] == len(expected) - n_errors
    assert counts["skipped"] == skipped
    assert json.loads((out / "_SUCCESS.json").read_text())["counts"] == counts

    emb = pd.read_parquet(out / "embeddings")
    err = pd.read_parquet(out / "errors")
    assert emb["id"].is_unique and err["id"].is_unique
    assert set(emb["id"]).isdisjoint(err["id"])
    assert set(emb["id"]) | set(err["id"]) == set(expected)  # no sidecar, no hidden file, nothing lost
    for row in emb.itertuples():
        assert (row.width, row.height) == expected[row.id], row.id
        assert row.uri == str(root / row.id)  # TAR_URI#member for tar members
    for row in err.itertuples():
        assert ("error", row.stage, row.error_type) == expected[row.id], (row.id, row.message)
        assert row.message
    assert {"upper/PHOTO.JPG", "upper/Picture.PnG", "café photo.jpg", "日本/写真 1.png",
            "a/b/c/deep nested.webp"} <= set(emb["id"])

    report = verify(str(out))
    assert report.ok, report.problems
    assert (report.images, report.embedded, report.errors) == (len(expected), counts["embedded"], n_errors)
