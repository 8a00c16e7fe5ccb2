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

import contextlib
import dataclasses
import fcntl
import json
import logging
import os
import shutil
import threading
import time
import uuid
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import lancedb
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from lancedb.index import BTree, IvfFlat, IvfHnswSq, IvfPq, IvfRq, IvfSq, LabelList

from indexing import settings
from indexing.errors import (
    AlreadyExists,
    AssayError,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
)
from indexing.filters import any_row, ids_predicate, object_clauses, validate_filter
from indexing.flat_search import FlatVectors
from indexing.fragment_values import FragmentValues
from indexing.group_commit import CommitSlot, CommitStats, GroupCommitter, PendingWrite
from indexing.id_index import IdIndex, hash_ids, operation_names
from indexing.maintenance import (
    Maintainer,
    MaintenancePolicy,
    fragments_to_keep,
    merge_tiers,
    purge_deleted,
    update_indexes,
)
from indexing.objects import expand
from indexing.objects import objects as object_table
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
from indexing.settings import (
    COMPACT_KEEP_ROWS,
    DEFAULT_ROOT,
    FLAT_CACHE_BYTES,
    FLAT_METADATA_CACHE_BYTES,
    GROUP_COMMIT_LINGER_S,
    ID_CHUNK,
    INDEX_CACHE_BYTES,
    INDEXED_MERGE_MIN_ROWS,
    MAX_K,
    METADATA_CACHE_BYTES,
    MINING_SCORE_CACHE_BYTES,
    ONE_BATCH_MAX_ROWS,
    SCHEMA_RECHECK_S,
    SYSTEM_INDEX_CACHE_BYTES,
    SYSTEM_METADATA_CACHE_BYTES,
    WRITE_LOG_APPLY_ROWS,
    WRITE_LOG_APPLY_WAIT_S,
    WRITE_LOG_BACKLOG_ROWS,
    WRITE_LOG_BATCH_ROWS,
    WRITE_LOG_READ_WAIT_S,
)
from indexing.validation import ID_FIELD, PreparedBatch, prepare_upsert
from indexing.write_log import WriteLog, WriteLogBusy

log = logging.getLogger("assay.store")

_NEVER = timedelta(days=365 * 100)
# Field metadata of a column added for a write that has not committed yet.
PENDING_META_KEY = b"assay:pending"
# Schema metadata of a search's result: the table version it read (an exact search reads
# one; LanceDB's own search, the latest when it ran — this is read just after it).
READ_VERSION_KEY = b"assay:version"
LOCKS_DIR = ".locks"
WRITE_LOG_DIR = ".write_log"  # <root>/.write_log/<collection>/: indexing.write_log
PIN_TAG_PREFIX = "assay-pin-"  # tags that keep a version in use from cleanup


def resolve_root(root: str | None = None) -> str:
    """The data root: the argument, else ``$ASSAY_DATA``, else ``./data``."""
    return root or settings.read("data") or DEFAULT_ROOT


# (setting, Lance storage option): how long a request to the object store may take
# (connecting; the whole request), and how often and for how long a failed one is retried.
# A store that refuses or resets connections is reported in seconds; one that accepts and
# never answers in about (1 + 5 listing retries) x ``timeout``. Defaults: indexing.settings.
OBJECT_STORE_TIMEOUTS = (
    ("ASSAY_S3_CONNECT_TIMEOUT", "connect_timeout"),
    ("ASSAY_S3_TIMEOUT", "timeout"),
    ("ASSAY_S3_MAX_RETRIES", "client_max_retries"),
    ("ASSAY_S3_RETRY_TIMEOUT", "client_retry_timeout"),
)


def storage_options_from_env(root: str) -> dict[str, str]:
    """Object-store options for ``s3://`` roots, from the environment.

    Reads ``ASSAY_S3_ENDPOINT`` (or ``AWS_ENDPOINT_URL``), ``AWS_ACCESS_KEY_ID``,
    ``AWS_SECRET_ACCESS_KEY``, ``AWS_SESSION_TOKEN`` and ``AWS_REGION`` (default
    ``us-east-1``). An ``http://`` endpoint (MinIO, moto, a local gateway) enables
    ``allow_http``. Timeouts and retries of object-store requests come from
    ``ASSAY_S3_CONNECT_TIMEOUT`` (3s), ``ASSAY_S3_TIMEOUT`` (10s, a whole request),
    ``ASSAY_S3_MAX_RETRIES`` (3) and ``ASSAY_S3_RETRY_TIMEOUT`` (10, seconds); see
    ``OBJECT_STORE_TIMEOUTS``. Local roots need no options.
    """
    if "://" not in root or root.startswith("file://"):
        return {}
    opts: dict[str, str] = {}
    endpoint = settings.read("ASSAY_S3_ENDPOINT") or settings.read("AWS_ENDPOINT_URL")
    if endpoint:
        opts["endpoint"] = endpoint
        if endpoint.startswith("http://"):
            opts["allow_http"] = "true"
    for env, key in (
        ("AWS_ACCESS_KEY_ID", "aws_access_key_id"),
        ("AWS_SECRET_ACCESS_KEY", "aws_secret_access_key"),
        ("AWS_SESSION_TOKEN", "aws_session_token"),
    ):
        if value := settings.read(env):
            opts[key] = value
    opts["region"] = settings.read("AWS_REGION") or settings.read("AWS_DEFAULT_REGION") or "us-east-1"
    # Fail within seconds when the store goes away, not after Lance's defaults (10 retries
    # over up to 180 s per request, and Lance retries a listing 5 more times on top).
    for env, key in OBJECT_STORE_TIMEOUTS:
        opts[key] = settings.read(env)
    return opts


