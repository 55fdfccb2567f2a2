"""The artifact store: one small interface, two backends with the same keys.

- LocalStore: a directory on this machine (the embedded single-machine default).
- S3Store: an S3-compatible bucket (MinIO in deployments) through the `minio` client.

Objects are streamed (never a whole large file in memory) and written whole or not at all: the
local backend writes to a temporary file and renames it, and an S3 PUT is atomic. Keys are
validated so no caller can escape the bucket's root. S3 calls ride out short outages (retries with
backoff and jitter, fluxlora.common.s3_retry) and then fail with UNAVAILABLE.
"""

from __future__ import annotations

import builtins
import copy
import glob
import hashlib
import json
import os
import shutil
import tempfile
from abc import ABC, abstractmethod
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fluxlora.common.s3_retry import RetryPolicy, with_retries
from fluxlora_api.shared.errors import InvalidArgument, NotFound, Unavailable
from fluxlora_api.shared.files import sha256_file

CHUNK = 1024 * 1024
MAX_KEY_BYTES = 1024
MAX_PART_BYTES = 255


@dataclass(frozen=True)
class ObjectInfo:
    key: str
    size: int
    sha256: str = ""
    # Changes whenever the object is rewritten (S3 ETag; local mtime), so caches can tell a
    # re-upload of the same size apart.
    version: str = ""


def validate_key(key: str) -> str:
    """A key is a relative POSIX path with no '..', no empty parts and no backslashes."""
    if not key or key.startswith("/") or "\\" in key or "\x00" in key:
        raise InvalidArgument(f"invalid object key {key!r}: use a relative path such as 'datasets/x/a.png'")
    parts = key.split("/")
    if any(p in ("..", ".") for p in parts) or "" in parts[:-1]:
        raise InvalidArgument(f"invalid object key {key!r}: '..', '.' and empty path parts are not allowed")
    # S3 caps keys at 1024 bytes and file systems cap a path part at 255: refuse, never fail deeper.
    if len(key.encode()) > MAX_KEY_BYTES or any(len(p.encode()) > MAX_PART_BYTES for p in parts):
        raise InvalidArgument(
            f"object key too long ({len(key.encode())} bytes): keys are at most {MAX_KEY_BYTES} bytes "
            f"and each path part at most {MAX_PART_BYTES}"
        )
    return key


def validate_prefix(prefix: str) -> str:
    prefix = prefix.strip()
    if not prefix:
        raise InvalidArgument("empty object-store prefix")
    validate_key(prefix.rstrip("/") or "x")
    return prefix.rstrip("/") + "/"


class ArtifactStore(ABC):
    """Bucket-like storage addressed by keys such as 'runs/<run_id>/loss.csv'."""

    @property
    @abstractmethod
    def uri(self) -> str: ...

    @abstractmethod
    def put_file(self, key: str, path: Path, content_type: str = "application/octet-stream") -> ObjectInfo:
        """Streams a local file into the store; returns its size and sha256."""

    @abstractmethod
    def get_file(self, key: str, path: Path) -> Path:
        """Streams an object to a local file (written whole or not at all)."""

    @abstractmethod
    def stat(self, key: str) -> ObjectInfo:
        """Size of an object; raises NotFound."""

    @abstractmethod
    def list(self, prefix: str) -> Iterator[ObjectInfo]:
        """Every object under a prefix, recursively, sorted by key."""

    @abstractmethod
    def delete(self, key: str) -> None: ...

    @abstractmethod
    def presigned_url(self, key: str) -> str:
        """A URL a client can download the object from without credentials."""

    can_presign = False

    def presign(self, method: str, key: str, expires_s: int) -> str | None:
        """A URL through which anyone holding it may `method` (GET or PUT) exactly `key` for
        `expires_s` seconds, signed for the endpoint clients reach; None when the store cannot
        presign (the local store: bytes then travel over gRPC, fluxlora.common.transfers)."""
        return None

    def with_retry(self, policy: RetryPolicy) -> ArtifactStore:
        """This store with another retry policy for transient failures (a request handler that must
        answer quickly uses a short one); the same store where nothing is retried (a directory)."""
        return self

    def create_bytes(self, key: str, data: bytes, content_type: str = "application/octet-stream") -> bool:
        """Write a small object only if `key` holds none yet, atomically across processes and machines
        (writers claim a name, such as the next version number, with it): True when this call stored
        `data`; False when another writer holds the key (or is creating it). Finding exactly `data`
        there counts as stored: that is how a retried write whose first answer was lost looks."""
        raise NotImplementedError(f"{type(self).__name__} cannot create objects only-if-absent")

    # Small objects (job records, manifests) go through temporary files so both backends keep
    # one streaming code path.
    def put_bytes(self, key: str, data: bytes, content_type: str = "application/octet-stream") -> ObjectInfo:
        with tempfile.NamedTemporaryFile(delete=False) as tmp:
            tmp.write(data)
        try:
            return self.put_file(key, Path(tmp.name), content_type)
        finally:
            os.unlink(tmp.name)

    def get_bytes(self, key: str) -> bytes:
        with tempfile.TemporaryDirectory() as tmp:
            return self.get_file(key, Path(tmp) / "obj").read_bytes()

    def put_json(self, key: str, value: Any) -> ObjectInfo:
        return self.put_bytes(key, json.dumps(value, indent=2, sort_keys=True).encode(), "application/json")

    def get_json(self, key: str) -> Any:
        return json.loads(self.get_bytes(key))

    def exists(self, key: str) -> bool:
        try:
            self.stat(key)
            return True
        except NotFound:
            return False

    def upload_dir(self, local_dir: Path, prefix: str) -> builtins.list[ObjectInfo]:
        prefix = validate_prefix(prefix)
        return [
            self.put_file(prefix + p.relative_to(local_dir).as_posix(), p, _content_type(p))
            for p in sorted(local_dir.rglob("*"))
            if p.is_file()
        ]

    def download_prefix(self, prefix: str, local_dir: Path) -> builtins.list[Path]:
        prefix = validate_prefix(prefix)
        paths = []
        for info in self.list(prefix):
            target = local_dir / info.key[len(prefix):]
            paths.append(self.get_file(info.key, target))
        return paths


