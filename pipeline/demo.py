"""``python -m pipeline.demo``: make a few sample photos, extract them, print each one's top-5 classes.

The photos come from scikit-image's bundled data (no network).  Weights: ImageNet when they can
be downloaded (or are cached in TORCH_HOME); otherwise random weights, announced loudly.
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import sys

import numpy as np

PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "motorcycle_left", "hubble_deep_field",
          "immunohistochemistry")


def make_photos(folder: str) -> list[str]:
    from PIL import Image
    from skimage import data
    os.makedirs(folder, exist_ok=True)
    names = []
    for name in PHOTOS:
        if not hasattr(data, name):
            continue
        arr = getattr(data, name)()
        Image.fromarray(arr).convert("RGB").save(os.path.join(folder, f"{name}.jpg"), quality=92)
        names.append(name)
    return names


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--dir", default="demo-output")
    parser.add_argument("--weights", default=os.environ.get("DEMO_WEIGHTS", "imagenet"))
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)

    import pipeline
    from pipeline.errors import UsageError
    from pipeline.input import layout
    from torchvision.models import VGG16_Weights

    photos, output = os.path.join(args.dir, "photos"), os.path.join(args.dir, "out")
    print(f"1. writing sample photos to {photos}/: {', '.join(make_photos(photos))}")
    shutil.rmtree(output, ignore_errors=True)
    weights = args.weights
    try:
        summary = pipeline.extract(photos, output, weights=weights, progress=True,
                                   runtime={"device": "auto"}, output={"top_k": 5})
    except UsageError as exc:  # e.g. no network to download the ImageNet weights
        print(f"   could not get {weights} weights ({exc}); falling back to random weights")
        weights = "random:0"
        shutil.rmtree(output, ignore_errors=True)
        summary = pipeline.extract(photos, output, weights=weights, progress=True, output={"top_k": 5})
    c, run = summary["counts"], summary["run"]
    print(f"2. extracted {c['embedded']} images ({c['errors']} errors) into {output}/ "
          f"in {run['wall_s']}s ({run['img_per_s']} img/s)")
    if summary["weights"]["random"]:
        print("\n" + "!" * 78 + "\n!! RANDOM WEIGHTS: the classes below are meaningless. For real ones run\n"
              "!!   make demo DEMO_WEIGHTS=imagenet   (needs network once) or DEMO_WEIGHTS=/path/vgg16.pth\n"
              + "!" * 78)
    categories = VGG16_Weights.IMAGENET1K_V1.meta["categories"]
    import pyarrow.dataset as ds
    table = ds.dataset(os.path.join(output, layout.EMBEDDINGS_DIR), format="parquet").to_table()
    print("3. top-5 ImageNet classes per photo:")
    for row in table.select(["id", "width", "height", "logits", "top5"]).to_pylist():
        logits = np.asarray(row["logits"], dtype=np.float32)
        p = np.exp(logits - logits.max())
        p /= p.sum()
        top = ", ".join(f"{categories[i]} {p[i]:.1%}" for i in row["top5"])
        print(f"   {row['id']:<28} {row['width']}x{row['height']:<5} {top}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
