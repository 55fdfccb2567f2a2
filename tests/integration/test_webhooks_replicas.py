"""Webhook events with two replicas of one service on one store (real `fluxlora serve preprocessing`
processes, 3-second job leases): only the replica holding a job's lease sends its events.

- A job's events wait in the outbox while the receiver is down; the other replica restarts meanwhile
  and leaves them alone (its owner is alive and keeps the lease while they wait). When the receiver
  comes up, every event arrives once, in order, all from the owner.
- The owner is SIGKILLed with a finished job's events undelivered: the survivor takes the job's lease
  once it expires, and with it the outbox, and delivers every event, in order, with its original id;
  its /metrics count the takeover (fluxlora_job_leases_taken_over_total{what="webhooks"}).

The receiver names the process behind each connection (the server whose socket has its client port).
"""

from __future__ import annotations

import psutil
import pytest
from metrics_support import scrape, total
from test_replicas import lease_owners, replica
from test_webhooks import SECRET, Receiver
from test_webhooks_restart import outbox

from fluxlora.demo.sample_data import write_sample_photos
from fluxlora.server.local import free_port
from fluxlora_api.v1 import jobs_pb2
from fluxlora_client import FluxloraClient, webhooks
from support import wait_until

pytestmark = pytest.mark.timeout(300)
S = jobs_pb2.JobState
HOOKS = dict(FLUXLORA_WEBHOOK_SECRET=SECRET, FLUXLORA_WEBHOOK_RETRY_BASE_S="0.05",
             FLUXLORA_WEBHOOK_RETRY_MAX_S="0.3", FLUXLORA_WEBHOOK_TIMEOUT_S="5")


@pytest.mark.parametrize("store", ["local", pytest.param("s3", marks=pytest.mark.slow)], indirect=True)
def test_only_the_lease_holder_sends_a_jobs_events_and_a_dead_owners_are_sent_by_the_survivor(
        store, tmp_path, processes):
    b_metrics = free_port()
    a = replica("replica-a", store, tmp_path, **HOOKS)
    b = replica("replica-b", store, tmp_path, **HOOKS, FLUXLORA_METRICS_PORT=str(b_metrics))
    processes += [a.start(), b.start()]
    logs = lambda: f"--- a\n{a.logs()}\n--- b\n{b.logs()}"  # noqa: E731

    def identify(client_port: int) -> str:
        for name, server in (("replica-a", a), ("replica-b", b)):
            alive = server.process.poll() is None
            if alive and any(c.laddr and c.laddr.port == client_port
                             for c in psutil.Process(server.process.pid).net_connections()):
                return name
        return "?"

    port = free_port()
    url = f"http://127.0.0.1:{port}/hook"
    on_a = FluxloraClient(preprocessing=a.address)
    write_sample_photos(tmp_path / "photos", count=3, seed=5)
    source = on_a.upload_photos(tmp_path / "photos")

    def finished_with_events_waiting(request_id: str) -> tuple[jobs_pb2.Job, list[str]]:
        job = on_a.preprocess(source, base_size=64, request_id=request_id, webhook_urls=[url])
        assert on_a.wait(job, raise_on_failure=False).state == S.JOB_STATE_SUCCEEDED
        events = wait_until(lambda: (e := outbox(store, job.job_id)) and e[-1]["event_type"] == "job.succeeded"
                            and e, "the outbox to hold the terminal event", logs=logs)
        return job, [e["event_id"] for e in events]

    # 1. the receiver is down; b restarts meanwhile: a, alive, still holds the events
    first, first_ids = finished_with_events_waiting("hooks-1")
    b.stop()
    b.start()  # (its start's scan of the store is over once it answers)
    receiver = Receiver(port=port, identify=identify)
    try:
        wait_until(lambda: not outbox(store, first.job_id), "the first job's events delivered", logs=logs)
        assert [e.id for e in receiver.events()] == first_ids, "each event once, in order"
        assert set(receiver.senders) == {"replica-a"}, receiver.senders
        assert lease_owners(store, first.job_id) == ["replica-a"]
        assert total(scrape(b_metrics), "fluxlora_job_leases_taken_over_total") == 0
    finally:
        receiver.close()

    # 2. down again; a finishes a job and is killed with its events undelivered: b sends them
    second, second_ids = finished_with_events_waiting("hooks-2")
    a.kill()
    receiver = Receiver(port=port, identify=identify)
    try:
        wait_until(lambda: not outbox(store, second.job_id), "b to deliver a's leftover events", logs=logs)
        assert [e.id for e in receiver.events()] == second_ids, "each event once, in order, with its id"
        assert set(receiver.senders) == {"replica-b"}, receiver.senders
        assert lease_owners(store, second.job_id)[-1] == "replica-b"
        taken = scrape(b_metrics)
        assert total(taken, "fluxlora_job_leases_taken_over_total", service="preprocessing", what="webhooks") == 1
        assert ("fluxlora_job_leases_held", (("service", "preprocessing"),)) in taken
        with FluxloraClient(preprocessing=b.address) as on_b:
            log = webhooks.deliveries(on_b, second.job_id)
        assert [(d.event_id, d.status) for d in log.deliveries] == [(i, "delivered") for i in second_ids]
    finally:
        receiver.close()
        on_a.close()
