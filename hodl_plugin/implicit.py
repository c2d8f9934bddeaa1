r"""Implicit differentiation of a fixed point (or a root), differentiable to any order.

:math:`u^*(\theta)` solves :math:`u = T(u; \theta)` (``θ``: the solver's ``params`` and every tensor
``T`` reads, :mod:`hodl_plugin._capture`). With :math:`A = I - \partial_u T(u^*; \theta)` the implicit
function theorem gives (:ref:`math-implicit`)

.. math::

    \text{reverse:}\quad \bar\theta = (\partial_\theta T)^\top v,\; A^\top v = \bar u, \qquad
    \text{forward:}\quad \dot u = A^{-1}\,\partial_\theta T\,\dot\theta ,

two pure rules, :func:`implicit_vjp` and :func:`implicit_jvp` (jaxopt's ``root_vjp`` / ``root_jvp``):
functions of ``(T, u*, θ, cotangent or tangent, solve)``. A root :math:`G(u^*; \theta) = 0`
(:func:`custom_root`) is the same with :math:`A = \partial_u G` and a minus sign.

Two autograd primitives call them. :class:`FixedPoint` runs the forward solve and differentiates it by
the rules; :class:`LinearSolve` is the solve :math:`x = A^{-\top}b` or :math:`A^{-1}b`, whose own
derivative is another solve with the transposed operator (jaxopt's ``custom_linear_solve``):

.. math::

    x = A^{-\top} b:\quad \bar b = A^{-1}\bar x =: y,\qquad
    \overline{(u,\theta)} = \nabla_{u,\theta}\,\langle x, \partial_u T(u;\theta)\, y\rangle .

So double backward, ``gradgradcheck``, forward-mode dual numbers and ``torch.func.grad / jacrev /
jacfwd / hessian / vmap`` are exact to the solves' tolerance at every order. The first-order reverse
pass (``loss.backward()`` without ``create_graph``) takes a lean path, :func:`implicit_vjp_lean`: one
graph of :math:`T(u^*; \theta)` serves every product of the solve and the final
:math:`(\partial_\theta T)^\top v`. Neither primitive keeps state between calls beyond what ``ctx``
saves; the solves' diagnostics are written into the call's :class:`~hodl_plugin.gkm.SolverInfo`.

The faces over the rules: the :class:`Implicit` method of :class:`~hodl_plugin.GKMSolver` (here), and
the decorators :func:`~hodl_plugin.custom.custom_fixed_point` / :func:`~hodl_plugin.custom.custom_root`
for any solver function (:mod:`hodl_plugin.custom`); the policies of each linear solve (checks, warm
starts, messages) are :mod:`hodl_plugin._adjoint`'s, the vmap rules :mod:`hodl_plugin._vmap`'s.

>>> import torch, hodl_plugin as hp
>>> T = lambda u, x: 0.5 * u + x                      # u* = 2x
>>> solver = hp.GKMSolver(T, tol=1e-12)
>>> x = torch.tensor([1.0, 2.0], dtype=torch.float64)
>>> torch.func.jacfwd(lambda x: solver(torch.zeros(2, dtype=x.dtype), x))(x)
tensor([[2., 0.],
        [0., 2.]], dtype=torch.float64)
>>> f = lambda x: (solver(torch.zeros(2, dtype=x.dtype), x) ** 3).sum()   # = 8 Σ x³
>>> torch.func.hessian(f)(x).diagonal().round(decimals=8)                  # 48 x
tensor([48., 96.], dtype=torch.float64)
"""

from __future__ import annotations

import dataclasses
import functools
import math
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Hashable, Optional, Sequence

import torch
from torch import Tensor

from . import _adjoint, _vmap
from . import linear_solve as ls
from ._autodiff import grad_once, make_jvp, make_vjp
from ._capture import BoundOperator, bind, flatten, unflatten
from ._checks import all_finite
from ._torch_compat import (
    current_functorch_level,
    forward_ad_active,
    function_apply,
    nested_forward_transforms,
    transforms_active,
)
from .errors import ConvergenceWarning, HODLError, LinearSolveError
from .gkm import GKMIteration, SolverInfo
from .hypergrad import HypergradMethod

__all__ = [
    "implicit_vjp",
    "implicit_jvp",
    "implicit_vjp_lean",
    "FixedPointProblem",
    "FixedPoint",
    "LinearSolve",
    "Implicit",
    "fixed_point_solve",
]

Op = Callable[[Tensor, Sequence[Tensor]], Tensor]


# ------------------------------------------------------------------------------------------------
# the pure rules
# ------------------------------------------------------------------------------------------------
def _jvp(fn: Callable[..., Tensor], primals: tuple, tangents: tuple) -> Tensor:
    """``∂fn(primals)·tangents``: ``torch.func.jvp`` (which nests under ``torch.func`` transforms), or —
    inside a ``torch.autograd.forward_ad`` dual level and no transform, where forward AD cannot nest —
    the transpose of a vjp (two reverse passes)."""
    if not forward_ad_active() or current_functorch_level() > 0:
        return torch.func.jvp(fn, primals, tangents)[1]
    out, pull = torch.func.vjp(fn, *primals)
    _, pull2 = torch.func.vjp(lambda z_: pull(z_), torch.zeros_like(out))
    return pull2(tuple(tangents))[0]


