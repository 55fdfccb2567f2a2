"""An fp8 single-file transformer kept 8-bit: its blocks' weights go from the file's bytes straight
into the trainer's 8-bit base layers, with no full-precision copy of the transformer on the way.

A base model held as one fp8 file (float8_e4m3fn, as ComfyUI's flux1-dev-fp8.safetensors: ~12 GB for
FLUX.1's 12B parameters) loaded for an 8-bit base (base_quantization "fp8") used to be upcast whole
to the compute dtype for diffusers' from_single_file (~24 GB in bf16 beside the file's 12 GB), then
quantised again, layer by layer, into models.base_layers' FrozenLinear. Here instead:
- the file's fp8 tensors pass through diffusers' own key converter (models.single_file_load
  .to_diffusers_state) as uint8: converters only rename, split, concatenate and chunk, which move
  bytes and never read them as numbers (and the CPU has no fp8 kernels for torch.cat);
- the transformer is built on the meta device (no memory), then each frozen linear layer of its blocks
  (the layers the trainer stores 8-bit: base_layers.frozen_linears) becomes a FrozenLinear of kind
  fp8 holding the file's bytes as they are, with a scale of 1 per row: the weight it computes with is
  exactly the file's, with no second rounding (re-quantising the upcast weights per row would round
  each weight again, ~1e-3 relative);
- every other weight (embedders, norms, the final layer's modulation, any block weight the file holds
  in full precision) is upcast to the compute dtype as the upcast path does, and assigned in place.
A ComfyUI "scaled fp8" file (models.single_file_scales: a scale per weight) keeps its bytes the same way,
its scale becoming that layer's per-row scale (in the compute dtype, as the 8-bit base's own scales are).

The rest is the 8-bit base as the trainer makes it: the LoRA wraps these layers as it wraps the ones
freeze_base makes, and blocks_to_swap moves them to CPU memory. Other base_quantization values, and
fp8 files in e5m2, take the upcast path (models.single_file_load) unchanged.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from safetensors.torch import load_file

from fluxlora.models.base_layers import FrozenLinear, frozen_linears
from fluxlora.models.families import Family
from fluxlora.models.single_file import SingleFileError, SingleFileModel
from fluxlora.models.single_file_load import to_diffusers_state
from fluxlora.models.single_file_scales import split_scales

log = logging.getLogger(__name__)

KEPT_DTYPE = torch.float8_e4m3fn  # the 8-bit base's fp8 (models.base_layers.QUANTIZED_DTYPES["fp8"])


def keeps_fp8(model: SingleFileModel, base_quantization: str) -> bool:
    """Whether `model`'s file loads with its blocks' fp8 weights kept as they are."""
    return base_quantization == "fp8" and model.dtype == "F8_E4M3"


def load_fp8_transformer(path: Path, model: SingleFileModel, family: Family, config_dir: Path,
                         dtype: torch.dtype) -> torch.nn.Module:
    """The transformer in the fp8 file `path` as `family`'s diffusers class, its blocks' fp8 linear
    weights kept 8-bit (FrozenLinear kind fp8) and everything else in `dtype`, with
    config_dir/transformer/config.json as its config, updated with what the file's shapes fix."""
    # pread, not mmap: each tensor its own memory, freed as the converter replaces it; a mapped file stays
    # resident whole while any weight kept as it is still points into it (bench/single_file_fp8_memory.py).
    weights, scales = split_scales(load_file(str(path), backend="pread"), str(path))
    if any(tensor.dtype == torch.uint8 for tensor in weights.values()):  # would be taken for fp8 bytes below
        raise SingleFileError(f"the base model file {path} holds uint8 tensors, which no FLUX transformer has: "
                              "use the transformer's own file, such as ComfyUI's flux1-dev-fp8.safetensors")
    rows = _row_scales(weights, scales) if scales else {}
    state = {key: _as_bytes(key, tensor, scales, dtype) for key, tensor in weights.items()}
    del weights
    state = to_diffusers_state(state, model, family)
    rows = to_diffusers_state(rows, model, family) if rows else {}
    transformer = _empty_transformer(family, config_dir, model)
    kept = _keep_block_linears(transformer, state, rows, dtype)
    _assign(transformer, {key: _upcast(tensor, rows.get(key), dtype) for key, tensor in state.items()}, path)
    log.info("loaded the fp8 single-file %s transformer %s (%s layout): %d block linear layers kept 8-bit%s, "
             "the rest as %s", family.name, path, model.layout, kept, " with the file's scales" if scales else "",
             dtype)
    return transformer


