"""Python client of the assay gRPC service: sync :class:`Client`, asyncio :class:`AsyncClient`.

Depends only on grpcio, protobuf, numpy and pyarrow (pandas and tqdm are used lazily when
present), so it installs and imports quickly wherever your training code runs.

    from service.client import Client

    with Client("127.0.0.1:50051", token="s3cret") as client:
        col = client.create_collection("pool", spaces={"clip": 512}, models={"m1": ["cat", "dog"]},
                                       if_not_exists=True)
        col.upsert([{"id": "a", "uri": "s3://imgs/a.jpg", "emb_clip": v}])  # or Arrow / DataFrame
        hits = col.search("clip", v, k=10, where="label IS NULL")          # -> pyarrow.Table
        hits.to_pandas()
        col.optimize().wait(progress=True)                                  # a server-side job
        col.mine("margin", size=100, model="m1").show()  # in Jupyter: the picks as cards (service.notebook)

    # asyncio: the same surface, awaited
    async with AsyncClient("127.0.0.1:50051") as client:
        col = client.collection("pool")
        hits = await col.search("clip", v, k=10)
        await (await col.optimize()).wait()

Behaviour common to every call:

* Errors are raised as :class:`AssayClientError` subclasses named after the gRPC status
  (``NotFoundError``, ``InvalidArgumentError`` ...); ``err.code`` is the status name.
* Unary calls get a deadline (``timeout``, 30 s by default; per call ``timeout=``, ``None``
  for none); each retry gets a fresh one. Streams (upsert, scan/query, job watching) have
  no overall deadline unless ``timeout=`` is given: they may legitimately run long.
* UNAVAILABLE (server restarting, connection refused) is retried with exponential backoff
  and jitter (4 retries, 0.1 s doubling to at most 5 s); server streams are retried only
  before their first message. Nothing else is retried.
* Upserts are streamed one batch per request and acknowledged batch by batch. Upsert is
  idempotent by ``id``, so replaying a batch whose acknowledgement was lost is harmless —
  but only when every row carries an ``id`` (a generated id would be generated twice).
  An upsert is therefore resumed after UNAVAILABLE, from its first unacknowledged batch,
  only when its input was materialised (a table, DataFrame, dict or list of rows) and every
  row has an ``id``; an iterator input, or rows without ids, raise instead, with the
  acknowledged (committed) part in ``err.details["committed"]``. At most 4 batches are
  in flight unacknowledged.
* AsyncClient runs upserts on a sync stream in a worker thread (grpc.aio can lose the
  server's status of a bidi stream, grpc/grpc#36066); cancelling the task cancels it.
* The client's :class:`CancelledError` is the gRPC status, not ``asyncio.CancelledError``.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import itertools
import math
import os
import random
import re
import sys
import tempfile
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field, replace
from functools import partial
from typing import TYPE_CHECKING, Any, Final, TypeVar

import grpc
import grpc.aio
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from google.protobuf import json_format, struct_pb2
from google.protobuf.message import Message
from grpc_health.v1 import health_pb2, health_pb2_grpc

from protos.assay.v1 import (
    collections_pb2,
    collections_pb2_grpc,
    common_pb2,
    datasets_pb2,
    datasets_pb2_grpc,
    ingest_pb2,
    ingest_pb2_grpc,
    jobs_pb2,
    jobs_pb2_grpc,
    mining_pb2,
    mining_pb2_grpc,
    query_pb2,
    query_pb2_grpc,
    scoring_pb2,
    scoring_pb2_grpc,
    search_pb2,
    search_pb2_grpc,
)
from service.arrow_ipc import ipc_to_table, table_to_ipc

if TYPE_CHECKING:
    from service.notebook import Grid

__all__ = [
    "AlreadyExistsError",
    "AssayClientError",
    "AsyncClient",
    "AsyncCollection",
    "AsyncDataset",
    "AsyncJob",
    "AsyncMiningJob",
    "CancelledError",
    "Client",
    "Collection",
    "Dataset",
    "DeadlineExceededError",
    "FailedPreconditionError",
    "InternalError",
    "InvalidArgumentError",
    "Job",
    "MiningJob",
    "NotFoundError",
    "Page",
    "PermissionDeniedError",
    "ResourceExhaustedError",
    "RetryPolicy",
    "UnauthenticatedError",
    "UnavailableError",
    "UpsertSummary",
    "bind_params",
    "histogram_stats",
]

T = TypeVar("T")
DEFAULT_MAX_MESSAGE_BYTES: Final = 64 * 1024 * 1024
# Bytes kept free in an upsert request for everything but the Arrow payload.
_REQUEST_ENVELOPE: Final = 16 * 1024
# Upsert batches sent but not yet acknowledged, at most (bounds client memory and server queue).
_UPSERT_WINDOW: Final = 4
_END: Final = object()


class _Default:
    """Type of :data:`DEFAULT`: "use the client's timeout"."""

    def __repr__(self) -> str:
        return "DEFAULT"


DEFAULT: Final = _Default()
Timeout = float | None | _Default


# -- errors ------------------------------------------------------------------------------


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


def _invalid(message: str) -> InvalidArgumentError:
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


# -- retries -----------------------------------------------------------------------------


@dataclass
class RetryPolicy:
    """Retries of UNAVAILABLE: ``retries`` more attempts, sleeping a jittered exponential
    backoff (``base_delay`` doubling up to ``max_delay``) before each."""

    retries: int = 4
    base_delay: float = 0.1
    max_delay: float = 5.0

    def backoff(self) -> Iterator[float]:
        """The sleeps before retry 1, 2, ...: uniform in [cap/2, cap], cap = base * 2**i."""
        for attempt in range(max(0, self.retries)):
            cap = min(self.max_delay, self.base_delay * 2**attempt)
            yield random.uniform(cap / 2, cap)


def is_retryable(exc: BaseException) -> bool:
    """Only UNAVAILABLE is retried: the request did not reach a working server."""
    code = getattr(exc, "code", None)
    return (isinstance(exc, grpc.RpcError) and callable(code)
            and code() == grpc.StatusCode.UNAVAILABLE)


def next_delay(exc: grpc.RpcError, delays: Iterator[float]) -> float:
    """The sleep before retrying after ``exc``; raises it as an AssayClientError when it is
    not retryable or the retries are spent."""
    delay = next(delays, None) if is_retryable(exc) else None
    if delay is None:
        raise error_from_rpc(exc) from None
    return delay


def call_with_retries(policy: RetryPolicy, attempt: Callable[[], T]) -> T:
    """Run ``attempt`` until it returns, retrying UNAVAILABLE per ``policy``; any RpcError
    left is raised as an AssayClientError."""
    delays = policy.backoff()
    while True:
        try:
            return attempt()
        except grpc.RpcError as exc:
            delay = next_delay(exc, delays)
        time.sleep(delay)


async def call_with_retries_async(policy: RetryPolicy, attempt: Callable[[], Awaitable[T]]) -> T:
    """:func:`call_with_retries` for coroutines."""
    delays = policy.backoff()
    while True:
        try:
            return await attempt()
        except grpc.RpcError as exc:
            delay = next_delay(exc, delays)
        await asyncio.sleep(delay)


# -- message conversions (pure) ------------------------------------------------------------


def message_to_dict(message: Message) -> dict[str, Any]:
    """A response message as a plain dict: proto field names, zero values included, 64-bit
    integers as ints (not JSON strings), Structs as dicts."""
    return json_format.MessageToDict(
        message, preserving_proto_field_name=True, always_print_fields_with_no_presence=True,
        unquote_int64_if_possible=True,
    )


def _plain(value: Any) -> Any:
    """Struct values come back as floats: give integral ones back as ints."""
    if isinstance(value, float) and value.is_integer() and abs(value) < 2**53:
        return int(value)
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    return value


def struct_to_dict(struct: struct_pb2.Struct) -> dict[str, Any]:
    return _plain(json_format.MessageToDict(struct))


def dict_to_struct(params: Mapping[str, Any] | None) -> struct_pb2.Struct:
    """Job parameters as a Struct; None values are left out (server default)."""
    struct = struct_pb2.Struct()
    try:
        struct.update({k: v for k, v in (params or {}).items() if v is not None})
    except (TypeError, ValueError) as exc:
        raise _invalid(f"job params must be JSON-like (str, number, bool, list, dict): {exc}") \
            from None
    return struct


def _message(cls: type[Message], what: str, **fields: Any) -> Any:
    """Build a message, turning protobuf's type errors into InvalidArgumentError."""
    try:
        return cls(**{k: v for k, v in fields.items() if v is not None})
    except (TypeError, ValueError) as exc:
        raise _invalid(f"{what}: {exc}") from None


def space_spec(name: str, spec: int | Mapping[str, Any] | common_pb2.SpaceSpec,
               ) -> common_pb2.SpaceSpec:
    """``512`` or ``{"dim", "metric", "model", "normalized", "index": {IndexPolicy fields}}``."""
    if isinstance(spec, common_pb2.SpaceSpec):
        out = common_pb2.SpaceSpec()
        out.CopyFrom(spec)
        out.name = name
        return out
    if isinstance(spec, int) and not isinstance(spec, bool):
        return _message(common_pb2.SpaceSpec, f"space '{name}'", name=name, dim=spec)
    if isinstance(spec, Mapping):
        kw = dict(spec)
        index = kw.pop("index", None)
        if isinstance(index, Mapping):
            index = _message(common_pb2.IndexPolicy, f"space '{name}' index", **index)
        return _message(common_pb2.SpaceSpec, f"space '{name}'", name=name, index=index, **kw)
    raise _invalid(f"space '{name}': give a dimension (int) or a dict of SpaceSpec fields, "
                   f"got {spec!r}")


def model_spec(name: str, spec: Iterable[str] | Mapping[str, Any] | common_pb2.ModelSpec,
               ) -> common_pb2.ModelSpec:
    """``["cat", "dog"]`` or ``{"classes": [...], "task": "classification" | "detection"}``."""
    if isinstance(spec, common_pb2.ModelSpec):
        out = common_pb2.ModelSpec()
        out.CopyFrom(spec)
        out.name = name
        return out
    if isinstance(spec, Mapping):
        return _message(common_pb2.ModelSpec, f"model '{name}'", name=name, **spec)
    if isinstance(spec, Iterable) and not isinstance(spec, str | bytes):
        return _message(common_pb2.ModelSpec, f"model '{name}'", name=name, classes=list(spec))
    raise _invalid(f"model '{name}': give its class names (a list) or a dict, got {spec!r}")


def _ids(ids: str | Iterable[str]) -> list[str]:
    ids = [ids] if isinstance(ids, str) else list(ids)
    bad = next((i for i in ids if not isinstance(i, str)), None)
    if bad is not None:
        raise _invalid(f"ids must be strings, got {type(bad).__name__} {bad!r}")
    return ids


def _columns(columns: str | Iterable[str] | None) -> list[str]:
    if columns is None:
        return []
    return [columns] if isinstance(columns, str) else list(columns)


# -- SQL parameters (pure) -------------------------------------------------------------------

_PARAM_NAME: Final = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def _scalar_literal(name: str, value: Any) -> str:
    """One value as a SQL literal that cannot change the shape of the expression around it."""
    if value is None:
        return "NULL"
    if isinstance(value, bool | np.bool_):
        return "TRUE" if value else "FALSE"
    if isinstance(value, int | np.integer):
        n = int(value)
        if not -(2**63) <= n < 2**63:
            raise _invalid(f"param '{name}': {n} does not fit in a 64-bit integer")
        # In parentheses: "x -:n" must not become "x --3" (a comment).
        return str(n) if n >= 0 else f"({n})"
    if isinstance(value, float | np.floating):
        f = float(value)
        if not math.isfinite(f):
            raise _invalid(f"param '{name}': {f} is not a finite number (NaN and infinities "
                           "cannot be compared in a filter)")
        text = repr(f)
        return text if f >= 0 else f"({text})"
    if isinstance(value, str):
        if "\x00" in value:
            raise _invalid(f"param '{name}': strings cannot contain NUL characters")
        return "'" + value.replace("'", "''") + "'"
    if isinstance(value, dt.datetime):
        if value.tzinfo is not None:  # stored timestamps are UTC
            value = value.astimezone(dt.UTC).replace(tzinfo=None)
        return f"TIMESTAMP '{value.isoformat(sep=' ', timespec='microseconds')}'"
    if isinstance(value, dt.date):
        return f"DATE '{value.isoformat()}'"
    raise _invalid(f"param '{name}': cannot bind a {type(value).__name__} (use str, int, float, "
                   "bool, None, datetime, date, or a list of those)")


def sql_literal(name: str, value: Any) -> str:
    """``value`` rendered for the placeholder ``:name``: a scalar literal, or for a list or
    tuple its literals separated by commas (for ``IN (:xs)`` or ``[:xs]``)."""
    if isinstance(value, list | tuple):
        if not value:
            raise _invalid(f"param '{name}': an empty list cannot be bound ('IN ()' is not SQL); "
                           "skip the condition instead")
        if any(isinstance(v, list | tuple | dict) for v in value):
            raise _invalid(f"param '{name}': lists cannot be nested")
        return ", ".join(_scalar_literal(name, v) for v in value)
    return _scalar_literal(name, value)


def _skip_to(sql: str, start: int, end: str) -> int:
    """The index just past ``end`` searched from ``start`` (the end of ``sql`` if absent)."""
    i = sql.find(end, start)
    return len(sql) if i < 0 else i + len(end)


def bind_params(where: str, params: Mapping[str, Any]) -> str:
    """``where`` with each ``:name`` placeholder replaced by ``params[name]`` as a literal.

    Placeholders are recognised only outside '...' strings, "..." and `...` identifiers and
    comments, so text inside a literal is never touched; ``::`` (a cast) is not a
    placeholder. Values: str (quoted, quotes doubled: ``x' OR '1'='1`` stays one string),
    int, finite float, bool, None (NULL), datetime (TIMESTAMP, in UTC), date, or a
    list/tuple of those (comma-separated, for ``IN (:xs)``). A placeholder without a value,
    a value without a placeholder, a bad name or an unsupported value raise
    :class:`InvalidArgumentError` before anything is sent.

        bind_params("label = :l AND score > :s", {"l": "cat", "s": 0.5})
        # "label = 'cat' AND score > 0.5"
    """
    if not isinstance(where, str):
        raise _invalid(f"filter must be a string, got {type(where).__name__}")
    if not isinstance(params, Mapping):
        raise _invalid(f"params must be a mapping of name -> value, got {type(params).__name__}")
    for key in params:
        if not isinstance(key, str) or not _PARAM_NAME.fullmatch(key):
            raise _invalid(f"param name {key!r} is invalid: use letters, digits and '_', "
                           "not starting with a digit")

    def render(name: str) -> str:
        if name not in params:
            given = ", ".join(sorted(params)) or "none"
            raise _invalid(f"filter uses :{name} but params has no '{name}' (given: {given})")
        return sql_literal(name, params[name])

    text, used = _substitute(where, render)
    unused = sorted(set(params) - used)
    if unused:
        raise _invalid(f"param(s) {', '.join(unused)} not used by the filter {where!r} "
                       "(write :name where each value goes)")
    return text


def _placeholders(where: str) -> set[str]:
    """The names of the placeholders in a filter."""
    return _substitute(where, lambda _name: "")[1]


def _substitute(where: str, render: Callable[[str], str]) -> tuple[str, set[str]]:
    """``where`` with each placeholder outside literals, quoted identifiers and comments
    replaced by ``render(name)``; and the names seen."""
    out: list[str] = []
    used: set[str] = set()
    i, n = 0, len(where)
    while i < n:
        ch = where[i]
        if ch in "'\"`":  # a literal or quoted identifier ('' inside one closes and reopens)
            j = _skip_to(where, i + 1, ch)
        elif where.startswith("--", i):
            j = _skip_to(where, i, "\n")
        elif where.startswith("/*", i):
            j = _skip_to(where, i + 2, "*/")
        elif where.startswith("::", i):
            j = i + 2
        elif ch == ":" and (m := _PARAM_NAME.match(where, i + 1)):
            out.append(render(m.group()))
            used.add(m.group())
            i = m.end()
            continue
        else:
            j = i + 1
        out.append(where[i:j])
        i = j
    return "".join(out), used


