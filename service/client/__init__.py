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
* Upserts are streamed one batch per request and acknowledged batch by batch; an input
  held in memory that fits one batch goes in one unary ``UpsertBatch`` call instead (the
  same validation, commit and acknowledgement, without a stream's threads). Upsert is
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

The package, by job: :mod:`~service.client.errors` (the exceptions),
:mod:`~service.client.channel` (retries, channel options, credentials),
:mod:`~service.client.sql` (``:name`` parameters, on :mod:`indexing.filters`),
:mod:`~service.client.convert` (Arrow and protobuf conversions),
:mod:`~service.client.rpc` (one request builder per call), :mod:`~service.client.files`
(exports written to files), :mod:`~service.client.upsert` (the upsert protocol),
:mod:`~service.client.progress`, :mod:`~service.client.jobs` (job records, waiting),
:mod:`~service.client.transport` (how calls are made), :mod:`~service.client.sync` (the
public surface), :mod:`~service.client.aio` (the asyncio transport and hand-written
asyncio methods), :mod:`~service.client.async_client` (generated from ``sync`` by
:mod:`~service.client.generate`), :mod:`~service.client.show` (notebook grids).
"""

from __future__ import annotations

from typing import Any

# The public surface (__all__), and names of the one-module client that callers (tests,
# benchmarks) import from here (`name as name`: re-exported).
from service.client.channel import DEFAULT_KEEPALIVE_S as DEFAULT_KEEPALIVE_S
from service.client.channel import DEFAULT_MAX_MESSAGE_BYTES as DEFAULT_MAX_MESSAGE_BYTES
from service.client.channel import RetryPolicy
from service.client.channel import call_with_retries as call_with_retries
from service.client.channel import call_with_retries_async as call_with_retries_async
from service.client.channel import channel_options as channel_options
from service.client.convert import dict_to_struct as dict_to_struct
from service.client.convert import histogram_stats, uncertainty_quality_stats
from service.client.convert import matrix_to_arrow as _matrix_to_arrow  # noqa: F401
from service.client.convert import message_to_dict as message_to_dict
from service.client.convert import nested_to_arrow as _nested_to_arrow  # noqa: F401
from service.client.convert import parse_search as parse_search
from service.client.convert import struct_to_dict as struct_to_dict
from service.client.convert import to_arrow as to_arrow
from service.client.errors import (
    AlreadyExistsError,
    AssayClientError,
    CancelledError,
    DeadlineExceededError,
    FailedPreconditionError,
    InternalError,
    InvalidArgumentError,
    NotFoundError,
    PermissionDeniedError,
    ResourceExhaustedError,
    UnauthenticatedError,
    UnavailableError,
)
from service.client.errors import error_for as error_for
from service.client.progress import Progress as Progress
from service.client.rpc import Page
from service.client.rpc import Rpc as Rpc
from service.client.rpc import model_spec as model_spec
from service.client.rpc import rpc_add_space as rpc_add_space
from service.client.rpc import rpc_build_index as rpc_build_index
from service.client.rpc import rpc_create_collection as rpc_create_collection
from service.client.rpc import rpc_delete as rpc_delete
from service.client.rpc import rpc_list_jobs as rpc_list_jobs
from service.client.rpc import rpc_recall_check as rpc_recall_check
from service.client.rpc import rpc_scan as rpc_scan
from service.client.rpc import rpc_search as rpc_search
from service.client.rpc import rpc_take as rpc_take
from service.client.rpc import space_spec as space_spec
from service.client.sql import bind_params
from service.client.sync import Client, Collection, Dataset, Job, MiningJob
from service.client.upsert import REQUEST_ENVELOPE as _REQUEST_ENVELOPE  # noqa: F401
from service.client.upsert import WINDOW as _UPSERT_WINDOW  # noqa: F401
from service.client.upsert import UpsertSummary
from service.client.upsert import encode_batches as encode_batches
from service.client.upsert import normalize_upsert_input as normalize_upsert_input

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
    "uncertainty_quality_stats",
]

# The asyncio client is generated (service/client/async_client.py) and loaded on first use:
# `import service.client` does not depend on it, so `python -m service.client.generate` can
# always rewrite it, even when a change to the sync client has left it out of date.
_ASYNC = frozenset({"AsyncClient", "AsyncCollection", "AsyncDataset", "AsyncJob", "AsyncMiningJob"})


def __getattr__(name: str) -> Any:
    if name in _ASYNC:
        from service.client import async_client

        return getattr(async_client, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *_ASYNC})
