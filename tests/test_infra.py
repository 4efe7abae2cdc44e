"""The cluster artefacts in infra/ and docs/cluster.md: valid, and consistent with each other.

Checks that need nothing but files run everywhere: ``infra/ray/cluster.yaml`` goes through Ray's
own ``prepare_config`` + ``validate_config`` (what ``ray up`` runs), its node resources are
compared with the AWS instance catalogue (moto's offline copy, the way Ray's autoscaler detects
them), the RayJob's entrypoint is parsed by the real CLI parser and config loader, and every
file names the same image, conf file and a feasible actor shape. Building the image needs a
Docker daemon, the base image already pulled, and ``VGG_PIPELINE_DOCKER_BUILD=1`` (the build
downloads torch from PyPI, and the test suite never touches the network by default).
"""

from __future__ import annotations

import copy
import os
import re
import shlex
import shutil
import subprocess
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
import yaml

from tests.helpers import CLUSTER_DOC, INFRA_README, shell_commands

if TYPE_CHECKING:
    from pipeline.config import Config

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILE = ROOT / "infra" / "docker" / "Dockerfile"
CLUSTER_YAML = ROOT / "infra" / "ray" / "cluster.yaml"
RAYJOB_YAML = ROOT / "infra" / "k8s" / "rayjob.yaml"
DOCKERIGNORE = ROOT / ".dockerignore"



# ---------------------------------------------------------------------------------------------
# helpers

def _dockerfile_args() -> dict[str, str]:
    """Default values of every ``ARG NAME=value`` in the Dockerfile."""
    text = DOCKERFILE.read_text()
    return {m[1]: m[2].strip('"') for m in re.finditer(r"^ARG\s+(\w+)=(\S*)\s*$", text, re.M)}


def _dockerfile_instructions(name: str) -> list[str]:
    """Arguments of every ``NAME`` instruction (continuation lines joined), in order."""
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    return [m[1].strip() for m in re.finditer(rf"^{name}\s+(.*)$", text, re.M)]


def _image() -> str:
    """The image reference documented in the Dockerfile's build command (``-t IMAGE``)."""
    found = set(re.findall(r"^#\s+docker build .*?-t\s+(\S+)", DOCKERFILE.read_text(), re.M))
    assert len(found) == 1, f"the Dockerfile should document exactly one `docker build -t IMAGE`: {found}"
    return found.pop()


def _base_image() -> str:
    args = _dockerfile_args()
    (base,) = _dockerfile_instructions("FROM")
    return re.sub(r"\$\{(\w+)\}", lambda m: args[m[1]], base)


def _cluster_raw() -> dict:
    return yaml.safe_load(CLUSTER_YAML.read_text())


def _rayjob_docs() -> list[dict]:
    return [d for d in yaml.safe_load_all(RAYJOB_YAML.read_text()) if d]


def _rayjob() -> dict:
    (job,) = [d for d in _rayjob_docs() if d.get("kind") == "RayJob"]
    return job


def _gpu_worker_types(cfg: dict) -> dict[str, dict]:
    return {name: nt for name, nt in cfg["available_node_types"].items()
            if name != cfg["head_node_type"] and nt.get("resources", {}).get("GPU", 0) > 0}


def _effective_config(conf: str, overrides: list[str], monkeypatch) -> Config:
    """The config a job would run with, loaded by the package itself from the repo root."""
    from pipeline.config import load_config
    monkeypatch.chdir(ROOT)
    return load_config(conf, overrides)


def _parse_extract(argv: list[str]):
    from pipeline.cli import build_parser
    return build_parser().parse_args(["extract", *argv])


# ---------------------------------------------------------------------------------------------
# Dockerfile and build context

