"""Per-object embeddings from the PyTorch inference runner (issue 19, item 2): a named
layer's feature map RoI-pooled over each predicted box. A tiny detector built here (no
downloads); the stored embeddings are checked against a direct ``roi_align`` call on the
layer's output with the boxes scaled by hand, against the definition on a constant feature
map, and written into a real store collection (real LanceDB in tmp_path), then mined by object."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
from torch import nn  # noqa: E402
from torch.utils.data import DataLoader, TensorDataset  # noqa: E402
from torchvision.ops import roi_align  # noqa: E402

from indexing.inference import InferenceRunner, run  # noqa: E402
from indexing.store import Store  # noqa: E402

CLASSES = ["cat", "dog"]
H, W = 32, 16  # input images: not square, so the two axes scale differently


class TinyDetector(nn.Module):
    """A backbone to an (N, 3, 8, 8) feature map (scale 8/16 in x, 8/32 in y), and a head
    giving 3 boxes per image (fixed corners shifted by the image's mean, so images differ)."""

    def __init__(self, channels: int = 3):
        super().__init__()
        torch.manual_seed(3)
        self.backbone = nn.Sequential(nn.Conv2d(1, channels, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(8))
        self.register_buffer("corners", torch.tensor([[0.0, 0.0, 8.0, 16.0], [4.0, 10.0, 15.0, 31.0],
                                                      [2.5, 3.5, 6.0, 9.0]]))

    def forward(self, x):
        f = self.backbone(x)
        shift = x.mean(dim=(1, 2, 3)).clamp(0, 1).view(-1, 1, 1)
        return self.corners.unsqueeze(0) + shift, f.mean(dim=(2, 3))


def adapter(out):
    boxes, _ = out
    return [{"boxes": b, "scores": torch.linspace(0.9, 0.5, len(b)),
             "probs": torch.tensor([[0.7, 0.3]] * len(b))} for b in boxes]


def _images(n: int = 6) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    return torch.rand(n, 1, H, W, generator=g)


def _direct(model: TinyDetector, x: torch.Tensor, roi_size: int = 7, sampling_ratio: int = 2) -> list[np.ndarray]:
    """roi_align on the backbone's output, the boxes scaled to it by hand, mean over the grid."""
    with torch.no_grad():
        f = model.backbone(x)
        boxes, _ = model(x)
    scale = torch.tensor([8 / W, 8 / H, 8 / W, 8 / H])
    pooled = roi_align(f, [b * scale for b in boxes], output_size=roi_size, spatial_scale=1.0,
                       sampling_ratio=sampling_ratio, aligned=True).mean(dim=(2, 3))
    return list(pooled.numpy().reshape(len(x), 3, -1))


def test_box_embeddings_match_a_direct_roi_align_call(tmp_path):
    x = _images()
    model = TinyDetector().eval()
    col = Store(str(tmp_path / "data")).create_collection("imgs", models={
        "det": {"classes": CLASSES, "task": "detection", "box_embedding_dim": 3}})
    run(model, DataLoader(TensorDataset(x), batch_size=4), sink=col, model_name="det", detection=adapter,
        box_embeddings="backbone", id_prefix="im", progress=False)
    objs = col.objects(source="det", columns=["id", "box", "embedding"]).to_pylist()
    want = _direct(model, x)
    assert len(objs) == 3 * len(x)
    for o in objs:
        np.testing.assert_allclose(o["embedding"], want[int(o["id"][2:])][o["box"]], rtol=1e-5, atol=1e-6)
    # the boxes are mined by their embeddings
    from miners.runner import run_mining, validate_request
    from miners.runs import RunSpec

    req = RunSpec(collection="imgs", miner="coreset", size=4, space="objects:det")
    _, params = validate_request(col, req)
    out = run_mining(col, RunSpec(collection="imgs", miner="coreset", size=4, space="objects:det", seed=0,
                                  version=col.version, params=params))
    assert len(out.ids) == 4 and out.boxes is not None and all(0 <= b < 3 for b in out.boxes)


def test_a_constant_feature_map_gives_its_constants():
    """By definition: the mean of bilinear samples of a constant map is that constant, per channel."""
    model = TinyDetector()
    with torch.no_grad():
        model.backbone[0].weight.zero_()
        model.backbone[0].bias.copy_(torch.tensor([1.0, 2.0, 3.0]))
    table = InferenceRunner(model_name="det", detection=adapter, box_embeddings="backbone.2", box_embedding_dim=3,
                            progress=False).run(model.eval(), DataLoader(TensorDataset(_images(2)), batch_size=2)
                                                ).table
    embs = [b["embedding"] for boxes in table.column("pred_det").to_pylist() for b in boxes["boxes"]]
    np.testing.assert_allclose(embs, [[1.0, 2.0, 3.0]] * 6, rtol=1e-6)


def test_roi_size_and_sampling_ratio_reach_roi_align():
    x = _images(2)
    model = TinyDetector().eval()
    table = InferenceRunner(model_name="det", detection=adapter, box_embeddings="backbone", box_embedding_dim=3,
                            box_roi_size=3, box_sampling_ratio=1, progress=False
                            ).run(model, DataLoader(TensorDataset(x), batch_size=2)).table
    got = [[b["embedding"] for b in boxes["boxes"]] for boxes in table.column("pred_det").to_pylist()]
    np.testing.assert_allclose(np.asarray(got), np.stack(_direct(model, x, 3, 1)), rtol=1e-5, atol=1e-6)


def test_a_layer_of_another_width_is_refused_naming_both(tmp_path):
    col = Store(str(tmp_path / "data")).create_collection("imgs", models={
        "det": {"classes": CLASSES, "task": "detection", "box_embedding_dim": 5}})
    with pytest.raises(ValueError, match=r"'backbone' has 3 channels but model 'det' declares "
                                         r"box_embedding_dim=5.*box_embedding_dim=3"):
        run(TinyDetector(), DataLoader(TensorDataset(_images(2)), batch_size=2), sink=col, model_name="det",
            detection=adapter, box_embeddings="backbone", progress=False)
    assert col.count() == 0  # nothing written


def test_a_model_without_box_embedding_dim_is_refused(tmp_path):
    col = Store(str(tmp_path / "data")).create_collection("imgs", models={
        "det": {"classes": CLASSES, "task": "detection"}})
    with pytest.raises(ValueError, match="registered without box_embedding_dim"):
        run(TinyDetector(), DataLoader(TensorDataset(_images(2)), batch_size=2), sink=col, model_name="det",
            detection=adapter, box_embeddings="backbone", progress=False)
    with pytest.raises(ValueError, match="needs the model's declared box_embedding_dim"):
        InferenceRunner(model_name="det", detection=adapter, box_embeddings="backbone", progress=False).run(
            TinyDetector(), DataLoader(TensorDataset(_images(2)), batch_size=2))
    with pytest.raises(ValueError, match="needs detection="):
        InferenceRunner(box_embeddings="backbone")


def test_the_runner_registers_the_model_with_its_box_embedding_dim(tmp_path):
    col = Store(str(tmp_path / "data")).create_collection("imgs")
    run(TinyDetector(), DataLoader(TensorDataset(_images(2)), batch_size=2), sink=col, model_name="det",
        classes=CLASSES, detection=adapter, box_embeddings="backbone", box_embedding_dim=3, progress=False)
    assert col.model("det").box_embedding_dim == 3
    assert col.objects(source="det", columns=["embedding"]).column("embedding").null_count == 0
