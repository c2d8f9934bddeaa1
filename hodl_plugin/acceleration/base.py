r"""The interface every forward accelerator of the GKM iteration implements (``acceleration=``).

The solver's loop calls, for one run from :math:`u_0`,

.. code-block:: python

    state = acc.init(u0, batch_dims)                # once
    for k in ...:
        f = T(u) - u;  r = norm(f)                  # per sample
        u = acc.step(state, u, f, r, beta_k)        # the next iterate
    acc.report(state, info)                         # counts into SolverInfo

and :meth:`Accelerator.check_compatible` once, when the solver is built. ``step`` receives the
iterate the loop actually used (a converged sample the loop keeps frozen arrives unchanged), so an
accelerator must take its secant pairs from these arguments, never from its own last proposal.

Example — the plain KM step as an accelerator (what ``acceleration=None`` does):

    >>> import torch, hodl_plugin as hp
    >>> class KM(hp.acceleration.Accelerator):
    ...     def init(self, u, batch_dims):
    ...         return None
    ...     def step(self, state, u, f, r, beta):
    ...         return u + beta * f
    >>> u, info = hp.GKMSolver(lambda u: 0.5 * u + 1.0, tol=1e-12, acceleration=KM()).solve(torch.zeros(2))
    >>> u.tolist(), info.converged
    ([2.0, 2.0], True)
"""

from __future__ import annotations

import math
import numbers
from typing import Any, Callable, Optional

import torch
from torch import Tensor

from .._torch_compat import transforms_active
from ..errors import ConfigurationError

try:  # the host (CPU, eager) paths compute in numpy: a few µs less per small operation than torch
    import numpy as np
except ImportError:  # pragma: no cover - torch runs without numpy
    np = None  # type: ignore[assignment]
try:  # numpy.linalg.solve's batched kernel without its checks (4 µs of a 30 µs batch of 64 6x6 solves)
    from numpy.linalg import _umath_linalg
except ImportError:  # pragma: no cover - numpy without the private module
    _umath_linalg = None

__all__ = ["Accelerator"]

#: dtypes the host paths compute in (numpy has no bfloat16; half precision keeps the torch paths)
HOST_DTYPES = (torch.float32, torch.float64)


class MaskedCounters:
    """What the masked per-sample states (Anderson's and Broyden's) share: restarts counted from the
    steps that used their history, and the safeguard's residual limit (no limit: the dtype's max)."""

    steps: int
    fresh: Tensor
    sg: Optional[float]
    big: float

    @property
    def restarts(self) -> Tensor:
        """Restarts + fall-backs of every sample."""
        return (self.steps - 1) - self.fresh

    def _limit(self, r: Tensor) -> Tensor:
        return r * self.sg if self.sg is not None else torch.full_like(r, self.big)


