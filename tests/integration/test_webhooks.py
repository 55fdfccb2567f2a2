"""Job events as Standard Webhooks to a real HTTP receiver: every event of a pipeline run, signed and in
order; a failing or slow receiver gets retries with backoff and the job is not held up; a receiver
that is down for the whole job leaves a delivery log and nothing else."""

from __future__ import annotations

import base64
import contextlib
import http.server
import threading
import time
import uuid

import grpc
import pytest
from PIL import Image

from fluxlora.common.config import Settings
from fluxlora.server.bootstrap import start_server
from fluxlora.server.local import free_port
from fluxlora.training.trainer.config import ATTENTION_AND_MLP_TARGETS
from fluxlora_api.shared.ports import SERVICES
from fluxlora_api.v1 import jobs_pb2, jobs_pb2_grpc
from fluxlora_client import FluxloraClient, FluxloraClientError, PipelineOptions, run_pipeline, webhooks
from support import StoreClient, preprocessing_server, put_photos, wait_until

SECRET = "whsec_" + base64.b64encode(b"fluxlora-test-secret-0123456789ab").decode()
S = jobs_pb2.JobState


class Receiver:
    """An HTTP server that records every POST; `answer(n)` gives the status (and delay) of the n-th;
    `identify(client_port)` names the sender of each (in `senders`) while its connection is open."""

    def __init__(self, answer=lambda n: (204, 0.0), port: int = 0, identify=lambda client_port: "",
                 host: str = "127.0.0.1", tls=None):
        """tls: an ssl.SSLContext to serve https with."""
        self.requests: list[tuple[dict[str, str], bytes, float]] = []
        self.senders: list[str] = []
        self.lock = threading.Lock()
        receiver = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802 - http.server's name
                body = self.rfile.read(int(self.headers["content-length"]))
                sender = identify(self.client_address[1])
                with receiver.lock:
                    receiver.senders.append(sender)
                    receiver.requests.append(({k.lower(): v for k, v in self.headers.items()}, body, time.monotonic()))
                    n = len(receiver.requests)
                status, delay = answer(n)
                time.sleep(delay)
                with contextlib.suppress(OSError):
                    self.send_response(status)
                    self.end_headers()

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer((host, port), Handler)
        if tls is not None:
            self.server.socket = tls.wrap_socket(self.server.socket, server_side=True)
        self.url = f"{'https' if tls else 'http'}://{host}:{self.server.server_port}/hook?token=abc"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def events(self) -> list[webhooks.WebhookEvent]:
        with self.lock:
            return [webhooks.verify(body, headers, SECRET) for headers, body, _ in self.requests]

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.mark.slow
def test_a_pipeline_run_sends_every_event_signed_and_in_order(photos, tiny_models, tmp_path):
    from fluxlora.common.storage import LocalStore

    receiver = Receiver()
    store = LocalStore(tmp_path / "store")
    settings = Settings(store=str(tmp_path / "unused"), cache_dir=tmp_path / "cache", webhook_urls=[receiver.url],
                        webhook_secret=SECRET, webhook_progress_interval_s=0.5)
    servers = {name: start_server(name, settings, store=store, port=0) for name in SERVICES}
    client = StoreClient(store, **{name: s.address for name, s in servers.items()})
    try:
        options = PipelineOptions(
            trigger_word="fluxone", base_model=str(tiny_models["flux"]), caption_model=str(tiny_models["florence2"]),
            base_size=64, train={"resolution": 64, "max_steps": 8, "checkpoint_every": 4, "sample_every": 8,
                                 "rank": 4, "sample_steps": 2, "target_modules": ATTENTION_AND_MLP_TARGETS},
            grid={"steps": 2})
        result = run_pipeline(client, photos, options, download_to=tmp_path / "out")
        wait_until(lambda: all(s.webhooks.idle() for s in servers.values()), "webhooks delivered", timeout=30.0)
        logs = {stage: webhooks.deliveries(client, job.job_id) for stage, job in result.jobs.items()}
    finally:
        client.close()
        for server in servers.values():
            server.stop(grace=1.0)
        receiver.close()

    events = receiver.events()  # every one verifies with the secret
    by_job: dict[str, list[webhooks.WebhookEvent]] = {}
    for event in events:
        by_job.setdefault(event.job.job_id, []).append(event)
    assert set(by_job) == {job.job_id for job in result.jobs.values()}
    for stage, job in result.jobs.items():
        got = by_job[job.job_id]
        types = [e.type for e in got]
        assert types[:2] == ["job.accepted", "job.started"], (stage, types)
        assert types[-1] == "job.succeeded" and types.count("job.succeeded") == 1, (stage, types)
        assert [e.event.sequence for e in got] == sorted(e.event.sequence for e in got), "out of order"
        assert len({e.id for e in got}) == len(got)
        assert got[-1].job.state == S.JOB_STATE_SUCCEEDED
        assert [d.status for d in logs[stage].deliveries] == ["delivered"] * len(got)
        assert all(d.attempts[0].status_code == 204 for d in logs[stage].deliveries)
    train_types = [e.type for e in by_job[result.jobs["train"].job_id]]
    assert "job.checkpoint" in train_types and "job.progress" in train_types
    assert "job.artifact" in [e.type for e in by_job[result.jobs["evaluate"].job_id]]

    # the same payload as WatchJob: a JobEvent; a tampered body or a wrong secret is refused
    headers, body, _ = receiver.requests[0]
    with pytest.raises(webhooks.WebhookVerificationError):
        webhooks.verify(body.replace(b"job.accepted", b"job.succeeded"), headers, SECRET)
    with pytest.raises(webhooks.WebhookVerificationError):
        webhooks.verify(body, headers, "whsec_" + base64.b64encode(b"another-secret-0123456789abcdef!").decode())


