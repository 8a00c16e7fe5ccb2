"""Bulk reindex: re-embed a collection's rows into a space with a (new) model.

``reindex(store, "photos", "clip", clip_model="ViT-B-32", clip_pretrained="laion2b")``
embeds every row's ``uri`` image (or ``text``) and writes the vectors in batches, each
batch one atomic ``merge_insert`` on ``id``. Two modes, chosen from the space's registry:

* **stage** — the space is new, or holds vectors of another model (or ``restart``): the
  vectors go to a staging column ``emb_<space>__next`` that no reader sees. When every
  selected row has its vector, the space's index is built on the staging column, and one
  commit renames ``emb_<space>`` to ``emb_<space>__prev`` and the staging column to
  ``emb_<space>``; the old column is then dropped. Until that commit the service serves the
  old space, complete and indexed; from it on, the new one, complete and indexed.
* **fill** — the space already holds this model's vectors: only the selected rows that
  lack one are embedded, in place (nobody is served a vector that is not there yet).

**Crash-safe and resumable.** Every write is an atomic commit, and what is left to do is
read from the table itself, never from a checkpoint file: a row needs work when its target
vector is null, or (stage mode) when the row was updated after the reindex began
(``updated_at`` — the reindex's own writes leave it alone, see
``Collection.update_columns``). The staging column's metadata records the model, the
source column, the filter and the start time, so a rerun with the same arguments carries on
where the killed one stopped; a rerun with other arguments is refused (``restart`` drops
the staging column and begins again). A crash after the swap but before the old column was
dropped is finished by the next run. Every row ends with exactly one vector of the new
model: the target is one fixed-size column keyed by ``id``.

**Rows written while it runs.** After the first pass, further passes pick up rows inserted
or updated meanwhile, until a pass finds none (at most ``MAX_PASSES``); a write landing
between the last pass and the swap is the only one that can miss the new space, and a
``fill`` rerun repairs it.

**Engines.** ``local`` embeds in this process, overlapping the writes of one batch with
the embedding of the next. ``ray`` reads the rows to do through ``lance_ray.read_lance``
(the same table URI, with the same filter), embeds them in a pool of Ray actors (each
loads the model once) and writes the vectors back from the driver in the same atomic
batches, so a Ray job is exactly as resumable as a local one and the service keeps
reading the table throughout. ``ray_address`` joins an existing cluster; without it a
local Ray is started (``ray.init``; ~10-15 s).

A ``where`` filter restricts the rows embedded. In stage mode, rows outside it have no
vector in the new space; in fill mode they keep theirs.
"""

from __future__ import annotations

import json
import logging
import queue
import re
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from typing import Any

import numpy as np
import pyarrow as pa

from indexing.embedders import ClipEmbedder, TextEmbedder, embedder_for_identity
from indexing.errors import FailedPrecondition, InvalidArgument
from indexing.schema import (
    EMB_PREFIX,
    PREV_SUFFIX,
    REINDEX_META_KEY,
    SPACE_META_KEY,
    STAGE_SUFFIX,
    IndexPolicy,
    SpaceSpec,
    check_identifier,
)
from indexing.settings import REINDEX_MAX_PASSES as MAX_PASSES
from indexing.store import Collection, Store, storage_options_from_env

log = logging.getLogger("assay.reindex")

__all__ = ["ENGINES", "MAX_PASSES", "ReindexReport", "embedder_identity", "reindex"]

ENGINES = ("local", "ray")
_SOURCES = ("text", "uri")


@dataclass
class ReindexReport:
    """What a reindex did. ``bad`` holds one dict per row that could not be embedded
    (``id``, ``reason``): such rows have no vector in the space and are retried by a rerun."""

    collection: str
    space: str
    model: str  # embedder identity, as recorded in the space registry
    source: str  # column embedded: "text" or "uri"
    mode: str  # "stage" or "fill"
    engine: str
    resumed: bool = False
    embedded: int = 0
    passes: int = 0
    bad: list[dict[str, Any]] = field(default_factory=list)
    swapped: bool = False
    index: str | None = None  # index kind built, if any
    version: int = 0
    seconds: float = 0.0  # reading, embedding and writing (model loading excluded)

    @property
    def rows_per_s(self) -> float:
        return self.embedded / self.seconds if self.seconds > 0 else 0.0

    def summary(self) -> str:
        what = "swapped in" if self.swapped else "filled in place"
        return (
            f"{self.embedded} rows embedded with {self.model} into space '{self.space}' of "
            f"'{self.collection}' ({self.mode} mode, {self.engine} engine, {self.passes} passes, "
            f"{self.seconds:.1f}s, {self.rows_per_s:.0f} rows/s); {len(self.bad)} bad; {what}"
            + (f"; {self.index} index built" if self.index else "")
            + ("; resumed an interrupted run" if self.resumed else "")
        )


