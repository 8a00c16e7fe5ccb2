"""Upserts without ids return the ids the server generated: in the store's result, on the
wire (``UpsertAck.assigned_ids`` / ``assigned_rows``) and in the client's summary, in the
input's row order and across batches."""

from __future__ import annotations

import asyncio

import numpy as np
import pyarrow as pa
import pytest

from service.client import AsyncClient, Client
from service.server import ServerConfig, start_server


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    srv = start_server(ServerConfig(data=str(tmp_path_factory.mktemp("ids")), port=0, grace_s=2))
    yield srv
    srv.stop(1)


@pytest.fixture
def client(server):
    with Client(server.address, timeout=60) as c:
        yield c


def _fresh(client: Client, name: str):
    if name in client.list_collections():
        client.drop_collection(name)
    return client.create_collection(name)


def test_store_upsert_returns_the_generated_ids(store):
    col = store.create_collection("s")
    res = col.upsert([{"text": "a"}, {"text": "b"}, {"text": "c"}])
    assert res.generated_ids == 3 and res.assigned_rows == [0, 1, 2]
    got = col.take(res.assigned_ids, ["id", "text"])
    assert got.column("text").to_pylist() == ["a", "b", "c"]
    assert len(set(res.assigned_ids)) == 3
    # a batch with ids: nothing assigned
    res = col.upsert([{"id": "x", "text": "x"}])
    assert res.assigned_ids == [] and res.assigned_rows == []


def test_client_upsert_without_ids_returns_them_in_row_order_across_batches(client):
    col = _fresh(client, "noids")
    texts = [f"t{i}" for i in range(25)]
    summary = col.upsert(pa.table({"text": texts, "n": list(range(25))}), batch_rows=7)
    assert summary.batches == 4 and summary.rows == 25
    assert summary.generated_ids == 25 and summary.assigned_rows == list(range(25))
    assert len(summary.assigned_ids) == 25 and len(set(summary.assigned_ids)) == 25
    rows = col.take(summary.assigned_ids, ["id", "text", "n"])
    # take returns rows in the order asked: each generated id names the row sent at that position
    assert rows.column("text").to_pylist() == texts
    assert rows.column("n").to_pylist() == list(range(25))


def test_client_upsert_with_some_null_ids_reports_only_those(client):
    col = _fresh(client, "someids")
    ids = ["a", None, "c", None, None, "f"]
    summary = col.upsert(pa.table({"id": pa.array(ids, pa.string()), "n": list(range(6))}), batch_rows=4)
    assert summary.assigned_rows == [1, 3, 4]  # positions in the whole input, not in its batch
    assert summary.generated_ids == 3 and len(summary.assigned_ids) == 3
    got = col.take(summary.assigned_ids, ["id", "n"])
    assert got.column("n").to_pylist() == [1, 3, 4]
    assert col.count() == 6
    # an upsert whose rows all have ids assigns nothing
    again = col.upsert([{"id": "a", "n": 10}])
    assert again.assigned_ids == [] and again.updated == 1


def test_async_client_returns_the_generated_ids(server):
    async def go() -> tuple[list[str], list[str]]:
        async with AsyncClient(server.address, timeout=60) as c:
            if "asyncids" in await c.list_collections():
                await c.drop_collection("asyncids")
            col = await c.create_collection("asyncids")
            s = await col.upsert({"text": ["p", "q", "r"], "v": np.arange(3)})
            got = await col.take(s.assigned_ids, ["text"])
            return s.assigned_ids, got.column("text").to_pylist()

    ids, texts = asyncio.run(go())
    assert len(ids) == 3 and texts == ["p", "q", "r"]


def test_a_rejected_upsert_names_its_field_and_row_for_programs(client):
    from service.client import InvalidArgumentError

    col = client.create_collection("located", spaces={"v": {"dim": 3, "metric": "l2"}}, if_not_exists=True)
    rows = [{"id": f"r{i}", "emb_v": [1.0, 2.0, 3.0]} for i in range(5)]
    rows[3]["emb_v"] = [1.0, float("nan"), 3.0]
    with pytest.raises(InvalidArgumentError) as err:
        col.upsert(rows)
    assert err.value.row == 3 and err.value.field == "emb_v"
    assert "row 3" in err.value.message
