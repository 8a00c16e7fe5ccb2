"""Item grids in Jupyter: a mining run's picks, or any result table, as cards with thumbnails.

    from service.client import Client

    client = Client("127.0.0.1:50051", token="s3cret", web_url="http://127.0.0.1:8080/")
    job = client.collection("digits").mine("margin", size=100, model="logreg", where="label IS NULL")
    job.show()                                   # the top 60 picks, rendered by Jupyter
    client.show(job.run_id, limit=24)            # an earlier run, by id
    hits = client.collection("digits").search("pixels", ids=["digit-00003"], k=12)
    client.show(hits, collection="digits")       # search / query results (an ``id`` column)
    client.show(job, size=256).save("picks.html")  # a standalone HTML file

What a card shows is built here, on the client, from gRPC results: the run's ``rank`` and
``score`` (or a search's ``distance``), the row's ``label``, ``uri``, ``text`` snippet and
``tags``, and the top class of the run's model (or the collection's first model): the
argmax of ``probs``, else of ``softmax(logits)``, else of the most confident box. A run's
rows are read as of the version the run read (what the miner saw). The cards and CSS are
``service.web.gallery``'s, so a notebook grid looks like the web page's.

Thumbnails are embedded as ``data:`` URLs, so the output (and a saved file) stands alone:

* with a web URL (``web_url=`` here, or ``Client(..., web_url=...)``), from the server's
  ``/api/thumb`` with the client's token. The server serves only images inside its data
  roots; any other item gets a card without a thumbnail. Plain ``http://`` is enough on
  loopback or a trusted network; for ``https://`` the client's ``root_certificates`` (if
  any) are trusted, else the system's (``server_name_override`` and client certificates
  are not used). Redirects are refused, so the token goes to that address only.
* without one (or with ``web_url=""``), from the item's ``uri`` when it is a readable
  local file (a local path or ``file://``), shrunk here with PIL (no upscaling: PNG under
  64 px, else JPEG); ``s3://`` and other URIs get no thumbnail.

A thumbnail that cannot be had never fails the grid: the card shows the text snippet or
the URI instead, and ``grid.thumb_errors`` says why, per item id.
"""

from __future__ import annotations

import base64
import html
import json
import os
import ssl
import urllib.error
import urllib.parse
import urllib.request
import warnings
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pyarrow as pa

from service.web.gallery import ITEM_KEYS, item_dict, render_grid_html, top_predictions
from service.web.thumbs import DEFAULT_THUMB_SIZE, THUMB_SIZES, encode_thumbnail

if TYPE_CHECKING:
    from service.client import Client, MiningJob

__all__ = ["DEFAULT_LIMIT", "DEFAULT_SIZE", "THUMB_SIZES", "Grid", "show", "show_run", "show_table"]

DEFAULT_SIZE = DEFAULT_THUMB_SIZE
DEFAULT_LIMIT = 60
ITEM_FIELDS = ("label", "uri", "text", "tags")
TEXT_SNIPPET = 280
THUMB_TIMEOUT_S = 10.0
_THUMB_MAX_BYTES = 8 << 20
_THUMB_TYPES = frozenset({"image/jpeg", "image/png", "image/webp", "image/gif"})
_THUMB_WORKERS = 6  # parallel thumbnail fetches, as a browser would


