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
have not ended are recorded as INTERRUPTED.
"""

from __future__ import annotations

import json
import logging
import os
import signal
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
from indexing.store import Store
from service.datasets import add_datasets_servicer
from service.interceptor import AssayInterceptor, Metrics, RateLimiter
from service.job_kinds import register_maintenance_jobs
from service.jobs import JobManager
from service.mining import MiningService, add_mining_servicer
from service.scoring import add_scoring_servicer
from service.servicers import Limits, TextEmbedders, add_servicers

log = logging.getLogger("assay.server")
LOOPBACK = ("127.0.0.1", "localhost", "::1", "[::1]")


@dataclass
class ServerConfig:
    data: str | None = None
    host: str = "127.0.0.1"
    port: int = 50051
    tokens: tuple[str, ...] = ()  # read-write
    read_tokens: tuple[str, ...] = ()  # read-only: searches, queries, results; no writes or jobs
    tls_cert: str | None = None
    tls_key: str | None = None
    tls_client_ca: str | None = None  # PEM CA bundle: require client certificates it signed (mTLS)
    rate_limit: float = 0.0  # calls per second per token (per anonymous caller without auth); 0 = off
    rate_burst: int = 0  # calls at once above the rate; 0 = max(1, rate)
    allow_unauthenticated_remote: bool = False
    max_message_mb: int = 64
    rpc_workers: int = 16
    job_workers: int = 2
    max_jobs: int = 64
    grace_s: float = 10.0
    metrics_port: int | None = None
    http_port: int | None = None  # the web page and its JSON API (read-only); None = off, 0 = any free port
    data_roots: tuple[str, ...] = ()  # where the page may read images from; () = the data root when it is local
    optimize_every: int = 20
    limits: Limits = field(default_factory=Limits)

    @classmethod
    def from_env(cls, **overrides: Any) -> ServerConfig:
        """Defaults, then ``ASSAY_*`` variables, then non-None ``overrides``.

        ASSAY_DATA, ASSAY_HOST, ASSAY_PORT, ASSAY_TOKEN and ASSAY_READ_TOKEN (comma-separated
        for several), ASSAY_TLS_CERT, ASSAY_TLS_KEY, ASSAY_TLS_CLIENT_CA, ASSAY_RATE_LIMIT,
        ASSAY_RATE_BURST, ASSAY_ALLOW_UNAUTHENTICATED_REMOTE (1/true),
        ASSAY_MAX_MESSAGE_MB, ASSAY_RPC_WORKERS, ASSAY_JOB_WORKERS, ASSAY_MAX_JOBS,
        ASSAY_GRACE_S, ASSAY_METRICS_PORT, ASSAY_HTTP_PORT, ASSAY_DATA_ROOTS (comma-separated),
        ASSAY_OPTIMIZE_EVERY, ASSAY_MAX_K,
        ASSAY_MAX_BATCH_ROWS.
        """
        env = os.environ
        cfg = cls()
        conv = {int: int, float: float, bool: lambda v: v.lower() in ("1", "true", "yes", "on")}
        for f in fields(cls):
            key = {"tokens": "ASSAY_TOKEN", "read_tokens": "ASSAY_READ_TOKEN"}.get(f.name, f"ASSAY_{f.name.upper()}")
            if key not in env or f.name == "limits":
                continue
            raw = env[key]
            if f.name in ("tokens", "read_tokens", "data_roots"):
                value: Any = tuple(t.strip() for t in raw.split(",") if t.strip())
            else:
                base = {"int": int, "float": float, "bool": bool}.get(str(f.type).split(" ")[0])
                value = conv[base](raw) if base else raw
            setattr(cfg, f.name, value)
        lim = {k: int(env[f"ASSAY_{k.upper()}"]) for k in ("max_k", "max_batch_rows") if f"ASSAY_{k.upper()}" in env}
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


def limit_malloc_arenas(arenas: int = 2) -> None:
    """Cap glibc's malloc arenas (default: 8 per core). Each of the server's many threads
    otherwise gets an arena of its own, and memory freed in one is not reused by another:
    the process grows under a steady load (a 100 s write soak: 1.47 GB against 1.12 GB
    capped). A no-op where glibc is not the allocator."""
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-8, arenas)  # M_ARENA_MAX
    except (OSError, AttributeError):
        pass


class AssayServer:
    def __init__(self, config: ServerConfig) -> None:
        limit_malloc_arenas()
        self.config = config
        self.store = Store(config.data, optimize_every=config.optimize_every)
        self.jobs = JobManager(self.store, workers=config.job_workers, max_queued=config.max_jobs)
        register_maintenance_jobs(self.jobs)
        self.metrics = Metrics()
        # One bucket per token shared by the gRPC and web ports.
        self._rate_limiter = (RateLimiter(config.rate_limit, config.rate_burst or None)
                              if config.rate_limit > 0 else None)
        max_bytes = config.max_message_mb * 1024 * 1024
        self.grpc = grpc.server(
            futures.ThreadPoolExecutor(max_workers=config.rpc_workers, thread_name_prefix="assay-rpc"),
            interceptors=[AssayInterceptor(
                config.tokens, self.metrics, read_tokens=config.read_tokens,
                rate_limiter=self._rate_limiter,
            )],
            options=[("grpc.max_receive_message_length", max_bytes),
                     ("grpc.max_send_message_length", max_bytes),
                     ("grpc.so_reuseport", 0)],
        )
        self.embedders = TextEmbedders()
        self.mining = MiningService(self.store, self.jobs, self.embedders)
        self.datasets = Datasets(self.store, run_ids=self.mining.runs.result_ids)
        names = add_servicers(self.grpc, self.store, self.jobs, config.limits, self.embedders,
                              datasets=self.datasets, run_ids=self.mining.runs.result_ids)
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
        """Stop accepting calls, give in-flight calls and jobs ``grace`` seconds, then stop."""
        if self._stopped.is_set():
            return
        self._stopped.set()
        grace = self.config.grace_s if grace is None else grace
        log.info("shutting down (grace %.1fs)", grace)
        self.health.enter_graceful_shutdown()
        done = self.grpc.stop(grace)
        self.jobs.shutdown(grace)
        done.wait(grace + 1)
        if self._metrics_server is not None:
            self._metrics_server.shutdown()
        if self.web is not None:
            self.web.stop()
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
