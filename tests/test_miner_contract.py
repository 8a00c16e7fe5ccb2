"""The miner contract, checked for every registered miner (as scikit-learn's
``parametrize_with_checks`` does for estimators): a miner added with one ``register()`` is
picked up here without a change.

Each miner runs on one small real LanceDB collection that holds every input kind — a
model's probs, logits, samples, boxes (with per-object embeddings), loss and epoch_logits,
a segmentation model's per-image summaries, an embedding space, labels, ground-truth boxes
and a reference split — through ``validate_request`` + ``run_mining``, as the server runs
it. A miner that needs parameters without usable defaults to run at all (seeds, stages)
names them in ``NEEDS`` below.
"""

from __future__ import annotations

import json
import re
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from indexing import analytics, measures
from indexing.errors import InvalidArgument
from indexing.store import Store
from miners import edge, registry
from miners.inputs import INPUTS
from miners.registry import COMMON_PARAMS, RESERVED_PARAMS, MinerSpec, Param, register
from miners.runner import run_mining, validate_request
from miners.runs import RunSpec

ROOT = Path(__file__).resolve().parents[1]
CLASSES = ["a", "b", "c"]
N, DIM, K, EPOCHS = 60, 4, 4, 3
BOX_DIM = 2
SIZE = 5
IDS = [f"r{i:03d}" for i in range(N)]
REFERENCE = "split = 'train'"
#: What a miner needs beyond its defaults to run on the fixture (required seeds, stages) or
#: to return anything from it.
NEEDS: dict[str, dict] = {
    "knn": {"seed_ids": ["r003", "r041"]},
    "chain": {"stages": [{"miner": "margin", "size": 20}, {"miner": "coreset"}]},
    # the fixture has one near-duplicate pair, inside a split and unlabeled, and no exact
    # duplicate: ask for every pair, and for the keep list
    "duplicate_leaks": {"report": "all"},
    "exact_duplicates": {"output": "keep"},
}
MINERS = sorted(registry.REGISTRY)
#: Miners that read the segmentation model "s" instead of the classifier "m".
MODEL_OF = {"segmentation": "s"}


def _rows() -> list[dict]:
    rng = np.random.default_rng(18)
    probs = rng.dirichlet(np.full(len(CLASSES), 0.8), N)
    logits = rng.normal(0, 2, (N, len(CLASSES)))
    samples = rng.dirichlet(np.full(len(CLASSES), 0.8), (N, K))
    epoch_logits = rng.normal(0, 2, (N, EPOCHS, len(CLASSES)))
    vectors = rng.normal(0, 1, (N, DIM))
    vectors[-1] = vectors[-2] + 1e-4  # a near-duplicate pair
    box_rng = np.random.default_rng(19)  # its own stream: the other inputs stay as they were
    seg_rng = np.random.default_rng(20)  # its own stream too
    seg_mean = seg_rng.uniform(0, 0.6, N)
    rows = []
    for i in range(N):
        boxes = [{"x1": float(10 * b), "y1": 0.0, "x2": float(10 * b + 8), "y2": 8.0,
                  "score": float(rng.uniform(0.3, 1.0)), "probs": rng.dirichlet(np.ones(len(CLASSES))).tolist()}
                 for b in range(1 + i % 3)]
        for box in boxes:
            box["embedding"] = box_rng.normal(0, 1, BOX_DIM).tolist()
        pred = {"logits": logits[i].tolist(), "samples": samples[i].tolist(), "boxes": boxes,
                "loss": float(rng.uniform(0, 3)), "epoch_logits": epoch_logits[i].tolist()}
        if i % 5:  # every fifth row has logits only: probs = softmax(logits)
            pred["probs"] = probs[i].tolist()
        seg = {"mean_entropy": float(seg_mean[i]), "topq_entropy": float(seg_mean[i] + seg_rng.uniform(0, 0.4)),
               "class_uncertain_fraction": seg_rng.uniform(0, 1, len(CLASSES)).tolist(),
               "bald": float(seg_rng.uniform(0, 0.5))}
        row = {"id": IDS[i], "split": "train" if i < 15 else "pool",
               "label": CLASSES[i % 3] if i < 30 else None, "emb_v": vectors[i].tolist(), "pred_m": pred,
               "pred_s": seg}
        if i < 15:  # the reference split holds ground-truth boxes
            row["gt_boxes"] = [{"x1": 0.0, "y1": 0.0, "x2": 8.0, "y2": 8.0, "label": CLASSES[(i + b) % 3]}
                               for b in range(1 + i % 2)]
        rows.append(row)
    return rows


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    # no background maintenance: a compaction would change the version the checks compare
    store = Store(str(tmp_path_factory.mktemp("contract")), optimize_every=0)
    col = store.create_collection("c", spaces={"v": {"dim": DIM, "metric": "l2"}},
                                  models={"m": {"classes": CLASSES, "task": "detection", "box_embedding_dim": BOX_DIM},
                                          "s": {"classes": CLASSES, "task": "segmentation"}})
    col.upsert(_rows())
    return store, store.collection("c")


