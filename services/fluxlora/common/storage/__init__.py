"""The artifact store: one small interface, two backends with the same keys.

- LocalStore: a directory on this machine (the embedded single-machine default).
- S3Store: an S3-compatible bucket (MinIO in deployments) through the `minio` client.

Objects are streamed (never a whole large file in memory) and written whole or not at all: the
local backend writes to a temporary file and renames it, and an S3 PUT is atomic. Keys are
validated so no caller can escape the bucket's root. S3 calls ride out short outages (retries with
backoff and jitter, fluxlora.common.s3_retry) and then fail with UNAVAILABLE.

base.py: ArtifactStore, ObjectInfo, key validation; local.py: LocalStore; s3.py: S3Store;
opening.py: open_store (the store FLUXLORA_STORE names).
"""

from __future__ import annotations

from fluxlora.common.storage.base import (
    CHUNK,
    MAX_KEY_BYTES,
    MAX_PART_BYTES,
    ArtifactStore,
    ObjectInfo,
    content_type,
    validate_key,
    validate_prefix,
)
from fluxlora.common.storage.local import LocalStore
from fluxlora.common.storage.opening import open_store
from fluxlora.common.storage.s3 import S3Store, split_endpoint

__all__ = ["CHUNK", "MAX_KEY_BYTES", "MAX_PART_BYTES", "ArtifactStore", "LocalStore", "ObjectInfo", "S3Store",
           "content_type", "open_store", "split_endpoint", "validate_key", "validate_prefix"]
