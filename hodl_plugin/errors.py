"""Errors and warnings raised by hodl_plugin.

Every failure of the lower solve or of a hypergradient computation is reported by one of these
types, with a message naming the quantity at fault. None is raised silently: a solve that cannot be
trusted either raises or, with an explicit opt-out (``on_divergence="warn"``), warns and marks
``info.converged = False``.
"""

from __future__ import annotations

__all__ = [
    "HODLError",
    "ScheduleError",
    "DivergenceError",
    "LinearSolveError",
    "ConvergenceWarning",
]


class HODLError(Exception):
    """Base class of the errors raised by hodl_plugin."""


class ScheduleError(HODLError, ValueError):
    """A step-size / weight schedule violates the convergence conditions of the GKM scheme."""


class DivergenceError(HODLError, RuntimeError):
    """The lower-level fixed-point iteration produced non-finite values or a growing residual."""


class LinearSolveError(HODLError, RuntimeError):
    """The adjoint linear system ``(I - ∂_u T)ᵀ v = ∇_u F`` was not solved to the asked tolerance."""


class ConvergenceWarning(UserWarning):
    """A solve stopped before its tolerance and the user asked for a warning instead of an error."""
