"""OpenTelemetry traces: one trace per request, from the SDK through the server, the job's worker
(thread, process or Kubernetes Job) and its object-store calls.

Off unless configured: `configure_from_env` installs the SDK's TracerProvider with the OTLP exporter
only when the standard OTEL_* variables ask for one (OTEL_EXPORTER_OTLP_ENDPOINT,
OTEL_EXPORTER_OTLP_TRACES_ENDPOINT or OTEL_TRACES_EXPORTER=otlp; the exporter reads the rest of
them: protocol, headers, OTEL_SERVICE_NAME, OTEL_TRACES_SAMPLER ...). Unconfigured, the API is a no-op.

A job's record carries the W3C `traceparent` of the submit call (Job.traceparent, Job.trace_id):
the server's job span and a worker process's span continue that trace from the record, so a worker in
its own process or pod needs nothing but the record and the same OTEL_* settings.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Callable
from typing import Any, TypeVar

from opentelemetry import propagate, trace

log = logging.getLogger(__name__)
T = TypeVar("T")
TRACER = trace.get_tracer("fluxlora")
_OTLP_VARS = ("OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")


def wanted(env: Any = None) -> bool:
    """True when the OTEL_* environment asks for traces."""
    env = os.environ if env is None else env
    exporter = env.get("OTEL_TRACES_EXPORTER", "").strip().lower()
    if exporter == "none" or env.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return False
    return exporter == "otlp" or any(env.get(name, "").strip() for name in _OTLP_VARS)


def configure_from_env(service_name: str) -> bool:
    """Installs a TracerProvider exporting over OTLP when the environment asks for it; True if it did."""
    if not wanted() or enabled():
        return enabled()
    from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    resource = Resource.create({"service.name": os.environ.get("OTEL_SERVICE_NAME") or service_name})
    provider = TracerProvider(resource=resource)
    provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
    trace.set_tracer_provider(provider)
    log.info("tracing to OTLP as %s", resource.attributes.get("service.name"))
    return True


def enabled() -> bool:
    """True once a real TracerProvider is installed (by configure_from_env, or by a test or host program)."""
    provider = trace.get_tracer_provider()
    return type(provider).__name__ not in ("ProxyTracerProvider", "NoOpTracerProvider")


def current_traceparent() -> str:
    """The W3C traceparent of the current span ("" when there is none)."""
    carrier: dict[str, str] = {}
    propagate.inject(carrier)
    return carrier.get("traceparent", "")


def trace_id_of(traceparent: str) -> str:
    parts = traceparent.split("-")
    return parts[1] if len(parts) == 4 else ""


def in_span(traceparent: str, name: str, call: Callable[[], T], **attributes: Any) -> T:
    """call() inside a span `name` continuing the trace of `traceparent` (a new trace without one)."""
    if not enabled():
        return call()
    parent = propagate.extract({"traceparent": traceparent}) if traceparent else None
    with TRACER.start_as_current_span(name, context=parent, attributes=attributes):
        return call()


def store_span(operation: str, where: str) -> Any:
    """A span around one object-store call (nothing without tracing)."""
    if not enabled():
        return contextlib.nullcontext()
    return TRACER.start_as_current_span(f"store {operation}", kind=trace.SpanKind.CLIENT,
                                        attributes={"fluxlora.store.operation": operation, "server.address": where})


def server_interceptors() -> list[Any]:
    """OpenTelemetry's gRPC server interceptor (the caller's traceparent metadata starts the request's
    span) when tracing is on; none otherwise."""
    if not enabled():
        return []
    from opentelemetry.instrumentation.grpc import server_interceptor

    return [server_interceptor()]
