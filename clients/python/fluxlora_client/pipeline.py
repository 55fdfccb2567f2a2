"""The whole workflow through the SDK: upload -> preprocess -> caption -> approve -> train -> evaluate,
then the outputs downloaded to a local folder.

Training always reads an approved caption version, named in its spec (caption_version), so a run
says which captions it learned from. By default the pipeline approves the cleaned auto captions
itself (author "pipeline"); with review=True it stops after captioning and writes the review page,
and a person edits and approves the captions before continue_pipeline trains on them:

    out = run_pipeline(client, "photos/", PipelineOptions(trigger_word="ohwx", review=True), "out/")
    print("\\n".join(out.next_steps))           # open out/review.html, import-review, approve
    out = continue_pipeline(client, out.dataset_id, options, "out/")
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fluxlora_api.v1 import captioning_pb2, jobs_pb2
from fluxlora_client.client import FluxloraClient
from fluxlora_client.errors import FluxloraClientError

AUTO_APPROVAL_COMMENT = "auto-approved: the cleaned auto captions, not reviewed by a person"


@dataclass
class PipelineOptions:
    trigger_word: str
    base_model: str = ""  # diffusers-layout directory or store://<prefix>; "" = the server default
    caption_model: str = ""  # transformers-layout directory or store://<prefix>
    # Unset (0, "") options take the server's defaults (docs/api.md): base size 1024, bucket, concrete.
    base_size: int = 0
    crop_mode: str = ""
    lora_type: str = ""
    remove_phrases: list[str] = field(default_factory=list)
    caption: dict[str, Any] = field(default_factory=dict)  # CaptionSpec fields: task, max_new_tokens, ...
    train: dict[str, Any] = field(default_factory=dict)  # TrainSpec fields
    grid: dict[str, Any] = field(default_factory=dict)  # GridSpec fields
    # Stop after captioning with the review page written, for a person to review and approve the
    # captions; continue_pipeline then trains on the approved version.
    review: bool = False
    approve_author: str = "pipeline"  # who the auto-approved caption version names


@dataclass
class PipelineOutputs:
    dataset_id: str
    run_id: str
    grid_id: str
    jobs: dict[str, jobs_pb2.Job]
    results: dict[str, Any]
    local: dict[str, Path] = field(default_factory=dict)
    # The approved caption version training used; after a review stop, the draft version to review.
    caption_version: int = 0
    captions: captioning_pb2.CaptionVersionInfo | None = None
    review_page: Path | None = None  # set when the pipeline stopped for a review
    next_steps: list[str] = field(default_factory=list)  # what to do after a review stop

    @property
    def stopped_for_review(self) -> bool:
        return self.review_page is not None


def run_pipeline(
    client: FluxloraClient,
    photos: str | Path,
    options: PipelineOptions,
    download_to: str | Path | None = None,
    on_event: Callable[[str, jobs_pb2.JobEvent], None] | None = None,
) -> PipelineOutputs:
    """Runs the stages in order, each waiting for the one before; raises JobFailed with the failing
    stage's status and message. With options.review it returns after captioning (stopped_for_review)."""
    outputs = PipelineOutputs("", "", "", {}, {})
    stage = _stages(client, outputs, on_event)
    source = client.upload_photos(photos)
    dataset = stage("preprocess", client.preprocess(
        source, base_size=options.base_size, crop_mode=options.crop_mode, lora_type=options.lora_type))
    outputs.dataset_id = dataset.dataset_id
    captioned = stage("caption", client.caption(
        dataset.dataset_id, options.trigger_word, model=options.caption_model,
        remove_phrases=options.remove_phrases, **options.caption))

    if options.review:
        root = Path(download_to) if download_to is not None else Path(".")
        outputs.caption_version = captioned.version
        outputs.review_page = client.captions.write_review_page(dataset.dataset_id, root / "review.html",
                                                                version=captioned.version)
        outputs.next_steps = review_steps(dataset.dataset_id, captioned.version, outputs.review_page)
        return outputs

    # The cleaned captions become an approved version of their own, so the run names exactly what it
    # trained on and the history says nobody looked at them.
    approved = client.captions.approve(dataset.dataset_id, captioned.version, author=options.approve_author,
                                       comment=AUTO_APPROVAL_COMMENT)
    outputs.results["approve"] = approved
    return _train_and_evaluate(client, outputs, approved.version, options, download_to, stage)


