"""The miner registry: each miner describes itself — what it reads, its parameters, the
function it runs — and the runner, the service and ``assay miners`` read only that.

A miner is a pure function on arrays (in ``miners/<family>.py``, math in its docstring)
plus one :func:`register` call of a :class:`MinerSpec` declaring

* ``inputs`` — what each row must carry, by input kind (:data:`miners.inputs.INPUTS`):
  ``probs`` (``pred_<model>.probs``, or ``softmax(logits / T)`` where only logits are
  stored), ``samples`` (K MC-dropout passes or committee members), ``boxes`` (detections),
  ``segmentation`` (a segmentation model's per-image summaries), ``loss`` (learning-loss
  head), ``logits``, ``aum`` (``epoch_logits`` and the row's ``label``), ``vectors`` (an
  embedding space), ``reference_vectors``, the k-NN graphs
  ``pool_graph`` / ``query_graph`` / ``reference_graph``... Each input kind knows its
  columns, its "row has it" SQL and its decoder, so the model / space a request must name
  follows from the inputs;
* ``params`` — typed, with ranges and defaults, validated before a run starts;
* ``score`` — chunk arrays → one score per row, higher = more worth labeling; the runner
  keeps a running top-k (so any pool size streams in O(size + chunk) memory), or
* ``select`` — a batch algorithm whose picks depend on each other: on the top
  ``candidates`` rows by ``score`` (BatchBALD), or on the whole pool (``gather=True``:
  coreset, BADGE).

Optional hooks, for miners that do more than score rows: ``inputs_for(params)`` (inputs
that depend on a parameter: ``activation`` reads logits or vectors), ``validate_run(ctx)``
(checks beyond each parameter's range, before anything runs: ``knn``'s seeds, ``chain``'s
stages) and ``run(ctx)`` (a miner that drives its own run: ``knn``, ``chain``;
:mod:`miners.direct`).

Every scored miner also accepts the shared parameters in :data:`COMMON_PARAMS`:
``stochastic`` (power / softmax Gumbel-top-k sampling), ``temperature``,
``logits_temperature`` and ``balance`` (class-balanced budgets). A miner's own parameter
may not reuse one of those names, nor a name the runner passes to ``select`` (``seed``,
``progress``, ``check``, ``stats``, ``on_pick``): :func:`register` refuses it.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from indexing import measures, segmentation
from indexing.errors import FailedPrecondition, InvalidArgument
from indexing.settings import (
    LABEL_ISSUE_MIN_PER_CLASS,
    MAX_SIZE,
    PROBCOVER_PURITY,
    SEMDEDUP_EPS,
    TYPICLUST_K,
    TYPICLUST_MAX_CLUSTERS,
    TYPICLUST_MIN_CLUSTER,
)
from miners import (
    bayesian,
    coldstart,
    dedup,
    density,
    detection,
    detection_runs,
    direct,
    diversity,
    knn,
    training_dynamics,
    uncertainty,
)
from miners.inputs import INPUTS, Input, RunContext, resolve
from miners.runs import STAGE_FIELDS, MiningOutput

Arrays = Mapping[str, Any]


@dataclass(frozen=True)
class Param:
    """A typed miner parameter. ``kind`` is "int", "float", "bool", "choice" or "json"
    (a structured value checked by ``check``, e.g. a list of seed ids). ``embed_to`` (texts):
    the server embeds the texts with the space's text embedder and appends the vectors to
    that parameter before the run is recorded."""

    name: str
    kind: str
    default: Any
    help: str
    min: float | None = None
    max: float | None = None
    choices: tuple[str, ...] = ()
    check: Callable[[Any], Any] | None = None
    embed_to: str | None = None

    def coerce(self, value: Any) -> Any:
        """The validated value; ValueError naming the parameter and the allowed range."""
        if value is None:
            return self.default
        if self.kind == "json":
            return self.check(value) if self.check else value
        if self.kind == "bool":
            if not isinstance(value, bool):
                raise ValueError(f"parameter '{self.name}' must be true or false, got {value!r}")
            return value
        if self.kind == "choice":
            if value not in self.choices:
                raise ValueError(f"parameter '{self.name}' must be one of {', '.join(self.choices)}, got {value!r}")
            return value
        if isinstance(value, bool) or not isinstance(value, int | float | np.integer | np.floating):
            raise ValueError(f"parameter '{self.name}' must be a number, got {value!r}")
        if self.kind == "int":
            if float(value) != int(value):
                raise ValueError(f"parameter '{self.name}' must be an integer, got {value!r}")
            value = int(value)
        else:
            value = float(value)
            if not np.isfinite(value):
                raise ValueError(f"parameter '{self.name}' must be finite, got {value!r}")
        if (self.min is not None and value < self.min) or (self.max is not None and value > self.max):
            raise ValueError(f"parameter '{self.name}' must be in [{_fmt(self.min)}, {_fmt(self.max)}], got {value!r}")
        return value

    def describe(self) -> dict[str, Any]:
        out = {"name": self.name, "type": self.kind, "default": self.default, "help": self.help}
        if self.min is not None:
            out["min"] = self.min
        if self.max is not None:
            out["max"] = self.max
        if self.choices:
            out["choices"] = list(self.choices)
        return out


def _fmt(x: float | None) -> str:
    return "-inf" if x is None else f"{x:g}"


COMMON_PARAMS: tuple[Param, ...] = (
    Param("stochastic", "choice", "none",
          "sample the batch instead of taking the top scores: 'power' (p ∝ score^(1/T)) or "
          "'softmax' (p ∝ exp(score/T)), Gumbel-top-k, reproducible from the seed",
          choices=("none", "power", "softmax")),
    Param("temperature", "float", 1.0, "temperature of stochastic sampling", min=1e-6, max=1e6),
    Param("logits_temperature", "float", 1.0,
          "temperature applied to stored logits before the softmax (rows without probs)", min=1e-6, max=1e6),
    Param("balance", "choice", "none",
          "split the budget across predicted classes: 'equal' shares or 'inverse_frequency' "
          "(rarer classes — by labeled counts — get more)",
          choices=("none", "equal", "inverse_frequency")),
)


#: Names the runner gives ``select`` besides the miner's parameters (see ``_batchbald``).
RESERVED_PARAMS: frozenset[str] = frozenset({"seed", "progress", "check", "stats", "on_pick"})


@dataclass(frozen=True)
class MinerSpec:
    """A miner: see the module docstring. ``gather``: the miner needs the whole pool at once
    (vectors, k-NN graphs): the runner loads it (memory-mapped when large) and calls
    ``score`` (then keeps the top-k) or ``select``. ``reference``: "none", "optional" or
    "required" — whether a request may / must give ``reference_where``."""

    name: str
    family: str
    description: str
    inputs: tuple[str, ...]
    score: Callable[[Arrays, dict[str, Any]], np.ndarray | dict[str, np.ndarray]] | None
    params: tuple[Param, ...] = ()
    select: Callable[[Arrays, int, dict[str, Any]], tuple[np.ndarray, np.ndarray]] | None = None
    supports_common: bool = True
    gather: bool = False
    reference: str = "none"
    inputs_for: Callable[[dict[str, Any]], tuple[str, ...]] | None = None
    validate_run: Callable[[RunContext], dict[str, Any] | None] | None = None
    run: Callable[[RunContext], MiningOutput] | None = None
    # a run without a seed draws a fresh one (recorded): a sampling miner's unseeded runs differ
    fresh_seed: bool = False
    param_index: dict[str, Param] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        params = (*self.params, *(COMMON_PARAMS if self.takes_common else ()))
        object.__setattr__(self, "params", params)
        object.__setattr__(self, "param_index", {p.name: p for p in params})

    @property
    def takes_common(self) -> bool:
        """It takes :data:`COMMON_PARAMS`: a scored miner (no batch ``select``, no ``run``)."""
        return self.supports_common and self.select is None and self.run is None

    @property
    def own_params(self) -> tuple[Param, ...]:
        """The miner's own parameters (``params`` ends with the shared ones it takes)."""
        return self.params[:len(self.params) - len(COMMON_PARAMS)] if self.takes_common else self.params

    def validate(self, given: Mapping[str, Any] | None) -> dict[str, Any]:
        given = dict(given or {})
        unknown = sorted(set(given) - set(self.param_index))
        if unknown:
            raise ValueError(
                f"miner '{self.name}': unknown parameter(s) {', '.join(unknown)} "
                f"(allowed: {', '.join(self.param_index) or 'none'})"
            )
        return {name: p.coerce(given.get(name)) for name, p in self.param_index.items()}

    def input_kinds(self, params: Mapping[str, Any] | None = None) -> list[Input]:
        """What a run with these (validated) parameters reads; all declared inputs without."""
        names = self.inputs_for(dict(params)) if self.inputs_for is not None and params is not None \
            else self.inputs
        stray = set(names) - set(self.inputs)
        if stray:
            raise AssertionError(f"miner '{self.name}': inputs_for gave undeclared input(s) {sorted(stray)}")
        return resolve(names)

    def needs_model(self, params: Mapping[str, Any] | None = None) -> bool:
        return any(i.needs_model for i in self.input_kinds(params))

    def needs_space(self, params: Mapping[str, Any] | None = None) -> bool:
        return any(i.needs_space for i in self.input_kinds(params))

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "family": self.family, "description": self.description,
                "inputs": list(self.inputs), "batch": self.select is not None or self.run is not None,
                "reference": self.reference, "params": [p.describe() for p in self.params]}


