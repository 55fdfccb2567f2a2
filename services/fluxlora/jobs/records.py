"""Job records persisted in the artifact store, and the small index objects that let a server answer
for every job it ever ran while it holds only its unfinished and recently finished ones in memory:

    jobs/<service>/<job_id>.json                       the record: the Job proto as JSON (the truth)
    jobs/active/<service>/<job_id>                      empty; there while the job is unfinished, so a
                                                        restart re-queues it without reading finished records
    jobs/index/<service>/<newest-first key>-<job_id>    empty; ListJobs pages through these names in key order
    jobs/requests/<service>/<sha256(request_id)>.json   {"request_id", "job_id"}: submits stay idempotent
                                                        for jobs no longer in memory

A submit writes the request claim (create-only), the active marker, the index entry and then the record:
the record is the commit point. A submit that fails or crashes before it leaves only objects that point
at no record, which a later start (repair, the replicas' scan) removes and the next submit of the same
request_id takes over (a claim whose record is missing).
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from collections.abc import Callable, Iterator

from google.protobuf import json_format
from google.protobuf.message import Message

from fluxlora.common.storage import ArtifactStore
from fluxlora_api.shared.errors import NotFound
from fluxlora_api.v1 import jobs_pb2

log = logging.getLogger(__name__)

S = jobs_pb2.JobState
TERMINAL = frozenset({S.JOB_STATE_SUCCEEDED, S.JOB_STATE_FAILED, S.JOB_STATE_CANCELLED})
# Index names start with (NEWEST - created_at in ns) in 19 digits: ascending key order, which is the
# only order a store lists in, is newest first.
NEWEST = 10**19 - 1
INDEX_NAME = re.compile(r"^\d{19}-[A-Za-z0-9][A-Za-z0-9_.-]*$")


def mark_finished(job: jobs_pb2.Job, state: int, error: tuple[str, str] | None = None,
                  result: Message | None = None) -> None:
    """Puts a job record in a terminal state, with its error or typed result."""
    job.state = jobs_pb2.JobState.ValueType(state)
    job.finished_at.GetCurrentTime()
    if error:
        job.error.code, job.error.message = error
    if result is not None:
        job.result.Pack(result)


def index_name(job: jobs_pb2.Job) -> str:
    """The job's name in the listing index: sorts newest first, ties by job id."""
    return f"{NEWEST - job.created_at.ToNanoseconds():019d}-{job.job_id}"


def job_id_of(name: str) -> str:
    return name.partition("-")[2]


class JobRecords:
    def __init__(self, store: ArtifactStore, service: str):
        self.store = store
        self.service = service
        self.prefix = f"jobs/{service}/"
        self.active_prefix = f"jobs/active/{service}/"
        self.index_prefix = f"jobs/index/{service}/"
        self.requests_prefix = f"jobs/requests/{service}/"

    # --- records -------------------------------------------------------------------------------
    def key(self, job_id: str) -> str:
        return f"{self.prefix}{job_id}.json"

    def save(self, job: jobs_pb2.Job) -> None:
        self.store.put_bytes(self.key(job.job_id), json_format.MessageToJson(job).encode(), "application/json")

    def load(self, job_id: str) -> jobs_pb2.Job | None:
        """One record; None when there is none (or it cannot be read)."""
        try:
            data = self.store.get_bytes(self.key(job_id))
        except NotFound:
            return None
        try:
            return json_format.Parse(data, jobs_pb2.Job())
        except json_format.ParseError:
            log.exception("skipping unreadable job record %s", self.key(job_id))
            return None

    def recorded_ids(self) -> set[str]:
        """Ids of every stored record, from the listing alone (no record is read)."""
        return {info.key[len(self.prefix):-len(".json")] for info in self.store.list(self.prefix)
                if info.key.endswith(".json") and "/" not in info.key[len(self.prefix):]}

    # --- unfinished jobs -------------------------------------------------------------------------
    def mark_active(self, job_id: str) -> None:
        self.store.put_bytes(self.active_prefix + job_id, b"")

    def clear_active(self, job_id: str) -> None:
        self.store.delete(self.active_prefix + job_id)

    def load_active(self) -> Iterator[jobs_pb2.Job]:
        """The records of unfinished jobs; markers left by a crash (no record, or a finished one) go."""
        for info in list(self.store.list(self.active_prefix)):
            job_id = info.key[len(self.active_prefix):]
            job = self.load(job_id)
            if job is None or job.state in TERMINAL:
                self.store.delete(info.key)
                continue
            yield job

    # --- the listing index -----------------------------------------------------------------------
    def add_to_index(self, job: jobs_pb2.Job) -> None:
        self.store.put_bytes(self.index_prefix + index_name(job), b"")

    def indexed_ids(self) -> set[str]:
        return {job_id_of(info.key[len(self.index_prefix):]) for info in self.store.list(self.index_prefix)}

    def index_after(self, after: str) -> Iterator[str]:
        """Index names after `after` (all when empty), newest first."""
        for info in self.store.list(self.index_prefix):
            name = info.key[len(self.index_prefix):]
            if name > after and INDEX_NAME.match(name):
                yield name

    def repair(self, in_flight: Callable[[str], bool] = lambda job_id: False) -> int:
        """Indexes records that have no index entry (a store written before the index existed), reading
        only those records, one at a time, and drops index entries of submits that never stored their
        record (unless `in_flight` says another replica may still be storing it). Returns how many
        records were indexed."""
        recorded = self.recorded_ids()
        for info in list(self.store.list(self.index_prefix)):
            job_id = job_id_of(info.key[len(self.index_prefix):])
            if job_id not in recorded and not in_flight(job_id):
                self.store.delete(info.key)
        missing = sorted(recorded - self.indexed_ids())
        del recorded
        for job_id in missing:
            job = self.load(job_id)
            if job is None:
                continue
            if job.state not in TERMINAL:
                self.mark_active(job_id)
            if job.request_id:
                self.claim(job.request_id, job_id)
            self.add_to_index(job)  # last: a crash before it repeats this job's repair next time
        if missing:
            log.info("indexed %d %s job records written before the job index existed", len(missing), self.service)
        return len(missing)

    # --- request_id claims ----------------------------------------------------------------------
    def _claim_key(self, request_id: str) -> str:
        return f"{self.requests_prefix}{hashlib.sha256(request_id.encode()).hexdigest()}.json"

    @staticmethod
    def _claim_bytes(request_id: str, job_id: str) -> bytes:
        return json.dumps({"request_id": request_id, "job_id": job_id}, sort_keys=True).encode()

    def claimed(self, request_id: str) -> str | None:
        """The job id a request_id was claimed for, or None."""
        try:
            return str(self.store.get_json(self._claim_key(request_id))["job_id"])
        except NotFound:
            return None

    def claim(self, request_id: str, job_id: str, replace: bool = False) -> bool:
        """Claims a request_id for a job; False when it is claimed already (replace: overwrite a
        claim whose job was never stored)."""
        data = self._claim_bytes(request_id, job_id)
        if replace:
            self.store.put_bytes(self._claim_key(request_id), data, "application/json")
            return True
        return self.store.create_bytes(self._claim_key(request_id), data, "application/json")
