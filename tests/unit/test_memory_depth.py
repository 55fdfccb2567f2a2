"""The planner measures a training step on a model two or three blocks deep and extrapolates to the
full depth, part by part (forward, backward, optimizer; first and last block of each kind): the
estimate equals the full model's fake step to the byte (Chroma: to within the allocator's rounding),
at a fraction of its cost."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from fluxlora.models.families.configs import FULL_SIZE
from fluxlora.training.memory.architecture import shape_from_configs
from fluxlora.training.memory.fake_step import PROBE_BLOCKS, measure_step
from fluxlora.training.memory.segments import MIDDLE
from fluxlora.training.trainer.config import TrainConfig
from fluxlora.training.trainer.targets import ALL_LINEAR_TARGETS


def full_size(family: str, double: int | None = None, single: int | None = None):
    """The family's full-size shape (real widths: fake tensors cost the same at any width), cut to
    `double` and `single` blocks where given."""
    pipeline, transformer, vae = FULL_SIZE[family]
    shape = shape_from_configs(transformer, vae, {"_class_name": pipeline})
    depth = {k: v for k, v in (("num_layers", double), ("num_single_layers", single)) if v is not None}
    return dataclasses.replace(shape, transformer={**shape.transformer, **depth})


def bf16(**options) -> TrainConfig:
    return TrainConfig(**{"resolution": 512, "precision": "bf16", **options})


# Chroma computes its blocks' modulations before the blocks, one row per block: at full depth that part
# (never the peak) grows a little faster than its shallow probes say (16 MB of 9.4 GB with an fp8 base),
# and tensors sized by the depth are rounded up to the allocator's 512 bytes as a whole. Its peak and
# weights are exact to within 16 KiB; FLUX.1's and FLUX.2's every part to the byte.
SLACK = {"chroma": 16 * 1024}


def assert_extrapolation_is_exact(shape, cfg: TrainConfig) -> None:
    estimated = measure_step(shape, cfg, torch.bfloat16)
    full = measure_step(shape, cfg, torch.bfloat16, probe_blocks=None)
    landmarks = {part: peak for part, peak in full.parts.items() if not part.endswith(MIDDLE)}
    slack = SLACK.get(shape.family, 0)
    assert estimated.parts.keys() == landmarks.keys()
    if not slack:
        assert estimated.parts == landmarks  # every part's peak, not only the largest
    assert abs(estimated.peak_bytes - full.peak_bytes) <= slack  # a middle block never holds more than the ends
    assert abs(estimated.weight_bytes - full.weight_bytes) <= slack
    assert estimated.trainable_bytes == full.trainable_bytes
    assert (estimated.double_block_bytes, estimated.single_block_bytes) == (full.double_block_bytes,
                                                                            full.single_block_bytes)


@pytest.mark.parametrize("options", [
    {"gradient_checkpointing": True, "base_quantization": "fp8"},
    # LoRA on the embedders too: the backward pass goes on past the first block
    pytest.param({"gradient_checkpointing": True, "batch_size": 2,
                  "target_modules": [*ALL_LINEAR_TARGETS, "x_embedder", "context_embedder"]}, marks=pytest.mark.slow),
], ids=["fp8 base + checkpointing", "all linear + embedders, batch 2"])
def test_a_deeper_flux1_step_is_extrapolated_to_the_byte(options):
    assert_extrapolation_is_exact(full_size("flux1-dev", double=PROBE_BLOCKS + 1, single=PROBE_BLOCKS + 3),
                                  bf16(**options))


def test_the_step_is_split_into_forward_backward_and_optimizer_parts_at_the_block_landmarks():
    step = measure_step(full_size("flux1-dev", double=4, single=4), bf16(), torch.bfloat16, probe_blocks=None)
    assert set(step.parts) == {
        f"{phase}/{kind}/{where}" for phase in ("forward", "backward")
        for kind in ("transformer_blocks", "single_transformer_blocks") for where in ("first", MIDDLE, "last")
    } | {"forward/before blocks", "forward/after transformer_blocks", "forward/after single_transformer_blocks",
         "backward/after blocks", "optimizer"}
    assert step.peak_bytes == max(step.parts.values())


def test_a_model_as_shallow_as_the_probe_is_measured_as_it_is():
    shape = full_size("flux1-dev", double=1, single=PROBE_BLOCKS)
    probed, full = (dataclasses.replace(measure_step(shape, bf16(), torch.bfloat16, probe_blocks=blocks), seconds=0)
                    for blocks in (PROBE_BLOCKS, None))
    assert probed == full


@pytest.mark.slow
@pytest.mark.parametrize("family", ["flux1-dev", "flux1-kontext", "chroma", "flux2-klein"])
def test_every_family_at_full_depth_where_the_peak_moves_from_the_backward_to_the_forward_pass(family):
    """FLUX.1 with an 8-bit base and checkpointing at 512: its peak is in the backward pass up to ~20
    single blocks and at the end of the forward pass beyond, so a whole-step extrapolation from a
    shallow model misses it by 131 MiB; the per-part one does not. ~15-60 s a family on one core."""
    assert_extrapolation_is_exact(full_size(family), bf16(gradient_checkpointing=True, base_quantization="fp8"))


@pytest.mark.slow
def test_full_size_flux1_without_checkpointing_at_1024():
    assert_extrapolation_is_exact(full_size("flux1-dev"), bf16(resolution=1024, gradient_checkpointing=False))
