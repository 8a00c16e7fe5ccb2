"""gRPC servicers: translate assay.v1 messages to store calls and back.

Every method raises :class:`indexing.errors.AssayError` subclasses for bad requests; the
interceptor (:mod:`service.interceptor`) turns them into gRPC statuses. Nothing here holds
state beyond the shared :class:`~indexing.store.Store` (one handle per table), the job
manager and the lazily loaded text embedders.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import os
import threading
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import grpc
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from google.protobuf import json_format

from indexing.errors import FailedPrecondition, InvalidArgument, NotFound, ResourceExhausted
from indexing.filters import with_objects
from indexing.schema import IndexPolicy, ModelSpec, SpaceSpec, light_columns
from indexing.settings import EXPORT_CHUNK_BYTES as _EXPORT_CHUNK
from indexing.settings import UPSERT_READ_AHEAD_BYTES, server_default
from indexing.store import READ_VERSION_KEY, Collection, Store
from protos.assay.v1 import (
    collections_pb2,
    collections_pb2_grpc,
    common_pb2,
    ingest_pb2,
    ingest_pb2_grpc,
    jobs_pb2,
    jobs_pb2_grpc,
    query_pb2,
    query_pb2_grpc,
    search_pb2,
    search_pb2_grpc,
)
from service.arrow_ipc import ipc_to_table, table_to_ipc
from service.boxes import BOX_KINDS, box_table
from service.datasets import version_arg
from service.jobs import JobManager, JobRecord


@dataclass(frozen=True)
class Limits:
    """Per-request limits (defaults and variables: :mod:`indexing.settings`)."""

    max_k: int = server_default("max_k")
    max_batch_rows: int = server_default("max_batch_rows")
    max_page_rows: int = server_default("max_page_rows")
    max_queries: int = server_default("max_queries")


# -- conversions ---------------------------------------------------------------------

def space_from_proto(msg: common_pb2.SpaceSpec) -> SpaceSpec:
    defaults = IndexPolicy()
    p = msg.index
    policy = IndexPolicy(
        kind=p.kind or defaults.kind,
        auto_kind=p.auto_kind or defaults.auto_kind,
        threshold_rows=p.threshold_rows or None,  # 0: by dimension
        num_partitions=p.num_partitions or None,
        num_bits=p.num_bits or defaults.num_bits,
        nprobes=p.nprobes or defaults.nprobes,
        refine_factor=p.refine_factor or defaults.refine_factor,
        target_recall=p.target_recall or defaults.target_recall,
    )
    metric = msg.metric or "cosine"
    normalized = msg.normalized if msg.HasField("normalized") else metric == "cosine"
    return SpaceSpec(name=msg.name, dim=int(msg.dim), metric=metric, model=msg.model or None,
                     normalized=normalized, index=policy)


def space_to_proto(spec: SpaceSpec) -> common_pb2.SpaceSpec:
    p = spec.index
    return common_pb2.SpaceSpec(
        name=spec.name, dim=spec.dim, metric=spec.metric, model=spec.model or "", normalized=spec.normalized,
        index=common_pb2.IndexPolicy(
            kind=p.kind, auto_kind=p.auto_kind, threshold_rows=p.threshold_rows or 0,
            num_partitions=p.num_partitions or 0, num_bits=p.num_bits, nprobes=p.nprobes,
            refine_factor=p.refine_factor, target_recall=p.target_recall,
        ),
    )


def model_from_proto(msg: common_pb2.ModelSpec) -> ModelSpec:
    # proto3 zeros mean "not set": the segmentation settings' defaults (and no box embedding)
    options = {k: v for k, v in (("top_q", msg.top_q), ("uncertain_threshold", msg.uncertain_threshold),
                                 ("map_size", int(msg.map_size)),
                                 ("box_embedding_dim", int(msg.box_embedding_dim))) if v}
    return ModelSpec(name=msg.name, classes=tuple(msg.classes), task=msg.task or "classification", **options)


def model_to_proto(spec: ModelSpec) -> common_pb2.ModelSpec:
    return common_pb2.ModelSpec(name=spec.name, classes=list(spec.classes), task=spec.task, **spec.settings())


def collection_info(col: Collection) -> collections_pb2.CollectionInfo:
    d = col.describe()
    spaces = []
    for name, spec in col.spaces.items():
        idx = d["spaces"][name]["index"]
        info = collections_pb2.SpaceInfo(spec=space_to_proto(spec))
        if idx is not None:
            info.index.CopyFrom(collections_pb2.IndexInfo(
                name=f"{spec.column}_idx", type=idx["type"], columns=[spec.column],
                indexed_rows=idx["indexed_rows"] or 0, unindexed_rows=idx["unindexed_rows"] or 0))
        spaces.append(info)
    return collections_pb2.CollectionInfo(
        name=d["name"], uri=d["uri"], rows=d["rows"], version=d["version"], fragments=d["fragments"],
        spaces=spaces,
        models=[model_to_proto(m) for m in col.models.values()],
        fields=d["fields"],
        indices=[collections_pb2.IndexInfo(name=i["name"], type=i["type"], columns=i["columns"])
                 for i in d["indices"]],
        tags=d["tags"],
        reindexing=[collections_pb2.ReindexState(
            space=space, model=r.get("model", ""), source=r.get("source", ""), where=r.get("where", ""),
            rows_done=r["rows_done"], started_us=int(r.get("started_us", 0)))
            for space, r in d["reindexing"].items()],
    )


_ARROW_TYPES = {
    "string": pa.string(), "utf8": pa.string(), "bool": pa.bool_(), "int8": pa.int8(), "int16": pa.int16(),
    "int32": pa.int32(), "int64": pa.int64(), "uint8": pa.uint8(), "uint16": pa.uint16(), "uint32": pa.uint32(),
    "uint64": pa.uint64(), "float32": pa.float32(), "float": pa.float32(), "float64": pa.float64(),
    "double": pa.float64(), "date32": pa.date32(), "timestamp[us, tz=UTC]": pa.timestamp("us", tz="UTC"),
    "timestamp[us]": pa.timestamp("us"), "timestamp[ms]": pa.timestamp("ms"),
}


def arrow_type(name: str, field: str) -> pa.DataType:
    if name not in _ARROW_TYPES:
        raise InvalidArgument(f"field '{field}': unknown type '{name}' (known: {', '.join(_ARROW_TYPES)})")
    return _ARROW_TYPES[name]


def job_to_proto(rec: JobRecord) -> jobs_pb2.Job:
    job = jobs_pb2.Job(
        id=rec.id, kind=rec.kind, collection=rec.collection, state=jobs_pb2.JobState.Value(rec.state),
        progress=rec.progress, message=rec.message, error=rec.error, error_code=rec.error_code,
        created_at=rec.created_at, started_at=rec.started_at, finished_at=rec.finished_at,
    )
    job.params.update(_jsonable(rec.params))
    job.result.update(_jsonable(rec.result))
    return job


def _jsonable(d: dict[str, Any]) -> dict[str, Any]:
    """google.protobuf.Struct takes JSON types only: convert numpy scalars, stringify the rest."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, np.generic):
            v = v.item()
        if isinstance(v, dict):
            v = _jsonable(v)
        elif isinstance(v, list | tuple):
            v = [x.item() if isinstance(x, np.generic) else x for x in v]
        elif v is not None and not isinstance(v, str | int | float | bool):
            v = str(v)
        out[k] = v
    return out


