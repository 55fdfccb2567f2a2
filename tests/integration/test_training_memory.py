"""Through the SDK: a run is checked against the target GPU before it is queued, refused with the
options that would fit when it is too big, and the estimate travels with the run's results; every
checkpoint carries its LoRA in kohya's format too."""

from __future__ import annotations

import importlib.util
import json
import sys
import time

import pytest
from safetensors import safe_open

from fluxlora.training.memory.architecture import FLUX1_DEV_TRANSFORMER
from fluxlora_client import FluxloraClientError, cli


@pytest.fixture(autouse=True)
def gpu_24gib(monkeypatch):
    """Servers started by the test read FLUXLORA_GPU_MEMORY_GIB: an RTX 4090's 24 GB."""
    monkeypatch.setenv("FLUXLORA_GPU_MEMORY_GIB", "24")


@pytest.fixture
def captioned(running, photos, tiny_models):
    client = running
    dataset = client.result(client.wait(client.preprocess(client.upload_photos(photos), base_size=64)))
    client.wait(client.caption(dataset.dataset_id, "fluxone", model=str(tiny_models["florence2"])))
    return client, dataset.dataset_id


@pytest.fixture
def flux1_dev_config(tmp_path):
    """FLUX.1-dev's layout with its config files and no weights: all the planner reads."""
    model = tmp_path / "FLUX.1-dev"
    (model / "transformer").mkdir(parents=True)
    (model / "vae").mkdir()
    (model / "model_index.json").write_text(json.dumps({"_class_name": "FluxPipeline"}))
    (model / "transformer" / "config.json").write_text(json.dumps(FLUX1_DEV_TRANSFORMER))
    (model / "vae" / "config.json").write_text(json.dumps({"block_out_channels": [128, 256, 512, 512]}))
    return model


def snapshot(store):
    return {(o.key, o.size) for o in store.list("")}


@pytest.mark.parametrize("store", ["local"], indirect=True)
@pytest.mark.slow
def test_full_size_flux_at_1024_without_checkpointing_is_refused_with_options_that_fit(
    captioned, flux1_dev_config, monkeypatch, capsys
):
    """Three fake steps of the 12B-parameter model (~5 s each): the run, then with checkpointing,
    then with checkpointing and an 8-bit base."""
    client, dataset_id = captioned
    before = snapshot(client.store)
    with pytest.raises(FluxloraClientError) as err:
        client.train(dataset_id, base_model=str(flux1_dev_config), resolution=1024, gradient_checkpointing=False)
    assert err.value.code == "RESOURCE_EXHAUSTED"
    message = err.value.message
    assert "more than the target GPU's 24.0 GiB" in message and "FLUXLORA_GPU_MEMORY_GIB" in message
    assert "gradient_checkpointing=true, base_quantization=fp8" in message
    assert client.list_jobs("training") == [] and snapshot(client.store) == before

    # the same from the command line, answered from the planner's cache
    monkeypatch.setenv("FLUXLORA_STORE", str(client.store.root))
    monkeypatch.setenv("FLUXLORA_TRAINING_ADDR", client.addresses["training"])
    monkeypatch.setattr(sys, "argv", ["fluxlora", "train", dataset_id, "--base-model", str(flux1_dev_config),
                                      "--resolution", "1024", "--no-gradient-checkpointing"])
    with pytest.raises(SystemExit) as exit_:
        cli.main()
    output = capsys.readouterr()
    assert exit_.value.code == 1
    assert "RESOURCE_EXHAUSTED" in output.out + output.err and "base_quantization=fp8" in output.out + output.err


@pytest.mark.parametrize("store", ["local"], indirect=True)
@pytest.mark.skipif(importlib.util.find_spec("bitsandbytes") is not None, reason="bitsandbytes is installed here")
def test_an_optimizer_this_server_cannot_run_is_failed_precondition(captioned, tiny_models):
    client, dataset_id = captioned
    with pytest.raises(FluxloraClientError) as err:
        client.train(dataset_id, base_model=str(tiny_models["flux"]), resolution=64, optimizer="adamw8bit")
    assert err.value.code == "FAILED_PRECONDITION" and "pip install bitsandbytes" in err.value.message
    assert client.list_jobs("training") == []


def test_swapping_more_blocks_than_the_model_has_is_invalid_argument(captioned, tiny_models):
    client, dataset_id = captioned
    with pytest.raises(FluxloraClientError) as err:  # the tiny model has one block of each kind: none can go
        client.train(dataset_id, base_model=str(tiny_models["flux"]), resolution=64, blocks_to_swap=1)
    assert err.value.code == "INVALID_ARGUMENT"
    assert "blocks_to_swap=1 is more than this model allows" in err.value.message
    assert client.list_jobs("training") == []


