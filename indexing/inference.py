"""Run a PyTorch model over a DataLoader and write its outputs into a collection.

    from indexing.inference import InferenceRunner

    runner = InferenceRunner(model_name="mlp", embeddings={"penult": "net.2"}, mc_samples=20)
    summary = runner.run(model, loader, sink=client.collection("digits"))   # or a store Collection

For each batch the runner does one deterministic pass (``model.eval()``) and, as asked:

* **predictions** — ``pred_<model_name>.probs`` (``softmax`` of the output; or the output
  itself with ``activation="none"``) and ``.logits``;
* **embeddings** from named layers — a forward hook on each layer (``{"space": "layer.name"}``,
  names from ``model.named_modules()``) pools its output to one vector per item and writes
  ``emb_<space>`` (see :func:`pool_activation`);
* **MC-dropout samples** — ``mc_samples = K`` extra passes with dropout active, written as
  ``pred_<model_name>.samples`` (``K x C`` probabilities per item);
* **committee outputs** — pass a list of models: each member's probabilities become one of
  the ``samples`` and ``probs`` is their mean (embedding layers are looked up in the first);
* **detections** — ``detection=adapter``: a callable turning the model's raw output into one
  mapping per image with ``boxes`` ``(B, 4)`` (x1, y1, x2, y2), ``scores`` ``(B,)`` and
  optionally ``probs`` ``(B, C)``, written as ``pred_<model_name>.boxes``; with
  ``box_embeddings="layer.name"`` each box also gets an ``embedding``: a forward hook keeps
  that layer's ``(N, D, h, w)`` feature map, the predicted boxes (input pixels) are scaled
  to it (``w / W``, ``h / H`` per axis, ``(H, W)`` the input's last two dims or
  ``box_image_size=``), ``torchvision.ops.roi_align`` pools each box to ``box_roi_size`` ×
  ``box_roi_size`` (aligned, ``box_sampling_ratio`` samples per bin) and the mean over that
  grid is the box's ``D``-vector. ``D`` must be the model's declared ``box_embedding_dim``
  (the registered model's, or ``box_embedding_dim=`` when the runner registers it): a layer
  of another width is refused with a ValueError naming both;
* **segmentation** — ``segmentation=True``: the model returns ``(N, C, H, W)`` logits (or
  probabilities with ``activation="none"``); each batch is reduced to per-image summaries
  (:mod:`indexing.segmentation`: ``mean_entropy``, ``topq_entropy``,
  ``class_uncertain_fraction``, ``uncertainty_map``; with ``mc_samples = T`` also the pixel
  ``bald`` of the T dropout passes, accumulated pass by pass) and only those are written —
  never the probability maps. The settings (``top_q``, ``uncertain_threshold``,
  ``map_size``) are the registered model's (``create_collection(models={"seg": {"classes":
  [...], "task": "segmentation", "top_q": 0.1}})``), else ``segmentation_settings=`` or the
  defaults. ``mask_dir=`` also writes each image's predicted mask (argmax) as a PNG of class
  indices (0 none, k = class k - 1) there and stores its path in ``mask_uri`` (a pre-label
  the COCO and Label Studio exports carry).

Rows are batched (``flush_rows``) and written through ``sink.upsert(table)`` — any object with
that method: :class:`indexing.store.Collection`, or the client's ``Collection`` (which
streams them to the server); one write is in flight on a background thread while the next
batches run. The model runs on CUDA when present (``device=``), under
``torch.inference_mode()``, with a tqdm progress bar (``progress=False`` to hide it).

MC dropout and consistent masks
-------------------------------
BatchBALD needs *consistent* samples: sample ``k`` of every item must come from the same
model ``w_k``, i.e. the same dropout masks for the whole pool (the joint entropy of a batch is
computed over ``k``). With ``consistent_masks=True`` (the default) the runner leaves the model
in eval mode and a forward hook on every ``nn.Dropout`` / ``Dropout1d/2d/3d`` replaces its
output in pass ``k`` by ``x * m_k / (1 - p)``, where the mask ``m_k`` — one per layer and pass,
over the item's feature shape (per channel for ``DropoutNd``) and broadcast over the batch —
is drawn once from a ``torch.Generator`` seeded with ``(seed, k, layer)``. Every item of every
batch therefore sees the same ``K`` masks, whatever the batching, the order or the device, and
a run is reproducible from its seed. (The item's activation shape must be fixed, e.g.
sequences padded to one length, for the masks to match across batches.)

With ``consistent_masks=False`` the dropout layers are switched to train mode for the ``K``
passes (standard MC dropout: independent masks per item, fine for BALD or mean entropy but
not for BatchBALD); the global RNG is re-seeded from ``(seed, batch number, k)`` inside
``torch.random.fork_rng`` for each pass, so a run over the same loader is reproducible too.

Ids: a dict batch's ``id_key`` entry, else ``ids=`` (a sequence in loader order, or a callable
``(batch, start) -> ids``), else the running row number as a string (with ``id_prefix``).
Register the model in the collection first (``create_collection(models={...})`` or
``add_model``), or pass ``classes=`` and the runner registers it when the sink allows.
A prediction column is written whole: the children the runner does not produce (e.g.
``loss``) become null for the rows it writes.

This module needs torch (imported lazily: importing it costs nothing without); it never
imports the service or its client.
"""

from __future__ import annotations

import hashlib
import os
import re
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa

from indexing.errors import InvalidArgument
from indexing.schema import (
    EMB_PREFIX,
    PRED_BOX,
    PRED_PREFIX,
    SEG_MAP_SIZE,
    SEG_TOP_Q,
    SEG_UNCERTAIN_THRESHOLD,
    ModelSpec,
)
from indexing.segmentation import PixelBald, segmentation_summaries

