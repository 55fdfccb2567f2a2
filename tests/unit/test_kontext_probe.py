"""The convergence probe of an editing (FLUX.1 Kontext) run edits each probe image's control image, as
training did: the grid job fetches the controls of the probe's pairs, and the probe gives the
transformer the control's tokens after the target's and scores the target's only."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from fluxlora.common import keys
from fluxlora.common.storage import LocalStore
from fluxlora.evaluation import grid_job
from fluxlora.evaluation.heldout import prepare_probe, probe_loss
from fluxlora.models.loading import load_flux_pipeline
from fluxlora.models.tiny_kontext import write_tiny_kontext
from fluxlora_api.v1 import evaluation_pb2 as pb

INSTRUCTION = "make the blue square a red circle"


@pytest.fixture(scope="module")
def kontext(tmp_path_factory):
    return load_flux_pipeline(write_tiny_kontext(tmp_path_factory.mktemp("tiny-kontext"), seed=0), "cpu",
                              torch.float32)


@pytest.fixture(scope="module")
def halves(shape_image):
    return shape_image((64, 64), "red"), shape_image((64, 64), "blue", "rectangle")


def seen_by_the_transformer(pipe):
    seen = []
    hook = pipe.transformer.register_forward_pre_hook(
        lambda module, args, kwargs: seen.append((kwargs["hidden_states"].shape[1], kwargs["img_ids"].clone())),
        with_kwargs=True)
    return seen, hook


def test_the_probe_appends_the_control_tokens_and_scores_the_target(kontext, halves, shape_image):
    target, control = halves
    probe = prepare_probe(kontext, [(target, INSTRUCTION)], 64, controls=[control])
    [item] = probe.items
    assert item.control is not None and item.control.shape == item.latents.shape
    seen, hook = seen_by_the_transformer(kontext)
    try:
        with_control = probe_loss(kontext, probe)
    finally:
        hook.remove()
    [(tokens, ids)] = seen
    assert tokens == 2 * 16 * 16  # 64 px -> 32x32 latents -> 16x16 packed tokens, then as many control ones
    assert (ids[:256, 0] == 0).all() and (ids[256:, 0] == 1).all()
    # The loss depends on the control image: it is the edit's input, not decoration.
    other = prepare_probe(kontext, [(target, INSTRUCTION)], 64, controls=[shape_image((64, 64), "green")])
    assert probe_loss(kontext, other) != with_control > 0
    assert probe_loss(kontext, prepare_probe(kontext, [(target, INSTRUCTION)], 64)) != with_control


def test_a_text_to_image_family_ignores_controls(tiny_flux_dir, halves):
    pipe = load_flux_pipeline(tiny_flux_dir, "cpu", torch.float32)
    target, control = halves
    probe = prepare_probe(pipe, [(target, "a red circle")], 64, controls=[control])
    assert probe.items[0].control is None
    assert probe_loss(pipe, probe) == probe_loss(pipe, prepare_probe(pipe, [(target, "a red circle")], 64))


def test_the_grid_job_fetches_the_probe_images_controls(tmp_path, halves):
    store = LocalStore(tmp_path / "store")
    target, control = halves
    for stem in ("a", "b"):
        local = tmp_path / f"{stem}.png"
        target.save(local)
        store.put_file(keys.dataset_images("ds-pairs") + f"{stem}.png", local)
        store.put_bytes(keys.dataset_images("ds-pairs") + f"{stem}.txt", INSTRUCTION.encode())
    control.save(tmp_path / "control.png")
    store.put_file(keys.dataset_controls("ds-pairs") + "a.png", tmp_path / "control.png")  # b has none
    ctx = SimpleNamespace(store=store, scratch=tmp_path / "scratch", warn=print)
    dataset = grid_job._dataset_images(ctx, {"dataset_id": "ds-pairs", "run_id": "r"},
                                       pb.GridSpec(image_text_model="none"))
    assert dataset.probe == ["a", "b"] and dataset.images["a"][1] == INSTRUCTION
    assert set(dataset.controls) == {"a"}
    assert dataset.controls["a"].tobytes() == control.convert("RGB").tobytes()
