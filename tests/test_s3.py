"""S3 end to end against a real S3 API on localhost (moto server, reached through the fault proxy
of ``tests/fault_proxy.py`` with no faults, so tests can count requests): input and output
buckets, credentials from the environment or ``--storage-option``, IAM-denied and missing objects
as error rows, paged bucket listings, one GET per image and per tar, and no credential in any
output."""

from __future__ import annotations

import io
import json
import os

import pandas as pd
import pyarrow.parquet as pq
import pytest

import pipeline
from pipeline.errors import UsageError
from pipeline.input import storage
from pipeline.input.reader import Fetched, fetch_shard
from pipeline.decode.preprocess import Decoded
from pipeline.input.reader import read_shard
from pipeline.input.forms import FORMS, ListingStats, Probe, bucket, list_input, open_input
from pipeline.input.storage import FileSystems
from tests.corpus import encode, small_photo, tar_bytes
from tests.helpers import cli_env, run_program as cli
from tests.fault_proxy import FaultProxy, start_moto

BUCKET = "vgg-s3-test"
# key below s3://BUCKET/in/ -> photo index, or None for a file that is not an image
INPUT_KEYS: dict[str, int | None] = {
    "a.jpg": 0,
    "sub/b.png": 1,
    "sub/deep/c.jpg": 2,
    "sub/deep/D.JPEG": 3,
    "z é.webp": 4,
    "private/secret.jpg": 5,      # readable by nobody: the IAM policy denies GetObject
    "a.jpg.json": None,           # sidecar
    ".thumbs/a.jpg": 6,           # hidden directory
}
DENIED = "private/secret.jpg"
GOOD = [k for k, v in INPUT_KEYS.items() if v is not None and k != DENIED and not k.startswith(".")]


def image_bytes(key: str) -> bytes:
    index = INPUT_KEYS[key]
    if index is None:
        return b'{"title": "a sidecar"}'
    fmt = {".png": "PNG", ".webp": "WEBP"}.get(os.path.splitext(key)[1].lower(), "JPEG")
    return encode(small_photo(index), fmt)


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    """A moto S3 server on 127.0.0.1 with IAM enforced; yields the endpoint and a user's keys.

    The user may do anything on S3 except read ``in/private/*``, which gives a real 403.
    """
    boto3 = pytest.importorskip("boto3")
    requests = pytest.importorskip("requests")

    server, upstream = start_moto()
    proxy = FaultProxy(upstream)
    endpoint = proxy.endpoint
    admin = dict(endpoint_url=upstream, aws_access_key_id="admin", aws_secret_access_key="admin",
                 region_name="us-east-1")
    client = boto3.client("s3", **admin)
    client.create_bucket(Bucket=BUCKET)
    for key in INPUT_KEYS:
        client.put_object(Bucket=BUCKET, Key=f"in/{key}", Body=image_bytes(key))
    client.put_object(Bucket=BUCKET, Key="in/empty/", Body=b"")  # a console-made "folder" marker
    iam = boto3.client("iam", **admin)
    iam.create_user(UserName="pipeline")
    iam.put_user_policy(UserName="pipeline", PolicyName="s3-but-private", PolicyDocument=json.dumps({
        "Version": "2012-10-17",
        "Statement": [{"Effect": "Allow", "Action": "s3:*", "Resource": "*"},
                      {"Effect": "Deny", "Action": "s3:GetObject",
                       "Resource": f"arn:aws:s3:::{BUCKET}/in/private/*"}]}))
    key = iam.create_access_key(UserName="pipeline")["AccessKey"]
    requests.post(f"{upstream}/moto-api/reset-auth", data=b"0").raise_for_status()  # enforce IAM now
    try:
        yield {"endpoint": endpoint, "key": key["AccessKeyId"], "secret": key["SecretAccessKey"],
               "proxy": proxy,
               "options": {"endpoint_url": endpoint, "key": key["AccessKeyId"],
                           "secret": key["SecretAccessKey"]}}
    finally:
        requests.post(f"{upstream}/moto-api/reset-auth", data=b"inf")
        proxy.close()
        server.stop()


def clean_env(**extra: str) -> dict:
    """No AWS settings but the test's own."""
    return cli_env("AWS_", **extra)


def output_objects(s3, prefix: str) -> dict[str, bytes]:
    fs = FileSystems(s3["options"]).get(f"s3://{BUCKET}/")[0]
    fs.invalidate_cache()
    return {p[len(f"{BUCKET}/{prefix}"):]: fs.cat_file(p) for p in fs.find(f"{BUCKET}/{prefix}")}


