"""Shared fixtures: real LanceDB stores in temporary folders."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from indexing.store import Store  # noqa: E402


@pytest.fixture
def store(tmp_path) -> Store:
    return Store(str(tmp_path / "data"))


def lance_operations(table, n: int) -> list[str]:
    """The Lance operations (``Append``, ``Update``, ...) of a LanceDB table's last ``n``
    commits, oldest first."""
    table.checkout_latest()
    return [type(t.operation).__name__ for t in reversed(table.to_lance().get_transactions(n))]


def clustered(n: int, dim: int, *, clusters: int = 50, seed: int = 0, spread: float = 0.3) -> np.ndarray:
    """Vectors drawn around random centres: the shape real embeddings have."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((clusters, dim))
    return (centres[rng.integers(0, clusters, n)] + spread * rng.standard_normal((n, dim))).astype(np.float32)


TINY_CLIP_CFG = {
    "embed_dim": 64,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "patch_size": 8},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(model name, absolute checkpoint path) of a tiny CLIP built here and registered with
    open_clip for the module: loaded back through the real ``pretrained=<file>`` path."""
    import uuid

    import open_clip
    import torch

    name = f"assay-tiny-clip-{uuid.uuid4().hex[:8]}"
    open_clip.factory._MODEL_CONFIGS[name] = TINY_CLIP_CFG
    try:
        torch.manual_seed(0)
        model = open_clip.create_model(name, pretrained=None)
        ckpt = tmp_path_factory.mktemp("clip") / "tiny.pt"
        torch.save(model.state_dict(), ckpt)
        yield name, str(ckpt.resolve())
    finally:
        open_clip.factory._MODEL_CONFIGS.pop(name, None)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def moto_s3():
    """Endpoint URL of a moto S3 server started on loopback for the module; it accepts any
    credentials (tests use 'test'/'test', region us-east-1) and starts with no buckets."""
    port = _free_port()
    exe = shutil.which("moto_server") or os.path.join(os.path.dirname(sys.executable), "moto_server")
    proc = subprocess.Popen([exe, "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 30
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
                break
            except OSError:
                if time.time() > deadline or proc.poll() is not None:
                    pytest.fail("moto_server did not start")
                time.sleep(0.2)
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def pytest_collection_modifyitems(config, items) -> None:
    """The Label Studio round trip runs last: under ASSAY_REQUIRE_LABEL_STUDIO=1 `make test`
    installs Label Studio in the background meanwhile (see the Makefile)."""
    items.sort(key=lambda item: item.nodeid.startswith("tests/test_label_studio.py"))
