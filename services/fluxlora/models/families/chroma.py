"""Chroma (lodestones/Chroma1-HD): FLUX.1 [schnell]'s architecture with pruned modulation, T5 alone
(no CLIP, so no pooled vector), a masked text sequence and real classifier-free guidance.

- Text: T5 with its attention mask; the transformer attends to the prompt's tokens and the first
  padding token only, as ChromaPipeline does. The mask is cached with the embeddings.
- Guidance: no guidance embedding. The run's `guidance` is the CFG scale of samples and renders
  (> 1: a second, negative-prompt pass per step, the empty prompt unless one is given); training
  itself has no guidance input.
- Latents, packing, scheduler shift and LoRA module names are FLUX.1's (same VAE, same blocks).
"""

from __future__ import annotations

from typing import Any

import torch
from diffusers import ChromaPipeline, ChromaTransformer2DModel

from fluxlora.models.families.base import Family, PromptEncoding


class Chroma(Family):
    name = "chroma"
    pipeline_class = ChromaPipeline
    transformer_class = ChromaTransformer2DModel
    text_components = ("text_encoder", "tokenizer")
    kohya_base_model_version = "chroma"

    def encode_prompts(self, pipe, texts: list[str], device: torch.device,
                       max_sequence_length: int) -> PromptEncoding:
        embeds, text_ids, mask, *_ = pipe.encode_prompt(
            prompt=texts, device=device, do_classifier_free_guidance=False, max_sequence_length=max_sequence_length
        )
        return PromptEncoding(embeds, embeds.new_zeros(embeds.shape[0], 0), mask, text_ids)

    def uses_guidance_embedding(self, transformer) -> bool:
        return False

    def transformer_kwargs(self, transformer, *, hidden_states: torch.Tensor, sigmas: torch.Tensor,
                           text: PromptEncoding, img_ids: torch.Tensor, guidance: float) -> dict[str, Any]:
        batch, image_tokens = hidden_states.shape[:2]
        # The pipeline's own mask extension (text mask + every image token), so training sees
        # the attention that inference will use.
        mask = ChromaPipeline._prepare_attention_mask(None, batch, image_tokens, hidden_states.dtype, text.mask)
        return dict(
            hidden_states=hidden_states,
            timestep=sigmas,
            encoder_hidden_states=text.embeds,
            txt_ids=text.text_ids,
            img_ids=img_ids,
            attention_mask=mask,
            return_dict=False,
        )

    def pipeline_prompt_kwargs(self, text: PromptEncoding, negative: PromptEncoding | None,
                               guidance: float) -> dict[str, Any]:
        kwargs = dict(prompt_embeds=text.embeds, prompt_attention_mask=text.mask, guidance_scale=guidance)
        if guidance > 1:
            if negative is None:
                raise ValueError("Chroma's guidance above 1 is classifier-free guidance: it needs a negative prompt")
            kwargs.update(negative_prompt_embeds=negative.embeds, negative_prompt_attention_mask=negative.mask)
        return kwargs

    def encode_for_pipeline(self, pipe, prompt: str) -> tuple[PromptEncoding, PromptEncoding | None]:
        with torch.no_grad():
            embeds, text_ids, mask, negative, negative_ids, negative_mask = pipe.encode_prompt(
                prompt=prompt, negative_prompt="", device=pipe._execution_device, do_classifier_free_guidance=True
            )
        empty = embeds.new_zeros(embeds.shape[0], 0)
        return PromptEncoding(embeds, empty, mask, text_ids), PromptEncoding(negative, empty, negative_mask,
                                                                              negative_ids)
