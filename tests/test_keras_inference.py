"""The Keras 3 runner (indexing/keras_inference.py) on the torch backend (no TensorFlow):
small functional, Sequential and convolutional models built here and trained briefly on
scikit-learn's digits. Outputs are checked against a plain Keras loop, written into a real
store collection and through a real server via the client, then mined."""

from __future__ import annotations

import os

import numpy as np
import pyarrow as pa
import pytest

# The backend is chosen when keras is first imported: torch, so no TensorFlow is needed.
os.environ.setdefault("KERAS_BACKEND", "torch")
keras = pytest.importorskip("keras")
if keras.backend.backend() != "torch":  # keras was imported earlier with another backend
    pytest.skip("these tests run Keras on the torch backend", allow_module_level=True)

from indexing.inference import _seed_of  # noqa: E402
from indexing.keras_inference import KerasInferenceRunner, _FixedMasks, pool_array, run_keras  # noqa: E402
from indexing.store import Store  # noqa: E402
from tests.test_inference import load_digits_xy  # noqa: E402

CLASSES = [str(i) for i in range(10)]


@pytest.fixture(scope="module")
def digits() -> tuple[np.ndarray, np.ndarray]:
    x, y = load_digits_xy()
    return (x / 16.0).astype(np.float32), y


def _mlp(seed: int = 0) -> keras.Model:
    keras.utils.set_random_seed(seed)
    inp = keras.Input((64,), name="pixels")
    h = keras.layers.Dense(48, activation="relu", name="h1")(inp)
    h = keras.layers.Dropout(0.3, name="drop1")(h)
    h = keras.layers.Dense(32, activation="relu", name="h2")(h)
    h = keras.layers.BatchNormalization(name="bn")(h)
    h = keras.layers.Dropout(0.3, name="drop2")(h)
    out = keras.layers.Dense(10, name="logits")(h)
    return keras.Model(inp, out, name="mlp")


