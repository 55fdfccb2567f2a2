"""`fluxlora jobs`: list, inspect, watch and cancel any service's jobs."""

from __future__ import annotations

from typing import Annotated

import typer
from google.protobuf import json_format
from rich.markup import escape

from fluxlora_client.cli_support import JsonOutput, _client, _print_result, _run_job, console, table

jobs_app = typer.Typer(help="List, inspect, watch and cancel jobs.", no_args_is_help=True)


@jobs_app.command("list")
def jobs_list(
    service: str,
    limit: Annotated[int, typer.Option(min=0, help="Show the newest this many jobs; 0: every job.")] = 100,
    json_output: JsonOutput = False,
) -> None:
    """List a service's jobs, newest first."""
    from fluxlora_api.v1 import jobs_pb2

    jobs = _client().list_jobs(service, limit=limit)
    if json_output:
        console.print_json(data={"jobs": [json_format.MessageToDict(job) for job in jobs]})
        return
    if not jobs:
        console.print(f"no {escape(service)} jobs")
        return
    listed = table("job", "state", "stage", "progress", "created")
    for job in jobs:
        listed.add_row(
            job.job_id, jobs_pb2.JobState.Name(job.state).removeprefix("JOB_STATE_"), escape(job.progress.stage),
            f"{job.progress.done}/{job.progress.total}", job.created_at.ToJsonString().replace("T", " "),
        )
    console.print(listed)


@jobs_app.command("show")
def jobs_show(job_id: str) -> None:
    """Print one job as JSON."""
    console.print_json(json_format.MessageToJson(_client().get_job(job_id)))


@jobs_app.command("watch")
def jobs_watch(job_id: str, json_output: JsonOutput = False) -> None:
    """Follow a job until it finishes, riding out a restart of its server (up to 5 minutes)."""
    client = _client()
    _print_result(_run_job(client, job_id.split("-")[0], job_id), json_output)


@jobs_app.command("cancel")
def jobs_cancel(job_id: str, json_output: JsonOutput = False) -> None:
    """Ask a job to stop; it stops within seconds at any stage (a training run checkpoints first)."""
    job = _client().cancel(job_id)
    if json_output:
        console.print_json(data={"jobId": job.job_id, "cancelRequested": job.cancel_requested})
    else:
        console.print(f"{job.job_id}: cancel requested" if job.cancel_requested else f"{job.job_id}: already finished",
                      highlight=False)
