"""The client library without the assay server: import purity, Arrow IPC, request building,
error mapping, retries, and the streaming protocols (upsert acknowledgements and resume, job
watching, scans) against tiny real gRPC servers on loopback that play scripted parts."""

from __future__ import annotations

import asyncio
import queue
import subprocess
import sys
import threading
import time
from collections import Counter
from concurrent import futures
from pathlib import Path

import grpc
import numpy as np
import pandas as pd
import pyarrow as pa
import pytest
from google.protobuf import struct_pb2
from grpc_health.v1 import health, health_pb2_grpc

from protos.assay.v1 import (
    collections_pb2,
    collections_pb2_grpc,
    common_pb2,
    ingest_pb2,
    ingest_pb2_grpc,
    jobs_pb2,
    jobs_pb2_grpc,
    query_pb2_grpc,
    search_pb2,
    search_pb2_grpc,
)
from service import client as cl
from service.arrow_ipc import ipc_to_table, table_to_ipc
from service.client import (
    AssayClientError,
    AsyncClient,
    Client,
    DeadlineExceededError,
    InvalidArgumentError,
    NotFoundError,
    RetryPolicy,
    UnauthenticatedError,
    UnavailableError,
)
from service.client.upsert import serialize_request

ROOT = Path(__file__).resolve().parents[1]
FAST = RetryPolicy(retries=4, base_delay=0.01, max_delay=0.05)


# -- import purity ---------------------------------------------------------------------------


# The leaves of indexing/ the client shares with the server (filter scanner, settings, the
# errors they raise): standard library only.
CLIENT_LEAVES = ["indexing", "indexing.errors", "indexing.filters", "indexing.settings"]


def test_importing_the_client_loads_no_server_or_ml_stack():
    heavy = ["lancedb", "lance", "torch", "sentence_transformers", "sklearn", "duckdb", "indexing",
             "pandas", "tqdm"]
    code = (
        "import sys, service.client\n"
        f"print(sorted(m for m in sys.modules if m.split('.')[0] in {heavy!r}))"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                         check=True)
    assert out.stdout.strip() == str(CLIENT_LEAVES), out.stdout
    init = (ROOT / "service" / "__init__.py").read_text()
    assert "import" not in init


