"""Validation samples rendered with the LoRA as it stands mid-training."""

from __future__ import annotations

from pathlib import Path

import torch
from PIL import Image

from fluxlora.models.families import PromptEncoding, family_of
from fluxlora.training.trainer.data import TextEmbedding


@torch.no_grad()
def render_samples(
    pipe,
    prompts: list[TextEmbedding],
    negative: TextEmbedding,
    out_dir: Path,
    step: int,
    *,
    resolution: int,
    num_steps: int,
    guidance: float,
    seed: int,
    device: torch.device,
    control: Image.Image | None = None,
) -> list[Path]:
    """samples/step-NNNNNN-<i>.png, one per prompt, with the same seed at every step so that
    samples of different steps differ only by what the LoRA learned. `negative` (the empty caption)
    is the negative prompt of families whose guidance is classifier-free (Chroma). control: the
    image editing families (Kontext) edit in every sample."""
    family = family_of(pipe)
    out_dir.mkdir(parents=True, exist_ok=True)
    pipe.transformer.eval()
    pipe.vae.to(device)
    paths = []
    try:
        for index, text in enumerate(prompts):
            encoded = [_batch_of_one(t, device, pipe.transformer.dtype) for t in (text, negative)]
            image = pipe(
                **family.pipeline_prompt_kwargs(*encoded, guidance),
                **family.pipeline_call_kwargs(resolution, resolution, control),
                num_inference_steps=num_steps,
                generator=torch.Generator("cpu").manual_seed(seed),
            ).images[0]
            path = out_dir / f"step-{step:06d}-{index}.png"
            image.save(path)
            paths.append(path)
    finally:
        pipe.vae.to("cpu")
        pipe.transformer.train()
    return paths


def _batch_of_one(text: TextEmbedding, device: torch.device, dtype: torch.dtype) -> PromptEncoding:
    mask = None if text.mask is None else text.mask[None].to(device, dtype)
    # text_ids: the pipelines make their own from prompt_embeds.
    return PromptEncoding(text.prompt_embeds[None].to(device, dtype), text.pooled[None].to(device, dtype), mask,
                          None)
