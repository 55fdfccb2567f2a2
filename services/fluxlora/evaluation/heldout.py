"""The convergence probe: flow-matching loss of a checkpoint on fixed images, noise levels and noise.

A LoRA dataset is small (often 10-30 photos) and every photo is trained on, so there are no truly
held-out images; the probe uses the run's own images (at most MAX_IMAGES, evenly spread over the
sorted names, see scoring.probe_subset) with their captions. Four images at three sigmas are 12
transformer passes per checkpoint, about 12% of a 6-strength row at 20 steps: a fixed probe needs
few images to give a smooth curve, and the grid's time stays within 1.1x its images' (bench/grid.py).

Unlike the training loss, which draws a new noise level and new noise every step and so jumps
around, the probe fixes both: the noise levels SIGMAS and, per image, one noise tensor from a fixed
seed. Every checkpoint (and the
base model) is measured on exactly the same inputs, so the curve over checkpoints is smooth and its
flattening marks convergence. Sigmas 0.25/0.5/0.75 span the range where a subject's shape and
identity are decided; the extremes measure only fine texture (low) or mostly noise (high).

Editing families (FLUX.1 Kontext) learn the edit from each pair's control (before) image: the
probe gives the transformer the control's tokens after the target's, as training does, at the
target's size (preprocessing crops both halves alike), and scores the target's tokens only.
Without them the probe would measure text-to-image generation of the after images, which is not
what the LoRA learns.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from PIL import Image

from fluxlora.models.families import PromptEncoding, family_of
from fluxlora.models.latents import image_to_pixels

SIGMAS = (0.25, 0.5, 0.75)
MAX_IMAGES = 4
NOISE_SEED = 0  # the same noise for every job on a run, so losses compare across jobs
SIDE_MULTIPLE = 16  # VAE factor 8 x 2x2 packing for FLUX.1


@dataclass(frozen=True)
class ProbeItem:
    latents: torch.Tensor  # (1, C, h, w), normalised
    noise: torch.Tensor  # same shape
    text: PromptEncoding  # the caption, a batch of one, as the pipeline's family encodes it
    control: torch.Tensor | None = None  # (1, C, h, w): the control image's latents (editing families)


@dataclass(frozen=True)
class Probe:
    items: list[ProbeItem]
    sigmas: tuple[float, ...]
    guidance: float | None  # for guidance-distilled transformers, else None


def probe_size(width: int, height: int, resolution: int, multiple: int = SIDE_MULTIPLE) -> tuple[int, int]:
    """The image's aspect at about resolution x resolution pixels, sides multiples of `multiple`."""
    scale = resolution / math.sqrt(width * height)
    return (max(multiple, round(width * scale / multiple) * multiple),
            max(multiple, round(height * scale / multiple) * multiple))


@torch.no_grad()
def prepare_probe(
    pipe,
    images: list[tuple[Image.Image, str]],
    resolution: int,
    *,
    guidance: float = 3.5,
    max_sequence_length: int = 512,
    sigmas: tuple[float, ...] = SIGMAS,
    controls: Sequence[Image.Image | None] = (),
) -> Probe:
    """Encodes (image, caption) pairs once; call on the plain base pipeline. controls: each
    image's control (before) image, for families that edit one (others ignore them)."""
    if not images:
        raise ValueError("the convergence probe needs at least one image")
    device, family = pipe._execution_device, family_of(pipe)
    items = []
    for i, (image, caption) in enumerate(images):
        size = probe_size(image.width, image.height, resolution)
        latents = _encode(pipe, image, size)
        noise = torch.randn(latents.shape, generator=torch.Generator("cpu").manual_seed(NOISE_SEED + i))
        text = family.encode_prompts(pipe, [caption], device, max_sequence_length)
        control = controls[i] if i < len(controls) and family.takes_control_image else None
        items.append(ProbeItem(latents, noise, text, None if control is None else _encode(pipe, control, size)))
    use_guidance = family.uses_guidance_embedding(pipe.transformer)
    return Probe(items, tuple(sigmas), guidance if use_guidance else None)


def _encode(pipe, image: Image.Image, size: tuple[int, int]) -> torch.Tensor:
    """(1, C, h, w) normalised latents of `image` resized to `size` (width, height), on the CPU."""
    resized = image.convert("RGB").resize(size, Image.Resampling.LANCZOS)
    return family_of(pipe).encode_latents(pipe.vae, image_to_pixels(pipe, resized)).float().cpu()


@torch.no_grad()
def probe_loss(pipe, probe: Probe) -> float:
    """Mean flow-matching MSE over the probe's images and sigmas, with whatever adapters are active.

    Same objective as training: noisy = (1 - s) x0 + s noise, the transformer predicts the
    velocity noise - x0 on packed latent tokens, timestep = s.
    """
    transformer, family = pipe.transformer, family_of(pipe)
    # The execution device, not the weights' one: under model CPU offload they wait on the CPU.
    device, dtype = pipe._execution_device, next(transformer.parameters()).dtype
    sigmas = torch.tensor(probe.sigmas, dtype=torch.float32)
    n = len(sigmas)
    total = 0.0
    for item in probe.items:
        _, _, height, width = item.latents.shape
        s = sigmas.view(n, 1, 1, 1)
        latents = item.latents.expand(n, -1, -1, -1)
        noise = item.noise.expand(n, -1, -1, -1)
        noisy = (1 - s) * latents + s * noise
        t = item.text
        text = PromptEncoding(t.embeds.expand(n, -1, -1).to(device, dtype), t.pooled.expand(n, -1).to(device, dtype),
                              None if t.mask is None else t.mask.expand(n, -1).to(device, dtype),
                              t.text_ids.to(device, dtype))
        tokens = family.pack(noisy).to(device, dtype)
        control = None if item.control is None else item.control.expand(n, -1, -1, -1).to(device, dtype)
        hidden_states, img_ids = family.with_control(tokens, family.image_ids(height, width, device, dtype), control)
        prediction = transformer(**family.transformer_kwargs(
            transformer, hidden_states=hidden_states, sigmas=sigmas.to(device), text=text, img_ids=img_ids,
            guidance=probe.guidance if probe.guidance is not None else 0.0,
        ))[0][:, : tokens.shape[1]]  # the target's tokens; a control's follow them
        target = family.pack(noise - latents).to(device)
        total += torch.nn.functional.mse_loss(prediction.float(), target).item()
    return total / len(probe.items)
