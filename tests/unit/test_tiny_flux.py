"""The tiny FLUX.1 writer and the loader that serves it and the real model alike."""

from __future__ import annotations

import json

import pytest
import torch
from diffusers import FluxPipeline
from safetensors.torch import load_file

from fluxlora.models.loading import load_flux_pipeline, pick_device_dtype
from fluxlora.models.tiny_flux import write_tiny_flux
from fluxlora.models.tiny_tokenizers import build_clip_tokenizer, build_t5_tokenizer

COMPONENTS = {
    "scheduler": "FlowMatchEulerDiscreteScheduler",
    "vae": "AutoencoderKL",
    "text_encoder": "CLIPTextModel",
    "text_encoder_2": "T5EncoderModel",
    "transformer": "FluxTransformer2DModel",
}


def _weights(model_dir):
    return {
        f"{path.parent.name}/{key}": tensor
        for path in sorted(model_dir.glob("*/*.safetensors"))
        for key, tensor in load_file(path).items()
    }


def test_writes_a_diffusers_flux_directory(tiny_flux_dir):
    index = json.loads((tiny_flux_dir / "model_index.json").read_text())
    assert index["_class_name"] == "FluxPipeline"
    for component, class_name in COMPONENTS.items():
        assert index[component][1] == class_name
    for component in ("tokenizer", "tokenizer_2"):
        assert (tiny_flux_dir / component / "tokenizer.json").is_file()


def test_from_pretrained_loads_it_offline_and_generates(tiny_flux_dir):
    pipe = FluxPipeline.from_pretrained(tiny_flux_dir, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)

    image = pipe(
        "a photo of a red dog",
        height=64,
        width=64,
        num_inference_steps=2,
        generator=torch.Generator().manual_seed(0),
    ).images[0]
    latents = pipe(
        "a photo of a red dog",
        height=64,
        width=64,
        num_inference_steps=2,
        generator=torch.Generator().manual_seed(0),
        output_type="latent",
    ).images

    assert image.size == (64, 64)
    # VAE scale factor 2 and 2x2 packing: 64x64 pixels -> 16x16 tokens of 4 x 4 channels.
    assert latents.shape == (1, 256, 16)
    assert torch.isfinite(latents).all()


def test_same_seed_gives_identical_weights_and_another_seed_does_not(tmp_path, tiny_flux_dir):
    again = _weights(write_tiny_flux(tmp_path / "again", seed=0))
    other = _weights(write_tiny_flux(tmp_path / "other", seed=1))
    first = _weights(tiny_flux_dir)

    assert first.keys() == again.keys()
    assert all(torch.equal(first[k], again[k]) for k in first)
    assert any(not torch.equal(first[k], other[k]) for k in first)


def test_writing_does_not_disturb_the_callers_random_stream(tmp_path):
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    write_tiny_flux(tmp_path / "model", seed=5)
    assert torch.equal(torch.rand(3), expected)


def test_guidance_variant_takes_the_distilled_guidance_input(tmp_path):
    pipe = load_flux_pipeline(
        write_tiny_flux(tmp_path / "dev", guidance_embeds=True), "cpu", torch.float32
    )
    assert pipe.transformer.config.guidance_embeds

    def generate(guidance):
        return pipe(
            "a photo",
            height=64,
            width=64,
            num_inference_steps=2,
            guidance_scale=guidance,
            generator=torch.Generator().manual_seed(0),
            output_type="latent",
        ).images

    assert not torch.equal(generate(1.0), generate(5.0))


def test_loader_returns_frozen_models_in_eval_mode(tiny_flux_dir):
    pipe = load_flux_pipeline(tiny_flux_dir, "cpu", torch.float32)
    for name in ("vae", "text_encoder", "text_encoder_2", "transformer"):
        module = getattr(pipe, name)
        assert not module.training, name
        assert not any(p.requires_grad for p in module.parameters()), name
    # Eval mode matters: T5 dropout in train mode makes the same prompt encode differently.
    first = pipe.encode_prompt("a photo of a cat", prompt_2=None)[0]
    second = pipe.encode_prompt("a photo of a cat", prompt_2=None)[0]
    assert torch.equal(first, second)


def test_loader_honours_the_dtype(tiny_flux_dir):
    pipe = load_flux_pipeline(tiny_flux_dir, "cpu", torch.bfloat16)
    assert pipe.transformer.dtype == torch.bfloat16
    assert pipe.text_encoder_2.dtype == torch.bfloat16


def test_loader_explains_a_directory_that_is_not_a_pipeline(tmp_path):
    with pytest.raises(FileNotFoundError, match="model_index.json"):
        load_flux_pipeline(tmp_path, "cpu", torch.float32)


def test_pick_device_dtype():
    device, dtype = pick_device_dtype("auto")
    if torch.cuda.is_available():
        assert device.type == "cuda" and dtype in (torch.bfloat16, torch.float16)
    else:
        assert (device.type, dtype) == ("cpu", torch.float32)
    assert pick_device_dtype("bf16")[1] == torch.bfloat16
    assert pick_device_dtype("fp16")[1] == torch.float16
    assert pick_device_dtype("fp32")[1] == torch.float32
    assert pick_device_dtype("auto", "cpu") == (torch.device("cpu"), torch.float32)
    with pytest.raises(ValueError, match="precision"):
        pick_device_dtype("int3")


def test_clip_like_tokenizer_pads_to_77_with_bos_and_eos():
    tokenizer = build_clip_tokenizer()
    ids = tokenizer("A photo of a red dog", padding="max_length", max_length=77).input_ids
    assert len(ids) == 77
    assert ids[0] == tokenizer.bos_token_id
    assert ids[7] == tokenizer.eos_token_id and ids[8] == tokenizer.pad_token_id
    assert tokenizer.unk_token_id not in ids[1:7]  # common caption words are in the vocabulary

    long_ids = tokenizer(
        "dog " * 200, padding="max_length", max_length=77, truncation=True
    ).input_ids
    assert len(long_ids) == 77 and long_ids[-1] == tokenizer.eos_token_id


def test_t5_like_tokenizer_ends_with_eos_and_allows_512():
    tokenizer = build_t5_tokenizer()
    ids = tokenizer("a photo of sks person", padding="max_length", max_length=512).input_ids
    assert tokenizer.model_max_length == 512
    assert len(ids) == 512
    assert ids[5] == tokenizer.eos_token_id and ids[6] == tokenizer.pad_token_id == 0