def test_dockerfile_pins_versions_and_runs_as_non_root():
    import ray

    args = _dockerfile_args()
    # Head, workers and the local `ray up` / `submit` must run the same Ray.
    assert args["RAY_VERSION"] == ray.__version__, (
        f"Dockerfile RAY_VERSION {args['RAY_VERSION']} != installed ray {ray.__version__}")
    assert _base_image() == f"rayproject/ray:{ray.__version__}-py311-gpu"
    assert args["TORCH_VERSION"] and args["TORCHVISION_VERSION"]
    users = _dockerfile_instructions("USER")
    assert users and users[-1].split(":")[0] not in ("root", "0"), f"last USER is {users[-1]!r}"
    envs = " ".join(_dockerfile_instructions("ENV"))
    assert "TORCH_HOME=/cache/torch" in envs
    assert _dockerfile_instructions("VOLUME") == ["/cache"]
    # The launcher runs `docker run IMAGE bash`: an ENTRYPOINT that is not empty would break it.
    assert _dockerfile_instructions("ENTRYPOINT") == ["[]"]
    assert _dockerfile_instructions("CMD") == ['["vgg-pipeline", "--help"]']
    assert _dockerfile_instructions("WORKDIR")[-1] == "/app"


def test_image_tag_is_the_package_version():
    # (a regex, not tomllib: the package supports Python 3.10)
    version = re.search(r'^version\s*=\s*"([^"]+)"', (ROOT / "pyproject.toml").read_text(), re.M)[1]
    image = _image()
    assert image.endswith(f"/vgg-pipeline:{version}"), f"{image} is not tagged {version}"


def test_build_context_allowlist_covers_every_copy_and_nothing_else():
    lines = [ln.strip() for ln in DOCKERIGNORE.read_text().splitlines()
             if ln.strip() and not ln.startswith("#")]
    assert lines[0] == "*", ".dockerignore should start by excluding everything"
    allowed = {ln[1:] for ln in lines if ln.startswith("!")}
    for copy_args in _dockerfile_instructions("COPY"):
        sources = [a for a in copy_args.split() if not a.startswith("--")][:-1]
        for src in sources:
            assert (ROOT / src).exists(), f"COPY source {src} is missing from the repository"
            assert src in allowed, f"COPY source {src} is not re-included by .dockerignore"
    for secret_or_bulk in (".venv", ".git", "tests", "benchmarks", ".env", "out"):
        assert secret_or_bulk not in allowed
    for junk in ("**/__pycache__", "**/*.parquet"):
        assert junk in lines


def _docker_available() -> str | None:
    """None if a Docker daemon answers, else why not."""
    if not shutil.which("docker"):
        return "docker CLI not installed"
    try:
        info = subprocess.run(["docker", "info"], capture_output=True, text=True, timeout=30)
    except subprocess.TimeoutExpired:
        return "`docker info` timed out"
    if info.returncode != 0:
        return (info.stderr.strip().splitlines() or ["`docker info` failed"])[-1]
    return None


@pytest.mark.slow
@pytest.mark.timeout(3600)
def test_docker_image_builds_and_runs_the_cli():
    reason = _docker_available()
    if reason:
        pytest.skip(f"no Docker daemon: {reason}")
    base = _base_image()
    if subprocess.run(["docker", "image", "inspect", base], capture_output=True).returncode != 0:
        pytest.skip(f"no base image available offline: {base} is not pulled (docker pull {base})")
    if os.environ.get("VGG_PIPELINE_DOCKER_BUILD") != "1":
        pytest.skip("the build downloads torch from PyPI; set VGG_PIPELINE_DOCKER_BUILD=1 to run it")
    tag = "vgg-pipeline-test:infra"
    build = subprocess.run(["docker", "build", "-f", str(DOCKERFILE), "-t", tag, str(ROOT)],
                           capture_output=True, text=True, timeout=3000)
    assert build.returncode == 0, build.stdout[-3000:] + build.stderr[-3000:]
    try:
        def run(*argv: str) -> subprocess.CompletedProcess:
            return subprocess.run(["docker", "run", "--rm", tag, *argv], capture_output=True,
                                  text=True, timeout=300)

        help_ = run("vgg-pipeline", "--help")
        assert help_.returncode == 0, help_.stderr
        assert "extract" in help_.stdout
        default = run()  # CMD
        assert default.returncode == 0 and "extract" in default.stdout
        probe = run("bash", "-c", "id -u; pwd; echo $TORCH_HOME; ls jobs/extract.py conf/gpu.yaml")
        assert probe.returncode == 0, probe.stderr
        uid, cwd, torch_home, *files = probe.stdout.split()
        assert uid != "0" and cwd == "/app" and torch_home == "/cache/torch"
        assert sorted(files) == ["conf/gpu.yaml", "jobs/extract.py"]
    finally:
        subprocess.run(["docker", "image", "rm", "-f", tag], capture_output=True)


