"""The mining runner: feeds miners from a Lance table in chunks and keeps what it must.

Flow of a run (the servicer validates, the job pool executes)::

    validate_request(collection, request)      # errors before anything starts
    run_mining(collection, record, ...)        # stream -> score -> top-k -> (batch select)

The pool (rows matching ``where``) is read at the collection version pinned in the run
record, in chunks of ``chunk_rows``, projecting only the struct children the miner needs
(e.g. ``pred_m1.probs``). Scored miners keep a running top-``size`` (O(size + chunk)
memory whatever the pool size); batch miners (BatchBALD) keep the top ``candidates`` by
their score and run on those. Ties break by the rows' stable row ids, and stochastic noise
is a function of (seed, stable row id), so a run re-executed on the same version returns
the same results whatever the chunking.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from indexing.errors import FailedPrecondition, InvalidArgument, NotFound
from indexing.filters import check_filter
from indexing.schema import EMB_PREFIX, PRED_PREFIX
from indexing.settings import MAX_SIZE, MINING_THREADS
from indexing.settings import MINING_CHUNK_ROWS as CHUNK_ROWS
from indexing.store import Collection
from miners import registry
from miners.detection import class_balanced_select
from miners.registry import MinerSpec
from miners.runs import RunRecord
from miners.stochastic import stochastic_scores
from miners.topk import StreamingTopK, gumbel_for_rows, row_uniforms
from miners.uncertainty import softmax


@dataclass(frozen=True)
class MiningRequest:
    collection: str
    miner: str
    size: int
    model: str | None = None
    space: str | None = None
    where: str | None = None
    reference_where: str | None = None
    params: Mapping[str, Any] = field(default_factory=dict)
    seed: int = 0
    reverse: bool = False
    version: int | None = None


@dataclass
class MiningOutput:
    ids: list[str]
    scores: np.ndarray
    rows_scanned: int
    rows_skipped: int
    timings: dict[str, float]
    # per result: the id of a related row (the seed it is nearest to, the row it duplicates)
    related: list[str | None] | None = None
    # the k-NN graphs the run used, by role ("pool", "query", "reference"): GraphInfo dicts
    graph: dict[str, dict[str, Any]] | None = None


def miner_spec(name: str) -> MinerSpec:
    try:
        return registry.get(name)
    except KeyError:
        raise InvalidArgument(
            f"unknown miner '{name}' (known: {', '.join(sorted(registry.REGISTRY))})"
        ) from None


def _input_condition(spec: MinerSpec, model: str | None) -> str | None:
    """SQL that is true for rows carrying what the miner reads."""
    col = f"{PRED_PREFIX}{model}"
    conditions = {
        "probs": f"({col}.probs IS NOT NULL OR {col}.logits IS NOT NULL)",
        "samples": f"{col}.samples IS NOT NULL",
        "boxes": f"{col}.boxes IS NOT NULL",
        "loss": f"{col}.loss IS NOT NULL",
        "aum": f"({col}.epoch_logits IS NOT NULL AND label IS NOT NULL)",
    }
    parts = [conditions[i] for i in spec.inputs if i in conditions]
    return " AND ".join(parts) or None


def validate_request(col: Collection, req: MiningRequest) -> tuple[MinerSpec, dict[str, Any]]:
    """Everything that can be checked before a run starts. Raises InvalidArgument,
    NotFound (model) or FailedPrecondition (empty pool, no predictions)."""
    spec = miner_spec(req.miner)
    if isinstance(req.size, bool) or not isinstance(req.size, int) or not 1 <= req.size <= MAX_SIZE:
        raise InvalidArgument(f"size must be an integer in [1, {MAX_SIZE}], got {req.size!r}")
    if not isinstance(req.seed, int) or req.seed < 0:
        raise InvalidArgument(f"seed must be a non-negative integer, got {req.seed!r}")
    try:
        params = spec.validate(req.params)
    except ValueError as exc:
        raise InvalidArgument(str(exc)) from exc
    needs_model = spec.needs_model or (spec.name == "activation" and params["source"] == "energy")
    needs_space = spec.needs_space or (spec.name == "activation" and params["source"] == "feature_norm")
    if needs_model:
        if not req.model:
            raise InvalidArgument(f"miner '{spec.name}' reads a model's predictions: give model=...")
        col.model(req.model)  # NotFound with the known models
    elif req.model:
        col.model(req.model)
    if needs_space:
        if not req.space:
            raise InvalidArgument(f"miner '{spec.name}' reads an embedding space: give space=...")
        space = col.space(req.space)
        if spec.gather and space.metric == "dot":
            raise InvalidArgument(f"miner '{spec.name}' needs an l2 or cosine space; '{req.space}' uses dot")
    elif req.space:
        col.space(req.space)
    if req.reference_where and spec.reference == "none":
        raise InvalidArgument(f"miner '{spec.name}' does not use a reference filter")
    if spec.reference == "required" and not req.reference_where:
        raise InvalidArgument(f"miner '{spec.name}' needs reference_where (e.g. \"split = 'train'\")")
    reference = col.validate_filter(req.reference_where or None)
    if spec.name == "knn":
        n_seeds = len(params["seed_ids"]) + len(params["seed_vectors"]) + len(params["seed_texts"])
        if n_seeds == 0:
            raise InvalidArgument("miner 'knn' needs seeds: params seed_ids, seed_vectors or seed_texts")
        dims = {len(v) for v in params["seed_vectors"]}
        if dims and dims != {col.space(req.space).dim}:
            raise InvalidArgument(f"seed_vectors have dimension {dims.pop()}; space '{req.space}' has "
                                  f"{col.space(req.space).dim}")
        if params["seed_ids"]:
            found = col.take(params["seed_ids"], ["id"]).column("id").to_pylist()
            missing = sorted(set(params["seed_ids"]) - set(found))
            if missing:
                raise NotFound(f"seed ids not found in '{col.name}': {', '.join(missing[:10])}")
    if spec.name == "chain":
        if not params["stages"]:
            raise InvalidArgument("miner 'chain' needs params.stages: [{miner, size, params}, ...]")
        for i, stage in enumerate(params["stages"]):
            last = i == len(params["stages"]) - 1
            size = stage["size"] or (req.size if last else None)
            if size is None:
                raise InvalidArgument(f"chain stage {i} ({stage['miner']}) needs a size")
            if last and size != req.size:
                raise InvalidArgument(f"the last chain stage selects {size}; the run's size is {req.size}")
            sub = MiningRequest(collection=req.collection, miner=stage["miner"], size=size,
                                model=stage.get("model", req.model), space=stage.get("space", req.space),
                                where=req.where, reference_where=req.reference_where,
                                params=stage.get("params") or {}, seed=req.seed,
                                reverse=bool(stage.get("reverse", False)), version=req.version)
            try:
                _, stage_params = validate_request(col, sub)
            except (InvalidArgument, NotFound, FailedPrecondition) as exc:
                raise type(exc)(f"chain stage {i} ({stage['miner']}): {exc.message}") from exc
            stage["size"], stage["params"] = size, stage_params
            stage["model"], stage["space"] = sub.model, sub.space
    if params.get("stochastic", "none") == "power" and req.reverse:
        raise InvalidArgument("reverse=True cannot be combined with stochastic='power' (use 'softmax')")
    if params.get("balance", "none") != "none" and not set(spec.inputs) & {"probs", "samples", "boxes"}:
        raise InvalidArgument(f"balance needs predicted classes; miner '{spec.name}' has none")
    where = col.validate_filter(req.where)
    table = col.table if req.version is None else col.at_version(req.version)
    pool = table.count_rows(where) if where else table.count_rows()
    if pool == 0:
        raise FailedPrecondition(f"the pool filter {where!r} matches no rows in '{col.name}'")
    cond = _input_condition(spec, req.model)
    if needs_space:
        vec = f"{EMB_PREFIX}{req.space} IS NOT NULL"
        cond = f"{cond} AND {vec}" if cond else vec
    if spec.name == "activation" and params["source"] == "energy":
        cond = f"{PRED_PREFIX}{req.model}.logits IS NOT NULL"
    if cond and table.count_rows(f"({where}) AND {cond}" if where else cond) == 0:
        raise FailedPrecondition(
            f"no row of the pool has what miner '{spec.name}' reads ({cond}); upsert those columns first")
    if reference and table.count_rows(reference) == 0 and spec.reference == "required":
        raise FailedPrecondition(f"the reference filter {req.reference_where!r} matches no rows")
    return spec, params


# -- Arrow chunk -> numpy inputs ----------------------------------------------------------

def _valid(arr: pa.Array) -> np.ndarray:
    return ~np.asarray(arr.is_null().to_numpy(zero_copy_only=False))


def _take(arr: pa.Array, rows: np.ndarray) -> pa.Array:
    return arr if len(rows) == len(arr) else arr.take(pa.array(rows, pa.int64()))


def _matrix(arr: pa.Array, rows: np.ndarray, c: int) -> np.ndarray:
    """Rows ``rows`` (all non-null, each of length c) of a list<float> array as (n, c)."""
    values = pc.list_flatten(_take(arr, rows)).to_numpy(zero_copy_only=False)
    return np.asarray(values, dtype=np.float64).reshape(-1, c)


def _probs_input(batch: pa.RecordBatch, c: int, params: dict[str, Any]) -> tuple[np.ndarray, dict[str, Any]]:
    probs, logits = batch.column("probs"), batch.column("logits")
    has_p, has_l = _valid(probs), _valid(logits)
    keep = np.flatnonzero(has_p | has_l)
    out = np.empty((len(keep), c), dtype=np.float64)
    from_p = has_p[keep]
    if from_p.any():
        out[from_p] = _matrix(probs, keep[from_p], c)
    if (~from_p).any():
        out[~from_p] = softmax(_matrix(logits, keep[~from_p], c), params.get("logits_temperature", 1.0))
    return keep, {"probs": out, "classes": lambda: out.argmax(axis=1)}


def _samples_input(batch: pa.RecordBatch, c: int) -> tuple[np.ndarray, dict[str, Any]]:
    samples = batch.column("samples")
    keep = np.flatnonzero(_valid(samples))
    taken = _take(samples, keep)
    ks = np.asarray(pc.list_value_length(taken).to_numpy(zero_copy_only=False))
    if len(ks) and (ks != ks[0]).any():
        raise InvalidArgument(
            f"rows carry different numbers of samples ({int(ks.min())} to {int(ks.max())}); "
            "every row needs the same K (the same MC-dropout passes or committee members)")
    k = int(ks[0]) if len(ks) else 1
    values = pc.list_flatten(pc.list_flatten(taken)).to_numpy(zero_copy_only=False)
    arr = np.asarray(values, dtype=np.float64).reshape(len(keep), k, c)
    return keep, {"samples": arr, "classes": lambda: arr.mean(axis=1).argmax(axis=1)}


def _boxes_input(batch: pa.RecordBatch, c: int) -> tuple[np.ndarray, dict[str, Any]]:
    boxes = batch.column("boxes")
    keep = np.flatnonzero(_valid(boxes))
    taken = _take(boxes, keep)
    flat = pc.list_flatten(taken)
    box_image = np.asarray(pc.list_parent_indices(taken).to_numpy(zero_copy_only=False), dtype=np.int64)
    coords = np.stack([np.asarray(flat.field(k).to_numpy(zero_copy_only=False), dtype=np.float64)
                       for k in ("x1", "y1", "x2", "y2")], axis=1) if len(flat) else np.zeros((0, 4))
    scores = np.asarray(flat.field("score").to_numpy(zero_copy_only=False), dtype=np.float64) if len(flat) \
        else np.zeros(0)
    box_probs = None
    if len(flat):
        probs = flat.field("probs")
        if probs.null_count == 0:
            box_probs = np.asarray(pc.list_flatten(probs).to_numpy(zero_copy_only=False),
                                   dtype=np.float64).reshape(-1, c)
    # an image's predicted class: the class of its most confident box (-1: no boxes)
    classes = np.full(len(keep), -1, dtype=np.int64)
    if len(flat):
        box_class = box_probs.argmax(axis=1) if box_probs is not None else np.zeros(len(flat), dtype=np.int64)
        order = np.lexsort((-scores, box_image))
        first = order[np.r_[True, np.diff(box_image[order]) != 0]]
        classes[box_image[first]] = box_class[first]
    return keep, {"box_image": box_image, "boxes": coords, "box_scores": scores, "box_probs": box_probs,
                  "n_images": len(keep), "classes": lambda: classes}


def _scalar_input(batch: pa.RecordBatch, name: str) -> tuple[np.ndarray, dict[str, Any]]:
    arr = batch.column(name)
    keep = np.flatnonzero(_valid(arr))
    return keep, {name: np.asarray(_take(arr, keep).to_numpy(zero_copy_only=False), dtype=np.float64)}


def _aum_input(batch: pa.RecordBatch, classes: tuple[str, ...]) -> tuple[np.ndarray, dict[str, Any]]:
    logits, labels = batch.column("epoch_logits"), batch.column("label")
    index = {name: i for i, name in enumerate(classes)}
    label_idx = np.asarray([index.get(v, -1) if v is not None else -1 for v in labels.to_pylist()])
    keep = np.flatnonzero(_valid(logits) & (label_idx >= 0))
    taken = _take(logits, keep)
    es = np.asarray(pc.list_value_length(taken).to_numpy(zero_copy_only=False))
    if len(es) and (es != es[0]).any():
        raise InvalidArgument("rows carry different numbers of epochs in epoch_logits; AUM needs the same E")
    e = int(es[0]) if len(es) else 1
    values = np.asarray(pc.list_flatten(pc.list_flatten(taken)).to_numpy(zero_copy_only=False), dtype=np.float64)
    return keep, {"epoch_logits": values.reshape(len(keep), e, len(classes)), "labels": label_idx[keep]}


def _projection(spec: MinerSpec, model: str | None) -> dict[str, str]:
    # No `id`: rows are tracked by stable row id, and only the picks are named at the end
    # (reading every id string costs more than scoring the row).
    pred = f"{PRED_PREFIX}{model}"
    proj: dict[str, str] = {}
    for name in spec.inputs:
        if name == "probs":
            proj.update(probs=f"{pred}.probs", logits=f"{pred}.logits")
        elif name == "aum":
            proj.update(epoch_logits=f"{pred}.epoch_logits", label="label")
        elif name in ("samples", "boxes", "loss"):
            proj[name] = f"{pred}.{name}"
    return proj or {"id": "id"}  # an empty projection would read every column


def _activation_projection(params: dict[str, Any], model: str | None, space: str | None) -> dict[str, str]:
    if params["source"] == "energy":
        return {"logits": f"{PRED_PREFIX}{model}.logits"}
    return {"vectors": f"{EMB_PREFIX}{space}"}


def _chunk_inputs(spec: MinerSpec, batch: pa.RecordBatch, col: Collection, model: str | None,
                  params: dict[str, Any], seed: int, row_keys: np.ndarray,
                  space: str | None = None) -> tuple[np.ndarray, dict[str, Any]]:
    model_spec = col.model(model) if model else None
    c = model_spec.num_classes if model_spec else 0
    kind = spec.inputs[0]
    if kind == "probs":
        return _probs_input(batch, c, params)
    if kind == "samples":
        return _samples_input(batch, c)
    if kind == "boxes":
        return _boxes_input(batch, c)
    if kind == "loss":
        return _scalar_input(batch, "loss")
    if kind == "aum":
        return _aum_input(batch, model_spec.classes)
    if kind == "row_uniforms":  # the random miner reads no column, only row ids
        return np.arange(batch.num_rows), {"row_uniforms": row_uniforms(row_keys, seed)}
    if kind == "activation":
        name = "logits" if params["source"] == "energy" else "vectors"
        arr = batch.column(name)
        keep = np.flatnonzero(_valid(arr))
        width = c if name == "logits" else col.space(space).dim
        return keep, {name: _matrix(arr, keep, width)}
    raise AssertionError(f"unhandled miner input {kind}")


# -- the run --------------------------------------------------------------------------------

def run_mining(
    col: Collection,
    rec: RunRecord,
    *,
    progress: Callable[[float, str], None] = lambda f, m: None,
    check: Callable[[], None] = lambda: None,
    chunk_rows: int | None = None,
) -> MiningOutput:
    """Execute a validated run on the collection version pinned in ``rec``."""
    # What runs is what was validated: the filters in their checked form (indexing.filters).
    rec = replace(rec, where=check_filter(rec.where or None) or "",
                  reference_where=check_filter(rec.reference_where or None) or "")
    chunk_rows = chunk_rows or CHUNK_ROWS
    spec = miner_spec(rec.miner)
    params = dict(rec.params)
    if spec.direct:
        return _run_direct(col, rec, spec, params, progress, check)
    if spec.gather:
        return _run_gathered(col, rec, spec, params, progress, check)
    timings: dict[str, float] = {}
    t_start = time.perf_counter()
    table = col.at_version(rec.version)
    where = rec.where or None
    total = table.count_rows(where) if where else table.count_rows()
    balance = params.get("balance", "none")
    model_spec = col.model(rec.model) if rec.model else None
    keep_n = params["candidates"] if spec.select is not None else rec.size
    groups: dict[int, StreamingTopK] = {}
    carry = ["samples"] if spec.select is not None else []

    projection = (_activation_projection(params, rec.model, rec.space) if spec.name == "activation"
                  else _projection(spec, rec.model))
    query = table.search().select(projection).limit(None).with_row_id(True)
    if where:
        query = query.where(where)

    def score_chunk(batch: pa.RecordBatch) -> tuple[int, int, list[tuple[int, np.ndarray, np.ndarray, dict]]]:
        """One chunk -> (rows, rows kept, per-group candidates). Runs in a worker thread:
        numpy and Arrow release the GIL, so chunks score in parallel with the scan."""
        row_keys = np.asarray(batch.column("_rowid").to_numpy(zero_copy_only=False), dtype=np.uint64)
        try:
            keep, arrays = _chunk_inputs(spec, batch, col, rec.model, params, rec.seed, row_keys, rec.space)
            scores = np.asarray(spec.score(arrays, params), dtype=np.float64) if len(keep) else np.zeros(0)
        except ValueError as exc:
            raise InvalidArgument(f"miner '{spec.name}': {exc}") from exc
        out: list[tuple[int, np.ndarray, np.ndarray, dict]] = []
        if len(keep):
            rows = row_keys[keep]
            keys = -scores if rec.reverse else scores
            if spec.select is None and params.get("stochastic", "none") != "none":
                try:
                    keys = stochastic_scores(keys, params["stochastic"], params["temperature"],
                                             noise=gumbel_for_rows(rows, rec.seed))
                except ValueError as exc:
                    raise InvalidArgument(f"miner '{spec.name}': stochastic selection: {exc}") from exc
            if balance != "none":
                group_of = arrays["classes"]()
                for g in np.unique(group_of):
                    sel = np.flatnonzero(group_of == g)
                    out.append((int(g), *_candidates(keys, rows, sel, keep_n, scores, arrays, carry, group_of)))
            else:
                out.append((0, *_candidates(keys, rows, np.arange(len(keys)), keep_n, scores, arrays, carry,
                                            None)))
        return batch.num_rows, len(keep), out

    scanned = skipped = 0
    pending: deque[Future] = deque()

    def merge(future: Future) -> None:
        nonlocal scanned, skipped
        n, kept, parts = future.result()
        scanned += n
        skipped += n - kept
        for group, keys, rows, payload in parts:
            groups.setdefault(group, StreamingTopK(keep_n)).push(keys, rows, payload)
        progress(min(0.95, scanned / max(1, total)), f"scanned {scanned:,} of {total:,} rows")

    with ThreadPoolExecutor(max_workers=MINING_THREADS, thread_name_prefix="assay-mine") as pool:
        for batch in query.to_batches(chunk_rows):
            check()
            pending.append(pool.submit(score_chunk, batch))
            while len(pending) > MINING_THREADS:  # bounded: at most a few chunks in memory
                merge(pending.popleft())
        while pending:
            merge(pending.popleft())
    timings["scan_score_s"] = time.perf_counter() - t_start

    if not groups:
        raise FailedPrecondition(
            f"none of the {scanned:,} pool rows has the inputs miner '{spec.name}' needs ({', '.join(spec.inputs)})")
    t0 = time.perf_counter()
    parts = [top.result() for top in groups.values()]
    keys = np.concatenate([p[0] for p in parts])
    rows = np.concatenate([p[1] for p in parts])
    payload = {name: np.concatenate([p[2][name] for p in parts]) for name in parts[0][2]}
    order = np.lexsort((rows, -keys))
    keys, rows, payload = keys[order], rows[order], {n: v[order] for n, v in payload.items()}
    if spec.select is not None:
        progress(0.96, f"selecting {rec.size} of {len(keys)} candidates")
        picks, gains = spec.select({"samples": payload["samples"]}, min(rec.size, len(keys)),
                                   {**params, "seed": rec.seed})
        picks, scores = np.asarray(picks, dtype=np.int64), np.asarray(gains, dtype=np.float64)
    elif balance != "none":
        counts = _labeled_class_counts(col, rec, model_spec) if balance == "inverse_frequency" else None
        picks = class_balanced_select(keys, payload["class"].astype(np.int64), min(rec.size, len(keys)),
                                      num_classes=max(1, model_spec.num_classes if model_spec else 1),
                                      mode=balance, class_counts=counts)
        scores = payload["score"][picks]
    else:
        picks = np.arange(min(rec.size, len(keys)))
        scores = payload["score"][picks]
    ids = _ids_of_rows(table, rows[picks])
    timings["select_s"] = time.perf_counter() - t0
    timings["total_s"] = time.perf_counter() - t_start
    return MiningOutput(ids=ids, scores=scores, rows_scanned=scanned, rows_skipped=skipped, timings=timings)


def _ids_of_rows(table: Any, row_keys: np.ndarray) -> list[str]:
    """The ``id`` of each stable row id (in order), read at the run's version."""
    if len(row_keys) == 0:
        return []
    found = table.take_row_ids([int(r) for r in row_keys]).select(["id"]).with_row_id().to_arrow()
    id_of = dict(zip(found.column("_rowid").to_pylist(), found.column("id").to_pylist(), strict=True))
    return [id_of[int(r)] for r in row_keys]


