"""`fcclip submit`: run an `fcclip` command on a Ray cluster through Ray's Job API, follow its logs, and exit with
the job's final status (0 when SUCCEEDED).

    fcclip submit --address http://127.0.0.1:8265 [--working-dir .] [--env K=V ...] -- fcclip label s3://... --out ...

The address is the cluster's dashboard / Job API (default ``$RAY_ADDRESS``), reached over the cluster's private
network or a tunnel (``ray dashboard cluster/aws.yaml``, ``kubectl port-forward svc/fcclip-head-svc 8265``). With
token authentication on (``RAY_AUTH_MODE=token``), Ray's client sends the token from ``RAY_AUTH_TOKEN`` or
``~/.ray/auth_token``. Credentials for object storage are never sent with the job: the cluster's nodes use their own
(instance roles, workload identity, or a Kubernetes Secret in the pod environment).
"""
from __future__ import annotations

import argparse
import asyncio
import os
import re
import shlex
import sys
import time

from ray.exceptions import AuthenticationError
from ray.job_submission import JobSubmissionClient

from .cli import _first_line

TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")
AGENT_WAIT_S = 300  # how long a submission waits for the job agent of a cluster that is still starting


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--address", default=None, help="Job API address (default: $RAY_ADDRESS)")
    p.add_argument("--working-dir", default=None,
                   help="upload this folder as the job's working directory (default: use the package installed "
                        "on the cluster)")
    p.add_argument("--env", action="append", default=[], metavar="K=V",
                   help="environment variable for the job (not for secrets: use the cluster's own)")
    p.add_argument("--submission-id", default=None,
                   help="the job's id (default: one Ray makes); a second job with the same id is refused by Ray")
    p.add_argument("--no-wait", action="store_true", help="submit and print the job id without following it")
    p.add_argument("entrypoint", nargs=argparse.REMAINDER, help="-- fcclip label|train|eval ...")


def main_args(args: argparse.Namespace) -> int:
    entry = list(args.entrypoint)
    if entry and entry[0] == "--":
        entry = entry[1:]
    if not entry:
        print("fcclip submit: give the command after --, e.g. -- fcclip label SOURCE --out DEST --vocab V",
              file=sys.stderr)
        return 2
    address = args.address or os.environ.get("RAY_ADDRESS")
    if not address:
        print("fcclip submit: no --address and no RAY_ADDRESS", file=sys.stderr)
        return 2
    runtime_env = {}
    if args.working_dir:
        runtime_env["working_dir"] = args.working_dir
    if args.env:
        pairs = [e.split("=", 1) for e in args.env]
        if any(len(p) != 2 for p in pairs):
            print("fcclip submit: --env takes K=V", file=sys.stderr)
            return 2
        runtime_env["env_vars"] = dict(pairs)
    deadline = time.time() + AGENT_WAIT_S
    while True:
        try:
            client = JobSubmissionClient(address)
            job_id = client.submit_job(
                entrypoint=shlex.join(entry), runtime_env=runtime_env or None, submission_id=args.submission_id
            )
            break
        except ConnectionError as e:  # nothing answers there, or not a Job API
            print(f"fcclip submit: error: {_first_line(e)} (the cluster's dashboard / Job API address, e.g. "
                  "http://127.0.0.1:8265 through `ray dashboard CLUSTER.yaml` or a port-forward)", file=sys.stderr)
            return 1
        except AuthenticationError as e:
            print(f"fcclip submit: error: {_first_line(e)}: the cluster has token authentication on; put its token "
                  "in RAY_AUTH_TOKEN (or ~/.ray/auth_token) and set RAY_AUTH_MODE=token", file=sys.stderr)
            return 2
        except RuntimeError as e:
            if "No available agent" not in str(e):  # a cluster that just started has no job agent yet
                print(f"fcclip submit: error: the Job API at {address} refused the job: {_refusal(e)}; nothing was "
                      "submitted", file=sys.stderr)
                return 2
            if time.time() > deadline:
                print(f"fcclip submit: error: the cluster at {address} had no job agent ready after {AGENT_WAIT_S} s "
                      "(its nodes may still be starting); nothing was submitted, try again", file=sys.stderr)
                return 1
            time.sleep(2)
    print(f"submitted job {job_id} to {address}", flush=True)
    if args.no_wait:
        return 0
    try:
        return follow(client, job_id)
    except KeyboardInterrupt:  # Ctrl-C stops following, not the job
        print(f"\nfcclip submit: stopped following job {job_id}; it goes on running on the cluster (`ray job logs "
              f"--follow {job_id} --address {address}` follows it again, `ray job stop {job_id} --address {address}` "
              "stops it)", file=sys.stderr)
        return 130


def _refusal(e: RuntimeError) -> str:
    """What the Job API said, out of Ray's "Request failed with status code N: TEXT", where TEXT is often the
    server's traceback, itself holding another such request's: the innermost status code and exception line."""
    text = str(e)
    codes = re.findall(r"status code (\d+)", text)
    lines = [line.strip() for line in text.splitlines() if line.strip().strip(".")]
    raised = [line for line in lines if re.match(r"[A-Za-z_][\w.]*(Error|Exception): ", line)
              and "Request failed with status code" not in line]
    reason = (raised or lines or [type(e).__name__])[-1].rstrip(".")
    return f"{reason} (HTTP {codes[-1]})" if codes else reason


def follow(client, job_id: str) -> int:
    """Stream the job's logs until it ends; 0 if it SUCCEEDED, 1 otherwise."""

    async def tail():
        async for lines in client.tail_job_logs(job_id):
            print(lines, end="", flush=True)

    try:
        asyncio.run(tail())
    except Exception as e:  # the log stream can drop (network); the status below is what counts
        print(f"(log stream ended: {e})", file=sys.stderr)
    while True:
        status = str(client.get_job_status(job_id)).split(".")[-1]
        if status in TERMINAL:
            break
        time.sleep(1)
    info = client.get_job_info(job_id)
    print(f"job {job_id}: {status}" + (f" ({info.message})" if status != "SUCCEEDED" and info.message else ""))
    return 0 if status == "SUCCEEDED" else 1
