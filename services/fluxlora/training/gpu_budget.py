"""The training service's memory check: the target GPU from the settings, one planner per process,
and the plan of a run for its base model (read from the model's config files, no weights)."""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from pathlib import Path

import torch

from fluxlora.common.config import Settings
from fluxlora.common.storage import ArtifactStore
from fluxlora.jobs.kueue_flavors import ClusterQueueGpus
from fluxlora.training.memory import MemoryPlan, MemoryPlanner, read_model_shape
from fluxlora.training.memory.auto import AutoChoice, pick_memory_options
from fluxlora.training.trainer.config import TrainConfig

log = logging.getLogger(__name__)

# The reference card when the server has no GPU of its own: an RTX 4090 / 3090.
DEFAULT_TARGET_GIB = 24.0

_planners: dict[Path, MemoryPlanner] = {}
_planners_lock = threading.Lock()


@dataclass(frozen=True)
class GpuTarget:
    """The GPU memory a run must fit, and where that figure comes from (for messages)."""

    gib: float
    source: str
    cluster: ClusterQueueGpus | None = None  # the Kueue GPUs it was taken from, when it was


def gpu_target(settings: Settings, cluster: ClusterQueueGpus | None = None) -> GpuTarget | None:
    """FLUXLORA_GPU_MEMORY_GIB; else, behind Kueue, the smallest GPU among the ClusterQueue's flavors
    (Kueue may place the run on any of them); else the server's own GPU; else 24 GiB. None when the
    setting is 0 (no check)."""
    configured = getattr(settings, "gpu_memory_gib", None)
    if configured is not None:
        return GpuTarget(float(configured), "FLUXLORA_GPU_MEMORY_GIB on the training server") if configured else None
    flavor = cluster.smallest() if cluster is not None else None
    if cluster is not None and flavor is not None and flavor.gpu_memory_gib is not None:
        return GpuTarget(flavor.gpu_memory_gib, f"the smallest GPU ClusterQueue {cluster.cluster_queue} may give the "
                         f"run: flavor {flavor.describe()}", cluster)
    if torch.cuda.is_available():
        device = torch.device(settings.device if settings.device.startswith("cuda") else "cuda")
        return GpuTarget(torch.cuda.get_device_properties(device).total_memory / 2**30, "the training server's GPU")
    return GpuTarget(DEFAULT_TARGET_GIB, "the reference RTX 4090 (FLUXLORA_GPU_MEMORY_GIB sets another)")


def target_gib(settings: Settings, cluster: ClusterQueueGpus | None = None) -> float | None:
    target = gpu_target(settings, cluster)
    return target.gib if target else None


def planner_for(settings: Settings) -> MemoryPlanner:
    """A planner caching its estimates under <cache_dir>/memory-plans (shared by every job)."""
    cache_dir = Path(settings.cache_dir) / "memory-plans"
    with _planners_lock:
        if cache_dir not in _planners:
            _planners[cache_dir] = MemoryPlanner(cache_dir)
        return _planners[cache_dir]


def plan_run(base_model: str, store: ArtifactStore, cfg: TrainConfig, settings: Settings,
             cluster: ClusterQueueGpus | None = None, components: str = "") -> MemoryPlan | None:
    """The memory plan of training `cfg` on `base_model`; None when the check is off."""
    target = gpu_target(settings, cluster)
    if target is None:
        return None
    shape = read_model_shape(base_model, store, components, cfg.family)
    return planner_for(settings).plan(shape, cfg, target.gib)


def pick_for_run(base_model: str, store: ArtifactStore, cfg: TrainConfig, settings: Settings,
                 given: set[str], cluster: ClusterQueueGpus | None = None, components: str = "") -> AutoChoice | None:
    """memory_mode auto: the fastest memory options for `cfg` that fit the target GPU, keeping the
    `given` ones; None when nothing fits or the check is off."""
    target = target_gib(settings, cluster)
    if target is None:
        return None
    shape = read_model_shape(base_model, store, components, cfg.family)
    return pick_memory_options(planner_for(settings), shape, cfg, target, given)
