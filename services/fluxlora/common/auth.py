"""Who may call a server: a shared bearer token checked on every RPC, and TLS credentials.

Both come only from the environment or files (Settings: FLUXLORA_AUTH_TOKEN / _FILE, FLUXLORA_TLS_*),
never from flags, and the token is never logged or echoed in an error. No token configured means
auth is off: the embedded default on 127.0.0.1 (the server warns when it binds a wider address).

Exempt from the token: the gRPC health service, because Kubernetes' and Docker's probes cannot send
metadata. Server reflection is NOT exempt: it lists every method and message, which is an attacker's
map; grpcurl passes the token with `-H 'authorization: Bearer <token>'`.

An address that fails authentication too often is locked out for a while (fluxlora.common.auth_lockout,
FLUXLORA_AUTH_MAX_FAILURES / _FAILURE_WINDOW_S / _LOCKOUT_S): its calls are refused before the token is
compared, the right token included.
"""

from __future__ import annotations

import hmac
import logging
import math

import grpc

from fluxlora.common import metrics
from fluxlora.common.auth_lockout import FailedAuthLimiter, peer_key
from fluxlora.common.config import Settings
from fluxlora_api.shared.auth import (
    HEADER,
    HOW_TO,
    SCHEME,
    AuthConfigError,
    is_loopback,
    resolve_token,
    tls_channel_credentials,
)
from fluxlora_api.shared.auth import read_secret_file as _read_file

log = logging.getLogger(__name__)

EXEMPT_PREFIXES = ("/grpc.health.v1.Health/",)
__all__ = ["AuthConfigError", "is_loopback", "load_auth_token", "channel_credentials", "server_credentials",
           "server_interceptors", "failed_auth_limiter", "TokenAuthInterceptor"]



def load_auth_token(settings: Settings) -> str | None:
    """The server's token (None: auth off), from FLUXLORA_AUTH_TOKEN or FLUXLORA_AUTH_TOKEN_FILE."""
    return resolve_token(settings.auth_token.get_secret_value(), settings.auth_token_file)


# A locked-out address gets RESOURCE_EXHAUSTED: gRPC's code for "a per-user quota or rate limit ran out"
# (Google's AIP-193 maps rate limiting to it, HTTP 429). Not UNAVAILABLE: that means "transient, retry",
# and the SDK's channel retry policy retries it at once, burning its attempts into the lockout and hiding
# it. The answer is the same whatever token came, so it says nothing about how close a guess was.
LOCKED_OUT = grpc.StatusCode.RESOURCE_EXHAUSTED


class TokenAuthInterceptor(grpc.ServerInterceptor):
    """Lets an RPC through only with `authorization: Bearer <token>` (health checks excepted); with a
    limiter, an address that failed too often is refused before its token is compared."""

    def __init__(self, token: str, limiter: FailedAuthLimiter | None = None):
        self._token = token.encode()
        self._limiter = limiter

    def _check(self, metadata) -> str | None:
        values = [value for key, value in metadata or () if key == HEADER]
        if not values:
            return f"no credentials: {HOW_TO}"
        scheme, _, presented = values[0].partition(" ")
        if scheme.lower() != SCHEME or not hmac.compare_digest(presented.strip().encode(), self._token):
            return f"invalid credentials: {HOW_TO}"
        return None

    def _admit(self, method: str, metadata, context: grpc.ServicerContext) -> None:
        """Returns when the call may run; aborts it otherwise. Needs the context: only it knows the peer."""
        key = peer_key(context.peer()) if self._limiter else ""
        if self._limiter and (left := self._limiter.locked_for(key)):
            metrics.AUTH_LOCKED_REFUSED.inc()
            context.abort(LOCKED_OUT, f"too many failed authentications from this address: its calls are refused "
                                      f"for {math.ceil(left)} s more; {HOW_TO} and retry after that")
        problem = self._check(metadata)
        if problem is None:
            return
        log.warning("rejected %s: %s", method, problem.split(":", 1)[0])
        metrics.AUTH_FAILURES.labels(problem.split(" ", 1)[0]).inc()  # "no" or "invalid" (credentials)
        if self._limiter and self._limiter.failed(key):
            metrics.AUTH_LOCKOUTS.inc()
            limiter = self._limiter
            log.warning("%d failed authentications from %s within %gs: refusing its calls for %gs "
                        "(FLUXLORA_AUTH_MAX_FAILURES, FLUXLORA_AUTH_LOCKOUT_S)", limiter.max_failures, key,
                        limiter.window_s, limiter.lockout_s)
        context.abort(grpc.StatusCode.UNAUTHENTICATED, problem)

    def intercept_service(self, continuation, handler_call_details):
        method = handler_call_details.method
        if method.startswith(EXEMPT_PREFIXES):
            return continuation(handler_call_details)
        metadata = handler_call_details.invocation_metadata
        return _guarded(continuation(handler_call_details), lambda context: self._admit(method, metadata, context))


