"""Deduplication: exact duplicates by content hash, semantic duplicates by SemDeDup.

Exact duplicates
----------------
Every row gets a 128-bit BLAKE2b digest of its content — the bytes of its ``uri`` or
``text`` (UTF-8), of the file a ``uri`` names (:func:`hash_files`, streamed), or of its
vector (:func:`hash_vectors`: float32 little-endian bytes after ``+ 0.0``, so ``-0.0`` and
``0.0`` hash alike). Rows with equal digests form a group; the group keeps one row (the
first by ``priority``, then by row index) and drops the others. Equal digests are taken
as equal content: a collision among ``N`` rows has probability about ``N^2 / 2^129``
(``10^-26`` at 10M rows). Cost ``O(N)`` hashing plus an ``O(N log N)`` sort of the digests.

SemDeDup (Abbas et al. 2023)
----------------------------
1. Rows are L2-normalised; k-means (Euclidean on the unit vectors,
   :func:`miners.clustering.kmeans`) puts them in ``K`` clusters (default
   ``round(N / SEMDEDUP_CLUSTER_ROWS)``; the paper: 50,000 clusters for LAION-440M).
2. Inside each cluster the members are ordered by their cosine similarity to the cluster
   centroid: ``keep="prototypical"`` puts the most similar first, ``"hard"`` the least
   similar first (the authors' released default, ``keep_hard``: the kept row of a group is
   the one farthest from the centroid), ``"random"`` a seeded shuffle.
3. A row is a **semantic duplicate** and dropped when some row before it in that order has
   cosine similarity ``> 1 - eps`` with it (the paper's ``max(triu(S, 1), dim=0) > 1 - eps``
   over the whole cluster, dropped rows included); it names that earlier row with the
   largest similarity (``duplicate_of``). The first row of each group of near-identical
   rows is therefore kept.

Memory: the vectors once more as unit float32 plus, per cluster, a ``(members, block)``
similarity block (``block`` columns at a time, never ``n_c x n_c`` for a large cluster).
Time: k-means (``O(N K d)`` to assign) plus ``sum_c n_c^2 d / 2`` for the clusters.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np

from indexing.settings import SEMDEDUP_CLUSTER_ROWS, SEMDEDUP_EPS
from miners.clustering import kmeans
from miners.mapped import float32_array

__all__ = ["DuplicateGroups", "SemDeDupResult", "exact_duplicates", "hash_files", "hash_items",
           "hash_vectors", "semdedup"]

Progress = Callable[[float, str], None]
Check = Callable[[], None]
_DIGEST = 16
_BLOCK_FLOATS = 1 << 24  # similarity block of a cluster: 64 MB of float32


def _noop_progress(fraction: float, message: str) -> None:
    pass


def _noop_check() -> None:
    pass


# ----------------------------------------------------------------------------- hashing


def _digests(chunks: Iterable[bytes]) -> np.ndarray:
    buf = b"".join(hashlib.blake2b(c, digest_size=_DIGEST).digest() for c in chunks)
    return np.frombuffer(buf, dtype=np.uint64).reshape(-1, 2).copy()


def hash_items(items: Sequence[str | bytes | None]) -> np.ndarray:
    """``(N, 2)`` uint64: the 128-bit BLAKE2b digest of each item's bytes (``str`` as
    UTF-8). ``None`` (no content) gets the all-zero digest and is never a duplicate (see
    :func:`exact_duplicates`'s ``valid``)."""
    out = np.zeros((len(items), 2), dtype=np.uint64)
    rows = [i for i, v in enumerate(items) if v is not None]
    bad = next((i for i in rows if not isinstance(items[i], str | bytes)), None)
    if bad is not None:
        raise ValueError(f"item {bad} is a {type(items[bad]).__name__}; give str or bytes")
    if rows:
        out[rows] = _digests(v.encode("utf-8") if isinstance(v, str) else v for v in (items[i] for i in rows))
    return out


def hash_files(paths: Sequence[str | None], *, chunk: int = 1 << 20, check: Check | None = None) -> np.ndarray:
    """``(N, 2)`` uint64 digests of the files' contents (streamed in ``chunk`` bytes);
    ``None`` paths get the all-zero digest. Raises ValueError naming the row and path of a
    file that cannot be read."""
    check = check or _noop_check
    out = np.zeros((len(paths), 2), dtype=np.uint64)
    for i, p in enumerate(paths):
        if p is None:
            continue
        if i % 256 == 0:
            check()
        h = hashlib.blake2b(digest_size=_DIGEST)
        try:
            with open(p, "rb") as fh:
                while block := fh.read(chunk):
                    h.update(block)
        except OSError as exc:
            raise ValueError(f"row {i}: cannot read {p!r} ({exc.strerror or exc})") from None
        out[i] = np.frombuffer(h.digest(), dtype=np.uint64)
    return out


def hash_vectors(x: np.ndarray, *, block: int = 65_536) -> np.ndarray:
    """``(N, 2)`` uint64 digests of each row's float32 bytes (``+ 0.0`` first: ``-0.0``
    equals ``0.0``). Rows with NaN are rejected (NaN bit patterns differ)."""
    a = np.asarray(x) if not isinstance(x, np.memmap) else x
    if a.ndim != 2:
        raise ValueError(f"vectors must be 2-D (N, d); got shape {a.shape}")
    out = np.empty((len(a), 2), dtype=np.uint64)
    for s in range(0, len(a), block):
        b = np.ascontiguousarray(a[s:s + block], dtype=np.float32) + np.float32(0.0)
        nan = np.isnan(b).any(axis=1)
        if nan.any():
            raise ValueError(f"vectors row {s + int(np.argmax(nan))} has NaN values")
        b = b.astype("<f4", copy=False)
        out[s:s + len(b)] = _digests(bytes(row.data) for row in b)
    return out


@dataclass
class DuplicateGroups:
    """``group``: (N,) group id of each row that has at least one duplicate (``-1``: unique
    or no content); ``keep``: (N,) True for unique rows and each group's kept row;
    ``kept_row``: (N,) the row kept for each row's content (itself when kept, ``-1``
    without content); ``sizes``: rows per group."""

    group: np.ndarray
    keep: np.ndarray
    kept_row: np.ndarray
    sizes: np.ndarray

    @property
    def n_groups(self) -> int:
        return len(self.sizes)

    @property
    def dropped(self) -> np.ndarray:
        return np.flatnonzero(~self.keep)


def exact_duplicates(digests: np.ndarray, *, priority: np.ndarray | None = None,
                     valid: np.ndarray | None = None) -> DuplicateGroups:
    """Group rows by equal digest (module docstring). ``priority``: (N,) the kept row of a
    group is the one with the smallest priority (then the smallest index); ``valid``: rows
    that have content (default: digest not all-zero)."""
    d = np.asarray(digests)
    if d.ndim != 2 or d.shape[1] != 2 or d.dtype != np.uint64:
        raise ValueError(f"digests must be (N, 2) uint64 (hash_items / hash_files / hash_vectors); got "
                         f"{d.dtype} {d.shape}")
    n = len(d)
    ok = (d != 0).any(axis=1) if valid is None else np.asarray(valid, dtype=bool)
    if ok.shape != (n,):
        raise ValueError(f"valid must have shape ({n},)")
    pr = np.zeros(n) if priority is None else np.asarray(priority, dtype=np.float64)
    if pr.shape != (n,) or np.isnan(pr).any():
        raise ValueError(f"priority must be (N,) = ({n},) numbers without NaN")
    rows = np.flatnonzero(ok)
    order = rows[np.lexsort((rows, pr[rows], d[rows, 1], d[rows, 0]))]
    dd = d[order]
    new = np.ones(len(order), dtype=bool)
    new[1:] = (dd[1:] != dd[:-1]).any(axis=1)
    run = np.cumsum(new) - 1
    counts = np.bincount(run) if len(run) else np.zeros(0, dtype=np.int64)
    first = order[new]
    group = np.full(n, -1, dtype=np.int64)
    keep = np.ones(n, dtype=bool)
    kept_row = np.full(n, -1, dtype=np.int64)
    kept_row[order] = first[run]
    dup_runs = counts > 1
    gid = np.full(len(counts), -1, dtype=np.int64)
    gid[dup_runs] = np.arange(int(dup_runs.sum()))
    group[order] = gid[run]
    keep[order] = new | ~dup_runs[run]
    return DuplicateGroups(group, keep, kept_row, counts[dup_runs].astype(np.int64))


# ----------------------------------------------------------------------------- SemDeDup


@dataclass
class SemDeDupResult:
    """Per row: ``cluster``, ``keep``, ``duplicate_of`` (the earlier row it duplicates,
    ``-1`` when kept), ``similarity`` (its largest cosine similarity to an earlier row of
    its cluster's order; ``-inf`` for the first), ``centroid_similarity``; plus
    ``n_clusters``, ``cluster_sizes`` and ``cluster_dropped`` (rows dropped per cluster)."""

    cluster: np.ndarray
    keep: np.ndarray
    duplicate_of: np.ndarray
    similarity: np.ndarray
    centroid_similarity: np.ndarray
    n_clusters: int
    cluster_sizes: np.ndarray
    cluster_dropped: np.ndarray
    stats: dict[str, Any] = field(default_factory=dict)

    @property
    def dropped(self) -> np.ndarray:
        return np.flatnonzero(~self.keep)


def _unit(x: np.ndarray, block: int = 65_536) -> np.ndarray:
    """The rows of ``x`` scaled to unit length (float32), a block at a time; above
    ``MEMMAP_ABOVE_BYTES`` on a memory-mapped temporary file (at 10M x 384 the copy in RAM
    put SemDeDup's server at 20.0 GiB of anonymous memory)."""
    out = float32_array(x.shape, prefix="assay-unit-")
    for s in range(0, len(x), block):
        b = np.asarray(x[s:s + block], dtype=np.float32)
        if not np.isfinite(b).all():
            raise ValueError(f"vectors row {s + int(np.argmin(np.isfinite(b).all(axis=1)))} has NaN or "
                             "infinite values")
        nrm = np.linalg.norm(b.astype(np.float64), axis=1)
        if (nrm == 0).any():
            raise ValueError(f"vectors row {s + int(np.argmax(nrm == 0))} is the zero vector (no direction)")
        out[s:s + len(b)] = b / nrm[:, None]
    return out


def semdedup(x: np.ndarray, *, eps: float = SEMDEDUP_EPS, n_clusters: int | None = None,
             keep: Literal["prototypical", "hard", "random"] = "prototypical", seed: int = 0,
             labels: np.ndarray | None = None, niter: int = 20, progress: Progress | None = None,
             check: Check | None = None) -> SemDeDupResult:
    """SemDeDup (module docstring).

    Args:
        x: ``(N, d)`` embeddings (normalised here).
        eps: pairs with cosine similarity ``> 1 - eps`` are duplicates (``0 <= eps <= 2``).
        n_clusters: k-means clusters (default ``max(1, round(N / SEMDEDUP_CLUSTER_ROWS))``).
        keep: which row of a duplicate group stays: "prototypical" (closest to the
            centroid), "hard" (farthest; the authors' default) or "random" (seeded).
        seed: k-means and the random order.
        labels: ``(N,)`` precomputed cluster ids (skips k-means; centroids = cluster means).
        niter: k-means iterations.
        progress, check: hooks.

    Returns:
        :class:`SemDeDupResult`.
    """
    progress = progress or _noop_progress
    check = check or _noop_check
    a = np.asarray(x) if not isinstance(x, np.memmap) else x
    if a.ndim != 2 or a.dtype.kind not in "fiu":
        raise ValueError(f"x must be a 2-D numeric array (N, d); got {a.dtype} {a.shape}")
    if not (np.isfinite(eps) and 0.0 <= eps <= 2.0):
        raise ValueError(f"eps must be in [0, 2]; got {eps!r}")
    if keep not in ("prototypical", "hard", "random"):
        raise ValueError(f"keep must be 'prototypical', 'hard' or 'random'; got {keep!r}")
    n = len(a)
    t0 = time.perf_counter()
    u = _unit(a)
    if labels is not None:
        lab = np.asarray(labels)
        if lab.shape != (n,) or lab.dtype.kind not in "iu" or (n and lab.min() < 0):
            raise ValueError(f"labels must be non-negative integers of shape ({n},)")
        lab = lab.astype(np.int64)
        k = int(lab.max()) + 1 if n else 0
        cent = np.zeros((k, a.shape[1]))
        np.add.at(cent, lab, u.astype(np.float64))
        cent = (cent / np.maximum(np.bincount(lab, minlength=k), 1)[:, None]).astype(np.float32)
    else:
        k = max(1, round(n / SEMDEDUP_CLUSTER_ROWS)) if n_clusters is None else n_clusters
        if isinstance(k, bool) or not isinstance(k, int | np.integer) or not 1 <= k <= max(1, n):
            raise ValueError(f"n_clusters must be an integer in [1, N = {n}]; got {n_clusters!r}")
        cent, lab, _ = kmeans(u, int(k), seed=seed, niter=niter, progress=lambda f, m: progress(0.5 * f, m),
                              check=check)
        k = int(k)
    t_cluster = time.perf_counter() - t0
    cn = np.linalg.norm(cent.astype(np.float64), axis=1)
    csim = np.empty(n, dtype=np.float64)
    for s in range(0, n, 65_536):
        e = min(n, s + 65_536)
        c = cent[lab[s:e]].astype(np.float64)
        csim[s:e] = np.einsum("ij,ij->i", u[s:e].astype(np.float64), c) / np.maximum(cn[lab[s:e]], 1e-30)
    sizes = np.bincount(lab, minlength=k)
    members = np.argsort(lab, kind="stable")
    starts = np.r_[0, np.cumsum(sizes)]
    keep_mask = np.ones(n, dtype=bool)
    dup_of = np.full(n, -1, dtype=np.int64)
    best_sim = np.full(n, -np.inf)
    dropped = np.zeros(k, dtype=np.int64)
    rng = np.random.default_rng([seed, 47])
    thr = 1.0 - float(eps)
    total_pairs = float((sizes.astype(np.float64) ** 2).sum()) or 1.0
    done_pairs = 0.0
    last = 0.0
    for c in range(k):
        rows = members[starts[c]:starts[c + 1]]
        m = len(rows)
        if m < 2:
            continue
        check()
        if keep == "random":
            rows = rows[rng.permutation(m)]
        else:
            sign = -1.0 if keep == "prototypical" else 1.0
            rows = rows[np.lexsort((rows, sign * csim[rows]))]
        v = u[rows]
        step = max(1, min(m, _BLOCK_FLOATS // m))
        for s in range(1, m, step):
            check()  # one big cluster is O(m^2 d): cancel between its blocks, not only between clusters
            e = min(m, s + step)
            sims = v[:e] @ v[s:e].T  # (e, e - s): rows i < e, columns j in [s, e)
            # keep only i < j (the rows before each column in the order)
            ii = np.arange(e)[:, None]
            jj = np.arange(s, e)[None, :]
            sims[ii >= jj] = -np.inf
            arg = np.argmax(sims, axis=0)
            top = sims[arg, np.arange(e - s)].astype(np.float64)
            cols = rows[s:e]
            best_sim[cols] = top
            dup = top > thr
            keep_mask[cols[dup]] = False
            dup_of[cols[dup]] = rows[arg[dup]]
            now = time.perf_counter()
            if now - last >= 0.5:
                last = now
                part = done_pairs + float(m) * e
                progress(0.5 + 0.5 * min(1.0, part / total_pairs), f"SemDeDup: cluster {c + 1:,} of {k:,}, "
                         f"{int((~keep_mask).sum()):,} duplicates so far")
        dropped[c] = int((~keep_mask[rows]).sum())
        done_pairs += float(m) ** 2
    progress(1.0, f"SemDeDup: {int((~keep_mask).sum()):,} of {n:,} rows are semantic duplicates")
    return SemDeDupResult(lab, keep_mask, dup_of, best_sim, csim, k, sizes.astype(np.int64), dropped,
                          {"cluster_s": t_cluster, "total_s": time.perf_counter() - t0})
