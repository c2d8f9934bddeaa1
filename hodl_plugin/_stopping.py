r"""Stopping, divergence and diagnostics of one GKM run, per sample with ``batch_dims``.

The rule (:ref:`math-stopping`): a sample stops at the first check :math:`k` where

.. math::  r_k = \|T(u_k) - u_k\| \le \max(\mathrm{tol}\cdot\|u_k\|,\ \mathrm{atol}),

and the point returned is that :math:`u_k` — the point whose residual was measured — so
``converged=True`` always means the returned :math:`u` meets the tolerance. A run whose steps
autograd records (unrolled, truncated) returns at least :math:`u_1`: :math:`u_0` carries no derivative
of the map. A sample that runs out of steps returns its last iterate, whose residual is measured once
more at the end (one evaluation of T, no autograd) — except in an exact-steps run (``tol=0, atol=0``),
which evaluates T exactly K times and reports its last step's residual.

A run with a tolerance also stops, with ``converged=False`` and a diagnosis, when

- the residual is at the rounding floor of the dtype (below :data:`FLOOR` ``·eps·‖u‖``) and made no new
  minimum (by 1 %) for :data:`FLOOR_CHECKS` checks: the tolerance is below what the dtype resolves
  (a ``ConvergenceWarning`` says so, with the residual reached);
- it made no new minimum for :data:`STALL_STEPS` steps, nor for as many steps as it took to reach the
  last one: T is not a contraction near the iterates (``DivergenceError`` when the residual is far
  above any rounding error, above :data:`STALL_DIVERGED` relative; else a ``ConvergenceWarning``).

Any run stops with ``DivergenceError`` (``on_divergence="warn"``: a warning and the last finite point)
when a residual is non-finite, exceeds ``divergence_factor`` times the first one, or grew for 5 checks
in a row to twice its smallest value.

The per-sample rule is written once, over arrays of the samples: torch tensors on an accelerator
(one host sync per check) and under ``torch.func`` transforms (none: stopped samples are frozen by
masks, diverged ones become NaN), numpy views of them for a CPU batch run eagerly (reading a CPU tensor
is no sync, and a small numpy operation costs a fraction of a torch one: a check of 64 samples ~4× less);
a single problem run eagerly takes the decisions on host floats.
"""

from __future__ import annotations

import math
import warnings
from typing import TYPE_CHECKING, Any, Callable, Optional

import torch
from torch import Tensor

from ._torch_compat import forward_ad_active
from .acceleration.base import HOST_DTYPES, NORMAL, row_sq
from .errors import ConvergenceWarning, DivergenceError

try:  # the per-sample checks of an eager CPU batch compute in numpy (views of the tensors)
    import numpy as np
except ImportError:  # pragma: no cover - torch runs without numpy
    np = None  # type: ignore[assignment]

if TYPE_CHECKING:  # pragma: no cover
    from .gkm import GKMIteration, SolverInfo

__all__ = ["Monitor", "default_tol", "certifies"]

_DEFAULT_TOL = {torch.float64: 1e-10, torch.float32: 1e-5}

#: consecutive growing checks, and growth over the smallest residual, that flag a slow divergence
SLOW_DIVERGENCE_CHECKS = 5
SLOW_DIVERGENCE_GROWTH = 2.0
#: steps without a new smallest residual that end a run with a tolerance (see the module docstring)
STALL_STEPS = 200
STALL_IMPROVEMENT = 0.99
#: a stall above this relative residual (or 1000 times the dtype's default tolerance) is a divergence
STALL_DIVERGED = 1e-6
#: the rounding floor: a residual below FLOOR·eps·‖u‖ that makes no new minimum for FLOOR_CHECKS
#: checks has reached what the dtype resolves
FLOOR = 32.0
FLOOR_CHECKS = 3


def default_tol(dtype: torch.dtype) -> float:
    r"""The default relative tolerance of the forward solve for ``dtype``: ``1e-10`` in float64,
    ``1e-5`` in float32, the machine epsilon in lower precision (:func:`certifies`).

    >>> default_tol(torch.float64), default_tol(torch.float32), default_tol(torch.bfloat16)
    (1e-10, 1e-05, 0.0078125)
    """
    if dtype in _DEFAULT_TOL:
        return _DEFAULT_TOL[dtype]
    return float(torch.finfo(dtype).eps)


def certifies(dtype: torch.dtype) -> bool:
    r"""Whether a residual test in ``dtype`` certifies a fixed point by default.

    Not in float16 / bfloat16: the rounding of T alone is ``eps·‖u‖`` (0.4 % in bfloat16), the rounded
    map can have fixed points of its own far from :math:`u^*` (its residual is then exactly 0), and the
    error of :math:`u` is the residual times :math:`\|(I - \partial_u T)^{-1}\|` — 100 times it for a
    contraction 0.99. So with the default tolerance such a solve reports ``converged=False`` and says
    why; ``tol=`` given explicitly is a residual threshold the caller accepts (``converged`` then means
    it holds), and computing in float32 gives a certified solve.

    >>> certifies(torch.float32), certifies(torch.bfloat16)
    (True, False)
    """
    return torch.finfo(dtype).eps <= 1e-4


