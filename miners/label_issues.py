"""Label issues: confident learning, outliers among labeled rows, and near-duplicate pairs
that leak across splits or disagree on their label.

Confident learning (Northcutt, Jiang & Chuang 2021, JAIR 70)
-------------------------------------------------------------
Inputs: given (possibly noisy) labels ``y~_i in [0, C)`` and **out-of-sample** predicted
probabilities ``p_i`` (cross-validated, or from a model that never trained on row ``i``).

* **Self-confidence** ``p_i[y~_i]``; **normalised margin** ``p_i[y~_i] - max_{j != y~_i} p_i[j]``
  (in [-1, 1]). Low values rank label issues first.
* **Per-class thresholds** ``t_j = mean_{i : y~_i = j} p_i[j]``: the average self-confidence
  of the rows labeled ``j`` (a class nobody is labeled with gets ``+inf``: never confident).
* **Confident joint** ``C[i][j] = |{x : y~ = i, y*(x) = j}|`` where row ``x`` is counted
  with the *confident* class ``y*(x) = argmax_{j : p_x[j] >= t_j} p_x[j]``; a row with no
  class above its threshold is not counted. ``convention="cleanlab"`` reproduces cleanlab's
  code instead: ``p >= t - 1e-6``, with two or more confident classes the overall
  ``argmax p`` (confident or not), and every diagonal entry raised to at least 1.
* **Calibration** (the paper's Eq. 3): ``C~[i][j] = C[i][j] / sum_j' C[i][j'] * |X_{y~=i}|``,
  then scaled so that ``sum C~ = N``; the joint ``Q = C~ / N``. Row ``i`` of ``C~`` sums to
  the number of rows labeled ``i``. Counts to prune are ``C~`` rounded preserving row
  totals (largest remainders).
* **Finding issues** (``method``):

  - ``"confusion"``: ``argmax p != y~`` (the paper's C_confusion baseline);
  - ``"confident_joint"``: the rows counted off the diagonal of ``C`` (C_{y~,y*});
  - ``"prune_by_class"`` (PBC): for each class ``i``, the ``sum_{j != i} C~[i][j]`` rows
    labeled ``i`` with the lowest self-confidence;
  - ``"prune_by_noise_rate"`` (PBNR): for each ``i != j``, the ``C~[i][j]`` rows labeled
    ``i`` with the largest margin ``p[j] - p[i]``;
  - ``"both"``: flagged by PBC and by PBNR (the paper's C+NR; cleanlab's ``"both"``).

  ``frac_noise`` scales the off-diagonal counts (flag that share of the estimated noise);
  ``min_per_class`` keeps at least that many rows of every class unflagged (the row's
  off-diagonal counts are scaled down). ``require_disagreement`` (cleanlab's last step,
  default on) unflags rows whose ``argmax p`` equals their label.
* Issues are **ranked** by self-confidence or normalised margin, lowest first (ties: row).

Cost ``O(N C)`` time in row chunks; PBNR adds a partial selection per non-zero off-diagonal
cell, ``O(N C)`` in all.

Outliers among labeled rows
---------------------------
:func:`labeled_outliers`: LOF (or k-NN distance) of every labeled row among the labeled
rows, from their own k-NN graph (:func:`miners.knn.knn_search`: exact or FAISS IVF with its
recall measured).

Near-duplicate pairs across splits or labels
--------------------------------------------
:func:`near_duplicate_issues`: the pairs at distance ``<= threshold`` read off the k-NN
graph of the rows (:func:`miners.density.near_duplicate_pairs`), each marked
``cross_split`` (the two rows are in different splits: a leak, e.g. train/test) and
``label_conflict`` (both labeled, differently); only pairs with a requested mark are kept.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np

from indexing.settings import LABEL_ISSUE_MIN_PER_CLASS

__all__ = ["ConfidentJoint", "LabelIssues", "NearDuplicateIssues", "calibrate_confident_joint",
           "confident_joint", "find_label_issues", "labeled_outliers", "near_duplicate_issues",
           "normalized_margin", "per_class_thresholds", "round_preserving_row_totals", "self_confidence"]

Progress = Callable[[float, str], None]
Check = Callable[[], None]
_CHUNK = 65_536
_METHODS = ("confusion", "confident_joint", "prune_by_class", "prune_by_noise_rate", "both")


def _noop_check() -> None:
    pass


def _inputs(labels: Any, probs: Any) -> tuple[np.ndarray, np.ndarray]:
    p = np.asarray(probs)
    if p.ndim != 2 or p.dtype.kind != "f":
        raise ValueError(f"probs must be a 2-D float array (N, C); got {p.dtype} {p.shape}")
    n, c = p.shape
    y = np.asarray(labels)
    if y.shape != (n,) or y.dtype.kind not in "iu":
        raise ValueError(f"labels must be integers of shape ({n},) (one per probs row); got {y.dtype} {y.shape}")
    if n and (y.min() < 0 or y.max() >= c):
        bad = int(np.flatnonzero((y < 0) | (y >= c))[0])
        raise ValueError(f"labels row {bad} is {int(y[bad])}; labels must be class indices in [0, {c})")
    for s in range(0, n, _CHUNK):
        b = p[s:s + _CHUNK]
        ok = np.isfinite(b).all(axis=1) & (b >= 0).all(axis=1) & (np.abs(b.sum(axis=1) - 1.0) <= 1e-3)
        if not ok.all():
            r = s + int(np.argmin(ok))
            raise ValueError(f"probs row {r} is not a probability vector (finite, >= 0, summing to 1 "
                             "within 1e-3)")
    return y.astype(np.int64), p


def self_confidence(labels: np.ndarray, probs: np.ndarray) -> np.ndarray:
    """``p_i[y~_i]``, float64 (low = likely mislabeled)."""
    y, p = _inputs(labels, probs)
    return p[np.arange(len(y)), y].astype(np.float64)


def normalized_margin(labels: np.ndarray, probs: np.ndarray) -> np.ndarray:
    """``p_i[y~_i] - max_{j != y~_i} p_i[j]`` in [-1, 1] (low = likely mislabeled);
    cleanlab reports ``(margin + 1) / 2``, the same order."""
    y, p = _inputs(labels, probs)
    out = np.empty(len(y))
    for s in range(0, len(y), _CHUNK):
        b = np.array(p[s:s + _CHUNK], dtype=np.float64)
        rows = np.arange(len(b))
        own = b[rows, y[s:s + len(b)]].copy()
        b[rows, y[s:s + len(b)]] = -np.inf
        out[s:s + len(b)] = own - b.max(axis=1) if b.shape[1] > 1 else own
    return out


def per_class_thresholds(labels: np.ndarray, probs: np.ndarray) -> np.ndarray:
    """``t_j = mean_{i : y~_i = j} p_i[j]`` (``+inf`` for a class without labeled rows)."""
    y, p = _inputs(labels, probs)
    c = p.shape[1]
    sc = p[np.arange(len(y)), y].astype(np.float64)
    counts = np.bincount(y, minlength=c)
    sums = np.bincount(y, weights=sc, minlength=c)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(counts > 0, sums / np.maximum(counts, 1), np.inf)


@dataclass
class ConfidentJoint:
    """``counts[i][j]``: rows labeled ``i`` confidently in class ``j``; ``true_guess``: each
    row's confident class (``-1``: none above threshold); ``thresholds``."""

    counts: np.ndarray
    true_guess: np.ndarray
    thresholds: np.ndarray


