r"""The implicit fixed-point solve as a PyTorch primitive, differentiable to any order.

:math:`u^*(\theta)` solves :math:`u = T(u; \theta)` (``θ`` = the solver's ``params`` and the
learnable tensors of ``T``). With :math:`A = I - \partial_u T(u^*; \theta)` the implicit function
theorem gives

.. math::

    \text{reverse:}\quad \bar\theta = (\partial_\theta T)^\top v,\; A^\top v = \bar u, \qquad
    \text{forward:}\quad \dot u = A^{-1}\,\partial_\theta T\,\dot\theta .

Both are built from one more primitive, the linear solve :math:`x = A^{-1} b` or
:math:`x = A^{-\top} b` (:class:`LinearSolve`), whose own derivative is another solve with the
transposed operator (the pattern of jaxopt's ``custom_linear_solve``):

.. math::

    x = A^{-\top} b:\quad \bar b = A^{-1}\bar x =: y,\qquad
    \overline{(u,\theta)} = \nabla_{u,\theta}\,\langle x, \partial_u T(u;\theta)\, y\rangle ,

and symmetrically for :math:`x = A^{-1}b` with :math:`\langle y, \partial_u T\, x\rangle`,
:math:`y = A^{-\top}\bar x`. Every derivative is therefore made of solves and of products with
:math:`T`'s Jacobians written with :mod:`torch.func`, so double backward, ``gradgradcheck``,
forward-mode dual numbers and ``torch.func.grad / jacrev / jacfwd / hessian / vmap`` are exact to
the solves' tolerance at every order.

The first-order reverse pass (``loss.backward()`` without ``create_graph``) takes a lean path:
one graph of :math:`T(u^*; \theta)` serves every adjoint product and the final
:math:`(\partial_\theta T)^\top v`.

Used by the ``"implicit"`` and ``"inexact"`` modes of :class:`hodl_plugin.GKMSolver`:

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

import contextlib
import copy
import math
import warnings
from typing import Any, Callable, Iterator, Optional, Sequence

import torch
from torch import Tensor, nn

from . import linear_solve as ls
from ._autodiff import make_jvp, make_vjp
from ._checks import transforms_active
from .errors import ConvergenceWarning, HODLError, LinearSolveError
from .gkm import GKMIteration, SolverInfo

#: ``after(v, u*, samples)`` of :class:`FixedPointProblem`
AfterHook = Callable[[Tensor, Tensor, Callable[[], Iterator[tuple]]], None]

__all__ = ["FixedPointProblem", "FixedPoint", "LinearSolve", "ClosureAdjoint", "transforms_active"]


def _vdot(a: Tensor, b: Tensor) -> Tensor:
    return (a * b).sum()


def _jvp(fn: Callable[..., Tensor], primals: tuple, tangents: tuple) -> Tensor:
    """``∂fn(primals)·tangents`` by ``torch.func.jvp``, or — inside a forward-mode dual level, where
    forward AD cannot nest — by the transpose of a vjp (two reverse passes)."""
    if getattr(torch.autograd.forward_ad, "_current_level", -1) < 0:
        return torch.func.jvp(fn, primals, tangents)[1]
    out, pull = torch.func.vjp(fn, *primals)
    z = torch.zeros_like(out)
    _, pull2 = torch.func.vjp(lambda z_: pull(z_), z)
    return pull2(tuple(tangents))[0]


class FixedPointProblem:
    r"""What the two autograd primitives need besides tensors: the operator and the solvers.

    Args:
        T: the operator ``T(u, *params)``.
        n_params: how many of the primitive's tensor inputs are ``params`` (the rest are the
            learnable tensors of ``T`` when it is an ``nn.Module``, named ``module_names``).
        forward: ``(u0, params) -> u*``, the fixed-point iteration (run without autograd).
        make_solver: ``() -> solve(matvec, b, x0)`` for every linear solve (the adjoint one and
            those of higher derivatives).
        on_fail: ``"raise"`` a :class:`LinearSolveError` when a solve misses its tolerance, or
            ``"warn"``.
        x0: warm start of the first adjoint solve (``() -> Tensor | None``); used where its shape
            is the solve's (under ``vmap``: the batch's, or one sample's for every sample) and, per
            sample, only where it is better than zero.
        after: called after the first adjoint solve with ``(v, u*, samples)``: the adjoint and the
            point (under ``vmap`` the whole batch) and ``samples()``, an iterator over the single
            problems' ``(v_i, u*_i, tensors_i)`` as plain tensors (the inexact mode's warm-start
            cache and its per-sample error bound).
        check_unique: probe :math:`I - \partial_u T` for a (numerically) zero singular value
            before the first adjoint solve and raise :class:`LinearSolveError` if it has one.
        symmetric: the operator claims a symmetric :math:`\partial_u T` (checked when CG runs).
        iteration: the :class:`~hodl_plugin.gkm.GKMIteration` that ``forward`` runs; with it a
            ``vmap`` over the problem becomes one batched solve (``_lift``), and ``forward``
            must accept ``it_=`` (the iteration to run instead of its own) and ``sample_=`` (``(i, B)``
            when a vmap solves its samples one by one).
    """

    def __init__(
        self,
        T: Callable[..., Tensor],
        n_params: int,
        module_names: Sequence[str],
        forward: Callable[[Tensor, Sequence[Tensor]], Tensor],
        make_solver: Callable[[], ls.LinearSolver],
        *,
        on_fail: str = "raise",
        info: Any = None,
        x0: Callable[[], Optional[Tensor]] = lambda: None,
        after: Optional[AfterHook] = None,
        check_unique: bool = False,
        symmetric: bool = False,
        iteration: Optional[GKMIteration] = None,
    ) -> None:
        self.T, self.n_params, self.module_names = T, n_params, list(module_names)
        self.forward, self.make_solver, self.on_fail, self.info = forward, make_solver, on_fail, info
        self.x0, self.after, self.check_unique, self.symmetric = x0, after, check_unique, symmetric
        self.first_done = False
        self.closure_args: Sequence[Tensor] = ()
        self.symmetric_checked = False
        self.slice_info: Optional[SolverInfo] = None
        self.slice_index: Optional[tuple[int, int]] = None  # (i, B) while a vmap solves sample i of B
        # which tensors the reverse pass wants gradients for (set by the backward that runs the first
        # adjoint solve; a vmapped tensor does not tell requires_grad inside the transform)
        self.needs: Optional[Sequence[bool]] = None
        self.iteration = iteration
        # set on the batched problems that vmap builds (_lift): how many leading dims are vmap's,
        # the problem they batch, the in-dims of its tensors, and whether the solver is per-sample
        self.vmap_dims = 0
        self.parent: Optional[FixedPointProblem] = None
        self.dims: tuple = ()
        self.batched_solver = False

    # -- T with explicit tensors -----------------------------------------------------------
    def T_call(self, u: Tensor, tensors: Sequence[Tensor]) -> Tensor:
        params = tensors[: self.n_params]
        if not self.module_names:
            return self.T(u, *params)
        assert isinstance(self.T, nn.Module)
        mod = dict(zip(self.module_names, tensors[self.n_params :]))
        return torch.func.functional_call(self.T, mod, (u, *params), strict=False)

    # -- linear solves (no autograd) ---------------------------------------------------------
    def _fail(self, msg: str) -> None:
        if self.on_fail == "raise":
            raise LinearSolveError(msg)
        warnings.warn(msg, ConvergenceWarning, stacklevel=4)

    def solve(
        self, transpose: bool, b: Tensor, u: Tensor, tensors: Sequence[Tensor], first: bool = False,
        *, x0: Optional[Tensor] = None, hooks: bool = True,
    ) -> Tensor:
        r""":math:`x = A^{-\top} b` (``transpose``) or :math:`A^{-1} b`, :math:`A = I - \partial_u T(u)`."""
        first = first and transpose
        if self.parent is not None and not self.batched_solver:
            # a vmapped problem whose linear solver has no per-sample mode: one solve per sample
            # (each with its slice of the warm start; the hooks see the whole batch once)
            x0 = self._warm_start(b) if first else None
            xs, infos = [], []
            for i in range(b.shape[0]):
                xs.append(self.parent.solve(transpose, b[i], u[i], _slice(i, tensors, self.dims), first,
                                            x0=None if x0 is None else x0[i], hooks=False))
                if first and self.info is not None:
                    infos.append(self.info.adjoint)
            if first and self.info is not None and all(li is not None for li in infos):
                self.info.adjoint = _stack_linfos(infos)
            x = torch.stack(xs)
            if first and self.after is not None:
                self._after(x, u, tensors)
            return x
        b, u = b.detach(), u.detach()
        ts = [t.detach() for t in tensors]
        if not bool(torch.isfinite(b).all()):
            self._fail(
                "the upstream gradient dL/du* reaching the fixed-point solve has NaN/Inf entries; "
                "the hypergradient is NaN (fix the loss above the solver)"
            )
            return torch.full_like(b, math.nan)
        with torch.enable_grad():
            u_req = u.clone().requires_grad_(True)
            f = self.T_call(u_req, ts)
            if not f.requires_grad:  # T does not depend on u: A = I
                return b.clone()
            # products with ∂_uT (or its transpose) on one graph of T(u) built here for the whole solve
            prod = make_vjp(f, u_req) if transpose else make_jvp(f, u_req)
        if prod is None:  # T's backward is not differentiable: forward-mode AD at every product
            def prod(z: Tensor) -> Tensor:
                return _jvp(lambda uu: self.T_call(uu, ts), (u,), (z,))

        def matvec(z: Tensor) -> Tensor:
            return z - prod(z)

        return self._run_solver(matvec, b, first, u, ts, x0=x0, hooks=hooks)

    def _warm_start(self, b: Tensor) -> Optional[Tensor]:
        """The adjoint warm start ``x0()`` where it fits ``b``: the same shape, or (under vmap) one
        sample's shape, then used for every sample."""
        x0 = self.x0()
        if x0 is None or x0.dtype != b.dtype or x0.device != b.device:
            return None
        if x0.shape == b.shape:
            return x0
        if self.vmap_dims and x0.shape == b.shape[self.vmap_dims:]:
            return x0.expand(b.shape)
        return None

    def _after(self, x: Tensor, u: Tensor, tensors: Sequence[Tensor]) -> None:
        assert self.after is not None
        self.after(x, u, lambda: self.samples(x, u, tensors))

    def samples(self, v: Tensor, u: Tensor, tensors: Sequence[Tensor]) -> Iterator[tuple[Tensor, Tensor, list]]:
        """The single problems of a (possibly vmapped) solve: ``(v_i, u_i, tensors_i)``, plain tensors
        with the vmap dims removed (one triple when not vmapped); ``tensors_i`` require grad where the
        hypergradient is wanted."""
        if self.parent is None:
            needs = self.needs if self.needs is not None else [True] * len(tensors)
            yield v.detach(), u.detach(), [t.detach().requires_grad_(bool(n) and t.is_floating_point())
                                           for t, n in zip(tensors, needs)]
            return
        for i in range(v.shape[0]):
            yield from self.parent.samples(v[i], u[i], _slice(i, tensors, self.dims))

    def _run_solver(self, matvec: Callable[[Tensor], Tensor], b: Tensor, first: bool, u: Tensor,
                    tensors: Sequence[Tensor], *, x0: Optional[Tensor] = None, hooks: bool = True) -> Tensor:
        solver = self.make_solver()
        if getattr(solver, "needs_symmetric", False) and not self.symmetric_checked:
            _check_symmetric(matvec, b)  # once per call, on whichever solve comes first
            self.symmetric_checked = True
        if first and self.check_unique:
            _check_nonsingular(matvec, b, solver)  # an undefined derivative is never only a warning
        if first and hooks:
            x0 = self._warm_start(b)
        if x0 is not None:  # a warm start that is worse than 0 is not used (keeps A⁻ᵀ0 = 0 exactly),
            # decided per sample under vmap
            x0 = _better_than_zero(x0, b, matvec(x0), self.vmap_dims if self.batched_solver else 0)
        x, linfo = solver(matvec, b, x0)
        if first and self.info is not None:
            self.info.adjoint = linfo
        elif self.info is not None:
            self.info.higher_solves = getattr(self.info, "higher_solves", 0) + 1
        if not linfo.converged:
            self._fail(
                f"the linear system (I - dT/du){'^T' if first else ''} v = b was not solved: {linfo.method} "
                f"stopped after {linfo.iterations} products with residual {linfo.residual:.3e} > "
                f"{linfo.threshold:.3e}. (I - dT/du) may be singular (a non-singleton fixed-point set: "
                "use hypergrad='unrolled'), or the solver needs more iterations (adjoint_maxiter) / "
                "another method (solver='gmres')"
            )
        if first and hooks and self.after is not None:
            self._after(x, u, tensors)
        return x

    # -- the first-order reverse pass (no graph kept) ---------------------------------------
    def vjp_fast(self, u: Tensor, tensors: Sequence[Tensor], g: Tensor, needs: Sequence[bool]) -> list:
        _root(self).needs = tuple(needs)
        with torch.enable_grad():
            u_req = u.detach().clone().requires_grad_(True)
            ts = [t.detach().requires_grad_(bool(n) and t.is_floating_point()) for t, n in zip(tensors, needs)]
            f = self.T_call(u_req, ts)
        g = g.detach()
        if not bool(torch.isfinite(g).all()):
            self._fail(
                "the upstream gradient dL/du* reaching the fixed-point solve has NaN/Inf entries; "
                "the hypergradient is NaN (fix the loss above the solver)"
            )
            v = torch.full_like(g, math.nan)
        elif not f.requires_grad:
            v = g
        elif self.parent is not None and not self.batched_solver:
            return self._finish(f, ts, self.solve(True, g, u, ts, first=True))
        else:
            vjp = make_vjp(f, u_req)
            return self._finish(f, ts, self._run_solver(lambda z: z - vjp(z), g, True, u.detach(), ts))
        if self.after is not None:
            self._after(v, u.detach(), ts)
        return self._finish(f, ts, v)

    @staticmethod
    def _finish(f: Tensor, ts: Sequence[Tensor], v: Tensor) -> list:
        wanted = [t for t in ts if t.requires_grad]
        if not wanted or not f.requires_grad:
            return [None] * len(ts)
        grads = iter(torch.autograd.grad(f, wanted, v, allow_unused=True))
        return [next(grads) if t.requires_grad else None for t in ts]


