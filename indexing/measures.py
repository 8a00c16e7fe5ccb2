"""Pure measures of a model's predictions: the one home of every per-item uncertainty score.

NumPy only, no assay import: a leaf that every layer may import — the miners
(``miners/registry.py`` registers one miner per measure), scoring at the edge
(``miners/edge.py``), collection analytics (``indexing/analytics.py``) and the runner's
softmax of stored logits all compute these functions, so a score means the same thing
everywhere. The tables :data:`PROB_MEASURES`, :data:`SAMPLE_MEASURES` and
:data:`LOGIT_MEASURES` name them; the score lists of ``edge.py``, ``analytics.py`` and the
uncertainty miners are derived from them.

Inputs:

* ``probs`` ``(N, C)``: class probabilities (``N`` items, ``C >= 2`` classes);
* ``samples`` ``(N, K, C)``: ``K`` probability vectors per item, one per MC-dropout pass,
  ensemble member or committee member (``samples[n, k] = p(y_n | w_k)``);
* ``logits`` ``(N, C)``: pre-softmax outputs.

Every score function returns a ``float64`` array of shape ``(N,)`` where **higher = more
informative** (select first). Conventions:

* inputs are converted to ``float64``; the caller's array is never modified;
* invalid input raises :class:`ValueError` with a precise message: wrong number of
  dimensions, fewer than 2 classes, NaN or infinite values, negative probabilities, or a
  row whose sum differs from 1 by more than ``1e-3`` (float16/float32 softmax outputs pass);
* ``0 * log 0 = 0`` (the argument of every ``log`` is clipped to the smallest positive
  float64, and the product with ``p = 0`` is then exactly 0);
* rows are **not** renormalised; a score whose range is documented (entropy in ``[0, 1]``)
  is clipped to that range so that rows summing to ``1 +- 1e-3`` cannot leave it;
* entropies are in nats unless a function says "normalised" (divided by ``log C``);
* ``N = 0`` is allowed and gives an empty result.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

__all__ = [
    "LOGIT_MEASURES",
    "MEASURES",
    "PROB_MEASURES",
    "ROW_SUM_TOLERANCE",
    "SAMPLE_MEASURES",
    "Measure",
    "bald_scores",
    "consensus_entropy_scores",
    "energy_scores",
    "entropy_nats",
    "entropy_scores",
    "kl_to_consensus_scores",
    "least_confidence_scores",
    "margin_scores",
    "mean_entropy_scores",
    "ratio_scores",
    "softmax",
    "validate_probs",
    "variance_scores",
    "vote_entropy_scores",
]


#: Largest allowed ``|sum_c p_c - 1|`` for a probability row.
ROW_SUM_TOLERANCE = 1e-3

_TINY = np.finfo(np.float64).tiny
_SHAPES = {2: "(N, C)", 3: "(N, K, C)"}
_AXES = {2: ("n",), 3: ("n", "k")}


def _as_float64(x: np.ndarray, name: str) -> np.ndarray:
    arr = np.asarray(x)
    if arr.dtype.kind not in "biuf":
        raise ValueError(f"{name} must be a numeric (float) array; got dtype {arr.dtype}")
    return np.array(arr, dtype=np.float64, copy=True)


def _where(mask: np.ndarray, ndim: int) -> str:
    """Human-readable position of the first True entry of a per-row mask."""
    pos = np.unravel_index(int(np.argmax(mask)), mask.shape)
    return ", ".join(f"{a}={int(i)}" for a, i in zip(_AXES[ndim], pos, strict=True))


def validate_probs(probs: np.ndarray, *, ndim: int = 2, name: str = "probs") -> np.ndarray:
    """Validate an array of probability vectors and return it as a new ``float64`` array.

    Args:
        probs: ``(N, C)`` when ``ndim == 2``, ``(N, K, C)`` when ``ndim == 3`` (``K`` MC
            dropout passes or committee members); the last axis holds the classes.
        ndim: expected number of dimensions (2 or 3).
        name: the argument's name, used in error messages.

    Checks, in order (each failure raises ``ValueError`` naming the first offending row):
    numeric dtype; ``probs.ndim == ndim``; ``C >= 2``; ``K >= 1`` for 3-D input; all
    values finite; all values ``>= 0``; every row sum ``s`` with ``|s - 1| <= 1e-3``.
    """
    if ndim not in _SHAPES:
        raise ValueError(f"ndim must be 2 or 3; got {ndim}")
    p = _as_float64(probs, name)
    if p.ndim != ndim:
        raise ValueError(
            f"{name} must be a {ndim}-D array of shape {_SHAPES[ndim]} holding class "
            f"probabilities; got shape {p.shape}"
        )
    if p.shape[-1] < 2:
        raise ValueError(f"{name} must have at least 2 classes (C >= 2); got C={p.shape[-1]}")
    if ndim == 3 and p.shape[1] < 1:
        raise ValueError(f"{name} must hold at least one sample per item (K >= 1); got K=0")
    if p.size == 0:
        return p
    finite = np.isfinite(p)
    if not finite.all():
        bad = ~finite.all(axis=-1)
        raise ValueError(f"{name} contains NaN or infinite values (first at {_where(bad, ndim)})")
    neg = p < 0
    if neg.any():
        bad = neg.any(axis=-1)
        raise ValueError(
            f"{name} contains negative probabilities (min {p.min():.6g}, first at "
            f"{_where(bad, ndim)})"
        )
    dev = np.abs(p.sum(axis=-1) - 1.0)
    if (dev > ROW_SUM_TOLERANCE).any():
        bad = dev > ROW_SUM_TOLERANCE
        first = np.unravel_index(int(np.argmax(bad)), bad.shape)
        raise ValueError(
            f"{name} rows must sum to 1 (tolerance {ROW_SUM_TOLERANCE:g}); the row at "
            f"{_where(bad, ndim)} sums to {p[first].sum():.6g} ({int(bad.sum())} bad rows); "
            "pass probabilities (e.g. softmax(logits)), not logits"
        )
    return p


def _checked(probs: np.ndarray, validate: bool) -> np.ndarray:
    """``validate_probs(probs)``, or — for rows the store already validated on write (the
    mining runner passes ``validate=False``) — just a float64 view, saving three passes."""
    if validate:
        return validate_probs(probs)
    p = np.asarray(probs, dtype=np.float64)
    if p.ndim != 2 or p.shape[-1] < 2:
        raise ValueError(f"probs must have shape (N, C) with C >= 2; got {p.shape}")
    return p


def _xlogx(p: np.ndarray) -> np.ndarray:
    """Elementwise ``p * log p`` with ``0 * log 0 = 0`` (``p >= 0``)."""
    return p * np.log(np.maximum(p, _TINY))


def entropy_nats(p: np.ndarray, axis: int = -1) -> np.ndarray:
    """Shannon entropy ``H(p) = -sum_c p_c log p_c`` in nats along ``axis`` (no validation).

    Internal helper shared with ``miners.bayesian``; ``0 log 0 = 0``.
    """
    return -_xlogx(p).sum(axis=axis)


def softmax(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    """Numerically stable softmax over the last axis.

    ``softmax(z / T)_c = exp((z_c - max_j z_j) / T) / sum_j exp((z_j - max_j z_j) / T)``

    Args:
        logits: ``(N, C)`` float array (any array with classes on the last axis and at least
            one dimension is accepted, e.g. ``(N, K, C)`` MC-dropout logits).
        temperature: ``T > 0``; ``T > 1`` flattens, ``T < 1`` sharpens.

    Returns:
        ``float64`` array of the same shape whose last-axis rows sum to 1.

    Raises:
        ValueError: non-positive or non-finite temperature, 0-D input, or NaN/inf logits.
    """
    t = float(temperature)
    if not np.isfinite(t) or t <= 0:
        raise ValueError(f"temperature must be a finite number > 0; got {temperature!r}")
    z = _as_float64(logits, "logits")
    if z.ndim < 1:
        raise ValueError("logits must have at least one dimension (classes on the last axis)")
    if z.size and not np.isfinite(z).all():
        raise ValueError("logits contains NaN or infinite values")
    if z.size == 0:
        return z
    z -= z.max(axis=-1, keepdims=True)
    if t != 1.0:
        z /= t
    np.exp(z, out=z)
    z /= z.sum(axis=-1, keepdims=True)
    return z


def least_confidence_scores(probs: np.ndarray, *, validate: bool = True) -> np.ndarray:
    """Least confidence: ``s = 1 - max_c p_c``.

    Range ``[0, 1 - 1/C]``: 0 for a one-hot row, ``1 - 1/C`` for the uniform row.
    ``probs``: ``(N, C)``. Returns ``(N,)`` float64, higher = less confident.
    """
    p = _checked(probs, validate)
    return 1.0 - p.max(axis=1) if p.shape[0] else np.zeros(0)


def _top2(p: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Largest and second-largest probability of each row (``p_(1) >= p_(2)``)."""
    c = p.shape[1]
    part = np.partition(p, c - 2, axis=1)
    return part[:, c - 1], part[:, c - 2]


