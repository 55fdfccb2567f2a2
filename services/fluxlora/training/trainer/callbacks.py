"""How a caller watches and steers a run: progress, artifacts, cancellation."""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from fluxlora.training.trainer.peak_memory import PeakMemory


def _ignore(*_args) -> None:
    return None


def _never() -> bool:
    return False


class TrainingStopped(Exception):
    """should_stop() said so while the run was being prepared (loading, encoding): nothing to save."""


@dataclass
class TrainCallbacks:
    """All optional. Called from the training thread, so they should return quickly.

    on_step(step, total, loss, lr): after every optimizer step (step counts from 1).
    on_checkpoint(step, checkpoint_dir): after a checkpoint directory is complete.
    on_sample(step, paths): after the sample images of a step are written.
    on_memory(step, peak): after every optimizer step, the run's peak memory so far (PeakMemory).
    on_encoded(path): the encoded dataset was written to the encoding_cache path (a new cache).
    should_stop(): polled before every step, and between the stages of preparing the run (model
        loaded, each image encoded, LoRA added, blocks compiled); True ends the run cleanly (with a
        checkpoint of the steps done, if any) and the outcome says stopped=True.
    preparing(): a context manager around loading the model and encoding the dataset (a job's
        JobContext.interruptible: a stop may interrupt it anywhere, raising its own exception).
    """

    on_step: Callable[[int, int, float, float], None] = field(default=_ignore)
    on_checkpoint: Callable[[int, Path], None] = field(default=_ignore)
    on_sample: Callable[[int, list[Path]], None] = field(default=_ignore)
    on_memory: Callable[[int, PeakMemory], None] = field(default=_ignore)
    on_encoded: Callable[[Path], None] = field(default=_ignore)
    should_stop: Callable[[], bool] = field(default=_never)
    preparing: Callable[[], AbstractContextManager] = field(default=contextlib.nullcontext)