# ---------------------------------------------------------------------------------------------
# Ray cluster launcher config

def test_cluster_yaml_passes_rays_own_validation():
    from ray.autoscaler._private.util import prepare_config, validate_config

    raw = _cluster_raw()
    cfg = prepare_config(copy.deepcopy(raw))  # what `ray up` does before validating
    validate_config(cfg)                      # ray-schema.json + node-type/worker-count rules

    assert cfg["provider"]["type"] == "aws"
    assert cfg["docker"]["image"] == _image()
    head = cfg["available_node_types"][cfg["head_node_type"]]
    assert head["resources"].get("CPU") == 0 and not head["resources"].get("GPU")
    gpu_types = _gpu_worker_types(cfg)
    assert gpu_types, "no worker type advertises a GPU"
    for name, nt in gpu_types.items():
        assert nt["min_workers"] == 0, f"{name} should scale from zero"
        assert 0 < nt["max_workers"] <= cfg["max_workers"]
        assert nt["node_config"]["InstanceType"].split(".")[0] in {"g5", "g6", "g6e", "p4d", "p5", "p5e"}
        assert nt["node_config"]["IamInstanceProfile"]["Arn"].endswith("instance-profile/vgg-pipeline-worker")
    # Every node reaches S3/ECR through an instance profile, not keys.
    assert "aws_access_key_id" not in CLUSTER_YAML.read_text().lower()


def test_cluster_yaml_validation_rejects_a_broken_config():
    """The validation above has teeth: a typo in a node type is caught."""
    import jsonschema
    from ray.autoscaler._private.util import prepare_config, validate_config

    raw = _cluster_raw()
    worker = next(iter(_gpu_worker_types(raw)))
    raw["available_node_types"][worker]["max_worker"] = 3  # typo of max_workers
    with pytest.raises(jsonschema.ValidationError):
        validate_config(prepare_config(raw))


def _instance_catalogue_resources(instance_types: list[str], monkeypatch) -> dict[str, dict]:
    """Resources Ray's AWS provider would detect for each instance type (moto's offline catalogue)."""
    moto = pytest.importorskip("moto")
    import boto3
    from ray.autoscaler._private.aws import node_provider

    for var, value in {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                       "AWS_SESSION_TOKEN": "testing", "AWS_DEFAULT_REGION": "us-east-1"}.items():
        monkeypatch.setenv(var, value)
    region = _cluster_raw()["provider"]["region"]

    def only_these_types(region: str, aws_credentials=None) -> list[dict]:
        # Ray pages through the whole catalogue; asking for just these types is several times faster.
        ec2 = boto3.client("ec2", region_name=region)
        return ec2.describe_instance_types(InstanceTypes=instance_types)["InstanceTypes"]

    monkeypatch.setattr(node_provider, "list_ec2_instances", only_these_types)
    cfg = {"provider": {"type": "aws", "region": region}, "head_node_type": "none",
           "available_node_types": {t: {"node_config": {"InstanceType": t}} for t in instance_types}}
    with moto.mock_aws():
        out = node_provider.AWSNodeProvider.fillout_available_node_types_resources(cfg)
    return {t: out["available_node_types"][t].get("resources", {}) for t in instance_types}


