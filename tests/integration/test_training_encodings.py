"""Through the SDK: the first run on a dataset stores its encoded images and captions; the next run
on the same images, captions, model and resolution reuses them (no text encoders loaded); a run
that changes any of those encodes afresh."""

from __future__ import annotations

import pytest

from fluxlora.training.trainer.encoding_cache import load_encodings
from fluxlora_api.v1 import jobs_pb2


@pytest.fixture
def captioned(running, photos, tiny_models):
    client = running
    dataset = client.result(client.wait(client.preprocess(client.upload_photos(photos), base_size=64)))
    client.wait(client.caption(dataset.dataset_id, "fluxone", model=str(tiny_models["florence2"]), max_new_tokens=8))
    return client, dataset.dataset_id


def encodings(store):
    return sorted(o.key for o in store.list("cache/encodings/"))


def test_runs_on_the_same_data_share_one_encoding(captioned, tiny_models, tmp_path):
    client, dataset_id = captioned

    def train(**options):
        job = client.wait(client.train(dataset_id, base_model=str(tiny_models["flux"]), max_steps=1,
                                       sample_every=0, **{"resolution": 64, **options}))
        assert job.state == jobs_pb2.JOB_STATE_SUCCEEDED, job.error
        return job

    first = train()
    stored = encodings(client.store)
    assert first.metrics["encodings_reused"] == 0 and len(stored) == 1
    local = client.store.get_file(stored[0], tmp_path / "cache" / stored[0].rsplit("/", 1)[-1])  # servers only: cache/
    cached = load_encodings(local, tmp_path)
    images = [o for o in client.store.list(f"datasets/{dataset_id}/images/") if o.key.endswith(".png")]
    assert len(cached.samples) == len(images)

    second = train(learning_rate=3e-4, seed=7)  # other training options: the same encodings
    assert second.metrics["encodings_reused"] == 1 and encodings(client.store) == stored

    other_size = train(resolution=32)  # another resolution: other latents
    assert other_size.metrics["encodings_reused"] == 0 and len(encodings(client.store)) == 2
