"""``whaleid jobs``: background jobs, and following one to its end."""

from __future__ import annotations

import argparse
import json
import logging
import sys

from service.access.auth import COMMAND_LINE
from service.cli.common import Command, arg, sessions_of
from service.settings import Settings

log = logging.getLogger("whaleid")


def follow_job(factory, job_id: int, poll: float) -> int:  # type: ignore[no-untyped-def]
    """A progress bar until the job ends; 0 if it succeeded."""
    import time

    from tqdm import tqdm

    from service.jobs.queue import get_job, progress

    with factory() as session:
        p = progress(session, get_job(session, job_id, COMMAND_LINE))
    bar = tqdm(total=p.total, desc=f"job {job_id} {p.kind}", unit="photo")
    try:
        while True:
            with factory() as session:
                p = progress(session, get_job(session, job_id, COMMAND_LINE))
            bar.update(p.done + p.failed - bar.n)
            bar.set_postfix(state=p.state, failed=p.failed)
            if p.finished:
                break
            time.sleep(poll)
    finally:
        bar.close()
    for error in p.errors:
        log.warning("job %s: %s", job_id, error)
    log.info("job %s %s", job_id, p.state)
    return 0 if p.state == "succeeded" else 1


def cmd_jobs_list(args: argparse.Namespace, settings: Settings) -> int:
    from service.jobs.queue import list_jobs, progress

    with sessions_of(settings)() as session:
        for job in list_jobs(session, COMMAND_LINE, args.limit):
            p = progress(session, job)
            sys.stdout.write(
                f"{p.id}\t{p.kind}\t{p.state}\tmodel={p.model_id}\t{p.done + p.failed}/{p.total}"
                f"\tfailed={p.failed}\t{p.created_at:%Y-%m-%d %H:%M:%S}\n"
            )
    return 0


def cmd_jobs_show(args: argparse.Namespace, settings: Settings) -> int:
    from service.jobs.queue import get_job, progress

    factory = sessions_of(settings)
    with factory() as session:
        p = progress(session, get_job(session, args.job_id, COMMAND_LINE))
    if args.follow and not p.finished:
        return follow_job(factory, args.job_id, args.poll)
    body = {k: v.isoformat() if hasattr(v, "isoformat") else v for k, v in p.__dict__.items()}
    sys.stdout.write(json.dumps(body, indent=2) + "\n")
    return 0


def cmd_jobs_cancel(args: argparse.Namespace, settings: Settings) -> int:
    from service.jobs.queue import cancel

    cancel(sessions_of(settings), args.job_id, COMMAND_LINE)
    log.info("job %s cancelled", args.job_id)
    return 0


COMMANDS = (
    Command(
        ("jobs", "list"),
        cmd_jobs_list,
        "newest jobs first",
        ("whaleid jobs list",),
        (arg("--limit", type=int, default=20),),
    ),
    Command(
        ("jobs", "show"),
        cmd_jobs_show,
        "a job's progress, errors and result",
        ("whaleid jobs show 4 --follow",),
        (
            arg("job_id", type=int),
            arg("--follow", action="store_true", help="a progress bar until the job ends"),
            arg("--poll", type=float, default=1.0),
        ),
    ),
    Command(
        ("jobs", "cancel"),
        cmd_jobs_cancel,
        "stop a job",
        ("whaleid jobs cancel 4",),
        (arg("job_id", type=int),),
    ),
)