def _chunk_candidates(keys: np.ndarray, k: int) -> np.ndarray:
    """Positions of the chunk rows that can still enter a top-k: every row whose key is at
    least the chunk's k-th largest (ties included, so tie-breaking stays exact)."""
    finite = np.flatnonzero(~np.isnan(keys))
    if len(finite) <= k:
        return finite
    kth = np.partition(keys[finite], len(finite) - k)[len(finite) - k]
    return finite[keys[finite] >= kth]


def _candidates(keys: np.ndarray, rows: np.ndarray, sel: np.ndarray, k: int, scores: np.ndarray,
                arrays: Mapping[str, Any], carry: list[str],
                group_of: np.ndarray | None) -> tuple[np.ndarray, np.ndarray, dict[str, np.ndarray]]:
    """(keys, row keys, payload) of the rows ``sel`` (positions among the chunk's kept rows)
    that can still enter a top-k."""
    sel = sel[_chunk_candidates(keys[sel], k)]
    payload = {"score": scores[sel], **{name: arrays[name][sel] for name in carry}}
    if group_of is not None:
        payload["class"] = group_of[sel]
    return keys[sel], rows[sel], payload


def _labeled_class_counts(col: Collection, rec: RunRecord, model_spec: Any) -> np.ndarray:
    """Labeled rows per class of the model, at the run's version (for inverse-frequency budgets)."""
    counts = np.zeros(model_spec.num_classes, dtype=np.int64)
    index = {name: i for i, name in enumerate(model_spec.classes)}
    table = col.at_version(rec.version)
    for batch in table.search().where("label IS NOT NULL").select(["label"]).limit(None).to_batches(CHUNK_ROWS):
        vc = pc.value_counts(batch.column("label"))
        for value, n in zip(vc.field("values").to_pylist(), vc.field("counts").to_pylist(), strict=True):
            if value in index:
                counts[index[value]] += n
    return counts


