"""A run's checkpoints: its LoRA and training state saved at a step, and a resume that restores
them so the continuation repeats the uninterrupted run (files and keys: checkpoint.py)."""

from __future__ import annotations

import logging
from pathlib import Path

from fluxlora.training.trainer.checkpoint import (
    LORA_WEIGHTS_NAME,
    checkpoint_dir,
    kohya_weights_name,
    load_lora_into,
    load_training_state,
    save_checkpoint,
)
from fluxlora.training.trainer.plots import write_loss_csv, write_loss_plot
from fluxlora.training.trainer.run_state import Run

log = logging.getLogger(__name__)

# Fields that fix the shape or meaning of the saved LoRA: a resume must not change them.
_LORA_FIELDS = ("rank", "alpha", "target_modules")


def _training_state(run: Run, step: int) -> dict:
    return {
        "step": step,
        "config": run.cfg.model_dump(),
        "optimizer": run.optimizer.state_dict(),
        "lr_scheduler": run.lr_scheduler.state_dict(),
        "scaler": run.scaler.state_dict(),
        "generator": run.generator.get_state(),
        "batcher": run.batcher.state_dict(),
        "history": list(run.history),
        "world_size": run.dp.world_size,
    }


def save_run_checkpoint(run: Run, out_dir: Path, step: int) -> Path:
    directory = save_checkpoint(
        run.transformer,
        checkpoint_dir(out_dir, step),
        _training_state(run, step),
        metadata={**run.lora_metadata, "fluxlora.step": str(step)},
        kohya_name=kohya_weights_name(run.export_name, step),
    )
    write_loss_csv(run.history, out_dir / "loss.csv")
    write_loss_plot(run.history, out_dir / "loss.png")
    log.info("step %d: checkpoint %s", step, directory)
    return directory


def resume_run(run: Run, directory: Path) -> int:
    state = load_training_state(directory)
    changed = [f for f in _LORA_FIELDS if state["config"].get(f) != run.cfg.model_dump()[f]]
    if changed:
        raise ValueError(
            f"cannot resume from {directory}: {', '.join(changed)} differ from the checkpoint's run"
        )
    world = state.get("world_size", 1)  # checkpoints from before data-parallel training: one process
    if world != run.dp.world_size:
        raise ValueError(
            f"cannot resume from {directory}: it was trained by {world} process(es) and this run has "
            f"{run.dp.world_size}; the global batch (batch_size x processes) and its data order would change: "
            f"resume with {world} GPU(s)"
        )
    if state["step"] >= run.cfg.max_steps:
        raise ValueError(
            f"cannot resume from {directory}: it is at step {state['step']}, "
            f"max_steps is {run.cfg.max_steps}"
        )
    load_lora_into(run.transformer, directory / LORA_WEIGHTS_NAME)
    run.optimizer.load_state_dict(state["optimizer"])
    run.lr_scheduler.load_state_dict(state["lr_scheduler"])
    run.scaler.load_state_dict(state["scaler"])
    run.generator.set_state(state["generator"])
    run.batcher.load_state_dict(state["batcher"])
    run.history[:] = [tuple(h) for h in state["history"]]
    log.info("resumed from %s at step %d", directory, state["step"])
    return state["step"]
