"""What miners read: one object per input kind, and the run context they read it in.

A miner declares its inputs by name (``MinerSpec.inputs``: ``("probs",)``,
``("vectors", "pool_graph")``...). Each name is an :class:`Input` in :data:`INPUTS` that
knows everything the runner needs about it, so the runner itself never asks which miner
it runs:

* ``columns(ctx)`` — its projection: the Lance columns a scan reads for it (alias → path);
* ``condition(ctx)`` — SQL true for the rows that carry it (a pool with none is refused
  before the run starts);
* ``present(batch, ctx)`` and ``decode(batch, rows, row_keys, ctx)`` — its chunk decoder:
  which rows of an Arrow batch have it, and those rows as NumPy arrays;
* ``gather(g)`` — its whole-pool loader, for miners that need the whole pool at once
  (``MinerSpec.gather``): the pool's vectors, a reference set, a k-NN graph. Inputs with a
  chunk decoder ride along the pool scan by default (BADGE's probabilities).

``needs_model`` / ``needs_space`` say what a request must name; ``reads_reference`` that it
reads the reference set (``reference_where``); ``classes`` that it gives each row a
predicted class (class-balanced budgets); ``row_arrays`` the arrays its decoder returns with
one entry per row (carried to a batch ``select`` such as BatchBALD).

Adding an input kind: one :class:`Input` subclass and one line in :data:`INPUTS`.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from indexing.errors import FailedPrecondition, InvalidArgument
from indexing.predictions import list_matrix, prediction_probs, valid_mask
from indexing.schema import EMB_PREFIX, PRED_PREFIX, ModelSpec
from indexing.segmentation import summary_scores
from indexing.store import Collection
from miners.knn import eta_text
from miners.runs import MiningOutput, RunSpec
from miners.topk import row_uniforms
from miners.vectors import Pool, graph, ids_of_rows, load_pool, space_condition, space_spec

Progress = Callable[[float, str], None]


def _no_progress(fraction: float, message: str) -> None:
    return None


def _no_check() -> None:
    return None


@dataclass
class RunContext:
    """One run as its inputs and hooks see it: the collection, the run (request or record),
    its validated parameters, and the runner's progress / cancel callbacks.

    ``validate_stage`` and ``mine_stage`` are the runner's own entry points (validate or run
    another :class:`RunSpec` on the same collection), for miners made of other runs
    (``chain``); they are set by the runner."""

    col: Collection
    run: RunSpec
    params: dict[str, Any]
    progress: Progress = _no_progress
    check: Callable[[], None] = _no_check
    validate_stage: Callable[[RunSpec], tuple[Any, dict[str, Any]]] | None = None
    mine_stage: Callable[[RunSpec], MiningOutput] | None = None
    # every pool row's score by a scored miner: (row ids, scores) (``select``)
    score_stage: Callable[[RunSpec], tuple[np.ndarray, np.ndarray]] | None = None
    # the registry (miner name -> MinerSpec), for miners that name other miners (chain
    # stages, select objectives); passed in by the runner so that those hooks do not
    # import the registry that imports them
    miners: Mapping[str, Any] = field(default_factory=dict)

    @property
    def model(self) -> str | None:
        return self.run.model or None

    @property
    def space(self) -> str | None:
        return self.run.space or None

    @property
    def where(self) -> str | None:
        return self.run.where or None

    @property
    def reference_where(self) -> str | None:
        return self.run.reference_where or None

    @property
    def objects_where(self) -> str | None:
        """Object spaces: the boxes mined (SQL over the object columns), None for every box."""
        return self.run.objects_where or None

    @cached_property
    def model_spec(self) -> ModelSpec | None:
        return self.col.model(self.model) if self.model else None

    @property
    def num_classes(self) -> int:
        return self.model_spec.num_classes if self.model_spec else 0

    @cached_property
    def dim(self) -> int:
        return space_spec(self.col, self.space).dim

    @cached_property
    def table(self) -> Any:
        """The table at the run's version (the current one for a request without a version)."""
        return self.col.table if self.run.version is None else self.col.at_version(self.run.version)


# -- the input kinds -------------------------------------------------------------------------


def _take(arr: pa.Array, rows: np.ndarray) -> pa.Array:
    return arr if len(rows) == len(arr) else arr.take(pa.array(rows, pa.int64()))


