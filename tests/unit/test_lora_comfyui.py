"""The kohya file of every family loads in ComfyUI: each of its keys is one ComfyUI reads, each LoRA patches
a weight of the shape its up x down product has, and ComfyUI adds exactly the deltas the run trained, for
every target preset. ComfyUI's rules and the commit they were read at are in tests/comfyui_lora_keys.py;
the key names and shapes, written down for the tiny models, in tests/data/comfyui_lora_keys.json.
(That the same file loads in diffusers is tested in test_lora_export.py, test_lora_targets.py and the
family tests.)"""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
from comfyui_lora_keys import (
    COMFYUI_COMMIT,
    READ_SUFFIXES,
    as_diffusers_deltas,
    comfyui_delta,
    comfyui_params,
    diffusers_file_targets,
    key_map_for,
    recorded,
    tiny_transformer,
    tiny_transformer_configs,
)
from safetensors import safe_open
from safetensors.torch import load_file

from fluxlora.models.families import FAMILIES
from fluxlora.training.trainer import TrainConfig
from fluxlora.training.trainer.checkpoint import ADAPTER_NAME, LORA_WEIGHTS_NAME, save_lora
from fluxlora.training.trainer.lora import add_lora
from fluxlora.training.trainer.targets import LEGACY_ATTENTION_AND_MLP_TARGETS, TARGET_PRESETS

RANK, ALPHA = 4, 8.0
KOHYA_NAME = "run-step-000001.safetensors"
# Every preset; attention+MLP (the older list runs still resume with) on the families with FLUX.1's names.
PRESETS = {**TARGET_PRESETS, "attention+mlp": LEGACY_ATTENTION_AND_MLP_TARGETS}
CASES = [(family, preset) for family in FAMILIES for preset in PRESETS
         if not (preset == "attention+mlp" and FAMILIES[family].target_presets)]


@pytest.fixture(scope="module")
def comfyui_keys() -> dict:
    return recorded()


@dataclass(frozen=True)
class Saved:
    transformer: torch.nn.Module  # with a LoRA whose deltas are all non-zero
    kohya: dict[str, torch.Tensor]
    metadata: dict[str, str]  # the kohya file's
    diffusers: dict[str, torch.Tensor]


@pytest.fixture(scope="module")
def lora_files(tmp_path_factory):
    """The LoRA files save_lora writes for a (family, preset), made once."""
    made = {}

    def make(family: str, preset: str):
        if (family, preset) not in made:
            transformer = tiny_transformer(family)
            add_lora(transformer, TrainConfig(rank=RANK, alpha=ALPHA, target_modules=PRESETS[preset]))
            generator = torch.Generator().manual_seed(0)
            with torch.no_grad():  # a fresh LoRA's B is zero: make every delta count
                for name, param in transformer.named_parameters():
                    if "lora_B" in name:
                        param.copy_(torch.randn(param.shape, generator=generator) * 0.1)
            directory = tmp_path_factory.mktemp(f"{family}-{preset}".replace("+", "-"))
            save_lora(transformer, directory, kohya_name=KOHYA_NAME)
            with safe_open(directory / KOHYA_NAME, "pt") as handle:
                metadata = handle.metadata()
            made[family, preset] = Saved(transformer, load_file(directory / KOHYA_NAME), metadata,
                                         load_file(directory / LORA_WEIGHTS_NAME))
        return made[family, preset]

    return make


def stems_of(kohya: dict[str, torch.Tensor]) -> set[str]:
    return {key.split(".", 1)[0] for key in kohya}


def test_the_recorded_comfyui_keys_are_the_rules_applied_to_the_tiny_models(comfyui_keys):
    assert comfyui_keys["comfyui"]["commit"] == COMFYUI_COMMIT
    configs = tiny_transformer_configs()
    assert set(comfyui_keys["families"]) == set(FAMILIES)
    for family, config in configs.items():
        assert comfyui_keys["families"][family] == key_map_for(family, config), (
            f"{family}: run `python tests/comfyui_lora_keys.py` after checking the change against ComfyUI")


