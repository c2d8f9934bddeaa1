r"""Pessimistic trajectory truncation (IAPTT-GM; BOAT's ``PTT``).

IAPTT-GM (Liu, Liu, Zeng and Zhang, NeurIPS 2021) differentiates a lower level without convexity
through its trajectory, truncated *pessimistically*: of the K iterates :math:`u_1, \dots, u_K` it keeps
the one with the largest upper objective,

.. math::

    k^* = \min\,\arg\max_{1 \le k \le K} F(u_k; x),\qquad
    \nabla_x \varphi(x) = \frac{d}{dx} F\big(u_{k^*}(x); x\big),

and back-propagates through the :math:`k^*` steps that produced it (:math:`k^*` held fixed: it is
piecewise constant in x). The worst iterate keeps the upper level honest about a follower that may not
have settled — the approximate problem :math:`\min_x \max_k F(u_k(x); x)` converges to the original one
without lower-level convexity (the paper's theorem). Paired with a learned initialisation
(:class:`~hodl_plugin.LearnedInit`: the paper's initialization auxiliary z, :math:`u_0 = z`), the same
backward gives :math:`\nabla_z F(u_{k^*})`.
"""

from __future__ import annotations

import itertools
import math
import warnings
from typing import Any, Hashable, Optional, Sequence

import torch
from torch import Tensor

from ._torch_compat import transforms_active
from .errors import ConfigurationError, DivergenceError, UnusedOptionWarning, user_stacklevel
from .gkm import GKMIteration, SolverInfo
from .hypergrad import HypergradMethod

__all__ = ["PTT"]


class PTT(HypergradMethod):
    r"""Back-propagation to the iterate with the largest upper objective (module docstring).

    Runs exactly K = ``max_steps`` GKM steps with autograd (HODL aggregation, inside or outside, as the
    solver is configured: BOAT's ``GDA`` + ``PTT``), evaluates the solver's ``upper`` F at every iterate
    :math:`u_1..u_K` (without autograd) and returns :math:`u_{k^*}`, the first maximiser, whose graph is
    the unrolled map :math:`(x, u_0) \mapsto u_{k^*}`: exact derivatives of that map at every order
    (``backward``, ``create_graph``, ``torch.func.grad`` / ``vmap``, where :math:`k^*` is chosen per
    sample). ``info.steps`` is :math:`k^*`.

    With ``batch_dims`` each sample b gets its own :math:`k^*_b`, the first maximiser of its own term
    :math:`F_b(u_{k,b})` along its own trajectory — as if solved alone — for an F that is the sum of
    per-sample terms (checked: an F that couples the samples raises a
    :class:`~hodl_plugin.errors.ConfigurationError`); ``info.steps_per_sample`` holds the :math:`k^*_b`,
    ``info.steps`` their largest. Reading the samples' values costs K·B evaluations of F.

    ``upper=F`` turns HODL's aggregation on (``alpha`` defaults to :math:`1/(k+1)`); IAPTT-GM's own
    trajectory is plain gradient descent: pass ``alpha=0`` to keep F for the truncation only. The
    tolerance is not used (the trajectory has K steps by definition; a nonzero ``tol``/``atol`` warns).
    Memory: the graph of :math:`k^*` steps (all K while the trajectory runs); time: K steps and K
    evaluations of F.

    Raises:
        ConfigurationError: the solver has no ``upper`` F (``upper_grad`` alone gives no values to compare),
            or ``acceleration`` is set (it runs without autograd), or (with ``batch_dims``) F is not a sum
            over the samples.
        DivergenceError: F is not finite at some iterate.

    >>> import torch, hodl_plugin as hp
    >>> T = lambda u, x: u - 0.5 * (u - x)                    # u_k = (1 - 2^-k) x from u_0 = 0
    >>> F = lambda u, x: -((u - 0.25) ** 2).sum()             # largest where u is nearest 0.25
    >>> solver = hp.GKMSolver(T, upper=F, alpha=0, max_steps=6, hypergrad="ptt")
    >>> x = torch.ones(1, dtype=torch.float64, requires_grad=True)
    >>> u = solver(torch.zeros(1, dtype=torch.float64), x)
    >>> solver.info.steps, u.detach()                         # u_1 = 0.5 is the nearest
    (1, tensor([0.5000], dtype=torch.float64))
    >>> u.backward()                                          # du_1/dx = 0.5
    >>> x.grad
    tensor([0.5000], dtype=torch.float64)
    """

    name = "ptt"
    differentiates_start = True
    needs_gkm_iterates = True

    def validate(self, it: GKMIteration) -> None:
        _require_upper(it)
        if it.acceleration is not None:
            raise ConfigurationError(
                "PTT back-propagates through the trajectory, which acceleration cannot run with autograd: "
                "pass acceleration=None"
            )
        if (it.tol is not None and it.tol > 0) or it.atol > 0:
            warnings.warn(
                "GKMSolver(tol=/atol=...) is not used with hypergrad='ptt': the trajectory has exactly max_steps "
                "steps and the returned iterate is chosen by F, not by a residual",
                UnusedOptionWarning, stacklevel=user_stacklevel(),
            )

    def run(self, it: GKMIteration, u0: Tensor, params: Sequence[Any], info: SolverInfo,
            key: Optional[Hashable] = None) -> Tensor:
        _require_upper(it)
        K = it.max_steps
        u, iterates, values = u0, [], []
        for k in range(K):
            u = it.run(u, params, info, start=k, num_steps=1, tol=0.0, atol=0.0, stop=False)
            with torch.no_grad():
                val = it.upper(u, *params)  # type: ignore[misc]
            if not isinstance(val, Tensor) or val.numel() != 1:
                raise ValueError("PTT: the upper objective F(u, *params) must return a scalar tensor")
            iterates.append(u)
            values.append(val.detach().reshape(()))
        if it.batch_dims:
            return _per_sample(it, iterates, values, params, info)
        F = torch.stack(values)
        if transforms_active():  # no host sync: the choice is a tensor (per sample under vmap)
            idx = torch.argmax(F)
            info.message = "PTT under torch.func transforms: u_{k*}, k* = argmax_k F(u_k) chosen per sample"
            return torch.stack(iterates).index_select(0, idx.reshape(1)).squeeze(0)
        finite = torch.isfinite(F)
        if not bool(finite.all()):
            bad = int((~finite).nonzero()[0]) + 1
            raise DivergenceError(
                f"PTT: the upper objective F(u_k) is not finite at step {bad} of the trajectory (of K={K}): the "
                "lower iteration diverged there or F is undefined at u_k; lower the step of T or check F"
            )
        k_star = int(torch.argmax(F)) + 1
        info.steps = k_star
        info.converged = info.converged and k_star == K
        info.message = (f"PTT returned u_{k_star}, the first of u_1..u_{K} with the largest upper objective "
                        f"F = {float(F[k_star - 1]):.6g}")
        return iterates[k_star - 1]


