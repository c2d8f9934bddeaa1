r"""The GKM (Generalized Krasnoselskii–Mann) iteration with HODL's aggregation (see the math page).

For :math:`k = 0, \dots, K-1`

.. math::

    v_k     &= u_k - s\,\nabla_u F(u_k; x)                 &\text{(upper-level descent direction)}\\
    w_k     &= (1-\alpha_k)\,u_k + \alpha_k v_k = u_k - \alpha_k s \nabla_u F(u_k; x)
                                                          &\text{(aggregation)}\\
    u_{k+1} &= (1-\beta_k)\,u_k + \beta_k\,T(w_k; x)      &\text{(KM relaxation)}

Special cases: :math:`\alpha \equiv 0` is plain KM; :math:`\alpha\equiv 0, \beta\equiv 1` the plain
fixed-point iteration (unrolled ODL); :math:`\alpha_k = \alpha_0/(k+1)^\gamma`,
:math:`\gamma\in(0,1]` the BDA/HODL selection of the :math:`F`-optimal fixed point.

The residual recorded at step k is :math:`r_k = \|T(w_k; x) - u_k\| = \|u_{k+1}-u_k\|/\beta_k`,
which is the fixed-point residual :math:`\|u_k - T(u_k)\|` when :math:`\alpha_k = 0` and tends to
it as :math:`\alpha_k \to 0`; it costs no extra evaluation of :math:`T`.

**"Outside" aggregation** (``aggregation="outside"``): the same group's Bilevel Descent
Aggregation code combines the two steps *after* the operator, not inside it,

.. math::

    u_{k+1} = (1-\beta_k)\,u_k + \beta_k\big[(1-\alpha_k)\,T(u_k; x) + \alpha_k\,(u_k - s\nabla_u F(u_k; x))\big].

For a gradient lower level :math:`T(u) = u - t\nabla f(u)` and :math:`\beta \equiv 1` this is
:math:`u_{k+1} = u_k - (1-\alpha_k)\,t\nabla f(u_k) - \alpha_k\,s\nabla F(u_k)`: one gradient step on
:math:`(1-\alpha_k) f + \alpha_k F` when :math:`t = s`, exactly BOAT's GDA (``callous-youth/BOAT``,
``boat_torch/gm_ol/ngd.py`` with ``gda_loss`` = α·F + (1−α)·f and ``alpha *= alpha_decay``); BDA's
TensorFlow code (``vis-opt-group/BDA``, ``boml/lower_iter/aggr.py``, ``combine_grads``) weights
:math:`\nabla f` by a fixed :math:`(1-\alpha)t` and :math:`\nabla F` by :math:`\alpha\gamma 0.9^{k} s`
(see :class:`~hodl_plugin.schedules.Geometric`). With :math:`F = \tfrac12\|u - z\|^2, s = 1` it is
the Halpern iteration anchored at :math:`z`. Its residual is the true fixed-point residual
:math:`r_k = \|T(u_k; x) - u_k\|` (no extra evaluation: :math:`T(u_k)` is the step's own), and
:math:`\alpha_k = 0` gives plain KM in both forms.

**Stopping rule** (scale-aware, per sample with ``batch_dims``): the solve stops at the first
check where

.. math::  r_k \le \max\big(\mathrm{tol}\cdot\max(\|u_{k+1}\|, r_0),\ \mathrm{atol}\big),

i.e. ``tol`` is *relative* (to the size of the iterate, or of the first residual when the fixed
point is 0) and ``atol`` absolute. ``tol=None`` takes :func:`default_tol` of the dtype;
``tol=0, atol=0`` runs exactly K steps. With HODL aggregation a stop on this test is followed by
plain KM steps (:math:`\alpha = 0`) until :math:`\|T(u) - u\|` meets the same threshold
(:meth:`GKMIteration.run`), so ``converged`` always means a fixed point of :math:`T` to the tolerance.

This module only iterates; differentiation is the job of :mod:`hodl_plugin.hypergrad`.
"""

from __future__ import annotations

import math
import numbers
import warnings
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable, Optional, Sequence

import torch
from torch import Tensor