@pytest.mark.parametrize("module", CLIENT_LEAVES[1:])
def test_the_indexing_leaves_of_the_client_import_only_the_standard_library(module):
    import ast

    tree = ast.parse((ROOT / (module.replace(".", "/") + ".py")).read_text(encoding="utf-8"))
    imported = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    imported |= {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
    outside = sorted(m for m in imported if m.split(".")[0] not in sys.stdlib_module_names
                     and m != "__future__" and m not in CLIENT_LEAVES)
    assert outside == [], f"{module} imports {outside}"


# -- Arrow IPC -------------------------------------------------------------------------------


def _sample_table(n: int = 5) -> pa.Table:
    vecs = np.arange(n * 3, dtype=np.float32)
    return pa.table({
        "id": [f"r{i}" for i in range(n)],
        "label": ["cat" if i % 2 else None for i in range(n)],
        "emb_x": pa.FixedSizeListArray.from_arrays(pa.array(vecs), 3),
        "tags": [["a", "b"]] * n,
        "pred_m": pa.array([{"probs": [0.25, 0.75]}] * n),
        "at": pa.array([0] * n, pa.timestamp("us", tz="UTC")),
    })


def test_arrow_ipc_round_trip_tables_batches_and_slices():
    t = _sample_table(100)
    assert ipc_to_table(table_to_ipc(t)).equals(t)
    batch = t.to_batches()[0]
    assert ipc_to_table(table_to_ipc(batch)).equals(pa.Table.from_batches([batch]))
    part = t.slice(10, 20)
    data = table_to_ipc(part)
    assert ipc_to_table(data).equals(part)
    assert len(data) < len(table_to_ipc(t))  # a slice is written without the rest
    empty = t.schema.empty_table()
    assert ipc_to_table(table_to_ipc(empty)).schema == t.schema


@pytest.mark.parametrize("data", [b"", b"not arrow at all", "text"])
def test_arrow_ipc_rejects_malformed_bytes(data):
    with pytest.raises(ValueError, match="Arrow IPC"):
        ipc_to_table(data)


def test_arrow_ipc_rejects_truncated_and_file_format():
    data = table_to_ipc(_sample_table(50))
    for bad in (data[:40], data[: len(data) // 2]):
        with pytest.raises(ValueError, match="malformed Arrow IPC stream"):
            ipc_to_table(bad)
    sink = pa.BufferOutputStream()
    with pa.ipc.new_file(sink, _sample_table().schema) as w:
        w.write(_sample_table())
    with pytest.raises(ValueError, match="malformed"):
        ipc_to_table(sink.getvalue().to_pybytes())
    with pytest.raises(TypeError):
        table_to_ipc({"id": ["a"]})


# -- upsert input normalisation --------------------------------------------------------------


def test_dict_of_columns_with_2d_numpy_becomes_fixed_size_float32():
    t = cl.to_arrow({"id": ["a", "b"], "emb_clip": np.ones((2, 4), np.float64),
                     "n": np.array([1, 2])})
    assert t.schema.field("emb_clip").type == pa.list_(pa.float32(), 4)
    assert t.column("emb_clip").to_pylist() == [[1.0] * 4] * 2
    assert t.schema.field("n").type == pa.int64()
    other = cl.to_arrow({"feat": np.ones((2, 3), np.float64)})  # only emb_* become float32
    assert other.schema.field("feat").type == pa.list_(pa.float64(), 3)
    with pytest.raises(InvalidArgumentError, match=r"column 'id'.*pass a list: \[row\]"):
        cl.to_arrow({"id": "a", "emb_clip": [1.0, 2.0]})


def test_list_of_row_dicts_missing_keys_become_nulls():
    rows = [
        {"id": "a", "emb_x": np.array([1.0, 2.0, 3.0]), "pred_m": {"probs": [0.1, 0.9]}},
        {"id": "b", "label": "dog"},
    ]
    t = cl.to_arrow(rows)
    assert t.column_names == ["id", "emb_x", "pred_m", "label"]
    assert t.schema.field("emb_x").type == pa.list_(pa.float32(), 3)
    assert t.column("emb_x").to_pylist() == [[1.0, 2.0, 3.0], None]
    assert t.column("label").to_pylist() == [None, "dog"]
    # lists of equal-length vectors are stacked; ragged ones are left for the server to report
    assert cl.to_arrow([{"emb_x": [1, 2]}, {"emb_x": [3, 4]}]).schema.field("emb_x").type == \
        pa.list_(pa.float32(), 2)
    assert pa.types.is_list(cl.to_arrow({"emb_x": [[1.0, 2.0], [3.0]]}).schema.field("emb_x").type)


def test_dataframe_and_arrow_inputs():
    df = pd.DataFrame({"id": ["a", "b"], "emb_x": [np.ones(3), np.zeros(3)], "score": [0.5, 1.5]})
    t = cl.to_arrow(df)
    assert t.schema.field("emb_x").type == pa.list_(pa.float32(), 3)
    assert t.column("id").to_pylist() == ["a", "b"] and t.schema.metadata is None
    table = pa.table({"emb_y": pa.array([[1.0, 2.0]], pa.list_(pa.float64(), 2))})
    assert cl.to_arrow(table).schema.field("emb_y").type == pa.list_(pa.float32(), 2)
    batch = _sample_table(3).to_batches()[0]
    assert cl.to_arrow(batch).num_rows == 3
    with pytest.raises(InvalidArgumentError, match="expected a pyarrow Table"):
        cl.to_arrow(42)
    with pytest.raises(ValueError):  # InvalidArgumentError is a ValueError too
        cl.normalize_upsert_input(3.5)


def test_iterator_input_is_converted_lazily():
    pulled = []

    def chunks():
        for i in range(3):
            pulled.append(i)
            yield {"id": [f"c{i}"]}

    table, tables = cl.normalize_upsert_input(chunks())
    assert table is None and pulled == []
    first = next(iter(tables))
    assert first.column("id").to_pylist() == ["c0"] and pulled == [0]
    materialised, parts = cl.normalize_upsert_input([{"id": "a"}])
    assert materialised.num_rows == 1 and list(parts) == [materialised]


def test_batches_split_under_the_message_limit():
    n, dim = 1000, 64
    t = pa.table({"id": [f"id{i}" for i in range(n)],
                  "emb_x": cl._matrix_to_arrow("emb_x", np.random.default_rng(0).random((n, dim)))})
    limit = 60_000
    batches = list(cl.encode_batches([t], batch_rows=300, max_message_bytes=limit))
    assert all(len(b.ipc) <= limit - cl._REQUEST_ENVELOPE for b in batches)
    assert all(b.rows <= 300 for b in batches)
    assert [b.seq for b in batches] == list(range(len(batches)))
    assert [b.offset for b in batches] == list(np.cumsum([0] + [b.rows for b in batches[:-1]]))
    assert pa.concat_tables(ipc_to_table(b.ipc) for b in batches).equals(t)
    assert all(b.nbytes == len(b.ipc) for b in batches)  # sizes counted without writing
    # 300 rows do not fit: each slice is split into as many near-equal parts as its size asks
    slice_bytes = len(table_to_ipc(t.slice(0, 300)))
    assert max(b.rows for b in batches) <= -(-300 // -(-slice_bytes // (limit - cl._REQUEST_ENVELOPE)))
    # the serialised request is the protobuf message, the IPC written once into it
    from protos.assay.v1 import ingest_pb2
    raw = serialize_request("pool", batches[1])
    parsed = ingest_pb2.UpsertRequest.FromString(raw)
    assert (parsed.collection, parsed.seq, parsed.arrow_ipc) == ("pool", batches[1].seq, batches[1].ipc)
    resumed = list(cl.encode_batches([t.slice(500)], batch_rows=300, max_message_bytes=limit,
                                     start_seq=7, start_offset=500))
    assert resumed[0].seq == 7 and resumed[0].offset == 500
    wide = pa.table({"id": ["w0", "w1"], "emb_x": cl._matrix_to_arrow("emb_x", np.ones((2, 4096)))})
    with pytest.raises(InvalidArgumentError, match="one row \\(id 'w0'\\)"):
        list(cl.encode_batches([wide], batch_rows=10,
                               max_message_bytes=cl._REQUEST_ENVELOPE + 8000))
    with pytest.raises(InvalidArgumentError, match="batch_rows"):
        list(cl.encode_batches([t], batch_rows=0, max_message_bytes=limit))


# -- request building and response parsing --------------------------------------------------


def test_search_request_single_batch_ids_and_texts():
    single = cl.rpc_search("c", "clip", vector=np.array([1, 2, 3]), k=5, where="label IS NULL",
                           columns=["id"], nprobes=30)
    r = single.request
    assert r.WhichOneof("query") == "vectors" and r.vectors.dim == 3
    assert list(r.vectors.values) == [1, 2, 3]
    assert (r.k, r.where, list(r.columns), r.nprobes, r.refine_factor) == \
        (5, "label IS NULL", ["id"], 30, 0)
    batch = cl.rpc_search("c", "clip", vector=np.ones((4, 2)))
    assert batch.request.vectors.dim == 2 and len(batch.request.vectors.values) == 8
    assert cl.rpc_search("c", "s", ids=["a", "b"]).request.ids.ids == ["a", "b"]
    assert cl.rpc_search("c", "s", text="a dog").request.texts.texts == ["a dog"]
    assert cl.rpc_search("c", "s", ids=[]).request.WhichOneof("query") == "ids"
    result = pa.table({"query_index": pa.array([0, 0], pa.int32()), "id": ["x", "y"],
                       "_distance": pa.array([0.1, 0.2], pa.float32())})
    response = search_pb2.SearchResponse(arrow_ipc=table_to_ipc(result), queries=1)
    assert single.parse(response).column_names == ["id", "_distance"]
    assert batch.parse(response).column_names == ["query_index", "id", "_distance"]
    assert cl.rpc_search("c", "s", ids="a").parse(response).column_names == ["id", "_distance"]
    assert "query_index" in cl.rpc_search("c", "s", texts=["a"]).parse(response).column_names


@pytest.mark.parametrize("kwargs, match", [
    ({}, "exactly one"),
    ({"vector": [1.0], "text": "x"}, "exactly one"),
    ({"vector": np.ones((2, 2, 2))}, "1-D"),
    ({"vector": ["a", "b"]}, "numbers"),
    ({"texts": "one string"}, "use text="),
    ({"ids": [1, 2]}, "strings"),
    ({"vector": [1.0], "k": -1}, "search"),
])
def test_search_request_errors(kwargs, match):
    with pytest.raises(InvalidArgumentError, match=match):
        cl.rpc_search("c", "s", **kwargs)


def test_collection_specs_and_other_requests():
    req = cl.rpc_create_collection(
        "pool",
        {"clip": 512, "txt": {"dim": 384, "metric": "l2", "model": "st:minilm", "normalized": True,
                              "index": {"kind": "ivf_rq", "threshold_rows": 1000}}},
        {"m1": ["cat", "dog"], "det": {"classes": ["car"], "task": "detection"}},
        {"score": "float64"}, True,
    ).request
    clip, txt = req.spaces
    assert (clip.name, clip.dim, clip.HasField("normalized")) == ("clip", 512, False)
    assert (txt.metric, txt.model, txt.normalized, txt.index.kind, txt.index.threshold_rows) == \
        ("l2", "st:minilm", True, "ivf_rq", 1000)
    assert [(m.name, list(m.classes), m.task) for m in req.models] == \
        [("m1", ["cat", "dog"], ""), ("det", ["car"], "detection")]
    assert dict(req.fields) == {"score": "float64"} and req.if_not_exists
    with pytest.raises(InvalidArgumentError, match="space 'bad'"):
        cl.space_spec("bad", {"dim": 3, "colour": "red"})
    with pytest.raises(InvalidArgumentError, match="model 'm'"):
        cl.model_spec("m", "cat")
    add = cl.rpc_add_space("pool", "s", 8, "cosine", None, None, None).request
    assert add.space.dim == 8 and not add.space.HasField("normalized")
    scan = cl.rpc_scan("pool", None, "id", 100, limit=None, offset=5).request
    assert (scan.where, list(scan.columns), scan.page_rows, scan.limit, scan.offset) == \
        ("", ["id"], 100, 0, 5)
    assert list(cl.rpc_take("pool", "a", None).request.ids) == ["a"]
    with pytest.raises(InvalidArgumentError, match="exactly one"):
        cl.rpc_delete("pool", ["a"], "x = 1")
    with pytest.raises(InvalidArgumentError, match="exactly one"):
        cl.rpc_delete("pool", None, None)
    nothing = cl.rpc_delete("pool", [], None)
    assert nothing.request is None and nothing.parse(None) == 0
    job = cl.rpc_build_index("pool", "clip", None).request
    assert (job.kind, job.collection, cl.struct_to_dict(job.params)) == \
        ("build_index", "pool", {"space": "clip"})
    recall = cl.rpc_recall_check("pool", "clip", 50, 10, None, True).request
    assert cl.struct_to_dict(recall.params) == \
        {"space": "clip", "queries": 50, "k": 10, "tune": True}
    states = cl.rpc_list_jobs(None, ["running", jobs_pb2.FAILED], 0).request.states
    assert list(states) == [jobs_pb2.RUNNING, jobs_pb2.FAILED]
    with pytest.raises(InvalidArgumentError, match="unknown job state"):
        cl.rpc_list_jobs(None, ["BUSY"], 10)
    with pytest.raises(InvalidArgumentError, match="JSON-like"):
        cl.dict_to_struct({"x": object()})


def test_message_to_dict_keeps_ints_and_zero_values():
    info = collections_pb2.CollectionInfo(
        name="pool", rows=2**40, version=3,
        spaces=[collections_pb2.SpaceInfo(spec=common_pb2.SpaceSpec(name="clip", dim=8))],
        tags={"v1": 2},
    )
    d = cl.message_to_dict(info)
    assert d["rows"] == 2**40 and isinstance(d["rows"], int) and d["fragments"] == 0
    assert d["spaces"][0]["spec"]["dim"] == 8 and d["tags"] == {"v1": 2} and d["models"] == []
    result = struct_pb2.Struct()
    result.update({"rows": 10, "recall": 0.97, "nested": {"n": 2.0}})
    assert cl.struct_to_dict(result) == {"rows": 10, "recall": 0.97, "nested": {"n": 2}}


def test_retry_backoff_is_exponential_jittered_and_capped():
    policy = RetryPolicy(retries=8, base_delay=0.1, max_delay=1.0)
    delays = list(policy.backoff())
    assert len(delays) == 8
    for i, d in enumerate(delays):
        cap = min(1.0, 0.1 * 2**i)
        assert cap / 2 <= d <= cap
    assert list(RetryPolicy(retries=0).backoff()) == []


# -- tiny real gRPC servers ------------------------------------------------------------------


def _serve(register) -> tuple[grpc.Server, str]:
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
    register(server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    return server, f"127.0.0.1:{port}"


class _Flaky(grpc.GenericRpcHandler):
    """/t.T/Echo fails with UNAVAILABLE `fail` times, then echoes; /t.T/Abort aborts with the
    status named in the request."""

    def __init__(self, fail: int) -> None:
        self.fail, self.calls = fail, 0

    def service(self, details):
        if details.method == "/t.T/Echo":
            return grpc.unary_unary_rpc_method_handler(self._echo)
        if details.method == "/t.T/Abort":
            return grpc.unary_unary_rpc_method_handler(
                lambda req, ctx: ctx.abort(grpc.StatusCode[req.decode()],
                                           f"scripted {req.decode()}"))
        return None

    def _echo(self, request: bytes, context) -> bytes:
        self.calls += 1
        if self.calls <= self.fail:
            context.abort(grpc.StatusCode.UNAVAILABLE, "warming up")
        return request


@pytest.fixture
def flaky():
    handler = _Flaky(fail=2)
    server, address = _serve(lambda s: s.add_generic_rpc_handlers((handler,)))
    channel = grpc.insecure_channel(address)
    yield handler, channel, address
    channel.close()
    server.stop(None)


def test_retries_unavailable_until_success(flaky):
    handler, channel, _ = flaky
    echo = channel.unary_unary("/t.T/Echo")
    assert cl.call_with_retries(FAST, lambda: echo(b"hi", timeout=5)) == b"hi"
    assert handler.calls == 3


def test_gives_up_after_the_retries(flaky):
    handler, channel, _ = flaky
    echo = channel.unary_unary("/t.T/Echo")
    with pytest.raises(UnavailableError, match="UNAVAILABLE: warming up") as info:
        cl.call_with_retries(RetryPolicy(retries=1, base_delay=0.01), lambda: echo(b"x", timeout=5))
    assert handler.calls == 2 and isinstance(info.value.rpc_error, grpc.RpcError)


def test_async_retries(flaky):
    handler, _, address = flaky

    async def main():
        async with grpc.aio.insecure_channel(address) as ch:
            echo = ch.unary_unary("/t.T/Echo")
            return await cl.call_with_retries_async(FAST, lambda: echo(b"aio", timeout=5))

    assert asyncio.run(main()) == b"aio" and handler.calls == 3


@pytest.mark.parametrize("code, cls", [
    ("INVALID_ARGUMENT", cl.InvalidArgumentError),
    ("NOT_FOUND", cl.NotFoundError),
    ("ALREADY_EXISTS", cl.AlreadyExistsError),
    ("FAILED_PRECONDITION", cl.FailedPreconditionError),
    ("RESOURCE_EXHAUSTED", cl.ResourceExhaustedError),
    ("UNAUTHENTICATED", cl.UnauthenticatedError),
    ("PERMISSION_DENIED", cl.PermissionDeniedError),
    ("DEADLINE_EXCEEDED", cl.DeadlineExceededError),
    ("CANCELLED", cl.CancelledError),
    ("INTERNAL", cl.InternalError),
    ("ABORTED", AssayClientError),
])
def test_status_codes_map_to_exception_classes(flaky, code, cls):
    _, channel, _ = flaky
    abort = channel.unary_unary("/t.T/Abort")
    with pytest.raises(AssayClientError) as info:
        cl.call_with_retries(FAST, lambda: abort(code.encode(), timeout=5))
    err = info.value
    assert type(err) is cls and err.code == code and str(err) == f"{code}: scripted {code}"
    assert err.message == f"scripted {code}" and isinstance(err.details, dict)


def test_error_for_and_pickling():
    import pickle

    err = cl.error_for("NOT_FOUND", "collection 'x' not found", {"metadata": {}})
    assert isinstance(err, NotFoundError) and str(err) == "NOT_FOUND: collection 'x' not found"
    again = pickle.loads(pickle.dumps(err))
    assert type(again) is NotFoundError and again.code == "NOT_FOUND"
    assert isinstance(cl.error_for("INVALID_ARGUMENT", "bad"), ValueError)
    assert type(cl.error_for("DATA_LOSS", "?")) is AssayClientError


# -- the client against scripted assay servicers -------------------------------------------


class Script:
    """Shared state of the fake servicers: failures to play, what they saw."""

    def __init__(self) -> None:
        self.fail: dict[str, list[grpc.StatusCode]] = {}
        self.calls: Counter[str] = Counter()
        self.metadata: list[dict[str, str]] = []
        self.streams: list[list[int]] = []  # seqs received, per Upsert stream
        self.abort_after: list[int | None] = []  # per stream: UNAVAILABLE after n acks
        self.reject_seq: int | None = None
        self.ack_delay = 0.0
        self.stream_ended = threading.Event()
        self.rows: dict[str, int] = {}
        self.watch: list[jobs_pb2.Job] = []
        self.watch_hang = False

    def enter(self, method: str, context) -> None:
        self.calls[method] += 1
        self.metadata.append(dict(context.invocation_metadata()))
        codes = self.fail.get(method)
        if codes:
            context.abort(codes.pop(0), f"scripted failure of {method}")


class FakeCollections(collections_pb2_grpc.CollectionsServicer):
    def __init__(self, script: Script) -> None:
        self.s = script

    def ListCollections(self, request, context):
        self.s.enter("ListCollections", context)
        if dict(context.invocation_metadata()).get("authorization") == "Bearer wrong":
            context.abort(grpc.StatusCode.UNAUTHENTICATED, "bad token")
        return collections_pb2.ListCollectionsResponse(collections=["a", "b"])

    def DescribeCollection(self, request, context):
        self.s.enter("DescribeCollection", context)
        if request.collection != "pool":
            context.abort(grpc.StatusCode.NOT_FOUND, f"collection '{request.collection}' not found")
        return collections_pb2.CollectionInfo(name="pool", rows=len(self.s.rows), version=7)

    def CreateCollection(self, request, context):
        self.s.enter("CreateCollection", context)
        return collections_pb2.CollectionInfo(name=request.collection)


class FakeIngest(ingest_pb2_grpc.IngestServicer):
    def __init__(self, script: Script) -> None:
        self.s = script

    def Upsert(self, request_iterator, context):
        self.s.enter("Upsert", context)
        seen: list[int] = []
        self.s.streams.append(seen)
        abort_after = self.s.abort_after.pop(0) if self.s.abort_after else None
        for request in request_iterator:
            if abort_after is not None and len(seen) == abort_after:
                context.abort(grpc.StatusCode.UNAVAILABLE, "server going away")
            seen.append(request.seq)
            if request.seq == self.s.reject_seq:
                context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"batch {request.seq}: bad row")
            table = ipc_to_table(request.arrow_ipc)
            ids = table.column("id").to_pylist() if "id" in table.column_names \
                else [None] * table.num_rows
            inserted = sum(1 for i in ids if i not in self.s.rows)
            for i in ids:
                self.s.rows[i or f"gen{len(self.s.rows)}"] = table.num_rows
            time.sleep(self.s.ack_delay)
            yield ingest_pb2.UpsertAck(seq=request.seq, inserted=inserted,
                                       updated=len(ids) - inserted, version=len(seen),
                                       generated_ids=ids.count(None))
        self.s.stream_ended.set()

    def Delete(self, request, context):
        self.s.enter("Delete", context)
        return ingest_pb2.DeleteResponse(deleted=len(request.ids))


class FakeQuery(query_pb2_grpc.QueryServicer):
    def __init__(self, script: Script) -> None:
        self.s = script

    def Scan(self, request, context):
        self.s.enter("Scan", context)
        table = pa.table({"id": [f"r{i}" for i in range(10)], "x": list(range(10))})
        for batch in table.to_batches(max_chunksize=request.page_rows or 8192):
            yield common_pb2.ArrowPage(arrow_ipc=table_to_ipc(batch), rows=batch.num_rows)


class FakeSearch(search_pb2_grpc.SearchServicer):
    def __init__(self, script: Script) -> None:
        self.s = script

    def Search(self, request, context):
        self.s.enter("Search", context)
        n = len(request.vectors.values) // max(1, request.vectors.dim)
        result = pa.table({"query_index": pa.array(np.repeat(np.arange(n), request.k), pa.int32()),
                           "id": [f"hit{i}" for i in range(n * request.k)],
                           "_distance": pa.array(np.zeros(n * request.k), pa.float32())})
        return search_pb2.SearchResponse(arrow_ipc=table_to_ipc(result), queries=n)


def _job(state: int, progress: float = 0.0, **kw) -> jobs_pb2.Job:
    return jobs_pb2.Job(id="job-1", kind="optimize", collection="pool", state=state,
                        progress=progress, **kw)


class FakeJobs(jobs_pb2_grpc.JobsServicer):
    def __init__(self, script: Script) -> None:
        self.s = script

    def StartJob(self, request, context):
        self.s.enter("StartJob", context)
        return _job(jobs_pb2.PENDING, params=request.params)

    def GetJob(self, request, context):
        self.s.enter("GetJob", context)
        return self.s.watch[-1] if self.s.watch else _job(jobs_pb2.PENDING)

    def WatchJob(self, request, context):
        self.s.enter("WatchJob", context)
        yield from self.s.watch
        while self.s.watch_hang and context.is_active():
            time.sleep(0.02)

    def ListJobs(self, request, context):
        self.s.list_jobs_states = list(request.states)
        return jobs_pb2.ListJobsResponse(jobs=[_job(jobs_pb2.RUNNING), _job(jobs_pb2.SUCCEEDED)])


@pytest.fixture
def fake():
    script = Script()
    servicers = [
        (collections_pb2_grpc.add_CollectionsServicer_to_server, FakeCollections),
        (ingest_pb2_grpc.add_IngestServicer_to_server, FakeIngest),
        (query_pb2_grpc.add_QueryServicer_to_server, FakeQuery),
        (search_pb2_grpc.add_SearchServicer_to_server, FakeSearch),
        (jobs_pb2_grpc.add_JobsServicer_to_server, FakeJobs),
    ]

    def register(server):
        for add, cls in servicers:
            add(cls(script), server)
        health_pb2_grpc.add_HealthServicer_to_server(health.HealthServicer(), server)

    server, address = _serve(register)
    client = Client(address, token="s3cret", timeout=5)
    client.retry = FAST
    yield script, client, address
    client.close()
    server.stop(None)


def test_client_unary_calls_retry_and_send_the_token(fake):
    script, client, _ = fake
    script.fail["ListCollections"] = [grpc.StatusCode.UNAVAILABLE] * 2
    assert client.list_collections() == ["a", "b"]
    assert script.calls["ListCollections"] == 3
    assert all(md.get("authorization") == "Bearer s3cret" for md in script.metadata)
    assert client.health() == "SERVING"
    assert client.collection("pool").describe()["version"] == 7
    with pytest.raises(NotFoundError, match="collection 'nope' not found"):
        client.collection("nope").describe()
    assert client.create_collection("pool", spaces={"clip": 8}).name == "pool"
    assert client.collection("pool").delete(ids=["a", "b"]) == 2
    assert client.collection("pool").delete(ids=[]) == 0 and script.calls["Delete"] == 1


def test_wrong_token_and_unreachable_server(fake):
    _, _, address = fake
    with Client(address, token="wrong") as bad, pytest.raises(UnauthenticatedError):
        bad.list_collections()
    with Client("127.0.0.1:1", timeout=2, retries=1) as gone, pytest.raises(UnavailableError):
        gone.list_collections()


def test_upsert_streams_batches_and_sums_acknowledgements(fake):
    script, client, _ = fake
    n = 2500
    data = {"id": [f"r{i}" for i in range(n)], "emb_x": np.ones((n, 16), np.float32)}
    summary = client.collection("pool").upsert(data, batch_rows=1000)
    assert (summary.inserted, summary.updated, summary.batches, summary.rows) == (n, 0, 3, n)
    assert script.streams == [[0, 1, 2]] and summary.version == 3
    again = client.collection("pool").upsert(pa.table({"id": ["r0", "new"]}))
    assert (again.inserted, again.updated) == (1, 1)
    empty = client.collection("pool").upsert([])
    assert empty.batches == 0 and len(script.streams) == 2


def test_a_server_older_than_upsert_batch_gets_a_stream_and_the_client_keeps_to_streams(fake):
    script, client, _ = fake  # the fake Ingest has no UpsertBatch: gRPC answers UNIMPLEMENTED
    for k in range(2):
        summary = client.collection("pool").upsert({"id": [f"old{k}", None]})
        assert (summary.inserted, summary.batches, summary.generated_ids) == (2, 1, 1)
    assert script.streams == [[0], [0]] and not client._server_has_upsert_batch


def test_upsert_splits_under_the_message_limit(fake):
    script, _, address = fake
    with Client(address, max_message_bytes=cl._REQUEST_ENVELOPE + 40_000) as small:
        data = {"id": [f"r{i}" for i in range(1000)], "emb_x": np.ones((1000, 32))}
        summary = small.collection("pool").upsert(data)
    assert summary.rows == 1000 and summary.batches > 3
    assert script.streams[0] == list(range(summary.batches))


def test_upsert_of_an_iterator_is_streamed_chunk_by_chunk(fake):
    script, client, _ = fake
    produced = []

    def chunks():
        for i in range(6):
            produced.append(i)
            yield pa.table({"id": [f"c{i}-{j}" for j in range(100)]})

    summary = client.collection("pool").upsert(chunks(), batch_rows=100, progress=True)
    assert summary.batches == 6 and summary.rows == 600 and produced == list(range(6))


def test_upsert_resumes_a_materialised_table_from_the_first_unacknowledged_batch(fake):
    script, client, _ = fake
    script.abort_after = [2]  # first stream: UNAVAILABLE after acknowledging batches 0 and 1
    data = pa.table({"id": [f"r{i}" for i in range(500)]})
    summary = client.collection("pool").upsert(data, batch_rows=100)
    assert script.streams[0] == [0, 1]
    assert script.streams[1] == [2, 3, 4]
    assert summary.batches == 5 and summary.rows == 500 and summary.inserted == 500


@pytest.mark.parametrize("data", [
    (pa.table({"id": [f"r{i}" for i in range(j * 100, (j + 1) * 100)]}) for j in range(5)),
    pa.table({"id": [f"r{i}" if i else None for i in range(500)]}),  # a row without id
])
def test_upsert_is_not_resumed_when_replaying_is_unsafe(fake, data):
    script, client, _ = fake
    script.abort_after = [2]
    with pytest.raises(UnavailableError, match="server going away") as info:
        client.collection("pool").upsert(data, batch_rows=100)
    committed = info.value.details["committed"]
    assert committed.batches == 2 and committed.rows == 200 and len(script.streams) == 1


def test_upsert_rejected_batch_reports_the_committed_part(fake):
    script, client, _ = fake
    script.reject_seq = 3
    with pytest.raises(InvalidArgumentError, match="batch 3: bad row") as info:
        client.collection("pool").upsert({"id": [f"r{i}" for i in range(1000)]}, batch_rows=100)
    assert info.value.details["committed"].batches == 3


def test_upsert_error_in_the_input_iterator_is_raised(fake):
    _, client, _ = fake

    def chunks():
        yield {"id": ["a"]}
        raise RuntimeError("source broke")

    with pytest.raises(RuntimeError, match="source broke"):
        client.collection("pool").upsert(chunks())


def test_scan_query_and_search(fake):
    script, client, _ = fake
    script.fail["Scan"] = [grpc.StatusCode.UNAVAILABLE]  # retried: no page had arrived
    col = client.collection("pool")
    pages = list(col.scan(page_rows=4))
    assert [p.num_rows for p in pages] == [4, 4, 2] and script.calls["Scan"] == 2
    assert col.query(page_rows=3).column("x").to_pylist() == list(range(10))
    one = col.search("clip", np.ones(4), k=3)
    assert one.column_names == ["id", "_distance"] and one.num_rows == 3
    many = col.search("clip", np.ones((2, 4)), k=3)
    assert many.column("query_index").to_pylist() == [0, 0, 0, 1, 1, 1]


def test_job_wait_watch_and_failures(fake, capsys):
    script, client, _ = fake
    col = client.collection("pool")
    result = struct_pb2.Struct()
    result.update({"compacted": 3})
    script.watch = [_job(jobs_pb2.RUNNING, 0.5, message="compacting"),
                    _job(jobs_pb2.SUCCEEDED, 1.0, result=result)]
    job = col.optimize(cleanup_older_than_s=60)
    assert job.state == "PENDING" and job.params == {"cleanup_older_than_s": 60}
    assert job.wait(progress=True) is job
    assert job.state == "SUCCEEDED" and job.result == {"compacted": 3} and job.done
    assert "optimize" in capsys.readouterr().err
    assert [j.state for j in client.job("job-1").watch()] == ["RUNNING", "SUCCEEDED"]
    assert [j.state for j in client.list_jobs(states=["RUNNING"])] == ["RUNNING", "SUCCEEDED"]
    assert script.list_jobs_states == [jobs_pb2.RUNNING]  # the filter reached the server

    script.watch = [_job(jobs_pb2.FAILED, 0.3, error="space 'x' not found", error_code="NOT_FOUND")]
    with pytest.raises(NotFoundError, match="FAILED: space 'x' not found") as info:
        col.build_index("x").wait()
    assert info.value.details["job"].error_code == "NOT_FOUND"
    script.watch = [_job(jobs_pb2.INTERRUPTED)]
    with pytest.raises(AssayClientError) as info:
        col.recall_check("clip").wait()
    assert info.value.code == "ABORTED"

    script.watch, script.watch_hang = [_job(jobs_pb2.RUNNING, 0.1)], True
    with pytest.raises(DeadlineExceededError, match="still RUNNING"):
        col.optimize().wait(timeout=0.3)


def test_job_wait_watches_again_after_losing_the_server(fake):
    script, client, _ = fake
    script.fail["WatchJob"] = [grpc.StatusCode.UNAVAILABLE] * 2
    script.watch = [_job(jobs_pb2.SUCCEEDED, 1.0)]
    assert client.collection("pool").optimize().wait().state == "SUCCEEDED"
    assert script.calls["WatchJob"] == 3


def test_progress_falls_back_to_stderr_without_tqdm(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "tqdm.auto", None)  # import fails
    bar = cl.Progress(True, total=10, desc="upsert", unit="rows")
    bar.update(10, "v3")
    bar.close()
    assert "upsert: 10/10 rows v3" in capsys.readouterr().err


def test_async_client_same_surface(fake):
    script, _, address = fake
    result = struct_pb2.Struct()
    result.update({"ok": True})
    script.watch = [_job(jobs_pb2.RUNNING, 0.5), _job(jobs_pb2.SUCCEEDED, 1.0, result=result)]
    script.fail["ListCollections"] = [grpc.StatusCode.UNAVAILABLE]

    async def main():
        async with AsyncClient(address, token="s3cret") as client:
            client.retry = FAST
            names = await client.list_collections()
            col = client.collection("pool")
            summary = await col.upsert({"id": [f"a{i}" for i in range(250)]}, batch_rows=100)
            pages = [p.num_rows async for p in col.scan(page_rows=5)]
            hits = await col.search("clip", np.ones(3), k=2)
            table = await col.query()
            job = await (await col.optimize()).wait()
            watched = [j.state async for j in (await client.job("job-1")).watch()]
            with pytest.raises(NotFoundError):
                await client.collection("nope").describe()
            return names, summary, pages, hits, table, job, watched, await client.health()

    names, summary, pages, hits, table, job, watched, status = asyncio.run(main())
    assert names == ["a", "b"] and script.calls["ListCollections"] == 2
    assert summary.batches == 3 and summary.rows == 250 and script.streams == [[0, 1, 2]]
    assert pages == [5, 5] and hits.column_names == ["id", "_distance"] and table.num_rows == 10
    assert job.state == "SUCCEEDED" and job.result == {"ok": True}
    assert watched == ["RUNNING", "SUCCEEDED"] and status == "SERVING"
    assert script.metadata[0]["authorization"] == "Bearer s3cret"


def test_async_upsert_resume(fake):
    script, _, address = fake
    script.abort_after = [1]

    async def main():
        async with AsyncClient(address) as client:
            client.retry = FAST
            data = pa.table({"id": list("abcdef")})
            return await client.collection("pool").upsert(data, batch_rows=2)

    summary = asyncio.run(main())
    assert script.streams == [[0], [1, 2]] and summary.batches == 3 and summary.rows == 6


def test_upsert_window_bounds_unacknowledged_batches():
    """A slow server that reads requests eagerly never has more than the window unacknowledged."""
    received: list[int] = []
    outstanding: list[int] = []

    class Slow(ingest_pb2_grpc.IngestServicer):
        def Upsert(self, request_iterator, context):
            seqs: queue.Queue[int | None] = queue.Queue()

            def read() -> None:
                for request in request_iterator:
                    received.append(request.seq)
                    seqs.put(request.seq)
                seqs.put(None)

            threading.Thread(target=read, daemon=True).start()
            acked = 0
            while (seq := seqs.get()) is not None:
                time.sleep(0.03)  # the client would run ahead here if it could
                outstanding.append(len(received) - acked)
                yield ingest_pb2.UpsertAck(seq=seq, inserted=1)
                acked += 1

    server, address = _serve(lambda s: ingest_pb2_grpc.add_IngestServicer_to_server(Slow(), s))
    try:
        with Client(address) as client:
            data = {"id": [str(i) for i in range(12)]}
            summary = client.collection("pool").upsert(data, batch_rows=1)
        assert summary.batches == 12 and summary.inserted == 12 and received == list(range(12))
        assert 2 <= max(outstanding) <= cl._UPSERT_WINDOW
    finally:
        server.stop(None)


def test_async_upsert_reports_the_servers_rejection(fake):
    """grpc.aio can turn a rejected bidi stream into INTERNAL (grpc/grpc#36066); the async
    client's upsert must still report the server's INVALID_ARGUMENT, every time."""
    script, _, address = fake

    async def main():
        codes = Counter()
        async with AsyncClient(address) as client:
            for _ in range(30):
                script.reject_seq = 1
                try:
                    await client.collection("pool").upsert({"id": [f"r{j}" for j in range(100)]},
                                                           batch_rows=10)
                except AssayClientError as exc:
                    codes[exc.code] += 1
                    assert exc.details["committed"].batches == 1
        return codes

    assert asyncio.run(main()) == {"INVALID_ARGUMENT": 30}


def test_cancelling_an_async_upsert_cancels_the_stream(fake):
    script, _, address = fake
    script.ack_delay = 0.05

    async def main():
        async with AsyncClient(address) as client:
            task = asyncio.create_task(
                client.collection("pool").upsert({"id": [str(i) for i in range(200)]},
                                                 batch_rows=1))
            await asyncio.sleep(0.3)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task

    asyncio.run(main())
    time.sleep(0.5)
    assert len(script.streams) == 1 and len(script.streams[0]) < 50
    assert not script.stream_ended.is_set()  # the server saw the stream cancelled, not completed


def _self_signed(name: str) -> tuple[bytes, bytes]:
    import datetime as dt

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = dt.datetime.now(dt.UTC)
    cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName(name)]), critical=False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
    return cert.public_bytes(serialization.Encoding.PEM), key_pem


def test_tls_with_root_certificates_as_bytes_text_or_path(tmp_path):
    cert, key = _self_signed("assay.test")
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    collections_pb2_grpc.add_CollectionsServicer_to_server(FakeCollections(Script()), server)
    port = server.add_secure_port("127.0.0.1:0", grpc.ssl_server_credentials([(key, cert)]))
    server.start()
    path = tmp_path / "ca.pem"
    path.write_bytes(cert)
    try:
        for roots in (cert, cert.decode(), str(path), path):
            with Client(f"127.0.0.1:{port}", tls=True, root_certificates=roots,
                        server_name_override="assay.test") as client:
                assert client.list_collections() == ["a", "b"]
        with Client(f"127.0.0.1:{port}", timeout=3, retries=0) as plain, \
                pytest.raises(AssayClientError):
            plain.list_collections()  # plain text against a TLS port
    finally:
        server.stop(None)


# -- the asyncio client is generated from the sync one ----------------------------------------


def test_the_asyncio_client_is_the_generated_twin_of_the_sync_one():
    import inspect

    from service.client import (
        AsyncClient,
        AsyncCollection,
        AsyncDataset,
        AsyncJob,
        AsyncMiningJob,
        Collection,
        Dataset,
        Job,
        MiningJob,
    )

    check = subprocess.run([sys.executable, "-m", "service.client.generate", "--check"], cwd=ROOT,
                           capture_output=True, text=True)
    assert check.returncode == 0, check.stderr  # async_client.py is what sync.py generates
    pairs = [(Client, AsyncClient), (Collection, AsyncCollection), (Dataset, AsyncDataset),
             (Job, AsyncJob), (MiningJob, AsyncMiningJob)]
    iterators = {"scan", "checkout_batches", "result_pages"}  # plain methods giving a stream
    for sync_cls, async_cls in pairs:
        # the methods written in sync.py (not those of the shared JobView or the transports)
        public = {n for c in sync_cls.__mro__ if c.__module__ == "service.client.sync"
                  for n in vars(c) if not n.startswith("_")}
        public -= {"score_stream"} if sync_cls is Collection else set()
        assert public <= set(dir(async_cls)), (async_cls, public - set(dir(async_cls)))
        for name in public:
            sync_fn, async_fn = getattr(sync_cls, name), getattr(async_cls, name)
            if isinstance(inspect.getattr_static(sync_cls, name), property) or not callable(sync_fn):
                continue
            assert list(inspect.signature(sync_fn).parameters) == \
                list(inspect.signature(async_fn).parameters), (async_cls, name)
            if name in ("collection", "dataset") or name in iterators:
                assert not inspect.iscoroutinefunction(async_fn), (async_cls, name)
            elif name == "watch" or name == "pages":
                assert inspect.isasyncgenfunction(async_fn), (async_cls, name)
            else:
                assert inspect.iscoroutinefunction(async_fn), (async_cls, name)
    # what the generator leaves out is written by hand in service/client/aio.py
    assert not hasattr(AsyncCollection, "score_stream")
    assert inspect.iscoroutinefunction(AsyncClient.show)
    assert inspect.iscoroutinefunction(AsyncMiningJob.show)
