"""Token authentication and TLS through the public surface: every RPC of every service refuses calls
without the right token (the list comes from the service descriptors, so new RPCs are covered the day
they are added), health checks need none, the token never shows in logs or errors, and TLS (with
optional client certificates) round-trips through the SDK."""

from __future__ import annotations

import logging
import secrets

import grpc
import pytest
from google.protobuf import message_factory
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2

from fluxlora.common.config import Settings
from fluxlora.common.storage import LocalStore
from fluxlora.server.bootstrap import start_server
from fluxlora.server.healthcheck import serving
from fluxlora_api.shared.ports import SERVICES
from fluxlora_api.v1 import captioning_pb2, evaluation_pb2, jobs_pb2, preprocessing_pb2, training_pb2
from fluxlora_client import FluxloraClient
from fluxlora_client.errors import FluxloraClientError
from support import write_test_pki

TOKEN = "tok-" + secrets.token_hex(16)
WRONG = "tok-" + secrets.token_hex(16)
MODULES = (preprocessing_pb2, captioning_pb2, training_pb2, evaluation_pb2)


@pytest.fixture
def secured(tmp_path, caplog):
    """The four servers with a token configured, over one local store."""
    caplog.set_level(logging.DEBUG)
    store = LocalStore(tmp_path / "store")
    # These tests send dozens of wrong tokens from one address on purpose: the lockout that would stop
    # them has its own tests (test_auth_lockout.py).
    settings = Settings(store=str(tmp_path / "store"), cache_dir=tmp_path / "cache", auth_token=TOKEN,
                        auth_max_failures=0)
    servers = {name: start_server(name, settings, store=store, port=0) for name in SERVICES}
    yield servers
    for server in servers.values():
        server.stop(grace=1.0)
    assert TOKEN not in caplog.text and WRONG not in caplog.text


def every_rpc(servers):
    """(address, method path, request class, streaming response) for each RPC each server serves."""
    for module, name in zip(MODULES, SERVICES, strict=True):
        services = [*module.DESCRIPTOR.services_by_name.values(), *jobs_pb2.DESCRIPTOR.services_by_name.values()]
        for service in services:
            for method in service.methods:
                yield (servers[name].address, f"/{service.full_name}/{method.name}",
                       message_factory.GetMessageClass(method.input_type), method.server_streaming)


def call(address, path, request_class, streaming, token=None):
    """The status code of one call with an empty request (the token, if any, as a bearer header)."""
    metadata = [("authorization", f"Bearer {token}")] if token else None
    with grpc.insecure_channel(address) as channel:
        try:
            if streaming:
                stub = channel.unary_stream(path, request_serializer=request_class.SerializeToString)
                for _ in stub(request_class(), metadata=metadata, timeout=10):
                    break
            else:
                stub = channel.unary_unary(path, request_serializer=request_class.SerializeToString)
                stub(request_class(), metadata=metadata, timeout=10)
        except grpc.RpcError as err:
            return err.code(), err.details() or ""
    return grpc.StatusCode.OK, ""


def test_every_rpc_of_every_service_refuses_a_missing_or_wrong_token(secured):
    rpcs = list(every_rpc(secured))
    assert len(rpcs) >= 4 * 5  # each service's own RPCs and the JobService on all four
    for address, path, request_class, streaming in rpcs:
        for token, word in ((None, "no credentials"), (WRONG, "invalid credentials")):
            code, details = call(address, path, request_class, streaming, token)
            assert code == grpc.StatusCode.UNAUTHENTICATED, (path, token is not None, code)
            assert word in details and "authorization: Bearer <token>" in details and "FLUXLORA_AUTH_TOKEN" in details
            assert TOKEN not in details and WRONG not in details


def test_every_rpc_lets_the_right_token_through(secured):
    for address, path, request_class, streaming in every_rpc(secured):
        code, _ = call(address, path, request_class, streaming, TOKEN)
        assert code != grpc.StatusCode.UNAUTHENTICATED, path  # empty requests: INVALID_ARGUMENT etc.


def test_a_wrong_scheme_and_unknown_methods_are_refused_too(secured):
    address = secured["training"].address
    with grpc.insecure_channel(address) as channel:
        for metadata in ([("authorization", f"Basic {TOKEN}")], [("authorization", TOKEN)], None):
            with pytest.raises(grpc.RpcError) as err:
                channel.unary_unary("/fluxlora.v1.NoSuchService/Nothing")(b"", metadata=metadata, timeout=10)
            assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED


def test_health_checks_need_no_token(secured):
    for server in secured.values():
        for service in ("", server.definition.grpc_name):
            ok, answer = serving(server.address, service)
            assert ok, answer


