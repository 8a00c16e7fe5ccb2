"""One server interceptor for every RPC: authentication, scopes, rate limits, error
mapping, metrics, logs.

Tokens carry a scope: read-write tokens may call everything; read-only tokens only the
methods in ``READ_ONLY_METHODS`` (an allowlist: a method added later is a write until it
is listed here). Each token may be rate limited (a token bucket of ``rate`` calls/s with a
burst of ``burst``): over it, RESOURCE_EXHAUSTED names the limit.

Servicers raise :class:`indexing.errors.AssayError` subclasses; this wrapper turns them
into the matching gRPC status with the error's message (never a bare UNKNOWN with a
traceback). Failures of Lance or the OS that are not bugs — a full disk, an object store
that does not answer, a filter failing on the data — are recognised by
:func:`indexing.errors.classify_error` (RESOURCE_EXHAUSTED, UNAVAILABLE, INVALID_ARGUMENT). Anything else is a bug: it is logged with a request id and answered INTERNAL
with that id, so an operator can find the traceback without leaking it to the caller.
"""

from __future__ import annotations

import hmac
import logging
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from typing import TYPE_CHECKING, Any

import grpc

from indexing.errors import classify_error
from indexing.settings import MAX_MESSAGE_CHARS

if TYPE_CHECKING:
    from indexing.store import Store

log = logging.getLogger("assay.rpc")

STATUS: dict[str, grpc.StatusCode] = {code.name: code for code in grpc.StatusCode}
# Open without a token: load balancers and tooling must reach these.
OPEN_PREFIXES = ("/grpc.health.v1.Health/", "/grpc.reflection.")
# What a read-only token may call (method names are unique across assay's services).
READ_ONLY_METHODS = frozenset({
    "ListCollections", "DescribeCollection",
    "Search",
    "Scan", "Count", "Take", "Page", "Aggregate", "Export",
    "GetJob", "WatchJob", "ListJobs",
    "ListMiners", "GetRun", "ListRuns", "RunResults",
    "GetDataset", "ListDatasets", "GetStatus", "History", "Checkout", "Diff",
    "Score", "Calibrate", "ExportScorer",
})


class RateLimiter:
    """A token bucket per caller: ``rate`` calls per second on average, ``burst`` at once."""

    def __init__(self, rate: float, burst: int | None = None) -> None:
        self.rate = float(rate)
        self.burst = float(burst if burst is not None else max(1, int(rate)))
        self._buckets: dict[bytes, tuple[float, float]] = {}
        self._lock = threading.Lock()

    def allow(self, key: bytes) -> bool:
        now = time.monotonic()
        with self._lock:
            level, last = self._buckets.get(key, (self.burst, now))
            level = min(self.burst, level + (now - last) * self.rate)
            if level < 1.0:
                self._buckets[key] = (level, now)
                return False
            self._buckets[key] = (level - 1.0, now)
            return True


def _bearer(metadata: Iterable[tuple[str, Any]] | None) -> bytes | None:
    for key, value in metadata or ():
        if key == "authorization":
            raw = value.encode() if isinstance(value, str) else value
            if raw.startswith(b"Bearer "):
                return raw[len(b"Bearer "):].strip()
    return None




def clip_message(message: str, limit: int = MAX_MESSAGE_CHARS) -> str:
    """A status message short enough for the trailing metadata: gRPC clients drop a call
    whose metadata passes 8 KB (and answer RESOURCE_EXHAUSTED about metadata instead of the
    real error), and a message that echoes a long filter would. The start (what failed)
    and the end (why) are kept."""
    if len(message) <= limit:
        return message
    half = limit // 2
    return f"{message[:half]} ... [{len(message) - 2 * half} characters cut] ... {message[-half:]}"


class _Abort(Exception):
    def __init__(self, code: grpc.StatusCode, message: str):
        super().__init__(message)
        self.code, self.message = code, message


