"""Scoring on the server: streaming per-item scores, threshold calibration, scorer export.

``Scoring.Score`` scores items that are not stored (a camera's frames, a pipeline's
records) with the miners' formulas — through :mod:`miners.edge`, the very functions an
exported edge scorer runs — and decides keep/drop against thresholds. Novelty is measured
against the collection's reference set (``reference_where``) at one version, pinned when the
stream starts:

* up to ``miners.vectors.EXACT_MAX_ROWS`` reference rows the reference vectors are loaded
  once (cached per version, space, filter) and searched exactly
  (:func:`miners.density.exact_knn_graph`), exactly as the edge scorer does — the two agree
  to the last bit;
* above that, the loaded reference vectors get an IVF index of the k-NN graph engine
  (:func:`miners.knn.tuned_index`: FAISS, ``nprobe`` tuned for recall@k >= 0.95 on a sample
  of the reference rows), built once per cached reference, and each batch is searched in
  it; LOF reads the reference set's own graph from :func:`miners.vectors.graph` (shared
  with the novelty miner's cache).

``Calibrate`` scores stored rows (``where``, a seeded sample of at most ``max_rows``) the same
way and returns the thresholds of :func:`miners.edge.calibrate_thresholds`; a row that is also
a reference row is left out of its own neighbours. ``ExportScorer`` packs the settings, the
thresholds and a compact reference set (all rows, a seeded sample, or k-means centroids)
into an :class:`miners.edge.EdgeScorer` bundle; with a budget its thresholds are calibrated
against that compact reference, so the device keeps the requested fraction.
"""

from __future__ import annotations

import math
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from indexing.errors import FailedPrecondition, InvalidArgument, NotFound, ResourceExhausted
from indexing.schema import EMB_PREFIX, PRED_PREFIX, ModelSpec, SpaceSpec
from indexing.settings import CALIBRATION_MAX_ROWS as DEFAULT_MAX_ROWS
from indexing.settings import MAX_REFERENCE_SIZE, REFERENCE_CACHE
from indexing.settings import REFERENCE_SIZE as DEFAULT_REFERENCE_SIZE
from indexing.settings import SCORER_EXPORT_CHUNK as EXPORT_CHUNK
from indexing.settings import SCORING_CHUNK_ROWS as CHUNK_ROWS
from indexing.settings import SCORING_MAX_K as MAX_K
from indexing.store import Collection, Store
from miners import edge, knn
from miners.detection import AGGREGATIONS, BOX_METHODS
from miners.topk import row_uniforms
from miners.uncertainty import ROW_SUM_TOLERANCE
from miners.vectors import EXACT_MAX_ROWS, Pool, graph, load_pool
from protos.assay.v1 import scoring_pb2, scoring_pb2_grpc
from service.arrow_ipc import ipc_to_table, table_to_ipc

__all__ = ["ScorerConfig", "ScoringService", "add_scoring_servicer", "config_from_proto"]

INPUT_COLUMNS = ("probs", "logits", "samples", "boxes", "embedding")
#: what each score reads
NEEDS: dict[str, tuple[str, ...]] = {
    **{name: ("probs", "logits") for name in edge.PROB_SCORES},
    **{name: ("samples",) for name in edge.SAMPLE_SCORES},
    "energy": ("logits",), "detection": ("boxes",), "novelty": ("embedding",),
}


# ------------------------------------------------------------------------------ config


@dataclass(frozen=True)
class ScorerConfig:
    collection: str
    model: str | None = None
    space: str | None = None
    reference_where: str | None = None
    k: int = 10
    novelty: str = "knn_distance"
    how: str = "kth"
    logits_temperature: float = 1.0
    energy_temperature: float = 1.0
    detection_method: str = "entropy"
    detection_aggregate: str = "sum"
    nms_iou: float | None = 0.5
    thresholds: dict[str, float] = field(default_factory=dict)
    version: int | None = None


def _positive(value: float, name: str) -> float:
    if not math.isfinite(value) or value <= 0:
        raise InvalidArgument(f"{name} must be a finite number > 0; got {value}")
    return value


def config_from_proto(msg: scoring_pb2.ScorerSpec) -> ScorerConfig:
    """Validate a ScorerSpec (InvalidArgument naming the field)."""
    if not msg.collection:
        raise InvalidArgument("spec.collection is required")
    k = msg.k or 10
    if not 1 <= k <= MAX_K:
        raise InvalidArgument(f"spec.k must be in [1, {MAX_K}]; got {k}")
    novelty = msg.novelty or "knn_distance"
    if novelty not in edge.NOVELTY_METHODS:
        raise InvalidArgument(f"spec.novelty must be one of {', '.join(edge.NOVELTY_METHODS)}; got {novelty!r}")
    how = msg.how or "kth"
    if how not in edge.KNN_HOW:
        raise InvalidArgument(f"spec.how must be one of {', '.join(edge.KNN_HOW)}; got {how!r}")
    method = msg.detection_method or "entropy"
    if method not in BOX_METHODS:
        raise InvalidArgument(f"spec.detection_method must be one of {', '.join(BOX_METHODS)}; got {method!r}")
    aggregate = msg.detection_aggregate or "sum"
    if aggregate not in AGGREGATIONS:
        raise InvalidArgument(f"spec.detection_aggregate must be one of {', '.join(AGGREGATIONS)}; got {aggregate!r}")
    nms = msg.nms_iou if msg.HasField("nms_iou") else 0.5
    if not 0.0 <= nms <= 1.0:
        raise InvalidArgument(f"spec.nms_iou must be in [0, 1] (1 = no NMS); got {nms}")
    thresholds = dict(msg.thresholds)
    _check_score_names(thresholds, "spec.thresholds")
    for name, t in thresholds.items():
        if math.isnan(t):
            raise InvalidArgument(f"spec.thresholds['{name}'] is NaN")
    if "novelty" in thresholds and not msg.space:
        raise InvalidArgument("a novelty threshold needs spec.space (the embedding space to measure novelty in)")
    return ScorerConfig(
        collection=msg.collection, model=msg.model or None, space=msg.space or None,
        reference_where=msg.reference_where or None, k=int(k), novelty=novelty, how=how,
        logits_temperature=_positive(msg.logits_temperature or 1.0, "spec.logits_temperature"),
        energy_temperature=_positive(msg.energy_temperature or 1.0, "spec.energy_temperature"),
        detection_method=method, detection_aggregate=aggregate, nms_iou=None if nms >= 1.0 else nms,
        thresholds=thresholds, version=int(msg.version) if msg.HasField("version") else None,
    )


