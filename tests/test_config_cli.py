"""Config parsing, validation and redaction; the CLI's usage errors are one line with exit 2."""

from __future__ import annotations

import json

import pytest

from pipeline.cli import main
from pipeline.config import (KEYS, defaults, load_config, model_fingerprint, parse_storage_options,
                             redact)
from pipeline.errors import UsageError


def test_defaults_follow_the_design():
    cfg = defaults()
    assert cfg["model"]["arch"] == "vgg16" and cfg["model"]["weights"] == "imagenet"
    assert cfg["input"]["shard_size"] == 1000 and cfg["input"]["max_pixels"] == 100_000_000
    assert cfg["runtime"]["max_retries"] == 3 and cfg["runtime"]["shard_timeout_s"] == 3600
    assert cfg["output"]["fc7_dtype"] == "float32"  # what Spark reads (issue 16)


def test_shipped_confs_load_and_default_yaml_lists_every_key():
    import yaml
    tree = yaml.safe_load(open("conf/default.yaml"))
    listed = {f"{s}.{k}" for s, sub in tree.items() for k in sub}
    assert listed == set(KEYS)
    assert load_config("conf/default.yaml") == defaults()
    assert load_config("conf/gpu.yaml")["runtime"]["device"] == "cuda"
    assert load_config("conf/local-cpu.yaml")["runtime"]["device"] == "cpu"


def test_overrides_are_parsed_not_evaluated():
    cfg = load_config(overrides=["model.scales=256,384", "runtime.batch_size=16", "runtime.num_actors=auto",
                                 "input.extensions=JPG,.png"])
    assert cfg["model"]["scales"] == [256, 384]
    assert cfg["runtime"]["batch_size"] == 16 and cfg["runtime"]["num_actors"] is None
    assert cfg["input"]["extensions"] == ["jpg", "png"]
    with pytest.raises(UsageError, match="bad value for runtime.batch_size"):
        load_config(overrides=["runtime.batch_size=__import__('os').system('true')"])
    with pytest.raises(UsageError, match="unknown config key"):
        load_config(overrides=["model.depth=16"])
    with pytest.raises(UsageError, match=">= 224"):
        load_config(overrides=["model.scales=128"])
    with pytest.raises(UsageError, match="key=value"):
        load_config(overrides=["model.arch"])


def test_bad_yaml_and_unknown_key_in_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [unclosed\n")
    with pytest.raises(UsageError, match="not valid YAML"):
        load_config(str(bad))
    unknown = tmp_path / "unknown.yaml"
    unknown.write_text("runtime:\n  gpus_per_actor: 2\n")
    with pytest.raises(UsageError, match="runtime.gpus_per_actor"):
        load_config(str(unknown))


def test_storage_options_and_redaction():
    so = parse_storage_options(["key=AKIA123", "secret=s3cr3t", "endpoint_url=http://127.0.0.1:9000",
                                "client_kwargs.region_name=eu-west-1", "anon=false"])
    assert so["client_kwargs"] == {"region_name": "eu-west-1"} and so["anon"] is False
    red = redact({"storage_options": so, "model": {"arch": "vgg16"}})
    text = json.dumps(red)
    assert "AKIA123" not in text and "s3cr3t" not in text
    assert "http://127.0.0.1:9000" in text and "vgg16" in text


def test_fingerprint_changes_with_model_not_runtime():
    a = defaults()
    b = load_config(overrides=["runtime.batch_size=3", "input.shard_size=5"])
    c = load_config(overrides=["model.arch=vgg19"])
    assert model_fingerprint(a, "imagenet:x", None) == model_fingerprint(b, "imagenet:x", None)
    assert model_fingerprint(a, "imagenet:x", None) != model_fingerprint(c, "imagenet:x", None)
    assert model_fingerprint(a, "imagenet:x", None) != model_fingerprint(a, "random:0", None)


@pytest.mark.parametrize("argv,needle", [
    (["extract", "/definitely/missing", "/tmp/x-out"], "input not found"),
    (["extract", ".", "/tmp/x-out", "--set", "nope.key=1"], "unknown config key"),
    (["extract", ".", "/tmp/x-out", "--weights", "/missing/weights.pth"], "not found"),
    (["extract", "."], "required"),
    (["verify", "/definitely/missing"], "not found"),
    (["frobnicate"], "invalid choice"),
])
def test_usage_errors_are_one_line_exit_2(argv, needle, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("vgg-pipeline: error:") and needle in err[0], err


def test_help_names_every_command(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    for word in ("extract", "verify", "examples"):
        assert word in out


def test_dry_run_plans_without_a_model(photo_dir, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["extract", str(photo_dir), str(out), "--dry-run", "--weights", "random:0",
                 "--set", "input.shard_size=3"]) == 0
    counts = json.loads(capsys.readouterr().out)
    assert counts["images"] == 10 and counts["shards"] == 4
    assert (out / "_plan" / "_meta.json").exists() and not (out / "embeddings").exists()


def test_python_api_takes_config_sections_including_input(photo_dir, tmp_path):
    import pipeline
    counts = pipeline.extract(str(photo_dir), str(tmp_path / "out"), weights="random:0", dry_run=True,
                              input={"shard_size": 4}, runtime__batch_size=2)
    assert counts["images"] == 10 and counts["shards"] == 3
    with pytest.raises(UsageError, match="unknown config key"):
        pipeline.extract(str(photo_dir), str(tmp_path / "out2"), dry_run=True, input={"shardsize": 4})
