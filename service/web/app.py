"""The web page's HTTP side port: a read-only JSON API and the single-page UI.

    assay serve --data ./data --http-port 8765 [--data-root /images ...]

Built on Starlette, served by uvicorn in a thread of the gRPC server's process, reading
the same store, run store and datasets. Everything is a GET except ``/api/login`` and
``/api/logout``; nothing writes to a collection.

Auth (the gRPC server's tokens, read-write and read-only alike):

- ``Authorization: Bearer <token>`` on any request (scripts, notebooks), or
- a session cookie from ``POST /api/login`` with ``{"token": ...}`` (the page's login
  form; a link ``http://host:port/#token=<token>`` logs in and drops the token from the
  address). The cookie is HttpOnly, SameSite=Strict, Secure under TLS; sessions live in
  memory for ``SESSION_TTL_S``.

Without tokens the page is open, like the gRPC port, and (as a guard against DNS
rebinding, where a web site's script reaches a loopback port through its own host name)
only answers requests whose Host header names a loopback address or the bound host.
API calls are rate limited per token like gRPC calls (``--rate-limit``); failed logins
are limited per client address. The page shell and its scripts are static and need no
token; every byte of data does.

Errors are JSON ``{"error": {"code": "NOT_FOUND", "message": ...}}`` with the matching
HTTP status (400, 401, 403, 404, 409, 429; 500 with a request id for bugs).
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import secrets
import socket
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from importlib import resources
from typing import Any

from starlette.applications import Starlette
from starlette.datastructures import Headers, MutableHeaders
from starlette.middleware import Middleware
from starlette.middleware.gzip import GZipMiddleware
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from indexing.datasets import Datasets
from indexing.errors import classify_error
from indexing.settings import MAX_CACHED_URIS, MAX_SESSIONS, SESSION_TTL_S
from indexing.store import Store
from miners.runs import RunStore
from service.interceptor import RateLimiter
from service.web import views
from service.web.thumbs import DEFAULT_THUMB_SIZE, DataRoots, Thumbnails

log = logging.getLogger("assay.web")

SESSION_COOKIE = "assay_session"
HTTP_STATUS = {
    "INVALID_ARGUMENT": 400, "UNAUTHENTICATED": 401, "PERMISSION_DENIED": 403, "NOT_FOUND": 404,
    "ALREADY_EXISTS": 409, "FAILED_PRECONDITION": 409, "RESOURCE_EXHAUSTED": 429, "INTERNAL": 500,
    "UNAVAILABLE": 503,
}
SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; img-src 'self' data:; style-src 'self'; script-src 'self'; "
                               "connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'self'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
}
LOOPBACK_HOSTS = ("localhost", "127.0.0.1", "::1", "[::1]")


class HttpError(Exception):
    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status, self.code, self.message = status, code, message


class Auth:
    """Tokens, sessions and rate limits of the web port."""

    def __init__(self, tokens: Sequence[str], read_tokens: Sequence[str],
                 rate_limiter: RateLimiter | None = None) -> None:
        self.tokens = [t.encode() for t in (*tokens, *read_tokens) if t]
        self.rate_limiter = rate_limiter
        self.login_limiter = RateLimiter(2.0, 10)
        self._sessions: dict[str, tuple[bytes, float]] = {}
        self._lock = threading.Lock()

    @property
    def required(self) -> bool:
        return bool(self.tokens)

    def valid(self, token: bytes) -> bool:
        # Compare against every token so the time taken does not tell which one matched.
        return any([hmac.compare_digest(token, t) for t in self.tokens])

    def login(self, token: str, client: str) -> str:
        if not self.login_limiter.allow(client.encode()):
            raise HttpError(429, "RESOURCE_EXHAUSTED", "too many login attempts from this address; wait a few seconds")
        raw = token.encode()
        if not self.valid(raw):
            raise HttpError(401, "UNAUTHENTICATED", "invalid token")
        sid = secrets.token_urlsafe(32)
        now = time.time()
        with self._lock:
            if len(self._sessions) >= MAX_SESSIONS:
                self._sessions = {k: v for k, v in self._sessions.items() if v[1] > now}
                if len(self._sessions) >= MAX_SESSIONS:
                    self._sessions.pop(next(iter(self._sessions)))
            self._sessions[sid] = (raw, now + SESSION_TTL_S)
        return sid

    def logout(self, sid: str | None) -> None:
        with self._lock:
            self._sessions.pop(sid or "", None)

    def caller(self, request: Request) -> bytes | None:
        """The caller's token, or None when it has none that is valid."""
        header = request.headers.get("authorization", "")
        if header.startswith("Bearer "):
            raw = header[len("Bearer "):].strip().encode()
            return raw if self.valid(raw) else None
        sid = request.cookies.get(SESSION_COOKIE)
        if sid:
            with self._lock:
                hit = self._sessions.get(sid)
                if hit and hit[1] > time.time():
                    return hit[0]
                self._sessions.pop(sid, None)
        return None

    def check(self, request: Request, *, limited: bool = True) -> None:
        key = b""
        if self.required:
            token = self.caller(request)
            if token is None:
                raise HttpError(401, "UNAUTHENTICATED",
                                "missing or invalid token: log in on the page, or send 'Authorization: Bearer <token>'")
            key = token
        elif request.client is not None:
            key = request.client.host.encode()
        if limited and self.rate_limiter is not None and not self.rate_limiter.allow(key):
            raise HttpError(429, "RESOURCE_EXHAUSTED",
                            f"rate limit of {self.rate_limiter.rate:g} calls/s (burst {self.rate_limiter.burst:g}) "
                            "exceeded; slow down")


