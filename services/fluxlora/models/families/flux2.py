"""FLUX.2 [dev] and [klein]: one transformer class (Flux2Transformer2DModel), one VAE
(AutoencoderKLFlux2), one text encoder each; both train.

- Text: the text encoder's hidden states at three layers, stacked along the feature axis
  (klein: Qwen3 layers 9, 18, 27, 3 x 2560 = 7680 on the 4B; dev: Mistral-3 layers 10, 20, 30),
  padded to max_sequence_length, no mask and no pooled vector: the pipeline's own encode_prompt.
- Latents: the VAE's 32 channels, patchified 2x2 into 128 and normalised per channel with the
  VAE's batch-norm running statistics (no shift/scaling factor). The trainer keeps them in the
  VAE's layout, normalised: patchify is a permutation, so noise drawn in either layout is the same
  Gaussian, and `pack` patchifies and flattens to one token per patch.
- Ids: 4 axes (t, h, w, l): image tokens (0, h, w, 0), text tokens (0, 0, 0, i).
- Schedule: the pipeline's empirical mu (compute_empirical_mu) replaces FLUX.1's linear one for
  flux_shift sampling; at 50 steps, diffusers' default step count.
- Guidance: [klein] has no guidance embedding; its guidance is classifier-free (a negative,
  empty-prompt pass per step when > 1), which a step-distilled checkpoint (is_distilled) ignores.
  [dev] is guidance-distilled: the value goes into the transformer's guidance embedding, one pass
  per step, no negative prompt (as FLUX.1 [dev]).
- LoRA presets: double blocks as FLUX.1's (but the MLPs are ff.linear_in / linear_out); single
  blocks fuse q/k/v with the MLP's input (attn.to_qkv_mlp_proj) and the attention's output with the
  MLP's (attn.to_out), so those two layers are the single blocks' attention and MLP at once.
"""

from __future__ import annotations

from typing import Any

import torch
from diffusers import Flux2KleinPipeline, Flux2Pipeline, Flux2Transformer2DModel
from diffusers.pipelines.flux2.pipeline_flux2 import compute_empirical_mu

from fluxlora.models.families.base import Family, PromptEncoding

_DOUBLE = r"transformer_blocks\.\d+\."
_SINGLE_FUSED = r"single_transformer_blocks\.\d+\.attn\.(to_qkv_mlp_proj|to_out)"
# attention: the image stream's attention in double blocks (as FLUX.1's preset) and the single
# blocks' fused layers, which hold their attention.
FLUX2_ATTENTION_TARGETS = [_DOUBLE + r"attn\.(to_q|to_k|to_v|to_out\.0)", _SINGLE_FUSED]
# all linear: every linear layer of both streams' attention and MLPs in every block; not the
# modulation layers, embedders or final layer.
FLUX2_ALL_LINEAR_TARGETS = [
    _DOUBLE + r"attn\.(to_q|to_k|to_v|to_out\.0|add_q_proj|add_k_proj|add_v_proj|to_add_out)",
    _DOUBLE + r"(ff|ff_context)\.(linear_in|linear_out)",
    _SINGLE_FUSED,
]
# The step count compute_empirical_mu is read at for training (diffusers' default).
SHIFT_STEPS = 50


def _bn_stats(vae, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    mean = vae.bn.running_mean.view(1, -1, 1, 1).to(like.device, like.dtype)
    std = torch.sqrt(vae.bn.running_var.view(1, -1, 1, 1) + vae.config.batch_norm_eps).to(like.device, like.dtype)
    return mean, std


class Flux2(Family):
    name = "flux2-dev"
    pipeline_class = Flux2Pipeline
    transformer_class = Flux2Transformer2DModel
    text_components = ("text_encoder", "tokenizer")
    kohya_base_model_version = "flux2"
    kohya_network_module = "networks.lora_flux_2"  # kohya's musubi-tuner, which trains FLUX.2
    attention_targets = tuple(FLUX2_ATTENTION_TARGETS)
    target_presets = {"attention": FLUX2_ATTENTION_TARGETS, "all_linear": FLUX2_ALL_LINEAR_TARGETS}

    def encode_prompts(self, pipe, texts: list[str], device: torch.device,
                       max_sequence_length: int) -> PromptEncoding:
        # Both pipelines' encode_prompt: [dev]'s renders Mistral-3's chat with its system message,
        # [klein]'s Qwen3's; each stacks its default layers. No pooled vector, no mask.
        embeds, text_ids = pipe.encode_prompt(prompt=texts, device=device, max_sequence_length=max_sequence_length)
        return PromptEncoding(embeds, embeds.new_zeros(embeds.shape[0], 0), None, text_ids[0])

    def pipeline_prompt_kwargs(self, text: PromptEncoding, negative: PromptEncoding | None,
                               guidance: float) -> dict[str, Any]:
        return dict(prompt_embeds=text.embeds, guidance_scale=guidance)

    def encode_for_pipeline(self, pipe, prompt: str) -> tuple[PromptEncoding, PromptEncoding | None]:
        with torch.no_grad():
            embeds, ids = pipe.encode_prompt(prompt=prompt, device=pipe._execution_device)
        return PromptEncoding(embeds, embeds.new_zeros(embeds.shape[0], 0), None, ids[0]), None

    @torch.no_grad()
    def encode_latents(self, vae, pixels: torch.Tensor) -> torch.Tensor:
        param = next(vae.parameters())
        raw = vae.encode(pixels.to(param.device, param.dtype)).latent_dist.mode()
        patches = Flux2Pipeline._patchify_latents(raw)
        mean, std = _bn_stats(vae, patches)
        return Flux2Pipeline._unpatchify_latents((patches - mean) / std)

    def pipeline_output_latents(self, vae, pixels: torch.Tensor) -> torch.Tensor:
        # Flux2Pipeline returns the transformer's tokens as they are: normalised and packed.
        return self.pack(self.encode_latents(vae, pixels))

    def shift_mu(self, image_seq_len: int, scheduler_config) -> float:
        return compute_empirical_mu(image_seq_len, SHIFT_STEPS)

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

    @torch.no_grad()
    def pipeline_output_latents(self, vae, pixels: torch.Tensor) -> torch.Tensor:
        # Flux2KleinPipeline undoes the normalisation and the patches before returning latents.
        param = next(vae.parameters())
        return vae.encode(pixels.to(param.device, param.dtype)).latent_dist.mode()

    def uses_guidance_embedding(self, transformer) -> bool:
        return False

    def pipeline_prompt_kwargs(self, text: PromptEncoding, negative: PromptEncoding | None,
                               guidance: float) -> dict[str, Any]:
        kwargs = dict(prompt_embeds=text.embeds, guidance_scale=guidance)
        if guidance > 1:
            if negative is None:
                raise ValueError("FLUX.2 [klein]'s guidance above 1 is classifier-free guidance: it needs a "
                                 "negative prompt")
            kwargs.update(negative_prompt_embeds=negative.embeds)
        return kwargs

    def encode_for_pipeline(self, pipe, prompt: str) -> tuple[PromptEncoding, PromptEncoding | None]:
        device = pipe._execution_device
        with torch.no_grad():
            encoded = [pipe.encode_prompt(prompt=p, device=device) for p in (prompt, "")]
        (embeds, ids), (negative, negative_ids) = encoded
        empty = embeds.new_zeros(embeds.shape[0], 0)
        return PromptEncoding(embeds, empty, None, ids[0]), PromptEncoding(negative, empty, None, negative_ids[0])