def _bound(where: str | None, params: Mapping[str, Any] | None, what: str = "where") -> str | None:
    """``where`` with ``params`` bound (None params: ``where`` as given, unless it has
    placeholders: those would reach the server unbound)."""
    if params is None:
        if isinstance(where, str) and ":" in where and (names := _placeholders(where)):
            shown = ", ".join(f":{n}" for n in sorted(names))
            raise _invalid(f"filter {where!r} has placeholder(s) {shown} but no params were given "
                           "(pass params={name: value})")
        return where
    if where is None:
        raise _invalid(f"params were given without a filter ({what})")
    return bind_params(where, params)


def _version(version: int | str | None, what: str = "version") -> str:
    """A version reference as sent: "" (current / working state), a number or a name."""
    if version is None:
        return ""
    if isinstance(version, bool) or not isinstance(version, int | str | np.integer):
        raise _invalid(f"{what} must be an int, a string or None, got {version!r}")
    if isinstance(version, int | np.integer):
        if version < 0:
            raise _invalid(f"{what} must be >= 0, got {version}")
        return str(int(version))
    return version


def concat_pages(pages: list[pa.Table]) -> pa.Table:
    """Pages of one scan as one table (an empty table when there were none)."""
    if not pages:
        return pa.table({})
    return pages[0] if len(pages) == 1 else pa.concat_tables(pages)


def page_to_table(page: common_pb2.ArrowPage) -> pa.Table:
    return ipc_to_table(page.arrow_ipc)


def parse_search(response: search_pb2.SearchResponse, *, single: bool) -> pa.Table:
    """The result table; a single query's result has no ``query_index`` column."""
    table = ipc_to_table(response.arrow_ipc)
    if single and "query_index" in table.column_names:
        table = table.drop_columns(["query_index"])
    return table


# -- requests (pure): what to call, with what, and how to read the answer -----------------


def _same(response: Any) -> Any:
    return response


@dataclass(frozen=True)
class Rpc:
    """One call: the stub (``service``) and ``method``, the request, and ``parse`` for each
    response message. A ``request`` of None is answered locally with ``parse(None)``.
    Public methods of both clients are one builder below and one ``_unary``/``_stream``."""

    service: str
    method: str
    request: Message | None
    parse: Callable[[Any], Any] = _same
    # The response holds job records (one or a list): the client wraps them in its job class.
    jobs: bool = False


def rpc_list_collections() -> Rpc:
    return Rpc("collections", "ListCollections", collections_pb2.ListCollectionsRequest(),
               lambda r: list(r.collections))


def rpc_create_collection(
    name: str,
    spaces: Mapping[str, Any] | None,
    models: Mapping[str, Any] | None,
    fields: Mapping[str, str] | None,
    if_not_exists: bool,
) -> Rpc:
    request = collections_pb2.CreateCollectionRequest(
        collection=name,
        spaces=[space_spec(n, s) for n, s in (spaces or {}).items()],
        models=[model_spec(n, m) for n, m in (models or {}).items()],
        fields=dict(fields or {}),
        if_not_exists=if_not_exists,
    )
    return Rpc("collections", "CreateCollection", request, message_to_dict)


def rpc_describe(name: str) -> Rpc:
    return Rpc("collections", "DescribeCollection", collections_pb2.CollectionRef(collection=name),
               message_to_dict)


def rpc_drop(name: str) -> Rpc:
    return Rpc("collections", "DropCollection", collections_pb2.CollectionRef(collection=name),
               lambda _: None)


def rpc_add_space(collection: str, name: str, dim: int, metric: str, model: str | None,
                  normalized: bool | None, index: Mapping[str, Any] | None) -> Rpc:
    spec = {"dim": dim, "metric": metric, "model": model, "normalized": normalized, "index": index}
    request = collections_pb2.AddSpaceRequest(collection=collection, space=space_spec(name, spec))
    return Rpc("collections", "AddSpace", request, message_to_dict)


def rpc_add_model(collection: str, name: str, classes: Iterable[str], task: str) -> Rpc:
    spec = model_spec(name, {"classes": list(classes), "task": task})
    request = collections_pb2.AddModelRequest(collection=collection, model=spec)
    return Rpc("collections", "AddModel", request, message_to_dict)


def rpc_search(
    collection: str,
    space: str,
    *,
    vector: Any = None,
    ids: str | Iterable[str] | None = None,
    text: str | None = None,
    texts: Iterable[str] | None = None,
    k: int = 10,
    where: str | None = None,
    columns: Iterable[str] | None = None,
    nprobes: int | None = None,
    refine_factor: int | None = None,
    exact: bool = False,
    params: Mapping[str, Any] | None = None,
) -> Rpc:
    """A Search call. A 1-D ``vector``, one ``text`` or one id (a str) is a single query:
    its result has no ``query_index``; 2-D vectors, ``texts`` and a list of ``ids`` keep it."""
    given = [n for n, v in (("vector", vector), ("ids", ids), ("text", text), ("texts", texts))
             if v is not None]
    if len(given) != 1:
        raise _invalid("search: give exactly one of vector, ids, text, texts "
                       f"(got {', '.join(given) or 'none'})")
    where = _bound(where, params)
    request = _message(
        search_pb2.SearchRequest, "search", collection=collection, space=space, k=k, where=where,
        columns=_columns(columns), nprobes=nprobes, refine_factor=refine_factor, exact=exact,
    )
    if vector is not None:
        try:
            q = np.asarray(vector, dtype=np.float32)
        except (TypeError, ValueError) as exc:
            raise _invalid(f"search: vector must be numbers: {exc}") from None
        if q.ndim not in (1, 2) or q.size == 0:
            raise _invalid("search: vector must be 1-D (one query) or 2-D (a batch), "
                           f"got shape {q.shape}")
        single = q.ndim == 1
        request.vectors.dim = q.shape[-1]
        request.vectors.values.extend(q.ravel().tolist())
    elif ids is not None:
        single = isinstance(ids, str)
        request.ids.SetInParent()
        request.ids.ids.extend(_ids(ids))
    else:
        if texts is not None and isinstance(texts, str):
            raise _invalid("search: texts must be a list of strings; use text= for one query")
        single = text is not None
        request.texts.SetInParent()
        request.texts.texts.extend([text] if single else list(texts or ()))
    return Rpc("search", "Search", request, partial(parse_search, single=single))


def rpc_scan(collection: str, where: str | None, columns: Iterable[str] | None, page_rows: int,
             limit: int | None = None, offset: int = 0, version: int | str | None = None,
             params: Mapping[str, Any] | None = None) -> Rpc:
    request = _message(query_pb2.ScanRequest, "scan", collection=collection,
                       where=_bound(where, params), columns=_columns(columns), page_rows=page_rows,
                       limit=limit, offset=offset, version=_version(version))
    return Rpc("query", "Scan", request, page_to_table)


def rpc_count(collection: str, where: str | None, version: int | str | None = None,
              params: Mapping[str, Any] | None = None) -> Rpc:
    request = _message(query_pb2.CountRequest, "count", collection=collection,
                       where=_bound(where, params), version=_version(version))
    return Rpc("query", "Count", request, lambda r: int(r.count))


@dataclass(frozen=True)
class Page:
    """One page of a filtered scan: its rows, the cursor of the next page ("" after the
    last) and the collection version every page of the scan reads."""

    table: pa.Table
    next_cursor: str
    version: int = 0

    @property
    def last(self) -> bool:
        return not self.next_cursor


def _page_table(page: common_pb2.ArrowPage) -> pa.Table:
    """An ArrowPage as a table; a page without bytes as an empty table."""
    return ipc_to_table(page.arrow_ipc) if page.arrow_ipc else pa.table({})


def rpc_page(collection: str, where: str | None, columns: Iterable[str] | None, page_rows: int,
             cursor: str | None, version: int | str | None,
             params: Mapping[str, Any] | None = None) -> Rpc:
    if isinstance(page_rows, bool) or not isinstance(page_rows, int) or page_rows < 1:
        raise _invalid(f"page_rows must be a positive integer, got {page_rows!r}")
    request = _message(query_pb2.PageRequest, "page", collection=collection,
                       where=_bound(where, params), columns=_columns(columns), page_rows=page_rows,
                       cursor=cursor or "", version=_version(version))
    return Rpc("query", "Page", request,
               lambda r: Page(_page_table(r.page), r.next_cursor, int(r.page.version)))


AGGREGATES: Final = ("label_distribution", "confused_pairs", "confusion", "class_uncertainty",
                     "histogram")


def rpc_aggregate(collection: str, kind: str, *, model: str | None = None,
                  where: str | None = None, field: str | None = None,
                  group_by: str | Iterable[str] | None = None, bins: int | None = None,
                  top: int | None = None, measure: str | None = None,
                  version: int | str | None = None,
                  range: tuple[float, float] | None = None,  # noqa: A002 - numpy's name
                  errors_only: bool = False, params: Mapping[str, Any] | None = None) -> Rpc:
    """An analytics table (see AggregateRequest.kind) as a pyarrow Table."""
    if kind not in AGGREGATES:
        raise _invalid(f"aggregate kind {kind!r} is not one of {', '.join(AGGREGATES)}")
    request = _message(
        query_pb2.AggregateRequest, kind, collection=collection, kind=kind, model=model,
        where=_bound(where, params), field=field, group_by=_columns(group_by), bins=bins, top=top,
        measure=measure, version=_version(version), errors_only=errors_only)
    if range is not None:
        try:
            lo, hi = range
            request.range_min, request.range_max = float(lo), float(hi)
        except (TypeError, ValueError) as exc:
            raise _invalid(f"range must be (low, high) numbers, got {range!r}: {exc}") from None
    return Rpc("query", "Aggregate", request, _page_table)


def histogram_stats(table: pa.Table) -> dict[str, Any]:
    """What a histogram left out of its bins, from its schema metadata: ``total`` rows
    matched, ``nulls``, ``non_finite``, ``below``/``above`` an explicit range, ``min``/``max``
    of the data and the binned ``low``/``high``."""
    import json

    meta = table.schema.metadata or {}
    if b"assay.histogram" not in meta:
        raise _invalid("not a histogram table (no assay.histogram metadata)")
    return json.loads(meta[b"assay.histogram"])


def _one_of(what: str, **given: Any) -> None:
    named = [k for k, v in given.items() if v is not None]
    if len(named) != 1:
        raise _invalid(f"{what}: give exactly one of {', '.join(given)} "
                       f"(got {', '.join(named) or 'none'})")


def _some_ids(ids: str | Iterable[str] | None, what: str) -> list[str]:
    """Ids given to select rows: an empty list is refused (it would select nothing, or,
    on the wire, be read as "no selection")."""
    if ids is None:
        return []
    out = _ids(ids)
    if not out:
        raise _invalid(f"{what}: ids is empty")
    return out


def _run_id(run: Any) -> str | None:
    """A run id, or a MiningJob whose run id it is."""
    return getattr(run, "run_id", run)


def _tags(tags: str | Iterable[str], what: str) -> list[str]:
    tags = [tags] if isinstance(tags, str) else list(tags)
    bad = next((t for t in tags if not isinstance(t, str) or not t), None)
    if bad is not None:
        raise _invalid(f"{what}: tags must be non-empty strings, got {bad!r}")
    return tags


def rpc_tag_items(collection: str, ids: str | Iterable[str] | None, where: str | None,
                  run_id: Any, add: str | Iterable[str], remove: str | Iterable[str],
                  params: Mapping[str, Any] | None = None) -> Rpc:
    run_id = _run_id(run_id)
    _one_of("tag_items", ids=ids, where=where, run_id=run_id)
    add, remove = _tags(add, "tag_items add"), _tags(remove, "tag_items remove")
    if not add and not remove:
        raise _invalid("tag_items: give tags to add and/or remove")
    request = ingest_pb2.TagItemsRequest(
        collection=collection, ids=_some_ids(ids, "tag_items"),
        where=_bound(where, params) or "", run_id=run_id or "", add=add, remove=remove)
    return Rpc("ingest", "TagItems", request, lambda r: int(r.rows))


