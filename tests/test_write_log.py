"""The write-ahead log (``Store(write_log=True)``, ``assay serve --write-log``): small upserts
acknowledged once logged, applied right after; reads wait for them; the log is replayed
after a crash.

Real LanceDB tables in temp folders; the crash test kills a real process with SIGKILL. The
commit slot held by the test is how a commit is kept from running (the applier waits for
it, as it waits for a compaction).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import threading
import time

import numpy as np
import pyarrow as pa
import pytest

from indexing import store as store_module
from indexing import write_log as write_log_module
from indexing.errors import Unavailable
from indexing.store import WRITE_LOG_DIR, Store
from indexing.write_log import WriteLog, WriteLogBusy
from service.client import Client
from service.server import ServerConfig, start_server

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _rows(ids, seed=0, **extra):
    rng = np.random.default_rng(seed)
    return {"id": list(ids), "emb_v": rng.standard_normal((len(ids), 4)).astype(np.float32).tolist(), **extra}


def _logged_store(path) -> tuple[Store, object]:
    store = Store(str(path), optimize_every=0, write_log=True)
    col = store.create_collection("c", spaces={"v": 4})
    col.upsert(_rows(["seed"]))  # the first write builds the id index: committed, not logged
    return store, col


class _HeldSlot:
    """Hold a collection's commit slot in another thread, so no commit runs until released."""

    def __init__(self, col) -> None:
        self._col, self._held, self._release = col, threading.Event(), threading.Event()
        self._thread = threading.Thread(target=self._hold, daemon=True)

    def _hold(self) -> None:
        with self._col._write_lock:
            self._held.set()
            self._release.wait(30)

    def __enter__(self) -> _HeldSlot:
        self._thread.start()
        assert self._held.wait(10)
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    def release(self) -> None:
        self._release.set()
        self._thread.join(10)


# -- the log file ----------------------------------------------------------------------------


def test_the_log_returns_what_is_not_applied_in_order_and_cuts_a_torn_tail(tmp_path):
    folder = str(tmp_path / "log")
    log = WriteLog(folder)
    assert list(log.unapplied()) == []
    tables = [pa.table({"id": [f"r{k}-{i}" for i in range(3)], "n": [k] * 3}) for k in range(3)]
    assert [log.append(t) for t in tables] == [1, 2, 3]
    log.close()
    (segment,) = [n for n in os.listdir(folder) if n.endswith(".log")]
    size = os.path.getsize(os.path.join(folder, segment))
    with open(os.path.join(folder, segment), "ab") as fh:  # a frame cut short by a crash
        fh.write(b"\x04\x00\x00\x00\x00\x00\x00\x00\xff\xff")

    log = WriteLog(folder)
    got = list(log.unapplied())
    assert [seq for seq, _ in got] == [1, 2, 3]
    assert all(t.equals(want) for (_, t), want in zip(got, tables, strict=True))
    assert os.path.getsize(os.path.join(folder, segment)) == size  # the torn frame is cut off
    log.mark_applied(2)
    assert log.append(tables[0]) == 4
    log.close()

    log = WriteLog(folder)
    assert [(seq, t.column("n")[0].as_py()) for seq, t in log.unapplied()] == [(3, 2), (4, 0)]
    log.mark_applied(4)
    log.close()  # everything applied: no segment is left
    assert not [n for n in os.listdir(folder) if n.endswith(".log")]
    log = WriteLog(folder)
    assert list(log.unapplied()) == []
    assert log.append(tables[1]) == 5  # numbering goes on after the applied mark
    log.close()