__all__ = ["MAX_SIZE", "MiningOutput", "MiningRequest", "run_mining", "validate_request"]


# -- gathered miners: the whole pool (vectors, k-NN graphs) ----------------------------------

def _top(scores: np.ndarray, row_keys: np.ndarray, size: int, rec: RunRecord, params: dict[str, Any],
         supports_common: bool) -> np.ndarray:
    """Positions of the best ``size`` scores (reverse / stochastic as for streamed miners)."""
    keys = -scores if rec.reverse else scores
    if supports_common and params.get("stochastic", "none") != "none":
        keys = stochastic_scores(keys, params["stochastic"], params["temperature"],
                                 noise=gumbel_for_rows(row_keys, rec.seed))
    top = StreamingTopK(size)
    top.push(keys, row_keys, {"pos": np.arange(len(keys))})
    return top.result()[2].get("pos", np.zeros(0, dtype=np.int64))


def _phase(progress: Callable[[float, str], None], lo: float, hi: float) -> Callable[[float, str], None]:
    """``progress`` for a phase that spans [lo, hi] of the run's bar."""
    return lambda f, m: progress(lo + (hi - lo) * min(1.0, max(0.0, f)), m)


def _pick_progress(progress: Callable[[float, str], None], check: Callable[[], None], what: str,
                   lo: float, hi: float) -> Callable[[int, int], None]:
    """A per-pick callback for batch selectors: cancel checked every pick, progress (with an
    ETA) at most every 0.5 s."""
    t0 = time.perf_counter()
    last = [0.0]

    def on_pick(done: int, total: int) -> None:
        check()
        now = time.perf_counter()
        if now - last[0] >= 0.5 or done == total:
            last[0] = now
            el = now - t0
            eta = f", ETA {el * (total - done) / done:.0f} s" if done else ""
            progress(lo + (hi - lo) * done / max(1, total), f"{what}: {done:,} of {total:,} picks{eta}")

    return on_pick


