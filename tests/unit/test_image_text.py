"""Image-text scores from a CLIP model in a local directory (a tiny random one, built offline)."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from fluxlora.evaluation.image_text import ImageTextModel, fidelity, flexibility
from fluxlora.evaluation.tiny_models import write_tiny_clip


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return ImageTextModel(write_tiny_clip(tmp_path_factory.mktemp("clip")), "cpu")


def images():
    return [Image.new("RGB", (64, 48), colour) for colour in ("red", "blue", "green")]


def test_embeddings_are_unit_length_and_deterministic(model):
    a = model.embed_images(images())
    b = model.embed_images(images())
    assert a.shape == (3, 16) and torch.equal(a, b)
    assert torch.allclose(a.norm(dim=-1), torch.ones(3))
    t = model.embed_texts(["a red bottle", "a cup on a table"])
    assert t.shape == (2, 16) and torch.allclose(t.norm(dim=-1), torch.ones(2))


def test_a_cell_identical_to_every_reference_has_fidelity_one(model):
    red = model.embed_images(images()[:1])
    assert fidelity(red, red.repeat(4, 1)) == pytest.approx([1.0])
    all_three = model.embed_images(images())
    scores = fidelity(all_three, red)
    assert scores[0] == pytest.approx(1.0) and max(scores[1:]) < 1.0


def test_flexibility_is_the_cosine_to_the_prompt(model):
    cells = model.embed_images(images())
    text = model.embed_texts(["a red bottle"])
    assert flexibility(cells, text) == pytest.approx((cells @ text[0]).tolist())
    assert all(-1.0 <= s <= 1.0 for s in flexibility(cells, text))


def test_a_directory_without_a_model_names_the_fix(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json.*CLIP-like"):
        ImageTextModel(tmp_path)
