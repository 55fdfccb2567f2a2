"""The caller's side of authentication, shared by the SDK and the servers: the bearer token's
header, where a token and TLS roots come from (plain values or files, named by the FLUXLORA_*
setting they came from), and the channel interceptor that sends the token.

The servers' side (checking the token, lockout, server TLS) is fluxlora.common.auth."""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping
from pathlib import Path

import grpc

HEADER = "authorization"
SCHEME = "bearer"
HOW_TO = ("send the metadata 'authorization: Bearer <token>' with the server's token "
          "(SDK and CLI: set FLUXLORA_AUTH_TOKEN or FLUXLORA_AUTH_TOKEN_FILE)")


class AuthConfigError(ValueError):
    """Credentials configured wrongly; the message names the setting and never holds a secret."""


def read_secret_file(path: Path | str, setting: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as err:
        raise AuthConfigError(f"{setting}={path} cannot be read ({err.strerror}): fix the path or unset it") from None


def resolve_token(inline: str, token_file: Path | str | None) -> str | None:
    """The configured token, or None when auth is off. Setting both the variable and the file is an
    error rather than a silent pick: two sources of one secret are how a rotated token stays stale."""
    if inline and token_file:
        raise AuthConfigError("set FLUXLORA_AUTH_TOKEN or FLUXLORA_AUTH_TOKEN_FILE, not both")
    if token_file:
        token = read_secret_file(token_file, "FLUXLORA_AUTH_TOKEN_FILE").decode("utf-8", "replace").strip()
        if not token:
            # An empty mounted secret must not silently turn auth off.
            raise AuthConfigError(f"FLUXLORA_AUTH_TOKEN_FILE={token_file} is empty: write the token")
        return token
    return (inline or "").strip() or None


def tls_channel_credentials(ca: Path | str | None, cert: Path | str | None = None,
                            key: Path | str | None = None) -> grpc.ChannelCredentials | None:
    """Client TLS from FLUXLORA_TLS_CA_FILE (roots to trust; None: plaintext) and, for servers that
    require client certificates, FLUXLORA_TLS_CLIENT_CERT_FILE/_KEY_FILE."""
    if not ca:
        if cert or key:
            raise AuthConfigError("FLUXLORA_TLS_CLIENT_CERT_FILE/_KEY_FILE need FLUXLORA_TLS_CA_FILE")
        return None
    if bool(cert) != bool(key):
        raise AuthConfigError("set both FLUXLORA_TLS_CLIENT_CERT_FILE and FLUXLORA_TLS_CLIENT_KEY_FILE")
    return grpc.ssl_channel_credentials(
        root_certificates=read_secret_file(ca, "FLUXLORA_TLS_CA_FILE"),
        private_key=read_secret_file(key, "FLUXLORA_TLS_CLIENT_KEY_FILE") if key else None,
        certificate_chain=read_secret_file(cert, "FLUXLORA_TLS_CLIENT_CERT_FILE") if cert else None,
    )


def credentials_from_env(env: Mapping[str, str]) -> tuple[str | None, grpc.ChannelCredentials | None]:
    """(token, TLS channel credentials) from FLUXLORA_AUTH_TOKEN(_FILE) and FLUXLORA_TLS_CA_FILE
    (+ _CLIENT_CERT_FILE/_CLIENT_KEY_FILE) in `env`; an empty variable counts as unset."""
    def path(name: str) -> str | None:
        return env.get(name) or None

    token = resolve_token(env.get("FLUXLORA_AUTH_TOKEN", ""), path("FLUXLORA_AUTH_TOKEN_FILE"))
    credentials = tls_channel_credentials(path("FLUXLORA_TLS_CA_FILE"), path("FLUXLORA_TLS_CLIENT_CERT_FILE"),
                                          path("FLUXLORA_TLS_CLIENT_KEY_FILE"))
    return token, credentials


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
