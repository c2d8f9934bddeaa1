r"""The linear solves of the implicit derivatives (:mod:`hodl_plugin.implicit`, :ref:`math-implicit`).

:class:`FixedPointProblem`, what both primitives read besides tensors; :class:`LinearSolve`, the
autograd primitive :math:`x = A^{-\top}b` or :math:`A^{-1}b` with :math:`A = I - \partial_u T` (or
:math:`\partial_u G` for a root), whose own derivative is another solve with the transposed operator
(jaxopt's ``custom_linear_solve``); the matrix as a product, the adjoint's warm start, and the message
of a solve that missed its tolerance. The checks around each solve (symmetry, singularity, per-sample
solves, warm starts that beat zero) are ``LinearSolver._solve_checked``'s.
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
from ._torch_compat import function_apply
from .errors import ConvergenceWarning, LinearSolveError

if TYPE_CHECKING:  # pragma: no cover
    from .gkm import GKMIteration, SolverInfo

__all__ = ["FixedPointProblem", "LinearSolve", "solve", "matvec", "solve_options", "warm_start", "unsolved_message"]

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
        batch_dims: the leading dims of ``u`` that index independent problems, when no ``iteration``
            says so (:func:`~hodl_plugin.custom.custom_fixed_point`'s ``batch_dims``).

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
    batch_dims: int = 0

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

    def finite_cotangent(self, g: Tensor) -> bool:
        """Whether the cotangent reaching the solve is finite (else the failure is reported)."""
        if all_finite([g]):
            return True
        self.fail("the upstream gradient dL/du* reaching the fixed-point solve has NaN/Inf entries; "
                  "the hypergradient is NaN (fix the loss above the solver)")
        return False

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
    decorated = problem.iteration is None  # custom_fixed_point / custom_root: the solver is their solve=
    where = ""
    if linfo.converged_per_sample is not None:  # a batch of independent systems: say which samples failed
        bad = (~linfo.converged_per_sample).reshape(-1).nonzero().flatten().tolist()
        where = f" for {len(bad)} of {linfo.converged_per_sample.numel()} samples, e.g. {bad[:8]}"
    head = (
        f"the linear system {what}{'^T' if role == 'adjoint' else ''} v = b was not solved{where}: {linfo.method} "
        f"stopped after {linfo.iterations} products with residual {linfo.residual:.3e} > {linfo.threshold:.3e}."
    )
    rtol = "the solver's rtol (solve=hp.linear_solve.gmres(rtol=...))" if decorated else "adjoint_rtol"
    if b is not None and math.isfinite(linfo.residual):
        eps = float(torch.finfo(b.dtype).eps)
        samples = sample_dims(problem, b)
        if linfo.threshold_per_sample is not None:  # each sample's threshold against its own ||b_i||
            thr = linfo.threshold_per_sample.reshape(-1).double().cpu()
            bn_i = torch.linalg.vector_norm(b.detach().reshape(thr.numel(), -1), dim=1, dtype=torch.float64).cpu()
            failed = ~linfo.converged_per_sample.reshape(-1).cpu() & (bn_i > 0)
            rel = torch.where(failed, thr / torch.where(bn_i > 0, bn_i, torch.ones_like(bn_i)), torch.inf)
            rel_min = float(rel.min())
        else:
            if samples and b.is_floating_point():  # solved as one system, each sample scaled to unit size
                b = b / ls._pow2_scale(b.detach().abs().amax(dim=tuple(range(samples, b.dim())), keepdim=True))
            bn = float(torch.linalg.vector_norm(b.detach()))
            rel_min = linfo.threshold / bn if bn > 0 else math.inf
        if rel_min < 10 * eps:
            return (
                f"{head} The threshold is {rel_min:.1e} relative to ||b||, below what {b.dtype} resolves "
                f"(eps = {eps:.1e}): no solver reaches it; loosen {rtol} (the dtype's default is "
                f"{ls.default_rtol(b.dtype):.1e})"
            )
    fwd = problem.forward_info if problem.forward_info is not None else problem.info
    if fwd is not None and fwd.diverged:  # (on_divergence="warn"): no fixed point there to differentiate
        return (
            f"{head} The forward solve diverged (on_divergence='warn' returned its last finite iterate, "
            "which is not a fixed point): the implicit derivative does not exist there. Fix the divergence "
            "(info.message says where), or differentiate only what converged"
        )
    if not math.isfinite(linfo.residual) and linfo.method in ("neumann", "fixed_point", "anderson"):
        fix = "solve='gmres'" if decorated else "solver='gmres'"
        return (f"{head} The {linfo.method} iteration diverged: it needs the spectral radius of dT/du below 1 at the "
                f"solution{' (of I - dG/du for a root)' if problem.sign != 1.0 else ''}; use a Krylov solver ({fix})")
    if decorated:
        return (
            f"{head} {what} may be singular at the returned point (the solution not isolated), or the solver needs "
            "more iterations or another method: pass solve=hp.linear_solve.gmres(maxiter=...) (or your own "
            "solve(matvec, b)); a solve function of yours must meet its tolerance"
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
    dims = it.batch_dims if it is not None else problem.batch_dims
    return dims if 0 < dims < b.dim() else 0


def solve_options(problem: FixedPointProblem, b: Tensor, role: str) -> dict[str, Any]:
    """The options of ``LinearSolver._solve_checked`` for a solve of ``role``."""
    return dict(samples=sample_dims(problem, b), per_sample=problem.batch is not None,
                probe_symmetry=role != "higher", probe_singular=role == "adjoint" and problem.check_unique)


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


# ------------------------------------------------------------------------------------------------
def solve(problem: FixedPointProblem, transpose: bool, role: str, b: Tensor, u: Tensor,
           tensors: Sequence[Tensor]) -> Tensor:
    r""":math:`x = A^{-\top} b` (``transpose``) or :math:`A^{-1} b` at :math:`(u, \theta)`; its
    diagnostics go to the call's info, and the first-order adjoint to the ``after`` hook."""
    b, u = b.detach(), u.detach()
    ts = [t.detach() for t in tensors]
    if not problem.finite_cotangent(b):
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
    return problem.solver._solve_checked(matvec(prod, problem.sign), b, x0, **solve_options(problem, b, role))


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
