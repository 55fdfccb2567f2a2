"""Server bootstrap shared by the four services: the job runtime, gRPC health checking, server
reflection, token auth and TLS (fluxlora.common.auth), graceful shutdown on SIGTERM/SIGINT, config
from environment and flags, logging."""

from __future__ import annotations

import logging
import signal
import threading
from concurrent import futures

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from fluxlora.common import tracing
from fluxlora.common.auth import is_loopback, server_credentials, server_interceptors
from fluxlora.common.config import Settings
from fluxlora.common.lifetime import die_with_parent_from_env
from fluxlora.common.offline import configure_hf_offline
from fluxlora.common.storage import ArtifactStore, open_store
from fluxlora.jobs.definition import ServiceDefinition
from fluxlora.jobs.runtime import JobRuntime
from fluxlora.jobs.servicer import JobServicer
from fluxlora.jobs.webhooks import WebhookDispatcher, secret_of, webhook_urls
from fluxlora.server import telemetry
from fluxlora.server.ports import SERVER_OPTIONS, bind
from fluxlora.server.services import load_definition
from fluxlora.server.transfers import SERVICE_NAME as TRANSFER_SERVICE_NAME
from fluxlora.server.transfers import TransferServicer
from fluxlora_api.v1 import jobs_pb2, jobs_pb2_grpc, transfers_pb2_grpc

log = logging.getLogger(__name__)

configure_hf_offline()

JOB_SERVICE_NAME = jobs_pb2.DESCRIPTOR.services_by_name["JobService"].full_name
# Health names: "" and the services' names follow the runtime (readiness: NOT_SERVING while the store
# refuses job records or a worker thread stopped); LIVENESS stays SERVING until shutdown, so a liveness
# probe restarts a wedged process but never one that is only waiting for its store to come back.
LIVENESS = "liveness"
_STATUS = {True: health_pb2.HealthCheckResponse.SERVING, False: health_pb2.HealthCheckResponse.NOT_SERVING}
RPC_THREADS = 16  # server threads beyond the watch streams' (FLUXLORA_MAX_WATCHERS)


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
        names = (definition.grpc_name, JOB_SERVICE_NAME, TRANSFER_SERVICE_NAME, health.SERVICE_NAME,
                 reflection.SERVICE_NAME)
        # Metrics outermost: refused calls (auth, lockout) are counted too.
        self.observed = settings.metrics_port is not None
        observers = [telemetry.MetricsInterceptor(definition.name, names)] if self.observed else []
        observers += tracing.server_interceptors()  # OpenTelemetry: the caller's trace continues here
        credentials = server_credentials(settings)
        # A watch stream holds its thread while the job runs; at most max_watchers do (the runtime refuses
        # more), so the other RPC_THREADS always answer submits, GetJob and health checks.
        threads = settings.max_watchers + RPC_THREADS
        # grpc.so_reuseport=0 (SERVER_OPTIONS): a second server on this port fails to bind rather than
        # sharing the port's connections with this one.
        self._executor = futures.ThreadPoolExecutor(max_workers=threads, thread_name_prefix=definition.name)
        self.server = grpc.server(self._executor, interceptors=observers + interceptors, options=SERVER_OPTIONS)
        definition.add_servicer(self.server, self.runtime)
        # Job events as signed webhooks, delivered by threads of their own (fluxlora.jobs.webhooks).
        if settings.webhook_urls:
            webhook_urls((), settings)  # a bad FLUXLORA_WEBHOOK_URLS or no secret: refused at start
        self.webhooks = WebhookDispatcher(definition.name, self.store, settings) if secret_of(settings) else None
        if self.webhooks is not None:
            self.runtime.add_event_listener(self.webhooks)
            self.runtime.attach_outbox(self.webhooks)  # the lease holder alone sends a job's events
        jobs_pb2_grpc.add_JobServiceServicer_to_server(JobServicer(self.runtime, self.webhooks), self.server)
        # Clients upload and download through the server, which alone holds the store's credentials.
        transfers_pb2_grpc.add_TransferServiceServicer_to_server(TransferServicer(self.store, settings), self.server)
        self.health = health.HealthServicer(experimental_non_blocking=True)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        reflection.enable_server_reflection(names, self.server)
        bind_port = settings.port_for(definition.name) if port is None else port
        target = f"{settings.host}:{bind_port}"
        self.port = bind(self.server, target, credentials, f"the {definition.name} service")
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
            self.health_server = grpc.server(futures.ThreadPoolExecutor(max_workers=2, thread_name_prefix="health"),
                                             options=SERVER_OPTIONS)
            health_pb2_grpc.add_HealthServicer_to_server(self.health, self.health_server)
            bind(self.health_server, f"{settings.host}:{settings.health_port}", None,
                 f"the {definition.name} health checks (FLUXLORA_HEALTH_PORT)")
        self.metrics_port: int | None = None
        self.started = False

    def start(self) -> RunningServer:
        if self.started:
            return self
        self.started = True
        if self.observed:
            telemetry.watch_runtime(self.runtime)
            self.metrics_port = telemetry.serve(self.settings)
        self.runtime.start()
        self.server.start()
        if self.health_server:
            self.health_server.start()
        self.health.set(LIVENESS, health_pb2.HealthCheckResponse.SERVING)
        # SERVING while the runtime can run jobs: NOT_SERVING while the store refuses job records or a worker stopped.
        self.runtime.add_health_listener(lambda ok, why: [self.health.set(name, _STATUS[ok]) for name in (
            "", self.definition.grpc_name, JOB_SERVICE_NAME, TRANSFER_SERVICE_NAME)])
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
        telemetry.forget_runtime(self.runtime)
        if self.webhooks is not None:
            self.webhooks.stop()
        stopped.wait(grace)
        # grpc leaves its pool to its owner: without this its threads outlive the server (a process that
        # starts servers again and again, as tests and `fluxlora up` restarts do, would collect them).
        self._executor.shutdown(wait=False, cancel_futures=True)
        log.info("%s stopped", self.definition.name)

    def __enter__(self) -> RunningServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop(grace=1.0)


def start_server(name: str, settings: Settings, store: ArtifactStore | None = None,
                 port: int | None = None) -> RunningServer:
    return RunningServer(load_definition(name), settings, store, port).start()


def serve(name: str, settings: Settings) -> None:
    """Runs one service until SIGTERM or SIGINT. Started by a parent that set FLUXLORA_DIE_WITH_PARENT
    (`fluxlora up`), it also stops gracefully when that parent dies, however it died. A port another
    process holds ends it at once with exit code 1 and a message naming the port and that process."""
    die_with_parent_from_env(signal.SIGTERM)
    done = threading.Event()

    def on_signal(signum, frame) -> None:
        log.info("%s received %s; shutting down gracefully", name, signal.Signals(signum).name)
        done.set()

    signal.signal(signal.SIGTERM, on_signal)  # before starting: a SIGTERM during the start stops it, too
    signal.signal(signal.SIGINT, on_signal)
    tracing.configure_from_env(f"fluxlora-{name}")  # OTEL_* set: traces over OTLP
    try:
        running = start_server(name, settings)
    except OSError as err:
        log.error("%s", err)
        raise SystemExit(1) from None
    done.wait()
    running.stop()
