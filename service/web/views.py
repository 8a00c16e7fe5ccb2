"""What the web page shows, as JSON-ready dicts: collections, a mining run's grid,
search results, the embedding map, datasets.

Each function reads through the same store, run store and dataset objects the gRPC
servicers use (never around them), and bounds what it reads: grids are pages of at most
``MAX_GRID`` items, the map samples at most ``MAX_MAP_POINTS`` rows by offset, histories
and diffs list at most ``MAX_LIST`` ids. Nothing here writes.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import asdict
from typing import Any

import numpy as np
import pyarrow as pa

from indexing.analytics import label_distribution
from indexing.datasets import Datasets
from indexing.errors import FailedPrecondition, InvalidArgument, NotFound
from indexing.filters import any_row
from indexing.settings import MAX_GRID, MAX_LABELS, MAX_LIST, MAX_MAP_POINTS, TEXT_SNIPPET
from indexing.store import Collection, Store
from miners.runs import RunSpec, RunStore
from service.web.gallery import item_dict, top_predictions

# Columns a grid item shows when the collection has them.
ITEM_FIELDS = ("label", "uri", "text", "tags")


def int_param(value: str | None, name: str, default: int, lo: int, hi: int) -> int:
    if value is None or value == "":
        return default
    try:
        n = int(value)
    except ValueError:
        raise InvalidArgument(f"{name} must be an integer, got {value!r}") from None
    if not lo <= n <= hi:
        raise InvalidArgument(f"{name} must be in [{lo}, {hi}], got {n}")
    return n


# -- collections -------------------------------------------------------------------------


def collections_summary(store: Store, runs: RunStore) -> list[dict[str, Any]]:
    out = []
    recent: dict[str, int] = {}
    for rec in runs.list(limit=1000):
        recent[rec.collection] = recent.get(rec.collection, 0) + 1
    for name in store.list_collections():
        col = store.collection(name)
        out.append({
            "name": name, "rows": col.table.count_rows(), "version": col.version,
            "spaces": [{"name": s.name, "dim": s.dim, "metric": s.metric, "model": s.model}
                       for s in col.spaces.values()],
            "models": [{"name": m.name, "task": m.task, "classes": len(m.classes)} for m in col.models.values()],
            "kind": _kind(col), "runs": recent.get(name, 0),
        })
    return out


def _kind(col: Collection) -> str:
    """"image" when rows have a ``uri``, else "text" when they have a ``text``, else
    "vectors" (one row looked up per column and collection version)."""

    def has(column: str) -> bool:
        return column in col.schema.names and any_row(col.table, f"{column} IS NOT NULL")

    return col._cached("web-kind", lambda: "image" if has("uri") else "text" if has("text") else "vectors")


def collection_detail(store: Store, runs: RunStore, datasets: Datasets, name: str) -> dict[str, Any]:
    """describe(), the label distribution (top ``MAX_LABELS`` labels, unlabeled rows under
    a null label), recent runs and the collection's datasets."""
    col = store.collection(name)
    info = col.describe()
    # A full scan of the label column: once per collection version.
    dist = col._cached("web-labels", lambda: label_distribution(col).to_pylist())
    labeled = sum(r["count"] for r in dist if r["label"] is not None)
    info.update(
        kind=_kind(col),
        labels=[r for r in dist if r["label"] is not None][:MAX_LABELS],
        label_count=sum(1 for r in dist if r["label"] is not None),
        labeled=labeled, unlabeled=info["rows"] - labeled,
        runs=[run_summary(r) for r in runs.list(name, limit=50)],
        datasets=[asdict(d) for d in datasets.list(name)],
    )
    return info


def run_summary(rec: RunSpec) -> dict[str, Any]:
    keys = ("run_id", "collection", "miner", "size", "seed", "version", "model", "space", "where", "state",
            "progress", "rows_scanned", "results", "error", "created_at", "finished_at", "params", "timings")
    return {k: getattr(rec, k) for k in keys}


# -- grids -------------------------------------------------------------------------------


def _item_columns(col: Collection, model: str | None) -> tuple[list[str], str | None]:
    names = set(col.schema.names)
    cols = [c for c in ITEM_FIELDS if c in names]
    spec = None
    if model and model in col.models:
        spec = col.models[model]
    elif col.models:
        spec = next(iter(col.models.values()))
    if spec is not None and spec.column in names:
        cols.append(spec.column)
        return cols, spec.name
    return cols, None


