"""How a caller watches and steers a run: progress, artifacts, cancellation."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from fluxlora.training.trainer.peak_memory import PeakMemory


def _ignore(*_args) -> None:
    return None


def _never() -> bool:
    return False


@dataclass
class TrainCallbacks:
    """All optional. Called from the training thread, so they should return quickly.

    on_step(step, total, loss, lr): after every optimizer step (step counts from 1).
    on_checkpoint(step, checkpoint_dir): after a checkpoint directory is complete.
    on_sample(step, paths): after the sample images of a step are written.
    on_memory(step, peak): after every optimizer step, the run's peak memory so far (PeakMemory).
    on_encoded(path): the encoded dataset was written to the encoding_cache path (a new cache).
    should_stop(): polled before every step; True ends the run cleanly (with a checkpoint of
        the steps done) and the outcome says stopped=True.
    """

    on_step: Callable[[int, int, float, float], None] = field(default=_ignore)
    on_checkpoint: Callable[[int, Path], None] = field(default=_ignore)
    on_sample: Callable[[int, list[Path]], None] = field(default=_ignore)
    on_memory: Callable[[int, PeakMemory], None] = field(default=_ignore)
    on_encoded: Callable[[Path], None] = field(default=_ignore)
    should_stop: Callable[[], bool] = field(default=_never)