def implicit_vjp(op: Op, u: Tensor, tensors: Sequence[Tensor], cotangent: Tensor,
                 solve: Callable[[Tensor], Tensor], sign: float = 1.0) -> tuple:
    r""":math:`\bar\theta = \sigma(\partial_\theta T)^\top v` with :math:`v` = ``solve(cotangent)`` =
    :math:`A^{-\top}\bar u`, for the fixed point :math:`u = T(u;\theta)` (``sign`` :math:`\sigma = 1`) or
    the root :math:`G(u;\theta) = 0` (``op`` = G, :math:`\sigma = -1`). Differentiable when ``solve`` is.
    The reverse rule of :ref:`math-implicit`, with :math:`A = I - \partial_u T` (a fixed point) or
    :math:`A = \partial_u G` (a root).

    Args:
        op: ``op(u, tensors) -> T(u; θ)`` (or :math:`G(u; \theta)` for a root), every tensor explicit.
        u: the solution :math:`u^*`.
        tensors: :math:`\theta`, the tensors ``op`` depends on.
        cotangent: :math:`\bar u`, the gradient reaching :math:`u^*`.
        solve: ``b -> A^{-T} b`` (the caller's linear solve).
        sign: :math:`\sigma`, ``1.0`` for a fixed point, ``-1.0`` for a root.

    Returns:
        The tuple :math:`\bar\theta`, one gradient per entry of ``tensors``.

    Example — :math:`T(u; x) = \tfrac12 u + x`, :math:`A = \tfrac12 I`, so :math:`v = 2\bar u` and
    :math:`\bar x = v`:

    >>> import torch
    >>> T = lambda u, ts: 0.5 * u + ts[0]
    >>> implicit_vjp(T, torch.full((2,), 2.0), [torch.ones(2)], torch.ones(2), lambda b: b / 0.5)
    (tensor([2., 2.]),)
    """
    v = solve(cotangent)
    _, pull = torch.func.vjp(lambda *ts: op(u, ts), *tensors)
    grads = pull(v)
    return grads if sign == 1.0 else tuple(-g for g in grads)


def implicit_jvp(op: Op, u: Tensor, tensors: Sequence[Tensor], tangents: Sequence[Optional[Tensor]],
                 solve: Callable[[Tensor], Tensor], sign: float = 1.0) -> Tensor:
    r""":math:`\dot u = A^{-1}\sigma\,\partial_\theta T\,\dot\theta`, the solve being ``solve``: the
    forward rule of :ref:`math-implicit`.

    Args:
        op: ``op(u, tensors) -> T(u; θ)`` (or :math:`G(u; \theta)` for a root), every tensor explicit.
        u: the solution :math:`u^*`.
        tensors: :math:`\theta`, the tensors ``op`` depends on.
        tangents: :math:`\dot\theta`, one per entry of ``tensors`` (``None``: zero).
        solve: ``b -> A^{-1} b`` (the caller's linear solve).
        sign: :math:`\sigma`, ``1.0`` for a fixed point, ``-1.0`` for a root.

    Returns:
        The tangent :math:`\dot u`, shaped like ``u``.

    Example — :math:`T(u; x) = \tfrac12 u + x`: :math:`\dot u = 2\dot x`:

    >>> import torch
    >>> T = lambda u, ts: 0.5 * u + ts[0]
    >>> implicit_jvp(T, torch.full((2,), 2.0), [torch.ones(2)], [torch.ones(2)], lambda b: b / 0.5)
    tensor([2., 2.])
    """
    dots = tuple(torch.zeros_like(t) if d is None else d for t, d in zip(tensors, tangents))
    rhs = _jvp(lambda *ts: op(u, ts), tuple(tensors), dots)
    return solve(rhs if sign == 1.0 else -rhs)


def implicit_vjp_lean(op: Op, u: Tensor, tensors: Sequence[Tensor], cotangent: Tensor,
                      needs: Sequence[bool], solve: Callable[[Callable, Tensor], tuple[Tensor, Any]],
                      sign: float = 1.0, extra: Sequence[Tensor] = ()) -> tuple[list[Optional[Tensor]], Tensor, Any]:
    r""":func:`implicit_vjp` for a first-order reverse pass: one graph of :math:`T(u^*; \theta)` serves
    every product of the solve (``solve(matvec, b) -> (v, info)`` with ``matvec`` = :math:`A^\top`) and
    the final :math:`(\partial_\theta T)^\top v`. Returns ``(grads, v, info)``: ``grads[i]`` for
    ``tensors[i]`` (``None`` where ``needs[i]`` is false), then the gradients of the graph's own ``extra``
    tensors (``None`` where it does not reach them). Not differentiable: for ``backward()`` without
    ``create_graph``.

    Args:
        op: ``op(u, tensors) -> T(u; θ)`` (or :math:`G(u; \theta)` for a root), every tensor explicit.
        u: the solution :math:`u^*`.
        tensors: :math:`\theta`, the tensors ``op`` depends on.
        cotangent: :math:`\bar u`.
        needs: which entries of ``tensors`` want a gradient.
        solve: ``solve(matvec, b) -> (v, info)``, e.g. a :mod:`~hodl_plugin.linear_solve` solver.
        sign: :math:`\sigma`, ``1.0`` for a fixed point, ``-1.0`` for a root.
        extra: further tensors the graph of ``op`` reaches (their gradients are appended).

    Returns:
        ``(grads, v, info)``: the gradients, the adjoint :math:`v = A^{-\top}\bar u`, and what
        ``solve`` returned as its diagnostics.

    >>> import torch, hodl_plugin as hp
    >>> T = lambda u, ts: 0.5 * u + ts[0]                      # A = I/2: v = 2ū, x̄ = v
    >>> solve = lambda matvec, b: hp.linear_solve.cg(rtol=1e-12)(matvec, b)
    >>> grads, v, info = implicit_vjp_lean(T, torch.full((2,), 2.0, dtype=torch.float64),
    ...                                    [torch.ones(2, dtype=torch.float64)],
    ...                                    torch.ones(2, dtype=torch.float64), [True], solve)
    >>> grads, v, info.converged
    ([tensor([2., 2.], dtype=torch.float64)], tensor([2., 2.], dtype=torch.float64), True)
    """
    with torch.enable_grad():
        u_req = u.detach().clone().requires_grad_(True)
        ts = [t.detach().requires_grad_(bool(n) and t.is_floating_point()) for t, n in zip(tensors, needs)]
        f = op(u_req, ts)
    if not f.requires_grad:  # T does not depend on u nor on θ
        v, info = solve(lambda z: z if sign == 1.0 else torch.zeros_like(z), cotangent)
        return [None] * (len(ts) + len(extra)), v, info
    vjp = make_vjp(f, u_req)
    v, info = solve((lambda z: z - vjp(z)) if sign == 1.0 else vjp, cotangent.detach())
    wanted = [t for t in ts if t.requires_grad] + list(extra)
    if not wanted:
        return [None] * len(ts), v, info
    grads = iter(grad_once(f, wanted, v if sign == 1.0 else -v))
    return [next(grads) if t.requires_grad else None for t in ts] + [next(grads) for _ in extra], v, info