class Metrics:
    """Prometheus RPC counters and latency histograms on a registry of this server's own."""

    def __init__(self) -> None:
        from prometheus_client import CollectorRegistry, Counter, Histogram

        self.registry = CollectorRegistry()
        self.requests = Counter(
            "assay_rpc_requests_total", "RPCs handled, by method and status code.",
            ["method", "code"], registry=self.registry,
        )
        self.latency = Histogram(
            "assay_rpc_latency_seconds", "RPC latency (to the end of the response stream).",
            ["method"], registry=self.registry,
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
        )

    def observe(self, method: str, code: str, seconds: float) -> None:
        self.requests.labels(method, code).inc()
        self.latency.labels(method).observe(seconds)

    def watch_store(self, store: Store) -> None:
        """Export what the group committers of ``store``'s open collections have done,
        read at each scrape: commits, the writes they held (their ratio: writes a commit),
        and the leader's lingers (see ``indexing/group_commit.py``); the memory the store
        holds, by holder (:meth:`Store.memory_held`); and the process's own figures
        (``process_resident_memory_bytes``, CPU seconds, open files: prometheus_client's
        process collector), so that what grows can be told from the RSS at one scrape."""
        from prometheus_client import ProcessCollector

        self.registry.register(_GroupCommitCollector(store))
        self.registry.register(_MemoryCollector(store))
        ProcessCollector(registry=self.registry)


class _GroupCommitCollector:
    def __init__(self, store: Store) -> None:
        self._store = store

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import CounterMetricFamily

        families = {
            "commits": CounterMetricFamily(
                "assay_group_commits", "Commits of the group committer (upserts, updates, tags, deletes).",
                labels=["collection"]),
            "writes": CounterMetricFamily(
                "assay_group_commit_writes", "Writes those commits held (writes / commits: the mean group).",
                labels=["collection"]),
            "lingers": CounterMetricFamily(
                "assay_group_commit_lingers", "Times a commit waited for the writers the last one answered.",
                labels=["collection"]),
            "lingered_s": CounterMetricFamily(
                "assay_group_commit_linger_seconds", "Time those waits took.", labels=["collection"]),
        }
        for name, stats in sorted(self._store.commit_stats().items()):
            for attr, family in families.items():
                family.add_metric([name], float(getattr(stats, attr)))
        yield from families.values()


class _MemoryCollector:
    def __init__(self, store: Store) -> None:
        self._store = store

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import GaugeMetricFamily

        family = GaugeMetricFamily(
            "assay_memory_bytes", "Memory the store holds, by holder (LanceDB's caches, the vectors "
            "of exact search and its live rows, the miners' per-fragment scores, the id indexes).",
            labels=["holder"])
        for holder, held in sorted(self._store.memory_held().items()):
            family.add_metric([holder], float(held))
        yield family


