"""The gRPC service end to end: a real server on a loopback port, driven by the client."""

from __future__ import annotations

import datetime as dt
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.request

import grpc
import numpy as np
import pyarrow as pa
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from indexing.settings import UPSERT_WINDOW
from protos.assay.v1 import common_pb2, search_pb2, search_pb2_grpc
from service.client import (
    AlreadyExistsError,
    AssayClientError,
    Client,
    DeadlineExceededError,
    FailedPreconditionError,
    InvalidArgumentError,
    NotFoundError,
    ResourceExhaustedError,
    UnauthenticatedError,
)
from service.jobs import JobKind
from service.server import ServerConfig, start_server


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    srv = start_server(ServerConfig(data=str(tmp_path_factory.mktemp("svc")), port=0, grace_s=2,
                                    metrics_port=0))
    yield srv
    srv.stop(1)


@pytest.fixture
def client(server):
    with Client(server.address, timeout=60) as c:
        yield c


def _vectors(n: int, dim: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, dim)).astype(np.float32)


def _fresh(client: Client, name: str, **kw):
    if name in client.list_collections():
        client.drop_collection(name)
    return client.create_collection(name, **kw)


def test_collections_lifecycle(client):
    col = _fresh(client, "life", spaces={"clip": 8}, models={"m1": ["cat", "dog"]})
    assert "life" in client.list_collections()
    desc = col.describe()
    assert desc["name"] == "life" and desc["spaces"][0]["spec"]["dim"] == 8
    assert desc["models"][0]["classes"] == ["cat", "dog"]
    with pytest.raises(AlreadyExistsError):
        client.create_collection("life")
    assert client.create_collection("life", if_not_exists=True).describe()["name"] == "life"
    col.add_space("text", dim=4, metric="l2")
    col.add_model("m2", classes=["a", "b", "c"])
    desc = col.describe()
    assert {s["spec"]["name"] for s in desc["spaces"]} == {"clip", "text"}
    assert {m["name"] for m in desc["models"]} == {"m1", "m2"}
    with pytest.raises(AlreadyExistsError):
        col.add_space("text", dim=4)
    with pytest.raises(InvalidArgumentError, match="collection name"):
        client.create_collection("../escape")
    client.drop_collection("life")
    with pytest.raises(NotFoundError, match="life"):
        client.collection("life").describe()
    with pytest.raises(NotFoundError):
        client.drop_collection("life")


def test_streaming_upsert_of_100k_rows(client):
    col = _fresh(client, "big", spaces={"v": {"dim": 16, "metric": "l2"}})
    n = 100_000
    x = _vectors(n, 16)
    table = pa.table({
        "id": [f"r{i}" for i in range(n)],
        "emb_v": pa.FixedSizeListArray.from_arrays(pa.array(x.ravel()), 16),
        "bucket": np.arange(n) % 10,
    })
    summary = col.upsert(table, batch_rows=10_000)
    assert summary.inserted == n and summary.updated == 0 and summary.batches == 10
    assert col.count() == n and col.count("bucket = 3") == n // 10
    again = col.upsert(table.slice(0, 1000).select(["id", "bucket"]))
    assert again.updated == 1000 and again.inserted == 0
    row = col.take(["r5"], columns=["id", "emb_v", "bucket"]).to_pylist()[0]
    np.testing.assert_allclose(row["emb_v"], x[5], rtol=1e-6)


def test_a_bad_batch_stops_the_stream_and_writes_nothing(client):
    col = _fresh(client, "bad", spaces={"v": 4})
    good = [{"id": f"g{i}", "emb_v": [1.0, 0.0, 0.0, float(i)]} for i in range(10)]
    col.upsert(good)
    version = col.describe()["version"]
    with pytest.raises(InvalidArgumentError) as err:
        col.upsert([{"id": "x", "emb_v": [1.0, float("nan"), 0.0, 0.0]}])
    assert "emb_v" in str(err.value) and "'x'" in str(err.value) and "NaN" in str(err.value)
    with pytest.raises(InvalidArgumentError, match="more than once"):
        col.upsert([{"id": "d"}, {"id": "d"}])
    with pytest.raises(NotFoundError):
        client.collection("nope").upsert(good)
    assert col.describe()["version"] == version and col.count() == 10


