"""One training step's tensor work, shared by the training loop and the memory planner.

The planner runs these very functions on fake tensors, so its estimate is of the code that
trains, not of a model of it.
"""

from __future__ import annotations

import contextlib

import torch

from fluxlora.models.families import FLUX1_DEV, Family, PromptEncoding
from fluxlora.training.trainer.config import TrainConfig

HALF_PRECISION = (torch.bfloat16, torch.float16)


def autocast(device: torch.device, dtype: torch.dtype):
    """Mixed precision for half-precision base weights, as diffusers' training scripts run under
    accelerate: matmuls (LoRA ones included) in bf16/fp16 while the LoRA parameters, their
    gradients and optimizer state stay fp32. Without it peft casts every LoRA layer's input to
    fp32 and keeps that copy for the backward pass: twice the activation memory of a bf16 copy."""
    if dtype not in HALF_PRECISION:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


def use_trainable_attention(device: torch.device) -> None:
    """Keep SDPA off cuDNN's fused attention for training. torch picks it first on Hopper, and its
    backward pass failed on an H100 (torch 2.11 + CUDA 13: "mha_graph.execute(...) is_good()" and
    then cuBLAS errors); flash attention, next in torch's order, trains at full speed."""
    if device.type == "cuda":
        torch.backends.cuda.enable_cudnn_sdp(False)


def compile_blocks(transformer, mode: str, device: torch.device) -> bool:
    """torch.compile each transformer block (diffusers' regional compilation: one graph per block
    type, reused by its 19 / 38 copies, so compiling takes seconds, not minutes). It fuses the
    elementwise work around the matmuls (norms, modulation, RoPE, the 8-bit upcast): 1.6x faster
    steps at 1024 on an H100 (docs/performance.md). Returns whether it compiled."""
    if mode == "off" or (mode == "auto" and device.type != "cuda"):
        return False
    transformer.compile_repeated_blocks()
    return True


def flow_matching_loss(
    transformer,
    latents: torch.Tensor,
    noise: torch.Tensor,
    sigmas: torch.Tensor,
    prompt_embeds: torch.Tensor,
    pooled: torch.Tensor,
    text_ids: torch.Tensor,
    guidance: float,
    dtype: torch.dtype,
    *,
    mask: torch.Tensor | None = None,
    family: Family = FLUX1_DEV,
    control: torch.Tensor | None = None,
) -> torch.Tensor:
    """Rectified-flow loss of one micro-batch: noisy = (1 - s) x0 + s noise, the transformer
    predicts the velocity noise - x0 on the family's packed latent tokens.

    latents, noise: (B, C, h, w) float32 on the device; sigmas: (B,); prompt_embeds (B, seq, dim),
    pooled (B, dim), text_ids (seq, 3) and mask (B, seq; families with a text mask) in `dtype` on
    the device. The family decides what the transformer is given (guidance, pooled text, mask).
    control: (B, C, h', w') control-image latents of editing pairs; the family appends them to the
    image tokens, and the loss is on the target's tokens only.
    """
    _, _, height, width = latents.shape
    device = latents.device
    s = sigmas.view(-1, 1, 1, 1)
    noisy = (1 - s) * latents + s * noise
    text = PromptEncoding(prompt_embeds, pooled, mask, text_ids)
    target_tokens = family.pack(noisy).to(dtype)
    hidden_states, img_ids = family.with_control(
        target_tokens, family.image_ids(height, width, device, dtype),
        None if control is None else control.to(device, dtype),
    )
    with autocast(device, dtype):
        prediction = transformer(**family.transformer_kwargs(
            transformer, hidden_states=hidden_states, sigmas=sigmas, text=text, img_ids=img_ids, guidance=guidance,
        ))[0]
    prediction = prediction[:, : target_tokens.shape[1]]
    # MSE ignores token order, so the target is packed rather than the prediction unpacked.
    return torch.nn.functional.mse_loss(prediction.float(), family.pack(noise - latents))


def apply_gradients(
    params: list[torch.nn.Parameter],
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler,
    max_grad_norm: float,
) -> None:
    """Clip (when max_grad_norm > 0), step the optimizer through the loss scaler, clear grads."""
    if max_grad_norm > 0:
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
    scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad(set_to_none=True)


def make_optimizer(
    params: list[torch.nn.Parameter], cfg: TrainConfig, foreach: bool | None = None
) -> torch.optim.Optimizer:
    """cfg.optimizer over the LoRA parameters. foreach (torch's AdamW only): None lets torch choose
    (multi-tensor on CUDA)."""
    if cfg.optimizer == "adamw8bit":
        import bitsandbytes  # optional: CUDA training nodes only

        return bitsandbytes.optim.AdamW8bit(params, lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
    if cfg.optimizer == "prodigy":
        from prodigyopt import Prodigy

        # safeguard_warmup as the Prodigy authors advise when the schedule warms up.
        return Prodigy(params, lr=cfg.learning_rate, weight_decay=cfg.weight_decay,
                       safeguard_warmup=cfg.lr_warmup_steps > 0, use_bias_correction=True)
    return torch.optim.AdamW(params, lr=cfg.learning_rate, weight_decay=cfg.weight_decay, foreach=foreach)
