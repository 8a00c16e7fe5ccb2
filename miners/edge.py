"""Scoring at the edge: the server's per-item scores and keep/drop decision, offline (NumPy only).

A device that sees a stream of items (camera frames, user texts...) can decide which ones
are worth sending for labeling without a round-trip: export a scorer bundle from the
service (``col.export_scorer("scorer.npz", budget=0.02, ...)`` in the client, or the
``Scoring.ExportScorer`` RPC) and load it here::

    from miners.edge import EdgeScorer

    scorer = EdgeScorer.load("scorer.npz")            # or .json
    out = scorer.score(probs=p, embedding=h)          # dict: entropy, margin, ..., novelty, keep
    send = items[out["keep"]]

This module imports NumPy, the shared measures (:mod:`indexing.measures`) and the miners'
NumPy-only formula modules (:mod:`miners.density`, :mod:`miners.detection`) and nothing else — no torch, LanceDB, gRPC or pyarrow. The server's
``Score`` RPC calls **the same functions** (:func:`prediction_scores`, :func:`novelty_scores`,
:func:`calibrate_thresholds`, :func:`decide`), so a bundle holding the whole reference set
gives bit-identical scores to the server's exact path.

Scores (``float64``, higher = more worth labeling; NaN where an item lacks the input):

* from class probabilities ``probs`` ``(N, C)`` — or ``softmax(logits / T)`` for rows
  without probs, or the mean of ``samples`` for rows with samples only: ``least_confidence``,
  ``margin``, ``ratio``, ``entropy`` (:data:`indexing.measures.PROB_MEASURES`);
* from MC-dropout / committee ``samples`` ``(N, K, C)``: ``mean_entropy``, ``variance``,
  ``bald``, ``vote_entropy``, ``consensus_entropy``, ``kl_to_consensus``
  (:data:`indexing.measures.SAMPLE_MEASURES`);
* from ``logits``: ``energy`` (free energy, :data:`indexing.measures.LOGIT_MEASURES`);
* from detections: ``detection`` (per-box uncertainty, entropy-NMS, per-image aggregate,
  :func:`miners.detection.detection_scores`);
* from an embedding: ``novelty`` against the reference set — k-NN distance (``kth`` or
  ``mean``) or LOF in novelty mode (:mod:`miners.density`), on Euclidean distances (unit
  vectors for cosine spaces).

Decision: ``keep = any(score[name] >= threshold[name] for name in thresholds)`` (a NaN score
never fires). :func:`calibrate_thresholds` picks thresholds that keep a given fraction
(``budget``) of a reference pool: for several criteria, all at the same per-criterion
quantile level, chosen so that the union keeps ``budget`` of the pool.

Bundle (``.npz``: array ``reference`` (R, d) float32 + ``meta`` JSON string; ``.json``: one
object with ``reference`` as nested lists): ``format``, ``version``, the scorer settings
(``k``, ``novelty``, ``how``, temperatures, detection settings), ``thresholds``, ``budget``,
the model's ``classes``, the space's ``dim``/``metric``/``normalize``, the reference's
``kind`` (``all``, ``sample`` or ``centroids``) and provenance (collection, version, rows).
With a sample or centroids novelty is measured against that compact reference, and the
exported novelty threshold was calibrated against it, so the kept fraction still matches.
"""

from __future__ import annotations

import io
import json
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from indexing import measures
from miners import density, detection

__all__ = [
    "BUNDLE_FORMAT",
    "PROB_SCORES",
    "SAMPLE_SCORES",
    "SCORE_NAMES",
    "EdgeScorer",
    "NoveltyReference",
    "calibrate_thresholds",
    "decide",
    "drop_self",
    "novelty_scores",
    "prediction_scores",
    "prepare_vectors",
]

BUNDLE_FORMAT = "assay-edge-scorer"
BUNDLE_VERSION = 1

#: Scores of class probabilities and of samples: the measures of :mod:`indexing.measures`.
PROB_SCORES: tuple[str, ...] = tuple(measures.PROB_MEASURES)
SAMPLE_SCORES: tuple[str, ...] = tuple(measures.SAMPLE_MEASURES)
#: Every score name, in the order the scorers report them.
SCORE_NAMES: tuple[str, ...] = (*PROB_SCORES, *SAMPLE_SCORES, *measures.LOGIT_MEASURES, "detection", "novelty")
NOVELTY_METHODS = ("knn_distance", "lof")
KNN_HOW = ("kth", "mean")

