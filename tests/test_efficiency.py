"""The efficiency report (a selected set against a random control over seeds): the paired
tests against SciPy called directly, the score against its definition, the control group's
fresh seed, and labels saved at equal accuracy."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.stats import ttest_rel, wilcoxon

from bench.efficiency import efficiency_report, labels_saved, paired_test, random_rows


def test_efficiency_report_against_definitions():
    sel = [0.91, 0.93, 0.90, 0.94, 0.92, 0.95, 0.91, 0.93, 0.92, 0.94]
    ctl = [0.88, 0.90, 0.91, 0.89, 0.90, 0.91, 0.87, 0.90, 0.89, 0.90]
    r = efficiency_report(sel, ctl)
    d = np.array(sel) - np.array(ctl)
    assert r["seeds"] == 10 and r["higher_is_better"]
    assert r["improvement"] == pytest.approx(d.tolist())
    assert r["efficiency_median"] == pytest.approx(float(np.median(d / np.array(ctl))))
    assert r["p_wilcoxon"] == pytest.approx(wilcoxon(sel, ctl).pvalue)
    assert r["p_ttest"] == pytest.approx(ttest_rel(sel, ctl).pvalue)
    assert (r["wins"], r["ties"], r["losses"]) == (9, 0, 1)
    assert r["verdict"] == "better than random"
    # a loss: lower is better, so the same numbers read as worse than random
    lr = efficiency_report(sel, ctl, metric="val_loss")
    assert not lr["higher_is_better"] and lr["verdict"] == "worse than random"
    assert lr["improvement_median"] == pytest.approx(-float(np.median(d)))
    # three seeds and mixed results: no significant difference
    assert efficiency_report([0.9, 0.8, 0.85], [0.85, 0.86, 0.84])["verdict"].startswith("no significant")
    assert efficiency_report([0.9], [0.8])["p_wilcoxon"] is None


def test_paired_test_ignores_missing_values_and_counts_ties():
    t = paired_test([1.0, 2.0, np.nan, 3.0, 4.0], [1.0, 1.0, 0.0, 2.0, 5.0])
    assert (t["n"], t["wins"], t["ties"], t["losses"]) == (4, 2, 1, 1)
    assert t["p_wilcoxon"] == pytest.approx(wilcoxon([1.0, 2.0, 3.0, 4.0], [1.0, 1.0, 2.0, 5.0]).pvalue)
    with pytest.raises(ValueError, match="same length"):
        paired_test([1.0], [1.0, 2.0])


def test_random_rows_fresh_seed_recorded_and_reproducible():
    a, seed_a = random_rows(1000, 50, exclude=np.arange(10))
    b, seed_b = random_rows(1000, 50, exclude=np.arange(10))
    assert seed_a != seed_b and a.tolist() != b.tolist()
    assert a.min() >= 10 and len(set(a.tolist())) == 50
    again, s = random_rows(1000, 50, seed=seed_a, exclude=np.arange(10))
    assert s == seed_a and again.tolist() == a.tolist()
    with pytest.raises(ValueError, match="only 5 are left"):
        random_rows(10, 6, exclude=np.arange(5))


def test_labels_saved_interpolates_randoms_curve():
    # random reaches 0.9 halfway between 100 (0.88) and 120 (0.92): 110 labels
    assert labels_saved(80, 0.90, [60, 80, 100, 120], [0.80, 0.85, 0.88, 0.92]) == pytest.approx(30.0)
    assert labels_saved(80, 0.95, [60, 80, 100], [0.8, 0.85, 0.9]) is None
    assert labels_saved(50, 0.30, [40, 60], [0.5, 0.2], higher_is_better=False) == pytest.approx(
        40 + (0.5 - 0.3) / 0.3 * 20 - 50)


def test_control_group_of_a_run_and_of_a_tag_through_the_server(tmp_path, capsys):
    """Same size, same pool, the selected rows left out, a fresh seed each time that the
    control run records and that draws the same group again."""
    import json

    import pyarrow as pa

    from bench.efficiency import control_group, main
    from service.client import Client
    from service.server import ServerConfig, start_server

    srv = start_server(ServerConfig(data=str(tmp_path), port=0, grace_s=1))
    try:
        with Client(srv.address, timeout=60) as client:
            rng = np.random.default_rng(0)
            p = rng.dirichlet(np.ones(3), 200).astype(np.float32)
            col = client.create_collection("c", models={"m": ["a", "b", "c"]})
            col.upsert(pa.table({"id": [f"r{i:03d}" for i in range(200)],
                                 "label": [None if i >= 40 else "a" for i in range(200)],
                                 "pred_m": pa.StructArray.from_arrays([pa.array(p.tolist(), pa.list_(pa.float32()))],
                                                                      ["probs"])}))
            job = col.mine("margin", 15, model="m", where="label IS NULL")
            job.wait(timeout=60)
            a = control_group(col, run_id=job.run_id)
            b = control_group(col, run_id=job.run_id)
            assert len(a["control"]) == len(a["selected"]) == 15 and a["pool"] == "label IS NULL"
            assert not set(a["control"]) & set(a["selected"])
            assert all(int(i[1:]) >= 40 for i in a["control"])  # the run's pool: unlabeled rows
            assert a["seed"] != b["seed"] and a["control"] != b["control"]
            assert control_group(col, run_id=job.run_id, seed=a["seed"])["control"] == a["control"]
            job.tag("picked")
            t = control_group(col, tag="picked", where="label IS NULL")
            assert sorted(t["selected"]) == sorted(a["selected"]) and len(t["control"]) == 15
            assert not set(t["control"]) & set(t["selected"])
            with pytest.raises(ValueError, match="not both"):
                control_group(col, run_id=job.run_id, tag="picked")
            assert main(["control", "--server", srv.address, "--collection", "c", "--run", job.run_id]) == 0
            assert len(json.loads(capsys.readouterr().out)["control"]) == 15
    finally:
        srv.stop(1)
    assert main(["report", "--selected", "0.9,0.92,0.91", "--control", "0.85,0.86,0.84"]) == 0
    rep = json.loads(capsys.readouterr().out)
    assert rep["seeds"] == 3 and rep["wins"] == 3 and rep["p_wilcoxon"] == pytest.approx(0.25)
