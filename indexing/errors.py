"""Errors raised by the store.

Each error carries a ``code`` that the service maps one-to-one onto a gRPC status code,
so that a validation failure deep in the store reaches the caller as INVALID_ARGUMENT
(or NOT_FOUND, ...) with the same message, never as a bare UNKNOWN.
"""

from __future__ import annotations

import errno


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


class Unavailable(AssayError):
    """A service the store depends on (the object store) could not be reached; retrying
    later may succeed."""

    code = "UNAVAILABLE"


# errno values (and their texts, as Rust's std::io and object_store print them) of a full
# disk or an exhausted quota.
_DISK_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)
_DISK_FULL_TEXTS = ("no space left on device", "disk quota exceeded", "os error 28", "os error 122")
# What object_store (reqwest/hyper) and the OS say when the object store does not answer:
# refused, reset or dropped connections, name lookups that fail, requests that time out.
# Not "timeout" alone: every object_store error prints its "retry_timeout" setting.
_UNREACHABLE_TEXTS = (
    "error sending request", "connection refused", "connection reset", "connection closed",
    "connection aborted", "broken pipe", "timed out", "deadline has elapsed", "dns error",
    "failed to lookup address", "request or response body error", "service unavailable",
    "os error 111", "os error 104", "os error 110",
    "couldn't connect to server", "network_connection",  # pyarrow's S3 client (images)
)


def _chain(exc: BaseException) -> list[BaseException]:
    """``exc`` and the exceptions it was raised from or while handling (a failure to record
    a failure is usually the same fault twice)."""
    out: list[BaseException] = []
    while exc is not None and exc not in out and len(out) < 8:
        out.append(exc)
        exc = exc.__cause__ or exc.__context__  # type: ignore[assignment]
    return out


def _disk_full(exc: BaseException) -> bool:
    if isinstance(exc, OSError) and exc.errno in _DISK_FULL_ERRNOS:
        return True
    text = str(exc).lower()
    return any(t in text for t in _DISK_FULL_TEXTS)


def _unreachable(exc: BaseException) -> bool:
    if isinstance(exc, ConnectionError):  # refused, reset, aborted, broken pipe
        return True
    if isinstance(exc, OSError) and exc.errno is not None:
        return False  # another OS error on a local path: not about reaching anything
    text = str(exc).lower()
    return any(t in text for t in _UNREACHABLE_TEXTS)


def _detail(exc: BaseException) -> str:
    # Lance appends a Rust source location after ", /"; Arrow and Lance prefix their names.
    text = str(exc).split(", /")[0]
    for prefix in ("lance error: ", "LanceError(IO): "):
        text = text.replace(prefix, "")
    return text.strip()


def classify_error(exc: BaseException, root: str | None = None) -> AssayError | None:
    """The caller-facing error hidden in a failure that is not an :class:`AssayError` —
    the one place that decides it for the gRPC interceptor, the job runner, mining and
    the web page. ``root`` is the data root, named in the messages. None: a bug (INTERNAL).

    * a filter that planned but fails on the data: INVALID_ARGUMENT (see
      :func:`filter_runtime_error`);
    * a full disk (``OSError`` ENOSPC/EDQUOT, or a Lance/Arrow error whose text says
      "No space left on device"): RESOURCE_EXHAUSTED. Lance writes data files first and
      commits a version last, so a write that failed for space committed nothing;
    * an object store that does not answer (connection refused or reset, timeouts, name
      lookups): UNAVAILABLE, which clients retry.

    The exception's cause and context are looked at too: the failure of recording a
    failure (a job's FAILED state on the same full disk) carries the first one.
    """
    if isinstance(exc, AssayError):
        return exc
    if (mapped := filter_runtime_error(exc)) is not None:
        return mapped
    where = f"the data root {root}" if root else "the data root"
    for e in _chain(exc):
        if _disk_full(e):
            return ResourceExhausted(
                f"{where} is out of disk space; free space and retry — the write that failed "
                f"committed nothing ({_detail(e)})")
    for e in _chain(exc):
        if _unreachable(e):
            store = f"the object store of {where}" if root and "://" in root else "a storage service"
            return Unavailable(
                f"{store} could not be reached ({_detail(e)}); retry when it is back — an "
                "interrupted write is either committed whole or not at all, and upserts by id "
                "are safe to repeat")
    return None
