r"""Hypergradient methods: how :math:`\nabla_x F(u^*(x); x)` flows through the lower solve.

Each method is an object with one small protocol, ``method.run(iteration, u0, params, info,
max_steps, key) -> u``: it runs the GKM iteration (:mod:`hodl_plugin.gkm`) and returns a tensor
whose autograd graph carries the chosen hypergradient. Pass one to
``GKMSolver(..., hypergrad=method)`` or use its name.

``"unrolled"``
    exact derivative of the K-step map :math:`u_K(x)`; memory grows with K.
``"truncated"``
    back-propagation through the last k steps only; memory grows with k.
``"implicit"``
    :math:`\nabla_x F + J_x^\top v` with :math:`(I-J_u)^\top v = \nabla_u F` at :math:`u^*`;
    memory flat in K.
``"inexact"``
    implicit, forward to :math:`\varepsilon_k`, adjoint to :math:`\delta_k`, warm starts, error
    bound; memory flat in K.
``"first_order"``
    :math:`\nabla_x F + J_x^\top\nabla_u F` (Jacobian-free: the implicit term is dropped); memory
    flat in K.

with :math:`J_u = \partial_u T(u^*; x)` and :math:`J_x = \partial_x T(u^*; x)`.
"""

from __future__ import annotations

import math
import warnings
from typing import Any, Callable, Hashable, Optional, Sequence, Union

import torch
from torch import Tensor, nn

from . import linear_solve as ls
from ._autodiff import make_vjp
from .errors import ConvergenceWarning, LinearSolveError
from .gkm import GKMIteration, SolverInfo
from .inexact import BoundConstants, estimate_constants, with_v_norm
from .schedules import Schedule, as_schedule, check_accuracy

__all__ = [
    "HypergradMethod",
    "Unrolled",
    "Truncated",
    "Implicit",
    "Inexact",
    "FirstOrder",
    "get_method",
]

SolverSpec = Union[str, Callable[..., ls.LinearSolver], None]


