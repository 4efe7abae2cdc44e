"""Input forms (pipeline/input/forms/, docs/design.md §3): detection and the registry, folders, globs,
manifests, tar shards and their member addressing, memory:// and http(s)://, the input opened once
per run, and the shard reader's error rows.  S3 prefixes are tests/test_s3.py's, the plan
tests/test_plan.py's, storage retries tests/test_storage.py's."""

from __future__ import annotations

import functools
import http.server
import io
import os
import tarfile
import threading
from pathlib import Path

import fsspec
from fsspec.implementations.local import LocalFileSystem
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import pipeline
from pipeline.config import IMAGE_EXTENSIONS, load_config
from pipeline.errors import UsageError
from pipeline.input import forms
from pipeline.input.plan import build_plan, iter_shards, read_meta
from pipeline.decode.preprocess import Decoded
from pipeline.input.reader import Failed, read_shard
from pipeline.input.forms import FORMS, InputForm, ListingStats, Probe, list_input, open_input
from pipeline.input.forms.folder import FolderForm
from pipeline.input.forms.glob import GlobForm
from pipeline.input.forms.manifest import ManifestForm
from pipeline.input.forms.tar import TarForm, member_uri, read_members, split_member_uri
from pipeline.input.storage import FileSystems, url_to_fs
from tests.corpus import SIDECAR_SKIPS, encode, small_photo



def listing(url: str, **kw) -> tuple[list[tuple[str, str]], ListingStats]:
    stats = ListingStats()
    return list(list_input(url, kw.pop("extensions", IMAGE_EXTENSIONS), stats=stats, **kw)), stats


def cfg(shard_size: int) -> dict:
    return load_config(None, [f"input.shard_size={shard_size}"])


def reference_walk(root: Path) -> list[str]:
    """The documented order: depth-first, each directory's entries sorted by name."""
    out = []
    for name in sorted(os.listdir(root)):
        full = root / name
        if full.is_dir():
            if not name.startswith("."):
                out += [f"{name}/{rel}" for rel in reference_walk(full)]
        else:
            out.append(name)
    return out


def jpeg_bytes(i: int) -> bytes:
    return encode(small_photo(i), "JPEG", quality=85)


# -- the forms: detection, the registry, streams, one open per run ---------------------------

def detecting(url: str) -> list[str]:
    """The forms whose ``detect`` says yes to ``url``, in registry order."""
    probe = Probe(url, *url_to_fs(url))
    return [f.__name__ for f in FORMS if f.detect(probe)]


def test_each_form_detects_its_own_inputs_and_open_input_opens_them(tmp_path, listing_corpus):
    root, _ = listing_corpus
    (tmp_path / "m.txt").write_text("a.jpg\n")
    (tmp_path / "M.CSV").write_text("uri\na.jpg\n")
    pq.write_table(pa.table({"uri": ["a.jpg"]}), tmp_path / "m.parquet")
    write_tar(tmp_path / "s.TAR", {"a.jpg": jpeg_bytes(0)})
    (tmp_path / "dir.tar").mkdir()    # a directory is a folder whatever its name says
    (tmp_path / "lists.txt").mkdir()
    expected = {
        str(root): FolderForm, f"memory://{tmp_path}/nothing-here-but-a-dir": FolderForm,
        str(tmp_path / "m.txt"): ManifestForm, str(tmp_path / "M.CSV"): ManifestForm,
        str(tmp_path / "m.parquet"): ManifestForm, str(tmp_path / "s.TAR"): TarForm,
        str(tmp_path / "dir.tar"): FolderForm, str(tmp_path / "lists.txt"): FolderForm,
    }
    fsspec.filesystem("memory").mkdir(f"{tmp_path}/nothing-here-but-a-dir")
    try:
        for url, form in expected.items():
            assert detecting(url) == [form.__name__], url
            source = open_input(url)
            assert type(source) is form and (source.url, source.kind) == (url, form.kind)
    finally:
        fsspec.filesystem("memory").rm(f"{tmp_path}/nothing-here-but-a-dir", recursive=True)
    assert detecting(str(root / "jpeg" / "baseline.jpg")) == []  # an image is no form's input


