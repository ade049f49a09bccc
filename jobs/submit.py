"""`crlft submit STAGE --address http://HOST:8265 [--follow] [stage args]`: run a stage on a Ray cluster.

The stage runs as a Ray job through the Jobs API (`JobSubmissionClient`), as `python -m jobs.<stage> ARGS` (or
`python -m jobs.cli COMMAND ARGS` for a command that is not a jobs module), in the runtime env of
cluster/runtime_env.yaml: the working directory is uploaded, so the cluster runs the code being submitted.
`crlft jobs` and `crlft stop JOB` (jobs/submit_list.py, jobs/submit_stop.py) share the client code here.

Token authentication: a cluster that keeps Ray's token authentication on needs the client to run with
RAY_AUTH_MODE=token and the cluster's token in RAY_AUTH_TOKEN (or a file named by RAY_AUTH_TOKEN_PATH, or
~/.ray/auth_token); Ray's client then sends it as `Authorization: Bearer ...`.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shlex
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

import yaml

from crlft.command_line import stage_entrypoint
from crlft.errors import CrlftError, first_line
from jobs.cli import COMMANDS

if TYPE_CHECKING:
    from ray.job_submission import JobSubmissionClient

DEFAULT_ADDRESS = "http://127.0.0.1:8265"
DEFAULT_RUNTIME_ENV = Path("cluster") / "runtime_env.yaml"
# Ray reads these before the address it is given; an explicit --address must win.
ADDRESS_ENV_VARS = ("RAY_API_SERVER_ADDRESS", "RAY_ADDRESS")
CLIENT_COMMANDS = {"submit", "jobs", "stop"}
TERMINAL_STATUSES = {"SUCCEEDED", "FAILED", "STOPPED"}


def stage_entrypoints() -> dict[str, list[str]]:
    """Stage name -> the command that runs it on the cluster.

    Every crlft command is a stage except the cluster-client ones; a two-word command is also reachable with a dash
    ("data build" -> "data-build"), and a jobs module by its own name too ("build_dataset").
    """
    stages: dict[str, list[str]] = {}
    for name, (module, _) in COMMANDS.items():
        if name in CLIENT_COMMANDS:
            continue
        if module.startswith("jobs."):
            command = ["python", "-m", module]
            stages[module.removeprefix("jobs.")] = command
        else:
            command = ["python", "-m", "jobs.cli", *name.split()]
        stages[name] = command
        stages[name.replace(" ", "-")] = command
    return stages


def entrypoint_for(stage: str, stage_args: list[str], working_dir: Path) -> str:
    """The job's shell command; the module it runs must be in the working directory that is uploaded."""
    stages = stage_entrypoints()
    if stage not in stages:
        names = ", ".join(sorted(name for name in stages if " " not in name))
        raise CrlftError(f"unknown stage {stage!r}; stages: {names}")
    command = stages[stage]
    module_file = working_dir.joinpath(*command[2].split(".")).with_suffix(".py")
    if not module_file.is_file():
        raise CrlftError(
            f"stage {stage!r} runs `python -m {command[2]}` but {module_file} does not exist: submit from the "
            "project root or pass --working-dir"
        )
    return shlex.join([*command, *stage_args])


def _parse_assignment(item: str, flag: str) -> tuple[str, str]:
    key, sep, value = item.partition("=")
    if not sep or not key:
        raise CrlftError(f"{flag} {item!r}: expected KEY=VALUE")
    return key, value


