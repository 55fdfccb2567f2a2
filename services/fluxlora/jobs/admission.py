"""What a submit must pass before a job is made: a request_id resent with another spec is
ALREADY_EXISTS (the same spec gets its job back), and a disk with less than FLUXLORA_MIN_FREE_BYTES
free is RESOURCE_EXHAUSTED naming the path (checked again before each start)."""

from __future__ import annotations

import shutil
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from google.protobuf.message import Message

from fluxlora_api.shared.errors import AlreadyExists, ResourceExhausted
from fluxlora_api.shared.files import human_bytes
from fluxlora_api.v1 import jobs_pb2


def free_bytes(path: Path) -> int:
    return shutil.disk_usage(path).free


def check_free_space(paths: Iterable[Path], min_free_bytes: int, service: str) -> None:
    """RESOURCE_EXHAUSTED naming the path when one of `paths` is on a disk with less than
    min_free_bytes free (0: no check); a path that cannot be checked is skipped."""
    if not min_free_bytes:
        return
    for path in paths:
        try:
            free = free_bytes(path)
        except OSError:
            continue
        if free < min_free_bytes:
            raise ResourceExhausted(
                f"only {human_bytes(free)} free on the disk holding {path}, under the "
                f"{human_bytes(min_free_bytes)} a {service} job needs to start "
                f"(FLUXLORA_MIN_FREE_BYTES={min_free_bytes}): free space there (old runs, datasets, "
                "caches) or move FLUXLORA_STORE / TMPDIR to a bigger disk, then resubmit"
            )


def check_same_spec(job: jobs_pb2.Job, spec: Message, request_id: str) -> None:
    """ALREADY_EXISTS when a request_id comes back with another spec than its job was submitted with."""
    earlier = type(spec)()
    if not job.spec.Unpack(earlier) or earlier == spec:
        return
    names = sorted({f.name for f, _ in earlier.ListFields()} | {f.name for f, _ in spec.ListFields()})
    changed = [n for n in names if _field(earlier, n) != _field(spec, n)]
    raise AlreadyExists(
        f"request_id {request_id!r} was used for job {job.job_id} with a different spec (it differs in "
        f"{', '.join('spec.' + n for n in changed) or 'its fields'}): resend the same spec to get that job, or "
        "use a new request_id for a new job"
    )


def _field(message: Message, name: str) -> Any:
    value = getattr(message, name)
    return list(value) if hasattr(value, "__len__") and not isinstance(value, (str, bytes)) else value
