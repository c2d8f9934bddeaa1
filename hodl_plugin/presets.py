r"""Named configurations of :class:`~hodl_plugin.GKMSolver`: keyword dictionaries, nothing more.

:func:`paper_config` is the "as in the papers" setting: the BMO/HODL papers learn through exactly
K unrolled GKM steps with a fixed aggregation schedule (no tolerance, no adaptive stop), and the
same group's public codes (BDA ``vis-opt-group/BDA``, BOAT ``callous-youth/BOAT``) aggregate
*outside* the operator with a geometric weight :math:`\alpha_k = \alpha_0\gamma^k` — summable, so
outside HODL's selection theory (the solver warns with
:class:`~hodl_plugin.errors.SummableScheduleWarning`), but what they run for K = 5–20 steps.
"""

from __future__ import annotations

from typing import Any, Optional, Union

from .gkm import AGGREGATIONS, validate_count
from .schedules import Geometric, Schedule

__all__ = ["paper_config"]


def paper_config(
    steps: int,
    *,
    alpha: Union[float, Schedule, None] = None,
    aggregation: str = "outside",
    upper_step: float = 1.0,
) -> dict[str, Any]:
    r"""Keyword arguments of :class:`~hodl_plugin.GKMSolver` for the papers' protocol.

    Exactly ``steps`` = K GKM steps (``tol=0, atol=0``), differentiated by back-propagation through
    all of them (``hypergrad="unrolled"``), :math:`\beta \equiv 1`, and a fixed aggregation
    schedule: by default BOAT's ``"GDA": {"alpha_init": 0.5, "alpha_decay": 0.9}``, i.e.
    :class:`~hodl_plugin.schedules.Geometric` ``(0.5, 0.9)``, in the ``"outside"`` form

    .. math::

        u_{k+1} = (1-\alpha_k)\,T(u_k; x) + \alpha_k\,(u_k - s\nabla_u F(u_k; x)),\quad
        \alpha_k = 0.5\cdot 0.9^k,\quad k = 0,\dots,K-1.

    BDA's logged setting is ``alpha=Geometric(0.6, 0.9)`` with ``steps=5``; our own (HODL's scheme)
    form is ``aggregation="inside", alpha=Harmonic(1.0)``. Pass the upper objective yourself
    (``upper=F`` or ``upper_grad=``).

    Args:
        steps: K, the number of unrolled steps (an integer >= 1).
        alpha: the aggregation schedule (default ``Geometric(0.5, 0.9)``).
        aggregation: ``"outside"`` (default, the BDA/BOAT form) or ``"inside"``.
        upper_step: s, the step of the upper descent direction.

    Returns:
        dict: keyword arguments for ``hp.GKMSolver(T, upper=F, **paper_config(...))``.

    Raises:
        ValueError: ``steps`` not an integer >= 1, or an unknown ``aggregation``.

    Example:
        >>> import warnings, torch, hodl_plugin as hp
        >>> cfg = hp.paper_config(steps=3)
        >>> sorted(cfg)
        ['aggregation', 'alpha', 'atol', 'beta', 'hypergrad', 'max_steps', 'tol', 'upper_step']
        >>> T = lambda u, x: 0.5 * u + x                      # Fix T = {2x}
        >>> F = lambda u, x: 0.5 * (u ** 2).sum()
        >>> with warnings.catch_warnings():
        ...     warnings.simplefilter("ignore", hp.SummableScheduleWarning)
        ...     solver = hp.GKMSolver(T, upper=F, **cfg)
        >>> x = torch.ones(1, dtype=torch.float64, requires_grad=True)
        >>> u = solver(torch.zeros(1, dtype=torch.float64), x)
        >>> solver.info.steps                                 # exactly K steps, no early stop
        3
        >>> v = 0.0                                           # the same 3 steps by hand:
        >>> for k in range(3):                                # u - s∇F(u) = 0 for F = ½u², s = 1
        ...     a = 0.5 * 0.9 ** k
        ...     v = (1 - a) * (0.5 * v + 1.0) + a * 0.0
        >>> abs(u.item() - v) < 1e-15
        True
    """
    k = validate_count(steps, "steps")
    if not isinstance(aggregation, str) or aggregation not in AGGREGATIONS:
        raise ValueError(f"aggregation must be one of {AGGREGATIONS}, got {aggregation!r}")
    a: Optional[Union[float, Schedule]] = Geometric(0.5, 0.9) if alpha is None else alpha
    return {
        "max_steps": k,
        "tol": 0.0,
        "atol": 0.0,
        "hypergrad": "unrolled",
        "beta": 1.0,
        "alpha": a,
        "aggregation": aggregation,
        "upper_step": float(upper_step),
    }
