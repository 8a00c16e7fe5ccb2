"""Long-running work: a pool of worker threads and persisted job records.

Jobs run in threads of this process (LanceDB releases the GIL in its Rust core, and
threads avoid the fork-after-LanceDB crash entirely). Each job's record — kind,
collection, parameters, state, progress, result, error, timestamps — is written to the
``_jobs`` table under the data root when it is created and when it ends (progress at most
once a second) and served from memory while the job runs and for the newest
``JOB_RECORDS_KEPT`` ended jobs; older records are read from the table when asked for, so a
server that has run millions of jobs holds no more of them than a new one. When the server
starts, records left PENDING or RUNNING by a previous process are marked INTERRUPTED, so a
crash or restart is reported, not forgotten.

A job function receives a :class:`JobContext`: it reports progress with
``ctx.progress(fraction, message)`` and calls ``ctx.check()`` at safe points, which
raises :class:`JobCancelled` once the job was asked to stop.
"""

from __future__ import annotations

import json
import logging
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import numpy as np
import pyarrow as pa

from indexing.errors import (
    InvalidArgument,
    NotFound,
    ResourceExhausted,
    classify_error,
)
from indexing.filters import ids_predicate, sql_quote
from indexing.maintenance import SystemTableUpkeep, write_records
from indexing.settings import ID_CHUNK, JOB_RECORDS_KEPT, RUNS_CLEANUP_EVERY_S
from indexing.settings import JOBS_COMPACT_EVERY as COMPACT_EVERY
from indexing.store import Collection, Store

log = logging.getLogger("assay.jobs")

PENDING, RUNNING, SUCCEEDED, FAILED, CANCELLED, INTERRUPTED = (
    "PENDING", "RUNNING", "SUCCEEDED", "FAILED", "CANCELLED", "INTERRUPTED")
TERMINAL = frozenset({SUCCEEDED, FAILED, CANCELLED, INTERRUPTED})
JOBS_TABLE = "_jobs"
_JOBS_SCHEMA = pa.schema([
    pa.field("id", pa.string(), nullable=False),
    pa.field("kind", pa.string()),
    pa.field("collection", pa.string()),
    pa.field("state", pa.string()),
    pa.field("progress", pa.float64()),
    pa.field("message", pa.string()),
    pa.field("params", pa.string()),
    pa.field("result", pa.string()),
    pa.field("error", pa.string()),
    pa.field("error_code", pa.string()),
    pa.field("created_at", pa.float64()),
    pa.field("started_at", pa.float64()),
    pa.field("finished_at", pa.float64()),
])


class JobCancelled(Exception):
    """Raised by :meth:`JobContext.check` once the job was asked to stop."""


@dataclass(frozen=True)
class JobRecord:
    id: str
    kind: str
    collection: str
    state: str = PENDING
    progress: float = 0.0
    message: str = ""
    params: dict[str, Any] = field(default_factory=dict)
    result: dict[str, Any] = field(default_factory=dict)
    error: str = ""
    error_code: str = ""
    created_at: float = 0.0
    started_at: float = 0.0
    finished_at: float = 0.0

    @property
    def done(self) -> bool:
        return self.state in TERMINAL

    def to_row(self) -> dict[str, Any]:
        row = asdict(self)
        row["params"] = json.dumps(self.params, default=str)
        row["result"] = json.dumps(self.result, default=str)
        return row

    @classmethod
    def from_row(cls, row: Mapping[str, Any]) -> JobRecord:
        data = dict(row)
        data["params"] = json.loads(data.get("params") or "{}")
        data["result"] = json.loads(data.get("result") or "{}")
        return cls(**{k: v for k, v in data.items() if v is not None})


@dataclass(frozen=True)
class JobKind:
    """A kind of job: ``validate(collection, params)`` runs before the job is accepted
    (so bad parameters are an INVALID_ARGUMENT of StartJob, not a failed job) and returns
    the normalised parameters; ``run(ctx, collection, params)`` returns the result."""

    run: Callable[[JobContext, Collection, dict[str, Any]], Mapping[str, Any]]
    validate: Callable[[Collection, dict[str, Any]], dict[str, Any]] = lambda _c, p: p


class JobContext:
    def __init__(self, manager: JobManager, job_id: str) -> None:
        self._manager = manager
        self.job_id = job_id
        self.cancel_event = threading.Event()

    @property
    def cancelled(self) -> bool:
        return self.cancel_event.is_set()

    def check(self) -> None:
        if self.cancel_event.is_set():
            raise JobCancelled()

    def progress(self, fraction: float, message: str = "") -> None:
        self._manager._update(self.job_id, progress=max(0.0, min(1.0, float(fraction))), message=message)