def margin_scores(probs: np.ndarray, *, validate: bool = True) -> np.ndarray:
    """Margin: ``s = 1 - (p_(1) - p_(2))`` with ``p_(1) >= p_(2)`` the two largest probabilities.

    A small top-two gap means an uncertain prediction, so the gap is flipped to keep
    "higher = more informative". Range ``[0, 1]``: 0 for one-hot, 1 when the top two tie
    (e.g. the uniform row). ``probs``: ``(N, C)``. Returns ``(N,)`` float64.
    """
    p = _checked(probs, validate)
    if p.shape[0] == 0:
        return np.zeros(0)
    p1, p2 = _top2(p)
    return 1.0 - (p1 - p2)


def ratio_scores(probs: np.ndarray, *, validate: bool = True) -> np.ndarray:
    """Ratio of confidence: ``s = p_(2) / p_(1)`` (second-largest over largest probability).

    Range ``[0, 1]``: 0 for one-hot, 1 when the top two tie. ``p_(1) >= (1 - 1e-3) / C > 0``
    for any valid row, so the division is always defined. Ranks like margin for ``C = 2``.
    ``probs``: ``(N, C)``. Returns ``(N,)`` float64.
    """
    p = _checked(probs, validate)
    if p.shape[0] == 0:
        return np.zeros(0)
    p1, p2 = _top2(p)
    return p2 / p1