def _request(spec: MinerSpec, **params) -> RunSpec:
    return RunSpec(collection="c", miner=spec.name, size=SIZE, model=MODEL_OF.get(spec.name, "m"), space="v", seed=7,
                   reference_where=REFERENCE if spec.reference != "none" else "",
                   params={**NEEDS.get(spec.name, {}), **params})


def _record(col, spec: MinerSpec, **params) -> RunSpec:
    _, validated = validate_request(col, _request(spec, **params))
    return replace(_request(spec), params=validated, version=col.version, run_id=f"contract-{spec.name}")


def _state(store: Store, col) -> tuple:
    """What a failed or refused run must leave as it was: the collection's version and the
    tables under the data root."""
    return col.table.version, sorted(store._db.table_names())


# -- describe, validate ------------------------------------------------------------------------


@pytest.mark.parametrize("name", MINERS)
def test_describe_lists_each_parameter_once(name):
    spec = registry.get(name)
    info = json.loads(json.dumps(spec.describe()))  # what ListMiners and `assay miners` show
    names = [p["name"] for p in info["params"]]
    assert info["name"] == name and info["description"] and info["family"]
    assert len(names) == len(set(names)), names
    assert names == [p.name for p in spec.params]
    assert info["inputs"] and set(info["inputs"]) <= set(INPUTS)
    if spec.takes_common:
        assert {p.name for p in COMMON_PARAMS} <= set(names)


@pytest.mark.parametrize("name", MINERS)
def test_validating_nothing_gives_the_defaults(name):
    spec = registry.get(name)
    assert spec.validate({}) == {p.name: p.default for p in spec.params}
    own = {p.name for p in spec.own_params}
    assert not own & ({p.name for p in COMMON_PARAMS} | RESERVED_PARAMS)


# -- runs on the fixture, deterministically ---------------------------------------------------


@pytest.mark.parametrize("name", MINERS)
def test_runs_on_every_input_kind_and_is_deterministic(env, name):
    store, col = env
    spec = registry.get(name)
    before = _state(store, col)
    rec = _record(col, spec)
    first, second = run_mining(col, rec), run_mining(col, rec)
    assert 1 <= len(first.ids) <= SIZE and len(set(first.ids)) == len(first.ids)
    assert set(first.ids) <= set(IDS)
    assert len(first.scores) == len(first.ids) and np.isfinite(first.scores).all()
    assert first.rows_scanned > 0
    assert first.ids == second.ids
    np.testing.assert_array_equal(first.scores, second.scores)
    if spec.takes_common:  # sampled instead of the top scores: still a function of the seed
        sampled = _record(col, spec, stochastic="softmax", temperature=0.5)
        assert run_mining(col, sampled).ids == run_mining(col, sampled).ids
    assert _state(store, col) == before  # mining reads; it never writes the collection


@pytest.mark.parametrize("name", MINERS)
def test_a_cancelled_run_stops_and_writes_nothing(env, name):
    store, col = env
    spec = registry.get(name)
    before = _state(store, col)
    rec = _record(col, spec)

    class Stop(Exception):
        pass

    def stop() -> None:
        raise Stop

    with pytest.raises(Stop):
        run_mining(col, rec, check=stop)
    assert _state(store, col) == before


# -- refuses bad parameters, naming them -------------------------------------------------------


@pytest.mark.parametrize("name", MINERS)
def test_refuses_an_unknown_parameter_and_a_bad_size(env, name):
    store, col = env
    spec = registry.get(name)
    before = _state(store, col)
    with pytest.raises(InvalidArgument, match="no_such_param"):
        validate_request(col, _request(spec, no_such_param=1))
    with pytest.raises(InvalidArgument, match="size"):
        validate_request(col, replace(_request(spec), size=0))
    assert _state(store, col) == before


