"""Helpers the tests share: stores on both backends and the four servers with a client."""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import ipaddress
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path

import grpc
import pytest
from typer.testing import CliRunner

from fluxlora.common.config import Settings
from fluxlora.common.storage import ArtifactStore, LocalStore, S3Store
from fluxlora.server.bootstrap import RunningServer, start_server
from fluxlora.server.local import free_port, wait_healthy
from fluxlora.server.services import load_definition
from fluxlora_api.shared.ports import SERVICES
from fluxlora_client import FluxloraClient, cli


def make_s3_store(endpoint: str, public_endpoint: str = "") -> S3Store:
    """A fresh bucket on the S3 server, so tests never see each other's objects."""
    return S3Store.connect(endpoint, f"fluxlora-{uuid.uuid4().hex[:8]}", "test", "test", secure=False,
                           public_endpoint=public_endpoint)


class S3Endpoint:
    """moto's S3 server on one port, stopped and started like a real endpoint (its buckets live in
    this process, so they survive a stop like a real server's disks)."""

    def __init__(self):
        self.port = free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.server = None

    def start(self) -> None:
        from moto.server import ThreadedMotoServer

        self.server = ThreadedMotoServer(ip_address="127.0.0.1", port=self.port, verbose=False)
        self.server.start()

    def stop(self) -> None:
        self.server.stop()  # werkzeug closes the socket: connections are refused from here on
        self.server = None

    def back_in(self, seconds: float) -> threading.Timer:
        timer = threading.Timer(seconds, self.start)
        timer.start()
        return timer


def wait_until(condition, what: str, timeout: float = 120.0, logs=lambda: ""):
    """Polls `condition` until it returns something true, and returns that; after `timeout` seconds the
    test fails naming `what`, with `logs()` (a server's log tail) to show why."""
    deadline = time.monotonic() + timeout
    while not (value := condition()):
        assert time.monotonic() < deadline, f"gave up waiting for {what}\n{logs()}"
        time.sleep(0.02)
    return value


@contextlib.contextmanager
def fake_server(add_to_server, servicer) -> Iterator[str]:
    """`servicer` (a test's fake of one gRPC service, added by its generated `add_..._to_server`) served
    on a free localhost port; yields the address."""
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    add_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        yield f"127.0.0.1:{port}"
    finally:
        server.stop(0)


class StoreClient(FluxloraClient):
    """An SDK client beside the servers' store, which tests read to check what the servers wrote.
    The SDK itself has no store: everything it moves goes through the servers."""

    def __init__(self, store, **kwargs):
        super().__init__(**kwargs)
        self.store = store


def put_circles(store, folder: Path, dataset_id: str, colours=("red", "blue", "green")) -> str:
    """A captioned 64 px dataset of coloured circles put straight into the store (trigger "sks"), for
    training tests that need no preprocessing or captioning server work."""
    from PIL import Image, ImageDraw

    from fluxlora.common import keys

    captions = {}
    for i, colour in enumerate(colours):
        image = Image.new("RGB", (64, 64), "white")
        ImageDraw.Draw(image).ellipse((12, 8, 52, 56), fill=colour)
        image.save(folder / f"img{i}.png")
        captions[f"img{i}"] = f"sks, a {colour} circle"
        store.put_file(keys.dataset_images(dataset_id) + f"img{i}.png", folder / f"img{i}.png")
        store.put_bytes(keys.dataset_images(dataset_id) + f"img{i}.txt", captions[f"img{i}"].encode())
    store.put_json(keys.dataset_manifest(dataset_id), {"dataset_id": dataset_id,
                                                       "images": [{"stem": s} for s in captions]})
    store.put_json(keys.dataset_captions(dataset_id), {"trigger_word": "sks", "captions": captions})
    return dataset_id


def put_photos(store, folder, name: str) -> str:
    """Photos put straight into the store under uploads/<name>/ (as an operator with the store's
    credentials would), for tests that need uploads before any server runs."""
    store.upload_dir(folder, f"uploads/{name}/")
    return f"uploads/{name}/"


@contextlib.contextmanager
def services_and_client(store, tmp_path, **overrides):
    """The four servers on free ports over `store`, and an SDK client for them; `overrides` are Settings
    fields the servers run with (max_caption_chars=100, ...)."""
    settings = Settings(store=str(tmp_path / "unused"), cache_dir=tmp_path / "cache", **overrides)
    servers = [start_server(name, settings, store=store, port=0) for name in SERVICES]
    client = StoreClient(store, **{s.definition.name: s.address for s in servers})
    try:
        yield client
    finally:
        client.close()
        for server in servers:
            server.stop(grace=1.0)


