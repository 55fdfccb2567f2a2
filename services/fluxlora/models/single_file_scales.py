"""ComfyUI's "scaled fp8" single files: each fp8 weight stored divided by a scale, the scale beside it.

Two conventions, both read from ComfyUI's own loader (comfy/model_detection.py, comfy/utils.py
convert_old_quants, comfy/ops.py mixed_precision_ops):
- scaled fp8 (e.g. flux_dev_fp8_scaled_diffusion_model.safetensors): a `scaled_fp8` marker tensor
  (its dtype the weights' fp8 dtype), and per layer `<layer>.scale_weight`, one float32 number,
  plus `<layer>.scale_input` for fp8 matmuls;
- the newer mixed-precision layout that ComfyUI converts the first into: per layer
  `<layer>.weight_scale` and `<layer>.comfy_quant` (JSON bytes such as {"format": "float8_e4m3fn"},
  or the same in the header's `_quantization_metadata`), plus `<layer>.input_scale`.
Either way the weight meant is `weight.float() * scale`. fluxlora reads both where every scale is one
number for a whole fp8 weight; ComfyUI's other formats (nvfp4, int8, block scales) are refused,
naming the file and the fix. Input scales only matter to fp8 matmuls, which fluxlora does not run.
"""

from __future__ import annotations

import json

import torch

from fluxlora.models.single_file import SingleFileError

MARKER = "scaled_fp8"
_SCALES = ("scale_weight", "weight_scale")
_UNUSED = ("scale_input", "input_scale", "comfy_quant")
_FP8 = (torch.float8_e4m3fn, torch.float8_e5m2)
_FP8_FORMATS = ("float8_e4m3fn", "float8_e5m2")
_HEADER_DTYPES = {"F8_E4M3": "torch.float8_e4m3fn", "F8_E5M2": "torch.float8_e5m2"}  # safetensors' -> torch's
_FIX = ("use the model in bf16, or in fp8 (float8_e4m3fn) plain or scaled as ComfyUI's "
        "flux1-dev-fp8.safetensors and flux_dev_fp8_scaled_diffusion_model.safetensors are")


def split_scales(state: dict[str, torch.Tensor], where: str) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(the file's weights without ComfyUI's quantisation entries, {weight key: its scale as a 0-d
    float32}); SingleFileError naming `where` for a quantisation fluxlora cannot read."""
    weights: dict[str, torch.Tensor] = {}
    scales: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        layer, _, name = key.rpartition(".")
        if name in _SCALES:
            scales[f"{layer}.weight"] = value
        elif name == "comfy_quant":
            _check_format(value, layer, where)
        elif name != MARKER and name not in _UNUSED:
            weights[key] = value
    for key, scale in scales.items():
        weight = weights.get(key)
        _check_scale(key, None if weight is None else str(weight.dtype), scale.numel(), where)
    return weights, {key: scale.detach().float().reshape(()) for key, scale in scales.items()}


def check_header_scales(header: dict[str, dict], where: str) -> None:
    """split_scales' refusals from a safetensors header alone (dtypes and shapes), so that a file
    quantised in a way fluxlora cannot read is refused when a job is submitted, not when it loads.
    (ComfyUI's nvfp4 and int8 weights are stored as U8/I8, so their scales name a non-fp8 weight.)"""
    for key, entry in header.items():
        layer, _, name = key.rpartition(".")
        if name in _SCALES:
            weight = header.get(f"{layer}.weight")
            count = 1
            for dim in entry.get("shape", []):
                count *= dim
            _check_scale(f"{layer}.weight", None if weight is None else _HEADER_DTYPES.get(weight.get("dtype", ""),
                                                                                          weight.get("dtype", "")),
                         count, where)


def _check_scale(key: str, weight_dtype: str | None, count: int, where: str) -> None:
    fp8 = weight_dtype is not None and weight_dtype.removeprefix("torch.") in _FP8_FORMATS
    if fp8 and count == 1:
        return
    what = "no weight" if weight_dtype is None else f"a {weight_dtype} weight" if not fp8 \
        else f"{count} scales (block-wise)"
    raise SingleFileError(f"the base model file {where} has a quantisation scale for {key} with {what}; "
                          f"fluxlora reads one scale per fp8 weight (ComfyUI's scaled fp8): {_FIX}")


def dequantize_scaled(state: dict[str, torch.Tensor], where: str, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The file's weights as meant: scaled fp8 weights times their scale, in `dtype`; a file with
    no scales comes back as it is, without its quantisation entries."""
    weights, scales = split_scales(state, where)
    for key, scale in scales.items():
        weights[key] = (weights[key].float() * scale).to(dtype)
    return weights


def _check_format(value: torch.Tensor, layer: str, where: str) -> None:
    try:
        found = json.loads(bytes(value.to(torch.uint8).tolist())).get("format")
    except (ValueError, AttributeError):
        found = "unreadable"
    if found not in _FP8_FORMATS:
        raise SingleFileError(f"the base model file {where} stores {layer} as {found!r} (ComfyUI's mixed-precision "
                              f"quantisation), which fluxlora cannot load: {_FIX}")
