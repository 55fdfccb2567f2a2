"""Moving bytes for the SDK without store credentials: HTTP PUT/GET to the presigned URLs a server
hands out (standard library only), or the same bytes streamed over gRPC through the server
(fluxlora.v1.TransferService) where the store cannot presign or the client cannot reach it."""

from __future__ import annotations

import os
import tempfile
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

from fluxlora_api.shared.files import CHUNK
from fluxlora_api.v1 import transfers_pb2 as pb
from fluxlora_client.errors import FluxloraClientError

# Each stream gets a deadline of the client's timeout plus the time this rate needs for the file.
SLOWEST_BYTES_PER_S = 1 << 20


class Unreachable(Exception):
    """The URL's host could not be reached (no HTTP answer): the caller falls back to gRPC."""


def transfer_timeout(timeout: float, size: int) -> float:
    return timeout + size / SLOWEST_BYTES_PER_S


def _http(request: urllib.request.Request, timeout: float, what: str):
    try:
        return urllib.request.urlopen(request, timeout=timeout)  # noqa: S310 (the server's presigned https/http URL)
    except urllib.error.HTTPError as err:
        body = err.read(2048).decode("utf-8", "replace")
        code = "PERMISSION_DENIED" if err.code in (401, 403) else "NOT_FOUND" if err.code == 404 else "UNAVAILABLE"
        raise FluxloraClientError(code, f"{what}: the store answered HTTP {err.code} {err.reason}: {body}") from None
    except (urllib.error.URLError, OSError) as err:
        raise Unreachable(f"{what}: {getattr(err, 'reason', err)}") from None


def put_url(url: str, headers: dict[str, str], path: Path, timeout: float) -> None:
    """PUTs a file to a presigned URL, with exactly the headers the server asked for."""
    size = path.stat().st_size
    with open(path, "rb") as body:
        request = urllib.request.Request(url, data=body, method="PUT",
                                         headers={**headers, "Content-Length": str(size)})
        with _http(request, transfer_timeout(timeout, size), f"uploading {path}"):
            pass


def get_url(url: str, key: str, size: int, dest: Path, timeout: float) -> Path:
    """GETs a presigned URL into dest (written whole or not at all; the size checked)."""
    with _http(urllib.request.Request(url), transfer_timeout(timeout, size), f"downloading {key!r}") as response:
        return _write(dest, key, size, iter(lambda: response.read(CHUNK), b""))


def upload_chunks(prefix: str, path: str, local: Path) -> Iterator[pb.UploadChunk]:
    yield pb.UploadChunk(upload_prefix=prefix, path=path)
    with open(local, "rb") as f:
        for data in iter(lambda: f.read(CHUNK), b""):
            yield pb.UploadChunk(data=data)


def write_stream(dest: Path, key: str, chunks: Iterator[pb.DownloadChunk]) -> Path:
    """Writes a DownloadFile stream (its first chunk carries the size) into dest."""
    first = next(chunks, None)
    if first is None:
        raise FluxloraClientError("UNAVAILABLE", f"downloading {key!r}: the server sent nothing")

    def data() -> Iterator[bytes]:
        yield first.data
        for chunk in chunks:
            yield chunk.data

    return _write(dest, key, first.size, data())


def _write(dest: Path, key: str, size: int, chunks: Iterator[bytes]) -> Path:
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=".part-")
    written = 0
    try:
        with os.fdopen(fd, "wb") as out:
            for data in chunks:
                written += len(data)
                if written > size:
                    break
                out.write(data)
        if written != size:
            raise FluxloraClientError("DATA_LOSS", f"downloading {key!r}: got {written} bytes of {size}; try again")
        os.replace(tmp, dest)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return dest


def local_target(dest: Path, relative: str) -> Path:
    """dest/relative, refusing a relative path that would leave dest."""
    target = (dest / relative).resolve()
    if not target.is_relative_to(dest.resolve()):
        raise FluxloraClientError("INVALID_ARGUMENT", f"refusing to write {relative!r} outside {dest}")
    return target
