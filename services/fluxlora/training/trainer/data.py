"""The training set: image/caption pairs, encoded once into latents and text embeddings.

FLUX's text encoders (T5-XXL alone is ~9.5 GB in bf16) and VAE are needed only to encode the
dataset (each family encodes text its own way: models.families), so everything is encoded before
the loop and the encoders are dropped: the transformer
then has the device to itself.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image, ImageOps

from fluxlora.models.families import family_of
from fluxlora.models.latents import image_to_pixels
from fluxlora.training.trainer.callbacks import TrainingStopped
from fluxlora.training.trainer.config import SIDE_MULTIPLE

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")
# Editing (Kontext) datasets: each target image's control (before) image has the same stem in this
# subfolder, the layout ai-toolkit (control_path) and musubi-tuner (control_directory) read.
CONTROL_DIR = "control"
_TEXT_BATCH = 8


@dataclass(frozen=True)
class Pair:
    image: Path
    caption: str
    control: Path | None = None  # the control (before) image of an editing pair


@dataclass(frozen=True)
class TextEmbedding:
    prompt_embeds: torch.Tensor  # (seq, dim)
    pooled: torch.Tensor  # (dim,); (0,) for families without a pooled vector (Chroma)
    mask: torch.Tensor | None = None  # (seq,) text attention mask, for families that use one


@dataclass(frozen=True)
class Sample:
    pair: Pair
    latents: torch.Tensor  # (C, h, w), float32, normalised (shift/scale applied)
    text: TextEmbedding
    control_latents: torch.Tensor | None = None  # (C, h, w) like latents, for editing pairs


@dataclass(frozen=True)
class CachedDataset:
    """All tensors live on the CPU; a batch moves to the device when it is used."""

    samples: list[Sample]
    empty_text: TextEmbedding  # what a dropped caption becomes
    text_ids: torch.Tensor  # (seq, 3), the same for every caption
    prompts: dict[str, TextEmbedding]  # sample prompts, encoded while the encoders were here


def find_pairs(dataset_dir: Path) -> list[Pair]:
    """Images in dataset_dir with their kohya-style same-stem .txt captions, sorted by name, and
    their control images in dataset_dir/control/ (same stem, any image suffix) where there is one.

    An image without a caption file trains with the empty caption (logged), as kohya does.
    """
    dataset_dir = Path(dataset_dir)
    if not dataset_dir.is_dir():
        raise FileNotFoundError(f"dataset directory {dataset_dir} does not exist")
    images = sorted(
        p for p in dataset_dir.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES
    )
    if not images:
        raise ValueError(
            f"no training images in {dataset_dir}: expected <stem>.png files "
            f"(or {', '.join(IMAGE_SUFFIXES[1:])}) with <stem>.txt captions"
        )
    pairs = []
    for image in images:
        caption_file = image.with_suffix(".txt")
        if caption_file.is_file():
            caption = caption_file.read_text(encoding="utf-8").strip()
        else:
            log.warning("%s has no caption file %s; training it uncaptioned", image, caption_file)
            caption = ""
        pairs.append(Pair(image, caption, _control_of(dataset_dir, image.stem)))
    return pairs


def _control_of(dataset_dir: Path, stem: str) -> Path | None:
    folder = dataset_dir / CONTROL_DIR
    for suffix in IMAGE_SUFFIXES:
        for candidate in (folder / f"{stem}{suffix}", folder / f"{stem}{suffix.upper()}"):
            if candidate.is_file():
                return candidate
    return None


def check_controls(pairs: Sequence[Pair], dataset_dir: Path) -> None:
    """ValueError naming the first target image without a control image (an editing family
    trains on before/after pairs only)."""
    missing = [p.image.name for p in pairs if p.control is None]
    if missing:
        raise ValueError(
            f"{len(missing)} image(s) in {dataset_dir} have no control image, e.g. {missing[0]}: an editing "
            f"(flux1-kontext) dataset needs {CONTROL_DIR}/<stem>.png beside each <stem>.png "
            "(preprocess the pairs with control images)"
        )


def load_control(path: Path, size: tuple[int, int]) -> Image.Image:
    """The control image at its target's training size (preprocessing crops both halves alike, so
    this is the same crop; a hand-made pair of another aspect is fitted, not distorted). One size
    for both halves, not the control's own: docs/architecture.md, "Editing pairs: one size"."""
    with Image.open(path) as opened:
        image = ImageOps.exif_transpose(opened).convert("RGB")
    return image if image.size == size else ImageOps.fit(image, size, Image.Resampling.LANCZOS)


def training_size(width: int, height: int, resolution: int) -> tuple[int, int]:
    """(width, height) to train at: the long side becomes `resolution`, the short side keeps the
    aspect ratio rounded to a multiple of 16."""
    long_side, short_side = max(width, height), min(width, height)
    short = max(
        SIDE_MULTIPLE, round(short_side * resolution / long_side / SIDE_MULTIPLE) * SIDE_MULTIPLE
    )
    return (resolution, short) if width >= height else (short, resolution)


