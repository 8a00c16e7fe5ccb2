"""Labels back from a labeling tool: read a Label Studio JSON export, a CVAT export ("CVAT
for images 1.1" XML) or a COCO file, match its items to the collection's rows, and work
out the ``label`` / ``gt_boxes`` to write. Pure (standard library, NumPy, Arrow): the
calls to the server are :meth:`service.client.sync.Collection.import_labels`'.

What each format gives:

* **Label Studio** (Project → Export → JSON, or ``GET /api/projects/<id>/export?exportType=JSON``):
  per task, the annotation that counts — a ``ground_truth`` one, else the most recently
  updated; cancelled (skipped) ones never — gives ``label`` (a ``choices`` result: its
  first choice) and boxes (``rectanglelabels`` results: percent of the image, converted to
  pixels with the result's ``original_width``/``original_height``, else the task's
  ``assay_width``/``assay_height``; a rotated box becomes the axis-aligned box around it).
  Tasks without an annotation are counted as not annotated, not as errors.
* **CVAT for images 1.1** (XML): per ``<image>``, a ``<tag>`` gives ``label``, ``<box>``
  elements (``xtl ytl xbr ybr`` pixels, ``rotation`` about the centre) give boxes.
* **COCO**: per image, its annotations' ``bbox`` (``[x, y, w, h]`` pixels) and category
  names give boxes.

When a file holds boxes at all, an item with none gets ``gt_boxes = []`` (the annotator saw
no object); otherwise ``gt_boxes`` is left as it is, and so is ``label`` for items that
carry no class.

Matching, in order: the row id the file carries (``data.assay_id`` of the tasks assay
exported, ``assay_id`` of COCO images assay exported); else the item's image name or URL
equal to a row's ``uri``; else the same file name (the last path part, ignoring the
``xxxxxxxx__`` prefix Label Studio gives files it uploaded, and Label Studio's
``/data/local-files/?d=`` form), when exactly one row has it; else a row whose id is that
name. Items that match nothing, or several rows, are reported with the reason and nothing
is written for them. An import writes only rows whose label or boxes change, so importing
the same file again changes nothing (``changed`` 0).
"""

from __future__ import annotations

import json
import math
import os
import re
import xml.etree.ElementTree as ET
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

import numpy as np
import pyarrow as pa

from service.client.errors import invalid

__all__ = ["FORMATS", "LabelImport", "LabelRecord", "labels_format", "read_labels"]

FORMATS = ("label-studio", "cvat", "coco")
GT_BOX = pa.struct([("x1", pa.float32()), ("y1", pa.float32()), ("x2", pa.float32()),
                    ("y2", pa.float32()), ("label", pa.string())])
_LS_UPLOAD_PREFIX = re.compile(r"^[0-9a-f]{8}__")


@dataclass
class LabelRecord:
    """One item of a labeling tool's export: where it came from (``source``, for reports),
    how to find its row (``assay_id``, ``names``), and what it says (``label``, ``boxes``:
    None = says nothing about it). ``problem``: why nothing can be taken from it."""

    source: str
    assay_id: str | None = None
    names: tuple[str, ...] = ()
    label: str | None = None
    boxes: list[dict[str, Any]] | None = None
    annotated: bool = True
    problem: str | None = None


def labels_format(path: str | os.PathLike[str], format: str | None = None) -> str:  # noqa: A002
    """The export's format: given, ``.xml`` = CVAT, ``.json`` = Label Studio (a list of
    tasks) or COCO (an object with ``images``), decided by reading its first character."""
    if format is not None:
        if format not in FORMATS:
            raise invalid(f"import format {format!r} is not one of {', '.join(FORMATS)}")
        return format
    p = os.fspath(path)
    if p.lower().endswith(".xml"):
        return "cvat"
    if p.lower().endswith(".json"):
        with open(p, encoding="utf-8") as fh:
            head = fh.read(4096).lstrip()
        return "label-studio" if head.startswith("[") else "coco"
    raise invalid(f"cannot tell the format of {p!r}: name it .json (Label Studio or COCO) or .xml (CVAT), "
                  "or pass format=")