@contextlib.contextmanager
def submitted(tmp_path, urls, gate=None, **settings):
    """A preprocessing server with fast webhook retries, and a job submitted with `urls` through the raw API."""
    from fluxlora.common.storage import LocalStore

    folder = tmp_path / "photos"
    folder.mkdir(parents=True)
    for k in range(2):
        Image.new("RGB", (96, 96), (40 * k, 90, 200)).save(folder / f"p{k}.png")
    store = LocalStore(tmp_path / "store")
    prefix = put_photos(store, folder, uuid.uuid4().hex[:12])
    config = dict(webhook_secret=SECRET, webhook_retry_base_s=0.05, webhook_retry_max_s=0.2, webhook_timeout_s=0.3)
    with preprocessing_server(tmp_path, store=store, gate=gate, **{**config, **settings}) as server:
        channel = grpc.insecure_channel(server.address)
        with FluxloraClient(preprocessing=server.address) as client:  # per-job URLs through the SDK
            job = client.preprocess(prefix, base_size=64, webhook_urls=urls)
        try:
            yield server, job, jobs_pb2_grpc.JobServiceStub(channel)
        finally:
            channel.close()


def wait_job(server, job_id, timeout=30.0) -> jobs_pb2.Job:
    wait_until(lambda: server.runtime.get(job_id).state in (S.JOB_STATE_SUCCEEDED, S.JOB_STATE_FAILED), "job", timeout)
    return server.runtime.get(job_id)


def test_a_failing_then_slow_receiver_gets_retries_with_backoff_and_the_job_is_not_held_up(tmp_path):
    # the first two answers are 500, the next two come too late (timeout 0.3 s); then 204
    answers = {1: (500, 0.0), 2: (500, 0.0), 3: (204, 1.0), 4: (204, 1.0)}
    receiver = Receiver(lambda n: answers.get(n, (204, 0.0)))
    try:
        with submitted(tmp_path, [receiver.url]) as (server, job, jobs):
            started = time.monotonic()
            finished = wait_job(server, job.job_id)
            took = time.monotonic() - started
            assert finished.state == S.JOB_STATE_SUCCEEDED and list(finished.webhook_urls) == [receiver.url]
            wait_until(server.webhooks.idle, "webhooks delivered", timeout=30.0)
            log = jobs.ListWebhookDeliveries(jobs_pb2.ListWebhookDeliveriesRequest(job_id=job.job_id), timeout=10)
    finally:
        receiver.close()
    assert took < 10, "the job waited for its webhooks"
    first = log.deliveries[0]
    assert first.event_type == "job.accepted" and first.status == "delivered"
    assert [a.status_code for a in first.attempts] == [500, 500, 0, 0, 204]
    assert [a.error for a in first.attempts][2:4] == ["timed out", "timed out"]
    assert all(d.status == "delivered" for d in log.deliveries)
    assert [d.event_type for d in log.deliveries][-1] == "job.succeeded"
    # every attempt of an event carries the same id; the receiver saw the accepted event five times
    ids = [headers["webhook-id"] for headers, _, _ in receiver.requests[:5]]
    assert len(set(ids)) == 1 and ids[0] == first.event_id
    # in order: nothing of the job came before its accepted event was delivered
    types = [webhooks.verify(body, headers, SECRET).type for headers, body, _ in receiver.requests]
    assert types[:5] == ["job.accepted"] * 5 and types[5] == "job.started"


