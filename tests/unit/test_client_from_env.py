"""The SDK's own errors: from_env names the setting it could not use; a watch that cannot reach its
server again says so, naming the job and the setting that allows longer outages."""

from __future__ import annotations

import pytest

from fluxlora.server.local import free_port
from fluxlora_client import FluxloraClient
from fluxlora_client.errors import FluxloraClientError


@pytest.mark.parametrize(("variable", "value", "named"), [
    ("FLUXLORA_MAX_UPLOAD_BYTES", "lots", "FLUXLORA_MAX_UPLOAD_BYTES"),
    ("FLUXLORA_AUTH_TOKEN_FILE", "/nonexistent/token", "FLUXLORA_AUTH_TOKEN_FILE"),
    ("FLUXLORA_TLS_CLIENT_CERT_FILE", "/nonexistent/cert.pem", "FLUXLORA_TLS_CLIENT_CERT_FILE"),
])
def test_from_env_names_the_setting_it_cannot_use(monkeypatch, variable, value, named):
    monkeypatch.setenv(variable, value)
    with pytest.raises(FluxloraClientError) as err:
        FluxloraClient.from_env()
    assert err.value.code == "INVALID_ARGUMENT" and named in err.value.message


def test_from_env_needs_no_store_settings(monkeypatch):
    """The servers alone hold the store: its settings, however wrong, are nothing to the client."""
    monkeypatch.setenv("FLUXLORA_STORE", "s3://")
    monkeypatch.setenv("FLUXLORA_S3_SECURE", "not-a-bool")
    with FluxloraClient.from_env() as client:
        assert set(client.addresses) == {"preprocessing", "captioning", "training", "evaluation"}


def test_a_token_read_from_a_file_is_never_echoed(monkeypatch, tmp_path):
    monkeypatch.setenv("FLUXLORA_AUTH_TOKEN", "s3cr3t-looking")
    monkeypatch.setenv("FLUXLORA_AUTH_TOKEN_FILE", str(tmp_path / "token"))
    with pytest.raises(FluxloraClientError) as err:
        FluxloraClient.from_env()
    assert "FLUXLORA_AUTH_TOKEN" in err.value.message and "s3cr3t-looking" not in err.value.message


def test_a_watch_that_cannot_reach_its_server_names_the_job_and_the_setting(tmp_path):
    nobody = f"127.0.0.1:{free_port()}"
    with FluxloraClient(preprocessing=nobody, reconnect_for_s=0) as client:
        with pytest.raises(FluxloraClientError) as err:
            client.wait("pre-0123456789ab")
    assert err.value.code == "UNAVAILABLE"
    assert "pre-0123456789ab" in err.value.message and "reconnect_for_s" in err.value.message