def read_labels(path: str | os.PathLike[str], format: str | None = None) -> tuple[str, list[LabelRecord]]:  # noqa: A002
    """(format, records) of a labeling tool's export file."""
    fmt = labels_format(path, format)
    try:
        if fmt == "cvat":
            records = read_cvat(path)
        else:
            with open(path, encoding="utf-8") as fh:
                try:
                    doc = json.load(fh)
                except json.JSONDecodeError as exc:
                    raise invalid(f"{os.fspath(path)}: not JSON ({exc})") from None
            records = read_label_studio(doc) if fmt == "label-studio" else read_coco(doc)
    except (KeyError, TypeError, ValueError, AttributeError, IndexError) as exc:
        # a malformed item: say so before anything is written (imports write in batches)
        raise invalid(f"{os.fspath(path)} is not a well-formed {fmt} export: {type(exc).__name__}: {exc} "
                      "(export it again from the tool, or pass the right format=)") from None
    for rec in records:
        bad = _bad_box(rec.boxes)
        if bad is not None:
            rec.boxes, rec.problem = None, bad
    return fmt, records


def _bad_box(boxes: list[dict[str, Any]] | None) -> str | None:
    """Why a box of ``boxes`` cannot be stored (the server refuses it), else None."""
    for i, b in enumerate(boxes or ()):
        try:
            x1, y1, x2, y2 = (float(b[k]) for k in ("x1", "y1", "x2", "y2"))
        except (KeyError, TypeError, ValueError):
            return f"box {i}: x1, y1, x2, y2 must be numbers"
        if not all(math.isfinite(v) for v in (x1, y1, x2, y2)) or x2 < x1 or y2 < y1:
            return f"box {i}: coordinates must be finite with x2 >= x1 and y2 >= y1"
    return None


# -- the formats ----------------------------------------------------------------------------

def _aabb(x: float, y: float, w: float, h: float, degrees: float, about: tuple[float, float]) -> tuple[float, ...]:
    """The axis-aligned box around a ``w`` x ``h`` box at ``(x, y)`` rotated by ``degrees``
    (clockwise, image coordinates) about ``about``."""
    if not degrees:
        return x, y, x + w, y + h
    t = math.radians(degrees)
    c, s = math.cos(t), math.sin(t)
    ox, oy = about
    xs, ys = [], []
    for px, py in ((x, y), (x + w, y), (x + w, y + h), (x, y + h)):
        dx, dy = px - ox, py - oy
        xs.append(ox + dx * c - dy * s)
        ys.append(oy + dx * s + dy * c)
    return min(xs), min(ys), max(xs), max(ys)


def _annotation(task: Mapping[str, Any]) -> Mapping[str, Any] | None:
    """The annotation of a task that counts (see the module docstring)."""
    kept = [a for a in task.get("annotations") or [] if not a.get("was_cancelled")]
    if not kept:
        return None
    return max(kept, key=lambda a: (bool(a.get("ground_truth")), str(a.get("updated_at") or a.get("created_at") or ""),
                                    a.get("id") or 0))


def _ls_names(data: Mapping[str, Any]) -> tuple[str, ...]:
    names = [data.get("uri"), data.get("image")]
    return tuple(n for n in names if isinstance(n, str) and n)


