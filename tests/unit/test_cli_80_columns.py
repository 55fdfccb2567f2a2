"""The CLI in a normal 80-column terminal, judged by what a person would copy out of it: paths
whole, the progress line's bar, step counter, ETA and loss, one output per command (a table, or
--json in the same camelCase as everywhere), errors on stderr. Fake servers answer the RPCs."""

from __future__ import annotations

import io
import json
import re
from pathlib import Path
from types import SimpleNamespace

import pytest
from rich.console import Console
from typer.testing import CliRunner

from fluxlora_api.v1 import jobs_pb2, jobs_pb2_grpc, training_pb2
from fluxlora_client import cli
from fluxlora_client.errors import FluxloraClientError
from fluxlora_client.progress import JobProgress, metrics_text
from support import fake_server


class FakeJobs(jobs_pb2_grpc.JobServiceServicer):
    def __init__(self):
        self.jobs: list[jobs_pb2.Job] = []

    def ListJobs(self, request, context):
        return jobs_pb2.ListJobsResponse(jobs=self.jobs)

    def CancelJob(self, request, context):
        return jobs_pb2.Job(job_id=request.job_id, cancel_requested=True, state=jobs_pb2.JOB_STATE_RUNNING)


@pytest.fixture
def jobs(monkeypatch):
    fake = FakeJobs()
    with fake_server(jobs_pb2_grpc.add_JobServiceServicer_to_server, fake) as address:
        monkeypatch.setenv("FLUXLORA_TRAINING_ADDR", address)
        yield fake


def invoke(*args: str):
    result = CliRunner().invoke(cli.app, list(args), env={"COLUMNS": "80"})
    assert result.exception is None or isinstance(result.exception, SystemExit | FluxloraClientError), result.exception
    return result


def test_an_empty_job_list_says_so_instead_of_an_empty_table(jobs):
    result = invoke("jobs", "list", "training")
    assert result.exit_code == 0, result.output
    assert result.stdout.strip() == "no training jobs"


def test_a_job_list_keeps_every_job_id_whole_at_80_columns(jobs):
    jobs.jobs = [jobs_pb2.Job(job_id=f"trn-{i:012d}", state=jobs_pb2.JOB_STATE_RUNNING,
                              progress=jobs_pb2.Progress(stage="loading base model", done=0, total=3000))
                 for i in range(3)]
    result = invoke("jobs", "list", "training")
    assert result.exit_code == 0, result.output
    assert max(len(line) for line in result.stdout.splitlines()) <= 80
    for job in jobs.jobs:
        assert job.job_id in result.stdout
    listed = json.loads(invoke("jobs", "list", "training", "--json").stdout)
    assert [j["jobId"] for j in listed["jobs"]] == [j.job_id for j in jobs.jobs]


def test_cancel_answers_in_words_or_in_the_same_camel_case_json_as_every_command(jobs):
    said = invoke("jobs", "cancel", "trn-0123456789ab")
    assert said.exit_code == 0 and said.stdout.strip() == "trn-0123456789ab: cancel requested"
    printed = json.loads(invoke("jobs", "cancel", "trn-0123456789ab", "--json").stdout)
    assert printed == {"jobId": "trn-0123456789ab", "cancelRequested": True}


def test_errors_go_to_stderr_with_a_non_zero_exit(monkeypatch, capsys):
    monkeypatch.setattr("sys.argv", ["fluxlora", "jobs", "show", "nope-1"])
    with pytest.raises(SystemExit) as exit_:
        cli.main()
    captured = capsys.readouterr()
    assert exit_.value.code == 1
    assert captured.out == "" and "INVALID_ARGUMENT" in captured.err and "Traceback" not in captured.err


def _render(progress: JobProgress) -> list[str]:
    progress.console.print(progress.progress.get_renderable())
    return [line for line in progress.console.file.getvalue().splitlines() if line.strip()]


def _training_progress(width: int) -> JobProgress:
    console = Console(file=io.StringIO(), width=width, force_terminal=False, color_system=None)
    progress = JobProgress(console)
    job = jobs_pb2.Job(job_id="trn-1", state=jobs_pb2.JOB_STATE_RUNNING,
                       progress=jobs_pb2.Progress(stage="training", done=150, total=3000),
                       metrics={"loss": 0.123456, "lr": 0.0001, "peak_memory_gib": 14.2,
                                "estimated_peak_gib": 15.5, "encodings_reused": 1.0})
    progress.on_event("train", jobs_pb2.JobEvent(job=job))
    return progress


def test_the_progress_line_keeps_bar_steps_eta_and_loss_at_80_columns():
    [line] = _render(_training_progress(80))
    assert len(line) <= 80
    assert "━" in line and "150/3000" in line and "loss 0.1235" in line
    assert re.search(r"(\d+:\d\d:\d\d|-:--:--)", line)
    assert "lr" not in line and "peak" not in line  # the rest is dropped, not the numbers that matter


def test_a_wide_terminal_shows_every_metric():
    [line] = _render(_training_progress(200))
    assert "150/3000" in line and "loss 0.1235" in line and "lr 0.0001" in line and "peak_memory_gib 14.2" in line


def test_a_long_stage_name_is_cut_before_the_numbers():
    console = Console(file=io.StringIO(), width=80, force_terminal=False, color_system=None)
    progress = JobProgress(console)
    job = jobs_pb2.Job(job_id="trn-1", state=jobs_pb2.JOB_STATE_RUNNING,
                       progress=jobs_pb2.Progress(stage="loading base model and encoding 300 captions", done=7,
                                                  total=300), metrics={"loss": 0.5})
    progress.on_event("train", jobs_pb2.JobEvent(job=job))
    [line] = _render(progress)
    assert len(line) <= 80 and "7/300" in line and "loss 0.5" in line