def _check_score_names(names: Sequence[str] | dict[str, Any], what: str) -> None:
    unknown = [n for n in names if n not in edge.SCORE_NAMES]
    if unknown:
        raise InvalidArgument(f"{what}: unknown score(s) {', '.join(unknown)} (scores: {', '.join(edge.SCORE_NAMES)})")


# ------------------------------------------------------------------------------- items


@dataclass
class Items:
    """One batch of items as arrays; NaN rows (or None entries) mark a missing input."""

    n: int
    ids: pa.Array | None = None
    probs: np.ndarray | None = None
    logits: np.ndarray | None = None
    samples: np.ndarray | None = None
    boxes: list[Any] | None = None
    vectors: np.ndarray | None = None  # (n, d) float32, prepared (normalised when the space is)
    has_vector: np.ndarray | None = None


def _row(ids: pa.Array | None, row: int) -> str:
    if ids is not None and ids[row].is_valid:
        return f"row {row} (id {ids[row].as_py()!r})"
    return f"row {row}"


def _valid(arr: pa.Array) -> np.ndarray:
    return ~np.asarray(arr.is_null().to_numpy(zero_copy_only=False))


def _is_list(t: pa.DataType) -> bool:
    return pa.types.is_list(t) or pa.types.is_large_list(t) or pa.types.is_fixed_size_list(t)


def _lengths(arr: pa.Array) -> np.ndarray:
    return np.asarray(pc.list_value_length(arr).fill_null(0).to_numpy(zero_copy_only=False), dtype=np.int64)


def _values(arr: pa.Array, name: str) -> np.ndarray:
    flat = pc.list_flatten(arr)
    if not (pa.types.is_floating(flat.type) or pa.types.is_integer(flat.type)):
        raise InvalidArgument(f"column '{name}': values must be numbers, got {flat.type}")
    if flat.null_count:
        raise InvalidArgument(f"column '{name}': lists must not contain null values")
    return np.asarray(flat.to_numpy(zero_copy_only=False), dtype=np.float64)


def _class_matrix(arr: pa.Array, name: str, c: int | None, ids: pa.Array | None, what: str
                  ) -> tuple[np.ndarray | None, int | None]:
    """list<float> (C per row) -> (n, C) float64 with NaN rows for nulls (None when every
    row is null); C checked against ``c``, or taken from the first row when ``c`` is None."""
    if not _is_list(arr.type):
        raise InvalidArgument(f"column '{name}': expected a list of {c or 'C'} numbers per item, got {arr.type}")
    valid = _valid(arr)
    rows = np.flatnonzero(valid)
    if not len(rows):
        return None, c
    lengths = _lengths(arr)[rows]
    if c is None:
        c = int(lengths[0])
    bad = lengths != c
    if bad.any():
        i = int(np.argmax(bad))
        raise InvalidArgument(f"column '{name}': {_row(ids, int(rows[i]))} has {int(lengths[i])} values; "
                              f"{what} has {c} classes")
    if c < 2:
        raise InvalidArgument(f"column '{name}': items need at least 2 class values; got {c}")
    out = np.full((len(arr), c), np.nan)
    out[rows] = _values(arr.filter(pa.array(valid)), name).reshape(len(rows), c)
    finite = np.isfinite(out[rows]).all(axis=1)
    if not finite.all():
        raise InvalidArgument(f"column '{name}': {_row(ids, int(rows[np.argmin(finite)]))} contains NaN or infinity")
    return out, c


def _check_probs(p: np.ndarray, rows: np.ndarray, name: str, ids: pa.Array | None, owner: np.ndarray | None = None
                 ) -> None:
    """Probability rows ``p[rows]``: >= 0 and summing to 1 (the miners' tolerance)."""
    if not len(rows):
        return
    sub = p[rows]
    where = owner if owner is not None else rows
    neg = (sub < 0).any(axis=-1)
    if neg.any():
        i = np.unravel_index(int(np.argmax(neg)), neg.shape)[0]
        raise InvalidArgument(f"column '{name}': {_row(ids, int(where[i]))} has negative probabilities; "
                              "send probabilities, or logits in 'logits'")
    dev = np.abs(sub.sum(axis=-1) - 1.0) > ROW_SUM_TOLERANCE
    if dev.any():
        i = np.unravel_index(int(np.argmax(dev)), dev.shape)[0]
        raise InvalidArgument(f"column '{name}': {_row(ids, int(where[i]))} does not sum to 1 (tolerance "
                              f"{ROW_SUM_TOLERANCE:g}); send probabilities (softmax), or logits in 'logits'")