EXPORT_FORMATS: Final = {".csv": "csv", ".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "coco"}


def export_format(path: str | os.PathLike[str], format: str | None) -> str:  # noqa: A002
    """The export format: given, or from the file's extension (.csv, .jsonl, .json = COCO)."""
    if format is None:
        ext = os.path.splitext(os.fspath(path))[1].lower()
        format = EXPORT_FORMATS.get(ext)
        if format is None:
            raise _invalid(f"cannot tell the export format of {os.fspath(path)!r}: name it "
                           ".csv, .jsonl or .json (COCO), or pass format=")
    if format not in ("csv", "jsonl", "coco"):
        raise _invalid(f"export format {format!r} is not one of csv, jsonl, coco")
    return format


def rpc_export(collection: str, format: str, *, model: str | None = None,  # noqa: A002
               where: str | None = None, ids: str | Iterable[str] | None = None,
               run_id: Any = None, dataset: str | None = None,
               dataset_version: int | str | None = None, fields: Iterable[str] = (),
               min_score: float = 0.0, params: Mapping[str, Any] | None = None) -> Rpc:
    run_id = _run_id(run_id)
    named = [k for k, v in (("where", where), ("ids", ids), ("run_id", run_id), ("dataset", dataset))
             if v is not None]
    if len(named) > 1:
        raise _invalid(f"export: give at most one of where, ids, run_id, dataset (got {', '.join(named)})")
    if dataset_version is not None and dataset is None:
        raise _invalid("export: dataset_version needs dataset")
    if format == "coco" and not model:
        raise _invalid("export: COCO needs model= (the detection model whose boxes to write)")
    request = _message(
        query_pb2.ExportRequest, "export", collection=collection, format=format, model=model or "",
        where=_bound(where, params) or "", ids=_some_ids(ids, "export"),
        run_id=run_id or "", dataset=dataset or "",
        dataset_version=_version(dataset_version, "dataset_version"),
        fields=_columns(fields), min_score=min_score)
    return Rpc("query", "Export", request)


class ExportFile:
    """Export chunks written to a temporary file next to ``path``, renamed to ``path`` only
    when the last chunk has arrived: a failed export leaves no partial file."""

    def __init__(self, path: str | os.PathLike[str], format: str) -> None:  # noqa: A002
        self.path = os.fspath(path)
        self.format = format
        target = os.path.abspath(self.path)
        folder = os.path.dirname(target)
        os.makedirs(folder, exist_ok=True)
        fd, self.tmp = tempfile.mkstemp(prefix=f".{os.path.basename(target)}.", suffix=".partial",
                                        dir=folder)
        self.target = target
        self.fh = os.fdopen(fd, "wb")
        self.result: dict[str, Any] | None = None

    def __enter__(self) -> ExportFile:
        return self

    def write(self, chunk: query_pb2.ExportChunk) -> None:
        if self.result is not None:
            raise error_for("INTERNAL", "export: the server sent data after the last chunk")
        self.fh.write(chunk.data)
        if chunk.last:
            self.result = {"rows": int(chunk.rows), "annotations": int(chunk.annotations),
                           "path": self.path, "format": self.format}

    def __exit__(self, exc_type: Any, *exc: object) -> None:
        self.fh.close()
        if exc_type is None and self.result is None:
            os.unlink(self.tmp)
            raise error_for("INTERNAL", "export: the stream ended before its last chunk")
        if exc_type is not None:
            with contextlib.suppress(OSError):
                os.unlink(self.tmp)
            return
        os.replace(self.tmp, self.target)


def rpc_take(collection: str, ids: str | Iterable[str], columns: Iterable[str] | None) -> Rpc:
    request = query_pb2.TakeRequest(collection=collection, ids=_ids(ids), columns=_columns(columns))
    return Rpc("query", "Take", request, page_to_table)


def rpc_delete(collection: str, ids: str | Iterable[str] | None, where: str | None,
               params: Mapping[str, Any] | None = None) -> Rpc:
    where = _bound(where, params)
    if (ids is None) == (not where):
        raise _invalid("delete: give exactly one of ids, where")
    if ids is not None:
        ids = _ids(ids)
        if not ids:  # nothing to delete: no call
            return Rpc("ingest", "Delete", None, lambda _: 0)
    request = ingest_pb2.DeleteRequest(collection=collection, ids=ids or [], where=where or "")
    return Rpc("ingest", "Delete", request, lambda r: int(r.deleted))


def rpc_start_job(kind: str, collection: str, params: Mapping[str, Any] | None) -> Rpc:
    request = jobs_pb2.StartJobRequest(kind=kind, collection=collection,
                                       params=dict_to_struct(params))
    return Rpc("jobs", "StartJob", request, jobs=True)


def rpc_optimize(collection: str, cleanup_older_than_s: float | None) -> Rpc:
    return rpc_start_job("optimize", collection, {"cleanup_older_than_s": cleanup_older_than_s})


def rpc_build_index(collection: str, space: str, kind: str | None) -> Rpc:
    return rpc_start_job("build_index", collection, {"space": space, "kind": kind})


def rpc_recall_check(collection: str, space: str, queries: int, k: int, where: str | None,
                     tune: bool, where_params: Mapping[str, Any] | None = None) -> Rpc:
    params = {"space": space, "queries": queries, "k": k, "where": _bound(where, where_params),
              "tune": tune}
    return rpc_start_job("recall_check", collection, params)


REINDEX_PARAMS = ("model", "clip_model", "clip_pretrained", "source", "where", "batch_rows", "engine",
                  "ray_address", "ray_workers", "restart", "build_index")


def rpc_reindex(collection: str, space: str, params: Mapping[str, Any],
                where_params: Mapping[str, Any] | None = None) -> Rpc:
    unknown = sorted(set(params) - set(REINDEX_PARAMS))
    if unknown:
        raise _invalid(f"reindex: unknown parameter(s) {', '.join(unknown)} "
                       f"(allowed: {', '.join(REINDEX_PARAMS)})")
    params = dict(params)
    if where_params is not None:
        params["where"] = _bound(params.get("where"), where_params)
    return rpc_start_job("reindex", collection, {"space": space, **params})


def rpc_job(method: str, job_id: str, *, wrap: bool = False) -> Rpc:
    """GetJob, CancelJob or WatchJob; ``wrap``: answer a Job/AsyncJob, not the record."""
    return Rpc("jobs", method, jobs_pb2.JobRef(job_id=job_id), jobs=wrap)


def _job_state(state: str | int) -> int:
    if isinstance(state, str):
        try:
            return jobs_pb2.JobState.Value(state.upper())
        except ValueError:
            known = ", ".join(jobs_pb2.JobState.keys()[1:])
            raise _invalid(f"unknown job state {state!r} (known: {known})") from None
    return int(state)


def rpc_list_jobs(collection: str | None, states: Iterable[str | int] | None, limit: int) -> Rpc:
    request = jobs_pb2.ListJobsRequest(collection=collection or "", limit=limit,
                                       states=[_job_state(s) for s in states or ()])
    return Rpc("jobs", "ListJobs", request, lambda r: list(r.jobs), jobs=True)


def rpc_list_miners() -> Rpc:
    return Rpc("mining", "ListMiners", mining_pb2.ListMinersRequest(),
               lambda r: [message_to_dict(m) for m in r.miners])


def rpc_start_mining(collection: str, miner: str, size: int, model: str | None, space: str | None,
                     where: str | None, reference_where: str | None,
                     params: Mapping[str, Any] | None, seed: int | None, reverse: bool,
                     version: int | None = None,
                     where_params: Mapping[str, Any] | None = None) -> Rpc:
    """``where_params`` are bound into ``where`` and ``reference_where`` (each placeholder
    may appear in either; every param must be used by one of them)."""
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        raise _invalid(f"size must be a positive integer, got {size!r}")
    if where_params is not None:
        where, reference_where = _bind_two(where, reference_where, where_params)
    request = mining_pb2.StartMiningRequest(
        collection=collection, miner=miner, size=size, model=model or "", space=space or "",
        where=where or "", reference_where=reference_where or "", params=dict_to_struct(params),
        reverse=reverse)
    if seed is not None:
        request.seed = seed
    if version is not None:
        request.version = version
    return Rpc("mining", "StartMining", request)


def _bind_two(where: str | None, reference_where: str | None,
              params: Mapping[str, Any]) -> tuple[str | None, str | None]:
    """Bind ``params`` into two filters that share them."""
    texts = [w for w in (where, reference_where) if w]
    if not texts:
        raise _invalid("where_params were given without a filter (where / reference_where)")
    for w in texts:  # a placeholder one of them uses without a value is an error
        for name in _placeholders(w):
            if name not in params:
                raise _invalid(f"filter uses :{name} but where_params has no '{name}'")
    used = {n for w in texts for n in _placeholders(w)}
    unused = sorted(set(params) - used)
    if unused:
        raise _invalid(f"param(s) {', '.join(unused)} not used by where or reference_where")

    def bind(w: str | None) -> str | None:
        return bind_params(w, {k: params[k] for k in _placeholders(w)}) if w else w

    return bind(where), bind(reference_where)


def rpc_rerun(run: Mapping[str, Any]) -> Rpc:
    """StartMining with a recorded run's parameters, on the version it read."""
    return rpc_start_mining(run["collection"], run["miner"], int(run["size"]), run.get("model"),
                            run.get("space"), run.get("where"), run.get("reference_where"),
                            run.get("params"), int(run.get("seed", 0)), bool(run.get("reverse")),
                            int(run["version"]))


def rpc_run(method: str, run_id: str) -> Rpc:
    """GetRun or CancelRun: the MiningRun message."""
    return Rpc("mining", method, mining_pb2.RunRef(run_id=run_id))


def rpc_list_runs(collection: str | None, limit: int) -> Rpc:
    request = mining_pb2.ListRunsRequest(collection=collection or "", limit=limit)
    return Rpc("mining", "ListRuns", request, lambda r: [run_to_dict(run) for run in r.runs])


def rpc_run_results(run_id: str, columns: Iterable[str] | None, page_rows: int) -> Rpc:
    request = mining_pb2.RunResultsRequest(run_id=run_id, columns=_columns(columns), page_rows=page_rows)
    return Rpc("mining", "RunResults", request, page_to_table)


def run_to_dict(run: mining_pb2.MiningRun) -> dict[str, Any]:
    """A MiningRun as a plain dict, the state as its name."""
    out = message_to_dict(run)
    out["state"] = jobs_pb2.JobState.Name(run.state)
    out.pop("job", None)
    return out


def rpc_health(service: str) -> Rpc:
    return Rpc("health", "Check", health_pb2.HealthCheckRequest(service=service),
               lambda r: health_pb2.HealthCheckResponse.ServingStatus.Name(r.status))


# -- datasets (requests) ---------------------------------------------------------------------


def _dataset_dict(message: Message) -> dict[str, Any]:
    out = message_to_dict(message)
    if "tags" in out and isinstance(out["tags"], dict):
        out["tags"] = {k: int(v) for k, v in out["tags"].items()}
    return out


def rpc_create_dataset(name: str, collection: str, description: str) -> Rpc:
    request = _message(datasets_pb2.CreateDatasetRequest, "create_dataset", name=name,
                       collection=collection, description=description)
    return Rpc("datasets", "CreateDataset", request, _dataset_dict)


def rpc_dataset(method: str, name: str, parse: Callable[[Any], Any] = _dataset_dict) -> Rpc:
    """GetDataset, GetStatus, Discard or History: the calls that take a DatasetRef."""
    return Rpc("datasets", method, datasets_pb2.DatasetRef(name=name), parse)


def rpc_list_datasets(collection: str | None) -> Rpc:
    request = datasets_pb2.ListDatasetsRequest(collection=collection or "")
    return Rpc("datasets", "ListDatasets", request,
               lambda r: [_dataset_dict(d) for d in r.datasets])


def rpc_delete_dataset(name: str, force: bool) -> Rpc:
    request = datasets_pb2.DeleteDatasetRequest(name=name, force=force)
    return Rpc("datasets", "DeleteDataset", request, lambda _: None)


def rpc_members(method: str, dataset: str, ids: str | Iterable[str] | None, where: str | None,
                run_id: Any, params: Mapping[str, Any] | None = None) -> Rpc:
    """AddMembers or RemoveMembers: exactly one of ids, where, run_id (or a MiningJob)."""
    run_id = _run_id(run_id)
    _one_of("add" if method == "AddMembers" else "remove", ids=ids, where=where, run_id=run_id)
    request = datasets_pb2.MembersRequest(
        dataset=dataset, ids=_some_ids(ids, f"dataset {method}"),
        where=_bound(where, params) or "", run_id=run_id or "")
    return Rpc("datasets", method, request, message_to_dict)


def rpc_commit(dataset: str, message: str, author: str, allow_empty: bool) -> Rpc:
    request = _message(datasets_pb2.CommitRequest, "commit", dataset=dataset, message=message,
                       author=author, allow_empty=allow_empty)
    return Rpc("datasets", "Commit", request, message_to_dict)


def rpc_tag_version(dataset: str, version: int | str, tag: str) -> Rpc:
    if version is None:
        raise _invalid("tag: give the version to tag (a number, 'HEAD' or a tag)")
    request = _message(datasets_pb2.TagVersionRequest, "tag", dataset=dataset,
                       version=_version(version), tag=tag)
    return Rpc("datasets", "TagVersion", request, lambda r: int(r.version))


def rpc_checkout(dataset: str, version: int | str | None, columns: Iterable[str] | None,
                 page_rows: int) -> Rpc:
    request = _message(datasets_pb2.CheckoutRequest, "checkout", dataset=dataset,
                       version=_version(version), columns=_columns(columns), page_rows=page_rows)
    return Rpc("datasets", "Checkout", request, page_to_table)


def _ids_of(page: common_pb2.ArrowPage) -> list[str]:
    table = _page_table(page)
    return table.column("id").to_pylist() if "id" in table.column_names else []


def parse_diff(response: datasets_pb2.DiffResponse) -> dict[str, Any]:
    relabeled = _page_table(response.relabeled)
    if not relabeled.column_names:
        relabeled = pa.table({c: pa.array([], pa.string())
                              for c in ("id", "label_before", "label_after")})
    return {"dataset": response.dataset, "added": _ids_of(response.added),
            "removed": _ids_of(response.removed), "relabeled": relabeled}


def rpc_diff(dataset: str, v1: int | str | None, v2: int | str | None) -> Rpc:
    if v1 is None:
        raise _invalid("diff: give v1 (a committed version, 'HEAD' or a tag)")
    request = datasets_pb2.DiffRequest(dataset=dataset, v1=_version(v1, "v1"),
                                       v2=_version(v2, "v2"))
    return Rpc("datasets", "Diff", request, parse_diff)


# -- scoring: Score / Calibrate / ExportScorer (pure parts) --------------------------------


SCORER_OPTIONS: Final = ("k", "novelty", "how", "logits_temperature", "energy_temperature",
                         "detection_method", "detection_aggregate", "nms_iou", "version")


def _thresholds(thresholds: Any) -> dict[str, float]:
    """``{score: threshold}``, or what :meth:`Collection.calibrate` returned."""
    if thresholds is None:
        return {}
    if isinstance(thresholds, Mapping) and isinstance(thresholds.get("thresholds"), Mapping):
        thresholds = thresholds["thresholds"]
    if not isinstance(thresholds, Mapping):
        raise _invalid(f"thresholds must be a dict {{score: threshold}}, got {type(thresholds).__name__}")
    try:
        return {str(k): float(v) for k, v in thresholds.items()}
    except (TypeError, ValueError) as exc:
        raise _invalid(f"thresholds must be numbers: {exc}") from None


def scorer_spec(collection: str, *, model: str | None = None, space: str | None = None,
                reference_where: str | None = None, thresholds: Any = None,
                **options: Any) -> scoring_pb2.ScorerSpec:
    """What items are scored against: ``model`` (its classes), ``space`` and the reference
    set ``reference_where`` (novelty), ``thresholds`` (keep/drop) and :data:`SCORER_OPTIONS`."""
    unknown = sorted(set(options) - set(SCORER_OPTIONS))
    if unknown:
        raise _invalid(f"unknown scoring option(s) {', '.join(unknown)} (options: {', '.join(SCORER_OPTIONS)})")
    return _message(scoring_pb2.ScorerSpec, "scoring spec", collection=collection, model=model or "",
                    space=space or "", reference_where=reference_where or "",
                    thresholds=_thresholds(thresholds), **options)


def _nested_to_arrow(values: np.ndarray) -> pa.Array:
    """(N, K, C) -> list<list<float32>> (MC-dropout or committee samples)."""
    n, k, c = values.shape
    inner = pa.ListArray.from_arrays(pa.array(np.arange(0, n * k * c + 1, c, dtype=np.int32)),
                                     pa.array(np.ascontiguousarray(values, np.float32).reshape(-1)))
    return pa.ListArray.from_arrays(pa.array(np.arange(0, n * k + 1, k, dtype=np.int32)), inner)


def items_to_arrow(items: Any) -> pa.Table:
    """Items to score as Arrow: a Table/RecordBatch, a DataFrame, a list of row dicts or a
    dict of columns (``probs``/``logits`` (N, C), ``samples`` (N, K, C), ``embedding`` (N, d)
    NumPy arrays or lists; ``boxes``; ``id``)."""
    if isinstance(items, Mapping):
        items = {k: _nested_to_arrow(v) if isinstance(v, np.ndarray) and v.ndim == 3 else v
                 for k, v in items.items()}
    return to_arrow(items)


def score_requests(spec: scoring_pb2.ScorerSpec, tables: Iterable[pa.Table], batch_rows: int
                   ) -> Iterator[tuple[int, scoring_pb2.ScoreRequest]]:
    """(rows, request) per batch of at most ``batch_rows`` items; the first carries the spec."""
    if batch_rows < 1:
        raise _invalid(f"batch_rows must be >= 1, got {batch_rows}")
    seq = 0
    for table in tables:
        for start in range(0, max(1, table.num_rows), batch_rows):
            chunk = table.slice(start, batch_rows)
            request = scoring_pb2.ScoreRequest(seq=seq, arrow_ipc=table_to_ipc(chunk))
            if seq == 0:
                request.spec.CopyFrom(spec)
            seq += 1
            yield chunk.num_rows, request


def _criteria(criteria: str | Iterable[str] | None) -> list[str]:
    if criteria is None:
        return []
    return [criteria] if isinstance(criteria, str) else list(criteria)


def parse_calibration(response: scoring_pb2.CalibrateResponse) -> dict[str, Any]:
    return {"thresholds": dict(response.thresholds), "budget": response.budget,
            "kept_fraction": response.kept_fraction, "rows": int(response.rows),
            "version": int(response.version), "criteria": list(response.criteria)}


def rpc_calibrate(spec: scoring_pb2.ScorerSpec, budget: float, where: str | None,
                  criteria: str | Iterable[str] | None, max_rows: int, seed: int) -> Rpc:
    request = _message(scoring_pb2.CalibrateRequest, "calibrate", spec=spec, where=where or "",
                       budget=budget, criteria=_criteria(criteria), max_rows=max_rows, seed=seed)
    return Rpc("scoring", "Calibrate", request, parse_calibration)


def scorer_format(path: str | os.PathLike[str], format: str | None) -> str:  # noqa: A002
    fmt = format or ("json" if os.fspath(path).lower().endswith(".json") else "npz")
    if fmt not in ("npz", "json"):
        raise _invalid(f"scorer bundle format must be 'npz' or 'json', got {fmt!r}")
    return fmt


def rpc_export_scorer(spec: scoring_pb2.ScorerSpec, fmt: str, budget: float, where: str | None,
                      criteria: str | Iterable[str] | None, max_rows: int, seed: int, reference: str,
                      reference_size: int) -> Rpc:
    request = _message(scoring_pb2.ExportScorerRequest, "export_scorer", spec=spec, where=where or "",
                       budget=budget, criteria=_criteria(criteria), max_rows=max_rows, seed=seed,
                       reference=reference, reference_size=reference_size, format=fmt)
    return Rpc("scoring", "ExportScorer", request)


class ScorerFile:
    """Bundle chunks gathered, then written to ``path`` through a temporary file once the
    last chunk has arrived (a failed export leaves no partial file)."""

    def __init__(self, path: str | os.PathLike[str], fmt: str) -> None:
        self.path, self.format = os.fspath(path), fmt
        self.parts: list[bytes] = []
        self.result: dict[str, Any] | None = None

    def write(self, chunk: scoring_pb2.ExportScorerChunk) -> None:
        if self.result is not None:
            raise error_for("INTERNAL", "export_scorer: the server sent data after the last chunk")
        self.parts.append(chunk.data)
        if chunk.last:
            self.result = {"path": self.path, "format": self.format, "thresholds": dict(chunk.thresholds),
                           "reference_rows": int(chunk.reference_rows), "bytes": int(chunk.bytes),
                           "kept_fraction": chunk.kept_fraction}

    def finish(self) -> dict[str, Any]:
        if self.result is None:
            raise error_for("INTERNAL", "export_scorer: the stream ended before its last chunk")
        target = os.path.abspath(self.path)
        os.makedirs(os.path.dirname(target), exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(target)}.", suffix=".partial",
                                   dir=os.path.dirname(target))
        try:
            with os.fdopen(fd, "wb") as fh:
                for part in self.parts:
                    fh.write(part)
            os.replace(tmp, target)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
        return self.result