class Input:
    """An input kind (see the module docstring). The defaults describe an input that reads
    no column and decodes nothing."""

    name: str = ""
    help: str = ""
    needs_model: bool = False
    needs_space: bool = False
    reads_reference: bool = False
    classes: bool = False
    row_arrays: tuple[str, ...] = ()
    # "ride": decoded chunk by chunk (streamed miners) and along the pool scan (gathered
    # ones); "pool": the pool scan itself; "reference": after it; "graph": after those;
    # "params": read from the miner's parameters by its own hooks (nothing to load)
    phase: str = "ride"

    def columns(self, ctx: RunContext) -> dict[str, str]:
        return {}

    def condition(self, ctx: RunContext) -> str | None:
        return None

    def present(self, batch: pa.RecordBatch, ctx: RunContext) -> np.ndarray | None:
        """Which rows of ``batch`` carry the input (None: all of them)."""
        return None

    def decode(self, batch: pa.RecordBatch, rows: np.ndarray, row_keys: np.ndarray,
               ctx: RunContext) -> dict[str, Any]:
        """The rows ``rows`` of ``batch`` (each has the input) as arrays; ``row_keys`` are
        their row ids."""
        return {}

    def gather(self, g: Gathered) -> None:
        """Whole pool: the arrays its chunk decoder produced along the pool scan."""
        g.arrays.update({name: g.pool.arrays[name] for name in self.row_arrays})

    @property
    def streams(self) -> bool:
        """It has a chunk decoder (a streamed miner can read it)."""
        return self.phase in ("ride", "pool")


class _PredInput(Input):
    """A child of the model's ``pred_<model>`` struct."""

    needs_model = True
    child = ""  # the struct child read, unless the run's parameters choose it (child_of)

    def child_of(self, ctx: RunContext) -> str:
        return self.child

    def path(self, ctx: RunContext, child: str | None = None) -> str:
        return f"{PRED_PREFIX}{ctx.model}.{child or self.child_of(ctx)}"

    def columns(self, ctx: RunContext) -> dict[str, str]:
        return {self.child or self.name: self.path(ctx)}

    def condition(self, ctx: RunContext) -> str | None:
        return f"{self.path(ctx)} IS NOT NULL"

    def present(self, batch: pa.RecordBatch, ctx: RunContext) -> np.ndarray | None:
        return valid_mask(batch.column(self.child or self.name))


class Probs(_PredInput):
    name = "probs"
    help = ("class probabilities: pred_<model>.probs, or softmax(logits / logits_temperature) where "
            "only logits are stored, or the mean of the samples where only samples are stored")
    classes = True
    row_arrays = ("probs",)

    def columns(self, ctx: RunContext) -> dict[str, str]:
        return {"probs": self.path(ctx, "probs"), "logits": self.path(ctx, "logits"),
                "samples": self.path(ctx, "samples")}

    def condition(self, ctx: RunContext) -> str | None:
        return (f"({self.path(ctx, 'probs')} IS NOT NULL OR {self.path(ctx, 'logits')} IS NOT NULL"
                f" OR array_length({self.path(ctx, 'samples')}) > 0)")

    def present(self, batch: pa.RecordBatch, ctx: RunContext) -> np.ndarray | None:
        samples = batch.column("samples")
        has_s = np.asarray(pc.fill_null(pc.list_value_length(samples), 0).to_numpy(zero_copy_only=False)) > 0
        return valid_mask(batch.column("probs")) | valid_mask(batch.column("logits")) | has_s

    def decode(self, batch: pa.RecordBatch, rows: np.ndarray, row_keys: np.ndarray,
               ctx: RunContext) -> dict[str, Any]:
        _, probs = prediction_probs(_take(batch.column("probs"), rows), _take(batch.column("logits"), rows),
                                    ctx.num_classes, ctx.params.get("logits_temperature", 1.0),
                                    samples=_take(batch.column("samples"), rows))
        return {"probs": probs, "classes": lambda: probs.argmax(axis=1)}


class Samples(_PredInput):
    name = "samples"
    child = "samples"
    help = "K MC-dropout passes, ensemble or committee members per row: pred_<model>.samples (N×K×C)"
    classes = True
    row_arrays = ("samples",)

    def decode(self, batch: pa.RecordBatch, rows: np.ndarray, row_keys: np.ndarray,
               ctx: RunContext) -> dict[str, Any]:
        taken = _take(batch.column("samples"), rows)
        ks = np.asarray(pc.list_value_length(taken).to_numpy(zero_copy_only=False))
        if len(ks) and (ks != ks[0]).any():
            raise InvalidArgument(
                f"rows carry different numbers of samples ({int(ks.min())} to {int(ks.max())}); "
                "every row needs the same K (the same MC-dropout passes or committee members)")
        k = int(ks[0]) if len(ks) else 1
        values = pc.list_flatten(pc.list_flatten(taken)).to_numpy(zero_copy_only=False)
        arr = np.asarray(values, dtype=np.float64).reshape(len(rows), k, ctx.num_classes)
        return {"samples": arr, "classes": lambda: arr.mean(axis=1).argmax(axis=1)}


