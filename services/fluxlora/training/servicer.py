"""gRPC edge of the training service: validate, fill defaults, queue."""

from __future__ import annotations

import logging
from pathlib import Path

from fluxlora.captioning.versions import CaptionVersions
from fluxlora.common.datasets import require_captions
from fluxlora.common.errors import FailedPrecondition, FluxloraError, InvalidArgument, ResourceExhausted
from fluxlora.common.grpc_status import grpc_errors
from fluxlora.common.models import check_model_ref, is_store_ref
from fluxlora.jobs.runtime import JobRuntime
from fluxlora.training.gpu_budget import plan_run
from fluxlora.training.job import config_from_spec
from fluxlora.training.trainer.config import TrainConfig, not_yet_runnable
from fluxlora_api.v1 import training_pb2 as pb
from fluxlora_api.v1 import training_pb2_grpc

log = logging.getLogger(__name__)


class TrainingServicer(training_pb2_grpc.TrainingServiceServicer):
    def __init__(self, runtime: JobRuntime):
        self.runtime = runtime

    @grpc_errors
    def SubmitTraining(self, request, context):
        spec = pb.TrainSpec()
        spec.CopyFrom(request.spec)
        captions = require_captions(self.runtime.store, spec.dataset_id)
        if spec.caption_version < 0:
            raise InvalidArgument("spec.caption_version must be >= 0 (0: the dataset's current captions)")
        if spec.caption_version:
            version = CaptionVersions(self.runtime.store, spec.dataset_id).get(spec.caption_version)
            if not version.approved:
                raise FailedPrecondition(
                    f"caption version {spec.caption_version} of dataset {spec.dataset_id!r} is not approved: "
                    "approve it first (fluxlora caption approve) or leave caption_version unset"
                )
            captions = {"trigger_word": version.trigger_word}
        elif captions.get("approved_version"):
            spec.caption_version = captions["approved_version"]
        cfg = config_from_spec(spec)  # INVALID_ARGUMENT naming the field, before anything is queued
        spec.base_model = spec.base_model or self.runtime.settings.base_model
        local = bool(spec.base_model) and not is_store_ref(spec.base_model)
        if local:
            spec.base_model = str(Path(spec.base_model).expanduser())
        # Under the Kubernetes runner a local path names a directory in the Job's pod (a mounted
        # volume), which this server cannot see: the worker checks it when the run starts.
        checkable = not (local and self.runtime.settings.runner == "kubernetes")
        if checkable:
            check_model_ref(spec.base_model, self.runtime.store, "base model")
        if checkable and local and not (Path(spec.base_model) / "model_index.json").exists():
            raise FailedPrecondition(
                f"base model {spec.base_model!r} is not a diffusers-layout directory (no model_index.json)"
            )
        missing = not_yet_runnable(cfg)
        if missing:
            raise FailedPrecondition(f"this training server cannot run {'; '.join(missing)}: leave them unset")
        if checkable:
            self._check_memory(spec.base_model, cfg)
        if not spec.sample_prompts:
            spec.sample_prompts.append(captions["trigger_word"])
        return self.runtime.submit(spec, request.request_id)

    def _check_memory(self, base_model: str, cfg: TrainConfig) -> None:
        """RESOURCE_EXHAUSTED for a run the memory planner says would not fit the target GPU:
        refused in seconds at submit rather than out of memory minutes into loading the model."""
        try:
            plan = plan_run(base_model, self.runtime.store, cfg, self.runtime.settings)
        except FluxloraError:
            raise
        except Exception:  # noqa: BLE001 - the planner is advice: its own failure must not block a run
            log.warning("memory planner failed for base model %s; submitting unchecked", base_model, exc_info=True)
            return
        if plan is not None and not plan.fits:
            raise ResourceExhausted(f"{plan.explain()}. The target is FLUXLORA_GPU_MEMORY_GIB on the training server")
