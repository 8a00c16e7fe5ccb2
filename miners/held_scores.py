"""A streamed run's scores from those kept per fragment (:mod:`indexing.fragment_values`).

A scored miner whose inputs are all row-local (:data:`ROW_LOCAL_INPUTS`: what a row's
inputs decode to depends on that row's stored values, the model and the run's parameters
alone) gives each row a score that is a function of the row. Such a run
(:func:`miners.runner.run_mining`, a miner without a batch ``select`` or class balance)
then reads:

* the pool's live rows from the store's :class:`indexing.live_rows.LiveRows` (kept per
  fragment and filter, as for exact search);
* each fragment's scores from the store's :class:`indexing.fragment_values.FragmentValues`
  under the run's *derivation* (miner, model and its classes, space, parameters but those
  applied after scoring), reading and scoring only the fragments where a pool row's score
  is not known — one Lance scan, with the run's filter, so exactly the rows the run scores
  are decoded, as in a scan of the whole pool.

The answer is the same rows and scores as the scan of the whole pool: the same decoders and
score function on the same rows (row keys are row addresses, which are the row ids of a
table without stable row ids). A run that does not qualify, a volatile filter, a filter's
first use, a table with stable row ids, parameters that are not plain values, or a table
whose scores would not fit ``MINING_SCORE_CACHE_BYTES`` (0 switches keeping them off)
read the whole pool as before (:func:`held_scores` returns None): its chunks are scored in
parallel threads, where the fragments not kept are scored here in one thread, once.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from indexing.errors import InvalidArgument
from indexing.fragment_values import KNOWN, NOT_KNOWN, FragmentRowValues
from indexing.live_rows import by_fragment, data_key
from miners.inputs import Bound, RunContext, decode_chunk, projection
from miners.registry import MinerSpec

# Inputs whose decoded value for a row depends on that row (its stored values), the model and
# the run's parameters only: not on the seed or the row id (row_uniforms), nor on the other
# rows of a chunk (samples and epoch_logits need one K / E across a chunk; boxes name rows).
ROW_LOCAL_INPUTS = frozenset({"probs", "logits", "loss", "segmentation", "vectors"})
# Parameters applied to the scores after scoring: not part of a score's derivation.
AFTER_SCORE_PARAMS = frozenset({"stochastic", "temperature", "balance"})


@dataclass
class HeldScores:
    """The run's pool rows (those that pass its filter) and, per fragment, those with the
    miner's inputs and their scores (:meth:`parts`)."""

    _fragments: list[tuple[int, np.ndarray, FragmentRowValues]]  # (fragment id, offsets, values)

    @property
    def rows(self) -> int:
        """How many rows pass the run's filter."""
        return sum(len(offsets) for _, offsets, _ in self._fragments)

    def parts(self) -> Iterator[tuple[int, np.ndarray, np.ndarray]]:
        """Per fragment: (pool rows, row keys of those scored (uint64), their scores)."""
        for fid, offsets, values in self._fragments:
            scored = offsets[values.state[offsets] == KNOWN]
            yield len(offsets), (np.uint64(fid) << np.uint64(32)) | scored.astype(np.uint64), values.values[scored]


def derivation(ctx: RunContext, spec: MinerSpec, bound: Sequence[Bound]) -> tuple[Any, ...] | None:
    """What a row's score depends on besides the row, as a key; None when the scores are not
    a function of each row (an input not in :data:`ROW_LOCAL_INPUTS`) or a parameter is not
    a plain value."""
    if any(b.input.name not in ROW_LOCAL_INPUTS for b in bound):
        return None
    try:
        params = json.dumps({k: v for k, v in ctx.params.items() if k not in AFTER_SCORE_PARAMS},
                            sort_keys=True, allow_nan=True)
    except (TypeError, ValueError):
        return None
    return (spec.name, ctx.model, repr(ctx.model_spec) if ctx.model else None, ctx.space,
            ctx.dim if ctx.space else None, params, tuple(sorted(projection(bound).items())))


