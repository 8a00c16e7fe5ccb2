"""The mining runner: feeds miners from a Lance table in chunks and keeps what it must.

Flow of a run (the servicer validates, the job pool executes)::

    validate_request(collection, run)      # errors before anything starts
    run_mining(collection, record, ...)    # stream -> score -> top-k -> (batch select)

Both take a :class:`~miners.runs.RunSpec` (the request; then the persisted record). The
runner knows miners only through their registry entries (:mod:`miners.registry`): what a
run reads comes from the miner's input kinds (:mod:`miners.inputs`: columns, "row has it"
SQL, chunk decoder, whole-pool loader), and a miner that drives its own run (``knn``,
``chain``) does so through its ``run`` / ``validate_run`` hooks. Three shapes of run:

* **streamed** (``score``, optionally a ``select`` on the top ``candidates``): the pool
  (rows matching ``where``) is read at the collection version pinned in the run record, in
  chunks of ``chunk_rows``, projecting only the struct children the inputs need (e.g.
  ``pred_m1.probs``); a running top-``size`` keeps memory at O(size + chunk) whatever the
  pool size; BatchBALD runs on the top ``candidates`` by its score;
* **gathered** (``gather=True``): the whole pool's vectors (and what rides along), the
  reference set and k-NN graphs, then ``score`` + top-k or ``select``;
* **direct** (a ``run`` hook).

Ties break by the rows' row ids, and stochastic noise is a function of (seed,
row id), so a run re-executed on the same version returns the same results
whatever the chunking. A row id is LanceDB's ``_rowid``: the row's address (fragment,
offset) in collections created without stable row ids (every new one), which a
compaction or an update changes — fixed within the version a run pins, which is all it is
used for here; the stable id in older collections.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import replace
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from indexing.errors import FailedPrecondition, InvalidArgument, ResourceExhausted
from indexing.filters import any_row, check_filter, ids_predicate, object_clauses
from indexing.objects import check_predicate, expand
from indexing.settings import MAX_SIZE, MINING_THREADS, SEALS_K
from indexing.settings import MINING_CHUNK_ROWS as CHUNK_ROWS
from indexing.store import Collection
from miners import registry
from miners.detection import class_balanced_select
from miners.held_scores import held_scores
from miners.inputs import (
    Bound,
    Gathered,
    Input,
    RunContext,
    condition,
    decode_chunk,
    projection,
    scan_arrays,
)
from miners.registry import MinerSpec
from miners.runs import MiningOutput, RunSpec
from miners.stochastic import stochastic_scores
from miners.topk import StreamingTopK, gumbel_for_rows
from miners.vectors import ids_of_rows, object_model, space_spec

#: The request is a RunSpec; the name callers used before it stays.
MiningRequest = RunSpec


def miner_spec(name: str) -> MinerSpec:
    try:
        return registry.get(name)
    except KeyError:
        raise InvalidArgument(
            f"unknown miner '{name}' (known: {', '.join(sorted(registry.REGISTRY))})"
        ) from None


def validate_request(col: Collection, req: RunSpec) -> tuple[MinerSpec, dict[str, Any]]:
    """Everything that can be checked before a run starts. Raises InvalidArgument,
    NotFound (model) or FailedPrecondition (empty pool, no predictions). Returns the miner
    and its validated parameters (defaults filled in, as the run record keeps them)."""
    spec = miner_spec(req.miner)
    if isinstance(req.size, bool) or not isinstance(req.size, int) or not 1 <= req.size <= MAX_SIZE:
        raise InvalidArgument(f"size must be an integer in [1, {MAX_SIZE}], got {req.size!r}")
    if req.seed is not None and (isinstance(req.seed, bool) or not isinstance(req.seed, int) or req.seed < 0):
        raise InvalidArgument(f"seed must be a non-negative integer, got {req.seed!r}")
    if req.candidates not in CANDIDATES:
        raise InvalidArgument(f"candidates must be one of {', '.join(repr(c) for c in CANDIDATES)}, "
                              f"got {req.candidates!r}")
    if isinstance(req.candidates_k, bool) or not isinstance(req.candidates_k, int) \
            or not 0 <= req.candidates_k <= MAX_CANDIDATES_K:
        raise InvalidArgument(f"candidates_k must be an integer in [0, {MAX_CANDIDATES_K}] (0: {SEALS_K}), "
                              f"got {req.candidates_k!r}")
    if req.candidates and not req.space:
        raise InvalidArgument(f"candidates={req.candidates!r} finds the nearest pool rows of the labeled set in "
                              "an embedding space: give space=...")
    try:
        params = spec.validate(req.params)
    except ValueError as exc:
        raise InvalidArgument(str(exc)) from exc
    inputs = spec.input_kinds(params)
    if any(i.needs_model for i in inputs):
        if not req.model:
            raise InvalidArgument(f"miner '{spec.name}' reads a model's predictions: give model=...")
        col.model(req.model)  # NotFound with the known models
    elif req.model:
        col.model(req.model)
    if any(i.needs_space for i in inputs):
        if not req.space:
            raise InvalidArgument(f"miner '{spec.name}' reads an embedding space: give space=...")
        space = space_spec(col, req.space)
        if spec.gather and space.metric == "dot":
            raise InvalidArgument(f"miner '{spec.name}' needs an l2 or cosine space; '{req.space}' uses dot")
        if object_model(req.space) is not None:
            _check_object_miner(spec, inputs, req)
    elif req.space:
        space_spec(col, req.space)
    if req.objects_where:
        if object_model(req.space) is None:
            raise InvalidArgument("objects_where restricts the boxes of an object space (space='objects:<model>'); "
                                  f"space {req.space!r} is not one: to keep the images with such a box, put "
                                  "any_object(<predicate>) in where")
        check_predicate(req.objects_where)
    if req.reference_where and spec.reference == "none" and not req.candidates:
        raise InvalidArgument(f"miner '{spec.name}' does not use a reference filter (only "
                              "candidates='knn_of_labeled' reads one for such a miner)")
    if spec.reference == "required" and not req.reference_where:
        raise InvalidArgument(f"miner '{spec.name}' needs reference_where (e.g. \"split = 'train'\")")
    reference = col.validate_filter(req.reference_where or None)
    ctx = RunContext(col, req, params, validate_stage=lambda sub: validate_request(col, sub),
                     miners=registry.REGISTRY)
    if spec.validate_run is not None:
        checked = spec.validate_run(ctx)
        if checked is not None:
            params = ctx.params = checked
    if params.get("stochastic", "none") == "power" and req.reverse:
        raise InvalidArgument("reverse=True cannot be combined with stochastic='power' (use 'softmax')")
    if params.get("balance", "none") != "none" and not any(i.classes for i in inputs):
        raise InvalidArgument(f"balance needs predicted classes; miner '{spec.name}' has none")
    where = col.validate_filter(req.where or None)
    # existence checks stop at the first matching row (counting read the whole vector column
    # of a 10M-row pool for `emb IS NOT NULL` before the run could start); the pool filter's
    # is answered from the live rows kept for it once a run or a search read them
    table = ctx.table
    if not col.any_match(table, where):
        raise FailedPrecondition(f"the pool filter {where!r} matches no rows in '{col.name}'")
    cond = condition(inputs, ctx)
    if cond and not any_row(table, f"({where}) AND {cond}" if where else cond):
        raise FailedPrecondition(
            f"no row of the pool has what miner '{spec.name}' reads ({cond}); upsert those columns first")
    if reference and spec.reference == "required" and not any_row(table, reference):
        raise FailedPrecondition(f"the reference filter {req.reference_where!r} matches no rows")
    if req.candidates:
        labeled = col.validate_filter(_labeled_filter(req))
        if not any_row(table, labeled):
            raise FailedPrecondition(f"candidates={req.candidates!r}: the labeled set ({labeled!r}) is empty; "
                                     "label some rows first or run without candidates")
    return spec, params


#: Input kinds a miner may read in an object space: the vectors, and what is built from them.
OBJECT_INPUTS = frozenset({"vectors", "reference_vectors", "pool_graph", "query_graph", "reference_graph",
                           "seeds"})


def _check_object_miner(spec: MinerSpec, inputs: list[Input], req: RunSpec) -> None:
    """An object space (``objects:<model>``) feeds miners whose only per-row input is the
    vector: gathered miners on vectors and their k-NN graphs, and ``knn``."""
    other = [i.name for i in inputs if i.name not in OBJECT_INPUTS]
    if other or not (spec.gather or spec.name == "knn") or req.candidates:
        ok = sorted(n for n, s in registry.REGISTRY.items()
                    if (s.gather or n == "knn") and all(i.name in OBJECT_INPUTS for i in s.input_kinds(s.validate({}))))
        why = (f"it also reads {', '.join(other)} per image" if other else
               "candidates= narrows images, not objects" if req.candidates else
               "it does not load the whole pool's vectors")
        raise InvalidArgument(f"miner '{spec.name}' cannot run on object space '{req.space}': {why}; miners "
                              f"that run on objects: {', '.join(ok)} (or give an image space)")


#: Pool restrictions a run may ask for (``RunSpec.candidates``).
CANDIDATES = ("", "knn_of_labeled")
MAX_CANDIDATES_K = 10_000


def _labeled_filter(rec: RunSpec) -> str:
    return rec.reference_where or "label IS NOT NULL"


def _seals_where(col: Collection, rec: RunSpec, check: Callable[[], None],
                 progress: Callable[[float, str], None]) -> tuple[str, dict[str, Any]]:
    """SEALS (``candidates="knn_of_labeled"``): the run's pool filter narrowed to the
    ``candidates_k`` nearest pool rows of each labeled row (:func:`miners.select.seals_candidates`
    over the k-NN graph engine), and the stats to record."""
    from miners.select import seals_candidates
    from miners.vectors import load_pool

    k = rec.candidates_k or SEALS_K
    labeled_where = _labeled_filter(rec)
    progress(0.0, f"SEALS: the {k} nearest pool rows of each labeled row")
    pool = load_pool(col, rec.version, rec.space, rec.where or None, check=check)
    labeled = load_pool(col, rec.version, rec.space, labeled_where, check=check)
    stats: dict[str, Any] = {}
    rows = seals_candidates(pool.vectors, labeled.vectors, k, seed=rec.seed or 0, check=check, stats=stats) \
        if len(pool) else np.zeros(0, np.int64)
    info = {"k": int(k), "labeled": len(labeled), "pool": len(pool), "candidates": len(rows),
            "graph": stats.get("graph")}
    if not len(rows):
        raise FailedPrecondition(f"SEALS: no pool row is near the labeled set ({labeled_where!r}) in space "
                                 f"'{rec.space}'")
    restrict = ids_predicate(pool.ids[rows].tolist())
    return (f"({rec.where}) AND {restrict}" if rec.where else restrict), info


# -- the run --------------------------------------------------------------------------------

def run_mining(
    col: Collection,
    rec: RunSpec,
    *,
    progress: Callable[[float, str], None] = lambda f, m: None,
    check: Callable[[], None] = lambda: None,
    chunk_rows: int | None = None,
) -> MiningOutput:
    """Execute a validated run on the collection version pinned in ``rec``."""
    # What runs is what was validated: the filters in their checked form (indexing.filters),
    # their any_object(...) box clauses expanded on the run's pinned version (so the boxes
    # judged are those of the rows mined; the record keeps the user's filter).
    def expanded(where: str | None) -> str | None:
        if not where or not object_clauses(where):
            return where
        return expand(col.table if rec.version is None else col.at_version(rec.version), where, check=check)

    rec = replace(rec, where=check_filter(expanded(rec.where or None)) or "",
                  reference_where=check_filter(expanded(rec.reference_where or None)) or "")
    if rec.seed is None:
        rec = replace(rec, seed=0)
    spec = miner_spec(rec.miner)
    seals = None
    if rec.candidates:
        # the pool is narrowed once here; stages and hooks see the narrowed pool
        where, seals = _seals_where(col, rec, check, progress)
        rec = replace(rec, where=where, candidates="", candidates_k=0)
    ctx = RunContext(col, rec, dict(rec.params), progress, check,
                     validate_stage=lambda sub: validate_request(col, sub),
                     mine_stage=lambda sub: run_mining(col, sub, check=check),
                     score_stage=lambda sub: score_all(col, sub, check=check), miners=registry.REGISTRY)
    if spec.run is not None:
        out = spec.run(ctx)
    else:
        inputs = spec.input_kinds(ctx.params)
        out = _run_gathered(ctx, spec, inputs) if spec.gather else \
            _run_streamed(ctx, spec, inputs, chunk_rows or CHUNK_ROWS)
    if seals is not None:
        out.stats = {**(out.stats or {}), "seals": seals}
    return out


def score_all(col: Collection, rec: RunSpec, *, check: Callable[[], None] = lambda: None
              ) -> tuple[np.ndarray, np.ndarray]:
    """Every pool row's score by a scored miner (``score``, no ``select`` / ``run``):
    ``(row ids, scores)``, rows without the miner's inputs left out; ``reverse``
    negates the scores. What ``select`` combines: memory ``O(N)`` (16 bytes a row)."""
    if rec.seed is None:
        rec = replace(rec, seed=0)
    spec = miner_spec(rec.miner)
    if object_model(rec.space) is not None:
        raise InvalidArgument(f"space '{rec.space}' scores objects, not images; an objective or threshold of "
                              "'select' needs a score per image: give an image space")
    if spec.score is None or spec.select is not None or spec.run is not None:
        raise InvalidArgument(f"miner '{spec.name}' selects a batch; only a miner that scores every row can be "
                              "an objective or a threshold")
    ctx = RunContext(col, rec, dict(rec.params), check=check, miners=registry.REGISTRY)
    inputs = spec.input_kinds(ctx.params)
    try:
        if spec.gather:
            g = Gathered(ctx, inputs)
            g.load()
            g.build_graphs()
            result = spec.score(g.arrays, ctx.params)
            scores = np.asarray(result["scores"] if isinstance(result, dict) else result, np.float64)
            keys = g.pool.row_keys
        else:
            if ctx.model:
                ctx.model_spec  # noqa: B018 -- resolved before the scan
            keys, arrays, _ = scan_arrays(ctx, inputs, per_chunk=lambda a: {
                "score": np.asarray(spec.score(a, ctx.params), dtype=np.float64)})
            scores = arrays.get("score", np.zeros(0))
    except ValueError as exc:
        raise InvalidArgument(f"miner '{spec.name}': {exc}") from exc
    return keys, -scores if rec.reverse else scores


def _run_streamed(ctx: RunContext, spec: MinerSpec, inputs: list[Input], chunk_rows: int) -> MiningOutput:
    col, rec, params, progress, check = ctx.col, ctx.run, ctx.params, ctx.progress, ctx.check
    timings: dict[str, float] = {}
    t_start = time.perf_counter()
    table = col.at_version(rec.version)
    where = rec.where or None
    balance = params.get("balance", "none")
    model_spec = ctx.model_spec  # resolved here, before the worker threads read it
    if ctx.space:
        ctx.dim  # noqa: B018 -- likewise
    keep_n = params["candidates"] if spec.select is not None else rec.size
    groups: dict[int, StreamingTopK] = {}
    bound = [Bound(i, ctx) for i in inputs]
    # a batch select sees the candidates' per-row arrays (BatchBALD: their samples)
    carry = [name for i in inputs for name in i.row_arrays] if spec.select is not None else []
    # scores kept per fragment between runs, where a row's score is its own (miners.held_scores)
    held = held_scores(ctx, spec, bound, where, chunk_rows) \
        if spec.select is None and balance == "none" else None

    def select_parts(rows: np.ndarray, scores: np.ndarray,
                     arrays: Mapping[str, Any]) -> list[tuple[int, np.ndarray, np.ndarray, dict]]:
        """The candidates of scored rows (row keys ``rows``) for each group's top-k."""
        keys = -scores if rec.reverse else scores
        if spec.select is None and params.get("stochastic", "none") != "none":
            try:
                keys = stochastic_scores(keys, params["stochastic"], params["temperature"],
                                         noise=gumbel_for_rows(rows, rec.seed))
            except ValueError as exc:
                raise InvalidArgument(f"miner '{spec.name}': stochastic selection: {exc}") from exc
        if balance == "none":
            return [(0, *_candidates(keys, rows, np.arange(len(keys)), keep_n, scores, arrays, carry, None))]
        group_of = arrays["classes"]()
        return [(int(g), *_candidates(keys, rows, np.flatnonzero(group_of == g), keep_n, scores, arrays, carry,
                                      group_of)) for g in np.unique(group_of)]

    def score_chunk(batch: pa.RecordBatch) -> tuple[int, int, list[tuple[int, np.ndarray, np.ndarray, dict]]]:
        """One chunk -> (rows, rows kept, per-group candidates). Runs in a worker thread:
        numpy and Arrow release the GIL, so chunks score in parallel with the scan."""
        row_keys = np.asarray(batch.column("_rowid").to_numpy(zero_copy_only=False), dtype=np.uint64)
        try:
            keep, arrays = decode_chunk(bound, batch, row_keys)
            scores = np.asarray(spec.score(arrays, params), dtype=np.float64) if len(keep) else np.zeros(0)
        except ValueError as exc:
            raise InvalidArgument(f"miner '{spec.name}': {exc}") from exc
        return batch.num_rows, len(keep), select_parts(row_keys[keep], scores, arrays) if len(keep) else []

    scanned = skipped = 0

    def merge(chunk: tuple[int, int, list[tuple[int, np.ndarray, np.ndarray, dict]]]) -> None:
        nonlocal scanned, skipped
        n, with_inputs, parts = chunk
        scanned += n
        skipped += n - with_inputs
        for group, keys, rows, payload in parts:
            groups.setdefault(group, StreamingTopK(keep_n)).push(keys, rows, payload)
        progress(min(0.95, scanned / max(1, total)), f"scanned {scanned:,} of {total:,} rows")

    if held is not None:
        total = held.rows
        for n, rows, scores in held.parts():
            check()
            merge((n, len(rows), select_parts(rows, scores, {}) if len(rows) else []))
    else:
        total = table.count_rows(where) if where else table.count_rows()
        query = table.search().select(projection(bound)).limit(None).with_row_id(True)
        if where:
            query = query.where(where)
        pending: deque[Future] = deque()
        with ThreadPoolExecutor(max_workers=MINING_THREADS, thread_name_prefix="assay-mine") as pool:
            for batch in query.to_batches(chunk_rows):
                check()
                pending.append(pool.submit(score_chunk, batch))
                while len(pending) > MINING_THREADS:  # bounded: at most a few chunks in memory
                    merge(pending.popleft().result())
            while pending:
                merge(pending.popleft().result())
    timings["scan_score_s"] = time.perf_counter() - t_start

    if not groups:
        raise FailedPrecondition(
            f"none of the {scanned:,} pool rows has the inputs miner '{spec.name}' needs "
            f"({', '.join(i.name for i in inputs)})")
    t0 = time.perf_counter()
    parts = [top.result() for top in groups.values()]
    keys = np.concatenate([p[0] for p in parts])
    rows = np.concatenate([p[1] for p in parts])
    payload = {name: np.concatenate([p[2][name] for p in parts]) for name in parts[0][2]}
    order = np.lexsort((rows, -keys))
    keys, rows, payload = keys[order], rows[order], {n: v[order] for n, v in payload.items()}
    if spec.select is not None:
        progress(0.96, f"selecting {rec.size} of {len(keys)} candidates")
        picks, gains = spec.select({name: payload[name] for name in carry}, min(rec.size, len(keys)),
                                   {**params, "seed": rec.seed, "check": check,
                                    "progress": lambda f, m: progress(0.96 + 0.04 * f, m)})
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
    ids = ids_of_rows(table, rows[picks])
    timings["select_s"] = time.perf_counter() - t0
    timings["total_s"] = time.perf_counter() - t_start
    return MiningOutput(ids=ids, scores=scores, rows_scanned=scanned, rows_skipped=skipped, timings=timings)



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


