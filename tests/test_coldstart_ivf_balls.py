"""ProbCover's approximate delta-ball graph (issue 17): the join of inverted lists against
the exact ball graph and the definition (brute-force distances) on small clustered data,
its recall of ball membership as reported, cancel between lists, the entry guard, a
memory-mapped pool read without a whole copy, and the greedy through the approximate path
(the row threshold lowered instead of big data)."""

from __future__ import annotations

import numpy as np
import pytest

from miners.coldstart import (
    ball_graph,
    ball_lists,
    exact_balls,
    join_ball_graph,
    join_other_label_distance,
    other_label_distance,
    probcover_select,
)


def clustered(n=3000, d=16, clusters=30, spread=0.25, seed=0):
    rng = np.random.default_rng(seed)
    c = rng.standard_normal((clusters, d))
    x = c[rng.integers(0, clusters, n)] + spread * rng.standard_normal((n, d))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def balls_direct(x, delta):
    """The definition: ||x_i - x_j||^2 <= delta^2 by float64 differences, row by row."""
    x = x.astype(np.float64)
    return [np.flatnonzero(((x - row) ** 2).sum(1) <= delta * delta) for row in x]


def recall_direct(g, want):
    """Share of the definition's ball entries (own row left out) that ``g`` lists."""
    hit = total = 0
    for i, b in enumerate(want):
        b = b[b != i]
        hit += np.isin(b, g.indices[g.indptr[i]:g.indptr[i + 1]]).sum()
        total += len(b)
    return hit / total


def test_exact_balls_of_sample_rows_are_the_definition():
    x = clustered(800, seed=1)
    want = balls_direct(x, 0.5)
    rows = np.array([0, 5, 17, 400, 799])
    got = exact_balls(x, rows, 0.5, chunk=97)  # several chunks
    for r, b in zip(rows, got, strict=True):
        np.testing.assert_array_equal(b, want[r])


def test_join_with_every_list_probed_equals_the_exact_graph():
    x = clustered()
    exact = ball_graph(x, 0.5)
    approx = join_ball_graph(x, 0.5, nprobe=1 << 20)  # clamped to all lists: exhaustive
    np.testing.assert_array_equal(approx.indptr, exact.indptr)
    np.testing.assert_array_equal(approx.indices, exact.indices)
    want = balls_direct(x, 0.5)
    assert all(np.array_equal(exact.indices[exact.indptr[i]:exact.indptr[i + 1]], want[i]) for i in range(len(x)))
    info = approx.info
    assert info["method"].startswith("ivf-list-join") and info["nprobe"] == info["nlist"] > 1
    assert info["recall"] == 1.0 and info["recall_sample"] == 500 and info["reverse_added"] == 0
    assert info["radius"] == 0.5 and exact.info["method"] == "exact"


def test_join_decides_pairs_at_the_boundary_as_the_definition():
    """The join's float32 product decides a pair only where it is farther from ``delta^2``
    than its error bound; pairs whose float64 distance lies within float32 rounding of
    ``delta`` on either side are decided in float64, as the definition decides them. Pairs
    far apart from each other; each partner sits at ``~delta`` from its row, so about half
    the pairs fall inside, many by less than 1e-6."""
    rng = np.random.default_rng(7)
    n, d = 600, 64
    base = (rng.standard_normal((n, d)) * 10).astype(np.float32)
    u = rng.standard_normal((n, d))
    partner = (base + 0.05 * u / np.linalg.norm(u, axis=1, keepdims=True)).astype(np.float32)
    x = np.concatenate([base, partner])
    gap = np.sqrt(((base.astype(np.float64) - partner) ** 2).sum(1))
    delta = float(np.median(gap))
    assert np.sum(np.abs(gap - delta) < 1e-6 * delta) >= 10  # the boundary is crowded
    want = balls_direct(x, delta)
    got = join_ball_graph(x, delta, nprobe=1 << 20)
    for i in range(len(x)):
        np.testing.assert_array_equal(got.indices[got.indptr[i]:got.indptr[i + 1]], want[i])
    assert 0.4 * n <= (got.n_edges - len(x)) / 2 <= 0.6 * n  # each ball holds its own row


