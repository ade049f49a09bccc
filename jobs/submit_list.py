"""`crlft jobs --address URL`: the jobs of a Ray cluster, oldest first (client code in jobs/submit.py)."""

from __future__ import annotations

import argparse
import time

from crlft.command_line import stage_entrypoint
from jobs.submit import add_address_argument, client_call, connect


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_address_argument(parser)


def run(args: argparse.Namespace) -> int:
    client = connect(args.address)
    jobs = sorted(client_call("listing jobs", client.list_jobs), key=lambda job: job.start_time or 0)
    for job in jobs:
        started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(job.start_time / 1000)) if job.start_time else "-"
        print(f"{job.submission_id or job.job_id}  {job.status!s:9}  {started}  {job.entrypoint}")
    return 0


if __name__ == "__main__":
    raise SystemExit(stage_entrypoint("jobs.submit_list"))
