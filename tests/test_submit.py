"""``vgg-pipeline submit / status / logs`` (pipeline/submit.py, pipeline/cli/cluster.py).

The argument checks run in-process and need no cluster.  The rest runs against a real Ray
cluster started here with ``ray start``: a head (with the dashboard and Jobs API, on 127.0.0.1)
plus one worker node, 1 CPU each, with Ray token authentication on.  Everything the cluster
starts lives under one private temp dir, and teardown kills exactly the processes found under
it (``ray stop`` would stop every Ray on the machine, including other people's).  The CLI runs
in subprocesses so that the token and RAY_* variables never touch this test process's Ray.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import pytest
import requests

from pipeline import submit
from pipeline.cli import build_parser, main
from pipeline.cli import cluster as cli_cluster
from pipeline.errors import UsageError

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
CLI = [str(BIN / "vgg-pipeline")]
NEVER_SHIPPED = "local-secret-that-must-not-reach-the-cluster"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _one_line_error(capsys) -> str:
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("vgg-pipeline: error: "), err
    return lines[0]


# ---------------------------------------------------------------------------------------------
# no cluster needed

def test_unreachable_cluster_is_one_line_exit_2(capsys):
    port = _free_port()  # nothing listens there
    code = main(["submit", "--address", f"http://127.0.0.1:{port}", "--",
                 "extract", "/data/in", "/data/out"])
    assert code == 2
    line = _one_line_error(capsys)
    assert line.startswith(f"vgg-pipeline: error: cannot reach Ray cluster at http://127.0.0.1:{port}")


@pytest.mark.parametrize("command", [["status", "raysubmit_x"], ["logs", "raysubmit_x", "--follow"]])
def test_status_and_logs_unreachable_cluster(capsys, command):
    assert main([*command, "--address", f"http://127.0.0.1:{_free_port()}"]) == 2
    assert "cannot reach Ray cluster" in _one_line_error(capsys)


@pytest.mark.parametrize("extract_args, expected", [
    # credentials would be visible in the job's entrypoint on the dashboard
    (["--storage-option", f"secret={NEVER_SHIPPED}"], "looks like a credential"),
    (["--storage-option", f"client_kwargs.aws_secret_access_key={NEVER_SHIPPED}"], "IAM role"),
    (["--storage-option", f"token={NEVER_SHIPPED}"], "instance profile"),
    (["--weights", f"https://user:{NEVER_SHIPPED}@host/vgg.pth"], "URL with credentials"),
    (["--set", f"model.weights=s3://b/w.pth?X-Amz-Credential={NEVER_SHIPPED}"], "URL with credentials"),
    # a local relative path means nothing on the cluster
    (["--weights", "weights/vgg16.pth"], "weights 'weights/vgg16.pth' is a relative local path"),
    (["--set", "model.weights=vgg16.pth"], "weights 'vgg16.pth' is a relative local path"),
    # options that belong to submit, or that the job sets itself
    (["--conf", "conf/gpu.yaml"], "give --conf to submit, before `--`"),
    (["--address", "127.0.0.1:6379"], "the job joins the cluster it runs on"),
    # mistakes caught locally by the real extract parser and config loader
    (["--bogus"], "unrecognized arguments: --bogus"),
    (["--set", "runtime.batch_size=zero"], "bad value for runtime.batch_size"),
])
def test_refused_before_contacting_the_cluster(capsys, extract_args, expected):
    # The address is dead: a refusal must come first, so the message is the refusal's.
    code = main(["submit", "--address", f"http://127.0.0.1:{_free_port()}", "--",
                 "extract", "s3://in/images/", "s3://out/vgg16/", *extract_args])
    assert code == 2
    line = _one_line_error(capsys)
    assert expected in line
    assert NEVER_SHIPPED not in line


@pytest.mark.parametrize("argv, expected", [
    (["--", "extract", "photos", "/abs/out"], "INPUT 'photos' is a relative local path"),
    (["--", "extract", "/abs/in", "out"], "OUTPUT 'out' is a relative local path"),
    (["--", "verify", "/abs/out"], "submit runs extract on the cluster"),
    ([], "submit runs extract on the cluster"),
    (["--conf", "/nonexistent/tiny.yaml", "--", "extract", "/a", "/b"], "no such file"),
])
def test_refused_job_commands(capsys, argv, expected):
    assert main(["submit", "--address", f"http://127.0.0.1:{_free_port()}", *argv]) == 2
    assert expected in _one_line_error(capsys)


def test_address_must_be_the_dashboard_url(capsys, monkeypatch):
    monkeypatch.delenv("RAY_API_SERVER_ADDRESS", raising=False)
    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.1:6379")  # a GCS address, as set on a head node
    assert main(["submit", "--", "extract", "/a", "/b"]) == 2
    assert "no --address" in _one_line_error(capsys)
    for bad in ("127.0.0.1:8265", "ray://127.0.0.1:10001"):
        assert main(["submit", "--address", bad, "--", "extract", "/a", "/b"]) == 2
        assert "is not the dashboard's http(s)://HOST:PORT" in _one_line_error(capsys)
    monkeypatch.setenv("RAY_ADDRESS", "http://head.example:8265/")
    assert submit.resolve_address(None) == "http://head.example:8265"
    assert submit.resolve_address("https://h:443") == "https://h:443"


def test_parser_takes_the_job_with_or_without_separator():
    parser = build_parser()
    with_sep = parser.parse_args(["submit", "--address", "http://h:8265", "--no-wait", "--",
                                  "extract", "/a", "/b", "--set", "x=1", "--no-wait"])
    without = parser.parse_args(["submit", "--address", "http://h:8265", "extract", "/a", "/b"])
    assert cli_cluster.strip_separator(with_sep.job) == ["extract", "/a", "/b", "--set", "x=1", "--no-wait"]
    assert with_sep.no_wait is True
    assert cli_cluster.strip_separator(without.job) == ["extract", "/a", "/b"]
    assert with_sep.handler is cli_cluster.cmd_submit
    status = parser.parse_args(["status", "raysubmit_1", "--address", "http://h:8265"])
    logs = parser.parse_args(["logs", "raysubmit_1", "-f"])
    assert (status.handler, status.job_id) == (cli_cluster.cmd_status, "raysubmit_1")
    assert (logs.handler, logs.follow) == (cli_cluster.cmd_logs, True)


def test_the_job_is_parsed_by_extracts_own_parser():
    job = cli_cluster.extract_job(["extract", "s3://in/", "/out", "--weights", "random:0", "--set", "a.b=1",
                               "--storage-option", "anon=true"])
    assert job == submit.ExtractJob(argv=["extract", "s3://in/", "/out", "--weights", "random:0", "--set",
                                          "a.b=1", "--storage-option", "anon=true"],
                                    input="s3://in/", output="/out", weights="random:0", sets=["a.b=1"],
                                    storage_options=["anon=true"])
    with pytest.raises(UsageError, match="unrecognized arguments: --bogus"):
        cli_cluster.extract_job(["extract", "/in", "/out", "--bogus"])
    with pytest.raises(UsageError, match="submit runs extract on the cluster"):
        cli_cluster.extract_job(["verify", "/out"])


def test_default_working_dir_holds_only_the_script_and_the_conf(tmp_path, monkeypatch):
    conf = tmp_path / "tiny.yaml"
    conf.write_text("model:\n  arch: vgg11\n")
    staging = tmp_path / "staging"
    staging.mkdir()
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", NEVER_SHIPPED)
    spec = submit.build_job(cli_cluster.extract_job(["extract", "s3://in/", "/shared/out", "--set",
                                                 "input.shard_size=2"]), str(conf), None, str(staging))
    assert spec.entrypoint == ("python jobs/extract.py --conf conf/tiny.yaml s3://in/ /shared/out "
                               "--set input.shard_size=2")
    assert spec.runtime_env == {"working_dir": str(staging), "env_vars": {"PYTHONUNBUFFERED": "1"}}
    assert NEVER_SHIPPED not in json.dumps(spec.__dict__)
    files = sorted(p.relative_to(staging).as_posix() for p in staging.rglob("*") if p.is_file())
    assert files == ["conf/tiny.yaml", "jobs/extract.py"]
    assert (staging / "conf/tiny.yaml").read_text() == conf.read_text()
    assert (staging / "jobs/extract.py").read_text() == (ROOT / "jobs/extract.py").read_text()


def test_pip_installed_package_ships_an_equivalent_script(tmp_path, monkeypatch):
    """Without a checkout next to the package, the script is written from the package."""
    monkeypatch.setattr(submit, "_CHECKOUT_SCRIPT", tmp_path / "missing" / "extract.py")
    spec = submit.build_job(cli_cluster.extract_job(["extract", "/in", "/out"]), None, None, str(tmp_path))
    assert spec.entrypoint == "python jobs/extract.py /in /out"
    script = tmp_path / "jobs" / "extract.py"
    assert script.read_text() == submit._SHIM
    run = subprocess.run([sys.executable, "jobs/extract.py", "--help"], cwd=tmp_path,
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert "usage: vgg-pipeline extract" in run.stdout and "OUTPUT" in run.stdout


def test_working_dir_ships_a_checkout(tmp_path):
    job = cli_cluster.extract_job(["extract", "s3://in/", "s3://out/"])
    spec = submit.build_job(job, str(ROOT / "conf" / "gpu.yaml"), str(ROOT), str(tmp_path))
    assert spec.entrypoint == "python jobs/extract.py --conf conf/gpu.yaml s3://in/ s3://out/"
    assert spec.runtime_env["working_dir"] == str(ROOT)
    assert {".git", ".venv"} <= set(spec.runtime_env["excludes"])
    assert not list(tmp_path.iterdir()), "nothing is staged when a working dir is given"
    outside = tmp_path / "outside.yaml"
    outside.write_text("model:\n  arch: vgg11\n")
    with pytest.raises(UsageError, match="outside --working-dir"):
        submit.build_job(job, str(outside), str(ROOT), str(tmp_path))
    with pytest.raises(UsageError, match="no jobs/extract.py"):
        submit.build_job(job, None, str(tmp_path), str(tmp_path))


@pytest.mark.parametrize("status, exit_code, message, expected", [
    ("SUCCEEDED", 0, "", 0),
    ("FAILED", 2, "Job entrypoint command failed with exit code 2, last available logs", 2),
    ("FAILED", 1, "Job entrypoint command failed with exit code 1", 1),
    ("FAILED", None, "Job entrypoint command failed with exit code 2. No logs available.", 2),
    ("FAILED", None, "runtime_env setup failed: pip install ...", 1),
    ("STOPPED", None, "Job was intentionally stopped.", 1),
])
def test_job_exit_code(status, exit_code, message, expected):
    info = SimpleNamespace(status=status, driver_exit_code=exit_code, message=message)
    assert submit.job_exit_code(info) == expected


def test_documented_submit_commands_are_accepted(tmp_path, monkeypatch):
    """Every `vgg-pipeline submit` in docs/cluster.md and infra/README.md passes submit's checks."""
    from tests.helpers import CLUSTER_DOC, INFRA_README, shell_commands

    monkeypatch.chdir(ROOT)
    documented = [c for doc in (CLUSTER_DOC, INFRA_README) for c in shell_commands(doc.read_text())
                  if c[:2] == ["vgg-pipeline", "submit"]]
    assert len(documented) >= 3
    for i, cmd in enumerate(documented):
        args = build_parser().parse_args(cmd[1:])
        staging = tmp_path / str(i)
        staging.mkdir()
        job = cli_cluster.extract_job(cli_cluster.strip_separator(args.job))
        spec = submit.build_job(job, args.conf, args.working_dir, str(staging))
        assert spec.entrypoint.startswith("python jobs/extract.py --conf conf/gpu.yaml s3://"), cmd


