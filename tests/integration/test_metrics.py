"""Prometheus metrics of the four real servers, scraped over HTTP while a whole pipeline runs on S3:
requests, jobs by state, training steps, store requests move as the run proceeds; label sets stay
bounded under fifty clients."""

from __future__ import annotations

import contextlib

import pytest
from metrics_support import scrape, total

from fluxlora.common.config import Settings
from fluxlora.server.bootstrap import start_server
from fluxlora.training.trainer.config import ATTENTION_AND_MLP_TARGETS
from fluxlora_api.shared.ports import SERVICES
from fluxlora_api.v1 import jobs_pb2
from fluxlora_client import PipelineOptions, run_pipeline
from support import StoreClient, make_s3_store

STEPS = 12


@contextlib.contextmanager
def observed_services(store, tmp_path, **overrides):
    settings = Settings(store=str(tmp_path / "unused"), cache_dir=tmp_path / "cache", metrics_port=0, **overrides)
    servers = {name: start_server(name, settings, store=store, port=0) for name in SERVICES}
    client = StoreClient(store, **{name: s.address for name, s in servers.items()})
    try:
        yield servers, client
    finally:
        client.close()
        for server in servers.values():
            server.stop(grace=1.0)


@pytest.mark.slow
def test_metrics_move_as_a_pipeline_runs(photos, tiny_models, tmp_path, moto_endpoint):
    store = make_s3_store(moto_endpoint)
    with observed_services(store, tmp_path) as (servers, client):
        ports = {name: s.metrics_port for name, s in servers.items()}
        assert all(ports.values())
        before = scrape(ports["training"])
        during: list[dict] = []

        def on_event(stage: str, event: jobs_pb2.JobEvent) -> None:
            progress = event.job.progress
            if stage == "train" and progress.stage == "training" and progress.done >= STEPS // 2 and not during:
                during.append(scrape(ports["training"]))

        options = PipelineOptions(
            trigger_word="fluxone", base_model=str(tiny_models["flux"]), caption_model=str(tiny_models["florence2"]),
            base_size=64,
            train={"resolution": 64, "max_steps": STEPS, "checkpoint_every": STEPS, "sample_every": STEPS,
                   "rank": 4, "sample_steps": 2, "target_modules": ATTENTION_AND_MLP_TARGETS},
            grid={"steps": 2})
        result = run_pipeline(client, photos, options, download_to=tmp_path / "out", on_event=on_event)
        assert all(job.state == jobs_pb2.JOB_STATE_SUCCEEDED for job in result.jobs.values())
        after = {name: scrape(port) for name, port in ports.items()}

    # every server counted its own submit RPC and finished job
    submits = {"preprocessing": "SubmitPreprocess", "captioning": "SubmitCaption", "training": "SubmitTraining",
               "evaluation": "SubmitGrid"}
    for name, method in submits.items():
        samples = after[name]
        assert total(samples, "grpc_server_handled_total", service=name, grpc_method=method, grpc_code="OK") >= 1
        assert total(samples, "grpc_server_handling_seconds_count", service=name, grpc_method=method) >= 1
        assert total(samples, "fluxlora_jobs_finished_total", service=name, state="succeeded") >= 1
        assert total(samples, "fluxlora_job_duration_seconds_count", service=name, state="succeeded") >= 1
        assert total(samples, "fluxlora_job_queue_wait_seconds_count", service=name) >= 1
        assert total(samples, "fluxlora_jobs", service=name, state="running") == 0
    # training steps: part-way while it ran, all of them after
    steps = "fluxlora_training_steps_total"
    assert during, "the training run was never seen half-way"
    assert total(before, steps, service="training") < total(during[0], steps, service="training") \
        < total(after["training"], steps, service="training")
    assert total(after["training"], steps, service="training") - total(before, steps, service="training") \
        == STEPS
    assert total(during[0], "fluxlora_jobs", service="training", state="running") == 1
    assert total(during[0], "fluxlora_training_steps_per_second", service="training") > 0
    assert total(during[0], "fluxlora_training_loss", service="training") > 0
    # the object store's requests (S3 on moto) are timed by operation
    store = after["training"]
    for operation in ("read", "write", "list"):
        assert total(store, "fluxlora_store_request_duration_seconds_count", operation=operation, outcome="ok") > 0
    # WatchJob streams that ended with their job count as OK
    assert total(after["training"], "grpc_server_handled_total", grpc_method="WatchJob") >= 1


def test_refused_calls_and_unknown_methods_are_counted_without_new_labels(tmp_path, monkeypatch):
    import grpc

    from support import preprocessing_server

    with preprocessing_server(tmp_path, metrics_port=0, auth_token="s3cret", auth_max_failures=3) as server:
        channel = grpc.insecure_channel(server.address)
        get_job = channel.unary_unary("/fluxlora.v1.JobService/GetJob")
        for i in range(4):
            with pytest.raises(grpc.RpcError):
                get_job(b"", metadata=(("authorization", f"Bearer wrong-{i}"),), timeout=5)
        for name in ("/x.Y/Z", "/evil.Service/" + "a" * 100):
            with pytest.raises(grpc.RpcError):
                channel.unary_unary(name)(b"", metadata=(("authorization", "Bearer s3cret"),), timeout=5)
        channel.close()
        samples = scrape(server.metrics_port)
    assert total(samples, "fluxlora_auth_failures_total") >= 3
    assert total(samples, "fluxlora_auth_lockouts_total") >= 1
    assert total(samples, "fluxlora_auth_locked_out_calls_total") >= 1
    assert total(samples, "grpc_server_handled_total", grpc_method="GetJob", grpc_code="UNAUTHENTICATED") >= 3
    assert total(samples, "grpc_server_handled_total", grpc_method="unknown") == 2  # locked out by then
    methods = {dict(labels).get("grpc_method") for name, labels in samples if name.startswith("grpc_server")}
    assert not [m for m in methods if m and ("Z" == m or "aaa" in m)]