# -- upsert input: normalisation to Arrow and encoding into requests (pure) ---------------


def _is_dataframe(obj: Any) -> bool:
    pd = sys.modules.get("pandas")  # never imported here: a DataFrame implies pandas is loaded
    return pd is not None and isinstance(obj, pd.DataFrame)


def _matrix_to_arrow(name: str, matrix: np.ndarray) -> pa.Array:
    """A 2-D array as fixed_size_list<d> (of float32 for ``emb_*`` columns)."""
    if name.startswith("emb_"):
        matrix = matrix.astype(np.float32, copy=False)
    flat = pa.array(np.ascontiguousarray(matrix).reshape(-1))
    return pa.FixedSizeListArray.from_arrays(flat, matrix.shape[1])


def _column_to_arrow(name: str, values: Any) -> Any:
    if isinstance(values, pa.Array | pa.ChunkedArray):
        return values
    if values is None or isinstance(values, str | bytes | int | float | Mapping):
        raise _invalid(f"column '{name}': a dict of columns needs a list or array per column, "
                       f"got {type(values).__name__} (for one row, pass a list: [row])")
    if isinstance(values, np.ndarray) and values.ndim == 2:
        return _matrix_to_arrow(name, values)
    if name.startswith("emb_") and isinstance(values, list | tuple) and values \
            and all(v is not None for v in values):
        try:  # a list of equal-length vectors: stack them once instead of a list per row
            matrix = np.asarray(values, dtype=np.float32)
        except (TypeError, ValueError):
            matrix = None
        if matrix is not None and matrix.ndim == 2:
            return _matrix_to_arrow(name, matrix)
    try:
        return pa.array(values)
    except (pa.ArrowException, TypeError, ValueError) as exc:
        raise _invalid(f"column '{name}': cannot convert to Arrow: {exc}") from None


def fix_embedding_columns(table: pa.Table) -> pa.Table:
    """``emb_*`` columns as fixed_size_list<float32, d> where the vectors have one length
    (lists of floats or ints, fixed-size lists of float64 ...); other shapes are left for
    the server to reject with a row-level message."""
    for i, f in enumerate(table.schema):
        if not f.name.startswith("emb_"):
            continue
        t = f.type
        if not (pa.types.is_list(t) or pa.types.is_large_list(t) or pa.types.is_fixed_size_list(t)):
            continue
        vt = t.value_type
        if not (pa.types.is_floating(vt) or pa.types.is_integer(vt)):
            continue
        if pa.types.is_fixed_size_list(t):
            dim = t.list_size
        else:
            lengths = pc.unique(pc.drop_null(pc.list_value_length(table.column(i))))
            if len(lengths) != 1 or lengths[0].as_py() == 0:
                continue
            dim = lengths[0].as_py()
        target = pa.list_(pa.field("item", pa.float32()), dim)
        if t != target:
            table = table.set_column(i, pa.field(f.name, target, f.nullable, f.metadata),
                                     table.column(i).cast(target))
    return table


def _rows_to_columns(rows: list[Mapping[str, Any]]) -> dict[str, list[Any]]:
    names = list(dict.fromkeys(k for row in rows for k in row))
    return {n: [row.get(n) for row in rows] for n in names}


def _is_rows(data: Any) -> bool:
    return isinstance(data, list | tuple) and (not data or isinstance(data[0], Mapping))


def to_arrow(data: Any) -> pa.Table:
    """One chunk of upsert input as an Arrow table: a pyarrow Table or RecordBatch, a pandas
    DataFrame, a dict of columns (lists, numpy arrays: 2-D ones become fixed-size lists) or
    a list of row dicts."""
    if isinstance(data, pa.RecordBatch):
        table = pa.Table.from_batches([data])
    elif isinstance(data, pa.Table):
        table = data
    elif _is_dataframe(data):
        try:
            table = pa.Table.from_pandas(data, preserve_index=False).replace_schema_metadata(None)
        except (pa.ArrowException, TypeError, ValueError) as exc:
            raise _invalid(f"DataFrame: cannot convert to Arrow: {exc}") from None
    elif isinstance(data, Mapping) or _is_rows(data):
        columns = data if isinstance(data, Mapping) else _rows_to_columns(list(data))
        arrays = {str(n): _column_to_arrow(str(n), v) for n, v in columns.items()}
        try:
            table = pa.table(arrays)
        except (pa.ArrowException, ValueError) as exc:
            raise _invalid(f"columns: {exc}") from None
    else:
        raise _invalid(
            "upsert data: expected a pyarrow Table/RecordBatch, a pandas DataFrame, a dict of "
            f"columns, a list of row dicts or an iterable of those, got {type(data).__name__}"
        )
    return fix_embedding_columns(table)


def normalize_upsert_input(data: Any) -> tuple[pa.Table | None, Iterable[pa.Table]]:
    """(the whole table if ``data`` is materialised else None, the tables to send). An
    iterator (or any other iterable: a generator, a list of tables) is converted lazily, chunk
    by chunk, so it is never all in memory."""
    if isinstance(data, pa.Table | pa.RecordBatch | Mapping) or _is_dataframe(data) \
            or _is_rows(data):
        table = to_arrow(data)
        return table, [table]
    if isinstance(data, Iterable) and not isinstance(data, str | bytes):
        return None, (to_arrow(chunk) for chunk in data)
    return to_arrow(data), []  # raises the "expected ..." error


@dataclass(frozen=True)
class EncodedBatch:
    """One upsert request's payload: ``rows`` rows from ``offset`` of the input, as IPC."""

    seq: int
    offset: int
    rows: int
    ipc: bytes


def _fit(table: pa.Table, limit: int) -> Iterator[tuple[pa.Table, bytes]]:
    """``table`` as IPC pieces of at most ``limit`` bytes, halving rows until each fits."""
    ipc = table_to_ipc(table)
    if len(ipc) <= limit:
        yield table, ipc
        return
    if table.num_rows <= 1:
        has_id = "id" in table.column_names and table.num_rows
        first_id = table.column("id")[0].as_py() if has_id else None
        raise _invalid(
            f"upsert: one row (id {first_id!r}) is {len(ipc)} bytes as Arrow IPC, over the "
            f"{limit}-byte request budget; raise max_message_bytes (client and server)"
        )
    half = table.num_rows // 2
    yield from _fit(table.slice(0, half), limit)
    yield from _fit(table.slice(half), limit)


def encode_batches(
    tables: Iterable[pa.Table],
    *,
    batch_rows: int,
    max_message_bytes: int,
    start_seq: int = 0,
    start_offset: int = 0,
) -> Iterator[EncodedBatch]:
    """Slice ``tables`` into batches of at most ``batch_rows`` rows whose requests stay under
    ``max_message_bytes``; numbered from ``start_seq``, row offsets from ``start_offset``."""
    if batch_rows < 1:
        raise _invalid(f"batch_rows must be >= 1, got {batch_rows}")
    limit = max(1024, max_message_bytes - _REQUEST_ENVELOPE)
    seq, offset = start_seq, start_offset
    for table in tables:
        for start in range(0, table.num_rows, batch_rows):
            for part, ipc in _fit(table.slice(start, batch_rows), limit):
                yield EncodedBatch(seq, offset, part.num_rows, ipc)
                seq += 1
                offset += part.num_rows


@dataclass
class UpsertSummary:
    """What an upsert did, summed over its acknowledged batches."""

    inserted: int = 0
    updated: int = 0
    version: int = 0  # table version after the last batch
    batches: int = 0
    generated_ids: int = 0
    rows: int = 0
    new_columns: list[str] = field(default_factory=list)


class UpsertRun:
    """One upsert, for the sync and the async stream alike: its batches, those in flight,
    the acknowledgements (checked to come in order), the summary, the progress bar, and
    whether to resume after UNAVAILABLE: only a materialised input whose rows all have ids
    is resumed, from its first unacknowledged batch (see the module docstring)."""

    def __init__(self, collection: str, data: Any, *, batch_rows: int, max_message_bytes: int,
                 progress: bool, retry: RetryPolicy) -> None:
        self.collection = collection
        self.table, self._tables = normalize_upsert_input(data)
        self._encode = partial(encode_batches, batch_rows=batch_rows,
                               max_message_bytes=max_message_bytes)
        self.resumable = (self.table is not None and "id" in self.table.column_names
                          and self.table.column("id").null_count == 0)
        self._delays = retry.backoff()
        self._started = False
        self.summary = UpsertSummary()
        self.pending: deque[EncodedBatch] = deque()  # sent, not acknowledged (payloads dropped)
        self.resume_seq = 0  # the first batch not acknowledged ...
        self.resume_offset = 0  # ... and its row offset in the input
        self.failure: BaseException | None = None  # raised while producing requests
        self.call: Any = None  # the stream in flight
        self.aborted = False
        total = None if self.table is None else self.table.num_rows
        self.bar = Progress(progress, total=total, desc="upsert", unit="rows")

    def __enter__(self) -> UpsertRun:
        return self

    def __exit__(self, *exc: object) -> None:
        self.bar.close()

    def batches(self) -> Iterator[EncodedBatch]:
        """All batches on the first call; on the next ones those not acknowledged yet."""
        self.pending.clear()
        if self.table is not None:
            return self._encode([self.table.slice(self.resume_offset)], start_seq=self.resume_seq,
                                start_offset=self.resume_offset)
        if self._started:
            raise RuntimeError("an iterator input cannot be replayed")
        self._started = True
        return self._encode(self._tables)

    @property
    def in_flight(self) -> int:
        return len(self.pending)

    def abort(self) -> None:
        """Stop from another thread: cancel the stream in flight and resume nothing."""
        self.aborted = True
        if self.call is not None:
            self.call.cancel()

    def request(self, batch: EncodedBatch) -> ingest_pb2.UpsertRequest:
        self.pending.append(replace(batch, ipc=b""))
        return ingest_pb2.UpsertRequest(collection=self.collection, seq=batch.seq,
                                        arrow_ipc=batch.ipc)

    def ack(self, ack: ingest_pb2.UpsertAck) -> None:
        expected = self.pending[0].seq if self.pending else None
        if ack.seq != expected:
            raise error_for("INTERNAL", f"upsert: acknowledgement for batch {ack.seq}, "
                                        f"expected {expected}")
        batch = self.pending.popleft()
        s = self.summary
        s.inserted += ack.inserted
        s.updated += ack.updated
        s.version = ack.version
        s.generated_ids += ack.generated_ids
        s.new_columns.extend(ack.new_columns)
        s.batches += 1
        s.rows += batch.rows
        self.resume_seq, self.resume_offset = batch.seq + 1, batch.offset + batch.rows
        self.bar.update(s.rows, f"v{s.version}")

    def retry_delay(self, exc: grpc.RpcError) -> float:
        """The sleep before resuming after a failed stream; raises the error (with the
        committed part in ``details["committed"]``) when the upsert cannot be resumed."""
        resume = self.resumable and not self.aborted and is_retryable(exc)
        delay = next(self._delays, None) if resume else None
        if delay is None:
            err = error_from_rpc(exc)
            err.details["committed"] = replace(self.summary,
                                               new_columns=list(self.summary.new_columns))
            raise err from None
        return delay

    def finish(self) -> UpsertSummary:
        if self.failure is not None:
            raise self.failure
        if self.pending:
            raise error_for("INTERNAL", f"upsert: the server ended the stream with "
                                        f"{len(self.pending)} batch(es) unacknowledged "
                                        f"(seq {self.pending[0].seq} on)")
        return self.summary


# -- progress display ------------------------------------------------------------------------


class Progress:
    """A tqdm bar when ``enabled`` and tqdm is installed, else a throttled stderr line."""

    def __init__(self, enabled: bool, *, total: float | None, desc: str, unit: str) -> None:
        self.enabled, self.total, self.desc, self.unit = enabled, total, desc, unit
        self._bar: Any = None
        self._last = 0.0
        if enabled:
            try:
                from tqdm.auto import tqdm
            except ImportError:
                return
            self._bar = tqdm(total=total, desc=desc, unit=unit, leave=True)

    def update(self, done: float, status: str = "") -> None:
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.n = done
            self._bar.set_postfix_str(status, refresh=False)
            self._bar.refresh()
        elif time.monotonic() - self._last >= 0.5 or done == self.total:
            self._last = time.monotonic()
            of = f"/{self.total:g}" if self.total else ""
            sys.stderr.write(f"\r{self.desc}: {done:g}{of} {self.unit} {status}".ljust(60))
            sys.stderr.flush()

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        elif self.enabled:
            sys.stderr.write("\n")
        self.enabled = False


# -- jobs ------------------------------------------------------------------------------------

_TERMINAL: Final = frozenset({"SUCCEEDED", "FAILED", "CANCELLED", "INTERRUPTED"})
# The code wait() raises for a job that ended badly without an error_code of its own.
_END_CODES: Final = {"FAILED": "UNKNOWN", "CANCELLED": "CANCELLED", "INTERRUPTED": "ABORTED"}


class _JobView:
    """A job record (``jobs_pb2.Job`` in ``proto``) as attributes; base of Job and AsyncJob."""

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


class _Waiter:
    """What Job.wait and AsyncJob.wait decide: the deadline, the progress bar, and whether
    to watch again after an error."""

    def __init__(self, job: _JobView, timeout: float | None, progress: bool) -> None:
        self.job, self.timeout = job, timeout
        self.deadline = None if timeout is None else time.monotonic() + timeout
        self.reconnects = job._client.retry.backoff()
        self.bar = Progress(progress, total=100, desc=f"{job.kind} {job.id[:8]}", unit="%")

    def __enter__(self) -> _Waiter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.bar.close()

    def remaining(self) -> float | None:
        return None if self.deadline is None else max(0.0, self.deadline - time.monotonic())

    def seen(self, snapshot: _JobView) -> bool:
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


class Job(_JobView):
    """A server-side job (optimize, build_index, recall_check ...). Its attributes are the
    last record fetched: ``refresh()``, ``cancel()``, ``watch()`` and ``wait()`` update them."""

    def refresh(self, *, timeout: Timeout = DEFAULT) -> Job:
        self.proto = self._client._unary(rpc_job("GetJob", self.id), timeout)
        return self

    def cancel(self, *, timeout: Timeout = DEFAULT) -> Job:
        """Ask the job to stop; it ends CANCELLED at its next checkpoint."""
        self.proto = self._client._unary(rpc_job("CancelJob", self.id), timeout)
        return self

    def watch(self, *, timeout: float | None = None) -> Iterator[Job]:
        """The job now and at every change until it ends (a new snapshot each time)."""
        for proto in self._client._stream(rpc_job("WatchJob", self.id), timeout):
            self.proto = proto
            yield Job(self._client, proto)

    def wait(self, timeout: float | None = None, progress: bool = False) -> Job:
        """Block until the job ends and return it if SUCCEEDED; else raise AssayClientError
        (the subclass of the job's error_code; ``err.details["job"]`` is the job).
        DeadlineExceededError after ``timeout`` s (the job keeps running). ``progress``: show
        a bar (tqdm if installed, else a line on stderr)."""
        with _Waiter(self, timeout, progress) as waiter:
            while not self.done:
                try:
                    for snapshot in self.watch(timeout=waiter.remaining()):
                        if waiter.seen(snapshot):
                            break
                    else:  # the stream ended early: read the record
                        self.refresh()
                except (DeadlineExceededError, UnavailableError) as exc:
                    time.sleep(waiter.after(exc))
        self._check_ended()
        return self


