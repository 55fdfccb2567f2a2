"""A tiny, randomly initialised Chroma pipeline in the diffusers directory layout.

Chroma is FLUX.1 without CLIP: the tiny FLUX.1's VAE, T5, tokenizer and scheduler, and a
ChromaTransformer2DModel of the same width (sizes as diffusers' own Chroma pipeline tests use).
"""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import ChromaPipeline, ChromaTransformer2DModel

from fluxlora.models.tiny_flux import TINY_TRANSFORMER, _scheduler, _t5_encoder, _vae, save_tiny_pipeline
from fluxlora.models.tiny_tokenizers import build_t5_tokenizer


def _transformer() -> ChromaTransformer2DModel:
    # in_channels is 4 x latent_channels (2x2 packing), as for the tiny FLUX.1.
    return ChromaTransformer2DModel(**TINY_TRANSFORMER, approximator_num_channels=8, approximator_hidden_dim=32,
                                    approximator_layers=1)


def build_tiny_chroma(seed: int = 0) -> ChromaPipeline:
    """The tiny pipeline in memory, in eval mode; same seed, same weights."""
    tokenizer = build_t5_tokenizer()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        text_encoder = _t5_encoder(tokenizer.eos_token_id, tokenizer.pad_token_id)
        vae = _vae()
        transformer = _transformer()
    pipe = ChromaPipeline(scheduler=_scheduler(), vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
                          transformer=transformer)
    for module in (vae, text_encoder, transformer):
        module.eval()
    return pipe


def write_tiny_chroma(out_dir: Path, seed: int = 0) -> Path:
    """Write a complete ChromaPipeline directory with tiny random weights; returns out_dir."""
    return save_tiny_pipeline(build_tiny_chroma(seed=seed), out_dir)
