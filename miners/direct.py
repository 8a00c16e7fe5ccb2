"""Miners that drive their own run: ``knn`` (nearest pool items to seeds) and ``chain``
(stages, each on the previous stage's picks).

They are registered like any miner (``miners/registry.py``) with hooks instead of a
score function: ``validate_run(ctx)`` checks what a parameter's range cannot (seeds exist
and fit the space; every stage is a valid run) before anything starts, and ``run(ctx)``
returns the run's :class:`~miners.runs.MiningOutput`. ``ctx`` is the
:class:`~miners.inputs.RunContext`; ``chain`` validates and runs its stages through the
runner's own entry points on it (``ctx.validate_stage``, ``ctx.mine_stage``), each stage
a :class:`~miners.runs.RunSpec` derived from the run with ``dataclasses.replace``.
"""

from __future__ import annotations

import re
import time
from dataclasses import replace
from typing import Any

import numpy as np
import pyarrow as pa

from indexing.errors import FailedPrecondition, InvalidArgument, NotFound
from indexing.filters import ids_predicate, sql_quote
from miners import vectors
from miners.density import aggregate_seed_neighbours
from miners.inputs import INPUTS, Input, RunContext
from miners.runs import STAGE_FIELDS, MiningOutput
from miners.vectors import ids_of_rows, knn_graph, load_pool

# -- knn: seeds ------------------------------------------------------------------------------

def knn_validate(ctx: RunContext) -> None:
    params, col, space = ctx.params, ctx.col, ctx.space
    n_seeds = len(params["seed_ids"]) + len(params["seed_vectors"]) + len(params["seed_texts"])
    if n_seeds == 0:
        raise InvalidArgument("miner 'knn' needs seeds: params seed_ids, seed_vectors or seed_texts")
    dim = vectors.space_spec(col, space).dim
    dims = {len(v) for v in params["seed_vectors"]}
    if dims and dims != {dim}:
        raise InvalidArgument(f"seed_vectors have dimension {dims.pop()}; space '{space}' has {dim}")
    if vectors.object_model(space) is not None:
        if params["seed_texts"]:
            raise InvalidArgument(f"seed_texts cannot seed object space '{space}' (no text embedder makes box "
                                  "embeddings): give seed_ids (images, or '<image id>#<box>') or seed_vectors")
        _object_seeds(ctx, params["seed_ids"], ctx.run.version)
    elif params["seed_ids"]:
        found = col.take(params["seed_ids"], ["id"]).column("id").to_pylist()
        missing = sorted(set(params["seed_ids"]) - set(found))
        if missing:
            raise NotFound(f"seed ids not found in '{col.name}': {', '.join(missing[:10])}")


def _object_seeds(ctx: RunContext, seed_ids: list[str], version: int | None
                  ) -> list[tuple[str, int | None]]:
    """Seed ids in an object space: an image id (every box of it with an embedding seeds)
    or ``<image id>#<box>`` (that box). NotFound naming the ids that are neither."""
    found = set(ctx.col.take(list(seed_ids), ["id"], version=version).column("id").to_pylist()) if seed_ids \
        else set()
    out: list[tuple[str, int | None]] = []
    missing: list[str] = []
    boxed = [s for s in seed_ids if s not in found and re.fullmatch(r".*#\d+", s)]
    images = set(ctx.col.take([s.rsplit("#", 1)[0] for s in boxed], ["id"], version=version)
                 .column("id").to_pylist()) if boxed else set()
    for sid in seed_ids:
        if sid in found:
            out.append((sid, None))
        elif sid in boxed and sid.rsplit("#", 1)[0] in images:
            image, box = sid.rsplit("#", 1)
            out.append((image, int(box)))
        else:
            missing.append(sid)
    if missing:
        raise NotFound(f"seed ids not found in '{ctx.col.name}': {', '.join(missing[:10])} (in object space "
                       f"'{ctx.space}' a seed is an image id or '<image id>#<box index>')")
    return out


