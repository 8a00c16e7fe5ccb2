"""What each call sends and how its answer is read: one builder per call (pure).

Every public method of both clients is one ``rpc_*`` builder here, which checks the
arguments and builds the request (raising :class:`InvalidArgumentError` before anything
is sent), plus one call of the transport: ``_unary`` or ``_stream``. An :class:`Rpc`
names the stub and method, holds the request and parses each response message.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from functools import partial
from typing import Any, Final

import numpy as np
import pyarrow as pa
from google.protobuf.message import Message
from grpc_health.v1 import health_pb2

from indexing.errors import InvalidArgument
from indexing.filters import with_objects
from protos.assay.v1 import (
    collections_pb2,
    common_pb2,
    datasets_pb2,
    ingest_pb2,
    jobs_pb2,
    mining_pb2,
    query_pb2,
    scoring_pb2,
    search_pb2,
)
from service.arrow_ipc import table_to_ipc
from service.client.convert import (
    dict_to_struct,
    message_to_dict,
    page_or_empty,
    page_to_table,
    parse_search,
)
from service.client.errors import invalid
from service.client.sql import bind_two, bound


def _message(cls: type[Message], what: str, **fields: Any) -> Any:
    """Build a message, turning protobuf's type errors into InvalidArgumentError."""
    try:
        return cls(**{k: v for k, v in fields.items() if v is not None})
    except (TypeError, ValueError) as exc:
        raise invalid(f"{what}: {exc}") from None


def space_spec(name: str, spec: int | Mapping[str, Any] | common_pb2.SpaceSpec,
               ) -> common_pb2.SpaceSpec:
    """``512`` or ``{"dim", "metric", "model", "normalized", "index": {IndexPolicy fields}}``."""
    if isinstance(spec, common_pb2.SpaceSpec):
        out = common_pb2.SpaceSpec()
        out.CopyFrom(spec)
        out.name = name
        return out
    if isinstance(spec, int) and not isinstance(spec, bool):
        return _message(common_pb2.SpaceSpec, f"space '{name}'", name=name, dim=spec)
    if isinstance(spec, Mapping):
        kw = dict(spec)
        index = kw.pop("index", None)
        if isinstance(index, Mapping):
            index = _message(common_pb2.IndexPolicy, f"space '{name}' index", **index)
        return _message(common_pb2.SpaceSpec, f"space '{name}'", name=name, index=index, **kw)
    raise invalid(f"space '{name}': give a dimension (int) or a dict of SpaceSpec fields, "
                  f"got {spec!r}")


def model_spec(name: str, spec: Iterable[str] | Mapping[str, Any] | common_pb2.ModelSpec,
               ) -> common_pb2.ModelSpec:
    """``["cat", "dog"]`` or ``{"classes": [...], "task": "classification" | "detection" |
    "segmentation"}`` (a segmentation model may add ``top_q``, ``uncertain_threshold``,
    ``map_size``; a detection model may add ``"box_embedding_dim": d`` for per-object
    embeddings)."""
    if isinstance(spec, common_pb2.ModelSpec):
        out = common_pb2.ModelSpec()
        out.CopyFrom(spec)
        out.name = name
        return out
    if isinstance(spec, Mapping):
        return _message(common_pb2.ModelSpec, f"model '{name}'", name=name, **spec)
    if isinstance(spec, Iterable) and not isinstance(spec, str | bytes):
        return _message(common_pb2.ModelSpec, f"model '{name}'", name=name, classes=list(spec))
    raise invalid(f"model '{name}': give its class names (a list) or a dict, got {spec!r}")


def _ids(ids: str | Iterable[str]) -> list[str]:
    ids = [ids] if isinstance(ids, str) else list(ids)
    bad = next((i for i in ids if not isinstance(i, str)), None)
    if bad is not None:
        raise invalid(f"ids must be strings, got {type(bad).__name__} {bad!r}")
    return ids


def _columns(columns: str | Iterable[str] | None) -> list[str]:
    if columns is None:
        return []
    return [columns] if isinstance(columns, str) else list(columns)


def _version(version: int | str | None, what: str = "version") -> str:
    """A version reference as sent: "" (current / working state), a number or a name."""
    if version is None:
        return ""
    if isinstance(version, bool) or not isinstance(version, int | str | np.integer):
        raise invalid(f"{what} must be an int, a string or None, got {version!r}")
    if isinstance(version, int | np.integer):
        if version < 0:
            raise invalid(f"{what} must be >= 0, got {version}")
        return str(int(version))
    return version


