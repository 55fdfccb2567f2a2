"""A tiny, randomly initialised FLUX.2 [klein] pipeline in the diffusers directory layout.

Same classes as FLUX.2-klein (Flux2KleinPipeline, Qwen3ForCausalLM, Flux2Transformer2DModel,
AutoencoderKLFlux2), tiny configs. The Qwen3 encoder keeps 28 layers (of width 16) so the
pipeline's own default text layers (9, 18, 27) exist: prompts encode exactly as on the real model,
3 x 16 = 48 wide. The VAE's batch-norm statistics are random, not the identity a fresh BatchNorm
has, so a path that forgets the latent normalisation shows in the tests.
"""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import AutoencoderKLFlux2, Flux2KleinPipeline, Flux2Transformer2DModel
from transformers import Qwen3Config, Qwen3ForCausalLM

from fluxlora.models.tiny_flux import VOCAB_SIZE, _scheduler
from fluxlora.models.tiny_tokenizers import build_qwen3_tokenizer

QWEN_WIDTH = 16
TEXT_LAYERS = (9, 18, 27)  # Flux2KleinPipeline's text_encoder_out_layers default
LATENT_CHANNELS = 4
# The tiny transformer of both FLUX.2 variants; [dev] adds guidance_embeds.
TINY_FLUX2_TRANSFORMER = dict(patch_size=1, in_channels=4 * LATENT_CHANNELS, num_layers=1, num_single_layers=1,
                              attention_head_dim=16, num_attention_heads=2, timestep_guidance_channels=32,
                              axes_dims_rope=(4, 4, 4, 4), mlp_ratio=3.0)


def _qwen3_encoder(pad_id: int) -> Qwen3ForCausalLM:
    config = Qwen3Config(vocab_size=VOCAB_SIZE, hidden_size=QWEN_WIDTH, intermediate_size=32,
                         num_hidden_layers=max(TEXT_LAYERS) + 1, num_attention_heads=2, num_key_value_heads=1,
                         head_dim=8, max_position_embeddings=1024, pad_token_id=pad_id, tie_word_embeddings=True)
    return Qwen3ForCausalLM(config)


def _vae() -> AutoencoderKLFlux2:
    # Two blocks: scale factor 2, so a 64x64 image is a 32x32 latent (16x16 patches, 256 tokens).
    vae = AutoencoderKLFlux2(block_out_channels=(8, 16), down_block_types=("DownEncoderBlock2D",) * 2,
                             up_block_types=("UpDecoderBlock2D",) * 2, layers_per_block=1,
                             latent_channels=LATENT_CHANNELS, norm_num_groups=4, sample_size=64)
    channels = vae.bn.num_features
    vae.bn.running_mean.copy_(torch.randn(channels) * 0.5)
    vae.bn.running_var.copy_(torch.rand(channels) * 1.5 + 0.5)
    return vae


def build_tiny_flux2_klein(seed: int = 0) -> Flux2KleinPipeline:
    """The tiny pipeline in memory, in eval mode; same seed, same weights."""
    tokenizer = build_qwen3_tokenizer()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        text_encoder = _qwen3_encoder(tokenizer.pad_token_id)
        vae = _vae()
        transformer = Flux2Transformer2DModel(**TINY_FLUX2_TRANSFORMER, guidance_embeds=False,
                                              joint_attention_dim=QWEN_WIDTH * len(TEXT_LAYERS))
    pipe = Flux2KleinPipeline(scheduler=_scheduler(), vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
                              transformer=transformer, is_distilled=False)
    for module in (vae, text_encoder, transformer):
        module.eval()
    return pipe


def write_tiny_flux2_klein(out_dir: Path, seed: int = 0) -> Path:
    """Write a complete Flux2KleinPipeline directory with tiny random weights; returns out_dir."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    build_tiny_flux2_klein(seed=seed).save_pretrained(out_dir, safe_serialization=True)
    return out_dir
