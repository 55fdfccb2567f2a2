"""What a service package contributes to a server or a worker (its gRPC servicer and its job
handler). The bootstrap (fluxlora.server) and the
worker entry point do the rest."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import grpc

from fluxlora.jobs.runtime import Handler, JobRuntime


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
