"""Group commit: concurrent writes to one collection share LanceDB commits.

Every LanceDB write is a commit (a new version, a manifest, at least one fragment), and
commits to one table are taken one at a time. Sixteen clients each sending 20-row upserts
therefore queue behind each other's commits: in the soak benchmark a 20-row upsert waited
p50 1.1 s. Databases solve this with *group commit*, and so does this module.

How it works (leader/follower, no extra thread):

* A writer validates its batch in its own thread (per-row errors stay its own), then
  :meth:`GroupCommitter.submit` appends it to the collection's queue and waits.
* If no commit is running, the writer becomes the *leader*: it takes the longest run of
  queued writes at the head of the queue that may share a commit (same kind, same
  ``key`` — e.g. upserts with the same columns — and at most ``max_rows`` rows in all),
  executes them as one commit while holding the collection's commit slot, hands each
  writer its own result (or the commit's error), and goes on with the next run until its
  own write is done; then it hands leadership to a waiting writer.
* Writes arriving while a commit runs accumulate, so the group grows with the load: an
  idle collection commits a lone write at once (no added latency), a busy one commits
  many writes per commit.
* *Linger*: clients that write in a loop come back as soon as they are answered, but
  not at once — each answer goes back through gRPC, the client builds its next batch, the
  server validates it. Committing what is queued the moment a commit ends splits such
  writers into two halves that alternate (one half commits while the other queues: 16
  writers, groups of 8, each write waits about two commits). So the leader waits for the
  writers the last commit answered — until as many callers are queued as were queued
  then plus those it answered, for at most ``linger_s`` and never longer than that commit
  took — and they share one commit. Waiting is judged after each linger: it paid if the
  callers it gained times the commit time they saved exceeds the callers it kept waiting
  times how long (a running average of that balance); when it stops paying (writers
  that do other work between writes, one-off writers) the leader stops lingering and
  tries again at one chance in ``PROBE_EVERY``. A lone writer never waits (as many
  callers are queued as it expects: itself).

Guarantees: a writer returns only after the commit that holds its rows has returned
(durable in the object store / file system); a failed commit fails exactly the writers
whose writes were in it; writes are applied in the order they were queued, so the result
is the same as executing them one after another (a later write of an id wins). Runs of
different kinds (an upsert, then a delete, then an upsert) stay in order and are separate
commits.

The commit slot (``slot``) is a lock shared with maintenance: compaction takes it
between group commits, so it never loses its commit to a concurrent write and writes
never see a conflict from it.

*Logged writes* (:meth:`GroupCommitter.submit_logged`, the collection's write-ahead log,
:mod:`indexing.write_log`): the writer returns once its write is in the log; the write
waits in the same queue, in order with every other write, and an *applier* thread
commits what is queued while no writer leads — each commit takes everything queued
meanwhile (up to ``max_rows``), so the commit size follows the write rate rather than the
number of writers. A failed commit of logged writes puts them back at the head of the
queue and is tried again after a pause (they were acknowledged: they must apply);
``apply_error`` says why meanwhile. :meth:`drain` is the read barrier: it returns once
every write logged before it was called is applied. Once ``max_backlog_rows`` rows wait to
be applied, a logged writer also waits for its commit, as an unlogged one does.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass, field
from typing import Any

from indexing.errors import FailedPrecondition, Unavailable


@dataclass(eq=False)
class PendingWrite:
    """One caller's write, waiting for (or done with) its commit."""

    kind: str  # what the executor does: "upsert", "update", "delete", "tags"
    key: Hashable  # writes of one kind with equal keys may share a commit
    payload: Any  # what the executor needs (validated data, a predicate...)
    rows: int = 1  # its size, for the max_rows bound of a group
    done: bool = False
    result: Any = None
    error: BaseException | None = None
    group_size: int = 0  # writes in the commit that held this one (for stats/tests)
    caller: int = 0  # the submit_many call it came with: writers are counted by callers
    log_seq: int = 0  # its record in the write log (0: not logged, its writer waits)

    def finish(self, result: Any = None, error: BaseException | None = None) -> None:
        self.result, self.error, self.done = result, error, True


