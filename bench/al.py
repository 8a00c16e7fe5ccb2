"""Pool-based active-learning simulation, driven through the assay client against a server.

    python -m bench.al [--datasets digits,wine,breast_cancer,repeated_digits] [--dataset PATH.npz]
                   [--collection NAME --space S [--label-column label] [--where SQL] [--test-where SQL]]
                   [--learners logreg,mlp,package.module:Class] [--strategies all|key|NAME,...]
                   [--seeds 10] [--initial-per-class 2 | --initial N] [--batch 10] [--budget 300]
                   [--test-size 0.3] [--server HOST:PORT [--token T]] [--out DIR] [--quick] [--workers N]

Each run is one (dataset, learner, strategy, seed): a stratified split (70/30 by default;
a user ``.npz`` may bring its own ``X_test``/``y_test``), 2 labels per class to start,
then rounds of: train the learner on the labeled rows, measure its test accuracy, predict
the pool, upsert the predictions (``pred_learner``: ``probs``, MC-dropout ``samples``) and
embeddings (``emb_h``: the MLP's penultimate layer, or the features for logistic
regression) with the labels so far through ``Collection.upsert``, mine a batch with
``where="label IS NULL"`` (the labeled rows are the reference set of coreset-style miners),
read the results and "label" them. The test rows never enter the collection.

Your data and your model: ``--collection NAME --space S`` reads an existing collection's
vectors and labels through the client (``--server``; rows with a label and a vector,
``--where`` to narrow them; ``--test-where`` names a fixed test set, else a stratified split
per seed), and each run works on a copy of them in a temporary collection. A learner given
as ``package.module:Class`` is built as ``Class()`` and must have ``fit(X, y)`` and
``predict_proba(X)`` (``classes_`` when it sees only some classes, as scikit-learn's
classifiers do); its embedding space is the features.

Cold start: ``--initial N`` starts from ``N`` labels drawn at random from the pool (0 to
10 in the protocol) instead of ``--initial-per-class``. While fewer than two classes are
labeled no learner can be trained: the test accuracy is that of predicting the one class
seen (class 0 with none), and strategies that need the model (probabilities, samples, or a
learned embedding) pick at random for that round (counted as ``fallback_rounds``);
model-free strategies (random, TypiClust, ProbCover, coreset on fixed features) run from
the first round.

Outputs (``--out``): ``al.json`` (every curve and pick, the summary, the machine, the
configuration), ``al.md`` (the tables: labels to reach 90 % / 95 % test accuracy, median
and IQR over seeds; accuracy at 50/100/200/300 labels; area under the learning curve; a
paired test against random over seeds — AULC per seed, Wilcoxon signed-rank and paired t —
with the number of seeds; the goals) and one learning-curve PNG per dataset and learner.

The helpers for splitting, bookkeeping and metrics are pure functions (tested in
``tests/test_al_sim.py``); :func:`simulate` is one run; :func:`main` the command.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import shlex
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

BUILTIN_DATASETS = ("digits", "wine", "breast_cancer", "repeated_digits")
LEARNERS = ("logreg", "mlp")
TARGETS = (0.90, 0.95)
CHECKPOINTS = (50, 100, 200, 300)
MODEL = "learner"  # the collection's model: pred_learner
SPACE = "h"  # the collection's space: emb_h


# -- datasets --------------------------------------------------------------------------------


@dataclass
class Dataset:
    """Features ``X`` (float32), integer labels ``y`` in ``[0, C)``, class names.

    ``X_test``/``y_test``: a fixed test set (else a stratified split per seed).
    ``repeats``/``noise``: the Repeated-MNIST recipe (BatchBALD paper), applied to the pool
    after the split: every pool item ``repeats`` times, each copy with isotropic Gaussian
    noise of standard deviation ``noise`` (the test set stays clean and single).
    ``standardize``: scale features by the pool's mean and standard deviation (unlabeled
    features are known in pool-based active learning; the test set is scaled alike).
    """

    name: str
    X: np.ndarray
    y: np.ndarray
    classes: list[str]
    X_test: np.ndarray | None = None
    y_test: np.ndarray | None = None
    repeats: int = 1
    noise: float = 0.0
    standardize: bool = False
    source: str = ""
    source_name: str = ""  # how the command line named it (a built-in name or a path)

    @property
    def n_classes(self) -> int:
        return len(self.classes)


@dataclass
class Split:
    """One seed's data: the pool (candidates for labeling) and the test set.
    ``origin[i]``: the index in ``Dataset.X`` of pool row ``i`` (copies share it)."""

    X_pool: np.ndarray
    y_pool: np.ndarray
    X_test: np.ndarray
    y_test: np.ndarray
    origin: np.ndarray
    test_origin: np.ndarray


def _encode_labels(y: np.ndarray) -> tuple[np.ndarray, list[str]]:
    values, codes = np.unique(np.asarray(y), return_inverse=True)
    return codes.astype(np.int64), [str(v) for v in values]


def load_dataset(name: str, *, repeats: int = 3, noise: float = 0.1) -> Dataset:
    """A built-in dataset by name, or a ``.npz`` file (arrays ``X``, ``y``, optional
    ``X_test``, ``y_test``)."""
    if name.endswith(".npz") or os.path.sep in name:
        return load_npz(name)
    from sklearn import datasets as skd

    if name in ("digits", "repeated_digits"):
        d = skd.load_digits()
        X = (d.data / 16.0).astype(np.float32)  # pixels in [0, 1]
        y, classes = d.target.astype(np.int64), [str(c) for c in d.target_names]
        if name == "digits":
            return Dataset(name, X, y, classes, source="sklearn.datasets.load_digits, pixels / 16")
        # Repeated-MNIST adds N(0, 0.1²) to standardised pixels: the noise is in units of the
        # pixels' standard deviation (0.376 on pixels / 16)
        sd = noise * float(X.std())
        return Dataset(name, X, y, classes, repeats=repeats, noise=sd,
                       source=f"load_digits pixels / 16; pool x{repeats}, each copy + Gaussian noise of std "
                              f"{noise:g} x the pixels' std (= {sd:.3f}; the Repeated-MNIST recipe); clean, "
                              "single test set")
    if name in ("wine", "breast_cancer"):
        d = getattr(skd, f"load_{name}")()
        return Dataset(name, d.data.astype(np.float32), d.target.astype(np.int64),
                       [str(c) for c in d.target_names], standardize=True,
                       source=f"sklearn.datasets.load_{name}, standardised by the pool's mean/std")
    raise ValueError(f"unknown dataset {name!r}: use one of {', '.join(BUILTIN_DATASETS)} or a .npz path")


def load_npz(path: str) -> Dataset:
    with np.load(path, allow_pickle=False) as f:
        if "X" not in f or "y" not in f:
            raise ValueError(f"{path}: needs arrays X and y (optional X_test, y_test); has {', '.join(f.files)}")
        X = np.asarray(f["X"], dtype=np.float32)
        y_raw = np.asarray(f["y"])
        X_test = np.asarray(f["X_test"], dtype=np.float32) if "X_test" in f else None
        y_test_raw = np.asarray(f["y_test"]) if "y_test" in f else None
    if X.ndim != 2 or len(X) != len(y_raw):
        raise ValueError(f"{path}: X must be (n, d) with one y per row; got X {X.shape}, y {y_raw.shape}")
    if (X_test is None) != (y_test_raw is None):
        raise ValueError(f"{path}: give both X_test and y_test, or neither")
    if X_test is not None:
        if X_test.ndim != 2 or X_test.shape[1] != X.shape[1] or len(X_test) != len(y_test_raw):
            raise ValueError(f"{path}: X_test must be (m, {X.shape[1]}) with one y_test per row")
        values, codes = np.unique(np.concatenate([y_raw, y_test_raw]), return_inverse=True)
        y, y_test = codes[: len(y_raw)].astype(np.int64), codes[len(y_raw):].astype(np.int64)
        classes = [str(v) for v in values]
    else:
        (y, classes), y_test = _encode_labels(y_raw), None
    if not (np.isfinite(X).all() and (X_test is None or np.isfinite(X_test).all())):
        raise ValueError(f"{path}: features must be finite")
    stem = re.sub(r"[^A-Za-z0-9_]", "_", Path(path).stem) or "dataset"
    return Dataset(stem, X, y, classes, X_test, y_test, standardize=True, source=f"{path}, standardised")


def load_collection(client: Any, name: str, space: str, *, label_column: str = "label",
                    where: str | None = None, test_where: str | None = None,
                    standardize: bool = False) -> Dataset:
    """An existing collection's vectors (``emb_<space>``) and labels, read through the
    client: the rows matching ``where`` that have both (``test_where``: those rows are the
    fixed test set, the others the pool). The simulation then runs on copies in temporary
    collections; the collection itself is only read."""
    import pyarrow.compute as pc

    col = client.collection(name)
    column = f"emb_{space}"
    cond = f"{column} IS NOT NULL AND {label_column} IS NOT NULL"

    def read(extra: str | None) -> tuple[np.ndarray, np.ndarray]:
        parts = [p for p in (where, extra, cond) if p]
        xs, ys = [], []
        for page in col.scan(" AND ".join(f"({p})" for p in parts), columns=["id", column, label_column]):
            if not page.num_rows:
                continue
            flat = pc.list_flatten(page.column(column).combine_chunks())
            xs.append(np.asarray(flat.to_numpy(zero_copy_only=False), np.float32).reshape(page.num_rows, -1))
            ys.append(np.asarray(page.column(label_column).to_pylist(), dtype=object))
        if not xs:
            raise ValueError(f"collection {name!r}: no row matches {' AND '.join(parts)!r}")
        return np.concatenate(xs), np.concatenate(ys)

    if test_where:
        X, y_raw = read(f"NOT ({test_where})")
        X_test, y_test_raw = read(test_where)
        values, codes = np.unique(np.concatenate([y_raw, y_test_raw]).astype(str), return_inverse=True)
        y, y_test = codes[:len(y_raw)].astype(np.int64), codes[len(y_raw):].astype(np.int64)
    else:
        X, y_raw = read(None)
        values, codes = np.unique(y_raw.astype(str), return_inverse=True)
        y, X_test, y_test = codes.astype(np.int64), None, None
    stem = re.sub(r"[^A-Za-z0-9_]", "_", f"{name}_{space}")
    src = f"collection {name!r}, space {space!r}, labels {label_column!r}" + (f", where {where!r}" if where else "") \
        + (f", test set {test_where!r}" if test_where else "")
    return Dataset(stem, X, y, [str(v) for v in values], X_test, y_test, standardize=standardize, source=src)


def stratified_split(y: np.ndarray, test_size: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(train indices, test indices), stratified by ``y``, both sorted."""
    from sklearn.model_selection import train_test_split

    idx = np.arange(len(y))
    train, test = train_test_split(idx, test_size=test_size, stratify=y, random_state=seed)
    return np.sort(train), np.sort(test)