class WebApp:
    """The Starlette application over one store."""

    def __init__(self, store: Store, runs: RunStore, datasets: Datasets, embedders: Any, *,
                 tokens: Sequence[str] = (), read_tokens: Sequence[str] = (), data_roots: Sequence[str] = (),
                 rate_limiter: RateLimiter | None = None, allowed_hosts: Sequence[str] | None = None,
                 grpc_address: str = "", secure: bool = False) -> None:
        self.store = store
        self.runs = runs
        self.datasets = datasets
        self.embedders = embedders
        self.auth = Auth(tokens, read_tokens, rate_limiter)
        self.roots = DataRoots(data_roots)
        self.thumbs = Thumbnails(self.roots, store.storage_options)
        self.maps = views.EmbeddingMaps(store, runs)
        self.grpc_address = grpc_address
        self.secure = secure
        static = resources.files("service.web").joinpath("static")
        self.static_dir = str(static)
        api = [
            Route("/api/info", self.info),
            Route("/api/login", self.login, methods=["POST"]),
            Route("/api/logout", self.logout, methods=["POST"]),
            Route("/api/collections", self.api(lambda r: views.collections_summary(self.store, self.runs))),
            Route("/api/collections/{name}", self.api(
                lambda r: views.collection_detail(self.store, self.runs, self.datasets, r.path_params["name"]))),
            Route("/api/collections/{name}/search", self.api(
                lambda r: views.search_grid(self.store, self.embedders, r.path_params["name"], r.query_params))),
            Route("/api/collections/{name}/uncertainty_quality", self.api(
                lambda r: views.uncertainty_quality(self.store, self.runs, r.path_params["name"], r.query_params))),
            Route("/api/collections/{name}/boxes/{kind}", self.api(
                lambda r: views.boxes(self.store, r.path_params["name"], r.path_params["kind"], r.query_params))),
            Route("/api/collections/{name}/map", self.api(
                lambda r: views.map_json(self.maps.get(r.path_params["name"], r.query_params)))),
            Route("/api/runs/{run_id}", self.api(
                lambda r: views.run_grid(self.store, self.runs, r.path_params["run_id"],
                                         r.query_params.get("offset"), r.query_params.get("limit")))),
            Route("/api/datasets", self.api(
                lambda r: views.dataset_list(self.datasets, r.query_params.get("collection") or None))),
            Route("/api/datasets/{name}", self.api(lambda r: views.dataset_detail(self.datasets, r.path_params["name"]))),
            Route("/api/datasets/{name}/diff", self.api(
                lambda r: views.dataset_diff(self.store, self.datasets, r.path_params["name"],
                                             r.query_params.get("v1"), r.query_params.get("v2")))),
            Route("/api/thumb", self.thumb),
        ]
        middleware = [Middleware(_Guard, allowed_hosts=allowed_hosts), Middleware(GZipMiddleware, minimum_size=2048)]
        self.app = Starlette(
            routes=[*api, Route("/", self.index), Route("/api/{rest:path}", self.unknown_api),
                    Mount("/static", app=StaticFiles(directory=self.static_dir), name="static")],
            middleware=middleware,
            exception_handlers={HttpError: self._http_error, 404: self._not_found, 405: self._not_allowed},
        )

    # -- plumbing ----------------------------------------------------------------------------

    def api(self, view: Callable[[Request], Any]) -> Callable[[Request], Response]:
        """A JSON GET endpoint: auth, rate limit, errors mapped to statuses."""

        def endpoint(request: Request) -> Response:  # sync: Starlette runs it in its thread pool
            self.auth.check(request)
            return _json(views.json_ready(_call(view, request, self.store.root)))

        return endpoint

    @staticmethod
    async def _http_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, HttpError)
        return JSONResponse({"error": {"code": exc.code, "message": exc.message}}, status_code=exc.status,
                            headers={"WWW-Authenticate": "Bearer"} if exc.status == 401 else None)

    @staticmethod
    async def _not_found(request: Request, exc: Exception) -> Response:
        return JSONResponse({"error": {"code": "NOT_FOUND", "message": f"no such page: {request.url.path}"}},
                            status_code=404)

    @staticmethod
    async def _not_allowed(request: Request, exc: Exception) -> Response:
        return JSONResponse({"error": {"code": "METHOD_NOT_ALLOWED",
                                       "message": f"{request.method} is not allowed on {request.url.path}; "
                                                  "the web API is read-only"}}, status_code=405)

    # -- endpoints ---------------------------------------------------------------------------

    def index(self, request: Request) -> Response:
        return FileResponse(f"{self.static_dir}/index.html", headers={"Cache-Control": "no-cache"})

    def unknown_api(self, request: Request) -> Response:
        raise HttpError(404, "NOT_FOUND", f"no such API endpoint: {request.url.path}")

    def info(self, request: Request) -> Response:
        authed = not self.auth.required or self.auth.caller(request) is not None
        out: dict[str, Any] = {"service": "assay", "auth_required": self.auth.required, "authenticated": authed}
        if authed:
            out.update(grpc_address=self.grpc_address, data_roots=self.roots.describe(), root=self.store.root)
        return _json(out)

    async def login(self, request: Request) -> Response:
        try:
            body = await request.json()
        except ValueError:
            raise HttpError(400, "INVALID_ARGUMENT", "the body must be JSON: {\"token\": \"...\"}") from None
        token = body.get("token") if isinstance(body, dict) else None
        if not isinstance(token, str) or not token:
            raise HttpError(400, "INVALID_ARGUMENT", "the body must be JSON: {\"token\": \"...\"}")
        if not self.auth.required:
            return _json({"authenticated": True, "auth_required": False})
        sid = self.auth.login(token, request.client.host if request.client else "")
        response = _json({"authenticated": True, "auth_required": True})
        response.set_cookie(SESSION_COOKIE, sid, max_age=SESSION_TTL_S, httponly=True, samesite="strict",
                            secure=self.secure, path="/")
        return response

    async def logout(self, request: Request) -> Response:
        self.auth.logout(request.cookies.get(SESSION_COOKIE))
        response = _json({"authenticated": False})
        response.delete_cookie(SESSION_COOKIE, path="/")
        return response

    def thumb(self, request: Request) -> Response:
        """``/api/thumb?c=<collection>&id=<id>&s=<size>``: the row's image, if it lies in a data root."""
        self.auth.check(request, limited=False)  # a grid asks for dozens at once; they are cached
        q = request.query_params

        def read() -> tuple[bytes, str]:
            collection, id_ = q.get("c") or "", q.get("id") or ""
            if not collection or not id_:
                raise HttpError(400, "INVALID_ARGUMENT", "thumb needs c=<collection> and id=<item id>")
            size = views.int_param(q.get("s"), "s", DEFAULT_THUMB_SIZE, 1, 4096)
            col = self.store.collection(collection)
            # id -> uri of this collection version: a grid asks for dozens of thumbnails, and
            # each lookup is a Lance query (~5 ms); the map empties with each new version.
            uris = col._cached("web-uris", dict)
            if id_ not in uris:
                rows = col.take([id_], ["uri"])
                if rows.num_rows == 0:
                    raise HttpError(404, "NOT_FOUND", f"no item '{id_}' in '{collection}'")
                if len(uris) >= MAX_CACHED_URIS:
                    uris.clear()
                uris[id_] = rows.column("uri")[0].as_py()
            uri = uris[id_]
            if not uri:
                raise HttpError(404, "NOT_FOUND", f"item '{id_}' has no uri")
            return self.thumbs.get(uri, size)

        data, media = _call(lambda _r: read(), request, self.store.root)
        etag = '"' + hashlib.sha256(data).hexdigest()[:32] + '"'
        if request.headers.get("if-none-match") == etag:
            return Response(status_code=304, headers={"ETag": etag})
        return Response(data, media_type=media, headers={"Cache-Control": "private, max-age=300", "ETag": etag})


