"""Job events as Standard Webhooks (https://www.standardwebhooks.com, the `standardwebhooks` package).

A job names URLs (Submit*Request.webhook_urls) and the server may add its own (FLUXLORA_WEBHOOK_URLS);
they are stored in the job's record. Each of the job's events worth telling (accepted, started,
progress at most every FLUXLORA_WEBHOOK_PROGRESS_INTERVAL_S, checkpoint and artifact writes, the
terminal state) is POSTed to each URL as JSON, `{"type", "timestamp", "data"}` with `data` the
WatchJob event as protobuf JSON, signed with FLUXLORA_WEBHOOK_SECRET (`webhook-id`,
`webhook-timestamp`, `webhook-signature` headers; receivers check them with
`fluxlora_client.webhooks.verify`).

- At least once: an event is retried (exponential backoff with full jitter, capped at
  FLUXLORA_WEBHOOK_RETRY_MAX_S) until a 2xx answer or FLUXLORA_WEBHOOK_RETRY_FOR_S after the event;
  every attempt carries the same `webhook-id`, so receivers deduplicate on it.
- In order per job and URL: the next event waits for the one before it to be delivered or given up.
- Never in the job's way: the runtime only enqueues (under its lock); delivery threads of their own
  do the HTTP, and nothing they meet (a slow, failing or missing receiver) reaches the job.
- Across restarts: undelivered events are kept in the store (fluxlora.jobs.webhook_outbox) and the
  next server generation delivers them first, with their ids, before the job's newer events.
- One sender per job: only the replica holding the job's lease delivers its events (and keeps the
  lease while any of them waits, finished job or not); a replica taking the lease over, from a
  dead owner or for a finished job's leftover outbox, takes the outbox with it (`take_over`), and
  an owner that loses the lease stops sending (`drop`). fluxlora.jobs.replica_outbox decides.
- Only where allowed (fluxlora.jobs.webhook_targets): http(s), never link-local or cloud-metadata
  addresses, FLUXLORA_WEBHOOK_ALLOWED_HOSTS when set; checked at submit and on the addresses resolved
  at each delivery, which is what the connection then goes to.
- A delivery log per job (every attempt and its status code) in memory and in the store
  (`jobs/webhooks/<service>/<job_id>.json`), read by JobService.ListWebhookDeliveries. A thread of its
  own writes the log and the outbox, so a slow store holds up neither the job nor the deliveries.
"""

from __future__ import annotations

import collections
import json
import logging
import random
import threading
import time
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from google.protobuf import json_format
from standardwebhooks import Webhook

from fluxlora.common import metrics
from fluxlora.common.config import Settings
from fluxlora.common.storage import ArtifactStore
from fluxlora.jobs import webhook_http, webhook_outbox
from fluxlora.jobs.webhook_config import secret_of, targets_of, webhook_urls
from fluxlora.jobs.webhook_log import log_key, safe_url, stored_deliveries
from fluxlora.jobs.webhook_targets import Refused
from fluxlora_api.v1 import jobs_pb2

log = logging.getLogger(__name__)
__all__ = ["WebhookDispatcher", "log_key", "secret_of", "stored_deliveries", "targets_of", "webhook_urls"]

S = jobs_pb2.JobState
TERMINAL = frozenset({S.JOB_STATE_SUCCEEDED, S.JOB_STATE_FAILED, S.JOB_STATE_CANCELLED})
DELIVERIES_KEPT = 500  # per job
JOBS_KEPT = 1000  # jobs whose delivery log stays in memory once every delivery of theirs is over
TERMINAL_TYPES = frozenset({"job.succeeded", "job.failed", "job.cancelled"})
CHECKPOINT_KINDS = frozenset({"lora", "lora-kohya", "checkpoint-state"})


@dataclass
class _Delivery:
    record: jobs_pb2.WebhookDelivery
    body: bytes
    created: float  # time.monotonic() of the event
    job_id: str
    timestamp: datetime = field(default_factory=lambda: datetime.now(UTC))  # of the event, kept across restarts
    dropped: bool = False  # the job's lease went to another replica: it sends this event now

    def outbox_entry(self) -> dict[str, Any]:
        record = self.record
        return {"event_id": record.event_id, "event_type": record.event_type, "url": record.url,
                "sequence": record.sequence, "timestamp": self.timestamp.timestamp(), "body": self.body.decode()}


