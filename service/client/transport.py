"""How calls are made: the settings shared by both clients, and the blocking transport.

Each public method of :class:`~service.client.sync.Client` (and of the asyncio client
generated from it) is a builder of :mod:`service.client.rpc` and one of the transport's
``_unary``/``_stream`` (or ``_upsert``/``_score_stream`` for the bidirectional streams).
:class:`BaseClient` holds what does not wait (settings, channel arguments, deadlines,
wrapping job records); :class:`SyncTransport` the blocking calls; the asyncio transport
is :class:`service.client.aio.AsyncTransport`.
"""

from __future__ import annotations

import itertools
import os
import threading
import time
from collections.abc import Iterable, Iterator
from functools import partial
from typing import Any, Final, Self

import grpc
import pyarrow as pa

from indexing.settings import CLIENT_RETRIES, CLIENT_TIMEOUT_S
from protos.assay.v1 import scoring_pb2
from service.arrow_ipc import ipc_to_table
from service.client.channel import (
    DEFAULT_KEEPALIVE_S,
    DEFAULT_KEEPALIVE_TIMEOUT_S,
    DEFAULT_MAX_MESSAGE_BYTES,
    RetryPolicy,
    auth_metadata,
    call_with_retries,
    channel_credentials,
    channel_options,
    stubs,
)
from service.client.errors import error_from_rpc
from service.client.jobs import JobView
from service.client.rpc import Rpc, score_requests
from service.client.upsert import WINDOW as UPSERT_WINDOW
from service.client.upsert import EncodedBatch, UpsertRun, UpsertSummary

__all__ = ["DEFAULT", "BaseClient", "SyncTransport", "Timeout"]

END: Final = object()  # the end of a server stream (next()'s default)


class Default:
    """Type of :data:`DEFAULT`: "use the client's timeout"."""

    def __repr__(self) -> str:
        return "DEFAULT"


DEFAULT: Final = Default()
Timeout = float | None | Default


class BaseClient:
    """Settings and the parts of a call that do not wait: shared by Client and AsyncClient."""

    _job_type: type[JobView] = JobView  # what job records are wrapped in

    def __init__(
        self,
        target: str = "127.0.0.1:50051",
        token: str | None = None,
        tls: bool = False,
        root_certificates: bytes | str | os.PathLike[str] | None = None,
        timeout: float | None = CLIENT_TIMEOUT_S,
        retries: int = CLIENT_RETRIES,
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
        *,
        server_name_override: str | None = None,
        options: Iterable[tuple[str, Any]] = (),
        client_cert: bytes | str | os.PathLike[str] | None = None,
        client_key: bytes | str | os.PathLike[str] | None = None,
        web_url: str | None = None,
        keepalive_s: float = DEFAULT_KEEPALIVE_S,
        keepalive_timeout_s: float = DEFAULT_KEEPALIVE_TIMEOUT_S,
    ) -> None:
        self._settings = dict(
            target=target, token=token, tls=tls, root_certificates=root_certificates,
            timeout=timeout, retries=retries, max_message_bytes=max_message_bytes,
            server_name_override=server_name_override, options=list(options),
            client_cert=client_cert, client_key=client_key, web_url=web_url,
            keepalive_s=keepalive_s, keepalive_timeout_s=keepalive_timeout_s,
        )
        self.target = target
        self.web_url = web_url
        self.timeout = timeout
        self.retry = RetryPolicy(retries=retries)
        self.max_message_bytes = max_message_bytes
        self._metadata = auth_metadata(token)
        self._credentials = channel_credentials(tls, root_certificates, client_cert, client_key)
        self._options = channel_options(max_message_bytes, server_name_override, options,
                                        keepalive_s=keepalive_s, keepalive_timeout_s=keepalive_timeout_s)
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
        return self.timeout if isinstance(timeout, Default) else timeout

    def _result(self, rpc: Rpc, response: Any) -> Any:
        result = rpc.parse(response)
        if rpc.jobs:
            wrap = partial(self._job_type, self)
            return [wrap(j) for j in result] if isinstance(result, list) else wrap(result)
        return result

    def _upsert_run(self, collection: str, data: Any, batch_rows: int, progress: bool) -> UpsertRun:
        return UpsertRun(collection, data, batch_rows=batch_rows, progress=progress,
                         max_message_bytes=self.max_message_bytes, retry=self.retry)


