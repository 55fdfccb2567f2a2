"""Client uploads and downloads without store credentials (fluxlora.v1.TransferService): the pure
rules (which paths an upload may name, its content-addressed prefix, which keys a client may read)
and the store side of each call. Only the servers hold the store's credentials; a client gets
presigned, expiring URLs for exactly the objects it may write or read, or sends/receives the bytes
over gRPC (fluxlora.server.transfers) where the store cannot presign (the local store).

Uploads are content-addressed: uploads/u-<hash of the sorted (path, size, sha256)>/, so the same
photos always land under the same prefix and are stored once. CreateUpload writes the declaration
(paths, sizes, sha256s) where clients cannot read or write (transfers/); CompleteUpload checks every
object against it and writes the manifest last, the marker that the prefix is complete.
"""

from __future__ import annotations

import datetime
import hashlib
import os
import re
import tempfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from fluxlora.common.storage import ArtifactStore, ObjectInfo, validate_key
from fluxlora_api.shared.errors import FailedPrecondition, InvalidArgument, NotFound, PermissionDenied
from fluxlora_api.shared.files import check_upload_bytes, sha256_file

UPLOADS = "uploads/"
# What a client may list and download: what it uploaded and what the jobs made for it. Never job
# records (jobs/), base models (models/), caches (cache/) or these transfer records (transfers/).
READABLE_PREFIXES = ("datasets/", "runs/", "grids/", "generations/", UPLOADS)
RECORDS = "transfers/uploads/"
# A presigned PUT must say what it sends: some S3 servers (moto) store an empty object for a form
# content type, which is what HTTP clients send by default.
PUT_HEADERS = {"Content-Type": "application/octet-stream"}
CHUNK = 1 << 20
PAGE_SIZE = 1000
MAX_FILES = 100_000
_SHA256 = re.compile(r"^[0-9a-f]{64}$")


@dataclass(frozen=True)
class DeclaredFile:
    path: str
    size: int
    sha256: str

    def as_json(self) -> dict:
        return {"path": self.path, "size": self.size, "sha256": self.sha256}


@dataclass(frozen=True)
class Target:
    path: str
    key: str
    url: str  # empty: stream it with UploadFile
    headers: dict[str, str]
    expires_at: datetime.datetime | None


@dataclass(frozen=True)
class Listed:
    info: ObjectInfo
    url: str  # empty: download it with DownloadFile
    expires_at: datetime.datetime | None


@dataclass(frozen=True)
class Upload:
    prefix: str
    presigned: bool
    targets: list[Target]
    complete: bool


def upload_path(path: str) -> str:
    """A declared file's path: relative, POSIX, no '..' or '.' parts (INVALID_ARGUMENT otherwise)."""
    if not path or path.startswith("/") or re.match(r"^[A-Za-z]:", path):
        raise InvalidArgument(f"upload path {path!r} must be relative, such as 'beach/img-001.jpg'")
    try:
        return validate_key(path)
    except InvalidArgument as exc:
        raise InvalidArgument(f"upload path {path!r}: {exc.message}") from None


def declare(files: Iterable[tuple[str, int, str]]) -> list[DeclaredFile]:
    """The declared files, checked and sorted by path."""
    declared: dict[str, DeclaredFile] = {}
    for path, size, sha256 in files:
        path = upload_path(path)
        if path in declared:
            raise InvalidArgument(f"upload path {path!r} is declared twice")
        if size < 0:
            raise InvalidArgument(f"upload path {path!r}: size {size} is negative")
        if not _SHA256.match(sha256 or ""):
            raise InvalidArgument(f"upload path {path!r}: sha256 must be 64 lowercase hex digits, not {sha256!r}")
        declared[path] = DeclaredFile(path, size, sha256)
    if not declared:
        raise InvalidArgument("an upload needs at least one file")
    if len(declared) > MAX_FILES:
        raise InvalidArgument(f"an upload holds at most {MAX_FILES} files, not {len(declared)}: split it")
    return [declared[p] for p in sorted(declared)]


def upload_prefix(files: Iterable[DeclaredFile]) -> str:
    """uploads/u-<hash>/: the same paths with the same contents always give the same prefix. The size
    is hashed too, so a declaration with a wrong size cannot take the prefix of the right one."""
    digest = hashlib.sha256()
    for f in sorted(files, key=lambda f: f.path):
        digest.update(f"{f.path}\0{f.size}\0{f.sha256}\n".encode())
    return f"{UPLOADS}u-{digest.hexdigest()[:32]}/"


