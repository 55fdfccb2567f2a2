"""A tiny, randomly initialised FLUX.1 Kontext pipeline in the diffusers directory layout.

Kontext is FLUX.1 [dev] with an image-conditioned pipeline: the tiny FLUX.1's components (its
transformer with the guidance embedding, as FLUX.1-Kontext-dev's config has) saved as a
FluxKontextPipeline, so the family is detected from model_index.json as for the real model.
"""

from __future__ import annotations

from pathlib import Path

from diffusers import FluxKontextPipeline

from fluxlora.models.tiny_flux import build_tiny_flux, save_tiny_pipeline


def build_tiny_kontext(seed: int = 0) -> FluxKontextPipeline:
    """The tiny pipeline in memory, in eval mode; same seed, same weights."""
    flux = build_tiny_flux(seed=seed, guidance_embeds=True)
    return FluxKontextPipeline(**{name: flux.components[name] for name in (
        "scheduler", "vae", "text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2", "transformer")})


def write_tiny_kontext(out_dir: Path, seed: int = 0) -> Path:
    """Write a complete FluxKontextPipeline directory with tiny random weights; returns out_dir."""
    return save_tiny_pipeline(build_tiny_kontext(seed=seed), out_dir)
