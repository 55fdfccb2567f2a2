"""The checks after the faults stop and the system settles. Each returns its violations as
human-readable examples; the run reports the count and the first few of each."""

from __future__ import annotations

import hashlib
import socket
from collections import Counter

from google.protobuf import json_format

from fluxlora_api.v1 import jobs_pb2

S = jobs_pb2.JobState
TERMINAL = (S.JOB_STATE_SUCCEEDED, S.JOB_STATE_FAILED, S.JOB_STATE_CANCELLED)

INVARIANTS = {
    "one_job_per_request_id": "every accepted request_id has exactly one job (client answers and stored records)",
    "every_job_terminal": "every accepted job is terminal after the settle wait (GetJob and its stored record)",
    "terminal_is_final": "a job once seen terminal (by GetJob or a watcher) never changes state again",
    "watchers_saw_terminal": "every watcher (the SDK's watch) saw the job's terminal state",
    "artifacts_complete": "every object a record references is stored with the sha256 it names (and dataset "
                          "manifests match their images)",
    "failures_deliberate": "a failed job names a status code (not UNKNOWN/empty) and a message; a refused "
                           "call is never INTERNAL/UNKNOWN (an unexpected error in the servicer)",
    "hostile_refused": "a hostile request is refused with a deliberate status (never accepted, INTERNAL or "
                       "UNKNOWN; a reused request_id with another spec is refused, not answered with the first job)",
    "no_crash": "no server process exits unless a fault or the shutdown stopped it",
    "no_orphans": "no worker outlives its killed server by more than the grace; nothing is left after shutdown; "
                  "servers stop on SIGTERM",
    "ports_not_shared": "no port has two server processes listening at once (generations never share one)",
    "ports_released": "every server port is free after the shutdown",
    "memory_bounded": "no server process (or worker) exceeds the RSS bound",
}

# Invariants the product does not guarantee yet, with why: their violations are reported but fail a
# run (or the test) only with --strict. Each names an open bug the chaos run found (issue 12's note).
EXPECTED_FAILURES: dict[str, str] = {}


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def stored_records(store, services) -> dict[str, jobs_pb2.Job]:
    records = {}
    for service in services:
        for info in store.list(f"jobs/{service}/"):
            if info.key.count("/") != 2 or not info.key.endswith(".json"):
                continue
            job = json_format.Parse(store.get_bytes(info.key), jobs_pb2.Job(), ignore_unknown_fields=True)
            records[job.job_id] = job
    return records


def check_requests(record, records) -> list[str]:
    bad = []
    for (service, request_id), ids in record.answers.items():
        if len(set(ids)) != 1:
            bad.append(f"{service} {request_id}: answered with {sorted(set(ids))}")
    by_request = Counter((job.service, job.request_id) for job in records.values() if job.request_id)
    for (service, request_id), _ in record.answers.items():
        if by_request[(service, request_id)] != 1:
            bad.append(f"{service} {request_id}: {by_request[(service, request_id)]} stored records")
    return bad


def check_terminal(record, records, final: dict[str, jobs_pb2.Job | None]) -> list[str]:
    bad = []
    for job_id in record.jobs:
        got = final.get(job_id)
        stored = records.get(job_id)
        if got is None or got.state not in TERMINAL:
            bad.append(f"{job_id}: GetJob says {S.Name(got.state) if got else 'nothing'}")
        elif stored is None or stored.state != got.state:
            bad.append(f"{job_id}: stored record says {S.Name(stored.state) if stored else 'nothing'}, "
                       f"GetJob {S.Name(got.state)}")
    return bad


def check_watchers(record, final) -> list[str]:
    bad = []
    for job_id, watch in record.watches.items():
        got = final.get(job_id)
        last = watch.states[-1] if watch.states else None
        if not watch.done:
            bad.append(f"{job_id}: watcher still waiting ({len(watch.states)} events)")
        elif watch.error:
            bad.append(f"{job_id}: watcher ended with {watch.error}")
        elif got is None or last != got.state:
            bad.append(f"{job_id}: watcher's last state {S.Name(last) if last is not None else 'none'}, job "
                       f"{S.Name(got.state) if got else '?'}")
    return bad


