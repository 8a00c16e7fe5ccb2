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
``embedding`` (list<float32>, :data:`EMBEDDING_COLUMN`) is there only when asked for
(``columns=[..., "embedding"]``): the box's per-object embedding when its model declares
``box_embedding_dim`` and the box carries one, null otherwise (and always for gt boxes). It is
left out of the default columns and of ``objects_where`` predicates because it is wide.

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
from indexing.settings import MAX_TOP

__all__ = ["EMBEDDING_COLUMN", "GT_SOURCE", "OBJECT_COLUMNS", "SELECTABLE_COLUMNS", "OBJECT_SCHEMA", "NUMERIC_COLUMNS",
           "box_confused_pairs", "box_confusion", "check_predicate", "expand", "image_iou", "match_boxes", "object_batches",
           "object_classes", "object_rows", "objects", "sources"]

GT_SOURCE = "gt"
OBJECT_SCHEMA = pa.schema([
    pa.field("id", pa.string()), pa.field("source", pa.string()), pa.field("box", pa.int32()),
    pa.field("class", pa.string()), pa.field("score", pa.float32()), pa.field("probs", FLOAT_LIST),
    pa.field("x1", pa.float32()), pa.field("y1", pa.float32()), pa.field("x2", pa.float32()),
    pa.field("y2", pa.float32()), pa.field("width", pa.float64()), pa.field("height", pa.float64()),
    pa.field("area", pa.float64()),
])
OBJECT_COLUMNS = tuple(OBJECT_SCHEMA.names)
#: The per-object embedding: returned when asked for by name, never by default.
EMBEDDING_COLUMN = "embedding"
EMBEDDING_FIELD = pa.field(EMBEDDING_COLUMN, FLOAT_LIST)
SELECTABLE_COLUMNS = (*OBJECT_COLUMNS, EMBEDDING_COLUMN)
NUMERIC_COLUMNS = ("box", "score", "x1", "y1", "x2", "y2", "width", "height", "area")
CHUNK_ROWS = 8192  # image rows per chunk: a chunk's boxes are flattened at once
DUCK_MEMORY_LIMIT = "1GB"  # one object predicate's working memory (a chunk of boxes is a few MB)


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


def object_rows(ids: pa.Array, boxes: pa.Array, source: str, spec: ModelSpec | None, *,
                embedding: bool = False) -> pa.Table:
    """The object rows of one box column of a chunk (``ids`` and ``boxes`` aligned); with
    ``embedding``, plus the :data:`EMBEDDING_COLUMN` column (null where a box has none)."""
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
    out = pa.Table.from_arrays([
        ids.take(pa.array(parent, pa.int64())), pa.array([source] * n, pa.string()),
        pa.array(np.arange(n) - first, pa.int32()), cls, score, probs.cast(FLOAT_LIST),
        _f32(x1), _f32(y1), _f32(x2), _f32(y2), w, h, pc.multiply(w, h)], schema=OBJECT_SCHEMA)
    if embedding:
        has = flat.type.get_field_index(EMBEDDING_COLUMN) >= 0
        out = out.append_column(EMBEDDING_FIELD, flat.field(EMBEDDING_COLUMN).cast(FLOAT_LIST) if has
                                else pa.nulls(n, FLOAT_LIST))
    return out


def _image_chunks(table: Any, where: str | None, picked: Mapping[str, tuple[str, ModelSpec | None]],
                  chunk_rows: int, embedding: bool = False) -> Iterator[tuple[pa.Array, pa.Table]]:
    """(image ids, their object rows) of the image rows matching ``where`` (already in
    Lance's checked form), one chunk of image rows at a time (with the embedding column
    when ``embedding``)."""
    projection = {"id": "id", **{f"b{i}": path for i, (path, _) in enumerate(picked.values())}}
    q = table.search().select(projection).limit(None)
    if where:
        q = q.where(where)
    for batch in q.to_batches(chunk_rows):
        parts = [object_rows(batch.column("id"), batch.column(f"b{i}"), name, spec, embedding=embedding)
                 for i, (name, (_, spec)) in enumerate(picked.items())]
        yield batch.column("id"), (pa.concat_tables(parts) if len(parts) > 1 else parts[0])


def _chunks(table: Any, where: str | None, picked: Mapping[str, tuple[str, ModelSpec | None]],
            chunk_rows: int, embedding: bool = False) -> Iterator[pa.Table]:
    """Object rows of the image rows matching ``where``, one table per chunk of image rows."""
    for _, objs in _image_chunks(table, where, picked, chunk_rows, embedding):
        yield objs


