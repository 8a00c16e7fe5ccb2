"""Real faults, through the real client against a real server on loopback.

* A full disk: the data root is a small tmpfs this test mounts (root only; skipped with the
  reason otherwise, unless ``ASSAY_REQUIRE_FAULTS=1``, which CI sets), filled up with a
  filler file. Writes — upserts, a reindex job, a mining run's results, a dataset commit —
  answer RESOURCE_EXHAUSTED naming the data root; every table under the root stays at its
  version; reads keep working; once the filler is deleted the same writes succeed.
* A lost object store: a moto S3 server behind a loopback TCP proxy the test stops (moto
  keeps its data in memory, so the proxy goes, not moto) and starts again on the same
  port, in the middle of an upsert stream and of a dataset commit: UNAVAILABLE, no
  acknowledged row lost or doubled, the store usable again once the proxy is back.
  With the write log on, a write the log has no room for is refused the same way, and one
  it acknowledged waits in it while the disk is full and is applied once space returns.
* Two servers on one data root: the second is refused, naming the root and the first's pid.
* Shutdown: when ``stop()`` returns, the background optimize is over and the data root can
  be deleted at once.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Iterator

import lancedb
import numpy as np
import pyarrow as pa
import pytest

from service.client import Client, ResourceExhaustedError, UnavailableError
from service.server import ServerConfig, start_server

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CLASSES = ["a", "b", "c"]


def _rows(start: int, n: int, seed: int = 0) -> list[dict]:
    rng = np.random.default_rng(seed + start)
    return [{"id": f"r{i:05d}", "text": f"item number {i}", "split": "pool",
             "emb_v": rng.standard_normal(8).astype(np.float32).tolist(),
             "pred_m": {"probs": rng.dirichlet(np.ones(len(CLASSES))).astype(np.float32).tolist()}}
            for i in range(start, start + n)]


def _snapshot(root: str) -> dict[str, tuple[int, int, tuple[str, ...]]]:
    """Every table under the root (collections and assay's own ``_jobs``, ``_runs``,
    datasets ...): version, rows and columns, read through a fresh connection."""
    db = lancedb.connect(root)
    out = {}
    for name in db.table_names():
        table = db.open_table(name)
        out[name] = (table.version, table.count_rows(), tuple(table.schema.names))
    return out


# -- the classification -------------------------------------------------------------------------


def test_classify_error_on_what_lance_and_the_os_raise():
    from indexing.errors import classify_error

    root = "/srv/assay"
    # texts as Lance 14 raised them in the tests below (the Rust source location cut)
    full = RuntimeError("lance error: LanceError(IO): Generic LocalFileSystem error: Unable to copy data to "
                        "file: No space left on device (os error 28), /root/.cargo/registry/src/commit.rs:1663:50")
    gone = RuntimeError("lance error: LanceError(IO): Generic S3 error: Error performing list request: Error "
                        "performing GET http://127.0.0.1:9/b?list-type=2 in 3ms, after 1 retries, max_retries: "
                        "1, retry_timeout: 10s  - HTTP error: error sending request, /root/.cargo/x.rs:1:1")
    err = classify_error(full, root)
    assert err.code == "RESOURCE_EXHAUSTED" and err.message.startswith(f"the data root {root} is out of disk space")
    assert "/root/.cargo" not in err.message
    assert classify_error(OSError(errno.ENOSPC, "No space left on device"), root).code == "RESOURCE_EXHAUSTED"
    assert classify_error(OSError(errno.EDQUOT, "Disk quota exceeded"), root).code == "RESOURCE_EXHAUSTED"
    assert classify_error(gone, "s3://b/db").code == "UNAVAILABLE"
    assert "object store of the data root s3://b/db" in classify_error(gone, "s3://b/db").message
    assert classify_error(ConnectionResetError(104, "Connection reset by peer"), root).code == "UNAVAILABLE"
    # the failure of recording a failure carries the first one (raised while handling it)
    outer = RuntimeError("could not save the FAILED state")
    outer.__context__ = full
    assert classify_error(outer, root).code == "RESOURCE_EXHAUSTED"
    # not storage faults: a missing file, a bug, a retry setting that merely says "timeout"
    assert classify_error(FileNotFoundError(errno.ENOENT, "No such file"), root) is None
    assert classify_error(ValueError("bad"), root) is None
    assert classify_error(RuntimeError("Generic S3 error: 403 Forbidden, retry_timeout: 10s"), root) is None


# -- a full disk --------------------------------------------------------------------------------


def _require(reason: str) -> None:
    if os.environ.get("ASSAY_REQUIRE_FAULTS") == "1":
        pytest.fail(f"ASSAY_REQUIRE_FAULTS=1 but {reason}")
    pytest.skip(reason)


class Disk:
    """A tmpfs of ``size_mb`` mounted at ``path``; :meth:`fill` writes a filler file until
    the disk is full (ENOSPC), :meth:`free` deletes it."""

    def __init__(self, path: str, size_mb: int) -> None:
        self.path, self.filler = path, os.path.join(path, "filler")
        if os.geteuid() != 0:
            _require("mounting a tmpfs for the full-disk tests needs root")
        os.makedirs(path, exist_ok=True)
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_mb}m", "tmpfs", path],
                              capture_output=True, text=True)
        if done.returncode != 0:
            _require(f"could not mount a tmpfs ({done.stderr.strip() or done.returncode})")

    def fill(self) -> None:
        fd = os.open(self.filler, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
        try:
            for chunk in (1 << 20, 1 << 12):  # tmpfs allocates 4 KiB pages
                block = b"\0" * chunk
                with contextlib.suppress(OSError):
                    while True:
                        os.write(fd, block)
        finally:
            os.close(fd)
        # nothing is left, not even a page
        with pytest.raises(OSError) as full, open(os.path.join(self.path, "probe"), "wb") as f:
            f.write(b"\0" * 4096)
        assert full.value.errno == errno.ENOSPC

    def free(self) -> None:
        for name in ("filler", "probe"):
            with contextlib.suppress(FileNotFoundError):
                os.remove(os.path.join(self.path, name))

    @contextlib.contextmanager
    def full(self) -> Iterator[None]:
        self.fill()
        try:
            yield
        finally:
            self.free()

    def unmount(self) -> None:
        if subprocess.run(["umount", self.path], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", self.path], capture_output=True)


@pytest.fixture(scope="module")
def disk(tmp_path_factory):
    d = Disk(str(tmp_path_factory.mktemp("tmpfs")), size_mb=48)
    yield d
    d.unmount()


@pytest.fixture(scope="module")
def full_server(disk):
    # No automatic optimize: the writes under test are the only ones.
    srv = start_server(ServerConfig(data=os.path.join(disk.path, "data"), port=0, grace_s=1,
                                    optimize_every=0))
    yield srv
    srv.stop(0)


@pytest.fixture(scope="module")
def fclient(full_server):
    with Client(full_server.address, timeout=120, retries=0) as c:
        yield c


@pytest.fixture(scope="module")
def pool(fclient):
    """A collection on the tmpfs, written while there was space."""
    col = fclient.create_collection("pool", spaces={"v": {"dim": 8, "metric": "l2"}}, models={"m": CLASSES})
    col.upsert(_rows(0, 200))
    return col


def _out_of_space(err: BaseException, root: str) -> None:
    message = getattr(err, "message", str(err))
    assert err.code == "RESOURCE_EXHAUSTED", err
    assert f"the data root {root} is out of disk space" in message
    assert "free space and retry" in message and "committed nothing" in message


def _reads_work(col, n: int) -> None:
    """Search, query, count and describe while the disk is full."""
    assert col.count() == n
    assert col.describe()["rows"] == n
    assert col.query("id = 'r00003'", columns=["id", "text"]).column("text").to_pylist() == ["item number 3"]
    hits = col.search("v", ids=["r00003"], k=2, columns=["id"])
    assert hits.num_rows == 2 and "r00003" not in hits.column("id").to_pylist()


def test_writes_on_a_full_disk_answer_resource_exhausted_and_write_nothing(fclient, full_server, disk):
    root = full_server.store.root
    col = fclient.create_collection("writes", spaces={"v": {"dim": 8, "metric": "l2"}}, models={"m": CLASSES})
    col.upsert(_rows(0, 200))
    before = _snapshot(root)
    with disk.full():
        with pytest.raises(ResourceExhaustedError) as new_rows:
            col.upsert(_rows(200, 50))
        _out_of_space(new_rows.value, root)
        assert new_rows.value.details["committed"].rows == 0
        with pytest.raises(ResourceExhaustedError) as new_column:  # a schema change first
            col.upsert([{"id": "r00001", "label": "a", "score": 0.5}])
        _out_of_space(new_column.value, root)
        with pytest.raises(ResourceExhaustedError) as deleted:
            col.delete(ids=["r00002"])
        _out_of_space(deleted.value, root)
        with pytest.raises(ResourceExhaustedError) as tagged:
            col.tag_items(ids=["r00004"], add="review")
        _out_of_space(tagged.value, root)
        _reads_work(col, 200)
        assert _snapshot(root) == before  # every table at its version, same rows and columns
    # space is back: the same writes go through
    assert col.upsert(_rows(200, 50)).inserted == 50
    col.upsert([{"id": "r00001", "label": "a", "score": 0.5}])
    assert col.delete(ids=["r00002"]) == 1
    assert col.tag_items(ids=["r00004"], add="review") == 1
    assert col.count() == 249 and col.count("label = 'a' AND score = 0.5") == 1


@pytest.mark.slow  # loads the packaged MiniLM (seconds; longer on a busy machine)
def test_the_write_log_on_a_full_disk_keeps_what_it_acknowledged(disk, monkeypatch):
    """With the write log on: a write the log has no room for answers RESOURCE_EXHAUSTED and
    is not queued; a logged write whose commit then meets a full disk stays in the log and is
    tried again — reads meanwhile wait, then answer UNAVAILABLE naming the cause — and it is
    applied, once, when space returns."""
    from indexing import store as store_module

    root = os.path.join(disk.path, "logged")
    srv = start_server(ServerConfig(data=root, port=0, grace_s=1, optimize_every=0, write_log=True))
    try:
        with Client(srv.address, timeout=120, retries=0) as client:
            col = client.create_collection("wal", spaces={"v": {"dim": 8, "metric": "l2"}}, models={"m": CLASSES})
            col.upsert(_rows(0, 200))  # the first write is committed (it builds the id index)
            with disk.full(), pytest.raises(ResourceExhaustedError) as full:
                col.upsert(_rows(200, 20))
            _out_of_space(full.value, os.path.abspath(root))
            assert col.count() == 200  # nothing was queued

            slot, release = threading.Event(), threading.Event()

            def hold_commit_slot() -> None:  # no commit runs until the disk is full
                with srv.store.collection("wal")._write_lock:
                    slot.set()
                    release.wait(30)

            holder = threading.Thread(target=hold_commit_slot)
            holder.start()
            assert slot.wait(10)
            assert col.upsert(_rows(200, 20)).version == 0  # acknowledged from the log
            monkeypatch.setattr(store_module, "WRITE_LOG_READ_WAIT_S", 1.0)
            with disk.full():
                release.set()
                holder.join(10)
                with pytest.raises(UnavailableError) as waiting:
                    col.count()
                assert "not applied yet" in waiting.value.message and "space" in waiting.value.message.lower()
            monkeypatch.setattr(store_module, "WRITE_LOG_READ_WAIT_S", 30.0)
            assert col.count() == 220  # applied once space returned
            ids = col.query(columns=["id"]).column("id").to_pylist()
            assert len(ids) == len(set(ids)) == 220
    finally:
        srv.stop(0)


def test_a_reindex_job_on_a_full_disk_fails_with_resource_exhausted(fclient, full_server, disk):
    root = full_server.store.root
    col = fclient.create_collection("texts")
    col.upsert([{"id": f"t{i}", "text": f"a short sentence about topic {i % 7}"} for i in range(40)])
    before = _snapshot(root)
    with disk.full():
        job = col.reindex("minilm", batch_rows=20)  # validated (model loaded), then queued
        with pytest.raises(ResourceExhaustedError) as failed:
            job.wait(timeout=120)
        _out_of_space(failed.value, root)
        ended = failed.value.details["job"]
        assert ended.state == "FAILED" and ended.error_code == "RESOURCE_EXHAUSTED"
        assert fclient.job(job.id).state == "FAILED"  # served from memory: _jobs is full too
        assert _snapshot(root) == before  # no staging column, no job record written
        assert col.count() == 40
    again = col.reindex("minilm", batch_rows=20).wait(timeout=120)
    assert again.state == "SUCCEEDED" and again.result["embedded"] == 40
    hits = col.search("minilm", text="a short sentence about topic 3", k=3, columns=["id"])
    assert hits.num_rows == 3
    # the failed job's record reached the _jobs table once writes worked again
    jobs = lancedb.connect(root).open_table("_jobs").to_arrow().to_pylist()
    assert {j["id"]: j["state"] for j in jobs}[job.id] == "FAILED"


def test_mining_results_on_a_full_disk(fclient, full_server, disk, pool, monkeypatch):
    root = full_server.store.root
    col = pool
    runs = full_server.mining.runs
    real_write = runs.write_results
    seen: dict[str, object] = {}

    def fill_then_write(*args, **kwargs):
        # The disk fills while the run computes: its results are the write that fails.
        seen["before"] = _snapshot(root)
        disk.fill()
        return real_write(*args, **kwargs)

    monkeypatch.setattr(runs, "write_results", fill_then_write)
    try:
        job = col.mine("entropy", size=10, model="m")
        with pytest.raises(ResourceExhaustedError) as failed:
            job.wait(timeout=120)
        _out_of_space(failed.value, root)
        run = fclient.mining_job(job.run_id).run()
        assert run["state"] == "FAILED" and "out of disk space" in run["error"]
        assert _snapshot(root) == seen["before"]  # no results, no run or job record written
        _reads_work(col, col.describe()["rows"])
    finally:
        disk.free()
    monkeypatch.setattr(runs, "write_results", real_write)
    again = col.mine("entropy", size=10, model="m")
    again.wait(timeout=120)
    assert again.results().num_rows == 10
    # the failed run's final state was saved with the next run record
    stored = {r["run_id"]: r["state"] for r in lancedb.connect(root).open_table("_runs").to_arrow().to_pylist()}
    assert stored[job.run_id] == "FAILED" and stored[again.run_id] == "SUCCEEDED"
    # and served as saved, not as the RUNNING state held in memory while it ran
    assert fclient.mining_job(job.run_id).run()["state"] == "FAILED"


def test_a_dataset_commit_on_a_full_disk(fclient, full_server, disk, pool):
    root = full_server.store.root
    col = pool
    ds = fclient.create_dataset("train", "pool")
    ds.add(ids=[f"r{i:05d}" for i in range(10, 30)])
    before = _snapshot(root)
    with disk.full():
        with pytest.raises(ResourceExhaustedError) as failed:
            ds.commit("first twenty")
        _out_of_space(failed.value, root)
        assert _snapshot(root) == before  # no tag on the collection, no commit row
        status = ds.status()
        assert status["head"] == 0 and status["staged_adds"] == 20
        assert ds.history() == []
        _reads_work(col, col.count())
    commit = ds.commit("first twenty")
    assert commit["version"] == 1 and commit["members"] == 20
    assert sorted(ds.checkout(1, columns=["id"]).column("id").to_pylist()) == [f"r{i:05d}" for i in range(10, 30)]


# -- a lost object store ------------------------------------------------------------------------


class Proxy:
    """A loopback TCP proxy in front of the object store: :meth:`stop` closes the listening
    socket and resets every connection (the store is gone: connections are refused);
    :meth:`start` listens again on the same port."""

    def __init__(self, upstream: tuple[str, int]) -> None:
        self.upstream, self.port = upstream, 0
        self._listener: socket.socket | None = None
        self._conns: list[socket.socket] = []
        self._lock = threading.Lock()

    def start(self) -> None:
        s = socket.socket()
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("127.0.0.1", self.port))
        s.listen(128)
        self.port, self._listener = s.getsockname()[1], s
        threading.Thread(target=self._accept, args=(s,), daemon=True).start()

    def stop(self) -> None:
        if self._listener is not None:
            self._listener.close()
            self._listener = None
        with self._lock:
            conns, self._conns = self._conns, []
        for c in conns:  # RST, not FIN: the peer sees "connection reset"
            with contextlib.suppress(OSError):
                c.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                c.close()

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(self.upstream)
            except OSError:
                client.close()
                continue
            with self._lock:
                self._conns += [client, upstream]
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    @staticmethod
    def _pump(src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)


@pytest.fixture
def s3_server(moto_s3, monkeypatch):
    """A server on ``s3://faults-N/db`` whose object store is reached through a Proxy."""
    from urllib.parse import urlparse

    import boto3

    bucket = f"faults-{os.getpid()}-{time.monotonic_ns() % 10**9}"
    boto3.client("s3", endpoint_url=moto_s3, aws_access_key_id="test", aws_secret_access_key="test",
                 region_name="us-east-1").create_bucket(Bucket=bucket)
    moto = urlparse(moto_s3)
    proxy = Proxy((moto.hostname, moto.port))
    proxy.start()
    monkeypatch.setenv("ASSAY_S3_ENDPOINT", f"http://127.0.0.1:{proxy.port}")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "test")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "test")
    monkeypatch.setenv("ASSAY_S3_MAX_RETRIES", "1")  # refused connections: fail in about a second
    srv = start_server(ServerConfig(data=f"s3://{bucket}/db", port=0, grace_s=1, optimize_every=0))
    try:
        yield srv, proxy
    finally:
        if proxy._listener is None:
            proxy.start()
        srv.stop(0)
        proxy.stop()