# the squares of entries below ~1e-154 or above ~1e154 leave float64's range (float32 and half precision
# tensors are summed in float64): a norm outside these bounds is measured again, scaled
_TINY, _HUGE = NORMAL



def scaled_norm(t: Tensor, dims: Optional[tuple[int, ...]] = None) -> Tensor:
    """:math:`\\|t\\|` as :math:`m\\,\\|t/m\\|`, :math:`m = \\max_i |t_i|`: no square under- or overflows
    (over ``dims``, one norm per remaining index; all dims by default).

    >>> import torch
    >>> float(scaled_norm(torch.full((4,), 1e-200, dtype=torch.float64)))   # the plain norm gives 0
    2e-200
    >>> [f"{v:.3g}" for v in scaled_norm(torch.tensor([[3e-200, 4e-200], [3e200, 4e200]], dtype=torch.float64), (1,))]
    ['5e-200', '5e+200']
    """
    low = t.dtype in (torch.float32, torch.float16, torch.bfloat16)
    if dims is None:
        m = t.abs().amax() if t.numel() else torch.zeros((), dtype=t.dtype, device=t.device)
    else:
        m = t.abs().amax(dim=dims, keepdim=True)
    m = torch.where(m > 0, m, torch.ones_like(m)).to(torch.float64 if low else m.dtype)
    if dims is None:
        return torch.linalg.vector_norm(t.to(m.dtype) / m) * m
    return torch.linalg.vector_norm(t.to(m.dtype) / m, dim=dims) * m.squeeze(dims)


