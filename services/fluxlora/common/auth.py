"""Who may call a server: a shared bearer token checked on every RPC, and TLS credentials.

Both come only from the environment or files (Settings: FLUXLORA_AUTH_TOKEN / _FILE, FLUXLORA_TLS_*),
never from flags, and the token is never logged or echoed in an error. No token configured means
auth is off: the embedded default on 127.0.0.1 (the server warns when it binds a wider address).

Exempt from the token: the gRPC health service, because Kubernetes' and Docker's probes cannot send
metadata. Server reflection is NOT exempt: it lists every method and message, which is an attacker's
map; grpcurl passes the token with `-H 'authorization: Bearer <token>'`.
"""

from __future__ import annotations

import hmac
import ipaddress
import logging
from pathlib import Path

import grpc

from fluxlora.common.config import Settings

log = logging.getLogger(__name__)

HEADER = "authorization"
SCHEME = "bearer"
EXEMPT_PREFIXES = ("/grpc.health.v1.Health/",)
HOW_TO = ("send the metadata 'authorization: Bearer <token>' with the server's token "
          "(SDK and CLI: set FLUXLORA_AUTH_TOKEN or FLUXLORA_AUTH_TOKEN_FILE)")


class AuthConfigError(ValueError):
    """Credentials configured wrongly; the message names the setting and never holds a secret."""


def _read_file(path: Path, setting: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as err:
        raise AuthConfigError(f"{setting}={path} cannot be read ({err.strerror}): fix the path or unset it") from None


def load_auth_token(settings: Settings) -> str | None:
    """The configured token, or None when auth is off. Setting both the variable and the file is an
    error rather than a silent pick: two sources of one secret are how a rotated token stays stale."""
    inline = settings.auth_token.get_secret_value()
    if inline and settings.auth_token_file:
        raise AuthConfigError("set FLUXLORA_AUTH_TOKEN or FLUXLORA_AUTH_TOKEN_FILE, not both")
    if settings.auth_token_file:
        token = _read_file(settings.auth_token_file, "FLUXLORA_AUTH_TOKEN_FILE").decode("utf-8", "replace").strip()
        if not token:
            # An empty mounted secret must not silently turn auth off.
            raise AuthConfigError(f"FLUXLORA_AUTH_TOKEN_FILE={settings.auth_token_file} is empty: write the token")
        return token
    return inline.strip() or None


def _reject(message: str) -> grpc.RpcMethodHandler:
    def abort(request, context: grpc.ServicerContext):
        context.abort(grpc.StatusCode.UNAUTHENTICATED, message)

    def abort_stream(request, context: grpc.ServicerContext):
        context.abort(grpc.StatusCode.UNAUTHENTICATED, message)
        yield  # pragma: no cover - makes this a generator, as a streaming handler must be

    return abort, abort_stream


class TokenAuthInterceptor(grpc.ServerInterceptor):
    """Lets an RPC through only with `authorization: Bearer <token>` (health checks excepted)."""

    def __init__(self, token: str):
        self._token = token.encode()

    def _check(self, metadata) -> str | None:
        values = [value for key, value in metadata or () if key == HEADER]
        if not values:
            return f"no credentials: {HOW_TO}"
        scheme, _, presented = values[0].partition(" ")
        if scheme.lower() != SCHEME or not hmac.compare_digest(presented.strip().encode(), self._token):
            return f"invalid credentials: {HOW_TO}"
        return None

    def intercept_service(self, continuation, handler_call_details):
        method = handler_call_details.method
        if method.startswith(EXEMPT_PREFIXES):
            return continuation(handler_call_details)
        problem = self._check(handler_call_details.invocation_metadata)
        if problem is None:
            return continuation(handler_call_details)
        log.warning("rejected %s: %s", method, problem.split(":", 1)[0])
        handler = continuation(handler_call_details)
        unary, stream = _reject(problem)
        # Answer in the handler's own shape (unknown methods as unary), so the client sees the status.
        if handler is None or not (handler.request_streaming or handler.response_streaming):
            return grpc.unary_unary_rpc_method_handler(unary)
        if handler.request_streaming and handler.response_streaming:
            return grpc.stream_stream_rpc_method_handler(stream)
        if handler.request_streaming:
            return grpc.stream_unary_rpc_method_handler(unary)
        return grpc.unary_stream_rpc_method_handler(stream)


def server_interceptors(settings: Settings) -> list[grpc.ServerInterceptor]:
    token = load_auth_token(settings)
    return [TokenAuthInterceptor(token)] if token else []


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
    """Client TLS from FLUXLORA_TLS_CA_FILE (roots to trust; None: plaintext) and, for servers that
    require client certificates, FLUXLORA_TLS_CLIENT_CERT_FILE/_KEY_FILE."""
    ca, cert, key = settings.tls_ca_file, settings.tls_client_cert_file, settings.tls_client_key_file
    if not ca:
        if cert or key:
            raise AuthConfigError("FLUXLORA_TLS_CLIENT_CERT_FILE/_KEY_FILE need FLUXLORA_TLS_CA_FILE")
        return None
    if bool(cert) != bool(key):
        raise AuthConfigError("set both FLUXLORA_TLS_CLIENT_CERT_FILE and FLUXLORA_TLS_CLIENT_KEY_FILE")
    return grpc.ssl_channel_credentials(
        root_certificates=_read_file(ca, "FLUXLORA_TLS_CA_FILE"),
        private_key=_read_file(key, "FLUXLORA_TLS_CLIENT_KEY_FILE") if key else None,
        certificate_chain=_read_file(cert, "FLUXLORA_TLS_CLIENT_CERT_FILE") if cert else None,
    )


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


class _ClientCallDetails(grpc.ClientCallDetails):
    def __init__(self, details, metadata):
        self.method, self.timeout, self.credentials = details.method, details.timeout, details.credentials
        self.wait_for_ready, self.compression = details.wait_for_ready, details.compression
        self.metadata = metadata


class BearerTokenInterceptor(grpc.UnaryUnaryClientInterceptor, grpc.UnaryStreamClientInterceptor,
                             grpc.StreamUnaryClientInterceptor, grpc.StreamStreamClientInterceptor):
    """Adds the token to every call on a channel, streams included. An interceptor rather than call
    credentials because gRPC refuses call credentials on plaintext channels (auth without TLS on
    localhost or inside a mesh that terminates TLS)."""

    def __init__(self, token: str):
        self._header = (HEADER, f"Bearer {token}")

    def __repr__(self) -> str:
        return "BearerTokenInterceptor(<token>)"

    def _details(self, details):
        return _ClientCallDetails(details, [*(details.metadata or ()), self._header])

    def intercept_unary_unary(self, continuation, details, request):
        return continuation(self._details(details), request)

    def intercept_unary_stream(self, continuation, details, request):
        return continuation(self._details(details), request)

    def intercept_stream_unary(self, continuation, details, requests):
        return continuation(self._details(details), requests)

    def intercept_stream_stream(self, continuation, details, requests):
        return continuation(self._details(details), requests)
