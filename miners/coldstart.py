"""Cold-start selection on embeddings: TypiClust and ProbCover (pure NumPy + FAISS).

With few or no labels a model's uncertainty says little; both methods pick *typical,
covering* examples from the embedding space alone. Rows are Euclidean vectors (cosine
spaces: pass unit vectors, as the k-NN graph engine does).

TypiClust (Hacohen, Dekel & Weinshall 2022, "Active learning on a budget")
--------------------------------------------------------------------------
1. Cluster ``L ∪ U`` (labeled and pool rows) into ``K = min(|L| + b, max_clusters)``
   clusters with k-means (:func:`miners.clustering.kmeans`).
2. Clusters smaller than ``min_cluster`` (the authors' code: 5) are never picked from.
3. Each pick takes the cluster with the fewest covered rows (labeled rows plus the picks
   so far), ties to the larger cluster, then the smaller cluster id (so with no labels the
   largest clusters come first, one pick each, as in the paper's Algorithm 1), and picks its
   most **typical** pool row not picked yet:
   ``typicality(x) = (1/k' sum_{x_i in kNN(x)} ||x - x_i||)^(-1)``, the neighbours taken
   among the cluster's members (the authors' code), ``k' = min(k, |cluster| // 2)``
   (``k = 20``, the paper). Typicality is computed once per cluster, when it is first
   picked from; ties go to the smaller row index.

Cost: k-means (``O(N K d)`` to assign) plus, per cluster picked from, its exact k-NN graph
(``O(n_c^2 d)``, blocked; clusters above 20,000 rows use the k-NN graph engine).

ProbCover (Yehuda, Dekel, Hacohen & Weinshall 2022, "Active learning through a covering
lens")
-------------------------------------------------------------------------------------------
With the ball ``B_delta(x) = {x' : ||x - x'|| <= delta}`` (it contains ``x``), ``x``
*covers* the rows of its ball. The labeled rows cover their balls from the start; each pick
is the pool row whose ball holds the most rows not covered yet (ties: the smaller row
index), and its ball becomes covered — the greedy algorithm for max coverage on the
``delta``-ball graph (the paper's Algorithm 1). Once every row is covered (no ball holds an
uncovered row) the remaining picks are drawn uniformly at random from the pool rows left
(seeded), as the authors' code does.

``delta`` by the paper's purity rule: pseudo-labels from k-means with ``K`` = the number of
classes; a ball is *pure* when all its rows share the pseudo-label of its centre, i.e. when
``delta < r(x)``, ``r(x)`` the distance from ``x`` to the nearest row of another
pseudo-label. ``purity(delta) = #{x : r(x) > delta} / N`` (measured on a seeded sample of
``purity_sample`` balls; ``r`` itself is over all rows: exact up to
``PROBCOVER_EXACT_ROWS`` rows, above through the inverted lists of the ball graph, never
below the exact value, with its measured recall: see :func:`join_other_label_distance`) is
non-increasing; the
chosen ``delta`` is the largest with ``purity(delta) >= alpha`` (``alpha = 0.95``): with
``q = ceil(alpha |S|)`` and ``r`` sorted ascending, the supremum is ``rho = r_(|S| - q + 1)``
and ``delta`` is the largest float below it (``nextafter(rho, 0)``), or the largest value
of a given grid ``deltas`` below ``rho`` (the paper searches a grid).

Cost: up to ``PROBCOVER_EXACT_ROWS`` (50,000) rows the ball graph is an exact range search
(FAISS ``IndexFlatL2.range_search`` in blocks of queries, ``O(N^2 d)`` time, never ``N x N``
in memory: ``O(E)`` for its ``E`` edges, stored as CSR); the greedy touches each edge a
constant number of times plus an ``O(N)`` argmax per pick. ``r(x)`` costs ``O(|S| N d)``.

Large inputs: the approximate ball graph (:func:`join_ball_graph`)
------------------------------------------------------------------
At 1M x 384 the exact search is ~3 hours on 2 cores (its own ETA). Above
``PROBCOVER_EXACT_ROWS`` rows the balls come from joining the k-NN graph engine's inverted
lists (:func:`ball_lists`, a :class:`miners.knn.ListJoin`: its ``nlist`` rule, sampled
training, every row assigned to its nearest centroid; its nprobe ladder — from 1 list up,
as a ball lies mostly in its row's own list — and its recall sample size and target,
0.95): list by list, the list's rows against the rows of the ``nprobe`` lists whose
centroids are nearest its own (itself first), one float32 matrix product per list, with
``check()`` before each list and progress (rows, entries, ETA) about every second. Only
list numbers are stored: the rows stay where they are — the pool on its memory map above
``MEMMAP_ABOVE_BYTES``, ``[labeled; pool]`` stacked without a copy
(:class:`miners.clustering.StackedRows`) — and each list gathers its candidate rows when
it is searched. (This replaced a FAISS ``IndexIVFFlat.range_search``, whose index held a
float32 copy of every row, 15 GB at 10M x 384, so ProbCover could not run there. At 1M x
384 with the bench pool — ``bench/scale.py --n 1000000 --miners probcover`` — the whole run
took 181.5 s — a test process shared the 2 cores for about a minute of it — and the server
peaked at 2.61 GiB RSS, against 203.2 s and 6.17 GiB with IVF-Flat; same ``delta``, 17.39M
entries against 17.42M, recall 0.995 both.)

The threshold is not the crossover: on 384-d unit vectors around 1,000 centres (spread 0.3,
delta 0.3649, 2 shared cores) the exact graph took 3.6 s at 20,000 rows and 16.3 s at 50,000,
the IVF-Flat graph that preceded the join 0.9 s (recall 1.0) and 2.5 s (recall 0.959). Up to 50,000 rows the exact graph
costs seconds and is kept for its exactness; beyond, its ``O(N^2 d)`` is what hurts (200,000
rows: ~7 min by its own ETA). A pair is decided by the float32 product
``|q|^2 + |x|^2 - 2 q.x`` where that is farther from ``delta^2`` than twice its error bound
(:func:`_f32_error`), and by the float64 test of the exact graph where it is nearer, so
every listed entry is a true one and every true pair in the probed lists is listed: the
only error is a missed entry (a row in a list not probed). Hence ``nprobe`` is chosen
without searching: the sample's exact balls (:func:`exact_balls`, ``O(|S| N d)``, no index)
and the list numbers give the *recall of ball membership* (:func:`ball_recall`: listed
share of the exact balls' entries, own entries left out) at every rung, and the first rung
reaching the target is taken. The graph is then made symmetric (``j`` in ``B(i)`` iff ``i``
in ``B(j)``, as exact balls are and as the greedy's degree update assumes: a pair found
from either side is kept), and its recall is measured again on the same sample;
``BallGraph.info`` (method, ``nlist``, ``nprobe``, recall, sample size, timings, entries
added by the symmetrisation) lands in ``ProbCoverResult.stats["graph"]`` and the run's
stats. With ``nprobe`` = all lists the graph equals the exact one.

The purity rule's distances go through the same lists
(:func:`join_other_label_distance`): each queried row looks among the rows of its
``nprobe`` nearest lists; the pass goes list by list, each list gathered once for every
query probing it, so a memory-mapped pool is read about once rather than once per query.

Memory: the CSR holds 4 B per entry (int32 ids) + 8 B per row; while it is assembled the
lists' parts hold 8 B per entry more. 1M rows with balls of a few hundred rows (~3e8
entries) is ~1.2 GB; balls of thousands (~1e9+) are not affordable on a 24 GiB machine once
the symmetrisation runs (scipy's transpose and merge: ~24 B per entry at its peak, for
``E`` entries before it). ``max_edges`` (default ``min(2^31, available memory / 24 B)``, so
that the symmetrisation fits) is checked as each list's entries are added: a radius whose
balls would not fit fails with "use a smaller delta" instead of swapping. The lists cost
16 B per row (list numbers and their order), each list's gathered candidates
``nprobe x`` its rows (~18 MB at 10M rows, 8,192 lists, nprobe 8), a product block at most
64 MB.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from indexing.settings import (
    PROBCOVER_EXACT_ROWS,
    PROBCOVER_PURITY,
    PROBCOVER_PURITY_SAMPLE,
    TYPICLUST_K,
    TYPICLUST_MAX_CLUSTERS,
    TYPICLUST_MIN_CLUSTER,
    TYPICLUST_POINTS_PER_CLUSTER,
)
from miners.clustering import StackedRows, kmeans

__all__ = ["BallGraph", "ProbCoverResult", "TypiClustResult", "ball_graph", "ball_recall", "exact_balls",
           "ball_lists", "join_ball_graph", "join_other_label_distance", "other_label_distance",
           "probcover_select", "purity_delta", "typiclust_select"]

Progress = Callable[[float, str], None]
Check = Callable[[], None]
_EXACT_CLUSTER_ROWS = 20_000
_RANGE_BLOCK = 4096
_MAX_EDGES = 1 << 31
_PAIR_VALUES = 1 << 23  # float64 values per chunk of the exact pair test (64 MB)
#: bytes per entry at the peak of the approximate graph's symmetrisation: the int32 CSR and
#: its bool data (5 B), the transpose (5 B), the merged CSR before pruning (10 B), slack
_SYM_BYTES_PER_ENTRY = 24


def _noop_progress(fraction: float, message: str) -> None:
    pass


def _noop_check() -> None:
    pass


def _matrix(x: Any, name: str) -> np.ndarray:
    a = np.asarray(x) if not isinstance(x, np.memmap) else x
    if a.ndim != 2 or a.dtype.kind != "f":
        raise ValueError(f"{name} must be a 2-D float array (rows, d); got {a.dtype} {a.shape}")
    return a


def _stacked_rows(pool: np.ndarray, labeled: np.ndarray | None) -> tuple[np.ndarray | StackedRows, int]:
    """``[labeled; pool]`` (labeled rows first) without copying the pool — a memory-mapped
    10M-row pool stays on its map — and the number of labeled rows; float32."""
    x = _matrix(pool, "pool")
    x = x if x.dtype == np.float32 else x.astype(np.float32)
    if labeled is None or len(labeled) == 0:
        return x, 0
    lab = _matrix(labeled, "labeled")
    if lab.shape[1] != x.shape[1]:
        raise ValueError(f"labeled must have the pool's dimension {x.shape[1]}; got {lab.shape[1]}")
    return StackedRows([np.ascontiguousarray(lab, dtype=np.float32), x]), len(lab)


def _first_non_finite_row(x: np.ndarray | StackedRows, block: int = 65_536) -> int | None:
    """The first row holding NaN or an infinity, checked a block of rows at a time."""
    for s in range(0, len(x), block):
        ok = np.isfinite(x[s:s + block]).all(axis=1)
        if not ok.all():
            return s + int(np.argmin(ok))
    return None


def _check_size(size: Any, n: int) -> int:
    if isinstance(size, bool) or not isinstance(size, int | np.integer) or not 0 <= int(size) <= n:
        raise ValueError(f"size must be an integer in [0, {n}] (the pool rows); got {size!r}")
    return int(size)


# ----------------------------------------------------------------------------- TypiClust


@dataclass
class TypiClustResult:
    """``rows``: pool rows in pick order; ``typicality`` of each pick (within its cluster);
    ``cluster`` of each pick; ``n_clusters``; ``cluster_sizes`` (all rows, labeled ones
    included)."""

    rows: np.ndarray
    typicality: np.ndarray
    cluster: np.ndarray
    n_clusters: int
    cluster_sizes: np.ndarray
    stats: dict[str, Any] = field(default_factory=dict)


def cluster_typicality(x: np.ndarray, k: int, *, check: Check = _noop_check) -> np.ndarray:
    """Typicality of every row of ``x`` among the rows of ``x``:
    ``1 / mean distance to its k' = min(k, n // 2)`` nearest other rows (``+inf`` when they
    are all at distance 0; a lone row gets 0)."""
    from miners.density import typicality_scores

    n = len(x)
    kk = min(int(k), n // 2)
    if n < 2 or kk < 1:
        return np.zeros(n)
    if n <= _EXACT_CLUSTER_ROWS:
        from miners.density import exact_knn_graph

        _, dist = exact_knn_graph(np.ascontiguousarray(x, dtype=np.float32), kk)
    else:
        from miners.knn import knn_search

        dist = knn_search(np.ascontiguousarray(x, dtype=np.float32), kk, check=check).distances
    return typicality_scores(dist)


def typiclust_select(pool: np.ndarray, size: int, *, labeled: np.ndarray | None = None,
                     k: int = TYPICLUST_K, n_clusters: int | None = None,
                     min_cluster: int = TYPICLUST_MIN_CLUSTER, max_clusters: int = TYPICLUST_MAX_CLUSTERS,
                     seed: int = 0, labels: np.ndarray | None = None, progress: Progress | None = None,
                     check: Check | None = None) -> TypiClustResult:
    """TypiClust (module docstring): ``size`` typical pool rows from the largest uncovered
    clusters.

    Args:
        pool: ``(N, d)`` float vectors of the unlabeled pool.
        size: picks, ``0 <= size <= N``.
        labeled: ``(L, d)`` vectors of the labeled rows (cover their clusters), or None.
        k: neighbours of the typicality (``k' = min(k, |cluster| // 2)``).
        n_clusters: k-means clusters (default ``min(L + size, max_clusters, L + N)``).
        min_cluster: clusters with fewer rows are never picked from.
        max_clusters: cap of the default ``n_clusters``.
        seed: k-means seed.
        labels: ``(L + N,)`` precomputed cluster ids of ``[labeled; pool]`` (skips k-means).
        progress, check: hooks (k-means, then the picks).

    Returns:
        :class:`TypiClustResult`. Fewer than ``size`` rows only when every cluster of at
        least ``min_cluster`` rows has run out of pool rows (then the rest comes from the
        small clusters, most typical first).
    """
    progress = progress or _noop_progress
    check = check or _noop_check
    x, n_lab = _stacked_rows(pool, labeled)
    n_pool = len(x) - n_lab
    size = _check_size(size, n_pool)
    if isinstance(k, bool) or not isinstance(k, int | np.integer) or k < 1:
        raise ValueError(f"k must be an integer >= 1; got {k!r}")
    bad = _first_non_finite_row(x)
    if bad is not None:
        raise ValueError(f"row {bad} of [labeled; pool] has NaN or infinite values")
    t0 = time.perf_counter()
    if labels is not None:
        lab = np.asarray(labels)
        if lab.shape != (len(x),) or lab.dtype.kind not in "iu" or (len(lab) and lab.min() < 0):
            raise ValueError(f"labels must be non-negative integers of shape ({len(x)},) for [labeled; pool]")
        lab = lab.astype(np.int64)
        kk = int(lab.max()) + 1 if len(lab) else 0
    else:
        kk = n_clusters if n_clusters is not None else min(n_lab + size, max_clusters, len(x))
        if isinstance(kk, bool) or not isinstance(kk, int | np.integer) or not 1 <= kk <= max(1, len(x)):
            raise ValueError(f"n_clusters must be an integer in [1, {len(x)}]; got {n_clusters!r}")
        if size == 0:
            return TypiClustResult(np.empty(0, np.int64), np.empty(0), np.empty(0, np.int64), 0,
                                   np.empty(0, np.int64))
        # The clusters only partition the rows: 64 training rows a cluster define them well
        # enough (FAISS warns below 39) at a quarter of FAISS's default 256 (5,000 clusters
        # on 1M x 384 rows: the k-means was most of TypiClust's time).
        _, lab, _ = kmeans(x, int(kk), seed=seed, max_points_per_centroid=TYPICLUST_POINTS_PER_CLUSTER,
                           progress=lambda f, m: progress(0.8 * f, m), check=check)
        kk = int(kk)
    sizes = np.bincount(lab, minlength=kk)
    covered = np.bincount(lab[:n_lab], minlength=kk).astype(np.int64)
    members = np.argsort(lab, kind="stable")
    starts = np.r_[0, np.cumsum(sizes)]
    big = sizes >= min_cluster
    picks: list[int] = []
    typ_out: list[float] = []
    cl_out: list[int] = []
    order_cache: dict[int, tuple[np.ndarray, np.ndarray, int]] = {}
    for phase_big in (True, False):
        active = np.flatnonzero(big if phase_big else ~big)
        # clusters without pool rows are never chosen
        while len(picks) < size and len(active):
            check()
            # fewest covered, then larger, then smaller id
            sel = np.lexsort((active, -sizes[active], covered[active]))
            c = int(active[sel[0]])
            if c not in order_cache:
                rows = members[starts[c]:starts[c + 1]]
                typ = cluster_typicality(x[rows], k, check=check)
                pool_mask = rows >= n_lab
                cand = rows[pool_mask]
                ct = typ[pool_mask]
                o = np.lexsort((cand, -ct))
                order_cache[c] = (cand[o], ct[o], 0)
            cand, ct, pos = order_cache[c]
            if pos >= len(cand):
                active = active[active != c]
                continue
            picks.append(int(cand[pos]) - n_lab)
            typ_out.append(float(ct[pos]))
            cl_out.append(c)
            order_cache[c] = (cand, ct, pos + 1)
            covered[c] += 1
            if pos + 1 >= len(cand):
                active = active[active != c]
            progress(0.8 + 0.2 * len(picks) / max(1, size), f"TypiClust: {len(picks):,} of {size:,} picks")
    return TypiClustResult(np.asarray(picks, dtype=np.int64), np.asarray(typ_out), np.asarray(cl_out, np.int64),
                           int(kk), sizes.astype(np.int64),
                           {"seconds": time.perf_counter() - t0, "clusters_picked_from": len(order_cache)})


# ----------------------------------------------------------------------------- ProbCover


@dataclass
class BallGraph:
    """The ``delta``-ball graph in CSR form: row ``i``'s ball is
    ``indices[indptr[i]:indptr[i + 1]]`` (itself included, ascending). ``info``: how it
    was built and how good it is (:meth:`miners.knn.GraphInfo.to_dict`: ``method``, the
    ball-membership ``recall`` on ``recall_sample`` rows, ``nlist``/``nprobe``, timings;
    ``radius`` = ``delta``, ``k`` = 0), plus ``reverse_added`` for the approximate graph."""

    indptr: np.ndarray  # (N + 1,) int64
    indices: np.ndarray  # (E,) int32 or int64
    delta: float
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def n_edges(self) -> int:
        return int(self.indptr[-1])


Rows = np.ndarray | StackedRows  # float32 rows: an array, a memory map or the stacked [labeled; pool]


def _f32_rows(x: Any) -> Rows:
    """``x`` as float32 rows read a block at a time: a float32 array or memory map as it is
    (no copy), :class:`StackedRows` as it is, anything else converted."""
    if isinstance(x, StackedRows) or (isinstance(x, np.ndarray) and x.dtype == np.float32):
        return x
    return np.ascontiguousarray(x, dtype=np.float32)


def _sq_norms(x: Rows, block: int = 65_536) -> np.ndarray:
    """``|x_i|^2`` in float32, a block of rows at a time."""
    out = np.empty(len(x), dtype=np.float32)
    for s in range(0, len(x), block):
        b = np.asarray(x[s:s + block], dtype=np.float32)
        out[s:s + len(b)] = np.einsum("ij,ij->i", b, b)
    return out


def _pair_sq(a: np.ndarray, ai: np.ndarray, b: Rows, bi: np.ndarray) -> np.ndarray:
    """``||a_ai - b_bi||^2`` per pair in float64, a bounded number of pairs at a time (all of
    a block's pairs at once took ~20 GB for balls of thousands of 384-d rows)."""
    out = np.empty(len(ai), dtype=np.float64)
    step = max(1024, _PAIR_VALUES // max(1, a.shape[1]))
    for p0 in range(0, len(ai), step):
        p1 = min(len(ai), p0 + step)
        diff = a[ai[p0:p1]].astype(np.float64) - b[bi[p0:p1]]
        out[p0:p1] = np.einsum("ij,ij->i", diff, diff)
    return out


def _pair_test(xa: Rows, rows: np.ndarray, idx: np.ndarray, r2: float) -> np.ndarray:
    """``||x_rows - x_idx||^2 <= r2`` in float64 (:func:`_pair_sq`)."""
    return _pair_sq(xa, rows, xa, idx) <= r2


def _search_radius(xa: Rows, delta: float, err: float | None = None) -> float:
    """The squared radius handed to a search that computes ``|q|^2 + |x|^2 - 2 q.x`` in
    float32 (FAISS's flat index, :func:`exact_balls`): ``delta^2`` widened by that form's
    absolute error bound (``err``: :func:`_f32_error` of ``xa``) so that no pair within
    ``delta`` is missed; :func:`_pair_test` then decides."""
    return float(delta) ** 2 + 2.0 * (_f32_error(xa) if err is None else err) + 1e-12


class _BallParts:
    """Whole balls collected part by part (a part: the entries of some rows' balls, sorted
    by row then entry), assembled into CSR at the end; ValueError past ``max_edges``."""

    def __init__(self, n: int, delta: float, max_edges: int) -> None:
        self.n, self.delta, self.max_edges = n, float(delta), max_edges
        self.counts = np.zeros(n, dtype=np.int64)
        self.parts: list[tuple[np.ndarray, np.ndarray]] = []
        self.total = 0
        self.dtype = np.int32 if n < 2**31 else np.int64

    def room(self, entries: int, rows_done: int) -> None:
        """Raise before ``entries`` more would pass ``max_edges``."""
        if self.total + entries > self.max_edges:
            raise ValueError(f"the {self.delta:g}-balls hold more than {self.max_edges:,} entries after "
                             f"{rows_done:,} of {self.n:,} rows; use a smaller delta")

    def add(self, rows: np.ndarray, idx: np.ndarray, rows_done: int) -> None:
        self.room(len(idx), rows_done)
        self.total += len(idx)
        present, sizes = np.unique(rows, return_counts=True)  # rows are sorted
        self.counts[present] = sizes
        self.parts.append((rows.astype(self.dtype), idx.astype(self.dtype)))

    def graph(self) -> BallGraph:
        indptr = np.zeros(self.n + 1, dtype=np.int64)
        np.cumsum(self.counts, out=indptr[1:])
        # each row's ball lies in one part, sorted: place it at the row's CSR offset
        indices = np.empty(self.total, dtype=self.dtype)
        for rows, idx in self.parts:
            first = np.r_[0, np.flatnonzero(np.diff(rows)) + 1]  # where each row's run starts
            run = np.repeat(first, np.diff(np.r_[first, len(rows)]))
            indices[indptr[rows] + (np.arange(len(rows)) - run)] = idx
        self.parts = []
        return BallGraph(indptr, indices, self.delta)


def _range_blocks(xa: np.ndarray, search: Callable[[np.ndarray, float], tuple], delta: float, *,
                  block: int, max_edges: int, what: str, progress: Progress, check: Check) -> BallGraph:
    """Every row's ball from ``search(queries, squared radius) -> (lims, D, I)`` (a FAISS
    ``range_search``) over blocks of consecutive rows, within :func:`_search_radius`,
    candidates re-tested exactly in float64, each ball sorted, the CSR assembled at the end;
    ``check()`` before each block, ``progress`` after it (rows, entries, ETA); ValueError
    past ``max_edges`` entries."""
    n = len(xa)
    r2 = float(delta) ** 2
    radius = _search_radius(xa, delta)
    balls = _BallParts(n, delta, max_edges)
    t0 = time.perf_counter()
    for s in range(0, n, block):
        check()
        e = min(n, s + block)
        qrows = np.arange(s, e)
        lims, _, idx = search(xa[qrows], radius)
        balls.room(int(lims[-1]), e)  # before the block's pairs are copied and sorted
        idx = idx.astype(np.int64)
        rows = np.repeat(qrows, np.diff(lims).astype(np.int64))
        keep = _pair_test(xa, rows, idx, r2)
        rows, idx = rows[keep], idx[keep]
        o = np.lexsort((idx, rows))  # per query, its ball by row index
        balls.add(rows[o], idx[o], e)
        el = time.perf_counter() - t0
        progress(e / max(1, n), f"{what} (delta {delta:.4g}): {e:,} of {n:,} rows, {balls.total:,} entries"
                 f"{'' if e == n else f', ETA {el * (n - e) / e:.0f} s'}")
    return balls.graph()


def ball_graph(x: np.ndarray, delta: float, *, block: int = _RANGE_BLOCK, max_edges: int = _MAX_EDGES,
               progress: Progress | None = None, check: Check | None = None) -> BallGraph:
    """Exact ``delta``-balls of every row of ``x`` among the rows of ``x``
    (``||x_i - x_j|| <= delta``, FAISS flat range search on squared distances, queries in
    blocks). Raises ValueError when the balls hold more than ``max_edges`` entries (a
    smaller ``delta`` is needed). The reference for :func:`join_ball_graph`."""
    import faiss

    from miners.knn import GraphInfo

    xa = np.ascontiguousarray(x, dtype=np.float32)
    index = faiss.IndexFlatL2(xa.shape[1])
    index.add(xa)
    t0 = time.perf_counter()
    g = _range_blocks(xa, index.range_search, delta, block=block, max_edges=max_edges, what="ball graph",
                      progress=progress or _noop_progress, check=check or _noop_check)
    g.info = GraphInfo(method="exact", k=0, rows=len(xa), queries=len(xa), recall=1.0, recall_sample=0,
                       target_recall=1.0, search_s=time.perf_counter() - t0, radius=float(delta)).to_dict()
    return g


def exact_balls(x: Any, rows: np.ndarray, delta: float, *, chunk: int = 65_536, err: float | None = None,
                check: Check | None = None) -> list[np.ndarray]:
    """The exact ``delta``-balls (ascending row ids) of the queried ``rows`` among all rows of
    ``x``, without an index: float32 ``|q|^2 + |x|^2 - 2 q.x`` over chunks of ``chunk`` rows
    within the widened radius (``err``: :func:`_f32_error` of ``x`` when known), then the
    float64 pair test — the same decision as :func:`ball_graph`. ``O(|rows| N d)`` time,
    ``O(|rows| chunk)`` memory; ``x`` is read a chunk at a time (a memory map stays one).
    The recall sample of :func:`join_ball_graph`."""
    check = check or _noop_check
    xa = _f32_rows(x)
    rows = np.asarray(rows, dtype=np.int64)
    r2, radius = float(delta) ** 2, np.float32(_search_radius(xa, delta, err))
    q = np.asarray(xa[rows], dtype=np.float32)
    qq = np.einsum("ij,ij->i", q, q)
    found: list[list[np.ndarray]] = [[] for _ in rows]
    for c0 in range(0, len(xa), chunk):
        check()
        xc = np.asarray(xa[c0:c0 + chunk], dtype=np.float32)
        d2 = qq[:, None] + np.einsum("ij,ij->i", xc, xc)[None] - np.float32(2.0) * (q @ xc.T)
        qi, ci = np.nonzero(d2 <= radius)
        keep = _pair_sq(q, qi, xc, ci) <= r2
        qi, ci = qi[keep], ci[keep] + c0
        for j, part in zip(*_split_by(qi, ci), strict=True):
            found[j].append(part)
    return [np.concatenate(f) if f else np.empty(0, np.int64) for f in found]


def _split_by(keys: np.ndarray, values: np.ndarray) -> tuple[list[int], list[np.ndarray]]:
    """``values`` grouped by ``keys`` (keys ascending, values kept in order)."""
    if not len(keys):
        return [], []
    cut = np.flatnonzero(np.diff(keys)) + 1
    return [int(k) for k in keys[np.r_[0, cut]]], np.split(values, cut)


def ball_recall(g: BallGraph, rows: np.ndarray, exact: Sequence[np.ndarray], *,
                at: np.ndarray | None = None) -> float:
    """Recall of ball membership on sample ``rows``: the share of the exact balls' entries,
    each row's own entry left out, that ``g`` lists (``sum |g_i & B_i - {i}| / sum |B_i -
    {i}|``; 1.0 when every sampled ball holds only its row). The exact pair test of both
    graphs makes every listed entry a true one, so this is the whole error. ``at``: the CSR
    row of ``g`` holding each sampled row's ball (default: the row itself)."""
    rows = np.asarray(rows, dtype=np.int64)
    at = rows if at is None else np.asarray(at, dtype=np.int64)
    hit = want = 0
    for i, a, b in zip(rows.tolist(), at.tolist(), exact, strict=True):
        b = b[b != i]
        got = g.indices[g.indptr[a]:g.indptr[a + 1]]
        hit += int(np.count_nonzero(np.isin(b, got, assume_unique=True)))
        want += len(b)
    return hit / want if want else 1.0


def _symmetrised(g: BallGraph) -> tuple[BallGraph, int]:
    """``g`` with every missing reverse entry added (``j`` in ``B(i)`` iff ``i`` in ``B(j)``,
    as exact balls are): the greedy's degree update relies on it, and the union can only
    raise the recall. scipy's CSR transpose and merge, O(E); returns the entries added."""
    import scipy.sparse as sp

    n = len(g.indptr) - 1
    a = sp.csr_matrix((np.ones(g.n_edges, dtype=bool), g.indices, g.indptr), shape=(n, n))
    s = (a + a.T).tocsr()
    del a
    s.sort_indices()
    added = int(s.nnz) - g.n_edges
    dtype = np.int32 if n < 2**31 else np.int64
    return BallGraph(s.indptr.astype(np.int64), s.indices.astype(dtype, copy=False), g.delta, g.info), added


def ball_lists(x: Any, *, seed: int = 0, progress: Progress | None = None, check: Check | None = None) -> Any:
    """The k-NN engine's inverted lists of the rows of ``x`` (:class:`miners.knn.ListJoin`:
    its ``nlist`` rule, sampled training, every row assigned to its nearest centroid), for
    the purity rule's distances and the ball graph alike. Only list numbers are stored
    (80 MB at 10M rows): the rows stay where they are (a memory map, the stacked
    ``[labeled; pool]``) and each list's rows are gathered when it is searched."""
    from miners import knn

    xa = _f32_rows(x)
    p = knn._ivf_plan(len(xa), xa.shape[1], "ivf-flat")
    return knn.ListJoin(xa, p.nlist, train_rows=p.train_rows, seed=seed, progress=progress or _noop_progress,
                        check=check or _noop_check)


def _nearest_other(q: np.ndarray, ql: np.ndarray, qq: np.ndarray, xc: np.ndarray, cl: np.ndarray,
                   cc: np.ndarray, tol: np.float32) -> np.ndarray:
    """``min_j ||q_i - xc_j||`` over the candidates of another label (``cl_j != ql_i``),
    exact: the float32 ``|q|^2 + |x|^2 - 2 q.x`` keeps, per query, every other-label
    candidate within ``tol`` (twice the form's error bound) of its minimum — the true
    nearest is among them — and their distances are recomputed in float64. ``+inf`` where no
    candidate has another label."""
    d2 = qq[:, None] + cc[None, :] - np.float32(2.0) * (q @ xc.T)
    d2[ql[:, None] == cl[None, :]] = np.inf
    lo = d2.min(axis=1)
    # a chunk holding only the query's label has lo = inf: inf <= inf would make every
    # same-label row a candidate (a wrong, too small r and a huge candidate list)
    qi, ci = np.nonzero((d2 <= (lo + tol)[:, None]) & np.isfinite(d2))
    best = np.full(len(q), np.inf)
    if len(qi):
        np.minimum.at(best, qi, np.sqrt(_pair_sq(q, qi, xc, ci)))
    return best


def _f32_error(x: Rows) -> float:
    """A bound on the absolute error of a float32 ``|q|^2 + |x|^2 - 2 q.x`` between rows
    of ``x``: ``(d + 4) 2^-23 * 4 max|x|^2`` (each term is at most ``max|x|^2``; a dot
    product of ``d`` terms errs by at most ``d u`` of its magnitude, plus the three sums)."""
    if not len(x):
        return 0.0
    top = 0.0
    for s in range(0, len(x), 65_536):
        blk = np.asarray(x[s:s + 65_536], dtype=np.float64)
        top = max(top, float(np.einsum("ij,ij->i", blk, blk).max()))
    return (x.shape[1] + 4) * 2.0**-23 * 4.0 * top


def other_label_distance(x: Any, labels: np.ndarray, rows: np.ndarray | None = None, *,
                         block: int = 1024, chunk: int = 65_536, err: float | None = None,
                         progress: Progress | None = None, check: Check | None = None) -> np.ndarray:
    """``r(x_i) = min_{j : labels_j != labels_i} ||x_i - x_j||`` for the queried ``rows``
    (default all), exact: over blocks of queries and chunks of rows, each chunk's
    other-label minimum by :func:`_nearest_other` (float32 candidates within twice the
    error bound of the minimum, recomputed in float64); the smallest over the chunks.
    ``+inf`` when every row shares the label. ``O(|rows| N d)`` time, ``O(block * chunk)``
    memory; ``x`` is read a chunk at a time (``err``: :func:`_f32_error` of ``x`` when known)."""
    progress = progress or _noop_progress
    check = check or _noop_check
    xa = _f32_rows(x)
    lab = np.asarray(labels, dtype=np.int64)
    if lab.shape != (len(xa),):
        raise ValueError(f"labels must have one entry per row ({len(xa)}); got {lab.shape}")
    q_rows = np.arange(len(xa)) if rows is None else np.asarray(rows, dtype=np.int64)
    n = len(xa)
    out = np.full(len(q_rows), np.inf)
    tol = np.float32(2.0 * (_f32_error(xa) if err is None else err))
    t0 = time.perf_counter()
    for s in range(0, len(q_rows), block):
        qr = q_rows[s:s + block]
        q = np.asarray(xa[qr], dtype=np.float32)
        qq, ql = np.einsum("ij,ij->i", q, q), lab[qr]
        best = np.full(len(qr), np.inf)
        for c0 in range(0, n, chunk):
            check()
            xc = np.asarray(xa[c0:c0 + chunk], dtype=np.float32)
            best = np.minimum(best, _nearest_other(q, ql, qq, xc, lab[c0:c0 + chunk],
                                                   np.einsum("ij,ij->i", xc, xc), tol))
        out[s:s + len(qr)] = best
        done = s + len(qr)
        el = time.perf_counter() - t0
        progress(done / max(1, len(q_rows)), f"distance to the nearest other pseudo-label: {done:,} of "
                 f"{len(q_rows):,} rows{'' if done == len(q_rows) else f', ETA {el * (len(q_rows) - done) / done:.0f} s'}")
    return out


def join_other_label_distance(lists: Any, x: Any, labels: np.ndarray, rows: np.ndarray, *,
                              nprobe: int | None = None, target_recall: float | None = None,
                              recall_sample: int | None = None, seed: int = 0, err: float | None = None,
                              progress: Progress | None = None, check: Check | None = None
                              ) -> tuple[np.ndarray, dict[str, Any]]:
    """Approximate ``r(x_i)`` (:func:`other_label_distance`) of the queried ``rows`` through
    the inverted ``lists`` of ``x`` (:func:`ball_lists`): each queried row looks among the
    rows of the ``nprobe`` lists nearest its own list (the list itself first). The work
    goes list by list — each list's rows are gathered once and every query probing it is
    measured against them (:func:`_nearest_other`: exact among those rows) — so a
    memory-mapped ``x`` is read about once per pass, not once per query. Every value is a
    true distance to an other-label row, so the approximation never falls below ``r``; it
    errs only upward, when the nearest other-label row lies in a list not probed (``+inf``
    when no probed list holds one).

    ``nprobe`` None: the first rung of the k-NN engine's ladder (from 1 list) at which the
    share of a seeded sample of ``recall_sample`` queried rows whose ``r`` equals the exact
    one reaches ``target_recall`` (the engine's defaults); the rungs add lists to the
    sample's search, not repeat it. Returns ``r`` and the info dict (method, ``nprobe``,
    that recall, the sample size, timings), as the graphs record theirs. Cost:
    ``O(|rows| nprobe N / nlist d)`` instead of the exact ``O(|rows| N d)``, plus one read
    of the probed lists."""
    from miners import knn

    progress = progress or _noop_progress
    check = check or _noop_check
    xa = _f32_rows(x)
    lab = np.asarray(labels, dtype=np.int64)
    rows = np.asarray(rows, dtype=np.int64)
    n = len(xa)
    if lab.shape != (n,):
        raise ValueError(f"labels must have one entry per row ({n}); got {lab.shape}")
    if len(lists.assign) != n:
        raise ValueError(f"lists must be the inverted lists of the {n:,} rows of x")
    target = knn.TARGET_RECALL if target_recall is None else float(target_recall)
    err = _f32_error(xa) if err is None else err
    tol = np.float32(2.0 * err)

    def search(qrows: np.ndarray, p0: int, p1: int, best: np.ndarray, report: Progress | None = None) -> None:
        """Lower ``best`` (per queried row) by the rows of each one's lists ``p0 .. p1 - 1``."""
        lists.widen(p1)
        q = knn._rows(xa, qrows)
        qq, ql = np.einsum("ij,ij->i", q, q), lab[qrows]
        probed = lists.near[lists.assign[qrows], p0:p1]
        who = np.repeat(np.arange(len(qrows)), probed.shape[1])
        flat = probed.ravel()
        o = np.argsort(flat, kind="stable")
        keys, groups = _split_by(flat[o], who[o])
        t0, last = time.perf_counter(), -1.0  # the first list reports: a user sees the pass start
        for step, (c, w) in enumerate(zip(keys, groups, strict=True)):
            check()
            members = lists.members([c])
            xc = knn._rows(xa, members)
            best[w] = np.minimum(best[w], _nearest_other(q[w], ql[w], qq[w], xc, lab[members],
                                                         np.einsum("ij,ij->i", xc, xc), tol))
            el = time.perf_counter() - t0
            if report is not None and (el - last >= 0.5 or step + 1 == len(keys)):
                last = el
                report((step + 1) / len(keys), f"distance to the nearest other pseudo-label (IVF lists, nprobe "
                       f"{p1}): {step + 1:,} of {len(keys):,} lists searched for {len(qrows):,} rows"
                       f"{knn.eta_text(step + 1, len(keys), el)}")

    t0 = time.perf_counter()
    sample = knn._pick_sample(len(rows), knn.RECALL_SAMPLE if recall_sample is None else int(recall_sample), seed)
    progress(0.0, f"recall check: exact distance to the nearest other pseudo-label of {len(sample):,} sample rows")
    exact = other_label_distance(xa, lab, rows[sample], err=err, check=check)
    ladder = [min(int(nprobe), lists.nlist)] if nprobe is not None else knn._ladder(lists.nlist)
    recall, probe, found = 0.0, ladder[0], np.full(len(sample), np.inf)
    done = 0
    for probe in ladder:  # noqa: B007 -- the last one tried is kept
        search(rows[sample], done, probe, found)
        done = probe
        recall = float(np.mean(np.isclose(found, exact, rtol=1e-9, atol=0.0))) if len(sample) else 1.0
        progress(0.2, f"tuning nprobe: {probe} of {lists.nlist} lists finds the exact distance for "
                      f"{recall:.3f} of the sample (target {target:g})")
        if recall >= target:
            break
    recall_s = time.perf_counter() - t0
    t1 = time.perf_counter()
    r = np.full(len(rows), np.inf)
    search(rows, 0, probe, r, report=lambda f, m: progress(0.2 + 0.8 * f, m))
    info = {"method": f"ivf-list-join nlist={lists.nlist} nprobe={probe}", "nprobe": int(probe),
            "nlist": int(lists.nlist), "recall": recall, "recall_sample": int(len(sample)),
            "target_recall": target, "below_target": recall < target,
            "recall_s": recall_s, "search_s": time.perf_counter() - t1}
    return r, info


def _membership_ranks(lists: Any, rows: np.ndarray, exact: Sequence[np.ndarray], chunk: int = 4096) -> np.ndarray:
    """For every entry of the sample ``rows``' exact balls (own entry left out): the rank of
    the entry's list among the lists its row probes (``lists.near``; ``nlist`` where beyond
    them). The join at ``nprobe`` finds exactly the entries of rank below ``nprobe``."""
    own = np.concatenate([np.full(int(np.count_nonzero(b != i)), i, np.int64) for i, b in zip(rows, exact, strict=True)]
                         or [np.zeros(0, np.int64)])
    ent = np.concatenate([b[b != i] for i, b in zip(rows, exact, strict=True)] or [np.zeros(0, np.int64)])
    ranks = np.full(len(ent), lists.nlist, dtype=np.int64)
    for s in range(0, len(ent), chunk):
        near = lists.near[lists.assign[own[s:s + chunk]]]
        hit = near == lists.assign[ent[s:s + chunk]][:, None]
        ranks[s:s + chunk] = np.where(hit.any(axis=1), hit.argmax(axis=1), lists.nlist)
    return ranks


def join_ball_graph(x: Any, delta: float, *, nprobe: int | None = None, target_recall: float | None = None,
                    recall_sample: int | None = None, seed: int = 0, max_edges: int | None = None,
                    lists: Any = None, err: float | None = None, progress: Progress | None = None,
                    check: Check | None = None) -> BallGraph:
    """Approximate ``delta``-balls of every row of ``x`` by joining inverted lists (module
    docstring, "Large inputs"): the rows of each list against the rows of the ``nprobe``
    lists nearest it (itself first), one float32 matrix product per list, pairs decided
    exactly (the float64 test where the product is within its error bound of ``delta``),
    made symmetric, with the recall of ball membership measured on a seeded sample of rows
    against :func:`exact_balls`. ``nprobe`` (clamped to the lists; all lists: every ball
    exact) None: the smallest of the k-NN engine's ladder whose recall on that sample
    reaches ``target_recall`` (default the engine's) — computed from the sample's exact
    balls and the list numbers alone, since the join finds exactly the entries in the lists
    it probes. ``max_edges`` None: ``min(2^31, available memory / 24 B)`` (the
    symmetrisation's peak per entry). ``lists``: :func:`ball_lists` of ``x`` already built
    (ProbCover's purity rule built them), else built here. ``x`` is never copied whole:
    each list gathers its candidate rows (a memory map is read list by list). ``err``:
    :func:`_f32_error` of ``x`` when known (a pass over every row: 10M rows in float64)."""
    from miners import knn

    progress = progress or _noop_progress
    check = check or _noop_check
    target = knn.TARGET_RECALL if target_recall is None else float(target_recall)
    if not 0.0 < target <= 1.0:
        raise ValueError(f"target_recall must be in (0, 1]; got {target_recall!r}")
    xa = _f32_rows(x)
    n = len(xa)
    if max_edges is None:
        max_edges = int(min(_MAX_EDGES, knn._available_bytes() // _SYM_BYTES_PER_ENTRY))
    if nprobe is not None and (isinstance(nprobe, bool) or not isinstance(nprobe, int | np.integer)
                               or nprobe < 1):
        raise ValueError(f"nprobe must be an integer >= 1 (IVF lists probed per row); got {nprobe!r}")
    t0 = time.perf_counter()
    if lists is None:
        lists = ball_lists(xa, seed=seed, progress=knn._sub(progress, 0.0, 0.1), check=check)
    elif len(lists.assign) != n:
        raise ValueError(f"lists must be the inverted lists of the {n:,} rows of x")
    nlist = lists.nlist
    build_s = time.perf_counter() - t0
    # the exact balls of the recall sample, then the nprobe ladder on that sample
    t1 = time.perf_counter()
    err = _f32_error(xa) if err is None else err
    sample = knn._pick_sample(n, knn.RECALL_SAMPLE if recall_sample is None else int(recall_sample), seed)
    progress(0.1, f"recall check: exact {delta:.4g}-balls of {len(sample):,} sample rows")
    exact = exact_balls(xa, sample, delta, err=err, check=check)
    ladder = [min(int(nprobe), nlist)] if nprobe is not None else knn._ladder(nlist)
    lists.widen(ladder[-1])
    ranks = _membership_ranks(lists, sample, exact)
    recall, probe = 0.0, ladder[0]
    for probe in ladder:  # noqa: B007 — the last one tried is kept
        recall = float(np.mean(ranks < probe)) if len(ranks) else 1.0
        if recall >= target:
            break
    progress(0.15, f"tuning nprobe: {probe} of {nlist} lists finds {recall:.4f} of the ball entries "
                   f"(target {target:g})")
    recall_s = time.perf_counter() - t1
    # the graph, list by list
    t2 = time.perf_counter()
    r2 = float(delta) ** 2
    sure, band = np.float32(r2 - 2.0 * err), np.float32(r2 + 2.0 * err)
    balls = _BallParts(n, delta, max_edges)
    report = knn._sub(progress, 0.15, 0.95)
    method = f"ivf-list-join nlist={nlist} nprobe={probe}"
    done, last = 0, -1.0  # the first list reports: a user sees the pass start
    for c in range(nlist):
        size = int(lists.offsets[c + 1] - lists.offsets[c])
        if not size:
            continue
        check()
        cand = lists.members(lists.near[c, :probe])  # the list's own rows first
        xc = knn._rows(xa, cand)
        cc = np.einsum("ij,ij->i", xc, xc)
        step = max(1, (_PAIR_VALUES * 2) // len(cand))  # a product of at most 64 MB
        for q0 in range(0, size, step):
            q1 = min(size, q0 + step)
            d2 = cc[q0:q1, None] + cc[None, :] - np.float32(2.0) * (xc[q0:q1] @ xc.T)
            inside = d2 <= sure
            bi, bj = np.nonzero((d2 <= band) & ~inside)  # within float32 error of delta: decided in float64
            if len(bi):
                ok = _pair_sq(xc, bi + q0, xc, bj) <= r2
                inside[bi[ok], bj[ok]] = True
            del d2
            qi, ci = np.nonzero(inside)
            rows, idx = cand[qi + q0], cand[ci]
            o = np.lexsort((idx, rows))
            balls.add(rows[o], idx[o], done + q1)
        done += size
        el = time.perf_counter() - t2
        if el - last >= 1.0 or done == n:
            last = el
            report(done / max(1, n), f"ball graph ({method}, delta {delta:.4g}): {done:,} of {n:,} rows, "
                   f"{balls.total:,} entries{knn.eta_text(done, n, el)}")
    g = balls.graph()
    check()
    progress(0.95, f"ball graph: adding missing reverse entries to {g.n_edges:,}")
    g, added = _symmetrised(g)
    search_s = time.perf_counter() - t2
    final = ball_recall(g, sample, exact)
    info = knn.GraphInfo(method=method, k=0, rows=n, queries=n, recall=final, recall_sample=len(sample),
                         target_recall=target, nlist=nlist, nprobe=int(probe),
                         build_s=build_s, search_s=search_s, recall_s=recall_s, below_target=final < target,
                         radius=float(delta))
    g.info = {**info.to_dict(), "reverse_added": added}
    progress(1.0, f"ball graph: {g.n_edges:,} entries, recall of ball membership {final:.4f} on "
                  f"{len(sample):,} sample rows" + (f" (below the target {target:g})" if info.below_target else ""))
    return g


def purity_delta(r: np.ndarray, alpha: float = PROBCOVER_PURITY,
                 deltas: Sequence[float] | None = None) -> tuple[float, float]:
    """The largest ``delta`` with ``purity(delta) = #{r > delta} / len(r) >= alpha`` and its
    purity (module docstring). ``r``: each ball's distance to the nearest other-label row."""
    r = np.sort(np.asarray(r, dtype=np.float64))
    if not 0.0 < alpha <= 1.0:
        raise ValueError(f"alpha must be in (0, 1]; got {alpha!r}")
    if len(r) == 0:
        raise ValueError("purity needs at least one ball")
    q = math.ceil(alpha * len(r) - 1e-9)
    rho = float(r[len(r) - q])
    if deltas is None:
        if not np.isfinite(rho):
            raise ValueError("every ball is pure at any radius (a single pseudo-label): give delta")
        delta = float(np.nextafter(rho, 0.0)) if rho > 0 else 0.0
    else:
        grid = np.asarray(sorted(float(d) for d in deltas))
        below = grid[grid < rho]
        if not len(below):
            raise ValueError(f"no delta of the grid is below {rho:g}, where purity falls under {alpha:g}")
        delta = float(below[-1])
    purity = float(np.count_nonzero(r > delta)) / len(r)
    return delta, purity


@dataclass
class ProbCoverResult:
    """``rows``: pool rows in pick order; ``gain``: rows each pick newly covered (0 for the
    random fill); ``delta`` used and, when chosen by the purity rule, its ``purity``;
    ``covered``: fraction of ``[labeled; pool]`` rows covered after the picks;
    ``random_fill``: picks drawn at random once everything was covered; ``n_edges``."""

    rows: np.ndarray
    gain: np.ndarray
    delta: float
    purity: float | None
    covered: float
    random_fill: int
    n_edges: int
    stats: dict[str, Any] = field(default_factory=dict)


def probcover_select(pool: np.ndarray, size: int, *, labeled: np.ndarray | None = None,
                     delta: float | None = None, n_classes: int | None = None,
                     alpha: float = PROBCOVER_PURITY, deltas: Sequence[float] | None = None,
                     purity_sample: int = PROBCOVER_PURITY_SAMPLE, seed: int = 0,
                     graph: BallGraph | None = None, exact_rows: int = PROBCOVER_EXACT_ROWS,
                     nprobe: int | None = None, progress: Progress | None = None,
                     check: Check | None = None) -> ProbCoverResult:
    """ProbCover (module docstring).

    Args:
        pool: ``(N, d)`` float vectors of the unlabeled pool.
        size: picks, ``0 <= size <= N``.
        labeled: ``(L, d)`` labeled vectors (their balls are covered from the start).
        delta: the ball radius; None: chosen by the purity rule (needs ``n_classes``).
        n_classes: ``K`` of the k-means pseudo-labels of the purity rule.
        alpha: the share of pure balls the rule requires (0.95).
        deltas: optional grid of radii for the rule (the paper's search).
        purity_sample: balls whose purity is measured (a seeded sample of ``[labeled; pool]``).
        seed: k-means, the purity sample and the random fill.
        graph: a precomputed :class:`BallGraph` of ``[labeled; pool]`` (skips the search).
        exact_rows: up to this many ``[labeled; pool]`` rows the purity rule's distances
            and the ball graph are exact (:func:`other_label_distance`, :func:`ball_graph`);
            above, both come from one set of inverted lists (:func:`join_other_label_distance`,
            :func:`join_ball_graph`), each with its measured recall in ``stats``.
        nprobe: the approximate path's IVF lists probed per row, for the purity distances
            and the ball graph alike (None: each tuned on its sample).
        progress, check: hooks.

    Returns:
        :class:`ProbCoverResult`.
    """
    progress = progress or _noop_progress
    check = check or _noop_check
    x, n_lab = _stacked_rows(pool, labeled)
    n = len(x)
    n_pool = n - n_lab
    size = _check_size(size, n_pool)
    bad = _first_non_finite_row(x)
    if bad is not None:
        raise ValueError(f"row {bad} of [labeled; pool] has NaN or infinite values")
    t0 = time.perf_counter()
    purity = None
    stats: dict[str, Any] = {}
    exact, lists, err = n <= exact_rows or not n, None, None
    if exact:
        x = np.ascontiguousarray(x, dtype=np.float32)  # at most exact_rows rows
    elif graph is None:
        err = _f32_error(x)  # once, for the purity distances and the ball graph
    if graph is None:
        if delta is None:
            if n_classes is None or isinstance(n_classes, bool) or not isinstance(n_classes, int | np.integer) \
                    or n_classes < 2:
                raise ValueError("choosing delta by purity needs n_classes >= 2 (the number of classes); "
                                 "or give delta")
            _, pseudo, _ = kmeans(x, min(int(n_classes), n), seed=seed,
                                  progress=lambda f, m: progress(0.1 * f, m), check=check)
            rows = None
            if n > purity_sample:
                rows = np.sort(np.random.default_rng([seed, 41]).choice(n, purity_sample, replace=False))
            if exact:
                r = other_label_distance(x, pseudo, rows, progress=lambda f, m: progress(0.1 + 0.3 * f, m),
                                         check=check)
            else:  # one set of inverted lists serves these distances and the ball graph
                lists = ball_lists(x, seed=seed, progress=lambda f, m: progress(0.1 + 0.05 * f, m), check=check)
                r, stats["purity_distances"] = join_other_label_distance(
                    lists, x, pseudo, np.arange(n) if rows is None else rows, nprobe=nprobe, seed=seed, err=err,
                    progress=lambda f, m: progress(0.15 + 0.25 * f, m), check=check)
            delta, purity = purity_delta(r, alpha, deltas)
            stats["purity_sample"] = len(r)
        elif not (np.isfinite(delta) and delta >= 0):
            raise ValueError(f"delta must be a finite number >= 0; got {delta!r}")
        def sub(f: float, m: str) -> None:
            progress(0.4 + 0.4 * f, m)

        if exact:
            graph = ball_graph(x, float(delta), progress=sub, check=check)
        else:
            graph = join_ball_graph(x, float(delta), nprobe=nprobe, seed=seed, lists=lists, err=err,
                                    progress=sub, check=check)
            del lists
    elif len(graph.indptr) != n + 1:
        raise ValueError(f"graph has {len(graph.indptr) - 1} rows; [labeled; pool] has {n}")
    delta = graph.delta
    indptr, indices = graph.indptr, graph.indices
    uncovered = np.ones(n, dtype=bool)

    def cover(centres: np.ndarray) -> np.ndarray:
        """Mark the balls of ``centres`` covered; returns the rows newly covered."""
        if not len(centres):
            return np.empty(0, dtype=np.int64)
        segs = [indices[indptr[c]:indptr[c + 1]] for c in centres]
        members = np.unique(np.concatenate(segs)) if segs else np.empty(0, dtype=np.int64)
        new = members[uncovered[members]]
        uncovered[new] = False
        return new

    # degree = uncovered rows in each ball; balls are symmetric, so a row newly covered
    # lowers the degree of every centre in its own ball
    deg = np.zeros(n, dtype=np.int64)
    cover(np.arange(n_lab))
    unc_idx = uncovered[indices]
    sizes = np.diff(indptr)
    nonempty = sizes > 0
    sums = np.add.reduceat(unc_idx.astype(np.int64), indptr[:-1][nonempty]) if unc_idx.size else np.zeros(0)
    deg[nonempty] = sums
    deg[:n_lab] = -1  # labeled rows are never picked
    picks: list[int] = []
    gains: list[int] = []
    rng = np.random.default_rng([seed, 43])
    random_fill = 0
    while len(picks) < size:
        check()
        c = int(np.argmax(deg))
        if deg[c] <= 0:
            left = np.flatnonzero(deg[n_lab:] >= 0) + n_lab
            fill = rng.choice(left, size - len(picks), replace=False)
            picks.extend(int(v) for v in fill)
            gains.extend([0] * len(fill))
            random_fill = len(fill)
            break
        new = cover(np.array([c]))
        picks.append(c)
        gains.append(len(new))
        if len(new):
            segs = [indices[indptr[v]:indptr[v + 1]] for v in new]
            # picked and labeled rows hold negative degrees, which only decrease (the rows
            # touched, not a bincount of all N: 80 MB a pick at 10M rows)
            touched, times = np.unique(np.concatenate(segs), return_counts=True)
            deg[touched] -= times
        deg[c] = -1
        if len(picks) % 64 == 0:
            progress(0.8 + 0.2 * len(picks) / max(1, size), f"ProbCover: {len(picks):,} of {size:,} picks")
    stats["seconds"] = time.perf_counter() - t0
    if graph.info:
        stats["graph"] = graph.info
    return ProbCoverResult(np.asarray(picks, dtype=np.int64) - n_lab, np.asarray(gains, dtype=np.int64),
                           float(delta), purity, float(1.0 - uncovered.mean()) if n else 1.0, random_fill,
                           graph.n_edges, stats)
