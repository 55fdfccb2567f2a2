"""S3Store: an S3-compatible bucket (MinIO in deployments) through the `minio` client. Calls ride
out short outages (retries with backoff and jitter, fluxlora.common.s3_retry), then fail UNAVAILABLE."""

from __future__ import annotations

import copy
import glob
import hashlib
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from fluxlora.common.s3_retry import RetryPolicy, with_retries
from fluxlora.common.storage.base import ArtifactStore, ObjectInfo, validate_key
from fluxlora_api.shared.errors import InvalidArgument, NotFound, Unavailable
from fluxlora_api.shared.files import sha256_file

BUCKET_SEEN_S = 2.0  # how long a bucket seen is trusted to be there when a key reads as missing


class S3Store(ArtifactStore):
    can_presign = True

    def __init__(self, client: Any, bucket: str, create_bucket: bool = True, retry: RetryPolicy | None = None,
                 endpoint: str = "", public_client: Any = None):
        """public_client: a client for the endpoint clients reach (FLUXLORA_S3_PUBLIC_ENDPOINT), used
        only to sign URLs (no request goes through it); None: `client` signs them."""
        self.client = client
        self.public_client = public_client or client
        self.bucket = bucket
        self.retry = retry or RetryPolicy()
        self.endpoint = endpoint
        self._bucket_seen_at = -BUCKET_SEEN_S
        if create_bucket:
            self._call(f"creating bucket {bucket!r}", self._ensure_bucket)

    @classmethod
    def connect(cls, endpoint: str, bucket: str, access_key: str, secret_key: str,
                secure: bool = False, region: str = "us-east-1", retry: RetryPolicy | None = None,
                timeout_s: float = 60.0, public_endpoint: str = "") -> S3Store:
        """public_endpoint: host:port or http(s)://host:port that clients reach the store at, when it
        differs from `endpoint` (Compose, Kubernetes); presigned URLs are signed for it."""
        import certifi
        import urllib3
        from minio import Minio

        # One retry layer, ours (it logs, jitters and knows which errors are worth waiting for):
        # urllib3 itself retries nothing, and a silent endpoint costs timeout_s per attempt, not
        # minio's default of 5 minutes.
        http = urllib3.PoolManager(
            timeout=urllib3.Timeout(connect=min(timeout_s, 10.0), read=timeout_s),
            maxsize=10,
            retries=urllib3.Retry(total=None, connect=0, read=0, status=0, other=0, redirect=5,
                                  raise_on_status=False),
            # certificates checked as minio checks them by default
            cert_reqs="CERT_REQUIRED",
            ca_certs=os.environ.get("SSL_CERT_FILE") or certifi.where(),
        )
        client = Minio(endpoint, access_key=access_key, secret_key=secret_key, secure=secure, region=region,
                       http_client=http)
        public_client = None
        if public_endpoint:
            host, public_secure = split_endpoint(public_endpoint, secure)
            # The region is given, so signing never asks this endpoint anything.
            public_client = Minio(host, access_key=access_key, secret_key=secret_key, secure=public_secure,
                                  region=region)
        return cls(client, bucket, retry=retry, endpoint=endpoint, public_client=public_client)

    def with_retry(self, policy: RetryPolicy) -> S3Store:
        clone = copy.copy(self)  # the same client and bucket
        clone.retry = policy
        return clone

    def _ensure_bucket(self) -> None:
        from minio.error import S3Error

        if self.client.bucket_exists(self.bucket):
            return
        try:
            self.client.make_bucket(self.bucket)
        except S3Error as exc:  # a retry after a create whose answer was lost
            if exc.code != "BucketAlreadyOwnedByYou":
                raise

    def _call(self, action: str, call: Any, what: str = "") -> Any:
        """`call()` with retries on transient failures; errors mapped to NotFound / Unavailable."""
        where = f"{self.uri} at {self.endpoint}" if self.endpoint else self.uri
        try:
            with _s3_errors(what or action, self.bucket):
                return with_retries(call, action, where, self.retry)
        except NotFound:
            self._check_bucket(what or action)
            raise

    def _check_bucket(self, what: str) -> None:
        """A missing object, or a missing bucket? S3 answers a HEAD of any key of a deleted bucket with a
        bodiless 404, which reads as a missing object: so a miss asks whether the bucket is there (at most
        once per BUCKET_SEEN_S while it is), lest a job that exists be answered NOT_FOUND."""
        if time.monotonic() - self._bucket_seen_at < BUCKET_SEEN_S:
            return
        try:
            exists = self.client.bucket_exists(self.bucket)
        except Exception:  # noqa: BLE001 - cannot tell now: the miss stands as it was answered
            return
        if not exists:
            raise Unavailable(f"bucket {self.bucket!r} does not exist (NoSuchBucket) while accessing {what!r}: "
                              "restore it, or point FLUXLORA_STORE at the right s3://<bucket>")
        self._bucket_seen_at = time.monotonic()

    @property
    def uri(self) -> str:
        return f"s3://{self.bucket}"

    def put_file(self, key: str, path: Path, content_type: str = "application/octet-stream") -> ObjectInfo:
        validate_key(key)
        digest = sha256_file(path)
        # Each attempt is a whole PUT (or a multipart upload minio aborts on failure): the key holds
        # the old object or the new one, never part of it.
        self._call(f"writing {key!r}", lambda: self.client.fput_object(
            self.bucket, key, str(path), content_type=content_type, metadata={"sha256": digest}
        ), key)
        return ObjectInfo(key, Path(path).stat().st_size, digest)

    def get_file(self, key: str, path: Path) -> Path:
        validate_key(key)
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            # minio downloads to <path>.<etag>.part.minio then renames: never a half-written target.
            self._call(f"reading {key!r}", lambda: self.client.fget_object(self.bucket, key, str(path)), key)
        except BaseException:
            for part in path.parent.glob(glob.escape(path.name) + ".*.part.minio"):
                part.unlink(missing_ok=True)
            raise
        return path

    def get_range(self, key: str, start: int, length: int) -> bytes:
        validate_key(key)

        def read() -> bytes:
            response = self.client.get_object(self.bucket, key, offset=start, length=length)
            try:
                return response.read()
            finally:
                response.close()
                response.release_conn()

        return self._call(f"reading {key!r}", read, key)

    def stat(self, key: str) -> ObjectInfo:
        validate_key(key)
        obj = self._call(f"reading {key!r}", lambda: self.client.stat_object(self.bucket, key), key)
        meta = {k.lower(): v for k, v in (obj.metadata or {}).items()}
        return ObjectInfo(key, obj.size, meta.get("x-amz-meta-sha256", ""))

    def list(self, prefix: str) -> Iterator[ObjectInfo]:
        if prefix:
            validate_key(prefix.rstrip("/") or "x")
        objects = self._call(f"listing {prefix!r}", lambda: list(
            self.client.list_objects(self.bucket, prefix=prefix, recursive=True)), prefix)
        for obj in sorted(objects, key=lambda o: o.object_name):
            yield ObjectInfo(obj.object_name, obj.size or 0, version=(obj.etag or "").strip('"'))

    def delete(self, key: str) -> None:
        validate_key(key)
        self._call(f"deleting {key!r}", lambda: self.client.remove_object(self.bucket, key), key)

    def create_bytes(self, key: str, data: bytes, content_type: str = "application/octet-stream") -> bool:
        from minio.error import S3Error

        validate_key(key)
        digest = hashlib.sha256(data).hexdigest()
        # A conditional PUT (If-None-Match: *; AWS S3, MinIO, moto): the server refuses it with 412 when
        # the key exists. minio's put_object would send that header as user metadata, so this uses its
        # PutObject call underneath (minio is pinned; tests/unit/test_caption_version_race.py runs it on moto).
        headers = {"Content-Type": content_type, "x-amz-meta-sha256": digest, "If-None-Match": "*"}

        def put() -> bool:
            try:
                self.client._put_object(self.bucket, key, data, headers)
                return True
            except S3Error as exc:
                # 409: another conditional write of the key is in flight; whoever finishes holds it.
                if exc.code in ("PreconditionFailed", "ConditionalRequestConflict"):
                    return False
                raise

        if self._call(f"creating {key!r}", put, key):
            return True
        try:
            return self.stat(key).sha256 == digest
        except NotFound:  # the other writer's conditional PUT failed after all: nothing is there
            return False

    def presigned_url(self, key: str) -> str:
        validate_key(key)
        return self.public_client.presigned_get_object(self.bucket, key)

    def presign(self, method: str, key: str, expires_s: int) -> str | None:
        import datetime

        validate_key(key)
        if method not in ("GET", "PUT"):
            raise InvalidArgument(f"cannot presign {method!r}: only GET and PUT")
        # SigV4 signs the method, the bucket, the key, the host and the expiry: the URL is good for
        # exactly this one object and operation, on this endpoint, until it expires.
        return self.public_client.get_presigned_url(method, self.bucket, key,
                                                    expires=datetime.timedelta(seconds=expires_s))


