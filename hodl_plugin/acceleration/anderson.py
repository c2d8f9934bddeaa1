r"""Anderson acceleration of the fixed-point iteration (type II, Walker & Ni 2011).

With the residual :math:`f_k = T(u_k) - u_k` and the last :math:`m` differences
:math:`\Delta U = [u_{i+1} - u_i]`, :math:`\Delta F = [f_{i+1} - f_i]`, each step solves the small
ridge-regularised least-squares problem

.. math::

    \gamma_k = \arg\min_\gamma \|f_k - \Delta F\,\gamma\|^2 + \lambda\|D\gamma\|^2,
    \qquad D = \mathrm{diag}(\|\Delta F_i\|),\ \lambda = \texttt{regularization},

(a solve of the column-scaled :math:`m\times m` Gram matrix
:math:`D^{-1}\Delta F^\top\Delta F D^{-1} + \lambda I`) and moves to

.. math::  u_{k+1} = u_k + \beta f_k - (\Delta U + \beta\,\Delta F)\,\gamma_k

(:math:`\beta` the mixing parameter, by default the solver's KM relaxation :math:`\beta_k`; with
:math:`\gamma = 0` this is the plain KM step). Safeguards:

- *restart*: when the scaled Gram matrix :math:`H` is ill-conditioned — its condition estimate
  :math:`m\|H^{-1}p\|/\|p\| \le \|H\|\|H^{-1}\|` (a fixed probe :math:`p`, solved with the same
  factorisation) exceeds ``restart_cond``, or the solve fails — the history is cleared and the step
  is plain KM;
- *fall-back*: when the residual at the accelerated point exceeds ``safeguard`` times the last
  accepted one, that point is rejected, the history cleared, and the iteration continues from the
  plain KM step of the last accepted point (no extra evaluation of :math:`T`: the rejected
  evaluation is the price).

Implementations of the same iteration, in preallocated buffers:

- on the CPU with numba installed (the ``fast`` extra), eager float32/float64 — one problem too is a
  batch of one of the per-sample state below, whose step is one compiled loop
  (:mod:`~hodl_plugin.acceleration._kernels`);
- one problem (no ``batch_dims``), eager, otherwise — the fast path of this module: the columns of
  :math:`\Delta F` are scaled to unit norm when they enter the ring buffer (the :math:`D^{-1}` above,
  once), so the Gram matrix gains one row and column per step (one matrix-vector product instead of
  :math:`m^2 n`); on the CPU the safeguard/restart decisions are Python branches on host floats
  (reading a CPU tensor is no device sync) and the :math:`m\times m` solve is one
  ``numpy.linalg.solve`` (13 torch operations per step; the plain KM step of a ``u - (Qu - x)/L`` map
  is 4); on a GPU the decisions are masks and the solve a Cholesky factorisation with two triangular
  solves (38 operations, none of which synchronises: the solver's residual checks are the only syncs);
- per sample (``batch_dims``, or one problem under ``torch.func`` transforms):
  :mod:`~hodl_plugin.acceleration._anderson_batch` — every sample its own :math:`\gamma`, restarts and
  safeguard, all samples in one batched least-squares step (numpy on the host, masked torch
  operations on a GPU and under transforms).

Why not with HODL aggregation: the aggregated map changes with :math:`k`
(:math:`w_k = u_k - \alpha_k s\nabla F(u_k)`), and the selection of the :math:`F`-optimal fixed point
comes from :math:`\sum_k\alpha_k = \infty` accumulated over the whole run; an extrapolation that
jumps to a fixed point of :math:`T` skips that drift and returns *a* fixed point, not the selected
one (also when started late, where :math:`\alpha_k` is small but its sum still diverges). So the
solver refuses the combination. Unrolled / truncated differentiation through the least-squares is
not offered either (``ValueError``): use the implicit, inexact or first_order modes, whose backward
is exact at the fixed point whatever the forward iteration was.

Example:
    >>> import torch, hodl_plugin as hp
    >>> A = torch.diag(torch.linspace(1e-3, 1.0, 50, dtype=torch.float64))
    >>> b = torch.ones(50, dtype=torch.float64)
    >>> T = lambda u: u - (A @ u - b)           # u* = A⁻¹ b, contraction 1 - 1e-3: plain KM 16110 steps
    >>> solver = hp.GKMSolver(T, max_steps=20000, acceleration=hp.Anderson(5))
    >>> u, info = solver.solve(torch.zeros(50, dtype=torch.float64))
    >>> float((u - 1 / A.diagonal()).norm() / u.norm()) < 1e-6, info.steps
    (True, 479)
"""

