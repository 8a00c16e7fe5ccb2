"""Confident learning against the paper's worked example and a direct, row-by-row
implementation of its formulas; outliers among labeled rows; near-duplicate pairs across
splits and labels."""

from __future__ import annotations

import numpy as np
import pytest

from miners.density import exact_knn_graph, lof_scores
from miners.label_issues import (
    calibrate_confident_joint,
    confident_joint,
    find_label_issues,
    labeled_outliers,
    near_duplicate_issues,
    normalized_margin,
    per_class_thresholds,
    round_preserving_row_totals,
    self_confidence,
)

# Figure 1 of Northcutt et al. (2021): the confident joint of 400 dog / fox / cow examples
# (rows: given label, columns: true label) and the joint Q it estimates.
PAPER_C = np.array([[100, 40, 20], [56, 60, 0], [32, 12, 80]])
PAPER_Q = np.array([[0.25, 0.10, 0.05], [0.14, 0.15, 0.00], [0.08, 0.03, 0.20]])


def paper_example():
    """Rows realising the figure: C[i][j] rows labeled i, confidently in class j."""
    y, p = [], []
    for i in range(3):
        for j in range(3):
            for t in range(PAPER_C[i, j]):
                v = np.full(3, 0.05)
                v[j] = 0.9
                # vary the confidence a little so that rankings are not all ties
                v[j] -= 0.001 * (t % 7)
                v[(j + 1) % 3] += 0.001 * (t % 7)
                y.append(i)
                p.append(v)
    return np.array(y), np.array(p)


def test_paper_figure_1_joint_and_issue_counts():
    y, p = paper_example()
    r = find_label_issues(y, p)
    np.testing.assert_array_equal(r.confident_joint, PAPER_C)
    np.testing.assert_allclose(r.joint, PAPER_Q)
    # the rows labeled i counted off the diagonal are exactly the issues: 400 (1 - trace Q)
    assert r.mask.sum() == round(400 * (1 - np.trace(PAPER_Q))) == 160
    assert r.stats["estimated_noise_rows"] == 160
    off = np.array([j != i for i in range(3) for j in range(3) for _ in range(PAPER_C[i, j])])
    assert (r.mask == off).all()
    for method in ("confident_joint", "prune_by_class", "prune_by_noise_rate", "both", "confusion"):
        for convention in ("paper", "cleanlab"):
            assert (find_label_issues(y, p, method=method, convention=convention).mask == off).all()
    # ranked by self-confidence, lowest first
    sc = self_confidence(y, p)
    assert (np.diff(sc[r.rows]) >= 0).all()


def direct(y, p, convention="paper"):
    n, c = p.shape
    t = np.array([np.mean([p[i, j] for i in range(n) if y[i] == j]) for j in range(c)])
    cj = np.zeros((c, c), int)
    guess = np.full(n, -1)
    for i in range(n):
        if convention == "paper":
            conf = [j for j in range(c) if p[i, j] >= t[j]]
            if conf:
                guess[i] = max(conf, key=lambda j: (p[i, j], -j))
        else:
            conf = [j for j in range(c) if p[i, j] >= t[j] - 1e-6]
            if len(conf) == 1:
                guess[i] = conf[0]
            elif conf:
                guess[i] = int(np.argmax(p[i]))
        if guess[i] >= 0:
            cj[y[i], guess[i]] += 1
    if convention == "cleanlab":
        for j in range(c):
            cj[j, j] = max(cj[j, j], 1)
    counts = np.bincount(y, minlength=c)
    cal = np.array([[cj[i, j] / cj[i].sum() * counts[i] if cj[i].sum() else 0.0 for j in range(c)]
                    for i in range(c)])
    cal = cal / cal.sum() * n
    return t, cj, guess, cal