from ._autodiff import grad_u
from ._checks import check_operator_output, guard_inplace, transforms_active
from .errors import ConvergenceWarning, DivergenceError
from .linear_solve import LinearSolveInfo
from .schedules import Constant, Schedule, is_zero

if TYPE_CHECKING:  # pragma: no cover
    from .acceleration import Anderson

__all__ = ["SolverInfo", "GKMIteration", "default_tol", "AGGREGATIONS"]

#: where the upper descent step enters the GKM step (module docstring)
AGGREGATIONS = ("inside", "outside")

Operator = Callable[..., Tensor]

_DEFAULT_TOL = {torch.float64: 1e-10, torch.float32: 1e-5, torch.float16: 1e-2, torch.bfloat16: 5e-2}

#: consecutive growing checks, and growth over the smallest residual, that flag a slow divergence
SLOW_DIVERGENCE_CHECKS = 5
SLOW_DIVERGENCE_GROWTH = 2.0


def default_tol(dtype: torch.dtype) -> float:
    """The default relative tolerance of the forward solve for ``dtype`` (reachable in it).

    Args:
        dtype: the floating dtype of the iterates.

    Returns:
        float: the tolerance ``GKMSolver(tol=None)`` uses for this dtype.

    >>> default_tol(torch.float64), default_tol(torch.float32)
    (1e-10, 1e-05)
    """
    return _DEFAULT_TOL.get(dtype, 1e-5)


@dataclass
class SolverInfo:
    """Diagnostics of one lower-level solve; travels with the result as ``solver.info``.

    Attributes:
        mode: the hypergradient method that ran (``"implicit"``, ``"unrolled"``, ...).
        steps: GKM steps taken in this call (the most over the samples with ``batch_dims``).
        residuals: the residual :math:`r_k` at every check (step 0, every ``check_every`` steps
            and the last step); 1-D, or ``(checks, *batch)`` with ``batch_dims``.
        residual_steps: the step index k of each entry of ``residuals``.
        converged: the last checked residual met the threshold (every sample's). With no
            tolerance (``tol=0, atol=0``: exactly K steps) it says whether the last residual meets
            the dtype's default relative tolerance :func:`default_tol`, so it is true exactly when
            the K steps reached a fixed point to working accuracy.
        diverged: the iteration produced non-finite values, a residual that grew past
            ``divergence_factor`` times the first one, or one that kept growing (5 checks in a
            row, to twice its smallest value: ``T`` is not nonexpansive).
        tol: the residual threshold of the last check, ``max(tol·max(‖u‖, r_0), atol)`` (of the
            worst sample with ``batch_dims``).
        steps_per_sample, converged_per_sample: with ``batch_dims``, tensors over the batch.
        exact_steps: no tolerance was asked (``tol=0, atol=0``).
        accelerated: steps taken by the acceleration, restarts: its history restarts and
            safeguard fall-backs (with ``acceleration=``).
        adjoint: diagnostics of the adjoint linear solve, filled in by ``backward()``
            (implicit and inexact modes).
        eps, delta: accuracies used by the inexact mode at this call.
        error_bound: certified a-posteriori bound on the hypergradient error (inexact mode, after
            ``backward()``), or ``None`` with ``message`` saying why it could not be certified.
        error_estimate: the same formula with estimated constants — not a bound.
        error_bound_per_sample, error_estimate_per_sample: under ``vmap``, the bound and estimate
            of each sample's hypergradient (``error_bound`` is then their maximum); a sample's
            ``nan`` bound means it could not be certified (``message`` says why).

    Under ``torch.func`` transforms the loop runs without host syncs and records no residuals
    (``message`` says so).

    Example:
        >>> import torch, hodl_plugin as hp
        >>> u, info = hp.GKMSolver(lambda u: 0.5 * u + 1.0, tol=1e-10).solve(torch.zeros(2))
        >>> info.converged, info.steps, info.residual < 1e-10 * 2
        (True, 30, True)
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
    exact_steps: bool = False
    accelerated: int = 0
    restarts: int = 0
    initial_residual: Optional[Tensor] = None

    @property
    def residual(self) -> float:
        """The last recorded residual, the largest over the batch (``nan`` when none)."""
        return float(self.residuals[-1].max()) if self.residuals.numel() else math.nan


def _validate_tol(value: object, name: str, allow_none: bool = False) -> Optional[float]:
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a number >= 0, got {value!r}")
    v = float(value)
    if not (math.isfinite(v) and v >= 0):
        raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
    return v


def validate_count(value: object, name: str, minimum: int = 1) -> int:
    """An integer argument >= ``minimum`` (an integral float such as ``3.0`` is accepted).

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
    if not ok or int(value) < minimum:  # type: ignore[arg-type]
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return int(value)  # type: ignore[arg-type]