# ------------------------------------------------------------------------------------------------
# the problem: what the primitives need besides tensors
# ------------------------------------------------------------------------------------------------
AfterHook = Callable[[Tensor, Tensor, Callable[[], Any]], None]


@dataclass(frozen=True)
class FixedPointProblem:
    r"""Everything the primitives need besides tensors; immutable (a vmap makes a new one).

    Attributes:
        op: ``op(u, tensors) -> T(u)`` (or :math:`G(u)` for a root), every tensor explicit.
        forward: ``forward(u0, tensors, info, problem) -> u*``, the solve (run without autograd).
        solver: the linear solver of every solve (:mod:`hodl_plugin.linear_solve`).
        sign: ``1`` for a fixed point :math:`A = I - \partial_u T`, ``-1`` for a root :math:`A = \partial_u G`.
        on_fail: ``"raise"`` a :class:`~hodl_plugin.errors.LinearSolveError` when a solve misses its
            tolerance, or ``"warn"``.
        check_unique: before the adjoint solve, solve :math:`A^\top z = r` for a random ``r`` and raise if
            it fails (:math:`A` singular: the implicit derivative is undefined).
        info: where the solves' diagnostics go (``info.adjoint``, ``info.higher_solves``).
        warm: the adjoint solve's warm start, ``() -> tensor or None`` (the inexact mode).
        after: called after each first-order adjoint solve with ``(v, u*, samples)``; ``samples()``
            iterates over the single problems ``(v_i, u*_i, tensors_i)`` (the inexact mode's cache and bound).
        iteration: the GKM iteration that ``forward`` runs (a vmap lifts it to one batched solve).
        sample: ``(i, B)`` while a vmap solves its samples one by one (``forward_info`` then takes
            that sample's forward diagnostics).
        forward_info: set per sample by a vmap (above).
        needs: which tensors the reverse pass wants gradients for (set per backward).
        batch: set on the problems a vmap builds (:mod:`hodl_plugin._vmap`).

    Raises:
        TypeError: :meth:`replace` with a field the problem does not have.
        LinearSolveError: (``on_fail="raise"``) a solve recorded by the primitives missed its tolerance.

    Example — :math:`u^* = 2x` of :math:`T(u; x) = \tfrac12 u + x`, solved in closed form:

    >>> import torch, hodl_plugin as hp
    >>> problem = FixedPointProblem(op=lambda u, ts: 0.5 * u + ts[0],
    ...                             forward=lambda u0, ts, info, problem: 2 * ts[0],
    ...                             solver=hp.linear_solve.cg(rtol=1e-12))
    >>> problem.replace(on_fail="warn").on_fail, problem.on_fail
    ('warn', 'raise')
    """

    op: Op
    forward: Callable[..., Tensor]
    solver: ls.LinearSolver
    sign: float = 1.0
    on_fail: str = "raise"
    check_unique: bool = False
    info: Optional[SolverInfo] = None
    warm: Optional[Callable[[], Optional[Tensor]]] = None
    after: Optional[AfterHook] = None
    iteration: Optional[GKMIteration] = None
    sample: Optional[tuple[int, int]] = None
    forward_info: Optional[SolverInfo] = None
    needs: Optional[tuple[bool, ...]] = None
    batch: Optional[_vmap.Batch] = None

    def replace(self, **changes: Any) -> FixedPointProblem:
        """A copy with ``changes`` (a shallow copy: what ``dataclasses.replace`` gives for these
        fields, at a fraction of its cost, which every backward pays)."""
        unknown = changes.keys() - _PROBLEM_FIELDS
        if unknown:
            raise TypeError(f"FixedPointProblem has no field(s) {sorted(unknown)}")
        new = object.__new__(FixedPointProblem)
        new.__dict__.update(self.__dict__)
        new.__dict__.update(changes)
        return new

    def fail(self, msg: str) -> None:
        if self.on_fail == "raise":
            raise LinearSolveError(msg)
        warnings.warn(msg, ConvergenceWarning, stacklevel=4)

    def record(self, role: str, linfo: ls.LinearSolveInfo, b: Optional[Tensor] = None) -> None:
        """Diagnostics of a solve into the call's info; a missed tolerance is reported."""
        if self.info is not None:
            if role == "adjoint":
                self.info.adjoint = linfo
            else:
                self.info.higher_solves += 1
        if not linfo.converged:
            self.fail(_adjoint.unsolved_message(self, role, linfo, b))


