"""Segmentation masks as pre-labels: reading them by URI, and COCO run-length encoding.

A segmentation model's ``pred_<model>.mask_uri`` (or a user column of mask paths) points at
one of:

* an image of class indices (PNG, or anything Pillow opens as one channel: mode ``L``,
  ``P``, ``I``, ``I;16``): pixel value ``0`` = no class, ``k`` = the model's class ``k - 1``
  (the convention of the Label Studio export's ``mask_field``); ``255`` in an 8-bit mask is
  "ignore" (void) and, like 0, labels nothing. Other values above ``C`` are an error;
* a ``.json`` file of COCO RLE masks: a list of ``{"segmentation": {"size": [h, w],
  "counts": ...}, "category_id": k}`` (``k`` in ``1..C``, the category ids of assay's COCO
  export) or ``"category": "<class name>"`` instead of the id — the COCO result format.
  ``counts`` may be a list of run lengths (uncompressed RLE) or COCO's compressed string.
  Masks are painted in order (a later one wins where they overlap).

Either way :func:`read_mask` returns an ``(H, W)`` int32 map of ``0`` (nothing) or ``k``
(class ``k - 1``).

COCO RLE (the format of ``pycocotools.mask``, written here without it: it is not a
dependency): a binary mask is flattened in **column-major** order (down the first column,
then the next), and ``counts`` lists the lengths of alternating runs of 0s and 1s, starting
with 0s (so the first count is 0 when the first pixel is set); ``size`` is ``[h, w]``. The
compressed string form writes each count (from the fourth on, as the difference to the
count two before it) as little-endian groups of 5 bits, each group + 48 as one character,
bit ``0x20`` set on every group but the last, and the last group's bit ``0x10`` carrying the
sign. Exports write the uncompressed list form (any COCO reader takes it:
``pycocotools.mask.frPyObjects``); :func:`rle_to_string` / :func:`rle_from_string` convert.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from typing import Any

import numpy as np

__all__ = ["GT_MASK_COLUMN", "IGNORE_VALUE", "MaskError", "local_path", "mask_bbox", "read_mask", "rle_decode", "rle_encode",
           "rle_from_string", "rle_to_string"]

IGNORE_VALUE = 255
#: The string column of a row's ground-truth mask (a URI in either format above), the mask
#: the uncertainty-vs-quality report (:mod:`indexing.quality`, ``quality="iou"`` of a
#: segmentation model) compares ``pred_<model>.mask_uri`` with. A user column, declared like
#: any other (``fields={"gt_mask_uri": "string"}``).
GT_MASK_COLUMN = "gt_mask_uri"


class MaskError(ValueError):
    """A mask that exists but cannot be used (bad format, values out of range)."""


def local_path(uri: Any) -> str | None:
    """The local file a uri names (``file://`` stripped), or None for remote / missing files."""
    if not isinstance(uri, str) or not uri:
        return None
    p = uri[len("file://"):] if uri.startswith("file://") else uri
    if "://" in p or not os.path.isfile(p):
        return None
    return p


def rle_encode(mask: np.ndarray) -> dict[str, Any]:
    """COCO uncompressed RLE of a binary ``(H, W)`` mask: ``{"size": [H, W], "counts": [...]}``."""
    m = np.asarray(mask).astype(bool)
    if m.ndim != 2:
        raise MaskError(f"a mask must be 2-D (H, W); got shape {m.shape}")
    flat = m.ravel(order="F")
    if flat.size == 0:
        return {"size": [int(m.shape[0]), int(m.shape[1])], "counts": []}
    change = np.flatnonzero(flat[1:] != flat[:-1]) + 1
    bounds = np.r_[0, change, flat.size]
    runs = np.diff(bounds).tolist()
    if flat[0]:
        runs = [0, *runs]
    return {"size": [int(m.shape[0]), int(m.shape[1])], "counts": [int(r) for r in runs]}


def rle_to_string(counts: Sequence[int]) -> str:
    """COCO's compressed string of a list of run lengths (module docstring)."""
    out = []
    for i, value in enumerate(counts):
        x = int(value) - (int(counts[i - 2]) if i > 2 else 0)
        while True:
            c = x & 0x1F
            x >>= 5  # arithmetic shift: negative differences keep their sign
            more = x != -1 if c & 0x10 else x != 0
            out.append(chr((c | 0x20 if more else c) + 48))
            if not more:
                break
    return "".join(out)


def rle_from_string(text: str) -> list[int]:
    """Run lengths of COCO's compressed RLE string (the inverse of :func:`rle_to_string`)."""
    counts: list[int] = []
    p = 0
    while p < len(text):
        x = k = 0
        while True:
            if p >= len(text):
                raise MaskError("a compressed RLE string ends inside a number")
            c = ord(text[p]) - 48
            if not 0 <= c < 64:
                raise MaskError(f"character {text[p]!r} cannot appear in a compressed RLE string")
            x |= (c & 0x1F) << (5 * k)
            p += 1
            k += 1
            if not c & 0x20:
                if c & 0x10:
                    x -= 1 << (5 * k)  # sign-extend the last group
                break
        if len(counts) > 2:
            x += counts[-2]
        counts.append(x)
    return counts


def rle_decode(rle: Any) -> np.ndarray:
    """The binary ``(H, W)`` mask of a COCO RLE dict (list or compressed-string counts)."""
    if not isinstance(rle, dict) or "size" not in rle or "counts" not in rle:
        raise MaskError('an RLE mask is {"size": [h, w], "counts": [...] or "<compressed>"}')
    size = rle["size"]
    if not (isinstance(size, list | tuple) and len(size) == 2
            and all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in size)):
        raise MaskError(f"RLE size must be [h, w] (two integers >= 0); got {size!r}")
    h, w = int(size[0]), int(size[1])
    counts = rle["counts"]
    if isinstance(counts, str):
        counts = rle_from_string(counts)
    if not isinstance(counts, list) or not all(isinstance(c, int) and not isinstance(c, bool) and c >= 0
                                               for c in counts):
        raise MaskError("RLE counts must be a list of integers >= 0 or a compressed string")
    if sum(counts) != h * w:
        raise MaskError(f"RLE counts cover {sum(counts)} pixels; size {h}x{w} has {h * w}")
    values = np.zeros(len(counts), dtype=bool)
    values[1::2] = True
    flat = np.repeat(values, counts)
    return flat.reshape((h, w), order="F")


