"""gRPC edge of TransferService, which every server serves over its store (fluxlora.common.transfers)."""

from __future__ import annotations

import itertools
from collections.abc import Iterator

from google.protobuf.timestamp_pb2 import Timestamp

from fluxlora.common.config import Settings
from fluxlora.common.grpc_status import grpc_errors
from fluxlora.common.storage import ArtifactStore
from fluxlora.common.transfers import Transfers
from fluxlora_api.shared.errors import InvalidArgument
from fluxlora_api.v1 import transfers_pb2 as pb
from fluxlora_api.v1 import transfers_pb2_grpc

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["TransferService"].full_name


def _timestamp(value) -> Timestamp | None:
    if value is None:
        return None
    stamp = Timestamp()
    stamp.FromDatetime(value)
    return stamp


class TransferServicer(transfers_pb2_grpc.TransferServiceServicer):
    def __init__(self, store: ArtifactStore, settings: Settings):
        self.transfers = Transfers(store, max_upload_bytes=settings.max_upload_bytes,
                                   expiry_s=settings.presign_expiry_s, stream_only=settings.transfer_mode == "stream")

    @grpc_errors
    def CreateUpload(self, request, context):
        upload = self.transfers.create_upload(((f.path, f.size, f.sha256) for f in request.files), request.stream)
        return pb.CreateUploadResponse(
            upload_prefix=upload.prefix, complete=upload.complete,
            mode=pb.TRANSFER_MODE_PRESIGNED if upload.presigned else pb.TRANSFER_MODE_STREAM,
            targets=[pb.UploadTarget(path=t.path, key=t.key, url=t.url, headers=t.headers,
                                     expires_at=_timestamp(t.expires_at)) for t in upload.targets],
        )

    @grpc_errors
    def UploadFile(self, request_iterator, context):
        chunks = iter(request_iterator)
        first = next(chunks, None)
        if first is None or not first.path:
            raise InvalidArgument("UploadFile's first chunk must name upload_prefix and path")

        def data() -> Iterator[bytes]:
            for chunk in itertools.chain([first], chunks):
                if chunk is not first and ((chunk.path and chunk.path != first.path) or
                                           (chunk.upload_prefix and chunk.upload_prefix != first.upload_prefix)):
                    raise InvalidArgument("one UploadFile stream carries one file: open a stream per file")
                yield chunk.data

        info = self.transfers.receive(first.upload_prefix, first.path, data())
        return pb.UploadFileResponse(key=info.key, size=info.size, sha256=info.sha256)

    @grpc_errors
    def CompleteUpload(self, request, context):
        files, total = self.transfers.complete(request.upload_prefix)
        return pb.CompleteUploadResponse(upload_prefix=request.upload_prefix, file_count=files, total_bytes=total)

    @grpc_errors
    def ListArtifacts(self, request, context):
        listed, token = self.transfers.list_artifacts(request.prefix, request.include_urls, request.page_size,
                                                      request.page_token)
        return pb.ListArtifactsResponse(
            artifacts=[pb.Artifact(key=a.info.key, size=a.info.size, url=a.url, expires_at=_timestamp(a.expires_at))
                       for a in listed],
            next_page_token=token,
        )

    @grpc_errors
    def DownloadFile(self, request, context):
        size, chunks = self.transfers.download(request.key)
        yield pb.DownloadChunk(size=size)
        for data in chunks:
            yield pb.DownloadChunk(data=data)
