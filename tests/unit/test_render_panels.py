"""Rendering several prompt/seed grids at once, and Generate's multi-LoRA images: each LoRA is
loaded once per job, each prompt encoded once, and the pipeline is left as the plain base."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fluxlora.evaluation.render import Panel, generate_images, render_cells, render_panels
from fluxlora.evaluation.tiny_models import write_random_lora
from fluxlora.models.loading import load_flux_pipeline

SIZE = {"width": 64, "height": 64, "steps": 2, "guidance": None}
PANELS = [Panel("a red bottle", 1), Panel("a red bottle", 2), Panel("a blue cup", 1)]


@pytest.fixture(scope="module")
def loras(tiny_flux_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("random-loras")
    return [(f"lora {i}", write_random_lora(tiny_flux_dir, root / str(i), seed=i)) for i in range(2)]


@pytest.fixture
def pipe(tiny_flux_dir):
    return load_flux_pipeline(tiny_flux_dir, "cpu", torch.float32)


def count_calls(monkeypatch, obj, name):
    calls = []
    original = getattr(obj, name)

    def spy(*args, **kwargs):
        calls.append((args, kwargs))
        return original(*args, **kwargs)

    monkeypatch.setattr(obj, name, spy)
    return calls


def pixels(image):
    return np.asarray(image)


def test_each_lora_loads_once_and_each_prompt_is_encoded_once(pipe, loras, monkeypatch):
    loads = count_calls(monkeypatch, pipe, "load_lora_weights")
    encodes = count_calls(monkeypatch, pipe, "encode_prompt")
    cells = render_panels(pipe, loras, [0.0, 0.5, 1.0], PANELS, **SIZE)
    assert len(loads) == len(loras)
    # The pipeline's own call passes the ready embeddings through encode_prompt with prompt=None.
    encoded = [kwargs["prompt"] for _, kwargs in encodes if kwargs.get("prompt") is not None]
    assert encoded == ["a red bottle", "a blue cup"]  # two distinct prompts over three panels
    assert [len(panel) for panel in cells] == [2, 2, 2] and all(len(row) == 3 for p in cells for row in p)
    assert pipe.get_list_adapters() == {}


def test_each_panel_matches_a_single_grid_of_its_prompt_and_seed(pipe, loras):
    cells = render_panels(pipe, loras, [0.0, 1.0], PANELS, **SIZE)
    for panel, panel_cells in zip(PANELS, cells, strict=True):
        alone = render_cells(pipe, loras, [0.0, 1.0], panel.prompt, panel.seed, **SIZE)
        for row_a, row_b in zip(panel_cells, alone, strict=True):
            for a, b in zip(row_a, row_b, strict=True):
                assert np.array_equal(pixels(a), pixels(b))


def test_on_lora_runs_with_the_row_loaded_at_full_strength(pipe, loras):
    seen = []
    render_panels(pipe, loras, [0.5], PANELS[:1], **SIZE,
                  on_lora=lambda row: seen.append((row, pipe.get_list_adapters())))
    assert [row for row, _ in seen] == [0, 1]
    assert all(list(adapters["transformer"]) == [f"grid_row_{row}"] for row, adapters in seen)


def test_generate_applies_every_lora_and_leaves_the_base(pipe, loras):
    [[base]] = generate_images(pipe, [], ["a red bottle"], [3], **SIZE)
    [[one]] = generate_images(pipe, [(loras[0][1], 1.0)], ["a red bottle"], [3], **SIZE)
    [[both]] = generate_images(pipe, [(loras[0][1], 1.0), (loras[1][1], 0.7)], ["a red bottle"], [3], **SIZE)
    assert not np.array_equal(pixels(base), pixels(one))
    assert not np.array_equal(pixels(one), pixels(both))
    assert pipe.get_list_adapters() == {}
    [[again]] = generate_images(pipe, [], ["a red bottle"], [3], **SIZE)
    assert np.array_equal(pixels(base), pixels(again))


def test_generate_at_strength_zero_is_the_base(pipe, loras):
    [[base]] = generate_images(pipe, [], ["a cup"], [4], **SIZE)
    [[zero]] = generate_images(pipe, [(loras[0][1], 0.0)], ["a cup"], [4], **SIZE)
    assert np.array_equal(pixels(base), pixels(zero))


def test_the_grid_zero_column_equals_a_plain_generation(pipe, loras):
    cells = render_cells(pipe, loras, [0.0, 1.0], "a red bottle", 9, **SIZE)
    [[base]] = generate_images(pipe, [], ["a red bottle"], [9], **SIZE)
    assert all(np.array_equal(pixels(row[0]), pixels(base)) for row in cells)