class _Guard:
    """ASGI middleware: refuse Host headers outside ``allowed_hosts`` (when set), and add
    the security headers to every response."""

    def __init__(self, app: Any, allowed_hosts: Sequence[str] | None) -> None:
        self.app = app
        self.allowed = None if allowed_hosts is None else {h.strip("[]").lower() for h in allowed_hosts}

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        if self.allowed is not None:
            host = Headers(scope=scope).get("host", "")
            name = host[1:].split("]")[0] if host.startswith("[") else host.rsplit(":", 1)[0]
            if name.lower() not in self.allowed:
                response = JSONResponse({"error": {"code": "PERMISSION_DENIED", "message": (
                    f"host {host!r} is not served: without a token this port only answers loopback host names; "
                    "start the server with --token to serve other hosts")}}, status_code=403)
                await response(scope, receive, send)
                return

        async def send_with_headers(message: Any) -> None:
            if message["type"] == "http.response.start":
                headers = MutableHeaders(scope=message)
                for k, v in SECURITY_HEADERS.items():
                    headers.setdefault(k, v)
            await send(message)

        await self.app(scope, receive, send_with_headers)


def _json(value: Any) -> JSONResponse:
    return JSONResponse(value, headers={"Cache-Control": "no-store"})


def _call(view: Callable[[Request], Any], request: Request, root: str | None = None) -> Any:
    """Run a view; errors become HTTP statuses (``root``, the data root, is named in
    storage errors)."""
    try:
        return view(request)
    except HttpError:
        raise
    except Exception as exc:  # an AssayError, a filter failing on the data, a storage fault, a bug
        mapped = classify_error(exc, root)
        if mapped is not None:
            raise HttpError(HTTP_STATUS.get(mapped.code, 500), mapped.code, mapped.message) from exc
        request_id = uuid.uuid4().hex[:12]
        log.exception("web request %s %s failed (request id %s)", request.method, request.url.path, request_id)
        raise HttpError(500, "INTERNAL", f"internal error (request id {request_id}); see the server log") from exc


