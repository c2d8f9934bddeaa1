r"""The Krylov forward: the fixed point of an affine operator as a linear solve (:ref:`math-krylov`).

An operator affine in :math:`u`, :math:`T(u; x) = Mu + c` (``M`` = :math:`\partial_u T`, constant),
has its fixed point where :math:`(I - M)u = c`. Conjugate gradients (a symmetric :math:`M`, e.g.
the :class:`~hodl_plugin.operators.GradientStep` of a quadratic, :math:`I - M = s\nabla^2 f`) reach a
relative residual :math:`\epsilon` in about :math:`\sqrt{\kappa}\log(2/\epsilon)` products, GMRES (any
:math:`M`) similarly on well-behaved spectra, where the GKM iteration needs
:math:`\kappa\log(1/\epsilon)` steps (:math:`\kappa` the condition number of :math:`I - M`). Each
product is one evaluation of ``T``, without autograd:

.. math::

    (I - M)z = z - \frac{T(b + \sigma z) - T(b)}{\sigma},\qquad \sigma = S/\|z\|,

at the run's base point :math:`b` (where it started, or restarted), at the scale :math:`S` of
:math:`b` and :math:`T(b)` so that the difference carries no cancellation error.

``GKMSolver(T, forward="krylov")`` selects it (CG when ``T.symmetric_jacobian`` is true, else GMRES;
``forward="cg"`` / ``"gmres"`` choose). The stopping rule is the solver's (:ref:`math-stopping`): the
point returned is the last iterate, and ``converged=True`` means its residual
:math:`\|T(u) - u\| \le \max(\mathrm{tol}\cdot\|u\|, \mathrm{atol})`, measured by one more evaluation of
``T`` at that point (``info.residual``); the earlier entries of ``info.residuals`` are the Krylov
method's own residuals (those of :math:`T(u_k) - u_k` for an affine ``T``). A run whose measured
residual misses the tolerance restarts from it (iterative refinement). ``info.steps`` counts the
products.

Nothing here assumes affinity silently: the measured residual certifies whatever ``T`` is. A ``T`` that
is not affine makes the Krylov method fail; the run then tests affinity at its last points,
:math:`T(a) + T(b) = 2T(\tfrac{a+b}{2})`, and raises :class:`~hodl_plugin.errors.NotAffineError` when
the defect is above rounding and the tolerance (else it reports ``converged=False`` with the reason,
and the solver warns). A false ``symmetric_jacobian`` claim is caught on CG's first two search
directions (:class:`~hodl_plugin.errors.LinearSolveError`).

>>> import torch, hodl_plugin as hp
>>> Q = torch.diag(torch.logspace(0, 4, 50, dtype=torch.float64))           # condition number 1e4
>>> T = hp.GradientStep(grad=lambda u, x: Q @ u - x, step=1e-4)
>>> x = torch.ones(50, dtype=torch.float64)
>>> u, info = hp.GKMSolver(T, forward="krylov", tol=1e-10).solve(torch.zeros(50, dtype=torch.float64), x)
>>> info.forward, info.converged, bool(torch.allclose(u, x / Q.diagonal(), rtol=1e-8))
('cg', True, True)
>>> info.steps < 300          # the GKM iteration: about 1e4 · log(1e10) = 230 000 steps
True
"""

from __future__ import annotations

import math
import warnings
from typing import TYPE_CHECKING, Any, Optional, Sequence

import torch
from torch import Tensor

from . import linear_solve as ls
from ._checks import check_operator_output, guard_inplace
from .errors import ConvergenceWarning, DivergenceError, LinearSolveError, NotAffineError

if TYPE_CHECKING:  # pragma: no cover
    from .gkm import GKMIteration, SolverInfo

__all__ = ["FORWARDS", "resolve", "krylov_run"]

#: The forward methods of the solver, the GKM loop or a Krylov solve (resolved to CG or GMRES).
FORWARDS = ("gkm", "krylov", "cg", "gmres")

#: a restart must reduce the measured residual by this factor, else the run stops
RESTART_PROGRESS = 0.5
#: the Krylov method's own residual target, relative to the threshold (the measured one then meets it)
INNER = 0.5


