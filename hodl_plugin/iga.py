r"""The implicit gradient approximation of "Learning with constraint learning" (BOAT's ``IGA``).

The implicit hypergradient :math:`\nabla_x F - \nabla^2_{xu} f\,(\nabla^2_{uu} f)^{-1}\nabla_u F` needs the
Hessian blocks of the lower objective. IGA (Liu, Gao, Liu et al., TPAMI 2024; BOAT 1.1.1's ``IGA``)
replaces both by their Gauss–Newton rank-one models :math:`\nabla_x f\,\nabla_u f^\top` and
:math:`\nabla_u f\,\nabla_u f^\top` (a pseudo-inverse for the second), evaluated at the last iterate
:math:`u_K`; what remains is first-order:

.. math::

    \nabla_x F(u_K) - \lambda\,\nabla_x f(u_K; x),\qquad
    \lambda = \frac{\langle\nabla_u F(u_K), \nabla_u f(u_K)\rangle}{\|\nabla_u f(u_K)\|^2}.

Equivalently, the lower solution is taken to respond to x along :math:`-\nabla_u f` just enough to keep
:math:`f(x, u)` level: :math:`\partial u/\partial x = -\nabla_u f\,\nabla_x f^\top/\|\nabla_u f\|^2`, the
smallest Jacobian with :math:`\tfrac{d}{dx}f(x, u(x)) = 0`. For an upstream gradient :math:`\bar u` the
rule is :math:`\bar x = -\langle d, \bar u\rangle\,\nabla_x f(u_K; x)`, :math:`d = \nabla_u f/\|\nabla_u f\|^2`.

With ``batch_dims`` every sample b has its own multiplier, as if solved alone:
:math:`\bar x = -\sum_b \langle d_b, \bar u_b\rangle\,\nabla_x f_b(u_{K,b}; x)`,
:math:`d_b = \nabla_{u_b} f/\|\nabla_{u_b} f\|^2`, where :math:`f_b` is f evaluated on sample b alone
(``per_sample_objective`` below): f must be the sum of these, which is checked.

The multiplier is a ratio of gradients that both vanish at the lower optimum: IGA is a method for a
*few* lower steps (BOAT's use), where :math:`\nabla_u f(u_K)` is far from 0. At an iterate with
:math:`\nabla_u f(u_K) = 0` exactly it is 0/0, and :class:`~hodl_plugin.errors.HypergradientError` is
raised (BOAT's ``grad_unused_zero`` turns the NaN into a zero gradient instead).
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from typing import Any, Callable, Hashable, Optional, Sequence

import torch
from torch import Tensor

from . import _gradient_step
from ._autodiff import grad_u, grad_wanted
from ._capture import BoundOperator, detached, flatten, unflatten
from ._rule import attach
from ._torch_compat import transforms_active
from .errors import HypergradientError
from .gkm import GKMIteration, SolverInfo
from .hypergrad import HypergradMethod

__all__ = ["IGA"]

_NAME = "IGA (hypergrad='iga')"
_INSTEAD = "hypergrad='implicit' (exact at the fixed point) or 'first_order' (no implicit term)"


@dataclass(frozen=True)
class _Rule:
    r""":math:`\bar\theta = -\langle d, \bar u\rangle\,\nabla_\theta f(u_K; \theta)`."""

    op: BoundOperator
    objective: Callable[..., Tensor]
    u: Tensor
    d: Tensor
    method: str = "IGA"
    batch_dims: int = 0

    def vjp(self, g: Tensor, tensors: Sequence[Tensor], needs: Sequence[bool]) -> list[Optional[Tensor]]:
        idx = [i for i, n in enumerate(needs) if n]
        out: list[Optional[Tensor]] = [None] * len(tensors)
        if not idx:
            return out
        bd = self.batch_dims
        c = (self.d * g.detach()).sum(dim=tuple(range(bd, g.dim())))  # one multiplier per sample (a scalar)

        def phi(*sub: Tensor) -> Tensor:
            ts = list(tensors)
            for i, t in zip(idx, sub):
                ts[i] = t
            with self.op.context(ts):
                if not bd:
                    return -c * self.objective(self.u, *self.op.params(ts))
                n = self.op.n_params
                return -sum(c[b] * fb for b, fb in per_sample_objective(self.objective, self.u, bd,
                                                                        self.op.spec, ts[:n]))

        grads = torch.func.grad(phi, argnums=tuple(range(len(idx))))(*(tensors[i] for i in idx))
        for i, gr in zip(idx, grads):
            out[i] = gr
        return out


class IGA(HypergradMethod):
    r"""Implicit gradient approximation (BOAT's ``IGA``): the Gauss–Newton multiplier
    :math:`\lambda = \langle\nabla_u F, \nabla_u f\rangle/\|\nabla_u f\|^2` at the last iterate (module
    docstring), :math:`\bar x = -\langle d, \bar u\rangle\nabla_x f(u_K; x)`.

    The forward runs without autograd (memory flat in K; its stopping rule is the solver's — give a small
    ``max_steps`` with ``tol=0``, the regime the method is made for); the backward evaluates
    :math:`\nabla_x f` once. Needs a lower level given as a loss: ``T = hp.GradientStep(objective=f, step=s)``
    (any other operator is refused by name, :class:`~hodl_plugin.errors.ConfigurationError`). With HODL
    aggregation the forward aggregates and the multiplier is the lower objective's (BOAT's ``GDA`` + ``IGA``
    uses its ``gda_loss`` there instead, at a weight it never decays; see :doc:`/baselines`). Reverse mode and
    first order only (:mod:`hodl_plugin._rule`); ``u0`` gets no gradient. With ``batch_dims`` the multiplier is
    per sample (module docstring), each sample as if solved alone; the backward then evaluates f once per sample.

    Raises:
        HypergradientError: :math:`\nabla_u f(u_K) = 0` exactly (the multiplier is 0/0); with ``batch_dims``,
            an f that is not the sum of its per-sample objectives.

    >>> import torch, hodl_plugin as hp
    >>> f = lambda u, x: 0.5 * ((u - x) ** 2).sum()           # ∇_u f = u - x, ∇_x f = x - u
    >>> solver = hp.GKMSolver(hp.GradientStep(objective=f, step=0.5), max_steps=1, tol=0.0, hypergrad="iga")
    >>> x = torch.ones(2, dtype=torch.float64, requires_grad=True)
    >>> u = solver(torch.zeros(2, dtype=torch.float64), x)     # u_1 = x/2: d = (u - x)/‖u - x‖² = -(1, 1)
    >>> u.sum().backward()                                    # x̄ = -⟨d, 1⟩ (x - u) = 2 · (0.5, 0.5)
    >>> x.grad
    tensor([1., 1.], dtype=torch.float64)
    """

    name = "iga"
    needs_gkm_iterates = True  # its multiplier at a solved lower level is 0/0

    def validate(self, it: GKMIteration) -> None:
        _gradient_step.parts(it.T, _NAME, _INSTEAD)

    def run(self, it: GKMIteration, u0: Tensor, params: Sequence[Any], info: SolverInfo,
            key: Optional[Hashable] = None) -> Tensor:
        f, step = _gradient_step.parts(it.T, _NAME, _INSTEAD)
        fixed = detached(params)
        with torch.no_grad():
            u = it.run(u0.detach(), fixed, info).detach()
        if not grad_wanted():
            return u
        op = _gradient_step.bind_loss(it, f, step, u, params)
        bd = it.batch_dims
        with torch.no_grad():
            gf = grad_u(f, u, fixed)
            n2 = (gf * gf).sum(dim=tuple(range(bd, u.dim())), keepdim=True)  # per sample with batch_dims
        if not transforms_active():
            if not bool((n2 > 0).all()):
                where = "" if not bd else f" of sample(s) {(n2.flatten() == 0).nonzero().flatten().tolist()[:5]}"
                raise HypergradientError(
                    f"IGA: the lower gradient ∇_u f{where} is exactly 0 at the returned iterate (step {info.steps}), "
                    "where IGA's multiplier <∇_u F, ∇_u f>/||∇_u f||² is 0/0: IGA is made for a few lower steps "
                    "(max_steps=K small, tol=0); at a solved lower level use hypergrad='implicit'"
                )
            if bd:
                _check_separable(f, u, bd, fixed)
        rule = _Rule(op, f, u, gf / n2, batch_dims=bd)
        return attach(rule, u, [*flatten(params)[0], *op.captured])


def per_sample_objective(f: Callable[..., Tensor], u: Tensor, batch_dims: int, spec: Any,
                         leaves: Sequence[Tensor]) -> list[tuple[tuple[int, ...], Tensor]]:
    r"""``[(b, f_b), ...]``: f evaluated on each sample b alone, as a batch of one — u's row b, row b of
    every parameter whose leading ``batch_dims`` sizes are the batch's (the sample's own data), every
    other parameter (and every tensor f reads from its closure) whole (shared by the samples).

    >>> f = lambda u, x, w: 0.5 * (w * (u - x) ** 2).sum()
    >>> u, x, w = torch.zeros(2, 3), torch.ones(2, 3), torch.tensor(2.0)
    >>> [(b, float(fb)) for b, fb in per_sample_objective(f, u, 1, flatten([x, w])[1], [x, w])]
    [((0,), 3.0), ((1,), 3.0)]
    """
    batch = tuple(u.shape[:batch_dims])
    own = [t.dim() >= batch_dims and tuple(t.shape[:batch_dims]) == batch for t in leaves]
    out = []
    for b in itertools.product(*(range(n) for n in batch)):
        rows = tuple(slice(i, i + 1) for i in b)
        params = unflatten(spec, [t[rows] if o else t for t, o in zip(leaves, own)])
        out.append((b, f(u[rows], *params)))
    return out


def _check_separable(f: Callable[..., Tensor], u: Tensor, batch_dims: int, params: Sequence[Any]) -> None:
    """f is the sum of its per-sample objectives (``per_sample_objective``), to rounding, or a
    :class:`~hodl_plugin.errors.HypergradientError` says what to do instead."""
    leaves, spec = flatten(params)
    with torch.no_grad():
        whole = f(u, *params)
        parts = [fb for _, fb in per_sample_objective(f, u, batch_dims, spec, leaves)]
    total = float(sum(parts))
    scale = abs(float(whole)) + sum(abs(float(p)) for p in parts)
    if abs(float(whole) - total) <= math.sqrt(torch.finfo(u.dtype).eps) * scale:
        return
    raise HypergradientError(
        f"IGA with batch_dims={batch_dims}: the lower objective is not the sum of its samples' objectives "
        f"(f(u, *params) = {float(whole):.6g}, but f evaluated on each sample alone sums to {total:.6g}), and IGA's "
        "multiplier is per sample, so it needs each sample's ∇_x f_b. A sample's objective is f on a batch of one: "
        "u's row b, row b of each parameter whose leading dims are the batch's, the other parameters whole. Write f "
        "so (per-sample terms summed over the batch; a term shared by the samples, such as a regulariser of x, "
        "does not split), or solve the samples with torch.func.vmap (f written for one sample), or use "
        "batch_dims=0 for one multiplier over the whole batch"
    )
