"""The bad-input catalogue: hostile and malformed requests to every RPC of a real server.

Each case is one request, sent through the Python client where it can express it and
through the raw stubs where the client would refuse it first (payloads the client never
builds: invalid UTF-8 inside Arrow IPC, inconsistent buffers, oversized messages, fields
out of range). Each asserts the status code, a message that names the problem, and that
no table under the data root — collections and assay's own tables — changed version: a
refused request writes nothing.

The server runs with small limits (max_k 100, 500 rows per batch and id list, 10000 rows
per page, 1 MB messages, 3 queued jobs) so that the limits are cheap to reach; the last
tests check each limit answers RESOURCE_EXHAUSTED and names it.
"""

from __future__ import annotations

import re
import struct
import threading
import time
from collections.abc import Callable
from types import SimpleNamespace
from typing import Any

import grpc
import numpy as np
import pyarrow as pa
import pytest
from google.protobuf import struct_pb2

from protos.assay.v1 import (
    collections_pb2,
    collections_pb2_grpc,
    common_pb2,
    datasets_pb2,
    datasets_pb2_grpc,
    ingest_pb2,
    ingest_pb2_grpc,
    jobs_pb2,
    jobs_pb2_grpc,
    mining_pb2,
    mining_pb2_grpc,
    query_pb2,
    query_pb2_grpc,
    search_pb2,
    search_pb2_grpc,
)
from service.arrow_ipc import table_to_ipc
from service.client import AssayClientError, Client
from service.jobs import JobKind
from service.server import ServerConfig, start_server
from service.servicers import Limits

