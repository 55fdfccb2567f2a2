"""Validation samples rendered with the LoRA as it stands mid-training."""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import FluxPipeline

from fluxlora.training.trainer.data import TextEmbedding


@torch.no_grad()
def render_samples(
    pipe: FluxPipeline,
    prompts: list[TextEmbedding],
    out_dir: Path,
    step: int,
    *,
    resolution: int,
    num_steps: int,
    guidance: float,
    seed: int,
    device: torch.device,
) -> list[Path]:
    """samples/step-NNNNNN-<i>.png, one per prompt, with the same seed at every step so that
    samples of different steps differ only by what the LoRA learned."""
    out_dir.mkdir(parents=True, exist_ok=True)
    pipe.transformer.eval()
    pipe.vae.to(device)
    paths = []
    try:
        for index, text in enumerate(prompts):
            image = pipe(
                prompt_embeds=text.prompt_embeds[None].to(device, pipe.transformer.dtype),
                pooled_prompt_embeds=text.pooled[None].to(device, pipe.transformer.dtype),
                height=resolution,
                width=resolution,
                num_inference_steps=num_steps,
                guidance_scale=guidance,
                generator=torch.Generator("cpu").manual_seed(seed),
            ).images[0]
            path = out_dir / f"step-{step:06d}-{index}.png"
            image.save(path)
            paths.append(path)
    finally:
        pipe.vae.to("cpu")
        pipe.transformer.train()
    return paths