class Accelerator:
    r"""Base class of forward accelerators: :class:`~hodl_plugin.acceleration.Anderson`,
    :class:`~hodl_plugin.acceleration.Broyden`, or your own (see the module docstring).

    Subclasses implement :meth:`init` and :meth:`step`; :meth:`report` adds ``state.steps`` and
    ``state.restarts`` (when the state has them) to the solver's info; :meth:`check_compatible`
    refuses the hypergradient modes and aggregation the extrapolation would make wrong.

    A subclass takes no constructor arguments of its own here; its options are its own
    (:class:`~hodl_plugin.acceleration.Anderson`'s ``history_size``, ...).

    Raises:
        ConfigurationError: (:meth:`check_compatible`, when the solver is built) with
            ``hypergrad="unrolled"`` / ``"truncated"``, or with HODL aggregation (:math:`\alpha_k > 0`).

    Example — a relaxed KM step :math:`u_{k+1} = u_k + \tfrac12\beta_k f_k` as an accelerator, on
    :math:`T(u) = \tfrac12 u + 1` (fixed point 2):

        >>> import torch, hodl_plugin as hp
        >>> class HalfStep(hp.acceleration.Accelerator):
        ...     def init(self, u, batch_dims):
        ...         return None
        ...     def step(self, state, u, f, r, beta):
        ...         return u + 0.5 * beta * f
        >>> u, info = hp.GKMSolver(lambda u: 0.5 * u + 1.0, tol=1e-12,
        ...                        acceleration=HalfStep()).solve(torch.zeros(2, dtype=torch.float64))
        >>> [round(v, 10) for v in u.tolist()], info.converged
        ([2.0, 2.0], True)
    """

    def init(self, u: Tensor, batch_dims: int) -> Any:
        """The state of one run from ``u`` (``batch_dims`` leading dims index independent samples)."""
        raise NotImplementedError

    def step(self, state: Any, u: Tensor, f: Tensor, r: Tensor, beta: float) -> Tensor:
        """The next iterate from ``u``, its residual ``f = T(u) - u`` and the norm(s) ``r`` of ``f``
        (per sample with ``batch_dims``); ``beta`` is the solver's KM relaxation of this step."""
        raise NotImplementedError

    def report(self, state: Any, info: Any) -> None:
        """Add the run's counts to ``info``: ``accelerated`` (steps after the first) and ``restarts``
        (history restarts + safeguard fall-backs, the most over the samples). Eager runs only."""
        steps = getattr(state, "steps", 0)
        if transforms_active() or steps < 1:
            return
        restarts = getattr(state, "restarts", None)
        if restarts is not None:
            info.restarts += int(restarts.max()) if hasattr(restarts, "max") else int(restarts)
        info.accelerated += max(0, steps - 1)

    def check_compatible(self, mode: str, alpha: object) -> None:
        r"""Refuse the combinations that would be wrong.

        - ``hypergrad="unrolled"/"truncated"``: differentiating through the extrapolation is not
          supported (the implicit, inexact and first_order modes are exact at the fixed point
          whatever the forward iteration was);
        - HODL aggregation (:math:`\alpha_k > 0`): the selection of the F-optimal fixed point comes
          from the slowly vanishing :math:`\alpha_k` over the whole run, which extrapolation skips.
        """
        name = f"acceleration={type(self).__name__}(...)"
        if mode in ("unrolled", "truncated"):
            raise ConfigurationError(
                f"{name} cannot be used with hypergrad={mode!r}: differentiating through the extrapolation "
                "is not supported; use hypergrad='implicit', 'inexact' or 'first_order' (exact at the fixed "
                "point whatever the forward), or acceleration=None"
            )
        from ..schedules import is_zero

        if alpha is not None and not is_zero(alpha):  # type: ignore[arg-type]
            raise ConfigurationError(
                f"{name} cannot be combined with HODL aggregation (alpha_k > 0): the selection of the "
                "F-optimal fixed point comes from the slowly vanishing alpha_k over the whole run, which "
                "extrapolation skips. Pass alpha=0 (keeps upper for the inexact bound) or acceleration=None"
            )