@pytest.fixture(scope="module")
def model(digits) -> keras.Model:
    """A functional MLP with dropout and batch norm, fitted for five epochs (real outputs)."""
    x, y = digits
    m = _mlp(0)
    m.compile(optimizer=keras.optimizers.Adam(0.01),
              loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    m.fit(x[:1200], y[:1200], epochs=5, batch_size=64, verbose=0)
    return m


def _column(table: pa.Table, path: str) -> np.ndarray:
    col = table.column(path.split(".")[0]).combine_chunks()
    for part in path.split(".")[1:]:
        col = col.field(part)
    return np.asarray(col.to_pylist(), dtype=np.float32)


def _softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def test_runner_equals_a_manual_keras_loop(model, digits):
    x, _ = digits
    runner = KerasInferenceRunner(model_name="mlp", embeddings={"hidden": "h2"}, progress=False, flush_rows=500)
    tables = list(runner.predict(model, x, batch_size=128))
    assert [t.num_rows for t in tables] == [512, 512, 512, 261]  # flushed every >= 500 rows
    table = pa.concat_tables(tables)
    assert table.column("id").to_pylist() == [str(i) for i in range(len(x))]
    hidden_model = keras.Model(model.input, model.get_layer("h2").output)
    logits, hidden = [], []
    for s in range(0, len(x), 128):
        xb = x[s:s + 128]
        logits.append(keras.ops.convert_to_numpy(model(xb, training=False)))
        hidden.append(keras.ops.convert_to_numpy(hidden_model(xb, training=False)))
    logits = np.concatenate(logits)
    np.testing.assert_allclose(_column(table, "pred_mlp.logits"), logits, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(_column(table, "pred_mlp.probs"), _softmax(logits), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(_column(table, "emb_hidden"), np.concatenate(hidden), rtol=1e-5, atol=1e-6)
    assert table.schema.field("emb_hidden").type == pa.list_(pa.float32(), 32)
    # the model learned something: its predictions are mostly right on the rows it did not see
    assert (logits[1200:].argmax(axis=1) == digits[1][1200:]).mean() > 0.7


def test_sequential_conv_model_pools_channels_last_and_takes_dict_batches(digits):
    x, y = digits
    images = x[:96].reshape(-1, 8, 8, 1)
    keras.utils.set_random_seed(1)
    conv = keras.Sequential([keras.Input((8, 8, 1)), keras.layers.Conv2D(6, 3, padding="same", name="conv"),
                             keras.layers.ReLU(name="relu"), keras.layers.GlobalAveragePooling2D(name="gap"),
                             keras.layers.Dense(10, activation="softmax", name="out")])
    batches = [{"id": [f"img{i}" for i in range(s, s + 32)], "image": images[s:s + 32], "label": y[s:s + 32]}
               for s in range(0, 96, 32)]
    runner = KerasInferenceRunner(model_name="cnn", embeddings={"conv": {"layer": "conv", "pool": "max"},
                                                                "relu": "relu"},
                                  activation="none", input_key="image", progress=False,
                                  extra=lambda b: {"label": [str(v) for v in b["label"]]})
    table = runner.run(conv, batches).table
    assert table.column("id").to_pylist()[:2] == ["img0", "img1"]
    fmap = keras.ops.convert_to_numpy(keras.Model(conv.inputs[0], conv.get_layer("conv").output)(images))
    np.testing.assert_allclose(_column(table, "emb_conv"), fmap.max(axis=(1, 2)), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(_column(table, "emb_relu"), np.maximum(fmap, 0).mean(axis=(1, 2)),
                               rtol=1e-5, atol=1e-6)
    probs = keras.ops.convert_to_numpy(conv(images))
    np.testing.assert_allclose(_column(table, "pred_cnn.probs"), probs, rtol=1e-5, atol=1e-6)
    assert "logits" not in table.column("pred_cnn").type.names  # activation="none": probs as given
    assert table.column("label").to_pylist()[:3] == [str(v) for v in y[:3]]


def test_mc_dropout_consistent_masks(model, digits):
    x, _ = digits
    opts = dict(model_name="mlp", mc_samples=6, seed=7, progress=False, outputs=("probs",))
    a = KerasInferenceRunner(**opts).run(model, x[:400], batch_size=100).table
    samples = _column(a, "pred_mlp.samples")  # (N, K, C)
    assert samples.shape == (400, 6, 10)
    np.testing.assert_allclose(samples.sum(axis=2), 1.0, atol=1e-5)
    assert all(np.abs(samples[:, k] - samples[:, 0]).max() > 1e-3 for k in range(1, 6))
    # the same K models for every item, whatever the batching and order
    order = np.random.default_rng(1).permutation(400)
    b = KerasInferenceRunner(**opts).run(model, x[:400][order], batch_size=37).table
    np.testing.assert_allclose(_column(b, "pred_mlp.samples"), samples[order], rtol=0, atol=1e-5)
    twice = np.stack([x[0], x[0]])
    s = _column(KerasInferenceRunner(**opts).run(model, twice).table, "pred_mlp.samples")
    np.testing.assert_allclose(s[0], s[1], rtol=0, atol=1e-6)
    # pass k by hand: the deterministic layers, each dropout replaced by its fixed mask for k
    masks = _FixedMasks([model.get_layer("drop1"), model.get_layer("drop2")], 7)
    h = model.get_layer("h1")(x[:400])
    h = keras.ops.multiply(h, keras.ops.convert_to_tensor(masks.mask(0, model.get_layer("drop1"), 2, h)))
    h = model.get_layer("bn")(model.get_layer("h2")(h), training=False)
    h = keras.ops.multiply(h, keras.ops.convert_to_tensor(masks.mask(1, model.get_layer("drop2"), 2, h)))
    manual = _softmax(keras.ops.convert_to_numpy(model.get_layer("logits")(h)))
    np.testing.assert_allclose(samples[:, 2], manual, rtol=0, atol=1e-5)
    # the dropout layers are themselves again afterwards: deterministic at inference
    np.testing.assert_array_equal(keras.ops.convert_to_numpy(model(x[:5], training=False)),
                                  keras.ops.convert_to_numpy(model(x[:5], training=False)))


def test_mc_dropout_with_training_true_is_seeded_and_leaves_batch_norm_alone(model, digits):
    x, _ = digits
    bn = model.get_layer("bn")
    before = [keras.ops.convert_to_numpy(v).copy() for v in (bn.moving_mean, bn.moving_variance)]
    opts = dict(model_name="mlp", mc_samples=4, consistent_masks=False, seed=3, progress=False)
    a = _column(run_keras(model, x[:300], batch_size=64, **opts).table, "pred_mlp.samples")
    b = _column(run_keras(model, x[:300], batch_size=64, **opts).table, "pred_mlp.samples")
    np.testing.assert_array_equal(a, b)
    assert np.abs(a[:, 1] - a[:, 0]).max() > 1e-3
    twice = np.stack([x[0], x[0]])  # independent masks: two copies of one item differ
    s = _column(run_keras(model, twice, **opts).table, "pred_mlp.samples")
    assert np.abs(s[0] - s[1]).max() > 1e-4
    after = [keras.ops.convert_to_numpy(v) for v in (bn.moving_mean, bn.moving_variance)]
    for u, v in zip(before, after, strict=True):
        np.testing.assert_array_equal(u, v)  # batch statistics were not written into the moving ones
    assert bn.trainable  # and the flag is back
    # each pass equals a manual `model(x, training=True)` seeded the way the docstring says
    import torch

    layers = [model.get_layer("drop1"), model.get_layer("drop2")]
    for layer in (model.get_layer("bn"),):
        layer.trainable = False
    try:
        for i, layer in enumerate(layers):
            st = layer.seed_generator.state
            st.assign(keras.ops.convert_to_tensor([_seed_of(3, 0, 1, i) & 0x7FFFFFFF, 0], dtype=st.dtype))
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(_seed_of(3, 0, 1))
            manual = _softmax(keras.ops.convert_to_numpy(model(x[:64], training=True)))
    finally:
        model.get_layer("bn").trainable = True
    np.testing.assert_allclose(a[:64, 1], manual, rtol=0, atol=1e-6)


def test_committee(digits):
    x, _ = digits
    members = [_mlp(s) for s in (1, 2, 3)]
    t = run_keras(members, x[:200], batch_size=64, model_name="committee", progress=False).table
    samples, probs = _column(t, "pred_committee.samples"), _column(t, "pred_committee.probs")
    expected = np.stack([_softmax(keras.ops.convert_to_numpy(m(x[:200], training=False))) for m in members],
                        axis=1)
    np.testing.assert_allclose(samples, expected, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(probs, expected.mean(axis=1), rtol=1e-5, atol=1e-6)
    assert "logits" not in t.column("pred_committee").type.names


def test_into_a_store_then_through_the_server_and_mined(tmp_path, model, digits):
    from service.client import Client
    from service.server import ServerConfig, start_server

    x, y = digits
    col = Store(str(tmp_path / "local")).create_collection("digits", models={"mlp": CLASSES})
    res = run_keras(model, {"input": x[:300], "id": np.array([f"d{i:04d}" for i in range(300)])}, sink=col,
                    batch_size=64, model_name="mlp", mc_samples=8, flush_rows=128, progress=False,
                    embeddings={"penult": "h2"})
    assert (res.rows, res.batches, res.writes) == (300, 5, 3)
    stored = col.take(["d0000", "d0299"], ["id", "pred_mlp"])
    assert len(stored.column("pred_mlp").to_pylist()[1]["samples"]) == 8
    srv = start_server(ServerConfig(data=str(tmp_path / "srv"), port=0, grace_s=1))
    try:
        with Client(srv.address, timeout=120) as client:
            client.create_collection("digits", models={"mlp": CLASSES})
            sink = client.collection("digits")
            res = KerasInferenceRunner(model_name="mlp", mc_samples=8, progress=True, flush_rows=256,
                                       ids=[f"d{i:04d}" for i in range(len(x))]).run(model, x, sink=sink)
            assert res.rows == len(x) and sink.count() == len(x)
            job = sink.mine("batchbald", 10, model="mlp").wait(timeout=300)
            picks = job.results()
            assert picks.num_rows == 10 and len(set(picks.column("id").to_pylist())) == 10
    finally:
        srv.stop(0)


def test_pooling_and_errors(model, digits):
    a = np.arange(2 * 4 * 5 * 3, dtype=np.float32).reshape(2, 4, 5, 3)
    assert pool_array(a).shape == (2, 3)  # channels last
    np.testing.assert_array_equal(pool_array(a, "max")[:, 0], a[..., 0].max(axis=(1, 2)))
    seq = np.random.default_rng(0).standard_normal((2, 7, 16))
    np.testing.assert_array_equal(pool_array(seq, "first"), seq[:, 0])
    assert pool_array(seq, "flatten").shape == (2, 112)
    x = digits[0][:10]
    with pytest.raises(ValueError, match="no layer named 'nope'"):
        run_keras(model, x, embeddings={"e": "nope"}, progress=False)
    plain = keras.Sequential([keras.Input((64,)), keras.layers.Dense(10)])
    with pytest.raises(ValueError, match="needs dropout layers"):
        run_keras(plain, x, mc_samples=3, progress=False)

    class Sub(keras.Model):
        def __init__(self):
            super().__init__()
            self.d = keras.layers.Dense(10, name="inner")

        def call(self, inputs):
            return self.d(inputs)

    sub = Sub()
    sub(x)
    with pytest.raises(ValueError, match="functional or Sequential"):
        run_keras(sub, x, embeddings={"e": "inner"}, progress=False)
    # a subclassed model still gives predictions
    assert run_keras(sub, x, progress=False).rows == 10
    with pytest.raises(ValueError, match="output="):
        KerasInferenceRunner(forward=lambda m, x: m(x))
    with pytest.raises(TypeError, match="keras.Model"):
        run_keras(object(), x, progress=False)