class JobManager:
    def __init__(self, store: Store, *, workers: int = 2, max_queued: int = 64) -> None:
        self.store = store
        self.kinds: dict[str, JobKind] = {}
        # every job not ended, and the newest JOB_RECORDS_KEPT ended ones (insertion order:
        # ended ones are dropped oldest first); the others are only in the table
        self._jobs: dict[str, JobRecord] = {}
        # the newest created_at of a record not held (0: all are): list() reads the table
        # for what is older
        self._horizon = 0.0
        self._contexts: dict[str, JobContext] = {}  # jobs not ended
        self._changed = threading.Condition()
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="assay-job")
        self._futures: dict[str, Future[None]] = {}  # the worker-thread runs of jobs not ended
        self.max_queued = max_queued
        self._last_persist: dict[str, float] = {}
        self._persist_lock = threading.Lock()
        self._upkeep = SystemTableUpkeep(COMPACT_EVERY, RUNS_CLEANUP_EVERY_S)
        self._unsaved: dict[str, JobRecord] = {}  # newest records not saved yet (see _persist)
        self._table = self._open_table()
        self._recover()

    # -- persistence -------------------------------------------------------------

    def _open_table(self) -> Any:
        return self.store.system_table(JOBS_TABLE, _JOBS_SCHEMA, "id")

    def _read(self, where: str) -> list[JobRecord]:
        return [JobRecord.from_row(row) for row in self._table.search().where(where).limit(None)
                .to_arrow().to_pylist()]

    def _recover(self) -> None:
        """Hold the records of jobs a previous process left unfinished (marked INTERRUPTED)
        and of the newest ``JOB_RECORDS_KEPT`` ended ones; only their ids, states and
        creation times are read for the rest."""
        index = self._table.search().select(["id", "state", "created_at"]).limit(None).to_arrow()
        created = np.nan_to_num(index.column("created_at").to_numpy(zero_copy_only=False), nan=0.0)
        ended = np.isin(index.column("state").to_numpy(zero_copy_only=False), list(TERMINAL))
        ended_rows = np.flatnonzero(ended)
        newest = ended_rows[np.argsort(-created[ended_rows], kind="stable")]
        held = np.sort(np.concatenate([np.flatnonzero(~ended), newest[:JOB_RECORDS_KEPT]]))
        if len(newest) > JOB_RECORDS_KEPT:
            self._horizon = float(created[newest[JOB_RECORDS_KEPT:]].max())
        ids = index.column("id").take(pa.array(held, pa.int64())).to_pylist()
        records = [rec for start in range(0, len(ids), ID_CHUNK)
                   for rec in self._read(ids_predicate(ids[start:start + ID_CHUNK]))]
        interrupted = []
        for rec in sorted(records, key=lambda r: r.created_at):
            if not rec.done:
                rec = replace(rec, state=INTERRUPTED, finished_at=time.time(),
                              message="the server stopped while this job was "
                                      f"{rec.state.lower()}; start it again")
                interrupted.append(rec)
            self._jobs[rec.id] = rec
        for rec in interrupted:
            self._persist(rec, force=True)
        self._forget_ended()
        if interrupted:
            log.warning("marked %d job(s) left unfinished by a previous server as INTERRUPTED", len(interrupted))

    def _persist(self, rec: JobRecord, *, force: bool = False, new: bool = False) -> None:
        """Write ``rec`` (and records not saved before) to ``_jobs``; a ``new`` job's first
        record alone is appended (:func:`write_records`)."""
        now = time.monotonic()
        if not force and now - self._last_persist.get(rec.id, 0.0) < 1.0:
            return
        self._last_persist[rec.id] = now
        with self._persist_lock:
            # Records that could not be saved before (a full disk, a lost object store) go
            # with this one: the table catches up as soon as writes work again.
            pending = {**self._unsaved, rec.id: rec}
            batch = pa.Table.from_pylist([r.to_row() for r in pending.values()], schema=_JOBS_SCHEMA)
            try:
                write_records(self._table, batch, "id", all_new=new and len(pending) == 1)
                self._unsaved.clear()
            except Exception as exc:  # a record that cannot be saved must not kill the job
                self._unsaved[rec.id] = rec
                if (mapped := classify_error(exc, self.store.root)) is not None:
                    log.warning("could not persist job %s (kept in memory, saved later): %s",
                                rec.id, mapped.message)
                else:
                    log.exception("could not persist job %s", rec.id)
                return
            if self._upkeep.wrote():
                # Every record update is a table version: compact (and now and then drop old
                # ones); the merge on ``id`` goes through a BTREE, not a scan of every job.
                try:
                    self._upkeep.maintain([(self._table, ("id",))])
                except Exception as exc:  # the records are saved: a failed compaction is not theirs
                    log.warning("maintenance of the jobs table failed (retried %d writes later): %s",
                                self._upkeep.every_writes, exc)

    # -- API -----------------------------------------------------------------------

    def register(self, kind: str, job: JobKind) -> None:
        self.kinds[kind] = job

    def start(self, kind: str, collection: str, params: Mapping[str, Any] | None = None) -> JobRecord:
        if kind not in self.kinds:
            raise InvalidArgument(f"unknown job kind '{kind}' (known: {', '.join(sorted(self.kinds))})")
        col = self.store.collection(collection)
        if not self.has_capacity():
            raise ResourceExhausted(f"{self.max_queued} jobs are pending or running; that is the limit "
                                    "(max_jobs); wait for some to finish")
        clean = self.kinds[kind].validate(col, dict(params or {}))
        rec = JobRecord(id=uuid.uuid4().hex, kind=kind, collection=collection, params=clean,
                        created_at=time.time(), message="queued")
        ctx = JobContext(self, rec.id)
        with self._changed:
            self._jobs[rec.id] = rec
            self._contexts[rec.id] = ctx
        self._persist(rec, force=True, new=True)
        future = self._futures[rec.id] = self._pool.submit(self._run, rec.id, col, ctx)
        future.add_done_callback(lambda _f, job_id=rec.id: self._futures.pop(job_id, None))
        return rec

    def has_capacity(self) -> bool:
        return len(self._in_flight()) < self.max_queued

    def _in_flight(self) -> list[str]:
        """Ids of the jobs not ended. Read under the lock the writers hold: jobs start and
        end in other threads, and iterating the records while one is added or dropped
        raises (a soak's StartMining failed INTERNAL so)."""
        with self._changed:
            return [job_id for job_id, rec in self._jobs.items() if not rec.done]

    def get(self, job_id: str) -> JobRecord:
        rec = self._jobs.get(job_id)
        if rec is None and self._horizon:  # an ended job no longer held
            found = self._read(f"id = {sql_quote(job_id)}")
            rec = found[0] if found else None
        if rec is None:
            raise NotFound(f"job '{job_id}' not found")
        return rec

    def list(self, *, collection: str | None = None, states: set[str] | None = None,
             limit: int = 100) -> list[JobRecord]:
        def wanted(j: JobRecord) -> bool:
            return (not collection or j.collection == collection) and (not states or j.state in states)

        held = dict(self._jobs)
        jobs = sorted((j for j in held.values() if wanted(j)), key=lambda j: j.created_at, reverse=True)
        horizon = self._horizon
        # (jobs not ended are all held: asked for those alone, the table has nothing to add)
        if horizon and (not states or states & TERMINAL) and (
                len(jobs) < limit or jobs[limit - 1].created_at <= horizon):
            # the newest `limit` may include records no longer held: those are older than
            # the horizon, read from the table (records held win: they are newer)
            where = [f"created_at <= {horizon!r}"]
            if collection:
                where.append(f"collection = {sql_quote(collection)}")
            if states:
                where.append(f"state IN ({', '.join(sql_quote(s) for s in sorted(states))})")
            older = [j for j in self._read(" AND ".join(where)) if j.id not in held]
            jobs = sorted(jobs + older, key=lambda j: j.created_at, reverse=True)
        return jobs[:limit]

    def cancel(self, job_id: str) -> JobRecord:
        rec = self.get(job_id)
        ctx = self._contexts.get(job_id)
        if not rec.done and ctx is not None:
            ctx.cancel_event.set()
            if rec.state == PENDING:
                self._finish(job_id, CANCELLED, message="cancelled before it started")
            else:
                self._update(job_id, message="cancelling")
        return self.get(job_id)

    def watch(self, job_id: str, *, is_active: Callable[[], bool] = lambda: True,
              poll_s: float = 0.5) -> Iterator[JobRecord]:
        """Yield the record now and at every change until the job ends (or the caller goes)."""
        last = None
        while is_active():
            with self._changed:
                rec = self.get(job_id)
                if rec == last:
                    self._changed.wait(timeout=poll_s)
                    rec = self.get(job_id)
            if rec != last:
                yield rec
                last = rec
            if rec.done:
                return

    def wait(self, job_id: str, timeout: float | None = None) -> JobRecord:
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._changed:
            while not self.get(job_id).done:
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    break
                self._changed.wait(timeout=left)
        return self.get(job_id)

    def shutdown(self, grace: float = 10.0) -> bool:
        """Let running jobs finish for half the grace period, then cancel them; whatever
        has not ended when the grace period is over is recorded as INTERRUPTED. True when
        every job's thread has returned (False: one is still inside a call that cannot be
        interrupted, such as an index build, and ends on its own)."""
        deadline = time.monotonic() + grace
        pending = self._in_flight()
        for job_id in pending:
            if self.get(job_id).state == PENDING:
                self._cancel_event(job_id)
                self._finish(job_id, INTERRUPTED, message="the server shut down before the job started")
        half = time.monotonic() + grace / 2
        for job_id in pending:
            self.wait(job_id, timeout=max(0.0, half - time.monotonic()))
        for job_id in pending:
            if not self.get(job_id).done:
                self._cancel_event(job_id)
        for job_id in pending:
            self.wait(job_id, timeout=max(0.0, deadline - time.monotonic()))
        for job_id in pending:
            if not self.get(job_id).done:
                self._finish(job_id, INTERRUPTED, message="the server shut down while the job was running")
        # A job's record ends just before its thread returns: give the threads a moment.
        running = [f for f in list(self._futures.values()) if not f.done()]
        _, stuck = wait(running, timeout=max(0.0, deadline - time.monotonic()) + 1.0)
        self._pool.shutdown(wait=False, cancel_futures=True)
        if stuck:
            log.warning("%d job thread(s) still running after the grace period; they stop at their "
                        "next checkpoint", len(stuck))
        return not stuck

    # -- internals -----------------------------------------------------------------

    def _cancel_event(self, job_id: str) -> None:
        if (ctx := self._contexts.get(job_id)) is not None:  # (none once the job has ended)
            ctx.cancel_event.set()

    def _update(self, job_id: str, **changes: Any) -> JobRecord:
        with self._changed:
            rec = self._jobs.get(job_id)
            if rec is None or rec.done:
                return rec or self.get(job_id)
            rec = replace(rec, **changes)
            self._jobs[job_id] = rec
            self._changed.notify_all()
        # RUNNING is not forced to the table: a job a crash left PENDING or RUNNING is
        # INTERRUPTED at the next start alike, and the records are served from memory; the
        # end state always is (a write per state cost a mining run ~7 ms each).
        self._persist(rec, force="state" in changes and changes["state"] != RUNNING)
        return rec

    def _finish(self, job_id: str, state: str, **changes: Any) -> None:
        with self._changed:
            if (held := self._jobs.get(job_id)) is None or held.done:
                return
            rec = replace(held, state=state, finished_at=time.time(), **changes)
        # Persist before anyone can see the end state: whoever waits on the job (a client,
        # or shutdown() followed by a new server reading the records) must find it saved.
        self._persist(rec, force=True)
        with self._changed:
            if self._jobs[job_id].done:
                return
            self._jobs[job_id] = rec
            self._contexts.pop(job_id, None)
            self._last_persist.pop(job_id, None)
            self._forget_ended()
            self._changed.notify_all()
        log.info("job %s (%s on %s) %s %s", job_id, rec.kind, rec.collection, state, rec.error or rec.message)

    def _forget_ended(self) -> None:
        """Drop the oldest ended records beyond ``JOB_RECORDS_KEPT`` from memory (they are
        in the table: an ended record is saved before it is held)."""
        ended = [(job_id, rec) for job_id, rec in self._jobs.items() if rec.done]  # oldest first
        for job_id, rec in ended[:max(0, len(ended) - JOB_RECORDS_KEPT)]:
            if job_id not in self._unsaved:  # (an unsaved one is only here)
                del self._jobs[job_id]
                self._horizon = max(self._horizon, rec.created_at)

    def _run(self, job_id: str, col: Collection, ctx: JobContext) -> None:
        if ctx.cancelled or self.get(job_id).done:
            return
        rec = self._update(job_id, state=RUNNING, started_at=time.time(), message="running")
        try:
            # dict() here: a job kind that returns no mapping fails like any other bug of its
            # (outside the try it left the job RUNNING for ever and its worker thread ended)
            result = dict(self.kinds[rec.kind].run(ctx, col, rec.params))
            ctx.check()
        except JobCancelled:
            self._finish(job_id, CANCELLED, message="cancelled")
        except Exception as exc:  # a job's bug must not take the worker down
            # An AssayError; or the caller's filter failing on the data, a full disk, a lost
            # object store: not a bug.
            if (mapped := classify_error(exc, self.store.root)) is not None:
                if mapped is not exc and mapped.code in ("RESOURCE_EXHAUSTED", "UNAVAILABLE"):
                    log.warning("job %s failed: %s", job_id, mapped.message)
                self._finish(job_id, FAILED, error=mapped.message, error_code=mapped.code, message="failed")
                return
            log.exception("job %s failed", job_id)
            self._finish(job_id, FAILED, error=f"{type(exc).__name__}: {exc}", error_code="INTERNAL",
                         message="failed")
        else:
            self._finish(job_id, SUCCEEDED, progress=1.0, result=result, message="done")
