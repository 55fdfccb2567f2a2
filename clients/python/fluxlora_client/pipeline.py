"""The whole workflow through the SDK: upload -> preprocess -> caption -> train -> evaluate,
then the outputs downloaded to a local folder."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fluxlora_api.v1 import jobs_pb2
from fluxlora_client.client import FluxloraClient


@dataclass
class PipelineOptions:
    trigger_word: str
    base_model: str = ""  # diffusers-layout directory or store://<prefix>; "" = the server default
    caption_model: str = ""  # transformers-layout directory or store://<prefix>
    base_size: int = 1024
    crop_mode: str = "bucket"
    lora_type: str = "concrete"
    remove_phrases: list[str] = field(default_factory=list)
    caption: dict[str, Any] = field(default_factory=dict)  # CaptionSpec fields: task, max_new_tokens, ...
    train: dict[str, Any] = field(default_factory=dict)  # TrainSpec fields
    grid: dict[str, Any] = field(default_factory=dict)  # GridSpec fields


@dataclass
class PipelineOutputs:
    dataset_id: str
    run_id: str
    grid_id: str
    jobs: dict[str, jobs_pb2.Job]
    results: dict[str, Any]
    local: dict[str, Path] = field(default_factory=dict)


def run_pipeline(
    client: FluxloraClient,
    photos: str | Path,
    options: PipelineOptions,
    download_to: str | Path | None = None,
    on_event: Callable[[str, jobs_pb2.JobEvent], None] | None = None,
) -> PipelineOutputs:
    """Runs the four stages in order, each waiting for the one before; raises JobFailed with the
    failing stage's status and message."""
    jobs: dict[str, jobs_pb2.Job] = {}
    results: dict[str, Any] = {}

    def stage(name: str, job: jobs_pb2.Job) -> Any:
        jobs[name] = client.wait(job, on_event=(lambda e: on_event(name, e)) if on_event else None)
        results[name] = client.result(jobs[name])
        return results[name]

    source = client.upload_photos(photos)
    dataset = stage("preprocess", client.preprocess(
        source, base_size=options.base_size, crop_mode=options.crop_mode, lora_type=options.lora_type))
    stage("caption", client.caption(
        dataset.dataset_id, options.trigger_word, model=options.caption_model,
        remove_phrases=options.remove_phrases, **options.caption))
    run = stage("train", client.train(dataset.dataset_id, base_model=options.base_model, **options.train))
    grid = stage("evaluate", client.evaluate(run.run_id, **options.grid))

    outputs = PipelineOutputs(dataset.dataset_id, run.run_id, grid.grid_id, jobs, results)
    if download_to is not None:
        root = Path(download_to)
        outputs.local = {
            "dataset": root / "dataset",
            "run": root / "run",
            "grid": root / "grid",
        }
        client.download(f"datasets/{dataset.dataset_id}/images/", outputs.local["dataset"] / "images")
        client.download(f"datasets/{dataset.dataset_id}/manifest.json", outputs.local["dataset"])
        client.download(f"runs/{run.run_id}/", outputs.local["run"])
        client.download(f"grids/{grid.grid_id}/", outputs.local["grid"])
    return outputs
