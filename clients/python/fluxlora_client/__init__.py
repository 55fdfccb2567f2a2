"""fluxlora Python SDK."""

from fluxlora_client.client import FluxloraClient
from fluxlora_client.errors import FluxloraClientError, JobCancelled, JobFailed
from fluxlora_client.pipeline import PipelineOptions, PipelineOutputs, continue_pipeline, run_pipeline

__all__ = [
    "FluxloraClient",
    "FluxloraClientError",
    "JobCancelled",
    "JobFailed",
    "PipelineOptions",
    "PipelineOutputs",
    "continue_pipeline",
    "run_pipeline",
]
