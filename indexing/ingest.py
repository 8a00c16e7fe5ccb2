"""Bulk ingest: an image folder, or a Parquet / CSV / JSONL file, into a collection.

Rows are read in batches (never a whole file in memory), embedded on the way in into the
requested spaces (``TextEmbedder`` on the ``text`` field, ``ClipEmbedder`` on ``uri``
images: local paths, ``file://`` or ``s3://`` URIs, see ``indexing.images``) and upserted
by id. The job is resumable: rows whose id is already present with a vector in every
requested space are skipped. Bad rows (an unreadable image, a line that is
not JSON, a row without the text to embed, a row the store's validation rejects) are
recorded with their line number, row or path and the reason, and the other rows of the
batch go on; nothing is dropped silently.

Row locations in the report: ``path`` for images, ``line`` (1-based, the header is line 1
for CSV) for CSV and JSONL, ``row`` (0-based) for Parquet.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa

from indexing.embedders import ClipEmbedder, TextEmbedder, embedder_for_identity
from indexing.errors import AlreadyExists, FailedPrecondition, InvalidArgument, NotFound
from indexing.images import open_images
from indexing.schema import (
    EMB_PREFIX,
    PRED_PREFIX,
    RESERVED_COLUMNS,
    STORE_SET_COLUMNS,
    is_user_scalar,
)
from indexing.settings import CSV_BLOCK_BYTES as _CSV_BLOCK

if TYPE_CHECKING:  # a store, or any object of its shape (service.remote_store: a server)
    from indexing.store import Collection, Store

log = logging.getLogger("assay.ingest")

__all__ = ["IMAGE_EXTENSIONS", "IngestReport", "ingest", "write_errors"]

IMAGE_EXTENSIONS = frozenset({".png", ".jpg", ".jpeg", ".webp", ".bmp"})
_IDENT_BAD = re.compile(r"[^A-Za-z0-9_]")


@dataclass
class IngestReport:
    """What an ingest did. ``bad`` holds one dict per bad row: its location (``path``,
    ``line`` or ``row``), ``id`` when known, and ``reason``."""

    ingested: int = 0
    skipped: int = 0
    bad: list[dict[str, Any]] = field(default_factory=list)
    batches: int = 0
    rows_read: int = 0
    warnings: list[str] = field(default_factory=list)
    seconds: float = 0.0  # reading, embedding and writing (model loading excluded)

    @property
    def ok(self) -> bool:
        return not self.bad

    def summary(self) -> str:
        rate = self.rows_read / self.seconds if self.seconds > 0 else 0.0
        return (
            f"{self.rows_read} rows read in {self.batches} batches ({self.seconds:.1f}s, "
            f"{rate:.0f} rows/s): {self.ingested} ingested, {self.skipped} skipped "
            f"(already present), {len(self.bad)} bad"
        )


@dataclass
class _Batch:
    table: pa.Table  # columns as read (names not yet normalised)
    locs: list[dict[str, Any]]  # one location per row of `table`
    raw_rows: int  # rows consumed from the source, including those already reported bad


# ---------------------------------------------------------------------------- sources


def _source_kind(source: str) -> str:
    if os.path.isdir(source):
        return "images"
    if not os.path.isfile(source):
        raise NotFound(f"ingest source {source!r} is neither a folder nor a file")
    lower = source.lower()
    for ext, kind in ((".parquet", "parquet"), (".csv", "csv"), (".jsonl", "jsonl"), (".ndjson", "jsonl")):
        if lower.endswith(ext):
            return kind
    raise InvalidArgument(
        f"ingest source {source!r}: give an image folder or a .parquet, .csv or .jsonl file",
        field="source",
    )


def _list_images(root: Path) -> list[Path]:
    out: list[Path] = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        out.extend(
            Path(dirpath) / f for f in sorted(filenames)
            if not f.startswith(".") and os.path.splitext(f)[1].lower() in IMAGE_EXTENSIONS
        )
    return out


def _image_batches(paths: list[Path], root: Path, batch_rows: int, labels: bool) -> Iterator[_Batch]:
    for start in range(0, len(paths), batch_rows):
        chunk = paths[start:start + batch_rows]
        rel = [p.relative_to(root) for p in chunk]
        cols: dict[str, Any] = {
            "id": pa.array([r.as_posix() for r in rel], pa.string()),
            "uri": pa.array([str(p) for p in chunk], pa.string()),
        }
        if labels:
            # The class is the top-level sub-folder (torchvision ImageFolder layout); files
            # directly in the root folder have no label.
            cols["label"] = pa.array([r.parts[0] if len(r.parts) > 1 else None for r in rel], pa.string())
        yield _Batch(pa.table(cols), [{"path": str(p)} for p in chunk], len(chunk))


def _parquet_batches(path: str, batch_rows: int) -> Iterator[_Batch]:
    import pyarrow.parquet as pq

    pf = pq.ParquetFile(path)
    row = 0
    for rb in pf.iter_batches(batch_size=batch_rows):
        n = rb.num_rows
        yield _Batch(pa.Table.from_batches([rb]), [{"row": row + i} for i in range(n)], n)
        row += n


def _csv_batches(path: str, batch_rows: int, report: IngestReport) -> Iterator[_Batch]:
    import pyarrow.csv as pcsv

    reader = pcsv.open_csv(
        path,
        read_options=pcsv.ReadOptions(block_size=_CSV_BLOCK),
        convert_options=pcsv.ConvertOptions(strings_can_be_null=True),
    )
    line = 2  # the header is line 1 (rows with quoted newlines shift later line numbers)
    pending: list[pa.RecordBatch] = []
    pending_rows = 0
    while True:
        try:
            rb = reader.read_next_batch()
        except StopIteration:
            break
        except (pa.ArrowInvalid, pa.ArrowTypeError) as exc:
            # pyarrow infers column types from the first block; a later block that does not
            # fit stops the reader. Report where, and what: the rest cannot be read.
            report.bad.append({"line": line + pending_rows, "reason": (
                f"CSV reading stopped at or after this line: {exc} (the rest of the file was "
                "not read; fix the value or split the file)")})
            break
        pending.append(rb)
        pending_rows += rb.num_rows
        while pending_rows >= batch_rows:
            table = pa.Table.from_batches(pending)
            head, tail = table.slice(0, batch_rows), table.slice(batch_rows)
            yield _Batch(head, [{"line": line + i} for i in range(batch_rows)], batch_rows)
            line += batch_rows
            pending = tail.to_batches()
            pending_rows = tail.num_rows
    if pending_rows:
        yield _Batch(pa.Table.from_batches(pending), [{"line": line + i} for i in range(pending_rows)],
                     pending_rows)


def _jsonl_batches(path: str, batch_rows: int, report: IngestReport) -> Iterator[_Batch]:
    records: list[dict[str, Any]] = []
    locs: list[dict[str, Any]] = []
    consumed = 0
    with open(path, encoding="utf-8", errors="replace") as fh:
        for lineno, text in enumerate(fh, start=1):
            if not text.strip():
                continue
            consumed += 1
            try:
                obj = json.loads(text)
            except json.JSONDecodeError as exc:
                report.bad.append({"line": lineno, "reason": f"not valid JSON: {exc}"})
            else:
                if isinstance(obj, dict):
                    records.append(obj)
                    locs.append({"line": lineno})
                else:
                    report.bad.append({"line": lineno, "reason": f"not a JSON object: {type(obj).__name__}"})
            if consumed >= batch_rows:
                yield _records_batch(records, locs, consumed, report)
                records, locs, consumed = [], [], 0
    if consumed:
        yield _records_batch(records, locs, consumed, report)


def _records_batch(records: list[dict[str, Any]], locs: list[dict[str, Any]], consumed: int,
                   report: IngestReport) -> _Batch:
    """Arrow columns from JSON objects; a value that does not fit its field's type (the type
    of the field's first value in the batch) makes its row bad."""
    keys: dict[str, None] = {}
    for r in records:
        keys.update(dict.fromkeys(r))
    bad_rows: dict[int, str] = {}
    for k in keys:
        values = [r.get(k) for r in records]
        try:
            pa.array(values)
            continue
        except (pa.ArrowInvalid, pa.ArrowTypeError, pa.ArrowNotImplementedError, OverflowError):
            pass
        first = next(v for v in values if v is not None)
        try:
            typ = pa.array([first]).type
        except (pa.ArrowInvalid, pa.ArrowTypeError, pa.ArrowNotImplementedError, OverflowError):
            typ = None
        for i, v in enumerate(values):
            if v is None or i in bad_rows:
                continue
            try:
                if typ is None:
                    raise pa.ArrowInvalid("unsupported value")
                pa.array([v], typ)
            except (pa.ArrowInvalid, pa.ArrowTypeError, pa.ArrowNotImplementedError, OverflowError):
                bad_rows[i] = f"field '{k}': value {v!r} does not fit the field's type {typ}"
    if bad_rows:
        for i, reason in sorted(bad_rows.items()):
            report.bad.append({**locs[i], **_id_of(records[i]), "reason": reason})
        keep = [i for i in range(len(records)) if i not in bad_rows]
        records = [records[i] for i in keep]
        locs = [locs[i] for i in keep]
    cols = {}
    for k in keys:
        try:
            cols[k] = pa.array([r.get(k) for r in records])
        except (pa.ArrowInvalid, pa.ArrowTypeError, pa.ArrowNotImplementedError, OverflowError):
            cols[k] = pa.nulls(len(records))  # a whole column of unsupported values: dropped later
            report.warnings.append(f"field '{k}' could not be converted and was not ingested")
    if not cols:  # only empty objects ({}) in this batch
        for loc in locs:
            report.bad.append({**loc, "reason": "empty JSON object"})
        return _Batch(pa.table({"id": pa.array([], pa.string())}), [], consumed)
    return _Batch(pa.table(cols), locs, consumed)