def _streamed_while_a_commit_runs(server, client, name, rows, batch_rows, fresh=True):
    """Upsert ``rows`` in one stream while the collection's commit slot is held (as a long
    commit or a compaction would): the first batch waits for the slot, the others are
    received and validated meanwhile (as many as the client keeps in flight:
    UPSERT_WINDOW). Returns (summary or error, fragments written)."""
    col = _fresh(client, name, spaces={"v": {"dim": 4, "metric": "l2"}}) if fresh else client.collection(name)
    stored = server.store.collection(name)
    validated = []
    prepare = stored.prepare
    stored.prepare = lambda data: (validated.append(1), prepare(data))[1]
    batches = -(-len(rows) // batch_rows)
    assert batches <= UPSERT_WINDOW, "more batches than the client sends unacknowledged"
    out = {}

    def send():
        try:
            out["summary"] = col.upsert(rows, batch_rows=batch_rows)
        except AssayClientError as exc:
            out["error"] = exc

    try:
        with stored._committer.slot:
            sender = threading.Thread(target=send)
            sender.start()
            deadline = time.monotonic() + 30
            while len(validated) < batches and "error" not in out:
                assert time.monotonic() < deadline, f"{len(validated)} of {batches} batches validated"
                time.sleep(0.01)
            time.sleep(0.2)  # the last one handed to the read-ahead buffer
        sender.join(30)
    finally:
        del stored.prepare
    return out.get("summary", out.get("error")), col.describe()["fragments"]


def test_a_streamed_upsert_commits_the_batches_that_arrived_meanwhile_together(client, server):
    n = 100 * UPSERT_WINDOW
    rows = [{"id": f"r{i}", "emb_v": [1.0, 0.0, 0.0, float(i)]} for i in range(n)]
    summary, fragments = _streamed_while_a_commit_runs(server, client, "ahead", rows, batch_rows=100)
    # batch 0 alone (it was waiting for the slot), then those that arrived meanwhile
    assert fragments == 2
    assert summary.batches == UPSERT_WINDOW and summary.inserted == n and summary.updated == 0
    col = client.collection("ahead")
    assert col.count() == n and len(set(col.query(columns=["id"]).column("id").to_pylist())) == n
    # ids repeated across the batches of one commit: the later row wins, counted as an update
    _streamed_while_a_commit_runs(server, client, "ahead2", rows[:100], batch_rows=100)
    again = [{"id": f"r{i % 100}", "emb_v": [0.0, 1.0, 0.0, float(i)]} for i in range(200)]
    summary, fragments = _streamed_while_a_commit_runs(server, client, "ahead2", again, batch_rows=50,
                                                       fresh=False)
    assert summary.batches == 4 and summary.inserted == 0 and summary.updated == 200
    stored = client.collection("ahead2").query(columns=["id", "emb_v"])
    assert {r["id"]: r["emb_v"] for r in stored.to_pylist()} == {
        f"r{i}": [0.0, 1.0, 0.0, float(100 + i)] for i in range(100)}


def test_a_bad_batch_in_a_stream_fails_after_the_batches_before_it_commit(client, server):
    rows = [{"id": f"r{i}", "emb_v": [1.0, 0.0, 0.0, float(i)]} for i in range(400)]
    rows[350]["emb_v"] = [1.0, float("nan"), 0.0, 0.0]
    err, fragments = _streamed_while_a_commit_runs(server, client, "ahead_bad", rows, batch_rows=100)
    assert isinstance(err, InvalidArgumentError)
    assert "batch 3" in str(err) and "'r350'" in str(err) and "NaN" in str(err)
    assert err.details["committed"].batches == 3 and err.details["committed"].inserted == 300
    col = client.collection("ahead_bad")
    assert col.count() == 300 and col.count("id = 'r299'") == 1 and fragments == 2


def test_batch_search_equals_brute_force(client):
    n, dim = 2000, 16
    x = _vectors(n, dim, seed=1)
    col = _fresh(client, "knn", spaces={"v": {"dim": dim, "metric": "l2"}})
    col.upsert({"id": [f"r{i}" for i in range(n)], "emb_v": x, "odd": (np.arange(n) % 2).astype(bool)})
    queries = _vectors(8, dim, seed=2)
    res = col.search(space="v", vector=queries, k=5, where="odd", columns=["id"])
    dist = ((queries[:, None, :].astype(np.float64) - x[None].astype(np.float64)) ** 2).sum(-1)
    dist[:, np.arange(n) % 2 == 0] = np.inf
    for qi in range(len(queries)):
        got = res.filter(pa.compute.equal(res["query_index"], qi))
        want = np.argsort(dist[qi])[:5]
        assert got["id"].to_pylist() == [f"r{i}" for i in want]
        np.testing.assert_allclose(got["_distance"].to_numpy(), dist[qi][want], rtol=1e-4)
    single = col.search(space="v", vector=queries[0], k=5, where="odd", columns=["id"])
    assert "query_index" not in single.column_names
    assert single["id"].to_pylist() == res["id"].to_pylist()[:5]
    by_id = col.search(space="v", ids=["r1", "r3"], k=4, columns=["id"])
    for qi, own in enumerate(["r1", "r3"]):
        ids = by_id.filter(pa.compute.equal(by_id["query_index"], qi))["id"].to_pylist()
        assert len(ids) == 4 and own not in ids
        want = np.argsort(((x.astype(np.float64) - x[int(own[1:])]) ** 2).sum(-1))[1:5]
        assert ids == [f"r{i}" for i in want]
    with pytest.raises(InvalidArgumentError, match="dimension"):
        col.search(space="v", vector=np.ones(3), k=5)
    with pytest.raises(InvalidArgumentError, match="filter"):
        col.search(space="v", vector=queries[0], where="nope = 1")
    with pytest.raises(NotFoundError, match="space 'w'"):
        col.search(space="w", vector=queries[0])
    with pytest.raises(NotFoundError, match="ids not found"):
        col.search(space="v", ids=["missing"])
    with pytest.raises(ResourceExhaustedError, match="max_k"):
        col.search(space="v", vector=queries[0], k=20_000)
    with pytest.raises(FailedPreconditionError, match="no text embedder"):
        col.search(space="v", text="a digit")


def test_search_by_text_uses_the_space_embedder(client):
    from indexing.embedders import TextEmbedder
    from indexing.samples import TEXT_CORPUS, text_table

    embedder = TextEmbedder()
    col = _fresh(client, "texts", spaces={"minilm": {"dim": 384, "model": embedder.identity}})
    col.upsert(text_table(embedder, space="minilm"))
    res = col.search(space="minilm", text="what temperature should the oven be for roasting?", k=3,
                     columns=["id", "topic"])
    assert res["topic"].to_pylist()[0] == "cooking"
    expected = col.search(space="minilm", vector=embedder.embed(["what temperature should the oven be for "
                                                                 "roasting?"])[0], k=3, columns=["id"])
    assert res["id"].to_pylist() == expected["id"].to_pylist()
    assert col.count() == len(TEXT_CORPUS)


def test_query_scan_count_take_delete(client):
    col = _fresh(client, "rows")
    col.upsert([{"id": f"r{i:03d}", "n": i, "label": "a" if i % 3 else None, "tags": ["t"] if i % 2 else []}
                for i in range(250)])
    assert col.count() == 250 and col.count("label IS NULL") == 84
    assert col.count("array_has_any(tags, ['t'])") == 125
    table = col.query(where="n >= 100 AND (label = 'a' OR n < 110)", columns=["id", "n"], page_rows=16)
    assert sorted(table["n"].to_pylist()) == [i for i in range(100, 250) if i % 3 or i < 110]
    pages = list(col.scan(where="n < 100", columns=["id"], page_rows=30))
    assert sum(p.num_rows for p in pages) == 100 and all(p.num_rows <= 30 for p in pages)
    nothing = col.query(where="n > 10000", columns=["id", "n"])
    assert nothing.num_rows == 0 and nothing.column_names == ["id", "n"]
    limited = col.query(columns=["id"], limit=7, offset=3)
    assert limited.num_rows == 7
    taken = col.take(["r010", "missing", "r002"], columns=["id", "n"])
    assert taken.to_pylist() == [{"id": "r010", "n": 10}, {"id": "r002", "n": 2}]
    assert col.delete(ids=["r000", "r001"]) == 2
    assert col.delete(where="n >= 200") == 50
    assert col.count() == 198
    with pytest.raises(InvalidArgumentError, match="unknown column"):
        col.query(columns=["nope"])
    with pytest.raises(InvalidArgumentError, match="';'"):
        col.delete(where="n = 1; DROP TABLE rows")
    assert col.count() == 198


def test_jobs_optimize_index_recall_and_failures(client):
    col = _fresh(client, "jobs", spaces={"v": {"dim": 8, "metric": "l2", "index": {"threshold_rows": 1000}}})
    for s in range(0, 3000, 500):
        col.upsert({"id": [f"r{i}" for i in range(s, s + 500)], "emb_v": _vectors(500, 8, seed=s)})
    job = col.optimize().wait(timeout=120)
    assert job.state == "SUCCEEDED" and job.result["indexes_built"] == ["v"]
    assert job.result["fragments_after"] < job.result["fragments_before"]
    recall = col.recall_check("v", queries=20).wait(timeout=120)
    assert recall.state == "SUCCEEDED" and recall.result["recall"] >= 0.95
    rebuilt = col.build_index("v", kind="ivf_flat").wait(timeout=120)
    assert rebuilt.result == {"space": "v", "kind": "ivf_flat"}
    listed = client.list_jobs(collection="jobs")
    assert {j.kind for j in listed} >= {"optimize", "recall_check", "build_index"}
    assert all(j.state == "SUCCEEDED" for j in listed)
    # Bad parameters are rejected when the job is started, not when it runs.
    with pytest.raises(NotFoundError, match="space 'nope'"):
        col.build_index("nope")
    with pytest.raises(InvalidArgumentError, match="unknown job kind"):
        client.start_job("defragment", "jobs", {})
    with pytest.raises(InvalidArgumentError, match="queries"):
        client.start_job("recall_check", "jobs", {"space": "v", "queries": -1})
    # A job that fails while running reports its status code.
    small = _fresh(client, "tiny", spaces={"v": 4})
    small.upsert([{"id": "a", "emb_v": [1.0, 0.0, 0.0, 0.0]}])
    with pytest.raises(AssayClientError) as err:
        small.build_index("v").wait(timeout=60)
    assert err.value.code == "FAILED_PRECONDITION" and "256" in str(err.value)
    with pytest.raises(NotFoundError):
        client.job("no-such-job")


def test_watch_progress_and_cancel_a_running_job(server, client):
    def slow(ctx, col, params):
        for i in range(200):
            ctx.check()
            ctx.progress(i / 200, f"step {i}")
            time.sleep(0.02)
        return {"steps": 200}

    server.jobs.register("slow_test_job", JobKind(run=slow))
    _fresh(client, "slow")
    job = client.start_job("slow_test_job", "slow", {})
    seen = []
    for update in job.watch():
        seen.append(update.progress)
        if update.progress > 0.1:
            break
    assert seen == sorted(seen) and seen[-1] > 0.1
    job.cancel()
    final = job.refresh()
    deadline = time.time() + 10
    while final.state not in ("CANCELLED", "SUCCEEDED") and time.time() < deadline:
        time.sleep(0.05)
        final = job.refresh()
    assert final.state == "CANCELLED"
    with pytest.raises(AssayClientError) as err:
        job.wait(timeout=5)
    assert err.value.code == "CANCELLED"


def test_deadline_and_cancellation(client):
    col = _fresh(client, "dl")
    col.upsert([{"id": f"r{i}", "n": i} for i in range(5000)])
    with pytest.raises(DeadlineExceededError):
        col.query(columns=["id", "n"], page_rows=1, timeout=0.001)
    pages = col.scan(columns=["id"], page_rows=10)
    first = next(pages)
    assert first.num_rows == 10
    pages.close()  # cancels the stream
    assert col.count() == 5000  # the server is fine


def _each_in_a_thread(worker, n: int) -> list[BaseException]:
    """Run ``worker(0..n-1)`` in ``n`` threads at once; what they raised, for the test to assert."""
    errors: list[BaseException] = []

    def run(w: int) -> None:
        try:
            worker(w)
        except BaseException as exc:  # noqa: BLE001 — returned to the test
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(w,)) for w in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return errors


