"""Proof on your own data: a selected set against a random control group of the same size.

The loop a team runs: select a batch with assay (a mining run, or a tag), draw a random
control group of the same size from the same pool with a **fresh seed** (recorded), label
both, train the same model on each (or add each to the same base set), evaluate both on
the same held-out data, and repeat over several seeds. This module holds the pure parts:

* :func:`random_rows` / :func:`random_control` — the control group (rows of a pool, or ids
  through the client's ``random`` miner), with the seed drawn from ``secrets`` when none is
  given and returned, so the comparison can be reproduced; :func:`control_group` — the
  control group of a mining run's picks or a tag's rows (same size, same pool, the
  selected rows left out, a fresh seed drawn by the server and recorded in its run).
* :func:`efficiency_report` — given the metric of the selected set and of its control for
  each seed (accuracy, F1, mAP: higher is better; or a loss: lower is better), the per-seed
  improvement ``delta_s = m_sel - m_rand`` (``m_rand - m_sel`` for a loss), the **efficiency
  score** ``E_s = delta_s / |m_rand|`` (the relative gain over random at equal labeling
  cost, Superb AI's way of reporting curation against random sampling), their medians, wins
  / ties / losses, and paired tests over seeds: the Wilcoxon signed-rank test (exact for
  up to 50 non-zero differences, zero differences dropped) and the paired t-test (SciPy).
  With fewer than 2 seeds no test is reported. Benchmark studies warn that with 3 seeds a
  method can look both better and worse than random: the report carries the number of seeds
  and says "not significant" unless the test says otherwise.
* :func:`labels_saved` — from random's learning curve, how many labels random needs to reach
  the selected set's metric (linear interpolation between measured points): the labels
  saved at equal accuracy.
"""

from __future__ import annotations

import math
import secrets
from collections.abc import Sequence
from typing import Any

import numpy as np

__all__ = ["control_group", "efficiency_report", "fresh_seed", "labels_saved", "paired_test", "random_control",
           "random_rows"]


def fresh_seed() -> int:
    """A new seed (53 random bits from ``secrets``, as the server draws them: a JSON-safe
    integer that fits a signed 64-bit column)."""
    return secrets.randbits(53)


def random_rows(n: int, size: int, *, seed: int | None = None,
                exclude: Sequence[int] | np.ndarray | None = None) -> tuple[np.ndarray, int]:
    """``size`` distinct rows of ``range(n)`` not in ``exclude`` (e.g. the selected set),
    uniformly at random; returns ``(rows sorted, seed)`` — a fresh seed when none is given."""
    seed = fresh_seed() if seed is None else int(seed)
    allowed = np.ones(n, dtype=bool)
    if exclude is not None:
        allowed[np.asarray(exclude, dtype=np.int64)] = False
    cand = np.flatnonzero(allowed)
    if size > len(cand):
        raise ValueError(f"the control group needs {size} rows; only {len(cand)} are left")
    rows = np.random.default_rng(seed).choice(cand, size, replace=False)
    return np.sort(rows), seed


def random_control(collection: Any, size: int, *, where: str | None = None, seed: int | None = None,
                   timeout: float = 600) -> tuple[list[str], int]:
    """A random control group through the service: the ``random`` miner on the pool
    ``where`` with a fresh seed (returned). ``collection``: a client collection."""
    seed = fresh_seed() if seed is None else int(seed)
    job = collection.mine("random", size, where=where, seed=seed)
    job.wait(timeout=timeout)
    return job.results(columns=["id"]).column("id").to_pylist(), seed


