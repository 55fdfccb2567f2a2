"""The model families: named or detected from a model's files, a named one that disagrees with the
model refused with the fix, and each family's full-size config written without weights and
planned by the memory planner."""

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
from fluxlora.models.families.configs import FULL_SIZE, write_config
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


@pytest.mark.parametrize("family", FULL_SIZE)
def test_each_family_is_detected_from_its_model_index(family, tmp_path):
    write_config(family, tmp_path)
    assert detect_family_in(tmp_path) == family
    index = json.loads((tmp_path / "model_index.json").read_text())
    assert not any(tmp_path.rglob("*.safetensors")) and index["transformer"][1] == FULL_SIZE[family][1]["_class_name"]


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
    assert set(FAMILY_NAMES) == set(FULL_SIZE)


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


def models_command(*args: str) -> None:
    """`fluxlora models ...` through the server's CLI; it must succeed."""
    import typer

    from fluxlora.server.cli import register

    app = typer.Typer()
    register(app)
    done = CliRunner().invoke(app, ["models", *args])
    assert done.exit_code == 0, done.output


def test_write_config_command(tmp_path):
    models_command("write-config", "--family", "flux2-klein", str(tmp_path / "klein"))
    assert detect_family_in(tmp_path / "klein") == "flux2-klein"


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
