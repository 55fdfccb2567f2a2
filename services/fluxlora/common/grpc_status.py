"""Turning exceptions into gRPC statuses at the edge of every servicer method."""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from typing import Any

import grpc

from fluxlora.common.errors import status_of

log = logging.getLogger(__name__)


def _abort(context: grpc.ServicerContext, exc: BaseException) -> None:
    code, message = status_of(exc)
    if code == "INTERNAL":
        log.exception("unexpected error in RPC")
    context.abort(grpc.StatusCode[code], message)


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
