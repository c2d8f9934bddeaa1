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
for any solver function (:mod:`hodl_plugin.custom`). :class:`FixedPointProblem` and :class:`LinearSolve`
are defined in :mod:`hodl_plugin._adjoint` and importable from here; the checks around each linear solve
are ``LinearSolver._solve_checked``'s, the vmap rules :mod:`hodl_plugin._vmap`'s.

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

import functools
import math
from typing import Any, Callable, Hashable, Optional, Sequence

import torch
from torch import Tensor

from . import _adjoint, _vmap
from . import linear_solve as ls
from ._adjoint import AfterHook, FixedPointProblem, LinearSolve, Op
from ._autodiff import grad_once, grad_wanted, jvp_any, make_vjp, refuse_forward_over_forward, refuse_legacy_vmap
from ._capture import BoundOperator, bind, detached, flatten, refuse_leaks
from ._torch_compat import function_apply, transforms_active
from .gkm import GKMIteration, SolverInfo
from .hypergrad import HypergradMethod

__all__ = ["implicit_vjp", "implicit_jvp", "implicit_vjp_lean", "FixedPointProblem", "FixedPoint", "LinearSolve",
           "Implicit", "fixed_point_solve"]

# ------------------------------------------------------------------------------------------------
# the pure rules
# ------------------------------------------------------------------------------------------------
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
    rhs = jvp_any(lambda *ts: op(u, ts), tuple(tensors), dots)
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
# the fixed-point primitive
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
        refuse_legacy_vmap(g, "the implicit derivative")
        problem: FixedPointProblem = ctx.problem
        u, *ts = ctx.saved_tensors
        needs = ctx.needs_input_grad[2:]
        if not torch.is_grad_enabled() and not transforms_active():
            grads = _lean_backward(problem, u, ts, g, needs)
        else:
            refuse_leaks(problem.op, u, ts, "double backward (create_graph=True)")
            solve = functools.partial(_apply_solve, problem, True, "adjoint", u, ts, needs)
            grads = implicit_vjp(problem.op, u, ts, g, solve, problem.sign)
        return (None, None, *(gr if n else None for gr, n in zip(grads, needs)))

    @staticmethod
    def jvp(ctx: Any, _problem_t: Any, _u0_t: Optional[Tensor], *ts_t: Optional[Tensor]) -> Tensor:  # type: ignore[override]
        """:func:`implicit_jvp`."""
        refuse_forward_over_forward()
        problem: FixedPointProblem = ctx.problem
        u, *ts = ctx.saved_tensors
        refuse_leaks(problem.op, u, ts, "forward-mode AD")
        solve = functools.partial(_apply_solve, problem, False, "tangent", u, ts, None)
        return implicit_jvp(problem.op, u, ts, ts_t, solve, problem.sign)

    @staticmethod
    def vmap(info: Any, in_dims: tuple, problem: FixedPointProblem, u0: Tensor, *ts: Tensor) -> tuple:  # type: ignore[override]
        """One batched solve (:mod:`hodl_plugin._vmap`)."""
        return _vmap.fixed_point(FixedPoint, info, in_dims, problem, u0, ts)


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
        v = _adjoint.solve(problem, True, "adjoint", g, u, ts)
        _, pull = torch.func.vjp(lambda *ts_: problem.op(u, ts_), *ts)
        return [gr if problem.sign == 1.0 else -gr for gr in pull(v)]
    if not problem.finite_cotangent(g):
        return [None if not n else torch.full_like(t, math.nan) for t, n in zip(ts, needs)]

    def solve(matvec: Callable[[Tensor], Tensor], b: Tensor) -> tuple[Tensor, ls.LinearSolveInfo]:
        return problem.solver._solve_checked(matvec, b, _adjoint.warm_start(problem, b),
                                            **_adjoint.solve_options(problem, b, "adjoint"))

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


# ------------------------------------------------------------------------------------------------
# the face for GKMSolver: the Implicit method (the decorators are hodl_plugin.custom's)
# ------------------------------------------------------------------------------------------------
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
    run = forward or (lambda u0_, params_, info_, iteration, sample: iteration.run(u0_, params_, info_))
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
            ps = detached(op.params(tensors))
            same = (forward is None and op.first is not None and problem.sample is None and u_start is u0
                    and len(tensors) == len(inputs) and all(a is b for a, b in zip(tensors, inputs)))
            if same:  # the very point and tensors of the binding run
                return it.run(u_start.detach(), ps, info_, t0=op.first[1])
            return run(u_start.detach(), ps, info_, it, problem.sample)

    problem = FixedPointProblem(op, fwd, solver, on_fail=on_fail, check_unique=check_unique, info=info,
                                warm=warm, after=after, iteration=it)
    return FixedPoint.apply(problem, u0, *inputs)


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
            GMRES. CG checks the symmetry claim (on its first search directions, and on two random vectors
            for a batch or when it does not converge) and raises if it is false.
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