# -- requests (pure): what to call, with what, and how to read the answer -----------------


def _same(response: Any) -> Any:
    return response


@dataclass(frozen=True)
class Rpc:
    """One call: the stub (``service``) and ``method``, the request, and ``parse`` for each
    response message. A ``request`` of None is answered locally with ``parse(None)``.
    Public methods of both clients are one builder below and one ``_unary``/``_stream``."""

    service: str
    method: str
    request: Message | None
    parse: Callable[[Any], Any] = _same
    # The response holds job records (one or a list): the client wraps them in its job class.
    jobs: bool = False


def rpc_list_collections() -> Rpc:
    return Rpc("collections", "ListCollections", collections_pb2.ListCollectionsRequest(),
               lambda r: list(r.collections))


def rpc_create_collection(
    name: str,
    spaces: Mapping[str, Any] | None,
    models: Mapping[str, Any] | None,
    fields: Mapping[str, str] | None,
    if_not_exists: bool,
) -> Rpc:
    request = collections_pb2.CreateCollectionRequest(
        collection=name,
        spaces=[space_spec(n, s) for n, s in (spaces or {}).items()],
        models=[model_spec(n, m) for n, m in (models or {}).items()],
        fields=dict(fields or {}),
        if_not_exists=if_not_exists,
    )
    return Rpc("collections", "CreateCollection", request, message_to_dict)


def rpc_describe(name: str) -> Rpc:
    return Rpc("collections", "DescribeCollection", collections_pb2.CollectionRef(collection=name),
               message_to_dict)


def rpc_drop(name: str) -> Rpc:
    return Rpc("collections", "DropCollection", collections_pb2.CollectionRef(collection=name),
               lambda _: None)


def rpc_add_space(collection: str, name: str, dim: int, metric: str, model: str | None,
                  normalized: bool | None, index: Mapping[str, Any] | None) -> Rpc:
    spec = {"dim": dim, "metric": metric, "model": model, "normalized": normalized, "index": index}
    request = collections_pb2.AddSpaceRequest(collection=collection, space=space_spec(name, spec))
    return Rpc("collections", "AddSpace", request, message_to_dict)


def rpc_add_model(collection: str, name: str, classes: Iterable[str], task: str, **options: Any) -> Rpc:
    spec = model_spec(name, {"classes": list(classes), "task": task,
                             **{k: v for k, v in options.items() if v is not None}})
    request = collections_pb2.AddModelRequest(collection=collection, model=spec)
    return Rpc("collections", "AddModel", request, message_to_dict)


def rpc_search(
    collection: str,
    space: str,
    *,
    vector: Any = None,
    ids: str | Iterable[str] | None = None,
    text: str | None = None,
    texts: Iterable[str] | None = None,
    k: int = 10,
    where: str | None = None,
    columns: Iterable[str] | None = None,
    nprobes: int | None = None,
    refine_factor: int | None = None,
    exact: bool = False,
    params: Mapping[str, Any] | None = None,
) -> Rpc:
    """A Search call. A 1-D ``vector``, one ``text`` or one id (a str) is a single query:
    its result has no ``query_index``; 2-D vectors, ``texts`` and a list of ``ids`` keep it."""
    given = [n for n, v in (("vector", vector), ("ids", ids), ("text", text), ("texts", texts))
             if v is not None]
    if len(given) != 1:
        raise invalid("search: give exactly one of vector, ids, text, texts "
                      f"(got {', '.join(given) or 'none'})")
    where = bound(where, params)
    request = _message(
        search_pb2.SearchRequest, "search", collection=collection, space=space, k=k, where=where,
        columns=_columns(columns), nprobes=nprobes, refine_factor=refine_factor, exact=exact,
    )
    if vector is not None:
        try:
            q = np.asarray(vector, dtype=np.float32)
        except (TypeError, ValueError) as exc:
            raise invalid(f"search: vector must be numbers: {exc}") from None
        if q.ndim not in (1, 2) or q.size == 0:
            raise invalid("search: vector must be 1-D (one query) or 2-D (a batch), "
                          f"got shape {q.shape}")
        single = q.ndim == 1
        request.vectors.dim = q.shape[-1]
        request.vectors.values.extend(q.ravel().tolist())
    elif ids is not None:
        single = isinstance(ids, str)
        request.ids.SetInParent()
        request.ids.ids.extend(_ids(ids))
    else:
        if texts is not None and isinstance(texts, str):
            raise invalid("search: texts must be a list of strings; use text= for one query")
        single = text is not None
        request.texts.SetInParent()
        request.texts.texts.extend([text] if single else list(texts or ()))
    return Rpc("search", "Search", request, partial(parse_search, single=single))