def test_a_glob_is_detected_from_its_path_without_a_lookup(listing_corpus, monkeypatch):
    root, _ = listing_corpus
    monkeypatch.setattr(Probe, "info", property(lambda self: pytest.fail(f"looked up {self.url}")))
    for pattern in (f"{root}/*/*.jpg", f"{root}/jpeg/baseline.jp?", f"{root}/[jp]*/*"):
        assert type(open_input(pattern)) is GlobForm


def test_only_manifests_plan_without_streaming():
    assert [(f.__name__, f.kind, f.streams) for f in FORMS] == [
        ("GlobForm", "glob", True), ("BucketForm", "folder", True), ("FolderForm", "folder", True),
        ("ManifestForm", "manifest", False), ("TarForm", "tar", True)]


class LinesForm(InputForm):
    """A throwaway form: a ``.lst`` file of absolute image paths, one a line, the file name the id."""

    kind = "lines"

    @classmethod
    def detect(cls, probe: Probe) -> bool:
        return not probe.is_dir and probe.name.endswith(".lst")

    def _items(self, exts: set[str], stats: ListingStats):
        for line in self.fs.cat_file(self.path).decode().split("\n"):
            if line:
                yield os.path.basename(line), line


def test_a_new_form_is_one_class_added_to_the_registry(tmp_path, monkeypatch):
    paths = [tmp_path / f"{n}.jpg" for n in "abc"]
    for i, p in enumerate(paths):
        p.write_bytes(jpeg_bytes(i))
    lst = tmp_path / "images.lst"
    lst.write_text("".join(f"{p}\n" for p in paths))
    with pytest.raises(UsageError, match="not a manifest"):
        open_input(str(lst))
    monkeypatch.setattr(forms, "FORMS", (*FORMS, LinesForm))
    source = open_input(str(lst))
    assert isinstance(source, LinesForm) and source.streams
    items, stats = listing(str(lst))
    assert items == [(p.name, str(p)) for p in paths] and (stats.kind, stats.listed) == ("lines", 3)
    [(ids, uris)] = list(source.batches(["jpg"]))  # the default batches: the items as columns
    assert (ids.to_pylist(), uris.to_pylist()) == ([i for i, _ in items], [u for _, u in items])
    out = tmp_path / "out"
    assert [s.ids for s in build_plan(source, str(out), cfg(2), "fp")] == [["a.jpg", "b.jpg"], ["c.jpg"]]
    assert read_meta(str(out))["kind"] == "lines"
    assert [s.uris for s in iter_shards(str(out))] == [[str(paths[0]), str(paths[1])], [str(paths[2])]]


def test_a_run_opens_its_input_once(tmp_path, listing_corpus, monkeypatch):
    """Dry runs (first plan, then ``--update``) of a folder and a manifest look the input up once
    each: the driver opens it and hands the opened form to the planner."""
    root, good = listing_corpus
    manifest = tmp_path / "m.txt"
    manifest.write_text("".join(f"{root / i}\n" for i in sorted(good)))
    looked_up: list[str] = []
    real = LocalFileSystem.info

    def info(self, path, **kwargs):
        looked_up.append(str(path).rstrip("/"))
        return real(self, path, **kwargs)
    monkeypatch.setattr(LocalFileSystem, "info", info)
    for src in (root, manifest):
        out = tmp_path / f"out-{src.name}"
        for update in (False, True):
            looked_up.clear()
            result = pipeline.extract(str(src), str(out), weights="random:0", dry_run=True, update=update,
                                      model={"arch": "vgg11"}, input={"shard_size": 4})
            assert looked_up.count(str(src)) == 1, (src, update)
            assert result["images"] == len(good) and result.get("new_images", 0) == 0


# -- folders and globs -------------------------------------------------------------------------