_PROBLEM_FIELDS = frozenset(f.name for f in dataclasses.fields(FixedPointProblem))


# ------------------------------------------------------------------------------------------------
# one linear solve (no autograd), shared by the primitives
# ------------------------------------------------------------------------------------------------
def _solve(problem: FixedPointProblem, transpose: bool, role: str, b: Tensor, u: Tensor,
           tensors: Sequence[Tensor]) -> Tensor:
    r""":math:`x = A^{-\top} b` (``transpose``) or :math:`A^{-1} b` at :math:`(u, \theta)`; its
    diagnostics go to the call's info, and the first-order adjoint to the ``after`` hook."""
    b, u = b.detach(), u.detach()
    ts = [t.detach() for t in tensors]
    if not all_finite([b]):
        problem.fail(
            "the upstream gradient dL/du* reaching the fixed-point solve has NaN/Inf entries; "
            "the hypergradient is NaN (fix the loss above the solver)"
        )
        return torch.full_like(b, math.nan)
    x0 = _adjoint.warm_start(problem, b) if role == "adjoint" else None
    if problem.batch is not None and not problem.batch.batched_solver:
        x, linfo = _vmap.solve_per_sample(problem, transpose, role, b, u, ts, x0, _solve_one)
    else:
        x, linfo = _solve_one(problem, transpose, role, b, u, ts, x0)
    problem.record(role, linfo, b)
    if role == "adjoint" and problem.after is not None:
        problem.after(x, u, lambda: _vmap.samples(problem, x, u, ts))
    return x


def _solve_one(problem: FixedPointProblem, transpose: bool, role: str, b: Tensor, u: Tensor,
               ts: Sequence[Tensor], x0: Optional[Tensor]) -> tuple[Tensor, ls.LinearSolveInfo]:
    """One solve (a batch of them with a per-sample solver) on a graph of ``op`` built once."""
    with torch.enable_grad():
        u_req = u.clone().requires_grad_(True)
        f = problem.op(u_req, ts)
        depends = f.requires_grad
        prod = (make_vjp(f, u_req) if transpose else make_jvp(f, u_req)) if depends else None
    if depends and prod is None:  # T's backward is not differentiable: forward-mode AD at every product
        def prod(z: Tensor) -> Tensor:
            return _jvp(lambda uu: problem.op(uu, ts), (u,), (z,))
    return _adjoint.run_solver(problem, _adjoint.matvec(prod, problem.sign), b, role, x0=x0)


# ------------------------------------------------------------------------------------------------
# the two primitives
# ------------------------------------------------------------------------------------------------
class FixedPoint(torch.autograd.Function):
    r""":math:`u^* = \mathrm{solve}(u_0; \theta)` with implicit derivatives (see the module docstring).

    ``FixedPoint.apply(problem, u0, *tensors)``; ``u0`` gets no gradient (a fixed point does not
    depend on where the iteration started).

    Args:
        problem: the :class:`FixedPointProblem` (the operator, the forward solve, the linear solver).
        u0: the start of the forward solve.
        *tensors: :math:`\theta`, the tensors ``problem.op`` reads.

    Raises:
        LinearSolveError: (``on_fail="raise"``) a linear solve of a derivative misses its tolerance.
        HODLError: forward-over-forward differentiation, or a higher-order derivative through a tensor
            ``T`` reaches by a route the binding cannot redirect (the message says what to pass instead).

    Example — :math:`u^*(x) = 2x`, so :math:`\nabla_x \|u^*\|^2 = 8x`:

    >>> import torch, hodl_plugin as hp
    >>> problem = FixedPointProblem(lambda u, ts: 0.5 * u + ts[0], lambda u0, ts, info, problem: 2 * ts[0],
    ...                             hp.linear_solve.cg(rtol=1e-12))
    >>> x = torch.tensor([1.0, -3.0], dtype=torch.float64, requires_grad=True)
    >>> u = FixedPoint.apply(problem, torch.zeros(2, dtype=torch.float64), x)
    >>> (u ** 2).sum().backward()
    >>> x.grad
    tensor([  8., -24.], dtype=torch.float64)
    """

    @classmethod
    def apply(cls, *args: Any) -> Any:  # type: ignore[override]
        """``FixedPoint.apply(problem, u0, *tensors)`` (:func:`~hodl_plugin._torch_compat.function_apply`)."""
        return function_apply(cls, args)

    @staticmethod
    def forward(problem: FixedPointProblem, u0: Tensor, *tensors: Tensor) -> Tensor:  # type: ignore[override]
        """The forward solve ``problem.forward`` (without autograd)."""
        info = problem.forward_info if problem.forward_info is not None else problem.info
        return problem.forward(u0, tensors, info, problem).clone()

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple, output: Tensor) -> None:
        """Saves the solution and the tensors."""
        problem, _u0, *tensors = inputs
        ctx.problem = problem
        ctx.save_for_backward(output, *tensors)
        ctx.save_for_forward(output, *tensors)

    @staticmethod
    def backward(ctx: Any, g: Tensor) -> tuple:  # type: ignore[override]
        """:func:`implicit_vjp` (the lean :func:`implicit_vjp_lean` for a first-order pass)."""
        problem: FixedPointProblem = ctx.problem
        u, *ts = ctx.saved_tensors
        needs = ctx.needs_input_grad[2:]
        if not torch.is_grad_enabled() and not transforms_active():
            grads = _lean_backward(problem, u, ts, g, needs)
        else:
            _refuse_leaks(problem, u, ts, "double backward (create_graph=True)")
            solve = functools.partial(_apply_solve, problem, True, "adjoint", u, ts, needs)
            grads = implicit_vjp(problem.op, u, ts, g, solve, problem.sign)
        return (None, None, *(gr if n else None for gr, n in zip(grads, needs)))

    @staticmethod
    def jvp(ctx: Any, _problem_t: Any, _u0_t: Optional[Tensor], *ts_t: Optional[Tensor]) -> Tensor:  # type: ignore[override]
        """:func:`implicit_jvp`."""
        _refuse_forward_over_forward()
        problem: FixedPointProblem = ctx.problem
        u, *ts = ctx.saved_tensors
        _refuse_leaks(problem, u, ts, "forward-mode AD")
        solve = functools.partial(_apply_solve, problem, False, "tangent", u, ts, None)
        return implicit_jvp(problem.op, u, ts, ts_t, solve, problem.sign)

    @staticmethod
    def vmap(info: Any, in_dims: tuple, problem: FixedPointProblem, u0: Tensor, *ts: Tensor) -> tuple:  # type: ignore[override]
        """One batched solve (:mod:`hodl_plugin._vmap`)."""
        return _vmap.fixed_point(FixedPoint, info, in_dims, problem, u0, ts)