_BOX_FEATURES = "\0box_features"  # the captured feature map of the box_embeddings layer (no space name)

__all__ = ["InferenceResult", "InferenceRunner", "pool_activation", "run"]

POOLS = ("mean", "max", "flatten", "first", "last")


@dataclass
class InferenceResult:
    """What a run did: rows and batches processed, writes made, seconds spent (total, in
    the model, waiting on the sink), and — without a sink — the rows as one table."""

    rows: int = 0
    batches: int = 0
    writes: int = 0
    seconds: float = 0.0
    model_seconds: float = 0.0
    sink_wait_seconds: float = 0.0
    table: pa.Table | None = None

    @property
    def rows_per_second(self) -> float:
        return self.rows / self.seconds if self.seconds > 0 else 0.0


def pool_activation(t: Any, pool: str | Callable[[Any], Any] = "mean", channel_dim: int | None = None) -> Any:
    """One vector per item from a layer's output ``t`` (a tensor whose first axis is the batch).

    2-D ``(N, D)`` is returned as it is. Otherwise the feature axis is ``channel_dim``
    (default: 1 for 4-D and larger — ``(N, C, H, W)`` conv maps —, the last axis for 3-D —
    ``(N, T, D)`` token sequences); every other axis is pooled: ``"mean"``, ``"max"``,
    ``"first"`` (e.g. a CLS token), ``"last"``; ``"flatten"`` keeps everything
    (``(N, prod(shape[1:]))``); a callable gets the raw tensor and returns ``(N, D)``.
    """
    if callable(pool):
        return pool(t)
    if t.ndim == 1:
        return t[:, None]
    if t.ndim == 2:
        return t
    if pool == "flatten":
        return t.flatten(1)
    if pool not in POOLS:
        raise ValueError(f"pool must be one of {', '.join(POOLS)} or a callable; got {pool!r}")
    axis = channel_dim if channel_dim is not None else (1 if t.ndim >= 4 else -1)
    x = t.movedim(axis, -1).flatten(1, -2)  # (N, L, D)
    if pool == "mean":
        return x.mean(dim=1)
    if pool == "max":
        return x.amax(dim=1)
    return x[:, 0] if pool == "first" else x[:, -1]


def _seed_of(*parts: int) -> int:
    """A 63-bit seed mixed from integers (numpy's SeedSequence hashing)."""
    state = np.random.SeedSequence([int(p) & 0xFFFFFFFFFFFFFFFF for p in parts]).generate_state(2, np.uint32)
    return int((int(state[0]) << 31) ^ int(state[1])) & ((1 << 63) - 1)


def _to_device(x: Any, device: Any) -> Any:
    import torch

    if isinstance(x, torch.Tensor):
        return x.to(device, non_blocking=True)
    if isinstance(x, Mapping):
        return {k: _to_device(v, device) for k, v in x.items()}
    if isinstance(x, tuple | list):
        return type(x)(_to_device(v, device) for v in x)
    return x


def _batch_size(x: Any) -> int:
    import torch

    if isinstance(x, torch.Tensor):
        return int(x.shape[0])
    if isinstance(x, Mapping):
        return _batch_size(next(iter(x.values())))
    if isinstance(x, tuple | list) and x:
        return _batch_size(x[0])
    raise TypeError(f"cannot tell the batch size of a {type(x).__name__}; give forward= and tensors")


def _numpy(x: Any, dtype: Any = np.float32) -> np.ndarray:
    import torch

    if isinstance(x, torch.Tensor):
        x = x.detach().float().cpu().numpy()
    return np.asarray(x, dtype=dtype)


@dataclass
class _Dropout:
    module: Any
    index: int
    p: float
    channelwise: bool


class _ConsistentDropout:
    """Forward hooks that apply pass ``k``'s fixed masks to every dropout layer."""

    def __init__(self, layers: list[_Dropout], seed: int) -> None:
        self.layers = layers
        self.seed = seed
        self.active: int | None = None
        self._masks: dict[tuple, Any] = {}
        self._handles = [d.module.register_forward_hook(self._hook(d)) for d in layers]

    def _mask(self, d: _Dropout, k: int, x: Any) -> Any:
        import torch

        shape = (x.shape[1],) + (1,) * (x.ndim - 2) if d.channelwise else tuple(x.shape[1:])
        key = (d.index, k, shape, x.device, x.dtype)
        mask = self._masks.get(key)
        if mask is None:
            gen = torch.Generator(device="cpu")
            gen.manual_seed(_seed_of(self.seed, k, d.index))
            keep = (torch.rand(shape, generator=gen) >= d.p).to(torch.float32) / (1.0 - d.p)
            mask = keep.to(device=x.device, dtype=x.dtype)
            self._masks[key] = mask
        return mask

    def _hook(self, d: _Dropout) -> Callable:
        def hook(module: Any, args: tuple, output: Any) -> Any:
            if self.active is None:
                return None
            x = args[0]
            return x * self._mask(d, self.active, x)

        return hook

    def remove(self) -> None:
        for h in self._handles:
            h.remove()


