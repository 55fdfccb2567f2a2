"""A single-file base model through gRPC, as a ComfyUI user brings one: the server's
FLUXLORA_BASE_MODEL is a ComfyUI-layout flux1-dev-style .safetensors with FLUXLORA_BASE_COMPONENTS
the folder of its text encoders and VAE. A run on it, and a run naming a BFL-layout file with its
components, train the same losses as the folder; images generated from the file equal the folder's;
PlanTraining gives the same estimate; a bad file or a missing components folder is refused at
submit naming the file and the fix; a grid or generation naming the wrong family is refused. A
FLUX.2 [klein] file plans as its folder does, and a FLUX.1 Kontext file (FLUX.1 [dev]'s keys) plans as
Kontext with Kontext's components or FLUX.1 [dev]'s (the same models)."""

from __future__ import annotations

import csv
import io
import shutil

import numpy as np
import pytest
from PIL import Image

from fluxlora.common.storage import LocalStore
from fluxlora.models.single_file_write import write_folder_transformer
from fluxlora.models.tiny_family import write_tiny_family
from fluxlora_api.v1 import jobs_pb2
from fluxlora_client.errors import FluxloraClientError
from support import put_circles, services_and_client

OPTIONS = dict(resolution=64, max_steps=3, checkpoint_every=3, sample_every=0, rank=4, learning_rate=1e-3, seed=0)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("single-file")
    folder = write_tiny_family("flux1-dev", root / "flux1-dev")
    components = root / "components"  # what a user downloads: everything but the transformer weights
    shutil.copytree(folder, components, ignore=lambda where, names: [
        n for n in names if where.endswith("transformer") and n != "config.json"])
    return {"folder": folder, "components": components,
            "comfyui": write_folder_transformer(folder, root / "flux1-dev.safetensors", layout="comfyui"),
            "bfl": write_folder_transformer(folder, root / "flux1-dev-bfl.safetensors", layout="bfl")}


@pytest.fixture
def client(models, tmp_path):
    store = LocalStore(tmp_path / "store")
    with services_and_client(store, tmp_path, base_model=str(models["comfyui"]),
                             base_components=str(models["components"])) as client:
        yield client


def losses(client, job) -> list[float]:
    job = client.wait(job)
    assert job.state == jobs_pb2.JOB_STATE_SUCCEEDED, job.error
    text = client.store.get_bytes(client.result(job).loss_csv_key).decode()
    return [float(row["loss"]) for row in csv.DictReader(io.StringIO(text))]


def image(client, job) -> np.ndarray:
    job = client.wait(job)
    assert job.state == jobs_pb2.JOB_STATE_SUCCEEDED, job.error
    key = client.result(job).images[0].image_key
    return np.asarray(Image.open(io.BytesIO(client.store.get_bytes(key)))).astype(int)


def test_a_single_file_base_trains_and_renders_as_its_folder(client, models, tmp_path):
    dataset = put_circles(client.store, tmp_path, "ds-singlefile0001")
    from_default = losses(client, client.train(dataset, **OPTIONS))  # the server's ComfyUI file
    from_bfl = losses(client, client.train(dataset, base_model=str(models["bfl"]),
                                           base_components=str(models["components"]), **OPTIONS))
    from_folder = losses(client, client.train(dataset, base_model=str(models["folder"]), **OPTIONS))
    assert len(from_folder) == 3
    assert from_default == pytest.approx(from_folder, abs=1e-5)
    assert from_bfl == pytest.approx(from_folder, abs=1e-5)

    render = dict(steps=2, width=64, height=64, seed=3)
    generated = image(client, client.generate("sks, a red circle", **render))
    from_folder_image = image(client, client.generate("sks, a red circle", base_model=str(models["folder"]),
                                                      **render))
    assert np.abs(generated - from_folder_image).max() <= 1

    plans = [client.plan_training(resolution=512, target_gib=24),
             client.plan_training(base_model=str(models["folder"]), resolution=512, target_gib=24)]
    assert plans[0].total_gib == plans[1].total_gib > 0