def confident_joint(labels: np.ndarray, probs: np.ndarray, *, thresholds: np.ndarray | None = None,
                    convention: Literal["paper", "cleanlab"] = "paper") -> ConfidentJoint:
    """The (uncalibrated) confident joint ``C`` (module docstring)."""
    y, p = _inputs(labels, probs)
    n, c = p.shape
    if convention not in ("paper", "cleanlab"):
        raise ValueError(f"convention must be 'paper' or 'cleanlab'; got {convention!r}")
    t = per_class_thresholds(y, p) if thresholds is None else np.asarray(thresholds, dtype=np.float64)
    if t.shape != (c,):
        raise ValueError(f"thresholds must have one entry per class ({c}); got {t.shape}")
    tt = t - 1e-6 if convention == "cleanlab" else t
    guess = np.full(n, -1, dtype=np.int64)
    for s in range(0, n, _CHUNK):
        b = np.asarray(p[s:s + _CHUNK], dtype=np.float64)
        conf = b >= tt[None, :]
        k = conf.sum(axis=1)
        if convention == "cleanlab":
            g = np.where(k > 1, b.argmax(axis=1), conf.argmax(axis=1))
        else:
            g = np.where(conf, b, -np.inf).argmax(axis=1)
        guess[s:s + len(b)] = np.where(k > 0, g, -1)
    counted = guess >= 0
    counts = np.bincount(y[counted] * c + guess[counted], minlength=c * c).reshape(c, c).astype(np.int64)
    if convention == "cleanlab":
        np.fill_diagonal(counts, np.maximum(np.diagonal(counts), 1))
    return ConfidentJoint(counts, guess, t)


