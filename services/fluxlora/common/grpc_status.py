"""Turning exceptions into gRPC statuses at the edge of every servicer method."""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from typing import Any

import grpc

from fluxlora_api.shared.errors import status_of

log = logging.getLogger(__name__)

# Messages quote what the client sent; a long or non-ASCII value (percent-encoded in the grpc-message
# trailer at up to 12 bytes a character) would push the trailers past the client's 8 KiB metadata
# limit, and the client would see "Stream removed" instead of the status and message we chose.
MAX_MESSAGE_WIRE_BYTES = 4096


def _wire_bytes(char: str) -> int:
    """Bytes one character takes in the grpc-message trailer (printable ASCII but '%' goes as is)."""
    return 1 if " " <= char <= "~" and char != "%" else 3 * len(char.encode("utf-8", "surrogatepass"))


def bounded(message: str, limit: int = MAX_MESSAGE_WIRE_BYTES) -> str:
    """`message`, cut so that its encoded trailer fits in `limit` bytes, saying how much was cut."""
    used = 0
    for i, char in enumerate(message):
        used += _wire_bytes(char)
        if used > limit - 64:  # room for the note below
            return f"{message[:i]}... [{len(message) - i} more characters not shown]"
    return message


def _abort(context: grpc.ServicerContext, exc: BaseException) -> None:
    code, message = status_of(exc)
    if code == "INTERNAL":
        log.exception("unexpected error in RPC")
    if code == "UNAVAILABLE":
        # The server already waited out its store's retries (fluxlora.common.s3_retry): a negative pushback
        # tells the client's retry policy (kept for servers restarting) not to multiply that wait (gRFC A6).
        context.set_trailing_metadata((("grpc-retry-pushback-ms", "-1"),))
    context.abort(grpc.StatusCode[code], bounded(message))


def grpc_errors(method: Callable) -> Callable:
    """Wraps a unary or server-streaming servicer method so errors become clear statuses."""
    if _is_generator(method):

        @functools.wraps(method)
        def stream(self: Any, request: Any, context: grpc.ServicerContext):
            try:
                yield from method(self, request, context)
            except Exception as exc:  # noqa: BLE001
                _abort(context, exc)

        return stream

    @functools.wraps(method)
    def unary(self: Any, request: Any, context: grpc.ServicerContext):
        try:
            return method(self, request, context)
        except Exception as exc:  # noqa: BLE001
            _abort(context, exc)

    return unary


def _is_generator(fn: Callable) -> bool:
    import inspect

    return inspect.isgeneratorfunction(fn)
