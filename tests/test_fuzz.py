"""Property tests (hypothesis) of the two validators every hostile request meets first.

* Filters: random strings and structured near-SQL (columns, literals, functions, operators,
  combinators, then SQL punctuation spliced in) never fail with anything but
  InvalidArgument in :meth:`Collection.validate_filter`, and through the server (Count,
  Search, Scan) never answer anything but OK or INVALID_ARGUMENT; no table changes version.
* Ingest: random Arrow batches (ids good, duplicated, null, empty or not strings; vectors
  of the wrong dimension, NaN, infinity, nulls, integers; predictions that do not sum to 1;
  user fields of random names and types) sent as Arrow IPC to Ingest.Upsert are either
  accepted whole (every row there, counts matching the acknowledgement) or refused with
  INVALID_ARGUMENT and every table at its version: never a partial batch.

Examples are bounded (``max_examples``) so that the module runs in well under 30 s.
"""

from __future__ import annotations

import math
import string

import grpc
import numpy as np
import pyarrow as pa
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from indexing.errors import InvalidArgument
from protos.assay.v1 import (
    common_pb2,
    ingest_pb2,
    ingest_pb2_grpc,
    query_pb2,
    query_pb2_grpc,
    search_pb2,
    search_pb2_grpc,
)
from service.arrow_ipc import table_to_ipc
from service.client import Client
from service.server import ServerConfig, start_server

CLASSES = ["a", "b", "c"]
DIM = 4
FUZZ = settings(deadline=None, derandomize=True, print_blob=True,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    srv = start_server(ServerConfig(data=str(tmp_path_factory.mktemp("fuzz")), port=0, grace_s=1, optimize_every=0))
    client = Client(srv.address, retries=0, timeout=60)
    col = client.create_collection("fuzz", spaces={"v": DIM}, models={"m": CLASSES})
    rng = np.random.default_rng(0)
    n = 40
    probs = rng.dirichlet(np.ones(3), n)
    col.upsert({"id": [f"r{i:02d}" for i in range(n)], "n": np.arange(n), "score": rng.random(n),
                "label": [CLASSES[i % 3] if i % 2 else None for i in range(n)],
                "text": [f"t{i}" for i in range(n)], "tags": [["x"] if i % 5 == 0 else [] for i in range(n)],
                "emb_v": rng.standard_normal((n, DIM)).astype(np.float32),
                "pred_m": [{"probs": (p / p.sum()).tolist()} for p in probs]})
    channel = grpc.insecure_channel(srv.address)
    yield srv, srv.store.collection("fuzz"), query_pb2_grpc.QueryStub(channel), \
        search_pb2_grpc.SearchStub(channel), ingest_pb2_grpc.IngestStub(channel)
    channel.close()
    client.close()
    srv.stop(1)


def versions(srv) -> dict[str, int]:
    db = srv.store._db
    return {name: db.open_table(name).version for name in srv.store._table_names()}


# -- filters -------------------------------------------------------------------------------

TEXT = st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=12)  # protobuf needs UTF-8
COLUMNS = st.sampled_from(["id", "n", "score", "label", "text", "tags", "emb_v", "pred_m", "pred_m.probs",
                           "pred_m.probs[1]", "pred_m.loss", "created_at", "nope", "`n`", '"n"', "N", "_rowid",
                           "fuzz.n", "*"])
LITERALS = st.one_of(
    st.integers(-(2**70), 2**70).map(str),
    st.floats(allow_nan=True, allow_infinity=True).map(repr),
    TEXT.map(lambda s: "'" + s.replace("'", "''") + "'"),
    TEXT.map(lambda s: "'" + s + "'"),  # quotes not doubled: may end early
    st.sampled_from(["NULL", "TRUE", "FALSE", "DATE '2024-01-01'", "TIMESTAMP '2024-01-01 00:00:00'",
                     "'2024-13-45'", "[1, 2]", "['x']", "1e400", "-0", "0x10", "$1", ":x", "?", "''", "N'x'"]),
)
FUNCTIONS = st.sampled_from(["lower", "upper", "abs", "array_has_any", "array_length", "regexp_match",
                             "regexp_like", "length", "coalesce", "sleep", "pg_sleep", "load_file", "random",
                             "now", "CAST", "count", "sum", "unknown_fn"])
