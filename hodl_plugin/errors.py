"""Errors and warnings raised by hodl_plugin.

Every failure of the lower solve or of a hypergradient computation is reported by one of these
types, with a message naming the quantity at fault. None is raised silently: a solve that cannot be
trusted either raises or, with an explicit opt-out (``on_divergence="warn"``), warns and marks
``info.converged = False``.
"""

from __future__ import annotations

import os
import sys

import torch

# hodl_plugin, torch and the standard library (contextlib, functools): never the user's line
_SKIP = tuple(os.path.dirname(os.path.abspath(f)) for f in (__file__, torch.__file__, os.__file__))


def user_stacklevel() -> int:
    """The ``stacklevel`` for a ``warnings.warn`` made by the caller of this function that names the
    first frame outside hodl_plugin, torch and the standard library: the user's line, however deep
    in an autograd or vmap rule the warning is made."""
    frame, level = sys._getframe(1), 1  # the caller: stacklevel 1
    while frame is not None:
        if not os.path.abspath(frame.f_code.co_filename).startswith(_SKIP):
            return level
        frame, level = frame.f_back, level + 1
    return 1


__all__ = [
    "HODLError",
    "ScheduleError",
    "ConfigurationError",
    "UnusedOptionWarning",
    "DivergenceError",
    "NotAffineError",
    "LinearSolveError",
    "HypergradientError",
    "ConvergenceWarning",
    "SummableScheduleWarning",
]


class HODLError(Exception):
    """Base class of the errors raised by hodl_plugin: ``except hp.HODLError`` catches them all.

    >>> import hodl_plugin as hp
    >>> issubclass(hp.LinearSolveError, hp.HODLError), issubclass(hp.DivergenceError, hp.HODLError)
    (True, True)
    """


class ScheduleError(HODLError, ValueError):
    """A step-size / weight schedule violates the convergence conditions of the GKM scheme.

    >>> import hodl_plugin as hp
    >>> try:
    ...     hp.GKMSolver(lambda u: u, beta=hp.Harmonic(1.0))
    ... except hp.ScheduleError as e:
    ...     print("bounded away from 0" in str(e))
    True
    """


class ConfigurationError(HODLError, ValueError):
    """Options that cannot work together (e.g. Anderson acceleration with unrolled
    differentiation); raised at construction, naming the option to change.

    >>> import hodl_plugin as hp
    >>> try:
    ...     hp.GKMSolver(lambda u: 0.5 * u, hypergrad="unrolled", acceleration=hp.Anderson())
    ... except hp.ConfigurationError as e:
    ...     print("cannot be used with hypergrad='unrolled'" in str(e))
    True
    """


class NotAffineError(ConfigurationError):
    r"""``forward="krylov"`` was asked for an operator that is not affine in u: the Krylov forward
    solves :math:`(I - M)u = c` for :math:`T(u) = Mu + c` and failed, and ``T`` failed the affinity
    test :math:`T(a) + T(b) = 2T(\tfrac{a+b}{2})` at its last points. Use ``forward="gkm"``.

    >>> import torch, hodl_plugin as hp
    >>> try:
    ...     hp.GKMSolver(lambda u, x: torch.tanh(u) + x, forward="gmres", tol=1e-12)(
    ...         torch.zeros(3, dtype=torch.float64), torch.ones(3, dtype=torch.float64))
    ... except hp.NotAffineError as e:
    ...     print("not affine" in str(e) or "is not:" in str(e))
    True
    """


class DivergenceError(HODLError, RuntimeError):
    """The lower-level fixed-point iteration produced non-finite values or a growing residual.

    >>> import torch, hodl_plugin as hp
    >>> try:
    ...     hp.GKMSolver(lambda u: 2.0 * u + 1.0)(torch.zeros(2))
    ... except hp.DivergenceError as e:
    ...     print(str(e)[:40])
    the GKM iteration diverged at step 19: t
    """