# ---------------------------------------------------------------------------------------------
# a real two-node Ray cluster

@dataclass
class Cluster:
    root: Path        # every file and process of the cluster lives under here
    dashboard: str    # http://127.0.0.1:PORT (the Jobs API)
    gcs: str          # 127.0.0.1:PORT
    token: str
    env: dict         # environment of a client allowed in (the token, no RAY_ADDRESS)

    def cli(self, *argv: str, env: dict | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
        return subprocess.run([*CLI, *argv], env=env or self.env, capture_output=True, text=True,
                              timeout=timeout)

    def api(self, path: str) -> dict:
        r = requests.get(self.dashboard + path, headers={"Authorization": f"Bearer {self.token}"},
                         timeout=30)
        r.raise_for_status()
        return r.json()


def _node_ports() -> list[str]:
    # Every port explicit and free: the defaults (10001, 52365, ...) would collide with any
    # other Ray running on this machine, and the two nodes here share one host.
    ports = {flag: _free_port() for flag in ("--node-manager-port", "--object-manager-port",
                                             "--dashboard-agent-listen-port", "--dashboard-agent-grpc-port",
                                             "--runtime-env-agent-port", "--metrics-export-port")}
    return [a for flag, port in ports.items() for a in (flag, str(port))] + [
        "--min-worker-port", "0", "--max-worker-port", "0", "--object-store-memory", str(100 << 20)]


def _processes_under(root: Path) -> list:
    """Processes whose command line or cwd names ``root``, and all their descendants (Ray's
    workers rename themselves ``ray::...`` but are children of the raylet)."""
    import psutil
    found = {}
    me = os.getpid()
    for proc in psutil.process_iter(["pid", "cmdline", "cwd"]):
        try:
            if proc.pid == me:
                continue
            if any(str(root) in arg for arg in proc.info["cmdline"] or []) or \
                    str(proc.info["cwd"] or "").startswith(str(root)):
                found[proc.pid] = proc
                for child in proc.children(recursive=True):
                    found[child.pid] = child
        except psutil.Error:
            continue
    found.pop(me, None)
    return list(found.values())


def _stop_cluster(root: Path) -> None:
    import psutil
    procs = _processes_under(root)
    for proc in procs:
        try:
            proc.terminate()
        except psutil.Error:
            pass
    _, alive = psutil.wait_procs(procs, timeout=3)
    for proc in alive:
        try:
            proc.kill()
        except psutil.Error:
            pass
    psutil.wait_procs(alive, timeout=10)


def _logs_tail(root: Path) -> str:
    out = []
    for log in sorted(root.glob("*/session_latest/logs/*")):
        if log.suffix in (".err", ".log", ".out") and log.stat().st_size:
            out.append(f"--- {log.relative_to(root)}\n" + log.read_text(errors="replace")[-1500:])
    return "\n".join(out)[-12000:]


@pytest.fixture(scope="module")
def cluster():
    if shutil.which("ray", path=str(BIN)) is None:
        pytest.fail(f"no ray executable in {BIN}")
    # /tmp, not pytest's tmp_path: Ray's unix sockets live under the temp dir (107-char limit).
    root = Path(tempfile.mkdtemp(prefix="vggray-", dir="/tmp"))
    token = secrets.token_hex(32)
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("RAY_") and k not in ("AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN")}
    env.update(RAY_USAGE_STATS_ENABLED="0", RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=token,
               PATH=f"{BIN}{os.pathsep}{env.get('PATH', '')}")  # the job's `python` is this venv's
    gcs_port, dash_port = _free_port(), _free_port()
    head = [str(BIN / "ray"), "start", "--head", "--node-ip-address", "127.0.0.1",
            "--port", str(gcs_port), "--include-dashboard", "true", "--dashboard-host", "127.0.0.1",
            "--dashboard-port", str(dash_port), "--ray-client-server-port", str(_free_port()),
            "--num-cpus", "1", "--temp-dir", str(root / "head"), "--disable-usage-stats", *_node_ports()]
    # Its own temp dir: two nodes on one host sharing one would share runtime_resources/, and
    # the second node re-unpacking the job's working_dir deletes the driver's cwd.
    worker = [str(BIN / "ray"), "start", "--address", f"127.0.0.1:{gcs_port}",
              "--node-ip-address", "127.0.0.1", "--num-cpus", "1", "--temp-dir", str(root / "worker"),
              "--disable-usage-stats", *_node_ports()]
    try:
        for cmd in (head, worker):
            run = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=180)
            assert run.returncode == 0, f"{' '.join(cmd)}\n{run.stdout[-3000:]}\n{run.stderr[-3000:]}\n" \
                                        + _logs_tail(root)
        c = Cluster(root, f"http://127.0.0.1:{dash_port}", f"127.0.0.1:{gcs_port}", token, env)
        while len(c.api("/nodes?view=summary")["data"]["summary"]) < 2:  # the worker node joins
            time.sleep(1)
        yield c
    finally:
        _stop_cluster(root)
        shutil.rmtree(root, ignore_errors=True)
    assert not _processes_under(root), "cluster processes survived the teardown"


