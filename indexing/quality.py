"""Does uncertainty predict errors? A model's uncertainty against its quality on labeled rows.

The analysis users ran by hand: take the labeled rows, an uncertainty score per row and a
quality measure per row, and ask (1) how well the uncertainty ranks the rows by quality —
the Spearman rank correlation — and (2) how the rows split into four quadrants, high/low
uncertainty × high/low quality, with the ids of each (the high-uncertainty low-quality rows
are the errors the uncertainty caught; the low-uncertainty low-quality ones are the
confident errors it missed).

A module of its own beside :mod:`indexing.measures` rather than inside it: measures.py is
the NumPy-only leaf of per-item scores every layer (and the light client) imports, while this
report ranks with SciPy and reads the store. It imports :mod:`indexing.analytics` (the
streamed, filtered, pinned reads) and :mod:`indexing.objects` (the box matching), never
``miners``.

Two layers:

* :func:`report` — a pure function on arrays (NumPy + SciPy), the definition below;
* :func:`uncertainty_quality` — the collection-level report: streams the labeled rows of a
  collection (``where``, ``version``), derives both values per row and calls :func:`report`.
  Served as the aggregate kind ``"uncertainty_quality"`` (``Collection.uncertainty_quality``
  in the client, ``assay uncertainty-quality`` on the command line, a tab of the web page).

Definition (:func:`report`). Given ``N`` rows with uncertainty ``u_i`` (higher = more
uncertain), quality ``q_i`` and a direction (``higher_is_better``; for the loss it is
false):

* rows where ``u_i`` or ``q_i`` is NaN or infinite are left out and counted (``non_finite``);
  ``n`` rows remain;
* ``rho = spearman(u, q)``: the Pearson correlation of the ranks of ``u`` and of ``q``, ties
  given their average rank (``scipy.stats.spearmanr``), with its two-sided p-value (SciPy's
  t-distribution approximation, ``t = rho sqrt((n - 2) / (1 - rho^2))`` with ``n - 2``
  degrees of freedom). ``rho`` is null when ``n < 2`` or either side is constant (a rank
  correlation is then undefined). ``rho`` is the correlation with the quality **as named**:
  for ``correct`` or an IoU (higher is better) an uncertainty that predicts errors gives a
  negative ``rho``; for the ``loss`` a positive one. ``rho_error`` removes the sign
  convention: it is ``-rho`` when higher quality is better and ``rho`` otherwise, i.e. the
  correlation of the uncertainty with the *error*; **positive = the uncertain rows are the
  bad ones**;
* thresholds: ``t_u`` = the ``uncertainty_quantile`` quantile of ``u`` (default 0.5: the
  median; NumPy's linear interpolation), or ``uncertainty_threshold`` when given; ``t_q``
  likewise from ``quality_quantile`` / ``quality_threshold``;
* a row has **high uncertainty** iff ``u_i > t_u`` and **low quality** iff ``q_i < t_q``
  (``q_i > t_q`` when lower is better). A value equal to its threshold is on the "low
  uncertainty" / "high quality" side — the side that flags nothing — so that heavy ties (a
  0/1 quality, many IoUs of 0) never flag rows merely for equalling the median; the counts
  show where the rows went;
* the quadrants, in this order: ``high_uncertainty_low_quality`` (errors the uncertainty
  caught), ``high_uncertainty_high_quality`` (false alarms),
  ``low_uncertainty_low_quality`` (confident errors: missed), ``low_uncertainty_high_quality``;
  each with its complete ``count``, the mean ``u`` and ``q`` of its rows, and at most
  ``max_ids`` ids, most extreme first: by uncertainty (descending in the high-uncertainty
  quadrants, ascending in the low ones), then by quality (worst first in the low-quality
  quadrants, best first in the high ones), then by id.

Quality measures (:func:`uncertainty_quality`, the model's task decides):

* classification, ``correct``: 1 when the top-1 class (argmax of the probabilities the
  measures below read; ties to the lowest class) equals the row's ``label``, else 0; higher
  is better, and its default threshold is 0.5 (correct vs wrong) rather than the median;
* classification, ``loss``: the cross-entropy at the label, ``-log p_label`` (``p`` clipped to
  the smallest positive float64, so a zero probability gives a large finite loss); **lower
  is better**;
* detection, ``iou``: per image, the model's boxes are matched to ``gt_boxes`` as
  :func:`indexing.objects.box_confusion` matches them (predictions by score descending each
  take the free gt box of highest IoU ``>= iou``, classes ignored), and the quality is
  ``sum(IoU of the matched pairs) / (P + G - M)`` for ``P`` predictions, ``G`` gt boxes and
  ``M`` matches (:func:`indexing.objects.image_iou`): every unmatched prediction and every
  missed gt box counts as an IoU of 0. An image with neither boxes nor gt boxes scores 1
  (nothing to find, nothing found). Higher is better;
* segmentation, ``iou``: per image, the model's predicted mask (``pred_<m>.mask_uri``, as the
  PyTorch runner's ``mask_dir=`` writes it) against the ground-truth mask in the string
  column ``gt_mask_uri`` (:data:`indexing.masks.GT_MASK_COLUMN`), both read by
  :func:`indexing.masks.read_mask` (a PNG of class indices, 0 = none, ``k`` = class
  ``k - 1``, 255 = ignore; or a JSON file of COCO RLE masks) where the report runs (the
  server: local paths, as the export reads them). :func:`mask_iou`: with ``V`` the pixels
  that are not ignore in the ground truth, ``P_c`` / ``G_c`` the pixels of ``V`` the
  prediction / the ground truth give class ``c``, the quality is the mean over the classes
  present in either (``P_c ∪ G_c`` not empty) of ``|P_c ∩ G_c| / |P_c ∪ G_c|``; an image
  where neither mask has any class scores 1. Masks of different shapes are an error naming
  the row; a row whose mask file is absent, remote or unreadable is left out and counted
  (``missing`` and ``missing_masks``, the first reason in ``mask_problem``). Higher is better;
* any numeric field or struct path (``my_iou``, ``pred_seg.loss`` — a segmentation model's
  per-image IoU, a loss the user computed): higher is better unless ``lower_is_better``.

The labeled rows are those with a ``label`` (``correct``, ``loss``), with ``gt_boxes``
(detection ``iou``; an empty list is a labeled image with no objects), with a
``gt_mask_uri`` (segmentation ``iou``) or with a non-null quality field.
Among them, rows without an uncertainty or a quality value (no prediction, a null field, an
id the mining run did not return) are left out and counted as ``missing``; rows whose label
is not one of the model's classes as ``unknown_label`` (their ``correct`` or ``loss`` is
undefined for this model).

Uncertainty sources:

* a probability measure of :mod:`indexing.measures` (``entropy``, ``margin``,
  ``least_confidence``, ``ratio``) of a classification model's ``probs`` (else
  ``softmax(logits)``, else the mean of its ``samples``, as the miners read them) — the
  miners' own scores;
* for a detection model, the detection miner's per-image score (``entropy``, ``margin`` or
  ``one_minus_score`` per box, entropy-NMS at IoU 0.5, summed per image): computed by
  :mod:`miners.detection`, which this layer may not import — the server passes the scoring
  functions in (``box_scores``);
* for a segmentation model, its stored per-image summaries ``topq_entropy`` (the default),
  ``mean_entropy`` and ``bald`` (:mod:`indexing.segmentation`): the fields
  ``pred_<m>.topq_entropy`` ... — the scores the ``segmentation`` miner ranks by;
* a numeric field or path (``pred_m.loss``, a score the user upserted);
* the scores of a finished mining run (``run_scores``: its ``id``, ``score`` results), so that
  any miner (BALD, a committee, detection with other settings...) can be judged. A run holds
  only the ids it selected: run it over the labeled rows with a ``size`` that covers them.
  Its scores are joined by id to the rows read now (or at ``version``): labels changed
  since the run are read as they are now.
"""

