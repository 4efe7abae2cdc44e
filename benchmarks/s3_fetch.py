"""Fetch rate of one worker's read path from an S3 API, with latency added to every request.

A moto S3 server on localhost stands behind the fault proxy of ``tests/fault_proxy.py``, which
adds ``--latencies`` milliseconds to each request (the round trip to a real bucket).  For each
latency the script times :func:`pipeline.input.reader.fetch_shard` over ``--images`` realistic
JPEGs, as a worker runs it:

* ``async``: the pipeline's path: one ranged GET per image, ``--concurrency`` in flight on the
  filesystem's event loop (``input.read_concurrency``), ``--threads`` threads for nothing but tars;
* ``before``: what a worker did before (issue 14): ``--threads`` threads, each image a ``size``
  (HEAD) and then a GET.

moto itself serves only a few hundred small objects a second on 2 cores, so the ratio to the
0 ms rate of the same path is what tells whether latency is hidden::

    python benchmarks/s3_fetch.py                          # 0, 20, 30, 50 ms; 300 images
    python benchmarks/s3_fetch.py --images 600 --doc
"""

from __future__ import annotations

import logging
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402

BUCKET = "vgg-bench"
TARGET_MS, TARGET_RATIO = 30, 0.8


def async_rate(uris: list[str], options: dict, concurrency: int, threads: int) -> float:
    from pipeline.input.reader import Fetched, fetch_shard
    from pipeline.input.storage import FileSystems
    fsys = FileSystems(options, read_concurrency=concurrency)
    t0 = time.perf_counter()
    got = list(fetch_shard(uris, set(), fsys, max_bytes=100_000_000, threads=threads, prefetch=16))
    elapsed = time.perf_counter() - t0
    assert all(isinstance(g, Fetched) for g in got), [g for g in got if not isinstance(g, Fetched)][:1]
    return len(uris) / elapsed


def before_rate(uris: list[str], options: dict, threads: int) -> float:
    """The old read: a thread per core, ``fs.size`` then ``fs.cat_file`` (two round trips)."""
    from pipeline.input.storage import FileSystems
    fsys = FileSystems(options, read_concurrency=threads)

    def read(uri: str) -> bytes:
        fs, path = fsys.get(uri)
        fs.size(path)
        return fs.cat_file(path)
    t0 = time.perf_counter()
    with ThreadPoolExecutor(max_workers=threads) as pool:
        n = sum(1 for _ in pool.map(read, uris))
    return n / (time.perf_counter() - t0)


def main(argv: list[str] | None = None) -> int:
    p = common.arg_parser(__doc__)
    p.add_argument("--images", type=int, default=300)
    p.add_argument("--latencies", default="0,20,30,50", help="ms added per request, comma-separated")
    p.add_argument("--concurrency", type=int, default=None, help="input.read_concurrency (default: the config's)")
    p.add_argument("--threads", type=int, default=2, help="reader threads (the 'before' path's parallelism)")
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--no-before", action="store_true", help="skip the old path (slow at high latency)")
    p.add_argument("--data", type=Path, default=None)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    logging.getLogger("werkzeug").setLevel(logging.ERROR)

    import boto3

    from pipeline.config import defaults
    from tests.fault_proxy import FaultProxy, start_moto

    concurrency = args.concurrency or defaults().input.read_concurrency
    latencies = [int(x) for x in args.latencies.split(",") if x.strip()]
    m = common.machine()
    data = args.data or Path(tempfile.gettempdir()) / f"vgg-bench-jpegs-{args.images}"
    paths = common.make_jpeg_set(data, args.images)
    server, upstream = start_moto()
    proxy = FaultProxy(upstream)
    try:
        client = boto3.client("s3", endpoint_url=upstream, aws_access_key_id="bench", aws_secret_access_key="bench",
                              region_name="us-east-1")
        client.create_bucket(Bucket=BUCKET)
        for path in paths:
            client.put_object(Bucket=BUCKET, Key=f"img/{path.name}", Body=path.read_bytes())
        uris = [f"s3://{BUCKET}/img/{path.name}" for path in paths]
        options = {"endpoint_url": proxy.endpoint, "key": "bench", "secret": "bench"}
        async_rate(uris, options, concurrency, args.threads)  # connections, credentials, moto warm: untimed
        rows = {}
        for ms in latencies:
            proxy.latency_s = ms / 1000
            proxy.reset_log()
            rates = [async_rate(uris, options, concurrency, args.threads) for _ in range(args.repeat)]
            requests = len(proxy.requests) / (args.repeat * len(uris))
            in_flight = proxy.max_in_flight
            before = [] if args.no_before else [before_rate(uris, options, args.threads)]
            rows[ms] = {"async": rates, "requests_per_image": requests, "max_in_flight": in_flight,
                        "before": before}
    finally:
        proxy.close()
        server.stop()

    base = common.summary(rows[latencies[0]]["async"])["median"] if latencies else float("nan")
    base_before = (common.summary(rows[latencies[0]]["before"])["median"]
                   if latencies and rows[latencies[0]]["before"] else float("nan"))

    def render() -> str:
        table = common.table(
            ["added latency (ms)", f"img/s, async ({concurrency} in flight)", f"x {latencies[0]} ms",
             "requests/image", "most in flight", f"img/s, before ({args.threads} threads, HEAD+GET)",
             f"x {latencies[0]} ms (before)"],
            [[ms, common.spread(r["async"], 1), common.summary(r["async"])["median"] / base,
              r["requests_per_image"], r["max_in_flight"],
              common.spread(r["before"], 1) if r["before"] else "-",
              (common.summary(r["before"])["median"] / base_before) if r["before"] else "-"]
             for ms, r in rows.items()])
        return (f"{args.images} JPEGs ({sum(p.stat().st_size for p in paths) / len(paths) / 1024:.0f} KiB "
                f"average) from moto through the latency proxy; target: at {TARGET_MS} ms >= "
                f"{TARGET_RATIO}x the 0 ms rate.\n\n{table}")

    common.report(args, m, {"images": args.images, "concurrency": concurrency, "rows": rows},
                  render, "S3 fetch rate with added latency (benchmarks/s3_fetch.py)",
                  note="Box shared with other jobs: moto, the proxy and the client share its 2 cores.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
