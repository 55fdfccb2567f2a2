"""Rendering the cells of a checkpoint x strength grid, and a latent-space check that a LoRA
learned its training image.

Every cell uses the same prompt embeddings and the same seed, so cells differ only by which LoRA
is active and how strongly.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from fluxlora.models.families import PromptEncoding, family_of
from fluxlora.models.latents import image_to_pixels
from fluxlora.models.loading import load_flux_pipeline, pick_device_dtype

OUTPUT_TYPES = ("pil", "latent")
# FLUX.1-dev's usual distilled guidance (FLUX.1 models without the embedding ignore it); Chroma's
# classifier-free guidance scale.
DEFAULT_GUIDANCE = 3.5
Progress = Callable[[int, int], None]


@dataclass(frozen=True)
class Panel:
    """One grid of the third axis: every cell of it uses this prompt and seed."""

    prompt: str
    seed: int


def render_cells(
    pipe,
    loras: list[tuple[str, Path]],
    strengths: list[float],
    prompt: str,
    seed: int,
    width: int,
    height: int,
    steps: int,
    guidance: float | None,
    progress: Progress | None = None,
    output_type: str = "pil",
    control: Image.Image | None = None,
) -> list[list[Any]]:
    """cells[row][col] of one prompt and seed: one row per (label, LoRA file or directory), one
    column per strength, on a loaded pipeline, which is left holding no LoRA. output_type "pil"
    gives PIL images, "latent" the packed latents the transformer produced (what to compare when
    the VAE is an untrained test one). progress(done, total) counts cells. control: the image every
    cell edits (editing families: Kontext)."""
    (cells,) = render_panels(
        pipe, loras, strengths, [Panel(prompt, seed)], width, height, steps, guidance, progress, output_type,
        control=control,
    )
    return cells


def render_panels(
    pipe,
    loras: list[tuple[str, Path]],
    strengths: list[float],
    panels: list[Panel],
    width: int,
    height: int,
    steps: int,
    guidance: float | None,
    progress: Progress | None = None,
    output_type: str = "pil",
    on_lora: Callable[[int], None] | None = None,
    control: Image.Image | None = None,
) -> list[list[list[Any]]]:
    """cells[panel][row][col] for several prompt/seed panels, each LoRA loaded once for all of them.

    Each distinct prompt is encoded once, before any LoRA is loaded, so LoRA weights for the text
    encoders (which this project's LoRAs do not have) would not apply. Strength 0.0 means the
    base model: it is rendered once per panel, without any adapter, and shared by every row.
    on_lora(row) runs while row's LoRA is loaded at weight 1.0 (the held-out loss uses it).
    control: the image every cell edits (editing families), resized to the cell size.
    The pipeline is left holding no LoRA, also when rendering fails.
    """
    if output_type not in OUTPUT_TYPES:
        raise ValueError(f"output_type must be one of {OUTPUT_TYPES}, got {output_type!r}")
    if pipe.get_list_adapters():
        raise ValueError("the pipeline already holds LoRA adapters; render on a clean pipeline")
    total = len(panels) * len(loras) * len(strengths)
    done = 0

    def tick(cells: int) -> None:
        nonlocal done
        done += cells
        if progress is not None:
            progress(done, total)

    embeddings = {prompt: encode(pipe, prompt) for prompt in dict.fromkeys(p.prompt for p in panels)}

    def render(panel: Panel) -> Any:
        return render_image(pipe, embeddings[panel.prompt], panel.seed, width, height, steps, guidance, output_type,
                            control=control)

    cells: list[list[list[Any]]] = [[[None] * len(strengths) for _ in loras] for _ in panels]
    zero_columns = [c for c, s in enumerate(strengths) if s == 0.0]
    if zero_columns and loras:
        for p, panel in enumerate(panels):
            base = render(panel)
            for row in cells[p]:
                for c in zero_columns:
                    row[c] = _copy(base)
            tick(len(loras) * len(zero_columns))

    try:
        for r, (_label, lora) in enumerate(loras):
            name = f"grid_row_{r}"
            pipe.load_lora_weights(str(lora), adapter_name=name)
            try:
                if on_lora is not None:
                    pipe.set_adapters([name], adapter_weights=[1.0])
                    on_lora(r)
                for p, panel in enumerate(panels):
                    for c, strength in enumerate(strengths):
                        if c in zero_columns:
                            continue
                        pipe.set_adapters([name], adapter_weights=[strength])
                        cells[p][r][c] = render(panel)
                        tick(1)
            finally:
                pipe.delete_adapters(name)
    finally:
        # delete_adapters leaves empty LoRA wrappers in the modules; unloading restores the
        # original layers so the next job starts from the plain base model.
        pipe.unload_lora_weights()
    return cells


def generate_images(
    pipe,
    loras: list[tuple[Path, float]],
    prompts: list[str],
    seeds: list[int],
    width: int,
    height: int,
    steps: int,
    guidance: float | None,
    progress: Progress | None = None,
    control: Image.Image | None = None,
) -> list[list[Image.Image]]:
    """images[prompt][seed] with every LoRA applied at its strength; the pipeline is left holding
    no LoRA. Prompts are encoded with the LoRAs loaded, so text-encoder LoRA weights apply.
    control: the image every generation edits (editing families)."""
    if pipe.get_list_adapters():
        raise ValueError("the pipeline already holds LoRA adapters; generate on a clean pipeline")
    total, done = len(prompts) * len(seeds), 0
    images: list[list[Image.Image]] = []
    try:
        names = []
        for i, (lora, _strength) in enumerate(loras):
            names.append(f"generate_{i}")
            pipe.load_lora_weights(str(lora), adapter_name=names[-1])
        if names:
            pipe.set_adapters(names, adapter_weights=[strength for _lora, strength in loras])
        for prompt in prompts:
            embedding = encode(pipe, prompt)
            row = []
            for seed in seeds:
                row.append(render_image(pipe, embedding, seed, width, height, steps, guidance, "pil", control=control))
                done += 1
                if progress is not None:
                    progress(done, total)
            images.append(row)
    finally:
        if pipe.get_list_adapters():
            pipe.delete_adapters(list(dict.fromkeys(n for ns in pipe.get_list_adapters().values() for n in ns)))
        pipe.unload_lora_weights()
    return images


def encode(pipe, prompt: str) -> tuple[PromptEncoding, PromptEncoding | None]:
    """The prompt (and, for families with classifier-free guidance, the empty negative prompt)
    encoded by the pipeline's family."""
    return family_of(pipe).encode_for_pipeline(pipe, prompt)


def render_image(
    pipe,
    embedding: tuple[PromptEncoding, PromptEncoding | None],
    seed: int,
    width: int,
    height: int,
    steps: int,
    guidance: float | None,
    output_type: str,
    control: Image.Image | None = None,
) -> Any:
    # A CPU generator: the same seed gives the same noise on every device.
    guidance = DEFAULT_GUIDANCE if guidance is None else guidance
    family = family_of(pipe)
    result = pipe(
        **family.pipeline_prompt_kwargs(*embedding, guidance),
        **family.pipeline_call_kwargs(width, height, control),
        num_inference_steps=steps,
        generator=torch.Generator("cpu").manual_seed(seed),
        output_type=output_type,
    )
    return result.images if output_type == "latent" else result.images[0]


def _copy(cell: Any) -> Any:
    return cell.clone() if isinstance(cell, torch.Tensor) else cell.copy()


def latent_mse(a: torch.Tensor, b: torch.Tensor) -> float:
    return torch.mean((a.float().cpu() - b.float().cpu()) ** 2).item()


def latent_distances_to_image(
    model_dir: Path,
    lora: Path,
    image: Path | Image.Image,
    prompt: str,
    strengths: Sequence[float] = (0.0, 1.0),
    *,
    seed: int = 0,
    steps: int = 20,
    guidance: float | None = None,
    precision: str = "auto",
    device: torch.device | str | None = None,
    control: Path | Image.Image | None = None,
) -> list[float]:
    """Latent MSE between generations at each LoRA strength and the image's own latents.

    A LoRA trained on an image (prompted with its caption) should pull generations toward it:
    the distance at strength 1.0 falls well below that at 0.0. Measured in latent space because
    an untrained test VAE cannot reconstruct images, and at the image's size. control: the image
    an editing LoRA edits into `image` (editing families), given to every generation.
    """
    image = _rgb(image)
    control = None if control is None else _rgb(control)
    device, dtype = pick_device_dtype(precision, device)
    pipe = load_flux_pipeline(model_dir, device, dtype)
    target = family_of(pipe).pipeline_output_latents(pipe.vae, image_to_pixels(pipe, image.convert("RGB")))
    (row,) = render_cells(
        pipe,
        [("lora", lora)],
        list(strengths),
        prompt,
        seed,
        image.width,
        image.height,
        steps,
        guidance,
        output_type="latent",
        control=control,
    )
    return [latent_mse(cell, target) for cell in row]


def _rgb(image: Path | Image.Image) -> Image.Image:
    if isinstance(image, Image.Image):
        return image
    with Image.open(image) as opened:
        return opened.convert("RGB")
