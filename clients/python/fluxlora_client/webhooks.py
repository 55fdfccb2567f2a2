"""For programs that receive fluxlora's job webhooks (Standard Webhooks, the `standardwebhooks` package).

    from fluxlora_client import webhooks

    def handle(request):                       # any web framework: the raw body and the headers
        try:
            event = webhooks.verify(request.body, request.headers, secret="whsec_...")
        except webhooks.WebhookVerificationError:
            return 400
        if already_seen(event.id):             # at least once: the same id may come again
            return 204
        print(event.type, event.job.job_id, event.job.state, event.job.progress.done)
        return 204

The secret is the server's FLUXLORA_WEBHOOK_SECRET. `verify` checks the signature over the exact
bytes received and that the timestamp is within five minutes; a tampered body, a wrong secret or an
old replay raise WebhookVerificationError. `deliveries(client, job_id)` reads a job's delivery log.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from google.protobuf import json_format
from standardwebhooks import Webhook, WebhookVerificationError

from fluxlora_api.v1 import jobs_pb2

__all__ = ["WebhookEvent", "WebhookVerificationError", "deliveries", "verify"]


@dataclass(frozen=True)
class WebhookEvent:
    id: str  # the webhook-id header: deduplicate on it
    type: str  # "job.accepted", "job.started", "job.progress", "job.checkpoint", "job.artifact", "job.succeeded"...
    timestamp: str
    event: jobs_pb2.JobEvent  # the same message WatchJob streams

    @property
    def job(self) -> jobs_pb2.Job:
        return self.event.job


def verify(body: bytes | str, headers: Mapping[str, str], secret: str) -> WebhookEvent:
    """The event of a webhook request whose signature is valid; WebhookVerificationError otherwise."""
    payload: Any = Webhook(secret).verify(body, dict(headers))
    if not isinstance(payload, dict) or "data" not in payload:
        raise WebhookVerificationError("not a fluxlora webhook payload")
    event = json_format.Parse(json.dumps(payload["data"]), jobs_pb2.JobEvent(), ignore_unknown_fields=True)
    lowered = {k.lower(): v for k, v in headers.items()}
    return WebhookEvent(lowered["webhook-id"], str(payload.get("type", "")), str(payload.get("timestamp", "")),
                        event)


def deliveries(client: Any, job_id: str) -> jobs_pb2.ListWebhookDeliveriesResponse:
    """The delivery log of a job's webhooks: every event, its URL, status and attempts."""
    request = jobs_pb2.ListWebhookDeliveriesRequest(job_id=job_id)
    return client._call(client._jobs(job_id).ListWebhookDeliveries, request)
