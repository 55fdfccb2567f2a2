"""The whole workflow through the SDK over gRPC, on both store backends (local directory and S3):
photos -> preprocess -> caption -> train -> evaluate, then the artifacts checked as a user would."""

from __future__ import annotations

import csv
import io
import json

import pytest
from PIL import Image

from fluxlora.captioning.cleaning import count_trigger
from fluxlora.common.storage import LocalStore
from fluxlora.evaluation.render import latent_distances_to_image
from fluxlora.training.trainer.config import ATTENTION_AND_MLP_TARGETS
from fluxlora_api.v1 import jobs_pb2
from fluxlora_client import PipelineOptions, run_pipeline
from support import make_s3_store, services_and_client

TRIGGER = "fluxone"
STEPS = 200
EVERY = 50


@pytest.fixture(scope="module", params=["local", "s3"])
def outputs(request, photos, tiny_models, tmp_path_factory):
    """One pipeline run per backend, shared by the tests of this module."""
    tmp_path = tmp_path_factory.mktemp(f"e2e-{request.param}")
    if request.param == "local":
        store = LocalStore(tmp_path / "store")
    else:
        store = make_s3_store(request.getfixturevalue("moto_endpoint"))
    with services_and_client(store, tmp_path) as running:
        yield run_and_record(running, photos, tiny_models, tmp_path)


def run_and_record(running, photos, tiny_models, tmp_path):
    events: list[tuple[str, jobs_pb2.JobEvent]] = []
    options = PipelineOptions(
        trigger_word=TRIGGER,
        base_model=str(tiny_models["flux"]),
        caption_model=str(tiny_models["florence2"]),
        base_size=64,
        remove_phrases=["bottle"],
        train={"resolution": 64, "max_steps": STEPS, "checkpoint_every": EVERY, "sample_every": EVERY,
               "learning_rate": 1e-3, "rank": 8, "sample_steps": 2, "target_modules": ATTENTION_AND_MLP_TARGETS},
        grid={"steps": 4},
    )
    result = run_pipeline(running, photos, options, download_to=tmp_path / "out",
                          on_event=lambda stage, e: events.append((stage, e)))
    return running, result, events


def test_every_stage_succeeds_and_reports_progress(outputs):
    client, result, events = outputs
    assert set(result.jobs) == {"preprocess", "caption", "train", "evaluate"}
    assert all(job.state == jobs_pb2.JOB_STATE_SUCCEEDED for job in result.jobs.values())
    train_progress = [e.job.progress for stage, e in events if stage == "train" and e.job.progress.stage == "training"]
    assert train_progress and train_progress[-1].done == STEPS and train_progress[-1].total == STEPS
    assert "loss" in result.jobs["train"].metrics


def test_the_dataset_has_a_manifest_and_every_caption_holds_the_trigger_once(outputs):
    client, result, _ = outputs
    manifest = json.loads(client.store.get_bytes(f"datasets/{result.dataset_id}/manifest.json"))
    stems = [image["stem"] for image in manifest["images"]]
    assert len(stems) == result.results["preprocess"].image_count > 0
    for stem in stems:
        caption = client.store.get_bytes(f"datasets/{result.dataset_id}/images/{stem}.txt").decode()
        assert count_trigger(caption, TRIGGER) == 1, caption
        assert caption.startswith(TRIGGER)
        assert "bottle" not in caption.lower()


def test_training_used_the_caption_version_the_pipeline_approved(outputs):
    client, result, _ = outputs
    spec = client.spec(result.jobs["train"])
    assert spec.caption_version == result.caption_version > result.results["caption"].version
    approved = {v.version: v for v in client.captions.history(result.dataset_id).versions}[spec.caption_version]
    assert (approved.kind, approved.approved, approved.author, approved.parent) == (
        "approve", True, "pipeline", result.results["caption"].version)
    assert "auto-approved" in approved.comment and "not reviewed" in approved.comment
    entries = client.captions.list(result.dataset_id, spec.caption_version).entries
    assert len(entries) == result.results["preprocess"].image_count
    assert all(count_trigger(e.caption, TRIGGER) == 1 for e in entries)


def test_the_loss_of_a_short_overfit_run_falls(outputs):
    client, result, _ = outputs
    rows = list(csv.DictReader(io.StringIO(client.store.get_bytes(f"runs/{result.run_id}/loss.csv").decode())))
    losses = [float(r["loss"]) for r in rows]
    assert len(losses) == STEPS
    first, last = losses[: STEPS // 5], losses[-STEPS // 5:]
    assert sum(last) / len(last) < 0.8 * sum(first) / len(first)


def test_checkpoints_plot_and_samples_are_stored_every_n_steps(outputs):
    client, result, _ = outputs
    train = result.results["train"]
    assert [c.step for c in train.checkpoints] == list(range(EVERY, STEPS + 1, EVERY))
    for checkpoint in train.checkpoints:
        assert client.store.stat(checkpoint.lora_key).size > 0
    assert Image.open(result.local["run"] / "loss.png").size[0] > 100
    assert len(train.sample_keys) == STEPS // EVERY
    assert (result.local["grid"] / "grid.png").exists()
    assert result.local["contact_sheet"] == result.local["dataset"] / "contact_sheet.png"
    assert Image.open(result.local["contact_sheet"]).size[0] > 100  # beside the dataset, as the outputs table says


def test_the_lora_moves_generations_toward_the_training_image(outputs, tiny_models):
    client, result, _ = outputs
    final = result.results["train"].checkpoints[-1]
    manifest = json.loads(client.store.get_bytes(f"datasets/{result.dataset_id}/manifest.json"))
    stem = manifest["images"][0]["stem"]
    image = result.local["dataset"] / "images" / f"{stem}.png"
    caption = (result.local["dataset"] / "images" / f"{stem}.txt").read_text().strip()
    lora = result.local["run"] / final.lora_key.split(f"runs/{result.run_id}/", 1)[1]
    at_zero, at_one = latent_distances_to_image(tiny_models["flux"], lora, image, caption, (0.0, 1.0), steps=8)
    assert at_one < 0.6 * at_zero, (at_zero, at_one)


def test_the_grid_is_checkpoints_by_strengths_and_its_size_is_cells_plus_labels(outputs):
    client, result, _ = outputs
    grid = result.results["evaluate"]
    report = json.loads(client.store.get_bytes(grid.report_key))
    layout = report["layout"]
    checkpoints = [c.step for c in result.results["train"].checkpoints]
    assert (grid.rows, grid.cols) == (len(checkpoints), 6)
    assert [c.strength for c in grid.cells[:6]] == pytest.approx([0.0, 0.2, 0.4, 0.6, 0.8, 1.0])
    assert [grid.cells[r * 6].step for r in range(grid.rows)] == checkpoints
    cell = Image.open(io.BytesIO(client.store.get_bytes(grid.cells[0].image_key)))
    assert cell.size == (layout["cell_width"], layout["cell_height"]) == (64, 64)
    png = Image.open(io.BytesIO(client.store.get_bytes(grid.grid_key)))
    expected_width = 2 * layout["pad"] + layout["label_width"] + grid.cols * (layout["cell_width"] + layout["gap"])
    expected_height = (2 * layout["pad"] + layout["title_height"] + layout["col_label_height"]
                       + grid.rows * (layout["cell_height"] + layout["gap"]))
    assert png.size == (expected_width, expected_height)
    # the 0.0 column is the base model: identical for every checkpoint
    zero_cells = [Image.open(io.BytesIO(client.store.get_bytes(c.image_key))).tobytes()
                  for c in grid.cells if c.strength == 0.0]
    assert len(set(zero_cells)) == 1
