"""The live rows of a table that pass a filter, kept per fragment between exact searches.

An exact search (:mod:`indexing.flat_search`) scores the live rows that pass its filter.
Lance finds them with one scan of the table's row addresses, the filter evaluated and the
deletions applied, every time: 6 ms of CPU for 170k rows without a filter and 20 ms with
``split = 'pool'`` (13 fragments), against ~4 ms for scoring their 64-d vectors. Yet what
a fragment contributes is a function of its files alone, each written once and never
changed (an update writes a new deletion file, a compaction new fragments). So
:class:`LiveRows` keeps, per collection:

* each fragment's live offsets, keyed by its data files *and* deletion file
  (:func:`fragment_key`): an update that deletes a row there makes it read again;
* per filter, a mask over each fragment's physical rows keyed by its data files only
  (pass, fail, or not known: a row deleted when the mask was made), so that a fragment
  whose deletion file changed is not filtered again — its live rows are looked up in the
  mask.

Only the fragments not kept are scanned (one Lance scan for all of them): under a write
stream, the newest fragments and those an update deleted rows from. A filter is kept from
its second use (:meth:`LiveRows.serves`: a range drawn at random each time would cost a
scan of the live rows on top of Lance's), if its result depends on the rows alone
(:func:`cacheable`: no ``now()``, ``random()`` and the like), on a table without stable
row ids (a row's id is then its address). Memory: 4 bytes a row for the live offsets and 1
byte a row a filter, within an eighth of ``FLAT_CACHE_BYTES``, the least recently used
filters given up first; a filter whose masks do not fit is not kept.
"""

from __future__ import annotations

import re
import threading
from collections import OrderedDict
from collections.abc import Sequence
from typing import Any

import numpy as np

from indexing.filters import CODE, scan

# Functions whose value is not a function of the row: a filter using one is never kept.
_VOLATILE = re.compile(r"\b(now|current_date|current_time|current_timestamp|localtime|localtimestamp|"
                       r"random|uuid|today)\b", re.IGNORECASE)
MAX_CACHED_FILTER_CHARS = 4096  # longer ones (long id lists) are not kept as keys
# Filters seen once, remembered so that the second use is kept (a filter used once, such
# as a range drawn at random, costs a scan of the live rows on top of Lance's own).
SEEN_FILTERS = 1024
# The store's live rows get this fraction of its FLAT_CACHE_BYTES, on top of the vectors.
BUDGET_SHARE = 8


def cacheable(where: str | None) -> bool:
    """Whether the rows of a fragment that pass ``where`` depend on the fragment's files
    only: no volatile function in its code (string literals aside), and not so long a text
    that keeping it as a key costs more than the scan."""
    if where is None:
        return True
    if len(where) > MAX_CACHED_FILTER_CHARS:
        return False
    return not any(seg.kind == CODE and _VOLATILE.search(seg.text) for seg in scan(where))


def data_key(fragment: Any) -> tuple[Any, ...]:
    """What a fragment's rows are a function of: its id and its data files (each written
    once), not its deletion file."""
    return fragment.fragment_id, tuple(f.path for f in fragment.metadata.data_files())


def fragment_key(fragment: Any) -> tuple[Any, ...]:
    """What a fragment's live rows are a function of: its :func:`data_key` and its deletion
    file (written once too)."""
    deletion = fragment.metadata.deletion_file
    return (*data_key(fragment),
            None if deletion is None else (deletion.id, deletion.read_version, deletion.num_deleted_rows))