def _knn_objects(ctx: RunContext) -> MiningOutput:
    """``knn`` in an object space: the seeds are boxes (given as ``<image id>#<box>``, or an
    image id for every box of it) or vectors; the pool is every box with an embedding in the
    images matching ``where``; seed boxes (and the boxes of seed images) are left out."""
    t0 = time.perf_counter()
    col, rec, params, check = ctx.col, ctx.run, ctx.params, ctx.check
    ctx.progress(0.05, "loading the object embeddings")
    pool = load_pool(col, rec.version, rec.space, ctx.where, check=check, objects_where=ctx.objects_where)
    if not len(pool):
        raise FailedPrecondition(f"no box of the pool has an embedding in object space '{rec.space}' "
                                 f"({pool.skipped:,} boxes without one)")
    seeds: list[np.ndarray] = []
    seed_names: list[str] = []
    exclude: set[tuple[str, int]] = set()
    wanted = _object_seeds(ctx, params["seed_ids"], rec.version)
    if wanted:
        # the seeds' own embeddings, from the seed images (which may lie outside the pool)
        seed_images = sorted({image for image, _ in wanted})
        owned = vectors.load_objects(col, rec.version, rec.space, ids_predicate(seed_images), check=check)
        at = {(owned.ids[i], int(owned.boxes[i])): i for i in range(len(owned))}
        for image, box in wanted:
            rows = [i for (img, b), i in at.items() if img == image and (box is None or b == box)]
            if not rows:
                what = f"box {box} of image '{image}'" if box is not None else f"image '{image}'"
                raise FailedPrecondition(f"seed {what} has no box embedding in object space '{rec.space}'")
            for i in rows:
                seeds.append(owned.vectors[i])
                seed_names.append(owned.name(i))
                exclude.add((image, int(owned.boxes[i])))
    for i, vec in enumerate(params["seed_vectors"]):
        seeds.append(np.asarray(vec, dtype=np.float32))
        seed_names.append(f"vector:{i}")
    queries = np.stack(seeds).astype(np.float32)
    k = min(rec.size + len(exclude), len(pool))
    ctx.progress(0.2, f"searching {len(queries)} seed(s) among {len(pool):,} objects")
    indices, distances = knn_graph(col, rec.version, rec.space, ctx.where, k, queries, searched=pool, check=check,
                                   objects_where=ctx.objects_where)
    rows, scores = aggregate_seed_neighbours(indices, distances, how=params["aggregate"], rrf_k=params["rrf_k"])
    out_rows, out_scores, related = [], [], []
    for r, sc in zip(rows.tolist(), scores.tolist(), strict=True):
        if (pool.ids[r], int(pool.boxes[r])) in exclude:
            continue
        out_rows.append(r)
        out_scores.append(sc)
        best = np.argmin(np.where(indices == r, distances, np.inf).min(axis=1))
        related.append(seed_names[int(best)])
        if len(out_rows) == rec.size:
            break
    return MiningOutput(ids=[pool.ids[r] for r in out_rows], scores=np.asarray(out_scores),
                        rows_scanned=pool.scanned, rows_skipped=pool.skipped,
                        timings={"total_s": time.perf_counter() - t0}, related=related,
                        boxes=[int(pool.boxes[r]) for r in out_rows],
                        stats={"objects": {"scanned": pool.scanned, "skipped_no_embedding": pool.skipped,
                                           "mined": len(pool)}})


def knn_run(ctx: RunContext) -> MiningOutput:
    if vectors.object_model(ctx.run.space) is not None:
        return _knn_objects(ctx)
    t0 = time.perf_counter()
    col, rec, params, check = ctx.col, ctx.run, ctx.params, ctx.check
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
    where = ctx.where
    table = col.at_version(rec.version)
    pool_rows = table.count_rows(where) if where else table.count_rows()
    exclude = set(params["seed_ids"])
    k = min(rec.size + len(exclude), max(1, pool_rows))
    ctx.progress(0.2, f"searching {len(queries)} seed(s) among {pool_rows:,} rows")
    # read at call time: the exact/ANN threshold (miners.vectors.EXACT_MAX_ROWS, set in indexing/settings.py)
    if pool_rows <= vectors.EXACT_MAX_ROWS or col.vector_index(rec.space) is None:
        pool = load_pool(col, rec.version, rec.space, where, check=check)
        indices, distances = knn_graph(col, rec.version, rec.space, where, min(k, len(pool)), queries,
                                       searched=pool, check=check)
        ids = pool.ids
    else:
        # ANN graph: neighbours are row ids; renumber them 0..U-1 and name them
        indices, distances = knn_graph(col, rec.version, rec.space, where, k, queries, check=check)
        keys = np.unique(indices[indices >= 0])
        ids = np.asarray(ids_of_rows(table, keys), dtype=object)
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