def parse_items(table: pa.Table, *, model: ModelSpec | None, space: SpaceSpec | None,
                classes: int | None = None) -> tuple[Items, int | None]:
    """An Arrow batch of items -> :class:`Items` (InvalidArgument naming the column and row).
    ``classes``: C seen in earlier batches when no model fixes it. Returns (items, C)."""
    table = table.combine_chunks()
    names = table.column_names
    pred_cols = [n for n in names if n.startswith(PRED_PREFIX)]
    emb_cols = [n for n in names if n.startswith(EMB_PREFIX)]
    allowed = {"id", *INPUT_COLUMNS}
    if model is not None:
        allowed.add(model.column)
    if space is not None:
        allowed.add(space.column)
    unknown = [n for n in names if n not in allowed]
    if unknown:
        hint = ""
        if any(n in pred_cols for n in unknown):
            hint = f"; predictions of another model: set spec.model to it (spec.model is {model.name if model else 'unset'})"
        elif any(n in emb_cols for n in unknown):
            hint = f"; vectors of another space: set spec.space to it (spec.space is {space.name if space else 'unset'})"
        raise InvalidArgument(f"unknown column(s) {', '.join(unknown)}: items carry id, {', '.join(INPUT_COLUMNS)} "
                              f"(or pred_<model> / emb_<space> of the spec's model and space){hint}")
    n = table.num_rows
    ids = None
    if "id" in names:
        ids = table.column("id").chunk(0) if table.column("id").num_chunks else pa.array([], pa.string())
        if not (pa.types.is_string(ids.type) or pa.types.is_large_string(ids.type) or pa.types.is_null(ids.type)):
            raise InvalidArgument(f"column 'id' must be strings, got {ids.type}")
        ids = ids.cast(pa.string())
    cols: dict[str, pa.Array] = {}

    def arr(name: str) -> pa.Array:
        col = table.column(name)
        return col.chunk(0) if col.num_chunks == 1 else pa.concat_arrays(col.chunks) if col.num_chunks else \
            pa.nulls(0, col.type)

    if model is not None and model.column in names:
        st = arr(model.column)
        if not pa.types.is_struct(st.type):
            raise InvalidArgument(f"column '{model.column}': expected a struct of probs/logits/samples/boxes, got "
                                  f"{st.type}")
        for i in range(st.type.num_fields):
            child = st.type.field(i).name
            if child in ("probs", "logits", "samples", "boxes"):
                if child in names:
                    raise InvalidArgument(f"column '{child}' is given twice (top level and in '{model.column}')")
                cols[child] = pc.struct_field(st, child) if st.null_count else st.field(i)
    for name in ("probs", "logits", "samples", "boxes"):
        if name in names:
            cols[name] = arr(name)
    if space is not None and space.column in names:
        if "embedding" in names:
            raise InvalidArgument(f"columns 'embedding' and '{space.column}' both given; send one")
        cols["embedding"] = arr(space.column)
    elif "embedding" in names:
        cols["embedding"] = arr("embedding")
    if not cols:
        raise InvalidArgument(f"the items carry no input to score: send {', '.join(INPUT_COLUMNS)} "
                              "(or pred_<model> / emb_<space>)")
    items = Items(n=n, ids=ids)
    c = model.num_classes if model is not None else classes
    what = f"model '{model.name}'" if model is not None else "the stream (its first items)"
    for name in ("probs", "logits"):
        if name in cols:
            m, c = _class_matrix(cols[name], name, c, ids, what)
            if m is not None and name == "probs":
                _check_probs(m, np.flatnonzero(~np.isnan(m[:, 0])), name, ids)
                items.probs = m
            elif m is not None:
                items.logits = m
    if "samples" in cols:
        items.samples, c = _samples(cols["samples"], c, ids, what)
    if "boxes" in cols:
        items.boxes, c = _boxes(cols["boxes"], c, ids, what)
    if "embedding" in cols:
        if space is None:
            raise InvalidArgument("the items carry embeddings but spec.space is not set: name the space to "
                                  "measure novelty in")
        items.vectors, items.has_vector = _vectors(cols["embedding"], space, ids)
    return items, c


def _samples(arr: pa.Array, c: int | None, ids: pa.Array | None, what: str
             ) -> tuple[np.ndarray | None, int | None]:
    if not (_is_list(arr.type) and _is_list(arr.type.value_type)):
        raise InvalidArgument(f"column 'samples': expected K lists of C probabilities per item, got {arr.type}")
    valid = _valid(arr)
    rows = np.flatnonzero(valid)
    if not len(rows):
        return None, c
    ks = _lengths(arr)[rows]
    if len(rows) and (ks != ks[0]).any():
        i = int(np.argmax(ks != ks[0]))
        raise InvalidArgument(f"column 'samples': {_row(ids, int(rows[i]))} has {int(ks[i])} samples, the first "
                              f"item {int(ks[0])}; every item of a batch needs the same K")
    if len(rows) and ks[0] < 1:
        raise InvalidArgument(f"column 'samples': {_row(ids, int(rows[0]))} has no samples")
    k = int(ks[0]) if len(rows) else 1
    inner = pc.list_flatten(arr.filter(pa.array(valid)))
    owner = rows[np.repeat(np.arange(len(rows)), k)] if len(rows) else np.zeros(0, dtype=np.int64)
    if inner.null_count:
        raise InvalidArgument(f"column 'samples': {_row(ids, int(owner[np.argmax(_valid(inner) == 0)]))} has a "
                              "null sample")
    lengths = _lengths(inner)
    if c is None and len(lengths):
        c = int(lengths[0])
    bad = lengths != c
    if bad.any():
        i = int(np.argmax(bad))
        raise InvalidArgument(f"column 'samples': {_row(ids, int(owner[i]))} has a sample of {int(lengths[i])} "
                              f"values; {what} has {c} classes")
    out = np.full((len(arr), k, c or 2), np.nan)
    if len(rows):
        vals = _values(inner, "samples").reshape(len(rows), k, c)
        if not np.isfinite(vals).all():
            i = int(np.argmax(~np.isfinite(vals).all(axis=(1, 2))))
            raise InvalidArgument(f"column 'samples': {_row(ids, int(rows[i]))} contains NaN or infinity")
        out[rows] = vals
        _check_probs(out.reshape(len(arr), k, -1), rows, "samples", ids)
    return out, c