def calibrate_confident_joint(counts: np.ndarray, label_counts: np.ndarray) -> np.ndarray:
    """The paper's Eq. 3: each row of ``counts`` rescaled to sum to ``label_counts[i]`` (a
    row without counts stays 0), then the matrix rescaled to sum to ``sum(label_counts)``.
    Float64."""
    cj = np.asarray(counts, dtype=np.float64)
    lc = np.asarray(label_counts, dtype=np.float64)
    rs = cj.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        out = np.where(rs[:, None] > 0, cj / np.maximum(rs, 1e-300)[:, None] * lc[:, None], 0.0)
    tot = out.sum()
    return out / tot * lc.sum() if tot > 0 else out


def round_preserving_row_totals(m: np.ndarray) -> np.ndarray:
    """Integers whose row sums equal the rounded row sums of ``m``: floor every entry, then
    add 1 to the entries with the largest fractional parts (ties: smaller column)."""
    a = np.asarray(m, dtype=np.float64)
    base = np.floor(a + 1e-9)
    out = base.astype(np.int64)
    for i in range(a.shape[0]):
        want = int(round(float(a[i].sum())))
        extra = want - int(out[i].sum())
        if extra > 0:
            frac = a[i] - base[i]
            order = np.lexsort((np.arange(a.shape[1]), -frac))
            out[i, order[:extra]] += 1
    return out


def _top_rows(values: np.ndarray, rows: np.ndarray, count: int, largest: bool) -> np.ndarray:
    """The ``count`` rows with the largest (or smallest) values; ties to the smaller row."""
    if count <= 0 or not len(rows):
        return np.empty(0, dtype=np.int64)
    if count >= len(rows):
        return rows
    v = -values if largest else values
    kth = np.partition(v, count - 1)[count - 1]
    strict = rows[v < kth]
    tied = np.sort(rows[v == kth])
    return np.concatenate([strict, tied[:count - len(strict)]])


@dataclass
class LabelIssues:
    """``rows``: flagged rows ranked (lowest score first); ``mask`` (N,); ``score`` (N,) the
    ranking score of every row; ``confident_joint`` (C, C) int; ``calibrated`` (C, C) float
    (``C~``); ``joint`` ``Q = C~ / N``; ``noise_matrix`` ``P(y~ = i | y* = j)`` (columns of
    ``Q`` normalised); ``prune_counts`` (C, C) int (the counts used by PBC/PBNR);
    ``thresholds``."""

    rows: np.ndarray
    mask: np.ndarray
    score: np.ndarray
    confident_joint: np.ndarray
    calibrated: np.ndarray
    joint: np.ndarray
    noise_matrix: np.ndarray
    prune_counts: np.ndarray
    thresholds: np.ndarray
    stats: dict[str, Any] = field(default_factory=dict)


