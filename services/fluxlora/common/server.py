"""Server bootstrap shared by the four services: the job runtime, gRPC health checking, server
reflection, token auth and TLS (fluxlora.common.auth), graceful shutdown on SIGTERM/SIGINT, config
from environment and flags, logging."""

from __future__ import annotations

import importlib
import logging
import signal
import threading
from collections.abc import Callable
from concurrent import futures
from dataclasses import dataclass
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from fluxlora.common.auth import is_loopback, server_credentials, server_interceptors
from fluxlora.common.config import SERVICES, Settings
from fluxlora.common.offline import configure_hf_offline
from fluxlora.common.storage import ArtifactStore, open_store
from fluxlora.jobs.runtime import Handler, JobRuntime
from fluxlora.jobs.servicer import JobServicer
from fluxlora_api.v1 import jobs_pb2, jobs_pb2_grpc

log = logging.getLogger(__name__)

configure_hf_offline()

JOB_SERVICE_NAME = jobs_pb2.DESCRIPTOR.services_by_name["JobService"].full_name
_STATUS = {True: health_pb2.HealthCheckResponse.SERVING, False: health_pb2.HealthCheckResponse.NOT_SERVING}
RPC_THREADS = 16  # server threads beyond the watch streams' (FLUXLORA_MAX_WATCHERS)


@dataclass(frozen=True)
class ServiceDefinition:
    """What a service package contributes; the bootstrap does the rest."""

    name: str  # "preprocessing"
    job_prefix: str  # job ids look like "<prefix>-1a2b3c..."
    grpc_name: str  # "fluxlora.v1.PreprocessingService"
    handler: Handler  # runs one job
    add_servicer: Callable[[grpc.Server, JobRuntime], None]


def define(name: str, job_prefix: str, pb2: Any, pb2_grpc: Any, grpc_service: str,
           servicer: Callable[[JobRuntime], Any], handler: Handler) -> ServiceDefinition:
    """A ServiceDefinition from a service's generated modules, servicer class and job handler."""
    add = getattr(pb2_grpc, f"add_{grpc_service}Servicer_to_server")
    return ServiceDefinition(
        name=name,
        job_prefix=job_prefix,
        grpc_name=pb2.DESCRIPTOR.services_by_name[grpc_service].full_name,
        handler=handler,
        add_servicer=lambda server, runtime: add(servicer(runtime), server),
    )


def load_definition(name: str) -> ServiceDefinition:
    if name not in SERVICES:
        raise ValueError(f"unknown service {name!r}; choose one of {', '.join(SERVICES)}")
    # Imported lazily so the preprocessing server never imports torch.
    return importlib.import_module(f"fluxlora.{name}.service").SERVICE


class RunningServer:
    def __init__(self, definition: ServiceDefinition, settings: Settings, store: ArtifactStore | None = None,
                 port: int | None = None):
        self.definition = definition
        self.settings = settings
        self.store = store or open_store(settings)
        self.runtime = JobRuntime(
            definition.name,
            definition.job_prefix,
            self.store,
            definition.handler,
            settings=settings,
            workers=settings.workers,
            max_queued=settings.max_queued_jobs,
            max_watchers=settings.max_watchers,
        )
        interceptors = server_interceptors(settings)
        credentials = server_credentials(settings)
        # A watch stream holds its thread while the job runs; at most max_watchers do (the runtime refuses
        # more), so the other RPC_THREADS always answer submits, GetJob and health checks.
        threads = settings.max_watchers + RPC_THREADS
        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=threads, thread_name_prefix=definition.name),
                                  interceptors=interceptors)
        definition.add_servicer(self.server, self.runtime)
        jobs_pb2_grpc.add_JobServiceServicer_to_server(JobServicer(self.runtime), self.server)
        self.health = health.HealthServicer(experimental_non_blocking=True)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        names = (definition.grpc_name, JOB_SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME)
        reflection.enable_server_reflection(names, self.server)
        bind_port = settings.port_for(definition.name) if port is None else port
        target = f"{settings.host}:{bind_port}"
        self.port = (self.server.add_secure_port(target, credentials) if credentials
                     else self.server.add_insecure_port(target))
        if self.port == 0:
            raise OSError(f"could not bind {target} for the {definition.name} service")
        self.address = f"{settings.host}:{self.port}"
        self.tls = credentials is not None
        self.authenticated = bool(interceptors)
        if not is_loopback(settings.host) and not self.authenticated:
            log.warning("%s binds %s without authentication: anyone who can reach it can submit and cancel "
                        "jobs; set FLUXLORA_AUTH_TOKEN or FLUXLORA_AUTH_TOKEN_FILE", definition.name, settings.host)
        elif not is_loopback(settings.host) and not self.tls:
            log.warning("%s binds %s without TLS: the token crosses the network in plaintext unless a mesh "
                        "encrypts it; set FLUXLORA_TLS_CERT_FILE and FLUXLORA_TLS_KEY_FILE", definition.name,
                        settings.host)
        # The Kubernetes gRPC probe and the Docker HEALTHCHECK cannot speak TLS: a TLS server can also
        # answer health, and nothing else, in plaintext on FLUXLORA_HEALTH_PORT.
        self.health_server = None
        if settings.health_port:
            self.health_server = grpc.server(futures.ThreadPoolExecutor(max_workers=2, thread_name_prefix="health"))
            health_pb2_grpc.add_HealthServicer_to_server(self.health, self.health_server)
            if not self.health_server.add_insecure_port(f"{settings.host}:{settings.health_port}"):
                raise OSError(f"could not bind {settings.host}:{settings.health_port} (FLUXLORA_HEALTH_PORT)")
        self.started = False

    def start(self) -> RunningServer:
        if self.started:
            return self
        self.started = True
        self.runtime.start()
        self.server.start()
        if self.health_server:
            self.health_server.start()
        # SERVING while the runtime can run jobs: NOT_SERVING while the store refuses job records or a worker stopped.
        self.runtime.add_health_listener(lambda ok, why: [self.health.set(name, _STATUS[ok]) for name in (
            "", self.definition.grpc_name, JOB_SERVICE_NAME)])
        log.info("%s serving on %s (store %s, tls %s, auth %s)", self.definition.name, self.address, self.store.uri,
                 "on" if self.tls else "off", "token" if self.authenticated else "off")
        return self

    def stop(self, grace: float = 5.0) -> None:
        """Stops taking new RPCs, tells health checkers, and interrupts running jobs (they stay
        queued in the store and run again on the next start)."""
        self.health.enter_graceful_shutdown()
        stopped = self.server.stop(grace)
        if self.health_server:
            self.health_server.stop(grace)
        self.runtime.shutdown()
        stopped.wait(grace)
        log.info("%s stopped", self.definition.name)

    def __enter__(self) -> RunningServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop(grace=1.0)


def start_server(name: str, settings: Settings, store: ArtifactStore | None = None,
                 port: int | None = None) -> RunningServer:
    return RunningServer(load_definition(name), settings, store, port).start()


def serve(name: str, settings: Settings) -> None:
    """Runs one service until SIGTERM or SIGINT."""
    running = start_server(name, settings)
    done = threading.Event()

    def on_signal(signum, frame) -> None:
        log.info("%s received %s; shutting down gracefully", name, signal.Signals(signum).name)
        done.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    done.wait()
    running.stop()