def make_split(ds: Dataset, seed: int, test_size: float = 0.3) -> Split:
    """The pool and test set of one seed (the test set never joins the pool)."""
    if ds.X_test is not None:
        train, test = np.arange(len(ds.X)), np.arange(len(ds.X_test))
        X_tr, y_tr, X_te, y_te = ds.X, ds.y, ds.X_test, ds.y_test
    else:
        train, test = stratified_split(ds.y, test_size, seed)
        X_tr, y_tr, X_te, y_te = ds.X[train], ds.y[train], ds.X[test], ds.y[test]
    origin = train
    if ds.repeats > 1:
        rng = np.random.default_rng([seed, 7919])
        copies = [X_tr + rng.normal(0.0, ds.noise, X_tr.shape).astype(np.float32) for _ in range(ds.repeats)]
        X_tr = np.concatenate(copies)
        y_tr = np.tile(y_tr, ds.repeats)
        origin = np.tile(train, ds.repeats)
    if ds.standardize:
        mu, sd = X_tr.mean(axis=0), X_tr.std(axis=0)
        sd = np.where(sd > 0, sd, 1.0)
        X_tr, X_te = (X_tr - mu) / sd, (X_te - mu) / sd
    return Split(np.ascontiguousarray(X_tr, np.float32), y_tr, np.ascontiguousarray(X_te, np.float32),
                 y_te, origin, test)


def initial_labels(y: np.ndarray, per_class: int, seed: int) -> np.ndarray:
    """``per_class`` random pool rows of every class (all of a class when it has fewer)."""
    if per_class < 1:
        raise ValueError("initial labels per class must be >= 1 (every class must be seen)")
    rng = np.random.default_rng([seed, 104729])
    picks = [rng.choice(np.flatnonzero(y == c), min(per_class, int((y == c).sum())), replace=False)
             for c in np.unique(y)]
    return np.sort(np.concatenate(picks))


def initial_random(n: int, count: int, seed: int) -> np.ndarray:
    """``count`` pool rows drawn uniformly at random (cold start: no class guaranteed)."""
    if not 0 <= count <= n:
        raise ValueError(f"initial labels must be in [0, {n}]; got {count}")
    rng = np.random.default_rng([seed, 104723])
    return np.sort(rng.choice(n, count, replace=False))


def pool_ids(n: int) -> list[str]:
    return [f"p{i:06d}" for i in range(n)]


class Ledger:
    """Who is labeled, in which round: refuses unknown ids, ids already labeled and
    duplicates within a batch (so a miner that returned a labeled or a test row fails the
    run instead of being counted)."""

    def __init__(self, ids: Sequence[str], initial: Iterable[int]) -> None:
        self.ids = list(ids)
        self.index = {i: k for k, i in enumerate(self.ids)}
        if len(self.index) != len(self.ids):
            raise ValueError("pool ids must be unique")
        self.labeled = np.zeros(len(self.ids), dtype=bool)
        first = np.asarray(sorted(set(int(i) for i in initial)), dtype=np.int64)
        self.labeled[first] = True
        self.rounds: list[list[int]] = [first.tolist()]

    @property
    def n_labeled(self) -> int:
        return int(self.labeled.sum())

    @property
    def n_unlabeled(self) -> int:
        return len(self.ids) - self.n_labeled

    def labeled_indices(self) -> np.ndarray:
        return np.flatnonzero(self.labeled)

    def label(self, picked: Sequence[str]) -> np.ndarray:
        """Mark a mined batch labeled; returns its pool indices."""
        idx = []
        for pid in picked:
            if pid not in self.index:
                raise ValueError(f"mined id {pid!r} is not a pool row")
            idx.append(self.index[pid])
        if len(set(idx)) != len(idx):
            raise ValueError(f"the batch names an item twice: {sorted(picked)}")
        again = [self.ids[i] for i in idx if self.labeled[i]]
        if again:
            raise ValueError(f"mined rows that were already labeled: {again}")
        self.labeled[idx] = True
        self.rounds.append(idx)
        return np.asarray(idx, dtype=np.int64)

    def order(self) -> list[int]:
        return [i for r in self.rounds for i in r]


# -- metrics (pure) ------------------------------------------------------------------------


def labels_to_reach(labels: Sequence[int], acc: Sequence[float], target: float) -> float:
    """The first label count whose test accuracy is >= ``target``; inf if none."""
    for n, a in zip(labels, acc, strict=True):
        if a >= target - 1e-12:
            return float(n)
    return math.inf


def acc_at(labels: Sequence[int], acc: Sequence[float], n: int) -> float | None:
    """Accuracy of the learner trained on the largest labeled set of at most ``n`` items
    (a step function; the last point when the pool ran out first); None below the start."""
    out = None
    for m, a in zip(labels, acc, strict=True):
        if m <= n:
            out = float(a)
    return out


def aulc(labels: Sequence[int], acc: Sequence[float]) -> float:
    """Area under the learning curve over its label range, divided by that range: the mean
    accuracy over the budget (trapezoids; 1.0 would be perfect from the first label)."""
    x, y = np.asarray(labels, float), np.asarray(acc, float)
    if len(x) < 2 or x[-1] == x[0]:
        return float(y[-1]) if len(y) else math.nan
    return float(np.sum((x[1:] - x[:-1]) * (y[1:] + y[:-1]) / 2) / (x[-1] - x[0]))


def quantile(values: Sequence[float], q: float) -> float:
    """Linear-interpolation quantile where ``inf`` (target never reached) is a value:
    any interpolation touching an inf is inf."""
    v = np.sort(np.asarray(values, float))
    if len(v) == 0:
        return math.nan
    pos = q * (len(v) - 1)
    lo, hi = int(math.floor(pos)), int(math.ceil(pos))
    if math.isinf(v[lo]) or math.isinf(v[hi]):
        return math.inf
    return float(v[lo] + (v[hi] - v[lo]) * (pos - lo))


def median_iqr(values: Sequence[float]) -> tuple[float, float, float]:
    return quantile(values, 0.5), quantile(values, 0.25), quantile(values, 0.75)


def summarize_runs(runs: Sequence[Mapping[str, Any]], targets: Sequence[float] = TARGETS,
                   checkpoints: Sequence[int] = CHECKPOINTS) -> list[dict[str, Any]]:
    """One row per (dataset, learner, strategy): medians and IQRs over seeds."""
    groups: dict[tuple[str, str, str], list[Mapping[str, Any]]] = {}
    for r in runs:
        groups.setdefault((r["dataset"], r["learner"], r["strategy"]), []).append(r)
    out = []
    for (ds, learner, strategy), rs in groups.items():
        row: dict[str, Any] = {"dataset": ds, "learner": learner, "strategy": strategy,
                               "seeds": sorted(r["seed"] for r in rs)}
        for t in targets:
            vals = [labels_to_reach(r["labels"], r["acc"], t) for r in rs]
            med, q1, q3 = median_iqr(vals)
            row[f"to_{round(t * 100)}"] = {"median": med, "q1": q1, "q3": q3, "values": vals}
        for c in checkpoints:
            vals = [acc_at(r["labels"], r["acc"], c) for r in rs]
            vals = [v for v in vals if v is not None]
            row[f"acc_{c}"] = float(np.median(vals)) if vals else None
        au = [aulc(r["labels"], r["acc"]) for r in rs]
        row["aulc"] = float(np.median(au))
        row["aulc_values"] = au
        row["redundant"] = float(np.median([sum(r.get("redundant", [])) for r in rs]))
        row["repeats"] = int(rs[0].get("repeats", 1))
        row["final_acc"] = float(np.median([r["acc"][-1] for r in rs]))
        row["final_labels"] = int(np.median([r["labels"][-1] for r in rs]))
        for k in ("round_s", "service_s", "fit_s", "mine_s", "upsert_s"):
            row[k] = float(np.median([_timing(r, k) for r in rs]))
        row["fallback_rounds"] = float(np.median([r.get("fallback_rounds", 0) for r in rs]))
        out.append(row)
    by_key = {(r["dataset"], r["learner"], r["strategy"]): r for r in out}
    for row in out:
        rnd = by_key.get((row["dataset"], row["learner"], "random"))
        row["vs_random"] = None if rnd is None or row["strategy"] == "random" else vs_random(
            groups[(row["dataset"], row["learner"], row["strategy"])],
            groups[(row["dataset"], row["learner"], "random")], targets)
    return out