def test_folder_walk_is_sorted_recursive_and_skips_sidecars_and_hidden_entries(listing_corpus):
    root, good = listing_corpus
    items, stats = listing(str(root))
    ids = [i for i, _ in items]
    assert sorted(ids) == sorted(good)  # every image (upper-case, unicode, spaces), no sidecar
    assert ids == [r for r in reference_walk(root) if r in good]  # deterministic sorted walk
    assert stats.kind == "folder" and stats.listed == len(good)
    assert stats.skipped == SIDECAR_SKIPS
    for i, uri in items:  # uri: absolute local path, no file://, no percent-encoding
        assert uri == str(root / i) and os.path.isabs(uri) and Path(uri).is_file()
    assert "upper/PHOTO.JPG" in ids and "日本/写真 1.png" in ids and "café photo.jpg" in ids
    assert items == listing(str(root))[0]  # same listing twice


def test_extension_filter_is_case_insensitive_and_configurable(listing_corpus):
    root, _ = listing_corpus
    items, stats = listing(str(root), extensions=["JPG"])
    ids = {i for i, _ in items}
    assert "upper/PHOTO.JPG" in ids and "jpeg/baseline.jpg" in ids
    assert not any(i.endswith((".png", ".jpeg", ".PnG")) for i in ids)
    assert stats.skipped["extension:.png"] > 0


def test_glob_lists_matches_relative_to_the_glob_root_and_skips_hidden(listing_corpus):
    root, good = listing_corpus
    items, stats = listing(f"{root}/jpeg/*.jpg")
    assert stats.kind == "glob"
    assert [i for i, _ in items] == sorted(r.split("/", 1)[1] for r in good
                                           if r.startswith("jpeg/") and r.endswith(".jpg"))
    deep, stats = listing(f"{root}/**/*.jpg")
    ids = {i for i, _ in deep}
    assert "png/.hidden.jpg" not in ids and ".cache/thumb.jpg" not in ids
    assert "jpeg/baseline.jpg" in ids and "café photo.jpg" in ids
    assert stats.skipped.get("hidden") == 3  # ._café photo.jpg, png/.hidden.jpg, .cache/thumb.jpg


def test_missing_input_and_non_manifest_file_are_usage_errors(tmp_path, listing_corpus):
    root, _ = listing_corpus
    with pytest.raises(UsageError, match="not found"):
        open_input(str(tmp_path / "nope"))
    with pytest.raises(UsageError, match="not a manifest"):
        open_input(str(root / "jpeg" / "baseline.jpg"))
    with pytest.raises(UsageError, match="not found"):
        pipeline.extract(str(tmp_path / "nope"), str(tmp_path / "out"), weights="random:0", dry_run=True)
    assert not (tmp_path / "out").exists()  # nothing written for a missing input


# -- manifests ---------------------------------------------------------------------------------

def test_txt_manifest_resolves_relative_lines_against_its_folder(tmp_path, listing_corpus):
    root, _ = listing_corpus
    lists = tmp_path / "lists"
    lists.mkdir()
    lines = [
        "\ufeff# a comment, then a blank line",
        "",
        f"{os.path.relpath(root, lists)}/jpeg/baseline.jpg",   # relative with ..
        f"  {root}/png/rgb.png  ",                              # absolute, whitespace stripped
        f"file://{root}/gif/static.gif",
        "./local dir/../local.jpg",
        "s3://bucket/key with space.jpg",
        "missing.jpg",
    ]
    (lists / "m.txt").write_text("\r\n".join(lines) + "\n", encoding="utf-8")
    items, stats = listing(str(lists / "m.txt"))
    assert stats.kind == "manifest"
    assert items == [
        (lines[2], str(root / "jpeg/baseline.jpg")),
        (f"{root}/png/rgb.png", str(root / "png/rgb.png")),
        (lines[4], str(root / "gif/static.gif")),
        (lines[5], str(lists / "local.jpg")),
        (lines[6], "s3://bucket/key with space.jpg"),
        ("missing.jpg", str(lists / "missing.jpg")),  # existence is not checked at plan time
    ]