@pytest.mark.parametrize("store", ["local"], indirect=True)
def test_an_8bit_base_run_goes_through_the_service(captioned, tiny_models):
    client, dataset_id = captioned
    job = client.wait(client.train(dataset_id, base_model=str(tiny_models["flux"]), resolution=64, max_steps=2,
                                   checkpoint_every=0, sample_every=0, base_quantization="fp8"))
    result = client.result(job)
    assert [c.step for c in result.checkpoints] == [2]
    report = client.store.get_json(f"runs/{result.run_id}/report.json")
    assert "fp8 base" in report["memory"]["plan"]["estimate"]["mode"]


def test_a_run_reports_its_estimate_and_stores_kohya_loras_with_metadata(captioned, tiny_models, tmp_path):
    client, dataset_id = captioned
    job = client.wait(client.train(dataset_id, base_model=str(tiny_models["flux"]), resolution=64, max_steps=2,
                                   checkpoint_every=1, sample_every=0))
    result = client.result(job)
    # the tiny model's step is a few MiB; the rest is the planner's fixed CUDA overhead
    assert 1.5 < result.estimated_peak_gib < 1.6
    assert job.metrics["estimated_peak_gib"] == pytest.approx(result.estimated_peak_gib)
    assert job.metrics["gpu_target_gib"] == 24
    report = client.store.get_json(f"runs/{result.run_id}/report.json")
    assert report["memory"]["plan"]["fits"] and report["memory"]["plan"]["target_gib"] == 24

    assert [c.step for c in result.checkpoints] == [1, 2]
    kohya_artifacts = {a.key for a in job.artifacts if a.kind == "lora-kohya"}
    for checkpoint in result.checkpoints:
        assert checkpoint.kohya_lora_key.endswith(f"/{result.run_id}-step-{checkpoint.step:06d}.safetensors")
        assert checkpoint.kohya_lora_key in kohya_artifacts
        [local] = client.download(checkpoint.kohya_lora_key, tmp_path / str(checkpoint.step))
        with safe_open(local, "pt") as handle:
            metadata = handle.metadata()
            assert all(k.startswith("lora_unet_") for k in handle.keys())
        assert metadata["fluxlora.trigger_word"] == "fluxone"
        assert metadata["fluxlora.dataset_id"] == dataset_id
        assert metadata["fluxlora.base_model"] == str(tiny_models["flux"])
        assert json.loads(metadata["fluxlora.spec"])["maxSteps"] == 2
        assert len(metadata["fluxlora.caption_set_sha256"]) == 64


@pytest.mark.parametrize("store", ["local"], indirect=True)
def test_plan_training_answers_whether_1024_fits_a_24gib_card_without_queueing(
    captioned, flux1_dev_config, monkeypatch, capsys
):
    """One fake step of the 12B-parameter model: an fp8 base with checkpointing at 1024."""
    client, dataset_id = captioned
    before = snapshot(client.store)
    plan = client.plan_training(str(flux1_dev_config), resolution=1024, base_quantization="fp8")
    assert plan.fits and plan.target_gib == 24
    assert 14 < plan.total_gib < 18  # measured on an H100: 13.7-14.0 GiB allocated (docs/performance.md)
    assert plan.total_gib == pytest.approx(plan.step_peak_gib + plan.overhead_gib, abs=0.01)
    assert "fp8 base + gradient checkpointing, 1024px" in plan.mode and "within" in plan.explanation
    assert not plan.alternatives
    assert client.list_jobs("training") == [] and snapshot(client.store) == before

    # the same from the command line, answered from the planner's cache
    monkeypatch.setenv("FLUXLORA_STORE", str(client.store.root))
    monkeypatch.setenv("FLUXLORA_TRAINING_ADDR", client.addresses["training"])
    monkeypatch.setattr(sys, "argv", ["fluxlora", "train", dataset_id, "--base-model", str(flux1_dev_config),
                                      "--resolution", "1024", "--base-quantization", "fp8", "--plan"])
    with pytest.raises(SystemExit) as exit_:
        cli.main()
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    assert "fits" in out and "does not fit" not in out and "GiB" in out
    assert client.list_jobs("training") == []


@pytest.mark.parametrize("store", ["local"], indirect=True)
def test_a_submit_waits_for_a_plan_slower_than_the_clients_timeout(captioned, tiny_models, monkeypatch):
    """A busy server plans slowly (fake steps queue behind other clients'): the SDK gives the calls
    that plan their own allowance on top of its timeout, so they are answered, not cut off."""
    from fluxlora.training.memory import planner

    measure = planner.measure_step

    def slow_measure(*args, **kwargs):
        time.sleep(1.5)
        return measure(*args, **kwargs)

    monkeypatch.setattr(planner, "measure_step", slow_measure)
    client, dataset_id = captioned
    client.timeout = 0.5
    assert client.plan_training(str(tiny_models["flux"]), resolution=64, rank=3).fits
    job = client.train(dataset_id, base_model=str(tiny_models["flux"]), resolution=64, rank=5, max_steps=1)
    assert job.job_id.startswith("trn-")
    client.timeout = 60
    client.wait(job.job_id)


