"""Export rows for labeling: CSV / JSON Lines with model pre-labels, COCO detection JSON,
per-box CSV / JSON Lines (:func:`export_objects`) and YOLO txt labels (:func:`export_yolo`).

Exports stream: rows are read from Lance in batches (only the needed columns, nested
prediction fields projected) and written batch by batch; COCO annotations are spooled to a
temporary file while the images are written, so memory stays bounded for any pool size.
A file is written under a temporary name next to ``path`` and renamed into place when
complete: a failed export never leaves a truncated file behind.

Which rows: ``ids`` (in the order given; duplicates written once; ids not in the collection
are counted in ``ExportReport.missing``), or ``where`` (an SQL filter, validated by the
store), or neither (the whole collection). ``version`` reads an older version or tag.

CSV / JSONL columns: ``id``, ``uri``, ``text``, ``label``, the requested user ``fields``,
and with a ``model`` its pre-label ``predicted`` (class name) and ``confidence``:

* classification: argmax of ``probs`` (or ``softmax(logits)``), confidence = its probability;
* detection: the most confident box; ``predicted`` is the argmax of that box's ``probs``
  (null when the box has none), ``confidence`` its score;
* no prediction: both null.

CSV round-trips nulls: every non-null string is quoted, a null is an empty unquoted field
(so ``""`` and null differ); :func:`read_export` reads it back that way.

COCO (:func:`export_coco`): one image per row (``id`` 1..N in export order, ``file_name``
= the row's ``uri`` or its id, ``assay_id`` = the row id, ``width``/``height`` when the uri
is a readable local image, omitted otherwise); categories are the model's classes with ids
``1..C`` in class order; one annotation per predicted box. Boxes are stored as corners
``x1, y1, x2, y2`` (see :data:`indexing.schema.PRED_BOX`); COCO wants ``bbox = [x, y, w,
h]`` = ``[x1, y1, x2 - x1, y2 - y1]`` and ``area = w * h``. Coordinates are written in the
units they were stored in (assay does not rescale; COCO tools expect pixels). A box's
``category_id`` is the argmax of its ``probs`` + 1; a box without ``probs`` gets
``category_id`` 0, a category named ``"unknown"`` that is listed only when used.

COCO of a segmentation model: the same images and categories; the annotations are the
pre-label mask of each row (``pred_<model>.mask_uri``: a PNG of class indices or a JSON file
of COCO RLE masks, :mod:`indexing.masks`), one annotation per class present in it, with
``segmentation`` = COCO RLE ``{"size": [h, w], "counts": [...]}`` (uncompressed: column-major
run lengths starting with zeros), ``bbox`` the mask's extent, ``area`` its pixel count,
``iscrowd`` 0, and the mask's ``height``/``width`` on the image when its own header gave
none. A row whose mask file is missing or remote keeps its image and gets no annotation
(counted in ``ExportReport.masks_missing``); a mask file that is not a mask of the model's
classes fails the export (InvalidArgument naming the row), before the file is in place.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import IO, Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv

from indexing import analytics
from indexing.analytics import stream
from indexing.errors import FailedPrecondition, InvalidArgument
from indexing.filters import ids_predicate
from indexing.masks import MaskError, mask_bbox, read_mask, rle_encode
from indexing.objects import OBJECT_SCHEMA, object_batches
from indexing.predictions import box_probs, prediction_probs
from indexing.schema import EMB_PREFIX, PRED_PREFIX, ModelSpec, is_user_scalar
from indexing.store import ID_CHUNK

FORMATS = ("csv", "jsonl")
BASE_EXPORT_COLUMNS = ("id", "uri", "text", "label")
PRELABEL_COLUMNS = ("predicted", "confidence")
UNKNOWN_CATEGORY = {"id": 0, "name": "unknown", "supercategory": "none"}

__all__ = ["ExportReport", "coco_boxes", "export_coco", "export_objects", "export_rows", "export_yolo",
           "read_export"]


@dataclass
class ExportReport:
    """What an export wrote: ``rows`` (CSV/JSONL rows, or COCO images), ``annotations``
    (COCO boxes or masks), ``missing`` (requested ids not in the collection), ``sized_images``
    (COCO images whose width/height could be read), ``masks_missing`` (segmentation rows
    whose ``mask_uri`` is set but names no readable local file)."""

    path: str
    format: str
    rows: int
    missing: int = 0
    annotations: int = 0
    sized_images: int = 0
    version: int | str | None = None
    seconds: float = 0.0
    masks_missing: int = 0


# -- row selection ---------------------------------------------------------------------------

def _entry_name(text: str) -> str:
    """A zip entry's file name from a uri's name or a row id (any user string): characters
    other than letters, digits, ``.``, ``_`` and ``-`` become ``_`` and leading dots go, so
    no entry can climb out of ``labels/`` when the zip is extracted (``..``, ``/``, ``\\``)."""
    safe = re.sub(r"[^A-Za-z0-9._-]", "_", text).lstrip(".")
    return safe[:200] or "_"


def _table(col: Any, version: int | str | None) -> Any:
    return col.table if version is None else col.at_version(version)


def _check_ids(ids: Sequence[str]) -> list[str]:
    if isinstance(ids, str):
        raise InvalidArgument("ids must be a sequence of id strings, not one string")
    out = list(dict.fromkeys(ids))  # dedupe, keep the order given
    if not all(isinstance(i, str) and i for i in out):
        raise InvalidArgument("ids must be non-empty strings")
    return out


def _coco_header(col: Any, what: str, version: int | str | None) -> str:
    """The opening of a COCO file, up to its image list: ``info`` naming the collection,
    ``what`` was exported and the version read."""
    info = {"description": f"assay export of collection '{col.name}', {what}",
            "version": str(version if version is not None else col.version),
            "date_created": datetime.now(UTC).isoformat()}
    return '{"info": ' + json.dumps(info) + ', "licenses": [], "images": ['


def _coco_footer(fh: IO[str], spool: IO[str], classes: Sequence[str], *, unknown: bool) -> None:
    """The rest of a COCO file after its image list: the annotations spooled meanwhile, then
    the categories (ids from 1 in the model's class order; the unknown one first if used)."""
    fh.write('], "annotations": [')
    spool.seek(0)
    shutil.copyfileobj(spool, fh)
    categories = [{"id": i + 1, "name": name, "supercategory": "none"} for i, name in enumerate(classes)]
    if unknown:
        categories.insert(0, UNKNOWN_CATEGORY)
    fh.write('], "categories": ' + json.dumps(categories, ensure_ascii=False) + "}")


def _rows(col: Any, projection: Mapping[str, str], *, ids: Sequence[str] | None, where: str | None,
          version: int | str | None, batch_size: int | None, missing: list[int]) -> Iterator[pa.RecordBatch]:
    """Batches of ``projection`` (which includes ``id``) for the selected rows. Validation
    happens before the first batch is asked for; ``missing[0]`` counts absent ids."""
    if ids is not None and where is not None:
        raise InvalidArgument("give ids or where, not both")
    batch_size = analytics.BATCH_ROWS if batch_size is None else batch_size
    if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
        raise InvalidArgument(f"batch_size must be a positive integer, got {batch_size!r}")
    if ids is None:
        return stream(col, projection, where, version=version, batch_size=batch_size)
    wanted = _check_ids(ids)
    table = _table(col, version)
    chunk = min(ID_CHUNK, batch_size)

    def by_ids() -> Iterator[pa.RecordBatch]:
        for s in range(0, len(wanted), chunk):
            part = wanted[s:s + chunk]
            found = (table.search().where(ids_predicate(part)).select(dict(projection))
                     .limit(None).to_arrow().combine_chunks())
            position = {v: i for i, v in enumerate(found.column("id").to_pylist())}
            order = [position[i] for i in part if i in position]
            missing[0] += len(part) - len(order)
            if order:
                yield from found.take(pa.array(order, pa.int64())).to_batches()

    return by_ids()


def _extra_fields(col: Any, fields: Sequence[str], version: int | str | None) -> list[str]:
    schema = _table(col, version).schema
    out = list(fields)
    for f in out:
        if not isinstance(f, str) or f not in schema.names:
            raise InvalidArgument(f"fields: unknown column {f!r} in collection '{col.name}'")
        if f in BASE_EXPORT_COLUMNS or f in PRELABEL_COLUMNS:
            raise InvalidArgument(f"fields: '{f}' is exported anyway (or is a pre-label column name)")
        if f.startswith((EMB_PREFIX, PRED_PREFIX)) or not is_user_scalar(schema.field(f).type):
            raise InvalidArgument(f"fields: column '{f}' has type {schema.field(f).type}; export scalar fields only")
    if len(set(out)) != len(out):
        raise InvalidArgument("fields: a column is repeated")
    return out


# -- pre-labels ------------------------------------------------------------------------------

def _prelabels(batch: pa.RecordBatch, spec: ModelSpec) -> tuple[pa.Array, pa.Array]:
    """(predicted class name, confidence) per row of ``batch`` (nulls where no prediction)."""
    n, c = batch.num_rows, spec.num_classes
    cls = np.full(n, -1, dtype=np.int64)
    conf = np.full(n, np.nan)
    if spec.task == "detection":
        boxes = batch.column("__boxes")
        flat = pc.list_flatten(boxes)
        has = np.zeros(n, dtype=bool)
        if len(flat):
            owner = np.asarray(pc.list_parent_indices(boxes).to_numpy(zero_copy_only=False), dtype=np.int64)
            scores = np.asarray(pc.struct_field(flat, "score").to_numpy(zero_copy_only=False), dtype=np.float64)
            order = np.lexsort((-scores, owner))  # per row, the most confident box first
            best = order[np.r_[True, np.diff(owner[order]) != 0]]
            rows = owner[best]
            has[rows] = True
            conf[rows] = scores[best]
            best_probs = pc.struct_field(flat, "probs").take(pa.array(best, pa.int64()))
            ok = ~np.asarray(best_probs.is_null().to_numpy(zero_copy_only=False), dtype=bool)
            if ok.any():
                values = pc.list_flatten(best_probs.filter(pa.array(ok))).to_numpy(zero_copy_only=False)
                cls[rows[ok]] = np.asarray(values, dtype=np.float64).reshape(-1, c).argmax(axis=1)
        conf_mask = ~has
    else:
        keep, p = prediction_probs(batch.column("__probs"), batch.column("__logits"), c,
                                   samples=batch.column("__samples"))
        cls[keep] = p.argmax(axis=1)
        conf[keep] = p.max(axis=1)
        conf_mask = np.ones(n, dtype=bool)
        conf_mask[keep] = False
    names = pa.array(list(spec.classes), pa.string()).take(pa.array(cls, mask=cls < 0))
    return names, pa.array(conf, pa.float64(), mask=conf_mask)


def _projection(fields: list[str], spec: ModelSpec | None) -> dict[str, str]:
    proj = {c: c for c in (*BASE_EXPORT_COLUMNS, *fields)}
    if spec is not None:
        if spec.task == "detection":
            proj["__boxes"] = f"{spec.column}.boxes"
        else:
            proj.update(__probs=f"{spec.column}.probs", __logits=f"{spec.column}.logits",
                        __samples=f"{spec.column}.samples")
    return proj


# -- writing ---------------------------------------------------------------------------------

@contextmanager
def _atomic(path: str | os.PathLike[str], mode: str) -> Iterator[IO[Any]]:
    """Open a temporary file next to ``path``; rename it to ``path`` only on success."""
    target = os.path.abspath(os.fspath(path))
    folder = os.path.dirname(target)
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(target)}.", suffix=".partial", dir=folder)
    try:
        with open(fd, mode, **({} if "b" in mode else {"encoding": "utf-8", "newline": ""})) as fh:
            yield fh
        os.replace(tmp, target)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _format_of(path: str | os.PathLike[str], fmt: str | None) -> str:
    if fmt is None:
        ext = os.path.splitext(os.fspath(path))[1].lower()
        fmt = {".csv": "csv", ".jsonl": "jsonl", ".ndjson": "jsonl"}.get(ext)
        if fmt is None:
            raise InvalidArgument(f"cannot tell the format of {os.fspath(path)!r}: pass format='csv' or 'jsonl'")
    if fmt not in FORMATS:
        raise InvalidArgument(f"format {fmt!r} is not one of {', '.join(FORMATS)}")
    return fmt


