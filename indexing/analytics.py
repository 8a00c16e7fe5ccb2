"""Collection analytics computed by DuckDB over Arrow batches streamed from the collection.

Every function here takes a :class:`~indexing.store.Collection`, an optional SQL filter
(checked by :func:`check_filter`, i.e. :meth:`Collection.validate_filter` plus a check
for trailing text, so a malformed or hostile filter raises InvalidArgument before anything
runs) and an optional ``version`` (number or tag, to read a pinned dataset version), and
returns a small :class:`pyarrow.Table`.

How it runs (bounded memory, never the whole pool in RAM):

* Lance streams only the needed columns (nested prediction fields are projected, so a
  ``pred_<model>.probs`` scan does not read ``samples`` or ``boxes``) in batches of
  ``BATCH_ROWS`` rows, with the filter pushed down to Lance;
* where a per-row value needs NumPy (top-2 classes, entropy, softmax of logits), each
  batch is turned into a small derived batch (a few int/float columns);
* the batches reach DuckDB as one :class:`pyarrow.RecordBatchReader`, which DuckDB scans
  as a stream and aggregates with a hash GROUP BY: memory grows with the number of
  groups, not rows.

The user's filter only ever reaches Lance. DuckDB sees fixed SQL written here over
fixed column aliases (``label``, ``g0``, ``x``, ...): no user text is interpolated into
it. DuckDB's ``lance`` extension is not used (it downloads at run time).

Decisions (documented for clients):

* **NULL labels** stay NULL: :func:`label_distribution` reports unlabeled rows as one row
  whose ``label`` is null (a class may well be called "unlabeled", so no sentinel string).
* **Predicted class** of a row: argmax of ``probs`` (or of ``softmax(logits)`` where
  ``probs`` is null), ties to the lowest class index — as the mining runner does. For a
  detection model the unit is the box: every predicted box that carries per-class
  ``probs`` counts once (boxes without ``probs`` are skipped).
* **Confused pairs** are unordered: ``class_a``/``class_b`` is the top-1/top-2 pair sorted
  by the model's class order, so "cat vs dog" and "dog vs cat" add up. ``a_top1`` says how
  many of them had ``class_a`` on top. ``mean_margin`` is the mean of ``p1 - p2``.
* **Uncertainty measures** are the miners' own, from :mod:`indexing.measures` (higher = more
  uncertain): entropy normalised by ``log C`` and clipped to [0, 1], margin ``1 - (p1 - p2)``,
  least confidence ``1 - p1``, ratio ``p2 / p1`` (:data:`~indexing.measures.PROB_MEASURES`).
* **Histograms** bin like :func:`numpy.histogram` (equal-width bins over [min, max] or the
  given range; the last bin includes its right edge), computed in float64. NULLs, NaN /
  infinities and values outside an explicit range are not binned; they are counted in the
  table's schema metadata (key ``assay.histogram``, JSON; see :func:`histogram_stats`).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from indexing import objects as object_rows
from indexing.errors import FailedPrecondition, InvalidArgument
from indexing.measures import PROB_MEASURES
from indexing.predictions import box_probs, prediction_probs, valid_mask
from indexing.schema import EMB_PREFIX, PRED_PREFIX, ModelSpec
from indexing.settings import ANALYTICS_BATCH_ROWS as BATCH_ROWS
from indexing.settings import MAX_BINS, MAX_TOP

#: The measures :func:`class_uncertainty` takes: every probability measure of the miners.
MEASURES = tuple(PROB_MEASURES)
HISTOGRAM_META_KEY = b"assay.histogram"

__all__ = [
    "BATCH_ROWS",
    "MEASURES",
    "box_probs",
    "check_filter",
    "class_uncertainty",
    "confused_pairs",
    "confusion",
    "histogram",
    "histogram_stats",
    "label_distribution",
    "prediction_probs",
    "stream",
    "uncertainty",
]


# -- streaming -------------------------------------------------------------------------

def _table(col: Any, version: int | str | None) -> Any:
    return col.table if version is None else col.at_version(version)


def stream(
    col: Any,
    projection: Mapping[str, str],
    where: str | None = None,
    *,
    version: int | str | None = None,
    batch_size: int | None = None,
) -> Iterator[pa.RecordBatch]:
    """Batches (of ``batch_size``, default ``BATCH_ROWS``) of ``projection`` (output name ->
    column or nested path such as ``pred_m.probs``) for the rows matching ``where``. The
    filter is validated now, not on the first ``next()``."""
    table = _table(col, version) if version is not None or where is None else col.read_table(None, where)
    where = col.validate_filter(where, table)  # box clauses expanded on the version read
    q = table.search().select(dict(projection)).limit(None)
    if where:
        q = q.where(where)
    return iter(q.to_batches(batch_size or BATCH_ROWS))


def check_filter(col: Any, where: str | None) -> str | None:
    """The filter as it must be sent to Lance (see ``Collection.validate_filter``, which
    refuses statement separators, unbalanced parentheses and trailing text)."""
    return col.validate_filter(where)


class _Source:
    """A RecordBatchReader over a generator, remembering the generator's own exception so
    that it surfaces as itself (an InvalidArgument stays one) rather than as DuckDB's
    wrapper of it."""

    def __init__(self, schema: pa.Schema, batches: Iterator[pa.RecordBatch]) -> None:
        self.error: BaseException | None = None
        self.rows = 0

        def guarded() -> Iterator[pa.RecordBatch]:
            try:
                for b in batches:
                    self.rows += b.num_rows
                    yield b
            except BaseException as exc:
                self.error = exc
                raise

        self.reader = pa.RecordBatchReader.from_batches(schema, guarded())


def _duck(sql: str, sources: Mapping[str, _Source], params: Sequence[Any] | None = None) -> pa.Table:
    """Run fixed ``sql`` over the streamed ``sources`` (registered by name) in a private
    in-memory DuckDB connection.

    One DuckDB thread: the stream is produced by one Python generator anyway, and with
    several threads DuckDB hands batches to whichever is free, so float sums (and the
    ordering by them) would change from run to run. Results are deterministic."""
    con = duckdb.connect(":memory:", config={"threads": 1})
    try:
        for name, src in sources.items():
            con.register(name, src.reader)
        try:
            return con.sql(sql, params=list(params) if params is not None else None).to_arrow_table()
        except duckdb.Error:
            for src in sources.values():
                if src.error is not None:
                    raise src.error from None
            raise
    finally:
        con.close()


def _top2(p: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Indices and values of the two largest probabilities (ties: lowest index first)."""
    rows = np.arange(len(p))
    i1 = p.argmax(axis=1)
    p1 = p[rows, i1]
    q = p.copy()
    q[rows, i1] = -np.inf
    i2 = q.argmax(axis=1)
    return i1, i2, p1, p[rows, i2]