OPS = st.sampled_from(["=", "!=", "<>", "<", ">", "<=", ">=", "LIKE", "NOT LIKE", "ILIKE", "+", "-", "*", "/", "%",
                       "||", "IN", "IS", "IS NOT", "==", "AND", "OR"])
PUNCT = st.sampled_from([";", "'", '"', "(", ")", "--", "/*", "*/", "\\", "\x00", "\n", "%", "`", ",", "[", "]",
                         " OR 1=1", " UNION SELECT 1", "; DROP TABLE fuzz", ") OR (", "$1", ":name", "::int"])


def _call(fn, args):
    if fn == "CAST":
        return f"CAST({args[0] if args else 'n'} AS {['INT', 'FLOAT', 'STRING', 'BOOLEAN', 'DATE', 'BLOB'][len(args) % 6]})"
    return f"{fn}({', '.join(args)})"


ATOMS = st.one_of(COLUMNS, LITERALS, st.builds(_call, FUNCTIONS, st.lists(st.one_of(COLUMNS, LITERALS), max_size=3)))
LEAVES = st.one_of(
    st.builds(lambda a, op, b: f"{a} {op} {b}", ATOMS, OPS, ATOMS),
    st.builds(lambda a, s: f"{a} {s}", ATOMS, st.sampled_from(["IS NULL", "IS NOT NULL", "IS TRUE", ""])),
    st.builds(lambda a, xs: f"{a} IN ({', '.join(xs)})", ATOMS, st.lists(LITERALS, max_size=4)),
    st.builds(lambda a, lo, hi: f"{a} BETWEEN {lo} AND {hi}", ATOMS, LITERALS, LITERALS),
)
EXPRESSIONS = st.recursive(LEAVES, lambda inner: st.one_of(
    st.builds(lambda a, op, b: f"{a} {op} {b}", inner, st.sampled_from(["AND", "OR", "and", "||", ""]), inner),
    inner.map(lambda a: f"NOT {a}"),
    inner.map(lambda a: f"({a})"),
), max_leaves=6)


@st.composite
def mutated(draw) -> str:
    """A near-SQL expression with SQL punctuation spliced in at random places."""
    text = draw(EXPRESSIONS)
    for _ in range(draw(st.integers(0, 3))):
        at = draw(st.integers(0, len(text)))
        text = text[:at] + draw(PUNCT) + text[at:]
    return text


FILTERS = st.one_of(
    TEXT,
    st.text(alphabet=string.ascii_letters + string.digits + " _'\"()=<>!;,.*-/%[]$:`\n", max_size=60),
    EXPRESSIONS,
    mutated(),
)


@settings(FUZZ, max_examples=120)
@given(where=FILTERS)
def test_filter_validation_only_ever_raises_invalid_argument(env, where):
    srv, col, *_ = env
    before = versions(srv)
    try:
        wrapped = col.validate_filter(where)
    except InvalidArgument as exc:
        event("refused")
        assert exc.message.startswith("filter")
    else:
        event("accepted")
        assert wrapped == f"({where}\n)"
    assert versions(srv) == before


@settings(FUZZ, max_examples=80)
@given(where=FILTERS)
def test_filters_through_the_server_are_ok_or_invalid_argument(env, where):
    srv, _col, query, search, _ = env
    before = versions(srv)
    calls = [
        lambda: query.Count(query_pb2.CountRequest(collection="fuzz", where=where), timeout=30),
        lambda: search.Search(search_pb2.SearchRequest(
            collection="fuzz", space="v", k=3, where=where,
            vectors=common_pb2.Vectors(dim=DIM, values=[1.0, 0.0, 0.0, 0.0])), timeout=30),
        lambda: list(query.Scan(query_pb2.ScanRequest(collection="fuzz", where=where, limit=5, columns=["id"]),
                                timeout=30)),
    ]
    outcomes = []
    for call in calls:
        try:
            call()
            outcomes.append("OK")
        except grpc.RpcError as exc:
            assert exc.code() == grpc.StatusCode.INVALID_ARGUMENT, (where, exc.code(), exc.details())
            assert exc.details() and len(exc.details()) <= 2100
            outcomes.append(exc.details())
    # One validation: the calls agree on whether the filter is acceptable, unless it failed
    # on the rows while running (a scan with a limit may stop before the row that fails).
    planned = {"OK" if o == "OK" or "failed while running on the rows" in o else "refused" for o in outcomes}
    event("/".join(sorted(planned)))
    assert len(planned) == 1, (where, outcomes)
    assert versions(srv) == before