def _json_default(value: Any) -> Any:
    if isinstance(value, datetime):
        return value.isoformat()
    return str(value)


def export_rows(
    col: Any,
    path: str | os.PathLike[str],
    *,
    ids: Sequence[str] | None = None,
    where: str | None = None,
    format: str | None = None,  # noqa: A002 - the natural name
    model: str | None = None,
    fields: Sequence[str] = (),
    version: int | str | None = None,
    batch_size: int | None = None,
) -> ExportReport:
    """Write the selected rows to ``path`` as CSV or JSON Lines (format from the extension
    when not given), with ``model``'s pre-labels; see the module doc for the columns."""
    t0 = time.perf_counter()
    fmt = _format_of(path, format)
    spec = col.model(model) if model is not None else None
    extra = _extra_fields(col, fields, version)
    schema = _table(col, version).schema
    out_fields = [pa.field(c, pa.string()) for c in BASE_EXPORT_COLUMNS]
    out_fields += [pa.field(f, schema.field(f).type) for f in extra]
    if spec is not None:
        out_fields += [pa.field("predicted", pa.string()), pa.field("confidence", pa.float64())]
    out_schema = pa.schema(out_fields)
    missing = [0]
    batches = _rows(col, _projection(extra, spec), ids=ids, where=where, version=version,
                    batch_size=batch_size, missing=missing)
    rows = 0

    def shaped() -> Iterator[pa.RecordBatch]:
        for b in batches:
            arrays = [b.column(f.name) for f in out_fields[:len(BASE_EXPORT_COLUMNS) + len(extra)]]
            if spec is not None:
                arrays += list(_prelabels(b, spec))
            yield pa.record_batch(arrays, schema=out_schema)

    with _atomic(path, "wb" if fmt == "csv" else "w") as fh:
        if fmt == "csv":
            writer = pacsv.CSVWriter(fh, out_schema)
            for b in shaped():
                writer.write_batch(b)
                rows += b.num_rows
            writer.close()
        else:
            for b in shaped():
                fh.writelines(json.dumps(r, ensure_ascii=False, default=_json_default) + "\n"
                              for r in b.to_pylist())
                rows += b.num_rows
    return ExportReport(path=os.fspath(path), format=fmt, rows=rows, missing=missing[0], version=version,
                        seconds=time.perf_counter() - t0)