class _Duck:
    """A private in-memory DuckDB with no external access, to run object predicates."""

    def __init__(self) -> None:
        self.con = duckdb.connect(":memory:", config={
            "threads": 1, "enable_external_access": False, "memory_limit": DUCK_MEMORY_LIMIT,
            "lock_configuration": True})

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
    # check_filter tokenises with Lance's rules; DuckDB also reads $$...$$ and E'...' strings
    # and runs every statement of a text: refuse what could hide a second statement or a
    # query inside the predicate (a predicate compares object columns; it never selects)
    hidden = "$" in predicate or re.search(r"(?<![A-Za-z0-9_'])[eE]'", predicate)
    if hidden or re.search(r"\b(select|from)\b", predicate, re.IGNORECASE):
        raise InvalidArgument(f"{what} {shown!r}: a predicate over the object columns may not hold '$', "
                              "E'...' strings, SELECT or FROM; compare columns with values, e.g. "
                              "\"class = 'car' AND score < 0.5\"")
    try:
        statements = duckdb.extract_statements(f"SELECT count(*) FROM objects WHERE {wrapped}")
    except duckdb.Error as exc:
        raise InvalidArgument(f"{what} {shown!r} is invalid: {str(exc).splitlines()[0]}") from None
    if len(statements) != 1:
        raise InvalidArgument(f"{what} {shown!r}: one predicate, not several statements")
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
           check: Any = None, positive: bool = False) -> str | None:
    """``where`` with every ``any_object(<predicate>)`` clause replaced by the ids of the
    images of ``table`` (one pinned version) holding a matching object: ``id IN (...)`` —
    or, when more than half of the images match, ``NOT (id IN (<the others>))``, exact on
    that version and a shorter filter for Lance to parse (an 80k-id list costs seconds;
    never for a write — ``positive`` — which commits on a later version, where the negative
    form would also take the images inserted meanwhile);
    ``1 = 0`` / ``1 = 1`` when none / all do. One streamed scan of the box columns serves
    every clause. A filter without such a clause comes back unchanged. The filter must run
    on the same version (``Collection`` pins it).

    Scale: the filter text grows with min(matching, other) images (about 12 bytes an id),
    so a box filter suits pools up to a few hundred thousand images per call."""
    if where is None:
        return None
    clauses = object_clauses(where)
    if not clauses:
        return where
    preds = [check_predicate(inner, "objects_where (any_object)") for _, _, inner in clauses]
    picked = sources(table.schema)
    # per clause: the matching and the other image ids, as compact Arrow chunks
    found: list[tuple[list[pa.Array], list[pa.Array]]] = [([], []) for _ in clauses]
    duck = _Duck()
    try:
        for image_ids, objs in _image_chunks(table, None, picked, chunk_rows):
            if check is not None:
                check()
            for (hits, others), pred in zip(found, preds, strict=True):
                if objs.num_rows:
                    hit = duck.run(f"SELECT DISTINCT id FROM objects WHERE {pred}", objs).column("id")
                    mask = pc.is_in(image_ids, value_set=hit.combine_chunks())
                else:
                    mask = pa.array(np.zeros(len(image_ids), dtype=bool))
                hits.append(image_ids.filter(mask))
                others.append(image_ids.filter(pc.invert(mask)))
    except duckdb.Error as exc:  # passed the dry run, failed on data (e.g. a bad cast)
        raise InvalidArgument(f"objects_where (any_object): {str(exc).splitlines()[0]}") from None
    finally:
        duck.close()
    out, at = [], 0
    for (start, end, _), (hits, others) in zip(clauses, found, strict=True):
        matched = [i for a in hits for i in a.to_pylist()]
        rest = [i for a in others for i in a.to_pylist()]
        out.append(where[at:start])
        if not matched:
            out.append("(1 = 0)")
        elif not rest:
            out.append("(1 = 1)")
        elif positive or len(matched) <= len(rest):
            out.append(f"({ids_predicate(matched)})")
        else:
            out.append(f"(NOT ({ids_predicate(rest)}))")
        at = end
    out.append(where[at:])
    return "".join(out)


