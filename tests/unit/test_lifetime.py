"""Children that die with their parent (fluxlora.common.lifetime): a parent killed by SIGKILL, which
runs no shutdown code, leaves no child behind, through the kernel (Linux) or the portable watch."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

from fluxlora.common import lifetime

# The parent starts the child (which asks to die with it, as `fluxlora serve` does under `fluxlora up`),
# prints the child's pid and sleeps until killed.
PARENT = """
import os, subprocess, sys, time
env = {**os.environ, "FLUXLORA_DIE_WITH_PARENT": str(os.getpid())}
child = subprocess.Popen([sys.executable, "-c", sys.argv[1]], env=env, stdout=subprocess.PIPE, text=True)
print(child.pid, child.stdout.readline().strip(), flush=True)
time.sleep(120)
"""
CHILD = """
import os, time
from fluxlora.common import lifetime
if "MODE" == "portable":
    lifetime._pdeathsig = lambda signum: False
lifetime.die_with_parent_from_env()
print("inherits" if lifetime.PARENT_ENV in os.environ else "cleared", flush=True)
time.sleep(120)
"""


@pytest.mark.parametrize("how", ["kernel", "portable"])
def test_a_child_dies_with_its_parent_killed_by_sigkill(how):
    if how == "kernel" and not sys.platform.startswith("linux"):
        pytest.skip("PR_SET_PDEATHSIG is Linux's")
    parent = subprocess.Popen([sys.executable, "-c", PARENT, CHILD.replace("MODE", how)],
                              stdout=subprocess.PIPE, text=True)
    child_pid, env_state = parent.stdout.readline().split()
    child = int(child_pid)
    assert env_state == "cleared"  # the child's own children do not take the parent for theirs
    assert lifetime.exists(child)
    parent.kill()
    parent.wait()
    deadline = time.monotonic() + 30  # (a guard against a hang, not a timing assertion)
    while lifetime.exists(child):
        assert time.monotonic() < deadline, "the child outlived its parent"
        time.sleep(0.05)


def test_exists_says_no_for_a_process_that_ended():
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    assert not lifetime.exists(process.pid)
    assert lifetime.exists(os.getpid())


def test_a_zombie_does_not_count_as_running():
    if not os.path.exists("/proc/self/stat"):
        pytest.skip("reads /proc")
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    os.waitid(os.P_PID, process.pid, os.WEXITED | os.WNOWAIT)  # ended, not reaped: a zombie
    assert not lifetime.exists(process.pid)
    process.wait()
