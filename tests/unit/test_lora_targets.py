"""LoRA target presets name exactly the modules they say, on FLUX.1's real architecture, and a
LoRA of every preset loads through diffusers' own loaders from both files with the same result."""

from __future__ import annotations

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
from peft.tuners.lora import LoraLayer
from peft.utils import get_peft_model_state_dict
from pydantic import ValidationError
from safetensors.torch import load_file

from fluxlora.models.loading import load_flux_pipeline
from fluxlora.models.tiny_flux import build_tiny_flux
from fluxlora.training.memory.architecture import FLUX1_DEV_TRANSFORMER
from fluxlora.training.trainer import LORA_WEIGHTS_NAME, TrainConfig, train_lora
from fluxlora.training.trainer.checkpoint import ADAPTER_NAME, save_lora
from fluxlora.training.trainer.kohya import _part_dims, _target, kohya_state_dict
from fluxlora.training.trainer.lora import add_lora
from fluxlora.training.trainer.targets import (
    ALL_LINEAR_TARGETS,
    LEGACY_ATTENTION_AND_MLP_TARGETS,
    TARGET_PRESETS,
    matches,
)

RANK, ALPHA = 4, 8.0
DOUBLE_ATTENTION = ["attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0"]
TEXT_ATTENTION = ["attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj", "attn.to_add_out"]
MLPS = ["ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2"]
SINGLE_ATTENTION = ["attn.to_q", "attn.to_k", "attn.to_v"]
# (double-block modules, single-block modules) each preset says it trains
EXPECTED = {
    "attention": (DOUBLE_ATTENTION, SINGLE_ATTENTION),
    "all_linear": (DOUBLE_ATTENTION + TEXT_ATTENTION + MLPS, SINGLE_ATTENTION + ["proj_mlp", "proj_out"]),
}
MODULATION = {"transformer_blocks": ["norm1.linear", "norm1_context.linear"],
              "single_transformer_blocks": ["norm.linear"]}
# The presets, and every linear layer of the blocks (modulation too, named beside the patterns).
EXPORTED = {**TARGET_PRESETS, "blocks_with_modulation": [*ALL_LINEAR_TARGETS, "norm1.linear",
                                                          "norm1_context.linear", "norm.linear"]}


def meta_flux1(**changes) -> FluxTransformer2DModel:
    with torch.device("meta"):
        return FluxTransformer2DModel.from_config({**FLUX1_DEV_TRANSFORMER, **changes})


def lora_modules(transformer) -> set[str]:
    return {name for name, module in transformer.named_modules() if isinstance(module, LoraLayer)}


def in_blocks(double: list[str], single: list[str], config) -> set[str]:
    return ({f"transformer_blocks.{i}.{m}" for i in range(config["num_layers"]) for m in double}
            | {f"single_transformer_blocks.{i}.{m}" for i in range(config["num_single_layers"]) for m in single})


@pytest.mark.parametrize("preset", sorted(EXPECTED))
def test_presets_train_exactly_the_modules_they_name_on_flux1(preset):
    transformer = meta_flux1()
    add_lora(transformer, TrainConfig(rank=RANK, target_modules=TARGET_PRESETS[preset]))
    assert lora_modules(transformer) == in_blocks(*EXPECTED[preset], FLUX1_DEV_TRANSFORMER)


def test_all_linear_leaves_out_only_modulation_and_the_layers_outside_the_blocks():
    transformer = meta_flux1()
    linear = {name for name, module in transformer.named_modules() if isinstance(module, torch.nn.Linear)}
    left_out = {name for name in linear if not matches(ALL_LINEAR_TARGETS, name)}
    outside = {name for name in left_out if not name.split(".")[0].endswith("transformer_blocks")}
    assert outside == {"x_embedder", "context_embedder", "norm_out.linear", "proj_out",
                       *(f"time_text_embed.{e}.linear_{i}" for e in ("timestep_embedder", "guidance_embedder",
                                                                     "text_embedder") for i in (1, 2))}
    assert left_out - outside == in_blocks(MODULATION["transformer_blocks"],
                                           MODULATION["single_transformer_blocks"], FLUX1_DEV_TRANSFORMER)