def test_csv_and_parquet_manifests_take_uri_and_optional_id_columns(tmp_path):
    (tmp_path / "sub").mkdir()
    csv_text = 'note,uri,id\nx,a.jpg,001\ny,"sub/b,c.jpg",\nz,  ,skipped\nw,/abs/d.jpg,  \n'
    (tmp_path / "m.csv").write_text(csv_text, encoding="utf-8")
    items, _ = listing(str(tmp_path / "m.csv"))
    assert items == [("001", str(tmp_path / "a.jpg")),  # a numeric-looking id stays a string
                     ("sub/b,c.jpg", str(tmp_path / "sub/b,c.jpg")),  # empty id -> the uri
                     ("/abs/d.jpg", "/abs/d.jpg")]
    (tmp_path / "noid.csv").write_text("uri\nx.png\n", encoding="utf-8")
    assert listing(str(tmp_path / "noid.csv"))[0] == [("x.png", str(tmp_path / "x.png"))]
    (tmp_path / "bad.csv").write_text("path\nx.png\n", encoding="utf-8")
    with pytest.raises(UsageError, match="no 'uri' column"):
        listing(str(tmp_path / "bad.csv"))

    table = pa.table({"id": pa.array([7, None, 9], pa.int64()), "uri": ["p/x.jpg", "s3://b/y.jpg", None]})
    pq.write_table(table, tmp_path / "m.parquet")
    assert listing(str(tmp_path / "m.parquet"))[0] == [("7", str(tmp_path / "p/x.jpg")),
                                                        ("s3://b/y.jpg", "s3://b/y.jpg")]
    pq.write_table(pa.table({"url": ["x"]}), tmp_path / "bad.parquet")
    with pytest.raises(UsageError, match="no 'uri' column"):
        listing(str(tmp_path / "bad.parquet"))


def test_manifest_that_is_not_utf8_is_a_usage_error(tmp_path):
    (tmp_path / "m.txt").write_bytes(b"ok.jpg\n\xff\xfe bad.jpg\n")
    with pytest.raises(UsageError, match="not UTF-8"):
        listing(str(tmp_path / "m.txt"))


def test_memory_filesystem_folder_and_manifest():
    fs = fsspec.filesystem("memory")
    base = "/vgg-sources-test"
    if fs.exists(base):
        fs.rm(base, recursive=True)
    for rel in ("b/2.jpg", "a.png", "b/1.JPG", ".hidden/x.jpg", "b/.x.jpg", "b/note.json"):
        fs.pipe(f"{base}/imgs/{rel}", jpeg_bytes(0))
    fs.pipe(f"{base}/lists/m.txt", b"../imgs/a.png\nrel/x.jpg\n")
    try:
        items, stats = listing(f"memory://{base}/imgs")
        assert items == [("a.png", f"memory://{base}/imgs/a.png"), ("b/1.JPG", f"memory://{base}/imgs/b/1.JPG"),
                         ("b/2.jpg", f"memory://{base}/imgs/b/2.jpg")]
        assert stats.skipped == {"hidden-dir": 1, "hidden": 1, "extension:.json": 1}
        items, _ = listing(f"memory://{base}/lists/m.txt")
        assert items == [("../imgs/a.png", f"memory://{base}/imgs/a.png"),
                         ("rel/x.jpg", f"memory://{base}/lists/rel/x.jpg")]
        assert FileSystems().read_bytes(items[0][1]) == jpeg_bytes(0)  # the uri opens as it is
    finally:
        fs.rm(base, recursive=True)


# -- tar shards (webdataset) -------------------------------------------------------------------

def write_tar(path: Path, members: dict[str, bytes]) -> None:
    with tarfile.open(path, "w") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


