"""Will a training run fit the GPU? Estimate its peak memory before any weight is loaded, and
when it does not fit, find the option changes that would make it fit.

peak = one fake training step of the configured architecture (fake_step.measure_step: measured on
         a model two or three blocks deep and extrapolated to the full depth, part by part; cached)
       - the weights of swapped-out blocks + one block in flight (block swapping, by arithmetic)
       + CUDA_OVERHEAD_GIB (CUDA context, cuBLAS workspaces, allocator fragmentation: memory a
         fake run cannot see; 1-3 GB in published figures, 1.5 GiB taken here).
Images are assumed square at the training resolution: the largest bucket of that resolution.
"""

from __future__ import annotations

import hashlib
import json
import logging
import threading
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from fluxlora.models.base_layers import max_blocks_to_swap as max_swappable
from fluxlora.models.base_layers import swap_plan
from fluxlora.training.memory.architecture import ModelShape
from fluxlora.training.memory.fake_step import StepMemory, measure_step
from fluxlora.training.trainer.config import OPTIMIZER_STATE_BYTES, TrainConfig, not_yet_runnable

log = logging.getLogger(__name__)

CUDA_OVERHEAD_GIB = 1.5
GIB = 2**30
# Bumped whenever measure_step changes what it counts: stale cached estimates are then ignored.
PLANNER_VERSION = 5
_DTYPES = {"auto": torch.bfloat16, "bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
# The config fields that change a step's memory; the others (learning rate, steps...) do not.
_MEMORY_FIELDS = ("resolution", "batch_size", "rank", "target_modules", "precision", "gradient_checkpointing",
                  "base_quantization", "max_sequence_length")


def planning_dtype(precision: str) -> torch.dtype:
    """The base weights' dtype on a GPU: "auto" is bf16 there, whatever device plans."""
    return _DTYPES[precision]


@dataclass(frozen=True)
class MemoryEstimate:
    total_gib: float  # what the run needs on the GPU: step peak + overhead
    step_peak_gib: float  # tensors alive at the step's peak (resident weights included)
    weights_gib: float  # resident parameters (base and LoRA)
    overhead_gib: float
    mode: str  # e.g. "bf16 + gradient checkpointing"

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class Alternative:
    changes: dict[str, Any]  # TrainConfig fields to change
    estimate: MemoryEstimate
    unavailable: list[str] = field(default_factory=list)  # why this trainer cannot run it yet

    def describe(self) -> str:
        options = ", ".join(f"{k}={_show(v)}" for k, v in self.changes.items())
        text = f"{options} ({self.estimate.total_gib:.1f} GiB)"
        if self.unavailable:
            text += " [not runnable on this server yet: " + "; ".join(self.unavailable) + "]"
        return text


@dataclass(frozen=True)
class MemoryPlan:
    estimate: MemoryEstimate
    target_gib: float
    alternatives: list[Alternative]  # only when it does not fit; runnable ones first

    @property
    def fits(self) -> bool:
        return self.estimate.total_gib <= self.target_gib

    def explain(self) -> str:
        """One message a person can act on."""
        e = self.estimate
        head = (f"the run ({e.mode}) needs an estimated {e.total_gib:.1f} GiB of GPU memory "
                f"({e.step_peak_gib:.1f} GiB for the training step + {e.overhead_gib:.1f} GiB CUDA overhead)")
        if self.fits:
            return f"{head}, within the target GPU's {self.target_gib:.1f} GiB"
        head = f"{head}, more than the target GPU's {self.target_gib:.1f} GiB"
        if not self.alternatives:
            return (f"{head}. No combination of gradient_checkpointing, base_quantization, blocks_to_swap and a "
                    "lower resolution fits: use a GPU with more memory")
        return f"{head}. Options that fit: " + "; ".join(a.describe() for a in self.alternatives)

    def as_dict(self) -> dict[str, Any]:
        return {
            "estimate": self.estimate.as_dict(),
            "target_gib": self.target_gib,
            "fits": self.fits,
            "alternatives": [{"changes": a.changes, "total_gib": a.estimate.total_gib, "unavailable": a.unavailable}
                             for a in self.alternatives],
        }


class MemoryPlanner:
    """Estimates with a cache: in memory, and as JSON files in cache_dir when given, so a repeat
    (or the same run after a restart) costs nothing. Thread-safe; one fake step at a time."""

    def __init__(self, cache_dir: Path | None = None, overhead_gib: float = CUDA_OVERHEAD_GIB):
        self.cache_dir = Path(cache_dir) if cache_dir else None
        self.overhead_gib = overhead_gib
        self._cache: dict[str, StepMemory] = {}
        self._lock = threading.Lock()

    def step_memory(self, shape: ModelShape, cfg: TrainConfig) -> StepMemory:
        key = _cache_key(shape, cfg)
        with self._lock:
            if key in self._cache:
                return self._cache[key]
            cached = self._read(key)
            if cached is None:
                cached = measure_step(shape, cfg, planning_dtype(cfg.precision))
                self._write(key, cached)
            self._cache[key] = cached
            return cached

    def estimate(self, shape: ModelShape, cfg: TrainConfig) -> MemoryEstimate:
        step = self.step_memory(shape, cfg)
        swapped, in_flight = _swap_bytes(shape, cfg, step)
        peak = step.peak_bytes - swapped + in_flight + _optimizer_state_delta(cfg, step)
        return MemoryEstimate(
            total_gib=round(peak / GIB + self.overhead_gib, 3),
            step_peak_gib=round(peak / GIB, 3),
            weights_gib=round((step.weight_bytes - swapped) / GIB, 3),
            overhead_gib=self.overhead_gib,
            mode=describe_mode(cfg),
        )

    def plan(self, shape: ModelShape, cfg: TrainConfig, target_gib: float) -> MemoryPlan:
        estimate = self.estimate(shape, cfg)
        if estimate.total_gib <= target_gib:
            return MemoryPlan(estimate, target_gib, [])
        return MemoryPlan(estimate, target_gib, self._alternatives(shape, cfg, target_gib))

    def _alternatives(self, shape: ModelShape, cfg: TrainConfig, target_gib: float) -> list[Alternative]:
        """Changes that fit, fewest and mildest first: half precision, gradient checkpointing, an
        8-bit base, then block swapping (free to compute) on each, then a lower resolution."""
        rungs: list[dict[str, Any]] = []
        changes: dict[str, Any] = {}
        if planning_dtype(cfg.precision) == torch.float32:
            changes = {**changes, "precision": "bf16"}
            rungs.append(changes)
        if not cfg.gradient_checkpointing:
            changes = {**changes, "gradient_checkpointing": True}
            rungs.append(changes)
        if cfg.base_quantization == "none":
            changes = {**changes, "base_quantization": "fp8"}
            rungs.append(changes)

        found: list[Alternative] = []
        for rung in [{}, *rungs]:
            candidate = cfg.model_copy(update=rung)
            if rung and self.estimate(shape, candidate).total_gib <= target_gib:
                found.append(self._alternative(shape, cfg, rung))
                break  # later rungs only add changes
            swap = self._blocks_to_swap_that_fit(shape, candidate, target_gib)
            if swap is not None:
                found.append(self._alternative(shape, cfg, {**rung, "blocks_to_swap": swap}))
        if not found:
            strongest = rungs[-1] if rungs else {}
            for resolution in _lower_resolutions(cfg.resolution):
                change = {**strongest, "resolution": resolution}
                if self.estimate(shape, cfg.model_copy(update=change)).total_gib <= target_gib:
                    found.append(self._alternative(shape, cfg, change))
                    break
        return sorted(found, key=lambda a: bool(a.unavailable))

    def _alternative(self, shape: ModelShape, cfg: TrainConfig, changes: dict[str, Any]) -> Alternative:
        candidate = cfg.model_copy(update=changes)
        return Alternative(dict(changes), self.estimate(shape, candidate), not_yet_runnable(candidate))

    def _blocks_to_swap_that_fit(self, shape: ModelShape, cfg: TrainConfig, target_gib: float) -> int | None:
        current = cfg.blocks_to_swap
        for n in range(current + 1, max_blocks_to_swap(shape) + 1):
            if self.estimate(shape, cfg.model_copy(update={"blocks_to_swap": n})).total_gib <= target_gib:
                return n
        return None

    def _read(self, key: str) -> StepMemory | None:
        if self.cache_dir is None:
            return None
        path = self.cache_dir / f"{key}.json"
        try:
            return StepMemory(**json.loads(path.read_text()))
        except (OSError, ValueError, TypeError):
            return None

    def _write(self, key: str, step: StepMemory) -> None:
        if self.cache_dir is None:
            return
        try:
            self.cache_dir.mkdir(parents=True, exist_ok=True)
            tmp = self.cache_dir / f".{key}.tmp"
            tmp.write_text(json.dumps(asdict(step)))
            tmp.replace(self.cache_dir / f"{key}.json")
        except OSError as exc:  # a cache that cannot be written only costs time
            log.warning("could not cache a memory estimate in %s: %s", self.cache_dir, exc)


def _optimizer_state_delta(cfg: TrainConfig, step: StepMemory) -> int:
    """Optimizer state beyond the AdamW state the fake step held (negative for 8-bit AdamW)."""
    parameters = step.trainable_bytes // 4  # LoRA parameters train in fp32
    return parameters * (OPTIMIZER_STATE_BYTES[cfg.optimizer] - OPTIMIZER_STATE_BYTES["adamw"])


def describe_mode(cfg: TrainConfig) -> str:
    dtype = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}[planning_dtype(cfg.precision)]
    parts = [f"{cfg.base_quantization} base" if cfg.base_quantization != "none" else f"{dtype} base"]
    if cfg.gradient_checkpointing:
        parts.append("gradient checkpointing")
    if cfg.blocks_to_swap:
        parts.append(f"{cfg.blocks_to_swap} blocks swapped")
    if cfg.optimizer != "adamw":
        parts.append(cfg.optimizer)
    return " + ".join(parts) + f", {cfg.resolution}px, batch {cfg.batch_size}, rank {cfg.rank}"


