"""Exceptions the SDK raises; each carries the gRPC status code name and a readable message."""

from __future__ import annotations


class FluxloraClientError(Exception):
    def __init__(self, code: str, message: str, job=None):
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message
        self.job = job


class JobFailed(FluxloraClientError):
    """A job ended FAILED; `.job` is its final record."""


class JobCancelled(FluxloraClientError):
    """A job ended CANCELLED."""
