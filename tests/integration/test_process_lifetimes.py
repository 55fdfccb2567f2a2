"""Processes and ports, on real processes:

- an SDK wait rides out its server's SIGKILL and restart and returns the job's terminal state,
  having seen every event once; the killed server's process pool goes with it;
- `fluxlora up` stops every server on SIGTERM; a second `fluxlora up` on the same ports fails,
  naming the port and the process holding it; a server that dies under `fluxlora up` is named, with
  its exit code and the end of its log, and the others are stopped;
- a second server on a port fails to bind, naming the port and its holder.
"""

from __future__ import annotations

import os
import random
import signal
import socket
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from fluxlora.common.lifetime import exists
from fluxlora.common.storage import LocalStore
from fluxlora.demo.sample_data import write_sample_photos
from fluxlora.server.bootstrap import RunningServer
from fluxlora.server.local import wait_healthy
from fluxlora.server.services import load_definition
from fluxlora_api.shared.ports import SERVICES
from fluxlora_api.v1 import jobs_pb2
from fluxlora_client import FluxloraClient
from support import ServiceProcess, preprocessing_server, wait_until

pytestmark = [pytest.mark.timeout(240),
              pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads process trees from /proc")]
S = jobs_pb2.JobState
TERMINAL = (S.JOB_STATE_SUCCEEDED, S.JOB_STATE_FAILED, S.JOB_STATE_CANCELLED)


def descendants(pid: int) -> list[int]:
    """Every process below `pid` (children, their children, ...), read from /proc."""
    parents = {}
    for entry in filter(str.isdigit, os.listdir("/proc")):
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        parents[int(entry)] = int(stat.rsplit(")", 1)[-1].split()[1])
    found, frontier = [], [pid]
    while frontier:
        children = [p for p, parent in parents.items() if parent in frontier]
        found += children
        frontier = children
    return found


def test_a_wait_rides_out_a_restart_and_the_killed_servers_pool_goes_with_it(tmp_path, processes):
    store = LocalStore(tmp_path / "store")
    # two pool workers: 24 photos are enough to use the pool (and to take a few seconds)
    server = ServiceProcess("preprocessing", store, tmp_path, FLUXLORA_PREPROCESS_WORKERS="2")
    processes.append(server.start())
    client = FluxloraClient(preprocessing=server.address, reconnect_for_s=120)
    write_sample_photos(tmp_path / "photos", count=24, seed=5)
    job = client.preprocess(client.upload_photos(tmp_path / "photos"), base_size=256)

    events: list[jobs_pb2.JobEvent] = []
    outcome: dict = {}
    watcher = threading.Thread(target=lambda: outcome.update(
        final=client.wait(job, on_event=events.append, raise_on_failure=False)), daemon=True)
    watcher.start()

    def midway() -> bool:
        current = client.get_job(job.job_id)  # (a job already finished fails the asserts below)
        progress = current.progress
        return (progress.stage == "processing images" and progress.done > 0) or current.state in TERMINAL

    wait_until(midway, "the job midway", logs=server.logs)
    pool = descendants(server.process.pid)
    assert pool, "the server started no pool workers"
    server.kill(group=False)  # the server alone, as the OOM killer does it
    assert store.get_json(f"jobs/preprocessing/{job.job_id}.json")["state"] == "JOB_STATE_RUNNING"
    wait_until(lambda: not any(exists(pid) for pid in pool), "the dead server's pool workers to exit")

    server.start()
    watcher.join(120)
    assert not watcher.is_alive(), server.logs()
    assert outcome["final"].state == S.JOB_STATE_SUCCEEDED, server.logs()
    states = [e.job.state for e in events]
    assert [s for s in states if s in TERMINAL] == [S.JOB_STATE_SUCCEEDED] and states[-1] in TERMINAL
    repeats = [b for a, b in zip(events, events[1:], strict=False) if a.job == b.job and a.message == b.message]
    assert not repeats, "an event came twice"
    client.close()


def test_a_second_server_on_a_port_fails_naming_the_port_and_its_holder(tmp_path):
    with preprocessing_server(tmp_path) as first:
        with pytest.raises(OSError) as err:
            RunningServer(load_definition("preprocessing"), first.settings, first.store, port=first.port)
    message = str(err.value)
    assert f"port {first.port} is in use" in message and f"pid {os.getpid()}" in message


# --- fluxlora up ------------------------------------------------------------------------------------
def free_ports(count: int = 4) -> int:
    """A base port N with N..N+count-1 all free just now."""
    for _ in range(50):
        # below the ephemeral range (32768+), where bind(0) and outgoing connections take their ports
        base = random.randrange(20000, 32000 - count)
        try:
            sockets = [socket.create_server(("127.0.0.1", base + i)) for i in range(count)]
        except OSError:
            continue
        for s in sockets:
            s.close()
        return base
    raise RuntimeError("no run of free ports")


class Up:
    """`fluxlora up` as a process of its own, its output in a file."""

    def __init__(self, tmp_path: Path, base_port: int, name: str = "up"):
        self.output = tmp_path / f"{name}.out"
        self.logs = tmp_path / f"{name}-logs"
        self.base_port = base_port
        env = {**os.environ, "FLUXLORA_CACHE_DIR": str(tmp_path / "cache"), "FLUXLORA_WORKERS": "1",
               "OMP_NUM_THREADS": "1", "COLUMNS": "200"}
        with open(self.output, "wb") as out:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "fluxlora_client.cli", "up", "--store", str(tmp_path / "store"),
                 "--log-dir", str(self.logs), "--base-port", str(base_port), "--grace", "20"],
                env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)

    def text(self) -> str:
        return self.output.read_text(errors="replace")

    def ready(self) -> list[int]:
        wait_until(lambda: "Ctrl-C stops them" in self.text() or self.process.poll() is not None,
                   "fluxlora up to start its servers")
        assert self.process.poll() is None, self.text()
        servers = descendants(self.process.pid)
        assert len(servers) >= 4, servers
        return servers

    def finish(self) -> int:
        try:
            return self.process.wait(90)
        finally:
            if self.process.poll() is None:
                os.killpg(self.process.pid, signal.SIGKILL)


