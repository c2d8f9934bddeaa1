r"""The linear solves of the implicit derivatives (:mod:`hodl_plugin.implicit`, :ref:`math-implicit`).

:class:`FixedPointProblem`, what both primitives read besides tensors; :class:`LinearSolve`, the
autograd primitive :math:`x = A^{-\top}b` or :math:`A^{-1}b` with :math:`A = I - \partial_u T` (or
:math:`\partial_u G` for a root), whose own derivative is another solve with the transposed operator
(jaxopt's ``custom_linear_solve``); and the policies around each solve: the matrix as a product, the
checks that a solve is applicable (a symmetric matrix for CG, a nonsingular one when the fixed point may
not be unique), per-sample or joint solves of a batch, the warm start (used only where it beats zero,
per sample), and the message of a solve that missed its tolerance.
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Optional, Sequence

import torch
from torch import Tensor

from . import _vmap
from . import linear_solve as ls
from ._autodiff import jvp_any, jvp_by_vjp, make_jvp, make_vjp, refuse_forward_over_forward, refuse_legacy_vmap
from ._checks import all_finite
from ._torch_compat import function_apply, transforms_active
from .errors import ConvergenceWarning, LinearSolveError

if TYPE_CHECKING:  # pragma: no cover
    from .gkm import GKMIteration, SolverInfo

__all__ = ["FixedPointProblem", "LinearSolve", "solve", "matvec", "run_solver", "warm_start", "unsolved_message",
           "check_symmetric", "verify_symmetric"]

Op = Callable[[Tensor, Sequence[Tensor]], Tensor]
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
            self.fail(unsolved_message(self, role, linfo, b))


_PROBLEM_FIELDS = frozenset(f.name for f in dataclasses.fields(FixedPointProblem))



def unsolved_message(problem: FixedPointProblem, role: str, linfo: ls.LinearSolveInfo,
                      b: Optional[Tensor]) -> str:
    what = "(I - dT/du)" if problem.sign == 1.0 else "dG/du"
    where = ""
    if linfo.converged_per_sample is not None:  # a batch of independent systems: say which samples failed
        bad = (~linfo.converged_per_sample).reshape(-1).nonzero().flatten().tolist()
        where = f" for {len(bad)} of {linfo.converged_per_sample.numel()} samples, e.g. {bad[:8]}"
    head = (
        f"the linear system {what}{'^T' if role == 'adjoint' else ''} v = b was not solved{where}: {linfo.method} "
        f"stopped after {linfo.iterations} products with residual {linfo.residual:.3e} > {linfo.threshold:.3e}."
    )
    if b is not None:
        eps = float(torch.finfo(b.dtype).eps)
        if linfo.threshold_per_sample is not None:  # each sample's threshold against its own ||b_i||
            thr = linfo.threshold_per_sample.reshape(-1).double().cpu()
            bn_i = torch.linalg.vector_norm(b.detach().reshape(thr.numel(), -1), dim=1, dtype=torch.float64).cpu()
            failed = ~linfo.converged_per_sample.reshape(-1).cpu() & (bn_i > 0)
            rel = torch.where(failed, thr / torch.where(bn_i > 0, bn_i, torch.ones_like(bn_i)), torch.inf)
            rel_min = float(rel.min())
        else:
            bn = float(torch.linalg.vector_norm(b.detach()))
            rel_min = linfo.threshold / bn if bn > 0 else math.inf
        if rel_min < 10 * eps:
            return (
                f"{head} The threshold is {rel_min:.1e} relative to ||b||, below what {b.dtype} resolves "
                f"(eps = {eps:.1e}): no solver reaches it; loosen adjoint_rtol (the dtype's default is "
                f"{ls.default_rtol(b.dtype):.1e})"
            )
    other = "another method (solver='gmres')" if linfo.method != "gmres" else "a looser tolerance (adjoint_rtol)"
    return (
        f"{head} (I - dT/du) may be singular (a non-singleton fixed-point set: use hypergrad='unrolled'), or the "
        f"solver needs more iterations (adjoint_maxiter) / {other}"
    )


def matvec(prod: Optional[Callable[[Tensor], Tensor]], sign: float) -> Callable[[Tensor], Tensor]:
    if prod is None:  # T does not depend on u: A = I (fixed point) or 0 (root)
        return (lambda z: z) if sign == 1.0 else torch.zeros_like
    if sign == 1.0:
        return lambda z: z - prod(z)
    return prod


def sample_dims(problem: FixedPointProblem, b: Tensor) -> int:
    """The leading dims of ``b`` that index independent systems: a vmap's, or the iteration's ``batch_dims``."""
    if problem.batch is not None:
        return problem.batch.depth
    it = problem.iteration
    return it.batch_dims if it is not None and 0 < it.batch_dims < b.dim() else 0


def run_solver(problem: FixedPointProblem, matvec: Callable[[Tensor], Tensor], b: Tensor, role: str,
                x0: Optional[Tensor] = None) -> tuple[Tensor, ls.LinearSolveInfo]:
    """One solve with ``problem.solver``: per sample (each meets its own tolerance) where the solver has a
    per-sample mode, or under a vmap; else one system for the batch, each sample's right-hand side scaled to
    unit size (one threshold for the batch would leave a sample with a small cotangent inaccurate)."""
    solver = problem.solver
    samples = sample_dims(problem, b)
    depth = samples if problem.batch is not None or solver.batched else 0
    probe = solver.symmetric and role != "higher"
    # a solver that measures the symmetry on its own search directions (CG) is checked after its solve
    # at no extra product; the others before, on two random vectors
    inline = probe and not depth and getattr(solver, "reports_symmetry", False)
    if probe and not inline:
        check_symmetric(matvec, b, solver)
    if role == "adjoint" and problem.check_unique:
        check_nonsingular(matvec, b, solver, depth, inline)
    if x0 is not None:  # a warm start worse than 0 is not used (keeps A⁻ᵀ0 = 0 exactly), per sample
        x0 = better_than_zero(x0, b, matvec(x0), depth)
    eq = _equilibrate(solver, b, samples) if samples and not depth else None
    if eq is not None:  # x = e·A⁻¹(b/e): each sample's right-hand side at unit size (e a power of 2, exact)
        b, x0 = b / eq, (None if x0 is None else x0 / eq)
    x, info = solver._call(matvec, b, x0, depth)  # (the library's own solve: no refusals)
    if inline:
        verify_symmetric(matvec, b, solver, info)
    return (x if eq is None else x * eq), info


def _equilibrate(solver: ls.LinearSolver, b: Tensor, samples: int) -> Optional[Tensor]:
    """Per-sample powers of 2 at each sample's largest entry, for a batch of independent systems solved as
    one by a solver without a per-sample mode and with a relative tolerance: its one threshold then gives
    every sample about ``rtol·√B`` relative accuracy, not only the largest (``info.adjoint`` reports the
    scaled system). ``None`` with an absolute tolerance, or under ``torch.func`` transforms."""
    if solver.atol or not b.is_floating_point() or transforms_active():
        return None
    return ls._pow2_scale(b.detach().abs().amax(dim=tuple(range(samples, b.dim())), keepdim=True))


def warm_start(problem: FixedPointProblem, b: Tensor) -> Optional[Tensor]:
    """The adjoint warm start where it fits ``b``: the same shape, or (under vmap) one sample's
    shape, then used for every sample."""
    x0 = problem.warm() if problem.warm is not None else None
    if x0 is None or x0.dtype != b.dtype or x0.device != b.device:
        return None
    if x0.shape == b.shape:
        return x0
    depth = sample_dims(problem, b)
    if depth and x0.shape == b.shape[depth:]:
        return x0.expand(b.shape)
    return None


def better_than_zero(x0: Tensor, b: Tensor, Ax0: Tensor, batch_dims: int) -> Optional[Tensor]:
    r""":math:`x_0` where :math:`\|b - Ax_0\| < \|b\|`, else 0 — per sample over ``batch_dims``
    leading dims (``None`` when no sample keeps its warm start)."""
    dims = tuple(range(batch_dims, b.dim()))
    keep = torch.linalg.vector_norm(b - Ax0, dim=dims) < torch.linalg.vector_norm(b, dim=dims)
    if not bool(keep.any()):
        return None
    if batch_dims == 0:
        return x0
    return torch.where(keep.reshape(keep.shape + (1,) * (b.dim() - batch_dims)), x0, torch.zeros_like(x0))


def symmetry_tol(dtype: torch.dtype) -> float:
    """The relative asymmetry ``|⟨a, Ac⟩ - ⟨Aa, c⟩|`` above which a matrix is not symmetric."""
    return 1e3 * torch.finfo(dtype).eps ** 0.75


def _asymmetric(solver: ls.LinearSolver, defect: float, where: str) -> LinearSolveError:
    return LinearSolveError(
        f"solver={solver.name!r} needs a symmetric dT/du, but <a, (I-J)c> - <(I-J)a, c> = {defect:.3e} "
        f"(relative) for {where}: the operator is not symmetric. Declare symmetric_jacobian = False on it, or "
        "pass solver='gmres' to the implicit/inexact mode"
    )


def check_symmetric(matvec: Callable[[Tensor], Tensor], b: Tensor, solver: ls.LinearSolver) -> None:
    """A solver for symmetric matrices (CG) gets one: test ``⟨a, A c⟩ = ⟨A a, c⟩`` on two random
    vectors (two products)."""
    gen = torch.Generator(device=b.device).manual_seed(1234)
    a = torch.randn(b.shape, generator=gen, dtype=b.dtype, device=b.device)
    c = torch.randn(b.shape, generator=gen, dtype=b.dtype, device=b.device)
    lhs, rhs = float((a * matvec(c)).sum()), float((matvec(a) * c).sum())
    scale = float(torch.linalg.vector_norm(a)) * float(torch.linalg.vector_norm(c))
    if abs(lhs - rhs) > symmetry_tol(b.dtype) * max(scale, 1e-300):
        raise _asymmetric(solver, (lhs - rhs) / max(scale, 1e-300), "random a, c")


def verify_symmetric(matvec: Callable[[Tensor], Tensor], b: Tensor, solver: ls.LinearSolver,
                     info: ls.LinearSolveInfo) -> None:
    """After a solve by a solver that reports ``info.symmetry_defect`` (CG, on its first two search
    directions): raise if the matrix is not symmetric. A solve that stopped before measuring it is
    right when it converged (its true residual says so); one that did not is tested on random vectors."""
    if info.symmetry_defect is not None:
        if info.symmetry_defect > symmetry_tol(b.dtype):
            raise _asymmetric(solver, info.symmetry_defect, "CG's first two search directions a, c")
    elif not info.converged:
        check_symmetric(matvec, b, solver)


def check_nonsingular(matvec: Callable[[Tensor], Tensor], b: Tensor, solver: ls.LinearSolver,
                       depth: int, symmetry: bool = False) -> None:
    r"""Solve :math:`A^\top z = r` for a random :math:`r` with the adjoint's own solver and tolerance.

    When Fix T is not a singleton, :math:`A` is singular and a random right-hand side has a
    component outside its range, so the solve cannot converge; the adjoint's own right-hand side may
    lie in the range (a *consistent* system, which Krylov solvers answer with the minimum-norm
    solution) and would not show it. Costs one more solve.
    """
    gen = torch.Generator(device=b.device).manual_seed(4321)
    r = torch.randn(b.shape, generator=gen, dtype=b.dtype, device=b.device)
    _, info = solver._call(matvec, r, None, depth)
    if symmetry:  # an asymmetric matrix also fails this solve: say which it is
        verify_symmetric(matvec, r, solver, info)
    if not info.converged:
        raise LinearSolveError(
            f"I - dT/du is singular (or too ill-conditioned for the adjoint tolerance) at the fixed point: "
            f"{info.method} could not solve (I - dT/du)^T z = r for a random r (residual {info.residual:.2e} > "
            f"{info.threshold:.2e} after {info.iterations} products). Fix T is then not a singleton and the "
            "implicit hypergradient is undefined: differentiate the (aggregated) iteration with "
            "hypergrad='unrolled' or 'truncated', as HODL does (check_unique=False skips this test)"
        )


# ------------------------------------------------------------------------------------------------
def solve(problem: FixedPointProblem, transpose: bool, role: str, b: Tensor, u: Tensor,
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
    x0 = warm_start(problem, b) if role == "adjoint" else None
    if problem.batch is not None and not problem.batch.batched_solver:
        x, linfo = _vmap.solve_per_sample(problem, transpose, role, b, u, ts, x0, solve_one)
    else:
        x, linfo = solve_one(problem, transpose, role, b, u, ts, x0)
    problem.record(role, linfo, b)
    if role == "adjoint" and problem.after is not None:
        problem.after(x, u, lambda: _vmap.samples(problem, x, u, ts))
    return x


def solve_one(problem: FixedPointProblem, transpose: bool, role: str, b: Tensor, u: Tensor,
               ts: Sequence[Tensor], x0: Optional[Tensor]) -> tuple[Tensor, ls.LinearSolveInfo]:
    """One solve (a batch of them with a per-sample solver) on a graph of ``op`` built once."""
    with torch.enable_grad():
        u_req = u.clone().requires_grad_(True)
        f = problem.op(u_req, ts)
        depends = f.requires_grad
        prod = (make_vjp(f, u_req) if transpose else make_jvp(f, u_req)) if depends else None
    if depends and prod is None:  # T's backward is not differentiable: forward-mode AD at every product
        def prod(z: Tensor) -> Tensor:
            return jvp_any(lambda uu: problem.op(uu, ts), (u,), (z,))
    return run_solver(problem, matvec(prod, problem.sign), b, role, x0=x0)


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
        return solve(problem, transpose, role, b, u, ts)

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
        refuse_legacy_vmap(xbar, "the derivative of an implicit linear solve")
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
        refuse_forward_over_forward()
        problem, transpose = ctx.problem, ctx.transpose
        x, u, *ts = ctx.saved_tensors
        u_t = torch.zeros_like(u) if u_t is None else u_t
        tangents = tuple(torch.zeros_like(t) if d is None else d for t, d in zip(ts, ts_t))

        def action(u_: Tensor, *ts_: Tensor) -> Tensor:  # ∂_uTᵀ x or ∂_uT x at (u_, θ_)
            if transpose:
                _, pull = torch.func.vjp(lambda uu: problem.op(uu, ts_), u_)
                return pull(x)[0]
            # reverse passes only: the forward mode around this (a dual level or torch.func.jvp) cannot nest
            return jvp_by_vjp(lambda uu: problem.op(uu, ts_), (u_,), (x,))

        rhs = jvp_any(action, (u, *ts), (u_t, *tangents))
        if problem.sign != 1.0:
            rhs = -rhs
        if b_t is not None:
            rhs = rhs + b_t
        return LinearSolve.apply(problem, transpose, "higher", rhs, u, *ts)

    @staticmethod
    def vmap(info: Any, in_dims: tuple, problem, transpose, role, b, u, *ts) -> tuple:  # type: ignore[override]
        """One batched solve (:mod:`hodl_plugin._vmap`)."""
        return _vmap.linear_solve(LinearSolve, info, in_dims, problem, transpose, role, b, u, ts)
