"""Diversity miners on embeddings: k-center greedy (coreset), BADGE and Cluster-Margin.

Pure array code (NumPy; PyTorch only for the k-center inner loop on a GPU or when asked).
No function here ever builds an ``N x N`` matrix: memory is the input plus ``O(N)`` (k-center,
Cluster-Margin) or ``O(N (C + D))`` (BADGE, the size of its inputs).

Conventions
-----------
* Row indices into the arrays passed in are returned as ``int64`` arrays, in pick order.
* Invalid input raises :class:`ValueError` with a precise message: wrong number of
  dimensions or mismatched shapes, NaN / infinite values (naming the first bad row), a
  ``size`` outside ``[0, N]``, unknown options.
* Everything is deterministic: the same input and ``seed`` give the same picks. Ties are
  broken by the smallest row index.

k-center greedy (Sener & Savarese 2018, "coreset")
--------------------------------------------------
Given centres ``S`` (the reference points, then the picks so far) each pool point has
``mind(x) = min_{s in S} ||x - s||``; the next pick is ``argmax_x mind(x)`` and ``mind`` is
updated with the new centre ``c``: ``mind(x) <- min(mind(x), ||x - c||)``. One ``(N,)``
vector is kept; every update streams the ``N x d`` pool once, so the cost is
``O(N (L + b) d)`` time and ``O(N)`` extra memory.

Squared distances are computed in float32 as ``|x|^2 + |c|^2 - 2 x.c`` clamped at 0. The dot
products ``x.c`` of an update use ``np.vecdot`` on blocks of rows (one BLAS ``sdot`` per
row; ``np.einsum("ij,j->i")`` on NumPy < 2): its rounding depends only on the row and the
centre, never on which other rows share the call (BLAS ``gemv`` does not have this
property), so identical rows get bit-identical distances (the smallest index wins their
tie) and the pruned and unpruned algorithms see the very same numbers. Blocks are spread
over a few threads (NumPy releases the GIL). On CUDA (PyTorch) the products accumulate in
float64 and are rounded to float32. Precision: the expansion loses about
``1e-7 |x|^2`` absolutely, so points much farther from the origin than from each other
(un-centred data) get coarser distances; near-ties at that level are then broken by
rounding, not by index, on the torch path (the NumPy path stays self-consistent).

**Pruning** (triangle inequality). Every point has an ``owner``: the centre ``a`` that
realises ``mind(x)``; every centre has a cell radius ``R_a >= max_{owner(x) = a} mind(x)``. A
new centre ``c`` cannot bring any point of ``a``'s cell closer when ``||c - a|| >= 2 R_a``,
because then ``||x - c|| >= ||c - a|| - ||x - a|| >= 2 R_a - R_a >= mind(x)``. The same
argument per point (Elkan's bound) skips every ``x`` with ``||c - owner(x)|| >= 2 mind(x)``,
which covers the points near their centre inside a large cell too. Per pick: the distances
from ``c`` to all ``L + i`` centres (``O((L + i) d)``); if no cell passes the cell test,
nothing is recomputed; else one ``O(N)`` pass over ``owner``/``mind`` selects the points
that pass the per-point test, and only those are recomputed (gathered in small cache-sized
batches, or streamed when a block is dense). Cell radii are then tightened in ``O(#selected
+ #centres)``: a skipped point has ``mind <= min(R_a, ||c - a||^2 / 4)``.

Both tests are made safe against float32 rounding: with ``kappa`` a bound on the absolute
error of any computed squared distance (``8 (d + 8) 2^-24 max|x|^2``, ``max|x|^2 = 1`` for
cosine), the centre distance used is ``D_low = sqrt(max(D^2 - kappa, 0))`` (``D^2`` computed)
and a point is skipped only when ``D_low >= 2 (sqrt(mind(x)) + sqrt(kappa))`` (cells: with
``R_a``). This implies that the *computed* ``||x - c||^2`` is ``>=`` the stored ``mind(x)``:
the skipped points would not have changed, so the picks, the radii and every ``mind`` value
are bit-for-bit those of the unpruned algorithm. Pruning pays on clustered data once the
covering radius is smaller than the distances between clusters; on isotropic
high-dimensional data nothing can be pruned and the overhead is a few ``O(N)`` vector
operations per pick (about 5 % at ``d = 384``).

BADGE (Ash et al. 2020)
-----------------------
The gradient embedding of the last layer for the hallucinated label ``y^ = argmax p`` is
``g = (p - e_y^) (x) h`` (``C * D`` numbers per row); k-means++ seeding on the ``g`` picks the
batch. It is never materialised: with ``a = p - e_y^``,
``||g_i - g_j||^2 = |a_i|^2 |h_i|^2 + |a_j|^2 |h_j|^2 - 2 (a_i . a_j)(h_i . h_j)``.
"""

from __future__ import annotations

import math
import os
import sys
import time
import warnings
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Literal

import numpy as np

from indexing.settings import CLUSTER_MARGIN_MAX_CLUSTERS, CLUSTER_MARGIN_SAMPLE
from miners.uncertainty import validate_probs

__all__ = ["badge_select", "cluster_margin_select", "kcenter_greedy"]

_U32 = 2.0**-24  # unit roundoff of float32
_GATHER_ROWS = 256  # rows gathered (copied) at a time on the pruned path: stays in L2
_MAX_THREADS = 8
_DENSE = 0.4  # a gathered row costs ~2.5x a streamed one


# ----------------------------------------------------------------------------- validation


def _check_size(size: Any, n: int, what: str = "pool") -> int:
    if isinstance(size, bool) or not isinstance(size, int | np.integer):
        raise ValueError(f"size must be an integer; got {size!r}")
    size = int(size)
    if not 0 <= size <= n:
        raise ValueError(f"size must be in [0, N] = [0, {n}] ({what} has {n} rows); got {size}")
    return size


def _as_matrix(x: Any, name: str, dtype: type = np.float32) -> np.ndarray:
    """``x`` as a C-contiguous 2-D array of ``dtype`` (no copy when it already is one)."""
    arr = np.asarray(x)
    if arr.dtype.kind not in "biuf":
        raise ValueError(f"{name} must be a numeric (float) array; got dtype {arr.dtype}")
    if arr.ndim != 2:
        raise ValueError(f"{name} must be a 2-D array of shape (N, d); got shape {arr.shape}")
    return np.ascontiguousarray(arr, dtype=dtype)