class NoSeek(io.RawIOBase):
    """A forward-only stream: reading a tar through it proves nothing seeks or extracts."""

    def __init__(self, data: bytes) -> None:
        self._buf = io.BytesIO(data)

    def readable(self) -> bool:
        return True

    def readinto(self, b) -> int:
        chunk = self._buf.read(len(b))
        b[: len(chunk)] = chunk
        return len(chunk)

    def seekable(self) -> bool:
        return False

    def seek(self, *args):  # noqa: D102
        raise io.UnsupportedOperation("seek")


def test_tar_shards_list_each_image_member_and_read_by_streaming(tmp_path):
    shards = tmp_path / "shards"
    shards.mkdir()
    members = {"000/a.jpg": jpeg_bytes(0), "000/a.json": b"{}", "000/b.png": encode(small_photo(1), "PNG"),
               "._000/a.jpg": b"junk", "001/c.JPEG": jpeg_bytes(2)}
    write_tar(shards / "shard-000.tar", members)
    write_tar(shards / "shard-001.tar", {"d.jpg": jpeg_bytes(3), "e.txt": b"caption"})
    items, stats = listing(str(tmp_path / "shards" / "shard-000.tar"))
    assert stats.kind == "tar"
    tar_uri = str(shards / "shard-000.tar")
    assert items == [(f"shard-000.tar#{m}", f"{tar_uri}#{m}") for m in ("000/a.jpg", "000/b.png", "001/c.JPEG")]
    assert stats.skipped == {"tar-sidecar": 1, "hidden": 1}

    items, stats = listing(str(shards))  # a folder of tars: members of each, in order
    assert [i for i, _ in items] == ["shard-000.tar#000/a.jpg", "shard-000.tar#000/b.png",
                                     "shard-000.tar#001/c.JPEG", "shard-001.tar#d.jpg"]
    assert stats.skipped == {"tar-sidecar": 2, "hidden": 1}

    before = sorted(os.listdir(shards))
    uris = [u for _, u in items] + [f"{tar_uri}#000/missing.jpg"]
    results = list(read_shard(uris, set(), FileSystems(), max_pixels=10**8, max_bytes=10**8,
                              threads=2, prefetch=2))
    assert [type(r) for r in results] == [Decoded] * 4 + [Failed]
    assert (results[0].width, results[0].height) == small_photo(0).size
    assert results[4].error.stage == "read" and results[4].error.error_type == "FileNotFoundError"
    assert sorted(os.listdir(shards)) == before  # nothing extracted to disk

    data = (shards / "shard-000.tar").read_bytes()
    got = dict(read_members(NoSeek(data), {"001/c.JPEG", "000/a.jpg"}))
    assert got == {"000/a.jpg": members["000/a.jpg"], "001/c.JPEG": members["001/c.JPEG"]}


def test_tar_member_addressing_round_trips_and_tells_members_from_plain_files():
    """``TAR_URI#member`` splits at the first ``#`` right after ``.tar`` (or ``.tar?query``)."""
    for tar, member in [("/data/s.tar", "000/a.jpg"), ("/data/s.tar", "x#1.jpg"),  # '#' in the member
                        ("/data/batch#1/s#2.tar", "a.jpg"),  # '#' in the tar's path
                        ("/data/S.TAR", "a.JPG"), ("s3://b/d.tar.d/s.tar", "m.tar#n.jpg"),
                        ("https://host/s.tar?sig=a%2Fb&t=1", "a.jpg")]:  # a signed URL
        assert split_member_uri(member_uri(tar, member)) == (tar, member)
    for plain in ("/data/a#b.jpg", "/data/s.tar", "/data/s.tar#", "/data/s.tarx#a.jpg", "s3://b/s.tar.gz#a"):
        assert split_member_uri(plain) is None, plain
    # the one spelling left ambiguous: ".tar#" inside the tar's own path is taken as the split
    assert split_member_uri(member_uri("/d/v.tar#2/s.tar", "a.jpg")) == ("/d/v.tar", "2/s.tar#a.jpg")


