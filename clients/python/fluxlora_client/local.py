"""Starting the four services on this machine as separate processes (the embedded default)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from fluxlora.common.config import SERVICES


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def wait_healthy(address: str, timeout: float = 120.0, alive: Callable[[], bool] = lambda: True) -> None:
    """Waits until the server at `address` reports SERVING; gives up early when `alive` says the
    process behind it has exited."""
    deadline = time.monotonic() + timeout
    with grpc.insecure_channel(address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while True:
            try:
                status = stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=2).status
                if status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                pass
            if not alive():
                raise RuntimeError(f"the server for {address} exited before it became healthy")
            if time.monotonic() > deadline:
                raise TimeoutError(f"no healthy server at {address} after {timeout:.0f}s")
            time.sleep(0.3)


# Training runs each job in a child process here: a crash in training (out of memory, a CUDA fault)
# fails that job and leaves the server serving. Settings the caller passes or exports win.
SERVICE_DEFAULTS: dict[str, dict[str, str]] = {"training": {"FLUXLORA_RUNNER": "process"}}


def service_environment(name: str, env: dict[str, str]) -> dict[str, str]:
    """The environment of the `name` server: its defaults under the given environment."""
    return {**SERVICE_DEFAULTS.get(name, {}), **env}


class LocalServices:
    """The four servers as child processes sharing one store; stopped with SIGTERM on exit."""

    def __init__(self, store: str | Path, host: str = "127.0.0.1", ports: dict[str, int] | None = None,
                 env: dict[str, str] | None = None, log_dir: Path | None = None):
        self.store = str(store)
        self.host = host
        self.ports = ports or {name: free_port(host) for name in SERVICES}
        self.env = env or {}
        self.log_dir = log_dir
        self.processes: dict[str, subprocess.Popen] = {}

    @property
    def addresses(self) -> dict[str, str]:
        return {name: f"{self.host}:{port}" for name, port in self.ports.items()}

    def start(self, timeout: float = 180.0) -> LocalServices:
        env = {**os.environ, **self.env, "FLUXLORA_STORE": self.store}
        for name in SERVICES:
            log = None
            if self.log_dir:
                self.log_dir.mkdir(parents=True, exist_ok=True)
                log = open(self.log_dir / f"{name}.log", "ab")
            self.processes[name] = subprocess.Popen(
                [sys.executable, "-m", "fluxlora_client.cli", "serve", name,
                 "--host", self.host, "--port", str(self.ports[name])],
                env=service_environment(name, env), stdout=log or subprocess.DEVNULL,
                stderr=subprocess.STDOUT if log else None,
            )
        try:
            for name, address in self.addresses.items():
                process = self.processes[name]
                try:
                    wait_healthy(address, timeout, alive=lambda p=process: p.poll() is None)
                except RuntimeError:
                    log_hint = f"; see {self.log_dir / (name + '.log')}" if self.log_dir else ""
                    raise RuntimeError(
                        f"the {name} server exited at start (code {process.returncode}){log_hint}"
                    ) from None
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self, timeout: float = 30.0) -> None:
        for process in self.processes.values():
            if process.poll() is None:
                process.terminate()
        for process in self.processes.values():
            try:
                process.wait(timeout)
            except subprocess.TimeoutExpired:
                process.kill()

    def __enter__(self) -> LocalServices:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
