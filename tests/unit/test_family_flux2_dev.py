"""FLUX.2 [dev] as a model family: its tiny model (Mistral-3 text encoder read at the pipeline's
layers 10, 20, 30 through the pipeline's own chat template, [klein]'s transformer with the
distilled guidance embedding) is detected, trains through the same trainer with the guidance value
fed to the transformer (loss falls when overfitting one image, a resume repeats the run exactly),
and its LoRA renders through Flux2Pipeline, pulling generations toward the training image."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from diffusers import Flux2Pipeline
from training_support import CIRCLE_CAPTION as CAPTION
from training_support import assert_resume_repeats_the_run, overfit_one_image
from training_support import quick_flux2 as quick

from fluxlora.models.families import FLUX2_DEV, detect_family_in, family_for_model, get_family, planning_family
from fluxlora.models.families.flux2 import FLUX2_ALL_LINEAR_TARGETS
from fluxlora.models.latents import image_to_pixels
from fluxlora.models.loading import load_flux_pipeline
from fluxlora.models.tiny_family import write_tiny_family


@pytest.fixture(scope="module")
def dev_dir(tmp_path_factory) -> Path:
    return write_tiny_family("flux2-dev", tmp_path_factory.mktemp("tiny-dev"), seed=0)


def test_the_tiny_model_is_a_flux2_dev_pipeline_detected_and_trainable_as_such(dev_dir):
    assert json.loads((dev_dir / "model_index.json").read_text())["_class_name"] == "Flux2Pipeline"
    assert detect_family_in(dev_dir) == "flux2-dev" and family_for_model(dev_dir) is FLUX2_DEV
    assert get_family("flux2-dev") is planning_family("flux2-dev") is FLUX2_DEV
    pipe = Flux2Pipeline.from_pretrained(dev_dir, local_files_only=True)
    assert type(pipe.text_encoder).__name__ == "Mistral3ForConditionalGeneration"
    assert pipe.transformer.config.guidance_embeds
    # The pipeline's own text layers (10, 20, 30) of a 16-wide Mistral-3, stacked: 48 features a token.
    embeds, text_ids = pipe.encode_prompt(CAPTION, max_sequence_length=32)
    assert embeds.shape == (1, 32, 48) and text_ids.shape == (1, 32, 4)
    # The family encodes a batch as the pipeline does, its system message and chat included.
    encoded = FLUX2_DEV.encode_prompts(pipe, [CAPTION, "a blue square"], torch.device("cpu"), 32)
    torch.testing.assert_close(encoded.embeds[:1], embeds)
    assert encoded.pooled.numel() == 0 and encoded.mask is None and encoded.text_ids.shape == (32, 4)
    assert not torch.allclose(encoded.embeds[0], encoded.embeds[1])


def test_a_real_dev_folder_that_names_mistral3s_vision_processor_loads_with_its_text_tokenizer(dev_dir, tmp_path):
    """FLUX.2 [dev]'s folder names a PixtralProcessor as its tokenizer, which transformers builds only with
    torchvision (its image half); the servers install none, and the pipeline only encodes text."""
    import importlib.util
    import shutil

    if importlib.util.find_spec("torchvision") is not None:
        pytest.skip("with torchvision the processor itself loads")
    folder = tmp_path / "dev-as-published"
    shutil.copytree(dev_dir, folder)
    index = json.loads((folder / "model_index.json").read_text())
    (folder / "model_index.json").write_text(json.dumps({**index, "tokenizer": ["transformers", "PixtralProcessor"]}))
    (folder / "tokenizer" / "processor_config.json").write_text(json.dumps({"processor_class": "PixtralProcessor"}))
    with pytest.raises((ImportError, ValueError)):  # diffusers: "cannot be loaded" (a torchvision placeholder)
        Flux2Pipeline.from_pretrained(folder, local_files_only=True)
    pipe = load_flux_pipeline(folder, "cpu", torch.float32)
    reference = load_flux_pipeline(dev_dir, "cpu", torch.float32)
    encoded = FLUX2_DEV.encode_prompts(pipe, [CAPTION], torch.device("cpu"), 32)
    torch.testing.assert_close(encoded.embeds, FLUX2_DEV.encode_prompts(reference, [CAPTION], torch.device("cpu"),
                                                                         32).embeds)


def test_guidance_is_the_distilled_embedding_not_a_negative_pass(dev_dir):
    pipe = load_flux_pipeline(dev_dir, "cpu", torch.float32)
    text, negative = FLUX2_DEV.encode_for_pipeline(pipe, CAPTION)
    assert negative is None
    assert FLUX2_DEV.pipeline_prompt_kwargs(text, None, 3.5) == dict(prompt_embeds=text.embeds, guidance_scale=3.5)
    hidden = torch.randn(2, 256, 16)
    kwargs = FLUX2_DEV.transformer_kwargs(pipe.transformer, hidden_states=hidden, sigmas=torch.tensor([0.5, 0.5]),
                                          text=text, img_ids=FLUX2_DEV.image_ids(32, 32, "cpu", torch.float32),
                                          guidance=3.5)
    assert torch.equal(kwargs["guidance"], torch.full((2,), 3.5))
    kwargs["encoder_hidden_states"] = kwargs["encoder_hidden_states"].expand(2, -1, -1)
    with torch.no_grad():
        at_35 = pipe.transformer(**kwargs)[0]
        at_1 = pipe.transformer(**{**kwargs, "guidance": torch.ones(2)})[0]
    assert not torch.allclose(at_35, at_1)  # the value reaches the transformer


def test_the_image_latents_compare_with_what_the_pipeline_returns(dev_dir, shape_image):
    # Flux2Pipeline's output_type="latent" is the transformer's tokens, normalised and packed
    # (Flux2KleinPipeline's is the raw VAE latents): the render's target must be the same.
    pipe = load_flux_pipeline(dev_dir, "cpu", torch.float32)
    target = FLUX2_DEV.pipeline_output_latents(pipe.vae, image_to_pixels(pipe, shape_image((64, 64), "red")))
    out = pipe(prompt_embeds=torch.randn(1, 8, 48), guidance_scale=1.0, height=64, width=64, num_inference_steps=2,
               output_type="latent", generator=torch.Generator().manual_seed(0)).images
    assert target.shape == out.shape == (1, 256, 16)


def test_resuming_repeats_the_uninterrupted_run(dev_dir, two_shapes, tmp_path):
    cfg = quick(max_steps=6, checkpoint_every=3, lr_scheduler="cosine", caption_dropout=0.3,
                timestep_sampling="flux_shift")
    assert_resume_repeats_the_run(cfg, dev_dir, two_shapes, tmp_path)


@pytest.fixture(scope="module")
def overfit(dev_dir, circle, tmp_path_factory):
    # As klein's: every linear layer of the blocks and the final layer; guidance 1.0 in training
    # and in the renders below.
    return overfit_one_image(dev_dir, circle, tmp_path_factory.mktemp("dev-run"), steps=150,
                             targets=FLUX2_ALL_LINEAR_TARGETS, prompt=CAPTION, learning_rate=2e-3, guidance=1.0,
                             max_sequence_length=64)


@pytest.mark.slow  # the 150-step run: 36 s on an idle 2-core machine, 3-5 min on a busy one
def test_loss_falls_when_overfitting_one_image(overfit):
    overfit.assert_the_loss_halved(checkpoints=[75, 150])


@pytest.mark.slow  # the 150-step run: 36 s on an idle 2-core machine, 3-5 min on a busy one
def test_the_lora_pulls_dev_generations_toward_the_training_image(overfit, circle):
    overfit.assert_the_lora_pulls_generations_toward(circle / "circle.png", CAPTION, guidance=1.0)