def _boxes(arr: pa.Array, c: int | None, ids: pa.Array | None, what: str) -> tuple[list[Any], int | None]:
    if not (pa.types.is_list(arr.type) and pa.types.is_struct(arr.type.value_type)):
        raise InvalidArgument(f"column 'boxes': expected a list of {{x1, y1, x2, y2, score, probs}} per item, "
                              f"got {arr.type}")
    flat = pc.list_flatten(arr)
    for f in ("x1", "y1", "x2", "y2", "score"):
        if flat.type.get_field_index(f) < 0:
            raise InvalidArgument(f"column 'boxes': every box needs '{f}'")
    owner = np.asarray(pc.list_parent_indices(arr).to_numpy(zero_copy_only=False), dtype=np.int64)
    coords = np.stack([np.asarray(flat.field(f).to_numpy(zero_copy_only=False), dtype=np.float64)
                       for f in ("x1", "y1", "x2", "y2", "score")], axis=1) if len(flat) else np.zeros((0, 5))
    if len(flat):
        bad = ~np.isfinite(coords).all(axis=1) | (coords[:, 2] < coords[:, 0]) | (coords[:, 3] < coords[:, 1])
        bad |= (coords[:, 4] < 0) | (coords[:, 4] > 1)
        if bad.any():
            raise InvalidArgument(f"column 'boxes': a box of {_row(ids, int(owner[np.argmax(bad)]))} is invalid "
                                  "(finite coordinates with x2 >= x1, y2 >= y1; score in [0, 1])")
    probs = None
    if len(flat) and flat.type.get_field_index("probs") >= 0 and flat.field("probs").null_count < len(flat):
        p = flat.field("probs")
        if p.null_count:
            raise InvalidArgument(f"column 'boxes': {_row(ids, int(owner[np.argmax(~_valid(p))]))} has a box "
                                  "without probs; every box needs class probabilities, or none does")
        lengths = _lengths(p)
        if c is None:
            c = int(lengths[0])
        if (lengths != c).any():
            i = int(np.argmax(lengths != c))
            raise InvalidArgument(f"column 'boxes': box probs of {_row(ids, int(owner[i]))} have {int(lengths[i])} "
                                  f"values; {what} has {c} classes")
        probs = _values(p, "boxes").reshape(-1, c)
        _check_probs(probs, np.arange(len(probs)), "boxes", ids, owner=owner)
    valid = _valid(arr)
    starts = np.searchsorted(owner, np.arange(len(arr)), side="left")
    ends = np.searchsorted(owner, np.arange(len(arr)), side="right")
    out: list[Any] = []
    for i in range(len(arr)):
        if not valid[i]:
            out.append(None)
            continue
        s, e = starts[i], ends[i]
        out.append({"boxes": coords[s:e, :4], "scores": coords[s:e, 4],
                    "probs": None if probs is None else probs[s:e]})
    return out, c


def _vectors(arr: pa.Array, space: SpaceSpec, ids: pa.Array | None) -> tuple[np.ndarray, np.ndarray]:
    name = "embedding"
    if not _is_list(arr.type):
        raise InvalidArgument(f"column '{name}': expected a list of {space.dim} floats per item, got {arr.type}")
    valid = _valid(arr)
    rows = np.flatnonzero(valid)
    lengths = _lengths(arr)[rows]
    bad = lengths != space.dim
    if bad.any():
        i = int(np.argmax(bad))
        raise InvalidArgument(f"column '{name}': {_row(ids, int(rows[i]))} has dimension {int(lengths[i])}; "
                              f"space '{space.name}' has dimension {space.dim}")
    out = np.zeros((len(arr), space.dim), dtype=np.float32)
    if len(rows):
        raw = _values(arr.filter(pa.array(valid)), name).astype(np.float32).reshape(len(rows), space.dim)
        finite = np.isfinite(raw).all(axis=1)
        if not finite.all():
            raise InvalidArgument(f"column '{name}': {_row(ids, int(rows[np.argmin(finite)]))} contains NaN or "
                                  "infinity")
        if _normalize(space):
            zero = np.linalg.norm(raw, axis=1) == 0
            if zero.any():
                raise InvalidArgument(f"column '{name}': {_row(ids, int(rows[np.argmax(zero)]))} is the zero "
                                      f"vector, which has no direction in space '{space.name}' ({space.metric})")
        out[rows] = edge.prepare_vectors(raw, dim=space.dim, normalize=_normalize(space))
    return out, valid


def _normalize(space: SpaceSpec) -> bool:
    """Whether query vectors are compared as unit vectors: the store normalises ``normalized``
    spaces on write, and the miners search cosine spaces on unit vectors."""
    return bool(space.normalized or space.metric == "cosine")


# --------------------------------------------------------------------------- reference