def resolve(forward: str, T: Any) -> str:
    r"""``"krylov"`` becomes ``"cg"`` when ``T.symmetric_jacobian`` is true, else ``"gmres"``.

    CG needs :math:`I - \partial_u T` symmetric (positive definite), GMRES any :math:`\partial_u T`
    (:ref:`math-krylov`).

    Args:
        forward: one of :data:`FORWARDS`.
        T: the operator; only its ``symmetric_jacobian`` attribute is read (absent: not symmetric).

    Returns:
        ``"cg"`` or ``"gmres"`` for ``"krylov"``; any other ``forward`` unchanged.

    >>> import hodl_plugin as hp
    >>> resolve("krylov", lambda u: u), resolve("gkm", None)
    ('gmres', 'gkm')
    >>> resolve("krylov", hp.GradientStep(objective=lambda u: 0.5 * (u ** 2).sum(), step=0.5))
    'cg'
    """
    if forward == "krylov":
        return "cg" if getattr(T, "symmetric_jacobian", False) else "gmres"
    return forward


class _Problem:
    """``T`` with its parameters at one base point: residuals and scaled products, per sample."""

    def __init__(self, it: GKMIteration, params: Sequence[Any], u: Tensor, Tu: Tensor, scale: Tensor) -> None:
        self.it, self.params, self.bd = it, params, it.batch_dims
        self.dims = tuple(range(self.bd, u.dim()))
        self.evals = 0
        self.scale = scale  # the run works on u / scale (a power of 2 per sample): T_s(z) = T(scale·z) / scale
        self.rebase(u, Tu)

    def T(self, w: Tensor) -> Tensor:
        self.evals += 1
        return self.it.T(w * self.scale, *self.params) / self.scale

    def norm(self, t: Tensor) -> Tensor:
        if not self.dims:
            return t.abs()
        return torch.linalg.vector_norm(t, dim=self.dims, dtype=_wide(t.dtype))

    def ex(self, t: Tensor, like: Tensor) -> Tensor:
        return t.reshape(t.shape + (1,) * (like.dim() - t.dim()))

    def rebase(self, u: Tensor, Tu: Tensor) -> None:
        """The base point of the products: ``u`` and ``T(u)``, and the scale ``S`` (per sample)."""
        self.b, self.Tb = u, Tu
        S = torch.maximum(self.norm(u), self.norm(Tu))
        self.S = torch.where(S > 0, S, torch.ones_like(S))

    def matvec(self, z: Tensor) -> Tensor:
        r"""``(I - M) z`` by one evaluation of ``T`` at the base point's scale."""
        zn = self.norm(z)
        sig = torch.where(zn > 0, self.S / torch.where(zn > 0, zn, torch.ones_like(zn)), torch.ones_like(zn))
        sig = self.ex(sig, z)
        sig = sig.to(z.dtype)
        return z - (self.T(self.b + sig * z) - self.Tb) / sig

    def affinity_defect(self, a: Tensor, Ta: Tensor) -> tuple[Tensor, Tensor]:
        r"""``(‖T(a) + T(b) - 2T((a+b)/2)‖, scale)`` per sample (0 for an affine ``T`` up to rounding)."""
        mid = self.T(0.5 * (a + self.b))
        defect = self.norm(Ta + self.Tb - 2 * mid)
        scale = self.norm(Ta) + self.norm(self.Tb) + self.norm(a) + self.norm(self.b)
        return defect, scale


