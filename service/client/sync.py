"""The blocking client's public surface: :class:`Client`, :class:`Collection`,
:class:`Dataset`, :class:`Job`, :class:`MiningJob`.

Each method builds its call with :mod:`service.client.rpc` and makes it through the
transport (``_unary``/``_stream``, :mod:`service.client.transport`). This file is also the
source of the asyncio client: ``python -m service.client.generate`` rewrites
:mod:`service.client.async_client` from it (every call awaited, streams iterated with
``async for``); the few asyncio methods that differ are written by hand in
:mod:`service.client.aio`. Change a method here, then run ``make client``.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterable, Iterator, Mapping
from typing import TYPE_CHECKING, Any

import pyarrow as pa

from indexing.settings import DEFAULT_THUMB_SIZE, GRID_LIMIT
from protos.assay.v1 import mining_pb2
from service.client.convert import (
    concat_pages,
    is_dataframe,
    is_rows,
    items_to_arrow,
    message_to_dict,
    sorted_by_id,
)
from service.client.errors import DeadlineExceededError, UnavailableError, invalid
from service.client.files import ExportFile, ScorerFile
from service.client.jobs import JobView, Waiter
from service.client.labeling import LabelImport, chunks, read_labels
from service.client.rpc import (
    BOX_EXPORTS,
    Page,
    export_format,
    is_object_space,
    objects_filter,
    rpc_add_model,
    rpc_add_space,
    rpc_aggregate,
    rpc_build_index,
    rpc_calibrate,
    rpc_checkout,
    rpc_commit,
    rpc_count,
    rpc_create_collection,
    rpc_create_dataset,
    rpc_dataset,
    rpc_delete,
    rpc_delete_dataset,
    rpc_describe,
    rpc_diff,
    rpc_drop,
    rpc_export,
    rpc_export_scorer,
    rpc_health,
    rpc_job,
    rpc_list_collections,
    rpc_list_datasets,
    rpc_list_jobs,
    rpc_list_miners,
    rpc_list_runs,
    rpc_members,
    rpc_optimize,
    rpc_page,
    rpc_recall_check,
    rpc_reindex,
    rpc_rerun,
    rpc_run,
    rpc_run_results,
    rpc_scan,
    rpc_search,
    rpc_start_job,
    rpc_start_mining,
    rpc_tag_items,
    rpc_tag_version,
    rpc_take,
    run_to_dict,
    scorer_format,
    scorer_spec,
)
from service.client.transport import DEFAULT, SyncTransport, Timeout
from service.client.upsert import UpsertSummary

if TYPE_CHECKING:
    from service.notebook import Grid

__all__ = ["Client", "Collection", "Dataset", "Job", "MiningJob"]


class Job(JobView):
    """A server-side job (optimize, build_index, recall_check ...). Its attributes are the
    last record fetched: ``refresh()``, ``cancel()``, ``watch()`` and ``wait()`` update them."""

    def refresh(self, *, timeout: Timeout = DEFAULT) -> Job:
        self.proto = self._client._unary(rpc_job("GetJob", self.id), timeout)
        return self

    def cancel(self, *, timeout: Timeout = DEFAULT) -> Job:
        """Ask the job to stop; it ends CANCELLED at its next checkpoint."""
        self.proto = self._client._unary(rpc_job("CancelJob", self.id), timeout)
        return self

    def watch(self, *, timeout: float | None = None) -> Iterator[Job]:
        """The job now and at every change until it ends (a new snapshot each time)."""
        for proto in self._client._stream(rpc_job("WatchJob", self.id), timeout):
            self.proto = proto
            yield Job(self._client, proto)

    def wait(self, timeout: float | None = None, progress: bool = False) -> Job:
        """Block until the job ends and return it if SUCCEEDED; else raise AssayClientError
        (the subclass of the job's error_code; ``err.details["job"]`` is the job).
        DeadlineExceededError after ``timeout`` s (the job keeps running). ``progress``: show
        a bar (tqdm if installed, else a line on stderr)."""
        with Waiter(self, timeout, progress) as waiter:
            while not self.done:
                try:
                    for snapshot in self.watch(timeout=waiter.remaining()):
                        if waiter.seen(snapshot):
                            break
                    else:  # the stream ended early: read the record
                        self.refresh()
                except (DeadlineExceededError, UnavailableError) as exc:
                    time.sleep(waiter.after(exc))
        self._check_ended()
        return self


class MiningJob(Job):
    """A mining run's job: a :class:`Job` (wait, watch, cancel) plus the run's ``run_id``,
    ``run()`` (its record: miner, parameters, version read, row counts, timings, and
    ``graph``: the k-NN graphs it used by role — method, k, recall@k on a sample) and
    ``results(columns)`` (``id, rank, score`` + collection columns, as a pyarrow Table)."""

    def __init__(self, client: Any, run: mining_pb2.MiningRun) -> None:
        super().__init__(client, run.job)
        self.run_id = run.run_id
        self.run_collection = run.collection or run.job.collection

    def run(self, *, timeout: Timeout = DEFAULT) -> dict[str, Any]:
        return run_to_dict(self._client._unary(rpc_run("GetRun", self.run_id), timeout))

    def result_pages(self, columns: Iterable[str] | None = None, page_rows: int = 8192, *,
                     timeout: float | None = None) -> Iterator[pa.Table]:
        """:meth:`results` page by page, as the server streams them (stop early: the rest
        is not sent)."""
        return self._client._stream(rpc_run_results(self.run_id, columns, page_rows), timeout)

    def results(self, columns: Iterable[str] | None = None, page_rows: int = 8192, *,
                timeout: float | None = None) -> pa.Table:
        """The selected rows by rank (FailedPreconditionError until the run SUCCEEDED)."""
        return concat_pages(list(self.result_pages(columns, page_rows, timeout=timeout)))

    def rerun(self, *, timeout: Timeout = DEFAULT) -> MiningJob:
        """A new run with this run's miner, parameters, filters and seed, on the collection
        version this run read: its results are the same."""
        return MiningJob(self._client, self._client._unary(rpc_rerun(self.run()), timeout))

    def tag(self, add: str | Iterable[str] = ("to-label",), remove: str | Iterable[str] = (), *,
            timeout: Timeout = DEFAULT) -> int:
        """Tag the rows this run selected (default ``to-label``); returns the rows changed."""
        rpc = rpc_tag_items(self.run_collection, None, None, self.run_id, add, remove)
        return self._client._unary(rpc, timeout)

    def show(self, limit: int = GRID_LIMIT, *, size: int = DEFAULT_THUMB_SIZE,
             web_url: str | None = None, timeout: float | None = None) -> Grid:
        """The run's first ``limit`` picks as a grid of cards (rank, score, label, top
        prediction, thumbnail or text) that Jupyter renders; waits up to ``timeout`` s for
        a run still in progress. Thumbnails (``size`` px: 64, 96, 128, 160, 256 or 384) come
        from the server's web port (``web_url``, default the client's) or, without one,
        from local image files. ``job.show().save("picks.html")`` writes a standalone page.
        See :mod:`service.notebook`."""
        from service.client.show import run_grid

        return run_grid(self._client, self, limit, size=size, web_url=web_url, timeout=timeout)


class Client(SyncTransport):
    """Blocking client; thread-safe (one channel, shared by all threads).

    target: "host:port". token: sent as ``authorization: Bearer <token>`` on every call.
    tls: use TLS, with ``root_certificates`` (PEM bytes, PEM text or a file path; None = the
    system roots) and ``server_name_override`` (the name in the server's certificate);
    ``client_cert``/``client_key`` (PEM) for a server that requires mutual TLS.
    timeout: default deadline of unary calls in seconds (None = none). retries: UNAVAILABLE
    retries. max_message_bytes: the largest message sent or received (the server's limits
    should be as large). options: extra gRPC channel arguments. web_url: the server's web
    port (``http://host:port/``), where :meth:`show` gets thumbnails by default.
    keepalive_s / keepalive_timeout_s: ping the server after this many seconds of silence
    while calls are in flight (a long ``job.wait()``, a quiet stream), and give up on the
    connection when no answer comes in time; the server must allow pings that often (an
    assay server allows one every 10 s, ``min_ping_interval_s``).
    """

    _job_type = Job

    def health(self, service: str = "", *, timeout: Timeout = DEFAULT) -> str:
        """grpc.health.v1 status: "SERVING", "NOT_SERVING", ... (service "" = the server)."""
        return self._unary(rpc_health(service), timeout)

    def list_collections(self, *, timeout: Timeout = DEFAULT) -> list[str]:
        return self._unary(rpc_list_collections(), timeout)

    def create_collection(
        self,
        name: str,
        spaces: Mapping[str, int | Mapping[str, Any]] | None = None,
        models: Mapping[str, list[str] | Mapping[str, Any]] | None = None,
        fields: Mapping[str, str] | None = None,
        if_not_exists: bool = False,
        *,
        timeout: Timeout = DEFAULT,
    ) -> Collection:
        """Create a collection: ``spaces`` name -> dim or {dim, metric, model, normalized,
        index}; ``models`` name -> class names or {classes, task}; ``fields`` name -> Arrow
        type name. AlreadyExistsError unless ``if_not_exists``."""
        rpc = rpc_create_collection(name, spaces, models, fields, if_not_exists)
        self._unary(rpc, timeout)
        return self.collection(name)

    def collection(self, name: str) -> Collection:
        """A handle on a collection (no call is made)."""
        return Collection(self, name)

    def drop_collection(self, name: str, *, timeout: Timeout = DEFAULT) -> None:
        self._unary(rpc_drop(name), timeout)

    def start_job(self, kind: str, collection: str, params: Mapping[str, Any] | None = None, *,
                  timeout: Timeout = DEFAULT) -> Job:
        """Start a job ("optimize", "build_index", "recall_check" ...); None params are left out."""
        return self._unary(rpc_start_job(kind, collection, params), timeout)

    def job(self, job_id: str, *, timeout: Timeout = DEFAULT) -> Job:
        return self._unary(rpc_job("GetJob", job_id, wrap=True), timeout)

    def list_jobs(self, collection: str | None = None, states: Iterable[str | int] | None = None,
                  limit: int = 100, *, timeout: Timeout = DEFAULT) -> list[Job]:
        """Most recent first; ``states`` as names ("RUNNING") or JobState numbers."""
        return self._unary(rpc_list_jobs(collection, states, limit), timeout)

    def miners(self, *, timeout: Timeout = DEFAULT) -> list[dict[str, Any]]:
        """The server's miners: name, family, description, inputs, params."""
        return self._unary(rpc_list_miners(), timeout)

    def mining_job(self, run_id: str, *, timeout: Timeout = DEFAULT) -> MiningJob:
        """The job of an earlier run (e.g. to read its results again)."""
        return MiningJob(self, self._unary(rpc_run("GetRun", run_id), timeout))

    def runs(self, collection: str | None = None, limit: int = 100, *,
             timeout: Timeout = DEFAULT) -> list[dict[str, Any]]:
        """Mining run records, most recent first."""
        return self._unary(rpc_list_runs(collection, limit), timeout)

    def create_dataset(self, name: str, collection: str, description: str = "", *,
                       timeout: Timeout = DEFAULT) -> Dataset:
        """Create an empty versioned dataset of ``collection`` (AlreadyExistsError if taken)."""
        self._unary(rpc_create_dataset(name, collection, description), timeout)
        return self.dataset(name)

    def dataset(self, name: str) -> Dataset:
        """A handle on a dataset (no call is made)."""
        return Dataset(self, name)

    def datasets(self, collection: str | None = None, *,
                 timeout: Timeout = DEFAULT) -> list[dict[str, Any]]:
        """The datasets (of ``collection`` if given), by name, as dicts (see Dataset.info)."""
        return self._unary(rpc_list_datasets(collection), timeout)

    def show(self, obj: MiningJob | str | pa.Table | Any, *, collection: str | None = None,
             limit: int = GRID_LIMIT, size: int = DEFAULT_THUMB_SIZE, web_url: str | None = None,
             timeout: float | None = None) -> Grid:
        """A grid of items that Jupyter renders: a mining run's picks (a MiningJob or a run
        id; see :meth:`MiningJob.show`) or the first ``limit`` rows of a result table with an
        ``id`` column (search, query, take; give ``collection=``). ``.html``, ``.items`` and
        ``.save(path)`` work outside Jupyter too.

            client = Client("127.0.0.1:50051", web_url="http://127.0.0.1:8080/")
            client.show(col.search("clip", v, k=24), collection=col.name)
        """
        from service.client.show import run_grid, table_grid

        if isinstance(obj, MiningJob | str):
            job = obj if isinstance(obj, MiningJob) else self.mining_job(obj)
            return run_grid(self, job, limit, size=size, web_url=web_url, timeout=timeout)
        if collection is None:
            raise invalid("showing a table needs collection=<the collection its rows come from>")
        return table_grid(self, obj, collection, limit, size=size, web_url=web_url)


class Collection:
    """A collection on the server, used through its :class:`Client`."""

    def __init__(self, client: Client, name: str) -> None:
        self.client = client
        self.name = name

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r})"

    def describe(self, *, timeout: Timeout = DEFAULT) -> dict[str, Any]:
        """CollectionInfo as a dict: name, uri, rows, version, spaces, models, fields,
        indices, tags."""
        return self.client._unary(rpc_describe(self.name), timeout)

    def add_space(self, name: str, dim: int, metric: str = "cosine", model: str | None = None,
                  normalized: bool | None = None, index: Mapping[str, Any] | None = None, *,
                  timeout: Timeout = DEFAULT) -> dict[str, Any]:
        """Register an embedding space (column ``emb_<name>``); returns describe()."""
        rpc = rpc_add_space(self.name, name, dim, metric, model, normalized, index)
        return self.client._unary(rpc, timeout)

    def add_model(self, name: str, classes: Iterable[str], task: str = "classification", *,
                  top_q: float | None = None, uncertain_threshold: float | None = None,
                  map_size: int | None = None, box_embedding_dim: int = 0,
                  timeout: Timeout = DEFAULT) -> dict[str, Any]:
        """Register a model (column ``pred_<name>``); returns describe(). ``task``:
        "classification", "detection" or "segmentation"; a segmentation model's settings
        (``top_q``, ``uncertain_threshold``, ``map_size``) default to 0.05, 0.5, 16. A
        detection model with ``box_embedding_dim`` > 0 stores a per-box ``embedding`` of that
        length."""
        return self.client._unary(rpc_add_model(self.name, name, classes, task, top_q=top_q,
                                                uncertain_threshold=uncertain_threshold, map_size=map_size,
                                                box_embedding_dim=box_embedding_dim),
                                  timeout)

    def upsert(self, data: Any, batch_rows: int = 10_000, progress: bool = False, *,
               timeout: float | None = None) -> UpsertSummary:
        """Insert or update rows by ``id``, streamed in batches of at most ``batch_rows`` rows
        (and under max_message_bytes). ``data``: Arrow Table/RecordBatch, DataFrame, dict of
        columns, list of row dicts, or an iterable of those (converted chunk by chunk).
        A batch the server rejects raises InvalidArgumentError; the batches before it are
        committed (``err.details["committed"]``). Rows without an ``id`` get one from the
        server: the summary's ``assigned_ids`` lists them in the input's row order
        (``assigned_rows``: their positions), so ``col.upsert(rows).assigned_ids`` are the
        ids of rows sent without any."""
        return self.client._upsert(self.name, data, batch_rows, progress, timeout)

    def search(
        self,
        space: str,
        vector: Any = None,
        *,
        ids: str | Iterable[str] | None = None,
        text: str | None = None,
        texts: Iterable[str] | None = None,
        k: int = 10,
        where: str | None = None,
        columns: Iterable[str] | None = None,
        nprobes: int | None = None,
        refine_factor: int | None = None,
        exact: bool = False,
        params: Mapping[str, Any] | None = None,
        timeout: Timeout = DEFAULT,
    ) -> pa.Table:
        """k nearest neighbours in ``space`` of a vector (1-D), a batch of vectors (2-D),
        stored items (``ids``) or ``text``/``texts``. Columns: the requested ones (default:
        all but vectors and predictions), ``_distance`` and, for several queries,
        ``query_index``; sorted by query, then distance. ``where`` is a prefilter (with
        ``params`` bound into its ``:name`` placeholders, see :func:`bind_params`)."""
        rpc = rpc_search(self.name, space, vector=vector, ids=ids, text=text, texts=texts, k=k,
                         where=where, columns=columns, nprobes=nprobes, refine_factor=refine_factor,
                         exact=exact, params=params)
        return self.client._unary(rpc, timeout)

    def scan(self, where: str | None = None, columns: Iterable[str] | None = None,
             page_rows: int = 8192, *, version: int | str | None = None,
             params: Mapping[str, Any] | None = None, objects_where: str | None = None,
             timeout: float | None = None) -> Iterator[pa.Table]:
        """The rows matching ``where`` (``params`` bound into it), page by page, at
        ``version`` (a number or tag; default the current one). ``objects_where`` keeps the
        images with a box matching it (SQL over the object columns, see :meth:`objects`)."""
        rpc = rpc_scan(self.name, objects_filter(where, objects_where), columns, page_rows, version=version,
                       params=params)
        return self.client._stream(rpc, timeout)

    def query(self, where: str | None = None, columns: Iterable[str] | None = None,
              limit: int | None = None, offset: int = 0, page_rows: int = 8192, *,
              version: int | str | None = None, params: Mapping[str, Any] | None = None,
              objects_where: str | None = None, timeout: float | None = None) -> pa.Table:
        """The rows matching ``where`` as one table (default columns: all but vectors and
        predictions); ``objects_where`` as for :meth:`scan`."""
        rpc = rpc_scan(self.name, objects_filter(where, objects_where), columns, page_rows, limit, offset,
                       version, params)
        return concat_pages(list(self.client._stream(rpc, timeout)))

    def count(self, where: str | None = None, *, version: int | str | None = None,
              params: Mapping[str, Any] | None = None, objects_where: str | None = None,
              timeout: Timeout = DEFAULT) -> int:
        """Rows matching ``where`` (and with a box matching ``objects_where``)."""
        return self.client._unary(rpc_count(self.name, objects_filter(where, objects_where), version, params),
                                  timeout)

    def page(self, where: str | None = None, columns: Iterable[str] | None = None,
             page_rows: int = 1000, cursor: str | None = None, version: int | str | None = None,
             params: Mapping[str, Any] | None = None, *, timeout: Timeout = DEFAULT) -> Page:
        """One page of the rows matching ``where`` and the cursor of the next
        (``page.next_cursor``, "" after the last). The first page pins the collection
        version: the following pages read it too, however others write meanwhile. Pass the
        same ``where``/``params`` and ``columns`` with a cursor (another filter is
        INVALID_ARGUMENT)."""
        rpc = rpc_page(self.name, where, columns, page_rows, cursor, version, params)
        return self.client._unary(rpc, timeout)

    def pages(self, where: str | None = None, columns: Iterable[str] | None = None,
              page_rows: int = 1000, cursor: str | None = None,
              version: int | str | None = None, params: Mapping[str, Any] | None = None, *,
              timeout: Timeout = DEFAULT) -> Iterator[Page]:
        """Every :meth:`page` from ``cursor`` (default the first) to the last; each call
        has its own deadline. Keep ``page.next_cursor`` to resume later."""
        while True:
            page = self.page(where, columns, page_rows, cursor, version, params, timeout=timeout)
            yield page
            if page.last:
                return
            cursor = page.next_cursor

    # analytics: small pyarrow Tables computed on the server over streamed rows

    def label_distribution(self, where: str | None = None,
                           group_by: str | Iterable[str] | None = None,
                           version: int | str | None = None, *,
                           params: Mapping[str, Any] | None = None,
                           timeout: Timeout = DEFAULT) -> pa.Table:
        """Rows per label: ``label`` (null = unlabeled), the ``group_by`` columns, ``count``."""
        rpc = rpc_aggregate(self.name, "label_distribution", where=where, group_by=group_by,
                            version=version, params=params)
        return self.client._unary(rpc, timeout)

    def confused_pairs(self, model: str, where: str | None = None, top: int = 20, *,
                       version: int | str | None = None, params: Mapping[str, Any] | None = None,
                       timeout: Timeout = DEFAULT) -> pa.Table:
        """The class pairs ``model`` hesitates between most (its top-two classes):
        ``class_a``, ``class_b``, ``count``, ``a_top1``, ``mean_margin``."""
        rpc = rpc_aggregate(self.name, "confused_pairs", model=model, where=where, top=top,
                            version=version, params=params)
        return self.client._unary(rpc, timeout)

    def confusion(self, model: str, where: str | None = None, errors_only: bool = False, *,
                  version: int | str | None = None, params: Mapping[str, Any] | None = None,
                  timeout: Timeout = DEFAULT) -> pa.Table:
        """Label vs ``model``'s predicted class over labeled rows: ``label``, ``predicted``,
        ``count`` (``errors_only``: the off-diagonal cells)."""
        rpc = rpc_aggregate(self.name, "confusion", model=model, where=where,
                            errors_only=errors_only, version=version, params=params)
        return self.client._unary(rpc, timeout)

    def class_uncertainty(self, model: str, where: str | None = None, measure: str = "entropy", *,
                          version: int | str | None = None,
                          params: Mapping[str, Any] | None = None,
                          timeout: Timeout = DEFAULT) -> pa.Table:
        """Uncertainty per predicted class: ``predicted``, ``count``, ``mean_score``,
        ``min_score``, ``max_score`` (measure: entropy, margin, least_confidence, ratio)."""
        rpc = rpc_aggregate(self.name, "class_uncertainty", model=model, where=where,
                            measure=measure, version=version, params=params)
        return self.client._unary(rpc, timeout)

    def histogram(self, field: str, bins: int = 20, where: str | None = None,
                  range: tuple[float, float] | None = None, *,  # noqa: A002
                  version: int | str | None = None, params: Mapping[str, Any] | None = None,
                  source: str | None = None, objects_where: str | None = None,
                  timeout: Timeout = DEFAULT) -> pa.Table:
        """Equal-width histogram of a numeric field (or a path such as ``pred_m.loss``):
        ``bin_start``, ``bin_end``, ``count``, binned as numpy.histogram; what was not
        binned is in :func:`histogram_stats` of the table.

        ``field="objects.<column>"`` (``objects.area``, ``objects.score``...) bins one value
        per box (:meth:`objects`) of ``source`` (a detection model or ``"gt"``; default
        every source) matching ``objects_where``, in the images matching ``where``."""
        rpc = rpc_aggregate(self.name, "histogram", field=field, bins=bins, where=where,
                            range=range, version=version, params=params, model=source,
                            objects_where=objects_where)
        return self.client._unary(rpc, timeout)

    def objects(self, where: str | None = None, objects_where: str | None = None, *,
                source: str | None = None, columns: Iterable[str] | None = None,
                limit: int | None = None, version: int | str | None = None,
                params: Mapping[str, Any] | None = None, timeout: Timeout = DEFAULT) -> pa.Table:
        """Boxes as rows: one row per box of ``source`` (a detection model's name, or
        ``"gt"`` for ``gt_boxes``; default every source) in the images matching ``where``,
        keeping those matching ``objects_where`` (SQL over the object columns). Columns:
        ``id`` (the image), ``source``, ``box`` (index in the image's list), ``class`` (top-1
        of probs; the gt label), ``score``, ``probs``, ``x1``, ``y1``, ``x2``, ``y2``,
        ``width``, ``height``, ``area``; ``columns`` picks some, and may name ``embedding`` (the
        box's per-object embedding, for a model with ``box_embedding_dim``; never returned
        unless named). Derived from the image rows
        of the version read, so always consistent with them. ``where`` may itself hold
        ``any_object(<predicate>)``: images with any box where the predicate holds."""
        rpc = rpc_aggregate(self.name, "objects", where=where, objects_where=objects_where, model=source,
                            columns=columns, limit=limit, version=version, params=params)
        return self.client._unary(rpc, timeout)

    def object_classes(self, where: str | None = None, objects_where: str | None = None, *,
                       source: str | None = None, version: int | str | None = None,
                       params: Mapping[str, Any] | None = None, timeout: Timeout = DEFAULT) -> pa.Table:
        """Box-level label distribution: ``source``, ``class``, ``count`` over the object rows
        :meth:`objects` would return (boxes without probs count under a null class)."""
        rpc = rpc_aggregate(self.name, "object_classes", where=where, objects_where=objects_where, model=source,
                            version=version, params=params)
        return self.client._unary(rpc, timeout)

    def box_confusion(self, model: str, where: str | None = None, iou: float = 0.5, *,
                      objects_where: str | None = None, version: int | str | None = None,
                      params: Mapping[str, Any] | None = None, timeout: Timeout = DEFAULT) -> pa.Table:
        """Box-level confusion of detection ``model`` against ``gt_boxes``: ``label``,
        ``predicted``, ``count``. Per image (with both boxes and gt_boxes), predictions by
        score descending each take the free gt box of highest IoU >= ``iou``, whatever its
        class; a null ``label`` is a spurious prediction, a null ``predicted`` a missed gt
        box; a prediction without probs is ``"(no class)"``. ``objects_where`` keeps the images
        with such a box (all of their boxes are matched)."""
        rpc = rpc_aggregate(self.name, "box_confusion", model=model, where=where, iou=iou, version=version,
                            params=params, objects_where=objects_where)
        return self.client._unary(rpc, timeout)

    def box_confused_pairs(self, model: str, where: str | None = None, objects_where: str | None = None,
                           top: int = 20, *, version: int | str | None = None,
                           params: Mapping[str, Any] | None = None, timeout: Timeout = DEFAULT) -> pa.Table:
        """Box-level confused pairs of detection ``model``: each of its boxes (the object
        rows :meth:`objects` returns for ``source=model``, kept by ``objects_where``) pairs
        its top-two classes; columns as :meth:`confused_pairs` (``class_a``, ``class_b``,
        ``count``, ``a_top1``, ``mean_margin``), the ``top`` pairs. Boxes without probs are
        skipped and counted in one last row with null classes."""
        rpc = rpc_aggregate(self.name, "box_confused_pairs", model=model, where=where,
                            objects_where=objects_where, top=top, version=version, params=params)
        return self.client._unary(rpc, timeout)

    def uncertainty_quality(self, model: str | None = None, uncertainty: str | None = None,
                            quality: str | None = None, where: str | None = None, *,
                            run_id: Any = None, iou: float = 0.5, lower_is_better: bool = False,
                            uncertainty_quantile: float | None = None,
                            quality_quantile: float | None = None,
                            uncertainty_threshold: float | None = None,
                            quality_threshold: float | None = None, max_ids: int = 100,
                            version: int | str | None = None, params: Mapping[str, Any] | None = None,
                            objects_where: str | None = None, timeout: Timeout = DEFAULT) -> pa.Table:
        """Does ``model``'s uncertainty predict its errors? Over the labeled rows matching
        ``where``: one row per quadrant (``quadrant``, ``uncertainty`` high/low, ``quality``
        high/low, ``count``, ``mean_uncertainty``, ``mean_quality``, ``ids``: at most
        ``max_ids``, most extreme first); :func:`uncertainty_quality_stats` of the table
        gives the Spearman ``rho`` (uncertainty vs quality as named), ``rho_error``
        (positive = the uncertain rows are the bad ones), ``p_value``, ``n``, the thresholds
        and the rows left out.

        ``uncertainty``: ``entropy`` (default), ``margin``, ``least_confidence``, ``ratio``
        (detection: ``entropy``, ``margin``, ``one_minus_score``, per image as the detection
        miner scores it; segmentation: the stored ``topq_entropy`` (default), ``mean_entropy``,
        ``bald``), a numeric field or path (``pred_m.loss``); or ``run_id`` (a
        finished mining run or its MiningJob: any miner's scores; its model is the default
        ``model``). ``quality``: ``correct`` (classification default), ``loss`` (lower is
        better), ``iou`` (detection default: boxes matched to gt_boxes at ``iou``,
        unmatched = 0; segmentation default: the mean per-class IoU of
        ``pred_<model>.mask_uri`` against the mask in the ``gt_mask_uri`` column, read on the
        server, 255 = ignore; a mask file missing there is counted in ``missing_masks``) or a
        numeric field (``lower_is_better``). Thresholds: medians by
        default (``correct`` splits at 0.5), or ``*_quantile`` / ``*_threshold``."""
        rpc = rpc_aggregate(self.name, "uncertainty_quality", model=model, measure=uncertainty,
                            quality=quality, where=where, run_id=run_id, iou=iou,
                            lower_is_better=lower_is_better, uncertainty_quantile=uncertainty_quantile,
                            quality_quantile=quality_quantile,
                            uncertainty_threshold=uncertainty_threshold,
                            quality_threshold=quality_threshold, max_ids=max_ids,
                            version=version, params=params, objects_where=objects_where)
        return self.client._unary(rpc, timeout)

    def tag_items(self, ids: str | Iterable[str] | None = None, where: str | None = None,
                  run_id: Any = None, add: str | Iterable[str] = (),
                  remove: str | Iterable[str] = (), params: Mapping[str, Any] | None = None, *,
                  timeout: Timeout = DEFAULT) -> int:
        """Add and/or remove ``tags`` on the rows named by exactly one of ``ids``, ``where``
        or ``run_id`` (a finished mining run's results, or its MiningJob); returns the rows
        whose tags changed. Then ``where="array_has_any(tags, ['to-label'])"``."""
        rpc = rpc_tag_items(self.name, ids, where, run_id, add, remove, params)
        return self.client._unary(rpc, timeout)

    def export(self, path: str | os.PathLike[str], format: str | None = None, *,  # noqa: A002
               model: str | None = None, where: str | None = None,
               ids: str | Iterable[str] | None = None, run_id: Any = None,
               dataset: str | None = None, dataset_version: int | str | None = None,
               fields: Iterable[str] = (), min_score: float = 0.0,
               params: Mapping[str, Any] | None = None, image_url: str | None = None,
               mask_field: str | None = None, objects_where: str | None = None,
               timeout: float | None = None) -> dict[str, Any]:
        """Export rows for labeling to ``path``: CSV / JSONL (``id, uri, text, label``,
        ``fields``, and with a ``model`` its ``predicted`` class and ``confidence``) or COCO
        JSON (``model``'s boxes, or a segmentation model's ``mask_uri`` masks as COCO RLE;
        format from the extension: .csv, .jsonl, .json). Which rows:
        at most one of ``where``, ``ids``, ``run_id``, ``dataset`` (+ ``dataset_version``);
        none = all; ``objects_where`` keeps the images with a box matching it. Per box:
        ``format="objects_csv"|"objects_jsonl"`` writes one line per box (:meth:`objects`'
        columns; ``model`` = the source, default all; ``objects_where`` keeps boxes), and
        ``"yolo"`` (or a ``.zip`` path) a zip of YOLO txt labels of ``model``'s boxes
        (``classes.txt``, ``labels/<image>.txt``; sizes read from the local images). The
        file is streamed to a temporary name next to ``path`` and renamed when complete.
        Returns ``{rows, annotations, path, format}``.

        ``format="label-studio"``: Label Studio tasks (JSON) with ``model``'s pre-annotations
        (its top class, or its boxes; masks from ``mask_field``, a column of mask PNG paths),
        image URLs from ``image_url`` (a template of ``{uri}``, ``{path}``, ``{name}``,
        ``{id}``); the matching labeling config is written next to them
        (``<name>.label_config.xml``, also in the result's ``label_config``). See
        :mod:`indexing.labelstudio`; :meth:`import_labels` reads the annotations back."""
        fmt = export_format(path, format)
        per_box = fmt in BOX_EXPORTS
        rpc = rpc_export(self.name, fmt, model=model, where=where if per_box else objects_filter(where, objects_where),
                         objects_where=objects_where if per_box else None, ids=ids, run_id=run_id,
                         dataset=dataset, dataset_version=dataset_version, fields=fields,
                         min_score=min_score, params=params, image_url=image_url,
                         mask_field=mask_field)
        with ExportFile(path, fmt) as out:
            for chunk in self.client._stream(rpc, timeout):
                out.write(chunk)
        return out.result or {}

    def import_labels(self, path: str | os.PathLike[str], format: str | None = None, *,  # noqa: A002
                      dry_run: bool = False, timeout: float | None = None) -> dict[str, Any]:
        """Write the labels and boxes of a labeling tool's export back: a Label Studio JSON
        export, a CVAT for images 1.1 XML file or a COCO file (``format`` "label-studio",
        "cvat", "coco"; default from the file). Items are matched to rows by the id assay
        exported with them, else by uri, else by file name (see
        :mod:`service.client.labeling`); only rows whose ``label`` or ``gt_boxes`` change
        are written, so importing a file again changes nothing. Returns a report: ``items``,
        ``matched``, ``changed``, ``unchanged``, ``not_annotated``, ``labels``, ``boxes``,
        ``unmatched`` (item and reason, nothing written for them), ``version``;
        ``dry_run`` reports without writing."""
        fmt, records = read_labels(path, format)
        plan = LabelImport(fmt, records)
        columns = ["id", "uri", "label", "gt_boxes"]
        for part in chunks(plan.wanted_ids):
            plan.found(self.take(part, columns, timeout=timeout), "id")
        for part in chunks(plan.wanted_uris):
            plan.found(self.query("uri IN (:uris)", columns, params={"uris": part}, timeout=timeout), "uri")
        if plan.needs_scan:
            for page in self.scan(None, ["id", "uri"], timeout=timeout):
                plan.scanned(page)
            for part in chunks(plan.match_scanned()):
                plan.found(self.take(part, columns, timeout=timeout), "id")
        plan.finish_unmatched()
        table, counts = plan.changes()
        version = None
        if table is not None and not dry_run:
            version = self.upsert(table, timeout=timeout).version
        return plan.report(counts, os.fspath(path), dry_run, version)

    def take(self, ids: str | Iterable[str], columns: Iterable[str] | None = None, *,
             timeout: Timeout = DEFAULT) -> pa.Table:
        """Rows by id, in the order given; missing ids are left out."""
        return self.client._unary(rpc_take(self.name, ids, columns), timeout)

    def delete(self, ids: str | Iterable[str] | None = None, where: str | None = None, *,
               params: Mapping[str, Any] | None = None, timeout: Timeout = DEFAULT) -> int:
        """Delete by ids or by filter (exactly one); returns the rows deleted."""
        return self.client._unary(rpc_delete(self.name, ids, where, params), timeout)

    def optimize(self, cleanup_older_than_s: float | None = None, *,
                 timeout: Timeout = DEFAULT) -> Job:
        """Compact, update/build indexes, remove old untagged versions (a job)."""
        return self.client._unary(rpc_optimize(self.name, cleanup_older_than_s), timeout)

    def build_index(self, space: str, kind: str | None = None, *,
                    timeout: Timeout = DEFAULT) -> Job:
        return self.client._unary(rpc_build_index(self.name, space, kind), timeout)

    def recall_check(self, space: str, queries: int = 50, k: int = 10, where: str | None = None,
                     tune: bool = True, *, params: Mapping[str, Any] | None = None,
                     timeout: Timeout = DEFAULT) -> Job:
        """Index recall against exact search; with ``tune``, raise nprobes until it is met."""
        rpc = rpc_recall_check(self.name, space, queries, k, where, tune, params)
        return self.client._unary(rpc, timeout)

    def reindex(self, space: str, *, params: Mapping[str, Any] | None = None,
                timeout: Timeout = DEFAULT, **options: Any) -> Job:
        """Re-embed the rows (all, or ``where``) into ``space`` with a model, as a server
        job: ``model`` (sentence-transformers name/path, default the packaged MiniLM) or
        ``clip_model`` + ``clip_pretrained``; ``source`` "text" or "uri"; ``engine`` "local"
        or "ray" (``ray_address``, ``ray_workers``); ``restart`` discards an interrupted
        run, which is otherwise resumed. The old space is served until the switch. The
        job's result holds the report (``embedded``, ``bad``, ``swapped``, ``summary``).
        ``params`` are bound into ``where``."""
        return self.client._unary(rpc_reindex(self.name, space, options, params), timeout)

    def mine(self, miner: str, size: int, *, model: str | None = None, space: str | None = None,
             where: str | None = None, reference_where: str | None = None,
             params: Mapping[str, Any] | None = None, seed: int | None = None, reverse: bool = False,
             version: int | None = None, where_params: Mapping[str, Any] | None = None,
             objects_where: str | None = None, candidates: str | None = None,
             candidates_k: int | None = None, timeout: Timeout = DEFAULT) -> MiningJob:
        """Start a mining run: the ``size`` pool rows (``where``) ``miner`` ranks highest
        (lowest with ``reverse``), read at ``version`` (default: the current one).
        ``params`` are the miner's parameters; ``where_params`` are bound into ``where`` and
        ``reference_where`` (:func:`bind_params`). ``job.wait(progress=True)`` then
        ``job.results()``; ``job.tag("to-label")`` tags the selected rows. ``objects_where``
        restricts the pool to images with a box matching it (SQL over the object columns,
        see :meth:`objects`), judged at the run's version; in an object space
        (``space="objects:<model>"``: the model's boxes mined by their embeddings) it also
        keeps only the boxes matching it. ``seed`` None: 0, or a fresh seed
        (recorded in ``job.run()``) for miners that sample (``random``).
        ``candidates="knn_of_labeled"`` (SEALS) mines only the ``candidates_k`` (default 100)
        nearest pool rows of each labeled row (``reference_where``, default
        ``label IS NOT NULL``) in ``space``."""
        rpc = rpc_start_mining(self.name, miner, size, model=model, space=space,
                               where=objects_filter(where, objects_where),
                               reference_where=reference_where, params=params, seed=seed,
                               reverse=reverse, version=version, where_params=where_params,
                               candidates=candidates, candidates_k=candidates_k,
                               objects_where=objects_where if is_object_space(space) else None)
        return MiningJob(self.client, self.client._unary(rpc, timeout))

    def score_stream(self, items: Any, *, model: str | None = None, space: str | None = None,
                     reference_where: str | None = None, thresholds: Any = None, batch_rows: int = 4096,
                     timeout: float | None = None, **options: Any) -> Iterator[pa.Table]:
        """Score items that are not stored, streamed both ways: one table per batch sent,
        as soon as the server has scored it. ``items``: what :meth:`score` takes, or an
        iterable of such chunks (e.g. a generator over a live feed)."""
        spec = scorer_spec(self.name, model=model, space=space, reference_where=reference_where,
                           thresholds=thresholds, **options)
        if isinstance(items, pa.Table | pa.RecordBatch | Mapping) or is_dataframe(items) or is_rows(items):
            tables: Iterable[pa.Table] = [items_to_arrow(items)]
        else:
            tables = (items_to_arrow(chunk) for chunk in items)
        yield from self.client._score_stream(spec, tables, batch_rows, timeout)

    def score(self, items: Any, *, model: str | None = None, space: str | None = None,
              reference_where: str | None = None, thresholds: Any = None, batch_rows: int = 4096,
              timeout: float | None = None, **options: Any) -> pa.Table:
        """Per-item scores of items that are not stored (bidirectional Scoring.Score stream).

        ``items``: a dict of columns (``probs``/``logits`` (N, C), ``samples`` (N, K, C),
        ``embedding`` (N, d), ``boxes``, ``id``), a list of row dicts, a DataFrame or an
        Arrow table — or ``pred_<model>`` / ``emb_<space>`` columns as stored. Returns a
        table with ``index`` (position in ``items``), ``id`` (when given), one float64
        column per score the inputs allow (least_confidence, margin, ratio, entropy,
        mean_entropy, variance, bald, vote_entropy, consensus_entropy, kl_to_consensus,
        energy, detection, novelty) and ``keep``: any score >= its threshold (null without
        ``thresholds``; pass a dict or what :meth:`calibrate` returned). Novelty is measured
        in ``space`` against the rows matching ``reference_where`` (default: every row with a
        vector). ``options``: k (10), novelty ("knn_distance" or "lof"), how ("kth" or
        "mean"), logits_temperature, energy_temperature, detection_method,
        detection_aggregate, nms_iou, version."""
        parts = list(self.score_stream(items, model=model, space=space, reference_where=reference_where,
                                       thresholds=thresholds, batch_rows=batch_rows, timeout=timeout,
                                       **options))
        return pa.concat_tables(parts, promote_options="default") if parts else pa.table({})

    def calibrate(self, budget: float, *, where: str | None = None, criteria: str | Iterable[str] | None = None,
                  model: str | None = None, space: str | None = None, reference_where: str | None = None,
                  max_rows: int = 100_000, seed: int = 0, timeout: Timeout = DEFAULT,
                  **options: Any) -> dict[str, Any]:
        """Thresholds that keep about ``budget`` (e.g. 0.02: 2% of traffic) of the stored rows
        matching ``where``, scored like streamed items (``criteria``: the scores that decide,
        default entropy with a model and novelty with a space). Returns ``{thresholds, budget,
        kept_fraction, rows, version, criteria}``; pass it as ``thresholds=`` to :meth:`score`."""
        spec = scorer_spec(self.name, model=model, space=space, reference_where=reference_where, **options)
        return self.client._unary(rpc_calibrate(spec, budget, where, criteria, max_rows, seed), timeout)

    def export_scorer(self, path: str | os.PathLike[str], *, budget: float = 0.0, where: str | None = None,
                      criteria: str | Iterable[str] | None = None, model: str | None = None,
                      space: str | None = None, reference_where: str | None = None, thresholds: Any = None,
                      reference: str = "sample", reference_size: int = 2048, format: str | None = None,  # noqa: A002
                      max_rows: int = 100_000, seed: int = 0, timeout: float | None = None,
                      **options: Any) -> dict[str, Any]:
        """Write a scorer bundle for ``miners.edge.EdgeScorer.load(path)`` (.npz, or .json by
        extension / ``format``): the scoring settings, thresholds (calibrated here on ``where``
        when ``budget`` > 0, else ``thresholds``) and a compact reference set for novelty
        (``reference``: "sample" of ``reference_size`` rows, "all", or "centroids").
        Returns ``{path, format, thresholds, reference_rows, bytes, kept_fraction}``."""
        fmt = scorer_format(path, format)
        spec = scorer_spec(self.name, model=model, space=space, reference_where=reference_where,
                           thresholds=thresholds, **options)
        out = ScorerFile(path, fmt)
        rpc = rpc_export_scorer(spec, fmt, budget, where, criteria, max_rows, seed, reference, reference_size)
        for chunk in self.client._stream(rpc, timeout):
            out.write(chunk)
        return out.finish()