class AssayInterceptor(grpc.ServerInterceptor):
    def __init__(self, tokens: Iterable[str] = (), metrics: Metrics | None = None, *,
                 read_tokens: Iterable[str] = (), rate_limiter: RateLimiter | None = None,
                 data_root: str | None = None) -> None:
        self.data_root = data_root  # named in storage errors (a full disk, a lost object store)
        self._tokens = [t.encode() for t in tokens if t]
        self._read_tokens = [t.encode() for t in read_tokens if t]
        self.metrics = metrics
        self.rate_limiter = rate_limiter

    def intercept_service(self, continuation: Callable, details: grpc.HandlerCallDetails) -> Any:
        handler = continuation(details)
        if handler is None:
            return None
        method = details.method
        short = method.rsplit("/", 1)[-1]
        denied = self._denied(method, short, details.invocation_metadata)
        if handler.unary_unary:
            return grpc.unary_unary_rpc_method_handler(
                self._unary(handler.unary_unary, short, denied),
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        if handler.unary_stream:
            return grpc.unary_stream_rpc_method_handler(
                self._streaming(handler.unary_stream, short, denied),
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        if handler.stream_unary:
            return grpc.stream_unary_rpc_method_handler(
                self._unary(handler.stream_unary, short, denied),
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        return grpc.stream_stream_rpc_method_handler(
            self._streaming(handler.stream_stream, short, denied),
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )

    def _denied(self, method: str, short: str,
                metadata: Iterable[tuple[str, Any]] | None) -> _Abort | None:
        """None if the call may proceed, else the status to answer with."""
        if method.startswith(OPEN_PREFIXES):
            return None
        given = _bearer(metadata)
        # A bucket per token the server knows; without auth every caller is anonymous: one
        # bucket (a bucket per token sent would let a caller dodge the limit, and the server
        # keep one for every string it was ever sent).
        auth = bool(self._tokens or self._read_tokens)
        key = (given or b"") if auth else b""
        if auth:
            # compare against every token so timing does not reveal which matched
            write = any([hmac.compare_digest(given, t) for t in self._tokens]) if given else False
            read = any([hmac.compare_digest(given, t) for t in self._read_tokens]) if given else False
            if not (write or read):
                return _Abort(grpc.StatusCode.UNAUTHENTICATED,
                              "missing or invalid token: send metadata 'authorization: Bearer <token>'")
            if not write and short not in READ_ONLY_METHODS:
                return _Abort(grpc.StatusCode.PERMISSION_DENIED,
                              f"this token is read-only: {short} changes data; use a read-write token")
        if self.rate_limiter is not None and not self.rate_limiter.allow(key):
            return _Abort(grpc.StatusCode.RESOURCE_EXHAUSTED,
                          f"rate limit exceeded: {self.rate_limiter.rate:g} calls/s per token "
                          f"(burst {self.rate_limiter.burst:g}); retry after a short wait")
        return None

    def _unary(self, behavior: Callable, method: str, denied: _Abort | None) -> Callable:
        def wrapped(request: Any, context: grpc.ServicerContext) -> Any:
            start = time.perf_counter()
            try:
                if denied:
                    raise denied
                response = behavior(request, context)
            except Exception as exc:  # every failure becomes a status
                code, message = self._status_of(exc, context, method)
                self._record(method, code.name, start)
                context.abort(code, message)
            self._record(method, "OK", start)
            return response

        return wrapped

    def _streaming(self, behavior: Callable, method: str, denied: _Abort | None) -> Callable:
        def wrapped(request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
            start = time.perf_counter()
            try:
                if denied:
                    raise denied
                yield from behavior(request, context)
            except GeneratorExit:  # the client went away
                self._record(method, "CANCELLED", start)
                raise
            except Exception as exc:
                code, message = self._status_of(exc, context, method)
                self._record(method, code.name, start)
                context.abort(code, message)
            self._record(method, "OK", start)

        return wrapped

    def _status_of(self, exc: Exception, context: grpc.ServicerContext,
                   method: str) -> tuple[grpc.StatusCode, str]:
        if isinstance(exc, _Abort):
            code, message = exc.code, exc.message
        elif context.code() not in (None, grpc.StatusCode.OK):
            # The servicer already chose a status (context.abort): keep it.
            code, message = context.code(), context.details() or ""
            if isinstance(message, bytes):
                message = message.decode(errors="replace")
        elif isinstance(exc, grpc.RpcError) and not context.is_active():
            # Reading the request stream of a call that already ended (the client cancelled,
            # its deadline passed, or gRPC refused an oversized message): nothing to answer.
            code, message = grpc.StatusCode.CANCELLED, "the call ended while its requests were being read"
        elif (mapped := classify_error(exc, self.data_root)) is not None:
            # An AssayError; or the caller's filter failing on the data, a full disk, an
            # unreachable object store.
            code, message = STATUS.get(mapped.code, grpc.StatusCode.INTERNAL), mapped.message
            # The field and row an error names, for programs (the client's err.field /
            # err.row): e.g. which row of an upsert batch to leave out and send again.
            located = [(key, str(value)) for key, value in (("assay-field", mapped.field),
                                                            ("assay-row", mapped.row))
                       if value is not None]
            if located:
                context.set_trailing_metadata(tuple(located))
            if mapped is not exc and mapped.code in ("RESOURCE_EXHAUSTED", "UNAVAILABLE"):
                log.warning("%s -> %s: %s", method, mapped.code, message)
        else:
            request_id = uuid.uuid4().hex[:12]
            log.error("internal error in %s (request id %s)", method, request_id, exc_info=exc)
            code = grpc.StatusCode.INTERNAL
            message = f"internal error (request id {request_id}); the server log has the details"
        if code != grpc.StatusCode.INTERNAL:
            log.info("%s -> %s: %s", method, code.name, message)
        return code, clip_message(message)

    def _record(self, method: str, code: str, start: float) -> None:
        seconds = time.perf_counter() - start
        if self.metrics is not None:
            self.metrics.observe(method, code, seconds)
        log.debug("%s %s %.1fms", method, code, seconds * 1000)
