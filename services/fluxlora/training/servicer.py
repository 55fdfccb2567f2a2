"""gRPC edge of the training service: validate, fill defaults, queue."""

from __future__ import annotations

import logging
from pathlib import Path

from fluxlora.common.grpc_status import grpc_errors
from fluxlora.common.limits import check_train_steps
from fluxlora.common.models import check_model_ref, is_store_ref
from fluxlora.domain.caption_versions import CaptionVersions
from fluxlora.domain.datasets import require_captions
from fluxlora.jobs.runtime import JobRuntime
from fluxlora.training.gpu_budget import plan_run
from fluxlora.training.job import config_from_spec
from fluxlora.training.memory import MemoryPlan
from fluxlora.training.trainer.config import TrainConfig, not_yet_runnable
from fluxlora_api.shared.errors import FailedPrecondition, FluxloraError, InvalidArgument, ResourceExhausted
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
        check_train_steps(spec.max_steps, self.runtime.settings.max_train_steps)
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
        checkable = self._resolve_base_model(spec)
        missing = not_yet_runnable(cfg)
        if missing:
            raise FailedPrecondition(f"this training server cannot run {'; '.join(missing)}: leave them unset")
        if checkable:
            self._check_memory(spec.base_model, cfg)
        if not spec.sample_prompts:
            spec.sample_prompts.append(captions["trigger_word"])
        return self.runtime.submit(spec, request.request_id)

    @grpc_errors
    def PlanTraining(self, request, context):
        spec = pb.TrainSpec()
        spec.CopyFrom(request.spec)
        if request.target_gib < 0:
            raise InvalidArgument("target_gib must be >= 0 (0: the server's target GPU)")
        cfg = config_from_spec(spec)
        if not self._resolve_base_model(spec):
            raise FailedPrecondition(
                f"base model {spec.base_model!r} is a path in the training pods, which this server cannot read: "
                "plan with a store:// base model, or on a server that sees the directory"
            )
        settings = self.runtime.settings
        if request.target_gib:
            settings = settings.model_copy(update={"gpu_memory_gib": request.target_gib})
        plan = plan_run(spec.base_model, self.runtime.store, cfg, settings)
        if plan is None:
            raise FailedPrecondition("the memory check is off on this server (FLUXLORA_GPU_MEMORY_GIB=0): "
                                     "pass target_gib to plan for a GPU")
        return plan_message(plan)

    def _resolve_base_model(self, spec: pb.TrainSpec) -> bool:
        """Fill in the default base model and check it exists; False when it cannot be checked here."""
        spec.base_model = spec.base_model or self.runtime.settings.base_model
        local = bool(spec.base_model) and not is_store_ref(spec.base_model)
        if local:
            spec.base_model = str(Path(spec.base_model).expanduser())
        # Under the Kubernetes runner a local path names a directory in the Job's pod (a mounted
        # volume), which this server cannot see: the worker checks it when the run starts.
        if local and self.runtime.settings.runner == "kubernetes":
            return False
        check_model_ref(spec.base_model, self.runtime.store, "base model")
        if local and not (Path(spec.base_model) / "model_index.json").exists():
            raise FailedPrecondition(
                f"base model {spec.base_model!r} is not a diffusers-layout directory (no model_index.json)"
            )
        return True

    def _check_memory(self, base_model: str, cfg: TrainConfig) -> None:
        """RESOURCE_EXHAUSTED for a run the memory planner says would not fit the target GPU:
        refused in seconds at submit rather than out of memory minutes into loading the model."""
        try:
            plan = plan_run(base_model, self.runtime.store, cfg, self.runtime.settings)
        except FluxloraError:
            raise
        except ValueError as exc:  # an option the model cannot take, e.g. too many blocks to swap
            raise InvalidArgument(f"spec: {exc}") from exc
        except Exception:  # noqa: BLE001 - the planner is advice: its own failure must not block a run
            log.warning("memory planner failed for base model %s; submitting unchecked", base_model, exc_info=True)
            return
        if plan is not None and not plan.fits:
            raise ResourceExhausted(f"{plan.explain()}. The target is FLUXLORA_GPU_MEMORY_GIB on the training server")


def plan_message(plan: MemoryPlan) -> pb.TrainingPlan:
    e = plan.estimate
    return pb.TrainingPlan(
        total_gib=e.total_gib, step_peak_gib=e.step_peak_gib, weights_gib=e.weights_gib, overhead_gib=e.overhead_gib,
        mode=e.mode, target_gib=plan.target_gib, fits=plan.fits, explanation=plan.explain(),
        alternatives=[
            pb.PlanAlternative(changes={k: _text(v) for k, v in a.changes.items()}, total_gib=a.estimate.total_gib,
                               unavailable=a.unavailable)
            for a in plan.alternatives
        ],
    )


def _text(value) -> str:
    return str(value).lower() if isinstance(value, bool) else str(value)
