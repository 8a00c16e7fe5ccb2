"""The client's connection: retries, channel options, credentials, stubs.

Only UNAVAILABLE is retried (the request did not reach a working server), with a
jittered exponential backoff; see :class:`RetryPolicy`. Defaults: :mod:`indexing.settings`.
"""

from __future__ import annotations

import asyncio
import os
import random
import time
from collections.abc import Awaitable, Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any, Final, TypeVar

import grpc
import grpc.aio
from grpc_health.v1 import health_pb2_grpc

from indexing.settings import (
    CLIENT_KEEPALIVE_S,
    CLIENT_KEEPALIVE_TIMEOUT_S,
    CLIENT_MAX_MESSAGE_BYTES,
    CLIENT_RETRIES,
    RETRY_BASE_DELAY_S,
    RETRY_MAX_DELAY_S,
)
from protos.assay.v1 import (
    collections_pb2_grpc,
    datasets_pb2_grpc,
    ingest_pb2,
    ingest_pb2_grpc,
    jobs_pb2_grpc,
    mining_pb2_grpc,
    query_pb2_grpc,
    scoring_pb2_grpc,
    search_pb2_grpc,
)
from service.client.errors import error_from_rpc, invalid

T = TypeVar("T")
DEFAULT_MAX_MESSAGE_BYTES: Final = CLIENT_MAX_MESSAGE_BYTES
DEFAULT_KEEPALIVE_S: Final = CLIENT_KEEPALIVE_S
DEFAULT_KEEPALIVE_TIMEOUT_S: Final = CLIENT_KEEPALIVE_TIMEOUT_S


@dataclass
class RetryPolicy:
    """Retries of UNAVAILABLE: ``retries`` more attempts, sleeping a jittered exponential
    backoff (``base_delay`` doubling up to ``max_delay``) before each."""

    retries: int = CLIENT_RETRIES
    base_delay: float = RETRY_BASE_DELAY_S
    max_delay: float = RETRY_MAX_DELAY_S

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


def channel_options(
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
    server_name_override: str | None = None,
    extra: Iterable[tuple[str, Any]] = (),
    *,
    keepalive_s: float = DEFAULT_KEEPALIVE_S,
    keepalive_timeout_s: float = DEFAULT_KEEPALIVE_TIMEOUT_S,
) -> list[tuple[str, Any]]:
    """Channel arguments: the message limit both ways; a keepalive ping after
    ``keepalive_s`` without activity while calls are in flight, for as long as they are
    (a wait of hours stays checked), the connection dropped when no answer comes in
    ``keepalive_timeout_s``. An assay server accepts pings every 10 s (its
    ``min_ping_interval_s``); other gRPC servers refuse pings more often than every 5 min by
    default. ``extra`` arguments replace the defaults of the same name (gRPC itself would
    keep the first of two)."""
    options: dict[str, Any] = {
        "grpc.max_send_message_length": max_message_bytes,
        "grpc.max_receive_message_length": max_message_bytes,
        "grpc.keepalive_time_ms": int(round(keepalive_s * 1000)),
        "grpc.keepalive_timeout_ms": int(round(keepalive_timeout_s * 1000)),
        "grpc.keepalive_permit_without_calls": 0,
        # gRPC stops pinging after 2 pings without data by default: keepalive would then
        # stop checking a long job.wait() or a quiet stream after two intervals.
        "grpc.http2.max_pings_without_data": 0,
        "grpc.primary_user_agent": "assay-client/0.1",
    }
    if server_name_override:
        options["grpc.ssl_target_name_override"] = server_name_override
    options.update(dict(extra))
    return list(options.items())


def read_pem(value: bytes | str | os.PathLike[str] | None) -> bytes | None:
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
        raise invalid("mutual TLS needs both client_cert and client_key")
    return grpc.ssl_channel_credentials(root_certificates=read_pem(root_certificates),
                                        private_key=read_pem(client_key), certificate_chain=read_pem(client_cert))


def auth_metadata(token: str | None) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {token}"),) if token else ()


def stubs(channel: grpc.Channel | grpc.aio.Channel) -> dict[str, Any]:
    """Generated stubs work on sync and aio channels alike."""
    return {
        "collections": collections_pb2_grpc.CollectionsStub(channel),
        "ingest": ingest_pb2_grpc.IngestStub(channel),
        # Upsert requests arrive serialised (service.client.upsert.serialize_request).
        "upsert_raw": channel.stream_stream("/assay.v1.Ingest/Upsert", request_serializer=None,
                                            response_deserializer=ingest_pb2.UpsertAck.FromString),
        "upsert_batch_raw": channel.unary_unary("/assay.v1.Ingest/UpsertBatch", request_serializer=None,
                                                response_deserializer=ingest_pb2.UpsertAck.FromString),
        "search": search_pb2_grpc.SearchStub(channel),
        "query": query_pb2_grpc.QueryStub(channel),
        "jobs": jobs_pb2_grpc.JobsStub(channel),
        "mining": mining_pb2_grpc.MiningStub(channel),
        "datasets": datasets_pb2_grpc.DatasetsStub(channel),
        "scoring": scoring_pb2_grpc.ScoringStub(channel),
        "health": health_pb2_grpc.HealthStub(channel),
    }