def struct_params(request: Any) -> dict[str, Any]:
    """A request's ``params`` Struct as a dict. A Struct may carry NaN or infinity, which
    JSON (and so the parameter record) cannot hold: INVALID_ARGUMENT naming the parameter."""
    if not request.HasField("params"):
        return {}
    try:
        return json_format.MessageToDict(request.params)
    except ValueError as exc:
        bad = [k for k, v in request.params.fields.items() if not _finite_value(v)]
        raise InvalidArgument(f"parameter(s) {', '.join(sorted(bad)) or '?'}: NaN and infinity are not "
                              f"valid values ({exc})") from None


def _finite_value(value: Any) -> bool:
    kind = value.WhichOneof("kind")
    if kind == "number_value":
        return bool(np.isfinite(value.number_value))
    if kind == "list_value":
        return all(_finite_value(v) for v in value.list_value.values)
    if kind == "struct_value":
        return all(_finite_value(v) for v in value.struct_value.fields.values())
    return True


def _columns(req_columns: Any) -> list[str] | None:
    return list(req_columns) or None


def _empty_page(col: Collection, version: int | None, columns: list[str] | None) -> pa.Table:
    """No rows, with the columns of the version read (not a query with limit=0: Lance reads
    that as "no limit", and it would read the current version)."""
    table = col.table if version is None else col.at_version(version)
    names = columns or light_columns(table.schema)
    return pa.schema([table.schema.field(c) for c in names]).empty_table()


# -- servicers -------------------------------------------------------------------------

class CollectionsServicer(collections_pb2_grpc.CollectionsServicer):
    def __init__(self, store: Store, datasets: Any = None) -> None:
        self.store = store
        self.datasets = datasets

    def CreateCollection(self, request, context):  # noqa: N802 — gRPC method names
        for what, names in (("space", [s.name for s in request.spaces]), ("model", [m.name for m in request.models])):
            dup = sorted({n for n in names if names.count(n) > 1})
            if dup:
                raise InvalidArgument(f"{what} name(s) given more than once: {', '.join(dup)}")
        col = self.store.create_collection(
            request.collection,
            spaces={s.name: space_from_proto(s) for s in request.spaces},
            models={m.name: model_from_proto(m) for m in request.models},
            fields={k: arrow_type(v, k) for k, v in request.fields.items()},
            exist_ok=request.if_not_exists,
        )
        return collection_info(col)

    def DescribeCollection(self, request, context):  # noqa: N802
        return collection_info(self.store.collection(request.collection))

    def ListCollections(self, request, context):  # noqa: N802
        return collections_pb2.ListCollectionsResponse(collections=self.store.list_collections())

    def DropCollection(self, request, context):  # noqa: N802
        self.store.collection(request.collection)  # NOT_FOUND first
        if self.datasets is not None:
            users = [d.name for d in self.datasets.list(request.collection)]
            if users:
                raise FailedPrecondition(
                    f"collection '{request.collection}' is used by dataset(s) {', '.join(users)}: "
                    "delete them first (their commits pin versions of it)")
        self.store.drop_collection(request.collection)
        return collections_pb2.DropCollectionResponse()

    def AddSpace(self, request, context):  # noqa: N802
        col = self.store.collection(request.collection)
        spec = space_from_proto(request.space)
        col.add_space(spec.name, spec.dim, metric=spec.metric, model=spec.model, normalized=spec.normalized,
                      index=spec.index)
        return collection_info(col)

    def AddModel(self, request, context):  # noqa: N802
        col = self.store.collection(request.collection)
        spec = model_from_proto(request.model)
        col.add_model(spec.name, spec.classes, task=spec.task, **spec.settings())
        return collection_info(col)


