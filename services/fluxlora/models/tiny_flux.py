"""A tiny, randomly initialised FLUX.1 pipeline in the diffusers directory layout.

Same classes as FLUX.1-dev, tiny configs: tests and the demo go through exactly the code paths
that load and train the real model, in seconds on a CPU. Sizes follow shared/OFFLINE.md.
"""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import (
    AutoencoderKL,
    FlowMatchEulerDiscreteScheduler,
    FluxPipeline,
    FluxTransformer2DModel,
)
from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

from fluxlora.models.tiny_tokenizers import (
    CLIP_MAX_LENGTH,
    build_clip_tokenizer,
    build_t5_tokenizer,
)

TEXT_DIM = 32
# The tiny transformer's shape, shared by the families built on FLUX.1's blocks (FLUX.1, Chroma).
TINY_TRANSFORMER = dict(patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=16,
                        num_attention_heads=2, joint_attention_dim=TEXT_DIM, axes_dims_rope=(4, 4, 8))
VOCAB_SIZE = 1000


def _scheduler() -> FlowMatchEulerDiscreteScheduler:
    # FLUX.1-dev's own scheduler config, so resolution-dependent shifting behaves as in production.
    return FlowMatchEulerDiscreteScheduler(
        num_train_timesteps=1000,
        shift=3.0,
        use_dynamic_shifting=True,
        base_shift=0.5,
        max_shift=1.15,
        base_image_seq_len=256,
        max_image_seq_len=4096,
    )


def _vae() -> AutoencoderKL:
    # Two blocks give a VAE scale factor of 2, so a 64x64 image is a 32x32 latent (16x16 tokens).
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        block_out_channels=(8, 16),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=4,
        sample_size=64,
        use_quant_conv=False,
        use_post_quant_conv=False,
        shift_factor=0.1159,
        scaling_factor=0.3611,
    )


def _transformer(guidance_embeds: bool) -> FluxTransformer2DModel:
    # in_channels is 4 x latent_channels because the pipeline packs 2x2 latent patches.
    return FluxTransformer2DModel(**TINY_TRANSFORMER, pooled_projection_dim=TEXT_DIM, guidance_embeds=guidance_embeds)


def _clip_text_encoder(bos_id: int, eos_id: int, pad_id: int) -> CLIPTextModel:
    # The pooled output is read at the first eos token, so the config must know its real id.
    config = CLIPTextConfig(
        vocab_size=VOCAB_SIZE,
        hidden_size=TEXT_DIM,
        intermediate_size=37,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=CLIP_MAX_LENGTH,
        projection_dim=TEXT_DIM,
        bos_token_id=bos_id,
        eos_token_id=eos_id,
        pad_token_id=pad_id,
    )
    return CLIPTextModel(config)


def _t5_encoder(eos_id: int, pad_id: int) -> T5EncoderModel:
    config = T5Config(
        vocab_size=VOCAB_SIZE,
        d_model=TEXT_DIM,
        d_kv=8,
        d_ff=37,
        num_layers=2,
        num_heads=4,
        relative_attention_num_buckets=8,
        dropout_rate=0.0,
        eos_token_id=eos_id,
        pad_token_id=pad_id,
        decoder_start_token_id=pad_id,
    )
    return T5EncoderModel(config)


def build_tiny_flux(seed: int = 0, guidance_embeds: bool = False) -> FluxPipeline:
    """The tiny pipeline in memory, in eval mode; same seed, same weights."""
    tokenizer = build_clip_tokenizer()
    tokenizer_2 = build_t5_tokenizer()
    # A private RNG stream: building a model must not shift the caller's global random state.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        text_encoder = _clip_text_encoder(
            tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id
        )
        text_encoder_2 = _t5_encoder(tokenizer_2.eos_token_id, tokenizer_2.pad_token_id)
        vae = _vae()
        transformer = _transformer(guidance_embeds)
    pipe = FluxPipeline(
        scheduler=_scheduler(),
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        text_encoder_2=text_encoder_2,
        tokenizer_2=tokenizer_2,
        transformer=transformer,
    )
    for module in (vae, text_encoder, text_encoder_2, transformer):
        module.eval()
    return pipe


def write_tiny_flux(out_dir: Path, seed: int = 0, guidance_embeds: bool = False) -> Path:
    """Write a complete FluxPipeline directory with tiny random weights; returns out_dir.

    `FluxPipeline.from_pretrained(out_dir)` loads it with no network. guidance_embeds=True gives
    a FLUX.1-dev-like transformer that takes the distilled guidance input.
    """
    return save_tiny_pipeline(build_tiny_flux(seed=seed, guidance_embeds=guidance_embeds), out_dir)


def save_tiny_pipeline(pipe, out_dir: Path) -> Path:
    """Save a tiny pipeline as a diffusers directory (safetensors); returns out_dir."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    pipe.save_pretrained(out_dir, safe_serialization=True)
    return out_dir