def test_metrics_text_puts_loss_first_and_keeps_it_when_little_room():
    metrics = {"a": 1.0, "loss": 0.25, "z": 2.0}
    assert metrics_text(metrics, 100) == "loss 0.25  a 1  z 2"
    assert metrics_text(metrics, 9) == "loss 0.25"
    assert metrics_text(metrics, 4) == "0.25"


def test_each_warning_is_printed_once_however_often_it_comes():
    console = Console(file=io.StringIO(), width=80, force_terminal=False, color_system=None)
    progress = JobProgress(console)
    job = jobs_pb2.Job(job_id="pre-1", state=jobs_pb2.JOB_STATE_RUNNING, warnings=["only 10 images [x]"])
    for _ in range(3):
        progress.on_event("preprocess", jobs_pb2.JobEvent(job=job, message="warning: only 10 images [x]"))
    progress.warn("preprocess", "only 10 images [x]")
    assert console.file.getvalue().count("only 10 images [x]") == 1


def _outputs(local_root: Path):
    train = training_pb2.TrainResult(run_id="trn-0123456789ab", final_loss=0.1, seconds_per_step=0.5,
                                     checkpoints=[training_pb2.Checkpoint(step=100), training_pb2.Checkpoint(step=200)])
    return SimpleNamespace(
        dataset_id="ds-0123456789ab", run_id=train.run_id, grid_id="grid-1", caption_version=2, captions=None,
        results={"train": train},
        local={"dataset": local_root / "dataset", "run": local_root / "run", "grid": local_root / "grid",
               "contact_sheet": local_root / "dataset" / "contact_sheet.png"},
    )


def _print_outputs_at_80(outputs) -> str:
    console = Console(file=io.StringIO(), width=80, force_terminal=False, color_system=None)
    original, cli.console = cli.console, console
    try:
        cli.print_outputs(outputs)
    finally:
        cli.console = original
    return console.file.getvalue()


def test_the_outputs_table_shows_every_path_whole_on_one_line(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    printed = _print_outputs_at_80(_outputs(tmp_path / "demo-output" / "outputs"))
    assert max(len(line) for line in printed.splitlines()) <= 80 and "…" not in printed
    for path in ("demo-output/outputs/dataset/images", "demo-output/outputs/dataset/manifest.json",
                 "demo-output/outputs/dataset/contact_sheet.png", "demo-output/outputs/run/checkpoints",
                 "demo-output/outputs/run/loss.png", "demo-output/outputs/run/samples",
                 "demo-output/outputs/grid/grid.png"):
        assert path in printed, printed  # each on one line, as a person copies it
    assert "contact sheet" in printed


def test_a_path_longer_than_the_column_wraps_and_is_never_cut(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    root = Path("/somewhere/else/entirely/with/a/rather/long/folder/name/for/the/outputs/of/this/run")
    printed = _print_outputs_at_80(_outputs(root))
    assert "…" not in printed and max(len(line) for line in printed.splitlines()) <= 80
    cells = "".join(line.split("│")[2].strip() for line in printed.splitlines() if line.count("│") == 3)
    assert str(root / "run" / "loss.png") in cells


def test_a_result_table_names_every_field_and_counts_long_lists():
    from fluxlora_api.v1 import evaluation_pb2
    from fluxlora_client.cli_support import result_table

    result = evaluation_pb2.GridResult(
        grid_id="grid-1", grid_key="grids/grid-1/grid.png", rows=2, cols=2,
        cells=[evaluation_pb2.GridCell(row=r, col=c) for r in range(2) for c in range(2)],
        recommendation=evaluation_pb2.Recommendation(step=200, strength=0.8, basis="convergence", reason="why"))
    console = Console(file=io.StringIO(), width=80, force_terminal=False, color_system=None)
    console.print(result_table(result, counted=frozenset({"cells"})))
    printed = console.file.getvalue()
    assert "grids/grid-1/grid.png" in printed and "4 (--json lists them)" in printed
    assert "recommendation.strength" in printed and "0.8" in printed and "convergence" in printed
    train = training_pb2.TrainResult(run_id="trn-1", sample_keys=["a.png", "b.png"],
                                     checkpoints=[training_pb2.Checkpoint(step=10, lora_key="runs/trn-1/x")])
    console.print(result_table(train))
    assert "step 10  lora_key runs/trn-1/x" in console.file.getvalue()
    assert "a.png, b.png" in console.file.getvalue()


def test_a_note_of_the_service_is_printed_once_before_the_bar():
    console = Console(file=io.StringIO(), width=80, force_terminal=False, color_system=None)
    progress = JobProgress(console)
    note = "memory_mode auto picked fp8 base + gradient checkpointing: the fastest that fits"
    for state in (jobs_pb2.JOB_STATE_QUEUED, jobs_pb2.JOB_STATE_RUNNING):
        progress.on_event("train", jobs_pb2.JobEvent(job=jobs_pb2.Job(job_id="trn-1", state=state, notes=[note])))
    assert " ".join(console.file.getvalue().split()).count(note) == 1


def test_the_pipeline_outputs_as_json_use_camel_case(tmp_path):
    printed = cli.outputs_json(_outputs(tmp_path))
    assert printed["datasetId"] == "ds-0123456789ab" and printed["runId"] == "trn-0123456789ab"
    assert printed["train"]["finalLoss"] == 0.1 and printed["local"]["contactSheet"].endswith("contact_sheet.png")
