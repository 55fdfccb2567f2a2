"""What the grid and generate jobs share: settings, the device to render on."""

from __future__ import annotations

from dataclasses import dataclass

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


# FLUX.1-dev's pipeline in bf16 (~34 GB) plus a 1024 px generation's activations fit from here up.
LARGE_GPU_GIB = 40.0


@dataclass(frozen=True)
class InferenceLoading:
    quantization: str  # "none", "fp8" or "int8": the transformer blocks' linear weights
    cpu_offload: bool  # diffusers' model CPU offload: each model on the GPU only while it runs


def inference_loading(settings: Settings, device: torch.device, gpu_gib: float | None = None) -> InferenceLoading:
    """How to load the base pipeline for rendering on `device`: FLUXLORA_INFERENCE_QUANTIZATION and
    FLUXLORA_INFERENCE_CPU_OFFLOAD, whose "auto" means fp8 + offload on a GPU under LARGE_GPU_GIB
    (an RTX 4090) and the plain pipeline on larger GPUs and on the CPU."""
    if device.type != "cuda":
        small = False
    else:
        if gpu_gib is None:
            gpu_gib = torch.cuda.get_device_properties(device).total_memory / 2**30
        small = gpu_gib < LARGE_GPU_GIB
    quantization = settings.inference_quantization
    if quantization == "auto":
        quantization = "fp8" if small else "none"
    offload = small if settings.inference_cpu_offload == "auto" else settings.inference_cpu_offload == "on"
    return InferenceLoading(quantization, offload and device.type != "cpu")


def control_image(ctx: JobContext, key: str):
    """The editing control image stored at `key` (validated at submit) as RGB; None for ""."""
    if not key:
        return None
    from PIL import Image

    path = ctx.store.get_file(key, ctx.scratch / "control" / key.rsplit("/", 1)[-1])
    with Image.open(path) as opened:
        return opened.convert("RGB")
