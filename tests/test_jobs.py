"""The job manager on a real store: records persist, end states survive a restart,
the _jobs table is compacted as records change."""

from __future__ import annotations

import threading
import time

import pytest
from conftest import lance_operations

from indexing.errors import NotFound
from service import jobs as jobs_module
from service.jobs import JobKind, JobManager


def test_records_persist_and_the_jobs_table_is_compacted(store, monkeypatch):
    monkeypatch.setattr(jobs_module, "COMPACT_EVERY", 6)
    store.create_collection("c")
    manager = JobManager(store, workers=1)
    manager.register("echo", JobKind(run=lambda ctx, col, p: {"n": p["n"] * 2}))
    manager.register("boom", JobKind(run=lambda ctx, col, p: 1 / 0))
    done = [manager.wait(manager.start("echo", "c", {"n": i}).id, timeout=30) for i in range(5)]
    failed = manager.wait(manager.start("boom", "c", {}).id, timeout=30)
    assert [d.result for d in done] == [{"n": 2 * i} for i in range(5)]
    assert failed.state == "FAILED" and failed.error_code == "INTERNAL" and "ZeroDivisionError" in failed.error
    manager.shutdown(1)
    table = store._db.open_table("_jobs")
    assert table.count_rows() == 6  # one row per job, updated in place
    assert len(table.to_lance().get_fragments()) <= 3  # compacted along the way
    again = JobManager(store)
    assert {j.id: j.state for j in again.list()} == {**{d.id: "SUCCEEDED" for d in done}, failed.id: "FAILED"}
    assert again.get(done[3].id).result == {"n": 6}


def test_only_the_newest_ended_jobs_are_held_and_the_rest_are_read_from_the_table(store, monkeypatch):
    """A long-lived server holds the jobs not ended and the newest JOB_RECORDS_KEPT ended
    ones; get and list serve the older ones from the table, before and after a restart."""
    monkeypatch.setattr(jobs_module, "JOB_RECORDS_KEPT", 3)
    store.create_collection("c")
    store.create_collection("d")
    manager = JobManager(store, workers=2)
    release = threading.Event()
    manager.register("echo", JobKind(run=lambda ctx, col, p: {"n": p["n"]}))
    manager.register("boom", JobKind(run=lambda ctx, col, p: 1 / 0))
    manager.register("hold", JobKind(run=lambda ctx, col, p: {"held": release.wait(30)}))
    held = manager.start("hold", "c", {})
    ids = []
    for i in range(8):
        job = manager.start("boom" if i == 1 else "echo", "c" if i % 2 == 0 else "d", {} if i == 1 else {"n": i})
        assert manager.wait(job.id, timeout=30).done
        ids.append(job.id)
    assert set(manager._jobs) == {held.id, *ids[-3:]}  # the running one and the newest three ended
    assert set(manager._contexts) == {held.id} and set(manager._last_persist) <= {held.id}
    assert manager.get(ids[0]).result == {"n": 0}  # from the table
    assert manager.get(ids[1]).state == "FAILED" and "ZeroDivisionError" in manager.get(ids[1]).error
    assert [j.id for j in manager.list()] == [*ids[::-1], held.id]
    assert [j.id for j in manager.list(limit=5)] == ids[::-1][:5]
    assert [j.id for j in manager.list(collection="d")] == [ids[7], ids[5], ids[3], ids[1]]
    assert [j.id for j in manager.list(states={"FAILED"})] == [ids[1]]
    assert [j.id for j in manager.list(states={"RUNNING"})] == [held.id]
    reads = []
    with monkeypatch.context() as patch:  # jobs not ended are all held: no read of the table
        patch.setattr(manager, "_read", lambda where: reads.append(where) or [])
        assert [j.id for j in manager.list(states={"PENDING", "RUNNING"})] == [held.id] and not reads
    with pytest.raises(NotFound):
        manager.get("no-such-job")
    release.set()
    assert manager.wait(held.id, timeout=30).result == {"held": True}
    assert len(manager._jobs) == 3 and not manager._contexts
    manager.shutdown(1)

    again = JobManager(store)
    assert set(again._jobs) == set(ids[-3:])  # the newest three by creation
    assert [j.id for j in again.list()] == [*ids[::-1], held.id]
    assert again.get(ids[2]).result == {"n": 2} and again.get(held.id).state == "SUCCEEDED"


