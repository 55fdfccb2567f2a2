"""A client's connections: one channel per service (TLS and a bearer token where configured), the
retry policy on UNAVAILABLE, the deadline on every call, and which server answers for a job id.
The SDK's parts (submits.py, artifacts.py, watching.py) stand on ServiceConnections; client.py
puts them together as FluxloraClient."""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Self

import grpc
from google.protobuf.message import Message

from fluxlora_api.shared.auth import AuthConfigError, BearerTokenInterceptor, credentials_from_env
from fluxlora_api.shared.ports import DEFAULT_PORTS, PREFIX_TO_SERVICE
from fluxlora_api.v1 import (
    captioning_pb2_grpc,
    evaluation_pb2_grpc,
    jobs_pb2_grpc,
    preprocessing_pb2_grpc,
    training_pb2_grpc,
    transfers_pb2_grpc,
)
from fluxlora_client import tracing
from fluxlora_client.errors import FluxloraClientError

# Retry UNAVAILABLE (a service restarting) on idempotent calls; submits carry a request_id.
_SERVICE_CONFIG = """{"methodConfig": [{"name": [{"service": "fluxlora.v1.JobService"},
  {"service": "fluxlora.v1.PreprocessingService"}, {"service": "fluxlora.v1.CaptioningService"},
  {"service": "fluxlora.v1.TrainingService"}, {"service": "fluxlora.v1.EvaluationService"},
  {"service": "fluxlora.v1.TransferService"}],
  "retryPolicy": {"maxAttempts": 5, "initialBackoff": "0.2s", "maxBackoff": "3s",
  "backoffMultiplier": 2, "retryableStatusCodes": ["UNAVAILABLE"]}}]}"""
# gRPC waits longer and longer between attempts to reach a server that went away (up to 2 minutes);
# capped, a restarted server is found again within seconds of coming back.
_CHANNEL_OPTIONS = [("grpc.service_config", _SERVICE_CONFIG), ("grpc.initial_reconnect_backoff_ms", 500),
                    ("grpc.max_reconnect_backoff_ms", 3000)]
RECONNECT_FOR_S = 300.0  # how long watch/wait ride out a server that is down or restarting


@dataclass
class _Endpoint:
    channel: grpc.Channel
    jobs: jobs_pb2_grpc.JobServiceStub
    transfers: transfers_pb2_grpc.TransferServiceStub


class ServiceConnections:
    def __init__(
        self,
        preprocessing: str = f"localhost:{DEFAULT_PORTS['preprocessing']}",
        captioning: str = f"localhost:{DEFAULT_PORTS['captioning']}",
        training: str = f"localhost:{DEFAULT_PORTS['training']}",
        evaluation: str = f"localhost:{DEFAULT_PORTS['evaluation']}",
        timeout: float = 60.0,
        token: str | None = None,
        credentials: grpc.ChannelCredentials | None = None,
        max_upload_bytes: int | None = None,
        reconnect_for_s: float = RECONNECT_FOR_S,
    ):
        """token: sent as `authorization: Bearer <token>` on every call; credentials: TLS
        (grpc.ssl_channel_credentials; from_env builds them from FLUXLORA_TLS_CA_FILE). max_upload_bytes:
        upload_photos refuses bigger uploads before sending a byte (from_env: FLUXLORA_MAX_UPLOAD_BYTES);
        the preprocessing server checks its own limit at CreateUpload either way. No store: uploads and
        downloads go through the servers (presigned URLs, or bytes streamed over gRPC). reconnect_for_s: how
        long watch and wait ride out a server that is down or restarting (0: give up at the first drop)."""
        self.reconnect_for_s = reconnect_for_s
        self.max_upload_bytes = max_upload_bytes
        self.timeout = timeout
        self._interceptors = [BearerTokenInterceptor(token)] if token else []
        self._interceptors += tracing.interceptors()  # OpenTelemetry, where the program has it
        self._credentials = credentials
        self.addresses = {"preprocessing": preprocessing, "captioning": captioning,
                          "training": training, "evaluation": evaluation}
        self._endpoints: dict[str, _Endpoint] = {}
        self._preprocessing = preprocessing_pb2_grpc.PreprocessingServiceStub(self._channel("preprocessing"))
        self._captioning = captioning_pb2_grpc.CaptioningServiceStub(self._channel("captioning"))
        self._training = training_pb2_grpc.TrainingServiceStub(self._channel("training"))
        self._evaluation = evaluation_pb2_grpc.EvaluationServiceStub(self._channel("evaluation"))

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None, **addresses: str) -> Self:
        """Addresses from FLUXLORA_<SERVICE>_ADDR; token from FLUXLORA_AUTH_TOKEN or _FILE; TLS from
        FLUXLORA_TLS_CA_FILE (+ _CLIENT_CERT/KEY_FILE); FLUXLORA_MAX_UPLOAD_BYTES. `env`: these variables
        (default: this process's environment). Nothing about the store: the client needs no S3 credentials."""
        env = os.environ if env is None else env
        for name, port in DEFAULT_PORTS.items():
            addresses.setdefault(name, env.get(f"FLUXLORA_{name.upper()}_ADDR") or f"localhost:{port}")
        try:
            token, credentials = credentials_from_env(env)
        except AuthConfigError as err:
            raise FluxloraClientError("INVALID_ARGUMENT", str(err)) from None
        limit = env.get("FLUXLORA_MAX_UPLOAD_BYTES", "").strip()
        if limit and not limit.isdigit():
            raise FluxloraClientError("INVALID_ARGUMENT", f"FLUXLORA_MAX_UPLOAD_BYTES={limit!r} is not a byte count")
        return cls(**addresses, token=token, credentials=credentials, max_upload_bytes=int(limit) if limit else None)

    def _channel(self, service: str) -> grpc.Channel:
        if service not in self._endpoints:
            options = _CHANNEL_OPTIONS
            address = self.addresses[service]
            channel = (grpc.secure_channel(address, self._credentials, options=options) if self._credentials
                       else grpc.insecure_channel(address, options=options))
            channel = grpc.intercept_channel(channel, *self._interceptors)
            self._endpoints[service] = _Endpoint(channel, jobs_pb2_grpc.JobServiceStub(channel),
                                                 transfers_pb2_grpc.TransferServiceStub(channel))
        return self._endpoints[service].channel

    def close(self) -> None:
        for endpoint in self._endpoints.values():
            endpoint.channel.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _call(self, method: Callable, request: Message, timeout: float | None = None) -> Any:
        try:
            return method(request, timeout=timeout or self.timeout)
        except grpc.RpcError as err:
            raise FluxloraClientError(err.code().name, err.details() or "") from None

    def _transfers(self, service: str) -> transfers_pb2_grpc.TransferServiceStub:
        self._channel(service)
        return self._endpoints[service].transfers

    def _jobs(self, job_id: str) -> jobs_pb2_grpc.JobServiceStub:
        service = PREFIX_TO_SERVICE.get(job_id.split("-", 1)[0])
        if service is None:
            raise FluxloraClientError("INVALID_ARGUMENT", f"{job_id!r} is not a fluxlora job id")
        self._channel(service)
        return self._endpoints[service].jobs