def _stack_linfos(infos: Sequence[ls.LinearSolveInfo]) -> ls.LinearSolveInfo:
    """The diagnostics of one solve per sample, as a batched solver reports them (per-sample
    tensors; ``residual`` / ``threshold`` of the worst sample)."""
    def per(li: ls.LinearSolveInfo, name: str, scalar: Any) -> Tensor:
        t = getattr(li, name)
        return t if t is not None else torch.tensor(scalar)

    with _plain_tensors():
        its = torch.stack([per(li, "iterations_per_sample", li.iterations) for li in infos])
        conv = torch.stack([per(li, "converged_per_sample", li.converged) for li in infos])
        res = torch.stack([per(li, "residual_per_sample", li.residual) for li in infos]).double()
        th = torch.stack([per(li, "threshold_per_sample", li.threshold) for li in infos]).double()
    worst = max(infos, key=lambda li: li.residual / li.threshold if li.threshold > 0 else math.inf)
    return ls.LinearSolveInfo(infos[0].method, int(its.max()), worst.residual, worst.threshold, bool(conv.all()),
                              iterations_per_sample=its, converged_per_sample=conv,
                              residual_per_sample=res, threshold_per_sample=th)


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


def _check_symmetric(matvec: Callable[[Tensor], Tensor], b: Tensor) -> None:
    """CG needs a symmetric A: test ``⟨a, A c⟩ = ⟨A a, c⟩`` on two random vectors (two products)."""
    gen = torch.Generator(device=b.device).manual_seed(1234)
    a = torch.randn(b.shape, generator=gen, dtype=b.dtype, device=b.device)
    c = torch.randn(b.shape, generator=gen, dtype=b.dtype, device=b.device)
    lhs, rhs = float(_vdot(a, matvec(c))), float(_vdot(matvec(a), c))
    scale = float(torch.linalg.vector_norm(a)) * float(torch.linalg.vector_norm(c))
    tol = 1e3 * torch.finfo(b.dtype).eps ** 0.75
    if abs(lhs - rhs) > tol * max(scale, 1e-300):
        raise LinearSolveError(
            "solver='cg' needs a symmetric dT/du, but <a, (I-J)c> - <(I-J)a, c> = "
            f"{lhs - rhs:.3e} for random a, c: the operator is not symmetric. Declare "
            "symmetric_jacobian = False on it, or pass solver='gmres' to the implicit/inexact mode"
        )


