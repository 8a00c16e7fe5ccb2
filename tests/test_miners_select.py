"""`select` (combined objectives in one greedy pass) and SEALS candidates, each against a
direct implementation of its definition on small data."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.stats import rankdata

from miners.select import (
    Objective,
    normalize_scores,
    seals_candidates,
    select,
    target_counts,
    threshold_mask,
)


def direct_select(size, objectives, x=None, eligible=None, lam=0.0, scale=1.0, ref_m=None, stop=None, seed=0,
                  groups=None, targets=None, fill=True):
    """The module docstring, literally: O(N) per pick, full float64 distances."""
    n = len(objectives[0].scores) if objectives else len(x)
    ok = np.ones(n, bool) if eligible is None else eligible.copy()
    for o in objectives:
        if o.weight != 0:
            ok &= ~np.isnan(o.scores)
    u = np.zeros(n)
    for o in objectives:
        if o.weight == 0:
            continue
        s = o.scores[ok]
        v = np.zeros(n)
        if o.normalize == "rank":
            v[ok] = (rankdata(s) - 1) / (len(s) - 1) if len(s) > 1 else 1.0
        elif o.normalize == "minmax":
            v[ok] = (s - s.min()) / (s.max() - s.min()) if s.max() > s.min() else 0.0
        else:
            v[ok] = s
        u += o.weight * v
    tie = np.empty(n, int)
    tie[np.random.default_rng(seed).permutation(n)] = np.arange(n)
    m = np.full(n, np.inf) if ref_m is None else ref_m.copy()
    picks = []
    counts = None if groups is None else np.zeros(len(targets), int)
    phase = 1 if groups is not None else 2
    while len(picks) < size:
        elig = ok.copy()
        if stop is not None:
            elig &= m >= stop
        if phase == 1:
            elig &= (counts < targets)[groups]
        if not elig.any():
            if phase == 1 and fill:
                phase = 2
                continue
            break
        key = u + lam * np.minimum(1.0, m / scale)
        best = max(np.flatnonzero(elig), key=lambda r: (key[r], -tie[r]))
        picks.append(int(best))
        ok[best] = False
        if counts is not None:
            counts[groups[best]] += 1
        if x is not None:
            d = np.sqrt(((x.astype(np.float64) - x[best].astype(np.float64)) ** 2).sum(1))
            m = np.minimum(m, d)
    return picks


def data(n=800, d=12, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, d)).astype(np.float32)
    s1 = rng.random(n)
    s2 = rng.standard_normal(n)
    s2[rng.random(n) < 0.05] = np.nan
    return x, s1, s2


@pytest.mark.parametrize("mode", ["lazy", "eager", "auto"])
@pytest.mark.parametrize("lam", [0.2, 1.0, 5.0])
def test_select_matches_direct_greedy(mode, lam):
    x, s1, s2 = data()
    objs = [Objective(s1, 1.0, "rank"), Objective(s2, -0.5, "minmax")]
    got = select(40, objectives=objs, vectors=x, diversity=lam, distance_scale=4.0, seed=5, mode=mode)
    want = direct_select(40, objs, x, lam=lam, scale=4.0, seed=5)
    assert got.rows.tolist() == want
    assert got.stopped == "size" and len(got.rows) == 40
    # the reported distance is the distance to the nearest earlier pick
    for i in range(1, 10):
        d = np.linalg.norm(x[got.rows[:i]].astype(float) - x[got.rows[i]].astype(float), axis=1).min()
        assert got.distance[i] == pytest.approx(d, rel=1e-5)


def test_select_lazy_switches_to_eager_with_same_picks():
    x, s1, _ = data(600, 8, 1)
    objs = [Objective(s1, 0.1)]
    auto = select(60, objectives=objs, vectors=x, diversity=2.0, seed=2, lazy_budget=3)
    assert auto.stats["mode"] == "lazy+eager" and auto.stats["switched_at"] is not None
    eager = select(60, objectives=objs, vectors=x, diversity=2.0, seed=2, mode="eager")
    lazy = select(60, objectives=objs, vectors=x, diversity=2.0, seed=2, mode="lazy")
    assert auto.rows.tolist() == eager.rows.tolist() == lazy.rows.tolist()
    # the default scale (no reference): largest distance of a row to the mean
    radius = np.linalg.norm(x.astype(float) - x.astype(float).mean(0), axis=1).max()
    assert eager.rows.tolist() == direct_select(60, objs, x, lam=2.0, scale=radius, seed=2)


def test_select_reference_and_stop_distance():
    x, s1, _ = data(500, 6, 2)
    ref = np.random.default_rng(9).standard_normal((30, 6)).astype(np.float32)
    ref_m = np.sqrt(((x[:, None, :].astype(float) - ref[None].astype(float)) ** 2).sum(-1)).min(1)
    objs = [Objective(s1, 1.0)]
    got = select(300, objectives=objs, vectors=x, reference=ref, diversity=0.5, stop_distance=1.5, seed=0)
    want = direct_select(300, objs, x, lam=0.5, scale=ref_m.max(), ref_m=ref_m, stop=1.5, seed=0)
    assert got.rows.tolist() == want
    # the stop distance holds between picks and to the reference set; the pool ran out
    p = x[got.rows].astype(float)
    dd = np.sqrt(((p[:, None] - p[None]) ** 2).sum(-1)) + np.eye(len(p)) * 1e9
    assert dd.min() >= 1.5 and ref_m[got.rows].min() >= 1.5
    assert got.stopped == "exhausted" and len(got.rows) < 300
    # the same with the distances given instead of the reference vectors
    again = select(300, objectives=objs, vectors=x, reference_distances=ref_m, diversity=0.5, stop_distance=1.5)
    assert again.rows.tolist() == got.rows.tolist()


def test_select_without_distances_is_a_sort_with_thresholds():
    x, s1, s2 = data(300, 4, 3)
    eligible = threshold_mask(s1, min=0.2, max=0.9)
    objs = [Objective(s1, 2.0, "none"), Objective(s2, 1.0, "rank")]
    got = select(25, objectives=objs, eligible=eligible, seed=4)
    assert got.stats["mode"] == "static"
    assert got.rows.tolist() == direct_select(25, objs, eligible=eligible, seed=4)
    assert ((s1[got.rows] >= 0.2) & (s1[got.rows] <= 0.9) & ~np.isnan(s2[got.rows])).all()


def test_select_without_objectives_is_a_seeded_random_sample():
    x, _, _ = data(200, 3, 4)
    a = select(20, vectors=x, seed=1).rows
    b = select(20, vectors=x, seed=1).rows
    c = select(20, vectors=x, seed=2).rows
    assert a.tolist() == b.tolist() and a.tolist() != c.tolist() and len(set(a.tolist())) == 20


@pytest.mark.parametrize("fill", [True, False])
def test_select_group_targets(fill):
    x, s1, _ = data(400, 5, 5)
    groups = np.random.default_rng(0).integers(0, 4, 400)
    objs = [Objective(s1)]
    targets = np.array([3, 6, 0, 2])
    for lam in (0.0, 0.7):
        got = select(20, objectives=objs, vectors=x, diversity=lam, groups=groups, targets=targets, fill=fill,
                     distance_scale=3.0, seed=3)
        want = direct_select(20, objs, x if lam else None, lam=lam, scale=3.0, seed=3, groups=groups,
                             targets=targets, fill=fill)
        assert got.rows.tolist() == want
        counts = np.bincount(groups[got.rows], minlength=4)
        if fill:
            assert len(got.rows) == 20 and (counts >= targets).all()
        else:
            assert counts.tolist() == targets.tolist() and got.stopped == "targets"
    # fractions: 50% / 25% / 25% of 20
    frac = select(20, objectives=objs, groups=groups, targets={0: 0.5, 1: 0.25, 3: 0.25},
                  target_kind="fraction", fill=False)
    assert np.bincount(groups[frac.rows], minlength=4).tolist() == [10, 5, 0, 5]


def test_target_counts_largest_remainder():
    assert target_counts([1 / 3, 1 / 3, 1 / 3], 10, 3, "fraction").tolist() == [4, 3, 3]
    assert target_counts({2: 0.5}, 7, 4, "fraction").tolist() == [0, 0, 4, 0]
    assert target_counts([2, 5], 10, 3).tolist() == [2, 5, 0]
    with pytest.raises(ValueError, match="whole numbers"):
        target_counts([1.5], 10, 2)
    with pytest.raises(ValueError, match="sum to at most 1"):
        target_counts([0.7, 0.7], 10, 2, "fraction")


def test_normalize_scores_against_definitions():
    s = np.array([3.0, 1.0, 2.0, 2.0, np.nan])
    m = ~np.isnan(s)
    np.testing.assert_allclose(normalize_scores(s, "rank", m)[:4], (rankdata(s[:4]) - 1) / 3)
    np.testing.assert_allclose(normalize_scores(s, "minmax", m)[:4], [1.0, 0.0, 0.5, 0.5])
    assert np.isnan(normalize_scores(s, "rank", m)[4])
    assert threshold_mask(np.array(["a", "b", "c"]), isin=["a", "c"]).tolist() == [True, False, True]


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"objectives": [Objective(np.ones(3))], "eligible": np.ones(4, bool)}, "eligible must be a boolean"),
        ({"objectives": [Objective(np.ones(3))], "diversity": 1.0}, "need vectors"),
        ({"objectives": [Objective(np.array([1.0, np.inf, 0]))]}, "row 1 is infinite"),
        ({"objectives": [Objective(np.ones(3))], "groups": np.zeros(3, int)}, "groups need targets"),
        ({"objectives": [Objective(np.ones(3))], "diversity": -1.0}, "diversity must be"),
        ({}, "needs at least one of"),
        ({"vectors": np.ones((3, 2), np.float32), "stop_distance": 0.1, "mode": "fast"}, "mode must be"),
    ],
)
def test_select_bad_input(kwargs, match):
    with pytest.raises(ValueError, match=match):
        select(2, **kwargs)


def test_select_check_cancels_and_progress_reports():
    x, s1, _ = data(300, 4, 6)
    calls = []

    class Stop(Exception):
        pass

    def check():
        if len(calls) > 3:
            raise Stop

    def progress(f, m):
        calls.append((f, m))

    with pytest.raises(Stop):
        select(200, objectives=[Objective(s1)], vectors=x, diversity=1.0, mode="eager",
               progress=progress, check=lambda: (calls.append(None), check()))


def test_seals_candidates_is_the_union_of_labeled_knn():
    rng = np.random.default_rng(7)
    pool = rng.standard_normal((400, 8)).astype(np.float32)
    lab = rng.standard_normal((6, 8)).astype(np.float32)
    got = seals_candidates(pool, lab, k=15)
    d = ((lab[:, None, :].astype(float) - pool[None].astype(float)) ** 2).sum(-1)
    want = np.unique(np.argsort(d, axis=1, kind="stable")[:, :15])
    assert got.tolist() == want.tolist()
    stats: dict = {}
    assert len(seals_candidates(pool, lab, k=1000, stats=stats)) == 400
    assert stats["graph"]["method"] == "exact"
    assert seals_candidates(pool, np.empty((0, 8), np.float32)).shape == (0,)
    with pytest.raises(ValueError, match="labeled must be"):
        seals_candidates(pool, np.ones((2, 3), np.float32))