from __future__ import annotations

import json
import math
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from indexing.analytics import stream
from indexing.errors import FailedPrecondition, InvalidArgument
from indexing.masks import GT_MASK_COLUMN, MaskError, read_mask
from indexing.measures import PROB_MEASURES
from indexing.objects import image_iou
from indexing.predictions import prediction_probs, valid_mask
from indexing.schema import SEG_SUMMARIES, ModelSpec
from indexing.settings import MAX_QUADRANT_IDS

__all__ = [
    "DEFAULT_MAX_IDS",
    "LABEL_QUALITIES",
    "META_KEY",
    "QUADRANTS",
    "Quadrant",
    "Report",
    "label_quality",
    "mask_iou",
    "report",
    "report_stats",
    "uncertainty_quality",
]

META_KEY = b"assay.uncertainty_quality"
DEFAULT_MAX_IDS = 100
#: (name, uncertainty side, quality side), in the order of the report's rows.
QUADRANTS: tuple[tuple[str, str, str], ...] = (
    ("high_uncertainty_low_quality", "high", "low"),
    ("high_uncertainty_high_quality", "high", "high"),
    ("low_uncertainty_low_quality", "low", "low"),
    ("low_uncertainty_high_quality", "low", "high"),
)
#: Quality measures of a classification model, from its predictions and the row's label.
LABEL_QUALITIES = ("correct", "loss")
DETECTION_QUALITIES = ("iou",)
#: A segmentation model's uncertainties: its stored per-image summaries (the first is the default).
SEGMENTATION_UNCERTAINTIES: tuple[str, ...] = ("topq_entropy", "mean_entropy", "bald")
assert set(SEGMENTATION_UNCERTAINTIES) <= set(SEG_SUMMARIES)
#: The value ignore pixels of a ground-truth mask take once read (outside 0..C).
_VOID = -1
_TINY = np.finfo(np.float64).tiny

#: ``box_scores[method](ids, boxes, spec)``: per-row detection uncertainty of a batch's
#: ``pred_<m>.boxes`` column (NaN where the row has no boxes list).
BoxScorer = Callable[[pa.Array, pa.Array, ModelSpec], np.ndarray]


# -- the pure part ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Quadrant:
    """One quadrant of a :class:`Report`: ``count`` rows (all of them), the first
    ``len(ids)`` of them by extremeness, and the means of their two values."""

    name: str
    uncertainty: str
    quality: str
    count: int
    ids: list[str]
    mean_uncertainty: float | None
    mean_quality: float | None


@dataclass(frozen=True)
class Report:
    """What :func:`report` computes (see the module doc for every definition)."""

    n: int
    non_finite: int
    rho: float | None
    p_value: float | None
    rho_error: float | None
    uncertainty_threshold: float | None
    quality_threshold: float | None
    higher_is_better: bool
    quadrants: tuple[Quadrant, ...]