def test_cluster_worker_resources_match_the_aws_instance_types(monkeypatch):
    """Declared CPU/GPU per worker type (active and the commented alternatives) = what EC2 has."""
    raw = _cluster_raw()
    declared = {nt["node_config"]["InstanceType"]: nt["resources"]
                for nt in _gpu_worker_types(raw).values()}
    alternatives = re.findall(r"^\s*#\s+([a-z0-9]+\.[a-z0-9]+)\s.*->\s*resources:\s*(\{[^}]*\})",
                              CLUSTER_YAML.read_text(), re.M)
    assert len(alternatives) >= 4, "the commented alternative GPU types are missing"
    for itype, res in alternatives:
        declared.setdefault(itype, yaml.safe_load(res))
    detected = _instance_catalogue_resources(sorted(declared), monkeypatch)
    for itype, res in declared.items():
        assert detected[itype].get("GPU", 0) >= 1, f"{itype} has no GPU"
        assert {k: detected[itype].get(k) for k in ("CPU", "GPU")} == \
            {k: res.get(k) for k in ("CPU", "GPU")}, f"{itype}: declared {res}, EC2 has {detected[itype]}"


def test_cluster_doc_commands_fit_the_cluster(monkeypatch):
    """Every documented `submit`: valid extract flags, an existing conf, actors that can be placed."""
    raw = _cluster_raw()
    (gpu_type,) = _gpu_worker_types(raw).values()
    cpus_per_gpu = gpu_type["resources"]["CPU"] / gpu_type["resources"]["GPU"]
    max_gpus = min(gpu_type["max_workers"], raw["max_workers"]) * gpu_type["resources"]["GPU"]

    submits = [c for doc in (CLUSTER_DOC, INFRA_README) for c in shell_commands(doc.read_text())
               if c[:2] == ["vgg-pipeline", "submit"]]
    assert len(submits) >= 3
    for cmd in submits:
        sep = cmd.index("--")
        submit_opts, extract = cmd[2:sep], cmd[sep + 1:]
        assert submit_opts[submit_opts.index("--address") + 1] == "http://127.0.0.1:8265"
        conf = submit_opts[submit_opts.index("--conf") + 1]
        assert conf == "conf/gpu.yaml" and (ROOT / conf).is_file()
        assert extract[0] == "extract"
        args = _parse_extract(extract[1:])
        assert args.input.startswith("s3://") and args.output.startswith("s3://")
        cfg = _effective_config(conf, args.set, monkeypatch)
        rt = cfg.runtime
        assert rt.device == "cuda"
        assert rt.cpus_per_actor is None or rt.cpus_per_actor <= cpus_per_gpu, (
            f"{' '.join(cmd)}: an actor wants {rt.cpus_per_actor} CPUs, {gpu_type['node_config']['InstanceType']} "
            f"has {cpus_per_gpu} per GPU")
        assert rt.num_actors is None or rt.num_actors <= max_gpus
    assert any(_parse_extract(c[c.index("--") + 2:]).set for c in submits), \
        "no documented submit asks for a number of actors"


# ---------------------------------------------------------------------------------------------
# KubeRay RayJob

def test_rayjob_manifest_shape():
    docs = _rayjob_docs()
    job = _rayjob()
    assert job["apiVersion"] == "ray.io/v1"
    spec = job["spec"]
    assert spec["shutdownAfterJobFinishes"] is True
    assert spec["ttlSecondsAfterFinished"] > 0
    assert spec["backoffLimit"] >= 1 and spec["submitterConfig"]["backoffLimit"] >= 1

    import ray
    cluster = spec["rayClusterSpec"]
    assert cluster["rayVersion"] == ray.__version__ == _dockerfile_args()["RAY_VERSION"]
    assert cluster["enableInTreeAutoscaling"] is True
    head = cluster["headGroupSpec"]
    assert head["rayStartParams"]["num-cpus"] == "0"
    pods = [head["template"]["spec"]] + [w["template"]["spec"] for w in cluster["workerGroupSpecs"]]
    for pod in pods:
        for container in pod["containers"]:
            assert container["image"] == _image()

    # Every pod runs as the manifest's service account, which carries the IRSA role.
    (sa,) = [d for d in docs if d["kind"] == "ServiceAccount"]
    assert sa["metadata"]["annotations"]["eks.amazonaws.com/role-arn"].startswith("arn:aws:iam::")
    assert {pod["serviceAccountName"] for pod in pods} == {sa["metadata"]["name"]}

    gpu_groups = [w for w in cluster["workerGroupSpecs"]
                  if "nvidia.com/gpu" in w["template"]["spec"]["containers"][0]["resources"]["limits"]]
    assert gpu_groups, "no worker group requests nvidia.com/gpu"
    for group in gpu_groups:
        pod = group["template"]["spec"]
        assert pod["nodeSelector"] and any(t["key"] == "nvidia.com/gpu" for t in pod["tolerations"])
        assert group["minReplicas"] == 0 < group["maxReplicas"]
    assert "nvidia.com/gpu" not in str(head["template"]["spec"]["containers"][0]["resources"])


