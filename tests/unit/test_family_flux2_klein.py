"""FLUX.2 [klein] as a model family: its tiny model (Qwen3 text encoder, AutoencoderKLFlux2 with
batch-norm latent statistics, Flux2Transformer2DModel) trains through the same trainer (loss falls
when overfitting one image, a resume repeats the run exactly), its presets name exactly FLUX.2's
modules, and its LoRA renders through Flux2KleinPipeline, pulling generations toward the training
image; its kohya (ComfyUI) file renders as its diffusers file does."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from diffusers import Flux2KleinPipeline, Flux2Pipeline
from lora_file_support import add_random_lora, assert_the_kohya_file_renders_as_the_diffusers_file, render_latents
from safetensors import safe_open
from safetensors.torch import load_file
from training_support import CIRCLE_CAPTION as CAPTION
from training_support import (
    assert_a_cached_run_repeats_the_run_that_wrote_it,
    assert_resume_repeats_the_run,
    overfit_one_image,
)
from training_support import quick_flux2 as quick

from fluxlora.models.families import FLUX2_KLEIN, detect_family_in, family_for_model
from fluxlora.models.families.flux2 import FLUX2_ALL_LINEAR_TARGETS
from fluxlora.models.latents import image_to_pixels
from fluxlora.models.loading import load_flux_pipeline
from fluxlora.models.tiny_family import write_tiny_family
from fluxlora.training.trainer import TrainConfig
from fluxlora.training.trainer.checkpoint import save_lora
from fluxlora.training.trainer.config import ATTENTION_AND_MLP_TARGETS, DEFAULT_TARGETS
from fluxlora.training.trainer.kohya import kohya_state_dict
from fluxlora.training.trainer.lora import add_lora
from fluxlora.training.trainer.timesteps import sample_sigmas


@pytest.fixture(scope="module")
def klein_dir(tmp_path_factory) -> Path:
    return write_tiny_family("flux2-klein", tmp_path_factory.mktemp("tiny-klein"), seed=0)


def lora_modules(klein_dir, targets) -> list[str]:
    pipe = load_flux_pipeline(klein_dir, "cpu", torch.float32, text_encoders=False)
    add_lora(pipe.transformer, TrainConfig(rank=2, target_modules=targets))
    return sorted(name.removesuffix(".lora_A.default") for name, _ in pipe.transformer.named_modules()
                  if name.endswith(".lora_A.default"))


def test_the_tiny_model_is_a_flux2_klein_pipeline_detected_as_such(klein_dir):
    assert json.loads((klein_dir / "model_index.json").read_text())["_class_name"] == "Flux2KleinPipeline"
    assert detect_family_in(klein_dir) == "flux2-klein" and family_for_model(klein_dir) is FLUX2_KLEIN
    pipe = Flux2KleinPipeline.from_pretrained(klein_dir, local_files_only=True)
    # The pipeline's own text layers (9, 18, 27) of a 16-wide Qwen3, stacked: 48 features a token.
    embeds, text_ids = pipe.encode_prompt(CAPTION, max_sequence_length=32)
    assert embeds.shape == (1, 32, 48) and text_ids.shape == (1, 32, 4)
    assert not torch.equal(pipe.vae.bn.running_mean, torch.zeros_like(pipe.vae.bn.running_mean))


def test_latents_are_normalised_with_the_vae_batch_norm_and_packed_one_token_per_patch(klein_dir, shape_image):
    pipe = load_flux_pipeline(klein_dir, "cpu", torch.float32, text_encoders=False)
    pixels = image_to_pixels(pipe, shape_image((64, 64), "red"))
    latents = FLUX2_KLEIN.encode_latents(pipe.vae, pixels)
    assert latents.shape == (1, 4, 32, 32)
    # The pipeline's own image encoding (patchify, then batch-norm statistics) gives the same tokens.
    expected = Flux2Pipeline._pack_latents(pipe._encode_vae_image(pixels, generator=None))
    torch.testing.assert_close(FLUX2_KLEIN.pack(latents), expected)
    ids = FLUX2_KLEIN.image_ids(32, 32, "cpu", torch.float32)
    torch.testing.assert_close(ids, Flux2Pipeline._prepare_latent_ids(torch.empty(1, 16, 16, 16))[0])
    # What output_type="latent" returns: the raw VAE latents, normalisation undone.
    raw = FLUX2_KLEIN.pipeline_output_latents(pipe.vae, pixels)
    assert raw.shape == (1, 4, 32, 32) and not torch.allclose(raw, latents)


def test_flux_shift_sampling_uses_flux2s_empirical_mu(klein_dir):
    config = load_flux_pipeline(klein_dir, "cpu", torch.float32, text_encoders=False).scheduler.config
    draw = dict(batch_size=4096, image_seq_len=4096, scheduler_config=config)
    flux1 = sample_sigmas("flux_shift", generator=torch.Generator().manual_seed(0), **draw)
    flux2 = sample_sigmas("flux_shift", generator=torch.Generator().manual_seed(0), mu_of=FLUX2_KLEIN.shift_mu, **draw)
    # At 4096 tokens (1024 px) FLUX.2's mu (2.37 at 50 steps) is well above FLUX.1's 1.15.
    assert flux2.mean() > flux1.mean() + 0.1


def test_presets_name_exactly_flux2s_modules(klein_dir):
    attention = lora_modules(klein_dir, DEFAULT_TARGETS)
    assert attention == ["single_transformer_blocks.0.attn.to_out", "single_transformer_blocks.0.attn.to_qkv_mlp_proj",
                         *(f"transformer_blocks.0.attn.{n}" for n in ("to_k", "to_out.0", "to_q", "to_v"))]
    every = lora_modules(klein_dir, ATTENTION_AND_MLP_TARGETS)
    double = [f"transformer_blocks.0.attn.{n}" for n in ("add_k_proj", "add_q_proj", "add_v_proj", "to_add_out",
                                                          "to_k", "to_out.0", "to_q", "to_v")]
    mlps = [f"transformer_blocks.0.{s}.{n}" for s in ("ff", "ff_context") for n in ("linear_in", "linear_out")]
    assert every == sorted([*attention[:2], *double, *mlps])
    # Named modules are taken as named: the final layer only when asked for.
    assert lora_modules(klein_dir, ["proj_out"]) == ["proj_out"]


@pytest.fixture(scope="module")
def overfit(klein_dir, circle, tmp_path_factory):
    # Every linear layer of the blocks and the final layer, as the Chroma test trains: a tiny model
    # overfits in 150 steps.
    return overfit_one_image(klein_dir, circle, tmp_path_factory.mktemp("klein-run"), steps=150,
                             targets=FLUX2_ALL_LINEAR_TARGETS, prompt=CAPTION, learning_rate=2e-3,
                             max_sequence_length=64)


@pytest.mark.slow  # the 150-step run: about 90 s of CPU
def test_loss_falls_when_overfitting_one_image(overfit):
    overfit.assert_the_loss_halved(checkpoints=[75, 150])


@pytest.mark.slow  # the 150-step run: about 90 s of CPU
def test_the_lora_pulls_klein_generations_toward_the_training_image(overfit, circle):
    overfit.assert_the_lora_pulls_generations_toward(circle / "circle.png", CAPTION, guidance=1.0)


def test_resuming_repeats_the_uninterrupted_run(klein_dir, two_shapes, tmp_path):
    cfg = quick(max_steps=6, checkpoint_every=3, lr_scheduler="cosine", caption_dropout=0.3,
                timestep_sampling="flux_shift")
    assert_resume_repeats_the_run(cfg, klein_dir, two_shapes, tmp_path)


def test_the_comfyui_file_renders_as_the_diffusers_file_through_klein_pipeline(klein_dir, tmp_path):
    pipe = load_flux_pipeline(klein_dir, "cpu", torch.float32)
    add_random_lora(pipe.transformer, ATTENTION_AND_MLP_TARGETS, scale=0.2)
    save_lora(pipe.transformer, tmp_path, kohya_name="klein-step-000001.safetensors")
    kohya = load_file(tmp_path / "klein-step-000001.safetensors")
    with safe_open(tmp_path / "klein-step-000001.safetensors", "pt") as handle:
        metadata = handle.metadata()
    assert metadata["ss_base_model_version"] == "flux2" and metadata["ss_network_module"] == "networks.lora_flux_2"
    assert {k.rsplit(".", 2)[0] if k.endswith(".weight") else k.rsplit(".", 1)[0] for k in kohya} == {
        f"lora_unet_{n}" for n in ("double_blocks_0_img_attn_qkv", "double_blocks_0_txt_attn_qkv",
                                   "double_blocks_0_img_attn_proj", "double_blocks_0_txt_attn_proj",
                                   "double_blocks_0_img_mlp_0", "double_blocks_0_img_mlp_2",
                                   "double_blocks_0_txt_mlp_0", "double_blocks_0_txt_mlp_2",
                                   "single_blocks_0_linear1", "single_blocks_0_linear2")}

    def render(lora: Path | None) -> torch.Tensor:  # a fresh pipeline each time
        return render_latents(load_flux_pipeline(klein_dir, "cpu", torch.float32), lora, text_width=48)

    assert_the_kohya_file_renders_as_the_diffusers_file(render, tmp_path, "klein-step-000001.safetensors",
                                                        changes_by=0.1, tolerance=1e-5)


def test_a_module_without_a_kohya_name_is_named_in_the_error(klein_dir):
    config = load_flux_pipeline(klein_dir, "cpu", torch.float32, text_encoders=False).transformer.config
    lora = {"transformer.single_stream_modulation.linear.lora_A.weight": torch.zeros(2, 32),
            "transformer.single_stream_modulation.linear.lora_B.weight": torch.zeros(96, 2)}
    with pytest.raises(ValueError, match="single_stream_modulation.linear"):
        kohya_state_dict(lora, 2.0, config)


@pytest.mark.slow  # a 0.5B-parameter shallow transformer
@pytest.mark.parametrize("preset", ["attention", "all_linear"])
def test_both_files_give_the_same_latents_at_klein_s_real_widths(preset, klein_dir, tmp_path):
    """One double and one single block with FLUX.2 [klein] 4B's widths (24 x 128 heads, MLP ratio
    3), on which diffusers' kohya converter splits the fused q/k/v as on the real model: the kohya
    file and the diffusers file, each loaded by Flux2KleinPipeline.load_lora_weights, render alike."""
    from diffusers import Flux2Transformer2DModel

    from fluxlora.models.tiny_flux2 import TINY_FLUX2_TRANSFORMER
    from fluxlora.training.trainer.checkpoint import ADAPTER_NAME
    from fluxlora.training.trainer.targets import TARGET_PRESETS

    pipe = load_flux_pipeline(klein_dir, "cpu", torch.float32)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        pipe.transformer = Flux2Transformer2DModel(
            **{**TINY_FLUX2_TRANSFORMER, "num_attention_heads": 24, "attention_head_dim": 128,
               "axes_dims_rope": (32, 32, 32, 32), "timestep_guidance_channels": 256},
            joint_attention_dim=48, guidance_embeds=False).requires_grad_(False).eval()
    add_random_lora(pipe.transformer, TARGET_PRESETS[preset], scale=0.02)
    save_lora(pipe.transformer, tmp_path, kohya_name="klein.safetensors")
    pipe.transformer.delete_adapters(ADAPTER_NAME)
    assert_the_kohya_file_renders_as_the_diffusers_file(lambda lora: render_latents(pipe, lora, text_width=48, size=32),
                                                        tmp_path, "klein.safetensors", changes_by=0.01, tolerance=1e-4)


def test_a_run_from_the_encoding_cache_trains_as_the_run_that_wrote_it(klein_dir, circle, tmp_path):
    stored = assert_a_cached_run_repeats_the_run_that_wrote_it(quick(), klein_dir, circle, tmp_path)
    text = stored.samples[0].text
    assert text.mask is None and text.pooled.numel() == 0 and text.prompt_embeds.shape == (64, 48)
    assert stored.text_ids.shape == (64, 4)
