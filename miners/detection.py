"""Object-detection uncertainty: per-box scores, entropy-NMS, per-image aggregation,
and class-balanced budgets.

Pure NumPy; no storage, no I/O. Everything is computed in float64.

Data layout (flat and ragged, as an Arrow ``list<struct>`` column flattened): a chunk of
``N`` images holding ``B`` boxes in total is described by

* ``box_image`` -- int array ``(B,)``: the image index (``0 <= i < N``) of each box. Rows are
  normally sorted by image, but no function here relies on that order.
* ``boxes`` -- ``(B, 4)``: ``x1, y1, x2, y2`` with ``x2 >= x1`` and ``y2 >= y1``.
* ``box_scores`` -- ``(B,)``: detector confidence in ``[0, 1]``.
* ``box_probs`` -- ``(B, C)`` per-box class probabilities (rows sum to 1), or ``None`` when the
  detector only gives a confidence.
* ``n_images`` -- ``N``.

Score convention: every score is a float64 array where HIGHER means MORE INFORMATIVE and is
selected first. Invalid input raises :class:`ValueError` with the offending shape or value.
"""

from __future__ import annotations

import numpy as np

__all__ = [
    "BOX_METHODS",
    "AGGREGATIONS",
    "BALANCE_MODES",
    "box_iou",
    "box_uncertainty",
    "entropy_nms",
    "aggregate_image_scores",
    "detection_scores",
    "class_balanced_select",
]

BOX_METHODS = ("entropy", "one_minus_score", "margin")
AGGREGATIONS = ("sum", "mean", "max")
BALANCE_MODES = ("equal", "inverse_frequency")

_PROB_RANGE_TOL = 1e-6  # float32 softmax outputs may exceed 1 by a few ulps
_PROB_SUM_TOL = 1e-3
_NMS_CHUNK_ELEMENTS = 1 << 20  # padded (images x M x M) pairs per vectorised NMS step


# --------------------------------------------------------------------------- validation