def object_batches(table: Any, where: str | None = None, objects_where: str | None = None, *,
                   source: str | Sequence[str] | None = None, columns: Sequence[str] | None = None,
                   chunk_rows: int = CHUNK_ROWS) -> Iterator[pa.Table]:
    """Object rows, chunk by chunk, of the images of ``table`` matching ``where`` (a filter
    that may hold ``any_object(...)`` clauses; validated and expanded on ``table``), keeping
    the objects matching ``objects_where`` (SQL over the object columns) from ``source`` (a
    name or names; default every source), projected to ``columns`` (default
    :data:`OBJECT_COLUMNS`; ``embedding`` only when named)."""
    cols = list(OBJECT_COLUMNS) if not columns else list(columns)
    unknown = [c for c in cols if c not in SELECTABLE_COLUMNS]
    if unknown:
        raise InvalidArgument(f"unknown object column(s) {', '.join(unknown)}; object columns: "
                              f"{', '.join(SELECTABLE_COLUMNS)}")
    picked = _pick_sources(table.schema, source)
    pred = check_predicate(objects_where) if objects_where is not None else None
    plain = validate_filter(table, expand(table, where, chunk_rows=chunk_rows))
    embedding = EMBEDDING_COLUMN in cols
    duck = _Duck() if pred else None
    try:
        for objs in _chunks(table, plain, picked, chunk_rows, embedding):
            if duck is not None and objs.num_rows and embedding:
                # the predicate sees the object columns only; matching rows are taken by position
                # (the wide embedding never goes through DuckDB)
                pos = objs.drop_columns([EMBEDDING_COLUMN]).append_column(
                    "__pos", pa.array(np.arange(objs.num_rows), pa.int64()))
                objs = objs.take(duck.run(f"SELECT __pos FROM objects WHERE {pred}", pos).column("__pos"))
            elif duck is not None and objs.num_rows:
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
    schema = pa.schema([EMBEDDING_FIELD if c == EMBEDDING_COLUMN else OBJECT_SCHEMA.field(c) for c in cols])
    return pa.concat_tables([p.cast(schema) for p in parts]) if parts else schema.empty_table()


# -- box-level analytics ---------------------------------------------------------------------


def object_classes(table: Any, where: str | None = None, objects_where: str | None = None, *,
                   source: str | Sequence[str] | None = None) -> pa.Table:
    """Box-level label distribution: ``source``, ``class``, ``count`` of the object rows
    (as :func:`object_batches` selects them), sorted by source then count descending then
    class; boxes without a class (no probs) count under a null class."""
    counts: dict[tuple[str, str | None], int] = {}
    for part in object_batches(table, where, objects_where, source=source, columns=["source", "class"]):
        if not part.num_rows:
            continue
        grouped = part.group_by(["source", "class"], use_threads=False).aggregate([([], "count_all")])
        for s, c, n in zip(grouped.column("source").to_pylist(), grouped.column("class").to_pylist(),
                           grouped.column("count_all").to_pylist(), strict=True):
            counts[(s, c)] = counts.get((s, c), 0) + n
    order = sorted(counts.items(), key=lambda kv: (kv[0][0], -kv[1], kv[0][1] is None, kv[0][1] or ""))
    return pa.table({"source": pa.array([k[0] for k, _ in order], pa.string()),
                     "class": pa.array([k[1] for k, _ in order], pa.string()),
                     "count": pa.array([n for _, n in order], pa.int64())})


