r"""Independent references (closed forms) for the matrix and property tests.

Nothing here imports :mod:`hodl_plugin`: every reference is computed from the mathematics of the
problem with plain ``torch.linalg`` (and, for the nonlinear equilibrium, a hand-derived Jacobian
recursion and central finite differences), so a test comparing the library against these cannot
pass by comparing the code with itself.

Problems:

- :class:`LinearFP` — :math:`T(u; x) = u - s(Qu - Bx) = Mu + sBx` with :math:`M = I - sQ`,
  :math:`\|M\| < 1`; Q SPD, or nonsymmetric with a positive-definite symmetric part.
  :math:`u^* = Q^{-1}Bx`, :math:`du^*/dx = Q^{-1}B`, :math:`f = \tfrac12\|u^*-y\|^2`,
  :math:`\nabla f = B^\top Q^{-\top}(u^*-y)`, :math:`\nabla^2 f = B^\top Q^{-\top}Q^{-1}B`.
  K-step map from :math:`u_0 = 0`: :math:`u_K = \sum_{i<K} M^i sBx`, :math:`du_K/dx = S_K sB`,
  :math:`S_K = \sum_{i<K} M^i`.
- :class:`TanhFP` — :math:`T(u; x) = \tanh(Wu + Bx)`, W nonsymmetric, :math:`\|W\| < 1`:
  :math:`du^*/dx = (I - DW)^{-1}DB`, :math:`D = \mathrm{diag}(1-u^{*2})`.
- :class:`Quadratic` (:func:`make_quadratic`) — :math:`T(u;x) = u - s(Qu - Bx)` with the upper objective
  :math:`\tfrac12\|u-y\|^2 + \tfrac c2\|x\|^2`; :func:`small_linear` — a small SPD or nonsymmetric Q.
- :func:`nonsingleton`, :func:`nonsingleton_projector` — :math:`T(u) = u - sA^\top(Au - b)` with A wide, so
  :math:`\mathrm{Fix}\,T = \{u : Au = b\}` is not a singleton; the upper-optimal fixed point of
  :math:`F = \tfrac12\|u - z\|^2` is the projection of z (closed form).
- :func:`gradient_step_tanh`, :func:`gkm_loop` — a nonlinear gradient-step operator and the GKM iteration
  with aggregation inside or outside the operator (:ref:`math-gkm`), written out by hand.

:func:`reference` returns the value, Jacobian, gradient and Hessian that a hypergradient mode must
produce: ``("fixed",)`` (implicit / inexact), ``("unrolled", K)``, ``("truncated", K, k, tol0)``,
``("first_order",)``.

>>> p = make_linear("spd", seed=0)
>>> r = reference(p, ("fixed",), p.x0)
>>> bool(torch.allclose(p.T(r.value, p.x0), r.value, atol=1e-12))
True
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor

DT = torch.float64


class Ref:
    """What a mode must give at x: u(x), du/dx, ∇f(x) and ∇²f(x) for f = ½‖u(x) − y‖².

    ``hess`` may be given as a function (computed on first access: central differences are slow)."""

    def __init__(self, value: Tensor, jac: Tensor, grad: Tensor, hess: Tensor | Callable[[], Tensor]) -> None:
        self.value, self.jac, self.grad = value, jac, grad
        self._hess = hess

    @property
    def hess(self) -> Tensor:
        if callable(self._hess):
            self._hess = self._hess()
        return self._hess


@dataclass
class LinearFP:
    Q: Tensor
    B: Tensor
    y: Tensor
    s: float
    x0: Tensor
    t: Tensor  # a tangent direction for forward mode
    X: Tensor  # a batch of x for vmap
    kind: str

    @property
    def n(self) -> int:
        return self.Q.shape[0]

    @property
    def M(self) -> Tensor:
        return torch.eye(self.n, dtype=self.Q.dtype) - self.s * self.Q

    def T(self, u: Tensor, x: Tensor) -> Tensor:
        return u - self.s * (self.Q @ u - self.B @ x)

    def F(self, u: Tensor) -> Tensor:
        return 0.5 * ((u - self.y) ** 2).sum()

    def u_star(self, x: Tensor) -> Tensor:
        return torch.linalg.solve(self.Q, self.B @ x)

    def S(self, K: int) -> Tensor:
        """Σ_{i<K} M^i."""
        S = torch.zeros(self.n, self.n, dtype=self.Q.dtype)
        P = torch.eye(self.n, dtype=self.Q.dtype)
        for _ in range(K):
            S = S + P
            P = self.M @ P
        return S

    def u_K(self, x: Tensor, K: int) -> Tensor:
        return self.S(K) @ (self.s * self.B @ x)


@dataclass
class TanhFP:
    W: Tensor
    B: Tensor
    y: Tensor
    x0: Tensor
    t: Tensor
    X: Tensor
    kind: str = "tanh"

    @property
    def n(self) -> int:
        return self.W.shape[0]

    def T(self, u: Tensor, x: Tensor) -> Tensor:
        return torch.tanh(self.W @ u + self.B @ x)

    def F(self, u: Tensor) -> Tensor:
        return 0.5 * ((u - self.y) ** 2).sum()

    def run(self, u: Tensor, x: Tensor, K: int, J: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """K plain steps from u, with the forward-mode Jacobian recursion J ← D(WJ + B)."""
        J = torch.zeros(self.n, self.B.shape[1], dtype=DT) if J is None else J
        for _ in range(K):
            u = self.T(u, x)
            J = (1 - u**2)[:, None] * (self.W @ J + self.B)
        return u, J

    def u_star(self, x: Tensor) -> Tensor:
        return self.run(torch.zeros(self.n, dtype=DT), x, 120)[0]

    def jac_star(self, x: Tensor) -> Tensor:
        u = self.u_star(x)
        D = torch.diag(1 - u**2)
        return torch.linalg.solve(torch.eye(self.n, dtype=DT) - D @ self.W, D @ self.B)


def _spd(n: int, cond: float, g: torch.Generator) -> Tensor:
    U, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=DT))
    eig = torch.logspace(0, float(torch.log10(torch.tensor(cond))), n, dtype=DT)
    Q = U @ torch.diag(eig) @ U.T
    return 0.5 * (Q + Q.T)


def _golden_min(fun: Callable[[float], float], lo: float, hi: float, iters: int = 40) -> float:
    """Golden-section search for the minimiser of a unimodal function on [lo, hi]."""
    r = (5**0.5 - 1) / 2
    a, b = lo + (1 - r) * (hi - lo), lo + r * (hi - lo)
    fa, fb = fun(a), fun(b)
    for _ in range(iters):
        if fa <= fb:
            hi, b, fb = b, a, fa
            a = lo + (1 - r) * (hi - lo)
            fa = fun(a)
        else:
            lo, a, fa = a, b, fb
            b = lo + r * (hi - lo)
            fb = fun(b)
    return a if fa <= fb else b


def make_linear(kind: str, n: int = 4, m: int = 3, seed: int = 0, cond: float = 3.0, scale: float = 1.0,
                dtype: torch.dtype = DT) -> LinearFP:
    """``kind="spd"``: Q SPD with condition number ``cond``, s = 1/λ_max (ρ = 1 − 1/cond).
    ``kind="nonsym"``: Q = S + skew with S SPD (cond ``cond``), s minimising ‖I − sQ‖₂ (convex in s)
    (‖I − sQ‖₂ < 1 exists since the symmetric part is positive definite). x and y are scaled by
    ``scale`` (u* scales with it)."""
    g = torch.Generator().manual_seed(seed)
    S = _spd(n, cond, g)
    if kind == "spd":
        Q = S
        s = 1.0 / float(torch.linalg.eigvalsh(S).max())
    elif kind == "nonsym":
        R = torch.randn(n, n, generator=g, dtype=DT)
        Q = S + 0.5 * (R - R.T) / float(torch.linalg.matrix_norm(R - R.T, 2)) * float(torch.linalg.eigvalsh(S).max())
        eye = torch.eye(n, dtype=DT)
        threads = torch.get_num_threads()
        torch.set_num_threads(1)  # small SVDs: threads only contend (80x slower on a busy machine)
        try:
            s = _golden_min(lambda a: float(torch.linalg.matrix_norm(eye - a * Q, 2)),
                            0.0, 2.0 / float(torch.linalg.matrix_norm(Q, 2)))
        finally:
            torch.set_num_threads(threads)
    else:
        raise ValueError(kind)
    B = torch.randn(n, m, generator=g, dtype=DT)
    y = scale * torch.randn(n, generator=g, dtype=DT)
    x0 = scale * torch.randn(m, generator=g, dtype=DT)
    t = torch.randn(m, generator=g, dtype=DT)
    X = scale * torch.randn(3, m, generator=g, dtype=DT)
    cast = lambda a: a.to(dtype)  # noqa: E731
    return LinearFP(cast(Q), cast(B), cast(y), s, cast(x0), cast(t), cast(X), kind)


def make_tanh(n: int = 4, m: int = 3, seed: int = 0, rho: float = 0.5) -> TanhFP:
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(n, n, generator=g, dtype=DT)
    W = rho * W / torch.linalg.matrix_norm(W, 2)
    B = 0.7 * torch.randn(n, m, generator=g, dtype=DT)
    y = 0.5 * torch.randn(n, generator=g, dtype=DT)
    x0 = 0.5 * torch.randn(m, generator=g, dtype=DT)
    t = torch.randn(m, generator=g, dtype=DT)
    X = 0.5 * torch.randn(3, m, generator=g, dtype=DT)
    return TanhFP(W, B, y, x0, t, X)


def fd_jacobian(fun: Callable[[Tensor], Tensor], x: Tensor, h: float = 1e-5) -> Tensor:
    """Central finite differences, one column per coordinate of x (error O(h²))."""
    cols = []
    for j in range(x.numel()):
        e = torch.zeros_like(x)
        e[j] = h
        cols.append((fun(x + e) - fun(x - e)) / (2 * h))
    return torch.stack(cols, dim=-1)


def _ref_from(value: Tensor, jac: Tensor, y: Tensor, hess: Tensor | None = None) -> Ref:
    grad = jac.T @ (value - y)
    return Ref(value, jac, grad, jac.T @ jac if hess is None else hess)


def reference(p: LinearFP | TanhFP, kind: tuple, x: Tensor) -> Ref:
    """The value / Jacobian / gradient / Hessian a mode must give at x (see the module docstring).

    ``("truncated", K, k, tol0)``: the last k of K steps are differentiated; with ``tol0`` the value
    is the K-step iterate u_K (from u_0 = 0), otherwise the forward converged and the last k steps
    start at u*. ``("first_order",)``: the returned T(u*; x) differentiated with u* held constant.
    """
    x = x.detach()
    name = kind[0]
    if isinstance(p, LinearFP):
        sB = p.s * p.B
        if name == "fixed":
            return _ref_from(p.u_star(x), torch.linalg.solve(p.Q, p.B), p.y)
        if name == "unrolled":
            K = kind[1]
            return _ref_from(p.u_K(x, K), p.S(K) @ sB, p.y)
        if name == "truncated":
            K, k, tol0 = kind[1:]
            value = p.u_K(x, K) if tol0 else p.u_star(x)
            return _ref_from(value, p.S(k) @ sB, p.y)
        if name == "first_order":
            return _ref_from(p.u_star(x), sB, p.y)
        raise ValueError(kind)

    # nonlinear tanh equilibrium: Jacobians by the hand-derived recursion / implicit formula,
    # Hessians by central differences of the (closed-form) gradient.
    zero = torch.zeros(p.n, dtype=DT)
    if name == "fixed":
        def grad_at(z: Tensor) -> Tensor:
            return p.jac_star(z).T @ (p.u_star(z) - p.y)

        return Ref(p.u_star(x), p.jac_star(x), grad_at(x), lambda: fd_jacobian(grad_at, x, 1e-4))
    if name == "unrolled":
        K = kind[1]

        def grad_at(z: Tensor) -> Tensor:
            u, J = p.run(zero, z, K)
            return J.T @ (u - p.y)

        u, J = p.run(zero, x, K)
        return Ref(u, J, grad_at(x), lambda: fd_jacobian(grad_at, x, 1e-4))
    if name == "truncated":
        K, k, tol0 = kind[1:]
        start = p.run(zero, x, K - k)[0] if tol0 else p.u_star(x)

        def grad_at(z: Tensor) -> Tensor:  # the start of the last k steps is a constant
            u, J = p.run(start, z, k)
            return J.T @ (u - p.y)

        u, J = p.run(start, x, k)
        return Ref(u, J, grad_at(x), lambda: fd_jacobian(grad_at, x, 1e-4))
    if name == "first_order":
        u = p.u_star(x)
        z = p.T(u, x)
        J = (1 - z**2)[:, None] * p.B
        curv = (z - p.y) * (-2 * z * (1 - z**2))  # d²z_i/da_i² (z_i − y_i)
        H = J.T @ J + p.B.T @ torch.diag(curv) @ p.B
        return Ref(z, J, J.T @ (z - p.y), H)
    raise ValueError(kind)


def rel_err(a: Tensor, b: Tensor) -> float:
    """‖a − b‖ / ‖b‖ (‖a − b‖ when b = 0)."""
    a, b = torch.as_tensor(a, dtype=DT), torch.as_tensor(b, dtype=DT)
    den = float(b.norm())
    return float((a - b).norm()) / (den if den > 0 else 1.0)


@dataclass
class Quadratic:
    r"""Lower level :math:`\min_u \tfrac12 u^\top Q u - (Bx)^\top u`, i.e. :math:`T(u;x) = u - s(Qu - Bx)`;
    upper :math:`F(u;x) = \tfrac12\|u-y\|^2 + \tfrac{c}{2}\|x\|^2`.

    Closed forms: :math:`u^* = Q^{-1}Bx`, :math:`\nabla f(x) = B^\top Q^{-1}(u^*-y) + c x`.
    """

    Q: torch.Tensor
    B: torch.Tensor
    y: torch.Tensor
    s: float
    c: float = 0.1

    def T(self, u, x):
        return u - self.s * (self.Q @ u - self.B @ x)

    def F(self, u, x):
        return 0.5 * ((u - self.y) ** 2).sum() + 0.5 * self.c * (x**2).sum()

    def u_star(self, x):
        return torch.linalg.solve(self.Q, self.B @ x)

    def hypergrad(self, x):
        return self.B.T @ torch.linalg.solve(self.Q, self.u_star(x) - self.y) + self.c * x

    @property
    def n(self) -> int:
        return self.Q.shape[0]


def make_quadratic(n: int = 40, m: int = 3, cond: float = 20.0, seed: int = 0) -> Quadratic:
    g = torch.Generator().manual_seed(seed)
    U, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=DT))
    eig = torch.logspace(0, torch.log10(torch.tensor(cond)).item(), n, dtype=DT)
    Q = U @ torch.diag(eig) @ U.T
    Q = 0.5 * (Q + Q.T)
    B = torch.randn(n, m, generator=g, dtype=DT)
    y = torch.randn(n, generator=g, dtype=DT)
    return Quadratic(Q, B, y, s=1.0 / cond)


def nonsingleton(seed: int = 1, p: int = 5, n: int = 12):
    """T(u) = u - sAᵀ(Au - b) with A p×n, p < n, so Fix T = {u : Au = b} (not a singleton).

    Returns ``(A, b, s, z, proj)``: ``z`` a random point, ``proj(v)`` the closed-form projection of v
    onto Fix T (so ``proj(z)`` = argmin ½||u - z||² over Fix T).
    """
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(p, n, generator=g, dtype=DT)
    b = A @ torch.randn(n, generator=g, dtype=DT)
    s = 1.0 / torch.linalg.matrix_norm(A, 2).item() ** 2
    z = torch.randn(n, generator=g, dtype=DT)

    def proj(v):
        return v - A.T @ torch.linalg.solve(A @ A.T, A @ v - b)

    return A, b, s, z, proj


def nonsingleton_projector(seed=2, p=2, n=5):
    """A smaller non-singleton set {u : Au = b}: ``(A, b, s, P, proj, g)`` with P the projector onto
    null(A), ``proj`` the projection onto the set and ``g`` the generator (for more random data)."""
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(p, n, generator=g, dtype=DT)
    b = A @ torch.randn(n, generator=g, dtype=DT)
    s = 1.0 / torch.linalg.matrix_norm(A, 2).item() ** 2
    P = torch.eye(n, dtype=DT) - A.T @ torch.linalg.solve(A @ A.T, A)  # projector onto null(A)

    def proj(v):
        return v - A.T @ torch.linalg.solve(A @ A.T, A @ v - b)

    return A, b, s, P, proj, g


def small_linear(n=5, m=3, seed=0, sym=True):
    """(Q, B, y, s): Q SPD (``sym``) or I + a small nonsymmetric part, s = 0.9/‖Q‖."""
    g = torch.Generator().manual_seed(seed)
    M = torch.randn(n, n, generator=g, dtype=DT)
    Q = M @ M.T / n + torch.eye(n, dtype=DT) if sym else torch.eye(n, dtype=DT) + 0.3 * M / n**0.5
    B = torch.randn(n, m, generator=g, dtype=DT)
    y = torch.randn(n, generator=g, dtype=DT)
    s = 0.9 / float(torch.linalg.matrix_norm(Q, 2))
    return Q, B, y, s


def gradient_step_tanh():
    """(T, F, grad_F, t, n, m): T a gradient step of ½uᵀQu + 0.3·Σ log cosh(u) − (Bx)ᵀu, F(u; x) =
    ½‖u − sin(Cx)‖² depending on x too."""
    g = torch.Generator().manual_seed(11)
    n, m = 5, 3
    M = torch.randn(n, n, generator=g, dtype=DT)
    Q = M @ M.T / n + 0.5 * torch.eye(n, dtype=DT)
    B = torch.randn(n, m, generator=g, dtype=DT)
    C = torch.randn(n, m, generator=g, dtype=DT)
    t = 0.8 / (float(torch.linalg.eigvalsh(Q).max()) + 0.3)

    def T(u, x):  # gradient step of ½uᵀQu + 0.3·Σ log cosh(u) - (Bx)ᵀu
        return u - t * (Q @ u + 0.3 * torch.tanh(u) - B @ x)

    def F(u, x):  # the upper objective depends on x too, so ∇_u F(u; x) carries x
        return 0.5 * ((u - torch.sin(C @ x)) ** 2).sum()

    def grad_F(u, x):
        return u - torch.sin(C @ x)

    return T, F, grad_F, t, n, m


def gkm_loop(T, grad_F, x, u0, K, s, alpha, beta, aggregation):
    """K steps of the GKM iteration of :ref:`math-gkm`, aggregation inside (HODL) or outside (BDA/BOAT)."""
    u = u0
    for k in range(K):
        a = alpha(k)
        if aggregation == "inside":  # HODL: T at the aggregated point
            w = (1 - a) * u + a * (u - s * grad_F(u, x))
            u = (1 - beta) * u + beta * T(w, x)
        else:  # BDA/BOAT
            u = (1 - beta) * u + beta * ((1 - a) * T(u, x) + a * (u - s * grad_F(u, x)))
    return u


def affine_k_steps(a, x, K):
    """u_K of u <- a u + x from 0: x (1 - a^K) / (1 - a)."""
    return x * (1 - a**K) / (1 - a)