# -- chain: stages ---------------------------------------------------------------------------

def _stage_fields(stage: dict[str, Any]) -> dict[str, Any]:
    """The RunSpec fields a stage sets (``miner``, ``size``, ``params``, ``model``...)."""
    return {name: stage[name] for name in STAGE_FIELDS if name in stage}


def chain_validate(ctx: RunContext) -> dict[str, Any]:
    """Each stage validated as the run it will be (the run with the stage's fields); the
    stages come back complete: size, validated params, model and space filled in."""
    req, params = ctx.run, ctx.params
    if not params["stages"]:
        raise InvalidArgument("miner 'chain' needs params.stages: [{miner, size, params}, ...]")
    stages = []
    for i, stage in enumerate(params["stages"]):
        last = i == len(params["stages"]) - 1
        size = stage["size"] or (req.size if last else None)
        if size is None:
            raise InvalidArgument(f"chain stage {i} ({stage['miner']}) needs a size")
        if last and size != req.size:
            raise InvalidArgument(f"the last chain stage selects {size}; the run's size is {req.size}")
        # The run's reference filter reaches the stages that use one ("top uncertain, then
        # coreset seeded with the labeled set"); a stage may set its own. The run's SEALS
        # restriction narrows the chain's pool once, not again per stage.
        uses_reference = ctx.miners[stage["miner"]].reference != "none"
        reference = stage.get("reference_where", req.reference_where if uses_reference else "") or ""
        sub = replace(req, **{**_stage_fields(stage), "size": size, "params": stage.get("params") or {},
                              "reverse": bool(stage.get("reverse", False)), "reference_where": reference,
                              "candidates": stage.get("candidates", ""),
                              "candidates_k": stage.get("candidates_k", 0)})
        try:
            _, stage_params = ctx.validate_stage(sub)
        except (InvalidArgument, NotFound, FailedPrecondition) as exc:
            raise type(exc)(f"chain stage {i} ({stage['miner']}): {exc.message}") from exc
        stages.append({**stage, "size": size, "params": stage_params, "model": sub.model or None,
                       "space": sub.space or None, "reference_where": sub.reference_where})
    return {**params, "stages": stages}


def chain_run(ctx: RunContext) -> MiningOutput:
    t0 = time.perf_counter()
    rec = ctx.run
    where = ctx.where
    out: MiningOutput | None = None
    stages = ctx.params["stages"]
    scanned = 0
    for i, stage in enumerate(stages):
        ctx.check()
        ctx.progress(0.05 + 0.9 * i / len(stages), f"stage {i + 1}/{len(stages)}: {stage['miner']} to "
                     f"{stage['size']}")
        stage_rec = replace(rec, **{"reference_where": "", "candidates": "", "candidates_k": 0,
                                    **_stage_fields(stage), "run_id": f"{rec.run_id}/stage{i}",
                                    "where": where or "", "reverse": bool(stage.get("reverse", False))})
        out = ctx.mine_stage(stage_rec)
        scanned = scanned or out.rows_scanned
        if not out.ids:
            break
        restrict = ids_predicate(out.ids)
        where = f"({rec.where}) AND {restrict}" if rec.where else restrict
    assert out is not None
    out.rows_scanned = scanned
    out.timings = {"total_s": time.perf_counter() - t0}
    return out


# -- select: weighted objectives, thresholds, targets, diversity in one greedy pass -----------