def test_eight_threads_mixing_search_and_upsert(server):
    with Client(server.address) as setup:
        col = _fresh(setup, "mixed", spaces={"v": {"dim": 8, "metric": "l2"}})
        col.upsert({"id": [f"base{i}" for i in range(500)], "emb_v": _vectors(500, 8)})

    def worker(w: int) -> None:
        with Client(server.address) as c:
            wc = c.collection("mixed")
            for r in range(10):
                if (w + r) % 2:
                    wc.upsert({"id": [f"w{w}-{r}-{i}" for i in range(20)], "emb_v": _vectors(20, 8, seed=w * 100 + r)})
                else:
                    res = wc.search(space="v", vector=_vectors(1, 8, seed=r)[0], k=5, columns=["id"])
                    assert res.num_rows == 5

    assert _each_in_a_thread(worker, 8) == []
    with Client(server.address) as c:
        assert c.collection("mixed").count() == 500 + 8 * 5 * 20


def _metric(server, sample: str) -> float:
    """The value of one sample (``name{labels}``) of the server's Prometheus metrics; 0 if absent."""
    body = urllib.request.urlopen(f"http://127.0.0.1:{server.metrics_port}/metrics", timeout=10).read().decode()
    head = sample + " "
    return next((float(ln[len(head):]) for ln in body.splitlines() if ln.startswith(head)), 0.0)


