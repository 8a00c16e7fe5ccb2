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

import time
from dataclasses import replace
from typing import Any

import numpy as np

from indexing.errors import FailedPrecondition, InvalidArgument, NotFound
from indexing.filters import ids_predicate
from miners import vectors
from miners.density import aggregate_seed_neighbours
from miners.inputs import RunContext
from miners.runs import STAGE_FIELDS, MiningOutput
from miners.vectors import ids_of_rows, knn_graph, load_pool

# -- knn: seeds ------------------------------------------------------------------------------

def knn_validate(ctx: RunContext) -> None:
    params, col, space = ctx.params, ctx.col, ctx.space
    n_seeds = len(params["seed_ids"]) + len(params["seed_vectors"]) + len(params["seed_texts"])
    if n_seeds == 0:
        raise InvalidArgument("miner 'knn' needs seeds: params seed_ids, seed_vectors or seed_texts")
    dims = {len(v) for v in params["seed_vectors"]}
    if dims and dims != {col.space(space).dim}:
        raise InvalidArgument(f"seed_vectors have dimension {dims.pop()}; space '{space}' has "
                              f"{col.space(space).dim}")
    if params["seed_ids"]:
        found = col.take(params["seed_ids"], ["id"]).column("id").to_pylist()
        missing = sorted(set(params["seed_ids"]) - set(found))
        if missing:
            raise NotFound(f"seed ids not found in '{col.name}': {', '.join(missing[:10])}")


def knn_run(ctx: RunContext) -> MiningOutput:
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
        # ANN graph: neighbours are stable row ids; renumber them 0..U-1 and name them
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
        sub = replace(req, **{**_stage_fields(stage), "size": size, "params": stage.get("params") or {},
                              "reverse": bool(stage.get("reverse", False))})
        try:
            _, stage_params = ctx.validate_stage(sub)
        except (InvalidArgument, NotFound, FailedPrecondition) as exc:
            raise type(exc)(f"chain stage {i} ({stage['miner']}): {exc.message}") from exc
        stages.append({**stage, "size": size, "params": stage_params, "model": sub.model or None,
                       "space": sub.space or None})
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
        stage_rec = replace(rec, **{**_stage_fields(stage), "run_id": f"{rec.run_id}/stage{i}",
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