REGISTRY: dict[str, MinerSpec] = {}


def _refuse(spec: MinerSpec, why: str) -> None:
    raise ValueError(f"cannot register miner '{spec.name}': {why}")


def register(spec: MinerSpec) -> MinerSpec:
    """Add a miner. Refused (ValueError) when the name is taken, an input is unknown, a
    parameter is named twice or reuses a shared / reserved name, a default is out of its own
    range, or the functions do not fit the inputs (see :class:`MinerSpec`)."""
    if spec.name in REGISTRY:
        _refuse(spec, "the name is already registered")
    unknown = [n for n in spec.inputs if n not in INPUTS]
    if unknown:
        _refuse(spec, f"unknown input(s) {', '.join(unknown)} (known: {', '.join(INPUTS)})")
    own = [p.name for p in spec.own_params]
    twice = sorted({n for n in own if own.count(n) > 1})
    if twice:
        _refuse(spec, f"parameter(s) {', '.join(twice)} declared twice")
    shared = sorted(set(own) & ({p.name for p in COMMON_PARAMS} | RESERVED_PARAMS))
    if shared:
        _refuse(spec, f"parameter name(s) {', '.join(shared)} are taken by the shared parameters "
                      f"({', '.join(p.name for p in COMMON_PARAMS)}) or by the runner "
                      f"({', '.join(sorted(RESERVED_PARAMS))}); choose another name")
    for p in spec.own_params:
        if p.kind not in ("int", "float", "bool", "choice", "json"):
            _refuse(spec, f"parameter '{p.name}' has kind {p.kind!r} (int, float, bool, choice or json)")
        if p.kind != "json":
            try:
                p.coerce(p.default)
            except ValueError as exc:
                _refuse(spec, f"the default of parameter '{p.name}' is invalid: {exc}")
        if p.embed_to is not None and p.embed_to not in spec.param_index:
            _refuse(spec, f"parameter '{p.name}' embeds into '{p.embed_to}', which is not a parameter")
    if spec.reference not in ("none", "optional", "required"):
        _refuse(spec, f"reference must be 'none', 'optional' or 'required', not {spec.reference!r}")
    kinds = spec.input_kinds()
    if spec.run is not None:
        if spec.score is not None or spec.select is not None:
            _refuse(spec, "a miner with a run hook has neither score nor select")
    elif spec.gather:
        if spec.score is None and spec.select is None:
            _refuse(spec, "give score or select")
        if not spec.needs_space():
            _refuse(spec, "a gathered miner reads the pool's vectors: declare the 'vectors' input")
    else:
        if spec.score is None:
            _refuse(spec, "a streamed miner needs score (select runs on its top `candidates`)")
        late = [i.name for i in kinds if not i.streams]
        if late:
            _refuse(spec, f"input(s) {', '.join(late)} need the whole pool: register with gather=True")
        if spec.select is not None:
            if "candidates" not in spec.param_index:
                _refuse(spec, "a streamed select runs on the top `candidates` rows: declare a 'candidates' parameter")
            if not any(i.row_arrays for i in kinds):
                _refuse(spec, "a streamed select needs an input with one array entry per row")
    REGISTRY[spec.name] = spec
    return spec


