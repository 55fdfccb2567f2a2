"""What the transformers image-to-text captioners (Florence-2, BLIP) share: argument checks made
before any loading, the model and processor loaded once from a local directory, batched generate()."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from transformers import AutoProcessor

from fluxlora.captioning.captioners.base import require_model_files
from fluxlora.captioning.captioners.devices import pick_device, pick_dtype

WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                "pytorch_model.bin.index.json")


class GenerativeCaptioner:
    name = ""
    label = ""  # for messages: "Florence-2", "BLIP"
    model_class: Any = None
    expected_files: dict[str, tuple[str, ...]] = {}

    def _configure(self, model_dir: Path | None, *, batch_size: int, max_new_tokens: int, device: str,
                   num_beams: int, min_new_tokens: int, dtype: str | torch.dtype | None) -> None:
        """Checks the generation settings (a bad request fails in milliseconds, not after minutes
        of loading) and the model directory's files."""
        if batch_size < 1 or max_new_tokens < 1 or num_beams < 1 or min_new_tokens < 0:
            raise ValueError(
                "batch_size, max_new_tokens and num_beams must be at least 1 and min_new_tokens at least 0; "
                f"got {batch_size}, {max_new_tokens}, {num_beams}, {min_new_tokens}"
            )
        self.model_dir = require_model_files(model_dir, self.name, self.expected_files)
        self.batch_size = batch_size
        self.max_new_tokens = max_new_tokens
        # A random (test) model may emit end-of-sequence at once; a few forced tokens keep
        # captions non-empty and never shorten a real caption.
        self.min_new_tokens = min(min_new_tokens, max_new_tokens)
        self.num_beams = num_beams
        self.device = pick_device(device)
        self.dtype = pick_dtype(self.device, dtype)

    def _load(self) -> None:
        try:
            self.processor = AutoProcessor.from_pretrained(self.model_dir, local_files_only=True)
            self.model = self.model_class.from_pretrained(self.model_dir, dtype=self.dtype, local_files_only=True)
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise ValueError(f"could not load a {self.label} model from {str(self.model_dir)!r}: {exc}") from exc
        self.model.to(self.device).eval()

    def _base_settings(self) -> dict[str, Any]:
        return {"kind": self.name, "model": self.model_dir.name, "num_beams": self.num_beams,
                "max_new_tokens": self.max_new_tokens, "min_new_tokens": self.min_new_tokens,
                "device": str(self.device), "dtype": str(self.dtype).removeprefix("torch.")}

    def caption(self, images: Sequence[Image.Image]) -> list[str]:
        images = list(images)
        captions: list[str] = []
        for start in range(0, len(images), self.batch_size):
            captions.extend(self._caption_batch(images[start : start + self.batch_size]))
        return captions

    def _caption_batch(self, images: list[Image.Image]) -> list[str]:
        raise NotImplementedError

    def _generate(self, inputs: Any) -> torch.Tensor:
        inputs = inputs.to(self.device)
        inputs["pixel_values"] = inputs["pixel_values"].to(self.dtype)
        return self.model.generate(**inputs, max_new_tokens=self.max_new_tokens, min_new_tokens=self.min_new_tokens,
                                   num_beams=self.num_beams, do_sample=False)