def test_old_name_lists_keep_their_meaning():
    """Runs recorded with the old attention+MLP list (run.json) rebuild the adapter they trained,
    final layer included and the text MLP left out, so they resume and evaluate as before."""
    transformer = meta_flux1(num_layers=2, num_single_layers=2)
    add_lora(transformer, TrainConfig(rank=RANK, target_modules=LEGACY_ATTENTION_AND_MLP_TARGETS))
    double = DOUBLE_ATTENTION + TEXT_ATTENTION + ["ff.net.0.proj", "ff.net.2"]
    expected = in_blocks(double, SINGLE_ATTENTION + ["proj_mlp", "proj_out"], {"num_layers": 2, "num_single_layers": 2})
    assert lora_modules(transformer) == expected | {"proj_out"}
    assert transformer.peft_config[ADAPTER_NAME].target_modules == set(LEGACY_ATTENTION_AND_MLP_TARGETS)


def test_names_and_patterns_mix_and_bad_patterns_are_refused():
    targets = ["to_out.0", r"single_transformer_blocks\.\d+\.proj_mlp"]
    assert matches(targets, "transformer_blocks.3.attn.to_out.0")
    assert matches(targets, "single_transformer_blocks.12.proj_mlp")
    assert not matches(targets, "proj_out") and not matches(targets, "transformer_blocks.3.attn.to_q")
    assert not matches(ALL_LINEAR_TARGETS, "proj_out")
    with pytest.raises(ValidationError, match="not a valid regular expression"):
        TrainConfig(target_modules=["transformer_blocks.(0"])


def random_lora(transformer, targets: list[str], seed: int = 0) -> None:
    """The run's adapter with random B matrices (a fresh LoRA's are zero)."""
    add_lora(transformer, TrainConfig(rank=RANK, alpha=ALPHA, target_modules=targets))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in transformer.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.05)


def comfyui_delta(kohya: dict[str, torch.Tensor], name: str) -> torch.Tensor:
    """How ComfyUI (and kohya's own loader) applies a kohya LoRA: up @ down * alpha / rank."""
    down, up = kohya[f"{name}.lora_down.weight"], kohya[f"{name}.lora_up.weight"]
    return up @ down * (kohya[f"{name}.alpha"].item() / down.shape[0])


@pytest.mark.parametrize("preset", sorted(EXPORTED))
def test_the_comfyui_file_holds_the_same_deltas_as_the_diffusers_file(preset):
    transformer = build_tiny_flux().transformer
    random_lora(transformer, EXPORTED[preset])
    kohya = kohya_state_dict(get_peft_model_state_dict(transformer, adapter_name=ADAPTER_NAME), ALPHA,
                             transformer.config)
    expected: dict[str, dict[int | None, torch.Tensor]] = {}
    for module in lora_modules(transformer):
        layer, target = transformer.get_submodule(module), _target(module)
        a, b = layer.lora_A[ADAPTER_NAME].weight, layer.lora_B[ADAPTER_NAME].weight
        expected.setdefault(target.bfl, {})[target.part] = (b @ a * layer.scaling[ADAPTER_NAME]).detach()
    assert {k.split(".")[0] for k in kohya} == {"lora_unet_" + bfl.replace(".", "_") for bfl in expected}
    for bfl, parts in expected.items():
        if None in parts:
            want = parts[None]
        else:  # a fused layer: parts the preset does not train are zero rows
            dims = _part_dims(bfl, transformer.config)
            want = torch.cat([parts.get(i, torch.zeros(d, transformer.config.num_attention_heads
                                                       * transformer.config.attention_head_dim))
                              for i, d in enumerate(dims)])
        torch.testing.assert_close(comfyui_delta(kohya, "lora_unet_" + bfl.replace(".", "_")), want,
                                   atol=1e-6, rtol=1e-5)