class _Monitor:
    """Per-sample stopping state of one ``run``: thresholds, divergence, freezing, history.

    Every quantity is a tensor over the batch (a 0-d tensor without ``batch_dims``) so that the
    same code runs eagerly (one host sync per check) and under ``torch.func`` transforms (none).
    """

    def __init__(self, it: GKMIteration, u: Tensor, info: SolverInfo, tol: float, atol: float,
                 stop: bool, functional: bool, start: int) -> None:
        self.it, self.info, self.tol, self.atol, self.start = it, info, tol, atol, start
        self.stop, self.functional = stop, functional
        self.bdims = it.batch_dims
        self.reduce_dims = tuple(range(self.bdims, u.dim()))
        self.noise_tol = default_tol(u.dtype)
        self.r0: Optional[Tensor] = None if functional else info.initial_residual
        self.rmin: Optional[Tensor] = None
        self.rprev: Optional[Tensor] = None
        self.ups: Optional[Tensor] = None
        self.active: Optional[Tensor] = None  # None: all samples active (eager, known on host)
        self.stopped_at: Optional[Tensor] = None
        self.stopped_conv: Optional[Tensor] = None
        self.div_mask: Optional[Tensor] = None
        self.last_conv: Optional[Tensor] = None
        self.u_good = u
        self.hist: list[Tensor] = []
        self.hist_steps: list[int] = []
        self.masking = functional  # freeze inactive samples with torch.where at every step
        self.done = False
        # one problem, eager: the checks run on host floats (see _check_scalar)
        self.scalar = self.bdims == 0 and not functional
        self.r0f: Optional[float] = None
        self.rminf: Optional[float] = None
        self.upsf, self.rprevf = 0, math.inf
        self.last_conv_f = self.stopped_conv_f = self.div_f = False
        self.stopped_at_f = -1

    def norm(self, t: Tensor) -> Tensor:
        if not self.reduce_dims:
            return t.abs()
        return torch.linalg.vector_norm(t, dim=self.reduce_dims)

    def expand(self, mask: Tensor, like: Tensor) -> Tensor:
        return mask.reshape(mask.shape + (1,) * (like.dim() - mask.dim()))

    def freeze(self, new: Tensor, old: Tensor) -> Tensor:
        """Samples that stopped keep ``old``."""
        if not self.masking or self.active is None:
            return new
        return torch.where(self.expand(self.active, new), new, old)

    def check(self, k: int, r: Tensor, u_new: Tensor, u_km: Tensor) -> Tensor:
        """Test residual ``r`` (per sample) of the step ``k`` that produced ``u_new``.

        Returns the next iterate: ``u_new``, except that samples that stop now keep ``u_km`` (the
        plain KM step from the checked point) and diverged ones their last finite iterate (NaN under
        ``torch.func`` transforms). Sets ``done`` when every sample has stopped.
        """
        if self.scalar:
            return self._check_scalar(k, r, u_new, u_km)
        info = self.info
        r = r.detach()
        if self.r0 is None:
            self.r0 = r
            if not self.functional and info.steps == 0:
                info.initial_residual = r
        r0 = self.r0
        scale = torch.maximum(self.norm(u_new.detach()), r0)
        thresh = torch.clamp(self.tol * scale, min=self.atol)
        conv = r <= thresh
        noise = r <= self.noise_tol * scale
        finite = torch.isfinite(r)
        if self.rmin is None:
            self.rmin, self.ups = r, torch.zeros_like(r)
        else:
            self.ups = torch.where(r > self.rprev, self.ups + 1, torch.zeros_like(self.ups))
            self.rmin = torch.minimum(self.rmin, r)
        self.rprev = r
        grow = (r > self.it.divergence_factor * torch.clamp(r0, min=1e-30)) | (
            (self.ups >= SLOW_DIVERGENCE_CHECKS) & (r > SLOW_DIVERGENCE_GROWTH * self.rmin) & ~noise
        )
        bad = ~finite | grow
        active = torch.ones_like(conv) if self.active is None else self.active
        newly_conv = active & conv & ~bad if self.stop else torch.zeros_like(conv)
        newly_bad = active & bad
        self.active = active & ~newly_conv & ~newly_bad
        if self.functional:  # no host syncs: diverged samples become NaN (visible), converged freeze
            out = torch.where(self.expand(newly_bad, u_new), torch.full_like(u_new, math.nan), u_new)
            return torch.where(self.expand(newly_conv, u_new), u_km, out)
        # eager: record, then one host sync for all the decisions
        self.hist.append(r)
        self.hist_steps.append(k)
        info.tol = float(thresh.max())
        self.last_conv = noise if info.exact_steps else conv
        self.stopped_conv = newly_conv if self.stopped_conv is None else self.stopped_conv | newly_conv
        self.div_mask = newly_bad if self.div_mask is None else self.div_mask | newly_bad
        any_bad, all_done, some_stopped, all_finite = torch.stack(
            [newly_bad.any(), ~self.active.any(), (newly_conv | newly_bad).any(), finite.all()]
        ).tolist()
        out = u_new
        if any_bad:
            self.diverge(k, r, r0, ~finite & active, newly_bad)
            out = torch.where(self.expand(newly_bad, u_new), self.u_good, u_new)
        if some_stopped:
            out = torch.where(self.expand(newly_conv, u_new), u_km, out)
            self.masking = True
        self.u_good = out if all_finite else torch.where(self.expand(finite, out), out, self.u_good)
        if self.stopped_at is None:
            self.stopped_at = torch.full_like(r, -1, dtype=torch.long)
        self.stopped_at = torch.where((newly_conv | newly_bad) & (self.stopped_at < 0), k + 1, self.stopped_at)
        self.done = bool(all_done)
        return out

    def _check_scalar(self, k: int, r: Tensor, u_new: Tensor, u_km: Tensor) -> Tensor:
        """:meth:`check` for one problem (no ``batch_dims``), eagerly: one host sync, then floats —
        the same decisions as the batched tensor code at a fraction of its per-check cost."""
        info = self.info
        r = r.detach().reshape(())
        rf, un = torch.stack([r, torch.linalg.vector_norm(u_new.detach()).to(r.dtype)]).tolist()
        if self.r0 is None:
            self.r0 = r
            if info.steps == 0:
                info.initial_residual = r
        if self.r0f is None:
            self.r0f = float(self.r0)
        r0f = self.r0f
        scale = max(un, r0f) if math.isfinite(un) else r0f
        thresh = max(self.tol * scale, self.atol)
        conv, noise, finite = rf <= thresh, rf <= self.noise_tol * scale, math.isfinite(rf)
        if self.rminf is None:
            self.rminf, self.upsf = rf, 0
        else:
            self.upsf = self.upsf + 1 if rf > self.rprevf else 0
            self.rminf = min(self.rminf, rf)
        self.rprevf = rf
        grow = rf > self.it.divergence_factor * max(r0f, 1e-30) or (
            self.upsf >= SLOW_DIVERGENCE_CHECKS and rf > SLOW_DIVERGENCE_GROWTH * self.rminf and not noise
        )
        bad = not finite or grow
        newly_conv = conv and not bad and self.stop
        self.hist.append(r)
        self.hist_steps.append(k)
        info.tol = thresh
        self.last_conv_f = noise if info.exact_steps else conv
        self.stopped_conv_f = self.stopped_conv_f or newly_conv
        self.div_f = self.div_f or bad
        out = u_new
        if bad:
            self.rmin = torch.tensor(self.rminf, dtype=r.dtype)
            self.diverge(k, r, self.r0, torch.tensor(not finite), torch.tensor(True))
            # the last finite iterate, still attached to u_new's graph (as the batched code's where)
            out = torch.where(torch.ones((), dtype=torch.bool, device=u_new.device), self.u_good, u_new)
        elif newly_conv:
            out = u_km
        if finite:
            self.u_good = out
        if (bad or newly_conv) and self.stopped_at_f < 0:
            self.stopped_at_f = k + 1
        self.done = bad or newly_conv
        return out

    def diverge(self, k: int, r: Tensor, r0: Tensor, nonfinite: Tensor, bad: Tensor) -> None:
        info, it = self.info, self.it
        info.diverged = True
        idx = bad.nonzero().flatten().tolist() if bad.dim() else []
        which = f" (batch samples {idx[:8]}{'...' if len(idx) > 8 else ''})" if idx else ""
        if bool(nonfinite.any()):
            src = ("T(u, *params) or the upper objective's gradient (HODL aggregation: upper / upper_grad)"
                   if it.aggregates else "T(u, *params)")
            what = (
                f"became non-finite (NaN/Inf): {src} returned NaN or Inf on the iterates "
                "(check it, e.g. a log or a division, and its parameters)"
            )
        else:
            ri, r0i, rm = (float(t[bad].max()) if t.dim() else float(t) for t in (r, r0, self.rmin))
            if ri > it.divergence_factor * r0i:
                what = f"grew from {r0i:.3e} to {ri:.3e} (more than divergence_factor={it.divergence_factor:g} times)"
            else:
                what = (
                    f"kept growing for {SLOW_DIVERGENCE_CHECKS} checks in a row, from {rm:.3e} to {ri:.3e} "
                    "(a slow divergence)"
                )
        info.message = (
            f"the GKM iteration diverged at step {k}{which}: the fixed-point residual ||T(w_k) - u_k|| {what}. "
            "Check that T is nonexpansive in u (e.g. a step size below 2/L for a gradient step)"
            + (" and that the upper step s is below 1/L_F." if it.aggregates else ".")
        )
        if it.on_divergence == "raise":
            raise DivergenceError(info.message)
        warnings.warn(info.message, ConvergenceWarning, stacklevel=5)

    def finish(self, executed: int) -> None:
        """Write steps, residual history and convergence flags into ``info``."""
        info = self.info
        if self.functional:
            info.steps += executed
            info.message = info.message or (
                "run under torch.func transforms: no residuals recorded, no warnings (they need "
                "host syncs); diverged samples are NaN"
            )
            return
        before = info.steps
        if self.scalar:
            if self.hist:
                new = torch.stack(self.hist)
                old = info.residuals
                if old.numel() and old.dim() == 1:
                    new = torch.cat([old.to(new.device, new.dtype), new])
                info.residuals = new
                info.residual_steps = info.residual_steps + self.hist_steps
            info.steps = before + (executed if self.stopped_at_f < 0 else self.stopped_at_f - self.start)
            info.converged = bool((self.stopped_conv_f or self.last_conv_f) and not self.div_f)
            return
        if self.hist:
            new = torch.stack(self.hist)
            old = info.residuals
            if old.numel() and old.shape[1:] == new.shape[1:]:
                new = torch.cat([old.to(new.device, new.dtype), new])
            info.residuals = new
            info.residual_steps = info.residual_steps + self.hist_steps
        if self.stopped_at is None:  # no check ran (cannot happen: the last step is checked)
            info.steps += executed
            return
        this = torch.where(self.stopped_at < 0, torch.full_like(self.stopped_at, executed),
                           self.stopped_at - self.start)
        prev = info.steps_per_sample if info.steps_per_sample is not None else torch.full_like(this, before)
        ran = prev + this
        conv = (self.stopped_conv | self.last_conv) & ~self.div_mask
        info.steps = int(ran.max())
        if self.bdims:
            info.steps_per_sample = ran
            info.converged_per_sample = conv
        info.converged = bool(conv.all())