def _run_gathered(col: Collection, rec: RunRecord, spec: MinerSpec, params: dict[str, Any],
                  progress: Callable[[float, str], None], check: Callable[[], None]) -> MiningOutput:
    from miners.vectors import graph, load_pool

    t0 = time.perf_counter()
    needs_ref = bool(rec.reference_where) and ("reference_vectors" in spec.inputs or "query_graph" in spec.inputs)
    graphs_in = [g for g in ("pool_graph", "query_graph", "reference_graph") if g in spec.inputs]
    # the bar: loading (pool, reference), the graphs, then scoring or picking
    load_hi = 0.1 if graphs_in else 0.3
    ref_lo = load_hi * (0.7 if needs_ref else 1.0)
    progress(0.0, "loading the pool's vectors")
    pool = load_pool(col, rec.version, rec.space, rec.where or None, model=rec.model or None,
                     with_probs="probs" in spec.inputs, check=check, progress=_phase(progress, 0.0, ref_lo))
    if len(pool) == 0:
        raise FailedPrecondition(f"none of the {pool.scanned:,} pool rows has a vector in space '{rec.space}'")
    arrays: dict[str, Any] = {"vectors": pool.vectors, "row_keys": pool.row_keys, "probs": pool.probs}
    ref = None
    if needs_ref:
        progress(ref_lo, "loading the reference set's vectors")
        ref = load_pool(col, rec.version, rec.space, rec.reference_where, check=check,
                        progress=_phase(progress, ref_lo, load_hi))
        arrays["reference_vectors"] = ref.vectors
    timings = {"load_s": time.perf_counter() - t0}
    t1 = time.perf_counter()
    k = params.get("k", 20)
    graph_hi = 0.9 if graphs_in else load_hi
    spans = np.linspace(load_hi, graph_hi, len(graphs_in) + 1) if graphs_in else [load_hi]
    bars = {name: _phase(progress, spans[i], spans[i + 1]) for i, name in enumerate(graphs_in)}
    infos: dict[str, dict[str, Any]] = {}
    try:
        if "pool_graph" in spec.inputs:
            progress(spans[0], f"k-NN graph of {len(pool):,} pool rows (k={k})")
            if len(pool) > 1:
                g = graph(col, rec.version, rec.space, rec.where or None, min(k, len(pool) - 1), pool.vectors,
                          searched=pool, exclude_self=True, check=check, progress=bars["pool_graph"])
                arrays["pool_graph"] = (g.indices, g.distances)
                infos["pool"] = g.info.to_dict()
            else:
                arrays["pool_graph"] = (np.full((1, 0), -1), np.zeros((1, 0)))
        if "query_graph" in spec.inputs:
            if ref is None or len(ref) == 0:
                raise FailedPrecondition(f"the reference filter {rec.reference_where!r} has no vectors in "
                                         f"space '{rec.space}'")
            g = graph(col, rec.version, rec.space, rec.reference_where, min(k, len(ref)), pool.vectors,
                      searched=ref, check=check, progress=bars["query_graph"])
            arrays["query_graph"] = (g.indices, g.distances)
            infos["query"] = g.info.to_dict()
            if "reference_graph" in spec.inputs:
                if len(ref) < 2:
                    raise FailedPrecondition("LOF novelty needs at least 2 reference rows")
                g = graph(col, rec.version, rec.space, rec.reference_where, min(k, len(ref) - 1), ref.vectors,
                          searched=ref, exclude_self=True, check=check, progress=bars["reference_graph"])
                arrays["reference_graph"] = (g.indices, g.distances)
                infos["reference"] = g.info.to_dict()
        timings["graph_s"] = time.perf_counter() - t1
        check()
        t2 = time.perf_counter()
        progress(graph_hi, f"scoring {len(pool):,} rows" if spec.select is None
                 else f"picking {min(rec.size, len(pool)):,} of {len(pool):,} rows")
        related_rows = None
        if spec.select is not None:
            select_params = {**params, "seed": rec.seed,
                             "on_pick": _pick_progress(progress, check, f"{spec.name}", graph_hi, 0.99)}
            picks, scores = spec.select(arrays, min(rec.size, len(pool)), select_params)
            picks, scores = np.asarray(picks, dtype=np.int64), np.asarray(scores, dtype=np.float64)
        else:
            result = spec.score(arrays, params)
            if isinstance(result, dict):
                all_scores, related_all = np.asarray(result["scores"], np.float64), result.get("related")
            else:
                all_scores, related_all = np.asarray(result, np.float64), None
            check()
            progress(0.97, f"keeping the top {min(rec.size, len(pool)):,} of {len(pool):,} scores")
            picks = _top(all_scores, pool.row_keys, rec.size, rec, params, spec.supports_common)
            scores = all_scores[picks]
            if related_all is not None:
                related_rows = np.asarray(related_all)[picks]
    except ValueError as exc:
        raise InvalidArgument(f"miner '{spec.name}': {exc}") from exc
    timings["select_s"] = time.perf_counter() - t2
    timings["total_s"] = time.perf_counter() - t0
    related = None
    if related_rows is not None:
        related = [pool.ids[r] if r >= 0 else None for r in related_rows]
    return MiningOutput(ids=list(pool.ids[picks]), scores=scores, rows_scanned=pool.scanned,
                        rows_skipped=pool.skipped, timings=timings, related=related, graph=infos or None)


