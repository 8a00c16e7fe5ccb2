"""The uncertainty-vs-quality report as the server runs it: the servicer's aggregate kind
``"uncertainty_quality"`` and the web page's ``/api/collections/{name}/uncertainty_quality``
both call :func:`uncertainty_quality_report`.

The report itself is :func:`indexing.quality.uncertainty_quality`. What this layer adds is
what the store layer may not import: the detection miner's per-image uncertainty
(:func:`miners.detection.detection_scores`, with the ``detection`` miner's default
aggregation and entropy-NMS, read from the miner registry so that the two never drift) and
a mining run's scores (``run_id``, through the run store).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from indexing.errors import FailedPrecondition
from indexing.predictions import valid_mask
from indexing.quality import BoxScorer, uncertainty_quality
from indexing.schema import PRED_PREFIX, ModelSpec
from miners import detection
from miners.registry import get as miner

__all__ = ["box_scorers", "uncertainty_quality_report"]

#: ``run_scores(run_id, collection)`` -> (``id``, ``score`` table, the run's model or None).
RunScores = Callable[[str, str], tuple[pa.Table, str | None]]


def _defaults() -> tuple[str, float | None]:
    params = {p.name: p.default for p in miner("detection").params}
    nms = float(params["nms_iou"])
    return str(params["aggregate"]), (None if nms >= 1.0 else nms)


def _box_scorer(method: str) -> BoxScorer:
    """Per-row detection uncertainty of a batch's boxes column: the detection miner's
    score under ``method`` (NaN for a row whose boxes list is null)."""

    def score(ids: pa.Array, boxes: pa.Array, spec: ModelSpec) -> np.ndarray:
        out = np.full(len(boxes), np.nan)
        rows = np.flatnonzero(valid_mask(boxes))
        if not len(rows):
            return out
        taken = boxes.take(pa.array(rows, pa.int64()))
        flat = pc.list_flatten(taken)
        box_image = np.asarray(pc.list_parent_indices(taken).to_numpy(zero_copy_only=False), np.int64)
        c = spec.num_classes
        if len(flat):
            coords = np.stack([np.asarray(flat.field(k).to_numpy(zero_copy_only=False), np.float64)
                               for k in ("x1", "y1", "x2", "y2")], axis=1)
            scores = np.asarray(pc.fill_null(flat.field("score"), 0.0).to_numpy(zero_copy_only=False), np.float64)
            lengths = np.asarray(pc.fill_null(pc.list_value_length(flat.field("probs")), 0)
                                 .to_numpy(zero_copy_only=False), np.int64)
        else:
            coords, scores, lengths = np.zeros((0, 4)), np.zeros(0), np.zeros(0, np.int64)
        probs = None
        if len(flat) and (lengths == c).all():
            probs = np.asarray(pc.list_flatten(flat.field("probs")).to_numpy(zero_copy_only=False),
                               np.float64).reshape(-1, c)
        elif method != "one_minus_score" and len(flat):
            b = int(np.flatnonzero(lengths != c)[0])
            image = int(box_image[b])
            first = int(np.flatnonzero(box_image == image)[0])
            row_id = ids[int(rows[image])].as_py()
            raise FailedPrecondition(
                f"row {row_id!r}: {PRED_PREFIX}{spec.name}.boxes[{b - first}].probs has "
                f"{'no probs' if lengths[b] == 0 else f'{int(lengths[b])} probs'}; uncertainty={method!r} needs "
                f"{c} class probabilities on every box: store them, or use uncertainty='one_minus_score'")
        how, nms = _defaults()
        out[rows] = detection.detection_scores(box_image, coords, scores, probs, len(rows), method=method,
                                               aggregate=how, nms_iou=nms)
        return out

    return score


def box_scorers() -> dict[str, BoxScorer]:
    """Every per-box method of the detection miner, as a per-row image scorer."""
    return {m: _box_scorer(m) for m in detection.BOX_METHODS}


def uncertainty_quality_report(col: Any, run_scores: RunScores | None, *, model: str | None = None,
                               run_id: str | None = None, **options: Any) -> pa.Table:
    """:func:`indexing.quality.uncertainty_quality` of ``col`` with the detection scorers
    and, when ``run_id`` is given, that run's scores (its model is the default ``model``)."""
    scores = None
    if run_id:
        if run_scores is None:
            raise FailedPrecondition("mining runs are not available on this server")
        scores, run_model = run_scores(run_id, col.name)
        model = model or run_model
    return uncertainty_quality(col, model, run_scores=scores, run_id=run_id or None, box_scores=box_scorers(),
                               **options)