class Boxes(_PredInput):
    """Detections. A run whose ``method`` needs class probabilities (``entropy``,
    ``margin``) refuses the pool with FailedPrecondition naming the first image (its id) and
    box whose ``probs`` are missing or of the wrong length — the fix is to store them or to
    run ``method="one_minus_score"``; under any other method boxes without probs are scored
    without them (every box then counts as class 0 for entropy-NMS)."""

    name = "boxes"
    child = "boxes"
    help = "detections: pred_<model>.boxes (x1, y1, x2, y2, score, per-class probs)"
    classes = True
    PROBS_METHODS = ("entropy", "margin")

    @staticmethod
    def _refuse_box(ctx: RunContext, row_keys: np.ndarray, box_image: np.ndarray, lengths: np.ndarray,
                    c: int) -> None:
        b = int(np.flatnonzero(lengths != c)[0])
        image = int(box_image[b])
        first = int(np.flatnonzero(box_image == image)[0])
        row_id = ids_of_rows(ctx.table, row_keys[image:image + 1])[0]
        got = "no probs" if lengths[b] == 0 else f"{int(lengths[b])} probs"
        raise FailedPrecondition(
            f"row {row_id!r}: {PRED_PREFIX}{ctx.model}.boxes[{b - first}].probs has {got}; "
            f"method={ctx.params.get('method')!r} needs {c} class probabilities on every box "
            f"(the model's classes): store them, or run method='one_minus_score'")

    def decode(self, batch: pa.RecordBatch, rows: np.ndarray, row_keys: np.ndarray,
               ctx: RunContext) -> dict[str, Any]:
        c = ctx.num_classes
        taken = _take(batch.column("boxes"), rows)
        flat = pc.list_flatten(taken)
        box_image = np.asarray(pc.list_parent_indices(taken).to_numpy(zero_copy_only=False), dtype=np.int64)
        if len(flat):
            coords = np.stack([np.asarray(flat.field(k).to_numpy(zero_copy_only=False), dtype=np.float64)
                               for k in ("x1", "y1", "x2", "y2")], axis=1)
            scores = np.asarray(flat.field("score").to_numpy(zero_copy_only=False), dtype=np.float64)
        else:
            coords, scores = np.zeros((0, 4)), np.zeros(0)
        box_probs = None
        if len(flat):
            probs = flat.field("probs")
            lengths = np.asarray(pc.fill_null(pc.list_value_length(probs), 0).to_numpy(zero_copy_only=False))
            needs = ctx.params.get("method") in self.PROBS_METHODS
            if needs and (lengths != c).any():
                self._refuse_box(ctx, row_keys, box_image, lengths, c)
            if probs.null_count == 0 and (lengths == c).all():
                box_probs = np.asarray(pc.list_flatten(probs).to_numpy(zero_copy_only=False),
                                       dtype=np.float64).reshape(-1, c)
        # an image's predicted class: the class of its most confident box (-1: no boxes)
        classes = np.full(len(rows), -1, dtype=np.int64)
        if len(flat):
            box_class = box_probs.argmax(axis=1) if box_probs is not None else np.zeros(len(flat), dtype=np.int64)
            order = np.lexsort((-scores, box_image))
            first = order[np.r_[True, np.diff(box_image[order]) != 0]]
            classes[box_image[first]] = box_class[first]
        return {"box_image": box_image, "boxes": coords, "box_scores": scores, "box_probs": box_probs,
                "n_images": len(rows), "classes": lambda: classes}


