"""gRPC edge of the training service: validate, fill defaults, queue."""

from __future__ import annotations

from pathlib import Path

from fluxlora.common.datasets import require_captions
from fluxlora.common.errors import FailedPrecondition
from fluxlora.common.grpc_status import grpc_errors
from fluxlora.common.models import check_model_ref, is_store_ref
from fluxlora.jobs.runtime import JobRuntime
from fluxlora.training.job import config_from_spec
from fluxlora_api.v1 import training_pb2 as pb
from fluxlora_api.v1 import training_pb2_grpc


class TrainingServicer(training_pb2_grpc.TrainingServiceServicer):
    def __init__(self, runtime: JobRuntime):
        self.runtime = runtime

    @grpc_errors
    def SubmitTraining(self, request, context):
        spec = pb.TrainSpec()
        spec.CopyFrom(request.spec)
        captions = require_captions(self.runtime.store, spec.dataset_id)
        config_from_spec(spec)  # INVALID_ARGUMENT naming the field, before anything is queued
        spec.base_model = spec.base_model or self.runtime.settings.base_model
        check_model_ref(spec.base_model, self.runtime.store, "base model")
        if not is_store_ref(spec.base_model) and not (Path(spec.base_model) / "model_index.json").exists():
            raise FailedPrecondition(
                f"base model {spec.base_model!r} is not a diffusers-layout directory (no model_index.json)"
            )
        if not spec.sample_prompts:
            spec.sample_prompts.append(captions["trigger_word"])
        return self.runtime.submit(spec, request.request_id)
