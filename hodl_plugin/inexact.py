r"""The inexact implicit hypergradient of ISGD / MAID: accuracy schedules, warm starts, the bound.

At call :math:`k` the forward stops at accuracy :math:`\varepsilon_k` and the adjoint at
:math:`\delta_k` (:ref:`math-inexact`); both start from the previous call's solution of the same
``key``; the certified a-posteriori bound of the resulting error is :mod:`hodl_plugin.bound`'s.
"""

from __future__ import annotations

import dataclasses
import math
import warnings
import weakref
from typing import Any, Callable, Hashable, Optional, Sequence, Union

import torch
from torch import Tensor

from . import linear_solve as ls
from ._autodiff import grad_wanted
from ._capture import BoundOperator
from ._torch_compat import plain_tensors
from .bound import BoundConstants, a_posteriori, residuals_at, with_v_norm
from .errors import ConfigurationError, ScheduleError, user_stacklevel
from .gkm import GKMIteration, SolverInfo, validate_count
from .hypergrad import HypergradMethod
from .implicit import bind_iteration, fixed_point_solve
from .schedules import Schedule, as_schedule, check_accuracy

__all__ = ["Inexact", "BoundConstants"]


def _cache_key(key: Optional[Hashable]) -> Optional[Hashable]:
    """A warm-start key as a plain value: 0-d tensors by their value, other tensors refused."""
    if isinstance(key, Tensor):
        if key.numel() != 1:
            raise TypeError(
                f"key must be hashable by value (an int, a str, a tuple or a 0-d tensor), got a tensor of "
                f"shape {tuple(key.shape)}"
            )
        return key.item()
    try:
        hash(key)
    except TypeError:
        raise TypeError(f"key must be hashable (an int, a str, a tuple), got {type(key).__name__}") from None
    return key