class BoxEmbeddings(_PredInput):
    """Detections with their per-object embeddings (``pred_<model>.boxes``, the model declared
    with ``box_embedding_dim``), flattened: ``box_image``, ``boxes`` (x1..y2), ``box_scores``,
    ``box_probs`` (B, C), ``box_emb`` (B, D; zero rows where a box has no embedding),
    ``box_has_emb`` and ``n_images``. Every box needs its C class probabilities: the first
    box without them is refused (FailedPrecondition naming the row and the box)."""

    name = "box_embeddings"
    child = "boxes"
    help = "detections with per-object embeddings: pred_<model>.boxes (..., probs, embedding)"

    def __init__(self, embeddings: bool = True) -> None:
        # False: a scan that needs only scores and probs leaves the embeddings undecoded
        # (box_emb and box_has_emb are None)
        self.embeddings = embeddings

    def decode(self, batch: pa.RecordBatch, rows: np.ndarray, row_keys: np.ndarray,
               ctx: RunContext) -> dict[str, Any]:
        c = ctx.num_classes
        taken = _take(batch.column("boxes"), rows)
        flat = pc.list_flatten(taken)
        box_image = np.asarray(pc.list_parent_indices(taken).to_numpy(zero_copy_only=False), dtype=np.int64)
        d = ctx.model_spec.box_embedding_dim
        if not len(flat):
            return {"box_image": box_image, "boxes": np.zeros((0, 4)), "box_scores": np.zeros(0),
                    "box_probs": np.zeros((0, c)), "box_emb": np.zeros((0, d)),
                    "box_has_emb": np.zeros(0, dtype=bool), "n_images": len(rows)}
        coords = np.stack([np.asarray(flat.field(k).to_numpy(zero_copy_only=False), dtype=np.float64)
                           for k in ("x1", "y1", "x2", "y2")], axis=1)
        scores = np.asarray(flat.field("score").to_numpy(zero_copy_only=False), dtype=np.float64)
        probs = flat.field("probs")
        lengths = np.asarray(pc.fill_null(pc.list_value_length(probs), 0).to_numpy(zero_copy_only=False))
        if (lengths != c).any():
            b = int(np.flatnonzero(lengths != c)[0])
            image = int(box_image[b])
            first = int(np.flatnonzero(box_image == image)[0])
            row_id = ids_of_rows(ctx.table, row_keys[image:image + 1])[0]
            raise FailedPrecondition(
                f"row {row_id!r}: {PRED_PREFIX}{ctx.model}.boxes[{b - first}].probs has "
                f"{'no probs' if lengths[b] == 0 else f'{int(lengths[b])} probs'}; miner "
                f"'{ctx.run.miner}' needs the {c} class probabilities of every box: store them")
        box_probs = np.asarray(pc.list_flatten(probs).to_numpy(zero_copy_only=False),
                               dtype=np.float64).reshape(-1, c)
        if not self.embeddings:
            return {"box_image": box_image, "boxes": coords, "box_scores": scores, "box_probs": box_probs,
                    "box_emb": None, "box_has_emb": None, "n_images": len(rows)}
        emb = np.zeros((len(flat), d))
        has = np.zeros(len(flat), dtype=bool)
        if flat.type.get_field_index("embedding") >= 0:
            e = flat.field("embedding")
            has = valid_mask(e) & (np.asarray(pc.fill_null(pc.list_value_length(e), 0)
                                              .to_numpy(zero_copy_only=False)) == d)
            if has.any():
                emb[has] = np.asarray(pc.list_flatten(e.filter(pa.array(has))).to_numpy(zero_copy_only=False),
                                      dtype=np.float64).reshape(-1, d)
        return {"box_image": box_image, "boxes": coords, "box_scores": scores, "box_probs": box_probs,
                "box_emb": emb, "box_has_emb": has, "n_images": len(rows)}


class ReferenceGtBoxes(Input):
    name = "reference_gt_boxes"
    help = ("ground-truth boxes (gt_boxes) of the labeled rows: reference_where, default every row with "
            "gt_boxes (class counts, and detection quality where the rows also hold the model's boxes)")
    reads_reference = True
    phase = "params"


class Segmentation(_PredInput):
    """A segmentation model's per-image summary chosen by the run's ``summary`` parameter:
    ``pred_<model>.mean_entropy`` / ``topq_entropy`` / ``bald`` as ``(N,)``, or
    ``class_uncertain_fraction`` as ``(N, C)`` (indexing/segmentation.py defines them)."""

    name = "segmentation"
    help = ("a segmentation model's per-image summaries of pixel uncertainty: pred_<model>.mean_entropy, "
            "topq_entropy, bald or class_uncertain_fraction (C per row; the run's class_name picks one)")
    row_arrays = ("seg_summary",)

    def child_of(self, ctx: RunContext) -> str:
        return ctx.params.get("summary", "topq_entropy")

    def decode(self, batch: pa.RecordBatch, rows: np.ndarray, row_keys: np.ndarray,
               ctx: RunContext) -> dict[str, Any]:
        if self.child_of(ctx) == "class_uncertain_fraction":
            name = ctx.params.get("class_name")
            index = None if name is None else ctx.model_spec.classes.index(name)
            fractions = list_matrix(batch.column(self.name), rows, ctx.num_classes)
            return {"seg_summary": summary_scores(fractions, index)}
        values = _take(batch.column(self.name), rows).to_numpy(zero_copy_only=False)
        return {"seg_summary": summary_scores(np.asarray(values, dtype=np.float64))}


class Loss(_PredInput):
    name = "loss"
    child = "loss"
    help = "the loss a learning-loss head predicts: pred_<model>.loss"
    row_arrays = ("loss",)

    def decode(self, batch: pa.RecordBatch, rows: np.ndarray, row_keys: np.ndarray,
               ctx: RunContext) -> dict[str, Any]:
        values = _take(batch.column("loss"), rows).to_numpy(zero_copy_only=False)
        return {"loss": np.asarray(values, dtype=np.float64)}