def _per_sample(it: GKMIteration, iterates: list[Tensor], values: list[Tensor], params: Sequence[Any],
                info: SolverInfo) -> Tensor:
    r"""With ``batch_dims``: :math:`k^*_b` of each sample b from its own values :math:`F_b(u_{k,b})`.

    F is a scalar, the batch's sum :math:`\sum_b F_b(u_b)`; a sample's values are read, up to a constant
    of the sample, by moving that sample alone along its trajectory with the others held at
    :math:`u_K`: :math:`F(u_K \text{ with row } b \leftarrow u_{k,b}) = F_b(u_{k,b}) + \text{const}_b`
    (K·B evaluations of F). That the differences add up to :math:`F(u_k) - F(u_K)` is checked: an F that
    is not a sum over the samples is refused.
    """
    bd, K = it.batch_dims, len(iterates)
    ref = iterates[-1].detach()
    batch = tuple(ref.shape[:bd])
    samples = list(itertools.product(*(range(n) for n in batch)))
    with torch.no_grad():
        rows = []
        for k in range(K):
            uk, row = iterates[k].detach(), []
            for b in samples:
                mask = torch.zeros(batch, dtype=torch.bool, device=ref.device)
                mask[b] = True
                row.append(it.upper(torch.where(mask.reshape(batch + (1,) * (ref.dim() - bd)), uk, ref),  # type: ignore[misc]
                                    *params).detach().reshape(()))
            rows.append(torch.stack(row))
        V = torch.stack(rows)  # (K, samples): F_b(u_{k,b}) + const_b
    idx = torch.argmax(V, dim=0)  # the first maximiser of each sample
    if not transforms_active():
        F = torch.stack(values)
        if not bool(torch.isfinite(V).all()) or not bool(torch.isfinite(F).all()):
            bad = int((~torch.isfinite(torch.cat([V, F[:, None]], 1))).any(1).nonzero()[0]) + 1
            raise DivergenceError(
                f"PTT: the upper objective F(u_k) is not finite at step {bad} of the trajectory (of K={K}): the lower "
                "iteration diverged there or F is undefined at u_k; lower the step of T or check F"
            )
        parts, whole = (V - V[-1]).sum(1), F - F[-1]
        scale = (V - V[-1]).abs().sum(1) + F.abs() + F[-1].abs()
        if not bool(((parts - whole).abs() <= math.sqrt(torch.finfo(F.dtype).eps) * scale).all()):
            raise ConfigurationError(
                f"PTT with batch_dims={bd} picks k* per sample, from each sample's values of F, but the upper "
                "objective is not a sum over the samples (moving one sample at a time does not add up to moving them "
                "all): F couples the samples. Return a sum of per-sample terms (e.g. F = Σ_b F_b(u_b)), or pass "
                "batch_dims=0 for one k* for the whole batch"
            )
        k_star = (idx + 1).reshape(batch)
        kmax = int(k_star.max())
        info.steps, info.steps_per_sample = kmax, k_star
        at_end = k_star == K
        per = info.converged_per_sample
        info.converged_per_sample = at_end if per is None else per & at_end
        info.converged = bool(info.converged_per_sample.all())
        info.message = (f"PTT returned u_{{k*}} per sample (batch_dims={bd}), k* = argmax_k F_b(u_k) of each "
                        f"sample along its own trajectory: info.steps_per_sample (from {int(k_star.min())} to {kmax} "
                        f"of K={K})")
        iterates = iterates[:kmax]
    else:
        info.message = "PTT under torch.func transforms: u_{k*} with k* = argmax_k F_b(u_k) chosen per sample"
    stacked = torch.stack(iterates)
    index = idx.reshape((1,) + batch + (1,) * (ref.dim() - bd)).expand((1,) + tuple(ref.shape))
    return stacked.gather(0, index).squeeze(0)


def _require_upper(it: GKMIteration) -> None:
    if it.upper is None:
        raise ConfigurationError(
            "PTT (hypergrad='ptt') picks the iterate with the largest upper objective F, so it needs F's values: "
            "pass GKMSolver(..., upper=F, alpha=0) (alpha=0 keeps F for the truncation without HODL's "
            "aggregation; upper_grad= alone gives ∇F, not F)"
        )
