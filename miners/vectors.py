"""Loading what embedding miners need from a collection, and the k-NN graph facility.

* :func:`load_pool` streams the rows matching a filter at a pinned version and returns their
  ids, row ids and vectors (float32, rows without a vector left out), plus what any
  other input the miner reads along the scan decodes (:class:`miners.inputs.Bound`). Vectors go to a NumPy array, or to a memory-mapped
  file under the system temp folder when they would exceed ``MEMMAP_ABOVE_BYTES`` (:func:`miners.mapped.float32_array`) — a 10M ×
  384 pool (15 GB) is paged by the OS instead of held in RAM, and the pages a run has read
  are handed back to the page cache above ``POOL_MAPPED_BUDGET_BYTES`` (:mod:`miners.mapped`).
* :func:`graph` (and :func:`knn_graph`, its arrays only) gives the k nearest neighbours of a
  set of query vectors among rows the run has loaded (the pool itself, or a reference set):
  the k-NN graph engine :func:`miners.knn.knn_search` on the loaded vectors — the filter is
  already applied, so nothing is prefiltered — exact where that is cheaper, else FAISS IVF,
  with its recall@k measured on a sample and its method in :class:`miners.knn.GraphInfo`.
  Without loaded rows (``searched=None``: a few seeds against a large indexed pool) it asks
  the space's ANN index through LanceDB, SQL filter as prefilter: interactive search stays
  with LanceDB. Graphs are cached per (table, version, space, filter, queries) in this
  process; a graph built for k serves every k' <= k (its first k' columns).
* **Object spaces**: ``space="objects:<model>"`` names a detection model declared with
  ``box_embedding_dim`` (:func:`space_spec` checks it and says the fix otherwise); its rows
  are the boxes of the images matching the filter that carry an embedding
  (:func:`load_objects`, boxes without one counted in ``skipped``), ``Pool.boxes`` their box
  index, and every function here takes it where it takes an image space — which is how
  every gathered vectors miner and ``knn`` run on objects unchanged.
"""

from __future__ import annotations

import hashlib
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from indexing.errors import InvalidArgument
from indexing.objects import object_batches
from indexing.schema import EMB_PREFIX, PRED_PREFIX
from indexing.settings import EXACT_MAX_ROWS  # noqa: F401 -- read here by the knn miner and scoring
from indexing.settings import KNN_CACHE_ENTRIES as CACHE_ENTRIES
from indexing.settings import KNN_CACHE_MAX_BYTES as CACHE_MAX_BYTES
from indexing.settings import KNN_QUERY_BATCH as ANN_QUERY_BATCH
from indexing.settings import POOL_CHUNK_ROWS as CHUNK_ROWS
from indexing.store import Collection
from miners.knn import GraphInfo, KnnResult, eta_text, knn_search
from miners.mapped import float32_array

#: An object space: ``space="objects:<model>"`` mines the boxes of a detection model declared
#: with ``box_embedding_dim`` by their per-box embeddings instead of the images by theirs.
OBJECTS_PREFIX = "objects:"


def object_model(space: str | None) -> str | None:
    """The detection model of an object space (``"objects:<model>"``), None for an image space."""
    if space and space.startswith(OBJECTS_PREFIX):
        return space[len(OBJECTS_PREFIX):]
    return None


@dataclass(frozen=True)
class ObjectSpace:
    """What miners read of a space, for an object space: the boxes of ``model`` as rows,
    their ``embedding`` (``dim`` = the model's ``box_embedding_dim``) as vectors, compared by
    Euclidean distance on the stored values (no normalisation: the runner stored them as
    they came)."""

    name: str
    model: str
    dim: int
    metric: str = "l2"
    normalized: bool = False
    column: str | None = None  # no emb_ column: the vectors live in pred_<model>.boxes
    index: Any = None  # no ANN index: object pools are always loaded and searched in memory

    @property
    def boxes_path(self) -> str:
        return f"{PRED_PREFIX}{self.model}.boxes"