class AsyncJob(_JobView):
    """:class:`Job` for :class:`AsyncClient`: ``await job.refresh()``, ``await job.wait()``,
    ``async for snapshot in job.watch()``."""

    async def refresh(self, *, timeout: Timeout = DEFAULT) -> AsyncJob:
        self.proto = await self._client._unary(rpc_job("GetJob", self.id), timeout)
        return self

    async def cancel(self, *, timeout: Timeout = DEFAULT) -> AsyncJob:
        self.proto = await self._client._unary(rpc_job("CancelJob", self.id), timeout)
        return self

    async def watch(self, *, timeout: float | None = None) -> AsyncIterator[AsyncJob]:
        async for proto in self._client._stream(rpc_job("WatchJob", self.id), timeout):
            self.proto = proto
            yield AsyncJob(self._client, proto)

    async def wait(self, timeout: float | None = None, progress: bool = False) -> AsyncJob:
        """See :meth:`Job.wait`."""
        with _Waiter(self, timeout, progress) as waiter:
            while not self.done:
                try:
                    async for snapshot in self.watch(timeout=waiter.remaining()):
                        if waiter.seen(snapshot):
                            break
                    else:
                        await self.refresh()
                except (DeadlineExceededError, UnavailableError) as exc:
                    await asyncio.sleep(waiter.after(exc))
        self._check_ended()
        return self


class MiningJob(Job):
    """A mining run's job: a :class:`Job` (wait, watch, cancel) plus the run's ``run_id``,
    ``run()`` (its record: miner, parameters, version read, row counts, timings, and
    ``graph``: the k-NN graphs it used by role — method, k, recall@k on a sample) and
    ``results(columns)`` (``id, rank, score`` + collection columns, as a pyarrow Table)."""

    def __init__(self, client: Any, run: mining_pb2.MiningRun) -> None:
        super().__init__(client, run.job)
        self.run_id = run.run_id
        self.run_collection = run.collection or run.job.collection

    def run(self, *, timeout: Timeout = DEFAULT) -> dict[str, Any]:
        return run_to_dict(self._client._unary(rpc_run("GetRun", self.run_id), timeout))

    def results(self, columns: Iterable[str] | None = None, page_rows: int = 8192, *,
                timeout: float | None = None) -> pa.Table:
        """The selected rows by rank (FailedPreconditionError until the run SUCCEEDED)."""
        rpc = rpc_run_results(self.run_id, columns, page_rows)
        return concat_pages(list(self._client._stream(rpc, timeout)))

    def rerun(self, *, timeout: Timeout = DEFAULT) -> MiningJob:
        """A new run with this run's miner, parameters, filters and seed, on the collection
        version this run read: its results are the same."""
        return MiningJob(self._client, self._client._unary(rpc_rerun(self.run()), timeout))

    def tag(self, add: str | Iterable[str] = ("to-label",), remove: str | Iterable[str] = (), *,
            timeout: Timeout = DEFAULT) -> int:
        """Tag the rows this run selected (default ``to-label``); returns the rows changed."""
        rpc = rpc_tag_items(self.run_collection, None, None, self.run_id, add, remove)
        return self._client._unary(rpc, timeout)

    def show(self, limit: int = 60, *, size: int = 160, web_url: str | None = None,
             timeout: float | None = None) -> Grid:
        """The run's first ``limit`` picks as a grid of cards (rank, score, label, top
        prediction, thumbnail or text) that Jupyter renders; waits up to ``timeout`` s for
        a run still in progress. Thumbnails (``size`` px: 64, 96, 128, 160, 256 or 384) come
        from the server's web port (``web_url``, default the client's) or, without one,
        from local image files. ``job.show().save("picks.html")`` writes a standalone page.
        See :mod:`service.notebook`."""
        from service.notebook import show_run

        return show_run(self._client, self, limit, size=size, web_url=web_url, timeout=timeout)


class AsyncMiningJob(AsyncJob):
    """:class:`MiningJob` for :class:`AsyncClient`."""

    def __init__(self, client: Any, run: mining_pb2.MiningRun) -> None:
        super().__init__(client, run.job)
        self.run_id = run.run_id
        self.run_collection = run.collection or run.job.collection

    async def run(self, *, timeout: Timeout = DEFAULT) -> dict[str, Any]:
        return run_to_dict(await self._client._unary(rpc_run("GetRun", self.run_id), timeout))

    async def results(self, columns: Iterable[str] | None = None, page_rows: int = 8192, *,
                      timeout: float | None = None) -> pa.Table:
        rpc = rpc_run_results(self.run_id, columns, page_rows)
        return concat_pages([page async for page in self._client._stream(rpc, timeout)])

    async def rerun(self, *, timeout: Timeout = DEFAULT) -> AsyncMiningJob:
        run = await self.run()
        return AsyncMiningJob(self._client, await self._client._unary(rpc_rerun(run), timeout))

    async def tag(self, add: str | Iterable[str] = ("to-label",), remove: str | Iterable[str] = (),
                  *, timeout: Timeout = DEFAULT) -> int:
        rpc = rpc_tag_items(self.run_collection, None, None, self.run_id, add, remove)
        return await self._client._unary(rpc, timeout)

    async def show(self, limit: int = 60, *, size: int = 160, web_url: str | None = None,
                   timeout: float | None = None) -> Grid:
        """See :meth:`MiningJob.show` (built by a sync client in a worker thread)."""
        from service.notebook import show_run

        blocking = self._client._blocking()
        return await asyncio.to_thread(show_run, blocking, self.run_id, limit, size=size, web_url=web_url,
                                       timeout=timeout)


# -- channel ---------------------------------------------------------------------------------


def channel_options(
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
    server_name_override: str | None = None,
    extra: Iterable[tuple[str, Any]] = (),
) -> list[tuple[str, Any]]:
    """Channel arguments: the message limit both ways; keepalive pings after 60 s without
    activity (20 s to answer), only while calls are in flight (servers refuse more by default)."""
    options: list[tuple[str, Any]] = [
        ("grpc.max_send_message_length", max_message_bytes),
        ("grpc.max_receive_message_length", max_message_bytes),
        ("grpc.keepalive_time_ms", 60_000),
        ("grpc.keepalive_timeout_ms", 20_000),
        ("grpc.keepalive_permit_without_calls", 0),
        ("grpc.primary_user_agent", "assay-client/0.1"),
    ]
    if server_name_override:
        options.append(("grpc.ssl_target_name_override", server_name_override))
    return [*options, *extra]


def _pem(value: bytes | str | os.PathLike[str] | None) -> bytes | None:
    """PEM bytes from PEM bytes, PEM text or a file path."""
    if value is None or isinstance(value, bytes):
        return value
    if isinstance(value, str) and value.lstrip().startswith("-----BEGIN"):
        return value.encode()
    with open(value, "rb") as f:
        return f.read()


def channel_credentials(tls: bool, root_certificates: bytes | str | os.PathLike[str] | None = None,
                        client_cert: bytes | str | os.PathLike[str] | None = None,
                        client_key: bytes | str | os.PathLike[str] | None = None,
                        ) -> grpc.ChannelCredentials | None:
    """None for plain text; else TLS with these roots (PEM bytes, PEM text or a file path;
    None = the system's), presenting ``client_cert``/``client_key`` to a server that
    requires mutual TLS."""
    if not tls:
        return None
    if (client_cert is None) != (client_key is None):
        raise _invalid("mutual TLS needs both client_cert and client_key")
    return grpc.ssl_channel_credentials(root_certificates=_pem(root_certificates),
                                        private_key=_pem(client_key), certificate_chain=_pem(client_cert))


def auth_metadata(token: str | None) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {token}"),) if token else ()


def _stubs(channel: grpc.Channel | grpc.aio.Channel) -> dict[str, Any]:
    """Generated stubs work on sync and aio channels alike."""
    return {
        "collections": collections_pb2_grpc.CollectionsStub(channel),
        "ingest": ingest_pb2_grpc.IngestStub(channel),
        "search": search_pb2_grpc.SearchStub(channel),
        "query": query_pb2_grpc.QueryStub(channel),
        "jobs": jobs_pb2_grpc.JobsStub(channel),
        "mining": mining_pb2_grpc.MiningStub(channel),
        "datasets": datasets_pb2_grpc.DatasetsStub(channel),
        "scoring": scoring_pb2_grpc.ScoringStub(channel),
        "health": health_pb2_grpc.HealthStub(channel),
    }


