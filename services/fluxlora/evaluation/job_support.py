"""What the grid and generate jobs share: settings, the device to render on."""

from __future__ import annotations

import torch

from fluxlora.common.config import Settings
from fluxlora.jobs.context import JobContext
from fluxlora.models.loading import pick_device_dtype

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")


def settings_of(ctx: JobContext) -> Settings:
    return ctx.settings or Settings()


def device_and_dtype(settings: Settings) -> tuple[torch.device, torch.dtype]:
    """FLUXLORA_DEVICE ("auto": CUDA when present), with its default precision (bf16 on CUDA)."""
    return pick_device_dtype("auto", None if settings.device == "auto" else settings.device)