def objects_filter(where: str | None, objects_where: str | None) -> str | None:
    """``where`` restricted to images with an object matching ``objects_where`` (SQL over the
    object columns: id, source, box, class, score, probs, x1, y1, x2, y2, width, height,
    area): ``(<where>) AND any_object(<objects_where>)``, read by the server."""
    try:
        return with_objects(where, objects_where)
    except InvalidArgument as exc:
        raise invalid(str(exc)) from None


def is_object_space(space: str | None) -> bool:
    """``space`` names an object space (``"objects:<model>"``: a detection model's boxes as rows)."""
    return bool(space) and str(space).startswith("objects:")


def rpc_scan(collection: str, where: str | None, columns: Iterable[str] | None, page_rows: int,
             limit: int | None = None, offset: int = 0, version: int | str | None = None,
             params: Mapping[str, Any] | None = None) -> Rpc:
    request = _message(query_pb2.ScanRequest, "scan", collection=collection,
                       where=bound(where, params), columns=_columns(columns), page_rows=page_rows,
                       limit=limit, offset=offset, version=_version(version))
    return Rpc("query", "Scan", request, page_to_table)


def rpc_count(collection: str, where: str | None, version: int | str | None = None,
              params: Mapping[str, Any] | None = None) -> Rpc:
    request = _message(query_pb2.CountRequest, "count", collection=collection,
                       where=bound(where, params), version=_version(version))
    return Rpc("query", "Count", request, lambda r: int(r.count))


@dataclass(frozen=True)
class Page:
    """One page of a filtered scan: its rows, the cursor of the next page ("" after the
    last) and the collection version every page of the scan reads."""

    table: pa.Table
    next_cursor: str
    version: int = 0

    @property
    def last(self) -> bool:
        return not self.next_cursor


def rpc_page(collection: str, where: str | None, columns: Iterable[str] | None, page_rows: int,
             cursor: str | None, version: int | str | None,
             params: Mapping[str, Any] | None = None) -> Rpc:
    if isinstance(page_rows, bool) or not isinstance(page_rows, int) or page_rows < 1:
        raise invalid(f"page_rows must be a positive integer, got {page_rows!r}")
    request = _message(query_pb2.PageRequest, "page", collection=collection,
                       where=bound(where, params), columns=_columns(columns), page_rows=page_rows,
                       cursor=cursor or "", version=_version(version))
    return Rpc("query", "Page", request,
               lambda r: Page(page_or_empty(r.page), r.next_cursor, int(r.page.version)))


AGGREGATES: Final = ("label_distribution", "confused_pairs", "confusion", "class_uncertainty",
                     "histogram", "objects", "object_classes", "box_confusion", "box_confused_pairs",
                     "uncertainty_quality")


