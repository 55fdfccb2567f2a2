"""The frozen linear layers of the transformer blocks (~99% of FLUX.1's weights), stored to save GPU
memory: in 8 bits (base_quantization) and/or in CPU memory (blocks_to_swap), made ready for each use.

8-bit: one byte per weight (fp8 e4m3 or int8) with a scale per output channel, upcast to the
compute dtype for each use.

This is weight-only quantisation as kohya sd-scripts' fp8_base does it, plus per-channel scales:
FLUX.1's weights are small (std ~0.02), and cast to e4m3 as they are many land among its
subnormals. Scaling each row onto e4m3's range first keeps 3 mantissa bits for every weight.
The matmul itself runs in the compute dtype (bf16 on a GPU), so every GPU with bf16 runs it.
Run eagerly, the upcast and the scaling are two elementwise kernels per layer and use (~14% of an
fp8 step at 1024 on an H100); compile_blocks has torch.compile fuse them into each block's graph.

The upcast copy is what the backward pass keeps for the input gradient, so an 8-bit base saves
memory only with gradient checkpointing, where a block's copies live during its recomputation alone.
The memory planner quantises its meta-device transformer with this same code. An fp8 single-file
base's blocks arrive 8-bit already, the file's own bytes (models.single_file_fp8, FrozenLinear.from_weight).

Swapped blocks (kohya sd-scripts' count: blocks_to_swap // 2 double-stream blocks and twice the
rest in single-stream blocks, the last ones of each list) keep their linear weights in pinned CPU
memory and copy them to the GPU for each use. The copy is a fresh tensor, so like the 8-bit upcast
it is what autograd keeps and frees: with gradient checkpointing a block's weights are on the GPU
only while the block runs or is recomputed. The copies are synchronous (no prefetch yet), so each
swapped block costs its weights' transfer twice per step (forward and recompute).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

QUANTIZED_DTYPES: dict[str, torch.dtype] = {"fp8": torch.float8_e4m3fn, "int8": torch.int8}
_LARGEST = {"fp8": torch.finfo(torch.float8_e4m3fn).max, "int8": 127.0}
BLOCK_LISTS = ("transformer_blocks", "single_transformer_blocks")


class FrozenLinear(torch.nn.Linear):
    """A frozen nn.Linear stored to save GPU memory; peft wraps it like any Linear.

    kind "fp8"/"int8": the weight in 8 bits with per-row scales (weight_scale); "none": as loaded.
    swapped: the weight lives in (pinned) CPU memory, outside the module's parameters so that
    module.to(device) leaves it there, and is copied to the input's device for each use."""

    weight_scale: torch.Tensor | None

    @classmethod
    def from_linear(cls, linear: torch.nn.Linear, kind: str, compute_dtype: torch.dtype,
                    device: torch.device | None = None, swapped: bool = False) -> FrozenLinear:
        if kind not in QUANTIZED_DTYPES and kind != "none":
            raise ValueError(f"unknown base quantisation {kind!r}; use none, {', '.join(QUANTIZED_DTYPES)}")
        weight = linear.weight.detach()
        weight = weight.to(device if device is not None else weight.device)
        scale = None
        if kind != "none":
            weight, scale = quantize_rows(weight, kind)
        return cls.from_weight(weight, scale, linear.bias, kind, compute_dtype, swapped)

    @classmethod
    def from_weight(cls, weight: torch.Tensor, scale: torch.Tensor | None, bias: torch.Tensor | None, kind: str,
                    compute_dtype: torch.dtype, swapped: bool = False) -> FrozenLinear:
        """The layer of a weight already stored as `kind` ((out, in); 8-bit with its per-row scale
        of shape (out, 1)): models.single_file_fp8 passes an fp8 file's own bytes."""
        # Skip nn.Linear.__init__: it would allocate and initialise a full-precision weight.
        module = cls.__new__(cls)
        torch.nn.Module.__init__(module)
        module.out_features, module.in_features = weight.shape
        module.kind, module.compute_dtype, module.swapped = kind, compute_dtype, False
        module.register_buffer("weight_scale", None if scale is None else scale.to(weight.device, compute_dtype))
        module.weight = torch.nn.Parameter(weight.detach(), requires_grad=False)
        if bias is not None:
            bias = torch.nn.Parameter(bias.detach().to(weight.device, compute_dtype), requires_grad=False)
        module.bias = bias
        if swapped:
            module.swap_to_host()
        return module

    def swap_to_host(self) -> None:
        """Keep the weight in (pinned) CPU memory from now on, copied to the input's device for each use."""
        if self.swapped:
            return
        weight = self.weight.detach()
        self.register_parameter("weight", None)
        self.host_weight = _to_host(weight)
        self.swapped = True

    def weight_for(self, device: torch.device) -> torch.Tensor:
        """The weight, in the compute dtype, on `device`: a fresh tensor when swapped or 8-bit."""
        weight = self.host_weight.to(device, non_blocking=True) if self.swapped else self.weight
        if self.kind == "none":
            return weight.to(self.compute_dtype)
        return weight.to(self.compute_dtype) * self.weight_scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight_for(x.device), self.bias)

    def extra_repr(self) -> str:
        where = ", swapped to CPU" if self.swapped else ""
        return (f"in_features={self.in_features}, out_features={self.out_features}, weights={self.kind}, "
                f"compute={self.compute_dtype}{where}")


