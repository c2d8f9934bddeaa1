r"""The GKM (Generalized Krasnoselskii–Mann) iteration with HODL's aggregation (SPEC §0).

For :math:`k = 0, \dots, K-1`

.. math::

    v_k     &= u_k - s\,\nabla_u F(u_k; x)                 &\text{(upper-level descent direction)}\\
    w_k     &= (1-\alpha_k)\,u_k + \alpha_k v_k = u_k - \alpha_k s \nabla_u F(u_k; x)
                                                          &\text{(aggregation)}\\
    u_{k+1} &= (1-\beta_k)\,u_k + \beta_k\,T(w_k; x)      &\text{(KM relaxation)}

Special cases: :math:`\alpha \equiv 0` is plain KM; :math:`\alpha\equiv 0, \beta\equiv 1` the plain
fixed-point iteration (unrolled ODL); :math:`\alpha_k = \alpha_0/(k+1)^\gamma`,
:math:`\gamma\in(0,1]` the BDA/HODL selection of the :math:`F`-optimal fixed point.

The residual recorded at step k is :math:`r_k = \|T(w_k; x) - u_k\| = \|u_{k+1}-u_k\|/\beta_k`,
which is the fixed-point residual :math:`\|u_k - T(u_k)\|` when :math:`\alpha_k = 0` and tends to
it as :math:`\alpha_k \to 0`; it costs no extra evaluation of :math:`T`.

This module only iterates; differentiation is the job of :mod:`hodl_plugin.hypergrad`.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence

import torch
from torch import Tensor

from ._autodiff import grad_u
from ._checks import check_operator_output
from .errors import ConvergenceWarning, DivergenceError
from .linear_solve import LinearSolveInfo
from .schedules import Constant, Schedule

__all__ = ["SolverInfo", "GKMIteration"]

Operator = Callable[..., Tensor]


@dataclass
class SolverInfo:
    """Diagnostics of one lower-level solve; travels with the result as ``solver.info``.

    Attributes:
        mode: the hypergradient method that ran (``"implicit"``, ``"unrolled"``, ...).
        steps: GKM steps taken in this call.
        residuals: 1-D tensor, the residual :math:`r_k` at every check (every ``check_every``
            steps and the last step; ``check_every=1`` records every step).
        residual_steps: the step index k of each entry of ``residuals``.
        converged: the last checked residual met the tolerance.
        diverged: the iteration produced non-finite values or a residual that grew past
            ``divergence_factor`` times the first one.
        tol: the absolute residual tolerance used (``tol + rtol·‖u‖`` at the last check).
        adjoint: diagnostics of the adjoint linear solve, filled in by ``backward()``
            (implicit and inexact modes).
        eps, delta: accuracies used by the inexact mode at this call.
        error_bound: certified a-posteriori bound on the hypergradient error (inexact mode, after
            ``backward()``), or ``None`` with ``message`` saying why it could not be certified.
        error_estimate: the same formula with estimated constants — not a bound.

    Example:
        >>> import torch, hodl_plugin as hp
        >>> u, info = hp.GKMSolver(lambda u: 0.5 * u + 1.0, tol=1e-10).solve(torch.zeros(2))
        >>> info.converged, info.steps, info.residual < 1e-10
        (True, 30, True)
    """

    mode: str
    steps: int = 0
    residuals: Tensor = field(default_factory=lambda: torch.empty(0))
    residual_steps: list[int] = field(default_factory=list)
    converged: bool = False
    diverged: bool = False
    tol: float = 0.0
    adjoint: Optional[LinearSolveInfo] = None
    eps: Optional[float] = None
    delta: Optional[float] = None
    error_bound: Optional[float] = None
    error_estimate: Optional[float] = None
    message: str = ""

    @property
    def residual(self) -> float:
        """The last recorded residual (``nan`` when no step was taken)."""
        return float(self.residuals[-1]) if self.residuals.numel() else math.nan


def _append(info: SolverInfo, hist: list[Tensor], steps: list[int]) -> None:
    if hist:
        new = torch.stack(hist)
        info.residuals = torch.cat([info.residuals.to(new.device, new.dtype), new])
        info.residual_steps = info.residual_steps + steps


class GKMIteration:
    """Runs the GKM steps; holds the operator, the upper objective and the schedules.

    Created by :class:`hodl_plugin.GKMSolver`; methods call :meth:`run`.
    """

    def __init__(
        self,
        T: Operator,
        *,
        beta: Schedule,
        upper: Optional[Callable[..., Tensor]] = None,
        upper_grad: Optional[Callable[..., Tensor]] = None,
        upper_step: float = 1.0,
        alpha: Optional[Schedule] = None,
        tol: float = 1e-8,
        rtol: float = 0.0,
        check_every: int = 10,
        divergence_factor: float = 1e4,
        on_divergence: str = "raise",
    ) -> None:
        self.T = T
        self.beta = beta
        self.upper = upper
        self.upper_grad = upper_grad
        self.upper_step = float(upper_step)
        self.alpha = alpha
        self.tol = float(tol)
        self.rtol = float(rtol)
        self.check_every = int(check_every)
        self.divergence_factor = float(divergence_factor)
        self.on_divergence = on_divergence

    @property
    def aggregates(self) -> bool:
        if self.alpha is None or (self.upper is None and self.upper_grad is None):
            return False
        return not (isinstance(self.alpha, Constant) and self.alpha.c == 0)

    # -- pieces -------------------------------------------------------------------------------
    def grad_upper(self, u: Tensor, params: Sequence[Tensor]) -> Tensor:
        r""":math:`\nabla_u F(u; x)`, differentiable w.r.t. ``u`` and ``x`` when grad mode is on."""
        if self.upper_grad is not None:
            return self.upper_grad(u, *params)
        assert self.upper is not None
        return grad_u(self.upper, u, params)

    # -- the loop ------------------------------------------------------------------------------
    def run(
        self,
        u: Tensor,
        params: Sequence[Tensor],
        info: SolverInfo,
        *,
        start: int,
        num_steps: int,
        tol: Optional[float] = None,
        rtol: Optional[float] = None,
        stop_on_tol: bool = True,
    ) -> Tensor:
        """Run up to ``num_steps`` GKM steps from step index ``start``; update ``info`` in place.

        Autograd records the steps iff grad mode is on (the caller decides). The residual is
        computed, recorded and tested (convergence, divergence) every ``check_every`` steps and
        at the last one — one host sync per check; the steps in between are bare
        ``u ← (1-β)u + βT(w)``.
        """
        tol = self.tol if tol is None else float(tol)
        rtol = self.rtol if rtol is None else float(rtol)
        T, beta_s, alpha_s, s = self.T, self.beta, self.alpha, self.upper_step
        aggregate = self.aggregates
        hist: list[Tensor] = []
        hist_steps: list[int] = []
        first_res: Optional[float] = None
        prev = u
        checked_output = info.steps > 0
        every = max(1, self.check_every)
        last = num_steps - 1
        b_const = float(beta_s.c) if isinstance(beta_s, Constant) else None
        countdown = every
        for j in range(num_steps):
            k = start + j
            if aggregate:
                a = alpha_s(k)  # type: ignore[misc]
                w = u - (a * s) * self.grad_upper(u, params) if a != 0.0 else u
            else:
                w = u
            Tw = T(w, *params)
            if not checked_output:
                check_operator_output(Tw, u)
                checked_output = True
            b = b_const if b_const is not None else beta_s(k)
            countdown -= 1
            if countdown and j != last:  # the hot path: no residual, no host sync
                u = Tw if b == 1.0 else u + b * (Tw - u)
                continue
            countdown = every
            diff = Tw - u
            hist.append(torch.linalg.vector_norm(diff.detach()))
            hist_steps.append(k)
            prev = u
            u = Tw if b == 1.0 else u + b * diff
            r = float(hist[-1])
            if first_res is None:
                first_res = r
            thresh = tol + (rtol * float(torch.linalg.vector_norm(u.detach())) if rtol else 0.0)
            info.tol = thresh
            if not math.isfinite(r) or r > self.divergence_factor * max(first_res, 1e-30):
                info.steps += j + 1
                _append(info, hist, hist_steps)
                return self._diverged(prev, info, r, first_res, k)
            info.converged = r <= thresh
            if stop_on_tol and thresh > 0 and info.converged:  # tol = 0: exactly num_steps
                info.steps += j + 1
                break
        else:
            info.steps += num_steps
        _append(info, hist, hist_steps)
        return u

    def _diverged(self, last_finite: Tensor, info: SolverInfo, r: float, r0: float, k: int) -> Tensor:
        info.diverged = True
        info.converged = False
        what = "became non-finite (NaN/Inf)" if not math.isfinite(r) else (
            f"grew from {r0:.3e} to {r:.3e} (more than divergence_factor={self.divergence_factor:g} times)"
        )
        info.message = (
            f"the GKM iteration diverged at step {k}: the fixed-point residual ||T(w_k) - u_k|| {what}. "
            "Check that T is nonexpansive in u (e.g. a step size below 2/L for a gradient step) "
            "and that the upper step s is below 1/L_F."
        )
        if self.on_divergence == "raise":
            raise DivergenceError(info.message)
        warnings.warn(info.message, ConvergenceWarning, stacklevel=4)
        return last_finite