def _fraction(value: float | None, name: str) -> float | None:
    if value is None:
        return None
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise InvalidArgument(f"{name} must be a number in [0, 1], got {value!r}") from None
    if not 0.0 <= v <= 1.0:
        raise InvalidArgument(f"{name} must be in [0, 1], got {value!r}")
    return v


def _finite(value: float | None, name: str) -> float | None:
    if value is None:
        return None
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise InvalidArgument(f"{name} must be a finite number, got {value!r}") from None
    if not math.isfinite(v):
        raise InvalidArgument(f"{name} must be a finite number, got {value!r}")
    return v


def _max_ids(max_ids: int) -> int:
    if isinstance(max_ids, bool) or not isinstance(max_ids, int | np.integer) or not 0 <= max_ids <= MAX_QUADRANT_IDS:
        raise InvalidArgument(f"max_ids must be an integer in [0, {MAX_QUADRANT_IDS}], got {max_ids!r}")
    return int(max_ids)


def _spearman(u: np.ndarray, q: np.ndarray) -> tuple[float | None, float | None]:
    if len(u) < 2 or np.ptp(u) == 0 or np.ptp(q) == 0:
        return None, None
    from scipy.stats import spearmanr

    with warnings.catch_warnings():  # n = 2 gives no p-value: reported as null, not warned
        warnings.simplefilter("ignore", RuntimeWarning)
        res = spearmanr(u, q)
    rho, p = float(res.statistic), float(res.pvalue)
    return (rho if math.isfinite(rho) else None), (p if math.isfinite(p) else None)


def report(uncertainty: np.ndarray, quality: np.ndarray, ids: Sequence[str] | pa.Array, *,
           higher_is_better: bool = True, uncertainty_quantile: float | None = None,
           quality_quantile: float | None = None, uncertainty_threshold: float | None = None,
           quality_threshold: float | None = None, max_ids: int = DEFAULT_MAX_IDS) -> Report:
    """Spearman correlation and quadrants of ``uncertainty`` (N,) against ``quality`` (N,)
    for the rows ``ids`` (N,); the definitions are in the module doc.

    ``uncertainty_quantile`` / ``quality_quantile`` (in [0, 1], default 0.5) place the
    thresholds at quantiles of the finite values; ``uncertainty_threshold`` /
    ``quality_threshold`` give them as values instead (not both for one side). Raises
    InvalidArgument for mismatched lengths or out-of-range options.
    """
    u = np.asarray(uncertainty, dtype=np.float64)
    q = np.asarray(quality, dtype=np.float64)
    ids_arr = ids if isinstance(ids, pa.Array | pa.ChunkedArray) else pa.array(list(ids), pa.string())
    if isinstance(ids_arr, pa.ChunkedArray):
        ids_arr = ids_arr.combine_chunks()
    if u.ndim != 1 or q.shape != u.shape or len(ids_arr) != len(u):
        raise InvalidArgument(f"uncertainty, quality and ids must be 1-D of one length; got shapes {u.shape}, "
                              f"{q.shape} and {len(ids_arr)} ids")
    uq = _fraction(uncertainty_quantile, "uncertainty_quantile")
    qq = _fraction(quality_quantile, "quality_quantile")
    ut = _finite(uncertainty_threshold, "uncertainty_threshold")
    qt = _finite(quality_threshold, "quality_threshold")
    if uq is not None and ut is not None:
        raise InvalidArgument("give uncertainty_quantile or uncertainty_threshold, not both")
    if qq is not None and qt is not None:
        raise InvalidArgument("give quality_quantile or quality_threshold, not both")
    cap = _max_ids(max_ids)
    ok = np.isfinite(u) & np.isfinite(q)
    keep = np.flatnonzero(ok)
    u, q = u[keep], q[keep]
    ids_arr = ids_arr.take(pa.array(keep, pa.int64())) if len(keep) < len(ok) else ids_arr
    n = len(u)
    t_u = ut if ut is not None else (float(np.quantile(u, 0.5 if uq is None else uq)) if n else None)
    t_q = qt if qt is not None else (float(np.quantile(q, 0.5 if qq is None else qq)) if n else None)
    rho, p = _spearman(u, q)
    high_u = u > t_u if n else np.zeros(0, bool)
    low_q = (q < t_q if higher_is_better else q > t_q) if n else np.zeros(0, bool)
    bad = -q if higher_is_better else q  # larger = worse
    # ties after both values go by id: Arrow ranks the strings once (C++, not Python compares)
    id_rank = (np.asarray(pc.rank(ids_arr, sort_keys="ascending", tiebreaker="first"), np.int64)
               if n and cap else np.zeros(n, np.int64))
    quadrants = []
    for name, u_side, q_side in QUADRANTS:
        mask = (high_u if u_side == "high" else ~high_u) & (low_q if q_side == "low" else ~low_q)
        rows = np.flatnonzero(mask)
        shown: list[str] = []
        if len(rows) and cap:
            key_u = -u[rows] if u_side == "high" else u[rows]
            key_q = -bad[rows] if q_side == "low" else bad[rows]
            order = rows[np.lexsort((id_rank[rows], key_q, key_u))[:cap]]
            shown = ids_arr.take(pa.array(order, pa.int64())).to_pylist()
        quadrants.append(Quadrant(name, u_side, q_side, int(len(rows)), shown,
                                  float(u[rows].mean()) if len(rows) else None,
                                  float(q[rows].mean()) if len(rows) else None))
    rho_error = None if rho is None else (-rho if higher_is_better else rho)
    return Report(n=n, non_finite=int(len(ok) - n), rho=rho, p_value=p, rho_error=rho_error,
                  uncertainty_threshold=t_u, quality_threshold=t_q, higher_is_better=bool(higher_is_better),
                  quadrants=tuple(quadrants))


