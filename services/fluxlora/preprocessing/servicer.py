"""gRPC edge of the preprocessing service: validate, fill defaults, queue."""

from __future__ import annotations

from pathlib import PurePosixPath

from fluxlora.common.grpc_status import grpc_errors
from fluxlora.common.storage import validate_prefix
from fluxlora.common.transfers import upload_incomplete
from fluxlora.domain.archives import ARCHIVE_SUFFIXES
from fluxlora.jobs.runtime import JobRuntime
from fluxlora.preprocessing.defaults import DEFAULTS
from fluxlora.preprocessing.job import options_from_spec
from fluxlora.preprocessing.naming import folder_name
from fluxlora_api.shared.errors import FailedPrecondition, InvalidArgument, NotFound
from fluxlora_api.shared.files import check_upload_bytes
from fluxlora_api.v1 import preprocessing_pb2 as pb
from fluxlora_api.v1 import preprocessing_pb2_grpc

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".tif", ".tiff", ".bmp"}
ACCEPTED_SUFFIXES = IMAGE_SUFFIXES | ARCHIVE_SUFFIXES


class PreprocessingServicer(preprocessing_pb2_grpc.PreprocessingServiceServicer):
    def __init__(self, runtime: JobRuntime):
        self.runtime = runtime

    @grpc_errors
    def SubmitPreprocess(self, request, context):
        spec = pb.PreprocessSpec()
        spec.CopyFrom(request.spec)
        if not spec.source_prefix.strip():
            raise InvalidArgument("spec.source_prefix is empty: upload photos first (client.upload_photos)")
        spec.source_prefix = validate_prefix(spec.source_prefix)
        spec.base_size = spec.base_size or DEFAULTS.base_size
        options_from_spec(spec)  # validates every option with a message naming the field
        folder = folder_name(spec.source_prefix)
        if upload_incomplete(self.runtime.store, spec.source_prefix):
            raise FailedPrecondition("the upload is not complete: finish it (CompleteUpload; "
                                     "client.upload_photos does) before preprocessing it")
        objects = list(self.runtime.store.list(spec.source_prefix))
        names = [o.key[len(spec.source_prefix):] for o in objects]
        if not names:
            raise NotFound(f"{folder} holds no files: upload photos first (client.upload_photos)")
        check_upload_bytes([o.size for o in objects], self.runtime.settings.max_upload_bytes, folder)
        if not any(PurePosixPath(n).suffix.lower() in ACCEPTED_SUFFIXES for n in names):
            raise InvalidArgument(
                f"{folder} holds {len(names)} file{'s' if len(names) != 1 else ''} but no images or zips "
                f"(expected {', '.join(sorted(ACCEPTED_SUFFIXES))}), e.g. {names[0]!r}"
            )
        return self.runtime.submit(spec, request.request_id, request.webhook_urls)