def space_spec(col: Collection, space: str) -> Any:
    """The space a run names: an image space (:class:`indexing.schema.SpaceSpec`, NotFound
    with the known ones) or an object space (:class:`ObjectSpace`; InvalidArgument naming the
    fix when the model does not exist, is not a detection model, or declares no
    ``box_embedding_dim``). An image space name that is a detection model's name is refused
    with the object-space spelling."""
    model = object_model(space)
    models = col.models
    if model is None:
        if space not in col.spaces and space in models and models[space].task == "detection":
            raise InvalidArgument(f"space '{space}' is not an embedding space of '{col.name}'; '{space}' is a "
                                  f"detection model: to mine its boxes by their embeddings give "
                                  f"space='{OBJECTS_PREFIX}{space}'")
        return col.space(space)
    known = [n for n, m in models.items() if m.task == "detection" and m.box_embedding_dim]
    hint = (f"detection models with box embeddings: {', '.join(sorted(known))}" if known else
            "no model of this collection has box embeddings: declare a detection model with "
            "box_embedding_dim=<d> and store an embedding on each box")
    if model not in models:
        what = (f"'{model}' is an image embedding space, not a model (use space='{model}' to mine images)"
                if model in col.spaces else f"'{model}' is not a model of collection '{col.name}'")
        raise InvalidArgument(f"space '{space}': {what}; an object space is '{OBJECTS_PREFIX}<detection model>' "
                              f"({hint})")
    spec = models[model]
    if spec.task != "detection" or not spec.box_embedding_dim:
        why = (f"a {spec.task} model has no boxes" if spec.task != "detection"
               else "it was declared without box_embedding_dim, so its boxes carry no embedding")
        raise InvalidArgument(f"space '{space}': model '{model}' cannot be mined by object: {why}; declare a "
                              f"detection model with box_embedding_dim=<d> and store an embedding on each box "
                              f"({hint})")
    return ObjectSpace(name=space, model=model, dim=spec.box_embedding_dim)


def space_condition(space: str | None) -> str:
    """SQL true for the image rows that can hold a vector of the space: an embedding, or for
    an object space at least one box of the model (whether boxes carry an embedding is
    only known per box: boxes without are skipped and counted while loading)."""
    model = object_model(space)
    if model is not None:
        return f"array_length({PRED_PREFIX}{model}.boxes) > 0"
    return f"{EMB_PREFIX}{space} IS NOT NULL"


@dataclass
class Pool:
    """Rows of a collection that carry a vector in the space (and the other inputs asked for).
    In an object space each row is one box: ``ids`` its image, ``boxes`` its index in the
    image's ``pred_<model>.boxes``; ``row_keys`` are then positions (0..n-1), not Lance row
    ids."""

    ids: np.ndarray            # object array of str
    row_keys: np.ndarray       # uint64 row ids
    vectors: np.ndarray        # (n, d) float32, or a read-only memmap
    scanned: int = 0
    skipped: int = 0
    # what the ``extra`` decoders gave, one entry per row (e.g. "probs": (n, C) float64)
    arrays: dict[str, np.ndarray] = field(default_factory=dict)
    boxes: np.ndarray | None = None  # int64 box index per row, object spaces only

    def __len__(self) -> int:
        return len(self.ids)

    def name(self, row: int) -> str:
        """Row ``row`` as a caller names it: the image id, or ``<image id>#<box>`` for an object."""
        return str(self.ids[row]) if self.boxes is None else f"{self.ids[row]}#{int(self.boxes[row])}"

    @property
    def probs(self) -> np.ndarray | None:
        return self.arrays.get("probs")


class ChunkDecoder(Protocol):
    """Another input read along the pool scan (:class:`miners.inputs.Bound`)."""

    @property
    def columns(self) -> dict[str, str]: ...
    @property
    def row_arrays(self) -> tuple[str, ...]: ...
    def present(self, batch: pa.RecordBatch) -> np.ndarray | None: ...
    def decode(self, batch: pa.RecordBatch, rows: np.ndarray, row_keys: np.ndarray) -> dict[str, Any]: ...


def _list_matrix(arr: pa.Array, width: int, dtype: Any) -> np.ndarray:
    return np.asarray(pc.list_flatten(arr).to_numpy(zero_copy_only=False), dtype=dtype).reshape(-1, width)


