"""Planning at scale: the real ``build_plan`` over generated inputs, one fresh process per size.

Checks the docs/design.md §3 promise that planning streams: a 1,000,000-line manifest is planned in
well under 10 s and the planner's peak memory does not grow with the input (peak RSS within
±10 % between 100k and 1M lines).  Each size runs in its own subprocess so ``ru_maxrss`` is that
run's peak alone.  The manifest has 0.1 % duplicate lines (later copies of earlier ids), so the
out-of-core duplicate pass does real work and its count is checked.

``--update FRACTION`` then grows each input by that fraction of new images and times
``plan_update`` (what ``extract --update`` plans: the out-of-core anti-join of the new listing
against every planned id) in another fresh process; its count of new images is checked.

Usage::

    .venv/bin/python benchmarks/plan_scale.py                    # manifests of 100k and 1M lines
    .venv/bin/python benchmarks/plan_scale.py --sizes 100000,1000000,3000000 --json
    .venv/bin/python benchmarks/plan_scale.py --kind folder --sizes 20000,100000   # empty files
    .venv/bin/python benchmarks/plan_scale.py --update 0.01      # then 1 % new images, planned by --update

Exit status 1 when a target is missed (``--max-seconds``, ``--rss-tolerance``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

DUPLICATE_EVERY = 1000  # every 1000th line repeats an earlier one


def write_manifest(path: Path, n: int, start: int = 0) -> int:
    """``n`` relative lines ``images/DDDD/NNNNNNN.jpg`` (numbered from ``start``, appended when
    ``start`` > 0); returns how many are duplicates."""
    dups = 0
    with open(path, "a" if start else "w", encoding="utf-8") as f:
        chunk = []
        for i in range(start, start + n):
            if i and i % DUPLICATE_EVERY == 0:
                j = i - 500  # an id listed earlier (never itself a duplicate)
                dups += 1
            else:
                j = i
            chunk.append(f"images/{j // 1000:04d}/{j:07d}.jpg\n")
            if len(chunk) == 100_000:
                f.write("".join(chunk))
                chunk = []
        f.write("".join(chunk))
    return dups


def write_folder(root: Path, n: int, start: int = 0) -> int:
    """``n`` empty ``.jpg`` files, 1000 per directory (listing cost only: nothing is decoded)."""
    for i in range(start, start + n):
        d = root / f"{i // 1000:04d}"
        if i % 1000 == 0:
            d.mkdir(parents=True, exist_ok=True)
        (d / f"{i:07d}.jpg").touch()
    return 0


def child(input_url: str, output: str, shard_size: int) -> dict:
    """Run in a fresh interpreter: plan ``input_url`` into ``output`` and measure."""
    t_import = time.perf_counter()
    from pipeline.config import load_config
    from pipeline.input.forms import open_input
    from pipeline.input.plan import build_plan, read_meta
    import_s = time.perf_counter() - t_import
    rss_after_import = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    cfg = load_config(None, [f"input.shard_size={shard_size}"])
    cpu0 = time.process_time()
    t0 = time.perf_counter()
    first_shard_s = None
    items = shards = duplicates = 0
    for shard in build_plan(open_input(input_url), output, cfg, "benchmark"):
        if first_shard_s is None:
            first_shard_s = time.perf_counter() - t0
        items += len(shard)
        shards += 1
        duplicates += sum(shard.duplicate)
    wall = time.perf_counter() - t0
    meta = read_meta(output) or {}
    return {
        "items": items, "shards": shards, "duplicates": duplicates,
        "meta_duplicates": meta.get("num_duplicates"), "parts": len(meta.get("parts", [])),
        "wall_s": round(wall, 3), "cpu_s": round(time.process_time() - cpu0, 3),
        "first_shard_s": round(first_shard_s or 0.0, 3), "import_s": round(import_s, 3),
        "maxrss_after_import_mb": round(rss_after_import / 1024, 1),
        "maxrss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
    }


def child_update(input_url: str, output: str, shard_size: int) -> dict:
    """Run in a fresh interpreter: plan what is new in ``input_url`` for ``output`` and measure."""
    from pipeline.config import load_config
    from pipeline.input.forms import open_input
    from pipeline.input.plan import plan_update
    rss_after_import = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    cfg = load_config(None, [f"input.shard_size={shard_size}"])
    cpu0, t0 = time.process_time(), time.perf_counter()
    _, gen = plan_update(open_input(input_url), output, cfg)
    return {"new": gen["num_items"] if gen else 0, "new_duplicates": gen["num_duplicates"] if gen else 0,
            "wall_s": round(time.perf_counter() - t0, 3), "cpu_s": round(time.process_time() - cpu0, 3),
            "maxrss_after_import_mb": round(rss_after_import / 1024, 1),
            "maxrss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", default="100000,1000000", help="comma-separated input sizes")
    ap.add_argument("--kind", choices=("manifest", "folder"), default="manifest")
    ap.add_argument("--shard-size", type=int, default=1000)
    ap.add_argument("--max-seconds", type=float, default=10.0, help="target wall time for the largest size")
    ap.add_argument("--rss-tolerance", type=float, default=0.10, help="allowed peak-RSS growth, smallest->largest")
    ap.add_argument("--json", action="store_true", help="print the results as JSON")
    ap.add_argument("--update", type=float, default=0.0, metavar="FRACTION",
                    help="then grow each input by this fraction and time planning the update")
    ap.add_argument("--child", nargs=2, metavar=("INPUT", "OUTPUT"), help=argparse.SUPPRESS)
    ap.add_argument("--child-update", nargs=2, metavar=("INPUT", "OUTPUT"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        print(json.dumps(child(*args.child, args.shard_size)))
        return 0
    if args.child_update:
        print(json.dumps(child_update(*args.child_update, args.shard_size)))
        return 0

    sizes = [int(s) for s in args.sizes.split(",")]
    results = []
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    with tempfile.TemporaryDirectory(prefix="plan-scale-") as tmp:
        for n in sizes:
            t0 = time.perf_counter()
            if args.kind == "manifest":
                src = Path(tmp, f"manifest-{n}.txt")
                expected_dups = write_manifest(src, n)
            else:
                src = Path(tmp, f"folder-{n}")
                expected_dups = write_folder(src, n)
            gen_s = time.perf_counter() - t0
            out = Path(tmp, f"out-{n}")
            proc = subprocess.run(
                [sys.executable, __file__, "--child", str(src), str(out), "--shard-size", str(args.shard_size)],
                env=env, capture_output=True, text=True, check=True)
            r = json.loads(proc.stdout.strip().splitlines()[-1])
            r.update(size=n, kind=args.kind, generate_s=round(gen_s, 2), expected_duplicates=expected_dups)
            if r["items"] != n or r["duplicates"] != expected_dups:
                print(f"wrong plan for {n}: {r}", file=sys.stderr)
                return 1
            if args.update:
                grown = max(1, int(n * args.update))
                # new numbers; a repeated line names an id 500 lines back: held already, or a later copy
                added_dups = (write_manifest if args.kind == "manifest" else write_folder)(src, grown, n)
                held = sum(1 for i in range(n, n + grown) if i % DUPLICATE_EVERY == 0 and i - 500 < n) \
                    if args.kind == "manifest" else 0
                grown, added_dups = grown - held, added_dups - held
                proc = subprocess.run(
                    [sys.executable, __file__, "--child-update", str(src), str(out),
                     "--shard-size", str(args.shard_size)], env=env, capture_output=True, text=True, check=True)
                u = json.loads(proc.stdout.strip().splitlines()[-1])
                if u["new"] != grown or u["new_duplicates"] != added_dups:
                    print(f"wrong update plan for {n} + {grown}: {u}", file=sys.stderr)
                    return 1
                r["update"] = u
            results.append(r)
            if args.kind == "manifest":
                src.unlink()

    base, top = results[0], results[-1]
    growth = top["maxrss_mb"] / base["maxrss_mb"] - 1
    ok = top["wall_s"] < args.max_seconds and growth <= args.rss_tolerance
    summary = {"machine": {"cpu": cpu_model(), "cores": os.cpu_count(), "python": platform.python_version()},
               "kind": args.kind, "shard_size": args.shard_size, "results": results,
               "rss_growth": round(growth, 4), "ok": ok}
    if args.json:
        print(json.dumps(summary, indent=1))
    else:
        print(f"{args.kind} planning on {summary['machine']['cpu']} ({os.cpu_count()} cores)")
        print(f"{'size':>10} {'wall s':>8} {'cpu s':>8} {'1st shard s':>12} {'peak RSS MB':>12} "
              f"{'after import MB':>16} {'dups':>6}")
        for r in results:
            print(f"{r['size']:>10} {r['wall_s']:>8} {r['cpu_s']:>8} {r['first_shard_s']:>12} "
                  f"{r['maxrss_mb']:>12} {r['maxrss_after_import_mb']:>16} {r['duplicates']:>6}")
        if args.update:
            print(f"update (+{args.update:.1%} new images), each in a fresh process:")
            print(f"{'size':>10} {'new':>8} {'wall s':>8} {'cpu s':>8} {'peak RSS MB':>12} {'after import MB':>16}")
            for r in results:
                u = r["update"]
                print(f"{r['size']:>10} {u['new']:>8} {u['wall_s']:>8} {u['cpu_s']:>8} {u['maxrss_mb']:>12} "
                      f"{u['maxrss_after_import_mb']:>16}")
        print(f"peak RSS growth {base['size']} -> {top['size']}: {growth:+.1%}; "
              f"{'OK' if ok else 'TARGET MISSED'} (< {args.max_seconds}s, <= {args.rss_tolerance:.0%})")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
