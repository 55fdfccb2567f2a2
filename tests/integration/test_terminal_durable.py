"""A job's terminal state is told to nobody before the store holds it (issue 12, found by the chaos run:
a job seen FAILED by its watchers, its FAILED record refused by a store outage, its server killed before
the record was written, ran again in the next server generation and SUCCEEDED).

Real server processes over moto's S3 server, stopped and started again on its port: the first run of
the job fails while the store is down, the server is SIGKILLed before the FAILED record lands, and the
next generation runs the job again, which succeeds. Watchers and GetJob saw it RUNNING ("recording the
result") until then, and SUCCEEDED after: one terminal state, the one the store holds.
"""

from __future__ import annotations

import sys
import threading
import uuid

import pytest

from fluxlora.common.storage import S3Store
from fluxlora_api.v1 import jobs_pb2
from fluxlora_client import FluxloraClient
from support import S3Endpoint, ServiceProcess, wait_until

pytestmark = pytest.mark.timeout(240)
S = jobs_pb2.JobState
TERMINAL = (S.JOB_STATE_SUCCEEDED, S.JOB_STATE_FAILED, S.JOB_STATE_CANCELLED)

# A preprocessing server whose handler fails its first run (once a file `go` appears in the folder
# given) and succeeds on any later one; each run leaves a line in `runs`.
FAILS_FIRST_SERVER = """
import dataclasses, sys, threading, time
from pathlib import Path
from fluxlora.common.config import Settings
from fluxlora.jobs import recorder
from fluxlora.server.bootstrap import RunningServer, load_definition
from fluxlora_api.shared.errors import InvalidArgument
from fluxlora_api.v1 import preprocessing_pb2

recorder.RESAVE_INTERVAL_S = 0.2
folder = Path(sys.argv[-2])

def handler(ctx, spec):
    runs = folder / "runs"
    first = not runs.exists()
    with runs.open("a") as out:
        out.write("run\\n")
    if first:
        while not (folder / "go").exists():
            time.sleep(0.05)
        raise InvalidArgument("the first run fails")
    return preprocessing_pb2.PreprocessResult(dataset_id="ds-second-run")

definition = dataclasses.replace(load_definition("preprocessing"), handler=handler)
RunningServer(definition, Settings(), port=int(sys.argv[-1])).start()
threading.Event().wait()
"""


@pytest.fixture
def s3():
    endpoint = S3Endpoint()
    endpoint.start()
    yield endpoint
    if endpoint.server is not None:
        endpoint.stop()


def test_an_end_the_store_refused_is_shown_to_nobody_and_a_killed_server_runs_the_job_again(
        s3, tmp_path, photos):
    store = S3Store.connect(s3.address, f"durable-{uuid.uuid4().hex[:8]}", "test", "test", secure=False)
    server = ServiceProcess("preprocessing", store, tmp_path,
                            command=[sys.executable, "-c", FAILS_FIRST_SERVER, str(tmp_path)],
                            # the server's store calls give up within a second while the store is down
                            FLUXLORA_S3_RETRIES="2", FLUXLORA_S3_RETRY_BASE_S="0.05", FLUXLORA_S3_RETRY_MAX_S="0.1")
    server.start()
    client = FluxloraClient(preprocessing=server.address, timeout=20)
    watching = FluxloraClient(preprocessing=server.address)
    try:
        job = client.preprocess(client.upload_photos(photos), base_size=64)
        wait_until(lambda: (tmp_path / "runs").exists() and client.get_job(job.job_id).state == S.JOB_STATE_RUNNING,
                   "the first run", logs=server.logs)
        seen: list[int] = []
        follower = threading.Thread(target=lambda: seen.extend(e.job.state for e in watching.watch(job.job_id)),
                                    daemon=True)
        follower.start()
        wait_until(lambda: seen, "the watcher's first event", logs=server.logs)

        s3.stop()
        (tmp_path / "go").touch()  # the first run fails now; its FAILED record cannot be stored
        now = wait_until(lambda: (j := client.get_job(job.job_id)).progress.stage.startswith(
            "finished; recording the result") and j, "the job to say it is recording its result", logs=server.logs)
        assert now.state == S.JOB_STATE_RUNNING, server.logs()
        assert "the store is unavailable, retrying" in now.progress.stage
        assert not any(state in TERMINAL for state in seen)

        server.kill()  # before the store comes back: the FAILED record never lands
        s3.start()
        server.start()  # the next generation finds the job RUNNING in the store and runs it again
        follower.join(120)
        assert not follower.is_alive(), server.logs()
        final = client.get_job(job.job_id)
    finally:
        client.close()
        watching.close()
        server.stop()

    assert final.state == S.JOB_STATE_SUCCEEDED and final.attempts == 2, server.logs()
    assert [state for state in seen if state in TERMINAL] == [S.JOB_STATE_SUCCEEDED]  # one end, told once
    assert (tmp_path / "runs").read_text().count("run") == 2
    assert store.get_json(f"jobs/preprocessing/{job.job_id}.json")["state"] == "JOB_STATE_SUCCEEDED"
