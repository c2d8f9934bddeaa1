r"""The GKM (Generalized Krasnoselskii–Mann) iteration with HODL's aggregation (:ref:`math-gkm`).

For :math:`k = 0, \dots, K-1`

.. math::

    w_k     &= u_k - \alpha_k s \nabla_u F(u_k; x)       &\text{(aggregation)}\\
    u_{k+1} &= (1-\beta_k)\,u_k + \beta_k\,T(w_k; x)      &\text{(KM relaxation)}

Special cases: :math:`\alpha \equiv 0` is plain KM; :math:`\alpha\equiv 0, \beta\equiv 1` the plain
fixed-point iteration (unrolled ODL); :math:`\alpha_k = \alpha_0/(k+1)^\gamma`,
:math:`\gamma\in(0,1]` the BDA/HODL selection of the :math:`F`-optimal fixed point.

**"Outside" aggregation** (``aggregation="outside"``, the same group's BDA code and BOAT's GDA):

.. math::

    u_{k+1} = (1-\beta_k)\,u_k + \beta_k\big[(1-\alpha_k)\,T(u_k; x) + \alpha_k\,(u_k - s\nabla_u F(u_k; x))\big].

For a gradient lower level :math:`T(u) = u - t\nabla f(u)` and :math:`\beta \equiv 1` this is one
gradient step on :math:`(1-\alpha_k) f + \alpha_k F` when :math:`t = s` (BOAT's
``boat_torch/gm_ol/ngd.py`` with ``gda_loss``); with :math:`F = \tfrac12\|u - z\|^2, s = 1` it is the
Halpern iteration anchored at :math:`z`.

**Stopping** (:mod:`hodl_plugin._stopping`): at a check the residual of the current point
:math:`r_k = \|T(u_k) - u_k\|` is compared with :math:`\max(\mathrm{tol}\cdot\|u_k\|,\ \mathrm{atol})`
and a sample that meets it returns that :math:`u_k`. With ``aggregation="inside"`` the residual that
costs nothing is :math:`\|T(w_k) - u_k\|`; a stop on it is followed by plain KM steps until the
fixed-point residual itself meets the threshold (:meth:`GKMIteration.run`). So ``converged=True``
always means :math:`\|T(u) - u\| \le \max(\mathrm{tol}\|u\|, \mathrm{atol})` at the returned
:math:`u`, and ``info.residual`` is that residual.

This module only iterates; differentiation is the job of the hypergradient methods.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import numbers
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Sequence

import torch
from torch import Tensor

from ._autodiff import grad_u
from ._checks import check_operator_output, guard_inplace
from ._stopping import Monitor, certifies, default_tol
from ._torch_compat import transforms_active
from .errors import ConfigurationError
from .krylov import FORWARDS, krylov_run, resolve
from .linear_solve import LinearSolveInfo
from .schedules import Constant, Schedule, as_schedule, is_zero

__all__ = ["SolverInfo", "GKMIteration", "default_tol", "AGGREGATIONS", "validate_count"]

#: where the upper descent step enters the GKM step (module docstring)
AGGREGATIONS = ("inside", "outside")

Operator = Callable[..., Tensor]


@dataclass
class SolverInfo:
    """Diagnostics of one lower-level solve; travels with the result as ``solver.info``.

    Attributes:
        mode: the hypergradient method that ran (``"implicit"``, ``"unrolled"``, ...).
        steps: the index k of the returned iterate :math:`u_k` (the most over the samples with
            ``batch_dims``).
        residuals: the residual at every check and, last, the fixed-point residual
            :math:`\\|T(u) - u\\|` of the returned point (with ``tol=0, atol=0``, which evaluates T exactly
            K times: the last step's residual, :math:`\\|T(w_{K-1}) - u_{K-1}\\|`, which bounds the
            returned point's for a nonexpansive T without aggregation); 1-D, or ``(checks, *batch)`` with
            ``batch_dims``.
        residual_steps: the step index k of each entry of ``residuals``.
        converged: the returned point meets ``‖T(u) - u‖ ≤ max(tol·‖u‖, atol)`` (every sample's).
            With no tolerance (``tol=0, atol=0``: exactly K steps) it says whether that last residual
            meets the dtype's default relative tolerance :func:`default_tol`.
        diverged: the iteration produced non-finite values, a residual that grew past
            ``divergence_factor`` times the first one or kept growing, or one that stopped
            decreasing far above any rounding error (T is not nonexpansive there).
        tol: the threshold ``max(tol·‖u‖, atol)`` of the last test; with ``batch_dims``, that of the worst
            sample (the one whose residual is largest relative to its own threshold).
        steps_per_sample, converged_per_sample, tol_per_sample: with ``batch_dims``, tensors over the batch
            (the last: each sample's threshold at the point it returned).
        exact_steps: no tolerance was asked (``tol=0, atol=0``).
        accelerated: steps taken by the acceleration, restarts: its history restarts and
            safeguard fall-backs (with ``acceleration=``).
        adjoint: diagnostics of the adjoint linear solve, filled in by ``backward()``
            (implicit and inexact modes).
        eps, delta: accuracies used by the inexact mode at this call.
        error_bound: certified a-posteriori bound on the hypergradient error (inexact mode, after
            ``backward()``), or ``None`` with ``message`` saying why it could not be certified.
        error_estimate: the same formula with estimated constants — not a bound.
        forward: the forward that ran: ``"gkm"``, or the Krylov method of ``forward="krylov"``
            (``"cg"`` / ``"gmres"``; :mod:`hodl_plugin.krylov`).
        error_bound_per_sample, error_estimate_per_sample: under ``vmap``, the bound and estimate
            of each sample's hypergradient (``error_bound`` is then their maximum).
        message: why the run stopped early, diverged, or could not be certified.

    Under ``torch.func`` transforms the loop runs without host syncs and records no residuals
    (``message`` says so).

    Example:
        >>> import torch, hodl_plugin as hp
        >>> u, info = hp.GKMSolver(lambda u: 0.5 * u + 1.0, tol=1e-10).solve(torch.zeros(2))
        >>> info.converged, info.steps, info.residual <= 1e-10 * float(u.norm())
        (True, 29, True)
    """

    mode: str
    steps: int = 0
    residuals: Tensor = field(default_factory=lambda: torch.empty(0))
    residual_steps: list[int] = field(default_factory=list)
    converged: bool = False
    diverged: bool = False
    tol: float = 0.0
    adjoint: Optional[LinearSolveInfo] = None
    eps: Optional[float] = None
    delta: Optional[float] = None
    error_bound: Optional[float] = None
    error_estimate: Optional[float] = None
    error_bound_per_sample: Optional[Tensor] = None
    error_estimate_per_sample: Optional[Tensor] = None
    message: str = ""
    steps_per_sample: Optional[Tensor] = None
    converged_per_sample: Optional[Tensor] = None
    tol_per_sample: Optional[Tensor] = None
    exact_steps: bool = False
    accelerated: int = 0
    restarts: int = 0
    initial_residual: Any = None  # the first check's residual: a float (one problem) or a tensor per sample
    warm_started: Optional[bool] = None
    higher_solves: int = 0
    forward: str = "gkm"

    @property
    def residual(self) -> float:
        """The residual of the returned point, the largest over the batch (``nan`` when none)."""
        return float(self.residuals[-1].max()) if self.residuals.numel() else math.nan


# ------------------------------------------------------------------------------------------------
# validation (the iteration's options are checked here, once)
# ------------------------------------------------------------------------------------------------
def validate_count(value: object, name: str, minimum: int = 1) -> int:
    """An integer argument >= ``minimum`` (an integral float such as ``3.0`` is accepted).

    Args:
        value: the argument to check.
        name: its name, for the message.
        minimum: the least value accepted.

    Returns:
        ``value`` as an ``int``.

    Raises:
        ValueError: ``value`` is not an integer (a bool is not), or is below ``minimum``.

    >>> validate_count(3.0, "max_steps")
    3
    >>> validate_count(2.5, "max_steps")
    Traceback (most recent call last):
    ...
    ValueError: max_steps must be an integer >= 1, got 2.5
    """
    ok = isinstance(value, numbers.Integral) and not isinstance(value, bool)
    if isinstance(value, float) and math.isfinite(value) and value.is_integer():
        ok = True
    if not ok or int(value) < minimum:  # type: ignore[call-overload]
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return int(value)  # type: ignore[call-overload]


def validate_nonneg(value: object, name: str, allow_none: bool = False) -> Optional[float]:
    """A finite number >= 0 (``None`` too when ``allow_none``).

    >>> validate_nonneg(-1, "tol")
    Traceback (most recent call last):
    ...
    ValueError: tol must be a finite number >= 0, got -1
    """
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a number >= 0, got {value!r}")
    v = float(value)
    if not (math.isfinite(v) and v >= 0):
        raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
    return v


def validate_relative(value: object, name: str, allow_none: bool = False) -> Optional[float]:
    """A relative tolerance: a finite number in [0, 1) (``‖r‖ ≤ tol·‖u‖`` with tol >= 1 asks nothing).

    >>> validate_relative(1.0, "tol")
    Traceback (most recent call last):
    ...
    ValueError: tol is relative and must be in [0, 1) (tol >= 1 accepts any point), got 1.0
    """
    v = validate_nonneg(value, name, allow_none)
    if v is not None and v >= 1:
        raise ValueError(f"{name} is relative and must be in [0, 1) ({name} >= 1 accepts any point), got {value!r}")
    return v


def validate_choice(value: object, name: str, choices: Sequence[str]) -> str:
    """One of ``choices``."""
    if not isinstance(value, str) or value not in choices:
        raise ValueError(f"{name} must be one of {list(choices)}, got {value!r}")
    return value


# ------------------------------------------------------------------------------------------------
# the iteration
# ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class GKMIteration:
    r"""The GKM iteration's options (validated once, here) and its loop, :meth:`run`.

    Created by :class:`hodl_plugin.GKMSolver` (whose arguments document these fields); a copy with
    other options is ``iteration.replace(tol=1e-6)``. :meth:`run` takes, for :math:`k = 0, 1, \dots`,
    the GKM step of the module docstring (:ref:`math-gkm`) and stops on the residual test of
    :ref:`math-stopping`.

    Attributes:
        T: the operator ``T(u, *params) -> tensor shaped like u``, nonexpansive in :math:`u`.
        max_steps: :math:`K`, the most steps of a run (an integer >= 1).
        tol: relative tolerance (``None``: :func:`default_tol` of the dtype).
        atol: absolute tolerance; the threshold is :math:`\max(\mathrm{tol}\cdot\|u\|, \mathrm{atol})`.
        beta: the KM relaxation :math:`\beta_k` (a number or a schedule; stored as a schedule).
        upper: the upper objective :math:`F(u, *params)` (a scalar), or ``None``.
        upper_grad: :math:`\nabla_u F(u, *params)` directly, instead of autograd on ``upper``.
        upper_step: :math:`s`, the step of the upper descent direction (> 0).
        alpha: the aggregation weights :math:`\alpha_k` (``None``: no aggregation).
        aggregation: ``"inside"`` or ``"outside"`` (:data:`AGGREGATIONS`, module docstring).
        check_every: steps between residual checks.
        divergence_factor: a residual above this multiple of the first one is a divergence (> 1).
        on_divergence: ``"raise"`` or ``"warn"``.
        batch_dims: leading dims of ``u`` that index independent problems.
        acceleration: ``None`` or an accelerator (:class:`~hodl_plugin.acceleration.Anderson`,
            :class:`~hodl_plugin.acceleration.Broyden`).
        forward: ``"gkm"``, or a Krylov forward of an affine ``T`` (:ref:`math-krylov`); ``"krylov"``
            is resolved to ``"cg"`` or ``"gmres"`` here.

    Raises:
        ValueError, TypeError: an option out of range or of the wrong type (named in the message).
        ConfigurationError: ``acceleration`` with aggregation (:math:`\alpha_k > 0`), or a Krylov
            ``forward`` with acceleration, aggregation or ``tol=0, atol=0``.

    >>> import torch
    >>> it = GKMIteration(lambda u, x: 0.5 * u + x, max_steps=100, tol=1e-12)
    >>> info = SolverInfo(mode="plain")
    >>> u = it.run(torch.zeros(2, dtype=torch.float64), [torch.ones(2, dtype=torch.float64)], info)
    >>> info.converged, info.steps, info.residual <= 1e-12 * float(u.norm())
    (True, 39, True)
    """

    T: Operator
    max_steps: int = 1000
    tol: Optional[float] = None
    atol: float = 0.0
    beta: Schedule = Constant(1.0)
    upper: Optional[Callable[..., Tensor]] = None
    upper_grad: Optional[Callable[..., Tensor]] = None
    upper_step: float = 1.0
    alpha: Optional[Schedule] = None
    aggregation: str = "inside"
    check_every: int = 10
    divergence_factor: float = 1e4
    on_divergence: str = "raise"
    batch_dims: int = 0
    acceleration: Any = None
    forward: str = "gkm"

    def __post_init__(self) -> None:
        if not callable(self.T):
            raise TypeError(f"T must be callable (u, *params) -> tensor, got {type(self.T).__name__}")
        put = object.__setattr__
        put(self, "max_steps", validate_count(self.max_steps, "max_steps"))
        put(self, "tol", validate_relative(self.tol, "tol", allow_none=True))
        put(self, "atol", validate_nonneg(self.atol, "atol"))
        put(self, "beta", as_schedule(self.beta, "beta"))
        if self.alpha is not None:
            put(self, "alpha", as_schedule(self.alpha, "alpha"))
        validate_choice(self.aggregation, "aggregation", AGGREGATIONS)
        put(self, "check_every", validate_count(self.check_every, "check_every"))
        put(self, "batch_dims", validate_count(self.batch_dims, "batch_dims", minimum=0))
        f = self.divergence_factor
        if isinstance(f, bool) or not isinstance(f, numbers.Real) or not float(f) > 1:
            raise ValueError(f"divergence_factor must be a number > 1 (inf disables it), got {f!r}")
        put(self, "divergence_factor", float(f))
        validate_choice(self.on_divergence, "on_divergence", ("raise", "warn"))
        if self.upper is not None and not callable(self.upper):
            raise TypeError("upper must be callable (u, *params) -> scalar tensor")
        if self.upper_grad is not None and not callable(self.upper_grad):
            raise TypeError("upper_grad must be callable (u, *params) -> tensor shaped like u")
        s = self.upper_step
        if isinstance(s, bool) or not isinstance(s, numbers.Real) or not (math.isfinite(s) and s > 0):
            raise ValueError(f"upper_step s must be a finite number > 0, got {s!r}")
        put(self, "upper_step", float(s))
        acc = self.acceleration
        if acc is not None and not (callable(getattr(acc, "init", None)) and callable(getattr(acc, "step", None))):
            raise TypeError(
                f"acceleration must be None or an accelerator such as hodl_plugin.Anderson(...), got "
                f"{type(acc).__name__}"
            )
        if acc is not None and self.aggregates:
            raise ConfigurationError(
                "acceleration cannot be combined with HODL aggregation (alpha_k > 0): the selection of the "
                "F-optimal fixed point comes from the slowly vanishing alpha_k over the whole run, which "
                "extrapolation skips. Pass alpha=0 (keeps upper for the inexact bound) or acceleration=None"
            )
        validate_choice(self.forward, "forward", FORWARDS)
        put(self, "forward", resolve(self.forward, self.T))
        if self.forward != "gkm":
            self._check_krylov()

    def _check_krylov(self) -> None:
        """The options a Krylov forward cannot honour are refused (:mod:`hodl_plugin.krylov`)."""
        if self.acceleration is not None:
            raise ConfigurationError(
                f"forward={self.forward!r} solves the affine fixed-point equation directly; it takes no acceleration "
                "(pass acceleration=None, or forward='gkm' to accelerate the GKM iteration)"
            )
        if self.aggregates:
            raise ConfigurationError(
                f"forward={self.forward!r} cannot run HODL aggregation (alpha_k > 0): the selection of the F-optimal "
                "fixed point is the GKM iteration's; pass alpha=0 or forward='gkm'"
            )
        if self.tol is not None and self.tol == 0 and self.atol == 0:
            raise ConfigurationError(
                f"forward={self.forward!r} stops on a tolerance; tol=0, atol=0 (exactly max_steps GKM steps) needs "
                "forward='gkm'"
            )

    def replace(self, **changes: Any) -> GKMIteration:
        """A copy with other options (validated again)."""
        return dataclasses.replace(self, **changes)

    @property
    def aggregates(self) -> bool:
        """Whether HODL aggregation is on (an upper objective and a schedule ``alpha`` that is not 0)."""
        if self.alpha is None or (self.upper is None and self.upper_grad is None):
            return False
        return not is_zero(self.alpha)

    def grad_upper(self, u: Tensor, params: Sequence[Any]) -> Tensor:
        r""":math:`\nabla_u F(u; x)`, differentiable w.r.t. ``u`` and ``x`` when grad mode is on."""
        if self.upper_grad is not None:
            g = self.upper_grad(u, *params)
            if not isinstance(g, Tensor) or g.shape != u.shape:
                raise ValueError(
                    f"upper_grad(u, *params) must return a tensor shaped like u {tuple(u.shape)}, got "
                    f"{tuple(g.shape) if isinstance(g, Tensor) else type(g).__name__} (it would be broadcast)"
                )
            return g
        assert self.upper is not None
        return grad_u(self.upper, u, params)

    def tolerances(self, dtype: torch.dtype, tol: Optional[float] = None,
                   atol: Optional[float] = None) -> tuple[float, float]:
        """``(relative, absolute)`` tolerances of a run: the arguments, else the iteration's own,
        with ``tol=None`` meaning :func:`default_tol` of the dtype."""
        rel = self.tol if tol is None else validate_relative(tol, "tol")
        absolute = self.atol if atol is None else validate_nonneg(atol, "atol")
        return (default_tol(dtype) if rel is None else rel), absolute  # type: ignore[return-value]

    # -- the loop ------------------------------------------------------------------------------
    def run(self, u: Tensor, params: Sequence[Any], info: SolverInfo, *, start: int = 0,
            num_steps: Optional[int] = None, tol: Optional[float] = None, atol: Optional[float] = None,
            stop: bool = True, t0: Optional[Tensor] = None) -> Tensor:
        r"""Up to ``num_steps`` (default ``max_steps``) GKM steps from ``u`` = :math:`u_{\text{start}}`;
        ``info`` is updated in place; the returned point's residual is its last entry.

        ``tol`` (relative) and ``atol`` (absolute) override the iteration's; ``tol=0, atol=0`` or
        ``stop=False`` runs all the steps. Autograd records the steps iff grad mode is on (the
        caller decides). With ``aggregation="inside"`` a stop on the aggregated residual is followed
        by plain KM steps (:math:`\alpha = 0`) until :math:`\|T(u) - u\|` meets the threshold: with
        :math:`\alpha_k > 0` the aggregated residual can be small while :math:`u_k` is still
        :math:`O(\alpha_k)` away from :math:`\mathrm{Fix}\,T`. ``t0``: :math:`T(u)` when the caller has
        evaluated it already (at this very ``u`` and ``params``, checked as a first step is), so the
        run does not evaluate it again.
        """
        n = self.max_steps if num_steps is None else num_steps
        if self.forward != "gkm" and stop and not transforms_active():
            rel, absolute = self.tolerances(u.dtype, tol, atol)
            if rel > 0 or absolute > 0:
                return self._run_krylov(u, params, info, start, n, rel, absolute, tol, t0)
        steps0 = info.steps
        out = self._run_once(u, params, info, start, n, tol, atol, stop, plain=False, t0=t0)
        if not (self.aggregates and self.aggregation == "inside" and stop) or transforms_active():
            return out
        done = info.steps - steps0
        if done >= n or not info.converged or info.diverged or info.exact_steps:
            return out
        return self._run_once(out, params, info, start + done, n - done, tol, atol, stop, plain=True)

    def _run_krylov(self, u: Tensor, params: Sequence[Any], info: SolverInfo, start: int, n: int, rel: float,
                    absolute: float, tol: Optional[float], t0: Optional[Tensor]) -> Tensor:
        """The Krylov forward (:func:`~hodl_plugin.krylov.krylov_run`), which runs without autograd."""
        if torch.is_grad_enabled() and (u.requires_grad or _any_grad(params)):
            raise ConfigurationError(
                f"forward={self.forward!r} runs without autograd (the implicit, inexact and first_order modes); "
                "use forward='gkm' with unrolled/truncated"
            )
        certified = not (self.tol is None and tol is None and not certifies(u.dtype))
        return krylov_run(self, u, params, info, start=start, n=n, rel=rel, absolute=absolute, certified=certified,
                          t0=t0)

    def _run_once(self, u: Tensor, params: Sequence[Any], info: SolverInfo, start: int, n: int,
                  tol: Optional[float], atol: Optional[float], stop: bool, plain: bool,
                  t0: Optional[Tensor] = None) -> Tensor:
        """One loop: the residual is tested at the first step of a solve and every ``check_every``
        steps (one host sync each, none under ``torch.func`` transforms); the steps in between are
        bare ``u ← (1-β)u + βT(w)``."""
        rel, absolute = self.tolerances(u.dtype, tol, atol)
        info.exact_steps = not (rel > 0 or absolute > 0)
        if n < 1:
            return u
        functional = transforms_active()
        if self.batch_dims > u.dim():
            raise ValueError(f"batch_dims={self.batch_dims} but u0 has only {u.dim()} dimensions")
        if self.batch_dims and u.numel() == 0 and not functional:  # no sample, or samples of size 0: solved
            batch = u.shape[: self.batch_dims]
            info.converged, info.tol = True, 0.0
            info.steps_per_sample = torch.zeros(batch, dtype=torch.long, device=u.device)
            info.converged_per_sample = torch.ones(batch, dtype=torch.bool, device=u.device)
            return u.clone()
        # float16/bfloat16: only a tolerance the caller gave is a claim they accept (an exact-steps run is
        # judged by the dtype's default, which certifies nothing there)
        explicit = (self.tol is not None or tol is not None) and not info.exact_steps
        certified = certifies(u.dtype) or explicit
        mon = Monitor(self, u, info, rel, absolute, stop and not info.exact_steps, functional, start, certified,
                      aggregating=self.aggregates and not plain, defer=self.acceleration is None)
        first_check = info.steps == 0 and not functional
        u = u.clone()  # a private copy: an operator writing into its input cannot touch the caller's u0
        acc_state = None
        if self.acceleration is not None:
            if torch.is_grad_enabled() and (u.requires_grad or _any_grad(params)):
                raise ConfigurationError(
                    "acceleration runs only without autograd (the implicit, inexact and first_order modes); "
                    "use acceleration=None with unrolled/truncated"
                )
            acc_state = self.acceleration.init(u, self.batch_dims)
            step: Callable = functools.partial(self._accelerated_step, acc_state)
        elif self.aggregates and not plain and self.aggregation == "outside":
            step = self._outside_step
        else:
            step = self._inside_step if self.aggregates and not plain else self._plain_step
        # the returned point's residual is measured after the loop (one more evaluation of T), except in
        # an exact-steps run (tol=0, atol=0), which evaluates T exactly K times (unrolled models count
        # on it) and reports the last step's residual instead
        measure = not info.exact_steps
        fresh = acc_state is not None  # an accelerator's step returns a new tensor of its own
        countdown, executed = self.check_every, n
        for j in range(n):
            k = start + j
            check = (j == 0 and first_check) or countdown == 1 or (j == n - 1 and not measure)
            countdown = self.check_every if countdown == 1 else countdown - 1
            # T's first two calls are guarded: the second sees T's own first output as u (a T that reuses an
            # output buffer, out=..., would write into u from then on)
            u_next, d, r, agg, gate = step(u, params, k, j <= 1, functional, check, t0 if j == 0 else None)
            if not check:
                u = mon.freeze(u_next, u, fresh) if mon.masking else u_next
                continue
            u = mon.check(k, r, u, mon.freeze(u_next, u, fresh), d, agg, gate)
            if mon.done:
                executed = j
                break
        u = mon.restore(u)
        mon.finish(u, executed, self._residual_fn(params) if measure else None)
        if acc_state is not None:
            self.acceleration.report(acc_state, info)
        return u

    def _call_T(self, w: Tensor, params: Sequence[Any], first: bool, functional: bool, like: Tensor,
                t0: Optional[Tensor] = None) -> Tensor:
        if t0 is not None and w is like:  # T(u_0), evaluated (and checked) by the caller
            return t0
        if first:
            out = guard_inplace(self.T, w, params, functional)
            check_operator_output(out, like)
            return out
        return self.T(w, *params)

    # a step returns (u_next, d, r, agg, gate): at a check, the difference d = T(·) - u_k whose norm is the
    # residual (the monitor takes it, with ‖u_k‖, in one operation), or that norm r itself; agg is the
    # size of the aggregation's displacement α_k s‖∇F(u_k)‖ (None without aggregation); gate, the outside
    # form's selection test ‖T(u_k - α_k s∇F(u_k)) - u_k‖, which must meet the tolerance too (None elsewhere)
    def _plain_step(self, u, params, k, first, functional, check, t0=None):
        Tu = self._call_T(u, params, first, functional, u, t0)
        b = self.beta(k)
        u_next = Tu if b == 1.0 else u + b * (Tu - u)
        return u_next, ((Tu - u) if check else None), None, None, None

    def _inside_step(self, u, params, k, first, functional, check, t0=None):
        a = self.alpha(k)  # type: ignore[misc]
        step = (a * self.upper_step) * self.grad_upper(u, params) if a != 0.0 else None
        w = u - step if step is not None else u
        Tw = self._call_T(w, params, first, functional, u, t0)
        b = self.beta(k)
        u_next = Tw if b == 1.0 else u + b * (Tw - u)
        if not check:
            return u_next, None, None, None, None
        return u_next, Tw - u, None, (self._norm(step) if step is not None else None), None

    def _outside_step(self, u, params, k, first, functional, check, t0=None):
        Tu = self._call_T(u, params, first, functional, u, t0)
        a = float(self.alpha(k))  # type: ignore[misc]
        g = self.grad_upper(u, params) if a != 0.0 else None
        v = (1.0 - a) * Tu + a * (u - self.upper_step * g) if g is not None else Tu
        b = self.beta(k)
        u_next = v if b == 1.0 else u + b * (v - u)
        if not check:
            return u_next, None, None, None, None
        if g is None:
            return u_next, Tu - u, None, None, None
        # a start in Fix T has Tu - u = 0 but is not the selected point unless the aggregated step leaves
        # it there: T(u - α s∇F(u)) - u vanishes at the F-optimal point of Fix T (∇F normal to Fix T)
        step = (a * self.upper_step) * g
        gate = self._norm(self.T(u - step, *params) - u)
        return u_next, Tu - u, None, self._norm(step), gate

    def _accelerated_step(self, state, u, params, k, first, functional, check, t0=None):
        Tu = self._call_T(u, params, first, functional, u, t0)
        f = Tu - u
        # a host state measures its samples itself (numpy): torch's norms only where the check reads them
        r = self._norm(f) if check or not getattr(state, "measures_itself", False) else None
        return self.acceleration.step(state, u, f, r, float(self.beta(k))), f, r, None, None

    def _norm(self, t: Tensor) -> Tensor:
        dims = tuple(range(self.batch_dims, t.dim()))
        t = t.detach()
        if not dims:
            return t.abs()
        # float32 / half: summed in float64 (the squares of entries below ~1e-19 or above ~1e19 leave float32)
        low = t.dtype in (torch.float32, torch.float16, torch.bfloat16)
        return torch.linalg.vector_norm(t, dim=dims, dtype=torch.float64 if low else None)

    def _residual_fn(self, params: Sequence[Any]) -> Callable[[Tensor], Tensor]:
        """``u -> T(u) - u`` without autograd (the returned point's residual is its norm)."""

        from ._capture import detached

        def residual(u: Tensor) -> Tensor:
            with torch.no_grad():
                ud = u.detach()
                return self.T(ud, *detached(params)) - ud

        return residual


def _any_grad(params: Sequence[Any]) -> bool:
    from ._capture import flatten

    return any(t.requires_grad for t in flatten(params)[0])
