"""Everything a training run does before its first step: family, pipeline, encodings, LoRA,
compiled blocks, optimizer, LR scheduler, scaler and batcher, with a cancel checked between stages."""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from diffusers.optimization import get_scheduler

from fluxlora.models.families import family_for_model
from fluxlora.models.loading import load_flux_pipeline, pick_device_dtype
from fluxlora.training.trainer import distributed
from fluxlora.training.trainer.callbacks import TrainCallbacks, TrainingStopped
from fluxlora.training.trainer.config import TrainConfig
from fluxlora.training.trainer.data import BucketBatcher, CachedDataset, cache_dataset
from fluxlora.training.trainer.encoding_cache import load_encodings, save_encodings
from fluxlora.training.trainer.lora import prepare_transformer
from fluxlora.training.trainer.run_state import Run
from fluxlora.training.trainer.step import compile_blocks, make_optimizer, use_trainable_attention

log = logging.getLogger(__name__)


def prepare_run(
    cfg: TrainConfig, model_dir: Path, dataset_dir: Path, device: torch.device | str | None,
    encoding_cache: Path | None, callbacks: TrainCallbacks, dp: distributed.DataParallel,
) -> Run:
    def stage_done(what: str) -> None:  # a cancel takes effect between stages, not after all of them
        if callbacks.should_stop():
            raise TrainingStopped(f"stopped after {what}, before training")

    device, dtype = pick_device_dtype(cfg.precision, device)
    family = family_for_model(model_dir, cfg.family)
    stage_done("nothing")
    data = _cached_encodings(encoding_cache, dataset_dir)
    # Loaded on the CPU: encoders and VAE visit the device one at a time, then the transformer
    # moves there alone. FLUX.1-dev as a whole would not fit a 24 GB GPU.
    pipe = load_flux_pipeline(model_dir, torch.device("cpu"), dtype, text_encoders=data is None, family=family,
                              base_storage=cfg.base_quantization)
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
    return Run(
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