@pytest.mark.slow
def test_fluxlora_up_stops_every_server_on_sigterm(tmp_path):
    up = Up(tmp_path, free_ports())
    servers = up.ready()
    up.process.send_signal(signal.SIGTERM)
    assert up.finish() == 0, up.text()
    assert not [pid for pid in servers if exists(pid)], "a server outlived fluxlora up"
    for name in SERVICES:
        assert "shutting down gracefully" in (up.logs / f"{name}.log").read_text(), name


@pytest.mark.slow
def test_fluxlora_up_names_a_server_that_died_and_a_second_up_finds_the_ports_taken(tmp_path):
    base = free_ports()
    up = Up(tmp_path, base)
    servers = up.ready()
    training = base + SERVICES.index("training")
    for port in range(base, base + 4):
        wait_healthy(f"127.0.0.1:{port}", timeout=30)

    second = Up(tmp_path, base, name="second-up")
    assert second.finish() == 1, second.text()
    assert f"port {base} is in use" in second.text() and "held by pid" in second.text(), second.text()
    assert up.process.poll() is None  # the first one serves on

    holder = next(pid for pid in servers if f"--port\0{training}\0" in Path(f"/proc/{pid}/cmdline").read_text())
    os.kill(holder, signal.SIGKILL)
    assert up.finish() == 1, up.text()
    said = up.text()
    assert "the training server exited with code -9 (killed by SIGKILL)" in said, said
    assert "training serving on" in said  # the end of its log
    assert "stopping preprocessing, captioning, evaluation" in said
    assert not [pid for pid in servers if exists(pid)], "a server outlived fluxlora up"