# Keys a later call rewrites by design (approving or editing captions rewrites the dataset's current
# captions.json), so an older job's checksum of them goes stale: checked for presence only.
MUTABLE_SUFFIXES = ("/captions.json",)


def check_artifacts(store, records) -> tuple[list[str], int]:
    bad, checked = [], 0
    newest: dict[str, tuple[float, str]] = {}  # key -> (finish time, sha256) of its newest reference
    for job in records.values():
        when = job.finished_at.ToNanoseconds() or job.created_at.ToNanoseconds()
        for ref in job.artifacts:
            if ref.sha256 and when >= newest.get(ref.key, (-1, ""))[0]:
                newest[ref.key] = (when, ref.sha256)
    for job in records.values():
        latest = {ref.key: ref for ref in job.artifacts}
        for key, ref in latest.items():
            if not ref.sha256 or newest[key][1] != ref.sha256:
                continue  # a later job rewrote the key (checked against that job's reference)
            checked += 1
            if key.endswith(MUTABLE_SUFFIXES):
                if not store.exists(key):
                    bad.append(f"{job.job_id}: {key} missing")
                continue
            try:
                data = store.get_bytes(key)
            except Exception as exc:  # noqa: BLE001
                bad.append(f"{job.job_id}: {key} unreadable ({type(exc).__name__})")
                continue
            if sha256(data) != ref.sha256:
                bad.append(f"{job.job_id}: {key} does not match its sha256")
        if job.service == "preprocessing" and job.state == S.JOB_STATE_SUCCEEDED:
            for key in latest:
                if key.endswith("/manifest.json"):
                    prefix = key.rsplit("/", 1)[0] + "/images/"
                    for image in store.get_json(key).get("images", []):
                        checked += 1
                        try:
                            if sha256(store.get_bytes(prefix + image["file_name"])) != image["pixel_sha256"]:
                                bad.append(f"{job.job_id}: {image['file_name']} does not match the manifest")
                        except Exception as exc:  # noqa: BLE001
                            bad.append(f"{job.job_id}: {image.get('file_name')} unreadable ({type(exc).__name__})")
    return bad, checked


def check_final(record, final) -> list[str]:
    bad = []
    for job_id in record.jobs:
        got = final.get(job_id)
        seen = set(record.observed.get(job_id, set()))
        states = record.watches[job_id].states if job_id in record.watches else []
        first = next((i for i, state in enumerate(states) if state in TERMINAL), None)
        if first is not None:
            seen |= set(states[first:])
        if got is not None and seen - {got.state}:
            bad.append(f"{job_id}: seen {sorted(S.Name(s) for s in seen)}, now {S.Name(got.state)}")
    return bad


def check_failures(record, final) -> list[str]:
    bad = [f"{call}: refused {code}: {message[:120]}" for call, code, message in record.refusals
           if code in ("INTERNAL", "UNKNOWN")]
    for job_id in record.jobs:
        got = final.get(job_id)
        if got is not None and got.state == S.JOB_STATE_FAILED:
            if got.error.code in ("", "UNKNOWN") or not got.error.message:
                bad.append(f"{job_id}: FAILED with code {got.error.code!r}: {got.error.message[:120]!r}")
    return bad


def check_hostile(record) -> list[str]:
    from .load import DELIBERATE

    return [f"{what}: {code} {message[:100]}" for what, code, message in record.hostile
            if code not in DELIBERATE and code != "UNAVAILABLE"]  # (UNAVAILABLE: the server was down)


def port_free(port: int) -> bool:
    """Nothing listens on it and a server could bind it (SO_REUSEADDR, as servers bind: connections
    in TIME_WAIT do not count)."""
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
            return True
        except OSError:
            return False
