r"""A-posteriori error bound of the inexact implicit hypergradient (ISGD / MAID, SPEC §3.2).

The inexact mode stops the forward iteration when the fixed-point residual satisfies
:math:`\|\tilde u - T(\tilde u; x)\| \le \varepsilon` and the adjoint solve when
:math:`\|(I - J_u^\top)\tilde v - \nabla_u F(\tilde u)\| \le \delta`, with
:math:`J_u = \partial_u T(\tilde u; x)`, :math:`J_x = \partial_x T(\tilde u; x)`. If
:math:`\rho = \|J_u\| < 1` then :math:`\|\tilde u - u^*\| \le \varepsilon/(1-\rho)` and

.. math::

    \|\tilde g - \nabla f(x)\| \;\le\; c_1\varepsilon + c_2\delta + c_3\varepsilon^2,\qquad
    c_2 = \frac{\|J_x\|}{1-\rho},\quad
    c_1 = \frac{\|J_x\| L_F}{(1-\rho)^2} + \frac{L_{xF}}{1-\rho}
          + \frac{L_J\,\|\tilde v\|}{1-\rho}\Big(1 + \frac{\|J_x\|}{1-\rho}\Big),

with :math:`L_F` the Lipschitz constant of :math:`u\mapsto\nabla_u F`, :math:`L_{xF}` that of
:math:`u\mapsto\nabla_x F`, and :math:`L_J` that of :math:`u\mapsto \partial T(u; x)` (zero for an
operator affine in u). This is the fixed-point form of the Ehrhardt–Roberts bound coded in MAID's
``bound``. When estimated (the default), :math:`\rho, \|J_x\|, L_F, L_{xF}` come from power
iterations on Jacobian/Hessian–vector products at :math:`\tilde u` (running maxima over calls, as in
MAID) and :math:`L_J = c_3 = 0`: the bound is then exact for operators affine in u with a quadratic F
(SPEC T1) and a first-order estimate otherwise. Pass :class:`BoundConstants` to use known values.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Sequence

import torch
from torch import Tensor

__all__ = ["BoundConstants", "operator_norm", "estimate_constants"]


@dataclass(frozen=True)
class BoundConstants:
    r"""Constants of the bound :math:`c_1\varepsilon + c_2\delta + c_3\varepsilon^2`.

    >>> c = BoundConstants(rho=0.5, jx_norm=1.0, lip_upper=2.0)
    >>> c.c2, c.c1
    (2.0, 8.0)
    >>> c.bound(1e-3, 1e-4)
    0.0082
    """

    rho: float
    jx_norm: float
    lip_upper: float
    lip_cross: float = 0.0
    lip_jac: float = 0.0
    v_norm: float = 0.0
    c3: float = 0.0

    @property
    def c2(self) -> float:
        return self.jx_norm / (1 - self.rho) if self.rho < 1 else math.inf

    @property
    def c1(self) -> float:
        if self.rho >= 1:
            return math.inf
        d = 1 - self.rho
        return (
            self.jx_norm * self.lip_upper / d**2
            + self.lip_cross / d
            + self.lip_jac * self.v_norm / d * (1 + self.jx_norm / d)
        )

    def bound(self, eps: float, delta: float) -> float:
        """:math:`c_1\\varepsilon + c_2\\delta + c_3\\varepsilon^2`."""
        if self.rho >= 1:
            return math.inf
        return self.c1 * eps + self.c2 * delta + self.c3 * eps**2

    def running_max(self, other: BoundConstants) -> BoundConstants:
        """Elementwise maximum of the estimated constants (MAID keeps running maxima)."""
        return BoundConstants(
            rho=max(self.rho, other.rho),
            jx_norm=max(self.jx_norm, other.jx_norm),
            lip_upper=max(self.lip_upper, other.lip_upper),
            lip_cross=max(self.lip_cross, other.lip_cross),
            lip_jac=max(self.lip_jac, other.lip_jac),
            v_norm=other.v_norm,
            c3=max(self.c3, other.c3),
        )


def operator_norm(out: Tensor, inputs: Sequence[Tensor], iters: int = 20, seed: int = 0) -> float:
    r"""Spectral norm of the Jacobian :math:`J = \partial\,\mathrm{out}/\partial\,\mathrm{inputs}`.

    Power iteration on :math:`J^\top J`; the products :math:`J^\top y` are vector–Jacobian
    products and :math:`J w` the "double-vjp" :math:`\partial_y \langle J^\top y, w\rangle`, so any
    autograd graph works (module parameters included) without ``functional_call``. ``out`` must have
    been computed with a graph to ``inputs`` (``create_graph=True`` if it is itself a gradient).
    A lower estimate: exact in the limit of many iterations.

    >>> import torch
    >>> A = torch.diag(torch.tensor([3.0, 1.0], dtype=torch.float64))
    >>> x = torch.ones(2, dtype=torch.float64, requires_grad=True)
    >>> round(operator_norm(A @ x, [x]), 6)
    3.0
    """
    inputs = list(inputs)
    y = torch.zeros_like(out, requires_grad=True)
    with torch.enable_grad():
        jt = torch.autograd.grad(out, inputs, y, create_graph=True, allow_unused=True)
    used = [(i, g) for i, g in enumerate(jt) if g is not None and g.requires_grad]
    if not used:
        return 0.0
    gen = torch.Generator(device="cpu").manual_seed(seed)
    w = [torch.randn(inputs[i].shape, generator=gen, dtype=inputs[i].dtype).to(inputs[i].device) for i, _ in used]
    nrm = torch.sqrt(sum((t * t).sum() for t in w))
    w = [t / nrm for t in w]
    sigma2 = 0.0
    for _ in range(iters):
        (jw,) = torch.autograd.grad([g for _, g in used], y, w, retain_graph=True)
        jtjw = torch.autograd.grad(out, [inputs[i] for i, _ in used], jw, retain_graph=True, allow_unused=True)
        jtjw = [torch.zeros_like(inputs[i]) if t is None else t for (i, _), t in zip(used, jtjw)]
        nrm = torch.sqrt(sum((t * t).sum() for t in jtjw))
        sigma2 = float(nrm)
        if sigma2 == 0.0 or not math.isfinite(sigma2):
            break
        w = [t / nrm for t in jtjw]
    return math.sqrt(sigma2)


def estimate_constants(
    T,
    upper,
    u: Tensor,
    params: Sequence[Tensor],
    learned: Sequence[Tensor],
    v: Tensor,
    iters: int = 20,
) -> BoundConstants:
    """Estimate :class:`BoundConstants` at ``u`` by power iterations (see the module docstring).

    ``learned`` are the tensors the hypergradient is taken with respect to (explicit params that
    require grad and the operator's trainable parameters); ``upper`` may be ``None`` when only
    ``∇_u F`` is known, in which case ``L_F`` is estimated as 0 and should be supplied.
    """
    with torch.enable_grad():
        u_ = u.detach().requires_grad_(True)
        out = T(u_, *params)
        rho = operator_norm(out, [u_], iters)
        jx = operator_norm(out, list(learned), iters) if learned else 0.0
        lip_u = lip_x = 0.0
        if upper is not None:
            (gu,) = torch.autograd.grad(upper(u_, *params).sum(), u_, create_graph=True)
            lip_u = operator_norm(gu, [u_], iters)
            xs = [p for p in params if p.requires_grad]
            if xs:
                u2 = u.detach().requires_grad_(True)
                gx = torch.autograd.grad(upper(u2, *params).sum(), xs, create_graph=True, allow_unused=True)
                gx_used = [g for g in gx if g is not None and g.requires_grad]
                if gx_used:
                    flat = torch.cat([g.reshape(-1) for g in gx_used])
                    lip_x = operator_norm(flat, [u2], iters)
    return BoundConstants(rho=rho, jx_norm=jx, lip_upper=lip_u, lip_cross=lip_x, v_norm=float(v.norm()))


def with_v_norm(c: BoundConstants, v: Tensor) -> BoundConstants:
    """Copy of ``c`` with ``v_norm = ‖v‖``."""
    return replace(c, v_norm=float(torch.linalg.vector_norm(v)))
