"""`fluxlora up` / `fluxlora demo` run training jobs in a child process (a crash in training fails the
job, not the server), unless the caller chose another runner."""

from fluxlora.server.local import service_environment


def test_training_defaults_to_the_process_runner_and_the_others_do_not():
    assert service_environment("training", {"PATH": "/bin"})["FLUXLORA_RUNNER"] == "process"
    for name in ("preprocessing", "captioning", "evaluation"):
        assert "FLUXLORA_RUNNER" not in service_environment(name, {"PATH": "/bin"})


def test_a_runner_the_caller_set_wins():
    assert service_environment("training", {"FLUXLORA_RUNNER": "local"})["FLUXLORA_RUNNER"] == "local"


def test_one_health_port_setting_gives_the_four_servers_four_ports():
    import pytest

    from fluxlora.server.local import health_ports_from
    from fluxlora_client.errors import FluxloraClientError

    assert health_ports_from({"FLUXLORA_HEALTH_PORT": "8080"}) == {
        "preprocessing": 8080, "captioning": 8081, "training": 8082, "evaluation": 8083}
    assert health_ports_from({"FLUXLORA_HEALTH_PORT": "0"}) == {} == health_ports_from({})
    with pytest.raises(FluxloraClientError, match="FLUXLORA_HEALTH_PORT='http'"):
        health_ports_from({"FLUXLORA_HEALTH_PORT": "http"})


def test_tls_servers_without_a_ca_or_health_ports_are_refused_before_any_starts(tmp_path):
    import pytest

    from fluxlora.server.local import LocalServices
    from fluxlora_client.errors import FluxloraClientError

    env = {"FLUXLORA_TLS_CERT_FILE": str(tmp_path / "server.crt"), "FLUXLORA_TLS_KEY_FILE": str(tmp_path / "key"),
           "FLUXLORA_TLS_CA_FILE": "", "FLUXLORA_HEALTH_PORT": "0"}
    services = LocalServices(tmp_path / "store", env=env)
    with pytest.raises(FluxloraClientError) as err:
        services.start()
    assert err.value.code == "INVALID_ARGUMENT"
    assert "FLUXLORA_TLS_CA_FILE" in err.value.message and "FLUXLORA_HEALTH_PORT" in err.value.message
    assert services.processes == {}