def get(name: str) -> MinerSpec:
    if name not in REGISTRY:
        raise KeyError(name)
    return REGISTRY[name]


# -- uncertainty from class probabilities -------------------------------------------------

def _on_probs(fn: Callable[..., np.ndarray]) -> Callable[[Arrays, dict[str, Any]], np.ndarray]:
    # probabilities were validated when they were written (and softmax output is valid)
    return lambda a, p: fn(a["probs"], validate=False)


for _m in measures.PROB_MEASURES.values():
    register(MinerSpec(_m.name, "uncertainty", _m.help, ("probs",), _on_probs(_m.fn)))


# -- MC dropout / ensembles / committees (samples: N x K x C) -----------------------------

def _on_samples(fn: Callable[[np.ndarray], np.ndarray]) -> Callable[[Arrays, dict[str, Any]], np.ndarray]:
    return lambda a, p: fn(a["samples"])


for _m in measures.SAMPLE_MEASURES.values():
    register(MinerSpec(_m.name, "bayesian", _m.help, ("samples",), _on_samples(_m.fn)))


def _batchbald(arrays: Arrays, size: int, params: dict[str, Any]) -> tuple[np.ndarray, np.ndarray]:
    # Optional hooks the runner may add to params (they are not user parameters): "progress"
    # (fraction, message) over the greedy part, "check" (raises to cancel), "stats" (a dict).
    try:
        return bayesian.batchbald_select(
            arrays["samples"], size, num_configs=params["num_configs"], seed=params["seed"],
            greedy_max=params["greedy_max"], min_gain_ratio=params["min_gain_ratio"],
            progress=params.get("progress"), check=params.get("check"), stats=params.get("stats"))
    except ValueError as exc:  # bad samples: the caller's to fix, not an internal error
        raise InvalidArgument(f"miner 'batchbald': {exc}", field="samples") from exc


register(MinerSpec(
    "batchbald", "bayesian",
    "BatchBALD: greedy joint mutual information of the batch (no redundant picks); runs on the "
    "top `candidates` rows by BALD. The K samples hold at most log K nats, so once no candidate "
    "can add `min_gain_ratio` of the first pick's gain (or after `greedy_max` greedy picks) the "
    "rest of the batch is drawn by PowerBALD (sampled ∝ BALD, seeded); those picks score their BALD",
    ("samples",), _on_samples(bayesian.bald_scores),
    params=(
        Param("candidates", "int", 1000, "rows by BALD the batch is chosen from", min=1, max=100_000),
        Param("num_configs", "int", 10_000, "sampled joint configurations once C^n exceeds the exact budget",
              min=100, max=1_000_000),
        Param("greedy_max", "int", 100, "at most this many greedy BatchBALD picks; the rest by PowerBALD",
              min=1, max=100_000),
        Param("min_gain_ratio", "float", 1e-9,
              "greedy picks stop once the best gain (or the information left about the K samples) "
              "falls below this fraction of the first pick's gain; the rest by PowerBALD",
              min=0.0, max=0.5),
    ),
    select=_batchbald,
))


# -- object detection -----------------------------------------------------------------------

def _detection(arrays: Arrays, params: dict[str, Any]) -> np.ndarray:
    return detection.detection_scores(
        arrays["box_image"], arrays["boxes"], arrays["box_scores"], arrays["box_probs"], arrays["n_images"],
        method=params["method"], aggregate=params["aggregate"],
        nms_iou=None if params["nms_iou"] >= 1.0 else params["nms_iou"],
    )


register(MinerSpec(
    "detection", "detection",
    "per-box uncertainty (entropy, 1 − score or margin), entropy-NMS, aggregated per image",
    ("boxes",), _detection,
    params=(
        Param("method", "choice", "entropy", "per-box uncertainty", choices=("entropy", "one_minus_score", "margin")),
        Param("aggregate", "choice", "sum", "per-image aggregation", choices=("sum", "mean", "max")),
        Param("nms_iou", "float", 0.5, "entropy-NMS IoU threshold (1 = no NMS)", min=0.0, max=1.0),
    ),
))


register(MinerSpec(
    "divproto", "detection",
    "DivProto (Wu et al. 2022): images by entropy-NMS uncertainty, skipping one whose entropy-weighted class "
    "prototype (of its box embeddings) is within cosine `intra_threshold` of a picked image's prototype of that "
    "class, or whose classes used up their budgets (rarer classes by labeled gt_boxes get more); runs on the top "
    "`candidate_ratio` × size images",
    ("box_embeddings", "reference_gt_boxes"), None, run=detection_runs.divproto_run,
    validate_run=detection_runs.validate, reference="optional",
    params=(
        Param("candidate_ratio", "float", 10.0, "candidates walked: the top ratio × size images by uncertainty",
              min=1.0, max=1000.0),
        Param("intra_threshold", "float", 0.7, "skip an image whose class prototype has a cosine similarity above "
              "this with a picked image's prototype of the same class", min=-1.0, max=1.0),
        Param("aggregate", "choice", "sum", "per-image aggregation of the kept boxes' entropies",
              choices=("sum", "mean", "max")),
        Param("enms", "choice", "iou", "entropy-NMS within an image: by box IoU (nms_iou), or by the cosine "
              "similarity of the boxes' embeddings (enms_similarity; the paper's ENMS)", choices=("iou", "feature")),
        Param("nms_iou", "float", 0.5, "entropy-NMS IoU threshold (1 = no NMS)", min=0.0, max=1.0),
        Param("enms_similarity", "float", 0.9, "feature entropy-NMS: suppress a same-class box above this cosine "
              "similarity to a kept, more uncertain one", min=-1.0, max=1.0),
        Param("fill", "bool", True, "when the candidates run out, fill the batch with the skipped images by score"),
    ),
))
register(MinerSpec(
    "ppal", "detection",
    "PPAL (Yang et al. 2024): difficulty-calibrated box uncertainty (per-class weights from the labeled gt_boxes' "
    "detection quality) picks `candidate_ratio` × size candidates (at most "
    f"{detection.PPAL_MAX_CANDIDATES:,}), then k-center seeding + k-medoids on category-conditioned matching "
    "distances of their box embeddings",
    ("box_embeddings", "reference_gt_boxes"), None, run=detection_runs.ppal_run,
    validate_run=detection_runs.validate, reference="optional",
    params=(
        Param("candidate_ratio", "float", 4.0, "candidate pool: ratio × size images by calibrated uncertainty",
              min=1.0, max=100.0),
        Param("uncertainty", "choice", "score_entropy", "box uncertainty: binary entropy of the box score (PPAL) "
              "or normalised entropy of its class probabilities", choices=("score_entropy", "entropy")),
        Param("score_threshold", "float", 0.05, "boxes scored below this are ignored", min=0.0, max=1.0),
        Param("alpha", "float", 0.3, "curvature of the difficulty weight", min=0.01, max=10.0),
        Param("upper", "float", 0.2, "a class of quality 0 weighs 1 + upper", min=0.0, max=10.0),
        Param("xi", "float", 0.6, "quality = p^xi · IoU^(1 − xi) of the best-overlapping prediction per gt box",
              min=0.0, max=1.0),
        Param("iterations", "int", 20, "k-medoids refinement rounds after k-center seeding (0: seeding only)",
              min=0, max=1000),
    ),
))


