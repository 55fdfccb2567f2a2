"""Chroma and FLUX.2 [klein] and [dev] through gRPC: a run names no family (detected from the model)
or the right one; a wrong one is refused at submit naming the model and the fix; the run's
checkpoints (diffusers and kohya files) render in a grid through the family's pipeline
(ChromaPipeline, Flux2KleinPipeline, Flux2Pipeline), the convergence probe included. A FLUX.2 [dev]
model is also planned from its config alone."""

from __future__ import annotations

import json

import pytest

from fluxlora.common.storage import LocalStore
from fluxlora.models.families.configs import write_config
from fluxlora.models.tiny_chroma import write_tiny_chroma
from fluxlora.models.tiny_flux2 import write_tiny_flux2_dev, write_tiny_flux2_klein
from fluxlora_api.v1 import jobs_pb2
from fluxlora_client.errors import FluxloraClientError
from support import put_circles

DATASET = "ds-chroma0000001"


@pytest.fixture
def store(tmp_path):
    """One store is enough here: the families change the model code, not the storage."""
    return LocalStore(tmp_path / "store")


@pytest.fixture(scope="module")
def chroma(tmp_path_factory):
    return write_tiny_chroma(tmp_path_factory.mktemp("tiny-chroma"))


def put_dataset(store, tmp_path) -> str:
    return put_circles(store, tmp_path, DATASET)


def test_a_chroma_run_trains_checkpoints_and_renders_a_grid(running, chroma, tmp_path):
    client = running
    dataset = put_dataset(client.store, tmp_path)
    options = dict(resolution=64, max_steps=4, checkpoint_every=2, sample_every=0, rank=4, learning_rate=1e-3)

    with pytest.raises(FluxloraClientError) as refused:
        client.train(dataset, base_model=str(chroma), family="flux1-dev", **options)
    assert refused.value.code == "INVALID_ARGUMENT"
    assert str(chroma) in refused.value.message and "set family to 'chroma'" in refused.value.message

    job = client.wait(client.train(dataset, base_model=str(chroma), **options))
    assert job.state == jobs_pb2.JOB_STATE_SUCCEEDED, job.error
    result = client.result(job)
    assert [c.step for c in result.checkpoints] == [2, 4]
    for checkpoint in result.checkpoints:
        assert client.store.exists(checkpoint.lora_key) and client.store.exists(checkpoint.kohya_lora_key)

    grid = client.wait(client.evaluate(job.job_id, [0.0, 1.0], steps=2, width=64, height=64,
                                       image_text_model="none"))
    assert grid.state == jobs_pb2.JOB_STATE_SUCCEEDED, grid.error
    cells = client.result(grid).cells
    assert len(cells) == 4 and all(client.store.exists(c.image_key) for c in cells)


def train_and_grid(client, model, family: str, wrong: str, tmp_path) -> None:
    """A wrong family is refused naming the right one; the right one trains to two checkpoints,
    both files stored, and the run renders a 2-strength grid."""
    dataset = put_dataset(client.store, tmp_path)
    options = dict(resolution=64, max_steps=4, checkpoint_every=2, sample_every=0, rank=4, learning_rate=1e-3)

    with pytest.raises(FluxloraClientError) as refused:
        client.train(dataset, base_model=str(model), family=wrong, **options)
    assert refused.value.code == "INVALID_ARGUMENT" and f"set family to '{family}'" in refused.value.message

    job = client.wait(client.train(dataset, base_model=str(model), family=family, **options))
    assert job.state == jobs_pb2.JOB_STATE_SUCCEEDED, job.error
    result = client.result(job)
    assert [c.step for c in result.checkpoints] == [2, 4]
    for checkpoint in result.checkpoints:
        assert client.store.exists(checkpoint.lora_key) and client.store.exists(checkpoint.kohya_lora_key)

    grid = client.wait(client.evaluate(job.job_id, [0.0, 1.0], steps=2, width=64, height=64,
                                       image_text_model="none"))
    assert grid.state == jobs_pb2.JOB_STATE_SUCCEEDED, grid.error
    cells = client.result(grid).cells
    assert len(cells) == 4 and all(client.store.exists(c.image_key) for c in cells)


def test_a_flux2_klein_run_trains_checkpoints_and_renders_a_grid(running, tmp_path):
    train_and_grid(running, write_tiny_flux2_klein(tmp_path / "tiny-klein"), "flux2-klein", "chroma", tmp_path)


def test_a_flux2_dev_run_trains_checkpoints_and_renders_a_grid(running, tmp_path):
    # [klein]'s transformer class: the pipeline class tells them apart, so naming klein is refused.
    train_and_grid(running, write_tiny_flux2_dev(tmp_path / "tiny-dev"), "flux2-dev", "flux2-klein", tmp_path)


def test_flux2_dev_is_planned_from_its_config(running, tmp_path):
    """FLUX.2 [dev]'s config directory (`fluxlora models write-config`, shrunk here so the fake
    step takes a second) is planned through PlanTraining."""
    client = running
    model = write_config("flux2-dev", tmp_path / "dev")
    config = json.loads((model / "transformer" / "config.json").read_text())
    config.update(num_layers=1, num_single_layers=1, num_attention_heads=2, attention_head_dim=16,
                  joint_attention_dim=32, axes_dims_rope=[4, 4, 4, 4], timestep_guidance_channels=32)
    (model / "transformer" / "config.json").write_text(json.dumps(config))

    plan = client.plan_training(base_model=str(model), resolution=512, target_gib=24)
    assert plan.fits and 0 < plan.total_gib < 24
