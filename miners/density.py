"""Density and distance miners on k-nearest-neighbour graphs (pure NumPy).

The k-NN graph
--------------
Every function here except :func:`exact_knn_graph` (which builds one), :func:`energy_scores`
and :func:`feature_norm_scores` works on a **k-NN graph** given as two arrays of the same
shape ``(N, k)``:

* ``indices`` -- integer row numbers of each row's neighbours (``int64``; ``-1`` = missing);
* ``distances`` -- their Euclidean distances (``float64``), ascending along each row.

Conventions (checked; a violation raises :class:`ValueError` naming the first offending
row and column):

* missing neighbours (fewer than ``k`` found) are **trailing**: ``-1`` entries come after the
  listed ones, and their distance is ignored where ``indices`` is given; functions that take
  ``distances`` alone read a missing neighbour as ``+inf`` (what :func:`exact_knn_graph` and
  the ANN graph builder write there);
* a listed neighbour has a finite distance ``>= 0``; distances are non-decreasing along the
  row; a row lists a neighbour at most once;
* a pool's own graph (:func:`lof_scores`, :func:`near_duplicate_pairs`) excludes each row
  from its own list, as scikit-learn's ``kneighbors()`` does; exact duplicates of a row are
  ordinary neighbours at distance 0.

For cosine spaces the graph distance is the Euclidean distance between the L2-normalised
vectors, ``||a/|a| - b/|b|||_2 = sqrt(2 (1 - cos(a, b)))``: the same neighbours as cosine
distance, and a metric, so LOF, k-distances and duplicate thresholds keep their meaning.

Scores are ``float64`` arrays, one per row. Their direction is stated per function; the
miners rank **higher first**. No function builds an ``N x N`` matrix: the exact graph
works on blocks of ``b`` query rows (``O(b N)`` memory), everything else is ``O(N k)``.
"""

from __future__ import annotations

from typing import Literal

import numpy as np

from indexing.measures import energy_scores

__all__ = [
    "LOF_EPS",
    "aggregate_seed_neighbours",
    "energy_scores",
    "exact_knn_graph",
    "feature_norm_scores",
    "knn_distance_scores",
    "lof_novelty_scores",
    "lof_scores",
    "near_duplicate_pairs",
    "nearest_distance",
    "typicality_scores",
]

#: Added to the mean reachability distance before inverting it (scikit-learn does the same,
#: so that more than ``k`` exact duplicates give a large finite density instead of ``1/0``).
LOF_EPS = 1e-10

_DEFAULT_BLOCK_BYTES = 64 << 20  # the (b, N) score block of exact_knn_graph
_REFINE_BYTES = 32 << 20  # the (b', c, d) gathered candidates of the exact re-ranking
_RUNS = 64  # the c-th smallest score of a row is bounded on _RUNS runs of _RUNS columns
_SAMPLE_COLS = _RUNS * _RUNS


# ----------------------------------------------------------------------------- validation


def _check_int(value: object, name: str, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int | np.integer):
        raise ValueError(f"{name} must be an integer; got {value!r}")
    if int(value) < minimum:
        raise ValueError(f"{name} must be >= {minimum}; got {int(value)}")
    return int(value)


def _float_matrix(x: object, name: str, shape: str) -> np.ndarray:
    """A finite, real 2-D array (dtype kept when floating, else float64); not copied."""
    arr = np.asarray(x)
    if arr.dtype.kind not in "biuf":
        raise ValueError(f"{name} must be a real numeric array; got dtype {arr.dtype}")
    if arr.ndim != 2:
        raise ValueError(f"{name} must be a 2-D array of shape {shape}; got shape {arr.shape}")
    if arr.dtype.kind != "f":
        arr = arr.astype(np.float64)
    if arr.size and not np.isfinite(arr).all():
        bad = np.argwhere(~np.isfinite(arr))[0]
        raise ValueError(
            f"{name} must be finite; row {int(bad[0])}, column {int(bad[1])} is "
            f"{arr[bad[0], bad[1]]}"
        )
    return arr


