"""The evaluation service through the SDK and CLI over gRPC: grids with scores and a recommended
(checkpoint, strength), the third axis and pages, Generate, determinism, the shared base pipeline
and that no LoRA leaks from one job into the next."""

from __future__ import annotations

import io
import json
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from fluxlora.common.config import Settings
from fluxlora.common.storage import LocalStore
from fluxlora.evaluation.grid import BACKGROUND, HIGHLIGHT, GridLayout
from fluxlora.evaluation.pipelines import PIPELINES
from fluxlora.evaluation.tiny_models import PROMPT, store_random_run, write_tiny_clip
from fluxlora.server.bootstrap import start_server
from fluxlora_client import FluxloraClient, cli

MAX_CELLS = 24
FAST = {"steps": 3}


@pytest.fixture(scope="module")
def env(tiny_models, tmp_path_factory):
    """An evaluation server (cell limit 24, a tiny CLIP as image-text model) over a local store
    holding a run with checkpoints at steps 10, 20, 30 and its captioned dataset."""
    tmp = tmp_path_factory.mktemp("evaluation")
    store = LocalStore(tmp / "store")
    run = store_random_run(store, tiny_models["flux"])
    clip = write_tiny_clip(tmp / "clip")
    settings = Settings(store=str(tmp / "unused"), cache_dir=tmp / "cache", grid_max_cells=MAX_CELLS,
                        image_text_model=str(clip))
    server = start_server("evaluation", settings, store=store, port=0)
    client = FluxloraClient(evaluation=server.address)
    yield SimpleNamespace(client=client, store=store, run_id=run["run_id"], address=server.address,
                          flux=str(tiny_models["flux"]))
    client.close()
    server.stop(grace=1.0)


def grid(env, **options):
    client = env.client
    result = client.result(client.wait(client.evaluate(env.run_id, **{**FAST, **options})))
    return result, json.loads(env.store.get_bytes(result.report_key))


def generate(env, prompts=PROMPT, **options):
    client = env.client
    options = {"steps": 3, "width": 64, "height": 64, "base_model": env.flux, **options}
    return client.result(client.wait(client.generate(prompts, **options)))


def png(env, key) -> bytes:
    return env.store.get_bytes(key)


@pytest.fixture(scope="module")
def default_grid(env):
    return grid(env)


# --- picking the best -------------------------------------------------------------------------

def test_the_report_scores_every_checkpoint_and_cell_and_recommends_one(default_grid):
    result, report = default_grid
    assert (result.rows, result.cols) == (3, 6)
    assert [c.step for c in result.checkpoints] == [10, 20, 30]
    assert all(c.HasField("heldout_loss") and c.HasField("fidelity") for c in result.checkpoints)
    assert result.HasField("base_heldout_loss")
    assert len(result.cells) == 18
    assert all(c.scores.HasField("fidelity") and c.scores.HasField("flexibility") for c in result.cells)

    pick = result.recommendation
    assert pick.basis == "convergence+image-text"
    assert pick.converged_step in (10, 20, 30) and pick.step >= pick.converged_step
    assert pick.strength > 0
    assert (result.cells[pick.row * 6 + pick.col].step, result.cells[pick.row * 6 + pick.col].strength) == \
        (pick.step, pick.strength)
    # the recommended cell has the highest combined score among the candidates
    candidates = [c for c in result.cells if c.step >= pick.converged_step and c.strength > 0]
    assert result.cells[pick.row * 6 + pick.col].scores.score == max(c.scores.score for c in candidates)

    assert report["recommendation"]["step"] == str(pick.step)  # int64 as JSON string
    assert "fidelity" in report["rule"] and "converged" in report["rule"]
    convergence = report["convergence"]
    assert convergence["sigmas"] == [0.25, 0.5, 0.75] and convergence["images"] == ["img0", "img1", "img2", "img3"]
    assert set(convergence["losses"]) == {"10", "20", "30"}
    assert report["image_text"]["flexibility_texts"] == ["a bottle on a table"]  # trigger word removed
    assert len(report["cells"]) == 18 and "score" in report["cells"][0]["scores"]