def continue_pipeline(
    client: FluxloraClient,
    dataset_id: str,
    options: PipelineOptions,
    download_to: str | Path | None = None,
    on_event: Callable[[str, jobs_pb2.JobEvent], None] | None = None,
    caption_version: int = 0,
) -> PipelineOutputs:
    """Train and evaluate a captioned dataset on an approved caption version: caption_version, or by
    default the approved one, which must be the latest (FAILED_PRECONDITION otherwise, so edits made
    after an approval are never silently left out)."""
    history = client.captions.history(dataset_id)
    by_number = {v.version: v for v in history.versions}
    version = caption_version or history.approved_version
    if not version:
        raise FluxloraClientError(
            "FAILED_PRECONDITION",
            f"dataset {dataset_id!r} has no approved captions (latest version {history.head_version}): review "
            f"them, then `fluxlora caption approve {dataset_id}`",
        )
    if not caption_version and history.head_version != version:
        raise FluxloraClientError(
            "FAILED_PRECONDITION",
            f"caption version {history.head_version} of dataset {dataset_id!r} is newer than the approved version "
            f"{version}: approve it (`fluxlora caption approve {dataset_id}`) or name version {version} to train on",
        )
    if version not in by_number:
        raise FluxloraClientError("NOT_FOUND", f"dataset {dataset_id!r} has no caption version {version}")
    outputs = PipelineOutputs(dataset_id, "", "", {}, {})
    return _train_and_evaluate(client, outputs, by_number[version], options, download_to,
                               _stages(client, outputs, on_event))


def review_steps(dataset_id: str, version: int, page: Path, continue_command: str = "") -> list[str]:
    """What a person does after a review stop, as commands to copy."""
    edits = f"{dataset_id}-v{version}-edits.json"
    return [
        f"open {page} in a browser, fix the captions and press Download edits (it saves {edits})",
        f"fluxlora caption import-review {dataset_id} {edits}    # if you changed any",
        f"fluxlora caption approve {dataset_id}",
        continue_command or f"continue_pipeline(client, {dataset_id!r}, options)    # train on the approved version",
    ]


def _stages(client: FluxloraClient, outputs: PipelineOutputs,
            on_event: Callable[[str, jobs_pb2.JobEvent], None] | None) -> Callable[[str, jobs_pb2.Job], Any]:
    def stage(name: str, job: jobs_pb2.Job) -> Any:
        outputs.jobs[name] = client.wait(job, on_event=(lambda e: on_event(name, e)) if on_event else None)
        outputs.results[name] = client.result(outputs.jobs[name])
        return outputs.results[name]

    return stage


def _train_and_evaluate(client: FluxloraClient, outputs: PipelineOutputs, captions: captioning_pb2.CaptionVersionInfo,
                        options: PipelineOptions, download_to: str | Path | None,
                        stage: Callable[[str, jobs_pb2.Job], Any]) -> PipelineOutputs:
    dataset_id = outputs.dataset_id
    outputs.caption_version, outputs.captions = captions.version, captions
    run = stage("train", client.train(dataset_id, base_model=options.base_model,
                                      **{**options.train, "caption_version": captions.version}))
    grid = stage("evaluate", client.evaluate(run.run_id, **options.grid))
    outputs.run_id, outputs.grid_id = run.run_id, grid.grid_id
    if download_to is not None:
        root = Path(download_to)
        outputs.local = {
            "dataset": root / "dataset",
            "run": root / "run",
            "grid": root / "grid",
        }
        client.download(f"datasets/{dataset_id}/images/", outputs.local["dataset"] / "images")
        client.download(f"datasets/{dataset_id}/manifest.json", outputs.local["dataset"])
        preprocessed = outputs.results.get("preprocess")
        sheet = getattr(preprocessed, "contact_sheet_key", "") or f"datasets/{dataset_id}/contact_sheet.png"
        for path in client.download(sheet, outputs.local["dataset"]):  # none for a dataset made before them
            outputs.local["contact_sheet"] = path
        client.download(f"runs/{run.run_id}/", outputs.local["run"])
        client.download(f"grids/{grid.grid_id}/", outputs.local["grid"])
    return outputs