def check_upload_prefix(prefix: str) -> str:
    if not re.fullmatch(r"uploads/u-[0-9a-f]{16,64}/", prefix or ""):
        raise InvalidArgument(f"upload_prefix {prefix!r} is not one CreateUpload returned (uploads/u-<hash>/)")
    return prefix


def declaration_key(prefix: str) -> str:
    return f"{RECORDS}{check_upload_prefix(prefix)[len(UPLOADS):]}declared.json"


def manifest_key(prefix: str) -> str:
    return f"{RECORDS}{check_upload_prefix(prefix)[len(UPLOADS):]}manifest.json"


def readable(key_or_prefix: str) -> str:
    """A key or prefix a client may read: INVALID_ARGUMENT when malformed, PERMISSION_DENIED outside
    READABLE_PREFIXES."""
    if not key_or_prefix or key_or_prefix.startswith("/"):
        raise InvalidArgument(f"{key_or_prefix!r} must be a relative key or prefix, such as 'runs/trn-1/'")
    validate_key(key_or_prefix.rstrip("/") or "x")
    if not key_or_prefix.startswith(READABLE_PREFIXES):
        raise PermissionDenied(
            f"{key_or_prefix!r} is not readable by clients: only {', '.join(READABLE_PREFIXES)} are"
        )
    return key_or_prefix


def upload_incomplete(store: ArtifactStore, prefix: str) -> bool:
    """True when `prefix` is a declared upload whose CompleteUpload has not succeeded (preprocessing
    refuses it); False for a complete one and for a prefix no CreateUpload declared."""
    if not re.fullmatch(r"uploads/u-[0-9a-f]{16,64}/", prefix):
        return False
    return store.exists(declaration_key(prefix)) and not store.exists(manifest_key(prefix))


