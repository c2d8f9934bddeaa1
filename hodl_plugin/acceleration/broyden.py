r"""Limited-memory "good" Broyden acceleration of the fixed-point iteration (the DEQ solvers' method).

With the residual :math:`f(u) = T(u) - u`, Newton's step for :math:`f(u) = 0` is
:math:`u_{k+1} = u_k + (I - \partial_u T)^{-1} f_k`. Broyden's method replaces the inverse by a
matrix :math:`M_k` built from the secant pairs :math:`s = u_k - u_{k-1}`, :math:`y = f_k - f_{k-1}`:
starting from the KM step :math:`M_0 = \beta I`, each step applies the "good" (first) Broyden update in
its inverse (Sherman–Morrison) form,

.. math::

    M_{k} = M_{k-1} - \frac{(s + M_{k-1}y)\,s^\top M_{k-1}}{s^\top M_{k-1} y},
    \qquad u_{k+1} = u_k + M_k f_k,

which makes :math:`M_k y = -s` (the secant condition of :math:`-(\partial_u f)^{-1}`) and changes
:math:`M` by rank one. :math:`M_k = \beta I + \sum_j a_j b_j^\top` is stored as two ring buffers of
``history_size`` vectors :math:`a_j = -(s + M y)/(s^\top M y)`, :math:`b_j = M^\top s` (the form of
the DEQ papers' and TorchDEQ's ``broyden_solver``); a step costs four products with them and no
linear solve. When the memory is full it is cleared (the method restarts from :math:`M_0`; keeping
the newest updates instead — dropping the oldest term of a product of rank-one updates — was measured
to diverge on DEQ-style problems without a safeguard).

Safeguards (the same as :class:`~hodl_plugin.acceleration.Anderson`'s):

- *restart*: when the update's denominator is nearly orthogonal,
  :math:`|s^\top M y| \le \|s\|\,\|My\| / \texttt{restart_cond}`, the memory is cleared and the
  step is plain KM;
- *fall-back*: when the residual at the new point exceeds ``safeguard`` times the last accepted one
  (or is not finite; by default 100 times, where Anderson uses 10), the point is rejected, the
  memory cleared, and the iteration continues from the plain KM step of the last accepted point.

With ``batch_dims`` every sample has its own :math:`M`, restarts and safeguard, in batched products
(numpy on the host; masked torch operations, without host syncs, on a GPU and under ``torch.func``
transforms). A sample whose iterate did not move (a converged sample the loop keeps frozen) is left
as it is.

Example:
    >>> import torch, hodl_plugin as hp
    >>> W = 0.99 * torch.linalg.qr(torch.randn(32, 32, dtype=torch.float64,
    ...                                        generator=torch.Generator().manual_seed(0)))[0]
    >>> x = 0.3 * torch.randn(32, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    >>> T = lambda z, x: torch.tanh(W @ z + x)
    >>> _, plain = hp.GKMSolver(T, tol=1e-10, max_steps=5000).solve(torch.zeros(32, dtype=torch.float64), x)
    >>> u, info = hp.GKMSolver(T, tol=1e-10, acceleration=hp.Broyden(20)).solve(torch.zeros(32, dtype=torch.float64), x)
    >>> info.converged, info.steps < plain.steps / 2
    (True, True)
"""

from __future__ import annotations

import math
from typing import Any, Optional, Union

import torch
from torch import Tensor

from . import _kernels
from .base import (
    Accelerator,
    MaskedCounters,
    as_rows,
    batch_size,
    check_history,
    check_mixing,
    check_restart_cond,
    check_safeguard,
    host_ok,
    np,
    rescale,
)

__all__ = ["Broyden"]


