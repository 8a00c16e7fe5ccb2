"""bench/scale.py: its data generator, helpers, and one small end-to-end run (a real
``assay serve`` process, ingest in two sessions, a few miners through the client)."""

from __future__ import annotations

import json

import numpy as np
import pyarrow.compute as pc
import pytest

from bench.scale import (
    GEN_BLOCK,
    GenConfig,
    Generator,
    Step,
    exact_neighbours,
    faiss_nlist,
    graph_info,
    main,
    plan_miner,
    shared_graph_steps,
)

CFG = GenConfig(n=25_000, dim=8, classes=3, labeled=0.05, clusters=20, spread=0.3, seed=7,
                extras=("samples", "loss", "logits", "epoch_logits"))


def test_rows_regenerate_alone_across_blocks():
    """A resumed ingest sends rows [a, b) alone: they must be the rows a full pass makes."""
    gen = Generator(CFG)
    whole = gen.table(0, 3 * GEN_BLOCK // 2 + 10)
    part = Generator(CFG).table(GEN_BLOCK - 5, GEN_BLOCK + 7)  # straddles two blocks
    assert part.equals(whole.slice(GEN_BLOCK - 5, 12))
    assert part.column("id").to_pylist()[0] == f"r{GEN_BLOCK - 5:010d}"
    # unit vectors; probabilities that sum to one; labels only on the labeled share, as class names
    x = np.asarray(whole.column("emb_v").combine_chunks().values).reshape(-1, CFG.dim)
    np.testing.assert_allclose(np.linalg.norm(x, axis=1), 1.0, rtol=1e-5)
    probs = pc.struct_field(whole.column("pred_m"), "probs").combine_chunks()
    p = np.asarray(probs.values).reshape(-1, CFG.classes)
    np.testing.assert_allclose(p.sum(axis=1), 1.0, rtol=1e-5)
    labels = whole.column("label")
    share = 1 - labels.null_count / len(labels)
    assert 0.03 < share < 0.07
    assert set(pc.unique(labels.drop_null()).to_pylist()) <= {"c0", "c1", "c2"}
    split = whole.column("split").to_pylist()
    assert all((s == "train") == (lab is not None) for s, lab in zip(split, labels.to_pylist(), strict=True))
    samples = pc.struct_field(whole.column("pred_m"), "samples").to_pylist()[0]
    assert len(samples) == 8 and all(abs(sum(s) - 1) < 1e-5 for s in samples)
    # planted near-duplicates: some rows have a neighbour within the miner's default threshold
    sq = np.maximum(2.0 - 2.0 * (x[:2000] @ x[:2000].T), 0.0)  # squared distances of unit vectors
    np.fill_diagonal(sq, np.inf)
    assert (np.sqrt(sq.min(axis=1)) < 0.05).any()


def test_exact_neighbours_match_a_full_sort():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((700, 6)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    queries = np.array([0, 5, 299, 300, 699])
    got = exact_neighbours(x, queries, 7, chunk=128)  # several chunks, queries at their edges
    sims = x[queries] @ x.T
    sims[np.arange(len(queries)), queries] = -np.inf  # a row is not its own neighbour
    want = np.argsort(-sims, axis=1, kind="stable")[:, :7]
    np.testing.assert_array_equal(got, want)


def test_faiss_nlist_is_the_issues_ivf4096_at_a_million_rows():
    assert faiss_nlist(1_000_000) == 4096 and faiss_nlist(10_000_000) == 4096
    assert faiss_nlist(200_000) == 2048
    assert faiss_nlist(3000) <= 3000 // 4


def test_graph_info_reads_what_a_run_record_may_hold():
    assert graph_info({"timings": {"graph_s": 3.0}}) == {}
    g = graph_info({"graph": {"method": "faiss_ivf_flat", "k": 20, "recall": 0.991, "sample_size": 1000}})
    assert (g["method"], g["k"], g["recall"], g["sample"]) == ("faiss_ivf_flat", 20, 0.991, 1000)
    two = graph_info({"graph": json.dumps([{"method": "exact", "k": 20, "recall": 1.0},
                                           {"method": "ivf", "k": 10, "recall_at_k": 0.97}])})
    assert two["method"] == "exact + ivf" and two["k"] == 20 and two["recall"] == 0.97
    # as the server's run records hold them: keyed by role
    roles = graph_info({"graph": {"query": {"method": "faiss-ivf-flat nlist=255 nprobe=56", "k": 20,
                                            "recall": 0.96, "recall_sample": 500},
                                  "reference": {"method": "exact", "k": 20, "recall": 1.0, "recall_sample": 0}}})
    assert roles["method"] == "faiss-ivf-flat nlist=255 nprobe=56 + exact" and roles["recall"] == 0.96
    assert roles["k"] == 20 and roles["sample"] == 0
    # a miner with no graph input records an empty one and its own search in stats (coreset)
    own = graph_info({"graph": {}, "stats": {"graph": {"method": "faiss-ivf-flat nlist=1024 nprobe=2", "k": 1,
                                                       "recall": 0.992, "recall_sample": 500}}})
    assert (own["method"], own["k"], own["recall"]) == ("faiss-ivf-flat nlist=1024 nprobe=2", 1, 0.992)


def test_plan_follows_the_declared_inputs():
    base = GenConfig(n=1000, dim=8, classes=3, labeled=0.01, clusters=5, spread=0.3, seed=0)
    assert "--with samples" in plan_miner({"name": "bald", "inputs": ["samples"]}, base, 10, []).skip
    nov = plan_miner({"name": "novelty", "inputs": ["vectors", "query_graph"]}, base, 10, [])
    assert nov.kwargs["reference_where"] == "label IS NOT NULL" and nov.kwargs["where"] == "label IS NULL"
    assert "reference_where" not in plan_miner({"name": "lof", "inputs": ["pool_graph"]}, base, 10, []).kwargs
    new = plan_miner({"name": "some_new_miner", "inputs": ["vectors", "probs"]}, base, 10, [])
    assert not new.skip and new.kwargs["model"] == "m" and new.kwargs["space"] == "v"
    knn = plan_miner({"name": "knn", "inputs": ["seeds"]}, base, 10, ["r1", "r2"])
    assert knn.kwargs["params"] == {"seed_ids": ["r1", "r2"]}
    issues = plan_miner({"name": "label_issues", "inputs": ["probs", "labels"]}, base, 10, [])
    assert issues.kwargs["where"] == "label IS NOT NULL"
    leaks = plan_miner({"name": "duplicate_leaks", "inputs": ["vectors", "split_label", "pool_graph"]}, base, 10, [])
    assert "where" not in leaks.kwargs and leaks.graph
    sel = plan_miner({"name": "select", "inputs": ["stages", "vectors", "reference_vectors"],
                      "reference": "optional"}, base, 10, [])
    assert sel.kwargs["params"]["objectives"] == [{"miner": "margin", "weight": 1.0}]
    assert "reference_where" not in sel.kwargs


@pytest.mark.slow
def test_two_sessions_then_miners(tmp_path):
    """Session 1 ingests 2,000 of 3,000 rows and stops; session 2 resumes at row 2,000, lets
    the index policy run, and mines through a real server process."""
    data, first, second = tmp_path / "scale", tmp_path / "1.json", tmp_path / "2.json"
    common = ["--n", "3000", "--dim", "16", "--classes", "4", "--data", str(data), "--batch", "1000",
              "--bare-rows", "1000"]
    assert main([*common, "--max-ingest-rows", "2000", "--ingest-only", "--json", str(first)]) == 0
    doc = json.loads(first.read_text())
    assert doc["details"]["rows"] == 2000
    ingest = next(s for s in doc["steps"] if s["step"].startswith("ingest through"))
    assert ingest["rows"] == 2000 and ingest["rows_per_s"] > 0 and ingest["ratio"] > 0
    assert not any(s["data"].get("run") for s in doc["steps"])  # --ingest-only: no miner ran

    assert main([*common, "--miners", "margin,near_duplicates,knn,bald", "--size", "50", "--no-faiss",
                 "--json", str(second)]) == 0
    doc = json.loads(second.read_text())
    d = doc["details"]
    assert d["rows"] == 3000 and d["ingested_now"] == 1000
    assert d["pool_rows"] + d["labeled_rows"] == 3000 and 10 <= d["labeled_rows"] <= 60
    steps = {s["step"]: s for s in doc["steps"]}
    ingest = next(s for s in doc["steps"] if s["step"].startswith("ingest through"))
    assert ingest["rows"] == 1000 and "rows 2,000..2,999" in ingest["note"]
    assert steps["optimize + index build (after ingest)"]["state"] == "SUCCEEDED"
    for name in ("margin", "knn"):
        run = steps[name]["data"]["run"]
        assert steps[name]["state"] == "SUCCEEDED" and run["results"] == 50
        assert 0 < steps[name]["rss_peak"] < 8 * 2**30 and steps[name]["wall_s"] > 0
    assert steps["margin"]["rows"] == d["pool_rows"]  # the whole unlabeled pool was scanned
    dup = steps["near_duplicates"]
    assert dup["state"] == "SUCCEEDED" and dup["data"]["run"]["results"] >= 1  # the planted duplicates
    assert steps["bald"]["state"] == "skipped"
    assert "graph miners together" not in steps  # one graph miner: nothing to add up


def test_shared_graph_steps_are_the_miners_on_the_pools_graph():
    """Only the graph miners that ran on the pool's own graph add up against one FAISS graph
    (the 1M run summed duplicate_leaks' graph of every row and the labeled rows' own graph
    into it); failed and non-graph steps never count."""

    def step(name, rows, graph=True, state="SUCCEEDED"):
        return Step(name, state=state, wall_s=10.0, rows=rows, data={"graph_miner": graph})

    steps = [step("lof", 990), step("typicality", 990), step("near_duplicates", 990),
             step("duplicate_leaks", 1000), step("labeled_outliers", 10), step("margin", 990, graph=False),
             step("probcover", 990, state="FAILED")]
    names = [s.step for s in shared_graph_steps(steps, 990)]
    assert names == ["lof", "typicality", "near_duplicates"]
    assert [s.step for s in shared_graph_steps(steps, None)] == names  # the most common row count
    assert [s.step for s in shared_graph_steps(steps, 1000)] == ["duplicate_leaks"]
