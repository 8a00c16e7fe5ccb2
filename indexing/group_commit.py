"""Group commit: concurrent writes to one collection share LanceDB commits.

Every LanceDB write is a commit (a new version, a manifest, at least one fragment), and
commits to one table are taken one at a time. Sixteen clients each sending 20-row upserts
therefore queue behind each other's commits: in the soak benchmark a 20-row upsert waited
p50 1.1 s. Databases solve this with *group commit*, and so does this module.

How it works (leader/follower, no timer, no extra thread):

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

    def finish(self, result: Any = None, error: BaseException | None = None) -> None:
        self.result, self.error, self.done = result, error, True


@dataclass
class CommitStats:
    commits: int = 0
    writes: int = 0
    largest_group: int = 0
    by_kind: dict[str, int] = field(default_factory=dict)


Executor = Callable[[str, Sequence[PendingWrite]], None]


class GroupCommitter:
    """The write queue of one collection.

    ``execute(kind, writes)`` performs one commit for ``writes`` (all of ``kind``, equal
    keys, in queue order) and calls ``finish`` on each; if it raises, every write it was
    given that is not finished yet fails with that exception.
    """

    def __init__(self, execute: Executor, *, slot: threading.Lock | threading.RLock | None = None,
                 max_rows: int = 200_000) -> None:
        self._execute = execute
        self.slot = slot if slot is not None else threading.RLock()
        self.max_rows = max_rows
        self._queue: deque[PendingWrite] = deque()
        self._cv = threading.Condition(threading.Lock())
        self._leader = False
        self._closed = False
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
            self._queue.extend(mine)
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
                    group = self._take()
                self._commit(group)
                with self._cv:
                    self._cv.notify_all()
        finally:
            with self._cv:
                self._leader = False
                self._cv.notify_all()

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