def _labeled_class_counts(col: Collection, rec: RunSpec, model_spec: Any) -> np.ndarray:
    """Labeled examples per class of the model, at the run's version (for inverse-frequency
    budgets): for a classifier, the rows whose ``label`` is that class; for a detection model,
    the ground-truth boxes (``gt_boxes``) of that class — a detector is trained on boxes, and
    an image label says nothing about which objects it holds. Values that are not one of
    the model's classes are not counted."""
    counts = np.zeros(model_spec.num_classes, dtype=np.int64)
    index = {name: i for i, name in enumerate(model_spec.classes)}
    table = col.at_version(rec.version)
    column = "gt_boxes" if model_spec.task == "detection" else "label"
    query = table.search().where(f"{column} IS NOT NULL").select([column]).limit(None)
    for batch in query.to_batches(CHUNK_ROWS):
        values = batch.column(column)
        if column == "gt_boxes":
            values = pc.list_flatten(values).field("label")
        vc = pc.value_counts(values)
        for value, n in zip(vc.field("values").to_pylist(), vc.field("counts").to_pylist(), strict=True):
            if value in index:
                counts[index[value]] += n
    return counts


__all__ = ["MAX_SIZE", "MiningOutput", "MiningRequest", "RunSpec", "run_mining", "validate_request"]