def vs_random(runs: Sequence[Mapping[str, Any]], random_runs: Sequence[Mapping[str, Any]],
              targets: Sequence[float] = TARGETS) -> dict[str, Any]:
    """A strategy against random, paired by seed (same split, same initial labels): the AULC
    differences with wins / ties / losses, the Wilcoxon signed-rank and paired t p-values
    (``bench.efficiency.paired_test``), and the same for the labels to the first target
    (fewer is better; a target never reached counts as the budget + 1 batch)."""
    from bench.efficiency import paired_test

    mine = {r["seed"]: r for r in runs}
    theirs = {r["seed"]: r for r in random_runs}
    seeds = sorted(set(mine) & set(theirs))
    a = [aulc(mine[s]["labels"], mine[s]["acc"]) for s in seeds]
    b = [aulc(theirs[s]["labels"], theirs[s]["acc"]) for s in seeds]
    out = {"seeds": seeds, "aulc": paired_test(a, b)}

    def to_target(r: Mapping[str, Any]) -> float:
        v = labels_to_reach(r["labels"], r["acc"], targets[0])
        return v if math.isfinite(v) else float(r["labels"][-1]) + 1.0

    # fewer labels is better: compare random's count against the strategy's
    out[f"to_{round(targets[0] * 100)}"] = paired_test([to_target(theirs[s]) for s in seeds],
                                                       [to_target(mine[s]) for s in seeds])
    return out


def paired_verdict(test: Mapping[str, Any] | None, alpha: float = 0.05) -> str:
    """"better" / "worse" (Wilcoxon p < alpha, by the median difference) or "n.s."."""
    if not test or test.get("p_wilcoxon") is None:
        return "n.s."
    if test["p_wilcoxon"] < alpha:
        return "better" if test["median_diff"] > 0 else "worse"
    return "n.s."


def _timing(run: Mapping[str, Any], key: str) -> float:
    """Median seconds per round of one timing (a list per round, or its stored summary)."""
    t = run["timings"].get(key)
    if isinstance(t, Mapping):
        return float(t["median"])
    return float(np.median(t)) if t else 0.0


def stored(run: Mapping[str, Any]) -> dict[str, Any]:
    """A run as saved in the JSON: picks as pool indices (ids are ``pool_ids``), timings as
    total and median per round, accuracies to 6 decimals."""
    out = {k: v for k, v in run.items() if k != "pick_ids"}
    out["acc"] = [round(float(a), 6) for a in run["acc"]]
    out["timings"] = {k: v if isinstance(v, Mapping) else
                      {"total": round(float(np.sum(v)), 4), "median": round(float(np.median(v)) if v else 0.0, 4)}
                      for k, v in run["timings"].items()}
    out["setup_s"] = round(float(run["setup_s"]), 4)
    return out


def median_curve(runs: Sequence[Mapping[str, Any]]) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(labels, median, q1, q3) over seeds, on the label counts every seed reached."""
    common = sorted(set.intersection(*(set(r["labels"]) for r in runs)))
    acc = np.array([[dict(zip(r["labels"], r["acc"], strict=True))[n] for n in common] for r in runs])
    return (np.asarray(common), np.median(acc, axis=0), np.percentile(acc, 25, axis=0),
            np.percentile(acc, 75, axis=0))


# -- learners --------------------------------------------------------------------------------


class _ProbsLearner:
    """What a learner that gives class probabilities (``probs``) offers the strategies: its
    predictions, its probabilities and its input features as the embedding."""

    def probs(self, X: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def predict(self, X: np.ndarray) -> np.ndarray:
        return self.probs(X).argmax(axis=1)

    def outputs(self, X: np.ndarray, needs: frozenset[str], seed: int) -> dict[str, np.ndarray]:
        out: dict[str, np.ndarray] = {}
        if "probs" in needs:
            out["probs"] = self.probs(X)
        if "emb" in needs:
            out["emb"] = X
        return out


class LogRegLearner(_ProbsLearner):
    """Logistic regression on the features (scikit-learn defaults: L2, C = 1, lbfgs). Its
    embedding space is the features themselves (fixed, written once). Each round's fit
    starts from the previous round's coefficients (``warm_start``): the problem is convex,
    so only the number of iterations changes, not the solution (up to ``tol``)."""

    name = "logreg"
    provides = frozenset({"probs", "emb"})
    dynamic_embedding = False

    def __init__(self, n_classes: int, C: float = 1.0) -> None:
        self.n_classes, self.C = n_classes, C
        self.model: Any = None

    def fit(self, X: np.ndarray, y: np.ndarray, seed: int) -> None:
        from sklearn.linear_model import LogisticRegression

        if self.model is None or not np.array_equal(self.model.classes_, np.unique(y)):
            # a new class seen (cold start): the previous coefficients no longer fit
            self.model = LogisticRegression(C=self.C, max_iter=2000, warm_start=True)
        self.model.fit(X, y)

    def probs(self, X: np.ndarray) -> np.ndarray:
        p = np.zeros((len(X), self.n_classes), dtype=np.float64)
        p[:, self.model.classes_] = self.model.predict_proba(X)
        return p


class MLPLearner:
    """A small PyTorch MLP with dropout: d → 256 → 128 → C, ReLU, dropout ``p`` after each
    hidden layer, trained from scratch every round (Adam, lr 3e-3, weight decay 1e-4,
    full batch, ``steps`` = 150 steps, seeded). ``probs``: the deterministic (eval-mode) softmax; ``samples``: ``K``
    MC-dropout passes (dropout kept at prediction, Gal & Ghahramani 2016; one mask per pass
    shared by all rows: consistent MC dropout, as BatchBALD needs); ``emb``:
    the penultimate layer (128-d, after ReLU), which BADGE multiplies by ``p − onehot``."""

    name = "mlp"
    provides = frozenset({"probs", "samples", "emb"})
    dynamic_embedding = True

    def __init__(self, n_classes: int, *, hidden: tuple[int, int] = (256, 128), dropout: float = 0.5,
                 steps: int = 150, lr: float = 3e-3, weight_decay: float = 1e-4, mc_samples: int = 20) -> None:
        import torch

        torch.set_num_threads(1)
        self.torch = torch
        self.n_classes, self.hidden, self.dropout = n_classes, hidden, dropout
        self.steps, self.lr, self.weight_decay, self.mc_samples = steps, lr, weight_decay, mc_samples
        self.net: Any = None

    def _build(self, d: int) -> Any:
        nn = self.torch.nn
        h1, h2 = self.hidden
        body = nn.Sequential(nn.Linear(d, h1), nn.ReLU(), nn.Dropout(self.dropout),
                             nn.Linear(h1, h2), nn.ReLU())
        return nn.ModuleDict({"body": body, "drop": nn.Dropout(self.dropout), "head": nn.Linear(h2, self.n_classes)})

    def fit(self, X: np.ndarray, y: np.ndarray, seed: int) -> None:
        torch = self.torch
        torch.manual_seed(seed)
        net = self._build(X.shape[1])
        opt = torch.optim.Adam(net.parameters(), lr=self.lr, weight_decay=self.weight_decay)
        xb, yb = torch.from_numpy(np.ascontiguousarray(X, np.float32)), torch.from_numpy(y.astype(np.int64))
        net.train()
        for _ in range(self.steps):
            opt.zero_grad()
            loss = torch.nn.functional.cross_entropy(net["head"](net["drop"](net["body"](xb))), yb)
            loss.backward()
            opt.step()
        self.net = net

    def _forward(self, X: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Eval mode: (softmax probabilities, penultimate features)."""
        torch = self.torch
        self.net.eval()
        with torch.no_grad():
            h = self.net["body"](torch.from_numpy(np.ascontiguousarray(X, np.float32)))
            p = torch.softmax(self.net["head"](h).double(), dim=1)
        return p.numpy(), h.numpy()

    def mc_predict(self, X: np.ndarray, seed: int) -> np.ndarray:
        """``(N, K, C)`` MC-dropout predictions with *consistent* masks: pass ``k`` draws one
        dropout mask per hidden unit and applies it to every row, so pass ``k`` is one
        sampled model ``w_k`` for the whole pool — what BatchBALD's joint entropies assume
        (independent per-row masks would make the joint MI collapse to a sum of BALDs)."""
        torch = self.torch
        lin1, lin2, head = self.net["body"][0], self.net["body"][3], self.net["head"]
        keep = 1.0 - self.dropout
        gen = torch.Generator().manual_seed(seed)
        out = []
        with torch.no_grad():
            a1 = torch.relu(lin1(torch.from_numpy(np.ascontiguousarray(X, np.float32))))  # no dropout before it
            for _ in range(self.mc_samples):
                m1 = torch.bernoulli(torch.full((a1.shape[1],), keep), generator=gen) / keep
                h2 = torch.relu(lin2(a1 * m1))
                m2 = torch.bernoulli(torch.full((h2.shape[1],), keep), generator=gen) / keep
                out.append(torch.softmax(head(h2 * m2).double(), dim=1))
        return torch.stack(out, dim=1).numpy()

    def probs(self, X: np.ndarray) -> np.ndarray:
        return self._forward(X)[0]

    def predict(self, X: np.ndarray) -> np.ndarray:
        return self.probs(X).argmax(axis=1)

    def outputs(self, X: np.ndarray, needs: frozenset[str], seed: int) -> dict[str, np.ndarray]:
        out: dict[str, np.ndarray] = {}
        if needs & {"probs", "emb"}:
            out["probs"], out["emb"] = self._forward(X)
        if "samples" in needs:
            out["samples"] = self.mc_predict(X, seed)
        return {k: v for k, v in out.items() if k in needs}