def predictions(col: Collection, model: str | None, preds: pa.Array) -> list[dict[str, Any] | None]:
    """:func:`~service.web.gallery.top_predictions` of ``model`` (None: no predictions)."""
    if model is None:
        return [None] * len(preds)
    return top_predictions(preds, model, col.model(model).classes)


def grid_items(col: Collection, table: pa.Table, model: str | None,
               version: int | None = None) -> list[dict[str, Any]]:
    """One JSON item per row of ``table`` (``id`` plus ``rank``/``score``/``_distance``...),
    with the collection's label, uri, text snippet, tags and prediction added (as they
    were at ``version`` when given)."""
    cols, model = _item_columns(col, model)
    ids = table.column("id").to_pylist()
    rows = col.take(ids, ["id", *cols], version=version) if ids else None
    at = {v: i for i, v in enumerate(rows.column("id").to_pylist())} if rows is not None else {}
    pred_col = col.model(model).column if model else None
    preds = predictions(col, model, rows.column(pred_col).combine_chunks()) if pred_col and rows else []
    fields = {c: rows.column(c).to_pylist() for c in cols if c != pred_col} if rows is not None else {}
    own = {c: table.column(c).to_pylist() for c in table.column_names if c != "id"}
    items = []
    for i, id_ in enumerate(ids):
        j = at.get(id_)
        extra = {c: v[j] for c, v in fields.items()} if j is not None else {}
        items.append(item_dict(id_, {c: v[i] for c, v in own.items()}, extra,
                               preds[j] if j is not None and preds else None, TEXT_SNIPPET))
    return items


def run_grid(store: Store, runs: RunStore, run_id: str, offset: str | None, limit: str | None) -> dict[str, Any]:
    rec = runs.get(run_id)
    out: dict[str, Any] = {"run": run_summary(rec), "items": [], "total": rec.results}
    if rec.state != "SUCCEEDED":
        return out
    start = int_param(offset, "offset", 0, 0, 1 << 40)
    n = int_param(limit, "limit", 60, 1, MAX_GRID)
    results = runs.results(run_id).slice(start, n)
    col = store.collection(rec.collection)
    # Labels and predictions as the miner read them (they explain the score), like
    # RunResults; the current ones once that version has been cleaned up.
    try:
        out["items"] = grid_items(col, results, rec.model or None, version=rec.version)
        out["as_of_version"] = rec.version
    except NotFound:
        out["items"] = grid_items(col, results, rec.model or None)
        out["as_of_version"] = col.version
    out["total"] = rec.results
    out["offset"] = start
    return out


def search_grid(store: Store, embedders: Any, collection: str, params: Mapping[str, str]) -> dict[str, Any]:
    """Text -> items (the space's text embedder: MiniLM, or CLIP's text tower for an
    open_clip image space), or the neighbours of an item (``like=<id>``)."""
    col = store.collection(collection)
    space = params.get("space") or _default_space(col, text=bool(params.get("q")))
    spec = col.space(space)
    k = int_param(params.get("k"), "k", 24, 1, MAX_GRID)
    where = params.get("where") or None
    text, like = (params.get("q") or "").strip(), (params.get("like") or "").strip()
    if bool(text) == bool(like):
        raise InvalidArgument("give exactly one of a text query (q) or an item id (like)")
    if text:
        if len(text) > 1000:
            raise InvalidArgument("the text query is over 1000 characters")
        vector = embedders.for_space(spec).embed([text])[0]
        result = col.search(space, vector, k=k, where=where, columns=["id"])
    else:
        found = col.take([like], ["id", spec.column])
        if found.num_rows == 0:
            raise InvalidArgument(f"no item '{like}' in '{collection}'")
        vec = found.column(spec.column)[0].as_py()
        if vec is None:
            raise FailedPrecondition(f"item '{like}' has no vector in space '{space}'")
        result = col.search(space, np.asarray(vec, np.float32), k=min(k + 1, MAX_GRID + 1), where=where,
                            columns=["id"])
        result = result.filter(pa.compute.not_equal(result.column("id"), like)).slice(0, k)
    result = result.append_column("rank", pa.array(np.arange(1, result.num_rows + 1, dtype=np.int32)))
    return {"space": space, "metric": spec.metric,
            "items": grid_items(col, result.rename_columns(
                ["distance" if c == "_distance" else c for c in result.column_names]), params.get("model"))}