def load_runtime_env(
    path: str | None,
    working_dir: str | None = None,
    env: list[str] | None = None,
    pip: list[str] | None = None,
    base_dir: Path | None = None,
) -> dict[str, Any]:
    """The runtime env from the YAML file (default cluster/runtime_env.yaml when present), with the flags on top.

    Relative paths (the file, its working_dir, --working-dir) resolve against `base_dir` (default: the current
    directory), which is also the working directory when none is named.
    """
    base = base_dir or Path.cwd()
    runtime_env: dict[str, Any] = {}
    env_file = base / (path or DEFAULT_RUNTIME_ENV)
    if path is not None and not env_file.is_file():
        raise CrlftError(f"--runtime-env {path}: no such file")
    if env_file.is_file():
        loaded = yaml.safe_load(env_file.read_text(encoding="utf-8"))
        if loaded is not None and not isinstance(loaded, dict):
            raise CrlftError(f"{env_file}: expected a mapping of runtime env fields, got {type(loaded).__name__}")
        runtime_env = dict(loaded or {})
    runtime_env["working_dir"] = str((base / (working_dir or runtime_env.get("working_dir") or ".")).resolve())
    if env:
        env_vars = dict(runtime_env.get("env_vars") or {})
        env_vars.update(_parse_assignment(item, "--env") for item in env)
        runtime_env["env_vars"] = env_vars
    if pip:
        runtime_env["pip"] = [*(runtime_env.get("pip") or []), *pip]
    return runtime_env


def resolve_address(address: str | None) -> str:
    """--address, else RAY_API_SERVER_ADDRESS / RAY_ADDRESS, else the local default."""
    if address:
        return address
    return next((os.environ[name] for name in ADDRESS_ENV_VARS if os.environ.get(name)), DEFAULT_ADDRESS)


AUTH_HINT = (
    "the cluster requires Ray's token authentication: run with RAY_AUTH_MODE=token and its token in RAY_AUTH_TOKEN "
    "(or in a file named by RAY_AUTH_TOKEN_PATH, or in ~/.ray/auth_token)"
)


def connect(address: str | None) -> JobSubmissionClient:
    """A Jobs API client for the cluster, or a CrlftError that says how to reach one."""
    from ray.exceptions import AuthenticationError
    from ray.job_submission import JobSubmissionClient

    url = resolve_address(address)
    for name in ADDRESS_ENV_VARS:
        os.environ.pop(name, None)
    try:
        return JobSubmissionClient(url)
    except AuthenticationError as exc:
        raise CrlftError(f"Ray Jobs API at {url}: {first_line(exc)}; {AUTH_HINT}") from None
    except (ConnectionError, RuntimeError, ValueError) as exc:
        raise CrlftError(
            f"no Ray Jobs API at {url} ({first_line(exc)}): start a cluster (cluster/start-local.sh) or pass the "
            "dashboard address of one with --address http://HOST:8265"
        ) from None


def client_call(what: str, call: Any, *args: Any, **kwargs: Any) -> Any:
    """Runs one Jobs API call; its errors (unknown job, refused token, bad runtime env) become CrlftErrors."""
    from ray.exceptions import AuthenticationError

    try:
        return call(*args, **kwargs)
    except AuthenticationError as exc:
        raise CrlftError(f"{what}: {first_line(exc)}; {AUTH_HINT}") from None
    except (RuntimeError, ValueError, TypeError) as exc:
        raise CrlftError(f"{what}: {str(exc).strip()}") from None


def follow(client: JobSubmissionClient, job_id: str, out: TextIO = sys.stdout, poll_s: float = 1.0) -> str:
    """Streams the job's logs until it ends; returns its final status."""

    async def stream() -> None:
        async for chunk in client.tail_job_logs(job_id):
            out.write(chunk)
            out.flush()

    try:
        asyncio.run(stream())
    except RuntimeError as exc:  # the log stream closed before the end: keep waiting on the status
        print(f"log stream ended early ({exc}); waiting for the job to finish", file=sys.stderr)
    return wait(client, job_id, poll_s=poll_s)


def wait(client: JobSubmissionClient, job_id: str, poll_s: float = 1.0, timeout_s: float | None = None) -> str:
    """Waits for the job to reach a terminal status and returns it (the last status seen on timeout)."""
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    while True:
        status = str(client_call(f"job {job_id}", client.get_job_status, job_id))
        if status in TERMINAL_STATUSES or (deadline is not None and time.monotonic() > deadline):
            return status
        time.sleep(poll_s)


