"""Combined selection in one greedy pass, and SEALS candidate restriction (pure NumPy).

``select``: weighted objectives, hard thresholds, group targets and diversity
--------------------------------------------------------------------------------
Given ``N`` rows, the batch is built one pick at a time. Every row ``x`` has

* an **eligibility**: the given ``eligible`` mask (hard thresholds on scores or fields,
  see :func:`threshold_mask`), every weighted objective finite at ``x`` (NaN = not scored,
  never picked), not picked yet, its group still open (below),
  and ``m(x) >= stop_distance`` when a stop distance is given;
* a **utility** ``u(x) = sum_k w_k n_k(s_k(x))``: objective ``k`` gives scores ``s_k``
  (higher = more wanted), normalised over the eligible rows by rank
  (``n(s) = (rank(s) - 1) / (n_e - 1)``, average ranks for ties, ``1`` when ``n_e = 1``),
  min–max (``(s - min) / (max - min)``, ``0`` when constant) or not at all; the strength
  ``w_k`` may be negative (prefer low scores);
* a **distance** ``m(x) = min(d(x, R), min_{p in picks} ||x - p||)``: Euclidean distance
  to the nearest reference row (e.g. the labeled set; ``+inf`` without one) or earlier
  pick (cosine spaces: pass unit vectors);
* the **combined score** ``s(x) = u(x) + lambda min(1, m(x) / scale)``, ``lambda`` the
  diversity strength, ``scale`` the distance that counts as "far" (default: the largest
  finite initial ``m`` over eligible rows when a reference is given, else the largest
  distance of an eligible row to their mean).

Each step picks ``argmax s(x)`` over eligible rows; ties go to the row that comes first
in a permutation drawn from ``seed`` (so without any objective the batch is a seeded
random sample). **Group targets**: with ``groups`` (a group id per row: a class, a
metadata value) and ``targets`` (counts, or fractions of ``size`` rounded by the largest
remainder), a group closes once it holds its target; when every open group is exhausted
or closed before ``size`` picks, the rest of the batch is drawn from all eligible rows
(``fill=True``) or the selection stops. The selection also stops when no eligible row is
left (e.g. every row is within ``stop_distance`` of a pick).

Cost. Without diversity (``lambda = 0`` and no stop distance) it is one sort,
``O(N log N)``. With it, ``m`` must follow the picks: **eager** updates stream the
``N x d`` vectors once per pick (``O(N b d)`` time, ``O(N)`` extra memory, the k-center
bound), **lazy** updates exploit that ``m`` only decreases, so a stale ``s`` is an upper
bound: rows are visited in order of their stale key and only the visited row is brought up
to date (distances to the picks made since it was last visited); it is picked when its
fresh key still beats every other bound. When the utility dominates, a pick costs a few
visits instead of a pass over ``N``. Should a step visit more than ``lazy_budget`` rows,
every row is brought up to date at once (the eager cost of the picks so far) and the
remaining picks are eager. Both give the same picks: squared distances are computed the
same way (float32 ``|x|^2 + |p|^2 - 2 x.p`` per row with one BLAS dot per row pair,
clamped at 0) and keys the same way (float64).

SEALS (Coleman et al. 2022)
---------------------------
Selection via proxy-based active learning at scale restricts the candidates of any miner
to ``union_{l in L} kNN_k(l)``: the ``k`` nearest unlabeled rows of every labeled row
(``k = 100`` in the paper), found with the k-NN graph engine (exact or FAISS IVF with its
recall measured). The candidate set grows with the labeled set, so selection costs
``O(|L| k)`` scores instead of ``O(N)``.
"""

from __future__ import annotations

import heapq
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np

from indexing.settings import SEALS_K, SELECT_LAZY_BUDGET
from miners.diversity import _n_threads, _ParallelRowDots, _rowdot

__all__ = ["Objective", "Selection", "normalize_scores", "seals_candidates", "select",
           "target_counts", "threshold_mask"]

Progress = Callable[[float, str], None]
Check = Callable[[], None]
_BLOCK_ROWS = 65_536  # rows per block of the O(N d) passes (norms, centring)


# ----------------------------------------------------------------------------- inputs