@dataclass
class CommitStats:
    commits: int = 0
    writes: int = 0
    largest_group: int = 0
    by_kind: dict[str, int] = field(default_factory=dict)
    lingers: int = 0  # times the leader waited for answered writers to come back
    lingered_s: float = 0.0  # how long in all
    linger_gained: int = 0  # callers that joined a commit during those waits


PROBE_EVERY = 16  # once lingering stopped paying, it is tried again at one chance in this many
RETRY_PAUSES_S = (0.05, 0.2, 1.0, 5.0)  # between tries of a failed commit of logged writes


Executor = Callable[[str, Sequence[PendingWrite]], None]


class CommitSlot:
    """The commit slot: a re-entrant lock that can tell whether the calling thread holds
    it (a read barrier in a thread that holds it would wait for itself)."""

    def __init__(self) -> None:
        self._lock = threading.RLock()
        self._local = threading.local()

    def acquire(self, blocking: bool = True, timeout: float = -1) -> bool:
        if self._lock.acquire(blocking, timeout):
            self._local.depth = getattr(self._local, "depth", 0) + 1
            return True
        return False

    def release(self) -> None:
        self._local.depth -= 1
        self._lock.release()

    def __enter__(self) -> CommitSlot:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()

    def held(self) -> bool:
        """True when the calling thread holds the slot."""
        return getattr(self._local, "depth", 0) > 0