def _ok_calls(server, method: str) -> float:
    """How many calls of ``method`` the server answered OK (its Prometheus counter)."""
    return _metric(server, f'assay_rpc_requests_total{{code="OK",method="{method}"}}')


def test_a_one_batch_upsert_is_one_unary_call_that_answers_like_the_stream(server, client):
    from protos.assay.v1 import ingest_pb2

    col = _fresh(client, "unary", spaces={"clip": 4})
    unary, stream = _ok_calls(server, "UpsertBatch"), _ok_calls(server, "Upsert")
    s = col.upsert({"id": [f"u{i}" for i in range(10)], "emb_clip": _vectors(10, 4), "n": list(range(10))})
    assert (s.inserted, s.updated, s.batches, s.rows) == (10, 0, 1, 10)
    s = col.upsert({"id": ["u0", "new"], "n": [100, 7]})  # one update (vector kept), one insert
    assert (s.inserted, s.updated) == (1, 1)
    s = col.upsert([{"n": 5}, {"n": 6}])  # no ids: the server assigns them
    assert len(s.assigned_ids) == 2 and s.assigned_rows == [0, 1]
    assert _ok_calls(server, "UpsertBatch") == unary + 3 and _ok_calls(server, "Upsert") == stream
    # Several batches, or an iterator (never read ahead of the stream): a stream, as before.
    assert col.upsert({"id": [f"m{i}" for i in range(9)], "n": list(range(9))}, batch_rows=4).batches == 3
    assert col.upsert(iter([pa.table({"id": ["it"], "n": [1]})])).inserted == 1
    assert _ok_calls(server, "Upsert") == stream + 2 and _ok_calls(server, "UpsertBatch") == unary + 3
    rows = {r["id"]: r for r in col.query(None, ["id", "n", "emb_clip"], limit=None).to_pylist()}
    assert len(rows) == 10 + 1 + 2 + 9 + 1 and rows["u0"]["n"] == 100 and rows["new"]["n"] == 7
    kept = _vectors(10, 4)[0]
    assert np.allclose(rows["u0"]["emb_clip"], kept / np.linalg.norm(kept))  # a cosine space stores unit vectors
    assert {rows[i]["n"] for i in s.assigned_ids} == {5, 6}

    # A bad batch fails as it does in a stream, naming the batch, column and row; nothing written.
    version = col.describe()["version"]
    bad = _vectors(3, 4)
    bad[1, 2] = np.nan
    with pytest.raises(InvalidArgumentError, match=r"batch 0: .*emb_clip.*row 1"):
        col.upsert({"id": ["b0", "b1", "b2"], "emb_clip": bad})
    assert col.describe()["version"] == version and col.count() == 23
    with grpc.insecure_channel(server.address) as ch:
        call = ch.unary_unary("/assay.v1.Ingest/UpsertBatch",
                              request_serializer=ingest_pb2.UpsertRequest.SerializeToString,
                              response_deserializer=ingest_pb2.UpsertAck.FromString)
        with pytest.raises(grpc.RpcError) as info:
            call(ingest_pb2.UpsertRequest(seq=7, arrow_ipc=b""), timeout=30)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "must name the collection" in info.value.details()

    # Concurrent one-batch writers (their writes queue for the same commits) each get their own
    # counts, and every row is there once.
    counts: dict[int, tuple[int, int]] = {}

    def write(k: int) -> None:
        got = col.upsert({"id": [f"c{k}-{i}" for i in range(5)] + [f"u{k}"], "n": [k] * 6})
        counts[k] = (got.inserted, got.updated)

    assert _each_in_a_thread(write, 8) == []
    assert counts == {k: (5, 1) for k in range(8)}
    assert col.count() == 23 + 8 * 5 and col.count("n < 8 AND id LIKE 'u%'") == 8
    assert _ok_calls(server, "UpsertBatch") == unary + 3 + 8


