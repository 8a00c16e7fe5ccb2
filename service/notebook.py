"""Item grids in Jupyter: a mining run's picks, or any result table, as cards with thumbnails.

    from service.client import Client

    client = Client("127.0.0.1:50051", token="s3cret", web_url="http://127.0.0.1:8080/")
    job = client.collection("digits").mine("margin", size=100, model="logreg", where="label IS NULL")
    job.show()                                   # the top 60 picks, rendered by Jupyter
    client.show(job.run_id, limit=24)            # an earlier run, by id
    hits = client.collection("digits").search("pixels", ids=["digit-00003"], k=12)
    client.show(hits, collection="digits")       # search / query results (an ``id`` column)
    client.show(job, size=256).save("picks.html")  # a standalone HTML file

This module draws; the client reads. ``Client.show`` and ``MiningJob.show``
(:mod:`service.client.show`) fetch the rows through the client's public methods and hand
them here: :func:`build_items` turns a result table into cards — the run's ``rank`` and
``score`` (or a search's ``distance``), the row's ``label``, ``uri``, ``text`` snippet and
``tags``, and the top class of the run's model (or the collection's first model): the
argmax of ``probs``, else of ``softmax(logits)``, else of the most confident box — and
:func:`render` fetches the thumbnails and returns a :class:`Grid`. A run's rows are read
as of the version the run read (what the miner saw). The cards and CSS are
``service.web.gallery``'s, so a notebook grid looks like the web page's. Nothing here
imports the client, the store or DuckDB.

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
from typing import Any

import pyarrow as pa

from indexing.settings import GRID_LIMIT as DEFAULT_LIMIT
from indexing.settings import TEXT_SNIPPET, THUMB_TIMEOUT_S
from indexing.settings import THUMB_MAX_BYTES as _THUMB_MAX_BYTES
from indexing.settings import THUMB_WORKERS as _THUMB_WORKERS
from service.web.gallery import ITEM_KEYS, item_dict, render_grid_html, top_predictions
from service.web.thumbs import DEFAULT_THUMB_SIZE, THUMB_SIZES, encode_thumbnail

__all__ = ["DEFAULT_LIMIT", "DEFAULT_SIZE", "THUMB_SIZES", "Grid", "build_items", "item_columns",
           "model_of", "render"]

DEFAULT_SIZE = DEFAULT_THUMB_SIZE
ITEM_FIELDS = ("label", "uri", "text", "tags")
_THUMB_TYPES = frozenset({"image/jpeg", "image/png", "image/webp", "image/gif"})


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


def _ssl_context(root_pem: bytes | None) -> ssl.SSLContext:
    """Trust ``root_pem`` (PEM bytes) if given, else the system's roots."""
    if not root_pem:
        return ssl.create_default_context()
    return ssl.create_default_context(cadata=root_pem.decode())


class _Thumbnailer:
    """``id -> data: URL`` for items, from the server's ``/api/thumb`` or local files."""

    def __init__(self, collection: str, size: int, web_url: str | None, token: str | None = None,
                 root_pem: bytes | None = None, timeout: float = THUMB_TIMEOUT_S) -> None:
        self.collection, self.size, self.timeout = collection, size, timeout
        self.web_url = None if not web_url else (web_url if web_url.endswith("/") else web_url + "/")
        self.headers = {"Authorization": f"Bearer {token}"} if token else {}
        handlers: list[Any] = [_NoRedirects()]
        if self.web_url and self.web_url.startswith("https://"):
            handlers.append(urllib.request.HTTPSHandler(context=_ssl_context(root_pem)))
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


def model_of(info: Mapping[str, Any], preferred: str | None) -> tuple[str, list[str]] | None:
    """(name, classes) of ``preferred`` if the collection (``info``: its describe()) has it,
    else of its first model; None without models."""
    models = [m for m in info.get("models") or [] if m.get("name")]
    for m in models:
        if m["name"] == preferred:
            return m["name"], list(m.get("classes") or [])
    return (models[0]["name"], list(models[0].get("classes") or [])) if models else None


def item_columns(model: tuple[str, list[str]] | None) -> list[str]:
    """The collection columns a card shows (with the model's prediction column)."""
    return [*ITEM_FIELDS, *([f"pred_{model[0]}"] if model else [])]


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


def render(collection: str, items: list[dict[str, Any]], *, size: int, web_url: str | None,
           token: str | None, root_pem: bytes | None, title: str) -> Grid:
    """The grid of ``items`` of ``collection``, with thumbnails of ``size`` px from
    ``web_url`` (the server's web port, with ``token``; ``root_pem`` trusted for https) or,
    without one, from local image files. A wrong URL or token warns once; the grid still
    renders."""
    thumbnailer = _Thumbnailer(collection, size, web_url, token, root_pem)
    thumbs, errors = thumbnailer.all(items)
    if errors and not thumbs:  # e.g. a wrong web_url or token: say so once, the grid still renders
        first = next(iter(errors.values()))
        warnings.warn(f"no thumbnails for the {len(errors)} items with a uri ({first}); "
                      "grid.thumb_errors has each reason", stacklevel=4)
    return Grid(items, thumbs, title=title, thumb_errors=errors)