_FIELD_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_.]*$")
PREDICTED_CLASS = "predicted_class"


class _Column(Input):
    """One column of every pool row (a ``select`` target field), nulls as None."""

    name = "column"
    row_arrays = ("column",)

    def __init__(self, column: str) -> None:
        self.column = column

    def columns(self, ctx: RunContext) -> dict[str, str]:
        return {"column": self.column}

    def decode(self, batch: Any, rows: np.ndarray, row_keys: np.ndarray, ctx: RunContext) -> dict[str, Any]:
        return {"column": np.asarray(batch.column("column").take(pa.array(rows, pa.int64())).to_pylist(),
                                     dtype=object)}


def _sql_value(value: Any, where: str) -> str:
    if isinstance(value, bool) or value is None:
        raise InvalidArgument(f"{where}: values must be numbers or strings, got {value!r}")
    if isinstance(value, int | float):
        if not np.isfinite(float(value)):
            raise InvalidArgument(f"{where}: {value!r} is not a finite number")
        return repr(value)
    if isinstance(value, str):
        return sql_quote(value)
    raise InvalidArgument(f"{where}: values must be numbers or strings, got {value!r}")


def _field_sql(th: dict[str, Any], i: int) -> str:
    """A field threshold as SQL: ``field >= min AND field <= max AND field IN (...)``."""
    name = th["field"]
    where = f"select: thresholds[{i}] (field {name!r})"
    if not isinstance(name, str) or not _FIELD_NAME.match(name):
        raise InvalidArgument(f"{where}: a field is a column name such as 'label' or 'meta.source'")
    parts = []
    if th.get("min") is not None:
        parts.append(f"{name} >= {_sql_value(th['min'], where)}")
    if th.get("max") is not None:
        parts.append(f"{name} <= {_sql_value(th['max'], where)}")
    if th.get("in") is not None:
        values = th["in"]
        if not isinstance(values, list) or not values:
            raise InvalidArgument(f"{where}: 'in' must be a non-empty list")
        parts.append(f"{name} IN ({', '.join(_sql_value(v, where) for v in values)})")
    if not parts:
        raise InvalidArgument(f"{where}: give min, max or in")
    return " AND ".join(parts)


def _sub_run(ctx: RunContext, entry: dict[str, Any], what: str, where: str) -> dict[str, Any]:
    """An objective or threshold naming a miner: validated as the run it will be (the
    select run's model, space and pool unless it names its own); returns it completed."""
    req = ctx.run
    name = entry.get("miner")
    if name not in ctx.miners:
        raise InvalidArgument(f"select: {what}: unknown miner {name!r}")
    spec = ctx.miners[name]
    if spec.score is None or spec.select is not None or spec.run is not None:
        raise InvalidArgument(f"select: {what}: miner {name!r} picks a batch; name a miner that scores every "
                              "row (margin, entropy, bald, typicality, lof...)")
    sub = replace(req, miner=name, size=1, params=entry.get("params") or {}, model=entry.get("model") or req.model,
                  space=entry.get("space") or req.space, reverse=bool(entry.get("reverse", False)), where=where,
                  reference_where=req.reference_where if spec.reference != "none" else "", candidates="",
                  candidates_k=0)
    try:
        _, params = ctx.validate_stage(sub)
    except (InvalidArgument, NotFound, FailedPrecondition) as exc:
        raise type(exc)(f"select: {what} ({name}): {exc.message}") from exc
    return {**entry, "params": params, "model": sub.model, "space": sub.space, "reverse": sub.reverse,
            "reference_where": sub.reference_where}


def _pool_where(ctx: RunContext, thresholds: list[dict[str, Any]]) -> str:
    parts = [f"({ctx.where})"] if ctx.where else []
    parts += [f"({_field_sql(th, i)})" for i, th in enumerate(thresholds) if "field" in th]
    return " AND ".join(parts)


