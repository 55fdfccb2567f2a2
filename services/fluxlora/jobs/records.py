"""Job records persisted in the artifact store as JSON (jobs/<service>/<job_id>.json), so a
restarted server finds its jobs again. The record is the Job proto itself."""

from __future__ import annotations

import logging

from google.protobuf import json_format
from google.protobuf.message import Message

from fluxlora.common.storage import ArtifactStore
from fluxlora_api.v1 import jobs_pb2

log = logging.getLogger(__name__)


def mark_finished(job: jobs_pb2.Job, state: int, error: tuple[str, str] | None = None,
                  result: Message | None = None) -> None:
    """Puts a job record in a terminal state, with its error or typed result."""
    job.state = state
    job.finished_at.GetCurrentTime()
    if error:
        job.error.code, job.error.message = error
    if result is not None:
        job.result.Pack(result)


class JobRecords:
    def __init__(self, store: ArtifactStore, service: str):
        self.store = store
        self.prefix = f"jobs/{service}/"

    def key(self, job_id: str) -> str:
        return f"{self.prefix}{job_id}.json"

    def save(self, job: jobs_pb2.Job) -> None:
        self.store.put_bytes(self.key(job.job_id), json_format.MessageToJson(job).encode(), "application/json")

    def load_all(self) -> list[jobs_pb2.Job]:
        jobs = []
        for info in self.store.list(self.prefix):
            if not info.key.endswith(".json"):
                continue
            try:
                jobs.append(json_format.Parse(self.store.get_bytes(info.key), jobs_pb2.Job()))
            except json_format.ParseError:
                log.exception("skipping unreadable job record %s", info.key)
        return jobs
