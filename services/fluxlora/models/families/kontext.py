"""FLUX.1 Kontext [dev] (black-forest-labs/FLUX.1-Kontext-dev): FLUX.1 [dev]'s transformer, text
encoders, VAE and guidance embedding, trained on before/after pairs to follow an edit instruction.

As FluxKontextPipeline conditions: the control (before) image is VAE-encoded like the target,
2x2-packed and appended after the noisy target tokens in the image sequence; its position ids are
the target's with the first coordinate set to 1, so the transformer tells the two images apart
while their pixels line up. The transformer predicts every token; only the target's (the first
ones) are the velocity, so the prediction is cut to them and the loss is on the target only.
"""

from __future__ import annotations

from typing import Any

import torch
from diffusers import FluxKontextPipeline
from PIL import Image

from fluxlora.models.families.base import Family


class Kontext(Family):
    name = "flux1-kontext"
    pipeline_class = FluxKontextPipeline
    kohya_base_model_version = "flux1"
    takes_control_image = True

    def with_control(self, hidden_states: torch.Tensor, img_ids: torch.Tensor,
                     control: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        if control is None:  # text-to-image, as the pipeline renders without an image
            return hidden_states, img_ids
        _, _, height, width = control.shape
        control_ids = self.image_ids(height, width, img_ids.device, img_ids.dtype)
        control_ids[..., 0] = 1
        tokens = self.pack(control).to(hidden_states.dtype)
        return torch.cat([hidden_states, tokens], dim=1), torch.cat([img_ids, control_ids], dim=0)

    def pipeline_call_kwargs(self, width: int, height: int, control: Image.Image | None = None) -> dict[str, Any]:
        # The pipeline rescales width x height to max_area (default 1024^2) and snaps the control
        # image to its preferred resolutions unless told not to; both would ignore the size asked.
        kwargs: dict[str, Any] = dict(width=width, height=height, max_area=width * height)
        if control is not None:
            resized = control.convert("RGB").resize((width, height), Image.Resampling.LANCZOS)
            kwargs.update(image=resized, _auto_resize=False)
        return kwargs