def _check_nonsingular(matvec: Callable[[Tensor], Tensor], b: Tensor, solver: ls.LinearSolver) -> None:
    r"""Solve :math:`A z = r` for a random :math:`r` with the adjoint's own solver and tolerance.

    When Fix T is not a singleton, :math:`A = I - \partial_u T` is singular and a random right-hand
    side has a component outside its range, so the solve cannot converge; the adjoint's own
    right-hand side may lie in the range (a *consistent* system, which Krylov solvers answer with
    the minimum-norm solution) and would not show it. Costs one more solve.
    """
    gen = torch.Generator(device=b.device).manual_seed(4321)
    r = torch.randn(b.shape, generator=gen, dtype=b.dtype, device=b.device)
    _, info = solver(matvec, r, None)
    if not info.converged:
        raise LinearSolveError(
            f"I - dT/du is singular (or too ill-conditioned for the adjoint tolerance) at the fixed point: "
            f"{info.method} could not solve (I - dT/du)^T z = r for a random r (residual {info.residual:.2e} > "
            f"{info.threshold:.2e} after {info.iterations} products). Fix T is then not a singleton and the "
            "implicit hypergradient is undefined: differentiate the (aggregated) iteration with "
            "hypergrad='unrolled' or 'truncated', as HODL does (check_unique=False skips this test)"
        )


