"""``vgg-pipeline submit / status / logs``: run ``extract`` on a Ray cluster through the Jobs API.

    vgg-pipeline submit --address http://HEAD:8265 --conf conf/gpu.yaml -- \\
        extract s3://bucket/images/ s3://bucket/features/ --set runtime.num_actors=8

``submit`` checks the extract arguments locally (same parser and config loader as ``extract``),
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

import argparse
import asyncio
import contextlib
import logging
import os
import re
import shlex
import shutil
import socket
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Optional
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

def _strip_separator(argv: list[str]) -> list[str]:
    # argparse.REMAINDER keeps a leading "--" on some Python versions and drops it on others.
    return argv[1:] if argv[:1] == ["--"] else argv


def _credential_in_url(value: str) -> bool:
    try:
        parts = urlsplit(value)
        return parts.password is not None or any(
            is_secret_key(k) or k.lower() in _SIGNATURE_PARAMS for k, _ in parse_qsl(parts.query))
    except ValueError:
        return False


def _is_local(path: str) -> bool:
    return "://" not in path


def check_job_args(command: list[str], conf: Optional[str]) -> argparse.Namespace:
    """Parse ``extract INPUT OUTPUT [flags]`` like the CLI would and refuse what cannot work
    on a cluster or would expose a secret; returns the parsed extract arguments."""
    from .cli import build_parser
    from .config import load_config

    if not command or command[0] != "extract":
        raise UsageError("submit runs extract on the cluster: vgg-pipeline submit --address URL "
                         "[--conf FILE] -- extract INPUT OUTPUT [extract flags]")
    args = build_parser().parse_args(command)
    if args.conf:
        raise UsageError("give --conf to submit, before `--`: submit ships that file to the cluster")
    if args.address:
        raise UsageError("--address after `--` is not supported: the job joins the cluster it runs on")
    for item in args.storage_option:
        key = item.partition("=")[0]
        if is_secret_key(key):
            raise UsageError(f"--storage-option {key}=... looks like a credential and would be visible "
                             "in the job's entrypoint on the dashboard; give the cluster its own access "
                             "instead (IAM role / instance profile / IRSA, or env vars set on the cluster)")
    for token in command:
        if any(_credential_in_url(m[0]) for m in _URL_RE.finditer(token)):
            raise UsageError("a URL with credentials (user:password@ or a signed query) would be "
                             "visible in the job's entrypoint on the dashboard; give the cluster its "
                             "own access instead (IAM role / instance profile / IRSA)")
    # Bad config keys or values fail here, in a second, rather than on the cluster.
    cfg = load_config(conf, args.set, {"model.weights": args.weights} if args.weights else None)
    named = {"INPUT": args.input, "OUTPUT": args.output}
    weights = cfg["model"]["weights"]  # from --weights, --set or the conf file
    if not (weights == "imagenet" or weights.startswith("random")):
        named["weights"] = weights
    for what, path in named.items():
        if _is_local(path) and not os.path.isabs(path):
            raise UsageError(f"{what} {path!r} is a relative local path: the job would resolve it in "
                             "its temporary working dir on the cluster; use a URL (s3://...) or an "
                             "absolute path on a filesystem the cluster shares")
    return args


def _entry_script_text() -> str:
    if _CHECKOUT_SCRIPT.is_file():
        return _CHECKOUT_SCRIPT.read_text()
    return _SHIM


def build_job(command: list[str], conf: Optional[str], working_dir: Optional[str],
              staging: str) -> JobSpec:
    """The entrypoint and runtime_env for ``command`` (``["extract", INPUT, OUTPUT, ...]``).

    Without ``working_dir`` the job's working dir is built in ``staging`` (an empty folder that
    must outlive the submission): ``jobs/extract.py`` and ``conf/<name>`` only.  With it, that
    folder is shipped as is: it must hold ``jobs/extract.py`` and the conf file.
    """
    from . import __version__

    if conf and not os.path.isfile(conf):
        raise UsageError(f"--conf {conf}: no such file")
    check_job_args(command, conf)
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
    tokens = ["python", ENTRY_SCRIPT] + (["--conf", conf_arg] if conf_arg else []) + command[1:]
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

def job_exit_code(info) -> int:
    """0 SUCCEEDED; 2 when the entrypoint exited 2 (usage/config error); else 1."""
    status = str(getattr(info.status, "value", info.status))
    if status == "SUCCEEDED":
        return 0
    code = getattr(info, "driver_exit_code", None)
    if code is None and info.message:  # older servers only say it in the message
        m = _EXIT_CODE_RE.search(info.message)
        code = int(m[1]) if m else None
    return 2 if code == 2 else 1


def _status(client, job_id: str):
    try:
        return client.get_job_info(job_id)
    except Exception as exc:  # noqa: BLE001 - RuntimeError: unknown job or HTTP error
        raise UsageError(f"job {job_id}: {_one_line(exc)}") from None


def follow(client, job_id: str, out=None) -> int:
    """Stream the job's logs to ``out`` until it ends; returns :func:`job_exit_code`."""
    out = out or sys.stdout

    async def tail() -> None:
        async for chunk in client.tail_job_logs(job_id):
            out.write(chunk)
            out.flush()

    try:
        asyncio.run(tail())
    except Exception as exc:  # noqa: BLE001 - a dropped websocket: keep waiting without logs
        log.warning("lost the log stream of job %s (%s); waiting for it to finish", job_id,
                    _one_line(exc))
    while True:  # the stream may close a moment before the status is final
        info = _status(client, job_id)
        if str(getattr(info.status, "value", info.status)) in TERMINAL:
            return job_exit_code(info)
        time.sleep(POLL_S)