def held_scores(ctx: RunContext, spec: MinerSpec, bound: Sequence[Bound], where: str | None,
                chunk_rows: int) -> HeldScores | None:
    """The run's scores through the kept ones (see the module docstring), or None when the
    run must read the whole pool."""
    col, rec = ctx.col, ctx.run
    key = derivation(ctx, spec, bound)
    if key is None or col.store.fragment_values.budget_bytes <= 0:  # 0: scores are not kept
        return None
    dataset = col.read_dataset(rec.version)
    live_rows = col.store.flat_vectors.live_rows
    if not live_rows.serves(dataset, col.name, where):
        return None
    fragments = dataset.get_fragments()
    needed = FragmentRowValues.BYTES_PER_ROW * sum(f.physical_rows for f in fragments)
    if needed > col.store.fragment_values.budget_bytes:
        # not kept: each run would score every row here, in one thread, after the live rows' scans
        return None
    addresses = live_rows.addresses(dataset, col.name, where, fragments)  # fragment by fragment
    _, spans = by_fragment(addresses)
    keys = [data_key(f) for f in fragments]
    kept = col.store.fragment_values.take(col.name, key, keys)
    out: list[tuple[int, np.ndarray, FragmentRowValues]] = []
    unread: dict[int, FragmentRowValues] = {}  # by fragment id: to fill in from a scan
    unread_keys: dict[tuple[Any, ...], FragmentRowValues] = {}  # the same, by data key
    for fragment, fkey in zip(fragments, keys, strict=True):
        lo, hi = spans.get(fragment.fragment_id, (0, 0))
        if lo == hi:
            continue
        offsets = (addresses[lo:hi] & 0xFFFFFFFF).astype(np.intp)
        values = kept.get(fkey)
        if values is None or (values.state[offsets] == NOT_KNOWN).any():
            values = values.copy() if values is not None else FragmentRowValues.empty(fragment.physical_rows)
            unread[fragment.fragment_id] = unread_keys[fkey] = values
        out.append((fragment.fragment_id, offsets, values))
    if unread:
        _score(ctx, spec, bound, dataset, where, [f for f in fragments if f.fragment_id in unread], unread,
               chunk_rows)
        col.store.fragment_values.keep(col.name, key, unread_keys)
    return HeldScores(out)


def _score(ctx: RunContext, spec: MinerSpec, bound: Sequence[Bound], dataset: Any, where: str | None,
           fragments: Sequence[Any], values: dict[int, FragmentRowValues], chunk_rows: int) -> None:
    """Read and score the rows of ``fragments`` that pass ``where`` (one Lance scan), into
    ``values`` (by fragment id)."""
    scanner = dataset.scanner(columns=projection(bound), filter=where, with_row_address=True,
                              fragments=list(fragments), batch_size=chunk_rows)
    physical = sum(f.physical_rows for f in fragments)
    read = 0
    for batch in scanner.to_batches():
        ctx.check()
        read += batch.num_rows
        ctx.progress(0.9 * min(1.0, read / max(1, physical)),
                     f"scored {read:,} rows of {len(fragments):,} fragments not kept")
        addresses = np.asarray(batch.column("_rowaddr").to_numpy(zero_copy_only=False), dtype=np.uint64)
        try:
            keep, arrays = decode_chunk(bound, batch, addresses)
            scores = np.asarray(spec.score(arrays, ctx.params), dtype=np.float64) if len(keep) else np.zeros(0)
        except ValueError as exc:
            raise InvalidArgument(f"miner '{spec.name}': {exc}") from exc
        score_of = np.full(len(addresses), np.nan)
        has = np.zeros(len(addresses), bool)
        score_of[keep], has[keep] = scores, True
        order, spans = by_fragment(addresses)
        if order is not None:
            addresses, score_of, has = addresses[order], score_of[order], has[order]
        for fid, (lo, hi) in spans.items():
            offsets = (addresses[lo:hi] & 0xFFFFFFFF).astype(np.intp)
            values[fid].set(offsets[~has[lo:hi]], None)
            values[fid].set(offsets[has[lo:hi]], score_of[lo:hi][has[lo:hi]])