def control_group(collection: Any, *, run_id: str | None = None, tag: str | None = None,
                  where: str | None = None, seed: int | None = None, timeout: float = 600) -> dict[str, Any]:
    """A random control group for a selection: the picks of mining run ``run_id``, or the
    rows tagged ``tag``. Same size, drawn from the same pool — the run's pool filter (for a
    tag: ``where``, default every row) — leaving the selected rows out, by the server's
    ``random`` miner with a fresh seed unless one is given. The seed is recorded in the
    control run (its ``run_id`` is returned) so the group can be drawn again.

    Returns ``{"selected": ids, "control": ids, "seed": s, "control_run_id": id,
    "pool": the filter used}``. Label both groups, train (or fine-tune) the same model on
    each, evaluate on the same held-out data, and pass the two metrics per seed to
    :func:`efficiency_report`."""
    from indexing.filters import ids_predicate, sql_quote

    if (run_id is None) == (tag is None):
        raise ValueError("give run_id (a mining run's picks) or tag (a tag's rows), not both")
    if run_id is not None:
        job = collection.client.mining_job(run_id)
        run = job.run()
        selected = job.results(columns=["id"]).column("id").to_pylist()
        pool = where if where is not None else (run.get("where") or None)
    else:
        tagged = f"array_has_any(tags, [{sql_quote(tag)}])"
        selected = [i for page in collection.scan(tagged, columns=["id"]) for i in page.column("id").to_pylist()]
        pool = where
    if not selected:
        raise ValueError(f"nothing selected: {'run ' + run_id if run_id else 'tag ' + repr(tag)} has no rows")
    rest = f"NOT ({ids_predicate(selected)})"
    control_where = f"({pool}) AND {rest}" if pool else rest
    job = collection.mine("random", len(selected), where=control_where, seed=seed)
    job.wait(timeout=timeout)
    control = job.results(columns=["id"]).column("id").to_pylist()
    if len(control) < len(selected):
        raise ValueError(f"the pool {pool!r} holds only {len(control)} rows besides the {len(selected)} selected")
    return {"selected": selected, "control": control, "seed": int(job.run()["seed"]), "control_run_id": job.run_id,
            "pool": pool}


def paired_test(a: Sequence[float], b: Sequence[float]) -> dict[str, Any]:
    """Paired comparison of ``a`` against ``b`` (one value each per seed): differences
    ``a - b``, wins / ties / losses, Wilcoxon signed-rank and paired t-test p-values
    (two-sided; None below 2 seeds or when every difference is 0)."""
    x, y = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if x.shape != y.shape or x.ndim != 1:
        raise ValueError(f"paired values need the same length; got {x.shape} and {y.shape}")
    ok = np.isfinite(x) & np.isfinite(y)
    d = x[ok] - y[ok]
    out: dict[str, Any] = {"n": int(ok.sum()), "wins": int((d > 0).sum()), "ties": int((d == 0).sum()),
                           "losses": int((d < 0).sum()),
                           "mean_diff": float(d.mean()) if len(d) else math.nan,
                           "median_diff": float(np.median(d)) if len(d) else math.nan,
                           "p_wilcoxon": None, "p_ttest": None}
    if len(d) >= 2 and (d != 0).any():
        from scipy.stats import ttest_rel, wilcoxon

        out["p_wilcoxon"] = float(wilcoxon(x[ok], y[ok], zero_method="wilcox").pvalue)
        if np.std(d) > 0:
            out["p_ttest"] = float(ttest_rel(x[ok], y[ok]).pvalue)
    return out


