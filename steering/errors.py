"""One exception hierarchy for the whole domain.

Each subclass names the gRPC status it maps to as a plain string, so the pure packages never import
grpc; the service's error interceptor turns ``grpc_status`` into a real status code. Messages name the
offending field and the allowed range, because the caller has to fix the input from the message alone.
"""

from __future__ import annotations


class SteerwatchError(Exception):
    """Base of every error steerwatch raises on purpose."""

    grpc_status: str = "INTERNAL"

    def __init__(self, message: str, *, field: str | None = None) -> None:
        super().__init__(message)
        self.field = field


class InvalidArgument(SteerwatchError):
    """The request or a file it names is malformed or out of range."""

    grpc_status = "INVALID_ARGUMENT"


class NotFound(SteerwatchError):
    """An id (vector, SAE, probe, policy, request) is not registered."""

    grpc_status = "NOT_FOUND"


class AlreadyExists(SteerwatchError):
    """An id is registered already."""

    grpc_status = "ALREADY_EXISTS"


class LimitExceeded(SteerwatchError):
    """A configured limit (coefficient, tokens, prompt length, batch slots) is exceeded."""

    grpc_status = "RESOURCE_EXHAUSTED"


class FailedPrecondition(SteerwatchError):
    """The system is not in a state that allows the operation (engine not started, model mismatch)."""

    grpc_status = "FAILED_PRECONDITION"


class Unavailable(SteerwatchError):
    """The engine is shutting down or overloaded; the caller may retry elsewhere."""

    grpc_status = "UNAVAILABLE"


class DeadlineExceeded(SteerwatchError):
    """A server-side time limit ran out before the operation finished."""

    grpc_status = "DEADLINE_EXCEEDED"


def invalid(field: str, message: str) -> InvalidArgument:
    """Build an InvalidArgument whose message starts with the field name."""
    return InvalidArgument(f"{field}: {message}", field=field)
