"""Stored predictions as class probabilities: the argmax and confidence every reader shows.

``pred_<model>`` structs hold ``probs``, ``logits`` or ``samples`` (classification) or
``boxes`` with per-class ``probs`` (detection). These turn a batch of them into (rows, (n, C)
float64 probabilities): ``probs`` where set, else ``softmax(logits)`` (:mod:`indexing.measures`),
else the mean of the ``samples`` where the reader passes them; rows with none are left out. Analytics, exports, the web page and notebook grids read
predictions through here. NumPy and pyarrow only (no store, no DuckDB): the notebook
grid of the light client uses it.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from indexing.measures import softmax

__all__ = ["box_probs", "list_matrix", "prediction_probs", "samples_mean", "valid_mask"]


def valid_mask(arr: pa.Array) -> np.ndarray:
    return ~np.asarray(arr.is_null().to_numpy(zero_copy_only=False), dtype=bool)


def list_matrix(arr: pa.Array, rows: np.ndarray, c: int) -> np.ndarray:
    """Rows ``rows`` (all non-null, each of length ``c``) of a list<float> array as (n, c) float64."""
    taken = arr if len(rows) == len(arr) else arr.take(pa.array(rows, pa.int64()))
    values = np.asarray(pc.list_flatten(taken).to_numpy(zero_copy_only=False), dtype=np.float64)
    return values.reshape(len(rows), c)


def samples_mean(samples: pa.Array, rows: np.ndarray, c: int) -> np.ndarray:
    """Rows ``rows`` (each with at least one sample of length ``c``) of a
    list<list<float>> array as the (n, c) float64 mean of their samples (rows may hold
    different numbers of samples)."""
    taken = samples if len(rows) == len(samples) else samples.take(pa.array(rows, pa.int64()))
    counts = np.asarray(pc.list_value_length(taken).to_numpy(zero_copy_only=False), dtype=np.int64)
    inner = pc.list_flatten(taken)
    values = np.asarray(pc.list_flatten(inner).to_numpy(zero_copy_only=False), dtype=np.float64)
    starts = np.r_[0, np.cumsum(counts)[:-1]]
    return np.add.reduceat(values.reshape(len(inner), c), starts, axis=0) / counts[:, None]


def prediction_probs(probs: pa.Array, logits: pa.Array, c: int, temperature: float = 1.0,
                     samples: pa.Array | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(rows with a prediction, their (n, C) float64 probabilities): ``probs`` where set,
    else ``softmax(logits / temperature)``, else (when ``samples`` is given) the mean of the
    row's samples — MC-dropout passes, ensemble or committee members — as ``col.score`` and
    :func:`miners.edge.prediction_scores` take it. Rows with none of them are left out."""
    has_p, has_l = valid_mask(probs), valid_mask(logits)
    has_s = np.zeros(len(has_p), dtype=bool)
    if samples is not None:
        # a null or empty list of samples is no prediction
        lengths = pc.fill_null(pc.list_value_length(samples), 0).to_numpy(zero_copy_only=False)
        has_s = np.asarray(lengths, dtype=np.int64) > 0
    keep = np.flatnonzero(has_p | has_l | has_s)
    out = np.empty((len(keep), c), dtype=np.float64)
    from_p = has_p[keep]
    from_l = ~from_p & has_l[keep]
    from_s = ~from_p & ~from_l
    if from_p.any():
        out[from_p] = list_matrix(probs, keep[from_p], c)
    if from_l.any():
        out[from_l] = softmax(list_matrix(logits, keep[from_l], c), temperature)
    if from_s.any():
        out[from_s] = samples_mean(samples, keep[from_s], c)
    return keep, out


def box_probs(boxes: pa.Array, c: int) -> tuple[np.ndarray, np.ndarray]:
    """(owning row of each box that has per-class probs, their (n, C) probabilities)."""
    flat = pc.list_flatten(boxes)
    if len(flat) == 0:
        return np.zeros(0, np.int64), np.zeros((0, c))
    owner = np.asarray(pc.list_parent_indices(boxes).to_numpy(zero_copy_only=False), dtype=np.int64)
    probs = pc.struct_field(flat, "probs")
    keep = np.flatnonzero(valid_mask(probs))
    return owner[keep], list_matrix(probs, keep, c)
