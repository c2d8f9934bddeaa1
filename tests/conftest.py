"""Shared fixtures: small float64 problems with closed-form solutions (SPEC §4)."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch

DT = torch.float64


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
    """SPEC T5: T(u) = u - sAᵀ(Au - b) with A p×n, p < n, so Fix T = {u : Au = b} (not a singleton).

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


@pytest.fixture
def quad() -> Quadratic:
    return make_quadratic()


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def runnable(package: str) -> list[str]:
    """The modules of the repository's ``package`` (``benchmarks``, ``recipes``) that users run as
    ``python -m package.<name>``: every ``*.py`` with a ``__main__`` block, not ``_private`` ones."""
    import pathlib

    root = pathlib.Path(__file__).resolve().parents[1] / package
    return sorted(p.stem for p in root.glob("*.py")
                  if not p.stem.startswith("_") and 'if __name__ == "__main__"' in p.read_text())
