"""`python -m fluxlora.server.launcher <torchrun options> <worker command>`: torchrun (torch's own
launcher, torch.distributed.run, with the same options) whose exit code says how its ranks ended.

torchrun exits 1 whenever a rank fails, whatever the rank's own exit code or signal. The callers read
that code: a Kubernetes Job's podFailurePolicy fails the Job at once on the worker's config-error exit
(fluxlora.jobs.worker.EXIT_PERMANENT), and the process runner runs a job again when its worker was
killed (the out-of-memory killer's SIGKILL). So this launcher runs torchrun's own `run` and turns
the failed ranks it reports (ChildFailedError) into one exit code, as a single worker would have
ended (rank_exit_code). A rank that found the request wrong notes its code 3 in a folder the launcher
names (fluxlora.jobs.worker.note_rank_result) as it fails: the others fail too once it has left their
collectives, and torchrun may see one of them first and stop that rank before it exits 3. A SIGTERM to the
launcher (cancel, drain, preemption) reaches every rank through torchrun, as before, and ends it
with EXIT_INTERRUPTED.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import tempfile
from collections.abc import Mapping
from pathlib import Path

from fluxlora.jobs.worker import EXIT_FAILED, EXIT_INTERRUPTED, EXIT_PERMANENT, RANK_RESULTS_ENV

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


def noted_exit_codes(folder: Path) -> dict[int, int]:
    """The exit codes ranks of this node noted before they ended (rank -> code): a rank that found the
    request wrong may be stopped by torchrun before it exits 3, once a peer it left has failed first."""
    noted = {}
    for path in folder.iterdir():
        try:
            noted[int(path.name)] = int(path.read_text())
        except ValueError:
            continue
    return noted


def main(argv: list[str] | None = None) -> int:
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = parse_args(sys.argv[1:] if argv is None else argv)
    with tempfile.TemporaryDirectory(prefix="fluxlora-ranks-") as results:
        os.environ[RANK_RESULTS_ENV] = results  # the ranks inherit it: fluxlora.jobs.worker.note_rank_result
        try:
            run(args)
        except ChildFailedError as exc:
            codes = {rank: failure.exitcode for rank, failure in exc.failures.items()}
            noted = noted_exit_codes(Path(results))
            code = rank_exit_code(codes | noted)
            log.error("ranks failed (rank: exit code, negative for a signal): %s, noted by the ranks: %s; exiting %d",
                      codes, noted, code)
            return code
        except SignalException as exc:
            log.warning("stopped by %s: every rank was asked to stop", exc.sigval.name)
            return EXIT_INTERRUPTED
    return 0


if __name__ == "__main__":
    from fluxlora.server.launcher import main as launcher_main

    sys.exit(launcher_main())
