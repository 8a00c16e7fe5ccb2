"""DivProto and PPAL runs: the detection acquisitions that need more than one score per
image (``divproto``, ``ppal`` in :mod:`miners.registry`).

Both read the pool's boxes with their per-object embeddings (input ``box_embeddings``: the
model declares ``box_embedding_dim``) and the ground-truth boxes of the labeled rows
(``reference_where``; default: every row with ``gt_boxes``), in two passes:

1. a streamed scan scores every pool image (DivProto: entropy-NMS uncertainty,
   :func:`miners.detection.detection_scores`; PPAL: difficulty-calibrated uncertainty,
   :func:`miners.detection.dcus_scores`) keeping one float per row;
2. the top ``candidate_ratio x size`` images (ties: smaller row id) are read again,
   with their boxes and embeddings, and the pure selection runs on them
   (:func:`miners.detection.divproto_select`, or :func:`miners.detection.ccms_distances` +
   :func:`miners.detection.kmedoids_select`).

Memory: 16 bytes per pool row in pass 1, the candidates' boxes in pass 2; PPAL's
candidates x candidates distance matrix is bounded by
:data:`miners.detection.PPAL_MAX_CANDIDATES` candidates. Nothing pool x pool.
"""

from __future__ import annotations

import math
import time
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from indexing.errors import FailedPrecondition, InvalidArgument
from indexing.schema import PRED_PREFIX
from miners import detection
from miners.inputs import INPUTS, BoxEmbeddings, RunContext, scan_arrays
from miners.runs import MiningOutput
from miners.vectors import ids_of_rows

CHUNK_ROWS = 8192
TAKE_ROWS = 4096  # candidate rows read back per take


def _labeled_where(ctx: RunContext) -> str:
    return f"({ctx.reference_where}) AND gt_boxes IS NOT NULL" if ctx.reference_where else "gt_boxes IS NOT NULL"


def validate(ctx: RunContext) -> None:
    """Both miners compare per-object embeddings: the model must declare them; PPAL's
    candidate pool must fit its bound."""
    spec = ctx.model_spec
    if spec is None or not spec.box_embedding_dim:
        raise FailedPrecondition(
            f"miner '{ctx.run.miner}' compares per-object embeddings, and model '{ctx.model}' was declared "
            "without box_embedding_dim: add a detection model with box_embedding_dim=<d> and upsert boxes "
            "carrying an 'embedding' of d values")
    if ctx.run.miner == "ppal" and ctx.run.size > detection.PPAL_MAX_CANDIDATES:
        raise InvalidArgument(f"miner 'ppal': size must be at most {detection.PPAL_MAX_CANDIDATES} (its second "
                              f"stage compares the candidates pairwise), got {ctx.run.size}")


def _pool_scores(ctx: RunContext, score: Any, embeddings: bool = False) -> tuple[np.ndarray, np.ndarray, int]:
    """Pass 1: (row ids, score per row, rows scanned) of the pool rows with boxes
    (their embeddings decoded only when ``embeddings``)."""
    def per_chunk(a: dict[str, Any]) -> dict[str, np.ndarray]:
        try:
            return {"score": np.asarray(score(a), dtype=np.float64)}
        except ValueError as exc:
            raise InvalidArgument(f"miner '{ctx.run.miner}': {exc}") from exc

    keys, arrays, scanned = scan_arrays(ctx, [BoxEmbeddings(embeddings)], per_chunk=per_chunk,
                                        chunk_rows=CHUNK_ROWS)
    if not len(keys):
        raise FailedPrecondition(f"none of the {scanned:,} pool rows has boxes of model '{ctx.model}'")
    return keys, arrays["score"], scanned


def _top(keys: np.ndarray, scores: np.ndarray, n: int) -> np.ndarray:
    """Positions of the ``n`` best scores, ties by smaller row id."""
    return np.lexsort((keys, -scores))[:n]


