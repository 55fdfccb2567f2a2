"""Helpers the tests share: stores on both backends and the four servers with a client."""

from __future__ import annotations

import contextlib
import sys
import uuid

import pytest
from typer.testing import CliRunner

from fluxlora.common.config import SERVICES, Settings
from fluxlora.common.server import start_server
from fluxlora.common.storage import S3Store
from fluxlora_client import FluxloraClient, cli


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


def fluxlora(*args: str):
    """`fluxlora ...` through typer's runner; the result has exit_code and output."""
    result = CliRunner().invoke(cli.app, list(args))
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    return result


def run_main(monkeypatch, capsys, *args: str) -> tuple[int, str]:
    """`fluxlora ...` as the installed entry point runs it (cli.main): exit code and all output."""
    monkeypatch.setattr(sys, "argv", ["fluxlora", *args])
    with pytest.raises(SystemExit) as exit_:
        cli.main()
    captured = capsys.readouterr()
    return exit_.value.code, captured.out + captured.err