def read_label_studio(doc: Any) -> list[LabelRecord]:
    """Records of a Label Studio JSON export (a list of tasks)."""
    if not isinstance(doc, list):
        raise invalid("a Label Studio export is a JSON list of tasks (export type JSON)")
    has_boxes = any(r.get("type") == "rectanglelabels"
                    for t in doc if isinstance(t, Mapping)
                    for a in [*(t.get("annotations") or []), *(t.get("predictions") or [])] if isinstance(a, Mapping)
                    for r in a.get("result") or [] if isinstance(r, Mapping))
    out = []
    for n, task in enumerate(doc):
        if not isinstance(task, Mapping) or not isinstance(task.get("data"), Mapping):
            out.append(LabelRecord(source=f"item {n}", problem="not a Label Studio task (no 'data')"))
            continue
        data = task["data"]
        rec = LabelRecord(source=f"task {task.get('id', n)}", assay_id=data.get("assay_id") or None,
                          names=_ls_names(data))
        ann = _annotation(task)
        if ann is None:
            rec.annotated = False
            out.append(rec)
            continue
        boxes: list[dict[str, Any]] = []
        for r in ann.get("result") or []:
            kind, value = r.get("type"), r.get("value") or {}
            if kind == "choices" and value.get("choices") and rec.label is None:
                rec.label = str(value["choices"][0])
            elif kind == "rectanglelabels":
                w = r.get("original_width") or data.get("assay_width")
                h = r.get("original_height") or data.get("assay_height")
                if not w or not h:
                    rec.problem = ("a box without the image size (no original_width/original_height, "
                                   "no assay_width/assay_height)")
                    break
                x, y = value["x"] * w / 100.0, value["y"] * h / 100.0
                bw, bh = value["width"] * w / 100.0, value["height"] * h / 100.0
                x1, y1, x2, y2 = _aabb(x, y, bw, bh, float(value.get("rotation") or 0), (x, y))
                labels = value.get("rectanglelabels") or []
                boxes.append({"x1": x1, "y1": y1, "x2": x2, "y2": y2, "label": str(labels[0]) if labels else None})
        if has_boxes and rec.problem is None:
            rec.boxes = boxes
        out.append(rec)
    return out


def read_cvat(path: str | os.PathLike[str]) -> list[LabelRecord]:
    """Records of a "CVAT for images 1.1" XML export."""
    try:
        root = ET.parse(os.fspath(path)).getroot()
    except ET.ParseError as exc:
        raise invalid(f"{os.fspath(path)}: not XML ({exc})") from None
    if root.tag != "annotations":
        raise invalid(f"{os.fspath(path)}: a CVAT export's root element is <annotations>, not <{root.tag}>")
    if root.find("track") is not None:
        raise invalid("CVAT video tracks are not supported: export the task as 'CVAT for images 1.1'")
    images = root.findall("image")
    has_boxes = any(img.find("box") is not None for img in images)
    out = []
    for img in images:
        name = img.get("name") or ""
        rec = LabelRecord(source=f"image {name!r}", names=(name,) if name else ())
        tag = img.find("tag")
        if tag is not None and tag.get("label"):
            rec.label = tag.get("label")
        boxes = []
        for b in img.findall("box"):
            try:
                xtl, ytl, xbr, ybr = (float(b.get(k, "nan")) for k in ("xtl", "ytl", "xbr", "ybr"))
                rot = float(b.get("rotation") or 0)
            except ValueError:
                rec.problem = "a box with coordinates that are not numbers"
                break
            if any(math.isnan(v) for v in (xtl, ytl, xbr, ybr)):
                rec.problem = "a box without xtl/ytl/xbr/ybr"
                break
            x1, y1, x2, y2 = _aabb(xtl, ytl, xbr - xtl, ybr - ytl, rot, ((xtl + xbr) / 2, (ytl + ybr) / 2))
            boxes.append({"x1": x1, "y1": y1, "x2": x2, "y2": y2, "label": b.get("label")})
        if has_boxes and rec.problem is None:
            rec.boxes = boxes
        rec.annotated = rec.label is not None or rec.boxes is not None
        out.append(rec)
    return out


def read_coco(doc: Any) -> list[LabelRecord]:
    """Records of a COCO detection file: one per image, with its boxes."""
    if not isinstance(doc, Mapping) or not isinstance(doc.get("images"), list):
        raise invalid("a COCO file is a JSON object with 'images', 'annotations' and 'categories'")
    names = {c["id"]: c.get("name") for c in doc.get("categories") or [] if isinstance(c, Mapping) and "id" in c}
    boxes: dict[Any, list[dict[str, Any]]] = {}
    bad: dict[Any, str] = {}
    for a in doc.get("annotations") or []:
        bbox = a.get("bbox") if isinstance(a, Mapping) else None
        if not isinstance(bbox, list) or len(bbox) != 4:
            if isinstance(a, Mapping):
                bad[a.get("image_id")] = f"annotation {a.get('id')} has no [x, y, w, h] bbox"
            continue
        x, y, w, h = (float(v) for v in bbox)
        boxes.setdefault(a.get("image_id"), []).append(
            {"x1": x, "y1": y, "x2": x + w, "y2": y + h, "label": names.get(a.get("category_id"))})
    out = []
    for img in doc["images"]:
        file_name = str(img.get("file_name") or "")
        rec = LabelRecord(source=f"image {img.get('id')} ({file_name!r})", assay_id=img.get("assay_id") or None,
                          names=(file_name,) if file_name else (), boxes=boxes.get(img.get("id"), []),
                          problem=bad.get(img.get("id")))
        out.append(rec)
    return out