def label_quality(probs: np.ndarray, labels: np.ndarray, measure: str) -> np.ndarray:
    """Per-row quality of class probabilities ``probs`` (n, C) against class indices
    ``labels`` (n,) in ``[0, C)``: ``correct`` = 1.0 when ``argmax_c p_c`` (lowest class on
    ties) equals the label, else 0.0 (higher is better); ``loss`` = ``-log p_label`` with
    ``p`` clipped to the smallest positive float64 (lower is better)."""
    p = np.asarray(probs, dtype=np.float64)
    y = np.asarray(labels, dtype=np.int64)
    if p.ndim != 2 or y.shape != (p.shape[0],):
        raise ValueError(f"probs must be (n, C) and labels (n,); got {p.shape} and {y.shape}")
    if len(y) and (y.min() < 0 or y.max() >= p.shape[1]):
        raise ValueError(f"labels must lie in [0, {p.shape[1]}), got range [{y.min()}, {y.max()}]")
    if measure == "correct":
        return (p.argmax(axis=1) == y).astype(np.float64) if len(y) else np.zeros(0)
    if measure == "loss":
        return -np.log(np.maximum(p[np.arange(len(y)), y], _TINY)) if len(y) else np.zeros(0)
    raise ValueError(f"measure must be one of {', '.join(LABEL_QUALITIES)}, got {measure!r}")


def mask_iou(pred: np.ndarray, gt: np.ndarray, ignore: int = _VOID) -> float:
    """Per-image IoU of a predicted class map ``pred`` (H, W) against a ground-truth map
    ``gt`` (H, W) (``0`` = no class, ``k >= 1`` = a class; ``ignore`` in ``gt`` = a pixel
    left out): the mean over the classes present in either map (on the pixels kept) of
    ``|P_c ∩ G_c| / |P_c ∪ G_c|``; 1.0 when neither map has any class there. ValueError
    for maps of different shapes."""
    p = np.asarray(pred)
    g = np.asarray(gt)
    if p.shape != g.shape:
        raise ValueError(f"the masks have different shapes: {p.shape} and {g.shape}")
    keep = g != ignore
    p = p[keep].astype(np.int64)
    g = g[keep].astype(np.int64)
    size = int(max(p.max(initial=0), g.max(initial=0))) + 1
    inter = np.bincount(p[p == g], minlength=size)[1:]
    union = np.bincount(p, minlength=size)[1:] + np.bincount(g, minlength=size)[1:] - inter
    present = union > 0
    if not present.any():
        return 1.0  # nothing to find, nothing found
    return float((inter[present] / union[present]).mean())


# -- the collection part -----------------------------------------------------------------------


def _field_type(schema: pa.Schema, path: str, what: str, collection: str) -> pa.DataType:
    """The type of a column or a dotted struct path; InvalidArgument naming ``what``."""
    parts = path.split(".")
    if parts[0] not in schema.names:
        raise InvalidArgument(f"{what}: unknown field '{path}' in collection '{collection}' (columns: "
                              f"{', '.join(schema.names)})")
    t = schema.field(parts[0]).type
    for i, part in enumerate(parts[1:], start=1):
        if not pa.types.is_struct(t) or t.get_field_index(part) < 0:
            raise InvalidArgument(f"{what}: '{'.'.join(parts[:i])}' has no field '{part}' (type {t})")
        t = t.field(part).type
    return t


def _numeric(schema: pa.Schema, path: str, what: str, collection: str, hint: str) -> None:
    t = _field_type(schema, path, what, collection)
    if not (pa.types.is_integer(t) or pa.types.is_floating(t) or pa.types.is_decimal(t)
            or pa.types.is_boolean(t)):
        raise InvalidArgument(f"{what}: field '{path}' has type {t}; it must be numeric (one number per row). {hint}")


@dataclass(frozen=True)
class _Source:
    kind: str  # "measure" | "field" | "run" (uncertainty); "correct" | "loss" | "iou" | "field" (quality)
    name: str