def _distance_matrix(distances: object, name: str = "distances") -> tuple[np.ndarray, np.ndarray]:
    """Validate a distance-only k-NN matrix; returns (float64 copy, listed mask).

    ``+inf`` marks a missing neighbour (trailing); NaN, negative values and ``-inf`` are
    rejected, as are rows that are not non-decreasing or that list no neighbour at all.
    """
    arr = np.asarray(distances)
    if arr.dtype.kind not in "biuf":
        raise ValueError(f"{name} must be a real numeric array; got dtype {arr.dtype}")
    if arr.ndim != 2:
        raise ValueError(f"{name} must be a 2-D array of shape (N, k); got shape {arr.shape}")
    if arr.shape[1] < 1:
        raise ValueError(f"{name} must have at least one neighbour column (k >= 1); got k=0")
    d = np.array(arr, dtype=np.float64, copy=True)
    if np.isnan(d).any():
        r, c = np.argwhere(np.isnan(d))[0]
        raise ValueError(f"{name} must not contain NaN; row {r}, column {c} is NaN "
                         "(mark a missing neighbour with +inf)")
    if (d < 0).any():
        r, c = np.argwhere(d < 0)[0]
        raise ValueError(f"{name} must be >= 0; row {r}, column {c} is {d[r, c]}")
    listed = np.isfinite(d)
    _check_trailing(listed, name, "+inf")
    _check_ascending(d, listed, name)
    if d.shape[0] and not listed[:, 0].all():
        r = int(np.argmin(listed[:, 0]))
        raise ValueError(f"{name}: row {r} lists no neighbour (all distances are +inf)")
    return d, listed


def _check_trailing(listed: np.ndarray, name: str, marker: str) -> None:
    gap = listed[:, 1:] & ~listed[:, :-1]
    if gap.any():
        r, c = np.argwhere(gap)[0]
        raise ValueError(f"{name}: row {r} lists a neighbour in column {c + 1} after a missing one "
                         f"({marker}) in column {c}; missing neighbours must be trailing")


def _check_ascending(d: np.ndarray, listed: np.ndarray, name: str) -> None:
    both = listed[:, 1:] & listed[:, :-1]
    with np.errstate(invalid="ignore"):
        down = both & (d[:, 1:] < d[:, :-1])
    if down.any():
        r, c = np.argwhere(down)[0]
        raise ValueError(f"{name}: row {r} is not ascending: column {c + 1} ({d[r, c + 1]}) < "
                         f"column {c} ({d[r, c]}); sort each row by distance")


