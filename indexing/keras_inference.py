"""Run a Keras 3 model over batches and write its outputs into a collection: the PyTorch
runner (:mod:`indexing.inference`) for Keras, with the same options and the same rows.

    import os; os.environ["KERAS_BACKEND"] = "torch"   # or "tensorflow", "jax": before importing keras
    from indexing.keras_inference import KerasInferenceRunner

    runner = KerasInferenceRunner(model_name="mlp", embeddings={"penult": "dense_1"}, mc_samples=20)
    summary = runner.run(model, x_array, sink=client.collection("digits"), batch_size=256)

Inputs: a NumPy array (cut into ``batch_size`` batches), or any iterable of batches — NumPy
arrays, ``(x, y)`` / ``(x, y, weights)`` tuples (``x`` is used), dicts (``input_key``, else
``"input"``, else the only array; the ``id_key`` entry gives the ids) — such as a generator,
a ``keras.utils.PyDataset`` or a ``tf.data.Dataset``. For each batch the runner does one
deterministic pass (``model(x, training=False)``) and, as asked:

* **predictions** — ``pred_<model_name>.probs`` (softmax of the output; the output itself with
  ``activation="none"``, e.g. a model ending in a softmax layer) and ``.logits``;
* **embeddings** from named layers — ``{"space": "layer_name"}`` (names from
  ``model.layers`` / ``model.get_layer``): the runner builds one functional model that
  returns the output and those layers' outputs, so every pass computes them together; outputs
  with more than 2 axes are pooled over all but the **last** (channels-last) axis
  (``pool="mean"|"max"|"first"|"last"|"flatten"``, or ``{"layer", "pool", "channel_dim"}``);
  this needs a functional or Sequential model (a subclassed model's inner layers have no
  symbolic outputs);
* **MC-dropout samples** — ``mc_samples = K`` passes with dropout active, stored as
  ``samples`` (K × C). With ``consistent_masks=True`` (the default, as in the PyTorch runner)
  every ``keras.layers.Dropout`` (and ``SpatialDropout1D/2D/3D``) uses, in pass ``k``, one
  fixed mask per layer drawn from ``numpy.random.default_rng((seed, k, layer))`` over the
  item's shape (channels for the spatial ones) and shared by every item: sample ``k`` is the
  same model ``w_k`` for the whole pool (what BatchBALD needs), whatever the batching. With
  ``consistent_masks=False`` the passes are ``model(x, training=True)`` — Keras' own dropout,
  independent masks per item — with each dropout layer's seed generator set from
  ``(seed, batch, k, layer)`` so that a run is reproducible, and ``BatchNormalization`` layers
  frozen for the passes (``trainable=False`` makes Keras run them in inference mode: batch
  statistics would otherwise replace the moving ones and be written into them);
* **committees** — a list of models: each member's probabilities are one of the ``samples``
  and ``probs`` is their mean;
* **detections** — ``detection=adapter`` as in the PyTorch runner.

Backends: Keras 3 runs on TensorFlow, JAX or PyTorch, chosen by ``KERAS_BACKEND`` before
``keras`` is first imported (``~/.keras/keras.json`` otherwise; TensorFlow is Keras' default).
The runner only calls the model and ``keras.ops``, so it works on each. Tested here on the
torch backend (``pip install 'assay[keras]' torch``, ``KERAS_BACKEND=torch``), which needs
no TensorFlow. On TensorFlow (``pip install tensorflow``, ``KERAS_BACKEND=tensorflow``, or
unset): a ``tf.data.Dataset`` of ``(x, y)`` or dict elements is a loader as it is, ids
come from a string ``id`` feature (bytes are decoded), and ``tf.keras`` 2 models (Keras 2,
TensorFlow < 2.16) are not supported: load them with Keras 3 (``keras.saving.load_model``
of a ``.keras`` file).

Rows go to ``sink.upsert(table)`` every ``flush_rows`` rows (a store ``Collection`` or the
client's), one write in flight while the next batches run — the PyTorch runner's loop.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

import numpy as np
import pyarrow as pa

from indexing.inference import POOLS, InferenceResult, InferenceRunner, _seed_of
from indexing.schema import EMB_PREFIX

__all__ = ["KerasInferenceRunner", "pool_array", "run_keras"]


def pool_array(a: np.ndarray, pool: str | Callable[[np.ndarray], np.ndarray] = "mean",
               channel_dim: int | None = None) -> np.ndarray:
    """One vector per item from a layer's output ``a`` (first axis: the batch). Keras is
    channels-last: the feature axis is the last one unless ``channel_dim`` says otherwise;
    every other axis is pooled (see :func:`indexing.inference.pool_activation`)."""
    if callable(pool):
        return np.asarray(pool(a))
    if a.ndim == 1:
        return a[:, None]
    if a.ndim == 2:
        return a
    if pool == "flatten":
        return a.reshape(a.shape[0], -1)
    if pool not in POOLS:
        raise ValueError(f"pool must be one of {', '.join(POOLS)} or a callable; got {pool!r}")
    x = np.moveaxis(a, -1 if channel_dim is None else channel_dim, -1)
    x = x.reshape(x.shape[0], -1, x.shape[-1])  # (N, L, D)
    if pool == "mean":
        return x.mean(axis=1)
    if pool == "max":
        return x.max(axis=1)
    return x[:, 0] if pool == "first" else x[:, -1]


def _numpy(x: Any) -> np.ndarray:
    if isinstance(x, np.ndarray):
        return x
    import keras

    return np.asarray(keras.ops.convert_to_numpy(x))


def _texts(values: Any) -> list[str]:
    """Ids from a batch: a list, a NumPy array or a backend tensor (bytes are decoded)."""
    if isinstance(values, list | tuple):
        items = list(values)
    elif hasattr(values, "numpy") and not isinstance(values, np.ndarray):  # tf.Tensor of strings
        items = values.numpy().tolist()
    else:
        items = np.asarray(values).tolist()
    return [v.decode() if isinstance(v, bytes) else str(v) for v in items]


class _FixedMasks:
    """Pass ``k``'s fixed masks on every dropout layer: each layer's ``call`` is replaced for
    the runner's passes by ``inputs * mask_k`` and restored afterwards."""

    def __init__(self, layers: list[Any], seed: int) -> None:
        self.layers = layers
        self.seed = seed
        self.active: int | None = None
        self._masks: dict[tuple, np.ndarray] = {}
        self._saved: list[tuple[Any, Any]] = []

    def _noise_shape(self, layer: Any, inputs: Any) -> tuple[int, ...]:
        shape = tuple(int(d) for d in inputs.shape)
        if hasattr(layer, "_get_noise_shape"):  # SpatialDropout1D/2D/3D: per channel
            ns = layer._get_noise_shape(inputs)
        else:
            ns = layer.noise_shape
        if ns is None:
            return shape[1:]
        return tuple(shape[i] if d is None else int(d) for i, d in enumerate(ns))[1:]

    def mask(self, index: int, layer: Any, k: int, inputs: Any) -> np.ndarray:
        shape = self._noise_shape(layer, inputs)
        key = (index, k, shape)
        m = self._masks.get(key)
        if m is None:
            rng = np.random.default_rng(_seed_of(self.seed, k, index))
            m = ((rng.random(shape) >= layer.rate) / (1.0 - layer.rate)).astype(np.float32)[None]
            self._masks[key] = m
        return m

    def __enter__(self) -> _FixedMasks:
        import keras

        for index, layer in enumerate(self.layers):
            original = layer.call

            def call(inputs: Any, training: Any = None, *, _layer: Any = layer, _index: int = index,
                     _original: Any = original) -> Any:
                if self.active is None:
                    return _original(inputs, training=training)
                m = self.mask(_index, _layer, self.active, inputs)
                return inputs * keras.ops.convert_to_tensor(m, dtype=inputs.dtype)

            self._saved.append((layer, original))
            layer.call = call
        return self

    def __exit__(self, *exc: object) -> None:
        for layer, _ in self._saved:
            del layer.call  # the class's method again
        self._saved.clear()


