"""Which address the container health check asks: the health-only port when a TLS server has one."""

from __future__ import annotations

from fluxlora.server.healthcheck import addresses
from fluxlora_api.shared.ports import DEFAULT_PORTS


def test_an_explicit_address_wins(monkeypatch):
    monkeypatch.setenv("FLUXLORA_HEALTH_PORT", "9000")
    assert addresses("10.0.0.1:1234") == ["10.0.0.1:1234"]


def test_the_health_port_comes_before_the_service_port(monkeypatch):
    monkeypatch.setenv("FLUXLORA_PORT", "50053")
    monkeypatch.setenv("FLUXLORA_HEALTH_PORT", "50153")
    assert addresses(None) == ["127.0.0.1:50153"]


def test_without_settings_every_default_port_is_asked(monkeypatch):
    monkeypatch.delenv("FLUXLORA_PORT", raising=False)
    monkeypatch.delenv("FLUXLORA_HEALTH_PORT", raising=False)
    assert addresses(None) == [f"127.0.0.1:{p}" for p in DEFAULT_PORTS.values()]
    monkeypatch.setenv("FLUXLORA_PORT", "50052")
    assert addresses(None) == ["127.0.0.1:50052"]
