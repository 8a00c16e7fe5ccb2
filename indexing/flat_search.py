"""Exact (flat) vector search over vectors held in memory: how a space is searched below its
index threshold (and with ``exact=True``).

LanceDB's exhaustive search reads and decodes the whole vector column for every query: on
82k × 64 vectors it took 47 ms of CPU a query, a brute force over the same vectors in memory
2.1 ms, and under a soak's read load flat search was most of the server's CPU. The library
cannot keep the decoded column between queries, so assay does, relying on what Lance
guarantees about its files: a data file never changes once written. An update writes the row
anew in another fragment and marks the old copy deleted; a column rewrite writes a new data
file; a compaction writes new fragments. So the vectors of one (fragment, data file) pair are
valid for as long as that pair is in the table, whatever the version.

A search then needs only the *live rows that pass its filter* — row addresses with the SQL
prefilter and the version's deletions applied, no vector read; kept per fragment between
searches by :mod:`indexing.live_rows`, else a scan by Lance. The vectors are held in
float16 (half the memory and half the bytes a search streams, which is what a scan of
held vectors costs: in a 9.6 ms search of 200k × 64 float32 vectors, their product took
2.3 ms and the partition for the k best 1.1), each fragment's in a FAISS
``IndexScalarQuantizer`` (``QT_fp16``; unit vectors for the cosine metric) that ranks the
fragment's selected rows (:func:`_part`) on one thread and keeps the best in a heap. Its
distances are within a bound of the exact ones (:func:`error_bounds`), so the rows whose
lower bound reaches the k-th smallest upper bound hold the exact answer
(:func:`exact_candidates`; a fragment is asked for more rows until none left unranked could
be among them): only those are read from the table at full precision (one take with the
requested columns) and scored by :func:`distances`. Everything is read at one
dataset version, so the answer is the version's, exactly as Lance's own flat search would
give it (same distances; ties broken by row address).

Memory: at most ``budget_bytes`` (the store's ``FLAT_CACHE_BYTES``, 512 MiB by default; the
live rows get an eighth of it on top) for the whole store, 2 bytes a dimension and 5 a row:
a space whose vectors do not fit, or have a component beyond float16's range, is searched
by LanceDB as before. Held blocks of fragments no longer in a space's latest
version are dropped at its next search, and a space that got a vector index is forgotten
(:meth:`FlatVectors.forget`), so the memory follows the table and stays flat under a write
stream. The least recently searched spaces give way when a new one needs room.
"""

from __future__ import annotations

import math
import os
import threading
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa

from indexing.live_rows import BUDGET_SHARE, LiveRows, by_fragment

# FAISS's OpenMP threads for a search of several queries (one query gets one thread).
OMP_THREADS = max(1, os.cpu_count() or 1)

# Query vectors searched at once: bounds FAISS's result arrays at QUERY_BLOCK × candidates.
QUERY_BLOCK = 64
# Rows asked of each fragment at first (at least; twice k): enough that one search of a
# fragment almost always settles it (:func:`exact_candidates`); a fragment that could still
# hide a winner is searched again for four times as many.
FIRST_ASK = 16
# A part of a block whose rows pass the filter below this share is searched through a
# selector; at or above it among all the block's rows, asked for 1/share as many (the others
# dropped). FAISS asks a selector about every row, and mispredicts its branch: on 16 blocks
# of 37.5k × 64, one thread, k=20, the IDSelectorBitmap took 13.4 ms with 30 % of the rows
# selected, 9.5 with 10 %, 5.8 with 5 %, 1.7 with 1 %; all the rows 5.3, 4.6, 7.0 and 18.1 ms.
SELECT_BELOW = 0.05
# Error bounds of the float16 scores (:func:`error_bounds`): a float16 component is within a
# relative 2^-11 of the float32 one when normal (2^-10 here: a margin, which also covers
# the float32 rounding of a cosine space's unit vectors), within an absolute 2^-25 when
# subnormal (2^-24 here).
FP16_RELATIVE = 2.0 ** -10
FP16_ABSOLUTE = 2.0 ** -24
FP16_MAX = 65_000.0  # a component beyond this (float16 tops out at 65,504) is not held


