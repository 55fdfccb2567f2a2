"""Loading a single-file transformer (models.single_file) with diffusers' from_single_file."""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from safetensors.torch import load_file

from fluxlora.models.families import Family
from fluxlora.models.single_file import COMFYUI_PREFIX, SingleFileModel
from fluxlora.models.single_file_scales import dequantize_scaled

log = logging.getLogger(__name__)

# diffusers' converter (diffusers.loaders.single_file_utils) of each transformer class, and whether
# it splits a single block's fused linear1 at FLUX.1's width (inner_dim = 3072, MLP 4 x 3072)
# whatever the checkpoint's: FLUX.1's and Chroma's do, so a narrower model (the tiny test models) is
# padded to that width for the conversion and trimmed after, and diffusers' own key mapping is used
# for both. FLUX.2's keeps linear1 fused (attn.to_qkv_mlp_proj) and takes any width.
_CONVERTERS: dict[str, tuple[str, bool]] = {
    "FluxTransformer2DModel": ("convert_flux_transformer_checkpoint_to_diffusers", True),
    "ChromaTransformer2DModel": ("convert_chroma_transformer_checkpoint_to_diffusers", True),
    "Flux2Transformer2DModel": ("convert_flux2_transformer_checkpoint_to_diffusers", False),
}
_DIFFUSERS_WIDTH = 3072
_MLP_RATIO = 4


def load_single_file_transformer(path: Path, model: SingleFileModel, family: Family, config_dir: Path,
                                 dtype: torch.dtype) -> torch.nn.Module:
    """The transformer in `path` as `family`'s diffusers class, in `dtype` (fp8 weights upcast),
    with config_dir/transformer/config.json as its config, updated with what the file's shapes fix."""
    state = dequantize_scaled(load_file(str(path)), str(path), dtype)  # ComfyUI's scaled fp8 (single_file_scales)
    # fp8 tensors upcast first: padding and the converter's torch.cat have no fp8 kernels on a CPU.
    state = {k: v.to(dtype) if v.is_floating_point() and v.dtype != dtype else v for k, v in state.items()}
    state = to_diffusers_state(state, model, family)
    transformer = family.transformer_class.from_single_file(
        state, config=str(config_dir), subfolder="transformer", dtype=dtype, local_files_only=True, **model.config)
    log.info("loaded the single-file %s transformer %s (%s layout, %s weights as %s)", family.name, path,
             model.layout, model.dtype, dtype)
    return transformer


def to_diffusers_state(state: dict[str, torch.Tensor], model: SingleFileModel,
                       family: Family) -> dict[str, torch.Tensor]:
    """The file's tensors under the diffusers keys of `family`'s transformer, converted by diffusers' own
    converter, which pops from `state` what it converts (so each source tensor is freed as it goes).
    Converters only rename, split, concatenate and chunk along the first dimension, so a tensor may
    pass as its raw bytes (models.single_file_fp8 passes fp8 weights as uint8)."""
    # Without ComfyUI's prefix: FLUX.2's converter maps BFL's keys only (FLUX.1's strips it itself).
    state = {k.removeprefix(COMFYUI_PREFIX): state.pop(k) for k in list(state)}
    converter, fixed_width = _CONVERTERS[family.transformer_class.__name__]
    width = model.config["num_attention_heads"] * model.config["attention_head_dim"]
    if fixed_width and width != _DIFFUSERS_WIDTH:
        return _convert_narrow(state, converter, width)
    from diffusers.loaders import single_file_utils as sfu

    return getattr(sfu, converter)(state)


def _convert_narrow(state: dict[str, torch.Tensor], converter: str, width: int) -> dict[str, torch.Tensor]:
    from diffusers.loaders import single_file_utils as sfu

    if width > _DIFFUSERS_WIDTH:
        raise ValueError(f"a single-file transformer {width} wide is wider than diffusers' converter handles")
    sizes = (width, width, width, _MLP_RATIO * width)
    full = (_DIFFUSERS_WIDTH, _DIFFUSERS_WIDTH, _DIFFUSERS_WIDTH, _MLP_RATIO * _DIFFUSERS_WIDTH)
    for key in [k for k in state if k.startswith("single_blocks.") and ".linear1." in k]:
        parts = torch.split(state[key], sizes)
        state[key] = torch.cat([torch.cat([p, p.new_zeros((f - p.shape[0], *p.shape[1:]))])
                                for p, f in zip(parts, full, strict=True)])
    converted = getattr(sfu, converter)(state)
    for key in list(converted):
        if key.startswith("single_transformer_blocks.") and (".attn.to_" in key or ".proj_mlp." in key):
            keep = _MLP_RATIO * width if ".proj_mlp." in key else width
            converted[key] = converted[key][:keep].clone()
    return converted
