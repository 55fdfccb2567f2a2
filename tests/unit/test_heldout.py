"""The convergence probe: flow-matching loss at fixed noise levels and fixed noise."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from fluxlora.evaluation.heldout import prepare_probe, probe_loss, probe_size
from fluxlora.models.loading import load_flux_pipeline
from fluxlora.training.trainer import LORA_WEIGHTS_NAME, TrainConfig, train_lora

CAPTION = "sks, a photo of a blue square"


@pytest.fixture(scope="module")
def square(shape_image):
    return shape_image((64, 64), "blue", "rectangle")


@pytest.fixture(scope="module")
def trained(tiny_flux_dir, make_dataset, square, tmp_path_factory):
    """Checkpoints at 15 and 30 steps of a run that overfits one image."""
    dataset = make_dataset({"square": (square, CAPTION)})
    cfg = TrainConfig(resolution=64, max_steps=30, learning_rate=3e-3, rank=8, alpha=8, checkpoint_every=15,
                      sample_every=0, gradient_checkpointing=False, seed=0)
    outcome = train_lora(cfg, tiny_flux_dir, dataset, tmp_path_factory.mktemp("run"), device="cpu")
    return [directory / LORA_WEIGHTS_NAME for _, directory in outcome.checkpoints]


@pytest.fixture
def pipe(tiny_flux_dir):
    return load_flux_pipeline(tiny_flux_dir, "cpu", torch.float32)


def test_the_probe_is_deterministic(pipe, square):
    first = probe_loss(pipe, prepare_probe(pipe, [(square, CAPTION)], 64))
    second = probe_loss(pipe, prepare_probe(pipe, [(square, CAPTION)], 64))
    assert first == second and first > 0


def test_training_lowers_the_probe_loss_and_strength_zero_is_the_base(pipe, square, trained):
    probe = prepare_probe(pipe, [(square, CAPTION)], 64)
    base = probe_loss(pipe, probe)
    losses = []
    for i, lora in enumerate(trained):
        pipe.load_lora_weights(str(lora), adapter_name=f"c{i}")
        pipe.set_adapters([f"c{i}"], [1.0])
        losses.append(probe_loss(pipe, probe))
        pipe.set_adapters([f"c{i}"], [0.0])
        assert probe_loss(pipe, probe) == pytest.approx(base, rel=1e-6)
        pipe.delete_adapters(f"c{i}")
    # Fixed noise makes the curve smooth: each checkpoint fits its image better than the one before.
    assert base > losses[0] > losses[1], (base, losses)
    assert losses[1] < 0.95 * base


def test_more_images_and_other_sizes(pipe, square):
    wide = Image.new("RGB", (96, 48), "red")
    probe = prepare_probe(pipe, [(square, CAPTION), (wide, "a red band")], 64)
    assert [tuple(item.latents.shape[-2:]) for item in probe.items] == [(32, 32), (24, 48)]
    assert probe.guidance is None  # the tiny test model has no guidance embedding
    assert probe_loss(pipe, probe) > 0


@pytest.mark.parametrize(
    ("size", "resolution", "expected"),
    [((1024, 1024), 512, (512, 512)), ((1216, 832), 768, (928, 640)), ((64, 64), 64, (64, 64)),
     ((10, 1000), 64, (16, 640))],
)
def test_probe_size_keeps_the_aspect_at_the_training_area(size, resolution, expected):
    assert probe_size(*size, resolution) == expected


def test_an_empty_probe_is_refused(pipe):
    with pytest.raises(ValueError, match="at least one image"):
        prepare_probe(pipe, [], 64)
