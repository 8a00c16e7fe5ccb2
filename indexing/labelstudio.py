"""Export rows as Label Studio tasks with pre-annotations, and the labeling config to match.

One task per selected row (streamed in batches, written to a temporary file renamed into
place when complete, like every export):

    {"data": {"image": <url>, "assay_id": <id>, "uri": <uri>, "assay_width": W, "assay_height": H},
     "predictions": [{"model_version": "assay:<model>", "score": <confidence>, "result": [...]}]}

``data.text`` instead of ``data.image`` for text rows (rows without a ``uri`` but with
``text``). ``assay_id`` is how :mod:`service.client.labeling` matches the tasks of a Label
Studio export back to rows. Image URLs: the row's ``uri`` as it is, or ``image_url``, a
template with ``{uri}``, ``{path}`` (the uri without ``file://``), ``{name}`` (its last
part) and ``{id}`` — e.g. ``"/data/local-files/?d=images/{name}"`` for Label Studio's
local-file serving, or ``"https://cdn.example.com/{name}"``.

Pre-annotations (Label Studio's ``predictions``), with a model:

* classification — a ``choices`` result: the model's top class; the prediction's ``score``
  is its probability (Label Studio sorts tasks by it: the least sure first);
* detection — one ``rectanglelabels`` result per box scoring at least ``min_score``, its
  class the argmax of the box's ``probs``; Label Studio wants coordinates in percent of the
  image, so the image's size is needed: ``width``/``height`` fields of the row when present,
  else read from the local image file's header; rows whose size cannot be had get no boxes
  (counted in the report). Stored boxes are pixels (``x1, y1, x2, y2``);
* segmentation — ``mask_field`` names a column holding, per row, the path of a PNG of class
  indices (``0`` = nothing, ``k`` = the model's class ``k - 1``): one ``brushlabels`` result
  per class present, as Label Studio's brush RLE (:func:`brush_rle`). Without
  ``mask_field``, a segmentation model's own pre-label masks (``pred_<model>.mask_uri``: a
  PNG or a JSON file of COCO RLE masks, :func:`indexing.masks.read_mask`) are used; one that
  is there but is not a mask of the model's classes fails the export naming the row;
* text — rows with ``text``: the text is the task, classification as above.

The labeling config (:func:`label_config`) has the object (``<Image name="image">`` or
``<Text name="text">``), a ``<Choices name="label">`` of the classes, and
``<RectangleLabels name="box">`` / ``<BrushLabels name="mask">`` when there are boxes or
masks. Names match the ``from_name``/``to_name`` of the predictions, so Label Studio shows
them as editable pre-annotations.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterable, Sequence
from typing import Any
from xml.sax.saxutils import quoteattr

import numpy as np
import pyarrow as pa

from indexing.errors import InvalidArgument
from indexing.export import ExportReport, _atomic, _image_size, _rows
from indexing.masks import MaskError, read_mask
from indexing.predictions import prediction_probs

__all__ = ["brush_rle", "export_label_studio", "label_config", "rle_values"]

# Label Studio's brush RLE: a bit stream of a 32-bit count, the word size - 1 (5 bits), four
# run-length field sizes - 1 (4 bits each), then blocks; each block is a flag bit (1: one
# value repeated, 0: literal values), 2 bits choosing a run-length field size, the block
# length - 1 in that many bits, then one value (repeat) or `length` values (literal), each
# `word size` bits. The stream is padded with zero bits to whole bytes.
_RLE_WORD = 8
_RLE_SIZES = (3, 4, 8, 16)


def _bits(value: int, width: int) -> str:
    return format(value, f"0{width}b")


def rle_values(values: np.ndarray) -> list[int]:
    """Label Studio brush RLE bytes of ``values`` (uint8, flattened RGBA), encoded as runs
    only: each run of equal values is one repeat block (split at 65,536)."""
    v = np.asarray(values, dtype=np.uint8).ravel()
    n = len(v)
    parts = [_bits(n, 32), _bits(_RLE_WORD - 1, 5), "".join(_bits(s - 1, 4) for s in _RLE_SIZES)]
    if n:
        starts = np.flatnonzero(np.r_[True, v[1:] != v[:-1]])
        lengths = np.diff(np.r_[starts, n])
        for start, length in zip(starts.tolist(), lengths.tolist(), strict=True):
            value = _bits(int(v[start]), _RLE_WORD)
            while length > 0:
                block = min(length, 1 << _RLE_SIZES[-1])
                size_index = next(i for i, s in enumerate(_RLE_SIZES) if block - 1 < (1 << s))
                parts.append("1" + _bits(size_index, 2) + _bits(block - 1, _RLE_SIZES[size_index]) + value)
                length -= block
    stream = "".join(parts)
    stream += "0" * (-len(stream) % 8)
    return list(int(stream[i:i + 8], 2).to_bytes(1, "big")[0] for i in range(0, len(stream), 8))


def brush_rle(mask: np.ndarray) -> list[int]:
    """A 2-D boolean mask (height, width) as Label Studio brush RLE: painted pixels are 255
    in each of the four RGBA channels, row-major."""
    m = np.asarray(mask, dtype=bool)
    if m.ndim != 2:
        raise InvalidArgument(f"a mask must be 2-D (height, width), got shape {m.shape}")
    return rle_values(np.repeat(np.where(m, 255, 0).astype(np.uint8).ravel(), 4))


def label_config(classes: Sequence[str], *, kind: str = "image", boxes: bool = False,
                 masks: bool = False) -> str:
    """A Label Studio labeling config for these classes: the item (``kind`` "image" or
    "text"), a single-choice label, and rectangle / brush labels when asked."""
    if kind not in ("image", "text"):
        raise InvalidArgument(f"kind must be 'image' or 'text', got {kind!r}")
    if (boxes or masks) and kind != "image":
        raise InvalidArgument("boxes and masks need images")
    labels = "".join(f"\n    <Label value={quoteattr(str(c))}/>" for c in classes)
    choices = "".join(f"\n    <Choice value={quoteattr(str(c))}/>" for c in classes)
    obj = '<Image name="image" value="$image"/>' if kind == "image" else '<Text name="text" value="$text"/>'
    parts = ["<View>", f"  {obj}",
             f'  <Choices name="label" toName="{kind}" choice="single" showInLine="true">{choices}\n  </Choices>']
    if boxes:
        parts.append(f'  <RectangleLabels name="box" toName="image">{labels}\n  </RectangleLabels>')
    if masks:
        parts.append(f'  <BrushLabels name="mask" toName="image">{labels}\n  </BrushLabels>')
    parts.append("</View>")
    return "\n".join(parts) + "\n"


def _image_url(template: str | None, uri: str, rid: str) -> str:
    if not template:
        return uri
    path = uri[len("file://"):] if uri.startswith("file://") else uri
    name = path.rstrip("/").rsplit("/", 1)[-1]
    try:
        return template.format(uri=uri, path=path, name=name, id=rid)
    except (KeyError, IndexError, ValueError) as exc:
        raise InvalidArgument(f"image_url {template!r}: only {{uri}}, {{path}}, {{name}} and {{id}} "
                              f"may be used ({exc})", field="image_url") from exc


def _read_mask(path: Any) -> np.ndarray | None:
    if not isinstance(path, str) or not path:
        return None
    p = path[len("file://"):] if path.startswith("file://") else path
    if "://" in p or not os.path.isfile(p):
        return None
    from PIL import Image

    try:
        with Image.open(p) as im:
            return np.asarray(im.convert("L") if im.mode not in ("L", "P", "I", "I;16") else im)
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError):
        return None


def _seg_mask(uri: str, classes: list[str], rid: str, spec: Any) -> np.ndarray | None:
    try:
        return read_mask(uri, classes)
    except MaskError as exc:
        raise InvalidArgument(f"row {rid!r}: {spec.column}.mask_uri {uri!r} is not a mask of model "
                              f"'{spec.name}': {exc}", field=f"{spec.column}.mask_uri") from None


def export_label_studio(
    col: Any,
    path: str | os.PathLike[str],
    *,
    model: str | None = None,
    ids: Sequence[str] | None = None,
    where: str | None = None,
    version: int | str | None = None,
    image_url: str | None = None,
    mask_field: str | None = None,
    min_score: float = 0.0,
    batch_size: int | None = None,
) -> tuple[ExportReport, str]:
    """Write the selected rows as a Label Studio task list (JSON) at ``path``; returns the
    report (``rows`` tasks, ``annotations`` pre-annotation results, ``sized_images``) and the
    labeling config (XML) that matches it. See the module docstring."""
    t0 = time.perf_counter()
    spec = col.model(model) if model else None
    schema = (col.table if version is None else col.at_version(version)).schema
    if mask_field is not None:
        if mask_field not in schema.names or not pa.types.is_string(schema.field(mask_field).type):
            raise InvalidArgument(f"mask_field '{mask_field}' must be a string column (paths of mask PNGs)",
                                  field="mask_field")
        if spec is None:
            raise InvalidArgument("masks need model= (its classes name the mask values)", field="model")
    min_score = float(min_score)
    if not 0.0 <= min_score <= 1.0:
        raise InvalidArgument(f"min_score must be in [0, 1], got {min_score}", field="min_score")
    projection = {"id": "id", "uri": "uri", "text": "text"}
    for extra in ("width", "height"):
        if extra in schema.names and pa.types.is_integer(schema.field(extra).type):
            projection[extra] = extra
    seg_masks = spec is not None and spec.task == "segmentation" and not mask_field
    if mask_field:
        projection["mask"] = mask_field
    elif seg_masks:
        projection["mask"] = f"{spec.column}.mask_uri"
    if spec is not None:
        if spec.task == "detection":
            projection["boxes"] = f"{spec.column}.boxes"
        else:
            projection["probs"] = f"{spec.column}.probs"
            projection["logits"] = f"{spec.column}.logits"
            projection["samples"] = f"{spec.column}.samples"
    missing = [0]
    batches = _rows(col, projection, ids=ids, where=where, version=version, batch_size=batch_size,
                    missing=missing)
    classes = list(spec.classes) if spec is not None else []
    tasks = annotations = sized = 0
    kinds: set[str] = set()
    with _atomic(path, "w") as fh:
        fh.write("[")
        for b in batches:
            lines = []
            for task, results in _tasks(b, spec, classes, image_url, min_score, kinds, seg_masks):
                annotations += results
                sized += int("assay_width" in task["data"])
                lines.append(json.dumps(task, ensure_ascii=False))
            if lines:
                fh.write(("," if tasks else "") + "\n" + ",\n".join(lines))
                tasks += len(lines)
        fh.write("\n]\n")
    kind = "text" if kinds == {"text"} else "image"
    boxes = spec is not None and spec.task == "detection"
    config = label_config(classes, kind=kind, boxes=boxes and kind == "image",
                          masks=(bool(mask_field) or seg_masks) and kind == "image")
    report = ExportReport(path=os.fspath(path), format="label-studio", rows=tasks, missing=missing[0],
                          annotations=annotations, sized_images=sized, version=version,
                          seconds=time.perf_counter() - t0)
    return report, config


def _tasks(b: pa.RecordBatch, spec: Any, classes: list[str], image_url: str | None, min_score: float,
           kinds: set[str], seg_masks: bool = False) -> Iterable[tuple[dict[str, Any], int]]:
    names = b.schema.names
    cols = {n: b.column(n) for n in names}
    rows = b.num_rows
    top = conf = None
    if spec is not None and spec.task != "detection":
        top, conf = np.full(rows, -1, dtype=np.int64), np.zeros(rows)
        keep, probs = prediction_probs(cols["probs"], cols["logits"], spec.num_classes, samples=cols["samples"])
        top[keep], conf[keep] = probs.argmax(axis=1), probs.max(axis=1)
    box_lists = cols["boxes"].to_pylist() if "boxes" in cols else None
    ids = cols["id"].to_pylist()
    uris = cols["uri"].to_pylist()
    texts = cols["text"].to_pylist()
    widths = cols["width"].to_pylist() if "width" in cols else [None] * rows
    heights = cols["height"].to_pylist() if "height" in cols else [None] * rows
    masks = cols["mask"].to_pylist() if "mask" in cols else [None] * rows
    for i in range(rows):
        rid, uri, text = ids[i], uris[i], texts[i]
        data: dict[str, Any] = {"assay_id": rid}
        if uri:
            data["image"] = _image_url(image_url, uri, rid)
            data["uri"] = uri
            to_name = "image"
            kinds.add("image")
            if text:
                data["text"] = text
        elif text is not None:
            data["text"] = text
            to_name = "text"
            kinds.add("text")
        else:
            data["image"] = _image_url(image_url, "", rid) if image_url else ""
            to_name = "image"
            kinds.add("image")
        size = None
        if widths[i] and heights[i]:
            size = (int(widths[i]), int(heights[i]))
        elif uri and (box_lists is not None or masks[i]):
            size = _image_size(uri)
        if size is not None:
            data["assay_width"], data["assay_height"] = size
        results: list[dict[str, Any]] = []
        score: float | None = None
        if top is not None and top[i] >= 0:
            results.append({"id": f"{rid}-label", "from_name": "label", "to_name": to_name, "type": "choices",
                            "value": {"choices": [classes[int(top[i])]]}, "score": float(conf[i])})
            score = float(conf[i])
        if box_lists is not None and size is not None:
            w, h = size
            scores = []
            for j, box in enumerate(box_lists[i] or []):
                s = box.get("score")
                if s is not None and s < min_score:
                    continue
                if not box.get("probs"):
                    continue  # a box without class probabilities has no label to show
                k = int(np.argmax(box["probs"]))
                x1, y1, x2, y2 = (float(box[c]) for c in ("x1", "y1", "x2", "y2"))
                results.append({
                    "id": f"{rid}-box{j}", "from_name": "box", "to_name": "image", "type": "rectanglelabels",
                    "original_width": w, "original_height": h, "image_rotation": 0,
                    "value": {"x": 100.0 * x1 / w, "y": 100.0 * y1 / h, "width": 100.0 * (x2 - x1) / w,
                              "height": 100.0 * (y2 - y1) / h, "rotation": 0, "rectanglelabels": [classes[k]]},
                    "score": None if s is None else float(s),
                })
                if s is not None:
                    scores.append(float(s))
            if scores:
                score = float(np.mean(scores))
        if masks[i]:
            mask = _seg_mask(masks[i], classes, rid, spec) if seg_masks else _read_mask(masks[i])
            if mask is not None:
                mh, mw = mask.shape[:2]
                for value in sorted(int(v) for v in np.unique(mask) if 0 < int(v) <= len(classes)):
                    results.append({
                        "id": f"{rid}-mask{value}", "from_name": "mask", "to_name": "image", "type": "brushlabels",
                        "original_width": mw, "original_height": mh, "image_rotation": 0,
                        "value": {"format": "rle", "rle": brush_rle(mask == value),
                                  "brushlabels": [classes[value - 1]]},
                    })
        task: dict[str, Any] = {"data": data}
        if results:
            pred: dict[str, Any] = {"model_version": f"assay:{spec.name}" if spec is not None else "assay",
                                    "result": results}
            if score is not None:
                pred["score"] = score
            task["predictions"] = [pred]
        yield task, len(results)