class InferenceRunner:
    """Options of an inference run; :meth:`run` writes into a sink, :meth:`predict` yields tables.

    Args:
        model_name: the ``pred_<model_name>`` column the predictions go to.
        embeddings: ``{space: layer}``: ``layer`` a module name (``"encoder.fc1"``), a module, or
            ``{"layer": ..., "pool": ..., "channel_dim": ...}``; writes ``emb_<space>``.
        pool: default pooling of layer outputs with more than 2 axes (:func:`pool_activation`).
        outputs: which of ``"probs"``, ``"logits"`` to store ("logits" is ignored with
            ``activation="none"`` and for committees).
        activation: ``"softmax"`` (the model returns logits) or ``"none"`` (it returns
            probabilities).
        mc_samples: ``K`` MC-dropout passes (0: none); see the module docstring.
        consistent_masks: the same ``K`` dropout masks for every item (BatchBALD) or
            independent masks (train-mode dropout).
        seed: seed of the dropout masks.
        detection: adapter from the model's raw output to per-image detections.
        box_embeddings: detection: the layer (a name from ``named_modules()``, or the module)
            whose ``(N, D, h, w)`` output is RoI-pooled over each predicted box into the box's
            ``embedding`` (module docstring).
        box_embedding_dim: the model's declared ``box_embedding_dim`` (used to register it,
            and checked against a registered model's).
        box_roi_size, box_sampling_ratio: ``roi_align``'s ``output_size`` and
            ``sampling_ratio``.
        box_image_size: ``(H, W)`` of the input images the boxes are in (default: the input
            tensor's last two dims).
        segmentation: the model is a segmentation model: ``(N, C, H, W)`` outputs are reduced
            to per-image summaries (module docstring).
        segmentation_settings: ``{"top_q", "uncertain_threshold", "map_size"}`` for a model
            the sink does not hold yet (a registered model's own settings are used otherwise;
            a conflicting value here is an error).
        mask_dir: segmentation: write each image's argmax mask there as a PNG and its path to
            ``mask_uri``.
        forward: ``forward(model, inputs) -> output`` (default ``model(inputs)``), e.g. to pick
            ``out["logits"]`` from a model returning a dict.
        input_key: dict batches: the key of the inputs (default ``"input"``, else the only
            tensor); tuple/list batches use their first element.
        id_key, ids, id_prefix: where ids come from (module docstring).
        extra: ``extra(batch) -> {column: values}``: more columns to write (e.g. labels).
        classes: class names; when given the runner registers the model in the sink if it
            is missing (``sink.add_model``), with ``task="detection"`` for detection and
            ``task="segmentation"`` (and the settings) for segmentation.
        device: ``"cuda"``, ``"cpu"``, a torch.device; default CUDA when available.
        flush_rows: rows per write to the sink.
        progress: show a progress bar.
    """

    def __init__(
        self,
        *,
        model_name: str = "model",
        embeddings: Mapping[str, Any] | None = None,
        pool: str | Callable[[Any], Any] = "mean",
        outputs: Sequence[str] = ("probs", "logits"),
        activation: str = "softmax",
        mc_samples: int = 0,
        consistent_masks: bool = True,
        seed: int = 0,
        detection: Callable[[Any], Sequence[Mapping[str, Any]]] | None = None,
        box_embeddings: Any = None,
        box_embedding_dim: int | None = None,
        box_roi_size: int = 7,
        box_sampling_ratio: int = 2,
        box_image_size: tuple[int, int] | None = None,
        segmentation: bool = False,
        segmentation_settings: Mapping[str, Any] | None = None,
        mask_dir: str | os.PathLike[str] | None = None,
        forward: Callable[[Any, Any], Any] | None = None,
        input_key: str | None = None,
        id_key: str = "id",
        ids: Sequence[str] | Callable[[Any, int], Sequence[str]] | None = None,
        id_prefix: str = "",
        extra: Callable[[Any], Mapping[str, Any]] | None = None,
        classes: Sequence[str] | None = None,
        device: Any = None,
        flush_rows: int = 2048,
        progress: bool = True,
    ) -> None:
        unknown = set(outputs) - {"probs", "logits"}
        if unknown:
            raise ValueError(f"outputs must be 'probs' and/or 'logits'; got {sorted(unknown)}")
        if activation not in ("softmax", "none"):
            raise ValueError(f"activation must be 'softmax' or 'none'; got {activation!r}")
        if isinstance(mc_samples, bool) or not isinstance(mc_samples, int) or mc_samples < 0:
            raise ValueError(f"mc_samples must be an integer >= 0; got {mc_samples!r}")
        if isinstance(flush_rows, bool) or not isinstance(flush_rows, int) or flush_rows < 1:
            raise ValueError(f"flush_rows must be an integer >= 1; got {flush_rows!r}")
        if detection is not None and mc_samples:
            raise ValueError("MC-dropout samples of a detector are not supported; use mc_samples=0")
        if box_embeddings is not None and detection is None:
            raise ValueError("box_embeddings pools a layer over predicted boxes: it needs detection=")
        if box_embedding_dim is not None and (isinstance(box_embedding_dim, bool)
                                              or not isinstance(box_embedding_dim, int) or box_embedding_dim < 1):
            raise ValueError(f"box_embedding_dim must be a positive integer; got {box_embedding_dim!r}")
        if isinstance(box_roi_size, bool) or not isinstance(box_roi_size, int) or box_roi_size < 1:
            raise ValueError(f"box_roi_size must be a positive integer; got {box_roi_size!r}")
        if segmentation and detection is not None:
            raise ValueError("a model is segmentation or detection, not both")
        if mask_dir is not None and not segmentation:
            raise ValueError("mask_dir writes segmentation masks: it needs segmentation=True")
        unknown = set(segmentation_settings or {}) - {"top_q", "uncertain_threshold", "map_size"}
        if unknown:
            raise ValueError(f"segmentation_settings: unknown key(s) {sorted(unknown)} "
                             "(top_q, uncertain_threshold, map_size)")
        if not isinstance(pool, str) and not callable(pool):
            raise ValueError(f"pool must be one of {', '.join(POOLS)} or a callable")
        if isinstance(pool, str) and pool not in POOLS:
            raise ValueError(f"pool must be one of {', '.join(POOLS)} or a callable; got {pool!r}")
        self.model_name = model_name
        self.embeddings = dict(embeddings or {})
        self.pool = pool
        self.outputs = tuple(outputs)
        self.activation = activation
        self.mc_samples = mc_samples
        self.consistent_masks = consistent_masks
        self.seed = int(seed)
        self.detection = detection
        self.box_embeddings = box_embeddings
        self.box_embedding_dim = box_embedding_dim
        self.box_roi_size = box_roi_size
        self.box_sampling_ratio = int(box_sampling_ratio)
        self.box_image_size = None if box_image_size is None else (int(box_image_size[0]), int(box_image_size[1]))
        self._box_dim: int | None = None
        self.segmentation = bool(segmentation)
        self.segmentation_settings = dict(segmentation_settings or {})
        if self.segmentation:  # checked now (ModelSpec validates the values), used per run
            try:
                ModelSpec(name="check", classes=("a", "b"), task="segmentation", **self.segmentation_settings)
            except InvalidArgument as exc:
                raise ValueError(f"segmentation_settings: {exc}") from None
        self.mask_dir = None if mask_dir is None else os.fspath(mask_dir)
        self._seg: dict[str, Any] = {}
        self.forward = forward
        self.input_key = input_key
        self.id_key = id_key
        self.ids = ids
        self.id_prefix = id_prefix
        self.extra = extra
        self.classes = None if classes is None else [str(c) for c in classes]
        self.device = device
        self.flush_rows = flush_rows
        self.progress = progress

    # -- public ------------------------------------------------------------------------

    def run(self, model: Any, loader: Iterable[Any], sink: Any = None) -> InferenceResult:
        """Run ``model`` (a module, or a list of modules: a committee) over ``loader`` and
        write every ``flush_rows`` rows with ``sink.upsert(table)``; without a sink the rows
        are returned in ``result.table``."""
        t0 = time.perf_counter()
        result = InferenceResult()
        if sink is not None:
            if not callable(getattr(sink, "upsert", None)):
                raise TypeError(f"sink must have an upsert(table) method; got {type(sink).__name__}")
            self._register_model(sink)
        self._seg = self._segmentation_settings(sink)
        self._box_dim = self._declared_box_dim(sink)
        tables: list[pa.Table] = []
        pending: Future | None = None
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="assay-inference-sink") as writer:
            for table in self._tables(model, loader, result):
                if sink is None:
                    tables.append(table)
                    continue
                if pending is not None:  # one write in flight: wait for it before the next
                    tw = time.perf_counter()
                    pending.result()
                    result.sink_wait_seconds += time.perf_counter() - tw
                pending = writer.submit(sink.upsert, table)
                result.writes += 1
            if pending is not None:
                tw = time.perf_counter()
                pending.result()
                result.sink_wait_seconds += time.perf_counter() - tw
        if sink is None:
            result.table = pa.concat_tables(tables) if tables else None
        result.seconds = time.perf_counter() - t0
        return result

    def predict(self, model: Any, loader: Iterable[Any]) -> Iterator[pa.Table]:
        """The rows :meth:`run` would write, as Arrow tables of about ``flush_rows`` rows."""
        self._seg = self._segmentation_settings(None)
        self._box_dim = self._declared_box_dim(None)
        yield from self._tables(model, loader, InferenceResult())

    # -- setup -------------------------------------------------------------------------

    def _register_model(self, sink: Any) -> None:
        if self.classes is None or not callable(getattr(sink, "add_model", None)):
            return
        task = "detection" if self.detection is not None else "classification"
        options: dict[str, Any] = {}
        if self.segmentation:
            task, options = "segmentation", self.segmentation_settings
        if self.box_embeddings is not None and self.box_embedding_dim:
            options = {"box_embedding_dim": self.box_embedding_dim}
        try:
            sink.add_model(self.model_name, self.classes, task=task, **options)
        except Exception as exc:  # both the store's and the client's "already exists"
            if "AlreadyExists" not in type(exc).__name__:
                raise

    def _declared_box_dim(self, sink: Any) -> int | None:
        """The ``box_embedding_dim`` box embeddings must have: the registered model's, else
        ``box_embedding_dim=``. ValueError when neither declares one, or they differ."""
        if self.box_embeddings is None:
            return None
        registered = _registered_model(sink, self.model_name)
        have = int(registered.get("box_embedding_dim") or 0) if registered is not None else 0
        if registered is not None and not have:
            raise ValueError(f"model '{self.model_name}' is registered without box_embedding_dim, so its boxes "
                             "cannot carry embeddings; register a detection model with box_embedding_dim=<the "
                             "layer's channels>")
        if have and self.box_embedding_dim and have != self.box_embedding_dim:
            raise ValueError(f"box_embedding_dim={self.box_embedding_dim} differs from the registered model "
                             f"'{self.model_name}''s box_embedding_dim={have}; drop it, or register another model")
        dim = have or self.box_embedding_dim
        if not dim:
            raise ValueError("box_embeddings needs the model's declared box_embedding_dim: register the model with "
                             "it, or pass box_embedding_dim=")
        return dim

    def _segmentation_settings(self, sink: Any) -> dict[str, Any]:
        """The settings a segmentation run computes with: the sink's registered model's
        (a store Collection's ``model(name)``, or the client's ``describe()``), else
        ``segmentation_settings`` over the defaults. ValueError when the registered model is
        not a segmentation model or its settings differ from ``segmentation_settings``."""
        if not self.segmentation:
            return {}
        out = {"top_q": SEG_TOP_Q, "uncertain_threshold": SEG_UNCERTAIN_THRESHOLD, "map_size": SEG_MAP_SIZE,
               **self.segmentation_settings}
        registered = _registered_model(sink, self.model_name)
        if registered is None:
            return out
        task = registered.get("task") or "classification"
        if task != "segmentation":
            raise ValueError(f"model '{self.model_name}' is registered as a {task} model; segmentation=True "
                             "needs one registered with task='segmentation'")
        for key in ("top_q", "uncertain_threshold", "map_size"):
            have = registered.get(key)
            if have is None:
                continue
            if key in self.segmentation_settings and float(self.segmentation_settings[key]) != float(have):
                raise ValueError(f"segmentation_settings {key}={self.segmentation_settings[key]!r} differs from "
                                 f"the registered model's {key}={have!r}; drop it, or register another model")
            out[key] = int(have) if key == "map_size" else float(have)
        return out

    def _device(self) -> Any:
        import torch

        if self.device is not None:
            return torch.device(self.device)
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")

    @staticmethod
    def _dropouts(model: Any) -> list[_Dropout]:
        from torch import nn

        out = []
        for m in model.modules():
            if isinstance(m, nn.AlphaDropout | nn.FeatureAlphaDropout):
                raise ValueError(f"{type(m).__name__} is not supported for MC dropout with consistent masks; "
                                 "use consistent_masks=False")
            if isinstance(m, nn.Dropout | nn.Dropout1d | nn.Dropout2d | nn.Dropout3d) and m.p > 0:
                if m.p >= 1:
                    raise ValueError("a dropout layer with p=1 drops everything; MC dropout needs p < 1")
                out.append(_Dropout(m, len(out), float(m.p), not isinstance(m, nn.Dropout)))
        return out

    def _hooks(self, model: Any, captured: dict[str, Any], capturing: list[bool]) -> list[Any]:
        names = dict(model.named_modules())
        handles = []
        for space, spec in self.embeddings.items():
            if isinstance(spec, Mapping):
                layer, pool, channel_dim = spec.get("layer"), spec.get("pool", self.pool), spec.get("channel_dim")
            else:
                layer, pool, channel_dim = spec, self.pool, None
            if isinstance(layer, str):
                if layer not in names:
                    sample = ", ".join(n for n in list(names)[1:20] if n)
                    raise ValueError(f"embedding '{space}': the model has no layer named {layer!r} "
                                     f"(layers: {sample}{', ...' if len(names) > 20 else ''})")
                module = names[layer]
            else:
                module = layer
                if all(module is not m for m in names.values()):
                    raise ValueError(f"embedding '{space}': that module is not part of the model")

            def hook(mod: Any, args: tuple, output: Any, space: str = space, pool: Any = pool,
                     channel_dim: Any = channel_dim) -> None:
                if not capturing[0]:
                    return
                out = output[0] if isinstance(output, tuple | list) else output
                vec = pool_activation(out, pool, channel_dim)
                if vec.ndim != 2:
                    raise ValueError(f"embedding '{space}': pooling gave shape {tuple(vec.shape)}, not (N, D)")
                captured[space] = vec.float()

            handles.append(module.register_forward_hook(hook))
        if self.box_embeddings is not None:
            module = self._layer(names, self.box_embeddings, "box_embeddings")

            def box_hook(mod: Any, args: tuple, output: Any) -> None:
                if capturing[0]:
                    captured[_BOX_FEATURES] = output[0] if isinstance(output, tuple | list) else output

            handles.append(module.register_forward_hook(box_hook))
        return handles

    @staticmethod
    def _layer(names: Mapping[str, Any], layer: Any, what: str) -> Any:
        if isinstance(layer, str):
            if layer not in names:
                sample = ", ".join(n for n in list(names)[1:20] if n)
                raise ValueError(f"{what}: the model has no layer named {layer!r} "
                                 f"(layers: {sample}{', ...' if len(names) > 20 else ''})")
            return names[layer]
        if all(layer is not m for m in names.values()):
            raise ValueError(f"{what}: that module is not part of the model")
        return layer

    def _roi_embeddings(self, x: Any, features: Any, dets: list[Mapping[str, Any]]) -> list[np.ndarray]:
        """Each image's boxes RoI-pooled from the layer's feature map: ``(B_i, D)`` per image."""
        import torch
        from torchvision.ops import roi_align

        if not isinstance(features, torch.Tensor) or features.ndim != 4:
            shape = tuple(features.shape) if isinstance(features, torch.Tensor) else type(features).__name__
            raise ValueError(f"box_embeddings: layer {self._layer_name()} must output an (N, D, h, w) feature map; "
                             f"got {shape}")
        n, d, h, w = features.shape
        if d != self._box_dim:
            raise ValueError(f"box_embeddings: layer {self._layer_name()} has {d} channels but model "
                             f"'{self.model_name}' declares box_embedding_dim={self._box_dim}; pick a layer with "
                             f"{self._box_dim} channels, or declare the model with box_embedding_dim={d}")
        if self.box_image_size is not None:
            size_h, size_w = self.box_image_size
        elif isinstance(x, torch.Tensor) and x.ndim >= 3:
            size_h, size_w = int(x.shape[-2]), int(x.shape[-1])
        else:
            raise ValueError("box_embeddings: the inputs are not an image tensor; give box_image_size=(H, W)")
        scale = torch.tensor([w / size_w, h / size_h, w / size_w, h / size_h], dtype=torch.float32,
                             device=features.device)
        rois = [torch.as_tensor(np.asarray(dt["boxes"], np.float32).reshape(-1, 4), device=features.device) * scale
                for dt in dets]
        pooled = roi_align(features.float(), rois, output_size=self.box_roi_size, spatial_scale=1.0,
                           sampling_ratio=self.box_sampling_ratio, aligned=True)
        vecs = _numpy(pooled.mean(dim=(2, 3)))
        out, at = [], 0
        for r in rois:
            out.append(vecs[at:at + len(r)])
            at += len(r)
        return out

    def _layer_name(self) -> str:
        return repr(self.box_embeddings) if isinstance(self.box_embeddings, str) else "(module)"

    # -- the loop ----------------------------------------------------------------------

    def _split(self, batch: Any) -> tuple[Any, list[str] | None]:
        """(inputs, ids from the batch or None)."""
        import torch

        if isinstance(batch, Mapping):
            ids = batch.get(self.id_key)
            if self.input_key is not None:
                if self.input_key not in batch:
                    raise KeyError(f"input_key {self.input_key!r} is not in the batch (keys: {', '.join(batch)})")
                inputs = batch[self.input_key]
            elif "input" in batch:
                inputs = batch["input"]
            else:
                tensors = [k for k, v in batch.items() if isinstance(v, torch.Tensor) and k != self.id_key]
                if len(tensors) != 1:
                    raise KeyError(f"dict batch: give input_key= (keys: {', '.join(batch)})")
                inputs = batch[tensors[0]]
            if ids is not None:
                ids = [str(i) for i in (ids.tolist() if isinstance(ids, torch.Tensor) else ids)]
            return inputs, ids
        if isinstance(batch, tuple | list):
            return batch[0], None
        return batch, None

    def _ids(self, batch: Any, from_batch: list[str] | None, start: int, n: int) -> list[str]:
        if from_batch is not None:
            ids = from_batch
        elif callable(self.ids):
            ids = [str(i) for i in self.ids(batch, start)]
        elif self.ids is not None:
            if start + n > len(self.ids):
                raise ValueError(f"ids has {len(self.ids)} entries; the loader gave more rows")
            ids = [str(i) for i in self.ids[start:start + n]]
        else:
            ids = [f"{self.id_prefix}{i}" for i in range(start, start + n)]
        if len(ids) != n:
            raise ValueError(f"a batch of {n} rows came with {len(ids)} ids")
        return ids

    def _call(self, model: Any, inputs: Any) -> Any:
        return self.forward(model, inputs) if self.forward is not None else model(inputs)

    def _probs(self, out: Any) -> tuple[Any, Any]:
        """(probs, logits or None) as float32 tensors from the model output."""
        import torch

        if not isinstance(out, torch.Tensor):
            raise TypeError(f"the model returned a {type(out).__name__}; give forward= returning the logits tensor")
        if self.segmentation:
            if out.ndim != 4:
                raise ValueError(f"a segmentation model's output must be (N, C, H, W) "
                                 f"{'probabilities' if self.activation == 'none' else 'logits'}; "
                                 f"got shape {tuple(out.shape)}")
            out = out.float()
            return (out, None) if self.activation == "none" else (torch.softmax(out, dim=1), out)
        if out.ndim != 2:
            hint = "; for (N, C, H, W) outputs pass segmentation=True" if out.ndim == 4 else ""
            raise ValueError(f"the model output must be (N, C) logits; got shape {tuple(out.shape)}{hint}")
        out = out.float()
        if self.activation == "none":
            return out, None
        return torch.softmax(out, dim=-1), out

    def _tables(self, model: Any, loader: Iterable[Any], result: InferenceResult) -> Iterator[pa.Table]:
        import torch
        from torch import nn

        committee = list(model) if isinstance(model, list | tuple | nn.ModuleList) else None
        members = committee if committee is not None else [model]
        if not members or not all(isinstance(m, nn.Module) for m in members):
            raise TypeError("model must be a torch.nn.Module or a non-empty list of them (a committee)")
        if committee is not None and self.mc_samples:
            raise ValueError("a committee gives its samples itself: use mc_samples=0")
        if committee is not None and self.detection is not None:
            raise ValueError("detection with a committee is not supported")
        if committee is not None and self.segmentation:
            raise ValueError("segmentation with a committee is not supported; use mc_samples for pixel BALD")
        device = self._device()
        was_training = [m.training for m in members]
        for m in members:
            m.to(device)
            m.eval()
        dropouts = self._dropouts(members[0]) if self.mc_samples else []
        if self.mc_samples and not dropouts:
            raise ValueError("mc_samples needs dropout layers (nn.Dropout, Dropout1d/2d/3d with p > 0) in the model")
        consistent = _ConsistentDropout(dropouts, self.seed) if self.mc_samples and self.consistent_masks else None
        captured: dict[str, Any] = {}
        capturing = [False]
        handles = self._hooks(members[0], captured, capturing)
        total = len(loader) if hasattr(loader, "__len__") else None  # type: ignore[arg-type]
        bar = None
        if self.progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=total, unit="batch", desc=f"inference {self.model_name}", leave=False)
        parts: list[dict[str, Any]] = []
        buffered = 0
        start = 0
        try:
            with torch.inference_mode():
                for b, batch in enumerate(loader):
                    t0 = time.perf_counter()
                    inputs, batch_ids = self._split(batch)
                    x = _to_device(inputs, device)
                    n = _batch_size(x)
                    ids = self._ids(batch, batch_ids, start, n)
                    part: dict[str, Any] = {"id": ids}
                    captured.clear()
                    capturing[0] = True
                    try:
                        outs = [self._call(m, x) for m in members[:1]]
                    finally:
                        capturing[0] = False
                    outs += [self._call(m, x) for m in members[1:]]
                    for space in self.embeddings:
                        if space not in captured:
                            raise RuntimeError(f"embedding '{space}': its layer did not run in the forward pass")
                        part[f"{EMB_PREFIX}{space}"] = _numpy(captured[space])
                    if self.detection is not None:
                        dets = list(self.detection(outs[0]))
                        if len(dets) != n:
                            raise ValueError(f"the detection adapter returned {len(dets)} results for {n} images")
                        part["boxes"] = [{k: _numpy(v) for k, v in d.items() if k in ("boxes", "scores", "probs")}
                                         for d in dets]
                        if self.box_embeddings is not None:
                            if _BOX_FEATURES not in captured:
                                raise RuntimeError(f"box_embeddings: layer {self._layer_name()} did not run in "
                                                   "the forward pass")
                            embs = self._roi_embeddings(x, captured[_BOX_FEATURES], part["boxes"])
                            for det, emb in zip(part["boxes"], embs, strict=True):
                                det["embedding"] = emb
                    elif self.segmentation:
                        part["seg"] = self._seg_part(outs[0], ids)
                    elif committee is not None:
                        probs = torch.stack([self._probs(o)[0] for o in outs], dim=1)  # (N, M, C)
                        part["samples"] = _numpy(probs)
                        part["probs"] = _numpy(probs.mean(dim=1))
                    else:
                        probs, logits = self._probs(outs[0])
                        part["probs"] = _numpy(probs)
                        if logits is not None:
                            part["logits"] = _numpy(logits)
                    if self.mc_samples and self.segmentation:
                        bald = PixelBald()
                        for p_t in self._mc_pass_probs(members[0], x, dropouts, consistent, b):
                            bald.add(_numpy(p_t), validate=self.activation == "none")
                        part["seg"]["bald"] = bald.result()
                    elif self.mc_samples:
                        part["samples"] = _numpy(self._mc_passes(members[0], x, dropouts, consistent, b))
                    if self.extra is not None:
                        for name, values in self.extra(batch).items():
                            part.setdefault("extra", {})[name] = (
                                values.tolist() if isinstance(values, torch.Tensor) else list(values))
                    parts.append(part)
                    buffered += n
                    start += n
                    result.rows += n
                    result.batches += 1
                    result.model_seconds += time.perf_counter() - t0
                    if bar is not None:
                        bar.update(1)
                        bar.set_postfix(rows=result.rows, refresh=False)
                    if buffered >= self.flush_rows:
                        yield self._table(parts)
                        parts, buffered = [], 0
            if parts:
                yield self._table(parts)
        finally:
            for h in handles:
                h.remove()
            if consistent is not None:
                consistent.remove()
            for m, flag in zip(members, was_training, strict=True):
                m.train(flag)
            if bar is not None:
                bar.close()

    def _mc_passes(self, model: Any, x: Any, dropouts: list[_Dropout], consistent: _ConsistentDropout | None,
                   batch_number: int) -> Any:
        """(N, K, C) probabilities of the K dropout passes."""
        import torch

        return torch.stack(list(self._mc_pass_probs(model, x, dropouts, consistent, batch_number)), dim=1)

    def _mc_pass_probs(self, model: Any, x: Any, dropouts: list[_Dropout], consistent: _ConsistentDropout | None,
                       batch_number: int) -> Iterator[Any]:
        """The probabilities of each of the K dropout passes, one pass at a time."""
        import torch

        for k in range(self.mc_samples):
            if consistent is not None:
                consistent.active = k
                try:
                    out = self._call(model, x)
                finally:
                    consistent.active = None
            else:
                devices = [x.device] if isinstance(x, torch.Tensor) and x.device.type == "cuda" else []
                with torch.random.fork_rng(devices=devices):
                    torch.manual_seed(_seed_of(self.seed, batch_number, k))
                    for d in dropouts:
                        d.module.train()
                    try:
                        out = self._call(model, x)
                    finally:
                        for d in dropouts:
                            d.module.eval()
            yield self._probs(out)[0]

    def _seg_part(self, out: Any, ids: list[str]) -> dict[str, Any]:
        """One batch's segmentation summaries (and masks), from the model output."""
        probs, _ = self._probs(out)
        arr = _numpy(probs)
        try:
            summary = segmentation_summaries(arr, top_q=self._seg["top_q"],
                                             uncertain_threshold=self._seg["uncertain_threshold"],
                                             map_size=self._seg["map_size"], validate=self.activation == "none")
        except ValueError as exc:
            raise ValueError(f"segmentation output of the batch starting at id {ids[0]!r}: {exc}") from None
        part: dict[str, Any] = {"mean_entropy": summary.mean_entropy, "topq_entropy": summary.topq_entropy,
                                "class_uncertain_fraction": summary.class_uncertain_fraction,
                                "uncertainty_map": summary.uncertainty_map.reshape(len(ids), -1)}
        if self.mask_dir is not None:
            part["mask_uri"] = _write_masks(self.mask_dir, ids, probs.argmax(dim=1).cpu().numpy())
        return part

    # -- Arrow -------------------------------------------------------------------------

    def _table(self, parts: list[dict[str, Any]]) -> pa.Table:
        columns: dict[str, pa.Array] = {"id": pa.array([i for p in parts for i in p["id"]], pa.string())}
        n = len(columns["id"])
        children: dict[str, pa.Array] = {}
        if "probs" in parts[0] and "probs" in self.outputs:
            children["probs"] = _lists(np.concatenate([p["probs"] for p in parts]))
        if "logits" in parts[0] and "logits" in self.outputs:
            children["logits"] = _lists(np.concatenate([p["logits"] for p in parts]))
        if "samples" in parts[0]:
            children["samples"] = _nested_lists(np.concatenate([p["samples"] for p in parts]))
        if "boxes" in parts[0]:
            children["boxes"] = _boxes([d for p in parts for d in p["boxes"]])
        if "seg" in parts[0]:
            seg = [p["seg"] for p in parts]
            for key in ("mean_entropy", "topq_entropy", "bald"):
                if key in seg[0]:
                    children[key] = pa.array(np.concatenate([q[key] for q in seg]).astype(np.float32))
            for key in ("class_uncertain_fraction", "uncertainty_map"):
                children[key] = _lists(np.concatenate([q[key] for q in seg]))
            if "mask_uri" in seg[0]:
                children["mask_uri"] = pa.array([u for q in seg for u in q["mask_uri"]], pa.string())
        if children:
            columns[f"{PRED_PREFIX}{self.model_name}"] = pa.StructArray.from_arrays(
                list(children.values()), names=list(children))
        for space in self.embeddings:
            vecs = np.concatenate([p[f"{EMB_PREFIX}{space}"] for p in parts]).astype(np.float32, copy=False)
            columns[f"{EMB_PREFIX}{space}"] = pa.FixedSizeListArray.from_arrays(
                pa.array(vecs.reshape(-1)), vecs.shape[1])
        if "extra" in parts[0]:
            for name in parts[0]["extra"]:
                columns[name] = pa.array([v for p in parts for v in p["extra"][name]])
        table = pa.table(columns)
        assert table.num_rows == n
        return table


