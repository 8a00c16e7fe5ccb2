"""An in-memory index of a collection's ids for the write path.

Every upsert must know which of its ids exist already: to keep their ``created_at``, to
tell each caller how many rows it inserted and updated, and to append rows known to be new
(several times faster than a merge). Asking the table costs a scan or a BTREE lookup whose
price grows with fragments and rows not yet indexed (tens of ms a commit under a steady
write load, seconds for a bulk batch at 10M rows). This index answers from memory.

Layout: 64-bit hashes of the ids (Python's string hash, stable within the process) with
their ``created_at`` (µs), in sorted runs — a base run plus small runs appended by commits,
merged into the base once they are many. 16 bytes a row: 160 MB for 10M rows. A hash
collision (about 10M² / 2⁶⁴ ≈ 5e-6 at 10M rows) would report a new id as existing: the write
then goes through ``merge_insert``, which is correct, and only that row's ``created_at`` and
the insert/update count are off.

Consistency: the index reflects one table version. Before each use the committer checks the
versions committed since, from Lance's transaction records: its own commits (applied here
already) and operations that cannot change the set of ids (compaction, index builds,
schema and config changes) move it forward; anything else (another process's append,
update or delete; a restore) makes it rebuild from one scan of ``id`` and ``created_at``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any

import numpy as np
import pyarrow as pa

# Lance operations that leave the set of ids (and their created_at) as it was.
ID_NEUTRAL_OPERATIONS = frozenset({
    "Rewrite", "CreateIndex", "Merge", "Project", "UpdateConfig", "ReserveFragments",
    "DataReplacement", "BaseOperation",
})
MAX_RUNS = 16
MAX_GAP = 256  # more versions than this since the index was built: rebuild rather than read them


def hash_ids(ids: Sequence[str] | pa.Array | pa.ChunkedArray) -> np.ndarray:
    """64-bit hashes of ids (stable within this process)."""
    values = ids.to_pylist() if isinstance(ids, pa.Array | pa.ChunkedArray) else ids
    return np.fromiter((hash(i) for i in values), dtype=np.int64, count=len(values))


class IdIndex:
    """Hashes of every id of one collection with their ``created_at``."""

    def __init__(self) -> None:
        self.version: int | None = None  # the table version reflected; None: not built
        self._applied: set[int] = set()  # versions of this process's own commits, applied
        self._runs: list[tuple[np.ndarray, np.ndarray]] = []  # sorted (hashes, created_us)

    @property
    def rows(self) -> int:
        return sum(len(k) for k, _ in self._runs)

    @property
    def nbytes(self) -> int:
        return sum(k.nbytes + c.nbytes for k, c in self._runs)

    # -- consistency ------------------------------------------------------------------

    def current(self, latest: int, operations: Callable[[list[int]], list[str | None]]) -> bool:
        """True if the index holds the ids of version ``latest``: every version since the
        one it reflects is this process's own (applied) or id-neutral. ``operations(versions)``
        names the operation of each version it is given (:func:`operation_names`); only the
        versions this process did not write are read."""
        if self.version is None or latest < self.version:
            return False
        if latest - self.version > MAX_GAP:
            return False
        unknown = [v for v in range(latest, self.version, -1) if v not in self._applied]
        if unknown and any(name not in ID_NEUTRAL_OPERATIONS for name in operations(unknown)):
            return False
        self.version = latest
        self._applied = {v for v in self._applied if v > latest}
        return True

    def rebuild(self, version: int, batches: Iterable[pa.RecordBatch]) -> None:
        """Load from batches of (``id``, ``created_at``) read at ``version``."""
        keys, created = [], []
        for batch in batches:
            keys.append(hash_ids(batch.column(0)))
            created.append(_micros(batch.column(1)))
        k = np.concatenate(keys) if keys else np.zeros(0, np.int64)
        c = np.concatenate(created) if created else np.zeros(0, np.int64)
        order = np.argsort(k, kind="stable")
        self._runs = [(k[order], c[order])]
        self.version, self._applied = version, set()

    def invalidate(self) -> None:
        self.version, self._applied, self._runs = None, set(), []

    # -- reads and updates --------------------------------------------------------------

    def lookup(self, hashes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(found mask, created_at µs — 0 where not found) of each hash."""
        found = np.zeros(len(hashes), dtype=bool)
        created = np.zeros(len(hashes), dtype=np.int64)
        for keys, stamps in self._runs:
            if not len(keys):
                continue
            pos = np.searchsorted(keys, hashes)
            pos_ok = np.minimum(pos, len(keys) - 1)
            hit = (pos < len(keys)) & (keys[pos_ok] == hashes) & ~found
            created[hit] = stamps[pos_ok[hit]]
            found |= hit
        return found, created

    def committed(self, version: int, *, inserted: np.ndarray | None = None,
                  created_us: np.ndarray | None = None, removed: np.ndarray | None = None) -> None:
        """This process committed ``version``: the ids it inserted (with their created_at)
        and removed are applied, and the version will not be read back from Lance."""
        if self.version is None:
            return
        if removed is not None and len(removed):
            self._runs = [(k[keep], c[keep]) for k, c in self._runs
                          for keep in [~np.isin(k, removed)]]
        if inserted is not None and len(inserted):
            order = np.argsort(inserted, kind="stable")
            self._runs.append((inserted[order], np.asarray(created_us)[order]))
            # Runs stay few (O(log n)): the newest is merged into the one before while it is
            # at least a quarter of its size (timsort merges two sorted runs in one pass).
            while len(self._runs) > 1 and (len(self._runs[-1][0]) * 4 >= len(self._runs[-2][0])
                                           or len(self._runs) > MAX_RUNS):
                (k1, c1), (k2, c2) = self._runs[-2], self._runs.pop()
                k, c = np.concatenate([k1, k2]), np.concatenate([c1, c2])
                order = np.argsort(k, kind="stable")
                self._runs[-1] = (k[order], c[order])
        self._applied.add(version)


def _micros(arr: pa.Array | pa.ChunkedArray) -> np.ndarray:
    """Timestamps as int64 µs (nulls as 0)."""
    values = arr.cast(pa.int64()) if not pa.types.is_integer(arr.type) else arr
    return np.asarray(values.fill_null(0).to_numpy(zero_copy_only=False), dtype=np.int64)


def operation_names(dataset: Any, versions: Sequence[int]) -> list[str | None]:
    """The operation that made each of ``versions`` of a Lance ``dataset``; None where a
    version has no record or it is gone (cleaned up): unknown to the caller.

    pylance 13 cannot convert a compaction that remapped indexes (a ``Rewrite`` carrying
    ``rewritten_indices``, what compacting a table without stable row ids commits) to
    Python: reading it raises ``TypeError: LanceOperation.RewrittenIndex.__init__() missing
    3 required positional arguments``, so a version that raises that error is a ``Rewrite``."""
    names: list[str | None] = []
    for version in versions:
        try:
            tx = dataset.read_transaction(version)
        except TypeError as exc:
            names.append("Rewrite" if "RewrittenIndex" in str(exc) else None)
            continue
        except OSError:  # cleaned up
            names.append(None)
            continue
        names.append(None if tx is None else type(tx.operation).__name__)
    return names


__all__ = ["ID_NEUTRAL_OPERATIONS", "IdIndex", "hash_ids", "operation_names"]