class Logits(_PredInput):
    name = "logits"
    child = "logits"
    help = "pre-softmax outputs: pred_<model>.logits (N×C)"
    row_arrays = ("logits",)

    def decode(self, batch: pa.RecordBatch, rows: np.ndarray, row_keys: np.ndarray,
               ctx: RunContext) -> dict[str, Any]:
        return {"logits": list_matrix(batch.column("logits"), rows, ctx.num_classes)}


class Aum(_PredInput):
    name = "aum"
    help = "training dynamics: pred_<model>.epoch_logits (E×C per row) and the row's label (labeled rows only)"
    row_arrays = ("epoch_logits", "labels")

    def columns(self, ctx: RunContext) -> dict[str, str]:
        return {"epoch_logits": self.path(ctx, "epoch_logits"), "label": "label"}

    def condition(self, ctx: RunContext) -> str | None:
        return f"({self.path(ctx, 'epoch_logits')} IS NOT NULL AND label IS NOT NULL)"

    @staticmethod
    def _labels(labels: pa.Array, ctx: RunContext) -> np.ndarray:
        index = {name: i for i, name in enumerate(ctx.model_spec.classes)}
        return np.asarray([index.get(v, -1) if v is not None else -1 for v in labels.to_pylist()], dtype=np.int64)

    def present(self, batch: pa.RecordBatch, ctx: RunContext) -> np.ndarray | None:
        # a label that is not one of the model's classes cannot be scored either
        return valid_mask(batch.column("epoch_logits")) & (self._labels(batch.column("label"), ctx) >= 0)

    def decode(self, batch: pa.RecordBatch, rows: np.ndarray, row_keys: np.ndarray,
               ctx: RunContext) -> dict[str, Any]:
        taken = _take(batch.column("epoch_logits"), rows)
        es = np.asarray(pc.list_value_length(taken).to_numpy(zero_copy_only=False))
        if len(es) and (es != es[0]).any():
            raise InvalidArgument("rows carry different numbers of epochs in epoch_logits; AUM needs the same E")
        e = int(es[0]) if len(es) else 1
        values = np.asarray(pc.list_flatten(pc.list_flatten(taken)).to_numpy(zero_copy_only=False), dtype=np.float64)
        return {"epoch_logits": values.reshape(len(rows), e, ctx.num_classes),
                "labels": self._labels(_take(batch.column("label"), rows), ctx)}


class RowUniforms(Input):
    name = "row_uniforms"
    help = "no column: a uniform number per row from the seed and the row's stable id (the random baseline)"
    row_arrays = ("row_uniforms",)

    def decode(self, batch: pa.RecordBatch, rows: np.ndarray, row_keys: np.ndarray,
               ctx: RunContext) -> dict[str, Any]:
        return {"row_uniforms": row_uniforms(row_keys, ctx.run.seed)}


class Vectors(Input):
    name = "vectors"
    help = "the row's embedding: emb_<space> (whole pool: float32, unit vectors for cosine spaces)"
    needs_space = True
    row_arrays = ("vectors",)
    phase = "pool"

    def columns(self, ctx: RunContext) -> dict[str, str]:
        return {"vectors": f"{EMB_PREFIX}{ctx.space}"}

    def condition(self, ctx: RunContext) -> str | None:
        return space_condition(ctx.space)

    def present(self, batch: pa.RecordBatch, ctx: RunContext) -> np.ndarray | None:
        return valid_mask(batch.column("vectors"))

    def decode(self, batch: pa.RecordBatch, rows: np.ndarray, row_keys: np.ndarray,
               ctx: RunContext) -> dict[str, Any]:
        return {"vectors": list_matrix(batch.column("vectors"), rows, ctx.dim)}

    def gather(self, g: Gathered) -> None:
        g.arrays["vectors"] = g.pool.vectors


class ReferenceVectors(Input):
    name = "reference_vectors"
    help = "the reference set's embeddings (rows matching reference_where), when one is given"
    needs_space = True
    reads_reference = True
    phase = "reference"

    def gather(self, g: Gathered) -> None:
        if g.reference is not None:
            g.arrays["reference_vectors"] = g.reference.vectors


class _Graph(Input):
    """A k-NN graph (``params["k"]`` neighbours, default 20) from the graph engine."""

    needs_space = True
    phase = "graph"
    role = ""

    def k(self, g: Gathered) -> int:
        return g.ctx.params.get("k", 20)