def krylov_run(it: GKMIteration, u: Tensor, params: Sequence[Any], info: SolverInfo, *, start: int, n: int,
               rel: float, absolute: float, certified: bool, t0: Optional[Tensor] = None) -> Tensor:
    """The fixed point of the affine ``it.T`` by ``it.forward`` (``"cg"`` or ``"gmres"``), without autograd;
    called by :meth:`~hodl_plugin.gkm.GKMIteration.run` when the iteration's ``forward`` is not ``"gkm"``.

    Args:
        it: the iteration (its ``T``, ``batch_dims``, ``on_divergence``, ``forward``).
        u: the start point; params: the operator's parameters; info: filled as the GKM loop fills it.
        start: the step index of ``u`` (for ``info.residual_steps``); n: the most products.
        rel, absolute: the threshold ``max(rel·‖u‖, absolute)`` per sample.
        certified: whether a residual test in this dtype certifies a fixed point (else
            ``converged=False``, said in ``info.message``).
        t0: ``T(u)`` when the caller has evaluated it.

    Returns:
        the last iterate (the last finite one after a divergence with ``on_divergence="warn"``).

    Raises:
        NotAffineError: the run failed and ``T`` is measurably not affine at its last points.
        LinearSolveError: CG on an operator whose ``symmetric_jacobian`` claim is false.
        DivergenceError: non-finite values (``on_divergence="raise"``).

    >>> import torch, hodl_plugin as hp
    >>> it = hp.GKMSolver(lambda u: 0.5 * u + 1.0, forward="gmres").iteration
    >>> info = hp.SolverInfo(mode="implicit")
    >>> u = krylov_run(it, torch.zeros(3, dtype=torch.float64), [], info, start=0, n=100, rel=1e-12, absolute=0.0,
    ...                certified=True)
    >>> u.tolist(), info.steps, info.converged
    ([2.0, 2.0, 2.0], 2, True)
    """
    with torch.no_grad():
        return _run(it, u.detach(), params, info, start, n, rel, absolute, certified, t0)


def _run(it: GKMIteration, u: Tensor, params: Sequence[Any], info: SolverInfo, start: int, n: int,
         rel: float, absolute: float, certified: bool, t0: Optional[Tensor]) -> Tensor:
    info.forward = it.forward
    info.exact_steps = False
    if it.batch_dims > u.dim():
        raise ValueError(f"batch_dims={it.batch_dims} but u0 has only {u.dim()} dimensions")
    u = u.clone()
    if t0 is None:
        Tu = guard_inplace(it.T, u, params)
        check_operator_output(Tu, u)
    else:
        Tu = t0
    # the run works on u / s, s a power of 2 per sample near the scale of (u0, T(u0)): the Krylov methods'
    # sums of squares neither under- nor overflow whatever the problem's scale (and the scaling is exact)
    s = _scale(u, Tu, it.batch_dims)
    s_flat = s.reshape(s.shape[: it.batch_dims])
    u, Tu = u / s, Tu / s
    absolute = absolute / s_flat if it.batch_dims else absolute / float(s)
    pr = _Problem(it, params, u, Tu, s)
    hist: list[Tensor] = []
    steps: list[int] = []
    d = Tu - u
    rn, un = pr.norm(d), pr.norm(u)
    thresh = torch.clamp(rel * un, min=absolute)
    r_start, u_start = rn, un
    if info.steps == 0 and info.initial_residual is None:
        info.initial_residual = rn * s_flat if it.batch_dims else float(rn * s_flat)
    used = 0
    prev = None  # the measured residual of the last cycle's end
    x = x_good = u
    message = ""
    while True:
        if not _finite(rn):
            return _nonfinite(it, info, x_good * s, [h * s_flat for h in hist], steps, start, used, rn * s_flat)
        blowup = _blowup(it, rn * s_flat, un, r_start * s_flat, u_start, used)
        if blowup:  # a T that is not affine is named as such; an affine one has no fixed point
            _refuse_nonaffine(pr, x, Tu, None, it.forward)
            return _diverged(it, info, x_good * s, [h * s_flat for h in hist], steps, start, used, rn * s_flat, blowup)
        x_good = x
        done = rn <= thresh
        if bool(done.all()):
            break
        if used >= n:  # out of products: the solver warns; a T that is not affine is said as such
            _stalled(pr, x, Tu, rn, thresh, it.forward)
            break
        if prev is not None and not bool(((rn <= RESTART_PROGRESS * prev) | done).all()):
            message = _stalled(pr, x, Tu, rn, thresh, it.forward)
            break
        prev = rn
        budget = n - used
        if it.forward == "cg":
            x, k, h, broke = _cg(pr, x, d, thresh, ~done, rel, absolute, budget)
        else:
            x, k, h, broke = _gmres(pr, x, d, thresh, ~done, rel, absolute, budget)
        hist += h
        steps += [start + used + j + 1 for j in range(len(h))]
        used += k
        Tu = pr.T(x)
        d = Tu - x
        rn, un = pr.norm(d), pr.norm(x)
        thresh = torch.clamp(rel * un, min=absolute)
        if broke and not bool((rn <= thresh).all()):
            message = _stalled(pr, x, Tu, rn, thresh, it.forward, breakdown=True)
            break
        pr.rebase(x, Tu)
    hist.append(rn)
    steps.append(start + used)
    _finish(it, info, [h * s_flat for h in hist], steps, rn * s_flat, thresh * s_flat, used, certified, message)
    return x * s


