"""The webhook events of a job not yet delivered, in the store, so the next server generation delivers
them after a stop or a SIGKILL (fluxlora.jobs.webhooks), or, with replicas, the one that takes the
job's lease over.

One object per job with undelivered events, `jobs/webhooks/<service>/outbox/<job_id>.json`: the
events in the order they happened, each with its id, URL, signed body and wall-clock time (the retry
time counts from it across restarts). It is rewritten as events come and go and deleted once empty;
an event leaves it only after its delivery or its giving up, so one killed mid-delivery is sent again
with the same id (at least once; receivers deduplicate on webhook-id).
"""

from __future__ import annotations

import json
import logging
from typing import Any

from fluxlora.common.storage import ArtifactStore
from fluxlora_api.shared.errors import NotFound

log = logging.getLogger(__name__)


def outbox_prefix(service: str) -> str:
    return f"jobs/webhooks/{service}/outbox/"


def outbox_key(service: str, job_id: str) -> str:
    return f"{outbox_prefix(service)}{job_id}.json"


def save(store: ArtifactStore, service: str, job_id: str, entries: list[dict[str, Any]]) -> None:
    key = outbox_key(service, job_id)
    if entries:
        store.put_bytes(key, json.dumps({"events": entries}).encode(), "application/json")
        return
    try:
        store.delete(key)
    except (NotFound, FileNotFoundError):
        pass


def jobs(store: ArtifactStore, service: str) -> list[str]:
    """The jobs with undelivered events."""
    prefix = outbox_prefix(service)
    return sorted(info.key[len(prefix):].removesuffix(".json") for info in store.list(prefix)
                  if info.key.endswith(".json") and "/" not in info.key[len(prefix):])


def load_job(store: ArtifactStore, service: str, job_id: str) -> list[dict[str, Any]]:
    """The job's undelivered events, oldest first; none when it has no outbox. An unreadable object
    is skipped (and logged): its events are lost rather than the job's newer ones held up."""
    key = outbox_key(service, job_id)
    try:
        return list(json.loads(store.get_bytes(key))["events"])
    except (NotFound, FileNotFoundError):
        return []
    except (ValueError, KeyError, TypeError) as exc:
        log.warning("webhook outbox %s unreadable (%s): its events are not delivered", key, exc)
        return []