def _group_commit_metric(server, name: str, collection: str) -> float:
    return _metric(server, f'{name}{{collection="{collection}"}}')


def test_the_metrics_count_group_commits_and_the_writes_they_held(server):
    with Client(server.address) as setup:
        col = _fresh(setup, "grouped", spaces={"v": 4})
        col.upsert({"id": ["seed"], "emb_v": _vectors(1, 4)})
    commits0 = _group_commit_metric(server, "assay_group_commits_total", "grouped")
    writes0 = _group_commit_metric(server, "assay_group_commit_writes_total", "grouped")
    assert commits0 >= 1 and writes0 == commits0  # the seed: one write, one commit

    def writer(w: int) -> None:
        with Client(server.address) as c:
            wc = c.collection("grouped")
            for r in range(6):  # one-batch upserts, each sent again as soon as it is answered
                wc.upsert({"id": [f"w{w}-{r}-{i}" for i in range(5)], "emb_v": _vectors(5, 4, seed=w * 10 + r)})

    assert _each_in_a_thread(writer, 8) == []
    writes = _group_commit_metric(server, "assay_group_commit_writes_total", "grouped") - writes0
    commits = _group_commit_metric(server, "assay_group_commits_total", "grouped") - commits0
    assert writes == 48 and 1 <= commits < writes  # concurrent writers shared commits
    lingers = _group_commit_metric(server, "assay_group_commit_lingers_total", "grouped")
    waited = _group_commit_metric(server, "assay_group_commit_linger_seconds_total", "grouped")
    assert lingers >= 1 and 0 < waited <= lingers * (0.1 + 0.05)  # GROUP_COMMIT_LINGER_S (+ waking up) bounds each
    with Client(server.address) as c:
        assert c.collection("grouped").count() == 1 + 48 * 5


