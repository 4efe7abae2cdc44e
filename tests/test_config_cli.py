"""Config parsing, validation and redaction; the CLI's usage errors are one line with exit 2."""

from __future__ import annotations

import dataclasses
import json
import pickle

import pytest

from pipeline.cli import main
from pipeline.config import (KEYS, Config, check_sections, defaults, load_config, model_fingerprint,
                             parse_storage_options, redact)
from pipeline.errors import UsageError


def test_defaults_follow_the_design():
    cfg = defaults()
    assert cfg.model.arch == "vgg16" and cfg.model.weights == "imagenet"
    assert cfg.input.shard_size == 1000 and cfg.input.max_pixels == 100_000_000
    assert cfg.runtime.max_retries == 3 and cfg.runtime.shard_timeout_s == 3600
    assert cfg.output.fc7_dtype == "float32"  # what Spark reads (issue 16)


def test_shipped_confs_load_and_default_yaml_lists_every_key():
    import yaml
    tree = yaml.safe_load(open("conf/default.yaml"))
    listed = {f"{s}.{k}" for s, sub in tree.items() for k in sub}
    assert listed == set(KEYS)
    assert load_config("conf/default.yaml") == defaults()
    assert load_config("conf/gpu.yaml").runtime.device == "cuda"
    assert load_config("conf/local-cpu.yaml").runtime.device == "cpu"


def test_overrides_are_parsed_not_evaluated():
    cfg = load_config(overrides=["model.scales=256,384", "runtime.batch_size=16", "runtime.num_actors=auto",
                                 "input.extensions=JPG,.png"])
    assert cfg.model.scales == (256, 384)
    assert cfg.runtime.batch_size == 16 and cfg.runtime.num_actors is None
    assert cfg.input.extensions == ("jpg", "png")
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


# Computed by the build before typed sections: outputs it wrote must still resume.
DENSE_SETS = ["model.arch=vgg11", "model.descriptor=dense-multiscale", "model.scales=224,256",
              "model.scale_aggregation=stack", "runtime.precision=fp32", "output.top_k=5"]


def test_fingerprint_is_unchanged_for_existing_outputs():
    assert model_fingerprint(defaults(), "imagenet:vgg16", "ab" * 32) == "cfe4100b4d12e598"
    assert model_fingerprint(load_config(overrides=DENSE_SETS), "random:0", None) == "54233a6a3a091d1d"
    dense_defaults = load_config(overrides=["model.descriptor=dense-multiscale"])
    assert model_fingerprint(dense_defaults, "imagenet:vgg16", "ab" * 32) == "26b6ea7cb6fce41b"


def test_sections_are_exactly_the_keys():
    check_sections()  # what the import ran
    with pytest.raises(TypeError, match="runtime.warp_speed is in KEYS but not a field of RuntimeConfig"):
        check_sections({**KEYS, "runtime.warp_speed": (False, bool)})
    with pytest.raises(TypeError, match="OutputConfig.top_k has no KEYS entry output.top_k"):
        check_sections({k: v for k, v in KEYS.items() if k != "output.top_k"})
    with pytest.raises(TypeError, match="no section 'serving'"):
        check_sections({**KEYS, "serving.port": (80, int)})


def test_dense_is_decided_by_the_model_section():
    fc7, dense = defaults().model, load_config(overrides=DENSE_SETS).model
    assert not fc7.dense and fc7.descriptor_dim is None
    assert fc7.identity() == {"arch": "vgg16", "descriptor": "fc7"}  # scales do not apply: not recorded
    assert dense.dense and dense.descriptor_dim == 2 * 4096  # stacked: one fc7 per scale
    assert dense.identity() == {"arch": "vgg11", "descriptor": "dense-multiscale", "scales": [224, 256],
                                "scale_aggregation": "stack"}
    assert load_config(overrides=["model.descriptor=dense-multiscale"]).model.descriptor_dim == 4096
    # Scales that do not apply do not change the fingerprint.
    assert model_fingerprint(load_config(overrides=["model.scales=224"]), "w", None) == \
        model_fingerprint(defaults(), "w", None)


def test_config_is_immutable_pickles_and_derives_through_the_parsers():
    cfg = load_config(overrides=DENSE_SETS)
    assert isinstance(cfg, Config) and pickle.loads(pickle.dumps(cfg)) == cfg  # sent to Ray actors
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.runtime.batch_size = 4
    derived = cfg.with_values({"runtime.batch_size": "4", "input.extensions": "JPG"})
    assert derived.runtime.batch_size == 4 and derived.input.extensions == ("jpg",)
    assert cfg.runtime.batch_size is None and derived.model == cfg.model  # the original is untouched
    with pytest.raises(UsageError, match="bad value for runtime.batch_size"):
        cfg.with_values({"runtime.batch_size": "__import__('os')"})
    with pytest.raises(UsageError, match="unknown config key"):
        cfg.with_values({"runtime.gpus": 1})
    with pytest.raises(UsageError, match="fp16 needs CUDA"):
        cfg.with_values({"runtime.device": "cpu", "runtime.precision": "fp16"})
    tree = cfg.to_dict()  # plain JSON types, as _SUCCESS.json stores them
    assert tree["model"]["scales"] == [224, 256] and tree["runtime"]["precision"] == "fp32"
    assert json.loads(json.dumps(tree)) == tree and set(tree) == {"model", "input", "runtime", "output"}
    flat = {f"{s}.{k}": v for s, sub in tree.items() for k, v in sub.items()}
    assert list(flat) == list(KEYS) and load_config(values=flat) == cfg


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