# -- direct miners: seeds, chains -----------------------------------------------------------

def _run_direct(col: Collection, rec: RunRecord, spec: MinerSpec, params: dict[str, Any],
                progress: Callable[[float, str], None], check: Callable[[], None]) -> MiningOutput:
    if spec.name == "chain":
        return _run_chain(col, rec, params, progress, check)
    return _run_knn(col, rec, params, progress, check)


def _run_knn(col: Collection, rec: RunRecord, params: dict[str, Any],
             progress: Callable[[float, str], None], check: Callable[[], None]) -> MiningOutput:
    from miners.density import aggregate_seed_neighbours
    from miners.vectors import EXACT_MAX_ROWS, knn_graph, load_pool

    t0 = time.perf_counter()
    spec = col.space(rec.space)
    seeds: list[np.ndarray] = []
    seed_names: list[str] = []
    if params["seed_ids"]:
        found = col.take(params["seed_ids"], ["id", spec.column], version=rec.version)
        for sid, vec in zip(found.column("id").to_pylist(), found.column(spec.column).to_pylist(), strict=True):
            if vec is None:
                raise FailedPrecondition(f"seed '{sid}' has no vector in space '{rec.space}'")
            seeds.append(np.asarray(vec, dtype=np.float32))
            seed_names.append(sid)
    for i, vec in enumerate(params["seed_vectors"]):
        seeds.append(np.asarray(vec, dtype=np.float32))
        seed_names.append(f"vector:{i}")
    if params.get("seed_texts"):
        raise FailedPrecondition("seed texts were not embedded: start knn runs through the server, which "
                                 "embeds texts with the space's embedder")
    queries = np.stack(seeds)
    if spec.metric == "cosine":
        queries = queries / np.maximum(np.linalg.norm(queries, axis=1, keepdims=True), 1e-12)
    where = rec.where or None
    table = col.at_version(rec.version)
    pool_rows = table.count_rows(where) if where else table.count_rows()
    exclude = set(params["seed_ids"])
    k = min(rec.size + len(exclude), max(1, pool_rows))
    progress(0.2, f"searching {len(queries)} seed(s) among {pool_rows:,} rows")
    if pool_rows <= EXACT_MAX_ROWS or col.vector_index(rec.space) is None:
        pool = load_pool(col, rec.version, rec.space, where, check=check)
        indices, distances = knn_graph(col, rec.version, rec.space, where, min(k, len(pool)), queries,
                                       searched=pool, check=check)
        ids = pool.ids
    else:
        # ANN graph: neighbours are stable row ids; renumber them 0..U-1 and name them
        indices, distances = knn_graph(col, rec.version, rec.space, where, k, queries, check=check)
        keys = np.unique(indices[indices >= 0])
        ids = np.asarray(_ids_of_rows(table, keys), dtype=object)
        indices = np.where(indices >= 0, np.searchsorted(keys, indices), -1)
    rows, scores = aggregate_seed_neighbours(indices, distances, how=params["aggregate"], rrf_k=params["rrf_k"])
    out_ids, out_scores, related = [], [], []
    for r, sc in zip(rows.tolist(), scores.tolist(), strict=True):
        if ids[r] in exclude:
            continue
        out_ids.append(ids[r])
        out_scores.append(sc)
        best = np.argmin(np.where(indices == r, distances, np.inf).min(axis=1))
        related.append(seed_names[int(best)])
        if len(out_ids) == rec.size:
            break
    return MiningOutput(ids=out_ids, scores=np.asarray(out_scores), rows_scanned=pool_rows, rows_skipped=0,
                        timings={"total_s": time.perf_counter() - t0}, related=related)


