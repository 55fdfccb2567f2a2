"""gRPC edge of the captioning service: validate, fill defaults, queue."""

from __future__ import annotations

from fluxlora.captioning.captioners.base import known_captioners
from fluxlora.captioning.cleaning import validate_trigger
from fluxlora.common.datasets import require_dataset
from fluxlora.common.errors import InvalidArgument
from fluxlora.common.grpc_status import grpc_errors
from fluxlora.common.models import check_model_ref
from fluxlora.jobs.runtime import JobRuntime
from fluxlora_api.v1 import captioning_pb2 as pb
from fluxlora_api.v1 import captioning_pb2_grpc

TASKS = ("<CAPTION>", "<DETAILED_CAPTION>", "<MORE_DETAILED_CAPTION>")
POSITIONS = ("start", "end", "keep")


class CaptioningServicer(captioning_pb2_grpc.CaptioningServiceServicer):
    def __init__(self, runtime: JobRuntime):
        self.runtime = runtime

    @grpc_errors
    def SubmitCaption(self, request, context):
        spec = pb.CaptionSpec()
        spec.CopyFrom(request.spec)
        require_dataset(self.runtime.store, spec.dataset_id)
        try:
            spec.trigger_word = validate_trigger(spec.trigger_word)
        except ValueError as exc:
            raise InvalidArgument(f"spec.trigger_word: {exc}") from exc
        spec.captioner = spec.captioner or "florence2"
        if spec.captioner not in known_captioners():
            raise InvalidArgument(f"unknown captioner {spec.captioner!r}; choose one of {known_captioners()}")
        spec.task = spec.task or "<CAPTION>"
        if spec.task not in TASKS:
            raise InvalidArgument(f"unknown task {spec.task!r}; choose one of {TASKS}")
        spec.trigger_position = spec.trigger_position or "start"
        if spec.trigger_position not in POSITIONS:
            raise InvalidArgument(f"trigger_position must be one of {POSITIONS}, not {spec.trigger_position!r}")
        if spec.batch_size < 0 or spec.max_new_tokens < 0:
            raise InvalidArgument("batch_size and max_new_tokens must be >= 0")
        spec.batch_size = spec.batch_size or 8
        spec.max_new_tokens = spec.max_new_tokens or 64
        spec.model = spec.model or self.runtime.settings.caption_model
        check_model_ref(spec.model, self.runtime.store, "captioning model")
        return self.runtime.submit(spec, request.request_id)
