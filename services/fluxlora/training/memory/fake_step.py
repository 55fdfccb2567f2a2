"""One training step of the real architecture on fake tensors: the bytes it would hold at its peak.

The transformer is built on the meta device (no weights), given the run's LoRA by the trainer's
own prepare_transformer, its parameters turned into FakeTensors, and the trainer's own
flow_matching_loss / backward / apply_gradients run under FakeTensorMode while LiveBytes counts
the storages alive.

Every block of a kind adds the same bytes to a step (its weights, LoRA, gradients, optimizer state
and the activations it keeps for the backward pass), so the step is measured on a model PROBE_BLOCKS
blocks deep and on one a block deeper of each kind, and the full depth extrapolated from the
differences, part by part of the step (segments.py: forward, backward and optimizer, at the first
and last block of each kind). The result is the full model's fake step to the byte on FLUX.1 and
FLUX.2, within 16 KiB on Chroma (tests/unit/test_memory_depth.py; bench/planner_depth.py on the
full-size models), at a fraction of its cost: ~4 s instead of ~10-17 s for FLUX.1 on a loaded
2-core machine, which matters because a submit waits for its plan.

Fakes live on the CPU device: faking "cuda" tensors without CUDA kills the process in autograd.
CPU SDPA picks the flash kernel for unmasked bf16 attention, which, like CUDA's flash and
memory-efficient kernels, never stores the L x L score matrix, so attention costs the same.
"""

from __future__ import annotations

import dataclasses
import logging
import time
import types
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch._subclasses.fake_tensor import FakeTensorMode

from fluxlora.models.base_layers import BLOCK_LISTS
from fluxlora.models.families import planning_family
from fluxlora.training.memory.architecture import ModelShape
from fluxlora.training.memory.live_bytes import CUDA_BLOCK_BYTES, LiveBytes
from fluxlora.training.memory.segments import labelled_segments
from fluxlora.training.trainer.config import TrainConfig
from fluxlora.training.trainer.lora import prepare_transformer
from fluxlora.training.trainer.step import HALF_PRECISION, apply_gradients, flow_matching_loss, make_optimizer

log = logging.getLogger(__name__)

PROBE_BLOCKS = 2  # of each kind in the shallowest probe; depth beyond is extrapolated
_DEPTHS = ("num_layers", "num_single_layers")  # the transformer config's block counts


@dataclass(frozen=True)
class StepMemory:
    """Bytes of one steady-state training step (optimizer state already present)."""

    peak_bytes: int  # everything alive at the step's peak, weights included
    weight_bytes: int  # all parameters and buffers (base, quantised or not, and LoRA)
    double_block_bytes: int  # frozen weights of one double-stream block
    single_block_bytes: int  # frozen weights of one single-stream block
    seconds: float  # time the fake step took
    trainable_bytes: int = 0  # the LoRA parameters (fp32), which optimizer state is counted per
    parts: dict[str, int] = field(default_factory=dict)  # the peak of each part of the step (segments.py)


def measure_step(shape: ModelShape, cfg: TrainConfig, dtype: torch.dtype, round_to: int = CUDA_BLOCK_BYTES,
                 probe_blocks: int | None = PROBE_BLOCKS) -> StepMemory:
    """Peak live bytes of one training step of `cfg` (square images at cfg.resolution, the
    largest bucket) on the architecture `shape`, base weights in `dtype`. probe_blocks=None runs
    the whole depth (what the extrapolation is checked against)."""
    started = time.perf_counter()
    depths = {key: int(shape.transformer.get(key, 0)) for key in _DEPTHS}
    probe = {key: depth if probe_blocks is None else min(depth, probe_blocks) for key, depth in depths.items()}
    base = _probe_step(shape, probe, cfg, dtype, round_to)
    total = base
    for key, depth in depths.items():
        if depth > probe[key]:
            deeper = _probe_step(shape, {**probe, key: probe[key] + 1}, cfg, dtype, round_to)
            total = total.plus_blocks(base, deeper, depth - probe[key])
    seconds = time.perf_counter() - started
    log.debug("fake step of %s at %d: peak %.2f GiB in %.1f s", cfg.base_quantization, cfg.resolution,
              total.peak / 2**30, seconds)
    return StepMemory(total.peak, total.weight_bytes, base.double_block_bytes, base.single_block_bytes, seconds,
                      total.trainable_bytes, total.peaks)


@dataclass(frozen=True)
class _Probe:
    """One fake step's bytes: the peak of each part of the step (segments.py) apart, so that every
    figure is affine in the number of blocks of each kind."""

    peaks: dict[str, int]
    weight_bytes: int
    trainable_bytes: int
    double_block_bytes: int
    single_block_bytes: int

    @property
    def peak(self) -> int:
        return max(self.peaks.values())

    def plus_blocks(self, base: _Probe, deeper: _Probe, blocks: int) -> _Probe:
        """This step with `blocks` more of the kind `deeper` has one more of than `base`."""
        def more(mine: int, name: str) -> int:
            return mine + blocks * (getattr(deeper, name) - getattr(base, name))

        # The parts of this step's are the landmarks: a part only the deeper probe has (a middle block) is not.
        peaks = {part: peak + blocks * (deeper.peaks[part] - base.peaks[part]) for part, peak in self.peaks.items()}
        return _Probe(peaks, more(self.weight_bytes, "weight_bytes"), more(self.trainable_bytes, "trainable_bytes"),
                      self.double_block_bytes, self.single_block_bytes)