def _unreachable(err: BaseException) -> None:
    assert err.code == "UNAVAILABLE", err
    assert "could not be reached" in err.message and "object store" in err.message


def test_object_store_lost_mid_upsert(s3_server):
    from indexing.store import Store

    srv, proxy = s3_server
    with Client(srv.address, timeout=60, retries=0) as client:
        col = client.create_collection("pool", spaces={"v": {"dim": 8, "metric": "l2"}}, models={"m": CLASSES})
        col.upsert(_rows(0, 100))

        def feed():
            for b in range(10):
                if b == 4:  # the store goes away once four batches are committed
                    deadline = time.monotonic() + 60
                    while srv.store.collection("pool").count() < 300 and time.monotonic() < deadline:
                        time.sleep(0.02)
                    proxy.stop()
                yield _rows(100 + 50 * b, 50)

        with pytest.raises(UnavailableError) as lost:
            col.upsert(feed(), batch_rows=50)
        _unreachable(lost.value)
        acknowledged = lost.value.details["committed"].rows
        assert acknowledged == 200  # the four batches committed before the store went away
        with pytest.raises(UnavailableError) as read:  # reads say the same while it is away
            col.count()
        _unreachable(read.value)
        proxy.start()
        ids = col.query(columns=["id"]).column("id").to_pylist()
        assert len(ids) == len(set(ids))  # nothing doubled
        sent = {f"r{i:05d}" for i in range(0, 600)}
        assert {f"r{i:05d}" for i in range(100 + acknowledged)} <= set(ids) <= sent  # nothing lost
        assert col.upsert(_rows(600, 20)).inserted == 20  # and the next write works
        assert col.count() == len(ids) + 20
    fresh = Store(srv.store.root).collection("pool")  # the table opens from scratch
    assert fresh.count() == len(ids) + 20


