r"""The certified a-posteriori error bound of the inexact implicit hypergradient (ISGD / MAID,
:ref:`the bound <math-bound>`).

The inexact mode returns the forward iterate :math:`z = \tilde u` and solves
the adjoint system :math:`(I - J_u^\top)\tilde v = \nabla_u F(z)` to a residual
:math:`\delta = \|(I - J_u^\top)\tilde v - \nabla_u F(z)\|`, with :math:`J_u = \partial_u T`,
:math:`J_x = \partial_x T`; the hypergradient is :math:`\tilde g = \nabla_x F(z) + J_x^\top\tilde v`.
Let :math:`\varepsilon = \|z - T(z)\|` and :math:`\sigma \le \sigma_{\min}(I - J_u)`. When T is affine
in u with :math:`\partial_x T` independent of u and F is quadratic in u,
:math:`z - u^* = (I - J_u)^{-1}(z - T(z))` and

.. math::

    \|\tilde g - \nabla f(x)\| \;\le\; c_1\varepsilon + c_2\delta,\qquad
    c_2 = \frac{\|J_x\|}{\sigma},\quad
    c_1 = \frac{\|J_x\|\,L_F}{\sigma^2} + \frac{L_{xF}}{\sigma},

with :math:`L_F = \|\nabla^2_{uu}F\|`, :math:`L_{xF} = \|\partial_u\nabla_x F\|`. For a contraction,
:math:`\sigma \ge 1 - \rho` with :math:`\rho = \|J_u\|` (the Ehrhardt–Roberts form coded in MAID's
``bound``, :class:`BoundConstants` with ``rho``); the general nonlinear case adds the terms in
:math:`L_J` (Lipschitz constant of :math:`u\mapsto\partial T`) and :math:`c_3\varepsilon^2`.

**What is certified.** No finite number of matrix–vector products can bound :math:`\|J\|` from
above or :math:`\sigma_{\min}` from below for every matrix (a deterministic start vector can miss an
eigenvector). :func:`a_posteriori` therefore runs Lanczos with a *random* start and full
reorthogonalisation, and turns its Ritz values :math:`\theta` into an interval that contains the
spectrum with probability :math:`\ge 1-p` over that start (Kuczyński & Woźniakowski 1992, Thm 4.2:
:math:`P[\lambda_{\max} - \theta_{\max} > \epsilon(\lambda_{\max} - \lambda_{\min})] \le 1.648\sqrt n\,
e^{-(2k-1)\sqrt\epsilon}` after k products, applied to :math:`A - \lambda_{\min}I` and
:math:`\lambda_{\max}I - A`). When the Krylov space is exhausted (dimension n reached, or an invariant
subspace) the interval is exact up to rounding. The resulting ``bound`` is returned only when every
interval is certified and T, F have the structure above (checked on the autograd graph); otherwise
``bound`` is ``None`` and the message says why, while ``estimate`` (the same formula with the Ritz
values) is always given and is *not* a bound.

>>> import torch
>>> Q = torch.diag(torch.tensor([1.0, 1e-3], dtype=torch.float64))
>>> T = lambda u, x: u - (Q @ u - x)                  # I - J_u = Q, sigma_min = 1e-3
>>> x = torch.ones(2, dtype=torch.float64, requires_grad=True)
>>> F = lambda u, x: 0.5 * (u ** 2).sum()
>>> u = torch.linalg.solve(Q, x.detach()) + 1e-6      # an inexact fixed point
>>> v = torch.linalg.solve(Q, T(u, x).detach())       # exact adjoint at z = T(u)
>>> rep = a_posteriori(T, F, u, [x], [x], v)
>>> rep.exact, round(rep.constants.sigma_min, 6), rep.bound >= rep.estimate > 0
(True, 0.001, True)
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Callable, Optional, Sequence

import torch
from torch import Tensor

__all__ = [
    "BoundConstants",
    "ErrorReport",
    "SpectralInterval",
    "lanczos_interval",
    "operator_norm",
    "estimate_constants",
    "a_posteriori",
    "residuals_at",
    "with_v_norm",
]


@dataclass(frozen=True)
class BoundConstants:
    r"""Constants of the bound :math:`c_1\varepsilon + c_2\delta + c_3\varepsilon^2`.

    The gap :math:`\sigma` is ``sigma_min`` (a lower bound on :math:`\sigma_{\min}(I - \partial_u T)`)
    when given, else :math:`1 - \rho` with :math:`\rho \ge \|\partial_u T\|`. The bound is a bound
    only if the constants are: ``sigma_min``/``1 - rho`` a lower bound, the others upper bounds.
    :math:`c_1` and :math:`c_2` are those of :ref:`the bound <math-bound>` (the module docstring), with the terms
    in :math:`L_J` of a nonlinear T added to :math:`c_1`.

    Attributes:
        rho: :math:`\rho \ge \|\partial_u T\|` (contraction rate; ``nan`` when ``sigma_min`` is given).
        jx_norm: :math:`\|J_x\| = \|\partial_x T\|` (an upper bound).
        lip_upper: :math:`L_F = \|\nabla^2_{uu} F\|`.
        lip_cross: :math:`L_{xF} = \|\partial_u \nabla_x F\|`.
        lip_jac: :math:`L_J`, the Lipschitz constant of :math:`u \mapsto \partial T(u)` (0 for affine T).
        v_norm: :math:`\|\tilde v\|`, the adjoint's norm (it multiplies :math:`L_J`).
        c3: the coefficient of :math:`\varepsilon^2`.
        sigma_min: :math:`\sigma \le \sigma_{\min}(I - \partial_u T)`, or ``None`` (then :math:`1 - \rho`).

    >>> c = BoundConstants(rho=0.5, jx_norm=1.0, lip_upper=2.0)
    >>> c.c2, c.c1
    (2.0, 8.0)
    >>> c.bound(1e-3, 1e-4)
    0.0082
    >>> BoundConstants(rho=math.nan, jx_norm=1.0, lip_upper=2.0, sigma_min=0.5).c1
    8.0
    """

    rho: float
    jx_norm: float
    lip_upper: float
    lip_cross: float = 0.0
    lip_jac: float = 0.0
    v_norm: float = 0.0
    c3: float = 0.0
    sigma_min: Optional[float] = None

    @property
    def gap(self) -> float:
        """:math:`\\sigma`: ``sigma_min`` if given, else ``1 - rho`` (``<= 0``: no bound)."""
        d = float(self.sigma_min if self.sigma_min is not None else 1.0 - self.rho)
        return d if math.isfinite(d) else -1.0

    @property
    def c2(self) -> float:
        d = self.gap
        return self.jx_norm / d if d > 0 else math.inf

    @property
    def c1(self) -> float:
        d = self.gap
        if d <= 0:
            return math.inf
        return (
            self.jx_norm * self.lip_upper / d**2
            + self.lip_cross / d
            + self.lip_jac * self.v_norm / d * (1 + self.jx_norm / d)
        )

    def bound(self, eps: float, delta: float) -> float:
        """:math:`c_1\\varepsilon + c_2\\delta + c_3\\varepsilon^2` (``inf`` when the gap is not positive)."""
        if self.gap <= 0:
            return math.inf
        return self.c1 * eps + self.c2 * delta + self.c3 * eps**2

    def running_max(self, other: BoundConstants) -> BoundConstants:
        """Worst case of two sets of constants (maxima of the norms, minimum of the gap)."""
        sig = None
        if self.sigma_min is not None and other.sigma_min is not None:
            sig = min(self.sigma_min, other.sigma_min)
        return BoundConstants(
            rho=max(self.rho, other.rho),
            jx_norm=max(self.jx_norm, other.jx_norm),
            lip_upper=max(self.lip_upper, other.lip_upper),
            lip_cross=max(self.lip_cross, other.lip_cross),
            lip_jac=max(self.lip_jac, other.lip_jac),
            v_norm=other.v_norm,
            c3=max(self.c3, other.c3),
            sigma_min=sig,
        )


def with_v_norm(c: BoundConstants, v: Tensor) -> BoundConstants:
    r"""Copy of ``c`` with ``v_norm = ‖v‖``.

    Args:
        c: the constants.
        v: the adjoint solution :math:`\tilde v`.

    Returns:
        A new :class:`BoundConstants` (``c`` is frozen).

    >>> import torch
    >>> with_v_norm(BoundConstants(rho=0.5, jx_norm=1.0, lip_upper=2.0), torch.tensor([3.0, 4.0])).v_norm
    5.0
    """
    return replace(c, v_norm=float(torch.linalg.vector_norm(v)))


# --------------------------------------------------------------------------------------------
# certified spectral intervals
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SpectralInterval:
    r"""Where the spectrum of a symmetric operator lies, from k Lanczos steps.

    ``lo <= λ_min`` and ``λ_max <= hi`` hold with probability ``>= 1 - fail_prob`` over the random
    start (deterministically, up to rounding, when ``exact``); ``ritz_min``/``ritz_max`` are the
    extreme Ritz values (estimates, inside the true range). Made by :func:`lanczos_interval`.

    Attributes:
        lo, hi: the certified interval :math:`[\mathrm{lo}, \mathrm{hi}] \supset [\lambda_{\min}, \lambda_{\max}]`.
        ritz_min, ritz_max: the extreme Ritz values :math:`\theta_{\min}, \theta_{\max}`.
        steps: the Lanczos steps (matrix products) taken.
        exact: the Krylov space was exhausted (the interval holds up to rounding, not by chance).
        fail_prob: the probability that the interval misses the spectrum (0 when ``exact``).

    >>> import torch
    >>> A = torch.diag(torch.tensor([-3.0, 1.0], dtype=torch.float64))
    >>> iv = lanczos_interval(lambda w: A @ w, 2)
    >>> iv.exact, round(iv.abs_max(), 9), iv.distance_to_zero()    # the interval [-3, 1] holds 0
    (True, 3.0, 0.0)
    """

    lo: float
    hi: float
    ritz_min: float
    ritz_max: float
    steps: int
    exact: bool
    fail_prob: float

    def distance_to_zero(self) -> float:
        """Certified lower bound on :math:`\\min_i|\\lambda_i|` (0 if the interval contains 0)."""
        if self.lo > 0:
            return self.lo
        if self.hi < 0:
            return -self.hi
        return 0.0

    def abs_max(self) -> float:
        """Certified upper bound on :math:`\\max_i|\\lambda_i|`."""
        return max(abs(self.lo), abs(self.hi))


def _kw_eps(n: int, k: int, p: float) -> float:
    """Relative Lanczos accuracy certified after k products (Kuczyński–Woźniakowski), or inf."""
    m = k - 1  # conservative: one product fewer than used
    if m < 1 or p <= 0:
        return math.inf
    e = (math.log(1.648 * math.sqrt(n) / p) / (2 * m - 1)) ** 2
    return e if e < 0.5 else math.inf


def _tridiag_extremes(alphas: list[float], betas: list[float]) -> tuple[float, float]:
    """Smallest and largest eigenvalue of the symmetric tridiagonal (alphas; betas)."""
    try:
        from scipy.linalg import eigvalsh_tridiagonal
    except ImportError:  # scipy is optional: a dense symmetric eigensolver
        Tk = torch.diag(torch.tensor(alphas, dtype=torch.float64))
        if betas:
            off = torch.tensor(betas, dtype=torch.float64)
            Tk = Tk + torch.diag(off, 1) + torch.diag(off, -1)
        ev = torch.linalg.eigvalsh(Tk)
        return float(ev[0]), float(ev[-1])
    k = len(alphas)
    if k == 1:
        return alphas[0], alphas[0]
    lo = eigvalsh_tridiagonal(alphas, betas, select="i", select_range=(0, 0))
    hi = eigvalsh_tridiagonal(alphas, betas, select="i", select_range=(k - 1, k - 1))
    return float(lo[0]), float(hi[0])


def lanczos_interval(
    matvec: Callable[[Tensor], Tensor],
    n: int,
    *,
    dtype: torch.dtype = torch.float64,
    device: Optional[torch.device] = None,
    fail_prob: float = 1e-4,
    maxiter: int = 200,
    need_min: bool = True,
    seed: int = 0,
) -> SpectralInterval:
    r"""A certified interval for the spectrum of a symmetric ``matvec`` on :math:`\mathbb R^n`.

    Lanczos with a Gaussian start and full reorthogonalisation. After k steps with extreme Ritz
    values :math:`\theta_{\min}\le\theta_{\max}` and :math:`W = \theta_{\max}-\theta_{\min}`, with
    :math:`\epsilon_k = (\ln(1.648\sqrt n/q)/(2k-3))^2` and :math:`q = p/2`:
    :math:`\lambda_{\max}-\lambda_{\min}\le W/(1-2\epsilon_k)` and
    :math:`[\lambda_{\min},\lambda_{\max}] \subset [\theta_{\min}-\epsilon_k D,\ \theta_{\max}+\epsilon_k D]`
    with probability :math:`\ge 1-p` (no definiteness assumed). Stops when the space is exhausted
    (exact), when the interval is within a factor 2 of the Ritz values (``need_min``: of the
    smallest one's distance to 0; else of the largest modulus), or after ``maxiter`` products.

    Args:
        matvec: ``w -> A w`` for a symmetric :math:`A` on flat vectors of length ``n``.
        n: the dimension.
        dtype, device: of the Lanczos vectors.
        fail_prob: :math:`p`, the failure probability of the certificate.
        maxiter: the most products (memory: ``maxiter`` vectors of length ``n``).
        need_min: stop on the accuracy of the smallest modulus (for :math:`\sigma_{\min}`) rather
            than of the largest.
        seed: seed of the Gaussian start.

    Returns:
        The :class:`SpectralInterval` (``lo = -inf, hi = inf`` when a product is not finite or the
        products ran out before the certificate's :math:`\epsilon_k` was below 1/2).

    >>> import torch
    >>> A = torch.diag(torch.tensor([1e-4, 0.5, 2.0], dtype=torch.float64))
    >>> iv = lanczos_interval(lambda w: A @ w, 3)
    >>> iv.exact, abs(iv.lo - 1e-4) < 1e-12, abs(iv.hi - 2.0) < 1e-12
    (True, True, True)
    """
    if n < 1:
        return SpectralInterval(0.0, 0.0, 0.0, 0.0, 0, True, 0.0)
    gen = torch.Generator(device="cpu").manual_seed(seed)
    kmax = max(1, min(int(maxiter), n))
    basis = torch.zeros(kmax + 1, n, dtype=dtype, device=device)
    q = torch.randn(n, generator=gen, dtype=dtype).to(device)
    basis[0] = q / torch.linalg.vector_norm(q)
    alphas: list[float] = []
    betas: list[float] = []
    unit = torch.finfo(dtype).eps
    scale = 0.0
    result: Optional[SpectralInterval] = None
    for k in range(1, kmax + 1):
        qk = basis[k - 1]
        w = matvec(qk).reshape(-1).to(dtype)
        if not bool(torch.isfinite(w).all()):
            return SpectralInterval(-math.inf, math.inf, math.nan, math.nan, k, False, fail_prob)
        a = float(torch.dot(qk, w))
        alphas.append(a)
        Qk = basis[:k]
        for _ in range(2):  # classical Gram-Schmidt twice against the whole basis
            w = w - Qk.T @ (Qk @ w)
        b = float(torch.linalg.vector_norm(w))
        scale = max(scale, abs(a), b)
        margin = 10.0 * (n + k) * unit * max(scale, 1e-300)
        exhausted = k == n or b <= margin
        if exhausted or k == kmax or k % max(5, k // 8) == 0:
            tmin, tmax = _tridiag_extremes(alphas, betas)
            if exhausted:
                result = SpectralInterval(tmin - margin, tmax + margin, tmin, tmax, k, True, 0.0)
                break
            e = _kw_eps(n, k, fail_prob / 2)
            if math.isfinite(e):
                spread = (tmax - tmin) / (1 - 2 * e) + 2 * margin
                lo, hi = tmin - e * spread - margin, tmax + e * spread + margin
            else:
                lo, hi = -math.inf, math.inf
            result = SpectralInterval(lo, hi, tmin, tmax, k, False, fail_prob)
            if need_min:
                est = tmin if tmin > 0 else (-tmax if tmax < 0 else 0.0)
                if est > 0 and result.distance_to_zero() >= 0.5 * est:
                    break
            elif math.isfinite(hi) and result.abs_max() <= 1.25 * max(abs(tmin), abs(tmax)):
                break
        betas.append(b)
        basis[k] = w / b
    assert result is not None
    return result


# --------------------------------------------------------------------------------------------
# products with Jacobians of autograd graphs
# --------------------------------------------------------------------------------------------


def _flat(ts: Sequence[Tensor]) -> Tensor:
    return torch.cat([t.reshape(-1) for t in ts]) if ts else torch.zeros(0)


def _split(w: Tensor, like: Sequence[Tensor]) -> list[Tensor]:
    out, i = [], 0
    for t in like:
        out.append(w[i : i + t.numel()].reshape(t.shape).to(t.dtype))
        i += t.numel()
    return out


class _Jac:
    """The Jacobian of ``outs`` w.r.t. ``ins`` on a built graph: ``J w`` (double vjp) and ``Jᵀ y``."""

    def __init__(self, outs: Sequence[Tensor], ins: Sequence[Tensor]) -> None:
        self.outs = [o for o in outs]
        self.ins = list(ins)
        self.ys = [torch.zeros_like(o, requires_grad=True) for o in self.outs]
        jt = torch.autograd.grad(self.outs, self.ins, self.ys, create_graph=True, allow_unused=True)
        self.jt = [g for g in jt if g is not None and g.requires_grad]
        self.jt_idx = [i for i, g in enumerate(jt) if g is not None and g.requires_grad]
        self.n_in = sum(t.numel() for t in self.ins)
        self.n_out = sum(o.numel() for o in self.outs)

    @property
    def zero(self) -> bool:
        return not self.jt

    def t(self, y: Tensor) -> Tensor:
        """:math:`J^\\top y` (flat)."""
        g = torch.autograd.grad(self.outs, self.ins, _split(y, self.outs), retain_graph=True, allow_unused=True)
        return _flat([torch.zeros_like(i) if gi is None else gi for i, gi in zip(self.ins, g)])

    def __call__(self, w: Tensor) -> Tensor:
        """:math:`J w` (flat)."""
        ws = _split(w, self.ins)
        g = torch.autograd.grad(self.jt, self.ys, [ws[i] for i in self.jt_idx], retain_graph=True, allow_unused=True)
        return _flat([torch.zeros_like(y) if gi is None else gi for y, gi in zip(self.ys, g)])

    def norm(self, **kw) -> SpectralInterval:
        """Interval for the singular values squared, on the smaller side (JᵀJ or JJᵀ)."""
        dt, dev = self.ins[0].dtype, self.ins[0].device
        if self.zero:
            return SpectralInterval(0.0, 0.0, 0.0, 0.0, 0, True, 0.0)
        if self.n_in <= self.n_out:
            return lanczos_interval(lambda w: self.t(self(w)), self.n_in, dtype=dt, device=dev, need_min=False, **kw)
        return lanczos_interval(lambda y: self(self.t(y)), self.n_out, dtype=dt, device=dev, need_min=False, **kw)


def operator_norm(out: Tensor, inputs: Sequence[Tensor], iters: int = 20, seed: int = 0) -> float:
    r"""Estimate of the spectral norm of :math:`\partial\,\mathrm{out}/\partial\,\mathrm{inputs}`.

    The largest Ritz value of ``iters`` Lanczos steps on :math:`J^\top J`: a *lower* estimate
    (exact when the space is exhausted). :func:`a_posteriori` uses the certified upper end instead.

    Args:
        out: a tensor on an autograd graph.
        inputs: the tensors it is differentiated w.r.t. (requiring grad).
        iters: the most Lanczos steps.
        seed: seed of the random start.

    Returns:
        :math:`\sqrt{\theta_{\max}(J^\top J)}` (a float, ``<=`` the true norm up to rounding).

    >>> import torch
    >>> A = torch.diag(torch.tensor([3.0, 1.0], dtype=torch.float64))
    >>> x = torch.ones(2, dtype=torch.float64, requires_grad=True)
    >>> round(operator_norm(A @ x, [x]), 6)
    3.0
    """
    with torch.enable_grad():
        J = _Jac([out], list(inputs))
        iv = J.norm(maxiter=iters, seed=seed)
    return math.sqrt(max(iv.ritz_max, 0.0))


# --------------------------------------------------------------------------------------------
# the a-posteriori bound
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ErrorReport:
    r"""Result of :func:`a_posteriori`.

    Attributes:
        bound: :math:`\ge \|\tilde g - \nabla f(x)\|` with probability :math:`\ge 1 -` ``fail_prob``
            (deterministic up to rounding when ``exact``); ``None`` when it cannot be certified
            (``message`` says why).
        estimate: the same formula with the Ritz values — an estimate, not a bound.
        exact: every spectral interval came from an exhausted Krylov space.
        fail_prob: the failure probability of ``bound`` (0 when ``exact``).
        constants: the certified constants (``sigma_min`` a lower bound, norms upper bounds).
        forward_residual: :math:`\varepsilon = \|z - T(z)\|` at the point F was evaluated.
        adjoint_residual: :math:`\delta`, recomputed at that point.
        message: why ``bound`` is ``None`` (empty otherwise).

    Example — the module docstring's problem, whose exact hypergradient is
    :math:`\nabla f(x) = Q^{-2}x`:

    >>> import torch
    >>> Q = torch.diag(torch.tensor([1.0, 1e-3], dtype=torch.float64))
    >>> T = lambda u, x: u - (Q @ u - x)
    >>> F = lambda u, x: 0.5 * (u ** 2).sum()
    >>> x = torch.ones(2, dtype=torch.float64, requires_grad=True)
    >>> u = torch.linalg.solve(Q, x.detach()) + 1e-6
    >>> v = torch.linalg.solve(Q, u)                     # the adjoint at z = u; the hypergradient is v
    >>> rep = a_posteriori(T, F, u, [x], [x], v)
    >>> error = float((v - torch.linalg.solve(Q @ Q, x.detach())).norm())
    >>> rep.message, rep.fail_prob, rep.bound >= error
    ('', 0.0, True)
    """

    bound: Optional[float]
    estimate: float
    exact: bool
    fail_prob: float
    constants: BoundConstants
    forward_residual: float
    adjoint_residual: float
    message: str = ""


def residuals_at(
    T: Callable[..., Tensor],
    upper: Optional[Callable[..., Tensor]],
    u: Tensor,
    params: Sequence[Tensor],
    v: Tensor,
    point: Optional[Tensor] = None,
) -> tuple[float, Optional[float]]:
    r""":math:`(\varepsilon, \delta)` at the point actually used, for known :class:`BoundConstants`.

    :math:`\varepsilon = \|z - T(z)\|` with :math:`z` = ``point`` (default :math:`u`, what the
    implicit/inexact modes return) and :math:`\delta = \|(I - \partial_u T(u)^\top)v - \nabla_u F(z)\|`
    (``None`` without ``upper``). Two evaluations of T, one of :math:`\nabla F`, one product. With
    known constants, ``constants.bound(eps, delta)`` is then the bound of :ref:`the inexact mode <math-bound>`.

    Args:
        T: the operator ``T(u, *params)``.
        upper: the upper objective ``F(u, *params)``, or ``None``.
        u: :math:`\tilde u`, where :math:`\partial_u T` is taken.
        params: the parameters of T and F.
        v: the adjoint solution :math:`\tilde v`.
        point: :math:`z`, where F was evaluated (default ``u``).

    Returns:
        ``(eps, delta)`` as floats (``delta`` is ``None`` without ``upper``).

    >>> import torch
    >>> T = lambda u, x: 0.5 * u + x
    >>> x = torch.ones(2, dtype=torch.float64)
    >>> F = lambda u, x: 0.5 * (u ** 2).sum()
    >>> u, v = torch.full((2,), 1.9, dtype=torch.float64), torch.full((2,), 3.9, dtype=torch.float64)
    >>> eps, delta = residuals_at(T, F, u, [x], v)
    >>> round(eps, 12), round(delta, 12)   # z = u = 1.9: |z - T(z)| = 0.05, |v - v/2 - z| = 0.05 per coordinate
    (0.070710678119, 0.070710678119)
    """
    with torch.enable_grad():
        u_ = u.detach().requires_grad_(True)
        out = T(u_, *params)
        z_ = (u.detach() if point is None else point.detach()).clone().requires_grad_(True)
        eps = float(torch.linalg.vector_norm((T(z_, *params) - z_).detach()))
        if upper is None:
            return eps, None
        (gz,) = torch.autograd.grad(upper(z_, *params).sum(), z_)
        (jtv,) = torch.autograd.grad(out, u_, v.detach(), allow_unused=True)
        jtv = torch.zeros_like(u_) if jtv is None else jtv
    return eps, float(torch.linalg.vector_norm(v.detach() - jtv - gz))


def _formula(sigma: float, jx: float, lf: float, lxf: float, eps: float, delta: float) -> float:
    if not sigma > 0:
        return math.inf
    return lxf * eps / sigma + jx * (delta + lf * eps / sigma) / sigma


def a_posteriori(
    T: Callable[..., Tensor],
    upper: Callable[..., Tensor],
    u: Tensor,
    params: Sequence[Tensor],
    learned: Sequence[Tensor],
    v: Tensor,
    *,
    point: Optional[Tensor] = None,
    adjoint_residual: Optional[float] = None,
    symmetric: Optional[bool] = None,
    fail_prob: float = 1e-4,
    maxiter: int = 200,
    seed: int = 0,
) -> ErrorReport:
    r"""Certified a-posteriori bound on the inexact hypergradient error (module docstring).

    Args:
        T, upper: the operator ``T(u, *params)`` and the upper objective ``F(u, *params)`` (the
            loss that was back-propagated).
        u: the forward iterate :math:`\tilde u` at which T was linearised.
        params: the explicit parameters; ``learned``: the tensors the hypergradient is taken
            with respect to (those of ``params`` that require grad and the operator's own).
        v: the adjoint solution :math:`\tilde v`.
        point: where F and its gradient were evaluated (default :math:`\tilde u`, what the
            implicit/inexact modes return).
        adjoint_residual: the residual the adjoint solver reported; a recomputed residual much
            larger means the back-propagated loss is not ``upper`` (then no bound).
        symmetric: whether :math:`\partial_u T` is symmetric (default: ``T.symmetric_jacobian``;
            checked with one random test). Symmetric: Lanczos on :math:`I - J_u`
            (:math:`\sqrt{\mathrm{cond}}` convergence); else on :math:`(I - J_u)^\top(I - J_u)`.
        fail_prob: total failure probability p of the randomised certificates (split evenly).
        maxiter: Lanczos products per spectral interval (memory: ``maxiter`` vectors).
        seed: seed of the random starts.

    Cost: up to about ``4·maxiter`` vector–Jacobian products, plus host syncs (a diagnostic).

    Returns:
        An :class:`ErrorReport`: ``bound`` :math:`\ge\|\tilde g - \nabla f(x)\|` with probability
        :math:`\ge 1 - p` (or ``None`` and a ``message``), the ``estimate``, the constants and the
        residuals :math:`\varepsilon, \delta` recomputed at ``point``.

    Example — a contraction with :math:`\sigma_{\min}(I - J_u) = 10^{-3}` (the module docstring has
    another one; :class:`ErrorReport` compares the bound with the exact error):

    >>> import torch
    >>> Q = torch.diag(torch.tensor([2.0, 1e-3], dtype=torch.float64))
    >>> T = lambda u, x: u - 0.5 * (Q @ u - x)           # I - J_u = Q/2
    >>> F = lambda u, x: 0.5 * (u ** 2).sum()
    >>> x = torch.ones(2, dtype=torch.float64, requires_grad=True)
    >>> u = torch.linalg.solve(Q, x.detach())             # the exact fixed point: eps = 0
    >>> v = torch.linalg.solve(Q / 2, u)                  # the exact adjoint: delta = 0
    >>> rep = a_posteriori(T, F, u, [x], [x], v)
    >>> rep.exact, round(rep.constants.sigma_min, 9), rep.bound < 1e-9
    (True, 0.0005, True)
    """
    notes: list[str] = []
    p_each = fail_prob / 4
    with torch.enable_grad():
        u_ = u.detach().requires_grad_(True)
        out = T(u_, *params)
        z = u.detach() if point is None else point.detach()
        z_ = z.clone().requires_grad_(True)
        Tz = T(z_, *params)
        eps = float(torch.linalg.vector_norm((Tz - z_).detach()))
        n = u_.numel()
        # A^T y = y - J_u^T y at u~ ; the rhs grad F at z
        Ju = _Jac([out], [u_])
        gz = torch.autograd.grad(upper(z_, *params).sum(), z_, create_graph=True)[0]
        vd = v.detach().reshape(-1)
        delta = float(torch.linalg.vector_norm(vd - Ju.t(vd) - gz.detach().reshape(-1)))
        if adjoint_residual is not None and math.isfinite(adjoint_residual):
            slack = 1e3 * torch.finfo(v.dtype).eps * (float(vd.norm()) + float(gz.detach().norm()))
            if delta > 2.0 * adjoint_residual + slack:
                notes.append(
                    f"the adjoint residual recomputed with upper's gradient ({delta:.3e}) is far above "
                    f"the solver's ({adjoint_residual:.3e}): the back-propagated loss is not `upper`"
                )

        def A(w: Tensor) -> Tensor:
            return w - Ju(w)

        def At(y: Tensor) -> Tensor:
            return y - Ju.t(y)

        # symmetry of J_u: declared and checked
        sym = bool(getattr(T, "symmetric_jacobian", False)) if symmetric is None else bool(symmetric)
        if sym and not Ju.zero:
            gen = torch.Generator(device="cpu").manual_seed(seed + 7)
            w1 = torch.randn(n, generator=gen, dtype=u_.dtype).to(u_.device)
            w2 = torch.randn(n, generator=gen, dtype=u_.dtype).to(u_.device)
            a12, a21 = float(torch.dot(w1, Ju.t(w2))), float(torch.dot(Ju.t(w1), w2))
            if abs(a12 - a21) > 1e-8 * (abs(a12) + abs(a21) + float(w1.norm() * w2.norm())):
                notes.append("symmetric_jacobian was declared but dT/du is not symmetric; used the general path")
                sym = False
        kw = dict(fail_prob=p_each, maxiter=maxiter, seed=seed)
        dev = u_.device
        if sym:
            iv = lanczos_interval(At, n, dtype=u_.dtype, device=dev, need_min=True, **kw)
            sigma, sigma_est = iv.distance_to_zero(), max(min(abs(iv.ritz_min), abs(iv.ritz_max)), 0.0)
            if iv.ritz_min <= 0 <= iv.ritz_max:
                sigma_est = 0.0
        else:
            iv = lanczos_interval(lambda w: At(A(w)), n, dtype=u_.dtype, device=dev, need_min=True, **kw)
            sigma, sigma_est = math.sqrt(max(iv.lo, 0.0)), math.sqrt(max(iv.ritz_min, 0.0))
        intervals = [iv]
        # ||J_x||
        learned = list(learned)
        jx = jx_est = 0.0
        if learned:
            Jx = _Jac([out], learned)
            ivx = Jx.norm(**kw)
            intervals.append(ivx)
            jx, jx_est = math.sqrt(max(ivx.hi, 0.0)), math.sqrt(max(ivx.ritz_max, 0.0))
        # L_F = ||Hess_u F|| (symmetric)
        H = _Jac([gz], [z_])
        lf = lf_est = 0.0
        if not H.zero:
            ivh = lanczos_interval(lambda w: H.t(w), n, dtype=u_.dtype, device=dev, need_min=False, **kw)
            intervals.append(ivh)
            lf, lf_est = ivh.abs_max(), max(abs(ivh.ritz_min), abs(ivh.ritz_max))
        # L_xF = ||d/du grad_x F||
        xs = [p for p in params if p.requires_grad]
        lxf = lxf_est = 0.0
        gx_used: list[Tensor] = []
        if xs:
            gx = torch.autograd.grad(upper(z_, *params).sum(), xs, create_graph=True, allow_unused=True)
            gx_used = [g for g in gx if g is not None and g.requires_grad]
            if gx_used:
                Jxf = _Jac(gx_used, [z_])
                ivc = Jxf.norm(**kw)
                intervals.append(ivc)
                lxf, lxf_est = math.sqrt(max(ivc.hi, 0.0)), math.sqrt(max(ivc.ritz_max, 0.0))
        # structure: T affine in u with d_x T independent of u; F quadratic in u, grad_x F affine in u
        vv = v.detach()

        def t_vjp(pt: Tensor) -> Tensor:  # (J_u(pt)^T v, J_x(pt)^T v)
            o = (T(pt, *params) * vv).sum()
            return _flat([g for g in torch.autograd.grad(o, [pt, *learned], allow_unused=True) if g is not None])

        gen = torch.Generator(device="cpu").manual_seed(seed + 11)
        wu = torch.randn(z.shape, generator=gen, dtype=z.dtype).to(z.device)
        wx = [torch.randn(p.shape, generator=gen, dtype=p.dtype).to(p.device) for p in xs]

        def f_hvp(pt: Tensor) -> Tensor:  # d/du (<grad_u F, wu> + <grad_x F, wx>) at pt
            ins = [pt, *xs]
            gs = torch.autograd.grad(upper(pt, *params).sum(), ins, create_graph=True, allow_unused=True)
            s_ = sum((g * w).sum() for g, w in zip(gs, [wu, *wx]) if g is not None)
            if not isinstance(s_, Tensor) or not s_.requires_grad:
                return torch.zeros_like(pt)
            (h,) = torch.autograd.grad(s_, pt, allow_unused=True)
            return torch.zeros_like(pt) if h is None else h

        if not _constant_in(t_vjp, u.detach(), seed):
            notes.append(
                "dT/du or dT/dx changes with u (T not affine in u, or a mixed second derivative): "
                "the bound would be first order only"
            )
        if not _constant_in(f_hvp, z, seed):
            notes.append("F is not quadratic in u (or grad_x F not affine in u): the bound would be first order only")

    exact = all(i.exact for i in intervals)
    consts = BoundConstants(rho=math.nan, jx_norm=jx, lip_upper=lf, lip_cross=lxf, sigma_min=sigma)
    estimate = _formula(sigma_est, jx_est, lf_est, lxf_est, eps, delta)
    bound: Optional[float] = _formula(sigma, jx, lf, lxf, eps, delta)
    if not sigma > 0 and iv.exact:
        notes.append(
            f"sigma_min(I - dT/du) (Ritz value {sigma_est:.3e}) is below the rounding level of "
            f"{u.dtype} for this operator{'' if sym else ' (the nonsymmetric path squares the condition number)'}: "
            "use float64, declare a symmetric Jacobian, or pass BoundConstants(sigma_min=...)"
        )
    elif not sigma > 0:
        notes.append(
            f"sigma_min(I - dT/du) could not be certified > 0 within maxiter={maxiter} Lanczos products "
            f"(Ritz estimate {sigma_est:.3e}); raise maxiter or pass BoundConstants(sigma_min=...)"
        )
    if any(not math.isfinite(i.hi) for i in intervals[1:]):
        notes.append(f"a norm could not be certified within maxiter={maxiter} products")
    if not (math.isfinite(eps) and math.isfinite(delta)):
        notes.append("non-finite residual")
    if notes or bound is None or not math.isfinite(bound):
        bound = None
    return ErrorReport(
        bound=bound,
        estimate=estimate,
        exact=exact,
        fail_prob=0.0 if exact else fail_prob,
        constants=consts,
        forward_residual=eps,
        adjoint_residual=delta,
        message="; ".join(notes),
    )


def _constant_in(fn: Callable[[Tensor], Tensor], z: Tensor, seed: int) -> bool:
    r"""Whether ``fn(p)`` (a derivative of T or F at p) is the same at z and at two far random points.

    A numerical check of the structure the bound needs (affine T, quadratic F): it catches kinks and
    curvature at the scale :math:`1 + \|z\|` around z, and is exact for polynomial T, F of low degree
    with random points; a black-box function could still hide a change elsewhere.
    """
    gen = torch.Generator(device="cpu").manual_seed(seed + 5)
    with torch.enable_grad():
        ref = fn(z.detach().clone().requires_grad_(True)).detach()
        scale = 1.0 + float(torch.linalg.vector_norm(z))
        for _ in range(2):
            g = torch.randn(z.shape, generator=gen, dtype=z.dtype).to(z.device)
            pt = (z.detach() + scale * g / torch.linalg.vector_norm(g)).requires_grad_(True)
            other = fn(pt).detach()
            tol = 1e3 * torch.finfo(z.dtype).eps * (float(ref.norm()) + float(other.norm())) + 1e-300
            if not bool(torch.isfinite(other).all()) or float((other - ref).norm()) > tol:
                return False
    return True


def estimate_constants(
    T,
    upper,
    u: Tensor,
    params: Sequence[Tensor],
    learned: Sequence[Tensor],
    v: Tensor,
    iters: int = 200,
) -> BoundConstants:
    """Certified :class:`BoundConstants` at ``u`` (``sigma_min`` a lower bound, norms upper bounds).

    Kept for callers of the old API; :func:`a_posteriori` also recomputes the residuals at the
    point actually used and says when the bound cannot be certified — use it instead.

    Args:
        T, upper, u, params, learned, v: as for :func:`a_posteriori`.
        iters: Lanczos products per spectral interval (its ``maxiter``).

    Returns:
        The certified :class:`BoundConstants`, with ``v_norm = ‖v‖``.

    >>> import torch
    >>> Q = torch.diag(torch.tensor([1.0, 0.25], dtype=torch.float64))
    >>> T = lambda u, x: u - (Q @ u - x)                  # I - J_u = Q: sigma_min = 0.25, ||J_x|| = 1
    >>> x = torch.ones(2, dtype=torch.float64, requires_grad=True)
    >>> c = estimate_constants(T, lambda u, x: 0.5 * (u ** 2).sum(), torch.ones(2, dtype=torch.float64),
    ...                        [x], [x], torch.ones(2, dtype=torch.float64))
    >>> round(c.sigma_min, 9), round(c.jx_norm, 9), round(c.lip_upper, 9)
    (0.25, 1.0, 1.0)
    """
    rep = a_posteriori(T, upper, u, params, learned, v, maxiter=iters)
    return with_v_norm(rep.constants, v)
