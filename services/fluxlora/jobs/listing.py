"""ListJobs pages: newest first, through the store's job index (fluxlora.jobs.records), or through
the jobs held in memory (every unfinished one; the answer while the store cannot be read). A page
token is the index name of the page's last job, base64url-encoded."""

from __future__ import annotations

import base64
import binascii
from collections.abc import Callable, Iterable

from fluxlora.jobs.records import INDEX_NAME, index_name, job_id_of
from fluxlora_api.shared.errors import InvalidArgument
from fluxlora_api.v1 import jobs_pb2

PAGE_SIZE, MAX_PAGE_SIZE = 100, 500
# Records one ListJobs page reads at most while filtering by state: the page then comes back short,
# with a token to go on, rather than one call reading the whole store.
MAX_SCANNED = 2000

Page = tuple[list[jobs_pb2.Job], str]


def page_size(asked: int) -> int:
    """The size of a page asked for with page_size `asked` (0: the default)."""
    if asked < 0:
        raise InvalidArgument("page_size must be >= 0")
    return min(asked or PAGE_SIZE, MAX_PAGE_SIZE)


def memory_page(held: Iterable[jobs_pb2.Job], wanted: set[int], size: int, after: str) -> Page:
    """A page of `held` (copies the caller owns) in index order, after index name `after`."""
    named = sorted(((index_name(j), j) for j in held if not wanted or j.state in wanted), key=lambda n: n[0])
    later = [(name, job) for name, job in named if name > after]
    token = encode_token(later[size - 1][0]) if len(later) > size else ""
    return [job for _, job in later[:size]], token


def store_page(names: Iterable[str], peek: Callable[[str], jobs_pb2.Job | None], wanted: set[int],
               size: int, after: str) -> Page:
    """A page from the index `names` (those after `after`, in order); `peek` reads a job (None: no record)."""
    jobs: list[jobs_pb2.Job] = []
    last, scanned = after, 0
    for name in names:
        if len(jobs) == size or scanned == MAX_SCANNED:
            return jobs, encode_token(last)
        scanned += 1
        last = name
        job = peek(job_id_of(name))
        if job is not None and (not wanted or job.state in wanted):
            jobs.append(job)
    return jobs, ""


def encode_token(name: str) -> str:
    return base64.urlsafe_b64encode(name.encode()).decode().rstrip("=")


def decode_token(token: str) -> str:
    """The index name a page token stands for ("" for the first page)."""
    if not token:
        return ""
    try:
        name = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)).decode()
    except (binascii.Error, UnicodeDecodeError, ValueError):
        name = ""
    if not INDEX_NAME.match(name):
        raise InvalidArgument(
            f"page_token {token[:40]!r} is not a next_page_token this service issued: pass the previous "
            "ListJobs response's next_page_token unchanged, or none for the first page"
        )
    return name