def _run_chain(col: Collection, rec: RunRecord, params: dict[str, Any],
               progress: Callable[[float, str], None], check: Callable[[], None]) -> MiningOutput:
    from indexing.filters import ids_predicate

    t0 = time.perf_counter()
    where = rec.where or None
    out: MiningOutput | None = None
    stages = params["stages"]
    scanned = 0
    for i, stage in enumerate(stages):
        check()
        progress(0.05 + 0.9 * i / len(stages), f"stage {i + 1}/{len(stages)}: {stage['miner']} to {stage['size']}")
        stage_rec = RunRecord(
            run_id=f"{rec.run_id}/stage{i}", collection=rec.collection, miner=stage["miner"], size=stage["size"],
            seed=rec.seed, version=rec.version, model=stage.get("model") or "", space=stage.get("space") or "",
            where=where or "", reference_where=rec.reference_where, reverse=bool(stage.get("reverse", False)),
            params=stage["params"],
        )
        out = run_mining(col, stage_rec, check=check)
        scanned = scanned or out.rows_scanned
        if not out.ids:
            break
        restrict = ids_predicate(out.ids)
        where = f"({rec.where}) AND {restrict}" if rec.where else restrict
    assert out is not None
    out.rows_scanned = scanned
    out.timings = {"total_s": time.perf_counter() - t0}
    return out