def test_object_store_lost_mid_dataset_commit(s3_server, monkeypatch):
    srv, proxy = s3_server
    datasets = srv.datasets

    class StopsTheStoreFirst:
        """The changes table, whose update is the commit's second write: the store goes
        away after the collection was tagged and before the members move to the version."""

        def __init__(self, table):
            self._table = table

        def update(self, *args, **kwargs):
            proxy.stop()
            return self._table.update(*args, **kwargs)

        def __getattr__(self, name):
            return getattr(self._table, name)

    with Client(srv.address, timeout=60, retries=0) as client:
        col = client.create_collection("pool", spaces={"v": {"dim": 8, "metric": "l2"}}, models={"m": CLASSES})
        col.upsert(_rows(0, 60))
        ds = client.create_dataset("train", "pool")
        ds.add(ids=[f"r{i:05d}" for i in range(20)])
        monkeypatch.setattr(datasets, "_changes", StopsTheStoreFirst(datasets._changes))
        with pytest.raises(UnavailableError) as lost:
            ds.commit("first")
        _unreachable(lost.value)
        monkeypatch.setattr(datasets, "_changes", datasets._changes._table)
        proxy.start()
        status = ds.status()
        assert status["head"] == 0 and status["staged_adds"] == 20  # not committed, not lost
        commit = ds.commit("first")
        assert commit["version"] == 1 and commit["members"] == 20
        assert sorted(ds.checkout(1, columns=["id"]).column("id").to_pylist()) == [f"r{i:05d}" for i in range(20)]
        ds.add(ids=["r00050"])
        assert ds.commit("second")["members"] == 21