def add_address_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--address",
        help=f"the cluster's dashboard / Jobs API URL (default: RAY_API_SERVER_ADDRESS, RAY_ADDRESS, "
        f"{DEFAULT_ADDRESS})",
    )


def _add_submit_options(parser: argparse.ArgumentParser) -> None:
    add_address_argument(parser)
    parser.add_argument("--follow", action="store_true", help="stream the job's logs and exit with its outcome")
    parser.add_argument(
        "--runtime-env",
        metavar="FILE",
        help=f"runtime env YAML (default: {DEFAULT_RUNTIME_ENV} when present)",
    )
    parser.add_argument("--working-dir", metavar="DIR", help="folder uploaded as the job's code (default: .)")
    parser.add_argument("--env", metavar="KEY=VALUE", action="append", default=[], help="extra environment variable")
    parser.add_argument("--pip", metavar="PACKAGE", action="append", default=[], help="extra pip package for the job")
    parser.add_argument("--submission-id", help="the job's id (default: one Ray makes up)")
    parser.add_argument("--entrypoint-num-cpus", type=float, help="CPUs reserved for the job's driver")
    parser.add_argument("--entrypoint-num-gpus", type=float, help="GPUs reserved for the job's driver")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    stages = ", ".join(sorted(name for name in stage_entrypoints() if " " not in name))
    parser.epilog = (
        "Options of submit go before or after STAGE; every other argument is the stage's (put them after `--` "
        f"when one looks like a submit option). Stages: {stages}"
    )
    _add_submit_options(parser)
    parser.add_argument("stage", metavar="STAGE", help="the stage to run, e.g. pipeline, train, build_dataset")
    parser.add_argument("stage_args", nargs=argparse.REMAINDER, help="the stage's own arguments")


def split_stage_args(args: argparse.Namespace) -> tuple[argparse.Namespace, list[str]]:
    """Submit options given after STAGE are taken out of the stage's arguments; everything after `--` is the stage's."""
    remainder = list(args.stage_args)
    verbatim: list[str] = []
    if "--" in remainder:
        cut = remainder.index("--")
        remainder, verbatim = remainder[:cut], remainder[cut + 1 :]
    options = argparse.ArgumentParser(prog="crlft submit STAGE", add_help=False, allow_abbrev=False)
    _add_submit_options(options)
    parsed, stage_args = options.parse_known_args(remainder, namespace=argparse.Namespace(**vars(args)))
    return parsed, [*stage_args, *verbatim]


def run(args: argparse.Namespace) -> int:
    args, stage_args = split_stage_args(args)
    runtime_env = load_runtime_env(args.runtime_env, args.working_dir, args.env, args.pip)
    entrypoint = entrypoint_for(args.stage, stage_args, Path(runtime_env["working_dir"]))
    client = connect(args.address)
    job_id = client_call(
        "submitting the job",
        client.submit_job,
        entrypoint=entrypoint,
        runtime_env=runtime_env,
        submission_id=args.submission_id,
        metadata={"crlft_stage": args.stage},
        entrypoint_num_cpus=args.entrypoint_num_cpus,
        entrypoint_num_gpus=args.entrypoint_num_gpus,
    )
    print(f"submitted {job_id}: {entrypoint}", file=sys.stderr)
    if not args.follow:
        where = f" --address {args.address}" if args.address else ""
        print(job_id)
        print(
            f"logs: ray job logs -f {job_id}{where} | status: crlft jobs{where} | stop: crlft stop {job_id}{where}",
            file=sys.stderr,
        )
        return 0
    status = follow(client, job_id)
    info = client_call(f"job {job_id}", client.get_job_info, job_id)
    print(f"job {job_id}: {status}" + (f" ({info.message})" if info.message else ""), file=sys.stderr)
    return 0 if status == "SUCCEEDED" else 1


if __name__ == "__main__":
    raise SystemExit(stage_entrypoint("jobs.submit"))
