"""The assay gRPC server.

    assay serve --data ./data --host 127.0.0.1 --port 50051 [--token T ...]
                [--tls-cert cert.pem --tls-key key.pem] [--metrics-port 9090]

In-process (tests, the demo, notebooks)::

    server = start_server(ServerConfig(data="./data", port=0))   # port 0: any free port
    print(server.address)                                          # "127.0.0.1:54321"
    server.stop()

Every setting also comes from an ``ASSAY_*`` environment variable (see
:meth:`ServerConfig.from_env`); command-line flags win. Without a token the server only
binds to loopback unless ``--allow-unauthenticated-remote`` is given, and says so in its
log. SIGTERM/SIGINT stop it gracefully: no new calls are accepted, in-flight calls get the
grace period, running jobs get half of it to finish and are then cancelled; jobs that still
have not ended are recorded as INTERRUPTED; background maintenance is waited for. Once
``stop()`` has returned nothing of the server writes under the data root.

A local data root is locked (``<root>/.assay.lock``) for the server's lifetime: a second
server on it is refused with the first one's pid. Keepalive: clients may ping every
``min_ping_interval_s`` (10 s), so long waits and quiet streams keep their connection
(see :func:`keepalive_options`).
"""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import sys
import threading
from concurrent import futures
from dataclasses import dataclass, field, fields, replace
from datetime import UTC, datetime
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from indexing.datasets import Datasets
from indexing.errors import FailedPrecondition
from indexing.settings import (
    MAINTENANCE_WAIT_S,
    MALLOC_MMAP_THRESHOLD,
    MALLOC_TRIM_EVERY_S,
    server_default,
    server_env,
)
from indexing.store import Store, resolve_root
from service.datasets import add_datasets_servicer
from service.interceptor import AssayInterceptor, Metrics, RateLimiter
from service.job_kinds import register_maintenance_jobs
from service.jobs import JobManager
from service.mining import MiningService, add_mining_servicer
from service.scoring import add_scoring_servicer
from service.servicers import Limits, TextEmbedders, add_servicers

log = logging.getLogger("assay.server")
LOOPBACK = ("127.0.0.1", "localhost", "::1", "[::1]")


def _default(name: str) -> Any:
    return field(default=server_default(name))