def load_pool(col: Collection, version: int, space: str, where: str | None, *,
              extra: Sequence[ChunkDecoder] = (), check: Any = lambda: None,
              progress: Callable[[float, str], None] | None = None, objects_where: str | None = None) -> Pool:
    """Stream the vectors of the rows matching ``where`` at ``version`` — and what each
    ``extra`` decoder reads (its ``columns``; rows it says lack it are skipped; its
    ``row_arrays`` land in ``Pool.arrays``). Rows missing any of them are counted in
    ``skipped``. ``progress(fraction, message)`` after each chunk: rows read of the total,
    with an ETA. In an object space (``objects:<model>``) the rows are the boxes of the
    images matching ``where`` (:func:`load_objects`; ``objects_where`` keeps the boxes matching
    it)."""
    if object_model(space) is not None:
        if extra:
            raise InvalidArgument(f"space '{space}' holds objects, whose only per-row input is their embedding; "
                                  "this miner also reads per-image inputs: run it on an image space")
        return load_objects(col, version, space, where, objects_where=objects_where, check=check,
                            progress=progress)
    spec = col.space(space)
    table = col.at_version(version)
    proj = {"id": "id", "v": f"{EMB_PREFIX}{space}"}
    for d in extra:
        proj.update(d.columns)
    query = table.search().select(proj).limit(None).with_row_id(True)
    if where:
        query = query.where(where)
    total = table.count_rows(where) if where else table.count_rows()
    out = float32_array((total, spec.dim), prefix="assay-pool-")
    ids: list[Any] = []
    keys: list[np.ndarray] = []
    parts: dict[str, list[np.ndarray]] = {name: [] for d in extra for name in d.row_arrays}
    n = scanned = 0
    t0 = time.perf_counter()
    for batch in query.to_batches(CHUNK_ROWS):
        check()
        scanned += batch.num_rows
        if progress is not None:
            progress(scanned / max(1, total), f"loading vectors: {scanned:,} of {total:,} rows"
                     f"{eta_text(scanned, total, time.perf_counter() - t0)}")
        valid = ~np.asarray(batch.column("v").is_null().to_numpy(zero_copy_only=False))
        for d in extra:
            has = d.present(batch)
            if has is not None:
                valid &= has
        rows = np.flatnonzero(valid)
        if not len(rows):
            continue
        take = pa.array(rows, pa.int64())
        m = len(rows)
        chunk = _list_matrix(batch.column("v").take(take), spec.dim, np.float32)
        if spec.metric == "cosine" and not spec.normalized:
            # cosine spaces are searched as Euclidean distance between unit vectors; normalised
            # per chunk, so that a memory-mapped pool gets no whole-pool copy in RAM
            norms = np.linalg.norm(chunk, axis=1, keepdims=True)
            chunk = (chunk / np.where(norms == 0, 1, norms)).astype(np.float32)
        out[n:n + m] = chunk
        ids.extend(batch.column("id").take(take).to_pylist())
        row_keys = np.asarray(batch.column("_rowid").take(take).to_numpy(zero_copy_only=False), dtype=np.uint64)
        keys.append(row_keys)
        for d in extra:
            decoded = d.decode(batch, rows, row_keys)
            for name in d.row_arrays:
                parts[name].append(decoded[name])
        n += m
    vectors = out[:n]
    return Pool(
        ids=np.asarray(ids, dtype=object), row_keys=np.concatenate(keys) if keys else np.zeros(0, np.uint64),
        vectors=vectors, scanned=scanned, skipped=scanned - n,
        arrays={name: np.concatenate(chunks) for name, chunks in parts.items() if chunks},
    )


def load_objects(col: Collection, version: int, space: str, where: str | None, *,
                 objects_where: str | None = None, check: Any = lambda: None,
                 progress: Callable[[float, str], None] | None = None) -> Pool:
    """The boxes of the object space's model in the images matching ``where`` (and, with
    ``objects_where``, the boxes matching that predicate over the object columns), with their
    embeddings: one row per box that carries one; boxes whose embedding is null are counted
    in ``skipped``. Streamed by chunks of images (:func:`indexing.objects.object_batches`)."""
    spec = space_spec(col, space)
    table = col.at_version(version)
    total = table.count_rows(where) if where else table.count_rows()
    ids: list[Any] = []
    boxes: list[np.ndarray] = []
    vecs: list[np.ndarray] = []
    scanned = images = 0
    for objs in object_batches(table, where, objects_where, source=spec.model,
                               columns=["id", "box", "embedding"], chunk_rows=CHUNK_ROWS):
        check()
        scanned += objs.num_rows
        images += len(pc.unique(objs.column("id"))) if objs.num_rows else 0
        if progress is not None:
            progress(min(1.0, images / max(1, total)), f"loading object embeddings: {scanned:,} boxes")
        emb = objs.column("embedding").combine_chunks()
        lengths = np.asarray(pc.fill_null(pc.list_value_length(emb), 0).to_numpy(zero_copy_only=False))
        ok = lengths == spec.dim
        if not ok.any():
            continue
        keep = pa.array(np.flatnonzero(ok), pa.int64())
        ids.extend(objs.column("id").take(keep).to_pylist())
        boxes.append(np.asarray(objs.column("box").take(keep).to_numpy(), dtype=np.int64))
        vecs.append(_list_matrix(emb.take(keep), spec.dim, np.float32))
    n = len(ids)
    return Pool(ids=np.asarray(ids, dtype=object), row_keys=np.arange(n, dtype=np.uint64),
                vectors=np.concatenate(vecs) if vecs else np.zeros((0, spec.dim), np.float32),
                scanned=scanned, skipped=scanned - n,
                boxes=np.concatenate(boxes) if boxes else np.zeros(0, np.int64))


