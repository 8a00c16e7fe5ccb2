"""TypiClust and ProbCover: against direct implementations of their definitions on small
data, and against the behaviour their papers state on a toy case (well-separated blobs of
different sizes: one typical pick per blob, largest first; ProbCover covers every blob)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from miners.coldstart import (
    ball_graph,
    other_label_distance,
    probcover_select,
    purity_delta,
    typiclust_select,
)


def blobs(seed=0, sizes=(200, 120, 60, 30), outliers=5):
    rng = np.random.default_rng(seed)
    centres = np.array([[0, 0], [10, 0], [0, 10], [10, 10]], float)[:len(sizes)]
    x = np.concatenate([rng.normal(c, 1.0, (n, 2)) for c, n in zip(centres, sizes, strict=True)]
                       + [rng.uniform(-5, 15, (outliers, 2))])
    truth = np.repeat(np.arange(len(sizes) + 1), list(sizes) + [outliers])
    perm = rng.permutation(len(x))
    return x[perm].astype(np.float32), truth[perm], centres


def dist_matrix(x):
    x = x.astype(np.float64)
    return np.sqrt(((x[:, None, :] - x[None]) ** 2).sum(-1))


def typicality_direct(x, k):
    d = dist_matrix(x)
    np.fill_diagonal(d, np.inf)
    kk = min(k, len(x) // 2)
    return 1.0 / np.sort(d, axis=1)[:, :kk].mean(1)


def test_typiclust_paper_toy_one_typical_pick_per_blob_largest_first():
    x, truth, centres = blobs()
    r = typiclust_select(x, 4, seed=0)
    # one pick per blob, from the largest blob down (the uncovered clusters, largest first)
    assert truth[r.rows].tolist() == [0, 1, 2, 3]
    for row, blob in zip(r.rows, truth[r.rows], strict=True):
        members = np.flatnonzero(truth == blob)
        typ = typicality_direct(x[members], 20)
        # the pick is its blob's most typical member (the blob is its k-means cluster)
        assert row == members[np.argmax(typ)]
        assert np.linalg.norm(x[row] - centres[blob]) < 1.0  # near the mode, not an outlier
    assert (truth[r.rows] != 4).all()


def test_typiclust_labeled_rows_cover_their_cluster():
    x, truth, _ = blobs(1)
    big = np.flatnonzero(truth == 0)
    labeled, pool = x[big[:3]], np.delete(x, big[:3], axis=0)
    pool_truth = np.delete(truth, big[:3])
    # K = 3 labeled + 2 picks = 5 clusters: the labeled blob is covered, so the two largest
    # uncovered blobs come first
    r = typiclust_select(pool, 2, labeled=labeled, seed=0)
    assert pool_truth[r.rows].tolist() == [1, 2]


def test_typiclust_with_given_clusters_matches_direct():
    rng = np.random.default_rng(3)
    x = rng.standard_normal((300, 5)).astype(np.float32)
    lab = rng.integers(0, 6, 310)
    labeled = rng.standard_normal((10, 5)).astype(np.float32)
    allx = np.concatenate([labeled, x])
    r = typiclust_select(x, 9, labeled=labeled, labels=lab)
    # direct: fewest covered (labeled + picked), then larger, then smaller id; most typical
    sizes = np.bincount(lab, minlength=6)
    covered = np.bincount(lab[:10], minlength=6)
    typ = {c: typicality_direct(allx[lab == c], 20) for c in range(6)}
    taken: set[int] = set()
    want = []
    for _ in range(9):
        c = min(range(6), key=lambda c: (covered[c], -sizes[c], c))
        members = np.flatnonzero(lab == c)
        order = sorted((m for m in members if m >= 10 and m not in taken),
                       key=lambda m: (-typ[c][list(members).index(m)], m))
        taken.add(order[0])
        want.append(order[0] - 10)
        covered[c] += 1
    assert r.rows.tolist() == want


def test_typiclust_small_clusters_only_after_big_ones_and_bad_input():
    x, truth, _ = blobs(2, sizes=(50, 40), outliers=0)
    lab = truth.copy()
    lab[:3] = 2  # a cluster of 3 rows: below min_cluster = 5
    r = typiclust_select(x, 4, labels=lab)
    assert set(lab[r.rows[:2]].tolist()) == {0, 1} and 2 not in lab[r.rows[:4]].tolist()
    r = typiclust_select(x, 90, labels=lab)  # every pool row: the small cluster comes last
    assert sorted(r.rows.tolist()) == list(range(90)) and (lab[r.rows[-3:]] == 2).all()
    with pytest.raises(ValueError, match="size must be an integer in"):
        typiclust_select(x, 1000)
    with pytest.raises(ValueError, match="labeled must have the pool's dimension"):
        typiclust_select(x, 2, labeled=np.ones((2, 3), np.float32))


def probcover_direct(x, n_lab, size, delta):
    d = dist_matrix(x)
    ball = d <= delta
    covered = ball[:n_lab].any(axis=0) if n_lab else np.zeros(len(x), bool)
    picks = []
    for _ in range(size):
        gain = (ball & ~covered[None, :]).sum(1)
        gain[:n_lab] = -1
        gain[picks] = -1
        c = int(np.argmax(gain))
        if gain[c] <= 0:
            break
        picks.append(c)
        covered |= ball[c]
    return [p - n_lab for p in picks], covered.mean()


def test_probcover_matches_direct_greedy():
    rng = np.random.default_rng(4)
    x = rng.standard_normal((250, 3)).astype(np.float32)
    labeled = rng.standard_normal((5, 3)).astype(np.float32)
    r = probcover_select(x, 12, labeled=labeled, delta=0.8)
    want, cov = probcover_direct(np.concatenate([labeled, x]), 5, 12, 0.8)
    assert r.rows.tolist() == want
    assert r.covered == pytest.approx(cov)
    assert r.gain[0] >= r.gain[-1] and r.random_fill == 0


def test_ball_graph_is_exact():
    rng = np.random.default_rng(5)
    x = (rng.standard_normal((300, 4)) * 3).astype(np.float32)
    g = ball_graph(x, 2.0, block=64)
    d = dist_matrix(x)
    for i in range(300):
        assert g.indices[g.indptr[i]:g.indptr[i + 1]].tolist() == np.flatnonzero(d[i] <= 2.0).tolist()
    with pytest.raises(ValueError, match="use a smaller delta"):
        ball_graph(x, 100.0, max_edges=1000)


def test_purity_rule_against_direct_scan():
    x, truth, _ = blobs(6)
    pseudo = np.minimum(truth, 3)  # outliers join blob 3's pseudo-label
    r = other_label_distance(x, pseudo, block=37, chunk=101)
    d = dist_matrix(x)
    want = np.where(pseudo[:, None] != pseudo[None], d, np.inf).min(1)
    np.testing.assert_allclose(r, want, rtol=1e-12)
    delta, purity = purity_delta(r, 0.95)

    def purity_at(dl):  # a ball is pure when every row within dl shares its label
        return np.mean([(pseudo[d[i] <= dl] == pseudo[i]).all() for i in range(len(x))])

    assert purity_at(delta) >= 0.95 and purity == pytest.approx(purity_at(delta))
    # the supremum: any larger radius (the next r value) breaks the rule
    nxt = np.sort(r)[np.searchsorted(np.sort(r), delta, side="right")]
    assert purity_at(nxt) < 0.95

    # with a grid: the largest grid value that keeps >= 95 % pure
    grid = np.linspace(0.1, 5, 50)
    g_delta, _ = purity_delta(r, 0.95, deltas=grid)
    assert purity_at(g_delta) >= 0.95 and all(purity_at(v) < 0.95 for v in grid[grid > g_delta])
    with pytest.raises(ValueError, match="single pseudo-label"):
        purity_delta(np.full(5, np.inf))


def test_probcover_paper_toy_covers_each_blob_with_one_pick():
    x, truth, _ = blobs(7, outliers=0)
    r = probcover_select(x, 4, n_classes=4, seed=0)
    assert sorted(truth[r.rows].tolist()) == [0, 1, 2, 3]
    assert truth[r.rows[0]] == 0  # the largest blob's ball covers the most rows
    assert r.purity is not None and r.purity >= 0.95 and 1.0 < r.delta < 9.0
    assert r.covered > 0.95
    # past full coverage the rest is a seeded random fill of distinct pool rows
    r2 = probcover_select(x, 50, n_classes=4, seed=0)
    assert r2.rows[:4].tolist() == r.rows.tolist()
    assert len(set(r2.rows.tolist())) == 50 and r2.random_fill == 50 - int((r2.gain > 0).sum())
    assert r2.rows.tolist() == probcover_select(x, 50, n_classes=4, seed=0).rows.tolist()


def test_probcover_bad_input():
    x = np.zeros((10, 2), np.float32)
    with pytest.raises(ValueError, match="needs n_classes"):
        probcover_select(x, 2)
    with pytest.raises(ValueError, match="delta must be"):
        probcover_select(x, 2, delta=-1.0)
    with pytest.raises(ValueError, match="size must be"):
        probcover_select(x, 11, delta=1.0)
    assert math.isfinite(probcover_select(x, 2, delta=0.5).delta)


def test_ball_graph_exact_pair_test_in_chunks_equals_brute_force(monkeypatch):
    """The exact float64 test of the candidate pairs runs a bounded number of pairs at a
    time (all of a block's pairs at once took ~20 GB on 20,000 x 384 rows): with chunks of a
    few pairs the balls are still exactly those of the definition."""
    from miners import coldstart

    rng = np.random.default_rng(3)
    x = rng.normal(0, 1, (300, 6)).astype(np.float32)
    monkeypatch.setattr(coldstart, "_PAIR_VALUES", 6 * 7)  # 1024 pairs per chunk (the floor)
    g = coldstart.ball_graph(x, 2.0, block=64)
    d = np.sqrt(((x[:, None, :].astype(np.float64) - x[None].astype(np.float64)) ** 2).sum(-1))
    for i in range(len(x)):
        np.testing.assert_array_equal(g.indices[g.indptr[i]:g.indptr[i + 1]], np.flatnonzero(d[i] <= 2.0))
    assert g.indptr[-1] > 1024 * 2  # several chunks were needed


def test_other_label_distance_with_chunks_of_one_label():
    """Rows sorted by label, so whole chunks hold only the query's label (their minimum is
    inf): those rows must not become candidates (r was 0, the distance to the row itself)."""
    x, truth, _ = blobs(6)
    order = np.argsort(truth, kind="stable")
    x, lab = x[order], truth[order]
    r = other_label_distance(x, lab, block=16, chunk=8)
    d = dist_matrix(x)
    want = np.where(lab[:, None] != lab[None], d, np.inf).min(1)
    assert (r > 0).all()
    np.testing.assert_allclose(r, want, rtol=1e-12)


def test_stacked_rows_read_as_the_concatenation_and_kmeans_on_them_is_kmeans_on_it(tmp_path):
    from miners.clustering import StackedRows, kmeans

    rng = np.random.default_rng(4)
    lab = rng.normal(size=(37, 8)).astype(np.float32)
    pool = np.lib.format.open_memmap(tmp_path / "pool.npy", mode="w+", dtype=np.float32, shape=(3000, 8))
    pool[:] = rng.normal(size=(3000, 8)) + rng.integers(0, 6, (3000, 1)) * 4
    both = np.concatenate([lab, pool])
    s = StackedRows([lab, pool])
    assert len(s) == 3037 and s.shape == (3037, 8)
    np.testing.assert_array_equal(s[30:45], both[30:45])
    np.testing.assert_array_equal(s[:], both)
    rows = rng.permutation(3037)[:500]
    np.testing.assert_array_equal(s[rows], both[rows])
    np.testing.assert_array_equal(np.asarray(s), both)
    with pytest.raises(ValueError, match="step"):
        s[::2]
    for got, want in zip(kmeans(s, 12, seed=3, max_points_per_centroid=64), kmeans(both, 12, seed=3,
                                                                                  max_points_per_centroid=64),
                         strict=True):
        np.testing.assert_array_equal(got, want)
    # TypiClust on [labeled; pool] reads the stacked rows: the picks are those of the clusters
    # of the concatenation computed beforehand
    from miners.clustering import kmeans as km
    from miners.coldstart import TYPICLUST_POINTS_PER_CLUSTER

    _, labels, _ = km(both, 37 + 10, seed=0, max_points_per_centroid=TYPICLUST_POINTS_PER_CLUSTER)
    got = typiclust_select(pool, 10, labeled=lab)
    want = typiclust_select(pool, 10, labeled=lab, labels=labels)
    np.testing.assert_array_equal(got.rows, want.rows)
    bad = np.array(pool)
    bad[2100, 3] = np.nan
    with pytest.raises(ValueError, match="row 2137 of"):
        typiclust_select(bad, 5, labeled=lab)


def test_probcover_reads_the_labeled_rows_above_the_pool_and_names_a_bad_row():
    from miners import coldstart
    from miners.clustering import StackedRows

    x, _, _ = blobs(seed=5)
    lab, pool = x[:12].astype(np.float32), x[12:].astype(np.float32)
    stacked, n_lab = coldstart._stacked_rows(pool, lab)
    assert isinstance(stacked, StackedRows) and stacked.parts[1] is pool and n_lab == 12  # no copy of the pool
    np.testing.assert_array_equal(np.asarray(stacked), np.concatenate([lab, pool]))
    got = probcover_select(pool, 6, labeled=lab, delta=1.5)
    # the graph of [labeled; pool] in that order gives the same picks
    want = probcover_select(pool, 6, labeled=lab, graph=coldstart.ball_graph(np.concatenate([lab, pool]), 1.5))
    np.testing.assert_array_equal(got.rows, want.rows)
    bad = pool.copy()
    bad[3, 0] = np.inf
    with pytest.raises(ValueError, match="row 15 of"):
        probcover_select(bad, 2, labeled=lab, delta=1.5)
