"""The model families: named or detected from a model's files, a named one that disagrees with the
model refused with the fix, and each family's full-size configs (one per released size: FLUX.2
[klein] 4B and 9B) written without weights and planned by the memory planner."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from fluxlora.models.families import (
    FAMILY_NAMES,
    agreed_family,
    detect_family,
    detect_family_in,
    planning_family,
)
from fluxlora.models.families.configs import FULL_SIZE, full_size_family, write_config
from fluxlora.training.memory import MemoryPlanner, read_model_shape
from fluxlora.training.trainer import TrainConfig

# Full-size configs shrunk to a few thousand parameters: same classes and inputs, a fake step in a second.
TINY = {"num_layers": 1, "num_single_layers": 1, "num_attention_heads": 2, "attention_head_dim": 16}
TINY_BY_CLASS = {
    "FluxTransformer2DModel": {"joint_attention_dim": 32, "pooled_projection_dim": 32, "axes_dims_rope": [4, 4, 8]},
    "ChromaTransformer2DModel": {"joint_attention_dim": 32, "axes_dims_rope": [4, 4, 8], "approximator_hidden_dim": 32,
                                 "approximator_num_channels": 8, "approximator_layers": 1},
    "Flux2Transformer2DModel": {"joint_attention_dim": 32, "axes_dims_rope": [4, 4, 4, 4],
                                "timestep_guidance_channels": 32},
}


@pytest.mark.parametrize("name", FULL_SIZE)
def test_each_full_size_config_is_detected_as_its_family_from_its_model_index(name, tmp_path):
    write_config(name, tmp_path)
    assert detect_family_in(tmp_path) == full_size_family(name)
    index = json.loads((tmp_path / "model_index.json").read_text())
    assert not any(tmp_path.rglob("*.safetensors")) and index["transformer"][1] == FULL_SIZE[name][1]["_class_name"]


def test_every_family_has_a_full_size_config_and_every_size_belongs_to_one():
    """A family's own name is its first released size; another size is named after its family."""
    assert set(FAMILY_NAMES) <= set(FULL_SIZE)
    for name in FULL_SIZE:
        family = full_size_family(name)
        assert family in FAMILY_NAMES and (name == family or name.startswith(f"{family}-"))
    assert full_size_family("flux2-klein-9b") == "flux2-klein"
    with pytest.raises(ValueError, match="no full-size config named 'flux2-klein-12b': use one of flux1-dev, "):
        full_size_family("flux2-klein-12b")


def test_the_transformer_class_decides_when_model_index_says_nothing():
    assert detect_family(None, {"_class_name": "ChromaTransformer2DModel"}) == "chroma"
    assert detect_family({"_class_name": "SomethingElse"}, {"_class_name": "FluxTransformer2DModel"}) == "flux1-dev"
    assert detect_family(None, None) is None


def test_a_named_family_must_agree_with_the_model_and_unknown_ones_are_explained():
    assert agreed_family("chroma", "", "/models/c") == "chroma"
    assert agreed_family(None, "chroma", "/models/c") == "chroma"
    with pytest.raises(ValueError, match=r"/models/c is a chroma model, not flux1-dev: set family to 'chroma'"):
        agreed_family("chroma", "flux1-dev", "/models/c")
    with pytest.raises(ValueError, match="cannot tell the model family of /models/x"):
        agreed_family(None, "", "/models/x")
    with pytest.raises(ValueError, match="unknown model family 'flux3'"):
        agreed_family(None, "flux3", "/models/x")


def shrunk_config_shape(family: str, folder):
    """The shape the planner reads from `family`'s full-size config directory with the transformer
    shrunk (TINY): same family, classes and VAE."""
    write_config(family, folder)
    config_path = folder / "transformer" / "config.json"
    config = json.loads(config_path.read_text())
    config_path.write_text(json.dumps({**config, **TINY, **TINY_BY_CLASS[config["_class_name"]]}))
    return read_model_shape(str(folder))


@pytest.mark.parametrize("family", ["flux1-dev", "chroma", "flux2-dev", "flux2-klein"])
def test_the_planner_estimates_each_family_from_its_config_alone(family, tmp_path):
    shape = shrunk_config_shape(family, tmp_path)
    assert shape.family == family and shape.vae_scale_factor == 8
    cfg = TrainConfig(resolution=64, precision="bf16", rank=4)
    step = MemoryPlanner().step_memory(shape, cfg)
    assert 0 < step.trainable_bytes < step.weight_bytes < step.peak_bytes
    presets = planning_family(family).target_presets
    if presets:  # FLUX.2: the default (attention) preset is planned as FLUX.2's own list, single blocks included
        def planned(targets):
            return MemoryPlanner().step_memory(shape, cfg.model_copy(update={"target_modules": targets}))

        same, double_only = planned(presets["attention"]), planned(presets["attention"][:1])
        assert same.trainable_bytes == step.trainable_bytes > double_only.trainable_bytes


def models_command(*args: str, exit_code: int = 0) -> str:
    """`fluxlora models ...` through the server's CLI, ending with `exit_code`; its output."""
    import typer

    from fluxlora.server.cli import register

    app = typer.Typer()
    register(app)
    done = CliRunner().invoke(app, ["models", *args], env={"COLUMNS": "200"})
    assert done.exit_code == exit_code, done.output
    return done.output


@pytest.mark.parametrize("name", ["flux2-klein", "flux2-klein-9b"])
def test_write_config_command_writes_each_klein_size(name, tmp_path):
    models_command("write-config", "--family", name, str(tmp_path / name))
    assert detect_family_in(tmp_path / name) == "flux2-klein"
    index = json.loads((tmp_path / name / "model_index.json").read_text())
    transformer = json.loads((tmp_path / name / "transformer" / "config.json").read_text())
    assert index["_class_name"] == "Flux2KleinPipeline" and transformer == FULL_SIZE[name][1]


def test_write_config_command_lists_the_names_it_knows():
    output = models_command("write-config", "--family", "flux3", "out", exit_code=2)
    assert f"'flux3' is not one of {', '.join(FULL_SIZE)}" in " ".join(output.replace("│", " ").split())


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_write_tiny_command_writes_each_family(family, tmp_path):
    models_command("write-tiny", "--family", family, str(tmp_path))
    assert detect_family_in(tmp_path / f"tiny-{family}") == family


def test_the_planner_counts_kontext_control_tokens(tmp_path):
    """Kontext's step carries the control image's tokens too: above FLUX.1 [dev]'s estimate on the
    same transformer."""
    peaks = {}
    for family in ("flux1-dev", "flux1-kontext"):
        shape = shrunk_config_shape(family, tmp_path / family)
        assert shape.family == family
        peaks[family] = MemoryPlanner().step_memory(shape, TrainConfig(resolution=256, precision="bf16", rank=4))
    assert peaks["flux1-kontext"].weight_bytes == peaks["flux1-dev"].weight_bytes
    assert peaks["flux1-kontext"].peak_bytes > peaks["flux1-dev"].peak_bytes