def test_a_receiver_down_for_the_whole_job_leaves_a_delivery_log_and_no_effect(tmp_path):
    down = f"http://127.0.0.1:{free_port()}/hook"
    with submitted(tmp_path, [down], webhook_retry_for_s=1.0) as (server, job, jobs):
        started = time.monotonic()
        finished = wait_job(server, job.job_id)
        assert finished.state == S.JOB_STATE_SUCCEEDED and time.monotonic() - started < 10
        wait_until(server.webhooks.idle, "webhooks given up", timeout=30.0)
        log = jobs.ListWebhookDeliveries(jobs_pb2.ListWebhookDeliveriesRequest(job_id=job.job_id), timeout=10)
        stored = server.store.get_json(f"jobs/webhooks/preprocessing/{job.job_id}.json")
    assert log.deliveries and all(d.status == "failed" for d in log.deliveries)
    assert all(d.attempts and all(a.status_code == 0 and a.error for a in d.attempts) for d in log.deliveries)
    assert len(log.deliveries[0].attempts) >= 2  # retried for webhook_retry_for_s; those queued behind it less
    assert [d.event_type for d in log.deliveries][0] == "job.accepted"
    assert len(stored["deliveries"]) == len(log.deliveries)


def test_bad_webhook_urls_and_a_server_without_a_secret_are_refused_at_submit(tmp_path):
    with pytest.raises(FluxloraClientError) as bad, submitted(tmp_path, ["ftp://example.com/x"]):
        pass
    assert bad.value.code == "INVALID_ARGUMENT" and "ftp://example.com/x" in bad.value.message
    with pytest.raises(FluxloraClientError) as unsigned, submitted(tmp_path / "2", ["http://127.0.0.1:1/x"],
                                                                  webhook_secret=""):
        pass
    assert unsigned.value.code == "FAILED_PRECONDITION"
    assert "FLUXLORA_WEBHOOK_SECRET" in unsigned.value.message


def test_metadata_addresses_and_hosts_outside_the_allowed_list_are_refused_at_submit(tmp_path):
    with pytest.raises(FluxloraClientError) as metadata, submitted(tmp_path, ["http://169.254.169.254/latest/"]):
        pass
    assert metadata.value.code == "INVALID_ARGUMENT"
    assert "http://169.254.169.254/latest/" in metadata.value.message
    assert "FLUXLORA_WEBHOOK_ALLOWED_HOSTS" in metadata.value.message
    with pytest.raises(FluxloraClientError) as outside, submitted(tmp_path / "2", ["http://127.0.0.1:1/x"],
                                                                 webhook_allowed_hosts=["*.example.com"]):
        pass
    assert outside.value.code == "INVALID_ARGUMENT" and "*.example.com" in outside.value.message


def test_a_name_rebound_to_the_metadata_address_after_submit_gets_nothing(tmp_path, monkeypatch):
    from fluxlora.jobs import webhook_targets

    resolve = webhook_targets.socket.getaddrinfo
    asked: list[str] = []

    def rebound(host, *args, **kwargs):  # the allowed name points at the metadata service by delivery time
        if kwargs.get("flags", 0) & webhook_targets.socket.AI_NUMERICHOST:  # "is it an address?": no
            return resolve(host, *args, **kwargs)
        asked.append(host)
        return resolve("169.254.169.254" if host == "hooks.example.com" else host, *args, **kwargs)

    monkeypatch.setattr(webhook_targets.socket, "getaddrinfo", rebound)
    with submitted(tmp_path, ["http://hooks.example.com/hook"], webhook_allowed_hosts=["hooks.example.com"]) as (
            server, job, jobs):
        assert wait_job(server, job.job_id).state == S.JOB_STATE_SUCCEEDED
        wait_until(server.webhooks.idle, "webhooks given up", timeout=30.0)
        log = jobs.ListWebhookDeliveries(jobs_pb2.ListWebhookDeliveriesRequest(job_id=job.job_id), timeout=10)
    assert "hooks.example.com" in asked
    assert log.deliveries and all(d.status == "failed" and len(d.attempts) == 1 for d in log.deliveries)
    assert "169.254.169.254" in log.deliveries[0].attempts[0].error
