"""open_store: the store FLUXLORA_STORE names (a directory, file://..., or s3://<bucket>)."""

from __future__ import annotations

from pathlib import Path

from fluxlora.common.config import Settings
from fluxlora.common.s3_retry import RetryPolicy
from fluxlora.common.storage.base import ArtifactStore
from fluxlora.common.storage.local import LocalStore
from fluxlora.common.storage.s3 import S3Store
from fluxlora_api.shared.errors import InvalidArgument


def open_store(settings: Settings) -> ArtifactStore:
    """The store named by Settings.store: a directory, or s3://<bucket> with the S3 settings."""
    store = settings.store
    if store.startswith("s3://"):
        bucket = store[len("s3://"):].strip("/")
        if not bucket:
            raise InvalidArgument("FLUXLORA_STORE=s3:// needs a bucket name, e.g. s3://fluxlora")
        return S3Store.connect(
            settings.s3_endpoint,
            bucket,
            settings.s3_access_key.get_secret_value(),
            settings.s3_secret_key.get_secret_value(),
            secure=settings.s3_secure,
            region=settings.s3_region,
            retry=RetryPolicy.from_settings(settings),
            timeout_s=settings.s3_timeout_s,
            public_endpoint=settings.s3_public_endpoint,
        )
    return LocalStore(Path(store.removeprefix("file://")))
