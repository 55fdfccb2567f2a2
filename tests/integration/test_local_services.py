"""The embedded default (what `fluxlora up` and `fluxlora demo` use): the four services as real
processes on one local-directory store, healthy over gRPC, doing work for the SDK, and shutting
down gracefully on SIGTERM."""

from __future__ import annotations

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from fluxlora.common.config import SERVICES
from fluxlora.common.storage import LocalStore
from fluxlora_api.v1 import jobs_pb2
from fluxlora_client import FluxloraClient
from fluxlora_client.local import LocalServices


def health(address: str, service: str = "") -> int:
    with grpc.insecure_channel(address) as channel:
        return health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service=service), timeout=10).status


def test_local_services_serve_the_sdk_and_stop_gracefully(photos, tmp_path):
    store_dir, logs = tmp_path / "store", tmp_path / "logs"
    services = LocalServices(store_dir, env={"FLUXLORA_CACHE_DIR": str(tmp_path / "cache")}, log_dir=logs)

    def server_logs() -> str:
        return "\n".join(f"--- {p.name}\n{p.read_text(errors='replace')[-3000:]}" for p in sorted(logs.glob("*.log")))

    with services:
        assert set(services.processes) == set(SERVICES)
        assert len(set(services.ports.values())) == 4
        for name, address in services.addresses.items():
            assert services.processes[name].poll() is None, server_logs()
            assert health(address) == health_pb2.HealthCheckResponse.SERVING, name
            assert health(address, "fluxlora.v1.JobService") == health_pb2.HealthCheckResponse.SERVING, name

        with FluxloraClient(LocalStore(store_dir), **services.addresses) as client:
            job = client.wait(client.preprocess(client.upload_photos(photos), base_size=64))
            assert job.state == jobs_pb2.JOB_STATE_SUCCEEDED, server_logs()
            dataset_id = client.result(job).dataset_id
        # the servers wrote into the shared store directory
        assert (store_dir / "datasets" / dataset_id / "manifest.json").is_file()
        assert (store_dir / "jobs" / "preprocessing" / f"{job.job_id}.json").is_file()

    codes = {name: process.returncode for name, process in services.processes.items()}
    assert codes == dict.fromkeys(SERVICES, 0), server_logs()
    assert "shutting down gracefully" in server_logs()


def test_a_server_that_dies_at_start_is_reported_at_once(tmp_path):
    import pytest

    from fluxlora_client.local import LocalServices

    # An unusable store (a file where the directory should be) makes every server exit at start.
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("x")
    # Without the liveness check this would wait out the timeout and raise TimeoutError instead.
    with pytest.raises(RuntimeError, match="exited at start"):
        LocalServices(blocker / "store", log_dir=tmp_path / "logs").start(timeout=120)
