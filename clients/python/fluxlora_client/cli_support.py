"""What every `fluxlora` command shares: the console, the SDK client from the environment, and
following a job to its result."""

from __future__ import annotations

from google.protobuf import json_format
from rich.console import Console

console = Console()


def _client():
    """An SDK client from FLUXLORA_<SERVICE>_ADDR, the token and TLS settings: no store needed."""
    from fluxlora_client.client import FluxloraClient

    return FluxloraClient.from_env()


def _run_job(client, label: str, job):
    from fluxlora_client.progress import JobProgress

    with JobProgress() as progress:
        final = client.wait(job, on_event=lambda e: progress.on_event(label, e))
    return client.result(final)


def _print_result(result) -> None:
    console.print_json(json_format.MessageToJson(result))
