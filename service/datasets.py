"""The Datasets service: versioned datasets over :class:`indexing.datasets.Datasets`.

Versions travel as strings ("" = the working state, "HEAD", "3", a dataset tag); members
"from a run" are resolved by the mining layer's run store, passed in by the server.
"""

from __future__ import annotations

from collections.abc import Callable

import grpc
import pyarrow as pa

from indexing.datasets import CommitRecord, DatasetInfo, Datasets
from indexing.errors import InvalidArgument, ResourceExhausted
from indexing.store import Store
from protos.assay.v1 import common_pb2, datasets_pb2, datasets_pb2_grpc
from service.arrow_ipc import table_to_ipc


def version_arg(text: str) -> int | str | None:
    """A version string of the API as the store takes it."""
    text = text.strip()
    if not text:
        return None
    return int(text) if text.isdigit() else text


def _info(d: DatasetInfo) -> datasets_pb2.DatasetInfo:
    return datasets_pb2.DatasetInfo(
        name=d.name, collection=d.collection, description=d.description, created_at=d.created_at,
        head=d.head, members=d.members, staged_adds=d.staged_adds, staged_removes=d.staged_removes,
        tags=d.tags)


def _commit(c: CommitRecord) -> datasets_pb2.CommitInfo:
    return datasets_pb2.CommitInfo(
        dataset=c.dataset, version=c.version, message=c.message, collection=c.collection,
        collection_version=c.collection_version, tag=c.tag, created_at=c.created_at,
        members=c.members, added=c.added, removed=c.removed, author=c.author, tags=list(c.tags))


def _page(table: pa.Table) -> common_pb2.ArrowPage:
    return common_pb2.ArrowPage(arrow_ipc=table_to_ipc(table), rows=table.num_rows)


class DatasetsServicer(datasets_pb2_grpc.DatasetsServicer):
    def __init__(self, store: Store, datasets: Datasets, max_page_rows: int) -> None:
        self.store = store
        self.datasets = datasets
        self.max_page_rows = max_page_rows

    def CreateDataset(self, request, context):  # noqa: N802
        return _info(self.datasets.create(request.name, request.collection, request.description))

    def GetDataset(self, request, context):  # noqa: N802
        return _info(self.datasets.get(request.name))

    def ListDatasets(self, request, context):  # noqa: N802
        return datasets_pb2.ListDatasetsResponse(
            datasets=[_info(d) for d in self.datasets.list(request.collection or None)])

    def DeleteDataset(self, request, context):  # noqa: N802
        self.datasets.delete(request.name, force=request.force)
        return datasets_pb2.DeleteDatasetResponse()

    def _members(self, request, stage: Callable[..., object]) -> datasets_pb2.StageResult:
        given = [bool(request.ids), bool(request.where), bool(request.run_id)]
        if sum(given) != 1:
            raise InvalidArgument("give exactly one of ids, where or run_id")
        result = stage(request.dataset, ids=list(request.ids) if request.ids else None,
                       where=request.where or None, run=request.run_id or None)
        return datasets_pb2.StageResult(
            dataset=result.dataset, requested=result.requested, changed=result.changed,
            unchanged=result.unchanged, staged_adds=result.staged_adds,
            staged_removes=result.staged_removes)

    def AddMembers(self, request, context):  # noqa: N802
        return self._members(request, self.datasets.add)

    def RemoveMembers(self, request, context):  # noqa: N802
        return self._members(request, self.datasets.remove)

    def GetStatus(self, request, context):  # noqa: N802
        s = self.datasets.status(request.name)
        return datasets_pb2.DatasetStatus(
            dataset=s.dataset, head=s.head, staged_adds=s.staged_adds, staged_removes=s.staged_removes,
            members=s.members, head_collection_version=s.head_collection_version or 0,
            collection_version=s.collection_version)

    def Discard(self, request, context):  # noqa: N802
        return datasets_pb2.DiscardResponse(discarded=self.datasets.discard(request.name))

    def Commit(self, request, context):  # noqa: N802
        return _commit(self.datasets.commit(request.dataset, request.message, author=request.author,
                                            allow_empty=request.allow_empty))

    def History(self, request, context):  # noqa: N802
        return datasets_pb2.HistoryResponse(commits=[_commit(c) for c in self.datasets.history(request.name)])

    def TagVersion(self, request, context):  # noqa: N802
        version = self.datasets.tag(request.dataset, version_arg(request.version) or "HEAD", request.tag)
        return datasets_pb2.TagVersionResponse(version=version)

    def Checkout(self, request, context):  # noqa: N802
        page = request.page_rows or 8192
        if page > self.max_page_rows:
            raise ResourceExhausted(f"page_rows={page} exceeds the server limit {self.max_page_rows}")
        version = version_arg(request.version)
        columns = list(request.columns) or None
        sent = 0
        for part in self.datasets.checkout_batches(request.dataset, version, columns, batch_size=page):
            if not context.is_active():
                return
            if columns is not None and "id" not in columns:
                part = part.select(columns)
            sent += 1
            yield _page(part)
        if not sent:  # no members: one empty page still carries the schema
            yield _page(self.datasets.checkout(request.dataset, version, columns).slice(0, 0))

    def Diff(self, request, context):  # noqa: N802
        d = self.datasets.diff(request.dataset, version_arg(request.v1), version_arg(request.v2))
        return datasets_pb2.DiffResponse(
            dataset=d.dataset, added=_page(pa.table({"id": d.added})),
            removed=_page(pa.table({"id": d.removed})), relabeled=_page(d.relabeled))


def add_datasets_servicer(server: grpc.Server, store: Store, datasets: Datasets, max_page_rows: int) -> str:
    datasets_pb2_grpc.add_DatasetsServicer_to_server(DatasetsServicer(store, datasets, max_page_rows), server)
    return datasets_pb2.DESCRIPTOR.services_by_name["Datasets"].full_name
