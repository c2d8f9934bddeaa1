r"""``torch.func.vmap`` over the implicit primitives: one batched problem, or one sample at a time.

A vmap over :class:`~hodl_plugin.implicit.FixedPoint` (or :class:`~hodl_plugin.implicit.LinearSolve`)
*lifts* the problem (:func:`lift`): its operator becomes
:math:`T_B(u; \theta) = \mathrm{vmap}(T)(u; \theta)` over a new leading dim, so its Jacobians are
block-diagonal and every rule of the primitives applies to it unchanged (outer transforms — grad,
jacrev, another vmap — see one ordinary call). The forward is the GKM iteration with one more
``batch_dims`` (per-sample residuals and stopping); the linear solves run the solver's per-sample
mode (``batch_dims=``) when it has one, else one solve per sample (:func:`solve_per_sample`).

Where the forward cannot be lifted — HODL aggregation (its :math:`\nabla_u F` is not vmapped) or a
solver function given to a decorator — the samples are solved one at a time and their diagnostics
merged (:func:`merge_infos`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Iterator, Optional, Sequence

import torch
from torch import Tensor

from . import linear_solve as ls
from ._torch_compat import plain_tensors

if TYPE_CHECKING:  # pragma: no cover
    from .gkm import SolverInfo
    from .implicit import FixedPointProblem

__all__ = ["Batch", "lift", "fixed_point", "linear_solve", "solve_per_sample", "samples", "merge_infos"]


@dataclass(frozen=True)
class Batch:
    """What a lifted problem knows of its vmap: how many leading dims are vmap's (``depth``), the
    problem it batches (``unbatched``), the in-dims of its tensors (``dims``: 0 or None) and whether
    its linear solver has a per-sample mode."""

    depth: int
    unbatched: Any
    dims: tuple
    batched_solver: bool


def to_front(t: Tensor, d: Optional[int], B: int) -> Tensor:
    """``t`` with its vmapped dim first; an unbatched ``t`` expanded to ``B`` samples."""
    if d is None:
        return t.unsqueeze(0).expand(B, *t.shape).contiguous()
    return t.movedim(d, 0)


def to_front_all(ts: Sequence[Tensor], dims: Sequence[Optional[int]]) -> list:
    """The tensors of a lifted problem: batched ones with their vmapped dim first, unbatched ones as
    they are (the lifted operator reads them with ``in_dims=None``)."""
    return [t if d is None else t.movedim(d, 0) for t, d in zip(ts, dims)]


def slice_(i: int, tensors: Sequence[Any], dims: Sequence[Optional[int]]) -> list:
    """Sample ``i`` of each tensor (unbatched ones as they are)."""
    return [t if d is None or not isinstance(t, Tensor) else t.select(d, i) for t, d in zip(tensors, dims)]


def lift(problem: FixedPointProblem, dims: Sequence[Optional[int]], randomness: str,
         forward: bool) -> Optional[FixedPointProblem]:
    """The batched problem of a vmap over ``problem`` (module docstring); ``None`` when the forward
    cannot be lifted (``forward=True`` without a GKM iteration, or with HODL aggregation)."""
    it = problem.iteration
    if forward and (it is None or it.aggregates):
        return None
    in_dims = tuple(None if d is None else 0 for d in dims)
    op = problem.op

    def op_b(u: Tensor, ts: Sequence[Tensor]) -> Tensor:
        return torch.vmap(lambda u_, *t_: op(u_, t_), in_dims=(0, *in_dims), randomness=randomness)(u, *ts)

    it_b = None
    if it is not None and not it.aggregates:
        it_b = it.replace(T=lambda u, *ts: op_b(u, ts), batch_dims=it.batch_dims + 1)
    depth = (problem.batch.depth if problem.batch is not None else 0) + 1
    batch = Batch(depth, problem, in_dims, bool(problem.solver.batched))
    return problem.replace(op=op_b, iteration=it_b, batch=batch, sample=None)


def fixed_point(fn: Any, info: Any, in_dims: tuple, problem: FixedPointProblem, u0: Tensor,
                ts: Sequence[Tensor]) -> tuple[Tensor, int]:
    """The vmap rule of :class:`~hodl_plugin.implicit.FixedPoint` (``fn``)."""
    from .gkm import SolverInfo

    B = info.batch_size
    randomness = getattr(info, "randomness", "error")
    lifted = lift(problem, in_dims[2:], randomness, forward=True)
    if lifted is not None:  # one batched solve, each sample with its own stopping test
        return fn.apply(lifted, to_front(u0, in_dims[1], B), *to_front_all(ts, in_dims[2:])), 0
    outs, infos = [], []
    for i in range(B):  # each sample solved on its own, with its own stopping test and diagnostics
        sub = SolverInfo(mode=problem.info.mode) if problem.info is not None else None
        outs.append(fn.apply(problem.replace(forward_info=sub, sample=(i, B)), *slice_(i, (u0, *ts), in_dims[1:])))
        infos.append(sub)
    merge_infos(problem.info, infos)
    return torch.stack(outs), 0


def linear_solve(fn: Any, info: Any, in_dims: tuple, problem: FixedPointProblem, transpose: bool, role: str,
                 b: Tensor, u: Tensor, ts: Sequence[Tensor]) -> tuple[Tensor, int]:
    """The vmap rule of :class:`~hodl_plugin.implicit.LinearSolve` (``fn``): always one lifted solve."""
    B = info.batch_size
    lifted = lift(problem, in_dims[5:], getattr(info, "randomness", "error"), forward=False)
    assert lifted is not None
    return fn.apply(lifted, transpose, role, to_front(b, in_dims[3], B), to_front(u, in_dims[4], B),
                    *to_front_all(ts, in_dims[5:])), 0


def solve_per_sample(problem: FixedPointProblem, transpose: bool, role: str, b: Tensor, u: Tensor,
                     tensors: Sequence[Tensor], x0: Optional[Tensor],
                     solve_one: Callable[..., tuple[Tensor, ls.LinearSolveInfo]]) -> tuple[Tensor, ls.LinearSolveInfo]:
    """A lifted solve whose solver has no per-sample mode: one solve per sample (each with its slice
    of the warm start ``x0``), diagnostics stacked as a batched solver reports them."""
    batch = problem.batch
    assert batch is not None
    inner = batch.unbatched
    if inner.batch is not None and not inner.batch.batched_solver:  # nested vmaps: one level at a time
        def one(*args: Any) -> tuple[Tensor, ls.LinearSolveInfo]:
            return solve_per_sample(*args, solve_one)
    else:
        one = solve_one
    xs, infos = [], []
    for i in range(b.shape[0]):
        x, li = one(inner, transpose, role, b[i], u[i], slice_(i, tensors, batch.dims), None if x0 is None else x0[i])
        xs.append(x)
        infos.append(li)
    return torch.stack(xs), stack_infos(infos)


def stack_infos(infos: Sequence[ls.LinearSolveInfo]) -> ls.LinearSolveInfo:
    """The diagnostics of one solve per sample, as a batched solver reports them (per-sample tensors;
    ``residual`` / ``threshold`` of the worst sample)."""
    def per(li: ls.LinearSolveInfo, name: str, scalar: Any) -> Tensor:
        t = getattr(li, name)
        return t if t is not None else torch.tensor(scalar)

    with plain_tensors():
        its = torch.stack([per(li, "iterations_per_sample", li.iterations) for li in infos])
        conv = torch.stack([per(li, "converged_per_sample", li.converged) for li in infos])
        res = torch.stack([per(li, "residual_per_sample", li.residual) for li in infos]).double()
        th = torch.stack([per(li, "threshold_per_sample", li.threshold) for li in infos]).double()
    worst = max(infos, key=lambda li: li.residual / li.threshold if li.threshold > 0 else math.inf)
    return ls.LinearSolveInfo(infos[0].method, int(its.max()), worst.residual, worst.threshold, bool(conv.all()),
                              iterations_per_sample=its, converged_per_sample=conv,
                              residual_per_sample=res, threshold_per_sample=th)


def samples(problem: FixedPointProblem, v: Tensor, u: Tensor, tensors: Sequence[Tensor],
            needs: Optional[Sequence[bool]] = None) -> Iterator[tuple[Tensor, Tensor, list]]:
    """The single problems of a (possibly lifted) solve: ``(v_i, u_i, tensors_i)``, plain tensors with
    the vmap dims removed; ``tensors_i`` require grad where the hypergradient is wanted (``needs``,
    default ``problem.needs``)."""
    needs = problem.needs if needs is None else needs
    if problem.batch is None:
        flags = needs if needs is not None else [True] * len(tensors)
        yield v.detach(), u.detach(), [t.detach().requires_grad_(bool(n) and t.is_floating_point())
                                       for t, n in zip(tensors, flags)]
        return
    batch = problem.batch
    for i in range(v.shape[0]):
        yield from samples(batch.unbatched, v[i], u[i], slice_(i, tensors, batch.dims), needs)


def merge_infos(into: Optional[SolverInfo], infos: Sequence[Optional[SolverInfo]]) -> None:
    """The diagnostics of a vmapped solve made one sample at a time: per-sample steps and flags, the
    worst of each."""
    done = [i for i in infos if i is not None]
    if into is None or not done:
        return
    into.steps = max(i.steps for i in done)
    with plain_tensors():  # diagnostics, not part of any transform's computation
        into.steps_per_sample = torch.tensor([int(i.steps) for i in done])
        into.converged_per_sample = torch.tensor([bool(i.converged) for i in done])
    into.converged = all(i.converged for i in done)
    into.diverged = any(i.diverged for i in done)
    worst = max(done, key=lambda i: i.residual if math.isfinite(i.residual) else math.inf)
    into.residuals, into.residual_steps, into.tol = worst.residuals, worst.residual_steps, worst.tol
    into.message = "; ".join(dict.fromkeys(i.message for i in done if i.message))
    flags = [i.warm_started for i in done if i.warm_started is not None]
    if flags:  # the inexact mode's flag: any sample warm-started
        into.warm_started = any(flags)