def uncertainty(p: np.ndarray, measure: str) -> np.ndarray:
    """Per-row uncertainty of (n, C) probabilities; higher = more uncertain (see module doc)."""
    if measure not in MEASURES:
        raise InvalidArgument(f"measure {measure!r} is not one of {', '.join(MEASURES)}")
    if len(p) == 0:
        return np.zeros(0)
    # the rows were validated when they were written (or are a softmax)
    return PROB_MEASURES[measure].fn(p, validate=False)


def _pred_projection(spec: ModelSpec, *, label: bool = False) -> dict[str, str]:
    col = spec.column
    proj = ({"boxes": f"{col}.boxes"} if spec.task == "detection"
            else {"probs": f"{col}.probs", "logits": f"{col}.logits"})
    if label:
        proj["label"] = "label"
    return proj


def _batch_probs(batch: pa.RecordBatch, spec: ModelSpec) -> tuple[np.ndarray, np.ndarray]:
    """(row of each prediction unit in the batch, its probabilities)."""
    if spec.task == "detection":
        return box_probs(batch.column("boxes"), spec.num_classes)
    return prediction_probs(batch.column("probs"), batch.column("logits"), spec.num_classes)


def _prediction_source(
    col: Any, spec: ModelSpec, where: str | None, version: int | str | None, schema: pa.Schema,
    derive: Callable[[pa.RecordBatch, np.ndarray, np.ndarray], dict[str, Any]], *, label: bool = False,
) -> _Source:
    batches = stream(col, _pred_projection(spec, label=label), where, version=version)

    def derived() -> Iterator[pa.RecordBatch]:
        for b in batches:
            rows, p = _batch_probs(b, spec)
            if len(rows):
                yield pa.record_batch(derive(b, rows, p), schema=schema)

    return _Source(schema, derived())


def _model(col: Any, model: str) -> ModelSpec:
    if not isinstance(model, str):
        raise InvalidArgument(f"model must be a model name, got {model!r}")
    return col.model(model)  # NotFound names the known models


