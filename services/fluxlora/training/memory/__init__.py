"""GPU memory of a training run, estimated on the CPU from the model's config alone."""

from fluxlora.training.memory.architecture import FLUX1_DEV, ModelShape, read_model_shape
from fluxlora.training.memory.planner import (
    CUDA_OVERHEAD_GIB,
    MemoryEstimate,
    MemoryPlan,
    MemoryPlanner,
)

__all__ = [
    "CUDA_OVERHEAD_GIB",
    "FLUX1_DEV",
    "MemoryEstimate",
    "MemoryPlan",
    "MemoryPlanner",
    "ModelShape",
    "read_model_shape",
]