class Dataset:
    """A versioned dataset on the server: a named selection of one collection's rows.

    Stage members with :meth:`add` / :meth:`remove` (by ``ids``, a ``where`` filter with
    ``params``, or a mining ``run_id``), then :meth:`commit`: version N pins the membership
    and the collection version, so :meth:`checkout` of N returns labels and predictions as
    they were. Versions are ints, ``"HEAD"``, dataset tag names, or None for the working
    state (head + staged changes, at the collection's current version).

        ds = client.create_dataset("train", "pool")
        ds.add(run_id=job.run_id)
        ds.commit("first 500 uncertain")
        old = ds.checkout(1)            # pyarrow.Table, sorted by id
        ds.diff(1, 2)                   # {"added": [...], "removed": [...], "relabeled": Table}
    """

    def __init__(self, client: Client, name: str) -> None:
        self.client = client
        self.name = name

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r})"

    def info(self, *, timeout: Timeout = DEFAULT) -> dict[str, Any]:
        """name, collection, description, created_at, head, members (at head),
        staged_adds, staged_removes, tags (name -> version)."""
        return self.client._unary(rpc_dataset("GetDataset", self.name), timeout)

    def add(self, ids: str | Iterable[str] | None = None, where: str | None = None,
            run_id: Any = None, params: Mapping[str, Any] | None = None, *,
            timeout: Timeout = DEFAULT) -> dict[str, Any]:
        """Stage members: exactly one of ``ids`` (each must exist), ``where`` (with
        ``params`` bound) or ``run_id`` (a SUCCEEDED run's results, or its MiningJob).
        Returns requested, changed, unchanged, staged_adds, staged_removes."""
        rpc = rpc_members("AddMembers", self.name, ids, where, run_id, params)
        return self.client._unary(rpc, timeout)

    def remove(self, ids: str | Iterable[str] | None = None, where: str | None = None,
               run_id: Any = None, params: Mapping[str, Any] | None = None, *,
               timeout: Timeout = DEFAULT) -> dict[str, Any]:
        """Stage the removal of members, chosen like :meth:`add`."""
        rpc = rpc_members("RemoveMembers", self.name, ids, where, run_id, params)
        return self.client._unary(rpc, timeout)

    def status(self, *, timeout: Timeout = DEFAULT) -> dict[str, Any]:
        """head, staged_adds, staged_removes, members (working state),
        head_collection_version, collection_version."""
        return self.client._unary(rpc_dataset("GetStatus", self.name, message_to_dict), timeout)

    def discard(self, *, timeout: Timeout = DEFAULT) -> int:
        """Drop the staged changes; returns how many."""
        rpc = rpc_dataset("Discard", self.name, lambda r: int(r.discarded))
        return self.client._unary(rpc, timeout)

    def commit(self, message: str, author: str = "", allow_empty: bool = False, *,
               timeout: Timeout = DEFAULT) -> dict[str, Any]:
        """Commit the staged changes as the next version (FailedPreconditionError when
        nothing is staged, unless ``allow_empty``: to pin newer labels of the same members).
        Returns the commit: version, collection_version, tag, members, added, removed ..."""
        return self.client._unary(rpc_commit(self.name, message, author, allow_empty), timeout)

    def history(self, *, timeout: Timeout = DEFAULT) -> list[dict[str, Any]]:
        """Commits, newest first."""
        rpc = rpc_dataset("History", self.name,
                          lambda r: [message_to_dict(c) for c in r.commits])
        return self.client._unary(rpc, timeout)

    def tag(self, version: int | str, tag: str, *, timeout: Timeout = DEFAULT) -> int:
        """Name a committed version (``"paper-v1"``); returns the version tagged."""
        return self.client._unary(rpc_tag_version(self.name, version, tag), timeout)

    def checkout_batches(self, version: int | str | None = None,
                         columns: Iterable[str] | None = None, page_rows: int = 8192, *,
                         timeout: float | None = None) -> Iterator[pa.Table]:
        """:meth:`checkout` page by page."""
        rpc = rpc_checkout(self.name, version, columns, page_rows)
        return self.client._stream(rpc, timeout)

    def checkout(self, version: int | str | None = None, columns: Iterable[str] | None = None,
                 page_rows: int = 8192, *, timeout: float | None = None) -> pa.Table:
        """The members' rows as they were at ``version`` (default columns: all but vectors
        and predictions; name ``emb_*`` / ``pred_*`` columns to get them), sorted by id
        (when ``id`` is among the columns)."""
        return sorted_by_id(concat_pages(list(self.checkout_batches(version, columns, page_rows,
                                                                     timeout=timeout))))

    def members(self, version: int | str | None = None, *,
                timeout: float | None = None) -> list[str]:
        """Member ids at ``version``, sorted."""
        table = self.checkout(version, ["id"], 100_000, timeout=timeout)
        return table.column("id").to_pylist() if "id" in table.column_names else []

    def diff(self, v1: int | str, v2: int | str | None = None, *,
             timeout: Timeout = DEFAULT) -> dict[str, Any]:
        """From ``v1`` to ``v2`` (None: the working state): ``added`` and ``removed`` ids
        (lists, sorted) and ``relabeled`` (Table: id, label_before, label_after)."""
        return self.client._unary(rpc_diff(self.name, v1, v2), timeout)

    def delete(self, force: bool = False, *, timeout: Timeout = DEFAULT) -> None:
        """Delete the dataset and its history (FailedPreconditionError while changes are
        staged, unless ``force``)."""
        self.client._unary(rpc_delete_dataset(self.name, force), timeout)