@dataclass(frozen=True)
class Objective:
    """One weighted objective: ``scores`` (N,) higher = more wanted (NaN: not scored, the
    row is not eligible), ``weight`` its strength (negative: prefer low scores),
    ``normalize`` "rank", "minmax" or "none", ``name`` for reports."""

    scores: np.ndarray
    weight: float = 1.0
    normalize: Literal["rank", "minmax", "none"] = "rank"
    name: str = ""


@dataclass
class Selection:
    """The picks in order: ``rows`` (int64), their combined ``score``, ``utility`` and
    ``distance`` (``m`` when picked; ``+inf`` without reference and before the first pick)
    at the moment they were picked; ``group_counts`` picks per group (when groups were
    given); ``stopped``: "size", "exhausted" (no eligible row left) or "targets" (groups
    closed and ``fill=False``); ``stats``: mode, visits, refreshes."""

    rows: np.ndarray
    score: np.ndarray
    utility: np.ndarray
    distance: np.ndarray
    group_counts: np.ndarray | None = None
    stopped: str = "size"
    stats: dict[str, Any] = field(default_factory=dict)


def threshold_mask(values: np.ndarray, *, min: float | None = None,  # noqa: A002
                   max: float | None = None, isin: Sequence[Any] | None = None,  # noqa: A002
                   name: str = "values") -> np.ndarray:
    """Rows passing a hard threshold: ``min <= v <= max`` (either bound optional) and/or
    ``v in isin``; NaN never passes a numeric bound. Combine masks with ``&``."""
    v = np.asarray(values)
    if v.ndim != 1:
        raise ValueError(f"{name} must be 1-D (one value per row); got shape {v.shape}")
    ok = np.ones(len(v), dtype=bool)
    if min is not None or max is not None:
        if v.dtype.kind not in "biuf":
            raise ValueError(f"{name}: numeric bounds need numbers; got dtype {v.dtype}")
        f = v.astype(np.float64)
        ok &= ~np.isnan(f)
        if min is not None:
            ok &= f >= float(min)
        if max is not None:
            ok &= f <= float(max)
    if isin is not None:
        ok &= np.isin(v, np.asarray(list(isin), dtype=v.dtype if v.dtype.kind in "biuf" else object))
    return ok


def normalize_scores(scores: np.ndarray, how: str, mask: np.ndarray | None = None) -> np.ndarray:
    """Scores normalised over the rows of ``mask`` (default all): "rank" gives
    ``(average rank - 1) / (n - 1)`` in [0, 1] (1.0 when n = 1), "minmax" ``(s - min) /
    (max - min)`` (0 when constant), "none" the scores. Rows outside ``mask`` get NaN."""
    s = np.asarray(scores, dtype=np.float64)
    m = np.ones(len(s), dtype=bool) if mask is None else mask
    out = np.full(len(s), np.nan)
    vals = s[m]
    if how == "none":
        out[m] = vals
    elif how == "minmax":
        if vals.size:
            lo, hi = float(vals.min()), float(vals.max())
            out[m] = (vals - lo) / (hi - lo) if hi > lo else 0.0
    elif how == "rank":
        if vals.size == 1:
            out[m] = 1.0
        elif vals.size:
            from scipy.stats import rankdata

            out[m] = (rankdata(vals, method="average") - 1.0) / (vals.size - 1)
    else:
        raise ValueError(f"normalize must be 'rank', 'minmax' or 'none'; got {how!r}")
    return out


def target_counts(targets: Mapping[int, float] | Sequence[float] | np.ndarray, size: int,
                  n_groups: int, kind: Literal["count", "fraction"] = "count") -> np.ndarray:
    """Per-group targets as counts (``n_groups`` entries; groups not named get 0).
    Fractions (each in [0, 1], summing to at most 1) become ``floor(f size)`` plus one for
    the groups with the largest remainders until ``round(sum f * size)`` is reached
    (ties: the smaller group id)."""
    t = np.zeros(n_groups, dtype=np.float64)
    if isinstance(targets, Mapping):
        for g, v in targets.items():
            if isinstance(g, bool) or not isinstance(g, int | np.integer) or not 0 <= int(g) < n_groups:
                raise ValueError(f"targets: group {g!r} is not a group id in [0, {n_groups})")
            t[int(g)] = float(v)
    else:
        arr = np.asarray(targets, dtype=np.float64)
        if arr.ndim != 1 or len(arr) > n_groups:
            raise ValueError(f"targets must have at most one entry per group ({n_groups}); "
                             f"got shape {arr.shape}")
        t[:len(arr)] = arr
    if not np.isfinite(t).all() or (t < 0).any():
        raise ValueError("targets must be finite and >= 0")
    if kind == "count":
        if (t != np.floor(t)).any():
            raise ValueError("target counts must be whole numbers (use kind='fraction' for shares)")
        return t.astype(np.int64)
    if kind != "fraction":
        raise ValueError(f"kind must be 'count' or 'fraction'; got {kind!r}")
    if (t > 1).any() or t.sum() > 1 + 1e-9:
        raise ValueError(f"target fractions must each be in [0, 1] and sum to at most 1; sum is {t.sum():g}")
    raw = t * size
    base = np.floor(raw + 1e-9).astype(np.int64)
    want = int(round(float(t.sum()) * size))
    extra = max(0, want - int(base.sum()))
    order = np.lexsort((np.arange(n_groups), -(raw - base)))
    base[order[:extra]] += 1
    return base