def _refuse_forward_over_forward() -> None:
    if nested_forward_transforms():
        raise HODLError(
            "forward-over-forward differentiation (torch.func.jacfwd(jacfwd(f)), or a jvp inside a jvp) "
            "through hodl_plugin's implicit primitive is not supported: torch's forward rules of custom "
            "autograd.Functions do not see the outer level's tangents and would return a zero second "
            "derivative. Use torch.func.hessian (= jacfwd(jacrev)), jacrev(jacfwd(f)) or jacrev(jacrev(f)), "
            "which are exact, or hypergrad='unrolled'"
        )


def _refuse_leaks(problem: FixedPointProblem, u: Tensor, ts: Sequence[Tensor], what: str) -> None:
    """Higher orders need every path from a bound tensor to T's output routed through the primitive's
    inputs; a path the substitution cannot re-route (see :meth:`BoundOperator.leaked`) is refused."""
    if not isinstance(problem.op, BoundOperator) or transforms_active():
        return
    leaks = problem.op.leaked()
    if not leaks:
        return
    with torch.enable_grad():
        f = problem.op(u.detach(), [t.detach() for t in ts])
        if not f.requires_grad:
            return
        probe = torch.randn(f.shape, generator=torch.Generator().manual_seed(7), dtype=f.dtype).to(f.device)
        reached = torch.autograd.grad(f, [t for _, t in leaks], probe, allow_unused=True)
    bad = [tuple(t.shape) for (_, t), r in zip(leaks, reached) if r is not None]
    if bad:
        raise HODLError(
            f"{what} through tensor(s) of shape {bad} that T reaches through a custom autograd.Function, "
            "torch.jit or a torch.vmap inside T is not supported (their first-order gradients are exact): "
            "pass them as parameters, solver(u0, ..., W) with T(u, ..., W), or use hypergrad='unrolled'"
        )


def _apply_solve(problem: FixedPointProblem, transpose: bool, role: str, u: Tensor, ts: Sequence[Tensor],
                 needs: Optional[Sequence[bool]], b: Tensor) -> Tensor:
    if needs is not None:
        problem = problem.replace(needs=tuple(bool(n) for n in needs))
    return LinearSolve.apply(problem, transpose, role, b, u, *ts)


def _lean_backward(problem: FixedPointProblem, u: Tensor, ts: Sequence[Tensor], g: Tensor,
                   needs: Sequence[bool]) -> list:
    """The first-order reverse pass: :func:`implicit_vjp_lean` (or one solve per sample under a vmap
    whose solver has no per-sample mode)."""
    problem = problem.replace(needs=tuple(bool(n) for n in needs))
    if problem.batch is not None and not problem.batch.batched_solver:
        v = _solve(problem, True, "adjoint", g, u, ts)
        _, pull = torch.func.vjp(lambda *ts_: problem.op(u, ts_), *ts)
        return [gr if problem.sign == 1.0 else -gr for gr in pull(v)]
    if not all_finite([g]):
        problem.fail(
            "the upstream gradient dL/du* reaching the fixed-point solve has NaN/Inf entries; "
            "the hypergradient is NaN (fix the loss above the solver)"
        )
        return [None if not n else torch.full_like(t, math.nan) for t, n in zip(ts, needs)]

    def solve(matvec: Callable[[Tensor], Tensor], b: Tensor) -> tuple[Tensor, ls.LinearSolveInfo]:
        return _adjoint.run_solver(problem, matvec, b, "adjoint", x0=_adjoint.warm_start(problem, b))

    leaks = problem.op.leaked() if isinstance(problem.op, BoundOperator) else []
    leaks = [(i, t) for i, t in leaks if needs[i]]
    out, v, linfo = implicit_vjp_lean(problem.op, u, ts, g, needs, solve, problem.sign, extra=[t for _, t in leaks])
    grads = out[: len(ts)]
    for (i, _), extra in zip(leaks, out[len(ts):]):  # T reaches the original through an unrouted path
        if extra is not None:
            grads[i] = extra if grads[i] is None else grads[i] + extra
    problem.record("adjoint", linfo, g)
    if problem.after is not None:
        ud = u.detach()
        problem.after(v, ud, lambda: _vmap.samples(problem, v, ud, ts))
    return grads