def _final_report(job_id: str, info, code: int) -> None:
    status = str(getattr(info.status, "value", info.status))
    if code == 0:
        print(f"vgg-pipeline: job {job_id} {status}", file=sys.stderr)
        return
    exit_code = getattr(info, "driver_exit_code", None)
    detail = f" (entrypoint exit code {exit_code})" if exit_code is not None else ""
    print(f"vgg-pipeline: job {job_id} {status}{detail}", file=sys.stderr)
    if exit_code is None and info.message:  # e.g. runtime_env setup failed: no logs explain it
        print(info.message.rstrip(), file=sys.stderr)


def _interrupted(job_id: str, address: str) -> int:
    print(f"vgg-pipeline: stopped following; job {job_id} keeps running on the cluster "
          f"(vgg-pipeline logs {job_id} --follow --address {address}; "
          f"ray job stop {job_id} --address {address})", file=sys.stderr)
    return 130


# ----------------------------------------------------------------------------- commands

def cmd_submit(args: argparse.Namespace) -> int:
    command = _strip_separator(args.job)
    address = resolve_address(args.address)
    with tempfile.TemporaryDirectory(prefix="vgg-pipeline-job-") as staging:
        spec = build_job(command, args.conf, args.working_dir, staging)
        client = connect(address)
        job_id = submit_job(client, spec, args.job_id)  # uploads the working dir
    log.info("submitted %s: %s", job_id, spec.entrypoint)
    if args.no_wait:
        print(job_id)
        return 0
    print(f"vgg-pipeline: submitted job {job_id} to {address}; following its logs "
          "(Ctrl-C stops following, not the job)", file=sys.stderr)
    try:
        code = follow(client, job_id)
    except KeyboardInterrupt:
        return _interrupted(job_id, address)
    _final_report(job_id, _status(client, job_id), code)
    return code


def cmd_status(args: argparse.Namespace) -> int:
    client = connect(resolve_address(args.address))
    info = _status(client, args.job_id)
    status = str(getattr(info.status, "value", info.status))
    print(f"{args.job_id}: {status}")
    if info.message:
        print(info.message.rstrip())
    return 1 if status == "FAILED" else 0


def cmd_logs(args: argparse.Namespace) -> int:
    address = resolve_address(args.address)
    client = connect(address)
    if not args.follow:
        _status(client, args.job_id)  # an unknown id is a one-line error, not an HTTP dump
        try:
            sys.stdout.write(client.get_job_logs(args.job_id))
        except Exception as exc:  # noqa: BLE001
            raise UsageError(f"job {args.job_id}: {_one_line(exc)}") from None
        return 0
    _status(client, args.job_id)
    try:
        code = follow(client, args.job_id)
    except KeyboardInterrupt:
        return _interrupted(args.job_id, address)
    _final_report(args.job_id, _status(client, args.job_id), code)
    return code


def _address_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--address", help="the Ray dashboard / Jobs API, e.g. http://127.0.0.1:8265 "
                   "(default: RAY_ADDRESS if it is an http(s) URL)")


def add_commands(subparsers: argparse._SubParsersAction) -> None:
    """Add ``submit``, ``status`` and ``logs`` to the CLI (each sets ``handler``)."""
    p = subparsers.add_parser(
        "submit", help="run extract on a Ray cluster through its Jobs API",
        description="Submit `extract INPUT OUTPUT [flags]` as a Ray job: runs `python jobs/extract.py "
        "[--conf conf/NAME.yaml] INPUT OUTPUT [flags]` on the cluster, follows its logs and exits "
        "like the job (0 succeeded, 1 failed or stopped, 2 usage error). INPUT and OUTPUT are read "
        "and written by the cluster: use URLs (s3://...) or absolute shared paths.",
        epilog="example: vgg-pipeline submit --address http://127.0.0.1:8265 --conf conf/gpu.yaml -- "
        "extract s3://in/images/ s3://out/vgg16/ --set runtime.num_actors=8")
    _address_arg(p)
    p.add_argument("--conf", help="YAML config, shipped with the job as conf/NAME.yaml")
    p.add_argument("--working-dir", metavar="DIR", help="ship this checkout (with jobs/extract.py and "
                   "pipeline/) as the job's working dir, instead of only the script and the conf; "
                   "its pipeline/ then replaces the cluster's installed package")
    p.add_argument("--job-id", help="submission id (default: generated by Ray); must be new")
    p.add_argument("--no-wait", action="store_true", help="print the job id and return at once")
    p.add_argument("job", nargs=argparse.REMAINDER, metavar="-- extract INPUT OUTPUT ...",
                   help="the extract command to run on the cluster")
    p.set_defaults(handler=cmd_submit)

    p = subparsers.add_parser("status", help="status of a submitted job (exit 1 if it failed)")
    p.add_argument("job_id", metavar="JOB_ID")
    _address_arg(p)
    p.set_defaults(handler=cmd_status)

    p = subparsers.add_parser("logs", help="logs of a submitted job")
    p.add_argument("job_id", metavar="JOB_ID")
    _address_arg(p)
    p.add_argument("--follow", "-f", action="store_true",
                   help="stream until the job ends, then exit like submit does")
    p.set_defaults(handler=cmd_logs)
