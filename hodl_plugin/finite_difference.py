r"""The DARTS-style finite-difference hypergradient (BOAT's ``FD``).

For a lower level given as a loss, :math:`T(u; x) = u - s\,\nabla_u f(u; x)`, the derivative of the
last GKM step :math:`u_K = T(u_{K-1}; x)` (earlier steps held fixed, as ``Truncated(steps=1)`` does)
is

.. math::

    \bar x = -\,\partial_x\big[s\,\langle\nabla_u f(u_{K-1}; x), \bar u\rangle\big]
           = -\,s\,\nabla^2_{xu} f(u_{K-1}; x)\,\bar u \;(-\; \langle\nabla_u f, \bar u\rangle\nabla_x s),

a mixed second derivative. DARTS (Liu, Simonyan and Yang, ICLR 2019) replaces the directional
derivative by a central difference of the objective, which needs first derivatives only:

.. math::

    \langle\nabla_u f(u; x), v\rangle \approx D_f(u, v; x) =
    \frac{f(u + \epsilon v; x) - f(u - \epsilon v; x)}{2\epsilon},\qquad \epsilon = \frac{r}{\|v\|},

so :math:`\bar x = -\nabla_x[s\,D_f(u_{K-1}, \bar u; x)]`, i.e. for :math:`F` and
:math:`\bar u = \nabla_u F(u_K)` DARTS's :math:`\nabla_x F - s\,[\nabla_x f(u^+) - \nabla_x f(u^-)]/(2\epsilon)`,
:math:`u^\pm = u_{K-1}\pm\epsilon\bar u`.
The error is :math:`O(r^2)` (zero when f is quadratic in u). With the GKM options the last step is
:math:`u_K = u + \beta(v - u)` and

- no aggregation: :math:`v = T(u)`, :math:`\bar x = -\beta\,\nabla_x[s D_f(u, \bar u)]`;
- ``aggregation="outside"``: :math:`v = (1-\alpha)T(u) + \alpha(u - s_F\nabla_u F(u))`, a gradient step on
  :math:`(1-\alpha)s f + \alpha s_F F` (BOAT's ``GDA`` with ``FD``):
  :math:`\bar x = -\beta\,\nabla_x[(1-\alpha) s D_f(u, \bar u) + \alpha s_F D_F(u, \bar u)]`;
- ``aggregation="inside"``: :math:`v = T(w)`, :math:`w = u - \alpha s_F\nabla_u F(u)`:
  :math:`\bar x = -\beta\,\nabla_x[s D_f(w, \bar u) + \alpha s_F D_F(u, h)]` with
  :math:`h = \bar u - s\,[\nabla_u f(w + \epsilon\bar u) - \nabla_u f(w - \epsilon\bar u)]/(2\epsilon)`
  (the product :math:`\partial_u T(w)^\top\bar u` by a central difference too),

where :math:`D_F` is the same central difference of :math:`F` (the exact
:math:`\langle\nabla_u F, v\rangle` when ``upper_grad`` is given: it is first-order in ``upper_grad``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Hashable, Optional, Sequence

import torch
from torch import Tensor

from . import _gradient_step
from ._autodiff import grad_u, grad_wanted
from ._capture import BoundOperator, detached, flatten
from ._rule import attach
from .gkm import GKMIteration, SolverInfo
from .hypergrad import HypergradMethod

__all__ = ["FiniteDifference", "central_difference"]


def central_difference(fn: Callable[..., Tensor], p: Tensor, v: Tensor, params: Sequence[Any],
                       radius: float) -> Tensor:
    r""":math:`D(p, v) = [\mathrm{fn}(p + \epsilon v) - \mathrm{fn}(p - \epsilon v)]/(2\epsilon)`,
    :math:`\epsilon = r/\|v\|` — :math:`\langle\nabla\mathrm{fn}(p), v\rangle` to :math:`O(r^2)`, exact for a
    quadratic (0 for :math:`v = 0`). The :math:`D_f` of the module docstring.

    Args:
        fn: a scalar function ``fn(p, *params)``.
        p: the point :math:`p`.
        v: the direction :math:`v` (shaped like ``p``).
        params: the further arguments of ``fn``.
        radius: :math:`r`, the length :math:`\epsilon\|v\|` of the perturbation.

    Returns:
        The 0-d tensor :math:`D(p, v)`, differentiable w.r.t. ``params`` (the step :math:`\epsilon`
        is a constant).

    >>> import torch
    >>> fn = lambda u: (u ** 2).sum()
    >>> p, v = torch.tensor([1.0, 2.0], dtype=torch.float64), torch.tensor([3.0, 0.0], dtype=torch.float64)
    >>> round(float(central_difference(fn, p, v, [], 0.01)), 12)       # ⟨∇fn(p), v⟩ = 2·1·3
    6.0
    """
    n = torch.linalg.vector_norm(v.detach())
    eps = radius / torch.clamp(n, min=torch.finfo(n.dtype).tiny)
    return (fn(p + eps * v, *params) - fn(p - eps * v, *params)) / (2 * eps)


@dataclass(frozen=True)
class _Rule:
    """The finite-difference VJP of the last step from ``u`` (step index ``k``)."""

    it: GKMIteration
    op: BoundOperator
    objective: Callable[..., Tensor]
    step: Callable[..., Any]
    radius: float
    u: Tensor
    k: int
    method: str = "FiniteDifference"

    def _at(self, ts: Sequence[Tensor], fn: Callable[..., Any]) -> Any:
        with self.op.context(ts):
            return fn(self.op.params(ts))

    def _upper_difference(self, p: Tensor, v: Tensor, params: Sequence[Any]) -> Tensor:
        it = self.it
        if it.upper_grad is not None:  # exact and first-order in the given ∇_u F
            return (it.upper_grad(p, *params) * v).sum()
        assert it.upper is not None
        return central_difference(it.upper, p, v, params, self.radius)

    def vjp(self, g: Tensor, tensors: Sequence[Tensor], needs: Sequence[bool]) -> list[Optional[Tensor]]:
        idx = [i for i, n in enumerate(needs) if n]
        out: list[Optional[Tensor]] = [None] * len(tensors)
        if not idx:
            return out
        it, u, f, r = self.it, self.u, self.objective, self.radius
        g = g.detach()
        beta = float(it.beta(self.k))
        alpha = float(it.alpha(self.k)) if it.aggregates else 0.0  # type: ignore[misc]
        form = "plain" if alpha == 0.0 else it.aggregation
        sF = it.upper_step
        w = h = u
        if form == "inside":  # values: the shifted point and ∂_u T(w)ᵀ ū, by a central difference of ∇_u f
            with torch.no_grad():
                w = self._at(tensors, lambda ps: u - alpha * sF * it.grad_upper(u, ps))
                s0 = self._at(tensors, lambda ps: self.step(*ps))
                n = torch.linalg.vector_norm(g)
                eps = r / torch.clamp(n, min=torch.finfo(n.dtype).tiny)
                hv = self._at(tensors, lambda ps: (grad_u(f, w + eps * g, ps) - grad_u(f, w - eps * g, ps)) / (2 * eps))
                h = g - s0 * hv

        def phi(*sub: Tensor) -> Tensor:
            ts = list(tensors)
            for i, t in zip(idx, sub):
                ts[i] = t
            with self.op.context(ts):
                ps = self.op.params(ts)
                s = self.step(*ps)
                if form == "plain":
                    val = s * central_difference(f, u, g, ps, r)
                elif form == "outside":
                    val = (1 - alpha) * s * central_difference(f, u, g, ps, r) + alpha * sF * self._upper_difference(
                        u, g, ps)
                else:
                    val = s * central_difference(f, w, g, ps, r) + alpha * sF * self._upper_difference(u, h, ps)
            return -beta * val

        grads = torch.func.grad(phi, argnums=tuple(range(len(idx))))(*(tensors[i] for i in idx))
        for i, gr in zip(idx, grads):
            out[i] = gr
        return out


class FiniteDifference(HypergradMethod):
    r"""DARTS's finite-difference hypergradient (BOAT's ``FD``): one unrolled step, the mixed
    second derivative by a central difference of the lower objective (module docstring).

    The first K−1 steps run without autograd (stopping on the tolerance like every solve); the last step
    carries the derivative :math:`-\nabla_x[s D_f(u_{K-1}, \bar u)]` (its aggregated forms in the
    module docstring). First derivatives only, with no Hessian-vector product: the finite-difference
    counterpart of ``Truncated(steps=1)``, equal to it when f is quadratic in u and within
    :math:`O(r^2)` otherwise.

    Needs a lower level given as a loss: ``T = hp.GradientStep(objective=f, step=s)`` (any other
    operator is refused by name at construction, with :class:`~hodl_plugin.errors.ConfigurationError`).
    Memory: flat in K (two evaluations of f per backward; four more of :math:`\nabla_u f` and F with
    inside aggregation). Reverse mode and first order only (:mod:`hodl_plugin._rule`). ``u0`` gets no
    gradient.

    Args:
        radius: r, the length :math:`\epsilon\|\bar u\|` of the perturbation (DARTS's 0.01).

    Raises:
        ValueError: ``radius`` is not a positive finite number.
        ConfigurationError: (when the solver is built) ``T`` is not a
            :class:`~hodl_plugin.operators.GradientStep` with an objective.

    >>> import torch, hodl_plugin as hp
    >>> f = lambda u, x: 0.5 * ((u - x) ** 2).sum()                 # T(u) = u - 0.5 (u - x)
    >>> solver = hp.GKMSolver(hp.GradientStep(objective=f, step=0.5), max_steps=3, tol=0.0, hypergrad="fd")
    >>> x = torch.ones(2, dtype=torch.float64, requires_grad=True)
    >>> solver(torch.zeros(2, dtype=torch.float64), x).sum().backward()
    >>> x.grad                                                     # ∂u_3/∂x through the last step: s = 0.5
    tensor([0.5000, 0.5000], dtype=torch.float64)
    """

    name = "fd"

    def __init__(self, radius: float = 0.01) -> None:
        if isinstance(radius, bool) or not isinstance(radius, (int, float)) or not (
                math.isfinite(radius) and radius > 0):
            raise ValueError(f"FiniteDifference(radius=...) must be a positive finite number, got {radius!r}")
        self.radius = float(radius)

    def validate(self, it: GKMIteration) -> None:
        _gradient_step.parts(it.T, "FiniteDifference (hypergrad='fd')")

    def run(self, it: GKMIteration, u0: Tensor, params: Sequence[Any], info: SolverInfo,
            key: Optional[Hashable] = None) -> Tensor:
        f, s = _gradient_step.parts(it.T, "FiniteDifference (hypergrad='fd')")
        fixed = detached(params)
        with torch.no_grad():
            u = it.run(u0.detach(), fixed, info, num_steps=it.max_steps - 1).detach()
            k = info.steps
            value = it.run(u, fixed, info, start=k, num_steps=1, stop=False)
        if not grad_wanted():
            return value
        op = _gradient_step.bind_loss(it, f, s, u, params)
        rule = _Rule(it, op, f, s, self.radius, u, k)
        return attach(rule, value, [*flatten(params)[0], *op.captured])

    def __repr__(self) -> str:
        return f"FiniteDifference(radius={self.radius:g})"