# ----------------------------------------------------------------------------- helpers


def _noop_progress(fraction: float, message: str) -> None:
    pass


def _noop_check() -> None:
    pass


def _row_sq(x: np.ndarray) -> np.ndarray:
    out = np.empty(len(x), dtype=np.float32)
    for s in range(0, len(x), _BLOCK_ROWS):
        blk = np.asarray(x[s:s + _BLOCK_ROWS], dtype=np.float32)
        np.einsum("ij,ij->i", blk, blk, out=out[s:s + len(blk)])
    if not np.isfinite(out).all():
        row = int(np.argmin(np.isfinite(out)))
        raise ValueError(f"vectors row {row} has NaN or infinite values")
    return out


def _radius_from_mean(x: np.ndarray, rows: np.ndarray) -> float:
    """Largest distance of ``x[rows]`` to their mean (float64, in blocks)."""
    if not len(rows):
        return 0.0
    mean = np.zeros(x.shape[1])
    for s in range(0, len(rows), _BLOCK_ROWS):
        mean += np.asarray(x[rows[s:s + _BLOCK_ROWS]], dtype=np.float64).sum(axis=0)
    mean /= len(rows)
    top = 0.0
    for s in range(0, len(rows), _BLOCK_ROWS):
        d = np.asarray(x[rows[s:s + _BLOCK_ROWS]], dtype=np.float64) - mean
        top = max(top, float(np.sqrt(np.einsum("ij,ij->i", d, d).max())))
    return top


class _Groups:
    """Open/closed state of the group targets."""

    def __init__(self, groups: np.ndarray | None, targets: np.ndarray | None, fill: bool) -> None:
        self.groups = groups
        self.targets = targets
        self.fill = fill
        self.counts = None if groups is None else np.zeros(len(targets), dtype=np.int64)
        self.phase = 1 if groups is not None else 2  # 1: targets enforced, 2: free

    def open(self, row: int) -> bool:
        if self.phase == 2:
            return True
        g = self.groups[row]
        return bool(self.counts[g] < self.targets[g])

    def open_mask(self) -> np.ndarray | None:
        if self.phase == 2:
            return None
        return (self.counts < self.targets)[self.groups]

    def add(self, row: int) -> None:
        if self.counts is not None:
            self.counts[self.groups[row]] += 1

    def all_closed(self) -> bool:
        return self.phase == 1 and bool((self.counts >= self.targets).all())


# ----------------------------------------------------------------------------- select


