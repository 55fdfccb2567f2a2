"""What the LoRA file tests share: a LoRA that changes the output, a seeded render of a pipeline with a
LoRA file loaded, and the check that a kohya (ComfyUI) file renders as the diffusers file."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from fluxlora.training.trainer import LORA_WEIGHTS_NAME, TrainConfig
from fluxlora.training.trainer.lora import add_lora


def add_random_lora(transformer, targets: Sequence[str], scale: float, generator=None) -> None:
    """A rank-4 LoRA (alpha 8) on `targets` whose B matrices are random (a fresh LoRA's are zero): one
    that changes the output, to see that a file carries it."""
    add_lora(transformer, TrainConfig(rank=4, alpha=8.0, target_modules=list(targets)))
    generator = generator or torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, param in transformer.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * scale)


def render_latents(pipe, lora: Path | None, text_width: int, size: int = 64, **text) -> torch.Tensor:
    """Two seeded steps of `pipe` at guidance 1 on seeded random text embeddings `text_width` wide, as
    latents, with the LoRA file `lora` loaded (None: the base model) and unloaded after."""
    if lora is not None:
        pipe.load_lora_weights(lora, adapter_name="trained")
    embeds = torch.randn(1, 8, text_width, generator=torch.Generator().manual_seed(1))
    latents = pipe(prompt_embeds=embeds, guidance_scale=1.0, height=size, width=size, num_inference_steps=2,
                   output_type="latent", generator=torch.Generator().manual_seed(0), **text).images
    if lora is not None:
        pipe.unload_lora_weights()
    return latents


def assert_the_kohya_file_renders_as_the_diffusers_file(render: Callable[[Path | None], torch.Tensor], lora_dir: Path,
                                                        kohya_name: str, *, changes_by: float,
                                                        tolerance: float) -> None:
    """The LoRA saved in `lora_dir` changes `render`'s latents by more than `changes_by`, and its kohya
    file renders as its diffusers file within `tolerance`."""
    base, from_peft = render(None), render(lora_dir / LORA_WEIGHTS_NAME)
    from_kohya = render(lora_dir / kohya_name)
    assert (from_peft - base).abs().max() > changes_by
    torch.testing.assert_close(from_kohya, from_peft, atol=tolerance, rtol=tolerance)