def _check_has_predictions(col: Any, spec: ModelSpec, version: int | str | None) -> None:
    """Called when a result is empty: an empty filter match is an empty answer, but a model
    with no predictions at all is a FAILED_PRECONDITION the caller should hear about."""
    c = spec.column
    cond = (f"{c}.boxes IS NOT NULL" if spec.task == "detection"
            else f"({c}.probs IS NOT NULL OR {c}.logits IS NOT NULL)")
    if _table(col, version).count_rows(cond) == 0:
        what = "boxes" if spec.task == "detection" else "probs or logits"
        raise FailedPrecondition(
            f"model '{spec.name}' has no predictions ({what}) in collection '{col.name}'; "
            f"upsert its {spec.column} column first"
        )


def _names(classes: Sequence[str], idx: pa.Array) -> pa.Array:
    return pa.array(list(classes), pa.string()).take(idx)


# -- label distribution -------------------------------------------------------------------

_GROUPABLE = (pa.types.is_string, pa.types.is_large_string, pa.types.is_boolean, pa.types.is_integer,
              pa.types.is_floating, pa.types.is_timestamp, pa.types.is_date, pa.types.is_decimal)


def _group_columns(col: Any, group_by: str | Sequence[str] | None, version: int | str | None) -> list[str]:
    if group_by is None:
        return []
    groups = [group_by] if isinstance(group_by, str) else list(group_by)
    schema = _table(col, version).schema
    for g in groups:
        if not isinstance(g, str) or g not in schema.names:
            raise InvalidArgument(
                f"group_by: unknown column {g!r} in collection '{col.name}' (columns: {', '.join(schema.names)})"
            )
        if g == "label":
            raise InvalidArgument("group_by: 'label' is already the counted column; group by another field")
        t = schema.field(g).type
        if g.startswith((EMB_PREFIX, PRED_PREFIX)) or not any(check(t) for check in _GROUPABLE):
            raise InvalidArgument(f"group_by: column '{g}' has type {t}; group by a scalar field")
    if len(set(groups)) != len(groups):
        raise InvalidArgument("group_by: a column is repeated")
    return groups


def label_distribution(
    col: Any,
    where: str | None = None,
    group_by: str | Sequence[str] | None = None,
    *,
    version: int | str | None = None,
) -> pa.Table:
    """Rows per label (``label``, the ``group_by`` columns, ``count``).

    Unlabeled rows are counted under a null ``label``. Sorted by the group columns, then
    count (descending), then label (nulls last).
    """
    groups = _group_columns(col, group_by, version)
    proj = {"label": "label", **{f"g{i}": g for i, g in enumerate(groups)}}
    batches = stream(col, proj, where, version=version)
    first = next(batches, None)
    if first is None:
        schema = _table(col, version).schema
        return pa.table({"label": pa.array([], pa.string()),
                         **{g: pa.array([], schema.field(g).type) for g in groups},
                         "count": pa.array([], pa.int64())})

    def chained() -> Iterator[pa.RecordBatch]:
        yield first
        yield from batches

    gcols = [f"g{i}" for i in range(len(groups))]
    keys = ", ".join(["label", *gcols])
    order = ", ".join([*(f"{g} NULLS LAST" for g in gcols), "count DESC", "label NULLS LAST"])
    sql = f"SELECT {keys}, count(*)::BIGINT AS count FROM rows GROUP BY {keys} ORDER BY {order}"
    out = _duck(sql, {"rows": _Source(first.schema, chained())})
    return out.rename_columns(["label", *groups, "count"])


# -- confusions ------------------------------------------------------------------------

_PAIR_SCHEMA = pa.schema([("a", pa.int32()), ("b", pa.int32()), ("first", pa.int32()), ("margin", pa.float64())])