def efficiency_report(selected: Sequence[float], control: Sequence[float], *, metric: str = "accuracy",
                      higher_is_better: bool | None = None, alpha: float = 0.05,
                      seeds: Sequence[int] | None = None) -> dict[str, Any]:
    """The selected set against its random control over seeds (module docstring).

    Args:
        selected: the metric of the model trained with the selected set, one per seed.
        control: the same for the random control group of the same size, same seeds.
        metric: its name; "loss" (or any name containing "loss"/"error") is lower-is-better
            unless ``higher_is_better`` says otherwise.
        alpha: significance level of the verdict.
        seeds: the control groups' seeds (reported).
    """
    s, c = np.asarray(selected, dtype=np.float64), np.asarray(control, dtype=np.float64)
    if s.shape != c.shape or s.ndim != 1 or len(s) == 0:
        raise ValueError(f"selected and control need one value per seed, same length; got {s.shape}, {c.shape}")
    if higher_is_better is None:
        higher_is_better = not any(w in metric.lower() for w in ("loss", "error"))
    gain = (s - c) if higher_is_better else (c - s)
    with np.errstate(divide="ignore", invalid="ignore"):
        eff = np.where(c != 0, gain / np.abs(c), np.nan)
    test = paired_test(s, c) if higher_is_better else paired_test(c, s)
    p = test["p_wilcoxon"]
    if p is None:
        verdict = "not tested (fewer than 2 seeds or no difference)"
    elif p < alpha:
        verdict = "better than random" if np.median(gain) > 0 else "worse than random"
    else:
        verdict = "no significant difference from random"
    return {
        "metric": metric, "higher_is_better": bool(higher_is_better), "seeds": len(s),
        "control_seeds": list(seeds) if seeds is not None else None,
        "selected_median": float(np.median(s)), "control_median": float(np.median(c)),
        "improvement": gain.tolist(), "improvement_median": float(np.median(gain)),
        "efficiency": eff.tolist(), "efficiency_median": float(np.nanmedian(eff)) if np.isfinite(eff).any() else None,
        "wins": test["wins"], "ties": test["ties"], "losses": test["losses"],
        "p_wilcoxon": p, "p_ttest": test["p_ttest"], "alpha": alpha, "verdict": verdict,
    }


def labels_saved(selected_labels: int, selected_metric: float, random_labels: Sequence[int],
                 random_metric: Sequence[float], *, higher_is_better: bool = True) -> float | None:
    """Labels random needs to reach ``selected_metric`` minus ``selected_labels`` (positive:
    the selection saved labels), from random's learning curve (label counts ascending, with
    their metric), interpolating linearly between the first point that reaches it and the one
    before. None when random never reaches it within its curve."""
    n = np.asarray(random_labels, dtype=np.float64)
    m = np.asarray(random_metric, dtype=np.float64)
    if n.shape != m.shape or n.ndim != 1 or len(n) == 0 or (np.diff(n) <= 0).any():
        raise ValueError("random_labels must ascend strictly, one metric value each")
    if not higher_is_better:
        m, selected_metric = -m, -selected_metric
    hit = np.flatnonzero(m >= selected_metric - 1e-12)
    if not len(hit):
        return None
    i = int(hit[0])
    if i == 0:
        need = n[0]
    else:
        f = (selected_metric - m[i - 1]) / (m[i] - m[i - 1])
        need = n[i - 1] + f * (n[i] - n[i - 1])
    return float(need - selected_labels)


def main(argv: list[str] | None = None) -> int:
    """``python -m bench.efficiency control --server H:P --collection C (--run ID | --tag T)``
    prints the control group (JSON); ``python -m bench.efficiency report --selected 0.91,0.93,...
    --control 0.88,0.90,... [--metric accuracy]`` prints the efficiency report (JSON)."""
    import argparse
    import json

    p = argparse.ArgumentParser(prog="python -m bench.efficiency", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("control", help="draw the random control group of a run or a tag")
    c.add_argument("--server", required=True)
    c.add_argument("--token")
    c.add_argument("--collection", required=True)
    c.add_argument("--run")
    c.add_argument("--tag")
    c.add_argument("--where")
    c.add_argument("--seed", type=int)
    r = sub.add_parser("report", help="the selected set against its control, one metric per seed each")
    r.add_argument("--selected", required=True, help="comma-separated metric values, one per seed")
    r.add_argument("--control", required=True, help="the same for the control groups, same seeds")
    r.add_argument("--metric", default="accuracy", help="its name; *loss*/*error* are lower-is-better")
    r.add_argument("--seeds", default=None, help="the control groups' seeds (recorded in the report)")
    args = p.parse_args(argv)
    if args.cmd == "control":
        from service.client import Client

        with Client(args.server, token=args.token) as client:
            out = control_group(client.collection(args.collection), run_id=args.run, tag=args.tag,
                                where=args.where, seed=args.seed)
    else:
        def floats(text: str) -> list[float]:
            return [float(v) for v in text.split(",") if v.strip()]

        seeds = [int(v) for v in args.seeds.split(",")] if args.seeds else None
        out = efficiency_report(floats(args.selected), floats(args.control), metric=args.metric, seeds=seeds)
    print(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