def _image_size(uri: str | None) -> tuple[int, int] | None:
    """(width, height) of a local image, reading only its header; None if unreadable."""
    if not uri:
        return None
    p = uri[len("file://"):] if uri.startswith("file://") else uri
    if "://" in p or not os.path.isfile(p):
        return None
    from PIL import Image

    try:
        with Image.open(p) as im:
            return int(im.width), int(im.height)
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError):
        return None


def export_coco(
    col: Any,
    model: str,
    path: str | os.PathLike[str],
    *,
    ids: Sequence[str] | None = None,
    where: str | None = None,
    min_score: float = 0.0,
    image_sizes: bool = True,
    version: int | str | None = None,
    batch_size: int | None = None,
) -> ExportReport:
    """Write the selected rows and ``model``'s predicted boxes (score >= ``min_score``) as a
    COCO detection JSON file; see the module doc for the mapping. Every selected row is an
    image, with or without boxes, so a labeling tool sees the whole batch."""
    t0 = time.perf_counter()
    spec = col.model(model)
    if spec.task == "segmentation":
        return _export_coco_masks(col, spec, path, ids=ids, where=where, image_sizes=image_sizes,
                                  version=version, batch_size=batch_size, t0=t0)
    if spec.task != "detection":
        raise FailedPrecondition(
            f"model '{spec.name}' is a classification model (no boxes or masks); export_rows writes its pre-labels"
        )
    try:
        min_score = float(min_score)
    except (TypeError, ValueError) as exc:
        raise InvalidArgument(f"min_score must be a number, got {min_score!r}") from exc
    if not 0.0 <= min_score <= 1.0:
        raise InvalidArgument(f"min_score must be in [0, 1], got {min_score}")
    missing = [0]
    batches = _rows(col, {"id": "id", "uri": "uri", "boxes": f"{spec.column}.boxes"}, ids=ids, where=where,
                    version=version, batch_size=batch_size, missing=missing)
    images = annotations = sized = 0
    unknown_used = False
    c = spec.num_classes
    with _atomic(path, "w") as fh, tempfile.TemporaryFile("w+", encoding="utf-8") as spool:
        fh.write(_coco_header(col, f"model '{spec.name}'", version))
        for b in batches:
            row_ids = b.column("id").to_pylist()
            uris = b.column("uri").to_pylist()
            if not row_ids:
                continue
            first_image = images + 1
            parts = []
            for rid, uri in zip(row_ids, uris, strict=True):
                images += 1
                img: dict[str, Any] = {"id": images, "file_name": uri if uri else rid, "assay_id": rid}
                size = _image_size(uri) if image_sizes else None
                if size is not None:
                    img["width"], img["height"] = size
                    sized += 1
                parts.append(json.dumps(img, ensure_ascii=False))
            fh.write(("," if first_image > 1 else "") + ",".join(parts))
            boxes = b.column("boxes")
            flat = pc.list_flatten(boxes)
            if len(flat) == 0:
                continue
            owner = np.asarray(pc.list_parent_indices(boxes).to_numpy(zero_copy_only=False), dtype=np.int64)
            coords = {k: np.asarray(pc.struct_field(flat, k).to_numpy(zero_copy_only=False), dtype=np.float64)
                      for k in ("x1", "y1", "x2", "y2", "score")}
            probs = pc.struct_field(flat, "probs")
            has_p = ~np.asarray(probs.is_null().to_numpy(zero_copy_only=False), dtype=bool)
            category = np.zeros(len(flat), dtype=np.int64)
            if has_p.any():
                _, p = box_probs(boxes, c)
                category[has_p] = p.argmax(axis=1) + 1
            sel = np.flatnonzero(coords["score"] >= min_score)
            unknown_used |= bool((category[sel] == 0).any())
            lines = []
            for j in sel:
                x, y = coords["x1"][j], coords["y1"][j]
                w, h = coords["x2"][j] - x, coords["y2"][j] - y
                annotations += 1
                lines.append(json.dumps({
                    "id": annotations, "image_id": first_image + int(owner[j]), "category_id": int(category[j]),
                    "bbox": [x, y, w, h], "area": w * h, "score": coords["score"][j], "iscrowd": 0,
                }))
            if lines:
                spool.write(("," if annotations > len(lines) else "") + ",".join(lines))
        _coco_footer(fh, spool, spec.classes, unknown=unknown_used)
    return ExportReport(path=os.fspath(path), format="coco", rows=images, missing=missing[0],
                        annotations=annotations, sized_images=sized, version=version,
                        seconds=time.perf_counter() - t0)


