"""The PyTorch inference runner (indexing/inference.py) on small models built here: an MLP
with dropout trained briefly on scikit-learn's digits, a committee, a toy detector. Outputs
are checked against a plain loop, written into a real store collection and through a real
server via the client, then mined."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

torch = pytest.importorskip("torch")
from torch import nn  # noqa: E402
from torch.utils.data import DataLoader, Dataset, TensorDataset  # noqa: E402

from indexing.inference import InferenceRunner, pool_activation, run  # noqa: E402
from indexing.store import Store  # noqa: E402

CLASSES = [str(i) for i in range(10)]


def _mlp(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(64, 48), nn.ReLU(), nn.Dropout(0.3), nn.Linear(48, 32), nn.ReLU(),
                         nn.Dropout(0.3), nn.Linear(32, 10))


def load_digits_xy() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's digits (1,797 8x8 images), read from the file it ships: importing
    sklearn.datasets costs seconds on a busy machine."""
    import importlib.util
    import os

    spec = importlib.util.find_spec("sklearn")
    path = os.path.join(spec.submodule_search_locations[0], "datasets", "data", "digits.csv.gz")
    data = np.loadtxt(path, delimiter=",")
    return data[:, :-1], data[:, -1].astype(np.int64)


@pytest.fixture(scope="module")
def digits():
    x, y = load_digits_xy()
    return torch.tensor(x / 16.0, dtype=torch.float32), torch.tensor(y)


@pytest.fixture(scope="module")
def model(digits):
    """An MLP with dropout, trained for a few full-batch SGD steps (a realistic output)."""
    x, y = digits
    m = _mlp(0)
    m.train()
    for _ in range(40):
        m.zero_grad()
        nn.functional.cross_entropy(m(x[:1200]), y[:1200]).backward()
        with torch.no_grad():
            for p in m.parameters():
                p -= 0.5 * p.grad
    m.eval()
    return m


class Digits(Dataset):
    """Dict items with string ids, as a user's dataset would give them."""

    def __init__(self, x, y, order=None):
        self.x, self.y = x, y
        self.order = list(range(len(x))) if order is None else list(order)

    def __len__(self):
        return len(self.order)

    def __getitem__(self, i):
        j = self.order[i]
        return {"id": f"d{j:04d}", "input": self.x[j], "label": int(self.y[j])}


def _column(table: pa.Table, path: str) -> np.ndarray:
    col = table.column(path.split(".")[0]).combine_chunks()
    for part in path.split(".")[1:]:
        col = col.field(part)
    return np.asarray(col.to_pylist(), dtype=np.float32)


def _by_id(table: pa.Table) -> pa.Table:
    return table.sort_by("id")


def test_runner_equals_a_manual_loop(model, digits):
    x, _ = digits
    loader = DataLoader(TensorDataset(x, digits[1]), batch_size=128)
    runner = InferenceRunner(model_name="mlp", embeddings={"hidden": "4"}, progress=False, flush_rows=500)
    tables = list(runner.predict(model, loader))
    assert [t.num_rows for t in tables] == [512, 512, 512, 261]  # flushed every >= 500 rows
    table = pa.concat_tables(tables)
    assert table.column("id").to_pylist() == [str(i) for i in range(len(x))]

    feats = {}
    handle = model[4].register_forward_hook(lambda m, i, o: feats.__setitem__("h", o))
    logits, probs, hidden = [], [], []
    with torch.no_grad():
        for (xb, _) in loader:
            out = model(xb)
            logits.append(out.numpy())
            probs.append(torch.softmax(out, dim=-1).numpy())
            hidden.append(feats["h"].numpy())
    handle.remove()
    np.testing.assert_array_equal(_column(table, "pred_mlp.probs"), np.concatenate(probs))
    np.testing.assert_array_equal(_column(table, "pred_mlp.logits"), np.concatenate(logits))
    np.testing.assert_array_equal(_column(table, "emb_hidden"), np.concatenate(hidden))
    assert table.schema.field("emb_hidden").type == pa.list_(pa.float32(), 32)
    assert model.training is False