class FixedPoint(torch.autograd.Function):
    r""":math:`u^* = \mathrm{solve}(u_0; \theta)` with implicit derivatives (see the module docstring).

    ``FixedPoint.apply(problem, u0, *tensors)``; ``u0`` gets no gradient (a fixed point does not
    depend on where the iteration started).
    """

    @staticmethod
    def forward(problem: FixedPointProblem, u0: Tensor, *tensors: Tensor) -> Tensor:  # type: ignore[override]
        extra: dict = {} if problem.slice_info is None else {"info_": problem.slice_info}
        if problem.slice_index is not None:
            extra["sample_"] = problem.slice_index
        return problem.forward(u0, tensors[: problem.n_params], **extra).clone()

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple, output: Tensor) -> None:
        problem, _u0, *tensors = inputs
        ctx.problem = problem
        ctx.save_for_backward(output, *tensors)
        ctx.save_for_forward(output, *tensors)

    @staticmethod
    def backward(ctx: Any, g: Tensor) -> tuple:  # type: ignore[override]
        problem: FixedPointProblem = ctx.problem
        u, *ts = ctx.saved_tensors
        needs = ctx.needs_input_grad[2:]
        if not torch.is_grad_enabled() and not transforms_active():
            return (None, None, *problem.vjp_fast(u, ts, g, needs))
        first = not problem.first_done
        problem.first_done = True
        _root(problem).needs = tuple(needs)
        v = LinearSolve.apply(problem, True, g, u, first, *ts)
        _, pull = torch.func.vjp(lambda *ts_: problem.T_call(u, ts_), *ts)
        grads = pull(v)
        return (None, None, *(gr if n else None for gr, n in zip(grads, needs)))

    @staticmethod
    def jvp(ctx: Any, _problem_t: Any, _u0_t: Optional[Tensor], *ts_t: Optional[Tensor]) -> Tensor:  # type: ignore[override]
        problem: FixedPointProblem = ctx.problem
        u, *ts = ctx.saved_tensors
        tangents = [torch.zeros_like(t) if d is None else d for t, d in zip(ts, ts_t)]
        rhs = _jvp(lambda *ts_: problem.T_call(u, ts_), tuple(ts), tuple(tangents))
        return LinearSolve.apply(problem, False, rhs, u, False, *ts)

    @staticmethod
    def vmap(info: Any, in_dims: tuple, problem: FixedPointProblem, u0: Tensor, *ts: Tensor) -> tuple:  # type: ignore[override]
        B = info.batch_size
        lifted = _lift(problem, in_dims[2:], forward=True, randomness=getattr(info, "randomness", "error"))
        if lifted is not None:  # one batched solve, each sample with its own stopping test
            u0_b = _to_front(u0, in_dims[1], B)
            return FixedPoint.apply(lifted, u0_b, *_to_front_all(ts, in_dims[2:])), 0
        # HODL aggregation (∇_u F would need vmapping too) or an unknown iteration: one sample at a time
        outs, infos = [], []
        for i in range(B):  # each sample solved on its own, with its own stopping test
            problem.slice_info = SolverInfo(mode=problem.info.mode) if problem.info is not None else None
            problem.slice_index = (i, B)
            try:
                outs.append(FixedPoint.apply(problem, *_slice(i, (u0, *ts), in_dims[1:])))
            finally:
                infos.append(problem.slice_info)
                problem.slice_info, problem.slice_index = None, None
        _merge_infos(problem.info, infos)
        return torch.stack(outs), 0