def _scale(u: Tensor, Tu: Tensor, bd: int) -> Tensor:
    """A power of 2 per sample (shape ``batch + (1,)*k``) at the scale of ``max(|u0|, |T(u0)|)``; 1 where that
    is 0 or not finite."""
    dims = tuple(range(bd, u.dim()))
    m = torch.maximum(u.abs().amax(dim=dims, keepdim=True) if dims else u.abs(),
                      Tu.abs().amax(dim=dims, keepdim=True) if dims else Tu.abs())
    return ls._pow2_scale(m)


#: the iterate may grow at most this much (relative to the start's scale and residual) in units of the
#: dtype's resolution: beyond, I - dT/du is (numerically) singular and the "solution" meaningless
BLOWUP = 1e3


def _blowup(it: GKMIteration, rn: Tensor, un: Tensor, r0: Tensor, u0: Tensor, used: int) -> str:
    r"""An affine :math:`T` without a fixed point (:math:`c \notin \mathrm{range}(I - M)`, singular
    :math:`I - M`) sends the Krylov iterate to infinity while the residual stays put: a relative test
    :math:`\|T(u) - u\| \le \mathrm{tol}\,\|u\|` would then pass at a meaningless point. The GKM loop
    detects this from the residual's history; here a GMRES residual above the start's, or an iterate grown far
    beyond what the start's scale allows, is a divergence."""
    if not used:
        return ""
    # un, u0: norms of the scaled iterate (the start's is about 1); rn, r0: residuals in the caller's units
    limit = BLOWUP / torch.finfo(un.dtype).eps ** 0.5 * torch.clamp(u0, min=1.0)
    bad = un > limit
    if it.forward == "gmres":  # GMRES's residual does not increase (CG's may: it minimises the error's A-norm)
        bad = bad | (rn > 2 * r0)
    if not bool(bad.any()):
        return ""
    return (f"the Krylov forward ({it.forward}) found no fixed point: after {used} products the iterate grew "
            f"{float(un.max() / torch.clamp(u0, min=1.0).max()):.3g}x from its start while the residual ||T(u) - u|| "
            f"went from {float(r0.max()):.3e} to {float(rn.max()):.3e}: I - dT/du is singular and T(u) = Mu + c has "
            "no fixed point (c is not in the range of I - M), or T is not affine. forward='gkm' reports such an "
            "operator step by step")


def _finite(r: Tensor) -> bool:
    return bool(torch.isfinite(r).all())


