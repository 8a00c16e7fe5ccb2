"""The collection schema: column names and types, and the space / model registry.

A collection is one Lance table. Besides the fixed columns (``id``, timestamps, ``uri``,
``text``, ``tags``, ``label``, ``gt_boxes``) it holds user fields (top-level scalar columns),
one ``emb_<space>`` fixed-size vector column per embedding space and one ``pred_<model>``
struct column per model.

The registry of spaces (dim, metric, model, normalized, index policy) and of models (class
names, task) lives in the Arrow field metadata of those columns (key ``assay.space`` /
``assay.model``, JSON). It is therefore part of the table's schema: versioned with the data,
visible to every reader of the table, and written in the same commit that adds the column.
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Literal

import pyarrow as pa

from indexing.errors import InvalidArgument

EMB_PREFIX = "emb_"
PRED_PREFIX = "pred_"
SPACE_META_KEY = b"assay.space"
MODEL_META_KEY = b"assay.model"
# A reindex fills ``emb_<space>__next`` and swaps it in as ``emb_<space>`` in one commit
# (the old column is briefly ``emb_<space>__prev``); "__" is therefore reserved in space
# names. The staging column's metadata records what the reindex is doing, so it resumes.
STAGE_SUFFIX = "__next"
PREV_SUFFIX = "__prev"
REINDEX_META_KEY = b"assay.reindex"

# Collection names become directory names (<root>/<name>.lance): no separators, no dots,
# nothing that could climb out of the root. Leading underscore is reserved for assay's own
# tables (_runs, _jobs).
COLLECTION_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,127}$")
# Column, space and model names must be usable unquoted in SQL filters.
IDENT_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,62}$")

Metric = Literal["cosine", "l2", "dot"]
METRICS: tuple[str, ...] = ("cosine", "l2", "dot")
INDEX_KINDS: tuple[str, ...] = ("auto", "flat", "ivf_rq", "ivf_sq", "ivf_pq", "ivf_hnsw_sq", "ivf_flat")

TIMESTAMP = pa.timestamp("us", tz="UTC")
FLOAT_LIST = pa.list_(pa.float32())
PRED_BOX = pa.struct(
    [
        pa.field("x1", pa.float32()),
        pa.field("y1", pa.float32()),
        pa.field("x2", pa.float32()),
        pa.field("y2", pa.float32()),
        pa.field("score", pa.float32()),
        pa.field("probs", FLOAT_LIST),
    ]
)
GT_BOX = pa.struct(
    [
        pa.field("x1", pa.float32()),
        pa.field("y1", pa.float32()),
        pa.field("x2", pa.float32()),
        pa.field("y2", pa.float32()),
        pa.field("label", pa.string()),
    ]
)
# One model's predictions for one item. Every child is optional: a classifier stores
# `probs` (or `logits`), MC dropout / committees add `samples` (K x C), a detector stores
# `boxes`, a learning-loss head `loss`, training dynamics `epoch_logits` (E x C).
PRED_STRUCT = pa.struct(
    [
        pa.field("probs", FLOAT_LIST),
        pa.field("logits", FLOAT_LIST),
        pa.field("samples", pa.list_(FLOAT_LIST)),
        pa.field("boxes", pa.list_(PRED_BOX)),
        pa.field("loss", pa.float32()),
        pa.field("epoch_logits", pa.list_(FLOAT_LIST)),
    ]
)
PRED_CHILDREN = tuple(f.name for f in PRED_STRUCT)
MAX_BOX_EMBEDDING_DIM = 65_536


def pred_box_type(box_embedding_dim: int = 0) -> pa.DataType:
    """A detection model's box struct: :data:`PRED_BOX`, plus ``embedding`` (list<float32>
    of ``box_embedding_dim`` values, null allowed) when the model declares one."""
    if not box_embedding_dim:
        return PRED_BOX
    return pa.struct([*PRED_BOX, pa.field("embedding", FLOAT_LIST)])


def pred_struct_type(box_embedding_dim: int = 0) -> pa.DataType:
    """The ``pred_<model>`` struct: :data:`PRED_STRUCT`, its boxes with ``embedding`` when the
    model declares ``box_embedding_dim`` (models without one keep the original type, so
    tables written before per-object embeddings existed read and write unchanged)."""
    if not box_embedding_dim:
        return PRED_STRUCT
    return pa.struct([pa.field("boxes", pa.list_(pred_box_type(box_embedding_dim))) if f.name == "boxes" else f
                      for f in PRED_STRUCT])


# A segmentation model's predictions: per-image summaries of pixel uncertainty, never the
# (C, H, W) probability maps (see indexing/segmentation.py for the definitions). The
# classification children stay (all null unless sent) so every reader of ``probs`` /
# ``loss`` works on any model; the segmentation children follow them:
#   mean_entropy, topq_entropy    normalised pixel entropy (in [0, 1]) averaged over all
#                                 pixels / over the top ``top_q`` fraction of pixels;
#   class_uncertain_fraction      C values: of the pixels predicted as class c, the fraction
#                                 whose normalised entropy exceeds ``uncertain_threshold``;
#   bald                          MC-dropout pixel BALD in nats, averaged over pixels;
#   uncertainty_map               ``map_size`` x ``map_size`` average-pooled normalised
#                                 entropy, row-major;
#   mask_uri                      a predicted mask (pre-label): a PNG of class indices or a
#                                 JSON file of COCO RLE masks (indexing/masks.py).
SEG_CHILDREN: tuple[pa.Field, ...] = (
    pa.field("mean_entropy", pa.float32()),
    pa.field("topq_entropy", pa.float32()),
    pa.field("class_uncertain_fraction", FLOAT_LIST),
    pa.field("bald", pa.float32()),
    pa.field("uncertainty_map", FLOAT_LIST),
    pa.field("mask_uri", pa.string()),
)
SEG_STRUCT = pa.struct([*PRED_STRUCT, *SEG_CHILDREN])
SEG_SUMMARIES: tuple[str, ...] = ("mean_entropy", "topq_entropy", "bald")
TASKS: tuple[str, ...] = ("classification", "detection", "segmentation")
# Defaults of a segmentation model's settings (ModelSpec.top_q, ...).
SEG_TOP_Q = 0.05
SEG_UNCERTAIN_THRESHOLD = 0.5
SEG_MAP_SIZE = 16

BASE_FIELDS: tuple[pa.Field, ...] = (
    pa.field("id", pa.string(), nullable=False),
    pa.field("created_at", TIMESTAMP),
    pa.field("updated_at", TIMESTAMP),
    pa.field("uri", pa.string()),
    pa.field("text", pa.string()),
    pa.field("tags", pa.list_(pa.string())),
    pa.field("label", pa.string()),
    pa.field("gt_boxes", pa.list_(GT_BOX)),
)
RESERVED_COLUMNS = frozenset(f.name for f in BASE_FIELDS)
STORE_SET_COLUMNS = frozenset({"created_at", "updated_at"})


# The default index threshold: max(AUTO_INDEX_MIN_ROWS, min(AUTO_INDEX_MAX_ROWS,
# AUTO_INDEX_ELEMENTS // dim)) vectors. Measured by bench/index_threshold.py on 2026-12-07
# (one query at a time, 16-fragment tables, CPU ms of an exact search from memory
# (indexing.flat_search) against IVF_RQ tuned to the target recall, no filter | a filter
# passing 30 %): 200k × 64 17.5 / 13.5 | 17.3 / 44.2; 400k × 64 21.0 / 18.1 | 22.6 / 68.6;
# 600k × 64 28.3 / 20.0 | 27.2 / 90.9; 800k × 64 33.2 / 18.6 | 37.1 / 79.4; 600k × 32 26.2 /
# 19.4 | 27.5 / 91.4; 200k × 128 15.0 / 15.5 | 17.0 / 48.2; 300k × 128 22.9 / 21.8 | 25.9 /
# 63.8; 150k × 256 19.4 / 17.3 | 20.8 / 39.6; 100k × 384 18.8 / 16.7 | 20.3 / 36.8. A
# filtered search through the index costs 1.8-3.3× the exact one at every size (Lance
# evaluates the prefilter over the table; the exact search keeps each filter's rows); an
# unfiltered one costs about as much or less through the index (index/exact 1.03 and 0.95 at
# 128-d, 0.89 at 100k × 384, 0.78 at 200k × 64, 0.71 at 600k × 64, 0.56 at 800k × 64). Half
# the searches filtered, the exact search is the cheaper one at every size measured. The
# index also costs its build (6.4 s of CPU at 200k × 64, 21 s at 600k) and, under writes, a
# scan of the rows not in it yet. So the exact search holds up to 38.4M elements (154 MB of
# float32 vectors a space, within FLAT_CACHE_BYTES): 600k vectors of up to 64 dimensions,
# 300k of 128, 100k of 384 or more.
# (Until 2026-12-07: 12.8M elements within 100k-200k rows, the unfiltered crossing alone.)
AUTO_INDEX_ELEMENTS = 38_400_000
AUTO_INDEX_MIN_ROWS = 100_000
AUTO_INDEX_MAX_ROWS = 600_000


@dataclass(frozen=True)
class IndexPolicy:
    """How a space's vectors are indexed.

    ``kind="auto"`` keeps exact (flat) search below its threshold (:meth:`threshold_for`:
    ``threshold_rows`` vectors if set, else by the space's dimension) — an index is not
    worth it there — and builds ``auto_kind`` at or above it. Quantised indexes re-rank
    ``refine_factor * k`` candidates with the full vectors; ``nprobes`` is raised by
    :meth:`Collection.recall_check` until ``target_recall`` is reached.
    """

    kind: str = "auto"
    auto_kind: str = "ivf_rq"
    threshold_rows: int | None = None  # None: by dimension (threshold_for)
    num_partitions: int | None = None
    num_bits: int = 4
    nprobes: int = 20
    refine_factor: int = 10
    target_recall: float = 0.95

    def __post_init__(self) -> None:
        if self.kind not in INDEX_KINDS:
            raise InvalidArgument(f"index kind '{self.kind}' is not one of {', '.join(INDEX_KINDS)}")
        if self.auto_kind not in INDEX_KINDS or self.auto_kind in ("auto", "flat"):
            raise InvalidArgument(f"index auto_kind '{self.auto_kind}' must be an IVF kind")
        if self.threshold_rows is not None and self.threshold_rows < 256:
            raise InvalidArgument("index threshold_rows must be >= 256 (IVF needs training rows)")
        if self.nprobes < 1 or self.refine_factor < 1:
            raise InvalidArgument("index nprobes and refine_factor must be >= 1")
        if not 0.0 < self.target_recall <= 1.0:
            raise InvalidArgument("index target_recall must be in (0, 1]")

    def threshold_for(self, dim: int) -> int:
        """Vectors at which ``kind="auto"`` builds its index: ``threshold_rows`` if set, else
        by the dimension — 600k vectors of up to 64 dimensions, 100k of 384 or more, in
        between 38.4M elements (300k of 128; see ``AUTO_INDEX_ELEMENTS``)."""
        if self.threshold_rows is not None:
            return self.threshold_rows
        return max(AUTO_INDEX_MIN_ROWS, min(AUTO_INDEX_MAX_ROWS, AUTO_INDEX_ELEMENTS // dim))

    def wants_index(self, rows: int, dim: int) -> bool:
        """Whether a space of ``rows`` vectors of ``dim`` dimensions should have a vector
        index under this policy: never for ``flat``, always for a pinned IVF kind, from
        :meth:`threshold_for` rows on for ``auto``."""
        return self.kind != "flat" and (self.kind != "auto" or rows >= self.threshold_for(dim))


@dataclass(frozen=True)
class SpaceSpec:
    """An embedding space: the ``emb_<name>`` column and how to search it.

    ``normalized=True`` means vectors are L2-normalised on write (the default for cosine:
    cosine distance then equals 1 - dot product, which the miners rely on).
    """

    name: str
    dim: int
    metric: str = "cosine"
    model: str | None = None
    normalized: bool = True
    index: IndexPolicy = field(default_factory=IndexPolicy)

    def __post_init__(self) -> None:
        check_identifier(self.name, "space name")
        if "__" in self.name:
            raise InvalidArgument(f"space name {self.name!r} is invalid: '__' is reserved for assay's own columns")
        if not isinstance(self.dim, int) or not 1 <= self.dim <= 65_536:
            raise InvalidArgument(f"space '{self.name}': dim must be an integer in [1, 65536], got {self.dim!r}")
        if self.metric not in METRICS:
            raise InvalidArgument(
                f"space '{self.name}': metric '{self.metric}' is not one of {', '.join(METRICS)}"
            )

    @property
    def column(self) -> str:
        return EMB_PREFIX + self.name

    def arrow_type(self) -> pa.DataType:
        return pa.list_(pa.float32(), self.dim)

    def arrow_field(self) -> pa.Field:
        return pa.field(self.column, self.arrow_type(), metadata={SPACE_META_KEY: self.to_json()})

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str | bytes) -> SpaceSpec:
        raw = json.loads(text)
        raw["index"] = IndexPolicy(**raw.get("index", {}))
        return cls(**raw)

    def with_index(self, **changes: Any) -> SpaceSpec:
        return replace(self, index=replace(self.index, **changes))


@dataclass(frozen=True)
class ModelSpec:
    """A model whose predictions live in ``pred_<name>``; ``classes`` names the C outputs.

    ``task`` is "classification", "detection" or "segmentation". A segmentation model's
    settings say how its per-image summaries are computed (by the inference runner, or by
    whoever sends them): ``top_q`` (the fraction of most uncertain pixels ``topq_entropy``
    averages, default 5%), ``uncertain_threshold`` (normalised entropy above which a pixel
    counts as uncertain in ``class_uncertain_fraction``, default 0.5) and ``map_size``
    (``uncertainty_map`` is ``map_size`` x ``map_size``, default 16). Other tasks ignore them.

    ``box_embedding_dim`` (detection models only; 0 = none): every box of ``pred_<name>.boxes``
    may carry an ``embedding`` of exactly this many finite float32 values (a per-object
    feature, e.g. RoI-pooled). The dimension is DECLARED with the model, not taken from the
    first write: it fixes the column's Arrow type when the model is added (no schema change
    on a later write, no race between two first writers with different lengths), and every
    upsert is checked against it row by row. A model declared without one refuses box
    embeddings with a message saying how to declare them; a model of another task (no
    boxes of its own) refuses the setting.
    """

    name: str
    classes: tuple[str, ...]
    task: str = "classification"
    top_q: float = SEG_TOP_Q
    uncertain_threshold: float = SEG_UNCERTAIN_THRESHOLD
    map_size: int = SEG_MAP_SIZE
    box_embedding_dim: int = 0

    def __post_init__(self) -> None:
        check_identifier(self.name, "model name")
        if len(self.classes) < 2:
            raise InvalidArgument(f"model '{self.name}': needs at least 2 class names, got {len(self.classes)}")
        if len(set(self.classes)) != len(self.classes):
            raise InvalidArgument(f"model '{self.name}': class names must be unique")
        if self.task not in TASKS:
            raise InvalidArgument(
                f"model '{self.name}': task must be one of {', '.join(TASKS)}, got '{self.task}'"
            )
        if isinstance(self.top_q, bool) or not isinstance(self.top_q, int | float) \
                or not 0.0 < float(self.top_q) <= 1.0:
            raise InvalidArgument(f"model '{self.name}': top_q must be a fraction in (0, 1] "
                                  f"(0.05 = the 5% most uncertain pixels), got {self.top_q!r}")
        if isinstance(self.uncertain_threshold, bool) or not isinstance(self.uncertain_threshold, int | float) \
                or not 0.0 <= float(self.uncertain_threshold) < 1.0:
            raise InvalidArgument(f"model '{self.name}': uncertain_threshold must be a normalised entropy in "
                                  f"[0, 1), got {self.uncertain_threshold!r}")
        if isinstance(self.map_size, bool) or not isinstance(self.map_size, int) or not 1 <= self.map_size <= 256:
            raise InvalidArgument(f"model '{self.name}': map_size must be an integer in [1, 256], "
                                  f"got {self.map_size!r}")
        dim = self.box_embedding_dim
        if isinstance(dim, bool) or not isinstance(dim, int) or not 0 <= dim <= MAX_BOX_EMBEDDING_DIM:
            raise InvalidArgument(f"model '{self.name}': box_embedding_dim must be an integer in "
                                  f"[0, {MAX_BOX_EMBEDDING_DIM}] (0: boxes carry no embedding), got {dim!r}")
        if dim and self.task != "detection":
            raise InvalidArgument(f"model '{self.name}': box_embedding_dim applies to detection models only (a "
                                  f"{self.task} model has no boxes of its own); declare the model with "
                                  f"task='detection', or leave box_embedding_dim at 0")

    @property
    def column(self) -> str:
        return PRED_PREFIX + self.name

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def arrow_type(self) -> pa.DataType:
        if self.task == "segmentation":
            return SEG_STRUCT
        return pred_struct_type(self.box_embedding_dim)

    def arrow_field(self) -> pa.Field:
        return pa.field(self.column, self.arrow_type, metadata={MODEL_META_KEY: self.to_json()})

    def settings(self) -> dict[str, Any]:
        """The task's settings (a segmentation model's top_q, uncertain_threshold, map_size;
        a detection model's box_embedding_dim when it declares one)."""
        if self.task == "detection":
            return {"box_embedding_dim": self.box_embedding_dim} if self.box_embedding_dim else {}
        if self.task != "segmentation":
            return {}
        return {"top_q": float(self.top_q), "uncertain_threshold": float(self.uncertain_threshold),
                "map_size": int(self.map_size)}

    def to_json(self) -> str:
        # classification / detection specs without box embeddings keep their exact earlier JSON
        return json.dumps({"name": self.name, "classes": list(self.classes), "task": self.task,
                           **self.settings()})

    @classmethod
    def from_json(cls, text: str | bytes) -> ModelSpec:
        raw = json.loads(text)
        extra = {k: raw[k] for k in ("top_q", "uncertain_threshold", "map_size") if k in raw}
        if "box_embedding_dim" in raw:
            extra["box_embedding_dim"] = int(raw["box_embedding_dim"])
        return cls(name=raw["name"], classes=tuple(raw["classes"]), task=raw.get("task", "classification"),
                   **extra)


