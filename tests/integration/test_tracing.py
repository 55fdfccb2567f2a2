"""OpenTelemetry: one trace from the SDK call through the server, the job, its worker and the store calls
(S3 on moto), seen by an in-memory exporter; the job's record names the trace."""

from __future__ import annotations

import pytest
from google.protobuf import json_format
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from PIL import Image

from fluxlora.common import tracing
from fluxlora.common.config import Settings
from fluxlora.jobs.worker import run_worker
from fluxlora.server.services import load_definition
from fluxlora_client import FluxloraClient
from support import make_s3_store, preprocessing_server


@pytest.fixture
def exporter():
    """A TracerProvider of this process for the test's duration (OpenTelemetry sets one only once: reset after)."""
    from opentelemetry.util._once import Once

    spans = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(spans))
    trace.set_tracer_provider(provider)
    try:
        yield spans
    finally:
        provider.shutdown()
        trace._TRACER_PROVIDER = None  # back to the no-op API for the tests after this one
        trace._TRACER_PROVIDER_SET_ONCE = Once()


def test_one_trace_spans_sdk_server_job_worker_and_store(exporter, tmp_path, moto_endpoint):
    assert tracing.enabled()
    photos = tmp_path / "photos"
    photos.mkdir()
    for k in range(2):
        Image.new("RGB", (96, 96), (30 * k, 120, 60)).save(photos / f"p{k}.png")
    store = make_s3_store(moto_endpoint)
    with preprocessing_server(tmp_path, store=store) as server:
        client = FluxloraClient(preprocessing=server.address)
        with trace.get_tracer("test").start_as_current_span("caller") as caller:
            prefix = client.upload_photos(photos)
            job = client.wait(client.preprocess(prefix, base_size=64))
        client.close()
    trace_id = trace.format_trace_id(caller.get_span_context().trace_id)
    assert job.trace_id == trace_id and job.traceparent.split("-")[1] == trace_id
    assert f'"traceId": "{trace_id}"' in json_format.MessageToJson(job)  # what `fluxlora jobs show` prints

    # the same job run again by a worker (as `python -m fluxlora.server.worker` runs it in a process or pod)
    settings = Settings(store=store.uri, cache_dir=tmp_path / "cache")
    assert run_worker("preprocessing", job.job_id, settings, store,
                      handler=load_definition("preprocessing").handler) == 0

    spans = exporter.get_finished_spans()
    ours = [s for s in spans if trace.format_trace_id(s.context.trace_id) == trace_id]
    names = {s.name for s in ours}
    kinds = {(s.name, s.kind) for s in ours}
    submit = "fluxlora.v1.PreprocessingService/SubmitPreprocess"
    assert (submit, trace.SpanKind.CLIENT) in kinds, names  # the SDK
    assert any(s.kind == trace.SpanKind.SERVER and s.name.endswith(submit) for s in ours), names  # the server
    assert {"preprocessing job", "preprocessing worker", "store write", "store read"} <= names, names
    by_id = {s.context.span_id: s for s in ours}

    def ancestors(span):
        while span.parent is not None and span.parent.span_id in by_id:
            span = by_id[span.parent.span_id]
            yield span.name

    job_span = next(s for s in ours if s.name == "preprocessing job")
    worker_span = next(s for s in ours if s.name == "preprocessing worker")
    assert any(s.name.startswith("store") and job_span.name in ancestors(s) for s in ours)
    assert any(s.name.startswith("store") and worker_span.name in ancestors(s) for s in ours)
    assert "caller" in ancestors(job_span) and "caller" in ancestors(worker_span)
    # nothing of the job landed in another trace
    assert not [s for s in spans if s not in ours and s.name in ("preprocessing job", "preprocessing worker")]
