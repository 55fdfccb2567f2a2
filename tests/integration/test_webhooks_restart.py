"""Webhook events outlive the server that had them: with the receiver down, a job's events wait in the
store's outbox; a SIGTERM, a SIGKILL while the receiver is down and a SIGKILL in the middle of a
delivery later, the next server generation (on a local store and on S3) delivers every event, in
order, with its original id (the one cut off comes again: at least once). The job itself finished
long before, untouched."""

from __future__ import annotations

import uuid

import pytest
from PIL import Image
from test_webhooks import SECRET, Receiver

from fluxlora.common.storage import ArtifactStore, LocalStore
from fluxlora.server.local import free_port
from fluxlora_api.shared.errors import NotFound
from fluxlora_api.v1 import jobs_pb2
from fluxlora_client import FluxloraClient, webhooks
from support import ServiceProcess, make_s3_store, put_photos, wait_until

pytestmark = pytest.mark.timeout(300)
S = jobs_pb2.JobState


def outbox(store: ArtifactStore, job_id: str) -> list[dict]:
    try:  # (deleted the moment its last event is delivered)
        return store.get_json(f"jobs/webhooks/preprocessing/outbox/{job_id}.json")["events"]
    except (NotFound, FileNotFoundError):
        return []


@pytest.mark.parametrize("kind", ["local", "s3"])
def test_undelivered_events_survive_sigterm_and_sigkill_and_arrive_in_order_with_their_ids(tmp_path, kind, request):
    store = LocalStore(tmp_path / "store") if kind == "local" else make_s3_store(request.getfixturevalue(
        "moto_endpoint"))
    folder = tmp_path / "photos"
    folder.mkdir()
    for k in range(2):
        Image.new("RGB", (96, 96), (40 * k, 90, 200)).save(folder / f"p{k}.png")
    prefix = put_photos(store, folder, uuid.uuid4().hex[:12])
    port = free_port()
    url = f"http://127.0.0.1:{port}/hook"
    server = ServiceProcess("preprocessing", store, tmp_path, FLUXLORA_WEBHOOK_SECRET=SECRET,
                            FLUXLORA_WEBHOOK_RETRY_BASE_S="0.05", FLUXLORA_WEBHOOK_RETRY_MAX_S="0.3",
                            FLUXLORA_WEBHOOK_TIMEOUT_S="5")
    receiver = None
    try:
        # 1. the receiver is down: the job runs to the end regardless, its events wait in the outbox
        server.start()
        with FluxloraClient(preprocessing=server.address) as client:
            job = client.preprocess(prefix, base_size=64, webhook_urls=[url])
            finished = wait_until(lambda: (j := client.get_job(job.job_id)).state in (
                S.JOB_STATE_SUCCEEDED, S.JOB_STATE_FAILED) and j, "the job", logs=server.logs, timeout=60.0)
        assert finished.state == S.JOB_STATE_SUCCEEDED
        events = wait_until(lambda: (e := outbox(store, job.job_id)) and e[-1]["event_type"] == "job.succeeded"
                            and e, "the outbox to hold the terminal event", logs=server.logs, timeout=60.0)
        ids = [e["event_id"] for e in events]
        assert [e["event_type"] for e in events][:2] == ["job.accepted", "job.started"]

        # 2. SIGTERM, a new generation, SIGKILL while it retries: nothing delivered, nothing lost
        server.stop()
        assert [e["event_id"] for e in outbox(store, job.job_id)] == ids
        def attempts() -> int:
            return len(store.get_json(f"jobs/webhooks/preprocessing/{job.job_id}.json")["deliveries"][0]["attempts"])

        tried = attempts()
        server.start()
        wait_until(lambda: attempts() >= tried + 2, "the new generation to retry", logs=server.logs, timeout=60.0)
        server.kill()
        assert [e["event_id"] for e in outbox(store, job.job_id)] == ids

        # 3. the receiver comes up and hangs on the first delivery; the server is killed during it
        answers = {1: (204, 3.0)}
        receiver = Receiver(lambda n: answers.get(n, (204, 0.0)), port=port)
        server.start()
        wait_until(lambda: receiver.requests, "a delivery to begin", logs=server.logs, timeout=60.0)
        server.kill()

        # 4. the next generation delivers everything, the cut-off event again, then the rest in order
        server.start()
        wait_until(lambda: not outbox(store, job.job_id), "the outbox to empty", logs=server.logs, timeout=60.0)
        with FluxloraClient(preprocessing=server.address) as client:
            log = webhooks.deliveries(client, job.job_id)
            assert client.get_job(job.job_id).state == S.JOB_STATE_SUCCEEDED
    finally:
        server.stop()
        if receiver is not None:
            receiver.close()

    got = receiver.events()
    assert got[0].id == got[1].id == ids[0], "the delivery cut off by the SIGKILL is sent again with its id"
    unique = list(dict.fromkeys(e.id for e in got))
    assert unique == ids, "every event once after deduplication, in the original order"
    assert [e.type for e in got][-1] == "job.succeeded" and got[-1].job.state == S.JOB_STATE_SUCCEEDED
    assert [d.event_id for d in log.deliveries] == ids
    assert all(d.status == "delivered" for d in log.deliveries)
    assert any(a.status_code == 0 for a in log.deliveries[0].attempts)  # the attempts while it was down
