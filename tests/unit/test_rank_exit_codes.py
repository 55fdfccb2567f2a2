"""The launcher of several ranks (fluxlora.server.launcher: torchrun) exits as a single worker would:
with a rank's config-error code 3 (a Kubernetes Job's podFailurePolicy fails the Job on it), with 137
for a rank killed by SIGKILL (a retry may help), and 0 when every rank succeeded; torchrun alone exits 1
for each of these."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from google.protobuf import any_pb2, json_format

from fluxlora.common.storage import LocalStore
from fluxlora.jobs.launch import LAUNCHER_MODULE, multi_node_options, torchrun_options
from fluxlora.jobs.records import JobRecords
from fluxlora.jobs.worker import EXIT_FAILED, EXIT_INTERRUPTED, EXIT_PERMANENT
from fluxlora.server.launcher import noted_exit_codes, rank_exit_code
from fluxlora_api.v1 import jobs_pb2, training_pb2

SCRIPT = Path(__file__).with_name("process_worker_script.py")
JOB = "trn-0123456789ab"


@pytest.mark.parametrize(("failed", "code"), [
    ({1: EXIT_PERMANENT}, EXIT_PERMANENT),
    ({0: EXIT_FAILED, 1: EXIT_PERMANENT}, EXIT_PERMANENT),  # the config error, not the rank that lost its peer
    ({1: -signal.SIGKILL}, 137),
    ({0: -signal.SIGTERM, 1: -signal.SIGKILL}, 137),  # the killed rank, not the one torchrun stopped after it
    ({0: -signal.SIGSEGV}, 128 + signal.SIGSEGV),
    ({0: -signal.SIGTERM, 1: EXIT_INTERRUPTED}, EXIT_INTERRUPTED),
    ({1: 7}, 7),
    ({1: 7, 0: EXIT_INTERRUPTED}, 7),  # rank 0 was stopped by torchrun because rank 1 failed
    ({1: -signal.SIGHUP}, EXIT_FAILED),
])
def test_the_failed_ranks_become_the_exit_code_one_worker_would_have(failed, code):
    assert rank_exit_code(failed) == code


def stored_job(tmp_path: Path) -> LocalStore:
    store = LocalStore(tmp_path / "store")
    spec = any_pb2.Any()
    spec.Pack(training_pb2.TrainSpec(dataset_id="ds-1", gpus=2))
    job = jobs_pb2.Job(job_id=JOB, service="training", state=jobs_pb2.JobState.JOB_STATE_RUNNING, spec=spec)
    store.put_bytes(JobRecords(store, "training").key(JOB), json_format.MessageToJson(job).encode(), "application/json")
    return store


@pytest.mark.parametrize(("handler", "code"), [
    ("gloo_ranks", 0),
    ("gloo_bad_rank", EXIT_PERMANENT),
    ("killed", 128 + signal.SIGKILL),
])
def test_a_two_process_run_ends_with_its_failed_ranks_code(tmp_path, handler, code):
    store = stored_job(tmp_path)
    env = os.environ | {"FLUXLORA_STORE": str(store.root), "FLUXLORA_CACHE_DIR": str(tmp_path / "cache"),
                        "FLUXLORA_TEST_HANDLER": "gloo_ranks" if handler.startswith("gloo") else handler}
    if handler == "gloo_bad_rank":
        env["FLUXLORA_TEST_BAD_RANK"] = "1"
    command = [sys.executable, "-m", LAUNCHER_MODULE, *torchrun_options(2, 10), str(SCRIPT), "training", JOB]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=240)
    assert done.returncode == code, done.stderr[-3000:]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize(("bad_rank", "codes"), [("", [0, 0]), ("1", [None, EXIT_PERMANENT])])
def test_two_launchers_as_two_nodes_rendezvous_on_node_0s_address(tmp_path, bad_rank, codes):
    """What the pods of a multi-node Kubernetes Job run (k8s_manifests: --node-rank from the completion
    index, node 0's address), here as two processes of one rank each: one gloo world of two ranks."""
    store = stored_job(tmp_path)
    env = os.environ | {"FLUXLORA_STORE": str(store.root), "FLUXLORA_CACHE_DIR": str(tmp_path / "cache"),
                        "FLUXLORA_TEST_HANDLER": "gloo_ranks", "FLUXLORA_TEST_BAD_RANK": bad_rank}
    port = free_port()
    log = (tmp_path / "nodes.log").open("w")  # a file, not pipes: neither node blocks on a full one
    nodes = [subprocess.Popen(
        [sys.executable, "-m", LAUNCHER_MODULE, *multi_node_options(1, 2, str(rank), "127.0.0.1", port, 10),
         str(SCRIPT), "training", JOB], env=env, stdout=log, stderr=subprocess.STDOUT)
        for rank in (0, 1)]
    ended = [node.wait(timeout=240) for node in nodes]
    log.close()
    logs = (tmp_path / "nodes.log").read_text()
    for got, want in zip(ended, codes, strict=True):
        assert want is None or got == want, (ended, logs[-3000:])
    assert ended[0] != 0 or not bad_rank  # node 0 lost its peer: not a success


def test_a_ranks_noted_code_counts_where_torchrun_saw_it_stopped(tmp_path):
    """The bad rank's peer failed first and torchrun stopped the bad rank (SIGTERM) before it exited 3:
    its note decides."""
    (tmp_path / "1").write_text(str(EXIT_PERMANENT))
    seen = {0: EXIT_FAILED, 1: -signal.SIGTERM}
    assert rank_exit_code(seen | noted_exit_codes(tmp_path)) == EXIT_PERMANENT
    assert rank_exit_code(seen) == EXIT_FAILED
