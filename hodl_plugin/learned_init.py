r"""A learned initialisation of the lower iteration (IAPTT-GM's initialization auxiliary; BOAT's ``DI`` / ``IAD``).

IAPTT-GM treats the starting point of the lower iteration as an upper-level variable :math:`z`,
:math:`u_0 = z`, and updates it with the same hypergradient as :math:`x`:

.. math::

    x \leftarrow x - \eta_x \nabla_x F\big(u_{k^*}(x, z); x\big),\qquad
    z \leftarrow z - \eta_z \nabla_z F\big(u_{k^*}(x, z); x\big).

:class:`LearnedInit` wraps a solver and holds :math:`z` as an ``nn.Parameter``: ``model(*params)`` is
``solver(z, *params)``, and one ``backward()`` fills ``z.grad`` next to the other gradients, so any
torch optimizer over ``model.parameters()`` performs the update (plain SGD: the paper's rule). BOAT's
``DI`` is this with :math:`z` the lower model's own parameters and its optimizer; ``IAD`` (MAML) is the
case where the upper variable *is* the initialisation — a ``LearnedInit`` whose ``z`` is the only
upper variable.

Why a module and not a method option: :math:`z` is a parameter of the model — it belongs in
``parameters()``, ``state_dict()``, ``.to(device)`` and the optimizer, next to the upper variables —
while the method only has to differentiate the map :math:`u_0 \mapsto u`, which unrolled
differentiation already does. So the wrapper composes with the methods that differentiate through
the iterates (``"unrolled"``, ``"ptt"``: their class attribute ``differentiates_start``), and refuses
the others by name: at a fixed point (implicit, inexact, first order) the solution does not depend on
where the iteration started, and truncated, finite-difference and IGA differentiate the last steps
only, so :math:`z` would receive no gradient.
"""

from __future__ import annotations

from typing import Any, Hashable, Optional

from torch import Tensor, nn

from .errors import ConfigurationError
from .solver import GKMSolver

__all__ = ["LearnedInit"]


class LearnedInit(nn.Module):
    r"""``solver`` started from a learned point :math:`z` (module docstring): ``model(*params) = solver(z, *params)``.

    Args:
        solver: a :class:`~hodl_plugin.GKMSolver` whose method differentiates the trajectory from
            :math:`u_0` (``hypergrad="unrolled"`` or ``"ptt"``).
        init: the initial value of :math:`z` (copied), shaped like the lower variable :math:`u`; for a
            batch of problems sharing one initialisation, give one problem's shape and call
            ``solver(model.z.expand(B, *model.z.shape), x)`` (the gradients of the copies add up in ``z``).

    Raises:
        ConfigurationError: the solver's method gives :math:`u_0` no derivative.

    IAPTT-GM on a toy: :math:`f(u; x) = \tfrac12\|u - x\|^2`, PTT on :math:`F = \tfrac12\|u - b\|^2`, SGD on
    :math:`(x, z)`:

    >>> import torch, hodl_plugin as hp
    >>> b = torch.tensor([1.0, -2.0], dtype=torch.float64)
    >>> T = hp.GradientStep(objective=lambda u, x: 0.5 * ((u - x) ** 2).sum(), step=0.5)
    >>> F = lambda u, x: 0.5 * ((u - b) ** 2).sum()
    >>> model = hp.LearnedInit(hp.GKMSolver(T, upper=F, alpha=0, max_steps=5, hypergrad="ptt"),
    ...                        torch.zeros(2, dtype=torch.float64))
    >>> x = torch.zeros(2, dtype=torch.float64, requires_grad=True)
    >>> opt = torch.optim.SGD([x, *model.parameters()], lr=0.5)
    >>> for _ in range(200):
    ...     opt.zero_grad()
    ...     F(model(x), x).backward()
    ...     opt.step()
    >>> F(model(x), x).item() < 1e-12
    True
    """

    def __init__(self, solver: GKMSolver, init: Tensor) -> None:
        super().__init__()
        if not isinstance(solver, GKMSolver):
            raise TypeError(f"LearnedInit wraps a hodl_plugin.GKMSolver, got {type(solver).__name__}")
        method = solver.method
        if not getattr(method, "differentiates_start", False):
            raise ConfigurationError(
                f"LearnedInit needs a method that differentiates the trajectory from u0; hypergrad={method.name!r} "
                "gives u0 no derivative (at a fixed point the solution does not depend on where the iteration "
                "started; truncated, fd and iga differentiate the last steps only): use hypergrad='unrolled' or 'ptt'"
            )
        if not isinstance(init, Tensor) or not init.is_floating_point():
            raise TypeError(f"LearnedInit(init=...) must be a floating tensor, got {type(init).__name__}")
        self.solver = solver
        self.z = nn.Parameter(init.detach().clone())

    def forward(self, *params: Any, key: Optional[Hashable] = None) -> Tensor:
        """``solver(z, *params)``."""
        return self.solver(self.z, *params, key=key)