# -- segmentation ---------------------------------------------------------------------------

def _class_name(value: Any) -> Any:
    if not isinstance(value, str) or not value:
        raise ValueError(f"parameter 'class_name' must be one of the model's class names (a string), got {value!r}")
    return value


def _validate_segmentation(ctx: RunContext) -> dict[str, Any] | None:
    spec = ctx.model_spec
    if spec is not None and spec.task != "segmentation":
        raise FailedPrecondition(f"miner 'segmentation' reads a segmentation model's summaries; '{spec.name}' is a "
                                 f"{spec.task} model (register one with task='segmentation')")
    name = ctx.params.get("class_name")
    if name is not None:
        if ctx.params["summary"] != "class_uncertain_fraction":
            raise InvalidArgument("parameter 'class_name' applies to summary='class_uncertain_fraction' only")
        if name not in spec.classes:
            raise InvalidArgument(f"parameter 'class_name': {name!r} is not a class of model '{spec.name}' "
                                  f"(classes: {', '.join(spec.classes)})")
    return None


def _segmentation(arrays: Arrays, params: dict[str, Any]) -> np.ndarray:
    # the input's decoder already picked the summary (and class) the run asked for, with
    # indexing.segmentation.summary_scores (it knows the model's classes)
    return arrays["seg_summary"]


register(MinerSpec(
    "segmentation", "segmentation",
    "rank images by a segmentation model's per-image pixel uncertainty: top-q% pixel entropy (default), "
    "mean pixel entropy, MC-dropout pixel BALD, or the fraction of a class's pixels that are uncertain",
    ("segmentation",), _segmentation,
    params=(
        Param("summary", "choice", "topq_entropy", "the per-image summary to rank by",
              choices=segmentation.RANKABLE),
        Param("class_name", "json", None,
              "with summary='class_uncertain_fraction': the class whose uncertain-pixel fraction ranks "
              "(default: the largest fraction over the classes)", check=_class_name),
    ),
    validate_run=_validate_segmentation,
))


# -- training signals -----------------------------------------------------------------------

register(MinerSpec("learning_loss", "training", "rank by the loss predicted by a learning-loss head",
                   ("loss",), lambda a, p: training_dynamics.learning_loss_scores(a["loss"])))
register(MinerSpec(
    "aum", "training",
    "area under the margin over training epochs; low AUM (high score = −AUM) flags likely mislabeled items",
    ("aum",), lambda a, p: training_dynamics.aum_scores(a["epoch_logits"], a["labels"]),
))


def random_scores(arrays: Arrays, params: dict[str, Any]) -> np.ndarray:
    """Uniform random scores (the baseline); the runner derives them from the seed and
    the rows' stable ids, so a random batch is reproducible."""
    return arrays["row_uniforms"]


register(MinerSpec("random", "baseline",
                   "uniformly random rows (the baseline every strategy must beat); without a seed a fresh "
                   "one is drawn and recorded in the run",
                   ("row_uniforms",), random_scores, supports_common=False, fresh_seed=True))


# -- embedding space (gathered: the pool's vectors, k-NN graphs) ----------------------------

K_PARAM = Param("k", "int", 20, "neighbours in the k-NN graph", min=1, max=1000)


def _novelty(a: Arrays, p: dict[str, Any]) -> np.ndarray:
    if p["method"] == "lof":
        return density.lof_novelty_scores(*a["query_graph"], *a["reference_graph"])
    return density.knn_distance_scores(a["query_graph"][1], how=p["how"])


register(MinerSpec(
    "embedding_distance", "embedding", "pool items farthest from their nearest reference item",
    ("vectors", "query_graph"), lambda a, p: density.nearest_distance(a["query_graph"][1]),
    params=(Param("k", "int", 1, "reference neighbours looked up (the nearest one scores)", min=1, max=1),),
    gather=True, reference="required",
))
register(MinerSpec(
    "novelty", "embedding",
    "density-aware novelty against the reference set: LOF in novelty mode, or k-NN distance",
    ("vectors", "query_graph", "reference_graph"), _novelty,
    params=(K_PARAM,
            Param("method", "choice", "lof", "LOF novelty or plain k-NN distance", choices=("lof", "knn_distance")),
            Param("how", "choice", "kth", "k-NN distance: to the k-th neighbour or the mean", choices=("kth", "mean"))),
    gather=True, reference="required",
))
register(MinerSpec(
    "lof", "embedding", "Local Outlier Factor inside the pool (k-NN graph from the ANN index or exact)",
    ("vectors", "pool_graph"), lambda a, p: density.lof_scores(*a["pool_graph"]),
    params=(K_PARAM,), gather=True,
))
register(MinerSpec(
    "typicality", "embedding", "most typical items first: 1 / mean distance to the k nearest (TypiClust)",
    ("vectors", "pool_graph"), lambda a, p: density.typicality_scores(a["pool_graph"][1]),
    params=(K_PARAM,), gather=True,
))


def _near_duplicates(a: Arrays, p: dict[str, Any]) -> dict[str, np.ndarray]:
    """Each row that duplicates an earlier row (smaller row id) within ``threshold``:
    score = −distance (closest first), related = that earlier row."""
    indices, distances = a["pool_graph"]
    pairs, dist = density.near_duplicate_pairs(indices, distances, p["threshold"])
    scores = np.full(len(indices), np.nan)
    related = np.full(len(indices), -1, dtype=np.int64)
    if len(pairs):
        keys = a["row_keys"]
        swap = keys[pairs[:, 0]] < keys[pairs[:, 1]]
        later = np.where(swap, pairs[:, 1], pairs[:, 0])
        earlier = np.where(swap, pairs[:, 0], pairs[:, 1])
        order = np.lexsort((dist, later))  # per later row, its closest earlier twin first
        first = order[np.r_[True, np.diff(later[order]) != 0]]
        scores[later[first]], related[later[first]] = -dist[first], earlier[first]
    return {"scores": scores, "related": related}