class UserLearner(_ProbsLearner):
    """A learner given as ``package.module:Class``: ``Class()`` with ``fit(X, y)`` and
    ``predict_proba(X)`` (columns in the order of its ``classes_`` when it has one, else of
    the classes ``0 .. C-1``). A new instance is fitted every round; its embedding space is
    the features (fixed, written once). A ``random_state`` attribute, when it has one, is set
    to the round's seed."""

    provides = frozenset({"probs", "emb"})
    dynamic_embedding = False

    def __init__(self, spec: str, n_classes: int) -> None:
        self.name = spec
        self.cls = load_learner_class(spec)
        self.n_classes = n_classes
        self.model: Any = None

    def fit(self, X: np.ndarray, y: np.ndarray, seed: int) -> None:
        model = self.cls()
        if hasattr(model, "random_state"):
            model.random_state = seed % (2**32)
        model.fit(X, y)
        self.model = model

    def probs(self, X: np.ndarray) -> np.ndarray:
        raw = np.asarray(self.model.predict_proba(X), dtype=np.float64)
        cols = np.asarray(getattr(self.model, "classes_", np.arange(raw.shape[1])), dtype=np.int64)
        if raw.ndim != 2 or raw.shape != (len(X), len(cols)):
            raise ValueError(f"{self.name}.predict_proba returned shape {raw.shape}; expected ({len(X)}, "
                             f"{len(cols)})")
        p = np.zeros((len(X), self.n_classes))
        p[:, cols] = raw
        return p


def load_learner_class(spec: str) -> Any:
    """``package.module:Class`` → the class (it must have ``fit`` and ``predict_proba``)."""
    import importlib

    mod_name, _, cls_name = spec.partition(":")
    if not mod_name or not cls_name:
        raise ValueError(f"learner {spec!r}: use logreg, mlp or package.module:Class")
    try:
        cls = getattr(importlib.import_module(mod_name), cls_name)
    except (ImportError, AttributeError) as exc:
        raise ValueError(f"learner {spec!r}: cannot import {cls_name} from {mod_name} ({exc})") from None
    if not all(callable(getattr(cls, m, None)) for m in ("fit", "predict_proba")):
        raise ValueError(f"learner {spec!r}: the class needs fit(X, y) and predict_proba(X)")
    return cls


def is_learner(name: str) -> bool:
    return name in LEARNERS or ":" in name


def make_learner(name: str, n_classes: int, *, mc_samples: int = 20) -> LogRegLearner | MLPLearner | UserLearner:
    if name == "logreg":
        return LogRegLearner(n_classes)
    if name == "mlp":
        return MLPLearner(n_classes, mc_samples=mc_samples)
    if ":" in name:
        return UserLearner(name, n_classes)
    raise ValueError(f"unknown learner {name!r}: use {', '.join(LEARNERS)} or package.module:Class")


# -- strategies ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Strategy:
    """A named way to pick the next batch: an assay miner with its parameters.
    ``needs``: the inputs the learner must upsert (probs, samples, emb); ``reference``: the
    labeled rows are the miner's reference set; ``params(b)`` for batch size ``b``.
    ``prefilter``: a first run of another miner (name, size as a multiple of ``b``) whose
    picks are the pool of the main run (a two-stage hybrid, each stage a mining run).
    ``classes``: the miner gets the number of classes (``params["classes"]``).
    ``seals_k``: SEALS — the run's pool is restricted to the ``seals_k`` nearest unlabeled
    rows of each labeled row (the run option ``candidates="knn_of_labeled"``)."""

    name: str
    miner: str
    family: str
    needs: frozenset[str] = frozenset()
    reference: bool = False
    params: Callable[[int], dict[str, Any]] = field(default=lambda b: {})
    note: str = ""
    prefilter: tuple[str, int] | None = None
    classes: bool = False
    seals_k: int | None = None


def _S(name: str, miner: str, family: str, needs: Iterable[str] = (), **kw: Any) -> Strategy:
    return Strategy(name, miner, family, frozenset(needs), **kw)


STRATEGIES: dict[str, Strategy] = {s.name: s for s in (
    _S("random", "random", "baseline"),
    _S("least_confidence", "least_confidence", "uncertainty", ["probs"]),
    _S("margin", "margin", "uncertainty", ["probs"]),
    _S("ratio", "ratio", "uncertainty", ["probs"]),
    _S("entropy", "entropy", "uncertainty", ["probs"]),
    _S("mean_entropy", "mean_entropy", "bayesian", ["samples"]),
    _S("variance", "variance", "bayesian", ["samples"]),
    _S("vote_entropy", "vote_entropy", "bayesian", ["samples"], note="MC-dropout passes as a committee"),
    _S("bald", "bald", "bayesian", ["samples"], note="top-k BALD"),
    _S("power_bald", "bald", "bayesian", ["samples"], params=lambda b: {"stochastic": "power"},
       note="PowerBALD: Gumbel-top-k on BALD^(1/T), T = 1 (Kirsch et al. 2021)"),
    _S("batchbald", "batchbald", "bayesian", ["samples"], params=lambda b: {"candidates": 500},
       note="greedy joint MI over the top 500 by BALD"),
    _S("coreset", "coreset", "diversity", ["emb"], reference=True,
       note="k-center greedy seeded with the labeled rows"),
    _S("embedding_distance", "embedding_distance", "diversity", ["emb"], reference=True,
       note="farthest from the labeled set (no greedy update)"),
    _S("badge", "badge", "hybrid", ["emb", "probs"], note="k-means++ on gradient embeddings"),
    _S("cluster_margin", "cluster_margin", "hybrid", ["emb", "probs"],
       params=lambda b: {"candidates": 10 * b}, note="k-means over the top 10b by margin, round-robin"),
    # Two runs, not the `chain` miner: chain takes no reference filter, so its coreset stage
    # could not be seeded with the labeled rows.
    _S("margin_coreset", "coreset", "hybrid", ["emb", "probs"], reference=True, prefilter=("margin", 5),
       note="top 5b by margin, then k-center greedy seeded with the labeled rows"),
    _S("typiclust", "typiclust", "cold_start", ["emb"], reference=True,
       note="TypiClust: k-means into |labeled| + b clusters, the most typical row of each uncovered cluster"),
    _S("probcover", "probcover", "cold_start", ["emb"], reference=True, classes=True,
       note="ProbCover: max coverage of delta-balls, delta by the purity rule (alpha 0.95, K = classes)"),
    _S("select", "select", "hybrid", ["emb", "probs"], reference=True,
       params=lambda b: {"objectives": [{"miner": "margin", "weight": 1.0}], "diversity": 1.0},
       note="select: margin (rank-normalised) + distance to the labeled rows and the picks, one greedy pass"),
    _S("seals_margin", "margin", "hybrid", ["emb", "probs"], seals_k=20,
       note="SEALS: margin among the 20 nearest unlabeled rows of each labeled row (the paper's k = 100 "
            "would cover these ~1,300-row pools after a few rounds)"),
)}
KEY_STRATEGIES = ("random", "margin", "ratio", "entropy", "bald", "batchbald", "coreset", "badge",
                  "cluster_margin", "margin_coreset", "typiclust", "probcover", "select", "seals_margin")
# The strategies of issue 21 (and the reference points they are judged against).
NEW_STRATEGIES = ("random", "margin", "typiclust", "probcover", "select", "seals_margin")
# Miners deliberately left out: lof, novelty, typicality, near_duplicates, knn, activation
# rank outliers, typical items, duplicates or neighbours of seeds (curation tools, not
# acquisition functions); detection, learning_loss and aum read inputs (boxes, a loss head,
# training dynamics) these learners do not produce.


def applicable(strategy: Strategy, learner: str) -> bool:
    provides = MLPLearner.provides if learner == "mlp" else LogRegLearner.provides
    return strategy.needs <= provides


def resolve_strategies(spec: str) -> list[str]:
    if spec == "all":
        return list(STRATEGIES)
    if spec == "key":
        return list(KEY_STRATEGIES)
    if spec == "new":
        return list(NEW_STRATEGIES)
    names = [s.strip() for s in spec.split(",") if s.strip()]
    unknown = [n for n in names if n not in STRATEGIES]
    if unknown:
        raise ValueError(f"unknown strategies {', '.join(unknown)}: choose from all, key, new, "
                         f"{', '.join(STRATEGIES)}")
    return names


# -- one run -----------------------------------------------------------------------------


@dataclass
class SimConfig:
    initial_per_class: int = 2
    batch: int = 10
    budget: int = 300
    test_size: float = 0.3
    mc_samples: int = 20
    verify: bool = False  # cross-check the ledger against the server every round (tests)
    keep: bool = False  # keep the collection after the run
    initial: int | None = None  # cold start: this many random labels instead of per class


def _list_array(matrix: np.ndarray) -> pa.Array:
    """(N, C) → list<float32>."""
    m = np.ascontiguousarray(matrix, np.float32)
    offsets = pa.array(np.arange(0, m.size + 1, m.shape[1], dtype=np.int32))
    return pa.ListArray.from_arrays(offsets, pa.array(m.reshape(-1)))


def _nested_list_array(tensor: np.ndarray) -> pa.Array:
    """(N, K, C) → list<list<float32>>."""
    n, k, _ = tensor.shape
    inner = _list_array(tensor.reshape(n * k, -1))
    offsets = pa.array(np.arange(0, n * k + 1, k, dtype=np.int32))
    return pa.ListArray.from_arrays(offsets, inner)


def _vectors(matrix: np.ndarray) -> pa.Array:
    """(N, d) → fixed_size_list<float32, d> (an embedding column)."""
    m = np.ascontiguousarray(matrix, np.float32)
    return pa.FixedSizeListArray.from_arrays(pa.array(m.reshape(-1)), m.shape[1])