class Grid:
    """A rendered item grid: Jupyter displays it (``_repr_html_``); ``html`` is the HTML
    fragment (cards + CSS), ``items`` the item dicts, ``thumb_errors`` item id -> why it
    has no thumbnail, ``save(path)`` writes a standalone HTML page."""

    def __init__(self, items: list[dict[str, Any]], thumbs: Mapping[str, str], *, title: str | None = None,
                 thumb_errors: Mapping[str, str] | None = None) -> None:
        self.items = items
        self.title = title
        self.thumbs = dict(thumbs)
        self.thumb_errors = dict(thumb_errors or {})
        self.html = render_grid_html(items, lambda it: self.thumbs.get(str(it["id"])), title=title)

    def _repr_html_(self) -> str:
        return self.html

    def __len__(self) -> int:
        return len(self.items)

    def __repr__(self) -> str:
        return (f"Grid({len(self.items)} items, {len(self.thumbs)} thumbnails"
                + (f": {self.title!r})" if self.title else ")"))

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write the grid as a standalone HTML page (CSS and thumbnails inline); returns the path."""
        title = html.escape(self.title or "assay items")
        doc = (f'<!doctype html>\n<html lang="en"><head><meta charset="utf-8">'
               f'<meta name="viewport" content="width=device-width, initial-scale=1">'
               f"<title>{title}</title></head>\n<body>{self.html}</body></html>\n")
        out = Path(path)
        out.write_text(doc, encoding="utf-8")
        return out


# -- thumbnails ----------------------------------------------------------------------------------


class _NoRedirects(urllib.request.HTTPRedirectHandler):
    """Refuse redirects: urllib would forward the Authorization header to the new host."""

    def redirect_request(self, *args: Any, **kwargs: Any) -> None:
        return None


def _ssl_context(root_certificates: Any) -> ssl.SSLContext:
    if root_certificates is None:
        return ssl.create_default_context()
    from service.client import _pem

    pem = _pem(root_certificates)
    return ssl.create_default_context(cadata=pem.decode() if pem else None)


class _Thumbnailer:
    """``id -> data: URL`` for items, from the server's ``/api/thumb`` or local files."""

    def __init__(self, collection: str, size: int, web_url: str | None, token: str | None = None,
                 root_certificates: Any = None, timeout: float = THUMB_TIMEOUT_S) -> None:
        self.collection, self.size, self.timeout = collection, size, timeout
        self.web_url = None if not web_url else (web_url if web_url.endswith("/") else web_url + "/")
        self.headers = {"Authorization": f"Bearer {token}"} if token else {}
        handlers: list[Any] = [_NoRedirects()]
        if self.web_url and self.web_url.startswith("https://"):
            handlers.append(urllib.request.HTTPSHandler(context=_ssl_context(root_certificates)))
        self.opener = urllib.request.build_opener(*handlers)

    def one(self, item: Mapping[str, Any]) -> tuple[str | None, str | None]:
        """(data URL, None) or (None, why not)."""
        try:
            if self.web_url:
                data, media = self._from_web(str(item["id"]))
            else:
                data, media = self._from_file(item["uri"])
        except Exception as exc:  # a thumbnail must never fail the grid
            return None, f"{type(exc).__name__}: {exc}"
        return f"data:{media};base64,{base64.b64encode(data).decode('ascii')}", None

    def _from_web(self, id_: str) -> tuple[bytes, str]:
        query = urllib.parse.urlencode({"c": self.collection, "id": id_, "s": self.size})
        request = urllib.request.Request(f"{self.web_url}api/thumb?{query}", headers=self.headers)
        try:
            with self.opener.open(request, timeout=self.timeout) as response:
                media = response.headers.get_content_type()
                data = response.read(_THUMB_MAX_BYTES + 1)
        except urllib.error.HTTPError as exc:
            raise OSError(f"HTTP {exc.code} from /api/thumb: {_http_message(exc)}") from None
        if media not in _THUMB_TYPES:
            raise ValueError(f"/api/thumb answered {media!r}, not an image")
        if len(data) > _THUMB_MAX_BYTES:
            raise ValueError("/api/thumb answered over 8 MiB")
        return data, media

    def _from_file(self, uri: str) -> tuple[bytes, str]:
        from indexing.images import canonical_uri

        if "://" in uri and not uri.startswith("file://"):
            raise ValueError(f"{uri.split('://', 1)[0]}:// images need the server's web URL (web_url=...)")
        path = canonical_uri(uri)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"no local file {path}")
        return encode_thumbnail(path, self.size)

    def all(self, items: Sequence[Mapping[str, Any]]) -> tuple[dict[str, str], dict[str, str]]:
        """(id -> data URL, id -> why not) for the items that have a ``uri``."""
        todo = list({str(it["id"]): it for it in items if it.get("uri")}.values())
        thumbs: dict[str, str] = {}
        errors: dict[str, str] = {}
        if not todo:
            return thumbs, errors
        with ThreadPoolExecutor(max_workers=min(_THUMB_WORKERS, len(todo)), thread_name_prefix="assay-thumb") as pool:
            for item, (url, why) in zip(todo, pool.map(self.one, todo), strict=True):
                if url is not None:
                    thumbs[str(item["id"])] = url
                else:
                    errors[str(item["id"])] = why or "unknown"
        return thumbs, errors


