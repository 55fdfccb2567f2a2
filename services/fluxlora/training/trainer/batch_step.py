"""One optimizer step of a run: its micro-batches drawn from the batcher, this rank's slice of each
through the loss of step.py, the gradients reduced across ranks and applied."""

from __future__ import annotations

import torch

from fluxlora.training.trainer import distributed
from fluxlora.training.trainer.run_state import Run
from fluxlora.training.trainer.step import apply_gradients, flow_matching_loss
from fluxlora.training.trainer.timesteps import sample_sigmas


def train_step(run: Run) -> tuple[float, float]:
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


def _micro_batch_loss(run: Run, indices: list[int]) -> torch.Tensor | None:
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
