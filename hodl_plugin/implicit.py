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

The faces over the rules: the :class:`Implicit` method of :class:`~hodl_plugin.GKMSolver`, and the
decorators :func:`custom_fixed_point` / :func:`custom_root` for any solver function.

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

from . import _vmap
from . import linear_solve as ls
from ._autodiff import make_jvp, make_vjp
from ._capture import bind, flatten, unflatten
from ._torch_compat import forward_ad_active, transforms_active
from .errors import ConvergenceWarning, LinearSolveError
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
    "custom_fixed_point",
    "custom_root",
    "fixed_point_solve",
]

Op = Callable[[Tensor, Sequence[Tensor]], Tensor]


# ------------------------------------------------------------------------------------------------
# the pure rules
# ------------------------------------------------------------------------------------------------
def _jvp(fn: Callable[..., Tensor], primals: tuple, tangents: tuple) -> Tensor:
    """``∂fn(primals)·tangents``: ``torch.func.jvp``, or — inside a forward-mode dual level, where
    forward AD cannot nest — the transpose of a vjp (two reverse passes)."""
    if not forward_ad_active():
        return torch.func.jvp(fn, primals, tangents)[1]
    out, pull = torch.func.vjp(fn, *primals)
    _, pull2 = torch.func.vjp(lambda z_: pull(z_), torch.zeros_like(out))
    return pull2(tuple(tangents))[0]


def implicit_vjp(op: Op, u: Tensor, tensors: Sequence[Tensor], cotangent: Tensor,
                 solve: Callable[[Tensor], Tensor], sign: float = 1.0) -> tuple:
    r""":math:`\bar\theta = \sigma(\partial_\theta T)^\top v` with :math:`v` = ``solve(cotangent)`` =
    :math:`A^{-\top}\bar u`, for the fixed point :math:`u = T(u;\theta)` (``sign`` :math:`\sigma = 1`) or
    the root :math:`G(u;\theta) = 0` (``op`` = G, :math:`\sigma = -1`). Differentiable when ``solve`` is.

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
    r""":math:`\dot u = A^{-1}\sigma\,\partial_\theta T\,\dot\theta`, the solve being ``solve``.

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
                      sign: float = 1.0) -> tuple[list[Optional[Tensor]], Tensor, Any]:
    r""":func:`implicit_vjp` for a first-order reverse pass: one graph of :math:`T(u^*; \theta)` serves
    every product of the solve (``solve(matvec, b) -> (v, info)`` with ``matvec`` = :math:`A^\top`) and
    the final :math:`(\partial_\theta T)^\top v`. Returns ``(grads, v, info)`` (``grads[i]`` is ``None``
    where ``needs[i]`` is false). Not differentiable: for ``backward()`` without ``create_graph``."""
    with torch.enable_grad():
        u_req = u.detach().clone().requires_grad_(True)
        ts = [t.detach().requires_grad_(bool(n) and t.is_floating_point()) for t, n in zip(tensors, needs)]
        f = op(u_req, ts)
    if not f.requires_grad:  # T does not depend on u nor on θ
        v, info = solve(lambda z: z if sign == 1.0 else torch.zeros_like(z), cotangent)
        return [None] * len(ts), v, info
    vjp = make_vjp(f, u_req)
    v, info = solve((lambda z: z - vjp(z)) if sign == 1.0 else vjp, cotangent.detach())
    wanted = [t for t in ts if t.requires_grad]
    if not wanted:
        return [None] * len(ts), v, info
    grads = iter(torch.autograd.grad(f, wanted, v if sign == 1.0 else -v, allow_unused=True))
    return [next(grads) if t.requires_grad else None for t in ts], v, info


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
        needs: which tensors the reverse pass wants gradients for (set per backward).
        batch: set on the problems a vmap builds (:mod:`hodl_plugin._vmap`).
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
        return dataclasses.replace(self, **changes)

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
            self.fail(_unsolved_message(self, role, linfo, b))


