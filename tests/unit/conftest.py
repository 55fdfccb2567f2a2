"""Fixtures shared by unit tests: a tiny FLUX.1 on disk and tiny captioned datasets."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
from PIL import Image, ImageDraw

from fluxlora.models.tiny_flux import write_tiny_flux


@pytest.fixture(scope="module")
def one_torch_thread():
    """torch on one thread for a module: a tiny model gains nothing from threads, and on a busy 2-core
    machine OpenMP's spinning threads made each forward pass 100x slower."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def tiny_flux_dir(tmp_path_factory) -> Path:
    """A diffusers-layout tiny FLUX.1 (no guidance embedding, like FLUX.1-schnell), seed 0."""
    return write_tiny_flux(tmp_path_factory.mktemp("tiny-flux"), seed=0)


def _shape_image(size: tuple[int, int], color: str, shape: str = "ellipse") -> Image.Image:
    image = Image.new("RGB", size, "white")
    w, h = size
    box = (w // 5, h // 5, w - w // 5, h - h // 5)
    getattr(ImageDraw.Draw(image), shape)(box, fill=color)
    return image


@pytest.fixture(scope="session")
def shape_image() -> Callable[..., Image.Image]:
    """shape_image((w, h), color, "ellipse" | "rectangle"): a flat coloured shape on white,
    simple enough to overfit in a few hundred steps."""
    return _shape_image


@pytest.fixture(scope="session")
def make_dataset(tmp_path_factory) -> Callable[..., Path]:
    """make_dataset({"stem": (image, caption), ...}) -> a directory of <stem>.png + <stem>.txt."""

    def make(items: dict[str, tuple[Image.Image, str]]) -> Path:
        directory = tmp_path_factory.mktemp("dataset")
        for stem, (image, caption) in items.items():
            image.save(directory / f"{stem}.png")
            (directory / f"{stem}.txt").write_text(caption)
        return directory

    return make


@pytest.fixture(scope="module")
def circle(make_dataset, shape_image) -> Path:
    """One 64 px red circle captioned CIRCLE_CAPTION (tests/training_support.py)."""
    from training_support import CIRCLE_CAPTION

    return make_dataset({"circle": (shape_image((64, 64), "red"), CIRCLE_CAPTION)})



@pytest.fixture
def two_shapes(make_dataset, shape_image) -> Path:
    """A 64 px red circle captioned "a red circle" and a blue square captioned "a blue square"."""
    return make_dataset({"red": (shape_image((64, 64), "red"), "a red circle"),
                         "blue": (shape_image((64, 64), "blue", "rectangle"), "a blue square")})