class PoolGraph(_Graph):
    name = "pool_graph"
    help = "the pool's own k-NN graph (indices, Euclidean distances), each row's own row left out"
    role = "pool"

    def gather(self, g: Gathered) -> None:
        ctx, pool, k = g.ctx, g.pool, self.k(g)
        ctx.progress(g.spans[self.name][0], f"k-NN graph of {len(pool):,} pool rows (k={k})")
        if len(pool) > 1:
            res = graph(ctx.col, ctx.run.version, ctx.space, ctx.where, min(k, len(pool) - 1), pool.vectors,
                        searched=pool, exclude_self=True, check=ctx.check, progress=g.bar(self.name),
                    objects_where=ctx.objects_where)
            g.arrays[self.name] = (res.indices, res.distances)
            g.graphs[self.role] = res.info.to_dict()
        else:
            g.arrays[self.name] = (np.full((1, 0), -1), np.zeros((1, 0)))


class QueryGraph(_Graph):
    name = "query_graph"
    help = "each pool row's k nearest reference rows (indices, Euclidean distances)"
    reads_reference = True
    role = "query"

    def gather(self, g: Gathered) -> None:
        ctx, ref = g.ctx, g.reference
        if ref is None or len(ref) == 0:
            raise FailedPrecondition(f"the reference filter {ctx.run.reference_where!r} has no vectors in "
                                     f"space '{ctx.space}'")
        res = graph(ctx.col, ctx.run.version, ctx.space, ctx.reference_where, min(self.k(g), len(ref)),
                    g.pool.vectors, searched=ref, check=ctx.check, progress=g.bar(self.name),
                    objects_where=ctx.objects_where)
        g.arrays[self.name] = (res.indices, res.distances)
        g.graphs[self.role] = res.info.to_dict()


class ReferenceGraph(_Graph):
    name = "reference_graph"
    help = "the reference set's own k-NN graph (LOF in novelty mode)"
    reads_reference = True
    role = "reference"

    def gather(self, g: Gathered) -> None:
        ctx, ref = g.ctx, g.reference
        if ref is None or len(ref) < 2:
            raise FailedPrecondition("LOF novelty needs at least 2 reference rows")
        res = graph(ctx.col, ctx.run.version, ctx.space, ctx.reference_where, min(self.k(g), len(ref) - 1),
                    ref.vectors, searched=ref, exclude_self=True, check=ctx.check, progress=g.bar(self.name),
                    objects_where=ctx.objects_where)
        g.arrays[self.name] = (res.indices, res.distances)
        g.graphs[self.role] = res.info.to_dict()


class Labels(Input):
    name = "labels"
    help = "the row's label (rows without one are left out): label"
    row_arrays = ("labels",)

    def columns(self, ctx: RunContext) -> dict[str, str]:
        return {"label": "label"}

    def condition(self, ctx: RunContext) -> str | None:
        return "label IS NOT NULL"

    def present(self, batch: pa.RecordBatch, ctx: RunContext) -> np.ndarray | None:
        return valid_mask(batch.column("label"))

    def decode(self, batch: pa.RecordBatch, rows: np.ndarray, row_keys: np.ndarray,
               ctx: RunContext) -> dict[str, Any]:
        return {"labels": np.asarray(_take(batch.column("label"), rows).to_pylist(), dtype=object)}


class SplitLabel(Input):
    name = "split_label"
    help = ("every row's split (the column named by the split_field parameter, '' for none) and its "
            "label, null where missing")
    row_arrays = ("split", "label")

    def columns(self, ctx: RunContext) -> dict[str, str]:
        field = ctx.params.get("split_field") or ""
        return {"label": "label", **({"split": field} if field else {})}

    def decode(self, batch: pa.RecordBatch, rows: np.ndarray, row_keys: np.ndarray,
               ctx: RunContext) -> dict[str, Any]:
        label = np.asarray(_take(batch.column("label"), rows).to_pylist(), dtype=object)
        names = batch.schema.names
        split = np.asarray(_take(batch.column("split"), rows).to_pylist(), dtype=object) if "split" in names \
            else np.full(len(rows), None, dtype=object)
        return {"label": label, "split": split}


class Content(Input):
    name = "content"
    help = "the row's text, or its uri (the string, or the bytes of the file it names), by the 'of' parameter"
    row_arrays = ("column",)

    @staticmethod
    def column(ctx: RunContext) -> str:
        return "text" if ctx.params.get("of") == "text" else "uri"

    def columns(self, ctx: RunContext) -> dict[str, str]:
        return {"column": self.column(ctx)}

    def condition(self, ctx: RunContext) -> str | None:
        return f"{self.column(ctx)} IS NOT NULL"

    def present(self, batch: pa.RecordBatch, ctx: RunContext) -> np.ndarray | None:
        return valid_mask(batch.column("column"))

    def decode(self, batch: pa.RecordBatch, rows: np.ndarray, row_keys: np.ndarray,
               ctx: RunContext) -> dict[str, Any]:
        return {"column": np.asarray(_take(batch.column("column"), rows).to_pylist(), dtype=object)}