# -- validation shared by the accelerators' constructors -----------------------------------------
def check_history(value: object, name: str = "history_size") -> int:
    """An integer >= 1 (not a bool, not 2.5)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
    return int(value)


def check_mixing(value: object) -> Optional[float]:
    """``None`` (the solver's beta) or a number in (0, 1]."""
    if value is None:
        return None
    if isinstance(value, bool) or not (isinstance(value, numbers.Real) and 0 < value <= 1):
        raise ValueError(f"mixing must be None or in (0, 1], got {value!r}")
    return float(value)


def check_safeguard(value: object) -> float:
    """A number >= 1 (``inf`` switches the safeguard off)."""
    if isinstance(value, bool) or not (isinstance(value, numbers.Real) and value >= 1):
        raise ValueError(f"safeguard must be >= 1 (inf: off), got {value!r}")
    return float(value)


def check_restart_cond(value: object) -> float:
    """A number > 1 (``inf``: never restart on conditioning)."""
    if isinstance(value, bool) or not (isinstance(value, numbers.Real) and value > 1):
        raise ValueError(f"restart_cond must be > 1, got {value!r}")
    return float(value)


# -- helpers of the batched paths ------------------------------------------------------------------
def batch_size(u: Tensor, batch_dims: int) -> int:
    """The number of samples: the product of the ``batch_dims`` leading sizes (1 without)."""
    return int(math.prod(u.shape[:batch_dims])) if batch_dims else 1


def host_ok(u: Tensor, force: Optional[bool] = None) -> bool:
    """Whether a run on ``u`` may take the host path: CPU, float32/float64, eager, no autograd, numpy
    importable (a CPU tensor is read without a device sync). ``force`` overrides (tests)."""
    if force is not None:
        return force and np is not None and u.dtype in HOST_DTYPES and not transforms_active()
    return (
        np is not None
        and u.device.type == "cpu"
        and u.dtype in HOST_DTYPES
        and not u.requires_grad
        and not transforms_active()
    )


def as_rows(t: Tensor, B: int, n: int) -> Any:
    """``t`` as a ``(B, n)`` numpy array sharing memory where it can (a view of a contiguous
    tensor; a copy otherwise)."""
    if t.requires_grad:
        t = t.detach()
    return t.numpy().reshape(B, n)  # (numpy's reshape costs a fraction of torch's)


def row_sq(a: Any, dtype: Any = None) -> Any:
    r""":math:`\sum_i a_{\dots i}^2` over the last axis of a numpy array (``np.vecdot`` from numpy 2 on,
    ``einsum`` before), accumulated in ``dtype`` (default: ``a``'s)."""
    if hasattr(np, "vecdot"):
        return np.vecdot(a, a) if dtype is None else np.vecdot(a, a, dtype=dtype)
    return np.einsum("...i,...i->...", a, a, dtype=dtype)


#: norms inside this range have their squares (and Gram matrices of vectors of such norms) well inside float64's
#: range; outside it a norm is measured again, scaled, and a host accelerator steps in power-of-2 units
NORMAL = (1e-140, 1e140)
#: the same for float32 state (its squares leave float32's range beyond about 1e±19)
NORMAL32 = (1e-15, 1e15)


def normal_window(dtype: Any) -> tuple[float, float]:
    """:data:`NORMAL` for float64 state, :data:`NORMAL32` for float32 (a numpy or torch dtype)."""
    return NORMAL if dtype in (torch.float64, np.float64) else NORMAL32


def row_norms(a: Any, window: tuple[float, float] = NORMAL) -> tuple[Any, bool]:
    """``(r, normal)``: the norms of the rows of a ``(B, n)`` numpy array, in float64, and whether all of
    them lie in ``window``; a row whose squares leave float64's range (entries beyond about 1e±150)
    is measured again, scaled by its largest entry."""
    if not a.shape[-1]:  # rows of no entries (nothing to scale)
        return np.zeros(a.shape[0]), True
    with np.errstate(over="ignore", invalid="ignore"):  # (the squares of a row beyond 1e154 overflow: measured again)
        r = np.sqrt(row_sq(a, np.float64))
        if not r.size or (np.minimum.reduce(r) > window[0] and np.maximum.reduce(r) < window[1]):  # (NaN fails)
            return r, True
        if np.isfinite(r).all() and (r > 1e-140).all() and (r < 1e140).all():  # in float64's range: exact already
            return r, False
        m = np.abs(a).max(axis=1).astype(np.float64)
        m[~(m > 0) | ~np.isfinite(m)] = 1.0
        return np.sqrt(row_sq(a / m[:, None].astype(a.dtype), np.float64)) * m, False


def rescale(state: Any, rn: Any, window: tuple[float, float], reset: Callable[[Any], None]) -> Any:
    """Per-sample exponents :math:`e_b` such that :math:`2^{e_b}` brings each residual norm to about 1
    wherever it left ``window`` in the state's current units; returns them (the callers scale by
    ``np.ldexp``, which never forms a power of 2 that overflows). A host accelerator steps in these units,
    so a sample at 1e160 or 1e-310 is accelerated like one at 1 (its small matrices would over- or
    underflow); the scaling is exact and changes rarely (after ``window``'s worth of progress), and a
    sample whose units change has its history cleared (``reset(mask)``) and its last accepted point,
    residual and safeguard limit rescaled. ``state`` has ``scale`` (the exponents, ``None`` until first
    needed), ``B``, ``up``, ``fp``, ``rlim`` and ``big``."""
    if state.scale is None:
        state.scale = np.zeros(state.B, np.int64)
    now = np.ldexp(rn, state.scale)
    move = ((now < window[0]) & (now > 0)) | ((now > window[1]) & np.isfinite(now))
    if move.any():
        e = state.scale.copy()
        e[move] = -np.round(np.log2(rn[move])).astype(np.int64)
        d = e - state.scale
        state.up, state.fp = np.ldexp(state.up, d[:, None]), np.ldexp(state.fp, d[:, None])
        state.rlim = np.where(state.rlim < state.big, np.ldexp(state.rlim, d), state.big)
        reset(move)
        state.scale = e
    return state.scale


def solve(A: Any, B: Any, quiet: bool = True) -> Any:
    """The batched solve ``A⁻¹B`` of numpy arrays ``(b, m, m)``, ``(b, m, k)``: NaN for a singular
    matrix (the others are unaffected), no exception, no warning (``quiet=False``: the caller already
    silences numpy's floating-point warnings)."""
    if not quiet and _umath_linalg is not None:
        return _umath_linalg.solve(A, B)
    with np.errstate(all="ignore"):
        if _umath_linalg is not None:
            return _umath_linalg.solve(A, B)
        try:  # pragma: no cover - numpy without the private module
            return np.linalg.solve(A, B)
        except np.linalg.LinAlgError:  # pragma: no cover
            s, info = torch.linalg.solve_ex(torch.from_numpy(A), torch.from_numpy(B))
            out = s.numpy().copy()
            out[info.numpy() != 0] = np.nan
            return out
