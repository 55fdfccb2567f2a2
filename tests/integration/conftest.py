"""Real gRPC servers on free localhost ports over a real store (local directory or moto's S3)."""

from __future__ import annotations

import pytest

from fluxlora.common.config import SERVICES, Settings
from fluxlora.common.server import start_server
from fluxlora_client import FluxloraClient


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory):
    from fluxlora.models.tiny_captioner import write_tiny_florence2
    from fluxlora.models.tiny_flux import write_tiny_flux

    root = tmp_path_factory.mktemp("models")
    return {"flux": write_tiny_flux(root / "tiny-flux"), "florence2": write_tiny_florence2(root / "tiny-florence2")}


@pytest.fixture(scope="session")
def photos(tmp_path_factory):
    from fluxlora.demo.sample_data import write_sample_photos

    folder = tmp_path_factory.mktemp("photos")
    write_sample_photos(folder, count=4, seed=1)
    return folder


def start_all(store, tmp_path):
    settings = Settings(store=str(tmp_path / "unused"), cache_dir=tmp_path / "cache")
    return [start_server(name, settings, store=store, port=0) for name in SERVICES]


@pytest.fixture
def running(store, tmp_path):
    """The four services and an SDK client, sharing `store` (parametrised: local and S3)."""
    servers = start_all(store, tmp_path)
    client = FluxloraClient(store, **{s.definition.name: s.address for s in servers})
    yield client
    client.close()
    for server in servers:
        server.stop(grace=1.0)