class LinearSolve(torch.autograd.Function):
    r""":math:`x = A^{-\top} b` (``transpose=True``) or :math:`A^{-1} b` at :math:`(u, \theta)`.

    ``LinearSolve.apply(problem, transpose, role, b, u, *tensors)``; differentiable in ``b``, ``u`` and
    ``θ`` to any order, forward and reverse, and under ``vmap``. ``role``: ``"adjoint"`` (the
    first-order reverse solve: warm start, hooks, ``info.adjoint``), ``"tangent"`` (forward mode) or
    ``"higher"`` (the solves of higher derivatives, counted in ``info.higher_solves``). Its derivative
    is a solve with the transposed operator (the module docstring; :ref:`math-implicit`).

    Args:
        problem: the :class:`FixedPointProblem` (its ``op`` defines :math:`A = I - \partial_u T`).
        transpose: solve with :math:`A^\top` (``True``) or :math:`A`.
        role: ``"adjoint"``, ``"tangent"`` or ``"higher"``.
        b: the right-hand side.
        u: the point :math:`u` at which :math:`A` is taken.
        *tensors: :math:`\theta`.

    Raises:
        LinearSolveError: (``on_fail="raise"``) the solve misses its tolerance.

    Example — :math:`T(u; \theta) = \theta u`: :math:`x = b/(1-\theta)`, and
    :math:`\mathrm{d}x/\mathrm{d}\theta = b/(1-\theta)^2` (8 for each of the two entries at
    :math:`\theta = \tfrac12`, :math:`b = 1`):

    >>> import torch, hodl_plugin as hp
    >>> problem = FixedPointProblem(lambda u, ts: ts[0] * u, lambda *a: None, hp.linear_solve.cg(rtol=1e-12))
    >>> theta = torch.tensor(0.5, dtype=torch.float64, requires_grad=True)
    >>> x = LinearSolve.apply(problem, True, "higher", torch.ones(2, dtype=torch.float64),
    ...                       torch.zeros(2, dtype=torch.float64), theta)
    >>> x.detach(), torch.autograd.grad(x.sum(), theta)[0]
    (tensor([2., 2.], dtype=torch.float64), tensor(8., dtype=torch.float64))
    """

    @classmethod
    def apply(cls, *args: Any) -> Any:  # type: ignore[override]
        """``LinearSolve.apply(problem, transpose, role, b, u, *tensors)``
        (:func:`~hodl_plugin._torch_compat.function_apply`)."""
        return function_apply(cls, args)

    @staticmethod
    def forward(problem, transpose, role, b, u, *ts):  # type: ignore[override]
        """The solve (without autograd)."""
        return _solve(problem, transpose, role, b, u, ts)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple, output: Tensor) -> None:
        """Saves the solution and the tensors."""
        problem, transpose, _role, _b, u, *ts = inputs
        ctx.problem, ctx.transpose = problem, transpose
        ctx.save_for_backward(output, u, *ts)
        ctx.save_for_forward(output, u, *ts)

    @staticmethod
    def backward(ctx: Any, xbar: Tensor) -> tuple:  # type: ignore[override]
        """Another solve with the transposed operator, and the pairing's gradient."""
        problem, transpose = ctx.problem, ctx.transpose
        x, u, *ts = ctx.saved_tensors
        y = LinearSolve.apply(problem, not transpose, "higher", xbar, u, *ts)
        p, q = (x, y) if transpose else (y, x)

        def pairing(u_: Tensor, *ts_: Tensor) -> Tensor:  # ⟨p, ∂_uT(u_; θ_) q⟩ = ⟨∂_uTᵀ p, q⟩
            _, pull = torch.func.vjp(lambda uu: problem.op(uu, ts_), u_)
            return (pull(p)[0] * q).sum()

        grads = torch.func.grad(pairing, argnums=tuple(range(1 + len(ts))))(u, *ts)
        if problem.sign != 1.0:
            grads = tuple(-g for g in grads)
        needs = ctx.needs_input_grad
        return (None, None, None, y if needs[3] else None, grads[0] if needs[4] else None,
                *(gr if n else None for gr, n in zip(grads[1:], needs[5:])))

    @staticmethod
    def jvp(  # type: ignore[override]
        ctx: Any, _p: Any, _t: Any, _r: Any, b_t: Optional[Tensor], u_t: Optional[Tensor], *ts_t: Optional[Tensor]
    ) -> Tensor:
        """Another solve with the same operator."""
        _refuse_forward_over_forward()
        problem, transpose = ctx.problem, ctx.transpose
        x, u, *ts = ctx.saved_tensors
        u_t = torch.zeros_like(u) if u_t is None else u_t
        tangents = tuple(torch.zeros_like(t) if d is None else d for t, d in zip(ts, ts_t))

        def action(u_: Tensor, *ts_: Tensor) -> Tensor:  # ∂_uTᵀ x or ∂_uT x at (u_, θ_)
            if transpose:
                _, pull = torch.func.vjp(lambda uu: problem.op(uu, ts_), u_)
                return pull(x)[0]
            return _jvp(lambda uu: problem.op(uu, ts_), (u_,), (x,))

        rhs = _jvp(action, (u, *ts), (u_t, *tangents))
        if problem.sign != 1.0:
            rhs = -rhs
        if b_t is not None:
            rhs = rhs + b_t
        return LinearSolve.apply(problem, transpose, "higher", rhs, u, *ts)

    @staticmethod
    def vmap(info: Any, in_dims: tuple, problem, transpose, role, b, u, *ts) -> tuple:  # type: ignore[override]
        """One batched solve (:mod:`hodl_plugin._vmap`)."""
        return _vmap.linear_solve(LinearSolve, info, in_dims, problem, transpose, role, b, u, ts)


