"""Bayesian (MC dropout / deep ensemble) and query-by-committee scores, and BatchBALD.

Input convention: ``samples`` is a float array of shape ``(N, K, C)``: for each of ``N`` pool
items, ``K`` probability vectors over ``C >= 2`` classes, one per MC-dropout pass, ensemble
member or committee member (``samples[n, k]`` is ``p(y_n | w_k)``). For BatchBALD the
samples must be *consistent*: index ``k`` is the same model sample ``w_k`` for every item.
The score functions (BALD, mean entropy, variance, the committee scores) live in
:mod:`indexing.measures`, the shared leaf of pure measures, and are re-exported here;
BatchBALD is here. Validation, ``float64`` conversion and ``0 log 0 = 0`` follow :mod:`indexing.measures`
(``ValueError`` on wrong shape, NaN/inf, negative values or rows not summing to 1 within
``1e-3``). All entropies are in nats unless a function says "normalised" (divided by
``log C``, range ``[0, 1]``). Every score function returns a ``float64`` array of shape
``(N,)`` where higher = more informative.
"""

from __future__ import annotations

import numbers
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from indexing.measures import (  # the six scores are re-exported: their home is indexing.measures
    _ROUNDING_FLOOR,
    _TINY,
    _bald_nats,
    _samples,
    _snap,
    _xlogx,
    bald_scores,
    consensus_entropy_scores,
    entropy_nats,
    kl_to_consensus_scores,
    mean_entropy_scores,
    variance_scores,
    vote_entropy_scores,
)
from miners.stochastic import gumbel_noise, stochastic_scores

__all__ = [
    "bald_scores",
    "batchbald_select",
    "consensus_entropy_scores",
    "kl_to_consensus_scores",
    "mean_entropy_scores",
    "variance_scores",
    "vote_entropy_scores",
]


# --------------------------------------------------------------------------- BatchBALD