def test_a_failed_compaction_of_the_jobs_table_is_not_a_failed_save(store, monkeypatch, caplog):
    """The records were saved before the compaction ran: its failure is logged as the
    table's maintenance, and the records are not kept back as unsaved."""
    monkeypatch.setattr(jobs_module, "COMPACT_EVERY", 2)
    store.create_collection("c")
    manager = JobManager(store, workers=1)
    manager.register("echo", JobKind(run=lambda ctx, col, p: {"n": p["n"]}))

    def fails(tables) -> None:
        raise RuntimeError("compaction preempted")

    monkeypatch.setattr(manager._upkeep, "maintain", fails)
    with caplog.at_level("WARNING", logger=jobs_module.log.name):
        done = [manager.wait(manager.start("echo", "c", {"n": i}).id, timeout=30) for i in range(3)]
    assert [d.state for d in done] == ["SUCCEEDED"] * 3
    assert not manager._unsaved
    messages = [r.getMessage() for r in caplog.records]
    assert any("maintenance of the jobs table failed" in m for m in messages), messages
    assert not any("could not persist" in m for m in messages), messages
    manager.shutdown(1)
    assert {j.id: j.state for j in JobManager(store).list()} == {d.id: "SUCCEEDED" for d in done}


def test_a_jobs_first_record_is_appended_and_a_failed_one_is_merged_later(store, monkeypatch):
    """A job's first record is appended (its id is new; a merge joins on id across the
    table). If that append raises after it landed, the record is kept and merged with the
    next write: one row per job all the same."""
    store.create_collection("c")
    manager = JobManager(store, workers=1)
    manager.register("echo", JobKind(run=lambda ctx, col, p: {"n": p["n"]}))
    table = store._db.open_table("_jobs")

    release = threading.Event()
    manager.register("wait", JobKind(run=lambda ctx, col, p: {"released": release.wait(30)}))
    waiting = manager.start("wait", "c", {})
    assert lance_operations(table, 1) == ["Append"]
    started_at = table.version
    release.set()
    manager.wait(waiting.id, timeout=30)
    for _ in range(100):  # the end's record is written just after the state changes
        table.checkout_latest()
        if table.version > started_at:
            break
        time.sleep(0.05)
    assert set(lance_operations(table, table.version - started_at)) == {"Update"}

    original = manager._table.add

    def lands_then_fails(batch):
        original(batch)
        raise OSError("the write landed but its answer was lost")

    monkeypatch.setattr(manager._table, "add", lands_then_fails)
    lost = manager.start("echo", "c", {"n": 1})
    assert lost.id in manager._unsaved
    monkeypatch.setattr(manager._table, "add", original)
    done = manager.wait(lost.id, timeout=30)
    later = manager.wait(manager.start("echo", "c", {"n": 2}).id, timeout=30)
    manager.shutdown(1)
    ids = [r["id"] for r in store._db.open_table("_jobs").to_arrow().to_pylist()]
    assert sorted(ids) == sorted([waiting.id, lost.id, later.id])
    assert {j.id: j.state for j in JobManager(store).list()} == {
        waiting.id: "SUCCEEDED", done.id: "SUCCEEDED", later.id: "SUCCEEDED"}


def test_a_job_kind_that_returns_no_mapping_fails_and_its_worker_goes_on(store):
    store.create_collection("c")
    manager = JobManager(store, workers=1)
    manager.register("bad", JobKind(run=lambda ctx, col, p: True))
    manager.register("echo", JobKind(run=lambda ctx, col, p: {"n": p["n"]}))
    bad = manager.wait(manager.start("bad", "c", {}).id, timeout=30)
    assert bad.state == "FAILED" and bad.error_code == "INTERNAL" and "TypeError" in bad.error
    assert manager.wait(manager.start("echo", "c", {"n": 3}).id, timeout=30).result == {"n": 3}
    manager.shutdown(1)


def test_counting_the_jobs_in_flight_holds_the_lock_their_writers_hold(store):
    """``has_capacity`` (every StartMining asks it) and ``shutdown`` read the held records
    while jobs start and end in other threads: reading them outside the lock the writers
    hold failed a soak's mining call with ``RuntimeError: dictionary changed size during
    iteration`` (INTERNAL). Here a thread adds and drops records the way ``start`` and
    ``_forget_ended`` do, under the lock, while the counts run with thread switches forced
    often."""
    import sys

    from service.jobs import SUCCEEDED, JobRecord

    manager = JobManager(store, workers=1)
    with manager._changed:  # a long-lived server's ended records (JOB_RECORDS_KEPT of them)
        for i in range(2_000):
            manager._jobs[f"ended{i}"] = JobRecord(id=f"ended{i}", kind="echo", collection="c", state=SUCCEEDED)
    stop, errors = threading.Event(), []

    def churn() -> None:
        n = 0
        while not stop.is_set():
            with manager._changed:
                manager._jobs[f"new{n}"] = JobRecord(id=f"new{n}", kind="echo", collection="c")
                manager._jobs.pop(f"new{n - 1}", None)
            n += 1

    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    writer = threading.Thread(target=churn)
    writer.start()
    try:
        for _ in range(300):
            try:
                assert manager.has_capacity()
            except RuntimeError as exc:
                errors.append(exc)
    finally:
        stop.set()
        writer.join()
        sys.setswitchinterval(interval)
    assert errors == []
    assert manager.shutdown(1)