from __future__ import annotations

import math
import numbers
from typing import Optional, Union

import torch
from torch import Tensor

from .._torch_compat import transforms_active
from . import _kernels
from ._anderson_batch import HostBatch, MaskedBatch
from .base import (
    Accelerator,
    batch_size,
    check_history,
    check_mixing,
    check_restart_cond,
    check_safeguard,
    host_ok,
    normal_window,
    np,
    solve,
)

__all__ = ["Anderson"]


def _scaled_norm(t: Tensor) -> Tensor:
    """``‖t‖`` without a square over- or underflowing (:func:`hodl_plugin._stopping.scaled_norm`, imported
    here: the stop rule imports this package's host helpers), in ``t``'s dtype."""
    from .._stopping import scaled_norm

    return scaled_norm(t).to(t.dtype)


class _Single:
    """The state of one problem run eagerly (no ``batch_dims``, no transforms): the fast path.

    The rows of ``W`` are the pairs ``[Δu, Δf] / ‖Δf‖`` (unit Δf halves: the column scaling
    :math:`D^{-1}` done once, at insertion), so the ridge Gram matrix ``G`` has the diagonal
    ``1 + λ`` and gains one row and column per step (one matrix-vector product), not ``m² n``.
    Every view used in a step is made once, here: on small problems the per-operation overhead,
    not the arithmetic, is the cost of a step.
    """

    def __init__(self, acc: Anderson, u: Tensor, probe: Tensor) -> None:
        n = u.numel()
        m = min(acc.history_size, max(n, 1))  # more differences than dimensions add nothing (only memory)
        dt, dev = u.dtype, u.device
        self.shape, self.n, self.steps, self.flat = u.shape, n, 0, u.dim() == 1
        eye = torch.eye(m, dtype=dt, device=dev)
        self.lam = acc.regularization * eye  # λI: its row i is added to the new Gram row i
        self.I1 = self.lam + eye  # the ridge Gram matrix of an empty history
        self.G = self.I1.clone()  # Gram matrix of the Δf halves + λI
        self.RP = torch.stack([torch.zeros_like(probe), probe])  # [ΔFᵀf, probe]: right-hand sides
        self.RPT, self.RP0 = self.RP.T, self.RP[0]
        self.probe_limit = acc.restart_cond * float(torch.linalg.vector_norm(probe)) / m
        self.W = torch.zeros(m, 2 * n, dtype=dt, device=dev)  # ring buffer; zero rows are unused
        self.dU, self.dF = self.W[:, :n], self.W[:, n:]
        self.dUT, self.dFT = self.dU.T, self.dF.T
        self.rows = [(self.W[i], self.dU[i], self.dF[i], self.lam[i], self.G[i], self.G[:, i]) for i in range(m)]
        self.zero_m = torch.zeros(m, dtype=dt, device=dev)
        self.inf = torch.tensor(math.inf, dtype=dt, device=dev)
        # on the CPU a 0-d tensor is read without a device sync: the safeguard and restart decisions
        # are taken on the host (Python branches instead of masked blends: half the operations)
        self.host = dev.type == "cpu" if acc._host_decisions is None else acc._host_decisions
        # ... and the m×m Cholesky factorisation by numpy (a view of G): MKL's potrf enters its
        # thread pool even for 5×5, which costs a scheduler time slice (measured 16 ms instead of
        # 5 µs) whenever the cores are busy
        numpy_ok = np is not None and self.host and dev.type == "cpu" and dt in (torch.float32, torch.float64)
        self.Gn = self.G.numpy() if numpy_ok else None
        self.RPTn = self.RPT.numpy() if numpy_ok else None
        self.u_prev = self.f_prev = u.new_zeros(0)  # the last accepted point
        self.r_lim: Tensor | float = math.inf  # safeguard · its residual; inf after a fall-back
        self.fresh: Tensor | int = 0 if self.host else torch.zeros((), dtype=dt, device=dev)
        self.extreme = False  # the last residual was beyond 1e±140 (host path: the next pair is normed scaled)

    @property
    def restarts(self) -> Tensor:
        """Restarts + fall-backs so far (a 0-d tensor)."""
        return torch.as_tensor(max(0, self.steps - 1) - self.fresh)

    def clear(self) -> None:
        """Empty the history (host decisions)."""
        self.W.zero_()
        self.G.copy_(self.I1)