def _content_type(path: Path) -> str:
    return {
        ".png": "image/png",
        ".jpg": "image/jpeg",
        ".jpeg": "image/jpeg",
        ".json": "application/json",
        ".txt": "text/plain; charset=utf-8",
        ".csv": "text/csv",
    }.get(path.suffix.lower(), "application/octet-stream")


class LocalStore(ArtifactStore):
    def __init__(self, root: Path):
        self.root = Path(root).resolve()
        self.root.mkdir(parents=True, exist_ok=True)

    @property
    def uri(self) -> str:
        return str(self.root)

    def _path(self, key: str) -> Path:
        return self.root / validate_key(key)

    def put_file(self, key: str, path: Path, content_type: str = "application/octet-stream") -> ObjectInfo:
        target = self._path(key)
        target.parent.mkdir(parents=True, exist_ok=True)
        digest = hashlib.sha256()
        size = 0
        fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=".part-")
        try:
            with os.fdopen(fd, "wb") as out, open(path, "rb") as src:
                for chunk in iter(lambda: src.read(CHUNK), b""):
                    digest.update(chunk)
                    size += len(chunk)
                    out.write(chunk)
            os.replace(tmp, target)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return ObjectInfo(key, size, digest.hexdigest())

    def get_file(self, key: str, path: Path) -> Path:
        source = self._path(key)
        if not source.is_file():
            raise NotFound(f"object {key!r} not found in {self.uri}")
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".part-")
        os.close(fd)
        try:
            shutil.copyfile(source, tmp)
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return path

    def stat(self, key: str) -> ObjectInfo:
        path = self._path(key)
        if not path.is_file():
            raise NotFound(f"object {key!r} not found in {self.uri}")
        return ObjectInfo(key, path.stat().st_size)

    def list(self, prefix: str) -> Iterator[ObjectInfo]:
        # S3 prefixes match partial names ("jobs/pre" matches "jobs/preprocessing/..."): walk the
        # deepest whole directory of the prefix and filter by the full prefix.
        directory = prefix.rsplit("/", 1)[0] if "/" in prefix else ""
        base = self.root / validate_key(directory) if directory else self.root
        if not base.is_dir():
            return
        for path in sorted(base.rglob("*")):
            if path.is_file() and not path.name.startswith(".part-"):
                key = path.relative_to(self.root).as_posix()
                if key.startswith(prefix):
                    stat = path.stat()
                    yield ObjectInfo(key, stat.st_size, version=str(stat.st_mtime_ns))

    def delete(self, key: str) -> None:
        self._path(key).unlink(missing_ok=True)

    def create_bytes(self, key: str, data: bytes, content_type: str = "application/octet-stream") -> bool:
        target = self._path(key)
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=".part-")
        try:
            with os.fdopen(fd, "wb") as out:
                out.write(data)
            # link() refuses an existing target: whole-or-nothing like put_file's rename, and create-only.
            os.link(tmp, target)
            return True
        except FileExistsError:
            return target.read_bytes() == data
        finally:
            Path(tmp).unlink(missing_ok=True)

    def presigned_url(self, key: str) -> str:
        return self._path(key).as_uri()


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
        with _s3_errors(what or action):
            return with_retries(call, action, where, self.retry)

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

    def __init__(self, what: str):
        self.what = what

    def __enter__(self) -> None:
        return None

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc is None:
            return
        from minio.error import S3Error
        from urllib3.exceptions import HTTPError

        if isinstance(exc, S3Error) and exc.code in ("NoSuchKey", "NoSuchBucket", "NoSuchObject"):
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


def open_store(settings: Any) -> ArtifactStore:
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
