"""`crlft stop JOB --address URL`: stop a job on a Ray cluster (client code in jobs/submit.py)."""

from __future__ import annotations

import argparse

from crlft.command_line import stage_entrypoint
from jobs.submit import add_address_argument, client_call, connect


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_address_argument(parser)
    parser.add_argument("job", metavar="JOB", help="submission id, as `crlft submit` and `crlft jobs` print it")


def run(args: argparse.Namespace) -> int:
    client = connect(args.address)
    stopped = client_call(f"stopping {args.job}", client.stop_job, args.job)
    print(f"{args.job}: {'stop requested' if stopped else 'not running'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(stage_entrypoint("jobs.submit_stop"))
