"""Rich progress display for jobs: one bar per stage, with the job's metrics beside it."""

from __future__ import annotations

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from fluxlora_api.v1 import jobs_pb2


class JobProgress:
    def __init__(self, console: Console | None = None):
        self.console = console or Console(stderr=True)
        self.progress = Progress(
            TextColumn("[bold]{task.fields[label]}[/bold] {task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeRemainingColumn(),
            TextColumn("{task.fields[metrics]}"),
            console=self.console,
        )
        self._tasks: dict[str, int] = {}

    def __enter__(self) -> JobProgress:
        self.progress.start()
        return self

    def __exit__(self, *exc) -> None:
        self.progress.stop()

    def on_event(self, label: str, event: jobs_pb2.JobEvent) -> None:
        job = event.job
        if label not in self._tasks:
            self._tasks[label] = self.progress.add_task("queued", total=None, label=label, metrics="")
        task = self._tasks[label]
        p = job.progress
        metrics = "  ".join(f"{k} {v:.4g}" for k, v in sorted(job.metrics.items()))
        if p.rate:  # the server's figures, as fluxlora_training_steps_per_second and fluxlora_job_eta_seconds
            metrics = f"{p.rate:.3g} {p.unit or 'unit'}/s  ETA {p.eta_seconds:.0f}s  " + metrics
        state = jobs_pb2.JobState.Name(job.state).removeprefix("JOB_STATE_").lower()
        description = p.stage or state
        if job.state in (jobs_pb2.JOB_STATE_SUCCEEDED, jobs_pb2.JOB_STATE_FAILED, jobs_pb2.JOB_STATE_CANCELLED):
            description = state
        self.progress.update(task, description=description, completed=p.done,
                             total=p.total or None, metrics=metrics)
        if event.message.startswith("warning:"):
            self.console.print(f"[yellow]{label}: {event.message}[/yellow]")