@dataclass
class ServerConfig:
    """The server's settings; each field's default, meaning and ``ASSAY_*`` variable are in
    :mod:`indexing.settings` (and the README's table of settings)."""

    data: str | None = _default("data")
    host: str = _default("host")
    port: int = _default("port")
    tokens: tuple[str, ...] = _default("tokens")  # read-write
    read_tokens: tuple[str, ...] = _default("read_tokens")  # read-only: searches, queries, results
    tls_cert: str | None = _default("tls_cert")
    tls_key: str | None = _default("tls_key")
    tls_client_ca: str | None = _default("tls_client_ca")  # require client certificates it signed
    rate_limit: float = _default("rate_limit")  # calls per second per token; 0 = off
    rate_burst: int = _default("rate_burst")  # calls at once above the rate; 0 = max(1, rate)
    allow_unauthenticated_remote: bool = _default("allow_unauthenticated_remote")
    max_message_mb: int = _default("max_message_mb")
    rpc_workers: int = _default("rpc_workers")
    job_workers: int = _default("job_workers")
    max_jobs: int = _default("max_jobs")
    grace_s: float = _default("grace_s")
    metrics_port: int | None = _default("metrics_port")
    http_port: int | None = _default("http_port")  # the web page (read-only); None = off, 0 = any
    data_roots: tuple[str, ...] = _default("data_roots")  # where the page may read images from
    optimize_every: int = _default("optimize_every")
    write_log: bool = _default("write_log")  # acknowledge small upserts from the write-ahead log
    # Connections (see README "Connections that hold for hours"). Clients may ping every
    # min_ping_interval_s while calls are in flight or not; the server pings a quiet
    # connection after keepalive_s and drops it when no answer comes in keepalive_timeout_s.
    keepalive_s: float = _default("keepalive_s")
    keepalive_timeout_s: float = _default("keepalive_timeout_s")
    min_ping_interval_s: float = _default("min_ping_interval_s")
    max_ping_strikes: int = _default("max_ping_strikes")  # early pings before GOAWAY "too_many_pings"
    max_connection_idle_s: float = _default("max_connection_idle_s")  # 0 = never
    max_connection_age_s: float = _default("max_connection_age_s")  # 0 = never
    max_connection_age_grace_s: float = _default("max_connection_age_grace_s")  # 0 = no limit
    limits: Limits = field(default_factory=Limits)

    @classmethod
    def from_env(cls, **overrides: Any) -> ServerConfig:
        """Defaults, then ``ASSAY_*`` variables (:func:`indexing.settings.server_env`: each
        field's ``ASSAY_<FIELD>``, ``ASSAY_TOKEN`` and ``ASSAY_READ_TOKEN`` comma-separated
        for several, ``ASSAY_MAX_K`` and ``ASSAY_MAX_BATCH_ROWS`` for the limits), then
        non-None ``overrides``."""
        cfg = cls()
        limit_names = {f.name for f in fields(Limits)}
        env = server_env()
        for name, value in env.items():
            if name not in limit_names:
                setattr(cfg, name, value)
        lim = {k: v for k, v in env.items() if k in limit_names}
        if lim:
            cfg.limits = replace(cfg.limits, **lim)
        for k, v in overrides.items():
            if v is not None:
                setattr(cfg, k, v)
        return cfg


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message (+ exception)."""

    def format(self, record: logging.LogRecord) -> str:
        out = {"time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
               "level": record.levelname, "logger": record.name, "message": record.getMessage()}
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        return json.dumps(out)


def configure_logging(level: str = "INFO", fmt: str = "json") -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else
                         logging.Formatter("%(asctime)s %(levelname)s %(name)s %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())


def _libc() -> Any:
    import ctypes

    return ctypes.CDLL("libc.so.6")


def limit_malloc_arenas(arenas: int = 2, mmap_threshold: int = MALLOC_MMAP_THRESHOLD) -> None:
    """Cap glibc's malloc arenas (default: 8 per core) and fix its mmap threshold. Each of
    the server's many threads otherwise gets an arena of its own, and memory freed in one is
    not reused by another: the process grows under a steady load (a 100 s write soak: 1.47
    GB against 1.12 GB capped). glibc also raises its mmap threshold (up to 32 MiB) each
    time a large block is freed, so the large, short-lived buffers of scans and commits move
    into the heap and leave it fragmented; a fixed threshold keeps them mmapped, returned to
    the system when freed. A no-op where glibc is not the allocator."""
    try:
        libc = _libc()
        libc.mallopt(-8, arenas)  # M_ARENA_MAX
        if mmap_threshold > 0:
            libc.mallopt(-3, mmap_threshold)  # M_MMAP_THRESHOLD (fixed: no dynamic raise)
    except (OSError, AttributeError):
        pass


class MallocTrimmer:
    """Gives the heap's free pages back to the system every ``every_s`` seconds
    (``malloc_trim(0)``: glibc keeps freed memory inside its arenas otherwise, and a server
    that mixes scans, commits and searches frees in holes the top-of-heap trim never sees).
    A no-op where glibc is not the allocator or ``every_s`` is 0."""

    def __init__(self, every_s: float) -> None:
        self.every_s = every_s
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        try:
            self._trim = _libc().malloc_trim
        except (OSError, AttributeError):
            self._trim = None

    def start(self) -> None:
        if self._trim is None or self.every_s <= 0:
            return
        self._thread = threading.Thread(target=self._run, name="assay-malloc-trim", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self.every_s):
            self._trim(0)

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)


def keepalive_options(cfg: ServerConfig) -> list[tuple[str, int]]:
    """The server's HTTP/2 keepalive policy and connection limits as gRPC channel args.

    gRPC's defaults refuse client pings more often than every 5 minutes while the server
    sends nothing, and answer the third early one with GOAWAY "too_many_pings": a
    ``job.wait()`` or a quiet ``score_stream`` longer than that lost its connection. Here
    clients may ping every ``min_ping_interval_s`` (the Python client pings after 60 s of
    silence), with or without calls in flight. A max connection age, when set, sends GOAWAY
    so that new calls reconnect; calls in flight keep running for the grace period — with
    no grace limit (the default) a stream is never cut by the age."""
    ms = lambda seconds: int(round(seconds * 1000))  # noqa: E731
    options = [
        ("grpc.keepalive_time_ms", ms(cfg.keepalive_s)),
        ("grpc.keepalive_timeout_ms", ms(cfg.keepalive_timeout_s)),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.min_ping_interval_without_data_ms", ms(cfg.min_ping_interval_s)),
        ("grpc.http2.max_ping_strikes", int(cfg.max_ping_strikes)),
        ("grpc.http2.max_pings_without_data", 0),  # the server's own keepalive pings: no cap
    ]
    if cfg.max_connection_idle_s > 0:
        options.append(("grpc.max_connection_idle_ms", ms(cfg.max_connection_idle_s)))
    if cfg.max_connection_age_s > 0:
        options.append(("grpc.max_connection_age_ms", ms(cfg.max_connection_age_s)))
        if cfg.max_connection_age_grace_s > 0:
            options.append(("grpc.max_connection_age_grace_ms", ms(cfg.max_connection_age_grace_s)))
    return options


LOCK_FILE = ".assay.lock"


class DataRootInUse(FailedPrecondition):
    """Another server holds the data root's lock."""