def _to_host(weight: torch.Tensor) -> torch.Tensor:
    host = weight.to("cpu")
    # Pinned memory makes the per-use copy asynchronous and about twice as fast; it needs CUDA.
    return host.pin_memory() if torch.cuda.is_available() else host


def quantize_rows(weight: torch.Tensor, kind: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(8-bit weight, per-row scale of shape (out, 1)) with weight ~= q.float() * scale."""
    w = weight.float()
    scale = (w.abs().amax(dim=1, keepdim=True) / _LARGEST[kind]).clamp(min=torch.finfo(torch.float32).tiny)
    scaled = w / scale
    if kind == "int8":
        scaled = scaled.round().clamp(-127, 127)
    return scaled.to(QUANTIZED_DTYPES[kind]), scale


def frozen_linears(transformer: torch.nn.Module) -> list[tuple[torch.nn.Module, str, str]]:
    """(parent, attribute, block name) of the frozen linear layers of the transformer blocks.
    Embedders, norms and the LoRA layers themselves stay as they are."""
    found = []
    for name, module in transformer.named_modules():
        if not name.startswith(BLOCK_LISTS) or ".lora_" in name:
            continue
        for child_name, child in module.named_children():
            if type(child) is torch.nn.Linear and not child.weight.requires_grad:
                found.append((module, child_name, ".".join(name.split(".")[:2])))
    return found


def swapped_block_counts(blocks_to_swap: int) -> tuple[int, int]:
    """(double, single) blocks kept in CPU memory, counted as kohya sd-scripts does for FLUX.1."""
    double = blocks_to_swap // 2
    return double, (blocks_to_swap - double) * 2


def max_blocks_to_swap(num_double: int, num_single: int) -> int:
    """kohya keeps at least two blocks of each kind on the GPU (35 on FLUX.1)."""
    best = 0
    for n in range(1, num_double + num_single + 1):
        double, single = swapped_block_counts(n)
        if double <= num_double - 2 and single <= num_single - 2:
            best = n
    return best


def swap_plan(blocks_to_swap: int, num_double: int, num_single: int) -> tuple[int, int]:
    """(double, single) blocks to keep in CPU memory on a model with that many blocks of each kind;
    ValueError naming the most it allows."""
    allowed = max_blocks_to_swap(num_double, num_single)
    if blocks_to_swap > allowed:
        raise ValueError(f"blocks_to_swap={blocks_to_swap} is more than this model allows ({allowed}: at least "
                         "two blocks of each kind stay on the GPU)")
    return swapped_block_counts(blocks_to_swap)


def swapped_block_names(transformer: torch.nn.Module, blocks_to_swap: int) -> set[str]:
    """Names of the blocks to keep in CPU memory: the last ones of each list."""
    if not blocks_to_swap:
        return set()
    num_double, num_single = (len(getattr(transformer, name)) for name in BLOCK_LISTS)
    double, single = swap_plan(blocks_to_swap, num_double, num_single)
    return ({f"transformer_blocks.{i}" for i in range(num_double - double, num_double)}
            | {f"single_transformer_blocks.{i}" for i in range(num_single - single, num_single)})


def freeze_base(transformer: torch.nn.Module, kind: str, compute_dtype: torch.dtype,
                device: torch.device | None = None, blocks_to_swap: int = 0) -> int:
    """Replace the blocks' frozen linear layers by FrozenLinear where they are quantised or
    swapped, one at a time, each made on `device` (so a GPU never holds more than one
    full-precision layer beyond what stays). Returns how many layers were replaced."""
    swapped = swapped_block_names(transformer, blocks_to_swap)
    for name, module in transformer.named_modules():
        # Layers loaded 8-bit already (an fp8 file's own bytes: models.single_file_fp8) are only swapped.
        if isinstance(module, FrozenLinear) and ".".join(name.split(".")[:2]) in swapped:
            module.swap_to_host()
    replaced = 0
    for parent, attribute, block in frozen_linears(transformer):
        if kind == "none" and block not in swapped:
            continue
        # No reference to the full-precision layer outlives its replacement: freed one by one.
        layer = getattr(parent, attribute)
        setattr(parent, attribute, FrozenLinear.from_linear(layer, kind, compute_dtype, device, block in swapped))
        replaced += 1
    return replaced
