"""Grids whose rows are any list of LoRA files (GridSpec.loras) instead of one run's checkpoints,
through the SDK over gRPC: labels, shape, defaults from a named run, and clear statuses for bad
requests."""

from __future__ import annotations

import io
import json
from types import SimpleNamespace

import pytest
from PIL import Image

from fluxlora.common.config import Settings
from fluxlora.common.storage import LocalStore
from fluxlora.domain.runs import list_checkpoints
from fluxlora.evaluation.tiny_models import PROMPT, store_random_run
from fluxlora.server.bootstrap import start_server
from fluxlora_client import FluxloraClient, FluxloraClientError

FAST = {"steps": 3, "width": 64, "height": 64}


@pytest.fixture(scope="module")
def env(tiny_models, tmp_path_factory):
    """An evaluation server without an image-text model over a store holding a run (steps 10, 20)
    and copies of its two LoRA files under loose keys, as a user would upload them."""
    tmp = tmp_path_factory.mktemp("evaluation-loras")
    store = LocalStore(tmp / "store")
    run = store_random_run(store, tiny_models["flux"], steps=(10, 20))
    checkpoints = list_checkpoints(store, run["run_id"])
    files = {}
    for name, step in (("loras/alpha.safetensors", 10), ("loras/beta.safetensors", 20)):
        store.put_bytes(name, store.get_bytes(checkpoints[step]))
        files[name] = step
    settings = Settings(store=str(tmp / "unused"), cache_dir=tmp / "cache", grid_max_cells=24)
    server = start_server("evaluation", settings, store=store, port=0)
    client = FluxloraClient(evaluation=server.address)
    yield SimpleNamespace(client=client, store=store, run_id=run["run_id"], flux=str(tiny_models["flux"]),
                          checkpoints=checkpoints)
    client.close()
    server.stop(grace=1.0)


def grid(env, **options):
    client = env.client
    result = client.result(client.wait(client.evaluate("", **{**FAST, **options})))
    return result, json.loads(env.store.get_bytes(result.report_key))


def rejected(env, **options) -> FluxloraClientError:
    with pytest.raises(FluxloraClientError) as err:
        env.client.evaluate("", **options)
    return err.value


@pytest.fixture(scope="module")
def two_files(env):
    return grid(env, loras=[{"key": "loras/alpha.safetensors"}, {"key": "loras/beta.safetensors", "label": "v2"}],
                strengths=[0.0, 0.5, 1.0], prompt="fluxone, a bottle", base_model=env.flux)


def test_two_lora_files_by_strengths_render_with_their_labels(env, two_files):
    result, report = two_files
    assert (result.rows, result.cols) == (2, 3)
    assert [(c.label, c.lora_key, c.step) for c in result.checkpoints] == [
        ("alpha.safetensors", "loras/alpha.safetensors", 0), ("v2", "loras/beta.safetensors", 0)]
    assert [(c.row, c.col, c.strength) for c in result.cells] == [
        (r, c, s) for r in range(2) for c, s in enumerate([0.0, 0.5, 1.0])]
    assert [c.image_key.rsplit("/", 1)[1] for c in result.cells[:2]] == [
        "row-01_strength-0.0.png", "row-01_strength-0.5.png"]
    assert Image.open(io.BytesIO(env.store.get_bytes(result.cells[0].image_key))).size == (64, 64)
    # the page draws one row per file: taller than one cell row, and it exists
    page = report["panels"][0]["pages"][0]
    assert (page["layout"]["rows"], page["layout"]["cols"]) == (2, 3)
    assert env.store.exists(result.grid_key)
    assert [lora["label"] for lora in report["spec"]["loras"]] == ["alpha.safetensors", "v2"]


def test_without_a_run_there_is_no_convergence_probe_and_the_pick_says_so(two_files):
    result, report = two_files
    assert report["convergence"] is None and report["spec"]["skipConvergence"] is True
    assert not any(c.HasField("heldout_loss") for c in result.checkpoints)
    assert not result.HasField("base_heldout_loss")
    pick = result.recommendation
    assert pick.basis == "default" and (pick.row, pick.strength, pick.label) == (1, 1.0, "v2")


def test_the_same_file_gives_the_same_cells_as_the_runs_checkpoint(env, two_files):
    result, _ = two_files
    by_run, _ = grid(env, loras=[{"run_id": env.run_id, "step": 10}], strengths=[0.5], prompt="fluxone, a bottle",
                     skip_convergence=True)
    assert by_run.checkpoints[0].label == f"{env.run_id} step 10" and by_run.checkpoints[0].step == 10
    assert env.store.get_bytes(by_run.cells[0].image_key) == env.store.get_bytes(result.cells[1].image_key)


def test_a_lora_from_a_run_gives_base_model_prompt_and_the_probe(env):
    result, report = grid(env, loras=[{"key": "loras/beta.safetensors"}, {"run_id": env.run_id}], strengths=[1.0])
    spec = report["spec"]
    assert spec["baseModel"] == env.flux and spec["prompts"] == [PROMPT]
    assert [c.label for c in result.checkpoints] == ["beta.safetensors", f"{env.run_id} step 20"]
    # held-out loss per row on the run's dataset, but no "converged step": files have no training order
    assert all(c.HasField("heldout_loss") for c in result.checkpoints) and result.HasField("base_heldout_loss")
    assert not result.recommendation.HasField("converged_step")


# --- bad requests -------------------------------------------------------------------------------

def test_a_missing_lora_file_is_not_found_naming_the_key(env):
    err = rejected(env, loras=[{"key": "loras/nope.safetensors"}], prompt="x", base_model=env.flux)
    assert err.code == "NOT_FOUND" and "loras/nope.safetensors" in err.message and "spec.loras[0]" in err.message


def test_bad_lora_lists_are_invalid_argument(env):
    cases = [
        ({"loras": [{"key": "loras/alpha.safetensors"}], "base_model": env.flux}, "spec.prompt"),
        ({"loras": [{"key": "loras/alpha.safetensors"}], "prompt": "x"}, "spec.base_model"),
        ({"loras": [{"key": "loras/alpha.pt"}], "prompt": "x", "base_model": env.flux}, ".safetensors"),
        ({"loras": [{}], "prompt": "x", "base_model": env.flux}, "exactly one"),
        ({"loras": [{"key": "loras/alpha.safetensors", "run_id": env.run_id}], "prompt": "x"}, "exactly one"),
        ({"loras": [{"key": "loras/alpha.safetensors"}], "prompt": "x", "base_model": env.flux,
          "checkpoint_steps": [10]}, "checkpoint_steps"),
        ({"loras": [{"key": "loras/alpha.safetensors"}] * 9, "prompt": "x", "base_model": env.flux}, "limit"),
    ]
    for options, named in cases:
        err = rejected(env, **options)
        assert err.code == "INVALID_ARGUMENT" and named in err.message, (options, err.message)


def test_run_id_and_loras_together_are_invalid_argument(env):
    with pytest.raises(FluxloraClientError) as err:
        env.client.evaluate(env.run_id, loras=[{"key": "loras/alpha.safetensors"}])
    assert err.value.code == "INVALID_ARGUMENT"
    assert "spec.run_id" in err.value.message and "spec.loras" in err.value.message


def test_a_missing_run_behind_a_lora_is_not_found(env):
    err = rejected(env, loras=[{"run_id": "trn-doesnotexist"}], prompt="x")
    assert err.code == "NOT_FOUND" and "trn-doesnotexist" in err.message