def prediction_column(out: Mapping[str, np.ndarray]) -> pa.Array | None:
    fields, arrays = [], []
    if "probs" in out:
        fields.append(pa.field("probs", pa.list_(pa.float32())))
        arrays.append(_list_array(out["probs"]))
    if "samples" in out:
        fields.append(pa.field("samples", pa.list_(pa.list_(pa.float32()))))
        arrays.append(_nested_list_array(out["samples"]))
    return pa.StructArray.from_arrays(arrays, fields=fields) if arrays else None


def _renorm(p: np.ndarray) -> np.ndarray:
    """float32 rows that sum to 1 within float32 rounding (the store checks ±1e-3)."""
    p = np.clip(p, 0.0, None)
    return p / p.sum(axis=-1, keepdims=True)


def collection_name(dataset: str, learner: str, strategy: str, seed: int) -> str:
    return re.sub(r"[^A-Za-z0-9_-]", "_", f"al-{dataset}-{learner}-{strategy}-s{seed}")[:128]


def simulate(client: Any, ds: Dataset, learner_name: str, strategy: Strategy, seed: int,
             cfg: SimConfig, *, log: Callable[[str], Any] | None = None) -> dict[str, Any]:
    """One active-learning run through the service. Returns the learning curve (label
    counts, test accuracies), the picks per round (pool indices and ids), timings."""
    split = make_split(ds, seed, cfg.test_size)
    ids = pool_ids(len(split.y_pool))
    first_labels = (initial_random(len(ids), cfg.initial, seed) if cfg.initial is not None
                    else initial_labels(split.y_pool, cfg.initial_per_class, seed))
    ledger = Ledger(ids, first_labels)
    learner = make_learner(learner_name, ds.n_classes, mc_samples=cfg.mc_samples)
    needs = strategy.needs
    uses_emb = "emb" in needs
    name = collection_name(ds.name, learner_name, strategy.name, seed)
    classes = list(ds.classes)
    label_of = np.asarray(classes, dtype=object)[split.y_pool]

    t_setup = time.perf_counter()
    if name in client.list_collections():
        client.drop_collection(name)
    dim = MLPLearner(ds.n_classes).hidden[-1] if learner_name == "mlp" else split.X_pool.shape[1]
    spaces = {SPACE: {"dim": int(dim), "metric": "l2", "normalized": False}} if uses_emb else None
    col = client.create_collection(name, spaces=spaces, models={MODEL: classes})
    first: dict[str, Any] = {"id": pa.array(ids, pa.string()), "split": pa.array(["pool"] * len(ids))}
    if uses_emb and not learner.dynamic_embedding:
        first[f"emb_{SPACE}"] = _vectors(split.X_pool)  # logistic regression: the features, written once
    col.upsert(pa.table(first), batch_rows=20_000)
    setup_s = time.perf_counter() - t_setup

    labels_curve: list[int] = []
    acc_curve: list[float] = []
    timings: dict[str, list[float]] = {"fit_s": [], "predict_s": [], "upsert_s": [], "mine_s": [],
                                       "service_s": [], "round_s": []}
    redundant: list[int] = []
    fallback_rounds = 0
    # model-free: nothing the strategy reads comes from a trained model
    model_free = not (needs & {"probs", "samples"}) and not (uses_emb and learner.dynamic_embedding)
    rnd = 0
    try:
        while True:
            t0 = time.perf_counter()
            lab = ledger.labeled_indices()
            trained = len(np.unique(split.y_pool[lab])) >= 2
            if trained:
                learner.fit(split.X_pool[lab], split.y_pool[lab], seed=seed * 10_007 + rnd)
            t1 = time.perf_counter()
            if trained:
                acc = float((learner.predict(split.X_test) == split.y_test).mean())
            else:  # cold start: predict the one class seen (class 0 with none)
                seen = np.bincount(split.y_pool[lab], minlength=ds.n_classes)
                acc = float((split.y_test == int(np.argmax(seen))).mean())
            labels_curve.append(ledger.n_labeled)
            acc_curve.append(acc)
            timings["fit_s"].append(t1 - t0)
            left = min(cfg.budget - ledger.n_labeled, ledger.n_unlabeled)
            if left <= 0:
                break
            size = min(cfg.batch, left)
            fallback = not trained and not model_free
            fallback_rounds += int(fallback)
            work = needs if learner.dynamic_embedding else needs - {"emb"}
            out = learner.outputs(split.X_pool, work, seed=seed * 10_007 + rnd) if trained else {}
            if "probs" in out:
                out["probs"] = _renorm(out["probs"])
            if "samples" in out:
                out["samples"] = _renorm(out["samples"])
            t2 = time.perf_counter()
            # one upsert per round: the labels so far, the predictions, the embeddings
            labels = np.where(ledger.labeled, label_of, None)
            cols: dict[str, Any] = {"id": pa.array(ids, pa.string()), "label": pa.array(labels.tolist(), pa.string())}
            pred = prediction_column(out)
            if pred is not None:
                cols[f"pred_{MODEL}"] = pred
            if "emb" in out:
                cols[f"emb_{SPACE}"] = _vectors(out["emb"])
            col.upsert(pa.table(cols), batch_rows=20_000)
            t3 = time.perf_counter()
            where = "label IS NULL"
            if fallback:  # cold start without a model: a random batch
                job = col.mine("random", size, where=where, seed=seed * 1000 + rnd, timeout=120)
                job.wait(timeout=600)
                picked = job.results(columns=["id"]).column("id").to_pylist()
            else:
                if strategy.prefilter is not None:
                    first_miner, factor = strategy.prefilter
                    job = col.mine(first_miner, min(factor * size, ledger.n_unlabeled), model=MODEL,
                                   where=where, seed=seed * 1000 + rnd, timeout=120)
                    job.wait(timeout=600)
                    cand = job.results(columns=["id"]).column("id").to_pylist()
                    where = f"{where} AND id IN ({', '.join(repr(str(i)) for i in cand)})"  # pool ids: p000123
                params = dict(strategy.params(cfg.batch))
                if strategy.classes:
                    params["classes"] = ds.n_classes
                seals = strategy.seals_k is not None and len(lab) > 0
                job = col.mine(strategy.miner, size, model=MODEL if needs & {"probs", "samples"} else None,
                               space=SPACE if uses_emb else None, where=where,
                               reference_where="label IS NOT NULL" if strategy.reference else None,
                               params=params or None, seed=seed * 1000 + rnd, timeout=120,
                               candidates="knn_of_labeled" if seals else None,
                               candidates_k=strategy.seals_k if seals else None)
                job.wait(timeout=600)
                picked = job.results(columns=["id"]).column("id").to_pylist()
            t4 = time.perf_counter()
            if len(picked) != size:
                raise RuntimeError(f"{name} round {rnd}: the miner returned {len(picked)} rows, asked {size}")
            batch_idx = ledger.label(picked)
            # picks that repeat an item already labeled, or another pick of the same batch
            # (copies share an origin: only the repeated datasets have them)
            origins = split.origin[batch_idx]
            seen_before = set(split.origin[np.setdiff1d(ledger.labeled_indices(), batch_idx)].tolist())
            redundant.append(int(len(origins) - len(set(origins.tolist()))
                                 + sum(o in seen_before for o in set(origins.tolist()))))
            if cfg.verify:
                on_server = col.count("label IS NOT NULL")
                # the server holds the labels up to the previous round; this round's are sent next round
                if on_server != ledger.n_labeled - size:
                    raise RuntimeError(f"{name}: server has {on_server} labeled rows, ledger {ledger.n_labeled - size}")
            timings["predict_s"].append(t2 - t1)
            timings["upsert_s"].append(t3 - t2)
            timings["mine_s"].append(t4 - t3)
            timings["service_s"].append(t4 - t2)
            timings["round_s"].append(t4 - t0)
            rnd += 1
    finally:
        if not cfg.keep:
            client.drop_collection(name)
    result = {
        "dataset": ds.name, "learner": learner_name, "strategy": strategy.name, "seed": seed,
        "labels": labels_curve, "acc": acc_curve,
        "picks": ledger.rounds,  # pool indices: the initial set, then one list per round
        "pick_ids": [[ids[i] for i in r] for r in ledger.rounds[1:]],
        "pool_size": len(ids), "test_size": len(split.y_test), "repeats": ds.repeats,
        "redundant": redundant, "setup_s": setup_s, "timings": timings, "fallback_rounds": fallback_rounds,
        "initial": len(first_labels),
    }
    if log:
        t90 = labels_to_reach(labels_curve, acc_curve, 0.9)
        svc = float(np.sum(timings["service_s"]))
        log(f"  {ds.name}/{learner_name}/{strategy.name} seed {seed}: 90% at "
            f"{'>' + str(labels_curve[-1]) if math.isinf(t90) else int(t90)} labels, final "
            f"{acc_curve[-1]:.3f} at {labels_curve[-1]}; {rnd} rounds in {float(np.sum(timings['round_s'])):.1f}s "
            f"(service {svc:.1f}s)")
    return result


# -- reporting ---------------------------------------------------------------------------


def _fmt_labels(stat: Mapping[str, float], budget: int) -> str:
    def one(v: float) -> str:
        return f">{budget}" if math.isinf(v) else f"{v:g}"

    if math.isinf(stat["median"]):
        return f">{budget}"
    return f"{one(stat['median'])} ({one(stat['q1'])}–{one(stat['q3'])})"


def _fmt_acc(v: float | None) -> str:
    return "–" if v is None else f"{v:.3f}".lstrip("0")


