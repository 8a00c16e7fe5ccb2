"""The box-level analytics of one collection, as the gRPC Aggregate call and the web page
both serve them: one function per request shape, so the two ports cannot drift apart.

Kinds (see :mod:`indexing.objects`): ``objects`` (object rows), ``object_classes`` (box
label distribution), ``box_confusion`` (predictions matched to ``gt_boxes`` by IoU) and
``box_confused_pairs`` (each box's top-two classes). ``objects_where`` keeps boxes for
every kind but ``box_confusion``, where it keeps the images with such a box (its matching
needs every box of an image).
"""

from __future__ import annotations

from collections.abc import Sequence

import pyarrow as pa

from indexing.errors import InvalidArgument
from indexing.filters import with_objects
from indexing.objects import box_confused_pairs, box_confusion, object_classes
from indexing.store import Collection

__all__ = ["BOX_KINDS", "box_table"]

BOX_KINDS = ("objects", "object_classes", "box_confusion", "box_confused_pairs")


def box_table(col: Collection, kind: str, *, model: str | None = None, where: str | None = None,
              objects_where: str | None = None, version: int | str | None = None,
              columns: Sequence[str] | None = None, limit: int | None = None,
              iou: float | None = None, top: int | None = None) -> pa.Table:
    """The ``kind`` table of ``col`` at ``version``. ``model``: the box source for
    ``objects`` / ``object_classes`` (a detection model or ``"gt"``; None = every source),
    the detection model for ``box_confusion`` / ``box_confused_pairs`` (required)."""
    if kind == "objects":
        return col.objects(where, objects_where, source=model or None, columns=list(columns or []) or None,
                           limit=limit or None, version=version)
    if kind == "object_classes":
        return object_classes(col.read_table(version, where), where, objects_where, source=model or None)
    if kind not in BOX_KINDS:
        raise InvalidArgument(f"unknown box-level kind {kind!r} (known: {', '.join(BOX_KINDS)})")
    if not model:
        raise InvalidArgument(f"aggregate '{kind}' needs a model (a detection model)")
    if kind == "box_confusion":  # matching needs all of an image's boxes: objects_where keeps images
        where = with_objects(where, objects_where)
        read = col.read_table(version, where)
        return box_confusion(read, col.model(model), col.validate_filter(where, read), iou=iou or 0.5)
    return box_confused_pairs(col.read_table(version, where), col.model(model), where, objects_where,
                              top=top or 20)