def load_image(path: Path, resolution: int) -> Image.Image:
    """RGB image at its training size; an image already that size is left untouched."""
    with Image.open(path) as opened:
        image = ImageOps.exif_transpose(opened).convert("RGB")
    size = training_size(image.width, image.height, resolution)
    if image.size != size:
        # fit = crop the few pixels the 16-rounding removed, then resize: no distortion.
        image = ImageOps.fit(image, size, Image.Resampling.LANCZOS)
    return image


@torch.no_grad()
def encode_texts(
    pipe, texts: list[str], device: torch.device, max_sequence_length: int
) -> tuple[dict[str, TextEmbedding], torch.Tensor]:
    """Each distinct text encoded once with the pipeline's own encode_prompt; also text_ids."""
    family = family_of(pipe)
    unique = list(dict.fromkeys(texts))
    encoded: dict[str, TextEmbedding] = {}
    text_ids = None
    for start in range(0, len(unique), _TEXT_BATCH):
        chunk = unique[start : start + _TEXT_BATCH]
        batch = family.encode_prompts(pipe, chunk, device, max_sequence_length)
        text_ids = batch.text_ids
        for i, text in enumerate(chunk):
            mask = None if batch.mask is None else batch.mask[i].cpu()
            encoded[text] = TextEmbedding(batch.embeds[i].cpu(), batch.pooled[i].cpu(), mask)
    return encoded, text_ids.cpu()


def drop_text_encoders(pipe) -> None:
    """Release the text encoders; the pipeline still runs from prompt_embeds."""
    for name in family_of(pipe).text_components:
        if name.startswith("text_encoder"):
            setattr(pipe, name, None)


def cache_dataset(
    pipe,
    dataset_dir: Path,
    resolution: int,
    device: torch.device,
    *,
    max_sequence_length: int = 512,
    extra_prompts: Sequence[str] = (),
    should_stop: Callable[[], bool] = lambda: False,
) -> CachedDataset:
    """Encode every caption (plus "" and extra_prompts) and every image, then free the encoders.

    The pipeline may live on the CPU: each encoder visits `device` only while it works. On
    return the text encoders are gone and the VAE is on the CPU. should_stop() is asked after the
    captions and before each image: True raises TrainingStopped.
    """
    pairs = find_pairs(dataset_dir)
    family = family_of(pipe)
    if family.takes_control_image:
        check_controls(pairs, dataset_dir)

    for encoder in family_of(pipe).text_encoders(pipe):
        encoder.to(device)
    texts, text_ids = encode_texts(
        pipe, [p.caption for p in pairs] + [""] + list(extra_prompts), device, max_sequence_length
    )
    drop_text_encoders(pipe)
    _release_device_cache(device)

    pipe.vae.to(device)
    samples = []
    for pair in pairs:
        if should_stop():
            pipe.vae.to("cpu")
            raise TrainingStopped(f"stopped while encoding the dataset ({len(samples)} of {len(pairs)} images)")
        image = load_image(pair.image, resolution)
        latents = family.encode_latents(pipe.vae, image_to_pixels(pipe, image))[0].float().cpu()
        control = None
        if family.takes_control_image and pair.control is not None:
            control_pixels = image_to_pixels(pipe, load_control(pair.control, image.size))
            control = family.encode_latents(pipe.vae, control_pixels)[0].float().cpu()
        samples.append(Sample(pair, latents, texts[pair.caption], control))
    pipe.vae.to("cpu")
    _release_device_cache(device)

    log.info("cached %d images and %d texts", len(samples), len(texts))
    return CachedDataset(
        samples=samples,
        empty_text=texts[""],
        text_ids=text_ids,
        prompts={p: texts[p] for p in extra_prompts},
    )


def _release_device_cache(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()


class BucketBatcher:
    """Endless batches of sample indices, each batch from a single size bucket.

    The order of epoch e is a pure function of (seed, e), so the state needed to resume is just
    (epoch, position).
    """

    def __init__(self, shapes: list[tuple[int, ...]], batch_size: int, seed: int):
        self._buckets: dict[tuple[int, ...], list[int]] = {}
        for index, shape in enumerate(shapes):
            self._buckets.setdefault(tuple(shape), []).append(index)
        self._batch_size = batch_size
        self._seed = seed
        self.epoch = 0
        self.position = 0
        self._batches = self._epoch_batches(0)

    def _epoch_batches(self, epoch: int) -> list[list[int]]:
        generator = torch.Generator().manual_seed(self._seed * 100_003 + epoch)
        batches = []
        for shape in sorted(self._buckets):
            members = self._buckets[shape]
            order = torch.randperm(len(members), generator=generator).tolist()
            shuffled = [members[i] for i in order]
            batches += [
                shuffled[i : i + self._batch_size]
                for i in range(0, len(shuffled), self._batch_size)
            ]
        order = torch.randperm(len(batches), generator=generator).tolist()
        return [batches[i] for i in order]

    def next(self) -> list[int]:
        if self.position >= len(self._batches):
            self.epoch += 1
            self.position = 0
            self._batches = self._epoch_batches(self.epoch)
        batch = self._batches[self.position]
        self.position += 1
        return batch

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.epoch = state["epoch"]
        self.position = state["position"]
        self._batches = self._epoch_batches(self.epoch)