class Broyden(Accelerator):
    """Limited-memory good Broyden for :class:`~hodl_plugin.GKMSolver` (``acceleration=``); see the
    module docstring for the update and its safeguards.

    Args:
        history_size: the number of rank-one updates kept (memory ``2·history_size·numel(u)``); the
            memory is cleared when full.
        mixing: β of the initial inverse :math:`M_0 = \\beta I` (the first step is the KM step);
            ``None`` uses the solver's ``beta``.
        restart_cond: clear the memory when :math:`\\|s\\|\\|My\\| / |s^\\top My|` exceeds this.
        safeguard: reject a point whose residual exceeds ``safeguard`` times the last accepted one
            (fall back to the plain KM step); ``inf`` switches it off. Broyden's residuals are less
            monotone than Anderson's: at 10 (Anderson's default) the fall-backs cost 30–40 % more
            steps on the DEQ benchmark, at 100 none fired.

    >>> Broyden(history_size=20)
    Broyden(history_size=20, mixing=None, restart_cond=1e+08, safeguard=100.0)
    """

    def __init__(
        self,
        history_size: int = 20,
        mixing: Optional[float] = None,
        restart_cond: float = 1e8,
        safeguard: float = 100.0,
    ) -> None:
        self.history_size, self.mixing = history_size, mixing
        self.restart_cond, self.safeguard = restart_cond, safeguard
        self._validate()
        self._host_decisions: Optional[bool] = None  # None: on the CPU (tests force either path)
        self._compiled: Optional[bool] = None  # None: the host path's compiled loop where numba is installed

    def __repr__(self) -> str:
        return (
            f"Broyden(history_size={self.history_size}, mixing={self.mixing}, "
            f"restart_cond={self.restart_cond:g}, safeguard={self.safeguard!r})"
        )

    def _validate(self) -> None:
        """The options' checks: at construction and again at every solve (an attribute set since)."""
        self.history_size = check_history(self.history_size)
        self.mixing = check_mixing(self.mixing)
        self.restart_cond = check_restart_cond(self.restart_cond)
        self.safeguard = check_safeguard(self.safeguard)

    def init(self, u: Tensor, batch_dims: int) -> Union[_HostState, _MaskedState]:
        """The state for ``u``: one problem is a batch of one."""
        self._validate()
        B = batch_size(u, batch_dims)
        if host_ok(u, self._host_decisions):
            return _HostState(self, u, B)
        return _MaskedState(self, u, B)

    def step(self, st: Union[_HostState, _MaskedState], u: Tensor, f: Tensor, r: Tensor, beta: float) -> Tensor:
        """The next iterate :math:`u + M f` (see the module docstring)."""
        return st.step(self, u, f, r, beta)


#: residual norms inside this range keep the host state's products of four residual-sized factors (the
#: curvature test's (sᵀMy)²) inside float64; beyond it the state steps in per-sample power-of-2 units
_WINDOW = (1e-70, 1e70)
_WINDOW32 = (1e-8, 1e8)  # (float32 state)