def _unsolved_message(problem: FixedPointProblem, role: str, linfo: ls.LinearSolveInfo,
                      b: Optional[Tensor]) -> str:
    what = "(I - dT/du)" if problem.sign == 1.0 else "dG/du"
    head = (
        f"the linear system {what}{'^T' if role == 'adjoint' else ''} v = b was not solved: {linfo.method} stopped "
        f"after {linfo.iterations} products with residual {linfo.residual:.3e} > {linfo.threshold:.3e}."
    )
    if b is not None:
        eps = float(torch.finfo(b.dtype).eps)
        bn = float(torch.linalg.vector_norm(b.detach()))
        if bn > 0 and linfo.threshold / bn < 10 * eps:
            return (
                f"{head} The threshold is {linfo.threshold / bn:.1e} relative to ||b||, below what {b.dtype} resolves "
                f"(eps = {eps:.1e}): no solver reaches it; loosen adjoint_rtol (the dtype's default is "
                f"{ls.default_rtol(b.dtype):.1e})"
            )
    other = "another method (solver='gmres')" if linfo.method != "gmres" else "a looser tolerance (adjoint_rtol)"
    return (
        f"{head} (I - dT/du) may be singular (a non-singleton fixed-point set: use hypergrad='unrolled'), or the "
        f"solver needs more iterations (adjoint_maxiter) / {other}"
    )


# ------------------------------------------------------------------------------------------------
# one linear solve (no autograd), shared by the primitives
# ------------------------------------------------------------------------------------------------
def _solve(problem: FixedPointProblem, transpose: bool, role: str, b: Tensor, u: Tensor,
           tensors: Sequence[Tensor]) -> Tensor:
    r""":math:`x = A^{-\top} b` (``transpose``) or :math:`A^{-1} b` at :math:`(u, \theta)`; its
    diagnostics go to the call's info, and the first-order adjoint to the ``after`` hook."""
    b, u = b.detach(), u.detach()
    ts = [t.detach() for t in tensors]
    if not bool(torch.isfinite(b).all()):
        problem.fail(
            "the upstream gradient dL/du* reaching the fixed-point solve has NaN/Inf entries; "
            "the hypergradient is NaN (fix the loss above the solver)"
        )
        return torch.full_like(b, math.nan)
    x0 = _warm_start(problem, b) if role == "adjoint" else None
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
    return _run_solver(problem, _matvec(prod, problem.sign), b, role, x0=x0)


def _matvec(prod: Optional[Callable[[Tensor], Tensor]], sign: float) -> Callable[[Tensor], Tensor]:
    if prod is None:  # T does not depend on u: A = I (fixed point) or 0 (root)
        return (lambda z: z) if sign == 1.0 else torch.zeros_like
    if sign == 1.0:
        return lambda z: z - prod(z)
    return prod


def _run_solver(problem: FixedPointProblem, matvec: Callable[[Tensor], Tensor], b: Tensor, role: str,
                x0: Optional[Tensor] = None) -> tuple[Tensor, ls.LinearSolveInfo]:
    solver = problem.solver
    depth = problem.batch.depth if problem.batch is not None else 0
    if solver.symmetric and role != "higher":
        _check_symmetric(matvec, b, solver)
    if role == "adjoint" and problem.check_unique:
        _check_nonsingular(matvec, b, solver, depth)
    if x0 is not None:  # a warm start worse than 0 is not used (keeps A⁻ᵀ0 = 0 exactly), per sample
        x0 = _better_than_zero(x0, b, matvec(x0), depth)
    return solver(matvec, b, x0, batch_dims=depth) if depth else solver(matvec, b, x0)


def _warm_start(problem: FixedPointProblem, b: Tensor) -> Optional[Tensor]:
    """The adjoint warm start where it fits ``b``: the same shape, or (under vmap) one sample's
    shape, then used for every sample."""
    x0 = problem.warm() if problem.warm is not None else None
    if x0 is None or x0.dtype != b.dtype or x0.device != b.device:
        return None
    if x0.shape == b.shape:
        return x0
    depth = problem.batch.depth if problem.batch is not None else 0
    if depth and x0.shape == b.shape[depth:]:
        return x0.expand(b.shape)
    return None


def _better_than_zero(x0: Tensor, b: Tensor, Ax0: Tensor, batch_dims: int) -> Optional[Tensor]:
    r""":math:`x_0` where :math:`\|b - Ax_0\| < \|b\|`, else 0 — per sample over ``batch_dims``
    leading dims (``None`` when no sample keeps its warm start)."""
    dims = tuple(range(batch_dims, b.dim()))
    keep = torch.linalg.vector_norm(b - Ax0, dim=dims) < torch.linalg.vector_norm(b, dim=dims)
    if not bool(keep.any()):
        return None
    if batch_dims == 0:
        return x0
    return torch.where(keep.reshape(keep.shape + (1,) * (b.dim() - batch_dims)), x0, torch.zeros_like(x0))


