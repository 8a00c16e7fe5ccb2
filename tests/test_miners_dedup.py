"""Exact duplicates (content hashes) and SemDeDup, against direct implementations and the
behaviour the SemDeDup paper states (planted near-copies are dropped, one row of each group
kept, the kept one chosen by its similarity to the centroid)."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest

from miners.dedup import exact_duplicates, hash_files, hash_items, hash_vectors, semdedup


def test_hashes_and_groups_match_a_dict_of_contents(tmp_path):
    items = ["a", "b", "a", None, "c", "b", "b", b"a"]
    d = hash_items(items)
    assert (d[3] == 0).all()
    assert bytes(d[0].tobytes()) == hashlib.blake2b(b"a", digest_size=16).digest()
    g = exact_duplicates(d)
    # direct: rows by content, first row kept
    first: dict = {}
    for i, v in enumerate(items):
        if v is None:
            continue
        key = v.encode() if isinstance(v, str) else v
        first.setdefault(key, i)
    for i, v in enumerate(items):
        if v is None:
            assert g.kept_row[i] == -1 and g.keep[i] and g.group[i] == -1
            continue
        key = v.encode() if isinstance(v, str) else v
        assert g.kept_row[i] == first[key] and g.keep[i] == (first[key] == i)
    assert sorted(g.sizes.tolist()) == [3, 3] and g.dropped.tolist() == [2, 5, 6, 7]
    assert g.group[4] == -1  # "c" is unique
    # priority decides the kept row
    g2 = exact_duplicates(d, priority=np.array([5, 0, 1, 0, 0, 9, 0, 0]))
    assert g2.keep[[7, 1, 4]].all() and not g2.keep[[0, 2, 5, 6]].any()
    # files by content
    paths = []
    for i, text in enumerate([b"x" * 5000, b"y", b"x" * 5000]):
        p = tmp_path / f"f{i}"
        p.write_bytes(text)
        paths.append(str(p))
    fd = hash_files(paths + [None], chunk=1000)
    assert exact_duplicates(fd).kept_row.tolist() == [0, 1, 0, -1]
    with pytest.raises(ValueError, match="row 0: cannot read"):
        hash_files([str(tmp_path / "missing")])


def test_vector_hashes():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((50, 7)).astype(np.float32)
    x2 = np.concatenate([x, x[[3, 3, 10]], np.zeros((1, 7), np.float32), -np.zeros((1, 7), np.float32)])
    g = exact_duplicates(hash_vectors(x2))
    assert g.kept_row[50:].tolist() == [3, 3, 10, 53, 53]  # -0.0 equals 0.0
    assert g.dropped.tolist() == [50, 51, 52, 54]
    # float64 input hashes its float32 value
    assert (hash_vectors(x.astype(np.float64)) == hash_vectors(x)).all()
    with pytest.raises(ValueError, match="row 1 has NaN"):
        hash_vectors(np.array([[0.0], [np.nan]]))


def semdedup_direct(x, labels, eps, keep):
    u = x.astype(np.float64) / np.linalg.norm(x.astype(np.float64), axis=1, keepdims=True)
    k = labels.max() + 1
    cent = np.stack([u[labels == c].mean(0) for c in range(k)])
    cs = np.einsum("ij,ij->i", u, cent[labels]) / np.linalg.norm(cent[labels], axis=1)
    keep_mask = np.ones(len(x), bool)
    dup = np.full(len(x), -1)
    for c in range(k):
        rows = np.flatnonzero(labels == c)
        sign = -1.0 if keep == "prototypical" else 1.0
        rows = rows[np.lexsort((rows, sign * cs[rows]))]
        s = u[rows] @ u[rows].T
        for j in range(1, len(rows)):
            i = int(np.argmax(s[:j, j]))
            if s[i, j] > 1 - eps:
                keep_mask[rows[j]] = False
                dup[rows[j]] = rows[i]
    return keep_mask, dup


@pytest.mark.parametrize("keep", ["prototypical", "hard"])
def test_semdedup_matches_direct_on_given_clusters(keep):
    rng = np.random.default_rng(1)
    base = rng.standard_normal((120, 16))
    x = np.concatenate([base, base[:40] + 0.05 * rng.standard_normal((40, 16))]).astype(np.float32)
    labels = rng.integers(0, 3, 160)
    labels[120:] = labels[:40]  # copies share their original's cluster
    r = semdedup(x, eps=0.01, labels=labels, keep=keep)
    want_keep, want_dup = semdedup_direct(x, labels, 0.01, keep)
    assert r.keep.tolist() == want_keep.tolist()
    assert r.duplicate_of.tolist() == want_dup.tolist()
    assert r.cluster_dropped.sum() == (~r.keep).sum()


def test_semdedup_paper_toy_drops_planted_copies_and_keeps_the_prototypical_one():
    rng = np.random.default_rng(2)
    centres = rng.standard_normal((5, 32)) * 3
    lab = rng.integers(0, 5, 400)
    base = centres[lab] + rng.standard_normal((400, 32))
    copies = base[:60] + 0.01 * rng.standard_normal((60, 32))
    x = np.concatenate([base, copies]).astype(np.float32)
    r = semdedup(x, eps=0.001, n_clusters=5, seed=0)
    # exactly one of each (original, copy) pair is dropped, nothing else
    assert (~r.keep).sum() == 60
    for i in range(60):
        pair = [i, 400 + i]
        assert r.keep[pair].sum() == 1
        kept, dropped = (pair if r.keep[i] else pair[::-1])
        assert r.duplicate_of[dropped] == kept
        # the kept one is the closer to its centroid
        assert r.centroid_similarity[kept] >= r.centroid_similarity[dropped]
    # with keep="hard" the other one stays
    h = semdedup(x, eps=0.001, n_clusters=5, seed=0, keep="hard")
    assert ((~h.keep).sum() == 60) and all(h.keep[i] != r.keep[i] for i in range(60)
                                            if r.centroid_similarity[i] != r.centroid_similarity[400 + i])
    # a larger eps merges more than the planted copies; eps = 0 drops nothing here
    assert (~semdedup(x, eps=0.6, n_clusters=5).keep).sum() > 60
    assert semdedup(x, eps=0.0, n_clusters=5).keep.all()
    # the random order is seeded
    a = semdedup(x, eps=0.001, n_clusters=5, keep="random", seed=3).keep
    assert a.tolist() == semdedup(x, eps=0.001, n_clusters=5, keep="random", seed=3).keep.tolist()


def test_semdedup_bad_input():
    with pytest.raises(ValueError, match="zero vector"):
        semdedup(np.zeros((3, 2), np.float32), n_clusters=1)
    with pytest.raises(ValueError, match="eps must be"):
        semdedup(np.ones((3, 2), np.float32), eps=3.0)
    with pytest.raises(ValueError, match="keep must be"):
        semdedup(np.ones((3, 2), np.float32), keep="easy")


def test_exact_duplicates_through_the_runner_reports_its_scan(tmp_path):
    """The run's one phase, the scan hashing every vector, reports rows scanned (at 10M rows
    it ran 60 s without a report)."""
    import pyarrow as pa

    from indexing.store import Store
    from miners.runner import run_mining, validate_request
    from miners.runs import RunSpec

    rng = np.random.default_rng(2)
    x = rng.normal(size=(3000, 8)).astype(np.float32)
    x[2999] = x[5]
    store = Store(str(tmp_path), optimize_every=0)
    col = store.create_collection("c", spaces={"v": {"dim": 8, "metric": "l2"}})
    col.upsert(pa.table({"id": [f"r{i:05d}" for i in range(3000)],
                         "emb_v": pa.FixedSizeListArray.from_arrays(pa.array(x.ravel()), 8)}))
    req = RunSpec(collection="c", miner="exact_duplicates", size=10, space="v")
    _, params = validate_request(col, req)
    trace: list[tuple[float, str]] = []
    out = run_mining(col, RunSpec(**{**req.__dict__, "params": params, "version": col.version, "run_id": "d"}),
                     progress=lambda f, m: trace.append((f, m)))
    assert out.ids == ["r02999"]
    scans = [(f, m) for f, m in trace if m.startswith("scanning")]
    assert scans and scans[-1][0] == 0.9 and scans[-1][1].startswith("scanning 3,000 of 3,000 rows")
    assert [f for f, _ in trace] == sorted(f for f, _ in trace)


def test_semdedup_of_a_large_pool_normalises_onto_a_memory_map_with_the_same_result(monkeypatch):
    from miners import dedup, mapped

    rng = np.random.default_rng(8)
    x = rng.normal(size=(600, 16)).astype(np.float32)
    x[400:420] = x[:20] * 1.001
    want = semdedup(x, eps=0.01, n_clusters=6, seed=1)
    monkeypatch.setattr(mapped, "MEMMAP_ABOVE_BYTES", 1024)
    assert isinstance(dedup._unit(x), np.memmap)
    got = semdedup(x, eps=0.01, n_clusters=6, seed=1)
    np.testing.assert_array_equal(got.keep, want.keep)
    np.testing.assert_array_equal(got.duplicate_of, want.duplicate_of)
    assert (~got.keep).sum() >= 20
