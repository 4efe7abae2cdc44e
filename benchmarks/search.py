"""Benchmark the FAISS index kinds of ``vgg-pipeline index`` on clustered synthetic vectors.

Vectors are Gaussian clusters around random centres (``x = c + spread * noise``, then
L2-normalised), queries are fresh points from the same clusters (not in the index).  Each
kind is built with :func:`pipeline.retrieval.index.make_index` — the same code ``build_index`` runs —
and compared against exact search (``flat``), which is also the ground truth.

    python benchmarks/search.py --n 100000 --d 4096 --queries 1000 --clusters 1000 \\
        --kinds ivf-pq,hnsw --sweep --append-doc docs/benchmarks.md

Reported per kind: build time (train + add), query latency (one batch of all queries, and
one query at a time), recall@k against exact search, and the index's serialized size
(≈ its memory).  ``--sweep`` also times the search-time knob (ivf-pq ``nprobe``,
hnsw ``ef_search``) over a few values on the same built index.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

# faiss' OpenMP threads busy-wait by default; when other processes share the cores (the usual
# case on a shared dev box) that makes k-means ~10x slower.  Must be set before faiss loads.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import faiss  # noqa: E402
import numpy as np  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.output.embeddings import l2_normalize  # noqa: E402
from pipeline.retrieval.index import make_index, set_search_params  # noqa: E402

SWEEPS = {"ivf-pq": ("nprobe", [8, 16, 32, 64, 128]), "hnsw": ("ef_search", [32, 64, 128, 256])}


def clustered(n: int, d: int, clusters: int, spread: float, seed: int) -> np.ndarray:
    """``n`` L2-normalised points of Gaussian clusters around random centres (float32)."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((clusters, d), dtype=np.float32)
    labels = rng.integers(clusters, size=n)
    out = np.empty((n, d), dtype=np.float32)
    for start in range(0, n, 8192):  # chunked: no second n x d temporary
        stop = min(n, start + 8192)
        noise = rng.standard_normal((stop - start, d), dtype=np.float32)
        out[start:stop] = centres[labels[start:stop]] + spread * noise
    return l2_normalize(out)


def recall_at_k(found: np.ndarray, truth: np.ndarray) -> float:
    """Mean fraction of the true top-k that the approximate top-k contains."""
    k = truth.shape[1]
    return float(np.mean([len(set(f) & set(t)) / k for f, t in zip(found.tolist(), truth.tolist())]))


def index_bytes(index: faiss.Index) -> int:
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "i.faiss")
        faiss.write_index(index, path)
        return os.path.getsize(path)


def time_queries(index: faiss.Index, queries: np.ndarray, k: int, single: int
                 ) -> tuple[np.ndarray, float, float]:
    """(top-k rows, batch ms/query, single-query median ms)."""
    t0 = time.perf_counter()
    _, rows = index.search(queries, k)
    batch_ms = (time.perf_counter() - t0) * 1000 / len(queries)
    times = []
    for q in queries[:single]:
        t0 = time.perf_counter()
        index.search(q[None, :], k)
        times.append((time.perf_counter() - t0) * 1000)
    return rows, batch_ms, float(np.median(times)) if times else float("nan")


def parse_params(items: list[str]) -> dict[str, dict[str, str]]:
    """``--param ivf-pq.nprobe=64`` -> ``{"ivf-pq": {"nprobe": "64"}}``."""
    out: dict[str, dict[str, str]] = {}
    for item in items:
        key, _, value = item.partition("=")
        kind, _, name = key.partition(".")
        if not value or not name:
            raise SystemExit(f"--param wants KIND.NAME=VALUE, got {item!r}")
        out.setdefault(kind, {})[name] = value
    return out