@pytest.mark.parametrize("store", ["local"], indirect=True)
def test_a_plan_for_a_card_too_small_for_anything_says_so(captioned, tiny_models):
    client, _ = captioned
    plan = client.plan_training(str(tiny_models["flux"]), target_gib=1.0, resolution=64)
    assert not plan.fits and plan.target_gib == 1.0 and plan.alternatives == []
    assert "use a GPU with more memory" in plan.explanation


@pytest.mark.parametrize("store", ["local"], indirect=True)
@pytest.mark.parametrize("options, code, words", [
    ({"target_gib": -1}, "INVALID_ARGUMENT", "target_gib"),
    ({"resolution": 100}, "INVALID_ARGUMENT", "resolution"),
    ({"base_model": "/nowhere/FLUX.1-dev"}, "NOT_FOUND", "/nowhere/FLUX.1-dev"),
])
def test_bad_plan_requests_get_clear_statuses(captioned, tiny_models, options, code, words):
    client, _ = captioned
    options = {"base_model": str(tiny_models["flux"]), **options}
    with pytest.raises(FluxloraClientError) as err:
        client.plan_training(**options)
    assert err.value.code == code and words in err.value.message


@pytest.mark.parametrize("store", ["local"], indirect=True)
@pytest.mark.slow
def test_memory_mode_auto_fits_1024_on_a_24gib_card_by_itself_and_manual_still_refuses(
    captioned, flux1_dev_config, monkeypatch, capsys
):
    """Two fake steps of the 12B-parameter model: bf16 and fp8 bases, both with checkpointing."""
    client, dataset_id = captioned
    plan = client.plan_training(str(flux1_dev_config), resolution=1024)  # the defaults: a bf16 base
    assert plan.fits and "fp8 base + gradient checkpointing, 1024px" in plan.mode
    assert dict(plan.picked) == {"gradient_checkpointing": "true", "base_quantization": "fp8", "blocks_to_swap": "0"}
    assert plan.memory_choice.startswith("memory_mode auto picked fp8 base + gradient checkpointing")
    assert "bf16 base + gradient checkpointing would need" in plan.memory_choice

    with pytest.raises(FluxloraClientError) as err:  # manual: the options as given, as before
        client.train(dataset_id, base_model=str(flux1_dev_config), resolution=1024, memory_mode="manual")
    assert err.value.code == "RESOURCE_EXHAUSTED" and "base_quantization=fp8" in err.value.message
    with pytest.raises(FluxloraClientError) as err:
        client.train(dataset_id, base_model=str(flux1_dev_config), resolution=1024, memory_mode="fastest")
    assert err.value.code == "INVALID_ARGUMENT" and "spec.memory_mode" in err.value.message
    assert client.list_jobs("training") == []

    monkeypatch.setenv("FLUXLORA_TRAINING_ADDR", client.addresses["training"])
    monkeypatch.setenv("COLUMNS", "80")
    monkeypatch.setattr(sys, "argv", ["fluxlora", "train", dataset_id, "--base-model", str(flux1_dev_config),
                                      "--resolution", "1024", "--plan"])
    with pytest.raises(SystemExit) as exit_:
        cli.main()
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    assert "as flags: --base-quantization fp8 --blocks-to-swap 0 --gradient-checkpointing" in out


@pytest.mark.parametrize("store", ["local"], indirect=True)
def test_an_auto_run_records_its_memory_options_and_resolution_and_says_so_before_it_starts(captioned, tiny_models):
    client, dataset_id = captioned  # preprocessed at base size 64: the run's resolution when unset
    assert "64px" in client.plan_training(str(tiny_models["flux"]), dataset_id=dataset_id).mode
    job = client.train(dataset_id, base_model=str(tiny_models["flux"]), max_steps=1, checkpoint_every=0,
                       sample_every=0)
    assert client.spec(job).resolution == 64
    [said] = job.notes  # in the reply to the submit: before the run starts
    assert said.startswith("memory_mode auto picked bf16 base + gradient checkpointing")
    assert "the fastest combination, and it fits" in said and "of the target GPU's 24.0 GiB" in said
    done = client.wait(job)
    assert list(done.notes) == [said]
    spec = client.spec(done)
    assert spec.memory_mode == "auto" and spec.HasField("gradient_checkpointing") and spec.gradient_checkpointing
    assert spec.base_quantization == "none"
    run = client.result(done)
    assert client.store.get_json(f"runs/{run.run_id}/spec.json")["baseQuantization"] == "none"