class _Upcast:
    """A float32 state for float16 / bfloat16 iterates (its counters read through)."""

    def __init__(self, inner: Union[_Single, HostBatch, MaskedBatch], dtype: torch.dtype) -> None:
        self.inner, self.dtype = inner, dtype

    def __getattr__(self, name: str) -> object:
        return getattr(self.inner, name)


class Anderson(Accelerator):
    r"""Type-II Anderson acceleration for :class:`~hodl_plugin.GKMSolver` (``acceleration=``).

    Args:
        history_size: m, the number of past differences used (memory ``2·m·numel(u)``; at most
            ``numel(u)`` per sample are kept, more add nothing).
        mixing: the mixing parameter β of the update; ``None`` uses the solver's ``beta``.
        regularization: ridge λ on the Gram matrix of the unit-scaled columns of ΔF.
        restart_cond: clear the history when the scaled Gram matrix's condition estimate exceeds
            this.
        safeguard: reject an accelerated point whose residual exceeds ``safeguard`` times the last
            accepted residual (fall back to the plain KM step); ``inf`` switches it off.

    With ``batch_dims`` every sample has its own history, coefficients, restarts and safeguard
    (``hodl_plugin.acceleration._anderson_batch``), as if it were solved alone.

    Raises:
        ValueError: an option out of its range (named in the message).
        ConfigurationError: (from :class:`~hodl_plugin.solver.GKMSolver`) with ``hypergrad="unrolled"``
            or ``"truncated"``, or with HODL aggregation (:math:`\alpha_k > 0`).

    >>> Anderson(history_size=5)
    Anderson(history_size=5, mixing=None, regularization=1e-10, restart_cond=1e+08, safeguard=10.0)
    """

    def __init__(
        self,
        history_size: int = 5,
        mixing: Optional[float] = None,
        regularization: float = 1e-10,
        restart_cond: float = 1e8,
        safeguard: float = 10.0,
    ) -> None:
        self.history_size, self.mixing, self.regularization = history_size, mixing, regularization
        self.restart_cond, self.safeguard = restart_cond, safeguard
        self._validate()
        self._host_decisions: Optional[bool] = None  # None: on the CPU (tests force either path)
        self._compiled: Optional[bool] = None  # None: the host path's compiled loop where numba is installed

    def __repr__(self) -> str:
        return (
            f"Anderson(history_size={self.history_size}, mixing={self.mixing}, "
            f"regularization={self.regularization:g}, restart_cond={self.restart_cond:g}, "
            f"safeguard={self.safeguard!r})"
        )

    def _validate(self) -> None:
        """The options' checks: at construction and again at every solve (an attribute set since)."""
        self.history_size = check_history(self.history_size)
        self.mixing = check_mixing(self.mixing)
        reg = self.regularization
        if isinstance(reg, bool) or not (isinstance(reg, numbers.Real) and 0 <= reg < 1):
            raise ValueError(f"regularization must be in [0, 1), got {reg!r}")
        self.regularization = float(reg)
        self.restart_cond = check_restart_cond(self.restart_cond)
        self.safeguard = check_safeguard(self.safeguard)

    # -- the state machine, called by GKMIteration -----------------------------------------------
    def init(self, u: Tensor, batch_dims: int) -> Union[_Single, HostBatch, MaskedBatch, _Upcast]:
        """The state for ``u`` (``batch_dims`` leading dims are independent samples): the one-problem
        fast path, or the per-sample state (host or masked: ``base.host_ok``; one problem on the host with
        numba: a batch of one, its step compiled); in float16 / bfloat16 the
        state is kept in float32 (torch has no half-precision factorisations on the CPU, and the least
        squares would lose what half precision resolves)."""
        self._validate()
        if u.dtype in (torch.float16, torch.bfloat16):
            return _Upcast(self.init(u.float(), batch_dims), u.dtype)
        B = batch_size(u, batch_dims)
        if batch_dims == 0 and self._compiled is not False and host_ok(u, self._host_decisions) and _kernels.anderson():
            return HostBatch(self, u, 1)  # one problem as a batch of one: one compiled loop per step
        if batch_dims == 0 and not transforms_active():
            m = min(self.history_size, max(u.numel(), 1))  # at most n differences are independent
            probe = torch.cos(torch.arange(m, dtype=u.dtype, device=u.device) * 2.3 + 0.4)  # fixed, generic
            return _Single(self, u, probe)
        if host_ok(u, self._host_decisions):
            return HostBatch(self, u, B)
        return MaskedBatch(self, u, B)

    def step(self, st: Union[_Single, HostBatch, MaskedBatch, _Upcast], u: Tensor, f: Tensor, r: Tensor,
             beta: float) -> Tensor:
        """The next iterate from ``u`` with residual ``f = T(u) - u`` and its norm(s) ``r``; no host
        synchronisation on a GPU or under transforms."""
        if isinstance(st, _Single):
            return self._step_single(st, u, f, r, beta)
        if isinstance(st, _Upcast):
            return self.step(st.inner, u.float(), f.float(), r, beta).to(st.dtype)
        return st.step(self, u, f, r, beta)

    def _step_single(self, st: _Single, u: Tensor, f: Tensor, r: Tensor, beta: float) -> Tensor:
        """:meth:`step` for one problem: the same iteration as the batched code, in 2-D products,
        with the Gram matrix updated by one row and column per step (about 18 operations with
        host decisions, 30 without)."""
        mix = beta if self.mixing is None else self.mixing
        if u.dim() != 1:  # (a view; skipped on vectors: every operation counts here)
            u, f = u.reshape(-1), f.reshape(-1)
        st.steps += 1
        if st.steps == 1:  # no history yet: take the plain KM step
            st.u_prev, st.f_prev = u, f
            st.r_lim = self.safeguard * (float(r) if st.host else r.reshape(()))
            return torch.add(u, f, alpha=mix).view(st.shape)
        if st.host:
            rf = float(r)
            lo, hi = normal_window(u.dtype)
            extreme = not lo < rf < hi  # (0, NaN too): squares beyond the dtype's range
            if extreme:
                rf = float(_scaled_norm(f))
            scaled, st.extreme = extreme or st.extreme, extreme  # (Δf spans this residual and the last)
            return self._step_host(st, u, f, rf, beta, mix, scaled)
        r = r.reshape(())
        # 1. safeguard: a point whose residual grew past safeguard·r_prev (or is NaN) is rejected
        keep = r <= st.r_lim
        sol, ok = self._push_and_solve(st, u, f)
        gamma = torch.where(ok, sol[0], st.zero_m)  # where: a failed solve may hold NaN
        # 4. the step u + βf - (ΔU + βΔF)γ (plain KM when γ = 0), or the fall-back KM step of the
        #    last accepted point
        u_aa = torch.addmv(torch.add(u, f, alpha=mix), st.dUT, gamma, alpha=-1.0)
        u_aa = torch.addmv(u_aa, st.dFT, gamma, alpha=-mix)
        u_next = torch.where(keep, u_aa, torch.add(st.u_prev, st.f_prev, alpha=beta))
        # 5. rejected or ill-conditioned: restart with an empty history; the accepted point becomes
        #    the reference
        fresh = keep.logical_and(ok).to(u.dtype)
        st.W.mul_(fresh)
        torch.lerp(st.I1, st.G, fresh, out=st.G)
        st.u_prev = torch.where(keep, u, st.u_prev)
        st.f_prev = torch.where(keep, f, st.f_prev)
        st.r_lim = torch.where(keep, self.safeguard * r, st.inf)
        st.fresh += fresh
        return u_next.view(st.shape)

    def _step_host(self, st: _Single, u: Tensor, f: Tensor, r: float, beta: float, mix: float,
                   scaled: bool = False) -> Tensor:
        """The same decisions as the masked code, as Python branches (CPU tensors: no sync); ``scaled``:
        the residuals are beyond 1e±140, where the new pair's norm is taken scaled."""
        if not r <= st.r_lim:  # 1. safeguard (NaN too): fall back to the KM step of the last point
            st.clear()
            st.r_lim = math.inf
            return torch.add(st.u_prev, st.f_prev, alpha=beta).view(st.shape)
        self._push(st, u, f, scaled)
        gamma = self._solve_host(st, f)
        if gamma is not None:
            u_next = torch.addmv(torch.add(u, f, alpha=mix), st.dUT, gamma, alpha=-1.0)
            u_next = torch.addmv(u_next, st.dFT, gamma, alpha=-mix)
            st.fresh += 1
        else:  # restart
            st.clear()
            u_next = torch.add(u, f, alpha=mix)
        st.u_prev, st.f_prev, st.r_lim = u, f, self.safeguard * r
        return u_next if st.flat else u_next.view(st.shape)

    @staticmethod
    def _push(st: _Single, u: Tensor, f: Tensor, scaled: bool = False) -> None:
        """Step 2: the new secant pair, scaled to a unit Δf, into the ring buffer; its Gram row and
        column (one matrix-vector product). ``scaled``: a pair at 1e160 or 1e-160, whose norm is taken
        scaled (its squares leave float64)."""
        w, du, df, lam_i, g_row, g_col = st.rows[(st.steps - 2) % len(st.rows)]
        torch.sub(u, st.u_prev, out=du)
        torch.sub(f, st.f_prev, out=df)
        nrm = torch.linalg.vector_norm(df)
        if scaled:
            nrm = _scaled_norm(df)
        w.div_(nrm.clamp_min_(torch.finfo(u.dtype).tiny))
        torch.addmv(lam_i, st.dF, df, out=g_row)
        g_col.copy_(g_row)

    @staticmethod
    def _solve(st: _Single, L: Tensor, f: Tensor) -> Tensor:
        """Step 3: ``[γ, H⁻¹p] = H⁻¹[ΔFᵀf, p]`` (rows) from the Cholesky factor ``L`` of ``H``:
        two triangular solves (no error check, so no sync)."""
        torch.mv(st.dF, f, out=st.RP0)
        y = torch.linalg.solve_triangular(L, st.RPT, upper=False)
        return torch.linalg.solve_triangular(L.mT, y, upper=True).T

    def _push_and_solve(self, st: _Single, u: Tensor, f: Tensor) -> tuple[Tensor, Tensor]:
        """Steps 2-3, masked: ``(sol, ok)`` with ``sol[0]`` = γ (garbage when not ``ok``) and
        ``ok`` a 0-d bool tensor, false on ill-conditioning (m‖H⁻¹p‖/‖p‖ estimates cond(H) from
        below, as in the batched code) or a failed factorisation."""
        self._push(st, u, f)
        L, fail = torch.linalg.cholesky_ex(st.G)
        sol = self._solve(st, L, f)
        ok = fail.logical_not().logical_and_(torch.linalg.vector_norm(sol[1]) <= st.probe_limit)
        return sol, ok

    def _solve_host(self, st: _Single, f: Tensor) -> Optional[Tensor]:
        """Step 3 with host decisions: γ, or ``None`` for a restart (ill-conditioned or failed).

        With numpy, the m×m solve is one LAPACK call on views of ``G`` and the right-hand sides
        (:func:`~hodl_plugin.acceleration.base.solve`: LU with partial pivoting, backward stable;
        NaN for an exactly singular matrix, which fails the condition test; ~2 µs of call overhead
        against ~4 µs per torch operation of the Cholesky route)."""
        if st.Gn is not None:
            torch.mv(st.dF, f, out=st.RP0)
            sol = solve(st.Gn, st.RPTn)
            p = sol[:, 1]
            if not float(p @ p) <= st.probe_limit**2:  # NaN too
                return None
            return torch.from_numpy(sol[:, 0])
        L, fail = torch.linalg.cholesky_ex(st.G)
        if int(fail):
            return None
        sol = self._solve(st, L, f)
        if not float(torch.linalg.vector_norm(sol[1])) <= st.probe_limit:  # NaN too
            return None
        return sol[0]