def test_the_metrics_show_the_memory_the_store_holds_and_the_process_rss(server):
    with Client(server.address) as c:
        col = _fresh(c, "held", spaces={"v": 4})
        col.upsert({"id": [f"h{i}" for i in range(50)], "emb_v": _vectors(50, 4, seed=3)})
        assert col.search("v", _vectors(1, 4, seed=4)[0], k=3).num_rows == 3  # exact search holds the vectors

    def holder(name: str) -> float:
        return _metric(server, f'assay_memory_bytes{{holder="{name}"}}')

    # the server is shared by this module's tests: compactions of their collections (which
    # change LanceDB's cache) must end before the store's figures and the scrape are compared
    assert server.store.maintainer.wait_idle(60)
    held = server.store.memory_held()
    assert set(held) == {"lance_collections", "lance_system", "flat_vectors", "live_rows", "fragment_values",
                         "id_indexes"}
    for name, value in held.items():
        assert holder(name) == value, name
    # 50 vectors of 4 float32, their squared norms and validity: 21 bytes a row at least
    assert held["flat_vectors"] >= 50 * 21
    assert held["id_indexes"] >= 50 * 16  # the upsert's existence check built the id index
    assert held["lance_collections"] > 0 and held["lance_system"] > 0
    with open("/proc/self/statm") as fh:  # the server runs in this process
        rss = int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    assert 0.5 * rss < _metric(server, "process_resident_memory_bytes") < 2 * rss