def ids_of_rows(table: Any, row_keys: np.ndarray) -> list[str]:
    """The ``id`` of each row id (in order), read from ``table`` (a pinned version)."""
    if len(row_keys) == 0:
        return []
    found = table.take_row_ids([int(r) for r in row_keys]).select(["id"]).with_row_id().to_arrow()
    id_of = dict(zip(found.column("_rowid").to_pylist(), found.column("id").to_pylist(), strict=True))
    return [id_of[int(r)] for r in row_keys]


# -- the k-NN graph ---------------------------------------------------------------------------

_CACHE: OrderedDict[tuple, KnnResult] = OrderedDict()
_CACHE_LOCK = threading.Lock()


def _cache_key(col: Collection, version: int, space: str, where: str | None,
               queries: np.ndarray, exclude_self: bool, objects_where: str | None = None) -> tuple:
    # The key pins table, version, space and filter (not k: a larger k serves a smaller one);
    # the queries are told apart by their shape and ~1k evenly spaced rows (hashing a 1M-row
    # pool whole would cost seconds).
    sample = np.ascontiguousarray(queries[:: max(1, len(queries) // 1024)])
    digest = hashlib.blake2b(sample.tobytes(), digest_size=16)
    digest.update(str(queries.shape).encode())
    return (col.store.root, col.name, version, space, where or "", objects_where or "", exclude_self,
            digest.hexdigest())


def _cached(key: tuple, k: int) -> KnnResult | None:
    with _CACHE_LOCK:
        hit = _CACHE.get(key)
        if hit is None or hit.info.k < k:
            return None
        _CACHE.move_to_end(key)
    out = hit.sliced(k)
    if out is hit:
        out = KnnResult(hit.indices, hit.distances, GraphInfo(**{**hit.info.to_dict(), "cached": True}),
                        hit.sample)
    return out


def _remember(key: tuple, result: KnnResult) -> None:
    with _CACHE_LOCK:
        old = _CACHE.get(key)
        if old is not None and old.info.k > result.info.k:
            return  # the cached graph serves more
        _CACHE[key] = result
        _CACHE.move_to_end(key)
        size = sum(r.indices.nbytes + r.distances.nbytes for r in _CACHE.values())
        while len(_CACHE) > 1 and (len(_CACHE) > CACHE_ENTRIES or size > CACHE_MAX_BYTES):
            _, dropped = _CACHE.popitem(last=False)
            size -= dropped.indices.nbytes + dropped.distances.nbytes


def graph(col: Collection, version: int, space: str, where: str | None, k: int, queries: np.ndarray,
          *, searched: Pool | None = None, exclude_self: bool = False, check: Any = lambda: None,
          progress: Callable[[float, str], None] | None = None, target_recall: float = 0.95,
          objects_where: str | None = None) -> KnnResult:
    """k nearest rows (matching ``where`` at ``version``) of each query vector, with how the
    graph was built. With ``searched`` (the rows, loaded): indices into ``searched``, from
    :func:`miners.knn.knn_search` on its vectors; ``exclude_self`` drops each query's own row
    when the queries are the searched rows themselves (query i is row i). Without: stable
    row ids from the space's ANN index through LanceDB. Euclidean distances, ascending.
    ``objects_where``: the box filter of an object space's rows (part of the cache key)."""
    key = _cache_key(col, version, space, where, queries, exclude_self, objects_where)
    hit = _cached(key, k)
    if hit is not None:
        if progress is not None:
            progress(1.0, f"k-NN graph (k={k}) reused from the cache ({hit.info.method})")
        return hit
    spec = space_spec(col, space)
    if spec.metric == "dot":
        raise ValueError(f"space '{space}' uses the dot metric; k-NN graph miners need l2 or cosine")
    report = progress or (lambda f, m: None)
    if searched is not None:
        # Euclidean on the loaded vectors (unit vectors for cosine spaces, see load_pool)
        own = exclude_self and queries is searched.vectors
        result = knn_search(searched.vectors, k, queries=None if own else queries,
                            self_ids=None if own or not exclude_self else np.arange(len(queries)),
                            exclude_self=own, target_recall=target_recall, progress=report, check=check)
    else:
        t0 = time.perf_counter()
        idx, dist = _ann_graph(col, version, spec, where, k, queries, None, exclude_self, check)
        result = KnnResult(idx, dist, GraphInfo(
            method=f"lancedb-ann nprobes={spec.index.nprobes} refine_factor={spec.index.refine_factor}",
            k=k, rows=0, queries=len(queries), recall=None, recall_sample=0, target_recall=target_recall,
            search_s=time.perf_counter() - t0))
    _remember(key, result)
    return result


def knn_graph(col: Collection, version: int, space: str, where: str | None, k: int, queries: np.ndarray,
              *, searched: Pool | None = None, exclude_self: bool = False,
              check: Any = lambda: None, objects_where: str | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(indices, distances) of :func:`graph`."""
    result = graph(col, version, space, where, k, queries, searched=searched, exclude_self=exclude_self,
                   check=check, objects_where=objects_where)
    return result.indices, result.distances


def _ann_graph(col: Collection, version: int, spec: Any, where: str | None, k: int, queries: np.ndarray,
               searched: Pool | None, exclude_self: bool, check: Any) -> tuple[np.ndarray, np.ndarray]:
    """Batch ANN searches through LanceDB (index + refine, SQL prefilter)."""
    table = col.at_version(version)
    if searched is not None:  # row id -> row of `searched`
        by_key = np.argsort(searched.row_keys, kind="stable")
        sorted_keys = searched.row_keys[by_key]
    fetch = k + 1 if exclude_self else k
    n = len(queries)
    indices = np.full((n, k), -1, dtype=np.int64)
    distances = np.full((n, k), np.inf, dtype=np.float64)
    for start in range(0, n, ANN_QUERY_BATCH):
        check()
        q = np.ascontiguousarray(queries[start:start + ANN_QUERY_BATCH], dtype=np.float32)
        builder = (table.search(q, vector_column_name=spec.column).distance_type(spec.metric)
                   .limit(fetch).select(["_distance"]).with_row_id(True)
                   .nprobes(spec.index.nprobes).refine_factor(spec.index.refine_factor))
        if where:
            builder = builder.where(where, prefilter=True)
        res = builder.to_arrow()
        qi = np.asarray(res.column("query_index").to_numpy(zero_copy_only=False)) if "query_index" in \
            res.column_names else np.zeros(res.num_rows, dtype=np.int64)
        rows = np.asarray(res.column("_rowid").to_numpy(zero_copy_only=False), dtype=np.uint64)
        dist = _euclidean(np.asarray(res.column("_distance").to_numpy(zero_copy_only=False), np.float64), spec)
        target = (by_key[np.searchsorted(sorted_keys, rows)] if searched is not None
                  else rows.astype(np.int64))
        keep = ~(exclude_self & (target == start + qi)) if exclude_self else np.ones(len(qi), dtype=bool)
        qi, target, dist = qi[keep], target[keep], dist[keep]
        order = np.lexsort((dist, qi))
        qi, target, dist = qi[order], target[order], dist[order]
        # rank of each neighbour within its query, then keep the first k
        first = np.r_[0, np.flatnonzero(np.diff(qi)) + 1]
        rank = np.arange(len(qi)) - np.repeat(first, np.diff(np.r_[first, len(qi)]))
        ok = rank < k
        indices[start + qi[ok], rank[ok]] = target[ok]
        distances[start + qi[ok], rank[ok]] = dist[ok]
    return indices, distances


def _euclidean(lance_distance: np.ndarray, spec: Any) -> np.ndarray:
    """LanceDB reports squared L2 and 1 − cos; the density miners work on Euclidean
    distances (for unit vectors ‖a − b‖ = sqrt(2 (1 − cos)))."""
    if spec.metric == "l2":
        return np.sqrt(np.clip(lance_distance, 0.0, None))
    return np.sqrt(np.clip(2.0 * lance_distance, 0.0, None))