def _fmt_paired(vs: Mapping[str, Any] | None) -> str:
    if not vs:
        return "–"
    t = vs["aulc"]
    p = "–" if t["p_wilcoxon"] is None else f"{t['p_wilcoxon']:.3f}"
    verdict = paired_verdict(t)
    return (f"{t['median_diff']:+.3f} ({t['wins']}/{t['ties']}/{t['losses']}, p={p}"
            f"{'' if verdict == 'n.s.' else ', ' + verdict})")


def render_tables(summary: Sequence[Mapping[str, Any]], budget: int, checkpoints: Sequence[int] = CHECKPOINTS,
                  targets: Sequence[float] = TARGETS) -> str:
    """A markdown table per (dataset, learner); the last column compares labels to the first
    target with random's (random / strategy, measured in the same run; > 1 = fewer labels)."""
    lines: list[str] = []
    t0 = f"to_{round(targets[0] * 100)}"
    keys = list(dict.fromkeys((r["dataset"], r["learner"]) for r in summary))
    for ds, learner in keys:
        rows = [r for r in summary if r["dataset"] == ds and r["learner"] == learner]
        order = {n: i for i, n in enumerate(STRATEGIES)}
        rows.sort(key=lambda r: order.get(r["strategy"], 99))
        rnd = next((r for r in rows if r["strategy"] == "random"), None)
        counts = sorted({len(r["seeds"]) for r in rows})
        uneven = len(counts) > 1  # a run cut short: say how many seeds each row has
        seeds_text = f"{counts[0]}–{counts[-1]} seeds, column n" if uneven else \
            f"{counts[0]} seed{'s' if counts[0] > 1 else ''}"
        lines.append(f"\n### {ds}, {learner} ({seeds_text})\n")
        copies = any(r.get("repeats", 1) > 1 for r in rows)
        head = ["strategy"] + [f"labels to {round(t * 100)}% (IQR)" for t in targets] + \
               [f"acc@{c}" for c in checkpoints] + ["AULC", f"vs random (labels to {round(targets[0] * 100)}%)",
                                                    "paired vs random: AULC diff (W/T/L, Wilcoxon p)"] + \
               (["copies picked"] if copies else []) + (["n"] if uneven else [])
        lines.append("| " + " | ".join(head) + " |")
        lines.append("|---|" + "---:|" * (len(head) - 1))
        for r in rows:
            ratio = "–"
            if rnd is not None and r["strategy"] != "random":
                a, b = r[t0]["median"], rnd[t0]["median"]
                if math.isinf(a) and math.isinf(b):
                    ratio = "both >budget"
                elif math.isinf(a):
                    ratio = "worse (never)"
                elif math.isinf(b):
                    ratio = f">{budget / a:.2f}×"
                else:
                    ratio = f"{b / a:.2f}×"
            cells = [r["strategy"]] + [_fmt_labels(r[f"to_{round(t * 100)}"], budget) for t in targets] + \
                    [_fmt_acc(r.get(f"acc_{c}")) for c in checkpoints] + [f"{r['aulc']:.3f}".lstrip("0"), ratio,
                                                                         _fmt_paired(r.get("vs_random"))] + \
                    ([f"{r.get('redundant', 0):g}"] if copies else []) + ([str(len(r["seeds"]))] if uneven else [])
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _best(rows: Sequence[Mapping[str, Any]], key: str = "to_90") -> Mapping[str, Any] | None:
    """Fewest median labels to the target, then the higher AULC."""
    if not rows:
        return None
    return min(rows, key=lambda r: (r[key]["median"], -r["aulc"]))