def _as_bytes(key: str, tensor: torch.Tensor, scales: dict[str, torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
    """e4m3 tensors as their bytes; any other floating tensor (bf16 norms, an e5m2 one) in `dtype`, as meant."""
    if tensor.dtype == KEPT_DTYPE:
        return tensor.view(torch.uint8)
    if key in scales:
        return (tensor.float() * scales[key]).to(dtype)
    return tensor.to(dtype) if tensor.is_floating_point() else tensor


def _row_scales(weights: dict[str, torch.Tensor], scales: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A (rows, 1) float32 scale for every tensor (1 for unscaled ones): converted with the weights,
    row for row, it gives each diffusers weight the scale of the file's weight its rows come from."""
    rows = {}
    for key, tensor in weights.items():
        count = tensor.shape[0] if tensor.dim() else 1
        scale = scales.get(key) if tensor.dtype == KEPT_DTYPE else None  # others are applied in _as_bytes
        rows[key] = torch.ones(count, 1) if scale is None else scale.expand(count, 1).clone()
    return rows


def _empty_transformer(family: Family, config_dir: Path, model: SingleFileModel) -> torch.nn.Module:
    from accelerate import init_empty_weights

    config = dict(family.transformer_class.load_config(config_dir, subfolder="transformer", local_files_only=True))
    config.update(model.config)
    with init_empty_weights():  # parameters on the meta device: nothing allocated until assigned
        transformer = family.transformer_class.from_config(config)
    return transformer.requires_grad_(False).eval()


def _keep_block_linears(transformer: torch.nn.Module, state: dict[str, torch.Tensor], rows: dict[str, torch.Tensor],
                        dtype: torch.dtype) -> int:
    """Replace each frozen block linear whose weight the file holds in e4m3 by a FrozenLinear of those
    bytes, taking its weight (and bias) out of `state`; returns how many."""
    names = {id(module): name for name, module in transformer.named_modules()}
    kept = 0
    for parent, attribute, _block in frozen_linears(transformer):
        prefix = f"{names[id(parent)]}.{attribute}"
        weight = state.get(f"{prefix}.weight")
        if weight is None or weight.dtype != torch.uint8:
            continue  # held in full precision by the file: loaded as the rest, quantised as the base is
        layer = getattr(parent, attribute)
        if tuple(weight.shape) != (layer.out_features, layer.in_features):
            raise SingleFileError(f"{prefix}.weight is {tuple(weight.shape)} in the file but the transformer "
                                  f"expects {(layer.out_features, layer.in_features)}")
        del state[f"{prefix}.weight"]
        scale = rows.get(f"{prefix}.weight")
        scale = torch.ones(weight.shape[0], 1) if scale is None else scale
        bias = state.pop(f"{prefix}.bias", None)
        bias = None if bias is None else _upcast(bias, None, dtype)
        setattr(parent, attribute, FrozenLinear.from_weight(weight.view(KEPT_DTYPE), scale, bias, "fp8", dtype))
        kept += 1
    return kept


def _upcast(tensor: torch.Tensor, rows: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
    if tensor.dtype == torch.uint8:
        tensor = tensor.view(KEPT_DTYPE)
    if not tensor.is_floating_point():
        return tensor
    if rows is not None and tensor.dim() and not bool((rows == 1).all()):
        return (tensor.float() * rows.reshape(-1, *[1] * (tensor.dim() - 1))).to(dtype)
    return tensor.to(dtype)


def _assign(transformer: torch.nn.Module, state: dict[str, torch.Tensor], path: Path) -> None:
    """Put `state`'s tensors in place of the meta ones; SingleFileError if any weight is still missing."""
    unexpected = transformer.load_state_dict(state, strict=False, assign=True).unexpected_keys
    missing = [name for name, tensor in [*transformer.named_parameters(), *transformer.named_buffers()]
               if tensor.is_meta]
    if missing:
        raise SingleFileError(f"the base model file {path} lacks {len(missing)} of the transformer's weights "
                              f"({', '.join(missing[:3])}, ...): use the whole transformer's file")
    if unexpected:
        log.warning("the base model file %s has %d tensors its transformer does not use: %s", path, len(unexpected),
                    ", ".join(unexpected[:5]))
