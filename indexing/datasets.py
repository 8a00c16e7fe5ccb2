"""Versioned datasets: named, committed selections of one collection's rows.

A dataset is a set of ids of one collection. Members are staged with :meth:`Datasets.add`
and :meth:`Datasets.remove` (by ids, by SQL filter, or from a finished mining run), and
:meth:`Datasets.commit` turns the staged changes into version N (1, 2, ...) and pins the
collection version of that moment with a Lance tag on the collection
(``ds-<dataset>-v<N>``). Tagged versions survive :meth:`Collection.optimize`'s cleanup
(it calls ``cleanup_old_versions(..., error_if_tagged_old_versions=False)``, which keeps
them), so :meth:`Datasets.checkout` reads each member's labels, predictions and embeddings
as they were at the commit, however the collection changed since.

Storage layout (system Lance tables under the store root, next to ``_runs``):

``_datasets``
    ``name`` (primary key), ``collection``, ``description``, ``created_at``, ``deleted``.
``_dataset_changes``
    ``dataset, version, id, op ('add' | 'remove'), at``: one row per membership change.
    Staged (uncommitted) changes carry ``version = 0``. Membership at version v is the ids
    whose last op with ``0 < version <= v`` is 'add' (a DuckDB ``arg_max`` group-by), so
    storage grows with the changes, never with members x versions.
``_dataset_commits``
    ``dataset, version, message, author, collection, collection_version, tag (the Lance
    tag), created_at, members, added, removed``: one row per commit, append-only.
``_dataset_tags``
    ``dataset, tag, version, created_at``: named dataset tags ("paper-v1") that resolve
    wherever a version is accepted.

Decisions:

* Staged changes are kept *net of the head commit*: at most one staged row per id, an
  'add' only for an id that is not a member at head, a 'remove' only for one that is.
  Adding a member (or removing a non-member) is a no-op, and undoing a staged change
  deletes its row instead of appending the opposite op. ``status`` counts are therefore
  exact, and commit needs no compaction.
* The head of a dataset is the highest version in ``_dataset_commits``: appending the
  commit row is the commit point. A commit (1) tags the collection, (2) moves the staged
  rows to version N in one ``update``, (3) appends the commit row. If the process dies
  after (2), the rows at a version above the head are still treated as staged (the staged
  predicate is ``version = 0 OR version > head``), and the next commit picks them up:
  uncommitted changes are never lost or half-committed.
* Uncommitted changes disappear only through :meth:`Datasets.discard`, or
  :meth:`Datasets.delete` with ``force=True``; ``delete`` refuses otherwise.
* Delete marks the ``_datasets`` row ``deleted`` first (one write; the dataset is gone for
  readers from then on), then removes the Lance tags of its commits (so cleanup can
  reclaim those collection versions) and its rows; ``create`` finishes an interrupted
  delete of the same name before creating it again.
* A version reference is an int (a commit), ``"HEAD"`` (the latest commit), the name of a
  dataset tag, or ``None`` (the working state: committed members plus staged changes, read
  at the collection's current version). Tag names start with a letter, so they never look
  like version numbers; ``HEAD`` is reserved.
* Checkout reads the rows of members from the pinned collection version with ``id IN
  (...)`` lookups of ``ID_CHUNK`` ids (BTREE on ``id``), or, when the members are a large
  share of the rows, with one streaming scan filtered by a hash lookup. Members deleted
  from the collection before the commit are members without a row: checkout leaves them
  out, and diff compares labels only of members present at both versions.
* Writes are serialised by one lock per store root in this process (the server is one
  process); each call is one append/update/delete where possible (an ``add`` that both
  re-adds staged removals and adds new ids is one delete plus one append, each consistent
  on its own). Concurrent writers in *other* processes are not coordinated.
* Every call on the system tables is a Lance version: :meth:`Datasets.optimize` compacts
  them and removes their old versions (the maintenance job should call it).
"""

from __future__ import annotations

import functools
import logging
import re
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from datetime import timedelta
from typing import Any

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from indexing.errors import AlreadyExists, FailedPrecondition, InvalidArgument, NotFound
from indexing.filters import ids_predicate, sql_quote
from indexing.schema import COLLECTION_NAME_RE, light_columns
from indexing.settings import DATASETS_OPTIMIZE_EVERY as OPTIMIZE_EVERY
from indexing.settings import MEMBERSHIP_CACHE, SCAN_SHARE
from indexing.store import ID_CHUNK, Collection, Store

log = logging.getLogger("assay.datasets")

DATASETS_TABLE = "_datasets"
CHANGES_TABLE = "_dataset_changes"
COMMITS_TABLE = "_dataset_commits"
TAGS_TABLE = "_dataset_tags"

STAGED = 0  # the version of uncommitted changes
ADD, REMOVE = "add", "remove"
HEAD = "HEAD"
TAG_RE = re.compile(r"^[A-Za-z][A-Za-z0-9._-]{0,127}$")

