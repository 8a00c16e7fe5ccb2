"""Per-image summaries of a segmentation model's pixel uncertainty (pure NumPy).

A segmentation model gives, per image, a ``(C, H, W)`` map of class probabilities. assay
never stores those maps (a 512×512 image with 21 classes is 22 MB of float32): the inference
runner reduces each batch to the per-image numbers below as it goes, and only those are
written to ``pred_<model>`` (:data:`indexing.schema.SEG_STRUCT`). Everything here works on
one batch at a time and keeps no state but running sums (:class:`PixelBald`).

Notation: ``p[n, :, y, x]`` the class probabilities of pixel ``(y, x)`` of image ``n``
(``C >= 2`` classes, ``P = H * W`` pixels), ``log`` the natural logarithm, ``0 log 0 = 0``.

* pixel entropy, normalised to ``[0, 1]``:
  ``h[n, y, x] = -sum_c p[n, c, y, x] log p[n, c, y, x] / log C``
  (0 for a one-hot pixel, 1 for a uniform one; clipped to ``[0, 1]``);
* ``mean_entropy[n] = (1 / P) sum_{y, x} h[n, y, x]``;
* ``topq_entropy[n]`` = the mean of the ``k = ceil(q * P)`` largest ``h[n]`` (at least one
  pixel): how uncertain the most uncertain ``q`` of the image is — a small confused
  object does not vanish in the image mean. ``topq_entropy >= mean_entropy`` always;
* ``class_uncertain_fraction[n, c] = #{pixels with a[n] = c and h[n] > t} / #{pixels with
  a[n] = c}`` where ``a[n, y, x] = argmax_c p[n, c, y, x]`` (ties to the lowest class) and
  ``t`` the threshold; 0 when no pixel is predicted as ``c``;
* ``uncertainty_map[n]``: ``h[n]`` average-pooled to ``S x S`` cells with adaptive pooling
  (cell ``(i, j)`` averages rows ``floor(i H / S) .. ceil((i + 1) H / S) - 1`` and columns
  alike; the cells of ``torch.nn.functional.adaptive_avg_pool2d``);
* pixel BALD from ``T`` stochastic passes ``p_t`` (MC dropout), in **nats**:
  ``bald[n] = (1 / P) sum_{y, x} [ H(mean_t p_t[n, :, y, x]) - mean_t H(p_t[n, :, y, x]) ]``
  with ``H(v) = -sum_c v_c log v_c`` — the mutual information between a pixel's label and
  the model's weights (Gal et al. 2017), averaged over the image; ``>= 0`` by concavity
  (per-pixel rounding noise below zero is clipped). Like :func:`indexing.measures.bald_scores`
  it is in nats, in ``[0, log C]``.

Inputs are ``(N, C, H, W)`` (the layout of PyTorch segmentation heads) or, for BALD,
``(T, N, C, H, W)``. Probabilities are validated (finite, ``>= 0``, summing to 1 over the
class axis within ``1e-3``) unless the caller produced them itself (``validate=False``);
errors are ``ValueError`` naming the image and the pixel. Logits are turned into
probabilities by a softmax over the class axis. NumPy only; imports nothing of assay but
the leaf :mod:`indexing.measures`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from indexing.measures import ROW_SUM_TOLERANCE, entropy_nats, softmax

__all__ = [
    "PixelBald",
    "SegmentationSummaries",
    "average_pool",
    "class_uncertain_fractions",
    "pixel_bald",
    "pixel_entropy",
    "pixel_probs",
    "segmentation_summaries",
    "summary_scores",
    "top_count",
    "topq_mean",
    "validate_pixel_probs",
]


def _as_float(x: np.ndarray, name: str) -> np.ndarray:
    """The array as it is when it holds floats (no copy), else as float64."""
    arr = np.asarray(x)
    if arr.dtype.kind not in "biuf":
        raise ValueError(f"{name} must be a numeric (float) array; got dtype {arr.dtype}")
    return arr if arr.dtype.kind == "f" else arr.astype(np.float64)


def _pixel(index: tuple[int, ...], lead: tuple[str, ...]) -> str:
    """'image n=1, pixel (y=2, x=3)' (with 'pass t=0, ' first for 5-D input)."""
    names = [f"{a}={int(i)}" for a, i in zip(lead, index[:len(lead)], strict=True)]
    y, x = index[-2], index[-1]
    return ", ".join(("pass " if a.startswith("t") else "image ") + a for a in names) + f", pixel (y={y}, x={x})"


def validate_pixel_probs(probs: np.ndarray, *, name: str = "probs", ndim: int = 4) -> np.ndarray:
    """Check a map of class probabilities and return it (as it is when it holds floats).

    ``probs``: ``(N, C, H, W)`` (``ndim=4``) or ``(T, N, C, H, W)`` (``ndim=5``, ``T``
    stochastic passes), classes on axis ``ndim - 3``. Raises ``ValueError``, naming the
    first offending image and pixel, for: another number of dimensions, ``C < 2``, an empty
    image (``H = 0`` or ``W = 0``), NaN or infinite values, negative values, a pixel whose
    probabilities do not sum to 1 within ``1e-3``.
    """
    p = _as_float(probs, name)
    shape = "(N, C, H, W)" if ndim == 4 else "(T, N, C, H, W)"
    if p.ndim != ndim:
        raise ValueError(f"{name} must be a {ndim}-D array {shape} of per-pixel class probabilities; "
                         f"got shape {p.shape}")
    axis = ndim - 3
    if p.shape[axis] < 2:
        raise ValueError(f"{name} must have at least 2 classes on axis {axis} (C >= 2); got C={p.shape[axis]}")
    if p.shape[-1] == 0 or p.shape[-2] == 0:
        raise ValueError(f"{name} has empty images (H={p.shape[-2]}, W={p.shape[-1]})")
    if p.size == 0:
        return p
    lead = ("n",) if ndim == 4 else ("t", "n")
    finite = np.isfinite(p)
    if not finite.all():
        bad = np.unravel_index(int(np.argmax(~finite.all(axis=axis))), p.shape[:axis] + p.shape[axis + 1:])
        raise ValueError(f"{name} contains NaN or infinite values (first at {_pixel(bad, lead)})")
    if (p < 0).any():
        bad = np.unravel_index(int(np.argmax((p < 0).any(axis=axis))), p.shape[:axis] + p.shape[axis + 1:])
        raise ValueError(f"{name} contains negative probabilities (min {p.min():.6g}, first at {_pixel(bad, lead)})")
    sums = p.sum(axis=axis, dtype=np.float64)
    off = np.abs(sums - 1.0) > ROW_SUM_TOLERANCE
    if off.any():
        bad = np.unravel_index(int(np.argmax(off)), off.shape)
        raise ValueError(
            f"{name}: the class probabilities of {_pixel(bad, lead)} sum to {sums[bad]:.6g}, not 1 "
            f"(tolerance {ROW_SUM_TOLERANCE:g}; {int(off.sum())} such pixels); pass probabilities "
            f"(a softmax over the class axis {axis}), or pass logits instead")
    return p


def _check_logits(logits: np.ndarray) -> np.ndarray:
    z = _as_float(logits, "logits")
    if z.ndim != 4:
        raise ValueError(f"logits must be a 4-D array (N, C, H, W); got shape {z.shape}")
    if z.shape[1] < 2:
        raise ValueError(f"logits must have at least 2 classes on axis 1 (C >= 2); got C={z.shape[1]}")
    if z.size and not np.isfinite(z).all():
        bad = np.unravel_index(int(np.argmax(~np.isfinite(z).all(axis=1))), z.shape[:1] + z.shape[2:])
        raise ValueError(f"logits contains NaN or infinite values (first at {_pixel(bad, ('n',))})")
    return z


def _checked(probs: np.ndarray | None, logits: np.ndarray | None, validate: bool) -> tuple[np.ndarray, bool]:
    """(the batch as given, whether it holds logits), checked; nothing converted yet."""
    if (probs is None) == (logits is None):
        raise ValueError("give probs or logits (one of them)")
    if logits is not None:
        return _check_logits(logits), True
    if validate:
        return validate_pixel_probs(probs), False
    p = _as_float(probs, "probs")
    if p.ndim != 4 or p.shape[1] < 2:
        raise ValueError(f"probs must have shape (N, C, H, W) with C >= 2; got {p.shape}")
    return p, False


def _as_probs(x: np.ndarray, is_logits: bool) -> np.ndarray:
    """float64 probabilities of a checked slice (softmax over axis 1 for logits)."""
    if is_logits:
        return np.moveaxis(softmax(np.moveaxis(x, 1, -1)), -1, 1)
    return np.asarray(x, dtype=np.float64)


def pixel_probs(probs: np.ndarray | None = None, *, logits: np.ndarray | None = None,
                validate: bool = True) -> np.ndarray:
    """``(N, C, H, W)`` float64 probabilities from exactly one of ``probs`` (validated unless
    ``validate=False``) or ``logits`` (``softmax`` over the class axis 1)."""
    return _as_probs(*_checked(probs, logits, validate))


def pixel_entropy(probs: np.ndarray) -> np.ndarray:
    """Normalised pixel entropy ``h = -sum_c p_c log p_c / log C`` in ``[0, 1]``:
    ``(N, C, H, W)`` valid probabilities -> ``(N, H, W)`` float64 (no validation)."""
    p = np.asarray(probs, dtype=np.float64)
    return np.clip(entropy_nats(p, axis=1) / math.log(p.shape[1]), 0.0, 1.0)


def top_count(q: float, pixels: int) -> int:
    """``k = ceil(q * P)``, at least 1 and at most ``P`` (``q * P`` within ``1e-9`` of an
    integer counts as that integer, so that ``0.05 * 100`` is 5, not 6)."""
    if not 0.0 < q <= 1.0:
        raise ValueError(f"top_q must be a fraction in (0, 1]; got {q!r}")
    return int(min(pixels, max(1, math.ceil(q * pixels - 1e-9))))


def topq_mean(entropy: np.ndarray, q: float) -> np.ndarray:
    """Mean of the ``ceil(q * H * W)`` largest values of each ``(H, W)`` map: ``(N, H, W)`` -> ``(N,)``."""
    h = np.asarray(entropy, dtype=np.float64)
    flat = h.reshape(h.shape[0], -1)
    pixels = flat.shape[1]
    k = top_count(q, pixels)
    if flat.shape[0] == 0:
        return np.zeros(0)
    return np.partition(flat, pixels - k, axis=1)[:, pixels - k:].mean(axis=1)


def class_uncertain_fractions(probs: np.ndarray, entropy: np.ndarray, threshold: float) -> np.ndarray:
    """``(N, C)``: of the pixels whose argmax class is ``c``, the fraction with ``entropy > threshold``
    (0 where no pixel is predicted as ``c``). ``probs`` ``(N, C, H, W)``, ``entropy`` ``(N, H, W)``."""
    p = np.asarray(probs)
    n, c = p.shape[:2]
    top = p.argmax(axis=1).reshape(n, -1)  # ties go to the lowest class
    cell = (np.arange(n)[:, None] * c + top).ravel()
    uncertain = (np.asarray(entropy).reshape(n, -1) > threshold).ravel()
    total = np.bincount(cell, minlength=n * c).reshape(n, c)
    hits = np.bincount(cell, weights=uncertain, minlength=n * c).reshape(n, c)
    return np.divide(hits, total, out=np.zeros((n, c)), where=total > 0)


def _bins(length: int, size: int) -> tuple[np.ndarray, np.ndarray]:
    i = np.arange(size)
    return (i * length) // size, -((-(i + 1) * length) // size)  # floor(i L / S), ceil((i + 1) L / S)


def average_pool(maps: np.ndarray, size: int) -> np.ndarray:
    """Adaptive average pooling of ``(N, H, W)`` maps to ``(N, size, size)`` (the cells of
    ``torch.nn.functional.adaptive_avg_pool2d``; an image smaller than ``size`` repeats
    pixels), by summed-area tables: ``O(N H W)``."""
    m = np.asarray(maps, dtype=np.float64)
    if m.ndim != 3:
        raise ValueError(f"maps must be (N, H, W); got shape {m.shape}")
    if not isinstance(size, int) or size < 1:
        raise ValueError(f"size must be a positive integer; got {size!r}")
    n, h, w = m.shape
    table = np.zeros((n, h + 1, w + 1))
    table[:, 1:, 1:] = m.cumsum(axis=1).cumsum(axis=2)
    y0, y1 = _bins(h, size)
    x0, x1 = _bins(w, size)
    sums = (table[:, y1[:, None], x1[None, :]] - table[:, y0[:, None], x1[None, :]]
            - table[:, y1[:, None], x0[None, :]] + table[:, y0[:, None], x0[None, :]])
    return sums / ((y1 - y0)[:, None] * (x1 - x0)[None, :])


@dataclass
class SegmentationSummaries:
    """One batch's summaries: ``(N,)`` arrays, ``class_uncertain_fraction`` ``(N, C)``,
    ``uncertainty_map`` ``(N, S, S)`` (None when not asked), ``bald`` ``(N,)`` (None without
    stochastic passes)."""

    mean_entropy: np.ndarray
    topq_entropy: np.ndarray
    class_uncertain_fraction: np.ndarray
    uncertainty_map: np.ndarray | None = None
    bald: np.ndarray | None = None


def segmentation_summaries(probs: np.ndarray | None = None, *, logits: np.ndarray | None = None,
                           top_q: float = 0.05, uncertain_threshold: float = 0.5,
                           map_size: int | None = 16, validate: bool = True) -> SegmentationSummaries:
    """The per-image summaries (module docstring) of one batch of ``(N, C, H, W)``
    probabilities or logits. ``map_size=None`` skips the uncertainty map. Images are reduced
    one at a time, so float64 temporaries stay at one image's ``C x H x W``."""
    batch, is_logits = _checked(probs, logits, validate)
    if not 0.0 <= uncertain_threshold < 1.0:
        raise ValueError(f"uncertain_threshold must be in [0, 1); got {uncertain_threshold!r}")
    n, c, h, w = batch.shape
    k = top_count(top_q, h * w)
    mean, topq = np.zeros(n), np.zeros(n)
    fractions = np.zeros((n, c))
    pooled = np.zeros((n, map_size, map_size)) if map_size else None
    for i in range(n):
        p = _as_probs(batch[i:i + 1], is_logits)
        ent = pixel_entropy(p)  # (1, H, W)
        mean[i] = ent.mean()
        flat = ent.reshape(-1)
        topq[i] = np.partition(flat, flat.size - k)[flat.size - k:].mean()
        fractions[i] = class_uncertain_fractions(p, ent, uncertain_threshold)[0]
        if pooled is not None:
            pooled[i] = average_pool(ent, map_size)[0]
    return SegmentationSummaries(mean, topq, fractions, pooled)


