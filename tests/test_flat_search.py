"""Exact search over vectors held in memory (indexing.flat_search) against its definition
and against LanceDB's own exhaustive search on the same table version."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest
from scipy.spatial.distance import cdist

from indexing.flat_search import FlatVectors, candidates, distances, top_k
from indexing.store import READ_VERSION_KEY, Store
from tests.conftest import clustered


def test_distances_match_their_definitions():
    rng = np.random.default_rng(0)
    v = rng.standard_normal((40, 7)).astype(np.float32)
    q = rng.standard_normal((5, 7)).astype(np.float32)
    sq = np.einsum("ij,ij->i", v, v)
    for qs in (q, q[:1]):  # several queries (a matrix product) and one (a loop without BLAS)
        np.testing.assert_allclose(distances(v, sq, qs, "cosine"), cdist(v, qs, "cosine"), atol=1e-5)
        np.testing.assert_allclose(distances(v, sq, qs, "l2"), cdist(v, qs, "sqeuclidean"), rtol=1e-4, atol=1e-4)
        np.testing.assert_allclose(distances(v, sq, qs, "dot"),
                                   1 - v.astype(np.float64) @ qs.T.astype(np.float64), atol=1e-5)
    zero = np.zeros((1, 7), np.float32)
    assert np.isnan(distances(zero, np.zeros(1, np.float32), q, "cosine")).all()


def test_top_k_sorts_by_distance_then_key_and_skips_nan():
    dist = np.array([[0.5], [0.1], [0.5], [np.nan], [0.3], [0.5]], np.float32)
    keys = np.array([9, 1, 4, 0, 2, 3])
    (best,) = top_k(dist, keys, 3)
    assert best.tolist() == [1, 4, 5]  # 0.1, 0.3, then the tie at 0.5 with the smallest key (3)
    (best,) = top_k(dist, keys, 10)
    assert best.tolist() == [1, 4, 5, 2, 0]  # the NaN row never comes back


def test_candidates_keep_the_k_best_and_their_ties_never_nan_or_infinity():
    dist = np.array([0.5, np.nan, 0.1, 0.5, np.inf, 0.3, 0.5], np.float32)
    assert candidates(dist, 3).tolist() == [0, 2, 3, 5, 6]  # 0.1, 0.3 and every 0.5
    assert candidates(dist, 1).tolist() == [2]
    assert candidates(dist, 6).tolist() == [0, 2, 3, 5, 6]  # fewer finite rows than k
    assert candidates(np.zeros(0, np.float32), 3).tolist() == []


def lancedb_flat(col, space: str, q: np.ndarray, k: int, where: str | None, metric: str) -> pa.Table:
    """LanceDB's own exhaustive search of the collection's table (the independent reference)."""
    b = (col.table.search(q, vector_column_name=f"emb_{space}").distance_type(metric).limit(k)
         .select(["id", "n", "_distance"]).bypass_vector_index())
    if where:
        b = b.where(where, prefilter=True)
    return b.to_arrow()


def assert_same_hits(ours: pa.Table, ref: pa.Table) -> None:
    assert ours.column("id").to_pylist() == ref.column("id").to_pylist()
    assert ours.column("n").to_pylist() == ref.column("n").to_pylist()
    np.testing.assert_allclose(ours.column("_distance").to_numpy(), ref.column("_distance").to_numpy(),
                               rtol=1e-4, atol=1e-5)


def aged_collection(store: Store, metric: str, n: int = 3000, dim: int = 24):
    """Rows written in batches (several fragments), some deleted, some re-embedded, some with
    no vector in the space."""
    x = clustered(n, dim, clusters=30, seed=3)
    col = store.create_collection("c", spaces={"v": {"dim": dim, "metric": metric, "normalized": False}},
                                  fields={"n": pa.int64()})
    for s in range(0, n, 500):
        col.upsert({"id": [f"r{i}" for i in range(s, s + 500)], "emb_v": x[s:s + 500].tolist(),
                    "n": list(range(s, s + 500)), "split": ["pool" if i % 3 else "train" for i in range(s, s + 500)]})
    col.upsert({"id": [f"blank{i}" for i in range(20)], "n": list(range(n, n + 20))})  # null vectors
    col.delete(where="n % 11 = 0")
    moved = [i for i in range(1, n, 7) if i % 11]
    rng = np.random.default_rng(4)
    col.upsert({"id": [f"r{i}" for i in moved], "emb_v": rng.standard_normal((len(moved), dim)).tolist()})
    return col, x


@pytest.mark.parametrize("metric", ["cosine", "l2", "dot"])
def test_flat_search_answers_what_lancedb_answers(tmp_path, metric):
    store = Store(str(tmp_path / "data"), optimize_every=0)
    col, x = aged_collection(store, metric)
    assert len(col.table.to_lance().get_fragments()) > 3
    rng = np.random.default_rng(5)
    queries = x[rng.integers(0, len(x), 6)] + 0.1 * rng.standard_normal((6, x.shape[1])).astype(np.float32)
    for where in (None, "split = 'pool' AND n > 100"):
        for q in queries:
            ours = col.search("v", q, k=15, where=where, columns=["id", "n"])
            assert ours.column_names == ["id", "n", "_distance"]
            assert_same_hits(ours, lancedb_flat(col, "v", q, 15, where, metric))
        many = col.search("v", queries, k=15, where=where, columns=["id", "n"])
        assert many.column_names == ["query_index", "id", "n", "_distance"]
        for i, q in enumerate(queries):
            assert_same_hits(many.filter(pa.compute.equal(many.column("query_index"), i)),
                             lancedb_flat(col, "v", q, 15, where, metric))
    assert store.flat_vectors.nbytes > 0  # answered from memory, not by LanceDB
    hits = col.search("v", queries[0], k=5000, columns=["id"])
    assert not any(i.startswith("blank") for i in hits.column("id").to_pylist())  # null vectors
    assert hits.num_rows == col.count("emb_v IS NOT NULL")


def test_flat_search_follows_updates_deletes_and_compaction(tmp_path):
    store = Store(str(tmp_path / "data"), optimize_every=0)
    col, x = aged_collection(store, "cosine")
    q = x[10]
    first = col.search("v", q, k=3, columns=["id", "n"]).column("id").to_pylist()
    assert first[0] == "r10"
    # the nearest row moves away (a partial update: the vector column only), the next is deleted
    col.upsert({"id": ["r10"], "emb_v": [(-q).tolist()]})
    col.delete(ids=[first[1]])
    again = col.search("v", q, k=3, columns=["id", "n"])
    assert again.schema.metadata[READ_VERSION_KEY] == str(col.version).encode()  # the version it read
    assert "r10" not in again.column("id").to_pylist() and first[1] not in again.column("id").to_pylist()
    assert_same_hits(again, lancedb_flat(col, "v", q, 3, None, "cosine"))
    read = int(again.schema.metadata[READ_VERSION_KEY])
    col.optimize()  # new fragments: the blocks of the old ones go at the next search
    assert len(col.table.to_lance().get_fragments()) == 1
    after = col.search("v", q, k=3, columns=["id", "n"])
    assert int(after.schema.metadata[READ_VERSION_KEY]) == col.version > read
    assert_same_hits(after, lancedb_flat(col, "v", q, 3, None, "cosine"))
    rows = sum(f.physical_rows for f in col.table.to_lance().get_fragments())
    assert store.flat_vectors.nbytes <= rows * (24 * 4 + 5)


def test_a_space_over_the_budget_is_searched_by_lancedb(tmp_path):
    store = Store(str(tmp_path / "data"), optimize_every=0, flat_cache_bytes=10_000)
    col, x = aged_collection(store, "l2")
    ours = col.search("v", x[3], k=10, where="n < 2000", columns=["id", "n"])
    assert store.flat_vectors.nbytes == 0
    assert ours.schema.metadata[READ_VERSION_KEY] == str(col.version).encode()
    assert_same_hits(ours, lancedb_flat(col, "v", x[3], 10, "n < 2000", "l2"))


def test_spaces_give_way_to_the_last_searched_within_the_budget(tmp_path):
    rows, dim = 1000, 16
    per_space = rows * (dim * 4 + 5)
    store = Store(str(tmp_path / "data"), optimize_every=0, flat_cache_bytes=int(per_space * 1.5))
    cols = []
    for name in ("a", "b"):
        col = store.create_collection(name, spaces={"v": dim})
        col.upsert({"id": [f"r{i}" for i in range(rows)], "emb_v": clustered(rows, dim, seed=len(cols)).tolist()})
        cols.append(col)
    q = np.ones(dim, np.float32)
    cols[0].search("v", q, k=3)
    assert 0 < store.flat_vectors.nbytes <= per_space
    cols[1].search("v", q, k=3)  # a's vectors make room for b's
    assert 0 < store.flat_vectors.nbytes <= per_space
    store.drop_collection("b")
    assert store.flat_vectors.nbytes == 0


def test_held_vectors_follow_their_column_through_a_rename(tmp_path):
    """Held by field id, not by name: after a swap (a reindex renames the new column onto the
    old name) the name's search reads the other column's vectors."""
    import lancedb

    dim = 8
    rng = np.random.default_rng(1)
    a, b = rng.standard_normal((200, dim)).astype(np.float32), rng.standard_normal((200, dim)).astype(np.float32)
    fsl = lambda m: pa.FixedSizeListArray.from_arrays(pa.array(m.ravel()), dim)  # noqa: E731
    table = lancedb.connect(str(tmp_path)).create_table(
        "t", pa.table({"id": [str(i) for i in range(200)], "a": fsl(a), "b": fsl(b)}))
    held = FlatVectors(1 << 20)
    q = rng.standard_normal((1, dim)).astype(np.float32)

    def both(column: str) -> tuple[list[str], list[str]]:
        ours = held.search(table.to_lance(), "t", column, q, k=5, metric="l2", where=None, columns=["id"])
        ref = (table.search(q[0], vector_column_name=column).distance_type("l2").limit(5).select(["id"])
               .bypass_vector_index().to_arrow())
        return ours.column("id").to_pylist(), ref.column("id").to_pylist()

    ours, ref = both("a")
    assert ours == ref
    table.alter_columns({"path": "a", "rename": "a_old"})
    table.alter_columns({"path": "b", "rename": "a"})
    ours, ref = both("a")
    assert ours == ref and ours == [str(i) for i in np.argsort(((b - q) ** 2).sum(1))[:5]]


def test_a_block_loaded_at_a_newer_version_answers_an_older_one(tmp_path):
    """Two searches at once may read different versions; a block holds every physical row
    (deleted ones too), so the older version still finds the row the newer one deleted."""
    import lancedb

    dim = 4
    rng = np.random.default_rng(2)
    v = rng.standard_normal((50, dim)).astype(np.float32)
    table = lancedb.connect(str(tmp_path)).create_table(
        "t", pa.table({"id": [str(i) for i in range(50)],
                       "v": pa.FixedSizeListArray.from_arrays(pa.array(v.ravel()), dim)}))
    old = table.to_lance()
    table.delete("id = '7'")
    held = FlatVectors(1 << 20)
    q = v[7:8]
    newer = held.search(table.to_lance(), "t", "v", q, k=1, metric="l2", where=None, columns=["id"])
    assert newer.column("id").to_pylist() != ["7"]
    older = held.search(old, "t", "v", q, k=1, metric="l2", where=None, columns=["id"])
    assert older.column("id").to_pylist() == ["7"] and older.column("_distance").to_pylist() == [0.0]


def test_a_table_with_stable_row_ids_is_searched_by_row_id(tmp_path):
    """With stable row ids a row's id is not its address: the live rows are not kept (they
    are addresses) and the winners are taken by the ids Lance's scan gives."""
    import lance

    dim = 4
    rng = np.random.default_rng(3)
    v = rng.standard_normal((300, dim)).astype(np.float32)
    data = pa.table({"id": [str(i) for i in range(300)], "v": pa.FixedSizeListArray.from_arrays(pa.array(v.ravel()), dim)})
    path = str(tmp_path / "t.lance")
    lance.write_dataset(data.slice(0, 150), path, enable_stable_row_ids=True)
    dataset = lance.write_dataset(data.slice(150), path, mode="append")
    dataset.delete("id IN ('3', '160')")
    dataset = lance.dataset(path)
    assert dataset.has_stable_row_ids
    held = FlatVectors(1 << 20)
    assert not held.live_rows.serves(dataset, "t", None)
    alive = np.array([i for i in range(300) if i not in (3, 160)])
    for q in v[[3, 160, 200]]:
        want = alive[np.argsort(((v[alive] - q) ** 2).sum(1), kind="stable")[:4]].astype(str).tolist()
        for _ in range(2):
            got = held.search(dataset, "t", "v", q[None, :], k=4, metric="l2", where=None, columns=["id"])
            assert got.column("id").to_pylist() == want
    assert held.live_rows.nbytes == 0
