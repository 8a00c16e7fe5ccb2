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
``PROBCOVER_EXACT_ROWS`` rows, above through the IVF index of the ball graph, never below
the exact value, with its measured recall: see :func:`ivf_other_label_distance`) is
non-increasing; the
chosen ``delta`` is the largest with ``purity(delta) >= alpha`` (``alpha = 0.95``): with
``q = ceil(alpha |S|)`` and ``r`` sorted ascending, the supremum is ``rho = r_(|S| - q + 1)``
and ``delta`` is the largest float below it (``nextafter(rho, 0)``), or the largest value
of a given grid ``deltas`` below ``rho`` (the paper searches a grid).

Cost: up to ``PROBCOVER_EXACT_ROWS`` (50,000) rows the ball graph is an exact range search
(FAISS ``IndexFlatL2.range_search`` in blocks of queries, ``O(N^2 d)`` time, never ``N x N``
in memory: ``O(E)`` for its ``E`` edges, stored as CSR); the greedy touches each edge a
constant number of times plus an ``O(N)`` argmax per pick. ``r(x)`` costs ``O(|S| N d)``.

Large inputs: the approximate ball graph (:func:`ivf_ball_graph`)
-----------------------------------------------------------------
At 1M x 384 the exact search is ~3 hours on 2 cores (its own ETA). Above
``PROBCOVER_EXACT_ROWS`` rows the balls come from a FAISS ``IndexIVFFlat.range_search``
built by the k-NN graph engine (:class:`miners.knn.IvfIndex`: its ``nlist`` rule, sampled
training, its nprobe ladder — from 1 list up, as a ball lies mostly in its row's own list —
and its recall sample size and target, 0.95), rows taken in the index's inverted-list order
(consecutive queries scan the same lists while they are in cache, as the engine's search
of a pool's own graph), in blocks of ~``BLOCK_SECONDS`` with ``check()`` before and an ETA
after each.

The threshold is not the crossover: on 384-d unit vectors around 1,000 centres (spread 0.3,
delta 0.3649, 2 shared cores) the exact graph took 3.6 s at 20,000 rows and 16.3 s at 50,000,
the IVF graph 0.9 s (recall 1.0) and 2.5 s (recall 0.959). Up to 50,000 rows the exact graph
costs seconds and is kept for its exactness; beyond, its ``O(N^2 d)`` is what hurts (200,000
rows: ~7 min by its own ETA). The search
radius is widened by the float32 error bound of the IVF-Flat scanner's distances (relative:
:func:`_ivf_search_radius`) and every candidate pair passes the same
float64 test as the exact graph, so every listed entry is a true one: the only error is a
missed entry (a row in a list not probed). ``nprobe`` is the first of the ladder whose
*recall of ball membership* (:func:`ball_recall`: listed share of the exact balls' entries,
own entries left out) on a seeded sample of ``RECALL_SAMPLE`` rows reaches the target; the
exact balls of the sample come from :func:`exact_balls` (``O(|S| N d)``, no index). The
graph is then made symmetric (``j`` in ``B(i)`` iff ``i`` in ``B(j)``, as exact balls are and
as the greedy's degree update assumes: a pair found from either side is kept), and its
recall is measured again on the same sample; ``BallGraph.info`` (method, ``nlist``,
``nprobe``, recall, sample size, timings, entries added by the symmetrisation) lands in
``ProbCoverResult.stats["graph"]`` and the run's stats. With ``nprobe`` = all lists the
graph equals the exact one. IVF-Flat, never SQ8 codes: a range test on clipped 8-bit codes
has no error bound to widen the radius by.

Memory: the CSR holds 4 B per entry (int32 ids) + 8 B per row. 1M rows with balls of a few
hundred rows (~3e8 entries) is ~1.2 GB; balls of thousands (~1e9+) are not affordable on a
24 GiB machine once the symmetrisation runs (scipy's transpose and merge: ~24 B per entry at
its peak, for ``E`` entries before it). ``max_edges`` (default ``min(2^31, available memory
/ 24 B)``, so that the symmetrisation fits) is checked before each block's pairs are copied:
a radius whose balls would not fit fails with "use a smaller delta" instead of swapping. The
IVF index holds a float32 copy of the rows (1.5 GB at 1M x 384), released before the
symmetrisation.
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
from miners.mapped import float32_array

__all__ = ["BallGraph", "ProbCoverResult", "TypiClustResult", "ball_graph", "ball_recall", "exact_balls",
           "ivf_ball_graph", "ivf_flat_index", "ivf_other_label_distance", "other_label_distance",
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


def _stack(pool: np.ndarray, labeled: np.ndarray | None) -> tuple[np.ndarray, int]:
    """``[labeled; pool]`` as one float32 array (labeled rows first) and the number of
    labeled rows; above ``MEMMAP_ABOVE_BYTES`` on a memory-mapped temporary file
    (:func:`miners.mapped.float32_array`: a 10M x 384 pool would be a 15 GB copy in RAM)."""
    x = _matrix(pool, "pool")
    if labeled is None or len(labeled) == 0:
        return np.ascontiguousarray(x, dtype=np.float32), 0
    lab = _matrix(labeled, "labeled")
    if lab.shape[1] != x.shape[1]:
        raise ValueError(f"labeled must have the pool's dimension {x.shape[1]}; got {lab.shape[1]}")
    shape = (len(lab) + len(x), x.shape[1])
    out = float32_array(shape, prefix="assay-stack-")
    out[:len(lab)] = lab
    for s in range(0, len(x), 65_536):
        out[len(lab) + s:len(lab) + s + 65_536] = x[s:s + 65_536]
    return out, len(lab)


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


def _pair_test(xa: np.ndarray, rows: np.ndarray, idx: np.ndarray, r2: float) -> np.ndarray:
    """``||x_rows - x_idx||^2 <= r2`` in float64, a bounded number of pairs at a time (all of
    a block's pairs at once took ~20 GB for balls of thousands of 384-d rows)."""
    keep = np.empty(len(idx), dtype=bool)
    step = max(1024, _PAIR_VALUES // max(1, xa.shape[1]))
    for p0 in range(0, len(idx), step):
        p1 = min(len(idx), p0 + step)
        diff = xa[rows[p0:p1]].astype(np.float64) - xa[idx[p0:p1]]
        keep[p0:p1] = np.einsum("ij,ij->i", diff, diff) <= r2
    return keep


def _search_radius(xa: np.ndarray, delta: float) -> float:
    """The squared radius handed to a search that computes ``|q|^2 + |x|^2 - 2 q.x`` in
    float32 (FAISS's flat index, :func:`exact_balls`): ``delta^2`` widened by that form's
    absolute error bound so that no pair within ``delta`` is missed; :func:`_pair_test`
    then decides."""
    return float(delta) ** 2 + 2.0 * _f32_error(xa) + 1e-12


def _ivf_search_radius(d: int, delta: float) -> float:
    """The squared radius handed to FAISS IVF-Flat, whose scanner sums the squared
    differences ``sum_i (q_i - x_i)^2`` in float32 (relative error at most ``(d + 2) 2^-24``:
    each term is exact to ``3 u``, a sum of positive terms errs by ``(d - 1) u`` of itself):
    ``delta^2 (1 + (d + 4) 2^-23)``, twice that bound. Measured on 100k x 384 and 50k x 64
    clustered rows: largest relative error 5.6e-7, the bound 4.6e-5 and 8.1e-6. The
    absolute bound of :func:`_search_radius` is far wider at small ``delta`` (unit vectors,
    ``delta`` 0.04: +24 % on ``delta^2``, 17x the candidates of the true balls in 384-d
    clusters) — every one of them re-tested in float64."""
    return float(delta) ** 2 * (1.0 + (d + 4) * 2.0 ** -23) + 1e-30


def _range_blocks(xa: np.ndarray, search: Callable[[np.ndarray, float], tuple], delta: float, *,
                  block: int, max_edges: int, what: str, progress: Progress, check: Check,
                  order: np.ndarray | None = None, radius: float | None = None) -> BallGraph:
    """Every row's ball from ``search(queries, squared radius) -> (lims, D, I)`` (a FAISS
    ``range_search``) over blocks of rows — consecutive, or consecutive in ``order`` (a
    permutation of the rows: an IVF index's list order, so that consecutive queries scan
    the same lists) — candidates re-tested exactly in float64, each ball sorted, the CSR
    assembled at the end; ``check()`` before each block, ``progress`` after it (rows,
    entries, ETA); ValueError past ``max_edges`` entries. ``radius``: the squared radius
    searched (default :func:`_search_radius`)."""
    n = len(xa)
    r2 = float(delta) ** 2
    radius = _search_radius(xa, delta) if radius is None else radius
    counts = np.zeros(n, dtype=np.int64)
    parts: list[tuple[np.ndarray, np.ndarray]] = []  # (query rows, ball entries), row-sorted
    total = 0
    dtype = np.int32 if n < 2**31 else np.int64
    t0 = time.perf_counter()

    def too_many(e: int) -> ValueError:
        return ValueError(f"the {delta:g}-balls hold more than {max_edges:,} entries after {e:,} of {n:,} "
                          "rows; use a smaller delta")

    for s in range(0, n, block):
        check()
        e = min(n, s + block)
        qrows = np.arange(s, e) if order is None else np.asarray(order[s:e], dtype=np.int64)
        lims, _, idx = search(xa[qrows], radius)
        if total + int(lims[-1]) > max_edges:  # before the block's pairs are copied and sorted
            raise too_many(e)
        idx = idx.astype(np.int64)
        rows = np.repeat(qrows, np.diff(lims).astype(np.int64))
        keep = _pair_test(xa, rows, idx, r2)
        rows, idx = rows[keep], idx[keep]
        # per query, sort its ball by row index
        o = np.lexsort((idx, rows))
        rows, idx = rows[o], idx[o]
        total += len(idx)
        if total > max_edges:
            raise too_many(e)
        present, sizes = np.unique(rows, return_counts=True)  # rows are sorted
        counts[present] = sizes
        parts.append((rows.astype(dtype), idx.astype(dtype)))
        el = time.perf_counter() - t0
        progress(e / max(1, n), f"{what} (delta {delta:.4g}): {e:,} of {n:,} rows, {total:,} entries"
                 f"{'' if e == n else f', ETA {el * (n - e) / e:.0f} s'}")
    indptr = np.zeros(n + 1, dtype=np.int64)
    np.cumsum(counts, out=indptr[1:])
    # each row's ball lies in one block, sorted: place it at the row's CSR offset
    indices = np.empty(total, dtype=dtype)
    for rows, idx in parts:
        first = np.r_[0, np.flatnonzero(np.diff(rows)) + 1]  # where each row's run starts
        run = np.repeat(first, np.diff(np.r_[first, len(rows)]))
        indices[indptr[rows] + (np.arange(len(rows)) - run)] = idx
    return BallGraph(indptr, indices, float(delta))


def ball_graph(x: np.ndarray, delta: float, *, block: int = _RANGE_BLOCK, max_edges: int = _MAX_EDGES,
               progress: Progress | None = None, check: Check | None = None) -> BallGraph:
    """Exact ``delta``-balls of every row of ``x`` among the rows of ``x``
    (``||x_i - x_j|| <= delta``, FAISS flat range search on squared distances, queries in
    blocks). Raises ValueError when the balls hold more than ``max_edges`` entries (a
    smaller ``delta`` is needed). The reference for :func:`ivf_ball_graph`."""
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


def exact_balls(x: np.ndarray, rows: np.ndarray, delta: float, *, chunk: int = 65_536,
                check: Check | None = None) -> list[np.ndarray]:
    """The exact ``delta``-balls (ascending row ids) of the queried ``rows`` among all rows of
    ``x``, without an index: float32 ``|q|^2 + |x|^2 - 2 q.x`` over chunks of ``chunk`` rows
    within the widened radius, then the float64 pair test — the same decision as
    :func:`ball_graph`. ``O(|rows| N d)`` time, ``O(|rows| chunk)`` memory (the recall sample
    of :func:`ivf_ball_graph`)."""
    check = check or _noop_check
    xa = np.ascontiguousarray(x, dtype=np.float32)
    rows = np.asarray(rows, dtype=np.int64)
    r2, radius = float(delta) ** 2, np.float32(_search_radius(xa, delta))
    q = xa[rows]
    qq = np.einsum("ij,ij->i", q, q)
    found: list[list[np.ndarray]] = [[] for _ in rows]
    for c0 in range(0, len(xa), chunk):
        check()
        xc = xa[c0:c0 + chunk]
        d2 = qq[:, None] + np.einsum("ij,ij->i", xc, xc)[None] - np.float32(2.0) * (q @ xc.T)
        qi, ci = np.nonzero(d2 <= radius)
        ci = ci + c0
        keep = _pair_test(xa, rows[qi], ci, r2)
        qi, ci = qi[keep], ci[keep]
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


def _list_ordered_search(index: Any) -> Callable[[np.ndarray, float], tuple]:
    """``range_search(q, radius) -> (lims, None, I)`` on a :class:`miners.knn.IvfIndex` at its
    ``nprobe``, the queries run in the order of their nearest list (consecutive queries scan
    the same lists while they are in cache, as the k-NN engine does; 200k x 384, 20k
    queries: 1.3-1.9x faster at nprobe 2-8), results handed back in query order."""

    def search(q: np.ndarray, radius: float) -> tuple[np.ndarray, None, np.ndarray]:
        ivf = index.index
        ivf.nprobe = index.nprobe
        dq, iq = index.quantizer.search(q, index.nprobe)
        order = np.argsort(iq[:, 0], kind="stable")
        lims, _, idx = ivf.range_search_preassigned(np.ascontiguousarray(q[order]), radius, iq[order], dq[order])
        lims = lims.astype(np.int64)
        back = np.empty_like(order)
        back[order] = np.arange(len(order))
        counts = np.diff(lims)[back]
        out = np.zeros(len(q) + 1, dtype=np.int64)
        np.cumsum(counts, out=out[1:])
        # entry t of query j sits at lims[back[j]] + (t - out[j]) in the ordered result
        at = np.repeat(lims[:-1][back] - out[:-1], counts) + np.arange(int(out[-1]))
        return out, None, idx[at]

    return search


def ivf_flat_index(xa: np.ndarray, *, seed: int = 0, progress: Progress | None = None,
                   check: Check | None = None) -> Any:
    """The k-NN engine's IVF-Flat index of ``xa`` (:class:`miners.knn.IvfIndex`, its ``nlist``
    rule and sampled training), for the purity rule's distances and the ball graph alike.
    IVF-Flat always: range search on SQ8 codes has no error bound (codes are clipped to the
    trained ranges), so a widened radius could still miss pairs silently."""
    from miners import knn

    if xa.nbytes > knn._available_bytes():
        raise MemoryError(f"an IVF-Flat index of {len(xa):,} x {xa.shape[1]} rows holds a float32 copy of them "
                          f"({xa.nbytes / 2**30:.1f} GiB), more than the memory available now "
                          f"({knn._available_bytes() / 2**30:.1f} GiB): mine a smaller pool (a where filter)")
    p = knn._ivf_plan(len(xa), xa.shape[1], "ivf-flat")
    return knn.IvfIndex(xa, p.nlist, "flat", train_rows=p.train_rows, seed=seed,
                        progress=progress or _noop_progress, check=check or _noop_check)


def ivf_other_label_distance(index: Any, x: np.ndarray, labels: np.ndarray, rows: np.ndarray, *,
                             nprobe: int | None = None, k: int = 4, target_recall: float | None = None,
                             recall_sample: int | None = None, seed: int = 0, block: int = 4096,
                             progress: Progress | None = None, check: Check | None = None
                             ) -> tuple[np.ndarray, dict[str, Any]]:
    """Approximate ``r(x_i)`` (:func:`other_label_distance`) of the queried ``rows`` through
    the IVF-Flat ``index`` of ``x``: the rows of each label ``c`` are searched among the rows
    of the other labels only (a FAISS ``IDSelectorBitmap`` in the search parameters), ``k``
    nearest at ``nprobe`` lists, their distances recomputed in float64 and the smallest kept.
    Every value is a true distance to an other-label row, so the approximation never falls
    below ``r``; it errs only upward, when the nearest other-label row lies in a list not
    probed (``+inf`` when no probed list holds one).

    ``nprobe`` None: the first rung of the k-NN engine's ladder (from 1 list) at which the
    share of a seeded sample of ``recall_sample`` queried rows whose ``r`` equals the exact
    one reaches ``target_recall`` (the engine's defaults). Returns ``r`` and the info dict
    (method, ``nprobe``, that recall, the sample size, timings), as the graphs record theirs.
    Cost: ``O(|rows| nprobe N / nlist d)`` instead of the exact ``O(|rows| N d)``."""
    from miners import knn

    faiss = knn._faiss()
    progress = progress or _noop_progress
    check = check or _noop_check
    xa = np.ascontiguousarray(x, dtype=np.float32)
    lab = np.asarray(labels, dtype=np.int64)
    rows = np.asarray(rows, dtype=np.int64)
    n = len(xa)
    if lab.shape != (n,):
        raise ValueError(f"labels must have one entry per row ({n}); got {lab.shape}")
    if index.codes != "flat" or index.index.ntotal != n:
        raise ValueError(f"index must be an IVF-Flat index of the {n:,} rows of x")
    target = knn.TARGET_RECALL if target_recall is None else float(target_recall)
    selectors = {}  # label -> (bitmap kept alive, selector)

    def search(qrows: np.ndarray, probe: int, report: Progress | None = None) -> np.ndarray:
        out = np.full(len(qrows), np.inf)
        qlab = lab[qrows]
        done, t0 = 0, time.perf_counter()
        for c in np.unique(qlab):
            if c not in selectors:
                bits = np.packbits(lab != c, bitorder="little")
                selectors[c] = (bits, faiss.IDSelectorBitmap(n, faiss.swig_ptr(bits)))
            params = faiss.SearchParametersIVF()
            params.nprobe = int(probe)
            params.sel = selectors[c][1]
            where = np.flatnonzero(qlab == c)
            for s in range(0, len(where), block):
                check()
                part = where[s:s + block]
                q = xa[qrows[part]]
                _, nn = index.index.search(q, k, params=params)
                valid = nn >= 0
                diff = q[:, None, :].astype(np.float64) - xa[np.where(valid, nn, 0)]
                d = np.sqrt(np.einsum("ijk,ijk->ij", diff, diff))
                d[~valid] = np.inf
                out[part] = d.min(axis=1)
                done += len(part)
                if report is not None:
                    el = time.perf_counter() - t0
                    report(done / len(qrows), f"distance to the nearest other pseudo-label (IVF, nprobe {probe}): "
                           f"{done:,} of {len(qrows):,} rows" + ("" if done == len(qrows) else
                                                                  f", ETA {el * (len(qrows) - done) / done:.0f} s"))
        return out

    t0 = time.perf_counter()
    sample = knn._pick_sample(len(rows), knn.RECALL_SAMPLE if recall_sample is None else int(recall_sample), seed)
    progress(0.0, f"recall check: exact distance to the nearest other pseudo-label of {len(sample):,} sample rows")
    exact = other_label_distance(xa, lab, rows[sample], check=check)
    ladder = [min(int(nprobe), index.nlist)] if nprobe is not None else knn._ladder(index.nlist)
    recall, probe = 0.0, ladder[0]
    for probe in ladder:  # noqa: B007 -- the last one tried is kept
        approx = search(rows[sample], probe)
        recall = float(np.mean(np.isclose(approx, exact, rtol=1e-9, atol=0.0))) if len(sample) else 1.0
        progress(0.2, f"tuning nprobe: {probe} of {index.nlist} lists finds the exact distance for "
                      f"{recall:.3f} of the sample (target {target:g})")
        if recall >= target:
            break
    recall_s = time.perf_counter() - t0
    t1 = time.perf_counter()
    r = search(rows, probe, report=lambda f, m: progress(0.2 + 0.8 * f, m))
    info = {"method": f"faiss-ivf-flat nlist={index.nlist} nprobe={probe}", "nprobe": int(probe),
            "nlist": int(index.nlist), "recall": recall, "recall_sample": int(len(sample)),
            "target_recall": target, "below_target": recall < target, "k": int(k),
            "recall_s": recall_s, "search_s": time.perf_counter() - t1}
    return r, info


def ivf_ball_graph(x: np.ndarray, delta: float, *, nprobe: int | None = None,
                   target_recall: float | None = None, recall_sample: int | None = None, seed: int = 0,
                   max_edges: int | None = None, block: int | None = None, index: Any = None,
                   progress: Progress | None = None, check: Check | None = None) -> BallGraph:
    """Approximate ``delta``-balls of every row of ``x``: FAISS ``IndexIVFFlat.range_search``
    (module docstring, "Large inputs") within :func:`_ivf_search_radius`, the rows in the
    index's list order, candidates re-tested exactly in float64, made
    symmetric, with the recall of ball membership measured on a seeded sample of rows
    against :func:`exact_balls`. ``nprobe`` (clamped to the lists; all lists: every ball
    exact) None: the smallest of the k-NN engine's ladder
    reaching ``target_recall`` (default the engine's) on that sample. ``max_edges`` None:
    ``min(2^31, available memory / 24 B)`` (the symmetrisation's peak per entry). ``block``
    None: rows per search block from the tuning's time per query (~``BLOCK_SECONDS``).
    ``index``: an IVF-Flat :class:`miners.knn.IvfIndex` of ``x`` already built (ProbCover's
    purity rule built it), else one is built here."""
    from miners import knn

    progress = progress or _noop_progress
    check = check or _noop_check
    target = knn.TARGET_RECALL if target_recall is None else float(target_recall)
    if not 0.0 < target <= 1.0:
        raise ValueError(f"target_recall must be in (0, 1]; got {target_recall!r}")
    xa = np.ascontiguousarray(x, dtype=np.float32)
    n = len(xa)
    if max_edges is None:
        max_edges = int(min(_MAX_EDGES, knn._available_bytes() // _SYM_BYTES_PER_ENTRY))
    if nprobe is not None and (isinstance(nprobe, bool) or not isinstance(nprobe, int | np.integer)
                               or nprobe < 1):
        raise ValueError(f"nprobe must be an integer >= 1 (IVF lists probed per row); got {nprobe!r}")
    t0 = time.perf_counter()
    if index is None:
        index = ivf_flat_index(xa, seed=seed, progress=knn._sub(progress, 0.0, 0.1), check=check)
    elif index.codes != "flat" or index.index.ntotal != n:
        raise ValueError(f"index must be an IVF-Flat index of the {n:,} rows of x")
    nlist = index.nlist
    build_s = time.perf_counter() - t0
    # 2. the exact balls of the recall sample, then the nprobe ladder on that sample
    t1 = time.perf_counter()
    sample = knn._pick_sample(n, knn.RECALL_SAMPLE if recall_sample is None else int(recall_sample), seed)
    progress(0.1, f"recall check: exact {delta:.4g}-balls of {len(sample):,} sample rows")
    exact = exact_balls(xa, sample, delta, check=check)
    r2, radius = float(delta) ** 2, _ivf_search_radius(xa.shape[1], delta)
    sq = xa[sample]
    # from 1 list up: a ball (radius below the nearest other pseudo-label) lies mostly in its
    # row's own list (200k x 384, 2,048 lists: nprobe 1 found 0.74 of the entries, 2: 0.96,
    # 4: 1.0)
    ladder = [min(int(nprobe), nlist)] if nprobe is not None else knn._ladder(nlist)
    search = _list_ordered_search(index)
    per_query, recall, probe = 0.0, 0.0, ladder[0]
    for step, probe in enumerate(ladder):  # noqa: B007 — the last one tried is kept
        check()
        index.nprobe = probe
        ts = time.perf_counter()
        lims, _, idx = search(sq, radius)
        per_query = (time.perf_counter() - ts) / max(1, len(sample))
        rows = np.repeat(np.arange(len(sample)), np.diff(lims).astype(np.int64))
        keep = _pair_test(xa, sample[rows], idx.astype(np.int64), r2)
        indptr = np.zeros(len(sample) + 1, dtype=np.int64)
        np.cumsum(np.bincount(rows[keep], minlength=len(sample)), out=indptr[1:])
        recall = ball_recall(BallGraph(indptr, idx[keep], float(delta)), sample, exact,
                             at=np.arange(len(sample)))
        progress(0.1 + 0.05 * (step + 1) / len(ladder),
                 f"tuning nprobe: {probe} of {nlist} lists finds {recall:.4f} of the ball entries "
                 f"(target {target:g})")
        if recall >= target:
            break
    recall_s = time.perf_counter() - t1
    # 3. the graph, in blocks of ~BLOCK_SECONDS
    if block is None:
        block = int(min(_RANGE_BLOCK * 4, max(256, knn.BLOCK_SECONDS / max(per_query, 1e-7))))
    t2 = time.perf_counter()
    # rows in inverted-list order, as the k-NN engine searches a pool's own graph (200k x 384,
    # 200 clusters, nprobe 7: 22.5-24.9 s against 28.0-28.3 s in blocks of consecutive rows)
    g = _range_blocks(xa, search, delta, block=block, max_edges=max_edges, radius=radius, order=index.list_order(),
                      what=f"ball graph ({index.method})", progress=knn._sub(progress, 0.15, 0.95),
                      check=check)
    method = index.method
    del index, search  # release the float32 copy before the symmetrisation
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


def _f32_error(x: np.ndarray) -> float:
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


def other_label_distance(x: np.ndarray, labels: np.ndarray, rows: np.ndarray | None = None, *,
                         block: int = 1024, chunk: int = 65_536, progress: Progress | None = None,
                         check: Check | None = None) -> np.ndarray:
    """``r(x_i) = min_{j : labels_j != labels_i} ||x_i - x_j||`` for the queried ``rows``
    (default all), exact: float32 ``|q|^2 + |x|^2 - 2 q.x`` over blocks of queries and
    chunks of rows keeps, per query and chunk, every other-label row within twice the
    float32 error bound of the chunk's minimum (the true nearest is among them); their
    distances are then recomputed in float64. ``+inf`` when every row shares the label.
    ``O(|rows| N d)`` time, ``O(block * chunk)`` memory."""
    progress = progress or _noop_progress
    check = check or _noop_check
    xa = np.ascontiguousarray(x, dtype=np.float32)
    lab = np.asarray(labels, dtype=np.int64)
    if lab.shape != (len(xa),):
        raise ValueError(f"labels must have one entry per row ({len(xa)}); got {lab.shape}")
    q_rows = np.arange(len(xa)) if rows is None else np.asarray(rows, dtype=np.int64)
    n = len(xa)
    xx = np.einsum("ij,ij->i", xa, xa)
    out = np.full(len(q_rows), np.inf)
    tol = np.float32(2.0 * _f32_error(xa))
    t0 = time.perf_counter()
    for s in range(0, len(q_rows), block):
        check()
        qr = q_rows[s:s + block]
        q, qq, ql = xa[qr], xx[qr], lab[qr]
        qi_parts, ci_parts = [], []
        for c0 in range(0, n, chunk):
            c1 = min(n, c0 + chunk)
            d2 = qq[:, None] + xx[None, c0:c1] - np.float32(2.0) * (q @ xa[c0:c1].T)
            d2[ql[:, None] == lab[None, c0:c1]] = np.inf
            lo = d2.min(axis=1)
            # a chunk holding only the query's label has lo = inf: inf <= inf would make every
            # same-label row a candidate (a wrong, too small r and a huge candidate list)
            qi, ci = np.nonzero((d2 <= (lo + tol)[:, None]) & np.isfinite(d2))
            qi_parts.append(qi)
            ci_parts.append(ci + c0)
        qi, ci = np.concatenate(qi_parts), np.concatenate(ci_parts)
        if len(qi):
            diff = xa[qr[qi]].astype(np.float64) - xa[ci].astype(np.float64)
            d = np.sqrt(np.einsum("ij,ij->i", diff, diff))
            best = np.full(len(qr), np.inf)
            np.minimum.at(best, qi, d)
            out[s:s + len(qr)] = best
        done = s + len(qr)
        el = time.perf_counter() - t0
        progress(done / max(1, len(q_rows)), f"distance to the nearest other pseudo-label: {done:,} of "
                 f"{len(q_rows):,} rows{'' if done == len(q_rows) else f', ETA {el * (len(q_rows) - done) / done:.0f} s'}")
    return out


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
            above, both come from one IVF-Flat index (:func:`ivf_other_label_distance`,
            :func:`ivf_ball_graph`), each with its measured recall in ``stats``.
        nprobe: the approximate path's IVF lists probed per row, for the purity distances
            and the ball graph alike (None: each tuned on its sample).
        progress, check: hooks.

    Returns:
        :class:`ProbCoverResult`.
    """
    progress = progress or _noop_progress
    check = check or _noop_check
    x, n_lab = _stack(pool, labeled)
    n = len(x)
    n_pool = n - n_lab
    size = _check_size(size, n_pool)
    bad = _first_non_finite_row(x)
    if bad is not None:
        raise ValueError(f"row {bad} of [labeled; pool] has NaN or infinite values")
    t0 = time.perf_counter()
    purity = None
    stats: dict[str, Any] = {}
    exact, index = n <= exact_rows or not n, None
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
            else:  # one IVF index of the rows serves these distances and the ball graph
                index = ivf_flat_index(x, seed=seed, progress=lambda f, m: progress(0.1 + 0.05 * f, m),
                                       check=check)
                r, stats["purity_distances"] = ivf_other_label_distance(
                    index, x, pseudo, np.arange(n) if rows is None else rows, nprobe=nprobe, seed=seed,
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
            graph = ivf_ball_graph(x, float(delta), nprobe=nprobe, seed=seed, index=index, progress=sub,
                                   check=check)
            del index  # the float32 copy of the rows, before the greedy
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
            # picked and labeled rows hold negative degrees, which only decrease
            deg -= np.bincount(np.concatenate(segs), minlength=n)
        deg[c] = -1
        if len(picks) % 64 == 0:
            progress(0.8 + 0.2 * len(picks) / max(1, size), f"ProbCover: {len(picks):,} of {size:,} picks")
    stats["seconds"] = time.perf_counter() - t0
    if graph.info:
        stats["graph"] = graph.info
    return ProbCoverResult(np.asarray(picks, dtype=np.int64) - n_lab, np.asarray(gains, dtype=np.int64),
                           float(delta), purity, float(1.0 - uncovered.mean()) if n else 1.0, random_fill,
                           graph.n_edges, stats)