class _HostState:
    """Per-sample Broyden on the host (numpy on views of CPU tensors, Python-branch decisions)."""

    #: the residual norms are taken here, in numpy (summed in float64), at every step
    measures_itself = True

    def __init__(self, acc: Broyden, u: Tensor, B: int) -> None:
        n = u.numel() // B if B else 0
        L = acc.history_size
        dt = np.float64 if u.dtype == torch.float64 else np.float32
        self.shape, self.B, self.n, self.L, self.steps, self.dtype = u.shape, B, n, L, 0, dt
        self.A = np.zeros((B, L, n), dt)  # rows a_j
        self.V = np.zeros((B, L, n), dt)  # rows b_j
        self.Y = np.empty((B, 2, n), dt)  # [y, f] of the step
        self.rc2 = acc.restart_cond**2
        self.big = float(np.finfo(dt).max)
        self.sg = acc.safeguard if math.isfinite(acc.safeguard) else None
        self.restarts = np.zeros(B, np.int64)
        self.up: Any = None  # the last accepted point, its residual and safeguard limit
        self.fp: Any = None
        self.rlim: Any = None
        self.scale: Any = None  # per-sample exponents once a residual left the window (units of 2^-e)
        self.window = _WINDOW if dt == np.float64 else _WINDOW32
        # the step as one compiled loop over the samples where numba is installed (acc._compiled = False:
        # the numpy code below)
        self.kernel = _kernels.broyden() if getattr(acc, "_compiled", None) is not False and B and n else None
        self.ok = np.empty(B, bool)

    def _limit(self, r: Any) -> Any:
        return r * self.sg if self.sg is not None else np.full_like(r, self.big)

    def _reset(self, move: Any) -> None:
        """Clear the memory of the samples in ``move`` (their units changed: :func:`~.base.rescale`)."""
        self.A[move] = 0.0
        self.V[move] = 0.0

    def step(self, acc: Broyden, u: Tensor, f: Tensor, r: Tensor, beta: float) -> Tensor:
        B, n, L = self.B, self.n, self.L
        un, fn = as_rows(u, B, n), as_rows(f, B, n)
        rn = _kernels.norms(self, fn)[0]  # (r, torch's, is given at checks only)
        mix = beta if acc.mixing is None else acc.mixing
        self.steps += 1
        if self.steps == 1:  # M_0 = mix·I: the KM step
            self.up, self.fp, self.rlim = un, fn, self._limit(rn)
            return torch.from_numpy(un + mix * fn).view(self.shape)
        with np.errstate(all="ignore"):  # a diverging sample may overflow; the loop reports it
            s_units = None
            inside = np.minimum.reduce(rn) > self.window[0] and np.maximum.reduce(rn) < self.window[1]  # (NaN: out)
            if self.scale is not None or not inside:
                e = rescale(self, rn, self.window, self._reset)  # the step in units of 2^-e per sample (exact)
                s_units = e[:, None]
                un, fn, rn = np.ldexp(un, s_units), np.ldexp(fn, s_units), np.ldexp(rn, e)
            keep = rn <= self.rlim  # safeguard (NaN and Inf fail it)
            i = (self.steps - 2) % L
            if i == 0 and self.steps > 2:  # memory full: restart from M_0
                self.A.fill(0.0)
                self.V.fill(0.0)
            out = np.empty_like(un) if self.kernel is not None else None
            if out is not None and _kernels.run(self, (self.A, self.V, self.up, self.fp, un, fn, i, mix, self.rc2,
                                                       out, self.ok)):
                ok = self.ok
            else:
                out, ok = self._step(un, fn, i, mix)
            if keep.all() and ok.all():
                self.up, self.fp, self.rlim = un, fn, self._limit(rn)
            else:
                self._restart(keep, ok, out, un, fn, rn, beta, mix)
            if s_units is not None:
                out = np.ldexp(out, -s_units)
        return torch.from_numpy(out).view(self.shape)

    def _step(self, un: Any, fn: Any, i: int, mix: float) -> tuple[Any, Any]:
        """The update into row ``i`` and the proposed points, in numpy (``_kernels._broyden_rows``
        compiles the same): ``(out, ok)``."""
        Y = self.Y
        np.subtract(fn, self.fp, out=Y[:, 0])
        Y[:, 1] = fn
        s = un - self.up
        MY = mix * Y  # (B, 2, n): [My, Mf], M = mix·I + Σ_j a_j b_jᵀ over the i rows in use
        b = mix * s  # Mᵀs
        if i:  # rows i.. are empty since the last clear: the products skip them
            A, V = self.A[:, :i], self.V[:, :i]
            MY += np.matmul(np.matmul(Y, V.transpose(0, 2, 1)), A)
            b += np.matmul(np.matmul(s[:, None, :], A.transpose(0, 2, 1)), V)[:, 0]
        A, V = self.A, self.V
        by, bf = np.matmul(b[:, None, :], Y.transpose(0, 2, 1))[:, 0].T  # sᵀMy, sᵀMf
        My = MY[:, 0]
        ss = np.einsum("bn,bn->b", s, s)
        still = ss == 0  # a sample that did not move (kept frozen by the loop): no update, no restart
        ok = (by * by > ss * np.einsum("bn,bn->b", My, My) / self.rc2) | still  # NaN fails
        coef = np.where(ok & ~still, -1.0 / by, 0.0)
        a = A[:, i]
        np.add(s, My, out=a)
        a *= coef[:, None]
        V[:, i] = b
        out = a * bf[:, None]  # u + M_k f = u + M_{k-1}f + a (bᵀf)
        out += MY[:, 1]
        out += un
        return out, ok

    def _restart(self, keep: Any, ok: Any, out: Any, un: Any, fn: Any, rn: Any, beta: float, mix: float) -> None:
        """Clear the memory of the samples that failed a test; an ill-conditioned update takes the KM
        step from here, a rejected point the KM step from the last accepted one."""
        drop = ~(keep & ok)
        self.A[drop] = 0.0
        self.V[drop] = 0.0
        self.restarts += drop
        bad = keep & ~ok
        if bad.any():
            out[bad] = un[bad] + mix * fn[bad]
        if keep.all():
            self.up, self.fp, self.rlim = un, fn, self._limit(rn)
            return
        rej = ~keep
        out[rej] = self.up[rej] + beta * self.fp[rej]
        k1 = keep[:, None]
        self.up, self.fp = np.where(k1, un, self.up), np.where(k1, fn, self.fp)
        self.rlim = np.where(keep, self._limit(rn), self.big)  # the fall-back point is accepted