def noisy_data(n=600, c=4, seed=0):
    rng = np.random.default_rng(seed)
    true = rng.integers(0, c, n)
    logits = rng.standard_normal((n, c)) * 1.2
    logits[np.arange(n), true] += 2.0
    p = np.exp(logits)
    p /= p.sum(1, keepdims=True)
    flip = rng.random(n) < 0.15
    y = np.where(flip, (true + rng.integers(1, c, n)) % c, true)
    return y, p, flip


@pytest.mark.parametrize("convention", ["paper", "cleanlab"])
def test_confident_joint_and_calibration_match_direct(convention):
    y, p, _ = noisy_data()
    t, cj, guess, cal = direct(y, p, convention)
    np.testing.assert_allclose(per_class_thresholds(y, p), t)
    got = confident_joint(y, p, convention=convention)
    np.testing.assert_array_equal(got.counts, cj)
    if convention == "paper":
        np.testing.assert_array_equal(got.true_guess, guess)
    c = calibrate_confident_joint(got.counts, np.bincount(y, minlength=4))
    np.testing.assert_allclose(c, cal)
    np.testing.assert_allclose(c.sum(1), np.bincount(y, minlength=4))


@pytest.mark.parametrize("method", ["prune_by_class", "prune_by_noise_rate", "both", "confident_joint"])
def test_pruning_matches_direct(method):
    y, p, flip = noisy_data(seed=1)
    n, c = p.shape
    _, cj, guess, cal = direct(y, p)
    counts = round_preserving_row_totals(cal)
    sc = p[np.arange(n), y]
    pbc, pbnr = set(), set()
    for i in range(c):
        rows = [r for r in range(n) if y[r] == i]
        k = sum(counts[i, j] for j in range(c) if j != i)
        pbc |= set(sorted(rows, key=lambda r: (sc[r], r))[:k])
        for j in range(c):
            if j != i and counts[i, j]:
                pbnr |= set(sorted(rows, key=lambda r: (-(p[r, j] - p[r, i]), r))[:counts[i, j]])
    cjset = {r for r in range(n) if guess[r] >= 0 and guess[r] != y[r]}
    want = {"prune_by_class": pbc, "prune_by_noise_rate": pbnr, "both": pbc & pbnr, "confident_joint": cjset}[method]
    pred = p.argmax(1)
    got = find_label_issues(y, p, method=method, require_disagreement=False)
    assert set(np.flatnonzero(got.mask).tolist()) == want
    got2 = find_label_issues(y, p, method=method)
    assert set(np.flatnonzero(got2.mask).tolist()) == {r for r in want if pred[r] != y[r]}
    # flagged rows are flipped far more often than rows at random (15 %)
    assert flip[got2.mask].mean() > 2 * flip.mean()


def test_ranking_frac_noise_and_min_per_class():
    y, p, _ = noisy_data(seed=2)
    r = find_label_issues(y, p, rank_by="normalized_margin")
    nm = normalized_margin(y, p)
    direct_nm = np.array([p[i, y[i]] - np.delete(p[i], y[i]).max() for i in range(len(y))])
    np.testing.assert_allclose(nm, direct_nm)
    assert (np.diff(nm[r.rows]) >= 0).all() and set(r.rows.tolist()) == set(np.flatnonzero(r.mask).tolist())
    half = find_label_issues(y, p, frac_noise=0.5, require_disagreement=False)
    full = find_label_issues(y, p, require_disagreement=False)
    assert half.mask.sum() < full.mask.sum()
    # a class of 3 rows, all confidently another class: at least 2 stay unflagged
    y2 = y.copy()
    p2 = p.copy()
    y2[:3] = 3
    y2[3:][y2[3:] == 3] = 0
    p2[:3] = [0.9, 0.04, 0.03, 0.03]
    kept = find_label_issues(y2, p2, min_per_class=2, method="prune_by_class", require_disagreement=False)
    assert (~kept.mask[y2 == 3]).sum() >= 2