class ServerReference:
    """The reference set of a (collection, version, space, filter) for novelty."""

    def __init__(self, col: Collection, version: int, space: SpaceSpec, where: str | None, k: int,
                 method: str, how: str) -> None:
        self.col, self.version, self.space, self.where = col, version, space, where
        self.k, self.method, self.how = k, method, how
        self.table = col.at_version(version)
        cond = f"{space.column} IS NOT NULL"
        self.rows = self.table.count_rows(f"{where} AND {cond}" if where else cond)
        if self.rows == 0:
            raise FailedPrecondition(
                f"no reference row has a vector in space '{space.name}'"
                + (f" (reference filter {where!r})" if where else "") + ": novelty has nothing to compare with")
        if method == "lof" and self.rows < 2:
            raise FailedPrecondition("LOF novelty needs at least 2 reference rows with vectors")
        self.exact = self.rows <= EXACT_MAX_ROWS
        self.pool: Pool = load_pool(col, version, space.name, where)
        self.novelty: edge.NoveltyReference | None = None
        self.index: knn.IvfIndex | None = None
        self.info: knn.GraphInfo | None = None
        ref_graph = None
        if method == "lof":  # the novelty miner's reference graph (and its cache)
            ref_graph = graph(col, version, space.name, where, min(k, len(self.pool) - 1), self.pool.vectors,
                              searched=self.pool, exclude_self=True)
            ref_graph = (ref_graph.indices, ref_graph.distances)
        if self.exact:
            self.novelty = edge.NoveltyReference(self.pool.vectors, k=k, method=method, how=how,
                                                 reference_graph=ref_graph)
        else:
            self.index, self.info = knn.tuned_index(self.pool.vectors, min(k, len(self.pool)))
            self._ref_graph = ref_graph
        by_key = np.argsort(self.pool.row_keys, kind="stable")
        self._sorted_keys, self._by_key = self.pool.row_keys[by_key], by_key

    def _positions(self, row_keys: np.ndarray) -> np.ndarray:
        """Pool position of each row id (-1: not a reference row)."""
        pos = np.searchsorted(self._sorted_keys, row_keys)
        pos = np.minimum(pos, len(self._sorted_keys) - 1)
        found = self._sorted_keys[pos] == row_keys
        return np.where(found, self._by_key[pos], -1)

    def scores(self, queries: np.ndarray, self_rows: np.ndarray | None = None) -> np.ndarray:
        """Novelty of prepared query vectors; ``self_rows``: the row id of each query
        when it is a stored row (left out of its own neighbours)."""
        self_index = None if self_rows is None else self._positions(self_rows)
        if self.exact:
            assert self.novelty is not None
            return self.novelty.scores(queries, self_index)
        assert self.index is not None
        kq = min(self.k, self.rows)
        q = np.ascontiguousarray(queries, dtype=np.float32)
        idx, dist = self.index.search(q, kq, self_index)
        return edge.novelty_scores(idx, dist, method=self.method, how=self.how, reference_graph=self._ref_graph)


# ----------------------------------------------------------------------------- scoring