def _graph(indices: object, distances: object, *, n_ref: int | None = None, own: bool = False,
           allow_self: bool = False, prefix: str = "", need_neighbour: bool = True
           ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Validate a k-NN graph; returns (int64 indices, float64 distances, listed mask).

    ``n_ref``: number of rows the indices point into (``None``: unbounded). ``own``: the
    graph is a pool's own (indices point into its ``N`` rows); then, unless ``allow_self``,
    a row must not list itself.
    """
    iname, dname = f"{prefix}indices", f"{prefix}distances"
    idx = np.asarray(indices)
    if idx.dtype.kind not in "iu":
        raise ValueError(f"{iname} must be an integer array (row numbers, -1 = missing); "
                         f"got dtype {idx.dtype}")
    if idx.ndim != 2:
        raise ValueError(f"{iname} must be a 2-D array of shape (N, k); got shape {idx.shape}")
    dist = np.asarray(distances)
    if dist.dtype.kind not in "biuf":
        raise ValueError(f"{dname} must be a real numeric array; got dtype {dist.dtype}")
    if dist.shape != idx.shape:
        raise ValueError(f"{iname} and {dname} must have the same shape (N, k); got {idx.shape} "
                         f"and {dist.shape}")
    if idx.shape[1] < 1:
        raise ValueError(f"{iname} must have at least one neighbour column (k >= 1); got k=0")
    idx = idx.astype(np.int64, copy=False)
    if own:
        n_ref = idx.shape[0]
    if idx.size and idx.min() < -1:
        r, c = np.argwhere(idx < -1)[0]
        raise ValueError(f"{iname}: row {r}, column {c} is {idx[r, c]}; row numbers are >= 0 "
                         "and -1 marks a missing neighbour")
    if n_ref is not None and idx.size and idx.max() >= n_ref:
        r, c = np.argwhere(idx >= n_ref)[0]
        raise ValueError(f"{iname}: row {r}, column {c} is {idx[r, c]}, but the graph's rows "
                         f"point into {n_ref} rows (valid: 0..{n_ref - 1})")
    listed = idx >= 0
    _check_trailing(listed, iname, "-1")
    d = np.where(listed, dist.astype(np.float64, copy=False), np.inf)
    bad = listed & ~np.isfinite(d)
    if bad.any():
        r, c = np.argwhere(bad)[0]
        raise ValueError(f"{dname}: row {r}, column {c} is {d[r, c]} for listed neighbour "
                         f"{idx[r, c]}; listed neighbours need finite distances")
    if (d < 0).any():
        r, c = np.argwhere(d < 0)[0]
        raise ValueError(f"{dname} must be >= 0; row {r}, column {c} is {d[r, c]}")
    _check_ascending(d, listed, dname)
    for start in range(0, idx.shape[0] if idx.shape[1] > 1 else 0, 1 << 18):
        s = np.sort(idx[start:start + (1 << 18)], axis=1)
        dup = (s[:, 1:] == s[:, :-1]) & (s[:, 1:] >= 0)
        if dup.any():
            r, c = np.argwhere(dup)[0]
            raise ValueError(f"{iname}: row {start + r} lists neighbour {s[r, c]} more than "
                             "once")
    if own and not allow_self:
        selfloop = idx == np.arange(idx.shape[0], dtype=np.int64)[:, None]
        if selfloop.any():
            r, c = np.argwhere(selfloop)[0]
            raise ValueError(f"{iname}: row {r} lists itself (column {c}); a pool's own graph "
                             "must exclude self (exact_knn_graph(..., exclude_self=True))")
    if need_neighbour and idx.shape[0] and not listed[:, 0].all():
        r = int(np.argmin(listed[:, 0]))
        raise ValueError(f"{iname}: row {r} lists no neighbour (all -1)")
    return idx, d, listed


# ------------------------------------------------------------------------ exact k-NN graph


def _gamma(n: int, u: float) -> float:
    """Higham's gamma_n = n u / (1 - n u): bound on the relative error of an n-term sum."""
    nu = n * u
    return nu / (1.0 - nu) if nu < 0.5 else float("inf")


def _row_norms(a: np.ndarray, block: int = 65536) -> np.ndarray:
    """float64 L2 norms of the rows of ``a``, without a full float64 copy of it."""
    out = np.empty(a.shape[0], dtype=np.float64)
    for s in range(0, a.shape[0], block):
        c = a[s:s + block].astype(np.float64)
        out[s:s + block] = np.sqrt(np.einsum("ij,ij->i", c, c))
    return out


def _smallest(s: np.ndarray, c: int, mask: np.ndarray) -> np.ndarray:
    """Column numbers of the ``c`` smallest entries of each row of ``s`` (any order).

    ``argpartition`` over a whole ``(b, N)`` block costs 3-10 ns per entry; instead an upper
    bound ``tau`` of each row's ``c``-th smallest value is read off a sample of 4096
    columns (the ``c``-th smallest of a subset is >= that of the full row), the entries
    ``<= tau`` are gathered (about ``c N / n_sample`` per row), and only those are
    partitioned. Rows whose bound is too loose fall back to a plain ``argpartition``.
    ``mask`` is a reusable boolean buffer of at least ``s``'s shape.
    """
    b, n = s.shape
    if c >= n:
        return np.broadcast_to(np.arange(n, dtype=np.int64), (b, n)).copy()
    if n <= 2 * _SAMPLE_COLS or c * 8 > _SAMPLE_COLS:
        return np.argpartition(s, c - 1, axis=1)[:, :c].astype(np.int64)
    # sample: 64 runs of 64 contiguous columns, evenly spread (cache-friendly to gather)
    group = n // _RUNS
    sample = s[:, :_RUNS * group].reshape(b, _RUNS, group)[:, :, :_RUNS].reshape(b, _SAMPLE_COLS)
    tau = np.partition(sample, c - 1, axis=1)[:, c - 1]
    mask = np.less_equal(s, tau[:, None], out=mask[:b])
    # at most b * N entries: bounded by the block, whatever the data
    flat = np.flatnonzero(mask)
    r = flat // n
    counts = np.bincount(r, minlength=b)
    loose = counts > max(64 * c, n // 16)
    out = np.empty((b, c), dtype=np.int64)
    if loose.any():
        rows = np.flatnonzero(loose)
        out[rows] = np.argpartition(s[rows], c - 1, axis=1)[:, :c]
        keep = ~loose[r]
        flat, r = flat[keep], r[keep]
        counts[rows] = 0
    tight = np.flatnonzero(~loose)
    if tight.size:
        col = flat - r * n
        starts = np.zeros(b, dtype=np.int64)
        np.cumsum(counts[:-1], out=starts[1:])
        pos = np.arange(r.size, dtype=np.int64) - starts[r]
        width = int(counts.max())
        vals = np.full((b, width), np.inf, dtype=s.dtype)
        cols = np.zeros((b, width), dtype=np.int64)
        vals[r, pos] = s.reshape(-1)[flat]
        cols[r, pos] = col
        part = np.argpartition(vals[tight], c - 1, axis=1)[:, :c]
        out[tight] = np.take_along_axis(cols[tight], part, axis=1)
    return out


def _exact_scores(xs: np.ndarray, x_norm: np.ndarray, q64: np.ndarray, cand: np.ndarray,
                  metric: str) -> np.ndarray:
    """float64 squared distances (l2) or ``-cos`` (cosine) of queries to candidate rows.

    l2 uses direct differences ``sum_j (x_j - q_j)^2``, exact up to one rounding per term
    (duplicates come out at exactly 0, as in scikit-learn's trees); cosine uses the
    normalised vectors (``q64`` is then already normalised).
    """
    b, c = cand.shape
    d = xs.shape[1]
    out = np.empty((b, c), dtype=np.float64)
    step = max(1, _REFINE_BYTES // max(1, c * d * 8))
    for s in range(0, b, step):
        g = xs[cand[s:s + step]].astype(np.float64)  # (b', c, d)
        if metric == "l2":
            g -= q64[s:s + step, None, :]
            out[s:s + step] = np.einsum("bcd,bcd->bc", g, g)
        else:
            g /= x_norm[cand[s:s + step]][..., None]
            out[s:s + step] = -np.einsum("bcd,bd->bc", g, q64[s:s + step])
    return out


def exact_knn_graph(
    x: np.ndarray,
    k: int,
    *,
    queries: np.ndarray | None = None,
    exclude_self: bool = True,
    block_rows: int = 4096,
    metric: Literal["l2", "cosine"] = "l2",
    max_block_bytes: int = _DEFAULT_BLOCK_BYTES,
) -> tuple[np.ndarray, np.ndarray]:
    """Exact k nearest rows of ``x`` for each query, computed in blocks (never ``N x N``).

    Args:
        x: ``(N, d)`` reference vectors (float32 or float64; other real dtypes are cast).
        k: neighbours per query, ``>= 1``. When fewer exist the row is padded with index
            ``-1`` and distance ``+inf``.
        queries: ``(M, d)`` query vectors; ``None`` (default) queries ``x`` itself.
        exclude_self: only when ``queries is None``: query ``i`` does not list row ``i``
            (exact duplicates of it stay, at distance 0; this is scikit-learn's
            ``kneighbors()`` without ``X``). Ignored when ``queries`` is given.
        block_rows: most query rows per block.
        metric: ``"l2"``: Euclidean distance. ``"cosine"``: the Euclidean distance between
            the L2-normalised vectors, ``sqrt(2 (1 - cos))`` (same order as cosine distance;
            zero vectors are rejected).
        max_block_bytes: memory cap of one ``(b, N)`` score block; ``b`` is lowered to fit.

    Returns:
        ``(indices (M, k) int64, distances (M, k) float64)``, each row ascending by distance,
        ties broken by the smaller row number.

    Method. For a block ``Q`` of ``b`` queries the score of every reference row is
    ``S = |x|^2 - 2 q.x`` (l2; ``= |q - x|^2 - |q|^2``) or ``S = -q^.x^`` (cosine), one
    ``(b, d) x (d, N)`` matrix product in the input precision (float32 stays float32). The
    ``c = k + max(8, k/4)`` smallest scores per row are taken as candidates and their
    distances recomputed exactly in float64; sorting those gives the answer, which is then
    **proved** correct per row: with ``eps`` a rigorous bound on the rounding error of ``S``
    (``|S - S_exact| <= 2 (gamma_{d+2} + 2u) (|q| + max|x|)^2`` for l2, with ``u`` the unit
    roundoff of the product's dtype), every non-candidate has ``S_exact >= S_c - eps``,
    where ``S_c`` is the largest candidate score; if the ``k``-th exact candidate score is
    below ``S_c - eps`` nothing outside can beat it. Rows that fail the test (ties or
    near-ties at the ``k``-th neighbour: 3 % of the rows of 100k clustered 384-d float32
    vectors, every row of a group of exact copies larger than ``c``) re-rank every row with
    ``S <= s_k + eps``, a superset of the true ``k`` nearest. The ``c`` smallest scores of
    a row are found without a full ``argpartition`` (see :func:`_smallest`). Cost
    ``O(M N d)`` time; extra memory ``O(b N)`` for the block (``max_block_bytes``) plus one
    ``(N, d + 1)`` copy of ``x`` in the product's dtype.
    """
    k = _check_int(k, "k", 1)
    block_rows = _check_int(block_rows, "block_rows", 1)
    max_block_bytes = _check_int(max_block_bytes, "max_block_bytes", 1)
    if metric not in ("l2", "cosine"):
        raise ValueError(f"metric must be 'l2' or 'cosine'; got {metric!r}")
    xa = _float_matrix(x, "x", "(N, d)")
    n, d = xa.shape
    self_query = queries is None
    qa = xa if self_query else _float_matrix(queries, "queries", "(M, d)")
    if qa.shape[1] != d:
        raise ValueError(f"queries must have the same dimension as x: x is (N, {d}), queries is "
                         f"{qa.shape}")
    if d < 1:
        raise ValueError("x must have at least one column (d >= 1)")
    exclude = bool(exclude_self) and self_query
    m = qa.shape[0]
    indices = np.full((m, k), -1, dtype=np.int64)
    distances = np.full((m, k), np.inf, dtype=np.float64)
    if m == 0 or n == 0:
        return indices, distances

    # product precision: float32 only when both sides are float32 and cannot overflow it
    x_norm = _row_norms(xa)
    q_norm = x_norm if self_query else _row_norms(qa)
    xmax, qmax = float(x_norm.max()), float(q_norm.max())
    dt = np.float32 if (xa.dtype == np.float32 and qa.dtype == np.float32
                        and (xmax + qmax) ** 2 < 1e30) else np.float64
    if metric == "cosine":
        for norms, name in ((x_norm, "x"), (q_norm, "queries")):
            if (norms == 0).any():
                raise ValueError(f"{name}: row {int(np.argmin(norms))} is the zero vector, which "
                                 "has no cosine direction")
    u = float(np.finfo(dt).eps) / 2
    gamma = _gamma(d + 2, u)
    # reference side of the score product: S = q' @ A.T
    if metric == "l2":  # A = [-2 x, |x|^2], q' = [q, 1]  ->  S = |x|^2 - 2 q.x
        a_mat = np.empty((n, d + 1), dtype=dt)
        a_mat[:, :d] = xa
        a_mat[:, :d] *= -2
        a_mat[:, d] = x_norm**2
    else:  # A = -x/|x|, q' = q/|q|  ->  S = -cos(q, x)
        a_mat = np.ascontiguousarray(-(xa / x_norm[:, None]), dtype=dt)
    avail = n - 1 if exclude else n
    kk = min(k, avail)
    if kk == 0:
        return indices, distances
    c = min(n, kk + max(8, kk // 4))
    itemsize = np.dtype(dt).itemsize
    b = max(1, min(block_rows, m, max_block_bytes // max(1, n * itemsize)))
    s_buf = np.empty((b, n), dtype=dt)
    mask_buf = np.empty((b, n), dtype=bool)

    for start in range(0, m, b):
        stop = min(m, start + b)
        qn = q_norm[start:stop]
        q64 = qa[start:stop].astype(np.float64)
        if metric == "cosine":
            q64 /= qn[:, None]
            qp = q64.astype(dt)
            err = np.full(stop - start, 2.0 * (gamma + 4 * u))
        else:
            qp = np.empty((stop - start, d + 1), dtype=dt)
            qp[:, :d] = qa[start:stop]
            qp[:, d] = 1
            err = 2.0 * (gamma + 2 * u) * (qn + xmax) ** 2
        s = np.matmul(qp, a_mat.T, out=s_buf[:stop - start])
        rows = np.arange(stop - start)
        if exclude:
            s[rows, start + rows] = np.inf
        cand = _smallest(s, c, mask_buf)
        ex = _exact_scores(xa, x_norm, q64, cand, metric)
        if metric == "l2":
            ex -= (qn**2)[:, None]  # S-space: |q - x|^2 - |q|^2
        if exclude:
            ex[cand == (start + rows)[:, None]] = np.inf
        order = np.lexsort((cand, ex), axis=-1)
        cand = np.take_along_axis(cand, order, axis=1)
        ex = np.take_along_axis(ex, order, axis=1)
        if c < n:
            s_c = np.take_along_axis(s, cand, axis=1).max(axis=1).astype(np.float64)
            redo = np.flatnonzero(~(ex[:, kk - 1] < s_c - err))
            for r in redo:
                more = np.flatnonzero(s[r] <= ex[r, kk - 1] + err[r])
                if exclude:
                    more = more[more != start + r]
                e = _exact_scores(xa, x_norm, q64[r:r + 1], more[None, :], metric)[0]
                if metric == "l2":
                    e -= qn[r] ** 2
                o = np.lexsort((more, e))[:kk]
                cand[r, :kk], ex[r, :kk] = more[o], e[o]
        sel, sc = cand[:, :kk], ex[:, :kk]
        if metric == "l2":
            dist = np.sqrt(np.maximum(sc + (qn**2)[:, None], 0.0))
        else:
            dist = np.sqrt(np.clip(2.0 * (1.0 + sc), 0.0, 4.0))
        indices[start:stop, :kk] = sel
        distances[start:stop, :kk] = dist
    return indices, distances


# ---------------------------------------------------------------------------------- LOF


def _lrd(k_dist: np.ndarray, nbr: np.ndarray, dist: np.ndarray, listed: np.ndarray) -> np.ndarray:
    """Local reachability density ``1 / (mean_o max(k-dist(o), d(p, o)) + LOF_EPS)``."""
    reach = np.maximum(dist, k_dist[np.where(listed, nbr, 0)])
    reach[~listed] = 0.0
    mean = reach.sum(axis=1) / listed.sum(axis=1)
    return 1.0 / (mean + LOF_EPS)


def _lof_ratio(lrd_ref: np.ndarray, nbr: np.ndarray, listed: np.ndarray,
               lrd_p: np.ndarray) -> np.ndarray:
    ratios = lrd_ref[np.where(listed, nbr, 0)] / lrd_p[:, None]
    ratios[~listed] = 0.0
    return ratios.sum(axis=1) / listed.sum(axis=1)


def _k_distance(d: np.ndarray, listed: np.ndarray) -> np.ndarray:
    """Distance to the farthest listed neighbour (the last one, rows being ascending)."""
    last = listed.sum(axis=1) - 1
    return d[np.arange(d.shape[0]), last]


def lof_scores(indices: np.ndarray, distances: np.ndarray) -> np.ndarray:
    """Local Outlier Factor of every row of a pool from its own k-NN graph (Breunig et al. 2000).

    With ``N_k(p)`` the listed neighbours of ``p`` (self excluded) and ``d(p, o)`` their
    distances:

    * ``k-dist(o)`` = distance from ``o`` to its ``k``-th (farthest listed) neighbour;
    * reachability distance ``reach(p, o) = max(k-dist(o), d(p, o))``;
    * local reachability density ``lrd(p) = 1 / (mean_{o in N_k(p)} reach(p, o) + 1e-10)``
      (the ``1e-10``, :data:`LOF_EPS`, is scikit-learn's guard against more than ``k`` exact
      duplicates);
    * ``LOF(p) = mean_{o in N_k(p)} lrd(o) / lrd(p)``.

    ``LOF ~ 1`` inside a cluster, ``> 1`` for points less dense than their neighbours:
    **higher = more outlying**. With an exact graph this equals
    ``-LocalOutlierFactor(n_neighbors=k).fit(X).negative_outlier_factor_`` of scikit-learn.
    Rows with fewer than ``k`` listed neighbours (an ANN search that found fewer) use the
    ones they have. ``O(N k)``.

    Args:
        indices: ``(N, k)`` neighbour rows into this same pool (``-1`` = missing, trailing).
        distances: ``(N, k)`` their distances, ascending.

    Returns:
        ``(N,)`` float64 LOF scores.
    """
    idx, d, listed = _graph(indices, distances, own=True)
    k_dist = _k_distance(d, listed)
    lrd = _lrd(k_dist, idx, d, listed)
    return _lof_ratio(lrd, idx, listed, lrd)


def lof_novelty_scores(
    query_indices: np.ndarray,
    query_distances: np.ndarray,
    ref_indices: np.ndarray,
    ref_distances: np.ndarray,
) -> np.ndarray:
    """LOF in novelty mode: each query scored against the reference set's density.

    The reference set's own graph (``(L, k)``, self excluded) gives ``k-dist(o)`` and
    ``lrd(o)`` of every reference row ``o`` exactly as in :func:`lof_scores`; a query ``q``
    with reference neighbours ``N_k(q)`` (``(M, k)`` rows into the reference set) gets
    ``lrd(q) = 1 / (mean_{o in N_k(q)} max(k-dist(o), d(q, o)) + 1e-10)`` and
    ``LOF(q) = mean_{o in N_k(q)} lrd(o) / lrd(q)``. **Higher = more novel.** Equals
    ``-LocalOutlierFactor(n_neighbors=k, novelty=True).fit(R).score_samples(Q)`` with exact
    graphs (the query graph built with ``exclude_self=False``: a query identical to a
    reference row has it as neighbour at distance 0). ``O((M + L) k)``.

    Returns:
        ``(M,)`` float64 scores.
    """
    ridx, rd, rlisted = _graph(ref_indices, ref_distances, own=True, prefix="ref_")
    qidx, qd, qlisted = _graph(query_indices, query_distances, n_ref=ridx.shape[0],
                               prefix="query_")
    k_dist = _k_distance(rd, rlisted)
    lrd_ref = _lrd(k_dist, ridx, rd, rlisted)
    lrd_q = _lrd(k_dist, qidx, qd, qlisted)
    return _lof_ratio(lrd_ref, qidx, qlisted, lrd_q)


# ------------------------------------------------------------------- distance-based scores


def knn_distance_scores(distances: np.ndarray, how: Literal["kth", "mean"] = "kth") -> np.ndarray:
    """k-NN distance novelty: ``d_k(q)`` (``"kth"``, the farthest of the ``k`` nearest
    reference items) or ``(1/k) sum_i d_i(q)`` (``"mean"``). **Higher = farther from the
    reference set.** Missing neighbours (``+inf``, trailing) are skipped: ``"kth"`` then
    reads the farthest listed one.

    Args:
        distances: ``(N, k)`` ascending distances of each item to its reference neighbours.
        how: ``"kth"`` or ``"mean"``.
    """
    if how not in ("kth", "mean"):
        raise ValueError(f"how must be 'kth' or 'mean'; got {how!r}")
    d, listed = _distance_matrix(distances)
    if how == "kth":
        return _k_distance(d, listed)
    return np.where(listed, d, 0.0).sum(axis=1) / listed.sum(axis=1)


def nearest_distance(distances: np.ndarray) -> np.ndarray:
    """Distance to the nearest reference item, ``d_1(q) = distances[:, 0]`` (the
    ``embedding_distance`` miner: **higher = farther** from everything already labeled)."""
    d, _ = _distance_matrix(distances)
    return d[:, 0].copy()


def typicality_scores(distances: np.ndarray) -> np.ndarray:
    """TypiClust typicality (Hacohen et al. 2022): ``1 / ((1/k) sum_i d_i(x))``, the inverse
    mean distance to the ``k`` nearest neighbours. **Higher = more typical** (denser region).
    A row whose listed neighbours are all at distance 0 scores ``+inf``. Missing neighbours
    (``+inf``, trailing) are skipped.
    """
    d, listed = _distance_matrix(distances)
    mean = np.where(listed, d, 0.0).sum(axis=1) / listed.sum(axis=1)
    with np.errstate(divide="ignore"):
        return 1.0 / mean


def near_duplicate_pairs(
    indices: np.ndarray, distances: np.ndarray, threshold: float
) -> tuple[np.ndarray, np.ndarray]:
    """Unordered pairs of rows at distance ``<= threshold``, read off a pool's k-NN graph.

    Every edge ``i -> j`` with ``d(i, j) <= threshold`` gives the pair ``(min, max)``; an edge
    listed in both directions counts once (with the smaller of its two distances). A row
    listing itself is skipped. Only pairs present in the graph are found: with more than
    ``k + 1`` copies of an item some copy pairs are missing, though every copy is paired
    with ``k`` others.

    Returns:
        ``(pairs (P, 2) int64`` with ``pairs[:, 0] < pairs[:, 1]``, ``distances (P,)
        float64)``, sorted by distance, then by ``i``, then by ``j``.
    """
    try:
        thr = float(threshold)
    except (TypeError, ValueError):
        raise ValueError(f"threshold must be a number; got {threshold!r}") from None
    if not np.isfinite(thr) or thr < 0:
        raise ValueError(f"threshold must be a finite number >= 0; got {threshold!r}")
    idx, d, listed = _graph(indices, distances, own=True, allow_self=True, need_neighbour=False)
    rows = np.broadcast_to(np.arange(idx.shape[0], dtype=np.int64)[:, None], idx.shape)
    keep = listed & (d <= thr) & (idx != rows)
    i, j, dist = rows[keep], idx[keep], d[keep]
    a, b = np.minimum(i, j), np.maximum(i, j)
    order = np.lexsort((dist, b, a))  # by pair, then distance: first of each pair is its min
    a, b, dist = a[order], b[order], dist[order]
    first = np.ones(a.size, dtype=bool)
    first[1:] = (a[1:] != a[:-1]) | (b[1:] != b[:-1])
    a, b, dist = a[first], b[first], dist[first]
    order = np.lexsort((b, a, dist))
    pairs = np.stack([a[order], b[order]], axis=1).astype(np.int64).reshape(-1, 2)
    return pairs, dist[order].astype(np.float64)


def aggregate_seed_neighbours(
    seed_indices: np.ndarray,
    seed_distances: np.ndarray,
    how: Literal["min", "rrf"] = "min",
    rrf_k: int = 60,
) -> tuple[np.ndarray, np.ndarray]:
    """Fuse the k-NN lists of ``S`` seeds into one ranking of candidate rows.

    * ``"min"``: ``score(r) = -min_s d(s, r)`` over the seeds listing ``r`` (higher = closer
      to some seed);
    * ``"rrf"``: reciprocal-rank fusion ``score(r) = sum_s 1 / (rrf_k + rank_s(r))``, with
      ``rank_s(r)`` the 1-based position of ``r`` in seed ``s``'s list and seeds not listing
      ``r`` adding nothing (Cormack et al. 2009).

    Args:
        seed_indices: ``(S, k)`` rows listed by each seed (``-1`` = missing, trailing).
        seed_distances: ``(S, k)`` their distances, ascending per seed.
        how: ``"min"`` or ``"rrf"``.
        rrf_k: the RRF constant, integer ``>= 0``.

    Returns:
        ``(candidate_rows (U,) int64, scores (U,) float64)``: every row listed by at least
        one seed, once, sorted by score (descending), ties by row (ascending).
    """
    if how not in ("min", "rrf"):
        raise ValueError(f"how must be 'min' or 'rrf'; got {how!r}")
    rrf_k = _check_int(rrf_k, "rrf_k", 0)
    idx, d, listed = _graph(seed_indices, seed_distances, prefix="seed_", need_neighbour=False)
    rows_all = idx[listed]
    if rows_all.size == 0:
        return np.empty(0, dtype=np.int64), np.empty(0, dtype=np.float64)
    cand, inv = np.unique(rows_all, return_inverse=True)
    if how == "min":
        best = np.full(cand.size, np.inf)
        np.minimum.at(best, inv, d[listed])
        scores = -best
    else:
        rank = np.broadcast_to(np.arange(1, idx.shape[1] + 1, dtype=np.float64), idx.shape)
        rank = rank[listed]
        # sum each row's terms in rank order, so equal rank multisets give equal scores
        o = np.lexsort((rank, inv))
        scores = np.bincount(inv[o], weights=1.0 / (rrf_k + rank[o]), minlength=cand.size)
    order = np.lexsort((cand, -scores))
    return cand[order].astype(np.int64), scores[order].astype(np.float64)


# --------------------------------------------------------------------- activation-based

# energy_scores (free energy of logits) is a pure measure of predictions: it lives in
# indexing.measures with the other scores and is re-exported here.


def feature_norm_scores(embeddings: np.ndarray, lowest_first: bool = True) -> np.ndarray:
    """Feature-norm activation score: ``||h(x)||_2`` of each embedding row.

    Out-of-distribution inputs tend to produce **low** feature norms, so by default the
    score is ``-||h(x)||_2`` (higher = lower norm = more likely OOD); with
    ``lowest_first=False`` it is ``+||h(x)||_2``. Computed in float64, in row blocks.

    Args:
        embeddings: ``(N, D)`` finite feature vectors.
    """
    h = _float_matrix(embeddings, "embeddings", "(N, D)")
    norms = _row_norms(h)
    return -norms if lowest_first else norms