def _guarded(handler: grpc.RpcMethodHandler | None, admit) -> grpc.RpcMethodHandler:
    """The handler behind `admit(context)`, in the handler's own shape so the client sees the status.
    An unknown method is admitted first too (UNIMPLEMENTED only with the token), so it is no oracle of
    which methods exist. A unary request is parsed only once admitted: nobody unauthenticated gets the
    protobuf parser (stream requests are parsed lazily, when the handler reads them, so after too)."""
    if handler is None:
        def unknown(request, context):
            admit(context)
            context.abort(grpc.StatusCode.UNIMPLEMENTED, "Method not found!")

        return grpc.unary_unary_rpc_method_handler(unknown)

    parse = handler.request_deserializer or (lambda raw: raw)

    def parsed(raw, context):
        try:
            return parse(raw)
        except Exception:  # grpc's own answer to a request it cannot deserialize
            context.abort(grpc.StatusCode.INTERNAL, "Exception deserializing request!")

    serialize = {"response_serializer": handler.response_serializer}
    if handler.unary_unary:
        def unary_unary(raw, context):
            admit(context)
            return handler.unary_unary(parsed(raw, context), context)

        return grpc.unary_unary_rpc_method_handler(unary_unary, **serialize)
    if handler.unary_stream:
        def unary_stream(raw, context):
            admit(context)
            yield from handler.unary_stream(parsed(raw, context), context)

        return grpc.unary_stream_rpc_method_handler(unary_stream, **serialize)
    streamed = {"request_deserializer": handler.request_deserializer, **serialize}
    if handler.stream_unary:
        def stream_unary(requests, context):
            admit(context)
            return handler.stream_unary(requests, context)

        return grpc.stream_unary_rpc_method_handler(stream_unary, **streamed)

    def stream_stream(requests, context):
        admit(context)
        yield from handler.stream_stream(requests, context)

    return grpc.stream_stream_rpc_method_handler(stream_stream, **streamed)


def failed_auth_limiter(settings: Settings) -> FailedAuthLimiter | None:
    """FLUXLORA_AUTH_MAX_FAILURES within FLUXLORA_AUTH_FAILURE_WINDOW_S lock an address out for
    FLUXLORA_AUTH_LOCKOUT_S; 0 failures turns it off."""
    if not settings.auth_max_failures:
        return None
    return FailedAuthLimiter(settings.auth_max_failures, settings.auth_failure_window_s, settings.auth_lockout_s,
                             settings.auth_tracked_peers)


def server_interceptors(settings: Settings) -> list[grpc.ServerInterceptor]:
    token = load_auth_token(settings)
    return [TokenAuthInterceptor(token, failed_auth_limiter(settings))] if token else []


def server_credentials(settings: Settings) -> grpc.ServerCredentials | None:
    """TLS credentials from FLUXLORA_TLS_CERT_FILE/_KEY_FILE (None: plaintext); with
    FLUXLORA_TLS_CLIENT_CA_FILE, clients must present a certificate signed by that CA."""
    cert, key, client_ca = settings.tls_cert_file, settings.tls_key_file, settings.tls_client_ca_file
    if not cert and not key:
        if client_ca:
            raise AuthConfigError("FLUXLORA_TLS_CLIENT_CA_FILE needs FLUXLORA_TLS_CERT_FILE and FLUXLORA_TLS_KEY_FILE")
        return None
    if not (cert and key):
        raise AuthConfigError("set both FLUXLORA_TLS_CERT_FILE and FLUXLORA_TLS_KEY_FILE to serve TLS")
    pair = (_read_file(key, "FLUXLORA_TLS_KEY_FILE"), _read_file(cert, "FLUXLORA_TLS_CERT_FILE"))
    roots = _read_file(client_ca, "FLUXLORA_TLS_CLIENT_CA_FILE") if client_ca else None
    return grpc.ssl_server_credentials([pair], root_certificates=roots, require_client_auth=roots is not None)


def channel_credentials(settings: Settings) -> grpc.ChannelCredentials | None:
    """Client TLS for a process holding Settings (the local launcher's health wait)."""
    return tls_channel_credentials(settings.tls_ca_file, settings.tls_client_cert_file, settings.tls_client_key_file)
