"""The SDK's own errors: from_env names the setting it could not use; a watch that cannot reach its
server again says so, naming the job and the setting that allows longer outages."""

from __future__ import annotations

import pytest

from fluxlora.common.storage import LocalStore
from fluxlora.server.local import free_port
from fluxlora_client import FluxloraClient
from fluxlora_client.errors import FluxloraClientError


@pytest.mark.parametrize(("variable", "value", "named"), [
    ("FLUXLORA_MAX_UPLOAD_BYTES", "lots", "FLUXLORA_MAX_UPLOAD_BYTES"),
    ("FLUXLORA_AUTH_TOKEN_FILE", "/nonexistent/token", "FLUXLORA_AUTH_TOKEN_FILE"),
    ("FLUXLORA_STORE", "s3://", "FLUXLORA_STORE"),
])
def test_from_env_names_the_setting_it_cannot_use(monkeypatch, variable, value, named):
    monkeypatch.setenv(variable, value)
    with pytest.raises(FluxloraClientError) as err:
        FluxloraClient.from_env()
    assert err.value.code == "INVALID_ARGUMENT" and named in err.value.message


def test_from_env_never_echoes_a_value_it_rejects(monkeypatch):
    monkeypatch.setenv("FLUXLORA_S3_SECURE", "s3cr3t-looking")
    with pytest.raises(FluxloraClientError) as err:
        FluxloraClient.from_env()
    assert "FLUXLORA_S3_SECURE" in err.value.message and "s3cr3t-looking" not in err.value.message


def test_a_watch_that_cannot_reach_its_server_names_the_job_and_the_setting(tmp_path):
    nobody = f"127.0.0.1:{free_port()}"
    with FluxloraClient(LocalStore(tmp_path), preprocessing=nobody, reconnect_for_s=0) as client:
        with pytest.raises(FluxloraClientError) as err:
            client.wait("pre-0123456789ab")
    assert err.value.code == "UNAVAILABLE"
    assert "pre-0123456789ab" in err.value.message and "reconnect_for_s" in err.value.message