class _s3_errors:
    """Turns minio/urllib3 failures into NotFound / Unavailable with the key in the message."""

    def __init__(self, what: str, bucket: str = ""):
        self.what, self.bucket = what, bucket

    def __enter__(self) -> None:
        return None

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc is None:
            return
        from minio.error import S3Error
        from urllib3.exceptions import HTTPError

        if isinstance(exc, S3Error) and exc.code == "NoSuchBucket":
            # The bucket, not the object, is missing (deleted, or the store is misconfigured): every key
            # would read as missing, so a job that exists must not be answered NOT_FOUND. (A HEAD request
            # cannot tell the two apart: minio names its bodiless 404 NoSuchKey.)
            bucket = exc.bucket_name or self.bucket
            raise Unavailable(f"bucket {bucket!r} does not exist (NoSuchBucket) while accessing "
                              f"{self.what!r}: restore it, or point FLUXLORA_STORE at the right s3://<bucket>") from exc
        if isinstance(exc, S3Error) and exc.code in ("NoSuchKey", "NoSuchObject"):
            raise NotFound(f"object {self.what!r} not found ({exc.code})") from exc
        if isinstance(exc, (HTTPError, ConnectionError)):
            raise Unavailable(f"object store unreachable while accessing {self.what!r}: {exc}") from exc


def split_endpoint(endpoint: str, secure: bool) -> tuple[str, bool]:
    """(host:port, secure) of "host:port" (secure as given) or "http(s)://host:port"."""
    endpoint = endpoint.strip().rstrip("/")
    for scheme, is_secure in (("https://", True), ("http://", False)):
        if endpoint.startswith(scheme):
            endpoint, secure = endpoint[len(scheme):], is_secure
    if not endpoint or "/" in endpoint:
        raise InvalidArgument(f"S3 endpoint {endpoint!r} must be host:port or http(s)://host:port, with no path")
    return endpoint, secure