def select_validate(ctx: RunContext) -> dict[str, Any]:
    """Objectives and miner thresholds validated as runs; field thresholds and the target
    field checked against the table."""
    p, req = ctx.params, ctx.run
    where = _pool_where(ctx, p["thresholds"])
    if where:
        ctx.col.validate_filter(where)
    objectives = []
    for i, obj in enumerate(p["objectives"]):
        w = obj.get("weight", 1.0)
        if isinstance(w, bool) or not isinstance(w, int | float) or not np.isfinite(w):
            raise InvalidArgument(f"select: objectives[{i}].weight must be a finite number, got {w!r}")
        if obj.get("normalize", "rank") not in ("rank", "minmax", "none"):
            raise InvalidArgument(f"select: objectives[{i}].normalize must be rank, minmax or none")
        objectives.append({**_sub_run(ctx, obj, f"objectives[{i}]", where), "weight": float(w),
                           "normalize": obj.get("normalize", "rank")})
    thresholds = [th if "field" in th else _sub_run(ctx, th, f"thresholds[{i}]", where)
                  for i, th in enumerate(p["thresholds"])]
    t = p["targets"]
    if t:
        if t["field"] == PREDICTED_CLASS:
            if not req.model:
                raise InvalidArgument("select: targets.field 'predicted_class' reads a model's predictions: "
                                      "give model=...")
            ctx.col.model(req.model)
        elif t["field"] not in ctx.table.schema.names and not _FIELD_NAME.match(t["field"]):
            raise InvalidArgument(f"select: targets.field {t['field']!r} is not a column")
    if (p["diversity"] > 0 or p["stop_distance"] > 0) and not req.space:
        raise InvalidArgument("select: diversity and stop_distance measure distances in an embedding space: "
                              "give space=...")
    return {**p, "objectives": objectives, "thresholds": thresholds}


def _align(sorted_keys: np.ndarray, order: np.ndarray, sub_keys: np.ndarray, values: np.ndarray,
           fill: Any = np.nan) -> np.ndarray:
    """``values`` (one per ``sub_keys`` row) placed at the pool rows with the same stable id
    (the pool's keys sorted: ``sorted_keys = keys[order]``); ``fill`` elsewhere."""
    out = np.full(len(order), fill, dtype=object if fill is None else np.float64)
    if len(sorted_keys) and len(sub_keys):
        pos = np.minimum(np.searchsorted(sorted_keys, sub_keys), len(sorted_keys) - 1)
        ok = sorted_keys[pos] == sub_keys
        out[order[pos[ok]]] = np.asarray(values)[ok]
    return out


