"""Benchmark of the uncertainty miners: BatchBALD (``miners.bayesian.batchbald_select``).

What is measured
----------------
Greedy BatchBALD on one synthetic MC-dropout pool: ``--n`` items (default 10,000), ``--k``
consistent samples (20), ``--c`` classes (10), batch ``--b`` (10). Samples are softmaxes of
``base_n + sigma_n * noise_nk`` logits, with the spread ``sigma_n`` varying per item so that
BALD varies across the pool. Both sides run the same algorithm with the same settings:
exact joint over all ``C^t`` configurations while ``C^t <= --exact-max-configs`` (default
100,000, the function's default), then ``--num-configs`` (10,000) configurations sampled
afresh at each later pick from a generator seeded with ``--seed``, with the importance-
sampled estimate of batchbald_redux.

* **assay** -- ``batchbald_select(...)`` as the runner calls it (``prune=True``): candidates
  are scored in decreasing order of an upper bound on their gain (stale gains while the
  joint is exact, plus a pairwise-KL bound valid for the sampled estimate too) and scoring
  stops once no bound can beat the best gain, so the picks are those of the full greedy.
* **assay, no pruning** -- ``batchbald_select(..., prune=False)``: every candidate scored at
  every pick, blocks of candidates at once in cache-sized tiles (one ``(M, K) @ (K, b C)``
  product per tile).
* **reference** -- the published algorithm as batchbald_redux writes it: a Python loop over
  candidates, one ``(M, K) @ (K, C)`` product and one entropy per candidate, written out
  below (:func:`reference_batchbald`). It draws the sampled configurations with the same
  generator calls (``rng.random((t, K, S))``, inverse CDF), so in exact arithmetic both
  sides see the same configurations and must pick the same items.

``--scale``: the miner at its defaults on the shape of the scale benchmark (issue 17)
instead: ``--scale-pool`` rows (20,000) of ``K = 8`` samples over ``C = 10`` classes, the top
``--scale-candidates`` (1,000) by BALD kept as the runner keeps them, and a batch of
``--scale-b`` (1,000) picked from them with every default of ``batchbald_select`` (exact
joint up to 100,000 configurations, 10,000 sampled ones beyond; greedy until the gains
fall below ``1e-9`` of the first or after 100 picks, PowerBALD for the rest). It prints
the seconds, how many picks were greedy and why the greedy stopped, whether every gain is
finite and every pick distinct; the reference is the published greedy (the loop below) run
for the same number of greedy picks, which must pick the same items.
``--scale-published`` also times ``min_gain_ratio=0, greedy_max=b``: the published greedy
for the whole batch (minutes: the gains past ~20 picks are rounding noise).

How to read the table
---------------------
``ratio`` is the speed of assay relative to the reference (reference seconds / assay
seconds); above 1 means assay is faster. "same picks" compares the picked indices in pick
order; "max |gain diff|" is the largest difference of the per-pick marginal gains. Absolute
times depend on the (shared, noisy) machine; compare ratios. BLAS runs on one thread
(``OPENBLAS_NUM_THREADS=1`` unless set by the caller), for both sides.

Usage::

    uv run python bench/uncertainty.py [--n 10000] [--k 20] [--c 10] [--b 10]
        [--num-configs 10000] [--exact-max-configs 100000] [--seed 0] [--quick] [--json PATH]
    uv run python bench/uncertainty.py --scale [--scale-pool 20000] [--scale-candidates 1000]
        [--scale-b 1000] [--scale-published] [--seed 0] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

# One BLAS thread unless the caller says otherwise (must be set before NumPy loads): the
# reference's per-candidate (M, K) @ (K, C) products would otherwise use OpenBLAS's thread
# pool, which on a busy machine is several times slower than one thread and would inflate
# the ratio. assay keeps its GEMMs single-threaded by itself (row blocks).
for _var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import numpy as np  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from miners.bayesian import bald_scores, batchbald_select  # noqa: E402


def make_pool(n: int, k: int, c: int, seed: int) -> np.ndarray:
    """``(n, k, c)`` MC-dropout-like probabilities with per-item epistemic spread."""
    rng = np.random.default_rng(seed)
    base = rng.normal(size=(n, 1, c)) * rng.uniform(0.5, 3.0, size=(n, 1, 1))
    sigma = rng.uniform(0.1, 2.5, size=(n, 1, 1))
    logits = base + sigma * rng.normal(size=(n, k, c))
    logits -= logits.max(axis=2, keepdims=True)
    p = np.exp(logits)
    return p / p.sum(axis=2, keepdims=True)


# ------------------------------------------------------------------ reference (redux style)


def _entropy(p: np.ndarray) -> float:
    nz = p[p > 0]
    return float(-(nz * np.log(nz)).sum())


def _reference_sample(pp: np.ndarray, num_configs: int, rng: np.random.Generator) -> np.ndarray:
    """Sampled joint ``P[k', m]`` of the picked points, one point and one sample at a time."""
    t, k, c = pp.shape
    s = max(1, num_configs // k)
    u = rng.random((t, k, s))
    choices = np.empty((t, k, s), dtype=np.int64)
    for i in range(t):
        for kk in range(k):
            cdf = np.cumsum(pp[i, kk])
            cdf = cdf / cdf[-1]
            choices[i, kk] = np.minimum(np.searchsorted(cdf, u[i, kk], side="right"), c - 1)
    joint = np.ones((k, k * s))
    for i in range(t):
        joint *= pp[i][:, choices[i].reshape(-1)]
    return joint


def reference_batchbald(
    samples: np.ndarray, b: int, *, num_configs: int, seed: int, exact_max_configs: int
) -> tuple[np.ndarray, np.ndarray]:
    """Greedy BatchBALD as in batchbald_redux: a Python loop over candidates per pick.

    Joint ``P[k, m] = p(y_S = m | w_k)``: exact (outer product per pick) while ``C^t <=
    exact_max_configs``, then re-sampled from all picked points at every pick. Candidate
    score: exact ``H(y_S, y_n) = -sum_{m,c} pbar log pbar`` with
    ``pbar[m, c] = (1/K) sum_k P[k, m] p[n, k, c]``; sampled: the importance estimate
    ``(1/M) sum_m sum_c -pbar[m, c] log pbar[m, c] / q_m`` with ``q_m = (1/K) sum_k P[k, m]``.
    Score minus ``E_k H(p_nk)``; the marginal gain also subtracts ``H(y_S)`` (exact, or
    ``(1/M) sum_m -log q_m`` when sampled).
    """
    p = samples / samples.sum(axis=2, keepdims=True)
    n, k, c = p.shape
    cond = np.array([sum(_entropy(p[i, j]) for j in range(k)) / k for i in range(n)])
    rng = np.random.default_rng(seed)
    joint = np.ones((k, 1))
    exact = True
    picked: list[int] = []
    gains: list[float] = []
    for step in range(b):
        if step > 0:
            latest = picked[-1]
            if exact and joint.shape[1] * c <= exact_max_configs:
                joint = (joint[:, :, None] * p[latest][:, None, :]).reshape(k, -1)
            else:
                exact = False
                joint = _reference_sample(p[picked], num_configs, rng)
        m = joint.shape[1]
        q = joint.mean(axis=0)
        h_s = _entropy(q) if exact else float(np.mean(-np.log(q)))
        best, best_score = -1, -np.inf
        for cand in range(n):
            if cand in picked:
                continue
            pm = joint.T @ p[cand] / k  # (M, C)
            if exact:
                h = _entropy(pm)
            else:
                with np.errstate(divide="ignore", invalid="ignore"):
                    terms = np.where(pm > 0, -np.log(pm) * pm, 0.0) / q[:, None]
                h = float(terms.sum() / m)
            score = h - cond[cand]
            if score > best_score:
                best, best_score = cand, score
        picked.append(best)
        gains.append(best_score - h_s)
    return np.asarray(picked), np.asarray(gains)


# ------------------------------------------------------------------ harness


def machine() -> dict[str, Any]:
    cpu_model = ""
    try:
        with open("/proc/cpuinfo") as fh:
            cpu_model = next(
                (ln.split(":", 1)[1].strip() for ln in fh if ln.startswith("model name")), ""
            )
    except OSError:
        pass
    affinity = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None
    return {
        "cpu_count": os.cpu_count(),
        "cpus_usable": affinity,
        "cpu_model": cpu_model,
        "platform": platform.platform(),
        "python": sys.version.split()[0],
        "numpy": np.__version__,
        "blas_threads": os.environ.get("OPENBLAS_NUM_THREADS"),
    }


def _timed(fn, *args, **kwargs) -> tuple[float, Any]:
    t0 = time.perf_counter()
    out = fn(*args, **kwargs)
    return time.perf_counter() - t0, out


def bench_batchbald(args: argparse.Namespace) -> tuple[list[tuple[str, str, str, str]], dict]:
    pool = make_pool(args.n, args.k, args.c, args.seed)
    kw = {"num_configs": args.num_configs, "seed": args.seed,
          "exact_max_configs": args.exact_max_configs}
    t_exact = int(np.floor(np.log(args.exact_max_configs) / np.log(args.c) + 1e-9))
    n_exact = min(args.b, t_exact + 1)
    print(f"  picks 1..{n_exact} exact (C^t <= {args.exact_max_configs:,}), "
          f"{args.b - n_exact} sampled (M = {args.k * max(1, args.num_configs // args.k):,})",
          flush=True)
    t_prune, (i_prune, g_prune) = _timed(batchbald_select, pool, args.b, **kw)
    print(f"  assay:            {t_prune:.2f}s  picks {i_prune.tolist()}", flush=True)
    t_full, (i_full, g_full) = _timed(batchbald_select, pool, args.b, prune=False, **kw)
    print(f"  assay no pruning: {t_full:.2f}s  picks {i_full.tolist()}", flush=True)
    t_ref, (i_ref, g_ref) = _timed(reference_batchbald, pool, args.b, **kw)
    print(f"  reference:        {t_ref:.2f}s  picks {i_ref.tolist()}", flush=True)
    topk = np.argsort(-bald_scores(pool), kind="stable")[: args.b]

    def same(a: np.ndarray) -> str:
        return "yes" if np.array_equal(a, i_ref) else "no"

    shape = f"N={args.n:,} K={args.k} C={args.c} b={args.b}"
    rows = [
        (f"BatchBALD {shape}, assay default (pruned) (s)",
         f"{t_prune:.2f}", f"{t_ref:.2f}", f"{t_ref / t_prune:.2f}"),
        ("BatchBALD, assay prune=False (s)",
         f"{t_full:.2f}", f"{t_ref:.2f}", f"{t_ref / t_full:.2f}"),
        ("same picks as reference: pruned / prune=False",
         f"{same(i_prune)} / {same(i_full)}", "–", "–"),
        ("max abs gain diff vs reference: pruned / prune=False (nats)",
         f"{np.abs(g_prune - g_ref).max():.1e} / {np.abs(g_full - g_ref).max():.1e}", "–", "–"),
        ("picks shared with top-b BALD",
         f"{len(set(i_prune.tolist()) & set(topk.tolist()))}/{args.b}", "–", "–"),
    ]
    details = {"assay_s": t_prune, "assay_no_pruning_s": t_full, "reference_s": t_ref,
               "picks_assay": i_prune.tolist(), "picks_no_pruning": i_full.tolist(),
               "picks_reference": i_ref.tolist(), "gains_assay": g_prune.tolist(),
               "gains_reference": g_ref.tolist(), "topk_bald": topk.tolist()}
    return rows, details


def bench_scale(args: argparse.Namespace) -> tuple[list[tuple[str, str, str, str]], dict]:
    """The miner's defaults on the scale benchmark's shape (see the module docstring)."""
    k, c = 8, 10
    pool = make_pool(args.scale_pool, k, c, args.seed)
    top = np.argsort(-bald_scores(pool), kind="stable")[: args.scale_candidates]
    cand = pool[top]  # the runner hands the candidates over in decreasing BALD order
    b = min(args.scale_b, len(cand))
    stats: dict[str, Any] = {}
    t_assay, (idx, gain) = _timed(batchbald_select, cand, b, seed=args.seed, stats=stats)
    g = stats["greedy_picks"]
    finite = bool(np.isfinite(gain).all())
    distinct = len(set(idx.tolist())) == b
    print(f"  assay defaults:   {t_assay:.2f}s  {g} greedy picks (stopped: {stats['stopped']}, "
          f"H(w | y_S) = {stats['information_left']:.1e} nats), {b - g} by PowerBALD; "
          f"gains finite: {finite}; distinct: {distinct}", flush=True)
    t_ref, (i_ref, g_ref) = _timed(reference_batchbald, cand, g, num_configs=10_000,
                                   seed=args.seed, exact_max_configs=100_000)
    same = np.array_equal(idx[:g], i_ref)
    print(f"  reference, {g} greedy picks: {t_ref:.2f}s  same picks: {same}", flush=True)
    shape = f"N={len(cand):,} (top by BALD of {args.scale_pool:,}) K={k} C={c} b={b}"
    rows = [
        (f"BatchBALD defaults {shape} (s)", f"{t_assay:.2f}", f"{t_ref:.2f} ({g} picks)",
         f"{t_ref / t_assay:.2f}"),
        ("greedy picks (stop) / PowerBALD picks", f"{g} ({stats['stopped']}) / {b - g}", "–", "–"),
        ("all gains finite / picks distinct", f"{finite} / {distinct}", "–", "–"),
        ("greedy picks same as reference", "yes" if same else "no", "–", "–"),
        ("max abs gain diff vs reference, greedy picks (nats)",
         f"{np.abs(gain[:g] - g_ref).max():.1e}", "–", "–"),
    ]
    details: dict[str, Any] = {"assay_s": t_assay, "reference_s": t_ref, "stats": stats,
                               "picks": idx.tolist(), "gains": gain.tolist()}
    if args.scale_published:
        t_pub, (i_pub, g_pub) = _timed(batchbald_select, cand, b, seed=args.seed,
                                       min_gain_ratio=0, greedy_max=b)
        ok = bool(np.isfinite(g_pub).all()) and len(set(i_pub.tolist())) == b
        print(f"  published greedy, whole batch: {t_pub:.2f}s  finite and distinct: {ok}; "
              f"gains past pick {g}: max {np.abs(g_pub[g:]).max():.1e} nats", flush=True)
        rows.append((f"published greedy for all {b} picks (min_gain_ratio=0) (s)",
                     f"{t_pub:.2f}", "–", "–"))
        details["published_s"] = t_pub
    return rows, details


def render(rows: list[tuple[str, str, str, str]]) -> str:
    lines = ["| measure | assay | reference | ratio |", "|---|---:|---:|---:|"]
    lines += [f"| {a} | {b} | {c} | {d} |" for a, b, c, d in rows]
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=10_000, help="pool size")
    p.add_argument("--k", type=int, default=20, help="MC-dropout samples")
    p.add_argument("--c", type=int, default=10, help="classes")
    p.add_argument("--b", type=int, default=10, help="batch size")
    p.add_argument("--num-configs", type=int, default=10_000)
    p.add_argument("--exact-max-configs", type=int, default=100_000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", type=Path, default=None, help="also write the results here")
    p.add_argument("--scale", action="store_true",
                   help="instead: the miner's defaults on the scale benchmark's shape")
    p.add_argument("--scale-pool", type=int, default=20_000)
    p.add_argument("--scale-candidates", type=int, default=1_000)
    p.add_argument("--scale-b", type=int, default=1_000)
    p.add_argument("--scale-published", action="store_true",
                   help="with --scale: also time the published greedy for the whole batch")
    p.add_argument("--quick", action="store_true",
                   help="short run: N=2,000, b=6, exact up to 1,000 configurations")
    args = p.parse_args(argv)
    if args.quick:
        args.n, args.b = min(args.n, 2_000), min(args.b, 6)
        args.exact_max_configs = min(args.exact_max_configs, 1_000)
        args.num_configs = min(args.num_configs, 2_000)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    m = machine()
    print("# assay uncertainty-miner benchmark\n")
    print(f"- machine: {m['cpu_count']} CPUs ({m['cpus_usable']} usable), {m['cpu_model']}, "
          f"{m['platform']}")
    print(f"- python {m['python']}, numpy {m['numpy']}, OPENBLAS_NUM_THREADS="
          f"{m['blas_threads']}")
    t0 = time.perf_counter()
    if args.scale:
        print(f"- BatchBALD at the miner's defaults: pool {args.scale_pool:,}, candidates "
              f"{args.scale_candidates:,}, b={args.scale_b:,}, K=8, C=10, seed={args.seed}\n")
        print("## BatchBALD, scale shape", flush=True)
        rows, details = bench_scale(args)
    else:
        print(f"- BatchBALD: N={args.n:,}, K={args.k}, C={args.c}, b={args.b}, num_configs="
              f"{args.num_configs:,}, exact_max_configs={args.exact_max_configs:,}, "
              f"seed={args.seed}\n", flush=True)
        print("## BatchBALD", flush=True)
        rows, details = bench_batchbald(args)
    total = time.perf_counter() - t0
    print(f"\n## results (total {total:.0f}s)\n")
    print(render(rows))
    print("\nratio = reference seconds / assay seconds; > 1 means assay is faster.")
    if args.json:
        args.json.write_text(json.dumps({"machine": m, "params": {
            k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
            "rows": rows, "details": details}, indent=2))
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
