"""Riding out object-store outages: transient S3 failures are retried with exponential backoff and
full jitter, then reported as UNAVAILABLE with what was being done, where, and what to do.

Transient: the endpoint refusing, resetting or dropping connections, timeouts, HTTP 500/502/503/504
and S3's SlowDown / InternalError / ServiceUnavailable / RequestTimeout. Anything else (NoSuchKey,
AccessDenied, a bad certificate) fails at once: waiting would not change the answer.

Every store operation is safe to repeat: a PUT replaces the object whole (a multipart upload that
did not complete leaves no object), GET/HEAD/LIST/DELETE do not change what a repeat sees.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

from fluxlora.common import metrics, tracing
from fluxlora_api.shared.errors import Unavailable

log = logging.getLogger(__name__)

T = TypeVar("T")

RETRYABLE_STATUS = frozenset({500, 502, 503, 504})
RETRYABLE_S3_CODES = frozenset({"SlowDown", "InternalError", "ServiceUnavailable", "RequestTimeout",
                                "XMinioServerNotInitialized"})


@dataclass(frozen=True)
class RetryPolicy:
    """`retries` retries after the first attempt; before retry n (0-based) a delay drawn uniformly
    from [0, min(max_s, base_s * 2**n)] ("full jitter": clients that failed together do not come
    back together)."""

    retries: int = 10
    base_s: float = 0.5
    max_s: float = 8.0

    def cap(self, retry: int) -> float:
        return min(self.max_s, self.base_s * 2 ** min(retry, 60))

    def delay(self, retry: int, rng: Callable[[], float] = random.random) -> float:
        return rng() * self.cap(retry)

    @property
    def longest_wait_s(self) -> float:
        """The most time spent sleeping before giving up (on average, half of it)."""
        return sum(self.cap(n) for n in range(self.retries))

    @classmethod
    def from_settings(cls, settings: object) -> RetryPolicy:
        default = cls()
        return cls(retries=getattr(settings, "s3_retries", default.retries),
                   base_s=getattr(settings, "s3_retry_base_s", default.base_s),
                   max_s=getattr(settings, "s3_retry_max_s", default.max_s))


def transient_reason(exc: BaseException) -> str | None:
    """A short description of a failure that a retry may cure; None for any other failure."""
    from minio.error import InvalidResponseError, S3Error, ServerError
    from urllib3 import exceptions as u3

    if isinstance(exc, u3.MaxRetryError):
        return transient_reason(exc.reason) if exc.reason is not None else "too many retries"
    if isinstance(exc, u3.SSLError):  # a certificate or TLS-version mismatch stays one
        return None
    if isinstance(exc, (u3.NewConnectionError, u3.ConnectTimeoutError)):
        return f"cannot connect ({_root_cause(exc)})"
    if isinstance(exc, (u3.TimeoutError, TimeoutError)):
        return "timed out"
    if isinstance(exc, (u3.ProtocolError, u3.IncompleteRead, u3.ResponseError, ConnectionError)):
        return f"connection lost ({_root_cause(exc)})"
    if isinstance(exc, ServerError) and exc.status_code in RETRYABLE_STATUS:
        return f"HTTP {exc.status_code}"
    if isinstance(exc, InvalidResponseError) and getattr(exc, "_code", None) in RETRYABLE_STATUS:
        return f"HTTP {exc._code}"
    if isinstance(exc, S3Error) and (exc.code in RETRYABLE_S3_CODES
                                     or getattr(exc.response, "status", None) in RETRYABLE_STATUS):
        return f"{exc.code} (HTTP {getattr(exc.response, 'status', '?')})"
    return None


def _root_cause(exc: BaseException) -> str:
    """The innermost OSError's description ("[Errno 111] Connection refused"), else the class name:
    never the request line, so nothing of a URL or header reaches a log or a client."""
    seen = exc
    for _ in range(10):
        inner = seen.__cause__ or seen.__context__ or (seen.args[1] if len(seen.args) > 1
                                                       and isinstance(seen.args[1], BaseException) else None)
        if inner is None:
            break
        seen = inner
    if isinstance(seen, OSError) and seen.strerror:
        return f"{type(seen).__name__}: {seen.strerror}"
    return type(seen).__name__


def with_retries(call: Callable[[], T], action: str, where: str, policy: RetryPolicy,
                 sleep: Callable[[float], None] = time.sleep, rng: Callable[[], float] = random.random) -> T:
    """`call()`, retried on transient failures; Unavailable once `policy` is spent.

    action: what the call does, for people ("writing 'datasets/x/manifest.json'"); where: the store
    ("s3://bucket at minio:9000")."""
    operation = metrics.store_operation(action)
    with tracing.store_span(operation, where):
        return _with_retries(call, action, where, policy, sleep, rng, operation)


def _with_retries(call: Callable[[], T], action: str, where: str, policy: RetryPolicy,
                  sleep: Callable[[float], None], rng: Callable[[], float], operation: str) -> T:
    started = time.monotonic()
    for retry in range(policy.retries + 1):
        attempt = time.monotonic()
        try:
            result = call()
            metrics.STORE_SECONDS.labels(operation, "ok").observe(time.monotonic() - attempt)
            return result
        except Exception as exc:  # noqa: BLE001 - classified below; the rest propagate unchanged
            reason = transient_reason(exc)
            missing = getattr(exc, "code", "") in ("NoSuchKey", "NoSuchUpload")  # an answer, not a failure
            metrics.STORE_SECONDS.labels(operation, "not_found" if missing else "error").observe(
                time.monotonic() - attempt)
            if reason is None:
                if not missing:
                    metrics.STORE_FAILURES.labels(operation, "permanent").inc()
                raise
            if retry == policy.retries:
                metrics.STORE_FAILURES.labels(operation, "unavailable").inc()
                raise Unavailable(
                    f"object store {where} unreachable while {action}: {reason}; gave up after "
                    f"{retry + 1} attempts over {time.monotonic() - started:.1f}s. Nothing half-written is kept: "
                    "once the store is reachable again, retry the request or resubmit the job "
                    "(FLUXLORA_S3_RETRIES and FLUXLORA_S3_RETRY_MAX_S set how long to wait)"
                ) from exc
            delay = policy.delay(retry, rng)
            metrics.STORE_RETRIES.labels(operation).inc()
            log.warning("object store %s: %s while %s; retry %d of %d in %.2fs",
                        where, reason, action, retry + 1, policy.retries, delay)
            sleep(delay)
    raise AssertionError("unreachable")  # the loop returns or raises