def _lists(m: np.ndarray) -> pa.Array:
    """(N, C) -> list<float32> of N rows of C values."""
    n, c = m.shape
    offsets = pa.array(np.arange(0, n * c + 1, c, dtype=np.int32))
    return pa.ListArray.from_arrays(offsets, pa.array(np.ascontiguousarray(m, np.float32).reshape(-1)))


def _nested_lists(s: np.ndarray) -> pa.Array:
    """(N, K, C) -> list<list<float32>>."""
    n, k, c = s.shape
    inner = _lists(s.reshape(n * k, c))
    return pa.ListArray.from_arrays(pa.array(np.arange(0, n * k + 1, k, dtype=np.int32)), inner)


def _boxes(dets: list[Mapping[str, np.ndarray]]) -> pa.Array:
    """Per-image detections -> list<struct{x1, y1, x2, y2, score, probs}> (+ ``embedding``
    when the detections carry one: ``(B, D)`` per image)."""
    counts = []
    coords, scores, probs = [], [], []
    for i, d in enumerate(dets):
        if "boxes" not in d or "scores" not in d:
            raise ValueError(f"detection {i}: the adapter must return 'boxes' and 'scores' (and optionally 'probs')")
        xy = np.asarray(d["boxes"], np.float32).reshape(-1, 4)
        sc = np.asarray(d["scores"], np.float32).reshape(-1)
        if len(sc) != len(xy):
            raise ValueError(f"detection {i}: {len(xy)} boxes but {len(sc)} scores")
        counts.append(len(xy))
        coords.append(xy)
        scores.append(sc)
        if "probs" in d and d["probs"] is not None:
            probs.append(np.asarray(d["probs"], np.float32).reshape(len(xy), -1))
        elif len(xy):
            probs.append(None)
    xy = np.concatenate(coords) if coords else np.zeros((0, 4), np.float32)
    sc = np.concatenate(scores) if scores else np.zeros(0, np.float32)
    fields = [pa.array(xy[:, j]) for j in range(4)] + [pa.array(sc)]
    if probs and all(p is not None for p in probs):
        fields.append(_lists(np.concatenate(probs)))
    elif any(p is not None for p in probs):
        raise ValueError("every detection needs class probabilities, or none does")
    else:
        fields.append(pa.nulls(len(sc), pa.list_(pa.float32())))
    names = list(PRED_BOX)
    if dets and "embedding" in dets[0]:
        emb = [np.asarray(d["embedding"], np.float32) for d in dets if len(d["embedding"])]
        dim = emb[0].shape[1] if emb else 1
        fields.append(_lists(np.concatenate(emb) if emb else np.zeros((0, dim), np.float32)))
        names.append(pa.field("embedding", pa.list_(pa.float32())))
    flat = pa.StructArray.from_arrays(fields, fields=names)
    offsets = pa.array(np.concatenate([[0], np.cumsum(counts)]).astype(np.int32))
    return pa.ListArray.from_arrays(offsets, flat)