@dataclass
class UpsertResult:
    inserted: int
    updated: int
    version: int  # the version holding the rows; 0: acknowledged from the write log, applied after
    generated_ids: int = 0
    new_columns: list[str] = field(default_factory=list)
    # The ids the store generated for rows that came without one, and those rows' numbers
    # in the batch (both in row order): how a caller learns the ids of what it inserted.
    assigned_ids: list[str] = field(default_factory=list)
    assigned_rows: list[int] = field(default_factory=list)


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
        optimize_every: int = 8,
        cleanup_older_than: timedelta = timedelta(minutes=10),
        max_versions: int = 250,
        maintenance: MaintenancePolicy | None = None,
        index_cache_bytes: int = INDEX_CACHE_BYTES,
        metadata_cache_bytes: int = METADATA_CACHE_BYTES,
        flat_cache_bytes: int = FLAT_CACHE_BYTES,
        mining_score_cache_bytes: int = MINING_SCORE_CACHE_BYTES,
        write_log: bool = False,
    ) -> None:
        self.root = resolve_root(root)
        if "://" not in self.root:
            self.root = os.path.abspath(self.root)
            os.makedirs(self.root, exist_ok=True)
        self.storage_options = dict(storage_options or storage_options_from_env(self.root))
        # Upserts acknowledged from each collection's write-ahead log (local roots only: an
        # object store has no cheap append); see indexing.write_log.
        self.write_log = write_log and self.local
        # optimize_every: small fragments merged per compaction (the maintenance fan-out);
        # 0 switches automatic maintenance off.
        self.optimize_every = optimize_every
        self.cleanup_older_than = cleanup_older_than
        # Under a heavy write stream the cleanup window is shortened so that about this many
        # versions are kept (0: no cap): with strong consistency every read lists them. On
        # 150k rows, 1,000 versions (the cap until December 2026) cost a query with a filter
        # and a limit 2.6-4.4 ms more than one version, and a count 0.6-2.0 ms more (CPU, two
        # runs). The soak's default mix commits ~9 versions a second on its small table, ~3.4
        # from 150k rows; in its 30-minute run the lower cap kept less state, at the same speed
        # (README, runs D and E).
        self.max_versions = max_versions
        policy = maintenance or (MaintenancePolicy(fanout=max(2, optimize_every)) if optimize_every else None)
        self.maintainer = Maintainer(policy) if policy is not None else None

        def connect(session: lancedb.Session) -> lancedb.DBConnection:
            return lancedb.connect(self.root, storage_options=self.storage_options or None,
                                   read_consistency_interval=read_consistency_interval, session=session)

        self.session = lancedb.Session(index_cache_size_bytes=index_cache_bytes,
                                       metadata_cache_size_bytes=metadata_cache_bytes)
        self._db = connect(self.session)
        # assay's own tables (runs, results, jobs, datasets) through a connection with
        # caches of their own: each is compacted and its BTREE re-indexed every few dozen
        # writes, and every index version left pages in a shared cache that only its byte
        # bound evicted — a mining-only soak on a table that never changed grew the cache
        # by ~75 KB a run, towards INDEX_CACHE_BYTES (1 GiB), and the server's RSS with it.
        self.system_session = lancedb.Session(index_cache_size_bytes=SYSTEM_INDEX_CACHE_BYTES,
                                              metadata_cache_size_bytes=SYSTEM_METADATA_CACHE_BYTES)
        self._system_db = connect(self.system_session)
        # Vectors of flat-searched spaces held in memory (0: LanceDB searches them alone).
        self.flat_vectors = FlatVectors(flat_cache_bytes)
        # Scores of row-local miners per fragment, kept between mining runs (miners.held_scores).
        self.fragment_values = FragmentValues(mining_score_cache_bytes)
        self._collections: dict[str, Collection] = {}
        self._lock = threading.RLock()
        self._lock_files: dict[str, Any] = {}

    @property
    def local(self) -> bool:
        """True for a folder on this machine (not an object store)."""
        return "://" not in self.root

    @contextlib.contextmanager
    def writer_lock(self, name: str) -> Iterator[None]:
        """Hold collection ``name``'s lock file (``<root>/.locks/<name>.lock``) so writers
        in other processes on this root (a CLI ingest, a Ray driver, another Store) wait;
        threads of this process are already serialised by the collection's commit slot.
        A no-op for object stores, which have no lock."""
        if not self.local:
            yield
            return
        with self._lock:
            fh = self._lock_files.get(name)
            if fh is None:
                os.makedirs(os.path.join(self.root, LOCKS_DIR), exist_ok=True)
                fh = open(os.path.join(self.root, LOCKS_DIR, f"{name}.lock"), "a+b")  # noqa: SIM115
                self._lock_files[name] = fh
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)

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
                # Without Lance's stable row ids (collections created by earlier versions
                # keep them). With them, an update keeps the row's id in its new fragment,
                # so a stream of small updates scatters every fragment's row-id sequence,
                # which the manifest carries and every reader of a new version loads: 1.1 MB
                # after a 10-minute soak (41 KB without), and scans stayed slower after a
                # full compaction (README, "Stable row ids"). ``_rowid`` is then the row's
                # address: stable within a version, which is all the miners read it for
                # (ties, noise, takes at the version they pinned); dataset diffs join on id.
                table = self._db.create_table(name, schema=pa.schema(schema_fields))
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
            if self.write_log:
                col._open_write_log()
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
            return self._upgrade(self._system_db.open_table(name), schema)
        except (ValueError, FileNotFoundError):
            try:
                table = self._system_db.create_table(name, schema=schema)
                if key:
                    table.set_unenforced_primary_key(key)
                return table
            except (ValueError, OSError):  # created concurrently
                return self._system_db.open_table(name)

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
            table = self._system_db.open_table(table.name)
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
            col._recover_pending_fields()
            if self.write_log:
                col._open_write_log()
            self._collections[name] = col
            return col

    def drop_collection(self, name: str) -> None:
        """Drop collection ``name`` (its table and folder). Writes to it are refused from
        now on, and background work on it — an index update or a compaction, which write
        files into the folder — is waited for first: removing the folder under it failed
        with "Directory not empty". The maintainer skips the collection from then on."""
        check_collection_name(name)
        with self._lock:
            if name not in self._table_names():
                raise NotFound(f"collection '{name}' not found under {self.root}")
            col = self._collections.pop(name, None)
        self.flat_vectors.forget(name)
        self.fragment_values.forget(name)
        if col is None:  # never opened by this process: nothing of ours works on it
            self._db.drop_table(name)
            self._remove_write_log(name)
            return
        col._committer.close(discard=True)
        # the order the maintainer takes them (an index update, then the commit slot)
        with col._whole_table_work(True), col._write_lock:
            self._db.drop_table(name)
        col._close_write_log()
        self._remove_write_log(name)

    def _remove_write_log(self, name: str) -> None:
        """A dropped collection's write log goes with it (unless another process holds it)."""
        folder = os.path.join(self.root, WRITE_LOG_DIR, name) if self.local else None
        if folder is None or not os.path.isdir(folder):
            return
        try:
            WriteLog(folder).close()  # fails while another process writes it
        except WriteLogBusy:
            log.warning("the write log %s is held by another process: left in place", folder)
            return
        shutil.rmtree(folder, ignore_errors=True)

    def describe(self, name: str) -> dict[str, Any]:
        return self.collection(name).describe()

    def commit_stats(self) -> dict[str, CommitStats]:
        """What the group committer of each collection open in this process has done since
        it was opened (commits, the writes they held, lingers): a copy of each."""
        with self._lock:
            collections = list(self._collections.items())
        return {name: dataclasses.replace(col._committer.stats, by_kind=dict(col._committer.stats.by_kind))
                for name, col in collections}

    def memory_held(self) -> dict[str, int]:
        """Bytes this store keeps in memory, by holder: LanceDB's caches (``lance_collections``
        for the collections, ``lance_system`` for assay's own tables; each bounded by its
        setting), the vectors held for exact search (``flat_vectors``), the live rows a search
        scores (``live_rows``), the miners' per-fragment scores (``fragment_values``) and the
        write path's id indexes (``id_indexes``: 16 bytes a row, for each collection written
        to since it was opened). What the process's RSS holds beyond these is Python, Arrow
        and Lance working memory; a soak reads both to find what grows."""
        with self._lock:
            collections = list(self._collections.values())
        return {
            "lance_collections": int(self.session.size_bytes),
            "lance_system": int(self.system_session.size_bytes),
            "flat_vectors": self.flat_vectors.nbytes,
            "live_rows": self.flat_vectors.live_rows.nbytes,
            "fragment_values": self.fragment_values.nbytes,
            "id_indexes": sum(col.id_index_bytes for col in collections),
        }

    def close(self, timeout: float | None = 30.0) -> bool:
        """Finish this store's background work before the process lets go of the root: new
        writes are refused (those already queued are still committed), an explicit optimize
        in progress is waited for, and the maintenance thread finishes what it is doing and
        ends — all within ``timeout`` seconds. True when nothing of this store runs on
        return. A server calls it when it stops, so nothing writes under the data root once
        ``stop()`` has returned."""
        deadline = None if timeout is None else time.monotonic() + timeout

        def left() -> float | None:
            return None if deadline is None else max(0.0, deadline - time.monotonic())

        with self._lock:
            collections = list(self._collections.values())
        for col in collections:
            col._committer.close()
        for col in collections:  # logged writes are applied by their applier: wait for it
            if not col._committer.close(left()):
                log.warning("%s: %d write(s) acknowledged from the write log are not applied yet; "
                            "they are applied when the collection is opened next", col.name,
                            col._committer.logged_backlog)
            col._close_write_log()
        idle = self.maintainer is None or self.maintainer.close(left())
        for col in collections:
            wait = left()
            if col._optimize_lock.acquire(timeout=-1 if wait is None else wait):
                col._optimize_lock.release()
            else:
                idle = False
        with self._lock:
            for fh in self._lock_files.values():
                fh.close()
            self._lock_files.clear()
        if not idle:
            log.warning("store %s closed with maintenance still running after %.0f s", self.root, timeout or 0.0)
        return idle


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


#: A model's settings beyond name, classes and task (:class:`~indexing.schema.ModelSpec`).
MODEL_OPTIONS: tuple[str, ...] = ("top_q", "uncertain_threshold", "map_size", "box_embedding_dim")


def _as_model(name: str, spec: Sequence[str] | ModelSpec | Mapping[str, Any]) -> ModelSpec:
    if isinstance(spec, ModelSpec):
        return spec
    if isinstance(spec, Mapping):
        options = {k: spec[k] for k in MODEL_OPTIONS if spec.get(k) is not None}
        return ModelSpec(name=name, classes=tuple(spec["classes"]), task=spec.get("task", "classification"),
                         **options)
    if isinstance(spec, Sequence) and not isinstance(spec, str):
        return ModelSpec(name=name, classes=tuple(str(c) for c in spec))
    raise InvalidArgument(f"model '{name}': give its class names, got {spec!r}")


