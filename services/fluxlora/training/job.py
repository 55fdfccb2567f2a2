"""Runs one training job: captioned dataset + base model from the store -> LoRA run in the store
(checkpoints, samples, loss.csv/loss.png as they are produced, then report.json)."""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

from google.protobuf import json_format

from fluxlora.common import keys
from fluxlora.domain.caption_versions import CaptionVersions
from fluxlora.domain.runs import list_checkpoints
from fluxlora.jobs.context import JobContext, JobInterrupted
from fluxlora.models.base_model import resolve_base_model
from fluxlora.training.encodings import fetch_encodings, store_encodings
from fluxlora.training.gpu_budget import plan_run
from fluxlora.training.memory import MemoryPlan
from fluxlora.training.trainer import distributed
from fluxlora.training.trainer.callbacks import TrainCallbacks
from fluxlora.training.trainer.checkpoint import (
    LORA_WEIGHTS_NAME,
    TRAINING_STATE_NAME,
    checkpoint_dir,
    kohya_weights_name,
    load_training_state,
)
from fluxlora.training.trainer.config import TrainConfig
from fluxlora.training.trainer.data import CONTROL_DIR
from fluxlora.training.trainer.loop import train_lora
from fluxlora.training.trainer.peak_memory import PeakMemory
from fluxlora_api.shared.errors import InvalidArgument
from fluxlora_api.v1 import training_pb2 as pb

log = logging.getLogger(__name__)

# TrainSpec fields that are not part of the trainer's config.
# gpus and nodes: the launcher's (jobs/launch.py); the trainer reads its world size from torchrun.
_NOT_CONFIG = {"dataset_id", "base_model", "base_components", "caption_version", "resume_from_run", "memory_mode",
               "gpus", "nodes"}