def assert_no_credentials(s3, objects: dict[str, bytes], *texts: str) -> None:
    secrets = (s3["secret"], s3["key"])
    for name, data in objects.items():
        for secret in secrets:
            assert secret.encode() not in data, f"credential in {name}"
        if name.endswith(".parquet"):  # key-value metadata, in case a writer compressed it
            md = pq.read_schema(io.BytesIO(data)).metadata or {}
            assert not any(s.encode() in v for v in md.values() for s in secrets), name
    for text in texts:
        for secret in secrets:
            assert secret not in text


def test_extract_bucket_to_bucket_with_credentials_from_the_environment(s3, vgg11_weights):
    env = clean_env(AWS_ENDPOINT_URL=s3["endpoint"], AWS_ACCESS_KEY_ID=s3["key"],
                    AWS_SECRET_ACCESS_KEY=s3["secret"], AWS_DEFAULT_REGION="us-east-1")
    out = f"s3://{BUCKET}/out/"
    run = cli("extract", f"s3://{BUCKET}/in/", out, "--weights", str(vgg11_weights),
              "--set", "model.arch=vgg11", "--set", "input.shard_size=3", "--no-progress", env=env)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "done: 6 images in 2 shards -> 5 embedded, 1 errors" in run.stdout
    check = cli("verify", out, env=env)
    assert check.returncode == 0, check.stdout + check.stderr[-2000:]
    assert check.stdout.startswith("OK: 6 images")

    so = s3["options"]
    emb = pd.read_parquet(f"s3://{BUCKET}/out/embeddings/", storage_options=so)
    assert sorted(emb["id"]) == sorted(GOOD)  # ids: keys below the prefix
    assert set(emb["uri"]) == {f"s3://{BUCKET}/in/{k}" for k in GOOD}
    for row in emb.itertuples():
        assert (row.width, row.height) == small_photo(INPUT_KEYS[row.id]).size
        assert len(row.fc7) == 4096 and len(row.logits) == 1000
    errors = pd.read_parquet(f"s3://{BUCKET}/out/errors/", storage_options=so)
    assert errors[["id", "stage", "error_type"]].values.tolist() == [[DENIED, "read", "PermissionError"]]

    objects = output_objects(s3, "out/")
    assert sorted(objects) == ["_SUCCESS.json", "_plan/_meta.json", "_plan/part-00000.parquet",
                               "embeddings/part-00000.parquet", "embeddings/part-00001.parquet",
                               "errors/part-00000.parquet"]  # atomic PUTs: no temporary objects
    success = json.loads(objects["_SUCCESS.json"])
    assert success["counts"]["skipped"] == {"extension:.json": 1, "hidden-dir": 1}
    assert (success["counts"]["images"], success["counts"]["embedded"], success["counts"]["errors"]) == (6, 5, 1)
    assert_no_credentials(s3, objects, run.stdout, run.stderr, check.stdout, check.stderr)


def test_an_output_bucket_that_does_not_exist_is_a_usage_error_before_any_work(s3, vgg11_weights):
    env = clean_env(AWS_ENDPOINT_URL=s3["endpoint"], AWS_ACCESS_KEY_ID=s3["key"],
                    AWS_SECRET_ACCESS_KEY=s3["secret"], AWS_DEFAULT_REGION="us-east-1")
    run = cli("extract", f"s3://{BUCKET}/in/", "s3://no-such-bucket/out/", "--weights", str(vgg11_weights),
              "--set", "model.arch=vgg11", "--no-progress", env=env)
    assert run.returncode == 2, run.stderr[-2000:]
    err = run.stderr.strip().splitlines()
    assert len(err) == 1 and "s3://no-such-bucket does not exist" in err[0], err
    storage.require_bucket(f"s3://{BUCKET}/anything/", s3["options"])  # an existing bucket passes


def test_no_credentials_at_all_is_one_line_and_exit_2(s3, vgg11_weights):
    env = clean_env(AWS_ENDPOINT_URL=s3["endpoint"], AWS_DEFAULT_REGION="us-east-1",
                    AWS_EC2_METADATA_DISABLED="true",  # no instance-metadata lookup: nothing to find
                    AWS_SHARED_CREDENTIALS_FILE="/nonexistent", AWS_CONFIG_FILE="/nonexistent")
    for src, out in [(f"s3://{BUCKET}/in/", "/tmp/unused-out"), (str(vgg11_weights.parent), f"s3://{BUCKET}/o/")]:
        run = cli("extract", src, out, "--weights", str(vgg11_weights), "--set", "model.arch=vgg11",
                  "--no-progress", env=env)
        assert run.returncode == 2, run.stderr[-2000:]
        err = run.stderr.strip().splitlines()
        assert len(err) == 1 and "no credentials for the storage (NoCredentialsError" in err[0], err


