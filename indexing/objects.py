"""Objects as rows: every box of a collection (each detection model's ``pred_<model>.boxes``
and the ground truth ``gt_boxes``) as one row, and ``any_object(...)`` filters over them.

Design: object rows are DERIVED AT READ TIME from the image table's version being read —
there is no second table. A scan of the image rows (``id`` plus the ``list<struct>`` box
columns) is flattened chunk by chunk with Arrow (``list_flatten`` / ``list_parent_indices``),
so the object rows are consistent with the image rows at every version, under concurrent
upserts and after a crash mid-write by construction: they are a function of one committed
Lance version. A derived Lance table would need its own consistency machinery (a second
commit per write, repair after a crash between the two, version mapping for time travel);
the price here is that a box predicate scans the box columns of the pool (streamed: memory is
one chunk) instead of using an index.

Object columns (:data:`OBJECT_COLUMNS`):

``id`` (the image), ``source`` (the detection model's name, or ``"gt"`` for ``gt_boxes``),
``box`` (index of the box in the image's list), ``class`` (top-1 class name: the argmax of
``probs``, lowest class on ties, null without probs; the ``label`` of a gt box), ``score``
(detector confidence; null for gt), ``probs`` (null for gt), ``x1, y1, x2, y2`` (as stored,
float32), ``width = x2 - x1``, ``height = y2 - y1``, ``area = width * height`` (float64).
Boxes carry no embedding in the schema today, so there is no object embedding column.

``any_object(<predicate>)`` inside any ``where`` filter is true for an image with at least one
object row (of any source) where the predicate holds, e.g. ``split = 'pool' AND
any_object(source = 'det' AND class IN ('chair', 'remote') AND area BETWEEN 1e2 AND 1e4 AND
score < 0.6)``. The predicate is SQL over the object columns, run by DuckDB (external access
disabled: no files, no network) over each Arrow chunk; :func:`expand` replaces every clause by
an ``id IN (...)`` predicate (``1 = 0`` when no image matches) computed at the version the
filter runs on. The client's ``objects_where=`` option and the CLI's ``--objects-where`` build
that clause (:func:`indexing.filters.with_objects`).
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from indexing.errors import InvalidArgument
from indexing.filters import check_filter, ids_predicate, object_clauses, validate_filter
from indexing.schema import FLOAT_LIST, PRED_PREFIX, ModelSpec, models_of

__all__ = ["GT_SOURCE", "OBJECT_COLUMNS", "OBJECT_SCHEMA", "NUMERIC_COLUMNS", "expand", "object_batches",
           "object_rows", "objects", "sources", "check_predicate"]

GT_SOURCE = "gt"
OBJECT_SCHEMA = pa.schema([
    pa.field("id", pa.string()), pa.field("source", pa.string()), pa.field("box", pa.int32()),
    pa.field("class", pa.string()), pa.field("score", pa.float32()), pa.field("probs", FLOAT_LIST),
    pa.field("x1", pa.float32()), pa.field("y1", pa.float32()), pa.field("x2", pa.float32()),
    pa.field("y2", pa.float32()), pa.field("width", pa.float64()), pa.field("height", pa.float64()),
    pa.field("area", pa.float64()),
])
OBJECT_COLUMNS = tuple(OBJECT_SCHEMA.names)
NUMERIC_COLUMNS = ("box", "score", "x1", "y1", "x2", "y2", "width", "height", "area")
CHUNK_ROWS = 8192  # image rows per chunk: a chunk's boxes are flattened at once


def sources(schema: pa.Schema) -> dict[str, tuple[str, ModelSpec | None]]:
    """Box sources of a collection: name -> (column path, model). Every detection model,
    then ``"gt"`` for ``gt_boxes``."""
    out: dict[str, tuple[str, ModelSpec | None]] = {
        name: (f"{PRED_PREFIX}{name}.boxes", spec)
        for name, spec in models_of(schema).items() if spec.task == "detection"}
    out.setdefault(GT_SOURCE, ("gt_boxes", None))
    return out


def _pick_sources(schema: pa.Schema, source: str | Sequence[str] | None) -> dict[str, tuple[str, ModelSpec | None]]:
    known = sources(schema)
    if source is None or source == "":
        return known
    names = [source] if isinstance(source, str) else list(source)
    unknown = [s for s in names if s not in known]
    if unknown:
        raise InvalidArgument(f"source {', '.join(map(repr, unknown))} has no boxes; sources: "
                              f"{', '.join(known)} (a detection model's name, or 'gt' for gt_boxes)")
    return {s: known[s] for s in names}


def _f32(arr: pa.Array) -> pa.Array:
    return arr.cast(pa.float32())


def _classes(probs: pa.Array, spec: ModelSpec) -> pa.Array:
    """Top-1 class name per box from its probs (null without probs or with a wrong length)."""
    c = spec.num_classes
    lengths = np.asarray(pc.fill_null(pc.list_value_length(probs), 0).to_numpy(zero_copy_only=False))
    ok = lengths == c
    out = np.full(len(probs), -1, dtype=np.int64)
    if ok.any():
        values = pc.list_flatten(probs.filter(pa.array(ok))).to_numpy(zero_copy_only=False)
        out[ok] = np.asarray(values, dtype=np.float64).reshape(-1, c).argmax(axis=1)
    names = pa.array(list(spec.classes), pa.string())
    return names.take(pa.array(out, pa.int64(), mask=~ok))


def object_rows(ids: pa.Array, boxes: pa.Array, source: str, spec: ModelSpec | None) -> pa.Table:
    """The object rows of one box column of a chunk (``ids`` and ``boxes`` aligned)."""
    flat = pc.list_flatten(boxes)
    n = len(flat)
    parent = np.asarray(pc.list_parent_indices(boxes).to_numpy(zero_copy_only=False), dtype=np.int64)
    first = np.searchsorted(parent, parent, side="left")  # parents are ascending
    x1, y1, x2, y2 = (flat.field(k) for k in ("x1", "y1", "x2", "y2"))
    w = pc.subtract(x2.cast(pa.float64()), x1.cast(pa.float64()))
    h = pc.subtract(y2.cast(pa.float64()), y1.cast(pa.float64()))
    if spec is None:  # ground truth
        cls, score, probs = flat.field("label"), pa.nulls(n, pa.float32()), pa.nulls(n, FLOAT_LIST)
    else:
        probs = flat.field("probs")
        cls, score = _classes(probs, spec), _f32(flat.field("score"))
    return pa.Table.from_arrays([
        ids.take(pa.array(parent, pa.int64())), pa.array([source] * n, pa.string()),
        pa.array(np.arange(n) - first, pa.int32()), cls, score, probs.cast(FLOAT_LIST),
        _f32(x1), _f32(y1), _f32(x2), _f32(y2), w, h, pc.multiply(w, h)], schema=OBJECT_SCHEMA)


def _chunks(table: Any, where: str | None, picked: Mapping[str, tuple[str, ModelSpec | None]],
            chunk_rows: int) -> Iterator[pa.Table]:
    """Object rows of the image rows matching ``where`` (already in Lance's checked form),
    one table per chunk of image rows."""
    projection = {"id": "id", **{f"b{i}": path for i, (path, _) in enumerate(picked.values())}}
    q = table.search().select(projection).limit(None)
    if where:
        q = q.where(where)
    for batch in q.to_batches(chunk_rows):
        parts = [object_rows(batch.column("id"), batch.column(f"b{i}"), name, spec)
                 for i, (name, (_, spec)) in enumerate(picked.items())]
        yield pa.concat_tables(parts) if len(parts) > 1 else parts[0]


class _Duck:
    """A private in-memory DuckDB with no external access, to run object predicates."""

    def __init__(self) -> None:
        self.con = duckdb.connect(":memory:", config={
            "threads": 1, "enable_external_access": False, "lock_configuration": True})

    def run(self, sql: str, objects: pa.Table) -> pa.Table:
        self.con.register("objects", objects)
        try:
            return self.con.sql(sql).to_arrow_table()
        finally:
            self.con.unregister("objects")

    def close(self) -> None:
        self.con.close()


def check_predicate(predicate: str, what: str = "objects_where") -> str:
    """The predicate in the checked form (``(<predicate>\\n)``), after structural checks and
    a dry run on an empty object table; InvalidArgument naming ``what``, the column at fault
    and the object columns."""
    if not isinstance(predicate, str) or not predicate.strip():
        raise InvalidArgument(f"{what} must be a non-empty SQL predicate over the object columns "
                              f"({', '.join(OBJECT_COLUMNS)})")
    try:
        wrapped = check_filter(predicate)
    except InvalidArgument as exc:
        raise InvalidArgument(f"{what}: {exc}") from None
    assert wrapped is not None
    shown = predicate.strip()
    duck = _Duck()
    try:
        duck.run(f"SELECT count(*) FROM objects WHERE {wrapped}", OBJECT_SCHEMA.empty_table())
    except duckdb.Error as exc:
        text = str(exc).split("\n")[0]
        missing = re.search(r'Referenced column "([^"]+)" not found', text)
        if missing:
            raise InvalidArgument(
                f"{what} {shown!r}: unknown object column {missing.group(1)!r}; object columns: "
                f"{', '.join(OBJECT_COLUMNS)}") from None
        raise InvalidArgument(f"{what} {shown!r} is invalid: {text} (object columns: "
                              f"{', '.join(OBJECT_COLUMNS)})") from None
    finally:
        duck.close()
    return wrapped


def expand(table: Any, where: str | None, *, chunk_rows: int = CHUNK_ROWS,
           check: Any = None) -> str | None:
    """``where`` with every ``any_object(<predicate>)`` clause replaced by the ids of the
    images of ``table`` (one pinned version) holding a matching object: ``id IN (...)``, or
    ``1 = 0`` when none does. One streamed scan of the box columns serves every clause.
    A filter without such a clause comes back unchanged."""
    if where is None:
        return None
    clauses = object_clauses(where)
    if not clauses:
        return where
    preds = [check_predicate(inner, "objects_where (any_object)") for _, _, inner in clauses]
    picked = sources(table.schema)
    found: list[set[str]] = [set() for _ in clauses]
    duck = _Duck()
    try:
        for objs in _chunks(table, None, picked, chunk_rows):
            if check is not None:
                check()
            if not objs.num_rows:
                continue
            for ids, pred in zip(found, preds, strict=True):
                hit = duck.run(f"SELECT DISTINCT id FROM objects WHERE {pred}", objs)
                ids.update(hit.column("id").to_pylist())
    except duckdb.Error as exc:  # passed the dry run, failed on data (e.g. a bad cast)
        raise InvalidArgument(f"objects_where (any_object): {str(exc).splitlines()[0]}") from None
    finally:
        duck.close()
    out, at = [], 0
    for (start, end, _), ids in zip(clauses, found, strict=True):
        out.append(where[at:start])
        out.append(f"({ids_predicate(sorted(ids))})" if ids else "(1 = 0)")
        at = end
    out.append(where[at:])
    return "".join(out)


def object_batches(table: Any, where: str | None = None, objects_where: str | None = None, *,
                   source: str | Sequence[str] | None = None, columns: Sequence[str] | None = None,
                   chunk_rows: int = CHUNK_ROWS) -> Iterator[pa.Table]:
    """Object rows, chunk by chunk, of the images of ``table`` matching ``where`` (a filter
    that may hold ``any_object(...)`` clauses; validated and expanded on ``table``), keeping
    the objects matching ``objects_where`` (SQL over the object columns) from ``source`` (a
    name or names; default every source), projected to ``columns`` (default all)."""
    cols = list(OBJECT_COLUMNS) if not columns else list(columns)
    unknown = [c for c in cols if c not in OBJECT_COLUMNS]
    if unknown:
        raise InvalidArgument(f"unknown object column(s) {', '.join(unknown)}; object columns: "
                              f"{', '.join(OBJECT_COLUMNS)}")
    picked = _pick_sources(table.schema, source)
    pred = check_predicate(objects_where) if objects_where is not None else None
    plain = validate_filter(table, expand(table, where, chunk_rows=chunk_rows))
    duck = _Duck() if pred else None
    try:
        for objs in _chunks(table, plain, picked, chunk_rows):
            if duck is not None and objs.num_rows:
                objs = duck.run(f"SELECT * FROM objects WHERE {pred}", objs)
            yield objs.select(cols)
    finally:
        if duck is not None:
            duck.close()


def objects(table: Any, where: str | None = None, objects_where: str | None = None, *,
            source: str | Sequence[str] | None = None, columns: Sequence[str] | None = None,
            limit: int | None = None) -> pa.Table:
    """:func:`object_batches` as one table (at most ``limit`` rows), in image scan order."""
    cols = list(OBJECT_COLUMNS) if not columns else list(columns)
    parts, n = [], 0
    for part in object_batches(table, where, objects_where, source=source, columns=cols):
        if limit is not None and n + part.num_rows >= limit:
            parts.append(part.slice(0, limit - n))
            break
        parts.append(part)
        n += part.num_rows
    schema = pa.schema([OBJECT_SCHEMA.field(c) for c in cols])
    return pa.concat_tables([p.cast(schema) for p in parts]) if parts else schema.empty_table()
