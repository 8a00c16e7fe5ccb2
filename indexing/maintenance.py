"""Background maintenance that keeps a collection fast under a steady write load.

Every commit adds at least one fragment and one version. Left alone, a stream of small
writes piles up fragments (every scan, search and id lookup then pays per fragment: 151
fragments made an id lookup 7× slower than one) and versions (a manifest each), and the
service ages within minutes. Compacting in the background the usual way loses: Lance
refuses a compaction whose rewritten fragments a concurrent update touched ("preempted by
concurrent transaction Update"), and under a steady update load that is every time.

So maintenance is scheduled, per collection, by one thread of the :class:`Store`:

* **Small-fragment compaction, size-tiered, holding the commit slot.** Tiny fragments
  (tier 0, below 8,192 rows: what group commits of small writes leave) are merged once
  ``fanout`` of them exist; the fragments that produces (tier 1, below 32,768 rows) are
  merged likewise. The compaction takes the collection's commit slot (see
  :mod:`indexing.group_commit`), so no write can preempt it; writes queue meanwhile and go
  out as one larger group commit after. The work per compaction is bounded (``fanout``
  fragments of one tier: at most ~256k rows), so the pause is short; bigger fragments
  (bulk batches, what the tiers produce) are excluded and never rewritten under load — a
  bulk ingest is not slowed by compaction.
* **Full compaction when the collection is quiet** (no commit for ``quiet_s``) and has at
  least ``fanout`` fragments: small fragments and deleted rows — without the slot; if a
  write preempts it, it is retried at the next quiet moment.
* **Deleted rows under load.** Updates leave the old copies of their rows deleted in place,
  mostly in big fragments the tiers never rewrite, and every scan and search pays for them.
  The fragment with the most deleted rows is rewritten without them (holding the slot, at
  most ``merge_rows[-1]`` rows) once they are ``purge_fraction`` of it.
* **Index maintenance**: new rows are added to the existing indexes when the collection is
  quiet, or once ``index_min_rows`` are unindexed, or ``index_every_s`` after the last
  update; a space's vector index is built (minutes of CPU for a big space, never holding
  the slot) at a quiet moment once its policy says so, or under a steady stream of writes
  (the collection grew by less than ``steady_growth`` of its rows since the last index
  update) — not in the middle of a bulk ingest, whose index is built once it ends.
  Full compaction and index work are skipped while an ``optimize`` or index build of the
  collection runs in another thread (a job): after a 1M-row ingest both built the same
  vector index at once, each taking twice as long on the shared cores.
* **Version cleanup** every ``cleanup_every_s``: versions older than the store's
  ``cleanup_older_than`` go, except tagged ones — which is how datasets and running mining
  runs keep the versions they read (:meth:`Collection.pin_version`).

``Store(optimize_every=0)`` switches automatic maintenance off (``optimize()`` still works).
"""

from __future__ import annotations

import logging
import threading
import time
import weakref
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Protocol


class Collection(Protocol):
    """What maintenance needs of a collection (:class:`indexing.store.Collection` is one); a
    protocol so this module does not import the store that runs it."""

    name: str

    def release_caches(self) -> None: ...
    def compact_tiers(self, policy: MaintenancePolicy) -> int: ...
    def fragment_count(self) -> int: ...
    def compact_all(self, *, wait: bool = True) -> None: ...
    def unindexed_rows(self) -> int: ...
    def vector_index_due(self) -> bool: ...
    def update_indexes(self, *, build: bool = True, wait: bool = True) -> list[str]: ...
    def row_count(self) -> int: ...
    def cleanup_versions(self) -> int: ...

log = logging.getLogger("assay.maintenance")


@dataclass(frozen=True)
class MaintenancePolicy:
    """When maintenance runs (see the module docstring). Tier i holds the fragments of
    ``tier_rows[i]`` ≤ physical rows < ``tier_rows[i + 1]``; a tier is merged (into
    fragments of up to ``tier_rows[i + 2]`` rows, holding the commit slot) once ``fanout`` of
    its fragments exist. Fragments of ``tier_rows[-1]`` rows or more — bulk batches, and
    what the tiers produce — are only compacted when the collection is quiet."""

    tier_rows: tuple[int, ...] = (0, 8_192, 32_768)
    merge_rows: tuple[int, ...] = (32_768, 262_144)  # target fragment size of each tier's merge
    fanout: int = 8
    quiet_s: float = 5.0  # no commit for this long: full compaction, index builds and updates
    index_min_rows: int = 50_000  # ...or once this many rows (and a quarter of all) are unindexed
    index_every_s: float = 60.0  # ...or this long after the last update, if any are
    steady_growth: float = 0.10  # growth per index update below which a due vector index is built under load
    purge_fraction: float = 0.10  # deleted share of a big fragment that has it rewritten under load
    cleanup_every_s: float = 20.0  # the version cap is applied then: a minute between lets ~200 more stand
    poll_s: float = 1.0
    idle_exit_s: float = 30.0  # the thread ends after this long without commits

    def tier_bounds(self) -> list[tuple[int, int, int]]:
        """(low, high, merge target) of each tier compacted under load."""
        return [(self.tier_rows[i], self.tier_rows[i + 1], self.merge_rows[i])
                for i in range(len(self.tier_rows) - 1)]