@pytest.fixture(scope="module")
def shallow_flux1() -> FluxTransformer2DModel:
    """FLUX.1-dev's real layer widths (diffusers' kohya converter assumes them), 1 double and 1
    single block: 0.55 B parameters, float32, small random weights."""
    transformer = meta_flux1(num_layers=1, num_single_layers=1).to_empty(device="cpu")
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for param in transformer.parameters():
            param.normal_(0, 0.02, generator=generator)
    return transformer.eval().requires_grad_(False)


def run(transformer) -> torch.Tensor:
    """The transformer's output for 16 image and 8 text tokens."""
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        return transformer(
            hidden_states=torch.randn(1, 16, 64, generator=generator),
            encoder_hidden_states=torch.randn(1, 8, 4096, generator=generator),
            pooled_projections=torch.randn(1, 768, generator=generator),
            timestep=torch.tensor([0.5]), guidance=torch.tensor([3.5]),
            img_ids=torch.stack(torch.meshgrid(torch.zeros(1), torch.arange(4.0), torch.arange(4.0),
                                               indexing="ij"), -1).reshape(16, 3),
            txt_ids=torch.zeros(8, 3), return_dict=False,
        )[0]


@pytest.mark.parametrize("preset", sorted(EXPORTED))
def test_both_files_load_through_diffusers_with_the_same_output(preset, shallow_flux1, tmp_path):
    transformer = shallow_flux1
    base = run(transformer)
    random_lora(transformer, EXPORTED[preset])
    trained = run(transformer)
    save_lora(transformer, tmp_path, kohya_name="run.safetensors")
    transformer.delete_adapters(ADAPTER_NAME)
    pipe = FluxPipeline(FlowMatchEulerDiscreteScheduler(), None, None, None, None, None, transformer)
    try:
        outputs = {}
        for name in (LORA_WEIGHTS_NAME, "run.safetensors"):
            pipe.load_lora_weights(tmp_path / name, adapter_name="loaded")
            outputs[name] = run(transformer)
            pipe.delete_adapters("loaded")
    finally:
        transformer.delete_adapters([n for n in getattr(transformer, "peft_config", {})])
    assert (trained - base).abs().max() > 0.05  # the LoRA matters...
    for name, output in outputs.items():  # ...and both files carry all of it
        torch.testing.assert_close(output, trained, atol=1e-4, rtol=1e-4, msg=name)


def test_a_run_recorded_with_the_old_list_resumes_and_loads(tiny_flux_dir, make_dataset, shape_image, tmp_path):
    """run.json's old attention+MLP list: the run resumes exactly, and its LoRA file loads in a
    pipeline as evaluation loads it, final layer included."""
    dataset = make_dataset({"red": (shape_image((64, 64), "red"), "a red circle")})
    cfg = TrainConfig(resolution=64, max_steps=2, checkpoint_every=1, sample_every=0, rank=RANK, alpha=ALPHA,
                      gradient_checkpointing=False, learning_rate=1e-3, target_modules=LEGACY_ATTENTION_AND_MLP_TARGETS)
    whole = train_lora(cfg, tiny_flux_dir, dataset, tmp_path / "whole", device="cpu")
    resumed = train_lora(cfg, tiny_flux_dir, dataset, tmp_path / "resumed", device="cpu",
                         resume_from=tmp_path / "whole/checkpoints/step-000001")
    assert resumed.losses == whole.losses
    assert "transformer.proj_out.lora_A.weight" in load_file(resumed.final_checkpoint)

    pipe = load_flux_pipeline(tiny_flux_dir, "cpu", torch.float32)
    pipe.load_lora_weights(resumed.final_checkpoint, adapter_name="trained")
    double = DOUBLE_ATTENTION + TEXT_ATTENTION + ["ff.net.0.proj", "ff.net.2"]
    trained = in_blocks(double, SINGLE_ATTENTION + ["proj_mlp", "proj_out"], pipe.transformer.config)
    assert lora_modules(pipe.transformer) == trained | {"proj_out"}