def select(
    size: int,
    *,
    objectives: Sequence[Objective] = (),
    eligible: np.ndarray | None = None,
    groups: np.ndarray | None = None,
    targets: Mapping[int, float] | Sequence[float] | np.ndarray | None = None,
    target_kind: Literal["count", "fraction"] = "count",
    fill: bool = True,
    vectors: np.ndarray | None = None,
    reference: np.ndarray | None = None,
    reference_distances: np.ndarray | None = None,
    diversity: float = 0.0,
    stop_distance: float | None = None,
    distance_scale: float | None = None,
    seed: int = 0,
    mode: Literal["auto", "lazy", "eager"] = "auto",
    lazy_budget: int | None = None,
    progress: Progress | None = None,
    check: Check | None = None,
) -> Selection:
    """Pick up to ``size`` rows greedily by weighted objectives, hard thresholds, group
    targets and diversity (module docstring for the definitions).

    Args:
        size: picks wanted (``>= 0``); fewer come back when the eligible rows run out.
        objectives: :class:`Objective` list, each ``(N,)`` scores with a strength.
        eligible: ``(N,)`` bool, rows allowed at all (hard thresholds).
        groups: ``(N,)`` non-negative int group of every row (class, metadata value).
        targets: per-group targets (sequence indexed by group, or ``{group: target}``);
            groups not named get 0 (closed until the fill phase).
        target_kind: "count" or "fraction" (of ``size``).
        fill: after every group closed or ran dry, keep picking from all eligible rows.
        vectors: ``(N, d)`` float vectors (needed for ``diversity`` and ``stop_distance``).
        reference: ``(L, d)`` reference vectors (e.g. the labeled set): ``m`` starts at the
            distance to the nearest one (k-NN graph engine, :func:`miners.knn.knn_search`).
        reference_distances: ``(N,)`` the same distances when already known (``+inf``: none).
        diversity: ``lambda >= 0``, the strength of ``min(1, m / scale)``.
        stop_distance: rows closer than this to a reference row or a pick are never picked.
        distance_scale: the ``scale`` above (default: see the module docstring).
        seed: the tie-breaking permutation.
        mode: "auto" (lazy, eager once a step visits more than ``lazy_budget`` rows), "lazy"
            or "eager" (tests compare them).
        lazy_budget: visits per step before switching to eager (default
            ``max(SELECT_LAZY_BUDGET, N / 64)``).
        progress: ``progress(fraction, message)``, at most twice a second.
        check: called between picks; raise in it to cancel.

    Returns:
        :class:`Selection`.

    Raises:
        ValueError: shapes that disagree, NaN/inf vectors, negative strengths, bad targets.
    """
    progress = progress or _noop_progress
    check = check or _noop_check
    if isinstance(size, bool) or not isinstance(size, int | np.integer) or size < 0:
        raise ValueError(f"size must be an integer >= 0; got {size!r}")
    size = int(size)
    n = _infer_n(objectives, eligible, groups, vectors, reference_distances)
    ok = np.ones(n, dtype=bool) if eligible is None else _bool_vector(eligible, n, "eligible")
    raw: list[np.ndarray] = []
    for k, obj in enumerate(objectives):
        s = np.asarray(obj.scores, dtype=np.float64)
        if s.shape != (n,):
            raise ValueError(f"objective {k} ({obj.name or 'unnamed'}): scores must have shape ({n},); "
                             f"got {s.shape}")
        if not np.isfinite(float(obj.weight)):
            raise ValueError(f"objective {k}: weight must be finite; got {obj.weight!r}")
        if np.isinf(s).any():
            raise ValueError(f"objective {k} ({obj.name or 'unnamed'}): row {int(np.argmax(np.isinf(s)))} "
                             "is infinite (use NaN for 'not scored')")
        raw.append(s)
        if obj.weight != 0:
            ok &= ~np.isnan(s)
    if not (np.isfinite(diversity) and diversity >= 0):
        raise ValueError(f"diversity must be a finite number >= 0; got {diversity!r}")
    if stop_distance is not None and not (np.isfinite(stop_distance) and stop_distance >= 0):
        raise ValueError(f"stop_distance must be a finite number >= 0; got {stop_distance!r}")
    if mode not in ("auto", "lazy", "eager"):
        raise ValueError(f"mode must be 'auto', 'lazy' or 'eager'; got {mode!r}")
    uses_space = diversity > 0 or stop_distance is not None
    x = None
    if vectors is not None:
        x = np.asarray(vectors) if not isinstance(vectors, np.memmap) else vectors
        if x.ndim != 2 or x.shape[0] != n or x.dtype.kind != "f":
            raise ValueError(f"vectors must be a float (N, d) array with N = {n}; got {x.dtype} {x.shape}")
    if uses_space and x is None:
        raise ValueError("diversity and stop_distance need vectors")

    # groups and targets
    gstate = _Groups(None, None, fill)
    if groups is not None:
        g = np.asarray(groups)
        if g.shape != (n,) or g.dtype.kind not in "iu":
            raise ValueError(f"groups must be an integer array of shape ({n},); got {g.dtype} {g.shape}")
        if len(g) and g.min() < 0:
            raise ValueError(f"groups must be >= 0; row {int(np.argmin(g))} is {int(g.min())}")
        if targets is None:
            raise ValueError("groups need targets (counts or fractions per group)")
        n_groups = int(g.max()) + 1 if len(g) else 0
        if isinstance(targets, Mapping) and targets:
            n_groups = max(n_groups, max(int(k) for k in targets) + 1)
        elif not isinstance(targets, Mapping):
            n_groups = max(n_groups, len(np.asarray(targets)))
        tc = target_counts(targets, size, n_groups, target_kind)
        gstate = _Groups(g.astype(np.int64), tc, fill)
    elif targets is not None:
        raise ValueError("targets need groups (a group id per row)")

    # utility over the eligible rows
    util = np.zeros(n)
    for obj, s in zip(objectives, raw, strict=True):
        if obj.weight != 0:
            util += float(obj.weight) * np.nan_to_num(normalize_scores(s, obj.normalize, ok), nan=0.0)
    tie = np.empty(n, dtype=np.int64)
    tie[np.random.default_rng(seed).permutation(n)] = np.arange(n)

    if not uses_space:
        return _select_static(size, util, tie, ok, gstate)

    # distances to the reference set
    m = np.full(n, np.inf)
    if reference_distances is not None:
        rd = np.asarray(reference_distances, dtype=np.float64)
        if rd.shape != (n,) or np.isnan(rd).any() or (rd < 0).any():
            raise ValueError(f"reference_distances must be (N,) = ({n},) numbers >= 0 (+inf: none)")
        m = rd.copy()
    elif reference is not None and len(reference):
        from miners.knn import knn_search

        ref = np.ascontiguousarray(reference, dtype=np.float32)
        if ref.ndim != 2 or ref.shape[1] != x.shape[1]:
            raise ValueError(f"reference must be (L, {x.shape[1]}); got {ref.shape}")
        progress(0.0, f"distances of {n:,} rows to {len(ref):,} reference rows")
        res = knn_search(ref, 1, queries=np.asarray(x, dtype=np.float32), exclude_self=False,
                         progress=lambda f, msg: progress(0.3 * f, msg), check=check)
        m = res.distances[:, 0].astype(np.float64)
    if distance_scale is None:
        fin = m[ok & np.isfinite(m)]
        scale = float(fin.max()) if fin.size else _radius_from_mean(x, np.flatnonzero(ok))
    else:
        if not (np.isfinite(distance_scale) and distance_scale > 0):
            raise ValueError(f"distance_scale must be a finite number > 0; got {distance_scale!r}")
        scale = float(distance_scale)
    scale = scale if scale > 0 else 1.0
    if stop_distance is not None:
        ok &= m >= stop_distance
    run = _Greedy(x, util, tie, ok, m, float(diversity), scale, stop_distance, gstate, size,
                  progress, check, mode, lazy_budget)
    return run.run()


