"""Write a diffusers transformer as one .safetensors file in Black Forest Labs' key layout (or
ComfyUI's, the same keys under model.diffusion_model.): the inverse of diffusers'
convert_flux_transformer_checkpoint_to_diffusers / convert_chroma_transformer_checkpoint_to_diffusers
(diffusers/loaders/single_file_utils.py; FLUX.2's in models.single_file_write_flux2), for
`fluxlora models write-tiny --single-file` and the tests that check a single-file base trains and
renders as its folder does. FLUX.1 Kontext's transformer is FLUX.1's, and so is its file."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import save_file

from fluxlora.models.families import family_for_model
from fluxlora.models.single_file import COMFYUI_PREFIX
from fluxlora.models.single_file_write_flux2 import flux2_to_bfl, is_flux2_state

# diffusers name -> BFL name, within a double block (transformer_blocks.{i} <-> double_blocks.{i}).
_DOUBLE = {
    "norm1.linear": "img_mod.lin", "norm1_context.linear": "txt_mod.lin",
    "attn.norm_q": "img_attn.norm.query_norm", "attn.norm_k": "img_attn.norm.key_norm",
    "attn.norm_added_q": "txt_attn.norm.query_norm", "attn.norm_added_k": "txt_attn.norm.key_norm",
    "ff.net.0.proj": "img_mlp.0", "ff.net.2": "img_mlp.2",
    "ff_context.net.0.proj": "txt_mlp.0", "ff_context.net.2": "txt_mlp.2",
    "attn.to_out.0": "img_attn.proj", "attn.to_add_out": "txt_attn.proj",
}
_SINGLE = {"norm.linear": "modulation.lin", "attn.norm_q": "norm.query_norm", "attn.norm_k": "norm.key_norm",
           "proj_out": "linear2"}
_TOP = {
    "time_text_embed.timestep_embedder.linear_1": "time_in.in_layer",
    "time_text_embed.timestep_embedder.linear_2": "time_in.out_layer",
    "time_text_embed.text_embedder.linear_1": "vector_in.in_layer",
    "time_text_embed.text_embedder.linear_2": "vector_in.out_layer",
    "time_text_embed.guidance_embedder.linear_1": "guidance_in.in_layer",
    "time_text_embed.guidance_embedder.linear_2": "guidance_in.out_layer",
    "context_embedder": "txt_in", "x_embedder": "img_in", "proj_out": "final_layer.linear",
    "distilled_guidance_layer.in_proj": "distilled_guidance_layer.in_proj",
    "distilled_guidance_layer.out_proj": "distilled_guidance_layer.out_proj",
}


_APPROXIMATOR = {"linear_1": "in_layer", "linear_2": "out_layer"}


def _swap_scale_shift(weight: torch.Tensor) -> torch.Tensor:
    # diffusers' AdaLayerNormContinuous splits (scale, shift), BFL's final layer (shift, scale).
    scale, shift = weight.chunk(2, dim=0)
    return torch.cat([shift, scale], dim=0)


def to_bfl(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A FLUX.1, Chroma or FLUX.2 transformer's diffusers state dict in BFL's key layout."""
    if is_flux2_state(state):
        return flux2_to_bfl(state)
    out: dict[str, torch.Tensor] = {}
    rest = dict(state)
    doubles = {int(k.split(".")[1]) for k in state if k.startswith("transformer_blocks.")}
    singles = {int(k.split(".")[1]) for k in state if k.startswith("single_transformer_blocks.")}
    for kind in ("weight", "bias"):
        for i in doubles:
            d, b = f"transformer_blocks.{i}.", f"double_blocks.{i}."
            out[f"{b}img_attn.qkv.{kind}"] = torch.cat([rest.pop(f"{d}attn.to_{x}.{kind}") for x in "qkv"])
            out[f"{b}txt_attn.qkv.{kind}"] = torch.cat([rest.pop(f"{d}attn.add_{x}_proj.{kind}") for x in "qkv"])
        for i in singles:
            d, b = f"single_transformer_blocks.{i}.", f"single_blocks.{i}."
            parts = [rest.pop(f"{d}attn.to_{x}.{kind}") for x in "qkv"] + [rest.pop(f"{d}proj_mlp.{kind}")]
            out[f"{b}linear1.{kind}"] = torch.cat(parts)
        if f"norm_out.linear.{kind}" in rest:
            out[f"final_layer.adaLN_modulation.1.{kind}"] = _swap_scale_shift(rest.pop(f"norm_out.linear.{kind}"))
    for key, tensor in rest.items():
        out[_bfl_name(key)] = tensor
    return out


def _bfl_name(key: str) -> str:
    module, kind = key.rsplit(".", 1)
    norm_kind = "scale" if kind == "weight" and module.endswith(("norm_q", "norm_k", "norm_added_q", "norm_added_k")) \
        else kind
    for prefix, bfl, table in (("transformer_blocks.", "double_blocks.", _DOUBLE),
                               ("single_transformer_blocks.", "single_blocks.", _SINGLE)):
        if module.startswith(prefix):
            index, name = module[len(prefix):].split(".", 1)
            return f"{bfl}{index}.{table[name]}.{norm_kind}"
    if module.startswith("distilled_guidance_layer.layers."):
        index, name = module[len("distilled_guidance_layer.layers."):].split(".", 1)
        return f"distilled_guidance_layer.layers.{index}.{_APPROXIMATOR[name]}.{kind}"
    if module.startswith("distilled_guidance_layer.norms."):
        return f"{module}.scale"
    return f"{_TOP[module]}.{kind}"


def write_folder_transformer(folder: Path, path: Path, *, layout: str = "bfl", fp8: bool = False) -> Path:
    """write_single_file of the transformer in the diffusers folder `folder`."""
    transformer = family_for_model(folder).transformer_class.from_pretrained(
        Path(folder) / "transformer", local_files_only=True)
    return write_single_file(transformer, path, layout=layout, dtype=torch.float8_e4m3fn if fp8 else None)


def write_single_file(transformer: torch.nn.Module, path: Path, *, layout: str = "bfl",
                      dtype: torch.dtype | None = None) -> Path:
    """Save `transformer` as one .safetensors file in the "bfl" or "comfyui" key layout, its
    floating-point weights cast to `dtype` when given (torch.float8_e4m3fn for an fp8 file)."""
    if layout not in ("bfl", "comfyui"):
        raise ValueError(f"unknown single-file layout {layout!r}: use 'bfl' or 'comfyui'")
    state = to_bfl({k: v.detach().cpu() for k, v in transformer.state_dict().items()})
    if dtype is not None:
        state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}
    prefix = COMFYUI_PREFIX if layout == "comfyui" else ""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({prefix + k: v.contiguous() for k, v in state.items()}, path)
    return path
