"""Fixtures shared by unit and integration tests: artifact stores on both backends."""

from __future__ import annotations

import pytest

from fluxlora.common.storage import LocalStore
from support import make_s3_store


@pytest.fixture(scope="session")
def moto_endpoint():
    """A real S3 server over HTTP (moto), which the real `minio` client talks to."""
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    yield f"{host}:{port}"
    server.stop()


@pytest.fixture(params=["local", "s3"])
def store(request, tmp_path):
    if request.param == "local":
        return LocalStore(tmp_path / "store")
    return make_s3_store(request.getfixturevalue("moto_endpoint"))