def _export_coco_masks(col: Any, spec: ModelSpec, path: str | os.PathLike[str], *, ids: Sequence[str] | None,
                       where: str | None, image_sizes: bool, version: int | str | None,
                       batch_size: int | None, t0: float) -> ExportReport:
    """COCO with a segmentation model's masks (``mask_uri``) as RLE annotations (module doc)."""
    missing = [0]
    batches = _rows(col, {"id": "id", "uri": "uri", "mask": f"{spec.column}.mask_uri"}, ids=ids, where=where,
                    version=version, batch_size=batch_size, missing=missing)
    images = annotations = sized = masks_missing = 0
    with _atomic(path, "w") as fh, tempfile.TemporaryFile("w+", encoding="utf-8") as spool:
        fh.write(_coco_header(col, f"segmentation model '{spec.name}'", version))
        for b in batches:
            parts, lines = [], []
            for rid, uri, mask_uri in zip(b.column("id").to_pylist(), b.column("uri").to_pylist(),
                                          b.column("mask").to_pylist(), strict=True):
                images += 1
                img: dict[str, Any] = {"id": images, "file_name": uri if uri else rid, "assay_id": rid}
                size = _image_size(uri) if image_sizes else None
                mask = None
                if mask_uri is not None:
                    try:
                        mask = read_mask(mask_uri, spec.classes)
                    except MaskError as exc:
                        raise InvalidArgument(f"row {rid!r}: {spec.column}.mask_uri {mask_uri!r} is not a mask of "
                                              f"model '{spec.name}': {exc}", field=f"{spec.column}.mask_uri") from None
                    masks_missing += mask is None
                if size is None and mask is not None:
                    size = (int(mask.shape[1]), int(mask.shape[0]))
                if size is not None:
                    img["width"], img["height"] = size
                    sized += 1
                parts.append(json.dumps(img, ensure_ascii=False))
                if mask is None:
                    continue
                for value in np.unique(mask[mask > 0]).tolist():
                    binary = mask == value
                    annotations += 1
                    lines.append(json.dumps({
                        "id": annotations, "image_id": images, "category_id": int(value),
                        "segmentation": rle_encode(binary), "area": int(binary.sum()),
                        "bbox": mask_bbox(binary), "iscrowd": 0,
                    }))
            if parts:
                fh.write(("," if images > len(parts) else "") + ",".join(parts))
            if lines:
                spool.write(("," if annotations > len(lines) else "") + ",".join(lines))
        _coco_footer(fh, spool, spec.classes, unknown=False)
    return ExportReport(path=os.fspath(path), format="coco", rows=images, missing=missing[0],
                        annotations=annotations, sized_images=sized, version=version,
                        seconds=time.perf_counter() - t0, masks_missing=masks_missing)


