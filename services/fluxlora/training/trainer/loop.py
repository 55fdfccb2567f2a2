"""The LoRA training loop: FLUX transformer + peft LoRA, rectified-flow (flow-matching) loss.

Follows diffusers' examples/dreambooth/train_dreambooth_lora_flux.py: noisy = (1-s) x0 + s noise,
the transformer predicts the velocity noise - x0 on packed 2x2 latent tokens, only the LoRA
parameters train (in fp32, over frozen bf16/fp32 base weights).
"""

from __future__ import annotations

import gc
import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
from diffusers.optimization import get_scheduler
from PIL import Image

from fluxlora.models.families import Family, family_for_model
from fluxlora.models.loading import load_flux_pipeline, pick_device_dtype
from fluxlora.training.trainer import distributed
from fluxlora.training.trainer.callbacks import TrainCallbacks, TrainingStopped
from fluxlora.training.trainer.checkpoint import (
    LORA_WEIGHTS_NAME,
    checkpoint_dir,
    kohya_weights_name,
    load_lora_into,
    load_training_state,
    save_checkpoint,
)
from fluxlora.training.trainer.config import TrainConfig, not_yet_runnable
from fluxlora.training.trainer.data import (
    BucketBatcher,
    CachedDataset,
    cache_dataset,
    check_controls,
    find_pairs,
)
from fluxlora.training.trainer.encoding_cache import load_encodings, save_encodings
from fluxlora.training.trainer.lora import prepare_transformer
from fluxlora.training.trainer.peak_memory import peak_memory, reset_peak_memory
from fluxlora.training.trainer.plots import write_loss_csv, write_loss_plot
from fluxlora.training.trainer.sampling import render_samples
from fluxlora.training.trainer.step import (
    apply_gradients,
    compile_blocks,
    flow_matching_loss,
    make_optimizer,
    use_trainable_attention,
)
from fluxlora.training.trainer.timesteps import sample_sigmas

log = logging.getLogger(__name__)

# Fields that fix the shape or meaning of the saved LoRA: a resume must not change them.
_LORA_FIELDS = ("rank", "alpha", "target_modules")


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


@dataclass
class _Run:
    """What the step functions share; built once by train_lora."""

    cfg: TrainConfig
    family: Family
    pipe: object  # the family's diffusers pipeline
    data: CachedDataset
    batcher: BucketBatcher
    optimizer: torch.optim.Optimizer
    lr_scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler
    generator: torch.Generator  # every random draw of the loop, so runs repeat exactly
    device: torch.device
    dtype: torch.dtype
    params: list[torch.nn.Parameter]
    dp: distributed.DataParallel = field(default_factory=distributed.DataParallel)
    export_name: str = "lora"
    lora_metadata: dict[str, str] = field(default_factory=dict)
    history: list[tuple[int, float, float]] = field(default_factory=list)

    @property
    def transformer(self):
        return self.pipe.transformer


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
            run = _prepare(cfg, model_dir, dataset_dir, device, encoding_cache, callbacks, dp)
    except TrainingStopped as stopped:  # a cancel while loading: nothing trained, nothing to save
        log.info("%s", stopped)
        gc.collect()
        return TrainOutcome(steps_done=0, checkpoints=[], final_loss=0.0, losses=[], seconds_per_step=0.0,
                            stopped=True)
    run.export_name, run.lora_metadata = export_name, dict(lora_metadata or {})
    try:
        start_step = _resume(run, Path(resume_from)) if resume_from is not None else 0
        distributed.broadcast_parameters(dp, run.params)
        return _loop(run, out_dir, callbacks, start_step)
    finally:
        # Also on errors: a traceback keeps frames alive, and with them the GPU memory.
        _release(run)