def _photos(folder: Path, n: int) -> Path:
    from tests.corpus import small_photo
    folder.mkdir(parents=True)
    for i in range(n):
        small_photo(i).save(folder / f"{i:02d}.jpg", quality=85)
    return folder


@pytest.mark.slow  # a real two-node cluster: ~1 min on 2 cores, more under load
def test_submit_runs_extract_on_the_cluster(cluster, tmp_path):
    from pipeline.output.verify import verify

    photos = _photos(tmp_path / "photos", 5)
    out = tmp_path / "out"
    conf = tmp_path / "tiny.yaml"
    conf.write_text("model:\n  arch: vgg11\ninput:\n  shard_size: 2\nruntime:\n  batch_size: 2\n")
    job_id = f"vgg-test-{uuid.uuid4().hex[:8]}"
    # What a shell on a head node looks like: RAY_ADDRESS is the GCS, and a local credential
    # is around; --address must win, and the credential must stay here.
    env = dict(cluster.env, RAY_ADDRESS=cluster.gcs, AWS_SECRET_ACCESS_KEY=NEVER_SHIPPED)
    run = cluster.cli("submit", "--address", cluster.dashboard, "--conf", str(conf), "--job-id", job_id,
                      "--", "extract", str(photos), str(out), "--weights", "random:0", env=env)
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-4000:]
    assert "done: 5 images in 3 shards -> 5 embedded, 0 errors" in run.stdout  # the job's own log
    assert f"job {job_id} SUCCEEDED" in run.stderr
    assert cluster.token not in run.stdout + run.stderr

    report = verify(str(out))
    assert report.ok, report.problems
    assert (report.images, report.embedded, report.shards) == (5, 5, 3)

    job = cluster.api(f"/api/jobs/{job_id}")
    assert job["entrypoint"] == (f"python jobs/extract.py --conf conf/tiny.yaml {photos} {out} "
                                 "--weights random:0")
    assert job["runtime_env"]["env_vars"] == {"PYTHONUNBUFFERED": "1"}
    assert NEVER_SHIPPED not in json.dumps(job) and cluster.token not in json.dumps(job)
    # One VGG actor per node: the extra worker node really did part of the work.
    actors = cluster.api("/api/v0/actors?detail=true&limit=100")["data"]["result"]["result"]
    nodes = {a["node_id"] for a in actors
             if a["class_name"] == "ShardWorker" and a.get("job_id") and a["state"] in ("ALIVE", "DEAD")}
    assert len(nodes) == 2, actors


