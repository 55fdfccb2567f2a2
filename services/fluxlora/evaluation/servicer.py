"""gRPC edge of the evaluation service: validate, fill defaults, queue (see validation.py)."""

from __future__ import annotations

from fluxlora.common.config import Settings
from fluxlora.common.grpc_status import grpc_errors
from fluxlora.evaluation.validation import generate_spec, grid_spec
from fluxlora.jobs.runtime import JobRuntime
from fluxlora_api.v1 import evaluation_pb2_grpc


class EvaluationServicer(evaluation_pb2_grpc.EvaluationServiceServicer):
    def __init__(self, runtime: JobRuntime):
        self.runtime = runtime
        self.settings = runtime.settings or Settings()

    @grpc_errors
    def SubmitGrid(self, request, context):
        spec = grid_spec(request.spec, self.runtime.store, self.settings)
        return self.runtime.submit(spec, request.request_id, request.webhook_urls)

    @grpc_errors
    def SubmitGenerate(self, request, context):
        spec = generate_spec(request.spec, self.runtime.store, self.settings)
        return self.runtime.submit(spec, request.request_id, request.webhook_urls)
