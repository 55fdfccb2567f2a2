"""Tiny, randomly initialised FLUX.2 [klein] and [dev] pipelines in the diffusers directory layout.

Same classes as FLUX.2-klein (Flux2KleinPipeline, Qwen3ForCausalLM, Flux2Transformer2DModel,
AutoencoderKLFlux2) and FLUX.2-dev (Flux2Pipeline, Mistral3ForConditionalGeneration), tiny configs.
Each text encoder keeps enough layers (of width 16) for its pipeline's own default text layers
(klein: 9, 18, 27 of 28; dev: 10, 20, 30 of 30) to exist: prompts encode exactly as on the real
models, 3 x 16 = 48 wide. [dev]'s Mistral-3 has a one-layer Pixtral vision tower, which text-only
prompts never run; its tokenizer is a plain fast tokenizer, as the processor [dev] ships needs
torchvision. The VAE's batch-norm statistics are random, not the identity a fresh BatchNorm has,
so a path that forgets the latent normalisation shows in the tests.
"""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import AutoencoderKLFlux2, Flux2KleinPipeline, Flux2Pipeline, Flux2Transformer2DModel
from transformers import Mistral3Config, Mistral3ForConditionalGeneration, Qwen3Config, Qwen3ForCausalLM

from fluxlora.models.tiny_flux import VOCAB_SIZE, _scheduler, save_tiny_pipeline
from fluxlora.models.tiny_tokenizers import build_mistral3_tokenizer, build_qwen3_tokenizer

QWEN_WIDTH = 16
TEXT_LAYERS = (9, 18, 27)  # Flux2KleinPipeline's text_encoder_out_layers default
DEV_TEXT_LAYERS = (10, 20, 30)  # Flux2Pipeline's
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
    return save_tiny_pipeline(build_tiny_flux2_klein(seed=seed), out_dir)


def _mistral3_encoder(tokenizer) -> Mistral3ForConditionalGeneration:
    # hidden_states[30] is the 30th layer's output: 30 layers.
    text = dict(model_type="mistral", vocab_size=len(tokenizer), hidden_size=QWEN_WIDTH, intermediate_size=32,
                num_hidden_layers=max(DEV_TEXT_LAYERS), num_attention_heads=2, num_key_value_heads=1, head_dim=8,
                max_position_embeddings=1024, pad_token_id=tokenizer.pad_token_id,
                bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    vision = dict(model_type="pixtral", hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                  num_attention_heads=2, head_dim=8, image_size=56, patch_size=14)
    config = Mistral3Config(text_config=text, vision_config=vision, spatial_merge_size=2,
                            image_token_index=tokenizer.convert_tokens_to_ids("[IMG]"))
    return Mistral3ForConditionalGeneration(config)


def build_tiny_flux2_dev(seed: int = 0) -> Flux2Pipeline:
    """The tiny [dev] pipeline in memory, in eval mode: [klein]'s transformer shape with the
    distilled guidance embedding, a Mistral-3 text encoder; same seed, same weights."""
    tokenizer = build_mistral3_tokenizer()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        text_encoder = _mistral3_encoder(tokenizer)
        vae = _vae()
        transformer = Flux2Transformer2DModel(**TINY_FLUX2_TRANSFORMER, guidance_embeds=True,
                                              joint_attention_dim=QWEN_WIDTH * len(DEV_TEXT_LAYERS))
    pipe = Flux2Pipeline(scheduler=_scheduler(), vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
                         transformer=transformer)
    for module in (vae, text_encoder, transformer):
        module.eval()
    return pipe


def write_tiny_flux2_dev(out_dir: Path, seed: int = 0) -> Path:
    """Write a complete Flux2Pipeline directory with tiny random weights; returns out_dir."""
    return save_tiny_pipeline(build_tiny_flux2_dev(seed=seed), out_dir)
