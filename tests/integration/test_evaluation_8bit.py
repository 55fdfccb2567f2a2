"""Through the SDK: an evaluation server told to load the base with fp8 transformer blocks (what
"auto" picks on a 24 GB GPU) renders the whole grid, convergence probe included, and says how it
loaded the model."""

from __future__ import annotations

import json

from fluxlora.common.config import Settings
from fluxlora.common.storage import LocalStore
from fluxlora.evaluation.pipelines import PIPELINES
from fluxlora.evaluation.tiny_models import store_random_run
from fluxlora.server.bootstrap import start_server
from fluxlora_client import FluxloraClient


def test_an_fp8_base_renders_the_grid_with_its_convergence_probe(tiny_models, tmp_path):
    store = LocalStore(tmp_path / "store")
    run = store_random_run(store, tiny_models["flux"])
    settings = Settings(store=str(tmp_path / "unused"), cache_dir=tmp_path / "cache", inference_quantization="fp8")
    server = start_server("evaluation", settings, store=store, port=0)
    PIPELINES.clear()
    try:
        with FluxloraClient(evaluation=server.address) as client:
            result = client.result(client.wait(client.evaluate(run["run_id"], strengths=[0.0, 1.0], steps=2)))
        assert (result.rows, result.cols) == (3, 2) and store.exists(result.grid_key)
        assert all(c.HasField("heldout_loss") for c in result.checkpoints)  # the probe ran on the 8-bit model
        report = json.loads(store.get_bytes(result.report_key))
        assert report["convergence"]
    finally:
        server.stop(grace=1.0)
        PIPELINES.clear()  # the next tests expect the plain pipeline