def test_manifest_in_a_bucket_with_storage_options(s3, vgg11_weights, ray_local):
    """Credentials only as storage options (nothing in the environment): relative manifest
    lines, a missing key (404), a denied key (403) and a duplicate id each become one error row."""
    so = s3["options"]
    fs = FileSystems(so).get(f"s3://{BUCKET}/")[0]
    lines = ["../in/a.jpg", f"s3://{BUCKET}/in/sub/b.png", "../in/missing.jpg", "../in/a.jpg",
             f"../in/{DENIED}"]
    fs.pipe_file(f"{BUCKET}/lists/m.txt", ("\n".join(lines) + "\n").encode())
    out = f"s3://{BUCKET}/out-manifest"
    summary = pipeline.extract(f"s3://{BUCKET}/lists/m.txt", out, weights=str(vgg11_weights),
                               storage_options=so, model={"arch": "vgg11"}, input__shard_size=2)
    assert (summary["counts"]["images"], summary["counts"]["embedded"], summary["counts"]["errors"]) == (5, 2, 3)
    assert summary["counts"]["duplicates"] == 1
    emb = pd.read_parquet(f"{out}/embeddings/", storage_options=so)
    assert emb["id"].tolist() == lines[:2]
    assert emb["uri"].tolist() == [f"s3://{BUCKET}/in/a.jpg", f"s3://{BUCKET}/in/sub/b.png"]
    errors = pd.read_parquet(f"{out}/errors/", storage_options=so).set_index("id")
    assert errors.loc["../in/missing.jpg", ["stage", "error_type"]].tolist() == ["read", "FileNotFoundError"]
    assert errors.loc["../in/a.jpg", ["stage", "error_type"]].tolist() == ["list", "DuplicateId"]
    assert errors.loc[f"../in/{DENIED}", ["stage", "error_type"]].tolist() == ["read", "PermissionError"]

    # the CLI, configured only by --storage-option (secret on the command line, never echoed)
    opts = [f"--storage-option=endpoint_url={s3['endpoint']}", f"--storage-option=key={s3['key']}",
            f"--storage-option=secret={s3['secret']}"]
    check = cli("verify", out, "--json", *opts, env=clean_env())
    assert check.returncode == 0, check.stdout + check.stderr[-2000:]
    assert json.loads(check.stdout)["errors"] == 3
    refused = cli("extract", f"s3://{BUCKET}/in/", f"s3://{BUCKET}/out-refused", "--weights", "random:0",
                  f"--storage-option=endpoint_url={s3['endpoint']}", "--storage-option=key=nobody",
                  f"--storage-option=secret={s3['secret']}", env=clean_env())
    assert refused.returncode == 2  # wrong key: a usage error in one line, without the secret
    assert refused.stderr.strip().splitlines() == [
        f"vgg-pipeline: error: access denied to input s3://{BUCKET}/in/: check the credentials "
        "(environment, profile or --storage-option)"]
    assert_no_credentials(s3, output_objects(s3, "out-manifest/"), check.stdout, check.stderr,
                          refused.stdout, refused.stderr)


def test_bucket_listing_is_paged_sorted_and_skips_hidden_and_markers(s3, monkeypatch):
    monkeypatch.setattr(bucket, "LIST_PAGE", 2)
    s3["proxy"].reset_log()
    stats = ListingStats()
    items = list(list_input(f"s3://{BUCKET}/in/", ["jpg", "jpeg", "png", "webp"], s3["options"], stats))
    ids = [i for i, _ in items]
    assert ids == sorted(GOOD + [DENIED]) and stats.kind == "folder"
    assert stats.skipped == {"extension:.json": 1, "hidden-dir": 1}
    lists = [r.query for r in s3["proxy"].requests if "list-type=2" in r.query]
    pages = [q for q in lists if "max-keys=2&" in q + "&"]
    # streamed two keys at a time (9 keys: 5 pages), not one big listing; the rest is the
    # one-key probe that tells a folder from a file
    assert len(pages) == 5 and all("max-keys=1&" in q for q in lists if q not in pages)


