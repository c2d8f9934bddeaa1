r"""The policies around each linear solve of the implicit primitives (:mod:`hodl_plugin.implicit`).

The matrix :math:`A = I - \partial_u T` (or :math:`\partial_u G` for a root) as a product, the checks
that a solve is applicable (a symmetric matrix for CG, a nonsingular one when the fixed point may not
be unique), the warm start (used only where it beats zero, per sample), and the message of a solve
that missed its tolerance.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable, Optional

import torch
from torch import Tensor

from . import linear_solve as ls
from ._torch_compat import transforms_active
from .errors import LinearSolveError

if TYPE_CHECKING:  # pragma: no cover
    from .implicit import FixedPointProblem

__all__ = ["matvec", "run_solver", "warm_start", "unsolved_message", "check_symmetric", "verify_symmetric"]


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
    x, info = solver(matvec, b, x0, batch_dims=depth) if depth else solver(matvec, b, x0)
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
    _, info = solver(matvec, r, None, batch_dims=depth) if depth else solver(matvec, r, None)
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