class Monitor:
    """The per-sample stop state of one run of :meth:`~hodl_plugin.gkm.GKMIteration.run`.

    ``check(k, r, u_k, u_next, d)`` tests the residual of the point ``u_k`` — its norm ``r`` (per
    sample), or the difference ``d`` = :math:`T(u_k) - u_k` whose norm the check takes itself (with
    that of ``u_k``, in one operation) — and returns the next iterate: ``u_next``, except that samples
    that stop keep ``u_k`` and diverged ones their last finite iterate. ``finish(u, executed, residual)``
    writes the diagnostics into ``info`` (measuring samples that ran out of steps with ``residual(u)``
    = :math:`T(u) - u`).
    """

    def __init__(self, it: GKMIteration, u: Tensor, info: SolverInfo, tol: float, atol: float,
                 stop: bool, functional: bool, start: int, certified: bool = True,
                 aggregating: bool = False, defer: bool = False) -> None:
        self.it, self.info, self.tol, self.atol, self.start = it, info, tol, atol, start
        self.certified = certified
        # HODL aggregation moves u by α_k s∇F: the residual may rise from a start near Fix T to that scale
        # and fall back (not a divergence), and need not decrease monotonically (no stall test)
        self.aggregating = aggregating
        self.stop, self.functional = stop, functional
        # a run whose steps autograd records (unrolled, truncated) returns at least one step: u_0
        # itself would carry no derivative of the map
        self.min_steps = 1 if torch.is_grad_enabled() else 0
        self.bdims = it.batch_dims
        self.reduce_dims = tuple(range(self.bdims, u.dim()))
        self.stack_dims = tuple(range(1, u.dim() + 1))
        # norms of float32/16 tensors are summed in float64: ‖u‖² of entries above ~1e19 overflows float32 (a
        # finite residual would read as Inf and the solve be called divergent)
        self.norm_dtype = torch.float64 if u.dtype in (torch.float32, torch.float16, torch.bfloat16) else None
        self.noise_tol = default_tol(u.dtype)
        self.floor = FLOOR * torch.finfo(u.dtype).eps
        self.dtype = u.dtype
        self.stall_level = max(STALL_DIVERGED, 1e3 * self.noise_tol)
        # iterates below the dtype's smallest normal number: the fixed point is 0 to working precision, where a
        # relative tolerance is out of reach (a stall there is not a divergence: it needs atol)
        self.subnormal = float(torch.finfo(u.dtype).tiny)
        self.masking = functional  # freeze stopped samples with torch.where at every step
        self._frozen: tuple = (None, None, None)  # (active mask, as a tensor broadcastable to u, ~mask in numpy)
        self.done = False
        self.hist: list[Tensor] = []
        self.hist_steps: list[int] = []
        self.u_good = u
        self.scalar = self.bdims == 0 and not functional
        self.hist_f: list[float] = []  # the scalar path keeps host floats (one tensor at the end)
        self.device = u.device
        r0 = None if functional else info.initial_residual
        # the array namespace of the per-sample state: numpy on the host (eager CPU batches), else torch
        self.xp = np if (np is not None and not functional and u.device.type == "cpu") else torch
        # a host batch of plain steps does not freeze its stopped samples at every step (a torch.where per
        # step): it keeps their returned points aside and puts them back at the end (:meth:`restore`);
        # meanwhile they go on iterating, which changes nothing for the others (the samples are independent)
        # (numpy writes only the primal of a forward-mode dual tensor: with a dual level open, torch does them)
        self.numpy_writes = self.xp is not torch and not forward_ad_active()
        self.defer = defer and self.numpy_writes and self.bdims > 0
        # a host batch of float32/float64 samples takes its norms in numpy
        self.np_norms = self.xp is not torch and bool(self.reduce_dims) and u.dtype in HOST_DTYPES
        self.batch_shape = tuple(u.shape[: self.bdims])
        self.kept: Optional[Tensor] = None
        self.kept_mask: Any = None
        self.last_thr: Any = None  # the per-sample thresholds of the last check (a batch)
        if self.scalar:
            self.f = _ScalarState(None if r0 is None else float(r0))
        else:
            self.t = _TensorState(self._arr(r0) if isinstance(r0, Tensor) else None)

    # -- helpers -------------------------------------------------------------------------------
    def norm(self, t: Tensor) -> Tensor:
        if not self.reduce_dims:
            return t.abs()
        return torch.linalg.vector_norm(t, dim=self.reduce_dims, dtype=self.norm_dtype)

    def expand(self, mask: Any, like: Tensor) -> Tensor:
        """``mask`` over the samples (a tensor, or a numpy array on the host path) broadcastable to ``like``."""
        mask = _as_tensor(mask)
        return mask.reshape(mask.shape + (1,) * (like.dim() - mask.dim()))

    def _final_norm(self, t: Tensor) -> Tensor:
        """Per-sample norms at the end of a run (once): scaled in float64, whose squares leave the dtype's
        range beyond 1e±154 (float32 and half precision are summed in float64 anyway)."""
        if self.norm_dtype is None and self.reduce_dims:
            return scaled_norm(t.detach(), self.reduce_dims)
        return self.norm(t.detach())

    def _np_norm(self, t: Tensor) -> Any:
        """Per-sample norms of a float32/float64 CPU tensor in numpy, summed in float64."""
        a = t.detach().numpy().reshape(self.batch_shape + (-1,))
        return np.sqrt(row_sq(a, None if a.dtype == np.float64 else np.float64))

    def _out_of_range(self, r: Any, un: Any) -> bool:
        """Whether a residual is 0 or outside the squares' range, or a ``‖u‖`` overflows (a numpy test on
        the host path; on torch tensors always true: scaling costs a few operations, a test a sync)."""
        if self.xp is torch:
            return True
        if not r.size:
            return False
        return bool(np.minimum.reduce(r, axis=None) <= _TINY or np.maximum.reduce(r, axis=None) >= _HUGE
                    or np.maximum.reduce(un, axis=None) >= _HUGE)

    def _arr(self, t: Tensor) -> Any:
        """A detached per-sample tensor in the state's namespace (a numpy view on the host path)."""
        t = t.detach()
        return t.numpy() if self.xp is not torch else t

    def freeze(self, new: Tensor, old: Tensor, fresh: bool = False) -> Tensor:
        """Samples that stopped keep ``old`` (``fresh``: ``new`` is the step's own new tensor, which a host
        batch then changes in place, in numpy)."""
        if not self.masking or self.scalar or self.t.active is None:
            return new
        active = self.t.active
        if self._frozen[0] is not active:  # the mask changes at checks only: reshaped once per check
            stopped = ~active if self.xp is not torch else None
            if stopped is not None:
                stopped = stopped.reshape(stopped.shape + (1,) * (new.dim() - stopped.ndim))
            self._frozen = (active, self.expand(active, new), stopped)
        if (fresh and self._frozen[2] is not None and new.dtype in HOST_DTYPES and not new.requires_grad
                and self.numpy_writes):
            np.copyto(new.numpy(), old.detach().numpy(), where=self._frozen[2])
            return new
        return torch.where(self._frozen[1], new, old)

    # -- the check -------------------------------------------------------------------------------
    def check(self, k: int, r: Optional[Tensor], u_k: Tensor, u_next: Tensor, d: Optional[Tensor] = None,
              agg: Optional[Tensor] = None, gate: Optional[Tensor] = None) -> Tensor:
        """``agg``: the size of the aggregation's displacement :math:`\\alpha_k s\\|\\nabla F(u_k)\\|`, the
        scale a residual may legitimately reach when aggregating (divergence is measured against it);
        ``gate``: a second norm that must meet the tolerance too (the outside form's selection test); the
        larger of the two is the progress measure of the stall tests, the residual is what is recorded."""
        if self.scalar:
            return self._check_scalar(k, r, u_k, u_next, d, agg, gate)
        if r is None:
            assert d is not None
            if not self.np_norms:  # (else both norms are taken in numpy by the check)
                r = self.norm(d.detach())
        if self.xp is torch:
            return self._check_tensor(k, r, u_k, u_next, agg, d, gate)
        with np.errstate(over="ignore", invalid="ignore"):  # a sample near the dtype's max (torch is silent)
            return self._check_tensor(k, r, u_k, u_next, agg, d, gate)

    def norms(self, r: Optional[Tensor], u: Tensor, d: Optional[Tensor],
              agg: Optional[Tensor] = None, gate: Optional[Tensor] = None) -> list[float]:
        """``[‖T(u) - u‖, ‖u‖]`` (and ``agg``) of one problem as host floats, in one sync: from ``d`` =
        T(u) - u, both norms in one operation."""
        if r is not None:
            parts = [r.detach().reshape(()), torch.linalg.vector_norm(u.detach(), dtype=self.norm_dtype).to(r.dtype)]
        else:
            assert d is not None
            both = torch.stack([d.detach(), u.detach()])
            if u.dim() == 0:
                both = both.abs()
            else:
                both = torch.linalg.vector_norm(both, dim=self.stack_dims, dtype=self.norm_dtype)
            parts = [both]
        if agg is not None:
            parts.append(agg.detach().reshape(1).to(parts[0].dtype))
        if gate is not None:
            parts.append(gate.detach().reshape(1).to(parts[0].dtype))
        vals = torch.cat([t.reshape(-1) for t in parts]).tolist()
        # a residual of 0 or outside the squares' range, or an overflowing ‖u‖: measure again, scaled (an
        # underflowing ‖u‖ beside a residual in range changes no decision; a start at u = 0 costs nothing)
        if not (_TINY < vals[0] < _HUGE and vals[1] < _HUGE):
            if d is not None:
                exact = torch.stack([scaled_norm(d.detach()), scaled_norm(u.detach())]).tolist()
                vals[:2] = [v if math.isfinite(v) else old for v, old in zip(exact, vals[:2])]
        return vals

    def _check_scalar(self, k: int, r: Optional[Tensor], u_k: Tensor, u_next: Tensor,
                      d: Optional[Tensor] = None, agg: Optional[Tensor] = None,
                      gate: Optional[Tensor] = None) -> Tensor:
        """One problem, eagerly: one host sync, then decisions on floats."""
        s, info = self.f, self.info
        vals = self.norms(r, u_k, d, agg, gate)
        rf, un = vals[0], vals[1]
        rg = rf if gate is None or vals[-1] <= rf else vals[-1]  # the progress measure (a NaN in either stays)
        if s.r0 is None:
            s.r0 = rf
            if info.steps == 0:
                info.initial_residual = rf  # type: ignore[assignment]  (a float for one problem)
        if agg is not None and math.isfinite(vals[2]):
            s.r0 = max(s.r0, vals[2])
        un = un if math.isfinite(un) else 0.0
        thresh = max(self.tol * un, self.atol)
        finite = math.isfinite(rf)
        conv = rg <= thresh and k - self.start >= self.min_steps
        noise = rf <= self.noise_tol * un
        if s.provisional:  # the last check could not stop the run: it sets no reference (a start at a fixed
            s.rmin = s.rref = None  # point would make every later residual a "stall" at the rounding floor)
        s.provisional = k - self.start < self.min_steps
        if s.rref is None or rg < STALL_IMPROVEMENT * s.rref:  # a new minimum, by 1 %
            s.kmin, s.rref, s.cmin = k, rg, 0
        else:
            s.cmin += 1
        s.rmin = rg if s.rmin is None else min(s.rmin, rg)
        s.ups = s.ups + 1 if (s.rprev is not None and rf > s.rprev) else 0
        s.rprev, s.kprev = rf, k
        grow = rf > self.it.divergence_factor * max(s.r0, 1e-30) or (
            s.ups >= SLOW_DIVERGENCE_CHECKS and rf > SLOW_DIVERGENCE_GROWTH * s.rmin and not noise
            and not (self.aggregating and rf <= s.r0)
        )
        floor = s.rmin <= self.floor * un and s.cmin >= FLOOR_CHECKS
        long = k - s.kmin >= max(STALL_STEPS, s.kmin - self.start) and not self.aggregating
        stalled = self.stop and finite and not conv and (floor or long)
        self.hist_f.append(rf)
        self.hist_steps.append(k)
        info.tol = thresh
        if not finite or grow or (stalled and not floor and s.rmin > self.stall_level * un
                                  and un >= self.subnormal):
            s.diverged = True
            s.stopped_at = k
            self.done = True
            self._diverged(k, rf, s.r0, s.rmin, not finite, stalled and finite and not grow, None)
            # the last point with a finite residual, attached to the graph of this step (for autograd)
            keep = torch.ones((), dtype=torch.bool, device=u_k.device)
            return torch.where(keep, u_k if finite else self.u_good, u_next)
        self.u_good = u_k
        if (conv and self.stop) or stalled:
            s.stopped_at, s.stop_res, s.stop_thr, s.converged = k, rf, thresh, conv
            if stalled:
                self._stall_message(k, rf, s.rmin, s.kmin, thresh, floor, None, un < self.subnormal)
            self.done = True
            return u_k
        return u_next

    def _check_tensor(self, k: int, r: Optional[Tensor], u_k: Tensor, u_next: Tensor, agg: Optional[Tensor],
                      d: Optional[Tensor] = None, gate: Optional[Tensor] = None) -> Tensor:
        """A batch (or any run under transforms): arrays over the samples (``self.xp``: numpy or torch)."""
        s, info, xp = self.t, self.info, self.xp
        if r is None:  # a float32/float64 host batch: both norms in numpy, summed in float64
            r_in, r, un = None, self._np_norm(d), self._np_norm(u_k)
        else:
            r_in, r = r, self._arr(r)
            un = self._arr(self.norm(u_k.detach()))
        if d is not None and self.norm_dtype is None and self.reduce_dims and self._out_of_range(r, un):
            # float64 squares outside the dtype's range: both norms measured again, scaled per sample
            r_in = scaled_norm(d.detach(), self.reduce_dims)
            r, un = self._arr(r_in), self._arr(scaled_norm(u_k.detach(), self.reduce_dims))
        if r_in is None:
            r_in = torch.from_numpy(r)
        un = xp.where(xp.isfinite(un), un, 0.0)  # a norm: >= 0 or not finite
        if s.r0 is None:
            s.r0 = r
            if not self.functional and info.steps == 0:
                info.initial_residual = r_in.detach()
        if agg is not None:
            a = self._arr(agg.to(r_in.dtype))
            s.r0 = xp.maximum(s.r0, xp.where(xp.isfinite(a), a, 0.0))
        thresh = np.maximum(self.tol * un, self.atol) if xp is np else (self.tol * un).clip(min=self.atol)
        if xp is not torch and agg is None and gate is None and self._improving(k, r):
            return self._check_improving(k, r, thresh, u_k, u_next)
        finite = xp.isfinite(r)
        rg = r if gate is None else xp.maximum(r, self._arr(gate.to(r_in.dtype)))  # the progress measure
        conv = rg <= thresh
        if k - self.start < self.min_steps:
            conv = xp.zeros_like(conv)
        noise = r <= self.noise_tol * un
        if s.provisional:  # the last check could not stop the run: it sets no reference (as one problem's)
            s.rmin = None
        s.provisional = k - self.start < self.min_steps
        if s.rmin is None:
            s.rmin, s.rref, s.ups, s.cmin = rg, rg, xp.zeros_like(r), xp.zeros_like(r)
            s.kmin = xp.full_like(r, k)
        else:
            s.ups = xp.where(r > s.rprev, s.ups + 1, 0.0)
            new_min = rg < STALL_IMPROVEMENT * s.rref  # a new minimum, by 1 %
            s.kmin = xp.where(new_min, float(k), s.kmin)
            s.cmin = xp.where(new_min, 0.0, s.cmin + 1)
            s.rref = xp.where(new_min, rg, s.rref)
            s.rmin = xp.minimum(s.rmin, rg)
        r_before = s.rprev  # (the residual of the last finite point a diverging sample returns)
        s.rprev, s.kprev = r, k
        slow = (s.ups >= SLOW_DIVERGENCE_CHECKS) & (r > SLOW_DIVERGENCE_GROWTH * s.rmin) & ~noise
        if self.aggregating:
            slow = slow & ~(r <= s.r0)
        grow = (r > self.it.divergence_factor * s.r0.clip(min=1e-30)) | slow
        active = xp.ones_like(conv) if s.active is None else s.active
        floor = (s.rmin <= self.floor * un) & (s.cmin >= FLOOR_CHECKS)
        if self.stop and not self.functional:
            long = ((k - s.kmin) >= (s.kmin - self.start).clip(min=STALL_STEPS)) & (not self.aggregating)
            stalled = active & finite & ~conv & (floor | long)
        else:
            stalled = xp.zeros_like(conv)
        bad = ~finite | grow | (stalled & ~floor & (s.rmin > self.stall_level * un) & (un >= self.subnormal))
        stalled = stalled & ~bad
        newly_conv = active & conv & ~bad if self.stop else xp.zeros_like(conv)
        newly_bad = active & bad
        newly_stop = newly_conv | stalled
        s.active = active & ~newly_stop & ~newly_bad
        if self.functional:  # no host syncs: diverged samples become NaN (visible), stopped ones freeze
            out = torch.where(self.expand(newly_bad, u_next), torch.full_like(u_next, math.nan), u_next)
            return torch.where(self.expand(newly_stop, u_next), u_k, out)
        self._record(k, r, thresh)
        flags = [newly_bad.any(), ~s.active.any(), newly_stop.any(), finite.all(), stalled.any()]
        any_bad, all_done, any_stop, all_finite, any_stall = (
            torch.stack(flags).tolist() if xp is torch else [bool(f) for f in flags])  # one sync
        out = u_next
        if any_bad:
            stall_only = bool((finite & ~grow)[newly_bad].all())
            s.diverged = s.diverged | newly_bad
            s.stopped_at = xp.where(newly_bad & (s.stopped_at < 0), k, s.stopped_at)
            # the residual of the point it returns: this one's where finite, else the last check's
            s.stop_res = xp.where(newly_bad, xp.where(finite, r, math.nan if r_before is None else r_before),
                                  s.stop_res)
            last_good = torch.where(self.expand(finite, u_k), u_k, self.u_good)
            out = torch.where(self.expand(newly_bad, u_next), last_good, u_next)
            self.masking = True  # the diverged samples keep their last finite iterate from here on
            self._diverged(k, float(r[newly_bad].max()), float(s.r0[newly_bad].max()),
                           float(s.rmin[newly_bad].max()), not bool(finite[newly_bad].all()), stall_only,
                           _indices(newly_bad))
        if any_stop:
            out = self._stop(k, newly_stop, newly_conv, r, thresh, u_k, out)
            if any_stall:
                self._stall_message(k, float(r[stalled].max()), float(s.rmin[stalled].max()),
                                    int(s.kmin[stalled].min()), float(thresh[stalled].max()),
                                    bool(floor[stalled].all()), _indices(stalled),
                                    bool((un[stalled] < self.subnormal).any()))
        self.u_good = u_k if all_finite else torch.where(self.expand(finite, u_k), u_k, self.u_good)
        self.done = bool(all_done)
        return out

    def _improving(self, k: int, r: Any) -> bool:
        """Whether every residual is finite and every running sample made a new minimum (by 1 %): then no
        divergence or stall test can fire (a residual below its reference is below the previous one and
        within ``divergence_factor`` of the first), and :meth:`_check_improving` decides in a few host
        operations what the full rule would. Host batches only, after the first check."""
        s = self.t
        if s.rref is None or s.provisional or k - self.start < self.min_steps:
            return False
        better = r < STALL_IMPROVEMENT * s.rref  # NaN fails
        if s.active is None:  # (every sample improved: every residual is finite)
            return bool(np.logical_and.reduce(better, axis=None))
        better |= ~s.active
        return bool(np.logical_and.reduce(better, axis=None)) and bool(np.isfinite(r).all())

    def _check_improving(self, k: int, r: Any, thresh: Any, u_k: Tensor, u_next: Tensor) -> Tensor:
        """:meth:`_check_tensor` when :meth:`_improving` holds: the stall state restarts at this check
        (a new minimum everywhere; the state of stopped samples is not read again) and only the
        samples that meet the tolerance stop."""
        s = self.t
        s.ups.fill(0.0)
        s.cmin.fill(0.0)
        s.kmin.fill(float(k))
        s.rref, s.rmin = r, np.minimum(s.rmin, r)
        s.rprev, s.kprev = r, k
        self._record(k, r, thresh)
        self.u_good = u_k
        if not self.stop:
            return u_next
        newly = r <= thresh
        if s.active is not None:
            newly &= s.active
        if not newly.any():
            return u_next
        s.active = ~newly if s.active is None else s.active & ~newly
        self.done = not s.active.any()
        return self._stop(k, newly, newly, r, thresh, u_k, u_next)

    def _stop(self, k: int, newly: Any, conv: Any, r: Any, thresh: Any, u_k: Tensor, out: Tensor) -> Tensor:
        """The samples ``newly`` stop at check ``k`` (``conv``: those that met the tolerance) and return
        ``u_k``: frozen in ``out`` and at every later step, or — with ``defer`` — kept aside for
        :meth:`restore` while they go on iterating (copied in numpy when no autograd graph runs through
        them)."""
        s, xp = self.t, self.xp
        s.stopped_at = xp.where(newly, k, s.stopped_at)
        s.stop_res = xp.where(newly, r, s.stop_res)
        s.stop_thr = xp.where(newly, thresh, s.stop_thr)
        s.converged = s.converged | conv
        if not self.defer:
            self.masking = True
            return torch.where(self.expand(newly, out), u_k, out)
        if self.kept is None:
            self.kept = u_k.clone()
            self.kept_mask = newly.copy()
        elif u_k.requires_grad or self.kept.requires_grad or u_k.dtype not in HOST_DTYPES:
            self.kept = torch.where(self.expand(newly, u_k), u_k, self.kept)
            self.kept_mask |= newly
        else:
            where = newly.reshape(newly.shape + (1,) * (u_k.dim() - newly.ndim))
            np.copyto(self.kept.numpy(), u_k.detach().numpy(), where=where)
            self.kept_mask |= newly
        return out

    def restore(self, u: Tensor) -> Tensor:
        """``u`` with the returned points of the samples that stopped (``defer``; else ``u`` itself)."""
        if self.kept is None:
            return u
        return torch.where(self.expand(self.kept_mask, u), self.kept, u)

    def _record(self, k: int, r: Any, thresh: Any) -> None:
        """A check's residuals into the history (a stopped sample keeps the one it stopped at) and its
        threshold into ``info.tol``; the per-sample stop record is allocated at the first check."""
        s, xp = self.t, self.xp
        self.hist.append(r if self.kept_mask is None else np.where(self.kept_mask, s.stop_res, r))
        self.hist_steps.append(k)
        self.info.tol = float(thresh.max())
        self.last_thr = thresh
        if s.stopped_at is None:
            s.stopped_at = xp.full_like(r, -1, dtype=xp.int64)
            s.stop_res, s.stop_thr = xp.full_like(r, math.nan), xp.full_like(r, math.nan)
            s.converged = xp.zeros_like(r, dtype=xp.bool if xp is torch else bool)
            s.diverged = xp.zeros_like(s.converged)

    # -- reports ------------------------------------------------------------------------------
    def _diverged(self, k: int, r: float, r0: float, rmin: float, nonfinite: bool, stall: bool,
                  which: Optional[list]) -> None:
        info, it = self.info, self.it
        info.diverged = True
        where = f" (batch samples {which[:8]}{'...' if len(which) > 8 else ''})" if which else ""
        if nonfinite:
            src = ("T(u, *params) or the upper objective's gradient (HODL aggregation: upper / upper_grad)"
                   if it.aggregates else "T(u, *params)")
            what = (f"became non-finite (NaN/Inf): {src} returned NaN or Inf on the iterates "
                    "(check it, e.g. a log or a division, and its parameters)")
        elif stall:
            what = (f"has not decreased for over {STALL_STEPS} steps (smallest {rmin:.3e}, now {r:.3e}), far above "
                    "any rounding error: the iteration is not converging")
        elif r > it.divergence_factor * r0:
            what = f"grew from {r0:.3e} to {r:.3e} (more than divergence_factor={it.divergence_factor:g} times)"
        else:
            what = (f"kept growing for {SLOW_DIVERGENCE_CHECKS} checks in a row, from {rmin:.3e} to {r:.3e} "
                    "(a slow divergence)")
        acc = it.acceleration
        if acc is None:
            hint = ""
        elif nonfinite:  # an extrapolated iterate may leave the dtype's range where T's own iterates do not
            hint = (f" With acceleration={type(acc).__name__}(...) T is evaluated at extrapolated points, which near "
                    "the top of the dtype's range can overflow where T's own iterates would not: run the same "
                    "solve with acceleration=None to tell which (or compute in a wider dtype).")
        else:
            hint = (
                f" With acceleration={type(acc).__name__}(...) the extrapolated iterates can drift away where T "
                "itself converges: run the same solve with acceleration=None to tell which; if it converges, use "
                "a longer history (history_size), a tighter safeguard, or no acceleration."
            )
        info.message = (
            f"the GKM iteration diverged at step {k}{where}: the fixed-point residual ||T(u_k) - u_k|| {what}. "
            "Check that T is nonexpansive in u (e.g. a step size below 2/L for a gradient step; a learned "
            "operator kept contractive, e.g. by spectral normalisation); a nonexpansive T that is not averaged "
            "(a rotation, a reflection) needs a KM relaxation beta < 1"
            + (" and that the upper step s is below 1/L_F." if it.aggregates else ".") + hint
        )
        if it.on_divergence == "raise":
            info.steps = max(info.steps, k)  # (the run ends here, before finish() counts its steps)
            raise DivergenceError(info.message)
        warnings.warn(info.message, ConvergenceWarning, stacklevel=5)

    def _stall_message(self, k: int, r: float, rmin: float, kmin: int, thresh: float, floor: bool,
                       which: Optional[list], at_zero: bool = False) -> None:
        where = f" (batch samples {which[:8]}{'...' if len(which) > 8 else ''})" if which else ""
        dtype = str(self.dtype).replace("torch.", "")
        if floor:
            why = (f"it reached the rounding floor of {dtype} (smallest {rmin:.3e}, now {r:.3e}) above the threshold "
                   f"{thresh:.3e}: the tolerance is below what {dtype} resolves for this T; the error of u may be "
                   "this residual times ||(I - dT/du)^-1||. Loosen tol / atol, or compute in a wider dtype "
                   "(float16/bfloat16: in float32)")
        else:
            why = (f"the residual has not decreased since step {kmin} (smallest {rmin:.3e}, now {r:.3e}, threshold "
                   f"{thresh:.3e}): T is not a contraction near the iterates, or the tolerance is out of reach")
        if at_zero:
            why += (f"; the iterates are below {dtype}'s smallest normal number: the fixed point is 0 to working "
                    "precision, where a relative tolerance cannot be met (a fixed point at 0 needs atol=...)")
        self.info.message = f"the GKM iteration stopped at step {k}{where}: {why}"

    # -- the end of the run ----------------------------------------------------------------------
    def finish(self, u: Tensor, executed: int, residual: Optional[Callable[[Tensor], Tensor]]) -> None:
        """Steps, residual history and convergence flags into ``info``; ``residual(u)`` measures the
        residual of the returned point of samples that ran out of steps (``None``: the last check's
        residual stands for it; nothing is measured under transforms)."""
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
            s = self.f
            if s.stopped_at is None and not s.diverged and residual is None:  # the last check stands
                un = float(torch.linalg.vector_norm(u.detach(), dtype=self.norm_dtype))
                if not _TINY < un < _HUGE:  # squares outside the dtype's range: measured again, scaled
                    un = float(scaled_norm(u.detach()))
                s.converged = bool(self.hist_f) and self.hist_f[-1] <= max(self.noise_tol * un, self.atol)
            elif s.stopped_at is None and not s.diverged:  # ran out of steps: measure the returned point
                rf, un = self.norms(None, u, residual(u))
                tol = self.tol if not info.exact_steps else self.noise_tol
                thresh = max(tol * (un if math.isfinite(un) else 0.0), self.atol)
                conv = rf <= thresh
                self.hist_f.append(rf)
                self.hist_steps.append(self.start + executed)
                info.tol = thresh
                s.converged = conv
            self._append_history()
            steps = executed if s.stopped_at is None else s.stopped_at - self.start
            info.steps = before + steps
            info.converged = bool(s.converged and not s.diverged)
            self._uncertified()
            return
        s = self.t
        s.to_torch()
        if s.stopped_at is None:
            s.stopped_at = torch.full_like(self._like(u), -1, dtype=torch.long)
            s.converged = torch.zeros_like(s.stopped_at, dtype=torch.bool)
            s.diverged = torch.zeros_like(s.converged)
        running = s.stopped_at < 0
        thr = None if self.last_thr is None else _as_tensor(self.last_thr)
        if residual is None and s.rprev is not None:  # the last check stands for the returned point
            un = self._final_norm(u)
            s.converged = s.converged | (running & (s.rprev <= torch.clamp(self.noise_tol * un, min=self.atol)))
        elif bool(running.any()):
            r = self._final_norm(residual(u))
            un = self._final_norm(u)
            tol = self.tol if not info.exact_steps else self.noise_tol
            thresh = torch.clamp(tol * torch.where(torch.isfinite(un), un, torch.zeros_like(un)), min=self.atol)
            conv = r <= thresh
            if s.stop_res is not None:  # stopped samples keep the residual of their returned point
                r = torch.where(running, r, s.stop_res)
            self.hist.append(r)
            self.hist_steps.append(self.start + executed)
            thr = thresh
            s.converged = s.converged | (running & conv)
        if thr is not None and s.stop_thr is not None:  # stopped samples keep the threshold they stopped at
            thr = torch.where(running, thr, s.stop_thr.to(thr.dtype))
        self._append_history()
        if thr is not None and self.bdims:
            info.tol_per_sample = thr
            info.tol = _worst_threshold(info.residuals[-1], thr)
        this = torch.where(s.stopped_at < 0, torch.full_like(s.stopped_at, executed), s.stopped_at - self.start)
        prev = info.steps_per_sample if info.steps_per_sample is not None else torch.full_like(this, before)
        ran = prev + this
        conv = s.converged & ~s.diverged
        info.steps = int(ran.max())
        if self.bdims:
            info.steps_per_sample = ran
            info.converged_per_sample = conv if self.certified else torch.zeros_like(conv)
        info.converged = bool(conv.all())
        self._uncertified()

    def _uncertified(self) -> None:
        """A residual test in a dtype that does not certify it (:func:`certifies`): not converged, said."""
        info = self.info
        if self.certified or not info.converged:
            return
        info.converged = False
        dtype = str(self.dtype).replace("torch.", "")
        info.message = (
            f"the residual {info.residual:.3e} meets the default tolerance of {dtype}, but in {dtype} that does "
            f"not certify a fixed point (rounding of T alone is {float(torch.finfo(self.dtype).eps):.1e}·||u||, "
            "and the error of u is the residual times ||(I - dT/du)^-1||): compute in float32 for a certified "
            "solve, or pass tol= to accept this residual threshold"
        )

    def _like(self, u: Tensor) -> Tensor:
        return torch.zeros(u.shape[: self.bdims], device=u.device)

    def _append_history(self) -> None:
        info = self.info
        if self.hist_f:
            new = torch.tensor(self.hist_f, dtype=self.dtype, device=self.device)
        elif self.hist:
            new = torch.stack([_as_tensor(h) for h in self.hist])
        else:
            return
        old = info.residuals
        if old.numel() and old.shape[1:] == new.shape[1:]:
            new = torch.cat([old.to(new.device, new.dtype), new])
        info.residuals = new
        info.residual_steps = info.residual_steps + self.hist_steps


