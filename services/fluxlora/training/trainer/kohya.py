"""The LoRA in kohya sd-scripts' FLUX.1 key format, which ComfyUI, Forge and most FLUX tools load.

kohya names modules after Black Forest Labs' original model (`lora_unet_double_blocks_0_img_attn_qkv`)
with `.lora_down.weight` (A), `.lora_up.weight` (B) and `.alpha`. Where BFL fuses layers that
diffusers keeps apart, the LoRAs are fused too:

    double block  img_attn.qkv = to_q | to_k | to_v      txt_attn.qkv = add_q_proj | add_k_proj | add_v_proj
    single block  linear1      = to_q | to_k | to_v | proj_mlp

A fused LoRA stacks the parts' A matrices (rank = sum of the parts' ranks) and puts their B
matrices on the block diagonal; alpha grows with the rank so alpha/rank, the scale, is unchanged.
The delta of every part is exactly its own B A, and a part the run did not train (say proj_mlp
when only attention was targeted) gets zero rows: fusing handles any subset of targets. diffusers'
loader (`_convert_kohya_flux_lora_to_diffusers`) recognises this block-diagonal layout and splits
it back into the separate LoRAs.

The mapping mirrors diffusers' converter, which reads these files back, and ComfyUI's key map
(`lora_unet_` + the BFL module name with "." as "_", applied to `diffusion_model.<name>.weight`);
tests/unit/test_lora_comfyui.py checks every family's file against ComfyUI's rules (docs/lora-files.md).
Every module a preset (targets.py) trains is in the blocks and has its name here:

    double block  attn.to_out.0 img_attn.proj   attn.to_add_out txt_attn.proj
                  ff.net.0.proj img_mlp.0       ff.net.2        img_mlp.2
                  ff_context.net.0.proj txt_mlp.0   ff_context.net.2 txt_mlp.2
                  norm1.linear img_mod.lin      norm1_context.linear txt_mod.lin (named only)
    single block  proj_out linear2   norm.linear modulation.lin (named only)

so a preset's kohya file loads in diffusers with exactly the diffusers file's deltas (tested on
FLUX.1's real widths). Modules outside the blocks (embedders, final layer: reachable only by
naming them, e.g. an old run's plain "proj_out") are written as kohya names them and ComfyUI
applies them, but diffusers' kohya loader (0.42) converts them without the "transformer." prefix
and so drops them: such a LoRA loads in diffusers exactly only from the diffusers-format file. Its
final_layer branch also ignores alpha, so final-layer LoRAs carry their scale in B (alpha = rank).

FLUX.2 (Flux2Transformer2DModel) has the same BFL names for its double blocks (MLPs: ff.linear_in /
linear_out = img_mlp.0 / img_mlp.2, ff_context.* = txt_mlp.*); its single blocks' linear1 / linear2
are fused in diffusers as well (attn.to_qkv_mlp_proj / attn.to_out), so they map one to one, as
diffusers' `_convert_kohya_flux2_lora_to_diffusers` reads them back.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch

PREFIX = "lora_unet_"

_DOUBLE = {
    "attn.to_q": ("img_attn.qkv", 0),
    "attn.to_k": ("img_attn.qkv", 1),
    "attn.to_v": ("img_attn.qkv", 2),
    "attn.add_q_proj": ("txt_attn.qkv", 0),
    "attn.add_k_proj": ("txt_attn.qkv", 1),
    "attn.add_v_proj": ("txt_attn.qkv", 2),
    "attn.to_out.0": ("img_attn.proj", None),
    "attn.to_add_out": ("txt_attn.proj", None),
    "ff.net.0.proj": ("img_mlp.0", None),
    "ff.net.2": ("img_mlp.2", None),
    "ff_context.net.0.proj": ("txt_mlp.0", None),
    "ff_context.net.2": ("txt_mlp.2", None),
    "norm1.linear": ("img_mod.lin", None),
    "norm1_context.linear": ("txt_mod.lin", None),
}
_SINGLE = {
    "attn.to_q": ("linear1", 0),
    "attn.to_k": ("linear1", 1),
    "attn.to_v": ("linear1", 2),
    "proj_mlp": ("linear1", 3),
    "proj_out": ("linear2", None),
    "norm.linear": ("modulation.lin", None),
}
_TOP = {
    "x_embedder": "img_in",
    "context_embedder": "txt_in",
    "time_text_embed.timestep_embedder.linear_1": "time_in.in_layer",
    "time_text_embed.timestep_embedder.linear_2": "time_in.out_layer",
    "time_text_embed.guidance_embedder.linear_1": "guidance_in.in_layer",
    "time_text_embed.guidance_embedder.linear_2": "guidance_in.out_layer",
    "time_text_embed.text_embedder.linear_1": "vector_in.in_layer",
    "time_text_embed.text_embedder.linear_2": "vector_in.out_layer",
    "proj_out": "final_layer.linear",
    "norm_out.linear": "final_layer.adaLN_modulation.1",
}
# FLUX.2 (Flux2Transformer2DModel): BFL's names for the same blocks; the single blocks' fused
# layers are fused in diffusers too (linear1 = attn.to_qkv_mlp_proj, linear2 = attn.to_out), so
# only the double blocks' q/k/v fuse. As diffusers' _convert_kohya_flux2_lora_to_diffusers reads them.
_FLUX2_DOUBLE = {**{k: v for k, v in _DOUBLE.items() if not k.startswith(("ff", "norm1"))},
                 "ff.linear_in": ("img_mlp.0", None), "ff.linear_out": ("img_mlp.2", None),
                 "ff_context.linear_in": ("txt_mlp.0", None), "ff_context.linear_out": ("txt_mlp.2", None)}
_FLUX2_SINGLE = {"attn.to_qkv_mlp_proj": ("linear1", None), "attn.to_out": ("linear2", None)}
_FLUX2_TOP = {"x_embedder": "img_in", "context_embedder": "txt_in",
              "time_guidance_embed.timestep_embedder.linear_1": "time_in.in_layer",
              "time_guidance_embed.timestep_embedder.linear_2": "time_in.out_layer",
              "proj_out": "final_layer.linear"}
_TABLES = {"Flux2Transformer2DModel": (_FLUX2_DOUBLE, _FLUX2_SINGLE, _FLUX2_TOP)}
_FINAL_LAYER = "final_layer."
_SHIFT_SCALE = "final_layer.adaLN_modulation.1"  # BFL: (shift, scale); diffusers: (scale, shift)


@dataclass(frozen=True)
class _Target:
    bfl: str  # BFL module name, e.g. "double_blocks.0.img_attn.qkv"
    part: int | None  # index within a fused layer


def kohya_state_dict(
    lora: Mapping[str, torch.Tensor], alpha: float, transformer_config: Mapping
) -> dict[str, torch.Tensor]:
    """kohya-format tensors for a diffusers/peft FLUX LoRA state dict (keys
    `[transformer.]<module>.lora_A.weight` / `.lora_B.weight`), trained with scale alpha / rank.

    Raises ValueError naming any LoRA module that has no kohya name.
    """
    modules: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in lora.items():
        name = key.removeprefix("transformer.")
        for kind in ("lora_A", "lora_B"):
            suffix = f".{kind}.weight"
            if name.endswith(suffix):
                modules.setdefault(name[: -len(suffix)], {})[kind] = tensor
    tables = _TABLES.get(transformer_config.get("_class_name", ""), (_DOUBLE, _SINGLE, _TOP))
    unmapped = [m for m in modules if _target(m, *tables) is None]
    if unmapped:
        raise ValueError(
            f"no kohya name for LoRA modules {', '.join(sorted(unmapped))}: only the transformer's block "
            "linear layers, embedders and final layer can be exported"
        )

    fused: dict[str, dict[int, tuple[torch.Tensor, torch.Tensor]]] = {}
    out: dict[str, torch.Tensor] = {}
    for module, weights in sorted(modules.items()):
        target = _target(module, *tables)
        down, up = weights["lora_A"], weights["lora_B"]
        if target.part is not None:
            fused.setdefault(target.bfl, {})[target.part] = (down, up)
            continue
        module_alpha = alpha
        if target.bfl.startswith(_FINAL_LAYER):  # the scale goes into B: diffusers ignores this alpha
            up, module_alpha = up * (alpha / down.shape[0]), float(down.shape[0])
        if target.bfl == _SHIFT_SCALE:
            up = torch.cat(up.chunk(2, dim=0)[::-1])
        _put(out, target.bfl, down, up, module_alpha)

    for bfl, parts in fused.items():
        dims = _part_dims(bfl, transformer_config)
        down, up, fused_alpha = _fuse(parts, dims, alpha)
        _put(out, bfl, down, up, fused_alpha)
    return out


def _fuse(parts: dict[int, tuple[torch.Tensor, torch.Tensor]], dims: list[int],
          alpha: float) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Stack the A matrices, put the B matrices on the block diagonal; alpha keeps alpha/rank."""
    present = sorted(parts)
    ranks = [parts[p][0].shape[0] for p in present]
    down = torch.cat([parts[p][0] for p in present])
    reference = parts[present[0]][1]
    up = torch.zeros(sum(dims), sum(ranks), dtype=reference.dtype, device=reference.device)
    row_starts = [sum(dims[:i]) for i in range(len(dims))]
    column = 0
    uniform = len(set(ranks)) == 1
    for part, rank in zip(present, ranks, strict=True):
        block = parts[part][1]
        if not uniform:  # one alpha cannot carry several scales: put each part's scale in B
            block = block * (alpha / rank)
        up[row_starts[part]: row_starts[part] + dims[part], column: column + rank] = block
        column += rank
    fused_alpha = alpha * sum(ranks) / ranks[0] if uniform else float(sum(ranks))
    return down, up, fused_alpha