def distances(vectors: np.ndarray, sq_norms: np.ndarray, queries: np.ndarray, metric: str) -> np.ndarray:
    """Distances, shape (n, m), between ``vectors`` (n, d) and ``queries`` (m, d), as Lance
    defines them (float32):

    * ``cosine``: 1 − v·q / (‖v‖ ‖q‖)
    * ``l2``: the squared Euclidean distance ‖v − q‖² = ‖v‖² − 2 v·q + ‖q‖² (never below 0)
    * ``dot``: 1 − v·q

    ``sq_norms`` holds ‖v‖² of each row. A zero vector has no cosine distance: its rows get
    NaN here and are never returned (Lance returns no rows for them either).
    """
    dots = vectors @ queries.T
    if metric == "dot":
        return np.subtract(1.0, dots, out=dots)
    q_sq = np.einsum("ij,ij->i", queries, queries)
    if metric == "l2":
        dots *= -2.0
        dots += sq_norms[:, None]
        dots += q_sq[None, :]
        return np.maximum(dots, 0.0, out=dots)
    if metric == "cosine":
        with np.errstate(divide="ignore", invalid="ignore"):
            np.divide(dots, np.sqrt(sq_norms)[:, None] * np.sqrt(q_sq)[None, :], out=dots)
        return np.subtract(1.0, dots, out=dots)
    raise ValueError(f"unknown metric {metric!r}")


def error_bounds(norms: np.ndarray, q_norm: float | np.ndarray, metric: str, dim: int) -> np.ndarray:
    """For rows of norms ``norms`` (‖v‖), a bound on |d̃ − d|: the distance d̃ scored from
    the rows held in float16 against the exact :func:`distances` d to a query of norm
    ``q_norm`` (broadcast against ``norms``), in ``dim`` dimensions.

    Each float16 component is within c·|v_j| + a of v_j (``FP16_RELATIVE``,
    ``FP16_ABSOLUTE``), so ‖v − v̂‖ ≤ c‖v‖ + a√d =: δ and |q·(v − v̂)| ≤ ‖q‖ δ
    (Cauchy–Schwarz). Every float32 sum of d products errs by at most d·2^-24 of the sum of
    their magnitudes, and FAISS's score and the exact formula are one sum each, with a
    subtraction or two: r = (d + 16)·2^-23 of the magnitudes they combine covers both.

    * ``dot`` (d̃ = 1 − q·v̂): ‖q‖ δ + r (1 + ‖q‖ ‖v‖);
    * ``cosine`` (unit vectors n = v/‖v‖ held, d̃ = 1 − q·n̂/‖q‖): c + a√d + 2r, whatever
      the row;
    * ``l2`` (d̃ = ‖q − v̂‖²): |(v − v̂)·(v + v̂ − 2q)| ≤ δ (‖v‖ + ‖v̂‖ + 2‖q‖) with
      ‖v̂‖ ≤ ‖v‖ + δ, plus r (‖v‖ + ‖q‖ + δ)².
    """
    c = FP16_RELATIVE
    a = FP16_ABSOLUTE * math.sqrt(dim)
    r = (dim + 16) * 2.0 ** -23
    norms = np.asarray(norms, dtype=np.float64)
    if metric == "cosine":
        return np.full(np.broadcast(norms, q_norm).shape, c + a + 2.0 * r)
    delta = c * norms + a
    if metric == "dot":
        return q_norm * delta + r * (1.0 + q_norm * norms)
    if metric == "l2":
        return delta * (2.0 * norms + delta + 2.0 * q_norm) + r * (norms + q_norm + delta) ** 2
    raise ValueError(f"unknown metric {metric!r}")


def exact_candidates(approx: np.ndarray, bounds: np.ndarray, k: int) -> tuple[np.ndarray, float]:
    """Of rows scored ``approx`` (n,) with errors within ``bounds`` (n,), the positions of
    those that may be among the k nearest, ties with the k-th included, and the threshold
    ``T`` used: the k-th smallest upper bound ``approx + bounds`` (∞ with fewer than k rows).
    k rows have an exact distance ≤ T, so a row whose exact distance is at most the k-th
    smallest has ``approx − bounds`` ≤ T: the rows returned hold the exact answer. (A row
    not scored is ruled out only if its lower bound exceeds T; see
    :meth:`FlatVectors._answer`.) A NaN score stands for no row (never a candidate)."""
    scored = np.flatnonzero(~np.isnan(approx))
    upper = approx[scored] + bounds[scored]
    threshold = float(np.partition(upper, k - 1)[k - 1]) if upper.size >= k else math.inf
    return scored[approx[scored] - bounds[scored] <= threshold], threshold