class _State:
    """What the maintainer remembers of one collection."""

    def __init__(self) -> None:
        self.dirty = False
        self.last_commit = 0.0
        self.commits_since_check = 0
        self.last_index = 0.0
        self.last_cleanup = 0.0
        self.compacted_at_rest = True  # nothing written since the last full compaction
        self.unindexed_commits = 0
        self.rows_at_index: int | None = None  # rows at the last index update under load


class Maintainer:
    """The maintenance thread of a Store (started on the first commit)."""

    def __init__(self, policy: MaintenancePolicy | None = None) -> None:
        self.policy = policy or MaintenancePolicy()
        self._states: weakref.WeakKeyDictionary[Collection, _State] = weakref.WeakKeyDictionary()
        self._cv = threading.Condition()
        self._thread: threading.Thread | None = None
        self._closed = False
        self._busy = False
        self.errors = 0

    def committed(self, col: Collection) -> None:
        """Called after every commit of ``col`` (cheap: no I/O)."""
        with self._cv:
            if self._closed:
                return
            st = self._states.get(col)
            if st is None:
                st = self._states[col] = _State()
            st.dirty = True
            st.compacted_at_rest = False
            st.last_commit = time.monotonic()
            st.commits_since_check += 1
            st.unindexed_commits += 1
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="assay-maintenance", daemon=True)
                self._thread.start()
            if st.commits_since_check >= self.policy.fanout:
                self._cv.notify_all()

    def _run(self) -> None:
        while True:
            with self._cv:
                if not self._closed:
                    self._cv.wait(self.policy.poll_s)
                now = time.monotonic()
                work = list(self._states.items())
                idle = all(now - st.last_commit > self.policy.idle_exit_s for _, st in work)
                if self._closed or idle:  # started again by the next commit
                    self._thread = None
                    self._cv.notify_all()
                    break
                self._busy = True
            try:
                for col, st in work:
                    self._maintain(col, st)
            finally:
                with self._cv:
                    self._busy = False
                    self._cv.notify_all()
        for col, _ in work:  # idle (or closing): what the write path cached goes too
            col.release_caches()

    def _maintain(self, col: Collection, st: _State) -> None:
        p, now = self.policy, time.monotonic()
        if col.closed:  # dropped (its folder is going) or its store closing: nothing to keep up
            with self._cv:
                self._states.pop(col, None)
            return
        try:
            if st.commits_since_check >= p.fanout:
                st.commits_since_check = 0
                col.compact_tiers(p)
            quiet = now - st.last_commit >= p.quiet_s
            if not st.compacted_at_rest and quiet:
                # Only work worth a new version: a collection a few writes old is left as it
                # is (a new version would only turn over what readers cached per version).
                st.compacted_at_rest = True
                # wait=False: an optimize or index build of the collection in progress
                # (a job) is doing this very work; the maintainer skips it, not repeats it.
                if col.fragment_count() >= p.fanout:
                    col.compact_all(wait=False)
                if col.unindexed_rows() >= p.index_min_rows or col.vector_index_due():
                    st.last_index, st.unindexed_commits = now, 0
                    col.update_indexes(build=True, wait=False)
            elif st.unindexed_commits and (now - st.last_index >= p.index_every_s
                                           or col.unindexed_rows() >= max(p.index_min_rows,
                                                                          col.row_count() // 4)):
                # Under load: bring the existing indexes up to date. A due vector index is
                # built too when the writes are a steady stream (a soak, a camera feed: the
                # service would otherwise search flat for as long as the stream lasts); in a
                # bulk ingest (fast growth) it waits for the quiet moment at its end.
                rows = col.row_count()
                steady = st.rows_at_index is not None and rows - st.rows_at_index <= p.steady_growth * rows
                st.last_index, st.unindexed_commits, st.rows_at_index = now, 0, rows
                col.update_indexes(build=steady, wait=False)
            if now - st.last_cleanup >= p.cleanup_every_s:
                st.last_cleanup = now
                col.cleanup_versions()
        except Exception as exc:  # maintenance must never take the process down
            self.errors += 1
            message = str(exc)
            if "Retryable commit conflict" in message:
                log.info("maintenance of %s preempted by a write; retried later", col.name)
            elif "Not found" in message or isinstance(exc, FileNotFoundError):
                log.info("collection %s is gone; no more maintenance for it", col.name)
                with self._cv:
                    self._states.pop(col, None)
            else:
                # One line, no traceback formatting in this thread (Python 3.11 parses
                # source to format tracebacks, which races with imports in other threads).
                log.error("maintenance of %s failed: %s: %s", col.name, type(exc).__name__, message[:500])

    def wait_idle(self, timeout: float | None = None) -> bool:
        """Wait until no maintenance is running; True if so."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cv:
            while self._busy or (self._thread is not None and not self._closed and any(
                    st.commits_since_check >= self.policy.fanout for st in list(self._states.values()))):
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    return False
                self._cv.wait(left)
        return True

    def close(self, timeout: float | None = None) -> bool:
        """Stop the thread after the work in progress; True when it has ended."""
        with self._cv:
            self._closed = True
            self._cv.notify_all()
            thread = self._thread
        if thread is not None:
            thread.join(timeout)
            return not thread.is_alive()
        return True

    def describe(self) -> dict[str, Any]:
        return {"errors": self.errors, "collections": len(self._states)}


def fragments_to_keep(dataset: Any, keep_rows: int) -> list[int]:
    """Fragments a compaction should leave alone: at least ``keep_rows`` rows, and at most
    10% of them deleted (merging big fragments costs as much as writing them did, and buys
    little: a scan's cost per fragment is small next to its rows)."""
    return [f.fragment_id for f in dataset.get_fragments()
            if f.metadata.physical_rows >= keep_rows
            and (f.metadata.num_deletions or 0) <= 0.1 * f.metadata.physical_rows]


def merge_tiers(table: Any, policy: MaintenancePolicy) -> int:
    """Merge the small fragments of ``table`` (a LanceDB table) tier by tier: a tier of
    ``policy`` with ``fanout`` fragments or more is merged into fragments of its merge target,
    every other fragment left out of the compaction. One call rewrites at most ``fanout``
    fragments of each tier, whatever the table's size; big fragments are never rewritten.
    The caller holds the table's commit slot. Returns the fragments removed."""
    removed = 0
    for low, high, target in policy.tier_bounds():
        ds = table.to_lance()  # one dataset for the fragments read and their compaction
        frags = [(f.fragment_id, f.metadata.physical_rows) for f in ds.get_fragments()]
        tier = [fid for fid, rows in frags if low <= rows < high]
        if len(tier) < policy.fanout:
            continue
        others = [fid for fid, rows in frags if not low <= rows < high]
        metrics = ds.optimize.compact_files(
            target_rows_per_fragment=target, materialize_deletions=False,
            excluded_fragment_ids=others, max_source_rows=policy.fanout * high)
        removed += metrics.fragments_removed - metrics.fragments_added
        table.checkout_latest()
    return removed


def purge_deleted(table: Any, policy: MaintenancePolicy) -> int:
    """Rewrite the fragment of ``table`` with the most deleted rows without them, once they
    are ``policy.purge_fraction`` of it and it has at most ``policy.merge_rows[-1]`` rows (the
    work is bounded like a tier merge). The caller holds the commit slot; returns the rows
    purged."""
    worst, most = None, 0
    ds = table.to_lance()
    frags = ds.get_fragments()
    for frag in frags:
        meta = frag.metadata
        deleted = meta.num_deletions
        if meta.physical_rows <= policy.merge_rows[-1] and deleted > most and \
                deleted >= policy.purge_fraction * meta.physical_rows:
            worst, most = frag.fragment_id, deleted
    if worst is None:
        return 0
    others = [f.fragment_id for f in frags if f.fragment_id != worst]
    ds.optimize.compact_files(
        materialize_deletions=True, materialize_deletions_threshold=policy.purge_fraction,
        excluded_fragment_ids=others)
    table.checkout_latest()
    return most


#: versions of assay's own tables (runs, results, jobs) kept: nothing reads an old one (their
#: reads take milliseconds), and with strong consistency every read lists those kept (1,000
#: runs in 2,188 versions: a lookup by run_id 9.2 ms; compacted 7.3 ms; the old versions
#: removed 3.3 ms). Each mining run writes them 5 or 6 times: 16 clients only mining for 4
#: minutes (bench/soak.py --mix mine=1) ran 1,815 runs, p50 2,143 ms, with a minute kept (the
#: runs' tables cleaned once a minute, ``_jobs`` at each compaction, every small fragment
#: rewritten); 1,915 runs, p50 1,964 ms, with 10 s kept and the tiers below (one pair, run
#: one after the other).
SYSTEM_TABLE_RETENTION = timedelta(seconds=10)


class SystemTableUpkeep:
    """When one writer of assay's own tables (mining runs and their results, jobs) maintains
    them: a compaction every ``every_writes`` writes, and old versions dropped at most every
    ``cleanup_every_s`` (listing every version and file: ~10 ms a table).
    The writer calls :meth:`wrote` after each write and, when it says so, :meth:`maintain`."""

    def __init__(self, every_writes: int, cleanup_every_s: float,
                 policy: MaintenancePolicy | None = None) -> None:
        self.every_writes = every_writes
        self.cleanup_every_s = cleanup_every_s
        # each compaction finds at least ``every_writes`` new small fragments: merged at once
        self.policy = policy or MaintenancePolicy(fanout=max(2, min(8, every_writes)))
        self._writes = 0
        self._last_cleanup = time.monotonic()

    def wrote(self) -> bool:
        """Count a write; True when a compaction is due (the count starts again)."""
        self._writes += 1
        if self._writes < self.every_writes:
            return False
        self._writes = 0
        return True

    def maintain(self, tables: Sequence[tuple[Any, tuple[str, ...]]]) -> None:
        """Compact ``tables`` (each with the key columns it is looked up by), dropping old
        versions when their time has come. The caller holds the tables' write lock."""
        now = time.monotonic()
        cleanup = now - self._last_cleanup >= self.cleanup_every_s
        for table, key_columns in tables:
            compact_table(table, policy=self.policy, key_columns=key_columns,
                          older_than=SYSTEM_TABLE_RETENTION if cleanup else None)
        if cleanup:
            self._last_cleanup = now


def write_records(table: Any, records: Any, key: str, *, all_new: bool) -> None:
    """Write ``records`` (an Arrow table) to one of assay's own tables: appended when
    ``all_new`` (the writer knows none of their keys was ever written: a fresh id's first
    record), merged on ``key`` otherwise — a merge joins on the key across the table and
    grows with it (a first run record with 1,000 runs kept, in process: 15.8 ms merged, 9.4
    ms appended). A record whose earlier write failed is not new: that write may have landed."""
    if all_new:
        table.add(records)
    else:
        table.merge_insert(key).when_matched_update_all().when_not_matched_insert_all().execute(records)


# Segments an index may have after an update before it merges them into one. Lance's
# update adds the new rows to a vector index as a delta segment of their own, and every
# search of the index probes each segment: a 30-minute soak's per-minute updates left 12,
# and a search over 9 segments cost 27.9 ms of CPU against 15.5 merged (104k × 64,
# bench/index_threshold.py). A merge rewrites the index (4.2 s of CPU there, against about
# 0.1 s for an update that adds a delta), so it runs every few updates, not every one.
INDEX_MAX_SEGMENTS = 4


def update_indexes(ds: Any) -> None:
    """Add the rows written since the last update to the indexes of ``ds`` (a Lance dataset;
    committed, ``ds`` moves to the new version), then merge the segments of every index that
    has ``INDEX_MAX_SEGMENTS`` or more into one."""
    ds.optimize.optimize_indices()
    piled = {d.name: len(d.segments) for d in ds.describe_indices() if len(d.segments) >= INDEX_MAX_SEGMENTS}
    if piled:
        ds.optimize.optimize_indices(index_names=sorted(piled), num_indices_to_merge=max(piled.values()))


def compact_table(table: Any, *, policy: MaintenancePolicy, older_than: timedelta | None = None,
                  key_columns: tuple[str, ...] = ()) -> None:
    """Maintenance of one of assay's own tables (mining runs and their results, jobs): merge
    its small fragments tier by tier (:func:`merge_tiers`: bounded work, where merging every
    fragment under 32,768 rows rewrote all of them each time — the results of up to 1,600
    runs), purge deleted rows (:func:`purge_deleted`), give each of
    ``key_columns`` a BTREE index once the table has rows (a run is looked up and merged by
    ``run_id`` several times; scanned instead, each lookup grew with the runs kept: 4.5 ms at
    100 runs, 22 ms at 3,000), bring its indexes up to date and, given ``older_than``, drop
    older versions. The caller holds the table's write lock (so no write of this process
    preempts it)."""
    merge_tiers(table, policy)
    purge_deleted(table, policy)
    indexed = {tuple(idx.columns) for idx in table.list_indices()}
    for column in key_columns:
        if (column,) not in indexed and table.count_rows() > 0:
            table.create_scalar_index(column, index_type="BTREE")
    ds = table.to_lance()
    update_indexes(ds)
    if older_than is not None:
        ds.cleanup_old_versions(older_than=older_than, error_if_tagged_old_versions=False)
    table.checkout_latest()


__all__ = ["INDEX_MAX_SEGMENTS", "SYSTEM_TABLE_RETENTION", "MaintenancePolicy", "Maintainer", "SystemTableUpkeep",
           "compact_table", "fragments_to_keep", "merge_tiers", "purge_deleted", "update_indexes", "write_records"]
