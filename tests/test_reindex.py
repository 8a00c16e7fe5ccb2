"""Bulk reindex on real tables: vectors equal direct encodes, the old space is served until
the switch, SIGKILL at any point then a rerun gives the uninterrupted result, rows written
meanwhile are caught, the Ray engine equals the local one, and errors are clear."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from indexing.embedders import ClipEmbedder, TextEmbedder
from indexing.errors import EmbedderLoadError, FailedPrecondition, InvalidArgument, NotFound
from indexing.reindex import reindex
from indexing.samples import TEXT_CORPUS
from indexing.store import Store

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _texts(n: int) -> list[str]:
    return [f"{TEXT_CORPUS[i % len(TEXT_CORPUS)][0]} (item {i})" for i in range(n)]


def _pool(store: Store, n: int = 300, name: str = "c"):
    """A collection whose space 'a' holds vectors of an unnamed older model (dim 8)."""
    col = store.create_collection(name)
    rng = np.random.default_rng(0)
    col.upsert({"id": [f"r{i:05d}" for i in range(n)], "text": _texts(n),
                "emb_a": rng.standard_normal((n, 8)).astype(np.float32)})
    return col


def _vectors(col, column: str, ids: list[str] | None = None) -> dict[str, np.ndarray]:
    table = col.query(None, ["id", column], limit=None) if ids is None else col.take(ids, ["id", column])
    return {i: np.asarray(v, dtype=np.float32) if v is not None else None
            for i, v in zip(table.column("id").to_pylist(), table.column(column).to_pylist(), strict=True)}


def test_minilm_reindex_equals_direct_encode_and_swaps_in_one_commit(store):
    col = _pool(store)
    before = col.version
    report = reindex(store, "c", "a", batch_rows=64, progress=False)
    assert report.mode == "stage" and report.swapped and report.embedded == 300 and not report.bad
    spec = col.space("a")
    assert spec.dim == 384 and spec.model == "sentence-transformers:all-MiniLM-L6-v2"
    assert "emb_a__next" not in col.schema.names and "emb_a__prev" not in col.schema.names
    got = _vectors(col, "emb_a")
    want = TextEmbedder().embed(_texts(300))
    assert np.allclose(np.stack([got[f"r{i:05d}"] for i in range(300)]), want, atol=1e-5)
    # The switch is one commit: the version just before it has the old space, complete.
    old = store.collection("c").at_version(report.version - 2)
    assert old.schema.field("emb_a").type.list_size == 8
    assert col.version > before
    # A second run finds nothing to do (fill mode, same model).
    again = reindex(store, "c", "a", progress=False)
    assert again.mode == "fill" and again.embedded == 0 and not again.swapped


def test_old_space_is_served_until_the_switch_and_a_stop_resumes(store):
    col = _pool(store)
    old = _vectors(col, "emb_a")
    calls = {"n": 0}

    def stop_after_two_batches() -> None:
        calls["n"] += 1
        if calls["n"] > 2:
            raise KeyboardInterrupt("stopped")

    with pytest.raises(KeyboardInterrupt):
        reindex(store, "c", "a", batch_rows=50, progress=False, check=stop_after_two_batches)
    # Mid-way: the space is the old one, whole and searchable; the staging column is hidden.
    assert col.space("a").dim == 8 and _vectors(col, "emb_a").keys() == old.keys()
    assert all(np.array_equal(v, old[k]) for k, v in _vectors(col, "emb_a").items())
    hits = col.search("a", old["r00007"], k=1, columns=["id"])
    assert hits.column("id").to_pylist() == ["r00007"]
    described = store.describe("c")
    assert "emb_a__next" not in described["fields"] and set(described["spaces"]) == {"a"}
    assert described["reindexing"]["a"]["model"] == "sentence-transformers:all-MiniLM-L6-v2"
    assert "emb_a__next" not in col.query(None, None, limit=1).column_names
    staged = col.count("emb_a__next IS NOT NULL")
    assert 0 < staged < 300
    # Resume: only the rest is embedded, and the result is complete.
    report = reindex(store, "c", "a", batch_rows=50, progress=False)
    assert report.resumed and report.embedded == 300 - staged and report.swapped
    assert col.count("emb_a IS NULL") == 0 and col.space("a").dim == 384


def test_rows_written_during_the_reindex_are_caught_up(store):
    col = _pool(store, 200)
    state = {"n": 0}

    def write_meanwhile() -> None:
        state["n"] += 1
        if state["n"] == 2:  # a new row, and an existing row whose text changes
            col.upsert({"id": ["late"], "text": ["a row that arrived during the reindex"]})
            col.upsert({"id": ["r00000"], "text": ["the first row, rewritten mid-way"]})

    report = reindex(store, "c", "a", batch_rows=40, progress=False, check=write_meanwhile)
    assert report.passes == 2 and col.count("emb_a IS NULL") == 0 and col.count() == 201
    got = _vectors(col, "emb_a", ["late", "r00000"])
    want = TextEmbedder().embed(["a row that arrived during the reindex", "the first row, rewritten mid-way"])
    assert np.allclose(np.stack([got["late"], got["r00000"]]), want, atol=1e-5)


def test_filter_and_fill_mode(store):
    col = _pool(store, 120)
    report = reindex(store, "c", "t", where="id < 'r00050'", progress=False)
    assert report.embedded == 50 and col.count("emb_t IS NOT NULL") == 50
    assert col.count("emb_t IS NOT NULL AND id >= 'r00050'") == 0
    # Same model again, no filter: fill mode embeds only the rows that lack a vector.
    report = reindex(store, "c", "t", progress=False)
    assert report.mode == "fill" and report.embedded == 70 and col.count("emb_t IS NULL") == 0


def test_resume_with_other_arguments_is_refused_and_restart_discards(store):
    col = _pool(store, 100)
    with pytest.raises(KeyboardInterrupt):
        reindex(store, "c", "a", batch_rows=20, progress=False,
                check=lambda: (_ for _ in ()).throw(KeyboardInterrupt()) if col.count("emb_a__next IS NOT NULL") else None)
    version = col.version
    with pytest.raises(FailedPrecondition, match="in progress.*same arguments"):
        reindex(store, "c", "a", where="id < 'r00010'", progress=False)
    assert col.version == version
    report = reindex(store, "c", "a", where="id < 'r00010'", restart=True, progress=False)
    assert not report.resumed and report.embedded == 10 and col.count("emb_a IS NOT NULL") == 10


def test_a_crash_between_swap_and_drop_is_finished_by_the_next_run(store):
    col = _pool(store, 60)
    reindex(store, "c", "a", progress=False)
    import pyarrow as pa

    col.add_fields([pa.field("emb_a__prev", pa.list_(pa.float32(), 8))])  # what the crash leaves
    report = reindex(store, "c", "a", progress=False)
    assert "emb_a__prev" not in col.schema.names and report.mode == "fill" and report.embedded == 0


def test_clip_images_with_a_bad_row_and_index_kept(store, tiny, tmp_path):
    from indexing.samples import render_digits

    name, ckpt = tiny
    paths = render_digits(tmp_path / "img")[:300]
    col = store.create_collection("img")
    uris = [str(p) for p in paths]
    uris[5] = str(tmp_path / "missing.png")
    col.upsert({"id": [f"d{i:04d}" for i in range(len(uris))], "uri": uris,
                "emb_px": np.random.default_rng(1).standard_normal((len(uris), 16)).astype(np.float32)})
    col.build_index("px", kind="ivf_flat")
    report = reindex(store, "img", "px", clip_model=name, clip_pretrained=ckpt, batch_rows=64, progress=False)
    assert report.source == "uri" and report.embedded == len(uris) - 1
    assert [b["id"] for b in report.bad] == ["d0005"] and "missing.png" in report.bad[0]["reason"]
    assert report.index == "ivf_flat" and col.vector_index("px") is not None
    assert col.space("px").dim == 64 and col.count("emb_px IS NULL") == 1
    got = _vectors(col, "emb_px", ["d0000", "d0001"])
    want = ClipEmbedder(name, ckpt).embed_images([uris[0], uris[1]])
    assert np.allclose(np.stack([got["d0000"], got["d0001"]]), want, atol=1e-5)


def test_errors_are_clear_and_write_nothing(store):
    col = _pool(store, 20)
    version = col.version
    with pytest.raises(EmbedderLoadError, match=r"/no/such/model.*offline"):
        reindex(store, "c", "a", model="/no/such/model", progress=False)
    with pytest.raises(NotFound):
        reindex(store, "nope", "a", progress=False)
    with pytest.raises(InvalidArgument, match="'__' is reserved"):
        reindex(store, "c", "a__next", progress=False)
    with pytest.raises(InvalidArgument, match="engine"):
        reindex(store, "c", "a", engine="spark", progress=False)
    with pytest.raises(InvalidArgument, match="filter"):
        reindex(store, "c", "a", where="id = 'x') OR (1 = 1", progress=False)
    with pytest.raises(InvalidArgument, match="open_clip"):
        reindex(store, "c", "a", source="uri", progress=False)
    assert col.version == version and "emb_a__next" not in col.schema.names


def _run_cli(data: str) -> subprocess.Popen:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(
        [sys.executable, "-m", "service.cli", "reindex", "c", "--space", "a", "--data", data,
         "--batch-rows", "40", "--quiet"],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )


def test_sigkill_at_any_point_then_resume_equals_an_uninterrupted_run(tmp_path, capsys):
    n = 300  # eight batches of 40; most of the time goes to each CLI run loading MiniLM (~10 s)
    data = str(tmp_path / "killed")
    _pool(Store(data), n)
    reference = str(tmp_path / "reference")
    shutil.copytree(data, reference)
    ref = reindex(Store(reference), "c", "a", batch_rows=40, progress=False)
    assert ref.embedded == n

    # Kill the CLI once mid-pass (at least three of eight batches staged), then let the CLI
    # finish it, in this process (a second process, or a second kill of the resumed run,
    # cost ~13 s of imports and model loading each; the server's reindex job is killed and
    # resumed in tests/test_crash.py).
    proc = _run_cli(data)
    deadline = time.monotonic() + 240
    watcher = Store(data)
    while True:
        assert proc.poll() is None, proc.communicate()
        col = watcher.collection("c")
        if "emb_a__next" in col.schema.names and col.count("emb_a__next IS NOT NULL") >= 120:
            break
        assert time.monotonic() < deadline, "the reindex made no progress"
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    col = Store(data).collection("c")
    assert col.space("a").dim == 8 and col.count() == n  # still the old space, whole
    assert col.count("emb_a__next IS NOT NULL") < n
    from service.cli import main

    assert main(["reindex", "c", "--space", "a", "--data", data, "--batch-rows", "40", "--quiet"]) == 0
    assert "resumed" in capsys.readouterr().out

    col, want = Store(data).collection("c"), Store(reference).collection("c")
    assert col.count() == n and col.space("a") == want.space("a")
    assert sorted(col.schema.names) == sorted(want.schema.names)
    got, expected = _vectors(col, "emb_a"), _vectors(want, "emb_a")
    assert got.keys() == expected.keys() and len(got) == n  # one row, one vector per id
    assert all(np.allclose(got[k], expected[k], atol=1e-5) for k in got)


@pytest.fixture
def local_ray():
    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    yield
    ray.shutdown()


def test_ray_engine_gives_the_same_vectors_as_the_local_engine(store, local_ray):
    col = _pool(store, 240)
    local = reindex(store, "c", "local", batch_rows=60, progress=False)
    on_ray = reindex(store, "c", "ray", batch_rows=60, engine="ray", ray_workers=1, progress=False)
    assert local.embedded == on_ray.embedded == 240 and on_ray.engine == "ray" and on_ray.swapped
    a, b = _vectors(col, "emb_local"), _vectors(col, "emb_ray")
    assert a.keys() == b.keys() and all(np.allclose(a[k], b[k], atol=1e-5) for k in a)
    assert json.loads(col.schema.field("emb_ray").metadata[b"assay.space"])["model"] == local.model


def test_reindex_as_a_server_job_through_the_client(tmp_path):
    from service.client import Client, FailedPreconditionError, InvalidArgumentError
    from service.server import ServerConfig, start_server

    server = start_server(ServerConfig(data=str(tmp_path / "svc"), port=0, grace_s=2))
    try:
        _pool(server.store, 150)
        with Client(server.address, timeout=60) as client:
            col = client.collection("c")
            version = col.describe()["version"]
            with pytest.raises(InvalidArgumentError, match="batch_rows"):
                col.reindex("a", batch_rows=0)
            with pytest.raises(InvalidArgumentError, match="unknown parameter"):
                col.reindex("a", modle="x")
            with pytest.raises(FailedPreconditionError, match="/no/such/model"):
                col.reindex("a", model="/no/such/model")
            assert col.describe()["version"] == version
            job = col.reindex("a", batch_rows=30).wait(timeout=240)
            result = job.result
            assert job.state == "SUCCEEDED" and job.progress == 1.0
            assert result["embedded"] == 150 and result["swapped"] and result["bad_count"] == 0
            assert "150 rows embedded" in result["summary"]
            described = col.describe()
            assert [s["spec"]["dim"] for s in described["spaces"] if s["spec"]["name"] == "a"] == [384]
            assert not described.get("reindexing")
            hits = col.search("a", texts=[_texts(150)[3]], k=1)
            assert hits.column("id").to_pylist() == ["r00003"]
        # The CLI submits the same job with --remote and watches it.
        from service.cli import main

        assert main(["reindex", "c", "--space", "b", "--where", "id < 'r00010'", "--remote",
                     "--server", server.address, "--quiet"]) == 0
        assert server.store.collection("c").count("emb_b IS NOT NULL") == 10
    finally:
        server.stop(1)
