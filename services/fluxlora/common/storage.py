"""The artifact store: one small interface, two backends with the same keys.

- LocalStore: a directory on this machine (the embedded single-machine default).
- S3Store: an S3-compatible bucket (MinIO in deployments) through the `minio` client.

Objects are streamed (never a whole large file in memory) and written whole or not at all: the
local backend writes to a temporary file and renames it, and an S3 PUT is atomic. Keys are
validated so no caller can escape the bucket's root.
"""

from __future__ import annotations

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

from fluxlora.common.errors import InvalidArgument, NotFound, Unavailable

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


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


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

    def upload_dir(self, local_dir: Path, prefix: str) -> list[ObjectInfo]:
        prefix = validate_prefix(prefix)
        return [
            self.put_file(prefix + p.relative_to(local_dir).as_posix(), p, _content_type(p))
            for p in sorted(local_dir.rglob("*"))
            if p.is_file()
        ]

    def download_prefix(self, prefix: str, local_dir: Path) -> list[Path]:
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

    def presigned_url(self, key: str) -> str:
        return self._path(key).as_uri()


class S3Store(ArtifactStore):
    def __init__(self, client: Any, bucket: str, create_bucket: bool = True):
        self.client = client
        self.bucket = bucket
        if create_bucket:
            with _s3_errors(f"bucket {bucket!r}"):
                if not client.bucket_exists(bucket):
                    client.make_bucket(bucket)

    @classmethod
    def connect(cls, endpoint: str, bucket: str, access_key: str, secret_key: str,
                secure: bool = False, region: str = "us-east-1") -> S3Store:
        from minio import Minio

        client = Minio(endpoint, access_key=access_key, secret_key=secret_key, secure=secure, region=region)
        return cls(client, bucket)

    @property
    def uri(self) -> str:
        return f"s3://{self.bucket}"

    def put_file(self, key: str, path: Path, content_type: str = "application/octet-stream") -> ObjectInfo:
        validate_key(key)
        digest = sha256_file(path)
        with _s3_errors(key):
            self.client.fput_object(
                self.bucket, key, str(path), content_type=content_type, metadata={"sha256": digest}
            )
        return ObjectInfo(key, Path(path).stat().st_size, digest)

    def get_file(self, key: str, path: Path) -> Path:
        validate_key(key)
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        with _s3_errors(key):
            # minio downloads to <path>.part.minio then renames: never a half-written target.
            self.client.fget_object(self.bucket, key, str(path))
        return path

    def stat(self, key: str) -> ObjectInfo:
        validate_key(key)
        with _s3_errors(key):
            obj = self.client.stat_object(self.bucket, key)
        meta = {k.lower(): v for k, v in (obj.metadata or {}).items()}
        return ObjectInfo(key, obj.size, meta.get("x-amz-meta-sha256", ""))

    def list(self, prefix: str) -> Iterator[ObjectInfo]:
        if prefix:
            validate_key(prefix.rstrip("/") or "x")
        with _s3_errors(prefix):
            objects = list(self.client.list_objects(self.bucket, prefix=prefix, recursive=True))
        for obj in sorted(objects, key=lambda o: o.object_name):
            yield ObjectInfo(obj.object_name, obj.size or 0, version=(obj.etag or "").strip('"'))

    def delete(self, key: str) -> None:
        validate_key(key)
        with _s3_errors(key):
            self.client.remove_object(self.bucket, key)

    def presigned_url(self, key: str) -> str:
        validate_key(key)
        return self.client.presigned_get_object(self.bucket, key)


class _s3_errors:
    """Turns minio/urllib3 failures into NotFound / Unavailable with the key in the message."""

    def __init__(self, what: str):
        self.what = what

    def __enter__(self) -> None:
        return None

    def __exit__(self, exc_type, exc, tb) -> bool:
        if exc is None:
            return False
        from minio.error import S3Error
        from urllib3.exceptions import HTTPError

        if isinstance(exc, S3Error) and exc.code in ("NoSuchKey", "NoSuchBucket", "NoSuchObject"):
            raise NotFound(f"object {self.what!r} not found ({exc.code})") from exc
        if isinstance(exc, (HTTPError, ConnectionError)):
            raise Unavailable(f"object store unreachable while accessing {self.what!r}: {exc}") from exc
        return False


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
        )
    return LocalStore(Path(store.removeprefix("file://")))
