"""Stored predictions as class probabilities: the argmax and confidence every reader shows.

``pred_<model>`` structs hold ``probs`` or ``logits`` (classification) or ``boxes`` with
per-class ``probs`` (detection). These turn a batch of them into (rows, (n, C) float64
probabilities): ``probs`` where set, else ``softmax(logits)`` (:mod:`indexing.measures`); rows with
neither are left out. Analytics, exports, the web page and notebook grids read
predictions through here. NumPy and pyarrow only (no store, no DuckDB): the notebook
grid of the light client uses it.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from indexing.measures import softmax

__all__ = ["box_probs", "list_matrix", "prediction_probs", "valid_mask"]


def valid_mask(arr: pa.Array) -> np.ndarray:
    return ~np.asarray(arr.is_null().to_numpy(zero_copy_only=False), dtype=bool)


def list_matrix(arr: pa.Array, rows: np.ndarray, c: int) -> np.ndarray:
    """Rows ``rows`` (all non-null, each of length ``c``) of a list<float> array as (n, c) float64."""
    taken = arr if len(rows) == len(arr) else arr.take(pa.array(rows, pa.int64()))
    values = np.asarray(pc.list_flatten(taken).to_numpy(zero_copy_only=False), dtype=np.float64)
    return values.reshape(len(rows), c)


def prediction_probs(probs: pa.Array, logits: pa.Array, c: int,
                     temperature: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """(rows with a prediction, their (n, C) float64 probabilities): ``probs`` where set,
    else ``softmax(logits / temperature)``. Rows with neither are left out."""
    has_p, has_l = valid_mask(probs), valid_mask(logits)
    keep = np.flatnonzero(has_p | has_l)
    out = np.empty((len(keep), c), dtype=np.float64)
    from_p = has_p[keep]
    if from_p.any():
        out[from_p] = list_matrix(probs, keep[from_p], c)
    if (~from_p).any():
        out[~from_p] = softmax(list_matrix(logits, keep[~from_p], c), temperature)
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