_DATASETS_SCHEMA = pa.schema([
    pa.field("name", pa.string(), nullable=False),
    pa.field("collection", pa.string()),
    pa.field("description", pa.string()),
    pa.field("created_at", pa.float64()),
    pa.field("deleted", pa.bool_()),
])
_CHANGES_SCHEMA = pa.schema([
    pa.field("dataset", pa.string(), nullable=False),
    pa.field("version", pa.int64(), nullable=False),
    pa.field("id", pa.string(), nullable=False),
    pa.field("op", pa.string(), nullable=False),
    pa.field("at", pa.float64()),
])
_COMMITS_SCHEMA = pa.schema([
    pa.field("dataset", pa.string(), nullable=False),
    pa.field("version", pa.int64(), nullable=False),
    pa.field("message", pa.string()),
    pa.field("author", pa.string()),
    pa.field("collection", pa.string()),
    pa.field("collection_version", pa.int64()),
    pa.field("tag", pa.string()),
    pa.field("created_at", pa.float64()),
    pa.field("members", pa.int64()),
    pa.field("added", pa.int64()),
    pa.field("removed", pa.int64()),
])
_TAGS_SCHEMA = pa.schema([
    pa.field("dataset", pa.string(), nullable=False),
    pa.field("tag", pa.string(), nullable=False),
    pa.field("version", pa.int64(), nullable=False),
    pa.field("created_at", pa.float64()),
])

_LOCKS: dict[str, threading.RLock] = {}
_LOCKS_GUARD = threading.Lock()


def _store_lock(store: Store) -> threading.RLock:
    """One write lock per store root, shared by every Datasets instance in the process."""
    with _LOCKS_GUARD:
        return _LOCKS.setdefault(store.root, threading.RLock())


def lance_tag(dataset: str, version: int) -> str:
    """The Lance tag on the collection that pins commit ``version`` of ``dataset``."""
    return f"ds-{dataset}-v{version}"


@dataclass(frozen=True)
class DatasetInfo:
    name: str
    collection: str
    description: str
    created_at: float
    head: int  # latest committed version; 0 before the first commit
    members: int  # members at head
    staged_adds: int
    staged_removes: int
    tags: dict[str, int] = field(default_factory=dict)


@dataclass(frozen=True)
class CommitRecord:
    dataset: str
    version: int
    message: str
    collection: str
    collection_version: int
    tag: str  # the Lance tag on the collection
    created_at: float
    members: int
    added: int
    removed: int
    author: str = ""
    tags: tuple[str, ...] = ()  # dataset tags naming this version

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class DatasetStatus:
    dataset: str
    head: int
    staged_adds: int
    staged_removes: int
    members: int  # in the working state (head + staged)
    head_collection_version: int | None  # None before the first commit
    collection_version: int  # now

    @property
    def clean(self) -> bool:
        return self.staged_adds == 0 and self.staged_removes == 0


@dataclass(frozen=True)
class StageResult:
    """What one add/remove call did: ``changed`` ids changed the working membership,
    ``unchanged`` were already (or already not) members."""

    dataset: str
    requested: int
    changed: int
    unchanged: int
    staged_adds: int
    staged_removes: int


@dataclass(frozen=True)
class DatasetDiff:
    """Changes from ``v1`` to ``v2`` (None: the working state)."""

    dataset: str
    v1: int | None
    v2: int | None
    added: pa.Array  # ids, sorted
    removed: pa.Array  # ids, sorted
    relabeled: pa.Table  # id, label_before, label_after; sorted by id

    def to_dict(self) -> dict[str, Any]:
        return {
            "dataset": self.dataset, "v1": self.v1, "v2": self.v2,
            "added": self.added.to_pylist(), "removed": self.removed.to_pylist(),
            "relabeled": self.relabeled.to_pylist(),
        }


_EMPTY_IDS = pa.array([], pa.string())


def _maintained(method: Callable[..., Any]) -> Callable[..., Any]:
    """Count a successful write; every ``OPTIMIZE_EVERY`` of them, compact the system tables
    in a background thread (each add/remove/commit is a Lance version of them)."""

    @functools.wraps(method)
    def wrapper(self: Datasets, *args: Any, **kwargs: Any) -> Any:
        result = method(self, *args, **kwargs)
        self._writes += 1
        if self._writes % OPTIMIZE_EVERY == 0 and not self._closed:
            thread = threading.Thread(target=self._optimize_quietly, name="assay-datasets-optimize",
                                      daemon=True)
            self._maintenance = thread
            thread.start()
        return result

    return wrapper


