"""Persisted mining runs: the ``_runs`` and ``_run_results`` tables under the data root.

A run record holds everything needed to reproduce it — miner, parameters, model/space,
pool and reference filters, size, seed, and the collection version it read — plus its
status, progress, row counts, timings and the k-NN graphs it used (method, recall@k). Results (``run_id, id, rank, score``) are
written in a single append once the run has finished, and the record is marked
SUCCEEDED only after that append: a run is never half-written. Results of runs that are
not SUCCEEDED are never served.
"""

from __future__ import annotations

import json
import logging
import threading
import time
import types
import typing
import uuid
import weakref
from collections import OrderedDict
from dataclasses import dataclass, field, fields, replace
from typing import Any

import numpy as np
import pyarrow as pa

from indexing.errors import FailedPrecondition, InvalidArgument, NotFound
from indexing.filters import sql_quote
from indexing.maintenance import SystemTableUpkeep, write_records
from indexing.settings import (
    RUN_RECORDS_CACHED,
    RUNS_CLEANUP_EVERY_S,
    RUNS_MAINTAIN_EVERY,
)
from indexing.store import Store

log = logging.getLogger("assay.runs")

RUNS_TABLE = "_runs"
RESULTS_TABLE = "_run_results"

_RESULTS_SCHEMA = pa.schema([
    pa.field("run_id", pa.string(), nullable=False),
    pa.field("id", pa.string(), nullable=False),
    pa.field("rank", pa.int32()),
    pa.field("score", pa.float64()),
    pa.field("related_id", pa.string()),
    # object spaces: the picked box's index in pred_<model>.boxes of image ``id`` (null otherwise)
    pa.field("box", pa.int32()),
])


def _request(*, stage: bool = False, **kw: Any) -> Any:
    """A field a caller sets when asking for a run (``StartMiningRequest``); ``stage``: a
    chain stage may set it per stage (``params.stages[i]``)."""
    return field(metadata={"request": True, "stage": stage}, **kw)


@dataclass(frozen=True, kw_only=True)
class RunSpec:
    """One mining run: what to run (the request) and how it went (the record).

    The same object is the request :func:`miners.runner.validate_request` checks, the record
    :class:`RunStore` persists (the ``_runs`` Arrow schema, :data:`RUNS_SCHEMA`, is derived
    from these fields: ``str``/``int``/``float``/``bool`` columns, ``dict`` fields as JSON
    text), each stage of a ``chain`` run (``dataclasses.replace`` of its run), and what the
    service maps to and from ``MiningRun`` / ``StartMiningRequest`` by field name
    (``service/mining.py``). Fields marked ``request`` are the ones a caller sets; a field
    added here with a proto field of the same name travels end to end (add it to the
    client's ``Collection.mine`` to let callers set it). New fields must have a default:
    they are added as null columns to the ``_runs`` table of an existing data root, and
    records written before they existed read back with the default.
    """

    run_id: str = field(default="", metadata={"key": True})
    job_id: str = ""
    collection: str = _request()
    miner: str = _request(stage=True)
    model: str = _request(stage=True, default="")
    space: str = _request(stage=True, default="")
    where: str = _request(default="")
    reference_where: str = _request(stage=True, default="")
    size: int = _request(stage=True)
    # None: not given; the service then records 0, or a fresh seed for a miner that samples
    # (MinerSpec.fresh_seed: random), so that two unseeded control groups differ
    seed: int | None = _request(default=None)
    reverse: bool = _request(stage=True, default=False)
    params: dict[str, Any] = _request(stage=True, default_factory=dict)
    # requested: None = the current version; recorded: the version the run reads (pinned)
    version: int | None = _request(default=None)
    # SEALS: "knn_of_labeled" restricts the pool to the candidates_k (0: SEALS_K) nearest
    # pool rows of each reference row (reference_where, default "label IS NOT NULL")
    candidates: str = _request(stage=True, default="")
    candidates_k: int = _request(stage=True, default=0)
    # object spaces (space "objects:<model>"): only the boxes matching this SQL over the
    # object columns are mined (pool and reference set); "" every box with an embedding
    objects_where: str = _request(stage=True, default="")
    state: str = "PENDING"
    progress: float = 0.0
    rows_scanned: int = 0
    rows_skipped: int = 0
    results: int = 0
    error: str = ""
    timings: dict[str, float] = field(default_factory=dict)
    created_at: float = 0.0
    finished_at: float = 0.0
    # the k-NN graphs the run used, by role ("pool", "query", "reference"): method, k,
    # recall@k on a sample, sample size, seconds (miners.knn.GraphInfo); empty for other miners
    graph: dict[str, dict[str, Any]] = field(default_factory=dict)
    # what the miner reported beyond its picks (ProbCover's radius, label-issue counts...)
    stats: dict[str, Any] = field(default_factory=dict)

    def to_row(self) -> dict[str, Any]:
        """The ``_runs`` row: dict fields as JSON text (null when empty)."""
        row = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name in _JSON_FIELDS:
                value = json.dumps(value) if value else None
            row[f.name] = value
        return row

    @classmethod
    def from_row(cls, row: dict[str, Any]) -> RunSpec:
        """A record from a ``_runs`` row; null columns (fields a record written by an older
        version lacks) take their default, columns this version does not know are ignored."""
        data = {}
        for name in _FIELD_NAMES:
            value = row.get(name)
            if value is not None:
                data[name] = json.loads(value) if name in _JSON_FIELDS else value
        return cls(**data)