class LiveRows:
    """Per (collection, filter), each fragment's live rows that pass it (see the module
    docstring). Thread-safe; one per store, its flat search's
    (:class:`indexing.flat_search.FlatVectors`)."""

    def __init__(self, budget_bytes: int) -> None:
        self.budget_bytes = int(budget_bytes)
        self._lock = threading.Lock()
        # (collection, None) -> {fragment key: live offsets (uint32)}; (collection, filter) ->
        # {(fragment id, data files): mask (uint8)}; least recently used first
        self._filters: OrderedDict[tuple[str, str | None], dict[tuple[Any, ...], np.ndarray]] = OrderedDict()
        self._seen: OrderedDict[tuple[str, str], None] = OrderedDict()  # filters used once, last last

    @property
    def nbytes(self) -> int:
        with self._lock:
            return sum(a.nbytes for rows in self._filters.values() for a in rows.values())

    def serves(self, dataset: Any, collection: str, where: str | None) -> bool:
        """Whether :meth:`addresses` should answer this read: a table without stable row ids
        (a row's id is then its address), a :func:`cacheable` filter, and one used before
        (kept already, or seen among the last ``SEEN_FILTERS``): the first use of a filter
        goes to Lance alone."""
        if dataset.has_stable_row_ids or not cacheable(where):
            return False
        if where is None:
            return True
        entry = (collection, where)
        with self._lock:
            used_before = entry in self._filters or entry in self._seen
            self._seen[entry] = None
            self._seen.move_to_end(entry)
            while len(self._seen) > SEEN_FILTERS:
                self._seen.popitem(last=False)
            return used_before

    def holds(self, dataset: Any, collection: str, where: str) -> bool:
        """Whether ``where``'s rows of ``collection`` are kept already (a search or a mining
        run read them), so that :meth:`addresses` scans only the fragments written since:
        a cheap answer to "does any row pass?" (the first reading of a filter scans every
        fragment, where a scan for one match stops at the first)."""
        if dataset.has_stable_row_ids:
            return False
        with self._lock:
            return (collection, where) in self._filters

    def forget(self, collection: str) -> None:
        """Drop what is kept for ``collection`` (dropped, or renamed)."""
        with self._lock:
            for key in [key for key in self._filters if key[0] == collection]:
                del self._filters[key]
            for key in [key for key in self._seen if key[0] == collection]:
                del self._seen[key]

    def addresses(self, dataset: Any, collection: str, where: str | None,
                  fragments: Sequence[Any] | None = None) -> np.ndarray:
        """Row addresses (uint64) of the live rows of ``dataset`` (a Lance dataset at the
        version read) that pass ``where``, fragment by fragment in ``fragments``' order
        (default: the dataset's) and by offset within each — what a scan with the filter
        gives. For a read that :meth:`serves`."""
        fragments = dataset.get_fragments() if fragments is None else fragments
        keys = [fragment_key(f) for f in fragments]
        live = self._live(dataset, collection, fragments, keys)
        if where is not None:
            live = self._passing(dataset, collection, where, fragments, [key[:2] for key in keys], live)
        parts = [(np.uint64(f.fragment_id) << np.uint64(32)) | offsets.astype(np.uint64)
                 for f, offsets in zip(fragments, live, strict=True)]
        return np.concatenate(parts) if parts else np.zeros(0, np.uint64)

    def _live(self, dataset: Any, collection: str, fragments: Sequence[Any],
              keys: Sequence[tuple[Any, ...]]) -> list[np.ndarray]:
        """Each fragment's live offsets (uint32), kept by its :func:`fragment_key` (``keys``:
        the deletion file included); the fragments not kept scanned in one go."""
        held = self._take((collection, None), keys)
        missing = [(f, key) for f, key in zip(fragments, keys, strict=True) if key not in held]
        if missing:
            new = dict(zip((key for _, key in missing), _scan(dataset, None, [f for f, _ in missing]), strict=True))
            held.update(new)
            self._keep((collection, None), new)
        return [held[key] for key in keys]

    def _passing(self, dataset: Any, collection: str, where: str, fragments: Sequence[Any],
                 keys: Sequence[tuple[Any, ...]], live: list[np.ndarray]) -> list[np.ndarray]:
        """Of each fragment's ``live`` offsets, those that pass ``where``. Kept per filter and
        fragment data files (``keys``; not the deletion file, which every update of a row
        there replaces): a mask over the fragment's physical rows, 2 passes, 1 fails, 0 not
        known (deleted when it was made; a read of an older version may see such a row again,
        and then the fragment is scanned anew)."""
        masks = self._take((collection, where), keys)
        out: list[np.ndarray | None] = []
        for key, offsets in zip(keys, live, strict=True):
            mask = masks.get(key)
            marks = mask[offsets] if mask is not None else None
            out.append(offsets[marks == 2] if marks is not None and marks.all() else None)
        missing = [i for i, got in enumerate(out) if got is None]
        if missing:
            scanned = _scan(dataset, where, [fragments[i] for i in missing])
            new = {}
            for i, passing in zip(missing, scanned, strict=True):
                mask = np.zeros(fragments[i].physical_rows, np.uint8)
                mask[live[i]] = 1
                mask[passing] = 2
                new[keys[i]] = mask
                out[i] = passing
            self._keep((collection, where), new)
        return out  # type: ignore[return-value]

    def _take(self, entry: tuple[str, str | None], keys: Sequence[tuple[Any, ...]]) -> dict[tuple[Any, ...], np.ndarray]:
        """The arrays kept for ``entry`` under ``keys`` (the others, of fragments gone from
        the table, are dropped); the entry becomes the most recently used."""
        with self._lock:
            held = self._filters.pop(entry, {})
            held = {k: held[k] for k in keys if k in held}
            self._filters[entry] = held
            return dict(held)

    def _keep(self, entry: tuple[str, str | None], new: dict[tuple[Any, ...], np.ndarray]) -> None:
        with self._lock:
            held = self._filters.get(entry)
            if held is None:  # given up meanwhile
                return
            held.update(new)
            if sum(a.nbytes for a in held.values()) > self.budget_bytes:  # this filter alone does not fit
                del self._filters[entry]
                return
            total = sum(a.nbytes for rows in self._filters.values() for a in rows.values())
            while total > self.budget_bytes:
                key = next(iter(self._filters))
                if key == entry:
                    break
                total -= sum(a.nbytes for a in self._filters.pop(key).values())