class PixelBald:
    """Pixel BALD accumulated pass by pass, so the ``T`` stochastic maps of a batch are never
    held together: ``add(p_t)`` for each pass (``(N, C, H, W)`` probabilities), then
    :meth:`result` -> ``(N,)`` image means of ``H(mean_t p_t) - mean_t H(p_t)`` in nats."""

    def __init__(self) -> None:
        self.passes = 0
        self._sum_p: np.ndarray | None = None
        self._sum_h: np.ndarray | None = None

    def add(self, probs: np.ndarray, *, validate: bool = True) -> None:
        p = pixel_probs(probs, validate=validate)
        if self._sum_p is not None and p.shape != self._sum_p.shape:
            raise ValueError(f"pass {self.passes} has shape {p.shape}; the earlier passes {self._sum_p.shape}")
        h = entropy_nats(p, axis=1)
        if self._sum_p is None:
            self._sum_p, self._sum_h = p.copy(), h
        else:
            self._sum_p += p
            self._sum_h += h
        self.passes += 1

    def result(self) -> np.ndarray:
        if self._sum_p is None:
            raise ValueError("pixel BALD needs at least one stochastic pass")
        t = self.passes
        info = entropy_nats(self._sum_p / t, axis=1) - self._sum_h / t  # (N, H, W)
        return np.maximum(info, 0.0).reshape(info.shape[0], -1).mean(axis=1)