def confused_pairs(
    col: Any, model: str, where: str | None = None, top: int = 20, *, version: int | str | None = None,
) -> pa.Table:
    """The class pairs the model hesitates between most: for each prediction (a row, or a
    box of a detection model) its top-1 and top-2 classes form an unordered pair.

    Returns ``class_a``, ``class_b`` (in the model's class order), ``count``, ``a_top1``
    (how many had ``class_a`` on top) and ``mean_margin`` (mean ``p1 - p2``), the ``top``
    most frequent pairs first (ties: smaller mean margin first, then class order).

    Level: a classifier's rows; for a detection model every box with probs of the images
    matching ``where``. The box-level kind with a box filter (``objects_where``) and a count
    of the boxes without probs is :func:`indexing.objects.box_confused_pairs`.
    """
    spec = _model(col, model)
    if not isinstance(top, int) or isinstance(top, bool) or not 1 <= top <= MAX_TOP:
        raise InvalidArgument(f"top must be an integer in [1, {MAX_TOP}], got {top!r}")

    def derive(_b: pa.RecordBatch, _rows: np.ndarray, p: np.ndarray) -> dict[str, Any]:
        i1, i2, p1, p2 = _top2(p)
        return {"a": np.minimum(i1, i2).astype(np.int32), "b": np.maximum(i1, i2).astype(np.int32),
                "first": i1.astype(np.int32), "margin": p1 - p2}

    src = _prediction_source(col, spec, where, version, _PAIR_SCHEMA, derive)
    sql = ("SELECT a, b, count(*)::BIGINT AS count, count(*) FILTER (WHERE first = a)::BIGINT AS a_top1, "
           "avg(margin) AS mean_margin FROM pairs GROUP BY a, b "
           "ORDER BY count DESC, mean_margin ASC, a, b LIMIT $1")
    out = _duck(sql, {"pairs": src}, [top])
    if out.num_rows == 0:
        _check_has_predictions(col, spec, version)
    return pa.table({
        "class_a": _names(spec.classes, out.column("a")),
        "class_b": _names(spec.classes, out.column("b")),
        "count": out.column("count"),
        "a_top1": out.column("a_top1"),
        "mean_margin": out.column("mean_margin"),
    })


_CONFUSION_SCHEMA = pa.schema([("label", pa.string()), ("predicted", pa.int32())])


def confusion(
    col: Any, model: str, where: str | None = None, *, errors_only: bool = False,
    version: int | str | None = None,
) -> pa.Table:
    """True label vs predicted class (argmax) over labeled rows with a prediction.

    Returns ``label``, ``predicted``, ``count``, most frequent first. ``errors_only`` keeps
    the off-diagonal cells (label != predicted). Labels outside the model's classes are
    reported as they are. Classification models only (detection needs box matching).
    """
    spec = _model(col, model)
    if spec.task != "classification":
        raise FailedPrecondition(
            f"model '{spec.name}' is a detection model; a label-vs-prediction confusion needs a classifier"
        )
    # Unlabeled rows are dropped here, not by adding "AND label IS NOT NULL" to the user's
    # filter: composing SQL text around it could change its meaning (e.g. a trailing comment).
    def derive(b: pa.RecordBatch, rows: np.ndarray, p: np.ndarray) -> dict[str, Any]:
        labels = b.column("label").take(pa.array(rows, pa.int64()))
        labeled = valid_mask(labels)
        return {"label": labels.filter(pa.array(labeled)), "predicted": p[labeled].argmax(axis=1).astype(np.int32)}

    src = _prediction_source(col, spec, where, version, _CONFUSION_SCHEMA, derive, label=True)
    out = _duck("SELECT label, predicted, count(*)::BIGINT AS count FROM rows GROUP BY label, predicted "
                "ORDER BY count DESC, label, predicted", {"rows": src})
    result = pa.table({"label": out.column("label"), "predicted": _names(spec.classes, out.column("predicted")),
                       "count": out.column("count")})
    if errors_only:
        result = result.filter(pc.not_equal(result.column("label"), result.column("predicted")))
    if out.num_rows == 0:
        _check_has_predictions(col, spec, version)
    return result


# -- uncertainty per class ----------------------------------------------------------------

_UNC_SCHEMA = pa.schema([("predicted", pa.int32()), ("score", pa.float64())])


def class_uncertainty(
    col: Any, model: str, where: str | None = None, measure: str = "entropy", *,
    version: int | str | None = None,
) -> pa.Table:
    """Uncertainty per predicted class: ``predicted``, ``count``, ``mean_score``,
    ``min_score``, ``max_score`` (``measure``: entropy | margin | least_confidence | ratio,
    higher = more uncertain), the most uncertain class first."""
    spec = _model(col, model)
    if measure not in MEASURES:
        raise InvalidArgument(f"measure {measure!r} is not one of {', '.join(MEASURES)}")

    def derive(_b: pa.RecordBatch, _rows: np.ndarray, p: np.ndarray) -> dict[str, Any]:
        return {"predicted": p.argmax(axis=1).astype(np.int32), "score": uncertainty(p, measure)}

    src = _prediction_source(col, spec, where, version, _UNC_SCHEMA, derive)
    out = _duck("SELECT predicted, count(*)::BIGINT AS count, avg(score) AS mean_score, "
                "min(score) AS min_score, max(score) AS max_score FROM rows GROUP BY predicted "
                "ORDER BY mean_score DESC, predicted", {"rows": src})
    if out.num_rows == 0:
        _check_has_predictions(col, spec, version)
    return out.set_column(0, "predicted", _names(spec.classes, out.column("predicted")))