def test_the_grid_frames_the_recommended_cell(env, default_grid):
    result, report = default_grid
    [page] = report["panels"][0]["pages"]
    layout = GridLayout(**{k: v for k, v in page["layout"].items() if k not in ("width", "height")})
    image = Image.open(io.BytesIO(png(env, result.grid_key))).convert("RGB")
    pick = result.recommendation
    for row in range(layout.rows):
        for col in range(layout.cols):
            left, top, _, bottom = layout.cell_box(row, col)
            frame = image.getpixel((left - layout.border // 2 - 1, (top + bottom) // 2))
            assert frame == (HIGHLIGHT if (row, col) == (pick.row, pick.col) else BACKGROUND), (row, col)


def test_defaults_come_from_the_run(env, default_grid):
    result, report = default_grid
    spec = report["spec"]
    assert spec["prompts"] == [PROMPT] and spec["seeds"] == ["42"]
    assert (spec["width"], spec["height"], spec["steps"]) == (64, 64, 3)
    assert spec["strengths"] == [0.0, 0.2, 0.4, 0.6, 0.8, 1.0]
    assert result.grid_key == f"grids/{result.grid_id}/grid.png"
    assert Image.open(io.BytesIO(png(env, result.cells[0].image_key))).size == (64, 64)


def test_without_an_image_text_model_the_pick_rests_on_convergence(env):
    result, report = grid(env, strengths=[0.0, 0.5, 1.0], image_text_model="none")
    assert result.recommendation.basis == "convergence"
    assert result.recommendation.step == result.recommendation.converged_step
    assert result.recommendation.strength == 1.0
    assert report["image_text"] is None and not result.cells[0].scores.HasField("fidelity")


# --- determinism and the base model -----------------------------------------------------------

def test_the_same_request_twice_gives_identical_png_bytes(env):
    options = {"strengths": [0.0, 0.6, 1.2], "checkpoint_steps": [10, 30], "seed": 5}
    first, _ = grid(env, **options)
    second, _ = grid(env, **options)
    assert first.grid_id != second.grid_id
    for a, b in zip(first.cells, second.cells, strict=True):
        assert png(env, a.image_key) == png(env, b.image_key)
        assert a.scores == b.scores
    assert png(env, first.grid_key) == png(env, second.grid_key)
    assert first.checkpoints == second.checkpoints


def test_the_zero_column_is_the_base_models_output_for_every_checkpoint(env, default_grid):
    result, _ = default_grid
    [base] = generate(env, PROMPT, seed=42).images
    zero = {png(env, c.image_key) for c in result.cells if c.strength == 0.0}
    assert zero == {png(env, base.image_key)}
    full = [png(env, c.image_key) for c in result.cells if c.strength == 1.0]
    assert png(env, base.image_key) not in full


def test_no_lora_leaks_from_one_job_into_the_next(env):
    before = png(env, generate(env, seed=7).images[0].image_key)
    with_lora = generate(env, seed=7, loras=[{"run_id": env.run_id, "strength": 1.5}])
    assert png(env, with_lora.images[0].image_key) != before
    grid(env, checkpoint_steps=[20], strengths=[0.0, 1.0], image_text_model="none")
    after = png(env, generate(env, seed=7).images[0].image_key)
    assert after == before


def test_the_base_model_loads_at_most_once_per_job_and_is_reused(env):
    start = PIPELINES.loads
    grid(env, strengths=[0.0, 0.5, 1.0], image_text_model="none")
    assert PIPELINES.loads - start <= 1  # three checkpoints, one base
    loaded = PIPELINES.loads
    grid(env, strengths=[0.3, 0.7], image_text_model="none")
    generate(env, seed=1, loras=[{"run_id": env.run_id, "step": 10}])
    assert PIPELINES.loads == loaded  # the same base model: reused across jobs


# --- third axis and pages ---------------------------------------------------------------------

def test_prompts_and_seeds_make_several_grids_and_long_grids_are_paged(env):
    prompts = ["fluxone, a bottle", "fluxone, a bottle on the beach"]
    result, report = grid(env, prompts=prompts, seeds=[1, 2], strengths=[0.0, 1.0], rows_per_page=2,
                          image_text_model="none", skip_convergence=True)
    assert [(p.prompt, p.seed) for p in result.panels] == [(prompts[0], 1), (prompts[0], 2), (prompts[1], 1),
                                                          (prompts[1], 2)]
    assert len(result.cells) == 4 * 3 * 2
    assert [c.panel for c in result.cells] == [p for p in range(4) for _ in range(6)]
    for panel, panel_report in zip(result.panels, report["panels"], strict=True):
        assert len(panel.page_keys) == 2
        assert [page["rows"] for page in panel_report["pages"]] == [[0, 2], [2, 3]]
        for key, page in zip(panel.page_keys, panel_report["pages"], strict=True):
            image = Image.open(io.BytesIO(png(env, key)))
            assert image.size == (page["layout"]["width"], page["layout"]["height"])
            assert page["layout"]["rows"] == page["rows"][1] - page["rows"][0]
    assert result.grid_key == result.panels[0].page_keys[0]
    # a different seed is a different image; the same seed in another panel's prompt too
    by_panel = {c.panel: png(env, c.image_key) for c in result.cells if (c.row, c.col) == (0, 1)}
    assert len(set(by_panel.values())) == 4
    assert report["convergence"] is None
    assert not result.recommendation.HasField("converged_step") and result.recommendation.basis == "default"


# --- generate ---------------------------------------------------------------------------------

def test_generate_renders_prompts_by_seeds_with_several_loras(env):
    checkpoint = f"runs/{env.run_id}/checkpoints/step-000010/pytorch_lora_weights.safetensors"
    result = generate(env, ["fluxone, a bottle", "a cup"], images_per_prompt=2, seed=11,
                      loras=[{"run_id": env.run_id}, {"key": checkpoint, "strength": -0.5}])
    assert [(i.prompt_index, i.seed) for i in result.images] == [(0, 11), (0, 12), (1, 11), (1, 12)]
    assert len({png(env, i.image_key) for i in result.images}) == 4
    assert all(i.image_key.startswith(f"generations/{result.generation_id}/") for i in result.images)
    # the run reference is resolved to its latest checkpoint
    assert [(lora.key.split("/")[-2], lora.strength) for lora in result.loras] == [
        ("step-000030", 1.0), ("step-000010", -0.5)]
    assert Image.open(io.BytesIO(png(env, result.images[0].image_key))).size == (64, 64)


# --- bad requests -----------------------------------------------------------------------------

def snapshot(store):
    return {(o.key, o.size) for o in store.list("")}


@pytest.mark.parametrize(
    ("options", "code", "fragments"),
    [
        ({"checkpoint_steps": [999]}, "NOT_FOUND", ["999", "available: [10, 20, 30]"]),
        ({"strengths": [0.5, 2.5]}, "INVALID_ARGUMENT", ["strengths", "[-2.0, 2.0]", "2.5"]),
        ({"strengths": [-3.0]}, "INVALID_ARGUMENT", ["strengths", "-3.0"]),
        ({"prompt": "   "}, "INVALID_ARGUMENT", ["spec.prompt is blank"]),
        ({"prompts": ["a bottle", ""]}, "INVALID_ARGUMENT", ["spec.prompts[1]", "empty"]),
        ({"prompt": "a", "prompts": ["b"]}, "INVALID_ARGUMENT", ["not both"]),
        ({"seed": 1, "seeds": [2]}, "INVALID_ARGUMENT", ["not both"]),
        ({"prompts": ["a", "b"]}, "INVALID_ARGUMENT", ["3 checkpoints x 6 strengths x 2 grids", "36 cells",
                                                       f"limit of {MAX_CELLS}", "FLUXLORA_GRID_MAX_CELLS"]),
        ({"width": 70}, "INVALID_ARGUMENT", ["multiples of 16"]),
        ({"rows_per_page": -1}, "INVALID_ARGUMENT", ["rows_per_page"]),
        ({"image_text_model": "/no/such/clip"}, "NOT_FOUND", ["image-text model", "/no/such/clip"]),
    ],
)
def test_bad_grid_requests_get_clear_statuses_and_store_nothing(env, options, code, fragments):
    from fluxlora_client import FluxloraClientError

    before, jobs = snapshot(env.store), len(env.client.list_jobs("evaluation"))
    with pytest.raises(FluxloraClientError) as err:
        env.client.evaluate(env.run_id, **options)
    assert err.value.code == code
    for fragment in fragments:
        assert fragment in err.value.message, err.value.message
    assert snapshot(env.store) == before and len(env.client.list_jobs("evaluation")) == jobs


@pytest.mark.parametrize(
    ("prompts", "options", "code", "fragments"),
    [
        ([], {}, "INVALID_ARGUMENT", ["spec.prompts is empty"]),
        (["ok", "  "], {}, "INVALID_ARGUMENT", ["spec.prompts[1]"]),
        (["a"], {"loras": [{"key": "runs/nope/x.safetensors"}]}, "NOT_FOUND", ["spec.loras[0].key", "runs/nope"]),
        (["a"], {"loras": [{"run_id": "trn-fake00000001", "step": 999}]}, "NOT_FOUND", ["999", "available"]),
        (["a"], {"loras": [{"run_id": "trn-missing"}]}, "NOT_FOUND", ["trn-missing"]),
        (["a"], {"loras": [{"run_id": "trn-fake00000001", "strength": 2.01}]}, "INVALID_ARGUMENT",
         ["spec.loras[0].strength", "[-2.0, 2.0]"]),
        (["a"], {"loras": [{"run_id": "trn-fake00000001", "key": "x"}]}, "INVALID_ARGUMENT", ["exactly one"]),
        (["a"] * 5, {"images_per_prompt": 5}, "INVALID_ARGUMENT", ["25 images", "FLUXLORA_GRID_MAX_CELLS"]),
        (["a"], {"base_model": "/no/such/flux"}, "NOT_FOUND", ["/no/such/flux"]),
    ],
)
def test_bad_generate_requests_get_clear_statuses(env, prompts, options, code, fragments):
    from fluxlora_client import FluxloraClientError

    before = snapshot(env.store)
    with pytest.raises(FluxloraClientError) as err:
        env.client.generate(prompts, **options)
    assert err.value.code == code
    for fragment in fragments:
        assert fragment in err.value.message, err.value.message
    assert snapshot(env.store) == before


def test_generate_without_any_base_model_is_not_found(env):
    from fluxlora_client import FluxloraClientError

    with pytest.raises(FluxloraClientError) as err:
        env.client.generate("a bottle")
    assert err.value.code == "NOT_FOUND" and "base model" in err.value.message


# --- CLI --------------------------------------------------------------------------------------

@pytest.fixture
def cli_env(env, monkeypatch):
    monkeypatch.setenv("FLUXLORA_STORE", str(env.store.root))
    monkeypatch.setenv("FLUXLORA_EVALUATION_ADDR", env.address)
    return env


def test_cli_evaluate_prints_the_recommendation_and_downloads_the_grid(cli_env, tmp_path):
    result = CliRunner().invoke(cli.app, [
        "evaluate", cli_env.run_id, "--strengths", "0,1", "--checkpoints", "10,30", "--seed", "3",
        "--steps", "3", "--image-text-model", "none", "--out", str(tmp_path),
    ])
    assert result.exit_code == 0, result.output
    assert "recommended: step" in result.stdout and "strength 1 (convergence)" in result.stdout
    assert (tmp_path / "grid.png").is_file() and (tmp_path / "report.json").is_file()


def test_cli_generate_applies_loras_given_as_run_step_and_strength(cli_env, tmp_path):
    result = CliRunner().invoke(cli.app, [
        "generate", "fluxone, a bottle", "a cup", "--lora", f"{cli_env.run_id}:20@0.7", "--images", "2",
        "--steps", "3", "--width", "64", "--height", "64", "--out", str(tmp_path), "--json",
    ])
    assert result.exit_code == 0, result.output
    printed = json.loads(result.stdout)
    assert len(printed["images"]) == 4
    assert printed["loras"][0]["step"] == "20" and printed["loras"][0]["strength"] == 0.7
    assert sorted(p.name for p in tmp_path.iterdir()) == ["000-seed42.png", "000-seed43.png", "001-seed42.png",
                                                           "001-seed43.png"]
    assert np.asarray(Image.open(tmp_path / "000-seed42.png")).shape == (64, 64, 3)