class _BaseClient:
    """Settings and the parts of a call that do not wait: shared by Client and AsyncClient."""

    _job_type: type[_JobView] = _JobView

    def __init__(
        self,
        target: str = "127.0.0.1:50051",
        token: str | None = None,
        tls: bool = False,
        root_certificates: bytes | str | os.PathLike[str] | None = None,
        timeout: float | None = 30.0,
        retries: int = 4,
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
        *,
        server_name_override: str | None = None,
        options: Iterable[tuple[str, Any]] = (),
        client_cert: bytes | str | os.PathLike[str] | None = None,
        client_key: bytes | str | os.PathLike[str] | None = None,
        web_url: str | None = None,
    ) -> None:
        self._settings = dict(
            target=target, token=token, tls=tls, root_certificates=root_certificates,
            timeout=timeout, retries=retries, max_message_bytes=max_message_bytes,
            server_name_override=server_name_override, options=list(options),
            client_cert=client_cert, client_key=client_key, web_url=web_url,
        )
        self.target = target
        self.web_url = web_url
        self.timeout = timeout
        self.retry = RetryPolicy(retries=retries)
        self.max_message_bytes = max_message_bytes
        self._metadata = auth_metadata(token)
        self._credentials = channel_credentials(tls, root_certificates, client_cert, client_key)
        self._options = channel_options(max_message_bytes, server_name_override, options)
        self._connect()

    def _connect(self) -> None:
        """Open the channel (AsyncClient opens it on first use, in the running loop)."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.target!r})"

    def _open(self, module: Any) -> Any:
        """A channel from ``grpc`` or ``grpc.aio`` (same factory signatures)."""
        if self._credentials is None:
            return module.insecure_channel(self.target, options=self._options)
        return module.secure_channel(self.target, self._credentials, options=self._options)

    def _deadline(self, timeout: Timeout) -> float | None:
        return self.timeout if isinstance(timeout, _Default) else timeout

    def _result(self, rpc: Rpc, response: Any) -> Any:
        result = rpc.parse(response)
        if rpc.jobs:
            wrap = partial(self._job_type, self)
            return [wrap(j) for j in result] if isinstance(result, list) else wrap(result)
        return result

    def _upsert_run(self, collection: str, data: Any, batch_rows: int, progress: bool) -> UpsertRun:
        return UpsertRun(collection, data, batch_rows=batch_rows, progress=progress,
                         max_message_bytes=self.max_message_bytes, retry=self.retry)


# -- sync client -----------------------------------------------------------------------------


class Client(_BaseClient):
    """Blocking client; thread-safe (one channel, shared by all threads).

    target: "host:port". token: sent as ``authorization: Bearer <token>`` on every call.
    tls: use TLS, with ``root_certificates`` (PEM bytes, PEM text or a file path; None = the
    system roots) and ``server_name_override`` (the name in the server's certificate);
    ``client_cert``/``client_key`` (PEM) for a server that requires mutual TLS.
    timeout: default deadline of unary calls in seconds (None = none). retries: UNAVAILABLE
    retries. max_message_bytes: the largest message sent or received (the server's limits
    should be as large). options: extra gRPC channel arguments. web_url: the server's web
    port (``http://host:port/``), where :meth:`show` gets thumbnails by default.
    """

    _job_type = Job

    def _connect(self) -> None:
        self._channel = self._open(grpc)
        self._stub = _stubs(self._channel)

    # plumbing: each public method is a builder (rpc_*) and one of these

    def _unary(self, rpc: Rpc, timeout: Timeout) -> Any:
        if rpc.request is None:
            return rpc.parse(None)
        method = getattr(self._stub[rpc.service], rpc.method)
        deadline = self._deadline(timeout)
        response = call_with_retries(
            self.retry, lambda: method(rpc.request, timeout=deadline, metadata=self._metadata))
        return self._result(rpc, response)

    def _stream(self, rpc: Rpc, timeout: Timeout) -> Iterator[Any]:
        """A server stream, retried on UNAVAILABLE until its first message has arrived."""
        method = getattr(self._stub[rpc.service], rpc.method)
        deadline = self._deadline(timeout)

        def start() -> tuple[Any, Any]:
            call = method(rpc.request, timeout=deadline, metadata=self._metadata)
            return call, next(call, _END)

        call, message = call_with_retries(self.retry, start)
        try:
            while message is not _END:
                yield self._result(rpc, message)
                message = next(call, _END)
        except grpc.RpcError as exc:
            raise error_from_rpc(exc) from None
        finally:
            call.cancel()  # the consumer stopped early (a no-op once the stream has ended)

    def _upsert(self, collection: str, data: Any, batch_rows: int, progress: bool,
                timeout: float | None) -> UpsertSummary:
        with self._upsert_run(collection, data, batch_rows, progress) as run:
            return self._drive_upsert(run, timeout)

    def _drive_upsert(self, run: UpsertRun, timeout: float | None) -> UpsertSummary:
        """Stream the run's batches, resuming after UNAVAILABLE where that is safe."""
        while True:
            try:
                self._upsert_stream(run, run.batches(), timeout)
                return run.finish()
            except grpc.RpcError as exc:
                delay = run.retry_delay(exc)
            time.sleep(delay)

    def _upsert_stream(self, run: UpsertRun, batches: Iterator[EncodedBatch],
                       timeout: float | None) -> None:
        """One Upsert stream: requests produced on gRPC's thread, at most _UPSERT_WINDOW of
        them unacknowledged; acknowledgements read here as they arrive."""
        first = next(batches, None)  # encode (and check) the first batch before calling
        if first is None:
            return
        cond = threading.Condition()
        closed = False

        def requests() -> Iterator[ingest_pb2.UpsertRequest]:
            try:
                for batch in itertools.chain([first], batches):
                    with cond:
                        cond.wait_for(lambda: closed or run.in_flight < _UPSERT_WINDOW)
                        if closed:
                            return
                        request = run.request(batch)
                    yield request
            except Exception as exc:  # gRPC would swallow it: run.finish() raises it
                run.failure = exc

        call = run.call = self._stub["ingest"].Upsert(requests(), timeout=timeout,
                                                      metadata=self._metadata)
        if run.aborted:
            call.cancel()
        try:
            for ack in call:
                with cond:
                    run.ack(ack)
                    cond.notify_all()
        except BaseException:
            call.cancel()
            raise
        finally:
            with cond:
                closed = True
                cond.notify_all()

    def _score_stream(self, spec: scoring_pb2.ScorerSpec, tables: Iterable[pa.Table], batch_rows: int,
                      timeout: float | None) -> Iterator[pa.Table]:
        """One Score stream: requests produced on gRPC's thread, one scored table per batch.
        Not retried (the items are not stored anywhere to resume from)."""
        requests = (request for _, request in score_requests(spec, tables, batch_rows))
        call = self._stub["scoring"].Score(requests, timeout=timeout, metadata=self._metadata)
        try:
            for response in call:
                yield ipc_to_table(response.arrow_ipc)
        except grpc.RpcError as exc:
            raise error_from_rpc(exc) from None
        finally:
            call.cancel()

    # public API

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._channel.close()

    def health(self, service: str = "", *, timeout: Timeout = DEFAULT) -> str:
        """grpc.health.v1 status: "SERVING", "NOT_SERVING", ... (service "" = the server)."""
        return self._unary(rpc_health(service), timeout)

    def list_collections(self, *, timeout: Timeout = DEFAULT) -> list[str]:
        return self._unary(rpc_list_collections(), timeout)

    def create_collection(
        self,
        name: str,
        spaces: Mapping[str, int | Mapping[str, Any]] | None = None,
        models: Mapping[str, list[str] | Mapping[str, Any]] | None = None,
        fields: Mapping[str, str] | None = None,
        if_not_exists: bool = False,
        *,
        timeout: Timeout = DEFAULT,
    ) -> Collection:
        """Create a collection: ``spaces`` name -> dim or {dim, metric, model, normalized,
        index}; ``models`` name -> class names or {classes, task}; ``fields`` name -> Arrow
        type name. AlreadyExistsError unless ``if_not_exists``."""
        rpc = rpc_create_collection(name, spaces, models, fields, if_not_exists)
        self._unary(rpc, timeout)
        return self.collection(name)

    def collection(self, name: str) -> Collection:
        """A handle on a collection (no call is made)."""
        return Collection(self, name)

    def drop_collection(self, name: str, *, timeout: Timeout = DEFAULT) -> None:
        self._unary(rpc_drop(name), timeout)

    def start_job(self, kind: str, collection: str, params: Mapping[str, Any] | None = None, *,
                  timeout: Timeout = DEFAULT) -> Job:
        """Start a job ("optimize", "build_index", "recall_check" ...); None params are left out."""
        return self._unary(rpc_start_job(kind, collection, params), timeout)

    def job(self, job_id: str, *, timeout: Timeout = DEFAULT) -> Job:
        return self._unary(rpc_job("GetJob", job_id, wrap=True), timeout)

    def list_jobs(self, collection: str | None = None, states: Iterable[str | int] | None = None,
                  limit: int = 100, *, timeout: Timeout = DEFAULT) -> list[Job]:
        """Most recent first; ``states`` as names ("RUNNING") or JobState numbers."""
        return self._unary(rpc_list_jobs(collection, states, limit), timeout)

    def miners(self, *, timeout: Timeout = DEFAULT) -> list[dict[str, Any]]:
        """The server's miners: name, family, description, inputs, params."""
        return self._unary(rpc_list_miners(), timeout)

    def mining_job(self, run_id: str, *, timeout: Timeout = DEFAULT) -> MiningJob:
        """The job of an earlier run (e.g. to read its results again)."""
        return MiningJob(self, self._unary(rpc_run("GetRun", run_id), timeout))

    def runs(self, collection: str | None = None, limit: int = 100, *,
             timeout: Timeout = DEFAULT) -> list[dict[str, Any]]:
        """Mining run records, most recent first."""
        return self._unary(rpc_list_runs(collection, limit), timeout)

    def create_dataset(self, name: str, collection: str, description: str = "", *,
                       timeout: Timeout = DEFAULT) -> Dataset:
        """Create an empty versioned dataset of ``collection`` (AlreadyExistsError if taken)."""
        self._unary(rpc_create_dataset(name, collection, description), timeout)
        return self.dataset(name)

    def dataset(self, name: str) -> Dataset:
        """A handle on a dataset (no call is made)."""
        return Dataset(self, name)

    def datasets(self, collection: str | None = None, *,
                 timeout: Timeout = DEFAULT) -> list[dict[str, Any]]:
        """The datasets (of ``collection`` if given), by name, as dicts (see Dataset.info)."""
        return self._unary(rpc_list_datasets(collection), timeout)

    def show(self, obj: MiningJob | str | pa.Table | Any, *, collection: str | None = None, limit: int = 60,
             size: int = 160, web_url: str | None = None, timeout: float | None = None) -> Grid:
        """A grid of items that Jupyter renders: a mining run's picks (a MiningJob or a run
        id; see :meth:`MiningJob.show`) or the first ``limit`` rows of a result table with an
        ``id`` column (search, query, take; give ``collection=``). ``.html``, ``.items`` and
        ``.save(path)`` work outside Jupyter too.

            client = Client("127.0.0.1:50051", web_url="http://127.0.0.1:8080/")
            client.show(col.search("clip", v, k=24), collection=col.name)
        """
        from service.notebook import show

        return show(self, obj, collection=collection, limit=limit, size=size, web_url=web_url, timeout=timeout)


class Collection:
    """A collection on the server, used through its :class:`Client`."""

    def __init__(self, client: Client, name: str) -> None:
        self.client = client
        self.name = name

    def __repr__(self) -> str:
        return f"Collection({self.name!r})"

    def describe(self, *, timeout: Timeout = DEFAULT) -> dict[str, Any]:
        """CollectionInfo as a dict: name, uri, rows, version, spaces, models, fields,
        indices, tags."""
        return self.client._unary(rpc_describe(self.name), timeout)

    def add_space(self, name: str, dim: int, metric: str = "cosine", model: str | None = None,
                  normalized: bool | None = None, index: Mapping[str, Any] | None = None, *,
                  timeout: Timeout = DEFAULT) -> dict[str, Any]:
        """Register an embedding space (column ``emb_<name>``); returns describe()."""
        rpc = rpc_add_space(self.name, name, dim, metric, model, normalized, index)
        return self.client._unary(rpc, timeout)

    def add_model(self, name: str, classes: Iterable[str], task: str = "classification", *,
                  timeout: Timeout = DEFAULT) -> dict[str, Any]:
        """Register a model (column ``pred_<name>``); returns describe()."""
        return self.client._unary(rpc_add_model(self.name, name, classes, task), timeout)

    def upsert(self, data: Any, batch_rows: int = 10_000, progress: bool = False, *,
               timeout: float | None = None) -> UpsertSummary:
        """Insert or update rows by ``id``, streamed in batches of at most ``batch_rows`` rows
        (and under max_message_bytes). ``data``: Arrow Table/RecordBatch, DataFrame, dict of
        columns, list of row dicts, or an iterable of those (converted chunk by chunk).
        A batch the server rejects raises InvalidArgumentError; the batches before it are
        committed (``err.details["committed"]``)."""
        return self.client._upsert(self.name, data, batch_rows, progress, timeout)

    def search(
        self,
        space: str,
        vector: Any = None,
        *,
        ids: str | Iterable[str] | None = None,
        text: str | None = None,
        texts: Iterable[str] | None = None,
        k: int = 10,
        where: str | None = None,
        columns: Iterable[str] | None = None,
        nprobes: int | None = None,
        refine_factor: int | None = None,
        exact: bool = False,
        params: Mapping[str, Any] | None = None,
        timeout: Timeout = DEFAULT,
    ) -> pa.Table:
        """k nearest neighbours in ``space`` of a vector (1-D), a batch of vectors (2-D),
        stored items (``ids``) or ``text``/``texts``. Columns: the requested ones (default:
        all but vectors and predictions), ``_distance`` and, for several queries,
        ``query_index``; sorted by query, then distance. ``where`` is a prefilter (with
        ``params`` bound into its ``:name`` placeholders, see :func:`bind_params`)."""
        rpc = rpc_search(self.name, space, vector=vector, ids=ids, text=text, texts=texts, k=k,
                         where=where, columns=columns, nprobes=nprobes, refine_factor=refine_factor,
                         exact=exact, params=params)
        return self.client._unary(rpc, timeout)

    def scan(self, where: str | None = None, columns: Iterable[str] | None = None,
             page_rows: int = 8192, *, version: int | str | None = None,
             params: Mapping[str, Any] | None = None,
             timeout: float | None = None) -> Iterator[pa.Table]:
        """The rows matching ``where`` (``params`` bound into it), page by page, at
        ``version`` (a number or tag; default the current one)."""
        rpc = rpc_scan(self.name, where, columns, page_rows, version=version, params=params)
        return self.client._stream(rpc, timeout)

    def query(self, where: str | None = None, columns: Iterable[str] | None = None,
              limit: int | None = None, offset: int = 0, page_rows: int = 8192, *,
              version: int | str | None = None, params: Mapping[str, Any] | None = None,
              timeout: float | None = None) -> pa.Table:
        """The rows matching ``where`` as one table (default columns: all but vectors and
        predictions)."""
        rpc = rpc_scan(self.name, where, columns, page_rows, limit, offset, version, params)
        return concat_pages(list(self.client._stream(rpc, timeout)))

    def count(self, where: str | None = None, *, version: int | str | None = None,
              params: Mapping[str, Any] | None = None, timeout: Timeout = DEFAULT) -> int:
        return self.client._unary(rpc_count(self.name, where, version, params), timeout)

    def page(self, where: str | None = None, columns: Iterable[str] | None = None,
             page_rows: int = 1000, cursor: str | None = None, version: int | str | None = None,
             params: Mapping[str, Any] | None = None, *, timeout: Timeout = DEFAULT) -> Page:
        """One page of the rows matching ``where`` and the cursor of the next
        (``page.next_cursor``, "" after the last). The first page pins the collection
        version: the following pages read it too, however others write meanwhile. Pass the
        same ``where``/``params`` and ``columns`` with a cursor (another filter is
        INVALID_ARGUMENT)."""
        rpc = rpc_page(self.name, where, columns, page_rows, cursor, version, params)
        return self.client._unary(rpc, timeout)

    def pages(self, where: str | None = None, columns: Iterable[str] | None = None,
              page_rows: int = 1000, cursor: str | None = None,
              version: int | str | None = None, params: Mapping[str, Any] | None = None, *,
              timeout: Timeout = DEFAULT) -> Iterator[Page]:
        """Every :meth:`page` from ``cursor`` (default the first) to the last; each call
        has its own deadline. Keep ``page.next_cursor`` to resume later."""
        while True:
            page = self.page(where, columns, page_rows, cursor, version, params, timeout=timeout)
            yield page
            if page.last:
                return
            cursor = page.next_cursor

    # analytics: small pyarrow Tables computed on the server over streamed rows

    def label_distribution(self, where: str | None = None,
                           group_by: str | Iterable[str] | None = None,
                           version: int | str | None = None, *,
                           params: Mapping[str, Any] | None = None,
                           timeout: Timeout = DEFAULT) -> pa.Table:
        """Rows per label: ``label`` (null = unlabeled), the ``group_by`` columns, ``count``."""
        rpc = rpc_aggregate(self.name, "label_distribution", where=where, group_by=group_by,
                            version=version, params=params)
        return self.client._unary(rpc, timeout)

    def confused_pairs(self, model: str, where: str | None = None, top: int = 20, *,
                       version: int | str | None = None, params: Mapping[str, Any] | None = None,
                       timeout: Timeout = DEFAULT) -> pa.Table:
        """The class pairs ``model`` hesitates between most (its top-two classes):
        ``class_a``, ``class_b``, ``count``, ``a_top1``, ``mean_margin``."""
        rpc = rpc_aggregate(self.name, "confused_pairs", model=model, where=where, top=top,
                            version=version, params=params)
        return self.client._unary(rpc, timeout)

    def confusion(self, model: str, where: str | None = None, errors_only: bool = False, *,
                  version: int | str | None = None, params: Mapping[str, Any] | None = None,
                  timeout: Timeout = DEFAULT) -> pa.Table:
        """Label vs ``model``'s predicted class over labeled rows: ``label``, ``predicted``,
        ``count`` (``errors_only``: the off-diagonal cells)."""
        rpc = rpc_aggregate(self.name, "confusion", model=model, where=where,
                            errors_only=errors_only, version=version, params=params)
        return self.client._unary(rpc, timeout)

    def class_uncertainty(self, model: str, where: str | None = None, measure: str = "entropy", *,
                          version: int | str | None = None,
                          params: Mapping[str, Any] | None = None,
                          timeout: Timeout = DEFAULT) -> pa.Table:
        """Uncertainty per predicted class: ``predicted``, ``count``, ``mean_score``,
        ``min_score``, ``max_score`` (measure: entropy, margin, least_confidence, ratio)."""
        rpc = rpc_aggregate(self.name, "class_uncertainty", model=model, where=where,
                            measure=measure, version=version, params=params)
        return self.client._unary(rpc, timeout)

    def histogram(self, field: str, bins: int = 20, where: str | None = None,
                  range: tuple[float, float] | None = None, *,  # noqa: A002
                  version: int | str | None = None, params: Mapping[str, Any] | None = None,
                  timeout: Timeout = DEFAULT) -> pa.Table:
        """Equal-width histogram of a numeric field (or a path such as ``pred_m.loss``):
        ``bin_start``, ``bin_end``, ``count``, binned as numpy.histogram; what was not
        binned is in :func:`histogram_stats` of the table."""
        rpc = rpc_aggregate(self.name, "histogram", field=field, bins=bins, where=where,
                            range=range, version=version, params=params)
        return self.client._unary(rpc, timeout)

    def tag_items(self, ids: str | Iterable[str] | None = None, where: str | None = None,
                  run_id: Any = None, add: str | Iterable[str] = (),
                  remove: str | Iterable[str] = (), params: Mapping[str, Any] | None = None, *,
                  timeout: Timeout = DEFAULT) -> int:
        """Add and/or remove ``tags`` on the rows named by exactly one of ``ids``, ``where``
        or ``run_id`` (a finished mining run's results, or its MiningJob); returns the rows
        whose tags changed. Then ``where="array_has_any(tags, ['to-label'])"``."""
        rpc = rpc_tag_items(self.name, ids, where, run_id, add, remove, params)
        return self.client._unary(rpc, timeout)

    def export(self, path: str | os.PathLike[str], format: str | None = None, *,  # noqa: A002
               model: str | None = None, where: str | None = None,
               ids: str | Iterable[str] | None = None, run_id: Any = None,
               dataset: str | None = None, dataset_version: int | str | None = None,
               fields: Iterable[str] = (), min_score: float = 0.0,
               params: Mapping[str, Any] | None = None,
               timeout: float | None = None) -> dict[str, Any]:
        """Export rows for labeling to ``path``: CSV / JSONL (``id, uri, text, label``,
        ``fields``, and with a ``model`` its ``predicted`` class and ``confidence``) or COCO
        JSON (``model``'s boxes; format from the extension: .csv, .jsonl, .json). Which rows:
        at most one of ``where``, ``ids``, ``run_id``, ``dataset`` (+ ``dataset_version``);
        none = all. The file is streamed to a temporary name next to ``path`` and renamed
        when complete. Returns ``{rows, annotations, path, format}``."""
        fmt = export_format(path, format)
        rpc = rpc_export(self.name, fmt, model=model, where=where, ids=ids, run_id=run_id,
                         dataset=dataset, dataset_version=dataset_version, fields=fields,
                         min_score=min_score, params=params)
        with ExportFile(path, fmt) as out:
            for chunk in self.client._stream(rpc, timeout):
                out.write(chunk)
        return out.result or {}

    def take(self, ids: str | Iterable[str], columns: Iterable[str] | None = None, *,
             timeout: Timeout = DEFAULT) -> pa.Table:
        """Rows by id, in the order given; missing ids are left out."""
        return self.client._unary(rpc_take(self.name, ids, columns), timeout)

    def delete(self, ids: str | Iterable[str] | None = None, where: str | None = None, *,
               params: Mapping[str, Any] | None = None, timeout: Timeout = DEFAULT) -> int:
        """Delete by ids or by filter (exactly one); returns the rows deleted."""
        return self.client._unary(rpc_delete(self.name, ids, where, params), timeout)

    def optimize(self, cleanup_older_than_s: float | None = None, *,
                 timeout: Timeout = DEFAULT) -> Job:
        """Compact, update/build indexes, remove old untagged versions (a job)."""
        return self.client._unary(rpc_optimize(self.name, cleanup_older_than_s), timeout)

    def build_index(self, space: str, kind: str | None = None, *,
                    timeout: Timeout = DEFAULT) -> Job:
        return self.client._unary(rpc_build_index(self.name, space, kind), timeout)

    def recall_check(self, space: str, queries: int = 50, k: int = 10, where: str | None = None,
                     tune: bool = True, *, params: Mapping[str, Any] | None = None,
                     timeout: Timeout = DEFAULT) -> Job:
        """Index recall against exact search; with ``tune``, raise nprobes until it is met."""
        rpc = rpc_recall_check(self.name, space, queries, k, where, tune, params)
        return self.client._unary(rpc, timeout)

    def reindex(self, space: str, *, params: Mapping[str, Any] | None = None,
                timeout: Timeout = DEFAULT, **options: Any) -> Job:
        """Re-embed the rows (all, or ``where``) into ``space`` with a model, as a server
        job: ``model`` (sentence-transformers name/path, default the packaged MiniLM) or
        ``clip_model`` + ``clip_pretrained``; ``source`` "text" or "uri"; ``engine`` "local"
        or "ray" (``ray_address``, ``ray_workers``); ``restart`` discards an interrupted
        run, which is otherwise resumed. The old space is served until the switch. The
        job's result holds the report (``embedded``, ``bad``, ``swapped``, ``summary``).
        ``params`` are bound into ``where``."""
        return self.client._unary(rpc_reindex(self.name, space, options, params), timeout)

    def mine(self, miner: str, size: int, *, model: str | None = None, space: str | None = None,
             where: str | None = None, reference_where: str | None = None,
             params: Mapping[str, Any] | None = None, seed: int | None = None, reverse: bool = False,
             version: int | None = None, where_params: Mapping[str, Any] | None = None,
             timeout: Timeout = DEFAULT) -> MiningJob:
        """Start a mining run: the ``size`` pool rows (``where``) ``miner`` ranks highest
        (lowest with ``reverse``), read at ``version`` (default: the current one).
        ``params`` are the miner's parameters; ``where_params`` are bound into ``where`` and
        ``reference_where`` (:func:`bind_params`). ``job.wait(progress=True)`` then
        ``job.results()``; ``job.tag("to-label")`` tags the selected rows."""
        rpc = rpc_start_mining(self.name, miner, size, model, space, where, reference_where, params,
                               seed, reverse, version, where_params)
        return MiningJob(self.client, self.client._unary(rpc, timeout))

    def score_stream(self, items: Any, *, model: str | None = None, space: str | None = None,
                     reference_where: str | None = None, thresholds: Any = None, batch_rows: int = 4096,
                     timeout: float | None = None, **options: Any) -> Iterator[pa.Table]:
        """Score items that are not stored, streamed both ways: one table per batch sent,
        as soon as the server has scored it. ``items``: what :meth:`score` takes, or an
        iterable of such chunks (e.g. a generator over a live feed)."""
        spec = scorer_spec(self.name, model=model, space=space, reference_where=reference_where,
                           thresholds=thresholds, **options)
        if isinstance(items, pa.Table | pa.RecordBatch | Mapping) or _is_dataframe(items) or _is_rows(items):
            tables: Iterable[pa.Table] = [items_to_arrow(items)]
        else:
            tables = (items_to_arrow(chunk) for chunk in items)
        yield from self.client._score_stream(spec, tables, batch_rows, timeout)

    def score(self, items: Any, *, model: str | None = None, space: str | None = None,
              reference_where: str | None = None, thresholds: Any = None, batch_rows: int = 4096,
              timeout: float | None = None, **options: Any) -> pa.Table:
        """Per-item scores of items that are not stored (bidirectional Scoring.Score stream).

        ``items``: a dict of columns (``probs``/``logits`` (N, C), ``samples`` (N, K, C),
        ``embedding`` (N, d), ``boxes``, ``id``), a list of row dicts, a DataFrame or an
        Arrow table — or ``pred_<model>`` / ``emb_<space>`` columns as stored. Returns a
        table with ``index`` (position in ``items``), ``id`` (when given), one float64
        column per score the inputs allow (least_confidence, margin, ratio, entropy,
        mean_entropy, variance, bald, vote_entropy, consensus_entropy, kl_to_consensus,
        energy, detection, novelty) and ``keep``: any score >= its threshold (null without
        ``thresholds``; pass a dict or what :meth:`calibrate` returned). Novelty is measured
        in ``space`` against the rows matching ``reference_where`` (default: every row with a
        vector). ``options``: k (10), novelty ("knn_distance" or "lof"), how ("kth" or
        "mean"), logits_temperature, energy_temperature, detection_method,
        detection_aggregate, nms_iou, version."""
        parts = list(self.score_stream(items, model=model, space=space, reference_where=reference_where,
                                       thresholds=thresholds, batch_rows=batch_rows, timeout=timeout,
                                       **options))
        return pa.concat_tables(parts, promote_options="default") if parts else pa.table({})

    def calibrate(self, budget: float, *, where: str | None = None, criteria: str | Iterable[str] | None = None,
                  model: str | None = None, space: str | None = None, reference_where: str | None = None,
                  max_rows: int = 100_000, seed: int = 0, timeout: Timeout = DEFAULT,
                  **options: Any) -> dict[str, Any]:
        """Thresholds that keep about ``budget`` (e.g. 0.02: 2% of traffic) of the stored rows
        matching ``where``, scored like streamed items (``criteria``: the scores that decide,
        default entropy with a model and novelty with a space). Returns ``{thresholds, budget,
        kept_fraction, rows, version, criteria}``; pass it as ``thresholds=`` to :meth:`score`."""
        spec = scorer_spec(self.name, model=model, space=space, reference_where=reference_where, **options)
        return self.client._unary(rpc_calibrate(spec, budget, where, criteria, max_rows, seed), timeout)

    def export_scorer(self, path: str | os.PathLike[str], *, budget: float = 0.0, where: str | None = None,
                      criteria: str | Iterable[str] | None = None, model: str | None = None,
                      space: str | None = None, reference_where: str | None = None, thresholds: Any = None,
                      reference: str = "sample", reference_size: int = 2048, format: str | None = None,  # noqa: A002
                      max_rows: int = 100_000, seed: int = 0, timeout: float | None = None,
                      **options: Any) -> dict[str, Any]:
        """Write a scorer bundle for ``miners.edge.EdgeScorer.load(path)`` (.npz, or .json by
        extension / ``format``): the scoring settings, thresholds (calibrated here on ``where``
        when ``budget`` > 0, else ``thresholds``) and a compact reference set for novelty
        (``reference``: "sample" of ``reference_size`` rows, "all", or "centroids").
        Returns ``{path, format, thresholds, reference_rows, bytes, kept_fraction}``."""
        fmt = scorer_format(path, format)
        spec = scorer_spec(self.name, model=model, space=space, reference_where=reference_where,
                           thresholds=thresholds, **options)
        out = ScorerFile(path, fmt)
        rpc = rpc_export_scorer(spec, fmt, budget, where, criteria, max_rows, seed, reference, reference_size)
        for chunk in self.client._stream(rpc, timeout):
            out.write(chunk)
        return out.finish()


# -- asyncio client --------------------------------------------------------------------------


class AsyncClient(_BaseClient):
    """asyncio client (grpc.aio) with the surface of :class:`Client` (same arguments),
    awaited. The channel is opened on first use, in the running event loop."""

    _job_type = AsyncJob
    _channel: grpc.aio.Channel | None = None
    _stub_map: dict[str, Any] | None = None
    _sync: Client | None = None

    @property
    def _stub(self) -> dict[str, Any]:
        if self._stub_map is None:
            self._channel = self._open(grpc.aio)
            self._stub_map = _stubs(self._channel)
        return self._stub_map

    async def _unary(self, rpc: Rpc, timeout: Timeout) -> Any:
        if rpc.request is None:
            return rpc.parse(None)
        method = getattr(self._stub[rpc.service], rpc.method)
        deadline = self._deadline(timeout)
        response = await call_with_retries_async(
            self.retry, lambda: method(rpc.request, timeout=deadline, metadata=self._metadata))
        return self._result(rpc, response)

    async def _stream(self, rpc: Rpc, timeout: Timeout) -> AsyncIterator[Any]:
        method = getattr(self._stub[rpc.service], rpc.method)
        deadline = self._deadline(timeout)

        async def start() -> tuple[Any, Any]:
            call = method(rpc.request, timeout=deadline, metadata=self._metadata)
            return call, await call.read()

        call, message = await call_with_retries_async(self.retry, start)
        try:
            while message is not grpc.aio.EOF:
                yield self._result(rpc, message)
                message = await call.read()
        except grpc.RpcError as exc:
            raise error_from_rpc(exc) from None
        finally:
            call.cancel()

    def _blocking(self) -> Client:
        """A sync Client (its own channel) for upserts. grpc.aio may report a bidi stream that
        the server ends while a request is being written as INTERNAL "Internal error from
        Core", losing the server's status (grpc/grpc#36066): a rejected batch would lose its
        INVALID_ARGUMENT message. The sync stream reports the server's status."""
        if self._sync is None:
            self._sync = Client(**self._settings)
        self._sync.retry = self.retry
        return self._sync

    async def _upsert(self, collection: str, data: Any, batch_rows: int, progress: bool,
                      timeout: float | None) -> UpsertSummary:
        """The sync upsert in a worker thread; cancelling the task cancels the stream."""
        blocking = self._blocking()
        run = await asyncio.to_thread(self._upsert_run, collection, data, batch_rows, progress)
        with run:
            try:
                return await asyncio.to_thread(blocking._drive_upsert, run, timeout)
            except asyncio.CancelledError:
                run.abort()
                raise

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        if self._channel is not None:
            await self._channel.close()
            self._channel = self._stub_map = None
        if self._sync is not None:
            self._sync.close()
            self._sync = None

    async def health(self, service: str = "", *, timeout: Timeout = DEFAULT) -> str:
        return await self._unary(rpc_health(service), timeout)

    async def list_collections(self, *, timeout: Timeout = DEFAULT) -> list[str]:
        return await self._unary(rpc_list_collections(), timeout)

    async def create_collection(
        self,
        name: str,
        spaces: Mapping[str, int | Mapping[str, Any]] | None = None,
        models: Mapping[str, list[str] | Mapping[str, Any]] | None = None,
        fields: Mapping[str, str] | None = None,
        if_not_exists: bool = False,
        *,
        timeout: Timeout = DEFAULT,
    ) -> AsyncCollection:
        rpc = rpc_create_collection(name, spaces, models, fields, if_not_exists)
        await self._unary(rpc, timeout)
        return self.collection(name)

    def collection(self, name: str) -> AsyncCollection:
        return AsyncCollection(self, name)

    async def drop_collection(self, name: str, *, timeout: Timeout = DEFAULT) -> None:
        await self._unary(rpc_drop(name), timeout)

    async def start_job(self, kind: str, collection: str,
                        params: Mapping[str, Any] | None = None, *,
                        timeout: Timeout = DEFAULT) -> AsyncJob:
        return await self._unary(rpc_start_job(kind, collection, params), timeout)

    async def job(self, job_id: str, *, timeout: Timeout = DEFAULT) -> AsyncJob:
        return await self._unary(rpc_job("GetJob", job_id, wrap=True), timeout)

    async def list_jobs(self, collection: str | None = None,
                        states: Iterable[str | int] | None = None, limit: int = 100, *,
                        timeout: Timeout = DEFAULT) -> list[AsyncJob]:
        return await self._unary(rpc_list_jobs(collection, states, limit), timeout)

    async def miners(self, *, timeout: Timeout = DEFAULT) -> list[dict[str, Any]]:
        return await self._unary(rpc_list_miners(), timeout)

    async def mining_job(self, run_id: str, *, timeout: Timeout = DEFAULT) -> AsyncMiningJob:
        return AsyncMiningJob(self, await self._unary(rpc_run("GetRun", run_id), timeout))

    async def runs(self, collection: str | None = None, limit: int = 100, *,
                   timeout: Timeout = DEFAULT) -> list[dict[str, Any]]:
        return await self._unary(rpc_list_runs(collection, limit), timeout)

    async def create_dataset(self, name: str, collection: str, description: str = "", *,
                             timeout: Timeout = DEFAULT) -> AsyncDataset:
        await self._unary(rpc_create_dataset(name, collection, description), timeout)
        return self.dataset(name)

    def dataset(self, name: str) -> AsyncDataset:
        return AsyncDataset(self, name)

    async def datasets(self, collection: str | None = None, *,
                       timeout: Timeout = DEFAULT) -> list[dict[str, Any]]:
        return await self._unary(rpc_list_datasets(collection), timeout)

    async def show(self, obj: AsyncMiningJob | str | pa.Table | Any, *, collection: str | None = None,
                   limit: int = 60, size: int = 160, web_url: str | None = None,
                   timeout: float | None = None) -> Grid:
        """See :meth:`Client.show` (built by a sync client in a worker thread)."""
        from service.notebook import show

        if isinstance(obj, AsyncMiningJob):
            obj = obj.run_id
        return await asyncio.to_thread(show, self._blocking(), obj, collection=collection, limit=limit,
                                       size=size, web_url=web_url, timeout=timeout)


class AsyncCollection:
    """:class:`Collection` for :class:`AsyncClient`: the same methods, awaited (``scan`` is an
    async iterator)."""

    def __init__(self, client: AsyncClient, name: str) -> None:
        self.client = client
        self.name = name

    def __repr__(self) -> str:
        return f"AsyncCollection({self.name!r})"

    async def describe(self, *, timeout: Timeout = DEFAULT) -> dict[str, Any]:
        return await self.client._unary(rpc_describe(self.name), timeout)

    async def add_space(self, name: str, dim: int, metric: str = "cosine", model: str | None = None,
                        normalized: bool | None = None, index: Mapping[str, Any] | None = None, *,
                        timeout: Timeout = DEFAULT) -> dict[str, Any]:
        rpc = rpc_add_space(self.name, name, dim, metric, model, normalized, index)
        return await self.client._unary(rpc, timeout)

    async def add_model(self, name: str, classes: Iterable[str], task: str = "classification", *,
                        timeout: Timeout = DEFAULT) -> dict[str, Any]:
        return await self.client._unary(rpc_add_model(self.name, name, classes, task), timeout)

    async def upsert(self, data: Any, batch_rows: int = 10_000, progress: bool = False, *,
                     timeout: float | None = None) -> UpsertSummary:
        return await self.client._upsert(self.name, data, batch_rows, progress, timeout)

    async def search(
        self,
        space: str,
        vector: Any = None,
        *,
        ids: str | Iterable[str] | None = None,
        text: str | None = None,
        texts: Iterable[str] | None = None,
        k: int = 10,
        where: str | None = None,
        columns: Iterable[str] | None = None,
        nprobes: int | None = None,
        refine_factor: int | None = None,
        exact: bool = False,
        params: Mapping[str, Any] | None = None,
        timeout: Timeout = DEFAULT,
    ) -> pa.Table:
        rpc = rpc_search(self.name, space, vector=vector, ids=ids, text=text, texts=texts, k=k,
                         where=where, columns=columns, nprobes=nprobes, refine_factor=refine_factor,
                         exact=exact, params=params)
        return await self.client._unary(rpc, timeout)

    def scan(self, where: str | None = None, columns: Iterable[str] | None = None,
             page_rows: int = 8192, *, version: int | str | None = None,
             params: Mapping[str, Any] | None = None,
             timeout: float | None = None) -> AsyncIterator[pa.Table]:
        """``async for page in col.scan(...)``."""
        rpc = rpc_scan(self.name, where, columns, page_rows, version=version, params=params)
        return self.client._stream(rpc, timeout)

    async def query(self, where: str | None = None, columns: Iterable[str] | None = None,
                    limit: int | None = None, offset: int = 0, page_rows: int = 8192, *,
                    version: int | str | None = None, params: Mapping[str, Any] | None = None,
                    timeout: float | None = None) -> pa.Table:
        rpc = rpc_scan(self.name, where, columns, page_rows, limit, offset, version, params)
        return concat_pages([page async for page in self.client._stream(rpc, timeout)])

    async def count(self, where: str | None = None, *, version: int | str | None = None,
                    params: Mapping[str, Any] | None = None, timeout: Timeout = DEFAULT) -> int:
        return await self.client._unary(rpc_count(self.name, where, version, params), timeout)

    async def page(self, where: str | None = None, columns: Iterable[str] | None = None,
                   page_rows: int = 1000, cursor: str | None = None,
                   version: int | str | None = None, params: Mapping[str, Any] | None = None, *,
                   timeout: Timeout = DEFAULT) -> Page:
        """See :meth:`Collection.page`."""
        rpc = rpc_page(self.name, where, columns, page_rows, cursor, version, params)
        return await self.client._unary(rpc, timeout)

    async def pages(self, where: str | None = None, columns: Iterable[str] | None = None,
                    page_rows: int = 1000, cursor: str | None = None,
                    version: int | str | None = None, params: Mapping[str, Any] | None = None, *,
                    timeout: Timeout = DEFAULT) -> AsyncIterator[Page]:
        """``async for page in col.pages(...)``: see :meth:`Collection.pages`."""
        while True:
            page = await self.page(where, columns, page_rows, cursor, version, params,
                                   timeout=timeout)
            yield page
            if page.last:
                return
            cursor = page.next_cursor

    async def label_distribution(self, where: str | None = None,
                                 group_by: str | Iterable[str] | None = None,
                                 version: int | str | None = None, *,
                                 params: Mapping[str, Any] | None = None,
                                 timeout: Timeout = DEFAULT) -> pa.Table:
        rpc = rpc_aggregate(self.name, "label_distribution", where=where, group_by=group_by,
                            version=version, params=params)
        return await self.client._unary(rpc, timeout)

    async def confused_pairs(self, model: str, where: str | None = None, top: int = 20, *,
                             version: int | str | None = None,
                             params: Mapping[str, Any] | None = None,
                             timeout: Timeout = DEFAULT) -> pa.Table:
        rpc = rpc_aggregate(self.name, "confused_pairs", model=model, where=where, top=top,
                            version=version, params=params)
        return await self.client._unary(rpc, timeout)

    async def confusion(self, model: str, where: str | None = None, errors_only: bool = False, *,
                        version: int | str | None = None, params: Mapping[str, Any] | None = None,
                        timeout: Timeout = DEFAULT) -> pa.Table:
        rpc = rpc_aggregate(self.name, "confusion", model=model, where=where,
                            errors_only=errors_only, version=version, params=params)
        return await self.client._unary(rpc, timeout)

    async def class_uncertainty(self, model: str, where: str | None = None,
                                measure: str = "entropy", *, version: int | str | None = None,
                                params: Mapping[str, Any] | None = None,
                                timeout: Timeout = DEFAULT) -> pa.Table:
        rpc = rpc_aggregate(self.name, "class_uncertainty", model=model, where=where,
                            measure=measure, version=version, params=params)
        return await self.client._unary(rpc, timeout)

    async def histogram(self, field: str, bins: int = 20, where: str | None = None,
                        range: tuple[float, float] | None = None, *,  # noqa: A002
                        version: int | str | None = None, params: Mapping[str, Any] | None = None,
                        timeout: Timeout = DEFAULT) -> pa.Table:
        rpc = rpc_aggregate(self.name, "histogram", field=field, bins=bins, where=where,
                            range=range, version=version, params=params)
        return await self.client._unary(rpc, timeout)

    async def tag_items(self, ids: str | Iterable[str] | None = None, where: str | None = None,
                        run_id: Any = None, add: str | Iterable[str] = (),
                        remove: str | Iterable[str] = (),
                        params: Mapping[str, Any] | None = None, *,
                        timeout: Timeout = DEFAULT) -> int:
        rpc = rpc_tag_items(self.name, ids, where, run_id, add, remove, params)
        return await self.client._unary(rpc, timeout)

    async def export(self, path: str | os.PathLike[str], format: str | None = None, *,  # noqa: A002
                     model: str | None = None, where: str | None = None,
                     ids: str | Iterable[str] | None = None, run_id: Any = None,
                     dataset: str | None = None, dataset_version: int | str | None = None,
                     fields: Iterable[str] = (), min_score: float = 0.0,
                     params: Mapping[str, Any] | None = None,
                     timeout: float | None = None) -> dict[str, Any]:
        """See :meth:`Collection.export`."""
        fmt = export_format(path, format)
        rpc = rpc_export(self.name, fmt, model=model, where=where, ids=ids, run_id=run_id,
                         dataset=dataset, dataset_version=dataset_version, fields=fields,
                         min_score=min_score, params=params)
        with ExportFile(path, fmt) as out:
            async for chunk in self.client._stream(rpc, timeout):
                out.write(chunk)
        return out.result or {}

    async def take(self, ids: str | Iterable[str], columns: Iterable[str] | None = None, *,
                   timeout: Timeout = DEFAULT) -> pa.Table:
        return await self.client._unary(rpc_take(self.name, ids, columns), timeout)

    async def delete(self, ids: str | Iterable[str] | None = None, where: str | None = None, *,
                     params: Mapping[str, Any] | None = None, timeout: Timeout = DEFAULT) -> int:
        return await self.client._unary(rpc_delete(self.name, ids, where, params), timeout)

    async def optimize(self, cleanup_older_than_s: float | None = None, *,
                       timeout: Timeout = DEFAULT) -> AsyncJob:
        return await self.client._unary(rpc_optimize(self.name, cleanup_older_than_s), timeout)

    async def build_index(self, space: str, kind: str | None = None, *,
                          timeout: Timeout = DEFAULT) -> AsyncJob:
        return await self.client._unary(rpc_build_index(self.name, space, kind), timeout)

    async def recall_check(self, space: str, queries: int = 50, k: int = 10,
                           where: str | None = None, tune: bool = True, *,
                           params: Mapping[str, Any] | None = None,
                           timeout: Timeout = DEFAULT) -> AsyncJob:
        rpc = rpc_recall_check(self.name, space, queries, k, where, tune, params)
        return await self.client._unary(rpc, timeout)

    async def reindex(self, space: str, *, params: Mapping[str, Any] | None = None,
                      timeout: Timeout = DEFAULT, **options: Any) -> AsyncJob:
        """See :meth:`Collection.reindex`."""
        return await self.client._unary(rpc_reindex(self.name, space, options, params), timeout)

    async def mine(self, miner: str, size: int, *, model: str | None = None,
                   space: str | None = None, where: str | None = None,
                   reference_where: str | None = None, params: Mapping[str, Any] | None = None,
                   seed: int | None = None, reverse: bool = False, version: int | None = None,
                   where_params: Mapping[str, Any] | None = None,
                   timeout: Timeout = DEFAULT) -> AsyncMiningJob:
        rpc = rpc_start_mining(self.name, miner, size, model, space, where, reference_where, params,
                               seed, reverse, version, where_params)
        return AsyncMiningJob(self.client, await self.client._unary(rpc, timeout))

    async def score(self, items: Any, *, model: str | None = None, space: str | None = None,
                    reference_where: str | None = None, thresholds: Any = None, batch_rows: int = 4096,
                    timeout: float | None = None, **options: Any) -> pa.Table:
        """See :meth:`Collection.score` (a sync stream in a worker thread, as for upserts)."""
        col = self.client._blocking().collection(self.name)
        return await asyncio.to_thread(partial(col.score, items, model=model, space=space,
                                               reference_where=reference_where, thresholds=thresholds,
                                               batch_rows=batch_rows, timeout=timeout, **options))

    async def calibrate(self, budget: float, *, where: str | None = None,
                        criteria: str | Iterable[str] | None = None, model: str | None = None,
                        space: str | None = None, reference_where: str | None = None, max_rows: int = 100_000,
                        seed: int = 0, timeout: Timeout = DEFAULT, **options: Any) -> dict[str, Any]:
        """See :meth:`Collection.calibrate`."""
        spec = scorer_spec(self.name, model=model, space=space, reference_where=reference_where, **options)
        return await self.client._unary(rpc_calibrate(spec, budget, where, criteria, max_rows, seed), timeout)

    async def export_scorer(self, path: str | os.PathLike[str], *, budget: float = 0.0, where: str | None = None,
                            criteria: str | Iterable[str] | None = None, model: str | None = None,
                            space: str | None = None, reference_where: str | None = None,
                            thresholds: Any = None, reference: str = "sample", reference_size: int = 2048,
                            format: str | None = None, max_rows: int = 100_000, seed: int = 0,  # noqa: A002
                            timeout: float | None = None, **options: Any) -> dict[str, Any]:
        """See :meth:`Collection.export_scorer`."""
        fmt = scorer_format(path, format)
        spec = scorer_spec(self.name, model=model, space=space, reference_where=reference_where,
                           thresholds=thresholds, **options)
        out = ScorerFile(path, fmt)
        rpc = rpc_export_scorer(spec, fmt, budget, where, criteria, max_rows, seed, reference, reference_size)
        async for chunk in self.client._stream(rpc, timeout):
            out.write(chunk)
        return await asyncio.to_thread(out.finish)


# -- datasets --------------------------------------------------------------------------------


def _sorted_by_id(table: pa.Table) -> pa.Table:
    """Checkout pages arrive in no particular order: the table sorted by ``id``."""
    if "id" not in table.column_names or table.num_rows < 2:
        return table
    return table.take(pc.sort_indices(table.column("id")))


class Dataset:
    """A versioned dataset on the server: a named selection of one collection's rows.

    Stage members with :meth:`add` / :meth:`remove` (by ``ids``, a ``where`` filter with
    ``params``, or a mining ``run_id``), then :meth:`commit`: version N pins the membership
    and the collection version, so :meth:`checkout` of N returns labels and predictions as
    they were. Versions are ints, ``"HEAD"``, dataset tag names, or None for the working
    state (head + staged changes, at the collection's current version).

        ds = client.create_dataset("train", "pool")
        ds.add(run_id=job.run_id)
        ds.commit("first 500 uncertain")
        old = ds.checkout(1)            # pyarrow.Table, sorted by id
        ds.diff(1, 2)                   # {"added": [...], "removed": [...], "relabeled": Table}
    """

    def __init__(self, client: Client, name: str) -> None:
        self.client = client
        self.name = name

    def __repr__(self) -> str:
        return f"Dataset({self.name!r})"

    def info(self, *, timeout: Timeout = DEFAULT) -> dict[str, Any]:
        """name, collection, description, created_at, head, members (at head),
        staged_adds, staged_removes, tags (name -> version)."""
        return self.client._unary(rpc_dataset("GetDataset", self.name), timeout)

    def add(self, ids: str | Iterable[str] | None = None, where: str | None = None,
            run_id: Any = None, params: Mapping[str, Any] | None = None, *,
            timeout: Timeout = DEFAULT) -> dict[str, Any]:
        """Stage members: exactly one of ``ids`` (each must exist), ``where`` (with
        ``params`` bound) or ``run_id`` (a SUCCEEDED run's results, or its MiningJob).
        Returns requested, changed, unchanged, staged_adds, staged_removes."""
        rpc = rpc_members("AddMembers", self.name, ids, where, run_id, params)
        return self.client._unary(rpc, timeout)

    def remove(self, ids: str | Iterable[str] | None = None, where: str | None = None,
               run_id: Any = None, params: Mapping[str, Any] | None = None, *,
               timeout: Timeout = DEFAULT) -> dict[str, Any]:
        """Stage the removal of members, chosen like :meth:`add`."""
        rpc = rpc_members("RemoveMembers", self.name, ids, where, run_id, params)
        return self.client._unary(rpc, timeout)

    def status(self, *, timeout: Timeout = DEFAULT) -> dict[str, Any]:
        """head, staged_adds, staged_removes, members (working state),
        head_collection_version, collection_version."""
        return self.client._unary(rpc_dataset("GetStatus", self.name, message_to_dict), timeout)

    def discard(self, *, timeout: Timeout = DEFAULT) -> int:
        """Drop the staged changes; returns how many."""
        rpc = rpc_dataset("Discard", self.name, lambda r: int(r.discarded))
        return self.client._unary(rpc, timeout)

    def commit(self, message: str, author: str = "", allow_empty: bool = False, *,
               timeout: Timeout = DEFAULT) -> dict[str, Any]:
        """Commit the staged changes as the next version (FailedPreconditionError when
        nothing is staged, unless ``allow_empty``: to pin newer labels of the same members).
        Returns the commit: version, collection_version, tag, members, added, removed ..."""
        return self.client._unary(rpc_commit(self.name, message, author, allow_empty), timeout)

    def history(self, *, timeout: Timeout = DEFAULT) -> list[dict[str, Any]]:
        """Commits, newest first."""
        rpc = rpc_dataset("History", self.name,
                          lambda r: [message_to_dict(c) for c in r.commits])
        return self.client._unary(rpc, timeout)

    def tag(self, version: int | str, tag: str, *, timeout: Timeout = DEFAULT) -> int:
        """Name a committed version (``"paper-v1"``); returns the version tagged."""
        return self.client._unary(rpc_tag_version(self.name, version, tag), timeout)

    def checkout_batches(self, version: int | str | None = None,
                         columns: Iterable[str] | None = None, page_rows: int = 8192, *,
                         timeout: float | None = None) -> Iterator[pa.Table]:
        """:meth:`checkout` page by page."""
        rpc = rpc_checkout(self.name, version, columns, page_rows)
        return self.client._stream(rpc, timeout)

    def checkout(self, version: int | str | None = None, columns: Iterable[str] | None = None,
                 page_rows: int = 8192, *, timeout: float | None = None) -> pa.Table:
        """The members' rows as they were at ``version`` (default columns: all but vectors
        and predictions; name ``emb_*`` / ``pred_*`` columns to get them), sorted by id
        (when ``id`` is among the columns)."""
        return _sorted_by_id(concat_pages(list(self.checkout_batches(version, columns, page_rows,
                                                                     timeout=timeout))))

    def members(self, version: int | str | None = None, *,
                timeout: float | None = None) -> list[str]:
        """Member ids at ``version``, sorted."""
        table = self.checkout(version, ["id"], 100_000, timeout=timeout)
        return table.column("id").to_pylist() if "id" in table.column_names else []

    def diff(self, v1: int | str, v2: int | str | None = None, *,
             timeout: Timeout = DEFAULT) -> dict[str, Any]:
        """From ``v1`` to ``v2`` (None: the working state): ``added`` and ``removed`` ids
        (lists, sorted) and ``relabeled`` (Table: id, label_before, label_after)."""
        return self.client._unary(rpc_diff(self.name, v1, v2), timeout)

    def delete(self, force: bool = False, *, timeout: Timeout = DEFAULT) -> None:
        """Delete the dataset and its history (FailedPreconditionError while changes are
        staged, unless ``force``)."""
        self.client._unary(rpc_delete_dataset(self.name, force), timeout)


class AsyncDataset:
    """:class:`Dataset` for :class:`AsyncClient`: the same methods, awaited
    (``checkout_batches`` is an async iterator)."""

    def __init__(self, client: AsyncClient, name: str) -> None:
        self.client = client
        self.name = name

    def __repr__(self) -> str:
        return f"AsyncDataset({self.name!r})"

    async def info(self, *, timeout: Timeout = DEFAULT) -> dict[str, Any]:
        return await self.client._unary(rpc_dataset("GetDataset", self.name), timeout)

    async def add(self, ids: str | Iterable[str] | None = None, where: str | None = None,
                  run_id: Any = None, params: Mapping[str, Any] | None = None, *,
                  timeout: Timeout = DEFAULT) -> dict[str, Any]:
        rpc = rpc_members("AddMembers", self.name, ids, where, run_id, params)
        return await self.client._unary(rpc, timeout)

    async def remove(self, ids: str | Iterable[str] | None = None, where: str | None = None,
                     run_id: Any = None, params: Mapping[str, Any] | None = None, *,
                     timeout: Timeout = DEFAULT) -> dict[str, Any]:
        rpc = rpc_members("RemoveMembers", self.name, ids, where, run_id, params)
        return await self.client._unary(rpc, timeout)

    async def status(self, *, timeout: Timeout = DEFAULT) -> dict[str, Any]:
        return await self.client._unary(rpc_dataset("GetStatus", self.name, message_to_dict),
                                        timeout)

    async def discard(self, *, timeout: Timeout = DEFAULT) -> int:
        rpc = rpc_dataset("Discard", self.name, lambda r: int(r.discarded))
        return await self.client._unary(rpc, timeout)

    async def commit(self, message: str, author: str = "", allow_empty: bool = False, *,
                     timeout: Timeout = DEFAULT) -> dict[str, Any]:
        return await self.client._unary(rpc_commit(self.name, message, author, allow_empty),
                                        timeout)

    async def history(self, *, timeout: Timeout = DEFAULT) -> list[dict[str, Any]]:
        rpc = rpc_dataset("History", self.name,
                          lambda r: [message_to_dict(c) for c in r.commits])
        return await self.client._unary(rpc, timeout)

    async def tag(self, version: int | str, tag: str, *, timeout: Timeout = DEFAULT) -> int:
        return await self.client._unary(rpc_tag_version(self.name, version, tag), timeout)

    def checkout_batches(self, version: int | str | None = None,
                         columns: Iterable[str] | None = None, page_rows: int = 8192, *,
                         timeout: float | None = None) -> AsyncIterator[pa.Table]:
        rpc = rpc_checkout(self.name, version, columns, page_rows)
        return self.client._stream(rpc, timeout)

    async def checkout(self, version: int | str | None = None,
                       columns: Iterable[str] | None = None, page_rows: int = 8192, *,
                       timeout: float | None = None) -> pa.Table:
        batches = self.checkout_batches(version, columns, page_rows, timeout=timeout)
        return _sorted_by_id(concat_pages([page async for page in batches]))

    async def members(self, version: int | str | None = None, *,
                      timeout: float | None = None) -> list[str]:
        table = await self.checkout(version, ["id"], 100_000, timeout=timeout)
        return table.column("id").to_pylist() if "id" in table.column_names else []

    async def diff(self, v1: int | str, v2: int | str | None = None, *,
                   timeout: Timeout = DEFAULT) -> dict[str, Any]:
        return await self.client._unary(rpc_diff(self.name, v1, v2), timeout)

    async def delete(self, force: bool = False, *, timeout: Timeout = DEFAULT) -> None:
        await self.client._unary(rpc_delete_dataset(self.name, force), timeout)