def entropy_scores(probs: np.ndarray, *, validate: bool = True) -> np.ndarray:
    """Normalised predictive entropy: ``s = -sum_c p_c log p_c / log C``.

    Range ``[0, 1]`` (clipped): 0 for one-hot, 1 for uniform; ``0 log 0 = 0``.
    ``probs``: ``(N, C)``. Returns ``(N,)`` float64.
    """
    p = _checked(probs, validate)
    if p.shape[0] == 0:
        return np.zeros(0)
    return np.clip(entropy_nats(p) / np.log(p.shape[1]), 0.0, 1.0)


# -- samples: MC dropout, ensembles, committees ----------------------------------------------

#: Information scores (nats) below this are float64 rounding noise and reported as 0.
_ROUNDING_FLOOR = 1e-12


def _snap(x: np.ndarray) -> np.ndarray:
    return np.where(x < _ROUNDING_FLOOR, 0.0, x)


def _samples(samples: np.ndarray) -> np.ndarray:
    return validate_probs(samples, ndim=3, name="samples")


def mean_entropy_scores(samples: np.ndarray) -> np.ndarray:
    """Expected entropy of the samples: ``s_n = (1/K) sum_k H(p_nk) / log C``.

    ``H(p) = -sum_c p_c log p_c``. This is the aleatoric part of BALD, normalised to
    ``[0, 1]`` (clipped). ``samples``: ``(N, K, C)``. Returns ``(N,)`` float64.
    """
    p = _samples(samples)
    if p.shape[0] == 0:
        return np.zeros(0)
    return np.clip(entropy_nats(p).mean(axis=1) / np.log(p.shape[2]), 0.0, 1.0)