def _uncertainty_source(schema: pa.Schema, spec: ModelSpec | None, uncertainty: str | None,
                        run: bool, box_scores: Mapping[str, BoxScorer] | None, collection: str) -> _Source:
    if run:
        if uncertainty:
            raise InvalidArgument(f"give uncertainty or run_id, not both (got uncertainty={uncertainty!r} and a "
                                  "run_id): the run's scores are the uncertainty")
        return _Source("run", "run")
    segmentation = spec is not None and spec.task == "segmentation"
    name = uncertainty or (SEGMENTATION_UNCERTAINTIES[0] if segmentation else "entropy")
    if not isinstance(name, str):
        raise InvalidArgument(f"uncertainty must be a measure name or a field, got {name!r}")
    if segmentation:
        assert spec is not None
        if name in SEGMENTATION_UNCERTAINTIES:  # a stored summary: the field pred_<m>.<name>
            return _Source("field", f"{spec.column}.{name}")
        if name in PROB_MEASURES:
            raise InvalidArgument(
                f"uncertainty '{name}': segmentation model '{spec.name}' stores per-image summaries, not "
                f"probabilities: use {', '.join(SEGMENTATION_UNCERTAINTIES)}, a numeric field, or run_id=")
    detection = spec is not None and spec.task == "detection"
    box_methods = tuple(box_scores or ())
    measures = box_methods if detection else tuple(PROB_MEASURES)
    if name in measures or name in PROB_MEASURES:
        if spec is None:
            raise InvalidArgument(f"uncertainty '{name}' is a measure of a model's predictions: give model=")
        if detection and name not in box_methods:
            if not box_methods:
                raise FailedPrecondition("detection uncertainty needs the detection miner's scoring, which only "
                                         "the server passes in (box_scores)")
            raise InvalidArgument(
                f"uncertainty '{name}': detection model '{spec.name}' scores images by "
                f"{', '.join(box_methods)} (per box, entropy-NMS, summed per image as the detection miner "
                "does); for another score run a miner over the labeled rows and pass its run_id")
        return _Source("measure", name)
    if "." not in name and name not in schema.names:
        raise InvalidArgument(
            f"uncertainty '{name}' is neither a measure ({', '.join(measures) if spec else ', '.join(PROB_MEASURES)}"
            f"{'' if spec else ', with model='}) nor a field of collection '{collection}' (a numeric column or "
            "a path such as pred_m.loss); or pass run_id= for a mining run's scores")
    _numeric(schema, name, "uncertainty", collection, "Give a numeric field, a measure name or run_id.")
    return _Source("field", name)


def _quality_source(schema: pa.Schema, spec: ModelSpec | None, quality: str | None, lower_is_better: bool,
                    collection: str) -> _Source:
    if not quality:
        if spec is None:
            raise InvalidArgument("quality: without a model give a numeric field (e.g. quality='my_iou'), or give "
                                  "model= to use 'correct' / 'loss' (classification) or 'iou' (detection)")
        quality = "iou" if spec.task in ("detection", "segmentation") else "correct"
    if not isinstance(quality, str):
        raise InvalidArgument(f"quality must be a measure name or a field, got {quality!r}")
    if quality in (*LABEL_QUALITIES, *DETECTION_QUALITIES):
        if lower_is_better:
            raise InvalidArgument(f"lower_is_better applies to a quality field; '{quality}' has its own direction "
                                  "(loss: lower is better; correct, iou: higher is better)")
        if spec is None:
            raise InvalidArgument(f"quality '{quality}' compares a model's predictions with the labels: give model=")
        if quality in LABEL_QUALITIES and spec.task != "classification":
            raise InvalidArgument(f"quality '{quality}' needs a classification model; '{spec.name}' is a "
                                  f"{spec.task} model: use quality='iou' ("
                                  + ("boxes matched to gt_boxes" if spec.task == "detection"
                                     else f"masks compared with {GT_MASK_COLUMN}") + ") or a numeric field")
        if quality == "iou" and spec.task == "segmentation":
            if GT_MASK_COLUMN not in schema.names:
                raise FailedPrecondition(
                    f"quality 'iou' of segmentation model '{spec.name}' compares {spec.column}.mask_uri with "
                    f"the ground-truth mask in column '{GT_MASK_COLUMN}'; collection '{collection}' has no such "
                    f"column: upsert each labeled image's mask path in it (a PNG of class indices, 255 = ignore, "
                    "or a JSON file of COCO RLE masks; a local path on the server), or declare it with "
                    f"fields={{'{GT_MASK_COLUMN}': 'string'}}")
            _string_field(schema, GT_MASK_COLUMN, collection)
            return _Source("mask_iou", "iou")
        if quality in DETECTION_QUALITIES and spec.task != "detection":
            raise InvalidArgument(f"quality 'iou' needs a detection model (boxes matched to gt_boxes) or a "
                                  "segmentation model (masks compared with gt_mask_uri); "
                                  f"'{spec.name}' is a {spec.task} model: use quality='correct' or 'loss', or a "
                                  "numeric field (e.g. a per-item IoU you stored)")
        if quality == "iou" and "gt_boxes" not in schema.names:
            raise FailedPrecondition(f"quality 'iou' needs gt_boxes; collection '{collection}' has none")
        return _Source(quality, quality)
    if "." not in quality and quality not in schema.names:
        raise InvalidArgument(f"quality '{quality}' is neither a quality measure (correct, loss for classification; "
                              f"iou for detection) nor a field of collection '{collection}'")
    _numeric(schema, quality, "quality", collection,
             "Give a numeric field, or 'correct' / 'loss' / 'iou' with model=.")
    return _Source("field", quality)


def _string_field(schema: pa.Schema, name: str, collection: str) -> None:
    t = schema.field(name).type
    if not (pa.types.is_string(t) or pa.types.is_large_string(t)):
        raise FailedPrecondition(f"column '{name}' of collection '{collection}' has type {t}; it must be a string "
                                 "column of mask paths (one per labeled image)")


def _label_indices(labels: pa.Array, spec: ModelSpec) -> np.ndarray:
    """Class index of each label (-1: not one of the model's classes)."""
    idx = pc.index_in(labels.cast(pa.string()), value_set=pa.array(list(spec.classes), pa.string()))
    return np.asarray(pc.fill_null(idx, -1).to_numpy(zero_copy_only=False), dtype=np.int64)