class _ScalarState:
    """Host-float state of one problem."""

    def __init__(self, r0: Optional[float]) -> None:
        self.r0 = r0
        self.rmin: Optional[float] = None
        self.rref: Optional[float] = None
        self.kmin = 0
        self.cmin = 0
        self.rprev: Optional[float] = None
        self.kprev = 0
        self.ups = 0
        self.provisional = False  # the last check could not stop the run (it sets no stall reference)
        self.stopped_at: Optional[int] = None
        self.stop_res = math.nan
        self.stop_thr = math.nan
        self.converged = False
        self.diverged = False


def _as_tensor(a: Any) -> Any:
    """A numpy array of the host path as a tensor (sharing memory); tensors and ``None`` unchanged."""
    return torch.from_numpy(a) if np is not None and isinstance(a, np.ndarray) else a


def _indices(mask: Any) -> list:
    """The flat indices of the samples where ``mask`` holds (a tensor or a numpy array)."""
    if isinstance(mask, Tensor):
        return mask.reshape(-1).nonzero().flatten().tolist()
    return np.flatnonzero(mask).tolist()


class _TensorState:
    """Per-sample state of a batch (or of any run under transforms): torch tensors, or numpy arrays
    on the host path (:meth:`to_torch` at the end of the run)."""

    def __init__(self, r0: Optional[Tensor]) -> None:
        self.r0 = r0
        self.rmin: Optional[Tensor] = None
        self.rref: Optional[Tensor] = None
        self.kmin: Optional[Tensor] = None
        self.cmin: Optional[Tensor] = None
        self.rprev: Optional[Tensor] = None
        self.kprev = 0
        self.ups: Optional[Tensor] = None
        self.active: Optional[Tensor] = None  # None: all samples active
        self.provisional = False  # the last check could not stop the run (it sets no stall reference)
        self.stopped_at: Optional[Tensor] = None
        self.stop_res: Optional[Tensor] = None
        self.stop_thr: Optional[Tensor] = None
        self.converged: Optional[Tensor] = None
        self.diverged: Optional[Tensor] = None

    def to_torch(self) -> None:
        """Every array of the host path as a tensor (sharing memory)."""
        for name, value in vars(self).items():
            setattr(self, name, _as_tensor(value))


def _worst_threshold(r: Tensor, thr: Tensor) -> float:
    """The threshold of the sample whose residual ``r`` is largest relative to its threshold ``thr`` (the
    worst sample: the first that fails, or would)."""
    ratio = torch.where(thr > 0, r / torch.where(thr > 0, thr, torch.ones_like(thr)), r * math.inf)
    ratio = torch.where(torch.isnan(ratio), torch.full_like(ratio, math.inf), ratio)
    return float(thr.reshape(-1)[int(ratio.reshape(-1).argmax())])
