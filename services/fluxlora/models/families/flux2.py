"""FLUX.2 [dev] and [klein]: recognised and planned (memory estimates from config), not trainable
yet. What the planner needs is here: FLUX.2's latents (a 32-channel VAE, patchified 2x2 into 128
channels, one token per patch), its 4-axis position ids, and its transformer's inputs (one text
encoder's hidden states, no pooled vector; a guidance embedding on [dev] only).

Left for training (issue 16): the Mistral / Qwen3 text encoding, the VAE's batch-norm latent
normalisation, FLUX.2's empirical timestep shift, LoRA presets for its fused single-block layers
(attention_targets is the planner's guess at one) and a kohya key map.
"""

from __future__ import annotations

from typing import Any

import torch
from diffusers import Flux2KleinPipeline, Flux2Pipeline, Flux2Transformer2DModel

from fluxlora.models.families.base import Family, PromptEncoding


class Flux2(Family):
    name = "flux2-dev"
    pipeline_class = Flux2Pipeline
    transformer_class = Flux2Transformer2DModel
    text_components = ("text_encoder", "tokenizer")
    kohya_base_model_version = "flux2"
    trainable = False
    # Single blocks fuse q/k/v with the MLP input (to_qkv_mlp_proj) and have a plain attn.to_out.
    attention_targets = ("to_q", "to_k", "to_v", "to_out.0",
                         r"single_transformer_blocks\.\d+\.attn\.(to_qkv_mlp_proj|to_out)")

    def pack(self, latents: torch.Tensor) -> torch.Tensor:
        return Flux2Pipeline._pack_latents(Flux2Pipeline._patchify_latents(latents))

    def image_ids(self, latent_height: int, latent_width: int, device, dtype) -> torch.Tensor:
        patches = torch.empty(1, 1, latent_height // 2, latent_width // 2)
        return Flux2Pipeline._prepare_latent_ids(patches)[0].to(device)

    def transformer_kwargs(self, transformer, *, hidden_states: torch.Tensor, sigmas: torch.Tensor,
                           text: PromptEncoding, img_ids: torch.Tensor, guidance: float) -> dict[str, Any]:
        batch = hidden_states.shape[0]
        guidance_input = self.guidance_input(transformer, hidden_states, guidance)
        return dict(
            hidden_states=hidden_states,
            timestep=sigmas,
            guidance=guidance_input,
            encoder_hidden_states=text.embeds,
            txt_ids=Flux2Pipeline._prepare_text_ids(text.embeds).to(hidden_states.device),
            img_ids=img_ids[None].expand(batch, -1, -1),
            return_dict=False,
        )


class Flux2Klein(Flux2):
    name = "flux2-klein"
    pipeline_class = Flux2KleinPipeline
