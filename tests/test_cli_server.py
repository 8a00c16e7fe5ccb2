"""Every CLI command against a running server, as a user runs it: ``python -m service.cli``
in a subprocess, ``ASSAY_SERVER`` set, from an empty folder (no ``./data`` may appear), with
its output going to a pipe (plain lines, no bar). Also: ``--data`` works on a local root and
never creates one for a read, ``--where-param`` binds placeholders, a closed pipe ends a
command quietly, and the client's progress prints plain lines off a terminal."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from service.client import Client
from service.client.progress import Progress
from service.server import ServerConfig, start_server

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
CLASSES = ["a", "b", "c"]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    srv = start_server(ServerConfig(data=str(tmp_path_factory.mktemp("cli-data")), port=0, grace_s=2))
    with Client(srv.address, timeout=60) as c:
        col = c.create_collection("pool", spaces={"v": {"dim": 8, "metric": "l2"}}, models={"m": CLASSES})
        rng = np.random.default_rng(3)
        vecs = rng.standard_normal((300, 8)).astype(np.float32)
        logits = rng.standard_normal((300, 3)) * 2
        probs = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
        col.upsert([{"id": f"r{i:03d}", "emb_v": vecs[i].tolist(), "pred_m": {"probs": probs[i].tolist()},
                     "split": "train" if i < 100 else "pool", "label": CLASSES[i % 3] if i < 100 else None,
                     "text": f"row {i} " + "lorem ipsum " * 20}
                    for i in range(300)])
    srv.probs = probs
    yield srv
    srv.stop(1)


@pytest.fixture
def cwd(tmp_path):
    """An empty working folder; checked to stay free of ./data."""
    here = tmp_path / "cwd"
    here.mkdir()
    yield here
    assert not (here / "data").exists(), "a CLI command created ./data"


def assay(server, cwd: Path, *argv: str, ok: bool = True, stdin: str | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "ASSAY_SERVER": server.address, "PYTHONPATH": str(ROOT)}
    env.pop("ASSAY_DATA", None)
    out = subprocess.run([sys.executable, "-m", "service.cli", *argv], cwd=cwd, env=env, capture_output=True,
                         text=True, timeout=300, input=stdin)
    if ok:
        assert out.returncode == 0, f"assay {' '.join(argv)}: rc {out.returncode}\n{out.stderr[-3000:]}"
        assert "Traceback" not in out.stderr
        assert "\r" not in out.stderr and "%/s" not in out.stderr, "a progress bar went to a pipe"
    return out


def test_collections_describe_and_drop(server, cwd):
    out = assay(server, cwd, "collections")
    line = next(x for x in out.stdout.splitlines() if x.startswith("pool\t"))
    assert "300 rows" in line
    described = json.loads(assay(server, cwd, "describe", "pool").stdout)
    assert described["rows"] == 300 and described["models"][0]["classes"] == CLASSES
    with Client(server.address) as c:
        c.create_collection("gone")
    assert "dropped gone" in assay(server, cwd, "drop", "gone").stdout
    assert "gone" not in assay(server, cwd, "collections").stdout
    missing = assay(server, cwd, "describe", "nope", ok=False)
    assert missing.returncode == 2 and "NOT_FOUND" in missing.stderr and "Traceback" not in missing.stderr


def test_optimize_index_and_recall_run_as_server_jobs(server, cwd):
    out = assay(server, cwd, "optimize", "pool")
    assert "fragments_after" in json.loads(out.stdout)
    assert "optimize" in out.stderr  # plain progress lines, not a bar
    out = assay(server, cwd, "index", "pool", "--space", "v", "--kind", "ivf_flat", "--quiet")
    assert "built ivf_flat index on pool.emb_v" in out.stdout
    report = json.loads(assay(server, cwd, "recall", "pool", "--space", "v", "--queries", "10", "--quiet").stdout)
    assert report["space"] == "v" and 0.0 <= report["recall"] <= 1.0


def test_mine_binds_where_params_and_keeps_miner_params_apart(server, cwd):
    out = assay(server, cwd, "mine", "pool", "margin", "--size", "5", "--model", "m",
                "--where", "split = :s", "--where-param", "s=pool", "--quiet")
    ids = [line.split("\t")[0] for line in out.stdout.splitlines()]
    p = np.sort(server.probs, axis=1)[:, ::-1]
    margin = 1 - (p[:, 0] - p[:, 1])
    pool = np.arange(100, 300)
    want = pool[np.argsort(-margin[pool], kind="stable")[:5]]
    assert ids == [f"r{i:03d}" for i in want]
    # a miner parameter and a bound filter in one run: knn seeded by an id, restricted to the pool
    out = assay(server, cwd, "mine", "pool", "knn", "--size", "3", "--space", "v", "--where", "split = :s",
                "--where-param", "s=pool", "--param", 'seed_ids=["r150"]', "--columns", "split")
    rows = [line.split("\t") for line in out.stdout.splitlines()]
    assert len(rows) == 3 and all(r[-1] == "pool" for r in rows) and "r150" not in {r[0] for r in rows}
    # an unbound placeholder is refused before anything runs
    bad = assay(server, cwd, "mine", "pool", "margin", "--size", "5", "--model", "m", "--where", "split = :s",
                ok=False)
    assert bad.returncode == 2 and ":s" in bad.stderr


def test_miners_runs_query_stats_tag_and_export(server, cwd):
    assert "margin" in assay(server, cwd, "miners").stdout
    runs = assay(server, cwd, "runs", "pool").stdout
    assert "margin" in runs
    out = assay(server, cwd, "query", "pool", "--where", "split = :s AND label = :l", "--where-param", "s=train",
                "--where-param", "l=a", "--columns", "id,label")
    lines = out.stdout.splitlines()
    assert lines[0] == "id\tlabel" and len(lines) == 1 + 34 and all(x.endswith("\ta") for x in lines[1:])
    stats = json.loads(assay(server, cwd, "stats", "pool", "labels", "--json").stdout)
    assert {r["label"]: r["count"] for r in stats} == {"a": 34, "b": 33, "c": 33, None: 200}
    out = assay(server, cwd, "tag", "pool", "--add", "look", "--where", "id IN (:ids)",
                "--where-param", 'ids=["r001","r002"]')
    assert "2 row" in out.stdout
    out = assay(server, cwd, "export", "pool", "sel.csv", "--where", "array_has_any(tags, [:t])",
                "--where-param", "t=look", "--model", "m")
    assert "wrote 2 rows" in out.stdout
    assert (cwd / "sel.csv").read_text().count("\n") == 3


def test_dataset_commands(server, cwd):
    assert "created dataset" in assay(server, cwd, "dataset", "create", "ds", "--collection", "pool").stdout
    assert "3 added" in assay(server, cwd, "dataset", "add", "ds", "--ids", "r001,r002,r003").stdout
    assert "staged +3" in assay(server, cwd, "dataset", "status", "ds").stdout
    assert "v1" in assay(server, cwd, "dataset", "commit", "ds", "-m", "first").stdout
    assert "added" in assay(server, cwd, "dataset", "add", "ds", "--where", "id = :i", "--where-param", "i=r004").stdout
    assert "discarded 1" in assay(server, cwd, "dataset", "discard", "ds").stdout
    assert "tagged ds v1 as t1" in assay(server, cwd, "dataset", "tag", "ds", "1", "t1").stdout
    assert "ds\tpool\tv1\t3 members" in assay(server, cwd, "dataset", "list").stdout
    assert json.loads(assay(server, cwd, "dataset", "info", "ds").stdout)["head"] == 1
    assert "first" in assay(server, cwd, "dataset", "history", "ds").stdout
    out = assay(server, cwd, "dataset", "checkout", "ds", "--version", "t1", "--columns", "id").stdout
    assert out.split() == ["id", "r001", "r002", "r003"]
    assert "removed" in assay(server, cwd, "dataset", "remove", "ds", "--ids", "r001").stdout
    assert "- r001" in assay(server, cwd, "dataset", "diff", "ds", "1").stdout
    assert "deleted dataset ds" in assay(server, cwd, "dataset", "delete", "ds", "--force").stdout


def test_ingest_through_the_server_and_reindex_as_a_job(server, cwd):
    src = cwd / "docs.jsonl"
    texts = ["bread rises in a warm kitchen", "the telescope points at Jupyter's moons",
             "a python function returns a list", "knead the dough for ten minutes"]
    src.write_text("".join(json.dumps({"id": f"d{i}", "text": t, "n": i}) + "\n" for i, t in enumerate(texts)))
    out = assay(server, cwd, "ingest", "docs", str(src), "--text-space", "minilm", "--quiet")
    assert "4 ingested" in out.stdout
    with Client(server.address, timeout=300) as c:  # the server loads MiniLM for the query
        col = c.collection("docs")
        assert col.count("emb_minilm IS NOT NULL") == 4
        hits = col.search("minilm", text="how long should dough rest", k=2)
        assert set(hits.column("id").to_pylist()) == {"d0", "d3"}
    # reindex runs on the server (no --data): a new space filled by a server job
    out = assay(server, cwd, "reindex", "docs", "--space", "again", "--quiet")
    assert "4 rows embedded" in out.stdout
    with Client(server.address) as c:
        assert c.collection("docs").count("emb_again IS NOT NULL") == 4


def test_bad_rows_of_a_remote_ingest_are_reported_and_the_rest_written(server, cwd):
    with Client(server.address) as c:
        c.create_collection("mixed", spaces={"v": {"dim": 3, "metric": "l2"}})
    src = cwd / "mixed.jsonl"
    rows = [{"id": "m0", "emb_v": [1, 2, 3]}, {"id": "m1", "emb_v": [1, 2]}, {"id": "m2", "emb_v": [4, 5, 6]}]
    src.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = assay(server, cwd, "ingest", "mixed", str(src), "--quiet", ok=False)
    # the server names the row it refused (err.row); the job reports it and writes the others
    assert out.returncode == 3 and "Traceback" not in out.stderr, out.stderr
    bad = [json.loads(x) for x in (cwd / "mixed-ingest-errors.jsonl").read_text().splitlines()]
    assert [(b["id"], b["line"]) for b in bad] == [("m1", 2)] and "dimension" in bad[0]["reason"]
    with Client(server.address) as c:
        assert sorted(c.collection("mixed").query(columns=["id"]).column("id").to_pylist()) == ["m0", "m2"]


def test_local_commands_need_an_explicit_data_root_and_never_create_one(server, cwd, tmp_path):
    from indexing.store import Store

    root = tmp_path / "local"
    Store(str(root)).create_collection("here").upsert([{"id": "x", "text": "t"}])
    out = assay(server, cwd, "collections", "--data", str(root))
    assert out.stdout.startswith("here\t1 rows")
    assert json.loads(assay(server, cwd, "describe", "here", "--data", str(root)).stdout)["rows"] == 1
    missing = cwd / "nowhere"
    out = assay(server, cwd, "collections", "--data", str(missing), ok=False)
    assert out.returncode == 2 and "no data root" in out.stderr
    assert not missing.exists()
    # without --data the same command goes to the server, which has no 'here'
    assert "here" not in assay(server, cwd, "collections").stdout


def test_a_closed_pipe_ends_a_command_quietly(server, cwd):
    env = {**os.environ, "ASSAY_SERVER": server.address, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "-m", "service.cli", "query", "pool", "--columns", "id,text"],
                            cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    first = proc.stdout.readline()
    proc.stdout.close()  # what `| head -1` does: the reader goes away with 70 kB unread
    err = proc.stderr.read().decode()
    code = proc.wait(timeout=120)
    assert first.startswith(b"id\ttext")
    assert err == "" and code == 141


def test_bench_says_where_the_benchmarks_are(server, cwd):
    out = assay(server, cwd, "bench", "al", ok=False)
    assert out.returncode == 2 and "python -m bench.al" in out.stderr


def test_progress_prints_plain_lines_off_a_terminal():
    stream = io.StringIO()
    bar = Progress(True, total=100, desc="optimize 1234abcd", unit="%", stream=stream)
    for done in range(0, 101):
        bar.update(done, "compacting" if done < 50 else "indexing")
    bar.close()
    lines = stream.getvalue().splitlines()
    assert "\r" not in stream.getvalue() and "/s" not in stream.getvalue()
    assert lines[0] == "optimize 1234abcd: 0% compacting" and lines[-1] == "optimize 1234abcd: 100% indexing"
    assert 10 <= len(lines) <= 13  # a line per tenth and per status change, not one per update