def by_fragment(addresses: np.ndarray) -> tuple[np.ndarray | None, dict[int, tuple[int, int]]]:
    """A scan's row addresses grouped by fragment: the order that brings each fragment's rows
    together (None when they are already: a scan goes fragment by fragment), and each
    fragment id's span ``[lo, hi)`` of the addresses in that order."""
    if not addresses.size:
        return None, {}
    order = None
    fragment_of = addresses >> 32
    starts = np.flatnonzero(np.r_[True, fragment_of[1:] != fragment_of[:-1]])
    if len(set(fragment_of[starts].tolist())) < starts.size:  # a fragment in several runs
        order = np.argsort(fragment_of, kind="stable")
        fragment_of = fragment_of[order]
        starts = np.flatnonzero(np.r_[True, fragment_of[1:] != fragment_of[:-1]])
    ends = np.r_[starts[1:], addresses.size]
    return order, {int(fragment_of[lo]): (lo, hi) for lo, hi in zip(starts.tolist(), ends.tolist(), strict=True)}


def _scan(dataset: Any, where: str | None, fragments: Sequence[Any]) -> list[np.ndarray]:
    """One Lance scan of ``fragments``: the offsets (uint32) of each one's live rows that
    pass ``where``, in ``fragments``' order."""
    scanned = dataset.scanner(columns=[], filter=where, with_row_address=True,
                              fragments=list(fragments)).to_table().column("_rowaddr").to_numpy()
    order, spans = by_fragment(scanned)
    if order is not None:
        scanned = scanned[order]
    return [(scanned[slice(*spans.get(f.fragment_id, (0, 0)))] & 0xFFFFFFFF).astype(np.uint32) for f in fragments]