_ARROW_TYPES = {str: pa.string(), int: pa.int64(), float: pa.float64(), bool: pa.bool_(), dict: pa.string()}


def _arrow_type(hint: Any) -> pa.DataType:
    base = typing.get_origin(hint) or hint
    if base in (types.UnionType, typing.Union):  # `int | None`
        (base,) = (a for a in typing.get_args(hint) if a is not type(None))
        base = typing.get_origin(base) or base
    return _ARROW_TYPES[base]


def _schema() -> pa.Schema:
    hints = typing.get_type_hints(RunSpec)
    return pa.schema([pa.field(f.name, _arrow_type(hints[f.name]), nullable=not f.metadata.get("key"))
                      for f in fields(RunSpec)])


_FIELD_NAMES: tuple[str, ...] = tuple(f.name for f in fields(RunSpec))
_JSON_FIELDS = frozenset(f.name for f in fields(RunSpec)
                         if (typing.get_origin(typing.get_type_hints(RunSpec)[f.name]) or None) is dict)
#: The ``_runs`` table's schema, derived from :class:`RunSpec`.
RUNS_SCHEMA: pa.Schema = _schema()
#: The fields a caller sets (``StartMiningRequest``), and those a chain stage may set per stage.
REQUEST_FIELDS: tuple[str, ...] = tuple(f.name for f in fields(RunSpec) if f.metadata.get("request"))
STAGE_FIELDS: tuple[str, ...] = tuple(f.name for f in fields(RunSpec) if f.metadata.get("stage"))

# The names this module and miners.runner used before RunSpec (kept for callers and tests).
RunRecord = RunSpec
_RUNS_SCHEMA = RUNS_SCHEMA


@dataclass
class MiningOutput:
    """What :func:`miners.runner.run_mining` returns: the picks in rank order and how it went."""

    ids: list[str]
    scores: np.ndarray
    rows_scanned: int
    rows_skipped: int
    timings: dict[str, float]
    # per result: the id of a related row (the seed it is nearest to, the row it duplicates)
    related: list[str | None] | None = None
    # the k-NN graphs the run used, by role ("pool", "query", "reference"): GraphInfo dicts
    graph: dict[str, dict[str, Any]] | None = None
    # what the miner reports beyond its picks (RunSpec.stats)
    stats: dict[str, Any] | None = None
    # object spaces (``objects:<model>``): per result, the box index in its image (``ids``)
    boxes: list[int] | None = None


_SERVED_COLUMNS = ("id", "rank", "score", "related_id", "box")


def _served(rows: pa.Table) -> pa.Table:
    """A run's rows of ``_run_results`` as :meth:`RunStore.results` serves them: in rank order,
    without ``related_id`` / ``box`` when every row has none."""
    table = rows.select(list(_SERVED_COLUMNS)).sort_by("rank")
    for name in ("related_id", "box"):
        if table.column(name).null_count == table.num_rows:
            table = table.drop_columns([name])
    return table


