"""The full-size configs of each family's released models, written as a diffusers directory without
weights, so the memory planner (and bench/memory_plan.py) can estimate a real model on any machine.

A config is named after its family ("flux2-klein": the family's first size, FLUX.2 [klein] 4B) or,
for a family's other sizes, the family and the size ("flux2-klein-9b"); full_size_family gives the
family a name belongs to, read from its config as the trainer would read the model.

Sources (public config.json files, read 2026-12-06):
- flux1-dev: black-forest-labs/FLUX.1-dev transformer/config.json (the planner's FLUX1_DEV_TRANSFORMER).
- flux1-kontext: black-forest-labs/FLUX.1-Kontext-dev transformer/config.json: FLUX.1-dev's
  transformer (same class and sizes; image conditioning is extra tokens, not extra weights).
- chroma: lodestones/Chroma1-HD transformer/config.json (19 + 38 blocks, 24 x 128 heads, T5's 4096,
  approximator 64 channels / 5120 hidden / 5 layers), equal to ChromaTransformer2DModel's defaults.
- flux2-dev: black-forest-labs/FLUX.2-dev transformer/config.json (as mirrored in
  diffusers/FLUX.2-dev-bnb-4bit: 8 + 48 blocks, 48 x 128 heads, Mistral's 15360, mlp_ratio 3).
- flux2-klein: black-forest-labs/FLUX.2-klein-4B transformer/config.json (diffusers'
  scripts/convert_flux2_to_diffusers.py "klein-4b": 5 + 20 blocks, 24 x 128 heads, Qwen3-4B's
  3 x 2560 = 7680, no guidance embedding).
- flux2-klein-9b: FLUX.2 [klein] 9B, Klein9BParams of BFL's later black-forest-labs/flux2
  src/flux2/model.py, as ported in kohya-ss/musubi-tuner src/musubi_tuner/flux_2/flux2_models.py
  and ostris/ai-toolkit's flux2 extension (read 2026-12-07): 8 + 24 blocks, hidden 4096 = 32 x 128
  heads, Qwen3-8B's 3 x 4096 = 12288, mlp_ratio 3, axes [32, 32, 32, 32], theta 2000,
  use_guidance_embed False; FLUX.2's VAE; diffusers' Flux2KleinPipeline.
VAEs: FLUX.1's AutoencoderKL (16 latent channels) for flux1-*/chroma; FLUX.2's AutoencoderKLFlux2
(32 channels). Both downscale 8x (four blocks); only the fields the planner reads are written.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

_FLUX1_TRANSFORMER: dict[str, Any] = {
    "_class_name": "FluxTransformer2DModel", "attention_head_dim": 128, "axes_dims_rope": [16, 56, 56],
    "guidance_embeds": True, "in_channels": 64, "joint_attention_dim": 4096, "num_attention_heads": 24,
    "num_layers": 19, "num_single_layers": 38, "patch_size": 1, "pooled_projection_dim": 768,
}
_CHROMA_TRANSFORMER: dict[str, Any] = {
    "_class_name": "ChromaTransformer2DModel", "approximator_hidden_dim": 5120, "approximator_layers": 5,
    "approximator_num_channels": 64, "attention_head_dim": 128, "axes_dims_rope": [16, 56, 56], "in_channels": 64,
    "joint_attention_dim": 4096, "num_attention_heads": 24, "num_layers": 19, "num_single_layers": 38,
    "out_channels": None, "patch_size": 1,
}
_FLUX2_COMMON: dict[str, Any] = {
    "_class_name": "Flux2Transformer2DModel", "attention_head_dim": 128, "axes_dims_rope": [32, 32, 32, 32],
    "eps": 1e-06, "in_channels": 128, "mlp_ratio": 3.0, "out_channels": None, "patch_size": 1, "rope_theta": 2000,
    "timestep_guidance_channels": 256,
}
_FLUX2_DEV_TRANSFORMER = {**_FLUX2_COMMON, "guidance_embeds": True, "joint_attention_dim": 15360,
                          "num_attention_heads": 48, "num_layers": 8, "num_single_layers": 48}
_FLUX2_KLEIN_TRANSFORMER = {**_FLUX2_COMMON, "guidance_embeds": False, "joint_attention_dim": 7680,
                            "num_attention_heads": 24, "num_layers": 5, "num_single_layers": 20}
_FLUX2_KLEIN_9B_TRANSFORMER = {**_FLUX2_COMMON, "guidance_embeds": False, "joint_attention_dim": 12288,
                               "num_attention_heads": 32, "num_layers": 8, "num_single_layers": 24}
_FLUX1_VAE = {"_class_name": "AutoencoderKL", "block_out_channels": [128, 256, 512, 512], "latent_channels": 16,
              "scaling_factor": 0.3611, "shift_factor": 0.1159}
_FLUX2_VAE = {"_class_name": "AutoencoderKLFlux2", "block_out_channels": [128, 256, 512, 512], "latent_channels": 32}

# model name (a family, or a family's other size) -> (pipeline class, transformer config, VAE config)
FULL_SIZE: dict[str, tuple[str, dict[str, Any], dict[str, Any]]] = {
    "flux1-dev": ("FluxPipeline", _FLUX1_TRANSFORMER, _FLUX1_VAE),
    "flux1-kontext": ("FluxKontextPipeline", _FLUX1_TRANSFORMER, _FLUX1_VAE),
    "chroma": ("ChromaPipeline", _CHROMA_TRANSFORMER, _FLUX1_VAE),
    "flux2-dev": ("Flux2Pipeline", _FLUX2_DEV_TRANSFORMER, _FLUX2_VAE),
    "flux2-klein": ("Flux2KleinPipeline", _FLUX2_KLEIN_TRANSFORMER, _FLUX2_VAE),
    "flux2-klein-9b": ("Flux2KleinPipeline", _FLUX2_KLEIN_9B_TRANSFORMER, _FLUX2_VAE),
}


def full_size_family(name: str) -> str:
    """The family of the full-size config `name` ("flux2-klein-9b" -> "flux2-klein"): detected from
    its pipeline and transformer classes, as a model directory of it would be."""
    from fluxlora.models.families import detect_family

    pipeline, transformer, _ = _full_size(name)
    family = detect_family({"_class_name": pipeline}, transformer)
    assert family is not None, f"FULL_SIZE[{name!r}] names no known pipeline class"
    return family


def _full_size(name: str) -> tuple[str, dict[str, Any], dict[str, Any]]:
    if name not in FULL_SIZE:
        raise ValueError(f"no full-size config named {name!r}: use one of {', '.join(FULL_SIZE)}")
    return FULL_SIZE[name]


def write_config(name: str, out_dir: Path) -> Path:
    """model_index.json, transformer/config.json and vae/config.json of the full-size model `name`
    (a FULL_SIZE key) in out_dir (no weights); returns out_dir."""
    pipeline, transformer, vae = _full_size(name)
    out_dir = Path(out_dir)
    files = {"model_index.json": {"_class_name": pipeline, "transformer": ["diffusers", transformer["_class_name"]],
                                  "vae": ["diffusers", vae["_class_name"]]},
             "transformer/config.json": transformer, "vae/config.json": vae}
    for name, content in files.items():
        path = out_dir / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(content, indent=2, sort_keys=True) + "\n")
    return out_dir