def test_segments_roll_over_and_applied_ones_are_deleted(tmp_path, monkeypatch):
    monkeypatch.setattr(write_log_module, "SEGMENT_BYTES", 1)  # a new segment for every record
    folder = str(tmp_path / "log")
    log = WriteLog(folder)
    list(log.unapplied())
    for k in range(4):
        log.append(pa.table({"n": [k]}))
    assert len([n for n in os.listdir(folder) if n.endswith(".log")]) == 4
    log.mark_applied(3)  # the first three segments hold applied records only
    assert sorted(n for n in os.listdir(folder) if n.endswith(".log")) == [f"{4:020d}.log"]
    log.close()
    log = WriteLog(folder)
    assert [seq for seq, _ in log.unapplied()] == [4]
    log.close()


def test_a_log_held_by_another_writer_is_refused(tmp_path):
    folder = str(tmp_path / "log")
    log = WriteLog(folder)
    with pytest.raises(WriteLogBusy, match="held by another process"):
        WriteLog(folder)
    log.close()
    WriteLog(folder).close()


# -- a collection with a write log -----------------------------------------------------------


def test_an_upsert_is_acknowledged_before_its_commit_and_reads_wait_for_it(tmp_path):
    store, col = _logged_store(tmp_path)
    applied_version = col.version
    with _HeldSlot(col) as slot:
        first = col.upsert(_rows(["a", "b"]))
        again = col.upsert(_rows(["b", "c"], seed=1))  # b is logged, not applied: an update
        assert (first.inserted, first.updated, first.version) == (2, 0, 0)
        assert (again.inserted, again.updated) == (1, 1)
        assert col._table.version == applied_version  # nothing committed yet
        seen: list[int] = []
        reader = threading.Thread(target=lambda: seen.append(col.count()))
        reader.start()
        reader.join(0.5)
        assert reader.is_alive() and not seen  # the read waits for the writes it must see
        slot.release()
        reader.join(10)
    assert seen == [4]
    assert col.version > applied_version
    row = col.take(["b"], ["emb_v"]).column("emb_v").to_pylist()[0]
    want = np.asarray(_rows(["b", "c"], seed=1)["emb_v"][0])
    assert np.allclose(row, want / np.linalg.norm(want), atol=1e-5)  # the later write won (stored normalised)
    store.close()


def test_logged_and_committed_writes_apply_in_the_order_they_were_made(tmp_path):
    store, col = _logged_store(tmp_path)
    col.upsert(_rows(["x", "y"]))  # logged
    assert col.delete(ids=["x"])[0] == 1  # committed after the upsert it follows
    col.upsert(_rows(["z"]))  # logged
    assert col.tag_rows(ids=["y", "z"], add=["keep"])[0] == 2
    col.upsert(_rows(["x"], seed=3))  # logged again after its delete
    tags = {r["id"]: r["tags"] or [] for r in col.query(columns=["id", "tags"]).to_pylist()}
    assert tags == {"seed": [], "x": [], "y": ["keep"], "z": ["keep"]}
    store.close()


def test_one_callers_batches_apply_in_order_when_one_of_them_must_be_committed(tmp_path):
    store, col = _logged_store(tmp_path)
    col.upsert(_rows(["x"], n=[0]))  # the column n exists from here on
    batches = [_rows(["x"], n=[1]), _rows(["x"], n=[2], note=["adds a column"]), _rows(["x"], n=[3])]
    results = col.upsert_prepared_many([(b, col.prepare(b)) for b in batches])
    assert [r.version == 0 for r in results] == [True, False, False]  # the rest waits for the second
    assert col.take(["x"], ["n", "note"]).to_pylist() == [{"n": 3, "note": "adds a column"}]
    store.close()


def test_an_upsert_with_new_columns_or_a_big_batch_is_committed_before_its_answer(tmp_path, monkeypatch):
    store, col = _logged_store(tmp_path)
    monkeypatch.setattr(store_module, "WRITE_LOG_BATCH_ROWS", 10)
    with_column = col.upsert(_rows(["n1"], score=[0.5]))
    assert with_column.version > 0 and with_column.new_columns == ["score"]
    big = col.upsert(_rows([f"big{i}" for i in range(11)]))
    assert big.version > 0 and big.inserted == 11
    small = col.upsert(_rows(["s1"], score=[1.0]))
    assert small.version == 0  # an existing column, a small batch: through the log
    assert col.count() == 14
    store.close()


