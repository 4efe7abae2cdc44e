"""Shared fixtures: one local Ray per test session, real photos on disk, generated weights files."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import torch

from pipeline.model.vgg import build_vgg, init_weights

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("TORCH_HOME", "/nonexistent-torch-home-tests-never-download")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def ray_local():
    """A private local Ray shared by the tests that can share one (2 CPUs, no dashboard)."""
    import ray
    if ray.is_initialized():
        yield ray
        return
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False,
             configure_logging=False)
    yield ray
    ray.shutdown()


def require_program(name: str, installed_by: str) -> str:
    """Path of the program ``name``; skips the test without it, but fails under CI, where
    ``installed_by`` (a Makefile step) must have installed it: a missing install is a failure."""
    path = shutil.which(name)
    if path is None:
        message = f"{name} not found (installed by {installed_by})"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return path


@pytest.fixture(scope="session")
def spark():
    """One small local Spark for the whole session (1 core, 512 MiB driver, no UI): a JVM start
    costs seconds on 2 cores, so every test that reads with Spark shares it."""
    require_program("java", "make test-deps")
    from pyspark.sql import SparkSession
    session = (SparkSession.builder.master("local[1]").appName("vgg-pipeline-tests")
               .config("spark.driver.memory", "512m")
               .config("spark.driver.host", "127.0.0.1").config("spark.driver.bindAddress", "127.0.0.1")
               .config("spark.ui.enabled", "false").config("spark.ui.showConsoleProgress", "false")
               .config("spark.sql.shuffle.partitions", "1")
               .getOrCreate())
    session.sparkContext.setLogLevel("ERROR")
    yield session
    session.stop()


@pytest.fixture(scope="session")
def photo_dir(tmp_path_factory) -> Path:
    """Ten real photos (scikit-image / scikit-learn data) as JPEG and PNG, in nested folders."""
    from tests.corpus import sample_photos
    root = tmp_path_factory.mktemp("photos")
    photos = sample_photos()
    for i in range(10):
        name, img = photos[i % len(photos)]
        img = img if i < len(photos) else img.rotate(90, expand=True)
        sub = root / ("nested" if i % 3 == 0 else "")
        sub.mkdir(exist_ok=True)
        if i % 2:
            img.save(sub / f"{i:02d}-{name}.png")
        else:
            img.save(sub / f"{i:02d}-{name}.jpg", quality=90)
    return root


def save_weights(arch: str, path: Path, seed: int = 0) -> Path:
    model = build_vgg(arch)
    init_weights(model, seed)
    torch.save(model.state_dict(), path)
    return path


@pytest.fixture(scope="session")
def vgg11_weights(tmp_path_factory) -> Path:
    return save_weights("vgg11", tmp_path_factory.mktemp("weights") / "vgg11.pth")


def extract_thumbnails(root: Path, n: int, weights: Path, side: int = 320, **overrides) -> tuple[Path, Path]:
    """``n`` real photos as JPEG thumbnails in ``root/photos``, extracted with vgg11 into ``root/out``."""
    import pipeline
    from tests.corpus import sample_photos
    photos = root / "photos"
    photos.mkdir()
    for name, img in sample_photos()[:n]:
        img.thumbnail((side, side))
        img.save(photos / f"{name}.jpg", quality=90)
    pipeline.extract(str(photos), str(root / "out"), weights=str(weights), model={"arch": "vgg11"},
                     **overrides)
    return photos, root / "out"
