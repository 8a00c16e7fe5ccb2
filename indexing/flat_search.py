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
searches by :mod:`indexing.live_rows`, else a scan by Lance — scores those rows against the
held vectors (one product per fragment, keeping each fragment's k best), and reads the
requested columns of the k winners only (a take by row id). Everything is read at one
dataset version, so the answer is the version's, exactly as Lance's own flat search would
give it (same distances: see :func:`distances`; ties broken by row address).

Memory: at most ``budget_bytes`` (the store's ``FLAT_CACHE_BYTES``, 512 MiB by default; the
live rows get an eighth of it on top) for the whole store: a space whose vectors do not fit
is searched by LanceDB as before. Held blocks of fragments no longer in a space's latest
version are dropped at its next search, and a space that got a vector index is forgotten
(:meth:`FlatVectors.forget`), so the memory follows the table and stays flat under a write
stream. The least recently searched spaces give way when a new one needs room.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa

from indexing.live_rows import BUDGET_SHARE, LiveRows, by_fragment

# Query vectors scored at once: bounds the distance matrix at QUERY_BLOCK × live rows.
QUERY_BLOCK = 64


def distances(vectors: np.ndarray, sq_norms: np.ndarray, queries: np.ndarray, metric: str) -> np.ndarray:
    """Distances, shape (n, m), between ``vectors`` (n, d) and ``queries`` (m, d), as Lance
    defines them (float32):

    * ``cosine``: 1 − v·q / (‖v‖ ‖q‖)
    * ``l2``: the squared Euclidean distance ‖v − q‖² = ‖v‖² − 2 v·q + ‖q‖² (never below 0)
    * ``dot``: 1 − v·q

    ``sq_norms`` holds ‖v‖² of each row (computed once per held block). A zero vector has no
    cosine distance: its rows get NaN here and are never returned (Lance returns no rows for
    them either).
    """
    # One query: a loop without BLAS. OpenBLAS splits a product over its threads, which
    # then spin waiting for the next call: at 137k × 64 in 14 fragments an unfiltered search
    # cost 34.1 ms of CPU against 20.3 this way (wall 17.7 against 18.9 ms) — CPU that a
    # loaded server does not have. Several queries: a matrix product, threads and all.
    dots = np.einsum("ij,j->i", vectors, queries[0])[:, None] if len(queries) == 1 else vectors @ queries.T
    # In place on the product (the same float32 operations as the formulas above, so the
    # same values): a block of 64k rows is several MB, and each temporary is a pass over it.
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


def candidates(dist: np.ndarray, k: int) -> np.ndarray:
    """Positions in ``dist`` (n,) of its ``k`` smallest finite distances and of every other
    one tied with the k-th: a superset of what :func:`top_k` can pick from these rows, in one
    partition and one comparison (NaN, which ``np.partition`` sorts last, and infinity are
    never candidates)."""
    if dist.size > k:
        kth = np.partition(dist, k - 1)[k - 1]
        if np.isfinite(kth):
            return np.flatnonzero(dist <= kth)
    return np.flatnonzero(np.isfinite(dist))


@dataclass
class _Block:
    """The vectors of one fragment's data file, by physical row (offset in the fragment)."""

    vectors: np.ndarray  # (physical rows, d) float32
    sq_norms: np.ndarray  # (physical rows,) float32
    valid: np.ndarray  # (physical rows,) bool: not null
    all_valid: bool  # no null vector in the block

    @property
    def nbytes(self) -> int:
        return self.vectors.nbytes + self.sq_norms.nbytes + self.valid.nbytes


class FlatVectors:
    """Held vectors of a store's flat-searched spaces, and the search over them (see the
    module docstring). Thread-safe; one per :class:`indexing.store.Store`."""

    def __init__(self, budget_bytes: int) -> None:
        self.budget_bytes = int(budget_bytes)
        self.live_rows = LiveRows(self.budget_bytes // BUDGET_SHARE)  # the rows a search scores
        self._lock = threading.Lock()
        # (collection, field id) -> {(fragment id, data file path): block}, least recently
        # searched first. By field id, not name: a rename (a reindex's swap) keeps the id.
        self._spaces: OrderedDict[tuple[str, int], dict[tuple[int, str], _Block]] = OrderedDict()

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
        (the caller searches with LanceDB instead)."""
        field_id = dataset.lance_schema.field(column).id()
        space = (collection, field_id)
        dim = dataset.schema.field(column).type.list_size
        files: dict[int, tuple[int, str]] = {}  # fragment id -> (physical rows, data file path)
        fragments = dataset.get_fragments()
        for fragment in fragments:
            path = next((f.path for f in fragment.metadata.data_files() if field_id in f.fields), None)
            if path is not None:  # else the column was added after the fragment: all null there
                files[fragment.fragment_id] = (fragment.physical_rows, path)
        need = sum(rows for rows, _ in files.values()) * (4 * dim + 5)
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
        # Score the live rows fragment by fragment: (block, first position in the live rows,
        # positions of the valid ones relative to it or None for all, their offsets).
        parts: list[tuple[_Block, int, np.ndarray | None, np.ndarray]] = []
        for fid, (lo, hi) in spans.items():
            if fid not in files:
                continue
            block = held.get((fid, files[fid][1])) or self._load(dataset, space, fid, files[fid], column, dim)
            offsets = (addresses[lo:hi] & 0xFFFFFFFF).astype(np.intp)
            if block.all_valid:
                parts.append((block, lo, None, offsets))
                continue
            keep = np.flatnonzero(block.valid[offsets])
            if keep.size:
                parts.append((block, lo, keep, offsets[keep]))
        return self._answer(dataset, parts, row_ids, addresses, queries, k, metric, columns)

    def _held(self, space: tuple[str, int], files: dict[int, tuple[int, str]],
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

    def _load(self, dataset: Any, space: tuple[str, int], fid: int, file: tuple[int, str],
              column: str, dim: int) -> _Block:
        """Read one fragment's vectors into a block: every physical row, deleted ones too,
        so that the block is the data file's whatever version loaded it (a search at an
        older version may still see a row a newer one deleted)."""
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
        block = _Block(vectors, np.einsum("ij,ij->i", vectors, vectors), valid, bool(valid.all()))
        with self._lock:
            if space in self._spaces:
                self._spaces[space][(fid, path)] = block
        return block

    @staticmethod
    def _answer(dataset: Any, parts: list[tuple[_Block, int, np.ndarray | None, np.ndarray]],
                row_ids: np.ndarray, addresses: np.ndarray, queries: np.ndarray, k: int, metric: str,
                columns: Sequence[str]) -> pa.Table:
        winners: list[np.ndarray] = []  # per query: positions in the live rows, best first
        winner_dist: list[np.ndarray] = []
        for lo in range(0, queries.shape[0], QUERY_BLOCK):
            block_q = queries[lo:lo + QUERY_BLOCK]
            # Each fragment's own candidates first (its k best and their ties), then the
            # best of those: no distance array over all the live rows is ever built.
            found: list[list[tuple[np.ndarray, np.ndarray]]] = [[] for _ in range(block_q.shape[0])]
            for block, start, keep, offsets in parts:
                dist = distances(block.vectors, block.sq_norms, block_q, metric)
                if not (keep is None and offsets.size == dist.shape[0] and (offsets[1:] > offsets[:-1]).all()):
                    dist = dist[offsets]  # else the live rows are the block's rows, in order
                at = np.arange(start, start + offsets.size) if keep is None else start + keep
                for j in range(block_q.shape[0]):
                    col = dist[:, j]
                    best = candidates(col, k)
                    found[j].append((col[best], at[best]))
            for per_fragment in found:
                dist_j = np.concatenate([d for d, _ in per_fragment]) if per_fragment else np.zeros(0, np.float32)
                at_j = np.concatenate([a for _, a in per_fragment]) if per_fragment else np.zeros(0, np.int64)
                (best,) = top_k(dist_j[:, None], addresses[at_j], k)
                winners.append(at_j[best])
                winner_dist.append(dist_j[best])
        query_index = np.concatenate([np.full(len(w), i, np.int32) for i, w in enumerate(winners)])
        picked = np.concatenate(winners) if winners else np.zeros(0, np.int64)
        wanted = np.unique(row_ids[picked])
        dist_all = np.concatenate(winner_dist).astype(np.float32) if winner_dist else np.zeros(0, np.float32)
        if columns and wanted.size:
            taken = dataset._take_rows(wanted.tolist(), columns=list(columns))
            at = np.searchsorted(wanted, row_ids[picked])  # the taken rows are in ``wanted``'s order
            result = taken.take(pa.array(at))
        else:
            result = pa.table({c: pa.nulls(0, dataset.schema.field(c).type) for c in columns})
        return pa.table({"query_index": pa.array(query_index, pa.int32()),
                         **{c: result.column(c) for c in columns},
                         "_distance": pa.array(dist_all, pa.float32())})