class HypergradMethod:
    """Protocol of a hypergradient method (see the module docstring).

    A method runs the iteration ``it`` from ``u0`` and returns a tensor whose autograd graph carries
    its hypergradient; stateful methods also implement ``state_dict``/``load_state_dict`` (they are
    saved with the solver's ``state_dict``).

    Example — a method that back-propagates through the last step only:

    >>> import torch, hodl_plugin as hp
    >>> class LastStep(hp.HypergradMethod):
    ...     name = "last_step"
    ...     def run(self, it, u0, params, info, max_steps, key=None):
    ...         with torch.no_grad():
    ...             u = it.run(u0, [p.detach() for p in params], info, start=0, num_steps=max_steps - 1)
    ...         return it.run(u, params, info, start=info.steps, num_steps=1)
    >>> x = torch.ones(2, requires_grad=True)
    >>> hp.GKMSolver(lambda u, x: 0.5 * u + x, hypergrad=LastStep())(torch.zeros(2), x).sum().backward()
    >>> x.grad
    tensor([1., 1.])
    """

    name: str = "?"

    def run(
        self,
        it: GKMIteration,
        u0: Tensor,
        params: Sequence[Tensor],
        info: SolverInfo,
        max_steps: int,
        key: Optional[Hashable] = None,
    ) -> Tensor:
        raise NotImplementedError

    def validate(self, max_steps: int) -> None:
        """Raise ``ValueError`` if the method cannot run with ``max_steps``."""

    def state_dict(self) -> dict[str, Any]:
        """Counters and warm starts (empty for stateless methods)."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


def _detached(params: Sequence[Tensor]) -> list[Tensor]:
    return [p.detach() for p in params]


def _warn_unconverged(info: SolverInfo, what: str) -> None:
    if not info.converged and not info.diverged:
        warnings.warn(
            f"{what}: the lower solve stopped after {info.steps} steps with residual "
            f"{info.residual:.3e} > tol {info.tol:.3e}; the hypergradient is taken at a point that "
            "is not a fixed point (raise max_steps or tol, or use hypergrad='unrolled')",
            ConvergenceWarning,
            stacklevel=4,
        )


class Unrolled(HypergradMethod):
    r"""Back-propagation through all K GKM steps (HODL/BMO's choice, SPEC §2.3).

    Differentiates exactly the map :math:`x \mapsto u_K(x)` that ran, aggregation included;
    memory grows linearly with K (autograd keeps every step).

    >>> import torch, hodl_plugin as hp
    >>> x = torch.ones(1, requires_grad=True)
    >>> hp.GKMSolver(lambda u, x: 0.5 * u + x, max_steps=2, tol=0.0, hypergrad=Unrolled())(
    ...     torch.zeros(1), x).backward()
    >>> x.grad                                   # u_2 = 1.5 x
    tensor([1.5000])
    """

    name = "unrolled"

    def run(self, it, u0, params, info, max_steps, key=None):
        return it.run(u0, params, info, start=0, num_steps=max_steps)


class Truncated(HypergradMethod):
    """Back-propagation through the last ``steps`` GKM steps only (the earlier ones run without
    autograd); memory grows with ``steps``, not with K.

    >>> Truncated(5)
    Truncated(steps=5)
    """

    name = "truncated"

    def __init__(self, steps: int = 10) -> None:
        if int(steps) < 1:
            raise ValueError(f"Truncated needs steps >= 1, got {steps}")
        self.steps = int(steps)

    def validate(self, max_steps: int) -> None:
        if self.steps > max_steps:
            raise ValueError(f"Truncated(steps={self.steps}) needs max_steps >= {self.steps}, got {max_steps}")

    def run(self, it, u0, params, info, max_steps, key=None):
        with torch.no_grad():
            u = it.run(u0.detach(), _detached(params), info, start=0, num_steps=max_steps - self.steps)
        return it.run(u.detach(), params, info, start=info.steps, num_steps=self.steps)

    def __repr__(self) -> str:
        return f"Truncated(steps={self.steps})"


class FirstOrder(HypergradMethod):
    r"""Jacobian-free hypergradient :math:`\nabla_x F + J_x^\top \nabla_u F` (Fung et al., 2022).

    The forward runs without autograd; the returned :math:`T(u^*; x)` is differentiated as if
    :math:`u^*` did not depend on x, i.e. the first term of the Neumann series of the implicit
    hypergradient — the cheap baseline.

    >>> import torch, hodl_plugin as hp
    >>> x = torch.ones(1, requires_grad=True)
    >>> hp.GKMSolver(lambda u, x: 0.5 * u + x, hypergrad=FirstOrder())(torch.zeros(1), x).backward()
    >>> x.grad                                   # J_x = 1 (the exact one is 2)
    tensor([1.])
    """

    name = "first_order"

    def run(self, it, u0, params, info, max_steps, key=None):
        with torch.no_grad():
            u = it.run(u0.detach(), _detached(params), info, start=0, num_steps=max_steps)
        return it.T(u.detach(), *params)


def _default_solver_name(T: object) -> str:
    return "cg" if getattr(T, "symmetric_jacobian", False) else "gmres"


def _make_solver(spec: SolverSpec, T: object, **tols: float) -> ls.LinearSolver:
    if spec is None:
        spec = _default_solver_name(T)
    if isinstance(spec, str):
        return ls.get(spec, **tols)
    return spec(**tols)


def _attach_implicit(
    it: GKMIteration,
    u_star: Tensor,
    params: Sequence[Tensor],
    info: SolverInfo,
    make_solver: Callable[[], ls.LinearSolver],
    on_fail: str,
    x0: Callable[[], Optional[Tensor]] = lambda: None,
    after: Optional[Callable[[Tensor, Tensor], None]] = None,
) -> Tensor:
    r"""Return :math:`z = T(u^*; x)` whose backward solves the adjoint system.

    The hook on ``z`` replaces the incoming gradient :math:`g = \nabla_u F` by the solution of
    :math:`(I - J_u^\top) v = g`; autograd then carries :math:`v` through :math:`T(u^*; x)` to
    :math:`x` (and the operator's own parameters), giving :math:`J_x^\top v`. The linearisation at
    :math:`u^*` is built in the backward, once, and reused by every matrix product.
    """
    u_star = u_star.detach()
    z = it.T(u_star, *params)
    if not z.requires_grad:
        return z

    def hook(g: Optional[Tensor]) -> Optional[Tensor]:
        if g is None:  # an undefined gradient (e.g. torch.autograd.gradcheck's check) passes through
            return None
        with torch.enable_grad():
            u_req = u_star.clone().requires_grad_(True)
            f0 = it.T(u_req, *_detached(params))

        vjp = make_vjp(f0, u_req)

        def matvec(v: Tensor) -> Tensor:
            return v - vjp(v)

        v, linfo = make_solver()(matvec, g, x0())
        info.adjoint = linfo
        if not linfo.converged:
            msg = (
                f"the adjoint system (I - dT/du)^T v = dF/du was not solved: {linfo.method} stopped "
                f"after {linfo.iterations} products with residual {linfo.residual:.3e} > "
                f"{linfo.threshold:.3e}. (I - dT/du) may be singular (a non-singleton fixed-point "
                "set) or the solver needs more iterations / another method"
            )
            if on_fail == "raise":
                raise LinearSolveError(msg)
            warnings.warn(msg, ConvergenceWarning, stacklevel=2)
        if after is not None:
            after(v, u_star)
        return v

    z.register_hook(hook)
    return z


class Implicit(HypergradMethod):
    r"""Implicit differentiation of :math:`u = T(u; x)` at the returned fixed point.

    The forward runs under ``torch.no_grad()`` (memory flat in K); ``backward()`` solves
    :math:`(I - \partial_u T)^\top v = \nabla_u F` with ``solver`` and returns
    :math:`\nabla_x F + (\partial_x T)^\top v`. With HODL aggregation the forward selects a fixed
    point; the derivative is that of the fixed-point equation at it (the :math:`\alpha=0` limit).

    Args:
        solver: ``"cg"`` (symmetric ``∂_u T``, e.g. a gradient step), ``"gmres"``, ``"bicgstab"``,
            ``"fixed_point"``/``"neumann"``, or a factory ``f(rtol=, atol=, maxiter=)`` returning a
            :data:`~hodl_plugin.linear_solve.LinearSolver`. Default: CG when the operator declares
            ``symmetric_jacobian = True`` (e.g. :class:`~hodl_plugin.operators.GradientStep`), else
            GMRES.
        adjoint_rtol, adjoint_atol, adjoint_maxiter: stopping rule of the adjoint solve,
            ``‖(I - J_u^T)v - ∇_u F‖ ≤ max(adjoint_rtol·‖∇_u F‖, adjoint_atol)`` within
            ``adjoint_maxiter`` matrix products (named apart from the solver's own ``tol``/``rtol``,
            which stop the forward iteration).
        on_fail: ``"raise"`` (default) a :class:`~hodl_plugin.errors.LinearSolveError` when the
            adjoint solve misses its tolerance, or ``"warn"``.

    >>> Implicit("cg", adjoint_rtol=1e-8)
    Implicit(solver='cg', adjoint_rtol=1e-08)
    """

    name = "implicit"

    def __init__(
        self,
        solver: SolverSpec = None,
        adjoint_rtol: float = 1e-10,
        adjoint_atol: float = 0.0,
        adjoint_maxiter: int = 1000,
        on_fail: str = "raise",
    ) -> None:
        if on_fail not in ("raise", "warn"):
            raise ValueError(f"on_fail must be 'raise' or 'warn', got {on_fail!r}")
        if isinstance(solver, str):
            ls.get(solver)  # validate the name now
        self.solver, self.on_fail = solver, on_fail
        self.rtol, self.atol, self.maxiter = adjoint_rtol, adjoint_atol, adjoint_maxiter

    def run(self, it, u0, params, info, max_steps, key=None):
        with torch.no_grad():
            u = it.run(u0.detach(), _detached(params), info, start=0, num_steps=max_steps)
        if not torch.is_grad_enabled():
            return u
        _warn_unconverged(info, "implicit hypergradient")

        def make():
            return _make_solver(self.solver, it.T, rtol=self.rtol, atol=self.atol, maxiter=self.maxiter)

        return _attach_implicit(it, u, params, info, make, self.on_fail)

    def __repr__(self) -> str:
        return f"Implicit(solver={self.solver!r}, adjoint_rtol={self.rtol:g})"


class Inexact(HypergradMethod):
    r"""Inexact implicit hypergradient with accuracy schedules (ISGD / MAID, SPEC §3).

    At call :math:`k` (counted over calls with grad enabled): the forward stops when the residual
    :math:`\|u - T(u)\| \le \varepsilon_k`, warm-started from the iterate of the previous call with
    the same ``key`` (e.g. a mini-batch index); the adjoint system is solved to absolute residual
    :math:`\delta_k`, warm-started likewise. After ``backward()`` the solver's ``info`` holds
    ``eps``, ``delta``, the adjoint diagnostics and the a-posteriori ``error_bound``
    :math:`c_1\varepsilon_k + c_2\delta_k + c_3\varepsilon_k^2` (:mod:`hodl_plugin.inexact`).

    Args:
        eps: forward accuracy schedule :math:`\varepsilon_k` (number or
            :class:`~hodl_plugin.schedules.Schedule`), e.g. ``Polynomial(1e-2, 0.5)``.
        delta: adjoint accuracy schedule :math:`\delta_k`; default: same as ``eps``.
        solver: adjoint solver, as for :class:`Implicit`.
        adjoint_maxiter: cap on the adjoint solver's matrix products.
        constants: known :class:`~hodl_plugin.inexact.BoundConstants`, ``"estimate"`` (default:
            power iterations every ``estimate_every`` calls, running maxima; needs the solver's
            ``upper=F`` — with ``alpha=0`` to use F without aggregating — else the bound is
            ``None`` and ``info.message`` says why) or ``None`` (no bound).
        warm_start: reuse the previous ``u`` and ``v`` of the same key.

    >>> from hodl_plugin.schedules import Polynomial
    >>> Inexact(eps=Polynomial(1e-2, 0.5)).eps(3)
    0.005
    """

    name = "inexact"

    def __init__(
        self,
        eps: Union[float, Schedule] = 1e-4,
        delta: Union[float, Schedule, None] = None,
        solver: SolverSpec = None,
        adjoint_maxiter: int = 1000,
        constants: Union[str, BoundConstants, None] = "estimate",
        estimate_every: int = 10,
        warm_start: bool = True,
        on_fail: str = "warn",
    ) -> None:
        self.eps = as_schedule(eps, "eps")
        self.delta = self.eps if delta is None else as_schedule(delta, "delta")
        problems = check_accuracy(self.eps, "eps") + check_accuracy(self.delta, "delta")
        if problems:
            from .errors import ScheduleError

            raise ScheduleError("; ".join(problems))
        if not (constants is None or constants == "estimate" or isinstance(constants, BoundConstants)):
            raise ValueError("constants must be 'estimate', None or a BoundConstants")
        self.solver, self.maxiter, self.constants = solver, adjoint_maxiter, constants
        self.estimate_every, self.warm_start, self.on_fail = int(estimate_every), warm_start, on_fail
        self.k = 0
        self.u_cache: dict[Hashable, Tensor] = {}
        self.v_cache: dict[Hashable, Tensor] = {}
        self.estimated: Optional[BoundConstants] = None

    def run(self, it, u0, params, info, max_steps, key=None):
        eps_k, delta_k = self.eps(self.k), self.delta(self.k)
        info.eps, info.delta = eps_k, delta_k
        start = u0.detach()
        cached = self.u_cache.get(key) if self.warm_start else None
        if cached is not None and cached.shape == start.shape and cached.device == start.device:
            start = cached.to(start.dtype)
        with torch.no_grad():
            u = it.run(start, _detached(params), info, start=0, num_steps=max_steps, tol=eps_k, rtol=0.0)
        if self.warm_start and not info.diverged:
            self.u_cache[key] = u.detach()
        if not torch.is_grad_enabled():
            return u
        call = self.k
        self.k += 1

        def make():
            return _make_solver(self.solver, it.T, rtol=0.0, atol=delta_k, maxiter=self.maxiter)

        def x0() -> Optional[Tensor]:
            v = self.v_cache.get(key) if self.warm_start else None
            return v if (v is not None and v.shape == u.shape) else None

        learned = [p for p in params if p.requires_grad]
        if isinstance(it.T, nn.Module):
            learned += [p for p in it.T.parameters() if p.requires_grad]

        def after(v: Tensor, u_star: Tensor) -> None:
            if self.warm_start:
                self.v_cache[key] = v.detach()
            info.error_bound = self._bound(it, u_star, params, learned, v, call, info)

        return _attach_implicit(it, u, params, info, make, self.on_fail, x0, after)

    def _bound(self, it, u_star, params, learned, v, call, info) -> Optional[float]:
        if self.constants is None:
            return None
        if isinstance(self.constants, BoundConstants):
            c = with_v_norm(self.constants, v)
        elif it.upper is None:
            info.message = (
                "no error bound: estimating it needs the upper objective (GKMSolver(..., upper=F, "
                "alpha=0) uses F without aggregating) or known BoundConstants"
            )
            return None
        else:
            if self.estimated is None or call % max(1, self.estimate_every) == 0:
                new = estimate_constants(it.T, it.upper, u_star, params, learned, v)
                self.estimated = new if self.estimated is None else self.estimated.running_max(new)
            c = with_v_norm(self.estimated, v)
        eps_eff = min(info.eps or 0.0, info.residual) if info.converged else info.residual
        delta_eff = info.adjoint.residual if info.adjoint is not None else math.inf
        return c.bound(eps_eff, delta_eff)

    def state_dict(self) -> dict[str, Any]:
        return {
            "k": self.k,
            "u_cache": dict(self.u_cache),
            "v_cache": dict(self.v_cache),
            "estimated": self.estimated,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.k = int(state["k"])
        self.u_cache = dict(state["u_cache"])
        self.v_cache = dict(state["v_cache"])
        self.estimated = state.get("estimated")

    def __repr__(self) -> str:
        return f"Inexact(eps={self.eps!r}, delta={self.delta!r}, k={self.k})"


_METHODS: dict[str, Callable[..., HypergradMethod]] = {
    "unrolled": Unrolled,
    "truncated": Truncated,
    "implicit": Implicit,
    "inexact": Inexact,
    "first_order": FirstOrder,
}


def get_method(spec: Union[str, HypergradMethod], **kwargs: Any) -> HypergradMethod:
    """A method object from its name (``kwargs`` go to its constructor) or pass one through.

    >>> get_method("truncated", steps=3)
    Truncated(steps=3)
    """
    if isinstance(spec, HypergradMethod):
        if kwargs:
            raise ValueError("options are given to the method object's constructor, not here")
        return spec
    if not isinstance(spec, str) or spec not in _METHODS:
        raise ValueError(f"unknown hypergrad {spec!r}; choose one of {sorted(_METHODS)} or pass a method object")
    import inspect

    factory = _METHODS[spec]
    allowed = [p for p in inspect.signature(factory).parameters if p != "self"]
    unknown = sorted(set(kwargs) - set(allowed))
    if unknown:
        raise TypeError(f"hypergrad={spec!r} takes the options {allowed}; got unknown {unknown}")
    return factory(**kwargs)