class KerasInferenceRunner(InferenceRunner):
    """:class:`indexing.inference.InferenceRunner`'s options, for Keras 3 models (see the
    module docstring). Differences: ``output=`` (a callable picking the logits from a model
    that returns a dict or a list) replaces ``forward=``; ``device`` is the backend's
    business (Keras places the model); :meth:`run` and :meth:`predict` take ``batch_size``
    for NumPy-array inputs."""

    def __init__(self, *, output: Callable[[Any], Any] | None = None, batch_size: int = 256,
                 **options: Any) -> None:
        if "forward" in options:
            raise ValueError("KerasInferenceRunner takes output= (pick the logits from the model's output), "
                             "not forward=")
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be an integer >= 1; got {batch_size!r}")
        super().__init__(**options)
        self.output = output
        self.batch_size = batch_size

    def run(self, model: Any, loader: Any, sink: Any = None, *, batch_size: int | None = None) -> InferenceResult:
        """Run ``model`` (a Keras model, or a list of them: a committee) over ``loader`` (an
        array or an iterable of batches) and write every ``flush_rows`` rows to ``sink``
        (without a sink, ``result.table`` holds them)."""
        return super().run(model, self._batches(loader, batch_size), sink)

    def predict(self, model: Any, loader: Any, *, batch_size: int | None = None) -> Iterator[pa.Table]:
        return super().predict(model, self._batches(loader, batch_size))

    # -- inputs ------------------------------------------------------------------------

    def _batches(self, loader: Any, batch_size: int | None) -> Iterable[Any]:
        step = batch_size or self.batch_size
        if isinstance(loader, np.ndarray):
            return _Sliced(loader, step)
        if isinstance(loader, Mapping) and all(isinstance(v, np.ndarray | list) for v in loader.values()):
            return _Sliced(loader, step)
        if hasattr(loader, "__getitem__") and hasattr(loader, "num_batches") and hasattr(loader, "__len__"):
            return _Indexed(loader)  # keras.utils.PyDataset
        return loader

    def _split(self, batch: Any) -> tuple[Any, list[str] | None]:
        if isinstance(batch, Mapping):
            ids = batch.get(self.id_key)
            if self.input_key is not None:
                if self.input_key not in batch:
                    raise KeyError(f"input_key {self.input_key!r} is not in the batch (keys: {', '.join(batch)})")
                inputs = batch[self.input_key]
            elif "input" in batch:
                inputs = batch["input"]
            else:
                arrays = [k for k in batch if k != self.id_key and hasattr(batch[k], "shape")
                          and getattr(batch[k], "dtype", None) is not None
                          and np.dtype(str(_numpy(batch[k]).dtype)).kind in "fiub"]
                if len(arrays) != 1:
                    raise KeyError(f"dict batch: give input_key= (keys: {', '.join(batch)})")
                inputs = batch[arrays[0]]
            return inputs, None if ids is None else _texts(ids)
        if isinstance(batch, tuple | list):
            return batch[0], None
        return batch, None

    # -- the model ---------------------------------------------------------------------

    def _feature_model(self, model: Any) -> tuple[Any, list[tuple[str, Any, Any]]]:
        """(the model, or a functional model returning [output, layer outputs...]; the
        spaces with their pooling)."""
        import keras

        if not self.embeddings:
            return model, []
        spaces: list[tuple[str, Any, Any]] = []
        outputs = []
        names = [layer.name for layer in model.layers]
        for space, spec in self.embeddings.items():
            if isinstance(spec, Mapping):
                layer, pool, channel_dim = spec.get("layer"), spec.get("pool", self.pool), spec.get("channel_dim")
            else:
                layer, pool, channel_dim = spec, self.pool, None
            if isinstance(layer, str):
                if layer not in names:
                    raise ValueError(f"embedding '{space}': the model has no layer named {layer!r} "
                                     f"(layers: {', '.join(names[:20])}{', ...' if len(names) > 20 else ''})")
                layer = model.get_layer(layer)
            try:
                outputs.append(layer.output)
            except (AttributeError, ValueError) as exc:
                raise ValueError(f"embedding '{space}': layer {layer.name!r} has no symbolic output ({exc}); "
                                 "embeddings from named layers need a functional or Sequential model "
                                 "that has been built (e.g. given a keras.Input)") from exc
            spaces.append((space, pool, channel_dim))
        try:
            inputs = model.inputs
            out = model.outputs
        except (AttributeError, ValueError) as exc:
            raise ValueError(f"embeddings from named layers need a functional or Sequential model with "
                             f"known inputs ({exc})") from exc
        main = out[0] if len(out) == 1 else out
        # a single input as a tensor, not a one-element list (what a batch is)
        return keras.Model(inputs=inputs[0] if len(inputs) == 1 else inputs,
                           outputs=[main, *outputs]), spaces

    @staticmethod
    def _dropout_layers(model: Any) -> list[Any]:
        import keras

        out = []
        for layer in model._flatten_layers(include_self=False) if hasattr(model, "_flatten_layers") \
                else model.layers:
            if isinstance(layer, keras.layers.AlphaDropout | keras.layers.GaussianDropout):
                raise ValueError(f"{type(layer).__name__} is not supported with consistent masks; "
                                 "use consistent_masks=False")
            if isinstance(layer, keras.layers.Dropout) and layer.rate > 0:
                if layer.rate >= 1:
                    raise ValueError("a dropout layer with rate=1 drops everything; MC dropout needs rate < 1")
                out.append(layer)
        return out

    def _logits(self, out: Any) -> np.ndarray:
        if self.output is not None:
            out = self.output(out)
        if isinstance(out, Mapping | list | tuple):
            raise TypeError(f"the model returned a {type(out).__name__}; give output= picking the logits")
        arr = _numpy(out).astype(np.float32, copy=False)
        if arr.ndim != 2:
            raise ValueError(f"the model output must be (N, C) logits; got shape {arr.shape}")
        return arr

    def _probs_np(self, out: Any) -> tuple[np.ndarray, np.ndarray | None]:
        logits = self._logits(out)
        if self.activation == "none":
            return logits, None
        z = logits - logits.max(axis=1, keepdims=True)
        e = np.exp(z)
        return (e / e.sum(axis=1, keepdims=True)).astype(np.float32), logits

    # -- the loop ----------------------------------------------------------------------

    def _tables(self, model: Any, loader: Iterable[Any], result: InferenceResult) -> Iterator[pa.Table]:
        import keras

        committee = list(model) if isinstance(model, list | tuple) else None
        members = committee if committee is not None else [model]
        if not members or not all(isinstance(m, keras.Model) for m in members):
            raise TypeError("model must be a keras.Model or a non-empty list of them (a committee)")
        if committee is not None and self.mc_samples:
            raise ValueError("a committee gives its samples itself: use mc_samples=0")
        if committee is not None and self.detection is not None:
            raise ValueError("detection with a committee is not supported")
        feature_model, spaces = self._feature_model(members[0])
        dropouts = self._dropout_layers(members[0]) if self.mc_samples else []
        if self.mc_samples and not dropouts:
            raise ValueError("mc_samples needs dropout layers (keras.layers.Dropout, SpatialDropout1D/2D/3D "
                             "with rate > 0) in the model")
        total = len(loader) if hasattr(loader, "__len__") else None  # type: ignore[arg-type]
        bar = None
        if self.progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=total, unit="batch", desc=f"inference {self.model_name}", leave=False)
        parts: list[dict[str, Any]] = []
        buffered = start = 0
        fixed = _FixedMasks(dropouts, self.seed) if self.mc_samples and self.consistent_masks else None
        try:
            if fixed is not None:
                fixed.__enter__()
            for b, batch in enumerate(loader):
                t0 = time.perf_counter()
                inputs, batch_ids = self._split(batch)
                n = int(inputs.shape[0]) if hasattr(inputs, "shape") else len(inputs)
                ids = self._ids(batch, batch_ids, start, n)
                part: dict[str, Any] = {"id": ids}
                first = feature_model(inputs, training=False)
                if spaces:
                    main, layer_outs = first[0], first[1:]
                    for (space, pool, channel_dim), lo in zip(spaces, layer_outs, strict=True):
                        vec = pool_array(_numpy(lo), pool, channel_dim)
                        if vec.ndim != 2:
                            raise ValueError(f"embedding '{space}': pooling gave shape {vec.shape}, not (N, D)")
                        part[f"{EMB_PREFIX}{space}"] = vec.astype(np.float32, copy=False)
                else:
                    main = first
                outs = [main] + [m(inputs, training=False) for m in members[1:]]
                if self.detection is not None:
                    dets = list(self.detection(outs[0]))
                    if len(dets) != n:
                        raise ValueError(f"the detection adapter returned {len(dets)} results for {n} images")
                    part["boxes"] = [{k: np.asarray(_numpy(v), np.float32) for k, v in d.items()
                                      if k in ("boxes", "scores", "probs")} for d in dets]
                elif committee is not None:
                    probs = np.stack([self._probs_np(o)[0] for o in outs], axis=1)  # (N, M, C)
                    part["samples"] = probs
                    part["probs"] = probs.mean(axis=1)
                else:
                    probs, logits = self._probs_np(outs[0])
                    part["probs"] = probs
                    if logits is not None:
                        part["logits"] = logits
                if self.mc_samples:
                    part["samples"] = self._mc_passes(members[0], inputs, dropouts, fixed, b)
                if self.extra is not None:
                    for name, values in self.extra(batch).items():
                        vals = values.tolist() if hasattr(values, "tolist") else list(values)
                        part.setdefault("extra", {})[name] = vals
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
            if fixed is not None:
                fixed.__exit__()
            if bar is not None:
                bar.close()

    def _mc_passes(self, model: Any, x: Any, dropouts: list[Any], fixed: _FixedMasks | None,
                   batch_number: int) -> np.ndarray:
        """(N, K, C) probabilities of the K dropout passes."""
        import keras

        passes = []
        if fixed is not None:
            for k in range(self.mc_samples):
                fixed.active = k
                try:
                    passes.append(self._probs_np(model(x, training=False))[0])
                finally:
                    fixed.active = None
            return np.stack(passes, axis=1)
        norms = [layer for layer in _all_layers(model) if isinstance(layer, keras.layers.BatchNormalization)]
        trainable = [layer.trainable for layer in norms]
        try:
            for layer in norms:  # inference mode for them even with training=True (Keras' rule)
                layer.trainable = False
            for k in range(self.mc_samples):
                # Seeded passes: each dropout layer's seed generator (TensorFlow, JAX, seeded
                # layers on torch) and, on torch, the global RNG its unseeded dropout draws
                # from (restored afterwards, like the PyTorch runner's fork_rng).
                for i, layer in enumerate(dropouts):
                    state = layer.seed_generator.state
                    state.assign(keras.ops.convert_to_tensor(
                        [_seed_of(self.seed, batch_number, k, i) & 0x7FFFFFFF, 0], dtype=state.dtype))
                with _torch_rng(_seed_of(self.seed, batch_number, k)):
                    passes.append(self._probs_np(model(x, training=True))[0])
        finally:
            for layer, flag in zip(norms, trainable, strict=True):
                layer.trainable = flag
        return np.stack(passes, axis=1)


