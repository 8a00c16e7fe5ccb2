"""The maintenance jobs: optimize, build_index, recall_check, reindex.

Each validates its parameters before it is accepted (StartJob answers INVALID_ARGUMENT
for bad ones) and runs on a shared collection handle in the job pool.
"""

from __future__ import annotations

from dataclasses import asdict
from datetime import timedelta
from typing import Any

from indexing.errors import FailedPrecondition, InvalidArgument
from indexing.schema import INDEX_KINDS
from indexing.settings import REINDEX_BAD_SHOWN as _REINDEX_BAD_SHOWN
from indexing.store import Collection
from service.jobs import JobContext, JobKind, JobManager


def _only(params: dict[str, Any], allowed: set[str], kind: str) -> None:
    unknown = sorted(set(params) - allowed)
    if unknown:
        raise InvalidArgument(
            f"{kind}: unknown parameter(s) {', '.join(unknown)} (allowed: {', '.join(sorted(allowed)) or 'none'})"
        )


def _number(params: dict[str, Any], name: str, default: float | None, lo: float, hi: float,
            *, integer: bool = False) -> float | int | None:
    value = params.get(name, default)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise InvalidArgument(f"parameter '{name}' must be a number, got {value!r}")
    if integer and float(value) != int(value):
        raise InvalidArgument(f"parameter '{name}' must be an integer, got {value!r}")
    if not lo <= value <= hi:
        raise InvalidArgument(f"parameter '{name}' must be in [{lo:g}, {hi:g}], got {value!r}")
    return int(value) if integer else float(value)


def _validate_optimize(col: Collection, params: dict[str, Any]) -> dict[str, Any]:
    _only(params, {"cleanup_older_than_s"}, "optimize")
    return {"cleanup_older_than_s": _number(params, "cleanup_older_than_s", None, 0, 10 * 365 * 86400)}


def _run_optimize(ctx: JobContext, col: Collection, params: dict[str, Any]) -> dict[str, Any]:
    ctx.progress(0.05, "compacting and updating indexes")
    older = params.get("cleanup_older_than_s")
    result = col.optimize(cleanup_older_than=None if older is None else timedelta(seconds=older))
    return asdict(result)


def _validate_space_params(col: Collection, params: dict[str, Any], allowed: set[str], kind: str) -> str:
    _only(params, allowed, kind)
    space = params.get("space")
    if not isinstance(space, str) or not space:
        raise InvalidArgument(f"{kind}: parameter 'space' is required")
    col.space(space)  # NOT_FOUND if the space does not exist
    return space


def _validate_build_index(col: Collection, params: dict[str, Any]) -> dict[str, Any]:
    space = _validate_space_params(col, params, {"space", "kind"}, "build_index")
    kind = params.get("kind")
    if kind is not None and (kind not in INDEX_KINDS or kind in ("auto", "flat")):
        raise InvalidArgument(f"build_index: kind must be one of ivf_rq, ivf_sq, ivf_pq, ivf_hnsw_sq, ivf_flat; got {kind!r}")
    return {"space": space, "kind": kind}


def _run_build_index(ctx: JobContext, col: Collection, params: dict[str, Any]) -> dict[str, Any]:
    ctx.progress(0.05, f"training the index of space '{params['space']}'")
    kind = col.build_index(params["space"], kind=params.get("kind"))
    return {"space": params["space"], "kind": kind}


def _validate_recall(col: Collection, params: dict[str, Any]) -> dict[str, Any]:
    space = _validate_space_params(col, params, {"space", "queries", "k", "where", "tune"}, "recall_check")
    where = params.get("where") or None
    col.validate_filter(where)
    tune = params.get("tune", True)
    if not isinstance(tune, bool):
        raise InvalidArgument(f"parameter 'tune' must be true or false, got {tune!r}")
    return {"space": space, "queries": _number(params, "queries", 50, 1, 10_000, integer=True),
            "k": _number(params, "k", 10, 1, 1000, integer=True), "where": where, "tune": tune}


def _run_recall(ctx: JobContext, col: Collection, params: dict[str, Any]) -> dict[str, Any]:
    ctx.progress(0.05, "searching exactly and with the index")
    report = col.recall_check(params["space"], queries=params["queries"], k=params["k"],
                              where=params["where"], tune=params["tune"])
    return asdict(report)


_REINDEX_STRINGS = ("model", "clip_model", "clip_pretrained", "source", "where", "engine", "ray_address")


def _validate_reindex(jobs: JobManager, col: Collection, params: dict[str, Any]) -> dict[str, Any]:
    from indexing.embedders import embedder_for_identity
    from indexing.reindex import ENGINES, embedder_identity

    _only(params, {"space", *_REINDEX_STRINGS, "batch_rows", "ray_workers", "restart", "build_index"},
          "reindex")
    space = params.get("space")
    if not isinstance(space, str) or not space:
        raise InvalidArgument("reindex: parameter 'space' is required")
    out: dict[str, Any] = {"space": space}
    for name in _REINDEX_STRINGS:
        value = params.get(name)
        if value is not None and not isinstance(value, str):
            raise InvalidArgument(f"parameter '{name}' must be a string, got {value!r}")
        out[name] = value or None
    for name in ("restart", "build_index"):
        value = params.get(name, name == "build_index")
        if not isinstance(value, bool):
            raise InvalidArgument(f"parameter '{name}' must be true or false, got {value!r}")
        out[name] = value
    out["batch_rows"] = _number(params, "batch_rows", 256, 1, 100_000, integer=True)
    out["ray_workers"] = _number(params, "ray_workers", None, 1, 4096, integer=True)
    out["engine"] = out["engine"] or "local"
    if out["engine"] not in ENGINES:
        raise InvalidArgument(f"parameter 'engine' must be one of {', '.join(ENGINES)}, got {out['engine']!r}")
    col.validate_filter(out["where"])
    busy = [j for j in jobs.list(collection=col.name, states={"PENDING", "RUNNING"})
            if j.kind == "reindex" and j.params.get("space") == space]
    if busy:
        raise FailedPrecondition(f"reindex job {busy[0].id} of space '{space}' is already running; "
                                 "wait for it or cancel it")
    # Load the model now: one that cannot be loaded is the caller's error, said at once.
    identity = embedder_identity(out["model"], out["clip_model"], out["clip_pretrained"])
    embedder_for_identity(identity).load()
    return out


def _run_reindex(ctx: JobContext, col: Collection, params: dict[str, Any]) -> dict[str, Any]:
    from indexing.reindex import reindex

    def on_progress(done: int, total: int) -> None:
        ctx.progress(0.95 * done / total if total else 0.0, f"{done} of {total} rows embedded")

    ctx.progress(0.0, "planning")
    report = reindex(col.store, col.name, progress=False, check=ctx.check, on_progress=on_progress,
                     **params)
    result = asdict(report)
    result["bad_count"] = len(report.bad)
    result["bad"] = report.bad[:_REINDEX_BAD_SHOWN]
    result["summary"] = report.summary()
    return result


def register_maintenance_jobs(jobs: JobManager) -> None:
    jobs.register("optimize", JobKind(run=_run_optimize, validate=_validate_optimize))
    jobs.register("build_index", JobKind(run=_run_build_index, validate=_validate_build_index))
    jobs.register("recall_check", JobKind(run=_run_recall, validate=_validate_recall))
    jobs.register("reindex", JobKind(run=_run_reindex,
                                     validate=lambda col, params: _validate_reindex(jobs, col, params)))