class DataRootLock:
    """An exclusive ``flock`` on ``<root>/.assay.lock``, held for a server's lifetime: a
    second server on the same local data root (another process, or another server in this
    one) is refused instead of sharing the job, run and dataset records. The kernel drops
    the lock when the process ends, however it ends, so a crash leaves nothing to clean
    up. Object-store roots (``s3://``) have no such lock."""

    def __init__(self, root: str) -> None:
        self.path = os.path.join(root, LOCK_FILE)
        self.root = root
        self._fd: int | None = None

    def acquire(self) -> None:
        try:
            import fcntl
        except ImportError:  # not a POSIX system: no flock
            log.warning("cannot lock the data root %s on this platform: run one server per root", self.root)
            return
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = os.read(fd, 512).decode(errors="replace").strip() or "a process that has not said its pid yet"
            os.close(fd)
            raise DataRootInUse(
                f"the data root {self.root} is in use by another assay server ({holder}); stop that "
                f"server first, or serve another data root (lock file {self.path})") from None
        os.ftruncate(fd, 0)
        os.write(fd, f"pid {os.getpid()} on {socket.gethostname()}, since "
                     f"{datetime.now(UTC).isoformat(timespec='seconds')}\n".encode())
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            fd, self._fd = self._fd, None
            os.close(fd)  # closing the only descriptor releases the flock


# How long stop() waits at least for a background optimize already running (a compaction,
# an index build: Lance cannot interrupt them); the grace period when that is longer.


