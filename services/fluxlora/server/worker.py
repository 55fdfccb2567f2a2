"""`python -m fluxlora.server.worker <service> <job_id> [--watch-parent]`: the process a server's
ProcessRunner starts for each job (fluxlora.jobs.process). It finds the service's handler and runs
the stored job with fluxlora.jobs.worker, then exits with its code."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Callable
from typing import Any

from google.protobuf.message import Message

from fluxlora.common import tracing
from fluxlora.jobs.context import JobContext
from fluxlora.jobs.worker import (
    EXIT_FAILED,
    EXIT_INTERRUPTED,
    EXIT_PERMANENT,
    EXIT_SUCCEEDED,
    EXIT_UNAVAILABLE,
    run_worker,
    stop_on_sigterm,
    stop_when_stdin_closes,
)
from fluxlora.server.services import load_definition

log = logging.getLogger("fluxlora.jobs.worker")


def main(argv: list[str] | None = None, handler: Callable[[JobContext, Any], Message] | None = None) -> int:
    """Runs the job with the FLUXLORA_* settings from the environment and the service's handler (or
    `handler`: tests run their own); returns the exit code."""
    from fluxlora.common.config import Settings
    from fluxlora.common.logs import configure_logging
    from fluxlora_api.shared.ports import SERVICES

    parser = argparse.ArgumentParser(
        prog="python -m fluxlora.server.worker",
        description=f"Run one stored job in this process, then exit. Exit codes: {EXIT_SUCCEEDED} succeeded, "
                    f"{EXIT_FAILED} failed (a retry may help), {EXIT_PERMANENT} bad request, {EXIT_INTERRUPTED} "
                    f"interrupted (SIGTERM), {EXIT_UNAVAILABLE} store unreachable before the job started.")
    parser.add_argument("service", help="the service whose job handler runs the job")
    parser.add_argument("job_id", help="the stored job to run, e.g. trn-0123456789ab")
    parser.add_argument("--watch-parent", action="store_true",
                        help="stop as on SIGTERM when stdin closes (the server that started this process is gone)")
    args = parser.parse_args(argv)
    settings = Settings()
    configure_logging(settings.log_level, settings.log_format, f"{args.service}-worker")
    if args.service not in SERVICES:
        log.error("unknown service %r; choose one of %s", args.service, ", ".join(SERVICES))
        return EXIT_PERMANENT
    stop = stop_on_sigterm()
    if args.watch_parent:
        stop_when_stdin_closes(stop)
    log.info("worker process %d running %s job %s", os.getpid(), args.service, args.job_id)
    tracing.configure_from_env(f"fluxlora-{args.service}-worker")  # continues the job's trace (its record)
    return run_worker(args.service, args.job_id, settings, stop=stop,
                      handler=handler or load_definition(args.service).handler)


if __name__ == "__main__":
    # The imported module's main, not this __main__ copy: one set of module globals per process.
    from fluxlora.server.worker import main as worker_main

    sys.exit(worker_main())