def _loop(run: _Run, out_dir: Path, callbacks: TrainCallbacks, start_step: int) -> TrainOutcome:
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
        loss, lr = _train_step(run)
        step += 1
        step_seconds.append(time.perf_counter() - started)
        callbacks.on_step(step, cfg.max_steps, loss, lr)
        callbacks.on_memory(step, peak_memory(run.device))

        final = step == cfg.max_steps
        if run.dp.main and (final or _due(step, cfg.checkpoint_every)):
            checkpoints.append((step, _checkpoint(run, out_dir, step)))
            callbacks.on_checkpoint(step, checkpoints[-1][1])
        if run.dp.main and cfg.sample_prompts and (final or _due(step, cfg.sample_every)):
            paths = _samples(run, out_dir, step)
            samples.append((step, paths))
            callbacks.on_sample(step, paths)

    if run.dp.main and stopped and step > start_step and (not checkpoints or checkpoints[-1][0] != step):
        # A cancelled run keeps what it learned: usable as a LoRA and resumable.
        checkpoints.append((step, _checkpoint(run, out_dir, step)))
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


def _prepare(
    cfg: TrainConfig, model_dir: Path, dataset_dir: Path, device: torch.device | str | None,
    encoding_cache: Path | None, callbacks: TrainCallbacks, dp: distributed.DataParallel,
) -> _Run:
    def stage_done(what: str) -> None:  # a cancel takes effect between stages, not after all of them
        if callbacks.should_stop():
            raise TrainingStopped(f"stopped after {what}, before training")

    device, dtype = pick_device_dtype(cfg.precision, device)
    family = family_for_model(model_dir, cfg.family)
    stage_done("nothing")
    data = _cached_encodings(encoding_cache, dataset_dir)
    # Loaded on the CPU: encoders and VAE visit the device one at a time, then the transformer
    # moves there alone. FLUX.1-dev as a whole would not fit a 24 GB GPU.
    pipe = load_flux_pipeline(model_dir, torch.device("cpu"), dtype, text_encoders=data is None, family=family)
    stage_done("loading the base model")
    if data is None:
        data = cache_dataset(
            pipe,
            dataset_dir,
            cfg.resolution,
            device,
            max_sequence_length=cfg.max_sequence_length,
            extra_prompts=cfg.sample_prompts,
            should_stop=callbacks.should_stop,
        )
        if encoding_cache is not None:
            save_encodings(data, encoding_cache)
            callbacks.on_encoded(encoding_cache)
    stage_done("encoding the dataset")
    params = prepare_transformer(pipe.transformer, cfg, device)
    pipe.transformer.to(device)
    stage_done("adding the LoRA")
    use_trainable_attention(device)
    if compile_blocks(pipe.transformer, cfg.compile_blocks, device):
        log.info("transformer blocks compiled (torch.compile); the first steps wait for compilation")
    stage_done("compiling the blocks")
    optimizer = make_optimizer(params, cfg)
    lr_scheduler = get_scheduler(
        cfg.lr_scheduler,
        optimizer=optimizer,
        num_warmup_steps=cfg.lr_warmup_steps,
        num_training_steps=cfg.max_steps,
    )
    # fp16 gradients underflow without loss scaling; bf16 and fp32 need none.
    scaler = torch.amp.GradScaler(
        device.type, enabled=dtype == torch.float16 and device.type == "cuda"
    )
    # Global batches: every rank deals the same ones and trains its slice.
    batcher = BucketBatcher(
        [tuple(s.latents.shape) for s in data.samples], cfg.batch_size * dp.world_size, cfg.seed
    )
    return _Run(
        cfg=cfg,
        family=family,
        pipe=pipe,
        data=data,
        batcher=batcher,
        optimizer=optimizer,
        lr_scheduler=lr_scheduler,
        scaler=scaler,
        generator=torch.Generator("cpu").manual_seed(cfg.seed),
        device=device,
        dtype=dtype,
        params=params,
        dp=dp,
    )


def _cached_encodings(path: Path | None, dataset_dir: Path) -> CachedDataset | None:
    """The encoded dataset saved at `path` by an earlier run, or None (absent or unreadable)."""
    if path is None or not Path(path).is_file():
        return None
    try:
        data = load_encodings(path, dataset_dir)
    except (ValueError, OSError, KeyError) as exc:  # a broken cache costs one encoding, not the run
        log.warning("ignoring the encoding cache %s: %s", path, exc)
        return None
    log.info("encoded dataset read from %s: the text encoders are not loaded", path)
    return data