class Seeds(Input):
    name = "seeds"
    help = "seed ids, vectors or texts from the parameters; the pool rows' embeddings"
    needs_space = True
    phase = "params"

    def condition(self, ctx: RunContext) -> str | None:
        return space_condition(ctx.space)


class Stages(Input):
    name = "stages"
    help = "other miners' runs, from the parameters (each stage reads its own miner's inputs)"
    phase = "params"


#: Every input kind by name, in the order a gathered run loads them.
INPUTS: dict[str, Input] = {i.name: i for i in (
    Probs(), Samples(), Boxes(), BoxEmbeddings(), Segmentation(), Loss(), Logits(), Aum(), RowUniforms(), Labels(),
    SplitLabel(), Content(),
    Vectors(),
    ReferenceVectors(), PoolGraph(), QueryGraph(), ReferenceGraph(), ReferenceGtBoxes(), Seeds(), Stages(),
)}


def resolve(names: Sequence[str]) -> list[Input]:
    """The inputs of these names, in :data:`INPUTS` order."""
    order = list(INPUTS)
    return [INPUTS[n] for n in sorted(set(names), key=order.index)]


# -- reading them: chunks and whole pools ----------------------------------------------------


@dataclass(frozen=True)
class Bound:
    """An input bound to one run: what a scan projects for it and its chunk decoder
    (what :func:`miners.vectors.load_pool` takes as ``extra``)."""

    input: Input
    ctx: RunContext

    @property
    def columns(self) -> dict[str, str]:
        return self.input.columns(self.ctx)

    @property
    def row_arrays(self) -> tuple[str, ...]:
        return self.input.row_arrays

    def present(self, batch: pa.RecordBatch) -> np.ndarray | None:
        return self.input.present(batch, self.ctx)

    def decode(self, batch: pa.RecordBatch, rows: np.ndarray, row_keys: np.ndarray) -> dict[str, Any]:
        return self.input.decode(batch, rows, row_keys, self.ctx)


def projection(bound: Sequence[Bound]) -> dict[str, str]:
    """The columns a scan reads for these inputs. No ``id``: rows are tracked by stable row
    id and only the picks are named at the end (reading every id costs more than scoring)."""
    proj: dict[str, str] = {}
    for b in bound:
        proj.update(b.columns)
    return proj or {"id": "id"}  # an empty projection would read every column


def condition(inputs: Sequence[Input], ctx: RunContext) -> str | None:
    """SQL true for the rows that carry every input."""
    parts = [c for c in (i.condition(ctx) for i in inputs) if c]
    return " AND ".join(parts) or None


def decode_chunk(bound: Sequence[Bound], batch: pa.RecordBatch,
                 row_keys: np.ndarray) -> tuple[np.ndarray, dict[str, Any]]:
    """(positions of the batch rows that carry every input, their arrays)."""
    mask = None
    for b in bound:
        m = b.present(batch)
        if m is not None:
            mask = m if mask is None else mask & m
    keep = np.arange(batch.num_rows) if mask is None else np.flatnonzero(mask)
    arrays: dict[str, Any] = {}
    for b in bound:
        for name, value in b.decode(batch, keep, row_keys[keep]).items():
            arrays.setdefault(name, value)  # "classes": the first input that gives them
    return keep, arrays


def scan_arrays(ctx: RunContext, inputs: Sequence[Input], *,
                per_chunk: Callable[[dict[str, Any]], dict[str, np.ndarray]] | None = None,
                chunk_rows: int = 65_536, span: tuple[float, float] | None = None
                ) -> tuple[np.ndarray, dict[str, np.ndarray], int]:
    """The whole pool (``ctx.where`` at the run's version), chunk by chunk, through the
    inputs' chunk decoders: ``(row ids, arrays, rows scanned)`` of the rows that carry
    every input, each ``row_arrays`` entry concatenated — or, with ``per_chunk``, what it
    returns for each chunk's arrays (one entry per row: a score, a digest), so that only
    that is kept. For run hooks that need every row's values but no vectors (confident
    learning, exact duplicates, ``select``'s objectives); ``ctx.check`` runs between chunks,
    and with a ``span`` (a run whose main phase is this scan) ``ctx.progress`` reports the rows
    scanned, with an ETA, across that part of the bar."""
    bound = [Bound(i, ctx) for i in inputs]
    query = ctx.table.search().select(projection(bound)).limit(None).with_row_id(True)
    if ctx.where:
        query = query.where(ctx.where)
    total = 0 if span is None else ctx.table.count_rows(ctx.where) if ctx.where else ctx.table.count_rows()
    keys: list[np.ndarray] = []
    parts: dict[str, list[np.ndarray]] = {}
    scanned = 0
    t0 = time.perf_counter()
    for batch in query.to_batches(chunk_rows):
        ctx.check()
        scanned += batch.num_rows
        if span is not None:
            ctx.progress(span[0] + (span[1] - span[0]) * min(1.0, scanned / max(1, total)),
                         f"scanning {scanned:,} of {total:,} rows{eta_text(scanned, total, time.perf_counter() - t0)}")
        row_keys = np.asarray(batch.column("_rowid").to_numpy(zero_copy_only=False), dtype=np.uint64)
        keep, arrays = decode_chunk(bound, batch, row_keys)
        if not len(keep):
            continue
        kept = per_chunk(arrays) if per_chunk is not None else \
            {n: arrays[n] for b in bound for n in b.row_arrays}
        keys.append(row_keys[keep])
        for n, v in kept.items():
            parts.setdefault(n, []).append(np.asarray(v))
    out = {n: np.concatenate(chunks) for n, chunks in parts.items()}
    return (np.concatenate(keys) if keys else np.zeros(0, np.uint64)), out, scanned