# -- two servers on one data root ---------------------------------------------------------------


def _serve(data: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "service.cli", "serve", "--data", data, "--port", "0", "--log-format", "text"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO)


@pytest.mark.slow
def test_a_second_server_on_the_same_data_root_is_refused(tmp_path):
    data = str(tmp_path / "data")
    first = _serve(data)
    try:
        line = first.stdout.readline()
        assert line.startswith("assay listening on "), (line, first.stderr.read() if first.poll() is not None else "")
        second = _serve(data)
        try:
            out, err = second.communicate(timeout=120)
        finally:
            if second.poll() is None:  # it started after all: do not leave it running
                second.kill()
                second.wait(timeout=30)
        assert second.returncode != 0 and "assay listening" not in out
        assert f"the data root {os.path.abspath(data)} is in use by another assay server" in err
        assert f"pid {first.pid}" in err
        # in this process too: a second server object on the root is refused before it opens anything
        from service.server import DataRootInUse

        with pytest.raises(DataRootInUse, match=f"pid {first.pid}"):
            start_server(ServerConfig(data=data, port=0))
    finally:
        first.send_signal(signal.SIGKILL)  # a crash: the kernel releases the lock
        first.wait(timeout=30)
    srv = start_server(ServerConfig(data=data, port=0, grace_s=0))
    with open(os.path.join(data, ".assay.lock")) as lock:
        assert f"pid {os.getpid()}" in lock.read()
    srv.stop(0)
    start_server(ServerConfig(data=data, port=0, grace_s=0)).stop(0)  # after a clean stop, too


