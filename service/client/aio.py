"""The asyncio side of the client, written by hand: its transport, and the few methods
of the asyncio client that are not the sync ones awaited.

:mod:`service.client.async_client` is generated from :mod:`service.client.sync` by
``python -m service.client.generate``; its classes derive from the ones here, and the
generator leaves out every method these define. Why they differ: bidirectional streams
(upsert, scoring) run on a sync stream in a worker thread (grpc.aio can lose the server's
status of a bidi stream, grpc/grpc#36066), and notebook grids are drawn by a sync client
in a worker thread.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator, Iterable
from functools import partial
from typing import TYPE_CHECKING, Any, Self

import grpc
import grpc.aio
import pyarrow as pa

from indexing.settings import DEFAULT_THUMB_SIZE, GRID_LIMIT
from service.client.channel import call_with_retries_async, stubs
from service.client.errors import error_from_rpc
from service.client.files import ScorerFile
from service.client.rpc import Rpc, rpc_export_scorer, scorer_format, scorer_spec
from service.client.sync import Client
from service.client.transport import BaseClient, Timeout
from service.client.upsert import UpsertSummary

if TYPE_CHECKING:
    from service.notebook import Grid

__all__ = ["AsyncClientBase", "AsyncCollectionBase", "AsyncMiningJobBase", "AsyncTransport"]


class AsyncTransport(BaseClient):
    """The calls of the asyncio client (grpc.aio). The channel is opened on first use, in
    the running event loop; upserts and scoring streams go through a sync :class:`Client`
    (:meth:`_blocking`) in a worker thread."""

    _channel: grpc.aio.Channel | None = None
    _stub_map: dict[str, Any] | None = None
    _sync: Client | None = None

    @property
    def _stub(self) -> dict[str, Any]:
        if self._stub_map is None:
            self._channel = self._open(grpc.aio)
            self._stub_map = stubs(self._channel)
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

    async def __aenter__(self) -> Self:
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


class AsyncClientBase(AsyncTransport):
    """``AsyncClient``'s hand-written methods."""

    async def show(self, obj: AsyncMiningJobBase | str | pa.Table | Any, *,
                   collection: str | None = None, limit: int = GRID_LIMIT,
                   size: int = DEFAULT_THUMB_SIZE, web_url: str | None = None,
                   timeout: float | None = None) -> Grid:
        """See :meth:`Client.show` (drawn by a sync client in a worker thread)."""
        if isinstance(obj, AsyncMiningJobBase):
            obj = obj.run_id
        return await asyncio.to_thread(partial(self._blocking().show, obj, collection=collection,
                                               limit=limit, size=size, web_url=web_url,
                                               timeout=timeout))


class AsyncCollectionBase:
    """``AsyncCollection``'s hand-written methods (it has no ``score_stream``: score a live
    feed with the sync client)."""

    client: AsyncTransport
    name: str

    async def score(self, items: Any, *, model: str | None = None, space: str | None = None,
                    reference_where: str | None = None, thresholds: Any = None, batch_rows: int = 4096,
                    timeout: float | None = None, **options: Any) -> pa.Table:
        """See :meth:`Collection.score` (a sync stream in a worker thread, as for upserts)."""
        col = self.client._blocking().collection(self.name)
        return await asyncio.to_thread(partial(col.score, items, model=model, space=space,
                                               reference_where=reference_where, thresholds=thresholds,
                                               batch_rows=batch_rows, timeout=timeout, **options))

    async def export_scorer(self, path: str | os.PathLike[str], *, budget: float = 0.0, where: str | None = None,
                            criteria: str | Iterable[str] | None = None, model: str | None = None,
                            space: str | None = None, reference_where: str | None = None,
                            thresholds: Any = None, reference: str = "sample", reference_size: int = 2048,
                            format: str | None = None, max_rows: int = 100_000, seed: int = 0,  # noqa: A002
                            timeout: float | None = None, **options: Any) -> dict[str, Any]:
        """See :meth:`Collection.export_scorer` (the bundle is written in a worker thread)."""
        fmt = scorer_format(path, format)
        spec = scorer_spec(self.name, model=model, space=space, reference_where=reference_where,
                           thresholds=thresholds, **options)
        out = ScorerFile(path, fmt)
        rpc = rpc_export_scorer(spec, fmt, budget, where, criteria, max_rows, seed, reference, reference_size)
        async for chunk in self.client._stream(rpc, timeout):
            out.write(chunk)
        return await asyncio.to_thread(out.finish)


class AsyncMiningJobBase:
    """``AsyncMiningJob``'s hand-written methods."""

    _client: AsyncTransport
    run_id: str

    async def show(self, limit: int = GRID_LIMIT, *, size: int = DEFAULT_THUMB_SIZE,
                   web_url: str | None = None, timeout: float | None = None) -> Grid:
        """See :meth:`MiningJob.show` (drawn by a sync client in a worker thread)."""
        blocking = self._client._blocking()
        return await asyncio.to_thread(partial(blocking.show, self.run_id, limit=limit, size=size,
                                               web_url=web_url, timeout=timeout))