def _part_dims(bfl: str, config: Mapping) -> list[int]:
    inner = config["num_attention_heads"] * config["attention_head_dim"]
    if bfl.endswith("linear1"):
        return [inner, inner, inner, inner * 4]  # FluxSingleTransformerBlock's mlp_ratio is 4
    return [inner, inner, inner]


def _put(out: dict[str, torch.Tensor], bfl: str, down: torch.Tensor, up: torch.Tensor, alpha: float) -> None:
    key = PREFIX + bfl.replace(".", "_")
    out[f"{key}.lora_down.weight"] = down.contiguous()
    out[f"{key}.lora_up.weight"] = up.contiguous()
    out[f"{key}.alpha"] = torch.tensor(alpha, dtype=torch.float32)


def _target(module: str, double: Mapping = _DOUBLE, single: Mapping = _SINGLE, top: Mapping = _TOP) -> _Target | None:
    for block_list, table, bfl_list in (("transformer_blocks", double, "double_blocks"),
                                        ("single_transformer_blocks", single, "single_blocks")):
        head = block_list + "."
        if module.startswith(head):
            index, _, rest = module[len(head):].partition(".")
            if not index.isdigit() or rest not in table:
                return None
            name, part = table[rest]
            return _Target(f"{bfl_list}.{index}.{name}", part)
    if module in top:
        return _Target(top[module], None)
    return None
