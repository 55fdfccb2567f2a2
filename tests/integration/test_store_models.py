"""Models can live in the object store: with the tiny FLUX.1 and Florence-2 uploaded under
models/, the whole pipeline runs on "store://" references through the SDK over gRPC, and each
service mirrors the model into its local cache."""

from __future__ import annotations

from fluxlora_api.v1 import jobs_pb2

SUCCEEDED = jobs_pb2.JOB_STATE_SUCCEEDED


def test_the_pipeline_takes_its_models_from_the_store(running, photos, tiny_models, tmp_path):
    client = running
    client.store.upload_dir(tiny_models["flux"], "models/tiny-flux/")
    client.store.upload_dir(tiny_models["florence2"], "models/tiny-florence2/")
    assert client.store.exists("models/tiny-flux/model_index.json")
    assert client.store.exists("models/tiny-florence2/config.json")

    pre = client.wait(client.preprocess(client.upload_photos(photos), base_size=64))
    dataset_id = client.result(pre).dataset_id

    cap = client.wait(client.caption(dataset_id, "fluxone", model="store://models/tiny-florence2/"))
    assert cap.state == SUCCEEDED
    assert client.store.exists(f"datasets/{dataset_id}/captions.json")

    trn = client.wait(client.train(dataset_id, base_model="store://models/tiny-flux/", resolution=64,
                                   max_steps=4, checkpoint_every=2, sample_every=0))
    run = client.result(trn)
    assert trn.state == SUCCEEDED
    assert [c.step for c in run.checkpoints] == [2, 4]
    assert client.store.get_json(f"runs/{run.run_id}/run.json")["base_model"] == "store://models/tiny-flux/"

    evl = client.wait(client.evaluate(run.run_id, strengths=[0.0, 1.0], steps=2))
    grid = client.result(evl)
    assert evl.state == SUCCEEDED
    # the grid job took its base model from the run: the store copy
    assert client.spec(evl).base_model == "store://models/tiny-flux/"
    assert (grid.rows, grid.cols) == (2, 2)
    assert client.store.stat(grid.grid_key).size > 0

    # the services loaded the models from mirrors in their cache, completed (marker written)
    mirrors = {p.name: p for p in (tmp_path / "cache" / "models").iterdir()}
    assert set(mirrors) == {"models_tiny-flux", "models_tiny-florence2"}
    assert (mirrors["models_tiny-flux"] / "model_index.json").exists()
    assert (mirrors["models_tiny-florence2"] / "config.json").exists()
    assert all(any(m.glob(".fluxlora-complete*")) for m in mirrors.values())
