"""Diversity miners (``miners.diversity``): k-center greedy, BADGE, Cluster-Margin.

Each algorithm is checked against a plain implementation written here (full distance
matrix, explicit gradient embeddings), plus the properties the module documents: pruning
never changes the picks, the torch path equals the NumPy path, cosine = l2 on unit vectors,
radii non-increasing, round-robin order, determinism, and precise errors.
"""

from __future__ import annotations

import numpy as np
import pytest

from miners.diversity import badge_select, cluster_margin_select, kcenter_greedy

# ----------------------------------------------------------------------------- helpers


def plain_kcenter(x: np.ndarray, size: int, start: int | None = None,
                  reference: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Textbook k-center greedy on the full N x N distance matrix (float64)."""
    x = x.astype(np.float64)
    dist = np.sqrt(((x[:, None, :] - x[None, :, :]) ** 2).sum(-1))
    if reference is not None:
        r = reference.astype(np.float64)
        mind = np.sqrt(((x[:, None, :] - r[None, :, :]) ** 2).sum(-1)).min(1)
    else:
        mind = np.full(len(x), np.inf)
    picks, radii = [], []
    for i in range(size):
        if i == 0 and start is not None:
            p = start
        elif i == 0 and reference is None:
            p = int(np.argmax(((x - x.mean(0)) ** 2).sum(1)))  # farthest from the mean
        else:
            p = int(np.argmax(mind))
        radii.append(mind.max())
        picks.append(p)
        mind = np.minimum(mind, dist[p])
    return np.array(picks), np.array(radii)


def clustered(n: int, d: int, k: int, seed: int, spread: float = 0.05) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((k, d)).astype(np.float32)
    weights = rng.pareto(1.5, k) + 0.2
    assign = rng.choice(k, size=n, p=weights / weights.sum())
    return (centres[assign] + spread * rng.standard_normal((n, d))).astype(np.float32)


def random_probs(rng: np.random.Generator, n: int, c: int) -> np.ndarray:
    z = rng.standard_normal((n, c)) * 2.0
    p = np.exp(z - z.max(1, keepdims=True))
    return p / p.sum(1, keepdims=True)


# ----------------------------------------------------------------------------- k-center


@pytest.mark.parametrize("case", ["mean", "start", "reference", "reference+start"])
def test_kcenter_matches_plain_greedy(case: str) -> None:
    rng = np.random.default_rng(1)
    x = rng.standard_normal((300, 8)).astype(np.float32)
    ref = rng.standard_normal((25, 8)).astype(np.float32) if "reference" in case else None
    start = 17 if "start" in case else None
    want_p, want_r = plain_kcenter(x, 60, start=start, reference=ref)
    for prune in (True, False):
        picks, radii = kcenter_greedy(x, 60, reference=ref, start=start, prune=prune)
        assert picks.dtype == np.int64 and radii.shape == (60,)
        np.testing.assert_array_equal(picks, want_p)
        np.testing.assert_allclose(radii, want_r, rtol=1e-5, atol=1e-5)
    assert np.isinf(radii[0]) == (ref is None)


def test_kcenter_first_pick_without_reference_is_farthest_from_mean() -> None:
    x = np.zeros((50, 3), dtype=np.float32)
    x[:, 0] = np.arange(50)
    x[7] = [0.0, 100.0, 0.0]
    picks, radii = kcenter_greedy(x, 2)
    assert picks[0] == 7 and np.isinf(radii[0])


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_kcenter_pruning_never_changes_picks(seed: int) -> None:
    rng = np.random.default_rng(seed)
    datasets = {
        "gaussian": rng.standard_normal((5000, 16)).astype(np.float32),
        "clustered": clustered(5000, 16, 40, seed),
        "tight clusters + offset": clustered(5000, 16, 10, seed, spread=0.01) + 3.0,
    }
    saved = {}
    for name, x in datasets.items():
        ref = x[rng.choice(len(x), 30, replace=False)] + 0.01 if name == "clustered" else None
        s_on: dict = {}
        s_off: dict = {}
        p_on, r_on = kcenter_greedy(x, 150, reference=ref, stats=s_on, block_rows=1000)
        p_off, r_off = kcenter_greedy(x, 150, reference=ref, prune=False, stats=s_off)
        np.testing.assert_array_equal(p_on, p_off, err_msg=name)
        np.testing.assert_array_equal(r_on, r_off, err_msg=name)
        assert s_off["pruned_fraction"] == 0.0
        assert s_on["full_evaluations"] == s_off["evaluations"] == 5000 * 149
        saved[name] = s_on["pruned_fraction"]
    print(f"seed {seed}: pruned fraction {saved}")
    assert saved["clustered"] > 0.3
    assert saved["tight clusters + offset"] > 0.3


def test_kcenter_pruning_threads_and_blocks() -> None:
    """Large enough for the threaded path (N * d >= 2**20), small blocks, gathers."""
    x = clustered(70_000, 16, 60, 5)
    s_on: dict = {}
    p_on, r_on = kcenter_greedy(x, 120, block_rows=4096, stats=s_on)
    p_off, r_off = kcenter_greedy(x, 120, block_rows=4096, prune=False)
    np.testing.assert_array_equal(p_on, p_off)
    np.testing.assert_array_equal(r_on, r_off)
    assert s_on["threads"] >= 1 and s_on["pruned_fraction"] > 0.3


def test_kcenter_torch_path_equals_numpy_path() -> None:
    import torch  # noqa: F401 — a hard dependency: fail, never skip
    rng = np.random.default_rng(3)
    x = rng.standard_normal((3000, 12)).astype(np.float32)
    ref = rng.standard_normal((10, 12)).astype(np.float32)
    for kw in ({}, {"reference": ref}, {"metric": "cosine"}):
        p_np, r_np = kcenter_greedy(x, 80, device="cpu", **kw)
        stats: dict = {}
        p_t, r_t = kcenter_greedy(x, 80, device="torch", stats=stats, **kw)
        assert stats["device"] == "torch:cpu"
        np.testing.assert_array_equal(p_t, p_np)
        np.testing.assert_allclose(r_t, r_np, rtol=1e-5)


def test_kcenter_cosine_equals_l2_on_normalised_vectors() -> None:
    rng = np.random.default_rng(4)
    x = (rng.standard_normal((2000, 10)) * rng.uniform(0.5, 3, (2000, 1))).astype(np.float32)
    ref = rng.standard_normal((15, 10)).astype(np.float32)
    unit = (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)
    unit_ref = (ref / np.linalg.norm(ref, axis=1, keepdims=True)).astype(np.float32)
    for r, ur in ((None, None), (ref, unit_ref)):
        p_cos, r_cos = kcenter_greedy(x, 100, metric="cosine", reference=r)
        p_l2, r_l2 = kcenter_greedy(unit, 100, metric="l2", reference=ur)
        np.testing.assert_array_equal(p_cos, p_l2)
        # cosine radii are 1 - cos = |u - v|^2 / 2
        fin = np.isfinite(r_l2)
        np.testing.assert_allclose(r_cos[fin], r_l2[fin] ** 2 / 2, rtol=1e-4, atol=1e-6)


def test_kcenter_radii_non_increasing_and_picks_distinct() -> None:
    x = clustered(4000, 8, 20, 7)
    ref = x[:50] + 0.1
    for r in (None, ref):
        picks, radii = kcenter_greedy(x, 500, reference=r)
        assert len(set(picks.tolist())) == 500
        assert np.all(np.diff(radii) <= 0)


def test_kcenter_duplicates_tie_to_smallest_index_and_full_size() -> None:
    base = np.array([[0, 0], [10, 0], [0, 10]], dtype=np.float32)
    x = np.concatenate([base, base, base])  # rows i, i+3, i+6 identical
    picks, radii = kcenter_greedy(x, 9, start=0)
    assert picks[:3].tolist() == [0, 1, 2]  # the duplicates 3..8 lose every tie
    assert sorted(picks.tolist()) == list(range(9))
    assert picks[3:].tolist() == [3, 4, 5, 6, 7, 8]  # all covered: index order
    np.testing.assert_array_equal(radii[3:], 0.0)


def test_kcenter_stats_and_empty() -> None:
    x = np.random.default_rng(0).standard_normal((100, 4)).astype(np.float32)
    stats: dict = {}
    picks, radii = kcenter_greedy(x, 0, stats=stats)
    assert picks.shape == (0,) and radii.shape == (0,)
    assert set(stats) >= {"evaluations", "pruned_fraction", "seconds", "full_evaluations"}
    picks, _ = kcenter_greedy(x.astype(np.float64), 5)  # float64 input: converted
    assert len(picks) == 5


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"pool": np.zeros(5, np.float32)}, r"pool must be a 2-D array"),
        ({"pool": np.array([["a"]])}, r"numeric"),
        ({"size": 11}, r"size must be in \[0, N\] = \[0, 10\]"),
        ({"size": -1}, r"size must be in"),
        ({"size": 2.0}, r"size must be an integer"),
        ({"reference": np.zeros((3, 4), np.float32)}, r"reference has dimension 4 but pool "
                                                       r"has dimension 3"),
        ({"start": 10}, r"start must be in \[0, N\)"),
        ({"metric": "manhattan"}, r"metric must be 'l2' or 'cosine'"),
        ({"block_rows": 0}, r"block_rows must be an integer >= 1"),
        ({"device": "tpu"}, r"device must be"),
        ({"pool_nan": 4}, r"pool row 4 has NaN or infinite values"),
        ({"pool_inf_ref": 1}, r"reference row 1 has NaN or infinite values"),
        ({"pool_zero": 2, "metric": "cosine"}, r"pool row 2 is the zero vector"),
        ({"pool_huge": 3}, r"pool row 3 has values so large"),
    ],
)
def test_kcenter_bad_input(kwargs: dict, match: str) -> None:
    x = np.random.default_rng(0).standard_normal((10, 3)).astype(np.float32)
    ref = np.ones((4, 3), np.float32)
    args = {"pool": x, "size": 3}
    for key in ("pool_nan", "pool_zero", "pool_huge"):
        if key in kwargs:
            row = kwargs.pop(key)
            x[row] = {"pool_nan": np.nan, "pool_zero": 0.0, "pool_huge": 1e30}[key]
    if "pool_inf_ref" in kwargs:
        ref[kwargs.pop("pool_inf_ref"), 0] = np.inf
        kwargs["reference"] = ref
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        kcenter_greedy(args.pop("pool"), args.pop("size"), **args)


# ----------------------------------------------------------------------------- BADGE


def explicit_badge(probs: np.ndarray, h: np.ndarray, size: int, seed: int) -> np.ndarray:
    """BADGE with the N x (C D) gradient embeddings built explicitly, same k-means++."""
    p = probs.astype(np.float64)
    a = p.copy()
    a[np.arange(len(p)), p.argmax(1)] -= 1.0
    g = (a[:, :, None] * h.astype(np.float64)[:, None, :]).reshape(len(p), -1)
    rng = np.random.default_rng(seed)
    picks = [int(np.argmax((g ** 2).sum(1)))]
    d2 = ((g - g[picks[0]]) ** 2).sum(1)
    while len(picks) < size:
        cum = np.cumsum(d2)
        c = int(np.searchsorted(cum, rng.random() * cum[-1], side="right"))
        picks.append(c)
        d2 = np.minimum(d2, ((g - g[c]) ** 2).sum(1))
        d2[picks] = 0.0
    return np.array(picks)


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_badge_equals_explicit_gradient_embeddings(seed: int, dtype: type) -> None:
    rng = np.random.default_rng(100 + seed)
    probs = random_probs(rng, 200, 4)
    h = rng.standard_normal((200, 6)).astype(dtype)
    picks = badge_select(probs, h, 40, seed=seed)
    assert picks.dtype == np.int64
    np.testing.assert_array_equal(picks, explicit_badge(probs, h, 40, seed))
    assert len(set(picks.tolist())) == 40


def test_badge_deterministic_and_seeded() -> None:
    rng = np.random.default_rng(5)
    probs, h = random_probs(rng, 500, 10), rng.standard_normal((500, 16)).astype(np.float32)
    a = badge_select(probs, h, 30, seed=7)
    np.testing.assert_array_equal(a, badge_select(probs, h, 30, seed=7))
    assert not np.array_equal(a, badge_select(probs, h, 30, seed=8))
    assert a[0] == badge_select(probs, h, 30, seed=8)[0]  # first = largest gradient norm


def test_badge_all_rows_and_duplicates() -> None:
    rng = np.random.default_rng(6)
    probs = random_probs(rng, 5, 3)
    h = rng.standard_normal((5, 4))
    probs, h = np.concatenate([probs, probs]), np.concatenate([h, h])  # 5 duplicated pairs
    picks = badge_select(probs, h, 10)
    assert sorted(picks.tolist()) == list(range(10))
    first5 = set(picks[:5].tolist())
    assert len({i % 5 for i in first5}) == 5  # one of each pair before any duplicate
    assert badge_select(probs, h, 0).shape == (0,)


@pytest.mark.parametrize(
    "probs, h, size, kwargs, match",
    [
        (np.full((4, 2), 0.5), np.ones((3, 2)), 2, {}, r"embeddings has 3 rows but probs has 4"),
        (np.full((4, 2), 0.5), np.ones(4), 2, {}, r"embeddings must be a 2-D array"),
        (np.full((4, 2), 0.5), np.ones((4, 2)), 5, {}, r"size must be in \[0, N\] = \[0, 4\]"),
        (np.full((4, 2), 0.7), np.ones((4, 2)), 2, {}, r"rows must sum to 1"),
        (np.full((4, 2), 0.5), np.full((4, 2), np.nan), 2, {}, r"embeddings row 0 has NaN"),
        (np.full((4, 2), 0.5), np.ones((4, 2)), 2, {"labels_from": "sample"}, r"labels_from"),
    ],
)
def test_badge_bad_input(probs, h, size, kwargs, match) -> None:
    with pytest.raises(ValueError, match=match):
        badge_select(probs, h, size, **kwargs)


# ----------------------------------------------------------------------------- Cluster-Margin


def blobs(seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Three far-apart blobs of 5, 10 and 20 points; random scores."""
    rng = np.random.default_rng(seed)
    sizes, centres = (20, 5, 10), ((-50, 50), (0, 0), (50, 50))
    x = np.concatenate([rng.standard_normal((n, 2)) * 0.5 + c for n, c in zip(sizes, centres,
                                                                                strict=True)])
    truth = np.repeat(np.arange(3), sizes)
    perm = rng.permutation(len(x))
    return x[perm].astype(np.float32), truth[perm], rng.random(len(x))


def expected_round_robin(truth: np.ndarray, scores: np.ndarray, size: int) -> list[int]:
    clusters = [np.flatnonzero(truth == k) for k in np.unique(truth)]
    clusters = [c[np.lexsort((c, -scores[c]))] for c in clusters]  # score desc, index
    clusters.sort(key=len)
    out: list[int] = []
    r = 0
    while len(out) < size:
        for c in clusters:
            if r < len(c) and len(out) < size:
                out.append(int(c[r]))
        r += 1
    return out


@pytest.mark.parametrize("size", [1, 3, 10, 16, 35])
def test_cluster_margin_round_robin_on_constructed_clusters(size: int) -> None:
    x, truth, scores = blobs()
    want = expected_round_robin(truth, scores, size)
    assert cluster_margin_select(x, scores, size, n_clusters=3).tolist() == want
    assert cluster_margin_select(x, scores, size, labels=truth).tolist() == want
    if size == 10:  # smallest cluster (5 items) exhausted after 5 rounds
        picks = cluster_margin_select(x, scores, 16, labels=truth)
        assert [truth[i] for i in picks[:3]] == [1, 2, 0]
        assert sorted(truth[picks].tolist()).count(1) == 5


def test_cluster_margin_takes_most_uncertain_first_in_each_cluster() -> None:
    x, truth, scores = blobs(1)
    picks = cluster_margin_select(x, scores, 3, n_clusters=3)
    for i in picks:
        members = np.flatnonzero(truth == truth[i])
        assert scores[i] == scores[members].max()


def test_cluster_margin_deterministic_with_seed_and_defaults() -> None:
    rng = np.random.default_rng(2)
    x = rng.standard_normal((600, 8)).astype(np.float32)
    scores = rng.random(600)
    a = cluster_margin_select(x, scores, 40, seed=3)
    np.testing.assert_array_equal(a, cluster_margin_select(x, scores, 40, seed=3))
    assert len(set(a.tolist())) == 40
    # n_clusters = N: every item its own cluster, so the picks are the top scores
    top = np.argsort(-scores, kind="stable")[:7]
    np.testing.assert_array_equal(cluster_margin_select(x, scores, 7, n_clusters=600), top)
    # one cluster: top scores as well
    np.testing.assert_array_equal(cluster_margin_select(x, scores, 7, n_clusters=1), top)
    assert cluster_margin_select(x, scores, 0).shape == (0,)


@pytest.mark.parametrize(
    "x, s, size, kwargs, match",
    [
        (np.ones((4, 2)), np.ones(3), 2, {}, r"margin_scores must have shape \(N,\) = \(4,\)"),
        (np.ones(4), np.ones(4), 2, {}, r"embeddings must be a 2-D array"),
        (np.ones((4, 2)), np.ones(4), 5, {}, r"size must be in \[0, N\] = \[0, 4\]"),
        (np.ones((4, 2)), np.ones(4), 2, {"n_clusters": 0}, r"n_clusters must be in \[1, N\]"),
        (np.ones((4, 2)), np.ones(4), 2, {"n_clusters": 5}, r"n_clusters must be in \[1, N\]"),
        (np.ones((4, 2)), np.array([1, np.nan, 1, 1]), 2, {}, r"margin_scores has NaN"),
        (np.full((4, 2), np.inf), np.ones(4), 2, {}, r"embeddings row 0 has NaN or infinite"),
        (np.ones((4, 2)), np.ones(4), 2, {"labels": np.ones(3, int)}, r"labels must be"),
        (np.ones((4, 2)), np.ones(4), 2, {"labels": np.ones(4, int), "n_clusters": 2},
         r"either labels"),
    ],
)
def test_cluster_margin_bad_input(x, s, size, kwargs, match) -> None:
    with pytest.raises(ValueError, match=match):
        cluster_margin_select(x, s, size, **kwargs)


def test_kcenter_gpu_code_paths_on_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    """The CUDA engine's float64 accumulation and host streaming (pool too big for the GPU),
    run on the CPU: same picks as NumPy, pruned or not."""
    import torch  # noqa: F401 — a hard dependency: fail, never skip

    import miners.diversity as dv

    x = clustered(4000, 12, 30, 9)
    want, _ = kcenter_greedy(x, 100, device="cpu")
    for resident in (True, False):
        monkeypatch.setattr(dv, "_make_engine", lambda a, device, r=resident: dv._TorchDots(
            a, "cpu", float64=True, resident=r))
        for prune in (True, False):
            stats: dict = {}
            got, _ = kcenter_greedy(x, 100, prune=prune, stats=stats, block_rows=700)
            np.testing.assert_array_equal(got, want)
            assert stats["device"] == "torch:cpu"


@pytest.mark.parametrize("method", ["kmeans", "hac"])
def test_cluster_margin_sampled_clustering_then_assignment(monkeypatch, method) -> None:
    import miners.diversity as div

    # more candidates than the clustering sample: cluster a sample, assign every row to the
    # nearest centre; well-separated blobs come out as the constructed clusters
    monkeypatch.setattr(div, "CLUSTER_MARGIN_SAMPLE", 20)
    x, truth, scores = blobs(3)
    for size in (3, 10, 35):
        picks = cluster_margin_select(x, scores, size, n_clusters=3, method=method, seed=1)
        assert picks.tolist() == expected_round_robin(truth, scores, size)
    # the default clusters are capped: a batch larger than the cap still round-robins
    monkeypatch.setattr(div, "CLUSTER_MARGIN_MAX_CLUSTERS", 3)
    picks = cluster_margin_select(x, scores, 35, method=method, seed=1)
    assert picks.tolist() == expected_round_robin(truth, scores, 35)
    with pytest.raises(ValueError, match="method must be"):
        cluster_margin_select(x, scores, 3, method="ward")


def test_kmeans_equals_faiss_lloyd_and_reports_each_iteration() -> None:
    # Iteration by iteration (for progress and cancel) gives what one FAISS call with the
    # same start and niter gives: the independent implementation of the same Lloyd steps.
    import faiss

    from miners.clustering import kmeans, kmeans_plusplus

    rng = np.random.default_rng(3)
    centres = rng.standard_normal((6, 8)).astype(np.float32) * 6
    x = (centres[rng.integers(0, 6, 1200)] + rng.standard_normal((1200, 8))).astype(np.float32)
    seen: list[str] = []
    got_centres, labels, d2 = kmeans(x, 6, seed=5, niter=7, progress=lambda f, m: seen.append(m))
    init = kmeans_plusplus(x, 6, seed=5)  # the start kmeans takes on 1,200 rows (all of them)
    km = faiss.Kmeans(8, 6, niter=7, seed=5, max_points_per_centroid=256, min_points_per_centroid=1)
    km.train(x, init_centroids=np.ascontiguousarray(init, dtype=np.float32))
    np.testing.assert_allclose(got_centres, km.centroids, rtol=1e-4, atol=1e-4)
    direct = ((x[:, None, :] - got_centres[None]) ** 2).sum(-1)
    np.testing.assert_array_equal(labels, direct.argmin(1))
    np.testing.assert_allclose(d2, direct.min(1), rtol=1e-3, atol=1e-3)
    assert [m for m in seen if "iteration" in m][-1].startswith("k-means: iteration 7 of 7")


def test_kmeans_cancels_between_iterations() -> None:
    from miners.clustering import kmeans

    x = np.random.default_rng(0).standard_normal((2000, 8)).astype(np.float32)
    iterations = []

    def check() -> None:
        if len(iterations) >= 2:
            raise InterruptedError("cancelled")

    with pytest.raises(InterruptedError):
        kmeans(x, 20, niter=50, progress=lambda f, m: iterations.append(m) if "iteration" in m else None,
               check=check)
    assert len(iterations) == 2


def test_kcenter_reports_the_reference_seeding_and_cancels_in_it() -> None:
    """The reference seeding (``O(N L d)``, a minute at 1M x 10k) reports rows done per block
    through ``on_reference`` and stops when it raises; the picks are those without it."""
    rng = np.random.default_rng(4)
    x = rng.standard_normal((1000, 8)).astype(np.float32)
    ref = rng.standard_normal((50, 8)).astype(np.float32)
    seen: list[tuple[int, int]] = []
    picks, radii = kcenter_greedy(x, 5, reference=ref, block_rows=128, on_reference=lambda d, n: seen.append((d, n)))
    assert seen == [(r, 1000) for r in range(0, 1000, 128)] + [(1000, 1000)]
    want, want_r = kcenter_greedy(x, 5, reference=ref, block_rows=128)
    np.testing.assert_array_equal(picks, want)
    np.testing.assert_array_equal(radii, want_r)

    class Stop(Exception):
        pass

    def stop_at(done: int, total: int) -> None:
        if done >= 256:
            raise Stop

    picked: list[int] = []
    with pytest.raises(Stop):
        kcenter_greedy(x, 5, reference=ref, block_rows=128, on_reference=stop_at, on_pick=lambda d, n: picked.append(d))
    assert picked == []  # stopped before the first pick


@pytest.mark.parametrize("prune", [True, False])
def test_kcenter_from_approximate_nearest_reference_rows_picks_as_the_exact_seeding(prune: bool) -> None:
    """``reference_nearest`` from an approximate search (here: deliberately wrong for a third
    of the rows, and the exact ones for the rest): the rows about to be picked are checked
    against the whole reference set, so picks and radii are those of the exact seeding."""
    rng = np.random.default_rng(11)
    centres = rng.normal(0, 4, (12, 16))
    x = (centres[rng.integers(0, 12, 3000)] + rng.normal(0, 1, (3000, 16))).astype(np.float32)
    ref = (centres[rng.integers(0, 12, 300)] + rng.normal(0, 1, (300, 16))).astype(np.float32)
    d2 = ((x[:, None, :].astype(np.float64) - ref[None, :, :]) ** 2).sum(axis=2)
    exact_nearest = np.argmin(d2, axis=1)
    wrong = rng.random(3000) < 1 / 3
    nearest = np.where(wrong, np.argmax(d2, axis=1), exact_nearest)  # the farthest row: worst case
    want, want_r = kcenter_greedy(x, 40, reference=ref, prune=prune)
    stats: dict = {}
    got, got_r = kcenter_greedy(x, 40, reference=ref, prune=prune, reference_nearest=nearest, stats=stats)
    np.testing.assert_array_equal(got, want)
    np.testing.assert_allclose(got_r, want_r, rtol=1e-6)
    # the same as the direct definition: each pick the farthest row from reference + picks so far
    mind = d2.min(axis=1)
    for p in got:
        assert mind[p] == pytest.approx(mind.max(), rel=1e-5)
        mind = np.minimum(mind, ((x.astype(np.float64) - x[p]) ** 2).sum(axis=1))
    assert stats["reference_verified"] >= 40 and stats["reference_lowered"] >= 1
    assert stats["reference_evaluations"] == 3000 + 300 * stats["reference_verified"]
    # given the exact nearest rows nothing is lowered
    stats = {}
    again, _ = kcenter_greedy(x, 40, reference=ref, prune=prune, reference_nearest=exact_nearest, stats=stats)
    np.testing.assert_array_equal(again, want)
    assert stats["reference_lowered"] == 0 and stats["reference_verified"] == 40


@pytest.mark.parametrize("nearest, match", [
    (np.zeros(5, np.int64), r"reference_nearest must be \(50,\)"),
    (np.zeros(50), r"reference_nearest must be \(50,\) integer"),
    (np.full(50, 7), r"reference_nearest\[0\] = 7 is outside the reference's 7 rows"),
])
def test_kcenter_bad_reference_nearest(nearest, match) -> None:
    rng = np.random.default_rng(0)
    with pytest.raises(ValueError, match=match):
        kcenter_greedy(rng.normal(size=(50, 4)), 3, reference=rng.normal(size=(7, 4)), reference_nearest=nearest)