def check_identifier(name: str, what: str) -> str:
    if not isinstance(name, str) or not IDENT_RE.match(name):
        raise InvalidArgument(
            f"{what} {name!r} is invalid: use letters, digits and underscores, "
            "starting with a letter or underscore, at most 63 characters"
        )
    return name


def check_collection_name(name: str) -> str:
    if not isinstance(name, str) or not COLLECTION_NAME_RE.match(name):
        raise InvalidArgument(
            f"collection name {name!r} is invalid: use letters, digits, '_' and '-', "
            "starting with a letter or digit, at most 128 characters (no paths)"
        )
    return name


def base_schema() -> pa.Schema:
    return pa.schema(list(BASE_FIELDS))


def spaces_of(schema: pa.Schema) -> dict[str, SpaceSpec]:
    out: dict[str, SpaceSpec] = {}
    for f in schema:
        if f.name.startswith(EMB_PREFIX) and f.metadata and SPACE_META_KEY in f.metadata:
            spec = SpaceSpec.from_json(f.metadata[SPACE_META_KEY])
            if f.name == spec.column:  # not a reindex's staging column
                out[spec.name] = spec
    return out


def models_of(schema: pa.Schema) -> dict[str, ModelSpec]:
    out: dict[str, ModelSpec] = {}
    for f in schema:
        if f.name.startswith(PRED_PREFIX) and f.metadata and MODEL_META_KEY in f.metadata:
            spec = ModelSpec.from_json(f.metadata[MODEL_META_KEY])
            out[spec.name] = spec
    return out


def is_user_scalar(t: pa.DataType) -> bool:
    """Types allowed for user fields: scalars that SQL filters and scalar indexes handle."""
    return (
        pa.types.is_boolean(t)
        or pa.types.is_integer(t)
        or pa.types.is_floating(t)
        or pa.types.is_string(t)
        or pa.types.is_large_string(t)
        or pa.types.is_timestamp(t)
        or pa.types.is_date(t)
        or pa.types.is_decimal(t)
    )


def user_fields_of(schema: pa.Schema) -> dict[str, pa.DataType]:
    return {
        f.name: f.type
        for f in schema
        if f.name not in RESERVED_COLUMNS
        and not f.name.startswith(EMB_PREFIX)
        and not f.name.startswith(PRED_PREFIX)
    }


def light_columns(schema: pa.Schema) -> list[str]:
    """Columns returned by default: everything but vectors and prediction structs."""
    return [
        f.name
        for f in schema
        if not f.name.startswith(EMB_PREFIX) and not f.name.startswith(PRED_PREFIX)
    ]