class Transfers:
    """The store side of TransferService, over one store."""

    def __init__(self, store: ArtifactStore, *, max_upload_bytes: int, expiry_s: int = 900, stream_only: bool = False):
        self.store = store
        self.max_upload_bytes = max_upload_bytes
        self.expiry_s = expiry_s
        self.stream_only = stream_only

    # --- uploads -------------------------------------------------------------------------------
    def create_upload(self, files: Iterable[tuple[str, int, str]], stream: bool = False) -> Upload:
        declared = declare(files)
        check_upload_bytes([f.size for f in declared], self.max_upload_bytes, "the upload")
        prefix = upload_prefix(declared)
        if self.store.exists(manifest_key(prefix)):
            return Upload(prefix, False, [], True)
        # The prefix names the declaration: declaring it again (another client, a retry) would write the same.
        if not self.store.exists(declaration_key(prefix)):
            self.store.put_json(declaration_key(prefix), {"prefix": prefix, "files": [f.as_json() for f in declared]})
        missing = [f for f in declared if not self._stored_size(prefix + f.path, f.size)]
        presigned = self.store.can_presign and not (stream or self.stream_only)
        expires = self._expires_at()
        targets = [
            Target(f.path, prefix + f.path, self.store.presign("PUT", prefix + f.path, self.expiry_s) or "",
                   dict(PUT_HEADERS), expires) if presigned else Target(f.path, prefix + f.path, "", {}, None)
            for f in missing
        ]
        return Upload(prefix, presigned, targets, False)

    def declared(self, prefix: str) -> dict[str, DeclaredFile]:
        try:
            record = self.store.get_json(declaration_key(prefix))
        except NotFound:
            raise FailedPrecondition(f"no upload {prefix!r} was declared: call CreateUpload first") from None
        return {f["path"]: DeclaredFile(f["path"], f["size"], f["sha256"]) for f in record["files"]}

    def receive(self, prefix: str, path: str, chunks: Iterable[bytes]) -> ObjectInfo:
        """Stores the streamed bytes of one declared file, only if they are exactly the declared ones."""
        prefix = check_upload_prefix(prefix)
        path = upload_path(path)
        expected = self.declared(prefix).get(path)
        if expected is None:
            raise InvalidArgument(f"{path!r} is not a file of upload {prefix!r}: declare it with CreateUpload")
        digest, size = hashlib.sha256(), 0
        fd, tmp = tempfile.mkstemp(prefix="fluxlora-upload-")
        try:
            with os.fdopen(fd, "wb") as out:
                for chunk in chunks:
                    size += len(chunk)
                    if size > expected.size:
                        raise InvalidArgument(f"{path!r} is longer than the {expected.size} bytes declared for it")
                    digest.update(chunk)
                    out.write(chunk)
            if size != expected.size or digest.hexdigest() != expected.sha256:
                raise InvalidArgument(
                    f"{path!r} arrived as {size} bytes with sha256 {digest.hexdigest()}, not the declared "
                    f"{expected.size} bytes with sha256 {expected.sha256}: nothing was stored; upload it again"
                )
            return self.store.put_file(prefix + path, Path(tmp))
        finally:
            Path(tmp).unlink(missing_ok=True)

    def complete(self, prefix: str) -> tuple[int, int]:
        """Checks every declared object and writes the manifest last: (files, bytes)."""
        prefix = check_upload_prefix(prefix)
        declared = self.declared(prefix)
        if self.store.exists(manifest_key(prefix)):
            return len(declared), sum(f.size for f in declared.values())
        problems = []
        for f in declared.values():
            problem = self._check(prefix + f.path, f)
            if problem:
                problems.append(f"{f.path!r} {problem}")
        if problems:
            shown = "; ".join(problems[:5]) + (f"; and {len(problems) - 5} more" if len(problems) > 5 else "")
            raise FailedPrecondition(f"upload {prefix!r} is not complete: {shown}. Upload those files again "
                                     "(CreateUpload returns targets for them) and complete it again")
        total = sum(f.size for f in declared.values())
        self.store.put_json(manifest_key(prefix), {"prefix": prefix, "files": [f.as_json() for f in declared.values()],
                                                   "total_bytes": total})
        return len(declared), total

    def _stored_size(self, key: str, size: int) -> bool:
        try:
            return self.store.stat(key).size == size
        except NotFound:
            return False

    def _check(self, key: str, expected: DeclaredFile) -> str:
        """Why the object at `key` is not the declared file ('' when it is); a wrong one is deleted."""
        try:
            info = self.store.stat(key)
        except NotFound:
            return "is missing"
        if info.size == expected.size:
            sha256 = info.sha256
            if not sha256:  # written by a presigned PUT: no checksum recorded, so read it back
                with tempfile.TemporaryDirectory(prefix="fluxlora-verify-") as tmp:
                    sha256 = sha256_file(self.store.get_file(key, Path(tmp) / "object"))
            if sha256 == expected.sha256:
                return ""
        self.store.delete(key)
        return f"differs from its declaration ({info.size} bytes stored, {expected.size} declared; deleted)"

    # --- downloads -----------------------------------------------------------------------------
    def list_artifacts(self, prefix: str, include_urls: bool = False, page_size: int = 0,
                       page_token: str = "") -> tuple[list[Listed], str]:
        """((object, url, expires_at) per object, next page token) under a readable prefix, or one key."""
        readable(prefix)
        if page_size < 0:
            raise InvalidArgument(f"page_size must not be negative, got {page_size}")
        size = min(page_size or PAGE_SIZE, PAGE_SIZE)
        objects: Iterator[ObjectInfo]
        if prefix.endswith("/"):
            objects = (o for o in self.store.list(prefix) if o.key > page_token)
        else:
            objects = iter([self.store.stat(prefix)])
        page: list[ObjectInfo] = []
        for info in objects:
            if len(page) == size:
                return self._urls(page, include_urls), page[-1].key
            page.append(info)
        return self._urls(page, include_urls), ""

    def _expires_at(self) -> datetime.datetime:
        # Taken before signing: the time reported is never later than the URL really expires.
        return datetime.datetime.now(datetime.UTC) + datetime.timedelta(seconds=self.expiry_s)

    def _urls(self, objects: list[ObjectInfo], include_urls: bool) -> list[Listed]:
        expires = self._expires_at()
        out = []
        for info in objects:
            presign = include_urls and self.store.can_presign and not self.stream_only
            url = self.store.presign("GET", info.key, self.expiry_s) if presign else None
            out.append(Listed(info, url or "", expires if url else None))
        return out

    def download(self, key: str) -> tuple[int, Iterator[bytes]]:
        """(size, chunks) of one readable object; NOT_FOUND before the first chunk when absent."""
        if readable(key).endswith("/"):
            raise InvalidArgument(f"{key!r} is a prefix: download its objects one by one (ListArtifacts)")
        tmp = tempfile.TemporaryDirectory(prefix="fluxlora-download-")
        try:
            path = self.store.get_file(key, Path(tmp.name) / "object")
        except BaseException:
            tmp.cleanup()
            raise

        def chunks() -> Iterator[bytes]:
            try:
                with open(path, "rb") as f:
                    yield from iter(lambda: f.read(CHUNK), b"")
            finally:
                tmp.cleanup()

        return path.stat().st_size, chunks()
