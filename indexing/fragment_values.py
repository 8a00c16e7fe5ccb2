"""Per-row values derived from a table's rows, kept per fragment between reads.

A mining run of a scored miner (:func:`miners.runner.run_mining`) reads its inputs for every
pool row, decodes them and scores each row: at 170k rows of 4-class probabilities, 73 ms of
CPU a ``margin`` run in process, of the 193 ms a whole mining operation (its records, the
job, the results read) cost the server. When a row's score is a function of that row's
stored values alone (and of the run's miner, parameters and model, which make the
``derivation`` key), a fragment's scores are a function of its data files, each written once
and never changed (an update writes a new deletion file and appends the new rows; a
compaction writes new fragments). So :class:`FragmentValues` keeps, per (collection,
derivation), each fragment's values by physical row under its id and data files, with a
state per row: 2 known, 1 the row has no value (it lacks an input: the run skips it), 0
not known (not read yet: deleted, or outside the filters of the reads so far). A read
looks up the rows it needs and reads only the fragments where one of them is not known —
under a write stream, the newest fragments.

Memory: 9 bytes a physical row a derivation, within ``budget_bytes`` (the store's
``MINING_SCORE_CACHE_BYTES``), the least recently used derivations given up first; one
whose values do not fit is not kept.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Hashable, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np

NOT_KNOWN, NO_VALUE, KNOWN = 0, 1, 2


@dataclass
class FragmentRowValues:
    """One fragment's values by physical row (offset in the fragment)."""

    state: np.ndarray  # (physical rows,) uint8: KNOWN, NO_VALUE or NOT_KNOWN
    values: np.ndarray  # (physical rows,) float64, meaningful where state is KNOWN

    BYTES_PER_ROW: ClassVar[int] = 9

    @classmethod
    def empty(cls, physical_rows: int) -> FragmentRowValues:
        return cls(np.zeros(physical_rows, np.uint8), np.zeros(physical_rows, np.float64))

    @property
    def nbytes(self) -> int:
        return self.state.nbytes + self.values.nbytes

    def set(self, offsets: np.ndarray, values: np.ndarray | None) -> None:
        """Record ``values`` for the rows at ``offsets`` (None: those rows have no value)."""
        if values is None:
            self.state[offsets] = NO_VALUE
        else:
            self.state[offsets] = KNOWN
            self.values[offsets] = values

    def copy(self) -> FragmentRowValues:
        return FragmentRowValues(self.state.copy(), self.values.copy())


class FragmentValues:
    """Per (collection, derivation), each fragment's :class:`FragmentRowValues` (see the
    module docstring). Thread-safe; one per :class:`indexing.store.Store`. What :meth:`take`
    hands out is shared, never changed: a reader fills in a copy
    (:meth:`FragmentRowValues.copy`) and hands it back with :meth:`keep`."""

    def __init__(self, budget_bytes: int) -> None:
        self.budget_bytes = int(budget_bytes)
        self._lock = threading.Lock()
        # (collection, derivation) -> {data key: values}, least recently used first
        self._held: OrderedDict[tuple[str, Hashable], dict[tuple[Any, ...], FragmentRowValues]] = OrderedDict()

    @property
    def nbytes(self) -> int:
        with self._lock:
            return sum(v.nbytes for held in self._held.values() for v in held.values())

    def forget(self, collection: str) -> None:
        """Drop what is kept for ``collection`` (dropped, or renamed)."""
        with self._lock:
            for key in [key for key in self._held if key[0] == collection]:
                del self._held[key]

    def take(self, collection: str, derivation: Hashable,
             keys: Sequence[tuple[Any, ...]]) -> dict[tuple[Any, ...], FragmentRowValues]:
        """The values kept for ``derivation`` under the fragments' ``keys``
        (:func:`indexing.live_rows.data_key`); those of fragments not among them (gone from the table) are
        dropped. The derivation becomes the most recently used."""
        entry = (collection, derivation)
        with self._lock:
            held = self._held.pop(entry, {})
            held = {k: held[k] for k in keys if k in held}
            self._held[entry] = held
            return dict(held)

    def keep(self, collection: str, derivation: Hashable,
             new: dict[tuple[Any, ...], FragmentRowValues]) -> None:
        """Keep ``new`` (fragments read or filled in) for ``derivation``, within the budget."""
        entry = (collection, derivation)
        with self._lock:
            held = self._held.setdefault(entry, {})
            held.update(new)
            self._held.move_to_end(entry)
            if sum(v.nbytes for v in held.values()) > self.budget_bytes:  # it alone does not fit
                del self._held[entry]
                return
            total = sum(v.nbytes for h in self._held.values() for v in h.values())
            while total > self.budget_bytes:
                key = next(iter(self._held))
                total -= sum(v.nbytes for v in self._held.pop(key).values())