def embedder_identity(model: str | None = None, clip_model: str | None = None,
                      clip_pretrained: str | None = None) -> str:
    """The identity string of the embedder the arguments name: ``model`` is a
    sentence-transformers name or path (default the packaged MiniLM) or a full identity
    (``open_clip:<model>:<pretrained>``); ``clip_model`` (+ ``clip_pretrained``) names an
    open_clip model."""
    if clip_model:
        if model:
            raise InvalidArgument("give either model or clip_model, not both", field="model")
        return ClipEmbedder(clip_model, clip_pretrained).identity
    if model and model.startswith(("open_clip:", "sentence-transformers:")):
        return model
    return TextEmbedder(model).identity


# ---------------------------------------------------------------------------- embedding


def _embed_batch(emb: TextEmbedder | ClipEmbedder, source: str, batch: pa.Table,
                 storage_options: dict[str, str] | None) -> pa.Table:
    """``id``, ``vector`` (null where it failed) and ``error`` for one batch of rows.
    Shared by the local engine and the Ray actors, so both embed identically."""
    ids = batch.column("id")
    values = batch.column(source).to_pylist()
    n = len(values)
    errors: list[str | None] = [None] * n
    vectors = np.zeros((n, emb.dim), dtype=np.float32)
    if source == "text":
        rows = [i for i, t in enumerate(values) if isinstance(t, str) and t.strip()]
        for i in set(range(n)) - set(rows):
            errors[i] = "missing text"
        if rows:
            vectors[rows] = emb.embed_texts([values[i] for i in rows]) if isinstance(emb, ClipEmbedder) \
                else emb.embed([values[i] for i in rows])
    else:
        assert isinstance(emb, ClipEmbedder)
        from indexing.images import open_images

        images = open_images(values, storage_options=storage_options)
        rows = [i for i, img in images if not isinstance(img, str)]
        for i, img in images:
            if isinstance(img, str):
                errors[i] = img
        if rows:
            vectors[rows] = emb.embed_images([images[i][1] for i in rows])
    ok = np.array([e is None for e in errors])
    flat = pa.array(vectors.reshape(-1), pa.float32())
    vec = pa.FixedSizeListArray.from_arrays(flat, emb.dim, mask=pa.array(~ok))
    return pa.table({"id": ids, "vector": vec, "error": pa.array(errors, pa.string())})


class _RayEmbedWorker:
    """A Ray actor: loads the embedder once, embeds batches (see ``_embed_batch``)."""

    def __init__(self, identity: str, source: str, storage_options: dict[str, str] | None) -> None:
        self.emb = embedder_for_identity(identity)
        self.emb.load()
        self.source = source
        self.storage_options = storage_options

    def __call__(self, batch: pa.Table) -> pa.Table:
        return _embed_batch(self.emb, self.source, batch, self.storage_options)


# ---------------------------------------------------------------------------- plan


@dataclass
class _Plan:
    col: Collection
    spec: SpaceSpec  # the space as it will be after the reindex
    target: str  # column written: staging (stage mode) or the space's own (fill mode)
    mode: str
    source: str
    where: str | None  # validated, as sent to Lance
    since_us: int | None  # stage mode: re-embed rows updated after this (epoch µs)
    resumed: bool
    old_index_kind: str | None  # the kind of the old space's index, if it had one


def _meta(plan_identity: str, source: str, where: str | None, started_us: int) -> dict[str, str]:
    return {"model": plan_identity, "source": source, "where": where or "", "started_us": str(started_us)}