# -- gathered miners: the whole pool (vectors, k-NN graphs) ----------------------------------

def _top(scores: np.ndarray, row_keys: np.ndarray, size: int, rec: RunSpec, params: dict[str, Any],
         supports_common: bool) -> np.ndarray:
    """Positions of the best ``size`` scores (reverse / stochastic as for streamed miners)."""
    keys = -scores if rec.reverse else scores
    if supports_common and params.get("stochastic", "none") != "none":
        keys = stochastic_scores(keys, params["stochastic"], params["temperature"],
                                 noise=gumbel_for_rows(row_keys, rec.seed))
    top = StreamingTopK(size)
    top.push(keys, row_keys, {"pos": np.arange(len(keys))})
    return top.result()[2].get("pos", np.zeros(0, dtype=np.int64))


def _run_gathered(ctx: RunContext, spec: MinerSpec, inputs: list[Input]) -> MiningOutput:
    rec, params, progress, check = ctx.run, ctx.params, ctx.progress, ctx.check
    t0 = time.perf_counter()
    g = Gathered(ctx, inputs)
    g.load()
    pool, arrays = g.pool, g.arrays
    stats: dict[str, Any] = {}
    timings = {"load_s": time.perf_counter() - t0}
    t1 = time.perf_counter()
    try:
        g.build_graphs()
        timings["graph_s"] = time.perf_counter() - t1
        check()
        t2 = time.perf_counter()
        progress(g.graph_hi, f"scoring {len(pool):,} rows" if spec.select is None
                 else f"picking {min(rec.size, len(pool)):,} of {len(pool):,} rows")
        related_rows = None
        if spec.select is not None:
            phased = _phase_progress(progress, g.graph_hi, 0.99)
            select_params = {**params, "seed": rec.seed, "stats": stats, "check": check, "progress": phased,
                             "on_pick": registry.pick_progress(phased, check, spec.name)[0]}
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
            picks = _top(all_scores, pool.row_keys, rec.size, rec, params, spec.takes_common)
            scores = all_scores[picks]
            if related_all is not None:
                related_rows = np.asarray(related_all)[picks]
    except ValueError as exc:
        raise InvalidArgument(f"miner '{spec.name}': {exc}") from exc
    except MemoryError as exc:  # a miner's own memory plan refused, or an allocation failed
        raise ResourceExhausted(f"miner '{spec.name}': {exc or 'out of memory'}") from exc
    timings["select_s"] = time.perf_counter() - t2
    timings["total_s"] = time.perf_counter() - t0
    related = None
    if related_rows is not None:
        related = [pool.name(r) if r >= 0 else None for r in related_rows]
    if spec.select is not None and related_rows is None and "related" in stats:
        # a batch select may name a related row per pick (the row a duplicate keeps)
        rel = np.asarray(stats.pop("related"), dtype=np.int64)
        related = [pool.name(r) if r >= 0 else None for r in rel]
    boxes = None
    if pool.boxes is not None:
        # object space: each pick is a box; the run's results name its image and box index
        boxes = [int(b) for b in pool.boxes[picks]]
        stats["objects"] = {"scanned": pool.scanned, "skipped_no_embedding": pool.skipped, "mined": len(pool)}
    return MiningOutput(ids=list(pool.ids[picks]), scores=scores, rows_scanned=pool.scanned,
                        rows_skipped=pool.skipped, timings=timings, related=related, graph=g.graphs or None,
                        stats=stats or None, boxes=boxes)


def _phase_progress(progress: Callable[[float, str], None], lo: float, hi: float) -> Callable[[float, str], None]:
    return lambda f, m: progress(lo + (hi - lo) * min(1.0, max(0.0, f)), m)