# ------------------------------------------------------------------------------------------------
# the two Krylov methods, on A = I - M at the problem's base point; x is the iterate itself
# ------------------------------------------------------------------------------------------------
def _cg(pr: _Problem, x: Tensor, r: Tensor, thresh: Tensor, active: Tensor, rel: float, absolute: float,
        budget: int) -> tuple[Tensor, int, list, bool]:
    """Conjugate gradients from ``x`` (residual ``r``) per sample: each sample stops when its own
    residual is below ``INNER·max(rel·‖x‖, absolute)``; returns ``(x, products, residual history,
    breakdown)``. Checks the symmetry of ``A`` on its first two directions."""
    if not pr.bd:
        return _cg_one(pr, x, r, rel, absolute, budget)
    dot = (lambda a, b: (a * b).sum(pr.dims)) if pr.dims else (lambda a, b: a * b)
    p = r
    rs = dot(r, r)
    hist: list[Tensor] = []
    first: Optional[tuple[Tensor, Tensor]] = None
    k = 0
    broke = False
    while k < budget:
        rn = rs.clamp(min=0).sqrt()
        thr = torch.clamp(rel * pr.norm(x), min=absolute)
        active = active & (rn > INNER * thr)
        if k:
            hist.append(rn)
        if not bool(active.any()):
            break
        Ap = pr.matvec(torch.where(pr.ex(active, p), p, torch.zeros_like(p)))
        k += 1
        if k == 1:
            first = (p, Ap)
        elif k == 2 and first is not None:
            _check_symmetric(pr, first, (p, Ap), active)
        pAp = dot(p, Ap)
        ok = active & (pAp != 0) & torch.isfinite(pAp)
        broke = broke or bool((active & ~ok).any())
        active = ok
        alpha = torch.where(ok, rs / torch.where(ok, pAp, torch.ones_like(pAp)), torch.zeros_like(rs))
        a = pr.ex(alpha, x)
        x = torch.where(pr.ex(ok, x), x + a * p, x)
        r = torch.where(pr.ex(ok, r), r - a * Ap, r)
        rs_new = torch.where(ok, dot(r, r), rs)
        beta = torch.where(ok, rs_new / torch.where(ok & (rs > 0), rs, torch.ones_like(rs)), torch.zeros_like(rs))
        p = torch.where(pr.ex(ok, p), r + pr.ex(beta, p) * p, p)
        rs = rs_new
    return x, k, hist, broke


def _cg_one(pr: _Problem, x: Tensor, r: Tensor, rel: float, absolute: float,
            budget: int) -> tuple[Tensor, int, list, bool]:
    """:func:`_cg` for one problem: step sizes, norms and the product scale as host floats (two host
    reads per iteration, ten tensor operations besides ``T``)."""
    S = float(pr.S)
    Tb, b = pr.Tb, pr.b
    rs, xx = torch.stack([_dot(r, r), _dot(x, x)]).tolist()
    p, pp = r, rs
    hist: list = []
    first: Optional[tuple[Tensor, Tensor]] = None
    k = 0
    while k < budget and rs > (INNER * max(rel * math.sqrt(xx), absolute)) ** 2:
        sig = S / math.sqrt(pp) if pp > 0 else 1.0
        Ap = p.sub(pr.T(b.add(p, alpha=sig)) - Tb, alpha=1.0 / sig)
        k += 1
        if k == 1:
            first = (p, Ap)
        elif k == 2 and first is not None:
            _raise_asymmetric(pr, ls._symmetry_defect(first[0], first[1], p, Ap), p)
        pAp = float(_dot(p, Ap))
        if pAp == 0 or not math.isfinite(pAp):
            return x, k, hist, True
        alpha = rs / pAp
        x = x.add(p, alpha=alpha)
        r = r.add(Ap, alpha=-alpha)
        rs_new, xx = torch.stack([_dot(r, r), _dot(x, x)]).tolist()
        hist.append(math.sqrt(max(rs_new, 0.0)))
        beta = rs_new / rs if rs > 0 else 0.0
        p = r.add(p, alpha=beta)
        pp = rs_new + beta * beta * pp
        rs = rs_new
    return x, k, hist, False


def _dot(a: Tensor, b: Tensor) -> Tensor:
    return torch.vdot(a.reshape(-1), b.reshape(-1)) if a.dim() != 1 else torch.vdot(a, b)


def _wide(dtype: torch.dtype) -> Optional[torch.dtype]:
    """float64 for the sums of squares of float32 / half tensors (``None``: the dtype itself)."""
    return torch.float64 if dtype in (torch.float32, torch.float16, torch.bfloat16) else None