def top_k(dist: np.ndarray, keys: np.ndarray, k: int) -> list[np.ndarray]:
    """For each column of ``dist`` (n, m), the row positions of its ``k`` smallest finite
    distances, in ascending order of (distance, key) — ``keys`` (n,) breaks ties, so the
    answer does not depend on the order rows were scored in."""
    out = []
    for j in range(dist.shape[1]):
        col = dist[:, j]
        finite = np.flatnonzero(np.isfinite(col))
        if finite.size > k:
            # Every row tied with the k-th distance stays a candidate, so that the tie-break
            # by key below sees all of them.
            kth = np.partition(col[finite], k - 1)[k - 1]
            finite = finite[col[finite] <= kth]
        order = np.lexsort((keys[finite], col[finite]))[:k]
        out.append(finite[order])
    return out


@dataclass
class _Block:
    """The vectors of one fragment's data file, by physical row (offset in the fragment),
    in float16: a FAISS index of them (of v/‖v‖ for the cosine metric)."""

    index: Any  # faiss.IndexScalarQuantizer, QT_fp16, one entry per physical row; None:
    # a component beyond float16's range, in a row live or deleted (the space is searched by
    # LanceDB for as long as this fragment is in the table)
    norms: np.ndarray  # (physical rows,) float32: ‖v‖
    valid: np.ndarray  # (physical rows,) bool: not null (and not zero, for cosine)
    all_valid: bool
    max_norm: float

    @property
    def nbytes(self) -> int:
        held = 0 if self.index is None else int(self.index.ntotal) * int(self.index.code_size)
        return held + self.norms.nbytes + self.valid.nbytes


@dataclass
class _Part:
    """The rows one fragment contributes to a search: its block, the live rows' offsets
    that pass the filter and hold a vector (ascending) and their positions in the search's
    live rows; and how FAISS searches for them: among the rows a selector lets through
    (a sparse part) or among all the block's rows, the others dropped from what it returns
    (``selected``, None for none to drop)."""

    block: _Block
    offsets: np.ndarray
    positions: np.ndarray
    selected: np.ndarray | None  # (physical rows,) bool
    selector: Any  # faiss.SearchParameters, or None
    bitmap: np.ndarray | None  # the selector's bits, alive as long as the selector

    @property
    def searched(self) -> int:
        """Rows FAISS ranks: those selected with a selector, else all the block's."""
        return self.offsets.size if self.selector is not None else self.block.valid.size