# -- ingest --------------------------------------------------------------------------------

IDENT = st.from_regex(r"[a-z][a-z0-9_]{0,6}", fullmatch=True)
FIELD_NAMES = st.one_of(st.sampled_from(["n", "score", "label", "text", "uri", "tags", "flag", "when", "bad name",
                                         "created_at", "updated_at", "emb_q", "pred_zz", "x__y", "1st", "é"]),
                        IDENT.map(lambda s: f"f_{s}"))


def _floats(draw, n: int, *, bad: bool) -> list[float | None]:
    pool = st.floats(-1e6, 1e6, allow_nan=False, width=32)
    if bad:
        pool = st.one_of(pool, st.sampled_from([math.nan, math.inf, -math.inf, None]))
    return draw(st.lists(pool, min_size=n, max_size=n))


def _user_column(draw, n: int) -> pa.Array:
    kind = draw(st.sampled_from(["int", "float", "string", "bool", "timestamp", "list", "struct", "null", "raw"]))
    if kind == "raw":  # bytes in a string column, unchecked: often not UTF-8
        values = draw(st.lists(st.binary(max_size=6), min_size=n, max_size=n))
        offsets = np.cumsum([0, *map(len, values)]).astype(np.int32)
        return pa.Array.from_buffers(pa.string(), n, [None, pa.py_buffer(offsets.tobytes()),
                                                      pa.py_buffer(b"".join(values))])
    if kind == "int":
        return pa.array(draw(st.lists(st.one_of(st.none(), st.integers(-(2**63), 2**63 - 1)), min_size=n, max_size=n)),
                        pa.int64())
    if kind == "float":
        return pa.array(_floats(draw, n, bad=True), pa.float64())
    if kind == "string":
        return pa.array(draw(st.lists(st.one_of(st.none(), TEXT), min_size=n, max_size=n)), pa.string())
    if kind == "bool":
        return pa.array(draw(st.lists(st.one_of(st.none(), st.booleans()), min_size=n, max_size=n)), pa.bool_())
    if kind == "timestamp":
        return pa.array(draw(st.lists(st.integers(0, 2**50), min_size=n, max_size=n)), pa.timestamp("us"))
    if kind == "list":
        return pa.array(draw(st.lists(st.lists(st.integers(0, 9), max_size=3), min_size=n, max_size=n)))
    if kind == "struct":
        return pa.array([{"k": i} for i in range(n)])
    return pa.nulls(n)