# ------------------------------------------------------------------------------------------------
# the face for GKMSolver: the Implicit method (the decorators are hodl_plugin.custom's)
# ------------------------------------------------------------------------------------------------
def grad_wanted() -> bool:
    """Whether a derivative can be asked of this call: grad mode, a torch.func transform or a
    forward-mode dual level."""
    return torch.is_grad_enabled() or transforms_active() or forward_ad_active()


def bind_iteration(it: GKMIteration, u0: Tensor, params: Sequence[Any], keep: bool = False) -> Any:
    """The iteration's operator bound to explicit tensors (:func:`~hodl_plugin._capture.bind`): the
    leaves of ``params`` and the tensors ``T`` (and, when aggregating, the upper objective) read;
    ``keep``: the binding run's ``T(u0)`` is kept for the solve's first step."""
    u = u0.detach().clone()  # an operator that writes into its input cannot touch the caller's u0
    extra = [lambda: it.grad_upper(u, params)] if it.aggregates else []
    return bind(it.T, u, params, extra, keep=keep)


def fixed_point_solve(it: GKMIteration, u0: Tensor, params: Sequence[Any], info: SolverInfo,
                      solver: ls.LinearSolver, *, forward: Optional[Callable[..., Tensor]] = None,
                      op: Any = None, on_fail: str = "raise", check_unique: Optional[bool] = None,
                      warm: Optional[Callable[[], Optional[Tensor]]] = None,
                      after: Optional[AfterHook] = None) -> Tensor:
    r""":math:`u^*` of the iteration ``it`` through :class:`FixedPoint`, differentiable at every order in
    ``params`` and every tensor ``T`` reads. ``forward(u0, params, info, iteration, sample)`` runs the
    solve (default: ``iteration.run`` from ``u0``, without autograd); ``op``: the bound operator
    (default :func:`bind_iteration`). The primitive of the :class:`Implicit` and
    :class:`~hodl_plugin.inexact.Inexact` methods.

    Args:
        it: the :class:`~hodl_plugin.gkm.GKMIteration` (its ``T``, tolerances and loop).
        u0: the start :math:`u_0` (gets no gradient).
        params: the parameters of ``T`` (tensors, or lists / tuples / dicts of them).
        info: the call's :class:`~hodl_plugin.gkm.SolverInfo` (forward and adjoint diagnostics).
        solver: the linear solver of the derivatives (:mod:`hodl_plugin.linear_solve`).
        forward: the forward solve, ``forward(u0, params, info, iteration, sample) -> u*``.
        op: the bound operator (default: :func:`bind_iteration`).
        on_fail: ``"raise"`` or ``"warn"`` when a linear solve misses its tolerance.
        check_unique: probe :math:`I - \partial_u T` for invertibility before the adjoint solve
            (``None``: when the iteration aggregates).
        warm: the adjoint solve's warm start, ``() -> tensor or None``.
        after: the hook called after each first-order adjoint solve (:class:`FixedPointProblem`).

    Returns:
        :math:`u^*`, differentiable w.r.t. ``params`` and the tensors ``T`` reads.

    Raises:
        DivergenceError: the forward iteration diverged (``on_divergence="raise"``).
        LinearSolveError: (``on_fail="raise"``, in a backward) a linear solve misses its tolerance.

    >>> import torch, hodl_plugin as hp
    >>> from hodl_plugin.gkm import GKMIteration, SolverInfo
    >>> it = GKMIteration(lambda u, x: 0.5 * u + x, tol=1e-12)           # u* = 2x
    >>> info = SolverInfo(mode="implicit")
    >>> x = torch.ones(2, dtype=torch.float64, requires_grad=True)
    >>> u = fixed_point_solve(it, torch.zeros(2, dtype=torch.float64), [x], info, hp.linear_solve.cg(rtol=1e-12))
    >>> torch.autograd.grad((u ** 2).sum(), x)[0], info.converged, info.adjoint.converged   # 8x
    (tensor([8.0000, 8.0000], dtype=torch.float64), True, True)
    """
    # the binding run evaluates T(u0): the default forward starts from it instead of evaluating it again
    op = bind_iteration(it, u0, params, keep=forward is None) if op is None else op
    run = forward or _default_forward
    if check_unique is None:  # auto: HODL aggregation is used where Fix T may not be a singleton
        check_unique = it.aggregates
    leaves, _ = flatten(params)
    inputs = (*leaves, *op.captured)

    def fwd(u_start: Tensor, tensors: Sequence[Tensor], info_: Optional[SolverInfo],
            problem: FixedPointProblem) -> Tensor:
        if problem.batch is not None:  # lifted by a vmap: the batched iteration reads the tensors itself
            with torch.no_grad():
                return run(u_start.detach(), [t.detach() for t in tensors], info_, problem.iteration, None)
        with torch.no_grad(), op.context(tensors):
            ps = [_detach(p) for p in op.params(tensors)]
            same = (forward is None and op.first is not None and problem.sample is None and u_start is u0
                    and len(tensors) == len(inputs) and all(a is b for a, b in zip(tensors, inputs)))
            if same:  # the very point and tensors of the binding run
                return it.run(u_start.detach(), ps, info_, t0=op.first[1])
            return run(u_start.detach(), ps, info_, it, problem.sample)

    problem = FixedPointProblem(op, fwd, solver, on_fail=on_fail, check_unique=check_unique, info=info,
                                warm=warm, after=after, iteration=it)
    return FixedPoint.apply(problem, u0, *inputs)


