"""What ``Client.show`` and ``MiningJob.show`` read before :mod:`service.notebook` draws it.

A grid's rows are fetched here through the client's public methods (a run's record and
its first results by rank, a collection's description, ``take`` for the columns a result
table lacks); :mod:`service.notebook` turns them into cards and fetches the thumbnails.
The notebook module is imported when a grid is drawn, never with the client: it pulls in
neither the store nor DuckDB, but it has no business in a training script's imports.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import pyarrow as pa

from service.client.channel import read_pem
from service.client.convert import concat_pages
from service.client.errors import invalid

if TYPE_CHECKING:
    from service.notebook import Grid

__all__ = ["run_grid", "table_grid"]


def _check(limit: int, size: int) -> None:
    from service.notebook import THUMB_SIZES

    if not isinstance(limit, int) or isinstance(limit, bool) or limit < 1:
        raise invalid(f"limit must be a positive integer, got {limit!r}")
    if size not in THUMB_SIZES:
        raise invalid(f"size must be one of {', '.join(map(str, THUMB_SIZES))}, got {size!r}")


def _render(client: Any, collection: str, items: list[dict[str, Any]], *, size: int,
            web_url: str | None, title: str) -> Grid:
    from service.notebook import render

    settings = client._settings
    url = web_url if web_url is not None else client.web_url
    https = bool(url) and url.startswith("https://")  # the roots are read only when used
    root_pem = read_pem(settings.get("root_certificates")) if https else None
    return render(collection, items, size=size, web_url=url, token=settings.get("token"),
                  root_pem=root_pem, title=title)


def run_grid(client: Any, job: Any, limit: int, *, size: int, web_url: str | None,
             timeout: float | None) -> Grid:
    """The grid of a mining run's first ``limit`` picks by rank (waiting up to ``timeout`` s
    for a run still in progress). ``client`` is a sync ``Client``, ``job`` its
    ``MiningJob`` (this module is below them: it uses their public methods only). See
    :mod:`service.notebook`."""
    from service.notebook import build_items, item_columns, model_of

    _check(limit, size)
    rec = job.run()
    if rec["state"] != "SUCCEEDED":
        job.wait(timeout)  # raises for a run that failed or was cancelled
        rec = job.run()
    info = client.collection(rec["collection"]).describe()
    model = model_of(info, rec.get("model") or None)
    pages: list[pa.Table] = []
    stream = job.result_pages(item_columns(model), min(limit, 8192), timeout=timeout)
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
    return _render(client, rec["collection"], items, size=size, web_url=web_url, title=title)


def _as_table(obj: Any) -> pa.Table:
    if isinstance(obj, pa.Table):
        return obj
    if isinstance(obj, pa.RecordBatch):
        return pa.Table.from_batches([obj])
    if type(obj).__module__.startswith("pandas") and hasattr(obj, "columns"):
        return pa.Table.from_pandas(obj, preserve_index=False)
    raise invalid(f"show() takes a MiningJob, a run id or a table with an 'id' column, not {type(obj).__name__}")


def table_grid(client: Any, table: Any, collection: str, limit: int, *, size: int,
               web_url: str | None, model: str | None = None) -> Grid:
    """The grid of the first ``limit`` rows of a result table (search, query, take...) of
    ``collection``; columns the table lacks (label, uri, text, tags, the prediction) are
    read with ``take``. A ``_distance`` column is shown as the distance."""
    from service.notebook import build_items, item_columns, model_of

    _check(limit, size)
    table = _as_table(table)
    if "id" not in table.column_names:
        raise invalid("the table has no 'id' column: select it (columns=[..., 'id'])")
    table = table.slice(0, limit)
    table = table.rename_columns(["distance" if c == "_distance" else c for c in table.column_names])
    col = client.collection(collection)
    chosen = model_of(col.describe(), model)
    missing = [c for c in item_columns(chosen) if c not in table.column_names]
    ids = [str(i) for i in table.column("id").to_pylist()]
    if missing and ids:
        rows = col.take(list(dict.fromkeys(ids)), ["id", *missing])
        at = {v: i for i, v in enumerate(rows.column("id").to_pylist())}
        positions = pa.array([at.get(i) for i in ids], pa.int64())
        for name in missing:
            table = table.append_column(name, rows.column(name).take(positions))
    items = build_items(table, chosen)
    title = f"{collection}: {len(items)} rows" + (f", predictions of {chosen[0]}" if chosen else "")
    return _render(client, collection, items, size=size, web_url=web_url, title=title)