# -- reading back ----------------------------------------------------------------------------

def read_export(path: str | os.PathLike[str], *, format: str | None = None,  # noqa: A002
                types: Mapping[str, pa.DataType] | None = None) -> list[dict[str, Any]]:
    """Rows of a CSV / JSONL export as dicts (nulls as None). In CSV, the export's own
    columns come back as strings (``confidence`` as float); user fields as Arrow infers
    them unless ``types`` names their type."""
    fmt = _format_of(path, format)
    if fmt == "jsonl":
        with open(path, encoding="utf-8") as fh:
            return [json.loads(line) for line in fh if line.strip()]
    column_types: dict[str, pa.DataType] = {c: pa.string() for c in (*BASE_EXPORT_COLUMNS, "predicted")}
    column_types["confidence"] = pa.float64()
    column_types.update(types or {})
    table = pacsv.read_csv(
        os.fspath(path),
        convert_options=pacsv.ConvertOptions(column_types=column_types, strings_can_be_null=True,
                                             quoted_strings_can_be_null=False),
    )
    return table.to_pylist()


def coco_boxes(path: str | os.PathLike[str]) -> dict[str, list[dict[str, Any]]]:
    """The boxes of a COCO export back in assay's form, per row id: ``x1, y1, x2, y2``
    (= ``x, y, x + w, y + h``), ``score`` and ``label`` (category name; None for the
    'unknown' category), in file order."""
    with open(path, encoding="utf-8") as fh:
        doc = json.load(fh)
    names = {c["id"]: (None if c["id"] == UNKNOWN_CATEGORY["id"] else c["name"]) for c in doc["categories"]}
    image_row = {img["id"]: img.get("assay_id", img["file_name"]) for img in doc["images"]}
    out: dict[str, list[dict[str, Any]]] = {rid: [] for rid in image_row.values()}
    for a in doc["annotations"]:
        x, y, w, h = a["bbox"]
        out[image_row[a["image_id"]]].append({"x1": x, "y1": y, "x2": x + w, "y2": y + h, "score": a.get("score"),
                                              "label": names[a["category_id"]]})
    return out


