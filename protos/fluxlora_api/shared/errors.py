"""Errors that carry a gRPC status code name and a message a person can act on.

Pure modules raise these (or ValueError / FileNotFoundError); servicers and the job runtime turn
them into gRPC statuses and job errors with `status_of`. Stack traces go to the log, never to a client.
"""

from __future__ import annotations

import errno


class FluxloraError(Exception):
    code = "INTERNAL"

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message


class InvalidArgument(FluxloraError):
    code = "INVALID_ARGUMENT"


class NotFound(FluxloraError):
    code = "NOT_FOUND"


class PermissionDenied(FluxloraError):
    code = "PERMISSION_DENIED"


class FailedPrecondition(FluxloraError):
    code = "FAILED_PRECONDITION"


class ResourceExhausted(FluxloraError):
    code = "RESOURCE_EXHAUSTED"


class AlreadyExists(FluxloraError):
    code = "ALREADY_EXISTS"


class Unavailable(FluxloraError):
    code = "UNAVAILABLE"


class Cancelled(FluxloraError):
    code = "CANCELLED"


def status_of(exc: BaseException) -> tuple[str, str]:
    """(gRPC code name, message) for any exception."""
    if isinstance(exc, FluxloraError):
        return exc.code, exc.message
    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
        where = f"the disk holding {exc.filename}" if exc.filename else "a disk this server writes to"
        return (
            "RESOURCE_EXHAUSTED",
            f"no space left on {where} ({exc.strerror or 'ENOSPC'}): free space there (old runs, datasets, "
            "caches) or point FLUXLORA_STORE / TMPDIR at a bigger disk, then resubmit",
        )
    if isinstance(exc, FileNotFoundError):
        return "NOT_FOUND", str(exc)
    if isinstance(exc, (ValueError, TypeError)):
        return "INVALID_ARGUMENT", str(exc)
    if isinstance(exc, MemoryError) or type(exc).__name__ == "OutOfMemoryError":
        return (
            "RESOURCE_EXHAUSTED",
            f"out of memory: {exc}. Lower the resolution or batch size, or enable gradient checkpointing.",
        )
    return "INTERNAL", f"internal error ({type(exc).__name__}: {exc}); the server log has the details"