def test_a_bucket_prefix_is_the_bucket_form_and_a_key_is_detected_by_its_name(s3):
    """s3fs directories go to :class:`BucketForm` (before the generic folder walk); objects are
    manifests or tars by their names, as on any filesystem."""
    fs = FileSystems(s3["options"]).get(f"s3://{BUCKET}/")[0]
    fs.pipe_file(f"{BUCKET}/lists/m.txt", b"../in/a.jpg\n")
    for url in (f"s3://{BUCKET}/in/", f"s3://{BUCKET}/in", f"s3://{BUCKET}/in/sub"):
        probe = Probe(url, *storage.url_to_fs(url, s3["options"]))
        assert [f.__name__ for f in FORMS if f.detect(probe)] == ["BucketForm", "FolderForm"], url
        assert type(open_input(url, s3["options"])) is bucket.BucketForm
    source = open_input(f"s3://{BUCKET}/lists/m.txt", s3["options"])
    assert source.kind == "manifest" and not source.streams
    assert list(source.items(["jpg"])) == [("../in/a.jpg", f"s3://{BUCKET}/in/a.jpg")]
    with pytest.raises(UsageError, match="not found"):
        open_input(f"s3://{BUCKET}/nothing/", s3["options"])


def test_one_ranged_get_per_image_and_no_head(s3):
    """``input.max_bytes`` comes from the answer of one ranged GET: no HEAD/size request first."""
    keys = ["a.jpg", "sub/b.png", "sub/deep/c.jpg"]
    limit = len(image_bytes("sub/b.png")) - 1  # b.png is just too large
    s3["proxy"].reset_log()
    got = list(fetch_shard([f"s3://{BUCKET}/in/{k}" for k in keys], set(), FileSystems(s3["options"]),
                           max_bytes=limit, threads=2, prefetch=2))
    assert [type(g).__name__ for g in got] == ["Fetched", "Failed", "Fetched"]
    assert got[1].error.error_type == "TooLarge"
    assert [g.data for g in got if isinstance(g, Fetched)] == [image_bytes("a.jpg"), image_bytes("sub/deep/c.jpg")]
    requests = s3["proxy"].requests
    assert [r.method for r in requests] == ["GET"] * 3
    assert {r.range for r in requests} == {f"bytes=0-{limit}"}
    assert max(r.sent for r in requests) <= limit + 1  # the too-large file was not read past the limit


def test_permanent_s3_errors_are_not_retried(s3, monkeypatch):
    sleeps = []
    monkeypatch.setattr(storage.time, "sleep", sleeps.append)
    fsys = FileSystems(s3["options"])
    with pytest.raises(PermissionError):
        fsys.read_bytes(f"s3://{BUCKET}/in/{DENIED}")
    with pytest.raises(FileNotFoundError):
        fsys.read_bytes(f"s3://{BUCKET}/in/missing.jpg")
    assert sleeps == []
    assert fsys.read_bytes(f"s3://{BUCKET}/in/a.jpg") == image_bytes("a.jpg")


def test_tar_shard_in_a_bucket_is_listed_and_streamed(s3):
    members = {"x/0.jpg": image_bytes("a.jpg"), "x/0.json": b"{}", "x/1.png": image_bytes("sub/b.png")}
    fsys = FileSystems(s3["options"])
    fsys.get(f"s3://{BUCKET}/")[0].pipe_file(f"{BUCKET}/tars/shard-0.tar", tar_bytes(members))
    items = list(list_input(f"s3://{BUCKET}/tars/", ["jpg", "png"], s3["options"]))
    tar_uri = f"s3://{BUCKET}/tars/shard-0.tar"
    assert items == [("shard-0.tar#x/0.jpg", f"{tar_uri}#x/0.jpg"), ("shard-0.tar#x/1.png", f"{tar_uri}#x/1.png")]
    s3["proxy"].reset_log()
    results = list(read_shard([u for _, u in items], set(), fsys, max_pixels=10**8, max_bytes=10**8,
                              threads=2, prefetch=2))
    assert all(isinstance(r, Decoded) for r in results)
    assert [(r.width, r.height) for r in results] == [small_photo(0).size, small_photo(1).size]
    tar_reads = [(r.method, r.range) for r in s3["proxy"].requests if r.path.endswith("shard-0.tar")]
    assert tar_reads == [("GET", None)]  # the tar is streamed in one GET, not a HEAD and block reads
