"""Florence-2 captions through transformers' native Florence-2 classes.

Loads a transformers-native Florence-2 directory (florence-community/Florence-2-base/-large, or
microsoft/Florence-2-* converted with transformers' convert_florence2_original_pytorch_to_hf.py,
or the tiny model from fluxlora.models.tiny_captioner) once, then captions images in batches.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from transformers import Florence2ForConditionalGeneration

from fluxlora.captioning.captioners.generative import WEIGHT_FILES, GenerativeCaptioner
from fluxlora.captioning.captioners.images import to_rgb

CAPTION_TASKS = ("<CAPTION>", "<DETAILED_CAPTION>", "<MORE_DETAILED_CAPTION>")

EXPECTED_FILES = {
    "config": ("config.json",),
    "weights": WEIGHT_FILES,
    "processor": ("processor_config.json", "preprocessor_config.json"),
    "tokenizer": ("tokenizer.json", "vocab.json"),
}


class Florence2Captioner(GenerativeCaptioner):
    name = "florence2"
    label = "Florence-2"
    model_class = Florence2ForConditionalGeneration
    expected_files = EXPECTED_FILES

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
        if task not in CAPTION_TASKS:
            raise ValueError(
                f"unsupported Florence-2 caption task {task!r}; use one of {', '.join(CAPTION_TASKS)}"
            )
        self._configure(model_dir, batch_size=batch_size, max_new_tokens=max_new_tokens, device=device,
                        num_beams=num_beams, min_new_tokens=min_new_tokens, dtype=dtype)
        _reject_remote_code_checkpoint(self.model_dir)
        self.task = task
        self._load()
        self._special_tokens = sorted(self.processor.tokenizer.all_special_tokens, key=len, reverse=True)

    @property
    def settings(self) -> dict[str, Any]:
        """What produced the captions, for recording next to them."""
        return {**self._base_settings(), "task": self.task}

    @torch.inference_mode()
    def _caption_batch(self, images: list[Image.Image]) -> list[str]:
        rgb = [to_rgb(image) for image in images]
        generated = self._generate(self.processor(text=[self.task] * len(rgb), images=rgb, return_tensors="pt"))
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