# -- shutdown -----------------------------------------------------------------------------------


def test_stop_waits_for_background_maintenance(tmp_path):
    data = str(tmp_path / "data")
    srv = start_server(ServerConfig(data=data, port=0, grace_s=0, optimize_every=2))
    with Client(srv.address, timeout=60) as client:
        # An index is built at 256 vectors: the automatic optimize has real work to do.
        col = client.create_collection("pool", spaces={"v": {"dim": 32, "metric": "l2",
                                                             "index": {"threshold_rows": 256}}})
        rng = np.random.default_rng(0)
        for start in (0, 3000):  # the second write starts the background optimize
            col.upsert(pa.table({"id": [f"r{i}" for i in range(start, start + 3000)],
                                 "emb_v": pa.FixedSizeListArray.from_arrays(
                                     pa.array(rng.standard_normal(3000 * 32).astype(np.float32)), 32)}))
    maintenance = srv.store.maintainer._thread
    assert maintenance is not None  # the writes started it
    srv.stop(0)
    assert not maintenance.is_alive()
    shutil.rmtree(data)  # nothing writes under the root any more
    assert not os.path.exists(data)
    # once closed, the store takes no more writes and schedules no more maintenance
    with pytest.raises(Exception, match="closing"):
        srv.store.collection("pool").upsert([{"id": "late"}])
