"""Uncertainty, Bayesian/committee, BatchBALD and stochastic-acquisition miners (arrays only)."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest

from miners.bayesian import (
    bald_scores,
    batchbald_select,
    consensus_entropy_scores,
    kl_to_consensus_scores,
    mean_entropy_scores,
    variance_scores,
    vote_entropy_scores,
)
from miners.stochastic import gumbel_noise, stochastic_scores
from miners.uncertainty import (
    entropy_scores,
    least_confidence_scores,
    margin_scores,
    ratio_scores,
    softmax,
    validate_probs,
)

# ----------------------------------------------------------------- definitions, row by row


def _h(p) -> float:
    """Entropy in nats, written out: -sum p log p over p > 0."""
    return -sum(float(x) * math.log(float(x)) for x in p if x > 0)


def _dirichlet(n: int, c: int, seed: int, alpha: float = 0.7) -> np.ndarray:
    return np.random.default_rng(seed).dirichlet(np.full(c, alpha), size=n)


def _dirichlet_samples(n: int, k: int, c: int, seed: int, alpha: float = 0.7) -> np.ndarray:
    return np.random.default_rng(seed).dirichlet(np.full(c, alpha), size=(n, k))


def _def_scores(p: np.ndarray) -> dict[str, np.ndarray]:
    out: dict[str, list[float]] = {"lc": [], "margin": [], "ratio": [], "entropy": []}
    c = p.shape[1]
    for row in p:
        srt = sorted((float(x) for x in row), reverse=True)
        out["lc"].append(1.0 - srt[0])
        out["margin"].append(1.0 - (srt[0] - srt[1]))
        out["ratio"].append(srt[1] / srt[0])
        out["entropy"].append(_h(row) / math.log(c))
    return {k: np.array(v) for k, v in out.items()}


def _def_bayes(s: np.ndarray) -> dict[str, np.ndarray]:
    n, k, c = s.shape
    out: dict[str, list[float]] = {m: [] for m in ("me", "var", "bald", "vote", "cons", "kl")}
    for i in range(n):
        members = [s[i, j] for j in range(k)]
        mean = [sum(float(m[cc]) for m in members) / k for cc in range(c)]
        ent = [_h(m) for m in members]
        out["me"].append(sum(ent) / k / math.log(c))
        var = []
        for cc in range(c):
            mu = mean[cc]
            var.append(sum((float(m[cc]) - mu) ** 2 for m in members) / k)
        out["var"].append(sum(var) / c)
        out["bald"].append(_h(mean) - sum(ent) / k)
        votes = [0] * c
        for m in members:
            votes[int(np.argmax(m))] += 1
        out["vote"].append(_h([v / k for v in votes]) / math.log(c))
        out["cons"].append(_h(mean) / math.log(c))
        kl = 0.0
        for m in members:
            kl += sum(float(m[cc]) * math.log(float(m[cc]) / mean[cc])
                      for cc in range(c) if m[cc] > 0)
        out["kl"].append(kl / k)
    return {key: np.array(v) for key, v in out.items()}


# ----------------------------------------------------------------- single-model scores


@pytest.mark.parametrize("c", [2, 3, 10])
def test_scores_match_definitions(c):
    p = _dirichlet(200, c, seed=c)
    ref = _def_scores(p)
    np.testing.assert_allclose(least_confidence_scores(p), ref["lc"], rtol=0, atol=1e-12)
    np.testing.assert_allclose(margin_scores(p), ref["margin"], rtol=0, atol=1e-12)
    np.testing.assert_allclose(ratio_scores(p), ref["ratio"], rtol=0, atol=1e-12)
    np.testing.assert_allclose(entropy_scores(p), ref["entropy"], rtol=0, atol=1e-12)
    for f in (least_confidence_scores, margin_scores, ratio_scores, entropy_scores):
        out = f(p.astype(np.float32))
        assert out.dtype == np.float64 and out.shape == (200,)


@pytest.mark.parametrize("c", [2, 5])
def test_uniform_and_one_hot(c):
    uni = np.full((3, c), 1.0 / c)
    np.testing.assert_allclose(entropy_scores(uni), 1.0, atol=1e-12)
    np.testing.assert_allclose(least_confidence_scores(uni), 1 - 1 / c, atol=1e-12)
    np.testing.assert_allclose(margin_scores(uni), 1.0, atol=1e-12)
    np.testing.assert_allclose(ratio_scores(uni), 1.0, atol=1e-12)
    hot = np.eye(c)
    np.testing.assert_array_equal(entropy_scores(hot), 0.0)
    np.testing.assert_array_equal(least_confidence_scores(hot), 0.0)
    np.testing.assert_array_equal(margin_scores(hot), 0.0)
    np.testing.assert_array_equal(ratio_scores(hot), 0.0)


def test_higher_is_less_confident():
    p = np.array([[0.9, 0.05, 0.05], [0.5, 0.4, 0.1], [0.34, 0.33, 0.33]])
    for f in (least_confidence_scores, margin_scores, ratio_scores, entropy_scores):
        s = f(p)
        assert s[0] < s[1] < s[2], f.__name__


def test_softmax():
    rng = np.random.default_rng(0)
    z = rng.normal(size=(50, 7)) * 10
    p = softmax(z)
    ref = np.exp(z) / np.exp(z).sum(axis=1, keepdims=True)
    np.testing.assert_allclose(p, ref, rtol=1e-12)
    np.testing.assert_allclose(softmax(z, temperature=2.0), softmax(z / 2.0), rtol=1e-12)
    big = np.array([[1000.0, 1000.0, -1000.0]])  # overflow-safe
    np.testing.assert_allclose(softmax(big), [[0.5, 0.5, 0.0]], atol=1e-12)
    assert softmax(rng.normal(size=(4, 3, 5))).shape == (4, 3, 5)
    for bad_t in (0, -1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="temperature"):
            softmax(z, temperature=bad_t)
    with pytest.raises(ValueError, match="NaN"):
        softmax(np.array([[0.0, np.nan]]))
    np.testing.assert_array_equal(z, z.copy())  # input untouched


# ----------------------------------------------------------------- Bayesian / committee


@pytest.mark.parametrize("k,c", [(1, 2), (5, 3), (8, 10)])
def test_bayesian_scores_match_definitions(k, c):
    s = _dirichlet_samples(60, k, c, seed=10 * k + c)
    ref = _def_bayes(s)
    np.testing.assert_allclose(mean_entropy_scores(s), ref["me"], atol=1e-12)
    np.testing.assert_allclose(variance_scores(s), ref["var"], atol=1e-12)
    np.testing.assert_allclose(bald_scores(s), np.maximum(ref["bald"], 0), atol=1e-12)
    np.testing.assert_allclose(vote_entropy_scores(s), ref["vote"], atol=1e-12)
    np.testing.assert_allclose(consensus_entropy_scores(s), ref["cons"], atol=1e-12)
    np.testing.assert_allclose(kl_to_consensus_scores(s), np.maximum(ref["kl"], 0), atol=1e-12)


def test_bald_hand_checked():
    s = _dirichlet_samples(300, 6, 4, seed=3, alpha=0.3)
    assert (bald_scores(s) >= 0).all()
    same = np.repeat(_dirichlet(20, 4, seed=4)[:, None, :], 5, axis=1)
    np.testing.assert_array_equal(bald_scores(same), 0.0)
    np.testing.assert_array_equal(kl_to_consensus_scores(same), 0.0)
    np.testing.assert_allclose(variance_scores(same), 0.0, atol=1e-30)
    # epistemic: members certain but disagreeing; mean uniform
    flip = np.array([[[1.0, 0.0], [0.0, 1.0]]])
    np.testing.assert_allclose(bald_scores(flip), [math.log(2)], atol=1e-15)
    np.testing.assert_allclose(mean_entropy_scores(flip), [0.0], atol=1e-15)
    np.testing.assert_allclose(consensus_entropy_scores(flip), [1.0], atol=1e-15)
    np.testing.assert_allclose(vote_entropy_scores(flip), [1.0], atol=1e-15)
    np.testing.assert_allclose(kl_to_consensus_scores(flip), [math.log(2)], atol=1e-15)
    np.testing.assert_allclose(variance_scores(flip), [0.25], atol=1e-15)
    # aleatoric: every member uniform -> no mutual information
    uni = np.full((1, 4, 3), 1 / 3)
    np.testing.assert_allclose(bald_scores(uni), [0.0], atol=1e-15)
    np.testing.assert_allclose(mean_entropy_scores(uni), [1.0], atol=1e-12)


def test_vote_entropy_agreement():
    # members differ in confidence but all vote class 1
    s = np.array([[[0.2, 0.7, 0.1], [0.1, 0.5, 0.4], [0.0, 1.0, 0.0]]])
    np.testing.assert_array_equal(vote_entropy_scores(s), [0.0])
    assert consensus_entropy_scores(s)[0] > 0
    # 2 members vs 1 over C=3
    s2 = np.array([[[1, 0, 0], [1, 0, 0], [0, 0, 1]]], dtype=float)
    expected = _h([2 / 3, 1 / 3]) / math.log(3)
    np.testing.assert_allclose(vote_entropy_scores(s2), [expected], atol=1e-15)


# ----------------------------------------------------------------- BatchBALD


def _reference_batchbald(samples: np.ndarray, b: int) -> tuple[list[int], list[float]]:
    """The published greedy algorithm, literally, exact joint only (Kirsch et al. 2019, Alg. 1).

    For every candidate n not yet picked, enumerate every configuration y_{1:t}, y_n of the
    labels of the picked points and n; p(y) = (1/K) sum_k prod_i p(y_i | w_k);
    a = -sum_y p(y) log p(y) - sum_{i in picked + n} (1/K) sum_k H(p(. | x_i, w_k)).
    Pick the candidate with the largest a (ties: lowest index).
    """
    n, k, c = samples.shape
    cond = [sum(_h(samples[i, j]) for j in range(k)) / k for i in range(n)]
    picked: list[int] = []
    gains: list[float] = []
    prev = 0.0
    for _ in range(b):
        best, best_a = -1, -math.inf
        for cand in range(n):
            if cand in picked:
                continue
            pts = [*picked, cand]
            joint_h = 0.0
            for y in itertools.product(range(c), repeat=len(pts)):
                py = 0.0
                for j in range(k):
                    prod = 1.0
                    for i, yi in zip(pts, y, strict=True):
                        prod *= samples[i, j, yi]
                    py += prod
                py /= k
                if py > 0:
                    joint_h -= py * math.log(py)
            a = joint_h - sum(cond[i] for i in pts)
            if a > best_a:
                best, best_a = cand, a
        picked.append(best)
        gains.append(best_a - prev)
        prev = best_a
    return picked, gains


def test_batchbald_batch_one_is_bald_argmax():
    s = _dirichlet_samples(300, 10, 5, seed=11, alpha=0.4)
    idx, g = batchbald_select(s, 1)
    assert idx.tolist() == [int(np.argmax(bald_scores(s)))]
    np.testing.assert_allclose(g, [bald_scores(s).max()], atol=1e-12)
    idx_f, _ = batchbald_select(s, 1, prune=False)
    assert idx_f.tolist() == idx.tolist()


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_batchbald_matches_reference(seed):
    s = _dirichlet_samples(40, 8, 3, seed=100 + seed, alpha=0.5)
    ref_idx, ref_gain = _reference_batchbald(s, 4)
    for prune in (False, True):
        idx, gain = batchbald_select(s, 4, prune=prune)
        assert idx.tolist() == ref_idx, prune
        np.testing.assert_allclose(gain, ref_gain, atol=1e-10)
    # tiny chunks (one candidate at a time) give the same answer
    idx, gain = batchbald_select(s, 4, max_chunk_bytes=1)
    assert idx.tolist() == ref_idx
    np.testing.assert_allclose(gain, ref_gain, atol=1e-10)
    # gains shrink (submodularity) and stay >= 0
    assert (np.diff(gain) <= 1e-12).all() and (gain >= -1e-12).all()


def _repeated_pool(seed: int = 5) -> tuple[np.ndarray, int]:
    """Repeated-MNIST in miniature: 10 distinct informative items x 3 copies, plus fillers.

    K = 2^10 model samples; informative item j says "class = bit j of k" with confidence
    a_j in [0.9, 0.97], so the items carry independent information about w (fresh item
    gain = its BALD, 0.37..0.56 nats) while a second copy of a picked item adds at most
    0.15 nats. BALD differs per item, so top-10 BALD takes the best items' copies.
    60 fillers: members agree up to a small jitter (BALD ~ 0).
    """
    rng = np.random.default_rng(seed)
    k = 1024
    bits = (np.arange(k)[None, :] >> np.arange(10)[:, None]) & 1  # (10, K)
    conf = np.linspace(0.97, 0.9, 10)[:, None]
    p1 = np.where(bits == 1, conf, 1 - conf)
    informative = np.stack([1 - p1, p1], axis=2)  # (10, K, 2)
    base = rng.uniform(0.2, 0.8, size=(60, 1))
    q1 = np.clip(base + rng.normal(0, 0.01, size=(60, k)), 0, 1)
    filler = np.stack([1 - q1, q1], axis=2)
    pool = np.concatenate([informative, informative, informative, filler])
    return pool, 10


def _copies_ok(idx) -> bool:
    originals = [i % 10 if i < 30 else 1000 + i for i in idx]
    return len(set(originals)) == len(originals)


def test_batchbald_avoids_duplicates_where_topk_bald_does_not():
    pool, b = _repeated_pool()
    topk = np.argsort(-bald_scores(pool), kind="stable")[:b]
    assert not _copies_ok(topk)  # top-k BALD takes copies of the same item
    for prune in (False, True):
        idx, gain = batchbald_select(pool, b, prune=prune)
        assert len(set(idx.tolist())) == b
        assert _copies_ok(idx.tolist()), (prune, idx)


def test_batchbald_sampled_regime():
    pool, b = _repeated_pool(seed=6)
    kw = {"num_configs": 4096, "exact_max_configs": 8, "seed": 7}  # C=2: sampled from t=4
    idx, gain = batchbald_select(pool, b, **kw)
    assert _copies_ok(idx.tolist()), idx
    idx2, gain2 = batchbald_select(pool, b, **kw)
    np.testing.assert_array_equal(idx, idx2)
    np.testing.assert_array_equal(gain, gain2)
    # exact part (first 3 picks) is the same as the all-exact run
    exact_idx, _ = batchbald_select(pool, b)
    assert idx[:3].tolist() == exact_idx[:3].tolist()
    idx_f, gain_f = batchbald_select(pool, b, prune=False, **kw)  # pruning is exact
    np.testing.assert_array_equal(idx_f, idx)
    np.testing.assert_allclose(gain_f, gain, atol=1e-12)
    idx3, _ = batchbald_select(pool, b, **{**kw, "seed": 8})
    assert _copies_ok(idx3.tolist())


@pytest.mark.parametrize("seed", [0, 1])
def test_batchbald_pruning_is_exact(seed):
    s = _dirichlet_samples(400, 16, 4, seed=40 + seed, alpha=0.4)
    for kw in ({}, {"exact_max_configs": 16, "num_configs": 512, "seed": seed}):
        idx, gain = batchbald_select(s, 6, **kw)
        idx_f, gain_f = batchbald_select(s, 6, prune=False, **kw)
        np.testing.assert_array_equal(idx, idx_f)
        np.testing.assert_allclose(gain, gain_f, atol=1e-12)


@pytest.mark.parametrize("exact", [True, False])
def test_batchbald_pairwise_kl_bound_is_valid(exact):
    from miners.bayesian import (
        _conditional_entropies,
        _Joint,
        _PairwiseKLBound,
        _sample_joint_configs,
    )
    from miners.uncertainty import entropy_nats

    p = _dirichlet_samples(300, 8, 4, seed=21, alpha=0.3)
    p[:5, :, 0] = 0.0  # exact zeros (infinite pairwise KL) must not break the bound
    p /= p.sum(axis=2, keepdims=True)
    cond_k = entropy_nats(p)
    picked = [0, 7, 9]
    if exact:
        joint = _Joint(np.ones((1, 8)), exact=True)
        for i in picked:
            joint = joint.extended(p[i])
    else:
        joint = _Joint(_sample_joint_configs(p[picked], 64, np.random.default_rng(0)), False)
    gain = _conditional_entropies(p, joint, np.arange(300), 1 << 20) - cond_k.mean(axis=1)
    bound = _PairwiseKLBound(p, cond_k)(joint, np.arange(300))
    assert (bound >= gain - 1e-10).all()
    if exact:
        assert (gain <= _bald_reference(p) + 1e-10).all()  # submodularity: below BALD
    assert (bound < gain + 0.5).mean() > 0.2  # and not vacuous


def _bald_reference(p: np.ndarray) -> np.ndarray:
    return np.array([_h(p[i].mean(axis=0)) - np.mean([_h(r) for r in p[i]])
                     for i in range(len(p))])


def test_batchbald_edge_cases():
    s = _dirichlet_samples(5, 3, 2, seed=1)
    idx, gain = batchbald_select(s, 0)
    assert idx.shape == (0,) and gain.shape == (0,)
    idx, _ = batchbald_select(s, 5)
    assert sorted(idx.tolist()) == list(range(5))
    with pytest.raises(ValueError, match="exceeds"):
        batchbald_select(s, 6)
    with pytest.raises(ValueError, match="batch_size"):
        batchbald_select(s, -1)
    with pytest.raises(ValueError, match="integer"):
        batchbald_select(s, 2.5)
    with pytest.raises(ValueError, match=r"\(N, K, C\)"):
        batchbald_select(s[:, 0], 2)


# ----------------------------------------------------------------- BatchBALD at scale


def _near_uniform_samples(n: int, k: int, c: int, seed: int) -> np.ndarray:
    """High-entropy samples (weights U(0.5, 1.5), normalised): every pick multiplies the
    sampled joint likelihoods by ~1/C, so they underflow float64 after ~300 picks at C=10."""
    s = np.random.default_rng(seed).uniform(0.5, 1.5, size=(n, k, c))
    return s / s.sum(axis=2, keepdims=True)


def _mc_pool(n: int, k: int, c: int, seed: int) -> np.ndarray:
    """MC-dropout-like samples: softmax of a per-item base logit plus per-sample noise."""
    rng = np.random.default_rng(seed)
    logits = rng.normal(size=(n, 1, c)) * 2.0 + rng.uniform(0.2, 2.5, (n, 1, 1)) * rng.normal(size=(n, k, c))
    p = np.exp(logits - logits.max(axis=2, keepdims=True))
    return p / p.sum(axis=2, keepdims=True)


def test_batchbald_sampled_joint_stays_finite_over_a_thousand_picks():
    """Root cause of the scale failure: the sampled joint p(y_S | w_k) of 1000 picks is a
    product of 1000 probabilities (0 in float64). The rows are now kept in log space and
    renormalised; the estimate must equal the definition computed independently: the
    posterior over the samples by scipy's softmax of the summed log-likelihoods, then
    (1/M) sum_m H(sum_k pi_mk p_nk) - E_k H(p_nk)."""
    from scipy.special import softmax as sp_softmax

    from miners.bayesian import (
        _conditional_entropies,
        _Joint,
        _PairwiseKLBound,
        _sample_joint_configs,
    )
    from miners.uncertainty import entropy_nats

    k, c, t, m = 8, 10, 1000, 64
    p = _mc_pool(t + 30, k, c, seed=3)
    picked = p[:t]
    pt = _sample_joint_configs(picked, m, np.random.default_rng(5))
    assert np.isfinite(pt).all() and np.allclose(pt.max(axis=1), 1.0)
    # the same configurations, drawn independently: inverse CDF by searchsorted
    u = np.random.default_rng(5).random((t, k, m // k))
    loglik = np.zeros((k, m // k, k))
    for i in range(t):
        for kk in range(k):
            cdf = np.cumsum(picked[i, kk]) / picked[i, kk].sum()
            y = np.minimum(np.searchsorted(cdf, u[i, kk], side="right"), c - 1)
            loglik[kk] += np.log(picked[i][:, y]).T  # (S, K): log p(y_i | w_k') per config
    post = sp_softmax(loglik.reshape(m, k), axis=1)
    np.testing.assert_allclose(pt / pt.sum(axis=1, keepdims=True), post, rtol=1e-9, atol=1e-12)
    assert np.prod(picked[np.arange(t), 0, 0]) == 0.0  # the raw product would underflow
    joint = _Joint(pt, exact=False)
    cands = np.arange(t, t + 30)
    cond_k = entropy_nats(p)
    gain = _conditional_entropies(p, joint, cands, 1 << 20) - cond_k[cands].mean(axis=1)
    want = [np.mean([_h(post[j] @ p[n]) for j in range(m)]) - np.mean([_h(r) for r in p[n]])
            for n in cands]
    np.testing.assert_allclose(gain, want, atol=1e-10)
    bound = _PairwiseKLBound(p, cond_k)(joint, cands)
    assert np.isfinite(bound).all() and (bound >= gain - 1e-10).all()
    left = joint.information_left()
    assert np.isfinite(left)
    np.testing.assert_allclose(left, np.mean([_h(r) for r in post]), atol=1e-12)


def test_batchbald_published_greedy_through_underflow():
    """The shape that failed (K=8, C=10, hundreds of greedy picks: the joint likelihoods
    underflow near pick 300; on these samples the code before the fix raised a bare
    "zero-size array" ValueError). With both stops off (min_gain_ratio=0) the whole batch
    is greedy, and every gain stays finite."""
    n = 360
    s = _near_uniform_samples(n, 8, 10, seed=1)
    kw = {"num_configs": 256, "exact_max_configs": 1000, "seed": 0}
    stats: dict = {}
    idx, gain = batchbald_select(s, n, min_gain_ratio=0, greedy_max=n, stats=stats, **kw)
    assert stats["greedy_picks"] == n and stats["stopped"] is None
    assert np.isfinite(gain).all() and np.isfinite(stats["information_left"])
    assert sorted(idx.tolist()) == list(range(n))
    # pruning stays exact past the underflow point
    idx_f, gain_f = batchbald_select(s, n, min_gain_ratio=0, greedy_max=n, prune=False, **kw)
    np.testing.assert_array_equal(idx_f, idx)
    np.testing.assert_allclose(gain_f, gain, atol=1e-12)


def test_batchbald_default_batch_of_a_thousand():
    """The miner's defaults on the scale benchmark's shape: 1000 candidates, batch 1000,
    K=8, C=10 (the exact budget lowered to keep the test fast). The greedy stops when the
    8 samples are told apart; PowerBALD fills the rest, reproducibly from the seed."""
    s = _mc_pool(1000, 8, 10, seed=0)
    s = s[np.argsort(-bald_scores(s), kind="stable")]  # as the runner hands them over
    kw = {"num_configs": 2000, "exact_max_configs": 1000, "seed": 3}
    stats: dict = {}
    idx, gain = batchbald_select(s, 1000, stats=stats, **kw)
    g = stats["greedy_picks"]
    assert stats["stopped"] in ("information", "gain") and 1 < g < 100
    assert np.isfinite(gain).all() and sorted(idx.tolist()) == list(range(1000))
    # the greedy stopped because the picks told the 8 samples apart: their information
    # I(y_S; w) reached H(w) = log 8 (up to the noise of the M = 2000 sampled estimate)
    assert abs(gain[:g].sum() - math.log(8)) < 0.02
    assert stats["information_left"] < 1e-9 * gain[0] or gain[g - 1] < 1e-9 * gain[0]
    # the greedy part is the published greedy run for g picks, pruned or not
    idx_g, gain_g = batchbald_select(s, g, min_gain_ratio=0, prune=False, **kw)
    np.testing.assert_array_equal(idx[:g], idx_g)
    np.testing.assert_allclose(gain[:g], gain_g, atol=1e-12)
    # the rest: BALD scores of the picks, PowerBALD = Gumbel-top-k of log BALD on what is left
    bald = bald_scores(s)
    np.testing.assert_allclose(gain[g:], bald[idx[g:]], atol=1e-15)
    rest = np.setdiff1d(np.arange(1000), idx[:g])
    noise = np.random.default_rng([3, 1]).gumbel(size=1000)[rest]
    with np.errstate(divide="ignore"):
        keys = np.log(bald[rest]) + noise
    np.testing.assert_array_equal(idx[g:], rest[np.argsort(-keys, kind="stable")])
    idx2, gain2 = batchbald_select(s, 1000, **kw)
    np.testing.assert_array_equal(idx2, idx)
    idx3, _ = batchbald_select(s, 1000, **{**kw, "seed": 4})
    assert idx3[g:].tolist() != idx[g:].tolist()


def test_batchbald_stop_matches_the_definition_on_a_small_case():
    """Small exact case, checked against the literal published algorithm: the greedy picks
    and gains equal the reference's, the stop comes when the information left about w,
    log K - sum of gains (exact regime), falls under min_gain_ratio * gains[0]."""
    s = _dirichlet_samples(12, 4, 3, seed=7, alpha=0.3)
    stats: dict = {}
    idx, gain = batchbald_select(s, 12, min_gain_ratio=0.05, stats=stats)
    g = stats["greedy_picks"]
    assert 1 < g < 12 and stats["stopped"] in ("information", "gain")
    ref_idx, ref_gain = _reference_batchbald(s, g)
    assert idx[:g].tolist() == ref_idx
    np.testing.assert_allclose(gain[:g], ref_gain, atol=1e-10)
    tau = 0.05 * ref_gain[0]
    if stats["stopped"] == "information":
        # H(w | y_S) = log K - I(y_S; w), and it was below tau before pick g + 1
        np.testing.assert_allclose(stats["information_left"], math.log(4) - sum(ref_gain), atol=1e-10)
        assert stats["information_left"] < tau <= ref_gain[-1]
    else:
        assert ref_gain[-1] < tau
    assert sorted(idx.tolist()) == list(range(12))


def test_batchbald_greedy_max_and_progress_and_cancel():
    s = _mc_pool(300, 8, 5, seed=2)
    seen: list[tuple[float, str]] = []
    stats: dict = {}
    idx, gain = batchbald_select(s, 50, greedy_max=3, progress=lambda f, m: seen.append((f, m)),
                                 stats=stats)
    assert stats["greedy_picks"] == 3 and stats["stopped"] == "greedy_max"
    assert [f for f, _ in seen] == [1 / 3, 2 / 3, 1.0, 1.0] and "PowerBALD" in seen[-1][1]
    assert len(set(idx.tolist())) == 50
    idx_ref, _ = batchbald_select(s, 3)
    assert idx[:3].tolist() == idx_ref.tolist()

    class Cancelled(Exception):
        pass

    calls = []

    def check() -> None:
        calls.append(1)
        if len(calls) == 3:
            raise Cancelled

    with pytest.raises(Cancelled):
        batchbald_select(s, 50, min_gain_ratio=0, check=check)
    assert len(calls) == 3  # checked at every pick (and every ~0.2 s inside one)


def test_batchbald_degenerate_inputs():
    # exact 0/1 probabilities (a committee's hard votes) are fine, exact and sampled
    votes = np.random.default_rng(0).integers(0, 3, size=(60, 6))
    s = np.eye(3)[votes]  # (60, 6, 3) one-hot
    for kw in ({}, {"exact_max_configs": 3, "num_configs": 120, "min_gain_ratio": 0}):
        idx, gain = batchbald_select(s, 60, **kw)
        assert np.isfinite(gain).all() and sorted(idx.tolist()) == list(range(60))
    # ... and agree with the literal algorithm: here two picks identify the sample (all six
    # members' vote pairs differ), H(w | y_S) = 0, so every later gain is exactly 0
    ref_idx, ref_gain = _reference_batchbald(s[:12], 3)
    idx, gain = batchbald_select(s[:12], 3, min_gain_ratio=0)
    assert idx.tolist() == ref_idx and abs(ref_gain[2]) < 1e-12
    np.testing.assert_allclose(gain, ref_gain, atol=1e-10)
    stats: dict = {}
    idx, gain = batchbald_select(s[:12], 3, stats=stats)
    assert idx[:2].tolist() == ref_idx[:2] and stats["stopped"] == "information"
    assert stats["greedy_picks"] == 2 and abs(stats["information_left"]) < 1e-12
    # samples that never disagree: nothing to rank -> a clear ValueError, not a crash
    same = np.repeat(_dirichlet(20, 4, seed=1)[:, None, :], 5, axis=1)
    with pytest.raises(ValueError, match="agree on every row"):
        batchbald_select(same, 3)
    with pytest.raises(ValueError, match="K >= 2"):
        batchbald_select(same[:, :1], 3)
    hard_same = np.repeat(np.eye(4)[np.arange(20) % 4][:, None, :], 5, axis=1)
    with pytest.raises(ValueError, match="agree on every row"):
        batchbald_select(hard_same, 3)
    for bad in ({"greedy_max": 0}, {"min_gain_ratio": 1.0}, {"min_gain_ratio": -0.1},
                {"min_gain_ratio": float("nan")}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            batchbald_select(s, 3, **bad)
    # through the registry the runner uses: INVALID_ARGUMENT naming the miner and the field
    from indexing.errors import InvalidArgument
    from miners.registry import get

    spec = get("batchbald")
    with pytest.raises(InvalidArgument, match="miner 'batchbald': samples: the K = 5") as err:
        spec.select({"samples": same}, 3, {**spec.validate({}), "seed": 0})
    assert err.value.code == "INVALID_ARGUMENT" and err.value.field == "samples"


# ----------------------------------------------------------------- validation


@pytest.mark.parametrize(
    "f", [least_confidence_scores, margin_scores, ratio_scores, entropy_scores]
)
def test_validation_2d(f):
    with pytest.raises(ValueError, match=r"2-D array of shape \(N, C\).*got shape \(3,\)"):
        f(np.array([0.2, 0.3, 0.5]))
    with pytest.raises(ValueError, match="at least 2 classes"):
        f(np.ones((4, 1)))
    with pytest.raises(ValueError, match=r"NaN or infinite values \(first at n=1\)"):
        f(np.array([[0.5, 0.5], [np.nan, 0.5]]))
    with pytest.raises(ValueError, match=r"NaN or infinite"):
        f(np.array([[0.5, np.inf]]))
    with pytest.raises(ValueError, match=r"negative probabilities \(min -0.1, first at n=0\)"):
        f(np.array([[-0.1, 1.1], [0.5, 0.5]]))
    with pytest.raises(ValueError, match=r"sum to 1.*n=1.*sums to 0.9"):
        f(np.array([[0.5, 0.5], [0.45, 0.45]]))
    with pytest.raises(ValueError, match="numeric"):
        f(np.array([["a", "b"]]))
    assert f(np.zeros((0, 3))).shape == (0,)
    f(np.array([[0.5004, 0.5]]))  # within tolerance


@pytest.mark.parametrize(
    "f",
    [mean_entropy_scores, variance_scores, bald_scores, vote_entropy_scores,
     consensus_entropy_scores, kl_to_consensus_scores],
)
def test_validation_3d(f):
    with pytest.raises(ValueError, match=r"3-D array of shape \(N, K, C\)"):
        f(np.full((4, 3), 1 / 3))
    s = _dirichlet_samples(4, 3, 3, seed=0)
    s[2, 1, 0] = np.nan
    with pytest.raises(ValueError, match=r"NaN.*n=2, k=1"):
        f(s)
    s = _dirichlet_samples(4, 3, 3, seed=0)
    s[3, 2] *= 2
    with pytest.raises(ValueError, match=r"sum to 1.*n=3, k=2"):
        f(s)
    assert f(np.zeros((0, 2, 3))).shape == (0,)


def test_validate_probs_returns_copy():
    p = np.array([[0.25, 0.75]], dtype=np.float32)
    out = validate_probs(p)
    assert out.dtype == np.float64
    out[0, 0] = 9
    assert p[0, 0] == np.float32(0.25)


# ----------------------------------------------------------------- stochastic acquisition


def _topk(keys: np.ndarray, k: int) -> list[int]:
    return np.argsort(-keys, kind="stable")[:k].tolist()


@pytest.mark.parametrize("mode", ["softmax", "power", "softrank"])
def test_stochastic_low_temperature_is_topk(mode):
    rng = np.random.default_rng(0)
    s = rng.permutation(np.linspace(0.01, 1.0, 100))
    det = _topk(s, 10)
    for seed in range(5):
        keys = stochastic_scores(s, mode, 1e-6, rng=np.random.default_rng(seed))
        assert _topk(keys, 10) == det


@pytest.mark.parametrize("mode", ["softmax", "power", "softrank"])
def test_stochastic_reproducible(mode):
    s = np.random.default_rng(1).random(50)
    a = stochastic_scores(s, mode, rng=np.random.default_rng(42))
    b = stochastic_scores(s, mode, rng=np.random.default_rng(42))
    c = stochastic_scores(s, mode, rng=np.random.default_rng(43))
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)


def test_stochastic_inclusion_frequencies():
    s = np.array([5.0, 4.0, 3.0, 2.0, 1.0, 0.0])
    trials = 4000
    first = np.zeros(6)
    incl = {m: np.zeros(6) for m in ("power", "softmax", "softrank")}
    for seed in range(trials):
        for mode in incl:
            keys = stochastic_scores(s, mode, 1.0, rng=np.random.default_rng(seed))
            top = np.argsort(-keys)[:2]
            incl[mode][top] += 1
            if mode == "power":
                first[top[0]] += 1
    # power, k=1: P(i first) = s_i / sum s (Gumbel-max); 4-sigma binomial tolerance
    expected = s / s.sum()
    sigma = np.sqrt(expected * (1 - expected) / trials)
    assert (np.abs(first / trials - expected) <= 4 * sigma + 1e-12).all()
    assert incl["power"][5] == 0  # zero score never drawn while positives remain
    for mode, counts in incl.items():
        freq = counts / trials
        assert (np.diff(freq[:5]) < 0).all(), (mode, freq)  # higher score, more often
        assert freq[4] > 0, mode  # but not deterministic top-k
        np.testing.assert_allclose(freq.sum(), 2.0)


def test_gumbel_noise_and_validation():
    g = gumbel_noise(200_000, np.random.default_rng(0))
    assert g.shape == (200_000,) and g.dtype == np.float64
    assert abs(g.mean() - 0.5772156649) < 0.01
    assert gumbel_noise(0, np.random.default_rng(0)).shape == (0,)
    rng = np.random.default_rng(0)
    with pytest.raises(ValueError, match="non-negative integer"):
        gumbel_noise(-1, rng)
    with pytest.raises(ValueError, match="Generator"):
        gumbel_noise(3, 0)
    with pytest.raises(ValueError, match="mode must be one of"):
        stochastic_scores(np.ones(3), "topk", rng=rng)
    with pytest.raises(ValueError, match=r"scores\[1\] = -1"):
        stochastic_scores(np.array([1.0, -1.0]), "power", rng=rng)
    with pytest.raises(ValueError, match="NaN"):
        stochastic_scores(np.array([1.0, np.nan]), "softmax", rng=rng)
    with pytest.raises(ValueError, match="1-D"):
        stochastic_scores(np.ones((2, 2)), "softmax", rng=rng)
    with pytest.raises(ValueError, match="temperature"):
        stochastic_scores(np.ones(3), "softmax", 0.0, rng=rng)
    stochastic_scores(np.array([-1.0, 2.0]), "softmax", rng=rng)  # signed ok