def test_mc_dropout_samples_differ_and_are_reproducible(model, digits):
    x, y = digits
    opts = dict(model_name="mlp", mc_samples=6, seed=7, progress=False, outputs=("probs",))
    loader = DataLoader(Digits(x, y), batch_size=100)
    a = _by_id(InferenceRunner(**opts).run(model, loader).table)
    samples = _column(a, "pred_mlp.samples")  # (N, K, C)
    assert samples.shape == (len(x), 6, 10)
    np.testing.assert_allclose(samples.sum(axis=2), 1.0, atol=1e-5)
    # passes differ from each other and from the deterministic prediction
    assert all(np.abs(samples[:, k] - samples[:, 0]).max() > 1e-3 for k in range(1, 6))
    assert np.abs(samples.mean(axis=1) - _column(a, "pred_mlp.probs")).max() > 1e-3
    # the same seed gives the same samples — whatever the batching and the order: every item
    # sees the same K masks (consistent MC dropout, what BatchBALD needs)
    order = np.random.default_rng(1).permutation(len(x))
    b = _by_id(InferenceRunner(**opts).run(model, DataLoader(Digits(x, y, order), batch_size=37)).table)
    np.testing.assert_allclose(_column(b, "pred_mlp.samples"), samples, rtol=0, atol=1e-6)
    c = _by_id(InferenceRunner(**{**opts, "seed": 8}).run(model, loader).table)
    assert np.abs(_column(c, "pred_mlp.samples") - samples).max() > 1e-3
    # one mask per pass over the whole pool: pass k equals the model with that layer's fixed
    # dropout mask applied by hand to every item
    runner = InferenceRunner(**opts)
    drops = runner._dropouts(model)
    from indexing.inference import _ConsistentDropout

    hooks = _ConsistentDropout(drops, 7)
    hooks.remove()
    with torch.no_grad():
        h = model[1](model[0](x))
        h = h * hooks._mask(drops[0], 2, h)
        h = model[4](model[3](h))
        h = h * hooks._mask(drops[1], 2, h)
        manual = torch.softmax(model[6](h), dim=-1).numpy()
    np.testing.assert_allclose(samples[:, 2], manual, rtol=0, atol=1e-6)  # `a` is sorted by id = by row


def test_mc_dropout_train_mode_is_seeded(model, digits):
    x, y = digits
    opts = dict(model_name="mlp", mc_samples=4, consistent_masks=False, seed=3, progress=False)
    loader = DataLoader(TensorDataset(x[:300], y[:300]), batch_size=64)
    a = _column(run(model, loader, **opts).table, "pred_mlp.samples")
    b = _column(run(model, loader, **opts).table, "pred_mlp.samples")
    np.testing.assert_array_equal(a, b)
    assert np.abs(a[:, 1] - a[:, 0]).max() > 1e-3
    # independent masks: two copies of one item in a batch get different samples
    twice = torch.stack([x[0], x[0]])
    s = _column(run(model, [twice], **opts).table, "pred_mlp.samples")
    assert np.abs(s[0] - s[1]).max() > 1e-4
    assert not any(m.training for m in model.modules())  # dropout back in eval mode


def test_committee(digits):
    x, y = digits
    members = [_mlp(s).eval() for s in (1, 2, 3)]
    loader = DataLoader(TensorDataset(x[:200], y[:200]), batch_size=64)
    t = run(members, loader, model_name="committee", progress=False).table
    samples, probs = _column(t, "pred_committee.samples"), _column(t, "pred_committee.probs")
    with torch.no_grad():
        expected = np.stack([torch.softmax(m(x[:200]), -1).numpy() for m in members], axis=1)
    np.testing.assert_allclose(samples, expected, rtol=0, atol=1e-6)
    np.testing.assert_allclose(probs, expected.mean(axis=1), rtol=0, atol=1e-6)
    assert "logits" not in t.column("pred_committee").type.names


