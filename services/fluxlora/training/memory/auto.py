"""memory_mode "auto": the planner picks a run's memory options for the GPU it will land on.

The candidates, fastest first (FLUX.1-dev at 1024 on an H100 with compiled blocks, the default on
CUDA; docs/performance.md):

    bf16 base + gradient checkpointing          0.59 s/it   26.2 GiB estimated
    fp8 base + gradient checkpointing           0.63 s/it   15.5 GiB
    fp8 base + checkpointing + N blocks swapped  ~+15-25%   down to 10.6 GiB with 18

The first that fits the target wins, with the fewest blocks swapped. Options the request set
(gradient_checkpointing, base_quantization, blocks_to_swap) are kept as given in every candidate,
so an explicit choice always wins. An 8-bit base is only tried with checkpointing: without it the
upcast copies kept for backward cost more than the 8-bit weights save. Compiled blocks stay "auto"
(on wherever the run gets a CUDA GPU). Nothing fits: None, and the run is refused as in "manual".
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from fluxlora.training.memory.architecture import ModelShape
from fluxlora.training.memory.planner import MemoryEstimate, MemoryPlanner, max_blocks_to_swap
from fluxlora.training.trainer.config import TrainConfig, not_yet_runnable

MEMORY_OPTIONS = ("gradient_checkpointing", "base_quantization", "blocks_to_swap")
FEWEST = -1  # blocks_to_swap: the fewest that fit
# Fastest first.
LADDER: tuple[dict[str, Any], ...] = (
    {"gradient_checkpointing": True, "base_quantization": "none", "blocks_to_swap": 0},
    {"gradient_checkpointing": True, "base_quantization": "fp8", "blocks_to_swap": 0},
    {"gradient_checkpointing": True, "base_quantization": "fp8", "blocks_to_swap": FEWEST},
)


@dataclass(frozen=True)
class AutoChoice:
    changes: dict[str, Any]  # the memory options picked (TrainConfig fields), all of MEMORY_OPTIONS
    estimate: MemoryEstimate
    target_gib: float
    why: str

    def describe(self) -> str:
        """One line for the job's events and the plan: what was picked and why."""
        return (f"memory_mode auto picked {self.estimate.mode.split(', ')[0]}: {self.why}; an estimated "
                f"{self.estimate.total_gib:.1f} GiB of the target GPU's {self.target_gib:.1f} GiB")


def pick_memory_options(planner: MemoryPlanner, shape: ModelShape, cfg: TrainConfig, target_gib: float,
                        given: Iterable[str]) -> AutoChoice | None:
    """The fastest memory options that fit `target_gib`, keeping the `given` ones; None if none fit."""
    given = set(given) & set(MEMORY_OPTIONS)
    tried: set[tuple] = set()
    too_big: list[MemoryEstimate] = []
    for rung in LADDER:
        candidate = cfg.model_copy(update={k: v for k, v in rung.items() if k not in given and v != FEWEST})
        if candidate.base_quantization != "none" and not candidate.gradient_checkpointing:
            continue  # an 8-bit base saves nothing without checkpointing
        if not_yet_runnable(candidate):
            continue
        if rung["blocks_to_swap"] == FEWEST and "blocks_to_swap" not in given:
            found = _fewest_swapped(planner, shape, candidate, target_gib)
            if found is None:
                continue
            candidate = found
        key = tuple(getattr(candidate, k) for k in MEMORY_OPTIONS)
        if key in tried:
            continue
        tried.add(key)
        estimate = planner.estimate(shape, candidate)
        if estimate.total_gib > target_gib:
            too_big.append(estimate)
            continue
        return AutoChoice({k: getattr(candidate, k) for k in MEMORY_OPTIONS}, estimate, target_gib,
                          _why(candidate, too_big, given))
    return None


def _fewest_swapped(planner: MemoryPlanner, shape: ModelShape, cfg: TrainConfig,
                    target_gib: float) -> TrainConfig | None:
    for n in range(max(cfg.blocks_to_swap, 1), max_blocks_to_swap(shape) + 1):
        candidate = cfg.model_copy(update={"blocks_to_swap": n})
        if planner.estimate(shape, candidate).total_gib <= target_gib:
            return candidate
    return None


def _why(picked: TrainConfig, too_big: list[MemoryEstimate], given: set[str]) -> str:
    if not too_big:
        why = "the fastest combination, and it fits"
    else:
        costs = []
        if picked.base_quantization != "none":
            costs.append(f"an {picked.base_quantization} base (half the weights' memory, ~7% more step time)")
        if picked.blocks_to_swap:
            costs.append(f"{picked.blocks_to_swap} blocks swapped to the CPU (two copies of their weights a step)")
        faster = too_big[0]
        why = (f"the fastest that fits, with {' and '.join(costs) or 'these options'}: "
               f"{faster.mode.split(', ')[0]} would need {faster.total_gib:.1f} GiB")
    if given:
        why += f" ({', '.join(sorted(given))} kept as given)"
    return why