class SyncTransport(BaseClient):
    """The blocking calls of :class:`~service.client.sync.Client`: one channel, shared by all
    threads; unary calls retried on UNAVAILABLE, server streams until their first message,
    upserts resumed where that is safe (:class:`~service.client.upsert.UpsertRun`)."""

    def _connect(self) -> None:
        self._channel = self._open(grpc)
        self._stub = stubs(self._channel)
        self._server_has_upsert_batch = True  # until a server older than UpsertBatch says not

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
            return call, next(call, END)

        call, message = call_with_retries(self.retry, start)
        try:
            while message is not END:
                yield self._result(rpc, message)
                message = next(call, END)
        except grpc.RpcError as exc:
            raise error_from_rpc(exc) from None
        finally:
            call.cancel()  # the consumer stopped early (a no-op once the stream has ended)

    def _upsert(self, collection: str, data: Any, batch_rows: int, progress: bool,
                timeout: float | None) -> UpsertSummary:
        with self._upsert_run(collection, data, batch_rows, progress) as run:
            return self._drive_upsert(run, timeout)

    def _drive_upsert(self, run: UpsertRun, timeout: float | None) -> UpsertSummary:
        """Send the run's batches, resuming after UNAVAILABLE where that is safe: one batch
        of a table in memory in a unary ``UpsertBatch``, anything else in an ``Upsert``
        stream (an iterator input is never read ahead of what the stream sends)."""
        while True:
            try:
                batches = run.batches()
                unary = run.table is not None and self._server_has_upsert_batch
                head = list(itertools.islice(batches, 2)) if unary else []
                if len(head) != 1:
                    self._upsert_stream(run, itertools.chain(head, batches), timeout)
                elif not self._upsert_batch(run, head[0], timeout):
                    continue  # a server older than UpsertBatch: again, as a stream
                return run.finish()
            except grpc.RpcError as exc:
                delay = run.retry_delay(exc)
            time.sleep(delay)

    def _upsert_batch(self, run: UpsertRun, batch: EncodedBatch, timeout: float | None) -> bool:
        """One batch in a unary call (a stream of one message costs a thread on each side,
        gRPC's request consumer here and the read-ahead in the server, for nothing). False,
        nothing sent, when the server is older than UpsertBatch: this client streams from
        then on."""
        call = run.call = self._stub["upsert_batch_raw"].future(run.request(batch), timeout=timeout,
                                                                 metadata=self._metadata)
        if run.aborted:
            call.cancel()
        try:
            ack = call.result()
        except grpc.RpcError as exc:
            if exc.code() != grpc.StatusCode.UNIMPLEMENTED:
                raise
            self._server_has_upsert_batch = False
            return False
        run.ack(ack)
        return True

    def _upsert_stream(self, run: UpsertRun, batches: Iterator[EncodedBatch],
                       timeout: float | None) -> None:
        """One Upsert stream: requests produced on gRPC's thread, at most UPSERT_WINDOW of
        them unacknowledged; acknowledgements read here as they arrive."""
        first = next(batches, None)  # encode (and check) the first batch before calling
        if first is None:
            return
        cond = threading.Condition()
        closed = False

        def requests() -> Iterator[bytes]:
            try:
                for batch in itertools.chain([first], batches):
                    with cond:
                        cond.wait_for(lambda: closed or run.in_flight < UPSERT_WINDOW)
                        if closed:
                            return
                        request = run.request(batch)
                    yield request
            except Exception as exc:  # gRPC would swallow it: run.finish() raises it
                run.failure = exc

        call = run.call = self._stub["upsert_raw"](requests(), timeout=timeout, metadata=self._metadata)
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

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._channel.close()