def _check_symmetric(matvec: Callable[[Tensor], Tensor], b: Tensor, solver: ls.LinearSolver) -> None:
    """A solver for symmetric matrices (CG) gets one: test ``⟨a, A c⟩ = ⟨A a, c⟩`` on two random
    vectors (two products)."""
    gen = torch.Generator(device=b.device).manual_seed(1234)
    a = torch.randn(b.shape, generator=gen, dtype=b.dtype, device=b.device)
    c = torch.randn(b.shape, generator=gen, dtype=b.dtype, device=b.device)
    lhs, rhs = float((a * matvec(c)).sum()), float((matvec(a) * c).sum())
    scale = float(torch.linalg.vector_norm(a)) * float(torch.linalg.vector_norm(c))
    tol = 1e3 * torch.finfo(b.dtype).eps ** 0.75
    if abs(lhs - rhs) > tol * max(scale, 1e-300):
        raise LinearSolveError(
            f"solver={solver.name!r} needs a symmetric dT/du, but <a, (I-J)c> - <(I-J)a, c> = "
            f"{lhs - rhs:.3e} for random a, c: the operator is not symmetric. Declare "
            "symmetric_jacobian = False on it, or pass solver='gmres' to the implicit/inexact mode"
        )


def _check_nonsingular(matvec: Callable[[Tensor], Tensor], b: Tensor, solver: ls.LinearSolver,
                       depth: int) -> None:
    r"""Solve :math:`A^\top z = r` for a random :math:`r` with the adjoint's own solver and tolerance.

    When Fix T is not a singleton, :math:`A` is singular and a random right-hand side has a
    component outside its range, so the solve cannot converge; the adjoint's own right-hand side may
    lie in the range (a *consistent* system, which Krylov solvers answer with the minimum-norm
    solution) and would not show it. Costs one more solve.
    """
    gen = torch.Generator(device=b.device).manual_seed(4321)
    r = torch.randn(b.shape, generator=gen, dtype=b.dtype, device=b.device)
    _, info = solver(matvec, r, None, batch_dims=depth) if depth else solver(matvec, r, None)
    if not info.converged:
        raise LinearSolveError(
            f"I - dT/du is singular (or too ill-conditioned for the adjoint tolerance) at the fixed point: "
            f"{info.method} could not solve (I - dT/du)^T z = r for a random r (residual {info.residual:.2e} > "
            f"{info.threshold:.2e} after {info.iterations} products). Fix T is then not a singleton and the "
            "implicit hypergradient is undefined: differentiate the (aggregated) iteration with "
            "hypergrad='unrolled' or 'truncated', as HODL does (check_unique=False skips this test)"
        )