class Datasets:
    """Versioned datasets of the collections of one store. Thread-safe; share one per store."""

    def __init__(self, store: Store, *,
                 run_ids: Callable[[str, str], pa.Array] | None = None) -> None:
        """``run_ids(run_id, collection)`` gives the ids a finished mining run selected
        (``miners.runs.RunStore.result_ids``): the mining layer sits above the store, so
        the service passes it in."""
        self.store = store
        self._run_ids = run_ids
        self._writes = 0
        self._closed = False
        self._maintenance: threading.Thread | None = None  # the last background optimize
        self._lock = _store_lock(store)
        self._datasets = self.store.system_table(DATASETS_TABLE, _DATASETS_SCHEMA, "name")
        self._changes = self.store.system_table(CHANGES_TABLE, _CHANGES_SCHEMA, None)
        self._commits = self.store.system_table(COMMITS_TABLE, _COMMITS_SCHEMA, None)
        self._tags = self.store.system_table(TAGS_TABLE, _TAGS_SCHEMA, None)
        self._duck = duckdb.connect()
        self._cache: OrderedDict[tuple[str, float, int], pa.Array] = OrderedDict()
        self._cache_lock = threading.Lock()

    # -- datasets ------------------------------------------------------------------

    @_maintained
    def create(self, name: str, collection: str, description: str = "") -> DatasetInfo:
        """Create an empty dataset of ``collection``; ALREADY_EXISTS if the name is taken."""
        _check_name(name)
        if not isinstance(description, str):
            raise InvalidArgument("description must be a string")
        self.store.collection(collection)  # NOT_FOUND if missing
        with self._lock:
            row = self._row(name)
            if row is not None and not row["deleted"]:
                raise AlreadyExists(
                    f"dataset '{name}' already exists (collection '{row['collection']}')"
                )
            if row is not None:  # a delete was interrupted: finish it first
                self._purge(name, row["collection"])
            now = time.time()
            new = pa.Table.from_pylist([{
                "name": name, "collection": collection, "description": description,
                "created_at": now, "deleted": False,
            }], schema=_DATASETS_SCHEMA)
            result = self._datasets.merge_insert("name").when_not_matched_insert_all().execute(new)
            if int(result.num_inserted_rows) == 0:  # created concurrently by another process
                raise AlreadyExists(f"dataset '{name}' already exists")
        return DatasetInfo(name=name, collection=collection, description=description,
                           created_at=now, head=0, members=0, staged_adds=0, staged_removes=0)

    def get(self, name: str) -> DatasetInfo:
        """The dataset's record: head version, members at head, staged counts, tags."""
        row = self._live(name)
        head = self._head(name)
        adds, removes = self._staged_counts(name, head)
        members = self._commit_row(name, head)["members"] if head else 0
        return DatasetInfo(
            name=name, collection=row["collection"], description=row["description"] or "",
            created_at=row["created_at"], head=head, members=int(members),
            staged_adds=adds, staged_removes=removes, tags=self.tags(name),
        )

    def list(self, collection: str | None = None) -> list[DatasetInfo]:
        """All datasets (of one collection if given), by name."""
        where = "deleted = false"
        if collection is not None:
            where += f" AND collection = {sql_quote(collection)}"
        names = self._read(self._datasets, where, ["name"]).column("name").to_pylist()
        out = []
        for name in sorted(names):
            try:
                out.append(self.get(name))
            except NotFound:  # deleted meanwhile
                continue
        return out

    @_maintained
    def delete(self, name: str, *, force: bool = False) -> None:
        """Delete the dataset, its history and its Lance tags on the collection (so that
        cleanup may reclaim those versions). Refuses (FAILED_PRECONDITION) while there
        are uncommitted changes, unless ``force``."""
        with self._lock:
            row = self._live(name)
            head = self._head(name)
            adds, removes = self._staged_counts(name, head)
            if (adds or removes) and not force:
                raise FailedPrecondition(
                    f"dataset '{name}' has uncommitted changes ({adds} adds, {removes} removes): "
                    "commit or discard them first, or delete with force=True"
                )
            self._datasets.update(where=f"name = {sql_quote(name)}", values={"deleted": True})
            self._purge(name, row["collection"])

    def _purge(self, name: str, collection: str) -> None:
        try:
            col = self.store.collection(collection)
        except NotFound:
            col = None
        if col is not None:
            own = re.compile(rf"^ds-{re.escape(name)}-v\d+$")
            for tag in col.tags():
                if own.match(tag):
                    col.table.tags.delete(tag)
        q = sql_quote(name)
        for table in (self._changes, self._commits, self._tags):
            table.delete(f"dataset = {q}")
        self._datasets.delete(f"name = {q}")
        with self._cache_lock:
            for key in [k for k in self._cache if k[0] == name]:
                del self._cache[key]

    # -- staging -------------------------------------------------------------------

    @_maintained
    def add(self, name: str, *, ids: Sequence[str] | pa.Array | None = None, where: str | None = None,
            run: str | None = None) -> StageResult:
        """Stage ids as members: given ``ids`` (each must exist in the collection, else
        INVALID_ARGUMENT naming up to 5), the rows matching the SQL filter ``where`` at the
        collection's current version, or the results of the finished mining ``run``.
        Ids that are already members are left alone (no duplicate change)."""
        with self._lock:
            row = self._live(name)
            col = self.store.collection(row["collection"])
            cand = self._candidates(col, row, ids=ids, where=where, run=run, must_exist=True)
            head, staged_add, staged_remove, member = self._membership_of(name, row, cand)
            to_add = cand.filter(pc.invert(member))
            readd = pc.is_in(to_add, value_set=staged_remove)
            self._delete_staged(name, head, to_add.filter(readd))
            self._append_staged(name, to_add.filter(pc.invert(readd)), ADD)
            return self._stage_result(name, head, len(cand), len(to_add))

    @_maintained
    def remove(self, name: str, *, ids: Sequence[str] | pa.Array | None = None, where: str | None = None,
               run: str | None = None) -> StageResult:
        """Stage the removal of members, chosen like :meth:`add`. Ids that are not members
        are left alone; ids that are neither members nor in the collection are
        INVALID_ARGUMENT."""
        with self._lock:
            row = self._live(name)
            col = self.store.collection(row["collection"])
            cand = self._candidates(col, row, ids=ids, where=where, run=run, must_exist=False)
            head, staged_add, staged_remove, member = self._membership_of(name, row, cand)
            if ids is not None:
                outsiders = cand.filter(pc.invert(member))
                self._check_exist(col, outsiders, what=f"are neither members of dataset '{name}' nor")
            to_remove = cand.filter(member)
            unadd = pc.is_in(to_remove, value_set=staged_add)
            self._delete_staged(name, head, to_remove.filter(unadd))
            self._append_staged(name, to_remove.filter(pc.invert(unadd)), REMOVE)
            return self._stage_result(name, head, len(cand), len(to_remove))

    def status(self, name: str) -> DatasetStatus:
        """Staged (uncommitted) adds and removes, and the collection versions at head and now."""
        row = self._live(name)
        head = self._head(name)
        adds, removes = self._staged_counts(name, head)
        head_members, head_cv = 0, None
        if head:
            rec = self._commit_row(name, head)
            head_members, head_cv = int(rec["members"]), int(rec["collection_version"])
        return DatasetStatus(
            dataset=name, head=head, staged_adds=adds, staged_removes=removes,
            members=head_members + adds - removes, head_collection_version=head_cv,
            collection_version=self.store.collection(row["collection"]).version,
        )

    @_maintained
    def discard(self, name: str) -> int:
        """Drop all staged changes (the only way they disappear); returns how many."""
        with self._lock:
            self._live(name)
            head = self._head(name)
            n = sum(self._staged_counts(name, head))
            if n:
                self._changes.delete(self._staged_where(name, head))
            return n

    # -- commits -------------------------------------------------------------------

    @_maintained
    def commit(self, name: str, message: str, *, author: str = "", allow_empty: bool = False) -> CommitRecord:
        """Commit the staged changes as the next version, pinning the collection's current
        version with the Lance tag ``ds-<name>-v<N>``. FAILED_PRECONDITION when nothing is
        staged, unless ``allow_empty`` (to pin newer labels of the same members)."""
        if not isinstance(message, str) or not message.strip():
            raise InvalidArgument("commit message must be a non-empty string")
        with self._lock:
            row = self._live(name)
            col = self.store.collection(row["collection"])
            head = self._head(name)
            adds, removes = self._staged_counts(name, head)
            if not (adds or removes) and not allow_empty:
                raise FailedPrecondition(
                    f"dataset '{name}' has nothing to commit (no staged adds or removes since "
                    f"version {head}); add or remove members first"
                )
            version = head + 1
            tag = lance_tag(name, version)
            cv = col.version
            if tag in col.tags():  # left by an interrupted commit of the same version
                col.table.tags.update(tag, cv)
            else:
                col.tag(tag, cv)
            if adds or removes:
                self._changes.update(where=self._staged_where(name, head), values={"version": version})
            members = (int(self._commit_row(name, head)["members"]) if head else 0) + adds - removes
            rec = CommitRecord(
                dataset=name, version=version, message=message, collection=row["collection"],
                collection_version=cv, tag=tag, created_at=time.time(), members=members,
                added=adds, removed=removes, author=author or "",
            )
            data = {k: v for k, v in asdict(rec).items() if k != "tags"}
            self._commits.add(pa.Table.from_pylist([data], schema=_COMMITS_SCHEMA))
            return rec

    def history(self, name: str) -> list[CommitRecord]:
        """Commits, newest first, each with the dataset tags that name it."""
        self._live(name)
        rows = self._read(self._commits, f"dataset = {sql_quote(name)}", _COMMITS_SCHEMA.names)
        by_version: dict[int, list[str]] = {}
        for tag, v in self.tags(name).items():
            by_version.setdefault(v, []).append(tag)
        recs = [_commit_record(r, tuple(sorted(by_version.get(r["version"], [])))) for r in rows.to_pylist()]
        return sorted(recs, key=lambda r: r.version, reverse=True)

    @_maintained
    def tag(self, name: str, version: int | str, tag: str) -> int:
        """Name a version (``"paper-v1"``); the name then works wherever a version does.
        Returns the version tagged."""
        if not isinstance(tag, str) or not TAG_RE.match(tag) or tag.upper() == HEAD:
            raise InvalidArgument(
                f"dataset tag {tag!r} is invalid: use letters, digits, '.', '_' and '-', "
                "starting with a letter, at most 128 characters (HEAD is reserved)"
            )
        with self._lock:
            self._live(name)
            v = self._resolve(name, version)
            if v is None:
                raise InvalidArgument("only a committed version can be tagged; commit first")
            existing = self.tags(name)
            if tag in existing:
                raise AlreadyExists(f"dataset '{name}' already has tag '{tag}' (version {existing[tag]})")
            self._tags.add(pa.Table.from_pylist(
                [{"dataset": name, "tag": tag, "version": v, "created_at": time.time()}], schema=_TAGS_SCHEMA
            ))
            return v

    @_maintained
    def untag(self, name: str, tag: str) -> None:
        """Remove a dataset tag (the version itself stays)."""
        with self._lock:
            self._live(name)
            if tag not in self.tags(name):
                raise NotFound(f"dataset '{name}' has no tag '{tag}'")
            self._tags.delete(f"dataset = {sql_quote(name)} AND tag = {sql_quote(tag)}")

    def tags(self, name: str) -> dict[str, int]:
        """Dataset tags → version."""
        rows = self._read(self._tags, f"dataset = {sql_quote(name)}", ["tag", "version"])
        return dict(zip(rows.column("tag").to_pylist(), rows.column("version").to_pylist(), strict=True))

    # -- reading versions ----------------------------------------------------------

    def members(self, name: str, version: int | str | None = None) -> pa.Array:
        """Member ids (sorted) at ``version``; None: the working state, staged changes included."""
        row = self._live(name)
        v = self._resolve(name, version)
        if v is not None:
            return self._committed(name, row, v)
        head = self._head(name)
        committed = self._committed(name, row, head)
        staged = self._staged(name, head)
        adds = staged.filter(pc.equal(staged.column("op"), ADD)).column("id").combine_chunks()
        removes = staged.filter(pc.equal(staged.column("op"), REMOVE)).column("id").combine_chunks()
        kept = committed.filter(pc.invert(pc.is_in(committed, value_set=removes)))
        return _sorted(pa.concat_arrays([kept, adds.cast(pa.string())]))

    def checkout(self, name: str, version: int | str | None = None,
                 columns: Sequence[str] | None = None) -> pa.Table:
        """The members' rows as they were at ``version`` (read at the collection version
        its commit pinned; None: the working state at the collection's current version),
        sorted by id. ``columns`` defaults to the non-vector, non-prediction columns of
        that collection version; ask for ``emb_*`` / ``pred_*`` columns by name."""
        handle, cols = self._checkout_columns(name, version, columns)
        fetch = cols if "id" in cols else ["id", *cols]
        parts = list(_read_rows(handle, self.members(name, version), fetch, 65_536))
        if not parts:
            return handle.schema.empty_table().select(cols)
        table = pa.concat_tables(parts)
        return table.take(pc.sort_indices(table.column("id"))).select(cols)

    def checkout_batches(self, name: str, version: int | str | None = None,
                         columns: Sequence[str] | None = None, *,
                         batch_size: int = 8192) -> Iterator[pa.Table]:
        """Stream :meth:`checkout` in pieces of at most ``batch_size`` rows (in no
        particular order); each piece holds the requested columns plus ``id``."""
        if not isinstance(batch_size, int) or batch_size < 1:
            raise InvalidArgument("batch_size must be an integer >= 1")
        handle, cols = self._checkout_columns(name, version, columns)
        fetch = cols if "id" in cols else ["id", *cols]
        for part in _read_rows(handle, self.members(name, version), fetch, batch_size):
            for start in range(0, part.num_rows, batch_size):
                yield part.slice(start, batch_size)

    def diff(self, name: str, v1: int | str | None, v2: int | str | None = None) -> DatasetDiff:
        """Members added and removed from ``v1`` to ``v2`` (None: the working state; 0: the
        empty dataset before the first commit), and the members of both whose ``label``
        differs between the collection versions the two pinned (null-aware)."""
        self._live(name)

        def resolve(v: int | str | None) -> int | None:
            return 0 if v == 0 or v == "0" else self._resolve(name, v)

        r1, r2 = resolve(v1), resolve(v2)
        m1, m2 = (_EMPTY_IDS if r == 0 else self.members(name, r) for r in (r1, r2))
        in1 = pc.is_in(m2, value_set=m1)
        added = m2.filter(pc.invert(in1))
        removed = m1.filter(pc.invert(pc.is_in(m1, value_set=m2)))
        common = m2.filter(in1)  # empty when either side is version 0
        relabeled = pa.table({"id": _EMPTY_IDS, "label_before": _EMPTY_IDS, "label_after": _EMPTY_IDS})
        h1, h2 = (self._version_handle(name, r) for r in (r1, r2)) if len(common) else (None, None)
        if len(common) and h1.version != h2.version:
            before = _concat(_read_rows(h1, common, ["id", "label"], 65_536), ["id", "label"])
            after = _concat(_read_rows(h2, common, ["id", "label"], 65_536), ["id", "label"])
            cur = self._duck.cursor()
            try:
                cur.register("before_t", before)
                cur.register("after_t", after)
                relabeled = cur.sql(
                    "SELECT b.id, b.label AS label_before, a.label AS label_after "
                    "FROM before_t b JOIN after_t a USING (id) "
                    "WHERE b.label IS DISTINCT FROM a.label ORDER BY b.id"
                ).to_arrow_table()
            finally:
                cur.close()
            relabeled = relabeled.cast(pa.schema([(c, pa.string()) for c in relabeled.column_names]))
        return DatasetDiff(dataset=name, v1=r1, v2=r2, added=added, removed=removed, relabeled=relabeled)

    # -- maintenance ---------------------------------------------------------------

    def optimize(self, cleanup_older_than: timedelta | None = None) -> None:
        """Compact the system tables and remove their old versions (default: the store's
        cleanup age). Every add/remove/commit is a Lance version of these tables."""
        older = cleanup_older_than if cleanup_older_than is not None else self.store.cleanup_older_than
        with self._lock:
            for table in (self._datasets, self._changes, self._commits, self._tags):
                table.optimize(cleanup_older_than=older)

    def close(self, timeout: float | None = None) -> bool:
        """Wait (at most ``timeout`` s) for a background optimize of the system tables and
        start none from now on; True when none is running on return."""
        self._closed = True
        thread = self._maintenance
        if thread is not None:
            thread.join(timeout)
        return thread is None or not thread.is_alive()

    def _optimize_quietly(self) -> None:
        try:
            self.optimize()
        except Exception:  # maintenance must never take the process down
            log.exception("optimizing the dataset tables failed")

    # -- internals -----------------------------------------------------------------

    @staticmethod
    def _read(table: Any, where: str, columns: list[str]) -> pa.Table:
        return table.search().where(where).select(columns).limit(None).to_arrow()

    def _row(self, name: str) -> dict[str, Any] | None:
        rows = self._read(self._datasets, f"name = {sql_quote(name)}", _DATASETS_SCHEMA.names).to_pylist()
        return rows[0] if rows else None

    def _live(self, name: str) -> dict[str, Any]:
        if not isinstance(name, str) or not COLLECTION_NAME_RE.match(name):
            raise NotFound(f"dataset {name!r} not found")
        row = self._row(name)
        if row is None or row["deleted"]:
            raise NotFound(f"dataset '{name}' not found")
        return row

    def _head(self, name: str) -> int:
        versions = self._read(self._commits, f"dataset = {sql_quote(name)}", ["version"]).column("version")
        return int(pc.max(versions).as_py() or 0) if len(versions) else 0

    def _commit_row(self, name: str, version: int) -> dict[str, Any]:
        rows = self._read(self._commits, f"dataset = {sql_quote(name)} AND version = {int(version)}",
                          _COMMITS_SCHEMA.names).to_pylist()
        if not rows:
            raise NotFound(f"dataset '{name}' has no version {version}")
        return rows[0]

    @staticmethod
    def _staged_where(name: str, head: int) -> str:
        # Rows above the head were moved there by a commit that did not finish: still staged.
        return f"dataset = {sql_quote(name)} AND (version = {STAGED} OR version > {int(head)})"

    def _staged(self, name: str, head: int) -> pa.Table:
        return self._read(self._changes, self._staged_where(name, head), ["id", "op"])

    def _staged_counts(self, name: str, head: int) -> tuple[int, int]:
        where = self._staged_where(name, head)
        return (self._changes.count_rows(f"{where} AND op = '{ADD}'"),
                self._changes.count_rows(f"{where} AND op = '{REMOVE}'"))

    def _committed(self, name: str, row: dict[str, Any], version: int) -> pa.Array:
        """Members at committed ``version`` (sorted): last op per id among the changes of
        versions 1..version is 'add'. Cached: a committed version never changes."""
        if version <= 0:
            return _EMPTY_IDS
        key = (name, float(row["created_at"]), int(version))
        with self._cache_lock:
            if key in self._cache:
                self._cache.move_to_end(key)
                return self._cache[key]
        reader = (self._changes.search()
                  .where(f"dataset = {sql_quote(name)} AND version > {STAGED} AND version <= {int(version)}")
                  .select(["id", "op", "version"]).limit(None).to_batches())
        cur = self._duck.cursor()
        try:
            cur.register("changes_t", reader)
            ids = cur.sql(
                f"SELECT id FROM changes_t GROUP BY id HAVING arg_max(op, version) = '{ADD}' ORDER BY id"
            ).to_arrow_table().column("id")
        finally:
            cur.close()
        members = ids.combine_chunks().cast(pa.string()) if ids.num_chunks else _EMPTY_IDS
        with self._cache_lock:
            self._cache[key] = members
            while len(self._cache) > MEMBERSHIP_CACHE:
                self._cache.popitem(last=False)
        return members

    def _membership_of(self, name: str, row: dict[str, Any],
                       cand: pa.Array) -> tuple[int, pa.Array, pa.Array, pa.Array]:
        """(head, staged adds, staged removes, mask of ``cand`` that are working members)."""
        head = self._head(name)
        committed = self._committed(name, row, head)
        staged = self._staged(name, head)
        staged_add = staged.filter(pc.equal(staged.column("op"), ADD)).column("id").combine_chunks()
        staged_remove = staged.filter(pc.equal(staged.column("op"), REMOVE)).column("id").combine_chunks()
        in_head = pc.is_in(cand, value_set=committed)
        member = pc.or_(pc.and_(in_head, pc.invert(pc.is_in(cand, value_set=staged_remove))),
                        pc.is_in(cand, value_set=staged_add))
        return head, staged_add.cast(pa.string()), staged_remove.cast(pa.string()), member

    def _stage_result(self, name: str, head: int, requested: int, changed: int) -> StageResult:
        adds, removes = self._staged_counts(name, head)
        return StageResult(dataset=name, requested=requested, changed=changed,
                           unchanged=requested - changed, staged_adds=adds, staged_removes=removes)

    def _append_staged(self, name: str, ids: pa.Array, op: str) -> None:
        n = len(ids)
        if not n:
            return
        self._changes.add(pa.table({
            "dataset": pa.repeat(pa.scalar(name, pa.string()), n),
            "version": pa.array(np.full(n, STAGED, np.int64)),
            "id": ids,
            "op": pa.repeat(pa.scalar(op, pa.string()), n),
            "at": pa.array(np.full(n, time.time())),
        }, schema=_CHANGES_SCHEMA))

    def _delete_staged(self, name: str, head: int, ids: pa.Array) -> None:
        where = self._staged_where(name, head)
        for s in range(0, len(ids), ID_CHUNK):
            self._changes.delete(f"{where} AND {ids_predicate(ids.slice(s, ID_CHUNK).to_pylist())}")

    def _candidates(self, col: Collection, row: dict[str, Any], *, ids: Any, where: str | None,
                    run: str | None, must_exist: bool) -> pa.Array:
        """The ids an add/remove names, deduplicated (first occurrence order)."""
        given = sum(x is not None for x in (ids, where, run))
        if given != 1:
            raise InvalidArgument("give exactly one of ids, where or run")
        if ids is not None:
            if isinstance(ids, str):
                raise InvalidArgument("ids must be a list of ids, not one string")
            try:
                arr = ids.combine_chunks() if isinstance(ids, pa.ChunkedArray) else pa.array(ids, pa.string())
                arr = arr.cast(pa.string())
            except (pa.ArrowInvalid, pa.ArrowTypeError, TypeError) as exc:
                raise InvalidArgument(f"ids must be strings: {exc}") from exc
            if not len(arr):
                raise InvalidArgument("ids is empty")
            if arr.null_count or pc.any(pc.equal(pc.utf8_length(arr), 0)).as_py():
                raise InvalidArgument("ids must be non-empty strings")
            arr = pc.unique(arr)
            if must_exist:
                self._check_exist(col, arr, what="are not")
            return arr
        if where is not None:
            where = col.validate_filter(where)
            parts = [b.column(0) for b in col.scan(where, ["id"], batch_size=65_536)]
            return pa.concat_arrays(parts).cast(pa.string()) if parts else _EMPTY_IDS
        if self._run_ids is None:
            raise FailedPrecondition("mining runs are not available to this Datasets instance")
        return pc.unique(self._run_ids(run, row["collection"]).cast(pa.string()))

    @staticmethod
    def _check_exist(col: Collection, ids: pa.Array, *, what: str) -> None:
        if not len(ids):
            return
        found = _concat(_read_rows(col.table, ids, ["id"], 65_536), ["id"]).column("id")
        missing = ids.filter(pc.invert(pc.is_in(ids, value_set=found.combine_chunks().cast(pa.string()))))
        if len(missing):
            shown = ", ".join(repr(i) for i in missing.slice(0, 5).to_pylist())
            more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
            raise InvalidArgument(
                f"{len(missing)} id(s) {what} in collection '{col.name}': {shown}{more}", field="ids"
            )

    def _resolve(self, name: str, version: int | str | None) -> int | None:
        """A committed version number for a reference, or None for the working state."""
        if version is None:
            return None
        if isinstance(version, str) and version.isdigit():
            version = int(version)
        head = self._head(name)
        if isinstance(version, bool) or not isinstance(version, int | str):
            raise InvalidArgument(f"version must be an int, 'HEAD' or a tag name, got {version!r}")
        if isinstance(version, str):
            if version.upper() == HEAD:
                if not head:
                    raise NotFound(f"dataset '{name}' has no commits yet")
                return head
            tags = self.tags(name)
            if version not in tags:
                raise NotFound(
                    f"dataset '{name}' has no tag '{version}' (tags: {', '.join(sorted(tags)) or 'none'})"
                )
            return tags[version]
        if not 1 <= version <= head:
            raise NotFound(f"dataset '{name}' has no version {version} (versions 1..{head})")
        return version

    def collection_version(self, name: str, version: int | str | None) -> tuple[str, int | None]:
        """(collection, the collection version ``version`` pinned); None for the working
        state, which reads the collection's current version."""
        row = self._live(name)
        v = self._resolve(name, version)
        if v is None:
            return row["collection"], None
        return row["collection"], int(self._commit_row(name, v)["collection_version"])

    def _version_handle(self, name: str, version: int | None) -> Any:
        """A table handle on the collection version that ``version`` pinned (the live table
        for the working state)."""
        row = self._live(name)
        col = self.store.collection(row["collection"])
        if version is None:
            return col.table
        rec = self._commit_row(name, version)
        try:
            return col.at_version(int(rec["collection_version"]))
        except NotFound as exc:
            raise FailedPrecondition(
                f"version {rec['collection_version']} of collection '{col.name}' pinned by "
                f"dataset '{name}' v{version} is gone (its tag '{rec['tag']}' was removed "
                "and the version cleaned up)"
            ) from exc

    def _checkout_columns(self, name: str, version: int | str | None,
                          columns: Sequence[str] | None) -> tuple[Any, list[str]]:
        handle = self._version_handle(name, self._resolve(name, version))
        schema = handle.schema
        if columns is None:
            return handle, light_columns(schema)
        cols = [columns] if isinstance(columns, str) else list(columns)
        unknown = [c for c in cols if c not in schema.names]
        if unknown:
            raise InvalidArgument(
                f"unknown column(s) {', '.join(unknown)} at that version of the collection "
                f"(columns: {', '.join(schema.names)})", field="columns"
            )
        return handle, cols


