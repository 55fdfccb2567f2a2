"""Where credentials come from and how they are kept secret: environment or file only, one source
at a time, never in repr(), logs or error messages."""

from __future__ import annotations

import logging

import pytest
from pydantic import SecretStr

from fluxlora.common.auth import channel_credentials, load_auth_token, server_credentials
from fluxlora.common.config import Settings
from fluxlora_api.shared.auth import AuthConfigError, BearerTokenInterceptor, is_loopback

TOKEN = "s3cr3t-token-value"


def test_no_token_means_auth_off():
    assert load_auth_token(Settings(auth_token="")) is None


def test_the_token_comes_from_the_environment(monkeypatch):
    monkeypatch.setenv("FLUXLORA_AUTH_TOKEN", TOKEN)
    settings = Settings()
    assert load_auth_token(settings) == TOKEN
    assert TOKEN not in repr(settings) and TOKEN not in str(settings)
    assert TOKEN not in settings.model_dump_json()


def test_the_token_comes_from_a_file_without_its_newline(monkeypatch, tmp_path):
    (tmp_path / "token").write_text(TOKEN + "\n")
    monkeypatch.setenv("FLUXLORA_AUTH_TOKEN_FILE", str(tmp_path / "token"))
    assert load_auth_token(Settings()) == TOKEN


def test_both_sources_at_once_is_an_error_that_names_them_not_the_token(tmp_path):
    (tmp_path / "token").write_text(TOKEN)
    with pytest.raises(AuthConfigError) as err:
        load_auth_token(Settings(auth_token=TOKEN, auth_token_file=tmp_path / "token"))
    assert "not both" in str(err.value) and TOKEN not in str(err.value)


def test_an_empty_or_missing_token_file_does_not_turn_auth_off(tmp_path):
    (tmp_path / "empty").write_text("\n")
    with pytest.raises(AuthConfigError, match="is empty"):
        load_auth_token(Settings(auth_token_file=tmp_path / "empty"))
    with pytest.raises(AuthConfigError, match="cannot be read"):
        load_auth_token(Settings(auth_token_file=tmp_path / "missing"))


def test_half_configured_tls_is_an_error(tmp_path):
    with pytest.raises(AuthConfigError, match="both FLUXLORA_TLS_CERT_FILE and FLUXLORA_TLS_KEY_FILE"):
        server_credentials(Settings(tls_cert_file=tmp_path / "c"))
    with pytest.raises(AuthConfigError, match="FLUXLORA_TLS_CLIENT_CA_FILE needs"):
        server_credentials(Settings(tls_client_ca_file=tmp_path / "ca"))
    with pytest.raises(AuthConfigError, match="need FLUXLORA_TLS_CA_FILE"):
        channel_credentials(Settings(tls_client_cert_file=tmp_path / "c"))
    assert server_credentials(Settings()) is None and channel_credentials(Settings()) is None


def test_the_client_interceptor_hides_its_token():
    assert TOKEN not in repr(BearerTokenInterceptor(TOKEN))


@pytest.mark.parametrize(("host", "loopback"), [("127.0.0.1", True), ("localhost", True), ("::1", True),
                                                ("0.0.0.0", False), ("10.1.2.3", False), ("fluxlora.svc", False)])
def test_loopback_addresses(host, loopback):
    assert is_loopback(host) is loopback


def test_binding_a_wide_address_without_a_token_warns(tmp_path, caplog):
    from fluxlora.common.storage import LocalStore
    from fluxlora.server.bootstrap import RunningServer
    from fluxlora.server.services import load_definition

    settings = Settings(store=str(tmp_path), cache_dir=tmp_path / "cache", host="0.0.0.0")
    with caplog.at_level(logging.WARNING):
        RunningServer(load_definition("preprocessing"), settings, LocalStore(tmp_path), port=0).server.stop(0)
    assert "without authentication" in caplog.text and "FLUXLORA_AUTH_TOKEN" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        RunningServer(load_definition("preprocessing"), settings.model_copy(update={"auth_token": SecretStr(TOKEN)}),
                      LocalStore(tmp_path), port=0).server.stop(0)
    assert "without TLS" in caplog.text and TOKEN not in caplog.text