_PROB_FNS = {name: m.fn for name, m in measures.PROB_MEASURES.items()}
_SAMPLE_FNS = {name: m.fn for name, m in measures.SAMPLE_MEASURES.items()}


# ------------------------------------------------------------------------------- scores


def _rows_present(x: np.ndarray | None, n: int) -> np.ndarray:
    """Rows of ``x`` with no NaN (a NaN row = "this item has no such input")."""
    if x is None:
        return np.zeros(n, dtype=bool)
    return ~np.isnan(x.reshape(n, -1)).any(axis=1) if x.size else np.ones(n, dtype=bool)


def prediction_scores(
    *,
    probs: np.ndarray | None = None,
    logits: np.ndarray | None = None,
    samples: np.ndarray | None = None,
    logits_temperature: float = 1.0,
    energy_temperature: float = 1.0,
    validate: bool = True,
) -> dict[str, np.ndarray]:
    """Uncertainty scores of ``N`` items from their predictions (any of the three inputs).

    Args:
        probs: ``(N, C)`` class probabilities; a row of NaN marks an item without probs.
        logits: ``(N, C)`` logits (NaN row = none); used for rows without probs
            (``softmax(logits / logits_temperature)``) and for ``energy``.
        samples: ``(N, K, C)`` MC-dropout passes or committee members (NaN = none); rows with
            neither probs nor logits take the mean of their samples as probs.
        validate: check probabilities (shape, finite, ``>= 0``, rows summing to 1 within
            ``1e-3``); ``ValueError`` naming the first bad row otherwise.

    Returns:
        ``{name: (N,) float64}`` for every score some input allows, NaN for the items lacking
        it (see :data:`PROB_SCORES`, :data:`SAMPLE_SCORES` and ``energy``).
    """
    arrays = {k: None if v is None else np.asarray(v, dtype=np.float64)
              for k, v in (("probs", probs), ("logits", logits), ("samples", samples))}
    sizes = {k: len(v) for k, v in arrays.items() if v is not None}
    if not sizes:
        return {}
    if len(set(sizes.values())) != 1:
        raise ValueError(f"probs, logits and samples must describe the same items; got {sizes}")
    n = next(iter(sizes.values()))
    p, lg, s = arrays["probs"], arrays["logits"], arrays["samples"]
    classes = {k: v.shape[-1] for k, v in arrays.items() if v is not None and v.ndim >= 2}
    if len(set(classes.values())) > 1:
        raise ValueError(f"probs, logits and samples must have the same number of classes; got {classes}")
    for name, arr, nd, shape in (("probs", p, 2, "(N, C)"), ("logits", lg, 2, "(N, C)"),
                                 ("samples", s, 3, "(N, K, C)")):
        if arr is not None and arr.ndim != nd:
            raise ValueError(f"{name} must have shape {shape}; got {arr.shape}")
    out: dict[str, np.ndarray] = {}
    has_p, has_l, has_s = _rows_present(p, n), _rows_present(lg, n), _rows_present(s, n)
    c = next(iter(classes.values()), 0)
    if has_s.any() and validate:
        s = s.copy()
        s[has_s] = measures.validate_probs(s[has_s], ndim=3, name="samples")
    if has_p.any() or has_l.any() or has_s.any():
        base = np.full((n, max(c, 2)), np.nan)
        if has_p.any():
            base[has_p] = measures.validate_probs(p[has_p]) if validate else p[has_p]
        from_l = has_l & ~has_p
        if from_l.any():
            base[from_l] = measures.softmax(lg[from_l], logits_temperature)
        from_s = has_s & ~has_p & ~has_l
        if from_s.any():
            base[from_s] = s[from_s].mean(axis=1)
        rows = has_p | has_l | has_s
        for name, fn in _PROB_FNS.items():
            col = np.full(n, np.nan)
            col[rows] = fn(base[rows], validate=False)
            out[name] = col
    if has_s.any():
        sub = s[has_s]
        for name, fn in _SAMPLE_FNS.items():
            col = np.full(n, np.nan)
            col[has_s] = fn(sub)
            out[name] = col
    if has_l.any():
        col = np.full(n, np.nan)
        col[has_l] = measures.energy_scores(lg[has_l], temperature=energy_temperature)
        out["energy"] = col
    return out