def _plan(col: Collection, space: str, identity: str, dim: int, source: str, where: str | None,
          restart: bool) -> _Plan:
    live = EMB_PREFIX + space
    stage, prev = live + STAGE_SUFFIX, live + PREV_SUFFIX
    names = set(col.schema.names)
    if prev in names:  # a run was killed between the swap and the drop: finish it
        log.info("dropping %s left by an interrupted reindex", prev)
        col.drop_fields([prev])
        names.discard(prev)
    old = col.spaces.get(space)
    old_index = col.vector_index(space) if old is not None else None
    # "IvfHnswSq" -> "ivf_hnsw_sq": the new space gets the kind of index the old one had.
    old_kind = re.sub(r"(?<!^)([A-Z])", r"_\1", str(old_index.index_type)).lower() if old_index else None
    where_sql = col.validate_filter(where)

    if stage in names:
        meta_raw = (col.schema.field(stage).metadata or {}).get(REINDEX_META_KEY)
        meta = json.loads(meta_raw) if meta_raw else {}
        wanted = {"model": identity, "source": source, "where": where or ""}
        if restart or any(meta.get(k) != v for k, v in wanted.items()):
            if not restart:
                raise FailedPrecondition(
                    f"a reindex of space '{space}' of '{col.name}' is in progress with model "
                    f"{meta.get('model')!r}, source {meta.get('source')!r}, filter "
                    f"{meta.get('where') or None!r}: rerun it with the same arguments to resume it, "
                    "or restart it (--restart) to discard its progress"
                )
            col.drop_fields([stage])
        else:
            spec = SpaceSpec.from_json(col.schema.field(stage).metadata[SPACE_META_KEY])
            return _Plan(col, spec, stage, "stage", source, where_sql, int(meta["started_us"]),
                         True, old_kind)

    if old is not None and old.model == identity and old.dim == dim and not restart:
        return _Plan(col, old, live, "fill", source, where_sql, None, False, old_kind)

    # A new space, or a new model for it: keep the metric and index policy, not a
    # search-time tuning measured on the old model's vectors.
    if old is not None:
        policy = replace(old.index, nprobes=IndexPolicy().nprobes)
        spec = SpaceSpec(name=space, dim=dim, metric=old.metric, model=identity,
                         normalized=old.normalized, index=policy)
    else:
        spec = SpaceSpec(name=space, dim=dim, metric="cosine", model=identity)
    started_us = int(datetime.now(UTC).timestamp() * 1e6)
    field_ = pa.field(stage, spec.arrow_type(), metadata={
        SPACE_META_KEY: spec.to_json(),
        REINDEX_META_KEY: json.dumps(_meta(identity, source, where, started_us)),
    })
    col.add_fields([field_])
    return _Plan(col, spec, stage, "stage", source, where_sql, started_us, False, old_kind)


def _pass_filter(plan: _Plan, since_us: int | None) -> str:
    todo = f"{plan.target} IS NULL"
    if since_us is not None:
        todo = f"({todo} OR updated_at > to_timestamp_micros({since_us}))"
    parts = [todo, f"{plan.source} IS NOT NULL"]
    if plan.where:
        parts.append(plan.where)
    return " AND ".join(parts)


# ---------------------------------------------------------------------------- engines


def _local_results(col: Collection, pass_filter: str, source: str, emb: TextEmbedder | ClipEmbedder,
                   batch_rows: int, storage_options: dict[str, str] | None) -> Iterator[pa.Table]:
    for batch in col.scan(pass_filter, ["id", source], batch_size=batch_rows):
        if batch.num_rows:
            yield _embed_batch(emb, source, pa.Table.from_batches([batch]), storage_options)