def test_dropping_a_column_waits_for_the_logged_writes_that_carry_it(tmp_path):
    store, col = _logged_store(tmp_path)
    col.upsert(_rows(["a"], note=["first"]))  # adds the column (committed)
    with _HeldSlot(col) as slot:
        assert col.upsert(_rows(["b"], note=["logged"])).version == 0
        dropper = threading.Thread(target=col.drop_fields, args=(["note"],))
        dropper.start()
        dropper.join(0.5)
        assert dropper.is_alive()  # waiting for the logged write to apply first
        slot.release()
        dropper.join(10)
    assert "note" not in col.schema.names
    assert sorted(col.query(columns=["id"]).column("id").to_pylist()) == ["a", "b", "seed"]
    store.close()


def test_closing_the_store_applies_every_acknowledged_write(tmp_path):
    store, col = _logged_store(tmp_path)
    threads = [threading.Thread(target=lambda w=w: [col.upsert(_rows([f"w{w}-{k}-{i}" for i in range(5)]))
                                                    for k in range(20)]) for w in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert store.close(timeout=60)
    folder = os.path.join(str(tmp_path), WRITE_LOG_DIR, "c")
    assert not [n for n in os.listdir(folder) if n.endswith(".log")]
    plain = Store(str(tmp_path), optimize_every=0)  # no log: what is in the table
    assert plain.collection("c").count() == 1 + 4 * 20 * 5
    plain.close()


def test_a_dropped_collection_takes_its_log_with_it(tmp_path):
    store, col = _logged_store(tmp_path)
    col.upsert(_rows(["a"]))
    store.drop_collection("c")
    assert not os.path.exists(os.path.join(str(tmp_path), WRITE_LOG_DIR, "c"))
    fresh = store.create_collection("c", spaces={"v": 4})
    assert fresh.count() == 0
    store.close()


def test_a_second_store_on_the_root_writes_without_the_log_it_does_not_hold(tmp_path):
    store, col = _logged_store(tmp_path)
    other = Store(str(tmp_path), optimize_every=0, write_log=True)
    theirs = other.collection("c")
    assert theirs._log is None  # this process holds the log
    assert theirs.upsert(_rows(["o"])).version > 0  # acknowledged after its commit
    assert col.upsert(_rows(["m"])).version == 0
    assert sorted(col.query(columns=["id"]).column("id").to_pylist()) == ["m", "o", "seed"]
    other.close()
    store.close()


def test_a_writer_waits_for_its_commit_once_the_log_is_too_far_ahead(tmp_path, monkeypatch):
    store, col = _logged_store(tmp_path)
    monkeypatch.setattr(store_module, "WRITE_LOG_BACKLOG_ROWS", 3)
    monkeypatch.setattr(store_module, "WRITE_LOG_READ_WAIT_S", 0.3)
    with _HeldSlot(col):
        assert col.upsert(_rows(["a", "b"])).version == 0  # 2 rows behind: answered at once
        with pytest.raises(Unavailable, match="4 rows behind") as info:
            col.upsert(_rows(["c", "d"]))  # 4 rows behind: waits for its commit, which cannot run
        assert "will be applied" in str(info.value)
    monkeypatch.setattr(store_module, "WRITE_LOG_READ_WAIT_S", 30.0)
    assert col.count() == 5  # the write that timed out was logged: it applied
    store.close()


def test_a_failing_commit_of_logged_writes_is_tried_again_and_reads_say_why(tmp_path, monkeypatch):
    store, col = _logged_store(tmp_path)
    monkeypatch.setattr(store_module, "WRITE_LOG_READ_WAIT_S", 0.3)
    failures = {"left": 3}
    real_add = col._table.add

    def add_failing(*args, **kwargs):  # the table's append fails three times, then works
        if failures["left"]:
            failures["left"] -= 1
            raise OSError(28, "No space left on device")
        return real_add(*args, **kwargs)

    monkeypatch.setattr(col._table, "add", add_failing)
    assert col.upsert(_rows(["a", "b"])).version == 0  # acknowledged from the log
    with pytest.raises(Unavailable, match="No space left") as info:
        col.count()
    assert "not applied yet" in str(info.value)
    deadline = time.monotonic() + 30
    while failures["left"] and time.monotonic() < deadline:
        time.sleep(0.05)
    monkeypatch.setattr(store_module, "WRITE_LOG_READ_WAIT_S", 30.0)
    assert col.count() == 3  # applied at the fourth try, nothing lost or doubled
    assert col._committer.apply_error is None
    store.close()


# -- a crash --------------------------------------------------------------------------------

_KILLED_WRITER = textwrap.dedent("""
    import sys, threading
    import numpy as np
    from indexing.store import Store
    store = Store(sys.argv[1], optimize_every=0, write_log=True)
    col = store.create_collection("c", spaces={"v": 4})
    col.upsert({"id": ["seed"], "emb_v": [[1.0] * 4], "n": [-1]})
    with col._write_lock:  # nothing is applied from here on: the log alone holds the writes
        for k in range(40):
            ids = [f"k{k}-{i}" for i in range(5)]
            col.upsert({"id": ids, "emb_v": np.ones((5, 4), np.float32).tolist(), "n": [k] * 5})
            print(",".join(ids), flush=True)
        print("done", flush=True)
        threading.Event().wait()
""")


def test_writes_acknowledged_from_the_log_survive_sigkill_exactly_once(tmp_path):
    root = str(tmp_path / "data")
    proc = subprocess.Popen([sys.executable, "-c", _KILLED_WRITER, root], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    acked: list[str] = []
    try:
        for line in proc.stdout:
            if line.strip() == "done":
                break
            acked.extend(line.strip().split(","))
        else:
            pytest.fail(proc.stderr.read())
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
    assert len(acked) == 200
    plain = Store(root, optimize_every=0)  # the table alone: none of the logged writes applied
    assert plain.collection("c").count() == 1
    plain.close()

    store = Store(root, optimize_every=0, write_log=True)  # opening applies the log
    col = store.collection("c")
    ids = col.query(columns=["id"]).column("id").to_pylist()
    assert len(ids) == len(set(ids)) == 201
    assert set(acked) <= set(ids)
    assert col.take(["k39-0", "k0-4"], ["n"]).column("n").to_pylist() == [39, 0]
    store.close()
    store = Store(root, optimize_every=0, write_log=True)  # applied once: opening again adds nothing
    assert store.collection("c").count() == 201
    store.close()


# -- through the server -----------------------------------------------------------------------


def test_the_server_acknowledges_from_the_log_and_a_read_after_sees_the_write(tmp_path):
    server = start_server(ServerConfig(data=str(tmp_path / "data"), port=0, write_log=True, grace_s=1))
    try:
        with Client(server.address) as client:
            col = client.create_collection("c", spaces={"v": 4})
            col.upsert(_rows(["seed"]))
            acks = []
            done = threading.Barrier(9)

            def write(w: int) -> None:
                with Client(server.address) as c:
                    mine = c.collection("c")
                    for k in range(10):
                        acks.append(mine.upsert(_rows([f"w{w}-{k}-{i}" for i in range(3)])))
                done.wait()

            threads = [threading.Thread(target=write, args=(w,)) for w in range(8)]
            for t in threads:
                t.start()
            done.wait()
            assert {a.version for a in acks} == {0}  # answered from the log
            assert col.count() == 1 + 8 * 10 * 3  # the next read sees every acknowledged row
            for t in threads:
                t.join()
        stats = server.store.commit_stats()["c"]
        assert stats.commits < stats.writes  # writes shared commits
    finally:
        server.stop(1)