class Collection:
    """One collection (Lance table). Thread-safe; share one instance per table."""

    def __init__(self, store: Store, name: str, table: lancedb.table.Table) -> None:
        self.store = store
        self.name = name
        self._table = table
        # Held by whoever compacts the whole table or builds/updates its indexes (optimize,
        # a requested index build, background maintenance): two of them at once would do
        # the same minutes of work twice (after a bulk ingest, the optimize job and the
        # maintainer each built the 1M-row vector index, on the same two cores).
        self._optimize_lock = threading.RLock()
        # The commit slot: this process's commits to the table, one at a time (concurrent
        # merge_inserts that touch the same fragments conflict in Lance and retry with
        # backoff). Writes wait for it in the group committer's queue and share commits;
        # schema changes and compaction take it between group commits. Writers in other
        # processes meet the lock file (see Store.writer_lock) and Lance's conflict handling.
        self._write_lock = CommitSlot()
        self._schema_lock = self._write_lock  # schema changes are commits too
        self._committer = GroupCommitter(self._execute_writes, slot=self._write_lock,
                                         linger_s=GROUP_COMMIT_LINGER_S, applied=self._mark_applied,
                                         apply_rows=WRITE_LOG_APPLY_ROWS, apply_wait_s=WRITE_LOG_APPLY_WAIT_S)
        self._ids = IdIndex()  # the write path's existence check (used in the commit slot)
        # The id index is read without the slot by writers logging an upsert (to count its
        # inserts and updates): this lock guards it, with the ids logged and not yet applied.
        self._ids_lock = threading.Lock()
        self._pending_ids: dict[int, int] = {}  # id hash -> logged writes holding it, not applied
        self._log: WriteLog | None = None  # the write-ahead log (Store(write_log=True))
        # Held while an upsert is checked against the schema and logged, and by schema
        # changes that could make a logged write fail (dropping or renaming columns) while
        # they wait for the log to be applied: an acknowledged write always applies.
        self._log_gate = threading.Lock()
        self._schema_generation = 0  # drops and renames so far (they hold the gate)
        self._writes_since_optimize = 0
        # Schema-derived lookups, valid for one table version (see _cached).
        self._cache_version: int | None = None
        self._cache_checked = 0.0
        self._cache: dict[Any, Any] = {}
        self._read_base: Any | None = None  # see read_dataset

    # -- registry ------------------------------------------------------------------

    @property
    def closed(self) -> bool:
        """True once the collection was dropped or its store closed: writes are refused."""
        return self._committer.closed

    @property
    def table(self) -> lancedb.table.Table:
        """The LanceDB table, with every acknowledged write in it (:meth:`sync`)."""
        self.sync()
        return self._table

    @property
    def schema(self) -> pa.Schema:
        return self._table.schema

    @property
    def version(self) -> int:
        """The latest version, holding every acknowledged write (:meth:`sync`)."""
        self.sync()
        return self._table.version

    def sync(self) -> None:
        """The read barrier of the write log: return once every upsert acknowledged from it
        before this call is applied to the table (at most ``WRITE_LOG_READ_WAIT_S``, then
        Unavailable). Every read calls it; without a log, or in the thread that holds the
        commit slot (a commit reading the table), it returns at once."""
        if self._log is not None and not self._write_lock.held():
            self._committer.drain(WRITE_LOG_READ_WAIT_S)

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

    def _keep_cache(self, version: int) -> None:
        """This process's group committer wrote ``version`` directly on the cached one (no
        other commit between) with rows only — no column, index or schema metadata changed —
        so what is cached still holds: under a write stream (7 commits a second in the
        writes-only soak) the schema and registry were otherwise read again, a hop to
        LanceDB's shared event loop, by most validations."""
        if self._cache_version is not None and version == self._cache_version + 1:
            self._cache_version = version

    def _current_schema(self) -> pa.Schema:
        """The schema, memoised like the registry (reading it is a hop to LanceDB's event
        loop, which every caller of the process shares)."""
        return self._cached("schema", lambda: self._table.schema)

    @property
    def spaces(self) -> dict[str, SpaceSpec]:
        return self._cached("spaces", lambda: spaces_of(self._current_schema()))

    @property
    def models(self) -> dict[str, ModelSpec]:
        return self._cached("models", lambda: models_of(self._current_schema()))

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

    def any_match(self, table: lancedb.table.Table, where: str | None) -> bool:
        """Whether a row of ``table`` (this collection's at the version to read: :attr:`table`
        or :meth:`at_version`) passes ``where`` (a checked filter, :meth:`validate_filter`):
        from the live rows kept for ``where`` when a search or a mining run has read them
        (:meth:`LiveRows.holds`: only the fragments written since are read; at 20k rows a
        mining request's validation cost 13.4 ms, most of it in two such scans), else a scan
        that stops at the first match (:func:`indexing.filters.any_row`)."""
        if where:
            dataset = self.read_dataset(table.version)
            live_rows = self.store.flat_vectors.live_rows
            if live_rows.holds(dataset, self.name, where):
                return live_rows.addresses(dataset, self.name, where).size > 0
        return any_row(table, where)

    def read_dataset(self, version: int | str | None = None) -> Any:
        """A version (default: the latest) as a Lance dataset, checked out from one opened
        before, so that they share a session: LanceDB's ``to_lance()`` opens a dataset with a
        session of its own each time, which reads every fragment's file footer again (at 60k
        rows in 12 fragments a filtered scan of row ids cost 13.5 ms of CPU against 10.9, a
        take of 5 rows 6.2 ms against 3.2)."""
        if version is None:
            version = self._table.version
        base = self._read_base
        if base is None:
            # Its own small metadata cache: bounded, and gone with it (release_caches).
            base = self._read_base = self._table.to_lance(metadata_cache_size_bytes=FLAT_METADATA_CACHE_BYTES,
                                                          index_cache_size_bytes=1 << 20)
        if base.version == version:
            return base
        try:
            return base.checkout_version(version)
        except (ValueError, RuntimeError, OSError, TypeError, OverflowError) as exc:
            raise NotFound(f"collection '{self.name}' has no version {version!r}") from exc

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
        indexes and field metadata follow their columns. Index maintenance waits meanwhile
        (see :meth:`drop_fields`)."""
        with self._log_gate:  # logged writes of the old names apply first
            self.sync()
            with self._whole_table_work(True), self._schema_lock:
                self._schema_generation += 1
                self._table.alter_columns(*({"path": old, "rename": new} for old, new in renames.items()))
                self._invalidate()

    def drop_fields(self, names: Sequence[str]) -> None:
        """Drop columns (and their indexes) in one commit; data files are reclaimed by
        compaction and cleanup. Holds the optimize lock, so background index maintenance
        does not run across the drop: an ``optimize_indices`` begun before it and committed
        after it left an index on the dropped column, and every later query failed with
        Lance's "Index referenced a field with id N which did not exist in the schema" (a
        reindex's swap under load, seen once in CI). Writes acknowledged from the write log
        apply first, and none is logged meanwhile."""
        with self._log_gate:
            self.sync()
            with self._whole_table_work(True), self._schema_lock:
                self._schema_generation += 1
                self._table.drop_columns(list(names))
                self._invalidate()

    def add_model(self, name: str, classes: Sequence[str], *, task: str = "classification",
                  **options: Any) -> ModelSpec:
        """Register a model: adds the ``pred_<name>`` struct column (all null). ``options``:
        a segmentation model's ``top_q``, ``uncertain_threshold``, ``map_size``; a detection
        model's ``box_embedding_dim`` (> 0: every box stores a per-box ``embedding`` of that
        length) (:class:`~indexing.schema.ModelSpec`)."""
        unknown = sorted(set(options) - set(MODEL_OPTIONS))
        if unknown:
            raise InvalidArgument(f"model '{name}': unknown setting(s) {', '.join(unknown)} "
                                  "(a segmentation model takes top_q, uncertain_threshold, map_size; "
                                  "a detection model takes box_embedding_dim)")
        spec = ModelSpec(name=name, classes=tuple(str(c) for c in classes), task=task,
                         **{k: v for k, v in options.items() if v is not None})
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
        """Insert or update rows by ``id``. Partial columns update only those columns; new
        user fields and new fixed-size ``emb_*`` spaces become columns, in the same commit
        sequence as the rows that bring them (dropped again if that write fails).

        Raises InvalidArgument (naming column, row and id) before any write if anything in
        the batch is invalid. Concurrent upserts share commits (:mod:`indexing.group_commit`):
        this returns once the commit holding these rows is durable.
        """
        return self.upsert_prepared(data, self.prepare(data))

    def prepare(self, data: Any) -> PreparedBatch:
        """Validate a batch for :meth:`upsert_prepared` (a streamed ingest validates the next
        batch while the previous one commits). Raises InvalidArgument as :meth:`upsert`."""
        self._committer.refuse_if_closed()
        return prepare_upsert(data, current=self._current_schema(), spaces=self.spaces, models=self.models)

    def upsert_prepared(self, data: Any, prepared: PreparedBatch) -> UpsertResult:
        """Commit a batch :meth:`prepare` validated (``data`` is what it was given)."""
        (result,) = self.upsert_prepared_many([(data, prepared)])
        if isinstance(result, BaseException):
            raise result
        return result

    def upsert_prepared_many(self, batches: Sequence[tuple[Any, PreparedBatch]]
                             ) -> list[UpsertResult | BaseException]:
        """Commit several validated batches, in order, sharing commits where their columns
        agree (a later row of an id wins, as if one after another): a streamed ingest hands
        over every batch that arrived while its previous commit ran, so a bulk load writes
        fragments of a few messages each, not one per message. Returns each batch's result or
        the error that failed it."""
        results: list[UpsertResult | BaseException] = []
        if self._log is not None:
            # Batches go through the log until one must be committed first; that one and all
            # after it are committed (queued behind the logged ones: the order holds).
            for _, prepared in batches:
                logged = self._upsert_logged(prepared)
                if logged is None:
                    break
                results.append(logged)
        return results + self.upsert_prepared_many_committed(batches[len(results):])

    def upsert_prepared_many_committed(self, batches: Sequence[tuple[Any, PreparedBatch]]
                                       ) -> list[UpsertResult | BaseException]:
        """:meth:`upsert_prepared_many`, each batch acknowledged after its commit (never
        from the write log)."""
        writes = self._committer.submit_many([
            ("upsert", _upsert_key(prepared.table), (data, prepared), prepared.table.num_rows)
            for data, prepared in batches])
        return [w.error if w.error is not None else w.result for w in writes]

    def _upsert_logged(self, prepared: PreparedBatch) -> UpsertResult | None:
        """Acknowledge a validated upsert from the write log: append it (it survives the
        process from then on, :mod:`indexing.write_log`), queue it for the applier, and
        answer with its inserts and updates as this process knows its ids (the id index
        plus the ids logged and not yet applied; another process's writes
        since the last commit are not seen) and ``version`` 0 — the version that will hold
        it is not known yet (:attr:`version`, or any read, waits for it). None when the
        batch must be committed first instead: it adds columns, is bigger than
        ``WRITE_LOG_BATCH_ROWS``, or the id index is not built yet."""
        table = prepared.table
        if prepared.new_fields or table.num_rows > WRITE_LOG_BATCH_ROWS:
            return None
        hashes = hash_ids(table.column("id"))
        with self._ids_lock:
            if self._ids.version is None:
                return None
            found, _ = self._ids.lookup(hashes)
            pending = self._pending_ids
            inserted = sum(1 for h, known in zip(hashes.tolist(), found.tolist(), strict=True)
                           if not known and h not in pending)
            for h in hashes.tolist():
                pending[h] = pending.get(h, 0) + 1
        wal = self._log
        # The schema is read outside the gate (reading it may wait for LanceDB's event loop,
        # busy with a commit); the gate then checks no drop or rename came in between.
        generation = self._schema_generation
        schema = self._current_schema()
        for f in table.schema:  # a column pending for another write's commit could be dropped
            i = schema.get_field_index(f.name)
            if i < 0 or schema.field(i).type != f.type or PENDING_META_KEY in (schema.field(i).metadata or {}):
                self._forget_pending(hashes)
                return None
        try:
            with self._log_gate:
                if generation != self._schema_generation:
                    self._forget_pending(hashes)
                    return None
                assert wal is not None
                write = self._committer.submit_logged("upsert", _upsert_key(table), (table, prepared),
                                                      table.num_rows, lambda: wal.append(table))
        except BaseException:
            self._forget_pending(hashes)
            raise
        self._committer.wait_for_backlog(write, WRITE_LOG_BACKLOG_ROWS, WRITE_LOG_READ_WAIT_S)
        return UpsertResult(inserted=inserted, updated=table.num_rows - inserted, version=0,
                            generated_ids=prepared.generated_ids,
                            assigned_ids=table.column("id").take(prepared.generated_rows).to_pylist()
                            if prepared.generated_rows else [],
                            assigned_rows=list(prepared.generated_rows))

    def _forget_pending(self, hashes: np.ndarray) -> None:
        with self._ids_lock:
            self._forget_pending_locked(hashes)

    def _forget_pending_locked(self, hashes: np.ndarray) -> None:
        """These logged ids are applied (or were never logged); ``_ids_lock`` held."""
        pending = self._pending_ids
        for h in hashes.tolist():
            left = pending.get(h, 0) - 1
            if left > 0:
                pending[h] = left
            else:
                pending.pop(h, None)

    def _open_write_log(self) -> None:
        """Open this collection's write log and apply what it holds that the table does
        not (writes acknowledged before a crash), before the collection is served. Another
        process holding it: this one writes without a log."""
        folder = os.path.join(self.store.root, WRITE_LOG_DIR, self.name)
        try:
            wal = WriteLog(folder)
        except WriteLogBusy:
            log.warning("%s: the write log is held by another process; upserts are acknowledged "
                        "after their commit here", self.name)
            return
        try:
            records = list(wal.unapplied())
            if records:
                results = self.upsert_prepared_many_committed(
                    [(t, prepare_upsert(t, current=self._current_schema(), spaces=self.spaces,
                                        models=self.models)) for _, t in records])
                failed = [r for r in results if isinstance(r, BaseException)]
                if failed:
                    raise failed[0]
                wal.mark_applied(records[-1][0])
                log.info("%s: applied %d write(s) acknowledged from the write log before the last stop",
                         self.name, len(records))
        except AssayError as exc:
            wal.close()
            raise FailedPrecondition(
                f"collection '{self.name}': the write log {folder} holds acknowledged writes that do not "
                f"apply to the table any more ({exc}); restore the columns they need, or move the "
                "folder away to drop them") from exc
        except BaseException:
            wal.close()
            raise
        self._committer.start_log_at(wal.last_seq)
        self._log = wal

    def _mark_applied(self, seq: int) -> None:
        if self._log is not None:
            self._log.mark_applied(seq)

    def _close_write_log(self) -> None:
        wal, self._log = self._log, None
        if wal is not None:
            wal.close()

    def update_columns(self, table: pa.Table) -> int:
        """Overwrite some columns of rows that exist, by ``id``: no inserts (rows deleted
        meanwhile stay deleted), no validation beyond the table's own types, and
        ``updated_at`` untouched — this is how the store writes values it computed itself
        (a reindex's vectors), not user data. One atomic commit; returns rows updated."""
        self._committer.refuse_if_closed()
        if "id" not in table.column_names or table.num_rows == 0:
            raise InvalidArgument("update_columns needs a non-empty table with an 'id' column")
        fields = [pa.field("id", pa.string(), nullable=False)] + [
            self.schema.field(n) for n in table.column_names if n != "id"
        ]
        batch = pa.Table.from_arrays(
            [table.column(f.name).cast(f.type) for f in fields], schema=pa.schema(fields)
        )
        key = ("update", tuple((f.name, str(f.type)) for f in fields))
        return self._committer.submit("update", key, batch, batch.num_rows)

    def tag_rows(self, *, ids: Sequence[str] | None = None, where: str | None = None,
                 add: Sequence[str] = (), remove: Sequence[str] = ()) -> tuple[int, int]:
        """Add and/or remove item tags (the ``tags`` list column) on the rows named by ids
        or a filter; one atomic commit of the rows whose tags change. Returns (rows
        changed, version). ``updated_at`` is left alone: tags are curation, not content.
        The tags are read and rewritten inside the commit slot, so concurrent taggers
        never lose each other's tags."""
        self._committer.refuse_if_closed()
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
        else:
            where = self.validate_filter(where, for_write=True)
        return self._committer.submit("tags", "tags", (ids, where, add, remove), len(ids or ()) or 1)

    def delete(self, *, ids: Sequence[str] | None = None, where: str | None = None) -> tuple[int, int]:
        """Delete rows by ids or by SQL filter. Returns (rows deleted, new version)."""
        self._committer.refuse_if_closed()
        if (ids is None) == (where is None):
            raise InvalidArgument("delete needs exactly one of ids or where")
        if ids is not None:
            ids = list(ids)
            if not ids:
                raise InvalidArgument("delete: ids is empty")
            if not all(isinstance(i, str) and i for i in ids):
                raise InvalidArgument("delete: ids must be non-empty strings")
            preds = [ids_predicate(ids[s:s + ID_CHUNK]) for s in range(0, len(ids), ID_CHUNK)]
        else:
            preds = [self.validate_filter(where, for_write=True)]
        return self._committer.submit("delete", "delete", _Deletion(preds, ids), len(ids or ()) or 1)

    # -- the commits (run by the group committer, holding the commit slot) ----------

    def _execute_writes(self, kind: str, writes: Sequence[PendingWrite]) -> None:
        executor = {"upsert": self._commit_upserts, "update": self._commit_updates,
                    "tags": self._commit_tags, "delete": self._commit_deletes}[kind]
        executor(writes)
        self._after_write()

    def _commit_upserts(self, writes: Sequence[PendingWrite]) -> None:
        ready: list[tuple[PendingWrite, PreparedBatch]] = []
        for w in writes:
            data, prepared = w.payload
            if prepared.new_fields and any(f.name in self.schema.names for f in prepared.new_fields):
                # Another write added some of these columns first (perhaps with other types
                # that this batch must now be cast to): validate again against the schema.
                try:
                    prepared = prepare_upsert(data, current=self.schema, spaces=self.spaces,
                                              models=self.models)
                except AssayError as exc:
                    w.finish(error=exc)
                    continue
            ready.append((w, prepared))
        if len({p.table.schema for _, p in ready}) > 1:  # a race changed one batch's types
            for item in ready:
                self._commit_upsert_group([item])
        elif ready:
            self._commit_upsert_group(ready)

    def _commit_upsert_group(self, group: list[tuple[PendingWrite, PreparedBatch]]) -> None:
        """One commit for upserts of the same columns: a later write of an id wins, as if
        they had run one after another."""
        tables = [p.table for _, p in group]
        combined = tables[0] if len(tables) == 1 else _last_of_each_id(pa.concat_tables(tables))
        added = self._add_pending_fields([f for _, p in group for f in p.new_fields])
        try:
            # The lock file keeps other processes' writers of this store out between the
            # check for existing ids and the write: rows found new may then be appended,
            # several times faster than a merge (object stores have no lock: always merge).
            with self.store.writer_lock(self.name):
                hashes, found, created = self._existing_ids(combined.column("id"))
                batch, now_us = self._with_timestamps(combined, found, created)
                batch = _one_batch(batch)
                if not found.any() and self.store.local:
                    version = int(self._table.add(batch).version)
                elif (whole := self._whole_rows(batch, found)) is not None:
                    version = int(self._merge(use_index=True).when_not_matched_insert_all().execute(
                        _one_batch(whole)).version)
                else:
                    version = int(self._merge().when_not_matched_insert_all().execute(batch).version)
                new = hashes[~found]
                applied = [hash_ids(p.table.column("id")) for w, p in group if w.log_seq]
                with self._ids_lock:
                    self._ids.committed(version, inserted=new, created_us=np.full(len(new), now_us))
                    for logged in applied:  # in the index now: no longer pending
                        self._forget_pending_locked(logged)
                self._keep_cache(version)
        except BaseException:
            self._drop_pending_fields(added)
            raise
        self._settle_pending_fields(added)
        present = set(hashes[found].tolist()) if len(group) > 1 else None
        n_found = int(found.sum())
        for w, p in group:
            n = p.table.num_rows
            if present is None:
                inserted = n - n_found
            else:
                mine = hash_ids(p.table.column("id")).tolist()
                inserted = sum(1 for i in mine if i not in present)
                present.update(mine)
            w.finish(UpsertResult(inserted=inserted, updated=n - inserted, version=version,
                                  generated_ids=p.generated_ids,
                                  new_columns=[f.name for f in added],
                                  assigned_ids=p.table.column("id").take(p.generated_rows).to_pylist()
                                  if p.generated_rows else [],
                                  assigned_rows=list(p.generated_rows)))

    def _commit_updates(self, writes: Sequence[PendingWrite]) -> None:
        tables = [w.payload for w in writes]
        batch = _one_batch(tables[0] if len(tables) == 1 else _last_of_each_id(pa.concat_tables(tables)))
        present = None
        if len(writes) > 1:  # an update never inserts: a writer's rows updated are its ids that exist
            hashes, found, _ = self._existing_ids(batch.column("id"))
            present = set(hashes[found].tolist())
        result = self._merge().execute(batch)
        with self._ids_lock:
            self._ids.committed(int(result.version))
        self._keep_cache(int(result.version))
        if present is None:
            writes[0].finish(int(result.num_updated_rows))
            return
        for w in writes:
            w.finish(sum(1 for h in hash_ids(w.payload.column("id")).tolist() if h in present))

    def _commit_tags(self, writes: Sequence[PendingWrite]) -> None:
        """Tag changes of several writers in one commit: each is applied, in order, to the
        tags as the writers before it left them."""
        state: dict[str, list[str]] = {}  # id -> tags after the writes so far
        original: dict[str, list[str]] = {}
        counts: list[int] = []
        for w in writes:
            ids, where, add, remove = w.payload
            if ids is not None:
                rows = pa.concat_tables([
                    self._select(ids_predicate(ids[s:s + ID_CHUNK]), ["id", "tags"])
                    for s in range(0, len(ids), ID_CHUNK)
                ])
            else:
                rows = pa.Table.from_batches(
                    list(self._table.search().where(where).select(["id", "tags"]).limit(None)
                         .to_batches(65_536)),
                    schema=pa.schema([self.schema.field("id"), self.schema.field("tags")]))
            drop, changed = set(remove), 0
            for i, tags in zip(rows.column("id").to_pylist(), rows.column("tags").to_pylist(), strict=True):
                original.setdefault(i, tags or [])
                old = state.get(i, original[i])
                new = [t for t in old if t not in drop]
                new += [t for t in add if t not in new]
                if new != old:
                    state[i] = new
                    changed += 1
            counts.append(changed)
        changed_ids = [i for i, tags in state.items() if tags != original[i]]
        version = self.version
        if changed_ids:
            batch = pa.table({"id": pa.array(changed_ids, pa.string()),
                              "tags": pa.array([state[i] for i in changed_ids], pa.list_(pa.string()))},
                             schema=pa.schema([pa.field("id", pa.string(), nullable=False),
                                               self.schema.field("tags")]))
            version = int(self._merge().execute(batch).version)
            with self._ids_lock:
                self._ids.committed(version)
            self._keep_cache(version)
        for w, n in zip(writes, counts, strict=True):
            w.finish((n, version))

    def _commit_deletes(self, writes: Sequence[PendingWrite]) -> None:
        """Deletes of several writers in one commit (their predicates OR-ed); each is told
        the rows its own predicate matched when the commit ran."""
        counts = [sum(int(self._table.count_rows(p)) for p in w.payload.predicates) for w in writes]
        version = self.version
        if sum(counts):
            preds = [p for w in writes for p in w.payload.predicates]
            result = self._table.delete(preds[0] if len(preds) == 1 else " OR ".join(f"({p})" for p in preds))
            version = int(result.version)
            self._keep_cache(version)
            by_ids = [w.payload.ids for w in writes]
            with self._ids_lock:
                if all(ids is not None for ids in by_ids):
                    self._ids.committed(version, removed=hash_ids([i for ids in by_ids for i in ids]))
                else:  # which ids a filter removed is not known here: read them again next time
                    self._ids.invalidate()
        for w, n in zip(writes, counts, strict=True):
            w.finish((n, version))

    def _merge(self, *, use_index: bool = False) -> Any:
        """``merge_insert`` on ``id`` updating matched rows — joined by a scan of ``id``, not
        through the BTREE: with the index, Lance 13 updates a batch that carries some of the
        columns by rewriting every fragment it touches (1M rows, 160 rows updated: ~2 s a
        merge, against ~0.2 s joined by a scan, which deletes and appends the rows).
        ``use_index`` only for a batch of whole rows (:meth:`_whole_rows`)."""
        return self._table.merge_insert("id").when_matched_update_all().use_index(use_index)

    def _whole_rows(self, batch: pa.Table, found: np.ndarray) -> pa.Table | None:
        """``batch`` with every column of the table, for a merge through the BTREE on ``id``
        (whole rows: the partial-column rewrite of :meth:`_merge` does not arise): a column
        the batch lacks is filled with the stored values of the rows that exist (``found``;
        one ``id IN (...)`` lookup through the same index) and null for new rows — what a
        merge of the columns given leaves in them. The scan join it replaces reads every
        ``id`` of the table per commit: 20-row upserts (10 of them updates) of the soak's
        rows took 85.2 ms on 400k rows and 42.4–46.4 on 170k; whole, through the index, 46.5
        and 34.6–36.5 ms — but 30.9 against 30.7 ms on 120k and 31.2 against 21.6 on 20k
        (``bench/upsert_merge.py``, README), so below ``INDEXED_MERGE_MIN_ROWS`` rows the
        scan stays. None (merge by a scan) there, above
        ``ID_CHUNK`` existing rows, where one scan is the cheaper read, or if the lookup
        does not find them all."""
        existing = int(found.sum())
        if existing > ID_CHUNK or self._ids.rows < INDEXED_MERGE_MIN_ROWS:
            return None
        schema = self.schema
        missing = [f.name for f in schema if f.name not in batch.column_names]
        ids = batch.column("id")
        filled: dict[str, pa.ChunkedArray | pa.Array] = {}
        if missing and existing:
            stored = self._select(ids_predicate(ids.filter(pa.array(found)).to_pylist()), ["id", *missing])
            if stored.num_rows != existing:  # the id index and the table disagree: merge by a scan
                return None
            at = pc.index_in(ids, value_set=stored.column("id").combine_chunks())  # null: a new row
            filled = {name: stored.column(name).take(at) for name in missing}
        columns = [batch.column(f.name) if f.name in batch.column_names
                   else filled.get(f.name, pa.nulls(batch.num_rows, f.type)) for f in schema]
        return pa.Table.from_arrays([c.cast(f.type) for c, f in zip(columns, schema, strict=True)], schema=schema)

    def _existing_ids(self, ids: pa.ChunkedArray | pa.Array) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(hashes, exists, created_at µs) of ``ids`` as of the latest version, from the
        collection's in-memory id index (:mod:`indexing.id_index`), rebuilt from one scan
        of ``id`` and ``created_at`` when another process has written since."""
        hashes = hash_ids(ids)
        # The table's version, not a Lance dataset opened at it (~2 ms after each commit):
        # one is opened only to read other commits' transactions or to rebuild.
        latest = int(self._table.version)
        with self._ids_lock:
            if not self._ids.current(
                    latest, lambda versions: operation_names(self._table.to_lance(), versions)):
                dataset = self._table.to_lance()
                self._ids.rebuild(dataset.version,
                                  dataset.to_batches(columns=["id", "created_at"], batch_size=262_144))
            found, created = self._ids.lookup(hashes)
        return hashes, found, created

    def _with_timestamps(self, table: pa.Table, found: np.ndarray,
                         created_us: np.ndarray) -> tuple[pa.Table, int]:
        """Add ``updated_at`` = now and ``created_at`` = first-seen time (kept on update):
        merge_insert writes one set of columns for matched and new rows alike, so the
        stored ``created_at`` of existing ids is sent back. Returns the table and now (µs)."""
        ts = pa.timestamp("us", tz="UTC")
        now_us = int(datetime.now(UTC).timestamp() * 1_000_000)
        created = np.where(found, created_us, now_us)
        return table.append_column(pa.field("created_at", ts), pa.array(created, ts)).append_column(
            pa.field("updated_at", ts), pa.array(np.full(table.num_rows, now_us), ts)), now_us

    # -- schema changes that travel with a write ------------------------------------

    def _add_pending_fields(self, fields: Sequence[pa.Field]) -> list[pa.Field]:
        """Add the columns a write brings, marked pending until the write commits: a crash
        in between leaves a marked, all-null column that the next open drops."""
        if not fields:
            return []
        with self._schema_lock:
            present = set(self.schema.names)
            unique: dict[str, pa.Field] = {}
            for f in fields:
                if f.name not in present:
                    unique.setdefault(f.name, f)
            if not unique:
                return []
            marked = [f.with_metadata({**(f.metadata or {}), PENDING_META_KEY: b"1"})
                      for f in unique.values()]
            self._table.add_columns(marked)
            self._invalidate()
            return list(unique.values())

    def _settle_pending_fields(self, fields: Sequence[pa.Field]) -> None:
        """The write committed: the new columns are ordinary columns from now on (one
        metadata commit removes their marks)."""
        if not fields:
            return
        with self._schema_lock:
            self._table.update_field_metadata(
                *({"path": f.name, "metadata": {PENDING_META_KEY.decode(): None}} for f in fields))
            self._invalidate()

    def _drop_pending_fields(self, fields: Sequence[pa.Field]) -> None:
        if not fields:
            return
        try:
            with self._schema_lock:
                self._table.drop_columns([f.name for f in fields])
                self._invalidate()
        except Exception:  # the next open drops them (they are still marked pending)
            log.exception("could not drop the columns %s of a failed write from %s",
                          [f.name for f in fields], self.name)

    def _recover_pending_fields(self) -> None:
        """Columns still marked pending were added for a write that never committed (the
        process died in between): drop them when they hold no value, else the write did
        commit and only the mark is left to clear."""
        pending = [f for f in self.schema if f.metadata and PENDING_META_KEY in f.metadata]
        if not pending:
            return
        with self._write_lock:
            empty = [f for f in pending if self._table.count_rows(f"{f.name} IS NOT NULL") == 0]
            if empty:
                log.warning("dropping column(s) %s of %s: added for a write that did not commit",
                            ", ".join(f.name for f in empty), self.name)
                self._drop_pending_fields(empty)
            self._settle_pending_fields([f for f in pending if f not in empty])

    def _after_write(self) -> None:
        """Tell the store's maintainer a commit happened (no I/O here: compaction, index
        updates and cleanup run in its thread, see :mod:`indexing.maintenance`)."""
        if self.store.maintainer is not None:
            self.store.maintainer.committed(self)

    @property
    def id_index_bytes(self) -> int:
        """Memory of the write path's id index (:mod:`indexing.id_index`)."""
        with self._ids_lock:
            return self._ids.nbytes

    def wait_for_maintenance(self, timeout: float | None = None) -> bool:
        """Wait until the store's background maintenance is idle; True if it is."""
        return self.store.maintainer is None or self.store.maintainer.wait_idle(timeout)

    # -- reads ---------------------------------------------------------------------

    def validate_filter(self, where: str | None, table: Any = None, *, for_write: bool = False) -> str | None:
        """Check a SQL filter against this table before it runs; InvalidArgument if bad.
        Returns the filter in the form it must be sent to Lance — run that, never the
        text given (see :func:`indexing.filters.check_filter`). Planning is memoised per
        table version.

        ``any_object(<predicate>)`` clauses (:mod:`indexing.objects`) are expanded to id
        predicates on ``table`` — the version the filter will run on (default: the current
        one) — so box predicates see the same rows as the rest of the filter. Such a filter
        depends on the data, so it is not memoised. ``for_write``: the filter of a delete,
        tag or membership change, which commits on a later version: box clauses become
        the ids that matched (never "every id but these")."""
        if where is not None and object_clauses(where):
            target = self._table if table is None else table  # the version that will be read
            return validate_filter(target, expand(target, where, positive=for_write))
        return validate_filter(self._table, where, self._cached)

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

    def read_table(self, version: int | str | None, where: str | None) -> Any:
        """The table a read runs on: ``version``, else the current one — pinned when the
        filter has box clauses, so they are expanded on the version the filter then runs on
        even while others write."""
        self.sync()
        if version is not None:
            return self.at_version(version)
        if where is not None and object_clauses(where):
            return self.at_version(self._table.version)
        return self._table

    def count(self, where: str | None = None, *, version: int | str | None = None) -> int:
        table = self.read_table(version, where)
        where = self.validate_filter(where, table)
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
        table = self.read_table(version, where)
        where = self.validate_filter(where, table)
        if (limit is not None and limit < 0) or offset < 0 or batch_size < 1:
            raise InvalidArgument("limit and offset must be >= 0 and batch_size >= 1")
        _check_row_count(limit, offset)
        q = table.search().select(cols).limit(limit)
        if where:
            q = q.where(where)
        if offset:
            q = q.offset(offset)
        yield from q.to_batches(batch_size)

    def objects(self, where: str | None = None, objects_where: str | None = None, *,
                source: str | Sequence[str] | None = None, columns: Sequence[str] | None = None,
                limit: int | None = None, version: int | str | None = None) -> pa.Table:
        """Object rows (:mod:`indexing.objects`) of the images matching ``where`` (which may
        hold ``any_object(...)`` clauses), keeping the objects matching ``objects_where``
        from ``source`` (a detection model's name or ``"gt"``; default all), projected to
        ``columns``; at most ``limit`` rows, read at ``version`` (default: current)."""
        self.sync()
        if limit is not None and (not isinstance(limit, int) or limit < 0):
            raise InvalidArgument(f"limit must be an integer >= 0, got {limit!r}")
        _check_row_count(limit, 0)
        table = self.at_version(self._table.version if version is None else version)  # one version throughout
        return object_table(table, where, objects_where, source=source, columns=columns, limit=limit)

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
        table = self.read_table(None, where)
        where = self.validate_filter(where, table)
        if (limit is not None and limit < 0) or offset < 0:
            raise InvalidArgument("limit and offset must be >= 0")
        _check_row_count(limit, offset)
        return self._select(where, cols, limit=limit, offset=offset, table=table)

    def take(self, ids: Sequence[str], columns: Sequence[str] | None = None, *,
             version: int | str | None = None) -> pa.Table:
        """Rows for ``ids`` in the order given; ids not present are left out. ``version``
        reads them as they were at an older version (number or tag)."""
        self.sync()
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
        self.sync()
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
        if not indexed:  # exact: over the vectors held in memory, if they fit (indexing.flat_search)
            dataset = self.read_dataset()
            hits = self.store.flat_vectors.search(dataset, self.name, spec.column, q, k=k,
                                                  metric=spec.metric, where=where, columns=cols)
            if hits is not None:
                return _with_read_version(hits.drop_columns(["query_index"]) if single else hits, dataset.version)
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
        return _with_read_version(result, self._table.version)

    # -- versions ------------------------------------------------------------------

    def versions(self) -> list[dict[str, Any]]:
        self.sync()
        return [
            {"version": v["version"], "timestamp": v["timestamp"]} for v in self._table.list_versions()
        ]

    def tag(self, tag: str, version: int | None = None) -> int:
        """Tag a version (default: the current one); tagged versions survive cleanup."""
        v = version or self.version
        self._table.tags.create(tag, v)
        return v

    def tags(self) -> dict[str, int]:
        """Tag name -> version (the store's own pins of versions in use left out)."""
        return {k: v["version"] for k, v in self._table.tags.list().items() if not k.startswith(PIN_TAG_PREFIX)}

    # -- maintenance ---------------------------------------------------------------

    def vector_index(self, space: str) -> Any | None:
        col = EMB_PREFIX + space
        indices = self._cached("indices", lambda: list(self._table.list_indices()))
        return next((idx for idx in indices if list(idx.columns) == [col]), None)

    def build_index(self, space: str, *, kind: str | None = None) -> str:
        """Build (or rebuild) the vector index of a space now, then tune its ``nprobes`` to
        the policy's target recall (:meth:`tune_index`); returns the index kind."""
        with self._optimize_lock:
            kind = self.build_vector_index(self.space(space), kind=kind)
            self.tune_index(space)
        return kind

    def tune_index(self, space: str) -> RecallReport | None:
        """Raise the space's ``nprobes`` until its index meets the policy's target recall
        (:meth:`recall_check` with ``tune``), so an index built automatically serves the
        recall the policy promises from its first query: at the default nprobes an IVF index
        of weakly clustered vectors misses many of the true neighbours. Returns the
        report, or None when the space has no index."""
        if self.vector_index(space) is None:
            return None
        report = self.recall_check(space, tune=True)
        log.info("index of %s.%s: recall@%d %.3f at nprobes %d%s", self.name, space, report.k, report.recall,
                 report.nprobes, " (raised to reach the target)" if report.tuned else "")
        return report

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
        try:
            self._table.create_index(column, config=configs[kind](), replace=True, name=name)
        except Exception as exc:
            if not _commit_conflict(exc):
                raise
            # Background maintenance committed an index build meanwhile (a user's build
            # racing the automatic one): build once more on the latest version.
            self._table.checkout_latest()
            self._table.create_index(column, config=configs[kind](), replace=True, name=name)
        for idx in self._table.list_indices():
            if list(idx.columns) == [column] and idx.name != name:
                self._table.drop_index(idx.name)
        self._invalidate()
        self.store.flat_vectors.forget(self.name)  # searched through the index from now on
        log.info("built %s index on %s.%s (%d rows) in %.1fs", kind, self.name, column, rows,
                 time.perf_counter() - t0)
        return kind

    def optimize(self, *, cleanup: bool = True, cleanup_older_than: timedelta | None = None) -> OptimizeResult:
        """Compact fragments (materialising deleted rows), bring indexes up to date
        (building those the policy asks for), and remove old versions — keeping tagged
        ones. Concurrent writes go on; if they keep preempting the compaction it finally
        runs holding the commit slot (writes wait for it)."""
        with self._optimize_lock:
            t0 = time.perf_counter()
            before = len(self._table.to_lance().get_fragments())
            built: list[str] = []
            if self._table.count_rows() > 0:
                self.compact_all(attempts=_OPTIMIZE_ATTEMPTS, then_hold_slot=True)
                built = self.update_indexes()
            removed = self.cleanup_versions(cleanup_older_than) if cleanup else 0
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

    def compact_tiers(self, policy: MaintenancePolicy) -> int:
        """Merge small fragments tier by tier and purge the worst deleted rows (see
        :mod:`indexing.maintenance`), holding the commit slot so no write can preempt the
        compaction. Returns fragments removed."""
        with self._write_lock:
            removed = merge_tiers(self._table, policy)
            purged = purge_deleted(self._table, policy)
            if removed or purged:
                self._invalidate()
        return removed

    def release_caches(self) -> None:
        """Free what the write path keeps in memory (the id index: 16 bytes a row); the next
        write reads it again."""
        with self._write_lock, self._ids_lock:
            self._ids.invalidate()
        self._read_base = None

    def row_count(self) -> int:
        """Rows in the table as applied (for maintenance: no wait for the write log; a
        caller's count is :meth:`count`)."""
        return int(self._table.count_rows())

    def fragment_count(self) -> int:
        return len(self._table.to_lance().get_fragments())

    def unindexed_rows(self) -> int:
        """Rows not yet in the ``id`` index (what every index update would add)."""
        stats = self._table.index_stats("id_idx")
        return 0 if stats is None else int(stats.num_unindexed_rows)

    def compact_all(self, *, attempts: int = 1, then_hold_slot: bool = False, wait: bool = True) -> None:
        """Compaction of what is worth rewriting: fragments below ``COMPACT_KEEP_ROWS`` rows
        (small writes, tiers) are merged, and fragments with over 10% of their rows deleted
        are rewritten without them; big fragments otherwise stay as they are (a bulk ingest's
        50k-row fragments are fine to scan, and rewriting a 10M-row table to merge them would
        cost as much as the ingest). Runs without holding the commit slot; a concurrent
        write that preempts it makes it try again, and with ``then_hold_slot`` the last
        attempt holds the slot. Without ``wait``, does nothing while another thread
        optimizes the collection or builds its indexes (background maintenance)."""
        with self._whole_table_work(wait) as ours:
            if ours:
                self._compact_all(attempts, then_hold_slot)

    def _compact_all(self, attempts: int, then_hold_slot: bool) -> None:
        def run() -> None:
            ds = self._table.to_lance()
            ds.optimize.compact_files(excluded_fragment_ids=fragments_to_keep(ds, COMPACT_KEEP_ROWS))

        for attempt in range(attempts):
            try:
                run()
                break
            except Exception as exc:
                if not _commit_conflict(exc):
                    raise
                if attempt == attempts - 1:
                    if not then_hold_slot:
                        raise
                    with self._write_lock:
                        self._table.checkout_latest()
                        run()
                    break
                log.info("compaction of %s preempted by a concurrent write; retrying", self.name)
                time.sleep(0.05 * 2**attempt)
        self._table.checkout_latest()
        self._invalidate()

    def update_indexes(self, *, build: bool = True, wait: bool = True) -> list[str]:
        """Add new rows to the existing indexes, and (``build``) build the vector indexes the
        spaces' policies ask for now; returns the spaces whose index was built. Without
        ``wait``, does nothing while another thread optimizes the collection or builds an
        index (the background maintainer: that thread is doing this work already)."""
        with self._whole_table_work(wait) as ours:
            return self._update_indexes(build) if ours else []

    @contextlib.contextmanager
    def _whole_table_work(self, wait: bool) -> Iterator[bool]:
        """Hold ``_optimize_lock`` for the block (True); without ``wait``, False at once when
        another thread holds it (it is doing this work)."""
        if not self._optimize_lock.acquire(blocking=wait):
            yield False
            return
        try:
            yield True
        finally:
            self._optimize_lock.release()

    def _update_indexes(self, build: bool) -> list[str]:
        try:
            update_indexes(self._table.to_lance())
        except Exception as exc:
            if not _commit_conflict(exc):
                raise
            with self._write_lock:  # a write preempted it: once more, holding the slot
                self._table.checkout_latest()
                update_indexes(self._table.to_lance())
        self._table.checkout_latest()
        self._invalidate()
        built = self._spaces_due_an_index() if build else []
        for name in built:
            self.build_index(name)
        return built

    def _spaces_due_an_index(self) -> list[str]:
        """Spaces whose policy asks for a vector index they do not have yet."""
        due = []
        for name, spec in self.spaces.items():
            if spec.index.kind == "flat" or self.vector_index(name) is not None:
                continue
            if spec.index.wants_index(self._table.count_rows(f"{spec.column} IS NOT NULL"), spec.dim):
                due.append(name)
        return due

    def vector_index_due(self) -> bool:
        return bool(self._spaces_due_an_index())

    def cleanup_versions(self, older_than: timedelta | None = None) -> int:
        """Remove versions older than ``older_than`` (default: the store's setting), except
        tagged ones (datasets, pinned versions); returns how many went. Pins left by a
        process that died (named by its pid) are removed first, on local roots."""
        if self.store.local:
            for tag in self._table.tags.list():
                if tag.startswith(PIN_TAG_PREFIX) and not _pid_alive(tag[len(PIN_TAG_PREFIX):].split("-")[0]):
                    self._table.tags.delete(tag)
        ds = self._table.to_lance()  # one dataset handle for the window and the cleanup
        older = older_than if older_than is not None else self._retention(ds)
        stats = ds.cleanup_old_versions(older_than=older, error_if_tagged_old_versions=False)
        return int(stats.old_versions)

    def _retention(self, ds: Any) -> timedelta:
        """How old an untagged version must be to go: the store's ``cleanup_older_than``,
        shortened under a heavy write stream to the age of the ``max_versions``-th newest
        version (never below ``MIN_RETENTION``). Each read checks for the latest version by
        listing them (strong consistency), so thousands kept cost every read: on 140k rows,
        4,000 versions took a search from 12 to 19 ms and a filtered query from 4 to 13 ms.
        A soak's ~7 commits/s kept ~4,000 in 10 minutes; with the cap (and cleanups every
        20 s), 250-800: the floor of one minute holds more than 250 at more than 4 commits/s."""
        older, cap = self.store.cleanup_older_than, self.store.max_versions
        if not cap:
            return older
        versions = ds.versions()
        if len(versions) <= cap:
            return older
        stamp = sorted(versions, key=lambda v: v["version"])[-cap]["timestamp"]
        age = datetime.now(stamp.tzinfo) - stamp
        return max(MIN_RETENTION, min(older, age))

    @contextlib.contextmanager
    def pin_version(self, version: int) -> Iterator[int]:
        """Keep ``version`` from version cleanup while the block runs (a mining run reading
        it for longer than the cleanup window): a tag, removed at the end."""
        tag = f"{PIN_TAG_PREFIX}{os.getpid()}-{uuid.uuid4().hex[:12]}"
        try:
            self._table.tags.create(tag, version)
        except Exception as exc:  # the version is already gone (or never was)
            raise NotFound(f"collection '{self.name}' has no version {version!r}") from exc
        try:
            yield version
        finally:
            try:
                self._table.tags.delete(tag)
            except Exception:
                log.warning("could not remove the pin tag %s of %s", tag, self.name)

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
        # Sample queries by row offset, not by a scan of the table. When every row has a
        # vector, one random-access take reads them (1M x 384: ~0.1 s); otherwise one
        # filtered read per offset, each of which scans up to its offset (28 s for 50).
        offsets = np.sort(rng.choice(total, size=min(queries, total), replace=False))
        if total == self._table.count_rows():
            sample = self._table.to_lance().take(offsets.tolist(), columns=[spec.column])
        else:
            sample = pa.concat_tables([self._select(f"{spec.column} IS NOT NULL", [spec.column], limit=1,
                                                    offset=int(o)) for o in offsets])
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
                "index_threshold_rows": spec.index.threshold_for(spec.dim),  # what "auto" uses
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
            "models": {n: {"classes": list(m.classes), "task": m.task, **m.settings()}
                       for n, m in self.models.items()},
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