register(MinerSpec(
    "near_duplicates", "embedding",
    "rows within `threshold` (Euclidean; unit vectors for cosine spaces) of an earlier row, closest first; "
    "related_id names the row each duplicates",
    ("vectors", "pool_graph"), _near_duplicates,
    params=(Param("k", "int", 10, "neighbours examined per row", min=1, max=1000),
            Param("threshold", "float", 0.05, "largest distance that counts as a duplicate", min=0.0, max=1e9)),
    gather=True, supports_common=False,
))


def pick_progress(progress: Callable[[float, str], None], check: Callable[[], None], name: str, *,
                  share: float = 0.0, what: str = "preparing"
                  ) -> tuple[Callable[[int, int], None], Callable[[int, int], None]]:
    """``(on_pick, on_prepare)`` for a batch selector: ``on_pick(done, size)`` per pick and
    ``on_prepare(done, total)`` per block of a long preparation before the picks (coreset's
    reference seeding), which fills ``share`` of the bar, the picks the rest. Cancel is
    checked at every call; progress, with the phase's ETA, at most every 0.5 s and at each
    phase's end. The runner hands every selector an ``on_pick`` made here (``share`` 0)."""
    t0, last = [time.perf_counter(), time.perf_counter()], [0.0]

    def report(fraction: float, message: str, done: int, total: int, phase: int) -> None:
        check()
        now = time.perf_counter()
        if done == total or now - last[0] >= 0.5:
            last[0] = now
            el = now - t0[phase]
            # the picks' last report says "ETA 0 s", as it always has; the preparation's does not
            eta = f", ETA {el * (total - done) / done:.0f} s" if done and (done < total or phase) else ""
            progress(fraction, message + eta)
        if phase == 0 and done == total:
            t0[1] = now  # the picks' ETA counts from here

    def on_prepare(done: int, total: int) -> None:
        report(share * done / max(1, total), f"{name}: {what}: {done:,} of {total:,} rows", done, total, 0)

    def on_pick(done: int, total: int) -> None:
        report(share + (1.0 - share) * done / max(1, total), f"{name}: {done:,} of {total:,} picks", done, total, 1)

    return on_pick, on_prepare


#: coreset's exact reference seeding (``N L d`` multiply-adds of blocked GEMM) up to this
#: size; above it each pool row's nearest reference row comes from the k-NN graph engine and
#: only the rows about to be picked are checked against the whole reference set
#: (:func:`miners.diversity.kcenter_greedy`'s ``reference_nearest``). The exact seeding ran
#: at ~6.4e10 a second on 2 cores (1M x 9,967 x 384 in ~60 s): 1e13 is ~2.6 min; a 10M pool
#: against 100k labeled rows (3.8e14) had an ETA of 3.7 h there.
CORESET_EXACT_SEED_MACS = 1e13


def _coreset(a: Arrays, size: int, p: dict[str, Any]) -> tuple[np.ndarray, np.ndarray]:
    ref = a.get("reference_vectors")
    ref = ref if ref is not None and len(ref) else None
    x = a["vectors"]
    on_pick, on_reference = p.get("on_pick"), None
    reports = p.get("progress") is not None and p.get("check") is not None
    progress = p.get("progress") or (lambda f, m: None)
    check = p.get("check") or (lambda: None)
    nearest = None
    if ref is not None and size and float(len(x)) * len(ref) * x.shape[1] > CORESET_EXACT_SEED_MACS:
        res = knn.knn_search(np.ascontiguousarray(ref, dtype=np.float32), 1, queries=x, exclude_self=False,
                             progress=lambda f, m: progress(0.5 * f, m), check=check)
        nearest = res.indices[:, 0]
        if p.get("stats") is not None:
            p["stats"]["graph"] = res.info.to_dict()  # method and recall@1, as select records its graph
        searched = progress
        progress = lambda f, m: searched(0.5 + 0.5 * f, m)  # noqa: E731 -- the rest of the bar
    if ref is not None and size and reports:
        # the reference seeding costs N L d, a pick at most N d: the bar is split in that
        # ratio (1M pool, 10k reference: 64 s of seeding without a report, then 5 s of picks);
        # from given nearest rows it costs N d, as a pick does
        share = len(ref) / (len(ref) + size) if nearest is None else 1.0 / (1 + size)
        on_pick, on_reference = pick_progress(progress, check, "coreset", share=share,
                                              what=f"distance to the nearest of {len(ref):,} reference rows")
    greedy: dict[str, Any] = {}
    picks, radii = diversity.kcenter_greedy(x, size, reference=ref, on_pick=on_pick, on_reference=on_reference,
                                            reference_nearest=nearest, stats=greedy)
    if nearest is not None and p.get("stats") is not None:  # rows checked against the whole reference set
        p["stats"].update(reference_verified=greedy["reference_verified"],
                          reference_lowered=greedy["reference_lowered"])
    radii = np.asarray(radii, dtype=np.float64)
    if len(picks) and not np.isfinite(radii[0]):
        # Without a reference set the first centre is the point farthest from the pool mean:
        # report that distance (its covering radius is undefined).
        x = a["vectors"]
        radii[0] = float(np.linalg.norm(np.asarray(x[picks[0]], np.float64) - x.mean(axis=0, dtype=np.float64)))
    return picks, radii


register(MinerSpec(
    "coreset", "diversity",
    "k-center greedy seeded with the reference set (covering radius as score); exact, "
    "triangle-inequality pruned, never N×N",
    ("vectors", "reference_vectors"), None, select=_coreset,
    gather=True, reference="optional", supports_common=False,
))


def _badge(a: Arrays, size: int, p: dict[str, Any]) -> tuple[np.ndarray, np.ndarray]:
    picks = np.asarray(diversity.badge_select(a["probs"], a["vectors"], size, seed=p["seed"],
                                              on_pick=p.get("on_pick")))
    # k-means++ is a sampling procedure: the score is the pick order (first = 1.0)
    return picks, 1.0 - np.arange(len(picks)) / max(1, len(picks))