class WebhookDispatcher:
    """A JobRuntime event listener that delivers the job's events to its webhook URLs."""

    def __init__(self, service: str, store: ArtifactStore, settings: Settings):
        self.service = service
        self.store = store
        self.signer = Webhook(secret_of(settings)) if secret_of(settings) else None
        self.timeout_s = settings.webhook_timeout_s
        self.retry_for_s = settings.webhook_retry_for_s
        self.base_s = settings.webhook_retry_base_s
        self.max_s = settings.webhook_retry_max_s
        self.progress_every_s = settings.webhook_progress_interval_s
        self.targets = targets_of(settings)  # a bad FLUXLORA_WEBHOOK_ALLOWED_HOSTS stops the start here
        self._lock = threading.Condition()
        self._streams: dict[tuple[str, str], collections.deque[_Delivery]] = {}
        self._ready: collections.deque[tuple[str, str]] = collections.deque()
        self._busy: set[tuple[str, str]] = set()
        self._log: collections.OrderedDict[str, collections.deque[jobs_pb2.WebhookDelivery]] = \
            collections.OrderedDict()
        self._state: dict[str, int] = {}  # unfinished job -> its last state seen
        self._progress_at: dict[str, float] = {}
        self._finished: collections.OrderedDict[str, None] = collections.OrderedDict()
        self._dirty: set[str] = set()  # jobs whose log and outbox the store has not seen yet
        self._outboxed: set[str] = set()  # jobs with an outbox in the store (to delete once empty)
        self._stopping = threading.Event()
        self._closed = False  # the saver's last round: set once the delivery threads are gone
        self._threads = [threading.Thread(target=self._work, name=f"{service}-webhooks-{i}", daemon=True)
                         for i in range(max(1, settings.webhook_workers))]
        self._saver = threading.Thread(target=self._save_loop, name=f"{service}-webhooks-store", daemon=True)
        for thread in [*self._threads, self._saver]:
            thread.start()

    # --- which jobs' events this replica sends (fluxlora.jobs.replicas decides) ----------------------
    def stored_jobs(self) -> list[str]:
        """The jobs with undelivered events in the store."""
        return webhook_outbox.jobs(self.store, self.service)

    def take_over(self, job_id: str) -> None:
        """This replica now holds the job's lease: the job's undelivered events from the store are queued
        before any newer event of it (the runtime emits those only after this), so they still go out
        in order, with their ids."""
        try:
            entries = webhook_outbox.load_job(self.store, self.service, job_id)
        except Exception as exc:  # noqa: BLE001 - a store outage at a takeover costs these events, not the job
            log.warning("job %s: webhook outbox not read (%s): its earlier undelivered events are not sent",
                        job_id, type(exc).__name__)
            return
        if not entries:
            return
        try:
            held = {d.event_id: d for d in stored_deliveries(self.store, self.service, job_id).deliveries}
        except Exception as exc:  # noqa: BLE001 - the log's history is lost, the events are not
            log.warning("job %s: webhook delivery log not read (%s)", job_id, type(exc).__name__)
            held = {}
        now, wall = time.monotonic(), time.time()
        with self._lock:
            self._outboxed.add(job_id)
            log_ = self._deliveries(job_id)
            log_.clear()
            log_.extend(held.values())
            taken: dict[tuple[str, str], list[_Delivery]] = {}
            for entry in entries:
                record = held.get(entry["event_id"])
                if record is None:  # killed between the outbox's write and the log's
                    record = jobs_pb2.WebhookDelivery(event_id=entry["event_id"], event_type=entry["event_type"],
                                                      url=entry["url"], sequence=int(entry["sequence"]))
                    log_.append(record)
                record.status = "pending"
                if entry["event_type"] in TERMINAL_TYPES:  # told already: the new runtime's view is no news
                    self._finished[job_id] = None
                taken.setdefault((job_id, record.url), []).append(_Delivery(
                    record, entry["body"].encode(), now - max(0.0, wall - entry["timestamp"]), job_id,
                    datetime.fromtimestamp(entry["timestamp"], UTC)))
            for key, deliveries in taken.items():
                stream = self._streams.setdefault(key, collections.deque())
                stream.extendleft(reversed(deliveries))
                if key not in self._busy and key not in self._ready:
                    self._ready.append(key)
            self._queue_size()
            self._lock.notify_all()
        log.info("job %s: %d undelivered webhook events taken over", job_id, len(entries))

    def drop(self, job_id: str) -> None:
        """Another replica took the job's lease: it sends the job's events from now on (from the
        outbox as it was stored); an attempt under way here ends with this one, unrecorded."""
        with self._lock:
            for key in [k for k in self._streams if k[0] == job_id]:
                for delivery in self._streams.pop(key):
                    delivery.dropped = True
                if key in self._ready:
                    self._ready.remove(key)
            self._log.pop(job_id, None)
            self._dirty.discard(job_id)
            self._outboxed.discard(job_id)
            self._queue_size()
            self._lock.notify_all()

    def holds(self, job_id: str) -> bool:
        """Whether events of the job wait here for delivery or for the store (the outbox or the log):
        the replica keeps the job's lease until they are done, so no other replica sends them too."""
        with self._lock:
            return (job_id in self._dirty or job_id in self._outboxed
                    or any(k[0] == job_id for k in [*self._streams, *self._busy]))

    def _queue_size(self) -> None:
        metrics.WEBHOOK_QUEUE.labels(self.service).set(sum(len(q) for q in self._streams.values()))

    # --- the runtime's listener: classify and enqueue, nothing slow --------------------------------
    def __call__(self, event: jobs_pb2.JobEvent) -> None:
        job = event.job
        if not job.webhook_urls or self.signer is None:
            return
        with self._lock:
            kind = self._kind(event)
            if kind is None:
                return
        data = json.loads(json_format.MessageToJson(event))
        now = time.monotonic()
        with self._lock:
            for url in job.webhook_urls:
                record = jobs_pb2.WebhookDelivery(event_id=f"msg_{uuid.uuid4().hex}", event_type=kind, url=url,
                                                  sequence=event.sequence, status="pending")
                delivery = _Delivery(record, b"", now, job.job_id)
                delivery.body = json.dumps({"type": kind, "timestamp": delivery.timestamp.isoformat(),
                                            "data": data}, separators=(",", ":")).encode()
                key = (job.job_id, url)
                self._streams.setdefault(key, collections.deque()).append(delivery)
                self._deliveries(job.job_id).append(record)
                if key not in self._busy and key not in self._ready:
                    self._ready.append(key)
            self._dirty.add(job.job_id)
            self._queue_size()
            self._lock.notify_all()

    def _kind(self, event: jobs_pb2.JobEvent) -> str | None:
        job = event.job
        before = self._state.get(job.job_id, S.JOB_STATE_UNSPECIFIED)
        if job.state in TERMINAL:
            self._state.pop(job.job_id, None)
            self._progress_at.pop(job.job_id, None)
            if job.job_id in self._finished:  # a later change of a finished job is no news
                return None
            self._finished[job.job_id] = None
            while len(self._finished) > JOBS_KEPT:
                self._finished.popitem(last=False)
            return "job." + S.Name(S.ValueType(job.state)).removeprefix("JOB_STATE_").lower()
        self._state[job.job_id] = job.state
        if job.state == S.JOB_STATE_QUEUED and event.message == "queued" and not job.attempts:
            return "job.accepted"
        if job.state == S.JOB_STATE_RUNNING and before != S.JOB_STATE_RUNNING:
            return "job.started"
        if event.message.startswith("wrote "):
            written = set(event.message[len("wrote "):].split(", "))
            kinds = {a.kind for a in job.artifacts if a.key in written}
            return "job.checkpoint" if kinds & CHECKPOINT_KINDS else "job.artifact"
        if job.state == S.JOB_STATE_RUNNING and job.progress.stage:
            now = time.monotonic()
            if now - self._progress_at.get(job.job_id, 0.0) >= self.progress_every_s:
                self._progress_at[job.job_id] = now
                return "job.progress"
        return None

    def _deliveries(self, job_id: str) -> collections.deque[jobs_pb2.WebhookDelivery]:
        log_ = self._log.get(job_id)
        if log_ is None:
            log_ = self._log[job_id] = collections.deque(maxlen=DELIVERIES_KEPT)
            while len(self._log) > JOBS_KEPT:
                oldest = next(iter(self._log))
                if any(k[0] == oldest for k in self._streams):
                    break
                del self._log[oldest]
        self._log.move_to_end(job_id)
        return log_

    # --- the delivery threads ----------------------------------------------------------------------
    def _work(self) -> None:
        while True:
            with self._lock:
                while not self._ready and not self._stopping.is_set():
                    self._lock.wait()
                if self._stopping.is_set():
                    return
                key = self._ready.popleft()
                self._busy.add(key)
            try:
                while not self._stopping.is_set():
                    with self._lock:
                        stream = self._streams.get(key)
                        if not stream:
                            self._streams.pop(key, None)
                            break
                        delivery = stream[0]
                    self._deliver(delivery)
                    with self._lock:
                        if delivery.record.status == "pending":  # stopping: the next generation sends it
                            break
                        stream.popleft()
                        self._queue_size()
            except Exception:  # noqa: BLE001 - a delivery thread outlives any surprise
                log.exception("webhook delivery to %s failed", safe_url(key[1]))
            finally:
                with self._lock:
                    self._busy.discard(key)
                    if self._streams.get(key) and not self._stopping.is_set():
                        self._ready.append(key)
                        self._lock.notify()

    def _deliver(self, delivery: _Delivery) -> None:
        """Tries until a 2xx answer or the retry time is spent; every attempt in the record."""
        record, retry = delivery.record, 0
        while not self._stopping.is_set() and not delivery.dropped:
            attempt = jobs_pb2.WebhookAttempt()
            attempt.time.GetCurrentTime()
            started = time.monotonic()
            refused = False
            try:
                attempt.status_code, attempt.error = self._post(delivery)
            except Refused as exc:  # where the name points now is not allowed: no retry changes that
                attempt.error, refused = f"refused: {exc}"[:200], True
            attempt.duration_seconds = time.monotonic() - started
            ok = 200 <= attempt.status_code < 300
            metrics.WEBHOOK_ATTEMPTS.labels(self.service, "delivered" if ok else "refused" if refused else (
                f"http_{attempt.status_code // 100}xx" if attempt.status_code else "no_answer")).inc()
            delay = random.random() * min(self.max_s, self.base_s * 2 ** min(retry, 30))
            with self._lock:
                if delivery.dropped:
                    return
                record.attempts.append(attempt)
                if ok:
                    record.status = "delivered"
                elif refused or time.monotonic() + delay - delivery.created > self.retry_for_s:
                    record.status = "failed"
                    metrics.WEBHOOK_GIVEN_UP.labels(self.service).inc()
                    log.warning("webhook %s of job %s not delivered to %s after %d attempts over %.0fs (last: %s)",
                                record.event_type, delivery.job_id, safe_url(record.url), len(record.attempts),
                                time.monotonic() - delivery.created,
                                attempt.error or f"HTTP {attempt.status_code}")
                self._dirty.add(delivery.job_id)
                self._lock.notify_all()
            if record.status != "pending":
                return
            retry += 1
            self._stopping.wait(delay)

    def _post(self, delivery: _Delivery) -> tuple[int, str]:
        """One POST, signed at the attempt's time: receivers refuse timestamps over five minutes old,
        and retries last an hour."""
        assert self.signer is not None
        record, now = delivery.record, datetime.now(UTC)
        headers = {"content-type": "application/json", "user-agent": "fluxlora-webhooks/1",
                   "webhook-id": record.event_id, "webhook-timestamp": str(int(now.timestamp())),
                   "webhook-signature": self.signer.sign(record.event_id, now, delivery.body)}
        return webhook_http.post(record.url, delivery.body, headers, self.targets, self.timeout_s)

    # --- the store: one thread writes every job's log and outbox ---------------------------------------
    def _save_loop(self) -> None:
        while True:
            with self._lock:
                while not self._dirty and not self._closed:
                    self._lock.wait()
                if not self._dirty:
                    return
                jobs, self._dirty = list(self._dirty), set()
            for job_id in jobs:
                self._save(job_id)

    def _save(self, job_id: str) -> None:
        """The job's outbox, then its delivery log, into the store; a store error is retried with the
        job's next change (the copy in memory goes on)."""
        with self._lock:
            if job_id not in self._log:  # dropped: another replica sends the job's events now
                return
            entries = [d.outbox_entry() for (job, _), stream in self._streams.items() if job == job_id
                       for d in stream if d.record.status == "pending"]
            response = jobs_pb2.ListWebhookDeliveriesResponse(deliveries=list(self._log.get(job_id, ())))
            outboxed = job_id in self._outboxed
        try:
            if entries or outboxed:
                webhook_outbox.save(self.store, self.service, job_id, entries)
                with self._lock:
                    if entries and job_id in self._log:
                        self._outboxed.add(job_id)
                    elif not entries:
                        self._outboxed.discard(job_id)
            self.store.put_bytes(log_key(self.service, job_id), json_format.MessageToJson(response).encode(),
                                 "application/json")
        except Exception as exc:  # noqa: BLE001
            log.warning("job %s: webhook delivery log not stored (%s)", job_id, type(exc).__name__)
            with self._lock:
                if not self._closed:  # at stop, one try: a dead store must not hold the shutdown
                    self._dirty.add(job_id)
            self._stopping.wait(1.0)

    # --- reading the log ---------------------------------------------------------------------------
    def deliveries(self, job_id: str) -> jobs_pb2.ListWebhookDeliveriesResponse:
        with self._lock:
            held = self._log.get(job_id)
            if held is not None:
                return jobs_pb2.ListWebhookDeliveriesResponse(deliveries=list(held))
        return stored_deliveries(self.store, self.service, job_id)

    def idle(self) -> bool:
        """True when no event waits for delivery and the store has the last of it."""
        with self._lock:
            return not self._streams and not self._busy and not self._dirty

    def stop(self) -> None:
        """Ends the deliveries after their current attempt and stores what is left for the next start."""
        self._stopping.set()
        with self._lock:
            self._lock.notify_all()
        for thread in self._threads:
            thread.join(self.timeout_s + 1)
        with self._lock:
            self._closed = True
            self._lock.notify_all()
        self._saver.join(self.timeout_s + 5)