def score_items(items: Items, cfg: ScorerConfig, novelty: Callable[[np.ndarray, np.ndarray | None], np.ndarray]
                | None, self_rows: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """Every score the items' inputs allow (NaN where an item lacks the input)."""
    try:
        out = edge.prediction_scores(probs=items.probs, logits=items.logits, samples=items.samples,
                                     logits_temperature=cfg.logits_temperature,
                                     energy_temperature=cfg.energy_temperature, validate=False)
        if items.boxes is not None:
            out["detection"] = edge.detection_item_scores(items.boxes, method=cfg.detection_method,
                                                          aggregate=cfg.detection_aggregate, nms_iou=cfg.nms_iou)
    except ValueError as exc:
        raise InvalidArgument(str(exc)) from exc
    if items.vectors is not None and novelty is not None:
        col = np.full(items.n, np.nan)
        rows = np.flatnonzero(items.has_vector)
        if len(rows):
            col[rows] = novelty(items.vectors[rows], None if self_rows is None else self_rows[rows])
        out["novelty"] = col
    return {name: out[name] for name in edge.SCORE_NAMES if name in out}


def scores_table(items: Items, scores: dict[str, np.ndarray], keep: np.ndarray | None, start: int) -> pa.Table:
    cols: dict[str, pa.Array] = {"index": pa.array(np.arange(start, start + items.n, dtype=np.int64))}
    if items.ids is not None:
        cols["id"] = items.ids
    for name, values in scores.items():
        cols[name] = pa.array(values, pa.float64(), mask=np.isnan(values))
    cols["keep"] = pa.array(keep, pa.bool_()) if keep is not None else pa.nulls(items.n, pa.bool_())
    return pa.table(cols)


class ScoreSession:
    """One Score stream: the spec resolved against the collection at a pinned version."""

    def __init__(self, service: ScoringService, cfg: ScorerConfig) -> None:
        self.cfg = cfg
        self.col = service.store.collection(cfg.collection)
        self.model = self.col.model(cfg.model) if cfg.model else None
        self.space = self.col.space(cfg.space) if cfg.space else None
        if self.space is not None and self.space.metric == "dot":
            raise InvalidArgument(f"space '{self.space.name}' uses the dot metric; novelty needs an l2 or cosine space")
        self.where = self.col.validate_filter(cfg.reference_where)
        self.version = int(self.col.at_version(cfg.version).version) if cfg.version is not None else self.col.version
        self.classes = self.model.num_classes if self.model is not None else None
        self.service = service
        self._reference: ServerReference | None = None
        self.index = 0

    @property
    def reference(self) -> ServerReference:
        if self._reference is None:
            assert self.space is not None
            self._reference = self.service.reference(self.col, self.version, self.space, self.where, self.cfg)
        return self._reference

    def novelty(self, vectors: np.ndarray, self_rows: np.ndarray | None) -> np.ndarray:
        try:
            return self.reference.scores(vectors, self_rows)
        except ValueError as exc:
            raise InvalidArgument(f"novelty: {exc}") from exc

    def parse(self, table: pa.Table) -> Items:
        items, c = parse_items(table, model=self.model, space=self.space, classes=self.classes)
        if self.classes is None:
            self.classes = c
        return items

    def score_table(self, table: pa.Table) -> tuple[pa.Table, int]:
        items = self.parse(table)
        scores = score_items(items, self.cfg, self.novelty if self.space is not None else None)
        keep = edge.decide(scores, self.cfg.thresholds, items.n)
        out = scores_table(items, scores, keep, self.index)
        self.index += items.n
        return out, int(keep.sum()) if keep is not None else 0


class ScoringService:
    """Scores, calibrates and exports; holds a small cache of reference sets."""

    def __init__(self, store: Store, *, max_batch_rows: int = 100_000) -> None:
        self.store = store
        self.max_batch_rows = max_batch_rows
        self._refs: OrderedDict[tuple, ServerReference] = OrderedDict()
        self._lock = threading.Lock()

    def session(self, cfg: ScorerConfig) -> ScoreSession:
        return ScoreSession(self, cfg)

    def reference(self, col: Collection, version: int, space: SpaceSpec, where: str | None,
                  cfg: ScorerConfig) -> ServerReference:
        key = (col.store.root, col.name, version, space.name, space.to_json(), where or "", cfg.k, cfg.novelty, cfg.how)
        with self._lock:
            if key in self._refs:
                self._refs.move_to_end(key)
                return self._refs[key]
        ref = ServerReference(col, version, space, where, cfg.k, cfg.novelty, cfg.how)
        with self._lock:
            self._refs[key] = ref
            while len(self._refs) > REFERENCE_CACHE:
                self._refs.popitem(last=False)
        return ref

    # -- stored rows -------------------------------------------------------------------

    def _criteria(self, session: ScoreSession, criteria: Sequence[str]) -> list[str]:
        names = list(criteria)
        if not names:
            names = (["entropy"] if session.model is not None else []) + (["novelty"] if session.space else [])
            if not names:
                raise InvalidArgument("calibration needs criteria (score names) or a spec with a model or a space")
        _check_score_names(names, "criteria")
        if len(set(names)) != len(names):
            raise InvalidArgument("criteria must not repeat a score")
        for name in names:
            if name == "novelty" and session.space is None:
                raise InvalidArgument("criterion 'novelty' needs spec.space")
            if name != "novelty" and session.model is None:
                raise InvalidArgument(f"criterion '{name}' reads stored predictions: set spec.model")
        if session.model is not None and session.model.task == "detection":
            wrong = [n for n in names if n not in ("detection", "novelty")]
            if wrong:
                raise InvalidArgument(f"model '{session.model.name}' is a detector: criteria {', '.join(wrong)} need "
                                      "class predictions (use 'detection')")
        return names

    def _pool_batches(self, session: ScoreSession, where: str | None, criteria: Sequence[str], max_rows: int,
                      seed: int) -> Iterator[tuple[Items, np.ndarray]]:
        """Stored rows matching ``where`` (a seeded sample of about ``max_rows``) as items,
        with their row ids; only the inputs the criteria read."""
        inputs = sorted({i for c in criteria for i in NEEDS[c]})
        proj: dict[str, str] = {}
        for name in inputs:
            if name == "embedding":
                assert session.space is not None
                proj["embedding"] = session.space.column
            else:
                assert session.model is not None
                proj[name] = f"{session.model.column}.{name}"
        table = session.col.at_version(session.version)
        where = session.col.validate_filter(where)
        total = table.count_rows(where) if where else table.count_rows()
        if total == 0:
            raise FailedPrecondition(f"the calibration filter {where!r} matches no rows in '{session.col.name}'")
        fraction = min(1.0, max_rows / total)
        query = table.search().select(proj).limit(None).with_row_id(True)
        if where:
            query = query.where(where)
        for batch in query.to_batches(CHUNK_ROWS):
            keys = np.asarray(batch.column("_rowid").to_numpy(zero_copy_only=False), dtype=np.uint64)
            tbl = pa.Table.from_batches([batch]).drop_columns(["_rowid"])
            if fraction < 1.0:
                pick = row_uniforms(keys, seed) < fraction
                tbl, keys = tbl.filter(pa.array(pick)), keys[pick]
            if tbl.num_rows == 0:
                continue
            items, _ = parse_items(tbl, model=session.model, space=session.space, classes=session.classes)
            yield items, keys

    def _pool_scores(self, session: ScoreSession, where: str | None, criteria: Sequence[str], max_rows: int,
                     seed: int, novelty: Callable[[np.ndarray, np.ndarray | None], np.ndarray] | None
                     ) -> dict[str, np.ndarray]:
        parts: list[dict[str, np.ndarray]] = []
        for items, keys in self._pool_batches(session, where, criteria, max_rows, seed):
            scores = score_items(items, session.cfg, novelty, self_rows=keys)
            parts.append({c: scores.get(c, np.full(items.n, np.nan)) for c in criteria})
        cols = {c: np.concatenate([p[c] for p in parts]) if parts else np.zeros(0) for c in criteria}
        have = np.zeros(len(cols[criteria[0]]), dtype=bool)
        for v in cols.values():
            have |= ~np.isnan(v)
        if not have.any():
            raise FailedPrecondition(
                f"no calibration row has the inputs of {', '.join(criteria)}: upsert predictions / vectors first")
        return {c: v[have] for c, v in cols.items()}

    @staticmethod
    def _budget(budget: float) -> float:
        if not 0.0 < budget < 1.0:
            raise InvalidArgument(f"budget must be a fraction in (0, 1), e.g. 0.02 keeps about 2% of traffic; "
                                  f"got {budget}")
        return budget

    def calibrate(self, cfg: ScorerConfig, where: str | None, budget: float, criteria: Sequence[str],
                  max_rows: int = DEFAULT_MAX_ROWS, seed: int = 0) -> dict[str, Any]:
        budget = self._budget(budget)
        session = self.session(cfg)
        names = self._criteria(session, criteria)
        scores = self._pool_scores(session, where, names, max_rows, seed,
                                   session.novelty if session.space is not None else None)
        try:
            thresholds = edge.calibrate_thresholds(scores, budget, names)
        except ValueError as exc:
            raise FailedPrecondition(f"calibration: {exc}") from exc
        keep = edge.decide(scores, thresholds)
        return {"thresholds": thresholds, "budget": budget, "kept_fraction": float(keep.mean()),
                "rows": len(keep), "version": session.version, "criteria": names}

    def export(self, cfg: ScorerConfig, *, where: str | None = None, budget: float = 0.0,
               criteria: Sequence[str] = (), max_rows: int = DEFAULT_MAX_ROWS, seed: int = 0,
               reference: str = "sample", reference_size: int = DEFAULT_REFERENCE_SIZE,
               fmt: str = "npz") -> tuple[bytes, dict[str, Any]]:
        """The bundle's bytes and a summary (thresholds, reference_rows, kept_fraction)."""
        if reference not in ("sample", "all", "centroids"):
            raise InvalidArgument(f"reference must be 'sample', 'all' or 'centroids'; got {reference!r}")
        if fmt not in ("npz", "json"):
            raise InvalidArgument(f"format must be 'npz' or 'json'; got {fmt!r}")
        if not 1 <= reference_size <= MAX_REFERENCE_SIZE:
            raise InvalidArgument(f"reference_size must be in [1, {MAX_REFERENCE_SIZE}]; got {reference_size}")
        if reference == "centroids" and cfg.novelty == "lof":
            raise InvalidArgument("LOF novelty needs reference rows (a sample), not centroids")
        session = self.session(cfg)
        names = self._criteria(session, criteria) if budget else []
        if budget:
            self._budget(budget)
        novelty_ref: edge.NoveltyReference | None = None
        ref_keys: np.ndarray | None = None
        kind = None
        source_rows = 0
        if session.space is not None:
            srv = session.reference
            pool = srv.pool
            source_rows = len(pool)
            vectors, kind = pool.vectors, "all"
            ref_keys = pool.row_keys
            if reference == "centroids":
                vectors, kind, ref_keys = _centroids(pool.vectors, reference_size, seed, _normalize(session.space)), \
                    "centroids", None
            elif reference == "sample" and len(pool) > reference_size:
                pick = np.sort(np.random.default_rng(seed).choice(len(pool), reference_size, replace=False))
                vectors, kind, ref_keys = pool.vectors[pick], "sample", pool.row_keys[pick]
            ref_graph = srv.novelty.reference_graph if kind == "all" and srv.novelty is not None else None
            try:
                novelty_ref = edge.NoveltyReference(np.array(vectors, dtype=np.float32), k=cfg.k, method=cfg.novelty,
                                                    how=cfg.how, reference_graph=ref_graph)
            except ValueError as exc:
                raise InvalidArgument(str(exc)) from exc
        meta = {"collection": session.col.name, "collection_version": session.version,
                "model": session.model.name if session.model else None,
                "space": session.space.name if session.space else None,
                "reference_where": cfg.reference_where, "reference_kind": kind,
                "reference_source_rows": source_rows, "created_at": time.time()}
        scorer = edge.EdgeScorer(
            thresholds={}, classes=tuple(session.model.classes) if session.model else (),
            reference=novelty_ref, dim=session.space.dim if session.space else None,
            metric=session.space.metric if session.space else None,
            normalize=_normalize(session.space) if session.space else False,
            logits_temperature=cfg.logits_temperature, energy_temperature=cfg.energy_temperature,
            detection_method=cfg.detection_method, detection_aggregate=cfg.detection_aggregate, nms_iou=cfg.nms_iou,
            meta=meta)
        kept = float("nan")
        if budget:
            novelty = None
            if novelty_ref is not None:
                order = np.argsort(ref_keys, kind="stable") if ref_keys is not None else None

                def novelty(vectors: np.ndarray, self_rows: np.ndarray | None) -> np.ndarray:
                    self_index = None
                    if self_rows is not None and order is not None:
                        sk = ref_keys[order]
                        pos = np.minimum(np.searchsorted(sk, self_rows), len(sk) - 1)
                        self_index = np.where(sk[pos] == self_rows, order[pos], -1)
                    return novelty_ref.scores(vectors, self_index)

            scores = self._pool_scores(session, where, names, max_rows, seed, novelty)
            try:
                scorer.thresholds = edge.calibrate_thresholds(scores, budget, names)
            except ValueError as exc:
                raise FailedPrecondition(f"calibration: {exc}") from exc
            scorer.budget = budget
            kept = float(edge.decide(scores, scorer.thresholds).mean())
            scorer.meta.update(calibration_rows=len(next(iter(scores.values()))), kept_fraction=kept,
                               calibration_where=where, criteria=names)
        else:
            if "novelty" in cfg.thresholds and novelty_ref is None:
                raise InvalidArgument("a novelty threshold needs spec.space")
            scorer.thresholds = dict(cfg.thresholds)
        data = scorer.to_bytes(fmt)
        return data, {"thresholds": dict(scorer.thresholds), "reference_rows": len(novelty_ref.vectors)
                      if novelty_ref is not None else 0, "kept_fraction": kept, "bytes": len(data)}


def _nearest(x: np.ndarray, centres: np.ndarray, block: int = 4096) -> np.ndarray:
    """Index of the nearest centre of each row (squared Euclidean), in row blocks."""
    c2 = (centres * centres).sum(axis=1)
    out = np.empty(len(x), dtype=np.int64)
    for s in range(0, len(x), block):
        xb = x[s:s + block]
        out[s:s + block] = np.argmin(c2[None, :] - 2.0 * (xb @ centres.T), axis=1)
    return out


def _centroids(vectors: np.ndarray, n: int, seed: int, normalize: bool, iters: int = 20) -> np.ndarray:
    """``n`` k-means centres of the reference vectors (Lloyd from ``n`` distinct seeded rows,
    fitted on at most ``max(20 n, 50,000)`` of them; unit length again for normalised spaces).
    NumPy only: a reference of millions of rows is summarised from a sample."""
    rng = np.random.default_rng(seed)
    x = np.asarray(vectors, dtype=np.float64)
    n = min(n, len(x))
    fit = max(20 * n, 50_000)
    if len(x) > fit:
        x = x[np.sort(rng.choice(len(x), fit, replace=False))]
    centres = x[rng.choice(len(x), n, replace=False)].copy()
    for _ in range(iters if n < len(x) else 0):
        labels = _nearest(x, centres)
        counts = np.bincount(labels, minlength=n)
        sums = np.zeros_like(centres)
        np.add.at(sums, labels, x)
        moved = np.where(counts[:, None] > 0, sums / np.maximum(counts, 1)[:, None], centres)
        if np.allclose(moved, centres, rtol=0, atol=1e-9):
            break
        centres = moved
    if normalize:
        norms = np.linalg.norm(centres, axis=1, keepdims=True)
        centres = centres / np.where(norms == 0, 1, norms)
    return centres.astype(np.float32)


# ---------------------------------------------------------------------------- servicer


class ScoringServicer(scoring_pb2_grpc.ScoringServicer):
    def __init__(self, scoring: ScoringService) -> None:
        self.scoring = scoring

    def Score(self, request_iterator, context):  # noqa: N802 — gRPC method names
        session: ScoreSession | None = None
        for request in request_iterator:
            if session is None:
                if not request.HasField("spec"):
                    raise InvalidArgument("the first Score message must carry spec (collection, model, space, ...)")
                session = self.scoring.session(config_from_proto(request.spec))
            elif request.HasField("spec") and request.spec.collection:
                raise InvalidArgument(f"batch {request.seq}: spec is only allowed on the first message")
            try:
                table = ipc_to_table(request.arrow_ipc)
            except ValueError as exc:
                raise InvalidArgument(f"batch {request.seq}: arrow_ipc is not an Arrow IPC stream ({exc})") from exc
            if table.num_rows > self.scoring.max_batch_rows:
                raise ResourceExhausted(f"batch {request.seq}: {table.num_rows} rows; the limit is "
                                        f"{self.scoring.max_batch_rows} rows per batch (split it)")
            try:
                out, kept = session.score_table(table)
            except (InvalidArgument, NotFound, FailedPrecondition) as exc:
                raise type(exc)(f"batch {request.seq}: {exc.message}") from exc
            yield scoring_pb2.ScoreResponse(seq=request.seq, arrow_ipc=table_to_ipc(out), rows=out.num_rows,
                                            kept=kept, version=session.version)

    def Calibrate(self, request, context):  # noqa: N802
        res = self.scoring.calibrate(config_from_proto(request.spec), request.where or None, request.budget,
                                     list(request.criteria), request.max_rows or DEFAULT_MAX_ROWS, int(request.seed))
        return scoring_pb2.CalibrateResponse(thresholds=res["thresholds"], budget=res["budget"],
                                             kept_fraction=res["kept_fraction"], rows=res["rows"],
                                             version=res["version"], criteria=res["criteria"])

    def ExportScorer(self, request, context):  # noqa: N802
        data, info = self.scoring.export(
            config_from_proto(request.spec), where=request.where or None, budget=request.budget,
            criteria=list(request.criteria), max_rows=request.max_rows or DEFAULT_MAX_ROWS, seed=int(request.seed),
            reference=request.reference or "sample", reference_size=request.reference_size or DEFAULT_REFERENCE_SIZE,
            fmt=request.format or "npz")
        for start in range(0, len(data), EXPORT_CHUNK):
            if not context.is_active():
                return
            yield scoring_pb2.ExportScorerChunk(data=data[start:start + EXPORT_CHUNK])
        yield scoring_pb2.ExportScorerChunk(last=True, thresholds=info["thresholds"],
                                            reference_rows=info["reference_rows"],
                                            kept_fraction=info["kept_fraction"], bytes=info["bytes"])


def add_scoring_servicer(server: Any, store: Store, limits: Any = None) -> str:
    """Register the Scoring service; returns its full name (for health and reflection)."""
    max_rows = getattr(limits, "max_batch_rows", 100_000) if limits is not None else 100_000
    scoring_pb2_grpc.add_ScoringServicer_to_server(ScoringServicer(ScoringService(store, max_batch_rows=max_rows)),
                                                   server)
    return scoring_pb2.DESCRIPTOR.services_by_name["Scoring"].full_name
