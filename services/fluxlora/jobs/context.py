"""What a running job's handler sees: its spec, the store, a scratch directory, and calls to report
progress, metrics, artifacts, warnings and to notice cancellation."""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Protocol

from fluxlora.common.config import Settings
from fluxlora.common.storage import ArtifactStore, ObjectInfo
from fluxlora_api.v1 import jobs_pb2


class JobHost(Protocol):
    """Where a handler's reports go: the server's JobRuntime, or a worker process's WorkerReport."""

    store: ArtifactStore

    @property
    def settings(self) -> Settings | None: ...

    def update(self, job_id: str, mutate: Callable[[jobs_pb2.Job], Any], message: str = "",
               persist: bool | str = True) -> Any: ...

    def should_stop(self, job_id: str) -> bool: ...


class JobInterrupted(Exception):
    """Raised inside a handler when the job was cancelled or the server is shutting down."""


_interruptible_depth = 0  # the main thread is inside JobContext.interruptible()


def interruptible_now() -> bool:
    """Whether a stop may interrupt the main thread where it is (a worker's SIGTERM handler asks)."""
    return _interruptible_depth > 0 and threading.current_thread() is threading.main_thread()


class JobContext:
    def __init__(self, runtime: JobHost, job_id: str, spec: Any, scratch: Path):
        self._runtime = runtime
        self.job_id = job_id
        self.spec = spec
        self.scratch = scratch
        self.store: ArtifactStore = runtime.store
        self.settings: Settings | None = runtime.settings
        self._stage = ""
        self._stage_started = time.monotonic()

    def progress(self, stage: str, done: int, total: int = 0, unit: str = "") -> None:
        now = time.monotonic()
        if stage != self._stage:
            self._stage, self._stage_started = stage, now
        elapsed = now - self._stage_started
        rate = done / elapsed if elapsed > 0 and done else 0.0
        eta = (total - done) / rate if rate and total else 0.0
        progress = jobs_pb2.Progress(stage=stage, done=done, total=total, unit=unit, rate=rate, eta_seconds=eta)
        self._runtime.update(self.job_id, lambda job: job.progress.CopyFrom(progress), persist="throttle")

    def metrics(self, **values: float) -> None:
        self._runtime.update(self.job_id, lambda job: job.metrics.update(values), persist="throttle")

    def add_artifact(self, info: ObjectInfo, kind: str, step: int = 0) -> jobs_pb2.ArtifactRef:
        ref = jobs_pb2.ArtifactRef(key=info.key, kind=kind, size_bytes=info.size, sha256=info.sha256, step=step)
        self._runtime.update(self.job_id, lambda job: job.artifacts.append(ref), message=f"wrote {info.key}")
        return ref

    def upload(self, path: Path, key: str, kind: str, step: int = 0) -> jobs_pb2.ArtifactRef:
        from fluxlora.common.storage import content_type

        return self.add_artifact(self.store.put_file(key, path, content_type(Path(path))), kind, step)

    def log(self, message: str) -> None:
        self._runtime.update(self.job_id, lambda job: None, message=message, persist=False)

    def warn(self, message: str) -> None:
        self._runtime.update(self.job_id, lambda job: job.warnings.append(message), message=f"warning: {message}")

    @property
    def should_stop(self) -> bool:
        return self._runtime.should_stop(self.job_id)

    def check_cancelled(self) -> None:
        if self.should_stop:
            raise JobInterrupted(self.job_id)

    @contextlib.contextmanager
    def interruptible(self) -> Iterator[None]:
        """Work with nothing to save if it stops half-way (downloading or loading a model, encoding
        the dataset): a stop is checked before and after it, and in a worker process (the process and
        Kubernetes runners) a SIGTERM interrupts it where it is, raising JobInterrupted, so a cancel
        takes seconds instead of waiting for the model to load."""
        global _interruptible_depth
        self.check_cancelled()
        main = threading.current_thread() is threading.main_thread()
        if main:
            _interruptible_depth += 1
        try:
            yield
        finally:
            if main:
                _interruptible_depth -= 1
        self.check_cancelled()
