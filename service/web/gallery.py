"""The item grid, shared by the web page and notebooks.

An *item* is one row as the grid shows it: ``id``, the run's ``rank`` and ``score`` (or a
search's ``distance``), the collection's ``label``, ``uri``, a ``text`` snippet, ``tags``
and the model's top ``prediction`` (``{model, class, confidence}``). The web page draws
items with ``static/app.js``; :func:`render_grid_html` draws the same cards, with the same
CSS (``static/grid.css``), as one HTML string for Jupyter's ``_repr_html_``.

It needs neither the web server nor a store: the notebook helpers of the client use it.
"""

from __future__ import annotations

import html
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from importlib import resources
from typing import Any

ITEM_KEYS = ("rank", "score", "distance", "related_id")


def snippet(text: str | None, limit: int) -> str | None:
    """``text`` cut to ``limit`` characters at a word boundary where one is near, with an ellipsis."""
    if text is None or len(text) <= limit:
        return text
    cut = text[:limit]
    space = cut.rfind(" ")
    if space > limit * 0.7:
        cut = cut[:space]
    return cut.rstrip() + "…"


def _number(value: Any) -> float | None:
    if value is None:
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def item_dict(id_: str, own: Mapping[str, Any], fields: Mapping[str, Any],
              prediction: Mapping[str, Any] | None, snippet_chars: int = 280) -> dict[str, Any]:
    """One grid item from a result row (``own``: rank, score, distance, related_id) and
    the collection's columns for it (``fields``: label, uri, text, tags)."""
    item: dict[str, Any] = {"id": id_}
    for key in ITEM_KEYS:
        if key in own and own[key] is not None:
            item[key] = _number(own[key]) if key in ("score", "distance") else own[key]
    for key in ("label", "uri", "tags"):
        if fields.get(key) is not None:
            item[key] = fields[key]
    if fields.get("text") is not None:
        item["text"] = snippet(str(fields["text"]), snippet_chars)
    item["prediction"] = dict(prediction) if prediction else None
    return item


def top_predictions(preds: Any, model: str, classes: Sequence[str]) -> list[dict[str, Any] | None]:
    """Per row of a ``pred_<model>`` struct column: ``{model, class, confidence}`` of the top
    class of ``probs``, else of ``softmax(logits)``, else of the most confident class over
    the row's ``boxes`` (then with ``boxes``: the box count); None without a prediction."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.compute as pc

    from indexing.predictions import box_probs, prediction_probs

    if isinstance(preds, pa.ChunkedArray):
        preds = preds.combine_chunks()
    out: list[dict[str, Any] | None] = [None] * len(preds)
    if len(preds) == 0:
        return out
    c = len(classes)
    fields = dict(zip([f.name for f in preds.type], preds.flatten(), strict=True))  # applies the struct's nulls
    if "probs" in fields or "logits" in fields:
        empty = pa.nulls(len(preds), pa.list_(pa.float32()))
        rows, p = prediction_probs(fields.get("probs", empty), fields.get("logits", empty), c)
        top = p.argmax(axis=1)
        for r, k, conf in zip(rows.tolist(), top.tolist(), p[np.arange(len(rows)), top].tolist(), strict=True):
            out[r] = {"model": model, "class": classes[k], "confidence": conf}
    if "boxes" in fields:
        boxes = fields["boxes"]
        owner, p = box_probs(boxes, c)
        counts = pc.fill_null(pc.list_value_length(boxes), 0).to_pylist()
        best: dict[int, tuple[float, int]] = {}
        for r, k, conf in zip(owner.tolist(), p.argmax(axis=1).tolist(), p.max(axis=1).tolist(), strict=True):
            if r not in best or conf > best[r][0]:
                best[r] = (conf, k)
        for r, (conf, k) in best.items():
            if out[r] is None:
                out[r] = {"model": model, "class": classes[k], "confidence": conf, "boxes": counts[r]}
    return out


def grid_css() -> str:
    return resources.files("service.web").joinpath("static/grid.css").read_text(encoding="utf-8")


def _fmt(value: float | None) -> str:
    return "–" if value is None else f"{value:.4g}"


def card_html(item: Mapping[str, Any], thumb: str | None) -> str:
    """One card. ``thumb`` is an image URL (a data: URL in notebooks) or None."""
    e = html.escape
    parts = ['<figure class="assay-card">']
    if thumb:
        parts.append(f'<img class="assay-thumb" src="{e(thumb, quote=True)}" alt="{e(str(item["id"]))}" loading="lazy">')
    elif item.get("text"):
        parts.append(f'<blockquote class="assay-text">{e(item["text"])}</blockquote>')
    elif item.get("uri"):
        parts.append(f'<div class="assay-nothumb">{e(item["uri"])}</div>')
    else:
        parts.append('<div class="assay-nothumb">no image or text</div>')
    caption = ['<figcaption>']
    head = []
    if item.get("rank") is not None:
        head.append(f'<span class="assay-rank">#{int(item["rank"])}</span>')
    if item.get("score") is not None:
        head.append(f'<span class="assay-score">score {_fmt(item["score"])}</span>')
    if item.get("distance") is not None:
        head.append(f'<span class="assay-score">distance {_fmt(item["distance"])}</span>')
    caption.append(f'<div class="assay-head">{" ".join(head)}</div>')
    caption.append(f'<div class="assay-id" title="{e(str(item["id"]), quote=True)}">{e(str(item["id"]))}</div>')
    label = item.get("label")
    caption.append(f'<div class="assay-label">label <b>{e(str(label)) if label is not None else "–"}</b></div>')
    pred = item.get("prediction")
    if pred:
        caption.append(f'<div class="assay-pred">{e(str(pred["model"]))}: <b>{e(str(pred["class"]))}</b> '
                       f'({pred["confidence"]:.2f})</div>')
    caption.append("</figcaption>")
    parts += caption
    parts.append("</figure>")
    return "".join(parts)


def render_grid_html(items: Iterable[Mapping[str, Any]], thumb: Callable[[Mapping[str, Any]], str | None],
                     *, title: str | None = None, css: bool = True) -> str:
    """The grid as an HTML fragment (with its CSS) for a notebook cell."""
    body = "".join(card_html(it, thumb(it)) for it in items)
    head = f'<div class="assay-title">{html.escape(title)}</div>' if title else ""
    style = f"<style>{grid_css()}</style>" if css else ""
    return f'{style}<div class="assay-gallery">{head}<div class="assay-grid">{body}</div></div>'


__all__: Sequence[str] = ("card_html", "grid_css", "item_dict", "render_grid_html", "snippet", "top_predictions")