class _ReadAhead:
    """What ``items`` yields, produced ahead in a helper thread while the consumer works:
    up to ``budget_bytes`` of items (``size`` of each; always at least one) wait. Iterate it
    as ``items``; :meth:`ready` also hands over, without waiting, the items that are
    already there. An exception is raised where the item it replaced would have been.
    Leaving the loop early (or :meth:`close`) stops the helper at its next item."""

    _DONE = object()

    def __init__(self, items: Iterator[Any], size: Callable[[Any], int], budget_bytes: int) -> None:
        self._items, self._size, self._budget = items, size, budget_bytes
        self._buffer: deque[tuple[Any, BaseException | None, int]] = deque()
        self._held = 0  # bytes of the items waiting in the buffer
        self._cv = threading.Condition()
        self._stopped = False
        threading.Thread(target=self._produce, name="assay-read-ahead", daemon=True).start()

    def _produce(self) -> None:
        try:
            for item in self._items:
                nbytes = self._size(item)
                with self._cv:
                    while self._buffer and self._held + nbytes > self._budget and not self._stopped:
                        self._cv.wait(0.1)
                    if self._stopped:
                        return
                    self._buffer.append((item, None, nbytes))
                    self._held += nbytes
                    self._cv.notify_all()
            self._put(self._DONE, None)
        except BaseException as exc:  # handed to the consumer, in order
            self._put(None, exc)

    def _put(self, item: Any, exc: BaseException | None) -> None:
        with self._cv:
            self._buffer.append((item, exc, 0))
            self._cv.notify_all()

    def _take(self, wait: bool) -> Any:
        """The next item; ``_DONE`` at the end (and, without ``wait``, when none is there)."""
        with self._cv:
            while not self._buffer:
                if not wait:
                    return self._DONE
                self._cv.wait()
            item, exc, nbytes = self._buffer[0]
            if exc is not None or item is self._DONE:
                if not wait:  # left for the next blocking take, in order
                    return self._DONE
                if exc is not None:
                    self._buffer.popleft()
                    raise exc
                return self._DONE
            self._buffer.popleft()
            self._held -= nbytes
            self._cv.notify_all()
            return item

    def __iter__(self) -> Iterator[Any]:
        try:
            while (item := self._take(wait=True)) is not self._DONE:
                yield item
        finally:
            self.close()

    def ready(self) -> list[Any]:
        """The items produced already (possibly none), without waiting."""
        out = []
        while (item := self._take(wait=False)) is not self._DONE:
            out.append(item)
        return out

    def close(self) -> None:
        with self._cv:
            self._stopped = True
            self._cv.notify_all()


def _in_batch(seq: int, exc: BaseException) -> BaseException:
    """``exc`` naming the upsert batch it failed (the caller's errors: bad data, a missing
    collection, a refused write; caused by ``exc``); any other error as it is."""
    if isinstance(exc, (InvalidArgument, NotFound, FailedPrecondition)):
        labelled = type(exc)(f"batch {seq}: {exc.message}", field=exc.field, row=exc.row)
        labelled.__cause__ = exc
        return labelled
    return exc


@dataclass(frozen=True)
class UpsertMessage:
    """An ``UpsertRequest`` as :func:`read_upsert_request` reads it: ``arrow_ipc`` is a view
    of the bytes gRPC received, not a copy."""

    collection: str
    seq: int
    arrow_ipc: memoryview


def _varint_at(data: bytes, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        byte = data[pos]  # IndexError past the end: truncated
        pos += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, pos
        shift += 7
        if shift >= 70:
            raise ValueError("varint longer than 10 bytes")


def read_upsert_request(data: bytes) -> UpsertMessage | ingest_pb2.UpsertRequest:
    """The request deserializer of ``Ingest.Upsert`` and ``UpsertBatch``: ``UpsertRequest``
    (``collection`` = 1, ``seq`` = 2, ``arrow_ipc`` = 3) read from its wire bytes with the
    Arrow payload left in place. protobuf's parser copies the payload twice, into the message and again into a new
    ``bytes`` when the field is read: 54 + 38 ms for a 50,000 x 384 batch (80 MB) here, server
    CPU on the ingest's path. Fields in any order, repeated ones (the last wins) and unknown
    ones (skipped by wire type) read as protobuf reads them; anything malformed (truncated,
    field 0, a group, a collection that is not UTF-8) goes to protobuf's own parser, which
    raises its ``DecodeError`` as before."""
    view = memoryview(data)
    collection, seq, payload = "", 0, view[0:0]
    pos, end = 0, len(data)
    try:
        while pos < end:
            key, pos = _varint_at(data, pos)
            number, wire = key >> 3, key & 7
            if number == 0:
                raise ValueError("field number 0")
            if wire == 0:
                value, pos = _varint_at(data, pos)
                if number == 2:
                    seq = value & 0xFFFFFFFFFFFFFFFF
            elif wire == 2:
                length, pos = _varint_at(data, pos)
                if pos + length > end:
                    raise ValueError("truncated field")
                if number == 1:
                    collection = bytes(view[pos:pos + length]).decode("utf-8")
                elif number == 3:
                    payload = view[pos:pos + length]
                pos += length
            elif wire in (1, 5):
                pos += 8 if wire == 1 else 4
                if pos > end:
                    raise ValueError("truncated field")
            else:
                raise ValueError(f"wire type {wire}")
    except (ValueError, IndexError, UnicodeDecodeError):
        return ingest_pb2.UpsertRequest.FromString(data)
    return UpsertMessage(collection, seq, payload)


class _Registration:
    """Stands in for the server while a generated ``add_*Servicer_to_server`` runs, to take
    its method handlers (one of them is then given another deserializer)."""

    def add_generic_rpc_handlers(self, handlers: Any) -> None:
        pass

    def add_registered_method_handlers(self, service: str, handlers: dict[str, Any]) -> None:
        self.service, self.handlers = service, handlers


def _add_ingest_servicer(servicer: IngestServicer, server: grpc.Server) -> None:
    """The generated registration of ``Ingest``, with :func:`read_upsert_request` as
    ``Upsert``'s request deserializer (the methods, serializers and the rest as generated)."""
    reg = _Registration()
    ingest_pb2_grpc.add_IngestServicer_to_server(servicer, reg)
    handlers = dict(reg.handlers)
    for method in ("Upsert", "UpsertBatch"):
        handlers[method] = handlers[method]._replace(request_deserializer=read_upsert_request)
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(reg.service, handlers),))
    server.add_registered_method_handlers(reg.service, handlers)


