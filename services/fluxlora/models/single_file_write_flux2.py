"""A FLUX.2 [dev]/[klein] transformer's diffusers state dict in Black Forest Labs' key layout (as
flux2-dev.safetensors holds it): the inverse of diffusers' convert_flux2_transformer_checkpoint_to_diffusers
(diffusers/loaders/single_file_utils.py), for models.single_file_write.

FLUX.2's blocks have no biases and no modulation of their own (three shared modulation layers
feed them all); a double block's q/k/v are fused per stream (img_attn.qkv, txt_attn.qkv) and a
single block's q/k/v and MLP input are one layer in both layouts (linear1)."""

from __future__ import annotations

import torch

# diffusers name -> BFL name, within a double block (transformer_blocks.{i} <-> double_blocks.{i}).
_DOUBLE = {
    "attn.norm_q": "img_attn.norm.query_norm", "attn.norm_k": "img_attn.norm.key_norm",
    "attn.norm_added_q": "txt_attn.norm.query_norm", "attn.norm_added_k": "txt_attn.norm.key_norm",
    "attn.to_out.0": "img_attn.proj", "attn.to_add_out": "txt_attn.proj",
    "ff.linear_in": "img_mlp.0", "ff.linear_out": "img_mlp.2",
    "ff_context.linear_in": "txt_mlp.0", "ff_context.linear_out": "txt_mlp.2",
}
_SINGLE = {"attn.to_qkv_mlp_proj": "linear1", "attn.to_out": "linear2", "attn.norm_q": "norm.query_norm",
           "attn.norm_k": "norm.key_norm"}
_TOP = {
    "x_embedder": "img_in", "context_embedder": "txt_in", "proj_out": "final_layer.linear",
    "time_guidance_embed.timestep_embedder.linear_1": "time_in.in_layer",
    "time_guidance_embed.timestep_embedder.linear_2": "time_in.out_layer",
    "time_guidance_embed.guidance_embedder.linear_1": "guidance_in.in_layer",
    "time_guidance_embed.guidance_embedder.linear_2": "guidance_in.out_layer",
    "double_stream_modulation_img.linear": "double_stream_modulation_img.lin",
    "double_stream_modulation_txt.linear": "double_stream_modulation_txt.lin",
    "single_stream_modulation.linear": "single_stream_modulation.lin",
}
_NORMS = ("norm_q", "norm_k", "norm_added_q", "norm_added_k")


def is_flux2_state(state: dict[str, torch.Tensor]) -> bool:
    return "single_stream_modulation.linear.weight" in state


def flux2_to_bfl(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A FLUX.2 transformer's diffusers state dict in BFL's key layout."""
    rest = dict(state)
    out: dict[str, torch.Tensor] = {}
    doubles = {int(k.split(".")[1]) for k in state if k.startswith("transformer_blocks.")}
    for i in doubles:
        d, b = f"transformer_blocks.{i}.", f"double_blocks.{i}."
        out[f"{b}img_attn.qkv.weight"] = torch.cat([rest.pop(f"{d}attn.to_{x}.weight") for x in "qkv"])
        out[f"{b}txt_attn.qkv.weight"] = torch.cat([rest.pop(f"{d}attn.add_{x}_proj.weight") for x in "qkv"])
    # diffusers' AdaLayerNormContinuous splits (scale, shift), BFL's final layer (shift, scale).
    scale, shift = rest.pop("norm_out.linear.weight").chunk(2, dim=0)
    out["final_layer.adaLN_modulation.1.weight"] = torch.cat([shift, scale])
    for key, tensor in rest.items():
        out[_bfl_name(key)] = tensor
    return out


def _bfl_name(key: str) -> str:
    module, kind = key.rsplit(".", 1)
    if module.endswith(_NORMS):
        kind = "scale"  # BFL's RMSNorm weight
    for prefix, bfl, table in (("transformer_blocks.", "double_blocks.", _DOUBLE),
                               ("single_transformer_blocks.", "single_blocks.", _SINGLE)):
        if module.startswith(prefix):
            index, name = module[len(prefix):].split(".", 1)
            return f"{bfl}{index}.{table[name]}.{kind}"
    return f"{_TOP[module]}.{kind}"
