"""Black Forest Labs' published transformer files (flux1-dev.safetensors, flux2-dev.safetensors,
FLUX.2 [klein] 4B's and 9B's), in BFL's key layout or under ComfyUI's model.diffusion_model. prefix,
are what a single-file base holds: their header names the family and the full-size config of that
model (both klein sizes are the flux2-klein family, told apart by their shapes), the memory planner
reads them with a components folder, and every tensor converts to exactly the keys and shapes of
the model's full-size diffusers transformer, none missing and none left over.

The layouts (names and shapes, bf16) come from BFL's own model code, not from our writer:
tests/data/bfl_checkpoint_layouts.json, written by tests/data/generate_bfl_layouts.py. No weight
is needed: a file's header lists every tensor at its full size over a sparse (unwritten) body, and
the conversion runs on meta tensors."""

from __future__ import annotations

import json
import math
import struct
from pathlib import Path

import pytest
import torch

from fluxlora.models.base_model import single_file_model
from fluxlora.models.families import get_family
from fluxlora.models.families.configs import FULL_SIZE, full_size_family, write_config
from fluxlora.models.single_file import COMFYUI_PREFIX, describe, header_length, is_single_file
from fluxlora.models.single_file_load import to_diffusers_state
from fluxlora.training.memory.architecture import read_model_shape

# By full-size config name (configs.FULL_SIZE): the families, and klein's 9B as flux2-klein-9b.
LAYOUTS: dict[str, dict] = json.loads((Path(__file__).parents[1] / "data" / "bfl_checkpoint_layouts.json").read_text())
# The config values each family's file fixes, by its shapes or by which tensors it has.
FIXED = {
    "flux1-dev": {"in_channels", "num_layers", "num_single_layers", "attention_head_dim", "num_attention_heads",
                  "joint_attention_dim", "pooled_projection_dim", "guidance_embeds"},
    "flux2-dev": {"in_channels", "num_layers", "num_single_layers", "attention_head_dim", "num_attention_heads",
                  "joint_attention_dim", "timestep_guidance_channels", "mlp_ratio", "guidance_embeds"},
}
FIXED["flux2-klein"] = FIXED["flux2-dev"]
# The model cards' sizes: FLUX.1 [dev] 12B, FLUX.2 [dev] 32B, FLUX.2 [klein] 4B and 9B parameters.
BILLIONS = {"flux1-dev": 12, "flux2-dev": 32, "flux2-klein": 4, "flux2-klein-9b": 9}
PREFIXES = {"bfl": "", "comfyui": COMFYUI_PREFIX}


def write_sparse_safetensors(path: Path, tensors: dict[str, list[int]], prefix: str = "") -> Path:
    """A bf16 safetensors file whose header lists `tensors` at their shapes and whose body is a hole
    of the right length (safetensors: 8-byte little-endian header length, the JSON header padded
    to 8 bytes, then the data, each tensor at its data_offsets)."""
    header, offset = {}, 0
    for name, shape in tensors.items():
        size = 2 * math.prod(shape)
        header[prefix + name] = {"dtype": "BF16", "shape": shape, "data_offsets": [offset, offset + size]}
        offset += size
    body = json.dumps(header).encode()
    body += b" " * (-len(body) % 8)
    with open(path, "wb") as handle:
        handle.write(struct.pack("<Q", len(body)) + body)
        handle.truncate(8 + len(body) + offset)  # a sparse file: no disk for the weights
    return path


def full_config(name: str) -> dict:
    return FULL_SIZE[name][1]


@pytest.fixture(params=[(name, layout) for name in LAYOUTS for layout in PREFIXES],
                ids=lambda param: "-".join(param))
def published_file(request, tmp_path) -> tuple[str, str, Path]:
    """(full-size config name, key layout, the file)."""
    name, layout = request.param
    path = tmp_path / f"{name}.safetensors"
    return name, layout, write_sparse_safetensors(path, LAYOUTS[name]["tensors"], PREFIXES[layout])


def test_the_header_names_the_family_and_its_full_size_config(published_file):
    name, layout, path = published_file
    family = full_size_family(name)
    assert is_single_file(str(path))
    model = single_file_model(str(path), None)
    assert (model.family, model.layout, model.dtype) == (family, layout, "BF16")
    assert set(model.config) == FIXED[family]
    assert model.config == {key: full_config(name)[key] for key in FIXED[family]}
    assert round(model.parameters / 1e9) == BILLIONS[name]
    with path.open("rb") as handle:
        assert model.weight_bytes == 2 * model.parameters == path.stat().st_size - header_length(handle.read(8))


def test_the_planner_reads_the_file_with_its_components_folder(published_file, tmp_path):
    name, _, path = published_file
    components = write_config(name, tmp_path / "components")
    shape = read_model_shape(str(path), components=str(components))
    assert shape.family == full_size_family(name)
    assert shape.transformer == full_config(name)


def test_a_flux1_dev_file_is_kontext_when_its_components_or_run_say_so(tmp_path):
    """flux1-kontext-dev.safetensors has FLUX.1 [dev]'s exact keys and shapes: the header alone says
    flux1-dev; a Kontext components folder, or a run naming Kontext, makes it Kontext."""
    path = write_sparse_safetensors(tmp_path / "flux1-kontext-dev.safetensors", LAYOUTS["flux1-dev"]["tensors"])
    assert single_file_model(str(path), None).families == ("flux1-dev", "flux1-kontext")
    kontext = write_config("flux1-kontext", tmp_path / "kontext")
    dev = write_config("flux1-dev", tmp_path / "dev")
    assert read_model_shape(str(path), components=str(kontext)).family == "flux1-kontext"
    assert read_model_shape(str(path), components=str(dev), family="flux1-kontext").family == "flux1-kontext"
    assert read_model_shape(str(path), components=str(dev)).family == "flux1-dev"


@pytest.fixture(scope="module", params=list(LAYOUTS))
def diffusers_shapes(request) -> tuple[str, dict[str, tuple[int, ...]]]:
    """The full-size diffusers transformer's state-dict shapes, built on the meta device."""
    name = request.param
    config = {k: v for k, v in full_config(name).items() if not k.startswith("_")}
    with torch.device("meta"):
        transformer = get_family(full_size_family(name)).transformer_class.from_config(config)
    return name, {key: tuple(tensor.shape) for key, tensor in transformer.state_dict().items()}


@pytest.mark.parametrize("layout", list(PREFIXES))
def test_every_tensor_converts_to_the_diffusers_transformer_exactly(diffusers_shapes, layout):
    name, expected = diffusers_shapes
    family = full_size_family(name)
    prefix = PREFIXES[layout]
    tensors = LAYOUTS[name]["tensors"]
    model = describe({prefix + k: {"dtype": "BF16", "shape": s} for k, s in tensors.items()}, f"{name}.safetensors")
    state = {prefix + k: torch.empty(s, dtype=torch.bfloat16, device="meta") for k, s in tensors.items()}
    converted = {k: tuple(v.shape) for k, v in to_diffusers_state(state, model, get_family(family)).items()}
    assert sorted(set(expected) - set(converted)) == []  # none missing
    assert sorted(set(converted) - set(expected)) == []  # none left over
    assert {k: v for k, v in converted.items() if v != expected[k]} == {}
    # Converters drop what they do not know: every published parameter must land somewhere.
    assert sum(math.prod(s) for s in converted.values()) == sum(math.prod(s) for s in tensors.values())
