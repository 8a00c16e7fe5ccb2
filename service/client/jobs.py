"""Job records as objects, and what waiting for a job decides (sync and async alike).

``Job``/``MiningJob`` (:mod:`service.client.sync`) and their asyncio twins add the calls
(refresh, cancel, watch, wait) to :class:`JobView`; :class:`Waiter` holds what both
``wait`` methods decide: the deadline, the progress bar, whether to watch again.
"""

from __future__ import annotations

import time
from typing import Any, Final

from protos.assay.v1 import jobs_pb2
from service.client.convert import message_to_dict, struct_to_dict
from service.client.errors import (
    AssayClientError,
    DeadlineExceededError,
    UnavailableError,
    error_for,
)
from service.client.progress import Progress

__all__ = ["JobView", "Waiter"]

_TERMINAL: Final = frozenset({"SUCCEEDED", "FAILED", "CANCELLED", "INTERRUPTED"})
# The code wait() raises for a job that ended badly without an error_code of its own.
_END_CODES: Final = {"FAILED": "UNKNOWN", "CANCELLED": "CANCELLED", "INTERRUPTED": "ABORTED"}


class JobView:
    """A job record (``jobs_pb2.Job`` in ``proto``) as attributes; base of Job and AsyncJob.
    ``_client`` is the client that fetched it (its ``retry`` policy paces reconnections)."""

    def __init__(self, client: Any, proto: jobs_pb2.Job) -> None:
        self._client = client
        self.proto = proto

    @property
    def id(self) -> str:
        return self.proto.id

    @property
    def kind(self) -> str:
        return self.proto.kind

    @property
    def collection(self) -> str:
        return self.proto.collection

    @property
    def state(self) -> str:
        """"PENDING", "RUNNING", "SUCCEEDED", "FAILED", "CANCELLED" or "INTERRUPTED"."""
        return jobs_pb2.JobState.Name(self.proto.state)

    @property
    def progress(self) -> float:
        """0..1."""
        return self.proto.progress

    @property
    def message(self) -> str:
        return self.proto.message

    @property
    def error(self) -> str:
        return self.proto.error

    @property
    def error_code(self) -> str:
        """gRPC status name of the failure, e.g. "INVALID_ARGUMENT" ("" unless FAILED)."""
        return self.proto.error_code

    @property
    def params(self) -> dict[str, Any]:
        return struct_to_dict(self.proto.params)

    @property
    def result(self) -> dict[str, Any]:
        """The result of a SUCCEEDED job (integral numbers as ints)."""
        return struct_to_dict(self.proto.result)

    @property
    def done(self) -> bool:
        return self.state in _TERMINAL

    def to_dict(self) -> dict[str, Any]:
        """The whole record, timestamps included."""
        return message_to_dict(self.proto)

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(id={self.id!r}, kind={self.kind!r}, "
                f"collection={self.collection!r}, state={self.state}, "
                f"progress={self.progress:.2f}, message={self.message!r})")

    def _check_ended(self) -> None:
        """Raise for a job that ended FAILED, CANCELLED or INTERRUPTED."""
        if self.state in _END_CODES:
            code = self.error_code or _END_CODES[self.state]
            why = self.error or self.message
            raise error_for(code, f"job {self.id} ({self.kind}) {self.state}: {why}", {"job": self})


class Waiter:
    """What Job.wait and AsyncJob.wait decide: the deadline, the progress bar, and whether
    to watch again after an error."""

    def __init__(self, job: JobView, timeout: float | None, progress: bool) -> None:
        self.job, self.timeout = job, timeout
        self.deadline = None if timeout is None else time.monotonic() + timeout
        self.reconnects = job._client.retry.backoff()
        self.bar = Progress(progress, total=100, desc=f"{job.kind} {job.id[:8]}", unit="%")

    def __enter__(self) -> Waiter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.bar.close()

    def remaining(self) -> float | None:
        return None if self.deadline is None else max(0.0, self.deadline - time.monotonic())

    def seen(self, snapshot: JobView) -> bool:
        """Show a snapshot; True once the job has ended."""
        status = f"{snapshot.state} {snapshot.message}".strip()
        self.bar.update(round(100 * snapshot.progress), status)
        return snapshot.done

    def after(self, exc: AssayClientError) -> float:
        """The sleep before watching again after losing the server; raises otherwise (a
        DeadlineExceededError naming the job when the wait timed out)."""
        if isinstance(exc, DeadlineExceededError):
            job = self.job
            message = (f"job {job.id} ({job.kind}) is still {job.state} after {self.timeout} s "
                       "(it keeps running)")
            raise DeadlineExceededError("DEADLINE_EXCEEDED", message, {"job": job}) from None
        delay = next(self.reconnects, None) if isinstance(exc, UnavailableError) else None
        if delay is None:
            raise exc
        return delay
