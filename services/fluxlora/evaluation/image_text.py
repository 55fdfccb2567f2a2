"""Image-text embeddings (CLIP or a model with the same interface, e.g. SigLIP) from a local
directory, and the two grid scores built on them: fidelity and flexibility (see scoring.py)."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import torch
from PIL import Image

from fluxlora.evaluation.pipelines import ModelCache

log = logging.getLogger(__name__)

BATCH = 16


class ImageTextModel:
    """AutoModel + tokenizer + image processor of one local transformers directory."""

    def __init__(self, model_dir: Path, device: torch.device | str = "cpu"):
        from transformers import AutoImageProcessor, AutoModel, AutoTokenizer

        model_dir = Path(model_dir)
        if not (model_dir / "config.json").is_file():
            raise FileNotFoundError(
                f"image-text model {model_dir} has no config.json: pass a local CLIP-like model directory "
                "(transformers layout) or 'none'"
            )
        self.device = torch.device(device)
        self.model = AutoModel.from_pretrained(model_dir, local_files_only=True).eval().to(self.device)
        self.model.requires_grad_(False)
        if not hasattr(self.model, "get_image_features") or not hasattr(self.model, "get_text_features"):
            raise ValueError(
                f"image-text model {model_dir} ({type(self.model).__name__}) has no image and text "
                "embeddings: use a CLIP or SigLIP model"
            )
        self.tokenizer = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
        self.processor = AutoImageProcessor.from_pretrained(model_dir, local_files_only=True)

    @torch.no_grad()
    def embed_images(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """(N, D) unit-length image embeddings."""
        out = []
        for start in range(0, len(images), BATCH):
            batch = [image.convert("RGB") for image in images[start:start + BATCH]]
            pixels = self.processor(images=batch, return_tensors="pt")["pixel_values"].to(self.device)
            out.append(_features(self.model.get_image_features(pixel_values=pixels)))
        return _unit(torch.cat(out))

    @torch.no_grad()
    def embed_texts(self, texts: Sequence[str]) -> torch.Tensor:
        """(N, D) unit-length text embeddings."""
        max_length = min(getattr(self.tokenizer, "model_max_length", 77), 77)
        tokens = self.tokenizer(list(texts), padding="max_length", truncation=True, max_length=max_length,
                                return_tensors="pt")
        tokens = {k: v.to(self.device) for k, v in tokens.items() if k in ("input_ids", "attention_mask")}
        return _unit(_features(self.model.get_text_features(**tokens)))


def _features(output) -> torch.Tensor:
    # transformers 5 returns a model output whose pooler_output holds the projected embedding.
    tensor = output if isinstance(output, torch.Tensor) else output.pooler_output
    return tensor.float().cpu()


def _unit(x: torch.Tensor) -> torch.Tensor:
    return x / x.norm(dim=-1, keepdim=True).clamp_min(1e-12)


def fidelity(cells: torch.Tensor, references: torch.Tensor) -> list[float]:
    """Per cell: mean cosine similarity to the reference (training) image embeddings."""
    return (cells @ references.T).mean(dim=1).tolist()


def flexibility(cells: torch.Tensor, text: torch.Tensor) -> list[float]:
    """Per cell: cosine similarity to one text embedding (1, D)."""
    return (cells @ text.reshape(-1, 1)).squeeze(1).tolist()


IMAGE_TEXT_MODELS = ModelCache(ImageTextModel)