def _to_front(t: Tensor, d: Optional[int], B: int) -> Tensor:
    """``t`` with its vmapped dim first; an unbatched ``t`` expanded to ``B`` samples."""
    if d is None:
        return t.unsqueeze(0).expand(B, *t.shape).contiguous()
    return t.movedim(d, 0)


def _to_front_all(ts: Sequence[Tensor], dims: Sequence[Optional[int]]) -> list:
    """The tensors ``θ`` of a lifted problem: batched ones with their vmapped dim first,
    unbatched ones as they are (the lifted ``T`` reads them with ``in_dims=None``)."""
    return [t if d is None else t.movedim(d, 0) for t, d in zip(ts, dims)]


def _lift(problem: FixedPointProblem, dims: Sequence[Optional[int]], forward: bool,
          randomness: str = "error") -> Optional[FixedPointProblem]:
    r"""The batched problem of a ``vmap`` over ``problem``: one problem whose leading dim holds the
    samples, :math:`T_B(u; \theta) = \mathrm{vmap}(T)(u; \theta)`, so its Jacobians are
    block-diagonal and every derivative rule of :class:`FixedPoint` / :class:`LinearSolve` applies
    to it unchanged (outer transforms — grad, jacrev, another vmap — see one ordinary call).

    Its forward is the GKM iteration with one more ``batch_dims`` (per-sample residuals and
    stopping, converged samples frozen: :class:`~hodl_plugin.gkm._Monitor`); its linear solves run
    the solver's per-sample mode (``batch_dims=``) when it has one, else one solve per sample.

    ``None`` where the batched forward cannot apply (``forward=True`` without a known iteration, or
    with HODL aggregation, whose :math:`\nabla_u F` is not vmapped): the caller loops over samples.
    """
    it = problem.iteration
    if forward and (it is None or it.aggregates):
        return None
    in_dims = tuple(None if d is None else 0 for d in dims)

    def T_b(u: Tensor, *ts: Tensor) -> Tensor:
        return torch.vmap(lambda u_, *t_: problem.T_call(u_, t_), in_dims=(0, *in_dims),
                          randomness=randomness)(u, *ts)

    it_b = None
    if it is not None:
        it_b = copy.copy(it)
        it_b.T, it_b.batch_dims = T_b, it.batch_dims + 1
    depth = problem.vmap_dims + 1
    base = _root(problem).make_solver

    def make_solver() -> ls.LinearSolver:
        return _per_sample(base(), depth)

    def fwd(u0: Tensor, ps: Sequence[Tensor], info_: Any = None, it_: Any = None) -> Tensor:
        info_ = problem.info if info_ is None else info_
        return problem.forward(u0, ps, info_=info_, it_=it_b if it_ is None else it_)

    lifted = FixedPointProblem(
        T_b, len(dims), (), fwd, make_solver, on_fail=problem.on_fail, info=problem.info,
        check_unique=problem.check_unique, symmetric=problem.symmetric, iteration=it_b,
    )
    lifted.vmap_dims, lifted.parent, lifted.dims = depth, problem, in_dims
    # the inexact mode's hooks see the whole batch (warm starts) and its samples (error bounds)
    lifted.x0, lifted.after = problem.x0, problem.after
    lifted.batched_solver = bool(getattr(base(), "batch_dims_ok", False))
    lifted.symmetric_checked = problem.symmetric_checked
    return lifted