def _upsert_ack(seq: int, res: Any) -> ingest_pb2.UpsertAck:
    """The acknowledgement of batch ``seq``; the batch's error (``res``) raised instead."""
    if isinstance(res, BaseException):
        raise _in_batch(seq, res)
    return ingest_pb2.UpsertAck(seq=seq, inserted=res.inserted, updated=res.updated, version=res.version,
                                generated_ids=res.generated_ids, new_columns=res.new_columns,
                                assigned_ids=res.assigned_ids, assigned_rows=res.assigned_rows)


class IngestServicer(ingest_pb2_grpc.IngestServicer):
    def __init__(self, store: Store, limits: Limits, *,
                 run_ids: Callable[[str, str], pa.Array] | None = None) -> None:
        self.store = store
        self.limits = limits
        self.run_ids = run_ids

    def Upsert(self, request_iterator, context):  # noqa: N802
        # The next batches are received and validated (in a helper thread, up to
        # UPSERT_READ_AHEAD_BYTES of them) while the last commit runs; those that arrived
        # meanwhile go out together in the next commit. A bulk ingest so overlaps receiving
        # with writing, and writes fragments of several messages each: one fragment per
        # message (a 50k x 384 batch over the 64 MiB message limit arrives as two) left
        # fragments that maintenance then merged, rewriting the ingest under it.
        # Acknowledgements stay per batch and in order; a failed commit fails every batch in
        # it. (One case writes a batch after a failed one: a batch whose re-validation in the
        # commit fails — another writer gave a column it adds another type meanwhile — fails
        # alone, and the batches after it in that commit are written, unacknowledged.)
        ahead = _ReadAhead(self._validated(request_iterator), size=lambda item: item[2].nbytes,
                           budget_bytes=UPSERT_READ_AHEAD_BYTES)
        for first in ahead:
            group = [first, *ahead.ready()]
            results = group[0][1].upsert_prepared_many([(table, prepared) for _, _, table, prepared in group])
            for (seq, _, _, _), res in zip(group, results, strict=True):
                yield _upsert_ack(seq, res)

    def UpsertBatch(self, request, context):  # noqa: N802
        # One message of Upsert, without the stream: no request iterator, no read-ahead
        # thread and no response iterator, which a 20-row write otherwise pays for in
        # thread hand-offs on both sides. It still shares commits with concurrent writers.
        ((seq, col, table, prepared),) = self._validated(iter([request]))
        (res,) = col.upsert_prepared_many([(table, prepared)])
        return _upsert_ack(seq, res)

    def _validated(self, request_iterator: Iterator[Any]) -> Iterator[tuple[int, Collection, pa.Table, Any]]:
        """(seq, collection, table, validated batch) of each upsert message, in order."""
        col: Collection | None = None
        for request in request_iterator:
            if col is None:
                if not request.collection:
                    raise InvalidArgument("the first upsert message must name the collection")
                col = self.store.collection(request.collection)
            elif request.collection and request.collection != col.name:
                raise InvalidArgument(
                    f"batch {request.seq}: one upsert stream writes one collection ('{col.name}'), "
                    f"got '{request.collection}'")
            try:
                table = ipc_to_table(request.arrow_ipc)
            except ValueError as exc:
                raise InvalidArgument(f"batch {request.seq}: arrow_ipc is not a valid Arrow IPC stream ({exc})") from exc
            if table.num_rows > self.limits.max_batch_rows:
                raise ResourceExhausted(
                    f"batch {request.seq}: {table.num_rows} rows; the limit is {self.limits.max_batch_rows} "
                    "rows per batch (split it)")
            try:
                prepared = col.prepare(table)
            except (InvalidArgument, NotFound, FailedPrecondition) as exc:
                raise _in_batch(request.seq, exc) from exc
            yield request.seq, col, table, prepared

    def Delete(self, request, context):  # noqa: N802
        col = self.store.collection(request.collection)
        if request.ids and request.where:
            raise InvalidArgument("delete takes ids or where, not both")
        if request.ids:
            deleted, version = col.delete(ids=list(request.ids))
        elif request.where:
            deleted, version = col.delete(where=request.where)
        else:
            raise InvalidArgument("delete needs ids or where")
        return ingest_pb2.DeleteResponse(deleted=deleted, version=version)

    def TagItems(self, request, context):  # noqa: N802
        col = self.store.collection(request.collection)
        if sum([bool(request.ids), bool(request.where), bool(request.run_id)]) != 1:
            raise InvalidArgument("tag items by exactly one of ids, where or run_id")
        ids = list(request.ids) or None
        if request.run_id:
            if self.run_ids is None:
                raise FailedPrecondition("mining runs are not available on this server")
            ids = self.run_ids(request.run_id, col.name).to_pylist()
            if not ids:
                return ingest_pb2.TagItemsResponse(rows=0, version=col.version)
        elif ids is not None and len(ids) > self.limits.max_batch_rows:
            raise ResourceExhausted(f"{len(ids)} ids; the limit is {self.limits.max_batch_rows} per call")
        rows, version = col.tag_rows(ids=ids, where=request.where or None, add=list(request.add),
                                     remove=list(request.remove))
        return ingest_pb2.TagItemsResponse(rows=rows, version=version)


