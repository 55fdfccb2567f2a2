"""Florence-2 captions through transformers' native Florence-2 classes.

Loads a transformers-native Florence-2 directory (florence-community/Florence-2-base/-large, or
microsoft/Florence-2-* converted with transformers' convert_florence2_original_pytorch_to_hf.py,
or the tiny model from fluxlora.models.tiny_captioner) once, then captions images in batches.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from transformers import AutoProcessor, Florence2ForConditionalGeneration

from fluxlora.captioning.captioners.base import require_model_files
from fluxlora.captioning.captioners.devices import pick_device, pick_dtype
from fluxlora.captioning.captioners.images import to_rgb

CAPTION_TASKS = ("<CAPTION>", "<DETAILED_CAPTION>", "<MORE_DETAILED_CAPTION>")

EXPECTED_FILES = {
    "config": ("config.json",),
    "weights": (
        "model.safetensors",
        "model.safetensors.index.json",
        "pytorch_model.bin",
        "pytorch_model.bin.index.json",
    ),
    "processor": ("processor_config.json", "preprocessor_config.json"),
    "tokenizer": ("tokenizer.json", "vocab.json"),
}


class Florence2Captioner:
    name = "florence2"

    def __init__(
        self,
        model_dir: Path | None,
        *,
        task: str = "<CAPTION>",
        batch_size: int = 8,
        max_new_tokens: int = 64,
        device: str = "auto",
        num_beams: int = 3,
        min_new_tokens: int = 3,
        dtype: str | torch.dtype | None = None,
    ):
        # Checked before any loading so a bad request fails in milliseconds, not after minutes.
        if task not in CAPTION_TASKS:
            raise ValueError(
                f"unsupported Florence-2 caption task {task!r}; use one of {', '.join(CAPTION_TASKS)}"
            )
        if batch_size < 1 or max_new_tokens < 1 or num_beams < 1 or min_new_tokens < 0:
            raise ValueError(
                "batch_size, max_new_tokens and num_beams must be at least 1 and min_new_tokens at least 0; "
                f"got {batch_size}, {max_new_tokens}, {num_beams}, {min_new_tokens}"
            )
        self.model_dir = require_model_files(model_dir, self.name, EXPECTED_FILES)
        _reject_remote_code_checkpoint(self.model_dir)
        self.task = task
        self.batch_size = batch_size
        self.max_new_tokens = max_new_tokens
        # A random (test) model may emit end-of-sequence at once; a few forced tokens keep
        # captions non-empty and never shorten a real caption.
        self.min_new_tokens = min(min_new_tokens, max_new_tokens)
        self.num_beams = num_beams
        self.device = pick_device(device)
        self.dtype = pick_dtype(self.device, dtype)
        try:
            self.processor = AutoProcessor.from_pretrained(self.model_dir, local_files_only=True)
            self.model = Florence2ForConditionalGeneration.from_pretrained(
                self.model_dir, dtype=self.dtype, local_files_only=True
            )
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise ValueError(
                f"could not load a Florence-2 model from {str(self.model_dir)!r}: {exc}"
            ) from exc
        self.model.to(self.device).eval()
        self._special_tokens = sorted(
            self.processor.tokenizer.all_special_tokens, key=len, reverse=True
        )

    @property
    def settings(self) -> dict[str, Any]:
        """What produced the captions, for recording next to them."""
        return {
            "kind": self.name,
            "model": self.model_dir.name,
            "task": self.task,
            "num_beams": self.num_beams,
            "max_new_tokens": self.max_new_tokens,
            "min_new_tokens": self.min_new_tokens,
            "device": str(self.device),
            "dtype": str(self.dtype).removeprefix("torch."),
        }

    def caption(self, images: Sequence[Image.Image]) -> list[str]:
        images = list(images)
        captions: list[str] = []
        for start in range(0, len(images), self.batch_size):
            captions.extend(self._caption_batch(images[start : start + self.batch_size]))
        return captions

    @torch.inference_mode()
    def _caption_batch(self, images: list[Image.Image]) -> list[str]:
        rgb = [to_rgb(image) for image in images]
        inputs = self.processor(text=[self.task] * len(rgb), images=rgb, return_tensors="pt")
        inputs = inputs.to(self.device)
        inputs["pixel_values"] = inputs["pixel_values"].to(self.dtype)
        generated = self.model.generate(
            **inputs,
            max_new_tokens=self.max_new_tokens,
            min_new_tokens=self.min_new_tokens,
            num_beams=self.num_beams,
            do_sample=False,
        )
        # Decoded with special tokens kept, as post_process_generation expects.
        texts = self.processor.batch_decode(generated, skip_special_tokens=False)
        return [self._finish(text, image.size) for text, image in zip(texts, rgb, strict=True)]

    def _finish(self, text: str, image_size: tuple[int, int]) -> str:
        answer: Any = text
        if hasattr(self.processor, "post_process_generation"):
            answer = self.processor.post_process_generation(
                text, task=self.task, image_size=image_size
            )[self.task]
        # post-processing drops <s> and </s> only; beam batches also pad with <pad>.
        for token in self._special_tokens:
            answer = answer.replace(token, " ")
        return " ".join(answer.split())


def _reject_remote_code_checkpoint(model_dir: Path) -> None:
    """The original microsoft/Florence-2-* repos need trust_remote_code and their own classes;
    transformers' native classes cannot load them, so say how to get a loadable copy."""
    try:
        config = json.loads((model_dir / "config.json").read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise ValueError(
            f"florence2 model directory {str(model_dir)!r}: config.json is unreadable: {exc}"
        ) from exc
    vision = config.get("vision_config") or {}
    if config.get("model_type") != "florence2" or "auto_map" in config or "dim_embed" in vision:
        raise ValueError(
            f"florence2 model directory {str(model_dir)!r} is not a transformers-native Florence-2 checkpoint "
            f"(model_type={config.get('model_type')!r}). Use florence-community/Florence-2-base or -large, or convert "
            "microsoft/Florence-2-* with transformers' convert_florence2_original_pytorch_to_hf.py"
        )
