"""`python -m fluxlora.server.healthcheck`: exits 0 when the server in this container answers
SERVING on the standard gRPC health protocol, 1 otherwise. The images' Docker HEALTHCHECK runs it
(Kubernetes probes the same protocol natively with `grpc: {port: N}`).

Without --address it asks 127.0.0.1 at FLUXLORA_HEALTH_PORT (the plaintext health-only port a TLS
server opens), else at FLUXLORA_PORT, or, when both are unset, at each service's default port: an
image does not know which of its services a container was started as.
"""

from __future__ import annotations

import argparse
import os
import sys

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from fluxlora_api.shared.ports import DEFAULT_PORTS  # (not common.config: no pydantic import for a probe)


def serving(address: str, service: str = "", timeout: float = 3.0) -> tuple[bool, str]:
    with grpc.insecure_channel(address) as channel:
        try:
            status = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=service), timeout=timeout).status
        except grpc.RpcError as err:
            return False, f"{address}: {err.code().name} {err.details() or ''}".strip()
    name = health_pb2.HealthCheckResponse.ServingStatus.Name(status)
    return status == health_pb2.HealthCheckResponse.SERVING, f"{address}: {name}"


def addresses(explicit: str | None) -> list[str]:
    if explicit:
        return [explicit]
    health_port = os.environ.get("FLUXLORA_HEALTH_PORT", "0")
    port = os.environ.get("FLUXLORA_PORT", "0")
    if health_port not in ("", "0"):
        ports = [int(health_port)]
    else:
        ports = [int(port)] if port not in ("", "0") else list(DEFAULT_PORTS.values())
    return [f"127.0.0.1:{p}" for p in ports]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--address", help="host:port of the server (default: this container's, see above)")
    parser.add_argument("--service", default="", help="health service name; empty: the whole server")
    parser.add_argument("--timeout", type=float, default=3.0, help="seconds per check")
    args = parser.parse_args(argv)
    answers = []
    for address in addresses(args.address):
        ok, answer = serving(address, args.service, args.timeout)
        if ok:
            print(answer)
            return 0
        answers.append(answer)
    print("not serving: " + "; ".join(answers), file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