@st.composite
def batches(draw) -> pa.Table:
    n = draw(st.integers(0, 6))
    cols: dict[str, pa.Array] = {}
    id_kind = draw(st.sampled_from(["fresh", "fresh", "existing", "mixed", "dup", "null", "empty", "int", "none",
                                    "unicode"]))
    if id_kind != "none":
        pick = draw(st.lists(st.integers(0, 59), min_size=n, max_size=n, unique=id_kind != "dup"))
        if id_kind == "dup" and n >= 2:
            pick[-1] = pick[0]
        ids: list = [f"r{i:02d}" if id_kind == "existing" or (id_kind == "mixed" and i % 2) else f"h{i:02d}"
                     for i in pick]
        if id_kind == "null" and n:
            ids[draw(st.integers(0, n - 1))] = None
        if id_kind == "empty" and n:
            ids[0] = ""
        if id_kind == "unicode":
            ids = [f"ü-{i}-{draw(TEXT)}" for i in range(n)]
        cols["id"] = pa.array(pick, pa.int64()) if id_kind == "int" else pa.array(ids, pa.string())
    emb = draw(st.sampled_from(["absent", "ok", "ok", "dim", "nan", "null_row", "zero", "list", "ints", "strings"]))
    if emb != "absent":
        dim = DIM + 1 if emb == "dim" else DIM
        rows = [[v if v is not None else 0.5 for v in _floats(draw, dim, bad=emb == "nan")] for _ in range(n)]
        if emb == "nan" and n:
            rows[0][0] = draw(st.sampled_from([math.nan, math.inf, -math.inf]))
        if emb == "zero" and n:
            rows[0] = [0.0] * dim
        if emb == "ints":
            cols["emb_v"] = pa.array([[int(x) % 7 + 1 for x in r] for r in rows], pa.list_(pa.int64(), dim))
        elif emb == "strings":
            cols["emb_v"] = pa.array([[str(x) for x in r] for r in rows])
        elif emb == "list":
            cols["emb_v"] = pa.array(rows, pa.list_(pa.float32()))
        else:
            values = [None if emb == "null_row" and i == 0 else r for i, r in enumerate(rows)]
            cols["emb_v"] = pa.array(values, pa.list_(pa.float32(), dim))
    pred = draw(st.sampled_from(["absent", "ok", "ok", "sum", "nan", "len", "extra", "not_struct"]))
    if pred != "absent":
        probs = [list(np.random.default_rng(i).dirichlet(np.ones(3))) for i in range(n)]
        if pred == "sum" and n:
            probs[0] = [0.5, 0.6, 0.1]
        if pred == "nan" and n:
            probs[0] = [math.nan, 0.5, 0.5]
        if pred == "len" and n:
            probs[0] = probs[0] + [0.0]
        if pred == "not_struct":
            cols["pred_m"] = pa.array([p[0] for p in probs], pa.float64())
        else:
            rows = [{"probs": p, **({"oops": 1} if pred == "extra" else {})} for p in probs]
            cols["pred_m"] = pa.array(rows) if n else pa.nulls(0, pa.struct([("probs", pa.list_(pa.float64()))]))
    for _ in range(draw(st.integers(0, 2))):
        cols[draw(FIELD_NAMES)] = _user_column(draw, n)
    if not cols:
        cols["id"] = pa.array([f"h{i}" for i in range(n)], pa.string())
    return pa.table(cols)


def _send(ingest, table: pa.Table) -> list:
    request = ingest_pb2.UpsertRequest(collection="fuzz", seq=0, arrow_ipc=table_to_ipc(table))
    return list(ingest.Upsert(iter([request]), timeout=60))


@settings(FUZZ, max_examples=100)
@given(table=batches())
def test_a_random_batch_is_accepted_whole_or_refused_without_a_write(env, table):
    srv, col, *_, ingest = env
    before = versions(srv)
    rows_before = col.count()
    try:
        acks = _send(ingest, table)
    except grpc.RpcError as exc:
        event("refused")
        assert exc.code() == grpc.StatusCode.INVALID_ARGUMENT, (exc.code(), exc.details(), table.schema)
        assert exc.details().startswith("batch 0: ")
        assert versions(srv) == before, "a refused batch changed a table"
        assert col.count() == rows_before
        return
    (ack,) = acks
    event("accepted")
    assert ack.inserted + ack.updated == table.num_rows
    assert col.count() == rows_before + ack.inserted
    assert col.version > before["fuzz"]
    others = {k: v for k, v in versions(srv).items() if k != "fuzz"}
    assert others == {k: v for k, v in before.items() if k != "fuzz"}
    if "id" in table.column_names and table.column("id").null_count == 0:
        ids = table.column("id").to_pylist()
        stored = col.take(ids, ["id", "emb_v"])
        assert sorted(stored.column("id").to_pylist()) == sorted(ids), "a row of an accepted batch is missing"
        if "emb_v" in table.column_names:
            sent = dict(zip(ids, table.column("emb_v").to_pylist(), strict=True))
            for i, v in zip(stored.column("id").to_pylist(), stored.column("emb_v").to_pylist(), strict=True):
                if sent[i] is not None:  # stored normalised (cosine space), finite
                    assert v is not None and abs(float(np.linalg.norm(v)) - 1.0) < 1e-4
