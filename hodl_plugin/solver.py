r"""``GKMSolver``: the lower-level solver of HODL, differentiable by the method of your choice.

Example (a quadratic lower level whose fixed point is :math:`u^*(x) = A^{-1}x`):

    >>> import torch, hodl_plugin as hp
    >>> n = 5
    >>> A = torch.eye(n, dtype=torch.float64) * 2 + 0.1
    >>> y = torch.ones(n, dtype=torch.float64)
    >>> T = lambda u, x: u - 0.3 * (A @ u - x)              # gradient step of ½uᵀAu - xᵀu
    >>> F = lambda u, x: 0.5 * ((u - y) ** 2).sum()
    >>> solver = hp.GKMSolver(T, max_steps=5000, tol=1e-12, hypergrad="implicit")
    >>> x = torch.zeros(n, dtype=torch.float64, requires_grad=True)
    >>> u = solver(torch.zeros(n, dtype=torch.float64), x)
    >>> F(u, x).backward()
    >>> exact = torch.linalg.solve(A, torch.linalg.solve(A, x.detach()) - y)   # A⁻ᵀ(u* - y)
    >>> bool(torch.allclose(x.grad, exact, rtol=1e-8)), solver.info.converged
    (True, True)
"""

from __future__ import annotations

import inspect
import math
import warnings
from typing import Any, Callable, Hashable, Optional, Union

import torch
from torch import Tensor, nn

from ._checks import check_inputs, module_tensors
from ._torch_compat import transforms_active
from .errors import ConfigurationError, ConvergenceWarning, ScheduleError, SummableScheduleWarning, UnusedOptionWarning
from .gkm import AGGREGATIONS, GKMIteration, SolverInfo, validate_choice
from .hypergrad import HypergradMethod, get_method
from .schedules import (
    Harmonic,
    Schedule,
    as_schedule,
    check_aggregation,
    check_relaxation,
    summable_aggregation,
)

__all__ = ["GKMSolver"]