class AssayServer:
    def __init__(self, config: ServerConfig) -> None:
        limit_malloc_arenas()
        self._trimmer = MallocTrimmer(MALLOC_TRIM_EVERY_S)
        self.config = config
        root = resolve_root(config.data)
        self._lock: DataRootLock | None = None
        if "://" not in root or root.startswith("file://"):
            root = os.path.abspath(root.removeprefix("file://"))
            os.makedirs(root, exist_ok=True)
            self._lock = DataRootLock(root)
            self._lock.acquire()  # before anything reads or marks the records of jobs and runs
        try:
            self._build(config, root)
        except BaseException:
            if self._lock is not None:
                self._lock.release()
            raise

    def _build(self, config: ServerConfig, root: str) -> None:
        self.store = Store(root, optimize_every=config.optimize_every, write_log=config.write_log)
        self.jobs = JobManager(self.store, workers=config.job_workers, max_queued=config.max_jobs)
        register_maintenance_jobs(self.jobs)
        self.metrics = Metrics()
        self.metrics.watch_store(self.store)
        # One bucket per token shared by the gRPC and web ports.
        self._rate_limiter = (RateLimiter(config.rate_limit, config.rate_burst or None)
                              if config.rate_limit > 0 else None)
        max_bytes = config.max_message_mb * 1024 * 1024
        self.grpc = grpc.server(
            futures.ThreadPoolExecutor(max_workers=config.rpc_workers, thread_name_prefix="assay-rpc"),
            interceptors=[AssayInterceptor(
                config.tokens, self.metrics, read_tokens=config.read_tokens,
                rate_limiter=self._rate_limiter, data_root=self.store.root,
            )],
            options=[("grpc.max_receive_message_length", max_bytes),
                     ("grpc.max_send_message_length", max_bytes),
                     ("grpc.so_reuseport", 0),
                     *keepalive_options(config)],
        )
        self.embedders = TextEmbedders()
        self.mining = MiningService(self.store, self.jobs, self.embedders)
        self.datasets = Datasets(self.store, run_ids=self.mining.runs.result_ids)
        names = add_servicers(self.grpc, self.store, self.jobs, config.limits, self.embedders,
                              datasets=self.datasets, run_ids=self.mining.runs.result_ids,
                              run_scores=self.mining.runs.result_scores)
        names.append(add_mining_servicer(self.grpc, self.mining))
        names.append(add_scoring_servicer(self.grpc, self.store, config.limits))
        names.append(add_datasets_servicer(self.grpc, self.store, self.datasets, config.limits.max_page_rows))
        self.health = health.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.grpc)
        reflection.enable_server_reflection([*names, health.SERVICE_NAME, reflection.SERVICE_NAME], self.grpc)
        self._service_names = names
        self.port: int | None = None
        self.host = config.host
        self._stopped = threading.Event()
        self._metrics_server: Any = None
        self.web: Any = None

    @property
    def address(self) -> str:
        host = f"[{self.host}]" if ":" in self.host and not self.host.startswith("[") else self.host
        return f"{host}:{self.port}"

    def start(self) -> int:
        try:
            return self._start()
        except BaseException:
            self.stop(0)  # releases what was started, and the data root's lock
            raise

    def _start(self) -> int:
        cfg = self.config
        host = cfg.host
        auth = bool(cfg.tokens or cfg.read_tokens)
        if not auth and host not in LOOPBACK and not cfg.allow_unauthenticated_remote:
            log.warning("no token configured: binding to 127.0.0.1 instead of %s; set --token (or ASSAY_TOKEN) "
                        "to serve other hosts, or --allow-unauthenticated-remote to serve them without auth", host)
            host = "127.0.0.1"
        elif not auth:
            log.warning("no token configured: every client that reaches %s has full access", host)
        self.host = host
        bind = f"[{host}]:{cfg.port}" if ":" in host else f"{host}:{cfg.port}"
        if cfg.tls_client_ca and not cfg.tls_cert:
            raise ValueError("mutual TLS (--tls-client-ca) needs TLS: give --tls-cert and --tls-key too")
        if cfg.tls_cert or cfg.tls_key:
            if not (cfg.tls_cert and cfg.tls_key):
                raise ValueError("TLS needs both --tls-cert and --tls-key")
            with open(cfg.tls_key, "rb") as k, open(cfg.tls_cert, "rb") as c:
                pair = [(k.read(), c.read())]
            if cfg.tls_client_ca:
                with open(cfg.tls_client_ca, "rb") as ca:
                    creds = grpc.ssl_server_credentials(pair, root_certificates=ca.read(),
                                                        require_client_auth=True)
            else:
                creds = grpc.ssl_server_credentials(pair)
            self.port = self.grpc.add_secure_port(bind, creds)
        else:
            self.port = self.grpc.add_insecure_port(bind)
        if not self.port:
            raise OSError(f"could not bind {bind}")
        self.grpc.start()
        self._trimmer.start()
        for name in ["", *self._service_names]:
            self.health.set(name, health_pb2.HealthCheckResponse.SERVING)
        if cfg.metrics_port is not None:
            from prometheus_client import start_http_server

            self._metrics_server, _ = start_http_server(cfg.metrics_port, addr=host, registry=self.metrics.registry)
            log.info("Prometheus metrics on http://%s:%d/metrics", host, self._metrics_server.server_port)
        if cfg.http_port is not None:
            self.web = self._start_web(host)
        log.info("assay serving %s on %s (%s, %s)", self.store.root, self.address,
                 ("mutual TLS" if cfg.tls_client_ca else "TLS") if cfg.tls_cert else "plaintext",
                 f"{len(cfg.tokens)} read-write and {len(cfg.read_tokens)} read-only token(s)" if auth else "no auth")
        return self.port

    def _start_web(self, host: str) -> Any:
        from service.web.app import LOOPBACK_HOSTS, WebApp, WebServer

        cfg = self.config
        roots = cfg.data_roots or (() if "://" in self.store.root else (self.store.root,))
        auth = bool(cfg.tokens or cfg.read_tokens)
        # Without auth, only loopback host names (DNS rebinding); with it, any host.
        allowed = None if auth or cfg.allow_unauthenticated_remote else (*LOOPBACK_HOSTS, host)
        app = WebApp(self.store, self.mining.runs, self.datasets, self.embedders, tokens=cfg.tokens,
                     read_tokens=cfg.read_tokens, data_roots=roots, rate_limiter=self._rate_limiter,
                     allowed_hosts=allowed, grpc_address=self.address, secure=bool(cfg.tls_cert))
        web = WebServer(app, host, cfg.http_port or 0, tls_cert=cfg.tls_cert, tls_key=cfg.tls_key,
                        tls_client_ca=cfg.tls_client_ca)
        web.start()
        log.info("web page on %s (images from %s)", web.url, ", ".join(app.roots.describe()) or "nowhere")
        return web

    @property
    def web_url(self) -> str | None:
        """The web page's address when ``http_port`` is set."""
        return None if self.web is None else self.web.url

    @property
    def metrics_port(self) -> int | None:
        return None if self._metrics_server is None else self._metrics_server.server_port

    def stop(self, grace: float | None = None) -> None:
        """Stop accepting calls, give in-flight calls and jobs ``grace`` seconds, then stop.

        When it returns, the server's background work has ended: calls, jobs (finished,
        cancelled or recorded INTERRUPTED), the web and metrics threads, and the automatic
        optimize of collections and dataset tables (waited for up to ``MAINTENANCE_WAIT_S``
        more, as Lance cannot interrupt a compaction). Then the data root's lock is
        released. Work that still runs after those waits is logged, and the lock is kept
        until it ends with the process, so that no second server starts under it."""
        if self._stopped.is_set():
            return
        self._stopped.set()
        grace = self.config.grace_s if grace is None else grace
        log.info("shutting down (grace %.1fs)", grace)
        self.health.enter_graceful_shutdown()
        done = self.grpc.stop(grace)
        jobs_ended = self.jobs.shutdown(grace)
        done.wait(grace + 1)
        if self._metrics_server is not None:
            self._metrics_server.shutdown()
        if self.web is not None:
            self.web.stop()
        self._trimmer.stop()
        wait_s = max(grace, MAINTENANCE_WAIT_S)
        idle = self.store.close(timeout=wait_s)
        idle = self.datasets.close(timeout=wait_s) and idle
        if self._lock is not None:
            if jobs_ended and idle:
                self._lock.release()
            else:
                log.warning("background work is still running: the data root stays locked until "
                            "this process ends")
        log.info("stopped")

    def wait(self) -> None:
        self._stopped.wait()
        self.grpc.wait_for_termination(timeout=self.config.grace_s + 5)


def start_server(config: ServerConfig | None = None, **overrides: Any) -> AssayServer:
    """Start a server in this process and return it (``server.address``, ``server.stop()``)."""
    cfg = config or ServerConfig.from_env()
    for k, v in overrides.items():
        setattr(cfg, k, v)
    server = AssayServer(cfg)
    server.start()
    return server


def serve(config: ServerConfig) -> None:
    """Run until SIGTERM/SIGINT, then shut down gracefully."""
    server = AssayServer(config)
    server.start()

    def on_signal(signum: int, _frame: Any) -> None:
        log.info("received %s", signal.Signals(signum).name)
        threading.Thread(target=server.stop, daemon=True).start()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    print(f"assay listening on {server.address}", flush=True)
    if server.web_url:
        print(f"assay web page on {server.web_url}", flush=True)
    server.wait()
