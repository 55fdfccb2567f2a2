"""The cost of metrics and tracing on the 50-client load bench: jobs/s with both off and with both on.

    .venv/bin/python bench/observability.py                 # 50 clients x 2 jobs, 3 rounds each way
    .venv/bin/python bench/observability.py --rounds 1 --clients 20

Same set-up as bench/load.py (a `fluxlora serve preprocessing` process on a local store, small real
jobs, SDK clients as threads). "on" = FLUXLORA_METRICS_PORT set and scraped every second (as
Prometheus would, more often) and OpenTelemetry traces exported over OTLP/gRPC to a receiver in
this process (the SDK's spans too). The rounds alternate off/on, so drift of a shared machine falls
on both; the summary is the median jobs/s of each and the relative cost (target: within 5%).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import threading
import urllib.request
from concurrent import futures
from pathlib import Path

import grpc

sys.path.insert(0, str(Path(__file__).resolve().parent))
from load import run_phase, server_process, write_photos  # noqa: E402

from fluxlora.common.storage import LocalStore  # noqa: E402
from fluxlora.server.local import free_port  # noqa: E402


def otlp_receiver() -> tuple[grpc.Server, int, list[int]]:
    """An OTLP/gRPC trace receiver that counts the spans it is sent."""
    from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc

    received = [0]

    class Receiver(trace_service_pb2_grpc.TraceServiceServicer):
        def Export(self, request, context):  # noqa: N802 - the proto's name
            received[0] += sum(len(s.spans) for r in request.resource_spans for s in r.scope_spans)
            return trace_service_pb2.ExportTraceServiceResponse()

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(Receiver(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    return server, port, received


def scraper(port: int, stop: threading.Event) -> threading.Thread:
    def run() -> None:
        while not stop.wait(1.0):
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read()
            except OSError:
                pass

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


def one_round(root: Path, sources: list[str], store: LocalStore, clients: int, jobs: int, on: bool, n: int,
              otlp_port: int) -> float:
    env: dict[str, str] = {}
    if on:
        metrics_port = free_port()
        env = {"metrics_port": str(metrics_port)}
    import os

    saved = dict(os.environ)
    if on:  # the server process and this process's SDK trace to the receiver
        os.environ.update({"OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{otlp_port}",
                           "OTEL_EXPORTER_OTLP_INSECURE": "true", "OTEL_SERVICE_NAME": "bench-server"})
    try:
        with server_process(store.root, root / f"server-{n}.log", **env) as (address, _pid):
            stop = threading.Event()
            if on:
                scraper(metrics_port, stop)
            run_phase(store, address, sources[:1], 1, 2, f"warm-{n}")
            result = run_phase(store, address, sources, clients, jobs, f"r{n}")
            stop.set()
    finally:
        os.environ.clear()
        os.environ.update(saved)
    return result["jobs_per_s"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, default=50)
    parser.add_argument("--jobs-per-client", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()

    from opentelemetry import trace
    from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    receiver, otlp_port, received = otlp_receiver()
    # The SDK's spans (this process): exported only in the "on" rounds' environment would need two
    # providers; instead the client-side provider is always installed and its cost falls on both.
    provider = TracerProvider()
    provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint=f"127.0.0.1:{otlp_port}",
                                                                    insecure=True)))
    trace.set_tracer_provider(provider)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        store = LocalStore(root / "store")
        sources = []
        for i in range(args.clients):
            store.upload_dir(write_photos(root / "photos" / str(i), i), f"uploads/obs-{i}/")
            sources.append(f"uploads/obs-{i}/")
        rates: dict[bool, list[float]] = {False: [], True: []}
        for n in range(args.rounds):
            for on in (False, True):
                rate = one_round(root, sources, store, args.clients, args.jobs_per_client, on, 2 * n + on, otlp_port)
                rates[on].append(rate)
                print(f"round {n + 1} metrics+tracing {'on ' if on else 'off'}: {rate:6.2f} jobs/s", flush=True)
    provider.shutdown()
    receiver.stop(1)
    off, on = statistics.median(rates[False]), statistics.median(rates[True])
    paired = statistics.mean(b / a for a, b in zip(rates[False], rates[True], strict=True))
    print(f"median jobs/s: off {off:.2f}, on {on:.2f}; cost {100 * (off - on) / off:+.1f}% (median), "
          f"{100 * (1 - paired):+.1f}% (mean of the rounds' on/off ratios) "
          f"({args.clients} clients x {args.jobs_per_client} jobs; spans received over OTLP: {received[0]})")


if __name__ == "__main__":
    main()