def test_rayjob_entrypoint_is_a_valid_extract_that_fits_its_pods(monkeypatch):
    cluster = _rayjob()["spec"]["rayClusterSpec"]
    tokens = shlex.split(_rayjob()["spec"]["entrypoint"])
    assert tokens[:2] == ["python", "jobs/extract.py"]
    assert (ROOT / "jobs" / "extract.py").is_file(), "the entrypoint script jobs/extract.py is missing"
    args = _parse_extract(tokens[2:])
    assert args.conf == "conf/gpu.yaml"
    assert (ROOT / args.conf).is_file(), f"{args.conf} does not exist"
    assert args.input.startswith("s3://") and args.output.startswith("s3://")

    cfg = _effective_config(args.conf, args.set, monkeypatch)
    (group,) = [w for w in cluster["workerGroupSpecs"]
                if "nvidia.com/gpu" in w["template"]["spec"]["containers"][0]["resources"]["limits"]]
    limits = group["template"]["spec"]["containers"][0]["resources"]["limits"]
    gpus, cpus = int(limits["nvidia.com/gpu"]), float(limits["cpu"])
    rt = cfg.runtime
    assert rt.device == "cuda"
    assert rt.num_actors is not None and rt.num_actors <= group["maxReplicas"] * gpus, \
        "the job asks for more GPU actors than the worker group can ever hold"
    assert rt.cpus_per_actor is not None and rt.cpus_per_actor <= cpus / gpus, \
        f"an actor wants {rt.cpus_per_actor} CPUs, a worker pod has {cpus} for {gpus} GPU(s)"


# ---------------------------------------------------------------------------------------------
# docs

def test_docs_name_the_same_image_conf_and_placeholders():
    doc = CLUSTER_DOC.read_text()
    image = _image()
    for text in (doc, INFRA_README.read_text()):
        assert image in text
        assert "conf/gpu.yaml" in text
    for path in ("infra/docker/Dockerfile", "infra/ray/cluster.yaml", "infra/k8s/rayjob.yaml"):
        assert path in doc and (ROOT / path).is_file()
    for conf in set(re.findall(r"conf/[\w.-]+\.yaml", doc)):
        assert (ROOT / conf).is_file(), f"docs/cluster.md mentions missing {conf}"

    # The docs' sed commands must hit placeholders that really are in the files they edit.
    seds = [c for c in shell_commands(doc) if c[0] == "sed"]
    for target in (CLUSTER_YAML, RAYJOB_YAML):
        rel = str(target.relative_to(ROOT))
        (cmd,) = [c for c in seds if rel in c]
        exprs = [cmd[i + 1] for i, tok in enumerate(cmd) if tok == "-e"]
        assert exprs, f"no sed expression for {rel}"
        for expr in exprs:
            delim = expr[1]
            placeholder = expr[2:].split(delim)[0]
            assert placeholder in target.read_text(), f"{placeholder!r} is not in {rel}"
    # Ray's default AMI is ancient; the documented one must be what cluster.yaml expects.
    assert "base-oss-nvidia-driver-gpu-ubuntu-22.04" in doc
    # Estimates are labelled as such, and the measured GPU figures are the ones in docs/benchmarks.md.
    assert "estimates" in doc.lower() and "measured on one nvidia h200" in doc.lower()
    bench = (ROOT / "docs" / "benchmarks.md").read_text()
    assert all(figure in bench for figure in ("2,056", "8,398")) and "2,056 end to end" in doc
    assert "check current pricing" in doc
