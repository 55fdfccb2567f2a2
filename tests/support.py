"""Helpers the tests share: stores on both backends and the four servers with a client."""

from __future__ import annotations

import contextlib
import uuid

from fluxlora.common.config import SERVICES, Settings
from fluxlora.common.server import start_server
from fluxlora.common.storage import S3Store
from fluxlora_client import FluxloraClient


def make_s3_store(endpoint: str) -> S3Store:
    """A fresh bucket on the S3 server, so tests never see each other's objects."""
    return S3Store.connect(endpoint, f"fluxlora-{uuid.uuid4().hex[:8]}", "test", "test", secure=False)


@contextlib.contextmanager
def services_and_client(store, tmp_path):
    """The four servers on free ports over `store`, and an SDK client for them."""
    settings = Settings(store=str(tmp_path / "unused"), cache_dir=tmp_path / "cache")
    servers = [start_server(name, settings, store=store, port=0) for name in SERVICES]
    client = FluxloraClient(store, **{s.definition.name: s.address for s in servers})
    try:
        yield client
    finally:
        client.close()
        for server in servers:
            server.stop(grace=1.0)
