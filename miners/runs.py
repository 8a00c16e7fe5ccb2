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
import uuid
from dataclasses import asdict, dataclass, field, replace
from datetime import timedelta
from typing import Any

import numpy as np
import pyarrow as pa

from indexing.errors import FailedPrecondition, InvalidArgument, NotFound
from indexing.filters import sql_quote
from indexing.maintenance import compact_table
from indexing.settings import COMPACT_KEEP_ROWS, RUNS_CLEANUP_EVERY_S, RUNS_MAINTAIN_EVERY
from indexing.store import Store

log = logging.getLogger("assay.runs")

RUNS_TABLE = "_runs"
RESULTS_TABLE = "_run_results"

_RUNS_SCHEMA = pa.schema([
    pa.field("run_id", pa.string(), nullable=False),
    pa.field("job_id", pa.string()),
    pa.field("collection", pa.string()),
    pa.field("miner", pa.string()),
    pa.field("model", pa.string()),
    pa.field("space", pa.string()),
    pa.field("where", pa.string()),
    pa.field("reference_where", pa.string()),
    pa.field("size", pa.int64()),
    pa.field("seed", pa.int64()),
    pa.field("reverse", pa.bool_()),
    pa.field("params", pa.string()),
    pa.field("version", pa.int64()),
    pa.field("state", pa.string()),
    pa.field("progress", pa.float64()),
    pa.field("rows_scanned", pa.int64()),
    pa.field("rows_skipped", pa.int64()),
    pa.field("results", pa.int64()),
    pa.field("error", pa.string()),
    pa.field("timings", pa.string()),
    pa.field("created_at", pa.float64()),
    pa.field("finished_at", pa.float64()),
    # JSON: the k-NN graphs the run used, by role ("pool", "query", "reference"): method, k,
    # recall@k on a sample, sample size, seconds (miners.knn.GraphInfo); null for other miners.
    # Added after the first release: RunStore's system_table adds it to older data roots.
    pa.field("graph", pa.string()),
])
_RESULTS_SCHEMA = pa.schema([
    pa.field("run_id", pa.string(), nullable=False),
    pa.field("id", pa.string(), nullable=False),
    pa.field("rank", pa.int32()),
    pa.field("score", pa.float64()),
    pa.field("related_id", pa.string()),
])


@dataclass(frozen=True)
class RunRecord:
    run_id: str
    collection: str
    miner: str
    size: int
    seed: int
    version: int
    model: str = ""
    space: str = ""
    where: str = ""
    reference_where: str = ""
    reverse: bool = False
    params: dict[str, Any] = field(default_factory=dict)
    job_id: str = ""
    state: str = "PENDING"
    progress: float = 0.0
    rows_scanned: int = 0
    rows_skipped: int = 0
    results: int = 0
    error: str = ""
    timings: dict[str, float] = field(default_factory=dict)
    created_at: float = 0.0
    finished_at: float = 0.0
    graph: dict[str, dict[str, Any]] = field(default_factory=dict)

    def to_row(self) -> dict[str, Any]:
        row = asdict(self)
        row["params"] = json.dumps(self.params, sort_keys=True)
        row["timings"] = json.dumps(self.timings)
        row["graph"] = json.dumps(self.graph, sort_keys=True) if self.graph else None
        return row

    @classmethod
    def from_row(cls, row: dict[str, Any]) -> RunRecord:
        data = {k: v for k, v in row.items() if v is not None}
        data["params"] = json.loads(data.get("params") or "{}")
        data["timings"] = json.loads(data.get("timings") or "{}")
        data["graph"] = json.loads(data.get("graph") or "{}")
        return cls(**data)


