r"""Forward acceleration of the GKM iteration (``GKMSolver(acceleration=...)``).

- :class:`Anderson` — type-II Anderson acceleration (Walker & Ni 2011): each step extrapolates from
  the last m secant pairs by a small least-squares problem;
- :class:`Broyden` — limited-memory "good" Broyden (the DEQ solvers' quasi-Newton method): a
  low-rank approximation of :math:`(I - \partial_u T)^{-1}` built from rank-one secant updates;
- :class:`Accelerator` — the interface both implement (``init``, ``step``, ``report``,
  ``check_compatible``), for your own.

Both run one problem or, with ``batch_dims``, every sample on its own (per-sample coefficients,
restarts and safeguards, as if solved alone) in batched operations, and both work under
``torch.func`` transforms. They accelerate the forward solve only: use them with the implicit,
inexact or first_order modes, whose backward is exact at the fixed point whatever the forward was.

Example:
    >>> import torch, hodl_plugin as hp
    >>> W = 0.9 * torch.linalg.qr(torch.randn(8, 8, dtype=torch.float64,
    ...                                       generator=torch.Generator().manual_seed(0)))[0]
    >>> x = 0.3 * torch.ones(4, 8, dtype=torch.float64)
    >>> T = lambda z, x: torch.tanh(z @ W.T + x)            # a batch of 4 DEQ-style equilibria
    >>> for acc in (None, hp.Anderson(6), hp.Broyden(6)):
    ...     u, info = hp.GKMSolver(T, tol=1e-10, batch_dims=1, acceleration=acc).solve(torch.zeros_like(x), x)
    ...     print(type(acc).__name__, info.converged, bool((T(u, x) - u).norm() < 1e-8))
    NoneType True True
    Anderson True True
    Broyden True True
"""

from .anderson import Anderson
from .base import Accelerator
from .broyden import Broyden

__all__ = ["Accelerator", "Anderson", "Broyden"]