# -- histograms -----------------------------------------------------------------------------

def _numeric_field(col: Any, field: str, version: int | str | None) -> pa.DataType:
    """Resolve ``field`` (a column, or a dotted path into a struct such as
    ``pred_m.loss``) to its type; it must be numeric."""
    if not isinstance(field, str) or not field:
        raise InvalidArgument(f"field must be a column name, got {field!r}")
    schema = _table(col, version).schema
    parts = field.split(".")
    if parts[0] not in schema.names:
        raise InvalidArgument(
            f"histogram: unknown field '{field}' in collection '{col.name}' (columns: {', '.join(schema.names)})"
        )
    t = schema.field(parts[0]).type
    for i, part in enumerate(parts[1:], start=1):
        if not pa.types.is_struct(t) or t.get_field_index(part) < 0:
            raise InvalidArgument(f"histogram: '{'.'.join(parts[:i])}' has no field '{part}' (type {t})")
        t = t.field(part).type
    if not (pa.types.is_integer(t) or pa.types.is_floating(t) or pa.types.is_decimal(t)):
        raise InvalidArgument(f"histogram: field '{field}' has type {t}; a histogram needs a numeric field")
    return t


def histogram(
    col: Any,
    field: str,
    bins: int = 20,
    where: str | None = None,
    range: tuple[float, float] | None = None,  # noqa: A002 - numpy's name for it
    *,
    version: int | str | None = None,
    source: str | Sequence[str] | None = None,
    objects_where: str | None = None,
) -> pa.Table:
    """Equal-width histogram of a numeric field: ``bin_start``, ``bin_end``, ``count``
    (``bins`` rows, empty bins included), binned exactly as ``numpy.histogram`` on float64.

    ``field`` may be an object column, ``objects.<column>`` (``objects.area``,
    ``objects.score``...; see :mod:`indexing.objects`): one value per box of the images
    matching ``where``, of ``source`` (a detection model or ``"gt"``; default all) and
    matching ``objects_where``. Otherwise ``source``/``objects_where`` are refused.

    Without ``range`` a first streamed pass finds min and max. NULL, NaN/inf and
    out-of-range values are counted in the schema metadata (:func:`histogram_stats`).
    """
    per_object = isinstance(field, str) and field.startswith("objects.")
    box_source = source  # the name `source` is the stream factory below
    if per_object:
        column = field.split(".", 1)[1]
        if column not in object_rows.NUMERIC_COLUMNS:
            raise InvalidArgument(f"histogram: '{field}' is not a numeric object column; numeric object "
                                  f"columns: {', '.join('objects.' + c for c in object_rows.NUMERIC_COLUMNS)}")
    else:
        if source is not None or objects_where is not None:
            raise InvalidArgument("histogram: source and objects_where need an object field "
                                  "('objects.<column>'); to keep images with such objects use "
                                  "where=\"... AND any_object(...)\"")
        _numeric_field(col, field, version)
    if not isinstance(bins, int) or isinstance(bins, bool) or not 1 <= bins <= MAX_BINS:
        raise InvalidArgument(f"bins must be an integer in [1, {MAX_BINS}], got {bins!r}")
    if range is not None:
        try:
            lo, hi = (float(v) for v in range)
        except (TypeError, ValueError) as exc:
            raise InvalidArgument(f"range must be (low, high) numbers, got {range!r}") from exc
        if not (np.isfinite(lo) and np.isfinite(hi)) or lo > hi:
            raise InvalidArgument(f"range must be finite with low <= high, got {range!r}")
        if lo == hi:  # numpy widens an empty range the same way
            lo, hi = lo - 0.5, hi + 0.5
    if not per_object:
        check_filter(col, where)  # before any pass (object batches check theirs on creation)
    proj = {"x": field}
    finite = "x IS NOT NULL AND isfinite(x::DOUBLE)"
    # One pass for what is not binned (and min/max when no range is given), one to bin.
    stats_sql = (f"SELECT count(*)::BIGINT AS total, count(*) FILTER (WHERE x IS NULL)::BIGINT AS nulls, "
                 f"count(*) FILTER (WHERE x IS NOT NULL AND NOT isfinite(x::DOUBLE))::BIGINT AS non_finite, "
                 f"min(x::DOUBLE) FILTER (WHERE {finite}) AS lo, max(x::DOUBLE) FILTER (WHERE {finite}) AS hi, "
                 f"count(*) FILTER (WHERE {finite} AND x::DOUBLE < $1)::BIGINT AS below, "
                 f"count(*) FILTER (WHERE {finite} AND x::DOUBLE > $2)::BIGINT AS above FROM rows")

    def source() -> _Source:
        if per_object:
            table = _table(col, version)
            batches = (pa.RecordBatch.from_arrays([t.column(column).combine_chunks()], names=["x"])
                       for t in object_rows.object_batches(table, where, objects_where, source=box_source,
                                                           columns=[column]))
        else:
            batches = stream(col, proj, where, version=version)
        first = next(batches, None)
        schema = first.schema if first is not None else pa.schema([("x", pa.float64())])

        def chained() -> Iterator[pa.RecordBatch]:
            if first is not None:
                yield first
                yield from batches

        return _Source(schema, chained())

    bounds = [-np.inf, np.inf] if range is None else [lo, hi]
    stats = _duck(stats_sql, {"rows": source()}, bounds).to_pylist()[0]
    if range is None:
        lo, hi = (0.0, 1.0) if stats["lo"] is None else (float(stats["lo"]), float(stats["hi"]))
        if lo == hi:
            lo, hi = lo - 0.5, hi + 0.5
    edges = np.linspace(lo, hi, bins + 1)
    norm = bins / (hi - lo)
    # numpy.histogram's rule: index from (x - lo) * norm, then corrected against the edges
    # so that every value lands in [edge_i, edge_i+1) (the last bin closed).
    sql = (
        f"WITH v AS (SELECT x::DOUBLE AS x FROM rows WHERE {finite}), "
        "i0 AS (SELECT x, least(trunc((x - $1) * $3)::BIGINT, $4 - 1) AS i FROM v WHERE x >= $1 AND x <= $2), "
        "i1 AS (SELECT x, CASE WHEN x < $5[i + 1] THEN i - 1 ELSE i END AS i FROM i0), "
        "i2 AS (SELECT CASE WHEN i <> $4 - 1 AND x >= $5[i + 2] THEN i + 1 ELSE i END AS i FROM i1) "
        "SELECT i, count(*)::BIGINT AS count FROM i2 GROUP BY i"
    )
    counted = _duck(sql, {"rows": source()}, [lo, hi, norm, bins, edges.tolist()])
    counts = np.zeros(bins, dtype=np.int64)
    idx = np.asarray(counted.column("i").to_numpy(zero_copy_only=False), dtype=np.int64)
    counts[idx] = np.asarray(counted.column("count").to_numpy(zero_copy_only=False), dtype=np.int64)
    meta = {"field": field, "total": int(stats["total"]), "nulls": int(stats["nulls"]),
            "non_finite": int(stats["non_finite"]), "below": int(stats["below"]), "above": int(stats["above"]),
            "min": stats["lo"], "max": stats["hi"], "low": lo, "high": hi}
    schema = pa.schema([("bin_start", pa.float64()), ("bin_end", pa.float64()), ("count", pa.int64())],
                       metadata={HISTOGRAM_META_KEY: json.dumps(meta)})
    return pa.table([pa.array(edges[:-1]), pa.array(edges[1:]), pa.array(counts)], schema=schema)


def histogram_stats(table: pa.Table) -> dict[str, Any]:
    """What a :func:`histogram` left out of its bins: ``total`` rows matched, ``nulls``,
    ``non_finite`` (NaN/inf), ``below``/``above`` an explicit range, the data's ``min`` and
    ``max`` and the binned ``low``/``high``."""
    meta = table.schema.metadata or {}
    if HISTOGRAM_META_KEY not in meta:
        raise InvalidArgument("not a histogram table (no assay.histogram metadata)")
    return json.loads(meta[HISTOGRAM_META_KEY])