def _row_sqnorms(x: np.ndarray, name: str, block_rows: int) -> np.ndarray:
    """Squared row norms (float32, ``einsum`` per row); rejects NaN/inf and overflow."""
    out = np.empty(x.shape[0], dtype=np.float32)
    for s in range(0, x.shape[0], block_rows):
        e = min(s + block_rows, x.shape[0])
        with np.errstate(over="ignore", invalid="ignore"):
            np.einsum("ij,ij->i", x[s:e], x[s:e], out=out[s:e])
        bad = ~np.isfinite(out[s:e])
        if bad.any():
            row = s + int(np.argmax(bad))
            what = ("NaN or infinite values" if not np.isfinite(x[row]).all()
                    else "values so large that its squared norm overflows float32")
            raise ValueError(f"{name} row {row} has {what}")
    return out


def _check_finite_rows(x: np.ndarray, name: str) -> None:
    block_rows = max(1, (1 << 20) // max(1, x.shape[1]))  # ~1 MB of booleans at a time
    for s in range(0, x.shape[0], block_rows):
        blk = x[s:s + block_rows]
        ok = np.isfinite(blk).all(axis=1)
        if not ok.all():
            raise ValueError(f"{name} row {s + int(np.argmin(ok))} has NaN or infinite values")


def _n_threads() -> int:
    try:
        n = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        n = os.cpu_count() or 1
    return max(1, min(n, _MAX_THREADS))


# ----------------------------------------------------------------------------- dot engines


def _rowdot_einsum(a: np.ndarray, v: np.ndarray, out: np.ndarray) -> None:
    np.einsum("ij,j->i", a, v, out=out)


def _rowdot_vecdot(a: np.ndarray, v: np.ndarray, out: np.ndarray) -> None:
    np.vecdot(a, v, out=out)  # one BLAS sdot per row: in cache, twice einsum's speed


#: ``out[i] = a[i] . v`` with a rounding that depends only on ``a[i]`` and ``v``.
_rowdot = _rowdot_vecdot if hasattr(np, "vecdot") else _rowdot_einsum


class _ParallelRowDots:
    """``x @ v`` for a fixed ``(N, k)`` matrix and many vectors ``v``: row blocks of ~4 MB
    spread over a small thread pool, one ``_rowdot`` per block (NumPy releases the GIL).
    Single-threaded kernels on our own threads degrade more gracefully than OpenBLAS's
    spinning threads when the machine is oversubscribed."""

    def __init__(self, x: np.ndarray, threads: int) -> None:
        self.x = x
        self.out = np.empty(x.shape[0], dtype=x.dtype)
        step = max(1, (1 << 22) // max(1, x.shape[1] * x.itemsize))
        self.blocks = [(s, min(s + step, x.shape[0])) for s in range(0, x.shape[0], step)]
        self.threads = threads if x.size >= 1 << 20 and len(self.blocks) > 1 else 1
        self.pool = ThreadPoolExecutor(self.threads) if self.threads > 1 else None

    def __call__(self, v: np.ndarray) -> np.ndarray:
        v = np.ascontiguousarray(v, dtype=self.x.dtype)
        if self.pool is None:
            for s, e in self.blocks:
                _rowdot(self.x[s:e], v, self.out[s:e])
        else:
            def run(k: int) -> None:
                for s, e in self.blocks[k::self.threads]:
                    _rowdot(self.x[s:e], v, self.out[s:e])

            list(self.pool.map(run, range(self.threads)))
        return self.out

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown()


class _NumpyDots:
    """Row dot products ``X[rows] @ v``, per-row deterministic (``np.vecdot``: one BLAS
    ``sdot`` per row, or ``einsum`` on NumPy < 2)."""

    name = "numpy"

    def __init__(self, x: np.ndarray) -> None:
        self.x = x
        self.v = np.zeros(x.shape[1], dtype=np.float32)

    def set_vector(self, v: np.ndarray) -> None:
        self.v = np.ascontiguousarray(v, dtype=np.float32)

    def range(self, s: int, e: int, out: np.ndarray) -> None:
        _rowdot(self.x[s:e], self.v, out)

    def rows(self, rows: np.ndarray, out: np.ndarray, scratch: np.ndarray) -> None:
        for s in range(0, len(rows), _GATHER_ROWS):
            r = rows[s:s + _GATHER_ROWS]
            buf = scratch[: len(r)]
            np.take(self.x, r, axis=0, out=buf)
            _rowdot(buf, self.v, out[s:s + len(r)])


class _TorchDots:
    """The same products through PyTorch: on CPU (``device="torch"``) ``(X * v).sum(1)``
    (per-row deterministic), on CUDA accumulated in float64 and rounded to float32 (so the
    result is, but for astronomically rare double roundings, independent of the kernel's
    reduction order). The pool is uploaded to the GPU once when it fits in 80 % of the free
    memory, else streamed block by block."""

    def __init__(self, x: np.ndarray, device: str, *, float64: bool | None = None,
                 resident: bool | None = None) -> None:
        """``float64``/``resident`` default to the device's policy (both on for a CUDA
        pool that fits); tests force them to exercise the GPU code paths on the CPU."""
        import torch

        self.torch = torch
        self.device = torch.device(device)
        cuda = self.device.type == "cuda"
        self.name = f"torch:{self.device}"
        self.host = x
        with warnings.catch_warnings():  # read-only arrays: we never write through it
            warnings.simplefilter("ignore", UserWarning)
            xt = torch.from_numpy(x)
        if resident is None:
            resident = not cuda or x.nbytes < 0.8 * torch.cuda.mem_get_info(self.device)[0]
        self.resident = resident
        if resident and xt.device != self.device:
            xt = xt.to(self.device)
        self.x = xt
        self.acc = torch.float64 if (cuda if float64 is None else float64) else torch.float32
        self.v = torch.zeros(x.shape[1], dtype=self.acc, device=self.device)
        self.chunk = (1 << 18) if cuda else 8192

    def set_vector(self, v: np.ndarray) -> None:
        self.v = self.torch.from_numpy(np.asarray(v, dtype=np.float32).copy()).to(
            self.device, self.acc)

    def _dots(self, blk) -> np.ndarray:  # blk: (n, d) float32 on the device
        return (blk.to(self.acc) * self.v).sum(1).to(self.torch.float32).cpu().numpy()

    def _block(self, s: int, e: int):
        if self.resident:
            return self.x[s:e]
        return self.torch.from_numpy(self.host[s:e]).to(self.device)

    def range(self, s: int, e: int, out: np.ndarray) -> None:
        for a in range(s, e, self.chunk):
            b = min(a + self.chunk, e)
            out[a - s:b - s] = self._dots(self._block(a, b))

    def rows(self, rows: np.ndarray, out: np.ndarray, scratch: np.ndarray) -> None:
        torch = self.torch
        for a in range(0, len(rows), self.chunk):
            r = rows[a:a + self.chunk]
            if self.resident:
                blk = self.x.index_select(0, torch.from_numpy(r).to(self.device))
            else:
                blk = torch.from_numpy(np.take(self.host, r, axis=0)).to(self.device)
            out[a:a + len(r)] = self._dots(blk)


def _maybe_gpu() -> bool:
    """Whether ``torch.cuda.is_available()`` is worth asking: torch is imported already, or
    a GPU driver is present (importing torch only to learn that there is no GPU costs
    seconds)."""
    if "torch" in sys.modules:
        return True
    return any(os.path.exists(p) for p in ("/dev/nvidiactl", "/proc/driver/nvidia", "/dev/kfd"))


def _check_device(device: Any) -> None:
    if device is None or device in ("cpu", "numpy", "torch", "cuda") or (
            isinstance(device, str) and device.startswith("cuda:")):
        return
    raise ValueError(
        f"device must be None (CUDA when available, else NumPy), 'cpu'/'numpy', 'torch' "
        f"(PyTorch on the CPU) or 'cuda[:N]'; got {device!r}")


def _make_engine(x: np.ndarray, device: str | None) -> _NumpyDots | _TorchDots:
    _check_device(device)
    if device is None:
        if _maybe_gpu():
            import torch

            if torch.cuda.is_available():
                return _TorchDots(x, "cuda")
        return _NumpyDots(x)
    if device in ("cpu", "numpy"):
        return _NumpyDots(x)
    if device == "torch":
        return _TorchDots(x, "cpu")
    if device == "cuda" or device.startswith("cuda:"):
        import torch

        if not torch.cuda.is_available():
            raise ValueError(f"device={device!r} but torch.cuda.is_available() is False")
        return _TorchDots(x, device)
    raise AssertionError(device)  # pragma: no cover - _check_device covers every case


# ----------------------------------------------------------------------------- k-center


class _KCenter:
    """State of one k-center greedy run (see :func:`kcenter_greedy`)."""

    def __init__(self, x: np.ndarray, metric: str, block_rows: int, device: str | None,
                 threads: int):
        self.x = x
        self.n, self.d = x.shape
        self.cosine = metric == "cosine"
        self.block_rows = block_rows
        xx = _row_sqnorms(x, "pool", block_rows)  # validates before any upload to a GPU
        if self.cosine:
            zero = xx == 0
            if zero.any():
                raise ValueError(f"pool row {int(np.argmax(zero))} is the zero vector, which "
                                 "has no direction: metric='cosine' is undefined for it")
            self.invn = (1.0 / np.sqrt(xx.astype(np.float64))).astype(np.float32)
            self.xx = None
        else:
            self.invn = None
            self.xx = xx
        self.maxsq = 1.0 if self.cosine else float(xx.max(initial=0.0))
        self.mind = np.full(self.n, np.inf, dtype=np.float32)
        self.owner = np.full(self.n, -1, dtype=np.int32)
        self.evaluations = 0
        engine = _make_engine(x, device) if self.n else _NumpyDots(x)
        self.engine = engine
        # threads: NumPy engine only, and only when there is enough work per update
        self.threads = threads if isinstance(engine, _NumpyDots) and self.n * self.d >= 1 << 20 \
            else 1
        self.pool = ThreadPoolExecutor(self.threads) if self.threads > 1 else None
        rows = min(block_rows, max(1, self.n))
        self.scratch = [(np.empty(rows, np.float32), np.empty(rows, np.float32),
                         np.empty((min(_GATHER_ROWS, rows), self.d), np.float32))
                        for _ in range(self.threads)]

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown()

    # -- squared distances of rows to the engine's current vector v (|v|^2 = vv)
    def _d2(self, g: np.ndarray, rows, vv: float, out: np.ndarray) -> np.ndarray:
        """``out = max(|x|^2 + vv - 2 g, 0)`` (l2) or ``max(1 + vv - 2 g / |x|, 0)`` (cosine,
        where ``g = x . v`` and the rows are taken as unit vectors), float32, one fixed order
        of operations for every code path."""
        if self.cosine:
            np.multiply(g, self.invn[rows], out=out)
            out *= np.float32(2.0)
            np.subtract(np.float32(1.0 + vv), out, out=out)
        else:
            np.add(self.xx[rows], np.float32(vv), out=out)
            out -= g
            out -= g
        np.maximum(out, np.float32(0.0), out=out)
        return out

    def _update_range(self, lo: int, hi: int, sel: np.ndarray | None, vv: float, cid: int,
                      slot: int) -> int:
        """Update ``mind``/``owner`` for rows ``lo:hi`` (all of them when ``sel`` is None,
        else the sorted row ids ``sel`` inside the range) with the engine's vector."""
        gbuf, dbuf, scratch = self.scratch[slot]
        evals, moved = 0, 0.0  # evaluations; largest mind among the rows now owned by cid
        br = self.block_rows
        if sel is None:
            for s in range(lo, hi, br):
                e = min(s + br, hi)
                g = gbuf[: e - s]
                self.engine.range(s, e, g)
                d2 = self._d2(g, slice(s, e), vv, dbuf[: e - s])
                m = self.mind[s:e]
                better = d2 < m
                np.copyto(m, d2, where=better)
                self.owner[s:e][better] = cid
                if better.any():
                    moved = max(moved, float(d2[better].max()))
                evals += e - s
            return evals, moved
        starts = np.searchsorted(sel, np.arange(lo, hi, br))
        ends = np.append(starts[1:], len(sel))
        for s, a, b in zip(range(lo, hi, br), starts, ends, strict=True):
            if a == b:
                continue
            e = min(s + br, hi)
            rows = sel[a:b]
            g = gbuf[: len(rows)]
            if len(rows) >= _DENSE * (e - s):  # one contiguous pass beats a gather
                full = gbuf[: e - s]
                self.engine.range(s, e, full)
                g = full[rows - s]
                evals += e - s
            else:
                self.engine.rows(rows, g, scratch)
                evals += len(rows)
            d2 = self._d2(g, rows, vv, dbuf[: len(rows)])
            m = self.mind[rows]
            better = d2 < m
            if better.any():
                upd = rows[better]
                self.mind[upd] = d2[better]
                self.owner[upd] = cid
                moved = max(moved, float(d2[better].max()))
        return evals, moved

    def update(self, v: np.ndarray, vv: float, cid: int, sel: np.ndarray | None) -> float:
        """One update of ``mind``/``owner`` with centre ``cid`` (vector ``v``, ``|v|^2 = vv``)
        over all rows or the sorted rows ``sel``; returns the new cell's radius^2."""
        self.engine.set_vector(v)
        if self.threads == 1:
            evals, moved = self._update_range(0, self.n, sel, vv, cid, 0)
            self.evaluations += evals
            return moved
        # contiguous ranges of whole blocks, one per thread
        nblk = -(-self.n // self.block_rows)
        cuts = [min(self.n, (nblk * t // self.threads) * self.block_rows)
                for t in range(self.threads + 1)]
        cuts[-1] = self.n
        futs = []
        for t in range(self.threads):
            lo, hi = cuts[t], cuts[t + 1]
            if lo >= hi:
                continue
            part = None if sel is None else sel[np.searchsorted(sel, lo):np.searchsorted(sel, hi)]
            futs.append(self.pool.submit(self._update_range, lo, hi, part, vv, cid, t))
        res = [f.result() for f in futs]
        self.evaluations += sum(r[0] for r in res)
        return max(r[1] for r in res)

    def unit(self, i: int) -> np.ndarray:
        """Row ``i`` as the centre vector used in the dot products (unit for cosine)."""
        row = self.x[i]
        if self.cosine:
            return (row.astype(np.float64) * float(self.invn[i])).astype(np.float32)
        return row.copy()

    def farthest_from_mean(self) -> int:
        acc = np.zeros(self.d, dtype=np.float64)
        for s in range(0, self.n, self.block_rows):
            blk = self.x[s:s + self.block_rows]
            if self.cosine:
                acc += self.invn[s:s + self.block_rows].astype(np.float64) @ blk
            else:
                acc += blk.sum(axis=0, dtype=np.float64)
        mu = (acc / self.n).astype(np.float32)
        vv = float(np.dot(mu.astype(np.float64), mu.astype(np.float64)))
        self.engine.set_vector(mu)
        best, best_val = 0, -np.inf
        g = self.scratch[0][0]
        d = self.scratch[0][1]
        for s in range(0, self.n, self.block_rows):
            e = min(s + self.block_rows, self.n)
            self.engine.range(s, e, g[: e - s])
            d2 = self._d2(g[: e - s], slice(s, e), vv, d[: e - s])
            j = int(np.argmax(d2))
            if d2[j] > best_val:
                best, best_val = s + j, float(d2[j])
        return best

    def _nearest_reference(self, s: int, e: int, ref: np.ndarray, rr: np.ndarray, cols: int) -> np.ndarray:
        """For rows ``s:e``, the reference row with the smallest float32 ``|x - r|^2`` (blocked
        GEMM over ``cols`` reference rows at a time; ties: the smallest index)."""
        blk = self.x[s:e]
        if self.cosine:
            base = None
            scale = self.invn[s:e][:, None]
        else:
            base = self.xx[s:e][:, None]
        best = np.full(e - s, np.inf, dtype=np.float32)
        arg = np.zeros(e - s, dtype=np.int64)
        for a in range(0, len(ref), cols):
            b = min(a + cols, len(ref))
            gm = blk @ ref[a:b].T
            if self.cosine:
                gm *= scale
                gm *= np.float32(-2.0)
                gm += np.float32(2.0)
            else:
                gm *= np.float32(-2.0)
                gm += base
                gm += rr[a:b][None, :]
            j = np.argmin(gm, axis=1)
            val = gm[np.arange(e - s), j]
            better = val < best
            best[better] = val[better]
            arg[better] = a + j[better]
        return arg

    def _reference_d2(self, s: int, e: int, ref: np.ndarray, rr: np.ndarray, arg: np.ndarray) -> np.ndarray:
        """Squared distances of rows ``s:e`` to the reference rows ``arg``, row by row
        (``einsum``: identical rows get identical values), float32, clamped at 0."""
        out = np.empty(e - s, dtype=np.float32)
        for a in range(s, e, _GATHER_ROWS):
            b = min(a + _GATHER_ROWS, e)
            refrows = ref[arg[a - s:b - s]]
            g = np.einsum("ij,ij->i", self.x[a:b], refrows)
            vv = rr[arg[a - s:b - s]]
            if self.cosine:
                d2 = np.float32(2.0) - np.float32(2.0) * (g * self.invn[a:b])
            else:
                d2 = (self.xx[a:b] + vv) - g - g
            out[a - s:b - s] = np.maximum(d2, np.float32(0.0))
        return out

    def seed_reference(self, ref: np.ndarray, rr: np.ndarray, ref_block: int,
                       on_block: Callable[[int, int], None] | None = None,
                       nearest: np.ndarray | None = None) -> None:
        """``mind``/``owner`` against the reference points: the nearest reference row of each
        row (blocked GEMM for the argmin; or the given ``nearest`` rows, from an approximate
        search), then the distance to it recomputed row by row (:meth:`_reference_d2`);
        ``on_block(rows done, N)`` before each block of rows and after the last."""
        br = self.block_rows
        cols = max(1, min(len(ref), ref_block // max(1, min(br, self.n))))
        for s in range(0, self.n, br):
            if on_block is not None:
                on_block(s, self.n)
            e = min(s + br, self.n)
            arg = (self._nearest_reference(s, e, ref, rr, cols) if nearest is None
                   else np.asarray(nearest[s:e], dtype=np.int64))
            self.owner[s:e] = arg
            self.mind[s:e] = self._reference_d2(s, e, ref, rr, arg)
        if on_block is not None:
            on_block(self.n, self.n)

    def verify_reference(self, p: int, ref: np.ndarray, rr: np.ndarray) -> tuple[int, float]:
        """Row ``p``'s nearest reference row over the whole reference set and its squared
        distance, computed as the exact seeding computes them."""
        arg = self._nearest_reference(p, p + 1, ref, rr, len(ref))
        return int(arg[0]), float(self._reference_d2(p, p + 1, ref, rr, arg)[0])


def kcenter_greedy(
    pool: np.ndarray,
    size: int,
    *,
    reference: np.ndarray | None = None,
    start: int | None = None,
    metric: Literal["l2", "cosine"] = "l2",
    block_rows: int = 65536,
    prune: bool = True,
    device: str | None = None,
    stats: dict[str, Any] | None = None,
    on_pick: Callable[[int, int], None] | None = None,
    on_reference: Callable[[int, int], None] | None = None,
    reference_nearest: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """k-center greedy (coreset) selection of ``size`` pool rows, exact, never ``N x N``.

    Each pick is the pool point farthest from its nearest centre, ``argmax_x mind(x)`` with
    ``mind(x) = min_{s in S} dist(x, s)`` over the centres ``S`` = the ``reference`` points,
    then the picks so far (ties: smallest index). ``mind`` is one ``(N,)`` float32 vector,
    updated after each pick by streaming the pool in blocks of ``block_rows`` rows (see the
    module docstring for the arithmetic and the exact triangle-inequality pruning).

    The first pick is ``start`` when given. Otherwise, with a reference set, it is the
    farthest point from the reference set; without one, it is the pool point farthest from
    the pool mean (deterministic, and the point that ``argmax mind`` would choose if the
    mean were the only centre). A picked row is never picked again (its ``mind`` is set
    below every distance); once every row is covered (``mind = 0``, duplicates) the next
    picks are the unpicked rows in index order.

    Memory besides the inputs: about 21 bytes per pool row (``mind``, ``owner``, squared
    norms, the selection of the pruned path), ``size * d`` floats of picked centres (plus a
    unit-norm copy of the reference for cosine), and per thread two ``(block_rows,)``
    buffers and a ``256 x d`` gather buffer.

    Args:
        pool: ``(N, d)`` float array (float32 C-contiguous is used without a copy; anything
            else is converted to a float32 copy).
        size: number of picks, ``0 <= size <= N``.
        reference: optional ``(L, d)`` centres already covered (e.g. the labeled set);
            ``L = 0`` is the same as ``None``. Costs ``O(N L d)`` once (blocked GEMM).
        start: optional index of the first pick (in ``[0, N)``).
        metric: ``"l2"`` (Euclidean) or ``"cosine"`` (Euclidean between the unit vectors
            ``x / |x|``, which orders exactly like ``1 - cos``; zero rows are rejected).
        block_rows: pool rows per block (memory: a few ``(block_rows,)`` buffers per thread).
        prune: skip the cells, then the single points, that the new centre provably cannot
            improve (triangle inequality; picks and radii identical to ``prune=False``).
        device: ``None`` = CUDA through PyTorch when ``torch.cuda.is_available()``, else
            NumPy; ``"cpu"``/``"numpy"``; ``"torch"`` = PyTorch on the CPU; ``"cuda[:N]"``
            (the pool is copied to the GPU once when it fits in 80 % of its free memory,
            else streamed from the host block by block; the bookkeeping stays on the host).
        stats: if a dict is given it is filled with ``evaluations`` (point-centre distances
            computed by the updates after each pick), ``full_evaluations`` (what the
            unpruned algorithm computes: ``N`` per update), ``pruned_fraction``
            (``1 - evaluations / full_evaluations``), ``reference_evaluations``
            (``N * L``; with ``reference_nearest``: ``N`` plus ``L`` per verified row),
            ``reference_verified`` (rows checked against the whole reference set; 0 without
            ``reference_nearest``), ``reference_lowered`` (of those, rows whose distance
            fell), ``seconds``, ``device`` and ``threads``.
        on_pick: called as ``on_pick(done, size)`` before each pick and after the last (a
            long selection reports progress and can be cancelled by raising in it).
        on_reference: called as ``on_reference(rows, N)`` before and after each block of
            ``block_rows`` pool rows of the reference seeding (the ``O(N L d)`` phase: at
            1M x 384 with a 10k-row reference, 64 s before the first pick), likewise.
        reference_nearest: optional ``(N,)`` index of a reference row near each pool row
            (from an approximate search: at 10M x 100k the exact seeding would take hours).
            The seeding then costs ``O(N d)``: each row's distance is its exact distance to
            that row, an upper bound of its distance to the reference set. Before a row is
            picked its distance to the whole reference set is computed (``O(L d)``, once per
            row) and lowered where the given row was not the nearest, and the pick is made
            again: every other row's stored distance is an upper bound of its true one, so a
            verified argmax is the true argmax — the picks are those of the exact seeding
            (up to float32 near-ties between reference rows).

    Returns:
        ``(picks, radii)``: ``picks`` ``(size,)`` int64 row indices in pick order;
        ``radii`` ``(size,)`` float64, ``radii[i]`` = the covering radius just before pick
        ``i`` (``max_x mind(x)``; for ``i >= 1``, or with a reference set and no
        ``start``, it is the picked point's distance to its nearest centre). It is
        Euclidean (not squared) for ``"l2"``, the cosine distance ``1 - cos`` for
        ``"cosine"``; ``inf`` for pick 0 when there is no reference set (nothing is covered
        yet). Non-increasing.

    Raises:
        ValueError: shapes (``pool`` not 2-D, ``reference`` of another width), NaN/inf
            rows, zero rows with ``metric="cosine"``, ``size``/``start``/``block_rows``
            out of range, unknown ``metric`` or ``device``.
    """
    t0 = time.perf_counter()
    if metric not in ("l2", "cosine"):
        raise ValueError(f"metric must be 'l2' or 'cosine'; got {metric!r}")
    if isinstance(block_rows, bool) or not isinstance(block_rows, int | np.integer) \
            or block_rows < 1:
        raise ValueError(f"block_rows must be an integer >= 1; got {block_rows!r}")
    block_rows = int(block_rows)
    x = _as_matrix(pool, "pool")
    n, d = x.shape
    size = _check_size(size, n)
    if start is not None:
        if isinstance(start, bool) or not isinstance(start, int | np.integer):
            raise ValueError(f"start must be an integer row index or None; got {start!r}")
        if not 0 <= int(start) < n:
            raise ValueError(f"start must be in [0, N) = [0, {n}); got {start}")
        start = int(start)
    ref = None
    if reference is not None:
        ref = _as_matrix(reference, "reference")
        if ref.shape[1] != d:
            raise ValueError(f"reference has dimension {ref.shape[1]} but pool has dimension "
                             f"{d} (shapes {ref.shape} vs {x.shape})")
        if ref.shape[0] == 0:
            ref = None
    if reference_nearest is not None and ref is not None:
        reference_nearest = np.asarray(reference_nearest)
        if reference_nearest.shape != (n,) or not np.issubdtype(reference_nearest.dtype, np.integer):
            raise ValueError(f"reference_nearest must be ({n},) integer row indices of the reference; got "
                             f"{reference_nearest.dtype} {reference_nearest.shape}")
        if n and (reference_nearest.min() < 0 or reference_nearest.max() >= len(ref)):
            bad = int(np.flatnonzero((reference_nearest < 0) | (reference_nearest >= len(ref)))[0])
            raise ValueError(f"reference_nearest[{bad}] = {int(reference_nearest[bad])} is outside the "
                             f"reference's {len(ref)} rows")
    else:
        reference_nearest = None
    _check_device(device)
    st = _KCenter(x, metric, block_rows, device, _n_threads())
    engine = st.engine
    L = 0 if ref is None else ref.shape[0]
    picks = np.empty(size, dtype=np.int64)
    radii = np.empty(size, dtype=np.float64)
    updates = 0
    try:
        rr = None
        if ref is not None:
            rsq = _row_sqnorms(ref, "reference", block_rows)
            if st.cosine:
                zero = rsq == 0
                if zero.any():
                    raise ValueError(f"reference row {int(np.argmax(zero))} is the zero vector: "
                                     "metric='cosine' is undefined for it")
                ref = (ref / np.sqrt(rsq.astype(np.float64))[:, None]).astype(np.float32)
                rsq = _row_sqnorms(ref, "reference", block_rows)
            else:
                st.maxsq = max(st.maxsq, float(rsq.max()))
            rr = rsq
            if size:
                st.seed_reference(ref, rr, 1 << 23, on_reference, nearest=reference_nearest)
        # rows whose distance to the reference set is known exact (all of them when the
        # seeding searched the whole reference set)
        verified = None if reference_nearest is None else np.zeros(n, dtype=bool)
        lowered = 0
        # rounding bound of a computed squared distance, and its square root
        kappa = 8.0 * (d + 8) * _U32 * st.maxsq
        sqk = math.sqrt(kappa)
        ncent = L + size
        cvec = np.empty((size, d), dtype=np.float32)  # picked centres (unit for cosine)
        csq = np.empty(size, dtype=np.float32)
        radius = np.zeros(ncent, dtype=np.float32)  # squared cell radii R_a^2 (upper bounds)
        if ref is not None and size and prune:
            np.maximum.at(radius, st.owner, st.mind)
        # the O(N) per-point test is retried with exponential backoff while it keeps >= 90 %
        next_filter, backoff = 0, 1

        def farthest() -> int:
            """``argmax mind``; after an approximate seeding (whose distances are upper
            bounds) the argmax is checked against the whole reference set, lowered where
            needed, and chosen again until it is a checked row."""
            nonlocal lowered
            q = int(np.argmax(st.mind))
            while verified is not None and not verified[q]:
                verified[q] = True
                arg, d2 = st.verify_reference(q, ref, rr)
                if d2 < st.mind[q]:
                    lowered += 1
                    st.mind[q], st.owner[q] = d2, arg
                    if prune:
                        radius[arg] = max(radius[arg], np.float32(d2))
                    q = int(np.argmax(st.mind))
            return q

        for i in range(size):
            if on_pick is not None:
                on_pick(i, size)
            if i == 0 and (start is not None or ref is None):
                p = start if start is not None else st.farthest_from_mean()
                top = np.inf if ref is None else float(st.mind[farthest()])
            else:
                p = farthest()
                top = float(st.mind[p])
            picks[i] = p
            if np.isinf(top):
                radii[i] = np.inf
            else:
                top = max(top, 0.0)
                radii[i] = top / 2.0 if st.cosine else math.sqrt(top)
            cid = L + i
            v = st.unit(p)
            cvec[i] = v
            vv = 1.0 if st.cosine else float(st.xx[p])
            csq[i] = np.float32(np.einsum("i,i->", v, v))
            st.mind[p] = -1.0  # never picked again; its distance to itself is 0
            st.owner[p] = cid
            if i == size - 1:
                break  # the last update would not be used
            updates += 1
            sel = None
            if prune and (i > 0 or ref is not None):
                # squared centre-centre distances, lower-bounded for rounding
                dd = np.empty(cid, dtype=np.float64)
                if L:
                    dd[:L] = rr.astype(np.float64) + float(csq[i]) - 2.0 * (ref @ v)
                if i:
                    dd[L:cid] = csq[:i].astype(np.float64) + float(csq[i]) - 2.0 * (cvec[:i] @ v)
                dlow = np.sqrt(np.maximum(dd - kappa, 0.0))
                # a point x of cell a is skipped when dlow_a >= 2 (sqrt(mind x) + sqrt(kappa)),
                # i.e. mind(x) <= q_a; q_a = -1 when no point of the cell can be skipped
                half = 0.5 * dlow - sqk
                q = np.where(half >= 0.0, half * half, -1.0)
                q32 = q.astype(np.float32)
                up = q32 > q  # round the thresholds down, never up
                q32[up] = np.nextafter(q32[up], np.float32(-np.inf))
                if not (dlow < 2.0 * (np.sqrt(radius[:cid].astype(np.float64)) + sqk)).any():
                    sel = np.empty(0, dtype=np.intp)  # no cell can be improved
                elif i >= next_filter:
                    thr = np.append(q32, np.float32(-1.0))  # the new cell: only the pick
                    sel = np.flatnonzero(st.mind > thr[st.owner])
                    if len(sel) >= 0.9 * n:  # not worth gathering: stream everything
                        sel = None
                        backoff = min(2 * backoff, 32)
                        next_filter = i + backoff
                    else:
                        backoff = 1
            moved = st.update(v, vv, cid, sel) if sel is None or len(sel) else 0.0
            if prune:
                if sel is None:
                    # points only left their cells: the old radii stay upper bounds
                    radius[cid] = moved
                else:
                    # skipped points have mind <= min(R_a, q_a); recomputed ones are exact
                    top_sel = np.full(cid + 1, -np.inf, dtype=np.float32)
                    np.maximum.at(top_sel, st.owner[sel], st.mind[sel])
                    np.minimum(radius[:cid], q32, out=radius[:cid])
                    np.maximum(radius[:cid], top_sel[:cid], out=radius[:cid])
                    radius[cid] = top_sel[cid]
                    np.maximum(radius[: cid + 1], 0.0, out=radius[: cid + 1])
        if on_pick is not None:
            on_pick(size, size)
        if stats is not None:
            full = n * updates
            stats.update({
                "evaluations": int(st.evaluations),
                "full_evaluations": int(full),
                "pruned_fraction": (1.0 - st.evaluations / full) if full else 0.0,
                "reference_evaluations": (int(n * L) if reference_nearest is None else
                                          int(n + L * verified.sum())) if size else 0,
                "reference_verified": 0 if verified is None else int(verified.sum()),
                "reference_lowered": lowered,
                "updates": updates,
                "seconds": time.perf_counter() - t0,
                "device": engine.name,
                "threads": st.threads,
            })
    finally:
        st.close()
    return picks, radii


# ----------------------------------------------------------------------------- BADGE


def badge_select(
    probs: np.ndarray,
    embeddings: np.ndarray,
    size: int,
    *,
    seed: int = 0,
    labels_from: Literal["argmax"] = "argmax",
    on_pick: Callable[[int, int], None] | None = None,
) -> np.ndarray:
    """BADGE (Ash et al. 2020): k-means++ seeding on gradient embeddings, never materialised.

    For row ``i`` with class probabilities ``p_i`` (``C``) and penultimate-layer features
    ``h_i`` (``D``), the gradient of the cross-entropy loss w.r.t. the last linear layer for
    the hallucinated label ``y^_i = argmax_c p_ic`` is ``g_i = a_i (x) h_i`` with
    ``a_i = p_i - e_{y^_i}`` (the BADGE repository writes ``e_y^ - p``: same distances).
    Distances come from the factorisation

        ``||g_i - g_j||^2 = |a_i|^2 |h_i|^2 + |a_j|^2 |h_j|^2 - 2 (a_i . a_j)(h_i . h_j)``

    so one pick costs two matrix-vector products, ``O(N (C + D))``, and memory stays
    ``O(N (C + D))`` (the inputs, a float64 copy of ``a`` and a few ``(N,)`` vectors), where
    the explicit embeddings would take ``N C D`` floats.

    k-means++ seeding, as in the BADGE repository: the first centre is the row of largest
    gradient norm ``argmax_i |a_i| |h_i|`` (ties: smallest index); every next centre is drawn
    with probability ``D^2(i) / sum_j D^2(j)``, ``D^2(i)`` = the squared distance of ``g_i``
    to its nearest chosen centre (clamped at 0; exactly 0 for the chosen rows, which are
    therefore never drawn again). The draw is ``u = rng.random()`` with
    ``rng = np.random.default_rng(seed)`` and the pick is the first ``i`` whose cumulative
    sum ``cumsum(D^2)[i] > u * cumsum(D^2)[-1]`` (inverse CDF). Should every remaining row
    have ``D^2 = 0`` (duplicates of chosen centres), the next picks are the unchosen rows in
    index order. ``D^2`` is computed in float64; ``h_i . h_c`` in the embeddings' precision
    (float32 input stays float32; float64 stays float64).

    Args:
        probs: ``(N, C)`` class probabilities (validated like the uncertainty miners:
            finite, non-negative, rows summing to 1 within 1e-3).
        embeddings: ``(N, D)`` penultimate-layer features of the same rows.
        size: number of picks, ``0 <= size <= N``.
        seed: seed of the k-means++ draws.
        labels_from: how the hallucinated label is chosen; only ``"argmax"``.
        on_pick: called as ``on_pick(done, size)`` before each pick and after the last.

    Returns:
        ``(size,)`` int64 row indices in pick order.

    Raises:
        ValueError: shapes (not 2-D, different ``N``), invalid probabilities, NaN/inf
            embeddings, ``size`` out of range, unknown ``labels_from``.
    """
    if labels_from != "argmax":
        raise ValueError(f"labels_from must be 'argmax'; got {labels_from!r}")
    a = validate_probs(probs)  # float64 copy: becomes a = p - e_y^
    n = a.shape[0]
    h = np.asarray(embeddings)
    if h.dtype.kind not in "biuf":
        raise ValueError(f"embeddings must be a numeric (float) array; got dtype {h.dtype}")
    if h.ndim != 2:
        raise ValueError(f"embeddings must be a 2-D array of shape (N, D); got shape {h.shape}")
    if h.shape[0] != n:
        raise ValueError(f"embeddings has {h.shape[0]} rows but probs has {n} rows: they must "
                         "describe the same items")
    h = np.ascontiguousarray(h, dtype=np.float64 if h.dtype == np.float64 else np.float32)
    _check_finite_rows(h, "embeddings")
    size = _check_size(size, n)
    picks = np.empty(size, dtype=np.int64)
    if size == 0:
        return picks
    a[np.arange(n), a.argmax(axis=1)] -= 1.0
    aa = np.einsum("ij,ij->i", a, a)
    hh = np.empty(n, dtype=np.float64)
    step = max(1, (1 << 18) // max(1, h.shape[1]))  # float64 copies of ~2 MB at a time
    for s in range(0, n, step):
        blk = h[s:s + step].astype(np.float64)
        hh[s:s + step] = np.einsum("ij,ij->i", blk, blk)
    gg = aa * hh
    rng = np.random.default_rng(seed)
    chosen = np.zeros(n, dtype=bool)
    d2 = np.full(n, np.inf)
    hdot, adot = _ParallelRowDots(h, _n_threads()), _ParallelRowDots(a, _n_threads())
    try:
        _badge_loop(a, h, gg, size, rng, chosen, d2, picks, hdot, adot, on_pick)
    finally:
        hdot.close()
        adot.close()
    return picks


def _badge_loop(a: np.ndarray, h: np.ndarray, gg: np.ndarray, size: int,
                rng: np.random.Generator, chosen: np.ndarray, d2: np.ndarray,
                picks: np.ndarray, hdot: _ParallelRowDots, adot: _ParallelRowDots,
                on_pick: Callable[[int, int], None] | None = None) -> None:
    n = len(gg)
    for i in range(size):
        if on_pick is not None:
            on_pick(i, size)
        if i == 0:
            c = int(np.argmax(gg))
        else:
            cum = np.cumsum(d2)
            total = float(cum[-1])
            if total > 0.0 and np.isfinite(total):
                c = int(np.searchsorted(cum, rng.random() * total, side="right"))
                if c >= n:  # u * total rounded up to the last boundary
                    c = int(np.flatnonzero(d2 > 0.0)[-1])
            else:
                c = int(np.argmin(chosen))  # everything covered: unchosen rows in order
        picks[i] = c
        chosen[c] = True
        if i == size - 1:
            break
        new = adot(a[c]).copy()
        new *= hdot(h[c])
        new *= -2.0
        new += gg
        new += gg[c]
        np.maximum(new, 0.0, out=new)
        np.minimum(d2, new, out=d2)
        d2[chosen] = 0.0
    if on_pick is not None:
        on_pick(size, size)


# ----------------------------------------------------------------------------- Cluster-Margin


def cluster_margin_select(
    embeddings: np.ndarray,
    margin_scores: np.ndarray,
    size: int,
    *,
    n_clusters: int | None = None,
    seed: int = 0,
    labels: np.ndarray | None = None,
    method: Literal["kmeans", "hac"] = "kmeans",
    progress: Callable[[float, str], None] | None = None,
    check: Callable[[], None] | None = None,
) -> np.ndarray:
    """Cluster-Margin (Citovsky et al. 2021): cluster the candidates, then round-robin over
    the clusters from the smallest, taking the most uncertain remaining item of each.

    The paper clusters the whole pool once (hierarchical, average linkage) and, at each
    round, takes the ``k_m`` lowest-margin items as candidates; here the caller passes the
    candidate set (e.g. the top ``k_m`` by margin score) and it is clustered, or ``labels``
    gives the clusters:

    * up to ``CLUSTER_MARGIN_SAMPLE`` (20,000) candidates with ``method="kmeans"``:
      scikit-learn ``KMeans`` on all of them (k-means++ init, one init, ``random_state=seed``);
    * more candidates, or ``method="hac"``: a seeded sample of at most
      ``CLUSTER_MARGIN_SAMPLE`` candidates (8,000 for HAC, whose memory is the sample's
      condensed distance matrix) is clustered — k-means (:func:`miners.clustering.kmeans`)
      or average-linkage HAC, the paper's choice (:func:`miners.clustering.hac_centres`) —
      and every candidate goes to its nearest cluster centre (exact FAISS search). The cost
      is then ``O(N k d)`` for the assignment instead of k-means over all ``N`` rows with
      ``k`` = the batch size (at ``N`` = 1M and a 100k batch, ``10^5`` centres: days).

    Without ``n_clusters`` there are ``min(N, size, CLUSTER_MARGIN_MAX_CLUSTERS)`` clusters:
    at most 2,048, so a batch of 100k takes about 50 rounds of the round-robin.

    Round-robin: clusters are ordered by size ascending (ties: the cluster whose best item
    has the higher score first, then the smaller index of that item); round ``r`` takes the
    ``r``-th best item (score descending, ties: smallest index) of every cluster that has
    more than ``r`` items, in that cluster order; rounds continue until ``size`` items are
    taken. Small clusters are exhausted first, so the batch covers every cluster before any
    cluster gives a second item (when ``size >= n_clusters``).

    Args:
        embeddings: ``(N, D)`` embeddings of the candidates.
        margin_scores: ``(N,)`` uncertainty scores, higher = more uncertain (e.g.
            ``miners.uncertainty.margin_scores``, ``1 - (p_(1) - p_(2))``).
        size: number of picks, ``0 <= size <= N``.
        n_clusters: clusters, ``1 <= n_clusters <= N``; default
            ``min(N, size, CLUSTER_MARGIN_MAX_CLUSTERS)`` (one item per cluster when every
            cluster is non-empty and the batch is at most the cap).
        seed: clustering seed.
        labels: optional ``(N,)`` integer cluster ids (skips clustering; ``n_clusters``
            must then be None).
        method: "kmeans" or "hac" (above).
        progress, check: ``progress(fraction, message)`` and a cancel hook for the
            clustering and the assignment.

    Returns:
        ``(size,)`` int64 row indices in pick order.

    Raises:
        ValueError: shapes, NaN/inf, ``size``/``n_clusters`` out of range, bad ``labels``.
    """
    x = np.asarray(embeddings)
    if x.dtype.kind not in "biuf":
        raise ValueError(f"embeddings must be a numeric (float) array; got dtype {x.dtype}")
    if x.ndim != 2:
        raise ValueError(f"embeddings must be a 2-D array of shape (N, D); got shape {x.shape}")
    n = x.shape[0]
    sc = np.asarray(margin_scores)
    if sc.dtype.kind not in "biuf":
        raise ValueError(f"margin_scores must be numeric; got dtype {sc.dtype}")
    if sc.shape != (n,):
        raise ValueError(f"margin_scores must have shape (N,) = ({n},) like embeddings' rows; "
                         f"got shape {sc.shape}")
    sc = sc.astype(np.float64)
    if not np.isfinite(sc).all():
        raise ValueError(f"margin_scores has NaN or infinite values (first at row "
                         f"{int(np.argmin(np.isfinite(sc)))})")
    x = np.ascontiguousarray(x, dtype=np.float64 if x.dtype == np.float64 else np.float32)
    _check_finite_rows(x, "embeddings")
    size = _check_size(size, n, "embeddings")
    if labels is not None:
        if n_clusters is not None:
            raise ValueError("give either labels (precomputed clusters) or n_clusters, not both")
        lab = np.asarray(labels)
        if lab.shape != (n,) or lab.dtype.kind not in "iu":
            raise ValueError(f"labels must be an integer array of shape ({n},); got "
                             f"{lab.dtype} {lab.shape}")
    else:
        if method not in ("kmeans", "hac"):
            raise ValueError(f"method must be 'kmeans' or 'hac'; got {method!r}")
        if n_clusters is None:
            k = min(n, size, CLUSTER_MARGIN_MAX_CLUSTERS)
        else:
            if isinstance(n_clusters, bool) or not isinstance(n_clusters, int | np.integer):
                raise ValueError(f"n_clusters must be an integer or None; got {n_clusters!r}")
            k = int(n_clusters)
            if not 1 <= k <= max(n, 1):
                raise ValueError(f"n_clusters must be in [1, N] = [1, {n}]; got {k}")
        if size == 0:
            return np.empty(0, dtype=np.int64)
        lab = _cluster_labels(x, k, seed, method, progress, check)
    if size == 0:
        return np.empty(0, dtype=np.int64)
    idx = np.arange(n)
    order = np.lexsort((idx, -sc, lab))  # by cluster, score desc, index
    lab_sorted = lab[order]
    starts = np.flatnonzero(np.r_[True, lab_sorted[1:] != lab_sorted[:-1]])
    counts = np.diff(np.r_[starts, n])
    best = order[starts]  # best item of each cluster
    corder = np.lexsort((best, -sc[best], counts))  # size asc, best score desc, index
    qpos = np.empty(len(starts), dtype=np.int64)
    qpos[corder] = np.arange(len(starts))
    rank = idx - np.repeat(starts, counts)  # rank of each sorted item inside its cluster
    take = np.lexsort((np.repeat(qpos, counts), rank))
    return order[take[:size]].astype(np.int64)


def _cluster_labels(x: np.ndarray, k: int, seed: int, method: str,
                    progress: Callable[[float, str], None] | None,
                    check: Callable[[], None] | None) -> np.ndarray:
    n = x.shape[0]
    if k == 1:
        return np.zeros(n, dtype=np.int64)
    if k == n:
        return np.arange(n, dtype=np.int64)
    if method == "kmeans" and n <= CLUSTER_MARGIN_SAMPLE:
        from sklearn.cluster import KMeans
        from sklearn.exceptions import ConvergenceWarning

        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)
            return np.asarray(KMeans(n_clusters=k, n_init=1, random_state=seed).fit_predict(x), dtype=np.int64)
    from miners.clustering import assign, hac_centres, kmeans

    cap = CLUSTER_MARGIN_SAMPLE if method == "kmeans" else min(CLUSTER_MARGIN_SAMPLE, 8000)
    rows = np.sort(np.random.default_rng([seed, 53]).choice(n, min(n, cap), replace=False))
    sample = np.ascontiguousarray(x[rows], dtype=np.float32)
    k = min(k, len(rows))
    if method == "hac":
        centres = hac_centres(sample, k, sample=len(sample), seed=seed, check=check)
    else:
        centres, _, _ = kmeans(sample, k, seed=seed, check=check)
    lab, _ = assign(x, centres, progress=progress, check=check)
    return lab
