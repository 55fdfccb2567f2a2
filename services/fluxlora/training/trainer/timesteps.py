"""Drawing the noise level of each training example (flow matching: x_t = (1-s) x0 + s noise)."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from diffusers.pipelines.flux.pipeline_flux import calculate_shift


def sample_sigmas(
    kind: str,
    batch_size: int,
    generator: torch.Generator,
    *,
    sigmoid_scale: float = 1.0,
    shift: float = 3.0,
    image_seq_len: int | None = None,
    scheduler_config: dict | None = None,
    mu_of: Callable[[int, dict], float] | None = None,
) -> torch.Tensor:
    """(batch_size,) float32 sigmas in [0, 1] on the CPU, drawn from `generator`.

    "uniform": U(0, 1). "sigmoid": sigmoid(N(0, sigmoid_scale)). "shift": sigmoid, then the
    static shift s*t / (1 + (s-1)*t) that moves weight toward noisier steps. "flux_shift": sigmoid,
    then the exponential shift with mu from the image's token count, as FLUX's scheduler applies
    at inference (needs image_seq_len and the scheduler's config); mu_of(image_seq_len,
    scheduler_config) gives the model family's mu (FLUX.2's empirical one), FLUX.1's rule by default.
    """
    if kind == "uniform":
        return torch.rand(batch_size, generator=generator)
    t = torch.sigmoid(torch.randn(batch_size, generator=generator) * sigmoid_scale)
    if kind == "sigmoid":
        return t
    if kind == "shift":
        return shift * t / (1 + (shift - 1) * t)
    if kind == "flux_shift":
        if image_seq_len is None or scheduler_config is None:
            raise ValueError("flux_shift sampling needs image_seq_len and scheduler_config")
        if mu_of is not None:
            mu = mu_of(image_seq_len, scheduler_config)
            return math.exp(mu) / (math.exp(mu) + (1 / t - 1))
        mu = calculate_shift(
            image_seq_len,
            scheduler_config.get("base_image_seq_len", 256),
            scheduler_config.get("max_image_seq_len", 4096),
            scheduler_config.get("base_shift", 0.5),
            scheduler_config.get("max_shift", 1.15),
        )
        return math.exp(mu) / (math.exp(mu) + (1 / t - 1))
    raise ValueError(
        f"unknown timestep sampling {kind!r}: use uniform, sigmoid, shift or flux_shift"
    )
