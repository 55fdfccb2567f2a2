"""Bad requests get a gRPC status with a message that names the problem and the fix, and nothing
already stored is lost."""

from __future__ import annotations

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from fluxlora_api.v1 import jobs_pb2
from fluxlora_client import FluxloraClientError


def snapshot(store):
    return {(o.key, o.size) for o in store.list("")}


@pytest.fixture
def stored(running, photos):
    """A store already holding an upload and a preprocessed dataset."""
    client = running
    source = client.upload_photos(photos)
    job = client.wait(client.preprocess(source, base_size=64))
    return client, client.result(job).dataset_id


def test_caption_of_a_missing_dataset_is_not_found(stored, tiny_models):
    client, _ = stored
    before = snapshot(client.store)
    with pytest.raises(FluxloraClientError) as err:
        client.caption("ds-doesnotexist", "fluxone", model=str(tiny_models["florence2"]))
    assert err.value.code == "NOT_FOUND"
    assert "ds-doesnotexist" in err.value.message and "preprocess" in err.value.message
    assert snapshot(client.store) == before


def test_an_upload_without_images_is_invalid_argument(stored, tmp_path):
    client, _ = stored
    folder = tmp_path / "notes"
    folder.mkdir()
    (folder / "readme.txt").write_text("no photos here")
    source = client.upload_photos(folder)
    before = snapshot(client.store)
    with pytest.raises(FluxloraClientError) as err:
        client.preprocess(source, base_size=64)
    assert err.value.code == "INVALID_ARGUMENT"
    assert "no images" in err.value.message and "readme.txt" in err.value.message
    # The SDK names the user's own folder, not the store's prefix.
    assert f"your folder {folder.resolve()} holds 1 file" in err.value.message and "uploads/" not in err.value.message
    assert snapshot(client.store) == before


def test_an_empty_source_prefix_is_not_found(stored):
    client, _ = stored
    with pytest.raises(FluxloraClientError) as err:
        client.preprocess("uploads/nothing-here/", base_size=64)
    assert err.value.code == "NOT_FOUND"


def test_training_with_an_unknown_base_model_path_is_not_found(stored, tiny_models, tmp_path):
    client, dataset_id = stored
    client.wait(client.caption(dataset_id, "fluxone", model=str(tiny_models["florence2"])))
    before = snapshot(client.store)
    missing = tmp_path / "no-such-model"
    with pytest.raises(FluxloraClientError) as err:
        client.train(dataset_id, base_model=str(missing), resolution=64, max_steps=2)
    assert err.value.code == "NOT_FOUND"
    assert str(missing) in err.value.message
    assert snapshot(client.store) == before


def test_training_an_uncaptioned_dataset_is_failed_precondition(stored, tiny_models):
    client, dataset_id = stored
    with pytest.raises(FluxloraClientError) as err:
        client.train(dataset_id, base_model=str(tiny_models["flux"]), resolution=64, max_steps=2)
    assert err.value.code == "FAILED_PRECONDITION" and "caption" in err.value.message


@pytest.mark.parametrize(
    "field, value, fragment",
    [("resolution", 70, "multiple of 16"), ("learning_rate", -1.0, "learning_rate"), ("rank", -4, "rank")],
)
def test_invalid_training_options_name_the_field(stored, tiny_models, field, value, fragment):
    client, dataset_id = stored
    client.wait(client.caption(dataset_id, "fluxone", model=str(tiny_models["florence2"])))
    with pytest.raises(FluxloraClientError) as err:
        client.train(dataset_id, base_model=str(tiny_models["flux"]), **{field: value})
    assert err.value.code == "INVALID_ARGUMENT" and fragment in err.value.message


@pytest.mark.parametrize("trigger", ["", "   ", "two words"])
def test_a_bad_trigger_word_is_invalid_argument(stored, tiny_models, trigger):
    client, dataset_id = stored
    with pytest.raises(FluxloraClientError) as err:
        client.caption(dataset_id, trigger, model=str(tiny_models["florence2"]))
    assert err.value.code == "INVALID_ARGUMENT" and "trigger" in err.value.message


def test_evaluating_a_missing_run_is_not_found(running):
    with pytest.raises(FluxloraClientError) as err:
        running.evaluate("trn-nope")
    assert err.value.code == "NOT_FOUND" and "trn-nope" in err.value.message


def test_unknown_jobs_and_finished_jobs(stored):
    client, _ = stored
    with pytest.raises(FluxloraClientError) as err:
        client.get_job("pre-000000000000")
    assert err.value.code == "NOT_FOUND"
    finished = client.list_jobs("preprocessing")[0]
    with pytest.raises(FluxloraClientError) as err:
        client.cancel(finished.job_id)
    assert err.value.code == "FAILED_PRECONDITION"


def test_every_server_has_health_checking_and_reflection(running):
    for service, address in running.addresses.items():
        with grpc.insecure_channel(address) as channel:
            health = health_pb2_grpc.HealthStub(channel)
            assert health.Check(health_pb2.HealthCheckRequest(service=""), timeout=5).status == \
                health_pb2.HealthCheckResponse.SERVING
            stub = reflection_pb2_grpc.ServerReflectionStub(channel)
            responses = stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]))
            names = {s.name for r in responses for s in r.list_services_response.service}
            assert "fluxlora.v1.JobService" in names
            assert any(n.startswith("fluxlora.v1.") and n != "fluxlora.v1.JobService" for n in names), service


def test_a_base_model_under_the_home_directory_is_accepted(stored, tiny_models, tmp_path, monkeypatch):
    client, dataset_id = stored
    client.wait(client.caption(dataset_id, "fluxone", model=str(tiny_models["florence2"])))
    home = tmp_path / "home"
    (home / "models").mkdir(parents=True)
    (home / "models" / "tiny-flux").symlink_to(tiny_models["flux"])
    monkeypatch.setenv("HOME", str(home))
    job = client.train(dataset_id, base_model="~/models/tiny-flux", resolution=64, max_steps=1)
    assert client.spec(job).base_model == str(home / "models" / "tiny-flux")
    assert client.wait(job).state == jobs_pb2.JOB_STATE_SUCCEEDED
