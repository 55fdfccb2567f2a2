"""Rich progress display for jobs: one line per stage with its bar, step/total, ETA and as many of
the job's metrics as the terminal has room for (loss first). At 80 columns the line keeps the bar,
the counter, the ETA and the loss, and drops the rest; a long stage name is cut, never the numbers.
Each distinct warning is printed once, above the bars."""

from __future__ import annotations

from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, ProgressColumn, Task, TimeRemainingColumn
from rich.text import Text

from fluxlora_api.v1 import jobs_pb2

LABEL_WIDTH = 22  # "train loading base model" and the like: cut beyond this
BAR_WIDTH = 20
FIRST_METRICS = ("loss",)  # shown before any other metric, and kept when there is room for one


def metrics_text(metrics: dict[str, float], room: int) -> str:
    """The metrics that fit in `room` characters: loss first, then the others by name."""
    order = [k for k in FIRST_METRICS if k in metrics] + sorted(k for k in metrics if k not in FIRST_METRICS)
    shown: list[str] = []
    for key in order:
        item = f"{key} {metrics[key]:.4g}"
        if len("  ".join([*shown, item])) > room:
            if shown or key not in FIRST_METRICS:
                break
            item = f"{metrics[key]:.4g}"  # a bare loss rather than none
        shown.append(item)
    return "  ".join(shown)


class _LabelColumn(ProgressColumn):
    def render(self, task: Task) -> Text:
        text = Text.from_markup(f"[bold]{task.fields['label']}[/bold] ")
        text.append(task.description)
        text.truncate(LABEL_WIDTH, overflow="ellipsis", pad=True)
        return text


class _EtaColumn(ProgressColumn):
    """The server's ETA (the number fluxlora_job_eta_seconds exports), or rich's own estimate until
    the server has one."""

    def __init__(self) -> None:
        super().__init__()
        self._fallback = TimeRemainingColumn()

    def render(self, task: Task) -> Text:
        eta = task.fields.get("eta")
        if eta is None:
            return self._fallback.render(task)
        minutes, seconds = divmod(int(eta), 60)
        hours, minutes = divmod(minutes, 60)
        return Text(f"{hours}:{minutes:02d}:{seconds:02d}", style="progress.remaining")


class _MetricsColumn(ProgressColumn):
    def __init__(self, console: Console):
        super().__init__()
        self.console = console

    def render(self, task: Task) -> Text:
        # label, bar, "1234/3000", "0:12:34" and the spaces between the columns come first
        total = int(task.total or 0)
        used = LABEL_WIDTH + BAR_WIDTH + 2 * len(str(total)) + 1 + 7 + 5
        return Text(metrics_text(task.fields["metrics"], self.console.width - used - 1), no_wrap=True,
                    overflow="crop")


class JobProgress:
    def __init__(self, console: Console | None = None):
        self.console = console or Console(stderr=True)
        self.progress = Progress(
            _LabelColumn(),
            BarColumn(bar_width=BAR_WIDTH),
            MofNCompleteColumn(),
            _EtaColumn(),
            _MetricsColumn(self.console),
            console=self.console,
        )
        self._tasks: dict[str, int] = {}
        self.warnings: list[str] = []  # every distinct warning seen, in order (each printed once)
        self.notes: list[str] = []  # other messages printed once (the memory options picked)

    def __enter__(self) -> JobProgress:
        self.progress.start()
        return self

    def __exit__(self, *exc) -> None:
        self.progress.stop()

    def on_event(self, label: str, event: jobs_pb2.JobEvent) -> None:
        job = event.job
        if label not in self._tasks:
            self._tasks[label] = self.progress.add_task("queued", total=None, label=label, metrics={}, eta=None)
        task = self._tasks[label]
        p = job.progress
        state = jobs_pb2.JobState.Name(job.state).removeprefix("JOB_STATE_").lower()
        description = p.stage or state
        if job.state in (jobs_pb2.JOB_STATE_SUCCEEDED, jobs_pb2.JOB_STATE_FAILED, jobs_pb2.JOB_STATE_CANCELLED):
            description = state
        metrics = dict(job.metrics)
        if p.rate:  # the server's figures, as fluxlora_training_steps_per_second and fluxlora_job_eta_seconds
            metrics[f"{p.unit or 'unit'}/s"] = p.rate
        self.progress.update(task, description=description, completed=p.done,
                             total=p.total or None, metrics=metrics, eta=p.eta_seconds if p.rate else None)
        for note in job.notes:  # what the service decided for the job (the memory options picked)
            if note not in self.notes:
                self.notes.append(note)
                self.console.print(f"{escape(label)}: {escape(note)}", highlight=False)
        if event.message.startswith("warning:"):
            self.warn(label, event.message.removeprefix("warning:").strip())
        for warning in job.warnings:  # events missed (a reconnect, polling) still show theirs
            self.warn(label, warning)

    def warn(self, label: str, message: str) -> None:
        """Print a warning unless it was printed already."""
        if message not in self.warnings:
            self.warnings.append(message)
            self.console.print(f"[yellow]warning[/yellow] {escape(label)}: {escape(message)}", highlight=False)
