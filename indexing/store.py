"""The LanceDB store: collections, upserts, reads, k-NN search and maintenance.

One :class:`Store` per root URI (a local folder, default ``./data``, or ``s3://bucket/prefix``)
holds one shared :class:`Collection` handle per table, as LanceDB advises (each handle has
its own caches). A collection is a Lance table whose schema is described in
:mod:`indexing.schema`.

Writes are validated in full before anything touches the table (see
:mod:`indexing.validation`), so a rejected batch leaves the table at its previous version.
Upserts are ``merge_insert`` on ``id``, which is declared as the table's (unenforced)
primary key at creation: concurrent writers of the same new id then conflict and retry
instead of inserting duplicates.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import lancedb
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from lancedb.index import BTree, IvfFlat, IvfHnswSq, IvfPq, IvfRq, IvfSq, LabelList

from indexing.errors import (
    AlreadyExists,
    AssayError,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
)
from indexing.schema import (
    EMB_PREFIX,
    MODEL_META_KEY,
    REINDEX_META_KEY,
    SPACE_META_KEY,
    STAGE_SUFFIX,
    IndexPolicy,
    ModelSpec,
    SpaceSpec,
    base_schema,
    check_collection_name,
    check_identifier,
    light_columns,
    models_of,
    spaces_of,
    user_fields_of,
)
from indexing.validation import ID_FIELD, ids_predicate, prepare_upsert

log = logging.getLogger("assay.store")

DEFAULT_ROOT = "./data"
MAX_K = 10_000
SCHEMA_RECHECK_S = 0.05  # how stale the cached schema/registry may be (other writers)
_NEVER = timedelta(days=365 * 100)
ID_CHUNK = 10_000  # ids per `id IN (...)` lookup
STABLE_ROW_IDS = {"new_table_enable_stable_row_ids": "true"}


def resolve_root(root: str | None = None) -> str:
    """The data root: the argument, else ``$ASSAY_DATA``, else ``./data``."""
    return root or os.environ.get("ASSAY_DATA") or DEFAULT_ROOT


def storage_options_from_env(root: str) -> dict[str, str]:
    """Object-store options for ``s3://`` roots, from the environment.

    Reads ``ASSAY_S3_ENDPOINT`` (or ``AWS_ENDPOINT_URL``), ``AWS_ACCESS_KEY_ID``,
    ``AWS_SECRET_ACCESS_KEY``, ``AWS_SESSION_TOKEN`` and ``AWS_REGION`` (default
    ``us-east-1``). An ``http://`` endpoint (MinIO, moto, a local gateway) enables
    ``allow_http``. Local roots need no options.
    """
    if "://" not in root or root.startswith("file://"):
        return {}
    opts: dict[str, str] = {}
    endpoint = os.environ.get("ASSAY_S3_ENDPOINT") or os.environ.get("AWS_ENDPOINT_URL")
    if endpoint:
        opts["endpoint"] = endpoint
        if endpoint.startswith("http://"):
            opts["allow_http"] = "true"
    for env, key in (
        ("AWS_ACCESS_KEY_ID", "aws_access_key_id"),
        ("AWS_SECRET_ACCESS_KEY", "aws_secret_access_key"),
        ("AWS_SESSION_TOKEN", "aws_session_token"),
    ):
        if os.environ.get(env):
            opts[key] = os.environ[env]
    opts["region"] = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1"
    return opts


@dataclass
class UpsertResult:
    inserted: int
    updated: int
    version: int
    generated_ids: int = 0
    new_columns: list[str] = field(default_factory=list)


@dataclass
class OptimizeResult:
    version: int
    fragments_before: int
    fragments_after: int
    versions_removed: int
    indexes_built: list[str] = field(default_factory=list)
    seconds: float = 0.0


@dataclass
class RecallReport:
    space: str
    recall: float
    k: int
    queries: int
    nprobes: int
    refine_factor: int
    indexed: bool
    tuned: bool = False


class Store:
    """All collections under one root URI.

    ``read_consistency_interval`` defaults to 0 (strong consistency: every read sees the
    latest committed version, including writes by other processes such as a Ray job);
    raise it to trade freshness for fewer manifest checks on object storage.
    """

    def __init__(
        self,
        root: str | None = None,
        *,
        storage_options: Mapping[str, str] | None = None,
        read_consistency_interval: timedelta | None = timedelta(0),
        optimize_every: int = 20,
        cleanup_older_than: timedelta = timedelta(hours=1),
    ) -> None:
        self.root = resolve_root(root)
        if "://" not in self.root:
            self.root = os.path.abspath(self.root)
            os.makedirs(self.root, exist_ok=True)
        self.storage_options = dict(storage_options or storage_options_from_env(self.root))
        self.optimize_every = optimize_every
        self.cleanup_older_than = cleanup_older_than
        self._db = lancedb.connect(
            self.root,
            storage_options=self.storage_options or None,
            read_consistency_interval=read_consistency_interval,
        )
        self._collections: dict[str, Collection] = {}
        self._lock = threading.RLock()

    # -- collections -------------------------------------------------------------------

    def list_collections(self) -> list[str]:
        """Names of the user collections (tables whose names start with '_' are assay's own)."""
        return sorted(n for n in self._table_names() if not n.startswith("_"))

    def _table_names(self) -> list[str]:
        names: list[str] = []
        token = None
        while True:
            resp = self._db.list_tables(page_token=token)
            names.extend(resp.tables)
            token = resp.page_token
            if not token:
                return names

    def create_collection(
        self,
        name: str,
        *,
        spaces: Mapping[str, int | SpaceSpec | Mapping[str, Any]] | None = None,
        models: Mapping[str, Sequence[str] | ModelSpec | Mapping[str, Any]] | None = None,
        fields: Mapping[str, pa.DataType] | None = None,
        exist_ok: bool = False,
    ) -> Collection:
        """Create a collection; ``spaces`` maps name → dim (or a SpaceSpec / dict of its
        fields), ``models`` maps name → class names (or a ModelSpec / dict)."""
        check_collection_name(name)
        space_specs = [_as_space(n, s) for n, s in (spaces or {}).items()]
        model_specs = [_as_model(n, m) for n, m in (models or {}).items()]
        schema_fields = list(base_schema())
        for fname, ftype in (fields or {}).items():
            check_identifier(fname, "field name")
            if fname in {f.name for f in schema_fields}:
                raise InvalidArgument(f"field '{fname}' is a reserved column")
            schema_fields.append(pa.field(fname, ftype))
        schema_fields += [s.arrow_field() for s in space_specs] + [m.arrow_field() for m in model_specs]
        with self._lock:
            if name in self._table_names():
                if exist_ok:
                    return self.collection(name)
                raise AlreadyExists(f"collection '{name}' already exists")
            try:
                table = self._db.create_table(
                    name, schema=pa.schema(schema_fields), storage_options={**STABLE_ROW_IDS}
                )
            except (OSError, ValueError) as exc:
                if "already exists" in str(exc).lower():
                    if exist_ok:
                        return self.collection(name)
                    raise AlreadyExists(f"collection '{name}' already exists") from exc
                raise
            # Concurrent merge_insert of the same new key must conflict and retry, not
            # insert twice: that needs the primary key declared (on a non-null column).
            table.set_unenforced_primary_key("id")
            table.create_index("id", config=BTree())
            table.create_index("tags", config=LabelList())
            col = Collection(self, name, table)
            self._collections[name] = col
            log.info("created collection %s (%d spaces, %d models)", name, len(space_specs), len(model_specs))
            return col

    def system_table(self, name: str, schema: pa.Schema, key: str | None = None) -> lancedb.table.Table:
        """Open (creating it if missing) one of assay's own tables under the root — ``_jobs``,
        ``_runs``, ``_datasets``... — with ``key`` as its unenforced primary key.

        A table written by an older version that lacks some of ``schema``'s fields gets them
        added as all-null columns (they must be nullable), so a new nullable field in a
        system schema never breaks an existing data root."""
        try:
            return self._upgrade(self._db.open_table(name), schema)
        except (ValueError, FileNotFoundError):
            try:
                table = self._db.create_table(name, schema=schema)
                if key:
                    table.set_unenforced_primary_key(key)
                return table
            except (ValueError, OSError):  # created concurrently
                return self._db.open_table(name)

    def _upgrade(self, table: lancedb.table.Table, schema: pa.Schema) -> lancedb.table.Table:
        """Add ``schema``'s fields that ``table`` lacks, as all-null columns."""
        have = set(table.schema.names)
        missing = [f for f in schema if f.name not in have]
        if not missing:
            return table
        strict = [f.name for f in missing if not f.nullable]
        if strict:
            raise FailedPrecondition(
                f"system table '{table.name}' under {self.root} lacks the non-nullable column(s) "
                f"{', '.join(strict)}: it was written by an incompatible version of assay")
        try:
            table.add_columns(missing)
            log.info("system table %s: added column(s) %s", table.name, ", ".join(f.name for f in missing))
        except Exception:  # another process added them first: fine if they are there now
            table = self._db.open_table(table.name)
            still = [f.name for f in schema if f.name not in set(table.schema.names)]
            if still:
                raise
        return table

    def collection(self, name: str) -> Collection:
        check_collection_name(name)
        with self._lock:
            col = self._collections.get(name)
            if col is not None:
                return col
            try:
                table = self._db.open_table(name)
            except (ValueError, FileNotFoundError) as exc:
                raise NotFound(f"collection '{name}' not found under {self.root}") from exc
            col = Collection(self, name, table)
            self._collections[name] = col
            return col

    def drop_collection(self, name: str) -> None:
        check_collection_name(name)
        with self._lock:
            if name not in self._table_names():
                raise NotFound(f"collection '{name}' not found under {self.root}")
            self._db.drop_table(name)
            self._collections.pop(name, None)

    def describe(self, name: str) -> dict[str, Any]:
        return self.collection(name).describe()


def _as_space(name: str, spec: int | SpaceSpec | Mapping[str, Any]) -> SpaceSpec:
    if isinstance(spec, SpaceSpec):
        return spec
    if isinstance(spec, int) and not isinstance(spec, bool):
        return SpaceSpec(name=name, dim=spec)
    if isinstance(spec, Mapping):
        kw = dict(spec)
        if isinstance(kw.get("index"), Mapping):
            kw["index"] = IndexPolicy(**kw["index"])
        kw.setdefault("normalized", kw.get("metric", "cosine") == "cosine")
        return SpaceSpec(name=name, **kw)
    raise InvalidArgument(f"space '{name}': give a dimension (int) or a spec, got {spec!r}")


def _as_model(name: str, spec: Sequence[str] | ModelSpec | Mapping[str, Any]) -> ModelSpec:
    if isinstance(spec, ModelSpec):
        return spec
    if isinstance(spec, Mapping):
        return ModelSpec(name=name, classes=tuple(spec["classes"]), task=spec.get("task", "classification"))
    if isinstance(spec, Sequence) and not isinstance(spec, str):
        return ModelSpec(name=name, classes=tuple(str(c) for c in spec))
    raise InvalidArgument(f"model '{name}': give its class names, got {spec!r}")


class Collection:
    """One collection (Lance table). Thread-safe; share one instance per table."""

    def __init__(self, store: Store, name: str, table: lancedb.table.Table) -> None:
        self.store = store
        self.name = name
        self._table = table
        self._schema_lock = threading.RLock()
        self._optimize_lock = threading.Lock()
        # Commits of this process's writers, one at a time: concurrent merge_inserts that touch
        # the same fragments conflict in Lance and retry with backoff (8 clients updating
        # rows: upsert p99 8-12 s, against 1.2 s queued here, and more writes per second).
        # Writers in other processes (a Ray job) still meet Lance's conflict handling.
        self._write_lock = threading.Lock()
        self._writes_since_optimize = 0
        self._maintenance: threading.Thread | None = None
        # Schema-derived lookups, valid for one table version (see _cached).
        self._cache_version: int | None = None
        self._cache_checked = 0.0
        self._cache: dict[Any, Any] = {}

    # -- registry ------------------------------------------------------------------

    @property
    def table(self) -> lancedb.table.Table:
        return self._table

    @property
    def schema(self) -> pa.Schema:
        return self._table.schema

    @property
    def version(self) -> int:
        return self._table.version

    def _cached(self, key: Any, compute: Any) -> Any:
        """Memoise ``compute()`` per table version: the schema, registry and index list only
        change with a new version, and reading them costs a manifest check (a hop to
        LanceDB's event loop) each time. The version itself is re-checked at most every
        ``SCHEMA_RECHECK_S``; this process's own schema changes invalidate at once, data
        reads stay strongly consistent."""
        now = time.monotonic()
        if now - self._cache_checked > SCHEMA_RECHECK_S:
            version = self._table.version
            self._cache_checked = now
            if version != self._cache_version:
                self._cache = {}
                self._cache_version = version
        if key not in self._cache:
            if len(self._cache) > 4096:  # many distinct filters: start over
                self._cache = {}
            self._cache[key] = compute()
        return self._cache[key]

    @property
    def spaces(self) -> dict[str, SpaceSpec]:
        return self._cached("spaces", lambda: spaces_of(self.schema))

    @property
    def models(self) -> dict[str, ModelSpec]:
        return self._cached("models", lambda: models_of(self.schema))

    def space(self, name: str) -> SpaceSpec:
        spaces = self.spaces
        if name not in spaces:
            raise NotFound(
                f"space '{name}' not found in collection '{self.name}' (known: {', '.join(sorted(spaces)) or 'none'})"
            )
        return spaces[name]

    def model(self, name: str) -> ModelSpec:
        models = self.models
        if name not in models:
            raise NotFound(
                f"model '{name}' not found in collection '{self.name}' (known: {', '.join(sorted(models)) or 'none'})"
            )
        return models[name]

    def add_space(
        self,
        name: str,
        dim: int,
        *,
        metric: str = "cosine",
        model: str | None = None,
        normalized: bool | None = None,
        index: IndexPolicy | None = None,
    ) -> SpaceSpec:
        """Register an embedding space: adds the ``emb_<name>`` column (all null)."""
        spec = SpaceSpec(
            name=name, dim=dim, metric=metric, model=model,
            normalized=(metric == "cosine") if normalized is None else normalized,
            index=index or IndexPolicy(),
        )
        with self._schema_lock:
            if spec.column in self.schema.names:
                raise AlreadyExists(f"space '{name}' already exists in collection '{self.name}'")
            self._table.add_columns(spec.arrow_field())
            self._invalidate()
        return spec

    def _invalidate(self) -> None:
        self._cache_checked = 0.0
        self._cache_version = None

    def add_fields(self, fields: Sequence[pa.Field]) -> None:
        """Add all-null columns (with their metadata) in one commit."""
        with self._schema_lock:
            self._table.add_columns(list(fields))
            self._invalidate()

    def rename_fields(self, renames: Mapping[str, str]) -> None:
        """Rename columns in one commit (a swap such as a -> a_old, b -> a is atomic);
        indexes and field metadata follow their columns."""
        with self._schema_lock:
            self._table.alter_columns(*({"path": old, "rename": new} for old, new in renames.items()))
            self._invalidate()

    def drop_fields(self, names: Sequence[str]) -> None:
        """Drop columns (and their indexes) in one commit; data files are reclaimed by
        compaction and cleanup."""
        with self._schema_lock:
            self._table.drop_columns(list(names))
            self._invalidate()

    def add_model(self, name: str, classes: Sequence[str], *, task: str = "classification") -> ModelSpec:
        """Register a model: adds the ``pred_<name>`` struct column (all null)."""
        spec = ModelSpec(name=name, classes=tuple(str(c) for c in classes), task=task)
        with self._schema_lock:
            if spec.column in self.schema.names:
                raise AlreadyExists(f"model '{name}' already exists in collection '{self.name}'")
            self._table.add_columns(spec.arrow_field())
            self._invalidate()
        return spec

    def update_space(self, name: str, **index_changes: Any) -> SpaceSpec:
        """Change a space's index policy (e.g. ``nprobes=40``, ``kind='flat'``)."""
        with self._schema_lock:
            spec = self.space(name).with_index(**index_changes)
            self._table.replace_field_metadata(spec.column, {SPACE_META_KEY.decode(): spec.to_json()})
            self._invalidate()
        return spec

    # -- writes --------------------------------------------------------------------

    def upsert(self, data: Any) -> UpsertResult:
        """Insert or update rows by ``id`` (merge_insert). Partial columns update only those
        columns; new user fields and new fixed-size ``emb_*`` spaces become columns.

        Raises InvalidArgument (naming column, row and id) before any write if anything in
        the batch is invalid.
        """
        prepared = prepare_upsert(data, current=self.schema, spaces=self.spaces, models=self.models)
        new_columns: list[str] = []
        if prepared.new_fields:
            with self._schema_lock:
                # Re-check under the lock: another writer may have added the same columns.
                present = set(self.schema.names)
                missing = [f for f in prepared.new_fields if f.name not in present]
                if missing:
                    try:
                        self._table.add_columns(missing)
                        self._invalidate()
                    except Exception:
                        # A concurrent writer in another process may have won the race.
                        self._table.checkout_latest()
                        self._invalidate()
                        if any(f.name not in self.schema.names for f in missing):
                            raise
                    new_columns = [f.name for f in missing]
                # Types may have been fixed by whoever added the column first: re-prepare.
                if len(missing) != len(prepared.new_fields):
                    prepared = prepare_upsert(data, current=self.schema, spaces=self.spaces,
                                              models=self.models)
        batch = self._with_timestamps(prepared.table)
        with self._write_lock:
            result = (
                self._table.merge_insert("id")
                .when_matched_update_all()
                .when_not_matched_insert_all()
                .execute(batch)
            )
        self._after_write()
        return UpsertResult(
            inserted=int(result.num_inserted_rows),
            updated=int(result.num_updated_rows),
            version=int(result.version),
            generated_ids=prepared.generated_ids,
            new_columns=new_columns,
        )

    def _with_timestamps(self, table: pa.Table) -> pa.Table:
        """Add ``updated_at`` = now and ``created_at`` = first-seen time (kept on update).

        merge_insert writes one set of columns for matched and new rows alike, so the
        stored ``created_at`` of existing ids is looked up (BTREE on ``id``) and sent back.
        """
        ts = pa.timestamp("us", tz="UTC")
        now = pa.scalar(datetime.now(UTC), ts)
        n = table.num_rows
        ids = table.column("id")
        created = pa.nulls(n, ts)
        if self._table.count_rows() > 0:
            found = [
                self._select(ids_predicate(ids.slice(s, ID_CHUNK).to_pylist()), ["id", "created_at"])
                for s in range(0, n, ID_CHUNK)
            ]
            found_t = pa.concat_tables(found)
            if found_t.num_rows:
                position = pc.index_in(ids, value_set=found_t.column("id").combine_chunks())
                created = found_t.column("created_at").combine_chunks().take(position)
        created = pc.coalesce(created, now)
        updated = pa.repeat(now, n)
        return table.append_column(pa.field("created_at", ts), created).append_column(
            pa.field("updated_at", ts), updated
        )

    def update_columns(self, table: pa.Table) -> int:
        """Overwrite some columns of rows that exist, by ``id``: no inserts (rows deleted
        meanwhile stay deleted), no validation beyond the table's own types, and
        ``updated_at`` untouched — this is how the store writes values it computed itself
        (a reindex's vectors), not user data. One atomic commit; returns rows updated."""
        if "id" not in table.column_names or table.num_rows == 0:
            raise InvalidArgument("update_columns needs a non-empty table with an 'id' column")
        fields = [pa.field("id", pa.string(), nullable=False)] + [
            self.schema.field(n) for n in table.column_names if n != "id"
        ]
        batch = pa.Table.from_arrays(
            [table.column(f.name).cast(f.type) for f in fields], schema=pa.schema(fields)
        )
        with self._write_lock:
            result = self._table.merge_insert("id").when_matched_update_all().execute(batch)
        self._after_write()
        return int(result.num_updated_rows)

    def tag_rows(self, *, ids: Sequence[str] | None = None, where: str | None = None,
                 add: Sequence[str] = (), remove: Sequence[str] = ()) -> tuple[int, int]:
        """Add and/or remove item tags (the ``tags`` list column) on the rows named by ids
        or a filter; one atomic commit of the rows whose tags change. Returns (rows
        changed, version). ``updated_at`` is left alone: tags are curation, not content."""
        if (ids is None) == (where is None):
            raise InvalidArgument("tagging needs exactly one of ids or where")
        add, remove = list(add), list(remove)
        if not add and not remove:
            raise InvalidArgument("give tags to add or to remove")
        for t in add + remove:
            if not isinstance(t, str) or not t.strip() or len(t) > 128 or any(ord(c) < 32 for c in t):
                raise InvalidArgument(f"tag {t!r} is invalid: 1..128 printable characters")
        if set(add) & set(remove):
            raise InvalidArgument(f"tags both added and removed: {', '.join(sorted(set(add) & set(remove)))}")
        if ids is not None:
            ids = list(dict.fromkeys(ids))
            if not ids:
                raise InvalidArgument("ids is empty")
            rows = pa.concat_tables([
                self._select(ids_predicate(ids[s:s + ID_CHUNK]), ["id", "tags"])
                for s in range(0, len(ids), ID_CHUNK)
            ])
        else:
            rows = pa.Table.from_batches(list(self.scan(where, ["id", "tags"], batch_size=65_536)),
                                         schema=pa.schema([self.schema.field("id"), self.schema.field("tags")]))
        changed_ids, changed_tags = [], []
        drop = set(remove)
        for i, tags in zip(rows.column("id").to_pylist(), rows.column("tags").to_pylist(), strict=True):
            old = tags or []
            new = [t for t in old if t not in drop]
            new += [t for t in add if t not in new]
            if new != old:
                changed_ids.append(i)
                changed_tags.append(new)
        if not changed_ids:
            return 0, self.version
        self.update_columns(pa.table({"id": pa.array(changed_ids, pa.string()),
                                      "tags": pa.array(changed_tags, pa.list_(pa.string()))}))
        return len(changed_ids), self.version

    def delete(self, *, ids: Sequence[str] | None = None, where: str | None = None) -> tuple[int, int]:
        """Delete rows by ids or by SQL filter. Returns (rows deleted, new version)."""
        if (ids is None) == (where is None):
            raise InvalidArgument("delete needs exactly one of ids or where")
        if ids is not None:
            ids = list(ids)
            if not ids:
                raise InvalidArgument("delete: ids is empty")
            if not all(isinstance(i, str) and i for i in ids):
                raise InvalidArgument("delete: ids must be non-empty strings")
            deleted = 0
            for start in range(0, len(ids), ID_CHUNK):
                pred = ids_predicate(ids[start:start + ID_CHUNK])
                n = self._table.count_rows(pred)
                if n:
                    with self._write_lock:
                        self._table.delete(pred)
                    deleted += n
        else:
            pred = self.validate_filter(where)
            deleted = self._table.count_rows(pred)
            if deleted:
                with self._write_lock:
                    self._table.delete(pred)
        if deleted:
            self._after_write()
        return deleted, self.version

    def _after_write(self) -> None:
        """Every ``optimize_every`` writes, optimize in a background thread: compaction or
        an index build must never stall the write that happened to trigger it."""
        self._writes_since_optimize += 1
        every = self.store.optimize_every
        if not every or self._writes_since_optimize < every or not self._optimize_lock.acquire(blocking=False):
            return
        self._writes_since_optimize = 0

        def run() -> None:
            try:
                self._optimize_locked(cleanup=True)
            except Exception as exc:  # maintenance must never take the process down
                if _commit_conflict(exc):  # busy with writes: the next write's turn will retry
                    log.warning("automatic optimize of %s skipped: concurrent writes kept preempting it",
                                self.name)
                else:
                    log.exception("automatic optimize of %s failed", self.name)
            finally:
                self._optimize_lock.release()

        self._maintenance = threading.Thread(target=run, name=f"assay-optimize-{self.name}", daemon=True)
        self._maintenance.start()

    def wait_for_maintenance(self, timeout: float | None = None) -> bool:
        """Wait for a running automatic optimize; True if none is running now."""
        thread = self._maintenance
        if thread is not None:
            thread.join(timeout)
        return thread is None or not thread.is_alive()

    # -- reads ---------------------------------------------------------------------

    def validate_filter(self, where: str | None) -> str | None:
        """Check a SQL filter against the schema before it runs; InvalidArgument if bad.
        Returns the filter in the form it must be sent to Lance.

        Lance's parser stops at the end of the first complete expression and ignores the
        rest: ``a = 1; DROP ...``, ``n = 1) OR (n = 3`` and ``n = 1 n = 2`` would all run
        as their first part. So ';' and unbalanced parentheses outside quotes are refused,
        and the filter is planned and run as ``(<where>\n)``: parsing that parenthesised
        form is what rejects any tail (the newline ends a ``--`` comment), so what runs is
        what was validated.
        """
        if where is None:
            return None
        if not isinstance(where, str) or not where.strip():
            raise InvalidArgument("filter must be a non-empty SQL expression")
        bare = _outside_quotes(where)
        if ";" in bare:
            raise InvalidArgument(f"filter {where!r}: ';' is not allowed (one boolean expression only)")
        depth = 0
        for ch in bare:
            depth += (ch == "(") - (ch == ")")
            if depth < 0:
                break
        if depth != 0:
            raise InvalidArgument(f"filter {where!r} has unbalanced parentheses")
        wrapped = f"({where}\n)"

        def plan() -> str | None:
            # Exception, not narrower: Lance *panics* on some input (SQL placeholders such as
            # `$1` or `:name`), which surfaces as pyo3's RustPanic, not a RuntimeError.
            try:
                self._table.search().where(wrapped).select(["id"]).limit(1).explain_plan()
            except Exception as exc:
                message = _lance_message(exc)
                try:  # name the fault in the user's own text when it parses on its own
                    self._table.search().where(where).select(["id"]).limit(1).explain_plan()
                except Exception as inner:
                    message = _lance_message(inner)
                else:
                    message = "unexpected text after the end of the expression (one boolean expression only)"
                return f"filter {where!r} is invalid: {message}"
            return None

        error = self._cached(("filter", where), plan)
        if error:
            raise InvalidArgument(error)
        return wrapped

    def _check_columns(self, columns: Sequence[str] | None) -> list[str]:
        names = self._cached("names", lambda: self.schema.names)
        if columns is None:
            return self._cached("light", lambda: light_columns(self.schema))
        cols = list(columns)
        unknown = [c for c in cols if c not in names]
        if unknown:
            raise InvalidArgument(
                f"unknown column(s) {', '.join(unknown)} in collection '{self.name}' (columns: {', '.join(names)})"
            )
        return cols

    def count(self, where: str | None = None, *, version: int | str | None = None) -> int:
        where = self.validate_filter(where)
        table = self._table if version is None else self.at_version(version)
        return table.count_rows(where)

    def scan(
        self,
        where: str | None = None,
        columns: Sequence[str] | None = None,
        *,
        batch_size: int = 8192,
        version: int | str | None = None,
        limit: int | None = None,
        offset: int = 0,
    ) -> Iterator[pa.RecordBatch]:
        """Stream the rows matching ``where`` as Arrow batches (never the whole table)."""
        cols = self._check_columns(columns)
        where = self.validate_filter(where)
        if (limit is not None and limit < 0) or offset < 0 or batch_size < 1:
            raise InvalidArgument("limit and offset must be >= 0 and batch_size >= 1")
        _check_row_count(limit, offset)
        table = self._table if version is None else self.at_version(version)
        q = table.search().select(cols).limit(limit)
        if where:
            q = q.where(where)
        if offset:
            q = q.offset(offset)
        yield from q.to_batches(batch_size)

    def at_version(self, version: int | str) -> lancedb.table.Table:
        """A read-only handle on an old version (number or tag) of this collection."""
        try:
            return self.store._db.open_table(self.name, version=version)
        except (ValueError, RuntimeError, OSError, TypeError, OverflowError) as exc:  # a number past u64
            raise NotFound(f"collection '{self.name}' has no version {version!r}") from exc

    def _select(self, where: str | None, columns: list[str], *, limit: int | None = None,
                offset: int = 0, table: Any = None) -> pa.Table:
        # lancedb's query path (not pylance's scanner) so scalar indexes built by lancedb
        # are used for `id IN (...)` lookups.
        q = (table or self._table).search().select(columns).limit(limit)
        if where:
            q = q.where(where)
        if offset:
            q = q.offset(offset)
        return q.to_arrow()

    def query(
        self,
        where: str | None = None,
        columns: Sequence[str] | None = None,
        *,
        limit: int | None = None,
        offset: int = 0,
    ) -> pa.Table:
        cols = self._check_columns(columns)
        where = self.validate_filter(where)
        if (limit is not None and limit < 0) or offset < 0:
            raise InvalidArgument("limit and offset must be >= 0")
        _check_row_count(limit, offset)
        return self._select(where, cols, limit=limit, offset=offset)

    def take(self, ids: Sequence[str], columns: Sequence[str] | None = None, *,
             version: int | str | None = None) -> pa.Table:
        """Rows for ``ids`` in the order given; ids not present are left out. ``version``
        reads them as they were at an older version (number or tag)."""
        cols = self._check_columns(columns)
        fetch = cols if "id" in cols else ["id", *cols]
        ids = list(ids)
        table = None if version is None else self.at_version(version)
        parts = [self._select(ids_predicate(ids[s:s + ID_CHUNK]), fetch, table=table)
                 for s in range(0, len(ids), ID_CHUNK)]
        if not parts:
            return pa.Table.from_batches([], schema=pa.schema([self.schema.field(c) for c in cols]))
        found = pa.concat_tables(parts)
        position = {v: i for i, v in enumerate(found.column("id").to_pylist())}
        order = [position[i] for i in ids if i in position]
        return found.take(pa.array(order, pa.int64())).select(cols)

    def search(
        self,
        space: str,
        vectors: Any,
        *,
        k: int = 10,
        where: str | None = None,
        columns: Sequence[str] | None = None,
        nprobes: int | None = None,
        refine_factor: int | None = None,
        exact: bool = False,
    ) -> pa.Table:
        """k nearest neighbours of one vector (shape (d,)) or several (shape (n, d)).

        The SQL ``where`` is applied before the search (prefilter). The result holds the
        requested columns plus ``_distance`` (in the space's metric), and ``query_index``
        for several queries, sorted by query then distance. With an index, ``nprobes`` and
        ``refine_factor`` default to the space's tuned policy; ``exact=True`` bypasses it.
        """
        spec = self.space(space)
        if not isinstance(k, int) or isinstance(k, bool) or not 1 <= k <= MAX_K:
            raise InvalidArgument(f"k must be an integer in [1, {MAX_K}], got {k!r}")
        q = np.asarray(vectors, dtype=np.float32) if not isinstance(vectors, np.ndarray) else vectors
        if q.dtype.kind not in "fiu":
            raise InvalidArgument("query vectors must be numbers")
        single = q.ndim == 1
        q = np.atleast_2d(q).astype(np.float32, copy=False)
        if q.ndim != 2 or q.shape[1] != spec.dim or q.shape[0] == 0:
            raise InvalidArgument(
                f"query vector has shape {tuple(np.shape(vectors))}; space '{space}' has dimension {spec.dim}"
            )
        if not np.isfinite(q).all():
            raise InvalidArgument(f"query vector for space '{space}' contains NaN or infinity")
        if spec.metric == "cosine" and not np.linalg.norm(q, axis=1).all():
            # Its cosine distance to anything is undefined: Lance would answer no rows at all.
            raise InvalidArgument(f"query vector for space '{space}' is the zero vector, which has no "
                                  "cosine distance to anything")
        cols = self._check_columns(columns)
        where = self.validate_filter(where)
        indexed = self.vector_index(space) is not None and not exact
        builder = (
            self._table.search(q[0] if single else q, vector_column_name=spec.column)
            .distance_type(spec.metric)
            .limit(k)
            .select([*cols, "_distance"])
        )
        if where:
            builder = builder.where(where, prefilter=True)
        if indexed:
            builder = builder.nprobes(nprobes or spec.index.nprobes).refine_factor(
                refine_factor or spec.index.refine_factor
            )
        else:
            builder = builder.bypass_vector_index()
        result = builder.to_arrow()
        if not single:
            if "query_index" not in result.column_names:  # LanceDB drops it for a 1-row batch
                result = result.add_column(0, "query_index", pa.array(np.zeros(result.num_rows, np.int32)))
            result = result.sort_by([("query_index", "ascending"), ("_distance", "ascending")])
        return result

    # -- versions ------------------------------------------------------------------

    def versions(self) -> list[dict[str, Any]]:
        return [
            {"version": v["version"], "timestamp": v["timestamp"]} for v in self._table.list_versions()
        ]

    def tag(self, tag: str, version: int | None = None) -> int:
        """Tag a version (default: the current one); tagged versions survive cleanup."""
        v = version or self.version
        self._table.tags.create(tag, v)
        return v

    def tags(self) -> dict[str, int]:
        return {k: v["version"] for k, v in self._table.tags.list().items()}

    # -- maintenance ---------------------------------------------------------------

    def vector_index(self, space: str) -> Any | None:
        col = EMB_PREFIX + space
        indices = self._cached("indices", lambda: list(self._table.list_indices()))
        return next((idx for idx in indices if list(idx.columns) == [col]), None)

    def build_index(self, space: str, *, kind: str | None = None) -> str:
        """Build (or rebuild) the vector index of a space now; returns the index kind."""
        return self.build_vector_index(self.space(space), kind=kind)

    def build_vector_index(self, spec: SpaceSpec, *, column: str | None = None,
                           kind: str | None = None) -> str:
        """Build the index ``spec``'s policy asks for on ``column`` (default the space's
        own; a reindex builds on its staging column before the swap, so the new space is
        served indexed from its first moment). Other vector indexes on the column are
        dropped: one index per column, whatever its name."""
        column = column or spec.column
        kind = kind or (spec.index.auto_kind if spec.index.kind in ("auto", "flat") else spec.index.kind)
        rows = self._table.count_rows(f"{column} IS NOT NULL")
        if rows < 256:
            raise FailedPrecondition(
                f"space '{spec.name}' has {rows} vectors; an IVF index needs at least 256 to train"
            )
        p = spec.index
        parts = p.num_partitions or max(1, min(4096, int(np.sqrt(rows))))
        configs = {
            "ivf_rq": lambda: IvfRq(distance_type=spec.metric, num_partitions=parts, num_bits=p.num_bits),
            "ivf_sq": lambda: IvfSq(distance_type=spec.metric, num_partitions=parts),
            "ivf_flat": lambda: IvfFlat(distance_type=spec.metric, num_partitions=parts),
            "ivf_hnsw_sq": lambda: IvfHnswSq(distance_type=spec.metric, num_partitions=max(1, parts // 16)),
            "ivf_pq": lambda: IvfPq(
                distance_type=spec.metric, num_partitions=parts,
                num_sub_vectors=next(s for s in (96, 64, 48, 32, 16, 8, 4, 2, 1) if spec.dim % s == 0 and spec.dim // s >= 4) if spec.dim >= 8 else 1,
            ),
        }
        if kind not in configs:
            raise InvalidArgument(f"index kind '{kind}' is not one of {', '.join(configs)}")
        t0 = time.perf_counter()
        name = f"{column}_idx"
        self._table.create_index(column, config=configs[kind](), replace=True, name=name)
        for idx in self._table.list_indices():
            if list(idx.columns) == [column] and idx.name != name:
                self._table.drop_index(idx.name)
        self._invalidate()
        log.info("built %s index on %s.%s (%d rows) in %.1fs", kind, self.name, column, rows,
                 time.perf_counter() - t0)
        return kind

    def optimize(self, *, cleanup: bool = True, cleanup_older_than: timedelta | None = None) -> OptimizeResult:
        """Compact fragments, bring indexes up to date (building those the policy asks
        for), and remove old versions — keeping tagged ones."""
        with self._optimize_lock:
            return self._optimize_locked(cleanup=cleanup, cleanup_older_than=cleanup_older_than)

    def _optimize_locked(self, *, cleanup: bool, cleanup_older_than: timedelta | None = None) -> OptimizeResult:
        t0 = time.perf_counter()
        before = len(self._table.to_lance().get_fragments())
        built: list[str] = []
        if self._table.count_rows() > 0:
            # Compaction and index update through lancedb (its indexes, its Lance version);
            # version cleanup is done below so that tagged versions are kept, not an error.
            # A concurrent update of rows being rewritten preempts the compaction's commit
            # ("retryable commit conflict"): try again a few times before giving up.
            for attempt in range(_OPTIMIZE_ATTEMPTS):
                try:
                    self._table.optimize(cleanup_older_than=_NEVER)
                    break
                except Exception as exc:
                    if not _commit_conflict(exc) or attempt == _OPTIMIZE_ATTEMPTS - 1:
                        raise
                    log.info("optimize of %s preempted by a concurrent write; retrying", self.name)
                    time.sleep(0.05 * 2**attempt)
            for name, spec in self.spaces.items():
                if spec.index.kind == "flat" or self.vector_index(name) is not None:
                    continue
                rows = self._table.count_rows(f"{spec.column} IS NOT NULL")
                if spec.index.kind != "auto" or rows >= spec.index.threshold_rows:
                    self.build_index(name)
                    built.append(name)
        removed = 0
        if cleanup:
            older = cleanup_older_than if cleanup_older_than is not None else self.store.cleanup_older_than
            stats = self._table.to_lance().cleanup_old_versions(
                older_than=older, error_if_tagged_old_versions=False
            )
            removed = int(stats.old_versions)
        self._table.checkout_latest()
        self._invalidate()
        return OptimizeResult(
            version=self.version,
            fragments_before=before,
            fragments_after=len(self._table.to_lance().get_fragments()),
            versions_removed=removed,
            indexes_built=built,
            seconds=time.perf_counter() - t0,
        )

    def recall_check(
        self,
        space: str,
        *,
        queries: int = 50,
        k: int = 10,
        where: str | None = None,
        tune: bool = True,
        seed: int = 0,
    ) -> RecallReport:
        """Measure recall@k of the space's index against exact search, on stored vectors
        used as queries. With ``tune``, double ``nprobes`` until the policy's target recall
        is met (up to 1024) and save the value in the space registry."""
        spec = self.space(space)
        total = self._table.count_rows(f"{spec.column} IS NOT NULL")
        if total == 0:
            raise FailedPrecondition(f"space '{space}' has no vectors")
        rng = np.random.default_rng(seed)
        # Sample queries by row offset: a few single-row reads, not a scan of the table.
        offsets = np.sort(rng.choice(total, size=min(queries, total), replace=False))
        sample = pa.concat_tables(
            [self._select(f"{spec.column} IS NOT NULL", [spec.column], limit=1, offset=int(o)) for o in offsets]
        )
        q = np.stack(sample.column(spec.column).to_numpy(zero_copy_only=False)).astype(np.float32)
        # Perturb so each query is not trivially its own nearest neighbour.
        q = q + rng.normal(0, 1e-2 * float(np.abs(q).mean() + 1e-12), q.shape).astype(np.float32)
        exact = self.search(space, q, k=k, where=where, columns=["id"], exact=True)
        truth = _group_ids(exact, len(q))
        indexed = self.vector_index(space) is not None
        nprobes = spec.index.nprobes
        tuned = False
        while True:
            approx = self.search(space, q, k=k, where=where, columns=["id"], nprobes=nprobes)
            got = _group_ids(approx, len(q))
            recall = float(np.mean([len(set(a) & set(b)) / max(1, len(b)) for a, b in zip(got, truth, strict=True)]))
            if not (tune and indexed) or recall >= spec.index.target_recall or nprobes >= 1024:
                break
            nprobes *= 2
            tuned = True
        if tuned:
            self.update_space(space, nprobes=nprobes)
        return RecallReport(space=space, recall=recall, k=k, queries=len(q), nprobes=nprobes,
                            refine_factor=spec.index.refine_factor, indexed=indexed, tuned=tuned)

    # -- description ---------------------------------------------------------------

    def describe(self) -> dict[str, Any]:
        schema = self.schema
        indices = {tuple(i.columns): i for i in self._table.list_indices()}
        spaces = {}
        for name, spec in self.spaces.items():
            idx = indices.get((spec.column,))
            spaces[name] = {
                "dim": spec.dim, "metric": spec.metric, "model": spec.model, "normalized": spec.normalized,
                "index_policy": vars(spec.index),
                "index": None if idx is None else {
                    "type": idx.index_type, "indexed_rows": idx.num_indexed_rows,
                    "unindexed_rows": idx.num_unindexed_rows,
                },
            }
        return {
            "name": self.name,
            "uri": f"{self.store.root.rstrip('/')}/{self.name}.lance",
            "rows": self._table.count_rows(),
            "version": self.version,
            "fragments": len(self._table.to_lance().get_fragments()),
            "spaces": spaces,
            "models": {n: {"classes": list(m.classes), "task": m.task} for n, m in self.models.items()},
            "fields": {n: str(t) for n, t in user_fields_of(schema).items()},
            "indices": [{"name": i.name, "type": i.index_type, "columns": list(i.columns)} for i in indices.values()],
            "tags": self.tags(),
            # Reindexes in progress (or interrupted): space -> what the staging column holds.
            "reindexing": {
                f.name[len(EMB_PREFIX):-len(STAGE_SUFFIX)]: {
                    **json.loads(f.metadata[REINDEX_META_KEY]),
                    "rows_done": self._table.count_rows(f"{f.name} IS NOT NULL"),
                }
                for f in schema
                if f.name.startswith(EMB_PREFIX) and f.name.endswith(STAGE_SUFFIX)
                and f.metadata and REINDEX_META_KEY in f.metadata
            },
        }


def _group_ids(result: pa.Table, n: int) -> list[list[str]]:
    out: list[list[str]] = [[] for _ in range(n)]
    for qi, i in zip(result.column("query_index").to_pylist(), result.column("id").to_pylist(), strict=True):
        out[qi].append(i)
    return out


_MAX_ROWS = 2**63 - 1
_OPTIMIZE_ATTEMPTS = 4


def _commit_conflict(exc: BaseException) -> bool:
    return "Retryable commit conflict" in str(exc)


def _check_row_count(limit: int | None, offset: int) -> None:
    if (limit or 0) > _MAX_ROWS or offset > _MAX_ROWS:
        raise InvalidArgument(f"limit and offset must be at most {_MAX_ROWS} (2^63 - 1)")


def _outside_quotes(sql: str) -> str:
    """The characters of ``sql`` that are not inside '...' or "..." literals."""
    out, quote = [], None
    for ch in sql:
        if quote:
            if ch == quote:
                quote = None
        elif ch in "'\"":
            quote = ch
        else:
            out.append(ch)
    return "".join(out)


def _lance_message(exc: Exception) -> str:
    # Lance appends a Rust source location after ", /home/..."; keep the useful part.
    msg = str(exc).replace("Invalid user input: ", "")
    return msg.split(", /")[0].strip()


__all__ = [
    "AssayError", "Collection", "MODEL_META_KEY", "OptimizeResult", "RecallReport", "Store",
    "UpsertResult", "ID_FIELD", "resolve_root", "storage_options_from_env",
]
