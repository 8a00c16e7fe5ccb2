"""A running server seen through the shape of :class:`indexing.store.Store`, for the bulk
jobs that run in the CLI's process: ``assay ingest --server`` reads the source and embeds
here (on this machine's CPU or GPU) and writes every batch through the client.

Only what :func:`indexing.ingest.ingest` uses is offered: ``collection``,
``create_collection``, ``storage_options``, and on a collection ``spaces``, ``space``,
``add_space``, ``schema``, ``count``, ``take`` and ``upsert``. The client's errors come
back as the store's (:mod:`indexing.errors`), with the row an upsert rejected (the server
sends it with the error), so the job reports a bad row and goes on exactly as it does
against a local store. Imports nothing beyond the client.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import pyarrow as pa

from indexing import errors
from service.client import AssayClientError, Client

__all__ = ["RemoteCollection", "RemoteStore"]


def _store_error(err: AssayClientError) -> errors.AssayError:
    kind = {"INVALID_ARGUMENT": errors.InvalidArgument, "NOT_FOUND": errors.NotFound,
            "ALREADY_EXISTS": errors.AlreadyExists, "FAILED_PRECONDITION": errors.FailedPrecondition,
            "RESOURCE_EXHAUSTED": errors.ResourceExhausted,
            "PERMISSION_DENIED": errors.PermissionDenied}.get(err.code)
    if kind is None:
        raise err
    return kind(err.message, field=err.field, row=err.row)


@dataclass(frozen=True)
class RemoteSpace:
    """What the ingest job reads of a space: its name, dimension, metric and model."""

    name: str
    dim: int
    metric: str
    model: str | None


class RemoteCollection:
    def __init__(self, client: Client, name: str) -> None:
        self._col = client.collection(name)
        self.name = name
        self._schema: pa.Schema | None = None

    @property
    def spaces(self) -> dict[str, RemoteSpace]:
        try:
            desc = self._col.describe()
        except AssayClientError as err:
            raise _store_error(err) from err
        out = {}
        for s in desc.get("spaces", []):
            spec = s.get("spec", s)
            out[spec["name"]] = RemoteSpace(spec["name"], int(spec["dim"]), spec.get("metric", "cosine"),
                                            spec.get("model") or None)
        return out

    def space(self, name: str) -> RemoteSpace:
        spaces = self.spaces
        if name not in spaces:
            raise errors.NotFound(f"collection '{self.name}' has no space '{name}'")
        return spaces[name]

    def add_space(self, name: str, dim: int, metric: str = "cosine", model: str | None = None) -> None:
        try:
            self._col.add_space(name, dim, metric=metric, model=model)
        except AssayClientError as err:
            raise _store_error(err) from err

    @property
    def schema(self) -> pa.Schema:
        """The collection's scalar columns (vectors and predictions left out: the ingest job
        reads the types of fields it must send as nulls)."""
        if self._schema is None:
            self._schema = self._col.query(limit=0).schema
        return self._schema

    def count(self, where: str | None = None) -> int:
        return self._col.count(where)

    def take(self, ids: Iterable[str], columns: Iterable[str] | None = None) -> pa.Table:
        return self._col.take(list(ids), columns)

    def upsert(self, data: Any) -> Any:
        try:
            summary = self._col.upsert(data)
        except AssayClientError as err:
            raise _store_error(err) from err
        if summary.new_columns:
            self._schema = None
        return summary


class RemoteStore:
    """The collections of the server ``client`` talks to."""

    # Images named by s3:// URIs are read with the environment's settings (ASSAY_S3_*, AWS_*).
    storage_options: dict[str, str] = {}

    def __init__(self, client: Client) -> None:
        self.client = client

    def collection(self, name: str) -> RemoteCollection:
        try:
            self.client.collection(name).count()
        except AssayClientError as err:
            raise _store_error(err) from err
        return RemoteCollection(self.client, name)

    def create_collection(self, name: str, exist_ok: bool = False) -> RemoteCollection:
        try:
            self.client.create_collection(name, if_not_exists=exist_ok)
        except AssayClientError as err:
            raise _store_error(err) from err
        return RemoteCollection(self.client, name)