def test_flux2_and_kontext_files_plan_and_are_checked_at_submit(client, models, tmp_path):
    klein = write_tiny_family("flux2-klein", tmp_path / "flux2-klein")
    klein_file = write_folder_transformer(klein, tmp_path / "flux-2-klein-4b.safetensors", layout="bfl")
    plans = [client.plan_training(base_model=str(klein_file), base_components=str(klein), resolution=512,
                                  target_gib=24),
             client.plan_training(base_model=str(klein), resolution=512, target_gib=24)]
    assert plans[0].total_gib == plans[1].total_gib > 0
    dataset = put_circles(client.store, tmp_path, "ds-singlefile0003", colours=("red",))
    kontext = write_tiny_family("flux1-kontext", tmp_path / "flux1-kontext")
    kontext_file = write_folder_transformer(kontext, tmp_path / "flux1-kontext-dev.safetensors", layout="comfyui")
    cases = [  # refused at submit, before any job: the file, the mismatch and the fix
        (dict(base_model=str(klein_file), base_components=str(klein), family="flux2-dev"),
         [str(klein_file), "flux2-klein model, not flux2-dev", "set family to 'flux2-klein'"]),
        (dict(base_model=str(kontext_file), base_components=str(models["components"]), family="chroma"),
         [str(kontext_file), "flux1-dev model, not chroma", "set family to 'flux1-dev'"]),
    ]
    for options, words in cases:
        with pytest.raises(FluxloraClientError) as refused:
            client.train(dataset, resolution=64, max_steps=1, **options)
        assert refused.value.code == "INVALID_ARGUMENT", refused.value.message
        assert all(w in refused.value.message for w in words), refused.value.message
    folder_plan = client.plan_training(base_model=str(kontext), resolution=512, target_gib=24)
    for components in (kontext, models["components"]):  # Kontext's own, or FLUX.1 [dev]'s: the same models
        plan = client.plan_training(base_model=str(kontext_file), base_components=str(components),
                                    family="flux1-kontext", resolution=512, target_gib=24)
        assert plan.total_gib == folder_plan.total_gib


def test_a_bad_single_file_or_components_folder_is_refused_at_submit(client, models, tmp_path):
    dataset = put_circles(client.store, tmp_path, "ds-singlefile0002", colours=("red",))
    junk = tmp_path / "flux1-dev-fp8.safetensors"
    junk.write_text("<html>404 Not Found</html>")  # a download that went wrong
    cases = [
        (dict(base_model=str(junk)), "INVALID_ARGUMENT", [str(junk), "not a safetensors file",
                                                          "flux1-dev.safetensors"]),
        (dict(base_components=str(tmp_path / "nowhere")), "FAILED_PRECONDITION",
         [str(models["comfyui"]), "nowhere", "is missing", "FLUXLORA_BASE_COMPONENTS"]),
        (dict(family="chroma"), "INVALID_ARGUMENT", [str(models["comfyui"]), "set family to 'flux1-dev'"]),
        (dict(base_model=str(models["folder"]), base_components=str(models["components"])), "INVALID_ARGUMENT",
         ["base_components", "leave it unset"]),
    ]
    for options, code, words in cases:
        with pytest.raises(FluxloraClientError) as refused:
            client.train(dataset, resolution=64, max_steps=1, **options)
        assert refused.value.code == code, refused.value.message
        assert all(w in refused.value.message for w in words), refused.value.message

    client.store.put_bytes("loras/someone-elses.safetensors", b"not read at submit")
    for submit in (lambda: client.generate("a circle", family="chroma", steps=1, width=64, height=64),
                   lambda: client.evaluate("", loras=[{"key": "loras/someone-elses.safetensors"}], prompt="a circle",
                                           family="chroma", base_model=str(models["bfl"]),
                                           base_components=str(models["components"]))):
        with pytest.raises(FluxloraClientError) as refused:
            submit()
        assert refused.value.code == "INVALID_ARGUMENT", refused.value.message
        assert "spec.family" in refused.value.message and "set family to 'flux1-dev'" in refused.value.message
