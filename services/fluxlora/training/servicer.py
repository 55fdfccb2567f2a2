"""gRPC edge of the training service: validate, fill defaults, queue."""

from __future__ import annotations

import logging
from pathlib import Path

from fluxlora.common import keys
from fluxlora.common.grpc_status import grpc_errors
from fluxlora.common.limits import INT64_MAX, Bound, check_numbers, check_train_steps
from fluxlora.common.models import check_model_ref, is_store_ref
from fluxlora.domain.caption_versions import CaptionVersions
from fluxlora.domain.datasets import dataset_base_size, require_captions
from fluxlora.jobs.kueue_flavors import ClusterQueueGpus, asks_for_gpus
from fluxlora.jobs.launch import gpus_of, nodes_of
from fluxlora.jobs.runtime import JobRuntime
from fluxlora.models.base_model import default_components, is_single_file
from fluxlora.training.families import check_family
from fluxlora.training.gpu_budget import gpu_target, pick_for_run, plan_run
from fluxlora.training.job import config_from_spec
from fluxlora.training.memory import MemoryPlan
from fluxlora.training.memory.auto import MEMORY_OPTIONS, AutoChoice
from fluxlora.training.parallelism import MAX_GPUS, MAX_NODES, check_parallelism
from fluxlora.training.trainer.config import TrainConfig, not_yet_runnable
from fluxlora_api.shared.errors import FailedPrecondition, FluxloraError, InvalidArgument, ResourceExhausted
from fluxlora_api.v1 import jobs_pb2, training_pb2_grpc
from fluxlora_api.v1 import training_pb2 as pb

log = logging.getLogger(__name__)

S = jobs_pb2.JobState
MAX_RESOLUTION = 2048  # FLUX.1 trains at 512 to 1024; 2048 px is 4x the activations of 1024
MAX_SAMPLE_STEPS = 500  # as evaluation's steps (fluxlora.evaluation.validation.MAX_STEPS)
MEMORY_MODES = ("auto", "manual")


def bounds(settings) -> dict[str, Bound]:
    """Every numeric TrainSpec field (fluxlora.common.limits.check_numbers); the memory planner then
    checks that the run fits the target GPU."""
    steps = settings.max_train_steps
    every = Bound(0, steps, f"0 means only at the last step; at most FLUXLORA_MAX_TRAIN_STEPS={steps}")
    return {
        "resolution": Bound(0, MAX_RESOLUTION, "0 means the dataset's base size (else 512); a multiple of 16; "
                           "FLUX.1 trains at 512 to 1024"),
        "max_steps": Bound(0, steps, "0 means 3000; FLUXLORA_MAX_TRAIN_STEPS"),
        "learning_rate": Bound(0, 1.0, "0 means 1e-4 (1.0 with prodigy)"),
        "rank": Bound(0, 1024, "0 means 16"),
        "alpha": Bound(0, 4096, "0 means the rank"),
        "batch_size": Bound(0, 64, "0 means 1; the memory planner checks that it fits the GPU"),
        "seed": Bound(0, INT64_MAX),
        "checkpoint_every": every,
        "sample_every": every,
        "guidance": Bound(0, 100, "3.5 is FLUX.1-dev's default"),
        "sample_steps": Bound(0, MAX_SAMPLE_STEPS, "0 means 20; FLUX samples well in 20 to 50"),
        "blocks_to_swap": Bound(0, 128, "at most 35 on FLUX.1, checked against the model"),
        "caption_version": Bound(0, 2**31 - 1, "0 means the dataset's current captions"),
        "lr_warmup_steps": Bound(0, steps, "at most max_steps"),
        "gradient_accumulation": Bound(0, 1024, "0 means 1"),
        "caption_dropout": Bound(0, 0.99, "a fraction of steps; 0 turns it off"),
        "sigmoid_scale": Bound(0, 10, "0 means 1.0"),
        "timestep_shift": Bound(0, 100, "0 means 3.0"),
        "max_sequence_length": Bound(0, 512, "0 means 512, T5's limit"),
        "weight_decay": Bound(0, 10, "AdamW's decoupled decay; 1e-4 by default"),
        "max_grad_norm": Bound(0, 1e6, "0 turns clipping off"),
        "gpus": Bound(0, MAX_GPUS, "0 means 1; the GPUs of one node, one training process each"),
        "nodes": Bound(0, MAX_NODES, "0 means 1"),
    }


