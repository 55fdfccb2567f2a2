"""The store's interface, its keys and what it says about an object; the backends are in
fluxlora.common.storage.local and .s3."""

from __future__ import annotations

import builtins
import json
import os
import tempfile
from abc import ABC, abstractmethod
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fluxlora.common.s3_retry import RetryPolicy
from fluxlora_api.shared.errors import InvalidArgument, NotFound

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

    def get_range(self, key: str, start: int, length: int) -> bytes:
        """`length` bytes of an object from `start` (fewer at its end): a model file's header
        without its weights. Stores that can read part of an object override this."""
        return self.get_bytes(key)[start:start + length]

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
            self.put_file(prefix + p.relative_to(local_dir).as_posix(), p, content_type(p))
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


def content_type(path: Path) -> str:
    return {
        ".png": "image/png",
        ".jpg": "image/jpeg",
        ".jpeg": "image/jpeg",
        ".json": "application/json",
        ".txt": "text/plain; charset=utf-8",
        ".csv": "text/csv",
    }.get(path.suffix.lower(), "application/octet-stream")