class _ClipTextTower:
    """A CLIP model's text tower behind the ``embed(texts)`` of a text embedder."""

    def __init__(self, clip: Any) -> None:
        self.clip = clip

    @property
    def dim(self) -> int:
        return self.clip.dim

    def embed(self, texts: Any) -> np.ndarray:
        return self.clip.embed_texts(texts)


class TextEmbedders:
    """The text embedder of each space, loaded once per model and shared by Search and Mining."""

    def __init__(self) -> None:
        self._embedders: dict[str, Any] = {}
        self._embedders_lock = threading.Lock()

    def for_space(self, spec: SpaceSpec) -> Any:
        model = spec.model or ""
        if not model.startswith(("sentence-transformers:", "open_clip:")):
            raise FailedPrecondition(
                f"space '{spec.name}' has no text embedder (its model is {model or 'not set'}); "
                "search it by vector or by ids, or create the space with model "
                "'sentence-transformers:<name or path>' or 'open_clip:<model>:<pretrained>'")
        with self._embedders_lock:
            if model not in self._embedders:
                from indexing.embedders import (
                    DEFAULT_TEXT_MODEL,
                    TextEmbedder,
                    embedder_for_identity,
                )

                if model.startswith("open_clip:"):
                    # Texts go through the CLIP text tower, into the space of the image vectors.
                    embedder: Any = _ClipTextTower(embedder_for_identity(model))
                else:
                    name = model.split(":", 1)[1]
                    embedder = TextEmbedder(None if name == DEFAULT_TEXT_MODEL else name)
                if embedder.dim != spec.dim:
                    raise FailedPrecondition(
                        f"space '{spec.name}' has dimension {spec.dim} but its model {model} embeds to {embedder.dim}")
                self._embedders[model] = embedder
            return self._embedders[model]


class SearchServicer(search_pb2_grpc.SearchServicer):
    def __init__(self, store: Store, limits: Limits, embedders: TextEmbedders) -> None:
        self.store = store
        self.limits = limits
        self.embedders = embedders

    def Search(self, request, context):  # noqa: N802
        col = self.store.collection(request.collection)
        spec = col.space(request.space)
        k = request.k or 10
        if k > self.limits.max_k:
            raise ResourceExhausted(f"k={k} exceeds the server limit max_k={self.limits.max_k}")
        which = request.WhichOneof("query")
        exclude: list[str] | None = None
        if which == "vectors":
            v = request.vectors
            if v.dim != spec.dim:
                raise InvalidArgument(f"vectors.dim is {v.dim}; space '{spec.name}' has dimension {spec.dim}")
            if len(v.values) == 0 or len(v.values) % v.dim:
                raise InvalidArgument(
                    f"vectors.values has {len(v.values)} numbers, not a positive multiple of dim {v.dim}")
            queries = np.asarray(v.values, dtype=np.float32).reshape(-1, v.dim)
        elif which == "ids":
            ids = list(request.ids.ids)
            if not ids:
                raise InvalidArgument("ids query is empty")
            found = col.take(ids, ["id", spec.column])
            have = dict(zip(found.column("id").to_pylist(), found.column(spec.column).to_pylist(), strict=True))
            missing = [i for i in ids if i not in have]
            if missing:
                raise NotFound(f"ids not found in '{col.name}': {', '.join(missing[:10])}")
            nulls = [i for i in ids if have[i] is None]
            if nulls:
                raise FailedPrecondition(f"ids without a vector in space '{spec.name}': {', '.join(nulls[:10])}")
            queries = np.asarray([have[i] for i in ids], dtype=np.float32)
            exclude = ids
        elif which == "texts":
            texts = list(request.texts.texts)
            if not texts or any(not t.strip() for t in texts):
                raise InvalidArgument("text queries must be non-empty strings")
            queries = self.embedders.for_space(spec).embed(texts)
        else:
            raise InvalidArgument("search needs a query: vectors, ids or texts")
        if len(queries) > self.limits.max_queries:
            raise ResourceExhausted(f"{len(queries)} queries in one call; the limit is {self.limits.max_queries}")
        columns = _columns(request.columns)
        fetch_k = k + 1 if exclude else k  # room to drop each query item from its own result
        wanted = columns if columns is None or "id" in columns else ["id", *columns]
        result = col.search(
            spec.name, queries, k=min(fetch_k, self.limits.max_k), where=request.where or None, columns=wanted,
            nprobes=request.nprobes or None, refine_factor=request.refine_factor or None, exact=request.exact,
        )
        # The version the search read (asking the table again costs a check of its latest
        # version: ~1 ms of CPU with 1,000 versions kept, 250-800 under a steady write load).
        version = int(result.schema.metadata[READ_VERSION_KEY])
        if exclude:
            own = pa.array([exclude[i] for i in result.column("query_index").to_pylist()], pa.string())
            result = result.filter(pc.not_equal(result.column("id"), own))
            keep = _first_k_per_query(result.column("query_index").to_numpy(), k)
            result = result.take(pa.array(keep, pa.int64()))
        if columns is not None and "id" not in columns:
            result = result.drop_columns(["id"])
        return search_pb2.SearchResponse(arrow_ipc=table_to_ipc(result), queries=len(queries), version=version)