def _root(problem: FixedPointProblem) -> FixedPointProblem:
    while problem.parent is not None:
        problem = problem.parent
    return problem


def _per_sample(solver: ls.LinearSolver, batch_dims: int) -> ls.LinearSolver:
    """``solver`` in its per-sample mode over ``batch_dims`` leading dims (if it has one)."""
    if not getattr(solver, "batch_dims_ok", False):
        return solver

    def solve(matvec: ls.MatVec, b: Tensor, x0: Optional[Tensor] = None) -> tuple[Tensor, ls.LinearSolveInfo]:
        return solver(matvec, b, x0, batch_dims=batch_dims)  # type: ignore[call-arg]

    solve.needs_symmetric = getattr(solver, "needs_symmetric", False)  # type: ignore[attr-defined]
    return solve


def _merge_infos(into: Optional[SolverInfo], infos: Sequence[Optional[SolverInfo]]) -> None:
    """The diagnostics of a vmapped solve: per-sample steps and flags, the worst of each."""
    done = [i for i in infos if i is not None]
    if into is None or not done:
        return
    into.steps = max(i.steps for i in done)
    with _plain_tensors():  # diagnostics, not part of any transform's computation
        into.steps_per_sample = torch.tensor([int(i.steps) for i in done])
        into.converged_per_sample = torch.tensor([bool(i.converged) for i in done])
    into.converged = all(i.converged for i in done)
    into.diverged = any(i.diverged for i in done)
    worst = max(done, key=lambda i: i.residual if math.isfinite(i.residual) else math.inf)
    into.residuals, into.residual_steps, into.tol = worst.residuals, worst.residual_steps, worst.tol
    into.message = "; ".join(dict.fromkeys(i.message for i in done if i.message))
    if any(hasattr(i, "warm_started") for i in done):  # the inexact mode's flag: any sample warm-started
        into.warm_started = any(getattr(i, "warm_started", False) for i in done)  # type: ignore[attr-defined]