def _read_candidates(ctx: RunContext, keys: np.ndarray) -> dict[str, Any]:
    """Pass 2: the candidates' boxes (with embeddings) decoded, in the order of ``keys``."""
    column = f"{PRED_PREFIX}{ctx.model}"
    parts: list[pa.Array] = []
    for lo in range(0, len(keys), TAKE_ROWS):
        ctx.check()
        chunk = keys[lo:lo + TAKE_ROWS]
        got = ctx.table.take_row_ids([int(k) for k in chunk]).select([column]).with_row_id().to_arrow()
        where = {int(r): i for i, r in enumerate(got.column("_rowid").to_pylist())}
        order = pa.array([where[int(k)] for k in chunk], pa.int64())
        parts.append(pc.struct_field(got.column(column).combine_chunks(), "boxes").take(order))
    boxes = pa.concat_arrays(parts)  # never empty: a run has at least one candidate
    batch = pa.RecordBatch.from_arrays([boxes], names=["boxes"])
    return INPUTS["box_embeddings"].decode(batch, np.arange(len(keys)), keys, ctx)


def _gt_class_counts(ctx: RunContext) -> np.ndarray:
    """Ground-truth boxes per class of the model among the labeled rows (labels that are not
    one of the model's classes are not counted)."""
    spec = ctx.model_spec
    index = {name: i for i, name in enumerate(spec.classes)}
    counts = np.zeros(spec.num_classes, dtype=np.int64)
    q = ctx.table.search().where(_labeled_where(ctx)).select(["gt_boxes"]).limit(None)
    for batch in q.to_batches(CHUNK_ROWS):
        ctx.check()
        vc = pc.value_counts(pc.list_flatten(batch.column("gt_boxes")).field("label"))
        for value, n in zip(vc.field("values").to_pylist(), vc.field("counts").to_pylist(), strict=True):
            if value in index:
                counts[index[value]] += n
    return counts


def _xyxy(flat: pa.StructArray) -> np.ndarray:
    if not len(flat):
        return np.zeros((0, 4))
    return np.stack([np.asarray(flat.field(k).to_numpy(zero_copy_only=False), dtype=np.float64)
                     for k in ("x1", "y1", "x2", "y2")], axis=1)


def _class_quality(ctx: RunContext, xi: float) -> tuple[np.ndarray, np.ndarray]:
    """PPAL's per-class quality on the labeled rows that also hold the model's boxes:
    (quality (C,), gt boxes counted (C,)); boxes without C probs are left out."""
    spec = ctx.model_spec
    c = spec.num_classes
    index = {name: i for i, name in enumerate(spec.classes)}
    path = f"{PRED_PREFIX}{ctx.model}.boxes"
    sums, counts = np.zeros(c), np.zeros(c, dtype=np.int64)
    q = ctx.table.search().where(f"{_labeled_where(ctx)} AND {path} IS NOT NULL") \
        .select({"g": "gt_boxes", "p": path}).limit(None)
    for batch in q.to_batches(CHUNK_ROWS):
        ctx.check()
        g, p = batch.column("g"), batch.column("p")
        gflat, pflat = pc.list_flatten(g), pc.list_flatten(p)
        g_img = np.asarray(pc.list_parent_indices(g).to_numpy(zero_copy_only=False), dtype=np.int64)
        p_img = np.asarray(pc.list_parent_indices(p).to_numpy(zero_copy_only=False), dtype=np.int64)
        g_cls = np.asarray([index.get(v, -1) for v in gflat.field("label").to_pylist()], dtype=np.int64) \
            if len(gflat) else np.zeros(0, np.int64)
        probs = np.zeros((0, c))
        ok = np.zeros(len(pflat), dtype=bool)
        if len(pflat):
            pr = pflat.field("probs")
            ok = np.asarray(pc.fill_null(pc.list_value_length(pr), 0).to_numpy(zero_copy_only=False)) == c
            probs = np.asarray(pc.list_flatten(pr.filter(pa.array(ok))).to_numpy(zero_copy_only=False),
                               dtype=np.float64).reshape(-1, c)
        s, n = detection.class_quality_sums(g_img, _xyxy(gflat), g_cls, p_img[ok], _xyxy(pflat)[ok], probs, c,
                                            xi=xi)
        sums += s
        counts += n
    return np.where(counts > 0, sums / np.maximum(counts, 1), 0.0), counts