def config_from_spec(spec: pb.TrainSpec) -> TrainConfig:
    """The trainer config: fields set in the spec, defaults for the rest (alpha defaults to rank)."""
    values = {f.name: (list(v) if f.is_repeated else v)
              for f, v in spec.ListFields() if f.name not in _NOT_CONFIG}
    values.setdefault("alpha", float(values.get("rank", TrainConfig.model_fields["rank"].default)))
    if values.get("optimizer") == "prodigy":
        values.setdefault("learning_rate", 1.0)  # Prodigy finds the step size; lr multiplies it
    try:
        return TrainConfig(**values)
    except ValueError as exc:
        errors = getattr(exc, "errors", lambda: [])()
        if errors:
            detail = "; ".join(f"spec.{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in errors)
            raise InvalidArgument(detail) from exc
        raise InvalidArgument(str(exc)) from exc


def run_training(ctx: JobContext, spec: pb.TrainSpec) -> pb.TrainResult:
    """Every rank of a data-parallel run (spec.gpus > 1) runs this, each with its own scratch copy of
    the inputs; rank 0 alone writes to the store (the trainer calls back on rank 0 only)."""
    cfg = config_from_spec(spec)
    main = distributed.from_env().main
    # A resumed run (TrainSpec.resume_from_run) goes on in the run it continues, from its last checkpoint.
    run_id = spec.resume_from_run or ctx.job_id
    prefix = keys.run_prefix(run_id)
    captions_bytes = ctx.store.get_bytes(keys.dataset_captions(spec.dataset_id))
    captions = json.loads(captions_bytes)
    chosen = CaptionVersions(ctx.store, spec.dataset_id).get(spec.caption_version) if spec.caption_version else None
    if chosen is not None:
        captions = {"trigger_word": chosen.trigger_word, "captions": chosen.captions}
        captions_bytes = json.dumps(chosen.to_json(), sort_keys=True).encode()
    if main:
        ctx.store.put_json(keys.run_info(run_id), {
            "run_id": run_id,
            "dataset_id": spec.dataset_id,
            "base_model": spec.base_model,
            "base_components": spec.base_components,
            "trigger_word": captions["trigger_word"],
            "config": cfg.model_dump(),
        })
        ctx.store.put_json(prefix + "spec.json", json_format.MessageToDict(spec))
    plan = _memory_plan(ctx, spec, cfg) if main else None  # for the report, which rank 0 writes
    lora_metadata = {
        "fluxlora.run_id": run_id,
        "fluxlora.base_model": spec.base_model,
        "fluxlora.base_components": spec.base_components,
        "fluxlora.dataset_id": spec.dataset_id,
        "fluxlora.trigger_word": captions["trigger_word"],
        "fluxlora.caption_set_sha256": hashlib.sha256(captions_bytes).hexdigest(),
        "fluxlora.spec": json_format.MessageToJson(spec, indent=None, sort_keys=True),
        "fluxlora.train_config": json.dumps(cfg.model_dump(), sort_keys=True),  # with the defaults
    }

    # Editing datasets: the control images go to dataset/control/, where the trainer pairs them.
    folders = {keys.dataset_images(spec.dataset_id): "", keys.dataset_controls(spec.dataset_id): CONTROL_DIR + "/"}
    objects = [(obj, source) for source in folders for obj in ctx.store.list(source)]
    for i, (obj, source) in enumerate(objects, 1):
        ctx.check_cancelled()
        ctx.store.get_file(obj.key, ctx.scratch / "dataset" / (folders[source] + obj.key[len(source):]))
        ctx.progress("downloading dataset", i, len(objects), "file")
    if chosen is not None:
        # The approved version, not whatever the sidecars hold now: kohya-style pairs by stem.
        for stem, text in chosen.captions.items():
            (ctx.scratch / "dataset" / f"{stem}.txt").write_text(text + "\n", encoding="utf-8")
    ctx.progress("loading base model", 0)
    with ctx.interruptible():  # a cancel while the model downloads stops it there
        model_dir = resolve_base_model(spec.base_model, spec.base_components, ctx.store, ctx.settings.cache_dir,
                                       spec.family)
    out_dir = ctx.scratch / "run"

    checkpoints, resume_from = _stored_checkpoints(ctx, run_id, out_dir, cfg.max_steps)
    sample_keys = [o.key for o in ctx.store.list(prefix + "samples/")]
    last_loss = {"loss": 0.0}

    def on_step(step: int, total: int, loss: float, lr: float) -> None:
        last_loss["loss"] = loss
        ctx.progress("training", step, total, "step")
        ctx.metrics(loss=loss, lr=lr)

    def on_memory(step: int, peak: PeakMemory) -> None:
        ctx.metrics(**peak.metrics())

    def on_checkpoint(step: int, checkpoint_dir: Path) -> None:
        ckpt_prefix = keys.checkpoint_prefix(run_id, step)
        kohya_name = kohya_weights_name(run_id, step)
        kinds = {LORA_WEIGHTS_NAME: "lora", kohya_name: "lora-kohya"}
        # The resume state goes last: a stored training_state.pt means a complete checkpoint.
        files = sorted((p for p in checkpoint_dir.rglob("*") if p.is_file()),
                       key=lambda p: (p.name == TRAINING_STATE_NAME, p.name))
        for path in files:
            kind = kinds.get(path.name, "checkpoint-state")
            ctx.upload(path, ckpt_prefix + path.relative_to(checkpoint_dir).as_posix(), kind, step)
        checkpoints.append(pb.Checkpoint(
            step=step, lora_key=ckpt_prefix + LORA_WEIGHTS_NAME, loss=last_loss["loss"],
            kohya_lora_key=ckpt_prefix + kohya_name,
        ))
        upload_loss(step)

    def upload_loss(step: int) -> None:
        for name, kind in (("loss.csv", "loss-csv"), ("loss.png", "loss-plot")):
            if (out_dir / name).exists():
                ctx.upload(out_dir / name, prefix + name, kind, step)

    def on_sample(step: int, paths: list[Path]) -> None:
        for path in paths:
            key = prefix + "samples/" + path.name
            ctx.upload(path, key, "sample", step)
            sample_keys.append(key)

    if resume_from is not None:
        ctx.log(f"resuming run {run_id} from its checkpoint at step {checkpoints[-1].step}")
        ctx.metrics(resumed_from_step=checkpoints[-1].step)
    with ctx.interruptible():
        encodings, encodings_key, reused = fetch_encodings(ctx.store, ctx.scratch / "dataset", model_dir, cfg,
                                                           ctx.scratch)
    if reused:
        ctx.log(f"using the encoded dataset {encodings_key}: the text encoders are not loaded")
    ctx.metrics(encodings_reused=float(reused))
    outcome = train_lora(
        cfg, model_dir, ctx.scratch / "dataset", out_dir,
        TrainCallbacks(on_step=on_step, on_checkpoint=on_checkpoint, on_sample=on_sample, on_memory=on_memory,
                       on_encoded=lambda path: store_encodings(ctx.store, path, encodings_key),
                       should_stop=lambda: ctx.should_stop, preparing=ctx.interruptible),
        resume_from=resume_from,
        encoding_cache=encodings,
        export_name=run_id,
        lora_metadata=lora_metadata,
    )
    if outcome.stopped:
        if main:
            upload_loss(outcome.steps_done)
        raise JobInterrupted(run_id)
    if not main:  # rank 0 reports the run; a follower's worker stores nothing (jobs.worker)
        return pb.TrainResult(run_id=run_id, steps_done=outcome.steps_done, final_loss=outcome.final_loss)
    upload_loss(outcome.steps_done)
    result = pb.TrainResult(
        run_id=run_id,
        checkpoints=checkpoints,
        loss_csv_key=prefix + "loss.csv",
        loss_plot_key=prefix + "loss.png",
        sample_keys=sample_keys,
        final_loss=outcome.final_loss,
        seconds_per_step=outcome.seconds_per_step,
        steps_done=outcome.steps_done,
        trigger_word=captions["trigger_word"],
        estimated_peak_gib=plan.estimate.total_gib if plan else 0.0,
        peak_memory_gib=outcome.peak_memory_bytes / 2**30,
    )
    peak = PeakMemory(outcome.peak_memory_bytes, outcome.peak_rss_bytes)
    ctx.metrics(**peak.metrics())
    report_info = ctx.store.put_json(prefix + "report.json", {
        "run_id": run_id,
        "steps_done": outcome.steps_done,
        "final_loss": outcome.final_loss,
        "seconds_per_step": outcome.seconds_per_step,
        "checkpoints": [json_format.MessageToDict(c) for c in checkpoints],
        "config": cfg.model_dump(),
        "memory": {
            "plan": plan.as_dict() if plan else None,
            "peak_memory_gib": result.peak_memory_gib or None,  # CUDA tensors (max_memory_allocated); None off CUDA
            "peak_rss_gib": peak.process_rss_bytes / 2**30,  # the process the run was in (ru_maxrss)
        },
    })
    ctx.add_artifact(report_info, "report")  # put's info has the sha256 (a local stat has none)
    return result


def _memory_plan(ctx: JobContext, spec: pb.TrainSpec, cfg: TrainConfig) -> MemoryPlan | None:
    """The planner's estimate (cached since submit) for the report and the job's metrics."""
    try:
        plan = plan_run(spec.base_model, ctx.store, cfg, ctx.settings, components=spec.base_components)
    except Exception:  # noqa: BLE001 - a missing estimate must not stop a run the submit accepted
        log.warning("no memory estimate for run %s", ctx.job_id, exc_info=True)
        return None
    if plan is not None:
        ctx.metrics(estimated_peak_gib=plan.estimate.total_gib, gpu_target_gib=plan.target_gib)
    return plan


def _stored_checkpoints(ctx: JobContext, run_id: str, out_dir: Path,
                        max_steps: int) -> tuple[list[pb.Checkpoint], Path | None]:
    """Checkpoints an earlier attempt of this run already stored, and the local copy of the
    latest resumable one: a run interrupted by a restart continues instead of starting over.
    (A final checkpoint is not resumable; resuming from the one before reproduces it exactly.)"""
    stored = list_checkpoints(ctx.store, run_id)
    resumable = [s for s in stored if s < max_steps
                 and ctx.store.exists(keys.checkpoint_prefix(run_id, s) + TRAINING_STATE_NAME)]
    if not resumable:
        return [], None
    step = max(resumable)
    local = checkpoint_dir(out_dir, step)
    ctx.store.download_prefix(keys.checkpoint_prefix(run_id, step), local)
    history = {s: loss for s, loss, _lr in load_training_state(local)["history"]}
    checkpoints = []
    for s, key in stored.items():
        if s <= step:
            kohya_key = keys.checkpoint_prefix(run_id, s) + kohya_weights_name(run_id, s)
            checkpoints.append(pb.Checkpoint(step=s, lora_key=key, loss=history.get(s, 0.0),
                                             kohya_lora_key=kohya_key if ctx.store.exists(kohya_key) else ""))
    return checkpoints, local
