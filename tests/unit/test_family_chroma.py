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
from safetensors import safe_open
from safetensors.torch import load_file
from training_support import CIRCLE_CAPTION, quick, train

from fluxlora.evaluation.render import latent_distances_to_image
from fluxlora.models.families import CHROMA, FLUX1_DEV, detect_family_in, family_for_model
from fluxlora.models.loading import load_flux_pipeline
from fluxlora.models.tiny_chroma import write_tiny_chroma
from fluxlora.training.trainer import LORA_WEIGHTS_NAME, TrainCallbacks, TrainConfig, train_lora
from fluxlora.training.trainer.checkpoint import ADAPTER_NAME, save_lora
from fluxlora.training.trainer.config import ATTENTION_AND_MLP_TARGETS
from fluxlora.training.trainer.encoding_cache import load_encodings
from fluxlora.training.trainer.lora import add_lora
from fluxlora.training.trainer.targets import TARGET_PRESETS

CAPTION = CIRCLE_CAPTION


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
    cfg = TrainConfig(resolution=64, max_steps=200, learning_rate=1e-3, rank=16, alpha=16,
                      target_modules=[*ATTENTION_AND_MLP_TARGETS, "proj_out"], checkpoint_every=100,
                      sample_every=200, sample_prompts=[CAPTION], sample_steps=2, seed=0)
    out_dir = tmp_path_factory.mktemp("chroma-run")
    return train(cfg, tiny_chroma_dir, circle, out_dir), out_dir


def test_loss_falls_when_overfitting_one_image(overfit):
    outcome, out_dir = overfit
    first, last = sum(outcome.losses[:20]) / 20, sum(outcome.losses[-20:]) / 20
    assert last < 0.5 * first, (first, last)
    assert [step for step, _ in outcome.checkpoints] == [100, 200]
    assert (out_dir / "samples" / "step-000200-0.png").is_file()
    keys = load_file(outcome.final_checkpoint)
    assert keys and all(k.startswith("transformer.") for k in keys)


def test_the_lora_pulls_chroma_generations_toward_the_training_image(overfit, tiny_chroma_dir, circle):
    outcome, _ = overfit
    at_zero, at_one = latent_distances_to_image(tiny_chroma_dir, outcome.final_checkpoint, circle / "circle.png",
                                                CAPTION, strengths=(0.0, 1.0), seed=0, steps=20, precision="fp32",
                                                device="cpu")
    assert at_one < 0.5 * at_zero, (at_zero, at_one)


def test_resuming_repeats_the_uninterrupted_run(tiny_chroma_dir, make_dataset, shape_image, tmp_path):
    dataset = make_dataset({"red": (shape_image((64, 64), "red"), "a red circle"),
                            "blue": (shape_image((64, 64), "blue", "rectangle"), "a blue square")})
    cfg = quick(max_steps=6, checkpoint_every=3, lr_scheduler="cosine", caption_dropout=0.3)
    whole = train(cfg, tiny_chroma_dir, dataset, tmp_path / "whole")
    resumed = train(cfg, tiny_chroma_dir, dataset, tmp_path / "resumed",
                    resume_from=tmp_path / "whole/checkpoints/step-000003")
    assert resumed.losses == whole.losses
    a, b = load_file(whole.final_checkpoint), load_file(resumed.final_checkpoint)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_the_comfyui_file_renders_as_the_diffusers_file_through_chroma_pipeline(tiny_chroma_dir, tmp_path):
    # Every kind of layer the presets train in Chroma's blocks (single blocks' fused linear1 is
    # left out: diffusers splits it at full-size widths only, as for FLUX.1 in test_lora_export).
    targets = [r"transformer_blocks\.0\.(attn\.(to_q|to_k|to_v|add_q_proj|add_k_proj|add_v_proj|to_out\.0|to_add_out)"
               r"|ff\.net\.(0\.proj|2)|ff_context\.net\.(0\.proj|2))", r"single_transformer_blocks\.0\.proj_out"]
    pipe = load_flux_pipeline(tiny_chroma_dir, "cpu", torch.float32)
    add_lora(pipe.transformer, TrainConfig(rank=4, alpha=8.0, target_modules=targets))
    generator = torch.Generator().manual_seed(0)
    for name, param in pipe.transformer.named_parameters():
        if "lora_B" in name:  # a fresh LoRA's B is zero: make it matter
            param.data = torch.randn(param.shape, generator=generator) * 0.2
    save_lora(pipe.transformer, tmp_path, kohya_name="chroma-step-000001.safetensors")
    with safe_open(tmp_path / "chroma-step-000001.safetensors", "pt") as kohya:  # tools sort LoRAs by this
        assert kohya.metadata()["ss_base_model_version"] == "chroma"

    def render(lora: Path | None) -> torch.Tensor:
        fresh = load_flux_pipeline(tiny_chroma_dir, "cpu", torch.float32)
        if lora is not None:
            fresh.load_lora_weights(lora, adapter_name="trained")
        text = torch.Generator().manual_seed(1)
        return fresh(prompt_embeds=torch.randn(1, 8, 32, generator=text), prompt_attention_mask=torch.ones(1, 8),
                     guidance_scale=1.0, height=64, width=64, num_inference_steps=2, output_type="latent",
                     generator=torch.Generator().manual_seed(0)).images

    base, from_peft = render(None), render(tmp_path / LORA_WEIGHTS_NAME)
    from_kohya = render(tmp_path / "chroma-step-000001.safetensors")
    assert (from_peft - base).abs().max() > 0.1
    torch.testing.assert_close(from_kohya, from_peft, atol=1e-5, rtol=1e-5)


def test_a_run_from_the_encoding_cache_trains_as_the_run_that_wrote_it(tiny_chroma_dir, circle, tmp_path):
    cache = tmp_path / "encodings.safetensors"
    first = train(quick(), tiny_chroma_dir, circle, tmp_path / "a", encoding_cache=cache)
    stored = load_encodings(cache, circle)
    assert stored.samples[0].text.mask is not None and stored.samples[0].text.pooled.numel() == 0
    # Chroma attends to the caption's tokens and the first padding token only.
    assert stored.samples[0].text.mask.sum() == len(CAPTION.split()) + 2  # words, </s>, one pad
    encoded_again = []
    second = train_lora(quick(), tiny_chroma_dir, circle, tmp_path / "b",
                        TrainCallbacks(on_encoded=encoded_again.append), device="cpu", encoding_cache=cache)
    assert encoded_again == [] and second.losses == first.losses


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
    add_lora(transformer, TrainConfig(rank=4, alpha=8.0, target_modules=TARGET_PRESETS[preset]))
    with torch.no_grad():
        for name, param in transformer.named_parameters():
            if "lora_B" in name:  # a fresh LoRA's B is zero: make it matter
                param.copy_(torch.randn(param.shape, generator=generator) * 0.05)
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
