"""indexing.filters: the one SQL scanner, filter checks, quoting; and the client's
parameter binding agreeing with the server's validation on a real Lance table."""

from __future__ import annotations

import lancedb
import numpy as np
import pyarrow as pa
import pytest

from indexing.errors import InvalidArgument
from indexing.filters import (
    CODE,
    COMMENT,
    IDENTIFIER,
    STRING,
    any_row,
    check_filter,
    ids_predicate,
    placeholders,
    scan,
    sql_quote,
)
from service.client import InvalidArgumentError, bind_params
from service.client.sql import bound

# -- the scanner -------------------------------------------------------------------------------


@pytest.mark.parametrize(("sql", "segments"), [
    ("n = 1", [(CODE, "n = 1")]),
    ("label = 'it''s'", [(CODE, "label = "), (STRING, "'it'"), (STRING, "'s'")]),
    ('"odd;col" = `x(y`', [(IDENTIFIER, '"odd;col"'), (CODE, " = "), (IDENTIFIER, "`x(y`")]),
    ("n = 1 -- it's ;\nAND m = 2", [(CODE, "n = 1 "), (COMMENT, "-- it's ;\n"), (CODE, "AND m = 2")]),
    ("a /* b */ c", [(CODE, "a "), (COMMENT, "/* b */"), (CODE, " c")]),
    ("a /* /* */ */", [(CODE, "a "), (COMMENT, "/* /* */"), (CODE, " */")]),  # not nested, as Lance
    ("x = 'open", [(CODE, "x = "), (STRING, "'open")]),  # unterminated: to the end
    ("a - -1", [(CODE, "a - -1")]),
])
def test_scan_splits_like_lances_tokenizer(sql, segments):
    got = [(s.kind, s.text) for s in scan(sql)]
    assert got == segments
    assert "".join(text for _, text in got) == sql


@pytest.mark.parametrize(("sql", "names"), [
    ("label = :l AND n > :n", {"l", "n"}),
    ("n::bigint = :n", {"n"}),
    ("label = ':l' OR \"a:b\" = 1 OR `c:d` = 2", set()),
    ("n = :a -- :b\n AND /* :c */ m = :d", {"a", "d"}),
    ("n = :1", set()),  # not a name
    ("t = ':x''s' AND u = :y", {"y"}),
])
def test_placeholders_only_in_code(sql, names):
    assert placeholders(sql) == names


def test_check_filter_wraps_and_refuses_what_lance_would_ignore():
    assert check_filter(None) is None
    assert check_filter("n = 1") == "(n = 1\n)"
    assert check_filter("label = 'a;b' AND `c)` = 1") == "(label = 'a;b' AND `c)` = 1\n)"
    for bad, why in [("n = 1; DROP TABLE t", "';' is not allowed"),
                     ("n = 1) OR (1 = 1", "unbalanced parentheses"),
                     ("n = 1 -- ) OR (1 = 1", "unbalanced parentheses"),  # comments count
                     ("label = 'x' -- ;", "';' is not allowed"),
                     ("   ", "non-empty")]:
        with pytest.raises(InvalidArgument, match=why):
            check_filter(bad)


def test_sql_quote_and_ids_predicate():
    assert sql_quote("it's") == "'it''s'"
    assert ids_predicate(["a", "b'c"]) == "id IN ('a', 'b''c')"


# -- the client and the server read a filter the same way ---------------------------------------

ROWS = [
    {"id": "r1", "label": ":x", "text": "it's :x", "n": 1},
    {"id": "r2", "label": "a", "text": "plain", "n": 2},
    {"id": "r3", "label": "a--b", "text": "x -- y", "n": 3},
    {"id": "r4", "label": "it's", "text": "/* :x */", "n": 4},
    {"id": "r5", "label": None, "text": None, "n": -3},
]