def test_ivf_graph_recall_is_measured_and_reported():
    x = clustered(seed=2)
    want = balls_direct(x, 0.6)
    # the sample is every row, so the reported recall must be the direct one over all rows
    g = join_ball_graph(x, 0.6, nprobe=2, recall_sample=len(x))
    direct = recall_direct(g, want)
    assert 0.3 < direct < 1.0  # two lists of ~76 miss some balls' rows
    assert g.info["recall"] == pytest.approx(direct, abs=1e-6) and g.info["recall_sample"] == len(x)
    assert g.info["below_target"] == (direct < g.info["target_recall"]) and g.info["nprobe"] == 2
    # every listed entry is a true one, and the balls are symmetric
    rows = np.repeat(np.arange(len(x)), np.diff(g.indptr))
    assert all(np.isin(g.indices[g.indptr[i]:g.indptr[i + 1]], want[i]).all() for i in range(len(x)))
    fwd = set(zip(rows.tolist(), g.indices.tolist(), strict=True))
    # (with nprobe 1 each row probes the list it is stored in: found pairs are symmetric anyway)
    assert fwd == {(j, i) for i, j in fwd} and g.info["reverse_added"] > 0
    # nprobe tuned: the first rung of the ladder reaching the target, on the default sample
    t = join_ball_graph(x, 0.6, target_recall=0.99)
    assert t.info["recall"] >= 0.99 or t.info["below_target"]
    assert t.info["recall_sample"] == 500 and t.info["nprobe"] > 1
    assert recall_direct(t, want) >= 0.97


def test_cancel_mid_graph_raises_before_the_next_list():
    x = clustered(4000, seed=3)
    seen: list[str] = []

    class Cancelled(Exception):
        pass

    def check():
        if any(m.startswith("ball graph (") for m in seen):
            raise Cancelled

    with pytest.raises(Cancelled):
        join_ball_graph(x, 0.5, nprobe=4, progress=lambda f, m: seen.append(m), check=check)
    graph = [m for m in seen if m.startswith("ball graph (")]
    lists = ball_lists(x, seed=0)  # the same lists (same seed): the first one searched reported
    first = int(np.diff(lists.offsets)[np.diff(lists.offsets) > 0][0])
    assert len(graph) == 1 and f"{first:,} of 4,000 rows" in graph[0] and "ETA" in graph[0]


def test_max_edges_guard():
    x = clustered(2000, seed=4)
    with pytest.raises(ValueError, match="use a smaller delta"):
        join_ball_graph(x, 2.0, nprobe=8, max_edges=10_000)
    with pytest.raises(ValueError, match="nprobe must be"):
        join_ball_graph(x, 0.5, nprobe=0)


def test_probcover_through_the_approximate_path():
    x = clustered(3000, seed=5)
    lab = clustered(20, seed=6)
    exact = probcover_select(x, 25, labeled=lab, n_classes=10, seed=1)
    assert exact.stats["graph"]["method"] == "exact"
    # every list probed: the same graph, so the same picks
    same = probcover_select(x, 25, labeled=lab, n_classes=10, seed=1, exact_rows=100, nprobe=1 << 20)
    assert same.rows.tolist() == exact.rows.tolist() and same.delta == exact.delta
    # tuned nprobe: near the same picks and coverage
    near = probcover_select(x, 25, labeled=lab, n_classes=10, seed=1, exact_rows=100)
    info = near.stats["graph"]
    assert info["method"].startswith("ivf-list-join") and info["recall"] >= 0.95
    # the purity rule's distances never fall below the exact ones: neither does its radius
    assert same.stats["purity_distances"]["recall"] == 1.0
    assert near.stats["purity_distances"]["recall"] >= 0.95
    assert exact.delta <= near.delta <= exact.delta * 1.05
    assert len(set(near.rows.tolist()) & set(exact.rows.tolist())) >= 20
    assert near.covered == pytest.approx(exact.covered, abs=0.02)