class GKMSolver(nn.Module):
    r"""Approximate fixed point :math:`u^*(x) \in \mathrm{Fix}\,T(\cdot; x)` by the GKM iteration.

    ``solver(u0, *params)`` runs (:ref:`math-gkm`), with ``aggregation="inside"`` (default)

    .. math::

        w_k = u_k - \alpha_k s \nabla_u F(u_k; x),\qquad
        u_{k+1} = (1-\beta_k) u_k + \beta_k T(w_k; x),

    or with ``aggregation="outside"`` (the BDA/BOAT form, :mod:`hodl_plugin.gkm`)

    .. math::

        u_{k+1} = (1-\beta_k) u_k + \beta_k \big[(1-\alpha_k) T(u_k; x) + \alpha_k (u_k - s\nabla_u F(u_k; x))\big],

    until the returned point meets :math:`\|T(u) - u\| \le \max(\mathrm{tol}\cdot\|u\|,\ \mathrm{atol})`
    (:ref:`math-stopping`) or ``max_steps`` steps, and returns a tensor differentiable by the method
    ``hypergrad`` w.r.t. every tensor in ``params`` (tensors, or lists / tuples / dicts of them) and
    every tensor ``T`` reads (its own parameters when it is an ``nn.Module``, tensors it captures,
    a dict given to ``torch.func.functional_call``). Diagnostics of the last call are in :attr:`info`
    (:class:`~hodl_plugin.gkm.SolverInfo`).

    Args:
        T: the operator ``T(u, *params) -> tensor shaped like u``, nonexpansive in u (a callable or
            an ``nn.Module``; see :mod:`hodl_plugin.operators`).
        max_steps: K, the most GKM steps (an integer >= 1).
        tol: *relative* tolerance on the residual of the returned point: ``‖T(u) - u‖ ≤ tol·‖u‖``, so a
            problem scaled by 1e-8 stops at the same relative accuracy. Default ``None``:
            :func:`~hodl_plugin.gkm.default_tol` of the dtype (1e-10 in float64, 1e-5 in float32).
            ``tol=0`` (with ``atol=0``) runs exactly K steps; ``info.converged`` then says whether the
            returned point meets the dtype's default tolerance.
        atol: absolute tolerance: the threshold is ``max(tol·‖u‖, atol)``; pass ``tol=0, atol=1e-8``
            for a purely absolute stop (needed when the fixed point is 0).
        hypergrad: ``"implicit"`` (default), ``"unrolled"``, ``"truncated"``, ``"inexact"``,
            ``"first_order"`` or a :class:`~hodl_plugin.hypergrad.HypergradMethod` object (options: pass
            the object, e.g. ``hp.Implicit(solver=hp.linear_solve.cg(rtol=1e-12))``, or keywords below).
        upper: the upper objective ``F(u, *params) -> scalar``; with it the iteration aggregates
            HODL's descent direction (needs ``alpha``; default ``Harmonic(1.0)``).
        upper_grad: ``∇_u F(u, *params)`` directly, instead of autograd on ``upper``.
        upper_step: s, the step of the upper descent direction (:math:`s \le 1/L_F`).
        alpha: aggregation weights :math:`\alpha_k` (number or Schedule): in [0, 1],
            non-increasing, to 0; ``alpha=0`` switches the aggregation off while keeping ``upper``
            (used then by the inexact mode's error bound). A summable schedule (e.g.
            :class:`~hodl_plugin.schedules.Geometric`, the BDA/BOAT default) is accepted with a
            :class:`~hodl_plugin.errors.SummableScheduleWarning`: it is outside the selection theory.
        beta: KM relaxation :math:`\beta_k \in (0, 1]`, bounded away from 0 (default 1).
        upper_lipschitz: :math:`L_F`, if known: ``upper_step`` is checked against it.
        check_every: steps between residual checks (convergence, divergence, history); each
            costs a norm and one host sync, the steps in between cost one evaluation of T. A run that
            stops before ``max_steps`` returns the point of the check at which it stopped.
        divergence_factor: the iteration has diverged when the residual exceeds this multiple of
            the first residual, becomes non-finite, or (with a tolerance) stops decreasing far above
            any rounding error (:mod:`hodl_plugin._stopping`).
        on_divergence: ``"raise"`` a :class:`~hodl_plugin.errors.DivergenceError` (default) or
            ``"warn"`` and return the last finite iterate with ``info.diverged = True``.
        batch_dims: the leading dims of ``u`` that index independent problems (a batch of images,
            per-sample lower levels): residuals, thresholds and the stop test are per sample,
            converged samples stop changing, ``info.steps_per_sample`` reports their steps.
        acceleration: ``None`` (plain KM) or an accelerator (:class:`~hodl_plugin.acceleration.Anderson`)
            — with the implicit, inexact and first_order modes, not with aggregation (``alpha``).
        forward: how the fixed point is computed: ``"gkm"`` (default) the GKM iteration above, or
            ``"krylov"`` for an operator **affine** in u, :math:`T(u) = Mu + c`: its fixed point solves
            :math:`(I - M)u = c`, by CG when ``T.symmetric_jacobian`` is true (e.g. the
            :class:`~hodl_plugin.operators.GradientStep` of a quadratic) in about :math:`\sqrt{\kappa}`
            products instead of :math:`\kappa\log(1/\mathrm{tol})` steps, else by GMRES (``"cg"`` /
            ``"gmres"`` choose). Same stopping rule and ``info`` (``info.forward`` says which ran);
            a ``T`` that is not affine raises :class:`~hodl_plugin.errors.NotAffineError`. With the
            implicit, inexact, first_order and fd modes, without acceleration or aggregation
            (:mod:`hodl_plugin.krylov`). Not chosen automatically: affinity cannot be proven from a callable.
        strict: schedules outside the convergence conditions raise
            :class:`~hodl_plugin.errors.ScheduleError`; ``strict=False`` warns instead.
        aggregation: where the upper descent step enters: ``"inside"`` (default: T is
            applied at the shifted point :math:`w_k`) or ``"outside"`` (BDA/BOAT: a convex
            combination of :math:`T(u_k)` and :math:`u_k - s\nabla F(u_k)`). Both need ``upper``;
            every ``hypergrad`` mode and ``batch_dims`` work with both; ``acceleration`` with
            neither (while :math:`\alpha \ne 0`).
        **method_options: options of the method named by ``hypergrad`` (e.g. ``steps=5`` for
            ``"truncated"``, ``solver="cg"`` for ``"implicit"``, ``eps=...`` for ``"inexact"``).

    Example:
        >>> import torch, hodl_plugin as hp
        >>> T = lambda u, x: 0.5 * u + x                     # contraction, u*(x) = 2x
        >>> solver = hp.GKMSolver(T, tol=1e-12)
        >>> x = torch.ones(3, requires_grad=True)
        >>> solver(torch.zeros(3), x).sum().backward()
        >>> x.grad                                           # du*/dx = 2 I
        tensor([2.0000, 2.0000, 2.0000])

    A solve with a tolerance that stops at ``max_steps`` without meeting it warns
    (:class:`~hodl_plugin.errors.ConvergenceWarning`, naming the steps, residual and threshold), in
    every mode.

    Raises:
        ScheduleError: a schedule breaks the convergence conditions (``strict=True``).
        SummableScheduleWarning: (a warning) ``alpha`` is summable — accepted, outside the
            selection theory.
        ValueError, TypeError: at construction, an argument out of range or of the wrong type (named in
            the message); ``rtol=`` (removed: ``tol`` is relative, ``atol`` absolute).
        TypeError, ValueError: at call time, for tensors of the wrong type, dtype, device or shape,
            or non-finite inputs.
        DivergenceError: the iteration diverged (``on_divergence="raise"``).
        ConfigurationError: at construction, options that cannot work together: ``acceleration``
            with ``hypergrad="unrolled"`` / ``"truncated"`` or with aggregation (:math:`\alpha_k > 0`), a
            Krylov ``forward`` with those or with ``tol=0, atol=0``.
        NotAffineError: (a :class:`ConfigurationError`) at call time, ``forward="krylov"`` on an
            operator that is not affine in u.
        LinearSolveError: in ``backward()``, the adjoint solve missed its tolerance (implicit mode,
            ``on_fail="raise"``).
    """

    def __init__(
        self,
        T: Callable[..., Tensor],
        *,
        max_steps: int = 1000,
        tol: Optional[float] = None,
        atol: float = 0.0,
        hypergrad: Union[str, HypergradMethod] = "implicit",
        upper: Optional[Callable[..., Tensor]] = None,
        upper_grad: Optional[Callable[..., Tensor]] = None,
        upper_step: float = 1.0,
        alpha: Union[float, Schedule, None] = None,
        beta: Union[float, Schedule] = 1.0,
        upper_lipschitz: Optional[float] = None,
        check_every: int = 10,
        divergence_factor: float = 1e4,
        on_divergence: str = "raise",
        batch_dims: int = 0,
        acceleration: Any = None,
        strict: bool = True,
        aggregation: str = "inside",
        forward: str = "gkm",
        **method_options: Any,
    ) -> None:
        super().__init__()
        if "rtol" in method_options:
            raise TypeError(
                "GKMSolver(rtol=...) was removed: tol is the relative tolerance (threshold tol·‖u‖) and atol the "
                "absolute one; pass tol=... (and atol=... if needed)"
            )
        if not callable(T):
            raise TypeError(f"T must be callable (u, *params) -> tensor, got {type(T).__name__}")
        if not isinstance(strict, bool):
            raise TypeError(f"strict must be True or False, got {strict!r}")
        if upper is not None and not callable(upper):
            raise TypeError("upper must be callable (u, *params) -> scalar tensor")
        self.T = T  # registered as a submodule when it is an nn.Module
        self.upper = upper
        self.method = get_method(hypergrad, **method_options)
        if self.method.name == "inexact" and (tol is not None or atol):
            warnings.warn(
                "GKMSolver(tol=/atol=...) is not used with hypergrad='inexact': its forward stops at the "
                "accuracy eps_k of each call (and the adjoint at delta_k); pass eps=... (and delta=...) instead",
                UnusedOptionWarning, stacklevel=2,
            )

        beta_s = as_schedule(beta, "beta")
        problems = check_relaxation(beta_s)
        has_upper = upper is not None or upper_grad is not None
        alpha_s: Optional[Schedule] = None
        if alpha is not None and not has_upper:
            raise ValueError("alpha (HODL aggregation) needs the upper objective: pass upper=F or upper_grad=")
        validate_choice(aggregation, "aggregation", AGGREGATIONS)
        if aggregation != "inside" and not has_upper:
            raise ValueError(
                f"aggregation={aggregation!r} needs the upper objective: pass upper=F or upper_grad= "
                "(without it there is nothing to aggregate)"
            )
        if has_upper:
            alpha_s = Harmonic(1.0) if alpha is None else as_schedule(alpha, "alpha")
            problems += check_aggregation(alpha_s)
            lip = upper_lipschitz
            if isinstance(upper_step, (int, float)) and not upper_step > 0:
                problems.append(f"upper_step s must be > 0, got {upper_step}")
            elif isinstance(upper_step, (int, float)) and lip is not None and upper_step > (1 + 1e-12) / lip:
                problems.append(
                    f"upper_step s = {upper_step} exceeds 1/L_F = {1.0 / upper_lipschitz:.6g} "
                    f"(L_F = {upper_lipschitz})"
                )
        if problems:
            msg = "GKM schedule outside the convergence conditions: " + "; ".join(problems)
            if strict:
                raise ScheduleError(msg)
            warnings.warn(msg, ConvergenceWarning, stacklevel=2)
        note = summable_aggregation(alpha_s) if alpha_s is not None else ""
        if note:  # accepted (the BDA/BOAT default), outside the selection theory: say so
            warnings.warn(note, SummableScheduleWarning, stacklevel=2)

        if acceleration is not None and callable(getattr(acceleration, "check_compatible", None)):
            acceleration.check_compatible(self.method.name, alpha_s)
        if forward != "gkm" and self.method.needs_gkm_iterates:
            raise ConfigurationError(
                f"forward={forward!r} cannot be used with hypergrad={self.method.name!r}: the method needs the GKM "
                "iterates themselves (it differentiates the trajectory or evaluates its rule at the K-th iterate), "
                "and the Krylov forward computes the fixed point without them; use hypergrad='implicit', 'inexact' "
                "or 'first_order' (exact at the fixed point whatever the forward), or forward='gkm'"
            )
        self.iteration = GKMIteration(
            T,
            max_steps=max_steps,
            beta=beta_s,
            upper=upper,
            upper_grad=upper_grad,
            upper_step=upper_step,
            alpha=alpha_s,
            tol=tol,
            atol=atol,
            check_every=check_every,
            divergence_factor=divergence_factor,
            on_divergence=on_divergence,
            batch_dims=batch_dims,
            acceleration=acceleration,
            aggregation=aggregation,
            forward=forward,
        )
        self.method.validate(self.iteration)
        self.method.bind(self)  # a stateful method (inexact) serves one solver only
        self.info: Optional[SolverInfo] = None

    @property
    def max_steps(self) -> int:
        """K, the most GKM steps (the iteration's; setting it replaces the iteration, validated)."""
        return self.iteration.max_steps

    @max_steps.setter
    def max_steps(self, value: int) -> None:
        self.iteration = self.iteration.replace(max_steps=value)
        self.method.validate(self.iteration)

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:  # the constructor's options read back (read-only: see __setattr__)
            d = self.__dict__
            if name == "hypergrad" and "method" in d:
                return d["method"]
            if name in _CONSTRUCTION_ONLY and "iteration" in d and hasattr(d["iteration"], name):
                return getattr(d["iteration"], name)
            raise

    def __setattr__(self, name: str, value: Any) -> None:
        # an option given at construction lives in the iteration or the method: an attribute of the same
        # name set afterwards would change nothing (only max_steps is settable, above)
        if name in _CONSTRUCTION_ONLY and "iteration" in self.__dict__:
            raise AttributeError(
                f"GKMSolver.{name} is fixed at construction (the iteration and the method hold it; setting the "
                f"attribute would change nothing): build a new GKMSolver(..., {name}=...); only max_steps can be set"
            )
        super().__setattr__(name, value)

    def forward(self, u0: Tensor, *params: Tensor, key: Optional[Hashable] = None) -> Tensor:
        """Solve from ``u0``; ``key`` names the problem instance for warm starts (inexact mode)."""
        return self.solve(u0, *params, key=key)[0]

    def solve(
        self, u0: Tensor, *params: Tensor, key: Optional[Hashable] = None
    ) -> tuple[Tensor, SolverInfo]:
        """Like calling the solver, returning ``(u, info)`` (the jaxopt style)."""
        check_inputs(u0, params, module_tensors(self.T, self.upper))
        info = SolverInfo(mode=self.method.name)
        self.info = info
        u = self.method.run(self.iteration, u0, params, info, key)
        warn_unconverged(info, u, self.iteration)
        return u, info

    # checkpointing of counters and warm starts (inexact mode)
    def get_extra_state(self) -> dict[str, Any]:
        return {"method": self.method.state_dict()}

    def set_extra_state(self, state: dict[str, Any]) -> None:
        self.method.load_state_dict(state.get("method", {}))

    def extra_repr(self) -> str:
        tol = self.iteration.tol
        return f"method={self.method!r}, max_steps={self.max_steps}, tol={'dtype default' if tol is None else tol}"


