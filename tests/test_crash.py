"""Crash safety: the server as its own process (``python -m service.cli serve``), killed
with SIGKILL at seeded random points while it works, then restarted on the same data.

* Streamed upserts (two clients at once) run under every kill: each batch the server
  acknowledged is there exactly once after the crash, a batch in flight is all there or
  not at all, ids stay unique, every table opens and the collection searches; the
  unacknowledged batches are sent again first in the next round (upserts are idempotent
  by id), and a last round, not killed, shows they duplicate nothing.
* A reindex job killed mid-way is reported INTERRUPTED; running it again resumes from the
  table and ends with the vectors an uninterrupted run writes.
* A mining run killed mid-way is reported INTERRUPTED, its results are refused, and it can
  be started again (the same run) or rerun (a new run): both give the same results.

One server process (and data root) serves the module; the first three tests each kill it
once (at a seeded random point) and restart it, four starts in all: the server start and
its model load dominate the time.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pytest

from indexing.store import Store
from service.client import AssayClientError, Client, FailedPreconditionError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SEED = 20261121
BATCH = 200  # rows per upsert batch
DIM = 8

pytestmark = pytest.mark.slow


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """``assay serve`` on a data root: start (waits for health SERVING), kill -9, stop."""

    def __init__(self, data: str, logs: str, extra: tuple[str, ...] = ()) -> None:
        self.data, self.logs, self.extra = data, logs, extra
        self.proc: subprocess.Popen | None = None
        self.address = ""
        self.starts = 0

    def start(self, timeout: float = 120) -> str:
        port = _free_port()
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}
        log = open(os.path.join(self.logs, f"server-{self.starts}.log"), "w")  # noqa: SIM115
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "service.cli", "serve", "--data", self.data, "--port", str(port),
             "--log-format", "text", "--grace", "2", *self.extra],
            cwd=ROOT, env=env, stdout=log, stderr=log)
        log.close()
        self.starts += 1
        self.address = f"127.0.0.1:{port}"
        deadline = time.monotonic() + timeout
        with Client(self.address, retries=0, timeout=2) as probe:
            while True:
                assert self.proc.poll() is None, self.log_tail()
                try:
                    if probe.health() == "SERVING":
                        return self.address
                except AssayClientError:
                    pass
                assert time.monotonic() < deadline, "the server did not start\n" + self.log_tail()
                time.sleep(0.05)

    def kill(self) -> None:
        assert self.proc is not None and self.proc.poll() is None, self.log_tail()
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=30)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def log_tail(self, lines: int = 40) -> str:
        path = os.path.join(self.logs, f"server-{self.starts - 1}.log")
        with open(path, errors="replace") as fh:
            return "".join(fh.readlines()[-lines:])


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("crash")
    srv = ServerProcess(str(root / "data"), str(root))
    srv.start()
    yield srv
    srv.stop()


@pytest.fixture
def client(server):
    if not server.running():
        server.start()
    with Client(server.address, retries=0, timeout=120) as c:
        yield c


def _restart(server: ServerProcess) -> Client:
    server.start()
    return Client(server.address, retries=0, timeout=120)


def _tables_open(data: str) -> dict[str, int]:
    """Open every table of the root in this process and count its rows (all must open)."""
    store = Store(data)
    return {name: store._db.open_table(name).count_rows() for name in store._table_names()}


# -- streamed upserts ---------------------------------------------------------------------------

def _batch(stream: int, k: int) -> pa.Table:
    rng = np.random.default_rng(k)
    return pa.table({
        "id": [f"s{stream}-b{k:04d}-{j:03d}" for j in range(BATCH)],
        "batch": pa.array(np.full(BATCH, k), pa.int64()),
        "emb_v": pa.FixedSizeListArray.from_arrays(
            pa.array(rng.standard_normal(BATCH * DIM).astype(np.float32)), DIM),
    })


@dataclass
class Stream:
    """One client streaming batches k = stream, stream + 2, ... (the two streams interleave)."""

    stream: int
    todo: list[int] = field(default_factory=list)  # to send next round, in order
    unacked: list[int] = field(default_factory=list)
    acked: set[int] = field(default_factory=set)
    pulled: list[int] = field(default_factory=list)  # handed to the client this round, in order
    sent: set[int] = field(default_factory=set)  # every batch handed to a client so far
    error: BaseException | None = None

    def batches(self) -> Iterator[pa.Table]:
        for k in self.todo:
            self.pulled.append(k)
            self.sent.add(k)
            yield _batch(self.stream, k)

    def run(self, address: str) -> None:
        try:
            with Client(address, retries=0, timeout=60) as c:
                summary = c.collection("stream").upsert(self.batches(), batch_rows=BATCH)
            done = summary.batches
        except AssayClientError as err:
            committed = err.details.get("committed")
            if committed is None:  # nothing acknowledged, or not a stream failure at all
                if err.code not in ("UNAVAILABLE", "CANCELLED", "INTERNAL", "UNKNOWN"):
                    self.error = err
                done = 0
            else:
                done = committed.batches
        except BaseException as exc:  # noqa: BLE001 — reported by the test
            self.error = exc
            return
        assert done <= len(self.pulled)
        self.acked.update(self.pulled[:done])  # acknowledgements come in order
        self.unacked = self.pulled[done:]  # sent, maybe committed: sent again first next round
        self.todo = self.unacked + self.todo[len(self.pulled):]


def _batch_counts(client: Client) -> tuple[dict[int, int], int, int]:
    table = client.collection("stream").query(columns=["id", "batch"])
    counts = pc.value_counts(table.column("batch"))
    by_batch = dict(zip(counts.field("values").to_pylist(), counts.field("counts").to_pylist(), strict=True))
    return by_batch, table.num_rows, pc.count_distinct(table.column("id")).as_py()


@dataclass
class Upserts:
    """The two upsert streams of the module: every test runs a round of them under its kill."""

    rng: np.random.Generator
    streams: list[Stream]
    rounds: int = 0
    threads: list[threading.Thread] = field(default_factory=list)

    def start(self, address: str) -> None:
        with Client(address, retries=0) as c:
            c.create_collection("stream", spaces={"v": {"dim": DIM, "metric": "l2"}}, if_not_exists=True)
        for s in self.streams:
            s.pulled = []
        self.threads = [threading.Thread(target=s.run, args=(address,), daemon=True) for s in self.streams]
        for t in self.threads:
            t.start()

    def pulled(self) -> int:
        assert all(t.is_alive() for t in self.threads) or all(s.error is None for s in self.streams)
        return sum(len(s.pulled) for s in self.streams)

    def join(self) -> None:
        for t in self.threads:
            t.join(timeout=60)
            assert not t.is_alive()
        for s in self.streams:
            assert s.error is None, repr(s.error)
        self.rounds += 1

    def check(self, client: Client, stored_rows: int | None = None) -> str:
        """Every acknowledged batch stored once, whole; nothing partial, duplicated or unsent."""
        by_batch, rows, distinct = _batch_counts(client)
        acked = set().union(*(s.acked for s in self.streams))
        sent = set().union(*(s.sent for s in self.streams))
        assert rows == distinct, "an id is stored twice"
        assert stored_rows is None or rows == stored_rows
        for k in acked:
            assert by_batch.get(k) == BATCH, f"acknowledged batch {k} has {by_batch.get(k)} rows"
        for k, n in by_batch.items():
            assert n == BATCH, f"batch {k} is partial: {n} of {BATCH} rows"
            assert k in sent, f"batch {k} was never sent"
        assert rows >= BATCH * len(acked)
        hits = client.collection("stream").search("v", np.ones(DIM, np.float32), k=5, columns=["id"])
        assert hits.num_rows == 5
        return f"{len(acked)} batches acknowledged, {len(by_batch)} stored ({rows} rows)"


@pytest.fixture(scope="module")
def upserts():
    return Upserts(np.random.default_rng(SEED), [Stream(s, todo=list(range(s, 4000, 2))) for s in (0, 1)])


def _kill_and_check(server: ServerProcess, upserts: Upserts) -> Client:
    """SIGKILL, check the root as the crash left it (every table opens), restart, check the
    upserts through the new server; returns a client of it."""
    server.kill()
    upserts.join()
    opened = _tables_open(server.data)
    client = _restart(server)
    summary = upserts.check(client, opened["stream"])
    print(f"kill {upserts.rounds}: {summary}")
    return client


def test_acknowledged_upserts_survive_sigkill_exactly_once(server, client, upserts):
    upserts.start(server.address)
    target = int(upserts.rng.integers(6, 24))  # batches handed to the clients before the kill
    deadline = time.monotonic() + 120
    with Client(server.address, retries=0) as watcher:
        while upserts.pulled() < target or watcher.collection("stream").count() < 2 * BATCH:
            assert time.monotonic() < deadline, "no progress"
            time.sleep(0.01)
    time.sleep(float(upserts.rng.uniform(0.0, 0.4)))
    _kill_and_check(server, upserts).close()


# -- a reindex job ----------------------------------------------------------------------------------

def _texts(n: int) -> list[str]:
    from indexing.samples import TEXT_CORPUS

    return [f"{TEXT_CORPUS[i % len(TEXT_CORPUS)][0]} (item {i})" for i in range(n)]


def test_a_killed_reindex_job_is_interrupted_and_resumes_to_the_uninterrupted_result(server, client, upserts):
    rng = np.random.default_rng(SEED + 1)
    n = 160
    col = client.create_collection("texts")
    col.upsert({"id": [f"t{i:04d}" for i in range(n)], "text": _texts(n),
                "emb_a": rng.standard_normal((n, 8)).astype(np.float32)})
    job = col.reindex("a", batch_rows=10)  # loads the model before it answers
    upserts.start(server.address)
    threshold = int(rng.integers(n // 5, n // 2))
    deadline = time.monotonic() + 300
    while True:
        pending = col.describe().get("reindexing") or []
        done = int(pending[0].get("rows_done", 0)) if pending else 0
        if done >= threshold and upserts.pulled() >= 2:
            break
        assert not job.refresh().done, f"the reindex ended before the kill: {job.state} {job.error}"
        assert time.monotonic() < deadline, "the reindex made no progress"
        time.sleep(0.02)
    with _kill_and_check(server, upserts) as c:
        cut = Store(server.data).collection("texts")  # the old space, whole; part staged
        staged = cut.count("emb_a__next IS NOT NULL")
        assert cut.space("a").dim == 8 and cut.count() == n and threshold <= staged < n
        col = c.collection("texts")
        assert c.job(job.id).state == "INTERRUPTED"
        assert col.describe()["reindexing"][0]["rows_done"] == staged
        again = col.reindex("a", batch_rows=10).wait(timeout=600)
        assert again.state == "SUCCEEDED", again.error
        assert again.result["resumed"] and again.result["embedded"] == n - staged
        assert again.result["swapped"]
        # The uninterrupted run to compare with: the same model into a new space, in one go.
        ref = col.reindex("b", batch_rows=40).wait(timeout=600)
        assert ref.state == "SUCCEEDED" and ref.result["embedded"] == n
        table = col.query(columns=["id", "emb_a", "emb_b"])
        assert table.num_rows == n and pc.count_distinct(table.column("id")).as_py() == n
        a = np.asarray(table.column("emb_a").to_pylist(), dtype=np.float32)
        b = np.asarray(table.column("emb_b").to_pylist(), dtype=np.float32)
        assert a.shape == (n, 384) and np.allclose(a, b, atol=1e-5)
        assert not col.describe().get("reindexing")
        assert col.search("a", texts=[_texts(n)[7]], k=1).column("id").to_pylist() == ["t0007"]


# -- a mining run -----------------------------------------------------------------------------------

def test_a_killed_mining_run_is_interrupted_and_can_be_run_again(server, client, upserts):
    rng = np.random.default_rng(SEED + 2)
    n = 20_000
    col = client.create_collection("pool", spaces={"v": {"dim": 16, "metric": "l2"}})
    col.upsert({"id": [f"p{i:05d}" for i in range(n)],
                "emb_v": rng.standard_normal((n, 16)).astype(np.float32)})
    job = col.mine("lof", 100, space="v", params={"k": 10}, seed=3)
    upserts.start(server.address)
    deadline = time.monotonic() + 120
    while job.refresh().progress < 0.2 or upserts.pulled() < 2:  # the k-NN graph is being built
        assert not job.done, f"the run ended before the kill: {job.state} {job.error}"
        assert time.monotonic() < deadline
        time.sleep(0.02)
    time.sleep(float(rng.uniform(0.0, 0.1)))
    with _kill_and_check(server, upserts) as c:
        run = c.mining_job(job.run_id)
        record = run.run()
        assert record["state"] == "INTERRUPTED", record
        assert c.job(job.id).state == "INTERRUPTED"
        with pytest.raises(FailedPreconditionError, match="INTERRUPTED"):
            run.results()
        # The same run, started again (Jobs.StartJob "mine" with its run id) ...
        restarted = c.start_job("mine", "pool", {"run_id": job.run_id}).wait(timeout=300)
        assert restarted.state == "SUCCEEDED", restarted.error
        assert run.run()["state"] == "SUCCEEDED"
        first = run.results()
        # ... and a rerun (a new run with the same parameters, seed and version).
        rerun = run.rerun().wait(timeout=300)
        assert rerun.state == "SUCCEEDED", rerun.error
        second = rerun.results()
        assert first.num_rows == 100 and pc.count_distinct(first.column("id")).as_py() == 100
        assert first.column("id").to_pylist() == second.column("id").to_pylist()
        assert np.allclose(first.column("score").to_numpy(), second.column("score").to_numpy())


def test_unacknowledged_batches_sent_again_do_not_duplicate(server, client, upserts):
    """After each kill the batches sent but not acknowledged went first in the next round:
    sent again, maybe on top of a committed copy. A last round, not killed, sends those of
    the last kill and two more per stream: then every stored batch is acknowledged, once."""
    for s in upserts.streams:
        s.todo = s.todo[:len(s.unacked) + 2]
    upserts.start(server.address)
    upserts.join()
    for s in upserts.streams:
        assert s.todo == [] and s.unacked == [], (s.todo, s.unacked)
    upserts.check(client)
    by_batch, _, _ = _batch_counts(client)
    assert set().union(*(s.acked for s in upserts.streams)) == set(by_batch)


# -- many small concurrent writers (group commit) -----------------------------------------------

@pytest.fixture
def log_server(tmp_path):
    """A server acknowledging small upserts from its write-ahead log (``--write-log``)."""
    srv = ServerProcess(str(tmp_path / "data"), str(tmp_path), extra=("--write-log",))
    srv.start()
    yield srv
    srv.stop()


@pytest.mark.parametrize("acknowledged", ["after the commit", "from the write log"])
def test_sixteen_small_writers_survive_sigkill_exactly_once(request, acknowledged):
    """16 clients each sending 20-row upserts share group commits (or are acknowledged from
    the write log, which a restart applies); a SIGKILL in the middle loses no acknowledged
    row, duplicates none, and leaves no write in part."""
    server = request.getfixturevalue("server" if acknowledged == "after the commit" else "log_server")
    if not server.running():
        server.start()
    rng = np.random.default_rng(SEED + 3)
    with Client(server.address, retries=0, timeout=120) as client:
        client.create_collection("small", if_not_exists=True)
    acked: list[list[str]] = []
    in_doubt: list[list[str]] = []
    lock = threading.Lock()
    stop = threading.Event()

    def writer(w: int) -> None:
        with Client(server.address, retries=0, timeout=30) as c:
            col = c.collection("small")
            for k in range(10_000):
                if stop.is_set():
                    return
                ids = [f"w{w:02d}-{k:05d}-{j:02d}" for j in range(20)]
                try:
                    col.upsert({"id": ids, "w": [w] * 20})
                except AssayClientError:
                    with lock:
                        in_doubt.append(ids)
                    return
                with lock:
                    acked.append(ids)

    threads = [threading.Thread(target=writer, args=(w,), daemon=True) for w in range(16)]
    for t in threads:
        t.start()
    target = int(rng.integers(48, 160))
    deadline = time.monotonic() + 120
    while len(acked) < target:
        assert time.monotonic() < deadline, f"only {len(acked)} writes acknowledged"
        time.sleep(0.01)
    time.sleep(float(rng.uniform(0.0, 0.3)))
    server.kill()
    stop.set()
    for t in threads:
        t.join(timeout=60)
    opened = _tables_open(server.data)
    with _restart(server) as c:
        ids = c.collection("small").query(columns=["id"]).column("id").to_pylist()
    present = set(ids)
    assert len(ids) == len(present), "an id is stored twice"
    if acknowledged == "after the commit":
        assert len(ids) == opened["small"]
    else:  # the restart applied what the log held beyond the table
        assert opened["small"] <= len(ids)
    missing = [i for batch in acked for i in batch if i not in present]
    assert not missing, f"{len(missing)} acknowledged rows lost, e.g. {missing[:3]}"
    for batch in in_doubt:
        landed = sum(i in present for i in batch)
        assert landed in (0, len(batch)), f"a write in flight landed in part: {landed} of {len(batch)}"
    assert len(ids) == 20 * len(acked) + sum(len(b) for b in in_doubt if b[0] in present)
    replayed = [line for line in server.log_tail(400).splitlines() if "from the write log before the last stop" in line]
    print(f"{len(acked)} small writes acknowledged before the kill, {len(in_doubt)} in flight; {replayed}")