def _phase(progress: Progress, lo: float, hi: float) -> Progress:
    """``progress`` for a phase that spans [lo, hi] of the run's bar."""
    return lambda f, m: progress(lo + (hi - lo) * min(1.0, max(0.0, f)), m)


class Gathered:
    """The whole pool of a gathered run and the arrays its inputs add to it.

    :meth:`load` scans the pool once — its vectors (``Vectors``) plus every input that rides
    along (``present``/``decode`` per chunk, e.g. BADGE's probabilities) — and the reference
    set when an input reads it; then each input's ``gather`` adds its arrays (k-NN graphs
    last). The run's progress bar: loading [0, ``load_hi``] (the reference set its last
    30 %), the graphs share [``load_hi``, ``graph_hi``], scoring or picking the rest."""

    def __init__(self, ctx: RunContext, inputs: Sequence[Input]) -> None:
        self.ctx = ctx
        self.inputs = list(inputs)
        self.arrays: dict[str, Any] = {}
        self.graphs: dict[str, dict[str, Any]] = {}
        self.pool: Pool | None = None
        self.reference: Pool | None = None
        graphs = [i for i in self.inputs if i.phase == "graph"]
        self.needs_reference = bool(ctx.reference_where) and any(i.reads_reference for i in self.inputs)
        self.load_hi = 0.1 if graphs else 0.3
        self.ref_lo = self.load_hi * (0.7 if self.needs_reference else 1.0)
        self.graph_hi = 0.9 if graphs else self.load_hi
        edges = np.linspace(self.load_hi, self.graph_hi, len(graphs) + 1)
        self.spans = {g.name: (float(edges[i]), float(edges[i + 1])) for i, g in enumerate(graphs)}

    def bar(self, name: str) -> Progress:
        return _phase(self.ctx.progress, *self.spans[name])

    def load(self) -> None:
        ctx = self.ctx
        ctx.progress(0.0, "loading the pool's vectors")
        ride = [Bound(i, ctx) for i in self.inputs if i.phase == "ride"]
        self.pool = load_pool(ctx.col, ctx.run.version, ctx.space, ctx.where, extra=ride, check=ctx.check,
                              progress=_phase(ctx.progress, 0.0, self.ref_lo), objects_where=ctx.objects_where)
        if len(self.pool) == 0:
            if self.pool.boxes is not None:
                raise FailedPrecondition(
                    f"none of the {self.pool.scanned:,} boxes of the pool{' matching objects_where' if ctx.objects_where else ''} "
                    f"has an embedding in object space '{ctx.space}'; store an embedding on the boxes "
                    "(the inference runner's box_embeddings=<layer>)")
            raise FailedPrecondition(f"none of the {self.pool.scanned:,} pool rows has a vector in space "
                                     f"'{ctx.space}'")
        self.arrays["row_keys"] = self.pool.row_keys
        if self.needs_reference:
            ctx.progress(self.ref_lo, "loading the reference set's vectors")
            self.reference = load_pool(ctx.col, ctx.run.version, ctx.space, ctx.reference_where, check=ctx.check,
                                       progress=_phase(ctx.progress, self.ref_lo, self.load_hi),
                                       objects_where=ctx.objects_where)
        for inp in self.inputs:
            if inp.phase in ("pool", "ride", "reference"):
                inp.gather(self)

    def build_graphs(self) -> None:
        for inp in self.inputs:
            if inp.phase == "graph":
                inp.gather(self)


__all__ = ["INPUTS", "Bound", "Gathered", "Input", "RunContext", "condition", "decode_chunk", "projection",
           "resolve", "scan_arrays"]