# -- per box ---------------------------------------------------------------------------------

OBJECT_FORMATS = ("objects_csv", "objects_jsonl")


def _object_parts(col: Any, table: Any, *, ids: Sequence[str] | None, where: str | None,
                  objects_where: str | None, source: str | None, missing: list[int]) -> Iterator[pa.Table]:
    """Object rows (indexing.objects) of the selected images, chunk by chunk."""
    if ids is not None and where is not None:
        raise InvalidArgument("give ids or where, not both")
    if ids is None:
        yield from object_batches(table, where, objects_where, source=source)
        return
    wanted = _check_ids(ids)
    for s in range(0, len(wanted), ID_CHUNK):
        part = ids_predicate(wanted[s:s + ID_CHUNK])
        missing[0] += len(wanted[s:s + ID_CHUNK]) - table.count_rows(part)
        yield from object_batches(table, part, objects_where, source=source)


def export_objects(
    col: Any,
    path: str | os.PathLike[str],
    *,
    format: str,  # noqa: A002 - the natural name
    ids: Sequence[str] | None = None,
    where: str | None = None,
    objects_where: str | None = None,
    source: str | None = None,
    version: int | str | None = None,
) -> ExportReport:
    """One line per box (the object rows of :mod:`indexing.objects`: ``id``, ``source``,
    ``box``, ``class``, ``score``, ``probs``, ``x1``..``y2``, ``width``, ``height``,
    ``area``) of the selected images, keeping the boxes of ``source`` (default every source)
    that match ``objects_where``: ``objects_csv`` (``probs`` as a JSON list) or
    ``objects_jsonl``. ``rows`` = boxes written."""
    if format not in OBJECT_FORMATS:
        raise InvalidArgument(f"format {format!r} is not one of {', '.join(OBJECT_FORMATS)}")
    t0 = time.perf_counter()
    table = col.read_table(version, where)  # box clauses: expanded and read on one version
    missing = [0]
    rows = 0
    with _atomic(path, "wb" if format == "objects_csv" else "w") as fh:
        writer = None
        for part in _object_parts(col, table, ids=ids, where=where, objects_where=objects_where,
                                  source=source, missing=missing):
            if format == "objects_jsonl":
                fh.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in part.to_pylist())
            else:
                probs = pa.array([None if p is None else json.dumps(p) for p in part.column("probs").to_pylist()],
                                 pa.string())
                part = part.set_column(part.column_names.index("probs"), "probs", probs)
                if writer is None:
                    writer = pacsv.CSVWriter(fh, part.schema)
                writer.write_table(part)
            rows += part.num_rows
        if format == "objects_csv":
            if writer is None:  # no box: a header only
                schema = OBJECT_SCHEMA.set(OBJECT_SCHEMA.get_field_index("probs"), pa.field("probs", pa.string()))
                writer = pacsv.CSVWriter(fh, schema)
            writer.close()
    return ExportReport(path=os.fspath(path), format=format, rows=rows, annotations=rows, missing=missing[0],
                        version=version, seconds=time.perf_counter() - t0)