# -- matching and what to write ---------------------------------------------------------------

def file_name(name: str) -> str:
    """The file name a uri or URL names: its last path part, Label Studio's local-file
    ``?d=`` parameter understood and its upload prefix ``xxxxxxxx__`` dropped."""
    s = name[len("file://"):] if name.startswith("file://") else name
    if "?" in s:
        query = parse_qs(urlsplit(s).query)
        s = query["d"][0] if query.get("d") else urlsplit(s).path
    base = unquote(s.rstrip("/").rsplit("/", 1)[-1])
    return _LS_UPLOAD_PREFIX.sub("", base)


def _same_boxes(a: list[dict[str, Any]] | None, b: list[dict[str, Any]] | None) -> bool:
    """Equal box lists (coordinates as float32 store them); null (not known) differs from
    [] (no objects)."""
    if a is None or b is None:
        return a is None and b is None
    if len(a) != len(b):
        return False
    for x, y in zip(a, b, strict=True):
        if x.get("label") != y.get("label"):
            return False
        got = np.float32([x[k] for k in ("x1", "y1", "x2", "y2")])
        want = np.float32([y[k] for k in ("x1", "y1", "x2", "y2")])
        if not np.allclose(got, want, rtol=1e-6, atol=1e-4):
            return False
    return True


