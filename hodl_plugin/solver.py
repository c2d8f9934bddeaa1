r"""``GKMSolver``: the lower-level solver of HODL, differentiable by the method of your choice.

Example (a quadratic lower level whose fixed point is :math:`u^*(x) = A^{-1}x`):

    >>> import torch, hodl_plugin as hp
    >>> n = 5
    >>> A = torch.eye(n, dtype=torch.float64) * 2 + 0.1
    >>> y = torch.ones(n, dtype=torch.float64)
    >>> T = lambda u, x: u - 0.3 * (A @ u - x)              # gradient step of ½uᵀAu - xᵀu
    >>> F = lambda u, x: 0.5 * ((u - y) ** 2).sum()
    >>> solver = hp.GKMSolver(T, max_steps=5000, tol=1e-12, hypergrad="implicit")
    >>> x = torch.zeros(n, dtype=torch.float64, requires_grad=True)
    >>> u = solver(torch.zeros(n, dtype=torch.float64), x)
    >>> F(u, x).backward()
    >>> exact = torch.linalg.solve(A, torch.linalg.solve(A, x.detach()) - y)   # A⁻ᵀ(u* - y)
    >>> bool(torch.allclose(x.grad, exact, rtol=1e-8)), solver.info.converged
    (True, True)
"""

from __future__ import annotations

import warnings
from typing import Any, Callable, Hashable, Optional, Union

from torch import Tensor, nn

from ._checks import check_inputs, module_tensors
from .errors import ConvergenceWarning, ScheduleError
from .gkm import GKMIteration, SolverInfo
from .hypergrad import HypergradMethod, get_method
from .schedules import Harmonic, Schedule, as_schedule, check_aggregation, check_relaxation

__all__ = ["GKMSolver"]


