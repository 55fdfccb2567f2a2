"""Training refers to an approved caption version: it trains on exactly those captions even after
the dataset was captioned again, and refuses a version that is missing or not approved."""

from __future__ import annotations

import pytest

from fluxlora.common.storage import LocalStore
from fluxlora_client import FluxloraClientError
from support import services_and_client


@pytest.fixture
def recaptioned(tmp_path, photos, tiny_models):
    """Captions approved with trigger "fluxone", then the dataset auto-captioned again with "zorbo"."""
    with services_and_client(LocalStore(tmp_path / "store"), tmp_path) as client:
        source = client.upload_photos(photos)
        dataset_id = client.result(client.wait(client.preprocess(source, base_size=64))).dataset_id
        model = str(tiny_models["florence2"])
        client.wait(client.caption(dataset_id, "fluxone", model=model, max_new_tokens=8))
        approved = client.captions.approve(dataset_id).version.version
        client.wait(client.caption(dataset_id, "zorbo", model=model, max_new_tokens=8))
        yield client, dataset_id, approved


def train(client, dataset_id, tiny_models, **options):
    return client.train(dataset_id, base_model=str(tiny_models["flux"]), resolution=64, max_steps=1, **options)


def test_training_uses_the_approved_version_it_names(recaptioned, tiny_models):
    client, dataset_id, approved = recaptioned
    job = train(client, dataset_id, tiny_models, caption_version=approved)
    assert client.spec(job).caption_version == approved
    assert client.result(client.wait(job)).trigger_word == "fluxone"
    # without a version: the dataset's current captions (the new auto captions)
    assert client.result(client.wait(train(client, dataset_id, tiny_models))).trigger_word == "zorbo"


def test_a_missing_or_unapproved_version_is_refused(recaptioned, tiny_models):
    client, dataset_id, approved = recaptioned
    head = client.captions.history(dataset_id).head_version
    with pytest.raises(FluxloraClientError) as err:
        train(client, dataset_id, tiny_models, caption_version=head)
    assert err.value.code == "FAILED_PRECONDITION" and "not approved" in err.value.message
    with pytest.raises(FluxloraClientError) as err:
        train(client, dataset_id, tiny_models, caption_version=head + 10)
    assert err.value.code == "NOT_FOUND"
