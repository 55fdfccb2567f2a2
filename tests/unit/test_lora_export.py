"""Every checkpoint's LoRA in two formats: diffusers/peft keys and kohya sd-scripts keys (what
ComfyUI loads), the same LoRA in both, with the run's metadata in each file."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from diffusers.loaders.lora_conversion_utils import _convert_kohya_flux_lora_to_diffusers
from peft.utils import get_peft_model_state_dict
from safetensors import safe_open
from safetensors.torch import load_file

from fluxlora.models.loading import load_flux_pipeline
from fluxlora.models.tiny_flux import write_tiny_flux
from fluxlora.training.memory.architecture import FLUX1_DEV_TRANSFORMER
from fluxlora.training.trainer import LORA_WEIGHTS_NAME, TrainConfig, train_lora
from fluxlora.training.trainer.checkpoint import ADAPTER_NAME, save_lora
from fluxlora.training.trainer.kohya import kohya_state_dict
from fluxlora.training.trainer.lora import add_lora

RANK, ALPHA = 4, 8.0
KOHYA_NAME = "run-step-000001.safetensors"
# Every kind of double-block layer, fused and not, and the single blocks' linear2 and modulation.
# (The single blocks' fused linear1 is left out here: diffusers' kohya loader splits it at
# FLUX.1's real widths, 3 x 3072 + 12288, which the tiny model does not have; the next tests
# cover it.)
DIFFUSERS_LOADABLE = [
    "transformer_blocks.0.attn.to_q", "transformer_blocks.0.attn.to_k", "transformer_blocks.0.attn.to_v",
    "add_q_proj", "add_k_proj", "add_v_proj", "to_out.0", "to_add_out", "ff.net.0.proj", "ff.net.2",
    "ff_context.net.0.proj", "ff_context.net.2", "norm1.linear", "norm1_context.linear",
    "single_transformer_blocks.0.proj_out", "norm.linear",
]


@pytest.fixture(scope="module")
def flux_dev(tmp_path_factory) -> Path:
    return write_tiny_flux(tmp_path_factory.mktemp("tiny-dev"), guidance_embeds=True)


def lora_pipeline(model: Path, targets: list[str], seed: int = 0):
    """A pipeline with a LoRA whose B matrices are random (a fresh LoRA's are zero)."""
    pipe = load_flux_pipeline(model, "cpu", torch.float32)
    add_lora(pipe.transformer, TrainConfig(rank=RANK, alpha=ALPHA, target_modules=targets))
    generator = torch.Generator().manual_seed(seed)
    for name, param in pipe.transformer.named_parameters():
        if "lora_B" in name:
            param.data = torch.randn(param.shape, generator=generator) * 0.2
    return pipe


def latents(model: Path, lora_file: Path | None) -> torch.Tensor:
    pipe = load_flux_pipeline(model, "cpu", torch.float32)
    if lora_file is not None:
        pipe.load_lora_weights(lora_file, adapter_name="trained")
    text = torch.Generator().manual_seed(1)
    return pipe(
        prompt_embeds=torch.randn(1, 8, 32, generator=text), pooled_prompt_embeds=torch.randn(1, 32, generator=text),
        height=64, width=64, num_inference_steps=2, output_type="latent",
        generator=torch.Generator().manual_seed(0),
    ).images


def delta(pipe, module: str) -> torch.Tensor:
    """What a module's LoRA adds to its weight: B A alpha/rank."""
    layer = pipe.transformer.get_submodule(module)
    a, b = layer.lora_A[ADAPTER_NAME].weight, layer.lora_B[ADAPTER_NAME].weight
    return (b @ a * layer.scaling[ADAPTER_NAME]).detach()


def comfyui_delta(kohya: dict[str, torch.Tensor], name: str) -> torch.Tensor:
    """How ComfyUI (and kohya's own loader) applies a kohya LoRA: up @ down * alpha / rank."""
    down, up = kohya[f"{name}.lora_down.weight"], kohya[f"{name}.lora_up.weight"]
    return up @ down * (kohya[f"{name}.alpha"].item() / down.shape[0])


def test_kohya_file_loads_in_diffusers_with_the_same_output_as_the_peft_file(flux_dev, tmp_path):
    pipe = lora_pipeline(flux_dev, DIFFUSERS_LOADABLE)
    save_lora(pipe.transformer, tmp_path, kohya_name=KOHYA_NAME)
    kohya_keys = load_file(tmp_path / KOHYA_NAME)
    assert "lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight" in kohya_keys
    assert "lora_unet_single_blocks_0_linear2.alpha" in kohya_keys

    base = latents(flux_dev, None)
    from_peft = latents(flux_dev, tmp_path / LORA_WEIGHTS_NAME)
    from_kohya = latents(flux_dev, tmp_path / KOHYA_NAME)
    assert (from_peft - base).abs().max() > 0.1  # the LoRA matters...
    torch.testing.assert_close(from_kohya, from_peft, atol=1e-5, rtol=1e-5)  # ...and both files carry it


def test_fused_layers_apply_as_comfyui_applies_them(flux_dev):
    """q/k/v (+ the MLP input in single blocks) are one layer in FLUX's original model; a part the
    run did not train (here v, and the text stream's q and k) contributes zero rows."""
    pipe = lora_pipeline(flux_dev, ["to_q", "to_k", "proj_mlp", "add_v_proj", "proj_out", "norm_out.linear"])
    state = get_peft_model_state_dict(pipe.transformer, adapter_name=ADAPTER_NAME)
    kohya = kohya_state_dict(state, ALPHA, pipe.transformer.config)

    def zeros_like(module):
        return torch.zeros_like(pipe.transformer.get_submodule(module).weight)

    double, single = "transformer_blocks.0.", "single_transformer_blocks.0."
    expected = {
        "double_blocks_0_img_attn_qkv": torch.cat([delta(pipe, double + "attn.to_q"),
                                                   delta(pipe, double + "attn.to_k"),
                                                   zeros_like(double + "attn.to_v")]),
        "double_blocks_0_txt_attn_qkv": torch.cat([zeros_like(double + "attn.add_q_proj"),
                                                   zeros_like(double + "attn.add_k_proj"),
                                                   delta(pipe, double + "attn.add_v_proj")]),
        "single_blocks_0_linear1": torch.cat([delta(pipe, single + "attn.to_q"), delta(pipe, single + "attn.to_k"),
                                              zeros_like(single + "attn.to_v"), delta(pipe, single + "proj_mlp")]),
        "single_blocks_0_linear2": delta(pipe, single + "proj_out"),
        "final_layer_linear": delta(pipe, "proj_out"),
        # BFL's final modulation is (shift, scale), diffusers' (scale, shift)
        "final_layer_adaLN_modulation_1": torch.cat(delta(pipe, "norm_out.linear").chunk(2)[::-1]),
    }
    assert {k.split(".")[0] for k in kohya} == {f"lora_unet_{name}" for name in expected}
    for name, want in expected.items():
        torch.testing.assert_close(comfyui_delta(kohya, f"lora_unet_{name}"), want, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("parts", [
    ["attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp"],
    ["attn.to_q", "attn.to_k", "attn.to_v"],
    ["attn.to_v"],
])
def test_fused_layers_at_flux1_widths_split_back_in_diffusers(parts):
    """The LoRA matrices alone at FLUX.1-dev's real sizes (no model): diffusers' kohya converter
    gives every module back its own B A alpha/rank."""
    generator = torch.Generator().manual_seed(0)
    widths = {"proj_mlp": 12288}
    modules = [f"single_transformer_blocks.37.{p}" for p in parts]
    modules += [f"transformer_blocks.18.attn.{p}" for p in ("to_q", "to_v", "add_k_proj")]
    state = {}
    for module in modules:
        out = widths.get(module.rsplit(".", 1)[-1], 3072)
        state[f"transformer.{module}.lora_A.weight"] = torch.randn(16, 3072, generator=generator)
        state[f"transformer.{module}.lora_B.weight"] = torch.randn(out, 16, generator=generator)

    converted = _convert_kohya_flux_lora_to_diffusers(kohya_state_dict(state, 8.0, FLUX1_DEV_TRANSFORMER))
    probe = torch.randn(3072, 4, generator=generator)  # B (A x) for a few x: the deltas compared cheaply
    for module in modules:
        a, b = (state[f"transformer.{module}.lora_{m}.weight"] for m in "AB")
        a2, b2 = (converted[f"transformer.{module}.lora_{m}.weight"] for m in "AB")
        torch.testing.assert_close(b2 @ (a2 @ probe), b @ (a @ probe) * 0.5, rtol=1e-5, atol=1e-3)


def test_every_checkpoint_has_both_formats_with_the_run_metadata(flux_dev, make_dataset, shape_image, tmp_path):
    dataset = make_dataset({"circle": (shape_image((64, 64), "red"), "ohwx a red circle")})
    cfg = TrainConfig(resolution=64, max_steps=2, checkpoint_every=1, sample_every=0, rank=RANK, alpha=ALPHA,
                      gradient_checkpointing=False, learning_rate=1e-3)
    metadata = {"fluxlora.base_model": "store://models/flux1-dev", "fluxlora.trigger_word": "ohwx",
                "fluxlora.dataset_id": "ds-1", "fluxlora.spec": json.dumps({"rank": RANK})}
    outcome = train_lora(cfg, flux_dev, dataset, tmp_path, device="cpu", export_name="run", lora_metadata=metadata)

    for step, directory in outcome.checkpoints:
        kohya_file = directory / f"run-step-{step:06d}.safetensors"
        for path in (directory / LORA_WEIGHTS_NAME, kohya_file):
            with safe_open(path, "pt") as handle:
                stored = handle.metadata()
            assert {k: stored[k] for k in metadata} == metadata
            assert stored["fluxlora.step"] == str(step)
        with safe_open(directory / LORA_WEIGHTS_NAME, "pt") as handle:
            assert json.loads(handle.metadata()["lora_adapter_metadata"])["transformer.r"] == RANK
        with safe_open(kohya_file, "pt") as handle:
            assert handle.metadata()["ss_network_dim"] == str(RANK)
            assert all(k.startswith("lora_unet_") for k in handle.keys())
    assert [step for step, _ in outcome.checkpoints] == [1, 2]


def test_a_module_without_a_kohya_name_is_named_in_the_error():
    state = {"transformer.pos_embed.lora_A.weight": torch.zeros(4, 8),
             "transformer.pos_embed.lora_B.weight": torch.zeros(8, 4)}
    with pytest.raises(ValueError, match="pos_embed"):
        kohya_state_dict(state, ALPHA, FLUX1_DEV_TRANSFORMER)
