"""Where a job's handler runs: the seam between the job runtime (queue, records, watchers) and the
place the work happens.

- LocalRunner: in the server's own worker thread (the default).
- ProcessRunner (fluxlora.jobs.process): in a child process running `python -m fluxlora.server.worker
  <service> <job_id>`, so that a crash in the work (out of memory, a segfault) fails the job and
  never the server (FLUXLORA_RUNNER=process; what Docker Compose runs training with).
- KubernetesRunner (fluxlora.jobs.kubernetes): as a Kubernetes Job whose pod runs
  `fluxlora worker <service> <job_id>`, the same handler against the same store.

A runner's `run` returns the job's result message or raises: JobInterrupted when the job was
cancelled or the server is shutting down, any other exception for a failure (mapped to a gRPC code
by fluxlora_api.shared.errors.status_of).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from google.protobuf.message import Message

from fluxlora.common.config import Settings
from fluxlora.jobs.context import JobContext

if TYPE_CHECKING:
    from fluxlora.jobs.runtime import JobRuntime


class Runner(Protocol):
    def run(self, runtime: JobRuntime, job_id: str, spec: Any, scratch: Path) -> Message: ...

    def recover(self, runtime: JobRuntime) -> None:
        """Called once at start, after the runtime re-queued its unfinished jobs."""


class LocalRunner:
    def __init__(self, handler: Callable[[JobContext, Any], Message]):
        self.handler = handler

    def run(self, runtime: JobRuntime, job_id: str, spec: Any, scratch: Path) -> Message:
        return self.handler(JobContext(runtime, job_id, spec, scratch), spec)

    def recover(self, runtime: JobRuntime) -> None:
        pass


def runner_for(settings: Settings | None, service: str, handler: Callable[[JobContext, Any], Message]) -> Runner:
    if settings is None:
        return LocalRunner(handler)
    runner = settings.runner
    if runner == "kubernetes":
        # Imported only here: the kubernetes client is not needed (nor installed in every image) otherwise.
        from fluxlora.jobs.kubernetes import KubernetesRunner

        return KubernetesRunner.from_settings(settings, service)
    if runner == "process":
        from fluxlora.jobs.process import ProcessRunner

        return ProcessRunner.from_settings(settings, service)
    return LocalRunner(handler)