class Inexact(HypergradMethod):
    r"""Inexact implicit hypergradient with accuracy schedules (ISGD / MAID, :ref:`math-inexact`).

    At call :math:`k` (counted over calls with grad enabled): the forward stops when the residual
    :math:`\|u - T(u)\| \le \varepsilon_k\|u\|` (``relative=True``, the default: scale-aware) or
    :math:`\le \varepsilon_k` (``relative=False``: ISGD's absolute accuracies), warm-started from the
    iterate of the previous call with the same ``key`` (e.g. a mini-batch index; the ``u0`` passed is
    then used only for keys not seen before — ``info.warm_started`` says which); the adjoint system is
    solved to residual :math:`\delta_k\|\nabla_u F\|` (relative) or :math:`\delta_k` (absolute),
    warm-started likewise (a warm start worse than zero is dropped, so the adjoint stays linear in the
    upstream gradient). After ``backward()`` the solver's ``info`` holds ``eps``, ``delta``, the adjoint
    diagnostics and the a-posteriori ``error_bound`` (:mod:`hodl_plugin.bound`). Higher derivatives
    (double backward, forward mode, ``torch.func``) go through the same primitive as
    :class:`~hodl_plugin.implicit.Implicit`, with solves to :math:`\delta_k`.

    A method object holds counters and warm starts: give each solver its own (a second solver using
    the same object raises ``ValueError``); a deep copy or an unpickled copy is a new, independent
    method that belongs to the first solver that runs it.

    Args:
        eps: forward accuracy schedule :math:`\varepsilon_k` (number or
            :class:`~hodl_plugin.schedules.Schedule`), e.g. ``Polynomial(1e-2, 0.5)``.
        delta: adjoint accuracy schedule :math:`\delta_k`; default: same as ``eps``.
        solver: adjoint solver, as for :class:`~hodl_plugin.implicit.Implicit` (its tolerance is
            :math:`\delta_k`: a solver object with ``rtol``/``atol`` of its own is refused).
        adjoint_maxiter: cap on the adjoint solver's matrix products.
        constants: known :class:`~hodl_plugin.bound.BoundConstants`, ``"estimate"`` (default:
            certified Lanczos estimates every ``estimate_every`` calls; needs the solver's ``upper=F`` —
            with ``alpha=0`` to use F without aggregating — else the bound is ``None`` and
            ``info.message`` says why) or ``None`` (no bound).
        warm_start: reuse the previous ``u`` and ``v`` of the same key.
        on_fail: ``"warn"`` (default) or ``"raise"`` when the adjoint misses :math:`\delta_k`.
        check_unique: as for :class:`~hodl_plugin.implicit.Implicit`.
        relative: accuracies relative to the problem's scale (default) or absolute.

    Raises:
        ScheduleError: ``eps`` or ``delta`` is not positive and non-increasing.
        ValueError, TypeError: another option out of range.
        ConfigurationError: a ``solver`` object with its own ``rtol`` / ``atol`` (the adjoint tolerance
            of this mode is :math:`\delta_k`).

    >>> from hodl_plugin.schedules import Polynomial
    >>> Inexact(eps=Polynomial(1e-2, 0.5)).eps(3)
    0.005
    """

    name = "inexact"

    def __init__(
        self,
        eps: Union[float, Schedule] = 1e-4,
        delta: Union[float, Schedule, None] = None,
        solver: ls.SolverLike = None,
        adjoint_maxiter: int = 1000,
        constants: Union[str, BoundConstants, None] = "estimate",
        estimate_every: int = 10,
        warm_start: bool = True,
        on_fail: str = "warn",
        check_unique: Optional[bool] = None,
        relative: bool = True,
    ) -> None:
        self.relative = bool(relative)
        self.eps = as_schedule(eps, "eps")
        self.delta = self.eps if delta is None else as_schedule(delta, "delta")
        problems = check_accuracy(self.eps, "eps") + check_accuracy(self.delta, "delta")
        if self.relative:
            problems += [f"{n} is relative (relative=True) and must stay below 1 ({n} >= 1 accepts any point), "
                         f"got {n}_0 = {sch.sup}"
                         for n, sch in (("eps", self.eps), ("delta", self.delta)) if sch.sup >= 1]
        if problems:
            raise ScheduleError("; ".join(problems))
        if not (constants is None or constants == "estimate" or isinstance(constants, BoundConstants)):
            raise ValueError(f"constants must be 'estimate', None or a BoundConstants, got {constants!r}")
        self.solver = None if solver is None else ls.as_solver(solver)
        if isinstance(self.solver, ls.LinearSolver) and not isinstance(self.solver, ls.FunctionSolver):
            default = {f.name: f.default for f in dataclasses.fields(self.solver)}
            if (self.solver.rtol, self.solver.atol) != (default["rtol"], default["atol"]):
                raise ConfigurationError(
                    f"Inexact(solver={self.solver!r}): the adjoint tolerance of the inexact mode is delta_k "
                    "(delta=...); pass the solver without rtol/atol"
                )
        if on_fail not in ("raise", "warn"):
            raise ValueError(f"on_fail must be 'raise' or 'warn', got {on_fail!r}")
        if check_unique is not None and not isinstance(check_unique, bool):
            raise TypeError(f"check_unique must be None, True or False, got {check_unique!r}")
        self.maxiter = validate_count(adjoint_maxiter, "adjoint_maxiter")
        self.constants = constants
        self.estimate_every = validate_count(estimate_every, "estimate_every")
        self.warm_start, self.on_fail, self.check_unique = bool(warm_start), on_fail, check_unique
        self.k = 0
        self.u_cache: dict[Hashable, Tensor] = {}
        self.v_cache: dict[Hashable, Tensor] = {}
        self.estimated: Optional[BoundConstants] = None
        self._owner: Optional[Any] = None
        self._told_warm = False

    # -- object life: one solver; copies are independent ---------------------------------------
    def bind(self, owner: object) -> None:
        """Refuse a second solver: the counter :math:`k` and the warm starts belong to one problem."""
        current = self._owner() if self._owner is not None else None
        if current is not None and current is not owner:
            raise ValueError(
                "this Inexact object already belongs to another GKMSolver: its step counter and warm "
                "starts would be shared. Give each solver its own hp.Inexact(...)"
            )
        self._owner = weakref.ref(owner)

    def __getstate__(self) -> dict[str, Any]:  # pickle / deepcopy: the owner is not part of the state
        state = dict(self.__dict__)
        state["_owner"] = None
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)

    # -- one call ----------------------------------------------------------------------------------
    def _solver(self, it: GKMIteration, delta: float) -> ls.LinearSolver:
        base = self.solver
        if base is None:
            base = ls.CG() if getattr(it.T, "symmetric_jacobian", False) else ls.GMRES()
        if isinstance(base, ls.FunctionSolver):
            return base
        tol = {"rtol": delta, "atol": 0.0} if self.relative else {"rtol": 0.0, "atol": delta}
        return base.replace(maxiter=self.maxiter, **tol)

    def run(self, it, u0, params, info, key=None):
        key = _cache_key(key)
        eps_k, delta_k = self.eps(self.k), self.delta(self.k)
        info.eps, info.delta = eps_k, delta_k
        cached = self.u_cache.get(key) if self.warm_start else None
        sample_shape = tuple(u0.shape)  # one problem's (under vmap: one sample's)
        pending: list[Optional[Tensor]] = []  # per-sample iterates of a vmapped call solved one by one
        tols = {"tol": eps_k, "atol": 0.0} if self.relative else {"tol": 0.0, "atol": eps_k}

        def warm(start: Tensor, batched: bool, sample: Optional[tuple[int, int]]) -> Optional[Tensor]:
            """The cached iterate as a start: the same shape as ``start``; under vmap a cached batch
            (its sample ``i`` when the samples are solved one by one) or a single problem's iterate,
            then used for every sample."""
            if cached is None or cached.device != start.device:
                return None
            if sample is not None and tuple(cached.shape) == (sample[1], *start.shape):
                return cached[sample[0]].to(start.dtype)
            if cached.shape == start.shape:
                return cached.to(start.dtype)
            if batched and tuple(cached.shape) == sample_shape:
                return cached.to(start.dtype).expand(start.shape)
            return None

        def forward(u_start: Tensor, ps: Sequence[Any], info_: SolverInfo, iteration: GKMIteration,
                    sample: Optional[tuple[int, int]]) -> Tensor:
            batched = iteration is not it
            start = warm(u_start, batched, sample)
            info_.warm_started = start is not None
            if start is not None:
                self._tell_warm(key)
            else:
                start = u_start.detach()
            with torch.no_grad():
                u = iteration.run(start, ps, info_, **tols)
            if self.warm_start:
                if sample is None:
                    if not info_.diverged:
                        self.u_cache[key] = u.detach().clone()
                else:  # the batch is cached once its last sample is solved
                    pending.append(None if info_.diverged else u.detach().clone())
                    if sample[0] == sample[1] - 1:
                        if len(pending) == sample[1] and all(p is not None for p in pending):
                            self.u_cache[key] = torch.stack(pending)  # type: ignore[arg-type]
                        pending.clear()
            return u

        call = self.k
        if torch.is_grad_enabled():
            self.k += 1
        if not grad_wanted():
            return forward(u0, params, info, it, None)  # (under vmap the primitive's batched solve stops early)

        # the adjoint's warm start is fixed when the call is made, so every backward pass through this
        # call starts from the same point (reentrant, as gradcheck/gradgradcheck require)
        v_prev = self.v_cache.get(key) if self.warm_start else None
        if v_prev is not None and v_prev.dtype != u0.dtype:
            v_prev = None
        op = bind_iteration(it, u0, params)

        def after(v: Tensor, u_star: Tensor, samples: Callable[[], Any]) -> None:
            if self.warm_start and bool(torch.isfinite(v).all()):
                self.v_cache[key] = v.detach().clone()
            self._bounds(it, op, samples, call, info, batched=tuple(v.shape) != sample_shape)

        return fixed_point_solve(it, u0, params, info, self._solver(it, delta_k), forward=forward, op=op,
                                 on_fail=self.on_fail, check_unique=self.check_unique,
                                 warm=lambda: v_prev, after=after)

    def _tell_warm(self, key: Hashable) -> None:
        if self._told_warm:
            return
        self._told_warm = True
        warnings.warn(
            f"Inexact warm start: key {key!r} was solved before, so this solve starts from its cached "
            "iterate and the u0 you pass is used only for new keys (warm_start=False always starts "
            "from u0; this is said once per method object)",
            UserWarning,
            stacklevel=user_stacklevel(),
        )

    # -- the certified bound ------------------------------------------------------------------------
    def _bounds(self, it: GKMIteration, op: BoundOperator, samples: Callable[[], Any], call: int,
                info: SolverInfo, batched: bool) -> None:
        """``info.error_bound`` and ``info.error_estimate`` (with ``_per_sample`` tensors under vmap)."""
        if self.constants is None:
            return
        if it.upper is None and not isinstance(self.constants, BoundConstants):
            info.message = (
                "no error bound: estimating it needs the upper objective (GKMSolver(..., upper=F, "
                "alpha=0) uses F without aggregating) or known BoundConstants"
            )
            return
        if not isinstance(self.constants, BoundConstants) and call % self.estimate_every != 0:
            info.message = f"error bound not computed at this call (estimate_every={self.estimate_every})"
            return
        bounds, estimates, notes = [], [], []
        adj = info.adjoint
        per = None if adj is None or adj.residual_per_sample is None else adj.residual_per_sample.reshape(-1)
        problems = list(samples())
        for i, (v, u_star, ts) in enumerate(problems):
            # the adjoint residual the solver reported for this problem: its sample's under a vmap, all the
            # samples' together where one problem holds a batch_dims batch (solved per sample), else the solve's
            if per is not None and len(problems) == per.numel():
                res: Optional[float] = float(per[i])
            elif per is not None:
                res = float(torch.linalg.vector_norm(per.double()))
            else:
                res = None if adj is None else adj.residual
            b, e, note = self._bound(it, op, u_star, ts, v, res)
            bounds.append(math.nan if b is None else b)
            estimates.append(math.nan if e is None else e)
            if note:
                notes.append(f"sample {i}: {note}" if batched else note)
        if notes:
            more = f" (and {len(notes) - 3} more samples)" if len(notes) > 3 else ""
            info.message = "; ".join(notes[:3]) + more
        info.error_bound = max(bounds) if all(math.isfinite(b) for b in bounds) else None
        info.error_estimate = max(estimates) if all(math.isfinite(e) for e in estimates) else None
        if batched:
            with plain_tensors():
                info.error_bound_per_sample = torch.tensor(bounds, dtype=torch.float64)
                info.error_estimate_per_sample = torch.tensor(estimates, dtype=torch.float64)

    def _bound(self, it: GKMIteration, op: BoundOperator, u_star: Tensor, ts: Sequence[Tensor], v: Tensor,
               adj: Optional[float]) -> tuple:
        """``(bound, estimate, note)`` for one problem at the point the hypergradient used; ``ts``: its
        tensors (the solver's params and the tensors T reads), requiring grad where the hypergradient goes."""

        def T(u: Tensor, *tensors: Tensor) -> Tensor:
            return op(u, tensors)

        def F(u: Tensor, *tensors: Tensor) -> Tensor:
            with op.context(tensors):
                return it.upper(u, *op.params(tensors))  # type: ignore[misc]

        learned = [t for t in ts if t.requires_grad]
        if isinstance(self.constants, BoundConstants):  # user-certified constants
            eps, delta = residuals_at(T, F if it.upper is not None else None, u_star, ts, v, point=u_star)
            delta = adj if delta is None else delta
            return with_v_norm(self.constants, v).bound(eps, math.inf if delta is None else delta), None, ""
        solver = self.solver if self.solver is not None else ls.for_operator(None, it.T)
        rep = a_posteriori(
            T, F, u_star, ts, learned, v,
            point=u_star,  # the implicit primitive returns the forward iterate itself
            adjoint_residual=adj,
            symmetric=bool(getattr(it.T, "symmetric_jacobian", False)) or solver.symmetric,
        )
        return rep.bound, rep.estimate, ("error bound: " + rep.message) if rep.message else ""

    # -- state ----------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Counters and warm starts as plain containers (readable by ``torch.load(weights_only=True)``)."""
        est = None if self.estimated is None else dataclasses.asdict(self.estimated)
        return {
            "method": "inexact",
            "k": self.k,
            "u_cache": [[k, t] for k, t in self.u_cache.items()],
            "v_cache": [[k, t] for k, t in self.v_cache.items()],
            "estimated": est,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`'s output; validated whole before anything is changed."""
        if not isinstance(state, dict) or "k" not in state or state.get("method", "inexact") != "inexact":
            what = state.get("method", "?") if isinstance(state, dict) else type(state).__name__
            raise ValueError(
                f"not the state of an Inexact method (got {what!r} state with keys "
                f"{sorted(state) if isinstance(state, dict) else '-'}); load the state of a solver with "
                "hypergrad='inexact'"
            )
        k = state["k"]
        if isinstance(k, bool) or not float(k).is_integer() or int(k) < 0:
            raise ValueError(f"Inexact state: k must be an integer >= 0, got {k!r}")

        def pairs(name: str) -> dict:
            raw = state.get(name, [])
            items = raw.items() if isinstance(raw, dict) else raw
            out = {}
            for item in items:
                kk, t = item
                if not isinstance(t, Tensor):
                    raise ValueError(f"Inexact state: {name} must map keys to tensors, got {type(t).__name__}")
                out[kk] = t
            return out

        u_cache, v_cache = pairs("u_cache"), pairs("v_cache")
        est = state.get("estimated")
        if isinstance(est, dict):
            est = BoundConstants(**est)
        elif est is not None and not isinstance(est, BoundConstants):
            raise ValueError(f"Inexact state: estimated must be a dict of constants, got {type(est).__name__}")
        self.k, self.u_cache, self.v_cache, self.estimated = int(k), u_cache, v_cache, est

    def __repr__(self) -> str:
        return f"Inexact(eps={self.eps!r}, delta={self.delta!r}, k={self.k})"