def test_join_other_label_distance_against_the_exact_one():
    x = clustered(3000, seed=7)
    labels = np.random.default_rng(7).integers(0, 4, len(x))
    labels[x[:, 0] > 0.2] = 4  # a label with a region of its own: nearest others lie farther
    rows = np.arange(0, len(x), 3)
    want = other_label_distance(x, labels, rows)
    lists = ball_lists(x, seed=0)
    # every list probed: the exact distances (every other-label row searched, re-measured in float64)
    every, info = join_other_label_distance(lists, x, labels, rows, nprobe=1 << 20)
    np.testing.assert_allclose(every, want, rtol=1e-9, atol=0)
    assert info["recall"] == 1.0 and info["nprobe"] == info["nlist"] > 1
    # one list: never below the exact value; the reported recall is the share found exactly
    one, info = join_other_label_distance(lists, x, labels, rows, nprobe=1, recall_sample=len(rows))
    assert (one >= want - 1e-12).all()
    direct = float(np.mean(np.isclose(one, want, rtol=1e-9, atol=0)))
    assert 0.0 < direct < 1.0 and info["recall"] == pytest.approx(direct)
    assert info["below_target"] == (direct < info["target_recall"])
    # tuned: the first rung reaching the target on the sample
    tuned, info = join_other_label_distance(lists, x, labels, rows, target_recall=0.99)
    assert info["recall"] >= 0.99 and info["nprobe"] > 1
    assert float(np.mean(np.isclose(tuned, want, rtol=1e-9, atol=0))) >= 0.97


def test_join_other_label_distance_cancels_between_lists():
    x = clustered(3000, seed=8)
    labels = np.random.default_rng(8).integers(0, 3, len(x))
    lists = ball_lists(x, seed=0)
    seen: list[str] = []

    class Cancelled(Exception):
        pass

    def check():
        if any("lists searched for 3,000 rows" in m for m in seen):
            raise Cancelled

    with pytest.raises(Cancelled):
        join_other_label_distance(lists, x, labels, np.arange(len(x)), nprobe=2,
                                  progress=lambda f, m: seen.append(m), check=check)
    done = [m for m in seen if "lists searched for 3,000 rows" in m]
    assert len(done) == 1 and f"1 of {lists.nlist:,} lists" in done[0] and "ETA" in done[0]


def test_memory_mapped_rows_are_read_by_list_and_pick_as_in_ram(tmp_path):
    """A pool on a memory map (as ``load_pool`` hands a 10M-row pool over) stays there: the
    lists hold the map itself, not a float32 copy (the IVF-Flat index this replaced held
    one: 15 GB at 10M x 384), and ProbCover picks from it as from the rows in RAM."""
    x = clustered(20_000, d=32, clusters=200, spread=0.2, seed=10)
    mm = np.memmap(tmp_path / "pool.f32", dtype=np.float32, mode="w+", shape=x.shape)
    mm[:] = x
    mm.flush()
    mm = np.memmap(tmp_path / "pool.f32", dtype=np.float32, mode="r", shape=x.shape)
    lists = ball_lists(mm, seed=2)
    assert lists.x is mm
    g = join_ball_graph(mm, 0.3, nprobe=3, lists=lists)
    ram = join_ball_graph(x, 0.3, nprobe=3, lists=ball_lists(x, seed=2))
    np.testing.assert_array_equal(g.indptr, ram.indptr)
    np.testing.assert_array_equal(g.indices, ram.indices)
    lab = clustered(30, d=32, clusters=200, spread=0.2, seed=11)
    want = probcover_select(x, 20, labeled=lab, n_classes=10, seed=2, exact_rows=1000)
    got = probcover_select(mm, 20, labeled=lab, n_classes=10, seed=2, exact_rows=1000)
    assert got.rows.tolist() == want.rows.tolist() and got.delta == want.delta
    assert got.stats["graph"]["method"].startswith("ivf-list-join")