register(MinerSpec(
    "badge", "diversity",
    "BADGE: k-means++ on gradient embeddings (p − onehot(argmax)) ⊗ h, never materialised",
    ("vectors", "probs"), None, select=_badge, gather=True, supports_common=False,
))


def _cluster_margin(a: Arrays, size: int, p: dict[str, Any]) -> tuple[np.ndarray, np.ndarray]:
    margin = uncertainty.margin_scores(a["probs"])
    m = min(len(margin), max(size, p["candidates"]))
    cand = np.argsort(-margin, kind="stable")[:m]
    picks = cand[np.asarray(diversity.cluster_margin_select(
        a["vectors"][cand], margin[cand], size, n_clusters=p["clusters"] or None, seed=p["seed"],
        method=p["method"], progress=p.get("progress"), check=p.get("check")))]
    return picks, margin[picks]


register(MinerSpec(
    "cluster_margin", "diversity",
    "Cluster-Margin: the top `candidates` by margin clustered (k-means, or average-linkage HAC, on a sample of "
    "at most 20,000 then every candidate assigned), round-robin over clusters (smallest first) taking the most "
    "uncertain; batches of 100k+ on 1M-row pools",
    ("vectors", "probs"), None, select=_cluster_margin, gather=True, supports_common=False,
    params=(Param("candidates", "int", 2000, "most uncertain rows clustered (at least the batch size)",
                  min=1, max=MAX_SIZE),
            Param("clusters", "int", 0, "clusters (0: min(batch size, 2,048))", min=0, max=100_000),
            Param("method", "choice", "kmeans", "clustering: k-means or the paper's average-linkage HAC",
                  choices=("kmeans", "hac"))),
))


def _activation(a: Arrays, p: dict[str, Any]) -> np.ndarray:
    if p["source"] == "energy":
        return measures.energy_scores(a["logits"], temperature=p["energy_temperature"])
    return density.feature_norm_scores(a["vectors"])


register(MinerSpec(
    "activation", "embedding",
    "out-of-distribution by activation: energy −T·logsumexp(logits/T) (high first), or low feature norm",
    ("logits", "vectors"), _activation,
    inputs_for=lambda p: ("logits",) if p["source"] == "energy" else ("vectors",),
    params=(Param("source", "choice", "energy", "energy (needs model logits) or feature_norm (needs space)",
                  choices=("energy", "feature_norm")),
            Param("energy_temperature", "float", 1.0, "energy temperature", min=1e-6, max=1e6)),
))


# -- miners that drive their own run (seeds, chains: miners/direct.py) ----------------------

def _string_list(name: str) -> Callable[[Any], list[str]]:
    def check(value: Any) -> list[str]:
        if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
            raise ValueError(f"parameter '{name}' must be a list of non-empty strings")
        return value
    return check


def _vector_list(value: Any) -> list[list[float]]:
    if not isinstance(value, list) or not all(isinstance(v, list) and v for v in value):
        raise ValueError("parameter 'seed_vectors' must be a list of vectors (lists of numbers)")
    arr = np.asarray(value, dtype=np.float64) if len({len(v) for v in value}) == 1 else None
    if arr is None or not np.isfinite(arr).all():
        raise ValueError("parameter 'seed_vectors' must hold finite vectors of one dimension")
    return [list(map(float, v)) for v in value]


def _stages(value: Any) -> list[dict[str, Any]]:
    if not isinstance(value, list) or not value:
        raise ValueError("parameter 'stages' must be a non-empty list of {miner, size, params}")
    out = []
    for i, stage in enumerate(value):
        if not isinstance(stage, dict) or "miner" not in stage:
            raise ValueError(f"stage {i}: give at least {{'miner': name}}")
        unknown = set(stage) - set(STAGE_FIELDS)
        if unknown:
            raise ValueError(f"stage {i}: unknown key(s) {', '.join(sorted(unknown))}")
        if stage["miner"] not in REGISTRY or stage["miner"] == "chain":
            raise ValueError(f"stage {i}: unknown miner {stage['miner']!r}")
        size = stage.get("size")
        if size is not None and (isinstance(size, bool) or not isinstance(size, int | float) or int(size) < 1):
            raise ValueError(f"stage {i}: size must be a positive integer")
        out.append({**stage, "size": None if size is None else int(size)})
    return out


register(MinerSpec(
    "knn", "embedding",
    "nearest pool items to seeds (ids, vectors or texts), aggregated over seeds by min distance or "
    "reciprocal-rank fusion; the seeds themselves are left out",
    ("seeds",), None, run=direct.knn_run, validate_run=direct.knn_validate,
    params=(Param("seed_ids", "json", [], "ids of stored items", check=_string_list("seed_ids")),
            Param("seed_vectors", "json", [], "query vectors", check=_vector_list),
            Param("seed_texts", "json", [], "texts, embedded by the space's text embedder",
                  check=_string_list("seed_texts"), embed_to="seed_vectors"),
            Param("aggregate", "choice", "min", "combine seeds: min distance or reciprocal-rank fusion",
                  choices=("min", "rrf")),
            Param("rrf_k", "int", 60, "RRF constant", min=1, max=10_000)),
))
register(MinerSpec(
    "chain", "mixed",
    "stages run in order, each on the previous stage's picks: e.g. top 1000 by margin → coreset to 100",
    ("stages",), None, run=direct.chain_run, validate_run=direct.chain_validate, reference="optional",
    params=(Param("stages", "json", [], "[{miner, size, params, reference_where...}, ...]; the last size "
                  "defaults to the run's; the run's reference_where reaches the stages that use one",
                  check=_stages),),
))


# -- combined selection, cold start, label issues, deduplication (issue 21) -----------------

def _dict_list(name: str, required: tuple[str, ...] = ()) -> Callable[[Any], list[dict[str, Any]]]:
    def check(value: Any) -> list[dict[str, Any]]:
        if not isinstance(value, list) or not all(isinstance(v, dict) for v in value):
            raise ValueError(f"parameter '{name}' must be a list of objects")
        for i, v in enumerate(value):
            if required and not any(k in v for k in required):
                raise ValueError(f"parameter '{name}'[{i}] needs one of {', '.join(required)}")
        return value
    return check


