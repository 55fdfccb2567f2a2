"""`python -m fluxlora.server.launcher <torchrun options> <worker command>`: torchrun (torch's own
launcher, torch.distributed.run, with the same options) whose exit code says how its ranks ended.

torchrun exits 1 whenever a rank fails, whatever the rank's own exit code or signal. The callers read
that code: a Kubernetes Job's podFailurePolicy fails the Job at once on the worker's config-error exit
(fluxlora.jobs.worker.EXIT_PERMANENT), and the process runner runs a job again when its worker was
killed (the out-of-memory killer's SIGKILL). So this launcher runs torchrun's own `run` and turns
the failed ranks it reports (ChildFailedError) into one exit code, as a single worker would have
ended (rank_exit_code). A SIGTERM to the launcher (cancel, drain, preemption) reaches every rank
through torchrun, as before, and ends it with EXIT_INTERRUPTED.
"""

from __future__ import annotations

import logging
import signal
import sys
from collections.abc import Mapping

from fluxlora.jobs.worker import EXIT_FAILED, EXIT_INTERRUPTED, EXIT_PERMANENT

log = logging.getLogger("fluxlora.launcher")

# A rank that died of these lost its work to the machine, not to its request: a retry may succeed.
KILLING_SIGNALS = frozenset({signal.SIGKILL, signal.SIGSEGV, signal.SIGBUS, signal.SIGILL, signal.SIGFPE,
                             signal.SIGABRT})
STOP_SIGNALS = frozenset({signal.SIGTERM, signal.SIGINT})


def rank_exit_code(exit_codes: Mapping[int, int]) -> int:
    """One exit code for the failed ranks torchrun reports (rank -> exit code, negative for a signal),
    the one that decides most: a config error (EXIT_PERMANENT: no retry helps) over a rank killed by
    the machine (128 + signal, as a shell and Kubernetes write a killed process: 137 for SIGKILL) over
    any other failure (its own code) over a rank stopped by SIGTERM (EXIT_INTERRUPTED: torchrun stops
    the other ranks after the first failure, and they are often reported with it)."""
    codes = set(exit_codes.values())
    if EXIT_PERMANENT in codes:
        return EXIT_PERMANENT
    killed = sorted(-c for c in codes if c < 0 and -c in KILLING_SIGNALS)
    if killed:
        return 128 + (signal.SIGKILL if signal.SIGKILL in killed else killed[0])
    own = sorted(c for c in codes if 0 < c < 256 and c != EXIT_INTERRUPTED)
    if own:
        return own[0]
    if EXIT_INTERRUPTED in codes or any(c < 0 and -c in STOP_SIGNALS for c in codes):
        return EXIT_INTERRUPTED
    return EXIT_FAILED


def main(argv: list[str] | None = None) -> int:
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        run(args)
    except ChildFailedError as exc:
        codes = {rank: failure.exitcode for rank, failure in exc.failures.items()}
        code = rank_exit_code(codes)
        log.error("ranks failed (rank: exit code, negative for a signal): %s; exiting %d", codes, code)
        return code
    except SignalException as exc:
        log.warning("stopped by %s: every rank was asked to stop", exc.sigval.name)
        return EXIT_INTERRUPTED
    return 0


if __name__ == "__main__":
    from fluxlora.server.launcher import main as launcher_main

    sys.exit(launcher_main())
