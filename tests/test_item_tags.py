"""Item tags on the store (one commit, only changed rows, updated_at untouched) and a
collection used by a dataset that cannot be dropped."""

from __future__ import annotations

import grpc
import pytest

from indexing.errors import InvalidArgument
from protos.assay.v1 import collections_pb2, collections_pb2_grpc, datasets_pb2, datasets_pb2_grpc
from service.server import ServerConfig, start_server


def _pool(store, n=20):
    col = store.create_collection("c")
    col.upsert({"id": [f"r{i:02d}" for i in range(n)], "score": [float(i) for i in range(n)],
                "tags": [["seen"] if i % 2 else [] for i in range(n)]})
    return col


def test_tag_rows_adds_and_removes_in_one_commit(store):
    col = _pool(store)
    before = {r["id"]: r["updated_at"] for r in col.query(None, ["id", "updated_at"]).to_pylist()}
    version = col.version
    rows, v = col.tag_rows(where="score < 4", add=["to-label"], remove=["seen"])
    assert rows == 4 and v == version + 1
    got = {r["id"]: r["tags"] for r in col.query("score < 6", ["id", "tags"]).to_pylist()}
    assert got == {"r00": ["to-label"], "r01": ["to-label"], "r02": ["to-label"], "r03": ["to-label"],
                   "r04": [], "r05": ["seen"]}
    assert col.count("array_has_any(tags, ['to-label'])") == 4
    # Nothing changes: no commit at all. Timestamps are left alone.
    assert col.tag_rows(ids=["r00", "r01"], add=["to-label"]) == (0, v)
    after = {r["id"]: r["updated_at"] for r in col.query(None, ["id", "updated_at"]).to_pylist()}
    assert after == before


@pytest.mark.parametrize("kwargs, message", [
    ({"add": ["x"]}, "exactly one of ids or where"),
    ({"ids": ["r00"]}, "tags to add or to remove"),
    ({"ids": ["r00"], "add": [""]}, "invalid"),
    ({"ids": ["r00"], "add": ["a" * 200]}, "invalid"),
    ({"ids": ["r00"], "add": ["x"], "remove": ["x"]}, "both added and removed"),
    ({"where": "score < 1) OR (1 = 1", "add": ["x"]}, "parentheses"),
])
def test_tag_rows_refuses_bad_requests_and_writes_nothing(store, kwargs, message):
    col = _pool(store)
    version = col.version
    with pytest.raises(InvalidArgument, match=message):
        col.tag_rows(**kwargs)
    assert col.version == version


def test_a_collection_used_by_a_dataset_is_not_dropped(tmp_path):
    server = start_server(ServerConfig(data=str(tmp_path / "d"), port=0, grace_s=1))
    try:
        _pool(server.store)
        channel = grpc.insecure_channel(server.address)
        datasets = datasets_pb2_grpc.DatasetsStub(channel)
        collections = collections_pb2_grpc.CollectionsStub(channel)
        datasets.CreateDataset(datasets_pb2.CreateDatasetRequest(name="train", collection="c"))
        with pytest.raises(grpc.RpcError) as err:
            collections.DropCollection(collections_pb2.CollectionRef(collection="c"))
        assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION and "train" in err.value.details()
        datasets.DeleteDataset(datasets_pb2.DeleteDatasetRequest(name="train"))
        collections.DropCollection(collections_pb2.CollectionRef(collection="c"))
        assert server.store.list_collections() == []
        channel.close()
    finally:
        server.stop(1)
