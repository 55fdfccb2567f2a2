"""FLUX.1 Kontext as an editing family: its tiny model trains on a before/after pair through the
same trainer (the control image's tokens appended after the target's, the loss on the target
only), the loss falls when overfitting one pair, a resume repeats the run exactly, the encoding
cache keeps the control latents, and the LoRA loads in FluxKontextPipeline and, given the control
image, pulls the edit toward the target."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from diffusers import FluxKontextPipeline
from PIL import Image
from training_support import (
    assert_a_cached_run_repeats_the_run_that_wrote_it,
    assert_resume_repeats_the_run,
    overfit_one_image,
    quick,
    train,
)

from fluxlora.models.families import FLUX1_DEV, KONTEXT, detect_family_in, family_for_model
from fluxlora.models.loading import load_flux_pipeline
from fluxlora.models.tiny_kontext import write_tiny_kontext
from fluxlora.training.trainer.config import ATTENTION_AND_MLP_TARGETS
from fluxlora.training.trainer.step import flow_matching_loss

INSTRUCTION = "make the blue square a red circle"


@pytest.fixture(scope="module")
def tiny_kontext_dir(tmp_path_factory) -> Path:
    return write_tiny_kontext(tmp_path_factory.mktemp("tiny-kontext"), seed=0)


@pytest.fixture(scope="module")
def pair(make_dataset, shape_image) -> Path:
    """target: a red circle; control/: the blue square it is edited from."""
    dataset = make_dataset({"edit": (shape_image((64, 64), "red"), INSTRUCTION)})
    (dataset / "control").mkdir()
    shape_image((64, 64), "blue", "rectangle").save(dataset / "control" / "edit.png")
    return dataset


def test_the_family_is_detected_from_the_model(tiny_kontext_dir):
    assert json.loads((tiny_kontext_dir / "model_index.json").read_text())["_class_name"] == "FluxKontextPipeline"
    assert detect_family_in(tiny_kontext_dir) == "flux1-kontext" and family_for_model(tiny_kontext_dir) is KONTEXT
    pipe = load_flux_pipeline(tiny_kontext_dir, "cpu", torch.float32, text_encoders=False)
    assert isinstance(pipe, FluxKontextPipeline) and pipe.transformer.config.guidance_embeds


def test_the_control_tokens_follow_the_target_tokens_and_only_the_target_is_scored(tiny_kontext_dir):
    pipe = load_flux_pipeline(tiny_kontext_dir, "cpu", torch.float32, text_encoders=False)
    seen = {}

    def spy(module, args, kwargs):
        seen.update(tokens=kwargs["hidden_states"].shape[1], ids=kwargs["img_ids"].clone())

    pipe.transformer.register_forward_pre_hook(spy, with_kwargs=True)
    g = torch.Generator().manual_seed(0)
    latents, noise, control = (torch.randn(1, 4, 8, 8, generator=g) for _ in range(3))
    text = dict(prompt_embeds=torch.randn(1, 8, 32, generator=g), pooled=torch.randn(1, 32, generator=g),
                text_ids=torch.zeros(8, 3))
    args = (pipe.transformer, latents, noise, torch.tensor([0.5]), text["prompt_embeds"], text["pooled"],
            text["text_ids"], 3.5, torch.float32)
    with torch.no_grad():
        loss = flow_matching_loss(*args, family=KONTEXT, control=control)
        assert seen["tokens"] == 32  # 16 target tokens (8x8 latents, 2x2-packed), then 16 control ones
        assert (seen["ids"][:16, 0] == 0).all() and (seen["ids"][16:, 0] == 1).all()
        assert torch.equal(seen["ids"][16:, 1:], seen["ids"][:16, 1:])  # the same pixel positions
        # Another control image changes the prediction, not the shape of what is scored.
        other = flow_matching_loss(*args, family=KONTEXT, control=torch.randn(1, 4, 8, 8, generator=g))
    assert loss.ndim == 0 and loss != other
    with pytest.raises(ValueError, match="flux1-dev family takes no control image"):
        flow_matching_loss(*args, family=FLUX1_DEV, control=control)


def test_a_kontext_run_refuses_a_dataset_without_control_images(tiny_kontext_dir, make_dataset, shape_image,
                                                                 tmp_path):
    lonely = make_dataset({"edit": (shape_image((64, 64), "red"), INSTRUCTION)})
    with pytest.raises(ValueError, match=r"have no control image, e\.g\. edit\.png.*control/<stem>\.png"):
        train(quick(), tiny_kontext_dir, lonely, tmp_path)


@pytest.fixture(scope="module")
def overfit(tiny_kontext_dir, pair, tmp_path_factory):
    return overfit_one_image(tiny_kontext_dir, pair, tmp_path_factory.mktemp("kontext-run"), steps=200,
                             targets=ATTENTION_AND_MLP_TARGETS, prompt=INSTRUCTION, guidance=1.0)


@pytest.mark.slow  # 200 steps
def test_loss_falls_when_overfitting_one_pair(overfit):
    overfit.assert_the_loss_halved(checkpoints=[100, 200])


@pytest.mark.slow  # the 200-step run
def test_the_lora_edits_the_control_image_toward_the_target_in_flux_kontext_pipeline(overfit, pair):
    overfit.assert_the_lora_pulls_generations_toward(pair / "edit.png", INSTRUCTION, guidance=1.0,
                                                     control=pair / "control" / "edit.png")


def test_resuming_repeats_the_uninterrupted_run(tiny_kontext_dir, make_dataset, shape_image, tmp_path):
    dataset = make_dataset({"red": (shape_image((64, 64), "red"), "make it red"),
                            "blue": (shape_image((64, 64), "blue", "rectangle"), "make it a blue square")})
    (dataset / "control").mkdir()
    shape_image((64, 64), "green").save(dataset / "control" / "red.png")
    shape_image((64, 64), "green", "rectangle").save(dataset / "control" / "blue.jpg")
    cfg = quick(max_steps=6, checkpoint_every=3, lr_scheduler="cosine", caption_dropout=0.3)
    assert_resume_repeats_the_run(cfg, tiny_kontext_dir, dataset, tmp_path)


def test_the_encoding_cache_keeps_the_control_latents(tiny_kontext_dir, pair, tmp_path):
    stored = assert_a_cached_run_repeats_the_run_that_wrote_it(quick(), tiny_kontext_dir, pair, tmp_path)
    sample = stored.samples[0]
    assert sample.pair.control == pair / "control" / "edit.png"
    assert sample.control_latents is not None and sample.control_latents.shape == sample.latents.shape
    assert not torch.equal(sample.control_latents, sample.latents)


def test_samples_edit_the_first_control_image(tiny_kontext_dir, pair, tmp_path, monkeypatch):
    seen = []
    original = FluxKontextPipeline.__call__

    def spy(self, *args, **kwargs):
        seen.append(kwargs.get("image"))
        return original(self, *args, **kwargs)

    monkeypatch.setattr(FluxKontextPipeline, "__call__", spy)
    outcome = train(quick(max_steps=1, sample_every=1, sample_prompts=[INSTRUCTION], sample_steps=1),
                    tiny_kontext_dir, pair, tmp_path)
    assert outcome.samples and outcome.samples[0][1][0].is_file()
    assert len(seen) == 1 and seen[0].size == (64, 64)
    assert seen[0].tobytes() == Image.open(pair / "control" / "edit.png").convert("RGB").tobytes()
