r"""Anderson acceleration of the fixed-point iteration (type II, Walker & Ni 2011).

With the residual :math:`f_k = T(u_k) - u_k` and the last :math:`m` differences
:math:`\Delta U = [u_{i+1} - u_i]`, :math:`\Delta F = [f_{i+1} - f_i]`, each step solves the small
ridge-regularised least-squares problem

.. math::

    \gamma_k = \arg\min_\gamma \|f_k - \Delta F\,\gamma\|^2 + \lambda\|D\gamma\|^2,
    \qquad D = \mathrm{diag}(\|\Delta F_i\|),\ \lambda = \texttt{regularization},

(an LU solve of the column-scaled :math:`m\times m` Gram matrix
:math:`D^{-1}\Delta F^\top\Delta F D^{-1} + \lambda I`, the Gram kept up to date one row per step)
and moves to

.. math::  u_{k+1} = u_k + \beta f_k - (\Delta U + \beta\,\Delta F)\,\gamma_k

(:math:`\beta` the mixing parameter, by default the solver's KM relaxation :math:`\beta_k`; with
:math:`\gamma = 0` this is the plain KM step). Safeguards:

- *restart*: when the scaled Gram matrix is ill-conditioned (LU pivots spread by more than
  ``restart_cond``, or a failed factorisation) the history is cleared and the step is plain KM;
- *fall-back*: when the residual at the accelerated point exceeds ``safeguard`` times the last
  accepted one, that point is rejected, the history cleared, and the iteration continues from the
  plain KM step of the last accepted point (no extra evaluation of :math:`T`: the rejected
  evaluation is the price).

Everything is batched (one least-squares per sample along ``batch_dims``) in preallocated buffers,
with no host synchronisation: the solver's residual checks are the only syncs.

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
    (True, 480)
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor

__all__ = ["Anderson"]


@dataclass
class _State:
    dU: Tensor  # (B, m, n) differences of iterates (ring buffer)
    dF: Tensor  # (B, m, n) differences of residuals
    G: Tensor  # (B, m, m) Gram matrix of dF (all columns, valid or not)
    valid: Tensor  # (B, m) 1.0 for the columns in use, 0.0 after a restart
    u_prev: Tensor  # (B, n) last accepted point
    f_prev: Tensor  # (B, n) its residual
    r_prev: Tensor  # (B,) its residual norm
    must_accept: Tensor  # (B,) bool: the current point is a fall-back KM step
    restarts: Tensor  # (B,) restarts + fall-backs
    shape: torch.Size
    steps: int = 0


class Anderson:
    """Type-II Anderson acceleration for :class:`~hodl_plugin.GKMSolver` (``acceleration=``).

    Args:
        history_size: m, the number of past differences used (memory ``2·m·numel(u)``).
        mixing: the mixing parameter β of the update; ``None`` uses the solver's ``beta``.
        regularization: ridge λ on the Gram matrix of the unit-scaled columns of ΔF.
        restart_cond: clear the history when the scaled Gram matrix's condition estimate (spread of
            its LU pivots) exceeds this.
        safeguard: reject an accelerated point whose residual exceeds ``safeguard`` times the last
            accepted residual (fall back to the plain KM step); ``inf`` switches it off.

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
        if isinstance(history_size, bool) or not isinstance(history_size, numbers.Integral) or history_size < 1:
            raise ValueError(f"history_size must be an integer >= 1, got {history_size!r}")
        if mixing is not None and not (isinstance(mixing, numbers.Real) and 0 < mixing <= 1):
            raise ValueError(f"mixing must be None or in (0, 1], got {mixing!r}")
        if not (isinstance(regularization, numbers.Real) and 0 <= regularization < 1):
            raise ValueError(f"regularization must be in [0, 1), got {regularization!r}")
        if not (isinstance(restart_cond, numbers.Real) and restart_cond > 1):
            raise ValueError(f"restart_cond must be > 1, got {restart_cond!r}")
        if not (isinstance(safeguard, numbers.Real) and safeguard >= 1):
            raise ValueError(f"safeguard must be >= 1 (inf: off), got {safeguard!r}")
        self.history_size = int(history_size)
        self.mixing = None if mixing is None else float(mixing)
        self.regularization = float(regularization)
        self.restart_cond = float(restart_cond)
        self.safeguard = float(safeguard)

    def __repr__(self) -> str:
        return (
            f"Anderson(history_size={self.history_size}, mixing={self.mixing}, "
            f"regularization={self.regularization:g}, restart_cond={self.restart_cond:g}, "
            f"safeguard={self.safeguard!r})"
        )

    def check_compatible(self, mode: str, alpha: object) -> None:
        """Refuse the combinations that would be wrong (see the module docstring)."""
        if mode in ("unrolled", "truncated"):
            raise ValueError(
                f"acceleration=Anderson(...) cannot be used with hypergrad={mode!r}: differentiating "
                "through the least-squares extrapolation is not supported; use hypergrad='implicit', "
                "'inexact' or 'first_order' (exact at the fixed point whatever the forward), or "
                "acceleration=None"
            )
        from .schedules import Constant

        if alpha is not None and not (isinstance(alpha, Constant) and alpha.c == 0):
            raise ValueError(
                "acceleration=Anderson(...) cannot be combined with HODL aggregation (alpha_k > 0): the "
                "selection of the F-optimal fixed point comes from the slowly vanishing alpha_k over "
                "the whole run, which extrapolation skips. Pass alpha=0 (keeps upper for the inexact "
                "bound) or acceleration=None"
            )

    # -- the batched state machine, called by GKMIteration ---------------------------------------
    def init(self, u: Tensor, batch_dims: int) -> _State:
        """Preallocate the history for ``u`` (``batch_dims`` leading dims are independent samples)."""
        shape = u.shape
        B = int(math.prod(shape[:batch_dims])) if batch_dims else 1
        flat = u.detach().reshape(B, -1)
        m = self.history_size
        zeros = torch.zeros_like(flat)  # zeros_like: batched too under torch.func.vmap
        hist = zeros.unsqueeze(1).repeat(1, m, 1)
        col = zeros[:, :1]
        r = zeros[:, 0]
        return _State(
            dU=hist,
            dF=hist.clone(),
            G=col.unsqueeze(-1).repeat(1, m, m),
            valid=col.repeat(1, m),
            u_prev=zeros,
            f_prev=zeros.clone(),
            r_prev=r,
            must_accept=r != r,
            restarts=r.clone(),
            shape=shape,
        )

    def step(self, st: _State, u: Tensor, f: Tensor, r: Tensor, beta: float) -> Tensor:
        """The next iterate from ``u`` with residual ``f = T(u) - u`` and its norm(s) ``r``.

        About 40 small tensor operations, none of which synchronises with the host.
        """
        B, m = st.dU.shape[0], self.history_size
        uf, ff, r = u.reshape(B, -1), f.reshape(B, -1), r.reshape(B)
        mix = beta if self.mixing is None else self.mixing
        st.steps += 1
        if st.steps == 1:  # no history yet: the plain KM step
            st.u_prev, st.f_prev, st.r_prev = uf, ff, r
            return (uf + mix * ff).reshape(st.shape)
        # 1. safeguard: a point whose residual grew past safeguard·r_prev (or is NaN) is rejected
        reject = ~(r <= self.safeguard * st.r_prev) & ~st.must_accept
        keep = (~reject).to(uf.dtype)[:, None]
        # 2. the new secant pair into the ring buffer, its Gram row
        i = (st.steps - 2) % m
        torch.sub(uf, st.u_prev, out=st.dU[:, i])
        torch.sub(ff, st.f_prev, out=st.dF[:, i])
        row = torch.bmm(st.dF, st.dF[:, i].unsqueeze(-1)).squeeze(-1)
        st.G[:, i] = row
        st.G[:, :, i] = row
        st.valid[:, i] = 1.0
        st.valid.mul_(keep)  # a rejected sample restarts with an empty history
        # 3. ridge least squares on the valid columns, columns scaled to unit norm (invalid ones:
        #    identity rows, gamma_i = 0); restart when the scaled Gram is ill-conditioned
        v = st.valid
        d = st.G.diagonal(dim1=1, dim2=2)
        sc = torch.where(v * d > 0, d, torch.ones_like(d)).rsqrt() * v  # 1/‖ΔF_i‖ on valid columns
        H = st.G * (sc.unsqueeze(-1) * sc.unsqueeze(-2)) + torch.diag_embed(self.regularization * v + (1 - v))
        LU, piv, fail = torch.linalg.lu_factor_ex(H)
        rhs = torch.bmm(st.dF, ff.unsqueeze(-1)) * sc.unsqueeze(-1)
        gamma = torch.linalg.lu_solve(LU, piv, rhs).squeeze(-1) * sc
        p = LU.diagonal(dim1=1, dim2=2).abs()
        ok = (fail == 0) & (p.amax(-1) <= p.amin(-1) * self.restart_cond) & torch.isfinite(gamma).all(-1)
        okf = ok.to(uf.dtype)[:, None]
        gamma = torch.where(ok[:, None], gamma, torch.zeros_like(gamma))
        st.valid.mul_(okf)
        # 4. the step (plain KM when gamma = 0), or the fall-back for rejected samples
        g = gamma.unsqueeze(1)
        u_aa = uf + mix * ff - torch.bmm(g, st.dU).squeeze(1) - mix * torch.bmm(g, st.dF).squeeze(1)
        rej = reject[:, None]
        u_next = torch.where(rej, st.u_prev + beta * st.f_prev, u_aa)
        # 5. the accepted point becomes the reference
        st.u_prev = torch.where(rej, st.u_prev, uf)
        st.f_prev = torch.where(rej, st.f_prev, ff)
        st.r_prev = torch.where(reject, st.r_prev, r)
        st.must_accept = reject
        st.restarts = st.restarts + (reject | ~ok).to(st.restarts.dtype)
        return u_next.reshape(st.shape)

    def report(self, st: _State, info: object) -> None:
        """Add the acceleration's counts to ``info`` (eager mode only)."""
        from ._checks import transforms_active

        if transforms_active():
            return
        info.restarts += int(st.restarts.max())  # type: ignore[attr-defined]
        info.accelerated += max(0, st.steps - 1)  # type: ignore[attr-defined]