def _with_read_version(result: pa.Table, version: int) -> pa.Table:
    return result.replace_schema_metadata({**(result.schema.metadata or {}), READ_VERSION_KEY: str(version).encode()})


_MAX_ROWS = 2**63 - 1
_OPTIMIZE_ATTEMPTS = 4
#: the shortest cleanup window the version cap may set (a read or a page cursor in use)
MIN_RETENTION = timedelta(minutes=1)


def _commit_conflict(exc: BaseException) -> bool:
    return "Retryable commit conflict" in str(exc)


def _check_row_count(limit: int | None, offset: int) -> None:
    if (limit or 0) > _MAX_ROWS or offset > _MAX_ROWS:
        raise InvalidArgument(f"limit and offset must be at most {_MAX_ROWS} (2^63 - 1)")


@dataclass(frozen=True)
class _Deletion:
    predicates: list[str]
    ids: list[str] | None  # None: by a filter


def _pid_alive(pid: str) -> bool:
    try:
        os.kill(int(pid), 0)
    except (ValueError, ProcessLookupError):
        return False
    except PermissionError:  # alive, another user's
        return True
    return True


def _one_batch(table: pa.Table) -> pa.Table:
    """``table`` as one record batch, for a LanceDB write of up to ``ONE_BATCH_MAX_ROWS``
    rows. LanceDB's Python layer passes the data on batch by batch through Python
    generators (casting to the table's schema, checking vectors), each step taking the GIL
    back; a group commit of 16 writers is 16 chunks. While another thread runs Python (the
    server's handlers validating the next writes, searches), every hand-back waits a switch
    interval: a merge of 320 rows in 16 chunks into an 80k-row collection took 1.76 s beside
    one busy Python thread, one batch of the same rows 0.16 s (alone 38 and 29 ms;
    ``bench/group_batches.py``). Bigger writes (a streamed bulk ingest's groups of messages
    of thousands of rows) are passed on as they are: there a few hand-backs are small
    against the write, and a copy is not — with a bound of 65,536 rows, the streamed 1M-row
    ingest of ``bench/scale.py`` (50,000-row batches) went from 119,790 to 93,075 and 97,446
    rows/s and its peak RSS from 0.79 to 0.99 GiB."""
    if table.num_rows > ONE_BATCH_MAX_ROWS or all(c.num_chunks <= 1 for c in table.columns):
        return table
    return table.combine_chunks()


def _last_of_each_id(table: pa.Table) -> pa.Table:
    """The rows of ``table`` keeping, for an id that appears more than once (several
    writers in one group commit), only its last row: the later write wins."""
    ids = table.column("id")
    if pc.count_distinct(ids).as_py() == table.num_rows:
        return table
    last = {i: row for row, i in enumerate(ids.to_pylist())}
    return table.take(pa.array(sorted(last.values()), pa.int64()))


__all__ = [
    "AssayError", "Collection", "MODEL_META_KEY", "OptimizeResult", "RecallReport", "Store",
    "UpsertResult", "ID_FIELD", "resolve_root", "storage_options_from_env",
]


def _upsert_key(table: pa.Table) -> tuple[str, tuple[tuple[str, str], ...]]:
    """The group-commit key of an upsert: upserts of the same columns and types share commits."""
    return ("upsert", tuple((f.name, str(f.type)) for f in table.schema))