def _default_forward(u0: Tensor, params: Sequence[Any], info: SolverInfo, iteration: GKMIteration,
                     sample: Any) -> Tensor:
    return iteration.run(u0, params, info)


def _detach(p: Any) -> Any:
    if isinstance(p, Tensor):
        return p.detach()
    leaves, spec = flatten([p])
    return unflatten(spec, [t.detach() for t in leaves])[0]


class Implicit(HypergradMethod):
    r"""Implicit differentiation of :math:`u = T(u; x)` at the returned fixed point.

    The forward runs without autograd (memory flat in K); the derivative solves
    :math:`(I - \partial_u T)^\top v = \nabla_u F` with ``solver`` and returns
    :math:`\nabla_x F + (\partial_x T)^\top v` (:ref:`math-implicit`). Double backward,
    ``gradgradcheck``, forward mode and ``torch.func`` transforms are exact at every order, for the
    ``params`` and for tensors ``T`` reads from its closure or module attributes. With HODL
    aggregation the forward selects a fixed point; the derivative is that of the fixed-point equation
    at it (the :math:`\alpha=0` limit), defined only when Fix T is a singleton — which ``check_unique``
    probes.

    Args:
        solver: a linear solver object (``hp.linear_solve.cg(rtol=1e-12)``), a name (``"cg"``,
            ``"gmres"``, ``"bicgstab"``, ``"fixed_point"``/``"neumann"``, ``"anderson"``) or your own
            ``solve(matvec, b, x0=None)``. Default: CG when the operator declares
            ``symmetric_jacobian = True`` (e.g. :class:`~hodl_plugin.operators.GradientStep`), else
            GMRES. CG checks the symmetry claim on two random vectors and raises if it is false.
        adjoint_rtol, adjoint_atol, adjoint_maxiter: the adjoint solve's stopping rule
            ``‖(I - J_u^T)v - ∇_u F‖ ≤ max(adjoint_rtol·‖∇_u F‖, adjoint_atol)`` within ``adjoint_maxiter``
            products; ``None`` keeps the solver's own (a named solver's default: ``rtol`` following the
            dtype, :func:`~hodl_plugin.linear_solve.default_rtol`; ``atol=0``; ``maxiter=1000``).
        on_fail: ``"raise"`` (default) a :class:`~hodl_plugin.errors.LinearSolveError` when the
            adjoint solve misses its tolerance, or ``"warn"``.
        check_unique: before the adjoint solve, solve :math:`(I - \partial_u T)^\top z = r` for a
            random :math:`r` and raise :class:`~hodl_plugin.errors.LinearSolveError` if it fails (Fix T
            not a singleton). ``None`` (default): only when the solver aggregates.

    Raises:
        ConfigurationError: a tolerance given both in ``solver`` and as ``adjoint_*``.
        ValueError, TypeError: an option out of range or of the wrong type.

    >>> Implicit("cg", adjoint_rtol=1e-8)
    Implicit(solver=CG(rtol=1e-08, atol=0.0, maxiter=1000))
    """

    name = "implicit"

    def __init__(self, solver: ls.SolverLike = None, adjoint_rtol: Optional[float] = None,
                 adjoint_atol: Optional[float] = None, adjoint_maxiter: Optional[int] = None,
                 on_fail: str = "raise", check_unique: Optional[bool] = None) -> None:
        self.solver = ls.configure(solver, adjoint_rtol, adjoint_atol, adjoint_maxiter)
        if on_fail not in ("raise", "warn"):
            raise ValueError(f"on_fail must be 'raise' or 'warn', got {on_fail!r}")
        self.on_fail = on_fail
        if check_unique is not None and not isinstance(check_unique, bool):
            raise TypeError(f"check_unique must be None, True or False, got {check_unique!r}")
        self.check_unique = check_unique

    def run(self, it: GKMIteration, u0: Tensor, params: Sequence[Any], info: SolverInfo,
            key: Optional[Hashable] = None) -> Tensor:
        if not grad_wanted():
            return it.run(u0, params, info)  # (under vmap the primitive's batched solve stops early)
        return fixed_point_solve(it, u0, params, info, ls.for_operator(self.solver, it.T), on_fail=self.on_fail,
                                 check_unique=self.check_unique)

    def __repr__(self) -> str:
        return f"Implicit(solver={'auto' if self.solver is None else self.solver!r})"