def _first_k_per_query(query_index: np.ndarray, k: int) -> np.ndarray:
    """Row positions of the first k rows of each query (rows are sorted by query)."""
    if len(query_index) == 0:
        return np.zeros(0, dtype=np.int64)
    starts = np.r_[0, np.flatnonzero(np.diff(query_index)) + 1]
    rank = np.arange(len(query_index)) - np.repeat(starts, np.diff(np.r_[starts, len(query_index)]))
    return np.flatnonzero(rank < k)


class QueryServicer(query_pb2_grpc.QueryServicer):
    def __init__(self, store: Store, limits: Limits, *, datasets: Any = None,
                 run_ids: Callable[[str, str], pa.Array] | None = None,
                 run_scores: Callable[[str, str], tuple[pa.Table, str | None]] | None = None) -> None:
        self.store = store
        self.limits = limits
        self.datasets = datasets
        self.run_ids = run_ids
        self.run_scores = run_scores

    def Scan(self, request, context):  # noqa: N802
        col = self.store.collection(request.collection)
        page = request.page_rows or 8192
        if page > self.limits.max_page_rows:
            raise ResourceExhausted(f"page_rows={page} exceeds the server limit {self.limits.max_page_rows}")
        at = version_arg(request.version)
        version = col.version if at is None else int(col.at_version(at).version)
        columns = _columns(request.columns)
        sent = 0
        for batch in col.scan(request.where or None, columns, batch_size=page,
                              limit=request.limit or None, offset=request.offset,
                              version=None if at is None else version):
            if not context.is_active():
                return
            sent += 1
            yield common_pb2.ArrowPage(arrow_ipc=table_to_ipc(batch), rows=batch.num_rows, version=version)
        if not sent:  # nothing matched: one empty page still carries the schema
            empty = _empty_page(col, None if at is None else version, columns)
            yield common_pb2.ArrowPage(arrow_ipc=table_to_ipc(empty), rows=0, version=version)

    def Count(self, request, context):  # noqa: N802
        col = self.store.collection(request.collection)
        at = version_arg(request.version)
        version = col.version if at is None else int(col.at_version(at).version)
        count = col.count(request.where or None, version=None if at is None else version)
        return query_pb2.CountResponse(count=count, version=version)

    def Take(self, request, context):  # noqa: N802
        col = self.store.collection(request.collection)
        if len(request.ids) > self.limits.max_batch_rows:
            raise ResourceExhausted(f"{len(request.ids)} ids; the limit is {self.limits.max_batch_rows} per call")
        table = col.take(list(request.ids), _columns(request.columns))
        return common_pb2.ArrowPage(arrow_ipc=table_to_ipc(table), rows=table.num_rows, version=col.version)

    def Page(self, request, context):  # noqa: N802
        col = self.store.collection(request.collection)
        page = request.page_rows or 1000
        if page > self.limits.max_page_rows:
            raise ResourceExhausted(f"page_rows={page} exceeds the server limit {self.limits.max_page_rows}")
        columns = _columns(request.columns)
        where = request.where or None
        digest = _cursor_digest(col.name, where, columns)
        if request.cursor:
            version, offset = _read_cursor(request.cursor, digest)
        else:
            at = version_arg(request.version)
            version, offset = (col.version if at is None else int(col.at_version(at).version)), 0
        try:
            batches = list(col.scan(where, columns, batch_size=page + 1, limit=page + 1, offset=offset,
                                    version=version))
        except NotFound as exc:
            raise FailedPrecondition(
                f"cursor expired: version {version} of collection '{col.name}' has been cleaned up; "
                "start again without a cursor") from exc
        table = pa.Table.from_batches(batches) if batches else _empty_page(col, version, columns)
        more = table.num_rows > page
        table = table.slice(0, page)
        next_cursor = _make_cursor(version, offset + table.num_rows, digest) if more else ""
        return query_pb2.PageResponse(
            page=common_pb2.ArrowPage(arrow_ipc=table_to_ipc(table), rows=table.num_rows, version=version),
            next_cursor=next_cursor)

    def Aggregate(self, request, context):  # noqa: N802
        from indexing import analytics

        col = self.store.collection(request.collection)
        where = request.where or None
        version = version_arg(request.version)
        kind = request.kind
        objects_where = request.objects_where or None
        per_object = kind in ("objects", "object_classes", "box_confused_pairs") or (
            kind == "histogram" and request.field.startswith("objects."))
        if not per_object:  # image-level: the images with such an object
            where = with_objects(where, objects_where)
        if kind in BOX_KINDS:
            table = box_table(col, kind, model=request.model or None, where=request.where or None,
                              objects_where=objects_where, version=version, columns=list(request.columns),
                              limit=request.limit or None, iou=request.iou or None, top=request.top or None)
        elif kind == "label_distribution":
            table = analytics.label_distribution(col, where, list(request.group_by) or None, version=version)
        elif kind in ("confused_pairs", "confusion", "class_uncertainty"):
            if not request.model:
                raise InvalidArgument(f"aggregate '{kind}' needs a model")
            if kind == "confused_pairs":
                top = request.top or 20
                if top > 10_000:
                    raise InvalidArgument(f"top must be in [1, 10000], got {top}")
                table = analytics.confused_pairs(col, request.model, where, top=top, version=version)
            elif kind == "confusion":
                table = analytics.confusion(col, request.model, where, errors_only=request.errors_only,
                                            version=version)
            else:
                table = analytics.class_uncertainty(col, request.model, where,
                                                    measure=request.measure or "entropy", version=version)
        elif kind == "histogram":
            if not request.field:
                raise InvalidArgument("aggregate 'histogram' needs a field")
            bins = request.bins or 20
            if bins > 10_000:
                raise InvalidArgument(f"bins must be in [1, 10000], got {bins}")
            has = (request.HasField("range_min"), request.HasField("range_max"))
            if has[0] != has[1]:
                raise InvalidArgument("give both range_min and range_max, or neither")
            rng = (request.range_min, request.range_max) if all(has) else None
            table = analytics.histogram(
                col, request.field, bins=bins, where=where, range=rng, version=version,
                **({"source": request.model or None, "objects_where": objects_where} if per_object else {}))
        elif kind == "uncertainty_quality":
            from service.quality import uncertainty_quality_report

            opt = {f: getattr(request, f) if request.HasField(f) else None
                   for f in ("uncertainty_quantile", "quality_quantile", "uncertainty_threshold",
                             "quality_threshold")}
            table = uncertainty_quality_report(
                col, self.run_scores, model=request.model or None, run_id=request.run_id or None,
                uncertainty=request.measure or None, quality=request.quality or None, where=where,
                version=version, iou=request.iou or 0.5, lower_is_better=request.lower_is_better,
                max_ids=100 if request.limit == 0 else min(int(request.limit), 1 << 31), **opt)
        else:
            raise InvalidArgument(
                f"unknown aggregate kind {kind!r} (known: label_distribution, confused_pairs, confusion, "
                "class_uncertainty, histogram, objects, object_classes, box_confusion, box_confused_pairs, "
                "uncertainty_quality)")
        return common_pb2.ArrowPage(arrow_ipc=table_to_ipc(table), rows=table.num_rows, version=col.version)

    def Export(self, request, context):  # noqa: N802
        import shutil
        import tempfile

        from indexing.export import export_coco, export_objects, export_rows, export_yolo
        from indexing.labelstudio import export_label_studio

        col = self.store.collection(request.collection)
        fmt = request.format or "csv"
        formats = ("csv", "jsonl", "coco", "label-studio", "objects_csv", "objects_jsonl", "yolo")
        if fmt not in formats:
            raise InvalidArgument(f"export format must be one of {', '.join(formats)}, got {fmt!r}")
        if (request.image_url or request.mask_field) and fmt != "label-studio":
            raise InvalidArgument("image_url and mask_field apply to Label Studio exports (format label-studio)")
        if request.objects_where and fmt not in ("objects_csv", "objects_jsonl", "yolo"):
            raise InvalidArgument("export objects_where keeps boxes of a per-box export (objects_csv, "
                                  "objects_jsonl, yolo); for rows, filter with where=\"any_object(...)\"")
        chosen = [bool(request.where), bool(request.ids), bool(request.run_id), bool(request.dataset)]
        if sum(chosen) > 1:
            raise InvalidArgument("export takes at most one of where, ids, run_id, dataset")
        ids = list(request.ids) or None
        version: int | None = None
        if request.run_id:
            if self.run_ids is None:
                raise FailedPrecondition("mining runs are not available on this server")
            ids = self.run_ids(request.run_id, col.name).to_pylist()
        elif request.dataset:
            if self.datasets is None:
                raise FailedPrecondition("datasets are not available on this server")
            dv = version_arg(request.dataset_version)
            owner, version = self.datasets.collection_version(request.dataset, dv)
            if owner != col.name:
                raise InvalidArgument(f"dataset '{request.dataset}' is of collection '{owner}', not '{col.name}'")
            ids = self.datasets.members(request.dataset, dv).to_pylist()
        if ids is not None and not ids:
            raise FailedPrecondition("nothing to export: the selection is empty")
        tmp = tempfile.mkdtemp(prefix="assay-export-")
        try:
            path = os.path.join(tmp, f"export.{'json' if fmt in ('coco', 'label-studio') else fmt}")
            config = ""
            objects_where = request.objects_where or None
            if fmt == "label-studio":
                report, config = export_label_studio(
                    col, path, model=request.model or None, ids=ids, where=request.where or None,
                    version=version, image_url=request.image_url or None,
                    mask_field=request.mask_field or None, min_score=request.min_score)
            elif fmt == "yolo":
                if not request.model:
                    raise InvalidArgument("a YOLO export needs the detection model (model)")
                report = export_yolo(col, request.model, path, ids=ids, where=request.where or None,
                                     objects_where=objects_where, min_score=request.min_score, version=version)
            elif fmt in ("objects_csv", "objects_jsonl"):
                report = export_objects(col, path, format=fmt, ids=ids, where=request.where or None,
                                        objects_where=objects_where, source=request.model or None, version=version)
            elif fmt == "coco":
                if not request.model:
                    raise InvalidArgument("a COCO export needs the detection or segmentation model (model)")
                report = export_coco(col, request.model, path, ids=ids, where=request.where or None,
                                     min_score=request.min_score, version=version)
            else:
                report = export_rows(col, path, ids=ids, where=request.where or None, format=fmt,
                                     model=request.model or None, fields=list(request.fields), version=version)
            with open(path, "rb") as fh:
                while chunk := fh.read(_EXPORT_CHUNK):
                    if not context.is_active():
                        return
                    yield query_pb2.ExportChunk(data=chunk)
            yield query_pb2.ExportChunk(rows=report.rows, annotations=report.annotations, last=True,
                                        label_config=config)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)


