"""Streaming top-k selection: the running best ``k`` rows of a pool seen chunk by chunk.

Memory is O(k + chunk), whatever the pool size. Ties are broken by a stable row key
(the table's row id), smallest first, so the selection does not depend on the
order in which chunks arrive.
"""

from __future__ import annotations

import numpy as np


def splitmix64(x: np.ndarray) -> np.ndarray:
    """A fast, well-mixed 64-bit integer hash (SplitMix64 finaliser), vectorised."""
    z = x.astype(np.uint64, copy=True)
    with np.errstate(over="ignore"):
        z += np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        z ^= z >> np.uint64(31)
    return z


def row_uniforms(row_keys: np.ndarray, seed: int) -> np.ndarray:
    """Uniform(0, 1) numbers that depend only on (seed, row key): a row gets the same
    number whatever chunk or position it is read in, so stochastic selections are
    reproducible from the seed and the collection version alone."""
    mixed = splitmix64(row_keys.astype(np.uint64) ^ splitmix64(np.asarray([seed], dtype=np.uint64))[0])
    # 53 random bits -> (0, 1), never exactly 0 or 1
    return ((mixed >> np.uint64(11)).astype(np.float64) + 0.5) / float(1 << 53)


def gumbel_for_rows(row_keys: np.ndarray, seed: int) -> np.ndarray:
    """Standard Gumbel noise, one value per row key, reproducible (see row_uniforms)."""
    return -np.log(-np.log(row_uniforms(row_keys, seed)))


class StreamingTopK:
    """Keep the ``k`` rows with the largest selection key.

    ``push(keys, row_keys, payload)``: ``keys`` decides the order (larger first; NaN never
    selected); ``payload`` is a dict of same-length arrays carried along (ids, scores...).
    """

    def __init__(self, k: int) -> None:
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        self.k = k
        self.keys = np.empty(0, dtype=np.float64)
        self.row_keys = np.empty(0, dtype=np.uint64)
        self.payload: dict[str, np.ndarray] = {}
        self.seen = 0

    def push(self, keys: np.ndarray, row_keys: np.ndarray, payload: dict[str, np.ndarray]) -> None:
        keys = np.asarray(keys, dtype=np.float64)
        ok = ~np.isnan(keys)
        self.seen += int(ok.sum())
        if not ok.all():
            keys, row_keys = keys[ok], row_keys[ok]
            payload = {name: value[ok] for name, value in payload.items()}
        if len(keys) == 0:
            return
        if not self.payload:
            self.payload = {name: value[:0] for name, value in payload.items()}
        all_keys = np.concatenate([self.keys, keys])
        all_rows = np.concatenate([self.row_keys, row_keys.astype(np.uint64)])
        merged = {name: np.concatenate([self.payload[name], payload[name]]) for name in payload}
        if len(all_keys) > self.k:
            # cheap cut first, exact (tie-broken) order only among the survivors
            cut = np.argpartition(-all_keys, self.k - 1)[: self.k]
            threshold = all_keys[cut].min()
            candidates = np.flatnonzero(all_keys >= threshold)
            order = candidates[np.lexsort((all_rows[candidates], -all_keys[candidates]))][: self.k]
        else:
            order = np.lexsort((all_rows, -all_keys))
        self.keys, self.row_keys = all_keys[order], all_rows[order]
        self.payload = {name: value[order] for name, value in merged.items()}

    def result(self) -> tuple[np.ndarray, np.ndarray, dict[str, np.ndarray]]:
        """(keys, row keys, payload), best first."""
        order = np.lexsort((self.row_keys, -self.keys))
        return self.keys[order], self.row_keys[order], {n: v[order] for n, v in self.payload.items()}