def test_health_reflection_and_metrics(server, client):
    assert client.health() == "SERVING"
    with grpc.insecure_channel(server.address) as ch:
        resp = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service="assay.v1.Search"))
        assert resp.status == health_pb2.HealthCheckResponse.SERVING
        stub = reflection_pb2_grpc.ServerReflectionStub(ch)
        answer = next(stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")])))
        names = {s.name for s in answer.list_services_response.service}
        assert {"assay.v1.Collections", "assay.v1.Ingest", "assay.v1.Search", "assay.v1.Query",
                "assay.v1.Jobs", "grpc.health.v1.Health"} <= names
    client.list_collections()
    body = urllib.request.urlopen(f"http://127.0.0.1:{server.metrics_port}/metrics", timeout=10).read().decode()
    assert 'assay_rpc_requests_total{code="OK",method="ListCollections"}' in body
    assert "assay_rpc_latency_seconds_bucket" in body


def test_token_auth(tmp_path):
    srv = start_server(ServerConfig(data=str(tmp_path), port=0, tokens=("s3cret", "other"), grace_s=1))
    try:
        with Client(srv.address) as anonymous, pytest.raises(UnauthenticatedError, match="token"):
            anonymous.list_collections()
        with Client(srv.address, token="wrong") as wrong, pytest.raises(UnauthenticatedError):
            wrong.list_collections()
        with Client(srv.address, token="s3cret") as ok:
            ok.create_collection("x")
            assert ok.list_collections() == ["x"]
        with Client(srv.address, token="other") as ok2:
            assert ok2.list_collections() == ["x"]
        with Client(srv.address) as anonymous:
            assert anonymous.health() == "SERVING"  # health stays open
    finally:
        srv.stop(1)


def _self_signed(tmp_path):
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = dt.datetime.now(dt.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - dt.timedelta(minutes=1))
            .not_valid_after(now + dt.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost")]), critical=False)
            .sign(key, hashes.SHA256()))
    cert_path, key_path = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return cert_path, key_path


def test_tls_with_a_self_signed_certificate(tmp_path):
    cert, key = _self_signed(tmp_path)
    srv = start_server(ServerConfig(data=str(tmp_path / "d"), host="localhost", port=0, tls_cert=str(cert),
                                    tls_key=str(key), tokens=("t",), grace_s=1))
    try:
        with Client(f"localhost:{srv.port}", token="t", tls=True, root_certificates=cert.read_bytes()) as c:
            c.create_collection("secure")
            assert c.list_collections() == ["secure"]
        with Client(f"localhost:{srv.port}", token="t", timeout=2, retries=0) as plain, \
                pytest.raises(AssayClientError):
            plain.list_collections()
    finally:
        srv.stop(1)


def test_graceful_shutdown_with_a_job_in_flight_and_restart(tmp_path):
    data = str(tmp_path)
    srv = start_server(ServerConfig(data=data, port=0, grace_s=1))
    started = threading.Event()

    def stubborn(ctx, col, params):
        started.set()
        while True:  # ends only when cancelled
            ctx.check()
            time.sleep(0.02)

    srv.jobs.register("stubborn_test_job", JobKind(run=stubborn))
    with Client(srv.address) as c:
        c.create_collection("g")
        job = c.start_job("stubborn_test_job", "g", {})
        assert started.wait(10)
    srv.stop()  # grace 1 s: the job is let run for half of it, then cancelled
    assert srv.jobs.get(job.id).state == "CANCELLED"
    again = start_server(ServerConfig(data=data, port=0, grace_s=1))
    try:
        with Client(again.address) as c:
            assert c.job(job.id).state == "CANCELLED"  # the record outlived the process
    finally:
        again.stop(1)


def _serve(data: str, *extra: str) -> tuple[subprocess.Popen, str]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "service.cli", "serve", "--data", data, "--port", "0", "--log-format", "text", *extra],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=os.path.dirname(os.path.dirname(__file__)),
    )
    line = proc.stdout.readline()
    assert line.startswith("assay listening on "), (line, proc.stderr.read() if proc.poll() is not None else "")
    return proc, line.strip().rsplit(" ", 1)[1]


