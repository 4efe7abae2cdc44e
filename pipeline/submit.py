"""Run ``extract`` on a Ray cluster through the Jobs API (the commands: :mod:`pipeline.cli.cluster`).

    vgg-pipeline submit --address http://HEAD:8265 --conf conf/gpu.yaml -- \\
        extract s3://bucket/images/ s3://bucket/features/ --set runtime.num_actors=8

``submit`` checks the extract arguments locally (the CLI parses them with ``extract``'s own
parser into an :class:`ExtractJob`; the config loader is ``extract``'s too),
then submits the entrypoint ``python jobs/extract.py [--conf conf/NAME.yaml] INPUT OUTPUT ...``
with a runtime_env ``working_dir`` that carries the script and the conf file.  By default that
working dir is a small temporary folder (the package itself comes from the cluster's image);
``--working-dir DIR`` ships a whole checkout instead, whose ``pipeline/`` then shadows the
installed package (``jobs/extract.py`` puts its working dir first on ``sys.path``, and Ray puts
it on the workers' ``PYTHONPATH``).

Exit codes: ``submit`` (and ``logs --follow``) exit like the job: 0 SUCCEEDED, 2 when the
entrypoint exited 2 (a usage or config error on the cluster), 1 for any other failure or a
stopped job; ``--no-wait`` prints the job id and exits 0.  ``status`` exits 1 for a FAILED job.
An unreachable cluster or a refused argument is a one-line usage error (exit 2).

Security: the entrypoint and the runtime_env are visible to anyone who can open the dashboard,
so ``submit`` refuses secret-looking ``--storage-option`` keys and URLs that carry credentials,
and ships no environment variable from this machine.  Ray's token authentication
(``RAY_AUTH_MODE=token`` with ``RAY_AUTH_TOKEN`` / ``RAY_AUTH_TOKEN_PATH`` / ``~/.ray/auth_token``)
is applied by ``JobSubmissionClient`` itself; this module never reads or prints the token.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import shlex
import shutil
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Optional
from urllib.parse import parse_qsl, urlsplit

from .config import is_secret_key
from .errors import UsageError

log = logging.getLogger(__name__)

ENTRY_SCRIPT = "jobs/extract.py"
# The checkout's copy of the entrypoint; absent when the package is pip-installed, and then
# _SHIM, which does the same, is shipped instead.
_CHECKOUT_SCRIPT = Path(__file__).resolve().parent.parent / ENTRY_SCRIPT
_SHIM = '''"""Entrypoint run by ``vgg-pipeline submit``: ``vgg-pipeline extract ARGV...``."""
import sys

from pipeline.cli import main

if __name__ == "__main__":
    sys.exit(main(["extract", *sys.argv[1:]]))
'''
# The only variables the job gets from here: nothing that could hold a credential.
JOB_ENV_VARS = {"PYTHONUNBUFFERED": "1"}  # log lines reach the job log as they are written
# Never shipped with --working-dir (Ray also honours the checkout's .gitignore).
WORKING_DIR_EXCLUDES = [".git", ".venv", "**/__pycache__", "*.parquet", "out/", "demo-output/"]
TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")
CONNECT_TIMEOUT_S = 10.0
POLL_S = 2.0
_EXIT_CODE_RE = re.compile(r"exit code (-?\d+)")
_SIGNATURE_PARAMS = ("sig", "signature", "x-amz-signature", "x-goog-signature")  # signed URLs
_URL_RE = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://[^\s,]+")  # also inside KEY=URL and --flag=URL


@dataclass
class ExtractJob:
    """``extract INPUT OUTPUT [flags]`` to run on the cluster: ``argv`` as given (it becomes the
    job's entrypoint) and the values :func:`check_job` looks at, parsed by the CLI's extract parser."""

    argv: list[str]
    input: str
    output: str
    weights: Optional[str] = None
    sets: list[str] = field(default_factory=list)             # --set KEY=VALUE
    storage_options: list[str] = field(default_factory=list)  # --storage-option KEY=VALUE
    conf: Optional[str] = None      # a --conf inside the job: refused, submit ships the conf
    address: Optional[str] = None   # an --address inside the job: refused, it runs on the cluster


@dataclass
class JobSpec:
    """What ``submit`` sends: the entrypoint command and the runtime_env (no secrets in either)."""

    entrypoint: str
    runtime_env: dict[str, Any]
    metadata: dict[str, str] = field(default_factory=dict)


# ----------------------------------------------------------------------------- addresses

def resolve_address(address: Optional[str]) -> str:
    """The dashboard URL: ``--address``, else ``RAY_ADDRESS`` when it is an http(s) URL."""
    if not address:
        env = os.environ.get("RAY_ADDRESS", "")
        if not env.startswith(("http://", "https://")):
            raise UsageError("no --address: pass the Ray dashboard address, e.g. --address "
                             "http://127.0.0.1:8265 (or set RAY_ADDRESS to it)")
        address = env
    if not address.startswith(("http://", "https://")):
        raise UsageError(f"--address {address!r} is not the dashboard's http(s)://HOST:PORT "
                         "address (the Jobs API listens on the dashboard port, 8265 by default)")
    parts = urlsplit(address)
    if not parts.hostname or parts.password is not None:
        raise UsageError(f"--address {parts.scheme}://{parts.hostname or ''}...: expected "
                         "http(s)://HOST:PORT without credentials")
    return address.rstrip("/")


@contextlib.contextmanager
def _explicit_address() -> Iterator[None]:
    # JobSubmissionClient lets RAY_API_SERVER_ADDRESS / RAY_ADDRESS override the address it is
    # given (like ray.init); here the resolved --address must win, e.g. over a GCS RAY_ADDRESS.
    saved = {k: os.environ.pop(k) for k in ("RAY_API_SERVER_ADDRESS", "RAY_ADDRESS") if k in os.environ}
    try:
        yield
    finally:
        os.environ.update(saved)


def connect(address: str):
    """A ``JobSubmissionClient`` for ``address``; an unreachable cluster is a UsageError."""
    from ray.exceptions import AuthenticationError
    from ray.job_submission import JobSubmissionClient

    parts = urlsplit(address)
    port = parts.port or (443 if parts.scheme == "https" else 80)
    try:  # fail in seconds, not after a kernel TCP timeout, on a dead tunnel or wrong host
        socket.create_connection((parts.hostname, port), timeout=CONNECT_TIMEOUT_S).close()
    except OSError as exc:
        raise UsageError(f"cannot reach Ray cluster at {address}: {exc.strerror or exc} "
                         "(is the cluster up and the dashboard port forwarded?)") from None
    _quiet_ray()
    try:
        with _explicit_address():
            return JobSubmissionClient(address)
    except AuthenticationError as exc:  # the message names the problem, never the token
        raise UsageError(f"Ray cluster at {address} rejected the request ({_one_line(exc)}); for a "
                         "cluster with token authentication set RAY_AUTH_MODE=token and its token in "
                         "RAY_AUTH_TOKEN (or ~/.ray/auth_token)") from None
    except Exception as exc:  # noqa: BLE001 - ConnectionError, RuntimeError (not a Jobs API)...
        raise UsageError(f"cannot reach Ray cluster at {address}: {_one_line(exc)}") from None


def _quiet_ray() -> None:
    # Ray's own INFO lines (package upload, websocket closed) only with -v.
    if logging.getLogger().getEffectiveLevel() > logging.DEBUG:
        logging.getLogger("ray").setLevel(logging.WARNING)


def _one_line(exc: BaseException, limit: int = 300) -> str:
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    text = lines[0] if lines else type(exc).__name__
    return text if len(text) <= limit else text[:limit] + "..."


# ----------------------------------------------------------------------------- the job

def _credential_in_url(value: str) -> bool:
    try:
        parts = urlsplit(value)
        return parts.password is not None or any(
            is_secret_key(k) or k.lower() in _SIGNATURE_PARAMS for k, _ in parse_qsl(parts.query))
    except ValueError:
        return False


def _is_local(path: str) -> bool:
    return "://" not in path


def check_job(job: ExtractJob, conf: Optional[str]) -> None:
    """Refuse what cannot work on a cluster or would expose a secret (a UsageError)."""
    from .config import load_config

    if job.conf:
        raise UsageError("give --conf to submit, before `--`: submit ships that file to the cluster")
    if job.address:
        raise UsageError("--address after `--` is not supported: the job joins the cluster it runs on")
    for item in job.storage_options:
        key = item.partition("=")[0]
        if is_secret_key(key):
            raise UsageError(f"--storage-option {key}=... looks like a credential and would be visible "
                             "in the job's entrypoint on the dashboard; give the cluster its own access "
                             "instead (IAM role / instance profile / IRSA, or env vars set on the cluster)")
    for token in job.argv:
        if any(_credential_in_url(m[0]) for m in _URL_RE.finditer(token)):
            raise UsageError("a URL with credentials (user:password@ or a signed query) would be "
                             "visible in the job's entrypoint on the dashboard; give the cluster its "
                             "own access instead (IAM role / instance profile / IRSA)")
    # Bad config keys or values fail here, in a second, rather than on the cluster.
    cfg = load_config(conf, job.sets, {"model.weights": job.weights} if job.weights else None)
    named = {"INPUT": job.input, "OUTPUT": job.output}
    weights = cfg.model.weights  # from --weights, --set or the conf file
    if not (weights == "imagenet" or weights.startswith("random")):
        named["weights"] = weights
    for what, path in named.items():
        if _is_local(path) and not os.path.isabs(path):
            raise UsageError(f"{what} {path!r} is a relative local path: the job would resolve it in "
                             "its temporary working dir on the cluster; use a URL (s3://...) or an "
                             "absolute path on a filesystem the cluster shares")


def _entry_script_text() -> str:
    if _CHECKOUT_SCRIPT.is_file():
        return _CHECKOUT_SCRIPT.read_text()
    return _SHIM


def build_job(job: ExtractJob, conf: Optional[str], working_dir: Optional[str],
              staging: str) -> JobSpec:
    """The entrypoint and runtime_env for ``job`` (checked with :func:`check_job` first).

    Without ``working_dir`` the job's working dir is built in ``staging`` (an empty folder that
    must outlive the submission): ``jobs/extract.py`` and ``conf/<name>`` only.  With it, that
    folder is shipped as is: it must hold ``jobs/extract.py`` and the conf file.
    """
    from . import __version__

    if conf and not os.path.isfile(conf):
        raise UsageError(f"--conf {conf}: no such file")
    check_job(job, conf)
    if working_dir is None:
        root = Path(staging)
        (root / "jobs").mkdir(parents=True, exist_ok=True)
        (root / ENTRY_SCRIPT).write_text(_entry_script_text())
        conf_arg = None
        if conf:
            (root / "conf").mkdir(exist_ok=True)
            name = Path(conf).name
            shutil.copyfile(conf, root / "conf" / name)
            conf_arg = f"conf/{name}"
        runtime_env: dict[str, Any] = {"working_dir": str(root)}
    else:
        root = Path(working_dir).resolve()
        if not (root / ENTRY_SCRIPT).is_file():
            raise UsageError(f"--working-dir {working_dir}: no {ENTRY_SCRIPT} in it (expected a "
                             "vgg-pipeline checkout)")
        conf_arg = None
        if conf:
            conf_path = Path(conf).resolve()
            if root not in conf_path.parents:
                raise UsageError(f"--conf {conf} is outside --working-dir {working_dir}: the job only "
                                 "sees files inside the working dir")
            conf_arg = conf_path.relative_to(root).as_posix()
        runtime_env = {"working_dir": str(root), "excludes": list(WORKING_DIR_EXCLUDES)}
    runtime_env["env_vars"] = dict(JOB_ENV_VARS)
    tokens = ["python", ENTRY_SCRIPT] + (["--conf", conf_arg] if conf_arg else []) + job.argv[1:]
    metadata = {"tool": "vgg-pipeline", "version": __version__}
    return JobSpec(entrypoint=shlex.join(tokens), runtime_env=runtime_env, metadata=metadata)


def submit_job(client, spec: JobSpec, job_id: Optional[str] = None) -> str:
    """Submit ``spec``; returns the job id.  A refused submission is a UsageError."""
    try:
        return client.submit_job(entrypoint=spec.entrypoint, runtime_env=spec.runtime_env,
                                 metadata=spec.metadata, submission_id=job_id)
    except Exception as exc:  # noqa: BLE001 - RuntimeError (HTTP), ValueError (runtime_env)
        raise UsageError(f"the cluster did not accept the job: {_one_line(exc)}") from None


# ----------------------------------------------------------------------------- following

def job_status(info) -> str:
    """``PENDING``, ``RUNNING``, ``SUCCEEDED``, ``FAILED`` or ``STOPPED``."""
    return str(getattr(info.status, "value", info.status))


def job_exit_code(info) -> int:
    """0 SUCCEEDED; 2 when the entrypoint exited 2 (usage/config error); else 1."""
    if job_status(info) == "SUCCEEDED":
        return 0
    code = getattr(info, "driver_exit_code", None)
    if code is None and info.message:  # older servers only say it in the message
        m = _EXIT_CODE_RE.search(info.message)
        code = int(m[1]) if m else None
    return 2 if code == 2 else 1


def job_info(client, job_id: str):
    """The job's ``JobDetails``; an unknown id or an HTTP error is a one-line UsageError."""
    try:
        return client.get_job_info(job_id)
    except Exception as exc:  # noqa: BLE001 - RuntimeError: unknown job or HTTP error
        raise UsageError(f"job {job_id}: {_one_line(exc)}") from None


def job_logs(client, job_id: str) -> str:
    """The job's log so far."""
    job_info(client, job_id)  # an unknown id is a one-line error, not an HTTP dump
    try:
        return client.get_job_logs(job_id)
    except Exception as exc:  # noqa: BLE001
        raise UsageError(f"job {job_id}: {_one_line(exc)}") from None


def follow(client, job_id: str, write: Callable[[str], None]) -> int:
    """Pass the job's log to ``write``, chunk by chunk, until it ends; returns :func:`job_exit_code`."""

    async def tail() -> None:
        async for chunk in client.tail_job_logs(job_id):
            write(chunk)

    try:
        asyncio.run(tail())
    except Exception as exc:  # noqa: BLE001 - a dropped websocket: keep waiting without logs
        log.warning("lost the log stream of job %s (%s); waiting for it to finish", job_id,
                    _one_line(exc))
    while True:  # the stream may close a moment before the status is final
        info = job_info(client, job_id)
        if job_status(info) in TERMINAL:
            return job_exit_code(info)
        time.sleep(POLL_S)
