"""BLIP captions through transformers (BlipForConditionalGeneration + BlipProcessor).

Loads Salesforce/blip-image-captioning-base or -large (or the tiny model from
fluxlora.models.tiny_blip) from a local directory once, then captions images in batches. BLIP
writes one short plain caption; it has no task prompts.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from PIL import Image
from transformers import BlipForConditionalGeneration

from fluxlora.captioning.captioners.generative import WEIGHT_FILES, GenerativeCaptioner
from fluxlora.captioning.captioners.images import to_rgb

# A caption job's default task means "a plain caption", which is what BLIP writes.
PLAIN_TASKS = ("", "<CAPTION>")

EXPECTED_FILES = {
    "config": ("config.json",),
    "weights": WEIGHT_FILES,
    "processor": ("processor_config.json", "preprocessor_config.json"),
    "tokenizer": ("tokenizer.json", "vocab.txt"),
}


class BlipCaptioner(GenerativeCaptioner):
    name = "blip"
    label = "BLIP captioning"
    model_class = BlipForConditionalGeneration
    expected_files = EXPECTED_FILES

    def __init__(self, model_dir: Path | None, *, task: str = "", batch_size: int = 8, max_new_tokens: int = 40,
                 device: str = "auto", num_beams: int = 3, min_new_tokens: int = 3,
                 dtype: str | torch.dtype | None = None):
        if task not in PLAIN_TASKS:
            raise ValueError(f"the blip captioner writes plain captions and takes no task prompt such as {task!r}")
        self._configure(model_dir, batch_size=batch_size, max_new_tokens=max_new_tokens, device=device,
                        num_beams=num_beams, min_new_tokens=min_new_tokens, dtype=dtype)
        self._load()

    @property
    def settings(self) -> dict[str, Any]:
        return self._base_settings()

    @torch.inference_mode()
    def _caption_batch(self, images: list[Image.Image]) -> list[str]:
        generated = self._generate(self.processor(images=[to_rgb(image) for image in images], return_tensors="pt"))
        texts = self.processor.batch_decode(generated, skip_special_tokens=True)
        return [" ".join(text.split()) for text in texts]
