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
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass, field
from typing import Any

from indexing.errors import FailedPrecondition


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


Executor = Callable[[str, Sequence[PendingWrite]], None]


class GroupCommitter:
    """The write queue of one collection.

    ``execute(kind, writes)`` performs one commit for ``writes`` (all of ``kind``, equal
    keys, in queue order) and calls ``finish`` on each; if it raises, every write it was
    given that is not finished yet fails with that exception.
    """

    def __init__(self, execute: Executor, *, slot: threading.Lock | threading.RLock | None = None,
                 max_rows: int = 200_000, linger_s: float = 0.0) -> None:
        self._execute = execute
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
            self._arrived.notify()
            while not last.done and self._leader:
                self._cv.wait()
            if not last.done:
                self._leader = True
        if not last.done:
            self._lead(last)
        return mine

    def _lead(self, own: PendingWrite) -> None:
        try:
            while True:
                with self._cv:
                    if own.done or not self._queue:
                        return
                    self._linger()
                    group = self._take()
                started = time.monotonic()
                self._commit(group)
                with self._cv:
                    self._committed(group, started)
                    self._cv.notify_all()
        finally:
            with self._cv:
                self._leader = False
                self._cv.notify_all()

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
        return group

    def _commit(self, group: list[PendingWrite]) -> None:
        try:
            with self.slot:
                self._execute(group[0].kind, group)
        except BaseException as exc:  # the commit failed: so did every write in it
            for w in group:
                if not w.done:
                    w.finish(error=exc)
        for w in group:
            w.group_size = len(group)
            if not w.done:  # an executor that forgot one: never leave a caller waiting
                w.finish(error=RuntimeError("internal error: the write was not committed"))
        s = self.stats
        s.commits += 1
        s.writes += len(group)
        s.largest_group = max(s.largest_group, len(group))
        s.by_kind[group[0].kind] = s.by_kind.get(group[0].kind, 0) + 1

    def close(self) -> None:
        """Refuse new writes; those already queued are still committed."""
        with self._cv:
            self._closed = True
            self._arrived.notify_all()  # a lingering leader commits what it has

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


__all__ = ["CommitStats", "GroupCommitter", "PendingWrite"]