class TrainingServicer(training_pb2_grpc.TrainingServiceServicer):
    def __init__(self, runtime: JobRuntime):
        self.runtime = runtime

    @grpc_errors
    def SubmitTraining(self, request, context):
        spec = pb.TrainSpec()
        spec.CopyFrom(request.spec)
        check_train_steps(spec.max_steps, self.runtime.settings.max_train_steps)
        check_numbers(spec, bounds(self.runtime.settings))
        if spec.resume_from_run:
            self._resume(spec, request.request_id)
        check_parallelism(spec, self.runtime.settings)
        self._check_gpu_quota(spec)
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
        self._default_resolution(spec)
        cfg = config_from_spec(spec)  # INVALID_ARGUMENT naming the field, before anything is queued
        auto = _memory_mode(spec) == "auto" and not spec.resume_from_run  # a resumed run keeps its options
        checkable = self._resolve_base_model(spec)
        missing = not_yet_runnable(cfg)
        if missing:
            raise FailedPrecondition(f"this training server cannot run {'; '.join(missing)}: leave them unset")
        choice = None
        if checkable and auto:
            choice = self._pick_memory(spec, cfg)
            if choice is not None:
                _apply(spec, choice)
        if checkable and choice is None:
            self._check_memory(spec, cfg)
        if not spec.sample_prompts:
            spec.sample_prompts.append(captions["trigger_word"])
        job = self.runtime.submit(spec, request.request_id, request.webhook_urls)
        if choice is not None and choice.describe() not in job.notes:
            # in the job before the run starts (a retry of the request_id finds it there already)
            note = choice.describe()
            self.runtime.update(job.job_id, lambda j: None if note in j.notes else j.notes.append(note),
                                message=f"memory: {note}")
            job = self.runtime.get(job.job_id)
        return job

    @grpc_errors
    def PlanTraining(self, request, context):
        spec = pb.TrainSpec()
        spec.CopyFrom(request.spec)
        if request.target_gib < 0:
            raise InvalidArgument("target_gib must be >= 0 (0: the server's target GPU)")
        check_numbers(spec, bounds(self.runtime.settings))
        if spec.dataset_id:
            self._default_resolution(spec)
        cfg = config_from_spec(spec)
        if not self._resolve_base_model(spec, to_train=False):
            raise FailedPrecondition(
                f"base model {spec.base_model!r} is a path in the training pods, which this server cannot read: "
                "plan with a store:// base model, or on a server that sees the directory"
            )
        settings = self.runtime.settings
        cluster = self._check_gpu_quota(spec)
        if request.target_gib:
            settings = settings.model_copy(update={"gpu_memory_gib": request.target_gib})
        choice = None
        if _memory_mode(spec) == "auto":
            choice = pick_for_run(spec.base_model, self.runtime.store, cfg, settings, _given_memory_options(spec),
                                  cluster, spec.base_components)
            if choice is not None:
                cfg = cfg.model_copy(update=choice.changes)
        plan = plan_run(spec.base_model, self.runtime.store, cfg, settings, cluster, spec.base_components)
        target = gpu_target(settings, cluster)
        if plan is None or target is None:
            raise FailedPrecondition("the memory check is off on this server (FLUXLORA_GPU_MEMORY_GIB=0): "
                                     "pass target_gib to plan for a GPU")
        message = plan_message(plan)
        message.target_source = "the request's target_gib" if request.target_gib else target.source
        if cluster is not None:
            message.cluster_queue = cluster.cluster_queue
            message.flavors.extend(flavor_fits(plan, cluster, gpus_of(spec) * nodes_of(spec)))
        if choice is not None:
            message.memory_choice = choice.describe()
            message.picked.update({k: _text(v) for k, v in choice.changes.items()})
        return message

    def _check_gpu_quota(self, spec: pb.TrainSpec) -> ClusterQueueGpus | None:
        """FAILED_PRECONDITION for a run Kueue would never admit: more GPUs (gpus x nodes) than any
        flavor of its ClusterQueue can ever give. It would otherwise be accepted and wait forever; one
        within the quota is accepted and waits for the GPUs to be free. Returns the ClusterQueue's GPUs
        (None without Kueue, or when they cannot be read: then nothing is checked)."""
        cluster = self.runtime.cluster_gpus()
        if cluster is not None and asks_for_gpus(self.runtime.settings.k8s_resources):
            gpus, nodes = gpus_of(spec), nodes_of(spec)
            refusal = cluster.over_quota(gpus * nodes, f"the run (spec.gpus {gpus} x spec.nodes {nodes})")
            if refusal:
                raise FailedPrecondition(refusal)
        return cluster

    def _resume(self, spec: pb.TrainSpec, request_id: str) -> None:
        """Turns a resume_from_run request into the spec of the run it continues (max_steps may be
        raised; other set fields must equal the run's): the job then trains on from the run's last
        stored checkpoint, in the same runs/<run_id>/."""
        name = spec.resume_from_run.strip()
        job = self.runtime.get(name)  # NOT_FOUND for an unknown run
        state = S.Name(job.state).removeprefix("JOB_STATE_")
        if job.state == S.JOB_STATE_SUCCEEDED:
            raise FailedPrecondition(f"spec.resume_from_run: run {name} succeeded already, there is nothing to "
                                     "resume: train a new run (a larger max_steps needs a new run)")
        if job.state not in (S.JOB_STATE_FAILED, S.JOB_STATE_CANCELLED):
            raise FailedPrecondition(f"spec.resume_from_run: run {name} is {state}: wait for it to end (or cancel "
                                     "it), then resume it")
        earlier = pb.TrainSpec()
        job.spec.Unpack(earlier)
        run_id = earlier.resume_from_run or job.job_id  # a resumed run's own resume goes on in the first run
        if self.runtime.store.exists(keys.run_prefix(run_id) + "report.json"):
            raise FailedPrecondition(f"spec.resume_from_run: run {run_id} was finished already (by a job that "
                                     "resumed it): there is nothing to resume")
        for active in self.runtime.list([S.JOB_STATE_QUEUED, S.JOB_STATE_RUNNING], limit=0):
            other = pb.TrainSpec()
            active.spec.Unpack(other)
            if other.resume_from_run == run_id and not (request_id and active.request_id == request_id):
                raise FailedPrecondition(f"spec.resume_from_run: job {active.job_id} resumes run {run_id} already "
                                         f"({S.Name(active.state)}): watch that job, or cancel it first")
        for field, value in spec.ListFields():
            if field.name in ("resume_from_run", "max_steps"):
                continue
            before = getattr(earlier, field.name)
            if _plain(before) != _plain(value):
                raise InvalidArgument(
                    f"spec.{field.name} is {_plain(value)!r} but run {name} was trained with {_plain(before)!r}: a "
                    f"resumed run keeps its spec (only max_steps may be raised); leave spec.{field.name} unset"
                )
        max_steps = spec.max_steps or earlier.max_steps
        if earlier.max_steps and max_steps < earlier.max_steps:
            raise InvalidArgument(f"spec.max_steps is {max_steps}, under the {earlier.max_steps} run {name} was "
                                  "started with: a resumed run may only train longer")
        spec.CopyFrom(earlier)
        spec.max_steps = max_steps
        spec.resume_from_run = run_id

    def _default_resolution(self, spec: pb.TrainSpec) -> None:
        """An unset resolution follows the dataset: the base size it was preprocessed at (recorded in
        the accepted spec), so images are trained at the size they were cropped to."""
        if not spec.resolution and not spec.resume_from_run:  # a resumed run keeps its run's resolution
            size = dataset_base_size(self.runtime.store, spec.dataset_id)
            if size:
                spec.resolution = min(size, MAX_RESOLUTION)

    def _resolve_base_model(self, spec: pb.TrainSpec, to_train: bool = True) -> bool:
        """Fill in the default base model and check it exists and its family (trainable when
        `to_train`); False when it cannot be checked here."""
        spec.base_model = spec.base_model or self.runtime.settings.base_model
        local = bool(spec.base_model) and not is_store_ref(spec.base_model)
        if local:
            spec.base_model = str(Path(spec.base_model).expanduser())
        single = is_single_file(spec.base_model)
        if single:
            spec.base_components = spec.base_components or default_components(self.runtime.settings)
        elif spec.base_components:
            raise InvalidArgument(f"spec.base_components is only for a single .safetensors base model; base model "
                                  f"{spec.base_model!r} is a folder with its own components: leave it unset")
        # Under the Kubernetes runner a local path names a directory in the Job's pod (a mounted
        # volume), which this server cannot see: the worker checks it when the run starts.
        if local and self.runtime.settings.runner == "kubernetes":
            return False
        if single:
            check_family(spec.base_model, spec.family, self.runtime.store, to_train=to_train,
                         components=spec.base_components)
            return True
        check_model_ref(spec.base_model, self.runtime.store, "base model")
        if local and not (Path(spec.base_model) / "model_index.json").exists():
            raise FailedPrecondition(
                f"base model {spec.base_model!r} is not a diffusers-layout directory (no model_index.json)"
            )
        check_family(spec.base_model, spec.family, self.runtime.store, to_train=to_train)
        return True

    def _pick_memory(self, spec: pb.TrainSpec, cfg: TrainConfig) -> AutoChoice | None:
        """memory_mode auto: the planner's pick for the target GPU; None when nothing fits (the manual
        check then refuses the run with the options that would fit) or the planner cannot say."""
        try:
            return pick_for_run(spec.base_model, self.runtime.store, cfg, self.runtime.settings,
                                _given_memory_options(spec), self.runtime.cluster_gpus(), spec.base_components)
        except FluxloraError:
            raise
        except ValueError as exc:  # an option the model cannot take, e.g. too many blocks to swap
            raise InvalidArgument(f"spec: {exc}") from exc
        except Exception:  # noqa: BLE001 - the planner is advice: its own failure must not block a run
            log.warning("memory planner failed for base model %s; submitting unchecked", spec.base_model,
                        exc_info=True)
            return None

    def _check_memory(self, spec: pb.TrainSpec, cfg: TrainConfig) -> None:
        """RESOURCE_EXHAUSTED for a run the memory planner says would not fit the target GPU:
        refused in seconds at submit rather than out of memory minutes into loading the model."""
        cluster = self.runtime.cluster_gpus()
        base_model = spec.base_model
        try:
            plan = plan_run(base_model, self.runtime.store, cfg, self.runtime.settings, cluster, spec.base_components)
        except FluxloraError:
            raise
        except ValueError as exc:  # an option the model cannot take, e.g. too many blocks to swap
            raise InvalidArgument(f"spec: {exc}") from exc
        except Exception:  # noqa: BLE001 - the planner is advice: its own failure must not block a run
            log.warning("memory planner failed for base model %s; submitting unchecked", base_model, exc_info=True)
            return
        target = gpu_target(self.runtime.settings, cluster)
        if plan is not None and target is not None and not plan.fits:
            raise ResourceExhausted(f"{plan.explain()}. The target is {target.source}")


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