def _bad_value(p: Param) -> object:
    """A value outside the parameter's range (or of the wrong type where it has none)."""
    if p.kind in ("int", "float"):
        if p.max is not None:
            return p.max * 10 + 1
        if p.min is not None:
            return p.min - 1
        return "not a number"
    if p.kind == "choice":
        return "no-such-choice"
    if p.kind == "bool":
        return "yes"
    return 12345  # json: a number where a structure is expected


PARAMS = [(name, p.name) for name in MINERS for p in registry.get(name).params
          if p.kind != "json" or p.check is not None]


@pytest.mark.parametrize(("name", "param"), PARAMS, ids=[f"{n}-{p}" for n, p in PARAMS])
def test_refuses_an_out_of_range_value_naming_the_parameter(env, name, param):
    store, col = env
    spec = registry.get(name)
    before = _state(store, col)
    with pytest.raises(InvalidArgument, match=f"'{param}'"):
        validate_request(col, _request(spec, **{param: _bad_value(spec.param_index[param])}))
    assert _state(store, col) == before


def test_every_miner_with_parameters_is_covered():
    covered = {name for name, _ in PARAMS}
    assert covered == {name for name in MINERS if registry.get(name).params}


# -- registration refuses what would break the contract ----------------------------------------


def _spec(name: str = "contract_probe", **kw) -> MinerSpec:
    base = dict(family="test", description="probe", inputs=("probs",),
                score=lambda a, p: measures.margin_scores(a["probs"], validate=False))
    return MinerSpec(name, **{**base, **kw})


@pytest.mark.parametrize(("kw", "needle"), [
    (dict(params=(Param("temperature", "float", 2.0, "mine"),)), "temperature"),
    (dict(params=(Param("balance", "choice", "x", "mine", choices=("x",)),), supports_common=False), "balance"),
    (dict(params=(Param("seed", "int", 1, "mine"),)), "seed"),
    (dict(params=(Param("k", "int", 1, "a"), Param("k", "int", 2, "b"))), "declared twice"),
    (dict(params=(Param("k", "int", 0, "k", min=1, max=9),)), "default of parameter 'k'"),
    (dict(inputs=("telepathy",)), "unknown input"),
    (dict(inputs=("vectors", "pool_graph")), "gather=True"),
    (dict(score=None), "needs score"),
    (dict(name="margin"), "already registered"),
])
def test_register_refuses_a_broken_spec(kw, needle):
    before = dict(registry.REGISTRY)
    with pytest.raises(ValueError, match=needle):
        register(_spec(**kw))
    assert before == registry.REGISTRY


def test_a_own_parameter_named_like_a_shared_one_was_silently_overridden_before():
    """The bug this guards: a miner's own ``temperature`` was replaced by the shared one
    (validate({}) gave the shared default, describe() listed it twice)."""
    with pytest.raises(ValueError, match="temperature"):
        register(_spec(params=(Param("temperature", "float", 2.0, "my own temperature"),)))
    assert "contract_probe" not in registry.REGISTRY


# -- one list of scores: registry, measures, edge, analytics, README ---------------------------


def test_score_lists_come_from_the_measures():
    prob, sample = tuple(measures.PROB_MEASURES), tuple(measures.SAMPLE_MEASURES)
    assert prob == edge.PROB_SCORES and sample == edge.SAMPLE_SCORES
    assert set(analytics.MEASURES) == set(prob)
    for name in (*prob, *sample):
        spec = registry.get(name)
        assert spec.description == measures.MEASURES[name].help
        assert spec.inputs == (measures.MEASURES[name].reads,)
    assert set(measures.LOGIT_MEASURES) <= set(edge.SCORE_NAMES)


def _readme_miners() -> set[str]:
    text = (ROOT / "README.md").read_text()
    section = text.split("## Mining: what to label next", 1)[1].split("\n## ", 1)[0]
    names: set[str] = set()
    for line in section.splitlines():
        if line.startswith("| `"):
            names.update(re.findall(r"`(\w+)`", line.split("|")[1]))
    return names


def test_the_readme_lists_every_registered_miner():
    listed = _readme_miners()
    assert set(MINERS) - listed == set(), "add them to the miner tables of README.md"
    assert listed - set(MINERS) == set(), "the README lists miners that are not registered"