# (filter, params, placeholders the client finds, ids that match once bound)
TRICKY = [
    ("label = ':x'", None, set(), {"r1"}),
    ("text = 'it''s :x'", None, set(), {"r1"}),
    ("label = :x -- OR label = :y\n", {"x": "a"}, {"x"}, {"r2"}),
    ("label = :x /* :y */ OR n = :n", {"x": "a--b", "n": 4}, {"x", "n"}, {"r3", "r4"}),
    ("text = '/* :x */' OR label = :l", {"l": "it's"}, {"l"}, {"r4"}),
    ("`label` = ':x' OR \"n\" = :n", {"n": 2}, {"n"}, {"r1", "r2"}),
    ("n::bigint < :k", {"k": 2}, {"k"}, {"r1", "r5"}),
    ("n - :k < 0", {"k": -3}, {"k"}, set()),  # "n - (-3)": not a "--" comment
    ("label = :v", {"v": "x' OR '1'='1"}, {"v"}, set()),  # a value stays one string
    ("label = :v OR n = 3", {"v": "a'); DROP TABLE t; --"}, {"v"}, {"r3"}),
    ("label IN (:xs)", {"xs": ["a", ":x", "nope"]}, {"xs"}, {"r1", "r2"}),
]


@pytest.fixture(scope="module")
def table_col(tmp_path_factory):
    from indexing.store import Store

    store = Store(str(tmp_path_factory.mktemp("filters") / "data"))
    col = store.create_collection("t", fields={"n": pa.int64()})
    col.upsert(pa.Table.from_pylist(ROWS, schema=pa.schema([
        ("id", pa.string()), ("label", pa.string()), ("text", pa.string()), ("n", pa.int64())])))
    return col


@pytest.mark.parametrize(("where", "params", "names", "ids"), TRICKY)
def test_client_binding_and_server_validation_agree(table_col, where, params, names, ids):
    col = table_col
    # The client finds the placeholders Lance would see as code: unbound, the server
    # refuses exactly the filters that have some (Lance cannot plan a `:name`) ...
    assert placeholders(where) == names
    if names:
        with pytest.raises(InvalidArgument, match="is invalid"):
            col.validate_filter(where)
        with pytest.raises(InvalidArgumentError, match="no params were given"):
            bound(where, None)
    # ... and the `:x` text inside literals and comments is left alone by both: bound, the
    # filter validates and selects exactly the rows it says.
    sql = bind_params(where, params) if params is not None else bound(where, None)
    assert placeholders(sql) == set()
    wrapped = col.validate_filter(sql)
    assert wrapped == f"({sql}\n)"
    got = col.query(where=sql, columns=["id"]).column("id").to_pylist()
    assert set(got) == ids
    assert col.count(sql) == len(ids)


def test_comment_that_hides_structure_is_refused_by_both_readings(table_col):
    # A ';' or ')' in a comment: the client binds around it, the server refuses the result
    # (comments count for the structure checks), rather than run half of what was written.
    sql = bind_params("label = :x -- ) OR (1 = 1", {"x": "a"})
    assert sql == "label = 'a' -- ) OR (1 = 1"
    with pytest.raises(InvalidArgument, match="unbalanced parentheses"):
        table_col.validate_filter(sql)


def test_any_row_stops_at_a_match_and_agrees_with_count_rows(tmp_path):
    db = lancedb.connect(str(tmp_path))
    n = 3000
    vec = np.arange(n * 4, dtype=np.float32).reshape(n, 4)
    table = db.create_table("t", pa.table({
        "id": [f"r{i}" for i in range(n)],
        "label": pa.array([None if i % 3 else "cat" for i in range(n)], pa.string()),
        "emb": pa.FixedSizeListArray.from_arrays(pa.array(vec.ravel()), 4),
    }))
    for where in (None, "label IS NULL", "label = 'cat'", "label = 'dog'", "emb IS NOT NULL",
                  "label = 'dog' AND emb IS NOT NULL", "id = 'r2999'", "id = 'nope'"):
        expected = (table.count_rows(where) if where else table.count_rows()) > 0
        assert any_row(table, where) is expected, where
