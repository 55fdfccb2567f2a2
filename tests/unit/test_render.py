"""Grid cells: checkpoints x LoRA strengths, same prompt and seed in every cell."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fluxlora.evaluation.render import render_cells
from fluxlora.models.loading import load_flux_pipeline
from fluxlora.training.trainer import LORA_WEIGHTS_NAME, TrainConfig, train_lora

PROMPT = "a photo of a blue square"
STRENGTHS = [0.0, 0.5, 1.0]
GRID = {"prompt": PROMPT, "seed": 7, "width": 64, "height": 64, "steps": 3, "guidance": None}


@pytest.fixture(scope="module")
def loras(tiny_flux_dir, make_dataset, shape_image, tmp_path_factory):
    """Two checkpoints of one short run, one given as a file and one as its directory."""
    dataset = make_dataset({"square": (shape_image((64, 64), "blue", "rectangle"), PROMPT)})
    cfg = TrainConfig(
        resolution=64,
        max_steps=30,
        learning_rate=3e-3,
        rank=8,
        alpha=8,
        checkpoint_every=15,
        sample_every=0,
        gradient_checkpointing=False,
        seed=0,
    )
    outcome = train_lora(cfg, tiny_flux_dir, dataset, tmp_path_factory.mktemp("run"), device="cpu")
    (step_a, dir_a), (step_b, dir_b) = outcome.checkpoints
    return [(f"step {step_a}", dir_a / LORA_WEIGHTS_NAME), (f"step {step_b}", dir_b)]


@pytest.fixture
def pipe(tiny_flux_dir):
    # The CPU even where a GPU is present: the checks compare cells for exact equality.
    return load_flux_pipeline(tiny_flux_dir, "cpu", torch.float32)


def base_latents(pipe):
    return pipe(
        PROMPT,
        width=64,
        height=64,
        num_inference_steps=3,
        generator=torch.Generator().manual_seed(7),
        output_type="latent",
    ).images


def has_lora_layers(pipe) -> bool:
    return any("lora" in name for name, _ in pipe.transformer.named_modules())


def test_cells_are_rows_of_loras_by_columns_of_strengths(pipe, loras):
    cells = render_cells(pipe, loras, STRENGTHS, **GRID)
    assert len(cells) == 2 and all(len(row) == 3 for row in cells)
    assert all(cell.size == (64, 64) for row in cells for cell in row)


def test_strength_zero_is_the_base_model_for_every_checkpoint(pipe, loras):
    base = base_latents(pipe)
    cells = render_cells(pipe, loras, STRENGTHS, **GRID, output_type="latent")
    assert torch.equal(cells[0][0], base)
    assert torch.equal(cells[1][0], base)


def test_strength_and_checkpoint_change_the_output(pipe, loras):
    cells = render_cells(pipe, loras, STRENGTHS, **GRID, output_type="latent")
    assert not torch.allclose(cells[0][2], cells[0][0], atol=1e-3)
    assert not torch.allclose(cells[0][1], cells[0][2], atol=1e-3)
    assert not torch.allclose(cells[0][2], cells[1][2], atol=1e-3)


def test_no_lora_outlives_the_render(pipe, loras):
    before = base_latents(pipe)
    render_cells(pipe, loras, STRENGTHS, **GRID, output_type="latent")
    assert pipe.get_list_adapters() == {}
    assert not has_lora_layers(pipe)
    assert torch.equal(base_latents(pipe), before)


def test_a_failing_lora_leaves_no_adapter_behind(pipe, loras, tmp_path):
    broken = tmp_path / "broken.safetensors"
    broken.write_bytes(b"not a safetensors file")
    with pytest.raises(OSError, match="broken.safetensors"):
        render_cells(pipe, [loras[0], ("broken", broken)], STRENGTHS, **GRID, output_type="latent")
    assert pipe.get_list_adapters() == {}
    assert not has_lora_layers(pipe)


def test_same_call_gives_the_same_pixels(pipe, loras):
    first = render_cells(pipe, loras, [0.0, 1.0], **GRID)
    second = render_cells(pipe, loras, [0.0, 1.0], **GRID)
    for row_a, row_b in zip(first, second, strict=True):
        for a, b in zip(row_a, row_b, strict=True):
            assert np.array_equal(np.asarray(a), np.asarray(b))


def test_progress_counts_cells_up_to_the_total(pipe, loras):
    seen = []
    render_cells(
        pipe,
        loras,
        STRENGTHS,
        **GRID,
        progress=lambda done, total: seen.append((done, total)),
        output_type="latent",
    )
    assert seen[-1] == (6, 6)
    assert [d for d, _ in seen] == sorted(d for d, _ in seen)


def test_rejects_an_unknown_output_type(pipe, loras):
    with pytest.raises(ValueError, match="output_type"):
        render_cells(pipe, loras, STRENGTHS, **GRID, output_type="np")