def _id_of(record: dict[str, Any]) -> dict[str, Any]:
    v = record.get("id")
    return {"id": str(v)} if v is not None else {}


# ---------------------------------------------------------------------------- columns


def _clean_name(name: str) -> str:
    clean = _IDENT_BAD.sub("_", str(name))[:63] or "_"
    return "_" + clean[:62] if clean[0].isdigit() else clean


class _Normaliser:
    """Turns source columns into collection columns: ``id`` from ``id_field`` (or derived
    from the row's location when the source has no id field at all), names made
    identifiers, store-set and non-scalar fields left out (with one warning each)."""

    def __init__(self, id_field: str, stem: str, report: IngestReport) -> None:
        self.id_field = id_field
        self.stem = stem
        self.report = report
        self._warned: set[str] = set()

    def _warn(self, key: str, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            self.report.warnings.append(message)
            log.warning("%s", message)

    def __call__(self, batch: _Batch, schema: pa.Schema | None) -> tuple[pa.Table, list[dict[str, Any]]]:
        table, locs = batch.table, batch.locs
        cols: dict[str, pa.Array] = {}
        for name in table.column_names:
            arr = table.column(name).combine_chunks()
            if name == self.id_field:
                target = "id"
            elif name == "id":  # the source's own 'id' when --id-field names another field
                target = "source_id"
            else:
                target = _clean_name(name)
            if target != name and name not in (self.id_field,):
                self._warn(f"rename:{name}", f"field '{name}' is stored as '{target}'")
            if target in STORE_SET_COLUMNS:
                self._warn(f"drop:{name}", f"field '{name}' is set by the store; not ingested")
                continue
            if target in cols:
                self._warn(f"dup:{name}", f"field '{name}' clashes with another field named '{target}'; not ingested")
                continue
            if pa.types.is_null(arr.type):
                if schema is not None and target in schema.names:
                    arr = pa.nulls(len(arr), schema.field(target).type)
                else:
                    continue  # nothing to store yet, and its type is unknown
            special = target in RESERVED_COLUMNS or target.startswith((EMB_PREFIX, PRED_PREFIX))
            if not special and not is_user_scalar(arr.type):
                self._warn(f"type:{name}", f"field '{name}' has non-scalar type {arr.type}; not ingested")
                continue
            if target in ("uri", "text", "label", "id") and not pa.types.is_string(arr.type):
                # If it does not convert, the store's validation rejects it with its message.
                with contextlib.suppress(pa.ArrowInvalid, pa.ArrowNotImplementedError, pa.ArrowTypeError):
                    arr = arr.cast(pa.string())
            cols[target] = arr
        n = table.num_rows
        if "id" not in cols:
            if self.id_field != "id":
                raise InvalidArgument(
                    f"the source has no field '{self.id_field}' (--id-field); fields: "
                    f"{', '.join(table.column_names) or 'none'}",
                    field="id_field",
                )
            self._warn("derived-id", f"the source has no 'id' field: ids are '{self.stem}-<line or row>'")
            cols = {"id": pa.array([f"{self.stem}-{_loc_value(loc)}" for loc in locs], pa.string()), **cols}
        else:
            cols = {"id": cols.pop("id"), **cols}
        out = pa.table(cols) if cols else pa.table({"id": pa.nulls(n, pa.string())})
        for i, loc in enumerate(locs):
            loc_id = out.column("id")[i].as_py()
            if loc_id is not None:
                loc["id"] = loc_id
        return out, locs


def _loc_value(loc: dict[str, Any]) -> Any:
    return loc.get("line", loc.get("row", loc.get("path")))


# ---------------------------------------------------------------------------- spaces


def _ensure_space(store: Store, collection: str, space: str, identity: str, dim: int) -> Collection:
    col = store.create_collection(collection, exist_ok=True)
    spec = col.spaces.get(space)
    if spec is None:
        try:
            col.add_space(space, dim, metric="cosine", model=identity)
        except AlreadyExists:  # another writer added it meanwhile
            spec = col.space(space)
        else:
            return col
    if spec.model is not None and spec.model != identity:
        raise FailedPrecondition(
            f"space '{space}' of collection '{collection}' holds vectors of {spec.model}, not "
            f"{identity}: ingest into another space, or re-embed it with `assay reindex`"
        )
    if spec.dim != dim:
        raise FailedPrecondition(
            f"space '{space}' of collection '{collection}' has dimension {spec.dim}; {identity} "
            f"gives {dim}"
        )
    return col


def _fixed_list(vecs: np.ndarray) -> pa.Array:
    vecs = np.ascontiguousarray(vecs, dtype=np.float32)
    return pa.FixedSizeListArray.from_arrays(pa.array(vecs.reshape(-1)), vecs.shape[1])


# ---------------------------------------------------------------------------- the job


def ingest(
    store: Store,
    collection: str,
    source: str,
    *,
    text_space: str | None = None,
    text_model: str | None = None,
    image_space: str | None = None,
    clip_model: str | None = None,
    clip_pretrained: str | None = None,
    labels_from_folders: bool = False,
    batch_rows: int = 1000,
    id_field: str = "id",
    progress: bool = True,
    image_storage_options: Mapping[str, str] | None = None,
) -> IngestReport:
    """Ingest ``source`` (an image folder, or a .parquet / .csv / .jsonl file) into
    ``collection``, creating it (and the requested spaces) if missing. See the module
    docstring; returns an :class:`IngestReport`. Raises (before writing anything) when the
    source or a model cannot be used.

    Image ``uri`` values may be local paths (relative ones to the source file's folder),
    ``file://`` or ``s3://bucket/key`` URIs. ``s3://`` images are read with
    ``image_storage_options``, by default the store's own options when the store is on an
    object store (same endpoint and credentials), else those from the environment
    (``ASSAY_S3_ENDPOINT``, ``AWS_*``), like ``Store`` reads them."""
    if batch_rows < 1:
        raise InvalidArgument(f"batch_rows must be >= 1, got {batch_rows}", field="batch_rows")
    if image_space and not clip_model:
        raise InvalidArgument("an image space needs clip_model (--clip-model)", field="clip_model")
    if text_space and image_space and text_space == image_space:
        raise InvalidArgument("the text space and the image space must have different names")
    kind = _source_kind(source)
    if labels_from_folders and kind != "images":
        raise InvalidArgument("labels_from_folders applies to image folders only", field="labels_from_folders")
    report = IngestReport()
    if image_storage_options is None:
        image_storage_options = store.storage_options or None  # None: from the environment

    # Models first: a model that cannot be loaded fails the job before anything is written.
    text_emb: TextEmbedder | None = None
    clip_emb: ClipEmbedder | None = None
    spaces: dict[str, str] = {}  # space name -> column
    col: Collection | None = None
    if text_space:
        identity = TextEmbedder(text_model).identity
        emb = embedder_for_identity(identity)
        assert isinstance(emb, TextEmbedder)
        text_emb = emb
        col = _ensure_space(store, collection, text_space, identity, text_emb.dim)
        spaces[text_space] = EMB_PREFIX + text_space
    if image_space:
        assert clip_model is not None
        identity = ClipEmbedder(clip_model, clip_pretrained).identity
        emb = embedder_for_identity(identity)
        assert isinstance(emb, ClipEmbedder)
        clip_emb = emb
        col = _ensure_space(store, collection, image_space, identity, clip_emb.dim)
        spaces[image_space] = EMB_PREFIX + image_space
    if col is None:
        try:
            col = store.collection(collection)
        except NotFound:
            col = None  # created with the first batch

    total: int | None = None
    src_path = Path(source).expanduser().resolve()
    if kind == "images":
        paths = _list_images(src_path)
        total = len(paths)
        batches: Iterator[_Batch] = _image_batches(paths, src_path, batch_rows, labels_from_folders)
    elif kind == "parquet":
        import pyarrow.parquet as pq

        total = pq.ParquetFile(str(src_path)).metadata.num_rows
        batches = _parquet_batches(str(src_path), batch_rows)
    elif kind == "csv":
        batches = _csv_batches(str(src_path), batch_rows, report)
    else:
        batches = _jsonl_batches(str(src_path), batch_rows, report)
    normalise = _Normaliser(id_field, _clean_name(src_path.stem), report)

    t0 = time.perf_counter()  # rows/s counts reading, embedding and writing, not model loading

    bar = _bar(total, f"ingest {collection}") if progress else _NoBar()
    try:
        for batch in batches:
            report.batches += 1
            report.rows_read += batch.raw_rows
            if batch.table.num_rows:
                col = _ingest_batch(store, collection, col, batch, normalise, spaces, text_space,
                                    text_emb, image_space, clip_emb, src_path.parent,
                                    image_storage_options, report)
            bar.update(batch.raw_rows)
            bar.set_postfix(ingested=report.ingested, skipped=report.skipped, bad=len(report.bad),
                            refresh=False)
    finally:
        bar.close()
    report.seconds = time.perf_counter() - t0
    log.info("ingest %s from %s: %s", collection, source, report.summary())
    return report


def _ingest_batch(
    store: Store,
    collection: str,
    col: Collection | None,
    batch: _Batch,
    normalise: _Normaliser,
    spaces: dict[str, str],
    text_space: str | None,
    text_emb: TextEmbedder | None,
    image_space: str | None,
    clip_emb: ClipEmbedder | None,
    base_dir: Path,
    storage_options: Mapping[str, str] | None,
    report: IngestReport,
) -> Collection | None:
    table, locs = normalise(batch, col.schema if col is not None else None)
    keep = np.ones(table.num_rows, dtype=bool)

    def bad(i: int, reason: str) -> None:
        keep[i] = False
        report.bad.append({**locs[i], "reason": reason})

    ids = table.column("id").to_pylist()
    for i, v in enumerate(ids):
        if v is None or v == "":
            bad(i, "missing id")

    # Resume: ids already present with a vector in every requested space are skipped.
    if col is not None and col.count() > 0:
        candidates = [v for i, v in enumerate(ids) if keep[i]]
        emb_cols = list(spaces.values())
        found = col.take(candidates, ["id", *emb_cols]) if candidates else None
        if found is not None and found.num_rows:
            done = np.ones(found.num_rows, dtype=bool)
            for c in emb_cols:
                done &= np.asarray(found.column(c).is_valid().to_numpy(zero_copy_only=False))
            present = {v for v, d in zip(found.column("id").to_pylist(), done, strict=True) if d}
            for i, v in enumerate(ids):
                if keep[i] and v in present:
                    keep[i] = False
                    report.skipped += 1

    vectors: dict[str, np.ndarray] = {}
    if text_space and text_emb is not None:
        texts = table.column("text").to_pylist() if "text" in table.column_names else [None] * len(ids)
        for i, t in enumerate(texts):
            if keep[i] and (not isinstance(t, str) or not t.strip()):
                bad(i, f"missing text (needed for text space '{text_space}')")
        vectors[text_space] = _embed_texts(text_emb, texts, keep)
    if image_space and clip_emb is not None:
        uris = table.column("uri").to_pylist() if "uri" in table.column_names else [None] * len(ids)
        vectors[image_space] = _embed_images(clip_emb, uris, keep, bad, base_dir, storage_options)

    rows = np.flatnonzero(keep)
    if not len(rows):
        return col
    out = table.take(pa.array(rows, pa.int64()))
    for space, vecs in vectors.items():
        out = out.append_column(spaces[space], _fixed_list(vecs[rows]))
    out_locs = [locs[i] for i in rows]

    if col is None:
        col = store.create_collection(collection, exist_ok=True)
    # Upsert; when the store rejects a row, report it and retry without it.
    while out.num_rows:
        try:
            col.upsert(out)
        except InvalidArgument as exc:
            row = exc.row
            if row is None or not 0 <= row < out.num_rows:
                for loc in out_locs:
                    report.bad.append({**loc, "reason": f"batch rejected by the store: {exc}"})
                return col
            report.bad.append({**out_locs[row], "reason": f"rejected by the store: {exc}"})
            mask = np.ones(out.num_rows, dtype=bool)
            mask[row] = False
            out = out.filter(pa.array(mask))
            out_locs = [loc for j, loc in enumerate(out_locs) if j != row]
            continue
        report.ingested += out.num_rows
        break
    return col


def _embed_texts(emb: TextEmbedder, texts: list[Any], keep: np.ndarray) -> np.ndarray:
    """Vectors for the kept rows (zeros elsewhere)."""
    rows = np.flatnonzero(keep)
    out = np.zeros((len(texts), emb.dim), dtype=np.float32)
    if len(rows):
        out[rows] = emb.embed([texts[i] for i in rows])
    return out


def _embed_images(emb: ClipEmbedder, uris: list[Any], keep: np.ndarray, bad: Any,
                  base_dir: Path, storage_options: Mapping[str, str] | None) -> np.ndarray:
    """Vectors for the kept rows; rows whose image cannot be read are reported bad. Images
    are opened one embedder batch at a time (so memory holds at most that many), through
    ``indexing.images``: local paths (relative to the source file's folder), ``file://``
    and ``s3://`` URIs, read by a few threads because object-store reads are latency bound."""
    out = np.zeros((len(uris), emb.dim), dtype=np.float32)
    rows = [int(i) for i in np.flatnonzero(keep)]
    step = max(1, emb.batch_size)
    for start in range(0, len(rows), step):
        wanted: list[int] = []
        for i in rows[start:start + step]:
            uri = uris[i]
            if not isinstance(uri, str) or not uri:
                bad(i, "missing uri (needed for the image space)")
            else:
                wanted.append(i)
        opened = open_images([uris[i] for i in wanted], base_dir=base_dir,
                             storage_options=storage_options)
        loaded: list[tuple[int, Any]] = []
        for i, (_, img) in zip(wanted, opened, strict=True):
            if isinstance(img, str):
                bad(i, img)
            else:
                loaded.append((i, img))
        if loaded:
            vecs = emb.embed_images([img for _, img in loaded])
            out[[i for i, _ in loaded]] = vecs
    return out


class _NoBar:
    def update(self, n: int) -> None:
        pass

    def set_postfix(self, **kw: Any) -> None:
        pass

    def close(self) -> None:
        pass


def _bar(total: int | None, desc: str) -> Any:
    from tqdm.auto import tqdm

    return tqdm(total=total, unit="rows", desc=desc, dynamic_ncols=True, smoothing=0.1)


def write_errors(report: IngestReport, path: str | os.PathLike[str]) -> None:
    """Write the bad rows, one JSON object a line."""
    with open(path, "w", encoding="utf-8") as fh:
        for row in report.bad:
            fh.write(json.dumps(row, default=str) + "\n")
