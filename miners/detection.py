"""Object-detection uncertainty: per-box scores, entropy-NMS, per-image aggregation,
class-balanced budgets, and the two diversity-aware acquisitions built on them: DivProto
(Wu et al., CVPR 2022) and PPAL (Yang et al., CVPR 2024).

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

from dataclasses import dataclass

import numpy as np

__all__ = [
    "BOX_METHODS",
    "AGGREGATIONS",
    "BALANCE_MODES",
    "PPAL_MAX_CANDIDATES",
    "box_iou",
    "box_uncertainty",
    "binary_entropy",
    "entropy_nms",
    "feature_nms",
    "aggregate_image_scores",
    "detection_scores",
    "class_balanced_select",
    "entropy_prototypes",
    "divproto_quotas",
    "divproto_select",
    "class_quality_sums",
    "ppal_class_weights",
    "dcus_scores",
    "ccms_distances",
    "kmedoids_select",
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

    return _greedy_group_nms(
        img, cls, unc, lambda ids: box_iou(b[ids][:, :, None, :], b[ids][:, None, :, :]) > thr, width=4)


def feature_nms(
    box_image: np.ndarray,
    box_classes: np.ndarray,
    box_unc: np.ndarray,
    embeddings: np.ndarray,
    similarity_threshold: float = 0.9,
) -> np.ndarray:
    """Entropy-NMS in feature space: keep mask ``(B,)`` (bool).

    The greedy pass of :func:`entropy_nms` — within each image, boxes by decreasing
    uncertainty (ties: lower row index), a box kept unless an already kept box of the same
    class has a similarity strictly above the threshold — with the cosine similarity of the
    boxes' embeddings in place of IoU, as DivProto's ENMS does (Wu et al. 2022: instances
    whose features are near-duplicates carry the same information even where the boxes do
    not overlap). A zero embedding has similarity 0 with everything.
    """
    img = _check_box_image(box_image, None)
    n = img.shape[0]
    cls = _int_array(box_classes, "box_classes")
    _check_len(cls, n, "box_classes", "one class per box")
    unc = _float_array(box_unc, "box_unc", 1)
    _check_len(unc, n, "box_unc", "one uncertainty per box")
    unit = _unit_rows(_check_embeddings(embeddings, n))
    thr = float(similarity_threshold)
    if not np.isfinite(thr) or not -1.0 <= thr <= 1.0:
        raise ValueError(f"similarity_threshold must be in [-1, 1], got {similarity_threshold}")
    return _greedy_group_nms(
        img, cls, unc, lambda ids: np.einsum("gmd,gnd->gmn", unit[ids], unit[ids]) > thr, width=unit.shape[1])


def _greedy_group_nms(img: np.ndarray, cls: np.ndarray, unc: np.ndarray, over_of: object,
                      width: int) -> np.ndarray:
    """The greedy pass shared by :func:`entropy_nms` and :func:`feature_nms`; ``over_of(ids)``
    gives, for a ``(G, M)`` array of box indices, the ``(G, M, M)`` "pair over the
    threshold" mask; ``width`` (values per box it reads) sizes the chunks."""
    n = img.shape[0]
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
        step = max(1, _NMS_CHUNK_ELEMENTS // (m * max(m, width)))
        for lo in range(0, sel.size, step):
            g = sel[lo : lo + step]
            cnt = counts[g]
            valid = col[None, :] < cnt[:, None]
            ids = order[np.where(valid, starts[g][:, None] + col[None, :], 0)]  # (G, M)
            over = over_of(ids)  # type: ignore[operator]
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


# --------------------------------------------------------------------------- DivProto

_PROTO_MIN_WEIGHT = 1e-6  # floor of a box's entropy in prototype weights (a sure box still counts)


def _unit_rows(x: np.ndarray) -> np.ndarray:
    n = np.linalg.norm(x, axis=1, keepdims=True)
    return np.divide(x, n, out=np.zeros_like(x), where=n > 0)


def _check_embeddings(embeddings: object, n: int) -> np.ndarray:
    e = _float_array(embeddings, "embeddings", 2)
    _check_len(e, n, "embeddings", "one embedding per box")
    return e


def entropy_prototypes(
    box_image: np.ndarray,
    box_probs: np.ndarray,
    box_unc: np.ndarray,
    embeddings: np.ndarray,
    *,
    keep: np.ndarray | None = None,
    has_embedding: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Entropy-weighted per-class prototypes of each image (DivProto, Wu et al. 2022, Sec. 3.3).

    For image ``i`` with kept boxes ``K_i`` (``keep``, e.g. the entropy-NMS survivors; all
    boxes when None), its classes are ``C_i = {argmax_c p_b : b in K_i}`` and, for each
    ``c in C_i``, with ``E_i = {b in K_i : has_embedding_b}``::

        w_{b,c}  = max(H_b, 1e-6) * p_{b,c}
        proto_{i,c} = sum_{b in E_i} w_{b,c} e_b / sum_{b in E_i} w_{b,c}

    ``H_b`` = ``box_unc`` (the box's normalised entropy), ``p_{b,c}`` its probability of
    class ``c``, ``e_b`` its embedding. So a prototype is the class-``c`` view of the image:
    every box contributes in proportion to how uncertain it is and how much it says ``c``
    (the paper's entropy-based class-specific prototype); the floor keeps a prototype
    defined when every box is certain. A class with no embedded box in ``E_i`` (or zero total
    weight) gets no prototype.

    Returns ``(proto_image (P,), proto_class (P,), prototypes (P, D))`` sorted by image then
    class; ``prototypes`` rows are float64 and NOT normalised.
    """
    img = _check_box_image(box_image, None)
    n = img.shape[0]
    probs = _check_probs(box_probs)
    _check_len(probs, n, "box_probs", "one row per box")
    unc = _float_array(box_unc, "box_unc", 1)
    _check_len(unc, n, "box_unc", "one uncertainty per box")
    emb = _check_embeddings(embeddings, n)
    k = np.ones(n, dtype=bool) if keep is None else np.asarray(keep, dtype=bool)
    if k.shape != (n,):
        raise ValueError(f"keep must have shape ({n},), got {k.shape}")
    has = np.ones(n, dtype=bool) if has_embedding is None else np.asarray(has_embedding, dtype=bool)
    if has.shape != (n,):
        raise ValueError(f"has_embedding must have shape ({n},), got {has.shape}")
    d = emb.shape[1]
    empty = (np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros((0, d)))
    kb = np.flatnonzero(k)
    if not kb.size:
        return empty
    top = probs[kb].argmax(axis=1)
    pairs = np.unique(np.stack([img[kb], top], axis=1), axis=0)  # (P, 2) sorted by image, class
    p_img, p_cls = pairs[:, 0], pairs[:, 1]
    # every (embedded kept box, prototype of its image) combination
    eb = kb[has[kb]]
    first = np.searchsorted(p_img, img[eb], side="left")
    count = np.searchsorted(p_img, img[eb], side="right") - first
    rep = np.repeat(eb, count)
    offs = np.arange(rep.size) - np.repeat(np.cumsum(count) - count, count)
    pair = np.repeat(first, count) + offs
    w = np.maximum(unc[rep], _PROTO_MIN_WEIGHT) * probs[rep, p_cls[pair]]
    import scipy.sparse as sp  # imported here, as the other miners do: scipy is a server dependency

    m = sp.csr_matrix((w, (pair, rep)), shape=(pairs.shape[0], n))
    total = np.asarray(m.sum(axis=1)).ravel()
    ok = total > 0
    protos = np.asarray(m @ emb)[ok] / total[ok, None]
    return p_img[ok].astype(np.int64), p_cls[ok].astype(np.int64), protos


def divproto_quotas(class_counts: np.ndarray, present: np.ndarray, size: int) -> np.ndarray:
    """Inter-class budgets of DivProto: how many selected images may hold class ``c``.

    With ``n_c`` the labeled (ground-truth box) count of class ``c`` and ``A`` the classes
    ``present`` among the candidates: ``w_c = 1 / max(n_c, 1)`` and
    ``q_c = max(1, ceil(size * w_c / sum_{c' in A} w_{c'}))`` for ``c in A``, 0 otherwise —
    minority classes (fewer labeled boxes) get the larger quota. The quotas sum to at least
    ``size`` (an image usually holds several classes, so it spends several quotas at once).
    """
    n = _float_array(class_counts, "class_counts", 1)
    if n.size and n.min() < 0:
        raise ValueError(f"class_counts must be >= 0, got min {n.min()}")
    a = np.asarray(present, dtype=bool)
    if a.shape != n.shape:
        raise ValueError(f"present must have shape {n.shape}, got {a.shape}")
    q = np.zeros(n.shape[0], dtype=np.int64)
    if not a.any() or size <= 0:
        return q
    w = 1.0 / np.maximum(n, 1.0)
    q[a] = np.maximum(1, np.ceil(size * w[a] / w[a].sum() - 1e-9)).astype(np.int64)
    return q


@dataclass
class DivProtoResult:
    """Picked images (indices, in pick order) and why the others were passed over."""

    rows: np.ndarray
    skipped_intra: int  # a prototype too similar to a selected image's prototype of that class
    skipped_inter: int  # every class of the image had used up its quota (or it had no class)
    filled: int  # picks taken back from the skipped images because the candidates ran out


def divproto_select(
    image_scores: np.ndarray,
    proto_image: np.ndarray,
    proto_class: np.ndarray,
    prototypes: np.ndarray,
    image_classes: list[np.ndarray] | None,
    size: int,
    *,
    num_classes: int,
    class_counts: np.ndarray | None = None,
    intra_threshold: float = 0.7,
    fill: bool = True,
    check: object = None,
) -> DivProtoResult:
    """DivProto's selection (Wu et al., "Entropy-based Active Learning for Object Detection
    with Progressive Diversity Constraint", CVPR 2022): walk the candidate images by
    ``image_scores`` (their entropy-NMS uncertainty) descending, ties by lower index, and
    take image ``i`` unless

    * **inter-class**: every class of ``C_i`` has used up its quota
      (:func:`divproto_quotas` from ``class_counts``, the labeled box counts; equal shares
      when None) — or ``C_i`` is empty (no box: nothing to learn);
    * **intra-class**: for SOME class ``c in C_i`` with a prototype, some already selected
      image ``s`` has a prototype of ``c`` with ``cos(proto_{i,c}, proto_{s,c}) >
      intra_threshold`` — its view of that class is already being labeled.

    A taken image spends one unit of the quota of each of its classes and adds its
    prototypes to the selected set. The walk stops at ``size`` picks. With ``fill``, when the
    candidates run out first the remaining slots go to the skipped images by score (so a
    run returns ``min(size, N)`` images; ``filled`` says how many).

    Cost: each candidate is compared with the selected prototypes of its own classes only,
    ``O(N * S * D)`` for ``S`` selected prototypes — never candidates x candidates.

    ``prototypes`` as :func:`entropy_prototypes` returns them (rows for ``(proto_image,
    proto_class)``); ``image_classes[i]`` the classes ``C_i`` (int arrays; None: the classes
    of image ``i``'s prototypes). ``check`` (optional callable) is called every 1024 images
    (cancellation).
    """
    s = _float_array(image_scores, "image_scores", 1)
    n = s.shape[0]
    pi = _int_array(proto_image, "proto_image")
    pc_ = _int_array(proto_class, "proto_class")
    pr = _float_array(prototypes, "prototypes", 2)
    if not (pi.shape[0] == pc_.shape[0] == pr.shape[0]):
        raise ValueError("proto_image, proto_class and prototypes need one entry per prototype")
    if pi.size and (pi.min() < 0 or pi.max() >= n):
        raise ValueError(f"proto_image must lie in [0, {n})")
    if pc_.size and (pc_.min() < 0 or pc_.max() >= num_classes):
        raise ValueError(f"proto_class must lie in [0, {num_classes})")
    thr = float(intra_threshold)
    if not -1.0 <= thr <= 1.0:
        raise ValueError(f"intra_threshold must be in [-1, 1], got {intra_threshold}")
    if image_classes is None:
        image_classes = [pc_[pi == i] for i in range(n)]
    if len(image_classes) != n:
        raise ValueError(f"image_classes needs one entry per image ({n}), got {len(image_classes)}")
    present = np.zeros(num_classes, dtype=bool)
    for c in image_classes:
        present[np.asarray(c, dtype=np.int64)] = True
    counts = np.zeros(num_classes) if class_counts is None else np.asarray(class_counts, dtype=np.float64)
    if counts.shape != (num_classes,):
        raise ValueError(f"class_counts must have shape ({num_classes},), got {counts.shape}")
    size = min(int(size), n)
    quota = divproto_quotas(counts, present, size)
    used = np.zeros(num_classes, dtype=np.int64)
    unit = _unit_rows(pr)
    order = np.lexsort((np.arange(n), -s))
    p_sorted = np.argsort(pi, kind="stable")
    p_start = np.searchsorted(pi[p_sorted], np.arange(n + 1))
    store: dict[int, np.ndarray] = {}  # class -> selected unit prototypes (rows grown by doubling)
    stored = np.zeros(num_classes, dtype=np.int64)
    picked: list[int] = []
    skipped: list[int] = []
    intra = inter = 0
    for step, i in enumerate(order):
        if len(picked) >= size:
            break
        if check is not None and step % 1024 == 0:
            check()  # type: ignore[operator]
        cls_i = np.unique(np.asarray(image_classes[i], dtype=np.int64))
        if not cls_i.size or (used[cls_i] >= quota[cls_i]).all():
            inter += 1
            skipped.append(int(i))
            continue
        mine = p_sorted[p_start[i]:p_start[i + 1]]
        too_close = False
        for r in mine:
            c = int(pc_[r])
            if stored[c] and float((store[c][:stored[c]] @ unit[r]).max()) > thr:
                too_close = True
                break
        if too_close:
            intra += 1
            skipped.append(int(i))
            continue
        picked.append(int(i))
        used[cls_i] += 1
        for r in mine:
            c = int(pc_[r])
            buf = store.get(c)
            if buf is None or stored[c] == buf.shape[0]:
                grown = np.zeros((max(4, 2 * stored[c]), unit.shape[1]))
                if buf is not None:
                    grown[:stored[c]] = buf[:stored[c]]
                store[c] = buf = grown
            buf[stored[c]] = unit[r]
            stored[c] += 1
    filled = 0
    if fill and len(picked) < size:
        # the walk reached every candidate (it stops early only at size): the skipped ones,
        # in score order, fill the batch
        take = skipped[: size - len(picked)]
        filled = len(take)
        picked.extend(take)
    return DivProtoResult(np.asarray(picked, dtype=np.int64), intra, inter, filled)


# --------------------------------------------------------------------------- PPAL

#: PPAL's stage 2 compares every pair of candidates: their number is bounded by this (a
#: candidates x candidates float64 matrix of 800 MB at the bound).
PPAL_MAX_CANDIDATES = 10_000


def binary_entropy(p: np.ndarray) -> np.ndarray:
    """``-(p log p + (1 - p) log(1 - p)) / log 2`` in ``[0, 1]`` (``0 log 0 = 0``): the
    uncertainty of a sigmoid confidence, as PPAL scores a box from its class score."""
    q = np.clip(_float_array(p, "p", 1), 0.0, 1.0)
    with np.errstate(divide="ignore", invalid="ignore"):
        h = -(np.where(q > 0, q * np.log(q), 0.0) + np.where(q < 1, (1 - q) * np.log(1 - q), 0.0))
    return h / np.log(2.0)


def class_quality_sums(
    gt_image: np.ndarray,
    gt_boxes: np.ndarray,
    gt_classes: np.ndarray,
    box_image: np.ndarray,
    boxes: np.ndarray,
    box_probs: np.ndarray,
    num_classes: int,
    *,
    xi: float = 0.6,
) -> tuple[np.ndarray, np.ndarray]:
    """Per-class detection quality on labeled images (PPAL's difficulty estimate), as
    ``(sum of q (C,), count (C,))`` so chunks add up; quality ``= sum / count``.

    For each ground-truth box ``g`` of class ``c`` in image ``i``, ``b*`` is the predicted
    box of image ``i`` with the largest IoU with ``g`` (ties: lower index) and

        q_g = p_{b*,c}^xi * IoU(b*, g)^(1 - xi)     (0 when no predicted box overlaps g)

    — the model's probability of the right class where it localises the object, blended with
    how well it localises it (PPAL's ``quality = p^xi * IoU^(1-xi)``, xi = 0.6). PPAL keeps
    an exponential moving average of this over training iterations; here it is measured
    once on the labeled set with the stored predictions. ``gt_classes[g] < 0`` (a label that
    is not one of the model's classes) is left out.
    """
    gi = _int_array(gt_image, "gt_image")
    gb = _check_boxes(gt_boxes, gi.shape[0])
    gc = _int_array(gt_classes, "gt_classes")
    _check_len(gc, gi.shape[0], "gt_classes", "one class per gt box")
    bi = _int_array(box_image, "box_image")
    bb = _check_boxes(boxes, bi.shape[0])
    probs = _check_probs(box_probs)
    _check_len(probs, bi.shape[0], "box_probs", "one row per box")
    if probs.shape[1] != num_classes:
        raise ValueError(f"box_probs must have {num_classes} columns, got {probs.shape[1]}")
    sums = np.zeros(num_classes)
    counts = np.zeros(num_classes, dtype=np.int64)
    ok = gc >= 0
    if gc.size and gc.max() >= num_classes:
        raise ValueError(f"gt_classes must be < {num_classes}")
    gi, gb, gc = gi[ok], gb[ok], gc[ok]
    if not gi.size:
        return sums, counts
    np.add.at(counts, gc, 1)
    order = np.argsort(bi, kind="stable")
    bi_s = bi[order]
    first = np.searchsorted(bi_s, gi, side="left")
    count = np.searchsorted(bi_s, gi, side="right") - first
    g_rep = np.repeat(np.arange(gi.size), count)
    b_rep = order[np.repeat(first, count) + np.arange(g_rep.size) - np.repeat(np.cumsum(count) - count, count)]
    q = np.zeros(gi.size)
    if g_rep.size:
        iou = box_iou(gb[g_rep], bb[b_rep])
        best = np.lexsort((b_rep, -iou, g_rep))  # per gt: largest IoU, then lower box index
        lead = best[np.r_[True, np.diff(g_rep[best]) != 0]]
        g, b, v = g_rep[lead], b_rep[lead], iou[lead]
        hit = v > 0
        q[g[hit]] = probs[b[hit], gc[g[hit]]] ** xi * v[hit] ** (1.0 - xi)
    np.add.at(sums, gc, q)
    return sums, counts


def ppal_class_weights(quality: np.ndarray, *, alpha: float = 0.3, upper: float = 0.2) -> np.ndarray:
    """PPAL's difficulty coefficient of each class from its quality ``q_c`` in [0, 1]::

        w_c = 1 + alpha * upper * log(1 + (exp(1 / alpha) - 1) * (1 - q_c))

    increasing in the difficulty ``1 - q_c``, from ``1`` (q = 1) to ``1 + upper`` (q = 0);
    ``alpha`` sets the curvature (small alpha: most of the rise near easy classes). A class
    with no labeled box has ``q_c = 0`` (as PPAL's quality starts at 0): the largest weight.
    """
    q = np.clip(_float_array(quality, "quality", 1), 0.0, 1.0)
    if not alpha > 0 or not upper >= 0:
        raise ValueError(f"alpha must be > 0 and upper >= 0, got {alpha}, {upper}")
    b = np.expm1(1.0 / alpha)
    return 1.0 + alpha * upper * np.log1p(b * (1.0 - q))


def dcus_scores(
    box_image: np.ndarray,
    box_unc: np.ndarray,
    box_classes: np.ndarray,
    box_scores: np.ndarray,
    class_weights: np.ndarray,
    n_images: int,
    *,
    score_threshold: float = 0.05,
) -> np.ndarray:
    """Difficulty-calibrated uncertainty of each image (PPAL stage 1)::

        U_i = sum_{b in i, s_b >= score_threshold} u_b * w_{c_b}

    ``u_b`` the box's uncertainty, ``c_b`` its class, ``s_b`` its confidence, ``w`` from
    :func:`ppal_class_weights`. Boxes below the threshold (background clutter) do not count;
    an image without a counted box scores 0.
    """
    img = _check_box_image(box_image, n_images)
    n = img.shape[0]
    u = _float_array(box_unc, "box_unc", 1)
    _check_len(u, n, "box_unc", "one uncertainty per box")
    c = _int_array(box_classes, "box_classes")
    _check_len(c, n, "box_classes", "one class per box")
    sc = _float_array(box_scores, "box_scores", 1)
    _check_len(sc, n, "box_scores", "one score per box")
    w = _float_array(class_weights, "class_weights", 1)
    if c.size and (c.min() < 0 or c.max() >= w.shape[0]):
        raise ValueError(f"box_classes must lie in [0, {w.shape[0]})")
    on = sc >= score_threshold
    return np.bincount(img[on], weights=u[on] * w[c[on]], minlength=n_images).astype(np.float64)


def ccms_distances(
    box_image: np.ndarray,
    box_classes: np.ndarray,
    box_scores: np.ndarray,
    embeddings: np.ndarray,
    n_images: int,
    *,
    score_threshold: float = 0.05,
    valid: np.ndarray | None = None,
    block: int = 2048,
    check: object = None,
) -> np.ndarray:
    """Category Conditioned Matching distance between every pair of the ``n_images``
    candidate images (PPAL stage 2), float64 ``(n, n)``; similarity = ``1 - distance``.

    With ``B_i`` the boxes of image ``i`` with ``s_b >= score_threshold`` (and ``valid``),
    ``c_b`` their classes, ``e_b`` their embeddings (cosine)::

        delta(b, j) = min_{b' in B_j, c_b' = c_b} (1 - cos(e_b, e_b'))   (2 if j has no box of c_b)
        d(i -> j)   = sum_{b in B_i} s_b delta(b, j) / sum_{b in B_i} s_b
        D(i, j)     = (d(i -> j) + d(j -> i)) / 2,   D(i, i) = 0

    i.e. each box of one image is matched to its most similar box of the same category in
    the other, and the image distance is the confidence-weighted mean over boxes,
    symmetrised. An image without a counted box is at distance 2 from every image that has
    one and 0 from another such image. Computed per class in blocks of ``block`` boxes
    (memory ``O(block x B_c + n^2)``); refuses ``n > PPAL_MAX_CANDIDATES``. ``check``
    (optional callable) runs before each block (cancellation).
    """
    if n_images > PPAL_MAX_CANDIDATES:
        raise ValueError(f"ccms_distances compares candidates pairwise: at most {PPAL_MAX_CANDIDATES} "
                         f"images, got {n_images}")
    img = _check_box_image(box_image, n_images)
    n = img.shape[0]
    c = _int_array(box_classes, "box_classes")
    _check_len(c, n, "box_classes", "one class per box")
    sc = _float_array(box_scores, "box_scores", 1)
    _check_len(sc, n, "box_scores", "one score per box")
    emb = _unit_rows(_check_embeddings(embeddings, n))
    on = sc >= score_threshold
    if valid is not None:
        on &= np.asarray(valid, dtype=bool)
    weight = np.bincount(img[on], weights=sc[on], minlength=n_images)
    has = np.bincount(img[on], minlength=n_images) > 0
    # start from "no same-class box anywhere" (2 for every counted box), then correct the
    # columns of the images that hold the class
    total = np.empty((n_images, n_images))
    total[:] = (2.0 * weight)[:, None]
    for cls in np.unique(c[on]):
        rows = np.flatnonzero(on & (c == cls))
        rows = rows[np.argsort(img[rows], kind="stable")]
        r_img = img[rows]
        col_start = np.flatnonzero(np.r_[True, np.diff(r_img) != 0])
        holders = r_img[col_start]
        e_c = emb[rows]
        for lo in range(0, rows.size, block):
            if check is not None:
                check()  # type: ignore[operator]
            part = slice(lo, min(rows.size, lo + block))
            # (boxes of the class, block): the per-holder max runs over contiguous rows
            best = np.maximum.reduceat(e_c @ e_c[part].T, col_start, axis=0).T  # (block, holders)
            corr = sc[rows[part], None] * ((1.0 - np.clip(best, -1.0, 1.0)) - 2.0)
            p_img = r_img[part]
            starts = np.flatnonzero(np.r_[True, np.diff(p_img) != 0])
            summed = np.add.reduceat(corr, starts, axis=0)
            total[np.ix_(p_img[starts], holders)] += summed
    # in place from here: at the bound one n x n float64 matrix is 800 MB
    d = total
    d /= np.where(weight > 0, weight, 1.0)[:, None]
    # an image without boxes: 2 from every image with boxes (both directions), 0 otherwise
    empty = np.flatnonzero(~has)
    d[empty, :] = 0.0
    d[np.ix_(empty, np.flatnonzero(has))] = 2.0
    np.clip(d, 0.0, 2.0, out=d)
    for lo in range(0, n_images, block):  # symmetrise block by block (no n x n temporary)
        hi = min(n_images, lo + block)
        for lo2 in range(lo, n_images, block):
            hi2 = min(n_images, lo2 + block)
            m = 0.5 * (d[lo:hi, lo2:hi2] + d[lo2:hi2, lo:hi].T)
            d[lo:hi, lo2:hi2] = m
            d[lo2:hi2, lo:hi] = m.T
    np.fill_diagonal(d, 0.0)
    return d


def kmedoids_select(
    distances: np.ndarray,
    k: int,
    *,
    seed: int = 0,
    iterations: int = 20,
    check: object = None,
) -> tuple[np.ndarray, np.ndarray]:
    """``k`` representative items of a precomputed distance matrix, as PPAL's diversity
    stage selects images (its released sampler: k-center greedy seeding, then k-medoids).

    Seeding: the first centre is drawn uniformly with ``numpy.random.default_rng(seed)``;
    each next one is the item farthest from its nearest centre (``argmax_i min_m D(i, m)``,
    ties: lower index) — farthest-first traversal. Refinement (Voronoi iteration, at most
    ``iterations`` rounds, stopping when nothing changes): every item joins its nearest
    medoid (ties: the earlier medoid; a medoid always keeps itself), then each cluster's
    medoid becomes its member with the smallest sum of distances to the others (ties:
    lower index). ``iterations = 0`` returns the farthest-first centres.

    Returns ``(medoids (k,), assignment (n,))`` (medoid positions, each item's cluster).
    """
    dist = _float_array(distances, "distances", 2)
    n = dist.shape[0]
    if dist.shape != (n, n):
        raise ValueError(f"distances must be square, got {dist.shape}")
    k = min(int(k), n)
    if k <= 0:
        return np.zeros(0, np.int64), np.full(n, -1, np.int64)
    rng = np.random.default_rng(seed)
    medoids = [int(rng.integers(n))]
    nearest = dist[:, medoids[0]].copy()
    for _ in range(1, k):
        nearest[medoids] = -np.inf
        m = int(np.argmax(nearest))
        medoids.append(m)
        nearest = np.minimum(nearest, dist[:, m])
    med = np.asarray(medoids, dtype=np.int64)

    def assign(med: np.ndarray) -> np.ndarray:
        a = np.argmin(dist[:, med], axis=1)
        a[med] = np.arange(med.size)
        return a

    a = assign(med)
    for _ in range(int(iterations)):
        if check is not None:
            check()  # type: ignore[operator]
        new = med.copy()
        for j in range(med.size):
            members = np.flatnonzero(a == j)
            new[j] = members[int(np.argmin(dist[np.ix_(members, members)].sum(axis=1)))]
        if np.array_equal(new, med):
            break
        med = new
        a = assign(med)
    return med, a