class GKMSolver(nn.Module):
    r"""Approximate fixed point :math:`u^*(x) \in \mathrm{Fix}\,T(\cdot; x)` by the GKM iteration.

    ``solver(u0, *params)`` runs (SPEC §0)

    .. math::

        w_k = u_k - \alpha_k s \nabla_u F(u_k; x),\qquad
        u_{k+1} = (1-\beta_k) u_k + \beta_k T(w_k; x)

    until :math:`\|T(w_k) - u_k\| \le \mathrm{tol} + \mathrm{rtol}\,\|u_k\|` or ``max_steps``, and
    returns a tensor differentiable w.r.t. every tensor in ``params`` (and the parameters of ``T``
    or ``upper`` when they are ``nn.Module``\ s) by the method ``hypergrad``. Diagnostics of the last
    call are in :attr:`info` (:class:`~hodl_plugin.gkm.SolverInfo`).

    Args:
        T: the operator ``T(u, *params) -> tensor shaped like u``, nonexpansive in u (a callable or
            an ``nn.Module``; see :mod:`hodl_plugin.operators`).
        max_steps: K, the most GKM steps.
        tol, rtol: absolute / relative tolerance on the residual; ``tol=0`` runs exactly K steps.
        hypergrad: ``"implicit"`` (default), ``"unrolled"``, ``"truncated"``, ``"inexact"``,
            ``"first_order"`` or a :class:`~hodl_plugin.hypergrad.HypergradMethod` object.
        upper: the upper objective ``F(u, *params) -> scalar``; with it the iteration aggregates
            HODL's descent direction (needs ``alpha``; default ``Harmonic(1.0)``).
        upper_grad: ``∇_u F(u, *params)`` directly, instead of autograd on ``upper``.
        upper_step: s, the step of the upper descent direction (:math:`s \le 1/L_F`).
        alpha: aggregation weights :math:`\alpha_k` (number or Schedule): in [0, 1],
            non-increasing, to 0, not summable; ``alpha=0`` switches the aggregation off while
            keeping ``upper`` (used then by the inexact mode's error bound).
        beta: KM relaxation :math:`\beta_k \in (0, 1]`, bounded away from 0 (default 1).
        upper_lipschitz: :math:`L_F`, if known: ``upper_step`` is checked against it.
        check_every: steps between residual checks (convergence, divergence, history); each
            costs a norm and one host sync, the steps in between cost one evaluation of T.
        divergence_factor: the iteration has diverged when the residual exceeds this multiple of
            the first residual (or becomes non-finite).
        on_divergence: ``"raise"`` a :class:`~hodl_plugin.errors.DivergenceError` (default) or
            ``"warn"`` and return the last finite iterate with ``info.diverged = True``.
        strict: schedules outside the convergence conditions raise
            :class:`~hodl_plugin.errors.ScheduleError`; ``strict=False`` warns instead.
        **method_options: options of the method named by ``hypergrad`` (e.g. ``steps=5`` for
            ``"truncated"``, ``solver="cg"`` for ``"implicit"``, ``eps=...`` for ``"inexact"``).

    Example:
        >>> import torch, hodl_plugin as hp
        >>> T = lambda u, x: 0.5 * u + x                     # contraction, u*(x) = 2x
        >>> solver = hp.GKMSolver(T, tol=1e-12)
        >>> x = torch.ones(3, requires_grad=True)
        >>> solver(torch.zeros(3), x).sum().backward()
        >>> x.grad                                           # du*/dx = 2 I
        tensor([2.0000, 2.0000, 2.0000])

    Raises:
        ScheduleError: a schedule breaks the convergence conditions (``strict=True``).
        TypeError, ValueError: at call time, for tensors of the wrong type, dtype, device or shape,
            or non-finite inputs.
        DivergenceError: the iteration diverged (``on_divergence="raise"``).
    """

    def __init__(
        self,
        T: Callable[..., Tensor],
        *,
        max_steps: int = 1000,
        tol: float = 1e-8,
        rtol: float = 0.0,
        hypergrad: Union[str, HypergradMethod] = "implicit",
        upper: Optional[Callable[..., Tensor]] = None,
        upper_grad: Optional[Callable[..., Tensor]] = None,
        upper_step: float = 1.0,
        alpha: Union[float, Schedule, None] = None,
        beta: Union[float, Schedule] = 1.0,
        upper_lipschitz: Optional[float] = None,
        check_every: int = 10,
        divergence_factor: float = 1e4,
        on_divergence: str = "raise",
        strict: bool = True,
        **method_options: Any,
    ) -> None:
        super().__init__()
        if not callable(T):
            raise TypeError(f"T must be callable (u, *params) -> tensor, got {type(T).__name__}")
        if int(max_steps) < 1:
            raise ValueError(f"max_steps must be >= 1, got {max_steps}")
        if tol < 0 or rtol < 0:
            raise ValueError(f"tol and rtol must be >= 0, got tol={tol}, rtol={rtol}")
        if on_divergence not in ("raise", "warn"):
            raise ValueError(f"on_divergence must be 'raise' or 'warn', got {on_divergence!r}")
        if int(check_every) < 1:
            raise ValueError(f"check_every must be >= 1, got {check_every}")
        if upper is not None and not callable(upper):
            raise TypeError("upper must be callable (u, *params) -> scalar tensor")
        self.T = T  # registered as a submodule when it is an nn.Module
        self.upper = upper
        self.max_steps = int(max_steps)
        self.method = get_method(hypergrad, **method_options)
        self.method.validate(self.max_steps)

        beta_s = as_schedule(beta, "beta")
        problems = check_relaxation(beta_s)
        has_upper = upper is not None or upper_grad is not None
        alpha_s: Optional[Schedule] = None
        if alpha is not None and not has_upper:
            raise ValueError("alpha (HODL aggregation) needs the upper objective: pass upper=F or upper_grad=")
        if has_upper:
            alpha_s = Harmonic(1.0) if alpha is None else as_schedule(alpha, "alpha")
            problems += check_aggregation(alpha_s)
            if not upper_step > 0:
                problems.append(f"upper_step s must be > 0, got {upper_step}")
            elif upper_lipschitz is not None and upper_step > 1.0 / upper_lipschitz * (1 + 1e-12):
                problems.append(
                    f"upper_step s = {upper_step} exceeds 1/L_F = {1.0 / upper_lipschitz:.6g} "
                    f"(L_F = {upper_lipschitz})"
                )
        if problems:
            msg = "GKM schedule outside the convergence conditions: " + "; ".join(problems)
            if strict:
                raise ScheduleError(msg)
            warnings.warn(msg, ConvergenceWarning, stacklevel=2)

        self.iteration = GKMIteration(
            T,
            beta=beta_s,
            upper=upper,
            upper_grad=upper_grad,
            upper_step=upper_step,
            alpha=alpha_s,
            tol=tol,
            rtol=rtol,
            check_every=check_every,
            divergence_factor=divergence_factor,
            on_divergence=on_divergence,
        )
        self.info: Optional[SolverInfo] = None

    def forward(self, u0: Tensor, *params: Tensor, key: Optional[Hashable] = None) -> Tensor:
        """Solve from ``u0``; ``key`` names the problem instance for warm starts (inexact mode)."""
        return self.solve(u0, *params, key=key)[0]

    def solve(
        self, u0: Tensor, *params: Tensor, key: Optional[Hashable] = None
    ) -> tuple[Tensor, SolverInfo]:
        """Like calling the solver, returning ``(u, info)`` (the jaxopt style)."""
        check_inputs(u0, params, module_tensors(self.T, self.upper))
        info = SolverInfo(mode=self.method.name)
        self.info = info
        u = self.method.run(self.iteration, u0, params, info, self.max_steps, key)
        return u, info

    # checkpointing of counters and warm starts (inexact mode)
    def get_extra_state(self) -> dict[str, Any]:
        return {"method": self.method.state_dict()}

    def set_extra_state(self, state: dict[str, Any]) -> None:
        self.method.load_state_dict(state.get("method", {}))

    def extra_repr(self) -> str:
        return f"method={self.method!r}, max_steps={self.max_steps}, tol={self.iteration.tol:g}"