class WebServer:
    """uvicorn running a :class:`WebApp` in a background thread on a socket bound here."""

    def __init__(self, app: WebApp, host: str, port: int, *, tls_cert: str | None = None,
                 tls_key: str | None = None, tls_client_ca: str | None = None) -> None:
        """TLS with the gRPC port's certificate when given; with ``tls_client_ca``, browsers
        and scripts must present a client certificate that CA signed, as on the gRPC port."""
        import ssl

        import uvicorn

        family = socket.AF_INET6 if ":" in host.strip("[]") else socket.AF_INET
        self.sock = socket.socket(family, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((host.strip("[]"), port))
        self.app = app
        self.host = host
        self.port = self.sock.getsockname()[1]
        self.scheme = "https" if tls_cert else "http"
        config = uvicorn.Config(app.app, log_level="warning", access_log=False, lifespan="off",
                                ssl_certfile=tls_cert, ssl_keyfile=tls_key, timeout_graceful_shutdown=3,
                                ssl_ca_certs=tls_client_ca if tls_cert else None,
                                ssl_cert_reqs=ssl.CERT_REQUIRED if tls_cert and tls_client_ca else ssl.CERT_NONE)
        self.server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]},
                                        name="assay-web", daemon=True)

    @property
    def url(self) -> str:
        host = self.host if ":" not in self.host or self.host.startswith("[") else f"[{self.host}]"
        return f"{self.scheme}://{host}:{self.port}/"

    def start(self, timeout: float = 10.0) -> None:
        self._thread.start()
        deadline = time.monotonic() + timeout
        while not self.server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise OSError(f"the web server did not start on {self.url}")
            time.sleep(0.02)

    def stop(self) -> None:
        self.server.should_exit = True
        self._thread.join(timeout=5)
        self.sock.close()


__all__ = ["Auth", "HttpError", "WebApp", "WebServer"]