def select_run(ctx: RunContext) -> MiningOutput:
    from miners import inputs as inputs_mod
    from miners import select as sel_mod

    t0 = time.perf_counter()
    rec, p, col = ctx.run, ctx.params, ctx.col
    where = _pool_where(ctx, p["thresholds"])
    pool_ctx = replace(ctx, run=replace(rec, where=where))
    need_vectors = p["diversity"] > 0 or p["stop_distance"] > 0
    vecs = reference = None
    ctx.progress(0.0, "select: reading the pool")
    if need_vectors:
        pool = load_pool(col, rec.version, rec.space, where or None, check=ctx.check)
        keys, scanned, vecs = pool.row_keys, pool.scanned, pool.vectors
        if ctx.reference_where:
            reference = load_pool(col, rec.version, rec.space, ctx.reference_where, check=ctx.check).vectors
    else:
        keys, _, scanned = inputs_mod.scan_arrays(pool_ctx, [])
    if not len(keys):
        raise FailedPrecondition(f"select: no pool row matches {where!r}" + (
            f" with a vector in space '{rec.space}'" if need_vectors else ""))
    order = np.argsort(keys, kind="stable")
    sorted_keys = keys[order]

    def scores_of(entry: dict[str, Any]) -> np.ndarray:
        sub = replace(rec, miner=entry["miner"], params=entry["params"], model=entry["model"], space=entry["space"],
                      reverse=entry["reverse"], where=where, reference_where=entry["reference_where"])
        k, s = ctx.score_stage(sub)
        return _align(sorted_keys, order, k, s)

    n_steps = len(p["objectives"]) + len(p["thresholds"]) + 2
    objectives = []
    for i, obj in enumerate(p["objectives"]):
        ctx.progress(0.05 + 0.6 * i / n_steps, f"select: scoring objective {i + 1} ({obj['miner']})")
        objectives.append(sel_mod.Objective(scores_of(obj), obj["weight"], obj["normalize"], obj["miner"]))
    eligible = np.ones(len(keys), dtype=bool)
    for th in p["thresholds"]:
        if "miner" in th:
            eligible &= sel_mod.threshold_mask(scores_of(th), min=th.get("min"), max=th.get("max"),
                                               name=th["miner"])
    groups = targets = None
    group_names: list[Any] = []
    t = p["targets"]
    if t:
        if t["field"] == PREDICTED_CLASS:
            ck, arrays, _ = inputs_mod.scan_arrays(pool_ctx, [INPUTS["probs"]], per_chunk=lambda a: {
                "column": a["probs"].argmax(axis=1)})
            names = np.asarray(ctx.model_spec.classes, dtype=object)
            values = _align(sorted_keys, order, ck, names[arrays["column"]], fill=None) if len(ck) else \
                np.full(len(keys), None, dtype=object)
        else:
            ck, arrays, _ = inputs_mod.scan_arrays(pool_ctx, [_Column(t["field"])])
            values = _align(sorted_keys, order, ck, arrays["column"], fill=None)
        group_names = list(t["values"])
        index = {str(v): g for g, v in enumerate(group_names)}
        # rows of values without a target form one more group, target 0 (only in the fill)
        groups = np.asarray([index.get(str(v), len(group_names)) for v in values], dtype=np.int64)
        targets = [t["values"][v] for v in group_names] + [0]
        if t.get("kind", "count") == "fraction" and sum(targets) > 1 + 1e-9:
            raise InvalidArgument("select: target fractions must sum to at most 1")
    ctx.progress(0.7, f"select: greedy pass over {len(keys):,} rows")
    try:
        res = sel_mod.select(
            rec.size, objectives=objectives, eligible=eligible, groups=groups, targets=targets,
            target_kind=t.get("kind", "count") if t else "count", fill=bool(t.get("fill", True)) if t else True,
            vectors=vecs, reference=reference if reference is not None and len(reference) else None,
            diversity=p["diversity"], stop_distance=p["stop_distance"] or None,
            distance_scale=p["distance_scale"] or None, seed=rec.seed or 0,
            progress=lambda f, m: ctx.progress(0.7 + 0.29 * f, m), check=ctx.check)
    except ValueError as exc:
        raise InvalidArgument(f"select: {exc}") from exc
    ids = ids_of_rows(ctx.table, keys[res.rows])
    stats: dict[str, Any] = {"stopped": res.stopped, "pool": len(keys), "eligible": int(eligible.sum()),
                             **{k: v for k, v in res.stats.items() if isinstance(v, int | float | str)}}
    if res.group_counts is not None:
        stats["group_counts"] = {str(v): int(c) for v, c in zip(group_names, res.group_counts, strict=False)}
    return MiningOutput(ids=ids, scores=np.asarray(res.score, np.float64), rows_scanned=scanned,
                        rows_skipped=scanned - len(keys), timings={"total_s": time.perf_counter() - t0},
                        stats=stats)


# -- label issues (confident learning) and exact duplicates: every row, no vectors -------------