class RunStore:
    """Run records and results, shared by the server's mining jobs."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self._lock = threading.Lock()
        self._writes = 0  # since the last maintenance of the two tables
        self._maintaining = False
        self._last_cleanup = time.monotonic()
        self._runs = self.store.system_table(RUNS_TABLE, _RUNS_SCHEMA, "run_id")
        self._results = self.store.system_table(RESULTS_TABLE, _RESULTS_SCHEMA, None)
        # Final states that could not be saved (the disk was full, the object store away):
        # served from memory and saved with the next record that can be.
        self._unsaved: dict[str, RunRecord] = {}

    def new_run(self, **fields: Any) -> RunRecord:
        rec = RunRecord(run_id=uuid.uuid4().hex, created_at=time.time(), **fields)
        self.save(rec)
        return rec

    def save(self, rec: RunRecord) -> None:
        with self._lock:
            pending = {**self._unsaved, rec.run_id: rec}
            batch = pa.Table.from_pylist([r.to_row() for r in pending.values()], schema=_RUNS_SCHEMA)
            self._runs.merge_insert("run_id").when_matched_update_all().when_not_matched_insert_all().execute(batch)
            self._unsaved.clear()
            self._after_write()

    def update(self, rec: RunRecord, **changes: Any) -> RunRecord:
        rec = replace(rec, **changes)
        self.save(rec)
        return rec

    def update_or_keep(self, rec: RunRecord, **changes: Any) -> RunRecord:
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

    def get(self, run_id: str) -> RunRecord:
        if (kept := self._unsaved.get(run_id)) is not None:
            return kept
        rows = self._runs.search().where(f"run_id = {sql_quote(run_id)}").limit(None).to_arrow().to_pylist()
        if not rows:
            raise NotFound(f"mining run '{run_id}' not found")
        return RunRecord.from_row(rows[0])

    def list(self, collection: str | None = None, limit: int = 100) -> list[RunRecord]:
        q = self._runs.search().limit(None)
        if collection:
            q = q.where(f"collection = {sql_quote(collection)}")
        runs = [RunRecord.from_row(r) for r in q.to_arrow().to_pylist()]
        runs = [self._unsaved.get(r.run_id, r) for r in runs]
        runs.sort(key=lambda r: r.created_at, reverse=True)
        return runs[:limit]

    def write_results(self, rec: RunRecord, ids: list[str], scores: np.ndarray,
                      related: list[str | None] | None = None) -> None:
        if not ids:
            return
        table = pa.table({
            "run_id": pa.array([rec.run_id] * len(ids), pa.string()),
            "id": pa.array(ids, pa.string()),
            "rank": pa.array(np.arange(1, len(ids) + 1, dtype=np.int32)),
            "score": pa.array(np.asarray(scores, dtype=np.float64)),
            "related_id": pa.array(related if related is not None else [None] * len(ids), pa.string()),
        }, schema=_RESULTS_SCHEMA)
        with self._lock:
            self._results.add(table)
            self._after_write()

    def _after_write(self) -> None:
        """Every ``RUNS_MAINTAIN_EVERY`` writes (called with the lock held), compact both
        tables in a background thread — and every 10 minutes drop their old versions. Each
        run is several record updates and a results append, a commit each: unmaintained,
        ``_runs`` grew thousands of fragments and every lookup of a run slowed down (a
        soak's mining p50 went from 6 to 17 s in five minutes); maintained inline, the run
        that happened to trigger it paid for it."""
        self._writes += 1
        if self._writes < RUNS_MAINTAIN_EVERY or self._maintaining:
            return
        self._writes, self._maintaining = 0, True
        threading.Thread(target=self._maintain, name="assay-runs-maintenance", daemon=True).start()

    def _maintain(self) -> None:
        now = time.monotonic()
        cleanup = now - self._last_cleanup >= RUNS_CLEANUP_EVERY_S
        try:
            with self._lock:
                for table in (self._runs, self._results):
                    compact_table(table, keep_rows=COMPACT_KEEP_ROWS,
                                  older_than=timedelta(minutes=10) if cleanup else None)
            if cleanup:
                self._last_cleanup = now
        except Exception as exc:  # maintenance must never fail a run
            log.warning("maintenance of the mining run tables failed: %s", exc)
        finally:
            self._maintaining = False

    def result_ids(self, run_id: str, collection: str) -> pa.Array:
        """The ids a SUCCEEDED run of ``collection`` selected, in rank order (what a
        dataset adds "from a run"); FAILED_PRECONDITION for a run that has not succeeded."""
        rec = self.get(run_id)
        if rec.collection != collection:
            raise InvalidArgument(
                f"mining run '{run_id}' ran on collection '{rec.collection}', not '{collection}'")
        if rec.state != "SUCCEEDED":
            raise FailedPrecondition(f"mining run '{run_id}' is {rec.state}; only a SUCCEEDED run has results")
        return self.results(run_id).column("id").combine_chunks()

    def results(self, run_id: str) -> pa.Table:
        """``id, rank, score`` (+ ``related_id`` when the miner names one) of a finished run."""
        table = (self._results.search().where(f"run_id = {sql_quote(run_id)}")
                 .select(["id", "rank", "score", "related_id"]).limit(None).to_arrow()).sort_by("rank")
        if table.column("related_id").null_count == table.num_rows:
            table = table.drop_columns(["related_id"])
        return table

    def mark_interrupted(self) -> int:
        """Runs left PENDING/RUNNING by a previous process: INTERRUPTED (restartable)."""
        rows = self._runs.search().where("state IN ('PENDING', 'RUNNING')").limit(None).to_arrow().to_pylist()
        for row in rows:
            self.update(RunRecord.from_row(row), state="INTERRUPTED", finished_at=time.time(),
                        error="the server stopped while this run was in progress; start it again")
        return len(rows)