def test_serve_command_restart_reports_interrupted_jobs(tmp_path):
    data = str(tmp_path)
    proc, address = _serve(data)
    try:
        with Client(address) as c:
            col = c.create_collection("crash", spaces={"v": {"dim": 64, "metric": "l2"}})
            col.upsert({"id": [f"r{i}" for i in range(30_000)], "emb_v": _vectors(30_000, 64)}, batch_rows=10_000)
            job = col.build_index("v", kind="ivf_hnsw_sq")
            deadline = time.time() + 30
            while job.refresh().state != "RUNNING" and time.time() < deadline:
                time.sleep(0.02)
            assert job.state == "RUNNING"
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    proc, address = _serve(data)
    try:
        with Client(address) as c:
            rec = c.job(job.id)
            assert rec.state == "INTERRUPTED" and "start it again" in rec.message
            assert c.collection("crash").count() == 30_000
    finally:
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    assert '"shutting down' in err or "shutting down" in err


def test_without_a_token_the_server_stays_on_loopback(tmp_path):
    proc, address = _serve(str(tmp_path), "--host", "0.0.0.0")
    try:
        assert address.startswith("127.0.0.1:")
        with Client(address) as c:
            assert c.list_collections() == []
    finally:
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    assert "binding to 127.0.0.1 instead of 0.0.0.0" in err


def test_generated_protos_match_the_proto_files():
    result = subprocess.run([sys.executable, "-m", "protos.generate", "--check"], capture_output=True, text=True,
                            cwd=os.path.dirname(os.path.dirname(__file__)))
    assert result.returncode == 0, result.stdout + result.stderr


def test_search_response_carries_the_version_it_read(server, client):
    col = _fresh(client, "readver", spaces={"v": 4})
    col.upsert({"id": ["a", "b"], "emb_v": [[1, 0, 0, 0], [0, 1, 0, 0]]})
    written = col.upsert({"id": ["c"], "emb_v": [[0, 0, 1, 0]]}).version
    with grpc.insecure_channel(server.address) as ch:
        resp = search_pb2_grpc.SearchStub(ch).Search(search_pb2.SearchRequest(
            collection="readver", space="v", k=3, vectors=common_pb2.Vectors(dim=4, values=[0, 0, 1, 0])))
    assert resp.version == written and resp.queries == 1