@pytest.mark.parametrize(("family", "preset"), CASES)
def test_every_key_of_the_kohya_file_is_one_comfyui_applies_to_a_weight_of_its_shape(
        family, preset, lora_files, comfyui_keys):
    kohya = lora_files(family, preset).kohya
    key_map = comfyui_keys["families"][family]
    assert kohya
    for stem in stems_of(kohya):
        assert stem in key_map, f"ComfyUI has no {family} weight for {stem}"
        # nothing ComfyUI would log as "lora key not loaded"; alpha a one-element tensor (.item())
        assert {key for key in kohya if key.split(".", 1)[0] == stem} == {stem + s for s in READ_SUFFIXES}
        assert kohya[stem + ".alpha"].numel() == 1
        up, down = kohya[stem + ".lora_up.weight"], kohya[stem + ".lora_down.weight"]
        assert up.shape[1] == down.shape[0]
        assert [up.shape[0], down.shape[1]] == key_map[stem]["shape"], f"{stem}: ComfyUI would drop or misplace it"


@pytest.mark.parametrize(("family", "preset"), CASES)
def test_comfyui_adds_exactly_the_trained_deltas_and_nothing_else(family, preset, lora_files, comfyui_keys):
    saved = lora_files(family, preset)
    transformer, kohya = saved.transformer, saved.kohya
    key_map = comfyui_keys["families"][family]
    patched = {key_map[stem]["weight"]: comfyui_delta(kohya, stem) for stem in stems_of(kohya)}
    got = as_diffusers_deltas(comfyui_params(family, transformer.config), patched)

    trained = {}
    for name, module in transformer.named_modules():
        if hasattr(module, "lora_A") and ADAPTER_NAME in module.lora_A:
            a, b = module.lora_A[ADAPTER_NAME].weight, module.lora_B[ADAPTER_NAME].weight
            trained[name] = (b @ a * module.scaling[ADAPTER_NAME]).detach()
    assert trained and set(trained) <= set(got), f"trained but not applied by ComfyUI: {set(trained) - set(got)}"
    for module, delta in got.items():
        want = trained.get(module, torch.zeros_like(delta))  # rows of a fused weight the run did not train
        torch.testing.assert_close(delta, want, atol=1e-6, rtol=1e-5, msg=f"{family} {preset}: {module}")


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_the_metadata_names_the_family_though_comfyui_reads_none(family, lora_files):
    # ComfyUI's LoraLoader never reads a LoRA's metadata; other tools sort LoRAs by these fields.
    metadata = lora_files(family, "attention").metadata
    assert metadata["ss_base_model_version"] == FAMILIES[family].kohya_base_model_version
    assert metadata["ss_network_module"] == FAMILIES[family].kohya_network_module
    assert (metadata["ss_network_dim"], metadata["ss_network_alpha"]) == (str(RANK), str(ALPHA))


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_comfyui_reads_the_diffusers_file_without_its_alpha_and_for_flux2_only_in_part(family, lora_files):
    """Why ComfyUI users get the kohya file: ComfyUI knows FLUX.1's diffusers names only."""
    saved = lora_files(family, "all_linear")
    modules = {key.rsplit(".", 2)[0] for key in saved.diffusers}
    assert not any(key.endswith(".alpha") for key in saved.diffusers)
    unknown = modules - set(diffusers_file_targets(comfyui_params(family, saved.transformer.config)))
    if FAMILIES[family].target_presets:  # FLUX.2: its MLPs and single blocks have other names
        double, single = "transformer.transformer_blocks.0.", "transformer.single_transformer_blocks.0."
        assert unknown == {double + "ff.linear_in", double + "ff.linear_out", double + "ff_context.linear_in",
                           double + "ff_context.linear_out", single + "attn.to_qkv_mlp_proj", single + "attn.to_out"}
    else:
        assert unknown == set()
