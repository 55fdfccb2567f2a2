"""A failed or cancelled job's artifact references, brought up to date with the store.

A worker rewrites some outputs in place while it runs (a run's loss.csv and loss.png after each
checkpoint). The last report its server read may predate the last rewrite: the server was killed, or
the worker was, between the write and the report. A job that then ends without a result (the next
attempt failed, or it was cancelled) would keep a reference whose sha256 no longer names the stored
bytes. A succeeded job's references come from its worker's final report and need nothing.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Iterable

from fluxlora.common.storage import ArtifactStore
from fluxlora_api.shared.errors import FluxloraError, NotFound
from fluxlora_api.v1 import jobs_pb2

log = logging.getLogger(__name__)

# A job's end waits for this at most: the references are brought up to date where the store answers
# in time; a store that is down leaves them as they are (the end itself is recorded regardless).
REFRESH_BUDGET_S = 10.0


def refresh_artifacts(store: ArtifactStore, refs: Iterable[jobs_pb2.ArtifactRef],
                      budget_s: float = REFRESH_BUDGET_S) -> int:
    """Sets the size and sha256 of each reference whose object was rewritten since; returns how many
    changed. S3 keeps each object's sha256 as metadata (a HEAD); the local store's objects are hashed
    again only when their size changed."""
    deadline = time.monotonic() + budget_s
    changed = 0
    for ref in refs:
        if time.monotonic() > deadline:
            log.warning("artifact references left as reported: the store took over %.0f s to answer", budget_s)
            break
        try:
            info = store.stat(ref.key)
            if info.sha256:
                if info.sha256 == ref.sha256 and info.size == ref.size_bytes:
                    continue
                sha = info.sha256
            elif info.size == ref.size_bytes:
                continue
            else:
                sha = hashlib.sha256(store.get_bytes(ref.key)).hexdigest()
        except NotFound:
            continue  # deleted since (a retention sweep): nothing newer to name
        except FluxloraError as exc:  # unreachable, refused: the end is recorded with what was reported
            log.warning("artifact references left as reported: %s", exc)
            break
        ref.size_bytes, ref.sha256 = info.size, sha
        changed += 1
    return changed