@dataclass
class LabelImport:
    """The matching of one file's records to rows, fed by the caller's reads of the
    collection (:meth:`found`, :meth:`scanned`), and the rows to write (:meth:`changes`)."""

    format: str
    records: list[LabelRecord]
    rows: dict[str, dict[str, Any]] = field(default_factory=dict)  # id -> current label/gt_boxes/uri
    matched: dict[int, str] = field(default_factory=dict)  # record index -> row id
    unmatched: dict[int, str] = field(default_factory=dict)  # record index -> reason
    _by_name: dict[str, list[str]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for i, r in enumerate(self.records):
            if r.problem is not None:
                self.unmatched[i] = r.problem
            elif not r.annotated:
                continue
            elif r.assay_id is None and not r.names:
                self.unmatched[i] = "nothing to match it by (no assay_id, no image name)"

    def _open(self) -> list[int]:
        return [i for i, r in enumerate(self.records)
                if r.annotated and i not in self.matched and i not in self.unmatched]

    @property
    def wanted_ids(self) -> list[str]:
        """Row ids the records name, to look up first."""
        return sorted({self.records[i].assay_id for i in self._open() if self.records[i].assay_id})

    @property
    def wanted_uris(self) -> list[str]:
        """Names of records not matched yet, to try as exact uris."""
        return sorted({n for i in self._open() for n in self.records[i].names})

    def found(self, table: pa.Table, by: str) -> None:
        """Rows (``id, uri, label, gt_boxes``) the collection holds for ``wanted_ids``
        (``by="id"``) or ``wanted_uris`` (``by="uri"``); matches what they name."""
        index: dict[str, list[str]] = {}
        for row in table.to_pylist():
            self.rows[row["id"]] = row
            index.setdefault(row["id"] if by == "id" else row.get("uri") or "", []).append(row["id"])
        for i in self._open():
            r = self.records[i]
            keys = [r.assay_id] if by == "id" else list(r.names)
            hits = sorted({h for k in keys if k for h in index.get(k, [])})
            if len(hits) == 1:
                self.matched[i] = hits[0]
            elif len(hits) > 1:
                self.unmatched[i] = f"its uri is the uri of {len(hits)} rows ({', '.join(hits[:3])}...)"

    @property
    def needs_scan(self) -> bool:
        """Whether records are left to match by file name (a scan of the ids and uris)."""
        return bool(self._open())

    def scanned(self, table: pa.Table) -> None:
        """One page of ``id, uri`` of the whole collection, for matching by file name."""
        for rid, uri in zip(table.column("id").to_pylist(), table.column("uri").to_pylist(), strict=True):
            if uri:
                self._by_name.setdefault(file_name(uri), []).append(rid)
            self._by_name.setdefault("\0id:" + rid, []).append(rid)

    def match_scanned(self) -> list[str]:
        """Match the open records by file name (then by id = name); returns the ids whose
        current values must be read before :meth:`changes`."""
        need = set()
        for i in self._open():
            r = self.records[i]
            by_file = sorted({h for n in r.names for h in self._by_name.get(file_name(n), [])})
            if len(by_file) > 1:
                self.unmatched[i] = (f"{len(by_file)} rows have the file name "
                                     f"{file_name(r.names[0])!r} ({', '.join(by_file[:3])}...)")
                continue
            hits = by_file or sorted({h for n in r.names for h in self._by_name.get("\0id:" + n, [])})
            if len(hits) == 1:
                self.matched[i] = hits[0]
                if hits[0] not in self.rows:
                    need.add(hits[0])
            else:
                name = r.names[0] if r.names else r.assay_id
                self.unmatched[i] = (f"no row has id {r.assay_id!r}" if r.assay_id and not r.names
                                     else f"no row has the uri or file name {name!r}")
        return sorted(need)

    def finish_unmatched(self) -> None:
        for i in self._open():
            r = self.records[i]
            self.unmatched[i] = f"no row has id {r.assay_id!r}" if r.assay_id else "no row matches it"

    def changes(self) -> tuple[pa.Table | None, dict[str, Any]]:
        """(the rows to upsert: ``id`` and the ``label`` / ``gt_boxes`` columns some record
        sets, or None when nothing changes; counts for the report)."""
        final: dict[str, int] = {}
        duplicates = 0
        for i, rid in sorted(self.matched.items()):
            if rid in final:
                duplicates += 1
            final[rid] = i  # the last item naming a row wins
        sets_label = any(self.records[i].label is not None for i in final.values())
        sets_boxes = any(self.records[i].boxes is not None for i in final.values())
        ids, labels, boxes = [], [], []
        unchanged = 0
        for rid, i in final.items():
            r, cur = self.records[i], self.rows.get(rid, {})
            new_label = r.label if r.label is not None else cur.get("label")
            new_boxes = r.boxes if r.boxes is not None else cur.get("gt_boxes")
            if new_label == cur.get("label") and (r.boxes is None or _same_boxes(new_boxes, cur.get("gt_boxes"))):
                unchanged += 1
                continue
            ids.append(rid)
            labels.append(new_label)
            boxes.append(None if new_boxes is None else [
                {k: b.get(k) for k in ("x1", "y1", "x2", "y2", "label")} for b in new_boxes])
        counts = {"matched": len(final), "duplicates": duplicates, "changed": len(ids), "unchanged": unchanged,
                  "labels": sum(1 for i in final.values() if self.records[i].label is not None),
                  "boxes": sum(len(self.records[i].boxes or []) for i in final.values())}
        if not ids:
            return None, counts
        columns: dict[str, pa.Array] = {"id": pa.array(ids, pa.string())}
        if sets_label:
            columns["label"] = pa.array(labels, pa.string())
        if sets_boxes:
            columns["gt_boxes"] = pa.array(boxes, pa.list_(GT_BOX))
        return pa.table(columns), counts

    def report(self, counts: Mapping[str, Any], path: str, dry_run: bool, version: int | None) -> dict[str, Any]:
        return {
            "path": path, "format": self.format, "items": len(self.records),
            "not_annotated": sum(1 for r in self.records if not r.annotated and r.problem is None),
            **counts,
            "unmatched": [{"item": self.records[i].source, "reason": reason}
                          for i, reason in sorted(self.unmatched.items())],
            "dry_run": dry_run, "version": version,
        }


def chunks(values: list[str], size: int = 500) -> Iterable[list[str]]:
    for s in range(0, len(values), size):
        yield values[s:s + size]
