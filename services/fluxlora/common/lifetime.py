"""Child processes that die with their parent, so a parent killed without running its shutdown code
(SIGKILL, the out-of-memory killer) leaves nothing behind holding memory or ports.

On Linux the kernel does it: prctl(PR_SET_PDEATHSIG) sends the signal the moment the parent exits.
Elsewhere a daemon thread notices the parent is gone (this process was re-parented) within a second.
Either way it is the child that asks, after it started: no preexec_fn (unsafe in a parent with
threads, as every gRPC process has).

Linux ties PDEATHSIG to the parent *thread* that forked the child: a parent must start such children
from a thread that lives as long as they should (the main thread, in `fluxlora up` and the servers).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import signal
import sys
import threading
import time

log = logging.getLogger(__name__)

PARENT_ENV = "FLUXLORA_DIE_WITH_PARENT"  # set by a parent (fluxlora up) to its pid; read by `fluxlora serve`
_PR_SET_PDEATHSIG = 1


def die_with_parent(signum: int = signal.SIGTERM, parent: int | None = None, poll_s: float = 1.0) -> None:
    """Sends `signum` to this process when its parent exits. `parent`: the pid the parent had when it
    started this process; already gone (this process was re-parented meanwhile): the signal comes now."""
    parent = os.getppid() if parent is None else parent
    if not _pdeathsig(signum):
        threading.Thread(target=_watch_parent, args=(parent, signum, poll_s), daemon=True,
                         name="die-with-parent").start()
    if os.getppid() != parent:
        os.kill(os.getpid(), signum)


def die_with_parent_from_env(signum: int = signal.SIGTERM) -> None:
    """die_with_parent when a parent asked for it through FLUXLORA_DIE_WITH_PARENT (its pid); the
    variable is removed, so this process's own children do not take its parent for theirs."""
    value = os.environ.pop(PARENT_ENV, "")
    if value.isdigit():
        die_with_parent(signum, parent=int(value))


def die_with_process(pid: int, signum: int = signal.SIGKILL, poll_s: float = 1.0) -> None:
    """Sends `signum` to this process within `poll_s` of process `pid` (an ancestor, not the parent:
    a multiprocessing forkserver's worker watching the server behind the forkserver) exiting."""
    threading.Thread(target=_watch_process, args=(pid, signum, poll_s), daemon=True, name="die-with-process").start()


def exists(pid: int) -> bool:
    """Whether process `pid` is running (a zombie, dead but not yet reaped by its parent, is not)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        stat = open(f"/proc/{pid}/stat").read()  # noqa: SIM115 (Linux only; elsewhere trust kill(0))
    except OSError:
        return True
    return stat.rsplit(")", 1)[-1].split()[0] not in ("Z", "X")


def _pdeathsig(signum: int) -> bool:
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        return libc.prctl(_PR_SET_PDEATHSIG, int(signum), 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


def _watch_parent(parent: int, signum: int, poll_s: float) -> None:
    while os.getppid() == parent:
        time.sleep(poll_s)
    log.warning("parent process %d exited; stopping", parent)
    os.kill(os.getpid(), signum)


def _watch_process(pid: int, signum: int, poll_s: float) -> None:
    while exists(pid):
        time.sleep(poll_s)
    os.kill(os.getpid(), signum)
