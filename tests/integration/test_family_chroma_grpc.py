"""Chroma and FLUX.2 [klein] and [dev] through gRPC: a run names no family (detected from the model)
or the right one; a wrong one is refused at submit naming the model and the fix; the run's
checkpoints (diffusers and kohya files) render in a grid through the family's pipeline
(ChromaPipeline, Flux2KleinPipeline, Flux2Pipeline), the convergence probe included. A FLUX.2 [dev]
model is also planned from its config alone."""

from __future__ import annotations

import json

import pytest
from training_support import assert_wrong_family_refused, render_two_strength_grid, train_to_two_checkpoints

from fluxlora.models.families.configs import write_config
from support import put_circles

# One store is enough here: the families change the model code, not the storage.
pytestmark = pytest.mark.parametrize("store", ["local"], indirect=True)

DATASET = "ds-chroma0000001"
FAMILY_RUNS = [  # the family, a wrong one to name first, whether the run names its family (else detected)
    ("chroma", "flux1-dev", False),
    ("flux2-klein", "chroma", True),
    # [klein]'s transformer class: the pipeline class tells them apart, so naming klein is refused.
    ("flux2-dev", "flux2-klein", True),
]


@pytest.mark.parametrize(("family", "wrong", "named"), FAMILY_RUNS)
def test_each_family_run_trains_checkpoints_and_renders_a_grid(running, tiny_family, family, wrong, named, tmp_path):
    """A wrong family is refused naming the model and the right one; the run trains to two checkpoints,
    both files stored, and renders a 2-strength grid."""
    client, model = running, tiny_family(family)
    dataset = put_circles(client.store, tmp_path, DATASET)
    assert_wrong_family_refused(client, dataset, model, wrong, family)
    job, _ = train_to_two_checkpoints(client, dataset, model, **({"family": family} if named else {}))
    render_two_strength_grid(client, job)


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