#: the constructor's options other than max_steps (see GKMSolver.__setattr__)
_CONSTRUCTION_ONLY = frozenset(
    set(inspect.signature(GKMSolver.__init__).parameters) - {"self", "max_steps", "method_options"}
    | {"method"}
)


def warn_unconverged(info: SolverInfo, u: Optional[Tensor] = None, iteration: Optional[GKMIteration] = None) -> None:
    """The one place that warns when a forward solve asked for a tolerance and missed it."""
    if info.converged or info.diverged or info.exact_steps or not info.residuals.numel():
        return
    which = ""
    if info.converged_per_sample is not None:
        bad = (~info.converged_per_sample).nonzero().flatten().tolist()
        which = f" ({len(bad)} of {info.converged_per_sample.numel()} samples, e.g. {bad[:5]})"
    if info.message:
        why = info.message
    else:
        hint = ("Raise max_steps, loosen tol (relative) / atol, pass acceleration=hp.Anderson(), or use tol=0 "
                "for exactly max_steps steps")
        aggregating = iteration is not None and iteration.aggregates
        limit = getattr(iteration.alpha, "limit", 0.0) if aggregating else 0.0
        if limit:
            hint = (f"The aggregation weight alpha_k does not vanish (its limit is {limit}, accepted with "
                    "strict=False): the iteration approaches a point that is not a fixed point of T, so no "
                    "max_steps meets the tolerance. Use a vanishing schedule, e.g. alpha=hp.Harmonic(1.0)")
        elif u is not None and not transforms_active() and info.tol == 0.0:
            hint = ("The fixed point is 0 (or near it), where a relative tolerance tol·‖u‖ cannot be met: pass "
                    "atol=... (an absolute tolerance)")
        res, thr, where = info.residual, info.tol, ""
        if info.tol_per_sample is not None and info.converged_per_sample is not None and info.residuals.dim() > 1:
            # the figures of the unconverged sample furthest from its own threshold
            r, t = info.residuals[-1].reshape(-1).double(), info.tol_per_sample.reshape(-1).double()
            ratio = torch.nan_to_num(r / t.clamp_min(1e-300), nan=math.inf)
            j = int(torch.where(~info.converged_per_sample.reshape(-1), ratio, -math.inf).argmax())
            res, thr, where = float(r[j]), float(t[j]), f" (sample {j})"
        why = (f"it stopped after {info.steps} steps with residual ||T(u) - u|| = {res:.3e}{where} above the "
               f"threshold {thr:.3e}; the result is not a fixed point. {hint}")
    warnings.warn(f"the lower solve ({info.mode}) did not converge{which}: {why}", ConvergenceWarning, stacklevel=3)
