"""A job's webhook delivery log in the store, `jobs/webhooks/<service>/<job_id>.json` (every event,
its URL and every attempt with its status code), read by JobService.ListWebhookDeliveries."""

from __future__ import annotations

import urllib.parse

from google.protobuf import json_format

from fluxlora.common.storage import ArtifactStore
from fluxlora_api.shared.errors import NotFound
from fluxlora_api.v1 import jobs_pb2


def log_key(service: str, job_id: str) -> str:
    return f"jobs/webhooks/{service}/{job_id}.json"


def stored_deliveries(store: ArtifactStore, service: str, job_id: str) -> jobs_pb2.ListWebhookDeliveriesResponse:
    """A job's stored delivery log (empty when none of its events had webhooks)."""
    try:
        data = store.get_bytes(log_key(service, job_id))
    except (NotFound, FileNotFoundError):
        return jobs_pb2.ListWebhookDeliveriesResponse()
    return json_format.Parse(data, jobs_pb2.ListWebhookDeliveriesResponse())


def safe_url(url: str) -> str:
    """A URL for logs: scheme, host and path, never its query (which may hold a token)."""
    parts = urllib.parse.urlsplit(url)
    return f"{parts.scheme}://{parts.hostname}{':' + str(parts.port) if parts.port else ''}{parts.path}"