@pytest.mark.parametrize(
    "labels, probs, match",
    [
        (np.array([0, 1]), np.array([[0.5, 0.5]]), "labels must be integers of shape"),
        (np.array([0, 2]), np.array([[0.5, 0.5], [0.5, 0.5]]), "labels row 1 is 2"),
        (np.array([0, 1]), np.array([[0.5, 0.6], [0.5, 0.5]]), "probs row 0 is not a probability"),
        (np.array([0.0, 1.0]), np.array([[0.5, 0.5], [0.5, 0.5]]), "labels must be integers"),
    ],
)
def test_label_issue_bad_input(labels, probs, match):
    with pytest.raises(ValueError, match=match):
        find_label_issues(labels, probs)


def test_labeled_outliers_equal_lof_of_the_exact_graph():
    rng = np.random.default_rng(3)
    x = rng.standard_normal((300, 5)).astype(np.float32)
    x[:3] += 8
    got = labeled_outliers(x, k=10)
    idx, dist = exact_knn_graph(x, 10)
    np.testing.assert_allclose(got, lof_scores(idx, dist), rtol=1e-6)
    from sklearn.neighbors import LocalOutlierFactor

    ref = -LocalOutlierFactor(n_neighbors=10).fit(x).negative_outlier_factor_
    np.testing.assert_allclose(got, ref, rtol=1e-4)
    assert set(np.argsort(-got)[:3].tolist()) == {0, 1, 2}
    kd = labeled_outliers(x, k=10, method="knn_distance")
    np.testing.assert_allclose(kd, dist[:, -1], rtol=1e-6)


def test_near_duplicate_issues_cross_split_and_label_conflicts():
    rng = np.random.default_rng(4)
    x = rng.standard_normal((200, 6)).astype(np.float32)
    x[100:110] = x[:10] + 1e-3  # copies of rows 0..9
    split = np.array(["train"] * 150 + ["test"] * 50, dtype=object)
    split[105:110] = "test"  # copies 5..9 leak into test
    labels = np.array([i % 3 for i in range(200)], dtype=object)
    labels[100:105] = labels[:5]  # copies 0..4 agree...
    labels[102] = (labels[2] + 1) % 3  # ...but one
    labels[107] = None  # an unlabeled copy never conflicts
    r = near_duplicate_issues(x, threshold=0.01, k=5, split=split, labels=labels)
    # direct: every pair within the threshold
    d = np.sqrt(((x[:, None].astype(float) - x[None].astype(float)) ** 2).sum(-1))
    pairs = [(i, j) for i in range(200) for j in range(i + 1, 200) if d[i, j] <= 0.01]
    assert sorted(pairs) == [(i, 100 + i) for i in range(10)]
    want = {(i, 100 + i): (split[i] != split[100 + i], labels[100 + i] is not None and labels[i] != labels[100 + i])
            for i in range(10)}
    got = {tuple(p): (c, lc) for p, c, lc in zip(r.pairs.tolist(), r.cross_split, r.label_conflict, strict=True)}
    assert got == {k: v for k, v in want.items() if v[0] or v[1]}
    assert got[(2, 102)] == (False, True) and got[(7, 107)] == (True, False)
    only = near_duplicate_issues(x, threshold=0.01, k=5, split=split, keep="cross_split")
    assert sorted(map(tuple, only.pairs.tolist())) == [(i, 100 + i) for i in range(5, 10)]
    assert len(near_duplicate_issues(x, 0.01, k=5, keep="all").pairs) == 10
    # a row without a split is not a leak (None against "test" is not a crossing)
    split[0] = None
    unknown = near_duplicate_issues(x, threshold=0.01, k=5, split=split, keep="cross_split")
    assert sorted(map(tuple, unknown.pairs.tolist())) == [(i, 100 + i) for i in range(5, 10)]
    split[5] = None
    unknown = near_duplicate_issues(x, threshold=0.01, k=5, split=split, keep="cross_split")
    assert sorted(map(tuple, unknown.pairs.tolist())) == [(i, 100 + i) for i in range(6, 10)]