def _infer_n(objectives: Sequence[Objective], *arrays: Any) -> int:
    for obj in objectives:
        return len(np.asarray(obj.scores))
    for a in arrays:
        if a is not None:
            return len(a)
    raise ValueError("select needs at least one of objectives, eligible, groups, vectors or "
                     "reference_distances (to know the rows)")


def _bool_vector(v: np.ndarray, n: int, name: str) -> np.ndarray:
    a = np.asarray(v)
    if a.shape != (n,) or a.dtype != bool:
        raise ValueError(f"{name} must be a boolean array of shape ({n},); got {a.dtype} {a.shape}")
    return a.copy()


def _select_static(size: int, util: np.ndarray, tie: np.ndarray, ok: np.ndarray,
                   gs: _Groups) -> Selection:
    """No distances: the order is fixed (utility desc, tie rank asc); walk it."""
    rows = np.flatnonzero(ok)
    order = rows[np.lexsort((tie[rows], -util[rows]))]
    picks: list[int] = []
    taken = np.zeros(len(util), dtype=bool)
    stopped = "size"
    if gs.groups is not None:
        counts = gs.counts
        for r in order:
            if len(picks) == size:
                break
            g = gs.groups[r]
            if counts[g] < gs.targets[g]:
                picks.append(int(r))
                taken[r] = True
                counts[g] += 1
        if len(picks) < size:
            if gs.fill:
                gs.phase = 2
                for r in order:
                    if len(picks) == size:
                        break
                    if not taken[r]:
                        picks.append(int(r))
                        gs.add(int(r))
            else:
                stopped = "targets"
    else:
        picks = order[:size].tolist()
    if len(picks) < size and stopped == "size":
        stopped = "exhausted"
    p = np.asarray(picks, dtype=np.int64)
    return Selection(p, util[p].copy(), util[p].copy(), np.full(len(p), np.inf),
                     None if gs.counts is None else gs.counts.copy(), stopped, {"mode": "static"})