def _plain_tensors() -> Any:
    """A context in which new tensors are plain, not wrapped by the active torch.func transforms."""
    disable = getattr(torch._C, "_DisableFuncTorch", None)
    return disable() if disable is not None else contextlib.nullcontext()


def _slice(i: int, tensors: Sequence[Any], dims: Sequence[Optional[int]]) -> list:
    return [t if d is None or not isinstance(t, Tensor) else t.select(d, i) for t, d in zip(tensors, dims)]


class LinearSolve(torch.autograd.Function):
    r""":math:`x = A^{-\top} b` (``transpose=True``) or :math:`A^{-1} b`, :math:`A = I - \partial_u T(u; \theta)`.

    ``LinearSolve.apply(problem, transpose, b, u, first, *tensors)``; differentiable in ``b``,
    ``u`` and ``θ`` to any order, forward and reverse, and under ``vmap``.
    """

    @staticmethod
    def forward(problem, transpose, b, u, first, *ts):  # type: ignore[override]
        return problem.solve(transpose, b, u, ts, first=first)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple, output: Tensor) -> None:
        problem, transpose, _b, u, _first, *ts = inputs
        ctx.problem, ctx.transpose = problem, transpose
        ctx.save_for_backward(output, u, *ts)
        ctx.save_for_forward(output, u, *ts)

    @staticmethod
    def backward(ctx: Any, xbar: Tensor) -> tuple:  # type: ignore[override]
        problem, transpose = ctx.problem, ctx.transpose
        x, u, *ts = ctx.saved_tensors
        y = LinearSolve.apply(problem, not transpose, xbar, u, False, *ts)
        p, q = (x, y) if transpose else (y, x)

        def pairing(u_: Tensor, *ts_: Tensor) -> Tensor:  # ⟨p, ∂_uT(u_; θ_) q⟩ = ⟨∂_uTᵀ p, q⟩
            _, pull = torch.func.vjp(lambda uu: problem.T_call(uu, ts_), u_)
            return _vdot(pull(p)[0], q)

        grads = torch.func.grad(pairing, argnums=tuple(range(1 + len(ts))))(u, *ts)
        needs = ctx.needs_input_grad
        return (None, None, y if needs[2] else None, grads[0] if needs[3] else None, None,
                *(gr if n else None for gr, n in zip(grads[1:], needs[5:])))

    @staticmethod
    def jvp(  # type: ignore[override]
        ctx: Any, _p: Any, _t: Any, b_t: Optional[Tensor], u_t: Optional[Tensor], _f: Any, *ts_t: Optional[Tensor]
    ) -> Tensor:
        problem, transpose = ctx.problem, ctx.transpose
        x, u, *ts = ctx.saved_tensors
        u_t = torch.zeros_like(u) if u_t is None else u_t
        tangents = tuple(torch.zeros_like(t) if d is None else d for t, d in zip(ts, ts_t))

        def action(u_: Tensor, *ts_: Tensor) -> Tensor:  # ∂_uTᵀ x or ∂_uT x at (u_, θ_)
            if transpose:
                _, pull = torch.func.vjp(lambda uu: problem.T_call(uu, ts_), u_)
                return pull(x)[0]
            return _jvp(lambda uu: problem.T_call(uu, ts_), (u_,), (x,))

        rhs = _jvp(action, (u, *ts), (u_t, *tangents))
        if b_t is not None:
            rhs = rhs + b_t
        return LinearSolve.apply(problem, transpose, rhs, u, False, *ts)

    @staticmethod
    def vmap(info: Any, in_dims: tuple, problem, transpose, b, u, first, *ts) -> tuple:  # type: ignore[override]
        B = info.batch_size  # one batched solve (per-sample stopping when the solver has it)
        lifted = _lift(problem, in_dims[5:], forward=False, randomness=getattr(info, "randomness", "error"))
        assert lifted is not None  # a linear solve needs no iteration: it always lifts
        return LinearSolve.apply(lifted, transpose, _to_front(b, in_dims[2], B), _to_front(u, in_dims[3], B),
                                 first, *_to_front_all(ts, in_dims[5:])), 0