def _raise_asymmetric(pr: _Problem, defect: float, p: Tensor) -> None:
    """A symmetry defect above rounding: :class:`NotAffineError` when ``T`` is not affine (products at two
    scales then differ, whatever the symmetry), else :class:`LinearSolveError` (a false symmetry claim)."""
    if defect <= 1e3 * torch.finfo(p.dtype).eps ** 0.75:
        return
    pn = pr.norm(p)
    a = pr.b + pr.ex(pr.S / torch.where(pn > 0, pn, torch.ones_like(pn)), p).to(p.dtype) * p
    _refuse_nonaffine(pr, a, pr.T(a), None, "cg")
    claimed = getattr(pr.it.T, "symmetric_jacobian", False)
    why = ("forward='krylov' runs CG because the operator declares symmetric_jacobian = True" if claimed
           else "forward='cg' needs a symmetric dT/du (CG's directions are conjugate only then)")
    raise LinearSolveError(
        f"{why}, but dT/du is not symmetric: <a, (I-J)c> - <(I-J)a, c> = {defect:.3e} (relative) on CG's first two "
        "search directions. " + ("Declare symmetric_jacobian = False on it (GMRES is then used), or pass "
                                 "forward='gmres'" if claimed else "Pass forward='gmres' (or 'krylov')")
    )


def _refuse_nonaffine(pr: _Problem, a: Tensor, Ta: Tensor, where: Optional[Tensor], method: str,
                      thresh: Optional[Tensor] = None) -> None:
    """:class:`NotAffineError` when :math:`\\|T(a) + T(b) - 2T(\\tfrac{a+b}{2})\\|` is above rounding (and
    ``thresh``) for a sample in ``where`` (all when ``None``)."""
    if torch.equal(a, pr.b):  # no second point to test affinity with: one from the residual direction
        a = a + (Ta - a)
        Ta = pr.T(a)
    defect, scale = pr.affinity_defect(a, Ta)
    floor = 1e4 * torch.finfo(a.dtype).eps * scale
    nonaffine = defect > (floor if thresh is None else torch.maximum(thresh, floor))
    if where is not None:
        nonaffine = nonaffine & where
    if bool(nonaffine.any()):
        worst = float(defect[nonaffine].max()) if defect.dim() else float(defect)
        raise NotAffineError(
            f"forward='krylov' ({method}) needs an operator affine in u, T(u) = Mu + c, but T is not: "
            f"||T(a) + T(b) - 2T((a+b)/2)|| = {worst:.3e} (relative to the solve's scale) at points of the solve, "
            "above rounding. Use forward='gkm' (the default) for this operator"
        )


def _check_symmetric(pr: _Problem, first: tuple[Tensor, Tensor], second: tuple[Tensor, Tensor],
                     active: Tensor) -> None:
    """CG's directions are A-conjugate only for a symmetric A: ``⟨p1, Ap0⟩ = ⟨Ap1, p0⟩`` up to rounding."""
    (p0, Ap0), (p1, Ap1) = first, second
    dot = (lambda a, b: (a * b).sum(pr.dims)) if pr.dims else (lambda a, b: a * b)
    scale = pr.norm(p1) * pr.norm(Ap0) + pr.norm(Ap1) * pr.norm(p0)
    defect = (dot(p1, Ap0) - dot(Ap1, p0)).abs() / torch.where(scale > 0, scale, torch.ones_like(scale))
    defect = torch.where(active, defect, torch.zeros_like(defect))
    _raise_asymmetric(pr, float(defect.max()), p1)


def _gmres(pr: _Problem, x: Tensor, r: Tensor, thresh: Tensor, active: Tensor, rel: float, absolute: float,
           budget: int) -> tuple[Tensor, int, list, bool]:
    r"""Restarted GMRES on the correction :math:`A\delta = r` (:class:`~hodl_plugin.linear_solve.GMRES`,
    per sample with ``batch_dims``) to ``INNER·max(rel·X, absolute)``, :math:`X` the scale of the
    solution known now: ‖x‖, or ‖r‖/2 from a zero start (a lower bound of ‖u*‖ for a nonexpansive T).
    One cycle; the caller measures and restarts."""
    xn = pr.norm(x)
    X = torch.where(xn > 0, xn, 0.5 * pr.norm(r))
    thr = INNER * torch.clamp(rel * X, min=absolute)
    thr = torch.where(active, thr, torch.full_like(thr, math.inf))
    restart = min(50, max(1, r[(0,) * pr.bd].numel()) if pr.bd else r.numel(), budget)
    before = pr.evals
    if pr.bd:
        delta, li = ls._gmres_batched(pr.matvec, r, None, ls._Batch(r, pr.bd), 0.0, thr.reshape(-1), budget, restart)
        hist = [li.residual_per_sample] if li.residual_per_sample is not None else []
    else:
        delta, li = ls.GMRES(restart=restart, maxiter=budget)._solve(pr.matvec, r, None, 0.0, float(thr))
        hist = [li.residual]
    k = pr.evals - before
    x = x + torch.where(pr.ex(active, delta), delta, torch.zeros_like(delta))
    return x, k, hist, False