def evaluate_goals(summary: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """The issue's goals, checked on what was run (a goal whose runs are missing is
    reported as not measured)."""
    goals: list[dict[str, Any]] = []

    def rows(ds: str, learner: str | None = None) -> list[Mapping[str, Any]]:
        return [r for r in summary if r["dataset"] == ds and (learner is None or r["learner"] == learner)]

    def lab(r: Mapping[str, Any]) -> str:
        v = r["to_90"]["median"]
        return f"{r['learner']}/{r['strategy']} {'not reached' if math.isinf(v) else f'{v:g}'}"

    digits = [r for r in rows("digits") if r["strategy"] != "random"]
    best = _best(digits)
    if best is None:
        goals.append({"goal": "digits: best strategy reaches 90% with <= 70 labels (median)", "met": None,
                      "detail": "not measured"})
    else:
        goals.append({"goal": "digits: best strategy reaches 90% with <= 70 labels (median)",
                      "met": best["to_90"]["median"] <= 70,
                      "detail": f"best {lab(best)}; " + ", ".join(
                          lab(r) for r in rows("digits") if r["strategy"] in ("random", "margin", "ratio"))})
    rep = {r["strategy"]: r for r in rows("repeated_digits", "mlp")}
    if {"batchbald", "bald", "random"} <= set(rep):
        bb, b, rnd = (rep[k]["to_90"]["median"] for k in ("batchbald", "bald", "random"))
        goals.append({"goal": "repeated digits: BatchBALD needs fewer labels than top-k BALD and than random",
                      "met": bb < b and bb < rnd,
                      "detail": f"labels to 90% (median): batchbald {bb:g}, bald {b:g}, random {rnd:g}; "
                                f"AULC {rep['batchbald']['aulc']:.3f} / {rep['bald']['aulc']:.3f} / "
                                f"{rep['random']['aulc']:.3f}"})
    else:
        goals.append({"goal": "repeated digits: BatchBALD needs fewer labels than top-k BALD and than random",
                      "met": None, "detail": "not measured (needs mlp with batchbald, bald, random)"})
    for ds in dict.fromkeys(r["dataset"] for r in summary):
        hyb = [r for r in rows(ds) if STRATEGIES.get(r["strategy"], Strategy("", "", "")).family == "hybrid"]
        single = [r for r in rows(ds) if STRATEGIES.get(r["strategy"], Strategy("", "", "")).family
                  in ("uncertainty", "bayesian", "diversity")]
        bh, bs = _best(hyb), _best(single)
        if bh is None or bs is None:
            continue
        met = bh["to_90"]["median"] <= bs["to_90"]["median"]
        goals.append({"goal": f"{ds}: a hybrid at least matches the best single strategy (labels to 90%)",
                      "met": met,
                      "detail": f"best hybrid {lab(bh)} (AULC {bh['aulc']:.3f}); best single {lab(bs)} "
                                f"(AULC {bs['aulc']:.3f})"})
    for r in summary:
        vs = r.get("vs_random")
        if r["strategy"] in NEW_STRATEGIES and vs and vs["aulc"]["n"] >= 2:
            t = vs["aulc"]
            verdict = paired_verdict(t)
            goals.append({"goal": f"{r['dataset']}/{r['learner']}/{r['strategy']} beats random (AULC, paired "
                                  f"over {t['n']} seeds, Wilcoxon p < 0.05)",
                          "met": verdict == "better",
                          "detail": f"median AULC difference {t['median_diff']:+.4f}, wins/ties/losses "
                                    f"{t['wins']}/{t['ties']}/{t['losses']}, p = "
                                    f"{'–' if t['p_wilcoxon'] is None else format(t['p_wilcoxon'], '.4f')} "
                                    f"({verdict})", "kind": "paired"})
    for r in summary:
        rnd = next((x for x in rows(r["dataset"], r["learner"]) if x["strategy"] == "random"), None)
        if rnd is None or r["strategy"] == "random":
            continue
        if r["to_90"]["median"] > rnd["to_90"]["median"] or r["aulc"] < rnd["aulc"] - 0.005:
            goals.append({"goal": f"{r['dataset']}/{r['learner']}/{r['strategy']} loses to random", "met": False,
                          "detail": f"labels to 90%: {lab(r)} vs random {rnd['to_90']['median']:g}; AULC "
                                    f"{r['aulc']:.3f} vs {rnd['aulc']:.3f}", "kind": "loses_to_random"})
    return goals


def render_goals(goals: Sequence[Mapping[str, Any]]) -> str:
    out = []
    for g in goals:
        mark = "not measured" if g["met"] is None else ("MET" if g["met"] else "NOT MET")
        if g.get("kind") == "loses_to_random":
            mark = "LOSES TO RANDOM"
        out.append(f"- **{mark}** — {g['goal']}: {g['detail']}")
    return "\n".join(out)


def plot_curves(runs: Sequence[Mapping[str, Any]], out_dir: Path, targets: Sequence[float] = TARGETS,
                strategies: Sequence[str] | None = None) -> list[Path]:
    """One PNG per (dataset, learner): median test accuracy against labels, IQR shaded."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plots (uv sync installs it with the dev group)", file=sys.stderr)
        return []
    paths = []
    keys = list(dict.fromkeys((r["dataset"], r["learner"]) for r in runs))
    for ds, learner in keys:
        group = [r for r in runs if r["dataset"] == ds and r["learner"] == learner]
        names = [s for s in STRATEGIES if any(r["strategy"] == s for r in group)]
        if strategies is not None:
            names = [s for s in names if s in strategies]
        fig, ax = plt.subplots(figsize=(7.5, 4.8), dpi=110)
        cmap = plt.get_cmap("tab20")
        lo = 1.0
        for s in names:
            x, med, q1, q3 = median_curve([r for r in group if r["strategy"] == s])
            colour = cmap(list(STRATEGIES).index(s) % 20)  # one colour per strategy in every plot
            style = {"color": "black", "lw": 2.2, "ls": "--"} if s == "random" else {"color": colour, "lw": 1.6}
            ax.plot(x, med, label=s, **style)
            ax.fill_between(x, q1, q3, color=style["color"], alpha=0.12, lw=0)
            lo = min(lo, float(np.percentile(med, 10)))
        for t in targets:
            ax.axhline(t, color="grey", lw=0.8, ls=":")
        n_seeds = len({r["seed"] for r in group})
        ax.set(xlabel="labels", ylabel="test accuracy", ylim=(max(0.0, lo - 0.02), 1.0),
               title=f"{ds}, {learner}: median over {n_seeds} seeds (IQR shaded)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, ncol=2, loc="lower right")
        fig.tight_layout()
        path = out_dir / f"{ds}-{learner}.png"
        fig.savefig(path)
        plt.close(fig)
        paths.append(path)
    return paths


def machine_info() -> dict[str, Any]:
    import platform

    import sklearn
    import torch

    cpu = ""
    try:
        with open("/proc/cpuinfo") as fh:
            cpu = next((ln.split(":", 1)[1].strip() for ln in fh if ln.startswith("model name")), "")
    except OSError:
        pass
    return {"cpu_count": os.cpu_count(),
            "cpus_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
            "cpu_model": cpu, "platform": platform.platform(), "python": sys.version.split()[0],
            "numpy": np.__version__, "sklearn": sklearn.__version__, "torch": torch.__version__}


def start_text(c: Mapping[str, Any]) -> str:
    if c.get("initial") is not None:
        return (f"{c['initial']} labels drawn at random (cold start; random picks while fewer than two "
                "classes are labeled, for strategies that need a model)")
    return f"{c['initial_per_class']} labels per class"


def render_report(doc: Mapping[str, Any]) -> str:
    m, c = doc["machine"], doc["config"]
    rounds = (f" (median round {np.median([r['round_s'] for r in doc['summary']]) * 1e3:.0f} ms, of which the "
              f"service — upsert + mine + results — {np.median([r['service_s'] for r in doc['summary']]) * 1e3:.0f} ms)"
              if doc["summary"] else "")
    lines = [
        "# assay active-learning simulation",
        "",
        f"- command: `{doc['command']}`",
        f"- runtime: {doc['runtime_s'] / 60:.1f} min for {len(doc['runs'])} runs{rounds}",
        f"- machine: {m['cpu_count']} CPUs ({m['cpus_usable']} usable), {m['cpu_model']}, {m['platform']}; "
        f"python {m['python']}, numpy {m['numpy']}, scikit-learn {m['sklearn']}, torch {m['torch']}",
        f"- protocol: stratified {1 - c['test_size']:.0%}/{c['test_size']:.0%} split per seed, "
        f"{start_text(c)} to start, batches of {c['batch']}, budget {c['budget']}, "
        f"seeds {c['seeds']}; MC-dropout samples {c['mc_samples']}",
        "- datasets: " + "; ".join(f"{k}: {v}" for k, v in doc["datasets"].items()),
        "- learners: logreg = scikit-learn LogisticRegression (C = 1) on the features, embedding space = "
        "the features; mlp = PyTorch d→256→128→C, dropout 0.5, Adam (lr 3e-3) 150 full-batch steps, retrained "
        "from scratch every round; MC-dropout passes feed the Bayesian miners, the 128-d penultimate "
        "layer feeds coreset/BADGE/cluster-margin",
        "- every strategy is an assay miner run through the gRPC client on the unlabeled rows "
        "(`where=\"label IS NULL\"`); the reference figure is random sampling in the same run "
        "(`vs random` = random's median labels to 90% / the strategy's: > 1 means fewer labels)",
        "- labels to X%: first label count whose test accuracy is ≥ X% (median, IQR over seeds; "
        f">{c['budget']}: not reached within the budget); acc@n: accuracy with the largest labeled set ≤ n "
        "(the last point if the pool ran out first); AULC: mean accuracy over the label range (trapezoids)",
        "- paired vs random: per seed (same split, same initial labels) the strategy's AULC minus random's; "
        "median difference, wins/ties/losses, two-sided Wilcoxon signed-rank p (paired t and labels to 90% "
        "in al.json); better/worse at p < 0.05, else not significant",
        "",
        "## goals",
        "",
        render_goals(doc["goals"]),
        "",
        "## label efficiency",
        render_tables(doc["summary"], c["budget"], c.get("checkpoints", CHECKPOINTS)),
        "",
    ]
    if doc.get("failed"):
        lines += ["## failed runs (rerun with --resume)", ""] + [
            f"- {f['dataset']}/{f['learner']}/{f['strategy']} seed {f['seed']}: {f['error']}" for f in doc["failed"]] + [""]
    if doc.get("plots"):
        lines += ["## plots", ""] + [f"- `{p}`" for p in doc["plots"]] + [""]
    return "\n".join(lines)


def _finite(o: Any) -> Any:
    """The document with inf/nan (a target never reached) as null: strict JSON."""
    if isinstance(o, float | np.floating):
        return float(o) if math.isfinite(o) else None
    if isinstance(o, np.integer):
        return int(o)
    if isinstance(o, np.ndarray):
        return _finite(o.tolist())
    if isinstance(o, Mapping):
        return {k: _finite(v) for k, v in o.items()}
    if isinstance(o, list | tuple):
        return [_finite(v) for v in o]
    return o


def _dump(doc: Mapping[str, Any], path: Path) -> None:
    """Written atomically; labels-to-target values that were never reached are null."""
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(_finite(doc), separators=(",", ":"), allow_nan=False))
    tmp.replace(path)


# -- the command ---------------------------------------------------------------------------


@dataclass
class Task:
    dataset: str
    learner: str
    strategy: str
    seed: int


class Runner:
    """A client on ``server``, or on a private in-process server over a temp folder
    (started once, stopped by :meth:`close`)."""

    def __init__(self, server: str | None, token: str | None) -> None:
        from service.client import Client

        self.own: Any = None
        self.tmp: str | None = None
        if server is None:
            import logging

            from service.server import ServerConfig, start_server

            # the private server binds loopback without a token on purpose: no warning
            logging.getLogger("assay").setLevel(logging.ERROR)
            self.tmp = tempfile.mkdtemp(prefix="assay-al-")
            self.own = start_server(ServerConfig(data=self.tmp, host="127.0.0.1", port=0, grace_s=1.0))
            server = self.own.address
        self.client = Client(server, token=token, timeout=120)

    def run(self, t: Task, datasets: Mapping[str, Dataset], cfg: SimConfig) -> dict[str, Any]:
        return simulate(self.client, datasets[t.dataset], t.learner, STRATEGIES[t.strategy], t.seed, cfg,
                        log=lambda s: print(s, flush=True))

    def close(self) -> None:
        self.client.close()
        if self.own is not None:
            self.own.stop()
        if self.tmp is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)


_PROCESS: dict[str, Any] = {}


def run_task(t: Task, datasets: Mapping[str, Dataset], cfg: SimConfig, server: str | None,
             token: str | None) -> dict[str, Any]:
    """One run; without ``server``, on a fresh private server and data folder (so run and
    job records of earlier runs never slow the next one down)."""
    runner = Runner(server, token)
    try:
        return runner.run(t, datasets, cfg)
    finally:
        runner.close()


def _init_process(server: str | None, token: str | None, datasets: dict[str, Dataset], cfg: SimConfig) -> None:
    _PROCESS.update(server=server, token=token, datasets=datasets, cfg=cfg)


def _run_in_process(t: Task) -> dict[str, Any]:
    p = _PROCESS
    return run_task(t, p["datasets"], p["cfg"], p["server"], p["token"])


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.al", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--datasets", default=None,
                   help=f"comma-separated built-ins ({', '.join(BUILTIN_DATASETS)}); '' for none; default all "
                        "of them unless --dataset or --collection is given")
    p.add_argument("--dataset", action="append", default=[], metavar="PATH.npz",
                   help="a user dataset: arrays X, y, optional X_test, y_test (repeatable)")
    p.add_argument("--collection", default=None, metavar="NAME",
                   help="run on an existing collection's vectors and labels (needs --server and --space)")
    p.add_argument("--space", default=None, help="--collection: the embedding space")
    p.add_argument("--label-column", default="label", help="--collection: the label column")
    p.add_argument("--where", default=None, help="--collection: only these rows")
    p.add_argument("--test-where", default=None, help="--collection: these rows are the fixed test set")
    p.add_argument("--learners", default="logreg,mlp",
                   help="logreg, mlp and/or package.module:Class (fit(X, y), predict_proba(X))")
    p.add_argument("--strategies", default="all", help="all, key, new (issue 21's), or a comma-separated list")
    p.add_argument("--plan", default=None, metavar="DS:LEARNER[:STRATEGIES];...",
                   help="run exactly these (dataset, learner, strategies) combinations instead of "
                        "the product of --datasets, --learners and --strategies")
    p.add_argument("--seeds", type=int, default=10, help="seeds 0..N-1")
    p.add_argument("--seed-list", default=None, help="explicit seeds, e.g. 3,7 (overrides --seeds)")
    p.add_argument("--initial-per-class", type=int, default=2)
    p.add_argument("--initial", type=int, default=None, metavar="N",
                   help="cold start: N labels drawn at random to start (0 allowed) instead of per class")
    p.add_argument("--batch", type=int, default=10)
    p.add_argument("--budget", type=int, default=300)
    p.add_argument("--test-size", type=float, default=0.3)
    p.add_argument("--mc-samples", type=int, default=20)
    p.add_argument("--repeats", type=int, default=3, help="repeated_digits: copies of each pool image")
    p.add_argument("--noise", type=float, default=0.1,
                   help="repeated_digits: noise std in units of the pixels' std (Repeated-MNIST: 0.1)")
    p.add_argument("--server", default=None, help="a running server (default: start one in-process)")
    p.add_argument("--token", default=os.environ.get("ASSAY_TOKEN"))
    p.add_argument("--workers", type=int, default=1,
                   help="parallel worker processes, each with its own in-process server (or --server)")
    p.add_argument("--out", type=Path, default=Path("al-results"), help="folder for al.json, al.md, plots")
    p.add_argument("--json", type=Path, default=None, help="results JSON (default OUT/al.json)")
    p.add_argument("--markdown", type=Path, default=None, help="markdown report (default OUT/al.md)")
    p.add_argument("--resume", action="store_true", help="skip runs already in the results JSON")
    p.add_argument("--report-only", action="store_true",
                   help="run nothing: re-render the tables, goals and plots from the results JSON")
    p.add_argument("--no-plots", action="store_true")
    p.add_argument("--quick", action="store_true",
                   help="digits and repeated_digits, key strategies, 3 seeds (a few minutes)")
    args = p.parse_args(argv)
    if args.datasets is None:
        args.datasets = "" if (args.dataset or args.collection) else ",".join(BUILTIN_DATASETS)
    if args.quick:
        args.datasets, args.strategies, args.seeds = "digits,repeated_digits", "key", 3
    if args.collection and not (args.server and args.space):
        p.error("--collection needs --server (the running assay holding it) and --space")
    if args.initial is not None and args.initial < 0:
        p.error("--initial must be >= 0")
    return args


def plan(args: argparse.Namespace, datasets: Mapping[str, Dataset]) -> list[Task]:
    """The runs, seed-major: every (dataset, learner, strategy) for seed 0, then seed 1, ...
    so that a run cut short (``--resume`` continues it) has results for everything."""
    tasks = _plan(args, datasets)
    return sorted(tasks, key=lambda t: (t.seed, list(datasets).index(t.dataset)))  # stable: keeps the rest


def _plan(args: argparse.Namespace, datasets: Mapping[str, Dataset]) -> list[Task]:
    seeds = [int(s) for s in args.seed_list.split(",")] if args.seed_list else list(range(args.seeds))
    learners = [x.strip() for x in args.learners.split(",") if x.strip()]
    bad = [x for x in learners if not is_learner(x)]
    if bad:
        raise SystemExit(f"unknown learners {bad}: use {', '.join(LEARNERS)} or package.module:Class")
    for x in learners:
        if ":" in x:
            try:
                load_learner_class(x)
            except ValueError as exc:
                raise SystemExit(str(exc)) from None
    if args.plan:
        tasks = []
        for ds, lr, spec in parse_plan(args.plan):
            if lr not in LEARNERS:
                raise SystemExit(f"--plan: unknown learner {lr!r}: use {', '.join(LEARNERS)}")
            name = next(k for k, v in datasets.items() if v.source_name == ds)
            tasks += [Task(name, lr, s, seed) for s in resolve_strategies(spec)
                      if applicable(STRATEGIES[s], lr) for seed in seeds]
        return tasks
    strategies = resolve_strategies(args.strategies)
    return [Task(ds, lr, s, seed) for ds in datasets for lr in learners for s in strategies
            if applicable(STRATEGIES[s], lr) for seed in seeds]


def parse_plan(text: str) -> list[tuple[str, str, str]]:
    """``"digits:logreg:random,margin; repeated_digits:mlp:key"`` → (dataset, learner,
    strategies) triples; the strategies default to all."""
    out = []
    for part in text.replace("\n", ";").split(";"):
        if not part.strip():
            continue
        fields = [f.strip() for f in part.strip().split(":")]
        if len(fields) not in (2, 3) or not all(fields):
            raise SystemExit(f"--plan entry {part.strip()!r}: use DATASET:LEARNER[:STRATEGIES]")
        out.append((fields[0], fields[1], fields[2] if len(fields) == 3 else "all"))
    return out


def report_only(args: argparse.Namespace) -> int:
    """Re-render the summary, goals, markdown and plots of an existing results JSON (its
    command, configuration and runs unchanged)."""
    json_path = args.json or args.out / "al.json"
    md_path = args.markdown or args.out / "al.md"
    if not json_path.exists():
        raise SystemExit(f"--report-only: no results at {json_path}")
    doc = json.loads(json_path.read_text())
    runs = doc.get("runs", [])
    checkpoints = doc["config"].get("checkpoints", [c for c in CHECKPOINTS if c <= doc["config"]["budget"]])
    doc["summary"] = summarize_runs(runs, checkpoints=checkpoints) if runs else []
    doc["goals"] = evaluate_goals(doc["summary"]) if runs else []
    if not args.no_plots and runs:
        doc["plots"] = [str(p) for p in plot_curves(runs, args.out)]
    _dump(doc, json_path)
    md_path.write_text(render_report(doc))
    print(render_report(doc))
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.report_only:
        return report_only(args)
    t_start = time.perf_counter()
    names = [d.strip() for d in args.datasets.split(",") if d.strip()]
    if args.plan:
        names = list(dict.fromkeys(ds for ds, _, _ in parse_plan(args.plan)))
    datasets: dict[str, Dataset] = {}
    for n in [*names, *args.dataset]:
        ds = load_dataset(n, repeats=args.repeats, noise=args.noise)
        ds.source_name = n
        datasets[ds.name] = ds
    if args.collection:
        from service.client import Client

        with Client(args.server, token=args.token, timeout=120) as client:
            ds = load_collection(client, args.collection, args.space, label_column=args.label_column,
                                 where=args.where, test_where=args.test_where)
        ds.source_name = args.collection
        datasets[ds.name] = ds
    if not datasets:
        raise SystemExit("no dataset: give --datasets, --dataset PATH.npz or --collection NAME")
    try:
        tasks = plan(args, datasets)
    except ValueError as exc:
        raise SystemExit(str(exc)) from None
    cfg = SimConfig(args.initial_per_class, args.batch, args.budget, args.test_size, args.mc_samples,
                    initial=args.initial)
    args.out.mkdir(parents=True, exist_ok=True)
    json_path = args.json or args.out / "al.json"
    md_path = args.markdown or args.out / "al.md"
    runs: list[dict[str, Any]] = []
    prior_runtime = 0.0
    if args.resume and json_path.exists():
        old = json.loads(json_path.read_text())
        runs = old.get("runs", [])
        prior_runtime = float(old.get("runtime_s", 0.0))
        done = {(r["dataset"], r["learner"], r["strategy"], r["seed"]) for r in runs}
        tasks = [t for t in tasks if (t.dataset, t.learner, t.strategy, t.seed) not in done]
    seeds = sorted({t.seed for t in tasks} | {r["seed"] for r in runs})
    print(f"python -m bench.al: {len(tasks)} runs ({len(runs)} already done) on {', '.join(datasets)}; "
          f"results in {args.out}", flush=True)
    command = "python -m bench.al " + shlex.join(argv if argv is not None else sys.argv[1:])

    order = {n: i for i, n in enumerate(datasets)}
    s_order = {n: i for i, n in enumerate(STRATEGIES)}

    checkpoints = [c for c in CHECKPOINTS if c <= cfg.budget]

    def document(final: bool) -> dict[str, Any]:
        runs.sort(key=lambda r: (order.get(r["dataset"], 99), r["learner"], s_order.get(r["strategy"], 99),
                                 r["seed"]))
        summary = summarize_runs(runs, checkpoints=checkpoints) if runs else []
        return {"command": command.strip(), "machine": machine_info(),
                "config": {**asdict(cfg), "seeds": seeds, "checkpoints": checkpoints, "learners": args.learners,
                           "strategies": args.strategies, "repeats": args.repeats, "noise": args.noise},
                "datasets": {k: v.source for k, v in datasets.items()},
                "strategies": {k: {"miner": s.miner, "prefilter": s.prefilter, "family": s.family, "params": s.params(cfg.batch),
                                   "reference": s.reference, "note": s.note} for k, s in STRATEGIES.items()},
                "runtime_s": prior_runtime + time.perf_counter() - t_start, "complete": final,
                "summary": summary, "goals": evaluate_goals(summary) if summary else [], "runs": runs}

    def checkpoint(r: dict[str, Any]) -> None:
        runs.append(stored(r))
        _dump(document(False), json_path)

    failed: list[dict[str, Any]] = []

    def failure(t: Task, exc: BaseException) -> None:
        # one failed run (a deadline on an overloaded machine, a server error) is reported
        # and left for --resume; it does not throw away the runs still in flight
        failed.append({**asdict(t), "error": f"{type(exc).__name__}: {exc}"})
        print(f"  FAILED {t.dataset}/{t.learner}/{t.strategy} seed {t.seed}: {type(exc).__name__}: {exc}",
              file=sys.stderr, flush=True)

    if args.workers <= 1:
        for t in tasks:
            try:
                checkpoint(run_task(t, datasets, cfg, args.server, args.token))
            except Exception as exc:
                failure(t, exc)
    elif tasks:
        import multiprocessing as mp
        from concurrent.futures import ProcessPoolExecutor, as_completed

        ctx = mp.get_context("spawn")  # never fork after LanceDB is loaded
        with ProcessPoolExecutor(args.workers, mp_context=ctx, initializer=_init_process,
                                 initargs=(args.server, args.token, datasets, cfg)) as pool:
            futures = {pool.submit(_run_in_process, t): t for t in tasks}
            for fut in as_completed(futures):
                try:
                    checkpoint(fut.result())
                except Exception as exc:
                    failure(futures[fut], exc)
    doc = document(not failed)
    doc["failed"] = failed
    if not args.no_plots and runs:
        doc["plots"] = [str(p) for p in plot_curves(runs, args.out)]
    _dump(doc, json_path)
    md_path.write_text(render_report(doc))
    print(render_report(doc))
    print(f"wrote {json_path} and {md_path} ({doc['runtime_s'] / 60:.1f} min)")
    if failed:
        print(f"{len(failed)} run(s) failed (listed under 'failed' in {json_path}); rerun with --resume",
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
