"""Chroma as a second model family: its tiny model trains through the same trainer (loss falls
when overfitting one image, a resume repeats the run exactly) and its LoRA renders through
ChromaPipeline, pulling generations toward the training image; its kohya (ComfyUI) file renders
as its diffusers file does and says it is a Chroma LoRA (ss_base_model_version)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from diffusers import ChromaPipeline, ChromaTransformer2DModel, FlowMatchEulerDiscreteScheduler
from lora_file_support import add_random_lora, assert_the_kohya_file_renders_as_the_diffusers_file, render_latents
from safetensors import safe_open
from training_support import CIRCLE_CAPTION as CAPTION
from training_support import (
    assert_a_cached_run_repeats_the_run_that_wrote_it,
    assert_resume_repeats_the_run,
    overfit_one_image,
    quick,
    train,
)

from fluxlora.models.families import CHROMA, FLUX1_DEV, detect_family_in, family_for_model
from fluxlora.models.loading import load_flux_pipeline
from fluxlora.models.tiny_chroma import write_tiny_chroma
from fluxlora.training.trainer import LORA_WEIGHTS_NAME
from fluxlora.training.trainer.checkpoint import ADAPTER_NAME, save_lora
from fluxlora.training.trainer.config import ATTENTION_AND_MLP_TARGETS
from fluxlora.training.trainer.targets import TARGET_PRESETS


@pytest.fixture(scope="module")
def tiny_chroma_dir(tmp_path_factory) -> Path:
    return write_tiny_chroma(tmp_path_factory.mktemp("tiny-chroma"), seed=0)


def test_the_family_is_detected_from_the_model(tiny_chroma_dir, tiny_flux_dir):
    assert json.loads((tiny_chroma_dir / "model_index.json").read_text())["_class_name"] == "ChromaPipeline"
    assert detect_family_in(tiny_chroma_dir) == "chroma" and detect_family_in(tiny_flux_dir) == "flux1-dev"
    assert family_for_model(tiny_chroma_dir) is CHROMA
    assert family_for_model(tiny_flux_dir, "flux1-dev") is FLUX1_DEV
    pipe = load_flux_pipeline(tiny_chroma_dir, "cpu", torch.float32, text_encoders=False)
    assert isinstance(pipe, ChromaPipeline) and pipe.text_encoder is None


def test_a_named_family_that_disagrees_with_the_model_names_the_folder_and_the_fix(tiny_chroma_dir, circle,
                                                                                   tmp_path):
    with pytest.raises(ValueError, match=rf"{tiny_chroma_dir}.* is a chroma model, not flux1-dev: set family to "
                                         "'chroma'"):
        train(quick(family="flux1-dev"), tiny_chroma_dir, circle, tmp_path)


@pytest.fixture(scope="module")
def overfit(tiny_chroma_dir, circle, tmp_path_factory):
    return overfit_one_image(tiny_chroma_dir, circle, tmp_path_factory.mktemp("chroma-run"), steps=200,
                             targets=ATTENTION_AND_MLP_TARGETS, prompt=CAPTION)


def test_loss_falls_when_overfitting_one_image(overfit):
    overfit.assert_the_loss_halved(checkpoints=[100, 200])


def test_the_lora_pulls_chroma_generations_toward_the_training_image(overfit, circle):
    overfit.assert_the_lora_pulls_generations_toward(circle / "circle.png", CAPTION)


def test_resuming_repeats_the_uninterrupted_run(tiny_chroma_dir, two_shapes, tmp_path):
    cfg = quick(max_steps=6, checkpoint_every=3, lr_scheduler="cosine", caption_dropout=0.3)
    assert_resume_repeats_the_run(cfg, tiny_chroma_dir, two_shapes, tmp_path)


def test_the_comfyui_file_renders_as_the_diffusers_file_through_chroma_pipeline(tiny_chroma_dir, tmp_path):
    # Every kind of layer the presets train in Chroma's blocks (single blocks' fused linear1 is
    # left out: diffusers splits it at full-size widths only, as for FLUX.1 in test_lora_export).
    targets = [r"transformer_blocks\.0\.(attn\.(to_q|to_k|to_v|add_q_proj|add_k_proj|add_v_proj|to_out\.0|to_add_out)"
               r"|ff\.net\.(0\.proj|2)|ff_context\.net\.(0\.proj|2))", r"single_transformer_blocks\.0\.proj_out"]
    pipe = load_flux_pipeline(tiny_chroma_dir, "cpu", torch.float32)
    add_random_lora(pipe.transformer, targets, scale=0.2)
    save_lora(pipe.transformer, tmp_path, kohya_name="chroma-step-000001.safetensors")
    with safe_open(tmp_path / "chroma-step-000001.safetensors", "pt") as kohya:  # tools sort LoRAs by this
        assert kohya.metadata()["ss_base_model_version"] == "chroma"

    def render(lora: Path | None) -> torch.Tensor:  # a fresh pipeline each time
        return render_latents(load_flux_pipeline(tiny_chroma_dir, "cpu", torch.float32), lora, text_width=32,
                              prompt_attention_mask=torch.ones(1, 8))

    assert_the_kohya_file_renders_as_the_diffusers_file(render, tmp_path, "chroma-step-000001.safetensors",
                                                        changes_by=0.1, tolerance=1e-5)


def test_a_run_from_the_encoding_cache_trains_as_the_run_that_wrote_it(tiny_chroma_dir, circle, tmp_path):
    stored = assert_a_cached_run_repeats_the_run_that_wrote_it(quick(), tiny_chroma_dir, circle, tmp_path)
    assert stored.samples[0].text.mask is not None and stored.samples[0].text.pooled.numel() == 0
    # Chroma attends to the caption's tokens and the first padding token only.
    assert stored.samples[0].text.mask.sum() == len(CAPTION.split()) + 2  # words, </s>, one pad


@pytest.mark.slow  # a 0.5B-parameter shallow transformer
@pytest.mark.parametrize("preset", sorted(TARGET_PRESETS))
def test_both_files_give_the_same_output_at_chroma_s_real_widths(preset, tmp_path):
    """One double and one single block with Chroma's real widths (FLUX.1's: 24 x 128 heads, T5's
    4096), at which diffusers' kohya converter splits a single block's fused linear1 as on the real
    model: the kohya file and the diffusers file, each loaded by ChromaPipeline.load_lora_weights,
    give the output the trained LoRA gave, for every preset."""
    # Built for real, not on the meta device: its modulation index buffer (mod_proj) is computed at init.
    transformer = ChromaTransformer2DModel(num_layers=1, num_single_layers=1, approximator_hidden_dim=64,
                                           approximator_layers=1)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for param in transformer.parameters():
            param.normal_(0, 0.02, generator=generator)
    transformer.eval().requires_grad_(False)

    def run() -> torch.Tensor:
        inputs = torch.Generator().manual_seed(1)
        with torch.no_grad():
            return transformer(
                hidden_states=torch.randn(1, 16, 64, generator=inputs),
                encoder_hidden_states=torch.randn(1, 8, 4096, generator=inputs), timestep=torch.tensor([0.5]),
                img_ids=torch.stack(torch.meshgrid(torch.zeros(1), torch.arange(4.0), torch.arange(4.0),
                                                   indexing="ij"), -1).reshape(16, 3),
                txt_ids=torch.zeros(8, 3), return_dict=False)[0]

    base = run()
    add_random_lora(transformer, TARGET_PRESETS[preset], scale=0.05, generator=generator)
    trained = run()
    save_lora(transformer, tmp_path, kohya_name="chroma.safetensors")
    transformer.delete_adapters(ADAPTER_NAME)
    pipe = ChromaPipeline(FlowMatchEulerDiscreteScheduler(), None, None, None, transformer)
    outputs = {}
    for name in (LORA_WEIGHTS_NAME, "chroma.safetensors"):
        pipe.load_lora_weights(tmp_path / name, adapter_name="loaded")
        outputs[name] = run()
        pipe.delete_adapters("loaded")
    assert (trained - base).abs().max() > 0.05  # the LoRA matters...
    for name, output in outputs.items():  # ...and both files carry all of it
        torch.testing.assert_close(output, trained, atol=1e-4, rtol=1e-4, msg=name)
