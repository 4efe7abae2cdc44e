"""Entrypoint that ``ray job submit`` runs on the cluster (docs/design.md §8).

    ray job submit --address http://HEAD:8265 --working-dir . -- \\
        python jobs/extract.py --conf conf/gpu.yaml s3://bucket/images/ s3://bucket/features/

It takes exactly the arguments of ``vgg-pipeline extract`` and exits with its code.  Ray Jobs
sets ``RAY_ADDRESS`` for the entrypoint, and the driver joins that cluster instead of starting a
private one, so the actors run on the job's cluster.
"""

from __future__ import annotations

import os
import sys

if __package__ in (None, ""):  # run as a script from a checkout: make ``pipeline`` importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from pipeline.cli import main  # noqa: E402


def run(argv: list[str]) -> int:
    """``vgg-pipeline extract ARGV...``; returns the exit code."""
    return main(["extract", *argv])


if __name__ == "__main__":
    sys.exit(run(sys.argv[1:]))