def _float_array(x: object, name: str, ndim: int) -> np.ndarray:
    try:
        a = np.asarray(x, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{name} must be numeric: {exc}") from None
    if a.ndim != ndim:
        raise ValueError(f"{name} must be {ndim}-D, got shape {a.shape}")
    if not np.all(np.isfinite(a)):
        bad = int(np.flatnonzero(~np.isfinite(a.reshape(-1)))[0])
        raise ValueError(f"{name} contains NaN or inf (first at flat index {bad})")
    return a


def _int_array(x: object, name: str) -> np.ndarray:
    a = np.asarray(x)
    if a.ndim != 1:
        raise ValueError(f"{name} must be 1-D, got shape {a.shape}")
    if a.size and not np.issubdtype(a.dtype, np.integer):
        raise ValueError(f"{name} must have an integer dtype, got {a.dtype}")
    return a.astype(np.int64, copy=False)


def _check_len(a: np.ndarray, n: int, name: str, what: str) -> None:
    if a.shape[0] != n:
        raise ValueError(f"{name} has {a.shape[0]} rows, expected {n} ({what})")


def _check_scores01(s: np.ndarray, name: str) -> np.ndarray:
    if s.size and (s.min() < -_PROB_RANGE_TOL or s.max() > 1 + _PROB_RANGE_TOL):
        raise ValueError(f"{name} must lie in [0, 1], got range [{s.min()}, {s.max()}]")
    return np.clip(s, 0.0, 1.0)


def _check_probs(p: object, name: str = "box_probs") -> np.ndarray:
    a = _float_array(p, name, 2)
    if a.shape[1] < 1:
        raise ValueError(f"{name} must have at least one class column, got shape {a.shape}")
    if a.size == 0:
        return a
    if a.min() < -_PROB_RANGE_TOL or a.max() > 1 + _PROB_RANGE_TOL:
        raise ValueError(f"{name} must lie in [0, 1], got range [{a.min()}, {a.max()}]")
    sums = a.sum(axis=1)
    off = np.abs(sums - 1.0)
    if off.max() > _PROB_SUM_TOL:
        row = int(np.argmax(off))
        raise ValueError(
            f"{name} rows must sum to 1 within {_PROB_SUM_TOL}; row {row} sums to {sums[row]}"
        )
    return np.clip(a, 0.0, 1.0)


def _check_box_image(box_image: object, n_images: int | None) -> np.ndarray:
    img = _int_array(box_image, "box_image")
    if n_images is not None:
        if isinstance(n_images, bool) or not isinstance(n_images, int | np.integer):
            raise ValueError(f"n_images must be an int, got {type(n_images).__name__}")
        if n_images < 0:
            raise ValueError(f"n_images must be >= 0, got {n_images}")
    if img.size:
        lo, hi = int(img.min()), int(img.max())
        if lo < 0:
            raise ValueError(f"box_image must be >= 0, got {lo}")
        if n_images is not None and hi >= n_images:
            raise ValueError(f"box_image must be < n_images={n_images}, got {hi}")
    return img


def _check_boxes(boxes: object, n: int) -> np.ndarray:
    b = np.asarray(boxes, dtype=np.float64)
    if b.ndim != 2 or b.shape[1] != 4 or b.shape[0] != n:
        raise ValueError(f"boxes must have shape ({n}, 4) as x1,y1,x2,y2, got {b.shape}")
    b = _float_array(b, "boxes", 2)
    bad = (b[:, 2] < b[:, 0]) | (b[:, 3] < b[:, 1])
    if bad.any():
        row = int(np.flatnonzero(bad)[0])
        raise ValueError(
            f"boxes must satisfy x2 >= x1 and y2 >= y1; row {row} is {b[row].tolist()}"
        )
    return b


# --------------------------------------------------------------------------- per box


def box_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Intersection over union of paired boxes, broadcasting over leading axes.

    ``a`` and ``b`` are ``(..., 4)`` arrays of ``x1, y1, x2, y2``; the result has the
    broadcast leading shape. ``IoU = |a ∩ b| / (|a| + |b| - |a ∩ b|)``, and ``0`` when the
    union has zero area (two degenerate boxes). Inputs are assumed valid (no checks).
    """
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    iw = np.minimum(a[..., 2], b[..., 2]) - np.maximum(a[..., 0], b[..., 0])
    ih = np.minimum(a[..., 3], b[..., 3]) - np.maximum(a[..., 1], b[..., 1])
    inter = np.clip(iw, 0.0, None) * np.clip(ih, 0.0, None)
    area_a = (a[..., 2] - a[..., 0]) * (a[..., 3] - a[..., 1])
    area_b = (b[..., 2] - b[..., 0]) * (b[..., 3] - b[..., 1])
    union = area_a + area_b - inter
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(union > 0, inter / np.where(union > 0, union, 1.0), 0.0)


def box_uncertainty(
    box_scores: np.ndarray | None,
    box_probs: np.ndarray | None,
    method: str = "entropy",
) -> np.ndarray:
    """Uncertainty of every box, float64 ``(B,)``, higher = more uncertain.

    Methods (``p`` is a row of ``box_probs`` with ``C`` classes, ``s`` the box score):

    * ``"entropy"``: normalised Shannon entropy ``H(p) / log C = -sum_c p_c log p_c / log C``
      in ``[0, 1]``, with ``0 log 0 = 0``; ``0`` when ``C = 1``. Needs ``box_probs``.
    * ``"one_minus_score"``: ``1 - s``. Needs ``box_scores`` (in ``[0, 1]``).
    * ``"margin"``: ``1 - (p_(1) - p_(2))`` where ``p_(1) >= p_(2)`` are the two largest
      probabilities (``p_(2) = 0`` when ``C = 1``); in ``[0, 1]``. Needs ``box_probs``.

    ``box_scores`` may be ``None`` for the probability methods; when given it must be 1-D in
    ``[0, 1]`` with the same number of rows as ``box_probs``.
    """
    if method not in BOX_METHODS:
        raise ValueError(
            f"unknown box uncertainty method {method!r}; expected one of {BOX_METHODS}"
        )
    scores = None
    if box_scores is not None:
        scores = _check_scores01(_float_array(box_scores, "box_scores", 1), "box_scores")
    probs = None
    if box_probs is not None:
        probs = _check_probs(box_probs)
        if scores is not None:
            _check_len(probs, scores.shape[0], "box_probs", "one row per box score")

    if method == "one_minus_score":
        if scores is None:
            raise ValueError("method 'one_minus_score' needs box_scores")
        return 1.0 - scores

    if probs is None:
        raise ValueError(f"method {method!r} needs box_probs (got None)")
    n, c = probs.shape
    if c == 1:
        return np.zeros(n) if method == "entropy" else 1.0 - probs[:, 0]
    if method == "entropy":
        plogp = probs * np.log(np.where(probs > 0, probs, 1.0))
        return np.clip(-plogp.sum(axis=1) / np.log(c), 0.0, 1.0)
    top2 = np.partition(probs, c - 2, axis=1)[:, c - 2 :]
    return np.clip(1.0 - (top2[:, 1] - top2[:, 0]), 0.0, 1.0)


# --------------------------------------------------------------------------- entropy-NMS


def _pad_size(counts: np.ndarray) -> np.ndarray:
    """Padded group size: exact up to 8, then rounded up to a quarter octave (<= 25% waste)."""
    octave = np.floor(np.log2(np.maximum(counts, 1))).astype(np.int64)
    step = np.left_shift(1, np.maximum(octave - 2, 0))
    return np.where(counts <= 8, counts, -(-counts // step) * step)


def entropy_nms(
    box_image: np.ndarray,
    boxes: np.ndarray,
    box_classes: np.ndarray,
    box_unc: np.ndarray,
    iou_threshold: float = 0.5,
) -> np.ndarray:
    """Entropy-NMS: keep mask ``(B,)`` (bool) removing near-duplicate uncertain boxes.

    Within each image, boxes are visited by decreasing uncertainty (ties: lower row index
    first). A box is kept unless some already KEPT box of the SAME class, visited before it,
    has ``IoU > iou_threshold`` with it (strictly greater: a pair exactly at the threshold
    is not suppressed). This is greedy NMS with uncertainty in place of confidence, so one
    object that the detector reports several times contributes its uncertainty once
    (Datature's entropy-NMS; Haussmann et al., "Scalable Active Learning for Object
    Detection", 2020). Boxes of different classes or different images never interact.

    Implementation: since classes never interact, the greedy pass runs per (image, class)
    group. Groups are bucketed by size ``M`` (exact up to 8 boxes, then rounded up to a
    quarter octave); each bucket is processed in chunks as a padded ``(groups, M, M)`` IoU
    tensor and the greedy pass is ``M`` vectorised steps across all groups of the chunk.
    Cost is ``O(sum_g M_g^2)`` time and ``O(chunk)`` memory (about 2^20 pairs per chunk);
    a single group of ``M`` boxes costs ``M^2`` memory.
    """
    img = _check_box_image(box_image, None)
    n = img.shape[0]
    b = _check_boxes(boxes, n)
    cls = _int_array(box_classes, "box_classes")
    _check_len(cls, n, "box_classes", "one class per box")
    unc = _float_array(box_unc, "box_unc", 1)
    _check_len(unc, n, "box_unc", "one uncertainty per box")
    thr = float(iou_threshold)
    if not np.isfinite(thr) or not 0.0 <= thr <= 1.0:
        raise ValueError(f"iou_threshold must be in [0, 1], got {iou_threshold}")

    keep = np.ones(n, dtype=bool)
    if n < 2:
        return keep
    # Boxes of different classes never interact, so greedy NMS runs independently in every
    # (image, class) group. Sort by image, class, uncertainty descending, row index.
    order = np.lexsort((np.arange(n), -unc, cls, img))
    io, co = img[order], cls[order]
    new_group = np.ones(n, dtype=bool)
    new_group[1:] = (io[1:] != io[:-1]) | (co[1:] != co[:-1])
    starts = np.flatnonzero(new_group)
    counts = np.diff(np.append(starts, n))
    multi = counts > 1
    starts, counts = starts[multi], counts[multi]
    if counts.size == 0:
        return keep
    padded = _pad_size(counts)
    for m in np.unique(padded):
        m = int(m)
        sel = np.flatnonzero(padded == m)
        col = np.arange(m)
        tri = col[:, None] < col[None, :]
        step = max(1, _NMS_CHUNK_ELEMENTS // (m * m))
        for lo in range(0, sel.size, step):
            g = sel[lo : lo + step]
            cnt = counts[g]
            valid = col[None, :] < cnt[:, None]
            ids = order[np.where(valid, starts[g][:, None] + col[None, :], 0)]  # (G, M)
            bx = b[ids]
            over = box_iou(bx[:, :, None, :], bx[:, None, :, :]) > thr
            over &= tri
            over &= valid[:, None, :]
            kept = np.zeros_like(valid)
            supp = np.zeros_like(valid)
            for r in range(int(cnt.max())):
                k = valid[:, r] & ~supp[:, r]
                kept[:, r] = k
                supp |= k[:, None] & over[:, r, :]
            keep[ids[valid]] = kept[valid]
    return keep


# --------------------------------------------------------------------------- per image


def aggregate_image_scores(
    box_image: np.ndarray,
    box_unc: np.ndarray,
    n_images: int,
    how: str = "sum",
    keep: np.ndarray | None = None,
) -> np.ndarray:
    """Per-image score ``(n_images,)`` from per-box uncertainties.

    With ``K_i`` the (kept) boxes of image ``i`` and ``u_b`` their uncertainties:
    ``"sum"``: ``sum_{b in K_i} u_b``; ``"mean"``: ``sum / |K_i|``; ``"max"``:
    ``max_{b in K_i} u_b``. An image with no boxes, or whose boxes were all dropped by
    ``keep``, scores exactly ``0`` under every aggregation (nothing detected = nothing
    uncertain to label; with non-negative uncertainties it ranks last). ``keep`` is an
    optional bool mask ``(B,)`` (e.g. from :func:`entropy_nms`).
    """
    if how not in AGGREGATIONS:
        raise ValueError(f"unknown aggregation {how!r}; expected one of {AGGREGATIONS}")
    img = _check_box_image(box_image, n_images)
    unc = _float_array(box_unc, "box_unc", 1)
    _check_len(unc, img.shape[0], "box_unc", "one uncertainty per box_image entry")
    if keep is not None:
        k = np.asarray(keep)
        if k.dtype != np.bool_:
            raise ValueError(f"keep must be a bool mask, got dtype {k.dtype}")
        if k.shape != img.shape:
            raise ValueError(f"keep must have shape {img.shape}, got {k.shape}")
        img, unc = img[k], unc[k]
    counts = np.bincount(img, minlength=n_images)
    if how == "max":
        out = np.full(n_images, -np.inf)
        np.maximum.at(out, img, unc)
        out[counts == 0] = 0.0
        return out
    sums = np.bincount(img, weights=unc, minlength=n_images).astype(np.float64, copy=False)
    if how == "sum":
        return sums
    return np.where(counts > 0, sums / np.maximum(counts, 1), 0.0)


def detection_scores(
    box_image: np.ndarray,
    boxes: np.ndarray,
    box_scores: np.ndarray,
    box_probs: np.ndarray | None,
    n_images: int,
    *,
    method: str = "entropy",
    aggregate: str = "sum",
    nms_iou: float | None = 0.5,
) -> np.ndarray:
    """Per-image detection uncertainty ``(n_images,)``, higher = more informative.

    ``u = box_uncertainty(box_scores, box_probs, method)``; the predicted class of a box is
    ``argmax_c box_probs[b, c]`` (lowest class on ties), or class 0 for every box when
    ``box_probs`` is None; when ``nms_iou`` is not None, ``keep = entropy_nms(box_image,
    boxes, classes, u, nms_iou)``, otherwise every box is kept; the result is
    ``aggregate_image_scores(box_image, u, n_images, aggregate, keep)``. Images without
    boxes score 0.
    """
    img = _check_box_image(box_image, n_images)
    n = img.shape[0]
    scores = _float_array(box_scores, "box_scores", 1)
    _check_len(scores, n, "box_scores", "one score per box")
    probs = None
    if box_probs is not None:
        probs = np.asarray(box_probs)
        if probs.ndim != 2 or probs.shape[0] != n:
            raise ValueError(f"box_probs must have shape ({n}, C), got {probs.shape}")
    unc = box_uncertainty(scores, probs, method)
    keep = None
    if nms_iou is not None:
        if probs is None:
            classes = np.zeros(n, dtype=np.int64)
        elif n == 0:
            classes = np.zeros(0, dtype=np.int64)
        else:
            classes = np.argmax(probs, axis=1).astype(np.int64)
        keep = entropy_nms(img, boxes, classes, unc, nms_iou)
    elif n:
        _check_boxes(boxes, n)
    return aggregate_image_scores(img, unc, n_images, aggregate, keep)


# --------------------------------------------------------------------------- budgets


def _balanced_quotas(weights: np.ndarray, capacity: np.ndarray, size: int) -> np.ndarray:
    """Water-filling: integer quotas ``q <= capacity`` with ``q`` proportional to weights.

    Classes whose proportional share exceeds their capacity get their capacity and the rest
    is re-split among the others; the remaining shares are floored (the leftover units are
    filled by score by the caller).
    """
    q = np.zeros(capacity.shape[0], dtype=np.int64)
    active = capacity > 0
    remaining = size
    while remaining > 0 and active.any():
        share = remaining * weights * active / weights[active].sum()
        full = active & (capacity <= share)
        if full.any():
            q[full] = capacity[full]
            remaining -= int(capacity[full].sum())
            active &= ~full
            continue
        q[active] = np.floor(share[active]).astype(np.int64)
        break
    return q


def class_balanced_select(
    scores: np.ndarray,
    classes: np.ndarray,
    size: int,
    *,
    num_classes: int,
    mode: str = "equal",
    class_counts: np.ndarray | None = None,
) -> np.ndarray:
    """Pick ``min(size, N)`` items with the budget split across predicted classes.

    ``classes[i] = -1`` marks an item without a predicted class (a detection image with no
    boxes): it takes part in no class quota and competes, by score, only for the slots the
    quotas leave free.

    Weights: ``"equal"``: ``w_c = 1``; ``"inverse_frequency"``: ``w_c = 1 / max(f_c, 1)``
    where ``f = class_counts`` (e.g. labelled counts per class; a class with no labels counts
    as one) or, when ``class_counts`` is None, the counts of ``classes`` in this pool.

    Quotas: only classes present in the pool take part; the budget is split as
    ``size * w_c / sum w`` (water-filling: a class with fewer items than its share gets all
    its items and the unused budget is re-split among the others by weight), shares are
    floored, and each class contributes its top-scored items. The slots still free (rounding
    remainders) go to the highest-scored items not yet taken, whatever their class.

    Returns int64 indices into ``scores``, ordered by score descending; ties anywhere
    (within a class or in the fill) are broken by the lower index, so the result is
    deterministic.
    """
    s = _float_array(scores, "scores", 1)
    n = s.shape[0]
    c = _int_array(classes, "classes")
    _check_len(c, n, "classes", "one predicted class per score")
    if isinstance(num_classes, bool) or not isinstance(num_classes, int | np.integer):
        raise ValueError(f"num_classes must be an int, got {type(num_classes).__name__}")
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    if isinstance(size, bool) or not isinstance(size, int | np.integer):
        raise ValueError(f"size must be an int, got {type(size).__name__}")
    if size < 0:
        raise ValueError(f"size must be >= 0, got {size}")
    if mode not in BALANCE_MODES:
        raise ValueError(f"unknown mode {mode!r}; expected one of {BALANCE_MODES}")
    if c.size and (c.min() < -1 or c.max() >= num_classes):
        raise ValueError(
            f"classes must lie in [0, {num_classes}) or be -1 (no class), "
            f"got range [{c.min()}, {c.max()}]"
        )
    classless = c < 0
    capacity = np.bincount(c[~classless], minlength=num_classes).astype(np.int64)
    if mode == "equal":
        weights = np.ones(num_classes)
    else:
        if class_counts is None:
            freq = capacity.astype(np.float64)
        else:
            freq = _float_array(class_counts, "class_counts", 1)
            if freq.shape != (num_classes,):
                raise ValueError(f"class_counts must have shape ({num_classes},), got {freq.shape}")
            if freq.size and freq.min() < 0:
                raise ValueError(f"class_counts must be >= 0, got min {freq.min()}")
        weights = 1.0 / np.maximum(freq, 1.0)

    size = min(int(size), n)
    if size == 0:
        return np.zeros(0, dtype=np.int64)
    quota = _balanced_quotas(weights, capacity, size)

    order = np.lexsort((np.arange(n), -s))  # score desc, index asc
    # classless items sort into a group of their own after the classes, with no quota
    cls_o = np.where(c[order] < 0, num_classes, c[order])
    # rank of each item within its class, in score order
    by_class = np.argsort(cls_o, kind="stable")
    class_start = np.concatenate(([0], np.cumsum(capacity)))
    rank = np.empty(n, dtype=np.int64)
    rank[by_class] = np.arange(n) - class_start[cls_o[by_class]]
    taken = rank < np.append(quota, 0)[cls_o]
    free = size - int(taken.sum())
    if free > 0:
        fill = np.flatnonzero(~taken)[:free]
        taken[fill] = True
    return order[taken].astype(np.int64)
