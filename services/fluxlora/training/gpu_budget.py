"""The training service's memory check: the target GPU from the settings, one planner per process,
and the plan of a run for its base model (read from the model's config files, no weights)."""

from __future__ import annotations

import logging
import threading
from pathlib import Path

import torch

from fluxlora.common.config import Settings
from fluxlora.common.storage import ArtifactStore
from fluxlora.training.memory import MemoryPlan, MemoryPlanner, read_model_shape
from fluxlora.training.memory.auto import AutoChoice, pick_memory_options
from fluxlora.training.trainer.config import TrainConfig

log = logging.getLogger(__name__)

# The reference card when the server has no GPU of its own: an RTX 4090 / 3090.
DEFAULT_TARGET_GIB = 24.0

_planners: dict[Path, MemoryPlanner] = {}
_planners_lock = threading.Lock()


def target_gib(settings: Settings) -> float | None:
    """GPU memory a run must fit: FLUXLORA_GPU_MEMORY_GIB, else the server's own GPU, else 24;
    None when the setting is 0 (no check)."""
    configured = getattr(settings, "gpu_memory_gib", None)
    if configured is not None:
        return float(configured) or None
    if torch.cuda.is_available():
        device = torch.device(settings.device if settings.device.startswith("cuda") else "cuda")
        return torch.cuda.get_device_properties(device).total_memory / 2**30
    return DEFAULT_TARGET_GIB


def planner_for(settings: Settings) -> MemoryPlanner:
    """A planner caching its estimates under <cache_dir>/memory-plans (shared by every job)."""
    cache_dir = Path(settings.cache_dir) / "memory-plans"
    with _planners_lock:
        if cache_dir not in _planners:
            _planners[cache_dir] = MemoryPlanner(cache_dir)
        return _planners[cache_dir]


def plan_run(base_model: str, store: ArtifactStore, cfg: TrainConfig, settings: Settings) -> MemoryPlan | None:
    """The memory plan of training `cfg` on `base_model`; None when the check is off."""
    target = target_gib(settings)
    if target is None:
        return None
    shape = read_model_shape(base_model, store)
    return planner_for(settings).plan(shape, cfg, target)


def pick_for_run(base_model: str, store: ArtifactStore, cfg: TrainConfig, settings: Settings,
                 given: set[str]) -> AutoChoice | None:
    """memory_mode auto: the fastest memory options for `cfg` that fit the target GPU, keeping the
    `given` ones; None when nothing fits or the check is off."""
    target = target_gib(settings)
    if target is None:
        return None
    shape = read_model_shape(base_model, store)
    return pick_memory_options(planner_for(settings), shape, cfg, target, given)
