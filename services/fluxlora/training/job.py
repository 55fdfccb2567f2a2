"""Runs one training job: captioned dataset + base model from the store -> LoRA run in the store
(checkpoints, samples, loss.csv/loss.png as they are produced, then report.json)."""

from __future__ import annotations

from pathlib import Path

from google.protobuf import json_format

from fluxlora.common import keys
from fluxlora.common.errors import InvalidArgument
from fluxlora.common.models import resolve_model
from fluxlora.common.runs import list_checkpoints
from fluxlora.jobs.context import JobContext, JobInterrupted
from fluxlora.training.trainer.callbacks import TrainCallbacks
from fluxlora.training.trainer.checkpoint import TRAINING_STATE_NAME, checkpoint_dir, load_training_state
from fluxlora.training.trainer.config import TrainConfig
from fluxlora.training.trainer.loop import train_lora
from fluxlora_api.v1 import training_pb2 as pb

# TrainSpec fields that are not part of the trainer's config.
_NOT_CONFIG = {"dataset_id", "base_model"}


def config_from_spec(spec: pb.TrainSpec) -> TrainConfig:
    """The trainer config: fields set in the spec, defaults for the rest (alpha defaults to rank)."""
    values = {f.name: (list(v) if f.is_repeated else v)
              for f, v in spec.ListFields() if f.name not in _NOT_CONFIG}
    values.setdefault("alpha", float(values.get("rank", TrainConfig.model_fields["rank"].default)))
    try:
        return TrainConfig(**values)
    except ValueError as exc:
        errors = getattr(exc, "errors", lambda: [])()
        if errors:
            detail = "; ".join(f"spec.{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in errors)
            raise InvalidArgument(detail) from exc
        raise InvalidArgument(str(exc)) from exc


def run_training(ctx: JobContext, spec: pb.TrainSpec) -> pb.TrainResult:
    cfg = config_from_spec(spec)
    run_id = ctx.job_id
    prefix = keys.run_prefix(run_id)
    captions = ctx.store.get_json(keys.dataset_captions(spec.dataset_id))
    ctx.store.put_json(keys.run_info(run_id), {
        "run_id": run_id,
        "dataset_id": spec.dataset_id,
        "base_model": spec.base_model,
        "trigger_word": captions["trigger_word"],
        "config": cfg.model_dump(),
    })
    ctx.store.put_json(prefix + "spec.json", json_format.MessageToDict(spec))

    images_prefix = keys.dataset_images(spec.dataset_id)
    objects = list(ctx.store.list(images_prefix))
    for i, obj in enumerate(objects, 1):
        ctx.check_cancelled()
        ctx.store.get_file(obj.key, ctx.scratch / "dataset" / obj.key[len(images_prefix):])
        ctx.progress("downloading dataset", i, len(objects), "file")
    ctx.progress("loading base model", 0)
    model_dir = resolve_model(spec.base_model, ctx.store, ctx.settings.cache_dir, "base model")
    out_dir = ctx.scratch / "run"

    checkpoints, resume_from = _stored_checkpoints(ctx, run_id, out_dir, cfg.max_steps)
    sample_keys = [o.key for o in ctx.store.list(prefix + "samples/")]
    last_loss = {"loss": 0.0}

    def on_step(step: int, total: int, loss: float, lr: float) -> None:
        last_loss["loss"] = loss
        ctx.progress("training", step, total, "step")
        ctx.metrics(loss=loss, lr=lr)

    def on_checkpoint(step: int, checkpoint_dir: Path) -> None:
        ckpt_prefix = keys.checkpoint_prefix(run_id, step)
        for path in sorted(p for p in checkpoint_dir.rglob("*") if p.is_file()):
            kind = "lora" if path.name == "pytorch_lora_weights.safetensors" else "checkpoint-state"
            ctx.upload(path, ckpt_prefix + path.relative_to(checkpoint_dir).as_posix(), kind, step)
        checkpoints.append(pb.Checkpoint(
            step=step, lora_key=ckpt_prefix + "pytorch_lora_weights.safetensors", loss=last_loss["loss"]
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
    outcome = train_lora(
        cfg, model_dir, ctx.scratch / "dataset", out_dir,
        TrainCallbacks(on_step=on_step, on_checkpoint=on_checkpoint, on_sample=on_sample,
                       should_stop=lambda: ctx.should_stop),
        resume_from=resume_from,
    )
    upload_loss(outcome.steps_done)
    if outcome.stopped:
        raise JobInterrupted(run_id)
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
    )
    ctx.store.put_json(prefix + "report.json", {
        "run_id": run_id,
        "steps_done": outcome.steps_done,
        "final_loss": outcome.final_loss,
        "seconds_per_step": outcome.seconds_per_step,
        "checkpoints": [json_format.MessageToDict(c) for c in checkpoints],
        "config": cfg.model_dump(),
    })
    ctx.add_artifact(ctx.store.stat(prefix + "report.json"), "report")
    return result


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
    checkpoints = [pb.Checkpoint(step=s, lora_key=key, loss=history.get(s, 0.0))
                   for s, key in stored.items() if s <= step]
    return checkpoints, local