class _Greedy:
    """The greedy loop with distances (lazy, then eager when laziness stops paying)."""

    def __init__(self, x: np.ndarray, util: np.ndarray, tie: np.ndarray, ok: np.ndarray,
                 m: np.ndarray, lam: float, scale: float, stop: float | None, gs: _Groups,
                 size: int, progress: Progress, check: Check, mode: str, budget: int | None) -> None:
        self.x, self.util, self.tie, self.ok, self.m = x, util, tie, ok, m
        self.lam, self.scale, self.stop, self.gs, self.size = lam, scale, stop, gs, size
        self.progress, self.check, self.mode = progress, check, mode
        n = len(util)
        self.budget = int(budget) if budget is not None else max(SELECT_LAZY_BUDGET, n // 64)
        self.xx = _row_sq(x)
        self.pvec = np.empty((max(size, 1), x.shape[1]), dtype=np.float32)
        self.psq = np.empty(max(size, 1), dtype=np.float32)
        self.npicks = 0
        self.seen = np.zeros(n, dtype=np.int64)  # picks already folded into m[row]
        self.picks: list[int] = []
        self.scores: list[float] = []
        self.dists: list[float] = []
        self.stats: dict[str, Any] = {"visits": 0, "refresh_pairs": 0, "eager_picks": 0, "switched_at": None}
        self.t0 = time.perf_counter()
        self.last = 0.0

    # keys ----------------------------------------------------------------------------

    def key(self, rows: np.ndarray | int) -> np.ndarray | float:
        return self.util[rows] + self.lam * np.minimum(1.0, self.m[rows] / self.scale)

    def _fold(self, rows: np.ndarray, start: int) -> None:
        """Bring ``m[rows]`` up to date with picks ``start .. npicks-1`` (the rows share
        ``seen == start``). Squared distances exactly as the eager pass computes them."""
        end = self.npicks
        if start >= end or not len(rows):
            return
        if len(rows) == 1:
            r = int(rows[0])
            d = np.empty(end - start, dtype=np.float32)
            _rowdot(self.pvec[start:end], np.asarray(self.x[r], dtype=np.float32), d)
            d2 = self.xx[r] + self.psq[start:end] - np.float32(2.0) * d
            np.maximum(d2, np.float32(0.0), out=d2)
            self.m[r] = min(float(self.m[r]), float(np.sqrt(d2.astype(np.float64)).min()))
        else:
            sub = np.asarray(self.x[rows], dtype=np.float32)
            xx = self.xx[rows]
            best = self.m[rows]
            d = np.empty(len(rows), dtype=np.float32)
            for j in range(start, end):
                _rowdot(sub, self.pvec[j], d)
                d2 = xx + self.psq[j] - np.float32(2.0) * d
                np.maximum(d2, np.float32(0.0), out=d2)
                np.minimum(best, np.sqrt(d2.astype(np.float64)), out=best)
            self.m[rows] = best
        self.stats["refresh_pairs"] += (end - start) * len(rows)
        self.seen[rows] = end

    def refresh(self, row: int) -> None:
        s = int(self.seen[row])
        if s < self.npicks:
            self._fold(np.array([row]), s)

    def eligible_now(self, row: int) -> bool:
        if self.stop is not None and self.m[row] < self.stop:
            self.ok[row] = False
            return False
        return True

    # picking -------------------------------------------------------------------------

    def take(self, row: int) -> None:
        self.picks.append(row)
        self.scores.append(float(self.key(row)))
        self.dists.append(float(self.m[row]))
        self.ok[row] = False
        self.gs.add(row)
        v = np.asarray(self.x[row], dtype=np.float32)
        self.pvec[self.npicks] = v
        self.psq[self.npicks] = self.xx[row]
        self.npicks += 1
        now = time.perf_counter()
        if now - self.last >= 0.5:
            self.last = now
            self.progress(0.3 + 0.7 * len(self.picks) / max(1, self.size),
                          f"select: {len(self.picks):,} of {self.size:,} picks")

    def _phase_mask(self) -> np.ndarray:
        mask = self.ok.copy()
        om = self.gs.open_mask()
        if om is not None:
            mask &= om
        return mask

    def _next_phase(self) -> bool:
        """Called when phase 1 has no candidate left: switch to the fill phase or stop."""
        if self.gs.phase == 1 and self.gs.fill:
            self.gs.phase = 2
            return True
        return False

    def run(self) -> Selection:
        stopped = "size"
        lazy = self.mode != "eager"
        while len(self.picks) < self.size:
            self.check()
            outcome = self._lazy_until_switch() if lazy else self._eager_steps()
            if outcome == "switch":
                lazy = False
                continue
            if outcome == "done":
                break
            # "empty": no candidate in this phase
            if not self._next_phase():
                stopped = "targets" if self.gs.phase == 1 and not self.gs.fill and self.gs.groups is not None \
                    else "exhausted"
                break
        if len(self.picks) < self.size and stopped == "size":
            stopped = "exhausted"
        self.stats["mode"] = "eager" if self.mode == "eager" else (
            "lazy" if self.stats["switched_at"] is None else "lazy+eager")
        self.stats["seconds"] = time.perf_counter() - self.t0
        p = np.asarray(self.picks, dtype=np.int64)
        return Selection(p, np.asarray(self.scores), self.util[p].copy(), np.asarray(self.dists),
                         None if self.gs.counts is None else self.gs.counts.copy(), stopped, self.stats)

    # lazy ----------------------------------------------------------------------------

    def _lazy_until_switch(self) -> str:
        """Lazy greedy for the current phase. Returns "done" (size reached), "empty" (no
        candidate left in this phase) or "switch" (a step visited too many rows: every row
        was brought up to date; continue eagerly)."""
        rows = np.flatnonzero(self._phase_mask())
        if not len(rows):
            return "empty"
        keys = self.key(rows)
        perm = np.lexsort((self.tie[rows], -keys))
        order, okeys = rows[perm], keys[perm]  # stale keys: upper bounds from now on
        pos = 0
        heap: list[tuple[float, int, int]] = []  # (-key, tie, row) of visited rows

        def top() -> tuple[float, int, int] | None:
            nonlocal pos
            while pos < len(order) and not (self.ok[order[pos]] and self.gs.open(int(order[pos]))):
                pos += 1
            best = None
            if pos < len(order):
                r = int(order[pos])
                best = (-float(okeys[pos]), int(self.tie[r]), r)
            while heap and not (self.ok[heap[0][2]] and self.gs.open(heap[0][2])):
                heapq.heappop(heap)
            if heap and (best is None or heap[0] < best):
                return heap[0]
            return best

        while len(self.picks) < self.size:
            self.check()
            visits = 0
            while True:
                cand = top()
                if cand is None:
                    return "empty"
                _, _, r = cand
                if heap and heap[0][2] == r and heap[0] == cand:
                    heapq.heappop(heap)
                else:
                    pos += 1
                visits += 1
                self.stats["visits"] += 1
                self.refresh(r)
                if not self.eligible_now(r):
                    continue
                fresh = (-float(self.key(r)), int(self.tie[r]), r)
                nxt = top()
                if nxt is None or fresh <= nxt:
                    self.take(r)
                    break
                heapq.heappush(heap, fresh)
                if self.mode == "auto" and visits > self.budget:
                    self.stats["switched_at"] = len(self.picks)
                    self._sync_all()
                    return "switch"
            if self.gs.phase == 1 and self.gs.all_closed():
                return "empty"
        return "done"

    def _sync_all(self) -> None:
        """Fold every pending pick into every live row (the eager cost of the picks so far)."""
        live = np.flatnonzero(self.ok)
        if not len(live):
            return
        seen = self.seen[live]
        done = 0
        for s in np.unique(seen):
            grp = live[seen == s]
            for b in range(0, len(grp), _BLOCK_ROWS):
                self.check()  # a pass over every row: cancel and progress per block
                self._fold(grp[b:b + _BLOCK_ROWS], int(s))
                done += len(grp[b:b + _BLOCK_ROWS])
                now = time.perf_counter()
                if now - self.last >= 0.5:
                    self.last = now
                    self.progress(0.3 + 0.7 * len(self.picks) / max(1, self.size),
                                  f"select: {len(self.picks):,} of {self.size:,} picks; bringing every row "
                                  f"up to date (lazy to eager): {done:,} of {len(live):,} rows")

    # eager ---------------------------------------------------------------------------

    def _eager_steps(self) -> str:
        x = self.x
        n = len(self.util)
        dots = _ParallelRowDots(np.ascontiguousarray(x, dtype=np.float32), _n_threads()) \
            if not isinstance(x, np.memmap) else None
        try:
            # all live rows are up to date: seen == npicks for them
            live = np.flatnonzero(self.ok)
            pending = [s for s in np.unique(self.seen[live]) if s < self.npicks]
            for s in pending:
                grp = live[self.seen[live] == s]
                self._fold(grp, int(s))
            while len(self.picks) < self.size:
                self.check()
                mask = self._phase_mask()
                if self.stop is not None:
                    mask &= self.m >= self.stop
                    self.ok &= self.m >= self.stop
                if not mask.any():
                    return "empty"
                keys = np.where(mask, self.key(np.arange(n)), -np.inf)
                best = keys.max()
                cand = np.flatnonzero(keys == best)
                r = int(cand[np.argmin(self.tie[cand])]) if len(cand) > 1 else int(cand[0])
                self.take(r)
                self.stats["eager_picks"] += 1
                if len(self.picks) == self.size:
                    break
                # fold the new pick into every live row
                j = self.npicks - 1
                if dots is not None:
                    d = dots(self.pvec[j])
                else:
                    d = np.empty(n, dtype=np.float32)
                    for s in range(0, n, _BLOCK_ROWS):
                        _rowdot(np.asarray(x[s:s + _BLOCK_ROWS], dtype=np.float32), self.pvec[j],
                                d[s:s + _BLOCK_ROWS])
                d2 = self.xx + self.psq[j] - np.float32(2.0) * d
                np.maximum(d2, np.float32(0.0), out=d2)
                np.minimum(self.m, np.sqrt(d2.astype(np.float64)), out=self.m)
                self.seen[:] = self.npicks
                self.stats["refresh_pairs"] += n
                if self.gs.phase == 1 and self.gs.all_closed():
                    return "empty"
            return "done"
        finally:
            if dots is not None:
                dots.close()


# ----------------------------------------------------------------------------- SEALS


def seals_candidates(pool: np.ndarray, labeled: np.ndarray, k: int = SEALS_K, *,
                     method: str = "auto", target_recall: float | None = None, seed: int = 0,
                     progress: Progress | None = None, check: Check | None = None,
                     stats: dict[str, Any] | None = None) -> np.ndarray:
    """SEALS candidate restriction: the pool rows among the ``k`` nearest pool rows of some
    labeled row, ``union_{l in labeled} kNN_k(l)``, sorted ascending (module docstring).

    Args:
        pool: ``(N, d)`` float32 vectors of the unlabeled pool (unit vectors for cosine).
        labeled: ``(L, d)`` vectors of the labeled rows (same space).
        k: neighbours per labeled row (the paper: 100).
        method, target_recall, seed: passed to :func:`miners.knn.knn_search`.
        progress, check: hooks of the graph search.
        stats: filled with the graph's ``GraphInfo`` (``stats["graph"]``).

    Returns:
        ``(U,)`` int64 pool rows, ``U <= min(N, L k)``; empty when there are no labeled rows.
    """
    from miners.knn import TARGET_RECALL, knn_search

    x = np.asarray(pool) if not isinstance(pool, np.memmap) else pool
    if x.ndim != 2 or x.dtype != np.float32:
        raise ValueError(f"pool must be a 2-D float32 array; got {x.dtype} {x.shape}")
    lab = np.ascontiguousarray(labeled, dtype=np.float32)
    if lab.ndim != 2 or (len(lab) and lab.shape[1] != x.shape[1]):
        raise ValueError(f"labeled must be (L, {x.shape[1]}); got {lab.shape}")
    if isinstance(k, bool) or not isinstance(k, int | np.integer) or k < 1:
        raise ValueError(f"k must be an integer >= 1; got {k!r}")
    if not len(lab) or not len(x):
        return np.empty(0, dtype=np.int64)
    res = knn_search(x, int(min(k, len(x))), queries=lab, exclude_self=False, method=method,
                     target_recall=TARGET_RECALL if target_recall is None else target_recall, seed=seed,
                     progress=progress or _noop_progress, check=check or _noop_check)
    if stats is not None:
        stats["graph"] = res.info.to_dict()
    rows = res.indices[res.indices >= 0]
    return np.unique(rows).astype(np.int64)