def test_reflection_needs_the_token(secured):
    address = secured["preprocessing"].address
    path = "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo"
    request = reflection_pb2.ServerReflectionRequest(list_services="")
    with grpc.insecure_channel(address) as channel:
        stub = channel.stream_stream(path, request_serializer=reflection_pb2.ServerReflectionRequest.SerializeToString,
                                     response_deserializer=reflection_pb2.ServerReflectionResponse.FromString)
        with pytest.raises(grpc.RpcError) as err:
            list(stub(iter([request]), timeout=10))
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
        answer = list(stub(iter([request]), metadata=[("authorization", f"Bearer {TOKEN}")], timeout=10))
    names = {s.name for s in answer[0].list_services_response.service}
    assert "fluxlora.v1.PreprocessingService" in names


def test_the_sdk_sends_the_token_on_every_call_watch_included(secured, tmp_path, photos):
    addresses = {name: server.address for name, server in secured.items()}
    with FluxloraClient(**addresses, token=WRONG) as client:
        with pytest.raises(FluxloraClientError) as err:
            client.list_jobs("training")
        assert err.value.code == "UNAUTHENTICATED" and WRONG not in str(err.value)
    with FluxloraClient.from_env({"FLUXLORA_AUTH_TOKEN": TOKEN}, **addresses) as client:
        job = client.wait(client.preprocess(client.upload_photos(photos), base_size=256))  # WatchJob streams
        assert job.state == jobs_pb2.JOB_STATE_SUCCEEDED
        assert [j.job_id for j in client.list_jobs("preprocessing")] == [job.job_id]


def test_the_sdk_reads_the_token_from_a_file(secured, tmp_path):
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN + "\n")
    with FluxloraClient.from_env({"FLUXLORA_AUTH_TOKEN_FILE": str(token_file)},
                                 training=secured["training"].address) as client:
        assert client.list_jobs("training") == []


# --- TLS -------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    return write_test_pki(tmp_path_factory.mktemp("pki"))


def _tls_server(tmp_path, pki, **extra):
    settings = Settings(store=str(tmp_path / "store"), cache_dir=tmp_path / "cache", auth_token=TOKEN,
                        tls_cert_file=pki / "server.crt", tls_key_file=pki / "server.key", **extra)
    return start_server("preprocessing", settings, store=LocalStore(tmp_path / "store"), port=0)


def _client(tmp_path, address, **tls):
    env = {"FLUXLORA_AUTH_TOKEN": TOKEN, **{f"FLUXLORA_{name.upper()}": str(path) for name, path in tls.items()}}
    return FluxloraClient.from_env(env, preprocessing=address)


def test_tls_round_trip_through_the_sdk(tmp_path, pki, caplog):
    with _tls_server(tmp_path, pki) as server:
        with _client(tmp_path, server.address, tls_ca_file=pki / "ca") as client:
            assert client.list_jobs("preprocessing") == []
        with _client(tmp_path, server.address) as plaintext, pytest.raises(FluxloraClientError) as err:
            plaintext.list_jobs("preprocessing")
        assert err.value.code == "UNAVAILABLE"
        with _client(tmp_path, server.address, tls_ca_file=pki / "stranger") as fooled, \
                pytest.raises(FluxloraClientError) as err:
            fooled.list_jobs("preprocessing")
        assert err.value.code == "UNAVAILABLE"
    assert TOKEN not in caplog.text


def test_a_client_ca_makes_client_certificates_required(tmp_path, pki):
    with _tls_server(tmp_path, pki, tls_client_ca_file=pki / "ca") as server:
        with _client(tmp_path, server.address, tls_ca_file=pki / "ca") as anonymous, \
                pytest.raises(FluxloraClientError) as err:
            anonymous.list_jobs("preprocessing")
        assert err.value.code == "UNAVAILABLE"
        with _client(tmp_path, server.address, tls_ca_file=pki / "ca", tls_client_cert_file=pki / "client.crt",
                     tls_client_key_file=pki / "client.key") as client:
            assert client.list_jobs("preprocessing") == []


def test_a_tls_server_answers_health_in_plaintext_on_the_health_port_and_nothing_else(tmp_path, pki):
    from fluxlora.server.local import free_port

    health_port = free_port()
    with _tls_server(tmp_path, pki, health_port=health_port) as server:
        address = f"127.0.0.1:{health_port}"
        ok, answer = serving(address, "fluxlora.v1.PreprocessingService")
        assert ok, answer
        with grpc.insecure_channel(address) as channel:
            with pytest.raises(grpc.RpcError) as err:
                channel.unary_unary("/fluxlora.v1.JobService/ListJobs")(b"", timeout=10)
            assert err.value.code() == grpc.StatusCode.UNIMPLEMENTED
            status = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10).status
            assert status == health_pb2.HealthCheckResponse.SERVING
        assert server.tls