def find_label_issues(labels: np.ndarray, probs: np.ndarray, *,
                      method: Literal["confusion", "confident_joint", "prune_by_class",
                                      "prune_by_noise_rate", "both"] = "prune_by_noise_rate",
                      rank_by: Literal["self_confidence", "normalized_margin"] = "self_confidence",
                      frac_noise: float = 1.0, min_per_class: int = LABEL_ISSUE_MIN_PER_CLASS,
                      require_disagreement: bool = True,
                      convention: Literal["paper", "cleanlab"] = "paper",
                      check: Check | None = None) -> LabelIssues:
    """Confident learning (module docstring): the likely mislabeled rows, ranked.

    Args:
        labels: ``(N,)`` given labels in ``[0, C)``.
        probs: ``(N, C)`` out-of-sample predicted probabilities.
        method: how rows are flagged.
        rank_by: "self_confidence" or "normalized_margin" (lowest first).
        frac_noise: share of the estimated noise flagged, in (0, 1].
        min_per_class: rows of each class left unflagged at least (PBC/PBNR).
        require_disagreement: unflag rows whose ``argmax p`` is their label.
        convention: "paper" or "cleanlab" (how the confident joint counts).
        check: cancel hook, between classes.
    """
    check = check or _noop_check
    y, p = _inputs(labels, probs)
    if method not in _METHODS:
        raise ValueError(f"method must be one of {', '.join(_METHODS)}; got {method!r}")
    if rank_by not in ("self_confidence", "normalized_margin"):
        raise ValueError(f"rank_by must be 'self_confidence' or 'normalized_margin'; got {rank_by!r}")
    if not (0.0 < frac_noise <= 1.0):
        raise ValueError(f"frac_noise must be in (0, 1]; got {frac_noise!r}")
    if isinstance(min_per_class, bool) or not isinstance(min_per_class, int | np.integer) or min_per_class < 0:
        raise ValueError(f"min_per_class must be an integer >= 0; got {min_per_class!r}")
    n, c = p.shape
    cj = confident_joint(y, p, convention=convention)
    label_counts = np.bincount(y, minlength=c)
    cal = calibrate_confident_joint(cj.counts, label_counts)
    joint = cal / max(1, n)
    col = joint.sum(axis=0)
    with np.errstate(invalid="ignore", divide="ignore"):
        noise_matrix = np.where(col[None, :] > 0, joint / np.maximum(col, 1e-300)[None, :], 0.0)
    counts = round_preserving_row_totals(cal)
    off = counts.copy()
    np.fill_diagonal(off, 0)
    if frac_noise < 1.0:
        off = np.floor(off * frac_noise + 1e-9).astype(np.int64)
    for i in range(c):  # leave at least min_per_class rows of class i unflagged
        room = max(0, int(label_counts[i]) - int(min_per_class))
        tot = int(off[i].sum())
        if tot > room:
            off[i] = round_preserving_row_totals((off[i] * (room / tot))[None, :])[0] if room else 0
    prune = off.copy()
    np.fill_diagonal(prune, np.maximum(label_counts - off.sum(axis=1), 0))
    sc = p[np.arange(n), y].astype(np.float64)
    pred = np.empty(n, dtype=np.int64)
    for s in range(0, n, _CHUNK):
        pred[s:s + _CHUNK] = np.asarray(p[s:s + _CHUNK]).argmax(axis=1)
    mask = np.zeros(n, dtype=bool)
    if method == "confusion":
        mask = pred != y
    elif method == "confident_joint":
        mask = (cj.true_guess >= 0) & (cj.true_guess != y)
    else:
        by_class = np.argsort(y, kind="stable")
        starts = np.r_[0, np.cumsum(label_counts)]
        pbc = np.zeros(n, dtype=bool)
        pbnr = np.zeros(n, dtype=bool)
        for i in range(c):
            check()
            rows = by_class[starts[i]:starts[i + 1]]
            if not len(rows):
                continue
            if method in ("prune_by_class", "both"):
                pbc[_top_rows(sc[rows], rows, int(off[i].sum()), largest=False)] = True
            if method in ("prune_by_noise_rate", "both"):
                for j in np.flatnonzero(off[i]):
                    margin = p[rows, j].astype(np.float64) - sc[rows]
                    pbnr[_top_rows(margin, rows, int(off[i, j]), largest=True)] = True
        mask = {"prune_by_class": pbc, "prune_by_noise_rate": pbnr, "both": pbc & pbnr}[method]
    if require_disagreement:
        mask = mask & (pred != y)
    score = sc if rank_by == "self_confidence" else normalized_margin(y, p)
    flagged = np.flatnonzero(mask)
    ranked = flagged[np.lexsort((flagged, score[flagged]))]
    return LabelIssues(ranked.astype(np.int64), mask, score, cj.counts, cal, joint, noise_matrix, prune,
                       cj.thresholds, {"method": method, "convention": convention,
                                       "estimated_noise_rows": int(counts.sum() - np.trace(counts))})


# ----------------------------------------------------------------------------- outliers


def labeled_outliers(vectors: np.ndarray, *, k: int = 20, method: Literal["lof", "knn_distance"] = "lof",
                     progress: Progress | None = None, check: Check | None = None,
                     stats: dict[str, Any] | None = None) -> np.ndarray:
    """Outlier score of every labeled row among the labeled rows (higher = more outlying):
    LOF (:func:`miners.density.lof_scores`) or the distance to the k-th neighbour, from
    the rows' own k-NN graph (:func:`miners.knn.knn_search`). ``stats["graph"]`` gets the
    graph's info."""
    from miners.density import knn_distance_scores, lof_scores
    from miners.knn import knn_search

    x = np.ascontiguousarray(vectors, dtype=np.float32)
    if x.ndim != 2:
        raise ValueError(f"vectors must be (L, d); got {x.shape}")
    if method not in ("lof", "knn_distance"):
        raise ValueError(f"method must be 'lof' or 'knn_distance'; got {method!r}")
    if len(x) < 2:
        return np.zeros(len(x))
    kw = {} if progress is None else {"progress": progress}
    if check is not None:
        kw["check"] = check
    res = knn_search(x, min(int(k), len(x) - 1), **kw)
    if stats is not None:
        stats["graph"] = res.info.to_dict()
    if method == "lof":
        return lof_scores(res.indices, res.distances)
    return knn_distance_scores(res.distances, how="kth")


