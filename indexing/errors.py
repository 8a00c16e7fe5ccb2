"""Errors raised by the store.

Each error carries a ``code`` that the service maps one-to-one onto a gRPC status code,
so that a validation failure deep in the store reaches the caller as INVALID_ARGUMENT
(or NOT_FOUND, ...) with the same message, never as a bare UNKNOWN.
"""

from __future__ import annotations


class AssayError(Exception):
    """Base class. ``code`` names the gRPC status the service answers with."""

    code = "INTERNAL"

    def __init__(self, message: str, *, field: str | None = None, row: int | None = None):
        super().__init__(message)
        self.message = message
        self.field = field
        self.row = row

    def __str__(self) -> str:
        return self.message


class InvalidArgument(AssayError):
    """The request is malformed: bad dimension, NaN, unknown column, bad filter..."""

    code = "INVALID_ARGUMENT"


class NotFound(AssayError):
    """A collection, space, model or id does not exist."""

    code = "NOT_FOUND"


class AlreadyExists(AssayError):
    code = "ALREADY_EXISTS"


class FailedPrecondition(AssayError):
    """The request is well formed but the state does not allow it (e.g. no index)."""

    code = "FAILED_PRECONDITION"


class ResourceExhausted(AssayError):
    code = "RESOURCE_EXHAUSTED"


class PermissionDenied(AssayError):
    """The caller may not do this (a read-only token writing; an image outside the data roots)."""

    code = "PERMISSION_DENIED"


class EmbedderLoadError(FailedPrecondition):
    """A model could not be loaded; the message says what was tried and how to fix it."""


_FILTER_RUNTIME = "Error applying filter expression"


def filter_runtime_error(exc: BaseException) -> InvalidArgument | None:
    """The caller's error hidden in a Lance failure, if it is one: a filter that plans
    (so :meth:`~indexing.store.Collection.validate_filter` accepted it) but fails on the
    data when it runs — a CAST of a value that does not convert, a division by zero. Lance
    raises those as RuntimeError/ArrowInvalid from the scan; they are INVALID_ARGUMENT,
    not internal errors. None for anything else."""
    message = str(exc)
    if _FILTER_RUNTIME not in message:
        return None
    detail = message.split(_FILTER_RUNTIME, 1)[1].split(", /")[0]  # drop the Rust source location
    detail = detail.removeprefix(" to batch").lstrip(": ").replace("Arrow error: ", "").strip()
    return InvalidArgument(f"the filter failed while running on the rows: {detail}; fix the filter "
                           "(compare values of the same type, guard divisions)")
