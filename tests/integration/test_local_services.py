"""The embedded default (what `fluxlora up` and `fluxlora demo` use): the four services as real
processes on one local-directory store, healthy over gRPC, doing work for the SDK, and shutting
down gracefully on SIGTERM; with TLS configured, waited for over TLS (or on plaintext health ports)
and reached by their client over TLS with the token."""

from __future__ import annotations

import secrets

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from fluxlora.server.local import LocalServices, free_port
from fluxlora_api.shared.ports import SERVICES
from fluxlora_api.v1 import jobs_pb2
from fluxlora_client import FluxloraClient
from fluxlora_client.errors import FluxloraClientError
from support import write_test_pki


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

        with FluxloraClient(**services.addresses) as client:
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
    # An unusable store (a file where the directory should be) makes every server exit at start.
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("x")
    # Without the liveness check this would wait out the timeout and raise TimeoutError instead.
    with pytest.raises(RuntimeError, match="exited at start"):
        LocalServices(blocker / "store", log_dir=tmp_path / "logs").start(timeout=120)


# --- TLS (fluxlora up / demo with FLUXLORA_TLS_*) ---------------------------------------------------
def tls_environment(monkeypatch, pki, token: str) -> None:
    """What a user exports before `fluxlora up` / `fluxlora demo`: servers and SDK read the same variables."""
    for name, value in {"FLUXLORA_TLS_CERT_FILE": pki / "server.crt", "FLUXLORA_TLS_KEY_FILE": pki / "server.key",
                        "FLUXLORA_TLS_CA_FILE": pki / "ca", "FLUXLORA_AUTH_TOKEN": token}.items():
        monkeypatch.setenv(name, str(value))


@pytest.mark.slow  # ~20 s of process starts; TLS through the SDK is also test_auth's, in the fast tier
def test_local_services_start_tls_servers_and_their_client_round_trips_a_job(photos, tmp_path, monkeypatch):
    pki = write_test_pki(tmp_path)
    token = secrets.token_hex(16)
    tls_environment(monkeypatch, pki, token)
    store_dir = tmp_path / "store"
    # waited for over TLS, trusting FLUXLORA_TLS_CA_FILE (a plaintext probe would never see them healthy)
    with LocalServices(store_dir, env={"FLUXLORA_CACHE_DIR": str(tmp_path / "cache")}, log_dir=tmp_path / "logs") \
            as services:
        for address in services.addresses.values():
            with pytest.raises(grpc.RpcError):
                health(address)  # plaintext: refused
        with services.client() as client:  # what the demo uses: TLS and token from the environment
            job = client.wait(client.preprocess(client.upload_photos(photos), base_size=64))
            assert job.state == jobs_pb2.JOB_STATE_SUCCEEDED
            assert (store_dir / "datasets" / client.result(job).dataset_id / "manifest.json").is_file()
        monkeypatch.setenv("FLUXLORA_AUTH_TOKEN", "not-" + token)
        with services.client() as stranger, pytest.raises(FluxloraClientError) as err:
            stranger.list_jobs("preprocessing")
        assert err.value.code == "UNAUTHENTICATED"  # the token really is required over that TLS
    assert {p.returncode for p in services.processes.values()} == {0}


@pytest.mark.slow  # ~20 s of process starts
def test_tls_servers_with_health_ports_are_waited_for_in_plaintext(tmp_path, monkeypatch):
    tls_environment(monkeypatch, write_test_pki(tmp_path), "t0ken")
    monkeypatch.delenv("FLUXLORA_TLS_CA_FILE")  # not needed: health is checked in plaintext
    health_ports = {name: free_port() for name in SERVICES}
    with LocalServices(tmp_path / "store", env={"FLUXLORA_CACHE_DIR": str(tmp_path / "cache")},
                       health_ports=health_ports) as services:
        for name, port in health_ports.items():
            assert health(f"127.0.0.1:{port}", "fluxlora.v1.JobService") == health_pb2.HealthCheckResponse.SERVING
            assert services.processes[name].poll() is None