def _http_message(exc: urllib.error.HTTPError) -> str:
    try:
        return str(json.loads(exc.read(4096))["error"]["message"])
    except Exception:
        return exc.reason if isinstance(exc.reason, str) else str(exc)


# -- building grids ------------------------------------------------------------------------------


def _check(limit: int, size: int) -> None:
    from service.client import _invalid

    if not isinstance(limit, int) or isinstance(limit, bool) or limit < 1:
        raise _invalid(f"limit must be a positive integer, got {limit!r}")
    if size not in THUMB_SIZES:
        raise _invalid(f"size must be one of {', '.join(map(str, THUMB_SIZES))}, got {size!r}")


def _model_of(info: Mapping[str, Any], preferred: str | None) -> tuple[str, list[str]] | None:
    """(name, classes) of ``preferred`` if the collection has it, else of its first model."""
    models = [m for m in info.get("models") or [] if m.get("name")]
    for m in models:
        if m["name"] == preferred:
            return m["name"], list(m.get("classes") or [])
    return (models[0]["name"], list(models[0].get("classes") or [])) if models else None


def build_items(table: pa.Table, model: tuple[str, list[str]] | None) -> list[dict[str, Any]]:
    """Grid items from a result table (``id`` + ``rank``/``score``/``_distance``... + the
    item fields and ``pred_<model>`` where present), in the table's order."""
    own_cols = [c for c in ITEM_KEYS if c in table.column_names]
    own = {c: table.column(c).to_pylist() for c in own_cols}
    fields = {c: table.column(c).to_pylist() for c in ITEM_FIELDS if c in table.column_names}
    pred_col = f"pred_{model[0]}" if model else None
    preds = (top_predictions(table.column(pred_col), model[0], model[1])
             if model and pred_col in table.column_names else [None] * table.num_rows)
    return [
        item_dict(str(id_), {c: v[i] for c, v in own.items()}, {c: v[i] for c, v in fields.items()},
                  preds[i], TEXT_SNIPPET)
        for i, id_ in enumerate(table.column("id").to_pylist())
    ]


def _grid(client: Client, collection: str, items: list[dict[str, Any]], *, size: int, web_url: str | None,
          title: str) -> Grid:
    settings = getattr(client, "_settings", {})
    url = web_url if web_url is not None else getattr(client, "web_url", None)
    thumbnailer = _Thumbnailer(collection, size, url, settings.get("token"), settings.get("root_certificates"))
    thumbs, errors = thumbnailer.all(items)
    if errors and not thumbs:  # e.g. a wrong web_url or token: say so once, the grid still renders
        first = next(iter(errors.values()))
        warnings.warn(f"no thumbnails for the {len(errors)} items with a uri ({first}); "
                      "grid.thumb_errors has each reason", stacklevel=3)
    return Grid(items, thumbs, title=title, thumb_errors=errors)


def _item_columns(model: tuple[str, list[str]] | None) -> list[str]:
    return [*ITEM_FIELDS, *([f"pred_{model[0]}"] if model else [])]