class ToyDetector(nn.Module):
    """Predicts up to 4 boxes per image: (x1, y1, w, h, objectness, 3 class logits)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(5)
        self.backbone = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU())
        self.head = nn.Linear(4, 4 * 8)

    def forward(self, x):
        f = self.backbone(x)
        return self.head(f.mean(dim=(2, 3))).view(-1, 4, 8)


def toy_adapter(out):
    """Raw head output -> per-image detections with confidence >= 0.5."""
    dets = []
    for o in out:
        xy = torch.sigmoid(o[:, :2]) * 6
        wh = torch.sigmoid(o[:, 2:4]) * 2
        score = torch.sigmoid(o[:, 4])
        keep = score >= 0.5
        dets.append({"boxes": torch.cat([xy, xy + wh], dim=1)[keep], "scores": score[keep],
                     "probs": torch.softmax(o[:, 5:], dim=-1)[keep]})
    return dets


def test_detection_adapter_into_a_store_collection(tmp_path, digits):
    x = digits[0][:64].view(-1, 1, 8, 8)
    det = ToyDetector().eval()
    col = Store(str(tmp_path / "data")).create_collection("images")
    res = run(det, DataLoader(TensorDataset(x), batch_size=16), sink=col, model_name="det",
              classes=["cat", "dog", "bird"], detection=toy_adapter, embeddings={"conv": "backbone.0"},
              id_prefix="img", progress=False)
    assert res.rows == 64 and res.writes == 1
    assert col.model("det").task == "detection"
    stored = col.take([f"img{i}" for i in range(64)], ["id", "pred_det", "emb_conv"])
    with torch.no_grad():
        expected = toy_adapter(det(x))
        conv = det.backbone[0](x).mean(dim=(2, 3))  # pooled over H, W: channels first
    boxes = stored.column("pred_det").to_pylist()
    assert sum(len(b["boxes"]) for b in boxes) == sum(len(d["scores"]) for d in expected) > 0
    for got, want in zip(boxes, expected, strict=True):
        assert len(got["boxes"]) == len(want["scores"])
        for box, xy, s, p in zip(got["boxes"], want["boxes"], want["scores"], want["probs"], strict=True):
            np.testing.assert_allclose([box["x1"], box["y1"], box["x2"], box["y2"]], xy.numpy(), rtol=1e-6)
            assert box["score"] == pytest.approx(float(s), rel=1e-6)
            np.testing.assert_allclose(box["probs"], p.numpy(), rtol=1e-6)
    vec = np.asarray(stored.column("emb_conv").to_pylist())
    np.testing.assert_allclose(vec, (conv / conv.norm(dim=1, keepdim=True)).numpy(), rtol=1e-5, atol=1e-6)
    # the detection miner reads what the runner wrote
    from miners.runner import MiningRequest, run_mining, validate_request
    from miners.runs import RunRecord

    _, params = validate_request(col, MiningRequest(collection="images", miner="detection", size=5, model="det"))
    out = run_mining(col, RunRecord(run_id="r", collection="images", miner="detection", size=5, seed=0,
                                    version=col.version, model="det", params=params))
    assert len(out.ids) == 5


def test_writes_into_a_store_collection_then_batchbald(tmp_path, model, digits):
    x, y = digits
    col = Store(str(tmp_path / "data")).create_collection("digits", models={"mlp": CLASSES})
    ds = Digits(x[:600], y[:600])
    res = run(model, DataLoader(ds, batch_size=64), sink=col, model_name="mlp", embeddings={"penult": "4"},
              mc_samples=8, flush_rows=200, progress=False, extra=lambda b: {"label": [str(int(v)) for v in b["label"]]})
    assert (res.rows, res.batches, res.writes) == (600, 10, 3)
    assert col.count() == 600 and col.count("label = '7'") == int((y[:600] == 7).sum())
    expected = _by_id(InferenceRunner(model_name="mlp", embeddings={"penult": "4"}, mc_samples=8, progress=False)
                      .run(model, DataLoader(ds, batch_size=64)).table)
    stored = _by_id(col.query(columns=["id", "pred_mlp", "emb_penult"]))
    np.testing.assert_array_equal(_column(stored, "pred_mlp.samples"), _column(expected, "pred_mlp.samples"))
    np.testing.assert_array_equal(_column(stored, "pred_mlp.probs"), _column(expected, "pred_mlp.probs"))
    emb = _column(expected, "emb_penult")
    np.testing.assert_allclose(_column(stored, "emb_penult"), emb / np.linalg.norm(emb, axis=1, keepdims=True),
                               rtol=1e-6, atol=1e-7)  # a cosine space: normalised on write
    # BatchBALD on the stored consistent samples picks distinct, informative items
    from miners.bayesian import batchbald_select

    picks, gains = batchbald_select(_column(stored, "pred_mlp.samples").astype(np.float64), 10)
    assert len(set(picks.tolist())) == 10 and gains[0] > 0


def test_through_the_server_and_client(tmp_path, model, digits):
    from service.client import Client
    from service.server import ServerConfig, start_server

    x, y = digits
    srv = start_server(ServerConfig(data=str(tmp_path / "srv"), port=0, grace_s=1))
    try:
        with Client(srv.address, timeout=60) as client:
            client.create_collection("digits", models={"mlp": CLASSES})
            sink = client.collection("digits")
            res = InferenceRunner(model_name="mlp", embeddings={"penult": "4"}, mc_samples=4, flush_rows=256,
                                  progress=True).run(model, DataLoader(Digits(x, y), batch_size=128), sink=sink)
            assert res.rows == len(x) and res.writes == 8
            assert sink.count() == len(x)
            got = _by_id(sink.query(columns=["id", "pred_mlp"]))
            want = _by_id(InferenceRunner(model_name="mlp", mc_samples=4, progress=False)
                          .run(model, DataLoader(Digits(x, y), batch_size=128)).table)
            np.testing.assert_array_equal(_column(got, "pred_mlp.samples"), _column(want, "pred_mlp.samples"))
            np.testing.assert_array_equal(_column(got, "pred_mlp.logits"), _column(want, "pred_mlp.logits"))
            top = sink.mine("bald", 20, model="mlp").wait(timeout=60).results()
            assert top.num_rows == 20
    finally:
        srv.stop(0)


def test_pooling_and_errors(model, digits):
    t = torch.arange(2 * 3 * 4 * 5, dtype=torch.float32).view(2, 3, 4, 5)
    assert pool_activation(t).shape == (2, 3)  # conv map: channels at dim 1
    assert torch.equal(pool_activation(t, "max")[:, 0], t[:, 0].amax(dim=(1, 2)))
    seq = torch.randn(2, 7, 16)
    assert torch.equal(pool_activation(seq, "first"), seq[:, 0])  # tokens: (N, T, D)
    assert pool_activation(seq, "flatten").shape == (2, 112)
    x = digits[0][:10]
    with pytest.raises(ValueError, match="no layer named 'nope'"):
        run(model, [x], embeddings={"e": "nope"}, progress=False)
    with pytest.raises(ValueError, match="needs dropout layers"):
        run(nn.Linear(64, 10), [x], mc_samples=3, progress=False)
    with pytest.raises(ValueError, match="mc_samples must be"):
        InferenceRunner(mc_samples=-1)
    with pytest.raises(TypeError, match="upsert"):
        run(model, [x], sink=object(), progress=False)
    with pytest.raises(ValueError, match="ids has 5 entries"):
        run(model, [x], ids=[str(i) for i in range(5)], progress=False)