def _targets(value: Any) -> dict[str, Any]:
    if value == {}:
        return {}
    if not isinstance(value, dict) or not isinstance(value.get("field"), str) \
            or not isinstance(value.get("values"), dict) or not value["values"]:
        raise ValueError("parameter 'targets' must be {} or {field, values: {value: count or fraction}, "
                         "kind: count|fraction, fill: true|false}")
    unknown = set(value) - {"field", "values", "kind", "fill"}
    if unknown:
        raise ValueError(f"parameter 'targets': unknown key(s) {', '.join(sorted(unknown))}")
    if value.get("kind", "count") not in ("count", "fraction"):
        raise ValueError("parameter 'targets': kind must be count or fraction")
    for v, n in value["values"].items():
        if isinstance(n, bool) or not isinstance(n, int | float) or not np.isfinite(n) or n < 0:
            raise ValueError(f"parameter 'targets': the target of {v!r} must be a number >= 0")
    return value


register(MinerSpec(
    "select", "mixed",
    "combined objectives in one greedy pass: weighted scores of any scored miners (rank or min-max "
    "normalised), hard thresholds on scores or fields, class / metadata targets, and diversity (distance "
    "to the picks and the reference set, with a stop distance); seeded",
    ("stages", "vectors", "reference_vectors"), None, run=direct.select_run, validate_run=direct.select_validate,
    inputs_for=lambda p: ("stages", "vectors", "reference_vectors") if p["diversity"] > 0 or p["stop_distance"] > 0
    else ("stages",),
    reference="optional",
    params=(
        Param("objectives", "json", [], "[{miner, weight (strength, < 0 prefers low), normalize: rank|minmax|none, "
              "params, model, space, reverse}, ...]", check=_dict_list("objectives", ("miner",))),
        Param("thresholds", "json", [], "[{miner, params, min, max} or {field, min, max, in}, ...]: rows outside "
              "are never picked", check=_dict_list("thresholds", ("miner", "field"))),
        Param("targets", "json", {}, "{field (a column, or predicted_class), values: {value: count or fraction}, "
              "kind: count|fraction, fill}: a group closes at its target; other values only fill",
              check=_targets),
        Param("diversity", "float", 0.0, "strength of min(1, distance to the nearest pick or reference row / scale)",
              min=0.0, max=1e6),
        Param("stop_distance", "float", 0.0, "rows closer than this to a pick or reference row are never picked "
              "(0: no limit)", min=0.0, max=1e9),
        Param("distance_scale", "float", 0.0, "the distance that counts as far (0: from the data)", min=0.0, max=1e9),
    ),
))


def _ref(a: Arrays) -> np.ndarray | None:
    ref = a.get("reference_vectors")
    return ref if ref is not None and len(ref) else None


def _typiclust(a: Arrays, size: int, p: dict[str, Any]) -> tuple[np.ndarray, np.ndarray]:
    res = coldstart.typiclust_select(a["vectors"], size, labeled=_ref(a), k=p["k"], n_clusters=p["clusters"] or None,
                                     min_cluster=p["min_cluster"], seed=p["seed"], progress=p.get("progress"),
                                     check=p.get("check"))
    p["stats"].update(clusters=int(res.n_clusters))
    # a cluster of identical rows has infinite typicality: report the largest float
    return res.rows, np.nan_to_num(np.asarray(res.typicality, np.float64), posinf=np.finfo(np.float64).max)


register(MinerSpec(
    "typiclust", "cold_start",
    "TypiClust: k-means into |reference| + size clusters, the most typical row (1 / mean k-NN distance) of "
    "each largest cluster without a reference row; for cold start",
    ("vectors", "reference_vectors"), None, select=_typiclust, gather=True, reference="optional",
    supports_common=False,
    params=(Param("k", "int", TYPICLUST_K, "neighbours of the typicality", min=1, max=1000),
            Param("clusters", "int", 0, "k-means clusters (0: |reference| + size, at most "
                  f"{TYPICLUST_MAX_CLUSTERS})", min=0, max=1_000_000),
            Param("min_cluster", "int", TYPICLUST_MIN_CLUSTER, "clusters smaller than this are skipped",
                  min=1, max=1_000_000)),
))


def _probcover(a: Arrays, size: int, p: dict[str, Any]) -> tuple[np.ndarray, np.ndarray]:
    res = coldstart.probcover_select(a["vectors"], size, labeled=_ref(a), delta=p["delta"] or None,
                                     n_classes=p["classes"] or PROBCOVER_DEFAULT_CLASSES, alpha=p["alpha"],
                                     seed=p["seed"], progress=p.get("progress"), check=p.get("check"))
    p["stats"].update(delta=float(res.delta), purity=None if res.purity is None else float(res.purity),
                      delta_rule="given" if p["delta"] else "purity", covered=float(res.covered),
                      random_fill=int(res.random_fill), edges=int(res.n_edges))
    for key in ("graph", "purity_distances"):  # how each was computed and its recall, as select records its graph
        if key in res.stats:
            p["stats"][key] = res.stats[key]
    return res.rows, np.asarray(res.gain, np.float64)


PROBCOVER_DEFAULT_CLASSES = 10


register(MinerSpec(
    "probcover", "cold_start",
    "ProbCover: greedy max coverage of delta-balls (rows within delta of a reference row are covered); delta "
    "by the purity rule (largest delta with alpha of the balls pure under k-means with `classes` clusters), "
    "recorded in the run's stats",
    ("vectors", "reference_vectors"), None, select=_probcover, gather=True, reference="optional",
    supports_common=False,
    validate_run=lambda ctx: {**ctx.params, "classes": ctx.params["classes"] or ctx.num_classes
                              or PROBCOVER_DEFAULT_CLASSES},
    params=(Param("delta", "float", 0.0, "ball radius (0: the purity rule)", min=0.0, max=1e9),
            Param("classes", "int", 0, f"K of the purity rule (0: the model's classes, else "
                  f"{PROBCOVER_DEFAULT_CLASSES})", min=0, max=100_000),
            Param("alpha", "float", PROBCOVER_PURITY, "share of pure balls the rule requires", min=0.01, max=1.0)),
))