# ------------------------------------------------------------------------------------------------
# the two primitives
# ------------------------------------------------------------------------------------------------
class FixedPoint(torch.autograd.Function):
    r""":math:`u^* = \mathrm{solve}(u_0; \theta)` with implicit derivatives (see the module docstring).

    ``FixedPoint.apply(problem, u0, *tensors)``; ``u0`` gets no gradient (a fixed point does not
    depend on where the iteration started).
    """

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
            solve = functools.partial(_apply_solve, problem, True, "adjoint", u, ts, needs)
            grads = implicit_vjp(problem.op, u, ts, g, solve, problem.sign)
        return (None, None, *(gr if n else None for gr, n in zip(grads, needs)))

    @staticmethod
    def jvp(ctx: Any, _problem_t: Any, _u0_t: Optional[Tensor], *ts_t: Optional[Tensor]) -> Tensor:  # type: ignore[override]
        """:func:`implicit_jvp`."""
        problem: FixedPointProblem = ctx.problem
        u, *ts = ctx.saved_tensors
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
        v = _solve(problem, True, "adjoint", g, u, ts)
        _, pull = torch.func.vjp(lambda *ts_: problem.op(u, ts_), *ts)
        return [gr if problem.sign == 1.0 else -gr for gr in pull(v)]
    if not bool(torch.isfinite(g).all()):
        problem.fail(
            "the upstream gradient dL/du* reaching the fixed-point solve has NaN/Inf entries; "
            "the hypergradient is NaN (fix the loss above the solver)"
        )
        return [None if not n else torch.full_like(t, math.nan) for t, n in zip(ts, needs)]

    def solve(matvec: Callable[[Tensor], Tensor], b: Tensor) -> tuple[Tensor, ls.LinearSolveInfo]:
        return _run_solver(problem, matvec, b, "adjoint", x0=_warm_start(problem, b))

    grads, v, linfo = implicit_vjp_lean(problem.op, u, ts, g, needs, solve, problem.sign)
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
    ``"higher"`` (the solves of higher derivatives, counted in ``info.higher_solves``).
    """

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
# the faces: the Implicit method of GKMSolver, and the decorators
# ------------------------------------------------------------------------------------------------
def grad_wanted() -> bool:
    """Whether a derivative can be asked of this call: grad mode, a torch.func transform or a
    forward-mode dual level."""
    return torch.is_grad_enabled() or transforms_active() or forward_ad_active()


def bind_iteration(it: GKMIteration, u0: Tensor, params: Sequence[Any]) -> Any:
    """The iteration's operator bound to explicit tensors (:func:`~hodl_plugin._capture.bind`): the
    leaves of ``params`` and the tensors ``T`` (and, when aggregating, the upper objective) read."""
    u = u0.detach().clone()  # an operator that writes into its input cannot touch the caller's u0
    extra = [lambda: it.grad_upper(u, params)] if it.aggregates else []
    return bind(it.T, u, params, extra)


def fixed_point_solve(it: GKMIteration, u0: Tensor, params: Sequence[Any], info: SolverInfo,
                      solver: ls.LinearSolver, *, forward: Optional[Callable[..., Tensor]] = None,
                      op: Any = None, on_fail: str = "raise", check_unique: Optional[bool] = None,
                      warm: Optional[Callable[[], Optional[Tensor]]] = None,
                      after: Optional[AfterHook] = None) -> Tensor:
    r""":math:`u^*` of the iteration ``it`` through :class:`FixedPoint`, differentiable at every order in
    ``params`` and every tensor ``T`` reads. ``forward(u0, params, info, iteration, sample)`` runs the
    solve (default: ``iteration.run`` from ``u0``, without autograd); ``op``: the bound operator
    (default :func:`bind_iteration`)."""
    op = bind_iteration(it, u0, params) if op is None else op
    run = forward or _default_forward
    if check_unique is None:  # auto: HODL aggregation is used where Fix T may not be a singleton
        check_unique = it.aggregates

    def fwd(u_start: Tensor, tensors: Sequence[Tensor], info_: Optional[SolverInfo],
            problem: FixedPointProblem) -> Tensor:
        if problem.batch is not None:  # lifted by a vmap: the batched iteration reads the tensors itself
            with torch.no_grad():
                return run(u_start.detach(), [t.detach() for t in tensors], info_, problem.iteration, None)
        with torch.no_grad(), op.context(tensors):
            ps = [_detach(p) for p in op.params(tensors)]
            return run(u_start.detach(), ps, info_, it, problem.sample)

    problem = FixedPointProblem(op, fwd, solver, on_fail=on_fail, check_unique=check_unique, info=info,
                                warm=warm, after=after, iteration=it)
    leaves, _ = flatten(params)
    return FixedPoint.apply(problem, u0, *leaves, *op.captured)


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
        self.solver = configure_solver(solver, adjoint_rtol, adjoint_atol, adjoint_maxiter)
        self.on_fail = _choice(on_fail, "on_fail", ("raise", "warn"))
        if check_unique is not None and not isinstance(check_unique, bool):
            raise TypeError(f"check_unique must be None, True or False, got {check_unique!r}")
        self.check_unique = check_unique

    def run(self, it: GKMIteration, u0: Tensor, params: Sequence[Any], info: SolverInfo,
            key: Optional[Hashable] = None) -> Tensor:
        if not grad_wanted():
            return it.run(u0, params, info)  # (under vmap the primitive's batched solve stops early)
        return fixed_point_solve(it, u0, params, info, solver_for(self.solver, it.T), on_fail=self.on_fail,
                                 check_unique=self.check_unique)

    def __repr__(self) -> str:
        return f"Implicit(solver={'auto' if self.solver is None else self.solver!r})"


def configure_solver(solver: ls.SolverLike, rtol: Optional[float], atol: Optional[float],
                     maxiter: Optional[int]) -> Optional[ls.LinearSolver]:
    """The adjoint solver of a method: ``solver`` (``None``: chosen per operator) with the ``adjoint_*``
    options applied; a tolerance given twice is refused."""
    changes = {k: v for k, v in (("rtol", rtol), ("atol", atol), ("maxiter", maxiter)) if v is not None}
    if solver is None:  # the defaults of the solver chosen per operator are no change
        changes = {k: v for k, v in changes.items() if v != getattr(ls.GMRES(), k)}
    try:  # validated now, named as the user wrote them
        ls.GMRES(**{"rtol": None, **changes})
    except ValueError as e:
        field = next((k for k in ("rtol", "atol", "maxiter") if f"{k} " in str(e) or f"{k} and" in str(e)), "rtol")
        raise ValueError(str(e).replace("GMRES: ", "").replace(field, f"adjoint_{field}", 1)) from None
    if solver is None:
        base = None
    else:
        base = ls.as_solver(solver)
    if isinstance(base, ls.LinearSolver) and isinstance(solver, ls.LinearSolver):
        defaults = type(solver)()
        clash = [k for k in changes if getattr(solver, k) != getattr(defaults, k)]
        if clash:
            from .errors import ConfigurationError

            raise ConfigurationError(
                f"the solver {solver!r} already sets {clash}; give each tolerance once, either in the solver "
                f"(hp.linear_solve.{type(solver).__name__.lower()}(rtol=...)) or as adjoint_rtol=/adjoint_atol="
                "/adjoint_maxiter="
            )
    if base is None:  # applied to the solver chosen per operator
        return None if not changes else _Deferred(changes)  # type: ignore[return-value]
    return base.replace(**changes) if changes else base


@dataclass(frozen=True)
class _Deferred:
    """Options for the solver chosen per operator (CG or GMRES), applied when it is known."""

    changes: dict

    def __repr__(self) -> str:
        return "auto(" + ", ".join(f"{k}={v!r}" for k, v in self.changes.items()) + ")"


def solver_for(solver: Any, T: Any) -> ls.LinearSolver:
    """The solver of a call: the configured one, else CG for a symmetric Jacobian, else GMRES."""
    if isinstance(solver, ls.LinearSolver):
        return solver
    base = ls.CG() if getattr(T, "symmetric_jacobian", False) else ls.GMRES()
    return base.replace(**solver.changes) if isinstance(solver, _Deferred) else base


def _choice(value: Any, name: str, choices: tuple) -> str:
    if not isinstance(value, str) or value not in choices:
        raise ValueError(f"{name} must be one of {list(choices)}, got {value!r}")
    return value


def _decorated(kind: str, fn: Callable[..., Tensor], solve: ls.SolverLike, on_fail: str,
               symmetric: bool) -> Callable[[Callable[..., Tensor]], Callable[..., Tensor]]:
    solver = ls.as_solver(solve, default="cg" if symmetric else "gmres")
    _choice(on_fail, "on_fail", ("raise", "warn"))
    sign = 1.0 if kind == "fixed_point" else -1.0

    def decorator(solver_fn: Callable[..., Tensor]) -> Callable[..., Tensor]:
        @functools.wraps(solver_fn)
        def wrapped(init: Tensor, *args: Any) -> Tensor:
            if not isinstance(init, Tensor):
                raise TypeError(f"the first argument of {solver_fn.__name__} (the initial point) must be a tensor")
            if not grad_wanted():
                return solver_fn(init, *args)
            op = bind(fn, init, args, static=True)

            def fwd(u0: Tensor, tensors: Sequence[Tensor], info: Any, problem: FixedPointProblem) -> Tensor:
                with torch.no_grad(), op.context(tensors):
                    out = solver_fn(u0.detach(), *op.params(tensors))
                if not isinstance(out, Tensor) or out.shape != init.shape:
                    raise TypeError(
                        f"{solver_fn.__name__} must return the solution, a tensor shaped like its first "
                        f"argument {tuple(init.shape)}; got {type(out).__name__}"
                    )
                return out

            problem = FixedPointProblem(op, fwd, solver, sign=sign, on_fail=on_fail)
            leaves, _ = flatten(args, static=True)
            return FixedPoint.apply(problem, init, *leaves, *op.captured)

        return wrapped

    return decorator


def custom_fixed_point(T: Callable[..., Tensor], *, solve: ls.SolverLike = None, on_fail: str = "raise"
                       ) -> Callable[[Callable[..., Tensor]], Callable[..., Tensor]]:
    r"""Decorate any solver ``solver(init, *args) -> u`` whose result is a fixed point
    :math:`u = T(u, *args)`: the decorated function's result is differentiable w.r.t. the tensors in
    ``args`` (and those ``T`` reads from its closure) by the implicit function theorem, at every order
    and under ``torch.func`` transforms (jaxopt's ``custom_fixed_point``).

    Args:
        T: the fixed-point map ``T(u, *args)``.
        solve: the linear solver of the implicit derivative (:mod:`hodl_plugin.linear_solve`; default
            CG when ``T.symmetric_jacobian`` is true, else GMRES; tolerance following the dtype).
        on_fail: ``"raise"`` (default) a :class:`~hodl_plugin.errors.LinearSolveError` when a solve
            misses its tolerance, or ``"warn"``.

    Returns:
        a decorator; ``init`` gets no gradient. Non-tensor ``args`` (numbers, strings) are passed
        through as constants.

    >>> import torch, hodl_plugin as hp
    >>> A = torch.tensor([[3.0, 1.0], [1.0, 2.0]], dtype=torch.float64)
    >>> T = lambda u, x: u - 0.2 * (A @ u - x)           # gradient step of ½uᵀAu - xᵀu
    >>> @hp.custom_fixed_point(T)
    ... def solve(u0, x):                                  # any solver: here a direct one
    ...     return torch.linalg.solve(A, x)
    >>> x = torch.ones(2, dtype=torch.float64, requires_grad=True)
    >>> solve(torch.zeros(2, dtype=torch.float64), x).sum().backward()
    >>> torch.allclose(x.grad, torch.linalg.solve(A, torch.ones(2, dtype=torch.float64)))
    True
    """
    if not callable(T):
        raise TypeError(f"custom_fixed_point(T): T must be callable T(u, *args), got {type(T).__name__}")
    return _decorated("fixed_point", T, solve, on_fail, bool(getattr(T, "symmetric_jacobian", False)))


def custom_root(optimality_fn: Callable[..., Tensor], *, solve: ls.SolverLike = None, on_fail: str = "raise"
                ) -> Callable[[Callable[..., Tensor]], Callable[..., Tensor]]:
    r"""Decorate any solver ``solver(init, *args) -> u`` whose result is a root
    :math:`G(u, *args) = 0` of ``optimality_fn``: derivatives w.r.t. the tensors in ``args`` by the
    implicit function theorem, :math:`\dot u = -(\partial_u G)^{-1}\partial_\theta G\,\dot\theta` (TorchOpt's
    and jaxopt's ``custom_root``; ``argnums`` is not needed: every tensor argument is differentiable).

    Args:
        optimality_fn: ``G(u, *args)``, e.g. the gradient of the inner objective.
        solve: the linear solver of :math:`(\partial_u G)^\top v = \bar u` (default GMRES; pass CG,
            ``hp.linear_solve.cg()``, for a symmetric positive definite :math:`\partial_u G`, e.g. a Hessian).
        on_fail: as for :func:`custom_fixed_point`.

    >>> import torch, hodl_plugin as hp
    >>> X = torch.tensor([[1.0, 0.0], [1.0, 1.0], [0.0, 2.0]], dtype=torch.float64)
    >>> y = torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64)
    >>> G = lambda w, lam: X.T @ (X @ w - y) + lam * w            # ridge: ∇ of ½‖Xw-y‖² + λ/2‖w‖²
    >>> @hp.custom_root(G, solve=hp.linear_solve.cg())
    ... def ridge(w0, lam):
    ...     return torch.linalg.solve(X.T @ X + lam * torch.eye(2, dtype=X.dtype), X.T @ y)
    >>> lam = torch.tensor(0.5, dtype=torch.float64, requires_grad=True)
    >>> w = ridge(torch.zeros(2, dtype=torch.float64), lam)
    >>> (dw,) = torch.autograd.grad(w.sum(), lam)
    >>> H = X.T @ X + 0.5 * torch.eye(2, dtype=X.dtype)
    >>> torch.allclose(dw, -(torch.linalg.solve(H, w.detach())).sum())     # dw/dλ = -H⁻¹w
    True
    """
    if not callable(optimality_fn):
        raise TypeError(f"custom_root(optimality_fn): must be callable G(u, *args), got {type(optimality_fn).__name__}")
    return _decorated("root", optimality_fn, solve, on_fail, False)