# ----------------------------------------------------------------------------- near duplicates


@dataclass
class NearDuplicateIssues:
    """Pairs ``(i, j)``, ``i < j``, at ``distance <= threshold``, with their marks."""

    pairs: np.ndarray
    distance: np.ndarray
    cross_split: np.ndarray
    label_conflict: np.ndarray
    stats: dict[str, Any] = field(default_factory=dict)


def near_duplicate_issues(vectors: np.ndarray | None, threshold: float, *, k: int = 10,
                          split: np.ndarray | None = None, labels: np.ndarray | None = None,
                          keep: Literal["any", "cross_split", "label_conflict", "all"] = "any",
                          graph: tuple[np.ndarray, np.ndarray] | None = None,
                          progress: Progress | None = None, check: Check | None = None) -> NearDuplicateIssues:
    """Near-duplicate pairs that leak across splits or carry different labels (module
    docstring).

    Args:
        vectors: ``(N, d)`` float32 (unit vectors for cosine spaces), or None with ``graph``.
        threshold: largest distance of a pair.
        k: neighbours examined per row (pairs beyond the ``k`` nearest are not seen).
        split: ``(N,)`` split of each row (any comparable values; None: no split marks).
        labels: ``(N,)`` label of each row (negative integers or None entries: unlabeled).
        keep: "any" (cross-split or label conflict), "cross_split", "label_conflict", or
            "all" (every near-duplicate pair, marked).
        graph: a precomputed own k-NN graph ``(indices, distances)`` of the rows.
    """
    from miners.density import near_duplicate_pairs

    if keep not in ("any", "cross_split", "label_conflict", "all"):
        raise ValueError(f"keep must be 'any', 'cross_split', 'label_conflict' or 'all'; got {keep!r}")
    stats: dict[str, Any] = {}
    if graph is None:
        from miners.knn import knn_search

        if vectors is None:
            raise ValueError("give vectors or a graph")
        x = np.ascontiguousarray(vectors, dtype=np.float32)
        if len(x) < 2:
            e = np.empty(0, dtype=bool)
            return NearDuplicateIssues(np.empty((0, 2), np.int64), np.empty(0), e, e, stats)
        kw: dict[str, Any] = {}
        if progress is not None:
            kw["progress"] = progress
        if check is not None:
            kw["check"] = check
        res = knn_search(x, min(int(k), len(x) - 1), **kw)
        stats["graph"] = res.info.to_dict()
        indices, distances = res.indices, res.distances
    else:
        indices, distances = graph
    n = len(indices)
    pairs, dist = near_duplicate_pairs(indices, distances, threshold)
    a, b = pairs[:, 0], pairs[:, 1]
    cross = np.zeros(len(pairs), dtype=bool)
    if split is not None:
        sp = np.asarray(split, dtype=object)
        if sp.shape != (n,):
            raise ValueError(f"split must have one entry per row ({n}); got {sp.shape}")
        known = np.array([v is not None for v in sp], dtype=bool)  # no split: not a leak
        cross = known[a] & known[b] & (sp[a] != sp[b])
    conflict = np.zeros(len(pairs), dtype=bool)
    if labels is not None:
        lab = np.asarray(labels, dtype=object)
        if lab.shape != (n,):
            raise ValueError(f"labels must have one entry per row ({n}); got {lab.shape}")
        has = np.array([v is not None and not (isinstance(v, int | np.integer) and v < 0) for v in lab], dtype=bool)
        conflict = has[a] & has[b] & (lab[a] != lab[b])
    want = {"any": cross | conflict, "cross_split": cross, "label_conflict": conflict,
            "all": np.ones(len(pairs), dtype=bool)}[keep]
    return NearDuplicateIssues(pairs[want], dist[want], cross[want], conflict[want], stats)
