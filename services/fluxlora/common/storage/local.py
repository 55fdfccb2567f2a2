"""LocalStore: a directory on this machine (the embedded single-machine default). Writes go to a
`.part-*` temp file in the target directory and are renamed into place; `list` hides them."""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from fluxlora.common.storage.base import CHUNK, ArtifactStore, ObjectInfo, validate_key
from fluxlora_api.shared.errors import NotFound


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

    def get_range(self, key: str, start: int, length: int) -> bytes:
        source = self._path(key)
        if not source.is_file():
            raise NotFound(f"object {key!r} not found in {self.uri}")
        with open(source, "rb") as handle:
            handle.seek(start)
            return handle.read(length)

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