register(MinerSpec(
    "label_issues", "label_issues",
    "confident learning (Northcutt et al. 2021) on out-of-sample probabilities: labeled rows whose label is "
    "likely wrong, ranked by self-confidence or normalised margin (lowest first; the score); the run's stats "
    "hold the confident joint, per-class thresholds and suggested labels",
    ("probs", "labels"), None, run=direct.label_issues_run,
    params=(Param("method", "choice", "prune_by_noise_rate", "how rows are flagged",
                  choices=("prune_by_noise_rate", "prune_by_class", "both", "confident_joint", "confusion")),
            Param("rank_by", "choice", "self_confidence", "ranking (lowest first)",
                  choices=("self_confidence", "normalized_margin")),
            Param("frac_noise", "float", 1.0, "share of the estimated noise flagged", min=1e-6, max=1.0),
            Param("min_per_class", "int", LABEL_ISSUE_MIN_PER_CLASS, "rows of each class never flagged",
                  min=0, max=1_000_000)),
))


def _labeled_outliers(a: Arrays, p: dict[str, Any]) -> np.ndarray:
    idx, dist = a["pool_graph"]
    if p["method"] == "lof":
        return density.lof_scores(idx, dist)
    return density.knn_distance_scores(dist, how="kth")


register(MinerSpec(
    "labeled_outliers", "label_issues",
    "outliers among the labeled rows of the pool: LOF (or k-th neighbour distance) on their own k-NN graph",
    ("vectors", "labels", "pool_graph"), _labeled_outliers, gather=True, supports_common=False,
    params=(K_PARAM, Param("method", "choice", "lof", "LOF or the distance to the k-th neighbour",
                           choices=("lof", "knn_distance"))),
))


def _duplicate_leaks(a: Arrays, p: dict[str, Any]) -> dict[str, np.ndarray]:
    """Each pair reported once, on the row with the larger row id (related: the
    other); a row in several pairs keeps its closest."""
    from miners.label_issues import near_duplicate_issues

    res = near_duplicate_issues(None, p["threshold"], graph=a["pool_graph"],
                                split=a["split"] if p["split_field"] else None, labels=a["label"], keep=p["report"])
    n = len(a["pool_graph"][0])
    scores, related = np.full(n, np.nan), np.full(n, -1, dtype=np.int64)
    if len(res.pairs):
        keys = a["row_keys"]
        i, j = res.pairs[:, 0], res.pairs[:, 1]
        swap = keys[i] < keys[j]
        later, earlier = np.where(swap, j, i), np.where(swap, i, j)
        order = np.lexsort((res.distance, later))
        first = order[np.r_[True, np.diff(later[order]) != 0]]
        scores[later[first]], related[later[first]] = -res.distance[first], earlier[first]
    return {"scores": scores, "related": related}


def _leaks_validate(ctx: RunContext) -> None:
    field_ = ctx.params["split_field"]
    if field_ and field_ not in ctx.table.schema.names:
        raise InvalidArgument(f"duplicate_leaks: split_field {field_!r} is not a column of '{ctx.col.name}' "
                              "(give the column holding train/val/test, or '' for label conflicts only)")


def _column_name(value: Any) -> str:
    if not isinstance(value, str):
        raise ValueError("parameter 'split_field' must be a column name or ''")
    return value


register(MinerSpec(
    "duplicate_leaks", "label_issues",
    "near-duplicate pairs (within `threshold` on the k-NN graph) that cross splits (leaky splits) or carry "
    "different labels; score = -distance, related_id = the other row of the pair",
    ("vectors", "split_label", "pool_graph"), _duplicate_leaks, gather=True, supports_common=False,
    validate_run=_leaks_validate,
    params=(Param("k", "int", 10, "neighbours examined per row", min=1, max=1000),
            Param("threshold", "float", 0.05, "largest distance of a near-duplicate pair", min=0.0, max=1e9),
            Param("split_field", "json", "split", "the column holding the split ('' for none)",
                  check=_column_name),
            Param("report", "choice", "any", "pairs reported: crossing splits, with different labels, either, "
                  "or every near-duplicate pair", choices=("any", "cross_split", "label_conflict", "all"))),
))

register(MinerSpec(
    "exact_duplicates", "dedup",
    "rows with identical content (a hash of the vector, the text, the uri or the file it names): the drop "
    "list (related_id: the row kept, the oldest), the keep list, or every row of a group; largest groups first",
    ("vectors", "content"), None, run=direct.exact_duplicates_run,
    inputs_for=lambda p: ("vectors",) if p["of"] == "vector" else ("content",),
    params=(Param("of", "choice", "vector", "what is compared", choices=("vector", "text", "uri", "file")),
            Param("output", "choice", "drop", "drop: the duplicates to remove; keep: the deduplicated rows; "
                  "groups: every row that has a duplicate", choices=("drop", "keep", "groups"))),
))


def _semdedup(a: Arrays, size: int, p: dict[str, Any]) -> tuple[np.ndarray, np.ndarray]:
    res = dedup.semdedup(a["vectors"], eps=p["eps"], n_clusters=p["clusters"] or None, keep=p["keep"],
                         seed=p["seed"], progress=p.get("progress"), check=p.get("check"))
    p["stats"].update(clusters=int(res.n_clusters), dropped=int(len(res.dropped)),
                      kept=int(res.keep.sum()), eps=p["eps"])
    if p["output"] == "drop":
        rows = res.dropped
        rows = rows[np.lexsort((rows, -res.similarity[rows]))][:size]
        p["stats"]["related"] = res.duplicate_of[rows]
        return rows, res.similarity[rows]
    rows = np.flatnonzero(res.keep)
    rows = rows[np.lexsort((rows, -res.centroid_similarity[rows]))][:size]
    return rows, res.centroid_similarity[rows]


register(MinerSpec(
    "semdedup", "dedup",
    "SemDeDup: k-means on the embeddings, then inside each cluster rows with cosine similarity > 1 - eps are "
    "duplicates; the most prototypical (closest to the centroid) stays. The drop list (related_id: the row "
    "it duplicates, score: that similarity) or the keep list",
    ("vectors",), None, select=_semdedup, gather=True, supports_common=False,
    params=(Param("eps", "float", SEMDEDUP_EPS, "duplicates: cosine similarity > 1 - eps", min=0.0, max=2.0),
            Param("clusters", "int", 0, "k-means clusters (0: one per ~1,000 rows)", min=0, max=1_000_000),
            Param("keep", "choice", "prototypical", "the row a group keeps",
                  choices=("prototypical", "hard", "random")),
            Param("output", "choice", "drop", "drop: the rows to remove; keep: the deduplicated rows",
                  choices=("drop", "keep"))),
))