def _boxes_xy(boxes: pa.Array) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(owning row of each box, (B, 4) float64 coordinates, (B,) float64 scores; NaN
    without a score)."""
    flat = pc.list_flatten(boxes)
    owner = np.asarray(pc.list_parent_indices(boxes).to_numpy(zero_copy_only=False), dtype=np.int64)
    if not len(flat):
        return owner, np.zeros((0, 4)), np.zeros(0)

    def values(name: str, fill: float) -> np.ndarray:
        arr = pc.fill_null(flat.field(name).cast(pa.float64()), fill)
        return np.asarray(arr.to_numpy(zero_copy_only=False), np.float64)

    xy = np.stack([values(k, np.nan) for k in ("x1", "y1", "x2", "y2")], axis=1)
    has_score = flat.type.get_field_index("score") >= 0  # gt boxes have none
    score = values("score", 0.0) if has_score else np.zeros(len(flat))
    return owner, xy, score


def _iou_quality(pred: pa.Array, gt: pa.Array, iou: float) -> np.ndarray:
    """Per-row :func:`indexing.objects.image_iou` (NaN where either list is null)."""
    n = len(pred)
    out = np.full(n, np.nan)
    has = valid_mask(pred) & valid_mask(gt)
    p_img, p_xy, p_score = _boxes_xy(pred)
    g_img, g_xy, _ = _boxes_xy(gt)
    # boxes are flattened in row order: each row's boxes are one contiguous slice
    p_start = np.searchsorted(p_img, np.arange(n + 1))
    g_start = np.searchsorted(g_img, np.arange(n + 1))
    for r in np.flatnonzero(has):
        ps, gs = slice(p_start[r], p_start[r + 1]), slice(g_start[r], g_start[r + 1])
        out[r] = image_iou(p_xy[ps], p_score[ps], g_xy[gs], iou)
    return out


def _mask_quality(ids: pa.Array, pred: pa.Array, gt: pa.Array, labeled: np.ndarray,
                  spec: ModelSpec) -> tuple[np.ndarray, np.ndarray, int, str | None]:
    """Per-row :func:`mask_iou` of the masks ``pred`` (uris) against ``gt`` (uris) on the
    ``labeled`` rows: (quality, has a quality, rows whose mask file is missing or
    unreadable, the first such reason). A row without a predicted mask uri has no quality
    (counted ``missing`` by the caller, not here); masks of different shapes raise
    FailedPrecondition naming the row."""
    n = len(ids)
    q = np.full(n, np.nan)
    got = np.zeros(n, bool)
    lost = 0
    problem: str | None = None
    pred_uris = pred.to_pylist()
    gt_uris = gt.to_pylist()
    for r in np.flatnonzero(labeled & valid_mask(pred)):
        read: list[np.ndarray] = []
        for what, uri, ignore in ((f"{spec.column}.mask_uri", pred_uris[r], None),
                                  (GT_MASK_COLUMN, gt_uris[r], _VOID)):
            try:
                mask = read_mask(uri, spec.classes, ignore=ignore)
                reason = f"{uri!r} is not a local file" if mask is None else None
            except MaskError as exc:
                mask, reason = None, f"{uri!r}: {exc}"
            if mask is None:
                lost += 1
                problem = problem or f"row {ids[int(r)].as_py()!r}: {what} {reason}"
                break
            read.append(mask)
        if len(read) < 2:
            continue
        if read[0].shape != read[1].shape:
            raise FailedPrecondition(
                f"row {ids[int(r)].as_py()!r}: the predicted mask ({spec.column}.mask_uri {pred_uris[r]!r}) is "
                f"{read[0].shape[0]}x{read[0].shape[1]} and the ground truth ({GT_MASK_COLUMN} {gt_uris[r]!r}) is "
                f"{read[1].shape[0]}x{read[1].shape[1]} (HxW); masks of one image must have one size: fix "
                "one of them, or leave the row out with where=")
        q[r] = mask_iou(read[0], read[1], _VOID)
        got[r] = True
    return q, got, lost, problem


def uncertainty_quality(
    col: Any, model: str | None = None, uncertainty: str | None = None, quality: str | None = None,
    where: str | None = None, *, version: int | str | None = None, run_scores: pa.Table | None = None,
    run_id: str | None = None, box_scores: Mapping[str, BoxScorer] | None = None, iou: float = 0.5,
    lower_is_better: bool = False, uncertainty_quantile: float | None = None,
    quality_quantile: float | None = None, uncertainty_threshold: float | None = None,
    quality_threshold: float | None = None, max_ids: int = DEFAULT_MAX_IDS,
) -> pa.Table:
    """The uncertainty-vs-quality report of ``col``'s labeled rows matching ``where`` (at
    ``version``), as a table of the four quadrants: ``quadrant``, ``uncertainty``
    (high/low), ``quality`` (high/low), ``count``, ``mean_uncertainty``, ``mean_quality``,
    ``ids`` (at most ``max_ids``, most extreme first); the correlation, ``n``, thresholds
    and the rows left out are in the schema metadata (:func:`report_stats`).

    ``uncertainty``: a measure name (default ``entropy``; a segmentation model's stored
    ``topq_entropy`` (its default), ``mean_entropy`` or ``bald``), a numeric field or path; or
    ``run_scores`` (``id``, ``score`` of a finished mining run; ``run_id`` names it in the
    metadata). ``quality``: ``correct`` (default for classification), ``loss``, ``iou``
    (default for detection, matching at ``iou``, and for segmentation, the masks against
    ``gt_mask_uri``) or a numeric field (``lower_is_better``).
    ``box_scores`` maps a detection uncertainty method to its scoring function (the server
    passes the detection miner's). Definitions: the module doc.

    Raises InvalidArgument for a bad option, an unknown or non-numeric field, a measure that
    does not fit the model's task; FailedPrecondition when no labeled row has both values,
    when a segmentation ``iou`` finds no ``gt_mask_uri`` column or two masks of one row
    differ in size.
    """
    if model is not None and not isinstance(model, str):
        raise InvalidArgument(f"model must be a model name, got {model!r}")
    spec: ModelSpec | None = col.model(model) if model else None  # NotFound names the models
    table = col.table if version is None else col.at_version(version)
    schema = table.schema
    if not isinstance(iou, int | float) or isinstance(iou, bool) or not 0.0 < float(iou) <= 1.0:
        raise InvalidArgument(f"iou must be in (0, 1], got {iou!r}")
    src_u = _uncertainty_source(schema, spec, uncertainty, run_scores is not None, box_scores, col.name)
    src_q = _quality_source(schema, spec, quality, bool(lower_is_better), col.name)
    higher_is_better = not (src_q.kind == "loss" or (src_q.kind == "field" and lower_is_better))
    cap = _max_ids(max_ids)
    # validate the options before the scan (report() checks them again on the arrays)
    for v, name in ((uncertainty_quantile, "uncertainty_quantile"), (quality_quantile, "quality_quantile")):
        _fraction(v, name)
    _finite(uncertainty_threshold, "uncertainty_threshold")
    _finite(quality_threshold, "quality_threshold")
    if quality_threshold is None and quality_quantile is None and src_q.kind == "correct":
        quality_threshold = 0.5  # correct vs wrong, whatever the share of errors

    needs_probs = (spec is not None and spec.task == "classification"
                   and (src_u.kind == "measure" or src_q.kind in LABEL_QUALITIES))
    needs_boxes = spec is not None and spec.task == "detection" and (src_u.kind == "measure" or src_q.kind == "iou")
    proj: dict[str, str] = {"id": "id"}
    if needs_probs:
        assert spec is not None
        proj.update(probs=f"{spec.column}.probs", logits=f"{spec.column}.logits",
                    samples=f"{spec.column}.samples")
    if needs_boxes:
        assert spec is not None
        proj["boxes"] = f"{spec.column}.boxes"
    if src_q.kind in LABEL_QUALITIES:
        proj["label"] = "label"
    if src_q.kind == "iou":
        proj["gt"] = "gt_boxes"
    if src_q.kind == "mask_iou":
        assert spec is not None
        proj.update(gt=GT_MASK_COLUMN, pred_mask=f"{spec.column}.mask_uri")
    if src_u.kind == "field":
        proj["u"] = src_u.name
    if src_q.kind == "field":
        proj["q"] = src_q.name
    run_ids = run_vals = None
    if run_scores is not None:
        run_ids = run_scores.column("id").combine_chunks()
        run_vals = np.asarray(run_scores.column("score").to_numpy(), dtype=np.float64)

    ids_parts: list[pa.Array] = []
    u_parts: list[np.ndarray] = []
    q_parts: list[np.ndarray] = []
    rows = missing = unknown = missing_masks = 0
    mask_problem: str | None = None
    for batch in stream(col, proj, where, version=version):
        n = batch.num_rows
        ids = batch.column("id")
        # the labeled rows of the batch
        if src_q.kind in LABEL_QUALITIES:
            labeled = valid_mask(batch.column("label"))
        elif src_q.kind in ("iou", "mask_iou"):
            labeled = valid_mask(batch.column("gt"))
        else:
            labeled = valid_mask(batch.column("q"))
        u = np.full(n, np.nan)
        q = np.full(n, np.nan)
        got_u = np.zeros(n, bool)
        got_q = np.zeros(n, bool)
        ok_label = np.ones(n, bool)
        if needs_probs:
            assert spec is not None
            keep, p = prediction_probs(batch.column("probs"), batch.column("logits"), spec.num_classes,
                                       samples=batch.column("samples"))
            if src_u.kind == "measure":
                u[keep] = PROB_MEASURES[src_u.name].fn(p, validate=False) if len(keep) else 0.0
                got_u[keep] = True
            if src_q.kind in LABEL_QUALITIES:
                y = _label_indices(batch.column("label"), spec)
                ok_label = ~labeled | (y >= 0)
                known = y[keep] >= 0  # rows with a prediction whose label is a class of the model
                use = keep[known]
                if len(use):
                    q[use] = label_quality(p[known], y[use], src_q.kind)
                got_q[use] = True
        if needs_boxes:
            boxes = batch.column("boxes")
            if src_u.kind == "measure":
                assert box_scores is not None
                u = np.asarray(box_scores[src_u.name](ids, boxes, spec), dtype=np.float64)
                got_u = valid_mask(boxes)
            if src_q.kind == "iou":
                q = _iou_quality(boxes, batch.column("gt"), float(iou))
                got_q = valid_mask(boxes) & labeled
        if src_u.kind == "field":
            col_u = batch.column("u")
            got_u = valid_mask(col_u)
            u = np.asarray(pc.fill_null(col_u.cast(pa.float64()), np.nan).to_numpy(zero_copy_only=False), np.float64)
        elif src_u.kind == "run":
            assert run_ids is not None and run_vals is not None
            pos = pc.index_in(ids, value_set=run_ids)
            got_u = valid_mask(pos)
            at = np.asarray(pc.fill_null(pos, 0).to_numpy(zero_copy_only=False), np.int64)
            u = np.where(got_u, run_vals[at] if len(run_vals) else np.nan, np.nan)
        if src_q.kind == "mask_iou":
            assert spec is not None
            q, got_q, lost_masks, problem = _mask_quality(ids, batch.column("pred_mask"), batch.column("gt"),
                                                          labeled, spec)
            missing_masks += lost_masks
            mask_problem = mask_problem or problem
        if src_q.kind == "field":
            col_q = batch.column("q")
            got_q = valid_mask(col_q)
            q = np.asarray(pc.fill_null(col_q.cast(pa.float64()), np.nan).to_numpy(zero_copy_only=False), np.float64)
        rows += int(labeled.sum())
        bad_label = labeled & ~ok_label
        unknown += int(bad_label.sum())
        lost = labeled & ok_label & ~(got_u & got_q)
        missing += int(lost.sum())
        take = np.flatnonzero(labeled & ok_label & got_u & got_q)
        if len(take):
            ids_parts.append(ids.take(pa.array(take, pa.int64())))
            u_parts.append(u[take])
            q_parts.append(q[take])
    ids_all = pa.concat_arrays(ids_parts) if ids_parts else pa.array([], pa.string())
    rep = report(np.concatenate(u_parts) if u_parts else np.zeros(0),
                 np.concatenate(q_parts) if q_parts else np.zeros(0), ids_all,
                 higher_is_better=higher_is_better, uncertainty_quantile=uncertainty_quantile,
                 quality_quantile=quality_quantile, uncertainty_threshold=uncertainty_threshold,
                 quality_threshold=quality_threshold, max_ids=cap)
    if rep.n == 0:
        what = {"correct": "a label", "loss": "a label", "iou": "gt_boxes",
                "mask_iou": GT_MASK_COLUMN}.get(src_q.kind, f"a value of '{src_q.name}'")
        source = {"run": "the mining run did not return them: run its miner over the labeled rows with a "
                         "size that covers them",
                  "field": f"'{src_u.name}' is null on them",
                  "measure": f"model '{model}' has no prediction for them"}[src_u.kind]
        raise FailedPrecondition(
            f"uncertainty_quality: no row of collection '{col.name}'{' matching where' if where else ''} has both "
            f"an uncertainty and a quality: {rows} row(s) have {what}, {unknown} of them a label that is not a "
            f"class of the model, {missing} lack a value (e.g. {source}"
            + (f"; {missing_masks} have a mask file that is missing or unreadable, e.g. {mask_problem}"
               if missing_masks else "") + f"), {rep.non_finite} hold NaN/inf")
    meta = {
        "model": model, "uncertainty": src_u.name if src_u.kind != "run" else f"run:{run_id or ''}",
        "uncertainty_kind": src_u.kind, "run_id": run_id, "quality": src_q.name, "quality_kind": src_q.kind,
        "higher_is_better": rep.higher_is_better, "rho": rep.rho, "p_value": rep.p_value,
        "rho_error": rep.rho_error, "n": rep.n, "rows": rows, "missing": missing, "unknown_label": unknown,
        "non_finite": rep.non_finite, "uncertainty_threshold": rep.uncertainty_threshold,
        "quality_threshold": rep.quality_threshold, "uncertainty_quantile": uncertainty_quantile,
        "quality_quantile": quality_quantile, "max_ids": cap,
        "iou": float(iou) if src_q.kind == "iou" else None,
    }
    if src_q.kind == "mask_iou":
        meta.update(missing_masks=missing_masks, mask_problem=mask_problem, gt_mask_column=GT_MASK_COLUMN)
    return _table(rep, meta)


def _table(rep: Report, meta: Mapping[str, Any]) -> pa.Table:
    schema = pa.schema([
        ("quadrant", pa.string()), ("uncertainty", pa.string()), ("quality", pa.string()), ("count", pa.int64()),
        ("mean_uncertainty", pa.float64()), ("mean_quality", pa.float64()), ("ids", pa.list_(pa.string())),
    ], metadata={META_KEY: json.dumps(dict(meta))})
    qs = rep.quadrants
    return pa.table([
        pa.array([x.name for x in qs]), pa.array([x.uncertainty for x in qs]), pa.array([x.quality for x in qs]),
        pa.array([x.count for x in qs], pa.int64()), pa.array([x.mean_uncertainty for x in qs], pa.float64()),
        pa.array([x.mean_quality for x in qs], pa.float64()), pa.array([x.ids for x in qs], pa.list_(pa.string())),
    ], schema=schema)


def report_stats(table: pa.Table) -> dict[str, Any]:
    """The correlation and counts of an :func:`uncertainty_quality` table (its schema
    metadata): ``rho``, ``p_value``, ``rho_error``, ``n``, ``rows``, ``missing``,
    ``unknown_label``, ``non_finite``, the thresholds and the options used."""
    meta = table.schema.metadata or {}
    if META_KEY not in meta:
        raise InvalidArgument("not an uncertainty_quality table (no assay.uncertainty_quality metadata)")
    return json.loads(meta[META_KEY])