def label_issues_run(ctx: RunContext) -> MiningOutput:
    from miners.inputs import scan_arrays
    from miners.label_issues import find_label_issues

    t0 = time.perf_counter()
    p, spec = ctx.params, ctx.model_spec
    keys, arrays, scanned = scan_arrays(ctx, [INPUTS["probs"], INPUTS["labels"]], span=(0.0, 0.5))
    index = {name: i for i, name in enumerate(spec.classes)}
    labels = np.asarray([index.get(v, -1) for v in arrays.get("labels", [])], dtype=np.int64)
    known = labels >= 0
    if not known.any():
        raise FailedPrecondition(f"label_issues: no labeled pool row has both predictions of model '{ctx.model}' "
                                 f"and a label among its classes ({', '.join(spec.classes)})")
    keys, labels, probs = keys[known], labels[known], arrays["probs"][known]
    ctx.progress(0.8, f"confident learning over {len(keys):,} labeled rows")
    try:
        res = find_label_issues(labels, probs, method=p["method"], rank_by=p["rank_by"], frac_noise=p["frac_noise"],
                                min_per_class=p["min_per_class"], check=ctx.check)
    except ValueError as exc:
        raise InvalidArgument(f"label_issues: {exc}") from exc
    rows = res.rows[:ctx.run.size]
    stats = {"flagged": len(res.rows), "labeled_rows": len(keys), "unknown_labels": int((~known).sum()),
             "classes": list(spec.classes), "thresholds": [float(x) if np.isfinite(x) else None for x in res.thresholds],
             "confident_joint": res.confident_joint.tolist(), "rank_by": p["rank_by"]}
    suggested = np.asarray(spec.classes, dtype=object)[probs[rows].argmax(axis=1)] if len(rows) else []
    stats["suggested_labels"] = [str(s) for s in suggested]
    return MiningOutput(ids=ids_of_rows(ctx.table, keys[rows]), scores=np.asarray(res.score[rows], np.float64),
                        rows_scanned=scanned, rows_skipped=scanned - len(keys),
                        timings={"total_s": time.perf_counter() - t0}, stats=stats)


def exact_duplicates_run(ctx: RunContext) -> MiningOutput:
    """Rows whose content (the vector, the text, the uri string, or the bytes of the file at
    uri) is identical: the drop list (each duplicate with the id of the row kept), the keep
    list (every unique row and one row per group) or every row of a group."""
    from miners import dedup
    from miners.inputs import scan_arrays

    t0 = time.perf_counter()
    p, rec = ctx.params, ctx.run
    of = p["of"]
    if of == "vector":
        keys, arrays, scanned = scan_arrays(ctx, [INPUTS["vectors"]], per_chunk=lambda a: {
            "digest": dedup.hash_vectors(np.asarray(a["vectors"], np.float32))}, span=(0.0, 0.9))
    else:
        def digest(a: dict[str, Any]) -> dict[str, np.ndarray]:
            values = a["column"].tolist()
            return {"digest": dedup.hash_files(values, check=ctx.check) if of == "file"
                    else dedup.hash_items(values)}

        keys, arrays, scanned = scan_arrays(ctx, [INPUTS["content"]], per_chunk=digest, span=(0.0, 0.9))
    digests = arrays.get("digest", np.zeros((0, 2), np.uint64))
    ctx.check()
    # the kept row of a group: the smallest row id (first in the table's order at the pinned version)
    groups = dedup.exact_duplicates(digests, priority=keys.astype(np.float64))
    if p["output"] == "drop":
        rows = groups.dropped
    elif p["output"] == "keep":
        rows = np.flatnonzero(groups.keep & (groups.kept_row >= 0))
    else:
        rows = np.flatnonzero(groups.group >= 0)
    size_of = np.ones(len(keys))
    has = groups.group >= 0
    size_of[has] = groups.sizes[groups.group[has]]
    # largest groups first, then the oldest rows
    rows = rows[np.lexsort((keys[rows], -size_of[rows]))][:rec.size]
    rel_ids = None
    if p["output"] != "keep":  # each row names the row its group keeps
        rel_ids = ids_of_rows(ctx.table, keys[groups.kept_row[rows]]) if len(rows) else []
    stats = {"rows": len(keys), "groups": groups.n_groups, "duplicates": int(len(groups.dropped)),
             "kept": int((groups.keep & (groups.kept_row >= 0)).sum()), "of": of}
    return MiningOutput(ids=ids_of_rows(ctx.table, keys[rows]), scores=size_of[rows], rows_scanned=scanned,
                        rows_skipped=scanned - len(keys), timings={"total_s": time.perf_counter() - t0},
                        related=rel_ids, stats=stats)