_CURSOR_VERSION = 1


def _cursor_digest(collection: str, where: str | None, columns: list[str] | None) -> str:
    key = json.dumps([collection, where or "", columns], separators=(",", ":"))
    return hashlib.sha256(key.encode()).hexdigest()[:16]


def _make_cursor(version: int, offset: int, digest: str) -> str:
    raw = json.dumps({"c": _CURSOR_VERSION, "v": version, "o": offset, "h": digest}, separators=(",", ":"))
    return base64.urlsafe_b64encode(raw.encode()).decode().rstrip("=")


def _read_cursor(cursor: str, digest: str) -> tuple[int, int]:
    """(version, offset) of a cursor made for the same collection, where and columns."""
    try:
        raw = json.loads(base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)))
        version, offset, made_for = int(raw["v"]), int(raw["o"]), str(raw["h"])
        if raw.get("c") != _CURSOR_VERSION or version < 1 or offset < 0:
            raise ValueError
    except (ValueError, KeyError, TypeError, UnicodeDecodeError, binascii.Error):
        raise InvalidArgument("cursor is malformed: pass back next_cursor as it was returned") from None
    if made_for != digest:
        raise InvalidArgument("cursor was made for another collection, where or columns; a cursor is "
                              "only valid with the request that returned it")
    return version, offset