def machine() -> str:
    model = platform.processor() or "unknown CPU"
    try:
        with open("/proc/cpuinfo") as f:
            model = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return (f"{model}, {os.cpu_count()} cores (faiss OpenMP threads: {faiss.omp_get_max_threads()}, "
            f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY')}), faiss {faiss.__version__}, "
            f"numpy {np.__version__}, Python {platform.python_version()}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=100_000, help="indexed vectors")
    ap.add_argument("--d", type=int, default=4096, help="dimension")
    ap.add_argument("--queries", type=int, default=1000)
    ap.add_argument("--clusters", type=int, default=1000)
    ap.add_argument("--spread", type=float, default=1.0,
                    help="noise std relative to the centres' (cos(point, centre) ~ 1/sqrt(1+s^2))")
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--kinds", default="ivf-pq,hnsw", help="comma-separated; flat always runs")
    ap.add_argument("--single", type=int, default=200, help="queries timed one at a time")
    ap.add_argument("--param", action="append", default=[], metavar="KIND.NAME=VALUE",
                    help="index parameter override, e.g. ivf-pq.nprobe=64 (repeatable)")
    ap.add_argument("--sweep", action="store_true", help="also sweep nprobe / ef_search")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--append-doc", metavar="MD", help="append the results to this Markdown file")
    args = ap.parse_args(argv)
    overrides = parse_params(args.param)
    kinds = [k for k in args.kinds.split(",") if k and k != "flat"]

    load_before = os.getloadavg()
    started = t0 = time.perf_counter()
    data = clustered(args.n + args.queries, args.d, args.clusters, args.spread, args.seed)
    base, queries = data[:args.n], np.ascontiguousarray(data[args.n:])
    print(f"data: {args.n} x {args.d} + {args.queries} queries, {args.clusters} clusters, "
          f"{time.perf_counter() - t0:.1f}s to generate", flush=True)

    rows: list[dict] = []
    sweeps: list[dict] = []
    for kind in ["flat", *kinds]:
        t0 = time.perf_counter()
        index, params = make_index(base, kind, overrides.get(kind))
        build_s = time.perf_counter() - t0
        found, batch_ms, single_ms = time_queries(index, queries, args.k, args.single)
        if kind == "flat":
            truth = found
        row = {"kind": kind, "build_s": build_s, "train_s": params.get("train_seconds", 0.0),
               "batch_ms": batch_ms, "single_ms": single_ms,
               "recall": recall_at_k(found, truth), "bytes": index_bytes(index),
               "params": _describe(params)}
        rows.append(row)
        print(_format_row(row), flush=True)
        if args.sweep and kind in SWEEPS:
            knob, values = SWEEPS[kind]
            for value in values:
                set_search_params(index, {**params, knob: value})
                found, b_ms, s_ms = time_queries(index, queries, args.k, args.single)
                sweeps.append({"kind": kind, "knob": knob, "value": value, "batch_ms": b_ms,
                               "single_ms": s_ms, "recall": recall_at_k(found, truth)})
                print(f"  {kind} {knob}={value}: recall@{args.k} {sweeps[-1]['recall']:.3f}, "
                      f"{b_ms:.3f} ms/query batch, {s_ms:.2f} ms single", flush=True)
        del index

    table = _markdown(rows, sweeps, args.k)
    load = (f"1-minute load average {load_before[0]:.1f} at the start, {os.getloadavg()[0]:.1f} at "
            f"the end; whole run {time.perf_counter() - started:.0f}s")
    print(f"\n{table}\n\n{load}")
    if args.append_doc:
        command = "python benchmarks/search.py " + " ".join(argv if argv is not None else sys.argv[1:])
        with open(args.append_doc, "a") as f:
            f.write(f"\n### {args.n:,} x {args.d} vectors, {args.clusters} clusters "
                    f"({datetime.now(timezone.utc):%Y-%m-%d})\n\n"
                    f"Command: `{command}`  \nMachine: {machine()}  \nLoad: {load}\n\n{table}\n")
    return 0


def _describe(params: dict) -> str:
    if params["kind"] == "ivf-pq":
        return f"{params['factory']}, nprobe={params['nprobe']}, k_factor={params['k_factor']}"
    if params["kind"] == "hnsw":
        return (f"{params['factory']}, efConstruction={params['ef_construction']}, "
                f"efSearch={params['ef_search']}")
    return params["factory"]


def _format_row(r: dict) -> str:
    return (f"{r['kind']:7s} build {r['build_s']:8.1f}s (train {r['train_s']:.1f}s)  "
            f"batch {r['batch_ms']:8.3f} ms/q  single {r['single_ms']:8.2f} ms  "
            f"recall {r['recall']:.3f}  {r['bytes'] / 2**20:8.1f} MiB  {r['params']}")


def _markdown(rows: list[dict], sweeps: list[dict], k: int) -> str:
    lines = [f"| kind | build s (train s) | batch ms/query | single-query ms (median) | "
             f"recall@{k} | index MiB | parameters |",
             "|---|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        lines.append(f"| {r['kind']} | {r['build_s']:.1f} ({r['train_s']:.1f}) | "
                     f"{r['batch_ms']:.3f} | {r['single_ms']:.2f} | {r['recall']:.3f} | "
                     f"{r['bytes'] / 2**20:.0f} | {r['params']} |")
    if sweeps:
        lines += ["", f"| kind | search knob | batch ms/query | single-query ms | recall@{k} |",
                  "|---|---|---:|---:|---:|"]
        for s in sweeps:
            lines.append(f"| {s['kind']} | {s['knob']}={s['value']} | {s['batch_ms']:.3f} | "
                         f"{s['single_ms']:.2f} | {s['recall']:.3f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