def rpc_aggregate(collection: str, kind: str, *, model: str | None = None,
                  where: str | None = None, field: str | None = None,
                  group_by: str | Iterable[str] | None = None, bins: int | None = None,
                  top: int | None = None, measure: str | None = None,
                  version: int | str | None = None,
                  range: tuple[float, float] | None = None,  # noqa: A002 - numpy's name
                  errors_only: bool = False, params: Mapping[str, Any] | None = None,
                  objects_where: str | None = None, columns: Iterable[str] | None = None,
                  limit: int | None = None, iou: float | None = None, quality: str | None = None,
                  run_id: Any = None, uncertainty_quantile: float | None = None,
                  quality_quantile: float | None = None, uncertainty_threshold: float | None = None,
                  quality_threshold: float | None = None, lower_is_better: bool = False,
                  max_ids: int | None = None) -> Rpc:
    """An analytics table (see AggregateRequest.kind) as a pyarrow Table. ``max_ids``
    (uncertainty_quality: ids per quadrant, 1..10000) travels as ``limit``."""
    if kind not in AGGREGATES:
        raise invalid(f"aggregate kind {kind!r} is not one of {', '.join(AGGREGATES)}")
    if max_ids is not None:
        if isinstance(max_ids, bool) or not isinstance(max_ids, int) or not 1 <= max_ids <= 10_000:
            raise invalid(f"max_ids must be an integer in [1, 10000] (ids listed per quadrant; the counts "
                          f"are always complete), got {max_ids!r}")
        limit = max_ids
    request = _message(
        query_pb2.AggregateRequest, kind, collection=collection, kind=kind, model=model,
        where=bound(where, params), field=field, group_by=_columns(group_by), bins=bins, top=top,
        measure=measure, version=_version(version), errors_only=errors_only,
        objects_where=objects_where, columns=_columns(columns), limit=limit, iou=iou,
        quality=quality, run_id=_run_id(run_id), uncertainty_quantile=uncertainty_quantile,
        quality_quantile=quality_quantile, uncertainty_threshold=uncertainty_threshold,
        quality_threshold=quality_threshold, lower_is_better=lower_is_better)
    if range is not None:
        try:
            lo, hi = range
            request.range_min, request.range_max = float(lo), float(hi)
        except (TypeError, ValueError) as exc:
            raise invalid(f"range must be (low, high) numbers, got {range!r}: {exc}") from None
    return Rpc("query", "Aggregate", request, page_or_empty)


def _one_of(what: str, **given: Any) -> None:
    named = [k for k, v in given.items() if v is not None]
    if len(named) != 1:
        raise invalid(f"{what}: give exactly one of {', '.join(given)} "
                      f"(got {', '.join(named) or 'none'})")


def _some_ids(ids: str | Iterable[str] | None, what: str) -> list[str]:
    """Ids given to select rows: an empty list is refused (it would select nothing, or,
    on the wire, be read as "no selection")."""
    if ids is None:
        return []
    out = _ids(ids)
    if not out:
        raise invalid(f"{what}: ids is empty")
    return out


def _run_id(run: Any) -> str | None:
    """A run id, or a MiningJob whose run id it is."""
    return getattr(run, "run_id", run)


def _tags(tags: str | Iterable[str], what: str) -> list[str]:
    tags = [tags] if isinstance(tags, str) else list(tags)
    bad = next((t for t in tags if not isinstance(t, str) or not t), None)
    if bad is not None:
        raise invalid(f"{what}: tags must be non-empty strings, got {bad!r}")
    return tags


def rpc_tag_items(collection: str, ids: str | Iterable[str] | None, where: str | None,
                  run_id: Any, add: str | Iterable[str], remove: str | Iterable[str],
                  params: Mapping[str, Any] | None = None) -> Rpc:
    run_id = _run_id(run_id)
    _one_of("tag_items", ids=ids, where=where, run_id=run_id)
    add, remove = _tags(add, "tag_items add"), _tags(remove, "tag_items remove")
    if not add and not remove:
        raise invalid("tag_items: give tags to add and/or remove")
    request = ingest_pb2.TagItemsRequest(
        collection=collection, ids=_some_ids(ids, "tag_items"),
        where=bound(where, params) or "", run_id=run_id or "", add=add, remove=remove)
    return Rpc("ingest", "TagItems", request, lambda r: int(r.rows))