class ClosureAdjoint(torch.autograd.Function):
    r"""Implicit gradients for tensors that ``T`` reads from its closure (not passed as ``params``).

    ``ClosureAdjoint.apply(problem, w, u*)`` returns zeros shaped like ``w = T(u*)`` (so adding it
    leaves :math:`u^*` unchanged), and its backward turns the incoming :math:`\bar u` into
    :math:`v = A^{-\top}\bar u`, which autograd carries through ``w``'s graph: the captured tensors
    receive :math:`(\partial_\theta T)^\top v`. First order only: double backward, forward mode and
    ``torch.func`` transforms raise :class:`~hodl_plugin.errors.HODLError` (pass the tensors as
    ``params`` to get them).
    """

    @staticmethod
    def forward(problem: FixedPointProblem, w: Tensor, u: Tensor) -> Tensor:  # type: ignore[override]
        return torch.zeros_like(w)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple, output: Tensor) -> None:
        ctx.problem = inputs[0]
        ctx.save_for_backward(inputs[2])

    @staticmethod
    def backward(ctx: Any, g: Tensor) -> tuple:  # type: ignore[override]
        if torch.is_grad_enabled() or transforms_active():
            raise HODLError(_CLOSURE_MSG.format(what="double backward (create_graph=True) / torch.func"))
        (u,) = ctx.saved_tensors
        problem: FixedPointProblem = ctx.problem
        ts = [p.detach() for p in problem.closure_args]
        problem.needs = [p.requires_grad for p in problem.closure_args]
        return None, problem.solve(True, g, u, ts, first=True), None

    @staticmethod
    def jvp(ctx: Any, *tangents: Any) -> Tensor:  # type: ignore[override]
        raise HODLError(_CLOSURE_MSG.format(what="forward-mode AD"))


_CLOSURE_MSG = (
    "{what} through tensors that the operator T reads from its closure (not passed as params) is not "
    "supported: they get first-order implicit gradients only. Pass them as params, solver(u0, *params) "
    "with T(u, *params), or use hypergrad='unrolled'"
)