def _ray_results(col: Collection, pass_filter: str, source: str, identity: str, batch_rows: int,
                 storage_options: dict[str, str] | None, ray_address: str | None,
                 workers: int | None) -> Iterator[pa.Table]:
    import lance_ray
    import ray

    if not ray.is_initialized():
        ray.init(address=ray_address, include_dashboard=False, log_to_driver=False,
                 configure_logging=False)
    cpus = int(ray.cluster_resources().get("CPU", 1))
    # One CPU is left to the read tasks: with every CPU held by an actor the reader
    # starves and the pipeline stalls.
    size = workers or max(1, cpus - 1)
    ds = lance_ray.read_lance(col.table.uri, columns=["id", source], filter=pass_filter,
                              storage_options=col.store.storage_options or None)
    out = ds.map_batches(
        _RayEmbedWorker, fn_constructor_kwargs={"identity": identity, "source": source,
                                                "storage_options": storage_options},
        batch_size=batch_rows, batch_format="pyarrow", compute=ray.data.ActorPoolStrategy(size=size),
        num_cpus=1,
    )
    for batch in out.iter_batches(batch_size=None, batch_format="pyarrow"):
        if batch.num_rows:
            yield batch


class _Writer:
    """Writes result batches in a background thread, so that the commit of one batch
    overlaps the embedding of the next; at most ``depth`` batches wait."""

    def __init__(self, col: Collection, column: str, depth: int = 2) -> None:
        self.col, self.column = col, column
        self.queue: queue.Queue[pa.Table | None] = queue.Queue(maxsize=depth)
        self.error: BaseException | None = None
        self.written = 0
        self.thread = threading.Thread(target=self._run, name="assay-reindex-writer", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while (table := self.queue.get()) is not None:
            if self.error is not None:
                continue  # drain
            try:
                self.col.update_columns(table)
                self.written += table.num_rows
            except BaseException as exc:  # surfaced by put() / close()
                self.error = exc

    def put(self, table: pa.Table) -> None:
        if self.error is not None:
            raise self.error
        self.queue.put(table)

    def close(self) -> None:
        self.queue.put(None)
        self.thread.join()
        if self.error is not None:
            raise self.error


# ---------------------------------------------------------------------------- the job


def reindex(
    store: Store,
    collection: str,
    space: str,
    *,
    model: str | None = None,
    clip_model: str | None = None,
    clip_pretrained: str | None = None,
    source: str | None = None,
    where: str | None = None,
    batch_rows: int = 256,
    engine: str = "local",
    ray_address: str | None = None,
    ray_workers: int | None = None,
    restart: bool = False,
    build_index: bool = True,
    progress: bool = True,
    check: Callable[[], None] | None = None,
    on_progress: Callable[[int, int], None] | None = None,
) -> ReindexReport:
    """Re-embed ``collection``'s rows (all, or those matching ``where``) into ``space``
    with the embedder the arguments name (see :func:`embedder_identity`), from the
    ``source`` column (``uri`` images for CLIP by default, else ``text``). See the module
    docstring for the modes, crash safety and engines.

    ``check`` is called between batches and may raise to stop the job (it resumes from
    there); ``on_progress(done, total)`` reports rows written. Raises before writing
    anything when an argument, the filter or the model is unusable.
    """
    check_identifier(space, "space name")
    if "__" in space:
        raise InvalidArgument(f"space name {space!r} is invalid: '__' is reserved for assay's own columns")
    if engine not in ENGINES:
        raise InvalidArgument(f"engine must be one of {', '.join(ENGINES)}, got {engine!r}", field="engine")
    if not 1 <= batch_rows <= 100_000:
        raise InvalidArgument(f"batch_rows must be in [1, 100000], got {batch_rows}", field="batch_rows")
    if ray_workers is not None and ray_workers < 1:
        raise InvalidArgument(f"ray_workers must be >= 1, got {ray_workers}", field="ray_workers")
    col = store.collection(collection)  # NOT_FOUND first: cheaper than loading a model
    identity = embedder_identity(model, clip_model, clip_pretrained)
    emb = embedder_for_identity(identity)
    is_clip = isinstance(emb, ClipEmbedder)
    source = source or ("uri" if is_clip else "text")
    if source not in _SOURCES:
        raise InvalidArgument(f"source must be one of {', '.join(_SOURCES)}, got {source!r}", field="source")
    if source == "uri" and not is_clip:
        raise InvalidArgument(f"{identity} embeds text; images (source 'uri') need an open_clip model",
                              field="source")
    if source not in col.schema.names:
        raise FailedPrecondition(f"collection '{collection}' has no '{source}' column to embed")
    emb.load()  # a model that cannot be loaded fails the job before anything is written

    plan = _plan(col, space, identity, emb.dim, source, where, restart)
    report = ReindexReport(collection=collection, space=space, model=identity, source=source,
                           mode=plan.mode, engine=engine, resumed=plan.resumed)
    image_options = (col.store.storage_options or None) if source == "uri" else None
    if image_options is None and source == "uri":
        image_options = storage_options_from_env("s3://")
    bad: dict[str, str] = {}

    from tqdm.auto import tqdm

    t0 = time.perf_counter()
    since = plan.since_us if plan.resumed else None
    total = col.count(_pass_filter(plan, since))
    bar = tqdm(total=total, unit="rows", desc=f"reindex {collection}.{space}", disable=not progress,
               dynamic_ncols=True, smoothing=0.1)
    try:
        for _ in range(MAX_PASSES):
            pass_started = int(datetime.now(UTC).timestamp() * 1e6)
            pass_filter = _pass_filter(plan, since)
            todo = total if not report.passes else col.count(pass_filter)
            if todo == 0:
                break  # nothing to do: start no pipeline (a Ray actor pool loads the model)
            if report.passes:
                bar.total = (bar.total or 0) + todo
            report.passes += 1
            if engine == "ray":
                results = _ray_results(col, pass_filter, source, identity, batch_rows, image_options,
                                       ray_address, ray_workers)
            else:
                results = _local_results(col, pass_filter, source, emb, batch_rows, image_options)
            embedded = _write_pass(col, plan.target, results, bad, bar, check, on_progress, report)
            if embedded == 0:
                break
            if plan.mode == "fill":
                since = None  # in place: only rows still lacking a vector
            elif since is None or since < pass_started:
                since = pass_started
    finally:
        bar.close()
    report.seconds = time.perf_counter() - t0
    report.bad = [{"id": i, "reason": r} for i, r in bad.items()]

    if plan.mode == "stage":
        if check is not None:
            check()
        report.index = _index_staged(col, plan, build_index)
        live = EMB_PREFIX + space
        renames = {plan.target: live}
        if live in col.schema.names:
            renames = {live: live + PREV_SUFFIX, plan.target: live}
        col.rename_fields(renames)  # the switch: one commit
        report.swapped = True
        if len(renames) == 2:
            col.drop_fields([live + PREV_SUFFIX])
        if report.index:
            col.tune_index(space)  # the new vectors' index: nprobes to the target recall
    elif build_index and plan.old_index_kind and report.embedded:
        col.optimize(cleanup=False)  # brings the existing index up to date with new rows
    report.version = col.version
    log.info("reindex: %s", report.summary())
    return report


def _write_pass(col: Collection, target: str, results: Iterator[pa.Table], bad: dict[str, str],
                bar: Any, check: Callable[[], None] | None,
                on_progress: Callable[[int, int], None] | None, report: ReindexReport) -> int:
    writer = _Writer(col, target)
    embedded = 0
    try:
        for table in results:
            if check is not None:
                check()
            errors = table.column("error")
            ok = errors.is_null()
            for i, reason in zip(table.column("id").to_pylist(), errors.to_pylist(), strict=True):
                if reason is not None:
                    bad[i] = reason
            good = table.filter(ok)
            if good.num_rows:
                writer.put(pa.table({"id": good.column("id"), target: good.column("vector")}))
                embedded += good.num_rows
            bar.update(table.num_rows)
            if on_progress is not None:
                on_progress(report.embedded + embedded, int(bar.total or 0))
    finally:
        if hasattr(results, "close"):
            results.close()
        writer.close()
    report.embedded += embedded
    return embedded


def _index_staged(col: Collection, plan: _Plan, build_index: bool) -> str | None:
    """Build the new space's index on the staging column when the old space had one or
    its policy asks for one at this size; None when no index is built."""
    if not build_index:
        return None
    rows = col.table.count_rows(f"{plan.target} IS NOT NULL")
    wanted = plan.old_index_kind is not None or plan.spec.index.wants_index(rows, plan.spec.dim)
    if not wanted or rows < 256:
        return None
    return col.build_vector_index(plan.spec, column=plan.target, kind=plan.old_index_kind)