def pixel_bald(samples: np.ndarray, *, validate: bool = True) -> np.ndarray:
    """Pixel BALD of ``(T, N, C, H, W)`` probabilities (``T`` stochastic passes): ``(N,)``
    in nats (module docstring)."""
    s = validate_pixel_probs(samples, name="samples", ndim=5) if validate else _as_float(samples, "samples")
    if s.ndim != 5 or s.shape[0] < 1:
        raise ValueError(f"samples must be (T, N, C, H, W) with T >= 1; got shape {s.shape}")
    acc = PixelBald()
    for t in range(s.shape[0]):
        acc.add(s[t], validate=False)
    return acc.result()


#: The per-image summaries a miner may rank by (``pred_<model>.<name>``).
RANKABLE = ("topq_entropy", "mean_entropy", "bald", "class_uncertain_fraction")


def summary_scores(values: np.ndarray, class_index: int | None = None) -> np.ndarray:
    """Scores of images (higher = more worth labeling) from one stored summary.

    ``values``: ``(N,)`` — ``mean_entropy``, ``topq_entropy`` or ``bald`` — returned as
    they are (float64); or ``(N, C)`` ``class_uncertain_fraction``
    ``f[n, c] = #{a = c, h > t} / #{a = c}``: column ``class_index``, or without one
    ``max_c f[n, c]`` (an image where some class is mostly uncertain ranks high).
    """
    v = np.asarray(values, dtype=np.float64)
    if v.ndim == 1:
        return v
    if v.ndim != 2:
        raise ValueError(f"values must be (N,) or (N, C); got shape {v.shape}")
    if class_index is not None:
        return v[:, class_index]
    return v.max(axis=1) if v.shape[0] else np.zeros(0)
