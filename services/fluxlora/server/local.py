"""Starting the four services on this machine as separate processes (the embedded default).

Lifetimes: the servers die with this process (fluxlora.common.lifetime: they stop gracefully when
it dies, even by SIGKILL), `stop` sends them SIGTERM and kills what has not stopped after a grace
period, and `supervise` returns when one of them dies, saying which, with its exit code and the end
of its log. One dead server stops them all rather than being restarted: a half-running set would hide
the failure, and a supervisor (systemd, Compose, Kubernetes) is the place for restart policies.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from fluxlora.common.auth import AuthConfigError, channel_credentials
from fluxlora.common.config import Settings
from fluxlora.common.lifetime import PARENT_ENV
from fluxlora.server.ports import check_free
from fluxlora_api.shared.ports import SERVICES
from fluxlora_client.errors import FluxloraClientError

if TYPE_CHECKING:
    from fluxlora_client.client import FluxloraClient


PORTS_HINT = "choose other ports (fluxlora up --base-port; FLUXLORA_HEALTH_PORT)"


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def wait_healthy(address: str, timeout: float = 120.0, alive: Callable[[], bool] = lambda: True,
                 credentials: grpc.ChannelCredentials | None = None) -> None:
    """Waits until the server at `address` reports SERVING (over TLS with `credentials`); gives up early
    when `alive` says the process behind it has exited. A timeout names the last error seen (a TLS
    certificate the CA does not vouch for shows up there, not as a silent wait)."""
    deadline = time.monotonic() + timeout
    last = "no answer"
    channel = grpc.secure_channel(address, credentials) if credentials else grpc.insecure_channel(address)
    with channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while True:
            try:
                status = stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=2).status
                if status == health_pb2.HealthCheckResponse.SERVING:
                    return
                last = health_pb2.HealthCheckResponse.ServingStatus.Name(status)
            except grpc.RpcError as err:
                last = f"{err.code().name}: {err.details()}"
            if not alive():
                raise RuntimeError(f"the server for {address} exited before it became healthy")
            if time.monotonic() > deadline:
                raise TimeoutError(f"no healthy server at {address} after {timeout:.0f}s (last: {last})")
            time.sleep(0.3)


def health_ports_from(env: dict[str, str]) -> dict[str, int]:
    """FLUXLORA_HEALTH_PORT=N gives the four servers plaintext health ports N..N+3 (one port cannot
    serve four processes), in SERVICES order like the default ports; unset or 0: none."""
    value = env.get("FLUXLORA_HEALTH_PORT") or "0"
    if not value.strip().isdigit():
        raise FluxloraClientError("INVALID_ARGUMENT", f"FLUXLORA_HEALTH_PORT={value!r} is not a port number")
    base = int(value)
    return {name: base + i for i, name in enumerate(SERVICES)} if base else {}


def health_credentials(env: dict[str, str]) -> grpc.ChannelCredentials | None:
    """How to reach the servers' own port for health checks: TLS with FLUXLORA_TLS_CA_FILE (and the
    client certificate, if the servers require one) when they serve TLS; None for plaintext."""
    if not env.get("FLUXLORA_TLS_CERT_FILE"):
        return None
    if not env.get("FLUXLORA_TLS_CA_FILE"):
        raise FluxloraClientError(
            "INVALID_ARGUMENT", "the servers serve TLS (FLUXLORA_TLS_CERT_FILE) but nothing lets this process check "
            "that they started: set FLUXLORA_TLS_CA_FILE to the CA that signed the certificate (the SDK needs it "
            "too), or FLUXLORA_HEALTH_PORT for plaintext health ports")
    fields = {"tls_ca_file": "FLUXLORA_TLS_CA_FILE", "tls_client_cert_file": "FLUXLORA_TLS_CLIENT_CERT_FILE",
              "tls_client_key_file": "FLUXLORA_TLS_CLIENT_KEY_FILE"}
    try:
        return channel_credentials(Settings(**{field: env.get(name) or None for field, name in fields.items()}))
    except AuthConfigError as err:
        raise FluxloraClientError("INVALID_ARGUMENT", str(err)) from None


# Training runs each job in a child process here: a crash in training (out of memory, a CUDA fault)
# fails that job and leaves the server serving. Settings the caller passes or exports win.
SERVICE_DEFAULTS: dict[str, dict[str, str]] = {"training": {"FLUXLORA_RUNNER": "process"}}


def service_environment(name: str, env: dict[str, str]) -> dict[str, str]:
    """The environment of the `name` server: its defaults under the given environment."""
    return {**SERVICE_DEFAULTS.get(name, {}), **env}


class LocalServices:
    """The four servers as child processes sharing one store; stopped with SIGTERM on exit (SIGKILL
    after a grace period), and stopping by themselves when this process dies. Start them from a thread
    that lives as long as they should (on Linux a child's parent-death signal follows that thread)."""

    def __init__(self, store: str | Path, host: str = "127.0.0.1", ports: dict[str, int] | None = None,
                 env: dict[str, str] | None = None, log_dir: Path | None = None,
                 health_ports: dict[str, int] | None = None, stop_grace_s: float = 30.0):
        """env: settings for the servers on top of this process's environment. TLS servers
        (FLUXLORA_TLS_CERT_FILE/_KEY_FILE) are waited for on their plaintext health ports (`health_ports`,
        or FLUXLORA_HEALTH_PORT=N: N..N+3) when there are any, else over TLS trusting FLUXLORA_TLS_CA_FILE;
        their certificate must then name `host`. stop_grace_s: how long the servers get to stop on exit
        before they are killed."""
        self.store = str(store)
        self.host = host
        self.ports = ports or {name: free_port(host) for name in SERVICES}
        self.env = env or {}
        self.health_ports = health_ports or health_ports_from({**os.environ, **self.env})
        self.log_dir = log_dir
        self.stop_grace_s = stop_grace_s
        self.processes: dict[str, subprocess.Popen] = {}

    @property
    def addresses(self) -> dict[str, str]:
        return {name: f"{self.host}:{port}" for name, port in self.ports.items()}

    def start(self, timeout: float = 180.0) -> LocalServices:
        env = {**os.environ, **self.env, "FLUXLORA_STORE": self.store}
        credentials = None if self.health_ports else health_credentials(env)  # (refuses before starting any)
        probes = ({name: f"{self.host}:{port}" for name, port in self.health_ports.items()} if self.health_ports
                  else self.addresses)
        for name in SERVICES:  # a port in use: said at once, before any server starts
            try:
                check_free(self.host, self.ports[name], f"the {name} service", PORTS_HINT)
                if name in self.health_ports:
                    check_free(self.host, self.health_ports[name], f"the {name} health checks", PORTS_HINT)
            except OSError as err:
                raise RuntimeError(str(err)) from None
        for name in SERVICES:
            log = None
            if self.log_dir:
                self.log_dir.mkdir(parents=True, exist_ok=True)
                log = open(self.log_dir / f"{name}.log", "ab")
            server_env = {**service_environment(name, env), PARENT_ENV: str(os.getpid())}
            if self.health_ports:
                server_env["FLUXLORA_HEALTH_PORT"] = str(self.health_ports[name])
            self.processes[name] = subprocess.Popen(
                [sys.executable, "-m", "fluxlora.server.cli", "serve", name,
                 "--host", self.host, "--port", str(self.ports[name])],
                env=server_env, stdout=log or subprocess.DEVNULL,
                stderr=subprocess.STDOUT if log else None,
            )
        try:
            for name, address in probes.items():
                process = self.processes[name]
                try:
                    wait_healthy(address, timeout, alive=lambda p=process: p.poll() is None, credentials=credentials)
                except RuntimeError:
                    raise RuntimeError(f"the {name} server exited at start{self.exit_report(name)}") from None
        except BaseException:
            self.stop()
            raise
        return self

    def client(self) -> FluxloraClient:
        """An SDK client for these servers, with the token and TLS settings the servers were started
        with (this process's environment under `env`; FluxloraClient.from_env). It needs no store."""
        from fluxlora_client.client import FluxloraClient

        return FluxloraClient.from_env({**os.environ, **self.env}, **self.addresses)

    def stop(self, timeout: float = 30.0) -> None:
        """SIGTERM to every server still running (each stops gracefully), SIGKILL to those that have
        not stopped `timeout` seconds later."""
        for process in self.processes.values():
            if process.poll() is None:
                process.terminate()
        deadline = time.monotonic() + timeout
        for process in self.processes.values():
            try:
                process.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()

    def supervise(self, stop: threading.Event, poll_s: float = 0.5) -> str | None:
        """Waits until `stop` is set (None) or a server exits (its name: see exit_report)."""
        while not stop.wait(poll_s):
            for name, process in self.processes.items():
                if process.poll() is not None:
                    return name
        return None

    def exit_report(self, name: str, lines: int = 20) -> str:
        """' with code N (what it means)' and the last lines of the server's log, for a server that exited."""
        code = self.processes[name].returncode
        how = f" with code {code}"
        if code is not None and code < 0:
            how += f" (killed by {signal.Signals(-code).name})" if -code in signal.valid_signals() else ""
        if not self.log_dir:
            return how + " (its output went to this terminal; pass log_dir to keep it)"
        path = self.log_dir / f"{name}.log"
        try:
            tail = path.read_text(errors="replace").splitlines()[-lines:]
        except OSError:
            return f"{how}; no log at {path}"
        return f"{how}; the end of {path}:\n" + "\n".join(f"  {line}" for line in tail)

    def __enter__(self) -> LocalServices:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop(self.stop_grace_s)