class ServiceProcess:
    """One service as `fluxlora serve` in its own process group, on a port kept across restarts."""

    def __init__(self, service: str, store: ArtifactStore, tmp_path: Path, port: int | None = None,
                 command: list[str] | None = None, **env: str):
        """command: what serves, before the port number (default `fluxlora serve <service> --host
        127.0.0.1 --port`; a test's own script serves on port sys.argv[-1])."""
        self.service = service
        self.store = store
        self.port = port or free_port()
        self.command = command or [sys.executable, "-m", "fluxlora.server.cli", "serve", service,
                                   "--host", "127.0.0.1", "--port"]
        self.address = f"127.0.0.1:{self.port}"
        self.log = tmp_path / f"{service}.log"
        self.env = {**os.environ, **store_env(store), "FLUXLORA_CACHE_DIR": str(tmp_path / "cache"),
                    "FLUXLORA_WORKERS": "1", "FLUXLORA_PREPROCESS_WORKERS": "1", "OMP_NUM_THREADS": "1", **env}
        self.process: subprocess.Popen | None = None

    def start(self, wait: bool = True) -> ServiceProcess:
        with open(self.log, "ab") as log:
            self.process = subprocess.Popen(
                [*self.command, str(self.port)], env=self.env, stdout=log, stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        if wait:
            wait_healthy(self.address, timeout=120, alive=lambda: self.process.poll() is None)
        return self

    def kill(self, group: bool = True) -> None:
        """SIGKILL to the whole process group, as a container runtime does it; group=False: to the
        server alone, as the OOM killer does it (what it started must then go by itself)."""
        if group:
            os.killpg(self.process.pid, signal.SIGKILL)
        else:
            self.process.kill()
        self.process.wait(30)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.kill()

    def logs(self) -> str:
        return self.log.read_text(errors="replace")[-4000:]


def store_env(store: ArtifactStore) -> dict[str, str]:
    """The settings that point a server process at `store` (a directory, or a bucket on moto)."""
    if isinstance(store, LocalStore):
        return {"FLUXLORA_STORE": str(store.root)}
    return {"FLUXLORA_STORE": store.uri, "FLUXLORA_S3_ENDPOINT": store.endpoint,
            "FLUXLORA_S3_ACCESS_KEY": "test", "FLUXLORA_S3_SECRET_KEY": "test"}


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


@contextlib.contextmanager
def preprocessing_server(tmp_path, gate: threading.Event | None = None, store=None, **settings):
    """The real preprocessing server over `store` (a local one by default); its jobs wait for `gate`
    when one is given, so a test can hold the queue full for as long as it looks."""
    definition = load_definition("preprocessing")
    if gate is not None:
        real = definition.handler

        def gated(ctx, spec):
            gate.wait(60)
            return real(ctx, spec)

        definition = dataclasses.replace(definition, handler=gated)
    config = Settings(store=str(tmp_path / "unused"), cache_dir=tmp_path / "cache", **settings)
    server = RunningServer(definition, config, store or LocalStore(tmp_path / "store"), port=0).start()
    try:
        yield server
    finally:
        server.stop(grace=1.0)


def _pem_pair(name, issuer=None, ca=False, hosts=()):
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    issuer_name, issuer_key = (issuer[0], issuer[1]) if issuer else (subject, key)
    now = datetime.datetime.now(datetime.UTC)
    builder = (x509.CertificateBuilder().subject_name(subject).issuer_name(issuer_name).public_key(key.public_key())
               .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
               .not_valid_after(now + datetime.timedelta(days=1))
               .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
    if hosts:
        names = [x509.IPAddress(ipaddress.ip_address(h)) if h[0].isdigit() else x509.DNSName(h) for h in hosts]
        builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
    cert = builder.sign(issuer_key, hashes.SHA256())
    key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
    return cert, key, cert.public_bytes(serialization.Encoding.PEM), key_pem


def write_test_pki(folder):
    """A CA, a server certificate for localhost/127.0.0.1, a client certificate, and a stranger CA, as
    PEM files in `folder`: ca, server.crt, server.key, client.crt, client.key, stranger."""
    ca_cert, ca_key, ca_pem, _ = _pem_pair("fluxlora test CA", ca=True)
    ca_subject = ca_cert.subject
    _, _, server_pem, server_key = _pem_pair("server", issuer=(ca_subject, ca_key), hosts=("localhost", "127.0.0.1"))
    _, _, client_pem, client_key = _pem_pair("client", issuer=(ca_subject, ca_key))
    _, _, stranger_pem, _ = _pem_pair("stranger CA", ca=True)
    files = {"ca": ca_pem, "server.crt": server_pem, "server.key": server_key, "client.crt": client_pem,
             "client.key": client_key, "stranger": stranger_pem}
    for name, data in files.items():
        (folder / name).write_bytes(data)
    return folder