@contextlib.contextmanager
def _torch_rng(seed: int) -> Iterator[None]:
    """On the torch backend: torch's global RNG seeded with ``seed`` inside, restored after."""
    import keras

    if keras.backend.backend() != "torch":
        yield
        return
    import torch

    devices = [torch.cuda.current_device()] if torch.cuda.is_available() else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield


def _all_layers(model: Any) -> list[Any]:
    if hasattr(model, "_flatten_layers"):
        return list(model._flatten_layers(include_self=False))
    return list(model.layers)


class _Sliced:
    """An array (or a dict of arrays: one batch is a dict of slices) cut into batches."""

    def __init__(self, data: Any, step: int) -> None:
        self.data, self.step = data, step
        first = next(iter(data.values())) if isinstance(data, Mapping) else data
        self.n = len(first)

    def __len__(self) -> int:
        return -(-self.n // self.step)

    def __iter__(self) -> Iterator[Any]:
        for s in range(0, self.n, self.step):
            if isinstance(self.data, Mapping):
                yield {k: v[s:s + self.step] for k, v in self.data.items()}
            else:
                yield self.data[s:s + self.step]


class _Indexed:
    """A ``keras.utils.PyDataset`` (batches by index) as an iterable."""

    def __init__(self, data: Any) -> None:
        self.data = data

    def __len__(self) -> int:
        return len(self.data)

    def __iter__(self) -> Iterator[Any]:
        for i in range(len(self.data)):
            yield self.data[i]


def run_keras(model: Any, loader: Any, sink: Any = None, *, batch_size: int | None = None,
              **options: Any) -> InferenceResult:
    """``KerasInferenceRunner(**options).run(model, loader, sink, batch_size=...)``."""
    return KerasInferenceRunner(**options).run(model, loader, sink, batch_size=batch_size)