def variance_scores(samples: np.ndarray) -> np.ndarray:
    """Mean predictive variance: ``s_n = (1/C) sum_c Var_k[p_nkc]``.

    ``Var_k`` is the population variance over the ``K`` samples (``ddof = 0``:
    ``(1/K) sum_k (p_nkc - pbar_nc)^2``), so ``K = 1`` gives 0. ``samples``: ``(N, K, C)``.
    Returns ``(N,)`` float64, ``>= 0``.
    """
    p = _samples(samples)
    if p.shape[0] == 0:
        return np.zeros(0)
    return p.var(axis=1).mean(axis=1)


def _bald_nats(p: np.ndarray) -> np.ndarray:
    """``H(mean_k p_k) - mean_k H(p_k)`` per row, unclipped (validated ``(N, K, C)`` input)."""
    return entropy_nats(p.mean(axis=1)) - entropy_nats(p).mean(axis=1)


def bald_scores(samples: np.ndarray) -> np.ndarray:
    """BALD: mutual information between the label and the model parameters.

    ``s_n = I(y_n; w) = H((1/K) sum_k p_nk) - (1/K) sum_k H(p_nk)`` in nats, in
    ``[0, log C]``. The result is ``>= 0`` by concavity of the entropy; values below
    ``1e-12`` nats (rounding noise of the float64 difference, including tiny negatives) are
    reported as exactly 0. 0 when all samples agree; ``log 2`` for the two samples
    ``[1, 0]`` and ``[0, 1]``. ``samples``: ``(N, K, C)``. Returns ``(N,)`` float64.
    """
    p = _samples(samples)
    if p.shape[0] == 0:
        return np.zeros(0)
    return _snap(_bald_nats(p))


def vote_entropy_scores(samples: np.ndarray) -> np.ndarray:
    """Vote entropy of a committee: normalised entropy of the members' hard votes.

    ``v_nc = (1/K) #{k : argmax_j p_nkj = c}``, ``s_n = -sum_c v_nc log v_nc / log C``.
    Ties inside one member's prediction go to the lowest class index (``np.argmax``).
    0 when all members vote alike; the maximum reachable is ``log(min(K, C)) / log C``.
    ``samples``: ``(N, K, C)``. Returns ``(N,)`` float64 in ``[0, 1]``.
    """
    p = _samples(samples)
    n, k, c = p.shape
    if n == 0:
        return np.zeros(0)
    votes = p.argmax(axis=2)  # (N, K)
    counts = np.zeros((n, c), dtype=np.float64)
    rows = np.broadcast_to(np.arange(n)[:, None], votes.shape)
    np.add.at(counts, (rows.ravel(), votes.ravel()), 1.0)
    return np.clip(entropy_nats(counts / k) / np.log(c), 0.0, 1.0)


def consensus_entropy_scores(samples: np.ndarray) -> np.ndarray:
    """Consensus entropy: normalised entropy of the mean prediction.

    ``pbar_n = (1/K) sum_k p_nk``, ``s_n = -sum_c pbar_nc log pbar_nc / log C`` in ``[0, 1]``.
    ``samples``: ``(N, K, C)``. Returns ``(N,)`` float64.
    """
    p = _samples(samples)
    if p.shape[0] == 0:
        return np.zeros(0)
    return np.clip(entropy_nats(p.mean(axis=1)) / np.log(p.shape[2]), 0.0, 1.0)


def kl_to_consensus_scores(samples: np.ndarray) -> np.ndarray:
    """Mean KL divergence of each member to the consensus (McCallum & Nigam 1998).

    ``s_n = (1/K) sum_k KL(p_nk || pbar_n)``,
    ``KL(p || q) = sum_c p_c (log p_c - log q_c)`` with ``0 log 0 = 0``; in nats, ``>= 0``
    (values below ``1e-12``, i.e. rounding noise, are reported as exactly 0). ``p_nkc > 0`` implies ``pbar_nc > 0``, so the
    divergence is always finite. Equals BALD when the committee are posterior samples.
    ``samples``: ``(N, K, C)``. Returns ``(N,)`` float64.
    """
    p = _samples(samples)
    if p.shape[0] == 0:
        return np.zeros(0)
    log_mean = np.log(np.maximum(p.mean(axis=1, keepdims=True), _TINY))  # (N, 1, C)
    kl = (_xlogx(p) - p * log_mean).sum(axis=2)  # (N, K)
    return _snap(kl.mean(axis=1))