def max_blocks_to_swap(shape: ModelShape) -> int:
    """kohya keeps at least two blocks of each kind on the GPU (35 on FLUX.1)."""
    return max_swappable(shape.transformer["num_layers"], shape.transformer["num_single_layers"])


def _swap_bytes(shape: ModelShape, cfg: TrainConfig, step: StepMemory) -> tuple[int, int]:
    if not cfg.blocks_to_swap:
        return 0, 0
    double, single = swap_plan(cfg.blocks_to_swap, shape.transformer["num_layers"],
                               shape.transformer["num_single_layers"])
    swapped = double * step.double_block_bytes + single * step.single_block_bytes
    in_flight = step.double_block_bytes if double else step.single_block_bytes
    return swapped, in_flight


def _lower_resolutions(resolution: int) -> list[int]:
    return [r for r in (1024, 768, 512, 384, 256) if r < resolution]


def _cache_key(shape: ModelShape, cfg: TrainConfig) -> str:
    fields = {name: getattr(cfg, name) for name in _MEMORY_FIELDS}
    fields["target_modules"] = sorted(fields["target_modules"])
    fields["precision"] = str(planning_dtype(cfg.precision))
    payload = {"version": PLANNER_VERSION, "torch": torch.__version__, "model": shape.cache_key(), "run": fields}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:32]


def _show(value: Any) -> str:
    return str(value).lower() if isinstance(value, bool) else str(value)