class _MaskedState(MaskedCounters):
    """Per-sample Broyden in torch operations without host syncs (GPU, ``torch.func`` transforms)."""

    def __init__(self, acc: Broyden, u: Tensor, B: int) -> None:
        n = u.numel() // B if B else 0
        self.shape, self.B, self.n, self.L, self.steps = u.shape, B, n, acc.history_size, 0
        self.rc2 = acc.restart_cond**2
        self.big = torch.finfo(u.dtype).max
        self.sg = acc.safeguard if math.isfinite(acc.safeguard) else None
        # allocated at the first step from the iterates (batched like them under vmap)
        self.A = self.V = self.up = self.fp = self.rlim = self.fresh = u.new_zeros(0)

    def step(self, acc: Broyden, u: Tensor, f: Tensor, r: Tensor, beta: float) -> Tensor:
        B, n, L = self.B, self.n, self.L
        un, fn, r = u.reshape(B, n), f.reshape(B, n), r.reshape(B)
        mix = beta if acc.mixing is None else acc.mixing
        self.steps += 1
        if self.steps == 1:
            self.A = torch.zeros_like(un + fn).unsqueeze(1).repeat(1, L, 1)  # batched if either is
            self.V = torch.zeros_like(self.A)
            self.up, self.fp, self.rlim = un, fn, self._limit(r)
            self.fresh = torch.zeros_like(r)
            return torch.add(un, fn, alpha=mix).reshape(self.shape)
        keep = r <= self.rlim
        i = (self.steps - 2) % L
        if i == 0 and self.steps > 2:
            self.A.zero_()
            self.V.zero_()
        s = un - self.up
        Y = torch.stack([fn - self.fp, fn], 1)  # (B, 2, n)
        MY = torch.baddbmm(Y, torch.bmm(Y, self.V.transpose(1, 2)), self.A, beta=mix)  # [My, Mf]
        s1 = s.unsqueeze(1)
        b = torch.baddbmm(s1, torch.bmm(s1, self.A.transpose(1, 2)), self.V, beta=mix)  # (Mᵀs)ᵀ
        d = torch.bmm(b, Y.transpose(1, 2)).squeeze(1)  # (B, 2): sᵀMy, sᵀMf
        b = b.squeeze(1)
        by, bf = d[:, 0], d[:, 1]
        My = MY[:, 0]
        ss = s.square().sum(-1)
        still = ss == 0  # a sample that did not move: no update, no restart
        ok = (by * by > ss * My.square().sum(-1) / self.rc2) | still
        upd = ok & ~still
        coef = torch.where(upd, -1.0 / torch.where(upd, by, 1.0), 0.0)
        a = (s + My) * coef.unsqueeze(-1)
        self.A[:, i] = a
        self.V[:, i] = b
        k1, o1 = keep.unsqueeze(-1), ok.unsqueeze(-1)
        step = torch.where(o1, torch.addcmul(MY[:, 1], a, bf.unsqueeze(-1)), mix * fn)
        u_next = torch.where(k1, un + step, torch.add(self.up, self.fp, alpha=beta))
        fresh = keep & ok
        f3 = fresh.view(B, 1, 1)
        self.A.mul_(f3)
        self.V.mul_(f3)
        self.up, self.fp = torch.where(k1, un, self.up), torch.where(k1, fn, self.fp)
        self.rlim = torch.where(keep, self._limit(r), self.big)
        self.fresh = self.fresh + fresh
        return u_next.reshape(self.shape)