def export_yolo(
    col: Any,
    model: str,
    path: str | os.PathLike[str],
    *,
    ids: Sequence[str] | None = None,
    where: str | None = None,
    objects_where: str | None = None,
    min_score: float = 0.0,
    version: int | str | None = None,
) -> ExportReport:
    """YOLO txt labels of ``model``'s boxes, as one zip: ``classes.txt`` (the model's
    classes, one per line: line ``k`` is class index ``k``) and ``labels/<name>.txt`` per
    selected image (``<name>`` = the uri's file name without its extension, else the id; an
    image without boxes gets an empty file, YOLO's negative). Each line is ``class x_center
    y_center width height`` with coordinates divided by the image's width and height (read
    from the image header at its local uri; an image whose size cannot be read is refused
    naming its id). Boxes without probs (no class), scoring below ``min_score`` or not
    matching ``objects_where`` are left out. ``rows`` = images, ``annotations`` = lines."""
    import zipfile

    t0 = time.perf_counter()
    spec = col.model(model)
    if spec.task != "detection":
        raise InvalidArgument(f"a YOLO export needs a detection model; '{model}' is a {spec.task} model")
    version = col.version if version is None else version  # rows and boxes from one version
    table = _table(col, version)
    index = {c: i for i, c in enumerate(spec.classes)}
    missing = [0]
    images = lines = 0
    with _atomic(path, "wb") as fh, zipfile.ZipFile(fh, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("classes.txt", "".join(c + "\n" for c in spec.classes))
        batches = _rows(col, {"id": "id", "uri": "uri"}, ids=ids, where=where, version=version,
                        batch_size=None, missing=missing)
        names: set[str] = set()
        for batch in batches:
            chunk_ids = batch.column("id").to_pylist()
            boxes: dict[str, list[dict[str, Any]]] = {}
            for part in object_batches_for(table, chunk_ids, objects_where, model):
                for r in part.to_pylist():
                    boxes.setdefault(r["id"], []).append(r)
            for row_id, uri in zip(chunk_ids, batch.column("uri").to_pylist(), strict=True):
                size = _image_size(uri)
                if size is None:
                    raise FailedPrecondition(
                        f"row {row_id!r}: the size of image {uri!r} cannot be read (a local image file is "
                        "needed); YOLO labels are divided by the image's width and height")
                w, h = size
                name = _entry_name(os.path.splitext(os.path.basename(uri))[0] if uri else row_id)
                if name in names:  # two images of the same file name: keep both apart
                    name = _entry_name(f"{name}__{row_id}")
                n = 2
                while name in names:
                    name, n = _entry_name(f"{name}_{n}"), n + 1
                names.add(name)
                out = []
                for b in boxes.get(row_id, []):
                    if b["class"] is None or b["score"] < min_score:
                        continue
                    out.append(f"{index[b['class']]} {(b['x1'] + b['x2']) / 2 / w:.6f} "
                               f"{(b['y1'] + b['y2']) / 2 / h:.6f} {b['width'] / w:.6f} {b['height'] / h:.6f}\n")
                zf.writestr(f"labels/{name}.txt", "".join(out))
                images += 1
                lines += len(out)
    return ExportReport(path=os.fspath(path), format="yolo", rows=images, annotations=lines, missing=missing[0],
                        version=version, seconds=time.perf_counter() - t0)


def object_batches_for(table: Any, ids: Sequence[str], objects_where: str | None, source: str) -> Iterator[pa.Table]:
    """The object rows of ``source`` of the images ``ids`` (matching ``objects_where``)."""
    for s in range(0, len(ids), ID_CHUNK):
        yield from object_batches(table, ids_predicate(ids[s:s + ID_CHUNK]), objects_where, source=source)
