"""Images to FLUX latents, in the two forms the code needs: spatial (training) and packed
(what the pipeline's transformer sees and what `output_type="latent"` returns)."""

from __future__ import annotations

import torch
from diffusers import AutoencoderKL, FluxPipeline
from PIL import Image


def vae_scale_factor(vae: AutoencoderKL) -> int:
    return 2 ** (len(vae.config.block_out_channels) - 1)


def image_to_pixels(pipe: FluxPipeline, image: Image.Image) -> torch.Tensor:
    """(1, 3, H, W) in [-1, 1] at the image's own size (which must suit the VAE)."""
    return pipe.image_processor.preprocess(
        image.convert("RGB"), height=image.height, width=image.width
    )


@torch.no_grad()
def encode_latents(vae: AutoencoderKL, pixels: torch.Tensor) -> torch.Tensor:
    """Normalised latents (B, C, h, w) as the transformer is trained on them.

    The distribution's mode, not a sample: cached latents stay deterministic and the evaluation
    compares generations against the very latents the LoRA was trained toward.
    """
    param = next(vae.parameters())
    latents = vae.encode(pixels.to(param.device, param.dtype)).latent_dist.mode()
    return (latents - vae.config.shift_factor) * vae.config.scaling_factor


def pack(latents: torch.Tensor) -> torch.Tensor:
    """(B, C, h, w) -> (B, h/2 * w/2, 4C): the token sequence FluxPipeline works on."""
    b, c, h, w = latents.shape
    return FluxPipeline._pack_latents(latents, b, c, h, w)


def image_ids(latent_height: int, latent_width: int, device, dtype) -> torch.Tensor:
    """Positional ids of the packed image tokens, (h/2 * w/2, 3)."""
    return FluxPipeline._prepare_latent_image_ids(
        1, latent_height // 2, latent_width // 2, device, dtype
    )


@torch.no_grad()
def packed_image_latents(
    pipe: FluxPipeline, image: Image.Image, width: int, height: int
) -> torch.Tensor:
    """The image, resized to width x height, as packed latents (1, seq, 4C): directly comparable
    with the pipeline's `output_type="latent"` at that size."""
    resized = image.convert("RGB").resize((width, height), Image.Resampling.LANCZOS)
    return pack(encode_latents(pipe.vae, image_to_pixels(pipe, resized)))