def _default_space(col: Collection, *, text: bool) -> str:
    spaces = list(col.spaces.values())
    if not spaces:
        raise FailedPrecondition(f"collection '{col.name}' has no embedding space")
    if text:
        for s in spaces:
            if (s.model or "").startswith(("open_clip:", "sentence-transformers:")):
                return s.name
    return spaces[0].name


# -- the embedding map ---------------------------------------------------------------------


def vectors_of(column: pa.ChunkedArray | pa.Array) -> np.ndarray:
    """(n, d) float64 matrix of a fixed-size-list vector column without nulls (zero-copy
    flatten, not a Python list per row)."""
    arr = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    dim = arr.type.list_size
    return np.asarray(arr.flatten().to_numpy(zero_copy_only=False), dtype=np.float64).reshape(-1, dim)


def pca_2d(x: np.ndarray, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Project rows of ``x`` (n, d) onto their first two principal axes.

    With the column means mu and the top-2 right singular vectors V2 of (x - mu), the map
    of a point v is (v - mu) @ V2 (scikit-learn's PCA). Returns (coordinates (n, 2), mu,
    V2 as (d, 2)) so that other points can be placed on the same map; the explained
    variance ratios are in the caller's hands via the coordinates' variances.
    """
    from sklearn.decomposition import PCA

    if x.shape[0] < 2:  # one point: it is the mean, at the origin
        axes = np.zeros((x.shape[1], 2))
        axes[: min(2, x.shape[1]), : min(2, x.shape[1])] = np.eye(min(2, x.shape[1]))
        return np.zeros((x.shape[0], 2)), x.mean(axis=0), axes
    n_comp = min(2, x.shape[0], x.shape[1])
    pca = PCA(n_components=n_comp, random_state=seed).fit(x)
    comps = pca.components_.T
    if n_comp < 2:  # a 1-d space: pad the second axis with zeros
        comps = np.hstack([comps, np.zeros((x.shape[1], 2 - n_comp))])
    return (x - pca.mean_) @ comps, pca.mean_, comps


class EmbeddingMaps:
    """2-D maps of spaces, cached per (collection, version, space, sample size)."""

    def __init__(self, store: Store, runs: RunStore, max_cached: int = 16) -> None:
        self.store = store
        self.runs = runs
        self._cache: OrderedDict[tuple[Any, ...], dict[str, Any]] = OrderedDict()
        self._lock = threading.Lock()
        self.max_cached = max_cached

    def get(self, collection: str, params: Mapping[str, str]) -> dict[str, Any]:
        col = self.store.collection(collection)
        space = params.get("space") or _default_space(col, text=False)
        spec = col.space(space)
        n = int_param(params.get("n"), "n", 2000, 10, MAX_MAP_POINTS)
        key = (collection, col.version, space, n)
        with self._lock:
            base = self._cache.get(key)
        if base is None:
            base = self._project(col, spec.column, n)
            with self._lock:
                self._cache[key] = base
                while len(self._cache) > self.max_cached:
                    self._cache.popitem(last=False)
        out = {**base, "space": space, "points": list(base["points"])}
        run_id = params.get("run")
        if run_id:
            out["points"] += self._run_points(col, spec.column, run_id, base)
        return out

    def _project(self, col: Collection, column: str, n: int) -> dict[str, Any]:
        total = col.table.count_rows()
        cols, model = _item_columns(col, None)
        keep = [c for c in cols if c not in ("text", "tags")]
        if total > n:
            # Uniform sample by row offset: reads n rows, not the table.
            offsets = np.sort(np.random.default_rng(0).choice(total, size=n, replace=False))
            rows = col.table.take_offsets(offsets.tolist()).select(["id", column, *keep]).to_arrow()
        else:
            rows = col.table.search().select(["id", column, *keep]).limit(None).to_arrow()
        rows = rows.filter(rows.column(column).is_valid())
        if rows.num_rows == 0:
            return {"points": [], "total": total, "sampled": 0, "explained": [0.0, 0.0], "mean": None,
                    "axes": None, "model": model}
        x = vectors_of(rows.column(column))
        xy, mean, axes = pca_2d(x)
        var = x.var(axis=0).sum()
        explained = (xy.var(axis=0) / var).tolist() if var > 0 else [0.0, 0.0]
        pred_col = col.model(model).column if model else None
        preds = predictions(col, model, rows.column(pred_col).combine_chunks()) if pred_col else [None] * rows.num_rows
        labels = rows.column("label").to_pylist() if "label" in rows.column_names else [None] * rows.num_rows
        points = [
            {"id": i, "x": round(float(p[0]), 5), "y": round(float(p[1]), 5), "label": lab,
             "pred": pr["class"] if pr else None, "confidence": pr["confidence"] if pr else None}
            for i, p, lab, pr in zip(rows.column("id").to_pylist(), xy, labels, preds, strict=True)
        ]
        return {"points": points, "total": total, "sampled": len(points), "explained": explained,
                "mean": mean, "axes": axes, "model": model}

    def _run_points(self, col: Collection, column: str, run_id: str, base: Mapping[str, Any]) -> list[dict[str, Any]]:
        """The run's picks on the same map (projected with the sample's axes), with score and rank."""
        rec = self.runs.get(run_id)
        if rec.collection != col.name:
            raise InvalidArgument(f"mining run '{run_id}' ran on '{rec.collection}', not '{col.name}'")
        if rec.state != "SUCCEEDED" or base["axes"] is None:
            return []
        results = self.runs.results(run_id).slice(0, MAX_MAP_POINTS)
        rows = col.take(results.column("id").to_pylist(), ["id", column])
        vec = dict(zip(rows.column("id").to_pylist(), rows.column(column).to_pylist(), strict=True))
        pts = []
        for id_, rank, score in zip(results.column("id").to_pylist(), results.column("rank").to_pylist(),
                                    results.column("score").to_pylist(), strict=True):
            v = vec.get(id_)
            if v is None:
                continue
            xy = (np.asarray(v, np.float64) - base["mean"]) @ base["axes"]  # at most MAX_MAP_POINTS rows
            pts.append({"id": id_, "x": round(float(xy[0]), 5), "y": round(float(xy[1]), 5), "picked": True, "rank": rank,
                        "score": float(score)})
        return pts


def map_json(m: Mapping[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in m.items() if k not in ("mean", "axes")}


# -- datasets ---------------------------------------------------------------------------


def dataset_detail(datasets: Datasets, name: str) -> dict[str, Any]:
    info = datasets.get(name)
    status = datasets.status(name)
    return {"dataset": asdict(info), "status": {**vars(status), "clean": status.clean},
            "history": [c.to_dict() for c in datasets.history(name)]}  # newest first


def dataset_diff(store: Store, datasets: Datasets, name: str, v1: str | None, v2: str | None) -> dict[str, Any]:
    """Counts of added, removed and relabeled members from v1 to v2 (default: the two last
    commits), the first ``MAX_LIST`` of each, and grid items for the first added ones."""
    history = datasets.history(name)
    if len(history) == 0:
        raise FailedPrecondition(f"dataset '{name}' has no commits yet")

    def version(value: str | None, default: int | None) -> int | None:
        if value in (None, ""):
            return default
        if value == "working":
            return None
        return int_param(value, "version", 0, 0, 1 << 31)

    last = history[0].version  # newest first
    a = version(v1, history[1].version if len(history) > 1 else 0)
    b = version(v2, last)
    d = datasets.diff(name, a, b)
    info = datasets.get(name)
    col = store.collection(info.collection)
    added = d.added.to_pylist()
    return {
        "dataset": name, "v1": d.v1, "v2": d.v2,
        "added": len(d.added), "removed": len(d.removed), "relabeled": d.relabeled.num_rows,
        "added_ids": added[:MAX_LIST], "removed_ids": d.removed.to_pylist()[:MAX_LIST],
        "relabeled_rows": d.relabeled.slice(0, MAX_LIST).to_pylist(),
        "added_items": grid_items(col, pa.table({"id": pa.array(added[:60], pa.string())}), None),
    }


def dataset_list(datasets: Datasets, collection: str | None) -> list[dict[str, Any]]:
    return [asdict(d) for d in datasets.list(collection)]


# -- does uncertainty predict errors? -------------------------------------------------------


def _float_param(value: str | None, name: str) -> float | None:
    if value is None or value == "":
        return None
    try:
        return float(value)
    except ValueError:
        raise InvalidArgument(f"{name} must be a number, got {value!r}") from None


def uncertainty_quality(store: Store, runs: RunStore, name: str, params: Mapping[str, str]) -> dict[str, Any]:
    """The uncertainty-vs-quality report (``model``, ``uncertainty``, ``quality``, ``run``,
    ``where``, ``iou``, ``uncertainty_quantile``, ``quality_quantile``,
    ``uncertainty_threshold``, ``quality_threshold``, ``lower_is_better``, ``max_ids`` as query
    parameters): its statistics (:func:`indexing.quality.report_stats`) and ``quadrants``
    (one dict per quadrant, at most ``max_ids`` ids each, default 20, at most ``MAX_LIST``)."""
    from indexing.quality import report_stats
    from service.quality import uncertainty_quality_report

    col = store.collection(name)
    iou = _float_param(params.get("iou"), "iou")
    lower = params.get("lower_is_better", "")
    if lower not in ("", "0", "1", "false", "true"):
        raise InvalidArgument(f"lower_is_better must be true or false, got {lower!r}")
    table = uncertainty_quality_report(
        col, runs.result_scores, model=params.get("model") or None, run_id=params.get("run") or None,
        uncertainty=params.get("uncertainty") or None, quality=params.get("quality") or None,
        where=params.get("where") or None, iou=0.5 if iou is None else iou, lower_is_better=lower in ("1", "true"),
        max_ids=int_param(params.get("max_ids"), "max_ids", 20, 0, MAX_LIST),
        **{k: _float_param(params.get(k), k) for k in ("uncertainty_quantile", "quality_quantile",
                                                        "uncertainty_threshold", "quality_threshold")})
    return {**report_stats(table), "quadrants": table.to_pylist()}


BOX_VIEW_LIMIT = 100  # object rows the page's table shows by default


def boxes(store: Store, name: str, kind: str, params: Mapping[str, str]) -> dict[str, Any]:
    """A box-level table of collection ``name`` as the gRPC Aggregate call computes it
    (:func:`service.boxes.box_table`, the same function): ``kind`` is ``objects``,
    ``object_classes``, ``box_confusion`` or ``box_confused_pairs``; query parameters
    ``model`` (the box source: a detection model, or ``gt`` for ``objects`` /
    ``object_classes``), ``where``, ``objects_where``, ``limit`` (objects; default 100, at
    most ``MAX_LIST``), ``iou`` (box_confusion), ``top`` (box_confused_pairs). Returns
    ``{"kind", "version", "columns", "rows"}``."""
    from service.boxes import BOX_KINDS, box_table

    if kind not in BOX_KINDS:
        raise NotFound(f"no box view '{kind}' (known: {', '.join(BOX_KINDS)})")
    col = store.collection(name)
    version = col.version  # one version for the whole answer
    table = box_table(
        col, kind, model=params.get("model") or None, where=params.get("where") or None,
        objects_where=params.get("objects_where") or None, version=version,
        limit=int_param(params.get("limit"), "limit", BOX_VIEW_LIMIT, 1, MAX_LIST) if kind == "objects" else None,
        iou=_float_param(params.get("iou"), "iou"),
        top=int_param(params.get("top"), "top", 20, 1, MAX_LIST) if kind == "box_confused_pairs" else None)
    return {"kind": kind, "version": version, "columns": table.column_names, "rows": table.to_pylist()}


def json_ready(value: Any) -> Any:
    """Plain JSON types (numpy scalars and arrays, tuples, non-finite floats as null)."""
    if isinstance(value, Mapping):
        return {str(k): json_ready(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_ready(v) for v in value]
    if isinstance(value, np.ndarray):
        return json_ready(value.tolist())
    if isinstance(value, np.generic):
        return json_ready(value.item())
    if isinstance(value, float) and not np.isfinite(value):
        return None
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    return value


__all__: Sequence[str] = (
    "EmbeddingMaps", "collection_detail", "collections_summary", "dataset_detail", "dataset_diff",
    "dataset_list", "grid_items", "json_ready", "map_json", "pca_2d", "predictions", "run_grid", "search_grid",
    "uncertainty_quality",
)