def _sample_joint_configs(pp: np.ndarray, num_configs: int, rng: np.random.Generator) -> np.ndarray:
    """Sample label configurations of the picked points and their per-sample likelihoods.

    ``pp``: ``(t, K, C)``, the picked points' samples. ``S = max(1, num_configs // K)``
    configurations ``y^(k,s) = (y_1, ..., y_t)`` are drawn from each ``p(y | w_k)`` (each
    ``y_i ~ Cat(p_ik)`` independently, by inverse CDF on ``u = rng.random((t, K, S))``), i.e.
    ``M = K S`` stratified draws from the mean joint ``pbar(y) = (1/K) sum_k p(y | w_k)``
    (as in batchbald_redux). Returns ``P^T`` of shape ``(M, K)`` up to a positive factor per
    row: ``P^T[(k, s), k'] = c_(k,s) prod_i p_{i k' y_i^(k,s)}`` (configurations ordered
    ``k`` major), with ``c`` chosen so that every row's largest entry is exactly 1.

    Why the factor: the products of ``t`` probabilities underflow float64 after a few
    hundred picks (``~0.1^300``), and the importance weights ``1 / (M q_m)`` then overflow.
    The sampled estimate depends on each row only through the posterior over the samples,
    ``pi_m = P^T[m] / sum_k P^T[m, k]`` (see :class:`_Joint`), so the rows are summed in log
    space, ``sum_i log p_{i k' y_i}``, and shifted by their maximum before ``exp``: the
    result is finite for any ``t``, and ``q_m = (1/K) sum_k P^T[m, k]`` lies in ``[1/K, 1]``.
    The maximum is finite because the inverse CDF only draws classes of positive
    probability, so the sample ``k`` that drew configuration ``(k, s)`` gives it a finite log
    likelihood (``p = 0`` elsewhere is ``log 0 = -inf``, an exact 0 after ``exp``).
    """
    t, k, c = pp.shape
    s = max(1, num_configs // k)
    u = rng.random((t, k, s))
    cdf = np.cumsum(pp, axis=2)
    cdf /= cdf[:, :, -1:]
    with np.errstate(divide="ignore"):
        log_pp = np.log(pp)
    log_joint_t = np.zeros((k * s, k))
    for i in range(t):  # t = points picked so far
        # y = #{c < C-1 : cdf_c <= u}, i.e. the class whose CDF interval holds u
        choice = (cdf[i, :, None, :-1] <= u[i, :, :, None]).sum(axis=2)  # (K, S)
        log_joint_t += np.take(log_pp[i].T, choice.ravel(), axis=0)  # M rows of length K
    top = log_joint_t.max(axis=1, keepdims=True)
    if not np.isfinite(top).all():  # impossible by the argument above; never return NaN
        raise FloatingPointError("BatchBALD: a sampled configuration has zero likelihood "
                                 "under every model sample (internal error)")
    log_joint_t -= top
    return np.exp(log_joint_t, out=log_joint_t)


class _Joint:
    """Joint distribution of the picked labels ``y_S``, for the BatchBALD estimator.

    Holds ``P^T`` (``P^T[m, k] = p(y_S = m | w_k)``, shape ``(M, K)``), ``A^T = P^T / K``,
    per-configuration weights ``w_m`` and a constant such that, for a candidate ``n`` with
    ``J[m, c] = sum_k A^T[m, k] p[n, k, c]`` (the joint ``p(y_S = m, y_n = c)``),

    ``H(y_n | y_S) ~= -sum_m w_m sum_c J[m, c] log J[m, c] + const``,
    ``const = sum_m w_m q_m log q_m``, ``q_m = sum_k A^T[m, k] = p(y_S = m)``.

    Exact (all ``M = C^t`` configurations): ``w_m = 1``, and the formula is exactly
    ``H(y_S, y_n) - H(y_S)``. Sampled (``m ~ q``): ``w_m = 1 / (M q_m)``, the importance
    weights of batchbald_redux; the estimate is then ``(1/M) sum_m H(y_n | y_S = m)``, an
    average of conditional entropies (configurations with ``q_m = 0`` get weight 0).
    ``H(y_n | y_S = m) = H(sum_k pi_mk p_nk)`` depends on row ``m`` only through
    ``pi_m = A^T[m] / q_m``, so the sampled rows may carry any positive factor each
    (:func:`_sample_joint_configs` scales them to a maximum of 1, keeping ``q_m >= 1/K`` and
    ``w_m <= K / M`` finite however many points were picked).
    """

    def __init__(self, p_joint_t: np.ndarray, exact: bool):
        m, k = p_joint_t.shape
        self.exact = exact
        self.pt = p_joint_t
        self.at = p_joint_t / k
        q = self.at.sum(axis=1)
        if exact:
            self.w = np.ones(m)
        else:
            self.w = np.divide(1.0, m * q, out=np.zeros(m), where=q > 0)
        self.const = float(self.w @ _xlogx(q))

    @property
    def m(self) -> int:
        return self.pt.shape[0]

    def posterior(self) -> tuple[np.ndarray, np.ndarray]:
        """``(pi, v)``: ``pi[m] = A^T[m] / q_m``, the posterior over the ``K`` samples given
        configuration ``m`` (a zero row where ``q_m = 0``), and ``v_m = w_m q_m``, the
        estimator's weight of configuration ``m`` (exact: ``q_m``; sampled: ``1/M``).

        Dividing by ``q_m`` row by row (rather than forming ``1 / q_m^2``) stays finite for
        any ``q_m > 0``: ``A^T[m, k] <= q_m``, so ``pi`` lies in ``[0, 1]``.
        """
        q = self.at.sum(axis=1)
        pos = q > 0
        pi = np.zeros_like(self.at)
        np.divide(self.at, q[:, None], out=pi, where=pos[:, None])
        return pi, np.where(pos, self.w * q, 0.0)

    def information_left(self) -> float:
        """``H(w | y_S) = sum_m v_m H(pi_m)`` (nats): what the picked labels leave unknown
        about which of the ``K`` samples is right (``log K`` for the empty set).

        Every later marginal gain ``I(y_n; w | y_S)`` is at most this (exactly so in the
        exact regime; the sampled estimate adds a stratification term that vanishes as the
        posteriors concentrate), and in the exact regime
        ``log K - H(w | y_S) = I(y_S; w)``, the sum of the gains so far.
        """
        pi, v = self.posterior()
        return float(v @ -_xlogx(pi).sum(axis=1))

    def extended(self, p_new: np.ndarray) -> _Joint:
        """Exact joint of ``y_S`` and one more label with ``p_new[k, c] = p(y | w_k)``."""
        m, k = self.pt.shape
        c = p_new.shape[1]
        return _Joint((self.pt[:, None, :] * p_new.T[None, :, :]).reshape(m * c, k), exact=True)


#: Tiling of the candidate scoring. ``J`` and ``J log J`` are computed one tile of
#: ``rows x (b C)`` at a time so both buffers stay in L2 cache (1 MiB together; measured
#: ~1.3x faster than 4 MiB tiles and ~2x faster than 256 MiB ones); ``max_chunk_bytes`` can
#: only lower this. The candidates' ``(K, b C)`` block is kept to 256 KiB.
_TILE_BYTES = 1 << 20
_X_BYTES = 1 << 18
#: GEMM calls stay at or below this many multiply-adds: the size under which OpenBLAS
#: (NumPy's bundled BLAS) runs a GEMM on the calling thread. Its thread pool, contending
#: with the service's (or any other process's) threads, was measured 5-10x slower than one
#: thread for these skinny products (``K`` is small).
_GEMM_SINGLE_THREAD_MNK = 1 << 18


def _conditional_entropies(
    p: np.ndarray, joint: _Joint, cand: np.ndarray, max_chunk_bytes: int
) -> np.ndarray:
    """``H(y_n | y_S)`` (nats) for each candidate index in ``cand`` (see :class:`_Joint`).

    Candidates are taken ``b`` at a time (``X``: their ``(K, b C)`` probabilities side by
    side); the ``M`` configurations ``rows`` at a time: ``J = A^T[rows] @ X`` (issued in
    single-thread-sized GEMM blocks), then ``acc += w[rows] @ (J log J)``. Peak extra memory:
    two tiles of at most ``min(max_chunk_bytes, 1 MiB)`` bytes plus ``X``.
    """
    _, k, c = p.shape
    m = joint.m
    n = len(cand)
    out = np.empty(n)
    tile = max(1, min(max_chunk_bytes, _TILE_BYTES) // 16)  # elements per J / T buffer
    b = int(max(1, min(n, tile // c, _X_BYTES // (8 * k * c))))
    rows_e = max(1, tile // (b * c))
    rows_g = max(1, _GEMM_SINGLE_THREAD_MNK // (k * b * c))
    buf_j = np.empty(min(m, rows_e) * b * c)
    buf_t = np.empty_like(buf_j)
    for s0 in range(0, n, b):
        idx = cand[s0 : s0 + b]
        width = len(idx) * c
        x = p[idx].transpose(1, 0, 2).reshape(k, width)  # (K, nb*C)
        acc = np.zeros(width)
        for r0 in range(0, m, rows_e):
            r1 = min(m, r0 + rows_e)
            jm = buf_j[: (r1 - r0) * width].reshape(r1 - r0, width)
            tm = buf_t[: (r1 - r0) * width].reshape(r1 - r0, width)
            for g0 in range(r0, r1, rows_g):
                g1 = min(r1, g0 + rows_g)
                np.matmul(joint.at[g0:g1], x, out=jm[g0 - r0 : g1 - r0])
            np.maximum(jm, _TINY, out=tm)
            np.log(tm, out=tm)
            tm *= jm
            acc += joint.w[r0:r1] @ tm
        out[s0 : s0 + len(idx)] = -acc.reshape(len(idx), c).sum(axis=1)
    return out + joint.const


class _PairwiseKLBound:
    """Per-candidate upper bounds on the BatchBALD gain, ``O(N K^2 C)`` per step.

    With ``pi_m`` the posterior over the ``K`` samples given configuration ``m``
    (``pi_mk = A^T[m, k] / q_m``) and ``v_m = w_m q_m`` the estimator's weight of
    configuration ``m`` (exact: ``q_m``; sampled: ``1/M``), the estimated gain is

    ``g(n) = sum_m v_m JSD_{pi_m}(p_n1, ..., p_nK) + sum_k (rho_k - 1/K) H(p_nk)``,
    ``rho_k = sum_m v_m pi_mk`` (``= 1/K`` in the exact regime),

    since ``H(y_n | y_S = m) = H(sum_k pi_mk p_nk)`` and
    ``JSD_pi = H(sum_k pi_k p_k) - sum_k pi_k H(p_k) = sum_k pi_k KL(p_k || pbar)``.
    Convexity of ``KL`` in its second argument gives
    ``KL(p_k || sum_l pi_l p_l) <= sum_l pi_l KL(p_k || p_l)``, hence

    ``g(n) <= <D_n, G> + sum_k (rho_k - 1/K) H(p_nk)``, ``G = sum_m v_m pi_m pi_m^T``,
    ``D_n[k, l] = KL(p_nk || p_nl)``,

    a bound for the *same* estimate (same configurations), so pruning with it never
    changes the pick. ``<D_n, G> = sum_k r_k sum_c p_nkc log p_nkc - sum_{k,c} p_nkc
    (G log p_n)_kc`` with ``r = G 1 = rho``; the ``rho`` terms cancel and the bound is
    ``-(1/K) sum_k H(p_nk) - sum_{k,c} p_nkc (G log p_n)_kc``: no ``K x K`` matrix per
    candidate is stored.
    As the posterior over the samples concentrates (``G`` nearly diagonal) the bound goes
    to 0, exactly where the stale-gain bounds of lazy greedy stop pruning.
    """

    def __init__(self, p: np.ndarray, cond_k: np.ndarray):
        self.p = p  # (N, K, C), rows summing to 1
        self.cond = cond_k.mean(axis=1)  # (N,): (1/K) sum_k H(p_nk)

    def worth_it(self, m: int, n_cand: int) -> bool:
        """Whether the bound (``~ M K^2 + N C K^2`` multiply-adds) costs well under scoring
        every candidate (``~ N M C (K + 40)``, the log counted as 40)."""
        _, k, c = self.p.shape
        return 4 * (m * k * k + n_cand * c * k * k) < n_cand * m * c * (k + 40)

    def __call__(self, joint: _Joint, cand: np.ndarray) -> np.ndarray:
        """Bounds for the candidates ``cand`` given the joint of the picked labels."""
        _, k, c = self.p.shape
        pi, v = joint.posterior()
        # G = sum_m v_m pi_m pi_m^T, accumulated over row blocks (pi in [0, 1]: no overflow)
        g = np.zeros((k, k))
        step = max(64, _GEMM_SINGLE_THREAD_MNK // (k * k))
        for r0 in range(0, joint.m, step):
            blk = pi[r0 : r0 + step]
            g += blk.T @ (blk * v[r0 : r0 + step, None])
        cross = np.empty(len(cand))
        step = max(1, _GEMM_SINGLE_THREAD_MNK // (k * k * c))  # candidates per block
        for s0 in range(0, len(cand), step):
            idx = cand[s0 : s0 + step]
            pr = self.p[idx].transpose(0, 2, 1).reshape(len(idx) * c, k)  # rows (n, c)
            # log 0 -> log(tiny): a pair with p_nlc = 0 < p_nkc then adds ~708 p_nkc G_kl,
            # a finite stand-in for the infinite KL that still bounds the finite JSD
            y = np.log(np.maximum(pr, _TINY)) @ g  # G symmetric: row (n,c) of (G log p_n)^T
            cross[s0 : s0 + len(idx)] = np.einsum("ij,ij->i", pr, y).reshape(-1, c).sum(axis=1)
        # <D_n, G> = -sum_k rho_k H(p_nk) - cross_n with rho = G 1, so the rho terms cancel
        return -self.cond[cand] - cross


def _check_int(value: object, name: str, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ValueError(f"{name} must be an integer; got {value!r}")
    if int(value) < minimum:
        raise ValueError(f"{name} must be >= {minimum}; got {value}")
    return int(value)


def _check_ratio(value: object, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not 0 <= value < 1:
        raise ValueError(f"{name} must be a number in [0, 1); got {value!r}")
    return float(value)


class _Ticker:
    """Calls ``check`` (cancellation: it raises) at most every ``period`` seconds, so it can
    sit in inner loops at no cost."""

    def __init__(self, check: Callable[[], None] | None, period: float = 0.2):
        self.check = check
        self.period = period
        self.last = time.monotonic()

    def __call__(self, force: bool = False) -> None:
        if self.check is None:
            return
        now = time.monotonic()
        if force or now - self.last >= self.period:
            self.last = now
            self.check()


def _no_disagreement(k: int) -> ValueError:
    if k == 1:
        return ValueError(
            "samples: BatchBALD needs K >= 2 model samples per row (MC-dropout passes or "
            "ensemble members); got K = 1, for which BALD is 0 everywhere. Store several "
            "samples, or use an uncertainty miner on the probabilities")
    return ValueError(
        f"samples: the K = {k} model samples agree on every row (BALD = 0 everywhere, "
        "so BatchBALD has nothing to rank). The K samples must come from different models: "
        "dropout left on at inference with a fixed mask per sample (consistent MC dropout), "
        "or distinct ensemble members")


def batchbald_select(
    samples: np.ndarray,
    batch_size: int,
    *,
    num_configs: int = 10_000,
    seed: int = 0,
    exact_max_configs: int = 100_000,
    prune: bool = True,
    max_chunk_bytes: int = 256 << 20,
    greedy_max: int = 100,
    min_gain_ratio: float = 1e-9,
    progress: Callable[[float, str], None] | None = None,
    check: Callable[[], None] | None = None,
    stats: dict[str, Any] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Greedy BatchBALD (Kirsch, van Amersfoort & Gal, NeurIPS 2019), PowerBALD past the
    point where the ``K`` samples can no longer tell the candidates apart.

    Objective for a batch ``B``, over the ``K`` consistent samples ``w_k`` (uniform weights):

    ``a(B) = I(y_B; w) = H(y_B) - sum_{i in B} E_k[H(y_i | w_k)]``,
    ``p(y_B) = (1/K) sum_k prod_{i in B} p(y_i | w_k)``.

    Greedy: with ``S`` the points picked so far, pick
    ``argmax_n a(S + n) - a(S) = H(y_n | y_S) - E_k[H(y_n | w_k)]``
    (ties: lowest row index). Step 1 is exactly the BALD argmax. The joint ``p(y_S | w_k)``
    is kept as a ``(M, K)`` matrix: exactly (``M = C^t`` configurations) while
    ``C^t <= exact_max_configs``; beyond that ``M = K * (num_configs // K)`` configurations
    are sampled afresh at every later step (stratified over ``k``, from the mean joint,
    with ``np.random.default_rng(seed)``) and ``H(y_n | y_S)`` is the importance-sampled
    estimate of batchbald_redux, computed from the posteriors over the samples (the sampled
    likelihoods are summed in log space and renormalised per configuration, so they never
    underflow: see :func:`_sample_joint_configs`). For a block of candidates at once the
    joint with ``y_n`` is ``J = A^T X`` (``A^T = P^T / K``, ``X`` the candidates' ``(K, C)``
    probabilities side by side), computed in cache-sized tiles; nothing ``N x N`` is built.
    Cost per step: ``O(N K M C)`` without pruning; rows are renormalised to sum to 1 first.

    Large batches. The whole batch can tell at most ``I(y_B; w) <= H(w) = log K`` nats
    about the samples, and every marginal gain is at most ``H(w | y_S)``, the information
    still left. Once the posterior over the ``K`` samples has collapsed the gains are
    rounding noise (with ``K = 8``, ``C = 10`` they fall below ``1e-9`` nats within ~16
    picks), so greedy BatchBALD stops, and the rest of the batch is drawn by **PowerBALD**
    (Kirsch et al., TMLR 2023): the remaining candidates, sampled without replacement with
    probability proportional to their BALD score (Gumbel-top-k, ``temperature`` 1, noise
    from ``np.random.default_rng([seed, 1])``; rows with BALD 0 come last, lowest index
    first). The greedy stops after the step at which any of these holds, with
    ``tau = min_gain_ratio * gains[0]`` (and ``tau >= 1e-12`` nats):

    * ``H(w | y_S) < tau`` before scoring (nothing left to learn; checked first, so the
      step is not paid for);
    * the step's best gain is below ``tau`` (by submodularity every later gain is too);
    * ``greedy_max`` greedy picks were made (bounds the time: each step costs up to
      ``O(N K M C)``).

    For picks made by PowerBALD ``gains`` holds their BALD score (the quantity sampled
    on), not a marginal gain. At ``N = b = 1000``, ``K = 8``, ``C = 10`` (the miner's
    defaults on a 10-class model with 8 MC samples; ``bench/uncertainty.py --scale``) 16
    picks are greedy and the whole batch takes seconds; the published greedy for all 1000
    picks (``min_gain_ratio=0, greedy_max=1000``) takes minutes for picks whose gains are
    rounding noise.

    Pruning (``prune=True``, the default) scores candidates in decreasing order of an upper
    bound on their gain and stops once no remaining bound reaches the best gain found
    (within ``1e-10`` nats, so near-ties are all scored). Bounds: (1) while the joint is
    exact, the candidate's gain at an earlier step (the objective is submodular, so gains
    only shrink: lazy greedy); (2) the pairwise-KL bound of :class:`_PairwiseKLBound`
    (``O(M K^2 + N C K^2)``, used when that is well under the cost of scoring everything),
    valid for the sampled estimate too. Both are bounds on the
    very quantity being maximised, so the picks are those of the full evaluation (up to
    floating-point ties below ``1e-10`` nats).

    Args:
        samples: ``(N, K, C)`` probabilities, ``samples[n, k] = p(y_n | w_k)``. Exact 0s
            and 1s are fine; ``ValueError`` if ``K = 1`` or if the samples agree on every
            row (BALD 0 everywhere: nothing to rank), besides the checks of
            :func:`miners.uncertainty.validate_probs`.
        batch_size: number of points to pick, ``0 <= batch_size <= N``.
        num_configs: sampled configurations in the sampled regime (``>= 1``).
        seed: seed of the configuration sampler and of the PowerBALD noise.
        exact_max_configs: largest ``C^t`` kept exactly (``>= 1``).
        prune: score only the candidates that can still win (see above); ``False`` scores
            every candidate at every step.
        max_chunk_bytes: upper bound on the scoring buffers (they are at most 1 MiB).
        greedy_max: at most this many greedy BatchBALD picks (``>= 1``).
        min_gain_ratio: ``tau / gains[0]`` above, in ``[0, 1)``; ``0`` turns both stops
            off (the published algorithm: greedy up to ``greedy_max`` picks, gains that are
            rounding noise included).
        progress: called as ``progress(fraction, message)`` after each greedy pick and once
            at the end (``fraction`` of the greedy part done, in ``[0, 1]``).
        check: called every ~0.2 s inside the loops; raise from it to cancel.
        stats: if given, filled with ``greedy_picks`` (int), ``stopped`` (why the greedy
            stopped: ``"information"``, ``"gain"``, ``"greedy_max"``, or ``None`` when the
            whole batch was greedy) and ``information_left`` (``H(w | y_S)`` at the end of
            the greedy part, nats; ``None`` if not computed).

    Returns:
        ``(indices, gains)``: ``int64`` row indices in pick order (distinct) and finite
        ``float64`` scores: the marginal gains ``a(S + n) - a(S)`` (nats) of the greedy
        picks (``gains[0]`` is the BALD score), then the BALD scores of the PowerBALD picks.
    """
    p = _samples(samples)
    n, k, c = p.shape
    b = _check_int(batch_size, "batch_size", 0)
    if b > n:
        raise ValueError(f"batch_size ({b}) exceeds the number of candidate rows ({n})")
    num_configs = _check_int(num_configs, "num_configs", 1)
    exact_max_configs = _check_int(exact_max_configs, "exact_max_configs", 1)
    max_chunk_bytes = _check_int(max_chunk_bytes, "max_chunk_bytes", 1)
    seed = _check_int(seed, "seed", 0)
    greedy_max = _check_int(greedy_max, "greedy_max", 1)
    min_gain_ratio = _check_ratio(min_gain_ratio, "min_gain_ratio")
    picked: list[int] = []
    gains: list[float] = []
    info = {"greedy_picks": 0, "stopped": None, "information_left": None}
    if stats is not None:
        stats.update(info)
    if b == 0:
        return np.zeros(0, dtype=np.int64), np.zeros(0)

    tick = _Ticker(check)
    report = progress if progress is not None else (lambda f, m: None)
    p /= p.sum(axis=2, keepdims=True)
    cond_k = entropy_nats(p)  # H(y_n | w_k), (N, K)
    cond = cond_k.mean(axis=1)  # E_k H(y_n | w_k), (N,)
    stale = _bald_nats(p)  # step-1 gains; later the last exact gain of each candidate
    bald = _snap(stale.copy())
    if k == 1 or bald.max() == 0.0:
        raise _no_disagreement(k)
    # min_gain_ratio = 0: the published algorithm, greedy for the whole batch (<= greedy_max)
    tau = max(min_gain_ratio * float(stale.max()), _ROUNDING_FLOOR) if min_gain_ratio else -np.inf
    n_greedy = min(b, greedy_max)
    kl_bound = _PairwiseKLBound(p, cond_k) if prune and b > 1 else None
    available = np.ones(n, dtype=bool)
    rng = np.random.default_rng(seed)
    joint = _Joint(np.ones((1, k)), exact=True)  # empty set: one configuration
    tol = 1e-10

    for step in range(n_greedy):
        tick(force=True)
        if step > 0:
            left = joint.information_left()
            info["information_left"] = left
            if left < tau:
                info["stopped"] = "information"
                break
        if step == 0:
            best = int(np.argmax(stale))
            gain = float(stale[best])
        elif kl_bound is None:
            cand = np.flatnonzero(available)
            g = _conditional_entropies(p, joint, cand, max_chunk_bytes) - cond[cand]
            i = int(np.argmax(g))
            best, gain = int(cand[i]), float(g[i])
        else:
            cand = np.flatnonzero(available)
            ub = stale[cand] if joint.exact else np.full(len(cand), np.inf)
            if kl_bound.worth_it(joint.m, len(cand)):
                ub = np.minimum(ub, kl_bound(joint, cand))
            order = np.argsort(-ub, kind="stable")
            block = int(max(1, min(4096, (1 << 20) // (joint.m * c))))
            fresh_idx: list[np.ndarray] = []
            fresh_val: list[np.ndarray] = []
            top = -np.inf
            for s0 in range(0, len(order), block):
                if s0 and ub[order[s0]] < top - tol:
                    break
                tick()
                idx = cand[order[s0 : s0 + block]]
                g = _conditional_entropies(p, joint, idx, max_chunk_bytes) - cond[idx]
                if joint.exact:
                    stale[idx] = g
                fresh_idx.append(idx)
                fresh_val.append(g)
                top = max(top, float(g.max()))
            fi, fv = np.concatenate(fresh_idx), np.concatenate(fresh_val)
            i = int(np.argmax(fv))
            gain = float(fv[i])
            best = int(fi[fv == gain].min()) if np.isfinite(gain) else int(fi[i])
        if not np.isfinite(gain):  # cannot happen (finite inputs, finite joint); never return it
            raise FloatingPointError(f"BatchBALD: non-finite gain at pick {step + 1} (internal error)")
        picked.append(best)
        gains.append(gain)
        available[best] = False
        info["greedy_picks"] = len(picked)
        report(len(picked) / n_greedy, f"BatchBALD: greedy pick {len(picked)} of at most "
               f"{n_greedy}, gain {gain:.3g} nats")
        if gain < tau:
            info["stopped"] = "gain"
            break
        if step + 1 == n_greedy:
            if n_greedy < b:
                info["stopped"] = "greedy_max"
            break
        # extend the joint with the new pick: exact outer product, or fresh samples
        if joint.exact and joint.m * c <= exact_max_configs:
            joint = joint.extended(p[best])
        else:
            joint = _Joint(_sample_joint_configs(p[picked], num_configs, rng), exact=False)

    rest = b - len(picked)
    if rest:
        # PowerBALD over what is left: Gumbel-top-k of log BALD (BALD 0 -> -inf: last)
        noise = gumbel_noise(n, np.random.default_rng([seed, 1]))
        free = np.flatnonzero(available)
        keys = stochastic_scores(bald[free], "power", 1.0, noise=noise[free])
        fill = free[np.argsort(-keys, kind="stable")[:rest]]
        picked.extend(fill.tolist())
        gains.extend(bald[fill].tolist())
    report(1.0, f"BatchBALD: {info['greedy_picks']} greedy picks"
           + (f", {rest} by PowerBALD ({info['stopped']})" if rest else ""))
    if stats is not None:
        stats.update(info)
    return np.asarray(picked, dtype=np.int64), np.asarray(gains, dtype=np.float64)