def images_of(results: pa.Table) -> pa.Table:
    """Results per image: a table of picks in rank order (``id, rank, score`` [, ``box``,
    ``related_id``]) with each image once — at the rank of its best-ranked pick, with that
    pick's score and, for picked boxes, ``box`` = that box (the image's best object). In a run
    ranked by descending score (every scored miner, not reversed) that is the maximum score
    of the image's objects; a selector's picks keep its pick order. Ranks are renumbered
    1..n. A table without ``box`` (a run over images) comes back as it is."""
    if "box" not in results.column_names or results.num_rows == 0:
        return results
    ids = results.column("id").to_pylist()
    seen: set[str] = set()
    first = []
    for i, image in enumerate(ids):  # rank order: the first pick of an image is its best
        if image not in seen:
            seen.add(image)
            first.append(i)
    out = results.take(pa.array(first, pa.int64()))
    return out.set_column(out.column_names.index("rank"), "rank",
                          pa.array(np.arange(1, len(first) + 1, dtype=np.int32)))


@dataclass
class _HeldRecords:
    """The run records a process holds in memory for one :class:`Store`, shared by its
    RunStores (the server's mining service and a ``Datasets`` may each open one): a record
    one of them writes is what the others serve."""

    lock: threading.Lock = field(default_factory=threading.Lock)
    # Final states that could not be saved (the disk was full, the object store away):
    # served from memory and saved with the next record that can be.
    unsaved: dict[str, RunSpec] = field(default_factory=dict)
    noted: dict[str, RunSpec] = field(default_factory=dict)  # states of runs in progress, not written yet
    cached: OrderedDict[str, RunSpec] = field(default_factory=OrderedDict)  # as last written or read
    # the results of the newest runs written by this process (RESULTS_HELD runs of at most
    # RESULTS_HELD_ROWS picks): a client reads them right after the run (a query of
    # ``_run_results`` cost 7-10 ms, growing with the runs kept)
    results: OrderedDict[str, pa.Table] = field(default_factory=OrderedDict)


#: How many runs' results are held in memory, and the most picks a run may have to be held.
RESULTS_HELD = 64
RESULTS_HELD_ROWS = 10_000

_HELD: weakref.WeakKeyDictionary[Store, _HeldRecords] = weakref.WeakKeyDictionary()
_HELD_LOCK = threading.Lock()


def _held_records(store: Store) -> _HeldRecords:
    with _HELD_LOCK:
        if (held := _HELD.get(store)) is None:
            held = _HELD[store] = _HeldRecords()
        return held