def mask_bbox(mask: np.ndarray) -> list[float]:
    """COCO ``[x, y, width, height]`` of the set pixels of a binary mask (pixel edges)."""
    ys = np.flatnonzero(mask.any(axis=1))
    xs = np.flatnonzero(mask.any(axis=0))
    if len(ys) == 0:
        return [0.0, 0.0, 0.0, 0.0]
    return [float(xs[0]), float(ys[0]), float(xs[-1] - xs[0] + 1), float(ys[-1] - ys[0] + 1)]


def _read_json(path: str, classes: Sequence[str]) -> np.ndarray:
    try:
        with open(path, encoding="utf-8") as fh:
            doc = json.load(fh)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise MaskError(f"cannot read JSON ({exc})") from None
    if not isinstance(doc, list) or not doc:
        raise MaskError('a JSON mask file is a non-empty list of {"segmentation": <RLE>, '
                        '"category_id": k} (or "category": "<class>")')
    index = {name: i + 1 for i, name in enumerate(classes)}
    out: np.ndarray | None = None
    for n, item in enumerate(doc):
        if not isinstance(item, dict) or "segmentation" not in item:
            raise MaskError(f"item {n} has no 'segmentation'")
        if "category" in item:
            value = index.get(item["category"])
            if value is None:
                raise MaskError(f"item {n}: category {item['category']!r} is not one of the model's classes")
        else:
            value = item.get("category_id")
            if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= len(classes):
                raise MaskError(f"item {n}: category_id must be in 1..{len(classes)}; got {value!r}")
        binary = rle_decode(item["segmentation"])
        if out is None:
            out = np.zeros(binary.shape, dtype=np.int32)
        elif binary.shape != out.shape:
            raise MaskError(f"item {n} has size {list(binary.shape)}; item 0 has {list(out.shape)}")
        out[binary] = value
    assert out is not None
    return out


def read_mask(uri: str, classes: Sequence[str], *, ignore: int | None = None) -> np.ndarray | None:
    """The ``(H, W)`` int32 class map (``0`` nothing, ``k`` class ``k - 1``) of a mask file,
    or None when ``uri`` is not a readable local file. :class:`MaskError` for a file that is
    there but is not a mask of these classes.

    ``ignore``: the value the ignore pixels (255 in an 8-bit image) take in the map; by
    default they read as ``0`` (nothing), as a pre-label wants them. A ground truth read for
    scoring passes a value outside ``0..C`` (e.g. ``-1``) to leave them out."""
    path = local_path(uri)
    if path is None:
        return None
    if path.lower().endswith(".json"):
        return _read_json(path, classes)
    from PIL import Image

    try:
        with Image.open(path) as im:
            if im.mode not in ("L", "P", "I", "I;16", "1"):
                raise MaskError(f"a mask image must have one channel of class indices; this one is {im.mode}")
            values = np.asarray(im).astype(np.int32)
            eight_bit = im.mode in ("L", "P", "1")
    except (OSError, SyntaxError, Image.DecompressionBombError) as exc:
        raise MaskError(f"cannot read the image ({exc})") from None
    void = values == IGNORE_VALUE if eight_bit else np.zeros(values.shape, bool)
    values[void] = 0
    bad = (values < 0) | (values > len(classes))
    if bad.any():
        y, x = (int(v) for v in np.argwhere(bad)[0])
        raise MaskError(f"pixel (y={y}, x={x}) has value {int(values[y, x])}; the model has "
                        f"{len(classes)} classes (0 = none, 1..{len(classes)} = a class"
                        f"{', 255 = ignore' if eight_bit else ''})")
    if ignore is not None:
        values[void] = ignore
    return values