def flavor_fits(plan: MemoryPlan, cluster: ClusterQueueGpus, gpus: int) -> list[pb.FlavorFit]:
    """Each flavor: whether the run fits its GPU's memory and `gpus` (gpus x nodes) its quota."""
    total = plan.estimate.total_gib
    return [pb.FlavorFit(name=f.name, gpu_product=f.gpu_product, gpu_memory_gib=f.gpu_memory_gib or 0.0,
                         gpu_quota=f.gpu_quota, fits=f.gpu_memory_gib is not None and total <= f.gpu_memory_gib,
                         gpu_limit=f.gpu_limit, fits_quota=f.fits_quota(gpus))
            for f in cluster.flavors]


def _memory_mode(spec: pb.TrainSpec) -> str:
    mode = spec.memory_mode.strip().lower() or "auto"
    if mode not in MEMORY_MODES:
        raise InvalidArgument(f"spec.memory_mode is {spec.memory_mode!r}: choose auto (the planner picks the fastest "
                              "memory options that fit the GPU) or manual (the options as given)")
    return mode


def _given_memory_options(spec: pb.TrainSpec) -> set[str]:
    """The memory options the request set itself: memory_mode auto keeps them."""
    given = {f.name for f, _ in spec.ListFields()} & set(MEMORY_OPTIONS)
    return given


def _apply(spec: pb.TrainSpec, choice: AutoChoice) -> None:
    """Records the picked memory options in the accepted spec (what the run's spec.json keeps)."""
    spec.memory_mode = "auto"
    spec.gradient_checkpointing = bool(choice.changes["gradient_checkpointing"])
    spec.base_quantization = str(choice.changes["base_quantization"])
    spec.blocks_to_swap = int(choice.changes["blocks_to_swap"])


def _plain(value):
    return list(value) if hasattr(value, "__len__") and not isinstance(value, (str, bytes)) else value


def _text(value) -> str:
    return str(value).lower() if isinstance(value, bool) else str(value)