def _registered_model(sink: Any, name: str) -> dict[str, Any] | None:
    """The sink's registration of model ``name`` as a dict (task and settings), or None."""
    if sink is None:
        return None
    models = getattr(sink, "models", None)
    if isinstance(models, Mapping):  # a store Collection
        spec = models.get(name)
        return None if spec is None else {"task": spec.task, **spec.settings()}
    describe = getattr(sink, "describe", None)
    if callable(describe):  # the client's Collection: CollectionInfo as a dict
        for m in describe().get("models", []):
            if m.get("name") == name:
                # proto3 zeros mean "not set" (the defaults)
                return {k: v for k, v in m.items() if v or k not in ("top_q", "uncertain_threshold", "map_size")}
    return None


def _mask_name(row_id: str) -> str:
    """A file name for a row's mask: the id made safe, plus a hash so two ids never share it."""
    safe = re.sub(r"[^A-Za-z0-9._-]", "_", row_id).lstrip(".")[:100] or "_"
    return f"{safe}-{hashlib.sha1(row_id.encode()).hexdigest()[:10]}.png"


def _write_masks(folder: str, ids: list[str], top: np.ndarray) -> list[str]:
    """Each ``(H, W)`` argmax map as a PNG of class indices + 1 (0 = none); their paths."""
    from PIL import Image

    os.makedirs(folder, exist_ok=True)
    paths = []
    for row_id, classes in zip(ids, top, strict=True):
        values = classes.astype(np.int64) + 1
        # 8-bit while the values fit below 255 (the "ignore" value of 8-bit masks), else 16-bit
        img = Image.fromarray(values.astype(np.uint8) if values.max() < 255 else values.astype(np.uint16))
        path = os.path.join(os.path.abspath(folder), _mask_name(row_id))
        img.save(path, format="PNG")
        paths.append(path)
    return paths


def run(model: Any, loader: Iterable[Any], sink: Any = None, **options: Any) -> InferenceResult:
    """``InferenceRunner(**options).run(model, loader, sink)``."""
    return InferenceRunner(**options).run(model, loader, sink)
