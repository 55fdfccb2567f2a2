"""The "blip" captioner on a tiny random BLIP: the real load and generate() path, offline."""

from __future__ import annotations

from pathlib import Path

import pytest
from PIL import Image

from fluxlora.captioning.captioners import known_captioners, load_captioner
from fluxlora.captioning.cleaning import count_trigger
from fluxlora.captioning.dataset import caption_images
from fluxlora.models.tiny_blip import tiny_blip_vocab, write_tiny_blip

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def tiny_blip(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_blip(tmp_path_factory.mktemp("blip") / "tiny")


_NOISE = Image.effect_noise((64, 64), 40).convert("RGB")  # random per call: made once


def images() -> list[Image.Image]:
    return [
        _NOISE.copy(),
        Image.new("RGB", (80, 120), (200, 30, 30)),
        Image.new("RGBA", (50, 50), (0, 120, 255, 90)),
        Image.linear_gradient("L"),
    ]


def test_blip_captions_images_in_batches_with_words_from_its_vocabulary(tiny_blip: Path) -> None:
    assert "blip" in known_captioners()
    captioner = load_captioner("blip", tiny_blip, batch_size=3, max_new_tokens=8, device="cpu")
    captions = captioner.caption(images())
    assert len(captions) == 4 and all(captions)
    vocab = set(tiny_blip_vocab())
    for caption in captions:
        assert set(caption.split()) <= vocab, caption
        assert "[" not in caption  # special tokens are not in the text
    # deterministic, and the same whether images come in a batch or one by one
    assert captioner.caption(images()) == captions
    single = load_captioner("blip", tiny_blip, batch_size=1, max_new_tokens=8, device="cpu")
    assert single.caption(images()) == captions
    assert captioner.settings["kind"] == "blip"


def test_blip_feeds_the_same_cleaning_as_florence(tiny_blip: Path, tmp_path: Path) -> None:
    paths = []
    for i, image in enumerate(images()):
        paths.append(tmp_path / f"img-{i}.png")
        image.save(paths[-1])
    captioner = load_captioner("blip", tiny_blip, max_new_tokens=8, device="cpu")
    captions = caption_images(paths, captioner, "ohwx")
    assert list(captions) == [p.stem for p in paths]
    assert all(count_trigger(c, "ohwx") == 1 and c.startswith("ohwx, ") for c in captions.values())


def test_blip_refuses_a_task_prompt_and_an_incomplete_directory(tiny_blip: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="takes no task prompt"):
        load_captioner("blip", tiny_blip, task="<DETAILED_CAPTION>")
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match="missing weights"):
        load_captioner("blip", tmp_path)