class LinearSolveError(HODLError, RuntimeError):
    """The adjoint linear system ``(I - ∂_u T)ᵀ v = ∇_u F`` was not solved to the asked tolerance.

    Raised from ``backward()`` by the implicit mode (``on_fail="raise"``, the default); e.g. when the
    fixed-point set is not a singleton and ``I - ∂_u T`` is singular, or when a symmetric Jacobian is
    claimed (``symmetric_jacobian = True``) for an operator whose Jacobian is not symmetric:

    >>> import torch, hodl_plugin as hp
    >>> A = torch.tensor([[0.5, 0.3, 0.0], [0.0, 0.2, 0.4], [0.1, 0.0, 0.3]], dtype=torch.float64)
    >>> T = lambda u, x: A @ u + x
    >>> T.symmetric_jacobian = True                        # false: CG would give a wrong number
    >>> x = torch.ones(3, dtype=torch.float64, requires_grad=True)
    >>> try:
    ...     hp.GKMSolver(T)(torch.zeros(3, dtype=torch.float64), x).sum().backward()
    ... except hp.LinearSolveError as e:
    ...     print(str(e)[:40])
    solver='cg' needs a symmetric dT/du, but
    """


class HypergradientError(HODLError, ArithmeticError):
    r"""A hypergradient method's formula is undefined at the point it reached, so it has no number to return.

    E.g. :class:`~hodl_plugin.IGA` at an iterate where :math:`\nabla_u f = 0` exactly (its multiplier
    :math:`\langle\nabla_u F, \nabla_u f\rangle / \|\nabla_u f\|^2` is 0/0). Raised from ``backward()``
    or the forward call, naming the quantity and what to change.

    >>> import torch, hodl_plugin as hp
    >>> f = lambda u, x: 0.5 * ((u - x) ** 2).sum()       # one step of size 1 lands on u = x: ∇_u f = 0
    >>> solver = hp.GKMSolver(hp.GradientStep(objective=f, step=1.0), max_steps=1, tol=0.0, hypergrad="iga")
    >>> x = torch.ones(2, dtype=torch.float64, requires_grad=True)
    >>> try:
    ...     solver(torch.zeros(2, dtype=torch.float64), x).sum().backward()
    ... except hp.HypergradientError as e:
    ...     print(str(e)[:38])
    IGA: the lower gradient ∇_u f is exact
    """


class ConvergenceWarning(UserWarning):
    """A solve stopped before its tolerance and the user asked for a warning instead of an error.

    >>> import warnings, torch, hodl_plugin as hp
    >>> with warnings.catch_warnings(record=True) as w:
    ...     warnings.simplefilter("always")
    ...     _ = hp.GKMSolver(lambda u: 2.0 * u + 1.0, on_divergence="warn")(torch.zeros(2))
    >>> w[0].category is hp.ConvergenceWarning
    True
    """


class SummableScheduleWarning(ConvergenceWarning):
    r"""An aggregation schedule :math:`\alpha_k` is summable (e.g. :class:`~hodl_plugin.Geometric`).

    Accepted — it is the BDA/BOAT codes' practical default for a few unrolled steps — but outside
    HODL's selection theory, which needs :math:`\sum_k \alpha_k = \infty`: the iterates still
    approach :math:`\mathrm{Fix}\,T` but not necessarily its :math:`F`-optimal point.

    >>> import warnings, hodl_plugin as hp
    >>> with warnings.catch_warnings(record=True) as w:
    ...     warnings.simplefilter("always")
    ...     _ = hp.GKMSolver(lambda u: u, upper=lambda u: (u**2).sum(), alpha=hp.Geometric(0.5, 0.9))
    >>> w[0].category is hp.SummableScheduleWarning, issubclass(hp.SummableScheduleWarning, hp.ConvergenceWarning)
    (True, True)
    """


class UnusedOptionWarning(UserWarning):
    r"""An option was given that the chosen method does not use; said once, at construction.

    E.g. ``tol=`` with ``hypergrad="inexact"``, whose forward stops at its own accuracy
    :math:`\varepsilon_k` (pass ``eps=`` instead).

    >>> import warnings, hodl_plugin as hp
    >>> with warnings.catch_warnings(record=True) as w:
    ...     warnings.simplefilter("always")
    ...     _ = hp.GKMSolver(lambda u: 0.5 * u, hypergrad="inexact", tol=1e-8)
    >>> w[0].category is hp.UnusedOptionWarning
    True
    """
