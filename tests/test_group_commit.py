"""Group commit and maintenance under a steady write load (indexing/group_commit.py,
indexing/maintenance.py), on real LanceDB tables.

To make grouping deterministic, a test holds the collection's commit slot (as a compaction
would) while its writers queue, then lets go: everything queued must go out in at most two
commits (the leader may have taken its own write before the others arrived)."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import threading
import time
from datetime import timedelta

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pytest

from indexing.errors import InvalidArgument, NotFound
from indexing.group_commit import PROBE_EVERY, GroupCommitter
from indexing.id_index import operation_names
from indexing.maintenance import MaintenancePolicy
from indexing.store import PENDING_META_KEY, Store


def _wait_queued(col, n: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while col._committer.pending < n:
        assert time.monotonic() < deadline, f"only {col._committer.pending} of {n} writes queued"
        time.sleep(0.005)


def _run_threads(targets) -> list[BaseException]:
    errors: list[BaseException] = []

    def wrap(fn):
        def run():
            try:
                fn()
            except BaseException as exc:  # collected and asserted by the caller
                errors.append(exc)
        return run

    threads = [threading.Thread(target=wrap(t)) for t in targets]
    for t in threads:
        t.start()
    return threads, errors


# -- the committer on its own ------------------------------------------------------------


def test_committer_groups_what_queued_while_a_commit_ran_and_keeps_order():
    log: list[list[int]] = []

    def execute(kind, writes):
        log.append([w.payload for w in writes])
        for w in writes:
            w.finish(w.payload * 10)

    committer = GroupCommitter(execute)
    results = {}
    with committer.slot:  # a commit in progress: everything below queues
        threads, errors = _run_threads([lambda i=i: results.__setitem__(i, committer.submit("w", "k", i))
                                        for i in range(12)])
        deadline = time.monotonic() + 10
        while committer.pending < 11 and time.monotonic() < deadline:  # the leader holds one
            time.sleep(0.005)
    for t in threads:
        t.join()
    assert not errors
    assert results == {i: i * 10 for i in range(12)}
    assert len(log) <= 2 and sorted(sum(log, [])) == list(range(12))
    # queue order is commit order: the group after the first holds the rest in arrival order
    assert committer.stats.commits == len(log) and committer.stats.largest_group >= 11


def test_a_failed_commit_fails_exactly_its_writers():
    def execute(kind, writes):
        if kind == "bad":
            raise OSError("disk full")
        for w in writes:
            w.finish("ok")

    committer = GroupCommitter(execute)
    outcome: dict[str, object] = {}

    def submit(name, kind):
        try:
            outcome[name] = committer.submit(kind, kind, name)
        except OSError as exc:
            outcome[name] = exc

    with committer.slot:
        threads, _ = _run_threads([lambda n=n, k=k: submit(n, k) for n, k in
                                   [("a", "good"), ("b", "bad"), ("c", "bad"), ("d", "good")]])
        deadline = time.monotonic() + 10
        while committer.pending < 3 and time.monotonic() < deadline:
            time.sleep(0.005)
    for t in threads:
        t.join()
    assert {n for n, v in outcome.items() if v == "ok"} == {"a", "d"}
    assert all(isinstance(outcome[n], OSError) for n in ("b", "c"))


def test_submit_many_queues_one_callers_writes_back_to_back_in_one_commit():
    log: list[tuple[str, list[int]]] = []

    def execute(kind, writes):
        log.append((kind, [w.payload for w in writes]))
        for w in writes:  # a write the executor refuses fails alone, as a re-validation would
            w.finish(error=ValueError(f"write {w.payload}")) if w.payload == 3 else w.finish(w.payload * 10)

    committer = GroupCommitter(execute, max_rows=100)
    writes = committer.submit_many([("upsert", "a", i, 10) for i in range(5)] + [("upsert", "b", 5, 10)]
                                   + [("delete", "d", 6, 1)])
    assert [w.done for w in writes] == [True] * 7
    assert [w.result for w in writes] == [0, 10, 20, None, 40, 50, 60]
    assert isinstance(writes[3].error, ValueError) and all(w.error is None for i, w in enumerate(writes) if i != 3)
    # consecutive writes of one kind and key share a commit; another key or kind is the next
    assert log == [("upsert", [0, 1, 2, 3, 4]), ("upsert", [5]), ("delete", [6])]
    # max_rows bounds a group: 12 writes of 10 rows go out as 100 + 20 rows
    log.clear()
    committer.submit_many([("upsert", "a", i, 10) for i in range(12)])
    assert [len(p) for _, p in log] == [10, 2]
    assert committer.submit_many([]) == []


def test_submit_many_waits_for_a_commit_in_progress_and_keeps_queue_order():
    log: list[list[str]] = []

    def execute(kind, writes):
        log.append([w.payload for w in writes])
        for w in writes:
            w.finish(w.payload)

    committer = GroupCommitter(execute)
    out: dict[str, list] = {}
    with committer.slot:  # a commit in progress: the lone writer leads, the batch queues behind it
        threads, errors = _run_threads([lambda: out.__setitem__("one", [committer.submit("w", "k", "x")])])
        deadline = time.monotonic() + 10
        while not (committer._leader and committer.pending == 0) and time.monotonic() < deadline:
            time.sleep(0.005)  # the leader has taken its write and waits for the slot
        threads += _run_threads([lambda: out.__setitem__(
            "many", [w.result for w in committer.submit_many([("w", "k", p, 1) for p in "abc"])])])[0]
        while committer.pending < 3 and time.monotonic() < deadline:
            time.sleep(0.005)
    for t in threads:
        t.join()
    assert not errors and out == {"one": ["x"], "many": ["a", "b", "c"]}
    assert log == [["x"], ["a", "b", "c"]]


def _writers_in_a_loop(committer: GroupCommitter, writers: int, writes_each: int, think_s: float) -> None:
    """``writers`` threads each submit ``writes_each`` writes, one after another, doing
    ``think_s`` of other work between them; every write must come back with its payload."""
    def writer(k: int) -> None:
        for i in range(writes_each):
            assert committer.submit("w", "k", (k, i)) == (k, i)
            time.sleep(think_s)

    threads, errors = _run_threads([lambda k=k: writer(k) for k in range(writers)])
    for t in threads:
        t.join()
    assert not errors, errors


def _slow_commit(seconds: float):
    def execute(kind, writes):
        time.sleep(seconds)  # a commit that takes its time, as LanceDB's do
        for w in writes:
            w.finish(w.payload)
    return execute


def test_writers_in_a_loop_share_one_commit_when_the_leader_lingers_for_them():
    # Without lingering, 8 writers that write again as soon as they are answered split into
    # two halves that take turns: one commits while the other queues, 4 writes a commit.
    alone = GroupCommitter(_slow_commit(0.04))
    _writers_in_a_loop(alone, writers=8, writes_each=8, think_s=0.002)
    assert alone.stats.writes == 64 and alone.stats.lingers == 0
    assert alone.stats.writes / alone.stats.commits <= 5
    # Lingering, the leader waits for the writers the last commit answered: all 8 share one.
    lingering = GroupCommitter(_slow_commit(0.04), linger_s=1.0)
    _writers_in_a_loop(lingering, writers=8, writes_each=8, think_s=0.002)
    s = lingering.stats
    assert s.writes == 64 and s.lingers >= 1 and s.linger_gained >= s.lingers
    assert s.writes / s.commits >= 6, (s.commits, s.lingers, s.linger_gained)
    assert s.commits < alone.stats.commits
    # never longer than the commit before it took (40 ms), whatever linger_s allows
    assert s.lingered_s / s.lingers < 0.5


def test_a_lone_writer_never_waits_for_anyone():
    committer = GroupCommitter(_slow_commit(0.01), linger_s=1.0)
    for i in range(20):
        assert committer.submit("w", "k", i) == i
    assert committer.stats.commits == 20 and committer.stats.lingers == 0 and committer.stats.lingered_s == 0


def test_lingering_stops_when_the_answered_writers_do_not_come_back_soon():
    # Writers that do other work between writes (150 ms against 20-ms commits) are not back
    # before the next commit: a linger for them only delays the writers already queued. The
    # leader stops after a few such waits and tries once every PROBE_EVERY commits.
    committer = GroupCommitter(_slow_commit(0.02), linger_s=1.0)
    _writers_in_a_loop(committer, writers=8, writes_each=10, think_s=0.15)
    s = committer.stats
    assert s.writes == 80
    assert s.lingers <= 3 + s.commits // PROBE_EVERY, (s.commits, s.lingers, s.linger_gained)


# -- collections ----------------------------------------------------------------------------


def _rows(ids, dim=8, seed=0, **extra):
    rng = np.random.default_rng(seed)
    return {"id": ids, "emb_v": rng.standard_normal((len(ids), dim)).astype(np.float32), **extra}


def test_concurrent_small_upserts_share_commits_and_each_caller_gets_its_counts(tmp_path):
    store = Store(str(tmp_path), optimize_every=0)
    col = store.create_collection("c", spaces={"v": 8})
    col.upsert(_rows([f"old{i}" for i in range(200)]))
    commits_before = col._committer.stats.commits
    results = {}

    def writer(i):
        ids = [f"new{i}-{j}" for j in range(10)] + [f"old{i * 10 + j}" for j in range(10)]
        results[i] = col.upsert(_rows(ids, seed=i, writer=[i] * 20))

    with col._write_lock:
        threads, errors = _run_threads([lambda i=i: writer(i) for i in range(16)])
        _wait_queued(col, 15)
    for t in threads:
        t.join()
    assert not errors
    assert col._committer.stats.commits - commits_before <= 2
    assert all(r.inserted == 10 and r.updated == 10 for r in results.values())
    assert len({r.version for r in results.values()}) <= 2
    ids = col.query(columns=["id"]).column("id")
    assert len(ids) == 200 + 160 and pc.count_distinct(ids).as_py() == 360
    written = col.query("writer IS NOT NULL", columns=["id", "writer"])
    for i, w in zip(written.column("id").to_pylist(), written.column("writer").to_pylist(), strict=True):
        n = int(i.split("-")[0][3:]) if i.startswith("new") else int(i[3:]) // 10
        assert w == n


def test_a_group_commit_hands_lancedb_its_rows_as_one_batch(tmp_path, monkeypatch):
    # LanceDB's Python layer takes the GIL back for each batch it is given: a group of 16
    # writers' chunks passed on as they are crawled beside busy Python threads (1.76 s
    # against 0.16 s for 320 rows, bench/group_batches.py). Merges, appends and
    # column updates of a group must each reach LanceDB as one record batch.
    import lancedb.merge
    import lancedb.table

    seen: list[tuple[str, int, int]] = []  # (call, batches, rows)
    execute, add = lancedb.merge.LanceMergeInsertBuilder.execute, lancedb.table.LanceTable.add

    def batches(data) -> tuple[int, int]:
        table = data if isinstance(data, pa.Table) else pa.Table.from_batches(list(data))
        return len(table.to_batches()), table.num_rows

    def recording_execute(self, new_data, *args, **kwargs):
        seen.append(("merge", *batches(new_data)))
        return execute(self, new_data, *args, **kwargs)

    def recording_add(self, data, *args, **kwargs):
        seen.append(("add", *batches(data)))
        return add(self, data, *args, **kwargs)

    monkeypatch.setattr(lancedb.merge.LanceMergeInsertBuilder, "execute", recording_execute)
    monkeypatch.setattr(lancedb.table.LanceTable, "add", recording_add)
    store = Store(str(tmp_path), optimize_every=0)
    col = store.create_collection("c", spaces={"v": 8})
    col.upsert(_rows([f"old{i}" for i in range(200)]))

    def run_group(make_ids) -> None:
        with col._write_lock:
            threads, errors = _run_threads([lambda i=i: col.upsert(_rows(make_ids(i), seed=i)) for i in range(16)])
            _wait_queued(col, 15)
        for t in threads:
            t.join()
        assert not errors, errors

    seen.clear()
    run_group(lambda i: [f"new{i}-{j}" for j in range(10)] + [f"old{i * 10 + j}" for j in range(10)])
    assert {s[0] for s in seen} == {"merge"}
    assert sum(s[2] for s in seen) == 320 and max(s[2] for s in seen) >= 300, seen
    assert all(s[1] == 1 for s in seen), seen
    seen.clear()
    run_group(lambda i: [f"more{i}-{j}" for j in range(20)])  # new rows only: appended
    assert {s[0] for s in seen} == {"add"} and sum(s[2] for s in seen) == 320, seen
    assert all(s[1] == 1 for s in seen), seen
    seen.clear()
    chunked = pa.concat_tables([pa.table({"id": [f"old{i}" for i in range(k, k + 10)],
                                          "emb_v": pa.FixedSizeListArray.from_arrays(
                                              np.ones(80, np.float32), 8)}) for k in range(0, 160, 10)])
    assert col.update_columns(chunked) == 160
    assert seen == [("merge", 1, 160)]
    assert col.count() == 200 + 160 + 320
    assert col.take(["old5"], ["emb_v"]).column("emb_v").to_pylist() == [[1.0] * 8]
    # Above ONE_BATCH_MAX_ROWS (a bulk ingest's groups) the chunks go as they are: no copy.
    monkeypatch.setattr("indexing.store.ONE_BATCH_MAX_ROWS", 100)
    seen.clear()
    run_group(lambda i: [f"big{i}-{j}" for j in range(20)])
    assert {s[0] for s in seen} == {"add"} and sum(s[2] for s in seen) == 320, seen
    assert max(s[1] for s in seen) > 1, seen


def test_writers_in_a_loop_on_a_collection_share_commits_and_keep_every_row(tmp_path):
    # Real LanceDB commits and the collection's own linger setting: 8 writers that upsert
    # again as soon as they are answered share commits, not in two halves that take turns.
    # 12 rounds (96 writes): without lingering exactly 24 commits (halves of 4) in 15 of 15
    # runs; with it 14-17. (With 6 rounds, 7-10 against 12: too close for a fixed bound.)
    store = Store(str(tmp_path), optimize_every=0)
    col = store.create_collection("c", spaces={"v": 8})
    col.upsert(_rows([f"old{i}" for i in range(100)]))
    before = dataclasses.replace(col._committer.stats)
    counts: dict[int, list[tuple[int, int]]] = {}

    def writer(k: int) -> None:
        counts[k] = []
        for r in range(12):
            ids = [f"w{k}-{r}-{j}" for j in range(5)] + [f"old{(k * 6 + r + j) % 100}" for j in range(5)]
            result = col.upsert(_rows(ids, seed=k * 10 + r))
            counts[k].append((result.inserted, result.updated))

    threads, errors = _run_threads([lambda k=k: writer(k) for k in range(8)])
    for t in threads:
        t.join()
    assert not errors, errors
    assert all(c == [(5, 5)] * 12 for c in counts.values()), counts
    s = col._committer.stats
    commits, writes = s.commits - before.commits, s.writes - before.writes
    assert writes == 96 and s.lingers > before.lingers
    assert commits <= 20, (commits, s.lingers - before.lingers)
    ids = col.query(columns=["id"]).column("id")
    assert len(ids) == 100 + 8 * 12 * 5 and pc.count_distinct(ids).as_py() == len(ids)


def test_the_later_write_of_an_id_in_one_group_wins(tmp_path):
    store = Store(str(tmp_path), optimize_every=0)
    col = store.create_collection("c")
    out = {}

    def write(name, value, delay):
        time.sleep(delay)  # queue in this order
        out[name] = col.upsert([{"id": "x", "value": value}, {"id": f"only-{name}", "value": value}])

    with col._write_lock:
        threads, errors = _run_threads([lambda: write("first", 1, 0.0), lambda: write("second", 2, 0.3)])
        _wait_queued(col, 1)
        time.sleep(0.5)
        _wait_queued(col, 1)
    for t in threads:
        t.join()
    assert not errors
    assert col.take(["x"], ["value"]).column("value").to_pylist() == [2]
    assert (out["first"].inserted, out["first"].updated) == (2, 0)
    assert (out["second"].inserted, out["second"].updated) == (1, 1)
    assert col.count() == 3


def test_a_write_that_races_a_new_column_to_another_type_fails_alone(tmp_path):
    store = Store(str(tmp_path), optimize_every=0)
    col = store.create_collection("c")
    out: dict[str, object] = {}

    def write(name, value, delay):
        time.sleep(delay)
        try:
            out[name] = col.upsert([{"id": name, "extra": value}])
        except InvalidArgument as exc:
            out[name] = exc

    with col._write_lock:
        threads, _ = _run_threads([lambda: write("a", 5, 0.0), lambda: write("b", "five", 0.3)])
        time.sleep(0.6)
    for t in threads:
        t.join()
    assert out["a"].inserted == 1 and out["a"].new_columns == ["extra"]
    assert isinstance(out["b"], InvalidArgument) and "extra" in str(out["b"])
    assert col.schema.field("extra").type == pa.int64() and col.count() == 1


def test_concurrent_taggers_lose_no_tags_and_deletes_share_a_commit(tmp_path):
    store = Store(str(tmp_path), optimize_every=0)
    col = store.create_collection("c")
    col.upsert([{"id": f"r{i}"} for i in range(40)])
    ids = [f"r{i}" for i in range(20)]
    counts = {}
    with col._write_lock:
        threads, errors = _run_threads(
            [lambda t=t: counts.__setitem__(t, col.tag_rows(ids=ids, add=[t])[0]) for t in ("x", "y", "z")]
            + [lambda: counts.__setitem__("w", col.tag_rows(where="id >= 'r3'", add=["x"])[0])])
        _wait_queued(col, 3)
    for t in threads:
        t.join()
    assert not errors
    tags = dict(zip(*col.take(ids, ["id", "tags"]).to_pydict().values(), strict=True))
    assert all(sorted(t) == ["x", "y", "z"] for t in tags.values())
    assert counts["x"] == counts["y"] == counts["z"] == 20
    deleted = {}
    with col._write_lock:
        threads, errors = _run_threads([lambda: deleted.__setitem__("a", col.delete(ids=["r0", "r1", "r39"])),
                                        lambda: deleted.__setitem__("b", col.delete(where="id = 'r2'"))])
        _wait_queued(col, 1)
        time.sleep(0.2)
    for t in threads:
        t.join()
    assert not errors and deleted["a"][0] == 3 and deleted["b"][0] == 1
    assert col.count() == 36


def test_a_column_left_by_a_write_that_never_committed_is_dropped_on_open(tmp_path):
    store = Store(str(tmp_path), optimize_every=0)
    col = store.create_collection("c")
    col.upsert([{"id": "a", "n": 1}])
    mark = {PENDING_META_KEY: b"1"}
    # What a process killed between the schema change and its write leaves behind; and a
    # write that did commit but died before clearing the mark.
    col.table.add_columns([pa.field("orphan", pa.float64(), metadata=mark)])
    col.table.add_columns([pa.field("done", pa.int64(), metadata=mark)])
    col.table.merge_insert("id").when_matched_update_all().execute(
        pa.table({"id": pa.array(["a"], pa.string()), "done": pa.array([7], pa.int64())},
                 schema=pa.schema([pa.field("id", pa.string(), nullable=False), pa.field("done", pa.int64())])))
    reopened = Store(str(tmp_path), optimize_every=0).collection("c")
    assert "orphan" not in reopened.schema.names
    assert reopened.schema.field("done").metadata in (None, {})
    assert reopened.take(["a"], ["n", "done"]).to_pylist() == [{"n": 1, "done": 7}]


# -- a full disk: the new columns go with the failed write ------------------------------------


@pytest.fixture
def small_disk(tmp_path):
    mnt = tmp_path / "disk"
    mnt.mkdir()
    try:
        subprocess.run(["mount", "-t", "tmpfs", "-o", "size=24m", "tmpfs", str(mnt)], check=True,
                       capture_output=True)
    except (subprocess.CalledProcessError, FileNotFoundError) as exc:
        if os.environ.get("ASSAY_REQUIRE_FAULTS"):
            raise
        pytest.skip(f"cannot mount a tmpfs here (needs root): {exc}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_new_columns_are_dropped_when_their_write_fails(small_disk):
    store = Store(str(small_disk / "data"), optimize_every=0)
    col = store.create_collection("c")
    col.upsert([{"id": f"r{i}", "n": i} for i in range(10)])
    version = col.version
    filler = small_disk / "filler"
    free = os.statvfs(small_disk).f_bavail * os.statvfs(small_disk).f_frsize
    with open(filler, "wb") as fh:  # leave room for small metadata writes, not for the batch
        fh.write(b"\0" * (free - 256 * 1024))
    rng = np.random.default_rng(0)  # incompressible: the data files cannot fit
    big = {"id": [f"b{i}" for i in range(20_000)],
           "blob": [rng.bytes(150).hex() for _ in range(20_000)]}
    with pytest.raises(Exception) as info:
        col.upsert(big)
    assert "space" in str(info.value).lower()
    assert "blob" not in col.schema.names
    assert col.count() == 10 and col.take(["r3"], ["n"]).column("n").to_pylist() == [3]
    assert col.version >= version
    filler.unlink()
    assert col.upsert(big).new_columns == ["blob"]
    assert col.count() == 20_010


# -- maintenance -------------------------------------------------------------------------------


def test_fragments_and_versions_stay_bounded_under_a_stream_of_small_writes(tmp_path):
    store = Store(str(tmp_path), maintenance=MaintenancePolicy(fanout=4, quiet_s=3600, index_every_s=3600),
                  cleanup_older_than=timedelta(0))
    col = store.create_collection("c", spaces={"v": 8})
    col.upsert(_rows([f"i{i}" for i in range(2000)]))
    rng = np.random.default_rng(1)
    for k in range(80):
        ids = [f"n{k}-{j}" for j in range(5)] + [f"i{j}" for j in rng.choice(2000, 5, replace=False)]
        col.upsert(_rows(ids, seed=k))
        if k % 10 == 9:
            assert col.wait_for_maintenance(60)
    assert col.wait_for_maintenance(60)
    # 81 commits, each a fragment; tiers of 4 keep a handful
    assert col.fragment_count() <= 12
    assert col.count() == 2000 + 400
    col.cleanup_versions()
    assert len(col.versions()) <= 3


def test_deleted_rows_of_a_big_fragment_are_purged_under_load(tmp_path):
    # Updates delete their rows' old copies in place; in a fragment too big for the tiers
    # they stay until a quiet moment unless maintenance rewrites it without them.
    policy = MaintenancePolicy(tier_rows=(0, 64, 256), merge_rows=(256, 4096), fanout=4,
                               quiet_s=3600, index_every_s=3600, purge_fraction=0.25)
    store = Store(str(tmp_path), optimize_every=0)
    col = store.create_collection("c", spaces={"v": 8})
    col.upsert(_rows([f"i{i}" for i in range(2000)]))  # one 2,000-row fragment
    col.upsert(_rows([f"i{i}" for i in range(0, 2000, 3)], seed=1))  # a third of it updated
    big = max(col._table.to_lance().get_fragments(), key=lambda f: f.metadata.physical_rows)
    assert big.metadata.num_deletions == 667
    before = col.query(columns=["id", "emb_v"]).sort_by("id")
    col.compact_tiers(policy)
    frags = col._table.to_lance().get_fragments()
    assert all(f.metadata.num_deletions == 0 for f in frags)
    assert sum(f.metadata.physical_rows for f in frags) == 2000
    assert col.query(columns=["id", "emb_v"]).sort_by("id").equals(before)
    # below the fraction nothing is rewritten (every compaction is a pause for the writers)
    col.upsert(_rows([f"i{i}" for i in range(0, 2000, 10)], seed=2))
    version = col.version
    col.compact_tiers(policy)
    assert col.version == version


def test_a_due_vector_index_is_built_under_a_steady_stream_of_writes(tmp_path):
    # The collection is never quiet; the space's index is due (256 rows) and the stream
    # grows the table slowly, so maintenance builds the index while the writes go on.
    policy = MaintenancePolicy(quiet_s=3600, index_every_s=0.3, poll_s=0.1, steady_growth=0.5)
    store = Store(str(tmp_path), maintenance=policy)
    col = store.create_collection("c", spaces={"v": {"dim": 8, "index": {"threshold_rows": 256}}})
    col.upsert(_rows([f"i{i}" for i in range(1000)]))
    assert col.vector_index("v") is None
    deadline, k = time.monotonic() + 60, 0
    while col.vector_index("v") is None and time.monotonic() < deadline:
        col.upsert(_rows([f"n{k}-{j}" for j in range(5)], seed=k))
        k += 1
        time.sleep(0.02)
    assert col.vector_index("v") is not None, "no index built under a steady stream"
    assert col.count() == 1000 + 5 * k


def test_a_bulk_ingest_does_not_build_the_vector_index_midway(tmp_path):
    policy = MaintenancePolicy(quiet_s=3600, index_every_s=0.2, poll_s=0.1, steady_growth=0.1)
    store = Store(str(tmp_path), maintenance=policy)
    col = store.create_collection("c", spaces={"v": {"dim": 8, "index": {"threshold_rows": 256}}})
    rows = 1000
    for k in range(7):  # the table doubles between index updates: a bulk ingest
        col.upsert(_rows([f"b{k}-{j}" for j in range(rows)], seed=k))
        rows = col.count()
        time.sleep(0.35)
        assert col.vector_index("v") is None
    assert col.wait_for_maintenance(60)


def test_maintenance_leaves_a_collection_alone_while_it_is_being_optimized(tmp_path):
    # After a bulk ingest the user's optimize job and the maintainer's quiet-moment work
    # (compaction, the due vector index) are the same work: the maintainer must not do it
    # a second time, at the same time, while the optimize (here: its lock, held) runs.
    policy = MaintenancePolicy(quiet_s=0.3, poll_s=0.05, fanout=2, tier_rows=(0, 100))  # no tier merges
    store = Store(str(tmp_path), maintenance=policy)
    col = store.create_collection("c", spaces={"v": {"dim": 8, "index": {"threshold_rows": 256}}})
    builds = []
    build = col.build_vector_index
    col.build_vector_index = lambda *a, **kw: (builds.append(1), build(*a, **kw))[1]
    with col._optimize_lock:  # an optimize in progress on another thread
        for k in range(3):
            col.upsert(_rows([f"b{k}-{j}" for j in range(400)], seed=k))
        fragments = col.fragment_count()
        state = store.maintainer._states[col]
        deadline = time.monotonic() + 30
        while not state.compacted_at_rest:  # the maintainer saw the quiet moment
            assert time.monotonic() < deadline, "the maintainer never found the collection quiet"
            time.sleep(0.02)
        assert store.maintainer.wait_idle(30)
        assert builds == [] and col.vector_index("v") is None and col.fragment_count() == fragments == 3
    result = col.optimize()
    assert result.indexes_built == ["v"] and builds == [1] and col.fragment_count() == 1
    assert store.maintainer.errors == 0


def test_a_pinned_version_survives_cleanup_until_released(tmp_path):
    store = Store(str(tmp_path), optimize_every=0, cleanup_older_than=timedelta(0))
    col = store.create_collection("c")
    col.upsert([{"id": "a", "n": 1}])
    v = col.version
    col.upsert([{"id": "a", "n": 2}])
    with col.pin_version(v):
        col.optimize()
        assert col.at_version(v).search().select(["n"]).to_arrow().column("n").to_pylist() == [1]
        assert col.tags() == {}  # pins are the store's own, not the user's tags
    col.optimize()
    with pytest.raises(NotFound):
        col.at_version(v)
    # a pin left by a process that died (pid 2^22 + 1 is above Linux's pid_max) goes too
    col.upsert([{"id": "a", "n": 3}])
    v2 = col.version
    col.table.tags.create("assay-pin-4194305-deadbeef", v2)
    col.upsert([{"id": "a", "n": 4}])
    col.optimize()
    assert "assay-pin-4194305-deadbeef" not in col.table.tags.list()
    with pytest.raises(NotFound):
        col.at_version(v2)


def test_closing_the_store_ends_its_background_work(tmp_path):
    store = Store(str(tmp_path), maintenance=MaintenancePolicy(fanout=2))
    col = store.create_collection("c")
    for i in range(6):
        col.upsert([{"id": f"r{i}"}])
    assert store.close(timeout=60)
    assert not [t for t in threading.enumerate() if t.name == "assay-maintenance" and t.is_alive()
                and getattr(t, "_target", None) is not None and t._target.__self__ is store.maintainer]
    with pytest.raises(Exception, match="closing"):
        col.upsert([{"id": "late"}])


def test_the_id_index_notices_writes_of_another_store_on_the_same_root(tmp_path):
    """Each Store keeps an in-memory index of its collections' ids for the write path; a
    write by another writer (here a second Store, as another process would be) must be
    seen: no duplicate, the right counts, created_at kept."""
    a = Store(str(tmp_path), optimize_every=0)
    col_a = a.create_collection("c")
    col_a.upsert([{"id": "x", "n": 1}])  # builds a's id index
    col_b = Store(str(tmp_path), optimize_every=0).collection("c")
    col_b.upsert([{"id": "y", "n": 2}, {"id": "z", "n": 3}])
    col_b.delete(ids=["z"])
    created_y = col_b.take(["y"], ["created_at"]).column("created_at")[0].as_py()
    out = col_a.upsert([{"id": "y", "n": 20}, {"id": "z", "n": 30}, {"id": "w", "n": 40}])
    assert (out.inserted, out.updated) == (2, 1)
    rows = {r["id"]: r for r in col_a.query(columns=["id", "n", "created_at"]).to_pylist()}
    assert sorted(rows) == ["w", "x", "y", "z"] and rows["y"]["n"] == 20
    assert rows["y"]["created_at"] == created_y  # kept on update
    # id-neutral commits (compaction, an index update, a schema change) keep the index current
    col_a.optimize()
    col_a.add_fields([pa.field("extra", pa.int64())])
    assert col_a._ids.current(col_a.version, lambda versions: operation_names(col_a.table.to_lance(), versions))
    assert col_a.upsert([{"id": "x", "n": 5}]).updated == 1


def test_a_commit_of_rows_keeps_the_cached_schema_and_another_writers_commit_drops_it(tmp_path, monkeypatch):
    """The schema, registry and plans are cached per table version; the group committer's
    own row commits move the cache to their version (re-reading the schema after every
    commit put a hop to LanceDB's event loop into most validations of a write stream), but
    a commit by another writer in between — or a new column — must not be carried over."""
    from indexing import store as store_mod

    monkeypatch.setattr(store_mod, "SCHEMA_RECHECK_S", 0.0)  # check the version on every read
    a = Store(str(tmp_path), optimize_every=0)
    col = a.create_collection("c", spaces={"v": 8})
    col.upsert(_rows(["x0"]))
    reads = []
    real = type(col._table).schema

    class Counting(type(col._table)):
        @property
        def schema(self):
            reads.append(1)
            return real.fget(self)

    col._table.__class__ = Counting
    col.spaces  # noqa: B018 -- fills the cache at the current version
    reads.clear()
    for i in range(3):
        col.upsert(_rows([f"x{i + 1}"], seed=i))
        assert col.spaces and col._cache_version == col.version
    assert reads == []  # rows only, committed here: the cached schema held
    # a write by another Store (another process) comes between: read again
    Store(str(tmp_path), optimize_every=0).collection("c").upsert(_rows(["other"]))
    col.upsert(_rows(["x9"]))
    assert "v" in col.spaces and reads
    reads.clear()
    # a new column travels with a write: the schema is read again and shows it
    col.upsert(_rows(["x10"], extra=[1]))
    assert "extra" in col.schema.names and col._current_schema().field("extra") is not None and reads


def test_dropping_or_renaming_a_column_waits_for_index_maintenance(tmp_path):
    """Index maintenance (optimize_indices) committed across a column drop left an index on
    the dropped column, and every later query failed inside Lance; schema changes that move
    or remove columns wait for the collection's whole-table work to end."""
    store = Store(str(tmp_path), optimize_every=0)
    col = store.create_collection("c", spaces={"v": 8})
    col.upsert(_rows([f"r{i}" for i in range(300)]))
    col.build_index("v", kind="ivf_flat")
    col.add_fields([pa.field("old", pa.int64())])
    done = threading.Event()
    with col._whole_table_work(True):  # as the maintainer updating the indexes
        t = threading.Thread(target=lambda: (col.rename_fields({"old": "older"}), col.drop_fields(["older"]),
                                             done.set()))
        t.start()
        assert not done.wait(0.5) and "old" in col.schema.names
    t.join(10)
    assert done.is_set() and "old" not in col.schema.names and "older" not in col.schema.names
    assert col.search("v", np.ones(8, np.float32), k=5).num_rows == 5


def test_dropping_a_collection_waits_for_its_maintenance_and_ends_it(tmp_path):
    """An index update running while the collection was dropped wrote index files into the
    folder being removed ("Directory not empty", an INTERNAL to the caller): the drop waits
    for the collection's whole-table work and commit slot, refuses writes from then on, and
    the maintainer forgets the collection instead of working on a folder that is gone."""
    store = Store(str(tmp_path))
    col = store.create_collection("c", spaces={"v": 8})
    col.upsert(_rows([f"r{i}" for i in range(300)]))
    assert store.maintainer is not None and col in store.maintainer._states
    done = threading.Event()
    with col._whole_table_work(True):  # as the maintainer updating the indexes
        t = threading.Thread(target=lambda: (store.drop_collection("c"), done.set()))
        t.start()
        assert not done.wait(0.5)
        assert os.path.isdir(os.path.join(str(tmp_path), "c.lance"))  # not removed under the work
    t.join(10)
    assert done.is_set() and not os.path.exists(os.path.join(str(tmp_path), "c.lance"))
    assert col.closed
    with pytest.raises(Exception, match="closing"):
        col.upsert(_rows(["late"]))
    st = store.maintainer._states.get(col)  # (its own thread may have got there first)
    if st is not None:
        store.maintainer._maintain(col, st)  # its next pass
    assert col not in store.maintainer._states and store.maintainer.errors == 0
    with pytest.raises(NotFound):
        store.collection("c")


def _manifest_bytes(col) -> int:
    """Size of the file holding the latest version's manifest, which a reader loads whenever
    the collection has a new version (Lance's v2 names: u64::MAX - version; v1: the version)."""
    ds = col.table.to_lance()
    folder = os.path.join(ds.uri, "_versions")
    for name in (f"{2**64 - 1 - ds.version:020d}.manifest", f"{ds.version}.manifest"):
        if os.path.exists(os.path.join(folder, name)):
            return os.path.getsize(os.path.join(folder, name))
    raise AssertionError(f"no manifest file for version {ds.version} in {sorted(os.listdir(folder))[:5]}")


def test_updates_do_not_grow_the_metadata_every_read_loads(tmp_path):
    """An update that keeps the row's stable row id (Lance's option, on in assay's first
    collections) leaves that id in a new fragment, so after many small updates every
    fragment's row-id sequence is a scatter of ids, all carried in the manifest that each
    read of a new version loads: 1.1 MB after a 10-minute soak (41 KB without; README,
    "Stable row ids"). Collections are created without stable row ids: after 150 upserts
    updating random rows and an optimize, the manifest is as small as that of the same rows
    written at once (22.5 KB against 1.7 KB with them)."""
    store = Store(str(tmp_path), optimize_every=0)
    aged = store.create_collection("aged")
    aged.upsert([{"id": f"i{i:05d}", "n": i} for i in range(3000)])
    rng = np.random.default_rng(0)
    for k in range(150):
        aged.upsert([{"id": f"i{i:05d}", "n": k} for i in rng.choice(3000, 20, replace=False)])
    aged.optimize()
    fresh = store.create_collection("fresh")
    fresh.upsert(aged.query(columns=["id", "n"]))
    fresh.optimize()
    assert fresh.count() == aged.count() == 3000
    assert _manifest_bytes(aged) <= 1.5 * _manifest_bytes(fresh), (_manifest_bytes(aged), _manifest_bytes(fresh))


def test_operation_names_reads_compactions_that_remapped_indexes(tmp_path):
    """A compaction of a table with indexes and without stable row ids commits a Rewrite
    that pylance 13 cannot convert (``get_transactions`` raises TypeError); the operations
    are still named, version by version, so the id index stays current across it."""
    import lancedb
    from lancedb.index import BTree

    table = lancedb.connect(str(tmp_path)).create_table("t", pa.table({"id": ["a", "b"], "n": [1, 2]}))
    table.create_index("id", config=BTree())
    for k in range(4):
        table.add(pa.table({"id": [f"x{k}"], "n": [k]}))
    table.to_lance().optimize.optimize_indices()
    table.checkout_latest()
    table.to_lance().optimize.compact_files()
    table.checkout_latest()
    table.add(pa.table({"id": ["y"], "n": [9]}))
    ds = table.to_lance()
    # the pylance bug worked around (if an upgrade fixes it, operation_names can drop its TypeError branch)
    with pytest.raises(TypeError, match="RewrittenIndex"):
        ds.get_transactions(3)
    names = operation_names(ds, [ds.version, ds.version - 1, ds.version - 2])
    assert names[0] == "Append" and names[1] == "Rewrite", names
    assert len(names) == 3


def test_the_id_index_is_rebuilt_when_versions_since_it_were_cleaned_up(tmp_path):
    """Another writer's insert whose version is gone by the time this process looks (its
    optimize removed the versions before the compaction) must not be taken for nothing:
    a record that cannot be read is unknown, and the ids are read again."""
    col_a = Store(str(tmp_path), optimize_every=0).create_collection("c")
    col_a.upsert([{"id": "x", "n": 1}])  # builds a's id index
    col_b = Store(str(tmp_path), optimize_every=0).collection("c")
    col_b.upsert([{"id": "y", "n": 2}])
    col_b.optimize(cleanup_older_than=timedelta(0))
    out = col_a.upsert([{"id": "y", "n": 3}])
    assert (out.inserted, out.updated) == (0, 1)
    assert sorted(col_a.query(columns=["id"]).column("id").to_pylist()) == ["x", "y"]
