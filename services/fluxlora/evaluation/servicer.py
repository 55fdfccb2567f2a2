"""gRPC edge of the evaluation service: validate, fill defaults from the run, queue."""

from __future__ import annotations

from fluxlora.common.errors import InvalidArgument
from fluxlora.common.grpc_status import grpc_errors
from fluxlora.common.models import check_model_ref
from fluxlora.common.runs import require_run, select_checkpoints
from fluxlora.jobs.runtime import JobRuntime
from fluxlora_api.v1 import evaluation_pb2 as pb
from fluxlora_api.v1 import evaluation_pb2_grpc

DEFAULT_STRENGTHS = (0.0, 0.2, 0.4, 0.6, 0.8, 1.0)
MAX_STRENGTH = 2.0
MAX_CELLS = 64


class EvaluationServicer(evaluation_pb2_grpc.EvaluationServiceServicer):
    def __init__(self, runtime: JobRuntime):
        self.runtime = runtime

    @grpc_errors
    def SubmitGrid(self, request, context):
        spec = pb.GridSpec()
        spec.CopyFrom(request.spec)
        store = self.runtime.store
        run = require_run(store, spec.run_id)
        checkpoints = select_checkpoints(store, spec.run_id, list(spec.checkpoint_steps))
        if not spec.checkpoint_steps:
            spec.checkpoint_steps.extend(checkpoints)
        if not spec.strengths:
            spec.strengths.extend(DEFAULT_STRENGTHS)
        bad = [s for s in spec.strengths if not -MAX_STRENGTH <= s <= MAX_STRENGTH]
        if bad:
            raise InvalidArgument(f"strengths must lie in [-{MAX_STRENGTH}, {MAX_STRENGTH}]; got {bad}")
        cells = len(spec.checkpoint_steps) * len(spec.strengths)
        if cells > MAX_CELLS:
            raise InvalidArgument(
                f"grid of {len(spec.checkpoint_steps)} checkpoints x {len(spec.strengths)} strengths = {cells} "
                f"cells exceeds the limit of {MAX_CELLS}; pick fewer checkpoint_steps or strengths"
            )
        config = run["config"]
        if spec.prompt and not spec.prompt.strip():
            raise InvalidArgument("spec.prompt is blank; leave it empty to use the run's sample prompt")
        spec.prompt = spec.prompt or (config["sample_prompts"] or [run["trigger_word"]])[0]
        if not spec.HasField("seed"):
            spec.seed = 42
        if spec.width < 0 or spec.height < 0 or spec.steps < 0:
            raise InvalidArgument("width, height and steps must be >= 0 (0 means the default)")
        spec.width = spec.width or config["resolution"]
        spec.height = spec.height or config["resolution"]
        if spec.width % 16 or spec.height % 16:
            raise InvalidArgument(f"width and height must be multiples of 16, got {spec.width}x{spec.height}")
        spec.steps = spec.steps or 20
        if not spec.HasField("guidance"):
            spec.guidance = config.get("guidance", 3.5)
        spec.base_model = spec.base_model or run["base_model"]
        check_model_ref(spec.base_model, store, "base model")
        return self.runtime.submit(spec, request.request_id)