class FlatVectors:
    """Held vectors of a store's flat-searched spaces, and the search over them (see the
    module docstring). Thread-safe; one per :class:`indexing.store.Store`."""

    def __init__(self, budget_bytes: int) -> None:
        self.budget_bytes = int(budget_bytes)
        self.live_rows = LiveRows(self.budget_bytes // BUDGET_SHARE)  # the rows a search scores
        self._lock = threading.Lock()
        # (collection, field id, metric) -> {(fragment id, data file path): block}, least
        # recently searched first. By field id, not name: a rename (a reindex's swap) keeps
        # the id. By metric: FAISS scores by it, and cosine holds unit vectors.
        self._spaces: OrderedDict[tuple[str, int, str], dict[tuple[int, str], _Block]] = OrderedDict()

    @property
    def nbytes(self) -> int:
        with self._lock:
            return sum(b.nbytes for blocks in self._spaces.values() for b in blocks.values())

    def forget(self, collection: str) -> None:
        """Drop what is held for ``collection``: it was dropped, or one of its spaces is
        searched through a vector index now."""
        with self._lock:
            for key in [key for key in self._spaces if key[0] == collection]:
                del self._spaces[key]
        self.live_rows.forget(collection)

    def search(self, dataset: Any, collection: str, column: str, queries: np.ndarray, *, k: int,
               metric: str, where: str | None, columns: Sequence[str]) -> pa.Table | None:
        """The ``k`` nearest rows of ``dataset`` (a Lance dataset at the version to read) to
        each of ``queries`` (m, d) by ``column``'s vectors, among the rows that pass
        ``where``: a table of ``query_index`` (int32), ``columns`` and ``_distance`` (float32),
        sorted by query, then distance. None when the column's vectors do not fit the budget
        or float16 (the caller searches with LanceDB instead)."""
        if metric not in ("cosine", "l2", "dot"):
            raise ValueError(f"unknown metric {metric!r}")
        field_id = dataset.lance_schema.field(column).id()
        space = (collection, field_id, metric)
        dim = dataset.schema.field(column).type.list_size
        files: dict[int, tuple[int, str]] = {}  # fragment id -> (physical rows, data file path)
        fragments = dataset.get_fragments()
        for fragment in fragments:
            path = next((f.path for f in fragment.metadata.data_files() if field_id in f.fields), None)
            if path is not None:  # else the column was added after the fragment: all null there
                files[fragment.fragment_id] = (fragment.physical_rows, path)
        need = sum(rows for rows, _ in files.values()) * (2 * dim + 5)
        if need > self.budget_bytes:
            return None
        held = self._held(space, files, need)
        if not self.live_rows.serves(dataset, collection, where):
            live = dataset.scanner(columns=[], filter=where or None, with_row_id=True,
                                   with_row_address=True).to_table()
            addresses = live.column("_rowaddr").to_numpy()
            row_ids = live.column("_rowid").to_numpy()
        else:  # a row's id is its address
            addresses = row_ids = self.live_rows.addresses(dataset, collection, where, fragments)
        order, spans = by_fragment(addresses)
        if order is not None:  # the positions below follow the grouped order
            addresses, row_ids = addresses[order], row_ids[order]
        parts: list[_Part] = []
        for fid, (lo, hi) in spans.items():
            if fid not in files:
                continue
            block = held.get((fid, files[fid][1])) or self._load(dataset, space, fid, files[fid], column, dim)
            if block.index is None:  # a component beyond float16
                return None
            part = _part(block, (addresses[lo:hi] & 0xFFFFFFFF).astype(np.int64), lo)
            if part is not None:
                parts.append(part)
        return self._answer(dataset, column, parts, row_ids, addresses, queries, k, metric, columns)

    def _held(self, space: tuple[str, int, str], files: dict[int, tuple[int, str]],
              need: int) -> dict[tuple[int, str], _Block]:
        """The space's held blocks that are still in the table (the others go), after making
        room for ``need`` bytes by forgetting the least recently searched other spaces."""
        wanted = {(fid, path) for fid, (_, path) in files.items()}
        with self._lock:
            blocks = self._spaces.pop(space, {})
            blocks = {k: b for k, b in blocks.items() if k in wanted}
            total = sum(b.nbytes for bs in self._spaces.values() for b in bs.values())
            while self._spaces and total + need > self.budget_bytes:
                _, gone = self._spaces.popitem(last=False)
                total -= sum(b.nbytes for b in gone.values())
            self._spaces[space] = blocks
            return dict(blocks)

    def _load(self, dataset: Any, space: tuple[str, int, str], fid: int, file: tuple[int, str],
              column: str, dim: int) -> _Block:
        """Read one fragment's vectors into a block: every physical row, deleted ones too,
        so that the block is the data file's whatever version loaded it (a search at an
        older version may still see a row a newer one deleted). A block without an index if
        a component is beyond float16's range: kept as such, so that the fragment is not
        read again at every search."""
        import faiss

        physical, path = file
        table = dataset.scanner(columns=[column], with_row_id=True, with_row_address=True,
                                include_deleted_rows=True, scan_in_order=True,
                                fragments=[dataset.get_fragment(fid)]).to_table()
        if table.num_rows != physical:
            raise RuntimeError(f"fragment {fid} of {column} read {table.num_rows} rows, expected {physical}")
        arr = table.column(column).combine_chunks()
        values = arr.values.slice(arr.offset * dim, len(arr) * dim)
        vectors = values.to_numpy(zero_copy_only=False).astype(np.float32).reshape(-1, dim)
        valid = arr.is_valid().to_numpy(zero_copy_only=False)
        vectors[~valid] = 0.0
        if vectors.size and not float(np.abs(vectors).max()) <= FP16_MAX:  # NaN fails it too
            block = _Block(None, np.zeros(0, np.float32), np.zeros(0, np.bool_), False, 0.0)
            self._keep(space, fid, path, block)
            return block
        norms = np.sqrt(np.einsum("ij,ij->i", vectors, vectors, dtype=np.float64)).astype(np.float32)
        metric = space[2]
        if metric == "cosine":  # unit vectors; a zero vector has no cosine distance: never returned
            valid &= norms > 0
            np.divide(vectors, norms[:, None], out=vectors, where=norms[:, None] > 0)
        index = faiss.IndexScalarQuantizer(dim, faiss.ScalarQuantizer.QT_fp16,
                                           faiss.METRIC_L2 if metric == "l2" else faiss.METRIC_INNER_PRODUCT)
        index.add(np.ascontiguousarray(vectors))
        block = _Block(index, norms, valid, bool(valid.all()), float(norms.max(initial=0.0)))
        self._keep(space, fid, path, block)
        return block

    def _keep(self, space: tuple[str, int, str], fid: int, path: str, block: _Block) -> None:
        with self._lock:
            if space in self._spaces:
                self._spaces[space][(fid, path)] = block

    @staticmethod
    def _answer(dataset: Any, column: str, parts: list[_Part], row_ids: np.ndarray, addresses: np.ndarray,
                queries: np.ndarray, k: int, metric: str, columns: Sequence[str]) -> pa.Table:
        """Each query's candidates from the float16 blocks (:func:`_candidates`), then the
        exact answer from their float32 vectors, read by one take with the requested
        columns."""
        import faiss

        # One query, one thread: FAISS would share it with OpenMP threads that then spin
        # waiting for more work, CPU a loaded server does not have. The setting is the
        # calling thread's own (OpenMP's nthreads is per thread).
        faiss.omp_set_num_threads(1 if queries.shape[0] == 1 else OMP_THREADS)
        dim = queries.shape[1]
        chosen: list[np.ndarray] = []  # per query: positions in the live rows that may win
        for lo in range(0, queries.shape[0], QUERY_BLOCK):
            chosen.extend(_candidates(parts, np.ascontiguousarray(queries[lo:lo + QUERY_BLOCK], dtype=np.float32),
                                      k, metric))
        wanted = np.unique(row_ids[np.concatenate(chosen)]) if chosen else np.zeros(0, np.uint64)
        read = list(dict.fromkeys([*columns, column]))
        taken = dataset._take_rows(wanted.tolist(), columns=read) if wanted.size else None
        vectors = np.zeros((0, dim), np.float32)
        if taken is not None:
            arr = taken.column(column).combine_chunks()
            vectors = arr.values.slice(arr.offset * dim, len(arr) * dim).to_numpy(
                zero_copy_only=False).astype(np.float32).reshape(-1, dim)
        query_index, winners, winner_dist = [], [], []
        for j, at in enumerate(chosen):
            rows = np.searchsorted(wanted, row_ids[at])  # the taken rows are in ``wanted``'s order
            mine = vectors[rows]
            dist = distances(mine, np.einsum("ij,ij->i", mine, mine), queries[j:j + 1], metric)
            (best,) = top_k(dist, addresses[at], k)
            query_index.append(np.full(best.size, j, np.int32))
            winners.append(rows[best])
            winner_dist.append(dist[best, 0])
        picked_rows = np.concatenate(winners) if winners else np.zeros(0, np.int64)
        if taken is not None:
            result = taken.take(pa.array(picked_rows))
            out = {c: result.column(c) for c in columns}
        else:
            out = {c: pa.nulls(0, dataset.schema.field(c).type) for c in columns}
        return pa.table({"query_index": pa.array(np.concatenate(query_index) if query_index else
                                                  np.zeros(0, np.int32), pa.int32()),
                         **out,
                         "_distance": pa.array(np.concatenate(winner_dist).astype(np.float32) if winner_dist
                                               else np.zeros(0, np.float32), pa.float32())})


def _candidates(parts: list[_Part], queries: np.ndarray, k: int, metric: str) -> list[np.ndarray]:
    """For each of ``queries`` (m, d), the positions in the search's live rows that may be
    among its k nearest (:func:`exact_candidates` over what FAISS ranked in every part). A
    part with rows FAISS did not rank is settled once its last ranked score, less the
    largest error any of its rows can have, is above every query's threshold (no row left
    out can be a candidate); until then it is searched again for four times as many."""
    dim = queries.shape[1]
    q_norms = np.sqrt(np.einsum("ij,ij->i", queries, queries, dtype=np.float64))[:, None]
    # As many rows as the part's share of what FAISS ranks calls for.
    asks = [min(p.searched, math.ceil(max(2 * k, FIRST_ASK) * p.searched / p.offsets.size)) for p in parts]
    scored: list[tuple[np.ndarray, ...]] = [()] * len(parts)
    picked = [np.zeros(0, np.int64)] * len(queries)  # no part: no candidate
    again = list(range(len(parts)))
    while again:
        for i in again:
            scored[i] = _search_part(parts[i], queries, q_norms, asks[i], metric, dim)
        approx = np.concatenate([p[0] for p in scored], axis=1)
        bounds = np.concatenate([p[2] for p in scored], axis=1)
        found = [exact_candidates(approx[j], bounds[j], k) for j in range(len(queries))]
        picked = [cand for cand, _ in found]
        thresholds = np.array([threshold for _, threshold in found])
        again = []
        for i, part in enumerate(parts):
            if asks[i] < part.searched:
                widest = error_bounds(np.float32(part.block.max_norm), q_norms[:, 0], metric, dim)
                if (scored[i][3] - widest <= thresholds).any():
                    asks[i] = min(part.searched, asks[i] * 4)
                    again.append(i)
    if not parts:
        return picked
    positions = np.concatenate([p[1] for p in scored], axis=1)
    return [positions[j][cand] for j, cand in enumerate(picked)]


def _part(block: _Block, offsets: np.ndarray, start: int) -> _Part | None:
    """The part of a search ``block`` answers: the live ``offsets`` (its rows that pass the
    filter, at positions ``start``… of the search's live rows) that hold a vector; None if
    there are none. Below ``SELECT_BELOW`` of the block's rows they are searched through an
    ``IDSelectorBitmap``; above it, among all rows (cheaper than asking the selector of
    each row; the others returned are dropped)."""
    positions = np.arange(start, start + offsets.size)
    if offsets.size > 1 and not (offsets[1:] > offsets[:-1]).all():
        order = np.argsort(offsets, kind="stable")
        offsets, positions = offsets[order], positions[order]
    if not block.all_valid:
        keep = block.valid[offsets]
        offsets, positions = offsets[keep], positions[keep]
    if not offsets.size:
        return None
    physical = block.valid.size
    if offsets.size == physical:  # every row of the block
        return _Part(block, offsets, positions, None, None, None)
    selected = np.zeros(physical, np.bool_)
    selected[offsets] = True
    if offsets.size >= SELECT_BELOW * physical:
        return _Part(block, offsets, positions, selected, None, None)
    import faiss

    bitmap = np.packbits(selected, bitorder="little")
    selector = faiss.SearchParameters(sel=faiss.IDSelectorBitmap(physical, faiss.swig_ptr(bitmap)))
    return _Part(block, offsets, positions, None, selector, bitmap)


def _search_part(part: _Part, queries: np.ndarray, q_norms: np.ndarray, ask: int, metric: str,
                 dim: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The ``ask`` rows FAISS ranks nearest each query in ``part`` by the float16 scores:
    their scores d̃ as distances (m, ask), ascending, NaN for a row not the part's (or none);
    their positions in the search's live rows; their :func:`error_bounds`; and the last
    score, which no row left unranked beats (m,), NaN when FAISS ran out of rows."""
    scores, labels = part.block.index.search(queries, ask, params=part.selector)
    if metric == "l2":
        approx = scores.astype(np.float64)
    elif metric == "dot":
        approx = 1.0 - scores.astype(np.float64)
    else:
        with np.errstate(divide="ignore", invalid="ignore"):
            approx = 1.0 - scores.astype(np.float64) / q_norms
    found = labels >= 0
    last = np.where(found[:, -1], approx[:, -1], np.nan)
    labels = np.where(found, labels, 0)
    if part.selected is not None:
        found &= part.selected[labels]
    if not found.all():
        approx[~found] = np.nan
    at = np.minimum(np.searchsorted(part.offsets, labels), part.offsets.size - 1)
    bounds = error_bounds(part.block.norms[labels], q_norms, metric, dim)
    return approx, part.positions[at], bounds, last