@pytest.mark.slow  # a real two-node cluster: ~1 min on 2 cores, more under load
def test_no_wait_status_logs_and_a_usage_error_on_the_cluster(cluster, tmp_path):
    """A job from a shipped checkout whose INPUT does not exist: the job exits 2, and so do
    ``logs --follow`` (like ``submit`` would); ``status`` exits 1 for the FAILED job."""
    missing = tmp_path / "no-such-folder"
    run = cluster.cli("submit", "--address", cluster.dashboard, "--no-wait", "--working-dir", str(ROOT),
                      "--conf", str(ROOT / "conf" / "local-cpu.yaml"), "--",
                      "extract", str(missing), str(tmp_path / "out"), "--weights", "random:0")
    assert run.returncode == 0, run.stderr
    job_id = run.stdout.strip()
    assert job_id and len(job_id.split()) == 1, run.stdout

    status = cluster.cli("status", job_id, "--address", cluster.dashboard)
    first = status.stdout.split()
    assert first[0] == f"{job_id}:" and first[1] in ("PENDING", "RUNNING", "FAILED"), status.stdout
    assert status.returncode == (1 if first[1] == "FAILED" else 0), status.stderr

    logs = cluster.cli("logs", job_id, "--address", cluster.dashboard, "--follow")
    assert logs.returncode == 2, logs.stdout + logs.stderr
    assert "vgg-pipeline: error: " in logs.stdout and str(missing) in logs.stdout  # the job's own line
    assert f"job {job_id} FAILED (entrypoint exit code 2)" in logs.stderr

    status = cluster.cli("status", job_id, "--address", cluster.dashboard)
    assert status.returncode == 1 and status.stdout.startswith(f"{job_id}: FAILED"), status.stdout
    plain = cluster.cli("logs", job_id, "--address", cluster.dashboard)
    assert plain.returncode == 0 and str(missing) in plain.stdout
    # The job ran the checkout's script with the conf found inside the checkout.
    job = cluster.api(f"/api/jobs/{job_id}")
    assert job["entrypoint"].startswith("python jobs/extract.py --conf conf/local-cpu.yaml ")
    assert job["runtime_env"]["working_dir"].startswith("gcs://_ray_pkg_")


@pytest.mark.slow  # a real two-node cluster: ~1 min on 2 cores, more under load
def test_token_is_required_and_never_printed_and_unknown_jobs(cluster):
    wrong = "wrong-token-" + secrets.token_hex(8)
    for env in (dict(cluster.env, RAY_AUTH_TOKEN=wrong),       # a wrong token
                dict(cluster.env, RAY_AUTH_MODE="disabled")):  # none sent at all
        run = cluster.cli("status", "raysubmit_x", "--address", cluster.dashboard, env=env)
        assert run.returncode == 2, run.stdout + run.stderr
        lines = run.stderr.strip().splitlines()
        assert len(lines) == 1 and "RAY_AUTH_TOKEN" in lines[0], run.stderr
        assert wrong not in run.stderr + run.stdout and cluster.token not in run.stderr + run.stdout
    unknown = cluster.cli("status", "raysubmit_doesnotexist", "--address", cluster.dashboard)
    assert unknown.returncode == 2, unknown.stdout + unknown.stderr
    assert len(unknown.stderr.strip().splitlines()) == 1 and "raysubmit_doesnotexist" in unknown.stderr