def _check_name(name: str) -> str:
    if not isinstance(name, str) or not COLLECTION_NAME_RE.match(name):
        raise InvalidArgument(
            f"dataset name {name!r} is invalid: use letters, digits, '_' and '-', "
            "starting with a letter or digit, at most 128 characters"
        )
    return name


def _commit_record(row: dict[str, Any], tags: tuple[str, ...] = ()) -> CommitRecord:
    return CommitRecord(
        dataset=row["dataset"], version=int(row["version"]), message=row["message"] or "",
        collection=row["collection"], collection_version=int(row["collection_version"]),
        tag=row["tag"], created_at=row["created_at"], members=int(row["members"]),
        added=int(row["added"]), removed=int(row["removed"]), author=row["author"] or "", tags=tags,
    )


def _sorted(ids: pa.Array) -> pa.Array:
    return ids.take(pc.sort_indices(ids))


def _concat(parts: Iterator[pa.Table], columns: list[str]) -> pa.Table:
    tables = list(parts)
    if not tables:
        return pa.table({c: _EMPTY_IDS for c in columns})
    return pa.concat_tables(tables)


def _read_rows(handle: Any, ids: pa.Array, columns: list[str], batch_size: int) -> Iterator[pa.Table]:
    """Rows of ``ids`` (``columns`` include ``id``) from a table handle, in pieces.

    A few ids: ``id IN (...)`` lookups of ``ID_CHUNK`` (BTREE on ``id``). Ids that are a
    large share of the rows: one streaming scan, each batch filtered by a hash lookup."""
    if not len(ids):
        return
    total = handle.count_rows()
    if len(ids) > ID_CHUNK and len(ids) >= SCAN_SHARE * total:
        # Large scan batches: each is_in call hashes the whole id set again.
        for batch in handle.search().select(columns).limit(None).to_batches(max(batch_size, 65_536)):
            part = batch.filter(pc.is_in(batch.column("id"), value_set=ids))
            if part.num_rows:
                yield pa.Table.from_batches([part]).select(columns)
        return
    for s in range(0, len(ids), ID_CHUNK):
        chunk = ids.slice(s, ID_CHUNK).to_pylist()
        part = handle.search().where(ids_predicate(chunk)).select(columns).limit(None).to_arrow()
        if part.num_rows:
            yield part.select(columns)


__all__ = [
    "CommitRecord", "DatasetDiff", "DatasetInfo", "DatasetStatus", "Datasets", "StageResult", "lance_tag",
]