class RunStore:
    r"""Run records and results, shared by the server's mining jobs.

    A run's record is written to ``_runs`` when it is created and when it ends (and on
    :meth:`update`); what happens in between — its job, RUNNING, progress — is only
    :meth:`note`\ d in memory and goes to the table with its next write: a run left
    unfinished by a crash reads PENDING there and is marked INTERRUPTED at the next start
    either way (:meth:`mark_interrupted`). Records are served from memory (the last
    ``RUN_RECORDS_CACHED`` used), shared by the RunStores of one :class:`Store`: the
    server is the only writer of its data root's tables.
    Each record write is a commit (~7-9 ms) and each lookup a query (~6 ms); a margin run
    over 14k rows did 4 writes and 3 lookups for 16 ms of mining."""

    def __init__(self, store: Store) -> None:
        self.store = store
        held = _held_records(store)  # shared by every RunStore of this Store (one process)
        self._lock = held.lock
        self._upkeep = SystemTableUpkeep(RUNS_MAINTAIN_EVERY, RUNS_CLEANUP_EVERY_S)
        self._maintaining = False
        self._runs = self.store.system_table(RUNS_TABLE, RUNS_SCHEMA, "run_id")
        self._results = self.store.system_table(RESULTS_TABLE, _RESULTS_SCHEMA, None)
        self._unsaved, self._noted, self._cached = held.unsaved, held.noted, held.cached
        self._held_results = held.results

    def new_run(self, spec: RunSpec | None = None, **changes: Any) -> RunSpec:
        """Persist a new PENDING run: ``spec`` (or a RunSpec of ``changes``) with ``changes``
        applied, a fresh run id and its creation time."""
        base = spec if spec is not None else RunSpec(**changes)
        rec = replace(base, **(changes if spec is not None else {}), run_id=uuid.uuid4().hex,
                      created_at=time.time(), state="PENDING")
        self.save(rec, new=True)
        return rec

    def save(self, rec: RunSpec, *, new: bool = False) -> None:
        """Write ``rec`` (and records not saved before) to ``_runs``; a ``new`` run's record
        alone is appended (:func:`write_records`)."""
        with self._lock:
            pending = {**self._unsaved, rec.run_id: rec}
            # the table's own schema: its column order is the one it was created with
            batch = pa.Table.from_pylist([r.to_row() for r in pending.values()], schema=self._runs.schema)
            write_records(self._runs, batch, "run_id", all_new=new and len(pending) == 1)
            self._unsaved.clear()
            for saved in pending.values():  # what was noted of these runs is written now
                self._noted.pop(saved.run_id, None)
                self._cache(saved)
            self._after_write()

    def note(self, rec: RunSpec, **changes: Any) -> RunSpec:
        """The run's newest record (``rec`` if none is held) with ``changes``, served from
        memory from now on and written with the run's next :meth:`update` (a state in
        progress: see the class docstring). Applied to the newest record, so the job id
        noted by the request that started a run cannot put back PENDING over the RUNNING
        its job noted first."""
        with self._lock:
            newest = self._in_memory(rec.run_id) or rec
            rec = replace(newest, **changes)
            if rec != newest:  # (a run that ended meanwhile has the job id already)
                self._noted[rec.run_id] = rec
        return rec

    def _cache(self, rec: RunSpec) -> None:
        """Remember ``rec`` as the latest record of its run (called holding the lock)."""
        self._cached[rec.run_id] = rec
        self._cached.move_to_end(rec.run_id)
        while len(self._cached) > RUN_RECORDS_CACHED:
            self._cached.popitem(last=False)

    def _in_memory(self, run_id: str) -> RunSpec | None:
        """The newest record of ``run_id`` held in memory, if any (called holding the lock)."""
        for held in (self._unsaved, self._noted, self._cached):
            if (rec := held.get(run_id)) is not None:
                return rec
        return None

    def update(self, rec: RunSpec, **changes: Any) -> RunSpec:
        rec = replace(rec, **changes)
        self.save(rec)
        return rec

    def update_or_keep(self, rec: RunSpec, **changes: Any) -> RunSpec:
        """:meth:`update`, and if the record cannot be saved now (the fault that ended the
        run is often the one that stops its record being written), keep it in memory: it
        is served from there and saved with the next record that can be."""
        rec = replace(rec, **changes)
        try:
            self.save(rec)
        except Exception as exc:
            log.warning("could not save mining run %s as %s (%s); it is kept in memory and saved "
                        "with the next run record", rec.run_id, rec.state, exc)
            with self._lock:
                self._unsaved[rec.run_id] = rec
        return rec

    def get(self, run_id: str) -> RunSpec:
        with self._lock:
            if (held := self._in_memory(run_id)) is not None:
                return held
        rows = self._runs.search().where(f"run_id = {sql_quote(run_id)}").limit(None).to_arrow().to_pylist()
        if not rows:
            raise NotFound(f"mining run '{run_id}' not found")
        rec = RunSpec.from_row(rows[0])
        with self._lock:  # unless a write got there first
            if (held := self._in_memory(run_id)) is not None:
                return held
            self._cache(rec)
        return rec

    def list(self, collection: str | None = None, limit: int = 100) -> list[RunSpec]:
        q = self._runs.search().limit(None)
        if collection:
            q = q.where(f"collection = {sql_quote(collection)}")
        runs = [RunSpec.from_row(r) for r in q.to_arrow().to_pylist()]
        with self._lock:
            runs = [held if (held := self._in_memory(r.run_id)) is not None else r for r in runs]
        runs.sort(key=lambda r: r.created_at, reverse=True)
        return runs[:limit]

    def write_results(self, rec: RunSpec, ids: list[str], scores: np.ndarray,
                      related: list[str | None] | None = None, boxes: list[int] | None = None) -> None:
        """One row per pick, in rank order; a run in an object space picks boxes: ``boxes``
        names each one's index in its image ``ids[i]``."""
        if not ids:
            return
        table = pa.table({
            "run_id": pa.array([rec.run_id] * len(ids), pa.string()),
            "id": pa.array(ids, pa.string()),
            "rank": pa.array(np.arange(1, len(ids) + 1, dtype=np.int32)),
            "score": pa.array(np.asarray(scores, dtype=np.float64)),
            "related_id": pa.array(related if related is not None else [None] * len(ids), pa.string()),
            "box": pa.array(boxes if boxes is not None else [None] * len(ids), pa.int32()),
        }, schema=_RESULTS_SCHEMA)
        with self._lock:
            self._results.add(table)
            if len(ids) <= RESULTS_HELD_ROWS:  # what results() would read back
                self._held_results[rec.run_id] = _served(table)
                while len(self._held_results) > RESULTS_HELD:
                    self._held_results.popitem(last=False)
            self._after_write()

    def _after_write(self) -> None:
        """Every ``RUNS_MAINTAIN_EVERY`` writes (called with the lock held), compact both
        tables in a background thread (:class:`SystemTableUpkeep`: old versions go at most
        every ``RUNS_CLEANUP_EVERY_S``). Each run is several record updates and a results
        append, a commit each: unmaintained, ``_runs`` grew thousands of fragments and every
        lookup of a run slowed down (a soak's mining p50 went from 6 to 17 s in five
        minutes); maintained inline, the run that happened to trigger it paid for it."""
        if not self._upkeep.wrote() or self._maintaining:
            return
        self._maintaining = True
        threading.Thread(target=self._maintain, name="assay-runs-maintenance", daemon=True).start()

    def _maintain(self) -> None:
        try:
            with self._lock:
                self._upkeep.maintain([(self._runs, ("run_id",)), (self._results, ("run_id",))])
        except Exception as exc:  # maintenance must never fail a run
            log.warning("maintenance of the mining run tables failed: %s", exc)
        finally:
            self._maintaining = False

    def result_ids(self, run_id: str, collection: str) -> pa.Array:
        """The ids a SUCCEEDED run of ``collection`` selected, in rank order (what a
        dataset adds "from a run"); FAILED_PRECONDITION for a run that has not succeeded."""
        self._succeeded(run_id, collection)
        # a run over objects may pick several boxes of one image: the image once, at its best rank
        return self.image_results(run_id).column("id").combine_chunks()

    def _succeeded(self, run_id: str, collection: str) -> RunSpec:
        """The record of a SUCCEEDED run of ``collection``; InvalidArgument /
        FailedPrecondition otherwise."""
        rec = self.get(run_id)
        if rec.collection != collection:
            raise InvalidArgument(
                f"mining run '{run_id}' ran on collection '{rec.collection}', not '{collection}'")
        if rec.state != "SUCCEEDED":
            raise FailedPrecondition(f"mining run '{run_id}' is {rec.state}; only a SUCCEEDED run has results")
        return rec

    def result_scores(self, run_id: str, collection: str) -> tuple[pa.Table, str | None]:
        """(``id``, ``score`` of what a SUCCEEDED run of ``collection`` selected, the run's
        model or None): a miner's scores as an uncertainty to judge against quality
        (``uncertainty_quality``). Same checks as :meth:`result_ids`."""
        rec = self._succeeded(run_id, collection)
        return self.image_results(run_id).select(["id", "score"]), (rec.model or None)

    def results(self, run_id: str) -> pa.Table:
        """``id, rank, score`` (+ ``related_id`` when the miner names one, + ``box`` for a run in
        an object space: one row per picked box) of a finished run."""
        with self._lock:
            if (held := self._held_results.get(run_id)) is not None:
                return held
        return _served(self._results.search().where(f"run_id = {sql_quote(run_id)}")
                       .select(list(_SERVED_COLUMNS)).limit(None).to_arrow())

    def image_results(self, run_id: str) -> pa.Table:
        """A run's results per image (:func:`images_of`): the same as :meth:`results` for a
        run over images; for a run over objects, each image once."""
        return images_of(self.results(run_id))

    def mark_interrupted(self) -> int:
        """Runs left PENDING/RUNNING by a previous process: INTERRUPTED (restartable)."""
        rows = self._runs.search().where("state IN ('PENDING', 'RUNNING')").limit(None).to_arrow().to_pylist()
        for row in rows:
            self.update(RunSpec.from_row(row), state="INTERRUPTED", finished_at=time.time(),
                        error="the server stopped while this run was in progress; start it again")
        return len(rows)