class GKMIteration:
    """Runs the GKM steps; holds the operator, the upper objective and the schedules.

    Created by :class:`hodl_plugin.GKMSolver`; methods call :meth:`run`.
    """

    def __init__(
        self,
        T: Operator,
        *,
        beta: Schedule,
        upper: Optional[Callable[..., Tensor]] = None,
        upper_grad: Optional[Callable[..., Tensor]] = None,
        upper_step: float = 1.0,
        alpha: Optional[Schedule] = None,
        tol: Optional[float] = None,
        rtol: float = 0.0,
        atol: float = 0.0,
        check_every: int = 10,
        divergence_factor: float = 1e4,
        on_divergence: str = "raise",
        batch_dims: int = 0,
        acceleration: Optional[Anderson] = None,
        aggregation: str = "inside",
    ) -> None:
        if aggregation not in AGGREGATIONS:
            raise ValueError(f"aggregation must be one of {AGGREGATIONS}, got {aggregation!r}")
        self.aggregation = aggregation
        self.T = T
        self.beta = beta
        self.upper = upper
        self.upper_grad = upper_grad
        self.upper_step = float(upper_step)
        self.alpha = alpha
        self.tol = _validate_tol(tol, "tol", allow_none=True)
        self.rtol = _validate_tol(rtol, "rtol")
        self.atol = _validate_tol(atol, "atol")
        self.check_every = validate_count(check_every, "check_every")
        self.batch_dims = validate_count(batch_dims, "batch_dims", minimum=0)
        if isinstance(divergence_factor, bool) or not isinstance(divergence_factor, numbers.Real) or not (
            float(divergence_factor) > 1
        ):
            raise ValueError(f"divergence_factor must be a number > 1 (inf disables it), got {divergence_factor!r}")
        self.divergence_factor = float(divergence_factor)
        if on_divergence not in ("raise", "warn"):
            raise ValueError(f"on_divergence must be 'raise' or 'warn', got {on_divergence!r}")
        self.on_divergence = on_divergence
        self.acceleration = acceleration

    @property
    def aggregates(self) -> bool:
        if self.alpha is None or (self.upper is None and self.upper_grad is None):
            return False
        return not is_zero(self.alpha)

    # -- pieces -------------------------------------------------------------------------------
    def grad_upper(self, u: Tensor, params: Sequence[Tensor]) -> Tensor:
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

    def thresholds(self, dtype: torch.dtype, tol: Optional[float], rtol: Optional[float],
                   atol: Optional[float]) -> tuple[float, float]:
        """``(relative, absolute)`` tolerances of a run.

        ``tol`` is relative and ``atol`` absolute (``None``: the solver's). The older call
        ``run(..., tol=t, rtol=r)`` — with ``rtol`` given — keeps its old meaning: ``t`` absolute,
        ``r`` relative (the inexact mode's absolute ``eps_k`` is passed that way).
        """
        if rtol is not None:  # the old (absolute tol, relative rtol) call
            absolute = _validate_tol(self.atol if tol is None else tol, "tol")
            rel = _validate_tol(rtol, "rtol")
            if atol is not None:
                absolute = max(absolute, _validate_tol(atol, "atol"))  # type: ignore[type-var]
            return rel, absolute  # type: ignore[return-value]
        rel = self.tol if tol is None else _validate_tol(tol, "tol")
        if rel is None:
            rel = default_tol(dtype)
        absolute = self.atol if atol is None else _validate_tol(atol, "atol")
        return max(rel, self.rtol), absolute  # type: ignore[type-var, return-value]

    # -- the loop ------------------------------------------------------------------------------
    def run(
        self,
        u: Tensor,
        params: Sequence[Tensor],
        info: SolverInfo,
        *,
        start: int,
        num_steps: int,
        tol: Optional[float] = None,
        rtol: Optional[float] = None,
        stop_on_tol: bool = True,
        atol: Optional[float] = None,
    ) -> Tensor:
        r"""Run up to ``num_steps`` GKM steps (``_run_once``); with HODL aggregation, a stop on the
        tolerance is followed by plain KM steps (:math:`\alpha = 0`) until the fixed-point residual
        :math:`\|T(u) - u\|` itself meets it.

        Why: with :math:`\alpha_k > 0` the residual tested is that of the aggregated step, which a slowly
        decaying :math:`\alpha_k` keeps small while :math:`u_k` is still :math:`O(\alpha_k)` away from
        :math:`\mathrm{Fix}\,T` (and the outside form tests :math:`\|T(u_k)-u_k\|` but moves by
        :math:`\alpha_k s\nabla F` too): without this, ``converged=True`` could come with a point (and a
        hypergradient at it) off by more than the tolerance. Not under ``torch.func`` transforms (no
        host syncs there: the aggregated loop's result is returned).
        """
        kw = dict(tol=tol, rtol=rtol, stop_on_tol=stop_on_tol, atol=atol)
        steps0 = info.steps
        out = self._run_once(u, params, info, start=start, num_steps=num_steps, plain=False, **kw)
        if not (self.aggregates and stop_on_tol and self.acceleration is None) or transforms_active():
            return out
        done = info.steps - steps0
        rel, absolute = self.thresholds(u.dtype, tol, rtol, atol)
        if done >= num_steps or not info.converged or info.diverged or not (rel > 0 or absolute > 0):
            return out
        return self._run_once(out, params, info, start=start + done, num_steps=num_steps - done, plain=True, **kw)

    def _run_once(
        self,
        u: Tensor,
        params: Sequence[Tensor],
        info: SolverInfo,
        *,
        start: int,
        num_steps: int,
        tol: Optional[float] = None,
        rtol: Optional[float] = None,
        stop_on_tol: bool = True,
        atol: Optional[float] = None,
        plain: bool = False,
    ) -> Tensor:
        """Run up to ``num_steps`` GKM steps from step index ``start``; update ``info`` in place.

        ``tol`` is relative (:math:`r_k \\le \\mathrm{tol}\\max(\\|u\\|, r_0)`), ``atol`` absolute;
        ``None`` takes the solver's value. Passing ``rtol`` selects the old meaning (``tol``
        absolute, ``rtol`` relative): :meth:`thresholds`. ``tol=0, atol=0`` (or
        ``stop_on_tol=False``) runs all ``num_steps``.

        Autograd records the steps iff grad mode is on (the caller decides). The residual is
        computed, recorded and tested (convergence, divergence) at the first step of the solve,
        every ``check_every`` steps and at the last one — one host sync per check, none under
        ``torch.func`` transforms; the steps in between are bare ``u ← (1-β)u + βT(w)``.
        """
        rel, absolute = self.thresholds(u.dtype, tol, rtol, atol)
        stop = stop_on_tol and (rel > 0 or absolute > 0)
        info.exact_steps = not (rel > 0 or absolute > 0)
        if num_steps < 1:
            return u
        functional = transforms_active()
        if self.batch_dims > u.dim():
            raise ValueError(f"batch_dims={self.batch_dims} but u0 has only {u.dim()} dimensions")
        mon = _Monitor(self, u, info, rel, absolute, stop, functional, start)
        if self.acceleration is not None:
            if torch.is_grad_enabled() and (u.requires_grad or any(p.requires_grad for p in params)):
                raise ValueError(
                    "acceleration=Anderson(...) runs only without autograd (the implicit, inexact and "
                    "first_order modes); use acceleration=None with unrolled/truncated"
                )
            return self._run_accelerated(u, params, info, mon, start, num_steps)
        T, beta_s, alpha_s, s = self.T, self.beta, self.alpha, self.upper_step
        aggregate = self.aggregates and not plain
        every = self.check_every
        last = num_steps - 1
        b_const = float(beta_s.c) if isinstance(beta_s, Constant) else None
        countdown = every
        first_check = info.steps == 0 and not functional
        u = u.clone()  # a private copy: an operator writing into its input cannot touch the caller's u0
        if aggregate and self.aggregation == "outside":
            return self._run_outside(u, params, info, mon, start, num_steps, first_check)
        for j in range(num_steps):
            k = start + j
            if aggregate:
                a = alpha_s(k)  # type: ignore[misc]
                w = u - (a * s) * self.grad_upper(u, params) if a != 0.0 else u
            else:
                w = u
            if j == 0:
                Tw = guard_inplace(T, w, params, functional)
                check_operator_output(Tw, u)
            else:
                Tw = T(w, *params)
            b = b_const if b_const is not None else beta_s(k)
            countdown -= 1
            if not (countdown == 0 or j == last or (j == 0 and first_check)):  # hot path: no sync
                u_next = Tw if b == 1.0 else u + b * (Tw - u)
                u = mon.freeze(u_next, u) if mon.masking else u_next
                continue
            if countdown == 0:
                countdown = every
            diff = Tw - u
            u_new = mon.freeze(Tw if b == 1.0 else u + b * diff, u)
            u = mon.check(k, mon.norm(diff.detach()), u_new, u_new)
            if mon.done:
                mon.finish(j + 1)
                return u
        mon.finish(num_steps)
        return u

    def _run_outside(self, u: Tensor, params: Sequence[Tensor], info: SolverInfo, mon: _Monitor, start: int,
                     num_steps: int, first_check: bool) -> Tensor:
        r"""The loop with ``aggregation="outside"``:
        :math:`u \leftarrow (1-\beta_k)u + \beta_k[(1-\alpha_k)T(u) + \alpha_k(u - s\nabla F(u))]`,
        checked on :math:`r_k = \|T(u_k) - u_k\|` (same check schedule as :meth:`run`)."""
        T, beta_s, alpha_s, s = self.T, self.beta, self.alpha, self.upper_step
        assert alpha_s is not None
        every, last = self.check_every, num_steps - 1
        countdown = every
        for j in range(num_steps):
            k = start + j
            if j == 0:
                Tu = guard_inplace(T, u, params, mon.functional)
                check_operator_output(Tu, u)
            else:
                Tu = T(u, *params)
            a = float(alpha_s(k))
            if a != 0.0:
                v = (1.0 - a) * Tu + a * (u - s * self.grad_upper(u, params))
            else:
                v = Tu
            b = float(beta_s(k))
            u_next = v if b == 1.0 else u + b * (v - u)
            countdown -= 1
            if not (countdown == 0 or j == last or (j == 0 and first_check)):
                u = mon.freeze(u_next, u) if mon.masking else u_next
                continue
            if countdown == 0:
                countdown = every
            u_new = mon.freeze(u_next, u)
            # a sample that stops keeps the plain KM step from u_k (within β·r_k of u_k), not the
            # aggregated one, which α_k s∇F(u_k) moves away from Fix T by more than the residual tested
            u_km = Tu if b == 1.0 else u + b * (Tu - u)
            u = mon.check(k, mon.norm((Tu - u).detach()), u_new, mon.freeze(u_km, u))
            if mon.done:
                mon.finish(j + 1)
                return u
        mon.finish(num_steps)
        return u

    def _run_accelerated(self, u, params, info, mon: _Monitor, start: int, num_steps: int) -> Tensor:
        """The loop with ``acceleration``: every step ``u ← acc.step(u, T(u) - u)``, no host sync
        between checks (the residual norm of every step is a tensor the accelerator consumes)."""
        if self.aggregates:
            raise ValueError(
                "acceleration cannot be combined with HODL aggregation (alpha); pass alpha=0 or "
                "acceleration=None"
            )
        acc = self.acceleration
        assert acc is not None
        T, beta_s = self.T, self.beta
        every, last = self.check_every, num_steps - 1
        countdown = every
        first_check = info.steps == 0 and not mon.functional
        u = u.clone()
        state = acc.init(u, self.batch_dims)
        for j in range(num_steps):
            k = start + j
            Tw = guard_inplace(T, u, params, mon.functional) if j == 0 else T(u, *params)
            if j == 0:
                check_operator_output(Tw, u)
            b = float(beta_s(k))
            f = Tw - u
            r = mon.norm(f)
            u_next = acc.step(state, u, f, r, b)
            countdown -= 1
            if not (countdown == 0 or j == last or (j == 0 and first_check)):
                u = mon.freeze(u_next, u)
                continue
            if countdown == 0:
                countdown = every
            u_km = u + b * f
            u = mon.check(k, r, mon.freeze(u_next, u), mon.freeze(u_km, u))
            if mon.done:
                mon.finish(j + 1)
                acc.report(state, info)
                return u
        mon.finish(num_steps)
        acc.report(state, info)
        return u