class GroupCommitter:
    """The write queue of one collection.

    ``execute(kind, writes)`` performs one commit for ``writes`` (all of ``kind``, equal
    keys, in queue order) and calls ``finish`` on each; if it raises, every write it was
    given that is not finished yet fails with that exception.
    """

    def __init__(self, execute: Executor, *, slot: CommitSlot | threading.Lock | threading.RLock | None = None,
                 max_rows: int = 200_000, linger_s: float = 0.0,
                 applied: Callable[[int], None] | None = None, apply_rows: int = 0,
                 apply_wait_s: float = 0.0) -> None:
        self._execute = execute
        # Called by the committing thread with the last log seq a commit applied, before
        # the next commit (the write log records it).
        self._applied_callback = applied
        # The applier lets logged writes gather — up to apply_rows rows, at most apply_wait_s
        # — before a commit, unless a reader or an unlogged writer waits: each commit of a
        # collection costs about the same whatever it holds (see indexing.write_log).
        self.apply_rows = apply_rows
        self.apply_wait_s = apply_wait_s
        self._readers_waiting = 0
        self._unlogged_queued = 0  # writes in the queue whose writers wait for their commit
        self.slot = slot if slot is not None else threading.RLock()
        self.max_rows = max_rows
        self.linger_s = linger_s
        self._queue: deque[PendingWrite] = deque()
        lock = threading.Lock()
        self._cv = threading.Condition(lock)  # followers wait here for their commit
        self._arrived = threading.Condition(lock)  # a lingering leader waits here for writes
        self._leader = False
        self._closed = False
        self._callers = 0  # submit_many calls so far (each write's ``caller``)
        # The last commit, for the next linger: when it ended, how long it took, and the
        # callers expected in the queue after it — those queued when it ended plus those it
        # answered (when it answered none, they are all queued already).
        self._last_end = float("-inf")
        self._last_commit_s = 0.0
        self._expected_callers = 0
        self._linger_balance = 0.0  # running average of what a linger saved (s); < 0: it costs
        self._lingers_skipped = 0
        self.stats = CommitStats()
        # Logged writes: appended to the log in queue order under _log_lock.
        self._log_lock = threading.Lock()
        self._logged_seq = 0  # the last logged write queued
        self._applied_seq = 0  # the last logged write applied (every one before it too)
        self._backlog_rows = 0  # rows of logged writes not applied yet
        self._applier: threading.Thread | None = None
        self._discard = False  # the collection was dropped: queued logged writes are dropped too
        self.apply_error: BaseException | None = None  # why the last commit of logged writes failed

    def submit(self, kind: str, key: Hashable, payload: Any, rows: int = 1) -> Any:
        """Queue a write and wait until it is committed; returns what the executor gave it
        or raises the error of its commit."""
        (write,) = self.submit_many([(kind, key, payload, rows)])
        if write.error is not None:
            raise write.error
        return write.result

    def submit_many(self, writes: Sequence[tuple[str, Hashable, Any, int]]) -> list[PendingWrite]:
        """Queue several writes of one caller back to back, (kind, key, payload, rows) each,
        and wait until all are committed: consecutive ones that may share a commit do (a
        streamed ingest hands over the batches that arrived while its last commit ran).
        Returns them finished, in order; each carries its own result or error."""
        mine = [PendingWrite(kind=kind, key=key, payload=payload, rows=max(1, rows))
                for kind, key, payload, rows in writes]
        if not mine:
            return mine
        last = mine[-1]  # the queue is committed in order: the last one done means all are
        with self._cv:
            self.refuse_if_closed()
            self._callers += 1
            for w in mine:
                w.caller = self._callers
            self._queue.extend(mine)
            self._unlogged_queued += len(mine)
            self._arrived.notify()
            while not last.done and self._leader:
                self._cv.wait()
            if not last.done:
                self._leader = True
        if not last.done:
            self._lead(last)
        return mine

    def submit_logged(self, kind: str, key: Hashable, payload: Any, rows: int,
                      append: Callable[[], int]) -> PendingWrite:
        """Queue a write as ``append()`` writes it to the write log (returning its seq; if it
        raises, nothing is queued), in log order, and return without waiting for its
        commit. The caller acknowledges the write after :meth:`wait_for_backlog`, from what
        it knew when logging."""
        write = PendingWrite(kind=kind, key=key, payload=payload, rows=max(1, rows))
        with self._log_lock:
            self.refuse_if_closed()
            write.log_seq = append()
            with self._cv:
                self._callers += 1
                write.caller = self._callers
                self._queue.append(write)
                self._logged_seq = write.log_seq
                self._backlog_rows += write.rows
                self._arrived.notify()
                self._start_applier()
        return write

    def wait_for_backlog(self, write: PendingWrite, max_backlog_rows: int, timeout: float | None) -> None:
        """When more than ``max_backlog_rows`` rows of logged writes wait to be applied, wait
        for ``write``'s commit (as an unlogged writer does), so the log cannot outrun the
        table — Unavailable after ``timeout`` seconds (the write stays logged and applies
        later: sending it again is harmless, an upsert by id)."""
        with self._cv:
            if self._backlog_rows <= max_backlog_rows:
                return
            if self._cv.wait_for(lambda: write.done or self._discard, timeout):
                return
            raise Unavailable(
                f"the write log of this collection is {self._backlog_rows} rows behind after {timeout:.0f} s "
                f"(last error: {self.apply_error!r}); this write is logged and will be applied — "
                "retry later")

    def _start_applier(self) -> None:
        """(lock held) Wake the thread that commits logged writes, starting it if need be."""
        if self._applier is None or not self._applier.is_alive():
            self._applier = threading.Thread(target=self._apply, name="assay-write-log-applier", daemon=True)
            self._applier.start()
        self._cv.notify_all()

    def _apply(self) -> None:
        """The applier: leads whenever writes are queued and nobody leads; ends when the
        committer is closed and the queue is empty (or dropped)."""
        while True:
            with self._cv:
                self._cv.wait_for(lambda: self._discard or (self._closed and not self._leader)
                                  or (bool(self._queue) and not self._leader))
                if self._discard or not self._queue:
                    return
                self._leader = True
            self._lead(None)

    def drain(self, timeout: float | None) -> None:
        """The read barrier: return once every write logged before this call is applied;
        Unavailable (with why) if that takes longer than ``timeout`` seconds."""
        with self._cv:
            target = self._logged_seq
            if self._applied_seq >= target:
                return
            self._readers_waiting += 1
            self._arrived.notify()  # an applier letting writes gather commits them now
            try:
                if self._cv.wait_for(lambda: self._applied_seq >= target or self._discard, timeout):
                    return
            finally:
                self._readers_waiting -= 1
            raise Unavailable(
                f"{self._logged_seq - self._applied_seq} acknowledged write(s) of this collection are "
                f"not applied yet after {timeout:.0f} s (last error: {self.apply_error!r}); "
                "they stay in the write log and are applied when the cause is fixed — retry the read")

    def start_log_at(self, seq: int) -> None:
        """The write log's last record (all applied): logged writes number on from it."""
        with self._cv:
            self._logged_seq = self._applied_seq = seq

    @property
    def logged_backlog(self) -> int:
        """Logged writes not applied yet."""
        with self._cv:
            return self._logged_seq - self._applied_seq

    def _lead(self, own: PendingWrite | None) -> None:
        """Commit queued runs until ``own`` is done (None: the applier, until the queue is
        empty)."""
        failures = 0
        try:
            while True:
                with self._cv:
                    if (own.done if own is not None else self._discard) or not self._queue:
                        return
                    if not self._queue[0].log_seq:  # logged writers are not waiting: no linger
                        self._linger()
                    elif own is None:
                        self._gather()
                    if not self._queue:  # a dropped collection's logged writes were discarded meanwhile
                        return
                    group = self._take()
                started = time.monotonic()
                failed = self._commit(group)
                applied = max((w.log_seq for w in group if w.log_seq and w.done), default=0)
                if failed:  # the mark never passes a write that is still to apply
                    applied = min(applied, failed[0].log_seq - 1)
                if applied and self._applied_callback is not None:
                    try:
                        self._applied_callback(applied)
                    except Exception as exc:  # the rows are in the table: only their mark is late
                        self.apply_error = exc
                with self._cv:
                    if failed:  # acknowledged writes must apply: back to the head of the queue
                        self._queue.extendleft(reversed(failed))  # (all logged: no count to restore)
                    if applied:
                        self._applied_seq = max(self._applied_seq, applied)
                        self._backlog_rows -= sum(w.rows for w in group if w.log_seq and w.done)
                    self._committed(group, started)
                    self._cv.notify_all()
                if failed:
                    time.sleep(RETRY_PAUSES_S[min(failures, len(RETRY_PAUSES_S) - 1)])
                    failures += 1
                else:
                    failures = 0
                    self.apply_error = None if applied else self.apply_error
        finally:
            with self._cv:
                self._leader = False
                self._cv.notify_all()

    def _gather(self) -> None:
        """(lock held; the applier leads) Let logged writes gather before their commit while
        nobody waits for it (see ``apply_rows``)."""
        if self.apply_wait_s <= 0 or self._backlog_rows >= self.apply_rows:
            return
        self._arrived.wait_for(
            lambda: (self._closed or self._readers_waiting > 0 or self._backlog_rows >= self.apply_rows
                     or self._unlogged_queued > 0),
            timeout=self.apply_wait_s)

    def _queued_callers(self) -> int:
        return len({w.caller for w in self._queue})

    def _committed(self, group: list[PendingWrite], started: float) -> None:
        """Remember the commit that just ended for the next :meth:`_linger` (lock held)."""
        self._last_end = time.monotonic()
        self._last_commit_s = self._last_end - started
        queued = {w.caller for w in self._queue}
        answered = {w.caller for w in group} - queued  # a caller with writes left is not answered
        self._expected_callers = len(queued) + len(answered)

    def _linger(self) -> None:
        """Before taking a group (lock held): wait for the callers the last commit answered
        to write again, while that pays (see the module docstring)."""
        if self.linger_s <= 0:
            return
        deadline = self._last_end + min(self.linger_s, self._last_commit_s)
        expected = self._expected_callers
        before = self._queued_callers()
        if before >= expected or time.monotonic() >= deadline:
            return
        if self._linger_balance < 0 and self._lingers_skipped < PROBE_EVERY - 1:
            self._lingers_skipped += 1
            return
        self._lingers_skipped = 0
        start = time.monotonic()
        self._arrived.wait_for(lambda: self._closed or self._queued_callers() >= expected,
                               timeout=deadline - start)
        waited = time.monotonic() - start
        gained = self._queued_callers() - before
        # Each caller gained is spared about one commit of waiting; each caller that was
        # already queued waited ``waited`` more.
        saved = gained * self._last_commit_s - before * waited
        self._linger_balance = 0.7 * self._linger_balance + 0.3 * saved
        s = self.stats
        s.lingers += 1
        s.lingered_s += waited
        s.linger_gained += gained

    def _take(self) -> list[PendingWrite]:
        """The run of writes at the head of the queue that may share one commit."""
        first = self._queue.popleft()
        group, rows = [first], first.rows
        while self._queue:
            nxt = self._queue[0]
            if nxt.kind != first.kind or nxt.key != first.key or rows + nxt.rows > self.max_rows:
                break
            group.append(self._queue.popleft())
            rows += nxt.rows
        self._unlogged_queued -= sum(1 for w in group if not w.log_seq)
        return group

    def _commit(self, group: list[PendingWrite]) -> list[PendingWrite]:
        """Execute one group; returns its logged writes that failed (to be tried again)."""
        failed: list[PendingWrite] = []
        try:
            with self.slot:
                self._execute(group[0].kind, group)
        except BaseException as exc:  # the commit failed: so did every write in it
            self.apply_error = exc if any(w.log_seq for w in group) else self.apply_error
            for w in group:
                if not w.done:
                    if w.log_seq:
                        failed.append(w)
                    else:
                        w.finish(error=exc)
        for w in group:
            if w.log_seq and w.done and w.error is not None:  # acknowledged: it must apply
                self.apply_error = w.error
                w.done, w.error = False, None
                failed.append(w)
        if failed:
            failed.sort(key=lambda w: w.log_seq)
            return failed
        for w in group:
            w.group_size = len(group)
            if not w.done:  # an executor that forgot one: never leave a caller waiting
                w.finish(error=RuntimeError("internal error: the write was not committed"))
        s = self.stats
        s.commits += 1
        s.writes += len(group)
        s.largest_group = max(s.largest_group, len(group))
        s.by_kind[group[0].kind] = s.by_kind.get(group[0].kind, 0) + 1
        return failed

    def close(self, timeout: float | None = 0.0, *, discard: bool = False) -> bool:
        """Refuse new writes; those already queued are still committed (by their writers,
        logged ones by the applier, which this waits for up to ``timeout`` seconds) — or,
        with ``discard`` (the collection is dropped), logged ones are dropped. True when no
        logged write is left."""
        with self._cv:
            self._closed = True
            if discard:
                self._discard = True
                self._queue = deque(w for w in self._queue if not w.log_seq)
            self._arrived.notify_all()  # a lingering leader commits what it has
            self._cv.notify_all()
            applier = self._applier
        if applier is not None and timeout != 0.0:
            applier.join(timeout)
        with self._cv:
            return self._applied_seq >= self._logged_seq or self._discard

    @property
    def closed(self) -> bool:
        return self._closed

    def refuse_if_closed(self) -> None:
        """Raise before a writer spends time validating a write that would be refused."""
        if self._closed:
            raise FailedPrecondition("the collection is closing; writes are refused")

    @property
    def pending(self) -> int:
        with self._cv:
            return len(self._queue)


__all__ = ["CommitSlot", "CommitStats", "GroupCommitter", "PendingWrite"]