# -- logits ----------------------------------------------------------------------------------


def energy_scores(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    """Free energy of the logits (Liu et al. 2020, "Energy-based OOD detection"):
    ``E(x) = -T log sum_c exp(f_c(x) / T)``, computed stably as
    ``-T (m + log sum_c exp(f_c/T - m))`` with ``m = max_c f_c / T``.

    In-distribution inputs get large logits and so **low** energy (the paper's confidence
    score is ``-E``); the ``activation`` miner ranks out-of-distribution items first, so this
    returns ``E`` itself: **higher = more out-of-distribution**.

    Args:
        logits: ``(N, C)`` finite pre-softmax logits, ``C >= 1``.
        temperature: ``T > 0``.
    """
    z = _as_float64(logits, "logits")
    if z.ndim != 2:
        raise ValueError(f"logits must be a 2-D array of shape (N, C); got shape {z.shape}")
    if z.size and not np.isfinite(z).all():
        bad = np.argwhere(~np.isfinite(z))[0]
        raise ValueError(f"logits must be finite; row {int(bad[0])}, column {int(bad[1])} is "
                         f"{z[bad[0], bad[1]]}")
    if z.shape[1] < 1:
        raise ValueError("logits must have at least one class (C >= 1); got C=0")
    try:
        t = float(temperature)
    except (TypeError, ValueError):
        raise ValueError(f"temperature must be a number; got {temperature!r}") from None
    if not np.isfinite(t) or t <= 0:
        raise ValueError(f"temperature must be a finite number > 0; got {temperature!r}")
    z = z / t
    m = z.max(axis=1) if z.shape[0] else np.zeros(0)
    lse = m + np.log(np.exp(z - m[:, None]).sum(axis=1))
    return -t * lse


# -- the tables ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Measure:
    """A named measure: ``fn`` maps the ``reads`` array (``probs``, ``samples`` or
    ``logits``) to one score per item; ``help`` is the one-line description the miners and
    ``assay miners`` show."""

    name: str
    reads: str
    fn: Callable[..., np.ndarray]
    help: str


def _table(reads: str, *rows: tuple[str, Callable[..., np.ndarray], str]) -> dict[str, Measure]:
    return {name: Measure(name, reads, fn, text) for name, fn, text in rows}


#: From class probabilities ``(N, C)``; each takes ``validate=False`` for rows already checked.
PROB_MEASURES: dict[str, Measure] = _table(
    "probs",
    ("least_confidence", least_confidence_scores, "1 − max probability"),
    ("margin", margin_scores, "1 − (p₁ − p₂): small gap between the top two classes"),
    ("ratio", ratio_scores, "p₂ / p₁: ratio of confidence of the top two classes"),
    ("entropy", entropy_scores, "prediction entropy, normalised to [0, 1]"),
)
#: From MC-dropout / ensemble / committee samples ``(N, K, C)``.
SAMPLE_MEASURES: dict[str, Measure] = _table(
    "samples",
    ("mean_entropy", mean_entropy_scores, "mean entropy of the K sampled predictions"),
    ("variance", variance_scores, "variance of class probabilities across the K samples"),
    ("bald", bald_scores, "BALD: mutual information between prediction and model parameters"),
    ("vote_entropy", vote_entropy_scores, "committee: entropy of the members' votes"),
    ("consensus_entropy", consensus_entropy_scores, "committee: entropy of the mean prediction"),
    ("kl_to_consensus", kl_to_consensus_scores, "committee: mean KL divergence of members to the consensus"),
)
#: From logits ``(N, C)``.
LOGIT_MEASURES: dict[str, Measure] = _table(
    "logits",
    ("energy", energy_scores, "free energy −T·logsumexp(logits/T): high = out of distribution"),
)
#: Every measure by name.
MEASURES: dict[str, Measure] = {**PROB_MEASURES, **SAMPLE_MEASURES, **LOGIT_MEASURES}