def _probe_step(shape: ModelShape, depths: dict[str, int], cfg: TrainConfig, dtype: torch.dtype,
                round_to: int) -> _Probe:
    """The fake step of `shape` cut to `depths` blocks of each kind."""
    shallow = dataclasses.replace(shape, transformer={**shape.transformer, **depths})
    transformer = _meta_transformer(shallow, dtype)
    # 8-bit base layers included (the trainer's own FrozenLinear); swapped blocks are the planner's arithmetic.
    prepare_transformer(transformer, cfg.model_copy(update={"blocks_to_swap": 0}))
    if dtype in HALF_PRECISION:
        _layer_norms_in_fp32(transformer)

    fake_mode = FakeTensorMode()
    tracker = LiveBytes(round_to)
    _to_fake(transformer, fake_mode)
    params = [p for p in transformer.parameters() if p.requires_grad]  # the fake ones
    with fake_mode, tracker, labelled_segments(transformer, tracker) as phase:
        for tensor in (*transformer.parameters(), *transformer.buffers()):
            tracker.track(tensor)
        weight_bytes = tracker.live
        blocks = {name: _frozen_bytes(getattr(transformer, name)[0], tracker) if len(getattr(transformer, name))
                  else 0 for name in BLOCK_LISTS}

        trainable_bytes = sum(p.numel() * p.element_size() for p in params)
        # Measured with AdamW (CUDA's default foreach implementation); other optimizers differ only in
        # state per parameter, which the planner adds by arithmetic (OPTIMIZER_STATE_BYTES).
        optimizer = make_optimizer(params, cfg.model_copy(update={"optimizer": "adamw"}), foreach=True)
        scaler = torch.amp.GradScaler("cpu", enabled=False)
        _create_optimizer_state(params, optimizer)
        tracker.reset_peak()

        family = planning_family(shape.family)
        inputs = step_inputs(shape, cfg, dtype)
        # Editing families carry a control image as large as the target: twice the image tokens.
        control = torch.zeros_like(inputs[0]) if family.takes_control_image else None
        phase.forward()
        loss = flow_matching_loss(transformer, *inputs, cfg.guidance, dtype, family=family, control=control)
        phase.backward()
        loss.backward()
        phase.optimizer()
        apply_gradients(params, optimizer, scaler, cfg.max_grad_norm)
    return _Probe(dict(tracker.peaks), weight_bytes, trainable_bytes, blocks["transformer_blocks"],
                  blocks["single_transformer_blocks"])


def _meta_transformer(shape: ModelShape, dtype: torch.dtype) -> torch.nn.Module:
    with torch.device("meta"):
        transformer = planning_family(shape.family).transformer_class.from_config(shape.transformer)
    for param in transformer.parameters():
        param.data = param.data.to(dtype)
    transformer.requires_grad_(False)  # frozen, as load_flux_pipeline leaves the base model
    return transformer


def _layer_norms_in_fp32(transformer: torch.nn.Module) -> None:
    """CUDA autocast runs layer_norm in fp32 (and so keeps fp32 copies for the backward pass);
    CPU autocast, which the fake step runs under, leaves it in bf16. Do as CUDA does."""

    def forward(self, x):
        if torch.is_autocast_enabled(x.device.type) and x.dtype != torch.float32:
            x = x.float()
        return F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)

    for module in transformer.modules():
        if isinstance(module, torch.nn.LayerNorm):
            module.forward = types.MethodType(forward, module)


def _to_fake(transformer: torch.nn.Module, fake_mode: FakeTensorMode) -> None:
    converter = fake_mode.fake_tensor_converter
    cpu = torch.device("cpu")
    for module in transformer.modules():
        for name, param in list(module._parameters.items()):
            if param is not None:
                fake = converter.from_meta_and_device(fake_mode, param.data, cpu)
                module._parameters[name] = torch.nn.Parameter(fake, requires_grad=param.requires_grad)
        for name, buffer in list(module._buffers.items()):
            if buffer is not None:
                module._buffers[name] = converter.from_meta_and_device(fake_mode, buffer, cpu)


def _frozen_bytes(module: torch.nn.Module, tracker: LiveBytes) -> int:
    tensors = [p for p in module.parameters() if not p.requires_grad] + list(module.buffers())
    return sum(tracker.track(t) for t in tensors)


def _create_optimizer_state(params: list[torch.nn.Parameter], optimizer: torch.optim.Optimizer) -> None:
    """Measure a steady-state step: from step 2 on, AdamW's moments live through the whole step."""
    for param in params:
        param.grad = torch.zeros_like(param)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def step_inputs(shape: ModelShape, cfg: TrainConfig, dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
    config = shape.transformer
    side = cfg.resolution // shape.vae_scale_factor
    batch, seq = cfg.batch_size, cfg.max_sequence_length
    latents = torch.randn(batch, shape.latent_channels, side, side)
    noise = torch.randn(batch, shape.latent_channels, side, side)
    sigmas = torch.rand(batch)
    prompt_embeds = torch.randn(batch, seq, config["joint_attention_dim"], dtype=dtype)
    # Families without a pooled text vector (Chroma, FLUX.2) get an empty one. Chroma's text mask is
    # left out: with it CPU attention takes the math kernel and stores the L x L scores, which CUDA's
    # memory-efficient kernel never does; the mask itself is L x L per block (~40 MB at 1024).
    pooled = torch.randn(batch, config.get("pooled_projection_dim", 0), dtype=dtype)
    text_ids = torch.zeros(seq, 3, dtype=dtype)
    return latents, noise, sigmas, prompt_embeds, pooled, text_ids