def detection_item_scores(boxes: Sequence[Any] | None, *, method: str = "entropy", aggregate: str = "sum",
                          nms_iou: float | None = 0.5) -> np.ndarray:
    """``detection`` score of each item from its boxes.

    ``boxes``: one entry per item — ``None`` (no detections known: NaN), or a mapping with
    ``boxes`` ``(B, 4)`` (x1, y1, x2, y2), ``scores`` ``(B,)`` and optionally ``probs`` ``(B, C)``
    (an empty detection list scores 0). The score is the detection miner's:
    :func:`miners.detection.detection_scores`.
    """
    if boxes is None:
        return np.zeros(0)
    n = len(boxes)
    out = np.full(n, np.nan)
    present = [i for i, b in enumerate(boxes) if b is not None]
    if not present:
        return out
    coords, scores, probs, owner = [], [], [], []
    with_probs = None
    for j, i in enumerate(present):
        b = boxes[i]
        xy = np.asarray(b["boxes"], dtype=np.float64).reshape(-1, 4)
        sc = np.asarray(b["scores"], dtype=np.float64).reshape(-1)
        pr = b.get("probs") if isinstance(b, Mapping) else None
        if len(xy) != len(sc):
            raise ValueError(f"item {i}: {len(xy)} boxes but {len(sc)} scores")
        has = pr is not None and len(xy) > 0
        if len(xy):
            with_probs = has if with_probs is None else with_probs
            if with_probs != has:
                raise ValueError(f"item {i}: every box needs class probabilities, or none does")
            if has:
                probs.append(np.asarray(pr, dtype=np.float64).reshape(len(xy), -1))
        coords.append(xy)
        scores.append(sc)
        owner.append(np.full(len(xy), j, dtype=np.int64))
    box_probs = np.concatenate(probs) if with_probs else None
    if box_probs is not None:
        measures.validate_probs(box_probs, name="box probs")
    res = detection.detection_scores(
        np.concatenate(owner), np.concatenate(coords), np.concatenate(scores), box_probs, len(present),
        method=method, aggregate=aggregate, nms_iou=nms_iou)
    out[present] = res
    return out


def prepare_vectors(vectors: np.ndarray, *, dim: int, normalize: bool, name: str = "embedding") -> np.ndarray:
    """``(N, dim)`` float32 query vectors as the reference set stores them: L2-normalised
    (float32 division, as the store normalises on write) when ``normalize``.
    ``ValueError`` on a wrong dimension, NaN/inf, or a zero vector to normalise."""
    v = np.asarray(vectors)
    if v.dtype.kind not in "biuf":
        raise ValueError(f"{name} must be numbers; got dtype {v.dtype}")
    v = np.atleast_2d(v.astype(np.float32, copy=False))
    if v.ndim != 2 or v.shape[1] != dim:
        raise ValueError(f"{name} must have shape (N, {dim}) (the space's dimension); got {np.shape(vectors)}")
    finite = np.isfinite(v).all(axis=1)
    if not finite.all():
        raise ValueError(f"{name}: row {int(np.argmin(finite))} contains NaN or infinity")
    if normalize:
        norms = np.linalg.norm(v, axis=1)
        if (norms == 0).any():
            raise ValueError(f"{name}: row {int(np.argmin(norms))} is the zero vector, which cannot be normalised")
        v = v / norms[:, None]
    return v


