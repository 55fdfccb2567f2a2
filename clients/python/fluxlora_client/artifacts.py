"""Uploads and downloads through the servers' TransferService: presigned, expiring URLs where the
store has them (transfers.py does the HTTP), else the bytes streamed over gRPC. No store credentials."""

from __future__ import annotations

import datetime
from pathlib import Path

import grpc

from fluxlora_api.shared.errors import ResourceExhausted
from fluxlora_api.shared.files import check_upload_bytes, sha256_file
from fluxlora_api.v1 import transfers_pb2
from fluxlora_client import transfers, uploads
from fluxlora_client.connection import ServiceConnections
from fluxlora_client.errors import FluxloraClientError

# Which server a download goes through by default (any serves any readable key: they share one store);
# the one that wrote the key is the one a client talking to a single service has.
DOWNLOAD_SERVICE = {"uploads": "preprocessing", "datasets": "preprocessing", "runs": "training",
                    "grids": "evaluation", "generations": "evaluation"}
# A presigned URL this close to its expiry is not used: the client asks for fresh ones.
URL_MARGIN = datetime.timedelta(seconds=10)


class ArtifactTransfers(ServiceConnections):
    def upload_photos(self, folder: str | Path, *, stream: bool = False) -> str:
        """Uploads every file of a folder (recursively) under uploads/u-<content hash>/ and returns
        that prefix. The same photos give the same prefix, so an upload is never stored twice.

        `folder` may also be a .zip of photos: it is uploaded as one object under the prefix and
        the preprocessing service unpacks it (and refuses it if an entry points outside it).
        The preprocessing server hands out a presigned URL per file (an S3 store) or takes the bytes
        over gRPC (the local store; also `stream=True`, or when the URL's host cannot be reached);
        it checks every file's size and sha256 before the prefix counts as complete."""
        folder = Path(folder)
        if folder.is_file() and folder.suffix.lower() == ".zip":
            files, folder = [folder], folder.parent
        elif folder.is_file():
            raise FluxloraClientError("INVALID_ARGUMENT", f"{folder} is a file: pass a folder of photos or a .zip")
        else:
            files = sorted(p for p in folder.rglob("*") if p.is_file() and not p.name.startswith("."))
        if not files:
            raise FluxloraClientError("INVALID_ARGUMENT", f"{folder} holds no files")
        if self.max_upload_bytes:
            try:
                check_upload_bytes([p.stat().st_size for p in files], self.max_upload_bytes, str(folder))
            except ResourceExhausted as exc:
                raise FluxloraClientError(exc.code, exc.message) from None
        local = {p.relative_to(folder).as_posix(): p for p in files}
        declared = [transfers_pb2.UploadFileSpec(path=rel, size=p.stat().st_size, sha256=sha256_file(p))
                    for rel, p in local.items()]
        stub = self._transfers("preprocessing")
        for _ in range(3):  # URLs about to expire (a long upload): ask again for the files still missing
            upload = self._call(stub.CreateUpload, transfers_pb2.CreateUploadRequest(files=declared, stream=stream))
            if upload.complete:
                uploads.remember(upload.upload_prefix, folder)
                return upload.upload_prefix
            if self._send(stub, upload, local):
                break
        self._call(stub.CompleteUpload, transfers_pb2.CompleteUploadRequest(upload_prefix=upload.upload_prefix))
        uploads.remember(upload.upload_prefix, folder)  # messages can then name the user's folder
        return upload.upload_prefix

    def _send(self, stub, upload: transfers_pb2.CreateUploadResponse, local: dict[str, Path]) -> bool:
        """Sends the upload's targets; False when a URL expired before its turn came."""
        for target in upload.targets:
            path = local[target.path]
            if upload.mode == transfers_pb2.TRANSFER_MODE_PRESIGNED:
                if target.expires_at.ToDatetime(datetime.UTC) - URL_MARGIN <= datetime.datetime.now(datetime.UTC):
                    return False
                try:
                    transfers.put_url(target.url, dict(target.headers), path, self.timeout)
                    continue
                except transfers.Unreachable:
                    pass  # the store is not reachable from here: the server takes the bytes instead
            timeout = transfers.transfer_timeout(self.timeout, path.stat().st_size)
            self._call(stub.UploadFile, transfers.upload_chunks(upload.upload_prefix, target.path, path), timeout)
        return True

    def list_artifacts(self, prefix_or_key: str, *, include_urls: bool = False,
                       service: str | None = None) -> list[transfers_pb2.Artifact]:
        """The objects under a prefix ending in '/' (or one key) that clients may read: datasets/, runs/,
        grids/, generations/ and uploads/; with presigned GET URLs where the store has them."""
        stub = self._transfers(service or self._download_service(prefix_or_key))
        artifacts, token = [], ""
        while True:
            request = transfers_pb2.ListArtifactsRequest(prefix=prefix_or_key, include_urls=include_urls,
                                                         page_token=token)
            reply = self._call(stub.ListArtifacts, request)
            artifacts.extend(reply.artifacts)
            token = reply.next_page_token
            if not token:
                return artifacts

    def download(self, prefix_or_key: str, dest: str | Path, *, service: str | None = None) -> list[Path]:
        """Downloads one object (to dest/<name>) or every object under a prefix ending in '/' (to
        dest/<path under the prefix>), through presigned URLs or streamed by the server; sizes checked.
        service: the server to ask (default: the one that writes such keys; any can serve any)."""
        dest = Path(dest)
        service = service or self._download_service(prefix_or_key)
        paths = []
        for artifact in self.list_artifacts(prefix_or_key, include_urls=True, service=service):
            relative = (artifact.key[len(prefix_or_key):] if prefix_or_key.endswith("/")
                        else artifact.key.rsplit("/", 1)[-1])
            paths.append(self._fetch(service, artifact, transfers.local_target(dest, relative)))
        return paths

    def _fetch(self, service: str, artifact: transfers_pb2.Artifact, target: Path) -> Path:
        if artifact.url:
            try:
                return transfers.get_url(artifact.url, artifact.key, artifact.size, target, self.timeout)
            except transfers.Unreachable:
                pass  # the store is not reachable from here: the server streams it instead
        stream = self._call(self._transfers(service).DownloadFile, transfers_pb2.DownloadFileRequest(key=artifact.key),
                            transfers.transfer_timeout(self.timeout, artifact.size))
        try:
            return transfers.write_stream(target, artifact.key, stream)
        except grpc.RpcError as err:
            raise FluxloraClientError(err.code().name, err.details() or "") from None

    def _download_service(self, prefix_or_key: str) -> str:
        return DOWNLOAD_SERVICE.get(prefix_or_key.split("/", 1)[0], "preprocessing")
