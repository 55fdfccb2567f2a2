"""The Family interface: what differs between the members of the Flux family of models, and
FLUX.1 [dev]'s answers, which the other families inherit where they agree.

One object per family tells the trainer, the sampler, the evaluation renderer and the memory
planner how to encode text, pack latents, feed the transformer and call the family's diffusers
pipeline, so the loop, checkpoints, resume, the encoding cache, 8-bit base layers, block swapping
and compiled blocks exist once for every family.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from diffusers import FluxPipeline, FluxTransformer2DModel
from diffusers.pipelines.flux.pipeline_flux import calculate_shift


@dataclass(frozen=True)
class PromptEncoding:
    """A batch of encoded prompts, as the transformer takes them."""

    embeds: torch.Tensor  # (B, seq, dim)
    pooled: torch.Tensor  # (B, dim); (B, 0) for families without a pooled text vector
    mask: torch.Tensor | None  # (B, seq) text attention mask, for families that attend with one
    text_ids: torch.Tensor  # (seq, 3), the same for every prompt


class Family:
    """FLUX.1 [dev] (and every FluxPipeline directory: schnell, the tiny test model): CLIP's pooled
    vector + T5's tokens, 2x2-packed latents, the scheduler's dynamic shift, and guidance as a
    distilled embedding on transformers that have one (guidance_embeds)."""

    name = "flux1-dev"
    pipeline_class: type = FluxPipeline
    transformer_class: type = FluxTransformer2DModel
    # Pipeline components that only encode text: skipped when the encodings are cached.
    text_components: tuple[str, ...] = ("text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2")
    # What kohya sd-scripts writes as ss_base_model_version, for tools that sort LoRAs by base.
    kohya_base_model_version = "flux1"
    # ss_network_module of the kohya file: the trainer module that writes this layout.
    kohya_network_module = "networks.lora_flux"
    # LoRA targets of the "attention" preset where the trainer's names (to_q, to_k, to_v, to_out.0)
    # miss layers of this family; None: the trainer's preset fits (FLUX.1, Chroma).
    attention_targets: tuple[str, ...] | None = None
    # This family's own module lists for the trainer's presets (targets.TARGET_PRESETS, by preset
    # name), used when a run's target_modules is one of those presets as written for FLUX.1;
    # None: FLUX.1's module names fit (FLUX.1, Chroma).
    target_presets: dict[str, list[str]] | None = None
    # Editing families (Kontext) train on before/after pairs: each sample's control image is
    # encoded with its target and handed to with_control.
    takes_control_image = False

    def __repr__(self) -> str:
        return f"<family {self.name}>"

    def text_encoders(self, pipe) -> list[torch.nn.Module]:
        return [getattr(pipe, n) for n in self.text_components if n.startswith("text_encoder")]

    def encode_prompts(self, pipe, texts: list[str], device: torch.device,
                       max_sequence_length: int) -> PromptEncoding:
        embeds, pooled, text_ids = pipe.encode_prompt(
            prompt=texts, prompt_2=texts, device=device, max_sequence_length=max_sequence_length
        )
        return PromptEncoding(embeds, pooled, None, text_ids)

    @torch.no_grad()
    def encode_latents(self, vae, pixels: torch.Tensor) -> torch.Tensor:
        """Normalised latents (B, C, h, w) as the transformer is trained on them (`pack` turns
        them into tokens): the distribution's mode, shifted and scaled by the VAE's factors."""
        param = next(vae.parameters())
        latents = vae.encode(pixels.to(param.device, param.dtype)).latent_dist.mode()
        return (latents - vae.config.shift_factor) * vae.config.scaling_factor

    def pipeline_output_latents(self, vae, pixels: torch.Tensor) -> torch.Tensor:
        """The image's latents in the form the pipeline's output_type="latent" returns them
        (FLUX.1: packed and normalised), to compare generations with."""
        return self.pack(self.encode_latents(vae, pixels))

    def shift_mu(self, image_seq_len: int, scheduler_config) -> float:
        """The exponential timestep shift's mu for flux_shift sampling at this many image tokens:
        the scheduler's linear rule from base_shift (at base_image_seq_len) to max_shift."""
        config = scheduler_config or {}
        return calculate_shift(image_seq_len, config.get("base_image_seq_len", 256),
                               config.get("max_image_seq_len", 4096), config.get("base_shift", 0.5),
                               config.get("max_shift", 1.15))

    # Latents: FLUX.1's 2x2 packing of the VAE's 16 channels (4 on the tiny model) into tokens.
    def pack(self, latents: torch.Tensor) -> torch.Tensor:
        b, c, h, w = latents.shape
        return FluxPipeline._pack_latents(latents, b, c, h, w)

    def image_ids(self, latent_height: int, latent_width: int, device, dtype) -> torch.Tensor:
        return FluxPipeline._prepare_latent_image_ids(1, latent_height // 2, latent_width // 2, device, dtype)

    def with_control(self, hidden_states: torch.Tensor, img_ids: torch.Tensor,
                     control: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """The transformer's image tokens and their ids with the control image's latents
        (B, C, h, w; None: no control image) added. The trainer keeps the prediction of the first
        hidden_states.shape[1] tokens. Families without image conditioning take none."""
        if control is not None:
            raise ValueError(f"the {self.name} family takes no control image: train an editing family "
                             "(flux1-kontext) on before/after pairs")
        return hidden_states, img_ids

    def pipeline_call_kwargs(self, width: int, height: int, control=None) -> dict[str, Any]:
        """The pipeline call's size arguments (and, for editing families, the control PIL image)."""
        if control is not None:
            raise ValueError(f"the {self.name} family edits no control image: render it without one")
        return dict(width=width, height=height)

    def uses_guidance_embedding(self, transformer) -> bool:
        return bool(getattr(transformer.config, "guidance_embeds", False))

    def guidance_input(self, transformer, hidden_states: torch.Tensor, guidance: float) -> torch.Tensor | None:
        """The distilled guidance value per sample, for a transformer with a guidance embedding."""
        if not self.uses_guidance_embedding(transformer):
            return None
        return torch.full((hidden_states.shape[0],), guidance, device=hidden_states.device, dtype=torch.float32)

    def transformer_kwargs(self, transformer, *, hidden_states: torch.Tensor, sigmas: torch.Tensor,
                           text: PromptEncoding, img_ids: torch.Tensor, guidance: float) -> dict[str, Any]:
        """Keyword arguments of one training forward pass (hidden_states already packed)."""
        guidance_input = self.guidance_input(transformer, hidden_states, guidance)
        return dict(
            hidden_states=hidden_states,
            timestep=sigmas,  # the transformer wants t/1000, i.e. sigma itself
            guidance=guidance_input,
            pooled_projections=text.pooled,
            encoder_hidden_states=text.embeds,
            txt_ids=text.text_ids,
            img_ids=img_ids,
            return_dict=False,
        )

    def pipeline_prompt_kwargs(self, text: PromptEncoding, negative: PromptEncoding | None,
                               guidance: float) -> dict[str, Any]:
        """The pipeline call's prompt and guidance arguments for encoded prompts. FLUX.1's guidance
        is the distilled embedding: no negative prompt, one transformer pass per step."""
        return dict(prompt_embeds=text.embeds, pooled_prompt_embeds=text.pooled, guidance_scale=guidance)

    def encode_for_pipeline(self, pipe, prompt: str) -> tuple[PromptEncoding, PromptEncoding | None]:
        """(prompt, negative prompt or None) encoded with the pipeline's own encoders, on its device."""
        with torch.no_grad():
            embeds, pooled, text_ids = pipe.encode_prompt(prompt=prompt, prompt_2=None,
                                                          device=pipe._execution_device)
        return PromptEncoding(embeds, pooled, None, text_ids), None
