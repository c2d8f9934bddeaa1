r"""Compiled host loops of the per-sample accelerators (numba, where it is installed).

A per-sample Anderson step of :class:`~hodl_plugin.acceleration._anderson_batch.HostBatch` is about 25
small numpy operations over the batch; in the solver's loop, between evaluations of ``T``, each costs
several µs whatever its size. :func:`anderson` compiles the same step — the new secant pair into the ring
buffer, the Gram row and column, the ridge least squares with its condition probe, the update — as one
loop over the samples, one call per step (about 1.5× faster per-sample Anderson in
``python -m benchmarks.deq``; one problem on the CPU runs as a batch of one). :func:`broyden` does the same
for per-sample Broyden. The arithmetic is the numpy path's up to the order of the sums; the restart and
safeguard decisions stay in numpy.

numba is optional (the ``fast`` extra, ``pip install "hodl_plugin[fast]"``): without it, or with
``NUMBA_DISABLE_JIT=1`` (where numba would run the loops as Python), :func:`anderson` returns ``None``
and the numpy path runs. The first compiled step of a dtype compiles the loop (about 2 s), cached on
disk where numba finds a writable cache directory.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Optional

from .base import np  # (np: None without numpy; then no host path runs)
from .base import row_norms as base_row_norms

__all__ = ["anderson", "broyden", "row_norms", "run"]

_compiled: dict[str, Optional[Callable[..., None]]] = {}


def _anderson_rows(W: Any, G: Any, up: Any, fp: Any, un: Any, fn: Any, i: int, lam1: float, tiny: float,
                   probe: Any, lim2: float, mix: float, out: Any, gamma: Any, ok: Any) -> None:  # pragma: no cover
    r"""One per-sample Anderson step for every sample ``b`` (compiled by :func:`anderson`; the numpy
    reference is ``HostBatch._step``, steps 2-4):

    - the pair :math:`[\Delta u, \Delta f] = [u - u_p, f - f_p]` into row ``i`` of the ring buffer
      ``W[b]`` (``(m, 2n)``);
    - row and column ``i`` of :math:`G_b = \Delta F^\top\Delta F + \lambda\,\mathrm{diag}`, the diagonal
      entry times :math:`1 + \lambda` (at least ``tiny``: a zero column is decoupled, not singular);
    - a sample that did not move (:math:`\Delta f = 0`, frozen by the loop) gets :math:`\gamma = 0`,
      ``ok``; the others solve :math:`G\,[x, \gamma] = [Dp, \Delta F^\top f]` (LU with partial
      pivoting, :math:`D = \mathrm{diag}(G)^{1/2}`), ``ok`` where :math:`\|Dx\|^2 \le` ``lim2`` (the
      condition probe; a singular or NaN system fails), :math:`\gamma = 0` where not ``ok``;
    - ``out[b]`` :math:`= u + \mathrm{mix}\,f - (\Delta U + \mathrm{mix}\,\Delta F)\gamma`.
    """
    B, m, n2 = W.shape
    n = n2 // 2
    H = np.empty((m, m), G.dtype)
    R = np.empty((m, 2), G.dtype)
    d = np.empty(m, G.dtype)
    for b in range(B):
        for k in range(n):
            W[b, i, k] = un[b, k] - up[b, k]
            W[b, i, n + k] = fn[b, k] - fp[b, k]
        for j in range(m):
            s0 = 0.0  # (float64 sums, also for float32 data)
            s1 = 0.0
            for k in range(n):
                w = W[b, j, n + k]
                s0 += w * W[b, i, n + k]
                s1 += w * fn[b, k]
            G[b, i, j] = s0
            G[b, j, i] = s0
            R[j, 1] = s1
        gii = G[b, i, i]
        moved = gii > 0
        v = gii * lam1
        G[b, i, i] = tiny if v < tiny else v
        good = True
        if moved:
            for j in range(m):
                d[j] = math.sqrt(G[b, j, j])
                R[j, 0] = d[j] * probe[j]
                for k in range(m):
                    H[j, k] = G[b, j, k]
            for c in range(m):  # LU with partial pivoting, both right-hand sides along
                p = c
                a = abs(H[c, c])
                for r in range(c + 1, m):
                    if abs(H[r, c]) > a:
                        a = abs(H[r, c])
                        p = r
                if not a > 0:  # singular, or NaN
                    good = False
                    break
                if p != c:
                    for k in range(m):
                        t = H[c, k]
                        H[c, k] = H[p, k]
                        H[p, k] = t
                    for k in range(2):
                        t = R[c, k]
                        R[c, k] = R[p, k]
                        R[p, k] = t
                for r in range(c + 1, m):
                    q = H[r, c] / H[c, c]
                    for k in range(c + 1, m):
                        H[r, k] -= q * H[c, k]
                    R[r, 0] -= q * R[c, 0]
                    R[r, 1] -= q * R[c, 1]
            if good:
                x2 = 0.0
                for c in range(m - 1, -1, -1):
                    t0 = R[c, 0]
                    t1 = R[c, 1]
                    for k in range(c + 1, m):
                        t0 -= H[c, k] * R[k, 0]
                        t1 -= H[c, k] * R[k, 1]
                    R[c, 0] = t0 / H[c, c]
                    R[c, 1] = t1 / H[c, c]
                    x = R[c, 0] * d[c]
                    x2 += x * x
                good = x2 <= lim2  # (NaN fails)
        ok[b] = good
        for k in range(n):
            out[b, k] = un[b, k] + mix * fn[b, k]
        for j in range(m):
            g = R[j, 1] if moved and good else 0.0
            gamma[b, j] = g
            if g != 0.0:
                for k in range(n):
                    out[b, k] -= g * (W[b, j, k] + mix * W[b, j, n + k])


def _broyden_rows(A: Any, V: Any, up: Any, fp: Any, un: Any, fn: Any, i: int, mix: float, rc2: float,
                  out: Any, ok: Any) -> None:  # pragma: no cover
    r"""One per-sample (good) Broyden step for every sample ``b`` (compiled by :func:`broyden`; the numpy
    reference is ``broyden._HostState.step``). With :math:`s = u - u_p`, :math:`y = f - f_p` and
    :math:`M = \mathrm{mix}\,I + \sum_{j<i} a_j v_j^\top` (the rows ``A[b, :i]``, ``V[b, :i]``):
    :math:`v = M^\top s`, the update :math:`a = -(s + My)/(v^\top y)` into row ``i`` (0 where the
    curvature test :math:`(v^\top y)^2 > s^\top s\,\|My\|^2/\mathrm{rc2}` fails, ``ok`` false, or
    where the sample did not move, ``ok`` true), and ``out[b]`` :math:`= u + Mf + a\,(v^\top f)`."""
    B, L, n = A.shape
    S = np.empty(n, A.dtype)  # s, y, My, Mf of the sample (formed once, read in every product)
    Y = np.empty(n, A.dtype)
    My = np.empty(n, A.dtype)
    Mf = np.empty(n, A.dtype)
    for b in range(B):
        ss = 0.0
        for k in range(n):
            S[k] = un[b, k] - up[b, k]
            Y[k] = fn[b, k] - fp[b, k]
            My[k] = mix * Y[k]
            Mf[k] = mix * fn[b, k]
            V[b, i, k] = mix * S[k]
            ss += S[k] * S[k]
        for j in range(i):  # the rows in use: M = mix·I + Σ_j a_j v_jᵀ
            cy = 0.0
            cf = 0.0
            cs = 0.0
            for k in range(n):
                cy += V[b, j, k] * Y[k]
                cf += V[b, j, k] * fn[b, k]
                cs += A[b, j, k] * S[k]
            for k in range(n):
                My[k] += cy * A[b, j, k]
                Mf[k] += cf * A[b, j, k]
                V[b, i, k] += cs * V[b, j, k]
        by = 0.0  # vᵀy, vᵀf, ‖My‖²
        bf = 0.0
        my2 = 0.0
        for k in range(n):
            by += V[b, i, k] * Y[k]
            bf += V[b, i, k] * fn[b, k]
            my2 += My[k] * My[k]
        still = ss == 0.0  # a sample that did not move (kept frozen by the loop): no update, no restart
        good = by * by > ss * my2 / rc2 or still  # (NaN fails)
        ok[b] = good
        coef = -1.0 / by if good and not still else 0.0
        for k in range(n):
            a = (S[k] + My[k]) * coef
            A[b, i, k] = a
            out[b, k] = a * bf + Mf[k] + un[b, k]


def run(state: Any, args: tuple) -> bool:
    """``state.kernel(*args)``; ``False`` (and ``state.kernel = None``: the numpy path from then on) where
    numba cannot compile the loop for these arguments — which it finds out before running it, so nothing
    was written."""
    try:
        state.kernel(*args)
    except Exception:  # numba's typing errors: arguments of types the loop was not written for
        state.kernel = None
        return False
    return True


def _row_norms(a: Any, r: Any, lo: float, hi: float) -> bool:  # pragma: no cover
    """``r[b] = ‖a[b]‖`` (summed in float64); whether every norm lies strictly inside ``(lo, hi)`` (NaN
    does not; a row whose squares overflow reads Inf, and the caller measures it again, scaled)."""
    inside = True
    for b in range(a.shape[0]):
        s = 0.0
        for k in range(a.shape[1]):
            s += a[b, k] * a[b, k]
        v = math.sqrt(s)
        r[b] = v
        if not (lo < v < hi):
            inside = False
    return inside


def norms(state: Any, a: Any) -> tuple[Any, bool]:
    """:func:`~hodl_plugin.acceleration.base.row_norms` of the rows of ``a``: compiled where ``state`` has
    its compiled step (``state.kernel``), measured again in numpy (scaled) when a norm leaves
    ``state.window`` (:func:`~hodl_plugin.acceleration.base.normal_window` of its dtype)."""
    if state.kernel is not None:
        kernel = row_norms()
        if kernel is not None:
            r = np.empty(a.shape[0])
            if kernel(a, r, state.window[0], state.window[1]):
                return r, True
    return base_row_norms(a, state.window)


def _compile(fn: Callable[..., None]) -> Optional[Callable[..., None]]:
    if np is None:
        return None
    try:
        import numba
    except Exception:  # not installed, or built for another numpy (numba raises ImportError then)
        return None
    if numba.config.DISABLE_JIT:  # the loops would run as Python, far slower than numpy
        return None
    # no nnan / ninf in fastmath: the NaN checks stay exact; error_model="numpy": a division by 0 gives Inf
    # or NaN as in numpy, never an exception halfway through the samples
    options = {"nogil": True, "fastmath": {"reassoc", "contract"}, "error_model": "numpy"}
    try:
        return numba.njit(cache=True, **options)(fn)
    except RuntimeError:  # no writable cache directory: compiled in every process
        return numba.njit(**options)(fn)


def anderson() -> Optional[Callable[..., None]]:
    """The compiled per-sample Anderson step (:func:`_anderson_rows`'s arguments), or ``None`` without
    numba (the numpy path runs)."""
    return _get("anderson", _anderson_rows)


def broyden() -> Optional[Callable[..., None]]:
    """The compiled per-sample Broyden step (:func:`_broyden_rows`'s arguments), or ``None`` without
    numba (the numpy path runs)."""
    return _get("broyden", _broyden_rows)


def row_norms() -> Optional[Callable[..., bool]]:
    """The compiled :func:`_row_norms`, or ``None`` without numba."""
    return _get("row_norms", _row_norms)


def _get(name: str, fn: Callable[..., None]) -> Optional[Callable[..., None]]:
    if name not in _compiled:
        _compiled[name] = _compile(fn)
    return _compiled[name]
