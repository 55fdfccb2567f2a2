"""BLIP captions through transformers (BlipForConditionalGeneration + BlipProcessor).

Loads Salesforce/blip-image-captioning-base or -large (or the tiny model from
fluxlora.models.tiny_blip) from a local directory once, then captions images in batches. BLIP
writes one short plain caption; it has no task prompts.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from transformers import AutoProcessor, BlipForConditionalGeneration

from fluxlora.captioning.captioners.base import require_model_files
from fluxlora.captioning.captioners.devices import pick_device, pick_dtype
from fluxlora.captioning.captioners.images import to_rgb

# A caption job's default task means "a plain caption", which is what BLIP writes.
PLAIN_TASKS = ("", "<CAPTION>")

EXPECTED_FILES = {
    "config": ("config.json",),
    "weights": ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                "pytorch_model.bin.index.json"),
    "processor": ("processor_config.json", "preprocessor_config.json"),
    "tokenizer": ("tokenizer.json", "vocab.txt"),
}


class BlipCaptioner:
    name = "blip"

    def __init__(self, model_dir: Path | None, *, task: str = "", batch_size: int = 8, max_new_tokens: int = 40,
                 device: str = "auto", num_beams: int = 3, min_new_tokens: int = 3,
                 dtype: str | torch.dtype | None = None):
        if task not in PLAIN_TASKS:
            raise ValueError(f"the blip captioner writes plain captions and takes no task prompt such as {task!r}")
        if batch_size < 1 or max_new_tokens < 1 or num_beams < 1 or min_new_tokens < 0:
            raise ValueError(
                "batch_size, max_new_tokens and num_beams must be at least 1 and min_new_tokens at least 0; "
                f"got {batch_size}, {max_new_tokens}, {num_beams}, {min_new_tokens}"
            )
        self.model_dir = require_model_files(model_dir, self.name, EXPECTED_FILES)
        self.batch_size = batch_size
        self.max_new_tokens = max_new_tokens
        self.min_new_tokens = min(min_new_tokens, max_new_tokens)
        self.num_beams = num_beams
        self.device = pick_device(device)
        self.dtype = pick_dtype(self.device, dtype)
        try:
            self.processor = AutoProcessor.from_pretrained(self.model_dir, local_files_only=True)
            self.model = BlipForConditionalGeneration.from_pretrained(
                self.model_dir, dtype=self.dtype, local_files_only=True
            )
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise ValueError(f"could not load a BLIP captioning model from {str(self.model_dir)!r}: {exc}") from exc
        self.model.to(self.device).eval()

    @property
    def settings(self) -> dict[str, Any]:
        return {"kind": self.name, "model": self.model_dir.name, "num_beams": self.num_beams,
                "max_new_tokens": self.max_new_tokens, "device": str(self.device),
                "dtype": str(self.dtype).removeprefix("torch.")}

    def caption(self, images: Sequence[Image.Image]) -> list[str]:
        images = list(images)
        captions: list[str] = []
        for start in range(0, len(images), self.batch_size):
            captions.extend(self._caption_batch(images[start : start + self.batch_size]))
        return captions

    @torch.inference_mode()
    def _caption_batch(self, images: list[Image.Image]) -> list[str]:
        inputs = self.processor(images=[to_rgb(image) for image in images], return_tensors="pt").to(self.device)
        inputs["pixel_values"] = inputs["pixel_values"].to(self.dtype)
        generated = self.model.generate(**inputs, max_new_tokens=self.max_new_tokens,
                                        min_new_tokens=self.min_new_tokens, num_beams=self.num_beams,
                                        do_sample=False)
        texts = self.processor.batch_decode(generated, skip_special_tokens=True)
        return [" ".join(text.split()) for text in texts]
