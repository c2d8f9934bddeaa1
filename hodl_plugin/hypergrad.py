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

import dataclasses
import math
import warnings
import weakref
from typing import Any, Callable, Hashable, Optional, Sequence, Union

import torch
import torch.autograd.forward_ad as fwAD
from torch import Tensor, nn

from . import linear_solve as ls
from ._checks import transforms_active
from .errors import HODLError, ScheduleError, user_stacklevel
from .gkm import GKMIteration, SolverInfo
from .implicit import _CLOSURE_MSG, ClosureAdjoint, FixedPoint, FixedPointProblem, _plain_tensors
from .inexact import BoundConstants, a_posteriori, residuals_at, with_v_norm
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

    def bind(self, owner: object) -> None:
        """Called by the solver that uses this method (stateful methods refuse a second one)."""

    def state_dict(self) -> dict[str, Any]:
        """Counters and warm starts (empty for stateless methods)."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


def _detached(params: Sequence[Tensor]) -> list[Tensor]:
    return [p.detach() for p in params]


class Unrolled(HypergradMethod):
    r"""Back-propagation through all K GKM steps (HODL/BMO's choice).

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

    Args:
        steps: the number of differentiated steps at the end of the run (an integer >= 1; the
            solver's ``max_steps`` must be at least this).

    Raises:
        ValueError: ``steps < 1``, or (when the solver is built) ``steps > max_steps``.

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
        # exactly `steps` differentiated steps: the tail never stops on the tolerance
        return it.run(u.detach(), params, info, start=info.steps, num_steps=self.steps, stop_on_tol=False)

    def __repr__(self) -> str:
        return f"Truncated(steps={self.steps})"


class FirstOrder(HypergradMethod):
    r"""Jacobian-free hypergradient :math:`\nabla_x F + J_x^\top \nabla_u F` (Fung et al., 2022).

    The forward runs without autograd; the returned :math:`T(u^*; x)` is differentiated as if
    :math:`u^*` did not depend on x, i.e. the first term of the Neumann series of the implicit
    hypergradient — the cheap baseline.

    The value returned is one more application of :math:`T` than ``info.steps`` counts: with
    ``tol=0, max_steps=K`` it is :math:`T^{K+1}(u_0)` (the differentiable step after the K no-grad
    ones), not the K-th iterate — for a layer-by-layer unrolled model use ``hypergrad="unrolled"``.

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


def default_adjoint_rtol(dtype: torch.dtype) -> float:
    """The adjoint solve's default relative tolerance for a dtype: ``1e-10`` in float64, about
    ``100·eps`` below that (``1.2e-5`` in float32), so a default is always reachable.

    >>> default_adjoint_rtol(torch.float64), default_adjoint_rtol(torch.float32)
    (1e-10, 1.1920928955078125e-05)
    """
    return min(max(1e-10, 100 * torch.finfo(dtype).eps), 1e-2)


def _make_solver(spec: SolverSpec, T: object, **tols: float) -> ls.LinearSolver:
    if spec is None:
        spec = _default_solver_name(T)
    if isinstance(spec, str):
        return ls.get(spec, **tols)
    return spec(**tols)


def _check_solver_spec(solver: SolverSpec) -> None:
    if isinstance(solver, str):
        ls.get(solver)  # raises ValueError naming the choices
    elif solver is not None and not callable(solver):
        raise TypeError(f"solver must be a name, a factory f(rtol=, atol=, maxiter=) or None, got {solver!r}")


def _check_on_fail(on_fail: str) -> None:
    if on_fail not in ("raise", "warn"):
        raise ValueError(f"on_fail must be 'raise' or 'warn', got {on_fail!r}")


def _check_nonneg(name: str, value: float) -> float:
    value = float(value)
    if not (value >= 0 and math.isfinite(value)):
        raise ValueError(f"{name} must be a finite number >= 0, got {value}")
    return value


def _check_maxiter(value: int) -> int:
    if isinstance(value, bool) or not float(value).is_integer() or int(value) < 1:
        raise ValueError(f"adjoint_maxiter must be an integer >= 1, got {value!r}")
    return int(value)


def _module_tensors(T: object) -> tuple[list[str], list[Tensor]]:
    """The learnable tensors of an ``nn.Module`` operator, by name (they get hypergradients)."""
    if not isinstance(T, nn.Module):
        return [], []
    named = [(n, p) for n, p in T.named_parameters() if p.requires_grad]
    return [n for n, _ in named], [p for _, p in named]


def _implicit_solve(
    it: GKMIteration,
    u0: Tensor,
    params: Sequence[Tensor],
    info: SolverInfo,
    forward: Callable[[Tensor, Sequence[Tensor]], Tensor],
    make_solver: Callable[[], ls.LinearSolver],
    *,
    on_fail: str,
    check_unique: Optional[bool],
    x0: Callable[[], Optional[Tensor]] = lambda: None,
    after: Optional[Callable[[Tensor, Tensor], None]] = None,
) -> Tensor:
    r""":math:`u^*` through :class:`~hodl_plugin.implicit.FixedPoint` (derivatives of any order)."""
    names, mod = _module_tensors(it.T)
    tensors = [*params, *mod]
    if check_unique is None:  # auto: HODL aggregation is used where Fix T may not be a singleton
        check_unique = it.aggregates
    problem = FixedPointProblem(
        it.T, len(params), names, forward, make_solver, on_fail=on_fail, info=info, x0=x0, after=after,
        check_unique=check_unique, iteration=it,
    )
    u = FixedPoint.apply(problem, u0, *tensors)
    if torch.is_grad_enabled() and not transforms_active():
        # tensors T reads from its closure (e.g. a Betty node's parents) get first-order gradients
        problem.closure_args = tensors
        with torch.enable_grad():
            w = problem.T_call(u.detach(), [t.detach() for t in tensors])
        if w.requires_grad:
            u = u + ClosureAdjoint.apply(problem, w, u.detach())
        elif getattr(fwAD, "_current_level", -1) >= 0 and fwAD.unpack_dual(w).tangent is not None:
            raise HODLError(_CLOSURE_MSG.format(what="forward-mode AD"))
    return u


class Implicit(HypergradMethod):
    r"""Implicit differentiation of :math:`u = T(u; x)` at the returned fixed point.

    The forward runs without autograd (memory flat in K); the derivative solves
    :math:`(I - \partial_u T)^\top v = \nabla_u F` with ``solver`` and returns
    :math:`\nabla_x F + (\partial_x T)^\top v`. The solve is a PyTorch primitive
    (:mod:`hodl_plugin.implicit`): double backward, ``gradgradcheck``, forward mode and
    ``torch.func`` transforms are exact at every order. With HODL aggregation the forward selects a
    fixed point; the derivative is that of the fixed-point equation at it (the :math:`\alpha=0`
    limit), defined only when Fix T is a singleton — which ``check_unique`` probes.

    Args:
        solver: ``"cg"`` (symmetric ``∂_u T``, e.g. a gradient step), ``"gmres"``, ``"bicgstab"``,
            ``"fixed_point"``/``"neumann"``, or a factory ``f(rtol=, atol=, maxiter=)`` returning a
            :data:`~hodl_plugin.linear_solve.LinearSolver`. Default: CG when the operator declares
            ``symmetric_jacobian = True`` (e.g. :class:`~hodl_plugin.operators.GradientStep`), else
            GMRES. CG checks the symmetry claim on two random vectors and raises if it is false.
        adjoint_rtol, adjoint_atol, adjoint_maxiter: stopping rule of the adjoint solve,
            ``‖(I - J_u^T)v - ∇_u F‖ ≤ max(adjoint_rtol·‖∇_u F‖, adjoint_atol)`` within
            ``adjoint_maxiter`` matrix products. ``adjoint_rtol=None`` (default) follows the dtype:
            ``1e-10`` in float64, ``1.2e-5`` in float32 (``default_adjoint_rtol``).
        on_fail: ``"raise"`` (default) a :class:`~hodl_plugin.errors.LinearSolveError` when the
            adjoint solve misses its tolerance, or ``"warn"``.
        check_unique: before the adjoint solve, solve :math:`(I - \partial_u T)^\top z = r` for a
            random :math:`r` (one more solve) and raise :class:`~hodl_plugin.errors.LinearSolveError`
            if it fails: :math:`I - \partial_u T` is singular, Fix T is not a singleton and the
            implicit hypergradient is undefined. ``None`` (default): only when the solver aggregates
            (``upper=`` with ``alpha`` not 0), where a non-singleton Fix T is the point. Without it,
            a singular system with a consistent right-hand side returns the minimum-norm adjoint
            (for an affine T: the derivative of the plain iteration's limit from the given ``u0``).

    >>> Implicit("cg", adjoint_rtol=1e-8)
    Implicit(solver='cg', adjoint_rtol=1e-08)
    """

    name = "implicit"

    def __init__(
        self,
        solver: SolverSpec = None,
        adjoint_rtol: Optional[float] = None,
        adjoint_atol: float = 0.0,
        adjoint_maxiter: int = 1000,
        on_fail: str = "raise",
        check_unique: Optional[bool] = None,
    ) -> None:
        _check_on_fail(on_fail)
        _check_solver_spec(solver)
        self.solver, self.on_fail, self.check_unique = solver, on_fail, check_unique
        self.rtol = None if adjoint_rtol is None else _check_nonneg("adjoint_rtol", adjoint_rtol)
        self.atol = _check_nonneg("adjoint_atol", adjoint_atol)
        self.maxiter = _check_maxiter(adjoint_maxiter)
        if self.rtol == 0 and self.atol == 0:
            raise ValueError("adjoint_rtol and adjoint_atol cannot both be 0 (the adjoint solve would never stop)")

    def run(self, it, u0, params, info, max_steps, key=None):
        def forward(u_start: Tensor, ps: Sequence[Tensor], info_: SolverInfo = info,
                    it_: Optional[GKMIteration] = None, sample_: Any = None) -> Tensor:
            with torch.no_grad():  # it_: the batched iteration of a vmapped call
                return (it_ or it).run(u_start.detach(), _detached(ps), info_, start=0, num_steps=max_steps)

        if not torch.is_grad_enabled() and not transforms_active():
            return forward(u0, params)  # (under vmap the primitive's batched solve stops early)
        rtol = default_adjoint_rtol(u0.dtype) if self.rtol is None else self.rtol

        def make():
            return _make_solver(self.solver, it.T, rtol=rtol, atol=self.atol, maxiter=self.maxiter)

        return _implicit_solve(it, u0, params, info, forward, make, on_fail=self.on_fail,
                               check_unique=self.check_unique)

    def __repr__(self) -> str:
        rtol = "auto" if self.rtol is None else f"{self.rtol:g}"
        return f"Implicit(solver={self.solver!r}, adjoint_rtol={rtol})"


def _cache_key(key: Optional[Hashable]) -> Optional[Hashable]:
    """A warm-start key as a plain value: 0-d tensors by their value, other tensors refused."""
    if isinstance(key, Tensor):
        if key.numel() != 1:
            raise TypeError(
                f"key must be hashable by value (an int, a str, a tuple or a 0-d tensor), got a tensor of "
                f"shape {tuple(key.shape)}"
            )
        return key.item()
    try:
        hash(key)
    except TypeError:
        raise TypeError(f"key must be hashable (an int, a str, a tuple), got {type(key).__name__}") from None
    return key


class Inexact(HypergradMethod):
    r"""Inexact implicit hypergradient with accuracy schedules (ISGD / MAID).

    At call :math:`k` (counted over calls with grad enabled): the forward stops when the residual
    :math:`\|u - T(u)\| \le \varepsilon_k\,\max(\|u\|, r_0)` (``relative=True``, the default: scale-aware,
    :math:`r_0` the first residual) or :math:`\le \varepsilon_k` (``relative=False``: ISGD's absolute
    accuracies), warm-started from the iterate of the previous call with
    the same ``key`` (e.g. a mini-batch index; the ``u0`` passed is then used only for keys not
    seen before — ``info.warm_started`` says which); the adjoint system is solved to residual
    :math:`\delta_k\|\nabla_u F\|` (relative) or :math:`\delta_k` (absolute), warm-started likewise
    (a warm start worse than zero is dropped, so the adjoint stays linear in the upstream gradient).
    After ``backward()`` the solver's ``info`` holds ``eps``, ``delta``, the adjoint diagnostics and
    the a-posteriori ``error_bound`` (:mod:`hodl_plugin.inexact`). Higher derivatives (double
    backward, forward mode, ``torch.func``) go through the same primitive as :class:`Implicit`, with
    solves to :math:`\delta_k`.

    A method object holds counters and warm starts: give each solver its own (a second solver using
    the same object raises ``ValueError``).

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
        on_fail: ``"warn"`` (default) or ``"raise"`` when the adjoint misses :math:`\delta_k`.
        check_unique: as for :class:`Implicit`.
        relative: accuracies relative to the problem's scale (default) or absolute.

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
        check_unique: Optional[bool] = None,
        relative: bool = True,
    ) -> None:
        self.relative = bool(relative)
        self.eps = as_schedule(eps, "eps")
        self.delta = self.eps if delta is None else as_schedule(delta, "delta")
        problems = check_accuracy(self.eps, "eps") + check_accuracy(self.delta, "delta")
        if problems:
            raise ScheduleError("; ".join(problems))
        if not (constants is None or constants == "estimate" or isinstance(constants, BoundConstants)):
            raise ValueError(f"constants must be 'estimate', None or a BoundConstants, got {constants!r}")
        _check_solver_spec(solver)
        _check_on_fail(on_fail)
        if isinstance(estimate_every, bool) or not float(estimate_every).is_integer() or int(estimate_every) < 1:
            raise ValueError(f"estimate_every must be an integer >= 1, got {estimate_every!r}")
        self.solver, self.maxiter, self.constants = solver, _check_maxiter(adjoint_maxiter), constants
        self.estimate_every, self.warm_start, self.on_fail = int(estimate_every), bool(warm_start), on_fail
        self.check_unique = check_unique
        self.k = 0
        self.u_cache: dict[Hashable, Tensor] = {}
        self.v_cache: dict[Hashable, Tensor] = {}
        self.estimated: Optional[BoundConstants] = None
        self._owner: Optional[Any] = None
        self._told_warm = False

    def bind(self, owner: object) -> None:
        """Refuse a second solver: the counter :math:`k` and the warm starts belong to one problem."""
        current = self._owner() if self._owner is not None else None
        if current is not None and current is not owner:
            raise ValueError(
                "this Inexact object already belongs to another GKMSolver: its step counter and warm "
                "starts would be shared. Give each solver its own hp.Inexact(...)"
            )
        self._owner = weakref.ref(owner)

    def run(self, it, u0, params, info, max_steps, key=None):
        self.bind(it)
        key = _cache_key(key)
        eps_k, delta_k = self.eps(self.k), self.delta(self.k)
        info.eps, info.delta = eps_k, delta_k
        cached = self.u_cache.get(key) if self.warm_start else None
        sample_shape = tuple(u0.shape)  # one problem's (under vmap: one sample's)
        pending: list[Optional[Tensor]] = []  # per-sample iterates of a vmapped call solved one by one

        def warm(start: Tensor, batched: bool, sample: Optional[tuple[int, int]]) -> Optional[Tensor]:
            """The cached iterate as a start: the same shape as ``start``; under vmap a cached batch
            (its sample ``i`` when the samples are solved one by one) or a single problem's
            iterate, then used for every sample."""
            if cached is None or cached.device != start.device:
                return None
            if sample is not None and tuple(cached.shape) == (sample[1], *start.shape):
                return cached[sample[0]].to(start.dtype)
            if cached.shape == start.shape:
                return cached.to(start.dtype)
            if batched and tuple(cached.shape) == sample_shape:
                return cached.to(start.dtype).expand(start.shape)
            return None

        def forward(u_start: Tensor, ps: Sequence[Tensor], info_: SolverInfo = info,
                    it_: Optional[GKMIteration] = None, sample_: Optional[tuple[int, int]] = None) -> Tensor:
            # it_: the batched iteration of a vmapped call; sample_: (i, B) when a vmapped call
            # solves its samples one at a time (HODL aggregation)
            batched = it_ is not None and it_ is not it
            start = warm(u_start, batched, sample_)
            info_.warm_started = start is not None
            if start is not None:
                self._tell_warm(key)
            else:
                start = u_start.detach()
            with torch.no_grad():
                tols = {"tol": eps_k} if self.relative else {"tol": 0.0, "atol": eps_k}
                u = (it_ or it).run(start, _detached(ps), info_, start=0, num_steps=max_steps, **tols)
            if self.warm_start:
                if sample_ is None:
                    if not info_.diverged:
                        self.u_cache[key] = u.detach().clone()
                else:  # the batch is cached once its last sample is solved
                    pending.append(None if info_.diverged else u.detach().clone())
                    if sample_[0] == sample_[1] - 1:
                        if len(pending) == sample_[1] and all(p is not None for p in pending):
                            self.u_cache[key] = torch.stack(pending)  # type: ignore[arg-type]
                        pending.clear()
            return u

        call = self.k
        if torch.is_grad_enabled():
            self.k += 1
        elif not transforms_active():
            return forward(u0, params)  # (under vmap the primitive's batched solve stops early)

        def make():
            if self.relative:
                return _make_solver(self.solver, it.T, rtol=delta_k, atol=0.0, maxiter=self.maxiter)
            return _make_solver(self.solver, it.T, rtol=0.0, atol=delta_k, maxiter=self.maxiter)

        # the adjoint's warm start is fixed when the call is made, so every backward pass through this
        # call starts from the same point (reentrant, as gradcheck/gradgradcheck require); the solve
        # uses it where its shape fits (a batch under vmap) and it is better than zero
        v_prev = self.v_cache.get(key) if self.warm_start else None
        if v_prev is not None and v_prev.dtype != u0.dtype:
            v_prev = None

        def x0() -> Optional[Tensor]:
            return v_prev

        names = _module_tensors(it.T)[0]

        def after(v: Tensor, u_star: Tensor, samples: Callable[[], Any]) -> None:
            if self.warm_start and bool(torch.isfinite(v).all()):
                self.v_cache[key] = v.detach().clone()
            self._bounds(it, samples, len(params), names, call, info, batched=tuple(v.shape) != sample_shape)

        return _implicit_solve(it, u0, params, info, forward, make, on_fail=self.on_fail,
                               check_unique=self.check_unique, x0=x0, after=after)

    def _tell_warm(self, key: Hashable) -> None:
        if self._told_warm:
            return
        self._told_warm = True
        warnings.warn(
            f"Inexact warm start: key {key!r} was solved before, so this solve starts from its cached "
            "iterate and the u0 you pass is used only for new keys (warm_start=False always starts "
            "from u0; this is said once per method object)",
            UserWarning,
            stacklevel=user_stacklevel(),
        )

    def _bounds(self, it, samples, n_params, names, call, info, batched: bool) -> None:
        """``info.error_bound`` and ``info.error_estimate`` (with ``_per_sample`` tensors under vmap)."""
        if self.constants is None:
            return
        if it.upper is None and not isinstance(self.constants, BoundConstants):
            info.message = (
                "no error bound: estimating it needs the upper objective (GKMSolver(..., upper=F, "
                "alpha=0) uses F without aggregating) or known BoundConstants"
            )
            return
        if not isinstance(self.constants, BoundConstants) and call % max(1, self.estimate_every) != 0:
            info.message = f"error bound not computed at this call (estimate_every={self.estimate_every})"
            return
        bounds, estimates, notes = [], [], []
        adj = info.adjoint
        per = None if adj is None or adj.residual_per_sample is None else adj.residual_per_sample.reshape(-1)
        for i, (v, u_star, ts) in enumerate(samples()):
            # the adjoint residual the solver reported for this sample (the batch's worst if unknown)
            res = float(per[i]) if per is not None and i < per.numel() else (None if adj is None else adj.residual)
            b, e, note = self._bound(it, u_star, ts, n_params, names, v, res)
            bounds.append(math.nan if b is None else b)
            estimates.append(math.nan if e is None else e)
            if note:
                notes.append(f"sample {i}: {note}" if batched else note)
        if notes:
            more = f" (and {len(notes) - 3} more samples)" if len(notes) > 3 else ""
            info.message = "; ".join(notes[:3]) + more
        finite = all(math.isfinite(b) for b in bounds)
        info.error_bound = max(bounds) if finite else None
        info.error_estimate = max(estimates) if all(math.isfinite(e) for e in estimates) else None
        if batched:
            with _plain_tensors():
                info.error_bound_per_sample = torch.tensor(bounds, dtype=torch.float64)
                info.error_estimate_per_sample = torch.tensor(estimates, dtype=torch.float64)

    def _bound(self, it, u_star, ts, n_params, names, v, adj: Optional[float]) -> tuple:
        """``(bound, estimate, note)`` for one problem at the point the hypergradient used: a
        certified bound (or None, the note says why) and the formula with estimated constants.
        ``ts``: its tensors, requiring grad where the hypergradient goes."""
        params, mod = ts[:n_params], ts[n_params:]
        if names:  # T's own learnable tensors, as the tensors this solve was differentiated for
            def T(u: Tensor, *ps: Tensor) -> Tensor:
                return torch.func.functional_call(it.T, dict(zip(names, mod)), (u, *ps), strict=False)
        else:
            T = it.T
        learned = [t for t in ts if t.requires_grad]
        if isinstance(self.constants, BoundConstants):  # user-certified constants
            eps, delta = residuals_at(T, it.upper, u_star, params, v, point=u_star)
            delta = adj if delta is None else delta
            return with_v_norm(self.constants, v).bound(eps, math.inf if delta is None else delta), None, ""
        spec = self.solver if self.solver is not None else _default_solver_name(it.T)
        rep = a_posteriori(
            T, it.upper, u_star, params, learned, v,
            point=u_star,  # the implicit primitive returns the forward iterate itself
            adjoint_residual=adj,
            symmetric=bool(getattr(it.T, "symmetric_jacobian", False)) or spec == "cg",
        )
        return rep.bound, rep.estimate, ("error bound: " + rep.message) if rep.message else ""

    def state_dict(self) -> dict[str, Any]:
        """Counters and warm starts as plain containers (readable by ``torch.load(weights_only=True)``)."""
        est = None if self.estimated is None else dataclasses.asdict(self.estimated)
        return {
            "method": "inexact",
            "k": self.k,
            "u_cache": [[k, t] for k, t in self.u_cache.items()],
            "v_cache": [[k, t] for k, t in self.v_cache.items()],
            "estimated": est,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`'s output; validated whole before anything is changed."""
        if not isinstance(state, dict) or "k" not in state or state.get("method", "inexact") != "inexact":
            what = state.get("method", "?") if isinstance(state, dict) else type(state).__name__
            raise ValueError(
                f"not the state of an Inexact method (got {what!r} state with keys "
                f"{sorted(state) if isinstance(state, dict) else '-'}); load the state of a solver with "
                "hypergrad='inexact'"
            )
        k = state["k"]
        if isinstance(k, bool) or not float(k).is_integer() or int(k) < 0:
            raise ValueError(f"Inexact state: k must be an integer >= 0, got {k!r}")

        def pairs(name: str) -> dict:
            raw = state.get(name, [])
            items = raw.items() if isinstance(raw, dict) else raw
            out = {}
            for item in items:
                kk, t = item
                if not isinstance(t, Tensor):
                    raise ValueError(f"Inexact state: {name} must map keys to tensors, got {type(t).__name__}")
                out[kk] = t
            return out

        u_cache, v_cache = pairs("u_cache"), pairs("v_cache")
        est = state.get("estimated")
        if isinstance(est, dict):
            est = BoundConstants(**est)
        elif est is not None and not isinstance(est, BoundConstants):
            raise ValueError(f"Inexact state: estimated must be a dict of constants, got {type(est).__name__}")
        self.k, self.u_cache, self.v_cache, self.estimated = int(k), u_cache, v_cache, est

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

    Args:
        spec: ``"unrolled"``, ``"truncated"``, ``"implicit"``, ``"inexact"``, ``"first_order"`` or a
            :class:`HypergradMethod` object (then ``kwargs`` must be empty).
        **kwargs: options of the named method's constructor.

    Returns:
        HypergradMethod: a new method object, or ``spec`` itself.

    Raises:
        ValueError: an unknown name, or options given beside a method object.
        TypeError: an option the named method does not take.

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