# ------------------------------------------------------------------------------------------------
# reports
# ------------------------------------------------------------------------------------------------
def _stalled(pr: _Problem, x: Tensor, Tx: Tensor, rn: Tensor, thresh: Tensor, method: str,
             breakdown: bool = False) -> str:
    """A run that stopped above its threshold: raise :class:`NotAffineError` when ``T`` is measurably
    not affine there, else say why (the message of ``info``)."""
    _refuse_nonaffine(pr, x, Tx, rn > thresh, method, thresh)
    what = ("CG broke down (a direction with <p, (I - dT/du)p> = 0: I - dT/du is not definite)" if breakdown
            else "the measured residual stopped decreasing between restarts")
    return (f"the Krylov forward ({method}) stopped with residual ||T(u) - u|| = {float(rn.max()):.3e} above the "
            f"threshold {float(thresh.max()):.3e}: {what}; T is affine at the points tested, so the tolerance may be "
            "below what the dtype resolves for this T (loosen tol / atol), or I - dT/du is singular")


def _nonfinite(it: GKMIteration, info: SolverInfo, u_good: Tensor, hist: list, steps: list,
               start: int, used: int, rn: Tensor) -> Tensor:
    return _diverged(it, info, u_good, hist, steps, start, used, rn, (
        f"the Krylov forward ({it.forward}) became non-finite after {used} products: T(u, *params) returned NaN or "
        "Inf (check it, e.g. a log or a division, and its parameters)"
    ))


def _diverged(it: GKMIteration, info: SolverInfo, u_good: Tensor, hist: list, steps: list,
              start: int, used: int, rn: Tensor, message: str) -> Tensor:
    info.diverged = True
    info.converged = False
    info.steps += used
    info.message = message
    hist = [*hist, rn]
    info.residuals = _stack(hist)
    info.residual_steps = [*steps, start + used]
    if it.on_divergence == "raise":
        raise DivergenceError(info.message)
    warnings.warn(info.message, ConvergenceWarning, stacklevel=5)
    return u_good


def _stack(hist: list) -> Tensor:
    """The history as one tensor ``(entries, *batch)``: host floats (one problem) and tensors."""
    last = hist[-1]
    if last.dim() == 0:
        return torch.tensor([float(h) for h in hist], dtype=last.dtype, device=last.device)
    return torch.stack([h.detach().reshape(last.shape) for h in hist])


def _finish(it: GKMIteration, info: SolverInfo, hist: list[Tensor], steps: list[int], rn: Tensor,
            thresh: Tensor, used: int, certified: bool, message: str) -> None:
    conv = rn <= thresh
    new = _stack(hist)
    old = info.residuals
    if old.numel() and old.shape[1:] == new.shape[1:]:
        new = torch.cat([old.to(new.device, new.dtype), new])
    info.residuals = new
    info.residual_steps = info.residual_steps + steps
    info.tol = float(thresh.max())
    before = info.steps
    info.steps = before + used
    if it.batch_dims:
        info.steps_per_sample = torch.full(rn.shape, before + used, dtype=torch.long, device=rn.device)
        info.converged_per_sample = conv if certified else torch.zeros_like(conv)
    info.converged = bool(conv.all())
    if message and not info.converged:
        info.message = message
    if not certified and info.converged:
        info.converged = False
        info.message = (
            f"the residual {info.residual:.3e} meets the default tolerance of {str(rn.dtype).replace('torch.', '')}, "
            "but in that dtype it does not certify a fixed point: compute in float32, or pass tol= to accept "
            "this residual threshold"
        )