_STATE_NAMES = {v: k for k, v in jobs_pb2.JobState.items()}


class JobsServicer(jobs_pb2_grpc.JobsServicer):
    def __init__(self, jobs: JobManager) -> None:
        self.jobs = jobs

    def StartJob(self, request, context):  # noqa: N802
        return job_to_proto(self.jobs.start(request.kind, request.collection, struct_params(request)))

    def GetJob(self, request, context):  # noqa: N802
        return job_to_proto(self.jobs.get(request.job_id))

    def WatchJob(self, request, context):  # noqa: N802
        self.jobs.get(request.job_id)  # NOT_FOUND before the stream starts
        for rec in self.jobs.watch(request.job_id, is_active=context.is_active):
            yield job_to_proto(rec)

    def CancelJob(self, request, context):  # noqa: N802
        return job_to_proto(self.jobs.cancel(request.job_id))

    def ListJobs(self, request, context):  # noqa: N802
        unknown = sorted(set(request.states) - set(_STATE_NAMES))
        if unknown:
            raise InvalidArgument(f"unknown job state(s) {', '.join(map(str, unknown))} "
                                  f"(known: {', '.join(f'{v}={k}' for v, k in sorted(_STATE_NAMES.items()) if v)})")
        states = {_STATE_NAMES[s] for s in request.states} or None
        recs = self.jobs.list(collection=request.collection or None, states=states, limit=request.limit or 100)
        return jobs_pb2.ListJobsResponse(jobs=[job_to_proto(r) for r in recs])


def add_servicers(server: grpc.Server, store: Store, jobs: JobManager, limits: Limits,
                  embedders: TextEmbedders, *, datasets: Any = None,
                  run_ids: Callable[[str, str], pa.Array] | None = None,
                  run_scores: Callable[[str, str], tuple[pa.Table, str | None]] | None = None) -> list[str]:
    """Register every assay.v1 service but Mining and Datasets; returns their full names
    (for health/reflection). ``run_ids(run_id, collection)`` resolves a mining run's
    results (tagging and exporting "a run"); ``run_scores(run_id, collection)`` its ids,
    scores and model (a run's scores as the uncertainty of ``uncertainty_quality``)."""
    collections_pb2_grpc.add_CollectionsServicer_to_server(CollectionsServicer(store, datasets), server)
    _add_ingest_servicer(IngestServicer(store, limits, run_ids=run_ids), server)
    search_pb2_grpc.add_SearchServicer_to_server(SearchServicer(store, limits, embedders), server)
    query_pb2_grpc.add_QueryServicer_to_server(
        QueryServicer(store, limits, datasets=datasets, run_ids=run_ids, run_scores=run_scores), server)
    jobs_pb2_grpc.add_JobsServicer_to_server(JobsServicer(jobs), server)
    return [
        mod.DESCRIPTOR.services_by_name[name].full_name
        for mod, name in ((collections_pb2, "Collections"), (ingest_pb2, "Ingest"), (search_pb2, "Search"),
                          (query_pb2, "Query"), (jobs_pb2, "Jobs"))
    ]

