"""OpenTelemetry for SDK calls, when the program has it: each RPC runs in a client span and carries
the W3C `traceparent`, so the server, the job's worker and its store calls join the caller's trace.

Optional: only `opentelemetry-api` is needed (`pip install fluxlora-client[tracing]`), and only the
program's own TracerProvider (if it installed one) records anything. Without the package, the SDK
sends no trace headers and behaves as before.
"""

from __future__ import annotations

from typing import Any

import grpc

try:  # optional
    from opentelemetry import propagate, trace
except ImportError:  # pragma: no cover - exercised where opentelemetry-api is absent
    trace = None  # type: ignore[assignment]
    propagate = None  # type: ignore[assignment]


class _Details(grpc.ClientCallDetails):
    def __init__(self, details: grpc.ClientCallDetails, metadata: list[tuple[str, str]]):
        self.method = details.method
        self.timeout = details.timeout
        self.metadata = metadata
        self.credentials = details.credentials
        self.wait_for_ready = getattr(details, "wait_for_ready", None)
        self.compression = getattr(details, "compression", None)


class TracingInterceptor(grpc.UnaryUnaryClientInterceptor, grpc.UnaryStreamClientInterceptor,
                         grpc.StreamUnaryClientInterceptor):
    """A client span per RPC (named after the method), its context injected into the call's metadata."""

    def __init__(self) -> None:
        assert trace is not None and propagate is not None
        self.tracer = trace.get_tracer("fluxlora_client")

    def _traced(self, continuation, details, request):
        assert trace is not None and propagate is not None
        name = details.method.lstrip("/")
        with self.tracer.start_as_current_span(name, kind=trace.SpanKind.CLIENT,
                                               attributes={"rpc.system": "grpc"}) as span:
            carrier: dict[str, str] = {}
            propagate.inject(carrier)
            metadata = list(details.metadata or []) + list(carrier.items())
            call = continuation(_Details(details, metadata), request)
            code = call.code() if hasattr(call, "code") and not hasattr(call, "__next__") else None
            if code is not None and code != grpc.StatusCode.OK:
                span.set_status(trace.Status(trace.StatusCode.ERROR, code.name))
            return call

    def intercept_unary_unary(self, continuation, client_call_details, request):
        return self._traced(continuation, client_call_details, request)

    def intercept_unary_stream(self, continuation, client_call_details, request):
        return self._traced(continuation, client_call_details, request)

    def intercept_stream_unary(self, continuation, client_call_details, request_iterator):
        return self._traced(continuation, client_call_details, request_iterator)


def interceptors() -> list[Any]:
    """[TracingInterceptor()] where opentelemetry-api is installed, else []."""
    return [TracingInterceptor()] if trace is not None else []