def drop_self(indices: np.ndarray, distances: np.ndarray, self_index: np.ndarray, k: int
              ) -> tuple[np.ndarray, np.ndarray]:
    """Remove each query's own row (``self_index[i]``, ``-1``: none) from a ``(M, k + 1)``
    graph and keep the first ``k`` of the rest (calibrating on rows of the reference set)."""
    own = (indices == np.asarray(self_index)[:, None]) & (indices >= 0)
    # the first ``k`` columns that are not the row itself: a stable sort moves it to the end
    order = np.argsort(own, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(indices, order, axis=1), np.take_along_axis(distances, order, axis=1)


@dataclass
class NoveltyReference:
    """A reference set for novelty: its vectors (float32, as stored; unit vectors for
    cosine spaces), ``k``, the method and — for LOF — its own k-NN graph."""

    vectors: np.ndarray
    k: int = 10
    method: str = "knn_distance"
    how: str = "kth"
    #: the reference set's own graph for LOF (computed on first use when not given)
    reference_graph: tuple[np.ndarray, np.ndarray] | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if self.method not in NOVELTY_METHODS:
            raise ValueError(f"novelty must be one of {', '.join(NOVELTY_METHODS)}; got {self.method!r}")
        if self.how not in KNN_HOW:
            raise ValueError(f"how must be one of {', '.join(KNN_HOW)}; got {self.how!r}")
        if isinstance(self.k, bool) or not isinstance(self.k, int | np.integer) or self.k < 1:
            raise ValueError(f"k must be an integer >= 1; got {self.k!r}")
        self.vectors = np.asarray(self.vectors, dtype=np.float32)
        if self.vectors.ndim != 2 or len(self.vectors) == 0:
            raise ValueError(f"the reference set must be a non-empty (R, d) array; got {self.vectors.shape}")
        if self.method == "lof" and len(self.vectors) < 2:
            raise ValueError("LOF novelty needs at least 2 reference rows")

    @property
    def query_k(self) -> int:
        return min(self.k, len(self.vectors))

    def graph(self) -> tuple[np.ndarray, np.ndarray]:
        """The reference set's own k-NN graph (self excluded), as the novelty miner builds it."""
        if self.reference_graph is None:
            self.reference_graph = density.exact_knn_graph(self.vectors, min(self.k, len(self.vectors) - 1),
                                                           exclude_self=True)
        return self.reference_graph

    def query_graph(self, queries: np.ndarray, self_index: np.ndarray | None = None
                    ) -> tuple[np.ndarray, np.ndarray]:
        """Exact k nearest reference rows of each query; ``self_index`` drops a query's own row."""
        k = self.query_k
        if self_index is None or not (np.asarray(self_index) >= 0).any():
            return density.exact_knn_graph(self.vectors, k, queries=queries, exclude_self=False)
        idx, dist = density.exact_knn_graph(self.vectors, min(k + 1, len(self.vectors)), queries=queries,
                                            exclude_self=False)
        return drop_self(idx, dist, self_index, k)

    def scores(self, queries: np.ndarray, self_index: np.ndarray | None = None) -> np.ndarray:
        idx, dist = self.query_graph(queries, self_index)
        return novelty_scores(idx, dist, method=self.method, how=self.how,
                              reference_graph=self.graph() if self.method == "lof" else None)


def novelty_scores(indices: np.ndarray, distances: np.ndarray, *, method: str = "knn_distance", how: str = "kth",
                   reference_graph: tuple[np.ndarray, np.ndarray] | None = None) -> np.ndarray:
    """Novelty of queries from their k-NN graph into the reference set (the novelty miner's
    scores): ``knn_distance`` (:func:`miners.density.knn_distance_scores`) or ``lof``
    (:func:`miners.density.lof_novelty_scores`, needs the reference set's own graph)."""
    if method == "lof":
        if reference_graph is None:
            raise ValueError("LOF novelty needs the reference set's own k-NN graph")
        return density.lof_novelty_scores(indices, distances, *reference_graph)
    if method != "knn_distance":
        raise ValueError(f"novelty must be one of {', '.join(NOVELTY_METHODS)}; got {method!r}")
    return density.knn_distance_scores(distances, how=how)


# ------------------------------------------------------------------------ thresholds


def decide(scores: Mapping[str, np.ndarray], thresholds: Mapping[str, float], n: int | None = None
           ) -> np.ndarray | None:
    """``keep[i] = any(scores[name][i] >= thresholds[name])`` over ``N`` items; a NaN score
    (the item lacks that input) and a score absent from ``scores`` (no item has it) never
    fire. ``None`` without thresholds."""
    if not thresholds:
        return None
    if n is None:
        n = len(next(iter(scores.values()))) if scores else 0
    keep = np.zeros(n, dtype=bool)
    for name, t in thresholds.items():
        if name in scores:
            with np.errstate(invalid="ignore"):
                keep |= np.asarray(scores[name], dtype=np.float64) >= float(t)
    return keep


def calibrate_thresholds(scores: Mapping[str, np.ndarray], budget: float,
                         criteria: Sequence[str] | None = None) -> dict[str, float]:
    """Thresholds that keep about ``budget`` (a fraction in ``(0, 1)``) of the items whose
    ``scores`` are given (the reference pool), with the rule of :func:`decide`.

    ``n_keep = ceil(budget N)``. One criterion: ``t`` is the ``n_keep``-th largest score, so the
    pool keeps exactly ``n_keep`` items (more only on ties at ``t``). Several criteria: every
    criterion fires above (about) the same quantile level of its own pool distribution.
    With ``F_i`` the empirical CDF of criterion ``i``, each pair (criterion ``i``, item ``n``)
    is an event at level ``F_i(s_ni)``; thresholds are lowered event by event, by decreasing
    level (ties: criteria in the given order), each event setting ``t_i = s_ni``, until the
    union of the fired items reaches ``n_keep``. ``t_i = +inf`` when criterion ``i`` never
    had to fire. NaN scores (items lacking the input) never fire and count towards ``N``. On
    data from the pool's distribution the kept fraction is ``budget`` up to sampling error
    (``~ sqrt(budget (1 - budget) / N)``).

    Raises:
        ValueError: budget outside ``(0, 1)``, no criteria, unknown criterion, or a pool too
            small to resolve the budget (``budget N < 1``).
    """
    try:
        b = float(budget)
    except (TypeError, ValueError):
        raise ValueError(f"budget must be a fraction in (0, 1); got {budget!r}") from None
    if not 0.0 < b < 1.0:
        raise ValueError(f"budget must be a fraction in (0, 1) (e.g. 0.02 keeps about 2%); got {budget!r}")
    names = list(criteria) if criteria is not None else list(scores)
    if not names:
        raise ValueError("calibration needs at least one criterion (a score name)")
    missing = [c for c in names if c not in scores]
    if missing:
        raise ValueError(f"no scores for criterion {', '.join(missing)} (have: {', '.join(scores) or 'none'})")
    cols = [np.asarray(scores[c], dtype=np.float64).reshape(-1) for c in names]
    n = len(cols[0])
    if any(len(c) != n for c in cols):
        raise ValueError("every criterion needs one score per pool item")
    if n == 0 or b * n < 1:
        raise ValueError(f"a budget of {b:g} needs at least {math.ceil(1 / b)} calibration rows; got {n}")
    n_keep = math.ceil(b * n - 1e-9)
    levels, crits, items, values = [], [], [], []
    for i, s in enumerate(cols):
        ok = np.flatnonzero(~np.isnan(s))
        v = np.sort(s[ok])
        levels.append(np.searchsorted(v, s[ok], side="right") / n)
        crits.append(np.full(len(ok), i))
        items.append(ok)
        values.append(s[ok])
    level, crit, item, value = (np.concatenate(a) for a in (levels, crits, items, values))
    if len(np.unique(item)) < n_keep:
        raise ValueError(f"only {len(np.unique(item))} of {n} calibration items have a score for "
                         f"{', '.join(names)}; a budget of {b:g} needs {n_keep}")
    order = np.lexsort((-value, crit, -level))  # by level (desc), criterion, value (desc)
    crit, item, value = crit[order], item[order], value[order]
    # the event at which each item is first fired; the n_keep-th of those ends the calibration
    _, first = np.unique(item, return_index=True)
    stop = int(np.sort(first)[n_keep - 1]) + 1
    out: dict[str, float] = {}
    for i, name in enumerate(names):
        fired = value[:stop][crit[:stop] == i]
        out[name] = float(fired.min()) if len(fired) else math.inf
    return out


# ---------------------------------------------------------------------------- bundle


def _check_name(name: str) -> None:
    if name not in SCORE_NAMES:
        raise ValueError(f"unknown score {name!r} (scores: {', '.join(SCORE_NAMES)})")


@dataclass
class EdgeScorer:
    """Offline scorer: the settings and thresholds of a server scorer, plus a compact
    reference set for novelty. Build it with :meth:`load` (a bundle exported by the
    service) or directly (tests, custom pipelines)."""

    thresholds: dict[str, float] = field(default_factory=dict)
    classes: tuple[str, ...] = ()
    reference: NoveltyReference | None = None
    dim: int | None = None
    metric: str | None = None
    normalize: bool = False
    logits_temperature: float = 1.0
    energy_temperature: float = 1.0
    detection_method: str = "entropy"
    detection_aggregate: str = "sum"
    nms_iou: float | None = 0.5
    budget: float | None = None
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for name in self.thresholds:
            _check_name(name)
        self.thresholds = {k: float(v) for k, v in self.thresholds.items()}
        if self.reference is not None and self.dim is None:
            self.dim = int(self.reference.vectors.shape[1])
        if self.reference is not None and self.reference.vectors.shape[1] != self.dim:
            raise ValueError(f"reference vectors have dimension {self.reference.vectors.shape[1]}, not {self.dim}")
        if "novelty" in self.thresholds and self.reference is None:
            raise ValueError("a novelty threshold needs a reference set")

    # -- scoring ---------------------------------------------------------------------

    def score(self, *, probs: Any = None, logits: Any = None, samples: Any = None, embedding: Any = None,
              boxes: Sequence[Any] | None = None, validate: bool = True) -> dict[str, np.ndarray]:
        """Scores of ``N`` items (any inputs; see the module docstring) and ``keep`` (bool;
        absent without thresholds). Same formulas and decision as the server's ``Score``."""
        out = prediction_scores(probs=probs, logits=logits, samples=samples,
                                logits_temperature=self.logits_temperature,
                                energy_temperature=self.energy_temperature, validate=validate)
        if self.classes:
            for name, arr in (("probs", probs), ("logits", logits), ("samples", samples)):
                if arr is not None and np.shape(arr)[-1] != len(self.classes):
                    raise ValueError(f"{name} have {np.shape(arr)[-1]} classes; the model has {len(self.classes)}")
        if boxes is not None:
            out["detection"] = detection_item_scores(boxes, method=self.detection_method,
                                                     aggregate=self.detection_aggregate, nms_iou=self.nms_iou)
        if embedding is not None:
            if self.reference is None:
                raise ValueError("this scorer has no reference set: it cannot score novelty")
            q = prepare_vectors(embedding, dim=self.dim, normalize=self.normalize)
            out["novelty"] = self.reference.scores(q)
        sizes = {len(v) for v in out.values()}
        if len(sizes) > 1:
            raise ValueError(f"the inputs describe different numbers of items: {sorted(sizes)}")
        n = sizes.pop() if sizes else 0
        keep = decide(out, self.thresholds, n)
        if keep is not None:
            out["keep"] = keep
        return out

    def keep(self, **inputs: Any) -> np.ndarray:
        """``score(**inputs)["keep"]``: which items to send."""
        if not self.thresholds:
            raise ValueError("this scorer has no thresholds: calibrate or set them first")
        return self.score(**inputs)["keep"]

    def calibrate(self, budget: float, criteria: Sequence[str], **pool_inputs: Any) -> dict[str, float]:
        """Set thresholds that keep about ``budget`` of a local pool (given as score inputs)."""
        for c in criteria:
            _check_name(c)
        scores = self.score(**pool_inputs)
        self.thresholds = calibrate_thresholds(scores, budget, criteria)
        self.budget = float(budget)
        return dict(self.thresholds)

    # -- bundle ----------------------------------------------------------------------

    def to_meta(self) -> dict[str, Any]:
        ref = self.reference
        return {
            **self.meta,
            "format": BUNDLE_FORMAT, "version": BUNDLE_VERSION,
            "thresholds": {k: _json_float(v) for k, v in self.thresholds.items()},
            "budget": self.budget, "classes": list(self.classes), "dim": self.dim, "metric": self.metric,
            "normalize": bool(self.normalize), "logits_temperature": self.logits_temperature,
            "energy_temperature": self.energy_temperature, "detection_method": self.detection_method,
            "detection_aggregate": self.detection_aggregate, "nms_iou": self.nms_iou,
            "k": ref.k if ref else None, "novelty": ref.method if ref else None, "how": ref.how if ref else None,
            "reference_rows": int(len(ref.vectors)) if ref else 0,
        }

    def to_bytes(self, format: str = "npz") -> bytes:  # noqa: A002 — the file format
        """The bundle as ``.npz`` (compact: float32 reference) or ``.json`` bytes."""
        meta = self.to_meta()
        ref = self.reference.vectors if self.reference is not None else np.zeros((0, self.dim or 0), np.float32)
        if format == "npz":
            buf = io.BytesIO()
            np.savez_compressed(buf, meta=np.array(json.dumps(meta)), reference=ref)
            return buf.getvalue()
        if format == "json":
            # float32 -> Python float is exact, and JSON keeps repr(float): the vectors round-trip
            return json.dumps({**meta, "reference": ref.astype(np.float64).tolist()}).encode()
        raise ValueError(f"format must be 'npz' or 'json'; got {format!r}")

    def save(self, path: str | os.PathLike[str], format: str | None = None) -> None:  # noqa: A002
        fmt = format or ("json" if str(path).endswith(".json") else "npz")
        with open(path, "wb") as fh:
            fh.write(self.to_bytes(fmt))

    @classmethod
    def from_bytes(cls, data: bytes) -> EdgeScorer:
        """A bundle from ``.npz`` or ``.json`` bytes (told apart by their first bytes)."""
        data = bytes(data)
        if data[:2] == b"PK":
            with np.load(io.BytesIO(data), allow_pickle=False) as z:
                meta = json.loads(str(z["meta"]))
                ref = np.asarray(z["reference"], dtype=np.float32)
        else:
            try:
                raw = json.loads(data.decode())
            except (UnicodeDecodeError, json.JSONDecodeError) as exc:
                raise ValueError(f"not a scorer bundle (.npz or .json): {exc}") from None
            if not isinstance(raw, dict):
                raise ValueError("not a scorer bundle: the JSON is not an object")
            ref_list = raw.pop("reference", [])
            meta = raw
            ref = np.asarray(ref_list, dtype=np.float32).reshape(len(ref_list), -1) if ref_list \
                else np.zeros((0, int(meta.get("dim") or 0)), np.float32)
        return cls.from_meta(meta, ref)

    @classmethod
    def from_meta(cls, meta: Mapping[str, Any], reference: np.ndarray) -> EdgeScorer:
        if meta.get("format") != BUNDLE_FORMAT:
            raise ValueError(f"not a scorer bundle (format {meta.get('format')!r}, expected {BUNDLE_FORMAT!r})")
        if int(meta.get("version", 0)) > BUNDLE_VERSION:
            raise ValueError(f"bundle version {meta.get('version')} is newer than this module ({BUNDLE_VERSION})")
        known = {"format", "version", "thresholds", "budget", "classes", "dim", "metric", "normalize",
                 "logits_temperature", "energy_temperature", "detection_method", "detection_aggregate", "nms_iou",
                 "k", "novelty", "how", "reference_rows"}
        ref = None
        if len(reference):
            ref = NoveltyReference(reference, k=int(meta["k"]), method=meta["novelty"], how=meta["how"])
        return cls(
            thresholds={k: float(v) for k, v in (meta.get("thresholds") or {}).items()},
            classes=tuple(meta.get("classes") or ()), reference=ref,
            dim=None if meta.get("dim") is None else int(meta["dim"]), metric=meta.get("metric"),
            normalize=bool(meta.get("normalize", False)),
            logits_temperature=float(meta.get("logits_temperature", 1.0)),
            energy_temperature=float(meta.get("energy_temperature", 1.0)),
            detection_method=meta.get("detection_method", "entropy"),
            detection_aggregate=meta.get("detection_aggregate", "sum"),
            nms_iou=None if meta.get("nms_iou") is None else float(meta["nms_iou"]),
            budget=None if meta.get("budget") is None else float(meta["budget"]),
            meta={k: v for k, v in meta.items() if k not in known},
        )

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> EdgeScorer:
        with open(path, "rb") as fh:
            return cls.from_bytes(fh.read())


def _json_float(x: float) -> float | str:
    """JSON has no infinity: a threshold that never fires is written as the string 'inf'."""
    return x if math.isfinite(x) else ("inf" if x > 0 else "-inf")
