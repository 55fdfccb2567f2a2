"""The LoRA training loop: FLUX transformer + peft LoRA, rectified-flow (flow-matching) loss.

Follows diffusers' examples/dreambooth/train_dreambooth_lora_flux.py: noisy = (1-s) x0 + s noise,
the transformer predicts the velocity noise - x0 on packed 2x2 latent tokens, only the LoRA
parameters train (in fp32, over frozen bf16/fp32 base weights). This module drives the steps;
prepare.py builds the run, batch_step.py takes one step, run_checkpoints.py saves and resumes it.
"""

from __future__ import annotations

import gc
import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
from PIL import Image

from fluxlora.models.families import family_for_model
from fluxlora.training.trainer import distributed
from fluxlora.training.trainer.batch_step import train_step
from fluxlora.training.trainer.callbacks import TrainCallbacks, TrainingStopped
from fluxlora.training.trainer.checkpoint import LORA_WEIGHTS_NAME
from fluxlora.training.trainer.config import TrainConfig, not_yet_runnable
from fluxlora.training.trainer.data import check_controls, find_pairs
from fluxlora.training.trainer.peak_memory import peak_memory, reset_peak_memory
from fluxlora.training.trainer.prepare import prepare_run
from fluxlora.training.trainer.run_checkpoints import resume_run, save_run_checkpoint
from fluxlora.training.trainer.run_state import Run
from fluxlora.training.trainer.sampling import render_samples

log = logging.getLogger(__name__)


@dataclass
class TrainOutcome:
    steps_done: int
    checkpoints: list[tuple[int, Path]]  # (step, checkpoint directory), in step order
    final_loss: float
    losses: list[float]  # one per step, from step 1 (a resumed run includes the earlier ones)
    seconds_per_step: float  # mean optimizer-step time of this call, without sampling/saving
    stopped: bool  # should_stop() ended the run before max_steps
    samples: list[tuple[int, list[Path]]] = field(default_factory=list)
    loss_csv: Path | None = None
    loss_png: Path | None = None
    peak_memory_bytes: int = 0  # most CUDA memory the tensors held (max_memory_allocated); 0 off CUDA
    peak_rss_bytes: int = 0  # the process's peak resident set (ru_maxrss) at the end

    @property
    def final_checkpoint(self) -> Path:
        """The LoRA weights file of the last checkpoint."""
        return self.checkpoints[-1][1] / LORA_WEIGHTS_NAME


def train_lora(
    cfg: TrainConfig,
    model_dir: Path,
    dataset_dir: Path,
    out_dir: Path,
    callbacks: TrainCallbacks | None = None,
    *,
    resume_from: Path | None = None,
    encoding_cache: Path | None = None,
    device: torch.device | str | None = None,
    export_name: str = "lora",
    lora_metadata: Mapping[str, str] | None = None,
) -> TrainOutcome:
    """Train a LoRA on the images + captions in dataset_dir; write everything under out_dir.

    out_dir/checkpoints/step-NNNNNN/{pytorch_lora_weights.safetensors,
    <export_name>-step-NNNNNN.safetensors (kohya/ComfyUI keys), training_state.pt} at every
    checkpoint_every steps and at the last step, lora_metadata in both weight files' metadata;
    out_dir/samples/step-NNNNNN-<i>.png; out_dir/loss.csv and loss.png. resume_from: a
    checkpoint directory of an earlier run with the same config; training continues after its
    step, and repeats what the uninterrupted run would have done. device: where to train
    (default: CUDA when present, else the CPU); the base weights' dtype follows cfg.precision.

    Started by torchrun (WORLD_SIZE > 1), each process trains its slice of every global batch of
    cfg.batch_size x WORLD_SIZE images (distributed.py); rank 0 alone writes and calls back, and the
    other ranks' outcomes list no checkpoints or samples.
    """
    callbacks = callbacks or TrainCallbacks()
    dp = distributed.from_env()
    if not dp.main:
        callbacks = distributed.follower_callbacks(callbacks)
    missing = not_yet_runnable(cfg)
    if missing:
        raise ValueError(f"this trainer cannot run {'; '.join(missing)}")
    # An unusable dataset should fail before minutes of model loading.
    pairs = find_pairs(dataset_dir)
    if _editing_family(Path(model_dir), cfg.family):
        check_controls(pairs, Path(dataset_dir))
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    device, created = distributed.join(dp, device)
    try:
        return _train(cfg, Path(model_dir), Path(dataset_dir), out_dir, callbacks, dp, resume_from,
                      encoding_cache, device, export_name, lora_metadata)
    finally:
        distributed.leave(created)


def _editing_family(model_dir: Path, named: str) -> bool:
    try:
        return family_for_model(model_dir, named).takes_control_image
    except ValueError:  # reported where the model is loaded, inside the preparing stage
        return False