def _iou_matrix(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU of every box of ``a`` (P, 4) with every box of ``b`` (G, 4); 0 for a zero union."""
    iw = np.minimum(a[:, None, 2], b[None, :, 2]) - np.maximum(a[:, None, 0], b[None, :, 0])
    ih = np.minimum(a[:, None, 3], b[None, :, 3]) - np.maximum(a[:, None, 1], b[None, :, 1])
    inter = np.clip(iw, 0, None) * np.clip(ih, 0, None)
    area_a = (a[:, 2] - a[:, 0]) * (a[:, 3] - a[:, 1])
    area_b = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
    union = area_a[:, None] + area_b[None, :] - inter
    return np.where(union > 0, inter / np.where(union > 0, union, 1.0), 0.0)


def match_boxes(pred: np.ndarray, pred_scores: np.ndarray, gt: np.ndarray,
                iou: float = 0.5) -> np.ndarray:
    """Greedy matching of one image's predicted boxes to its ground-truth boxes: the index
    of the matched gt box for each prediction, -1 when unmatched.

    Predictions are visited by score descending (ties: lower index first); each takes the
    still-unmatched gt box with the highest IoU among those with ``IoU >= iou`` (ties: lower
    gt index). Matching ignores classes, so a box found with the wrong class shows up as a
    confusion rather than as one missed and one spurious box (FiftyOne's
    ``classwise=False``; the COCO evaluation is the class-wise variant)."""
    out = np.full(len(pred), -1, dtype=np.int64)
    if not len(pred) or not len(gt):
        return out
    m = _iou_matrix(np.asarray(pred, np.float64), np.asarray(gt, np.float64))
    free = np.ones(len(gt), dtype=bool)
    for p in np.lexsort((np.arange(len(pred)), -np.asarray(pred_scores, np.float64))):
        cand = np.where(free & (m[p] >= iou), m[p], -1.0)
        g = int(np.argmax(cand))
        if cand[g] >= 0:
            out[p] = g
            free[g] = False
    return out


def image_iou(pred: np.ndarray, pred_scores: np.ndarray, gt: np.ndarray, iou: float = 0.5) -> float:
    """Mean IoU of one image's predictions against its ground truth, unmatched boxes
    counting 0: ``sum_{(p, g) matched} IoU(p, g) / (P + G - M)``.

    Matching is :func:`match_boxes` at ``iou`` (the matching :func:`box_confusion` uses), so
    ``M`` pairs are matched out of ``P`` predictions and ``G`` gt boxes; the denominator
    counts every matched pair once plus every unmatched prediction (spurious) and every
    unmatched gt box (missed), each with an IoU of 0. In [0, 1]; 1 for ``P = G = 0``
    (nothing to find and nothing found)."""
    p = np.asarray(pred, np.float64).reshape(-1, 4)
    g = np.asarray(gt, np.float64).reshape(-1, 4)
    if not len(p) and not len(g):
        return 1.0
    matched = match_boxes(p, pred_scores, g, iou)
    hit = np.flatnonzero(matched >= 0)
    total = float(_iou_matrix(p[hit], g[matched[hit]]).diagonal().sum()) if len(hit) else 0.0
    return total / (len(p) + len(g) - len(hit))


def box_confusion(table: Any, model: ModelSpec, where: str | None = None, *, iou: float = 0.5,
                  chunk_rows: int = CHUNK_ROWS) -> pa.Table:
    """Box-level confusion of a detection model against ``gt_boxes``: ``label`` (the gt
    class; null = a spurious prediction, matched to no gt box), ``predicted`` (the box's
    top-1 class; null = a missed gt box, matched by no prediction), ``count``.

    Only images with both the model's boxes and ``gt_boxes`` (labeled and predicted) take
    part; boxes are matched per image by :func:`match_boxes` at ``iou``. A prediction
    without probs has no class: it is counted under ``predicted = "(no class)"``. ``where``
    is the checked Lance form (``any_object`` clauses already expanded)."""
    if model.task != "detection":
        raise InvalidArgument(f"box confusion needs a detection model; '{model.name}' is a {model.task} model")
    if not 0.0 < iou <= 1.0:
        raise InvalidArgument(f"iou must be in (0, 1], got {iou}")
    path = f"{PRED_PREFIX}{model.name}.boxes"
    cond = f"{path} IS NOT NULL AND gt_boxes IS NOT NULL"
    q = table.search().select({"id": "id", "p": path, "g": "gt_boxes"}).limit(None)
    q = q.where(f"({where}) AND {cond}" if where else cond)
    counts: dict[tuple[str | None, str | None], int] = {}

    def add(key: tuple[str | None, str | None]) -> None:
        counts[key] = counts.get(key, 0) + 1

    for batch in q.to_batches(chunk_rows):
        ids = batch.column("id")
        p = object_rows(ids, batch.column("p"), model.name, model).to_pydict()
        g = object_rows(ids, batch.column("g"), GT_SOURCE, None).to_pydict()
        p_img = np.asarray(pc.list_parent_indices(batch.column("p")).to_numpy(zero_copy_only=False), np.int64)
        g_img = np.asarray(pc.list_parent_indices(batch.column("g")).to_numpy(zero_copy_only=False), np.int64)
        p_xy = np.stack([np.asarray(p[k], np.float64) for k in ("x1", "y1", "x2", "y2")], axis=1) \
            if len(p_img) else np.zeros((0, 4))
        g_xy = np.stack([np.asarray(g[k], np.float64) for k in ("x1", "y1", "x2", "y2")], axis=1) \
            if len(g_img) else np.zeros((0, 4))
        p_score = np.asarray(p["score"], np.float64)
        for image in range(batch.num_rows):
            ps = np.flatnonzero(p_img == image)
            gs = np.flatnonzero(g_img == image)
            matched = match_boxes(p_xy[ps], p_score[ps], g_xy[gs], iou)
            for k, j in zip(ps, matched, strict=True):
                add((g["class"][gs[j]] if j >= 0 else None, p["class"][k] or "(no class)"))
            taken = set(matched[matched >= 0].tolist())
            for j, k in enumerate(gs):
                if j not in taken:
                    add((g["class"][k], None))
    order = sorted(counts.items(), key=lambda kv: (kv[0][0] is None, kv[0][0] or "", kv[0][1] is None,
                                                   kv[0][1] or ""))
    return pa.table({"label": pa.array([k[0] for k, _ in order], pa.string()),
                     "predicted": pa.array([k[1] for k, _ in order], pa.string()),
                     "count": pa.array([n for _, n in order], pa.int64())})


def box_confused_pairs(table: Any, model: ModelSpec, where: str | None = None,
                       objects_where: str | None = None, *, top: int = 20,
                       chunk_rows: int = CHUNK_ROWS) -> pa.Table:
    """Box-level confused pairs of a detection model: over its object rows (the boxes
    :func:`object_batches` returns for ``source = model`` in the images matching ``where``,
    kept by ``objects_where``), each box's top-1 and top-2 classes of its ``probs`` (ties:
    lower class index first) form an unordered pair.

    Columns as image-level ``confused_pairs``: ``class_a``, ``class_b`` (in the model's class
    order), ``count``, ``a_top1`` (boxes with ``class_a`` on top), ``mean_margin`` (mean
    ``p1 - p2``); the ``top`` most frequent pairs, ties by smaller mean margin, then class
    order. Boxes without probs have no top two: they are skipped, and counted in one last
    row with null ``class_a``, ``class_b``, ``a_top1`` and ``mean_margin`` (present only when
    some box was skipped; it is not one of the ``top``)."""
    if model.task != "detection":
        raise InvalidArgument(f"box confused pairs need a detection model; '{model.name}' is a {model.task} "
                              "model (its image-level pairs: aggregate 'confused_pairs')")
    if isinstance(top, bool) or not isinstance(top, int) or not 1 <= top <= MAX_TOP:
        raise InvalidArgument(f"top must be an integer in [1, {MAX_TOP}], got {top!r}")
    c = model.num_classes
    if c < 2:
        raise InvalidArgument(f"model '{model.name}' has {c} class; a pair needs at least two")
    # per pair (a, b): [count, a on top, sum of margins]; at most C*(C-1)/2 keys
    acc: dict[tuple[int, int], list[float]] = {}
    skipped = 0
    for part in object_batches(table, where, objects_where, source=model.name, columns=["probs"],
                               chunk_rows=chunk_rows):
        probs = part.column("probs").combine_chunks() if part.num_rows else pa.array([], FLOAT_LIST)
        lengths = np.asarray(pc.fill_null(pc.list_value_length(probs), 0).to_numpy(zero_copy_only=False))
        ok = lengths == c
        skipped += int((~ok).sum())
        if not ok.any():
            continue
        p = np.asarray(pc.list_flatten(probs.filter(pa.array(ok))).to_numpy(zero_copy_only=False),
                       np.float64).reshape(-1, c)
        # a stable sort of -p puts the larger probability first and, among equal ones, the
        # lower class index: the tie rule of the image-level pairs
        order = np.argsort(-p, axis=1, kind="stable")[:, :2]
        i1, i2 = order[:, 0], order[:, 1]
        rows = np.arange(len(p))
        margin = p[rows, i1] - p[rows, i2]
        a, b = np.minimum(i1, i2), np.maximum(i1, i2)
        keys = a * c + b
        uniq, inv = np.unique(keys, return_inverse=True)
        counts = np.bincount(inv)
        firsts = np.bincount(inv, weights=(i1 == a).astype(np.float64))
        sums = np.bincount(inv, weights=margin)
        for k, n, f, m in zip(uniq.tolist(), counts.tolist(), firsts.tolist(), sums.tolist(), strict=True):
            cell = acc.setdefault((k // c, k % c), [0, 0, 0.0])
            cell[0] += n
            cell[1] += f
            cell[2] += m
    ranked = sorted(acc.items(), key=lambda kv: (-kv[1][0], kv[1][2] / kv[1][0], kv[0]))[:top]
    names = list(model.classes)
    out = {"class_a": [names[k[0]] for k, _ in ranked], "class_b": [names[k[1]] for k, _ in ranked],
           "count": [int(v[0]) for _, v in ranked], "a_top1": [int(v[1]) for _, v in ranked],
           "mean_margin": [v[2] / v[0] for _, v in ranked]}
    if skipped:
        for k, v in (("class_a", None), ("class_b", None), ("count", skipped), ("a_top1", None),
                     ("mean_margin", None)):
            out[k].append(v)
    return pa.table({"class_a": pa.array(out["class_a"], pa.string()),
                     "class_b": pa.array(out["class_b"], pa.string()),
                     "count": pa.array(out["count"], pa.int64()),
                     "a_top1": pa.array(out["a_top1"], pa.int64()),
                     "mean_margin": pa.array(out["mean_margin"], pa.float64())})
