"""The client's errors: one :class:`AssayClientError` subclass per gRPC status.

``err.code`` is the status name (``"NOT_FOUND"``), ``err.message`` the server's
explanation. Arguments the client refuses before sending anything raise
:class:`InvalidArgumentError` too (:func:`invalid`).
"""

from __future__ import annotations

import contextlib
from typing import Any, Final

import grpc

__all__ = [
    "AlreadyExistsError", "AssayClientError", "CancelledError", "DeadlineExceededError",
    "FailedPreconditionError", "InternalError", "InvalidArgumentError", "NotFoundError",
    "PermissionDeniedError", "ResourceExhaustedError", "UnauthenticatedError",
    "UnavailableError", "error_for", "error_from_rpc", "invalid",
]


class AssayClientError(Exception):
    """A failed call: ``code`` is the gRPC status name (``"NOT_FOUND"``), ``message`` the
    server's explanation, ``details`` a dict (``metadata``: trailing metadata; ``job``: the
    failed :class:`Job`; ``committed``: the acknowledged part of a failed upsert)."""

    rpc_error: grpc.RpcError | None = None  # the original error, when it came from gRPC

    def __init__(self, code: str, message: str, details: Any = None) -> None:
        super().__init__(code, message, details)
        self.code = code
        self.message = message
        self.details = {} if details is None else details

    def __str__(self) -> str:
        return f"{self.code}: {self.message}"

    @property
    def field(self) -> str | None:
        """The request field the server's error names (``"emb_clip"``, ``"id"``), if any."""
        value = self.details.get("metadata", {}).get("assay-field")
        return None if value is None else str(value)

    @property
    def row(self) -> int | None:
        """The row (of the upsert batch, 0-based) the server's error names, if any."""
        value = self.details.get("metadata", {}).get("assay-row")
        try:
            return None if value is None else int(value)
        except ValueError:
            return None


class InvalidArgumentError(AssayClientError, ValueError):
    """INVALID_ARGUMENT (also raised client-side for malformed arguments)."""


class NotFoundError(AssayClientError):
    """NOT_FOUND: collection, space, model or job."""


class AlreadyExistsError(AssayClientError):
    """ALREADY_EXISTS."""


class FailedPreconditionError(AssayClientError):
    """FAILED_PRECONDITION, e.g. search by text in a space without a text embedder."""


class ResourceExhaustedError(AssayClientError):
    """RESOURCE_EXHAUSTED: a server limit (or a message over max_message_bytes)."""


class UnauthenticatedError(AssayClientError):
    """UNAUTHENTICATED: missing or wrong token."""


class PermissionDeniedError(AssayClientError):
    """PERMISSION_DENIED."""


class DeadlineExceededError(AssayClientError):
    """DEADLINE_EXCEEDED: the call (or Job.wait) ran past its timeout."""


class CancelledError(AssayClientError):
    """CANCELLED: the call, or the job, was cancelled."""


class UnavailableError(AssayClientError):
    """UNAVAILABLE: the server could not be reached (after the retries)."""


class InternalError(AssayClientError):
    """INTERNAL: a server bug (the message carries a request id for the server log), or a
    protocol violation noticed by the client."""


_ERRORS: Final[dict[str, type[AssayClientError]]] = {
    "INVALID_ARGUMENT": InvalidArgumentError,
    "NOT_FOUND": NotFoundError,
    "ALREADY_EXISTS": AlreadyExistsError,
    "FAILED_PRECONDITION": FailedPreconditionError,
    "RESOURCE_EXHAUSTED": ResourceExhaustedError,
    "UNAUTHENTICATED": UnauthenticatedError,
    "PERMISSION_DENIED": PermissionDeniedError,
    "DEADLINE_EXCEEDED": DeadlineExceededError,
    "CANCELLED": CancelledError,
    "UNAVAILABLE": UnavailableError,
    "INTERNAL": InternalError,
}


def error_for(code: str, message: str, details: Any = None) -> AssayClientError:
    """The exception for a status name: its subclass if there is one, else the base class."""
    return _ERRORS.get(code, AssayClientError)(code, message, details)


def invalid(message: str) -> InvalidArgumentError:
    """InvalidArgumentError raised client-side, before anything is sent."""
    return InvalidArgumentError("INVALID_ARGUMENT", message)


def error_from_rpc(exc: grpc.RpcError) -> AssayClientError:
    """Translate a grpc.RpcError (sync or aio) into an AssayClientError; the original is
    kept as ``err.rpc_error``."""
    code = exc.code() if callable(getattr(exc, "code", None)) else None
    name = code.name if isinstance(code, grpc.StatusCode) else "UNKNOWN"
    message = exc.details() if callable(getattr(exc, "details", None)) else None
    metadata: dict[str, Any] = {}
    with contextlib.suppress(Exception):  # not every RpcError carries metadata
        metadata = dict(exc.trailing_metadata() or ())
    err = error_for(name, message or str(exc), {"metadata": metadata})
    err.rpc_error = exc
    return err