def _train(cfg: TrainConfig, model_dir: Path, dataset_dir: Path, out_dir: Path, callbacks: TrainCallbacks,
           dp: distributed.DataParallel, resume_from: Path | None, encoding_cache: Path | None,
           device: torch.device | str | None, export_name: str, lora_metadata: Mapping[str, str] | None,
           ) -> TrainOutcome:
    try:
        with callbacks.preparing():
            run = prepare_run(cfg, model_dir, dataset_dir, device, encoding_cache, callbacks, dp)
    except TrainingStopped as stopped:  # a cancel while loading: nothing trained, nothing to save
        log.info("%s", stopped)
        gc.collect()
        return TrainOutcome(steps_done=0, checkpoints=[], final_loss=0.0, losses=[], seconds_per_step=0.0,
                            stopped=True)
    run.export_name, run.lora_metadata = export_name, dict(lora_metadata or {})
    try:
        start_step = resume_run(run, Path(resume_from)) if resume_from is not None else 0
        distributed.broadcast_parameters(dp, run.params)
        return _loop(run, out_dir, callbacks, start_step)
    finally:
        # Also on errors: a traceback keeps frames alive, and with them the GPU memory.
        _release(run)


def _loop(run: Run, out_dir: Path, callbacks: TrainCallbacks, start_step: int) -> TrainOutcome:
    cfg = run.cfg
    checkpoints: list[tuple[int, Path]] = []
    samples: list[tuple[int, list[Path]]] = []
    step_seconds: list[float] = []
    step, stopped = start_step, False
    reset_peak_memory(run.device)
    while step < cfg.max_steps:
        if distributed.any_rank(run.dp, callbacks.should_stop(), run.device):
            stopped = True
            break
        started = time.perf_counter()
        loss, lr = train_step(run)
        step += 1
        step_seconds.append(time.perf_counter() - started)
        callbacks.on_step(step, cfg.max_steps, loss, lr)
        callbacks.on_memory(step, peak_memory(run.device))

        final = step == cfg.max_steps
        if run.dp.main and (final or _due(step, cfg.checkpoint_every)):
            checkpoints.append((step, save_run_checkpoint(run, out_dir, step)))
            callbacks.on_checkpoint(step, checkpoints[-1][1])
        if run.dp.main and cfg.sample_prompts and (final or _due(step, cfg.sample_every)):
            paths = _samples(run, out_dir, step)
            samples.append((step, paths))
            callbacks.on_sample(step, paths)

    if run.dp.main and stopped and step > start_step and (not checkpoints or checkpoints[-1][0] != step):
        # A cancelled run keeps what it learned: usable as a LoRA and resumable.
        checkpoints.append((step, save_run_checkpoint(run, out_dir, step)))
        callbacks.on_checkpoint(step, checkpoints[-1][1])

    losses = [h[1] for h in run.history]
    peak = peak_memory(run.device)
    return TrainOutcome(
        steps_done=step,
        checkpoints=checkpoints,
        final_loss=losses[-1] if losses else float("nan"),
        losses=losses,
        seconds_per_step=sum(step_seconds) / len(step_seconds) if step_seconds else float("nan"),
        stopped=stopped,
        samples=samples,
        loss_csv=_existing(out_dir / "loss.csv"),
        loss_png=_existing(out_dir / "loss.png"),
        peak_memory_bytes=peak.device_bytes,
        peak_rss_bytes=peak.process_rss_bytes,
    )


def _existing(path: Path) -> Path | None:
    return path if path.is_file() else None


def _due(step: int, every: int) -> bool:
    return every > 0 and step % every == 0


def _samples(run: Run, out_dir: Path, step: int) -> list[Path]:
    cfg = run.cfg
    return render_samples(
        run.pipe,
        [run.data.prompts[p] for p in cfg.sample_prompts],
        run.data.empty_text,
        out_dir / "samples",
        step,
        resolution=cfg.resolution,
        num_steps=cfg.sample_steps,
        guidance=cfg.guidance,
        seed=cfg.seed,
        device=run.device,
        control=_sample_control(run),
    )


def _sample_control(run: Run) -> Image.Image | None:
    """Editing families: samples edit the first pair's control image, as the grid does."""
    control = run.data.samples[0].pair.control if run.data.samples else None
    if not run.family.takes_control_image or control is None or not control.is_file():
        return None
    with Image.open(control) as opened:
        return opened.convert("RGB")


def _release(run: Run) -> None:
    """Drop the references that pin the transformer and optimizer state on the device."""
    run.pipe = run.optimizer = run.params = None
    gc.collect()
    if run.device.type == "cuda":
        torch.cuda.empty_cache()
