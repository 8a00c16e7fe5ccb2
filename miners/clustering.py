"""Clustering building blocks shared by TypiClust, ProbCover, Cluster-Margin and SemDeDup.

* :func:`kmeans` — Lloyd's k-means (FAISS ``Kmeans``, ``niter`` iterations) started, for
  ``k <= KMEANS_PP_MAX`` (512), from k-means++ seeds (:func:`kmeans_plusplus` on at most
  ``max(16 k, 10,000)`` of the training rows: FAISS's own start, ``k`` random rows, often
  splits a large cluster and merges two small ones when there are few clusters); with more
  clusters from ``k`` distinct random training rows (seeded; k-means++ costs ``O(k^2)``
  passes there and the Lloyd iterations matter more than the start), trained on at most ``k * max_points_per_centroid`` seeded sample rows (256 by
  default), then **every** row assigned to its nearest centre by an exact blocked search
  (:func:`assign`).
* :func:`kmeans_plusplus` — Arthur & Vassilvitskii's D² seeding, one candidate per step:
  the first centre uniformly at random, each next one with probability ``D^2(x) / sum D^2``
  (``D`` the distance to the nearest centre so far); ``D^2`` is updated with one float32
  matrix-vector product per centre, ``O(k m d)`` in all (scikit-learn's greedy variant
  with ``2 + log k`` candidates per step took 532 s for 2,048 centres on 20,000 x 384 rows
  here; this one a few seconds). ``spherical=True``
  renormalises the centres to unit length after each iteration (k-means on the sphere,
  for cosine spaces: pass unit vectors). Cost ``O(niter * min(N, 256 k) * k * d)`` to
  train plus ``O(N k d)`` to assign; memory ``O(k d)`` plus one block of scores.
* :func:`assign` — nearest centre of every row, exact (FAISS flat search in blocks of
  ``block`` rows; ``check()`` between blocks).
* :func:`hac_centres` — average-linkage agglomerative clustering (SciPy ``linkage``) of a
  seeded sample of at most ``sample`` rows, cut into ``k`` clusters; the centres are the
  clusters' means. Its memory is the sample's condensed distance matrix,
  ``sample^2 / 2`` float64 (8,000 rows: 256 MB), hence the sample.

All functions are deterministic for a given ``seed``.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from typing import Any

import numpy as np

__all__ = ["StackedRows", "assign", "hac_centres", "kmeans"]

Progress = Callable[[float, str], None]
Check = Callable[[], None]
_ASSIGN_BLOCK = 16_384
KMEANS_PP_MAX = 512


def _noop_progress(fraction: float, message: str) -> None:
    pass


def _noop_check() -> None:
    pass


def _faiss():
    import faiss

    faiss.omp_set_num_threads(os.cpu_count() or 1)
    return faiss


class StackedRows:
    """The rows of several ``(n_i, d)`` arrays one after another — ``np.concatenate(parts)``
    as far as :func:`kmeans` and :func:`assign` read it (``len``, ``shape``, ``[start:stop]``,
    ``[sorted or unsorted row indices]``) — without the copy: a 10M x 384 memory-mapped pool
    stacked under its labeled rows would be a 15 GB array in RAM. ``np.asarray`` of it does
    concatenate (only small inputs take that path)."""

    def __init__(self, parts: list[np.ndarray]) -> None:
        if not parts or len({p.shape[1] for p in parts}) != 1:
            raise ValueError("StackedRows needs one or more 2-D arrays of the same width")
        self.parts = parts
        self.offsets = np.cumsum([0] + [len(p) for p in parts])
        self.shape = (int(self.offsets[-1]), int(parts[0].shape[1]))
        self.ndim = 2
        self.dtype = np.result_type(*parts)

    def __len__(self) -> int:
        return self.shape[0]

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        return np.concatenate([np.asarray(p, dtype=dtype) for p in self.parts])

    def __getitem__(self, key: Any) -> np.ndarray:
        if isinstance(key, slice):
            start, stop, step = key.indices(len(self))
            if step != 1:
                raise ValueError("StackedRows: slices with a step are not supported")
            rows = np.arange(start, stop)
        else:
            rows = np.asarray(key)
            if rows.dtype == bool or rows.ndim != 1:
                raise ValueError("StackedRows: index with a slice or a 1-D array of row numbers")
        rows = np.where(rows < 0, rows + len(self), rows)
        part = np.searchsorted(self.offsets, rows, side="right") - 1
        out = np.empty((len(rows), self.shape[1]), dtype=self.dtype)
        for i, p in enumerate(self.parts):
            mine = part == i
            if mine.any():
                local = rows[mine] - self.offsets[i]
                if isinstance(key, slice):  # one contiguous range of this part
                    out[mine] = p[int(local[0]):int(local[-1]) + 1]
                else:
                    out[mine] = p[local]
        return out


def _f32(x: np.ndarray, start: int, stop: int) -> np.ndarray:
    return np.ascontiguousarray(x[start:stop], dtype=np.float32)


def assign(x: np.ndarray, centres: np.ndarray, *, block: int = _ASSIGN_BLOCK,
           progress: Progress | None = None, check: Check | None = None
           ) -> tuple[np.ndarray, np.ndarray]:
    """Nearest centre of every row of ``x`` (Euclidean): ``(labels (N,) int64, squared
    distances (N,) float32)``; ties go to the smaller centre index (FAISS flat search)."""
    progress = progress or _noop_progress
    check = check or _noop_check
    faiss = _faiss()
    c = np.ascontiguousarray(centres, dtype=np.float32)
    n = len(x)
    labels = np.empty(n, dtype=np.int64)
    d2 = np.empty(n, dtype=np.float32)
    index = faiss.IndexFlatL2(c.shape[1])
    index.add(c)
    for s in range(0, n, block):
        check()
        e = min(n, s + block)
        dist, idx = index.search(_f32(x, s, e), 1)
        labels[s:e], d2[s:e] = idx[:, 0], np.maximum(dist[:, 0], 0.0)
        progress(e / max(1, n), f"assigning rows to {len(c):,} centres: {e:,} of {n:,}")
    return labels, d2


def kmeans_plusplus(x: np.ndarray, k: int, *, seed: int = 0, check: Check | None = None) -> np.ndarray:
    """``k`` k-means++ seeds among the rows of ``x`` (module docstring), ``(k, d)`` float32.
    Rows at distance 0 from the chosen centres are never drawn again while others remain;
    when every row is covered the next seeds are the unchosen rows in index order."""
    check = check or _noop_check
    xa = np.ascontiguousarray(x, dtype=np.float32)
    n = len(xa)
    k = int(min(k, n))
    rng = np.random.default_rng([seed, 23])
    xx = np.einsum("ij,ij->i", xa, xa)
    chosen = np.empty(k, dtype=np.int64)
    taken = np.zeros(n, dtype=bool)
    d2 = np.full(n, np.inf, dtype=np.float64)
    c = int(rng.integers(n))
    for i in range(k):
        if i % 64 == 0:
            check()
        chosen[i] = c
        taken[c] = True
        new = xx + xx[c] - np.float32(2.0) * (xa @ xa[c])
        np.minimum(d2, np.maximum(new, 0.0), out=d2)
        d2[taken] = 0.0
        if i + 1 == k:
            break
        cum = np.cumsum(d2)
        total = float(cum[-1])
        if total > 0.0 and np.isfinite(total):
            c = min(int(np.searchsorted(cum, rng.random() * total, side="right")), n - 1)
            if taken[c]:  # rounding landed on a zero-weight row: the next one with weight
                c = int(np.flatnonzero(d2 > 0.0)[0])
        else:
            c = int(np.argmin(taken))
    return xa[chosen].copy()


def kmeans(x: np.ndarray, k: int, *, seed: int = 0, niter: int = 20, max_points_per_centroid: int = 256,
           spherical: bool = False, progress: Progress | None = None, check: Check | None = None
           ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """k-means of the rows of ``x`` (module docstring).

    Returns:
        ``(centres (k, d) float32, labels (N,) int64, squared distances to the own centre
        (N,) float32)``. With ``k >= N`` every row is its own cluster (centres = rows).
    """
    progress = progress or _noop_progress
    check = check or _noop_check
    n = len(x)
    if isinstance(k, bool) or not isinstance(k, int | np.integer) or k < 1:
        raise ValueError(f"k must be an integer >= 1; got {k!r}")
    if n == 0:
        return np.empty((0, x.shape[1]), np.float32), np.empty(0, np.int64), np.empty(0, np.float32)
    if k >= n:
        return (np.ascontiguousarray(x, dtype=np.float32), np.arange(n, dtype=np.int64),
                np.zeros(n, dtype=np.float32))
    faiss = _faiss()
    d = x.shape[1]
    cap = int(k) * int(max_points_per_centroid)
    if n > cap:
        rows = np.sort(np.random.default_rng([seed, 31]).choice(n, cap, replace=False))
        train = np.ascontiguousarray(x[rows], dtype=np.float32)
    else:
        train = np.ascontiguousarray(x, dtype=np.float32)
    check()
    progress(0.0, f"k-means: {k:,} clusters on {len(train):,} rows")
    rng = np.random.default_rng([seed, 29])
    if k <= KMEANS_PP_MAX:
        m = min(len(train), max(16 * int(k), 10_000))
        init_rows = np.sort(rng.choice(len(train), m, replace=False)) if m < len(train) else np.arange(len(train))
        init = kmeans_plusplus(train[init_rows], int(k), seed=seed, check=check)
    else:
        init = train[np.sort(rng.choice(len(train), int(k), replace=False))]
    if spherical:
        init = init / np.maximum(np.linalg.norm(init, axis=1, keepdims=True), 1e-12)
    check()
    # One FAISS iteration per call, each from the last one's centres: the same Lloyd steps as
    # one call with niter iterations, but with progress and a cancel check between them (an
    # iteration of 5,000 centres on 1M x 384 rows is tens of seconds on 2 cores).
    centres = np.ascontiguousarray(init, dtype=np.float32)
    t0 = time.perf_counter()
    for it in range(int(niter)):
        km = faiss.Kmeans(d, int(k), niter=1, seed=int(seed) & 0x7FFFFFFF, spherical=spherical,
                          max_points_per_centroid=int(max_points_per_centroid), min_points_per_centroid=1,
                          verbose=False)
        km.train(train, init_centroids=centres)
        centres = np.ascontiguousarray(km.centroids, dtype=np.float32)
        check()
        done = (it + 1) / int(niter)
        eta = (time.perf_counter() - t0) * (1 - done) / done
        progress(0.5 * done, f"k-means: iteration {it + 1} of {niter}, {k:,} clusters on {len(train):,} rows, "
                             f"ETA {eta:.0f}s")
    labels, d2 = assign(x, centres, progress=lambda f, m: progress(0.5 + 0.5 * f, m), check=check)
    return centres, labels, d2


def hac_centres(x: np.ndarray, k: int, *, sample: int = 8000, seed: int = 0,
                check: Check | None = None) -> np.ndarray:
    """Average-linkage HAC of a seeded sample of at most ``sample`` rows, cut into ``k``
    clusters (SciPy ``fcluster(..., "maxclust")``: at most ``k``); returns the clusters'
    mean vectors ``(k', d)`` float32, ``k' <= k``, ordered by their first sample row."""
    from scipy.cluster.hierarchy import fcluster, linkage

    check = check or _noop_check
    n = len(x)
    rows = np.arange(n) if n <= sample else np.sort(np.random.default_rng([seed, 37]).choice(n, sample,
                                                                                             replace=False))
    xs = np.asarray(x[rows], dtype=np.float64)
    if len(xs) <= k:
        return xs.astype(np.float32)
    check()
    z = linkage(xs, method="average", metric="euclidean")
    check()
    lab = fcluster(z, t=k, criterion="maxclust")
    _, first, inv = np.unique(lab, return_index=True, return_inverse=True)
    order = np.argsort(first, kind="stable")  # clusters by their first sample row
    rank = np.empty_like(order)
    rank[order] = np.arange(len(order))
    cid = rank[inv]
    sums = np.zeros((len(order), xs.shape[1]))
    np.add.at(sums, cid, xs)
    return (sums / np.bincount(cid)[:, None]).astype(np.float32)