N = 60
LIMITS = Limits(max_k=100, max_batch_rows=500, max_page_rows=10_000)
MAX_MESSAGE_MB = 1
MAX_JOBS = 3  # one is the fixture's parked job


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """One server with small limits, two collections, a finished mining run and a dataset
    with one commit; raw stubs on a channel that lets oversized messages out."""
    srv = start_server(ServerConfig(
        data=str(tmp_path_factory.mktemp("bad-input")), port=0, grace_s=1, optimize_every=0,
        max_message_mb=MAX_MESSAGE_MB, max_jobs=MAX_JOBS, job_workers=MAX_JOBS, limits=LIMITS))
    client = Client(srv.address, retries=0, timeout=60, max_message_bytes=8 << 20)
    rng = np.random.default_rng(0)
    pool = client.create_collection("pool", spaces={"v": 4, "w": {"dim": 3, "metric": "l2"}},
                                    models={"m": ["a", "b", "c"]})
    probs = rng.dirichlet(np.ones(3), N)
    pool.upsert({
        "id": [f"r{i:03d}" for i in range(N)],
        "label": [None if i % 3 else "abc"[i % 9 // 3] for i in range(N)],
        "split": ["train" if i % 2 else "pool" for i in range(N)],
        "n": list(range(N)),
        "text": [f"item {i}" for i in range(N)],
        "emb_v": rng.standard_normal((N, 4)).astype(np.float32),
        "emb_w": rng.standard_normal((N, 3)).astype(np.float32),
        "pred_m": [{"probs": (p / p.sum()).tolist()} for p in probs],
    })
    other = client.create_collection("other", spaces={"v": 4})
    other.upsert({"id": ["o1", "o2"], "emb_v": rng.standard_normal((2, 4)).astype(np.float32)})
    job = pool.mine("margin", 5, model="m").wait(timeout=120)
    assert job.state == "SUCCEEDED", job.error
    ds = client.create_dataset("ds", "pool")
    ds.add(ids=["r001", "r002"])
    ds.commit("first")
    # A job that runs until the module ends: something to watch past a deadline.
    parked_release = threading.Event()
    srv.jobs.register("parked_test_job", JobKind(run=lambda ctx, col, params: _park(ctx, parked_release)))
    parked = client.start_job("parked_test_job", "other")
    _wait_state(parked, "RUNNING")
    for name in ("pool", "other"):
        srv.store.collection(name).wait_for_maintenance(30)
    settled_versions(srv)
    channel = grpc.insecure_channel(srv.address, options=[
        ("grpc.max_send_message_length", 8 << 20), ("grpc.max_receive_message_length", 8 << 20)])
    yield SimpleNamespace(
        server=srv, client=client, pool=pool, run_id=job.run_id, ds=ds, parked=parked,
        collections=collections_pb2_grpc.CollectionsStub(channel),
        ingest=ingest_pb2_grpc.IngestStub(channel), search=search_pb2_grpc.SearchStub(channel),
        query=query_pb2_grpc.QueryStub(channel), jobs=jobs_pb2_grpc.JobsStub(channel),
        mining=mining_pb2_grpc.MiningStub(channel), datasets=datasets_pb2_grpc.DatasetsStub(channel),
    )
    parked_release.set()
    parked.wait(timeout=30)
    channel.close()
    client.close()
    srv.stop(1)


def _park(ctx, release: threading.Event) -> dict:
    while not release.wait(0.05):
        ctx.check()
    return {}


def _wait_state(job, state: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while job.refresh().state != state:
        assert time.monotonic() < deadline, job.state
        time.sleep(0.02)


def versions(srv) -> dict[str, int]:
    """The version of every table under the data root (collections and assay's own)."""
    db = srv.store._db
    return {name: db.open_table(name).version for name in srv.store._table_names()}


def settled_versions(srv, quiet_s: float = 0.3, timeout: float = 30) -> dict[str, int]:
    """versions() once no table has changed for ``quiet_s`` (jobs persist their records
    just after their state changes in memory)."""
    deadline = time.monotonic() + timeout
    last = versions(srv)
    while True:
        time.sleep(quiet_s)
        now = versions(srv)
        if now == last or time.monotonic() > deadline:
            return now
        last = now


def status_of(exc: BaseException) -> tuple[str, str]:
    if isinstance(exc, AssayClientError):
        return exc.code, exc.message
    if isinstance(exc, grpc.RpcError):
        return exc.code().name, exc.details() or ""
    raise AssertionError(f"not a status: {type(exc).__name__}: {exc}") from exc


# -- request builders ----------------------------------------------------------------------

def _struct(d: dict[str, Any]) -> struct_pb2.Struct:
    s = struct_pb2.Struct()
    s.update(d)
    return s


def _upsert_raw(e, payload: bytes | pa.Table, collection: str = "pool") -> list:
    ipc = payload if isinstance(payload, bytes) else table_to_ipc(payload)
    request = ingest_pb2.UpsertRequest(collection=collection, seq=0, arrow_ipc=ipc)
    return list(e.ingest.Upsert(iter([request]), timeout=30))


def _bad_utf8(values: list[bytes]) -> pa.Array:
    """A string array holding raw bytes: pyarrow does not check UTF-8 when built from buffers."""
    offsets = np.cumsum([0, *map(len, values)]).astype(np.int32)
    return pa.Array.from_buffers(pa.string(), len(values),
                                 [None, pa.py_buffer(offsets.tobytes()), pa.py_buffer(b"".join(values))])


def _broken_offsets(last: int) -> bytes:
    """Arrow IPC whose id column's last offset points outside its data buffer (patched in the
    serialised bytes: no Arrow writer produces it)."""
    data = table_to_ipc(pa.table({"id": ["ab", "cd"], "n": [1, 2]}))
    good = struct.pack("<3i", 0, 2, 4)
    assert data.count(good) == 1
    return data.replace(good, struct.pack("<3i", 0, 2, last))


def _vectors(values: list[float], dim: int) -> common_pb2.Vectors:
    return common_pb2.Vectors(dim=dim, values=values)


def _search_raw(e, **kw):
    kw.setdefault("collection", "pool")
    kw.setdefault("space", "v")
    return e.search.Search(search_pb2.SearchRequest(**kw), timeout=30)


def _count(e, where: str):
    return e.pool.count(where)


def _deadline_upsert(e):
    def requests():
        time.sleep(0.6)  # past the deadline before the first batch leaves
        yield ingest_pb2.UpsertRequest(collection="pool", arrow_ipc=table_to_ipc(pa.table({"id": ["late"]})))

    return list(e.ingest.Upsert(requests(), timeout=0.2))


def _cancelled_upsert(e):
    release = threading.Event()

    def requests():
        release.wait(5)
        yield ingest_pb2.UpsertRequest(collection="pool", arrow_ipc=table_to_ipc(pa.table({"id": ["gone"]})))

    call = e.ingest.Upsert(requests(), timeout=30)
    timer = threading.Timer(0.2, call.cancel)
    timer.start()
    try:
        return list(call)
    finally:
        release.set()
        timer.join()


def _cancelled_scan(e):
    call = e.query.Scan(query_pb2.ScanRequest(collection="pool", page_rows=5), timeout=30)
    next(call)
    call.cancel()
    return list(call)


V4 = [1.0, 0.0, 0.0, 0.0]
Case = tuple[str, Callable[[Any], Any], str, str]

CASES: list[Case] = [
    # -- Collections ------------------------------------------------------------------------
    ("create-path-dotdot", lambda e: e.client.create_collection("../x"),
     "INVALID_ARGUMENT", r"collection name '\.\./x' is invalid.*no paths"),
    ("create-absolute-path", lambda e: e.collections.CreateCollection(
        collections_pb2.CreateCollectionRequest(collection="/etc/passwd")),
     "INVALID_ARGUMENT", r"collection name '/etc/passwd' is invalid"),
    ("describe-path", lambda e: e.client.collection("pool/../../etc").describe(),
     "INVALID_ARGUMENT", r"collection name 'pool/\.\./\.\./etc' is invalid"),
    ("drop-system-table", lambda e: e.client.drop_collection("_jobs"),
     "INVALID_ARGUMENT", r"collection name '_jobs' is invalid"),
    ("describe-unknown", lambda e: e.client.collection("nope").describe(),
     "NOT_FOUND", r"collection 'nope' not found"),
    ("create-existing", lambda e: e.client.create_collection("pool"),
     "ALREADY_EXISTS", r"collection 'pool' already exists"),
    ("create-duplicate-space", lambda e: e.collections.CreateCollection(collections_pb2.CreateCollectionRequest(
        collection="dup", spaces=[common_pb2.SpaceSpec(name="v", dim=4), common_pb2.SpaceSpec(name="v", dim=8)])),
     "INVALID_ARGUMENT", r"space name\(s\) given more than once: v"),
    ("create-dim-zero", lambda e: e.client.create_collection("z", spaces={"v": 0}),
     "INVALID_ARGUMENT", r"space 'v': dim must be an integer in \[1, 65536\], got 0"),
    ("create-dim-huge", lambda e: e.collections.CreateCollection(collections_pb2.CreateCollectionRequest(
        collection="z", spaces=[common_pb2.SpaceSpec(name="v", dim=2**31)])),
     "INVALID_ARGUMENT", r"dim must be an integer in \[1, 65536\], got 2147483648"),
    ("create-unknown-metric", lambda e: e.client.create_collection("z", spaces={"v": {"dim": 4, "metric": "evil"}}),
     "INVALID_ARGUMENT", r"metric 'evil' is not one of cosine, l2, dot"),
    ("create-unknown-field-type", lambda e: e.client.create_collection("z", fields={"f": "blob"}),
     "INVALID_ARGUMENT", r"field 'f': unknown type 'blob'"),
    ("create-hostile-field-name", lambda e: e.client.create_collection("z", fields={"f; DROP": "int64"}),
     "INVALID_ARGUMENT", r"field name 'f; DROP' is invalid"),
    ("add-space-reserved-name", lambda e: e.pool.add_space("v__next", 4),
     "INVALID_ARGUMENT", r"space name 'v__next' is invalid: '__' is reserved"),
    ("add-model-one-class", lambda e: e.pool.add_model("m2", ["only"]),
     "INVALID_ARGUMENT", r"model 'm2': needs at least 2 class names, got 1"),
    # -- Ingest: Upsert -----------------------------------------------------------------------
    ("upsert-wrong-dimension", lambda e: e.pool.upsert([{"id": "x0", "emb_v": [1.0, 0.0, 0.0]}]),
     "INVALID_ARGUMENT", r"column 'emb_v': row 0 \(id 'x0'\) has dimension 3; space 'v' has dimension 4"),
    ("upsert-nan-vector", lambda e: e.pool.upsert([{"id": "x0", "emb_v": [1.0, float("nan"), 0.0, 0.0]}]),
     "INVALID_ARGUMENT", r"column 'emb_v': row 0 \(id 'x0'\) contains NaN or infinity"),
    ("upsert-inf-probs", lambda e: e.pool.upsert([{"id": "x0", "pred_m": {"probs": [float("inf"), 0.0, 0.0]}}]),
     "INVALID_ARGUMENT", r"column 'pred_m': probs of row 0 \(id 'x0'\) contains NaN or infinity"),
    ("upsert-zero-vector-cosine", lambda e: e.pool.upsert([{"id": "x0", "emb_v": [0.0, 0.0, 0.0, 0.0]}]),
     "INVALID_ARGUMENT", r"row 0 \(id 'x0'\) is the zero vector"),
    ("upsert-probs-not-summing", lambda e: e.pool.upsert([{"id": "x0", "pred_m": {"probs": [0.5, 0.6, 0.1]}}]),
     "INVALID_ARGUMENT", r"probs of row 0 \(id 'x0'\) sums to 1\.2\d*, not 1"),
    ("upsert-wrong-field-type", lambda e: e.pool.upsert([{"id": "x0", "n": "seven"}]),
     "INVALID_ARGUMENT", r"column 'n': the collection stores int64 here; got string"),
    ("upsert-id-not-string", lambda e: e.pool.upsert({"id": [1, 2]}),
     "INVALID_ARGUMENT", r"column 'id' must be strings, got int64"),
    ("upsert-duplicate-ids", lambda e: e.pool.upsert([{"id": "d", "n": 1}, {"id": "d", "n": 2}]),
     "INVALID_ARGUMENT", r"id 'd' appears more than once in the batch \(rows 0, 1\)"),
    ("upsert-empty-id", lambda e: e.pool.upsert([{"id": "", "n": 1}]),
     "INVALID_ARGUMENT", r"column 'id': row 0 is an empty string"),
    ("upsert-empty-batch", lambda e: _upsert_raw(e, pa.table({"id": pa.array([], pa.string())})),
     "INVALID_ARGUMENT", r"batch 0: the batch has no rows"),
    ("upsert-oversized-batch", lambda e: _upsert_raw(e, pa.table({"id": [f"b{i}" for i in range(501)]})),
     "RESOURCE_EXHAUSTED", r"batch 0: 501 rows; the limit is 500 rows per batch"),
    ("upsert-unknown-model", lambda e: e.pool.upsert([{"id": "x0", "pred_zz": {"probs": [1.0]}}]),
     "INVALID_ARGUMENT", r"column 'pred_zz': unknown model 'zz' \(known: m\)"),
    ("upsert-unknown-space-not-vectors", lambda e: e.pool.upsert([{"id": "x0", "emb_q": "text"}]),
     "INVALID_ARGUMENT", r"column 'emb_q': unknown space 'q'"),
    ("upsert-store-column", lambda e: e.pool.upsert([{"id": "x0", "created_at": 5}]),
     "INVALID_ARGUMENT", r"column 'created_at' is set by the store"),
    ("upsert-hostile-column-name", lambda e: e.pool.upsert([{"id": "x0", "x; DROP TABLE pool": 1}]),
     "INVALID_ARGUMENT", r"column name 'x; DROP TABLE pool' is invalid"),
    ("upsert-nested-user-field", lambda e: e.pool.upsert([{"id": "x0", "meta": {"k": 1}}]),
     "INVALID_ARGUMENT", r"column 'meta': user fields must be scalars"),
    ("upsert-invalid-utf8-id", lambda e: _upsert_raw(e, pa.table({"id": _bad_utf8([b"ok", b"\xff\xfe"])})),
     "INVALID_ARGUMENT", r"column 'id'.*Invalid UTF8"),
    ("upsert-invalid-utf8-new-field", lambda e: _upsert_raw(
        e, pa.table({"id": ["u1", "u2"], "note": _bad_utf8([b"fine", b"\xc3\x28"])})),
     "INVALID_ARGUMENT", r"column 'note'.*Invalid UTF8"),
    ("upsert-offsets-out-of-bounds", lambda e: _upsert_raw(e, _broken_offsets(1 << 20)),
     "INVALID_ARGUMENT", r"column 'id'.*out of bounds"),
    ("upsert-offsets-not-monotonic", lambda e: _upsert_raw(e, _broken_offsets(1)),
     "INVALID_ARGUMENT", r"column 'id'.*non-monotonic offset"),
    ("upsert-not-arrow", lambda e: _upsert_raw(e, b"\x00garbage, not Arrow"),
     "INVALID_ARGUMENT", r"batch 0: arrow_ipc is not a valid Arrow IPC stream"),
    ("upsert-no-collection", lambda e: _upsert_raw(e, pa.table({"id": ["a"]}), collection=""),
     "INVALID_ARGUMENT", r"the first upsert message must name the collection"),
    ("upsert-path-collection", lambda e: _upsert_raw(e, pa.table({"id": ["a"]}), collection="../../etc"),
     "INVALID_ARGUMENT", r"collection name '\.\./\.\./etc' is invalid"),
    ("upsert-unknown-collection", lambda e: e.client.collection("nope").upsert([{"id": "a"}]),
     "NOT_FOUND", r"collection 'nope' not found"),
    ("upsert-message-too-large", lambda e: _upsert_raw(e, pa.table({"id": ["big"], "text": ["x" * (2 << 20)]})),
     "RESOURCE_EXHAUSTED", r"larger than max \(\d+ vs\. 1048576\)"),
    # -- Ingest: Delete, TagItems ---------------------------------------------------------------
    ("delete-stacked-statement", lambda e: e.pool.delete(where="n = 1; DELETE FROM pool"),
     "INVALID_ARGUMENT", r"';' is not allowed"),
    ("delete-always-true-tail", lambda e: e.pool.delete(where="n = 1) OR (1 = 1"),
     "INVALID_ARGUMENT", r"unbalanced parentheses"),
    ("delete-ids-and-where", lambda e: e.ingest.Delete(ingest_pb2.DeleteRequest(collection="pool", ids=["r001"],
                                                                                where="n = 1")),
     "INVALID_ARGUMENT", r"delete takes ids or where, not both"),
    ("delete-empty-id", lambda e: e.pool.delete(ids=[""]),
     "INVALID_ARGUMENT", r"ids must be non-empty strings"),
    ("tag-control-characters", lambda e: e.pool.tag_items(ids=["r001"], add=["bad\x01tag"]),
     "INVALID_ARGUMENT", r"tag 'bad\\x01tag' is invalid: 1\.\.128 printable characters"),
    ("tag-nothing", lambda e: e.ingest.TagItems(ingest_pb2.TagItemsRequest(collection="pool", ids=["r001"])),
     "INVALID_ARGUMENT", r"give tags to add or to remove"),
    ("tag-unknown-run", lambda e: e.pool.tag_items(run_id="no-such-run", add=["x"]),
     "NOT_FOUND", r"mining run 'no-such-run' not found"),
    ("tag-too-many-ids", lambda e: e.pool.tag_items(ids=[f"x{i}" for i in range(501)], add=["x"]),
     "RESOURCE_EXHAUSTED", r"501 ids; the limit is 500 per call"),
    ("tag-hostile-filter", lambda e: e.pool.tag_items(where="label IS NULL; --", add=["x"]),
     "INVALID_ARGUMENT", r"';' is not allowed"),
    # -- Search -------------------------------------------------------------------------------
    ("search-k-huge", lambda e: _search_raw(e, vectors=_vectors(V4, 4), k=2**32 - 1),
     "RESOURCE_EXHAUSTED", r"k=4294967295 exceeds the server limit max_k=100"),
    ("search-k-negative", lambda e: e.pool.search("v", V4, k=-1),
     "INVALID_ARGUMENT", r"search: .*-1"),
    ("search-wrong-dimension", lambda e: e.pool.search("v", [1.0, 0.0, 0.0]),
     "INVALID_ARGUMENT", r"vectors\.dim is 3; space 'v' has dimension 4"),
    ("search-values-not-multiple-of-dim", lambda e: _search_raw(e, vectors=_vectors([1.0] * 6, 4)),
     "INVALID_ARGUMENT", r"vectors\.values has 6 numbers, not a positive multiple of dim 4"),
    ("search-nan", lambda e: _search_raw(e, vectors=_vectors([float("nan"), 0.0, 0.0, 0.0], 4)),
     "INVALID_ARGUMENT", r"query vector for space 'v' contains NaN or infinity"),
    ("search-zero-vector-cosine", lambda e: e.pool.search("v", [0.0, 0.0, 0.0, 0.0]),
     "INVALID_ARGUMENT", r"query vector for space 'v' is the zero vector"),
    ("search-unknown-space", lambda e: e.pool.search("zz", V4),
     "NOT_FOUND", r"space 'zz' not found in collection 'pool' \(known: v, w\)"),
    ("search-unknown-column", lambda e: e.pool.search("v", V4, columns=["id", "nope"]),
     "INVALID_ARGUMENT", r"unknown column\(s\) nope in collection 'pool'"),
    ("search-malformed-filter", lambda e: e.pool.search("v", V4, where="label = "),
     "INVALID_ARGUMENT", r"filter 'label = ' is invalid"),
    ("search-missing-ids", lambda e: e.pool.search("v", ids=["ghost"]),
     "NOT_FOUND", r"ids not found in 'pool': ghost"),
    ("search-text-without-embedder", lambda e: e.pool.search("v", text="a cat"),
     "FAILED_PRECONDITION", r"space 'v' has no text embedder"),
    ("search-no-query", lambda e: _search_raw(e, k=3),
     "INVALID_ARGUMENT", r"search needs a query: vectors, ids or texts"),
    ("search-too-many-queries", lambda e: _search_raw(e, vectors=_vectors([1.0] * 4 * 20_000, 4), k=1),
     "RESOURCE_EXHAUSTED", r"20000 queries in one call; the limit is 10000"),
    # -- Query: filters ---------------------------------------------------------------------------
    ("filter-subquery", lambda e: _count(e, "id IN (SELECT id FROM pool)"),
     "INVALID_ARGUMENT", r"is not supported SQL"),
    ("filter-stacked-statement", lambda e: _count(e, "n = 1; DROP TABLE pool"),
     "INVALID_ARGUMENT", r"';' is not allowed \(one boolean expression only\)"),
    ("filter-trailing-text", lambda e: _count(e, "n = 1 n = 2"),
     "INVALID_ARGUMENT", r"unexpected text after the end of the expression"),
    ("filter-comment-tail", lambda e: _count(e, "n = 1 -- ) OR (1 = 1"),
     "INVALID_ARGUMENT", r"unbalanced parentheses|is invalid"),
    ("filter-placeholder", lambda e: e.query.Count(query_pb2.CountRequest(collection="pool", where="n = $1")),
     "INVALID_ARGUMENT", r"filter 'n = \$1' is invalid"),
    ("filter-unknown-function", lambda e: _count(e, "sleep(10) = 0"),
     "INVALID_ARGUMENT", r"Invalid function 'sleep'"),
    ("filter-unknown-column", lambda e: _count(e, "nope = 1"),
     "INVALID_ARGUMENT", r"No field named nope"),
    ("filter-not-boolean", lambda e: _count(e, "n + 1"),
     "INVALID_ARGUMENT", r"does not return a boolean"),
    ("filter-unterminated-string", lambda e: _count(e, "label = 'abc"),
     "INVALID_ARGUMENT", r"Unterminated string literal"),
    ("filter-nul-byte", lambda e: _count(e, "\x00"),
     "INVALID_ARGUMENT", r"is invalid"),
    ("filter-deep-nesting", lambda e: _count(e, "(" * 3000 + "n = 1" + ")" * 3000),
     "INVALID_ARGUMENT", r"^filter '\(\(\(.* characters cut\] .*recursion limit exceeded"),
    ("filter-huge-in-list", lambda e: _count(e, "id IN (" + ", ".join(f"'i{i}'" for i in range(20_000)) + ") AND"),
     "INVALID_ARGUMENT", r"^filter \"id IN \('i0', .* characters cut\] .*found: EOF"),
    ("filter-cast-fails-on-data", lambda e: _count(e, "CAST(id AS INT) = 1"),
     "INVALID_ARGUMENT", r"filter failed while running on the rows: Cast error: Cannot cast string"),
    ("filter-divide-by-zero", lambda e: _count(e, "n / 0 = 1"),
     "INVALID_ARGUMENT", r"filter failed while running on the rows: Divide by zero"),
    ("filter-unbound-param", lambda e: e.pool.count("label = :label"),
     "INVALID_ARGUMENT", r"placeholder\(s\) :label but no params"),
    # -- Query: Scan, Take, Page, Aggregate, Export -------------------------------------------------
    ("scan-page-rows-huge", lambda e: list(e.query.Scan(query_pb2.ScanRequest(collection="pool", page_rows=2**32 - 1)))
     , "RESOURCE_EXHAUSTED", r"page_rows=4294967295 exceeds the server limit 10000"),
    ("scan-offset-huge", lambda e: list(e.query.Scan(query_pb2.ScanRequest(collection="pool", offset=2**64 - 1))),
     "INVALID_ARGUMENT", r"limit and offset must be at most 9223372036854775807"),
    ("scan-limit-huge", lambda e: list(e.query.Scan(query_pb2.ScanRequest(collection="pool", limit=2**64 - 1))),
     "INVALID_ARGUMENT", r"limit and offset must be at most"),
    ("scan-version-huge", lambda e: e.pool.query(version="99999999999999999999"),
     "NOT_FOUND", r"collection 'pool' has no version 99999999999999999999"),
    ("scan-version-path", lambda e: e.pool.count(version="../../pool"),
     "NOT_FOUND", r"collection 'pool' has no version '\.\./\.\./pool'"),
    ("scan-hostile-column", lambda e: e.pool.query(columns=["id", "x'; --"]),
     "INVALID_ARGUMENT", r"unknown column\(s\) x'; --"),
    ("take-too-many-ids", lambda e: e.pool.take([f"x{i}" for i in range(501)]),
     "RESOURCE_EXHAUSTED", r"501 ids; the limit is 500 per call"),
    ("page-garbage-cursor", lambda e: e.pool.page(cursor="!!not-a-cursor!!"),
     "INVALID_ARGUMENT", r"cursor is malformed"),
    ("page-forged-cursor", lambda e: e.pool.page(cursor="eyJjIjoxLCJ2Ijo5OTk5LCJvIjowLCJoIjoiIn0"),
     "INVALID_ARGUMENT", r"cursor was made for another collection, where or columns"),
    ("page-rows-huge", lambda e: e.pool.page(page_rows=50_000),
     "RESOURCE_EXHAUSTED", r"page_rows=50000 exceeds the server limit 10000"),
    ("aggregate-unknown-kind", lambda e: e.query.Aggregate(query_pb2.AggregateRequest(collection="pool", kind="evil")),
     "INVALID_ARGUMENT", r"unknown aggregate kind 'evil'"),
    ("aggregate-unknown-model", lambda e: e.pool.confused_pairs("zz"),
     "NOT_FOUND", r"model 'zz' not found in collection 'pool'"),
    ("aggregate-histogram-of-text", lambda e: e.pool.histogram("text"),
     "INVALID_ARGUMENT", r"field 'text' has type string; a histogram needs a numeric field"),
    ("aggregate-histogram-nan-range", lambda e: e.query.Aggregate(query_pb2.AggregateRequest(
        collection="pool", kind="histogram", field="n", range_min=float("nan"), range_max=1.0)),
     "INVALID_ARGUMENT", r"range must be finite with low <= high"),
    ("aggregate-hostile-group-by", lambda e: e.pool.label_distribution(group_by=["n); DROP TABLE pool"]),
     "INVALID_ARGUMENT", r"group_by: unknown column 'n\); DROP TABLE pool'"),
    ("export-unknown-format", lambda e: list(e.query.Export(query_pb2.ExportRequest(collection="pool", format="exe"))),
     "INVALID_ARGUMENT", r"export format must be one of csv, jsonl, coco, .*got 'exe'"),
    ("export-unknown-field", lambda e: list(e.query.Export(query_pb2.ExportRequest(
        collection="pool", format="csv", fields=["nope"]))),
     "INVALID_ARGUMENT", r"fields: unknown column 'nope'"),
    ("export-unknown-dataset", lambda e: list(e.query.Export(query_pb2.ExportRequest(
        collection="pool", format="csv", dataset="nope"))),
     "NOT_FOUND", r"dataset 'nope' not found"),
    ("export-coco-of-classifier", lambda e: list(e.query.Export(query_pb2.ExportRequest(
        collection="pool", format="coco", model="m"))),
     "FAILED_PRECONDITION", r"model 'm' is a classification model"),
    # -- Jobs ----------------------------------------------------------------------------------------
    ("job-unknown-kind", lambda e: e.client.start_job("rm -rf", "pool"),
     "INVALID_ARGUMENT", r"unknown job kind 'rm -rf'"),
    ("job-unknown-param", lambda e: e.client.start_job("optimize", "pool", {"zz": 1}),
     "INVALID_ARGUMENT", r"optimize: unknown parameter\(s\) zz"),
    ("job-nan-param", lambda e: e.client.start_job("recall_check", "pool", {"space": "v", "k": float("nan")}),
     "INVALID_ARGUMENT", r"parameter\(s\) k: NaN and infinity are not valid values"),
    ("job-negative-param", lambda e: e.pool.optimize(cleanup_older_than_s=-1),
     "INVALID_ARGUMENT", r"parameter 'cleanup_older_than_s' must be in \[0, "),
    ("job-unknown-space", lambda e: e.pool.build_index("zz"),
     "NOT_FOUND", r"space 'zz' not found in collection 'pool'"),
    ("job-path-collection", lambda e: e.client.start_job("optimize", "../pool"),
     "INVALID_ARGUMENT", r"collection name '\.\./pool' is invalid"),
    ("job-reindex-batch-rows-zero", lambda e: e.pool.reindex("v", batch_rows=0),
     "INVALID_ARGUMENT", r"parameter 'batch_rows' must be in \[1, 100000\], got 0"),
    ("job-reindex-hostile-filter", lambda e: e.pool.reindex("v", where="1 = 1; DROP TABLE pool"),
     "INVALID_ARGUMENT", r"';' is not allowed"),
    ("job-mine-through-jobs", lambda e: e.client.start_job("mine", "pool", {"zz": 1}),
     "INVALID_ARGUMENT", r"start mining runs with Mining\.StartMining"),
    ("job-get-unknown", lambda e: e.client.job("../../etc/passwd"),
     "NOT_FOUND", r"job '\.\./\.\./etc/passwd' not found"),
    ("job-watch-unknown", lambda e: list(e.jobs.WatchJob(jobs_pb2.JobRef(job_id="nope"), timeout=30)),
     "NOT_FOUND", r"job 'nope' not found"),
    ("job-cancel-unknown", lambda e: e.jobs.CancelJob(jobs_pb2.JobRef(job_id="nope")),
     "NOT_FOUND", r"job 'nope' not found"),
    ("job-list-unknown-state", lambda e: e.jobs.ListJobs(jobs_pb2.ListJobsRequest(states=[99])),
     "INVALID_ARGUMENT", r"unknown job state\(s\) 99"),
    # -- Mining ----------------------------------------------------------------------------------------
    ("mine-unknown-miner", lambda e: e.pool.mine("evil", 5, model="m"),
     "INVALID_ARGUMENT", r"unknown miner 'evil' \(known: "),
    ("mine-size-zero", lambda e: e.mining.StartMining(mining_pb2.StartMiningRequest(
        collection="pool", miner="margin", size=0, model="m")),
     "INVALID_ARGUMENT", r"size must be an integer in \[1, 1000000\], got 0"),
    ("mine-size-huge", lambda e: e.mining.StartMining(mining_pb2.StartMiningRequest(
        collection="pool", miner="margin", size=2**32 - 1, model="m")),
     "INVALID_ARGUMENT", r"size must be an integer in \[1, 1000000\], got 4294967295"),
    ("mine-unknown-model", lambda e: e.pool.mine("margin", 5, model="zz"),
     "NOT_FOUND", r"model 'zz' not found in collection 'pool'"),
    ("mine-unknown-param", lambda e: e.pool.mine("margin", 5, model="m", params={"zz": 1}),
     "INVALID_ARGUMENT", r"miner 'margin': unknown parameter\(s\) zz"),
    ("mine-param-wrong-type", lambda e: e.pool.mine("margin", 5, model="m", params={"temperature": "hot"}),
     "INVALID_ARGUMENT", r"parameter 'temperature' must be a number, got 'hot'"),
    ("mine-nan-seed", lambda e: e.pool.mine("knn", 5, space="v", params={"seed_vectors": [[float("nan"), 0, 0, 0]]}),
     "INVALID_ARGUMENT", r"parameter\(s\) seed_vectors: NaN and infinity are not valid values"),
    ("mine-seed-wrong-dimension", lambda e: e.pool.mine("knn", 5, space="v", params={"seed_vectors": [[1, 0]]}),
     "INVALID_ARGUMENT", r"seed_vectors have dimension 2; space 'v' has 4"),
    ("mine-hostile-filter", lambda e: e.pool.mine("margin", 5, model="m", where="label IS NULL; DROP TABLE pool"),
     "INVALID_ARGUMENT", r"';' is not allowed"),
    ("mine-empty-pool", lambda e: e.pool.mine("margin", 5, model="m", where="n > 1000"),
     "FAILED_PRECONDITION", r"matches no rows in 'pool'"),
    ("mine-future-version", lambda e: e.pool.mine("margin", 5, model="m", version=10**9),
     "NOT_FOUND", r"collection 'pool' has no version 1000000000"),
    ("mine-unknown-space", lambda e: e.pool.mine("coreset", 5, space="zz"),
     "NOT_FOUND", r"space 'zz' not found"),
    ("run-unknown", lambda e: e.client.mining_job("' OR 1=1 --"),
     "NOT_FOUND", r"mining run '' OR 1=1 --' not found"),
    ("run-results-unknown", lambda e: list(e.mining.RunResults(mining_pb2.RunResultsRequest(run_id="nope"))),
     "NOT_FOUND", r"mining run 'nope' not found"),
    ("run-cancel-unknown", lambda e: e.mining.CancelRun(mining_pb2.RunRef(run_id="nope")),
     "NOT_FOUND", r"mining run 'nope' not found"),
    # -- Datasets ---------------------------------------------------------------------------------------
    ("dataset-path-name", lambda e: e.client.create_dataset("../x", "pool"),
     "INVALID_ARGUMENT", r"dataset name '\.\./x' is invalid"),
    ("dataset-unknown-collection", lambda e: e.client.create_dataset("d2", "nope"),
     "NOT_FOUND", r"collection 'nope' not found"),
    ("dataset-existing", lambda e: e.client.create_dataset("ds", "pool"),
     "ALREADY_EXISTS", r"dataset 'ds' already exists"),
    ("dataset-add-missing-ids", lambda e: e.ds.add(ids=["r003", "ghost"]),
     "INVALID_ARGUMENT", r"1 id\(s\) are not in collection 'pool': 'ghost'"),
    ("dataset-add-hostile-filter", lambda e: e.ds.add(where="n = 1) OR (1 = 1"),
     "INVALID_ARGUMENT", r"unbalanced parentheses"),
    ("dataset-add-unknown-run", lambda e: e.ds.add(run_id="nope"),
     "NOT_FOUND", r"mining run 'nope' not found"),
    ("dataset-add-to-unknown", lambda e: e.client.dataset("zz").add(ids=["r001"]),
     "NOT_FOUND", r"dataset 'zz' not found"),
    ("dataset-commit-nothing", lambda e: e.ds.commit("nothing staged"),
     "FAILED_PRECONDITION", r"dataset 'ds' has nothing to commit"),
    ("dataset-commit-empty-message", lambda e: e.datasets.Commit(datasets_pb2.CommitRequest(dataset="ds", message="")),
     "INVALID_ARGUMENT", r"commit message must be a non-empty string"),
    ("dataset-checkout-unknown-version", lambda e: e.ds.checkout(999),
     "NOT_FOUND", r"dataset 'ds' has no version 999"),
    ("dataset-checkout-page-huge", lambda e: list(e.datasets.Checkout(datasets_pb2.CheckoutRequest(
        dataset="ds", page_rows=2**32 - 1))),
     "RESOURCE_EXHAUSTED", r"page_rows=4294967295 exceeds the server limit 10000"),
    ("dataset-tag-path", lambda e: e.ds.tag(1, "../x"),
     "INVALID_ARGUMENT", r"dataset tag '\.\./x' is invalid"),
    ("dataset-diff-unknown-tag", lambda e: e.ds.diff("nope", 1),
     "NOT_FOUND", r"dataset 'ds' has no tag 'nope'"),
    ("dataset-delete-unknown", lambda e: e.client.dataset("zz").delete(),
     "NOT_FOUND", r"dataset 'zz' not found"),
    # -- Deadlines and cancellation ---------------------------------------------------------------------
    ("deadline-already-expired", lambda e: e.pool.count(timeout=-1),
     "DEADLINE_EXCEEDED", r"Deadline Exceeded"),
    ("deadline-expired-watch", lambda e: list(e.jobs.WatchJob(jobs_pb2.JobRef(job_id=e.parked.id), timeout=0.3)),
     "DEADLINE_EXCEEDED", r"Deadline Exceeded"),
    ("deadline-expired-upsert-stream", _deadline_upsert,
     "DEADLINE_EXCEEDED", r"Deadline Exceeded"),
    ("cancelled-upsert-stream", _cancelled_upsert,
     "CANCELLED", r"[Cc]ancelled"),
    ("cancelled-scan-stream", _cancelled_scan,
     "CANCELLED", r"[Cc]ancelled"),
]


@pytest.mark.parametrize(("send", "code", "pattern"), [pytest.param(*c[1:], id=c[0]) for c in CASES])
def test_bad_request_is_refused_with_a_clear_status_and_writes_nothing(env, send, code, pattern):
    before = versions(env.server)
    with pytest.raises((AssayClientError, grpc.RpcError)) as err:
        send(env)
    got_code, message = status_of(err.value)
    assert got_code == code, f"{got_code}: {message}"
    assert re.search(pattern, message, re.S), message
    assert "Traceback" not in message and "/root/.cargo" not in message
    time.sleep(0.05) if code in ("CANCELLED", "DEADLINE_EXCEEDED") else None  # a late write would show
    assert versions(env.server) == before


def test_the_catalogue_covers_every_service():
    names = [c[0] for c in CASES]
    assert len(names) == len(set(names)) and len(names) >= 40
    for prefix in ("create", "upsert", "delete", "tag", "search", "filter", "scan", "take", "page", "aggregate",
                   "export", "job", "mine", "run", "dataset", "deadline", "cancelled"):
        assert any(n.startswith(prefix) for n in names), prefix


def test_the_server_still_serves_after_the_catalogue(env):
    """Nothing above left a table unreadable (the invalid UTF-8 batches were refused, not
    stored) and the collections still take writes and answer reads."""
    assert env.pool.count() == N
    summary = env.pool.upsert([{"id": "after", "n": 1, "emb_v": [0.0, 1.0, 0.0, 0.0]}])
    assert summary.inserted == 1
    hits = env.pool.search("v", [0.0, 1.0, 0.0, 0.0], k=1, columns=["id"])
    assert hits.column("id").to_pylist() == ["after"]
    assert env.pool.query(columns=["id", "text"]).num_rows == N + 1
    env.pool.delete(ids=["after"])


# -- limits: each answers RESOURCE_EXHAUSTED and names the limit ----------------------------------------

def test_limits_answer_resource_exhausted_and_name_the_limit(env):
    pool = env.pool
    cases = [
        (lambda: pool.search("v", V4, k=LIMITS.max_k + 1), r"k=101 exceeds the server limit max_k=100"),
        (lambda: pool.upsert({"id": [f"b{i}" for i in range(501)]}, batch_rows=501),
         r"501 rows; the limit is 500 rows per batch"),
        (lambda: pool.take([f"x{i}" for i in range(501)]), r"the limit is 500 per call"),
        (lambda: pool.page(page_rows=10_001), r"page_rows=10001 exceeds the server limit 10000"),
        (lambda: _upsert_raw(env, pa.table({"id": ["big"], "text": ["x" * (MAX_MESSAGE_MB << 20)]})),
         r"larger than max \(\d+ vs\. 1048576\)"),
    ]
    before = versions(env.server)
    for call, pattern in cases:
        with pytest.raises((AssayClientError, grpc.RpcError)) as err:
            call()
            pytest.fail(f"no error; expected {pattern}")
        code, message = status_of(err.value)
        assert code == "RESOURCE_EXHAUSTED" and re.search(pattern, message), message
    assert pool.search("v", V4, k=LIMITS.max_k).num_rows == N  # the limit itself is allowed
    assert versions(env.server) == before


def test_max_jobs_refuses_jobs_and_mining_runs_beyond_the_limit(env):
    release = threading.Event()

    def blocked(ctx, col, params):
        while not release.wait(0.05):
            ctx.check()
        return {}

    env.server.jobs.register("blocked_test_job", JobKind(run=blocked))
    started = [env.client.start_job("blocked_test_job", "pool") for _ in range(MAX_JOBS - 1)]
    try:
        for job in started:
            _wait_state(job, "RUNNING")
        before = settled_versions(env.server)  # the RUNNING records are written just after
        with pytest.raises(AssayClientError) as err:
            env.client.start_job("blocked_test_job", "pool")
        assert err.value.code == "RESOURCE_EXHAUSTED" and "(max_jobs)" in str(err.value)
        assert f"{MAX_JOBS} jobs are pending or running" in str(err.value)
        with pytest.raises(AssayClientError) as err:
            env.pool.mine("margin", 5, model="m")
        assert err.value.code == "RESOURCE_EXHAUSTED" and "max_jobs" in str(err.value)
        assert versions(env.server) == before  # the refused run left no record
    finally:
        release.set()
        for job in started:
            assert job.wait(timeout=60).state == "SUCCEEDED"
    assert env.pool.mine("margin", 3, model="m").wait(timeout=60).state == "SUCCEEDED"


def test_rate_limit_names_the_rate(tmp_path):
    srv = start_server(ServerConfig(data=str(tmp_path / "rate"), port=0, grace_s=1, rate_limit=2, rate_burst=2))
    try:
        with Client(srv.address, retries=0) as client:
            client.list_collections()
            client.list_collections()
            with pytest.raises(AssayClientError) as err:
                client.list_collections()
            assert err.value.code == "RESOURCE_EXHAUSTED"
            assert re.search(r"rate limit exceeded: 2 calls/s per token \(burst 2\)", str(err.value))
    finally:
        srv.stop(1)
