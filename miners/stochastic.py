"""Stochastic batch acquisition (Kirsch, Farquhar, Atighehchian, Jesson, Branchaud-Charron & Gal,
"Stochastic Batch Acquisition: A Simple Baseline for Deep Active Learning", TMLR 2023).

Instead of taking the top-``k`` of an acquisition score (which fills a batch with
near-duplicates), sample ``k`` items *without replacement* with probabilities that grow
with the score. The Gumbel-top-k trick does this in one pass: with i.i.d. standard Gumbel
noise ``g_i``, the indices of the ``k`` largest ``log w_i + g_i`` are distributed as ``k``
successive draws without replacement with probabilities proportional to ``w_i``
(Plackett-Luce). :func:`stochastic_scores` returns the perturbed keys; the caller takes
their top-``k`` exactly as for deterministic scores (higher = select first).

Modes (``T`` = temperature ``> 0``; ``beta = 1/T`` in the paper's notation):

* ``"softmax"``: ``key_i = s_i / T + g_i``, i.e. ``w_i = exp(s_i / T)``;
* ``"power"``: ``key_i = log(s_i) / T + g_i``, i.e. ``w_i = s_i^(1/T)``; needs ``s_i >= 0``
  and a zero score gives ``-inf`` (never drawn while a positive score is left);
* ``"softrank"``: ``key_i = -log(r_i) / T + g_i``, i.e. ``w_i = r_i^(-1/T)`` with
  ``r_i`` the rank (1 = highest score; ties broken by lower index first).

Streaming: ``"softmax"`` and ``"power"`` keys depend only on the item's own score, so the
runner computes them chunk by chunk and keeps a running top-``k`` over a pool that is never
loaded whole. ``"softrank"`` needs every score of the pool to know the ranks, so the runner
uses it only when the scores are held in memory.

As ``T -> 0`` every mode converges to the deterministic top-``k`` of ``s``.
"""

from __future__ import annotations

import numbers

import numpy as np

__all__ = ["STOCHASTIC_MODES", "gumbel_noise", "stochastic_scores"]

STOCHASTIC_MODES = ("softmax", "power", "softrank")


def _check_rng(rng: object) -> np.random.Generator:
    if not isinstance(rng, np.random.Generator):
        raise ValueError(
            f"rng must be a numpy.random.Generator (e.g. np.random.default_rng(seed)); "
            f"got {type(rng).__name__}"
        )
    return rng


def gumbel_noise(n: int, rng: np.random.Generator) -> np.ndarray:
    """``n`` i.i.d. standard Gumbel draws ``g = -log(-log U)``, ``U ~ Uniform(0, 1)``.

    Density ``exp(-(g + exp(-g)))``; mean ``0.5772`` (Euler's constant). Drawn with
    ``rng.gumbel`` so a given generator state always gives the same noise.
    Returns a ``float64`` array of shape ``(n,)``.
    """
    if isinstance(n, bool) or not isinstance(n, numbers.Integral) or n < 0:
        raise ValueError(f"n must be a non-negative integer; got {n!r}")
    return _check_rng(rng).gumbel(0.0, 1.0, size=int(n)).astype(np.float64, copy=False)


def stochastic_scores(
    scores: np.ndarray,
    mode: str = "power",
    temperature: float = 1.0,
    *,
    rng: np.random.Generator | None = None,
    noise: np.ndarray | None = None,
) -> np.ndarray:
    """Gumbel-perturbed acquisition keys whose top-``k`` is a sample without replacement.

    ``key_i = f(s_i) / T + g_i`` with ``g_i`` from :func:`gumbel_noise` and
    ``f(s) = s`` (``"softmax"``), ``log s`` (``"power"``) or ``-log rank(s)``
    (``"softrank"``); see the module docstring. The top-``k`` of the keys is then ``k``
    draws without replacement with probabilities proportional to ``exp(f(s_i) / T)``.

    Args:
        scores: ``(N,)`` float acquisition scores, higher = more informative. Must be
            finite; ``"power"`` also needs ``scores >= 0``.
        mode: ``"power"`` (default), ``"softmax"`` or ``"softrank"``.
        temperature: ``T > 0``; small ``T`` approaches the deterministic top-``k``, large
            ``T`` approaches uniform random sampling.
        rng: the generator that draws the noise (seed it for reproducibility), or
        noise: ``(N,)`` standard Gumbel noise drawn by the caller — the mining runner derives
            it from (seed, row id) so that a streamed pool gets the same noise
            whatever its chunking. Exactly one of ``rng`` and ``noise``.

    Returns:
        ``(N,)`` float64 keys (``-inf`` for zero scores in ``"power"`` mode).

    Raises:
        ValueError: unknown mode, bad temperature, non-1-D or non-finite scores, negative
            scores in ``"power"`` mode, or ``rng`` not a ``numpy.random.Generator``.
    """
    if mode not in STOCHASTIC_MODES:
        raise ValueError(f"mode must be one of {', '.join(STOCHASTIC_MODES)}; got {mode!r}")
    t = float(temperature)
    if not np.isfinite(t) or t <= 0:
        raise ValueError(f"temperature must be a finite number > 0; got {temperature!r}")
    if (rng is None) == (noise is None):
        raise ValueError("give exactly one of rng and noise")
    if rng is not None:
        _check_rng(rng)
    arr = np.asarray(scores)
    if arr.dtype.kind not in "biuf":
        raise ValueError(f"scores must be a numeric array; got dtype {arr.dtype}")
    s = arr.astype(np.float64)
    if s.ndim != 1:
        raise ValueError(f"scores must be a 1-D array of shape (N,); got shape {s.shape}")
    if not np.isfinite(s).all():
        bad = int(np.argmax(~np.isfinite(s)))
        raise ValueError(f"scores contains NaN or infinite values (first at index {bad})")
    n = s.shape[0]
    if mode == "softmax":
        base = s / t
    elif mode == "power":
        if (s < 0).any():
            bad = int(np.argmax(s < 0))
            raise ValueError(
                f"power mode needs scores >= 0; scores[{bad}] = {s[bad]:.6g} (use mode "
                "'softmax' or 'softrank' for signed scores)"
            )
        with np.errstate(divide="ignore"):
            base = np.log(s) / t  # log 0 = -inf: never drawn before a positive score
    else:
        order = np.argsort(-s, kind="stable")
        ranks = np.empty(n, dtype=np.float64)
        ranks[order] = np.arange(1, n + 1, dtype=np.float64)
        base = -np.log(ranks) / t
    if noise is not None:
        noise = np.asarray(noise, dtype=np.float64)
        if noise.shape != (n,):
            raise ValueError(f"noise must have shape ({n},); got {noise.shape}")
        return base + noise
    return base + gumbel_noise(n, rng)