def _train_step(run: _Run) -> tuple[float, float]:
    """One optimizer step over gradient_accumulation micro-batches: (mean loss, lr used)."""
    cfg = run.cfg
    total = 0.0
    for _ in range(cfg.gradient_accumulation):
        loss = _micro_batch_loss(run, run.batcher.next())
        if loss is None:  # this rank's slice of a short batch was empty: it adds zero gradients
            run.scaler.scale(torch.zeros((), device=run.device))  # fp16: the scaler starts on its first scale()
            continue
        run.scaler.scale(loss / cfg.gradient_accumulation).backward()
        total += loss.item()
    total = distributed.reduce_gradients(run.dp, run.params, total)
    lr = run.lr_scheduler.get_last_lr()[0]
    apply_gradients(run.params, run.optimizer, run.scaler, cfg.max_grad_norm)
    run.lr_scheduler.step()
    mean = total / cfg.gradient_accumulation
    run.history.append((len(run.history) + 1, mean, lr))
    return mean, lr


def _micro_batch_loss(run: _Run, indices: list[int]) -> torch.Tensor | None:
    """This rank's share of the mean loss of the global batch `indices` (the whole of it in one
    process); None when its slice is empty. Random draws cover the global batch on every rank."""
    cfg, device, dtype, g = run.cfg, run.device, run.dtype, run.generator
    samples = [run.data.samples[i] for i in indices]
    batch, (_, height, width) = len(samples), samples[0].latents.shape

    drop = torch.rand(batch, generator=g) < cfg.caption_dropout
    texts = [run.data.empty_text if d else s.text for s, d in zip(samples, drop.tolist(), strict=True)]
    noise = torch.randn((batch, *samples[0].latents.shape), generator=g)
    sigmas = sample_sigmas(
        cfg.timestep_sampling,
        batch,
        g,
        sigmoid_scale=cfg.sigmoid_scale,
        shift=cfg.timestep_shift,
        image_seq_len=(height // 2) * (width // 2),
        scheduler_config=run.pipe.scheduler.config,
        mu_of=run.family.shift_mu,
    )
    mine = run.dp.shard(batch)
    samples, texts = samples[mine], texts[mine]
    if not samples:
        return None
    latents = torch.stack([s.latents for s in samples]).to(device, torch.float32)
    prompt_embeds = torch.stack([t.prompt_embeds for t in texts]).to(device, dtype)
    pooled = torch.stack([t.pooled for t in texts]).to(device, dtype)
    mask = None if texts[0].mask is None else torch.stack([t.mask for t in texts]).to(device, dtype)
    control = None
    if samples[0].control_latents is not None:
        control = torch.stack([s.control_latents for s in samples]).to(device, torch.float32)
    loss = flow_matching_loss(
        run.transformer, latents, noise[mine].to(device), sigmas[mine].to(device), prompt_embeds, pooled,
        run.data.text_ids.to(device, dtype), cfg.guidance, dtype, mask=mask, family=run.family, control=control,
    )
    # The slice's mean, weighted so that the ranks' shares sum to the global batch's mean.
    return loss if len(samples) == batch else loss * (len(samples) / batch)


def _training_state(run: _Run, step: int) -> dict:
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


def _checkpoint(run: _Run, out_dir: Path, step: int) -> Path:
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


def _samples(run: _Run, out_dir: Path, step: int) -> list[Path]:
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


def _sample_control(run: _Run) -> Image.Image | None:
    """Editing families: samples edit the first pair's control image, as the grid does."""
    control = run.data.samples[0].pair.control if run.data.samples else None
    if not run.family.takes_control_image or control is None or not control.is_file():
        return None
    with Image.open(control) as opened:
        return opened.convert("RGB")


def _resume(run: _Run, directory: Path) -> int:
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


def _release(run: _Run) -> None:
    """Drop the references that pin the transformer and optimizer state on the device."""
    run.pipe = run.optimizer = run.params = None
    gc.collect()
    if run.device.type == "cuda":
        torch.cuda.empty_cache()