def _image_classes(box_image: np.ndarray, classes: np.ndarray, keep: np.ndarray, n: int) -> list[np.ndarray]:
    order = np.lexsort((classes, box_image))
    order = order[keep[order]]
    starts = np.searchsorted(box_image[order], np.arange(n + 1))
    return [np.unique(classes[order[starts[i]:starts[i + 1]]]) for i in range(n)]


# -- DivProto ------------------------------------------------------------------------------

def _enms(a: dict[str, Any], p: dict[str, Any]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(box entropies, box classes, entropy-NMS keep mask) of decoded boxes: NMS by IoU
    (``enms="iou"``, ``nms_iou``; 1 = none) or by embedding similarity (``enms="feature"``,
    ``enms_similarity``: the paper's ENMS)."""
    unc = detection.box_uncertainty(None, a["box_probs"], "entropy")
    classes = a["box_probs"].argmax(axis=1) if len(unc) else np.zeros(0, np.int64)
    if p["enms"] == "feature":
        keep = detection.feature_nms(a["box_image"], classes, unc, a["box_emb"], p["enms_similarity"])
    elif p["nms_iou"] < 1.0:
        keep = detection.entropy_nms(a["box_image"], a["boxes"], classes, unc, p["nms_iou"])
    else:
        keep = np.ones(len(unc), dtype=bool)
    return unc, classes, keep


def divproto_run(ctx: RunContext) -> MiningOutput:
    t0 = time.perf_counter()
    p, rec = ctx.params, ctx.run
    ctx.model_spec  # noqa: B018 -- resolved before the scan
    ctx.progress(0.0, "DivProto: entropy-NMS uncertainty of the pool")

    def score(a: dict[str, Any]) -> np.ndarray:
        unc, _, keep = _enms(a, p)
        return detection.aggregate_image_scores(a["box_image"], unc, a["n_images"], p["aggregate"], keep)

    keys, scores, scanned = _pool_scores(ctx, score, embeddings=p["enms"] == "feature")
    n_cand = min(len(keys), max(rec.size, math.ceil(p["candidate_ratio"] * rec.size)))
    cand = _top(keys, scores, n_cand)
    ctx.progress(0.6, f"DivProto: prototypes of {n_cand:,} candidates")
    a = _read_candidates(ctx, keys[cand])
    try:
        unc, classes, keep = _enms(a, p)
        p_img, p_cls, protos = detection.entropy_prototypes(a["box_image"], a["box_probs"], unc, a["box_emb"],
                                                            keep=keep, has_embedding=a["box_has_emb"])
        counts = _gt_class_counts(ctx)
        ctx.progress(0.8, f"DivProto: walking {n_cand:,} candidates")
        res = detection.divproto_select(
            scores[cand], p_img, p_cls, protos, _image_classes(a["box_image"], classes, keep, n_cand), rec.size,
            num_classes=ctx.num_classes, class_counts=counts, intra_threshold=p["intra_threshold"],
            fill=p["fill"], check=ctx.check)
    except ValueError as exc:
        raise InvalidArgument(f"miner 'divproto': {exc}") from exc
    picks = cand[res.rows]
    present = np.zeros(ctx.num_classes, dtype=bool)
    present[np.unique(classes[keep])] = True
    quotas = detection.divproto_quotas(counts, present, min(rec.size, n_cand))
    stats = {"candidates": int(n_cand), "skipped_intra": res.skipped_intra, "skipped_inter": res.skipped_inter,
             "filled": res.filled, "prototypes": int(len(p_img)),
             "labeled_boxes": {name: int(n) for name, n in zip(ctx.model_spec.classes, counts, strict=True)},
             "quotas": {name: int(q) for name, q, on in zip(ctx.model_spec.classes, quotas, present, strict=True)
                        if on}}
    return MiningOutput(ids=ids_of_rows(ctx.table, keys[picks]), scores=scores[picks], rows_scanned=scanned,
                        rows_skipped=scanned - len(keys), timings={"total_s": time.perf_counter() - t0}, stats=stats)


# -- PPAL ----------------------------------------------------------------------------------

def ppal_run(ctx: RunContext) -> MiningOutput:
    t0 = time.perf_counter()
    p, rec = ctx.params, ctx.run
    ctx.model_spec  # noqa: B018 -- resolved before the scan
    ctx.progress(0.0, "PPAL: class difficulty on the labeled rows")
    quality, counted = _class_quality(ctx, p["xi"])
    try:
        weights = detection.ppal_class_weights(quality, alpha=p["alpha"], upper=p["upper"])
    except ValueError as exc:
        raise InvalidArgument(f"miner 'ppal': {exc}") from exc

    def box_unc(a: dict[str, Any]) -> np.ndarray:
        if p["uncertainty"] == "score_entropy":
            return detection.binary_entropy(a["box_scores"])
        return detection.box_uncertainty(None, a["box_probs"], "entropy")

    def score(a: dict[str, Any]) -> np.ndarray:
        classes = a["box_probs"].argmax(axis=1) if len(a["box_scores"]) else np.zeros(0, np.int64)
        return detection.dcus_scores(a["box_image"], box_unc(a), classes, a["box_scores"], weights, a["n_images"],
                                     score_threshold=p["score_threshold"])

    ctx.progress(0.1, "PPAL: difficulty-calibrated uncertainty of the pool")
    keys, scores, scanned = _pool_scores(ctx, score)
    n_cand = min(len(keys), detection.PPAL_MAX_CANDIDATES,
                 max(rec.size, math.ceil(p["candidate_ratio"] * rec.size)))
    cand = _top(keys, scores, n_cand)
    ctx.progress(0.5, f"PPAL: category-conditioned matching distances of {n_cand:,} candidates")
    a = _read_candidates(ctx, keys[cand])
    try:
        classes = a["box_probs"].argmax(axis=1) if len(a["box_scores"]) else np.zeros(0, np.int64)
        dist = detection.ccms_distances(a["box_image"], classes, a["box_scores"], a["box_emb"], n_cand,
                                        score_threshold=p["score_threshold"], valid=a["box_has_emb"],
                                        check=ctx.check)
        ctx.check()
        ctx.progress(0.8, f"PPAL: k-medoids to {min(rec.size, n_cand):,} of {n_cand:,} candidates")
        medoids, assign = detection.kmedoids_select(dist, rec.size, seed=rec.seed or 0, iterations=p["iterations"],
                                                    check=ctx.check)
    except ValueError as exc:
        raise InvalidArgument(f"miner 'ppal': {exc}") from exc
    sizes = np.bincount(assign, minlength=len(medoids))
    # report the picks by their calibrated uncertainty (ties: smaller row id)
    order = np.lexsort((keys[cand[medoids]], -scores[cand[medoids]]))
    picks = cand[medoids[order]]
    names = ctx.model_spec.classes
    stats = {"candidates": int(n_cand),
             "class_quality": {n: float(q) for n, q in zip(names, quality, strict=True)},
             "class_weights": {n: float(w) for n, w in zip(names, weights, strict=True)},
             "labeled_boxes": {n: int(c) for n, c in zip(names, counted, strict=True)},
             "cluster_sizes": [int(s) for s in sizes[order]]}
    return MiningOutput(ids=ids_of_rows(ctx.table, keys[picks]), scores=scores[picks], rows_scanned=scanned,
                        rows_skipped=scanned - len(keys), timings={"total_s": time.perf_counter() - t0}, stats=stats)


__all__ = ["divproto_run", "ppal_run", "validate"]
