"""8-bit base weights: the frozen linear layers of the transformer blocks stored in one byte per
weight (fp8 e4m3 or int8) with a scale per output channel, upcast to the compute dtype for each use.

This is weight-only quantisation as kohya sd-scripts' fp8_base does it, plus per-channel scales:
FLUX.1's weights are small (std ~0.02), and cast to e4m3 as they are many land among its
subnormals. Scaling each row onto e4m3's range first keeps 3 mantissa bits for every weight.
The matmul itself runs in the compute dtype (bf16 on a GPU), so every GPU with bf16 runs it.
Run eagerly, the upcast and the scaling are two elementwise kernels per layer and use (~14% of an
fp8 step at 1024 on an H100); compile_blocks has torch.compile fuse them into each block's graph.

The upcast copy is what the backward pass keeps for the input gradient, so an 8-bit base saves
memory only with gradient checkpointing, where a block's copies live during its recomputation alone.
The memory planner quantises its meta-device transformer with this same code.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from fluxlora.training.trainer.config import BaseQuantization

QUANTIZED_DTYPES: dict[str, torch.dtype] = {"fp8": torch.float8_e4m3fn, "int8": torch.int8}
_LARGEST = {"fp8": torch.finfo(torch.float8_e4m3fn).max, "int8": 127.0}
BLOCK_LISTS = ("transformer_blocks", "single_transformer_blocks")


class Linear8bit(torch.nn.Linear):
    """A frozen nn.Linear whose weight is stored in 8 bits; peft wraps it like any Linear."""

    weight_scale: torch.Tensor

    @classmethod
    def from_linear(cls, linear: torch.nn.Linear, kind: str, compute_dtype: torch.dtype,
                    device: torch.device | None = None) -> Linear8bit:
        if kind not in QUANTIZED_DTYPES:
            raise ValueError(f"unknown base quantisation {kind!r}; use one of {', '.join(QUANTIZED_DTYPES)}")
        # Skip nn.Linear.__init__: it would allocate and initialise a full-precision weight.
        module = cls.__new__(cls)
        torch.nn.Module.__init__(module)
        module.in_features, module.out_features = linear.in_features, linear.out_features
        module.kind, module.compute_dtype = kind, compute_dtype
        weight = linear.weight.detach().to(device) if device is not None else linear.weight.detach()
        quantized, scale = quantize_rows(weight, kind)
        module.weight = torch.nn.Parameter(quantized, requires_grad=False)
        module.register_buffer("weight_scale", scale.to(compute_dtype))
        bias = linear.bias
        if bias is not None:
            bias = torch.nn.Parameter(bias.detach().to(device or bias.device, compute_dtype), requires_grad=False)
        module.bias = bias
        return module

    def dequantized_weight(self) -> torch.Tensor:
        return self.weight.to(self.compute_dtype) * self.weight_scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.dequantized_weight(), self.bias)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, weights={self.kind}, compute={self.compute_dtype}"


def quantize_rows(weight: torch.Tensor, kind: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(8-bit weight, per-row scale of shape (out, 1)) with weight ~= q.float() * scale."""
    w = weight.float()
    scale = (w.abs().amax(dim=1, keepdim=True) / _LARGEST[kind]).clamp(min=torch.finfo(torch.float32).tiny)
    scaled = w / scale
    if kind == "int8":
        scaled = scaled.round().clamp(-127, 127)
    return scaled.to(QUANTIZED_DTYPES[kind]), scale


def quantizable_linears(transformer: torch.nn.Module) -> list[tuple[torch.nn.Module, str]]:
    """(parent, attribute) of the frozen linear layers of the transformer blocks: ~99% of
    FLUX.1's weights. Embedders, norms and the LoRA layers themselves stay as they are."""
    found = []
    for name, module in transformer.named_modules():
        if not name.startswith(BLOCK_LISTS) or ".lora_" in name:
            continue
        for child_name, child in module.named_children():
            if type(child) is torch.nn.Linear and not child.weight.requires_grad:
                found.append((module, child_name))
    return found


def quantize_base(transformer: torch.nn.Module, kind: BaseQuantization, compute_dtype: torch.dtype,
                  device: torch.device | None = None) -> int:
    """Replace the blocks' frozen linear layers by Linear8bit, one at a time, each quantised on
    `device` (where it then stays), so a GPU never holds more than one full-precision layer.
    Returns how many layers were quantised (0 for kind "none")."""
    if kind == "none":
        return 0
    layers = quantizable_linears(transformer)
    for parent, attribute in layers:
        # No reference to the full-precision layer outlives its replacement: freed one by one.
        setattr(parent, attribute, Linear8bit.from_linear(getattr(parent, attribute), kind, compute_dtype, device))
    return len(layers)