def show_run(client: Client, job: MiningJob | str, limit: int = DEFAULT_LIMIT, *, size: int = DEFAULT_SIZE,
             web_url: str | None = None, timeout: float | None = None) -> Grid:
    """The grid of a mining run's first ``limit`` picks by rank (waiting up to ``timeout`` s
    for a run still in progress). See the module docstring."""
    from service.client import MiningJob, concat_pages, rpc_run_results

    _check(limit, size)
    if not isinstance(job, MiningJob):
        job = client.mining_job(str(job))
    rec = job.run()
    if rec["state"] != "SUCCEEDED":
        job.wait(timeout)  # raises for a run that failed or was cancelled
        rec = job.run()
    info = client.collection(rec["collection"]).describe()
    model = _model_of(info, rec.get("model") or None)
    rpc = rpc_run_results(job.run_id, _item_columns(model), min(limit, 8192))
    pages: list[pa.Table] = []
    stream = client._stream(rpc, timeout)
    try:
        for page in stream:
            pages.append(page)
            if sum(p.num_rows for p in pages) >= limit:
                break
    finally:
        stream.close()  # cancels the rest of the stream
    table = concat_pages(pages).slice(0, limit) if pages else pa.table({"id": pa.array([], pa.string())})
    items = build_items(table, model)
    total = rec.get("results", len(items))
    title = (f"{rec.get('miner', 'mining')} run {job.run_id[:8]} on {rec['collection']}: "
             f"{len(items)} of {total} picks" + (f", predictions of {model[0]}" if model else ""))
    return _grid(client, rec["collection"], items, size=size, web_url=web_url, title=title)


def _as_table(obj: Any) -> pa.Table:
    if isinstance(obj, pa.Table):
        return obj
    if isinstance(obj, pa.RecordBatch):
        return pa.Table.from_batches([obj])
    if type(obj).__module__.startswith("pandas") and hasattr(obj, "columns"):
        return pa.Table.from_pandas(obj, preserve_index=False)
    from service.client import _invalid

    raise _invalid(f"show() takes a MiningJob, a run id or a table with an 'id' column, not {type(obj).__name__}")


def show_table(client: Client, table: Any, collection: str, limit: int = DEFAULT_LIMIT, *,
               size: int = DEFAULT_SIZE, web_url: str | None = None, model: str | None = None) -> Grid:
    """The grid of the first ``limit`` rows of a result table (search, query, take...) of
    ``collection``; columns the table lacks (label, uri, text, tags, the prediction) are
    read with ``take``. A ``_distance`` column is shown as the distance."""
    from service.client import _invalid

    _check(limit, size)
    table = _as_table(table)
    if "id" not in table.column_names:
        raise _invalid("the table has no 'id' column: select it (columns=[..., 'id'])")
    table = table.slice(0, limit)
    table = table.rename_columns(["distance" if c == "_distance" else c for c in table.column_names])
    col = client.collection(collection)
    info = col.describe()
    chosen = _model_of(info, model)
    missing = [c for c in _item_columns(chosen) if c not in table.column_names]
    ids = [str(i) for i in table.column("id").to_pylist()]
    if missing and ids:
        rows = col.take(list(dict.fromkeys(ids)), ["id", *missing])
        at = {v: i for i, v in enumerate(rows.column("id").to_pylist())}
        positions = pa.array([at.get(i) for i in ids], pa.int64())
        for name in missing:
            table = table.append_column(name, rows.column(name).take(positions))
    items = build_items(table, chosen)
    title = f"{collection}: {len(items)} rows" + (f", predictions of {chosen[0]}" if chosen else "")
    return _grid(client, collection, items, size=size, web_url=web_url, title=title)


def show(client: Client, obj: Any, *, collection: str | None = None, limit: int = DEFAULT_LIMIT,
         size: int = DEFAULT_SIZE, web_url: str | None = None, timeout: float | None = None) -> Grid:
    """``show_run`` for a MiningJob or a run id, ``show_table`` for a table (``collection=``)."""
    from service.client import MiningJob, _invalid

    if isinstance(obj, MiningJob | str):
        return show_run(client, obj, limit, size=size, web_url=web_url, timeout=timeout)
    if collection is None:
        raise _invalid("showing a table needs collection=<the collection its rows come from>")
    return show_table(client, obj, collection, limit, size=size, web_url=web_url)