def test_tar_with_hash_in_its_path_and_member_names_is_listed_and_read(tmp_path):
    shards = tmp_path / "batch#1"
    shards.mkdir()
    members = {"x#1.jpg": jpeg_bytes(0), "y.jpg": jpeg_bytes(1)}
    write_tar(shards / "s#1.tar", members)
    (shards / "plain#1.jpg").write_bytes(jpeg_bytes(2))
    items, _ = listing(str(tmp_path))
    tar_uri = str(shards / "s#1.tar")
    assert items == [("batch#1/plain#1.jpg", str(shards / "plain#1.jpg")),
                     ("batch#1/s#1.tar#x#1.jpg", f"{tar_uri}#x#1.jpg"),
                     ("batch#1/s#1.tar#y.jpg", f"{tar_uri}#y.jpg")]
    results = list(read_shard([u for _, u in items], set(), FileSystems(), max_pixels=10**8, max_bytes=10**8,
                              threads=2, prefetch=2))
    assert [type(r) for r in results] == [Decoded] * 3
    assert [(r.width, r.height) for r in results] == [small_photo(i).size for i in (2, 0, 1)]


# -- http(s) -----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def http_root(tmp_path_factory):
    """A local web server over a folder (no network beyond 127.0.0.1)."""
    root = tmp_path_factory.mktemp("www")
    handler = functools.partial(_QuietHandler, directory=str(root))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield root, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args) -> None:
        pass


def test_http_manifest_with_relative_and_absolute_urls(http_root):
    root, base = http_root
    (root / "img").mkdir()
    (root / "img" / "a.jpg").write_bytes(jpeg_bytes(0))
    (root / "img" / "b.png").write_bytes(encode(small_photo(1), "PNG"))
    (root / "lists").mkdir()
    (root / "lists" / "m.txt").write_text(f"../img/a.jpg\n{base}/img/b.png\n../img/missing.jpg\n")
    items, stats = listing(f"{base}/lists/m.txt")
    assert stats.kind == "manifest"
    assert items == [("../img/a.jpg", f"{base}/img/a.jpg"), (f"{base}/img/b.png", f"{base}/img/b.png"),
                     ("../img/missing.jpg", f"{base}/img/missing.jpg")]
    results = list(read_shard([u for _, u in items], set(), FileSystems(), max_pixels=10**8,
                              max_bytes=10**8, threads=2, prefetch=3))
    assert isinstance(results[0], Decoded) and (results[0].width, results[0].height) == small_photo(0).size
    assert isinstance(results[1], Decoded) and (results[1].width, results[1].height) == small_photo(1).size
    assert isinstance(results[2], Failed) and results[2].error.stage == "read"
    assert results[2].error.error_type == "FileNotFoundError"  # a 404 is permanent: one row, no retry


def test_an_http_url_with_a_query_is_a_manifest_not_a_glob(http_root):
    root, base = http_root
    (root / "q.txt").write_text("a.jpg\n")
    url = f"{base}/q.txt?version=2"
    assert detecting(url) == ["ManifestForm"]
    assert [i for i, _ in open_input(url).items(["jpg"])] == ["a.jpg"]


def test_read_errors_become_read_error_rows(tmp_path):
    (tmp_path / "ok.jpg").write_bytes(jpeg_bytes(0))
    big = encode(small_photo(0), "PNG")
    (tmp_path / "big.png").write_bytes(big)
    uris = [str(tmp_path / "ok.jpg"), str(tmp_path / "gone.jpg"), str(tmp_path / "big.png")]
    limit = len(jpeg_bytes(0)) + 1
    assert len(big) > limit
    results = list(read_shard(uris, set(), FileSystems(), max_pixels=10**8, max_bytes=limit,
                              threads=2, prefetch=2))
    assert isinstance(results[0], Decoded)
    assert (results[1].error.stage, results[1].error.error_type) == ("read", "FileNotFoundError")
    assert (results[2].error.stage, results[2].error.error_type) == ("read", "TooLarge")