EXPORT_FORMATS: Final = {".csv": "csv", ".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "coco", ".zip": "yolo"}
# One line per box, or YOLO labels: objects_where keeps boxes there (rows elsewhere).
BOX_EXPORTS: Final = ("objects_csv", "objects_jsonl", "yolo")


def export_format(path: str | os.PathLike[str], format: str | None) -> str:  # noqa: A002
    """The export format: given, or from the file's extension (.csv, .jsonl, .json = COCO)."""
    if format is None:
        ext = os.path.splitext(os.fspath(path))[1].lower()
        format = EXPORT_FORMATS.get(ext)
        if format is None:
            raise invalid(f"cannot tell the export format of {os.fspath(path)!r}: name it "
                          ".csv, .jsonl, .json (COCO) or .zip (YOLO), or pass format=")
    if format not in ("csv", "jsonl", "coco", "label-studio", *BOX_EXPORTS):
        raise invalid(f"export format {format!r} is not one of csv, jsonl, coco, label-studio, "
                      f"{', '.join(BOX_EXPORTS)}")
    return format


def rpc_export(collection: str, format: str, *, model: str | None = None,  # noqa: A002
               where: str | None = None, ids: str | Iterable[str] | None = None,
               run_id: Any = None, dataset: str | None = None,
               dataset_version: int | str | None = None, fields: Iterable[str] = (),
               min_score: float = 0.0, params: Mapping[str, Any] | None = None,
               image_url: str | None = None, mask_field: str | None = None,
               objects_where: str | None = None) -> Rpc:
    run_id = _run_id(run_id)
    named = [k for k, v in (("where", where), ("ids", ids), ("run_id", run_id), ("dataset", dataset))
             if v is not None]
    if len(named) > 1:
        raise invalid(f"export: give at most one of where, ids, run_id, dataset (got {', '.join(named)})")
    if dataset_version is not None and dataset is None:
        raise invalid("export: dataset_version needs dataset")
    if format in ("coco", "yolo") and not model:
        raise invalid(f"export: {format.upper()} needs model= (the detection model whose boxes to write)")
    request = _message(
        query_pb2.ExportRequest, "export", collection=collection, format=format, model=model or "",
        where=bound(where, params) or "", ids=_some_ids(ids, "export"),
        run_id=run_id or "", dataset=dataset or "",
        dataset_version=_version(dataset_version, "dataset_version"),
        fields=_columns(fields), min_score=min_score, image_url=image_url or "",
        mask_field=mask_field or "", objects_where=objects_where)
    return Rpc("query", "Export", request)


def rpc_take(collection: str, ids: str | Iterable[str], columns: Iterable[str] | None) -> Rpc:
    request = query_pb2.TakeRequest(collection=collection, ids=_ids(ids), columns=_columns(columns))
    return Rpc("query", "Take", request, page_to_table)


def rpc_delete(collection: str, ids: str | Iterable[str] | None, where: str | None,
               params: Mapping[str, Any] | None = None) -> Rpc:
    where = bound(where, params)
    if (ids is None) == (not where):
        raise invalid("delete: give exactly one of ids, where")
    if ids is not None:
        ids = _ids(ids)
        if not ids:  # nothing to delete: no call
            return Rpc("ingest", "Delete", None, lambda _: 0)
    request = ingest_pb2.DeleteRequest(collection=collection, ids=ids or [], where=where or "")
    return Rpc("ingest", "Delete", request, lambda r: int(r.deleted))


def rpc_start_job(kind: str, collection: str, params: Mapping[str, Any] | None) -> Rpc:
    request = jobs_pb2.StartJobRequest(kind=kind, collection=collection,
                                       params=dict_to_struct(params))
    return Rpc("jobs", "StartJob", request, jobs=True)


def rpc_optimize(collection: str, cleanup_older_than_s: float | None) -> Rpc:
    return rpc_start_job("optimize", collection, {"cleanup_older_than_s": cleanup_older_than_s})


def rpc_build_index(collection: str, space: str, kind: str | None) -> Rpc:
    return rpc_start_job("build_index", collection, {"space": space, "kind": kind})


def rpc_recall_check(collection: str, space: str, queries: int, k: int, where: str | None,
                     tune: bool, where_params: Mapping[str, Any] | None = None) -> Rpc:
    params = {"space": space, "queries": queries, "k": k, "where": bound(where, where_params),
              "tune": tune}
    return rpc_start_job("recall_check", collection, params)


REINDEX_PARAMS = ("model", "clip_model", "clip_pretrained", "source", "where", "batch_rows", "engine",
                  "ray_address", "ray_workers", "restart", "build_index")


def rpc_reindex(collection: str, space: str, params: Mapping[str, Any],
                where_params: Mapping[str, Any] | None = None) -> Rpc:
    unknown = sorted(set(params) - set(REINDEX_PARAMS))
    if unknown:
        raise invalid(f"reindex: unknown parameter(s) {', '.join(unknown)} "
                      f"(allowed: {', '.join(REINDEX_PARAMS)})")
    params = dict(params)
    if where_params is not None:
        params["where"] = bound(params.get("where"), where_params)
    return rpc_start_job("reindex", collection, {"space": space, **params})


def rpc_job(method: str, job_id: str, *, wrap: bool = False) -> Rpc:
    """GetJob, CancelJob or WatchJob; ``wrap``: answer a Job/AsyncJob, not the record."""
    return Rpc("jobs", method, jobs_pb2.JobRef(job_id=job_id), jobs=wrap)


def _job_state(state: str | int) -> int:
    if isinstance(state, str):
        try:
            return jobs_pb2.JobState.Value(state.upper())
        except ValueError:
            known = ", ".join(jobs_pb2.JobState.keys()[1:])
            raise invalid(f"unknown job state {state!r} (known: {known})") from None
    return int(state)


def rpc_list_jobs(collection: str | None, states: Iterable[str | int] | None, limit: int) -> Rpc:
    request = jobs_pb2.ListJobsRequest(collection=collection or "", limit=limit,
                                       states=[_job_state(s) for s in states or ()])
    return Rpc("jobs", "ListJobs", request, lambda r: list(r.jobs), jobs=True)


def _miner_dict(miner: mining_pb2.MinerInfo) -> dict[str, Any]:
    """A MinerInfo as a dict; an int parameter's default and bounds as ints (a protobuf
    Value holds numbers as doubles)."""
    out = message_to_dict(miner)
    for param in out.get("params", []):
        if param.get("type") == "int":
            for key in ("default", "min", "max"):
                if isinstance(param.get(key), float) and param[key].is_integer():
                    param[key] = int(param[key])
    return out


def rpc_list_miners() -> Rpc:
    return Rpc("mining", "ListMiners", mining_pb2.ListMinersRequest(),
               lambda r: [_miner_dict(m) for m in r.miners])


#: The fields a mining run is asked for with (``StartMiningRequest``; the server's RunSpec).
RUN_FIELDS: Final = tuple(f.name for f in mining_pb2.StartMiningRequest.DESCRIPTOR.fields)


def rpc_start_mining(collection: str, miner: str, size: int, *,
                     where_params: Mapping[str, Any] | None = None, **run: Any) -> Rpc:
    """StartMining: ``run`` holds the other ``StartMiningRequest`` fields by name (``model``,
    ``space``, ``where``, ``reference_where``, ``params``, ``seed``, ``reverse``,
    ``version``...); None leaves a field at the server's default. ``where_params`` are
    bound into ``where`` and ``reference_where`` (each placeholder may appear in either;
    every param must be used by one of them)."""
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        raise invalid(f"size must be a positive integer, got {size!r}")
    unknown = sorted(set(run) - set(RUN_FIELDS))
    if unknown:
        raise invalid(f"mine: unknown run field(s) {', '.join(unknown)} (fields: {', '.join(RUN_FIELDS)})")
    if where_params is not None:
        run["where"], run["reference_where"] = bind_two(run.get("where"), run.get("reference_where"),
                                                        where_params)
    run = {k: v for k, v in run.items() if v is not None}
    if "params" in run:
        run["params"] = dict_to_struct(run["params"])
    request = _message(mining_pb2.StartMiningRequest, "mine", collection=collection, miner=miner, size=size,
                       **run)
    return Rpc("mining", "StartMining", request)


def rpc_rerun(run: Mapping[str, Any]) -> Rpc:
    """StartMining with a recorded run's fields (:func:`run_to_dict`), on the version it read."""
    fields = {name: run.get(name) for name in RUN_FIELDS if name not in ("collection", "miner", "size")}
    return rpc_start_mining(run["collection"], run["miner"], int(run["size"]), **fields)


def rpc_run(method: str, run_id: str) -> Rpc:
    """GetRun or CancelRun: the MiningRun message."""
    return Rpc("mining", method, mining_pb2.RunRef(run_id=run_id))


def rpc_list_runs(collection: str | None, limit: int) -> Rpc:
    request = mining_pb2.ListRunsRequest(collection=collection or "", limit=limit)
    return Rpc("mining", "ListRuns", request, lambda r: [run_to_dict(run) for run in r.runs])


def rpc_run_results(run_id: str, columns: Iterable[str] | None, page_rows: int) -> Rpc:
    request = mining_pb2.RunResultsRequest(run_id=run_id, columns=_columns(columns), page_rows=page_rows)
    return Rpc("mining", "RunResults", request, page_to_table)


def run_to_dict(run: mining_pb2.MiningRun) -> dict[str, Any]:
    """A MiningRun as a plain dict, the state as its name and the parameters with their
    JSON types (integers stay integers: ``params_json``)."""
    out = message_to_dict(run)
    out["state"] = jobs_pb2.JobState.Name(run.state)
    text = out.pop("params_json", "")
    if text:
        out["params"] = json.loads(text)
    out.pop("job", None)
    return out


def rpc_health(service: str) -> Rpc:
    return Rpc("health", "Check", health_pb2.HealthCheckRequest(service=service),
               lambda r: health_pb2.HealthCheckResponse.ServingStatus.Name(r.status))


# -- datasets (requests) ---------------------------------------------------------------------


def _dataset_dict(message: Message) -> dict[str, Any]:
    out = message_to_dict(message)
    if "tags" in out and isinstance(out["tags"], dict):
        out["tags"] = {k: int(v) for k, v in out["tags"].items()}
    return out


def rpc_create_dataset(name: str, collection: str, description: str) -> Rpc:
    request = _message(datasets_pb2.CreateDatasetRequest, "create_dataset", name=name,
                       collection=collection, description=description)
    return Rpc("datasets", "CreateDataset", request, _dataset_dict)


def rpc_dataset(method: str, name: str, parse: Callable[[Any], Any] = _dataset_dict) -> Rpc:
    """GetDataset, GetStatus, Discard or History: the calls that take a DatasetRef."""
    return Rpc("datasets", method, datasets_pb2.DatasetRef(name=name), parse)


def rpc_list_datasets(collection: str | None) -> Rpc:
    request = datasets_pb2.ListDatasetsRequest(collection=collection or "")
    return Rpc("datasets", "ListDatasets", request,
               lambda r: [_dataset_dict(d) for d in r.datasets])


def rpc_delete_dataset(name: str, force: bool) -> Rpc:
    request = datasets_pb2.DeleteDatasetRequest(name=name, force=force)
    return Rpc("datasets", "DeleteDataset", request, lambda _: None)


def rpc_members(method: str, dataset: str, ids: str | Iterable[str] | None, where: str | None,
                run_id: Any, params: Mapping[str, Any] | None = None) -> Rpc:
    """AddMembers or RemoveMembers: exactly one of ids, where, run_id (or a MiningJob)."""
    run_id = _run_id(run_id)
    _one_of("add" if method == "AddMembers" else "remove", ids=ids, where=where, run_id=run_id)
    request = datasets_pb2.MembersRequest(
        dataset=dataset, ids=_some_ids(ids, f"dataset {method}"),
        where=bound(where, params) or "", run_id=run_id or "")
    return Rpc("datasets", method, request, message_to_dict)


def rpc_commit(dataset: str, message: str, author: str, allow_empty: bool) -> Rpc:
    request = _message(datasets_pb2.CommitRequest, "commit", dataset=dataset, message=message,
                       author=author, allow_empty=allow_empty)
    return Rpc("datasets", "Commit", request, message_to_dict)


def rpc_tag_version(dataset: str, version: int | str, tag: str) -> Rpc:
    if version is None:
        raise invalid("tag: give the version to tag (a number, 'HEAD' or a tag)")
    request = _message(datasets_pb2.TagVersionRequest, "tag", dataset=dataset,
                       version=_version(version), tag=tag)
    return Rpc("datasets", "TagVersion", request, lambda r: int(r.version))


def rpc_checkout(dataset: str, version: int | str | None, columns: Iterable[str] | None,
                 page_rows: int) -> Rpc:
    request = _message(datasets_pb2.CheckoutRequest, "checkout", dataset=dataset,
                       version=_version(version), columns=_columns(columns), page_rows=page_rows)
    return Rpc("datasets", "Checkout", request, page_to_table)


def _ids_of(page: common_pb2.ArrowPage) -> list[str]:
    table = page_or_empty(page)
    return table.column("id").to_pylist() if "id" in table.column_names else []


def parse_diff(response: datasets_pb2.DiffResponse) -> dict[str, Any]:
    relabeled = page_or_empty(response.relabeled)
    if not relabeled.column_names:
        relabeled = pa.table({c: pa.array([], pa.string())
                              for c in ("id", "label_before", "label_after")})
    return {"dataset": response.dataset, "added": _ids_of(response.added),
            "removed": _ids_of(response.removed), "relabeled": relabeled}


def rpc_diff(dataset: str, v1: int | str | None, v2: int | str | None) -> Rpc:
    if v1 is None:
        raise invalid("diff: give v1 (a committed version, 'HEAD' or a tag)")
    request = datasets_pb2.DiffRequest(dataset=dataset, v1=_version(v1, "v1"),
                                       v2=_version(v2, "v2"))
    return Rpc("datasets", "Diff", request, parse_diff)


# -- scoring: Score / Calibrate / ExportScorer (pure parts) --------------------------------


SCORER_OPTIONS: Final = ("k", "novelty", "how", "logits_temperature", "energy_temperature",
                         "detection_method", "detection_aggregate", "nms_iou", "version")


def _thresholds(thresholds: Any) -> dict[str, float]:
    """``{score: threshold}``, or what :meth:`Collection.calibrate` returned."""
    if thresholds is None:
        return {}
    if isinstance(thresholds, Mapping) and isinstance(thresholds.get("thresholds"), Mapping):
        thresholds = thresholds["thresholds"]
    if not isinstance(thresholds, Mapping):
        raise invalid(f"thresholds must be a dict {{score: threshold}}, got {type(thresholds).__name__}")
    try:
        return {str(k): float(v) for k, v in thresholds.items()}
    except (TypeError, ValueError) as exc:
        raise invalid(f"thresholds must be numbers: {exc}") from None


def scorer_spec(collection: str, *, model: str | None = None, space: str | None = None,
                reference_where: str | None = None, thresholds: Any = None,
                **options: Any) -> scoring_pb2.ScorerSpec:
    """What items are scored against: ``model`` (its classes), ``space`` and the reference
    set ``reference_where`` (novelty), ``thresholds`` (keep/drop) and :data:`SCORER_OPTIONS`."""
    unknown = sorted(set(options) - set(SCORER_OPTIONS))
    if unknown:
        raise invalid(f"unknown scoring option(s) {', '.join(unknown)} (options: {', '.join(SCORER_OPTIONS)})")
    return _message(scoring_pb2.ScorerSpec, "scoring spec", collection=collection, model=model or "",
                    space=space or "", reference_where=reference_where or "",
                    thresholds=_thresholds(thresholds), **options)


def score_requests(spec: scoring_pb2.ScorerSpec, tables: Iterable[pa.Table], batch_rows: int
                   ) -> Iterator[tuple[int, scoring_pb2.ScoreRequest]]:
    """(rows, request) per batch of at most ``batch_rows`` items; the first carries the spec."""
    if batch_rows < 1:
        raise invalid(f"batch_rows must be >= 1, got {batch_rows}")
    seq = 0
    for table in tables:
        for start in range(0, max(1, table.num_rows), batch_rows):
            chunk = table.slice(start, batch_rows)
            request = scoring_pb2.ScoreRequest(seq=seq, arrow_ipc=table_to_ipc(chunk))
            if seq == 0:
                request.spec.CopyFrom(spec)
            seq += 1
            yield chunk.num_rows, request


def _criteria(criteria: str | Iterable[str] | None) -> list[str]:
    if criteria is None:
        return []
    return [criteria] if isinstance(criteria, str) else list(criteria)


def parse_calibration(response: scoring_pb2.CalibrateResponse) -> dict[str, Any]:
    return {"thresholds": dict(response.thresholds), "budget": response.budget,
            "kept_fraction": response.kept_fraction, "rows": int(response.rows),
            "version": int(response.version), "criteria": list(response.criteria)}


def rpc_calibrate(spec: scoring_pb2.ScorerSpec, budget: float, where: str | None,
                  criteria: str | Iterable[str] | None, max_rows: int, seed: int) -> Rpc:
    request = _message(scoring_pb2.CalibrateRequest, "calibrate", spec=spec, where=where or "",
                       budget=budget, criteria=_criteria(criteria), max_rows=max_rows, seed=seed)
    return Rpc("scoring", "Calibrate", request, parse_calibration)


def scorer_format(path: str | os.PathLike[str], format: str | None) -> str:  # noqa: A002
    fmt = format or ("json" if os.fspath(path).lower().endswith(".json") else "npz")
    if fmt not in ("npz", "json"):
        raise invalid(f"scorer bundle format must be 'npz' or 'json', got {fmt!r}")
    return fmt


def rpc_export_scorer(spec: scoring_pb2.ScorerSpec, fmt: str, budget: float, where: str | None,
                      criteria: str | Iterable[str] | None, max_rows: int, seed: int, reference: str,
                      reference_size: int) -> Rpc:
    request = _message(scoring_pb2.ExportScorerRequest, "export_scorer", spec=spec, where=where or "",
                       budget=budget, criteria=_criteria(criteria), max_rows=max_rows, seed=seed,
                       reference=reference, reference_size=reference_size, format=fmt)
    return Rpc("scoring", "ExportScorer", request)
