"""Captioners on the tiny random Florence-2: the real load and generate() path, offline."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from PIL import Image
from transformers import AutoProcessor, Florence2ForConditionalGeneration

from fluxlora.captioning.captioners import (
    Captioner,
    known_captioners,
    load_captioner,
    register_captioner,
)
from fluxlora.captioning.captioners import base as captioners_base
from fluxlora.captioning.captioners.devices import pick_device, pick_dtype
from fluxlora.captioning.cleaning import count_trigger
from fluxlora.captioning.dataset import (
    caption_images,
    read_sidecars,
    write_sidecars,
)
from fluxlora.models.tiny_captioner import IMAGE_SEQ_LENGTH, write_tiny_florence2

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_florence2(tmp_path_factory.mktemp("florence2") / "tiny")


@pytest.fixture(scope="module")
def captioner(tiny_dir: Path) -> Captioner:
    return load_captioner("florence2", tiny_dir, batch_size=3, max_new_tokens=12, device="cpu")


def make_images() -> list[Image.Image]:
    """Different sizes, modes and content, as a photo folder would have."""
    gradient = Image.linear_gradient("L").resize((96, 64))
    return [
        Image.effect_noise((64, 64), 40).convert("RGB"),
        Image.new("RGB", (80, 120), (200, 30, 30)),
        Image.merge(
            "RGB", [gradient, gradient.transpose(Image.Transpose.FLIP_LEFT_RIGHT), gradient]
        ),
        Image.new("RGBA", (50, 50), (0, 120, 255, 90)),
        gradient,
    ]


def test_tiny_model_loads_with_transformers_own_classes(tiny_dir: Path) -> None:
    model = Florence2ForConditionalGeneration.from_pretrained(tiny_dir, local_files_only=True)
    processor = AutoProcessor.from_pretrained(tiny_dir, local_files_only=True)
    assert type(processor).__name__ == "Florence2Processor"
    assert model.config.image_token_id == processor.tokenizer.image_token_id
    assert sum(p.numel() for p in model.parameters()) < 200_000
    inputs = processor(text=["<CAPTION>"], images=[make_images()[0]], return_tensors="pt")
    ids = inputs["input_ids"][0].tolist()
    assert ids.count(processor.tokenizer.image_token_id) == IMAGE_SEQ_LENGTH
    # The task prompt ("What does the image describe?") is spelled in known words, not <unk>.
    assert processor.tokenizer.unk_token_id not in ids


def test_tiny_model_is_deterministic_for_a_seed(tmp_path: Path, tiny_dir: Path) -> None:
    again = write_tiny_florence2(tmp_path / "again", seed=0)
    other = write_tiny_florence2(tmp_path / "other", seed=1)
    weights = "model.safetensors"
    assert (again / weights).read_bytes() == (tiny_dir / weights).read_bytes()
    assert (other / weights).read_bytes() != (tiny_dir / weights).read_bytes()
    assert (again / "tokenizer.json").read_bytes() == (tiny_dir / "tokenizer.json").read_bytes()


def test_captions_one_non_empty_string_per_image(captioner: Captioner) -> None:
    images = make_images()
    captions = captioner.caption(images)
    assert len(captions) == len(images)
    for caption in captions:
        assert isinstance(caption, str) and caption.strip()
        assert "<" not in caption and ">" not in caption, "special tokens must be stripped"
    assert captioner.caption([]) == []


def test_a_batch_captions_like_single_images(captioner: Captioner) -> None:
    images = make_images()[:3]
    assert captioner.caption(images) == [captioner.caption([image])[0] for image in images]


@pytest.mark.parametrize("task", ["<DETAILED_CAPTION>", "<MORE_DETAILED_CAPTION>"])
def test_detailed_tasks_caption(tiny_dir: Path, task: str) -> None:
    captioner = load_captioner("florence2", tiny_dir, task=task, max_new_tokens=8, num_beams=1)
    assert all(c.strip() for c in captioner.caption(make_images()[:2]))


def test_settings_are_chosen_for_the_cpu(captioner: Captioner) -> None:
    assert captioner.name == "florence2"
    assert captioner.settings["device"] == "cpu"
    assert captioner.settings["dtype"] == "float32"
    assert captioner.settings["num_beams"] == 3


def test_a_task_other_than_captioning_is_rejected(tiny_dir: Path) -> None:
    with pytest.raises(
        ValueError, match=r"'<OD>'.*<CAPTION>, <DETAILED_CAPTION>, <MORE_DETAILED_CAPTION>"
    ):
        load_captioner("florence2", tiny_dir, task="<OD>")


def test_unknown_kind_lists_the_known_ones(tiny_dir: Path) -> None:
    with pytest.raises(
        ValueError, match="unknown captioner kind 'blip9'; known kinds: .*florence2"
    ):
        load_captioner("blip9", tiny_dir)
    assert "florence2" in known_captioners()


def test_missing_model_dir_names_the_path(tmp_path: Path) -> None:
    missing = tmp_path / "no-such-model"
    with pytest.raises(FileNotFoundError, match=f"{missing}.*does not exist.*config.json"):
        load_captioner("florence2", missing)
    with pytest.raises(ValueError, match="needs a local model directory"):
        load_captioner("florence2", None)


def test_incomplete_model_dir_says_what_is_missing(tmp_path: Path, tiny_dir: Path) -> None:
    (tmp_path / "config.json").write_text((tiny_dir / "config.json").read_text())
    with pytest.raises(
        FileNotFoundError, match=rf"{tmp_path}.*incomplete.*model\.safetensors.*holds: config\.json"
    ):
        load_captioner("florence2", tmp_path)


def test_original_remote_code_checkpoint_is_explained(tmp_path: Path, tiny_dir: Path) -> None:
    for name in ("model.safetensors", "processor_config.json", "tokenizer.json"):
        (tmp_path / name).write_bytes((tiny_dir / name).read_bytes())
    config = json.loads((tiny_dir / "config.json").read_text())
    config["auto_map"] = {
        "AutoModelForCausalLM": "modeling_florence2.Florence2ForConditionalGeneration"
    }
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="not a transformers-native Florence-2.*convert"):
        load_captioner("florence2", tmp_path)


def test_devices() -> None:
    assert pick_device("cpu") == torch.device("cpu")
    assert pick_dtype(torch.device("cpu")) == torch.float32
    assert pick_dtype(torch.device("cuda")) == torch.float16
    assert pick_dtype(torch.device("cuda"), "bf16") == torch.bfloat16
    with pytest.raises(ValueError, match="unknown device"):
        pick_device("abacus")
    if not torch.cuda.is_available():
        assert pick_device("auto") == torch.device("cpu")
        with pytest.raises(ValueError, match="no usable CUDA GPU"):
            pick_device("cuda")


class EchoCaptioner:
    """Returns fixed captions, to test the dataset layer without a model."""

    name = "echo"

    def __init__(
        self,
        model_dir: Path | None,
        *,
        text: str = "ohwx, a woman in a park with OHWX",
        **_: object,
    ):
        self.text = text
        self.calls: list[int] = []

    def caption(self, images: list[Image.Image]) -> list[str]:
        self.calls.append(len(images))
        return [self.text] * len(images)


def test_other_captioners_plug_in_by_kind(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(captioners_base, "_registered", {})  # leaves no "echo" kind behind
    register_captioner("echo", EchoCaptioner)
    captioner = load_captioner("echo", None, text="hello")
    assert isinstance(captioner, Captioner)
    assert captioner.caption([Image.new("RGB", (4, 4))]) == ["hello"]
    assert "echo" in known_captioners()


def write_images(folder: Path, count: int) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for index, image in enumerate((make_images() * 2)[:count]):
        path = folder / f"img_{index:02d}.png"
        image.save(path)
        paths.append(path)
    return paths


def test_caption_images_and_sidecars_round_trip(tmp_path: Path, captioner: Captioner) -> None:
    paths = write_images(tmp_path / "images", 5)
    seen: list[tuple[int, int]] = []
    captions = caption_images(
        paths,
        captioner,
        " ohwx ",
        remove_phrases=["box"],
        batch_size=2,
        progress=lambda d, t: seen.append((d, t)),
    )
    assert list(captions) == [p.stem for p in paths]
    assert seen == [(0, 5), (2, 5), (4, 5), (5, 5)]
    for caption in captions.values():
        assert caption.startswith("ohwx, ") or caption == "ohwx"
        assert count_trigger(caption, "ohwx") == 1

    out = tmp_path / "captions"
    written = write_sidecars(captions, out)
    assert sorted(p.name for p in written) == [f"{p.stem}.txt" for p in paths]
    for path in written:
        raw = path.read_bytes().decode("utf-8")
        assert raw.endswith("\n") and raw.count("\n") == 1
    assert read_sidecars(out) == captions


def test_a_caption_holding_the_trigger_twice_keeps_it_once(tmp_path: Path) -> None:
    paths = write_images(tmp_path, 3)
    echo = EchoCaptioner(None)
    captions = caption_images(paths, echo, "ohwx", remove_phrases=["woman"], batch_size=2)
    assert set(captions.values()) == {"ohwx, in a park with"}
    assert echo.calls == [2, 1]


def test_sidecars_are_one_line_utf8(tmp_path: Path) -> None:
    write_sidecars({"café": "ohwx, a café\nat night "}, tmp_path)
    assert (tmp_path / "café.txt").read_bytes() == "ohwx, a café at night\n".encode()
    with pytest.raises(ValueError, match="not a file stem"):
        write_sidecars({"../escape": "x"}, tmp_path)


def test_should_stop_ends_between_batches_with_the_captions_so_far(tmp_path: Path) -> None:
    paths = write_images(tmp_path, 5)
    checks = iter([False, True])
    echo = EchoCaptioner(None)
    captions = caption_images(paths, echo, "ohwx", batch_size=2, should_stop=lambda: next(checks))
    assert list(captions) == ["img_00", "img_01"]
    assert echo.calls == [2]


def test_bad_inputs_fail_before_captioning(tmp_path: Path) -> None:
    echo = EchoCaptioner(None)
    (tmp_path / "a.png").write_bytes(b"")
    with pytest.raises(ValueError, match="share the stem 'a'"):
        caption_images([tmp_path / "a.png", tmp_path / "sub" / "a.jpg"], echo, "ohwx")
    with pytest.raises(ValueError, match="trigger word is empty"):
        caption_images([tmp_path / "a.png"], echo, "  ")
    assert echo.calls == []
    with pytest.raises(ValueError, match="a.png.*cannot be read"):
        caption_images([tmp_path / "a.png"], echo, "ohwx")
